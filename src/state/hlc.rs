//! Hybrid logical clock (HLC), sans-IO.
//!
//! A [`Timestamp`] is `(wall_ms, logical)`: the wall part tracks physical time in
//! milliseconds, the logical part orders events that share a millisecond (or that happen
//! while the local physical clock lags behind a timestamp already seen). The clock never
//! reads time itself: callers pass physical time in, which keeps the state machine
//! deterministic and testable.
//!
//! The rules are those of Kulkarni et al., *Logical Physical Clocks* (2014):
//!
//! * **send / local event** ([`HybridClock::now`]): `wall = max(last.wall, physical)`;
//!   the logical part is incremented if `wall` did not move, reset to 0 otherwise;
//! * **receive** ([`HybridClock::observe`]): `wall = max(last.wall, remote.wall, physical)`,
//!   the logical part is one more than the largest logical part among the inputs whose wall
//!   equals the new wall (0 if only physical time reached it).
//!
//! Every timestamp produced is strictly greater than every timestamp produced or observed
//! before, so a write made after seeing another write orders after it, whatever the physical
//! clocks say. A remote timestamp more than `max_drift_ms` ahead of local physical time is
//! refused ([`HlcError::TooFarAhead`]): one node with a broken clock must not drag the whole
//! cluster's clocks into the future.

use serde::{Deserialize, Serialize};

/// Default bound on how far a remote timestamp may run ahead of local physical time: 60 s.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A hybrid logical clock reading. Ordered by `(wall_ms, logical)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Physical component, milliseconds (Unix epoch by convention; only ordering matters).
    pub wall_ms: u64,
    /// Logical counter ordering events within the same `wall_ms`.
    pub logical: u32,
}

impl Timestamp {
    /// The zero timestamp, smaller than every other.
    pub const ZERO: Timestamp = Timestamp {
        wall_ms: 0,
        logical: 0,
    };

    /// Builds a timestamp.
    pub const fn new(wall_ms: u64, logical: u32) -> Self {
        Timestamp { wall_ms, logical }
    }

    /// The smallest timestamp strictly greater than `(wall_ms, logical)`: the logical part
    /// plus one, or the next millisecond if the logical part is exhausted. Saturates at the
    /// maximum representable timestamp (unreachable with sane physical inputs).
    fn successor(wall_ms: u64, logical: u32) -> Self {
        match logical.checked_add(1) {
            Some(logical) => Timestamp { wall_ms, logical },
            None => match wall_ms.checked_add(1) {
                Some(wall_ms) => Timestamp {
                    wall_ms,
                    logical: 0,
                },
                None => Timestamp {
                    wall_ms,
                    logical: u32::MAX,
                },
            },
        }
    }
}

/// Errors of [`HybridClock::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    /// The remote timestamp is further ahead of local physical time than allowed.
    #[error(
        "remote timestamp wall time {remote_wall_ms} ms is more than the allowed drift of \
         {max_drift_ms} ms ahead of local physical time {physical_ms} ms"
    )]
    TooFarAhead {
        /// Wall part of the refused remote timestamp.
        remote_wall_ms: u64,
        /// Local physical time passed to `observe`.
        physical_ms: u64,
        /// The configured bound.
        max_drift_ms: u64,
    },
}

/// A hybrid logical clock. Sans-IO: physical time is an argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridClock {
    last: Timestamp,
    max_drift_ms: u64,
}

impl Default for HybridClock {
    fn default() -> Self {
        HybridClock::new(DEFAULT_MAX_DRIFT_MS)
    }
}

impl HybridClock {
    /// A clock that has seen nothing yet and refuses remote timestamps more than
    /// `max_drift_ms` ahead of local physical time.
    pub fn new(max_drift_ms: u64) -> Self {
        HybridClock {
            last: Timestamp::ZERO,
            max_drift_ms,
        }
    }

    /// The last timestamp produced or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// The configured maximum forward drift of remote timestamps, in milliseconds.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// Raises the clock to `high_water` (a reading saved before a restart), so that it never
    /// runs backwards across restarts: every later timestamp is greater. A lower value is
    /// ignored.
    pub fn restore(&mut self, high_water: Timestamp) {
        self.last = self.last.max(high_water);
    }

    /// Timestamp for a local event (a write) at local physical time `physical_ms`.
    /// Strictly greater than every timestamp returned or observed before.
    pub fn now(&mut self, physical_ms: u64) -> Timestamp {
        let ts = if physical_ms > self.last.wall_ms {
            Timestamp::new(physical_ms, 0)
        } else {
            Timestamp::successor(self.last.wall_ms, self.last.logical)
        };
        self.last = ts;
        ts
    }

    /// Merges a remote timestamp into the clock (HLC receive rule) and returns the new local
    /// reading, strictly greater than both `remote` and every earlier reading.
    ///
    /// Refuses, without changing the clock, a `remote` whose wall time is more than
    /// `max_drift_ms` ahead of `physical_ms`.
    pub fn observe(&mut self, remote: Timestamp, physical_ms: u64) -> Result<Timestamp, HlcError> {
        if remote.wall_ms > physical_ms.saturating_add(self.max_drift_ms) {
            return Err(HlcError::TooFarAhead {
                remote_wall_ms: remote.wall_ms,
                physical_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        let last = self.last;
        let wall = last.wall_ms.max(remote.wall_ms).max(physical_ms);
        let ts = if wall == last.wall_ms && wall == remote.wall_ms {
            Timestamp::successor(wall, last.logical.max(remote.logical))
        } else if wall == last.wall_ms {
            Timestamp::successor(wall, last.logical)
        } else if wall == remote.wall_ms {
            Timestamp::successor(wall, remote.logical)
        } else {
            Timestamp::new(wall, 0)
        };
        self.last = ts;
        Ok(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn now_is_monotonic_when_physical_time_goes_backwards() {
        let mut c = HybridClock::default();
        let a = c.now(1_000);
        let b = c.now(900);
        let d = c.now(1_000);
        let e = c.now(1_001);
        assert_eq!(a, Timestamp::new(1_000, 0));
        assert_eq!(b, Timestamp::new(1_000, 1));
        assert_eq!(d, Timestamp::new(1_000, 2));
        assert_eq!(e, Timestamp::new(1_001, 0));
    }

    #[test]
    fn logical_overflow_rolls_into_the_next_millisecond() {
        let mut c = HybridClock::new(DEFAULT_MAX_DRIFT_MS);
        c.last = Timestamp::new(5, u32::MAX);
        assert_eq!(c.now(0), Timestamp::new(6, 0));
        c.last = Timestamp::new(u64::MAX, u32::MAX);
        // Saturates instead of panicking.
        assert_eq!(c.now(0), Timestamp::new(u64::MAX, u32::MAX));
    }

    #[test]
    fn observe_follows_the_receive_rule() {
        let mut c = HybridClock::new(10_000);
        c.now(1_000);
        // Remote ahead: adopt its wall, logical + 1.
        assert_eq!(
            c.observe(Timestamp::new(2_000, 7), 1_000),
            Ok(Timestamp::new(2_000, 8))
        );
        // Same wall on both sides: max logical + 1.
        assert_eq!(
            c.observe(Timestamp::new(2_000, 3), 1_500),
            Ok(Timestamp::new(2_000, 9))
        );
        // Remote behind, local ahead of physical: local logical + 1.
        assert_eq!(
            c.observe(Timestamp::new(10, 0), 1_600),
            Ok(Timestamp::new(2_000, 10))
        );
        // Physical time overtakes everything: logical resets.
        assert_eq!(
            c.observe(Timestamp::new(10, 0), 3_000),
            Ok(Timestamp::new(3_000, 0))
        );
    }

    #[test]
    fn far_future_remote_is_refused_and_does_not_move_the_clock() {
        let mut c = HybridClock::new(1_000);
        c.now(5_000);
        let before = c.last();
        let err = c.observe(Timestamp::new(6_001, 0), 5_000).unwrap_err();
        assert_eq!(
            err,
            HlcError::TooFarAhead {
                remote_wall_ms: 6_001,
                physical_ms: 5_000,
                max_drift_ms: 1_000
            }
        );
        assert!(err.to_string().contains("allowed drift of 1000 ms"));
        assert_eq!(c.last(), before);
        // Exactly at the bound is accepted.
        assert!(c.observe(Timestamp::new(6_000, 0), 5_000).is_ok());
        // No overflow near u64::MAX.
        let mut c = HybridClock::new(u64::MAX);
        assert!(c.observe(Timestamp::new(u64::MAX, 0), u64::MAX).is_ok());
    }

    #[test]
    fn skewed_clocks_causally_later_write_wins() {
        // Node A's clock runs 10 s ahead of node B's.
        let mut a = HybridClock::new(DEFAULT_MAX_DRIFT_MS);
        let mut b = HybridClock::new(DEFAULT_MAX_DRIFT_MS);
        let real = 1_700_000_000_000u64;
        let a_write = a.now(real + 10_000);
        // B sees A's write 5 ms later (by B's slow clock), then writes the same key.
        b.observe(a_write, real + 5).unwrap();
        let b_write = b.now(real + 6);
        assert!(
            (b_write, "b") > (a_write, "a"),
            "B's later write must win: {b_write:?} vs {a_write:?}"
        );
        // Even against a writer id that sorts higher, the HLC decides first.
        assert!((b_write, "a") > (a_write, "z"));
    }

    proptest! {
        #[test]
        fn readings_strictly_increase(
            events in proptest::collection::vec((any::<bool>(), 0u64..10_000, 0u64..20_000, 0u32..4), 1..200)
        ) {
            let mut c = HybridClock::new(5_000);
            let mut prev = c.last();
            for (local, physical, remote_wall, remote_logical) in events {
                let remote = Timestamp::new(remote_wall, remote_logical);
                let ts = if local {
                    c.now(physical)
                } else {
                    match c.observe(remote, physical) {
                        Ok(ts) => {
                            prop_assert!(ts > remote);
                            ts
                        }
                        Err(_) => {
                            prop_assert!(remote_wall > physical + 5_000);
                            prop_assert_eq!(c.last(), prev);
                            continue;
                        }
                    }
                };
                prop_assert!(ts > prev);
                prop_assert!(ts.wall_ms >= physical);
                prev = ts;
            }
        }
    }
}
