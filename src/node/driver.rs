//! The driver task: the one owner of a node's membership, its UDP socket, and the writer of
//! its own catalog records.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::RngExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::agreement::{tag_of, Agreement};
use super::catalog::CatalogView;
use super::limiter::{ExchangeLimiter, Refusal};
use super::protocol::{connect, exchange, within, Request, Response};
use super::seeds::Seeds;
use super::stats::Stats;
use super::View;
use crate::error::{Error, Result};
use crate::membership::{
    BroadcastBacklog, ForceLeave, MemberEvent, Membership, MembershipError, Profile, PushPull,
};
use crate::net::{Transport, UdpSocket};
use crate::state::catalog::{CatalogError, Delta, Health, ServiceRecord};
use crate::state::config::{Change, ConfigError, ConfigStoreOptions};
use crate::sync::{self, Replicated, SharedState, StateBroadcasts, WallClock};
use crate::wire::{self, DatagramTag};

/// Bound of the driver's command queue.
pub(crate) const COMMAND_QUEUE: usize = 256;
/// Most TCP exchanges (push-pull, anti-entropy) this node runs at once.
const MAX_OUTBOUND: usize = 4;
/// First and last gap of the push-pulls that follow a join.
const FOLLOWUP_FIRST: Duration = Duration::from_secs(1);
const FOLLOWUP_LAST: Duration = Duration::from_secs(4);

/// Messages to the driver.
pub(crate) enum Command {
    /// A peer's member list arrived over TCP; answer with ours.
    PushPullIn {
        state: PushPull,
        reply: oneshot::Sender<PushPull>,
    },
    /// A peer's member-list fingerprint arrived over TCP; answer whether ours is equal.
    PushPullCheck {
        fingerprint: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Register (or replace) a local service.
    Register {
        record: ServiceRecord,
        reply: oneshot::Sender<Result<(), CatalogError>>,
    },
    /// Deregister a local service.
    Deregister {
        id: String,
        reply: oneshot::Sender<Result<(), CatalogError>>,
    },
    /// Write a config key.
    ConfigSet {
        key: String,
        value: Vec<u8>,
        flags: u64,
        reply: oneshot::Sender<Result<Change, ConfigError>>,
    },
    /// Delete a config key.
    ConfigDelete {
        key: String,
        reply: oneshot::Sender<Result<Option<Change>, ConfigError>>,
    },
    /// A health check's verdict on a local service.
    SetHealth { id: String, health: Health },
    /// A TCP task merged remote state: publish it.
    StateChanged,
    /// Leave the cluster gracefully, then report.
    Leave { done: oneshot::Sender<Result<()>> },
    /// Join the cluster through `addr` (announce over UDP, push-pull over TCP), as a seed
    /// given at start would; the caller waits for the member list to show it.
    Join { addr: SocketAddr },
    /// Force the failed member `name` into `left` (Consul's `force-leave`); the reply is
    /// sent once the member list showing it is published.
    ForceLeave {
        name: String,
        prune: bool,
        reply: oneshot::Sender<Result<ForceLeave>>,
    },
}

/// What a finished outbound TCP exchange brought back.
enum Outcome {
    Members(PushPull),
    /// A periodic push-pull found both member lists alike and exchanged none.
    MembersInSync,
    Synced,
    /// A join attempt through a seed failed.
    JoinFailed(SocketAddr, Error),
}

pub(crate) struct Driver<T: Transport> {
    pub(crate) membership: Membership<StateBroadcasts>,
    pub(crate) state: SharedState,
    pub(crate) transport: T,
    pub(crate) udp: T::Udp,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) view: watch::Sender<Arc<View>>,
    pub(crate) catalog_view: watch::Sender<Arc<CatalogView>>,
    /// Sequence number of the last config change applied, for config watches.
    pub(crate) config_seq: watch::Sender<u64>,
    pub(crate) tombstone_horizon: Duration,
    pub(crate) events: broadcast::Sender<MemberEvent>,
    pub(crate) stats: Arc<Stats>,
    /// Fixed seed addresses and the latest resolution of seed names.
    pub(crate) seeds: Seeds,
    pub(crate) rng: SmallRng,
    pub(crate) profile: Profile,
    /// Peers whose refusals were already logged.
    pub(crate) warned: std::collections::BTreeSet<SocketAddr>,
    /// The rate limit of unscheduled exchanges.
    pub(crate) limits: Limits,
    /// Which peers' datagrams said they disagree with this node (see [`super::agreement`]).
    pub(crate) agreement: Agreement,
    /// This node's datagram tag, with the state and member-list versions it reflects.
    pub(crate) tag: Option<((u64, u64), DatagramTag)>,
}

/// Owners whose hinted change waits for the rate limit, at most.
const MAX_DEFERRED: usize = 256;
/// How long a deferred fetch is kept; periodic anti-entropy repairs what it misses.
const DEFERRED_FOR: Duration = Duration::from_secs(30);

/// Rate limits of the exchanges started outside the schedule (see [`super::limiter`]).
pub(crate) struct Limits {
    sync: ExchangeLimiter,
    push_pull: ExchangeLimiter,
    /// Whether the first refusal was logged.
    warned: bool,
    /// Owners whose hinted change could not be fetched yet (limit or no free slot), since
    /// when: retried on the sync tick.
    deferred: BTreeMap<String, Instant>,
}

impl Limits {
    /// Per peer, one unscheduled exchange of a kind per quarter sync interval (500 ms on a
    /// LAN); per node a burst of 8, then one anti-entropy round per half sync interval and one
    /// push-pull per sync interval (LAN: 1/s and 0.5/s, against the storm's 300/s).
    pub(crate) fn new(profile: Profile) -> Self {
        let now = Instant::now();
        let interval = profile.sync_interval();
        let gap = interval / 4;
        let per_second = 1.0 / interval.as_secs_f64();
        Limits {
            sync: ExchangeLimiter::new(gap, 8, 2.0 * per_second, now),
            push_pull: ExchangeLimiter::new(gap, 8, per_second, now),
            warned: false,
            deferred: BTreeMap::new(),
        }
    }
}

/// The two kinds of TCP exchange, each with its own limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    AntiEntropy,
    PushPull,
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exchange::AntiEntropy => "anti-entropy",
            Exchange::PushPull => "push-pull",
        })
    }
}

/// What an exchange start is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A tick of the schedule: never limited.
    Scheduled,
    /// Driven by an event: rate-limited.
    Unscheduled(Trigger),
}

/// The events that start an exchange outside the schedule (issue 18). Each fires once per
/// change (a hint is news once, contact is first made once, a member comes back once per
/// time it was down) and goes through the rate limit of its kind of exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A hint of a change too big to gossip: fetch it from its owner (anti-entropy).
    HintFetch,
    /// Peers appeared where there were none: anti-entropy at once.
    FirstContactSync,
    /// Peers appeared where there were none: push-pull at once.
    FirstContactPushPull,
    /// The push-pulls 1, 2 and 4 s after the first contact.
    FollowUp,
    /// A member seen back after being down or left: push-pull with it (rejoin).
    MemberBack,
}

impl Trigger {
    fn exchange(self) -> Exchange {
        match self {
            Trigger::HintFetch | Trigger::FirstContactSync => Exchange::AntiEntropy,
            Trigger::FirstContactPushPull | Trigger::FollowUp | Trigger::MemberBack => {
                Exchange::PushPull
            }
        }
    }
}

impl Limits {
    /// Takes an unscheduled start of `trigger` with `peer`, if its kind's limit allows.
    fn admit(&mut self, trigger: Trigger, peer: SocketAddr, now: Instant) -> Result<(), Refusal> {
        match trigger.exchange() {
            Exchange::AntiEntropy => self.sync.try_start(peer, now),
            Exchange::PushPull => self.push_pull.try_start(peer, now),
        }
    }
}

/// The gap before the follow-up push-pull after one `gap` after the first contact: they
/// double, and stop after [`FOLLOWUP_LAST`], so a join causes three and no more.
fn next_followup(gap: Duration) -> Option<Duration> {
    (gap < FOLLOWUP_LAST).then(|| gap * 2)
}

/// Peers remembered for "logged once" refusals.
const MAX_WARNED: usize = 1024;

/// Book-keeping of the driver loop.
#[derive(Default)]
struct Progress {
    /// Push-pull ticks so far.
    push_pull_ticks: u64,
    /// Members back from down or left since the last turn: push-pull with them.
    rejoined: Vec<SocketAddr>,
    members_published: Option<u64>,
    state_published: Option<(u64, u64)>,
    had_peers: bool,
    seed_cursor: usize,
    /// When a down or left node was first seen so; its records go after a grace period.
    dead_since: BTreeMap<String, Instant>,
    /// `(when, local max version)` samples: tombstones older than the horizon are collected.
    tombstone_marks: VecDeque<(Instant, u64)>,
}

impl Progress {
    /// Notes a member event; the address of a member back from down or left (the
    /// [`Trigger::MemberBack`] push-pull), once per time it was given up on.
    fn member_back(&mut self, event: &MemberEvent, now: Instant) -> Option<SocketAddr> {
        match event {
            MemberEvent::Down(m) | MemberEvent::Left(m) => {
                self.dead_since.entry(m.name.clone()).or_insert(now);
                None
            }
            // Contact resumed with a member we had given up on (a healed partition, a
            // restart): swap member lists at once rather than at the next, possibly
            // scaled-down, push-pull.
            MemberEvent::Joined(m) => self.dead_since.remove(&m.name).map(|_| m.addr),
            MemberEvent::Updated(m) => {
                self.dead_since.remove(&m.name);
                None
            }
            MemberEvent::Suspect(_) => None,
        }
    }
}

impl<T: Transport> Driver<T> {
    /// The replicated state of a node, and foca's handler sharing it.
    pub(crate) fn state_for(
        name: &str,
        epoch: u64,
        config: ConfigStoreOptions,
        clock: WallClock,
        backlog: BroadcastBacklog,
    ) -> (SharedState, StateBroadcasts) {
        let state: SharedState = Arc::new(std::sync::Mutex::new(Replicated::new(
            name, epoch, config, clock,
        )));
        let handler = StateBroadcasts::with_backlog(state.clone(), backlog);
        (state, handler)
    }

    pub(crate) async fn run(mut self) {
        let mut push_pull_tick = interval(self.profile.push_pull_interval());
        let mut sync_tick = interval(self.profile.sync_interval());
        let mut join_tick = interval(self.profile.join_retry_interval());
        let mut tasks: JoinSet<Result<Outcome>> = JoinSet::new();
        let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
        let mut progress = Progress {
            // A random phase, so that scaled-down push-pulls do not all fall on one tick.
            push_pull_ticks: self.rng.random_range(0..1u64 << 32),
            ..Progress::default()
        };
        // After joining, a few quick push-pulls (1 s, 2 s, 4 s) fill in members that joined
        // at the same time, instead of waiting for the periodic exchange.
        let mut followup: Option<(Instant, Duration)> = None;

        loop {
            let deadline = self
                .membership
                .next_deadline()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Leave { done }) => {
                        let result = self.membership.leave(now()).map_err(Error::from);
                        self.flush(&mut progress).await;
                        self.publish(&mut progress);
                        let _ = done.send(result);
                        return;
                    }
                    Some(Command::Join { addr }) => self.join_through(addr, &mut tasks),
                    Some(Command::ForceLeave { name, prune, reply }) => {
                        let result = self
                            .membership
                            .force_leave(&name, prune, now())
                            .map_err(Error::from);
                        self.flush(&mut progress).await;
                        self.publish(&mut progress);
                        let _ = reply.send(result);
                    }
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: the node was dropped.
                    None => return,
                },
                // Timers come before datagrams so that a flood cannot starve the detector.
                () = tokio::time::sleep_until(deadline) => {
                    let stalls = self.membership.stalls();
                    self.membership.handle_due_timers(now());
                    Stats::add(&self.stats.stalls, self.membership.stalls() - stalls);
                }
                received = self.udp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => self.handle_datagram(&buf[..len], from, &mut tasks),
                    Err(error) => tracing::debug!(%error, "udp receive failed"),
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                    Ok(Ok(Outcome::Members(state))) => self.apply_push_pull(state),
                    Ok(Ok(Outcome::MembersInSync)) => {
                        Stats::add(&self.stats.push_pull_skipped, 1);
                    }
                    Ok(Ok(Outcome::Synced)) => {}
                    Ok(Ok(Outcome::JoinFailed(seed, error))) => {
                        Stats::add(&self.stats.sync_failed, 1);
                        self.warn_once(seed, "cannot join through seed", &error);
                    }
                    Ok(Err(error)) => {
                        Stats::add(&self.stats.sync_failed, 1);
                        tracing::debug!(%error, "tcp exchange failed");
                    }
                    Err(error) => tracing::debug!(%error, "tcp exchange task ended abnormally"),
                },
                () = sleep_until_opt(followup.map(|(at, _)| at)) => {
                    if let Some((_, gap)) = followup.take() {
                        self.push_pull_random(&mut tasks, Trigger::FollowUp);
                        followup = next_followup(gap).map(|next| (Instant::now() + next, next));
                    }
                }
                _ = join_tick.tick() => {
                    if self.membership.num_active_peers() == 0 {
                        self.try_join(&mut progress, &mut tasks);
                    }
                }
                _ = sync_tick.tick() => {
                    let active = self.membership.active_peer_addrs();
                    match self.agreement.sync_target(&active, &mut self.rng) {
                        Some(peer) => {
                            self.start_sync(peer, &mut tasks, Start::Scheduled);
                        }
                        None if !active.is_empty() => {
                            Stats::add(&self.stats.exchanges_agreed, 1);
                        }
                        None => {}
                    }
                    self.retry_deferred(&mut tasks);
                    self.housekeeping(&mut progress);
                }
                _ = push_pull_tick.tick() => {
                    // Large clusters push-pull less often (memberlist's scaling).
                    let size = self.membership.num_active_peers() + 1;
                    progress.push_pull_ticks = progress.push_pull_ticks.wrapping_add(1);
                    let scheduled = progress
                        .push_pull_ticks
                        .is_multiple_of(u64::from(Profile::push_pull_scale(size)));
                    let active = self.membership.active_peer_addrs();
                    match self.agreement.push_pull_target(&active, scheduled, &mut self.rng) {
                        Some(peer) => {
                            self.start_push_pull_with(peer, &mut tasks, PushPullKind::Periodic);
                        }
                        None if scheduled && !active.is_empty() => {
                            Stats::add(&self.stats.exchanges_agreed, 1);
                        }
                        None => {}
                    }
                }
            }
            let has_peers = self.membership.num_active_peers() > 0;
            if has_peers && !progress.had_peers {
                // Just joined: fetch the whole member list and state instead of waiting.
                self.push_pull_random(&mut tasks, Trigger::FirstContactPushPull);
                if let Some(peer) = self.random_peer() {
                    self.start_sync(
                        peer,
                        &mut tasks,
                        Start::Unscheduled(Trigger::FirstContactSync),
                    );
                }
                followup = Some((Instant::now() + FOLLOWUP_FIRST, FOLLOWUP_FIRST));
            }
            progress.had_peers = has_peers;
            self.follow_identity();
            self.flush(&mut progress).await;
            for peer in std::mem::take(&mut progress.rejoined) {
                self.start_push_pull(peer, &mut tasks, Trigger::MemberBack);
            }
            self.publish(&mut progress);
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::PushPullIn { state, reply } => {
                self.apply_push_pull(state);
                let _ = reply.send(self.membership.push_pull_state());
            }
            Command::PushPullCheck { fingerprint, reply } => {
                let in_sync = self.membership.members_fingerprint() == fingerprint;
                if in_sync {
                    Stats::add(&self.stats.push_pull_skipped, 1);
                }
                let _ = reply.send(in_sync);
            }
            Command::Register { record, reply } => {
                let result = sync::lock(&self.state).catalog.register(record);
                let _ = reply.send(result.map(|delta| self.announce(&delta)));
            }
            Command::Deregister { id, reply } => {
                let result = sync::lock(&self.state).catalog.deregister(&id);
                let _ = reply.send(result.map(|delta| self.announce(&delta)));
            }
            Command::ConfigSet {
                key,
                value,
                flags,
                reply,
            } => {
                let result = sync::lock(&self.state).config_set(&key, value, flags);
                if let Ok(change) = &result {
                    self.announce_config(change);
                }
                let _ = reply.send(result);
            }
            Command::ConfigDelete { key, reply } => {
                let result = sync::lock(&self.state).config_delete(&key);
                if let Ok(Some(change)) = &result {
                    self.announce_config(change);
                }
                let _ = reply.send(result);
            }
            Command::SetHealth { id, health } => {
                let result = sync::lock(&self.state).catalog.set_health(&id, health);
                match result {
                    Ok(Some(delta)) => self.announce(&delta),
                    Ok(None) => {}
                    // The service was deregistered while its check ran.
                    Err(error) => tracing::debug!(%error, "health update ignored"),
                }
            }
            Command::StateChanged => {}
            Command::Leave { .. } | Command::Join { .. } | Command::ForceLeave { .. } => {
                unreachable!("handled by the loop")
            }
        }
    }

    /// Spreads a local change: the state moved on, and the delta (or a hint) rides on SWIM.
    fn announce(&mut self, delta: &Delta) {
        sync::lock(&self.state).touch();
        match Replicated::broadcast_item(delta) {
            Ok(item) => self.gossip(&item, "catalog"),
            Err(error) => tracing::warn!(%error, "could not encode a catalog change"),
        }
    }

    /// Queues a local change for gossip. A full queue is no failure: anti-entropy carries
    /// the change within a sync interval or two.
    fn gossip(&mut self, item: &[u8], what: &str) {
        match self.membership.add_broadcast(item, now()) {
            Ok(_) => {}
            Err(MembershipError::BacklogFull) => {
                Stats::add(&self.stats.broadcasts_deferred, 1);
                tracing::debug!("broadcast queue full: a {what} change spreads by anti-entropy");
            }
            Err(error) => tracing::warn!(%error, "could not broadcast a {what} change"),
        }
    }

    /// Spreads a local config write or delete.
    fn announce_config(&mut self, change: &Change) {
        let origin = self.membership.identity().name.clone();
        match Replicated::config_broadcast_item(change, &origin) {
            Ok(item) => self.gossip(&item, "config"),
            Err(error) => tracing::warn!(%error, "could not encode a config change"),
        }
    }

    /// Keeps the catalog's epoch at the identity's generation: a node that renewed its
    /// identity (declared down, then back) re-announces its records under the new epoch.
    fn follow_identity(&mut self) {
        let generation = self.membership.identity().generation;
        let hint = sync::lock(&self.state).follow_generation(generation);
        if let Some(item) = hint {
            tracing::info!(generation, "catalog records re-announced under a new epoch");
            let _ = self.membership.add_broadcast(&item, now());
        }
    }

    /// This node's datagram tag: fingerprints of its state and member list, recomputed
    /// only when either changed.
    fn local_tag(&mut self) -> DatagramTag {
        // One lock for the version check and, when it changed, the digest.
        let state = sync::lock(&self.state);
        let versions = (state.version(), self.membership.view_version());
        if let Some((cached, tag)) = self.tag {
            if cached == versions {
                return tag;
            }
        }
        let state_fingerprint = state.digest().fingerprint();
        drop(state);
        let tag = tag_of(state_fingerprint, self.membership.members_fingerprint());
        self.tag = Some((versions, tag));
        tag
    }

    fn handle_datagram(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        tasks: &mut JoinSet<Result<Outcome>>,
    ) {
        Stats::add(&self.stats.udp_received, 1);
        Stats::add(&self.stats.udp_received_bytes, datagram.len() as u64);
        if let Some(theirs) = wire::datagram_tag(datagram) {
            let ours = self.local_tag();
            self.agreement.heard(from, &theirs, &ours);
        }
        if let Err(error) = self.membership.handle_datagram(datagram, now()) {
            Stats::add(&self.stats.udp_dropped, 1);
            if matches!(
                error,
                crate::membership::MembershipError::Wire(crate::wire::WireError::Sealed)
            ) {
                self.warn_once(from, "refusing datagrams", &error);
            } else {
                tracing::debug!(%from, %error, "dropped datagram");
            }
        }
        // Hints of changes too big to gossip: fetch them from their owner. A hint is news
        // once (see `sync::hints`), and the fetches go through the rate limit.
        let behind = sync::lock(&self.state).take_behind();
        for owner in behind {
            self.fetch_from(owner, tasks, true);
        }
    }

    /// Fetches a hinted change from `owner` if it is a live member; a fetch the limit or
    /// the number of open exchanges refuses waits for the next sync tick. `fresh`: a new
    /// hint (refusals are counted), not a deferred one tried again.
    fn fetch_from(&mut self, owner: String, tasks: &mut JoinSet<Result<Outcome>>, fresh: bool) {
        let addr = {
            let view = self.view.borrow();
            view.members
                .iter()
                .find(|m| m.name == owner && m.status.is_active())
                .map(|m| m.addr)
        };
        let Some(addr) = addr else {
            // Not (or no longer) a live member: periodic anti-entropy brings the change
            // from whoever has it.
            self.limits.deferred.remove(&owner);
            return;
        };
        let now = Instant::now();
        if !fresh && self.limits.sync.check(addr, now).is_err() {
            return;
        }
        if self.start_sync(addr, tasks, Start::Unscheduled(Trigger::HintFetch)) {
            self.limits.deferred.remove(&owner);
        } else if !self.limits.deferred.contains_key(&owner) {
            if self.limits.deferred.len() >= MAX_DEFERRED {
                self.limits.deferred.pop_first();
            }
            self.limits.deferred.insert(owner, now);
        }
    }

    /// Tries the deferred fetches again (on the sync tick), forgetting the old ones.
    fn retry_deferred(&mut self, tasks: &mut JoinSet<Result<Outcome>>) {
        let now = Instant::now();
        self.limits
            .deferred
            .retain(|_, since| now.saturating_duration_since(*since) < DEFERRED_FOR);
        let owners: Vec<String> = self.limits.deferred.keys().cloned().collect();
        for owner in owners {
            if tasks.len() >= MAX_OUTBOUND {
                break;
            }
            self.fetch_from(owner, tasks, false);
        }
    }

    /// Whether an exchange of `kind` may start with `peer`: scheduled ones always, the
    /// others within the rate limit. A refusal is counted, and the first one logged.
    fn allowed(&mut self, peer: SocketAddr, start: Start) -> bool {
        let Start::Unscheduled(trigger) = start else {
            return true;
        };
        let kind = trigger.exchange();
        let counter = match kind {
            Exchange::AntiEntropy => &self.stats.sync_suppressed,
            Exchange::PushPull => &self.stats.push_pull_suppressed,
        };
        match self.limits.admit(trigger, peer, Instant::now()) {
            Ok(()) => true,
            Err(refusal) => {
                Stats::add(counter, 1);
                if !self.limits.warned {
                    self.limits.warned = true;
                    tracing::warn!(
                        %peer,
                        %refusal,
                        "rate limit of unscheduled {kind} exchanges reached; suppressed starts \
                         are counted in grapevine_sync_suppressed_total (logged once)"
                    );
                }
                false
            }
        }
    }

    /// Logs a refusal the first time it happens with a peer.
    fn warn_once(&mut self, peer: SocketAddr, what: &str, error: &dyn std::fmt::Display) {
        if self.warned.len() < MAX_WARNED && self.warned.insert(peer) {
            tracing::warn!(%peer, %error, "{what} (logged once per peer)");
        }
    }

    fn apply_push_pull(&mut self, state: PushPull) {
        Stats::add(&self.stats.push_pull_ok, 1);
        if let Err(error) = self.membership.apply_push_pull(state, now()) {
            tracing::debug!(%error, "push-pull state rejected");
        }
    }

    fn try_join(&mut self, progress: &mut Progress, tasks: &mut JoinSet<Result<Outcome>>) {
        let me = self.membership.identity().addr;
        let mut seeds = self.seeds.current();
        seeds.retain(|s| *s != me);
        if seeds.is_empty() {
            return;
        }
        for seed in &seeds {
            if let Err(error) = self.membership.announce_to(*seed, now()) {
                tracing::debug!(%seed, %error, "announce failed");
            }
        }
        // TCP push-pull with one seed per round also joins when UDP is lossy.
        let seed = seeds[progress.seed_cursor % seeds.len()];
        progress.seed_cursor = progress.seed_cursor.wrapping_add(1);
        tracing::debug!(%seed, "joining through seed");
        self.start_push_pull_with(seed, tasks, PushPullKind::Join);
    }

    /// A join asked at run time (`PUT /v1/agent/join`): the same two paths as a seed's.
    fn join_through(&mut self, addr: SocketAddr, tasks: &mut JoinSet<Result<Outcome>>) {
        if addr == self.membership.identity().addr {
            return;
        }
        if let Err(error) = self.membership.announce_to(addr, now()) {
            tracing::debug!(%addr, %error, "announce failed");
        }
        self.start_push_pull_with(addr, tasks, PushPullKind::Join);
    }

    fn random_peer(&mut self) -> Option<SocketAddr> {
        let peers = self.membership.active_peer_addrs();
        if peers.is_empty() {
            return None;
        }
        Some(peers[self.rng.random_range(0..peers.len())])
    }

    fn push_pull_random(&mut self, tasks: &mut JoinSet<Result<Outcome>>, trigger: Trigger) {
        if let Some(peer) = self.random_peer() {
            self.start_push_pull(peer, tasks, trigger);
        }
    }

    fn start_push_pull(
        &mut self,
        peer: SocketAddr,
        tasks: &mut JoinSet<Result<Outcome>>,
        trigger: Trigger,
    ) {
        self.start_push_pull_with(peer, tasks, PushPullKind::Full(trigger));
    }

    /// A push-pull with `peer`; for a seed we are joining through, a failure is reported
    /// as such so that its reason is logged. A periodic one sends the member-list
    /// fingerprint first and ships the lists only if the peer's differs.
    fn start_push_pull_with(
        &mut self,
        peer: SocketAddr,
        tasks: &mut JoinSet<Result<Outcome>>,
        kind: PushPullKind,
    ) {
        // Joins and periodic rounds have their ticks; the others are driven by events.
        let start = match kind {
            PushPullKind::Join | PushPullKind::Periodic => Start::Scheduled,
            PushPullKind::Full(trigger) => Start::Unscheduled(trigger),
        };
        if tasks.len() >= MAX_OUTBOUND || !self.allowed(peer, start) {
            return;
        }
        let request = Request::PushPull(self.membership.push_pull_state());
        let fingerprint =
            (kind == PushPullKind::Periodic).then(|| self.membership.members_fingerprint());
        let joining = kind == PushPullKind::Join;
        let transport = self.transport.clone();
        let timeout = self.profile.tcp_timeout();
        let stats = self.stats.clone();
        tasks.spawn(async move {
            let result = async {
                let (outcome, bytes) =
                    push_pull(&transport, peer, fingerprint, &request, timeout).await?;
                Stats::add(&stats.tcp_bytes, bytes);
                Ok(outcome)
            }
            .await;
            match result {
                Err(error) if joining => Ok(Outcome::JoinFailed(peer, error)),
                other => other,
            }
        });
    }

    /// Anti-entropy with `peer`: send our digest, merge what we lacked, send what it lacked.
    /// Returns whether it started (not if all exchange slots are busy or the rate limit
    /// refuses an unscheduled one).
    fn start_sync(
        &mut self,
        peer: SocketAddr,
        tasks: &mut JoinSet<Result<Outcome>>,
        start: Start,
    ) -> bool {
        if tasks.len() >= MAX_OUTBOUND || !self.allowed(peer, start) {
            return false;
        }
        let state = self.state.clone();
        let transport = self.transport.clone();
        let timeout = self.profile.tcp_timeout();
        let stats = self.stats.clone();
        tasks.spawn(within(timeout, "anti-entropy", async move {
            let mut connection = connect(&transport, peer).await?;
            let digest = sync::lock(&state).digest();
            let check = Request::SyncCheck(digest.fingerprint());
            if let Response::InSync = connection.call(&check).await? {
                Stats::add(&stats.tcp_bytes, connection.bytes);
                Stats::add(&stats.sync_ok, 1);
                return Ok(Outcome::Synced);
            }
            let result = match connection.call(&Request::Sync(digest)).await? {
                Response::Sync(reply) => {
                    let push = sync::lock(&state).apply_reply(reply);
                    let nothing_to_say = push.catalog.is_empty()
                        && push.config_entries.is_empty()
                        && push.config_wanted.is_empty();
                    if !nothing_to_say {
                        match connection.call(&Request::SyncPush(push)).await? {
                            Response::SyncPushed(reply) => {
                                sync::lock(&state).apply_push_reply(reply)
                            }
                            other => {
                                return Err(Error::Protocol(format!("{other:?} answered a push")))
                            }
                        }
                    }
                    Ok(Outcome::Synced)
                }
                other => Err(Error::Protocol(format!("{other:?} answered a sync"))),
            };
            Stats::add(&stats.tcp_bytes, connection.bytes);
            Stats::add(&stats.sync_ok, 1);
            result
        }));
        true
    }

    /// Periodic upkeep: forget the records of nodes down for longer than the grace period,
    /// and collect old local tombstones.
    fn housekeeping(&mut self, progress: &mut Progress) {
        let now = Instant::now();
        let grace = self.profile.catalog_grace();
        let expired: Vec<String> = progress
            .dead_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= grace)
            .map(|(name, _)| name.clone())
            .collect();
        let mut state = sync::lock(&self.state);
        for name in expired {
            progress.dead_since.remove(&name);
            let epoch = state.catalog.owner(&name).map(|o| o.epoch);
            if let Some(epoch) = epoch {
                if state.catalog.forget_owner(&name, epoch) {
                    tracing::debug!(owner = %name, "forgot the records of a departed node");
                    state.touch();
                }
            }
        }
        state
            .catalog
            .prune_forgotten(crate::state::catalog::MAX_FORGOTTEN);
        let now_ms = state.now_ms();
        let horizon_ms = self.tombstone_horizon.as_millis() as u64;
        if state.config.collect_tombstones(now_ms, horizon_ms) > 0 {
            state.touch();
        }
        let horizon = self.profile.tombstone_horizon();
        progress
            .tombstone_marks
            .push_back((now, state.catalog.local_max_version()));
        while let Some((at, version)) = progress.tombstone_marks.front().copied() {
            if now.duration_since(at) < horizon {
                break;
            }
            progress.tombstone_marks.pop_front();
            if state.catalog.collect_tombstones(version) > 0 {
                state.touch();
            }
        }
    }

    async fn flush(&mut self, progress: &mut Progress) {
        let mut outgoing: Vec<_> = self.membership.drain_outbox().collect();
        if !outgoing.is_empty() {
            let tag = self.local_tag();
            for (_, datagram) in &mut outgoing {
                wire::stamp_tag(datagram, &tag);
            }
        }
        for (to, datagram) in outgoing {
            match self.udp.send_to(&datagram, to).await {
                Ok(_) => {
                    Stats::add(&self.stats.udp_sent, 1);
                    Stats::add(&self.stats.udp_sent_bytes, datagram.len() as u64);
                }
                Err(error) => tracing::debug!(%to, %error, "udp send failed"),
            }
        }
        for event in self.membership.drain_events() {
            tracing::info!(?event, "membership");
            if let Some(back) = progress.member_back(&event, Instant::now()) {
                progress.rejoined.push(back);
            }
            // No subscriber is fine; a lagging one is counted when it reads.
            let _ = self.events.send(event);
        }
    }

    /// Publishes what changed. The catalog view goes out before the member list, so that a
    /// reader woken by a member change already finds the catalog that matches it.
    fn publish(&mut self, progress: &mut Progress) {
        let members_version = self.membership.view_version();
        let members_changed = progress.members_published != Some(members_version);
        let members = if members_changed {
            Some(self.membership.members())
        } else {
            None
        };
        let backlog = self.membership.broadcast_backlog() as u64;
        self.stats
            .broadcast_queue
            .store(backlog, std::sync::atomic::Ordering::Relaxed);
        self.stats.suspicion_notices.store(
            self.membership.suspicion_notices_sent(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.stats.suspicions_shortened.store(
            self.membership.suspicions_shortened(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let state = sync::lock(&self.state);
        let config_seq = state.config.current_seq();
        if *self.config_seq.borrow() != config_seq {
            self.config_seq.send_replace(config_seq);
        }
        let versions = (members_version, state.version());
        if progress.state_published != Some(versions) {
            let mut view = match &members {
                Some(members) => CatalogView::build(&state.catalog, members),
                None => CatalogView::build(&state.catalog, &self.view.borrow().members),
            };
            let previous = self.catalog_view.borrow().clone();
            view.carry_indexes(&previous, previous.index + 1);
            drop(state);
            self.catalog_view.send_replace(Arc::new(view));
            progress.state_published = Some(versions);
        } else {
            drop(state);
        }
        if let Some(members) = members {
            let identity = self.membership.identity().clone();
            self.view.send_modify(|view| {
                *view = Arc::new(View {
                    identity,
                    members,
                    profile: view.profile,
                })
            });
            progress.members_published = Some(members_version);
        }
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Why a push-pull runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushPullKind {
    /// Joining through a seed: member lists always, failures reported.
    Join,
    /// First contact, its follow-ups, a member back from down: member lists always.
    Full(Trigger),
    /// The periodic repair round: fingerprint first.
    Periodic,
}

/// A push-pull with `peer`, fingerprint first when one is given: `(outcome, bytes sent and
/// received)`. If the check fails other than by a timeout (perhaps a node of the previous
/// version, which closes the connection on a request it does not know), a plain push-pull
/// follows; an unreachable peer is not tried twice.
async fn push_pull<T: Transport>(
    transport: &T,
    peer: SocketAddr,
    fingerprint: Option<u64>,
    request: &Request,
    timeout: Duration,
) -> Result<(Outcome, u64)> {
    if let Some(fingerprint) = fingerprint {
        match checked_push_pull(transport, peer, fingerprint, request, timeout).await {
            Err(error @ Error::Timeout { .. }) => return Err(error),
            Err(error) => {
                tracing::debug!(%peer, %error, "push-pull check failed; plain push-pull");
            }
            done => return done,
        }
    }
    let (response, bytes) = exchange(transport, peer, request, timeout).await?;
    match response {
        Response::PushPull(state) => Ok((Outcome::Members(state), bytes)),
        other => Err(Error::Protocol(format!("{other:?} answered a push-pull"))),
    }
}

/// A push-pull that first compares member-list fingerprints, on one connection within
/// `timeout`: `(outcome, bytes sent and received)`.
async fn checked_push_pull<T: Transport>(
    transport: &T,
    peer: SocketAddr,
    fingerprint: u64,
    push_pull: &Request,
    timeout: Duration,
) -> Result<(Outcome, u64)> {
    within(timeout, "push-pull", async {
        let mut connection = connect(transport, peer).await?;
        let outcome = match connection
            .call(&Request::PushPullCheck(fingerprint))
            .await?
        {
            Response::InSync => Outcome::MembersInSync,
            Response::OutOfSync => match connection.call(push_pull).await? {
                Response::PushPull(state) => Outcome::Members(state),
                other => return Err(Error::Protocol(format!("{other:?} answered a push-pull"))),
            },
            other => {
                return Err(Error::Protocol(format!(
                    "{other:?} answered a push-pull check"
                )))
            }
        };
        Ok((outcome, connection.bytes))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::membership::NodeId;
    use futures_util::{SinkExt, StreamExt};

    use crate::net::TokioTransport;

    /// A peer on loopback answering each connection's requests with `answer` (`None`
    /// closes the connection, as a node of the previous version does on a request it
    /// cannot decode). Returns its address and the count of connections it accepted.
    async fn peer(answer: fn(&Request) -> Option<Response>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TokioTransport
            .bind_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            // Bounded: the test makes at most a few connections.
            for _ in 0..4 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let mut framed = wire::framed(stream);
                let hello = framed.next().await;
                assert!(matches!(&hello, Some(Ok(f)) if wire::check_hello(f).is_ok()));
                while let Some(Ok(frame)) = framed.next().await {
                    let request: Request = wire::decode_frame(&frame).unwrap();
                    let Some(response) = answer(&request) else {
                        break;
                    };
                    let bytes = wire::encode_frame(&response).unwrap();
                    if framed.send(bytes::Bytes::from(bytes)).await.is_err() {
                        break;
                    }
                }
            }
        });
        (addr, accepted)
    }

    fn members() -> PushPull {
        PushPull {
            members: vec![foca::Member::alive(NodeId {
                name: "peer".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                generation: 1,
            })],
            left: Vec::new(),
        }
    }

    fn our_state() -> Request {
        Request::PushPull(PushPull {
            members: Vec::new(),
            left: Vec::new(),
        })
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn equal_fingerprints_exchange_no_member_list() {
        let (addr, accepted) = peer(|request| match request {
            Request::PushPullCheck(7) => Some(Response::InSync),
            _ => None,
        })
        .await;
        let (outcome, bytes) = push_pull(&TokioTransport, addr, Some(7), &our_state(), TIMEOUT)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::MembersInSync));
        assert!(bytes < 32, "{bytes} bytes for a fingerprint and its answer");
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn different_fingerprints_ship_the_lists_on_the_same_connection() {
        let (addr, accepted) = peer(|request| match request {
            Request::PushPullCheck(_) => Some(Response::OutOfSync),
            Request::PushPull(_) => Some(Response::PushPull(members())),
            _ => None,
        })
        .await;
        let (outcome, _) = push_pull(&TokioTransport, addr, Some(7), &our_state(), TIMEOUT)
            .await
            .unwrap();
        let Outcome::Members(state) = outcome else {
            panic!("no member list");
        };
        assert_eq!(state.members.len(), 1);
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_know_the_check_gets_a_plain_push_pull() {
        let (addr, accepted) = peer(|request| match request {
            Request::PushPull(_) => Some(Response::PushPull(members())),
            _ => None,
        })
        .await;
        let (outcome, _) = push_pull(&TokioTransport, addr, Some(7), &our_state(), TIMEOUT)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Members(_)));
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    /// Issue 18: one test per unscheduled exchange trigger, each showing that the trigger
    /// cannot fire again before its interval without a new change.
    mod triggers {
        use super::*;
        use crate::membership::{Member, MemberStatus};
        use crate::sync::HintMemory;

        fn addr(port: u16) -> SocketAddr {
            ([127, 0, 0, 1], port).into()
        }

        /// The per-peer gap of the LAN profile (a quarter sync interval).
        fn gap() -> Duration {
            Profile::Lan.sync_interval() / 4
        }

        fn member(status: MemberStatus) -> Member {
            Member {
                name: "b".into(),
                addr: addr(2),
                status,
                generation: 1,
            }
        }

        /// Every start of `trigger` with the same peer a datagram (1 ms) apart over 2 s, as
        /// the storm repeated it: how many the limit lets through, at which offsets.
        fn repeated(trigger: Trigger) -> Vec<Duration> {
            let mut limits = Limits::new(Profile::Lan);
            let t0 = Instant::now();
            (0..2000u64)
                .map(Duration::from_millis)
                .filter(|&at| limits.admit(trigger, addr(2), t0 + at).is_ok())
                .collect()
        }

        #[tokio::test(start_paused = true)]
        async fn a_hint_fetch_acts_once_per_hint_and_once_per_gap() {
            // The same hint again is no change: no fetch at all.
            let mut hints = HintMemory::default();
            assert!(hints.catalog_first_seen("owner", 1, 5));
            assert!(!hints.catalog_first_seen("owner", 1, 5));
            // New hints of the same owner after every datagram: one fetch per gap.
            let mut limits = Limits::new(Profile::Lan);
            let t0 = Instant::now();
            let mut fetched = Vec::new();
            for ms in 0..2000u64 {
                let at = t0 + Duration::from_millis(ms);
                if hints.catalog_first_seen("owner", 1, 6 + ms)
                    && limits.admit(Trigger::HintFetch, addr(2), at).is_ok()
                {
                    fetched.push(ms);
                }
            }
            assert_eq!(fetched, vec![0, 500, 1000, 1500]);
            assert_eq!(repeated(Trigger::HintFetch).len(), fetched.len());
        }

        #[tokio::test(start_paused = true)]
        async fn first_contact_exchanges_cannot_repeat_within_the_gap() {
            // They fire on the change "no peer" -> "a peer"; a flapping contact (lost and
            // found after every datagram) starts one of each per gap.
            for trigger in [Trigger::FirstContactPushPull, Trigger::FirstContactSync] {
                let starts = repeated(trigger);
                assert_eq!(starts.len(), 4, "{trigger:?}");
                assert!(
                    starts.windows(2).all(|w| w[1] - w[0] >= gap()),
                    "{trigger:?}"
                );
            }
            // Each kind has its own limit: the first contact starts both at once.
            let mut limits = Limits::new(Profile::Lan);
            let t0 = Instant::now();
            assert_eq!(
                limits.admit(Trigger::FirstContactPushPull, addr(2), t0),
                Ok(())
            );
            assert_eq!(limits.admit(Trigger::FirstContactSync, addr(2), t0), Ok(()));
            assert_eq!(
                limits.admit(Trigger::FirstContactPushPull, addr(2), t0),
                Err(Refusal::PeerTooSoon)
            );
        }

        #[tokio::test(start_paused = true)]
        async fn follow_ups_are_three_and_each_waits_its_gap() {
            // After a first contact: 1, 2 and 4 s later, then never without a new one.
            let mut gaps = vec![FOLLOWUP_FIRST];
            while let Some(next) = next_followup(*gaps.last().unwrap()) {
                gaps.push(next);
            }
            assert_eq!(gaps, [1, 2, 4].map(Duration::from_secs));
            // Each one with the first contact's peer is admitted (a second apart at least),
            // but a follow-up repeated within the gap is not.
            let mut limits = Limits::new(Profile::Lan);
            let t0 = Instant::now();
            assert_eq!(
                limits.admit(Trigger::FirstContactPushPull, addr(2), t0),
                Ok(())
            );
            let mut at = t0;
            for gap in gaps {
                at += gap;
                assert_eq!(limits.admit(Trigger::FollowUp, addr(2), at), Ok(()));
                assert_eq!(
                    limits.admit(Trigger::FollowUp, addr(2), at + Duration::from_millis(499)),
                    Err(Refusal::PeerTooSoon)
                );
            }
            assert_eq!(repeated(Trigger::FollowUp).len(), 4);
        }

        #[tokio::test(start_paused = true)]
        async fn a_member_back_is_pushed_once_per_time_it_was_down() {
            let mut progress = Progress::default();
            let t0 = Instant::now();
            let joined = MemberEvent::Joined(member(MemberStatus::Alive));
            let down = MemberEvent::Down(member(MemberStatus::Down));
            assert_eq!(
                progress.member_back(&joined, t0),
                None,
                "never down: no rejoin"
            );
            assert_eq!(progress.member_back(&down, t0), None);
            assert_eq!(progress.member_back(&joined, t0), Some(addr(2)));
            // The same member seen joined again, or updated, is no new change.
            assert_eq!(progress.member_back(&joined, t0), None);
            let updated = MemberEvent::Updated(member(MemberStatus::Alive));
            assert_eq!(progress.member_back(&updated, t0), None);
            // A member flapping down and back after every datagram: one rejoin push-pull
            // per gap.
            let mut limits = Limits::new(Profile::Lan);
            let mut pushed = 0;
            for ms in 0..2000u64 {
                let at = t0 + Duration::from_millis(ms);
                assert_eq!(progress.member_back(&down, at), None);
                if let Some(peer) = progress.member_back(&joined, at) {
                    if limits.admit(Trigger::MemberBack, peer, at).is_ok() {
                        pushed += 1;
                    }
                }
            }
            assert_eq!(pushed, 4);
        }

        #[tokio::test(start_paused = true)]
        async fn unscheduled_starts_share_a_node_budget_across_peers() {
            // Triggers spread over many peers still stay within the node's budget: a burst
            // of 8, then one push-pull per sync interval.
            let mut limits = Limits::new(Profile::Lan);
            let t0 = Instant::now();
            let started = (0..10_000u64)
                .filter(|&ms| {
                    let peer = addr(2 + (ms % 100) as u16);
                    let at = t0 + Duration::from_millis(ms);
                    limits.admit(Trigger::MemberBack, peer, at).is_ok()
                })
                .count();
            assert!((8..=14).contains(&started), "{started}");
        }
    }
}
