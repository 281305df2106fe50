//! Per-service RPC figures: calls, errors by kind and a latency histogram, on the calling
//! side and on the serving side.
//!
//! The hot path only bumps atomics of a [`ServiceFigures`] found once (when a
//! [`ServiceClient`](super::ServiceClient) is made, or a service registered); readers take
//! [`ServiceSnapshot`]s for `/metrics` or `grapevine info`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the latency buckets, in seconds (a `+Inf` bucket follows).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
    5.0,
];

/// Most services tracked per side; calls to further services count under [`OTHER_SERVICES`]
/// (service names on the calling side come from application code, so their number is
/// not bounded by the catalog).
pub const MAX_TRACKED_SERVICES: usize = 256;

/// The service name under which calls beyond [`MAX_TRACKED_SERVICES`] are counted.
pub const OTHER_SERVICES: &str = "(other)";

/// Why a call failed, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFailure {
    /// No live, passing instance (calling side only).
    NoInstances,
    /// The deadline passed.
    Timeout,
    /// The instance was unreachable, dropped the connection, or is draining.
    Unavailable,
    /// The handler returned an application error.
    Remote,
    /// No such service or method on the server.
    NotFound,
    /// Encoding, decoding, a handler that panicked, or a call the client refused.
    Protocol,
    /// A payload above the frame limit.
    FrameTooLarge,
    /// The caller dropped the call before it finished.
    Cancelled,
}

impl CallFailure {
    const ALL: [CallFailure; 8] = [
        CallFailure::NoInstances,
        CallFailure::Timeout,
        CallFailure::Unavailable,
        CallFailure::Remote,
        CallFailure::NotFound,
        CallFailure::Protocol,
        CallFailure::FrameTooLarge,
        CallFailure::Cancelled,
    ];

    /// The label this failure is counted under.
    pub fn label(self) -> &'static str {
        match self {
            CallFailure::NoInstances => "no_instances",
            CallFailure::Timeout => "timeout",
            CallFailure::Unavailable => "unavailable",
            CallFailure::Remote => "remote",
            CallFailure::NotFound => "not_found",
            CallFailure::Protocol => "protocol",
            CallFailure::FrameTooLarge => "frame_too_large",
            CallFailure::Cancelled => "cancelled",
        }
    }

    /// The failure an error counts as.
    pub fn of(error: &super::RpcError) -> Self {
        use super::RpcError;
        match error {
            RpcError::NoInstances(_) => CallFailure::NoInstances,
            RpcError::Timeout(_) => CallFailure::Timeout,
            RpcError::Unavailable { .. } => CallFailure::Unavailable,
            RpcError::Remote(_) => CallFailure::Remote,
            RpcError::NotFound(_) => CallFailure::NotFound,
            RpcError::Protocol(_) | RpcError::InvalidCall(_) => CallFailure::Protocol,
            RpcError::FrameTooLarge { .. } => CallFailure::FrameTooLarge,
        }
    }
}

/// Upper bounds of the latency buckets in nanoseconds (the same as [`LATENCY_BUCKETS`]):
/// a call is bucketed with integer compares.
const LATENCY_BOUNDS_NANOS: [u64; LATENCY_BUCKETS.len()] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// Shards of one service's figures. Each thread counts in one shard of its own (a cache
/// line apart from the others): calls finishing on different cores at once do not pull
/// one line back and forth. Readers add the shards up.
const SHARDS: usize = 8;

/// The counts of one shard.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    calls: AtomicU64,
    failures: [AtomicU64; CallFailure::ALL.len()],
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    total_nanos: AtomicU64,
}

/// The shard the current thread counts in (threads take shards in turn).
fn this_threads_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

/// Live figures of one service on one side.
#[derive(Debug, Default)]
pub struct ServiceFigures {
    shards: [Shard; SHARDS],
    ejections: AtomicU64,
}

impl ServiceFigures {
    /// Counts one finished call that took `took`, failed with `failure` if any.
    pub fn record(&self, took: Duration, failure: Option<CallFailure>) {
        let shard = &self.shards[this_threads_shard()];
        shard.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(failure) = failure {
            shard.failures[failure as usize].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.total_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Counts one instance ejected by outlier detection (calling side).
    pub fn record_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// The sum over the shards of what `count` reads from each.
    fn total(&self, count: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| count(shard).load(Ordering::Relaxed))
            .fold(0u64, u64::saturating_add)
    }

    fn snapshot(&self, side: CallSide, service: &str) -> ServiceSnapshot {
        let failures = CallFailure::ALL
            .iter()
            .filter_map(|&failure| {
                let count = self.total(|shard| &shard.failures[failure as usize]);
                (count > 0).then_some((failure, count))
            })
            .collect();
        ServiceSnapshot {
            side,
            service: service.to_string(),
            calls: self.total(|shard| &shard.calls),
            failures,
            buckets: (0..=LATENCY_BUCKETS.len())
                .map(|bucket| self.total(|shard| &shard.buckets[bucket]))
                .collect(),
            total_seconds: self.total(|shard| &shard.total_nanos) as f64 / 1e9,
            ejections: self.ejections.load(Ordering::Relaxed),
        }
    }
}

/// Which end of a call the figures are from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallSide {
    /// Calls this node made.
    Client,
    /// Calls this node served.
    Server,
}

impl CallSide {
    /// The label of this side.
    pub fn label(self) -> &'static str {
        match self {
            CallSide::Client => "client",
            CallSide::Server => "server",
        }
    }
}

/// Figures of one service on one side at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    /// Calling or serving side.
    pub side: CallSide,
    /// The service.
    pub service: String,
    /// Calls finished (failed ones included).
    pub calls: u64,
    /// Failed calls by reason (reasons never seen are left out).
    pub failures: BTreeMap<CallFailure, u64>,
    /// Calls per latency bucket (not cumulative), one per bound of [`LATENCY_BUCKETS`] and a
    /// last one above them.
    pub buckets: Vec<u64>,
    /// Sum of all calls' durations.
    pub total_seconds: f64,
    /// Instances ejected by outlier detection (calling side).
    #[serde(default)]
    pub ejections: u64,
}

/// The figures of every service on one side, bounded in number.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    services: Mutex<BTreeMap<String, Arc<ServiceFigures>>>,
}

impl RpcMetrics {
    /// The figures of `service`, made on first use.
    pub fn service(&self, service: &str) -> Arc<ServiceFigures> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        bounded_entry(&mut services, service)
    }

    /// Every service's figures, sorted by service name.
    pub fn snapshot(&self, side: CallSide) -> Vec<ServiceSnapshot> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services
            .iter()
            .map(|(name, figures)| figures.snapshot(side, name))
            .collect()
    }
}

/// The entry of `service` in `services`, made on first use; beyond
/// [`MAX_TRACKED_SERVICES`] services, the shared [`OTHER_SERVICES`] entry.
pub(crate) fn bounded_entry<T: Default>(
    services: &mut BTreeMap<String, Arc<T>>,
    service: &str,
) -> Arc<T> {
    if let Some(entry) = services.get(service) {
        return entry.clone();
    }
    let name = if services.len() < MAX_TRACKED_SERVICES {
        service
    } else {
        OTHER_SERVICES
    };
    services.entry(name.to_string()).or_default().clone()
}

/// Records a call when dropped: as it finished if [`CallRecord::finish`] was called, as
/// cancelled otherwise (the caller dropped the call's future).
pub(crate) struct CallRecord {
    figures: Arc<ServiceFigures>,
    started: tokio::time::Instant,
    failure: Option<Option<CallFailure>>,
}

impl CallRecord {
    pub(crate) fn start(figures: Arc<ServiceFigures>) -> Self {
        Self::started_at(figures, tokio::time::Instant::now())
    }

    /// A record of a call that started at `started` (a clock reading the caller has anyway).
    pub(crate) fn started_at(figures: Arc<ServiceFigures>, started: tokio::time::Instant) -> Self {
        CallRecord {
            figures,
            started,
            failure: None,
        }
    }

    /// When the call started.
    pub(crate) fn started(&self) -> tokio::time::Instant {
        self.started
    }

    /// Notes how the call ended; it is counted when the record is dropped.
    pub(crate) fn finish(&mut self, failure: Option<CallFailure>) {
        self.failure = Some(failure);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let failure = self.failure.unwrap_or(Some(CallFailure::Cancelled));
        self.figures.record(self.started.elapsed(), failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_latency_bucket_and_failures_by_kind() {
        let metrics = RpcMetrics::default();
        let orders = metrics.service("orders");
        orders.record(Duration::from_micros(40), None);
        orders.record(Duration::from_micros(700), Some(CallFailure::Remote));
        orders.record(Duration::from_secs(9), Some(CallFailure::Timeout));
        let snapshot = metrics.snapshot(CallSide::Client);
        assert_eq!(snapshot.len(), 1);
        let orders = &snapshot[0];
        assert_eq!(orders.calls, 3);
        assert_eq!(orders.buckets[0], 1, "40 µs ≤ 50 µs");
        assert_eq!(orders.buckets[4], 1, "700 µs ≤ 1 ms");
        assert_eq!(
            orders.buckets[LATENCY_BUCKETS.len()],
            1,
            "9 s above every bound"
        );
        assert_eq!(orders.buckets.iter().sum::<u64>(), 3);
        assert_eq!(
            orders.failures,
            BTreeMap::from([(CallFailure::Timeout, 1), (CallFailure::Remote, 1)])
        );
        assert!((orders.total_seconds - 9.00074).abs() < 1e-9);
    }

    #[test]
    fn the_nanosecond_bounds_are_the_published_buckets() {
        for (nanos, seconds) in LATENCY_BOUNDS_NANOS.iter().zip(LATENCY_BUCKETS) {
            assert_eq!(*nanos, Duration::from_secs_f64(seconds).as_nanos() as u64);
        }
        let figures = ServiceFigures::default();
        figures.record(Duration::from_micros(50), None);
        figures.record(Duration::from_nanos(50_001), None);
        let snapshot = figures.snapshot(CallSide::Client, "s");
        assert_eq!(&snapshot.buckets[..2], &[1, 1], "a bound is inclusive");
    }

    #[test]
    fn calls_counted_on_many_threads_add_up() {
        let figures = Arc::new(ServiceFigures::default());
        let threads: Vec<_> = (0..2 * SHARDS + 3)
            .map(|t| {
                let figures = figures.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let failure = (t % 2 == 1).then_some(CallFailure::Remote);
                        figures.record(Duration::from_millis(3), failure);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let snapshot = figures.snapshot(CallSide::Server, "s");
        let threads = (2 * SHARDS + 3) as u64;
        assert_eq!(snapshot.calls, threads * 100);
        assert_eq!(snapshot.buckets[6], threads * 100, "3 ms ≤ 5 ms");
        assert_eq!(
            snapshot.failures,
            BTreeMap::from([(CallFailure::Remote, threads / 2 * 100)])
        );
        assert!((snapshot.total_seconds - threads as f64 * 0.3).abs() < 1e-6);
    }

    #[test]
    fn services_beyond_the_limit_share_one_entry() {
        let metrics = RpcMetrics::default();
        for i in 0..MAX_TRACKED_SERVICES + 10 {
            metrics
                .service(&format!("svc-{i:04}"))
                .record(Duration::ZERO, None);
        }
        let snapshot = metrics.snapshot(CallSide::Server);
        assert_eq!(snapshot.len(), MAX_TRACKED_SERVICES + 1);
        let other = snapshot
            .iter()
            .find(|s| s.service == OTHER_SERVICES)
            .unwrap();
        assert_eq!(other.calls, 10);
        // A tracked service keeps its own entry.
        metrics.service("svc-0000").record(Duration::ZERO, None);
        let snapshot = metrics.snapshot(CallSide::Server);
        let first = snapshot.iter().find(|s| s.service == "svc-0000").unwrap();
        assert_eq!(first.calls, 2);
    }

    #[test]
    fn a_dropped_record_counts_as_cancelled_unless_finished() {
        let metrics = RpcMetrics::default();
        let figures = metrics.service("s");
        drop(CallRecord::start(figures.clone()));
        let mut done = CallRecord::start(figures);
        done.finish(None);
        drop(done);
        let snapshot = &metrics.snapshot(CallSide::Client)[0];
        assert_eq!(snapshot.calls, 2);
        assert_eq!(
            snapshot.failures,
            BTreeMap::from([(CallFailure::Cancelled, 1)])
        );
    }
}
