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
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::hlc::{HybridClock, Timestamp, DEFAULT_MAX_DRIFT_MS};

/// Maximum length of a key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Minimum number of `/`-separated segments in a key (`environment/name`).
pub const MIN_KEY_SEGMENTS: usize = 2;
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
/// of key, value and writer lengths (covers timestamps, tags and length prefixes).
pub const ENTRY_OVERHEAD_BYTES: usize = 48;
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
    /// The key has fewer than [`MIN_KEY_SEGMENTS`] segments.
    #[error(
        "config key {key:?} has {segments} segment(s); at least {min} are required \
         (`environment/name`)",
        min = MIN_KEY_SEGMENTS
    )]
    TooFewSegments {
        /// The refused key.
        key: String,
        /// Number of segments it has.
        segments: usize,
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

/// Checks a key against the rules: 1..=[`MAX_KEY_LEN`] bytes, at least [`MIN_KEY_SEGMENTS`]
/// non-empty `/`-separated segments of `[A-Za-z0-9._-]`. The first segment is the
/// environment namespace (`prod/orders/max_conn`).
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
    let segments = key.split('/').count();
    if segments < MIN_KEY_SEGMENTS {
        return Err(ConfigError::TooFewSegments {
            key: key.to_owned(),
            segments,
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
    /// Version of the write.
    pub version: Version,
}

impl Change {
    /// The entry to replicate for this change (what peers pass to [`ConfigStore::apply`]).
    pub fn entry(&self) -> Entry {
        Entry {
            value: self.value.clone(),
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
        let value = value.into();
        validate_key(key)?;
        validate_value(key, &value)?;
        self.check_writer()?;
        let version = self.next_version(now_ms);
        Ok(self.install(
            key.to_owned(),
            Entry {
                value: Some(value),
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
                version,
            },
        )))
    }

    /// The current value of `key`; `None` if absent or deleted.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key)?.entry.value.as_deref()
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
                .map_or(true, |v| v.len() <= MAX_VALUE_LEN)
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
            version: entry.version.clone(),
        };
        let old = self.entries.insert(key, Slot { entry, hash });
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
        let before = self.entries.len();
        self.entries.retain(|key, slot| {
            let wall = slot.entry.version.hlc.wall_ms;
            if slot.entry.value.is_some() || wall >= cutoff {
                return true;
            }
            let b = bucket_of(key);
            buckets[b] = buckets[b].wrapping_sub(slot.hash);
            watermarks[b] = watermarks[b].max(wall.saturating_add(1));
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
                .filter(|(k, e)| peer.get(k.as_str()).map_or(true, |v| e.version > **v)),
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

/// Stable 64-bit FNV-1a with a final avalanche (SplitMix64 finalizer), so that sums of
/// entry hashes are well spread. Part of the wire protocol: do not change it.
struct StableHasher(u64);

impl StableHasher {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        StableHasher(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn write_len_prefixed(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
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
    match &entry.value {
        None => h.write(&[0]),
        Some(v) => {
            h.write(&[1]);
            h.write_len_prefixed(v);
        }
    }
    h.finish()
}
