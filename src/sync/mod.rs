//! Replication of the state between nodes: deltas broadcast on SWIM packets, and anti-entropy
//! exchanges (digest, then what the peer lacks) over TCP that repair whatever a broadcast
//! missed: late joiners, healed partitions, lost packets.
//!
//! foca's custom-broadcast handler must decide whether an item is news, so it needs the
//! state; foca owns the handler and offers no way back to it. The state therefore sits
//! behind an `Arc<Mutex<_>>` shared by the handler and the driver task. Both run on the
//! driver task, so the lock is never contended.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

mod hints;

pub use hints::{HintMemory, MAX_REMEMBERED_HINTS};

use serde::{Deserialize, Serialize};

use crate::membership::{BroadcastBacklog, MAX_BROADCAST_ITEM};
use crate::state::catalog::{Catalog, Delta, Digest, SyncPayload};
use crate::state::config::{self, Change, ConfigStore, ConfigStoreOptions, Entry, Version};
use crate::wire::{self, WireError};

/// Most bytes of catalog records, and of config entries, sent in one anti-entropy message;
/// the rest follows next round.
pub const SYNC_BUDGET: usize = 4 * 1024 * 1024;
/// Most config keys one anti-entropy message may list or ask for.
pub const MAX_SYNC_KEYS: usize = 100_000;

/// Milliseconds since the Unix epoch, as the node's wall clock says.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> WallClock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// The replicated state of one node.
pub struct Replicated {
    /// The service catalog.
    pub catalog: Catalog,
    /// The configuration store.
    pub config: ConfigStore,
    clock: WallClock,
    version: u64,
    behind: BTreeSet<String>,
    hints: HintMemory,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("catalog", &self.catalog)
            .field("config_keys", &self.config.len())
            .field("version", &self.version)
            .finish()
    }
}

impl Replicated {
    /// State of the node `name`, whose records start at `epoch`. Config writes are stamped
    /// `name#epoch` (a writer id unique per incarnation) with times from `clock`.
    pub fn new(name: &str, epoch: u64, config: ConfigStoreOptions, clock: WallClock) -> Self {
        Replicated {
            catalog: Catalog::new(name, epoch),
            config: ConfigStore::with_options(format!("{name}#{epoch}"), config),
            clock,
            version: 0,
            behind: BTreeSet::new(),
            hints: HintMemory::default(),
        }
    }

    /// The wall clock's current time, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// A counter that grows with every applied change, local or remote.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Keeps the catalog's epoch at the identity's `generation` (above any newer epoch of
    /// ours seen in the cluster). When the epoch moves, returns the broadcast item (a
    /// catalog hint) that re-announces this node's records under it.
    pub fn follow_generation(&mut self, generation: u64) -> Option<Vec<u8>> {
        let target = match self.catalog.newer_local_epoch() {
            Some(newer) if newer >= generation => newer + 1,
            _ => generation,
        };
        if !self.catalog.rebase(target) {
            return None;
        }
        self.touch();
        let hint = GossipItem::CatalogHint {
            owner: self.catalog.local_owner().to_string(),
            epoch: self.catalog.epoch(),
            version: self.catalog.local_max_version(),
        };
        let mut item = Vec::new();
        // A hint is a name and three integers: it always fits.
        wire::encode_datagram_into(&hint, &mut item, MAX_BROADCAST_ITEM).ok()?;
        Some(item)
    }

    /// Records that the state changed.
    pub fn touch(&mut self) {
        self.version += 1;
    }

    /// Owners whose broadcast hints say this node is behind; cleared by the call.
    pub fn take_behind(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.behind)
    }

    /// What this node has, for a peer to compare.
    pub fn digest(&self) -> SyncDigest {
        SyncDigest {
            catalog: self.catalog.digest(),
            config: self.config.digest(),
        }
    }

    /// Step 2 of an exchange (on the answering side): the catalog records the asker lacks,
    /// our digest, and the versions of our config keys in the buckets that differ.
    pub fn answer_digest(&self, peer: &SyncDigest) -> SyncReply {
        let buckets = self.config.diff_buckets(&peer.config);
        let mut versions = self.config.bucket_versions(&buckets);
        versions.truncate(MAX_SYNC_KEYS);
        SyncReply {
            catalog: self.catalog.deltas_for(&peer.catalog, SYNC_BUDGET),
            digest: self.digest(),
            config_buckets: buckets,
            config_versions: versions,
        }
    }

    /// Step 3 (on the asking side): merge the reply's records, and prepare what the peer
    /// lacks plus the config keys we want from it.
    pub fn apply_reply(&mut self, reply: SyncReply) -> SyncPush {
        if !self.catalog.apply_sync(reply.catalog).is_empty() {
            self.touch();
        }
        let (config_entries, _) = self.config.entries_newer_than(
            &reply.config_buckets,
            &reply.config_versions,
            SYNC_BUDGET,
        );
        let mut config_wanted: Vec<String> = reply
            .config_versions
            .into_iter()
            .filter(|(key, version)| self.config.entry(key).is_none_or(|e| e.version < *version))
            .map(|(key, _)| key)
            .collect();
        config_wanted.truncate(MAX_SYNC_KEYS);
        SyncPush {
            catalog: self.catalog.deltas_for(&reply.digest.catalog, SYNC_BUDGET),
            config_entries,
            config_wanted,
        }
    }

    /// Step 4 (on the answering side): merge what the asker sent, and send the config
    /// entries it asked for.
    pub fn apply_push(&mut self, push: SyncPush) -> SyncPushReply {
        if !self.catalog.apply_sync(push.catalog).is_empty() {
            self.touch();
        }
        self.apply_config(push.config_entries);
        let mut entries = Vec::new();
        let mut used = 0usize;
        for key in push.config_wanted.iter().take(MAX_SYNC_KEYS) {
            if let Some(entry) = self.config.entry(key) {
                used += entry.wire_size(key);
                if used > SYNC_BUDGET && !entries.is_empty() {
                    break;
                }
                entries.push((key.clone(), entry.clone()));
            }
        }
        SyncPushReply {
            config_entries: entries,
        }
    }

    /// Step 5 (on the asking side): merge the config entries we asked for.
    pub fn apply_push_reply(&mut self, reply: SyncPushReply) {
        self.apply_config(reply.config_entries);
    }

    fn apply_config(&mut self, entries: Vec<(String, Entry)>) -> Vec<Change> {
        let now = self.now_ms();
        let changes = self
            .config
            .apply_many(entries.into_iter().take(MAX_SYNC_KEYS), now);
        if !changes.is_empty() {
            self.touch();
        }
        changes
    }

    /// Writes a config key locally.
    pub fn config_set(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
    ) -> Result<Change, config::ConfigError> {
        let now = self.now_ms();
        let change = self.config.set_with_flags(key, value, flags, now)?;
        self.touch();
        Ok(change)
    }

    /// Deletes a config key locally; `None` if it was absent.
    pub fn config_delete(&mut self, key: &str) -> Result<Option<Change>, config::ConfigError> {
        let now = self.now_ms();
        let change = self.config.delete(key, now)?;
        if change.is_some() {
            self.touch();
        }
        Ok(change)
    }

    /// The broadcast item announcing a local config change: the entry itself when it fits,
    /// otherwise a hint that makes receivers fetch it from `origin` over TCP.
    pub fn config_broadcast_item(change: &Change, origin: &str) -> Result<Vec<u8>, WireError> {
        let mut item = Vec::new();
        let full = GossipItem::Config {
            key: change.key.clone(),
            entry: change.entry(),
        };
        match wire::encode_datagram_into(&full, &mut item, MAX_BROADCAST_ITEM) {
            Ok(()) => Ok(item),
            Err(WireError::TooLarge { .. }) => {
                item.clear();
                let hint = GossipItem::ConfigHint {
                    key: change.key.clone(),
                    version: change.version.clone(),
                    origin: origin.to_string(),
                };
                wire::encode_datagram_into(&hint, &mut item, MAX_BROADCAST_ITEM)?;
                Ok(item)
            }
            Err(error) => Err(error),
        }
    }

    /// The broadcast item announcing a local catalog change: the delta itself when it fits,
    /// otherwise a small hint that makes receivers fetch it over TCP.
    pub fn broadcast_item(delta: &Delta) -> Result<Vec<u8>, WireError> {
        let mut item = Vec::new();
        match wire::encode_datagram_into(
            &GossipItem::Catalog(delta.clone()),
            &mut item,
            MAX_BROADCAST_ITEM,
        ) {
            Ok(()) => Ok(item),
            Err(WireError::TooLarge { .. }) => {
                item.clear();
                let hint = GossipItem::CatalogHint {
                    owner: delta.owner.clone(),
                    epoch: delta.epoch,
                    version: delta.version,
                };
                wire::encode_datagram_into(&hint, &mut item, MAX_BROADCAST_ITEM)?;
                Ok(item)
            }
            Err(error) => Err(error),
        }
    }
}

/// Replicated state shared by the driver and foca's broadcast handler.
pub type SharedState = Arc<Mutex<Replicated>>;

/// Locks the shared state; a panic elsewhere cannot make the state unreadable.
pub fn lock(state: &SharedState) -> MutexGuard<'_, Replicated> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// First message of an anti-entropy exchange: what the sender has.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncDigest {
    /// Catalog versions per owner.
    pub catalog: Digest,
    /// Config bucket hashes.
    pub config: config::Digest,
}

/// Answer to a [`SyncDigest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReply {
    /// Catalog records the asker lacks.
    pub catalog: SyncPayload,
    /// What the answering node has.
    pub digest: SyncDigest,
    /// Config buckets whose hashes differ.
    pub config_buckets: Vec<u16>,
    /// Keys and versions the answering node holds in those buckets.
    pub config_versions: Vec<(String, Version)>,
}

/// The asker's second message: what the answering node lacks, and which keys it wants.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncPush {
    /// Catalog records the answering node lacks.
    pub catalog: SyncPayload,
    /// Config entries newer than the answering node's.
    pub config_entries: Vec<(String, Entry)>,
    /// Config keys the asker lacks or holds older.
    pub config_wanted: Vec<String>,
}

/// The config entries the asker wanted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncPushReply {
    /// Entries, within [`SYNC_BUDGET`].
    pub config_entries: Vec<(String, Entry)>,
}

impl SyncDigest {
    /// A 64-bit summary: peers whose fingerprints match hold the same state, so an idle
    /// cluster's anti-entropy costs a few bytes instead of whole digests.
    pub fn fingerprint(&self) -> u64 {
        match bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            Ok(bytes) => wire::stable_hash(&bytes),
            // Unreachable for these types; a fingerprint that never matches is safe.
            Err(_) => u64::MAX,
        }
    }
}

/// An item carried by SWIM packets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GossipItem {
    /// One catalog change.
    Catalog(Delta),
    /// A catalog change too big to gossip: fetch it from the owner over TCP.
    CatalogHint {
        /// Owner of the change.
        owner: String,
        /// Owner's epoch.
        epoch: u64,
        /// Version of the change.
        version: u64,
    },
    /// One config write or delete.
    Config {
        /// The key.
        key: String,
        /// Its new entry.
        entry: Entry,
    },
    /// A config write too big to gossip: fetch it from `origin` over TCP.
    ConfigHint {
        /// The key.
        key: String,
        /// Version of the write.
        version: Version,
        /// Name of the node that wrote it.
        origin: String,
    },
}

/// Identifies a broadcast so that a newer change of the same record replaces an older one
/// still waiting in foca's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipKey {
    /// A catalog change (or hint, with an empty record).
    Catalog {
        /// Owner node.
        owner: String,
        /// Service id, or empty for a hint.
        record: String,
        /// Owner's epoch.
        epoch: u64,
        /// Version.
        version: u64,
    },
    /// A config write (or hint).
    Config {
        /// The key.
        key: String,
        /// Whether this is a hint.
        hint: bool,
        /// Version of the write.
        version: Version,
    },
}

impl foca::Invalidates for GossipKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                GossipKey::Catalog {
                    owner,
                    record,
                    epoch,
                    version,
                },
                GossipKey::Catalog {
                    owner: other_owner,
                    record: other_record,
                    epoch: other_epoch,
                    version: other_version,
                },
            ) => {
                owner == other_owner
                    && record == other_record
                    && (epoch, version) >= (other_epoch, other_version)
            }
            (
                GossipKey::Config { key, hint, version },
                GossipKey::Config {
                    key: other_key,
                    hint: other_hint,
                    version: other_version,
                },
            ) => key == other_key && hint == other_hint && version >= other_version,
            _ => false,
        }
    }
}

/// foca's handler of custom broadcasts: applies catalog deltas to the shared state and lets
/// foca pass on only what was news.
#[derive(Debug, Clone)]
pub struct StateBroadcasts {
    state: SharedState,
    backlog: BroadcastBacklog,
}

impl StateBroadcasts {
    /// A handler applying broadcasts to `state`.
    pub fn new(state: SharedState) -> Self {
        StateBroadcasts {
            state,
            backlog: BroadcastBacklog::default(),
        }
    }

    /// A handler that stops passing news on while `backlog` is full (the news is applied
    /// still; anti-entropy spreads it). Give the same `backlog` to
    /// [`Membership::share_backlog`](crate::membership::Membership::share_backlog).
    pub fn with_backlog(state: SharedState, backlog: BroadcastBacklog) -> Self {
        StateBroadcasts { state, backlog }
    }
}

/// Generic over the identity: only whether an item is this node's own matters here.
impl<T: foca::Identity> foca::BroadcastHandler<T> for StateBroadcasts {
    type Key = GossipKey;
    type Error = WireError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&T>,
    ) -> Result<Option<GossipKey>, WireError> {
        let (item, used): (GossipItem, usize) = wire::decode_datagram_prefix(data)?;
        if used != data.len() {
            return Err(WireError::Trailing(data.len() - used));
        }
        let mut state = lock(&self.state);
        // Our own items are already applied; they are news to everyone else.
        let local = sender.is_none();
        let (key, news) = match item {
            GossipItem::Catalog(delta) => {
                let key = GossipKey::Catalog {
                    owner: delta.owner.clone(),
                    record: delta.service_id.clone(),
                    epoch: delta.epoch,
                    version: delta.version,
                };
                let news = local || state.catalog.apply_delta(delta);
                if news && !local {
                    state.touch();
                }
                (key, news)
            }
            GossipItem::CatalogHint {
                owner,
                epoch,
                version,
            } => {
                let known = state
                    .catalog
                    .owner(&owner)
                    .map_or((0, 0), |o| (o.epoch, o.max_version));
                let forgotten = state
                    .catalog
                    .forgotten_epoch(&owner)
                    .is_some_and(|e| e >= epoch);
                // News once: a hint whose change a fetch could not bring must not
                // circulate (and start exchanges) for ever; see `hints`.
                let news = local
                    || (owner != state.catalog.local_owner()
                        && !forgotten
                        && (epoch, version) > known
                        && state.hints.catalog_first_seen(&owner, epoch, version));
                if news && !local {
                    state.behind.insert(owner.clone());
                }
                let key = GossipKey::Catalog {
                    owner,
                    record: String::new(),
                    epoch,
                    version,
                };
                (key, news)
            }
            GossipItem::Config { key, entry } => {
                let gossip_key = GossipKey::Config {
                    key: key.clone(),
                    hint: false,
                    version: entry.version.clone(),
                };
                let news = local || {
                    let now = state.now_ms();
                    let applied = state.config.apply(&key, entry, now).is_some();
                    if applied {
                        state.touch();
                    }
                    applied
                };
                (gossip_key, news)
            }
            GossipItem::ConfigHint {
                key,
                version,
                origin,
            } => {
                let news = local
                    || (state
                        .config
                        .entry(&key)
                        .is_none_or(|entry| entry.version < version)
                        && state.hints.config_first_seen(&key, &version));
                if news && !local {
                    state.behind.insert(origin);
                }
                let gossip_key = GossipKey::Config {
                    key,
                    hint: true,
                    version,
                };
                (gossip_key, news)
            }
        };
        // Our own items are refused earlier, by `Membership::add_broadcast`.
        if news && !local && self.backlog.is_full() {
            return Ok(None);
        }
        Ok(news.then_some(key))
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::*;
    use crate::membership::{Membership, MembershipError, NodeId, Profile, MAX_BROADCAST_BACKLOG};
    use std::time::Instant;

    /// A node's replicated state and membership sharing one backlog count, as the driver
    /// sets them up.
    fn node(name: &str, port: u16) -> (SharedState, Membership<StateBroadcasts>) {
        let clock: WallClock = Arc::new(|| 1_800_000_000_000);
        let state: SharedState = Arc::new(Mutex::new(Replicated::new(
            name,
            1,
            ConfigStoreOptions::default(),
            clock,
        )));
        let backlog = BroadcastBacklog::default();
        let id = NodeId {
            name: name.into(),
            addr: ([127, 0, 0, 1], port).into(),
            generation: 1,
        };
        let handler = StateBroadcasts::with_backlog(state.clone(), backlog.clone());
        let mut membership =
            Membership::with_broadcasts(id, Profile::Local, 7, Instant::now(), handler);
        membership.share_backlog(backlog);
        (state, membership)
    }

    fn write(state: &SharedState, key: &str) -> Vec<u8> {
        let change = lock(state).config.set(key, "v", 1_800_000_000_000).unwrap();
        Replicated::config_broadcast_item(&change, "a").unwrap()
    }

    #[test]
    fn a_full_broadcast_queue_refuses_local_items_and_stops_relaying_news() {
        // Alone, a node never sends its broadcasts: they stay queued.
        let (state, mut alone) = node("a", 1);
        for i in 0..MAX_BROADCAST_BACKLOG {
            let item = write(&state, &format!("k/{i}"));
            assert!(alone.add_broadcast(&item, Instant::now()).unwrap());
        }
        let item = write(&state, "k/over");
        assert!(matches!(
            alone.add_broadcast(&item, Instant::now()),
            Err(MembershipError::BacklogFull)
        ));

        // Received news is applied but not queued for relaying while the queue is full.
        let (other_state, _) = node("b", 2);
        let backlog = BroadcastBacklog::default();
        let mut relay = StateBroadcasts::with_backlog(other_state.clone(), backlog.clone());
        let sender = alone.identity().clone();
        let first = write(&state, "relay/first");
        assert!(
            foca::BroadcastHandler::receive_item(&mut relay, &first, Some(&sender))
                .unwrap()
                .is_some(),
            "news is relayed while there is room"
        );
        backlog.set(MAX_BROADCAST_BACKLOG);
        let second = write(&state, "relay/second");
        assert!(
            foca::BroadcastHandler::receive_item(&mut relay, &second, Some(&sender))
                .unwrap()
                .is_none(),
            "a full queue relays nothing"
        );
        assert!(
            lock(&other_state).config.entry("relay/second").is_some(),
            "but applies it"
        );
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;
    use crate::membership::NodeId;
    use crate::state::hlc::Timestamp;

    fn receiver() -> (SharedState, StateBroadcasts) {
        let clock: WallClock = Arc::new(|| 1_800_000_000_000);
        let state: SharedState = Arc::new(Mutex::new(Replicated::new(
            "b",
            1,
            ConfigStoreOptions::default(),
            clock,
        )));
        (state.clone(), StateBroadcasts::new(state))
    }

    fn sender() -> NodeId {
        NodeId {
            name: "c".into(),
            addr: ([127, 0, 0, 1], 3).into(),
            generation: 1,
        }
    }

    fn item(item: &GossipItem) -> Vec<u8> {
        let mut bytes = Vec::new();
        wire::encode_datagram_into(item, &mut bytes, MAX_BROADCAST_ITEM).unwrap();
        bytes
    }

    fn receive(handler: &mut StateBroadcasts, bytes: &[u8]) -> bool {
        foca::BroadcastHandler::receive_item(handler, bytes, Some(&sender()))
            .unwrap()
            .is_some()
    }

    /// The storm of issue 18: a hint whose change no fetch brings (here: nothing is fetched
    /// at all) was news at every receipt, so it was relayed for ever and each datagram
    /// carrying it started another exchange.
    #[test]
    fn an_unfetchable_catalog_hint_is_relayed_and_acted_on_once() {
        let (state, mut handler) = receiver();
        let hint = item(&GossipItem::CatalogHint {
            owner: "a".into(),
            epoch: 7,
            version: 3,
        });
        assert!(receive(&mut handler, &hint), "news the first time");
        assert_eq!(lock(&state).take_behind().len(), 1);
        for _ in 0..100 {
            assert!(!receive(&mut handler, &hint), "never news again");
            assert!(lock(&state).take_behind().is_empty(), "no second fetch");
        }
        let newer = item(&GossipItem::CatalogHint {
            owner: "a".into(),
            epoch: 7,
            version: 4,
        });
        assert!(receive(&mut handler, &newer), "a newer change is news");
        assert_eq!(lock(&state).take_behind().len(), 1);
    }

    #[test]
    fn an_unfetchable_config_hint_is_relayed_and_acted_on_once() {
        let (state, mut handler) = receiver();
        let version = Version {
            hlc: Timestamp {
                wall_ms: 1_800_000_000_000,
                logical: 0,
            },
            writer: "a#1".into(),
        };
        let hint = item(&GossipItem::ConfigHint {
            key: "app/big".into(),
            version: version.clone(),
            origin: "a".into(),
        });
        assert!(receive(&mut handler, &hint));
        assert_eq!(lock(&state).take_behind().len(), 1);
        for _ in 0..100 {
            assert!(!receive(&mut handler, &hint));
            assert!(lock(&state).take_behind().is_empty());
        }
    }

    #[test]
    fn a_hint_of_a_change_already_held_is_no_news() {
        let (state, mut handler) = receiver();
        let change = lock(&state)
            .config
            .set("app/k", "v", 1_800_000_000_000)
            .unwrap();
        let hint = item(&GossipItem::ConfigHint {
            key: "app/k".into(),
            version: change.version.clone(),
            origin: "a".into(),
        });
        assert!(!receive(&mut handler, &hint));
        assert!(lock(&state).take_behind().is_empty());
    }
}
