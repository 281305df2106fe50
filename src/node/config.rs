//! The configuration store of a node: reads, writes and prefix watches.

use std::collections::VecDeque;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::checks::ask;
use super::driver::Command;
use crate::error::Result;
use crate::state::config::{Change, ConfigError, KeyValue};
use crate::sync::{self, SharedState};

/// Access to the cluster-wide configuration store through this node. Cheap to clone.
///
/// Consistency: eventual, last-writer-wins by hybrid logical clock. A write is applied here
/// at once and reaches every node within milliseconds by gossip (anti-entropy repairs what
/// gossip misses). Concurrent writes of one key from different nodes all succeed locally;
/// the one with the greatest `(hlc, writer)` wins everywhere. There is no linearizable
/// compare-and-set: give each key a single writer when that matters.
#[derive(Clone)]
pub struct ConfigHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) state: SharedState,
    pub(crate) seq: watch::Receiver<u64>,
    /// How far the data dir has saved the store; `None` without a data dir.
    pub(crate) saved: Option<watch::Receiver<super::persist::Saved>>,
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigHandle")
            .field("seq", &*self.seq.borrow())
            .finish()
    }
}

/// What a prefix watch yields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConfigEvent {
    /// One change, in the order this node applied it. `value: None` means deleted.
    Changed(Change),
    /// The history needed to resume was compacted: the whole current state of the prefix,
    /// as of `seq`; changes after it follow.
    Snapshot {
        /// Local sequence number the snapshot reflects (resume from it).
        seq: u64,
        /// Every key under the prefix with its value.
        entries: Vec<(String, Vec<u8>)>,
    },
}

impl ConfigHandle {
    /// Writes `key` (e.g. `prod/orders/max_conn`) on every node. With a data dir, returns
    /// once the write is committed to disk.
    pub async fn set(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<Change> {
        self.set_with_flags(key, value, 0).await
    }

    /// As [`Self::set`], storing `flags` with the value: an opaque number that replicates
    /// and persists with it (Consul's KV `Flags`, `PUT /v1/kv/KEY?flags=N`).
    pub async fn set_with_flags(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        flags: u64,
    ) -> Result<Change> {
        let key = key.to_string();
        let value = value.into();
        let change = ask(&self.commands, |reply| Command::ConfigSet {
            key,
            value,
            flags,
            reply,
        })
        .await??;
        self.saved(change.seq).await?;
        Ok(change)
    }

    /// Writes many keys (an import): each is applied and gossiped as [`Self::set`] does, and
    /// with a data dir the call returns once all are on disk, sharing a few commits rather
    /// than one per key. Stops at the first refused key, with the earlier ones written.
    pub async fn set_all(
        &self,
        entries: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<usize> {
        let mut last_seq = 0;
        let mut count = 0;
        for (key, value) in entries {
            let change = ask(&self.commands, |reply| Command::ConfigSet {
                key,
                value,
                flags: 0,
                reply,
            })
            .await??;
            last_seq = last_seq.max(change.seq);
            count += 1;
        }
        self.saved(last_seq).await?;
        Ok(count)
    }

    /// Waits until the change numbered `seq` is on disk (at once without a data dir).
    async fn saved(&self, seq: u64) -> Result<()> {
        match &self.saved {
            Some(saved) => super::persist::wait_committed(saved.clone(), seq).await,
            None => Ok(()),
        }
    }

    /// Writes a UTF-8 string.
    pub async fn set_str(&self, key: &str, value: &str) -> Result<Change> {
        self.set(key, value.as_bytes()).await
    }

    /// Writes a value as JSON.
    pub async fn set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<Change> {
        let bytes = serde_json::to_vec(value).map_err(|source| ConfigError::Json {
            key: key.to_string(),
            source,
        })?;
        self.set(key, bytes).await
    }

    /// Deletes `key` everywhere; `false` if this node did not hold it. With a data dir,
    /// returns once the deletion is committed to disk.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        let change = ask(&self.commands, |reply| Command::ConfigDelete { key, reply }).await??;
        if let Some(change) = &change {
            self.saved(change.seq).await?;
        }
        Ok(change.is_some())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        sync::lock(&self.state).config.get(key).map(<[u8]>::to_vec)
    }

    /// The value of `key` as UTF-8.
    pub fn get_str(&self, key: &str) -> Result<Option<String>> {
        Ok(sync::lock(&self.state)
            .config
            .get_str(key)?
            .map(str::to_string))
    }

    /// The value of `key` decoded from JSON into `T`.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(sync::lock(&self.state).config.get_as(key)?)
    }

    /// Every key under `prefix` (whole path segments; `""` for all) with its value, in key
    /// order.
    pub fn list(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        sync::lock(&self.state).config.list(prefix)
    }

    /// Live keys under `prefix` (whole path segments; `""` for all), in key order, without
    /// their values.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        sync::lock(&self.state).config.keys(prefix)
    }

    /// The value of `key` with its local seqs (Consul's `CreateIndex`/`ModifyIndex`).
    pub fn get_entry(&self, key: &str) -> Option<KeyValue> {
        let state = sync::lock(&self.state);
        let entry = state.config.entry(key)?;
        let value = entry.value.clone()?;
        let flags = entry.flags;
        let indexes = state.config.indexes(key)?;
        Some(KeyValue {
            key: key.to_string(),
            value,
            flags,
            indexes,
        })
    }

    /// Live keys starting with `prefix` as a plain string (Consul's KV prefix, not whole
    /// segments), with values and local seqs, in key order; at most `limit`.
    pub fn scan(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        sync::lock(&self.state).config.scan(prefix, limit)
    }

    /// How many keys are set (deleted keys excluded).
    pub fn key_count(&self) -> usize {
        sync::lock(&self.state).config.live_len()
    }

    /// The sequence number of the last change this node applied.
    pub fn current_seq(&self) -> u64 {
        sync::lock(&self.state).config.current_seq()
    }

    /// Watches changes under `prefix` from now on.
    pub fn watch_prefix(&self, prefix: &str) -> ConfigWatch {
        let seq = self.current_seq();
        self.watch_prefix_from(prefix, seq)
    }

    /// Watches changes under `prefix` applied after `seq` (a value a previous watch
    /// returned). If that history was compacted, the watch first yields a snapshot.
    /// Sequence numbers are local to this node and this run of it.
    pub fn watch_prefix_from(&self, prefix: &str, seq: u64) -> ConfigWatch {
        ConfigWatch {
            state: self.state.clone(),
            seq: self.seq.clone(),
            prefix: prefix.trim_end_matches('/').to_string(),
            after: seq,
            pending: VecDeque::new(),
        }
    }
}

/// Changes of a key prefix, in the order this node applied them. Reads from the node's
/// bounded change history; a watcher that falls behind the history gets a snapshot instead
/// of an unbounded queue.
pub struct ConfigWatch {
    state: SharedState,
    seq: watch::Receiver<u64>,
    prefix: String,
    after: u64,
    pending: VecDeque<Change>,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("prefix", &self.prefix)
            .field("after", &self.after)
            .finish()
    }
}

impl ConfigWatch {
    /// The sequence number up to which this watch has yielded changes (resume point).
    pub fn seq(&self) -> u64 {
        self.after
    }

    /// The next change; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<ConfigEvent> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                self.after = change.seq;
                return Some(ConfigEvent::Changed(change));
            }
            self.seq.borrow_and_update();
            let fetched = {
                let state = sync::lock(&self.state);
                match state.config.changes_since(self.after, &self.prefix) {
                    Ok(changes) => {
                        let current = state.config.current_seq();
                        Ok((changes, current))
                    }
                    Err(_) => {
                        let (seq, entries) = state.config.snapshot(&self.prefix);
                        let entries = entries
                            .into_iter()
                            .filter_map(|(key, entry)| entry.value.map(|v| (key, v)))
                            .collect();
                        Err(ConfigEvent::Snapshot { seq, entries })
                    }
                }
            };
            match fetched {
                Ok((changes, current)) => {
                    if changes.is_empty() {
                        // Nothing under our prefix yet: skip ahead, then wait for news.
                        self.after = self.after.max(current);
                        self.seq.changed().await.ok()?;
                    } else {
                        self.pending.extend(changes);
                    }
                }
                Err(snapshot) => {
                    if let ConfigEvent::Snapshot { seq, .. } = &snapshot {
                        self.after = *seq;
                    }
                    return Some(snapshot);
                }
            }
        }
    }
}
