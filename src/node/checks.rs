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
        /// Where to connect; the instance's own address and port when `None`.
        target: Option<SocketAddr>,
    },
    Http(HttpCheck),
    Ttl(Duration),
    Custom {
        interval: Duration,
        check: CheckFn,
    },
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CheckKind::Tcp {
                interval,
                timeout,
                target,
            } => f
                .debug_struct("Tcp")
                .field("interval", interval)
                .field("timeout", timeout)
                .field("target", target)
                .finish(),
            CheckKind::Http(http) => http.fmt(f),
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
            kind: CheckKind::Tcp {
                interval,
                timeout,
                target: None,
            },
        }
    }

    /// Passing while a TCP connection to `target` succeeds within `timeout` (capped at
    /// `interval`); checked every `interval`. Consul's `TCP` check.
    pub fn tcp_to(target: SocketAddr, interval: Duration, timeout: Duration) -> Self {
        Check {
            kind: CheckKind::Tcp {
                interval,
                timeout: timeout.min(interval),
                target: Some(target),
            },
        }
    }

    /// Consul's `HTTP` check: a `GET` of `check.url` every `check.interval`; a 2xx answer
    /// is passing, 429 (Too Many Requests) is warning, any other answer, a refused
    /// connection or no answer within `check.timeout` is critical.
    pub fn http(check: HttpCheck) -> Self {
        Check {
            kind: CheckKind::Http(check),
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
            CheckKind::Tcp {
                interval,
                timeout,
                target,
            } => Some(StoredCheck::Tcp {
                interval_ms: ms(interval),
                timeout_ms: ms(timeout),
                target: *target,
            }),
            CheckKind::Http(http) => Some(StoredCheck::Http {
                url: http.url.clone(),
                headers: http.headers.clone(),
                interval_ms: ms(&http.interval),
                timeout_ms: ms(&http.timeout),
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
                target,
            } => Check {
                kind: CheckKind::Tcp {
                    interval: ms(*interval_ms),
                    timeout: ms(*timeout_ms),
                    target: *target,
                },
            },
            StoredCheck::Http {
                url,
                headers,
                interval_ms,
                timeout_ms,
            } => Check::http(HttpCheck {
                url: url.clone(),
                headers: headers.clone(),
                interval: ms(*interval_ms),
                timeout: ms(*timeout_ms),
            }),
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
            CheckKind::Tcp {
                timeout,
                target: to,
                ..
            } => match tokio::time::timeout(*timeout, connector(to.unwrap_or(target))).await {
                Ok(Ok(())) => Health::Passing,
                _ => Health::Critical,
            },
            CheckKind::Http(http) => http.run_once().await,
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
        status: Health,
        target: SocketAddr,
        connector: Connector,
        commands: mpsc::Sender<Command>,
        ttl_deadline: Option<watch::Receiver<Instant>>,
    ) {
        let reporter = Reporter::Direct { id, commands };
        self.run_with(reporter, status, target, connector, ttl_deadline)
            .await
    }

    async fn run_with(
        self,
        reporter: Reporter,
        mut status: Health,
        target: SocketAddr,
        connector: Connector,
        ttl_deadline: Option<watch::Receiver<Instant>>,
    ) {
        if let (CheckKind::Ttl(_), Some(mut deadline)) = (&self.kind, ttl_deadline) {
            loop {
                let at = *deadline.borrow_and_update();
                tokio::select! {
                    biased;
                    changed = deadline.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep_until(at) => {
                        if !reporter.send(Health::Critical).await {
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
            CheckKind::Http(http) => http.interval,
            CheckKind::Ttl(_) => return,
        };
        loop {
            tokio::time::sleep(interval).await;
            let health = self.run_once(target, &connector).await;
            if health != status {
                status = health;
                if !reporter.send(health).await {
                    return;
                }
            }
        }
    }
}

/// Where a check task sends its verdicts: straight to the driver (one check), or into its
/// service's [`CheckSet`] (several).
enum Reporter {
    Direct {
        id: String,
        commands: mpsc::Sender<Command>,
    },
    InSet(Arc<CheckSet>, usize),
}

impl Reporter {
    /// `false` once the node has stopped.
    async fn send(&self, health: Health) -> bool {
        match self {
            Reporter::Direct { id, commands } => commands
                .send(Command::SetHealth {
                    id: id.clone(),
                    health,
                })
                .await
                .is_ok(),
            Reporter::InSet(set, n) => set.set(*n, health).await,
        }
    }
}

/// The checks of a service that has several: each one's status, and the service's health,
/// which is the worst of them (as Consul's aggregate).
#[derive(Debug)]
pub(crate) struct CheckSet {
    id: String,
    commands: mpsc::Sender<Command>,
    statuses: std::sync::Mutex<Vec<Health>>,
    /// The health last sent to the driver; held across the send, so that sends keep order.
    sent: tokio::sync::Mutex<Health>,
    /// Per check: its TTL and the deadline its task waits on (TTL checks only).
    ttls: Vec<Option<(Duration, watch::Sender<Instant>)>>,
}

/// The worst of some check statuses (passing when there are none): a service's health.
pub fn worst(statuses: &[Health]) -> Health {
    statuses.iter().copied().max().unwrap_or(Health::Passing)
}

impl CheckSet {
    async fn set(&self, n: usize, health: Health) -> bool {
        let mut sent = self.sent.lock().await;
        let now = {
            let mut statuses = self
                .statuses
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(status) = statuses.get_mut(n) {
                *status = health;
            }
            worst(&statuses)
        };
        if now == *sent {
            return true;
        }
        *sent = now;
        self.commands
            .send(Command::SetHealth {
                id: self.id.clone(),
                health: now,
            })
            .await
            .is_ok()
    }
}

/// Builds the check set of a service registered with `checks` whose first statuses are
/// `statuses`, and the task that runs them all.
pub(crate) fn check_set(
    id: String,
    commands: mpsc::Sender<Command>,
    checks: Vec<Check>,
    statuses: Vec<Health>,
    target: SocketAddr,
    connector: Connector,
) -> (Arc<CheckSet>, impl Future<Output = ()> + Send) {
    let mut ttls = Vec::new();
    let mut deadlines = Vec::new();
    for check in &checks {
        match check.ttl_period() {
            Some(ttl) => {
                let (tx, rx) = watch::channel(Instant::now() + ttl);
                ttls.push(Some((ttl, tx)));
                deadlines.push(Some(rx));
            }
            None => {
                ttls.push(None);
                deadlines.push(None);
            }
        }
    }
    let set = Arc::new(CheckSet {
        id,
        commands,
        sent: tokio::sync::Mutex::new(worst(&statuses)),
        statuses: std::sync::Mutex::new(statuses.clone()),
        ttls,
    });
    let runs: Vec<_> = checks
        .into_iter()
        .zip(deadlines)
        .zip(statuses)
        .enumerate()
        .map(|(n, ((check, deadline), status))| {
            let reporter = Reporter::InSet(set.clone(), n);
            check.run_with(reporter, status, target, connector.clone(), deadline)
        })
        .collect();
    let task = async move {
        futures_util::future::join_all(runs).await;
    };
    (set, task)
}

/// The definition of an HTTP check (plain data): what to `GET`, how often, how long to
/// wait. Only `http://` URLs; the request carries `headers` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpCheck {
    /// `http://host[:port]/path?query`.
    pub url: String,
    /// Extra request headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Period between requests.
    pub interval: Duration,
    /// Longest wait for the connection and the status line.
    pub timeout: Duration,
}

/// Longest status line and headers read from a checked service.
const HTTP_CHECK_MAX_HEAD: usize = 8 * 1024;

impl HttpCheck {
    /// Splits an `http://` URL into `host:port` and the request target; `None` if it is not
    /// one (https and others are refused at registration).
    pub fn parse_url(url: &str) -> Option<(String, String)> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return None;
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if path.contains(char::is_whitespace) {
            return None;
        }
        let host_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Some((host_port, path))
    }

    async fn run_once(&self) -> Health {
        match tokio::time::timeout(self.timeout, self.status()).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Health::Passing,
            Ok(Ok(429)) => Health::Warning,
            _ => Health::Critical,
        }
    }

    /// The status code of one `GET`.
    async fn status(&self) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad answer");
        let (host_port, path) = Self::parse_url(&self.url)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad URL"))?;
        let mut stream = tokio::net::TcpStream::connect(host_port.as_str()).await?;
        let host = host_port.strip_suffix(":80").unwrap_or(&host_port);
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: grapevine health check\r\n\
             Accept: text/plain, text/*, */*\r\nConnection: close\r\n"
        );
        for (name, value) in &self.headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") {
            if head.len() > HTTP_CHECK_MAX_HEAD {
                return Err(invalid());
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(invalid());
            }
            head.extend_from_slice(&buf[..n]);
        }
        // `HTTP/1.1 200 OK`
        let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = std::str::from_utf8(line).map_err(|_| invalid())?;
        let mut parts = line.split(' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/") {
            return Err(invalid());
        }
        parts
            .next()
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(invalid)
    }
}

/// A registered service instance of this node: report its health, or deregister it.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    pub(crate) id: String,
    pub(crate) commands: mpsc::Sender<Command>,
    /// For TTL checks: the TTL and the deadline the check task waits on.
    pub(crate) ttl: Option<(Duration, Arc<watch::Sender<Instant>>)>,
    /// The checks of a service registered with several ([`crate::Node::register_with_checks`]).
    pub(crate) set: Option<Arc<CheckSet>>,
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

    /// The status of each check, in registration order, for a service registered with
    /// [`crate::Node::register_with_checks`]; empty otherwise.
    pub fn check_statuses(&self) -> Vec<Health> {
        match &self.set {
            Some(set) => set
                .statuses
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            None => Vec::new(),
        }
    }

    /// Whether check `n` (registration order) of a service registered with
    /// [`crate::Node::register_with_checks`] is a TTL check.
    pub fn is_ttl_check(&self, n: usize) -> bool {
        self.set
            .as_ref()
            .is_some_and(|set| matches!(set.ttls.get(n), Some(Some(_))))
    }

    /// Reports check `n` (registration order) of a service registered with
    /// [`crate::Node::register_with_checks`]; a TTL check is alive for another TTL. The
    /// service's health becomes the worst of its checks.
    pub async fn report_check(&self, n: usize, health: Health) -> Result<()> {
        let Some(set) = &self.set else {
            return self.report(health).await;
        };
        if n >= set.ttls.len() {
            return Err(Error::Config(format!(
                "service {:?} has {} checks; there is no check {n}",
                self.id,
                set.ttls.len()
            )));
        }
        if let Some(Some((ttl, deadline))) = set.ttls.get(n) {
            deadline.send_replace(Instant::now() + *ttl);
        }
        if set.set(n, health).await {
            Ok(())
        } else {
            Err(Error::Stopped)
        }
    }

    async fn report(&self, health: Health) -> Result<()> {
        if let Some(set) = &self.set {
            // Several checks: the report goes to every TTL check.
            let ttl_checks: Vec<usize> = (0..set.ttls.len())
                .filter(|n| set.ttls[*n].is_some())
                .collect();
            if !ttl_checks.is_empty() {
                for n in ttl_checks {
                    Box::pin(self.report_check(n, health)).await?;
                }
                return Ok(());
            }
        }
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
