//! Health checks run by the node that owns a service; their verdicts are gossiped like any
//! other change of its records.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::driver::Command;
use crate::error::{Error, Result};
use crate::state::catalog::Health;
use crate::store::StoredCheck;

type CheckFuture = Pin<Box<dyn Future<Output = Health> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;
/// Opens (and drops) a TCP connection through the node's transport.
pub(crate) type Connector = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> + Send + Sync,
>;

/// How the owning node decides whether a service instance is healthy.
#[derive(Clone)]
pub struct Check {
    kind: CheckKind,
}

#[derive(Clone)]
enum CheckKind {
    Tcp {
        interval: Duration,
        timeout: Duration,
    },
    Ttl(Duration),
    Custom {
        interval: Duration,
        check: CheckFn,
    },
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CheckKind::Tcp { interval, timeout } => f
                .debug_struct("Tcp")
                .field("interval", interval)
                .field("timeout", timeout)
                .finish(),
            CheckKind::Ttl(ttl) => f.debug_tuple("Ttl").field(ttl).finish(),
            CheckKind::Custom { interval, .. } => f
                .debug_struct("Custom")
                .field("interval", interval)
                .finish(),
        }
    }
}

impl Check {
    /// Passing while a TCP connection to the instance's address and port succeeds; checked
    /// every `interval`, each attempt bounded by the smaller of `interval` and 2 s.
    pub fn tcp(interval: Duration) -> Self {
        let timeout = interval.min(Duration::from_secs(2));
        Check {
            kind: CheckKind::Tcp { interval, timeout },
        }
    }

    /// Passing while the service reports in: it must call [`ServiceHandle::pass`] at least
    /// once per `ttl`, or it turns critical. Starts critical, as in Consul.
    pub fn ttl(ttl: Duration) -> Self {
        Check {
            kind: CheckKind::Ttl(ttl),
        }
    }

    /// Runs `check` every `interval`; a run that takes longer than `interval` counts as
    /// critical.
    pub fn custom<F, Fut>(interval: Duration, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Health> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()));
        Check {
            kind: CheckKind::Custom { interval, check },
        }
    }

    /// The check as plain data for the data dir; `None` for a custom check (a closure
    /// cannot be saved).
    pub(crate) fn to_stored(&self) -> Option<StoredCheck> {
        let ms = |d: &Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
        match &self.kind {
            CheckKind::Tcp { interval, timeout } => Some(StoredCheck::Tcp {
                interval_ms: ms(interval),
                timeout_ms: ms(timeout),
            }),
            CheckKind::Ttl(ttl) => Some(StoredCheck::Ttl { ttl_ms: ms(ttl) }),
            CheckKind::Custom { .. } => None,
        }
    }

    /// The check saved as `stored`.
    pub(crate) fn from_stored(stored: &StoredCheck) -> Self {
        // A zero interval would spin: a damaged record gets the smallest sane one.
        let ms = |ms: u64| Duration::from_millis(ms.max(10));
        match stored {
            StoredCheck::Tcp {
                interval_ms,
                timeout_ms,
            } => Check {
                kind: CheckKind::Tcp {
                    interval: ms(*interval_ms),
                    timeout: ms(*timeout_ms),
                },
            },
            StoredCheck::Ttl { ttl_ms } => Check::ttl(ms(*ttl_ms)),
        }
    }

    /// The status to register with, found by running the check once (TTL: critical).
    pub(crate) async fn first_status(&self, target: SocketAddr, connector: &Connector) -> Health {
        match &self.kind {
            CheckKind::Ttl(_) => Health::Critical,
            _ => self.run_once(target, connector).await,
        }
    }

    async fn run_once(&self, target: SocketAddr, connector: &Connector) -> Health {
        match &self.kind {
            CheckKind::Tcp { timeout, .. } => {
                match tokio::time::timeout(*timeout, connector(target)).await {
                    Ok(Ok(())) => Health::Passing,
                    _ => Health::Critical,
                }
            }
            CheckKind::Custom { interval, check } => tokio::time::timeout(*interval, check())
                .await
                .unwrap_or(Health::Critical),
            CheckKind::Ttl(_) => Health::Critical,
        }
    }

    /// The TTL, for TTL checks.
    pub(crate) fn ttl_period(&self) -> Option<Duration> {
        match self.kind {
            CheckKind::Ttl(ttl) => Some(ttl),
            _ => None,
        }
    }

    /// Runs the check until the task is aborted, telling the driver about status changes.
    pub(crate) async fn run(
        self,
        id: String,
        mut status: Health,
        target: SocketAddr,
        connector: Connector,
        commands: mpsc::Sender<Command>,
        ttl_deadline: Option<watch::Receiver<Instant>>,
    ) {
        if let (CheckKind::Ttl(_), Some(mut deadline)) = (&self.kind, ttl_deadline) {
            loop {
                let at = *deadline.borrow_and_update();
                tokio::select! {
                    biased;
                    changed = deadline.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep_until(at) => {
                        let health = Health::Critical;
                        if commands.send(Command::SetHealth { id: id.clone(), health }).await.is_err() {
                            return;
                        }
                        // Wait for the service to report in again.
                        if deadline.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let interval = match &self.kind {
            CheckKind::Tcp { interval, .. } | CheckKind::Custom { interval, .. } => *interval,
            CheckKind::Ttl(_) => return,
        };
        loop {
            tokio::time::sleep(interval).await;
            let health = self.run_once(target, &connector).await;
            if health != status {
                status = health;
                let command = Command::SetHealth {
                    id: id.clone(),
                    health,
                };
                if commands.send(command).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A registered service instance of this node: report its health, or deregister it.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    pub(crate) id: String,
    pub(crate) commands: mpsc::Sender<Command>,
    /// For TTL checks: the TTL and the deadline the check task waits on.
    pub(crate) ttl: Option<(Duration, Arc<watch::Sender<Instant>>)>,
}

impl ServiceHandle {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reports the instance passing (and, for a TTL check, alive for another TTL).
    pub async fn pass(&self) -> Result<()> {
        self.report(Health::Passing).await
    }

    /// Reports the instance degraded but serving.
    pub async fn warn(&self) -> Result<()> {
        self.report(Health::Warning).await
    }

    /// Reports the instance failing.
    pub async fn fail(&self) -> Result<()> {
        self.report(Health::Critical).await
    }

    async fn report(&self, health: Health) -> Result<()> {
        if let Some((ttl, deadline)) = &self.ttl {
            deadline.send_replace(Instant::now() + *ttl);
        }
        self.commands
            .send(Command::SetHealth {
                id: self.id.clone(),
                health,
            })
            .await
            .map_err(|_| Error::Stopped)
    }
}

/// Waits for the driver's answer to a command.
pub(crate) async fn ask<R>(
    commands: &mpsc::Sender<Command>,
    command: impl FnOnce(oneshot::Sender<R>) -> Command,
) -> Result<R> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(command(reply))
        .await
        .map_err(|_| Error::Stopped)?;
    answer.await.map_err(|_| Error::Stopped)
}
