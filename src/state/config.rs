//! Replicated configuration store: a sans-IO, state-based last-writer-wins map (a CRDT).
//!
//! # Model
//!
//! Any node may write any key. Every write carries a [`Version`] `(hlc, writer)`: a
//! [hybrid logical clock](super::hlc) timestamp and the writer's id. For each key the entry
//! with the greater version wins, everywhere; deletes write tombstones (`value: None`) that
//! win and lose like any other write. Merging is the pointwise maximum, hence commutative,
//! associative and idempotent: replicas that have seen the same set of writes hold the same
//! state, whatever the order or the number of times they saw them. The property tests below
//! check exactly that.
//!
//! Two different writes never tie: a writer's clock never issues the same timestamp twice,
//! and two writers differ by id. This relies on the writer id being unique per *incarnation*
//! (for example node name plus generation), because the clock lives in memory: a restarted
//! process whose physical clock went backwards could otherwise reissue an old version. Should
//! a tie with different values happen anyway, the greater value (tombstone lowest) wins, so
//! replicas still converge.
//!
//! # What this store does not offer
//!
//! There is no linearizable compare-and-set, no transaction and no read-your-writes across
//! nodes: those need consensus, and this store is deliberately consensus-free (available
//! under partition, convergent afterwards). Two concurrent writers of one key both succeed
//! locally and one of them silently wins everywhere once they have exchanged state. Use one
//! writer per key, or values that tolerate it, when that matters.
//!
//! # Sans-IO
//!
//! Nothing here reads a clock or touches the network. Local operations and merges take the
//! local physical time in milliseconds; the caller ships [`Change`]s (broadcasts),
//! [`Digest`]s and entries (anti-entropy) over whatever transport it has.
//!
//! # Anti-entropy
//!
//! Keys are hashed (a stable FNV-1a, fixed by this module and part of the wire protocol) into
//! [`DIGEST_BUCKETS`] buckets; a bucket's hash is the wrapping sum of its entries' hashes,
//! maintained incrementally. One exchange:
//!
//! 1. A sends [`ConfigStore::digest`] to B; B computes [`ConfigStore::diff_buckets`].
//! 2. Either B sends [`ConfigStore::entries_in_buckets`] for those buckets (simple, one round
//!    trip), or, when buckets are large, B sends [`ConfigStore::bucket_versions`] (keys and
//!    versions only) and A answers with [`ConfigStore::entries_newer_than`], which sends only
//!    what B lacks, so that a truncated answer still makes progress every round.
//! 3. The receiver merges with [`ConfigStore::apply_many`]. Do it in both directions.
//!
//! # Tombstones
//!
//! [`ConfigStore::collect_tombstones`] drops tombstones older than a horizon. The standard
//! limitation of tombstone GC applies: a replica that missed the delete and stays away
//! longer than the horizon still holds the old value, and nothing is left to beat it. The
//! mitigation is a per-bucket *GC watermark*: after collecting a tombstone whose wall time is
//! `t`, the store refuses any remote entry for a key it does not hold whose wall time is
//! `≤ t` in that bucket. Any stale value a collected tombstone deleted is older than that
//! tombstone, so it can never come back here. The price: a write older than the watermark
//! that this replica never saw is refused too (counted in
//! [`ConfigStats::rejected_below_watermark`]), and the stale replica keeps serving its old
//! value locally. So the horizon must exceed the longest partition or outage you want to
//! heal automatically (days, not minutes), and a replica down for longer must be reset
//! (start empty and resync) rather than merged. Tombstone times are the deleter's HLC wall
//! time, so a deleter whose clock lags shortens its tombstones' effective lifetime by as
//! much: keep the horizon far above clock skew.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use crate::wire::StableHasher;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::hlc::{HybridClock, Timestamp, DEFAULT_MAX_DRIFT_MS};

/// Maximum length of a key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Maximum length of a value, in bytes (64 KiB).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Maximum length of a writer id, in bytes.
pub const MAX_WRITER_LEN: usize = 255;
/// Default number of changes kept for [`ConfigStore::changes_since`].
pub const DEFAULT_HISTORY_CAPACITY: usize = 10_000;
/// Default bound on the bytes (keys + values + writers) kept in the change history.
pub const DEFAULT_HISTORY_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Number of buckets of a [`Digest`].
pub const DIGEST_BUCKETS: usize = 256;
/// Fixed per-entry overhead counted by the byte budgets of the anti-entropy helpers, on top
/// of key, value and writer lengths (covers timestamps, flags, tags and length prefixes).
pub const ENTRY_OVERHEAD_BYTES: usize = 57;
/// Upper bound of the encoded size of one `(key, Entry)` as the budgets count it.
pub const MAX_ENTRY_WIRE_BYTES: usize =
    MAX_KEY_LEN + MAX_VALUE_LEN + MAX_WRITER_LEN + ENTRY_OVERHEAD_BYTES;

/// Errors of the configuration store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key is the empty string.
    #[error("config key is empty; keys look like `environment/name/...`")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("config key is {len} bytes long; the limit is {max} bytes", max = MAX_KEY_LEN)]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
    },
    /// The key contains a character outside `[A-Za-z0-9._-]` and `/`.
    #[error(
        "config key {key:?} contains {ch:?} at byte {index}; \
         segments may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    InvalidChar {
        /// The refused key.
        key: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
    /// The key has an empty segment (leading, trailing or doubled `/`).
    #[error("config key {key:?} has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment {
        /// The refused key.
        key: String,
    },
    /// The value is longer than [`MAX_VALUE_LEN`].
    #[error("value for config key {key:?} is {len} bytes; the limit is {max} bytes (64 KiB)", max = MAX_VALUE_LEN)]
    ValueTooLarge {
        /// The key written.
        key: String,
        /// Length of the refused value.
        len: usize,
    },
    /// The local writer id is longer than [`MAX_WRITER_LEN`]; peers would refuse its writes.
    #[error("writer id is {len} bytes long; the limit is {max} bytes", max = MAX_WRITER_LEN)]
    WriterTooLong {
        /// Length of the writer id.
        len: usize,
    },
    /// [`ConfigStore::get_str`] found a value that is not UTF-8.
    #[error("value of config key {key:?} is not valid UTF-8")]
    NotUtf8 {
        /// The key read.
        key: String,
        /// The decoding error.
        #[source]
        source: std::str::Utf8Error,
    },
    /// JSON encoding or decoding failed in [`ConfigStore::set_json`] / [`ConfigStore::get_as`].
    #[error("value of config key {key:?} could not be converted to or from JSON")]
    Json {
        /// The key written or read.
        key: String,
        /// The serde_json error.
        #[source]
        source: serde_json::Error,
    },
}

/// [`ConfigStore::changes_since`] cannot answer from its retained history: the caller must
/// resynchronize from [`ConfigStore::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "changes after seq {requested} are not retained (answerable from seq {retained_from} \
     to {current}); take a snapshot"
)]
pub struct Compacted {
    /// The `seq` asked for.
    pub requested: u64,
    /// The smallest `seq` the history can answer for.
    pub retained_from: u64,
    /// The store's current seq.
    pub current: u64,
}

/// Checks a key against the rules: 1..=[`MAX_KEY_LEN`] bytes, non-empty `/`-separated
/// segments of `[A-Za-z0-9._-]`. Any number of segments is accepted, as Consul does; by
/// convention the first one is the environment namespace (`prod/orders/max_conn`).
pub fn validate_key(key: &str) -> Result<(), ConfigError> {
    if key.is_empty() {
        return Err(ConfigError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ConfigError::KeyTooLong { len: key.len() });
    }
    if let Some((index, ch)) = key
        .char_indices()
        .find(|&(_, c)| !(c == '/' || c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ConfigError::InvalidChar {
            key: key.to_owned(),
            ch,
            index,
        });
    }
    if key.split('/').any(str::is_empty) {
        return Err(ConfigError::EmptySegment {
            key: key.to_owned(),
        });
    }
    Ok(())
}

fn validate_value(key: &str, value: &[u8]) -> Result<(), ConfigError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ConfigError::ValueTooLarge {
            key: key.to_owned(),
            len: value.len(),
        });
    }
    Ok(())
}

/// Whether `key` lies under `prefix`, matching whole segments: `prod/orders` matches
/// `prod/orders` and `prod/orders/x` but not `prod/orders2`. A trailing `/` on the prefix is
/// ignored; the empty prefix matches everything.
pub fn key_matches_prefix(key: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    prefix.is_empty()
        || (key.starts_with(prefix)
            && (key.len() == prefix.len() || key.as_bytes().get(prefix.len()) == Some(&b'/')))
}

/// The version of a write: ordered by `(hlc, writer)`; the greater one wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Hybrid logical clock timestamp of the write.
    pub hlc: Timestamp,
    /// Id of the writer (unique per writer incarnation).
    pub writer: String,
}

/// The replicated state of one key: a value or a tombstone, with its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The value; `None` is a tombstone (the key was deleted).
    pub value: Option<Vec<u8>>,
    /// An opaque number the writer stored with the value (Consul's KV `Flags`); 0 for a
    /// tombstone.
    pub flags: u64,
    /// Version of the write that produced this entry.
    pub version: Version,
}

impl Entry {
    /// Whether this entry is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The LWW order: by version, then (only for anomalous ties) by value, tombstone lowest.
    /// The merge keeps the greatest entry.
    pub fn lww_cmp(&self, other: &Entry) -> Ordering {
        self.version
            .cmp(&other.version)
            .then_with(|| self.value.cmp(&other.value))
            .then_with(|| self.flags.cmp(&other.flags))
    }

    /// Whether this entry replaces `other` in a merge.
    pub fn supersedes(&self, other: &Entry) -> bool {
        self.lww_cmp(other) == Ordering::Greater
    }

    /// Size counted by byte budgets for this entry stored under `key`.
    pub fn wire_size(&self, key: &str) -> usize {
        key.len()
            + self.value.as_ref().map_or(0, Vec::len)
            + self.version.writer.len()
            + ENTRY_OVERHEAD_BYTES
    }
}

/// A change applied by this store (local write or remote merge), numbered by a local
/// monotonically increasing `seq` for watches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Local sequence number (1 for the first change of this store). Not replicated:
    /// another replica numbers the same write differently.
    pub seq: u64,
    /// The key changed.
    pub key: String,
    /// The new value; `None` if the key was deleted.
    pub value: Option<Vec<u8>>,
    /// The flags stored with the value (see [`Entry::flags`]).
    pub flags: u64,
    /// Version of the write.
    pub version: Version,
}

impl Change {
    /// The entry to replicate for this change (what peers pass to [`ConfigStore::apply`]).
    pub fn entry(&self) -> Entry {
        Entry {
            value: self.value.clone(),
            flags: self.flags,
            version: self.version.clone(),
        }
    }
}

/// Anti-entropy summary: one order-independent hash per bucket of keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Bucket hashes; [`DIGEST_BUCKETS`] of them. Empty buckets hash to 0.
    pub buckets: Vec<u64>,
}

/// Tuning of a [`ConfigStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigStoreOptions {
    /// Maximum number of changes kept for [`ConfigStore::changes_since`].
    pub history_capacity: usize,
    /// Maximum bytes (keys + values + writers) kept in that history; the oldest changes go
    /// first when either bound is exceeded.
    pub history_max_bytes: usize,
    /// Remote entries whose HLC wall time is further ahead of local physical time are refused.
    pub max_drift_ms: u64,
}

impl Default for ConfigStoreOptions {
    fn default() -> Self {
        ConfigStoreOptions {
            history_capacity: DEFAULT_HISTORY_CAPACITY,
            history_max_bytes: DEFAULT_HISTORY_MAX_BYTES,
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
        }
    }
}

/// Counters of the store, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigStats {
    /// Remote entries applied (they changed the state).
    pub applied_remote: u64,
    /// Remote entries refused because their clock was too far in the future.
    pub rejected_clock_drift: u64,
    /// Remote entries refused because key, value or writer broke the limits.
    pub rejected_invalid: u64,
    /// Remote entries refused by the tombstone GC watermark (see the module docs).
    pub rejected_below_watermark: u64,
    /// Tombstones removed by [`ConfigStore::collect_tombstones`].
    pub tombstones_collected: u64,
}

#[derive(Clone, Debug)]
struct Slot {
    entry: Entry,
    /// Cached `entry_hash(key, entry)`, so that replacing the entry updates its bucket in O(1).
    hash: u64,
    /// Local seqs of the change that created the current value and of the last change.
    indexes: LocalIndexes,
}

/// The local seqs of a key's value: not replicated (another replica numbers the same writes
/// differently), they are what Consul's `CreateIndex` and `ModifyIndex` mean on one agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalIndexes {
    /// Seq of the change that set the key after it was absent or deleted.
    pub create: u64,
    /// Seq of the key's last change.
    pub modify: u64,
}

/// A live key, its value and its local seqs, as [`ConfigStore::scan`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The flags stored with it (see [`Entry::flags`]).
    pub flags: u64,
    /// Local seqs of the value.
    pub indexes: LocalIndexes,
}

/// The configuration store of one replica. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ConfigStore {
    writer: String,
    clock: HybridClock,
    entries: BTreeMap<String, Slot>,
    bucket_hashes: Vec<u64>,
    /// Per bucket: remote entries for absent keys with a wall time below this are refused
    /// (one more than the newest collected tombstone's wall time; 0: nothing collected).
    gc_watermarks: Vec<u64>,
    history: VecDeque<Change>,
    history_bytes: usize,
    seq: u64,
    /// Highest seq dropped from the history (0: none).
    compacted_through: u64,
    options: ConfigStoreOptions,
    stats: ConfigStats,
    /// Keys changed since the last [`ConfigStore::take_dirty`], when tracking is on (a data
    /// dir saves them): a set, so it is bounded by the number of keys, never a queue.
    dirty: Option<BTreeSet<String>>,
}

impl ConfigStore {
    /// An empty store whose local writes are signed `local_writer`, with default options.
    ///
    /// The writer id should be unique per process incarnation and at most
    /// [`MAX_WRITER_LEN`] bytes (local writes fail with [`ConfigError::WriterTooLong`]
    /// otherwise).
    pub fn new(local_writer: String) -> Self {
        Self::with_options(local_writer, ConfigStoreOptions::default())
    }

    /// An empty store with explicit options.
    pub fn with_options(local_writer: String, options: ConfigStoreOptions) -> Self {
        ConfigStore {
            writer: local_writer,
            clock: HybridClock::new(options.max_drift_ms),
            entries: BTreeMap::new(),
            bucket_hashes: vec![0; DIGEST_BUCKETS],
            gc_watermarks: vec![0; DIGEST_BUCKETS],
            history: VecDeque::new(),
            history_bytes: 0,
            seq: 0,
            compacted_through: 0,
            options,
            stats: ConfigStats::default(),
            dirty: None,
        }
    }

    /// The local writer id.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// The store's hybrid logical clock.
    pub fn clock(&self) -> &HybridClock {
        &self.clock
    }

    /// Counters.
    pub fn stats(&self) -> &ConfigStats {
        &self.stats
    }

    /// Number of entries, tombstones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no entry (not even a tombstone).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn check_writer(&self) -> Result<(), ConfigError> {
        if self.writer.len() > MAX_WRITER_LEN {
            return Err(ConfigError::WriterTooLong {
                len: self.writer.len(),
            });
        }
        Ok(())
    }

    fn next_version(&mut self, now_ms: u64) -> Version {
        Version {
            hlc: self.clock.now(now_ms),
            writer: self.writer.clone(),
        }
    }

    /// Writes `value` under `key` at local physical time `now_ms`. The write orders after
    /// every write this store has seen, so it wins locally; it wins elsewhere unless a
    /// concurrent write carries a greater version. Returns the applied change (its
    /// [`Change::entry`] is what to replicate).
    pub fn set(
        &mut self,
        key: &str,
        value: impl Into<Vec<u8>>,
        now_ms: u64,
    ) -> Result<Change, ConfigError> {
        self.set_with_flags(key, value, 0, now_ms)
    }

    /// As [`Self::set`], storing `flags` (Consul's KV `Flags`, opaque here) with the value.
    pub fn set_with_flags(
        &mut self,
        key: &str,
        value: impl Into<Vec<u8>>,
        flags: u64,
        now_ms: u64,
    ) -> Result<Change, ConfigError> {
        let value = value.into();
        validate_key(key)?;
        validate_value(key, &value)?;
        self.check_writer()?;
        let version = self.next_version(now_ms);
        Ok(self.install(
            key.to_owned(),
            Entry {
                value: Some(value),
                flags,
                version,
            },
        ))
    }

    /// Deletes `key` by writing a tombstone. Deleting a key this store does not hold (absent
    /// or already deleted) is a no-op returning `Ok(None)`; note that it then does not
    /// delete a concurrent write not yet received.
    pub fn delete(&mut self, key: &str, now_ms: u64) -> Result<Option<Change>, ConfigError> {
        validate_key(key)?;
        self.check_writer()?;
        if self.get(key).is_none() {
            return Ok(None);
        }
        let version = self.next_version(now_ms);
        Ok(Some(self.install(
            key.to_owned(),
            Entry {
                value: None,
                flags: 0,
                version,
            },
        )))
    }

    /// The current value of `key`; `None` if absent or deleted.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key)?.entry.value.as_deref()
    }

    /// The local seqs of `key`'s current entry (a tombstone's too), if known.
    pub fn indexes(&self, key: &str) -> Option<LocalIndexes> {
        self.entries.get(key).map(|s| s.indexes)
    }

    /// Live keys that start with `prefix` as a plain string (not whole segments: `app`
    /// lists `app/x` and `apple`, as Consul's KV does), with values and local seqs, in key
    /// order; at most `limit` of them.
    pub fn scan(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, s)| {
                s.entry.value.as_ref().map(|v| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                    flags: s.entry.flags,
                    indexes: s.indexes,
                })
            })
            .take(limit)
            .collect()
    }

    /// The full entry of `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key).map(|s| &s.entry)
    }

    fn range_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Entry)> {
        let start = prefix.strip_suffix('/').unwrap_or(prefix);
        self.entries
            .range::<str, _>((Bound::Included(start), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(start))
            .filter(move |(k, _)| key_matches_prefix(k, start))
            .map(|(k, s)| (k, &s.entry))
    }

    /// Live keys under `prefix` (whole segments, as [`Self::list`]), in key order, without
    /// copying their values.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.range_prefix(prefix)
            .filter(|(_, e)| e.value.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Number of live keys (tombstones excluded).
    pub fn live_len(&self) -> usize {
        self.entries
            .values()
            .filter(|s| s.entry.value.is_some())
            .count()
    }

    /// Live `(key, value)` pairs under `prefix`, in key order. The prefix matches whole
    /// segments (see [`key_matches_prefix`]): `prod/orders` lists `prod/orders/...` but not
    /// `prod/orders2/...`; `""` lists everything.
    pub fn list(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.range_prefix(prefix)
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// Writes a UTF-8 string value.
    pub fn set_str(&mut self, key: &str, value: &str, now_ms: u64) -> Result<Change, ConfigError> {
        self.set(key, value.as_bytes(), now_ms)
    }

    /// Reads a value as UTF-8; `Ok(None)` if absent.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.get(key)
            .map(|v| {
                std::str::from_utf8(v).map_err(|source| ConfigError::NotUtf8 {
                    key: key.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Writes `value` encoded as JSON.
    pub fn set_json<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
        now_ms: u64,
    ) -> Result<Change, ConfigError> {
        let bytes = serde_json::to_vec(value).map_err(|source| ConfigError::Json {
            key: key.to_owned(),
            source,
        })?;
        self.set(key, bytes, now_ms)
    }

    /// Reads a JSON value into `T`; `Ok(None)` if absent.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|v| {
                serde_json::from_slice(v).map_err(|source| ConfigError::Json {
                    key: key.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Merges a remote entry (from a broadcast or an anti-entropy exchange) at local physical
    /// time `now_ms`. Returns the change if the entry won, `None` if it lost, was already
    /// known (idempotent), or was refused: invalid key/value/writer, a clock more than
    /// `max_drift_ms` in the future, or below the GC watermark (each counted in
    /// [`ConfigStats`]). The entry's timestamp is observed by the local clock, so later local
    /// writes order after it.
    pub fn apply(&mut self, key: &str, entry: Entry, now_ms: u64) -> Option<Change> {
        self.apply_owned(key.to_owned(), entry, now_ms)
    }

    fn apply_owned(&mut self, key: String, entry: Entry, now_ms: u64) -> Option<Change> {
        let valid = validate_key(&key).is_ok()
            && entry
                .value
                .as_ref()
                .is_none_or(|v| v.len() <= MAX_VALUE_LEN)
            && entry.version.writer.len() <= MAX_WRITER_LEN;
        if !valid {
            self.stats.rejected_invalid += 1;
            return None;
        }
        if self.clock.observe(entry.version.hlc, now_ms).is_err() {
            self.stats.rejected_clock_drift += 1;
            return None;
        }
        match self.entries.get(&key) {
            Some(slot) => {
                if !entry.supersedes(&slot.entry) {
                    return None;
                }
            }
            None => {
                let watermark = self.gc_watermarks[bucket_of(&key)];
                if entry.version.hlc.wall_ms < watermark {
                    self.stats.rejected_below_watermark += 1;
                    return None;
                }
            }
        }
        self.stats.applied_remote += 1;
        Some(self.install(key, entry))
    }

    /// Merges many remote entries; returns the changes that took effect, in input order.
    pub fn apply_many(
        &mut self,
        entries: impl IntoIterator<Item = (String, Entry)>,
        now_ms: u64,
    ) -> Vec<Change> {
        entries
            .into_iter()
            .filter_map(|(k, e)| self.apply_owned(k, e, now_ms))
            .collect()
    }

    /// Stores `entry` (already known to win), updates the bucket hash and the history.
    fn install(&mut self, key: String, entry: Entry) -> Change {
        let bucket = bucket_of(&key);
        let hash = entry_hash(&key, &entry);
        self.seq += 1;
        let change = Change {
            seq: self.seq,
            key: key.clone(),
            value: entry.value.clone(),
            flags: entry.flags,
            version: entry.version.clone(),
        };
        if let Some(dirty) = &mut self.dirty {
            dirty.insert(key.clone());
        }
        let create = match self.entries.get(&key) {
            Some(old) if old.entry.value.is_some() && entry.value.is_some() => old.indexes.create,
            _ => self.seq,
        };
        let indexes = LocalIndexes {
            create,
            modify: self.seq,
        };
        let old = self.entries.insert(
            key,
            Slot {
                entry,
                hash,
                indexes,
            },
        );
        let b = &mut self.bucket_hashes[bucket];
        *b = b.wrapping_add(hash);
        if let Some(old) = old {
            *b = b.wrapping_sub(old.hash);
        }
        self.record(change.clone());
        change
    }

    fn record(&mut self, change: Change) {
        self.history_bytes += change_size(&change);
        self.history.push_back(change);
        while self.history.len() > self.options.history_capacity
            || self.history_bytes > self.options.history_max_bytes
        {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= change_size(&old);
            self.compacted_through = old.seq;
        }
    }

    /// Seq of the latest applied change (0 before the first).
    pub fn current_seq(&self) -> u64 {
        self.seq
    }

    /// Changes applied after `seq` whose key lies under `prefix` (whole segments, see
    /// [`key_matches_prefix`]), oldest first. A key may appear several times. Fails with
    /// [`Compacted`] if part of that range has left the bounded history, or if `seq` is
    /// ahead of [`Self::current_seq`] (a caller from another store incarnation): resync with
    /// [`Self::snapshot`] and continue from the seq it returns.
    pub fn changes_since(&self, seq: u64, prefix: &str) -> Result<Vec<Change>, Compacted> {
        if seq < self.compacted_through || seq > self.seq {
            return Err(Compacted {
                requested: seq,
                retained_from: self.compacted_through,
                current: self.seq,
            });
        }
        let start = self.history.partition_point(|c| c.seq <= seq);
        Ok(self
            .history
            .range(start..)
            .filter(|c| key_matches_prefix(&c.key, prefix))
            .cloned()
            .collect())
    }

    /// The entries under `prefix` (tombstones included, so this is also the full replicable
    /// state with `""`), in key order, with the seq they reflect.
    pub fn snapshot(&self, prefix: &str) -> (u64, Vec<(String, Entry)>) {
        let entries = self
            .range_prefix(prefix)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        (self.seq, entries)
    }

    /// Removes tombstones whose HLC wall time is older than `now_ms - horizon_ms`, raises the
    /// GC watermark of their buckets, and returns how many were removed. Collecting does not
    /// change any visible value, so it records no [`Change`]. See the module docs for the
    /// limitation and its mitigation.
    pub fn collect_tombstones(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(horizon_ms);
        let buckets = &mut self.bucket_hashes;
        let watermarks = &mut self.gc_watermarks;
        let dirty = &mut self.dirty;
        let before = self.entries.len();
        self.entries.retain(|key, slot| {
            let wall = slot.entry.version.hlc.wall_ms;
            if slot.entry.value.is_some() || wall >= cutoff {
                return true;
            }
            let b = bucket_of(key);
            buckets[b] = buckets[b].wrapping_sub(slot.hash);
            watermarks[b] = watermarks[b].max(wall.saturating_add(1));
            if let Some(dirty) = dirty.as_mut() {
                dirty.insert(key.clone());
            }
            false
        });
        let removed = before - self.entries.len();
        self.stats.tombstones_collected += removed as u64;
        removed
    }

    /// The highest GC watermark over all buckets: remote entries for keys this store does not
    /// hold are refused when their wall time is below their bucket's watermark, which is one
    /// more than the wall time of the newest tombstone collected in it (0: none collected).
    pub fn gc_watermark(&self) -> u64 {
        self.gc_watermarks.iter().copied().max().unwrap_or(0)
    }

    /// The GC watermark of every bucket, for saving (see [`Self::gc_watermark`]).
    pub fn gc_watermarks(&self) -> &[u64] {
        &self.gc_watermarks
    }

    /// Starts recording which keys change (written, replaced, or collected), for
    /// [`Self::take_dirty`].
    pub fn track_changes(&mut self) {
        self.dirty.get_or_insert_with(BTreeSet::new);
    }

    /// The keys changed since the last call, with their current entries (`None`: the key is
    /// gone, its tombstone collected), and the seq they reflect. Empty when tracking is off.
    pub fn take_dirty(&mut self) -> (u64, Vec<(String, Option<Entry>)>) {
        let keys = match &mut self.dirty {
            Some(dirty) => std::mem::take(dirty),
            None => BTreeSet::new(),
        };
        let changed = keys
            .into_iter()
            .map(|key| {
                let entry = self.entries.get(&key).map(|slot| slot.entry.clone());
                (key, entry)
            })
            .collect();
        (self.seq, changed)
    }

    /// Marks keys changed again (their save failed and must be retried).
    pub fn mark_dirty(&mut self, keys: impl IntoIterator<Item = String>) {
        if let Some(dirty) = &mut self.dirty {
            dirty.extend(keys);
        }
    }

    /// Loads saved state into an empty store: entries and tombstones as they were, the clock
    /// raised to `hlc` (and to every entry's timestamp) so that it never runs backwards, and
    /// the GC watermarks (ignored unless one per bucket). Nothing is recorded in the history:
    /// the seq moves past the loaded entries, so a watch from 0 starts with a snapshot.
    pub fn restore(
        &mut self,
        entries: impl IntoIterator<Item = (String, Entry)>,
        hlc: Timestamp,
        gc_watermarks: &[u64],
    ) {
        self.clock.restore(hlc);
        if gc_watermarks.len() == DIGEST_BUCKETS {
            for (mark, saved) in self.gc_watermarks.iter_mut().zip(gc_watermarks) {
                *mark = (*mark).max(*saved);
            }
        }
        for (key, entry) in entries {
            self.clock.restore(entry.version.hlc);
            let hash = entry_hash(&key, &entry);
            let b = &mut self.bucket_hashes[bucket_of(&key)];
            *b = b.wrapping_add(hash);
            self.seq += 1;
            let indexes = LocalIndexes {
                create: self.seq,
                modify: self.seq,
            };
            let slot = Slot {
                entry,
                hash,
                indexes,
            };
            if let Some(old) = self.entries.insert(key, slot) {
                *b = b.wrapping_sub(old.hash);
            }
        }
        self.compacted_through = self.seq;
    }

    /// The anti-entropy digest: [`DIGEST_BUCKETS`] bucket hashes, O(1) to maintain per
    /// change and O(buckets) to produce.
    pub fn digest(&self) -> Digest {
        Digest {
            buckets: self.bucket_hashes.clone(),
        }
    }

    /// The buckets whose hash differs from `other`'s, ascending. A digest of the wrong size
    /// (another protocol version or garbage) differs everywhere.
    pub fn diff_buckets(&self, other: &Digest) -> Vec<u16> {
        if other.buckets.len() != DIGEST_BUCKETS {
            return (0..DIGEST_BUCKETS).map(bucket_id).collect();
        }
        self.bucket_hashes
            .iter()
            .zip(&other.buckets)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| bucket_id(i))
            .collect()
    }

    fn bucket_mask(buckets: &[u16]) -> Vec<bool> {
        let mut mask = vec![false; DIGEST_BUCKETS];
        for &b in buckets {
            if let Some(m) = mask.get_mut(usize::from(b)) {
                *m = true;
            }
        }
        mask
    }

    fn in_buckets<'a>(&'a self, buckets: &[u16]) -> impl Iterator<Item = (&'a String, &'a Entry)> {
        let mask = Self::bucket_mask(buckets);
        self.entries
            .iter()
            .filter(move |(k, _)| mask[bucket_of(k)])
            .map(|(k, s)| (k, &s.entry))
    }

    /// All entries (tombstones included) in `buckets`, in key order, up to about
    /// `max_bytes` (as counted by [`Entry::wire_size`]); `truncated` tells whether some were
    /// left out. At least one entry is returned when there is any, so a budget below
    /// [`MAX_ENTRY_WIRE_BYTES`] cannot stall. Out-of-range bucket ids are ignored. Cost: one
    /// scan of the store. A truncated answer always restarts from the smallest key: for
    /// buckets larger than the budget use [`Self::bucket_versions`] +
    /// [`Self::entries_newer_than`], which guarantee progress.
    pub fn entries_in_buckets(
        &self,
        buckets: &[u16],
        max_bytes: usize,
    ) -> (Vec<(String, Entry)>, bool) {
        take_budget(self.in_buckets(buckets), max_bytes)
    }

    /// `(key, version)` of every entry (tombstones included) in `buckets`, in key order: the
    /// small first half of a two-step bucket exchange.
    pub fn bucket_versions(&self, buckets: &[u16]) -> Vec<(String, Version)> {
        self.in_buckets(buckets)
            .map(|(k, e)| (k.clone(), e.version.clone()))
            .collect()
    }

    /// Entries in `buckets` that beat the peer's versions (`peer` from its
    /// [`Self::bucket_versions`] for the same buckets): keys the peer lacks or holds at a
    /// lower version. Budgeted like [`Self::entries_in_buckets`]; since everything returned
    /// is new to the peer, repeated truncated exchanges still converge.
    pub fn entries_newer_than(
        &self,
        buckets: &[u16],
        peer: &[(String, Version)],
        max_bytes: usize,
    ) -> (Vec<(String, Entry)>, bool) {
        let peer: BTreeMap<&str, &Version> = peer.iter().map(|(k, v)| (k.as_str(), v)).collect();
        take_budget(
            self.in_buckets(buckets)
                .filter(|(k, e)| peer.get(k.as_str()).is_none_or(|v| e.version > **v)),
            max_bytes,
        )
    }
}

fn take_budget<'a>(
    iter: impl Iterator<Item = (&'a String, &'a Entry)>,
    max_bytes: usize,
) -> (Vec<(String, Entry)>, bool) {
    let mut out = Vec::new();
    let mut used = 0usize;
    for (k, e) in iter {
        let size = e.wire_size(k);
        if !out.is_empty() && used.saturating_add(size) > max_bytes {
            return (out, true);
        }
        used = used.saturating_add(size);
        out.push((k.clone(), e.clone()));
    }
    (out, false)
}

fn change_size(c: &Change) -> usize {
    c.key.len() + c.value.as_ref().map_or(0, Vec::len) + c.version.writer.len()
}

fn bucket_id(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// The digest bucket of a key.
pub fn bucket_of(key: &str) -> usize {
    let mut h = StableHasher::new();
    h.write(key.as_bytes());
    (h.finish() % DIGEST_BUCKETS as u64) as usize
}

/// Hash of one `(key, entry)`: key, HLC, writer, tombstone flag and value.
fn entry_hash(key: &str, entry: &Entry) -> u64 {
    let mut h = StableHasher::new();
    h.write_len_prefixed(key.as_bytes());
    h.write(&entry.version.hlc.wall_ms.to_le_bytes());
    h.write(&entry.version.hlc.logical.to_le_bytes());
    h.write_len_prefixed(entry.version.writer.as_bytes());
    h.write(&entry.flags.to_le_bytes());
    match &entry.value {
        None => h.write(&[0]),
        Some(v) => {
            h.write(&[1]);
            h.write_len_prefixed(v);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_000;

    fn state(s: &ConfigStore) -> Vec<(String, Entry)> {
        s.snapshot("").1
    }

    fn digest_from_scratch(s: &ConfigStore) -> Digest {
        let mut buckets = vec![0u64; DIGEST_BUCKETS];
        for (k, slot) in &s.entries {
            let b = &mut buckets[bucket_of(k)];
            *b = b.wrapping_add(entry_hash(k, &slot.entry));
        }
        Digest { buckets }
    }

    fn entry(value: Option<&[u8]>, wall_ms: u64, logical: u32, writer: &str) -> Entry {
        Entry {
            value: value.map(<[u8]>::to_vec),
            flags: 0,
            version: Version {
                hlc: Timestamp::new(wall_ms, logical),
                writer: writer.to_owned(),
            },
        }
    }

    /// One-way full exchange `from -> to` through digest and differing buckets.
    fn push_all(from: &ConfigStore, to: &mut ConfigStore, now_ms: u64) -> Vec<Change> {
        let buckets = to.diff_buckets(&from.digest());
        let (entries, truncated) = from.entries_in_buckets(&buckets, usize::MAX);
        assert!(!truncated);
        to.apply_many(entries, now_ms)
    }

    fn sync(a: &mut ConfigStore, b: &mut ConfigStore, now_ms: u64) {
        push_all(a, b, now_ms);
        push_all(b, a, now_ms);
    }

    #[test]
    fn key_validation() {
        for ok in [
            "prod/orders",
            "prod/orders/max_conn",
            "a/b",
            "dev/x.y-z_1/Q",
        ] {
            validate_key(ok).unwrap();
        }
        validate_key(&format!("p/{}", "x".repeat(MAX_KEY_LEN - 2))).unwrap();
        let too_long = format!("p/{}", "x".repeat(MAX_KEY_LEN - 1));
        let err = validate_key(&too_long).unwrap_err();
        assert!(matches!(err, ConfigError::KeyTooLong { len: 513 }));
        assert!(err.to_string().contains("limit is 512 bytes"), "{err}");
        assert!(matches!(validate_key(""), Err(ConfigError::EmptyKey)));
        validate_key("prod").unwrap();
        for bad in ["/prod/x", "prod/x/", "prod//x", "/"] {
            assert!(
                matches!(validate_key(bad), Err(ConfigError::EmptySegment { .. })),
                "{bad}"
            );
        }
        for bad in ["prod/a b", "prod/é", "prod/x\0", "prod\\x/y", "prod/x:y"] {
            assert!(
                matches!(validate_key(bad), Err(ConfigError::InvalidChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn local_indexes_and_string_prefix_scans() {
        let mut s = ConfigStore::new("n1".into());
        s.set("app", "1", NOW).unwrap();
        s.set("app/x", "2", NOW).unwrap();
        s.set("apple", "3", NOW).unwrap();
        s.set("app/x", "4", NOW).unwrap();
        let at = |s: &ConfigStore, key: &str| s.indexes(key).map(|i| (i.create, i.modify));
        assert_eq!(at(&s, "app/x"), Some((2, 4)));
        assert_eq!(at(&s, "apple"), Some((3, 3)));
        let keys: Vec<String> = s
            .scan("app", usize::MAX)
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, ["app", "app/x", "apple"]);
        assert_eq!(s.scan("app/", usize::MAX).len(), 1);
        assert_eq!(s.scan("", 2).len(), 2);
        // Deleted then set again: a new CreateIndex.
        s.delete("app/x", NOW).unwrap();
        assert!(s.scan("app/", usize::MAX).is_empty());
        s.set("app/x", "5", NOW).unwrap();
        assert_eq!(at(&s, "app/x"), Some((6, 6)));
    }

    #[test]
    fn value_limit() {
        let mut s = ConfigStore::new("n1".into());
        s.set("prod/big", vec![0u8; MAX_VALUE_LEN], NOW).unwrap();
        let err = s
            .set("prod/big", vec![0u8; MAX_VALUE_LEN + 1], NOW)
            .unwrap_err();
        assert!(matches!(err, ConfigError::ValueTooLarge { len, .. } if len == MAX_VALUE_LEN + 1));
        assert!(err.to_string().contains("65536 bytes (64 KiB)"), "{err}");
        assert_eq!(s.get("prod/big").map(<[u8]>::len), Some(MAX_VALUE_LEN));
        let mut long_writer = ConfigStore::new("w".repeat(MAX_WRITER_LEN + 1));
        assert!(matches!(
            long_writer.set("prod/a", "x", NOW),
            Err(ConfigError::WriterTooLong { .. })
        ));
    }

    #[test]
    fn tracked_changes_and_restore_rebuild_the_same_store() {
        let mut s = ConfigStore::new("n1#1".into());
        s.set("a/x", "1", NOW - 200_000).unwrap();
        s.track_changes();
        s.set("a/old", "x", NOW - 100_000).unwrap();
        s.delete("a/old", NOW - 90_000).unwrap();
        s.set("a/y", "2", NOW).unwrap();
        s.delete("a/y", NOW + 1).unwrap();
        s.apply("a/z", entry(Some(b"3"), NOW + 5, 0, "n2#1"), NOW);
        let (seq, dirty) = s.take_dirty();
        assert_eq!(seq, s.current_seq());
        let keys: Vec<_> = dirty.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["a/old", "a/y", "a/z"],
            "a/x was written before tracking"
        );
        assert!(dirty.iter().all(|(_, e)| e.is_some()));
        assert!(s.take_dirty().1.is_empty(), "taking clears");
        // Collecting a tombstone reports the key as gone.
        assert_eq!(s.collect_tombstones(NOW + 10, 50_000), 1);
        assert_eq!(s.take_dirty().1, vec![("a/old".to_string(), None)]);
        s.mark_dirty(["a/x".to_string()]);
        assert_eq!(s.take_dirty().1.len(), 1);

        let mut restored = ConfigStore::new("n1#2".into());
        restored.restore(s.snapshot("").1, s.clock().last(), s.gc_watermarks());
        assert_eq!(state(&restored), state(&s));
        assert_eq!(restored.digest(), s.digest());
        assert_eq!(restored.digest(), digest_from_scratch(&restored));
        assert_eq!(restored.gc_watermark(), s.gc_watermark());
        assert!(restored.clock().last() >= s.clock().last());
        // A watch from the start gets a snapshot, not an empty history.
        assert!(restored.changes_since(0, "").is_err());
        // A write after the restart wins even if the wall clock went backwards.
        let change = restored.set("a/z", "after", NOW - 1_000).unwrap();
        assert!(change.version.hlc > entry(None, NOW + 5, 0, "").version.hlc);
        // A collected tombstone stays collected: its old write is refused below the mark.
        assert!(restored
            .apply("a/old", entry(Some(b"x"), NOW - 100_000, 0, "n1#1"), NOW)
            .is_none());
    }

    #[test]
    fn set_get_delete_list() {
        let mut s = ConfigStore::new("n1".into());
        let c = s.set("prod/orders/max_conn", "10", NOW).unwrap();
        assert_eq!(c.seq, 1);
        assert_eq!(c.value.as_deref(), Some(&b"10"[..]));
        assert_eq!(c.version.writer, "n1");
        s.set("prod/orders/timeout", "5s", NOW).unwrap();
        s.set("prod/orders2/x", "y", NOW).unwrap();
        s.set("prod/orders-x/x", "y", NOW).unwrap();
        s.set("dev/orders/max_conn", "1", NOW).unwrap();
        assert_eq!(s.get("prod/orders/max_conn"), Some(&b"10"[..]));
        assert_eq!(s.get("prod/missing"), None);
        assert_eq!(s.get("not a key"), None);

        let keys = |l: Vec<(String, Vec<u8>)>| l.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(s.list("prod/orders")),
            ["prod/orders/max_conn", "prod/orders/timeout"]
        );
        assert_eq!(keys(s.list("prod/orders/")), keys(s.list("prod/orders")));
        assert_eq!(keys(s.list("prod/orders/timeout")), ["prod/orders/timeout"]);
        assert_eq!(s.list("").len(), 5);
        assert_eq!(s.list("prod").len(), 4);
        assert!(s.list("pro").is_empty());

        let del = s.delete("prod/orders/timeout", NOW).unwrap().unwrap();
        assert_eq!(del.value, None);
        assert!(del.version > c.version);
        assert_eq!(s.get("prod/orders/timeout"), None);
        assert!(s.entry("prod/orders/timeout").unwrap().is_tombstone());
        assert_eq!(keys(s.list("prod/orders")), ["prod/orders/max_conn"]);
        assert_eq!(s.delete("prod/orders/timeout", NOW).unwrap(), None);
        assert_eq!(s.delete("prod/never", NOW).unwrap(), None);
        assert!(s.delete("bad//key", NOW).is_err());
        // The tombstone is part of the replicable state.
        assert_eq!(s.snapshot("prod/orders").1.len(), 2);
        assert_eq!(s.len(), 5);
        // Writing again resurrects the key locally with a newer version.
        s.set("prod/orders/timeout", "6s", NOW).unwrap();
        assert_eq!(s.get_str("prod/orders/timeout").unwrap(), Some("6s"));
    }

    #[test]
    fn typed_helpers() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Pool {
            max: u32,
            name: String,
        }
        let mut s = ConfigStore::new("n1".into());
        s.set_str("prod/s", "héllo", NOW).unwrap();
        assert_eq!(s.get_str("prod/s").unwrap(), Some("héllo"));
        assert_eq!(s.get_str("prod/none").unwrap(), None);
        s.set("prod/bin", vec![0xff, 0xfe], NOW).unwrap();
        let err = s.get_str("prod/bin").unwrap_err();
        assert!(matches!(err, ConfigError::NotUtf8 { .. }));
        assert!(std::error::Error::source(&err).is_some());

        let pool = Pool {
            max: 7,
            name: "db".into(),
        };
        s.set_json("prod/pool", &pool, NOW).unwrap();
        assert_eq!(s.get_as::<Pool>("prod/pool").unwrap(), Some(pool));
        assert_eq!(s.get_as::<Pool>("prod/none").unwrap(), None);
        assert!(matches!(
            s.get_as::<Pool>("prod/s"),
            Err(ConfigError::Json { .. })
        ));
        assert!(matches!(
            s.set_json("prod/big", &"x".repeat(MAX_VALUE_LEN), NOW),
            Err(ConfigError::ValueTooLarge { .. })
        ));
    }

    #[test]
    fn skewed_clocks_later_write_wins() {
        // A's clock is 10 s ahead of B's.
        let mut a = ConfigStore::new("a".into());
        let mut b = ConfigStore::new("b".into());
        let ca = a.set("prod/x", "from-a", NOW + 10_000).unwrap();
        assert!(b.apply("prod/x", ca.entry(), NOW + 5).is_some());
        let cb = b.set("prod/x", "from-b", NOW + 6).unwrap();
        assert!(cb.version > ca.version);
        assert_eq!(b.get("prod/x"), Some(&b"from-b"[..]));
        assert!(a.apply("prod/x", cb.entry(), NOW + 10_007).is_some());
        assert_eq!(a.get("prod/x"), Some(&b"from-b"[..]));
        assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn far_future_entries_are_refused_and_counted() {
        let mut s = ConfigStore::new("n1".into());
        let before = s.clock().last();
        let e = entry(Some(b"v"), NOW + DEFAULT_MAX_DRIFT_MS + 1, 0, "broken");
        assert_eq!(s.apply("prod/x", e, NOW), None);
        assert_eq!(s.get("prod/x"), None);
        assert_eq!(s.stats().rejected_clock_drift, 1);
        assert_eq!(s.clock().last(), before);
        assert_eq!(s.current_seq(), 0);
        let ok = entry(Some(b"v"), NOW + DEFAULT_MAX_DRIFT_MS, 0, "fast");
        assert!(s.apply("prod/x", ok, NOW).is_some());
        // Later local writes order after what was seen.
        let c = s.set("prod/x", "local", NOW).unwrap();
        assert!(c.version.hlc.wall_ms >= NOW + DEFAULT_MAX_DRIFT_MS);
    }

    #[test]
    fn invalid_remote_entries_are_refused_and_counted() {
        let mut s = ConfigStore::new("n1".into());
        let big = vec![1u8; MAX_VALUE_LEN + 1];
        assert_eq!(s.apply("prod/x", entry(Some(&big), NOW, 0, "w"), NOW), None);
        assert_eq!(
            s.apply("bad key", entry(Some(b"v"), NOW, 0, "w"), NOW),
            None
        );
        let w = "w".repeat(MAX_WRITER_LEN + 1);
        assert_eq!(s.apply("prod/x", entry(Some(b"v"), NOW, 0, &w), NOW), None);
        assert_eq!(s.stats().rejected_invalid, 3);
        assert!(s.is_empty());
    }

    #[test]
    fn apply_is_idempotent_and_older_loses() {
        let mut s = ConfigStore::new("n1".into());
        let e2 = entry(Some(b"two"), NOW, 2, "w");
        assert!(s.apply("prod/x", e2.clone(), NOW).is_some());
        assert_eq!(s.apply("prod/x", e2, NOW), None);
        assert_eq!(
            s.apply("prod/x", entry(Some(b"one"), NOW, 1, "w"), NOW),
            None
        );
        assert_eq!(s.apply("prod/x", entry(None, NOW, 1, "z"), NOW), None);
        assert_eq!(s.get("prod/x"), Some(&b"two"[..]));
        assert_eq!(s.current_seq(), 1);
        assert_eq!(s.stats().applied_remote, 1);
        // A newer tombstone wins.
        let c = s.apply("prod/x", entry(None, NOW, 3, "a"), NOW).unwrap();
        assert_eq!((c.seq, c.value), (2, None));
        assert_eq!(s.get("prod/x"), None);
    }

    #[test]
    fn concurrent_writes_of_one_key_converge() {
        let mut stores: Vec<ConfigStore> = (0..4)
            .map(|i| ConfigStore::new(format!("node-{i}")))
            .collect();
        for (i, s) in stores.iter_mut().enumerate() {
            s.set("prod/leader", format!("v{i}"), NOW).unwrap();
        }
        for _ in 0..2 {
            for i in 0..stores.len() {
                for j in 0..stores.len() {
                    if i != j {
                        let from = stores[i].clone();
                        push_all(&from, &mut stores[j], NOW);
                    }
                }
            }
        }
        // Same HLC everywhere: the greatest writer id wins.
        for s in &stores {
            assert_eq!(s.get_str("prod/leader").unwrap(), Some("v3"));
            assert_eq!(state(s), state(&stores[0]));
            assert_eq!(s.digest(), stores[0].digest());
        }
    }

    #[test]
    fn anomalous_ties_converge_by_value() {
        let x = entry(Some(b"x"), NOW, 0, "w");
        let y = entry(Some(b"y"), NOW, 0, "w");
        let t = entry(None, NOW, 0, "w");
        let mut a = ConfigStore::new("a".into());
        let mut b = ConfigStore::new("b".into());
        a.apply_many(
            [("p/k".to_owned(), x.clone()), ("p/k".to_owned(), t.clone())],
            NOW,
        );
        b.apply_many([("p/k".to_owned(), y), ("p/k".to_owned(), x)], NOW);
        assert_ne!(a.digest(), b.digest());
        sync(&mut a, &mut b, NOW);
        assert_eq!(a.get("p/k"), Some(&b"y"[..]));
        assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn change_log_and_compaction() {
        let opts = ConfigStoreOptions {
            history_capacity: 3,
            ..ConfigStoreOptions::default()
        };
        let mut s = ConfigStore::with_options("n1".into(), opts);
        assert_eq!(s.current_seq(), 0);
        assert_eq!(s.changes_since(0, "").unwrap(), vec![]);
        s.set("prod/a", "1", NOW).unwrap();
        s.set("dev/a", "1", NOW).unwrap();
        assert_eq!(s.changes_since(0, "").unwrap().len(), 2);
        assert_eq!(s.changes_since(1, "").unwrap()[0].key, "dev/a");
        assert_eq!(s.changes_since(0, "prod").unwrap().len(), 1);
        assert!(s.changes_since(2, "").unwrap().is_empty());
        s.set("prod/b", "1", NOW).unwrap();
        s.delete("prod/a", NOW).unwrap();
        assert_eq!(s.current_seq(), 4);
        // Seq 1 was dropped: asking from 0 must fail, from 1 on works.
        let err = s.changes_since(0, "").unwrap_err();
        assert_eq!(
            err,
            Compacted {
                requested: 0,
                retained_from: 1,
                current: 4
            }
        );
        assert!(err.to_string().contains("snapshot"));
        let since1 = s.changes_since(1, "prod").unwrap();
        assert_eq!(since1.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(since1[1].value, None);
        // From the future: another incarnation.
        assert!(s.changes_since(5, "").is_err());
        let (seq, snap) = s.snapshot("prod");
        assert_eq!(seq, 4);
        assert_eq!(snap.len(), 2);
        assert!(s.changes_since(seq, "prod").unwrap().is_empty());

        // Byte bound.
        let opts = ConfigStoreOptions {
            history_max_bytes: 100,
            ..ConfigStoreOptions::default()
        };
        let mut s = ConfigStore::with_options("n1".into(), opts);
        s.set("prod/a", vec![0u8; 60], NOW).unwrap();
        s.set("prod/b", vec![0u8; 60], NOW).unwrap();
        assert!(s.changes_since(0, "").is_err());
        assert_eq!(s.changes_since(1, "").unwrap().len(), 1);
        s.set("prod/c", vec![0u8; 200], NOW).unwrap();
        // A change larger than the whole bound is not retained either.
        assert!(s.changes_since(2, "").is_err());
        assert!(s.changes_since(3, "").unwrap().is_empty());
    }

    #[test]
    fn tombstone_collection_does_not_resurrect_deleted_keys() {
        const HORIZON: u64 = 24 * 3_600_000;
        let mut a = ConfigStore::new("a".into());
        let mut c = ConfigStore::new("c".into());
        a.set("prod/old", "v", NOW).unwrap();
        a.set("prod/kept", "k", NOW).unwrap();
        sync(&mut a, &mut c, NOW);
        let c_before = c.clone();

        // C goes away; A deletes the key.
        a.delete("prod/old", NOW + 1_000).unwrap();

        // 1. C comes back within the horizon: GC has not collected the tombstone yet, the
        //    merge delivers it, nothing resurrects.
        let t1 = NOW + HORIZON / 2;
        assert_eq!(a.collect_tombstones(t1, HORIZON), 0);
        sync(&mut a, &mut c, t1);
        assert_eq!(a.get("prod/old"), None);
        assert_eq!(c.get("prod/old"), None);
        // Both collect after the horizon; a later sync brings nothing back.
        let t2 = NOW + HORIZON + 2_000;
        assert_eq!(a.collect_tombstones(t2, HORIZON), 1);
        assert_eq!(c.collect_tombstones(t2, HORIZON), 1);
        assert_eq!(a.digest(), c.digest());
        assert_eq!(a.digest(), digest_from_scratch(&a));
        sync(&mut a, &mut c, t2);
        assert_eq!((a.get("prod/old"), c.get("prod/old")), (None, None));
        assert_eq!(a.stats().tombstones_collected, 1);

        // 2. A replica that still has the old value (it missed the delete) syncs after the
        //    tombstone was collected: the watermark refuses the stale value.
        let mut stale = c_before;
        let changes = push_all(&stale, &mut a, t2);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(a.get("prod/old"), None);
        assert_eq!(a.stats().rejected_below_watermark, 1);
        assert!(a.gc_watermark() > NOW + 1_000);
        // The stale replica itself keeps the value (documented limitation) but gets
        // everything else.
        push_all(&a, &mut stale, t2);
        assert_eq!(stale.get("prod/kept"), Some(&b"k"[..]));

        // 3. The watermark does not block new writes of the collected key.
        let mut b = ConfigStore::new("b".into());
        b.set("prod/old", "new", t2).unwrap();
        push_all(&b, &mut a, t2);
        assert_eq!(a.get_str("prod/old").unwrap(), Some("new"));
    }

    #[test]
    fn collect_keeps_live_entries_and_recent_tombstones() {
        let mut s = ConfigStore::new("n".into());
        s.set("p/live", "v", 10).unwrap();
        s.set("p/old", "v", 10).unwrap();
        s.delete("p/old", 20).unwrap();
        s.set("p/new", "v", 30).unwrap();
        s.delete("p/new", 1_000).unwrap();
        assert_eq!(s.collect_tombstones(500, 1_000), 0); // horizon larger than now
        assert_eq!(s.collect_tombstones(1_500, 1_000), 1);
        assert_eq!(
            state(&s).into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["p/live", "p/new"]
        );
        assert_eq!(s.digest(), digest_from_scratch(&s));
        assert_eq!(s.current_seq(), 5, "GC records no change");
    }

    #[test]
    fn digest_diff_and_budgets() {
        let mut a = ConfigStore::new("a".into());
        assert_eq!(a.digest().buckets, vec![0; DIGEST_BUCKETS]);
        for i in 0..50 {
            a.set(&format!("prod/k{i}"), vec![b'x'; 100], NOW).unwrap();
        }
        let b = ConfigStore::new("b".into());
        let diff = b.diff_buckets(&a.digest());
        assert!(!diff.is_empty() && diff.len() <= 50);
        assert!(diff.windows(2).all(|w| w[0] < w[1]));
        let bad = Digest {
            buckets: vec![0; 3],
        };
        assert_eq!(a.diff_buckets(&bad).len(), DIGEST_BUCKETS);

        let (all, truncated) = a.entries_in_buckets(&diff, usize::MAX);
        assert_eq!((all.len(), truncated), (50, false));
        let (some, truncated) = a.entries_in_buckets(&diff, 1_000);
        assert!(truncated);
        assert!(some.iter().map(|(k, e)| e.wire_size(k)).sum::<usize>() <= 1_000);
        let (one, truncated) = a.entries_in_buckets(&diff, 0);
        assert_eq!((one.len(), truncated), (1, true));
        assert!(a.entries_in_buckets(&[], usize::MAX).0.is_empty());
        assert!(a.entries_in_buckets(&[999, 4_000], usize::MAX).0.is_empty());

        // Two-step: only what the peer lacks.
        let mut b = b;
        b.apply_many(some.clone(), NOW);
        let summary = b.bucket_versions(&diff);
        assert_eq!(summary.len(), some.len());
        let (rest, truncated) = a.entries_newer_than(&diff, &summary, usize::MAX);
        assert!(!truncated);
        assert_eq!(rest.len(), 50 - some.len());
        b.apply_many(rest, NOW);
        assert_eq!(a.digest(), b.digest());
        assert!(a.diff_buckets(&b.digest()).is_empty());
    }

    // ---------------------------------------------------------------- property tests

    const KEYS: usize = 40;

    fn key_name(i: usize) -> String {
        let env = if i.is_multiple_of(3) { "dev" } else { "prod" };
        format!("{env}/svc/k{i}")
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            proptest::option::weighted(0.8, proptest::collection::vec(0u8..4, 0..3)),
            0u64..6,
            0u32..3,
            0usize..3,
            0u64..2,
        )
            .prop_map(|(value, wall, logical, w, flags)| Entry {
                // A tombstone carries no flags (as every write path makes it).
                flags: if value.is_some() { flags } else { 0 },
                value,
                version: Version {
                    hlc: Timestamp::new(NOW + wall, logical),
                    writer: ["a", "b", "c"][w].to_owned(),
                },
            })
    }

    fn arb_state() -> impl Strategy<Value = Vec<(String, Entry)>> {
        proptest::collection::vec((0..8usize, arb_entry()), 0..24)
            .prop_map(|v| v.into_iter().map(|(k, e)| (key_name(k), e)).collect())
    }

    fn store_of(entries: &[(String, Entry)]) -> ConfigStore {
        let mut s = ConfigStore::new("m".into());
        s.apply_many(entries.iter().cloned(), NOW);
        s
    }

    fn join(a: &ConfigStore, b: &ConfigStore) -> ConfigStore {
        let mut s = ConfigStore::new("m".into());
        s.apply_many(state(a), NOW);
        s.apply_many(state(b), NOW);
        s
    }

    #[derive(Debug, Clone)]
    enum Mode {
        Full,
        Truncated(usize),
        TwoStep(usize),
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize, usize, u8),
        Delete(usize, usize),
        Tick(u64),
        Exchange(usize, usize, Mode),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let mode = prop_oneof![
            Just(Mode::Full),
            (0usize..400).prop_map(Mode::Truncated),
            (0usize..400).prop_map(Mode::TwoStep),
        ];
        prop_oneof![
            4 => (0..3usize, 0..KEYS, any::<u8>()).prop_map(|(n, k, v)| Op::Set(n, k, v)),
            2 => (0..3usize, 0..KEYS).prop_map(|(n, k)| Op::Delete(n, k)),
            2 => (0u64..50).prop_map(Op::Tick),
            3 => (0..3usize, 0..3usize, mode).prop_map(|(a, b, m)| Op::Exchange(a, b, m)),
        ]
    }

    /// One-way exchange `from -> to` in the given mode.
    fn exchange(stores: &mut [ConfigStore], from: usize, to: usize, mode: &Mode, now: u64) {
        if from == to {
            return;
        }
        let buckets = stores[to].diff_buckets(&stores[from].digest());
        let entries = match *mode {
            Mode::Full => stores[from].entries_in_buckets(&buckets, usize::MAX).0,
            Mode::Truncated(budget) => stores[from].entries_in_buckets(&buckets, budget).0,
            Mode::TwoStep(budget) => {
                let summary = stores[to].bucket_versions(&buckets);
                stores[from]
                    .entries_newer_than(&buckets, &summary, budget)
                    .0
            }
        };
        stores[to].apply_many(entries, now);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn merge_is_commutative_associative_idempotent(
            a in arb_state(), b in arb_state(), c in arb_state()
        ) {
            let (a, b, c) = (store_of(&a), store_of(&b), store_of(&c));
            prop_assert_eq!(state(&join(&a, &b)), state(&join(&b, &a)));
            prop_assert_eq!(
                state(&join(&join(&a, &b), &c)),
                state(&join(&a, &join(&b, &c)))
            );
            prop_assert_eq!(state(&join(&a, &a)), state(&a));
            // In-place merge is the same join, and the digest tracks it.
            let mut ab = a.clone();
            ab.apply_many(state(&b), NOW);
            prop_assert_eq!(state(&ab), state(&join(&a, &b)));
            prop_assert_eq!(ab.digest(), digest_from_scratch(&ab));
            prop_assert_eq!(ab.digest(), join(&b, &a).digest());
        }

        #[test]
        fn replicas_converge_under_random_interleavings(
            ops in proptest::collection::vec(arb_op(), 1..120),
            skews in proptest::array::uniform3(0u64..3_000),
            final_budget in 0usize..300,
        ) {
            let mut stores: Vec<ConfigStore> =
                ["n0", "n1", "n2"].iter().map(|w| ConfigStore::new((*w).into())).collect();
            let mut now = NOW;
            let mut expected: BTreeMap<String, Entry> = BTreeMap::new();
            let mut record = |c: Change| {
                let e = c.entry();
                match expected.get(&c.key) {
                    Some(old) if !e.supersedes(old) => {}
                    _ => {
                        expected.insert(c.key, e);
                    }
                }
            };
            for op in &ops {
                match op {
                    Op::Set(n, k, v) => {
                        let c = stores[*n].set(&key_name(*k), vec![*v], now + skews[*n]).unwrap();
                        record(c);
                    }
                    Op::Delete(n, k) => {
                        if let Some(c) = stores[*n].delete(&key_name(*k), now + skews[*n]).unwrap() {
                            record(c);
                        }
                    }
                    Op::Tick(ms) => now += ms,
                    Op::Exchange(from, to, mode) => {
                        exchange(&mut stores, *from, *to, mode, now + skews[*to]);
                    }
                }
                for s in &stores {
                    prop_assert_eq!(s.digest(), digest_from_scratch(s));
                }
            }
            // Finish with truncated two-step exchanges only: they must make progress.
            let mut rounds = 0;
            while !(stores[0].digest() == stores[1].digest() && stores[1].digest() == stores[2].digest()) {
                rounds += 1;
                prop_assert!(rounds < 1_000, "no convergence");
                for from in 0..3 {
                    for (to, skew) in skews.iter().enumerate() {
                        exchange(&mut stores, from, to, &Mode::TwoStep(final_budget), now + skew);
                    }
                }
            }
            let expected: Vec<(String, Entry)> = expected.into_iter().collect();
            for s in &stores {
                prop_assert_eq!(&state(s), &expected);
                prop_assert_eq!(s.stats().rejected_clock_drift, 0);
            }
        }

        #[test]
        fn bincode_round_trips(
            e in arb_entry(),
            key in "[a-z]{1,8}/[a-z0-9._-]{1,8}",
            seq in any::<u64>(),
            buckets in proptest::collection::vec(any::<u64>(), 0..300),
            value in proptest::collection::vec(any::<u8>(), 0..2_000),
            flags in any::<u64>(),
        ) {
            let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
            let mut e = e;
            if e.value.is_some() {
                e.value = Some(value);
                e.flags = flags;
            }
            let bytes = bincode::serde::encode_to_vec(&e, cfg).unwrap();
            let (back, used): (Entry, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!((&back, used), (&e, bytes.len()));
            let pair = bincode::serde::encode_to_vec((&key, &e), cfg).unwrap();
            prop_assert!(pair.len() <= e.wire_size(&key), "{} > {}", pair.len(), e.wire_size(&key));

            let d = Digest { buckets };
            let bytes = bincode::serde::encode_to_vec(&d, cfg).unwrap();
            let (back, _): (Digest, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(back, d);

            let c = Change { seq, key, value: e.value.clone(), flags: e.flags, version: e.version.clone() };
            let bytes = bincode::serde::encode_to_vec(&c, cfg).unwrap();
            let (back, _): (Change, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(back, c);
        }

        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
            let _ = bincode::serde::decode_from_slice::<Entry, _>(&bytes, cfg);
            let _ = bincode::serde::decode_from_slice::<Digest, _>(&bytes, cfg);
            let _ = bincode::serde::decode_from_slice::<Change, _>(&bytes, cfg);
            let _ = bincode::serde::decode_from_slice::<(String, Entry), _>(&bytes, cfg);
        }

        #[test]
        fn arbitrary_inputs_never_panic(
            key in ".{0,40}",
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            wall in any::<u64>(),
            logical in any::<u32>(),
            writer in ".{0,8}",
            now in any::<u64>(),
            prefix in ".{0,8}",
        ) {
            let mut s = ConfigStore::new("n".into());
            let _ = validate_key(&key);
            let e = Entry { value, flags: 0, version: Version { hlc: Timestamp::new(wall, logical), writer } };
            let _ = s.apply(&key, e, now);
            let _ = s.set(&key, "v", now);
            let _ = s.delete(&key, now);
            let _ = s.list(&prefix);
            let _ = s.changes_since(wall, &prefix);
            let _ = s.collect_tombstones(now, wall);
            prop_assert_eq!(s.digest(), digest_from_scratch(&s));
        }
    }

    #[test]
    fn huge_length_prefixes_are_refused_without_allocating() {
        let cfg = bincode::config::standard().with_limit::<{ 1 << 16 }>();
        // Varint tag 0xFD: a u64 length follows.
        let mut bytes = vec![0xFD];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(bincode::serde::decode_from_slice::<Digest, _>(&bytes, cfg).is_err());
        assert!(bincode::serde::decode_from_slice::<(String, Entry), _>(&bytes, cfg).is_err());
    }
}
