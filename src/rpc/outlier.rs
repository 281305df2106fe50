//! Outlier ejection (Envoy's consecutive-failure detection, gRPC's outlier detection): an
//! instance whose calls keep failing as unavailable is skipped for a back-off, even while the
//! catalog still lists it passing. Sans-IO: every decision takes the current instant.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::client::Endpoint;

/// Consecutive unavailable failures (refused or lost connections, draining or overloaded
/// servers) that eject an instance.
pub const EJECT_AFTER_FAILURES: u32 = 5;
/// How long a first ejection lasts; each further ejection without a success in between
/// doubles it, up to [`MAX_EJECTION`].
pub const BASE_EJECTION: Duration = Duration::from_secs(10);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Most instances tracked per service (failing instances only; a success forgets one).
const MAX_TRACKED_INSTANCES: usize = 4096;

/// The health of one instance, as this client saw it.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// Failing instances of one service.
#[derive(Debug, Default)]
pub(crate) struct Outliers {
    /// Entries in `instances`: read without the lock, so that a service with no failing
    /// instance pays one atomic load per call.
    tracked: AtomicUsize,
    instances: Mutex<HashMap<SocketAddr, Health>>,
}

impl Outliers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Health>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `candidates` without the ejected instances, unless that leaves none (then all of
    /// them: a call to a failing instance beats no call).
    pub(crate) fn usable(&self, candidates: Vec<Endpoint>, now: Instant) -> Vec<Endpoint> {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return candidates;
        }
        let instances = self.lock();
        let ejected = |e: &Endpoint| instances.get(&e.addr).is_some_and(|h| h.ejected(now));
        if candidates.iter().all(ejected) {
            return candidates;
        }
        candidates.into_iter().filter(|e| !ejected(e)).collect()
    }

    /// A call to `addr` succeeded: its record (and its ejection history) is forgotten.
    pub(crate) fn succeeded(&self, addr: SocketAddr) {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut instances = self.lock();
        instances.remove(&addr);
        self.tracked.store(instances.len(), Ordering::Release);
    }

    /// A call to `addr` failed as unavailable; `instances` are all the service's instances.
    /// Returns the ejection's length when this failure ejected it. The last instance not
    /// ejected is never ejected.
    pub(crate) fn failed(
        &self,
        addr: SocketAddr,
        instances: &[Endpoint],
        now: Instant,
    ) -> Option<Duration> {
        let mut tracked = self.lock();
        if tracked.len() >= MAX_TRACKED_INSTANCES && !tracked.contains_key(&addr) {
            return None;
        }
        let health = tracked.entry(addr).or_default();
        if health.ejected(now) {
            // Called anyway (every instance is ejected): already counted.
            return None;
        }
        health.consecutive_failures += 1;
        let ejection = if health.consecutive_failures >= EJECT_AFTER_FAILURES {
            let ejections = health.ejections;
            let others_usable = instances
                .iter()
                .any(|e| e.addr != addr && !tracked.get(&e.addr).is_some_and(|h| h.ejected(now)));
            others_usable.then(|| {
                let length = BASE_EJECTION
                    .saturating_mul(1 << ejections.min(16))
                    .min(MAX_EJECTION);
                let health = tracked.get_mut(&addr).expect("inserted above");
                health.ejections += 1;
                health.ejected_until = Some(now + length);
                // On probation once back: its next failure ejects it again, for longer.
                health.consecutive_failures = EJECT_AFTER_FAILURES - 1;
                length
            })
        } else {
            None
        };
        self.tracked.store(tracked.len(), Ordering::Release);
        ejection
    }

    /// Instances ejected at `now`.
    pub(crate) fn ejected(&self, now: Instant) -> usize {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.lock().values().filter(|h| h.ejected(now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(ports: &[u16]) -> Vec<Endpoint> {
        ports
            .iter()
            .map(|&port| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                local: false,
            })
            .collect()
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_back_off_never_the_last_instance() {
        let outliers = Outliers::default();
        let all = endpoints(&[1, 2]);
        let (bad, good) = (all[0].addr, all[1].addr);
        let start = Instant::now();
        for _ in 1..EJECT_AFTER_FAILURES {
            assert_eq!(outliers.failed(bad, &all, start), None);
        }
        // A success in between resets the count.
        outliers.succeeded(bad);
        for _ in 1..EJECT_AFTER_FAILURES {
            assert_eq!(outliers.failed(bad, &all, start), None);
        }
        assert_eq!(outliers.failed(bad, &all, start), Some(BASE_EJECTION));
        assert_eq!(outliers.usable(all.clone(), start), endpoints(&[2]));
        assert_eq!(outliers.ejected(start), 1);
        // The other one, failing too, is never ejected while it is the last one left.
        for _ in 0..EJECT_AFTER_FAILURES * 2 {
            assert_eq!(outliers.failed(good, &all, start), None);
        }
        // Back after its back-off; one more failure ejects it for twice as long.
        let back = start + BASE_EJECTION;
        assert_eq!(outliers.usable(all.clone(), back), all);
        assert_eq!(outliers.failed(bad, &all, back), Some(BASE_EJECTION * 2));
        // Capped.
        let mut now = back;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            now += MAX_EJECTION;
            if let Some(length) = outliers.failed(bad, &all, now) {
                last = length;
            }
        }
        assert_eq!(last, MAX_EJECTION);
    }
}
