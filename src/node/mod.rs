//! The public face of grapevine: [`Node`], built by [`NodeBuilder`].

mod agreement;
pub mod catalog;
mod checks;
pub mod config;
pub mod control;
mod driver;
mod limiter;
mod persist;
mod protocol;
pub mod rpc;
mod seeds;
mod server;
mod stats;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use catalog::{CatalogHandle, Instance, Query, RecordIndexes, ServiceSummary, ServiceWatch};
pub use checks::{worst as worst_health, Check, HttpCheck, ServiceHandle};
pub use config::{ConfigEvent, ConfigHandle, ConfigWatch};
pub use seeds::{InvalidSeed, SeedName};
pub use stats::{StatsSnapshot, StatsSource};

/// Decodes a request frame as a node's TCP port does (for fuzzing).
#[doc(hidden)]
pub fn decode_request_for_fuzzing(bytes: &[u8]) -> bool {
    crate::wire::decode_frame::<protocol::Request>(bytes).is_ok()
}

/// The frame a client sends to open an RPC connection to a node's port, right after the
/// hello ([`crate::wire::dial`] queues it; the RPC client opens through there).
pub fn rpc_preface() -> bytes::Bytes {
    protocol::rpc_preface()
}

use crate::error::{Error, Result};
use crate::membership::{
    validate_name, BroadcastBacklog, ForceLeave, Member, MemberEvent, Membership, NodeId, Profile,
};
use crate::net::sealed::{Keyring, SecureTransport, Security};
use crate::net::{Listener, TokioTransport, Transport, UdpSocket};

/// Cluster label used when none is given.
pub const DEFAULT_CLUSTER_LABEL: &str = "grapevine";
use crate::state::catalog::{Health, Service, ServiceRecord};
use crate::state::config::ConfigStoreOptions;
use crate::store::{DataDir, Loaded, StoredService};
use crate::sync::{self, SharedState, WallClock};
use catalog::CatalogView;
use checks::{ask, Connector};
use driver::{Command, Driver, COMMAND_QUEUE};
use std::path::PathBuf;

/// Capacity of the member-event channel; a subscriber further behind skips ahead.
const EVENT_CHANNEL: usize = 1024;
/// How long a clean stop waits for the last config changes to reach the disk.
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);
/// How long a force-leave waits for the driver to apply it.
const FORCE_LEAVE_WAIT: Duration = Duration::from_secs(5);
/// How many times a free port is looked for when UDP's port is taken on TCP.
const PORT_ATTEMPTS: usize = 16;

/// What readers see of the node, published by the driver.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) identity: NodeId,
    pub(crate) members: Vec<Member>,
    pub(crate) profile: Profile,
}

/// State shared by the node handle and its TCP tasks.
pub(crate) struct Shared {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) view: watch::Receiver<Arc<View>>,
    pub(crate) catalog_view: watch::Receiver<Arc<CatalogView>>,
    pub(crate) config_seq: watch::Receiver<u64>,
    pub(crate) state: SharedState,
    pub(crate) stats: Arc<stats::Stats>,
    pub(crate) allow_remote_control: bool,
    pub(crate) rpc: Arc<crate::rpc::Registry>,
    /// Encryption state, when the node seals its traffic.
    pub(crate) security: Option<Arc<Security>>,
    /// The data dir, when the node keeps its state on disk; taken out when the node stops,
    /// so that the lock is released even while stray connection tasks finish.
    pub(crate) store: Mutex<Option<Arc<DataDir>>>,
    /// How far the config store is saved in it.
    pub(crate) saved: Option<watch::Receiver<persist::Saved>>,
    /// Memory for inbound frames still arriving, shared by every accepted connection.
    pub(crate) frame_budget: Arc<crate::wire::FrameBudget>,
    /// Counters of components layered on the node, held weakly.
    pub(crate) stats_sources: Mutex<Vec<std::sync::Weak<dyn StatsSource>>>,
}

impl Shared {
    /// Joins through `addr` at run time and waits until it is an active member (see
    /// [`Node::join`]).
    pub(crate) async fn join(&self, addr: SocketAddr, wait: Duration) -> Result<()> {
        let joined = |view: &View| {
            view.identity.addr == addr
                || view
                    .members
                    .iter()
                    .any(|m| m.addr == addr && m.status.is_active())
        };
        let mut view = self.view.clone();
        if joined(&view.borrow_and_update()) {
            return Ok(());
        }
        self.commands
            .send(Command::Join { addr })
            .await
            .map_err(|_| Error::Stopped)?;
        let until_joined = async {
            while !joined(&view.borrow_and_update()) {
                if view.changed().await.is_err() {
                    return Err(Error::Stopped);
                }
            }
            Ok(())
        };
        protocol::within(wait, "join", until_joined).await
    }

    pub(crate) async fn force_leave(&self, name: &str, prune: bool) -> Result<ForceLeave> {
        let (reply, answer) = oneshot::channel();
        let command = Command::ForceLeave {
            name: name.to_string(),
            prune,
            reply,
        };
        let exchange = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| Error::Stopped)?;
            answer.await.map_err(|_| Error::Stopped)?
        };
        protocol::within(FORCE_LEAVE_WAIT, "force-leave", exchange).await
    }

    pub(crate) fn catalog(&self) -> CatalogHandle {
        CatalogHandle {
            view: self.catalog_view.clone(),
        }
    }

    pub(crate) fn stats_snapshot(&self) -> StatsSnapshot {
        let mut stats = self.stats.snapshot();
        if let Some(security) = &self.security {
            stats.sealed_refused = security.refused.load(std::sync::atomic::Ordering::Relaxed);
        }
        stats.tcp_refused_budget = self.frame_budget.refused();
        stats
    }

    /// The layered components still running.
    pub(crate) fn stats_sources(&self) -> Vec<Arc<dyn StatsSource>> {
        let mut sources = locked(&self.stats_sources);
        sources.retain(|source| source.strong_count() > 0);
        sources
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Their counters, by name.
    pub(crate) fn extra_counters(&self) -> BTreeMap<String, u64> {
        self.stats_sources()
            .iter()
            .flat_map(|source| source.counters())
            .collect()
    }

    pub(crate) fn change_keys(&self, op: &control::KeyOp) -> Result<Keyring> {
        let security = self
            .security
            .as_ref()
            .ok_or_else(|| Error::Config("this node does not encrypt its traffic".into()))?;
        security
            .update(|ring| op.apply(ring).map(|()| ring.clone()))
            .map_err(|error| Error::Config(error.to_string()))
    }

    pub(crate) fn config(&self) -> ConfigHandle {
        ConfigHandle {
            commands: self.commands.clone(),
            state: self.state.clone(),
            seq: self.config_seq.clone(),
            saved: self.saved.clone(),
        }
    }
}

/// Configures and starts a [`Node`].
#[derive(Clone)]
pub struct NodeBuilder {
    name: String,
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
    seeds: Vec<SocketAddr>,
    seed_names: Vec<SeedName>,
    profile: Profile,
    generation: Option<u64>,
    rng_seed: Option<u64>,
    allow_remote_control: bool,
    wall_clock: Option<WallClock>,
    config_history: usize,
    tombstone_horizon: Option<Duration>,
    keyring: Option<Keyring>,
    keyring_file: Option<PathBuf>,
    cluster_label: String,
    data_dir: Option<PathBuf>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("name", &self.name)
            .field("bind", &self.bind)
            .field("advertise", &self.advertise)
            .field("seeds", &self.seeds)
            .field("seed_names", &self.seed_names)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The wall clock that stamps config writes (milliseconds since the Unix epoch; default:
    /// the system clock). Tests and simulations use it to skew nodes' clocks.
    pub fn wall_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.wall_clock = Some(Arc::new(clock));
        self
    }

    /// How many config changes are kept for watches to resume from (default 10,000).
    pub fn config_history(mut self, changes: usize) -> Self {
        self.config_history = changes.max(1);
        self
    }

    /// Age after which config tombstones (deleted keys) are collected (default: the
    /// profile's, 10 min on LAN). Must exceed the longest partition you want to heal
    /// automatically: see the config store's documentation.
    pub fn config_tombstone_horizon(mut self, horizon: Duration) -> Self {
        self.tombstone_horizon = Some(horizon);
        self
    }

    /// Accepts control requests (what the CLI sends) from any address, not only loopback.
    pub fn allow_remote_control(mut self, allow: bool) -> Self {
        self.allow_remote_control = allow;
        self
    }

    /// Address to bind UDP and TCP on (default `127.0.0.1:0`, a free port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Address other nodes reach this one at (default: the bound address). Needed when
    /// binding an unspecified address such as `0.0.0.0`. Port 0 means the bound port.
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// Addresses of nodes to join through; retried until one answers.
    pub fn seeds(mut self, seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds = seeds.into_iter().collect();
        self
    }

    /// Seeds given by host name (`grapevine:7946`), resolved through the system resolver
    /// (`getaddrinfo`, whatever the node's transport) when the node starts and again on every join retry while it has no live peer, so
    /// that it follows a seed that moves (a restarted container, the replicas behind a
    /// Kubernetes headless Service). Every address a name resolves to is a seed. A name
    /// that does not resolve is logged and retried; it does not stop the node.
    pub fn seed_names(mut self, names: impl IntoIterator<Item = SeedName>) -> Self {
        self.seed_names = names.into_iter().collect();
        self
    }

    /// Timing profile (default [`Profile::Lan`]).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Identity generation (default: milliseconds since the Unix epoch, so that a restarted
    /// node always comes back newer than it was).
    pub fn generation(mut self, generation: u64) -> Self {
        self.generation = Some(generation);
        self
    }

    /// Seed of the node's random choices (default: derived from name and generation).
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Keeps the node's state in `dir` across restarts: every config entry and tombstone
    /// (local writes and what it learned from peers), the service registrations made at run
    /// time with their checks, its identity generation, the members to rejoin through, and
    /// the keyring (`keyring.json`, unless [`Self::keyring_file`] names another file).
    /// Local config writes then return once committed to disk. The directory is locked
    /// until the [`Node`] is dropped, and refused if it belongs to another node name or
    /// cluster label.
    /// Without a data dir, everything lives in memory and a restart starts empty.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Reads the keyring from `path` at start and saves it there after every change (a
    /// rotation from the CLI). Takes precedence over [`Self::keyring`] and over the data
    /// dir's keyring.
    pub fn keyring_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.keyring_file = Some(path.into());
        self
    }

    /// Binds real sockets and starts the node.
    pub async fn start(self) -> Result<Node> {
        self.start_on(TokioTransport).await
    }

    /// Starts the node on the given transport.
    pub async fn start_on<T: Transport>(mut self, transport: T) -> Result<Node> {
        let durable = match self.data_dir.clone() {
            Some(dir) => {
                let (name, label) = (self.name.clone(), self.cluster_label.clone());
                let at = dir.clone();
                let opened =
                    persist::on_blocking_pool(&at, move || DataDir::open(&dir, &name, &label))
                        .await?;
                Some(opened)
            }
            None => None,
        };
        let keyring_path = self.choose_keyring(durable.as_ref().map(|(dir, _)| dir))?;
        let (durable, services) = match durable {
            Some((dir, mut loaded)) => {
                let services = std::mem::take(&mut loaded.services);
                (Some((Arc::new(dir), loaded)), services)
            }
            None => (None, Vec::new()),
        };
        let node = match self.keyring.clone() {
            Some(keyring) => {
                let security = Security::new(keyring, self.cluster_label.clone());
                self.start_with(SecureTransport::new(transport, security), durable)
                    .await?
            }
            None => self.start_with(transport, durable).await?,
        };
        if let Some(path) = keyring_path {
            node.persist_keys_to(path);
        }
        node.restore_services(services).await;
        Ok(node)
    }

    /// Settles which keyring the node uses and where its changes are saved: the keyring
    /// file if given; else the data dir's `keyring.json` once it exists (written from
    /// [`Self::keyring`] on the first start, as Consul does with its `encrypt` key).
    fn choose_keyring(&mut self, data_dir: Option<&DataDir>) -> Result<Option<PathBuf>> {
        let load = |path: &std::path::Path| {
            Keyring::load(path).map_err(|error| Error::Config(error.to_string()))
        };
        if let Some(path) = &self.keyring_file {
            self.keyring = Some(load(path)?);
            return Ok(Some(path.clone()));
        }
        let Some(data_dir) = data_dir else {
            return Ok(None);
        };
        let path = data_dir.keyring_path();
        if path.exists() {
            let saved = load(&path)?;
            if self.keyring.as_ref().is_some_and(|given| *given != saved) {
                tracing::info!(
                    path = %path.display(),
                    "using the keyring saved in the data dir, not the key given at start"
                );
            }
            self.keyring = Some(saved);
            return Ok(Some(path));
        }
        match &self.keyring {
            Some(keyring) => {
                keyring.save(&path).map_err(|source| {
                    Error::Store(format!("cannot write {}: {source}", path.display()))
                })?;
                Ok(Some(path))
            }
            None => Ok(None),
        }
    }

    /// Seals all traffic (UDP and TCP) with `keyring`'s primary key; every key of the ring is
    /// accepted on receive. Nodes without a key of the ring cannot join.
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// The cluster label bound into every sealed message (default `grapevine`): clusters with
    /// different labels never mix, even if they share a key.
    pub fn cluster_label(mut self, label: impl Into<String>) -> Self {
        self.cluster_label = label.into();
        self
    }

    async fn start_with<T: Transport>(
        mut self,
        transport: T,
        durable: Option<(Arc<DataDir>, Loaded)>,
    ) -> Result<Node> {
        validate_name(&self.name).map_err(Error::Config)?;
        let (udp, listener) = bind_pair(&transport, self.bind).await?;
        let bound = udp.local_addr().map_err(|source| Error::Bind {
            addr: self.bind,
            source,
        })?;
        let advertise = match self.advertise {
            Some(addr) if addr.ip().is_unspecified() => {
                return Err(Error::Config(format!(
                    "cannot advertise the unspecified address {addr}"
                )))
            }
            Some(addr) if addr.port() == 0 => SocketAddr::new(addr.ip(), bound.port()),
            Some(addr) => addr,
            None if bound.ip().is_unspecified() => {
                return Err(Error::Config(format!(
                    "bound to {bound}: give an address to advertise that other nodes can reach"
                )))
            }
            None => bound,
        };
        let mut generation = self.generation.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(1)
        });
        if let Some((store, loaded)) = &durable {
            // Above every earlier life, whatever the clock says, so peers take this
            // incarnation as the newer one; saved before anyone can see it.
            generation = generation.max(loaded.generation.saturating_add(1));
            let writer = store.clone();
            persist::on_blocking_pool(store.dir(), move || writer.set_generation(generation))
                .await?;
            let own = advertise;
            let remembered = loaded.members.iter().map(|m| m.addr).filter(|a| *a != own);
            for addr in remembered {
                if !self.seeds.contains(&addr) {
                    self.seeds.push(addr);
                }
            }
        }
        let identity = NodeId {
            name: self.name.clone(),
            addr: advertise,
            generation,
        };
        let rng_seed = self
            .rng_seed
            .unwrap_or_else(|| crate::wire::stable_hash(self.name.as_bytes()) ^ generation);
        let now = tokio::time::Instant::now().into_std();
        let config_options = ConfigStoreOptions {
            history_capacity: self.config_history,
            ..ConfigStoreOptions::default()
        };
        let clock = self
            .wall_clock
            .clone()
            .unwrap_or_else(crate::sync::system_clock);
        let backlog = BroadcastBacklog::default();
        let (state, handler) = Driver::<T>::state_for(
            &identity.name,
            generation,
            config_options,
            clock,
            backlog.clone(),
        );
        let (store, saved) = match durable {
            Some((store, loaded)) => {
                let mut replicated = sync::lock(&state);
                replicated
                    .config
                    .restore(loaded.config, loaded.hlc, &loaded.gc_watermarks);
                replicated.config.track_changes();
                replicated.touch();
                let saved = persist::Saved {
                    through: replicated.config.current_seq(),
                    failed: None,
                };
                drop(replicated);
                let (saved_tx, saved_rx) = watch::channel(saved);
                (Some((store, saved_tx)), Some(saved_rx))
            }
            None => (None, None),
        };
        let mut membership =
            Membership::with_broadcasts(identity.clone(), self.profile, rng_seed, now, handler);
        membership.share_backlog(backlog);

        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (view_tx, view_rx) = watch::channel(Arc::new(View {
            identity: identity.clone(),
            members: membership.members(),
            profile: self.profile,
        }));
        let (catalog_tx, catalog_rx) = watch::channel(Arc::new(CatalogView::default()));
        let (config_seq_tx, config_seq_rx) = watch::channel(0u64);
        let (events_tx, _) = broadcast::channel(EVENT_CHANNEL);
        let (seeds, seed_resolver) = self.start_seed_resolver(view_rx.clone()).await;
        let stats = Arc::new(stats::Stats::default());
        let shared = Arc::new(Shared {
            commands: commands_tx,
            view: view_rx,
            catalog_view: catalog_rx,
            config_seq: config_seq_rx,
            state: state.clone(),
            stats: stats.clone(),
            allow_remote_control: self.allow_remote_control,
            rpc: Arc::new(crate::rpc::Registry::default()),
            security: transport.security().cloned(),
            store: Mutex::new(store.as_ref().map(|(store, _)| store.clone())),
            saved,
            frame_budget: crate::wire::FrameBudget::new(crate::wire::frames::DEFAULT_FRAME_BUDGET),
            stats_sources: Mutex::new(Vec::new()),
        });
        shared.rpc.add(rpc::builtin_service(&shared));
        let resolver = Arc::new(rpc::CatalogResolver {
            catalog: shared.catalog(),
            local_name: identity.name.clone(),
        });
        let rpc_client = crate::rpc::RpcClient::new(
            transport.clone(),
            protocol::rpc_preface(),
            resolver,
            rng_seed.rotate_left(29),
        );
        let connect_through = transport.clone();
        let server_transport = transport.clone();
        let connector: Connector = Arc::new(move |addr| {
            let transport = connect_through.clone();
            Box::pin(async move { transport.connect(addr).await.map(drop) })
        });
        let driver = Driver {
            membership,
            state,
            catalog_view: catalog_tx,
            config_seq: config_seq_tx,
            tombstone_horizon: self
                .tombstone_horizon
                .unwrap_or_else(|| self.profile.tombstone_horizon()),
            profile: self.profile,
            transport,
            udp,
            commands: commands_rx,
            view: view_tx,
            events: events_tx.clone(),
            stats,
            seeds,
            rng: SmallRng::seed_from_u64(rng_seed.rotate_left(17)),
            warned: Default::default(),
            agreement: Default::default(),
            tag: None,
            limits: driver::Limits::new(self.profile),
        };
        let mut tasks = vec![
            tokio::spawn(driver.run()),
            tokio::spawn(server::serve::<T>(
                listener,
                shared.clone(),
                server_transport,
            )),
        ];
        tasks.extend(seed_resolver);
        if let Some((store, saved)) = store {
            tasks.push(tokio::spawn(persist::run_writer(
                store,
                shared.state.clone(),
                shared.config_seq.clone(),
                shared.view.clone(),
                saved,
                generation,
            )));
        }
        tracing::info!(%identity, "node started");
        Ok(Node {
            shared,
            events: events_tx,
            tasks: Mutex::new(tasks),
            checks: Mutex::new(BTreeMap::new()),
            handles: Mutex::new(BTreeMap::new()),
            connector,
            rpc_client,
        })
    }
}

impl NodeBuilder {
    /// Resolves the seed names once (so the first join attempt has addresses) and starts the
    /// task that re-resolves them while the node is alone.
    async fn start_seed_resolver(
        &self,
        view: watch::Receiver<Arc<View>>,
    ) -> (seeds::Seeds, Option<JoinHandle<()>>) {
        if self.seed_names.is_empty() {
            return (seeds::Seeds::fixed(self.seeds.clone()), None);
        }
        let timeout = self.profile.tcp_timeout();
        let resolve = move |name| seeds::system_resolve(name, timeout);
        let mut failing = std::collections::BTreeSet::new();
        let first = seeds::resolve_all(&self.seed_names, &resolve, &mut failing).await;
        let (resolved_tx, resolved_rx) = watch::channel(first);
        let task = tokio::spawn(seeds::keep_resolving(
            self.seed_names.clone(),
            resolve,
            view,
            resolved_tx,
            self.profile.join_retry_interval(),
            failing,
        ));
        (
            seeds::Seeds::with_names(self.seeds.clone(), resolved_rx),
            Some(task),
        )
    }
}

/// Binds UDP and TCP on one port number, as memberlist does.
async fn bind_pair<T: Transport>(transport: &T, bind: SocketAddr) -> Result<(T::Udp, T::Listener)> {
    let bind_error = |source| Error::Bind { addr: bind, source };
    let attempts = if bind.port() == 0 { PORT_ATTEMPTS } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let udp = transport.bind_udp(bind).await.map_err(bind_error)?;
        let port = udp.local_addr().map_err(bind_error)?.port();
        match transport.bind_tcp(SocketAddr::new(bind.ip(), port)).await {
            Ok(listener) => {
                debug_assert_eq!(listener.local_addr().ok().map(|a| a.port()), Some(port));
                return Ok((udp, listener));
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(bind_error(last_error.unwrap_or_else(|| {
        std::io::Error::other("no free port for both UDP and TCP")
    })))
}

/// Whether a registration goes into the data dir.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Saving {
    /// Saved (a run-time registration).
    Save,
    /// Declared at every start: not saved, and any saved copy forgotten.
    Forget,
    /// Restored from the data dir: already there.
    AlreadySaved,
}

/// A running grapevine node. Dropping it stops the node without leaving (like a crash);
/// call [`Node::leave`] to depart gracefully.
pub struct Node {
    shared: Arc<Shared>,
    events: broadcast::Sender<MemberEvent>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Health-check tasks by service id.
    checks: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// Handles of the registered services, by id (TTL checks report through them).
    handles: Mutex<BTreeMap<String, ServiceHandle>>,
    connector: Connector,
    rpc_client: crate::rpc::RpcClient,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Node {
    /// Starts configuring a node named `name` (unique in the cluster).
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            name: name.into(),
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise: None,
            seeds: Vec::new(),
            seed_names: Vec::new(),
            profile: Profile::default(),
            generation: None,
            rng_seed: None,
            allow_remote_control: false,
            wall_clock: None,
            config_history: crate::state::config::DEFAULT_HISTORY_CAPACITY,
            tombstone_horizon: None,
            keyring: None,
            keyring_file: None,
            cluster_label: DEFAULT_CLUSTER_LABEL.to_string(),
            data_dir: None,
        }
    }

    /// The configuration store: cluster-wide keys, writes and prefix watches.
    pub fn config(&self) -> ConfigHandle {
        self.shared.config()
    }

    /// Registers (or replaces) a service instance of this node, passing and unchecked; its
    /// health is whatever the returned handle reports. It reaches every node by gossip.
    /// With a data dir, the registration is saved and comes back after a restart.
    pub async fn register(&self, service: Service) -> Result<ServiceHandle> {
        self.register_checked(service, None, Saving::Save).await
    }

    /// Registers (or replaces) a service instance whose health `check` decides. With a data
    /// dir, the registration and its check are saved (a [`Check::custom`] one is not: a
    /// closure cannot be saved).
    pub async fn register_with_check(
        &self,
        service: Service,
        check: Check,
    ) -> Result<ServiceHandle> {
        self.register_checked(service, Some(check), Saving::Save)
            .await
    }

    /// Registers a service declared in the node's own configuration (the agent's
    /// `--service` flags), which is declared again at every start: it is not saved in the
    /// data dir, and a saved registration with the same id is forgotten.
    pub async fn register_declared(
        &self,
        service: Service,
        check: Option<Check>,
    ) -> Result<ServiceHandle> {
        self.register_checked(service, check, Saving::Forget).await
    }

    /// The handle of a registered service instance of this node (to report a TTL check).
    pub fn service_handle(&self, id: &str) -> Option<ServiceHandle> {
        locked(&self.handles).get(id).cloned()
    }

    async fn register_checked(
        &self,
        service: Service,
        check: Option<Check>,
        saving: Saving,
    ) -> Result<ServiceHandle> {
        service.validate()?;
        let Some(check) = check else {
            return self
                .register_record(service, Health::Passing, None, saving)
                .await;
        };
        let target = SocketAddr::new(service.addr.unwrap_or(self.addr().ip()), service.port);
        let status = check.first_status(target, &self.connector).await;
        self.register_record(service, status, Some((check, target)), saving)
            .await
    }

    /// Registers the services saved in the data dir by an earlier run, their checks
    /// re-armed (TTL checks start critical until the service reports in, as in Consul).
    async fn restore_services(&self, services: Vec<StoredService>) {
        let count = services.len();
        let registrations = services.into_iter().map(|stored| async move {
            let mut checks: Vec<Check> = stored.checks.iter().map(Check::from_stored).collect();
            if checks.len() > 1 {
                self.register_many(stored.service, checks, Saving::AlreadySaved)
                    .await
            } else {
                self.register_checked(stored.service, checks.pop(), Saving::AlreadySaved)
                    .await
            }
        });
        for result in futures_util::future::join_all(registrations).await {
            if let Err(error) = result {
                tracing::warn!(%error, "a saved service registration was not restored");
            }
        }
        if count > 0 {
            tracing::info!(count, "service registrations restored from the data dir");
        }
    }

    /// Saves a registration just made (or forgets a saved one when `stored` is `None`, a
    /// declared or unsaveable registration); on failure undoes the registration, so that
    /// what runs matches what comes back after a restart.
    async fn save_registration(
        &self,
        id: &str,
        saving: Saving,
        stored: Option<StoredService>,
    ) -> Result<()> {
        let saved = match (saving, stored) {
            (Saving::AlreadySaved, _) => Ok(()),
            (Saving::Save, Some(stored)) => {
                self.with_store(move |store| store.put_service(&stored))
                    .await
            }
            _ => {
                let id = id.to_string();
                self.with_store(move |store| store.remove_service(&id))
                    .await
            }
        };
        if let Err(error) = saved {
            let _ = self.deregister(id).await;
            return Err(error);
        }
        Ok(())
    }

    /// Runs a blocking data-dir operation, if the node has a data dir.
    async fn with_store(
        &self,
        operation: impl FnOnce(&DataDir) -> Result<(), crate::store::StoreError> + Send + 'static,
    ) -> Result<()> {
        let Some(store) = locked(&self.shared.store).clone() else {
            return Ok(());
        };
        let dir = store.dir().to_path_buf();
        persist::on_blocking_pool(&dir, move || operation(&store)).await?;
        Ok(())
    }

    /// Registers (or replaces) a service instance with several checks, as Consul's
    /// `Checks`: its health is the worst of theirs. Report a TTL check with
    /// [`ServiceHandle::report_check`]; read each check's status with
    /// [`ServiceHandle::check_statuses`].
    /// With a data dir, the registration and its checks are saved (unless one is a
    /// [`Check::custom`]).
    pub async fn register_with_checks(
        &self,
        service: Service,
        checks: Vec<Check>,
    ) -> Result<ServiceHandle> {
        self.register_many(service, checks, Saving::Save).await
    }

    async fn register_many(
        &self,
        service: Service,
        checks: Vec<Check>,
        saving: Saving,
    ) -> Result<ServiceHandle> {
        service.validate()?;
        let stored: Option<Vec<_>> = checks.iter().map(Check::to_stored).collect();
        let stored = stored.map(|checks| StoredService {
            service: service.clone(),
            checks,
        });
        let target = SocketAddr::new(service.addr.unwrap_or(self.addr().ip()), service.port);
        let mut statuses = Vec::with_capacity(checks.len());
        for check in &checks {
            statuses.push(check.first_status(target, &self.connector).await);
        }
        let id = service.id.clone();
        let record = ServiceRecord::new(service, checks::worst(&statuses));
        ask(&self.shared.commands, |reply| Command::Register {
            record,
            reply,
        })
        .await??;
        self.save_registration(&id, saving, stored).await?;
        let (set, run) = checks::check_set(
            id.clone(),
            self.shared.commands.clone(),
            checks,
            statuses,
            target,
            self.connector.clone(),
        );
        if let Some(old) = locked(&self.checks).insert(id.clone(), tokio::spawn(run)) {
            old.abort();
        }
        let handle = ServiceHandle {
            id: id.clone(),
            commands: self.shared.commands.clone(),
            ttl: None,
            set: Some(set),
        };
        locked(&self.handles).insert(id, handle.clone());
        Ok(handle)
    }

    async fn register_record(
        &self,
        service: Service,
        health: Health,
        check: Option<(Check, SocketAddr)>,
        saving: Saving,
    ) -> Result<ServiceHandle> {
        let id = service.id.clone();
        let stored = match saving {
            Saving::Save => Some(StoredService {
                service: service.clone(),
                checks: check
                    .as_ref()
                    .and_then(|(check, _)| check.to_stored())
                    .into_iter()
                    .collect(),
            }),
            Saving::Forget | Saving::AlreadySaved => None,
        };
        let custom_check = check.as_ref().is_some_and(|(c, _)| c.to_stored().is_none());
        let record = ServiceRecord::new(service, health);
        ask(&self.shared.commands, |reply| Command::Register {
            record,
            reply,
        })
        .await??;
        let stored = stored.filter(|_| !custom_check);
        self.save_registration(&id, saving, stored).await?;
        let mut handle = ServiceHandle {
            id: id.clone(),
            commands: self.shared.commands.clone(),
            ttl: None,
            set: None,
        };
        let task = check.map(|(check, target)| {
            let deadline = check.ttl_period().map(|ttl| {
                let (tx, rx) = watch::channel(tokio::time::Instant::now() + ttl);
                handle.ttl = Some((ttl, Arc::new(tx)));
                rx
            });
            tokio::spawn(check.run(
                id.clone(),
                health,
                target,
                self.connector.clone(),
                self.shared.commands.clone(),
                deadline,
            ))
        });
        if let Some(old) = match task {
            Some(task) => locked(&self.checks).insert(id.clone(), task),
            None => locked(&self.checks).remove(&id),
        } {
            old.abort();
        }
        locked(&self.handles).insert(id, handle.clone());
        Ok(handle)
    }

    /// Deregisters a service instance of this node and stops its check (and forgets it in
    /// the data dir).
    pub async fn deregister(&self, id: &str) -> Result<()> {
        if let Some(task) = locked(&self.checks).remove(id) {
            task.abort();
        }
        locked(&self.handles).remove(id);
        let owned = id.to_string();
        ask(&self.shared.commands, |reply| Command::Deregister {
            id: owned,
            reply,
        })
        .await??;
        let owned = id.to_string();
        self.with_store(move |store| store.remove_service(&owned))
            .await
    }

    /// The service catalog: lookups and watches.
    pub fn catalog(&self) -> CatalogHandle {
        self.shared.catalog()
    }

    /// This node's current identity.
    pub fn identity(&self) -> NodeId {
        self.shared.view.borrow().identity.clone()
    }

    /// The address other nodes reach this one at.
    pub fn addr(&self) -> SocketAddr {
        self.shared.view.borrow().identity.addr
    }

    /// Members as this node sees them, itself included, sorted by name.
    pub fn members(&self) -> Vec<Member> {
        self.shared.view.borrow().members.clone()
    }

    /// Waits until the member list satisfies `condition` (checked on every change).
    pub async fn wait_for_members(&self, mut condition: impl FnMut(&[Member]) -> bool) {
        let mut view = self.shared.view.clone();
        loop {
            if condition(&view.borrow_and_update().members) {
                return;
            }
            if view.changed().await.is_err() {
                return;
            }
        }
    }

    /// A stream of membership changes from now on.
    pub fn events(&self) -> MemberEvents {
        MemberEvents {
            receiver: self.events.subscribe(),
            stats: self.shared.stats.clone(),
        }
    }

    /// Counters of traffic sent, received and dropped.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats_snapshot()
    }

    /// Shows a layered component's counters beside the node's, in `grapevine info` and the
    /// HTTP API's `/metrics`, for as long as the source is alive (it is held weakly).
    pub fn add_stats_source(&self, source: std::sync::Weak<dyn StatsSource>) {
        locked(&self.shared.stats_sources).push(source);
    }

    /// The layered components' stats sources that are still alive.
    pub fn stats_sources(&self) -> Vec<Arc<dyn StatsSource>> {
        self.shared.stats_sources()
    }

    /// Saves the keyring to `path` after every change (e.g. a rotation from the CLI).
    pub fn persist_keys_to(&self, path: std::path::PathBuf) {
        if let Some(security) = &self.shared.security {
            security.persist_to(path);
        }
    }

    /// The node's keyring, when its traffic is encrypted.
    pub fn keys(&self) -> Option<Keyring> {
        self.shared.security.as_ref().map(|s| s.keyring())
    }

    /// Changes this node's keyring (install, use, remove); see [`control::KeyOp`] to do it
    /// across the cluster.
    pub fn change_keys(&self, op: &control::KeyOp) -> Result<Keyring> {
        self.shared.change_keys(op)
    }

    /// Joins the cluster through the node at `addr` at run time, as a seed given at start
    /// would, and waits until `addr` is an active member (at once if it already is).
    /// Fails with [`Error::Timeout`] when `addr` does not answer within `wait`.
    pub async fn join(&self, addr: SocketAddr, wait: Duration) -> Result<()> {
        self.shared.join(addr, wait).await
    }

    /// Forces the failed member `name` into the `left` state, as Consul's `force-leave`:
    /// a suspect or down member becomes `left` here and (by a leave notice) on every live
    /// peer, and its instances leave lookups. A live member is left as it is. With `prune`,
    /// a left member is dropped from this node's member list at once. See [`ForceLeave`].
    pub async fn force_leave(&self, name: &str, prune: bool) -> Result<ForceLeave> {
        self.shared.force_leave(name, prune).await
    }

    /// Leaves the cluster gracefully (peers see this node as `left`, never `down`), then
    /// stops the node.
    pub async fn leave(&self) -> Result<()> {
        // Refuse new calls (callers retry elsewhere) and let the running ones finish.
        let unfinished = self.shared.rpc.drain(rpc::DRAIN_LIMIT).await;
        if unfinished > 0 {
            tracing::warn!(unfinished, "leaving with calls still running");
        }
        let (done, finished) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Leave { done })
            .await
            .map_err(|_| Error::Stopped)?;
        let finished = async { finished.await.map_err(|_| Error::Stopped) };
        let result = protocol::within(Duration::from_secs(5), "leave", finished).await?;
        self.flush_saved().await;
        self.stop_and_wait().await;
        result
    }

    /// Waits (briefly) until every config change applied so far is on disk, so that a
    /// clean stop keeps what peers sent last.
    async fn flush_saved(&self) {
        let Some(saved) = self.shared.saved.clone() else {
            return;
        };
        let seq = self.config().current_seq();
        let flush = persist::wait_committed(saved, seq);
        if tokio::time::timeout(FLUSH_ON_STOP, flush).await.is_err() {
            tracing::warn!("stopping before the last config changes were saved");
        }
    }

    /// Stops the node without telling the cluster (peers will detect it as failed).
    pub async fn shutdown(&self) {
        self.stop_and_wait().await;
    }

    /// Stops every task, then waits (briefly) until a commit still running in a blocking
    /// thread lets go of the data dir, so that its lock is free when this returns.
    async fn stop_and_wait(&self) {
        let store = locked(&self.shared.store).clone();
        for handle in self.stop() {
            let _ = handle.await;
        }
        let Some(store) = store else { return };
        let deadline = tokio::time::Instant::now() + FLUSH_ON_STOP;
        while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stop(&self) -> Vec<JoinHandle<()>> {
        locked(&self.shared.store).take();
        let mut handles: Vec<_> = locked(&self.tasks).drain(..).collect();
        handles.extend(std::mem::take(&mut *locked(&self.checks)).into_values());
        for handle in &handles {
            handle.abort();
        }
        handles
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("identity", &self.identity())
            .finish()
    }
}

/// Membership changes of a node, in the order it saw them. A subscriber that falls more
/// than 1024 events behind skips the oldest (counted in `events_lagged`).
#[derive(Debug)]
pub struct MemberEvents {
    receiver: broadcast::Receiver<MemberEvent>,
    stats: Arc<stats::Stats>,
}

impl MemberEvents {
    /// The next event, or `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<MemberEvent> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    stats::Stats::add(&self.stats.events_lagged, missed);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
