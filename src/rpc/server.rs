//! The serving side: registered services, and the loop of one RPC connection.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use crate::wire::FrameCodec;
use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;
use tokio_util::codec::Framed;

use super::metrics::{CallRecord, CallSide, RpcMetrics, ServiceFigures, ServiceSnapshot};
use super::protocol::{self, Frame, Outcome};
use super::trace::{handle_span, TraceContext};
use super::{AppError, MAX_IN_FLIGHT_PER_CONNECTION};

type HandlerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
/// Decodes the request (at once, from the frame's buffer) and returns the work to run.
type Handler = Arc<dyn Fn(&[u8]) -> HandlerFuture + Send + Sync>;

/// A service: named methods, each a typed async function.
#[derive(Clone)]
pub struct RpcService {
    name: String,
    methods: HashMap<String, Handler>,
}

impl std::fmt::Debug for RpcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut methods: Vec<_> = self.methods.keys().collect();
        methods.sort();
        f.debug_struct("RpcService")
            .field("name", &self.name)
            .field("methods", &methods)
            .finish()
    }
}

impl RpcService {
    /// A service named `name` (the name clients call and the catalog lists).
    pub fn new(name: impl Into<String>) -> Self {
        RpcService {
            name: name.into(),
            methods: HashMap::new(),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds method `name`: `handler` takes the decoded request and returns the response or
    /// an application error.
    pub fn method<Req, Resp, F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, AppError>> + Send + 'static,
    {
        let erased = erase(move |request: Req| {
            let work = handler(request);
            async move { work.await.map_err(Outcome::App) }
        });
        self.methods.insert(name.into(), erased);
        self
    }

    /// Adds method `name` served by a `tower::Service`, so handlers can be wrapped in `tower`
    /// layers (timeouts, concurrency limits, load shedding...), go-kit's endpoint
    /// middleware. Errors the layers add reach the caller as it expects: a shed call
    /// (`Overloaded`) as retryable [`RpcError::Unavailable`](super::RpcError::Unavailable),
    /// a layer's timeout (`Elapsed`) as a timeout, an [`AppError`] as itself, any other
    /// error as `AppError` code 500.
    pub fn method_service<Req, Resp, S>(mut self, name: impl Into<String>, service: S) -> Self
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        S: tower::Service<Req, Response = Resp> + Clone + Send + Sync + 'static,
        S::Error: Into<tower::BoxError>,
        S::Future: Send + 'static,
    {
        use tower::ServiceExt;
        let erased = erase(move |request: Req| {
            let service = service.clone();
            async move {
                service
                    .oneshot(request)
                    .await
                    .map_err(|error| layer_outcome(error.into()))
            }
        });
        self.methods.insert(name.into(), erased);
        self
    }
}

/// Wraps a typed handler as a [`Handler`] on payload bytes: a request that does not decode
/// is answered `BadRequest` without running the handler; `run`'s error is the outcome sent.
fn erase<Req, Resp, Fut>(run: impl Fn(Req) -> Fut + Send + Sync + 'static) -> Handler
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    Fut: Future<Output = Result<Resp, Outcome>> + Send + 'static,
{
    Arc::new(move |payload: &[u8]| {
        let request: Req = match protocol::from_payload(payload) {
            Ok(request) => request,
            Err(error) => {
                let outcome = Outcome::BadRequest(error.to_string());
                return Box::pin(std::future::ready(outcome)) as HandlerFuture;
            }
        };
        let work = run(request);
        Box::pin(async move {
            match work.await {
                Ok(response) => match protocol::to_payload(&response) {
                    Ok(bytes) => Outcome::Ok(ByteBuf::from(bytes)),
                    Err(error) => Outcome::BadRequest(error.to_string()),
                },
                Err(outcome) => outcome,
            }
        })
    })
}

/// The outcome a caller sees for an error of a `tower` handler stack.
fn layer_outcome(error: tower::BoxError) -> Outcome {
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Outcome::Unavailable("overloaded: the handler shed the call".into());
    }
    if error.is::<tower::timeout::error::Elapsed>() {
        return Outcome::DeadlineExceeded;
    }
    match error.downcast::<AppError>() {
        Ok(app) => Outcome::App(*app),
        Err(other) => Outcome::App(AppError::new(500, other.to_string())),
    }
}

/// A registered service and its figures (kept across re-registrations).
struct Served {
    service: Arc<RpcService>,
    figures: Arc<ServiceFigures>,
}

/// The services a node serves, and its drain state.
#[derive(Default)]
pub struct Registry {
    services: RwLock<HashMap<String, Served>>,
    /// Bumped by every change of `services`, so that connections know when the handler
    /// they looked up last is stale.
    generation: AtomicU64,
    metrics: RpcMetrics,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Registry {
    /// Adds (or replaces) a service.
    pub fn add(&self, service: RpcService) {
        let figures = self.metrics.service(&service.name);
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services.insert(
            service.name.clone(),
            Served {
                service: Arc::new(service),
                figures,
            },
        );
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Removes a service; `false` if it was not served.
    pub fn remove(&self, name: &str) -> bool {
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        let removed = services.remove(name).is_some();
        self.generation.fetch_add(1, Ordering::Release);
        removed
    }

    /// Names of the services served.
    pub fn names(&self) -> Vec<String> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = services.keys().cloned().collect();
        names.sort();
        names
    }

    /// Figures of the calls served, per registered service.
    pub fn metrics(&self) -> Vec<ServiceSnapshot> {
        self.metrics.snapshot(CallSide::Server)
    }

    /// The handler of `service.method` and the service's figures. Calls to services not
    /// served are not counted per service: their names come from the network.
    fn handler(
        &self,
        service: &str,
        method: &str,
    ) -> Result<(Handler, Arc<ServiceFigures>), String> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let found = services
            .get(service)
            .ok_or_else(|| format!("no service {service:?} here"))?;
        let handler = found
            .service
            .methods
            .get(method)
            .cloned()
            .ok_or_else(|| format!("service {service:?} has no method {method:?}"))?;
        Ok((handler, found.figures.clone()))
    }

    /// Calls currently running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Refuses new calls (with a retryable error) and waits, at most `limit`, for the
    /// running ones to finish. Returns how many were still running at the end.
    pub async fn drain(&self, limit: Duration) -> usize {
        // SeqCst, paired with `Registry::begin_call`: a call either sees the drain or is counted.
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight();
            }
        }
    }

    /// Counts a new call, unless the node is draining (then it is refused).
    fn begin_call(&self) -> bool {
        // Count first, then check: a drain that starts in between sees this call.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.finished(1);
            return false;
        }
        true
    }

    /// `calls` counted calls are done (their replies flushed, or nobody is left to answer).
    fn finished(&self, calls: usize) {
        if calls > 0 && self.in_flight.fetch_sub(calls, Ordering::AcqRel) == calls {
            self.idle.notify_waiters();
        }
    }
}

/// Serves one RPC connection until the client closes it or sends garbage.
///
/// One task reads calls, runs them and writes the replies. A handler that finishes on its
/// first poll (most do) is answered inline; only handlers that wait are spawned, under the
/// call's deadline. The replies of one read burst go out in one write.
pub(crate) async fn serve_connection<S>(
    framed: Framed<S, FrameCodec>,
    registry: Arc<Registry>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (done_tx, done_rx) = mpsc::channel(MAX_IN_FLIGHT_PER_CONNECTION);
    let mut connection = ServerConnection {
        framed,
        output: BytesMut::new(),
        counted_replies: 0,
        refusals: 0,
        needs_flush: false,
        clock: None,
        registry,
        running: HashMap::new(),
        last_handler: None,
        done_tx,
        done_rx,
        read_closed: false,
    };
    poll_fn(|cx| connection.poll_serve(cx, false)).await?;
    // The client closed its side: let running calls answer, briefly.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        poll_fn(|cx| connection.poll_serve(cx, true)),
    )
    .await;
    Ok(())
}

/// A handler found in the registry, valid while the registry's generation is unchanged.
struct LastHandler {
    service: String,
    method: String,
    generation: u64,
    handler: Handler,
    figures: Arc<ServiceFigures>,
}

/// What a spawned call sends back when done.
type Done = (u64, Outcome, InFlight);

struct ServerConnection<S> {
    /// Reads length-checked frames; replies bypass it (written from `output`).
    framed: Framed<S, FrameCodec>,
    /// Encoded replies not yet written.
    output: BytesMut,
    /// Replies in `output` (or written but not yet flushed) of calls counted in the
    /// registry's in-flight figure (a drain waits for the reply to leave): released together
    /// once flushed, one atomic operation per write rather than per call.
    counted_replies: usize,
    /// Refusals in `output` (or not yet flushed): not counted in the registry, but against
    /// the connection's bound.
    refusals: usize,
    needs_flush: bool,
    /// When the calls of the current read burst were read: their start (for figures and
    /// deadlines), one clock reading per burst rather than per call.
    clock: Option<tokio::time::Instant>,
    registry: Arc<Registry>,
    /// Calls running in tasks of their own, by id (for cancellation).
    running: HashMap<u64, AbortHandle>,
    /// The handler of the method called last (a connection mostly calls one or a few), so
    /// that a call finds it without the registry's lock and two hashed lookups.
    last_handler: Option<LastHandler>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    read_closed: bool,
}

impl<S> Drop for ServerConnection<S> {
    fn drop(&mut self) {
        // The client is gone (or the node stops): its calls have no one to answer to.
        for (_, task) in self.running.drain() {
            task.abort();
        }
        self.registry.finished(self.counted_replies);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerConnection<S> {
    /// Calls counted against the per-connection bound.
    fn in_flight(&self) -> usize {
        self.running.len() + self.counted_replies + self.refusals
    }

    /// Replies queued or written but not yet flushed.
    fn unflushed(&self) -> usize {
        self.counted_replies + self.refusals
    }

    /// Serves until the client closes its side (`Ready(Ok)`), or, with `until_idle`, until
    /// every running call is answered and flushed as well.
    fn poll_serve(&mut self, cx: &mut Context<'_>, until_idle: bool) -> Poll<Result<(), String>> {
        loop {
            let mut progressed = false;
            self.clock = None;
            // Answers of spawned calls.
            while let Poll::Ready(Some((id, outcome, call))) = self.done_rx.poll_recv(cx) {
                progressed = true;
                self.running.remove(&id);
                self.answer_spawned(id, outcome, call);
            }
            // Calls, as long as the connection's bound allows (back-pressure).
            while !self.read_closed && self.in_flight() < MAX_IN_FLIGHT_PER_CONNECTION {
                match Pin::new(&mut self.framed).poll_next(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        progressed = true;
                        self.handle_frame(cx, &frame)?;
                        // Everything read is handled: answer before reading again (one
                        // write per read burst, and no wasted read before a lone reply).
                        if self.framed.read_buffer().is_empty() {
                            self.clock = None;
                            if let Poll::Ready(Err(error)) = self.poll_write_out(cx) {
                                return Poll::Ready(Err(error.to_string()));
                            }
                        }
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.to_string())),
                    Poll::Ready(None) => self.read_closed = true,
                    Poll::Pending => break,
                }
            }
            // One write for everything answered so far.
            let answered = self.unflushed();
            if let Poll::Ready(Err(error)) = self.poll_write_out(cx) {
                return Poll::Ready(Err(error.to_string()));
            }
            // Flushed replies free room under the bound: read again.
            if answered > 0 && self.unflushed() == 0 {
                progressed = true;
            }
            if self.read_closed
                && (!until_idle || (self.running.is_empty() && self.unflushed() == 0))
            {
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    fn handle_frame(&mut self, cx: &mut Context<'_>, frame: &[u8]) -> Result<(), String> {
        match protocol::decode(frame).map_err(|error| error.to_string())? {
            Frame::Call {
                id,
                service,
                method,
                timeout_ms,
                payload,
                trace,
            } => self.start_call(cx, id, service, method, timeout_ms, payload, trace),
            Frame::Cancel { id } => {
                if let Some(task) = self.running.remove(&id) {
                    task.abort();
                }
            }
            Frame::Reply { .. } => return Err("a client sent a reply".into()),
        }
        Ok(())
    }

    // The fields of one decoded call frame, borrowed from the read buffer.
    #[allow(clippy::too_many_arguments)]
    fn start_call(
        &mut self,
        cx: &mut Context<'_>,
        id: u64,
        service: &str,
        method: &str,
        timeout_ms: u32,
        payload: &[u8],
        trace: Option<TraceContext>,
    ) {
        if !self.registry.begin_call() {
            let outcome = Outcome::Unavailable("node is leaving".into());
            push_reply(&mut self.output, id, outcome);
            self.refusals += 1;
            return;
        }
        if let Err(what) = self.find_handler(service, method) {
            // Not counted per service: the names come from the network.
            return self.queue_counted_reply(id, Outcome::NotFound(what));
        }
        let started = *self.clock.get_or_insert_with(tokio::time::Instant::now);
        let last = self.last_handler.as_ref().expect("found above");
        // Work whose caller has already given up is not started.
        if timeout_ms == 0 {
            let outcome = Outcome::DeadlineExceeded;
            last.figures.record(started.elapsed(), outcome.failure());
            return self.queue_counted_reply(id, outcome);
        }
        let handler = &last.handler;
        // A traced call: the handler runs in a child span of the caller's, with the caller's
        // context current (calls it makes continue the trace).
        let mut work = match (handle_span(service, method, trace.as_ref()), trace) {
            (None, _) => handler(payload),
            (Some(span), Some(parent)) => {
                let work = handler(payload);
                Box::pin(tracing::Instrument::instrument(parent.scope(work), span))
            }
            (Some(span), None) => Box::pin(tracing::Instrument::instrument(handler(payload), span)),
        };
        // Most handlers finish at once: answer inline, without a task or a timer.
        let outcome = match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Ready(outcome)) => Some(outcome),
            Ok(Poll::Pending) => None,
            Err(_) => Some(panicked()),
        };
        if let Some(outcome) = outcome {
            last.figures.record(started.elapsed(), outcome.failure());
            return self.queue_counted_reply(id, outcome);
        }
        // The call waits: it runs in a task of its own, which holds its count (released if
        // the connection is gone when it finishes) and its record (cancelled if aborted).
        let call = InFlight {
            registry: self.registry.clone(),
            record: CallRecord::started_at(last.figures.clone(), started),
            counted: true,
        };
        let deadline = started + Duration::from_millis(u64::from(timeout_ms));
        let done = self.done_tx.clone();
        let task =
            tokio::spawn(async move {
                let outcome =
                    match tokio::time::timeout_at(deadline, AssertUnwindSafe(work).catch_unwind())
                        .await
                    {
                        Ok(Ok(outcome)) => outcome,
                        Ok(Err(_)) => panicked(),
                        Err(_) => Outcome::DeadlineExceeded,
                    };
                // The connection holds at most MAX_IN_FLIGHT_PER_CONNECTION calls, each sending
                // once: this never waits. If the connection is gone, `call` is released here.
                let _ = done.send((id, outcome, call)).await;
            });
        self.running.insert(id, task.abort_handle());
    }

    /// Makes `last_handler` the handler of `service.method`: the one called last if it is
    /// still registered (no lock, no hashing, no reference counting on the common path),
    /// otherwise the registry's.
    fn find_handler(&mut self, service: &str, method: &str) -> Result<(), String> {
        let generation = self.registry.generation.load(Ordering::Acquire);
        if let Some(last) = &self.last_handler {
            if last.generation == generation && last.service == service && last.method == method {
                return Ok(());
            }
        }
        let (handler, figures) = self.registry.handler(service, method)?;
        self.last_handler = Some(LastHandler {
            service: service.to_string(),
            method: method.to_string(),
            generation,
            handler,
            figures,
        });
        Ok(())
    }

    /// Queues the reply of a call counted in the registry.
    fn queue_counted_reply(&mut self, id: u64, outcome: Outcome) {
        push_reply(&mut self.output, id, outcome);
        self.counted_replies += 1;
    }

    /// The answer of a call that ran in a task of its own: its record and its count move
    /// to the connection's reply.
    fn answer_spawned(&mut self, id: u64, outcome: Outcome, mut call: InFlight) {
        call.record.finish(outcome.failure());
        call.counted = false;
        drop(call);
        self.queue_counted_reply(id, outcome);
    }

    /// Writes and flushes the output; releases the calls answered once it is flushed.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.output.is_empty() {
            let written = ready!(Pin::new(self.framed.get_mut()).poll_write(cx, &self.output))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.output.advance(written);
            self.needs_flush = true;
        }
        if self.needs_flush {
            ready!(Pin::new(self.framed.get_mut()).poll_flush(cx))?;
            self.needs_flush = false;
        }
        self.registry
            .finished(std::mem::take(&mut self.counted_replies));
        self.refusals = 0;
        Poll::Ready(Ok(()))
    }
}

fn panicked() -> Outcome {
    Outcome::BadRequest("the handler panicked".into())
}

/// A call running in a task of its own: counted as running on the node (for drain) until
/// its reply reaches the connection, and recorded in its service's figures (as cancelled
/// if the task is aborted).
struct InFlight {
    registry: Arc<Registry>,
    record: CallRecord,
    /// Still counted here: the connection has not taken the count over.
    counted: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.counted {
            self.registry.finished(1);
        }
    }
}

/// Appends the reply frame; a reply that cannot be encoded becomes an error reply.
fn push_reply(output: &mut BytesMut, id: u64, outcome: Outcome) {
    if let Err(error) = protocol::encode_into(&Frame::Reply { id, outcome }, output) {
        let fallback = Frame::Reply {
            id,
            outcome: Outcome::BadRequest(error.to_string()),
        };
        // A short error message always encodes.
        let _ = protocol::encode_into(&fallback, output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;
    use futures_util::StreamExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio_util::codec::FramedRead;

    const WAIT: Duration = Duration::from_secs(10);

    /// Counts handlers started, finished, and dropped before finishing (cancelled).
    #[derive(Default)]
    struct Counts {
        started: AtomicUsize,
        finished: AtomicUsize,
        dropped: AtomicUsize,
    }

    struct DropWatch(Arc<Counts>, bool);

    impl Drop for DropWatch {
        fn drop(&mut self) {
            if !self.1 {
                self.0.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// `t.echo` answers at once; `t.wait` waits for `gate`; `t.panic` panics on first poll.
    fn registry(gate: Arc<Notify>, counts: Arc<Counts>) -> Arc<Registry> {
        let registry = Arc::new(Registry::default());
        registry.add(
            RpcService::new("t")
                .method("echo", |bytes: ByteBuf| async move { Ok(bytes) })
                .method("wait", move |n: u64| {
                    let (gate, counts) = (gate.clone(), counts.clone());
                    async move {
                        counts.started.fetch_add(1, Ordering::SeqCst);
                        let mut watch = DropWatch(counts.clone(), false);
                        gate.notified().await;
                        watch.1 = true;
                        counts.finished.fetch_add(1, Ordering::SeqCst);
                        Ok(n)
                    }
                })
                .method("panic", |(): ()| async move {
                    if true {
                        panic!("on purpose");
                    }
                    Ok(())
                }),
        );
        registry
    }

    struct Client {
        framed: Framed<DuplexStream, FrameCodec>,
    }

    impl Client {
        fn start(registry: Arc<Registry>, capacity: usize) -> Client {
            let (ours, theirs) = tokio::io::duplex(capacity);
            tokio::spawn(serve_connection(wire::framed(theirs), registry));
            Client {
                framed: wire::framed(ours),
            }
        }

        async fn call<T: Serialize>(&mut self, id: u64, method: &str, value: &T, timeout_ms: u32) {
            let payload = protocol::to_payload(value).unwrap();
            let frame = Frame::Call {
                id,
                service: "t",
                method,
                timeout_ms,
                payload: &payload,
                trace: None,
            };
            self.write(&frame).await;
        }

        async fn write(&mut self, frame: &Frame<'_>) {
            let mut bytes = BytesMut::new();
            protocol::encode_into(frame, &mut bytes).unwrap();
            self.framed.get_mut().write_all(&bytes).await.unwrap();
        }

        async fn reply(&mut self) -> (u64, Outcome) {
            let bytes = tokio::time::timeout(WAIT, self.framed.next())
                .await
                .expect("a reply in time")
                .expect("connection open")
                .unwrap();
            match protocol::decode(&bytes).unwrap() {
                Frame::Reply { id, outcome } => (id, outcome),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_sees_services_replaced_and_removed_at_once() {
        let registry = Arc::new(Registry::default());
        let answering = |answer: u64| {
            RpcService::new("t").method("get", move |(): ()| async move { Ok(answer) })
        };
        registry.add(answering(1));
        let mut client = Client::start(registry.clone(), 1 << 16);
        for (id, answer) in [(1, 1u64), (2, 1), (3, 2), (4, 2), (5, 3)] {
            if answer != 1 && id % 2 == 1 {
                registry.add(answering(answer));
            }
            client.call(id, "get", &(), 1000).await;
            let (got, outcome) = client.reply().await;
            assert_eq!(got, id);
            assert_eq!(payload_of::<u64>(outcome), answer, "call {id}");
        }
        assert!(registry.remove("t"));
        client.call(6, "get", &(), 1000).await;
        assert!(matches!(client.reply().await, (6, Outcome::NotFound(_))));
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn payload_of<T: DeserializeOwned>(outcome: Outcome) -> T {
        match outcome {
            Outcome::Ok(bytes) => protocol::from_payload(&bytes).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn inline_answers_spawned_calls_deadlines_and_panics() {
        let (gate, counts) = (Arc::new(Notify::new()), Arc::new(Counts::default()));
        let registry = registry(gate.clone(), counts.clone());
        let mut client = Client::start(registry.clone(), 64 * 1024);
        // Answered inline, in order, while a waiting call runs in a task of its own.
        client.call(1, "wait", &7u64, 5_000).await;
        until("the waiting call started", || {
            counts.started.load(Ordering::SeqCst) == 1
        })
        .await;
        for id in 2..20u64 {
            client
                .call(id, "echo", &ByteBuf::from(vec![id as u8; 64]), 5_000)
                .await;
            let (got, outcome) = client.reply().await;
            assert_eq!(got, id);
            assert_eq!(
                payload_of::<ByteBuf>(outcome).into_vec(),
                vec![id as u8; 64]
            );
        }
        gate.notify_one();
        let (id, outcome) = client.reply().await;
        assert_eq!((id, payload_of::<u64>(outcome)), (1, 7));
        // A deadline already passed: not even started.
        client.call(30, "wait", &1u64, 0).await;
        assert!(matches!(
            client.reply().await,
            (30, Outcome::DeadlineExceeded)
        ));
        // A deadline that passes while the handler waits: dropped on the server, answered.
        client.call(31, "wait", &1u64, 50).await;
        assert!(matches!(
            client.reply().await,
            (31, Outcome::DeadlineExceeded)
        ));
        until("the late call was dropped", || {
            counts.dropped.load(Ordering::SeqCst) == 1
        })
        .await;
        // A handler that panics on its first poll fails its call, not the connection.
        client.call(32, "panic", &(), 5_000).await;
        assert!(matches!(client.reply().await, (32, Outcome::BadRequest(_))));
        client
            .call(33, "echo", &ByteBuf::from(vec![1]), 5_000)
            .await;
        assert_eq!(client.reply().await.0, 33);
        // Garbage closes the connection.
        client
            .framed
            .get_mut()
            .write_all(&[0, 0, 0, 2, 0xff, 0xff])
            .await
            .unwrap();
        let end = tokio::time::timeout(WAIT, client.framed.next())
            .await
            .unwrap();
        assert!(matches!(end, None | Some(Err(_))), "{end:?}");
        until("every call accounted", || registry.in_flight() == 0).await;
        assert_eq!(counts.finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn cancel_drops_a_running_call_and_leaves_inline_answers_alone() {
        let (gate, counts) = (Arc::new(Notify::new()), Arc::new(Counts::default()));
        let registry = registry(gate.clone(), counts.clone());
        let mut client = Client::start(registry.clone(), 64 * 1024);
        client.call(1, "wait", &1u64, 30_000).await;
        until("started", || counts.started.load(Ordering::SeqCst) == 1).await;
        client.write(&Frame::Cancel { id: 1 }).await;
        until("dropped", || counts.dropped.load(Ordering::SeqCst) == 1).await;
        until("released", || registry.in_flight() == 0).await;
        // A cancel for a call answered inline (or unknown) changes nothing.
        client.call(2, "echo", &ByteBuf::from(vec![2]), 5_000).await;
        client.write(&Frame::Cancel { id: 2 }).await;
        client.write(&Frame::Cancel { id: 99 }).await;
        client.call(3, "echo", &ByteBuf::from(vec![3]), 5_000).await;
        // No reply for the cancelled call: the next replies are 2 and 3.
        assert_eq!(client.reply().await.0, 2);
        assert_eq!(client.reply().await.0, 3);
        assert_eq!(counts.finished.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn drain_waits_for_inline_replies_to_leave_and_refuses_new_calls() {
        let (gate, counts) = (Arc::new(Notify::new()), Arc::new(Counts::default()));
        let registry = registry(gate, counts);
        // A pipe too small for the reply: the inline answer cannot be written until the
        // client reads, so the call still counts as running.
        let mut client = Client::start(registry.clone(), 256);
        client
            .call(1, "echo", &ByteBuf::from(vec![5; 4_000]), 5_000)
            .await;
        until("answered", || registry.in_flight() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            registry.in_flight(),
            1,
            "released before its reply was written"
        );
        let draining = tokio::spawn({
            let registry = registry.clone();
            async move { registry.drain(WAIT).await }
        });
        until("draining", || registry.draining.load(Ordering::SeqCst)).await;
        let (id, outcome) = client.reply().await;
        assert_eq!(id, 1);
        assert_eq!(payload_of::<ByteBuf>(outcome).len(), 4_000);
        assert_eq!(draining.await.unwrap(), 0);
        // New calls are refused with a retryable error, inline or not.
        client.call(2, "echo", &ByteBuf::from(vec![1]), 5_000).await;
        client.call(3, "wait", &1u64, 5_000).await;
        assert!(matches!(client.reply().await, (2, Outcome::Unavailable(_))));
        assert!(matches!(client.reply().await, (3, Outcome::Unavailable(_))));
        assert_eq!(registry.in_flight(), 0);
    }

    #[tokio::test]
    async fn refusals_while_draining_count_against_the_bound() {
        let (gate, counts) = (Arc::new(Notify::new()), Arc::new(Counts::default()));
        let registry = registry(gate, counts);
        assert_eq!(registry.drain(Duration::ZERO).await, 0);
        let client = Client::start(registry, 64 * 1024);
        // A client that sends and never reads: the server stops reading once its replies
        // back up, instead of queueing refusals without bound.
        let mut calls = BytesMut::new();
        let total = 20_000u64;
        for id in 0..total {
            let frame = Frame::Call {
                id,
                service: "t",
                method: "echo",
                timeout_ms: 5_000,
                payload: &[0],
                trace: None,
            };
            protocol::encode_into(&frame, &mut calls).unwrap();
        }
        let (mut reader, mut writer) = tokio::io::split(client.framed.into_inner());
        let sending = tokio::spawn(async move { writer.write_all(&calls).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !sending.is_finished(),
            "the server read everything without answering"
        );
        // Reading the replies lets the rest through; every call is refused, retryably.
        let mut replies = FramedRead::new(&mut reader, FrameCodec::new(wire::MAX_FRAME));
        let mut refused = 0;
        while refused < total {
            let bytes = tokio::time::timeout(WAIT, replies.next())
                .await
                .expect("replies keep coming")
                .expect("open")
                .unwrap();
            let Frame::Reply { outcome, .. } = protocol::decode(&bytes).unwrap() else {
                panic!("not a reply");
            };
            assert!(matches!(outcome, Outcome::Unavailable(_)), "{outcome:?}");
            refused += 1;
        }
        sending.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn calls_in_flight_per_connection_are_bounded() {
        let (gate, counts) = (Arc::new(Notify::new()), Arc::new(Counts::default()));
        let registry = registry(gate.clone(), counts.clone());
        let mut client = Client::start(registry.clone(), 1024 * 1024);
        let total = MAX_IN_FLIGHT_PER_CONNECTION as u64 + 100;
        for id in 0..total {
            client.call(id, "wait", &id, 30_000).await;
        }
        until("the bound is reached", || {
            counts.started.load(Ordering::SeqCst) == MAX_IN_FLIGHT_PER_CONNECTION
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            counts.started.load(Ordering::SeqCst),
            MAX_IN_FLIGHT_PER_CONNECTION,
            "the server read past its bound"
        );
        let mut answered = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while (answered.len() as u64) < total {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls left unanswered"
            );
            // Calls read after the first ones finish start waiting later: release again.
            gate.notify_waiters();
            let next = tokio::time::timeout(Duration::from_millis(50), client.framed.next());
            let Ok(bytes) = next.await else { continue };
            let bytes = bytes.expect("connection open").unwrap();
            let Frame::Reply { id, outcome } = protocol::decode(&bytes).unwrap() else {
                panic!("not a reply");
            };
            assert_eq!(payload_of::<u64>(outcome), id);
            assert!(answered.insert(id));
        }
        until("released", || registry.in_flight() == 0).await;
    }
}
