//! Saving the node's state into its data dir: a group-commit writer task beside the driver.
//!
//! The config store marks the keys it changed (a set bounded by the key count, so nothing
//! queues up); the writer wakes when the driver publishes a new config seq, takes every
//! marked key at once and commits them in one durable transaction. While a commit runs, new
//! changes gather for the next one, so a 10,000-key catch-up costs a handful of fsyncs, and
//! concurrent local writes share theirs. A local write waits for the commit that covers its
//! seq ([`wait_committed`]); remote changes never wait.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::View;
use crate::error::{Error, Result};
use crate::membership::MemberStatus;
use crate::store::{ConfigBatch, DataDir, RememberedMember, StoreError};
use crate::sync::{self, SharedState};

/// How long a local write waits for its commit before failing.
pub(crate) const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// Pause after a failed commit before the next attempt.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often a changed member list is saved.
const MEMBERS_EVERY: Duration = Duration::from_secs(2);
/// At most this many members are remembered (the ones to rejoin through).
pub(crate) const MAX_REMEMBERED: usize = 1024;

/// Runs a data-dir operation on tokio's blocking pool (redb commits fsync). A task that dies
/// (a panic inside redb) becomes a write error naming the data dir, never a lost result.
pub(crate) async fn on_blocking_pool<T: Send + 'static>(
    dir: &Path,
    operation: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(operation)
        .await
        .unwrap_or_else(|error| {
            Err(StoreError::Write {
                file: dir.to_path_buf(),
                reason: error.to_string(),
            })
        })
}

/// How far the config store is saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Saved {
    /// Every change with a seq up to this one is on disk.
    pub(crate) through: u64,
    /// The last failed commit: the seq it was to cover, and why it failed.
    pub(crate) failed: Option<(u64, String)>,
}

/// Waits until the change numbered `seq` is on disk.
pub(crate) async fn wait_committed(mut saved: watch::Receiver<Saved>, seq: u64) -> Result<()> {
    let wait = async {
        loop {
            {
                let state = saved.borrow_and_update();
                if state.through >= seq {
                    return Ok(());
                }
                if let Some((failed, error)) = &state.failed {
                    if *failed >= seq {
                        return Err(Error::Store(format!(
                            "the write is applied in memory but could not be saved: {error}"
                        )));
                    }
                }
            }
            saved.changed().await.map_err(|_| Error::Stopped)?;
        }
    };
    super::protocol::within(COMMIT_WAIT, "saving a config write to the data dir", wait).await
}

/// What the writer saved last of the members and the identity.
struct Remembered {
    members: BTreeMap<String, SocketAddr>,
    generation: u64,
}

/// Commits config changes, member lists and identity generations until the driver stops.
pub(crate) async fn run_writer(
    store: Arc<DataDir>,
    state: SharedState,
    mut config_seq: watch::Receiver<u64>,
    mut view: watch::Receiver<Arc<View>>,
    saved: watch::Sender<Saved>,
    generation: u64,
) {
    let mut remembered = Remembered {
        members: BTreeMap::new(),
        generation,
    };
    // Member lists change in bursts (a join wave); they are saved at most this often.
    let mut members_due = tokio::time::interval(MEMBERS_EVERY);
    members_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut members_changed = false;
    loop {
        let (stopping, members_tick) = tokio::select! {
            biased;
            changed = config_seq.changed() => (changed.is_err(), false),
            changed = view.changed() => {
                members_changed = true;
                (changed.is_err(), false)
            }
            _ = members_due.tick() => (false, true),
        };
        if let Err(error) = commit_config(&store, &state, &saved).await {
            tracing::warn!(%error, "config changes not saved; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        if members_changed && (members_tick || stopping) {
            members_changed = false;
            let current = view.borrow_and_update().clone();
            if let Err(error) = remember(&store, &current, &mut remembered).await {
                tracing::warn!(%error, "member list not saved");
            }
        }
        if stopping {
            return;
        }
    }
}

/// Commits the keys changed since the last commit, if any.
async fn commit_config(
    store: &Arc<DataDir>,
    state: &SharedState,
    saved: &watch::Sender<Saved>,
) -> Result<(), StoreError> {
    let (through, batch) = {
        let mut state = sync::lock(state);
        let (through, changed) = state.config.take_dirty();
        // Collected tombstones change no seq but must leave the disk too.
        if changed.is_empty() && through <= saved.borrow().through {
            return Ok(());
        }
        let mut batch = ConfigBatch {
            hlc: state.config.clock().last(),
            gc_watermarks: state.config.gc_watermarks().to_vec(),
            ..ConfigBatch::default()
        };
        for (key, entry) in changed {
            match entry {
                Some(entry) => batch.upserts.push((key, entry)),
                None => batch.removed.push(key),
            }
        }
        (through, batch)
    };
    // Kept aside: whatever goes wrong in the commit (an error, or its task dying), these
    // keys must be marked again so that a later commit saves them.
    let keys: Vec<String> = batch
        .upserts
        .iter()
        .map(|(key, _)| key)
        .chain(&batch.removed)
        .cloned()
        .collect();
    let writer = store.clone();
    let result = on_blocking_pool(store.dir(), move || writer.commit_config(&batch)).await;
    match result {
        Ok(()) => {
            saved.send_modify(|saved| saved.through = through);
            Ok(())
        }
        Err(error) => {
            sync::lock(state).config.mark_dirty(keys);
            saved.send_modify(|saved| saved.failed = Some((through, error.to_string())));
            Err(error)
        }
    }
}

/// Saves the live members (to rejoin through after a restart) and the identity generation
/// when they changed.
async fn remember(
    store: &Arc<DataDir>,
    view: &View,
    remembered: &mut Remembered,
) -> Result<(), StoreError> {
    // Members that left or went down are kept too (live ones first when capping): after a
    // full-cluster stop, the peers that stopped before us are the ones to find again.
    let others = || view.members.iter().filter(|m| m.name != view.identity.name);
    let live = |m: &&crate::membership::Member| {
        matches!(m.status, MemberStatus::Alive | MemberStatus::Suspect)
    };
    let members: BTreeMap<String, SocketAddr> = others()
        .filter(live)
        .chain(others().filter(|m| !live(m)))
        .take(MAX_REMEMBERED)
        .map(|m| (m.name.clone(), m.addr))
        .collect();
    let generation = view.identity.generation;
    // An empty list is not saved: a node that lost every peer should still find them again.
    let members_changed = !members.is_empty() && members != remembered.members;
    let generation_changed = generation > remembered.generation;
    if !members_changed && !generation_changed {
        return Ok(());
    }
    let writer = store.clone();
    let list: Vec<RememberedMember> = members
        .iter()
        .map(|(name, addr)| RememberedMember {
            name: name.clone(),
            addr: *addr,
        })
        .collect();
    on_blocking_pool(store.dir(), move || {
        if generation_changed {
            writer.set_generation(generation)?;
        }
        if members_changed {
            writer.put_members(&list)?;
        }
        Ok(())
    })
    .await?;
    remembered.members = members;
    remembered.generation = generation;
    Ok(())
}
