//! The discrete-event engine: a virtual clock, a network of UDP datagrams and TCP exchanges
//! with latency, loss, partitions, crashed and frozen processes, and one driver per node
//! that mirrors `src/node/driver.rs` (join retries, push-pull, anti-entropy, eager
//! broadcast, identity follow-up, housekeeping).
//!
//! Time is an offset in nanoseconds from one base `Instant` captured when the simulation
//! starts; only offsets ever reach the output. Every random choice comes from generators
//! seeded from the scenario seed, and events at the same instant run in the order they were
//! scheduled, so the same seed replays the same history.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grapevine::membership::{NodeId, Profile, PushPull};

use super::ident::SimId;
use grapevine::state::catalog::{
    Delta, Health, OwnerUpdate, Service, ServiceRecord, SyncPayload, UpdateKind, MAX_FORGOTTEN,
};
use grapevine::state::config::{ConfigStoreOptions, Version};
use grapevine::sync::{
    self, Replicated, SharedState, StateBroadcasts, SyncDigest, SyncPush, SyncPushReply, SyncReply,
    WallClock,
};
use grapevine::wire;
use indicatif::ProgressBar;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::member::{varint_len, Change, Core, Snapshot, SnapshotCache, Wrapper};

/// Simulated time: nanoseconds since the start of the run.
pub type Nanos = u64;
/// One millisecond.
pub const MS: Nanos = 1_000_000;
/// One second.
pub const SEC: Nanos = 1_000_000_000;

/// Seconds, for reports.
pub fn secs(t: Nanos) -> f64 {
    t as f64 / SEC as f64
}

/// Simulated wall clock at time zero (2026-01-01T00:00:00Z), in milliseconds.
const WALL_BASE_MS: u64 = 1_767_225_600_000;
/// Same bound as the driver.
const MAX_OUTBOUND: usize = 4;
/// Datagrams a frozen process's socket buffers before dropping (≈ 200 KB receive buffer).
const FROZEN_BUFFER: usize = 1024;
/// Bytes of one TCP segment's payload.
const TCP_SEGMENT: usize = 1448;

/// What the engine is built with.
#[derive(Debug, Clone)]
pub struct Params {
    /// Cluster size.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Probability that a UDP datagram (or a TCP segment, then retransmitted) is lost.
    pub loss: f64,
    /// Membership implementation.
    pub wrapper: Wrapper,
    /// Timing profile of every node.
    pub profile: Profile,
    /// One-way latency, uniform in `[min, max]`.
    pub latency: (Nanos, Nanos),
    /// How many nodes (the first ones) serve as seeds.
    pub seeds: usize,
    /// Threads used to form a cluster at time zero.
    pub threads: usize,
}

/// Liveness of a simulated process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not started yet.
    Idle,
    /// Running.
    Running,
    /// Paused (SIGSTOP, a long GC pause): keeps its state, answers nothing.
    Frozen,
    /// Crashed, or stopped after leaving.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tick {
    Join,
    Sync,
    PushPull,
    Followup(u64),
}

enum TcpMsg {
    PushPullRequest(Snapshot),
    PushPullResponse(Snapshot),
    /// A periodic push-pull's member-list fingerprint, and whether the responder's is equal.
    MembersCheck(u64),
    MembersCheckAnswer(bool),
    Check(u64),
    CheckAnswer(bool),
    Sync(SyncDigest),
    SyncAnswer(SyncReply),
    Push(SyncPush),
    PushAnswer(SyncPushReply),
}

struct TcpEvent {
    initiator: u32,
    initiator_life: u32,
    responder: u32,
    /// The responder's life once the connection is accepted.
    responder_life: Option<u32>,
    xid: u64,
    to_initiator: bool,
    msg: TcpMsg,
}

enum Ev {
    Start { node: u32 },
    Udp { to: u32, data: Vec<u8> },
    Wake { node: u32, life: u32 },
    Tick { node: u32, life: u32, kind: Tick },
    Tcp(Box<TcpEvent>),
    TcpTimeout { node: u32, life: u32, xid: u64 },
}

struct Queued {
    at: Nanos,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

enum Exchange {
    PushPull,
    Sync,
}

/// One simulated node: its process (membership and state) and its driver's book-keeping.
pub struct SimNode {
    /// Name, `n<index>`.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Liveness of the process.
    pub status: Status,
    /// Incremented at every crash and restart; stale events carry an older one.
    pub life: u32,
    /// Generation the current process started with (renewals go above it).
    pub start_generation: u64,
    /// Partition group.
    pub group: u32,
    core: Option<Core>,
    state: Option<SharedState>,
    rng: SmallRng,
    had_peers: bool,
    seed_cursor: usize,
    followup: Option<(u64, Nanos)>,
    followup_token: u64,
    push_pull_ticks: u64,
    outbound: usize,
    exchanges: BTreeMap<u64, Exchange>,
    next_xid: u64,
    wake_at: Option<Nanos>,
    frozen_inbox: Vec<Ev>,
    pending_ticks: BTreeSet<Tick>,
    dead_since: BTreeMap<String, Nanos>,
    tombstone_marks: VecDeque<(Nanos, u64)>,
    /// `(state version, digest fingerprint)`: the fingerprint holds while the version does.
    fingerprint: Option<(u64, u64)>,
    /// The identity generation last seen, to count renewals.
    generation_seen: u64,
}

impl SimNode {
    /// The fingerprint of the node's digest (`Replicated::digest().fingerprint()`), cached
    /// per state version: every change of `Replicated` bumps its version (`touch`). Debug
    /// builds (the tests) check the cached value against a fresh computation each time.
    fn fingerprint(&mut self) -> Option<u64> {
        let state = sync::lock(self.state.as_ref()?);
        let version = state.version();
        match self.fingerprint {
            Some((v, fingerprint)) if v == version => {
                if cfg!(debug_assertions) {
                    assert_eq!(
                        state.digest().fingerprint(),
                        fingerprint,
                        "{}: state changed without a version bump",
                        self.name
                    );
                }
                Some(fingerprint)
            }
            _ => {
                let fingerprint = state.digest().fingerprint();
                self.fingerprint = Some((version, fingerprint));
                Some(fingerprint)
            }
        }
    }

    /// The process's membership, if it runs.
    pub fn core(&self) -> Option<&Core> {
        self.core.as_ref()
    }

    /// The process's replicated state, if it runs.
    pub fn state(&self) -> Option<&SharedState> {
        self.state.as_ref()
    }

    /// Whether the process exists (running or frozen).
    pub fn is_up(&self) -> bool {
        matches!(self.status, Status::Running | Status::Frozen)
    }
}

/// Bytes and packets one node sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// UDP datagram bytes (envelope included, IP/UDP headers excluded).
    pub udp_bytes: u64,
    /// UDP datagrams.
    pub udp_packets: u64,
    /// TCP frame bytes (length prefixes included, TCP/IP headers excluded).
    pub tcp_bytes: u64,
    /// TCP frames.
    pub tcp_frames: u64,
    /// Of `tcp_bytes`, those of push-pull exchanges (fingerprints and member lists).
    pub push_pull_bytes: u64,
    /// Periodic push-pulls whose fingerprints matched: no member list sent (initiator side).
    pub push_pull_skipped: u64,
    /// Push-pulls that shipped member lists (initiator side).
    pub push_pull_full: u64,
    /// Of `push_pull_full`, periodic ones whose fingerprints differed.
    pub push_pull_mismatched: u64,
}

impl Traffic {
    fn add(&mut self, other: &Traffic) {
        self.udp_bytes += other.udp_bytes;
        self.udp_packets += other.udp_packets;
        self.tcp_bytes += other.tcp_bytes;
        self.tcp_frames += other.tcp_frames;
        self.push_pull_bytes += other.push_pull_bytes;
        self.push_pull_skipped += other.push_pull_skipped;
        self.push_pull_full += other.push_pull_full;
        self.push_pull_mismatched += other.push_pull_mismatched;
    }
}

/// A member declared down or left, as one observer saw it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When.
    pub at: Nanos,
    /// Who saw it.
    pub observer: u32,
    /// About whom.
    pub subject: u32,
    /// The subject's generation in the observer's view.
    pub generation: u64,
    /// Left gracefully (rather than declared down).
    pub left: bool,
    /// Whether the subject's process with that generation was up at that moment.
    pub subject_up: bool,
}

/// What a watch waits for on every node.
#[derive(Debug, Clone)]
pub enum Target {
    /// A catalog change of `owner`: its epoch and version.
    Catalog {
        owner: String,
        epoch: u64,
        version: u64,
    },
    /// A config write.
    Config { key: String, version: Version },
}

/// When each node learnt of one change.
#[derive(Debug, Clone)]
pub struct Watch {
    /// What is watched.
    pub target: Target,
    /// When the change was made.
    pub start: Nanos,
    /// Per node: when it learnt it (`None`: not yet, or not eligible).
    pub informed: Vec<Option<Nanos>>,
    /// Nodes that were up when the change was made.
    pub eligible: Vec<bool>,
    remaining: usize,
}

impl Watch {
    /// Delays (seconds) of the eligible nodes that learnt the change, the writer excluded.
    pub fn delays(&self) -> Vec<f64> {
        let mut delays: Vec<f64> = self
            .informed
            .iter()
            .zip(&self.eligible)
            .filter(|(_, e)| **e)
            .filter_map(|(t, _)| t.map(|t| secs(t - self.start)))
            .filter(|d| *d > 0.0)
            .collect();
        delays.sort_by(f64::total_cmp);
        delays
    }

    /// Eligible nodes, the writer excluded.
    pub fn receivers(&self) -> usize {
        self.eligible
            .iter()
            .filter(|e| **e)
            .count()
            .saturating_sub(1)
    }

    /// Whether every eligible node learnt it.
    pub fn complete(&self) -> bool {
        self.remaining == 0
    }
}

struct JoinTrack {
    full: Vec<bool>,
    count: usize,
    done_at: Option<Nanos>,
}

/// The simulation.
pub struct Sim {
    /// Parameters.
    pub params: Params,
    /// The nodes, by index.
    pub nodes: Vec<SimNode>,
    /// Traffic sent, by node.
    pub traffic: Vec<Traffic>,
    /// Every down and left observation.
    pub observations: Vec<Observation>,
    /// Watches of changes spreading.
    pub watches: Vec<Watch>,
    /// Identity renewals of running processes (declared down, or told so by foca's
    /// `TurnUndead`), as `(when, node)`.
    pub renewals: Vec<(Nanos, u32)>,
    /// Current loss probability.
    pub loss: f64,
    base: Instant,
    now: Nanos,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    net_rng: SmallRng,
    clock_ms: Arc<AtomicU64>,
    join: Option<JoinTrack>,
    scratch_out: Vec<(SocketAddr, Vec<u8>)>,
    scratch_changes: Vec<Change>,
    snapshots: SnapshotCache,
    progress: Option<(ProgressBar, Nanos)>,
    processed: u64,
}

/// Name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Address of node `i`: `10.x.y.z:7946`.
pub fn node_addr(i: usize) -> SocketAddr {
    let n = (i + 1) as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8),
        7946,
    ))
}

fn addr_index(addr: &SocketAddr) -> Option<u32> {
    match addr {
        SocketAddr::V4(a) => {
            let [_, b, c, d] = a.ip().octets();
            let n = (u32::from(b) << 16) | (u32::from(c) << 8) | u32::from(d);
            n.checked_sub(1)
        }
        SocketAddr::V6(_) => None,
    }
}

fn name_index(name: &str) -> Option<u32> {
    name.strip_prefix('n')?.parse().ok()
}

fn seed_for(seed: u64, i: usize, life: u32) -> u64 {
    let mut z = seed ^ ((i as u64) << 20) ^ (u64::from(life) << 50);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sim {
    /// A simulation of `params.nodes` nodes, none started.
    pub fn new(params: Params) -> Self {
        let nodes = (0..params.nodes)
            .map(|i| SimNode {
                name: node_name(i),
                addr: node_addr(i),
                status: Status::Idle,
                life: 0,
                start_generation: 0,
                group: 0,
                core: None,
                state: None,
                rng: SmallRng::seed_from_u64(seed_for(params.seed, i, u32::MAX)),
                had_peers: false,
                seed_cursor: 0,
                followup: None,
                followup_token: 0,
                push_pull_ticks: 0,
                outbound: 0,
                exchanges: BTreeMap::new(),
                next_xid: 0,
                wake_at: None,
                frozen_inbox: Vec::new(),
                pending_ticks: BTreeSet::new(),
                dead_since: BTreeMap::new(),
                tombstone_marks: VecDeque::new(),
                fingerprint: None,
                generation_seen: 0,
            })
            .collect();
        Sim {
            traffic: vec![Traffic::default(); params.nodes],
            net_rng: SmallRng::seed_from_u64(seed_for(params.seed, usize::MAX >> 8, 7)),
            loss: params.loss,
            params,
            nodes,
            observations: Vec::new(),
            watches: Vec::new(),
            renewals: Vec::new(),
            base: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            clock_ms: Arc::new(AtomicU64::new(0)),
            join: None,
            scratch_out: Vec::new(),
            scratch_changes: Vec::new(),
            snapshots: SnapshotCache::default(),
            progress: None,
            processed: 0,
        }
    }

    /// Current simulated time.
    pub fn now(&self) -> Nanos {
        self.now
    }

    /// Events processed so far.
    pub fn events_processed(&self) -> u64 {
        self.processed
    }

    /// Shows progress on `bar`, whose length is in simulated milliseconds.
    pub fn set_progress(&mut self, bar: ProgressBar) {
        self.progress = Some((bar, 0));
    }

    /// Sets the length of the progress bar, in simulated time.
    pub fn set_progress_length(&self, len: Nanos) {
        if let Some((bar, _)) = self.progress.as_ref() {
            bar.set_length(len / MS);
        }
    }

    /// Finishes the progress bar, if any.
    pub fn finish_progress(&mut self) {
        if let Some((bar, _)) = self.progress.take() {
            bar.finish_and_clear();
        }
    }

    fn instant(&self, t: Nanos) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn offset(&self, at: Instant) -> Nanos {
        at.saturating_duration_since(self.base).as_nanos() as Nanos
    }

    fn push(&mut self, at: Nanos, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn latency(&mut self) -> Nanos {
        let (lo, hi) = self.params.latency;
        if hi > lo {
            self.net_rng.random_range(lo..=hi)
        } else {
            lo
        }
    }

    /// Random index below `n`, from the scenario's generator.
    pub fn random_index(&mut self, n: usize) -> usize {
        self.net_rng.random_range(0..n)
    }

    /// Random offset in `[0, span)`.
    pub fn random_offset(&mut self, span: Nanos) -> Nanos {
        if span == 0 {
            0
        } else {
            self.net_rng.random_range(0..span)
        }
    }

    fn new_process(&mut self, i: usize, generation: u64) {
        let node = &mut self.nodes[i];
        node.life += 1;
        node.start_generation = generation;
        node.generation_seen = generation;
        let clock_ms = self.clock_ms.clone();
        let clock: WallClock = Arc::new(move || WALL_BASE_MS + clock_ms.load(Ordering::Relaxed));
        let state: SharedState = Arc::new(Mutex::new(Replicated::new(
            &node.name,
            generation,
            ConfigStoreOptions::default(),
            clock,
        )));
        let identity = NodeId {
            name: node.name.clone(),
            addr: node.addr,
            generation,
        };
        let now = self.base + Duration::from_nanos(self.now);
        node.core = Some(Core::new(
            self.params.wrapper,
            identity,
            self.params.profile,
            seed_for(self.params.seed, i, node.life),
            now,
            StateBroadcasts::new(state.clone()),
        ));
        node.state = Some(state);
        node.status = Status::Running;
        node.had_peers = false;
        node.seed_cursor = 0;
        node.followup = None;
        // The driver's random phase of scaled-down push-pulls.
        node.push_pull_ticks = node.rng.random_range(0..1u64 << 32);
        node.outbound = 0;
        node.exchanges.clear();
        node.wake_at = None;
        node.frozen_inbox.clear();
        node.pending_ticks.clear();
        node.dead_since.clear();
        node.tombstone_marks.clear();
        node.fingerprint = None;
    }

    fn generation_now(&self, i: usize) -> u64 {
        let fresh = WALL_BASE_MS + self.now / MS;
        let previous = self.nodes[i]
            .core
            .as_ref()
            .map_or(self.nodes[i].start_generation, |c| c.generation());
        fresh.max(previous + 1)
    }

    /// Starts node `i` at time `at`: it joins through the seeds like a real node.
    pub fn start_at(&mut self, i: usize, at: Nanos) {
        self.push(at, Ev::Start { node: i as u32 });
    }

    fn start_now(&mut self, i: usize) {
        let generation = self.generation_now(i);
        self.new_process(i, generation);
        let life = self.nodes[i].life;
        let now = self.now;
        for kind in [Tick::Join, Tick::Sync, Tick::PushPull] {
            self.push(
                now,
                Ev::Tick {
                    node: i as u32,
                    life,
                    kind,
                },
            );
        }
    }

    /// Starts every node at time zero with the full member list (every node applies the
    /// push-pull state of the whole cluster), as if the cluster had formed long ago. Each
    /// node's timers and ticks get a random phase so that probes are not synchronized.
    /// The catalogs start converged too: every node holds the (empty) owner state of every
    /// other node, as anti-entropy leaves it after the first minute of a cluster's life.
    pub fn form_cluster(&mut self) {
        let n = self.params.nodes;
        for i in 0..n {
            let generation = WALL_BASE_MS;
            self.new_process(i, generation);
            self.nodes[i].had_peers = true;
        }
        let phases: Vec<Nanos> = (0..n).map(|_| self.random_offset(SEC)).collect();
        let members: Vec<foca::Member<NodeId>> = self
            .nodes
            .iter()
            .map(|node| {
                foca::Member::alive(NodeId {
                    name: node.name.clone(),
                    addr: node.addr,
                    generation: WALL_BASE_MS,
                })
            })
            .collect();
        let shared = Arc::new(members);
        let shared_lean: Arc<Vec<foca::Member<SimId>>> = Arc::new(
            shared
                .iter()
                .map(|m| {
                    let id = m.id();
                    let id = SimId::new(&id.name, id.addr, id.generation)
                        .expect("simulated nodes have IPv4 addresses");
                    foca::Member::alive(id)
                })
                .collect(),
        );
        let owners = SyncPayload {
            owners: self
                .nodes
                .iter()
                .map(|node| {
                    let update = OwnerUpdate {
                        epoch: WALL_BASE_MS,
                        kind: UpdateKind::Reset,
                        max_version: 0,
                        gc_floor: 0,
                        up_to: 0,
                        entries: Vec::new(),
                    };
                    (node.name.clone(), update)
                })
                .collect(),
        };
        let owners = &owners;
        let wrapper = self.params.wrapper;
        let base = self.base;
        let threads = self.params.threads.max(1);
        let chunk = n.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (c, nodes) in self.nodes.chunks_mut(chunk).enumerate() {
                let shared = shared.clone();
                let shared_lean = shared_lean.clone();
                let phases = &phases;
                scope.spawn(move || {
                    for (k, node) in nodes.iter_mut().enumerate() {
                        let i = c * chunk + k;
                        let snapshot = match wrapper {
                            Wrapper::Library => Snapshot::Library(PushPull {
                                members: shared.to_vec(),
                                left: Vec::new(),
                            }),
                            Wrapper::Lean => Snapshot::Lean {
                                members: shared_lean.clone(),
                                left: Vec::new(),
                                hash: 0,
                            },
                        };
                        let now = base + Duration::from_nanos(phases[i]);
                        if let Some(core) = node.core.as_mut() {
                            core.apply_push_pull(snapshot, now);
                            // Every member appeared: nothing the driver acts on, and n²
                            // of these would not fit at 10,000 nodes.
                            core.drain_changes(&mut Vec::new());
                            core.release_spare_capacity();
                        }
                        if let Some(state) = node.state.as_ref() {
                            let mut state = sync::lock(state);
                            if !state.catalog.apply_sync(owners.clone()).is_empty() {
                                state.touch();
                            }
                        }
                    }
                });
            }
        });
        drop(shared);
        drop(shared_lean);
        let pp = self.params.profile.push_pull_interval().as_nanos() as Nanos;
        let sync = self.params.profile.sync_interval().as_nanos() as Nanos;
        let join = self.params.profile.join_retry_interval().as_nanos() as Nanos;
        for i in 0..n {
            let life = self.nodes[i].life;
            for (kind, period) in [(Tick::Join, join), (Tick::Sync, sync), (Tick::PushPull, pp)] {
                let at = self.random_offset(period);
                self.push(
                    at,
                    Ev::Tick {
                        node: i as u32,
                        life,
                        kind,
                    },
                );
            }
            self.post_turn(i);
        }
    }

    /// Starts tracking when every node sees every other one alive.
    pub fn track_join(&mut self) {
        self.join = Some(JoinTrack {
            full: vec![false; self.params.nodes],
            count: 0,
            done_at: None,
        });
    }

    /// When every node first saw every other one alive.
    pub fn joined_at(&self) -> Option<Nanos> {
        self.join.as_ref().and_then(|j| j.done_at)
    }

    /// Runs until simulated time `end`.
    pub fn run_until(&mut self, end: Nanos) {
        while let Some(Reverse(top)) = self.queue.peek() {
            if top.at > end {
                break;
            }
            let Some(Reverse(Queued { at, ev, .. })) = self.queue.pop() else {
                break;
            };
            self.set_now(at);
            self.processed += 1;
            self.dispatch(ev);
        }
        self.set_now(end.max(self.now));
    }

    /// Runs until `end` or until `done` holds (checked every `every`); returns whether it did.
    pub fn run_until_or(
        &mut self,
        end: Nanos,
        every: Nanos,
        mut done: impl FnMut(&mut Sim) -> bool,
    ) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if self.now >= end {
                return false;
            }
            let next = (self.now + every).min(end);
            self.run_until(next);
        }
    }

    fn set_now(&mut self, at: Nanos) {
        self.now = at;
        self.clock_ms.store(at / MS, Ordering::Relaxed);
        if let Some((bar, shown)) = self.progress.as_mut() {
            if at >= *shown + 100 * MS {
                *shown = at;
                bar.set_position(at / MS);
            }
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Start { node } => self.start_now(node as usize),
            Ev::Udp { to, data } => self.deliver_udp(to as usize, data),
            Ev::Wake { node, life } => {
                let i = node as usize;
                let now = self.instant(self.now);
                let n = &mut self.nodes[i];
                if n.life != life || n.status != Status::Running {
                    return;
                }
                if n.wake_at == Some(self.now) {
                    n.wake_at = None;
                }
                if let Some(core) = n.core.as_mut() {
                    core.handle_due_timers(now);
                }
                self.post_turn(i);
            }
            Ev::Tick { node, life, kind } => {
                let i = node as usize;
                let n = &mut self.nodes[i];
                if n.life != life {
                    return;
                }
                match n.status {
                    Status::Running => {
                        self.tick(i, kind);
                        self.post_turn(i);
                    }
                    Status::Frozen => {
                        n.pending_ticks.insert(kind);
                    }
                    _ => {}
                }
            }
            Ev::Tcp(event) => self.deliver_tcp(*event),
            Ev::TcpTimeout { node, life, xid } => {
                let n = &mut self.nodes[node as usize];
                if n.life == life && n.exchanges.remove(&xid).is_some() {
                    n.outbound -= 1;
                }
            }
        }
    }

    fn tick(&mut self, i: usize, kind: Tick) {
        let profile = self.params.profile;
        let life = self.nodes[i].life;
        let period = match kind {
            Tick::Join => {
                if self.core(i).num_active_peers() == 0 {
                    self.try_join(i);
                }
                Some(profile.join_retry_interval())
            }
            Tick::Sync => {
                if let Some(peer) = self.random_peer(i) {
                    self.start_sync(i, peer);
                }
                self.housekeeping(i);
                Some(profile.sync_interval())
            }
            Tick::PushPull => {
                let size = self.core(i).num_active_peers() + 1;
                let node = &mut self.nodes[i];
                node.push_pull_ticks = node.push_pull_ticks.wrapping_add(1);
                if node
                    .push_pull_ticks
                    .is_multiple_of(u64::from(Profile::push_pull_scale(size)))
                {
                    if let Some(peer) = self.random_peer(i) {
                        self.start_checked_push_pull(i, peer);
                    }
                }
                Some(profile.push_pull_interval())
            }
            Tick::Followup(token) => {
                if self.nodes[i].followup_token == token {
                    if let Some((_, gap)) = self.nodes[i].followup.take() {
                        self.push_pull_random(i);
                        if gap < 4 * SEC {
                            self.set_followup(i, gap * 2);
                        }
                    }
                }
                None
            }
        };
        if let Some(period) = period {
            let at = self.now + period.as_nanos() as Nanos;
            self.push(
                at,
                Ev::Tick {
                    node: i as u32,
                    life,
                    kind,
                },
            );
        }
    }

    fn set_followup(&mut self, i: usize, gap: Nanos) {
        let node = &mut self.nodes[i];
        node.followup_token += 1;
        let token = node.followup_token;
        node.followup = Some((token, gap));
        let life = node.life;
        let at = self.now + gap;
        self.push(
            at,
            Ev::Tick {
                node: i as u32,
                life,
                kind: Tick::Followup(token),
            },
        );
    }

    /// Node `i`'s push-pull state (shared with nodes that hold the same list).
    fn push_pull_state(&mut self, i: usize) -> Snapshot {
        let core = self.nodes[i].core.as_mut();
        core.expect("a running node has a core")
            .push_pull_state(&mut self.snapshots)
    }

    /// Node `i`'s member-list fingerprint (shared with nodes that hold the same set).
    fn members_fingerprint(&mut self, i: usize) -> u64 {
        let core = self.nodes[i].core.as_ref();
        core.expect("a running node has a core")
            .members_fingerprint(&mut self.snapshots)
    }

    fn core(&mut self, i: usize) -> &mut Core {
        self.nodes[i]
            .core
            .as_mut()
            .expect("a running node has a core")
    }

    fn try_join(&mut self, i: usize) {
        let seeds: Vec<usize> = (0..self.params.seeds.min(self.params.nodes))
            .filter(|s| *s != i)
            .collect();
        if seeds.is_empty() {
            return;
        }
        let now = self.instant(self.now);
        for &s in &seeds {
            let addr = self.nodes[s].addr;
            self.core(i).announce_to(addr, now);
        }
        let node = &mut self.nodes[i];
        let seed = seeds[node.seed_cursor % seeds.len()];
        node.seed_cursor = node.seed_cursor.wrapping_add(1);
        self.start_push_pull(i, seed);
    }

    fn random_peer(&mut self, i: usize) -> Option<usize> {
        let node = &mut self.nodes[i];
        let rng = &mut node.rng;
        let addr = node
            .core
            .as_ref()?
            .active_peer(|n| rng.random_range(0..n))?;
        addr_index(&addr).map(|p| p as usize)
    }

    fn push_pull_random(&mut self, i: usize) {
        if let Some(peer) = self.random_peer(i) {
            self.start_push_pull(i, peer);
        }
    }

    fn housekeeping(&mut self, i: usize) {
        let profile = self.params.profile;
        let grace = profile.catalog_grace().as_nanos() as Nanos;
        let horizon = profile.tombstone_horizon().as_nanos() as Nanos;
        let now = self.now;
        let node = &mut self.nodes[i];
        let Some(state) = node.state.as_ref() else {
            return;
        };
        let expired: Vec<String> = node
            .dead_since
            .iter()
            .filter(|(_, since)| now - **since >= grace)
            .map(|(name, _)| name.clone())
            .collect();
        let mut state = sync::lock(state);
        for name in expired {
            node.dead_since.remove(&name);
            let epoch = state.catalog.owner(&name).map(|o| o.epoch);
            if let Some(epoch) = epoch {
                if state.catalog.forget_owner(&name, epoch) {
                    state.touch();
                }
            }
        }
        state.catalog.prune_forgotten(MAX_FORGOTTEN);
        let now_ms = state.now_ms();
        let horizon_ms = profile.tombstone_horizon().as_millis() as u64;
        if state.config.collect_tombstones(now_ms, horizon_ms) > 0 {
            state.touch();
        }
        node.tombstone_marks
            .push_back((now, state.catalog.local_max_version()));
        while let Some((at, version)) = node.tombstone_marks.front().copied() {
            if now - at < horizon {
                break;
            }
            node.tombstone_marks.pop_front();
            if state.catalog.collect_tombstones(version) > 0 {
                state.touch();
            }
        }
    }

    /// What the driver does after every turn of its loop: react to a first contact, keep
    /// the catalog epoch at the identity's generation, send what the membership produced,
    /// record its events; then the engine re-arms the node's timer and updates trackers.
    fn post_turn(&mut self, i: usize) {
        if self.nodes[i].status != Status::Running {
            return;
        }
        let has_peers = self.core(i).num_active_peers() > 0;
        if has_peers && !self.nodes[i].had_peers {
            self.push_pull_random(i);
            if let Some(peer) = self.random_peer(i) {
                self.start_sync(i, peer);
            }
            self.set_followup(i, SEC);
        }
        self.nodes[i].had_peers = has_peers;
        let generation = self.core(i).generation();
        if generation != self.nodes[i].generation_seen {
            self.nodes[i].generation_seen = generation;
            self.renewals.push((self.now, i as u32));
        }
        self.follow_identity(i);
        self.flush(i);
        self.arm_wake(i);
        self.track(i);
    }

    fn follow_identity(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let (Some(core), Some(state)) = (node.core.as_mut(), node.state.as_ref()) else {
            return;
        };
        let generation = core.generation();
        let hint = sync::lock(state).follow_generation(generation);
        if let Some(item) = hint {
            let now = self.base + Duration::from_nanos(self.now);
            core.add_broadcast(&item, now);
        }
    }

    fn flush(&mut self, i: usize) {
        let mut out = std::mem::take(&mut self.scratch_out);
        let mut changes = std::mem::take(&mut self.scratch_changes);
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.drain_outbox(&mut out);
            core.drain_changes(&mut changes);
        }
        for (to, data) in out.drain(..) {
            self.send_udp(i, to, data);
        }
        let mut rejoined = Vec::new();
        for change in changes.drain(..) {
            let (name, generation, left) = match change {
                Change::Down { name, generation } => (name, generation, false),
                Change::Left { name, generation } => (name, generation, true),
                Change::Up { name } => {
                    // The driver push-pulls with a member back from down or left.
                    if self.nodes[i].dead_since.remove(&name).is_some() {
                        rejoined.extend(name_index(&name));
                    }
                    continue;
                }
            };
            let Some(subject) = name_index(&name) else {
                continue;
            };
            if subject as usize == i {
                // The library reports its own leave; only peers' views are measured.
                continue;
            }
            let s = &self.nodes[subject as usize];
            let subject_up = s.is_up()
                && generation >= s.start_generation
                && s.core
                    .as_ref()
                    .is_some_and(|c| generation <= c.generation());
            self.observations.push(Observation {
                at: self.now,
                observer: i as u32,
                subject,
                generation,
                left,
                subject_up,
            });
            self.nodes[i].dead_since.entry(name).or_insert(self.now);
        }
        self.scratch_out = out;
        self.scratch_changes = changes;
        for peer in rejoined {
            self.start_push_pull(i, peer as usize);
        }
    }

    fn arm_wake(&mut self, i: usize) {
        let Some(deadline) = self.nodes[i].core.as_ref().and_then(|c| c.next_deadline()) else {
            return;
        };
        let at = self.offset(deadline).max(self.now);
        let node = &mut self.nodes[i];
        if node.wake_at.is_none_or(|w| at < w) {
            node.wake_at = Some(at);
            let life = node.life;
            self.push(
                at,
                Ev::Wake {
                    node: i as u32,
                    life,
                },
            );
        }
    }

    fn track(&mut self, i: usize) {
        if let Some(join) = self.join.as_mut() {
            let n = &self.nodes[i];
            let full = n
                .core
                .as_ref()
                .is_some_and(|c| c.num_active_peers() + 1 == self.params.nodes);
            if full != join.full[i] {
                join.full[i] = full;
                if full {
                    join.count += 1;
                } else {
                    join.count -= 1;
                }
            }
            if join.done_at.is_none() && join.count == self.params.nodes {
                join.done_at = Some(self.now);
            }
        }
        let needed = self
            .watches
            .iter()
            .any(|w| w.remaining > 0 && w.eligible[i] && w.informed[i].is_none());
        if !needed {
            return;
        }
        let Some(state) = self.nodes[i].state.as_ref() else {
            return;
        };
        let now = self.now;
        let state = sync::lock(state);
        for watch in self.watches.iter_mut() {
            if watch.remaining == 0 || !watch.eligible[i] || watch.informed[i].is_some() {
                continue;
            }
            let knows = match &watch.target {
                Target::Catalog {
                    owner,
                    epoch,
                    version,
                } => state
                    .catalog
                    .owner(owner)
                    .is_some_and(|o| (o.epoch, o.max_version) >= (*epoch, *version)),
                Target::Config { key, version } => state
                    .config
                    .entry(key)
                    .is_some_and(|e| e.version >= *version),
            };
            if knows {
                watch.informed[i] = Some(now);
                watch.remaining -= 1;
            }
        }
    }

    fn send_udp(&mut self, from: usize, to: SocketAddr, data: Vec<u8>) {
        if let Some(watched) = trace_packets() {
            let to_index = addr_index(&to).unwrap_or(u32::MAX) as usize;
            if from == watched || to_index == watched {
                eprintln!(
                    "{:.6} n{from} -> n{to_index}: {}",
                    secs(self.now),
                    describe_datagram(&data)
                );
            }
        }
        let traffic = &mut self.traffic[from];
        traffic.udp_bytes += data.len() as u64;
        traffic.udp_packets += 1;
        let Some(to) = addr_index(&to).filter(|t| (*t as usize) < self.nodes.len()) else {
            return;
        };
        if self.nodes[from].group != self.nodes[to as usize].group {
            return;
        }
        if self.loss > 0.0 && self.net_rng.random_bool(self.loss) {
            return;
        }
        let at = self.now + self.latency();
        self.push(at, Ev::Udp { to, data });
    }

    fn deliver_udp(&mut self, i: usize, data: Vec<u8>) {
        match self.nodes[i].status {
            Status::Running => {
                let now = self.instant(self.now);
                self.core(i).handle_datagram(&data, now);
                self.fetch_behind(i);
                self.post_turn(i);
            }
            Status::Frozen => {
                let node = &mut self.nodes[i];
                if node.frozen_inbox.len() < FROZEN_BUFFER {
                    node.frozen_inbox.push(Ev::Udp { to: i as u32, data });
                }
            }
            _ => {}
        }
    }

    /// Hints of changes too big to gossip: sync with their owners.
    fn fetch_behind(&mut self, i: usize) {
        let Some(state) = self.nodes[i].state.as_ref() else {
            return;
        };
        let behind = sync::lock(state).take_behind();
        for owner in behind {
            let Some(o) = name_index(&owner) else {
                continue;
            };
            let mut active = false;
            self.core(i)
                .for_each_active(|name, _| active |= name == owner);
            if active {
                self.start_sync(i, o as usize);
            }
        }
    }

    /// Delay of one TCP message of `bytes` over a lossy path. Each segment is lost with the
    /// path's loss probability; a lost segment followed by at least three others is
    /// fast-retransmitted after one round trip, a lost tail segment waits for the
    /// retransmission timeout (200 ms), and a lost retransmission doubles the timeout. The
    /// message arrives when its slowest segment does. A new connection first pays a
    /// handshake whose lost SYNs wait 1 s, doubling. Bandwidth is not modelled (a LAN moves
    /// 100 KB in well under a millisecond).
    fn tcp_delay(&mut self, bytes: usize, connect: bool) -> Nanos {
        let mut delay = 0;
        if connect {
            for _ in 0..2 {
                delay += self.latency();
                let mut rto = SEC;
                while self.loss > 0.0 && self.net_rng.random_bool(self.loss) && rto < 64 * SEC {
                    delay += rto;
                    rto *= 2;
                }
            }
        }
        delay += self.latency();
        if self.loss > 0.0 {
            let segments = bytes.div_ceil(TCP_SEGMENT).max(1);
            let mut slowest = 0;
            for k in 0..segments {
                if !self.net_rng.random_bool(self.loss) {
                    continue;
                }
                let mut wait = if segments - k > 3 {
                    self.latency() + self.latency()
                } else {
                    200 * MS
                };
                let mut rto = 200 * MS;
                while self.net_rng.random_bool(self.loss) && rto < 64 * SEC {
                    wait += rto;
                    rto *= 2;
                }
                slowest = slowest.max(wait);
            }
            delay += slowest;
        }
        delay
    }

    fn send_tcp(&mut self, event: TcpEvent, bytes: usize, connect: bool) {
        let (from, to) = if event.to_initiator {
            (event.responder, event.initiator)
        } else {
            (event.initiator, event.responder)
        };
        let traffic = &mut self.traffic[from as usize];
        traffic.tcp_bytes += bytes as u64;
        traffic.tcp_frames += 1;
        if matches!(
            event.msg,
            TcpMsg::PushPullRequest(_)
                | TcpMsg::PushPullResponse(_)
                | TcpMsg::MembersCheck(_)
                | TcpMsg::MembersCheckAnswer(_)
        ) {
            traffic.push_pull_bytes += bytes as u64;
        }
        if self.nodes[from as usize].group != self.nodes[to as usize].group {
            // The connection stalls; the initiator's timeout ends the exchange.
            return;
        }
        let at = self.now + self.tcp_delay(bytes, connect);
        self.push(at, Ev::Tcp(Box::new(event)));
    }

    /// Opens an outbound exchange from `i` to `peer` with its first message (`bytes` long);
    /// nothing if `i` has too many open already.
    fn open_exchange(
        &mut self,
        i: usize,
        peer: usize,
        exchange: Exchange,
        msg: TcpMsg,
        bytes: usize,
    ) {
        let Some(xid) = self.begin_exchange(i, exchange) else {
            return;
        };
        let event = TcpEvent {
            initiator: i as u32,
            initiator_life: self.nodes[i].life,
            responder: peer as u32,
            responder_life: None,
            xid,
            to_initiator: false,
            msg,
        };
        self.send_tcp(event, bytes, true);
    }

    fn begin_exchange(&mut self, i: usize, exchange: Exchange) -> Option<u64> {
        let timeout = self.params.profile.tcp_timeout().as_nanos() as Nanos;
        let node = &mut self.nodes[i];
        if node.outbound >= MAX_OUTBOUND {
            return None;
        }
        node.outbound += 1;
        node.next_xid += 1;
        let xid = node.next_xid;
        node.exchanges.insert(xid, exchange);
        let life = node.life;
        let at = self.now + timeout;
        self.push(
            at,
            Ev::TcpTimeout {
                node: i as u32,
                life,
                xid,
            },
        );
        Some(xid)
    }

    fn end_exchange(&mut self, i: usize, xid: u64) {
        let node = &mut self.nodes[i];
        if node.exchanges.remove(&xid).is_some() {
            node.outbound -= 1;
        }
    }

    /// The driver's periodic push-pull: member-list fingerprint first.
    fn start_checked_push_pull(&mut self, i: usize, peer: usize) {
        if self.nodes[i].outbound >= MAX_OUTBOUND {
            return;
        }
        let fingerprint = self.members_fingerprint(i);
        let bytes = 1 + varint_len(fingerprint) + 4;
        self.open_exchange(
            i,
            peer,
            Exchange::PushPull,
            TcpMsg::MembersCheck(fingerprint),
            bytes,
        );
    }

    fn start_push_pull(&mut self, i: usize, peer: usize) {
        if self.nodes[i].outbound >= MAX_OUTBOUND {
            return;
        }
        self.traffic[i].push_pull_full += 1;
        let snapshot = self.push_pull_state(i);
        let bytes = snapshot.frame_len();
        self.open_exchange(
            i,
            peer,
            Exchange::PushPull,
            TcpMsg::PushPullRequest(snapshot),
            bytes,
        );
    }

    fn start_sync(&mut self, i: usize, peer: usize) {
        if self.nodes[i].outbound >= MAX_OUTBOUND {
            return;
        }
        let Some(fingerprint) = self.nodes[i].fingerprint() else {
            return;
        };
        let bytes = 1 + varint_len(fingerprint) + 4;
        self.open_exchange(i, peer, Exchange::Sync, TcpMsg::Check(fingerprint), bytes);
    }

    fn deliver_tcp(&mut self, mut event: TcpEvent) {
        let target = if event.to_initiator {
            event.initiator
        } else {
            event.responder
        } as usize;
        let node = &self.nodes[target];
        if event.to_initiator {
            if node.life != event.initiator_life || !node.exchanges.contains_key(&event.xid) {
                return;
            }
        } else if event.responder_life.is_some_and(|l| l != node.life) {
            return;
        }
        match node.status {
            Status::Running => {}
            Status::Frozen => {
                let node = &mut self.nodes[target];
                node.frozen_inbox.push(Ev::Tcp(Box::new(event)));
                return;
            }
            _ => return,
        }
        if event.to_initiator {
            self.initiator_receives(event);
        } else {
            event.responder_life = Some(self.nodes[target].life);
            self.responder_receives(event);
        }
    }

    fn responder_receives(&mut self, mut event: TcpEvent) {
        let r = event.responder as usize;
        let msg = std::mem::replace(&mut event.msg, TcpMsg::CheckAnswer(false));
        let now = self.instant(self.now);
        let state = self.nodes[r].state.clone().expect("running node has state");
        let (reply, bytes) = match msg {
            TcpMsg::PushPullRequest(snapshot) => {
                self.core(r).apply_push_pull(snapshot, now);
                let reply = self.push_pull_state(r);
                let bytes = reply.frame_len();
                self.post_turn(r);
                (TcpMsg::PushPullResponse(reply), bytes)
            }
            TcpMsg::MembersCheck(fingerprint) => {
                let ours = self.members_fingerprint(r);
                let in_sync = ours == fingerprint;
                (TcpMsg::MembersCheckAnswer(in_sync), 1 + 4)
            }
            TcpMsg::Check(fingerprint) => {
                let in_sync = self.nodes[r].fingerprint() == Some(fingerprint);
                (TcpMsg::CheckAnswer(in_sync), 1 + 4)
            }
            TcpMsg::Sync(digest) => {
                let reply = sync::lock(&state).answer_digest(&digest);
                let bytes = frame_len(&reply);
                (TcpMsg::SyncAnswer(reply), bytes)
            }
            TcpMsg::Push(push) => {
                let reply = sync::lock(&state).apply_push(push);
                let bytes = frame_len(&reply);
                self.track(r);
                (TcpMsg::PushAnswer(reply), bytes)
            }
            _ => return,
        };
        event.to_initiator = true;
        event.msg = reply;
        self.send_tcp(event, bytes, false);
    }

    fn initiator_receives(&mut self, mut event: TcpEvent) {
        let i = event.initiator as usize;
        let msg = std::mem::replace(&mut event.msg, TcpMsg::CheckAnswer(false));
        let now = self.instant(self.now);
        let state = self.nodes[i].state.clone().expect("running node has state");
        match msg {
            TcpMsg::PushPullResponse(snapshot) => {
                self.end_exchange(i, event.xid);
                self.core(i).apply_push_pull(snapshot, now);
                self.post_turn(i);
            }
            TcpMsg::MembersCheckAnswer(true) => {
                self.traffic[i].push_pull_skipped += 1;
                self.end_exchange(i, event.xid);
            }
            TcpMsg::MembersCheckAnswer(false) => {
                // As with the digest below: the driver builds this state when the exchange
                // starts; a round trip later it differs only if the view changed meanwhile.
                self.traffic[i].push_pull_full += 1;
                self.traffic[i].push_pull_mismatched += 1;
                let snapshot = self.push_pull_state(i);
                let bytes = snapshot.frame_len();
                event.to_initiator = false;
                event.msg = TcpMsg::PushPullRequest(snapshot);
                self.send_tcp(event, bytes, false);
            }
            TcpMsg::CheckAnswer(true) => self.end_exchange(i, event.xid),
            TcpMsg::CheckAnswer(false) => {
                // The driver computes this digest when the exchange starts; computing it a
                // round trip later differs only if the state changed in between, and spares
                // the simulator a copy of every node's digest.
                let digest = sync::lock(&state).digest();
                let bytes = frame_len(&digest);
                event.to_initiator = false;
                event.msg = TcpMsg::Sync(digest);
                self.send_tcp(event, bytes, false);
            }
            TcpMsg::SyncAnswer(reply) => {
                let push = sync::lock(&state).apply_reply(reply);
                self.track(i);
                if push.catalog.is_empty()
                    && push.config_entries.is_empty()
                    && push.config_wanted.is_empty()
                {
                    return self.end_exchange(i, event.xid);
                }
                let bytes = frame_len(&push);
                event.to_initiator = false;
                event.msg = TcpMsg::Push(push);
                self.send_tcp(event, bytes, false);
            }
            TcpMsg::PushAnswer(reply) => {
                sync::lock(&state).apply_push_reply(reply);
                self.end_exchange(i, event.xid);
                self.track(i);
            }
            _ => {}
        }
    }

    // ----- scenario actions -----

    /// Crashes node `i`: its process and state are gone; packets to it are lost and TCP
    /// exchanges with it time out.
    pub fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.status = Status::Dead;
        node.core = None;
        node.state = None;
        node.exchanges.clear();
        node.outbound = 0;
        node.frozen_inbox.clear();
        node.life += 1;
    }

    /// Node `i` leaves gracefully, then its process stops.
    pub fn leave(&mut self, i: usize) {
        if self.nodes[i].status != Status::Running {
            return;
        }
        let now = self.instant(self.now);
        self.core(i).leave(now);
        self.flush(i);
        self.crash(i);
    }

    /// Restarts node `i` (a new process with a new generation) and lets it join.
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].is_up() {
            self.crash(i);
        }
        self.start_now(i);
    }

    /// Pauses node `i`.
    pub fn freeze(&mut self, i: usize) {
        if self.nodes[i].status == Status::Running {
            self.nodes[i].status = Status::Frozen;
        }
    }

    /// Resumes node `i`: overdue timers fire first, then the ticks it missed, then what its
    /// sockets buffered (the driver's `biased` select order).
    pub fn thaw(&mut self, i: usize) {
        if self.nodes[i].status != Status::Frozen {
            return;
        }
        self.nodes[i].status = Status::Running;
        self.nodes[i].wake_at = None;
        let now = self.instant(self.now);
        self.core(i).handle_due_timers(now);
        self.post_turn(i);
        let ticks = std::mem::take(&mut self.nodes[i].pending_ticks);
        for kind in ticks {
            if self.nodes[i].status == Status::Running {
                self.tick(i, kind);
                self.post_turn(i);
            }
        }
        let inbox = std::mem::take(&mut self.nodes[i].frozen_inbox);
        for ev in inbox {
            self.dispatch(ev);
        }
    }

    /// Splits the network: node `i` can only reach nodes of the same group.
    pub fn set_groups(&mut self, group: impl Fn(usize) -> u32) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.group = group(i);
        }
    }

    /// Node `i` registers a service; returns the change to watch.
    pub fn register(&mut self, i: usize, service: &str) -> Option<Target> {
        let state = self.nodes[i].state.clone()?;
        let record = ServiceRecord::new(
            Service::new(service, format!("{service}-{i}"), 8080),
            Health::Passing,
        );
        let delta: Delta = sync::lock(&state).catalog.register(record).ok()?;
        sync::lock(&state).touch();
        let item = Replicated::broadcast_item(&delta).ok()?;
        let now = self.instant(self.now);
        self.core(i).add_broadcast(&item, now);
        self.post_turn(i);
        Some(Target::Catalog {
            owner: delta.owner,
            epoch: delta.epoch,
            version: delta.version,
        })
    }

    /// Node `i` writes a config key; returns the change to watch.
    pub fn config_set(&mut self, i: usize, key: &str, value: &[u8]) -> Option<Target> {
        let state = self.nodes[i].state.clone()?;
        let change = sync::lock(&state).config_set(key, value.to_vec(), 0).ok()?;
        let origin = self.core(i).name().to_owned();
        let item = Replicated::config_broadcast_item(&change, &origin).ok()?;
        let now = self.instant(self.now);
        self.core(i).add_broadcast(&item, now);
        self.post_turn(i);
        Some(Target::Config {
            key: change.key,
            version: change.version,
        })
    }

    /// Watches `target` spread from now on to every node up at this moment.
    pub fn watch(&mut self, target: Target) -> usize {
        let eligible: Vec<bool> = self.nodes.iter().map(|n| n.is_up()).collect();
        let remaining = eligible.iter().filter(|e| **e).count();
        self.watches.push(Watch {
            target,
            start: self.now,
            informed: vec![None; self.nodes.len()],
            eligible,
            remaining,
        });
        let index = self.watches.len() - 1;
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_up() {
                self.track(i);
            }
        }
        index
    }

    /// Total traffic sent so far.
    pub fn total_traffic(&self) -> Traffic {
        let mut total = Traffic::default();
        for t in &self.traffic {
            total.add(t);
        }
        total
    }

    /// Whether the up nodes agree: each sees exactly the other up nodes as live (with
    /// their current generations, checked member by member up to 2,000 nodes and by count
    /// above), and all hold the same replicated state (same digest fingerprint).
    pub fn converged(&mut self) -> bool {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_up())
            .collect();
        let exact = self.nodes.len() <= 2000;
        let mut fingerprint = None;
        for &i in &up {
            let Some(core) = self.nodes[i].core.as_ref() else {
                return false;
            };
            if core.num_active_peers() + 1 != up.len() {
                return false;
            }
            if exact {
                let mut ok = true;
                core.for_each_active(|name, generation| {
                    ok &= name_index(name).is_some_and(|s| {
                        let s = &self.nodes[s as usize];
                        s.is_up()
                            && s.core
                                .as_ref()
                                .is_some_and(|c| c.generation() == generation)
                    });
                });
                if !ok {
                    return false;
                }
            }
            let Some(fp) = self.nodes[i].fingerprint() else {
                return false;
            };
            if *fingerprint.get_or_insert(fp) != fp {
                return false;
            }
        }
        true
    }
}

fn frame_len<T: serde::Serialize>(message: &T) -> usize {
    // One byte of request/response tag and the u32 length prefix around the payload.
    wire::encode_frame(message).map_or(0, |b| b.len()) + 1 + 4
}

/// `GRAPEVINE_SIM_PACKETS=<index>`: print every datagram to or from that node (debugging).
fn trace_packets() -> Option<usize> {
    static WATCHED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *WATCHED.get_or_init(|| {
        std::env::var("GRAPEVINE_SIM_PACKETS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

fn describe_datagram(data: &[u8]) -> String {
    use grapevine::wire::DatagramKind;
    let Ok((kind, payload)) = wire::open_datagram(data) else {
        return "junk".into();
    };
    if kind == DatagramKind::Leave {
        return "leave notice".into();
    }
    let Ok((header, used)) = wire::decode_datagram_prefix::<foca::Header<NodeId>>(payload) else {
        return "undecodable".into();
    };
    let mut out = format!(
        "{:?} from {}#{} inc {}",
        header.message, header.src.name, header.src.generation, header.src_incarnation
    );
    let mut rest = &payload[used..];
    if rest.len() >= 2 && !matches!(header.message, foca::Message::Broadcast) {
        let count = u16::from_be_bytes([rest[0], rest[1]]);
        rest = &rest[2..];
        for _ in 0..count {
            match wire::decode_datagram_prefix::<foca::Member<NodeId>>(rest) {
                Ok((m, used)) => {
                    out.push_str(&format!(
                        " | {}#{} {:?} inc {}",
                        m.id().name,
                        m.id().generation,
                        m.state(),
                        m.incarnation()
                    ));
                    rest = &rest[used..];
                }
                Err(_) => break,
            }
        }
    }
    out
}
