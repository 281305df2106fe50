//! The data directory: what a node keeps across restarts.
//!
//! Persistence is an adapter under the node, not part of the replicated state: `src/state`
//! stays sans-IO, the node loads a [`Loaded`] before its driver starts and hands the changes
//! it applied to a writer task that commits them here in groups. One directory per node:
//!
//! - `LOCK`: held (advisory `flock`) while a process uses the directory; holds its pid;
//! - `grapevine.redb`: a [redb] store (ACID, copy-on-write B-trees, checksummed), with the
//!   node's identity, the config store (entries and tombstones), its own service
//!   registrations and the last known members;
//! - `keyring.json`: the encryption keys, when the node encrypts and no `--keyring` file is
//!   given.
//!
//! Every record is bincode within the wire layer's frame limit, so a damaged record is an
//! error, never an unbounded allocation.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::catalog::Service;
use crate::state::config::{Entry, Version, DIGEST_BUCKETS};
use crate::state::hlc::Timestamp;

#[cfg(test)]
mod tests;

/// Version of the store's layout. Version 1 (config entries without `flags`) is upgraded in
/// place when opened; a store written with any other version is refused.
pub const FORMAT_VERSION: u64 = 2;
/// The layout before config entries carried `flags` (Consul's KV `Flags`).
const FORMAT_V1: u64 = 1;
/// Name of the store file inside the data directory.
pub const STORE_FILE: &str = "grapevine.redb";
/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the keyring file inside the data directory.
pub const KEYRING_FILE: &str = "keyring.json";
/// redb's page cache: the store is read once at start, then only written.
const CACHE_BYTES: usize = 2 * 1024 * 1024;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const MEMBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("members");

const META_FORMAT: &str = "format";
const META_NODE_NAME: &str = "node_name";
const META_CLUSTER_LABEL: &str = "cluster_label";
const META_GENERATION: &str = "generation";
const META_HLC: &str = "hlc";
const META_GC_WATERMARKS: &str = "gc_watermarks";

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or one of its files cannot be created, read or written.
    #[error("data dir {dir}: {source}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Another process holds the directory's lock.
    #[error(
        "data dir {dir} is in use by another grapevine process{}; stop it or give this node \
         another data dir",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// Pid written in the lock file by its holder, if readable.
        holder: Option<u32>,
    },
    /// The directory was written by another node or cluster.
    #[error(
        "data dir {dir} belongs to node {found_name:?} of cluster {found_label:?}, not to node \
         {name:?} of cluster {label:?}; give every node a data dir of its own"
    )]
    Foreign {
        /// The data directory.
        dir: PathBuf,
        /// Node name recorded in the store.
        found_name: String,
        /// Cluster label recorded in the store.
        found_label: String,
        /// Name of the node that tried to open it.
        name: String,
        /// Cluster label of the node that tried to open it.
        label: String,
    },
    /// The store file cannot be read back.
    #[error(
        "store file {file} is corrupt or truncated ({reason}); to recover, move it aside \
         (mv {file} {file}.bad) and start the node again: it starts empty and resyncs the \
         cluster's state from its peers"
    )]
    Corrupt {
        /// The store file.
        file: PathBuf,
        /// What was found wrong.
        reason: String,
    },
    /// The store was written by a version with another layout.
    #[error(
        "store file {file} has format version {found}; this grapevine reads version {expected}"
    )]
    Format {
        /// The store file.
        file: PathBuf,
        /// Version found.
        found: u64,
        /// Version this build reads.
        expected: u64,
    },
    /// A write to the store failed (disk full, I/O error).
    #[error("cannot write store file {file}: {reason}")]
    Write {
        /// The store file.
        file: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// A config entry as format 1 saved it: without `flags`.
#[derive(Deserialize)]
struct EntryV1 {
    value: Option<Vec<u8>>,
    version: Version,
}

/// A health check as it is saved with its service: plain data, re-armed at start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum StoredCheck {
    /// A TCP connect check.
    Tcp {
        /// Milliseconds between attempts.
        interval_ms: u64,
        /// Milliseconds each attempt may take.
        timeout_ms: u64,
        /// Where to connect; the instance's address and port when `None`.
        target: Option<SocketAddr>,
    },
    /// A TTL check: the service must report in once per `ttl_ms`.
    Ttl {
        /// The TTL, in milliseconds.
        ttl_ms: u64,
    },
    /// An HTTP `GET` check.
    Http {
        /// `http://host[:port]/path`.
        url: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
        /// Milliseconds between requests.
        interval_ms: u64,
        /// Milliseconds each request may take.
        timeout_ms: u64,
    },
}

/// A service registration of this node, as saved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredService {
    /// The registration.
    pub service: Service,
    /// Its checks (none: always passing unless reported otherwise).
    pub checks: Vec<StoredCheck>,
}

/// A member remembered from the last run, to rejoin through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RememberedMember {
    /// Node name.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
}

/// What a data directory held when it was opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The highest identity generation used by an earlier run (0: none).
    pub generation: u64,
    /// The config store's clock high-water mark.
    pub hlc: Timestamp,
    /// Config entries and tombstones, in key order.
    pub config: Vec<(String, Entry)>,
    /// The config store's tombstone GC watermarks, one per digest bucket (empty: none).
    pub gc_watermarks: Vec<u64>,
    /// Service registrations made at run time.
    pub services: Vec<StoredService>,
    /// The members last seen alive.
    pub members: Vec<RememberedMember>,
}

/// One group commit of the config store.
#[derive(Debug, Default)]
pub struct ConfigBatch {
    /// Entries written or replaced (tombstones included).
    pub upserts: Vec<(String, Entry)>,
    /// Keys whose tombstones were collected: gone from the store.
    pub removed: Vec<String>,
    /// The clock's high-water mark after these changes.
    pub hlc: Timestamp,
    /// The GC watermarks after these changes.
    pub gc_watermarks: Vec<u64>,
}

/// An open data directory, locked for this process.
pub struct DataDir {
    dir: PathBuf,
    file: PathBuf,
    db: Database,
    /// Held for the lifetime of the directory's use; the OS releases it if we die.
    _lock: File,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir").field("dir", &self.dir).finish()
    }
}

impl DataDir {
    /// Opens (creating it if needed) the data directory `dir` for node `name` of cluster
    /// `label`, locks it, checks it belongs to that node and reads what it holds.
    pub fn open(dir: &Path, name: &str, label: &str) -> Result<(DataDir, Loaded), StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock(dir)?;
        let file = dir.join(STORE_FILE);
        let corrupt = |reason: String| StoreError::Corrupt {
            file: file.clone(),
            reason,
        };
        // redb's debug builds assert on some damage that release builds report; a damaged
        // file must give the documented error either way.
        let opened = std::panic::catch_unwind(|| open_database(&file));
        let mut db = match opened {
            Ok(result) => result?,
            Err(_) => return Err(corrupt("the store library failed to read it".into())),
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.check_integrity())) {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Err(corrupt("checksums do not match".into())),
            Ok(Err(error)) => return Err(corrupt(error.to_string())),
            Err(_) => return Err(corrupt("the integrity check failed".into())),
        }
        let data_dir = DataDir {
            dir: dir.to_path_buf(),
            file,
            db,
            _lock: lock,
        };
        data_dir.claim(name, label)?;
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| data_dir.load()))
            .unwrap_or_else(|_| Err(data_dir.corrupt("a record cannot be read")))?;
        Ok((data_dir, loaded))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the keyring is kept when no other file is given.
    pub fn keyring_path(&self) -> PathBuf {
        self.dir.join(KEYRING_FILE)
    }

    fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            file: self.file.clone(),
            reason: reason.into(),
        }
    }

    fn write_error(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::Write {
            file: self.file.clone(),
            reason: error.to_string(),
        }
    }

    /// Records the owner of a new store, or checks the owner of an existing one.
    fn claim(&self, name: &str, label: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.corrupt(e.to_string()))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(|e| self.corrupt(e.to_string()))?
                .map(|v| decode_u64(v.value()));
            match format {
                None => {
                    let format = FORMAT_VERSION.to_le_bytes();
                    let rows: [(&str, &[u8]); 3] = [
                        (META_FORMAT, &format),
                        (META_NODE_NAME, name.as_bytes()),
                        (META_CLUSTER_LABEL, label.as_bytes()),
                    ];
                    for (key, value) in rows {
                        meta.insert(key, value).map_err(|e| self.write_error(e))?;
                    }
                }
                Some(Some(found @ (FORMAT_V1 | FORMAT_VERSION))) => {
                    let text = |key| -> Result<String, StoreError> {
                        let value = meta.get(key).map_err(|e| self.corrupt(e.to_string()))?;
                        let value = value.ok_or_else(|| self.corrupt(format!("no {key}")))?;
                        String::from_utf8(value.value().to_vec())
                            .map_err(|_| self.corrupt(format!("{key} is not UTF-8")))
                    };
                    let (found_name, found_label) =
                        (text(META_NODE_NAME)?, text(META_CLUSTER_LABEL)?);
                    if found_name != name || found_label != label {
                        return Err(StoreError::Foreign {
                            dir: self.dir.clone(),
                            found_name,
                            found_label,
                            name: name.to_string(),
                            label: label.to_string(),
                        });
                    }
                    if found == FORMAT_V1 {
                        self.upgrade_v1(&txn)?;
                        meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                            .map_err(|e| self.write_error(e))?;
                    }
                }
                Some(Some(found)) => {
                    return Err(StoreError::Format {
                        file: self.file.clone(),
                        found,
                        expected: FORMAT_VERSION,
                    })
                }
                Some(None) => return Err(self.corrupt("the format version is unreadable")),
            }
            // Create the other tables, so that reads never meet a missing one.
            for table in [CONFIG, SERVICES, MEMBERS] {
                txn.open_table(table).map_err(|e| self.write_error(e))?;
            }
        }
        txn.commit().map_err(|e| self.write_error(e))
    }

    /// Rewrites format 1's config entries with `flags` 0, in the claiming transaction: the
    /// upgrade commits whole with the new format version, or not at all.
    fn upgrade_v1(&self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut config = txn.open_table(CONFIG).map_err(|e| self.write_error(e))?;
        let mut upgraded = Vec::new();
        for row in config.iter().map_err(|e| self.corrupt(e.to_string()))? {
            let (key, value) = row.map_err(|e| self.corrupt(e.to_string()))?;
            let old: EntryV1 = self.decode(key.value(), value.value())?;
            let entry = Entry {
                value: old.value,
                flags: 0,
                version: old.version,
            };
            upgraded.push((key.value().to_string(), self.encode(&entry)?));
        }
        for (key, bytes) in &upgraded {
            config
                .insert(key.as_str(), bytes.as_slice())
                .map_err(|e| self.write_error(e))?;
        }
        tracing::info!(
            entries = upgraded.len(),
            "store upgraded from format 1 (config entries now carry flags)"
        );
        Ok(())
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let bad = |e: &dyn std::fmt::Display| self.corrupt(e.to_string());
        let txn = self.db.begin_read().map_err(|e| bad(&e))?;
        let meta = txn.open_table(META).map_err(|e| bad(&e))?;
        let mut loaded = Loaded::default();
        if let Some(value) = meta.get(META_GENERATION).map_err(|e| bad(&e))? {
            loaded.generation =
                decode_u64(value.value()).ok_or_else(|| self.corrupt("bad generation"))?;
        }
        if let Some(value) = meta.get(META_HLC).map_err(|e| bad(&e))? {
            loaded.hlc = self.decode(META_HLC, value.value())?;
        }
        if let Some(value) = meta.get(META_GC_WATERMARKS).map_err(|e| bad(&e))? {
            let marks: Vec<u64> = self.decode(META_GC_WATERMARKS, value.value())?;
            if marks.len() != DIGEST_BUCKETS {
                return Err(self.corrupt(format!("{} GC watermarks", marks.len())));
            }
            loaded.gc_watermarks = marks;
        }
        let config = txn.open_table(CONFIG).map_err(|e| bad(&e))?;
        for row in config.iter().map_err(|e| bad(&e))? {
            let (key, value) = row.map_err(|e| bad(&e))?;
            let entry: Entry = self.decode(key.value(), value.value())?;
            loaded.config.push((key.value().to_string(), entry));
        }
        let services = txn.open_table(SERVICES).map_err(|e| bad(&e))?;
        for row in services.iter().map_err(|e| bad(&e))? {
            let (key, value) = row.map_err(|e| bad(&e))?;
            loaded
                .services
                .push(self.decode(key.value(), value.value())?);
        }
        let members = txn.open_table(MEMBERS).map_err(|e| bad(&e))?;
        for row in members.iter().map_err(|e| bad(&e))? {
            let (key, value) = row.map_err(|e| bad(&e))?;
            loaded
                .members
                .push(self.decode(key.value(), value.value())?);
        }
        Ok(loaded)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        crate::wire::decode_frame(bytes)
            .map_err(|error| self.corrupt(format!("record {what:?}: {error}")))
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        crate::wire::encode_frame(value).map_err(|e| self.write_error(e))
    }

    /// Commits one group of config changes in one durable transaction.
    pub fn commit_config(&self, batch: &ConfigBatch) -> Result<(), StoreError> {
        let hlc = self.encode(&batch.hlc)?;
        let marks = self.encode(&batch.gc_watermarks)?;
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        {
            let mut config = txn.open_table(CONFIG).map_err(|e| self.write_error(e))?;
            for (key, entry) in &batch.upserts {
                let bytes = self.encode(entry)?;
                config
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| self.write_error(e))?;
            }
            for key in &batch.removed {
                config
                    .remove(key.as_str())
                    .map_err(|e| self.write_error(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.write_error(e))?;
            meta.insert(META_HLC, hlc.as_slice())
                .map_err(|e| self.write_error(e))?;
            if !batch.gc_watermarks.is_empty() {
                meta.insert(META_GC_WATERMARKS, marks.as_slice())
                    .map_err(|e| self.write_error(e))?;
            }
        }
        txn.commit().map_err(|e| self.write_error(e))
    }

    /// Records the identity generation in use, so that the next run starts above it.
    pub fn set_generation(&self, generation: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META).map_err(|e| self.write_error(e))?;
            meta.insert(META_GENERATION, generation.to_le_bytes().as_slice())
                .map_err(|e| self.write_error(e))?;
            Ok(())
        })
    }

    /// Saves (or replaces) a service registration.
    pub fn put_service(&self, stored: &StoredService) -> Result<(), StoreError> {
        let bytes = self.encode(stored)?;
        self.write(|txn| {
            let mut services = txn.open_table(SERVICES).map_err(|e| self.write_error(e))?;
            services
                .insert(stored.service.id.as_str(), bytes.as_slice())
                .map_err(|e| self.write_error(e))?;
            Ok(())
        })
    }

    /// Forgets a service registration (no error if it was not saved).
    pub fn remove_service(&self, id: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut services = txn.open_table(SERVICES).map_err(|e| self.write_error(e))?;
            services.remove(id).map_err(|e| self.write_error(e))?;
            Ok(())
        })
    }

    /// Replaces the remembered members.
    pub fn put_members(&self, members: &[RememberedMember]) -> Result<(), StoreError> {
        let encoded = members
            .iter()
            .map(|m| Ok((m.name.as_str(), self.encode(m)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(|txn| {
            let mut table = txn.open_table(MEMBERS).map_err(|e| self.write_error(e))?;
            table
                .retain(|_, _| false)
                .map_err(|e| self.write_error(e))?;
            for (name, bytes) in &encoded {
                table
                    .insert(*name, bytes.as_slice())
                    .map_err(|e| self.write_error(e))?;
            }
            Ok(())
        })
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        body(&txn)?;
        txn.commit().map_err(|e| self.write_error(e))
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Takes the directory's lock and writes our pid into it.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let io = |source| StoreError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

fn open_database(file: &Path) -> Result<Database, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        file: file.to_path_buf(),
        reason,
    };
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    builder.create(file).map_err(|error| match error {
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if !matches!(
                source.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            StoreError::Io {
                dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
                source,
            }
        }
        other => corrupt(other.to_string()),
    })
}
