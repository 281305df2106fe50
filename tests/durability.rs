//! Data dirs: in-process clusters stopped (cleanly or not) and started again from disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use grapevine::net::sealed::{Key, Keyring};
use grapevine::store::StoreError;
use grapevine::{Check, Error, Health, MemberStatus, Node, NodeBuilder, Service};

mod common;

use common::{alive, builder, eventually, WAIT};

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("grapevine-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn node(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn durable(dir: &Path, name: &str, seeds: &[SocketAddr]) -> NodeBuilder {
    builder(name, seeds).data_dir(dir.join(name))
}

/// Starts nodes `names` with data dirs, the later ones joining through the first.
async fn cluster(dir: &TempDir, names: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for name in names {
        let seeds: Vec<_> = nodes.first().map(Node::addr).into_iter().collect();
        nodes.push(durable(&dir.0, name, &seeds).start().await.unwrap());
    }
    for node in &nodes {
        alive(node, names.len()).await;
    }
    nodes
}

fn value(node: &Node, key: &str) -> Option<String> {
    node.config().get_str(key).unwrap()
}

async fn stop_all(nodes: Vec<Node>, clean: bool) {
    for node in nodes {
        if clean {
            node.leave().await.unwrap();
        } else {
            node.shutdown().await;
        }
    }
}

/// Restarts every node from its data dir, each with only the first's old address as seed
/// (ports change: they bind port 0).
async fn restart(dir: &TempDir, names: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for name in names {
        let seeds: Vec<_> = nodes.first().map(Node::addr).into_iter().collect();
        nodes.push(durable(&dir.0, name, &seeds).start().await.unwrap());
    }
    nodes
}

async fn full_restart_keeps_everything(clean: bool) {
    let dir = TempDir::new(if clean {
        "restart-clean"
    } else {
        "restart-crash"
    });
    let names = ["a", "b", "c"];
    let nodes = cluster(&dir, &names).await;
    for (i, node) in nodes.iter().enumerate() {
        for k in 0..20 {
            node.config()
                .set_str(&format!("prod/{i}/{k}"), &format!("v{k}"))
                .await
                .unwrap();
        }
    }
    assert!(nodes[1].config().delete("prod/0/3").await.unwrap());
    // Flags (Consul's KV `Flags`) replicate and persist with the value.
    nodes[2]
        .config()
        .set_with_flags("prod/1/1", "newer", u64::MAX - 1)
        .await
        .unwrap();
    let flags = |n: &Node| n.config().get_entry("prod/1/1").map(|e| e.flags);
    for node in &nodes {
        eventually(node, "every write everywhere", |n| {
            n.config().key_count() == 59
                && value(n, "prod/1/1").as_deref() == Some("newer")
                && flags(n) == Some(u64::MAX - 1)
        })
        .await;
    }
    stop_all(nodes, clean).await;

    let nodes = restart(&dir, &names).await;
    // Each node has the whole store from its own disk, before it even rejoined.
    for node in &nodes {
        assert_eq!(node.config().key_count(), 59, "{}", node.identity());
        assert_eq!(value(node, "prod/0/3"), None, "a deleted key stays deleted");
        assert_eq!(value(node, "prod/1/1").as_deref(), Some("newer"));
        assert_eq!(flags(node), Some(u64::MAX - 1), "flags kept on disk");
        assert_eq!(value(node, "prod/2/19").as_deref(), Some("v19"));
    }
    for node in &nodes {
        alive(node, 3).await;
    }
    // A write after the restart wins over the one before it, on every node.
    nodes[0]
        .config()
        .set_str("prod/1/1", "after")
        .await
        .unwrap();
    for node in &nodes {
        eventually(node, "the new write", |n| {
            value(n, "prod/1/1").as_deref() == Some("after") && flags(n) == Some(0)
        })
        .await;
    }
    stop_all(nodes, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_after_a_clean_stop_loses_nothing() {
    full_restart_keeps_everything(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_after_a_crash_loses_no_acknowledged_write() {
    full_restart_keeps_everything(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_node_converges_to_what_the_others_wrote_meanwhile() {
    let dir = TempDir::new("stale");
    let names = ["a", "b", "c"];
    let mut nodes = cluster(&dir, &names).await;
    nodes[0].config().set_str("prod/x", "old").await.unwrap();
    nodes[0].config().set_str("prod/gone", "old").await.unwrap();
    for node in &nodes {
        eventually(node, "the first writes", |n| n.config().key_count() == 2).await;
    }
    let stale = nodes.pop().unwrap();
    stale.shutdown().await;
    drop(stale);
    nodes[0].config().set_str("prod/x", "new").await.unwrap();
    nodes[1].config().delete("prod/gone").await.unwrap();
    nodes[1]
        .config()
        .set_str("prod/y", "meanwhile")
        .await
        .unwrap();

    let back = durable(&dir.0, "c", &[nodes[0].addr()])
        .start()
        .await
        .unwrap();
    assert_eq!(
        value(&back, "prod/x").as_deref(),
        Some("old"),
        "its own disk first"
    );
    eventually(&back, "the others' state", |n| {
        value(n, "prod/x").as_deref() == Some("new")
            && value(n, "prod/gone").is_none()
            && value(n, "prod/y").as_deref() == Some("meanwhile")
    })
    .await;
    for node in &nodes {
        assert_eq!(
            value(node, "prod/x").as_deref(),
            Some("new"),
            "old values lose"
        );
        assert_eq!(value(node, "prod/gone"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_through_its_remembered_members() {
    let dir = TempDir::new("rejoin");
    let mut nodes = cluster(&dir, &["a", "b", "c"]).await;
    // Member lists are saved every two seconds at most.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = nodes.pop().unwrap();
    let generation = c.identity().generation;
    c.shutdown().await;
    drop(c);
    // No seed at all.
    let back = durable(&dir.0, "c", &[]).start().await.unwrap();
    assert!(back.identity().generation > generation);
    alive(&back, 3).await;
    for node in &nodes {
        alive(node, 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_come_back_with_their_checks() {
    let dir = TempDir::new("services");
    let mut nodes = cluster(&dir, &["a", "b"]).await;
    let b = nodes.pop().unwrap();
    b.register(Service::new("web", "web-1", 8080))
        .await
        .unwrap();
    let api = b
        .register_with_check(Service::new("api", "api-1", 9000), Check::ttl(WAIT))
        .await
        .unwrap();
    api.pass().await.unwrap();
    b.register_with_checks(
        Service::new("multi", "multi-1", 9001),
        vec![Check::ttl(WAIT), Check::ttl(WAIT)],
    )
    .await
    .unwrap();
    b.register(Service::new("tmp", "tmp-1", 1)).await.unwrap();
    b.deregister("tmp-1").await.unwrap();
    b.register_declared(Service::new("cli", "cli-1", 2), None)
        .await
        .unwrap();
    let a = &nodes[0];
    eventually(a, "b's services", |n| {
        n.catalog().all_instances().len() == 4
    })
    .await;
    b.shutdown().await;
    drop(b);

    let b = durable(&dir.0, "b", &[a.addr()]).start().await.unwrap();
    let own = |n: &Node| {
        let mut rows: Vec<_> = n
            .catalog()
            .all_instances()
            .into_iter()
            .filter(|i| i.node == "b")
            .map(|i| (i.id, i.health))
            .collect();
        rows.sort();
        rows
    };
    // Run-time registrations are back, declared and deregistered ones are not; a TTL
    // check starts critical.
    eventually(&b, "the saved registrations", |n| {
        own(n)
            == [
                ("api-1".to_string(), Health::Critical),
                ("multi-1".to_string(), Health::Critical),
                ("web-1".to_string(), Health::Passing),
            ]
    })
    .await;
    let multi = b.service_handle("multi-1").unwrap();
    assert_eq!(multi.check_statuses().len(), 2, "both checks are back");
    multi.report_check(0, Health::Passing).await.unwrap();
    multi.report_check(1, Health::Passing).await.unwrap();
    b.service_handle("api-1").unwrap().pass().await.unwrap();
    eventually(a, "the restored services, passing", |n| {
        own(n)
            == [
                ("api-1".to_string(), Health::Passing),
                ("multi-1".to_string(), Health::Passing),
                ("web-1".to_string(), Health::Passing),
            ]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generation_grows_across_restarts_even_when_given() {
    let dir = TempDir::new("generation");
    let first = durable(&dir.0, "a", &[])
        .generation(5)
        .start()
        .await
        .unwrap();
    assert_eq!(first.identity().generation, 5);
    first.shutdown().await;
    drop(first);
    let second = durable(&dir.0, "a", &[])
        .generation(5)
        .start()
        .await
        .unwrap();
    assert_eq!(second.identity().generation, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_or_foreign_data_dir_is_refused() {
    let dir = TempDir::new("refused");
    let running = durable(&dir.0, "a", &[]).start().await.unwrap();
    let error = durable(&dir.0, "a", &[]).start().await.unwrap_err();
    assert!(
        matches!(error, Error::DataDir(StoreError::Locked { .. })),
        "{error}"
    );
    running.shutdown().await;
    drop(running);
    let error = builder("b", &[])
        .data_dir(dir.node("a"))
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::DataDir(StoreError::Foreign { .. })),
        "{error}"
    );
    let error = durable(&dir.0, "a", &[])
        .cluster_label("other")
        .start()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("of cluster \"grapevine\""),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyring_lives_in_the_data_dir() {
    let dir = TempDir::new("keyring");
    let key = Keyring::new(Key::generate().unwrap());
    let peer = builder("peer", &[])
        .keyring(key.clone())
        .start()
        .await
        .unwrap();
    let a = durable(&dir.0, "a", &[peer.addr()])
        .keyring(key.clone())
        .start()
        .await
        .unwrap();
    alive(&a, 2).await;
    assert!(dir.node("a").join("keyring.json").exists());
    a.shutdown().await;
    drop(a);
    // Started again without a key: the data dir's keyring is used.
    let a = durable(&dir.0, "a", &[peer.addr()]).start().await.unwrap();
    assert_eq!(a.keys(), Some(key));
    alive(&a, 2).await;
    assert!(peer
        .members()
        .iter()
        .any(|m| m.name == "a" && m.status == MemberStatus::Alive));
}
