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
    /// The service name (of this many bytes) is empty or too long.
    #[error("service name is {0} bytes; it must be 1..={max} bytes", max = MAX_SERVICE_NAME_LEN)]
    NameLength(usize),
    /// The service name contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "service name contains {0:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
    )]
    NameChar(char),
    /// The service id (of this many bytes) is empty or too long.
    #[error("service id is {0} bytes; it must be 1..={max} bytes", max = MAX_SERVICE_ID_LEN)]
    IdLength(usize),
    /// Too many tags (this many given).
    #[error("service has {0} tags; at most {max} are allowed", max = MAX_TAGS)]
    TooManyTags(usize),
    /// The tag at this position is this many bytes long: too long.
    #[error("tag #{0} is {1} bytes; at most {max} bytes are allowed", max = MAX_TAG_LEN)]
    TagTooLong(usize, usize),
    /// Too many meta entries (this many given).
    #[error("service has {0} meta entries; at most {max} are allowed", max = MAX_META_ENTRIES)]
    TooManyMeta(usize),
    /// The meta map encodes to this many bytes: too large.
    #[error("meta encodes to {0} bytes; at most {max} bytes are allowed", max = MAX_META_ENCODED_LEN)]
    MetaTooLarge(usize),
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
            return Err(CatalogError::NameLength(len));
        }
        if let Some(ch) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(CatalogError::NameChar(ch));
        }
        validate_id(&self.id)?;
        if self.tags.len() > MAX_TAGS {
            return Err(CatalogError::TooManyTags(self.tags.len()));
        }
        if let Some((index, tag)) = self
            .tags
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_TAG_LEN)
        {
            return Err(CatalogError::TagTooLong(index, tag.len()));
        }
        if self.meta.len() > MAX_META_ENTRIES {
            return Err(CatalogError::TooManyMeta(self.meta.len()));
        }
        let len = meta_encoded_len(&self.meta);
        if len > MAX_META_ENCODED_LEN {
            return Err(CatalogError::MetaTooLarge(len));
        }
        Ok(())
    }
}

fn validate_id(id: &str) -> Result<(), CatalogError> {
    let len = id.len();
    if len == 0 || len > MAX_SERVICE_ID_LEN {
        return Err(CatalogError::IdLength(len));
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
                        .is_none_or(|r| r.service.id == *id && r.validate().is_ok())
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

    fn delta(&self, version: u64, service_id: String, record: Option<ServiceRecord>) -> Delta {
        let (owner, epoch) = (self.local.clone(), self.epoch);
        Delta {
            owner,
            epoch,
            version,
            service_id,
            record,
        }
    }

    /// Stamps a local change with the next version and returns its delta.
    fn stamp(&mut self, id: String, record: Option<ServiceRecord>) -> Delta {
        let state = self.local_mut();
        state.max_version = state.max_version.saturating_add(1);
        let entry = Entry {
            version: state.max_version,
            record: record.clone(),
        };
        let version = entry.version;
        state.entries.insert(id.clone(), entry);
        self.delta(version, id, record)
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
                return Ok(self.delta(entry.version, id, Some(record)));
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

    /// Moves this node's records to a newer `epoch` (after the node renewed its identity, or
    /// learnt that gossip carries a newer epoch of its name): the live records are stamped
    /// afresh and tombstones dropped, so the new epoch replaces every replica of the old one
    /// and passes any "forgotten" mark peers hold for the old epoch. Returns `false`, changing
    /// nothing, if `epoch` is not above the current one.
    pub fn rebase(&mut self, epoch: u64) -> bool {
        if epoch <= self.epoch {
            return false;
        }
        let old = self.owners.remove(&self.local).unwrap_or_default();
        self.epoch = epoch;
        if self.newer_local_epoch.is_some_and(|newer| newer <= epoch) {
            self.newer_local_epoch = None;
        }
        let mut fresh = OwnerState::new(epoch);
        for record in old.entries.into_values().filter_map(|e| e.record) {
            fresh.max_version += 1;
            let id = record.service.id.clone();
            fresh.entries.insert(
                id,
                Entry {
                    version: fresh.max_version,
                    record: Some(record),
                },
            );
        }
        self.owners.insert(self.local.clone(), fresh);
        true
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
            && self.forgotten.get(owner).is_none_or(|f| epoch > f.epoch)
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
        let digest = |epoch, max_version, gc_floor| OwnerDigest {
            epoch,
            max_version,
            gc_floor,
        };
        let forgotten = (self.forgotten.iter()).map(|(n, f)| (n, digest(f.epoch, u64::MAX, 0)));
        let known =
            (self.owners.iter()).map(|(n, s)| (n, digest(s.epoch, s.max_version, s.gc_floor)));
        // `known` comes last: an owner state overrides a (stale) mark.
        let owners = forgotten
            .chain(known)
            .map(|(n, d)| (n.clone(), d))
            .collect();
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
        let known = self.owners.len();
        for (owner, update) in payload.owners {
            if self.apply_update(&owner, update) {
                changed.push(owner);
            }
        }
        // Owners inserted one by one leave the map's nodes about half full; a node that
        // just learned most of a large cluster rebuilds it packed (≈ 40 % less memory).
        let added = self.owners.len() - known;
        if added >= 64 && added > known {
            self.owners = std::mem::take(&mut self.owners).into_iter().collect();
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
            .retain(|name, f| owners.get(name).is_none_or(|s| s.epoch <= f.epoch));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc(name: &str, id: &str) -> ServiceRecord {
        ServiceRecord::new(Service::new(name, id, 8080), Health::Passing)
    }

    fn live_ids(c: &Catalog, owner: &str) -> Vec<String> {
        c.owner_records(owner)
            .into_iter()
            .map(|r| r.service.id)
            .collect()
    }

    /// One full anti-entropy pull: `to` sends its digest, `from` answers.
    fn pull(from: &Catalog, to: &mut Catalog, budget: usize) -> usize {
        let payload = from.deltas_for(&to.digest(), budget);
        assert!(
            payload.encoded_len() <= budget.max(1),
            "payload over budget"
        );
        let n = payload.owners.len();
        to.apply_sync(payload);
        n
    }

    #[test]
    fn validation_limits() {
        let ok = svc("web-1.api_x", "i1");
        assert_eq!(ok.validate(), Ok(()));
        let mut s = Service::new("", "i", 1);
        assert_eq!(s.validate(), Err(CatalogError::NameLength(0)));
        s.name = "a".repeat(MAX_SERVICE_NAME_LEN + 1);
        assert!(s.validate().unwrap_err().to_string().contains("1..=128"));
        s.name = "bad name".into();
        assert_eq!(s.validate(), Err(CatalogError::NameChar(' ')));
        s.name = "ok".into();
        s.id = String::new();
        assert_eq!(s.validate(), Err(CatalogError::IdLength(0)));
        s.id = "i".into();
        s.tags = vec!["t".into(); MAX_TAGS + 1];
        assert_eq!(s.validate(), Err(CatalogError::TooManyTags(33)));
        s.tags = vec!["t".repeat(MAX_TAG_LEN + 1)];
        let err = s.validate().unwrap_err();
        assert_eq!(err, CatalogError::TagTooLong(0, 129));
        assert!(err.to_string().contains("at most 128 bytes"));
        s.tags.clear();
        s.meta = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(s.validate(), Err(CatalogError::TooManyMeta(65)));
        // 1 KB of meta is fine, 5 KB is not.
        s.meta = [("blob".to_string(), "x".repeat(1024))].into();
        assert_eq!(s.validate(), Ok(()));
        s.meta = [("blob".to_string(), "x".repeat(5000))].into();
        let err = s.validate().unwrap_err();
        assert!(matches!(err, CatalogError::MetaTooLarge(_)));
        assert!(err.to_string().contains("4096"));
        // The meta size formula is the real bincode size.
        s.meta = (0..40)
            .map(|i| (format!("key{i}"), "v".repeat(i * 10)))
            .collect();
        assert_eq!(meta_encoded_len(&s.meta), encoded_len(&s.meta));
    }

    #[test]
    fn largest_record_fits_wire_bound() {
        let mut s = Service::new("n".repeat(128), "i".repeat(128), u16::MAX);
        s.addr = Some("::1".parse().unwrap());
        s.tags = vec!["t".repeat(MAX_TAG_LEN); MAX_TAGS];
        s.meta = [("m".to_string(), "v".repeat(4090))].into();
        assert_eq!(s.validate(), Ok(()));
        let id = s.id.clone();
        let entry = Entry {
            version: u64::MAX,
            record: Some(ServiceRecord::new(s, Health::Critical)),
        };
        assert!(encoded_len(&(&id, &entry)) <= MAX_ENTRY_WIRE_LEN);
    }

    #[test]
    fn health_names() {
        assert_eq!(Health::Warning.to_string(), "warning");
        assert_eq!(
            serde_json::to_string(&Health::Critical).unwrap(),
            "\"critical\""
        );
        let h: Health = serde_json::from_str("\"passing\"").unwrap();
        assert_eq!(h, Health::Passing);
    }

    #[test]
    fn local_writes() {
        let mut c = Catalog::new("a", 1);
        let d1 = c.register(svc("web", "w1")).unwrap();
        assert_eq!((d1.owner.as_str(), d1.epoch, d1.version), ("a", 1, 1));
        // Identical re-registration does not bump.
        assert_eq!(c.register(svc("web", "w1")).unwrap(), d1);
        assert_eq!(c.set_health("w1", Health::Passing), Ok(None));
        let d2 = c.set_health("w1", Health::Critical).unwrap().unwrap();
        assert_eq!(d2.version, 2);
        assert_eq!(d2.record.as_ref().unwrap().health, Health::Critical);
        let d3 = c.deregister("w1").unwrap();
        assert_eq!((d3.version, d3.record), (3, None));
        assert_eq!(
            c.deregister("w1"),
            Err(CatalogError::UnknownService("w1".into()))
        );
        assert!(c.set_health("nope", Health::Passing).is_err());
        assert!(c.register(svc("bad name", "x")).is_err());
        assert_eq!(c.local_max_version(), 3);
        assert!(d1.encoded_len() < 100);
    }

    #[test]
    fn service_limit_per_owner() {
        let mut c = Catalog::new("a", 1);
        for i in 0..MAX_SERVICES_PER_OWNER {
            c.register(svc("s", &format!("i{i}"))).unwrap();
        }
        assert_eq!(
            c.register(svc("s", "extra")),
            Err(CatalogError::TooManyServices)
        );
        // Updating an existing one is fine; after a deregistration there is room again.
        c.set_health("i0", Health::Warning).unwrap();
        c.register(svc("t", "i1")).unwrap();
        c.deregister("i2").unwrap();
        c.register(svc("s", "extra")).unwrap();
    }

    #[test]
    fn deltas_apply_idempotently_and_in_any_order() {
        let mut a = Catalog::new("a", 1);
        let d1 = a.register(svc("web", "w1")).unwrap();
        let d2 = a.register(svc("web", "w2")).unwrap();
        let d3 = a.deregister("w1").unwrap();
        let mut b = Catalog::new("b", 1);
        assert!(b.apply_delta(d3.clone()));
        assert!(!b.apply_delta(d1.clone()), "older than the tombstone");
        assert_eq!(b.owner("a").unwrap().max_version, 0, "gap before version 3");
        assert!(b.apply_delta(d2.clone()));
        assert!(!b.apply_delta(d2));
        // Version 1 was superseded, so deltas alone cannot prove contiguity; a sync does.
        assert_eq!(b.owner("a").unwrap().max_version, 0);
        assert_eq!(live_ids(&b, "a"), vec!["w2"]);
        let p = a.deltas_for(&b.digest(), 1 << 20);
        assert_eq!(p.owners["a"].kind, UpdateKind::Since(0));
        assert_eq!(b.apply_sync(p), Vec::<String>::new(), "no new entries");
        assert_eq!(b.owner("a"), a.owner("a"));
        // Invalid records are ignored.
        let mut bad = d1;
        bad.version = 9;
        bad.record.as_mut().unwrap().service.name = "no spaces".into();
        assert!(!b.apply_delta(bad));
    }

    #[test]
    fn local_owner_is_never_written_remotely() {
        let mut a = Catalog::new("a", 2);
        a.register(svc("web", "w1")).unwrap();
        let before = a.clone();
        let mut forged = Delta {
            owner: "a".into(),
            epoch: 2,
            version: 7,
            service_id: "w1".into(),
            record: None,
        };
        assert!(!a.apply_delta(forged.clone()));
        forged.epoch = 1;
        assert!(!a.apply_delta(forged.clone()));
        assert_eq!(a, before);
        assert_eq!(a.newer_local_epoch(), None);
        forged.epoch = 5;
        assert!(!a.apply_delta(forged));
        assert_eq!(a.newer_local_epoch(), Some(5));
        assert_eq!(a.owner("a"), before.owner("a"));
        // Nor through sync or merge.
        let mut evil = Catalog::new("a", 9);
        evil.register(svc("x", "x")).unwrap();
        a.apply_sync(evil.deltas_for(&Digest::default(), 1 << 20));
        a.merge(&evil);
        assert_eq!(a.owner("a"), before.owner("a"));
        assert_eq!(a.newer_local_epoch(), Some(9));
    }

    #[test]
    fn higher_epoch_replaces_owner_state() {
        let mut a1 = Catalog::new("a", 1);
        let old = a1.register(svc("web", "old")).unwrap();
        let mut b = Catalog::new("b", 1);
        b.apply_delta(old.clone());
        let mut a2 = Catalog::new("a", 2);
        let new = a2.register(svc("web", "new")).unwrap();
        assert!(b.apply_delta(new));
        assert_eq!(live_ids(&b, "a"), vec!["new"]);
        assert!(!b.apply_delta(old), "older epoch ignored");
        assert_eq!(b.owner("a").unwrap().epoch, 2);
        // A sync from a stale peer does not bring the old epoch back.
        let mut stale = Catalog::new("c", 1);
        pull(&a1, &mut stale, 1 << 20);
        let changed = b.apply_sync(stale.deltas_for(&b.digest(), 1 << 20));
        assert_eq!(changed, vec!["c".to_string()]);
        assert_eq!(live_ids(&b, "a"), vec!["new"]);
    }

    #[test]
    fn sync_truncates_and_resumes() {
        let mut a = Catalog::new("a", 1);
        for i in 0..50 {
            a.register(svc("web", &format!("w{i:02}"))).unwrap();
        }
        for i in 0..10 {
            a.deregister(&format!("w{i:02}")).unwrap();
        }
        let mut b = Catalog::new("b", 1);
        let mut rounds = 0;
        while pull(&a, &mut b, 150) > 0 {
            rounds += 1;
            assert!(rounds < 100);
        }
        assert!(rounds > 5, "the budget must have split the transfer");
        assert_eq!(b.owner("a"), a.owner("a"));
        // Nothing left to send; a tiny budget sends nothing rather than too much.
        assert!(a.deltas_for(&b.digest(), 1 << 20).is_empty());
        assert!(a.deltas_for(&Digest::default(), 10).is_empty());
    }

    #[test]
    fn tombstone_gc_forces_reset_and_replicas_drop_tombstones() {
        let mut a = Catalog::new("a", 1);
        a.register(svc("web", "w1")).unwrap();
        a.register(svc("web", "w2")).unwrap();
        let mut lagging = Catalog::new("l", 1);
        pull(&a, &mut lagging, 1 << 20); // knows w1, w2 at version 2
        let mut current = lagging.clone();
        a.deregister("w1").unwrap(); // v3
        a.register(svc("web", "w3")).unwrap(); // v4
        pull(&a, &mut current, 1 << 20);
        assert_eq!(current.owner("a").unwrap().entries.len(), 3);
        assert_eq!(a.collect_tombstones(3), 1);
        assert_eq!(a.owner("a").unwrap().gc_floor, 3);
        // The lagging peer is below the floor: it gets a reset, and w1 disappears.
        let p = a.deltas_for(&lagging.digest(), 1 << 20);
        assert_eq!(p.owners["a"].kind, UpdateKind::Reset);
        lagging.apply_sync(p);
        assert_eq!(lagging.owner("a"), a.owner("a"));
        // The up-to-date peer learns the floor and drops its copy of the tombstone.
        assert_eq!(pull(&a, &mut current, 1 << 20), 1);
        assert_eq!(current.owner("a"), a.owner("a"));
        // A stale delta cannot resurrect w1 anywhere.
        let stale = Delta {
            owner: "a".into(),
            epoch: 1,
            version: 1,
            service_id: "w1".into(),
            record: Some(svc("web", "w1")),
        };
        assert!(!current.apply_delta(stale.clone()));
        assert!(!lagging.apply_delta(stale));
        let mut old = Catalog::new("o", 1);
        old.owners.insert("a".into(), OwnerState::new(1));
        old.owners.get_mut("a").unwrap().entries.insert(
            "w1".into(),
            Entry {
                version: 1,
                record: Some(svc("web", "w1")),
            },
        );
        current.merge(&old);
        assert_eq!(live_ids(&current, "a"), vec!["w2", "w3"]);
    }

    #[test]
    fn forget_owner_blocks_stale_gossip() {
        let mut a = Catalog::new("a", 1);
        let d = a.register(svc("web", "w")).unwrap();
        let mut b = Catalog::new("b", 1);
        b.apply_delta(d.clone());
        let mut c = b.clone();
        assert!(b.forget_owner("a", 1));
        assert!(!b.forget_owner("b", 1), "cannot forget self");
        assert_eq!(b.forgotten_epoch("a"), Some(1));
        assert!(!b.apply_delta(d));
        assert!(b.apply_sync(c.deltas_for(&b.digest(), 1 << 20)).is_empty());
        assert!(c.deltas_for(&b.digest(), 1 << 20).is_empty(), "digest mark");
        b.merge(&c);
        assert!(b.owner("a").is_none());
        // Merging spreads the mark.
        c.merge(&b);
        assert!(c.owner("a").is_none());
        // The node restarts with a higher epoch: accepted, mark cleared.
        let mut a2 = Catalog::new("a", 2);
        assert!(b.apply_delta(a2.register(svc("web", "w")).unwrap()));
        assert_eq!(b.forgotten_epoch("a"), None);
        assert_eq!(live_ids(&b, "a"), vec!["w"]);
        // Forgetting an older epoch than held changes nothing.
        assert!(!b.forget_owner("a", 1));
        assert!(b.owner("a").is_some());
    }

    #[test]
    fn forgotten_marks_are_bounded() {
        let mut c = Catalog::new("me", 1);
        for i in 0..10 {
            c.forget_owner(&format!("n{i}"), 1);
        }
        c.prune_forgotten(3);
        assert_eq!(c.forgotten_len(), 3);
        assert_eq!(c.forgotten_epoch("n9"), Some(1));
        assert_eq!(c.forgotten_epoch("n6"), None);
        c.prune_forgotten(0);
        assert_eq!(c.forgotten_len(), 0);
        for i in 0..MAX_FORGOTTEN + 5 {
            c.forget_owner(&format!("m{i}"), 1);
        }
        assert_eq!(c.forgotten_len(), MAX_FORGOTTEN);
    }

    #[test]
    fn queries() {
        let mut c = Catalog::new("b", 1);
        c.register(svc("web", "w2")).unwrap();
        c.register(svc("db", "d1")).unwrap();
        let mut a = Catalog::new("a", 1);
        a.register(svc("web", "w9")).unwrap();
        a.register(svc("web", "w1")).unwrap();
        a.register(svc("web", "gone")).unwrap();
        a.deregister("gone").unwrap();
        c.merge(&a);
        let ids: Vec<(String, String)> = c
            .instances("web")
            .into_iter()
            .map(|(o, r)| (o, r.service.id))
            .collect();
        let want = [("a", "w1"), ("a", "w9"), ("b", "w2")];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(o, i)| (o.to_string(), i.to_string()))
            .collect();
        assert_eq!(ids, want);
        assert_eq!(c.instances_filtered("web", |o| o != "a").len(), 1);
        assert!(c.instances("nope").is_empty());
        let services: Vec<(String, usize)> = c.services().into_iter().collect();
        assert_eq!(services, vec![("db".into(), 1), ("web".into(), 3)]);
        assert_eq!(live_ids(&c, "a"), vec!["w1", "w9"]);
        assert!(c.owner_records("zz").is_empty());
    }

    // ---------------------------------------------------------------- property tests

    fn arb_record() -> impl Strategy<Value = ServiceRecord> {
        (
            prop::sample::select(vec!["api", "db", "web"]),
            prop::sample::select(vec!["a", "b", "c", "d"]),
            prop::option::of(any::<[u8; 4]>()),
            any::<u16>(),
            prop::collection::vec("[a-z]{0,4}", 0..3),
            prop::collection::btree_map("[a-z]{1,3}", "[a-z]{0,5}", 0..3),
            prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical]),
        )
            .prop_map(|(name, id, addr, port, tags, meta, health)| {
                let mut s = Service::new(name, id, port);
                s.addr = addr.map(IpAddr::from);
                s.tags = tags;
                s.meta = meta;
                ServiceRecord::new(s, health)
            })
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (1u64..12, prop::option::of(arb_record()))
            .prop_map(|(version, record)| Entry { version, record })
    }

    fn arb_owner_state() -> impl Strategy<Value = OwnerState> {
        (
            1u64..3,
            0u64..12,
            0u64..12,
            prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from),
                arb_entry(),
                0..4,
            ),
        )
            .prop_map(|(epoch, max_version, gc_floor, entries)| OwnerState {
                epoch,
                max_version,
                gc_floor,
                entries,
            })
    }

    fn join_states(a: &OwnerState, b: &OwnerState) -> OwnerState {
        if a.epoch != b.epoch {
            return if a.epoch > b.epoch {
                a.clone()
            } else {
                b.clone()
            };
        }
        let mut out = a.clone();
        out.join(&b.entries, b.gc_floor, b.max_version);
        out
    }

    /// An observer catalog (it owns nothing) holding arbitrary replicas and marks.
    fn arb_catalog(me: &'static str) -> impl Strategy<Value = Catalog> {
        (
            prop::collection::btree_map(
                prop::sample::select(vec!["n0", "n1", "n2"]).prop_map(String::from),
                arb_owner_state(),
                0..3,
            ),
            prop::collection::btree_map(
                prop::sample::select(vec!["n0", "n1", "n2"]).prop_map(String::from),
                0u64..3,
                0..2,
            ),
        )
            .prop_map(move |(owners, marks)| {
                let mut c = Catalog::new(me, 1);
                c.owners.extend(owners);
                for (name, epoch) in marks {
                    c.mark_forgotten(&name, epoch);
                }
                c.apply_forgotten(&mut BTreeSet::new());
                c
            })
    }

    fn merged(a: &Catalog, b: &Catalog) -> Catalog {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    /// What the laws are about: owner → (epoch, entries), plus the floors and versions.
    fn observable(c: &Catalog) -> BTreeMap<String, OwnerState> {
        c.owners.clone()
    }

    proptest! {
        #[test]
        fn join_is_a_semilattice(a in arb_owner_state(), b in arb_owner_state(), c in arb_owner_state()) {
            prop_assert_eq!(join_states(&a, &b), join_states(&b, &a));
            prop_assert_eq!(
                join_states(&a, &join_states(&b, &c)),
                join_states(&join_states(&a, &b), &c)
            );
            prop_assert_eq!(join_states(&a, &a), a);
        }

        #[test]
        fn catalog_merge_laws(a in arb_catalog("oa"), b in arb_catalog("ob"), c in arb_catalog("oc")) {
            prop_assert_eq!(observable(&merged(&a, &b)), observable(&merged(&b, &a)));
            prop_assert_eq!(
                observable(&merged(&a, &merged(&b, &c))),
                observable(&merged(&merged(&a, &b), &c))
            );
            prop_assert_eq!(observable(&merged(&a, &a)), observable(&a));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Register(usize, ServiceRecord),
        Deregister(usize, &'static str),
        SetHealth(usize, &'static str, Health),
        Gc(usize, u64),
        Deliver(usize, usize),
        Sync(usize, usize, usize),
        Merge(usize, usize),
        Restart(usize),
    }

    const NODES: usize = 3;

    fn arb_op() -> impl Strategy<Value = Op> {
        let node = 0..NODES;
        let id = prop::sample::select(vec!["a", "b", "c", "d"]);
        let health = prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical]);
        prop_oneof![
            4 => (node.clone(), arb_record()).prop_map(|(n, r)| Op::Register(n, r)),
            2 => (node.clone(), id.clone()).prop_map(|(n, i)| Op::Deregister(n, i)),
            2 => (node.clone(), id, health).prop_map(|(n, i, h)| Op::SetHealth(n, i, h)),
            1 => (node.clone(), 0u64..4).prop_map(|(n, back)| Op::Gc(n, back)),
            4 => (any::<usize>(), node.clone()).prop_map(|(d, n)| Op::Deliver(d, n)),
            3 => (node.clone(), node.clone(), 0usize..1500).prop_map(|(f, t, b)| Op::Sync(f, t, b)),
            1 => (node.clone(), node.clone()).prop_map(|(f, t)| Op::Merge(f, t)),
            1 => node.prop_map(Op::Restart),
        ]
    }

    fn run_ops(ops: &[Op]) -> Vec<Catalog> {
        let mut cats: Vec<Catalog> = (0..NODES)
            .map(|i| Catalog::new(format!("n{i}"), 1))
            .collect();
        let mut network: Vec<Delta> = Vec::new();
        for op in ops {
            match op.clone() {
                Op::Register(n, r) => network.extend(cats[n].register(r).ok()),
                Op::Deregister(n, id) => network.extend(cats[n].deregister(id).ok()),
                Op::SetHealth(n, id, h) => network.extend(cats[n].set_health(id, h).ok().flatten()),
                Op::Gc(n, back) => {
                    let v = cats[n].local_max_version().saturating_sub(back);
                    cats[n].collect_tombstones(v);
                }
                Op::Deliver(d, n) => {
                    if !network.is_empty() {
                        let delta = network[d % network.len()].clone();
                        cats[n].apply_delta(delta);
                    }
                }
                Op::Sync(f, t, budget) => {
                    let from = cats[f].clone();
                    pull(&from, &mut cats[t], budget);
                }
                Op::Merge(f, t) => {
                    let from = cats[f].clone();
                    cats[t].merge(&from);
                }
                Op::Restart(n) => {
                    let epoch = cats[n].epoch() + 1;
                    cats[n] = Catalog::new(format!("n{n}"), epoch);
                }
            }
            // A node's own state is only ever changed by itself.
            for c in &cats {
                assert_eq!(c.owner(c.local_owner()).map(|s| s.epoch), Some(c.epoch()));
            }
        }
        cats
    }

    fn assert_converged(cats: &[Catalog]) -> Result<(), TestCaseError> {
        for owner in cats {
            let truth = owner.owner(owner.local_owner()).unwrap();
            for c in cats {
                let copy = c.owner(owner.local_owner());
                prop_assert!(copy.is_some());
                let copy = copy.unwrap();
                prop_assert_eq!(copy.epoch, truth.epoch);
                prop_assert_eq!(&copy.entries, &truth.entries);
                prop_assert_eq!(copy.max_version, truth.max_version);
                prop_assert_eq!(c.owners.len(), NODES);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_histories_converge(ops in prop::collection::vec(arb_op(), 0..80)) {
            let mut cats = run_ops(&ops);
            for _ in 0..2 {
                for f in 0..NODES {
                    for t in 0..NODES {
                        let from = cats[f].clone();
                        pull(&from, &mut cats[t], 1 << 20);
                    }
                }
            }
            assert_converged(&cats)?;
        }

        #[test]
        fn truncated_syncs_alone_converge(
            ops in prop::collection::vec(arb_op(), 0..60),
            budget in 400usize..3000,
        ) {
            let mut cats = run_ops(&ops);
            let mut rounds = 0;
            loop {
                let mut sent = 0;
                for f in 0..NODES {
                    for t in 0..NODES {
                        let from = cats[f].clone();
                        sent += pull(&from, &mut cats[t], budget);
                    }
                }
                if sent == 0 {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds < 200, "no progress");
            }
            assert_converged(&cats)?;
        }
    }

    // ---------------------------------------------------------------- wire

    fn arb_delta() -> impl Strategy<Value = Delta> {
        (
            "\\PC{0,12}",
            any::<u64>(),
            any::<u64>(),
            "\\PC{0,12}",
            prop::option::of(arb_record()),
        )
            .prop_map(|(owner, epoch, version, service_id, record)| Delta {
                owner,
                epoch,
                version,
                service_id,
                record,
            })
    }

    fn arb_digest() -> impl Strategy<Value = Digest> {
        prop::collection::btree_map(
            "\\PC{0,8}",
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(epoch, max_version, gc_floor)| OwnerDigest {
                    epoch,
                    max_version,
                    gc_floor,
                },
            ),
            0..5,
        )
        .prop_map(|owners| Digest { owners })
    }

    fn arb_payload() -> impl Strategy<Value = SyncPayload> {
        let update = (
            any::<u64>(),
            prop::option::of(any::<u64>()),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(("\\PC{0,6}", arb_entry()), 0..4),
        )
            .prop_map(
                |(epoch, base, max_version, gc_floor, up_to, entries)| OwnerUpdate {
                    epoch,
                    kind: base.map_or(UpdateKind::Reset, UpdateKind::Since),
                    max_version,
                    gc_floor,
                    up_to,
                    entries,
                },
            );
        prop::collection::btree_map("\\PC{0,8}", update, 0..4)
            .prop_map(|owners| SyncPayload { owners })
    }

    const LIMIT: usize = 64 * 1024;

    fn roundtrip<T>(value: &T) -> Result<(), TestCaseError>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(bytes.len(), encoded_len(value));
        let cfg = bincode::config::standard().with_limit::<LIMIT>();
        let (back, used): (T, usize) = bincode::serde::decode_from_slice(&bytes, cfg)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, value);
        Ok(())
    }

    fn decode<T: serde::de::DeserializeOwned>(
        bytes: &[u8],
    ) -> Result<T, bincode::error::DecodeError> {
        let cfg = bincode::config::standard().with_limit::<LIMIT>();
        bincode::serde::decode_from_slice(bytes, cfg).map(|(v, _)| v)
    }

    proptest! {
        #[test]
        fn wire_roundtrip(d in arb_delta(), g in arb_digest(), p in arb_payload()) {
            roundtrip(&d)?;
            roundtrip(&g)?;
            roundtrip(&p)?;
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Delta>(&bytes);
            let _ = decode::<Digest>(&bytes);
            if let Ok(p) = decode::<SyncPayload>(&bytes) {
                // Whatever decodes is safe to apply.
                let mut c = Catalog::new("n0", 1);
                c.apply_sync(p);
            }
            if let Ok(d) = decode::<Delta>(&bytes) {
                let mut c = Catalog::new("n0", 1);
                c.apply_delta(d);
            }
        }

        #[test]
        fn truncated_encodings_are_errors(p in arb_payload(), cut in any::<prop::sample::Index>()) {
            let bytes = bincode::serde::encode_to_vec(&p, bincode::config::standard()).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(decode::<SyncPayload>(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn huge_length_prefix_is_rejected() {
        // A map claiming u64::MAX entries, and a string claiming 2^60 bytes.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Digest>(&bytes).is_err());
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<Delta>(&bytes).is_err());
    }

    #[test]
    fn rebase_moves_local_records_to_a_newer_epoch() {
        let mut a = Catalog::new("a", 1);
        a.register(ServiceRecord::new(
            Service::new("web", "w1", 80),
            Health::Passing,
        ))
        .unwrap();
        a.register(ServiceRecord::new(
            Service::new("web", "w2", 81),
            Health::Passing,
        ))
        .unwrap();
        a.deregister("w2").unwrap();
        let mut b = Catalog::new("b", 1);
        b.apply_sync(a.deltas_for(&b.digest(), 1 << 20));
        assert!(b.forget_owner("a", 1));
        assert!(!a.rebase(1));
        assert!(a.rebase(2));
        assert_eq!(a.owner("a").unwrap().entries.len(), 1);
        b.apply_sync(a.deltas_for(&b.digest(), 1 << 20));
        assert_eq!(b.instances("web").len(), 1);
        assert_eq!(b.owner("a").unwrap().epoch, 2);
    }
}
