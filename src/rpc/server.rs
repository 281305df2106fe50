//! The serving side: registered services, and the loop of one RPC connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::protocol::{self, Frame, Outcome};
use super::{AppError, MAX_IN_FLIGHT_PER_CONNECTION};

type HandlerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Handler = Arc<dyn Fn(Vec<u8>) -> HandlerFuture + Send + Sync>;

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
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |payload: Vec<u8>| {
            let handler = handler.clone();
            Box::pin(async move {
                let request: Req = match protocol::from_payload(&payload) {
                    Ok(request) => request,
                    Err(error) => return Outcome::BadRequest(error.to_string()),
                };
                match handler(request).await {
                    Ok(response) => match protocol::to_payload(&response) {
                        Ok(bytes) => Outcome::Ok(ByteBuf::from(bytes)),
                        Err(error) => Outcome::BadRequest(error.to_string()),
                    },
                    Err(error) => Outcome::App(error),
                }
            })
        });
        self.methods.insert(name.into(), erased);
        self
    }
}

/// The services a node serves, and its drain state.
#[derive(Default)]
pub struct Registry {
    services: RwLock<HashMap<String, Arc<RpcService>>>,
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
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services.insert(service.name.clone(), Arc::new(service));
    }

    /// Removes a service; `false` if it was not served.
    pub fn remove(&self, name: &str) -> bool {
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services.remove(name).is_some()
    }

    /// Names of the services served.
    pub fn names(&self) -> Vec<String> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = services.keys().cloned().collect();
        names.sort();
        names
    }

    fn handler(&self, service: &str, method: &str) -> Result<Handler, String> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let found = services
            .get(service)
            .ok_or_else(|| format!("no service {service:?} here"))?;
        found
            .methods
            .get(method)
            .cloned()
            .ok_or_else(|| format!("service {service:?} has no method {method:?}"))
    }

    /// Calls currently running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Refuses new calls (with a retryable error) and waits, at most `limit`, for the
    /// running ones to finish. Returns how many were still running at the end.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
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

    fn finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Serves one RPC connection until the client closes it or sends garbage.
pub(crate) async fn serve_connection<S>(
    framed: Framed<S, LengthDelimitedCodec>,
    registry: Arc<Registry>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = framed.split();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let writer_permits = permits.clone();
    let (replies, mut outgoing) = mpsc::channel::<Reply>(MAX_IN_FLIGHT_PER_CONNECTION);
    // Writes replies, flushing only when no more are queued (batches under load). A call
    // counts as running until its reply is flushed, so a drain waits for the reply too.
    let writer = tokio::spawn(async move {
        let mut written: Vec<Option<CallGuard>> = Vec::new();
        while let Some((frame, guard)) = outgoing.recv().await {
            written.push(guard);
            if sink.feed(frame).await.is_err() {
                return;
            }
            // With other calls running, let them queue their replies first so that one
            // write carries many (a lone call's reply goes at once).
            if MAX_IN_FLIGHT_PER_CONNECTION - writer_permits.available_permits() > 1 {
                tokio::task::yield_now().await;
            }
            while let Ok((frame, guard)) = outgoing.try_recv() {
                written.push(guard);
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
            written.clear();
        }
    });
    let running: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
    // However this function ends (client gone, garbage, or the node stopping and dropping
    // it), the writer and the calls end with it, and the socket closes at once.
    let _tasks = ConnectionTasks {
        writer: writer.abort_handle(),
        running: running.clone(),
    };
    let result = loop {
        let frame = match stream.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => break Err(error.to_string()),
            None => break Ok(()),
        };
        let frame = match protocol::decode(&frame) {
            Ok(frame) => frame,
            Err(error) => break Err(error.to_string()),
        };
        match frame {
            Frame::Call {
                id,
                service,
                method,
                timeout_ms,
                payload,
            } => {
                let received = tokio::time::Instant::now();
                let deadline = received + Duration::from_millis(u64::from(timeout_ms));
                if registry.draining.load(Ordering::Acquire) {
                    let outcome = Outcome::Unavailable("node is leaving".into());
                    if send_reply(&replies, id, outcome, None).await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                // Back-pressure: stop reading while too many calls run.
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break Ok(());
                };
                let handler = registry.handler(&service, &method);
                registry.in_flight.fetch_add(1, Ordering::AcqRel);
                let guard = CallGuard {
                    registry: registry.clone(),
                    running: running.clone(),
                    id,
                    _permit: permit,
                };
                let replies = replies.clone();
                // Holding the map while spawning orders our insert before the task's removal.
                let mut running_now = lock(&running);
                let task = tokio::spawn(async move {
                    let guard = guard;
                    let outcome = match handler {
                        Err(what) => Outcome::NotFound(what),
                        // Work whose caller has already given up is not started.
                        Ok(_) if tokio::time::Instant::now() >= deadline => {
                            Outcome::DeadlineExceeded
                        }
                        Ok(handler) => {
                            match tokio::time::timeout_at(deadline, handler(payload.into_vec()))
                                .await
                            {
                                Ok(outcome) => outcome,
                                Err(_) => Outcome::DeadlineExceeded,
                            }
                        }
                    };
                    let _ = send_reply(&replies, id, outcome, Some(guard)).await;
                });
                running_now.insert(id, task.abort_handle());
                drop(running_now);
            }
            Frame::Cancel { id } => {
                if let Some(task) = lock(&running).remove(&id) {
                    task.abort();
                }
            }
            Frame::Reply { .. } => break Err("a client sent a reply".into()),
        }
    };
    // Let the writer send what is queued before the guard stops everything.
    drop(replies);
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    }
    result
}

struct ConnectionTasks {
    writer: AbortHandle,
    running: Arc<Mutex<HashMap<u64, AbortHandle>>>,
}

impl Drop for ConnectionTasks {
    fn drop(&mut self) {
        // The client is gone: its calls have no one to answer to.
        let running: Vec<_> = lock(&self.running).drain().map(|(_, task)| task).collect();
        for task in running {
            task.abort();
        }
        self.writer.abort();
    }
}

/// Accounts for a running call, whether it completes or is aborted (cancelled).
struct CallGuard {
    registry: Arc<Registry>,
    running: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    id: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
        self.registry.finished();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An encoded reply, with the accounting of its call (released once flushed).
type Reply = (bytes::Bytes, Option<CallGuard>);

async fn send_reply(
    replies: &mpsc::Sender<Reply>,
    id: u64,
    outcome: Outcome,
    guard: Option<CallGuard>,
) -> Result<(), ()> {
    let frame = match protocol::encode(&Frame::Reply { id, outcome }) {
        Ok(frame) => frame,
        Err(error) => {
            let fallback = Frame::Reply {
                id,
                outcome: Outcome::BadRequest(error.to_string()),
            };
            protocol::encode(&fallback).map_err(|_| ())?
        }
    };
    replies.send((frame, guard)).await.map_err(|_| ())
}
