//! The calling side: a pool of multiplexed connections, resolution and load balancing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, Stream};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::metrics::{
    bounded_entry, CallFailure, CallRecord, CallSide, RpcMetrics, ServiceFigures, ServiceSnapshot,
};
use super::outlier::Outliers;
use super::protocol::{self, Frame, ReceivedFrame, ReplyPayload};
use super::trace::TraceContext;
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

/// The write half of a connection, type-erased (plain or sealed streams).
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;

/// What one connection's callers, reader, writer and deadline sweeper share.
struct Shared {
    calls: Mutex<Calls>,
    outbox: Mutex<Outbox>,
    /// Wakes the writer task when frames are queued (or when it must stop).
    wake_writer: Notify,
    closed: AtomicBool,
}

/// Frames on their way to the socket.
struct Outbox {
    /// The write half; taken by the writer task while it writes (so nothing interleaves).
    io: Option<WriteHalf>,
    /// Encoded frames not yet written.
    queued: BytesMut,
    /// Bytes were written that a flush must still push out (sealed streams buffer).
    needs_flush: bool,
    /// The connection is gone: the writer task ends.
    stopped: bool,
}

/// Calls awaiting their reply, in a slab: a call's id carries its slot (low 32 bits) and a
/// sequence number (high 32 bits), so a late reply never reaches a reused slot's new call.
///
/// Deadlines are kept here too, and one sweeper task per connection fails the calls whose
/// deadline passed: a call on an open connection arms no timer of its own (a timer per call
/// was a lock on tokio's timer wheel to register it and another to cancel it).
#[derive(Default)]
struct Calls {
    slots: Vec<CallSlot>,
    free: Vec<u32>,
    sequence: u32,
    /// Why the connection failed, once it has.
    failed: Option<String>,
    /// No waiting call's deadline is earlier (it may be earlier than all of them: calls
    /// that finish leave it; the sweeper recomputes it when it fires).
    earliest: Option<Instant>,
    /// The sweeper, waiting for `earliest` to change.
    sweeper: Option<Waker>,
}

enum CallSlot {
    Free,
    Waiting {
        id: u64,
        deadline: Instant,
        waker: Option<Waker>,
    },
    Done {
        id: u64,
        result: Result<ReplyPayload, RpcError>,
    },
}

impl Calls {
    /// A new waiting call, woken by `waker`; wakes the sweeper if its deadline is the
    /// earliest.
    fn insert(&mut self, deadline: Instant, waker: Waker) -> u64 {
        self.sequence = self.sequence.wrapping_add(1);
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(CallSlot::Free);
                // At most MAX_IN_FLIGHT_PER_CONNECTION slots: callers hold a permit.
                (self.slots.len() - 1) as u32
            }
        };
        let id = (u64::from(self.sequence) << 32) | u64::from(index);
        self.slots[index as usize] = CallSlot::Waiting {
            id,
            deadline,
            waker: Some(waker),
        };
        if self.earliest.is_none_or(|earliest| deadline < earliest) {
            self.earliest = Some(deadline);
            if let Some(sweeper) = self.sweeper.take() {
                sweeper.wake();
            }
        }
        id
    }

    /// Fails the waiting calls whose deadline is past `now` (as timed out); returns their
    /// wakers, and sets `earliest` to the earliest deadline still waiting.
    fn expire(&mut self, now: Instant) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let mut earliest: Option<Instant> = None;
        for slot in &mut self.slots {
            if let CallSlot::Waiting {
                id,
                deadline,
                waker,
            } = slot
            {
                if *deadline <= now {
                    wakers.extend(waker.take());
                    *slot = CallSlot::Done {
                        id: *id,
                        result: Err(RpcError::Timeout(Duration::ZERO)),
                    };
                } else {
                    earliest = Some(earliest.map_or(*deadline, |e| e.min(*deadline)));
                }
            }
        }
        self.earliest = earliest;
        wakers
    }

    fn slot(&mut self, id: u64) -> Option<&mut CallSlot> {
        let slot = self.slots.get_mut((id & u64::from(u32::MAX)) as usize)?;
        match slot {
            CallSlot::Waiting { id: held, .. } | CallSlot::Done { id: held, .. } if *held == id => {
                Some(slot)
            }
            _ => None,
        }
    }

    /// Frees call `id`'s slot and returns what it held.
    fn release(&mut self, id: u64) -> Option<CallSlot> {
        let slot = std::mem::replace(self.slot(id)?, CallSlot::Free);
        self.free.push((id & u64::from(u32::MAX)) as u32);
        Some(slot)
    }

    /// Frees call `id`'s slot; returns whether it was still waiting for its reply.
    fn remove(&mut self, id: u64) -> Option<bool> {
        self.release(id)
            .map(|slot| matches!(slot, CallSlot::Waiting { .. }))
    }

    /// Frees the slot of call `id` if its outcome has arrived, and returns the outcome
    /// (moved out: nothing is made or freed in its place).
    fn take_result(&mut self, id: u64) -> Option<Result<ReplyPayload, RpcError>> {
        if !matches!(self.slot(id)?, CallSlot::Done { .. }) {
            return None;
        }
        match self.release(id)? {
            CallSlot::Done { result, .. } => Some(result),
            _ => None,
        }
    }

    /// Records the outcome of call `id`; returns the waker to wake.
    fn complete(&mut self, id: u64, result: Result<ReplyPayload, RpcError>) -> Option<Waker> {
        let slot = self.slot(id)?;
        let CallSlot::Waiting { waker, .. } = slot else {
            return None;
        };
        let waker = waker.take();
        *slot = CallSlot::Done { id, result };
        waker
    }

    /// Fails every waiting call; returns the wakers to wake.
    fn fail_all(&mut self, reason: &str) -> Vec<Waker> {
        self.failed.get_or_insert_with(|| reason.to_string());
        self.earliest = None;
        let mut wakers = Vec::new();
        for slot in &mut self.slots {
            if let CallSlot::Waiting { id, waker, .. } = slot {
                wakers.extend(waker.take());
                *slot = CallSlot::Done {
                    id: *id,
                    result: Err(RpcError::Unavailable {
                        reason: reason.to_string(),
                        retryable: false,
                    }),
                };
            }
        }
        wakers
    }
}

impl Shared {
    /// Marks the connection failed: every waiting call fails at once, the writer stops.
    fn fail(&self, reason: &str) {
        self.closed.store(true, Ordering::Release);
        let wakers = lock(&self.calls).fail_all(reason);
        for waker in wakers {
            waker.wake();
        }
        lock(&self.outbox).stopped = true;
        self.wake_writer.notify_one();
    }

    /// Queues a frame. `alone`: the only call in flight writes it at once itself, when the
    /// socket takes it without waiting (no hand-off to the writer task on the sequential
    /// path); otherwise the writer task sends everything queued in one write.
    fn send(&self, frame: &Frame<'_>, alone: bool) -> Result<(), RpcError> {
        let mut outbox = lock(&self.outbox);
        if outbox.stopped {
            return Err(closed(true));
        }
        let idle = outbox.queued.is_empty() && !outbox.needs_flush;
        protocol::encode_into(frame, &mut outbox.queued)?;
        let outbox = &mut *outbox;
        let Some(io) = outbox.io.as_mut() else {
            // The writer task is writing; it looks at the queue again when done.
            return Ok(());
        };
        if alone && idle {
            // A waker that does nothing: if the socket is not ready, the writer task takes
            // over with a waker of its own.
            let mut cx = Context::from_waker(Waker::noop());
            while !outbox.queued.is_empty() {
                match io.as_mut().poll_write(&mut cx, &outbox.queued) {
                    Poll::Ready(Ok(written)) if written > 0 => {
                        outbox.queued.advance(written);
                        outbox.needs_flush = true;
                    }
                    // Errors and stalls: the writer task deals with them.
                    _ => break,
                }
            }
            if outbox.queued.is_empty()
                && matches!(io.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(())))
            {
                outbox.needs_flush = false;
                return Ok(());
            }
        }
        self.wake_writer.notify_one();
        Ok(())
    }
}

fn closed(retryable: bool) -> RpcError {
    RpcError::Unavailable {
        reason: "connection closed".into(),
        retryable,
    }
}

/// The bound on one connection's calls in flight. A call that finds room takes and returns
/// its place with one atomic operation each (a semaphore's release takes a lock); callers
/// that wait for room wait on a `Notify`.
#[derive(Default)]
struct InFlightBound {
    /// Places taken, at most `MAX_IN_FLIGHT_PER_CONNECTION`.
    taken: AtomicUsize,
    /// Callers waiting for room: a release wakes one only when there are any.
    waiting: AtomicUsize,
    room: Notify,
}

/// One place under an [`InFlightBound`], given back when dropped.
struct Permit<'a>(&'a InFlightBound);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // SeqCst with the waiter's count and re-check: either the waiter sees this place
        // free, or this sees the waiter.
        self.0.taken.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.room.notify_one();
        }
    }
}

/// Counts a caller waiting for room while it waits (also when its wait is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InFlightBound {
    /// A place, if one is free now.
    fn try_take(&self) -> Option<Permit<'_>> {
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |taken| {
                (taken < MAX_IN_FLIGHT_PER_CONNECTION).then_some(taken + 1)
            })
            .ok()
            .map(|_| Permit(self))
    }

    /// A place, once one is free.
    async fn take(&self) -> Permit<'_> {
        loop {
            if let Some(permit) = self.try_take() {
                return permit;
            }
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&self.waiting);
            if let Some(permit) = self.try_take() {
                return permit;
            }
            notified.await;
        }
    }
}

/// A client's peers by address (a B-tree: a lookup costs a few compares, not a SipHash).
type PeerSlots = Mutex<BTreeMap<SocketAddr, Peer>>;

/// One multiplexed connection to a peer.
struct Connection {
    shared: Arc<Shared>,
    in_flight: InFlightBound,
    reader: AbortHandle,
    sweeper: AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // No caller is left: stop the tasks, which closes the socket.
        self.reader.abort();
        self.sweeper.abort();
        lock(&self.shared.outbox).stopped = true;
        self.shared.wake_writer.notify_one();
    }
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
        let mut framed = wire::dial(stream);
        framed
            .send(preface)
            .await
            .map_err(|error| unavailable(format!("{addr}: {error}")))?;
        let parts = framed.into_parts();
        let (read_half, write_half) = tokio::io::split(parts.io);
        let shared = Arc::new(Shared {
            calls: Mutex::default(),
            outbox: Mutex::new(Outbox {
                io: Some(Box::pin(write_half)),
                queued: BytesMut::new(),
                needs_flush: false,
                stopped: false,
            }),
            wake_writer: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(write_queued(shared.clone(), addr));
        // Reader: routes replies to their callers; on loss fails every waiting call at once.
        let frames = FramedRead::new(read_half, parts.codec);
        let reader = tokio::spawn(read_replies(frames, shared.clone(), addr));
        let sweeper = tokio::spawn(sweep_deadlines(shared.clone()));
        Ok(Connection {
            shared,
            in_flight: InFlightBound::default(),
            reader: reader.abort_handle(),
            sweeper: sweeper.abort_handle(),
        })
    }

    /// A permit for one more call, if the connection has room now.
    fn try_permit(&self) -> Option<Permit<'_>> {
        self.in_flight.try_take()
    }

    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn load(&self) -> usize {
        self.in_flight.taken.load(Ordering::Relaxed)
    }

    /// Runs one call holding `_permit` (one of the connection's in-flight slots); the
    /// connection's sweeper fails it as timed out once `deadline` passes. `remaining`: the
    /// time left until then, sent to the server.
    async fn call(
        &self,
        _permit: Permit<'_>,
        service: &str,
        method: &str,
        payload: &[u8],
        deadline: Instant,
        remaining: Duration,
    ) -> Result<ReplyPayload, RpcError> {
        let alone = self.load() == 1;
        // Dropping this future (caller gave up, or timed out) cancels on the server.
        let cancel = CancelOnDrop {
            shared: &self.shared,
            id: AtomicU64::new(NO_CALL),
        };
        // The `rpc.call` span; its context travels in the header (nothing when untraced).
        // Made only when a subscriber may want it: even a disabled span costs its creation
        // and an enter and exit per poll (it logs through `log` when tracing has no
        // subscriber).
        let span = if tracing::span_enabled!(tracing::Level::DEBUG) {
            super::trace::call_span(service, method)
        } else {
            tracing::Span::none()
        };
        let trace = TraceContext::for_call(&span);
        if let Some(trace) = &trace {
            span.record("trace_id", format_args!("{:032x}", trace.trace_id));
            span.record("span_id", format_args!("{:016x}", trace.span_id));
        }
        let timeout_ms = u32::try_from(remaining.as_millis()).unwrap_or(u32::MAX);
        let reply = poll_fn(|cx| {
            let id = cancel.id.load(Ordering::Relaxed);
            if id != NO_CALL {
                return self.poll_reply(id, cx);
            }
            // First poll: the call takes a slot with its waker already in it (one lock), then
            // its frame goes out.
            let id = {
                let mut calls = lock(&self.shared.calls);
                if calls.failed.is_some() {
                    return Poll::Ready(Err(closed(true)));
                }
                calls.insert(deadline, cx.waker().clone())
            };
            let frame = Frame::Call {
                id,
                service,
                method,
                timeout_ms,
                payload,
                trace,
            };
            if let Err(error) = self.shared.send(&frame, alone) {
                lock(&self.shared.calls).remove(id);
                return Poll::Ready(Err(error));
            }
            cancel.id.store(id, Ordering::Relaxed);
            Poll::Pending
        });
        let result = if span.is_disabled() {
            reply.await
        } else {
            tracing::Instrument::instrument(reply, span).await
        };
        let id = cancel.id.swap(NO_CALL, Ordering::Relaxed);
        if let (true, Err(RpcError::Timeout(_))) = (id != NO_CALL, &result) {
            // The sweeper gave up on it: the server may still be running it (best effort,
            // never waits; the server drops it at the deadline anyway).
            let _ = self.shared.send(&Frame::Cancel { id }, false);
        }
        result
    }

    fn poll_reply(&self, id: u64, cx: &mut Context<'_>) -> Poll<Result<ReplyPayload, RpcError>> {
        let mut calls = lock(&self.shared.calls);
        match calls.slot(id) {
            Some(CallSlot::Waiting { waker, .. }) => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Some(CallSlot::Done { .. }) => {
                Poll::Ready(calls.take_result(id).unwrap_or_else(|| Err(closed(false))))
            }
            Some(CallSlot::Free) | None => Poll::Ready(Err(closed(false))),
        }
    }
}

/// Most replies completed under one lock of the calls: what one read brought in, bounded
/// so that callers are woken before a long burst is decoded.
const REPLIES_PER_LOCK: usize = 64;

/// The reader task of one connection: routes replies to their callers, the replies of one
/// read together (one lock, then the wake-ups); on loss fails every waiting call at once.
async fn read_replies<R: tokio::io::AsyncRead + Unpin>(
    mut frames: FramedRead<R, wire::FrameCodec>,
    shared: Arc<Shared>,
    addr: SocketAddr,
) {
    let mut replies: Vec<(u64, Result<ReplyPayload, RpcError>)> = Vec::new();
    let mut wakers: Vec<Waker> = Vec::new();
    let reason = loop {
        // Decode what the socket has (at least one frame), then stop at the first wait.
        let ended = poll_fn(|cx| loop {
            if replies.len() >= REPLIES_PER_LOCK {
                return Poll::Ready(None);
            }
            let bytes = match Pin::new(&mut frames).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => bytes,
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Some(format!("connection to {addr} failed: {error}")))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(format!("{addr} closed the connection")))
                }
                Poll::Pending if replies.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(None),
            };
            match protocol::decode_received(&bytes) {
                Ok(ReceivedFrame::Reply { id, outcome }) => {
                    let result = outcome
                        .into_result(&bytes)
                        .map(|payload| ReplyPayload::new(bytes, payload));
                    replies.push((id, result));
                }
                Ok(_) => {
                    return Poll::Ready(Some(format!("{addr} sent a frame a server must not send")))
                }
                Err(error) => return Poll::Ready(Some(format!("{addr}: {error}"))),
            }
        })
        .await;
        if !replies.is_empty() {
            let mut calls = lock(&shared.calls);
            for (id, result) in replies.drain(..) {
                wakers.extend(calls.complete(id, result));
            }
        }
        for waker in wakers.drain(..) {
            waker.wake();
        }
        if let Some(reason) = ended {
            break reason;
        }
    };
    shared.fail(&reason);
}

/// The deadline sweeper of one connection: sleeps until the earliest deadline of a waiting
/// call (or until an earlier one arrives), then fails the calls past theirs. Under steady
/// load with one timeout it wakes about once per timeout period.
async fn sweep_deadlines(shared: Arc<Shared>) {
    loop {
        let at = poll_fn(|cx| {
            let mut calls = lock(&shared.calls);
            match calls.earliest {
                Some(at) => Poll::Ready(at),
                None => {
                    calls.sweeper = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(at));
        // Wait for `at`, unless a call with an earlier deadline comes first.
        let expired = poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            let mut calls = lock(&shared.calls);
            if calls.earliest != Some(at) {
                return Poll::Ready(false);
            }
            calls.sweeper = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if expired {
            let wakers = lock(&shared.calls).expire(Instant::now());
            for waker in wakers {
                waker.wake();
            }
        }
    }
}

/// The writer task: sends whatever callers queued, many frames per write under load.
async fn write_queued(shared: Arc<Shared>, addr: SocketAddr) {
    let mut batch = BytesMut::new();
    loop {
        shared.wake_writer.notified().await;
        // Let the other calls in flight queue their frames first, so that one write
        // carries many.
        tokio::task::yield_now().await;
        loop {
            let (mut io, flush) = {
                let mut outbox = lock(&shared.outbox);
                if outbox.stopped {
                    return;
                }
                if outbox.queued.is_empty() && !outbox.needs_flush {
                    break;
                }
                let Some(io) = outbox.io.take() else {
                    return;
                };
                std::mem::swap(&mut batch, &mut outbox.queued);
                (io, std::mem::take(&mut outbox.needs_flush))
            };
            let written = async {
                io.write_all(&batch).await?;
                if flush || !batch.is_empty() {
                    io.flush().await?;
                }
                Ok::<(), std::io::Error>(())
            }
            .await;
            batch.clear();
            if let Err(error) = written {
                shared.fail(&format!("writing to {addr} failed: {error}"));
                return;
            }
            lock(&shared.outbox).io = Some(io);
        }
    }
}

/// The id of no call: a call's slot index stays below `MAX_IN_FLIGHT_PER_CONNECTION`.
const NO_CALL: u64 = u64::MAX;

/// Cancels call `id` (once it has one) if the call's future is dropped before its end.
struct CancelOnDrop<'a> {
    shared: &'a Shared,
    /// The call's id once its frame is sent, [`NO_CALL`] before (an atomic only to be
    /// shared between the future's poll function and its drop; never contended).
    id: AtomicU64,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let id = *self.id.get_mut();
        // Still running on the server: tell it (best effort, never waits).
        if id != NO_CALL && lock(&self.shared.calls).remove(id) == Some(true) {
            let _ = self.shared.send(&Frame::Cancel { id }, false);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per peer: the live connection, and who is dialing (with its backoff after failures).
#[derive(Default)]
struct Peer {
    /// Read on every call: behind the pool's plain mutex, no await.
    connection: Option<Arc<Connection>>,
    dialing: Arc<tokio::sync::Mutex<Backoff>>,
}

/// When to try a failed peer again.
#[derive(Default)]
struct Backoff {
    retry_at: Option<Instant>,
    delay: Duration,
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
    /// Connections and dial state by peer address.
    slots: Arc<PeerSlots>,
    connect: Connect,
    resolver: Arc<dyn Resolve>,
    rng: Arc<Mutex<SmallRng>>,
    round_robin: Arc<AtomicUsize>,
    metrics: Arc<RpcMetrics>,
    /// Per service (bounded as the metrics are): instances that keep failing.
    outliers: Arc<Mutex<BTreeMap<String, Arc<Outliers>>>>,
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
                async move { Connection::open(&transport, addr, preface, CONNECT_TIMEOUT).await },
            )
        });
        RpcClient {
            slots: Arc::default(),
            connect,
            resolver,
            rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))),
            round_robin: Arc::default(),
            metrics: Arc::default(),
            outliers: Arc::default(),
        }
    }

    /// Figures of the calls this client made, per service.
    pub fn metrics(&self) -> Vec<ServiceSnapshot> {
        self.metrics.snapshot(CallSide::Client)
    }

    /// A client for the instances of `service`.
    pub fn service(&self, service: impl Into<String>) -> ServiceClient {
        let service = service.into();
        ServiceClient {
            rpc: self.clone(),
            figures: self.metrics.service(&service),
            outliers: self.outliers_of(&service),
            service,
            policy: LoadBalance::default(),
            idempotent: false,
            timeout: DEFAULT_TIMEOUT,
            hedge: None,
        }
    }

    /// The outlier records of `service`, made on first use.
    fn outliers_of(&self, service: &str) -> Arc<Outliers> {
        bounded_entry(&mut lock(&self.outliers), service)
    }

    /// Instances of `service` this client currently skips after repeated failures.
    pub fn ejected(&self, service: &str) -> usize {
        let outliers = lock(&self.outliers).get(service).cloned();
        outliers.map_or(0, |o| o.ejected(Instant::now()))
    }

    /// The live connection to `addr`, if there is one.
    fn open_connection(&self, addr: SocketAddr) -> Option<Arc<Connection>> {
        // The connection used last on this thread is remembered (a caller mostly calls one
        // peer): no lock of the shared map on the common path. A connection is replaced
        // only once closed, so an open remembered one is the map's.
        type Remembered = Option<(Weak<PeerSlots>, SocketAddr, Weak<Connection>)>;
        thread_local! {
            static LAST: std::cell::RefCell<Remembered> = const { std::cell::RefCell::new(None) };
        }
        let remembered = LAST.with(|last| {
            let last = last.borrow();
            let (slots, at, connection) = last.as_ref()?;
            // The weak reference keeps the map's allocation, so another client's map can
            // never take its address while it is remembered.
            let ours = std::ptr::eq(slots.as_ptr(), Arc::as_ptr(&self.slots)) && *at == addr;
            ours.then(|| connection.upgrade()).flatten()
        });
        if let Some(connection) = remembered.filter(|connection| !connection.is_closed()) {
            return Some(connection);
        }
        let connection = lock(&self.slots)
            .get(&addr)
            .and_then(|peer| peer.connection.clone())
            .filter(|connection| !connection.is_closed())?;
        LAST.with(|last| {
            *last.borrow_mut() = Some((
                Arc::downgrade(&self.slots),
                addr,
                Arc::downgrade(&connection),
            ));
        });
        Some(connection)
    }

    /// The live connection to `addr`, or a new one (one dial at a time per peer).
    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>, RpcError> {
        let dialing = {
            let mut slots = lock(&self.slots);
            let peer = slots.entry(addr).or_default();
            match &peer.connection {
                Some(connection) if !connection.is_closed() => return Ok(connection.clone()),
                _ => peer.dialing.clone(),
            }
        };
        let mut backoff = dialing.lock().await;
        // Someone else may have connected while this call waited its turn.
        if let Some(connection) = self.open_connection(addr) {
            return Ok(connection);
        }
        if let Some(retry_at) = backoff.retry_at {
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
                lock(&self.slots).entry(addr).or_default().connection = Some(connection.clone());
                *backoff = Backoff::default();
                Ok(connection)
            }
            Err(error) => {
                backoff.delay = (backoff.delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                backoff.retry_at = Some(Instant::now() + backoff.delay);
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
        let mut record = CallRecord::start(self.figures_of(service));
        let started = record.started();
        let result = async {
            let payload = protocol::to_payload(request)?;
            let bytes = self
                .call_raw(addr, service, method, &payload, started, timeout)
                .await?;
            protocol::from_payload(bytes.bytes())
        }
        .await;
        record.finish(result.as_ref().err().map(CallFailure::of));
        result
    }

    /// The figures of direct calls to `service`. The service called last on this thread is
    /// remembered (direct calls mostly go to one service): no lock on the common path.
    fn figures_of(&self, service: &str) -> Arc<ServiceFigures> {
        type Remembered = Option<(Weak<RpcMetrics>, String, Arc<ServiceFigures>)>;
        thread_local! {
            static LAST: std::cell::RefCell<Remembered> = const { std::cell::RefCell::new(None) };
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            // The weak reference keeps these metrics' allocation, so another client's metrics
            // can never take its address while it is remembered.
            if let Some((metrics, name, figures)) = last.as_ref() {
                if std::ptr::eq(metrics.as_ptr(), Arc::as_ptr(&self.metrics)) && name == service {
                    return figures.clone();
                }
            }
            let figures = self.metrics.service(service);
            *last = Some((
                Arc::downgrade(&self.metrics),
                service.to_string(),
                figures.clone(),
            ));
            figures
        })
    }

    /// One call on the connection to `addr`, which started at `started` (a clock reading
    /// the caller has already made) and must end within `timeout` of it.
    async fn call_raw(
        &self,
        addr: SocketAddr,
        service: &str,
        method: &str,
        payload: &[u8],
        started: Instant,
        timeout: Duration,
    ) -> Result<ReplyPayload, RpcError> {
        let deadline = started + timeout;
        // The common case, an open connection with room: nothing here waits but the reply,
        // which the connection's sweeper bounds.
        if let Some(connection) = self.open_connection(addr) {
            if let Some(permit) = connection.try_permit() {
                return match connection
                    .call(permit, service, method, payload, deadline, timeout)
                    .await
                {
                    Err(RpcError::Timeout(_)) => Err(RpcError::Timeout(timeout)),
                    result => result,
                };
            }
        }
        // Otherwise one deadline (one timer) covers connecting and waiting for room too: an
        // unreachable peer may never answer.
        let call = async {
            let connection = self.connection(addr).await?;
            // Back-pressure: wait for a slot rather than queue without bound.
            let permit = match connection.try_permit() {
                Some(permit) => permit,
                None => connection.in_flight.take().await,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            connection
                .call(permit, service, method, payload, deadline, remaining)
                .await
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Err(RpcError::Timeout(_))) | Err(_) => Err(RpcError::Timeout(timeout)),
            Ok(result) => result,
        }
    }

    fn load_of(&self, addr: SocketAddr) -> usize {
        lock(&self.slots)
            .get(&addr)
            .and_then(|peer| peer.connection.as_ref().map(|c| c.load()))
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
    figures: Arc<ServiceFigures>,
    outliers: Arc<Outliers>,
    policy: LoadBalance,
    idempotent: bool,
    timeout: Duration,
    hedge: Option<Duration>,
}

/// Longest wait for a new connection: shorter than a call's default deadline, so that a
/// call to an unreachable instance (a host gone, its packets dropped) fails as unavailable,
/// and moves to another instance, before the deadline passes. Two seconds leave room for one
/// lost SYN (retransmitted after 1 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

    /// Hedges calls: when a call has no answer after `after`, the same call goes to another
    /// instance too; the first answer wins and the other call is cancelled on its server.
    /// Only for idempotent calls (see [`ServiceClient::idempotent`]): a hedged call on a
    /// client not marked idempotent fails with [`RpcError::InvalidCall`].
    pub fn hedge(mut self, after: Duration) -> Self {
        self.hedge = Some(after);
        self
    }

    /// Calls `method` with `request` on an instance of the service.
    pub async fn call<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let mut record = CallRecord::start(self.figures.clone());
        let started = record.started();
        let result = async {
            let payload = protocol::to_payload(request)?;
            let bytes = self.call_balanced(method, &payload, started).await?;
            protocol::from_payload(bytes.bytes())
        }
        .await;
        record.finish(result.as_ref().err().map(CallFailure::of));
        result
    }

    /// Calls `method` with an already encoded (bincode) request and returns the encoded
    /// response: the dynamic layer under typed calls and the `tower::Service` impl.
    pub async fn call_encoded(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, RpcError> {
        let mut record = CallRecord::start(self.figures.clone());
        let started = record.started();
        let result = self
            .call_balanced(method, payload, started)
            .await
            .map(|reply| reply.bytes().to_vec());
        record.finish(result.as_ref().err().map(CallFailure::of));
        result
    }

    /// The name of the service this client calls.
    pub fn service_name(&self) -> &str {
        &self.service
    }

    /// Resolve, pick, retry on connection failures, hedge; no bookkeeping.
    async fn call_balanced(
        &self,
        method: &str,
        payload: &[u8],
        started: Instant,
    ) -> Result<ReplyPayload, RpcError> {
        let deadline = started + self.timeout;
        // Instances this call went to, so that retries and the hedge go elsewhere.
        let tried = Mutex::new(BTreeSet::new());
        let Some(after) = self.hedge else {
            return self
                .call_attempts(method, payload, started, deadline, &tried)
                .await;
        };
        if !self.idempotent {
            return Err(RpcError::InvalidCall(format!(
                "a hedged call to {} must be marked idempotent (it may run twice)",
                self.service
            )));
        }
        let first = self.call_attempts(method, payload, started, deadline, &tried);
        let mut first = std::pin::pin!(first);
        tokio::select! {
            biased;
            result = &mut first => return result,
            () = tokio::time::sleep(after) => {}
        }
        let second = self.call_attempts(method, payload, Instant::now(), deadline, &tried);
        let mut second = std::pin::pin!(second);
        // The first answer wins; returning drops the other call, which cancels it on its
        // server. A failure that another instance may not share waits for the other call.
        let (result, other) = tokio::select! {
            biased;
            result = &mut first => (result, second),
            result = &mut second => (result, first),
        };
        match result {
            Err(error) if error.is_retryable() || matches!(error, RpcError::NoInstances(_)) => {
                match other.await {
                    // The hedge found no other instance: the first call's error stands.
                    Err(RpcError::NoInstances(_)) => Err(error),
                    other => other,
                }
            }
            result => result,
        }
    }

    /// One call, on up to [`MAX_ATTEMPTS`] instances after connection failures.
    async fn call_attempts(
        &self,
        method: &str,
        payload: &[u8],
        started: Instant,
        deadline: Instant,
        tried: &Mutex<BTreeSet<SocketAddr>>,
    ) -> Result<ReplyPayload, RpcError> {
        let mut last_error = None;
        let mut attempts = 0;
        loop {
            // The first attempt starts when the call did; a retry reads the clock again.
            let now = if attempts == 0 {
                started
            } else {
                Instant::now()
            };
            let instances = self.rpc.resolver.resolve(&self.service);
            let candidates: Vec<Endpoint> = {
                let tried = lock(tried);
                instances
                    .iter()
                    .filter(|e| !tried.contains(&e.addr))
                    .cloned()
                    .collect()
            };
            let candidates = self.outliers.usable(candidates, now);
            let Some(addr) = self.rpc.pick(&candidates, self.policy) else {
                return Err(
                    last_error.unwrap_or_else(|| RpcError::NoInstances(self.service.clone()))
                );
            };
            lock(tried).insert(addr);
            attempts += 1;
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(RpcError::Timeout(self.timeout));
            }
            let result = self
                .rpc
                .call_raw(addr, &self.service, method, payload, now, remaining)
                .await;
            match &result {
                Err(RpcError::Unavailable { .. }) => {
                    if let Some(length) = self.outliers.failed(addr, &instances, Instant::now()) {
                        tracing::warn!(service = %self.service, %addr, ?length, "ejecting an instance whose calls keep failing");
                        self.figures.record_ejection();
                    }
                }
                Err(_) => {}
                Ok(_) => self.outliers.succeeded(addr),
            }
            match result {
                Ok(bytes) => return Ok(bytes),
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
                        && attempts < MAX_ATTEMPTS =>
                {
                    tracing::debug!(%addr, %error, "retrying on another instance");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::rpc::outlier::{BASE_EJECTION, EJECT_AFTER_FAILURES};
    use crate::rpc::{Registry, RpcService};
    use futures_util::StreamExt;
    use serde_bytes::ByteBuf;

    struct Nowhere;

    impl Resolve for Nowhere {
        fn resolve(&self, _: &str) -> Vec<Endpoint> {
            Vec::new()
        }
    }

    /// A server on loopback: `t.echo` answers at once, `t.later` after yielding (so it runs
    /// in a task of its own).
    pub(crate) async fn server() -> SocketAddr {
        let registry = Arc::new(Registry::default());
        registry.add(
            RpcService::new("t")
                .method("echo", |bytes: ByteBuf| async move { Ok(bytes) })
                .method("later", |bytes: ByteBuf| async move {
                    tokio::task::yield_now().await;
                    Ok(bytes)
                }),
        );
        serve_registry(registry).await
    }

    /// A server on loopback for the services of `registry`.
    pub(crate) async fn serve_registry(registry: Arc<Registry>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let mut framed = wire::framed(stream);
                    // The hello, then the preface.
                    let hello = framed.next().await;
                    if !matches!(&hello, Some(Ok(frame)) if wire::check_hello(frame).is_ok()) {
                        return;
                    }
                    if let Some(Ok(_)) = framed.next().await {
                        let _ = crate::rpc::serve_connection(framed, registry).await;
                    }
                });
            }
        });
        addr
    }

    fn client() -> RpcClient {
        RpcClient::new(
            crate::net::TokioTransport,
            crate::node::rpc_preface(),
            Arc::new(Nowhere),
            1,
        )
    }

    fn payload(tag: u64, len: usize) -> ByteBuf {
        let mut bytes: Vec<u8> = (0..len).map(|i| (i as u64 ^ tag) as u8).collect();
        bytes[..8.min(len)].copy_from_slice(&tag.to_be_bytes()[..8.min(len)]);
        ByteBuf::from(bytes)
    }

    async fn echo(rpc: &RpcClient, addr: SocketAddr, method: &str, request: &ByteBuf) {
        let reply: ByteBuf = rpc
            .call_addr(addr, "t", method, request, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(reply == *request, "a reply for another call");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_client_keeps_to_its_own_connection_and_a_closed_one_is_not_reused() {
        let addr = server().await;
        let (a, b) = (client(), client());
        let request = payload(1, 64);
        echo(&a, addr, "echo", &request).await;
        echo(&b, addr, "echo", &request).await;
        // Both called from this thread, b last: a still finds its own connection.
        let a_connection = a.open_connection(addr).expect("a's connection");
        let b_connection = b.open_connection(addr).expect("b's connection");
        assert!(!Arc::ptr_eq(&a_connection, &b_connection));
        assert!(Arc::ptr_eq(
            &a_connection,
            &a.open_connection(addr).unwrap()
        ));
        // A closed connection is not used: the next call dials again.
        a_connection.shared.fail("closed by the test");
        assert!(a.open_connection(addr).is_none());
        echo(&a, addr, "echo", &request).await;
        let redialed = a.open_connection(addr).expect("a's new connection");
        assert!(!Arc::ptr_eq(&a_connection, &redialed));
        // A client made after another is dropped never finds the dropped one's connection.
        drop((a, redialed));
        let c = client();
        assert!(c.open_connection(addr).is_none());
        echo(&c, addr, "echo", &request).await;
    }

    #[tokio::test]
    async fn a_full_connection_makes_callers_wait_until_a_call_ends() {
        let bound = InFlightBound::default();
        let mut permits: Vec<_> = (0..MAX_IN_FLIGHT_PER_CONNECTION)
            .map(|_| bound.try_take().expect("room"))
            .collect();
        assert!(bound.try_take().is_none(), "full");
        // A waiter that gives up leaves no trace.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), bound.take()).await;
        assert!(gave_up.is_err());
        assert_eq!(bound.waiting.load(Ordering::SeqCst), 0);
        // A waiting caller gets the place the first finished call gives back.
        let waiter = async { bound.take().await };
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(permits.pop());
        };
        let (permit, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(waiter, release)
        })
        .await
        .expect("the waiter got a place");
        assert_eq!(
            bound.taken.load(Ordering::SeqCst),
            MAX_IN_FLIGHT_PER_CONNECTION
        );
        drop(permit);
        drop(permits);
        assert_eq!(bound.taken.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lone_writes_interleave_with_queued_writes() {
        let addr = server().await;
        let rpc = client();
        // A lone caller (it writes its own frames, large ones in part only) alongside
        // bursts of concurrent callers (queued for the writer task), on one connection.
        let lone = tokio::spawn({
            let rpc = rpc.clone();
            async move {
                for i in 0..400u64 {
                    let len = if i % 50 == 7 {
                        3 << 20
                    } else {
                        64 + i as usize
                    };
                    let method = if i % 3 == 0 { "later" } else { "echo" };
                    echo(&rpc, addr, method, &payload(i, len)).await;
                }
            }
        });
        for round in 0..20u64 {
            let burst = (0..64u64).map(|k| {
                let rpc = rpc.clone();
                async move {
                    let tag = 1_000_000 + round * 1_000 + k;
                    let method = if k % 2 == 0 { "later" } else { "echo" };
                    echo(&rpc, addr, method, &payload(tag, 16 + k as usize * 97)).await;
                }
            });
            futures_util::future::join_all(burst).await;
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(Duration::from_secs(60), lone)
            .await
            .expect("the lone caller finished")
            .unwrap();
        // One connection carried everything, and it is still usable alone.
        assert_eq!(lock(&rpc.slots).len(), 1);
        echo(&rpc, addr, "echo", &payload(9, 64)).await;
    }

    /// Loopback sockets, except that connecting to `unreachable` never completes (a host
    /// whose packets are dropped).
    #[derive(Clone)]
    struct Blackhole {
        unreachable: SocketAddr,
    }

    impl Transport for Blackhole {
        type Udp = tokio::net::UdpSocket;
        type Stream = tokio::net::TcpStream;
        type Listener = tokio::net::TcpListener;

        async fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<Self::Udp> {
            crate::net::TokioTransport.bind_udp(addr).await
        }

        async fn bind_tcp(&self, addr: SocketAddr) -> std::io::Result<Self::Listener> {
            crate::net::TokioTransport.bind_tcp(addr).await
        }

        async fn connect(&self, addr: SocketAddr) -> std::io::Result<Self::Stream> {
            if addr == self.unreachable {
                std::future::pending::<()>().await;
            }
            crate::net::TokioTransport.connect(addr).await
        }
    }

    pub(crate) struct Fixed(pub(crate) Vec<SocketAddr>);

    impl Resolve for Fixed {
        fn resolve(&self, _: &str) -> Vec<Endpoint> {
            self.0
                .iter()
                .map(|&addr| Endpoint { addr, local: false })
                .collect()
        }
    }

    #[tokio::test]
    async fn an_unreachable_instance_fails_as_unavailable_and_the_call_moves_on() {
        let healthy = server().await;
        let unreachable: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let rpc = RpcClient::new(
            Blackhole { unreachable },
            crate::node::rpc_preface(),
            Arc::new(Fixed(vec![unreachable, healthy])),
            1,
        );
        // A deadline the old connect timeout (the default call deadline) would exceed.
        let deadline = CONNECT_TIMEOUT * 2;
        assert!(deadline < DEFAULT_TIMEOUT);
        // Directly: unavailable (retryable) once the connect timeout passes, before the
        // call's own deadline.
        let direct = rpc
            .call_addr::<_, ByteBuf>(unreachable, "t", "echo", &payload(1, 8), deadline)
            .await;
        assert!(
            matches!(
                direct,
                Err(RpcError::Unavailable {
                    retryable: true,
                    ..
                })
            ),
            "{direct:?}"
        );
        // Through resolution, round robin trying the unreachable instance first (a new
        // client: the first one holds a backoff for that address): the call lands on the
        // healthy one within its deadline.
        let rpc = RpcClient::new(
            Blackhole { unreachable },
            crate::node::rpc_preface(),
            Arc::new(Fixed(vec![unreachable, healthy])),
            1,
        );
        let reply: ByteBuf = rpc
            .service("t")
            .policy(LoadBalance::RoundRobin)
            .timeout(deadline)
            .call("echo", &payload(2, 8))
            .await
            .expect("moved to the healthy instance");
        assert_eq!(reply, payload(2, 8));
    }

    /// In-memory connections (no sockets, so paused time can run): `refusing` refuses every
    /// connection, any other address is served by its registry in `servers`.
    #[derive(Clone)]
    struct Memory {
        servers: Arc<BTreeMap<SocketAddr, Arc<Registry>>>,
        refusing: SocketAddr,
        dials: Arc<Mutex<BTreeMap<SocketAddr, usize>>>,
    }

    struct NoListener;

    impl crate::net::Listener for NoListener {
        type Stream = tokio::io::DuplexStream;

        async fn accept(&self) -> std::io::Result<(Self::Stream, SocketAddr)> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        fn local_addr(&self) -> std::io::Result<SocketAddr> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }

    impl Transport for Memory {
        type Udp = tokio::net::UdpSocket;
        type Stream = tokio::io::DuplexStream;
        type Listener = NoListener;

        async fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<Self::Udp> {
            crate::net::TokioTransport.bind_udp(addr).await
        }

        async fn bind_tcp(&self, _: SocketAddr) -> std::io::Result<Self::Listener> {
            Err(std::io::ErrorKind::Unsupported.into())
        }

        async fn connect(&self, addr: SocketAddr) -> std::io::Result<Self::Stream> {
            *lock(&self.dials).entry(addr).or_default() += 1;
            let registry = self.servers.get(&addr).filter(|_| addr != self.refusing);
            let Some(registry) = registry.cloned() else {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            };
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let mut framed = wire::framed(theirs);
                let hello = framed.next().await;
                if !matches!(&hello, Some(Ok(frame)) if wire::check_hello(frame).is_ok()) {
                    return;
                }
                if let Some(Ok(_)) = framed.next().await {
                    let _ = crate::rpc::serve_connection(framed, registry).await;
                }
            });
            Ok(ours)
        }
    }

    fn memory_client(
        servers: BTreeMap<SocketAddr, Arc<Registry>>,
        refusing: SocketAddr,
    ) -> (RpcClient, Memory) {
        let addrs = servers.keys().copied().collect();
        let memory = Memory {
            servers: Arc::new(servers),
            refusing,
            dials: Arc::default(),
        };
        let rpc = RpcClient::new(
            memory.clone(),
            crate::node::rpc_preface(),
            Arc::new(Fixed(addrs)),
            7,
        );
        (rpc, memory)
    }

    fn echo_registry() -> Arc<Registry> {
        let registry = Arc::new(Registry::default());
        registry
            .add(RpcService::new("t").method("echo", |bytes: ByteBuf| async move { Ok(bytes) }));
        registry
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_failing_every_call_is_ejected_then_retried_after_its_back_off() {
        let bad: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let good: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let (rpc, memory) = memory_client(
            BTreeMap::from([(bad, echo_registry()), (good, echo_registry())]),
            bad,
        );
        // Round robin sends every other call to the bad instance; a refused connection is
        // retried on the good one, so callers see no failure, but the bad one fails each
        // time it is dialed.
        let service = rpc.service("t").policy(LoadBalance::RoundRobin);
        for i in 0..100u64 {
            let reply: ByteBuf = service.call("echo", &payload(i, 8)).await.unwrap();
            assert_eq!(reply, payload(i, 8));
            if rpc.ejected("t") == 1 {
                break;
            }
            // Past the dial back-off, so every call to the bad instance dials it.
            tokio::time::sleep(MAX_BACKOFF).await;
        }
        assert_eq!(rpc.ejected("t"), 1, "ejected");
        let dials = lock(&memory.dials)[&bad];
        assert_eq!(dials, EJECT_AFTER_FAILURES as usize);
        let snapshot = &rpc.metrics()[0];
        assert_eq!(snapshot.ejections, 1);
        // Ejected: every call goes to the good instance, and the bad one is not dialed.
        for i in 0..20u64 {
            tokio::time::sleep(MAX_BACKOFF / 20).await;
            let reply: ByteBuf = service.call("echo", &payload(i, 8)).await.unwrap();
            assert_eq!(reply, payload(i, 8));
        }
        assert_eq!(lock(&memory.dials)[&bad], dials, "skipped while ejected");
        // After its back-off it is tried again: one more failure ejects it for twice as
        // long.
        tokio::time::sleep(BASE_EJECTION).await;
        assert_eq!(rpc.ejected("t"), 0);
        for i in 0..2u64 {
            let reply: ByteBuf = service.call("echo", &payload(i, 8)).await.unwrap();
            assert_eq!(reply, payload(i, 8));
        }
        assert_eq!(lock(&memory.dials)[&bad], dials + 1, "tried again, once");
        assert_eq!(rpc.ejected("t"), 1);
        assert_eq!(rpc.metrics()[0].ejections, 2);
        tokio::time::sleep(BASE_EJECTION).await;
        assert_eq!(
            rpc.ejected("t"),
            1,
            "the second ejection lasts twice as long"
        );
        tokio::time::sleep(BASE_EJECTION).await;
        assert_eq!(rpc.ejected("t"), 0);
    }

    /// Counts a handler's future dropped before it finished (its call was cancelled).
    struct CountDrop(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.notify_one();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedged_call_takes_the_first_answer_and_cancels_the_other_on_its_server() {
        let slow: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let fast: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let cancelled = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(tokio::sync::Notify::new());
        let stuck = Arc::new(Registry::default());
        stuck.add(RpcService::new("t").method("get", {
            let (cancelled, dropped) = (cancelled.clone(), dropped.clone());
            move |x: u64| {
                let guard = CountDrop(cancelled.clone(), dropped.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok(x)
                }
            }
        }));
        let answering = Arc::new(Registry::default());
        answering.add(RpcService::new("t").method("get", |x: u64| async move { Ok(x + 1) }));
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (rpc, _) = memory_client(BTreeMap::from([(slow, stuck), (fast, answering)]), nowhere);
        let hedge = Duration::from_millis(50);
        let timeout = Duration::from_secs(60);
        // Not idempotent: refused before anything is sent.
        let refused = rpc
            .service("t")
            .hedge(hedge)
            .call::<_, u64>("get", &7u64)
            .await;
        assert!(
            matches!(refused, Err(RpcError::InvalidCall(_))),
            "{refused:?}"
        );
        // Round robin sends the first call to the stuck instance; after 50 ms the hedge goes
        // to the other one, whose answer wins.
        let service = rpc
            .service("t")
            .policy(LoadBalance::RoundRobin)
            .idempotent(true)
            .timeout(timeout)
            .hedge(hedge);
        let started = Instant::now();
        let reply: u64 = service.call("get", &7u64).await.unwrap();
        assert_eq!(reply, 8, "the answering instance's reply");
        assert_eq!(
            started.elapsed(),
            hedge,
            "sent after the hedge delay, answered at once"
        );
        // The stuck call is cancelled on its server, long before its deadline.
        tokio::time::timeout(timeout / 2, dropped.notified())
            .await
            .expect("the losing call was cancelled on its server");
        assert_eq!(cancelled.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() < timeout / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedged_call_with_no_other_instance_waits_for_its_first_answer() {
        let only: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let registry = Arc::new(Registry::default());
        registry.add(RpcService::new("t").method("get", |x: u64| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(x * 2)
        }));
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (rpc, memory) = memory_client(BTreeMap::from([(only, registry)]), nowhere);
        let service = rpc
            .service("t")
            .idempotent(true)
            .hedge(Duration::from_millis(50));
        let started = Instant::now();
        let reply: u64 = service.call("get", &21u64).await.unwrap();
        assert_eq!(reply, 42);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(
            lock(&memory.dials)[&only],
            1,
            "no second call to the same instance"
        );
    }

    #[tokio::test]
    async fn a_late_reply_never_reaches_the_call_reusing_its_slot() {
        let mut calls = Calls::default();
        let far = Instant::now() + Duration::from_secs(60);
        let first = calls.insert(far, Waker::noop().clone());
        assert_eq!(calls.remove(first), Some(true));
        let second = calls.insert(far, Waker::noop().clone());
        assert_eq!(
            first & 0xffff_ffff,
            second & 0xffff_ffff,
            "the slot is reused"
        );
        assert!(calls
            .complete(first, Ok(ReplyPayload::from_bytes(&[1])))
            .is_none());
        assert!(matches!(calls.slot(second), Some(CallSlot::Waiting { .. })));
        calls.complete(second, Ok(ReplyPayload::from_bytes(&[2])));
        assert!(matches!(
            calls.slot(second),
            Some(CallSlot::Done { result: Ok(bytes), .. }) if bytes.bytes() == [2]
        ));
        // A failed connection fails every waiting call, and refuses new ones.
        let third = calls.insert(far, Waker::noop().clone());
        calls.fail_all("gone");
        assert!(matches!(
            calls.slot(third),
            Some(CallSlot::Done {
                result: Err(RpcError::Unavailable { .. }),
                ..
            })
        ));
        assert!(calls.failed.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_fails_only_the_calls_past_their_deadline() {
        let now = Instant::now();
        let mut calls = Calls::default();
        let late = calls.insert(now + Duration::from_secs(5), Waker::noop().clone());
        assert_eq!(calls.earliest, Some(now + Duration::from_secs(5)));
        let soon = calls.insert(now + Duration::from_millis(300), Waker::noop().clone());
        assert_eq!(calls.earliest, Some(now + Duration::from_millis(300)));
        let answered = calls.insert(now + Duration::from_millis(100), Waker::noop().clone());
        calls.complete(answered, Ok(ReplyPayload::from_bytes(&[1])));
        // Nothing is due yet; the earliest still waiting is recomputed.
        assert!(calls.expire(now + Duration::from_millis(200)).is_empty());
        assert_eq!(calls.earliest, Some(now + Duration::from_millis(300)));
        calls.expire(now + Duration::from_millis(300));
        assert!(matches!(
            calls.slot(soon),
            Some(CallSlot::Done {
                result: Err(RpcError::Timeout(_)),
                ..
            })
        ));
        assert!(matches!(calls.slot(late), Some(CallSlot::Waiting { .. })));
        assert!(matches!(
            calls.slot(answered),
            Some(CallSlot::Done { result: Ok(_), .. })
        ));
        assert_eq!(calls.earliest, Some(now + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_on_an_open_connection_times_out_at_its_deadline() {
        let only: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let registry = Arc::new(Registry::default());
        registry.add(RpcService::new("t").method("stuck", |x: u64| async move {
            std::future::pending::<()>().await;
            Ok(x)
        }));
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (rpc, _) = memory_client(BTreeMap::from([(only, registry)]), nowhere);
        // The first call opens the connection; the later ones take the path without a timer
        // of their own, the shorter deadline after the longer one.
        for timeout in [
            Duration::from_secs(2),
            Duration::from_secs(5),
            Duration::from_millis(300),
        ] {
            let started = Instant::now();
            let error = rpc
                .call_addr::<_, u64>(only, "t", "stuck", &1u64, timeout)
                .await
                .unwrap_err();
            assert_eq!(error, RpcError::Timeout(timeout));
            assert_eq!(started.elapsed(), timeout);
        }
    }
}
