//! The DNS interface: any program finds services through plain DNS, as with Consul's DNS
//! on port 8600. `dig @127.0.0.1 -p 8600 web.service.consul SRV`.
//!
//! Names (the domain is configurable, `consul.` by default so that existing setups work
//! unchanged; `grapevine.` is the documented alternative):
//!
//! - `NAME.service.DOMAIN`, `TAG.NAME.service.DOMAIN`: A/AAAA records of the passing
//!   instances on live nodes (the instance's address, or its node's), SRV records for the
//!   same names and for RFC 2782's `_NAME._tcp.service.DOMAIN` (every instance) and
//!   `_NAME._TAG.service.DOMAIN` (a tag). An SRV target is `NODE.node.DOMAIN`, or
//!   `HEX.addr.DOMAIN` when the instance has an address of its own; the target's address
//!   goes in the additional section.
//! - `NODE.node.DOMAIN`: a live node's address. `HEX.addr.DOMAIN`: the address spelled in
//!   hex (`7f000001`), as Consul.
//! - With [`DnsOptions::datacenter`], the same names with that label before the domain
//!   (`web.service.dc1.consul`).
//!
//! Answers: records shuffled per query; NXDOMAIN for a name nothing carries (an unknown
//! service, a tag no instance has); NOERROR and no records for a service whose instances
//! all fail their checks; REFUSED outside the domain (no recursion: never an open
//! resolver). Over UDP an answer fits 512 bytes, or the EDNS0 size the client gave (at
//! most [`DnsOptions::udp_payload`]): past that, answers are cut and TC is set, so clients
//! retry over TCP and get the whole set. Names are matched case-insensitively.
//!
//! The server reads the node's public catalog and member views ([`Node::catalog`],
//! [`Node::members`]); nothing below it learns about DNS. hickory-proto parses and
//! encodes the messages; the sockets are served here (hickory-server spawns a task per
//! datagram and caps no TCP connections, which the limits below need).
//!
//! Limits: UDP queries are answered by a fixed number of tasks (no queue grows); TCP
//! connections are capped ([`DnsOptions::max_tcp_connections`], more are closed at once)
//! and closed after [`DnsOptions::tcp_idle_timeout`] without a complete query; a reply
//! that cannot be written in that time closes the connection too. Malformed packets are
//! dropped unanswered and counted. Counters reach `grapevine info` and `/metrics`
//! (`grapevine_dns_queries_total{type,rcode}`) through the node's stats sources.

mod answer;
mod names;
mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::membership::Member;
use crate::node::{Instance, Node, Query, StatsSource};
use answer::{Directory, Responder, Transport, MAX_TCP_MESSAGE};
use stats::Counters;
pub use stats::DnsStats;

/// The default domain, Consul's.
pub const DEFAULT_DOMAIN: &str = "consul.";
/// The default address of the agent's DNS interface (Consul's port).
pub const DEFAULT_ADDR: &str = "127.0.0.1:8600";

/// How the DNS interface answers, and its limits.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// The domain answered for (default `consul.`); every other name is refused.
    pub domain: String,
    /// A datacenter label accepted before the domain (`web.service.dc1.consul`), if any.
    pub datacenter: Option<String>,
    /// TTL of service records, and of negative answers (default 0: never cached, as
    /// Consul).
    pub ttl: Duration,
    /// TTL of node and SRV-target address records (default 0).
    pub node_ttl: Duration,
    /// TTLs of some services by name; a name ending in `*` is a prefix (`web*`), and `*`
    /// alone matches every service. An exact name wins over a prefix, a longer prefix over
    /// a shorter one. Like Consul's `dns_config.service_ttl`, this is the agent's setting:
    /// the catalog carries no TTL.
    pub service_ttl: BTreeMap<String, Duration>,
    /// Largest UDP response sent to a client that announced a larger EDNS0 buffer (default
    /// 4,096 bytes; at least 512). Lower it (1,232) when answering across networks that
    /// drop fragments.
    pub udp_payload: u16,
    /// TCP connections open at once (default 128); more are closed as soon as accepted.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed (default 10 s); a
    /// reply not written within it closes the connection too.
    pub tcp_idle_timeout: Duration,
    /// Seed of the shuffle of answers; `None` (the default) seeds it from the operating
    /// system. Tests set it to get the same order every run.
    pub rng_seed: Option<u64>,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            domain: DEFAULT_DOMAIN.into(),
            datacenter: None,
            ttl: Duration::ZERO,
            node_ttl: Duration::ZERO,
            service_ttl: BTreeMap::new(),
            udp_payload: 4096,
            max_tcp_connections: 128,
            tcp_idle_timeout: Duration::from_secs(10),
            rng_seed: None,
        }
    }
}

/// Errors starting the DNS interface.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The address could not be bound (UDP or TCP).
    #[error("cannot bind the DNS interface to {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The domain is not a usable DNS name.
    #[error("invalid DNS domain {domain:?}: {reason}")]
    Domain {
        /// The domain given.
        domain: String,
        /// Why it was refused.
        reason: String,
    },
    /// No randomness for the shuffle seed.
    #[error("no entropy for the DNS answer shuffle: {0}")]
    Entropy(std::io::Error),
}

/// Largest datagram read; queries are far smaller (a longer one is cut and dropped).
const UDP_BUFFER: usize = 4096;
/// Tasks answering UDP queries, each one at a time.
const UDP_WORKERS: usize = 2;
/// How many times a free port is looked for when UDP's port is taken on TCP.
const PORT_ATTEMPTS: usize = 16;
/// How long a shutdown waits for the tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Service names by their lowercase form.
type FoldedNames = Arc<BTreeMap<String, Vec<String>>>;

/// The catalog and members of a running node.
struct NodeDirectory {
    node: Arc<Node>,
    /// Service names by their lowercase form, and the catalog index they were read at:
    /// rebuilt only when the catalog changed, so that a flood of misses costs a map lookup
    /// each, not a walk of the catalog.
    folded: std::sync::Mutex<(Option<u64>, FoldedNames)>,
}

impl Directory for NodeDirectory {
    fn instances(&self, service: &str) -> Vec<Instance> {
        self.node
            .catalog()
            .lookup_with(service, &Query::default().include_unhealthy())
    }

    fn names_like(&self, name: &str) -> Vec<String> {
        let catalog = self.node.catalog();
        let index = catalog.index();
        let folded = {
            let mut folded = self
                .folded
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if folded.0 != Some(index) {
                let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for service in catalog.services().into_keys() {
                    map.entry(service.to_ascii_lowercase())
                        .or_default()
                        .push(service);
                }
                *folded = (Some(index), Arc::new(map));
            }
            folded.1.clone()
        };
        folded
            .get(&name.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    fn members(&self) -> Vec<Member> {
        self.node.members()
    }
}

/// What the serving tasks share.
struct Serving {
    directory: NodeDirectory,
    responder: Responder,
    options: DnsOptions,
    shutdown: CancellationToken,
}

/// A running DNS interface (UDP and TCP on one port). Stops when [`DnsServer::shutdown`]
/// is called or it is dropped.
pub struct DnsServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DnsServer {
    /// Binds `addr` (UDP and TCP; port 0 picks one free for both) and answers for `node`
    /// until shut down. Its counters join the node's (`grapevine info`, `/metrics`).
    pub async fn bind(
        node: Arc<Node>,
        addr: SocketAddr,
        options: DnsOptions,
    ) -> Result<DnsServer, DnsError> {
        let counters = Arc::new(Counters::default());
        let responder = Responder::new(&options, counters.clone())?;
        let (udp, tcp) = bind_pair(addr).await?;
        let bound = udp
            .local_addr()
            .map_err(|source| DnsError::Bind { addr, source })?;
        let source: Arc<dyn StatsSource> = counters.clone();
        node.add_stats_source(Arc::downgrade(&source));
        let shutdown = CancellationToken::new();
        let serving = Arc::new(Serving {
            directory: NodeDirectory {
                node,
                folded: Default::default(),
            },
            responder,
            options,
            shutdown: shutdown.clone(),
        });
        let tasks = TaskTracker::new();
        let udp = Arc::new(udp);
        for _ in 0..UDP_WORKERS {
            tasks.spawn(serve_udp(udp.clone(), serving.clone()));
        }
        tasks.spawn(serve_tcp(tcp, serving, tasks.clone()));
        tracing::info!(addr = %bound, "DNS interface listening");
        Ok(DnsServer {
            addr: bound,
            counters,
            shutdown,
            tasks,
        })
    }

    /// The address answered on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the counters.
    pub fn stats(&self) -> DnsStats {
        self.counters.snapshot()
    }

    /// Stops answering, closes the TCP connections and waits (at most 2 s) for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds UDP and TCP on one port number.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let error = |source| DnsError::Bind { addr, source };
    let attempts = if addr.port() == 0 { PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(error)?;
        let port = udp.local_addr().map_err(error)?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(error(last.unwrap_or_else(|| {
        std::io::Error::other("no free port for both UDP and TCP")
    })))
}

/// Answers datagrams one at a time until shut down.
async fn serve_udp(socket: Arc<UdpSocket>, serving: Arc<Serving>) {
    let mut buffer = vec![0u8; UDP_BUFFER];
    loop {
        let received = tokio::select! {
            biased;
            _ = serving.shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors of earlier replies surface here on some systems: not fatal.
                tracing::debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let reply = serving
            .responder
            .respond(&serving.directory, &buffer[..len], Transport::Udp);
        if let Some(reply) = reply {
            if let Err(error) = socket.send_to(&reply, peer).await {
                tracing::debug!(%error, %peer, "DNS UDP reply not sent");
            }
        }
    }
}

/// Accepts TCP connections within the limit until shut down.
async fn serve_tcp(listener: TcpListener, serving: Arc<Serving>, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(serving.options.max_tcp_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = serving.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::debug!(%error, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            serving.responder.counters.tcp_refused_busy();
            drop(stream);
            continue;
        };
        serving.responder.counters.tcp_accepted();
        let serving = serving.clone();
        tasks.spawn(async move {
            serve_connection(stream, &serving).await;
            serving.responder.counters.tcp_closed();
            tracing::trace!(%peer, "DNS TCP connection closed");
            drop(slot);
        });
    }
}

/// Why a connection stopped.
enum Stop {
    /// The peer closed, or a read or write failed.
    Closed,
    /// No complete query (or no written reply) within the idle timeout.
    Idle,
    /// The server is shutting down.
    Shutdown,
}

/// Answers the length-prefixed queries of one connection (RFC 1035 4.2.2), in order.
async fn serve_connection(mut stream: TcpStream, serving: &Serving) {
    let idle = serving.options.tcp_idle_timeout;
    let counters = &serving.responder.counters;
    let mut buffer = Vec::new();
    loop {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            buffer.resize(len, 0);
            stream.read_exact(&mut buffer).await?;
            Ok::<_, std::io::Error>(())
        };
        let outcome = tokio::select! {
            biased;
            _ = serving.shutdown.cancelled() => Stop::Shutdown,
            read = tokio::time::timeout(idle, read) => match read {
                Ok(Ok(())) => {
                    let reply =
                        serving
                            .responder
                            .respond(&serving.directory, &buffer, Transport::Tcp);
                    // A malformed message may mean lost framing: close.
                    let Some(reply) = reply else { return };
                    debug_assert!(reply.len() <= MAX_TCP_MESSAGE);
                    match tokio::time::timeout(idle, write_message(&mut stream, &reply)).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => Stop::Closed,
                        Err(_) => Stop::Idle,
                    }
                }
                Ok(Err(_)) => Stop::Closed,
                Err(_) => Stop::Idle,
            },
        };
        match outcome {
            Stop::Idle => counters.tcp_idle_closed(),
            Stop::Closed | Stop::Shutdown => {}
        }
        return;
    }
}

async fn write_message(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await?;
    stream.flush().await
}

/// The fuzz target's entry: `bytes` answered as UDP and as TCP against a fixed catalog.
pub(crate) fn fuzz_query(bytes: &[u8]) {
    use crate::state::catalog::Health;
    thread_local! {
        static RESPONDER: Responder = Responder::new(
            &DnsOptions { rng_seed: Some(1), datacenter: Some("dc1".into()), ..DnsOptions::default() },
            Arc::new(Counters::default()),
        )
        .expect("the default options are valid");
        static FIXTURE: answer::fixture::Fixture = {
            let mut dir = answer::fixture::Fixture::with_nodes(40);
            for i in 1..=40u8 {
                let health = if i % 7 == 0 { Health::Critical } else { Health::Passing };
                dir.add("web", &format!("n{i}"), 8080, &["v1", "primary"], health, None);
            }
            dir.add("api", "n1", 9000, &[], Health::Passing, Some("fd00::9".parse().expect("an address")));
            dir
        };
    }
    RESPONDER.with(|responder| {
        FIXTURE.with(|dir| {
            for transport in [Transport::Udp, Transport::Tcp] {
                if let Some(reply) = responder.respond(dir, bytes, transport) {
                    let limit = if transport == Transport::Udp {
                        4096
                    } else {
                        MAX_TCP_MESSAGE
                    };
                    assert!(reply.len() <= limit, "reply of {} bytes", reply.len());
                }
            }
        })
    });
}
