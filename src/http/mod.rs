//! The agent's sidecar HTTP API: any program, in any language, registers services, looks
//! them up, reads and writes config and watches both, over JSON on loopback. It also serves
//! Prometheus metrics (`/metrics`) and a live status page (`/`).
//!
//! The endpoints under `/v1/` answer as Consul's agent does (its JSON shapes, status codes,
//! `X-Consul-*` headers and blocking queries), so that Consul clients work unchanged; see
//! `docs/openapi.yaml` and the README's "HTTP API" section. Consul's names live here only:
//! datacenter = the cluster label, Consul node = member, a service's check id =
//! `service:{id}`, indexes = this agent's own monotonic counters. Grapevine's extras
//! (`/v1/status`, the SSE streams, `/metrics`) sit beside them. Reads are served from the
//! node's published views; blocking queries (`?index=N&wait=30s`) and Server-Sent Events
//! streams wait on the node's own change counters, never on polling. Every wait is bounded:
//! `wait` is capped, concurrent watchers are capped (429 beyond), bodies are size-limited
//! (413), and the server stops with the agent.

mod api;
mod consul;
mod kv;
mod prometheus;
mod query;
mod token;

pub use query::parse_duration;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// Limits of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body accepted (default 128 KiB: a config value is at most 64 KiB).
    pub max_body: usize,
    /// Bytes of request bodies that may be arriving at once, over all connections (default
    /// 4 MiB: 32 bodies of the largest size). Each request with a body reserves its declared
    /// length (or `max_body` when chunked) before the body is read; a request that finds the
    /// budget spent gets 503 and is counted, so slow big bodies cannot grow the heap.
    pub max_bodies_in_flight: usize,
    /// Blocking queries and event streams open at once (default 256); more get 429.
    pub max_watchers: usize,
    /// Longest `wait` of a blocking query (default 10 min, as Consul); longer ones are capped.
    pub max_wait: Duration,
    /// `wait` of a blocking query that gives none (default 5 min, as Consul).
    pub default_wait: Duration,
    /// Interval of SSE keep-alive comments (default 15 s).
    pub keep_alive: Duration,
    /// Connections open at once (default 1,024); more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection waiting this long for a request's bytes is closed (default 60 s; at
    /// least twice `keep_alive`): idle keep-alive connections and clients that never finish
    /// their request free their slot.
    pub idle_timeout: Duration,
    /// The datacenter answered to Consul clients (the cluster label; default `dc1`).
    pub datacenter: String,
    /// When set, every request but the status page itself must carry this token
    /// (`X-Consul-Token`, `Authorization: Bearer`, or `?token=`); others get 403.
    pub token: Option<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body: 128 * 1024,
            max_bodies_in_flight: 4 * 1024 * 1024,
            max_watchers: 256,
            max_wait: Duration::from_secs(600),
            default_wait: Duration::from_secs(300),
            keep_alive: Duration::from_secs(15),
            max_connections: 1024,
            idle_timeout: Duration::from_secs(60),
            datacenter: "dc1".to_string(),
            token: None,
        }
    }
}

/// Errors starting the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound.
    #[error("cannot bind the HTTP API to {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// The response header carrying the index of a blocking query's view (on every answer).
pub const INDEX_HEADER: &str = "x-consul-index";

/// State shared by the handlers.
pub(crate) struct AppState {
    pub(crate) node: Arc<Node>,
    pub(crate) options: HttpOptions,
    /// Permits for blocking queries and streams.
    watchers: Arc<Semaphore>,
    /// The budget of request bodies still arriving, one permit per KiB.
    bodies: Arc<Semaphore>,
    /// Services registered through this API, by id, for their check endpoints.
    pub(crate) services: Mutex<std::collections::BTreeMap<String, consul::LocalService>>,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled once `PUT /v1/agent/leave` made the node leave: the agent then exits.
    pub(crate) left: CancellationToken,
    pub(crate) metrics: prometheus::Metrics,
}

impl AppState {
    /// A watcher slot, or 429 when every slot is taken.
    pub(crate) fn watcher(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.watchers.clone().try_acquire_owned().map_err(|_| {
            self.metrics.watcher_refused();
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many blocking queries and streams open (limit {}); retry later",
                    self.options.max_watchers
                ),
            )
        })
    }

    /// Reserves the memory of `request`'s body (its declared length, or `max_body` when it
    /// is chunked; nothing without a body) until the guard is dropped, or answers 503 when
    /// the node-wide budget is spent.
    pub(crate) fn body_reservation(
        &self,
        request: &axum::extract::Request,
    ) -> Result<Option<tokio::sync::SemaphorePermit<'_>>, ApiError> {
        let headers = request.headers();
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let bytes = match declared {
            Some(length) => length.min(self.options.max_body as u64) as usize,
            None if headers.contains_key(axum::http::header::TRANSFER_ENCODING) => {
                self.options.max_body
            }
            None => 0,
        };
        if bytes == 0 {
            return Ok(None);
        }
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        match self.bodies.try_acquire_many(kib) {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.metrics.body_refused();
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "too many request bodies arriving at once (budget {} KiB); retry later",
                        self.options.max_bodies_in_flight / 1024
                    ),
                ))
            }
        }
    }

    /// Watchers open right now.
    pub(crate) fn watchers_open(&self) -> usize {
        self.options.max_watchers - self.watchers.available_permits()
    }
}

/// An error answered as Consul does: the message as plain text, with a fitting status code.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// The index of the view the error was found in (a 404 of a blocking query).
    index: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            index: None,
        }
    }

    pub(crate) fn with_index(mut self, index: u64) -> Self {
        self.index = Some(index);
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            self.message,
        )
            .into_response();
        if let Some(index) = self.index {
            response
                .headers_mut()
                .insert(INDEX_HEADER, axum::http::HeaderValue::from(index));
        }
        response
    }
}

impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        use crate::state::catalog::CatalogError;
        use crate::state::config::ConfigError;
        let status = match &error {
            crate::Error::Catalog(CatalogError::UnknownService(_)) => StatusCode::NOT_FOUND,
            crate::Error::Catalog(CatalogError::TooManyServices) => StatusCode::CONFLICT,
            crate::Error::Catalog(_) | crate::Error::Config(_) => StatusCode::BAD_REQUEST,
            crate::Error::ConfigStore(ConfigError::ValueTooLarge { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            crate::Error::ConfigStore(_) => StatusCode::BAD_REQUEST,
            crate::Error::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, error.to_string())
    }
}

/// A TCP listener that holds at most a fixed number of connections open: the next accept
/// waits for a slot, so extra clients queue in the kernel's backlog instead of in memory.
struct CappedListener {
    inner: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

/// A connection holding its slot until it is dropped, closed when it waits longer than the
/// idle timeout for a request's bytes. Writes count as activity, so streams (keep-alive
/// every 15 s) stay open; a blocking query is a request being answered, not idleness.
struct CappedStream {
    inner: tokio::net::TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    requests: ConnectionRequests,
}

/// Requests of one connection being answered (counted by the router's middleware, which
/// finds it as the connection's `ConnectInfo`): while one is, the connection is not idle.
#[derive(Clone, Default)]
pub(crate) struct ConnectionRequests(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionRequests {
    /// Counts a request until the returned guard is dropped.
    pub(crate) fn start(&self) -> impl Drop {
        use std::sync::atomic::Ordering;
        struct Running(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.0.fetch_add(1, Ordering::Relaxed);
        Running(self.0.clone())
    }

    fn busy(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CappedListener>>
    for ConnectionRequests
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, CappedListener>) -> Self {
        stream.io().requests.clone()
    }
}

impl CappedStream {
    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            // The semaphore is never closed; should it be, stop accepting.
            return std::future::pending().await;
        };
        loop {
            match self.inner.accept().await {
                Ok((inner, addr)) => {
                    let stream = CappedStream {
                        inner,
                        _slot: slot,
                        idle: self.idle,
                        timer: Box::pin(tokio::time::sleep(self.idle)),
                        requests: ConnectionRequests::default(),
                    };
                    return (stream, addr);
                }
                Err(error) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::debug!(%error, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for CappedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(result)
            }
            // The server also reads while it answers (to notice a client leaving): a long
            // blocking query is not idleness.
            Poll::Pending if this.requests.busy() => {
                this.touch();
                Poll::Pending
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "HTTP connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for CappedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running HTTP API. Stops when [`HttpServer::shutdown`] is called or it is dropped.
pub struct HttpServer {
    addr: SocketAddr,
    left: CancellationToken,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// How long a shutdown waits for open requests before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

impl HttpServer {
    /// Binds `addr` and serves the API of `node` until shut down.
    pub async fn start(
        node: Arc<Node>,
        addr: SocketAddr,
        options: HttpOptions,
    ) -> Result<HttpServer, HttpError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        let shutdown = CancellationToken::new();
        let left = CancellationToken::new();
        let state = Arc::new(AppState {
            node,
            watchers: Arc::new(Semaphore::new(options.max_watchers)),
            bodies: Arc::new(Semaphore::new(
                (options.max_bodies_in_flight / 1024).clamp(1, Semaphore::MAX_PERMITS),
            )),
            services: Mutex::new(Default::default()),
            shutdown: shutdown.clone(),
            left: left.clone(),
            metrics: prometheus::Metrics::new(),
            options: options.clone(),
        });
        let router = api::router(state).layer(DefaultBodyLimit::max(options.max_body));
        let stop = shutdown.clone();
        let listener = CappedListener {
            inner: listener,
            slots: Arc::new(Semaphore::new(options.max_connections.max(1))),
            // Streams write a keep-alive every `keep_alive`: never take that for idleness.
            idle: options.idle_timeout.max(options.keep_alive * 2),
        };
        let task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<ConnectionRequests>();
            let serving = axum::serve(listener, service)
                .with_graceful_shutdown(stop.clone().cancelled_owned());
            if let Err(error) = serving.await {
                tracing::warn!(%error, "HTTP API stopped");
            }
        });
        tracing::info!(addr = %bound, "HTTP API listening");
        Ok(HttpServer {
            addr: bound,
            left,
            shutdown,
            task: Some(task),
        })
    }

    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Completes once a client made the node leave (`PUT /v1/agent/leave`); the agent
    /// should then exit, as Consul's does.
    pub async fn left(&self) {
        self.left.cancelled().await
    }

    /// Stops accepting requests, ends open watches and streams, and waits (at most 2 s)
    /// for the requests in progress.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(mut task) = self.task.take() {
            // Streams end on the token; whatever is still open after the grace is cut off.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                            .await
                            .is_err()
                        {
                            task.abort();
                        }
                    });
                }
                Err(_) => task.abort(),
            }
        }
    }
}
