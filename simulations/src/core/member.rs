//! The membership of one simulated node, behind one interface with two implementations.
//!
//! - [`Core::Library`] is grapevine's own [`Membership`], exactly as the node driver uses it.
//! - [`Core::Lean`] drives the same foca (same configuration from [`Profile::foca_config`],
//!   same [`BincodeCodec`], same datagram envelope, same [`StateBroadcasts`] handler) with a
//!   copy of `Membership`'s protocol logic (eager re-broadcast of news, identity renewal when
//!   declared down, re-tuning as the cluster grows, leave notices, push-pull with the left
//!   list) but without the member *view* that `Membership` rebuilds after every call. That
//!   view is local book-keeping that never reaches the wire, and rebuilding it costs
//!   O(n log n) with allocations per call and a second copy of the member list per node,
//!   which is what keeps 10,000 library instances out of reach (see the README).
//!
//! Both put the same bytes on the wire in the same order: `tests/scenarios.rs` runs the same
//! scenarios through both and asserts identical reports. The lean wrapper stores a compact
//! identity ([`SimId`]) with `NodeId`'s encoding.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use foca::{AccumulatingRuntime, Foca, OwnedNotification, State};
use grapevine::membership::{
    fingerprint_of, suspicion_subject, DynamicSuspicion, Profile, SuspicionNotices, TimerQueue,
    WithSuspicions, MAX_BROADCAST_BACKLOG, MAX_BROADCAST_ITEM,
};
use grapevine::membership::{
    swim_datagram, BincodeCodec, LocalIdentity, MemberEvent, Membership, NodeId, PushPull,
};
use grapevine::sync::StateBroadcasts;
use grapevine::wire::{self, DatagramKind, WireError};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::ident::SimId;

/// Which implementation of the membership a simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapper {
    /// grapevine's `Membership` (the code the node runs).
    Library,
    /// foca driven with `Membership`'s protocol logic but no member view (for 10k nodes).
    Lean,
}

/// A change of a member's liveness the scenarios measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Declared failed.
    Down { name: String, generation: u64 },
    /// Left gracefully.
    Left { name: String, generation: u64 },
    /// Appeared, or came back after being down or left.
    Up { name: String },
}

impl Change {
    /// The member it is about.
    pub fn name(&self) -> &str {
        match self {
            Change::Down { name, .. } | Change::Left { name, .. } | Change::Up { name } => name,
        }
    }
}

/// A push-pull state in flight, with its encoded size.
pub enum Snapshot {
    /// The library's own state.
    Library(PushPull),
    /// The lean wrapper's state, shared while it does not change.
    Lean {
        members: Arc<Vec<foca::Member<SimId>>>,
        left: Vec<SimId>,
        hash: u64,
    },
}

impl Snapshot {
    /// Bytes of the TCP frame carrying it: bincode of `PushPull`, one byte of request or
    /// response tag, four bytes of length prefix.
    pub fn frame_len(&self) -> usize {
        let (members, left) = match self {
            Snapshot::Library(pp) => (
                pp.members.iter().map(member_len).sum::<usize>()
                    + varint_len(pp.members.len() as u64),
                pp.left.iter().map(node_id_len).sum::<usize>() + varint_len(pp.left.len() as u64),
            ),
            Snapshot::Lean { members, left, .. } => (
                members.iter().map(sim_member_len).sum::<usize>()
                    + varint_len(members.len() as u64),
                left.iter().map(sim_id_len).sum::<usize>() + varint_len(left.len() as u64),
            ),
        };
        members + left + 1 + 4
    }
}

/// Length of an unsigned integer in bincode's standard (varint) encoding.
pub fn varint_len(n: u64) -> usize {
    match n {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

fn socket_addr_len(addr: &SocketAddr) -> usize {
    // serde's compact form: variant index, the octets, the port.
    match addr {
        SocketAddr::V4(a) => 1 + 4 + varint_len(u64::from(a.port())),
        SocketAddr::V6(a) => 1 + 16 + varint_len(u64::from(a.port())),
    }
}

fn id_len(name: &str, addr: &SocketAddr, generation: u64) -> usize {
    varint_len(name.len() as u64) + name.len() + socket_addr_len(addr) + varint_len(generation)
}

fn node_id_len(id: &NodeId) -> usize {
    id_len(&id.name, &id.addr, id.generation)
}

fn sim_id_len(id: &SimId) -> usize {
    id_len(id.name(), &id.addr(), id.generation())
}

fn member_len(member: &foca::Member<NodeId>) -> usize {
    node_id_len(member.id()) + varint_len(u64::from(member.incarnation())) + 1
}

fn sim_member_len(member: &foca::Member<SimId>) -> usize {
    sim_id_len(member.id()) + varint_len(u64::from(member.incarnation())) + 1
}

/// A 64-bit hash of one member state; summed (wrapping) it hashes a set in any order.
/// Interned name indexes stand for the names: equal within the process, which is all the
/// set comparisons need.
fn member_hash(member: &foca::Member<SimId>) -> u64 {
    let id = member.id();
    let mut h = mix(0x9e37_79b9_7f4a_7c15u64 ^ u64::from(id.name_index()));
    h = mix(h ^ foca::Identity::addr(id));
    h = mix(h ^ id.generation());
    let state = match member.state() {
        State::Alive => 0u64,
        State::Suspect => 1,
        State::Down => 2,
    };
    mix(h ^ (u64::from(member.incarnation()) << 2 | state))
}

/// The hasher of sets of [`member_hash`] values, which are well mixed already.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Membership of one node.
pub enum Core {
    /// grapevine's `Membership`.
    Library(Box<Membership<StateBroadcasts>>),
    /// The lean wrapper.
    Lean(Box<Lean>),
}

impl Core {
    /// A node's membership.
    pub fn new(
        wrapper: Wrapper,
        identity: NodeId,
        profile: Profile,
        seed: u64,
        now: Instant,
        handler: StateBroadcasts,
    ) -> Self {
        match wrapper {
            Wrapper::Library => Core::Library(Box::new(Membership::with_broadcasts(
                identity, profile, seed, now, handler,
            ))),
            Wrapper::Lean => Core::Lean(Box::new(Lean::new(identity, profile, seed, now, handler))),
        }
    }

    /// Current generation of this node's identity.
    pub fn generation(&self) -> u64 {
        match self {
            Core::Library(m) => m.identity().generation,
            Core::Lean(l) => l.foca.identity().generation(),
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        match self {
            Core::Library(m) => &m.identity().name,
            Core::Lean(l) => l.foca.identity().name(),
        }
    }

    /// Live peers.
    pub fn num_active_peers(&self) -> usize {
        match self {
            Core::Library(m) => m.num_active_peers(),
            Core::Lean(l) => l.foca.num_members(),
        }
    }

    /// The `k`-th live peer address in address order (what the driver's random choice
    /// indexes), or `None` without peers. `k` is taken modulo the number of peers.
    pub fn active_peer(&self, pick: impl FnOnce(usize) -> usize) -> Option<SocketAddr> {
        match self {
            Core::Library(m) => {
                let peers = m.active_peer_addrs();
                if peers.is_empty() {
                    return None;
                }
                Some(peers[pick(peers.len())])
            }
            Core::Lean(l) => {
                // IPv4 as a number, then the port: sorts like the socket address.
                let mut peers: Vec<u64> = l
                    .foca
                    .iter_members()
                    .map(|m| foca::Identity::addr(m.id()))
                    .collect();
                if peers.is_empty() {
                    return None;
                }
                let k = pick(peers.len());
                let (_, &mut nth, _) = peers.select_nth_unstable(k);
                Some(SocketAddr::from((
                    std::net::Ipv4Addr::from((nth >> 16) as u32),
                    nth as u16,
                )))
            }
        }
    }

    /// Calls `f(name, generation)` for every live peer.
    pub fn for_each_active(&self, mut f: impl FnMut(&str, u64)) {
        match self {
            Core::Library(m) => {
                let me = &m.identity().name;
                for member in m.members() {
                    if member.status.is_active() && member.name != *me {
                        f(&member.name, member.generation);
                    }
                }
            }
            Core::Lean(l) => {
                for member in l.foca.iter_members() {
                    f(member.id().name(), member.id().generation());
                }
            }
        }
    }

    /// Asks the node at `addr` to let this node in.
    pub fn announce_to(&mut self, addr: SocketAddr, now: Instant) {
        let _ = match self {
            Core::Library(m) => m.announce_to(addr, now).map_err(|e| e.to_string()),
            Core::Lean(l) => l.announce_to(addr, now),
        };
    }

    /// One received datagram. `false` if it was rejected.
    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) -> bool {
        match self {
            Core::Library(m) => m.handle_datagram(datagram, now).is_ok(),
            Core::Lean(l) => l.handle_datagram(datagram, now).is_ok(),
        }
    }

    /// Queues a custom broadcast.
    pub fn add_broadcast(&mut self, item: &[u8], now: Instant) {
        let _ = match self {
            Core::Library(m) => m
                .add_broadcast(item, now)
                .map(drop)
                .map_err(|e| e.to_string()),
            Core::Lean(l) => l.add_broadcast(item, now),
        };
    }

    /// Earliest pending timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Core::Library(m) => m.next_deadline(),
            Core::Lean(l) => l.next_deadline(),
        }
    }

    /// Fires the timers due at `now`.
    pub fn handle_due_timers(&mut self, now: Instant) {
        match self {
            Core::Library(m) => m.handle_due_timers(now),
            Core::Lean(l) => l.handle_due_timers(now),
        }
    }

    /// Leaves gracefully.
    pub fn leave(&mut self, now: Instant) {
        let _ = match self {
            Core::Library(m) => m.leave(now).map_err(|e| e.to_string()),
            Core::Lean(l) => l.leave(now),
        };
    }

    /// State for a push-pull exchange (`cache` shares equal states between nodes).
    pub fn push_pull_state(&mut self, cache: &mut SnapshotCache) -> Snapshot {
        match self {
            Core::Library(m) => Snapshot::Library(m.push_pull_state()),
            Core::Lean(l) => l.push_pull_state(cache),
        }
    }

    /// Fingerprint of the live member list, what a periodic push-pull sends first (`cache`
    /// shares it between nodes holding the same member set).
    pub fn members_fingerprint(&self, cache: &mut SnapshotCache) -> u64 {
        match self {
            Core::Library(m) => m.members_fingerprint(),
            Core::Lean(l) => {
                // The set hash covers everything the fingerprint reads (and incarnations).
                cache.fingerprint_or_make(l.state_hash(), || {
                    let me = l.foca.identity();
                    fingerprint_of(
                        l.foca
                            .iter_membership_state()
                            .map(|m| (m.id().name(), m.id().generation(), m.state())),
                        (!l.leaving).then(|| (me.name(), me.generation())),
                    )
                })
            }
        }
    }

    /// Merges a peer's push-pull state.
    pub fn apply_push_pull(&mut self, state: Snapshot, now: Instant) {
        match (self, state) {
            (Core::Library(m), Snapshot::Library(pp)) => {
                let _ = m.apply_push_pull(pp, now);
            }
            (
                Core::Lean(l),
                Snapshot::Lean {
                    members,
                    left,
                    hash,
                },
            ) => l.apply_push_pull(&members, hash, left, now),
            // Every node of a simulation runs the same wrapper.
            _ => unreachable!("push-pull between different wrappers"),
        }
    }

    /// Takes the datagrams to send.
    pub fn drain_outbox(&mut self, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
        match self {
            Core::Library(m) => out.extend(m.drain_outbox()),
            Core::Lean(l) => out.append(&mut l.outbox),
        }
    }

    /// Drops the buffers a burst of news left behind (forming a cluster notifies every
    /// member once; at 10,000 nodes those spare capacities alone would take ~17 GB).
    pub fn release_spare_capacity(&mut self) {
        if let Core::Lean(l) = self {
            debug_assert!(l.changes.is_empty() && l.outbox.is_empty());
            l.runtime = AccumulatingRuntime::new();
            l.changes = Vec::new();
            l.outbox = Vec::new();
        }
    }

    /// Takes the liveness changes seen since the last call.
    pub fn drain_changes(&mut self, out: &mut Vec<Change>) {
        match self {
            Core::Library(m) => {
                for event in m.drain_events() {
                    match event {
                        MemberEvent::Down(m) => out.push(Change::Down {
                            name: m.name,
                            generation: m.generation,
                        }),
                        MemberEvent::Left(m) => out.push(Change::Left {
                            name: m.name,
                            generation: m.generation,
                        }),
                        MemberEvent::Joined(m) => out.push(Change::Up { name: m.name }),
                        _ => {}
                    }
                }
            }
            Core::Lean(l) => out.append(&mut l.changes),
        }
    }
}

/// foca with `Membership`'s protocol logic and no member view. Every method mirrors the
/// method of the same name in `grapevine::membership::Membership`.
pub struct Lean {
    foca: Foca<SimId, BincodeCodec<SimId>, SmallRng, WithSuspicions<StateBroadcasts, SimId>>,
    /// The identity the codec recognises hashed destinations by, as in `Membership`.
    local: LocalIdentity<SimId>,
    runtime: AccumulatingRuntime<SimId>,
    profile: Profile,
    tuned_for: usize,
    timers: TimerQueue<SimId>,
    left: VecDeque<SimId>,
    changes: Vec<Change>,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    leaving: bool,
    notices: SuspicionNotices<SimId>,
    notice_codec: BincodeCodec<SimId>,
    suspicion: DynamicSuspicion<SimId>,
}

/// Push-pull states shared between nodes holding the same member list in the same order
/// (formed clusters), keyed by a hash of the list in order; and members fingerprints,
/// keyed by the set hash (they ignore order). A few entries of each are kept.
#[derive(Default)]
pub struct SnapshotCache {
    entries: VecDeque<(u64, Arc<Vec<foca::Member<SimId>>>)>,
    fingerprints: VecDeque<(u64, u64)>,
}

impl SnapshotCache {
    const KEEP: usize = 8;

    /// The members fingerprint of the set whose hash is `hash`.
    fn fingerprint_or_make(&mut self, hash: u64, make: impl FnOnce() -> u64) -> u64 {
        if let Some(&(_, fingerprint)) = self.fingerprints.iter().find(|(h, _)| *h == hash) {
            return fingerprint;
        }
        let fingerprint = make();
        self.fingerprints.push_back((hash, fingerprint));
        if self.fingerprints.len() > Self::KEEP {
            self.fingerprints.pop_front();
        }
        fingerprint
    }

    fn get_or_make(
        &mut self,
        hash: u64,
        make: impl FnOnce() -> Vec<foca::Member<SimId>>,
    ) -> Arc<Vec<foca::Member<SimId>>> {
        if let Some((_, members)) = self.entries.iter().find(|(h, _)| *h == hash) {
            return members.clone();
        }
        let members = Arc::new(make());
        self.entries.push_back((hash, members.clone()));
        if self.entries.len() > Self::KEEP {
            self.entries.pop_front();
        }
        members
    }
}

/// Same bound as `Membership`.
const MAX_LEFT_REMEMBERED: usize = 4096;

impl Lean {
    fn new(
        identity: NodeId,
        profile: Profile,
        seed: u64,
        now: Instant,
        handler: StateBroadcasts,
    ) -> Self {
        let identity = SimId::new(&identity.name, identity.addr, identity.generation)
            .expect("simulated nodes have IPv4 addresses");
        let local = LocalIdentity::new(identity);
        let stranger = SimId::new("", identity.addr(), 0).expect("an IPv4 address");
        let (min, max, k) = profile.suspicion_bounds(1);
        let suspicion = DynamicSuspicion::new(min, max, k);
        Lean {
            foca: Foca::with_custom_broadcast(
                identity,
                profile.foca_config(1),
                SmallRng::seed_from_u64(seed),
                BincodeCodec::with_local(local.clone(), stranger),
                WithSuspicions::new(handler, suspicion.clone()),
            ),
            local,
            runtime: AccumulatingRuntime::new(),
            profile,
            tuned_for: 1,
            timers: TimerQueue::new(profile, now),
            left: VecDeque::new(),
            changes: Vec::new(),
            outbox: Vec::new(),
            leaving: false,
            notices: SuspicionNotices::new(profile.foca_config(1).probe_period),
            notice_codec: BincodeCodec::default(),
            suspicion,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match (self.timers.next_deadline(), self.suspicion.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn announce_to(&mut self, addr: SocketAddr, now: Instant) -> Result<(), String> {
        let seed = SimId::new("", addr, 0).ok_or("the simulator has IPv4 addresses only")?;
        let result = self.foca.announce(seed, &mut self.runtime);
        self.after_call(now);
        result.map_err(|e| e.to_string())
    }

    fn handle_datagram(&mut self, datagram: &[u8], now: Instant) -> Result<(), String> {
        let (kind, payload) = wire::open_datagram(datagram).map_err(|e| e.to_string())?;
        match kind {
            DatagramKind::Swim => {
                let backlog = self.foca.custom_broadcast_backlog();
                self.suspicion.at(now);
                let result = self.foca.handle_data(payload, &mut self.runtime);
                if self.foca.custom_broadcast_backlog() > backlog {
                    let _ = self.foca.broadcast(&mut self.runtime);
                }
                self.after_call(now);
                result.map_err(|e| e.to_string())?;
            }
            DatagramKind::Leave => {
                let (leaver, used): (SimId, usize) =
                    wire::decode_datagram_prefix(payload).map_err(|e| e.to_string())?;
                if used != payload.len() {
                    return Err(WireError::Trailing(payload.len() - used).to_string());
                }
                // As `Membership`: down at once in foca too, and passed on.
                let live = self.foca.iter_members().any(|m| *m.id() == leaver);
                self.remember_left(leaver);
                if live {
                    let down = std::iter::once(foca::Member::down(leaver));
                    let result = self.foca.apply_many(down, true, &mut self.runtime);
                    self.after_call(now);
                    result.map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn add_broadcast(&mut self, item: &[u8], now: Instant) -> Result<(), String> {
        if item.len() > MAX_BROADCAST_ITEM {
            return Err("broadcast item too large".into());
        }
        let added = self.foca.add_broadcast(item).map_err(|e| e.to_string())?;
        if added {
            let result = self.foca.broadcast(&mut self.runtime);
            self.after_call(now);
            result.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn handle_due_timers(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            let verdict_on = suspicion_subject(&timer);
            let _ = self.foca.handle_timer(timer, &mut self.runtime);
            if let Some(subject) = verdict_on {
                if !self.holds_down(&subject) {
                    self.withhold_sends_to(subject);
                }
            }
            self.after_call(now);
        }
        // As `Membership`: Lifeguard's dynamic suspicion.
        let healthy = self.timers.health_score(now) <= 1;
        let verdicts =
            self.suspicion
                .take_verdicts(now, healthy, self.foca.iter_membership_state());
        if !verdicts.is_empty() {
            let _ = self
                .foca
                .apply_many(verdicts.into_iter(), true, &mut self.runtime);
            self.after_call(now);
        }
    }

    fn active_peer_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<_> = self.foca.iter_members().map(|m| m.id().addr()).collect();
        addrs.sort();
        addrs
    }

    fn leave(&mut self, now: Instant) -> Result<(), String> {
        let me = *self.foca.identity();
        let mut notice = Vec::with_capacity(wire::MAX_DATAGRAM);
        wire::begin_datagram(DatagramKind::Leave, &mut notice);
        wire::encode_datagram_into(&me, &mut notice, wire::MAX_DATAGRAM)
            .map_err(|e| e.to_string())?;
        for addr in self.active_peer_addrs() {
            self.outbox.push((addr, notice.clone()));
        }
        self.leaving = true;
        self.remember_left(me);
        let result = self.foca.leave_cluster(&mut self.runtime);
        self.after_call(now);
        result.map_err(|e| e.to_string())
    }

    /// The set hash of what `push_pull_state` would send.
    fn state_hash(&self) -> u64 {
        let mut hash = 0u64;
        for member in self.foca.iter_membership_state() {
            hash = hash.wrapping_add(member_hash(member));
        }
        if !self.leaving {
            hash = hash.wrapping_add(member_hash(&foca::Member::alive(*self.foca.identity())));
        }
        hash
    }

    fn push_pull_state(&mut self, cache: &mut SnapshotCache) -> Snapshot {
        let hash = self.state_hash();
        // Shared only between nodes holding the members in the same order: the receiver
        // inserts new members in list order, one random swap each, as the library's would.
        let me = (!self.leaving).then(|| foca::Member::alive(*self.foca.identity()));
        let order = self
            .foca
            .iter_membership_state()
            .chain(me.as_ref())
            .fold(0u64, |h, m| mix(h.wrapping_add(member_hash(m))));
        let members = cache.get_or_make(order, || {
            let mut members: Vec<_> = self.foca.iter_membership_state().cloned().collect();
            if !self.leaving {
                members.push(foca::Member::alive(*self.foca.identity()));
            }
            members
        });
        Snapshot::Lean {
            members,
            left: self.left.iter().cloned().collect(),
            hash,
        }
    }

    /// `Membership::apply_push_pull`, minus the updates that equal what this node holds
    /// already: foca treats those as no-ops (no state change, no notification, no
    /// randomness), and skipping them turns an O(n²) merge into O(n).
    fn apply_push_pull(
        &mut self,
        members: &[foca::Member<SimId>],
        hash: u64,
        left: Vec<SimId>,
        now: Instant,
    ) {
        for leaver in left {
            self.remember_left(leaver);
        }
        if hash == self.state_hash() {
            // The same set as ours: every update would be a no-op.
            self.after_call(now);
            return;
        }
        let mine: HashSet<u64, BuildHasherDefault<IdentityHasher>> = self
            .foca
            .iter_membership_state()
            .map(member_hash)
            .chain(
                (!self.leaving).then(|| member_hash(&foca::Member::alive(*self.foca.identity()))),
            )
            .collect();
        let news: Vec<foca::Member<SimId>> = members
            .iter()
            .filter(|m| !mine.contains(&member_hash(m)))
            .cloned()
            .collect();
        let _ = self
            .foca
            .apply_many(news.into_iter(), false, &mut self.runtime);
        self.after_call(now);
    }

    /// Whether foca holds `id` as down (`grapevine::membership::is_down`).
    fn holds_down(&self, id: &SimId) -> bool {
        self.foca
            .iter_membership_state()
            .any(|m| m.id() == id && m.state() == State::Down)
    }

    fn remember_left(&mut self, id: SimId) {
        if !self.left.contains(&id) {
            if self.left.len() >= MAX_LEFT_REMEMBERED {
                self.left.pop_front();
            }
            // The view turns a member already down into a left one.
            if self.holds_down(&id) {
                self.changes.push(Change::Left {
                    name: id.name().to_owned(),
                    generation: id.generation(),
                });
            }
            self.left.push_back(id);
        }
    }

    fn withhold_sends_to(&mut self, subject: SimId) {
        let addr = foca::Identity::addr(&subject);
        while let Some((to, data)) = self.runtime.to_send() {
            if foca::Identity::addr(&to) != addr {
                self.outbox.push((to.addr(), swim_datagram(&data)));
            }
        }
    }

    fn after_call(&mut self, now: Instant) {
        let start = self.changes.len();
        self.collect(now);
        // The library reports one refresh of its view in name order; the driver acts on
        // changes in turn (a push-pull for each member back, while connections last).
        self.changes[start..].sort_by(|a, b| a.name().cmp(b.name()));
    }

    fn collect(&mut self, now: Instant) {
        self.local.follow(self.foca.identity());
        while let Some((to, data)) = self.runtime.to_send() {
            self.outbox.push((to.addr(), swim_datagram(&data)));
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
                    went_down = true;
                    let change = if self.left.contains(&id) {
                        Change::Left {
                            name: id.name().to_owned(),
                            generation: id.generation(),
                        }
                    } else {
                        Change::Down {
                            name: id.name().to_owned(),
                            generation: id.generation(),
                        }
                    };
                    self.changes.push(change);
                }
                OwnedNotification::MemberUp(id) => self.changes.push(Change::Up {
                    name: id.name().to_owned(),
                }),
                _ => {}
            }
        }
        if defunct && !self.leaving {
            if let Some(renewed) = foca::Identity::renew(self.foca.identity()) {
                let _ = self.foca.change_identity(renewed, &mut self.runtime);
                return self.collect(now);
            }
        }
        // As `Membership`: Lifeguard's buddy system.
        if !self.leaving && self.notices.any_due(now) {
            let due = self.notices.take_due(
                now,
                self.foca.identity(),
                self.foca.iter_membership_state(),
                &mut self.notice_codec,
            );
            for (suspect, packet) in due {
                self.outbox.push((suspect.addr(), swim_datagram(&packet)));
            }
        }
        let size = self.foca.num_members() + 1;
        if size > self.tuned_for * 2 || size * 2 < self.tuned_for {
            let _ = self.foca.set_config(self.profile.foca_config(size));
            let (min, max, k) = self.profile.suspicion_bounds(size);
            self.suspicion.retune(min, max, k);
            self.tuned_for = size;
        }
        // As `Membership`: a member down is gossiped at once.
        if went_down && !self.leaving && self.foca.updates_backlog() > 0 {
            let _ = self.foca.gossip(&mut self.runtime);
            self.collect(now);
        }
        if !confirmations.is_empty() && !self.leaving {
            for item in &confirmations {
                if self.foca.custom_broadcast_backlog() >= MAX_BROADCAST_BACKLOG {
                    break;
                }
                let _ = self.foca.add_broadcast(item);
            }
            let _ = self.foca.broadcast(&mut self.runtime);
            self.collect(now);
        }
    }
}
