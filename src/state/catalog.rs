//! The replicated service catalog (sans-IO).
//!
//! # Model
//!
//! Every node (an *owner*) is the only writer of its own [`ServiceRecord`]s. The catalog keeps,
//! per owner, an [`OwnerState`]: the owner's `epoch` (its generation: a restarted node comes back
//! with a higher epoch, and a higher epoch replaces the whole owner state), the highest version
//! known contiguously (`max_version`), a garbage-collection floor (`gc_floor`) and the entries,
//! keyed by service id. Every local change bumps the owner's version and stamps the entry;
//! deregistration leaves a tombstone (an entry without a record) until it is collected.
//!
//! Nothing here performs IO or reads a clock: local writes return a [`Delta`] for the caller to
//! broadcast, and anti-entropy is a [`Digest`] / [`SyncPayload`] exchange the caller transports.
//!
//! # Invariants the merge relies on
//!
//! For a replica `R` of an owner (same epoch):
//!
//! * **I1** — `R` holds every live entry that was current at some instant with a version
//!   `≤ R.max_version` (and every such tombstone, unless its version is `≤ R.gc_floor`).
//! * **I2** — `gc_floor ≤ max_version`.
//!
//! Hence an id that `R` lacks, or holds at another version, cannot have a *current* write at a
//! version `≤ R.gc_floor`: that write is superseded. The join of two states of the same epoch
//! keeps, per id, the greatest `(version, record)` `W` unless some input `S` has
//! `W.version ≤ S.gc_floor` and does not hold exactly `W` (then `W` is dead and dropped); floors
//! and versions join by `max`. This join is commutative, associative and idempotent for *any*
//! inputs (the property tests check it on arbitrary states), and by I1 it never drops a current
//! live record, while the floors stop collected tombstones from letting stale records return.
//!
//! # Anti-entropy
//!
//! Scuttlebutt: a peer sends its [`Digest`] (`owner → epoch, max_version, gc_floor`); we answer
//! with [`Catalog::deltas_for`], which sends, per owner where we know more, the entries above the
//! peer's version in ascending version order, or a *reset* (our whole state of that owner) when
//! the peer's epoch is older or its version is below our `gc_floor`. Payloads are cut at a byte
//! budget; each owner update says up to which version it is complete (`up_to`), so the receiver
//! only advances `max_version` over what it actually received and truncation never loses entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 128;
/// Longest service id, in bytes.
pub const MAX_SERVICE_ID_LEN: usize = 128;
/// Most tags on one service.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Most meta entries on one service.
pub const MAX_META_ENTRIES: usize = 64;
/// Largest encoded meta map of one service (bincode standard encoding), in bytes.
pub const MAX_META_ENCODED_LEN: usize = 4096;
/// Most live services one owner may register.
pub const MAX_SERVICES_PER_OWNER: usize = 1024;
/// Longest owner (node) name accepted from the network, in bytes.
pub const MAX_OWNER_NAME_LEN: usize = 256;
/// Most forgotten owners remembered; older marks are pruned beyond it.
pub const MAX_FORGOTTEN: usize = 4096;
/// Upper bound of one encoded `(service id, Entry)` pair of a valid record. A budget given to
/// [`Catalog::deltas_for`] should exceed this plus [`MAX_OWNER_NAME_LEN`] + 64, or a large
/// record may never fit.
pub const MAX_ENTRY_WIRE_LEN: usize = 12 * 1024;

/// Why a record or a local write was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// The service name is empty or too long.
    #[error("service name is {len} bytes; it must be 1..={max} bytes", max = MAX_SERVICE_NAME_LEN)]
    NameLength {
        /// Actual length in bytes.
        len: usize,
    },
    /// The service name contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "service name contains {ch:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
    )]
    NameChar {
        /// The offending character.
        ch: char,
    },
    /// The service id is empty or too long.
    #[error("service id is {len} bytes; it must be 1..={max} bytes", max = MAX_SERVICE_ID_LEN)]
    IdLength {
        /// Actual length in bytes.
        len: usize,
    },
    /// Too many tags.
    #[error("service has {count} tags; at most {max} are allowed", max = MAX_TAGS)]
    TooManyTags {
        /// Number of tags given.
        count: usize,
    },
    /// One tag is too long.
    #[error("tag #{index} is {len} bytes; at most {max} bytes are allowed", max = MAX_TAG_LEN)]
    TagTooLong {
        /// Position of the tag.
        index: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// Too many meta entries.
    #[error("service has {count} meta entries; at most {max} are allowed", max = MAX_META_ENTRIES)]
    TooManyMeta {
        /// Number of entries given.
        count: usize,
    },
    /// The meta map is too large once encoded.
    #[error("meta encodes to {len} bytes; at most {max} bytes are allowed", max = MAX_META_ENCODED_LEN)]
    MetaTooLarge {
        /// Encoded size in bytes.
        len: usize,
    },
    /// The owner already has the maximum number of live services.
    #[error("this node already has {max} services registered (the limit); deregister one first", max = MAX_SERVICES_PER_OWNER)]
    TooManyServices,
    /// No live service with this id is registered by this node.
    #[error("no service with id {0:?} is registered on this node")]
    UnknownService(String),
}

/// One service instance, as registered by its owner node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    /// Service name shared by all instances (`[A-Za-z0-9._-]`, 1..=128 bytes).
    pub name: String,
    /// Instance id, unique within the owner (1..=128 bytes).
    pub id: String,
    /// Address; `None` means the owner node's advertised IP.
    pub addr: Option<IpAddr>,
    /// Port.
    pub port: u16,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
}

impl Service {
    /// A service with no address override, tags or meta.
    pub fn new(name: impl Into<String>, id: impl Into<String>, port: u16) -> Self {
        Service {
            name: name.into(),
            id: id.into(),
            addr: None,
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
        }
    }

    /// Checks every limit (see the `MAX_*` constants).
    pub fn validate(&self) -> Result<(), CatalogError> {
        let len = self.name.len();
        if len == 0 || len > MAX_SERVICE_NAME_LEN {
            return Err(CatalogError::NameLength { len });
        }
        if let Some(ch) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(CatalogError::NameChar { ch });
        }
        validate_id(&self.id)?;
        if self.tags.len() > MAX_TAGS {
            return Err(CatalogError::TooManyTags {
                count: self.tags.len(),
            });
        }
        if let Some((index, tag)) = self
            .tags
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_TAG_LEN)
        {
            return Err(CatalogError::TagTooLong {
                index,
                len: tag.len(),
            });
        }
        if self.meta.len() > MAX_META_ENTRIES {
            return Err(CatalogError::TooManyMeta {
                count: self.meta.len(),
            });
        }
        let len = meta_encoded_len(&self.meta);
        if len > MAX_META_ENCODED_LEN {
            return Err(CatalogError::MetaTooLarge { len });
        }
        Ok(())
    }
}

fn validate_id(id: &str) -> Result<(), CatalogError> {
    let len = id.len();
    if len == 0 || len > MAX_SERVICE_ID_LEN {
        return Err(CatalogError::IdLength { len });
    }
    Ok(())
}

/// Length of a bincode (standard config) varint length prefix.
fn varint_len(n: usize) -> usize {
    match n {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Size of `meta` in the bincode standard encoding.
fn meta_encoded_len(meta: &BTreeMap<String, String>) -> usize {
    meta.iter().fold(varint_len(meta.len()), |acc, (k, v)| {
        acc + varint_len(k.len()) + k.len() + varint_len(v.len()) + v.len()
    })
}

/// Health of a service instance, as its owner reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Healthy.
    Passing,
    /// Degraded but serving.
    Warning,
    /// Failing.
    Critical,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        })
    }
}

/// A service and its health: what an owner publishes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRecord {
    /// The service.
    pub service: Service,
    /// Its health.
    pub health: Health,
}

impl ServiceRecord {
    /// Pairs a service with a health.
    pub fn new(service: Service, health: Health) -> Self {
        ServiceRecord { service, health }
    }

    /// Checks the service's limits.
    pub fn validate(&self) -> Result<(), CatalogError> {
        self.service.validate()
    }
}

/// One versioned entry of an owner: a record, or a tombstone (`record == None`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The owner's version at which this entry was written (≥ 1).
    pub version: u64,
    /// The record; `None` is a tombstone (deregistered).
    pub record: Option<ServiceRecord>,
}

impl Entry {
    /// Total order used to pick a winner: version first, then the record (tombstone lowest),
    /// so that even conflicting inputs merge deterministically.
    fn key(&self) -> (u64, &Option<ServiceRecord>) {
        (self.version, &self.record)
    }
}

/// The replicated state of one owner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct OwnerState {
    /// The owner's generation; a higher epoch replaces the whole state.
    pub epoch: u64,
    /// Every write up to this version is known (see the module docs, I1).
    pub max_version: u64,
    /// Tombstones at or below this version may have been collected.
    pub gc_floor: u64,
    /// Entries by service id.
    pub entries: BTreeMap<String, Entry>,
}

impl OwnerState {
    fn new(epoch: u64) -> Self {
        OwnerState {
            epoch,
            ..OwnerState::default()
        }
    }

    /// Live records, by service id.
    pub fn records(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.entries.values().filter_map(|e| e.record.as_ref())
    }

    /// Number of live records.
    pub fn live_count(&self) -> usize {
        self.records().count()
    }

    /// Joins `other` (same epoch) into `self`; returns whether the entries changed.
    fn join(&mut self, other: &BTreeMap<String, Entry>, other_gc: u64, other_max: u64) -> bool {
        let changed = self.join_entries(other, other_gc);
        self.max_version = self.max_version.max(other_max);
        changed
    }

    /// The entry part of the join (see the module docs). Raises `gc_floor` to `other_gc`.
    fn join_entries(&mut self, other: &BTreeMap<String, Entry>, other_gc: u64) -> bool {
        let mut updates: Vec<(String, Option<Entry>)> = Vec::new();
        for (id, theirs) in other {
            let ours = self.entries.get(id);
            let result = resolve(ours, self.gc_floor, Some(theirs), other_gc);
            if result != ours {
                updates.push((id.clone(), result.cloned()));
            }
        }
        if other_gc > 0 {
            for (id, ours) in &self.entries {
                if ours.version <= other_gc && !other.contains_key(id) {
                    updates.push((id.clone(), None));
                }
            }
        }
        let changed = !updates.is_empty();
        for (id, entry) in updates {
            match entry {
                Some(e) => self.entries.insert(id, e),
                None => self.entries.remove(&id),
            };
        }
        self.gc_floor = self.gc_floor.max(other_gc);
        changed
    }

    /// Raises `gc_floor` to `floor` (if it is known contiguously) and drops the tombstones it
    /// covers. Returns whether entries were dropped.
    fn raise_gc_floor(&mut self, floor: u64) -> bool {
        if floor <= self.gc_floor || floor > self.max_version {
            return false;
        }
        self.gc_floor = floor;
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.record.is_some() || e.version > floor);
        self.entries.len() != before
    }

    /// Advances `max_version` over held entries that continue the contiguous run.
    fn advance_contiguous(&mut self) {
        let above: BTreeSet<u64> = self
            .entries
            .values()
            .map(|e| e.version)
            .filter(|v| *v > self.max_version)
            .collect();
        for v in above {
            if self.max_version.checked_add(1) != Some(v) {
                break;
            }
            self.max_version = v;
        }
    }
}

/// The join of one id across two states (see the module docs).
fn resolve<'a>(
    a: Option<&'a Entry>,
    a_gc: u64,
    b: Option<&'a Entry>,
    b_gc: u64,
) -> Option<&'a Entry> {
    let winner = match (a, b) {
        (Some(x), Some(y)) => {
            if y.key() > x.key() {
                y
            } else {
                x
            }
        }
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => return None,
    };
    let alive_in = |held: Option<&Entry>, gc: u64| winner.version > gc || held == Some(winner);
    (alive_in(a, a_gc) && alive_in(b, b_gc)).then_some(winner)
}

/// One change by one owner, small enough to gossip as a broadcast.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The owner (node name) that wrote it.
    pub owner: String,
    /// The owner's epoch.
    pub epoch: u64,
    /// The owner's version stamped on this change.
    pub version: u64,
    /// The service id.
    pub service_id: String,
    /// The new record, or `None` for a deregistration.
    pub record: Option<ServiceRecord>,
}

impl Delta {
    /// Size in the bincode standard encoding (compare with the broadcast budget, ≈ 1 KB).
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
    }
}

/// What a peer knows of one owner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerDigest {
    /// The owner's epoch.
    pub epoch: u64,
    /// Highest contiguously known version (`u64::MAX` marks a forgotten owner epoch).
    pub max_version: u64,
    /// The peer's tombstone floor for this owner.
    pub gc_floor: u64,
}

/// Summary of a catalog for scuttlebutt anti-entropy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Digest {
    /// Per owner, what the sender knows.
    pub owners: BTreeMap<String, OwnerDigest>,
}

/// How an [`OwnerUpdate`] relates to the receiver's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// The sender's whole state of the owner (entries up to `up_to`); replaces an older epoch.
    Reset,
    /// Entries with a version above the given base (the receiver's `max_version`).
    Since(u64),
}

/// Anti-entropy data for one owner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OwnerUpdate {
    /// The owner's epoch.
    pub epoch: u64,
    /// Reset or incremental.
    pub kind: UpdateKind,
    /// The sender's `max_version`.
    pub max_version: u64,
    /// The sender's `gc_floor`.
    pub gc_floor: u64,
    /// Complete up to this version: every sender entry in `(base, up_to]` is included.
    pub up_to: u64,
    /// `(service id, entry)` in ascending version order.
    pub entries: Vec<(String, Entry)>,
}

impl OwnerUpdate {
    fn base(&self) -> u64 {
        match self.kind {
            UpdateKind::Reset => 0,
            UpdateKind::Since(base) => base,
        }
    }

    fn is_well_formed(&self) -> bool {
        let base = self.base();
        base <= self.up_to
            && self.up_to <= self.max_version
            && self.gc_floor <= self.max_version
            && self.entries.iter().all(|(id, e)| {
                e.version > base
                    && e.version <= self.up_to
                    && validate_id(id).is_ok()
                    && e.record
                        .as_ref()
                        .map_or(true, |r| r.service.id == *id && r.validate().is_ok())
            })
    }
}

/// The answer to a [`Digest`]: per owner, what the peer is missing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SyncPayload {
    /// Updates by owner.
    pub owners: BTreeMap<String, OwnerUpdate>,
}

impl SyncPayload {
    /// True if there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Size in the bincode standard encoding.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
    }
}

/// Size of `value` in the bincode standard encoding (`usize::MAX` if it cannot be encoded).
fn encoded_len<T: Serialize>(value: &T) -> usize {
    let mut w = bincode::enc::write::SizeWriter::default();
    match bincode::serde::encode_into_writer(value, &mut w, bincode::config::standard()) {
        Ok(()) => w.bytes_written,
        Err(_) => usize::MAX,
    }
}

/// Slack per owner update for the varints (`up_to`, entry count) that grow while filling it.
const UPDATE_SLACK: usize = 16;
/// Bytes of the payload's own map length prefix.
const PAYLOAD_OVERHEAD: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Forgotten {
    epoch: u64,
    seq: u64,
}

/// The replicated catalog as seen by one node: its own records plus replicas of every other
/// owner's. See the module docs for the merge rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    local: String,
    epoch: u64,
    owners: BTreeMap<String, OwnerState>,
    forgotten: BTreeMap<String, Forgotten>,
    forget_seq: u64,
    newer_local_epoch: Option<u64>,
}

impl Catalog {
    /// An empty catalog for the node `local_owner` at generation `epoch`.
    pub fn new(local_owner: impl Into<String>, epoch: u64) -> Self {
        let local = local_owner.into();
        let mut owners = BTreeMap::new();
        owners.insert(local.clone(), OwnerState::new(epoch));
        Catalog {
            local,
            epoch,
            owners,
            forgotten: BTreeMap::new(),
            forget_seq: 0,
            newer_local_epoch: None,
        }
    }

    /// This node's name.
    pub fn local_owner(&self) -> &str {
        &self.local
    }

    /// This node's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The latest version this node stamped (useful to schedule [`Catalog::collect_tombstones`]).
    pub fn local_max_version(&self) -> u64 {
        self.owners.get(&self.local).map_or(0, |s| s.max_version)
    }

    /// Highest epoch seen in gossip about this node above our own, if any: another incarnation
    /// of this node name is (or was) running with a newer generation; the node should restart
    /// with an epoch above it.
    pub fn newer_local_epoch(&self) -> Option<u64> {
        self.newer_local_epoch
    }

    fn local_mut(&mut self) -> &mut OwnerState {
        let epoch = self.epoch;
        self.owners
            .entry(self.local.clone())
            .or_insert_with(|| OwnerState::new(epoch))
    }

    /// Stamps a local change with the next version and returns its delta.
    fn stamp(&mut self, id: String, record: Option<ServiceRecord>) -> Delta {
        let state = self.local_mut();
        state.max_version = state.max_version.saturating_add(1);
        let version = state.max_version;
        state.entries.insert(
            id.clone(),
            Entry {
                version,
                record: record.clone(),
            },
        );
        Delta {
            owner: self.local.clone(),
            epoch: self.epoch,
            version,
            service_id: id,
            record,
        }
    }

    fn local_live(&self, id: &str) -> Option<(&Entry, &ServiceRecord)> {
        let entry = self.owners.get(&self.local)?.entries.get(id)?;
        Some((entry, entry.record.as_ref()?))
    }

    /// Registers (or replaces) a local service, keyed by `record.service.id`. Re-registering an
    /// identical record does not bump the version; it returns the current delta again.
    pub fn register(&mut self, record: ServiceRecord) -> Result<Delta, CatalogError> {
        record.validate()?;
        let id = record.service.id.clone();
        if let Some((entry, current)) = self.local_live(&id) {
            if *current == record {
                return Ok(Delta {
                    owner: self.local.clone(),
                    epoch: self.epoch,
                    version: entry.version,
                    service_id: id,
                    record: Some(record),
                });
            }
        } else if self
            .owners
            .get(&self.local)
            .is_some_and(|s| s.live_count() >= MAX_SERVICES_PER_OWNER)
        {
            return Err(CatalogError::TooManyServices);
        }
        Ok(self.stamp(id, Some(record)))
    }

    /// Deregisters a local service, leaving a tombstone.
    pub fn deregister(&mut self, id: &str) -> Result<Delta, CatalogError> {
        if self.local_live(id).is_none() {
            return Err(CatalogError::UnknownService(id.to_string()));
        }
        Ok(self.stamp(id.to_string(), None))
    }

    /// Sets the health of a local service; `Ok(None)` if it already had that health.
    pub fn set_health(&mut self, id: &str, health: Health) -> Result<Option<Delta>, CatalogError> {
        let Some((_, current)) = self.local_live(id) else {
            return Err(CatalogError::UnknownService(id.to_string()));
        };
        if current.health == health {
            return Ok(None);
        }
        let mut record = current.clone();
        record.health = health;
        Ok(Some(self.stamp(id.to_string(), Some(record))))
    }

    /// Drops local tombstones with a version `≤ up_to_version` and raises the local `gc_floor`
    /// accordingly; returns how many were dropped. The caller picks the horizon, e.g. the
    /// [`Catalog::local_max_version`] it noted a few minutes ago: peers that have not caught up
    /// to the new floor will get a full reset of this node's state.
    pub fn collect_tombstones(&mut self, up_to_version: u64) -> usize {
        let state = self.local_mut();
        let bound = up_to_version.min(state.max_version);
        let mut highest = 0;
        let before = state.entries.len();
        state.entries.retain(|_, e| {
            let collect = e.record.is_none() && e.version <= bound;
            if collect {
                highest = highest.max(e.version);
            }
            !collect
        });
        state.gc_floor = state.gc_floor.max(highest);
        before - state.entries.len()
    }

    /// Whether remote data about `owner` at `epoch` may be applied (never for the local owner,
    /// nor for a forgotten epoch). Records a newer epoch of the local owner.
    fn accepts_remote(&mut self, owner: &str, epoch: u64) -> bool {
        if owner == self.local {
            if epoch > self.epoch {
                self.newer_local_epoch =
                    Some(self.newer_local_epoch.map_or(epoch, |e| e.max(epoch)));
            }
            return false;
        }
        !owner.is_empty()
            && owner.len() <= MAX_OWNER_NAME_LEN
            && self.forgotten.get(owner).map_or(true, |f| epoch > f.epoch)
    }

    /// Prepares the state of a remote `owner` for data at `epoch`: `None` if we hold a newer
    /// epoch; otherwise the state (fresh if we held none or an older epoch) and whether it is
    /// fresh.
    fn remote_state(&mut self, owner: &str, epoch: u64) -> Option<(&mut OwnerState, bool)> {
        let fresh = match self.owners.get(owner) {
            Some(s) if s.epoch > epoch => return None,
            Some(s) => s.epoch < epoch,
            None => true,
        };
        if fresh {
            self.forgotten.remove(owner);
            self.owners
                .insert(owner.to_string(), OwnerState::new(epoch));
        }
        self.owners.get_mut(owner).map(|s| (s, fresh))
    }

    /// Applies a gossiped delta. Returns true iff it brought new information. Idempotent;
    /// deltas about this node are never applied (see [`Catalog::newer_local_epoch`]).
    pub fn apply_delta(&mut self, delta: Delta) -> bool {
        if delta.version == 0
            || !self.accepts_remote(&delta.owner, delta.epoch)
            || validate_id(&delta.service_id).is_err()
            || delta
                .record
                .as_ref()
                .is_some_and(|r| r.service.id != delta.service_id || r.validate().is_err())
        {
            return false;
        }
        let Some((state, fresh)) = self.remote_state(&delta.owner, delta.epoch) else {
            return false;
        };
        let mut one = BTreeMap::new();
        one.insert(
            delta.service_id,
            Entry {
                version: delta.version,
                record: delta.record,
            },
        );
        let changed = state.join_entries(&one, 0);
        state.advance_contiguous();
        changed || fresh
    }

    /// This catalog's digest, including forgotten owner epochs (as `max_version == u64::MAX`, so
    /// peers do not send them back).
    pub fn digest(&self) -> Digest {
        let mut owners: BTreeMap<String, OwnerDigest> = self
            .forgotten
            .iter()
            .map(|(name, f)| {
                let d = OwnerDigest {
                    epoch: f.epoch,
                    max_version: u64::MAX,
                    gc_floor: 0,
                };
                (name.clone(), d)
            })
            .collect();
        for (name, s) in &self.owners {
            let d = OwnerDigest {
                epoch: s.epoch,
                max_version: s.max_version,
                gc_floor: s.gc_floor,
            };
            owners.insert(name.clone(), d);
        }
        Digest { owners }
    }

    /// What the peer that sent `peer` is missing, within `max_bytes` of bincode-standard
    /// encoding (the result's [`SyncPayload::encoded_len`] never exceeds it). Per owner,
    /// entries go lowest version first; a truncated update is still correct to apply.
    pub fn deltas_for(&self, peer: &Digest, max_bytes: usize) -> SyncPayload {
        let mut budget = max_bytes.saturating_sub(PAYLOAD_OVERHEAD);
        let mut out = BTreeMap::new();
        for (owner, state) in &self.owners {
            let kind = match peer.owners.get(owner) {
                Some(p) if p.epoch > state.epoch => continue,
                Some(p) if p.epoch == state.epoch => {
                    if p.max_version < state.gc_floor {
                        UpdateKind::Reset
                    } else if p.max_version < state.max_version || p.gc_floor < state.gc_floor {
                        UpdateKind::Since(p.max_version.min(state.max_version))
                    } else {
                        continue;
                    }
                }
                _ => UpdateKind::Reset,
            };
            let mut update = OwnerUpdate {
                epoch: state.epoch,
                kind,
                max_version: state.max_version,
                gc_floor: state.gc_floor,
                up_to: 0,
                entries: Vec::new(),
            };
            update.up_to = update.base();
            let header = encoded_len(owner)
                .saturating_add(encoded_len(&update))
                .saturating_add(UPDATE_SLACK);
            if header > budget {
                break;
            }
            budget -= header;
            let base = update.base();
            let mut pending: Vec<(&String, &Entry)> = state
                .entries
                .iter()
                .filter(|(_, e)| e.version > base)
                .collect();
            pending.sort_by_key(|(_, e)| e.version);
            let mut truncated = false;
            for (id, entry) in pending {
                let len = encoded_len(&(id, entry));
                if len > budget {
                    truncated = true;
                    break;
                }
                budget -= len;
                update.up_to = entry.version;
                update.entries.push((id.clone(), entry.clone()));
            }
            if !truncated {
                update.up_to = state.max_version;
            }
            out.insert(owner.clone(), update);
            if truncated {
                break;
            }
        }
        SyncPayload { owners: out }
    }

    /// Merges an anti-entropy payload; returns the owners whose epoch or entries changed.
    /// Malformed owner updates are skipped whole.
    pub fn apply_sync(&mut self, payload: SyncPayload) -> Vec<String> {
        let mut changed = Vec::new();
        for (owner, update) in payload.owners {
            if self.apply_update(&owner, update) {
                changed.push(owner);
            }
        }
        changed
    }

    fn apply_update(&mut self, owner: &str, update: OwnerUpdate) -> bool {
        if !self.accepts_remote(owner, update.epoch) || !update.is_well_formed() {
            return false;
        }
        let Some((state, fresh)) = self.remote_state(owner, update.epoch) else {
            return false;
        };
        let mut chunk: BTreeMap<String, Entry> = BTreeMap::new();
        for (id, entry) in update.entries {
            match chunk.get(&id) {
                Some(e) if e.key() >= entry.key() => {}
                _ => {
                    chunk.insert(id, entry);
                }
            }
        }
        let mut changed = match update.kind {
            // A reset is the sender's state restricted to versions ≤ up_to: a valid state.
            UpdateKind::Reset => {
                state.join(&chunk, update.gc_floor.min(update.up_to), update.up_to)
            }
            UpdateKind::Since(base) => {
                let c = state.join_entries(&chunk, 0);
                if base <= state.max_version && update.gc_floor <= base {
                    state.max_version = state.max_version.max(update.up_to);
                }
                c
            }
        };
        changed |= state.raise_gc_floor(update.gc_floor);
        state.advance_contiguous();
        changed || fresh
    }

    /// Merges another full catalog (the state-based CRDT join): for every owner but this node,
    /// the higher epoch wins and equal epochs join entry-wise; forgotten marks are united.
    /// Returns the owners whose epoch or entries changed (or that were removed).
    pub fn merge(&mut self, other: &Catalog) -> Vec<String> {
        let mut changed = BTreeSet::new();
        for (name, f) in &other.forgotten {
            if *name != self.local {
                self.mark_forgotten(name, f.epoch);
            }
        }
        for (owner, theirs) in &other.owners {
            if !self.accepts_remote(owner, theirs.epoch) {
                continue;
            }
            match self.owners.get_mut(owner) {
                Some(ours) if ours.epoch > theirs.epoch => {}
                Some(ours) if ours.epoch == theirs.epoch => {
                    if ours.join(&theirs.entries, theirs.gc_floor, theirs.max_version) {
                        changed.insert(owner.clone());
                    }
                }
                _ => {
                    self.owners.insert(owner.clone(), theirs.clone());
                    changed.insert(owner.clone());
                }
            }
        }
        self.apply_forgotten(&mut changed);
        changed.into_iter().collect()
    }

    /// Removes owner states covered by a forgotten mark and clears marks made obsolete by a
    /// newer epoch.
    fn apply_forgotten(&mut self, changed: &mut BTreeSet<String>) {
        let local = &self.local;
        let forgotten = &self.forgotten;
        self.owners.retain(|name, s| {
            let drop = name != local && forgotten.get(name).is_some_and(|f| s.epoch <= f.epoch);
            if drop {
                changed.insert(name.clone());
            }
            !drop
        });
        let owners = &self.owners;
        self.forgotten
            .retain(|name, f| owners.get(name).map_or(true, |s| s.epoch <= f.epoch));
    }

    fn mark_forgotten(&mut self, name: &str, epoch: u64) {
        self.forget_seq += 1;
        let seq = self.forget_seq;
        match self.forgotten.get_mut(name) {
            Some(f) if f.epoch >= epoch => {}
            Some(f) => *f = Forgotten { epoch, seq },
            None => {
                self.forgotten
                    .insert(name.to_string(), Forgotten { epoch, seq });
            }
        }
        if self.forgotten.len() > MAX_FORGOTTEN {
            self.prune_forgotten(MAX_FORGOTTEN);
        }
    }

    /// Forgets `owner` up to `epoch` (the node is down or left, past a grace period): removes
    /// its state unless it is newer than `epoch`, and remembers the epoch so stale gossip cannot
    /// resurrect it; a higher epoch (the node restarted) is accepted and clears the mark.
    /// Returns whether a state was removed. The local owner cannot be forgotten.
    pub fn forget_owner(&mut self, owner: &str, epoch: u64) -> bool {
        if owner == self.local {
            return false;
        }
        let removed = match self.owners.get(owner) {
            Some(s) if s.epoch <= epoch => self.owners.remove(owner).is_some(),
            Some(_) => return false,
            None => false,
        };
        self.mark_forgotten(owner, epoch);
        removed
    }

    /// Keeps only the `keep` most recent forgotten marks.
    pub fn prune_forgotten(&mut self, keep: usize) {
        if self.forgotten.len() <= keep {
            return;
        }
        let mut seqs: Vec<u64> = self.forgotten.values().map(|f| f.seq).collect();
        seqs.sort_unstable();
        match seqs.len().checked_sub(keep).and_then(|i| seqs.get(i)) {
            Some(&cut) if keep > 0 => self.forgotten.retain(|_, f| f.seq >= cut),
            _ => self.forgotten.clear(),
        }
    }

    /// The forgotten epoch of `owner`, if marked.
    pub fn forgotten_epoch(&self, owner: &str) -> Option<u64> {
        self.forgotten.get(owner).map(|f| f.epoch)
    }

    /// Number of forgotten marks.
    pub fn forgotten_len(&self) -> usize {
        self.forgotten.len()
    }

    /// The state of one owner.
    pub fn owner(&self, owner: &str) -> Option<&OwnerState> {
        self.owners.get(owner)
    }

    /// All owner states, by name.
    pub fn owners(&self) -> impl Iterator<Item = (&String, &OwnerState)> {
        self.owners.iter()
    }

    /// Live records of one owner, by service id.
    pub fn owner_records(&self, owner: &str) -> Vec<ServiceRecord> {
        self.owners
            .get(owner)
            .map(|s| s.records().cloned().collect())
            .unwrap_or_default()
    }

    /// Live instances of `service_name`, sorted by (owner, service id).
    pub fn instances(&self, service_name: &str) -> Vec<(String, ServiceRecord)> {
        self.instances_filtered(service_name, |_| true)
    }

    /// Like [`Catalog::instances`], keeping only owners for which `keep_owner` is true (e.g.
    /// the members membership considers alive).
    pub fn instances_filtered(
        &self,
        service_name: &str,
        mut keep_owner: impl FnMut(&str) -> bool,
    ) -> Vec<(String, ServiceRecord)> {
        let mut out = Vec::new();
        for (owner, state) in &self.owners {
            let mut records = state
                .records()
                .filter(|r| r.service.name == service_name)
                .peekable();
            if records.peek().is_none() || !keep_owner(owner) {
                continue;
            }
            out.extend(records.map(|r| (owner.clone(), r.clone())));
        }
        out
    }

    /// Service names with their number of live instances.
    pub fn services(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for record in self.owners.values().flat_map(OwnerState::records) {
            *out.entry(record.service.name.clone()).or_insert(0) += 1;
        }
        out
    }
}
