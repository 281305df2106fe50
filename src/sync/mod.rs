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

use serde::{Deserialize, Serialize};

use crate::membership::{NodeId, MAX_BROADCAST_ITEM};
use crate::state::catalog::{Catalog, Delta, Digest, SyncPayload};
use crate::wire::{self, WireError};

/// Most bytes of catalog records sent in answer to one digest; the rest follows next round.
pub const SYNC_BUDGET: usize = 4 * 1024 * 1024;

/// The replicated state of one node.
#[derive(Debug)]
pub struct Replicated {
    /// The service catalog.
    pub catalog: Catalog,
    version: u64,
    behind: BTreeSet<String>,
}

impl Replicated {
    /// State of the node `name`, whose records start at `epoch`.
    pub fn new(name: &str, epoch: u64) -> Self {
        Replicated {
            catalog: Catalog::new(name, epoch),
            version: 0,
            behind: BTreeSet::new(),
        }
    }

    /// A counter that grows with every applied change, local or remote.
    pub fn version(&self) -> u64 {
        self.version
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
        }
    }

    /// What a peer with `digest` lacks.
    pub fn updates_for(&self, digest: &SyncDigest) -> SyncUpdate {
        SyncUpdate {
            catalog: self.catalog.deltas_for(&digest.catalog, SYNC_BUDGET),
        }
    }

    /// Merges what a peer sent; returns whether anything changed.
    pub fn apply_update(&mut self, update: SyncUpdate) -> bool {
        let changed = !self.catalog.apply_sync(update.catalog).is_empty();
        if changed {
            self.touch();
        }
        changed
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

/// What one side lacks, sent by the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncUpdate {
    /// Catalog records.
    pub catalog: SyncPayload,
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
}

/// Identifies a broadcast so that a newer change of the same record replaces an older one
/// still waiting in foca's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipKey {
    owner: String,
    /// Service id, or empty for a hint.
    record: String,
    epoch: u64,
    version: u64,
}

impl foca::Invalidates for GossipKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.owner == other.owner
            && self.record == other.record
            && (self.epoch, self.version) >= (other.epoch, other.version)
    }
}

/// foca's handler of custom broadcasts: applies catalog deltas to the shared state and lets
/// foca pass on only what was news.
#[derive(Debug, Clone)]
pub struct StateBroadcasts {
    state: SharedState,
}

impl StateBroadcasts {
    /// A handler applying broadcasts to `state`.
    pub fn new(state: SharedState) -> Self {
        StateBroadcasts { state }
    }
}

impl foca::BroadcastHandler<NodeId> for StateBroadcasts {
    type Key = GossipKey;
    type Error = WireError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<GossipKey>, WireError> {
        let (item, used): (GossipItem, usize) = wire::decode_datagram_prefix(data)?;
        if used != data.len() {
            return Err(WireError::Trailing(data.len() - used));
        }
        let mut state = lock(&self.state);
        let (key, news) = match item {
            GossipItem::Catalog(delta) => {
                let key = GossipKey {
                    owner: delta.owner.clone(),
                    record: delta.service_id.clone(),
                    epoch: delta.epoch,
                    version: delta.version,
                };
                // Our own items are already applied; they are news to everyone else.
                let news = sender.is_none() || state.catalog.apply_delta(delta);
                if news && sender.is_some() {
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
                let news = sender.is_none()
                    || (owner != state.catalog.local_owner()
                        && !forgotten
                        && (epoch, version) > known);
                if news && sender.is_some() {
                    state.behind.insert(owner.clone());
                }
                let key = GossipKey {
                    owner,
                    record: String::new(),
                    epoch,
                    version,
                };
                (key, news)
            }
        };
        Ok(news.then_some(key))
    }
}
