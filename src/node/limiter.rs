//! A rate limit on the TCP exchanges a node starts outside its schedule.
//!
//! The periodic rounds (anti-entropy every sync interval, push-pull every push-pull
//! interval, join attempts) keep their ticks and are never limited. Everything else — a fetch
//! of a hinted change, the first contact, the follow-ups of a join, a member back from down —
//! is an event-driven start, and an event that repeats without a real change (the storm of
//! issue 18: an exchange after every datagram) must not turn into a flood of exchanges.
//! Whatever the cause, a node starts at most one unscheduled exchange of a kind per peer per
//! `per_peer_gap`, and a token bucket bounds them all together.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Peers whose last start is remembered; older entries go first beyond that.
const MAX_TRACKED_PEERS: usize = 1024;

/// Why a start was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// An unscheduled exchange with the same peer started less than the gap ago.
    PeerTooSoon,
    /// The node's budget of unscheduled exchanges is spent for now.
    NodeBudget,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::PeerTooSoon => "the same peer was asked less than the minimum gap ago",
            Refusal::NodeBudget => "this node's budget of unscheduled exchanges is spent",
        })
    }
}

/// Minimum gap per peer plus a token bucket per node.
#[derive(Debug)]
pub(crate) struct ExchangeLimiter {
    per_peer_gap: Duration,
    capacity: f64,
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    last: BTreeMap<SocketAddr, Instant>,
}

impl ExchangeLimiter {
    /// At most one start per peer per `per_peer_gap`; at most `burst` at once and
    /// `per_second` on average for the node.
    pub(crate) fn new(per_peer_gap: Duration, burst: u32, per_second: f64, now: Instant) -> Self {
        ExchangeLimiter {
            per_peer_gap,
            capacity: f64::from(burst.max(1)),
            per_second,
            tokens: f64::from(burst.max(1)),
            refilled: now,
            last: BTreeMap::new(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.refilled = now;
    }

    /// Whether an unscheduled exchange with `peer` may start now, without taking it.
    pub(crate) fn check(&mut self, peer: SocketAddr, now: Instant) -> Result<(), Refusal> {
        self.refill(now);
        if self
            .last
            .get(&peer)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.per_peer_gap)
        {
            return Err(Refusal::PeerTooSoon);
        }
        if self.tokens < 1.0 {
            return Err(Refusal::NodeBudget);
        }
        Ok(())
    }

    /// Takes a start with `peer` if allowed.
    pub(crate) fn try_start(&mut self, peer: SocketAddr, now: Instant) -> Result<(), Refusal> {
        self.check(peer, now)?;
        self.tokens -= 1.0;
        if self.last.len() >= MAX_TRACKED_PEERS && !self.last.contains_key(&peer) {
            let gap = self.per_peer_gap;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < gap);
            if self.last.len() >= MAX_TRACKED_PEERS {
                // Every tracked start is recent: forget the oldest.
                if let Some(oldest) = self.last.iter().min_by_key(|(_, at)| **at).map(|(p, _)| *p) {
                    self.last.remove(&oldest);
                }
            }
        }
        self.last.insert(peer, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_peer_waits_for_the_gap() {
        let t0 = Instant::now();
        let mut l = ExchangeLimiter::new(Duration::from_secs(1), 10, 10.0, t0);
        assert_eq!(l.try_start(peer(1), t0), Ok(()));
        assert_eq!(l.try_start(peer(1), t0), Err(Refusal::PeerTooSoon));
        let later = t0 + Duration::from_millis(999);
        assert_eq!(l.try_start(peer(1), later), Err(Refusal::PeerTooSoon));
        assert_eq!(l.try_start(peer(2), later), Ok(()), "other peers are free");
        assert_eq!(l.try_start(peer(1), t0 + Duration::from_secs(1)), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_budget_bounds_a_flood_to_its_rate() {
        let t0 = Instant::now();
        let mut l = ExchangeLimiter::new(Duration::from_secs(1), 4, 2.0, t0);
        // A trigger after every datagram for 10 s, 1,000 datagrams a second, 50 peers.
        let mut started = 0;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if l.try_start(peer(1 + (ms % 50) as u16), now).is_ok() {
                started += 1;
            }
        }
        // The burst, then 2 a second.
        assert!((20..=25).contains(&started), "{started} started");
    }

    #[tokio::test(start_paused = true)]
    async fn check_takes_nothing() {
        let t0 = Instant::now();
        let mut l = ExchangeLimiter::new(Duration::from_secs(1), 1, 1.0, t0);
        for _ in 0..10 {
            assert_eq!(l.check(peer(1), t0), Ok(()));
        }
        assert_eq!(l.try_start(peer(1), t0), Ok(()));
        assert_eq!(l.check(peer(2), t0), Err(Refusal::NodeBudget));
    }

    #[tokio::test(start_paused = true)]
    async fn tracked_peers_are_bounded() {
        let t0 = Instant::now();
        let mut l = ExchangeLimiter::new(Duration::from_secs(1), 100_000, 0.0, t0);
        for port in 1..=(MAX_TRACKED_PEERS as u16 + 100) {
            assert_eq!(l.try_start(peer(port), t0), Ok(()));
        }
        assert!(l.last.len() <= MAX_TRACKED_PEERS);
    }
}
