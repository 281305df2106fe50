//! The calling side: a pool of multiplexed connections, resolution and load balancing.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::protocol::{self, Frame};
use super::{RpcError, DEFAULT_TIMEOUT, MAX_IN_FLIGHT_PER_CONNECTION};
use crate::net::Transport;
use crate::wire;

/// An instance a service name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Whether it runs on the calling node.
    pub local: bool,
}

/// Resolves service names to live, passing instances (the node implements it with the
/// catalog, skipping instances whose node is suspect or down).
pub trait Resolve: Send + Sync + 'static {
    /// Instances of `service` fit to receive calls.
    fn resolve(&self, service: &str) -> Vec<Endpoint>;
}

/// How a client picks among a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalance {
    /// Two instances at random; the one with fewer calls in flight from this node.
    #[default]
    PowerOfTwoChoices,
    /// Each instance in turn.
    RoundRobin,
    /// An instance on this node if there is one, otherwise power of two choices.
    PreferLocal,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, RpcError>>>>>;

/// One multiplexed connection to a peer.
struct Connection {
    frames: mpsc::Sender<bytes::Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    in_flight: Arc<Semaphore>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    async fn open<T: Transport>(
        transport: &T,
        addr: SocketAddr,
        preface: bytes::Bytes,
        connect_timeout: Duration,
    ) -> Result<Connection, RpcError> {
        let unavailable = |reason: String| RpcError::Unavailable {
            reason,
            retryable: true,
        };
        let stream = tokio::time::timeout(connect_timeout, transport.connect(addr))
            .await
            .map_err(|_| unavailable(format!("connecting to {addr} timed out")))?
            .map_err(|error| unavailable(format!("cannot connect to {addr}: {error}")))?;
        let mut framed = wire::framed(stream);
        framed
            .send(preface)
            .await
            .map_err(|error| unavailable(format!("{addr}: {error}")))?;
        let (mut sink, mut stream) = framed.split();
        let (frames, mut outgoing) = mpsc::channel::<bytes::Bytes>(MAX_IN_FLIGHT_PER_CONNECTION);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
        let writer_in_flight = in_flight.clone();
        // Writer: batches frames, flushing when the queue runs dry.
        let writer_closed = closed.clone();
        tokio::spawn(async move {
            'outer: while let Some(frame) = outgoing.recv().await {
                if sink.feed(frame).await.is_err() {
                    break;
                }
                // With other calls in flight, let them queue their frames first so that one
                // write carries many (a lone call's frame goes at once).
                if MAX_IN_FLIGHT_PER_CONNECTION - writer_in_flight.available_permits() > 1 {
                    tokio::task::yield_now().await;
                }
                while let Ok(frame) = outgoing.try_recv() {
                    if sink.feed(frame).await.is_err() {
                        break 'outer;
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
            writer_closed.store(true, Ordering::Release);
        });
        // Reader: routes replies to their callers; on loss fails every pending call at once.
        let reader_pending = pending.clone();
        let reader_closed = closed.clone();
        tokio::spawn(async move {
            let reason = loop {
                match stream.next().await {
                    Some(Ok(bytes)) => match protocol::decode(&bytes) {
                        Ok(Frame::Reply { id, outcome }) => {
                            let waiter = lock(&reader_pending).remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(outcome.into_result(Duration::ZERO));
                            }
                        }
                        Ok(_) => break format!("{addr} sent a frame a server must not send"),
                        Err(error) => break format!("{addr}: {error}"),
                    },
                    Some(Err(error)) => break format!("connection to {addr} failed: {error}"),
                    None => break format!("{addr} closed the connection"),
                }
            };
            reader_closed.store(true, Ordering::Release);
            for (_, waiter) in lock(&reader_pending).drain() {
                let _ = waiter.send(Err(RpcError::Unavailable {
                    reason: reason.clone(),
                    retryable: false,
                }));
            }
        });
        Ok(Connection {
            frames,
            pending,
            next_id: AtomicU64::new(1),
            in_flight,
            closed,
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn load(&self) -> usize {
        MAX_IN_FLIGHT_PER_CONNECTION - self.in_flight.available_permits()
    }

    async fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let deadline = Instant::now() + timeout;
        let work = async {
            // Back-pressure: wait for a slot rather than queue without bound.
            let _permit = self
                .in_flight
                .acquire()
                .await
                .map_err(|_| RpcError::Unavailable {
                    reason: "connection closed".into(),
                    retryable: true,
                })?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let frame = protocol::encode(&Frame::Call {
                id,
                service: service.to_string(),
                method: method.to_string(),
                timeout_ms: u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX),
                payload: ByteBuf::from(payload),
            })?;
            let (reply, answer) = oneshot::channel();
            lock(&self.pending).insert(id, reply);
            // Dropping this future (caller gave up, or timed out) cancels on the server.
            let mut cancel = CancelOnDrop {
                connection: self,
                id,
                armed: true,
            };
            if self.frames.send(frame).await.is_err() {
                cancel.armed = false;
                lock(&self.pending).remove(&id);
                return Err(RpcError::Unavailable {
                    reason: "connection closed".into(),
                    retryable: true,
                });
            }
            let result = answer.await.unwrap_or_else(|_| {
                Err(RpcError::Unavailable {
                    reason: "connection closed".into(),
                    retryable: false,
                })
            });
            cancel.armed = false;
            result
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Err(RpcError::Timeout(_))) | Err(_) => Err(RpcError::Timeout(timeout)),
            Ok(result) => result,
        }
    }
}

struct CancelOnDrop<'a> {
    connection: &'a Connection,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.connection.pending).remove(&self.id);
            if let Ok(frame) = protocol::encode(&Frame::Cancel { id: self.id }) {
                let _ = self.connection.frames.try_send(frame);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per peer: the live connection, or when to try again after a failure.
#[derive(Default)]
struct Slot {
    connection: Option<Arc<Connection>>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Connect = Arc<
    dyn Fn(
            SocketAddr,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Connection, RpcError>> + Send>,
        > + Send
        + Sync,
>;

/// Connections to every peer this node calls, with reconnection and backoff. Cheap to
/// clone.
#[derive(Clone)]
pub struct RpcClient {
    slots: Arc<Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>>>,
    connect: Connect,
    resolver: Arc<dyn Resolve>,
    rng: Arc<Mutex<SmallRng>>,
    round_robin: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("peers", &lock(&self.slots).len())
            .finish()
    }
}

impl RpcClient {
    /// A client connecting through `transport`, sending `preface` first on every new
    /// connection, resolving services with `resolver`.
    pub fn new<T: Transport>(
        transport: T,
        preface: bytes::Bytes,
        resolver: Arc<dyn Resolve>,
        seed: u64,
    ) -> Self {
        let connect: Connect = Arc::new(move |addr| {
            let transport = transport.clone();
            let preface = preface.clone();
            Box::pin(
                async move { Connection::open(&transport, addr, preface, DEFAULT_TIMEOUT).await },
            )
        });
        RpcClient {
            slots: Arc::default(),
            connect,
            resolver,
            rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))),
            round_robin: Arc::default(),
        }
    }

    /// A client for the instances of `service`.
    pub fn service(&self, service: impl Into<String>) -> ServiceClient {
        ServiceClient {
            rpc: self.clone(),
            service: service.into(),
            policy: LoadBalance::default(),
            idempotent: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>, RpcError> {
        let slot = lock(&self.slots).entry(addr).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(connection) = &slot.connection {
            if !connection.is_closed() {
                return Ok(connection.clone());
            }
            slot.connection = None;
        }
        if let Some(retry_at) = slot.retry_at {
            if Instant::now() < retry_at {
                return Err(RpcError::Unavailable {
                    reason: format!("{addr} failed recently; retrying after a backoff"),
                    retryable: true,
                });
            }
        }
        match (self.connect)(addr).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                slot.connection = Some(connection.clone());
                slot.retry_at = None;
                slot.backoff = Duration::ZERO;
                Ok(connection)
            }
            Err(error) => {
                slot.backoff = (slot.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                slot.retry_at = Some(Instant::now() + slot.backoff);
                Err(error)
            }
        }
    }

    /// Calls `service.method` on the node at `addr` directly, without resolution.
    pub async fn call_addr<Req, Resp>(
        &self,
        addr: SocketAddr,
        service: &str,
        method: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let payload = protocol::to_payload(request)?;
        let bytes = self
            .call_raw(addr, service, method, payload, timeout)
            .await?;
        protocol::from_payload(&bytes)
    }

    async fn call_raw(
        &self,
        addr: SocketAddr,
        service: &str,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        // The call's deadline covers connecting too (an unreachable peer may never answer).
        let started = Instant::now();
        let connection = tokio::time::timeout(timeout, self.connection(addr))
            .await
            .map_err(|_| RpcError::Timeout(timeout))??;
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(RpcError::Timeout(timeout));
        }
        connection.call(service, method, payload, remaining).await
    }

    fn load_of(&self, addr: SocketAddr) -> usize {
        let slot = lock(&self.slots).get(&addr).cloned();
        slot.and_then(|slot| {
            slot.try_lock()
                .ok()
                .and_then(|s| s.connection.as_ref().map(|c| c.load()))
        })
        .unwrap_or(0)
    }

    fn pick(&self, candidates: &[Endpoint], policy: LoadBalance) -> Option<SocketAddr> {
        match (candidates.len(), policy) {
            (0, _) => None,
            (1, _) => Some(candidates[0].addr),
            (_, LoadBalance::RoundRobin) => {
                let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
                Some(candidates[turn % candidates.len()].addr)
            }
            (_, LoadBalance::PreferLocal) => candidates
                .iter()
                .find(|e| e.local)
                .map(|e| e.addr)
                .or_else(|| self.pick(candidates, LoadBalance::PowerOfTwoChoices)),
            (n, LoadBalance::PowerOfTwoChoices) => {
                let (a, b) = {
                    let mut rng = lock(&self.rng);
                    let a = rng.random_range(0..n);
                    let b = (a + rng.random_range(1..n)) % n;
                    (a, b)
                };
                let (a, b) = (candidates[a].addr, candidates[b].addr);
                Some(if self.load_of(b) < self.load_of(a) {
                    b
                } else {
                    a
                })
            }
        }
    }
}

/// Calls to one service, resolved and balanced through the catalog.
#[derive(Clone, Debug)]
pub struct ServiceClient {
    rpc: RpcClient,
    service: String,
    policy: LoadBalance,
    idempotent: bool,
    timeout: Duration,
}

/// Most instances an idempotent call is tried on.
const MAX_ATTEMPTS: usize = 3;

impl ServiceClient {
    /// Picks instances with `policy`.
    pub fn policy(mut self, policy: LoadBalance) -> Self {
        self.policy = policy;
        self
    }

    /// Marks calls idempotent: after a connection failure they are retried on another
    /// instance (at most 3 in all).
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// The deadline of each call (default 5 s), sent to the server too.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `method` with `request` on an instance of the service.
    pub async fn call<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let payload = protocol::to_payload(request)?;
        let deadline = Instant::now() + self.timeout;
        let mut tried = BTreeSet::new();
        let mut last_error = None;
        loop {
            let candidates: Vec<Endpoint> = self
                .rpc
                .resolver
                .resolve(&self.service)
                .into_iter()
                .filter(|e| !tried.contains(&e.addr))
                .collect();
            let Some(addr) = self.rpc.pick(&candidates, self.policy) else {
                return Err(
                    last_error.unwrap_or_else(|| RpcError::NoInstances(self.service.clone()))
                );
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RpcError::Timeout(self.timeout));
            }
            let result = self
                .rpc
                .call_raw(addr, &self.service, method, payload.clone(), remaining)
                .await;
            match result {
                Ok(bytes) => return protocol::from_payload(&bytes),
                Err(RpcError::Timeout(_)) => return Err(RpcError::Timeout(self.timeout)),
                Err(error)
                    if error.is_connection_failure()
                        && (self.idempotent
                            || matches!(
                                error,
                                RpcError::Unavailable {
                                    retryable: true,
                                    ..
                                }
                            ))
                        && tried.len() + 1 < MAX_ATTEMPTS =>
                {
                    tracing::debug!(%addr, %error, "retrying on another instance");
                    tried.insert(addr);
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
    }
}
