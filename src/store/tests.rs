use super::*;
use crate::state::config::Version;

fn entry(value: Option<&str>, wall_ms: u64, writer: &str) -> Entry {
    Entry {
        value: value.map(|v| v.as_bytes().to_vec()),
        flags: 0,
        version: Version {
            hlc: Timestamp::new(wall_ms, 0),
            writer: writer.to_string(),
        },
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grapevine-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn what_is_committed_comes_back() {
    let dir = temp_dir("roundtrip");
    {
        let (store, loaded) = DataDir::open(&dir, "n1", "prod").unwrap();
        assert_eq!(loaded.generation, 0);
        assert!(loaded.config.is_empty() && loaded.services.is_empty());
        store.set_generation(42).unwrap();
        let mut marks = vec![0; DIGEST_BUCKETS];
        marks[3] = 7;
        store
            .commit_config(&ConfigBatch {
                upserts: vec![
                    ("a/x".into(), entry(Some("1"), 10, "n1#1")),
                    ("a/y".into(), entry(None, 11, "n2#1")),
                    ("a/z".into(), entry(Some("3"), 12, "n1#1")),
                ],
                removed: vec![],
                hlc: Timestamp::new(12, 4),
                gc_watermarks: marks.clone(),
            })
            .unwrap();
        store
            .commit_config(&ConfigBatch {
                upserts: vec![("a/x".into(), entry(Some("2"), 13, "n1#1"))],
                removed: vec!["a/z".into()],
                hlc: Timestamp::new(13, 0),
                gc_watermarks: marks,
            })
            .unwrap();
        let web = Service::new("web", "web-1", 80);
        store
            .put_service(&StoredService {
                service: web,
                checks: vec![StoredCheck::Ttl { ttl_ms: 500 }],
            })
            .unwrap();
        store
            .put_service(&StoredService {
                service: Service::new("db", "db-1", 5432),
                checks: vec![],
            })
            .unwrap();
        store.remove_service("db-1").unwrap();
        let member = |name: &str, port| RememberedMember {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        store
            .put_members(&[member("n2", 1), member("n3", 2)])
            .unwrap();
        store.put_members(&[member("n3", 3)]).unwrap();
    }
    let (_store, loaded) = DataDir::open(&dir, "n1", "prod").unwrap();
    assert_eq!(loaded.generation, 42);
    assert_eq!(loaded.hlc, Timestamp::new(13, 0));
    assert_eq!(loaded.gc_watermarks[3], 7);
    assert_eq!(
        loaded.config,
        vec![
            ("a/x".to_string(), entry(Some("2"), 13, "n1#1")),
            ("a/y".to_string(), entry(None, 11, "n2#1")),
        ]
    );
    assert_eq!(loaded.services.len(), 1);
    assert_eq!(loaded.services[0].service.id, "web-1");
    assert_eq!(
        loaded.services[0].checks,
        [StoredCheck::Ttl { ttl_ms: 500 }]
    );
    assert_eq!(loaded.members.len(), 1);
    assert_eq!(loaded.members[0].addr.port(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_held_directory_is_refused_with_the_holders_pid() {
    let dir = temp_dir("locked");
    let (_held, _) = DataDir::open(&dir, "n1", "prod").unwrap();
    let error = DataDir::open(&dir, "n1", "prod").unwrap_err();
    assert!(
        matches!(error, StoreError::Locked { holder: Some(pid), .. } if pid == std::process::id())
    );
    let text = error.to_string();
    assert!(
        text.contains("in use by another grapevine process"),
        "{text}"
    );
    drop(_held);
    DataDir::open(&dir, "n1", "prod").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn another_nodes_directory_is_refused() {
    let dir = temp_dir("foreign");
    drop(DataDir::open(&dir, "n1", "prod").unwrap());
    let error = DataDir::open(&dir, "n2", "prod").unwrap_err();
    assert!(matches!(&error, StoreError::Foreign { found_name, .. } if found_name == "n1"));
    assert!(
        error.to_string().contains("belongs to node \"n1\""),
        "{error}"
    );
    let error = DataDir::open(&dir, "n1", "staging").unwrap_err();
    assert!(matches!(&error, StoreError::Foreign { found_label, .. } if found_label == "prod"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn filled(dir: &Path) -> u64 {
    let (store, _) = DataDir::open(dir, "n1", "prod").unwrap();
    let upserts = (0..2000)
        .map(|i| {
            (
                format!("k/{i:05}"),
                entry(Some(&"v".repeat(100)), i, "n1#1"),
            )
        })
        .collect();
    store
        .commit_config(&ConfigBatch {
            upserts,
            hlc: Timestamp::new(2000, 0),
            ..ConfigBatch::default()
        })
        .unwrap();
    drop(store);
    std::fs::metadata(dir.join(STORE_FILE)).unwrap().len()
}

#[test]
fn a_truncated_store_is_refused_with_the_recovery() {
    let dir = temp_dir("truncated");
    let len = filled(&dir);
    let file = OpenOptions::new()
        .write(true)
        .open(dir.join(STORE_FILE))
        .unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    let error = DataDir::open(&dir, "n1", "prod").unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(STORE_FILE) && text.contains("move it aside"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_garbled_store_is_refused_with_the_recovery() {
    let dir = temp_dir("garbled");
    let len = filled(&dir);
    let path = dir.join(STORE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, len);
    // Overwrite everything past the header pages with a pattern.
    for (i, byte) in bytes.iter_mut().enumerate().skip(4096) {
        *byte = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let error = DataDir::open(&dir, "n1", "prod").unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flags_persist_and_a_format_1_store_is_upgraded_in_place() {
    // A format 1 store, as the previous version wrote it: entries without flags.
    #[derive(Serialize)]
    struct EntryV1 {
        value: Option<Vec<u8>>,
        version: Version,
    }
    let dir = temp_dir("format1");
    std::fs::create_dir_all(&dir).unwrap();
    {
        let db = Database::create(dir.join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(META_FORMAT, 1u64.to_le_bytes().as_slice())
                .unwrap();
            meta.insert(META_NODE_NAME, b"n1".as_slice()).unwrap();
            meta.insert(META_CLUSTER_LABEL, b"prod".as_slice()).unwrap();
            let mut config = txn.open_table(CONFIG).unwrap();
            for (key, value) in [("a/x", Some(b"1".to_vec())), ("a/y", None)] {
                let old = EntryV1 {
                    value,
                    version: Version {
                        hlc: Timestamp::new(10, 0),
                        writer: "n1#1".into(),
                    },
                };
                let bytes = crate::wire::encode_frame(&old).unwrap();
                config.insert(key, bytes.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    {
        let (store, loaded) = DataDir::open(&dir, "n1", "prod").unwrap();
        let keys: Vec<_> = loaded.config.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a/x", "a/y"]);
        let (x, y) = (&loaded.config[0].1, &loaded.config[1].1);
        assert_eq!((x.value.as_deref(), x.flags), (Some(&b"1"[..]), 0));
        assert!(y.is_tombstone());
        assert_eq!(x.version.writer, "n1#1");
        let mut flagged = entry(Some("2"), 11, "n1#1");
        flagged.flags = 42;
        store
            .commit_config(&ConfigBatch {
                upserts: vec![("a/x".into(), flagged)],
                removed: vec![],
                hlc: Timestamp::new(11, 0),
                gc_watermarks: vec![],
            })
            .unwrap();
    }
    let (store, loaded) = DataDir::open(&dir, "n1", "prod").unwrap();
    assert_eq!(loaded.config[0].1.flags, 42);
    assert_eq!(loaded.config[0].1.value.as_deref(), Some(&b"2"[..]));
    let txn = store.db.begin_read().unwrap();
    let format = txn.open_table(META).unwrap().get(META_FORMAT).unwrap();
    assert_eq!(decode_u64(format.unwrap().value()), Some(FORMAT_VERSION));
    let _ = std::fs::remove_dir_all(&dir);
}
