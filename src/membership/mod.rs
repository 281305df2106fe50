//! Membership: SWIM through foca, driven sans-IO.
//!
//! [`Membership`] owns foca, its timers and the member view. It never touches a socket or a
//! clock: callers hand in datagrams and the current instant, and take out datagrams to send
//! and member events. The node's driver task does the IO; simulations can drive it directly.

mod buddy;
mod codec;
mod identity;
mod profile;
pub mod suspicion;
mod timers;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, NoCustomBroadcast, OwnedNotification, State,
};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use buddy::SuspicionNotices;
pub use codec::{BincodeCodec, LocalIdentity};
pub use identity::{validate_name, NodeId, MAX_NAME_LEN};
pub use profile::Profile;
pub use suspicion::{DynamicSuspicion, WithSuspicions};
pub use timers::{TimerQueue, MAX_HEALTH_SCORE};

use crate::wire::{self, DatagramKind, WireError};

/// How many departed identities are remembered as gracefully left.
const MAX_LEFT_REMEMBERED: usize = 4096;
/// How many down or left members the view keeps before dropping the oldest.
const MAX_DEAD_IN_VIEW: usize = 4096;
/// How long a down or left member stays listed.
const DEAD_MEMBER_RETENTION: Duration = Duration::from_secs(3600);
/// Largest custom broadcast item: foca accepts bigger ones but never sends them.
pub const MAX_BROADCAST_ITEM: usize = 1024;
/// Most members accepted in one push-pull exchange.
pub const MAX_PUSH_PULL_MEMBERS: usize = 65_536;
/// Most custom broadcasts (state deltas) queued for gossip at once. Beyond it, a change is
/// still applied but not queued: anti-entropy carries it. A bulk write of thousands of config
/// keys thus never queues megabytes in foca.
pub const MAX_BROADCAST_BACKLOG: usize = 2048;

/// How many custom broadcasts foca holds, shared between [`Membership`] (which sets it after
/// every call into foca) and the broadcast handler (which stops passing news on at
/// [`MAX_BROADCAST_BACKLOG`]).
#[derive(Debug, Clone, Default)]
pub struct BroadcastBacklog(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl BroadcastBacklog {
    /// Custom broadcasts queued after the last call into foca.
    pub fn len(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the queue takes no more items.
    pub fn is_full(&self) -> bool {
        self.len() >= MAX_BROADCAST_BACKLOG
    }

    pub(crate) fn set(&self, len: usize) {
        self.0.store(len, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Liveness of a member as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Answering probes.
    Alive,
    /// Missed probes; will be declared down unless it refutes.
    Suspect,
    /// Declared failed by the failure detector.
    Down,
    /// Left the cluster gracefully.
    Left,
}

impl MemberStatus {
    /// True for alive and suspect members.
    pub fn is_active(self) -> bool {
        matches!(self, MemberStatus::Alive | MemberStatus::Suspect)
    }
}

impl std::fmt::Display for MemberStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberStatus::Alive => "alive",
            MemberStatus::Suspect => "suspect",
            MemberStatus::Down => "down",
            MemberStatus::Left => "left",
        })
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique node name.
    pub name: String,
    /// Advertised address.
    pub addr: SocketAddr,
    /// Liveness.
    pub status: MemberStatus,
    /// Identity generation (grows on restart or renewal).
    pub generation: u64,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberEvent {
    /// A member appeared, or came back after being down or left.
    Joined(Member),
    /// A member is suspected of having failed.
    Suspect(Member),
    /// A member was declared failed.
    Down(Member),
    /// A member left gracefully.
    Left(Member),
    /// A member refuted a suspicion or renewed its identity (a new generation).
    Updated(Member),
}

impl MemberEvent {
    /// The member the event is about.
    pub fn member(&self) -> &Member {
        match self {
            MemberEvent::Joined(m)
            | MemberEvent::Suspect(m)
            | MemberEvent::Down(m)
            | MemberEvent::Left(m)
            | MemberEvent::Updated(m) => m,
        }
    }
}

/// What [`Membership::force_leave`] did, as Consul's `force-leave` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForceLeave {
    /// No member of that name is listed.
    NotFound,
    /// The member is alive (or is this node): left as it is, as Consul leaves a live,
    /// reachable member in place.
    Alive,
    /// The failed (suspect or down) member is now `left`, here and, by a leave notice, on
    /// every live peer; its instances leave lookups.
    Left,
    /// The member was `left` (now or before) and is removed from this node's member list.
    Pruned,
}

/// Full member list exchanged over TCP so that join bursts and missed broadcasts heal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushPull {
    /// foca's membership state of the sender, itself included as alive.
    pub members: Vec<foca::Member<NodeId>>,
    /// Identities the sender knows left gracefully.
    pub left: Vec<NodeId>,
}

/// Errors of the membership core.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// A datagram that could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// foca rejected the packet or the operation.
    #[error("swim: {0}")]
    Swim(#[from] foca::Error),
    /// A push-pull exchange larger than allowed.
    #[error("push-pull of {0} members exceeds the limit of {MAX_PUSH_PULL_MEMBERS}")]
    TooManyMembers(usize),
    /// The broadcast queue is full; the change spreads by anti-entropy instead.
    #[error("the broadcast queue holds {MAX_BROADCAST_BACKLOG} items already")]
    BacklogFull,
}

struct ViewEntry {
    member: Member,
    /// When the member last changed status.
    since: Instant,
}

type SwimCore<B> = Foca<NodeId, BincodeCodec<NodeId>, SmallRng, WithSuspicions<B, NodeId>>;

/// SWIM membership of one node, without IO. `B` receives the custom broadcasts
/// (replicated-state deltas) that ride on SWIM packets.
pub struct Membership<B: BroadcastHandler<NodeId> = NoCustomBroadcast> {
    foca: SwimCore<B>,
    runtime: AccumulatingRuntime<NodeId>,
    profile: Profile,
    /// Cluster size foca's configuration was last tuned for.
    tuned_for: usize,
    timers: TimerQueue,
    backlog: BroadcastBacklog,
    view: BTreeMap<String, ViewEntry>,
    left: VecDeque<NodeId>,
    /// Identities `force-leave -prune` removed from the view: foca still holds them as
    /// down, and they stay out of the view unless they come back.
    pruned: VecDeque<NodeId>,
    events: Vec<MemberEvent>,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// The identity the codec recognises hashed destinations by (see `codec`).
    local: LocalIdentity<NodeId>,
    leaving: bool,
    view_version: u64,
    notices: SuspicionNotices<NodeId>,
    notice_codec: BincodeCodec<NodeId>,
    /// Lifeguard's dynamic suspicion, shared with the broadcast handler.
    suspicion: DynamicSuspicion<NodeId>,
}

impl Membership {
    /// Creates the membership of `identity`, with foca's randomness seeded by `seed`.
    pub fn new(identity: NodeId, profile: Profile, seed: u64, now: Instant) -> Self {
        Membership::with_broadcasts(identity, profile, seed, now, NoCustomBroadcast)
    }
}

impl<B> Membership<B>
where
    B: BroadcastHandler<NodeId>,
    B::Error: 'static,
{
    /// Creates the membership of `identity` whose custom broadcasts go to `handler`.
    pub fn with_broadcasts(
        identity: NodeId,
        profile: Profile,
        seed: u64,
        now: Instant,
        handler: B,
    ) -> Self {
        let local = LocalIdentity::new(identity.clone());
        let (min, max, k) = profile.suspicion_bounds(1);
        let suspicion = DynamicSuspicion::new(min, max, k);
        let foca = Foca::with_custom_broadcast(
            identity.clone(),
            profile.foca_config(1),
            SmallRng::seed_from_u64(seed),
            // A hashed destination that is not ours: no node has an empty name.
            BincodeCodec::with_local(local.clone(), NodeId::seed(identity.addr)),
            WithSuspicions::new(handler, suspicion.clone()),
        );
        let mut view = BTreeMap::new();
        view.insert(
            identity.name.clone(),
            ViewEntry {
                member: Member {
                    name: identity.name.clone(),
                    addr: identity.addr,
                    status: MemberStatus::Alive,
                    generation: identity.generation,
                },
                since: now,
            },
        );
        Membership {
            foca,
            runtime: AccumulatingRuntime::new(),
            profile,
            tuned_for: 1,
            timers: TimerQueue::new(profile, now),
            backlog: BroadcastBacklog::default(),
            view,
            left: VecDeque::new(),
            pruned: VecDeque::new(),
            events: Vec::new(),
            outbox: Vec::new(),
            local,
            leaving: false,
            view_version: 0,
            notices: SuspicionNotices::new(profile.foca_config(1).probe_period),
            notice_codec: BincodeCodec::default(),
            suspicion,
        }
    }

    /// This node's current identity.
    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Number of live (alive or suspect) peers, this node excluded.
    pub fn num_active_peers(&self) -> usize {
        self.foca.num_members()
    }

    /// Addresses of live peers, in a stable order.
    pub fn active_peer_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<_> = self.foca.iter_members().map(|m| m.id().addr).collect();
        addrs.sort();
        addrs
    }

    /// Asks the node at `addr` (name unknown) to let this node in.
    pub fn announce_to(&mut self, addr: SocketAddr, now: Instant) -> Result<(), MembershipError> {
        let result = self.foca.announce(NodeId::seed(addr), &mut self.runtime);
        self.after_call(now);
        Ok(result?)
    }

    /// Handles one received datagram.
    pub fn handle_datagram(
        &mut self,
        datagram: &[u8],
        now: Instant,
    ) -> Result<(), MembershipError> {
        let (kind, payload) = wire::open_datagram(datagram)?;
        match kind {
            DatagramKind::Swim => {
                let backlog = self.foca.custom_broadcast_backlog();
                // Confirmations of suspicions that arrive in it are dated now.
                self.suspicion.at(now);
                let result = self.foca.handle_data(payload, &mut self.runtime);
                if self.foca.custom_broadcast_backlog() > backlog {
                    // News arrived: pass it on now rather than on the next gossip round,
                    // so a change crosses the cluster in a few network hops.
                    if let Err(error) = self.foca.broadcast(&mut self.runtime) {
                        tracing::debug!(%error, "eager broadcast failed");
                    }
                }
                self.after_call(now);
                result?;
            }
            DatagramKind::Leave => {
                let (leaver, used): (NodeId, usize) = wire::decode_datagram_prefix(payload)?;
                if used != payload.len() {
                    return Err(WireError::Trailing(payload.len() - used).into());
                }
                // Down at once in foca too, and passed on: otherwise a node whose foca
                // missed the leaver's own gossip shows it live until its probes fail and a
                // suspicion runs out (seen in simulation: 3 s at 20 nodes).
                let live = self.foca.iter_members().any(|m| *m.id() == leaver);
                self.remember_left(leaver.clone());
                if live {
                    let down = std::iter::once(foca::Member::down(leaver));
                    let result = self.foca.apply_many(down, true, &mut self.runtime);
                    self.after_call(now);
                    result?;
                } else {
                    self.refresh_view(now);
                }
            }
        }
        Ok(())
    }

    /// Queues a custom broadcast (at most about 1 KB) and sends it to a few peers at once;
    /// it then rides on SWIM traffic a bounded number of times. `Ok(false)` if the handler
    /// found nothing new in it.
    pub fn add_broadcast(&mut self, item: &[u8], now: Instant) -> Result<bool, MembershipError> {
        if item.len() > MAX_BROADCAST_ITEM {
            return Err(WireError::TooLarge {
                size: item.len(),
                limit: MAX_BROADCAST_ITEM,
            }
            .into());
        }
        if self.backlog.is_full() {
            return Err(MembershipError::BacklogFull);
        }
        let added = self.foca.add_broadcast(item)?;
        if added {
            let result = self.foca.broadcast(&mut self.runtime);
            self.after_call(now);
            result?;
        }
        Ok(added)
    }

    /// Keeps the count of queued custom broadcasts in `backlog`, which the broadcast
    /// handler shares so that it stops passing news on when the queue is full.
    pub fn share_backlog(&mut self, backlog: BroadcastBacklog) {
        backlog.set(self.foca.custom_broadcast_backlog());
        self.backlog = backlog;
    }

    /// Items waiting in the broadcast queues (member updates and custom broadcasts).
    pub fn broadcast_backlog(&self) -> usize {
        self.foca.updates_backlog() + self.foca.custom_broadcast_backlog()
    }

    /// The deadline of the earliest pending timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.timers.next_deadline(), self.suspicion.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires every timer due at `now`, in deadline order. Timers found far overdue (the
    /// node was stalled) are re-armed rather than fired on stale evidence; see
    /// [`TimerQueue`].
    pub fn handle_due_timers(&mut self, now: Instant) {
        let stalls = self.timers.stalls();
        while let Some(timer) = self.timers.pop_due(now) {
            let verdict_on = suspicion_subject(&timer);
            if let Err(error) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(%error, "timer handling failed");
            }
            if let Some(subject) = verdict_on {
                if !is_down(&self.foca, &subject) {
                    // foca 2.0.0 sends `TurnUndead` even when the suspect refuted in time
                    // (the verdict did not apply), which makes a healthy node renew its
                    // identity: withhold that message.
                    self.withhold_sends_to(subject.addr);
                }
            }
            // Timers scheduled while handling this one are relative to `now`.
            self.after_call(now);
        }
        self.declare_confirmed_suspects(now);
        if self.timers.stalls() > stalls {
            tracing::warn!(
                "this node was stalled: overdue failure-detector timers re-armed, not fired"
            );
        }
    }

    /// Declares down the suspects whose suspicion independent confirmations shortened
    /// (see [`suspicion`]), as foca's own verdict would: through foca, gossiped.
    fn declare_confirmed_suspects(&mut self, now: Instant) {
        // The failed probe that raised a suspicion adds one to the score itself; more means
        // this node's own view is doubtful.
        let healthy = self.timers.health_score(now) <= 1;
        let verdicts =
            self.suspicion
                .take_verdicts(now, healthy, self.foca.iter_membership_state());
        if verdicts.is_empty() {
            return;
        }
        for verdict in &verdicts {
            tracing::debug!(member = %verdict.id(), "suspicion confirmed by peers: down");
        }
        let result = self
            .foca
            .apply_many(verdicts.into_iter(), true, &mut self.runtime);
        self.after_call(now);
        if let Err(error) = result {
            tracing::debug!(%error, "could not declare a confirmed suspect down");
        }
    }

    /// Suspicions this node declared down before foca's fixed time, thanks to independent
    /// confirmations (Lifeguard's dynamic suspicion).
    pub fn suspicions_shortened(&self) -> u64 {
        self.suspicion.shortened()
    }

    /// Local health (Lifeguard): 0 when healthy, up to [`MAX_HEALTH_SCORE`] after failed
    /// probes or a stall. Suspicions this node raises last `1 + score` times longer.
    pub fn health_score(&self, now: Instant) -> u32 {
        self.timers.health_score(now)
    }

    /// How many times this node found its timers far overdue (it had been stalled).
    pub fn stalls(&self) -> u64 {
        self.timers.stalls()
    }

    /// Leaves the cluster gracefully: tells every live peer directly, then lets foca gossip
    /// this node's departure. The node should stop shortly after.
    pub fn leave(&mut self, now: Instant) -> Result<(), MembershipError> {
        let me = self.identity().clone();
        let mut notice = Vec::with_capacity(wire::MAX_DATAGRAM);
        wire::begin_datagram(DatagramKind::Leave, &mut notice);
        wire::encode_datagram_into(&me, &mut notice, wire::MAX_DATAGRAM)?;
        for addr in self.active_peer_addrs() {
            self.outbox.push((addr, notice.clone()));
        }
        self.leaving = true;
        self.remember_left(me.clone());
        let result = self.foca.leave_cluster(&mut self.runtime);
        self.after_call(now);
        Ok(result?)
    }

    /// Forces the failed member `name` into the `left` state (Consul's `force-leave`): it
    /// is declared down in foca and remembered as left, and every live peer gets the leave
    /// notice the member would have sent itself. A live member is left alone (it would
    /// refute, as in Consul). With `prune`, a left member is also dropped from this node's
    /// member list at once instead of after the retention time; the prune is local.
    pub fn force_leave(
        &mut self,
        name: &str,
        prune: bool,
        now: Instant,
    ) -> Result<ForceLeave, MembershipError> {
        let Some(entry) = self.view.get(name) else {
            return Ok(ForceLeave::NotFound);
        };
        let listed = entry.member.clone();
        if name == self.identity().name || listed.status == MemberStatus::Alive {
            return Ok(ForceLeave::Alive);
        }
        // Every identity foca holds under that name, and the one listed (foca may have
        // forgotten it already).
        let mut ids: Vec<NodeId> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().name == name)
            .map(|m| m.id().clone())
            .collect();
        let listed_id = NodeId {
            name: listed.name.clone(),
            addr: listed.addr,
            generation: listed.generation,
        };
        if !ids.contains(&listed_id) {
            ids.push(listed_id);
        }
        let mut result = Ok(());
        if listed.status != MemberStatus::Left {
            let peers = self.active_peer_addrs();
            for id in &ids {
                let mut notice = Vec::with_capacity(wire::MAX_DATAGRAM);
                wire::begin_datagram(DatagramKind::Leave, &mut notice);
                wire::encode_datagram_into(id, &mut notice, wire::MAX_DATAGRAM)?;
                for addr in peers.iter().filter(|a| **a != id.addr) {
                    self.outbox.push((*addr, notice.clone()));
                }
                self.remember_left(id.clone());
            }
            let live: Vec<_> = ids
                .iter()
                .filter(|id| self.foca.iter_members().any(|m| m.id() == *id))
                .cloned()
                .map(foca::Member::down)
                .collect();
            if !live.is_empty() {
                result = self
                    .foca
                    .apply_many(live.into_iter(), true, &mut self.runtime);
            }
            self.after_call(now);
        }
        result?;
        if !prune {
            return Ok(ForceLeave::Left);
        }
        for id in ids {
            if !self.pruned.contains(&id) {
                if self.pruned.len() >= MAX_LEFT_REMEMBERED {
                    self.pruned.pop_front();
                }
                self.pruned.push_back(id);
            }
        }
        if self.view.remove(name).is_some() {
            self.view_version += 1;
        }
        Ok(ForceLeave::Pruned)
    }

    /// This node's state for a push-pull exchange.
    pub fn push_pull_state(&self) -> PushPull {
        let mut members: Vec<_> = self.foca.iter_membership_state().cloned().collect();
        if !self.leaving {
            members.push(foca::Member::alive(self.identity().clone()));
        }
        PushPull {
            members,
            left: self.left.iter().cloned().collect(),
        }
    }

    /// A fingerprint of the member list that converged views share: see
    /// [`members_fingerprint`]. Equal fingerprints mean a push-pull would teach neither side
    /// anything about who is live.
    pub fn members_fingerprint(&self) -> u64 {
        members_fingerprint(
            self.foca.iter_membership_state(),
            (!self.leaving).then(|| self.identity()),
        )
    }

    /// Merges a peer's push-pull state.
    pub fn apply_push_pull(
        &mut self,
        state: PushPull,
        now: Instant,
    ) -> Result<(), MembershipError> {
        let count = state.members.len() + state.left.len();
        if count > MAX_PUSH_PULL_MEMBERS {
            return Err(MembershipError::TooManyMembers(count));
        }
        for leaver in state.left {
            self.remember_left(leaver);
        }
        let result = self
            .foca
            .apply_many(state.members.into_iter(), false, &mut self.runtime);
        self.after_call(now);
        Ok(result?)
    }

    /// Takes the datagrams to send, as `(destination, bytes)`.
    pub fn drain_outbox(&mut self) -> impl Iterator<Item = (SocketAddr, Vec<u8>)> + '_ {
        self.outbox.drain(..)
    }

    /// Takes the member events produced since the last call.
    pub fn drain_events(&mut self) -> impl Iterator<Item = MemberEvent> + '_ {
        self.events.drain(..)
    }

    /// A counter that changes whenever the member list does.
    pub fn view_version(&self) -> u64 {
        self.view_version
    }

    /// The member list, this node included, sorted by name.
    pub fn members(&self) -> Vec<Member> {
        self.view.values().map(|e| e.member.clone()).collect()
    }

    /// Moves what foca queued for sending to the outbox, except what goes to `addr`.
    fn withhold_sends_to(&mut self, addr: SocketAddr) {
        while let Some((to, data)) = self.runtime.to_send() {
            if to.addr != addr {
                self.outbox.push((to.addr, swim_datagram(&data)));
            }
        }
    }

    fn remember_left(&mut self, id: NodeId) {
        if !self.left.contains(&id) {
            if self.left.len() >= MAX_LEFT_REMEMBERED {
                self.left.pop_front();
            }
            self.left.push_back(id);
        }
    }

    /// Collects what foca produced and brings the view up to date.
    fn after_call(&mut self, now: Instant) {
        // After a renewal, packets to the new identity must be recognised as ours.
        self.local.follow(self.foca.identity());
        self.backlog.set(self.foca.custom_broadcast_backlog());
        while let Some((to, data)) = self.runtime.to_send() {
            self.outbox.push((to.addr, swim_datagram(&data)));
        }
        let mut confirmations = Vec::new();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.notices.note_timer(&timer, now);
            if let Some(item) = self.suspicion.note_timer(&timer, self.foca.identity(), now) {
                confirmations.push(item);
            }
            self.timers.schedule(after, timer, now);
        }
        let mut defunct = false;
        let mut went_down = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::Defunct => defunct = true,
                OwnedNotification::MemberDown(id) => {
                    tracing::trace!(member = %id, "member down");
                    went_down = true;
                }
                OwnedNotification::Rename(old, new) => {
                    tracing::debug!(%old, %new, "member renewed its identity");
                }
                other => tracing::trace!(?other, "membership notification"),
            }
        }
        if defunct && !self.leaving {
            // The cluster declared this node down (perhaps wrongly): come back under a
            // renewed identity, which peers see as the same member with a new generation.
            if let Some(renewed) = foca::Identity::renew(self.identity()) {
                tracing::info!(identity = %renewed, "declared down by the cluster; rejoining");
                if let Err(error) = self.foca.change_identity(renewed, &mut self.runtime) {
                    tracing::warn!(%error, "could not renew identity");
                }
                return self.after_call(now);
            }
        }
        self.refresh_view(now);
        self.send_suspicion_notices(now);
        self.retune();
        if went_down && !self.leaving {
            self.gossip_news(now);
        }
        if !confirmations.is_empty() && !self.leaving {
            self.gossip_confirmations(&confirmations, now);
        }
    }

    /// Passes member updates on at once rather than on the next gossip round (200 ms on a
    /// LAN, a round per hop): used when a member went down, news every node acts on, which
    /// then crosses the cluster in a few network hops. At most once per member down and
    /// node, so it costs a few datagrams per crash.
    fn gossip_news(&mut self, now: Instant) {
        if self.foca.updates_backlog() == 0 {
            return;
        }
        if let Err(error) = self.foca.gossip(&mut self.runtime) {
            tracing::debug!(%error, "eager gossip failed");
        }
        self.after_call(now);
    }

    /// Gossips this node's own suspicions (see [`suspicion`]), sent to a few peers at once.
    fn gossip_confirmations(&mut self, items: &[Vec<u8>], now: Instant) {
        for item in items {
            if self.foca.custom_broadcast_backlog() >= MAX_BROADCAST_BACKLOG {
                break;
            }
            if let Err(error) = self.foca.add_broadcast(item) {
                tracing::debug!(%error, "could not gossip a suspicion");
            }
        }
        if let Err(error) = self.foca.broadcast(&mut self.runtime) {
            tracing::debug!(%error, "eager broadcast failed");
        }
        self.after_call(now);
    }

    /// Tells the members this node suspects that they are suspected (see [`buddy`]).
    fn send_suspicion_notices(&mut self, now: Instant) {
        if self.leaving || !self.notices.any_due(now) {
            return;
        }
        let due = self.notices.take_due(
            now,
            self.foca.identity(),
            self.foca.iter_membership_state(),
            &mut self.notice_codec,
        );
        for (suspect, packet) in due {
            self.outbox.push((suspect.addr, swim_datagram(&packet)));
        }
    }

    /// How many suspicion notices (Lifeguard's buddy system) this node sent.
    pub fn suspicion_notices_sent(&self) -> u64 {
        self.notices.sent()
    }

    /// Re-tunes foca (transmissions, suspicion time) when the cluster size changes a lot.
    fn retune(&mut self) {
        let size = self.foca.num_members() + 1;
        if size > self.tuned_for * 2 || size * 2 < self.tuned_for {
            if let Err(error) = self.foca.set_config(self.profile.foca_config(size)) {
                tracing::debug!(%error, "could not re-tune foca");
            }
            let (min, max, k) = self.profile.suspicion_bounds(size);
            self.suspicion.retune(min, max, k);
            self.tuned_for = size;
        }
    }

    /// Recomputes the view from foca's state and records events for what changed.
    fn refresh_view(&mut self, now: Instant) {
        let me = self.identity().clone();
        // The newest generation of each name is the one that counts.
        let mut latest: BTreeMap<String, foca::Member<NodeId>> = BTreeMap::new();
        for member in self.foca.iter_membership_state() {
            let name = &member.id().name;
            if *name == me.name
                || (member.state() == State::Down && self.pruned.contains(member.id()))
            {
                continue;
            }
            match latest.get(name) {
                Some(seen) if seen.id().generation >= member.id().generation => {}
                _ => {
                    latest.insert(name.clone(), member.clone());
                }
            }
        }
        let mut fresh: Vec<Member> = latest
            .values()
            .map(|m| Member {
                name: m.id().name.clone(),
                addr: m.id().addr,
                generation: m.id().generation,
                status: match m.state() {
                    State::Alive => MemberStatus::Alive,
                    State::Suspect => MemberStatus::Suspect,
                    State::Down if self.left.contains(m.id()) => MemberStatus::Left,
                    State::Down => MemberStatus::Down,
                },
            })
            .collect();
        fresh.push(Member {
            name: me.name.clone(),
            addr: me.addr,
            generation: me.generation,
            status: if self.leaving {
                MemberStatus::Left
            } else {
                MemberStatus::Alive
            },
        });
        for member in fresh {
            self.update_view_entry(member, now);
        }
        // Members foca forgot (down for long) and those missing: not active any more.
        let known: Vec<String> = self.view.keys().cloned().collect();
        for name in known {
            if name == me.name || latest.contains_key(&name) {
                continue;
            }
            let Some(entry) = self.view.get(&name) else {
                continue;
            };
            if entry.member.status.is_active() {
                let mut member = entry.member.clone();
                member.status = if self.left.iter().any(|l| l.name == name) {
                    MemberStatus::Left
                } else {
                    MemberStatus::Down
                };
                self.update_view_entry(member, now);
            }
        }
        self.reap_dead(now);
    }

    fn update_view_entry(&mut self, member: Member, now: Instant) {
        let event = match self.view.get(&member.name) {
            None if member.status.is_active() => Some(MemberEvent::Joined(member.clone())),
            None => None,
            Some(old) if old.member == member => return,
            Some(old) => {
                use MemberStatus::*;
                match (old.member.status, member.status) {
                    (Down | Left, Alive | Suspect) => Some(MemberEvent::Joined(member.clone())),
                    (_, Left) if old.member.status != Left => {
                        Some(MemberEvent::Left(member.clone()))
                    }
                    (Alive | Suspect, Down) => Some(MemberEvent::Down(member.clone())),
                    (Alive, Suspect) => Some(MemberEvent::Suspect(member.clone())),
                    (Alive | Suspect, Alive | Suspect) => {
                        Some(MemberEvent::Updated(member.clone()))
                    }
                    // A stale view of an old generation; nothing a subscriber must act on.
                    _ => None,
                }
            }
        };
        let since = match self.view.get(&member.name) {
            Some(old) if old.member.status == member.status => old.since,
            _ => now,
        };
        self.view
            .insert(member.name.clone(), ViewEntry { member, since });
        self.view_version += 1;
        if let Some(event) = event {
            self.events.push(event);
        }
    }

    fn reap_dead(&mut self, now: Instant) {
        let mut dead: Vec<(Instant, String)> = self
            .view
            .values()
            .filter(|e| !e.member.status.is_active() && e.member.name != self.identity().name)
            .map(|e| (e.since, e.member.name.clone()))
            .collect();
        if dead.is_empty() {
            return;
        }
        dead.sort();
        let excess = dead.len().saturating_sub(MAX_DEAD_IN_VIEW);
        for (i, (since, name)) in dead.into_iter().enumerate() {
            if i < excess || now.saturating_duration_since(since) > DEAD_MEMBER_RETENTION {
                self.view.remove(&name);
                self.view_version += 1;
            }
        }
    }
}

/// Fingerprint of a member list for the push-pull check: an order-independent hash of
/// `(name, generation, alive or suspect)` of every live member, `me` (this node, `None` once
/// it leaves) included.
///
/// Only what converging views agree on is covered. foca's incarnation numbers are left out
/// (a member that refuted a suspicion bumps it, and peers that never heard the suspicion
/// keep the old one; a push-pull would not change their view). Down and left members are
/// left out too: each node forgets them after a local timeout, so views disagree on them
/// for long after they agree on who is live; a node that still holds such a member live
/// differs in its live set anyway.
pub fn members_fingerprint<'a>(
    members: impl IntoIterator<Item = &'a foca::Member<NodeId>>,
    me: Option<&NodeId>,
) -> u64 {
    fingerprint_of(
        members
            .into_iter()
            .map(|m| (m.id().name.as_str(), m.id().generation, m.state())),
        me.map(|me| (me.name.as_str(), me.generation)),
    )
}

/// [`members_fingerprint`] over `(name, generation, state)` triples, for member lists held
/// with another identity type (the simulator's compact one).
pub fn fingerprint_of<'a>(
    members: impl IntoIterator<Item = (&'a str, u64, State)>,
    me: Option<(&'a str, u64)>,
) -> u64 {
    // The newest generation of each name counts, as in the member view.
    let mut latest: BTreeMap<&str, (u64, State)> = BTreeMap::new();
    for (name, generation, state) in members {
        match latest.get(name) {
            Some((known, _)) if *known >= generation => {}
            _ => {
                latest.insert(name, (generation, state));
            }
        }
    }
    if let Some((name, generation)) = me {
        latest.insert(name, (generation, State::Alive));
    }
    let mut hasher = wire::StableHasher::new();
    for (name, (generation, state)) in latest {
        let live = match state {
            State::Alive => 1u8,
            State::Suspect => 2,
            State::Down => continue,
        };
        hasher.write(&(name.len() as u64).to_le_bytes());
        hasher.write(name.as_bytes());
        hasher.write(&generation.to_le_bytes());
        hasher.write(&[live]);
    }
    hasher.finish()
}

/// A foca packet in grapevine's datagram envelope: tagged, except an acknowledgement
/// (its sender's tag travels on the sender's own probes).
pub fn swim_datagram(packet: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(wire::ENVELOPE_LEN + packet.len());
    if codec::is_compact_acknowledgement(packet) {
        wire::begin_untagged_swim_datagram(&mut datagram);
    } else {
        wire::begin_datagram(DatagramKind::Swim, &mut datagram);
    }
    datagram.extend_from_slice(packet);
    datagram
}

/// The member a suspicion timer would declare down.
pub fn suspicion_subject<T: Clone>(timer: &foca::Timer<T>) -> Option<T> {
    match timer {
        foca::Timer::ChangeSuspectToDown { member_id, .. } => Some(member_id.clone()),
        _ => None,
    }
}

/// Whether foca holds `id` as down (a suspicion verdict applied).
pub fn is_down<B>(foca: &SwimCore<B>, id: &NodeId) -> bool
where
    B: BroadcastHandler<NodeId>,
    B::Error: 'static,
{
    foca.iter_membership_state()
        .any(|m| m.id() == id && m.state() == State::Down)
}

#[cfg(test)]
mod tests;
