//! Timing profiles for the failure detector and the anti-entropy exchange.

use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire;

/// Timing profile of a node, like memberlist's LAN/WAN/Local configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A data-centre network: probe every 1 s, suspicion max(3, 1.5·log10(n)) s (lengthened
    /// by local health, see [`TimerQueue`](super::TimerQueue)).
    #[default]
    Lan,
    /// Across regions: probe every 5 s, generous timeouts.
    Wan,
    /// One machine (tests, demos): probe every 500 ms, short suspicion.
    Local,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lan" => Ok(Profile::Lan),
            "wan" => Ok(Profile::Wan),
            "local" => Ok(Profile::Local),
            other => Err(format!("unknown profile {other:?}; use lan, wan or local")),
        }
    }
}

/// Fewest times an update is piggybacked.
const MIN_TRANSMISSIONS: NonZeroU8 = match NonZeroU8::new(6) {
    Some(n) => n,
    None => NonZeroU8::MIN,
};

/// Room kept in every datagram for the envelope and, later, sealing overhead.
const DATAGRAM_RESERVE: usize = 64;

impl Profile {
    /// foca's configuration for a cluster of `cluster_size` members.
    pub fn foca_config(self, cluster_size: usize) -> foca::Config {
        let n = NonZeroU32::new(cluster_size.clamp(1, u32::MAX as usize) as u32)
            .unwrap_or(NonZeroU32::MIN);
        let mut config = match self {
            Profile::Lan | Profile::Local => foca::Config::new_lan(n),
            Profile::Wan => foca::Config::new_wan(n),
        };
        // foca's 4·log10(n+1) gives a small cluster a single transmission, so a burst of
        // joins leaves members unaware of each other until the next anti-entropy round.
        config.max_transmissions = config.max_transmissions.max(MIN_TRANSMISSIONS);
        config.max_packet_size = NonZeroUsize::new(wire::MAX_DATAGRAM - DATAGRAM_RESERVE)
            .unwrap_or(config.max_packet_size);
        // No periodic announce: its answer is a datagram packed with members (≈ 1.3 KB at
        // 50 nodes) every interval, the largest part of an idle node's traffic (issue 18),
        // and the join follow-ups plus the periodic push-pull (fingerprint first) already
        // fill in the member lists that a join burst left partial.
        config.periodic_announce = None;
        // Announcing to members believed down is how the two sides of a healed partition
        // find each other again; foca's 65 s left them apart for up to a minute.
        if let Some(announce) = config.periodic_announce_to_down_members.as_mut() {
            announce.frequency = announce.frequency.min(self.push_pull_interval());
        }
        let scale = (cluster_size.max(1) as f64).log10().max(1.0);
        if self == Profile::Lan {
            // Less than half of foca's 4·log10(n) s (memberlist's figure), at least 3 s:
            // crashes are declared in about 5 s at 100 nodes instead of 10. What keeps false positives
            // away is Lifeguard's local health in `TimerQueue`: a node that was stalled or
            // whose probes fail gives the members it suspects up to 4× longer to refute.
            config.suspect_to_down_after = Duration::from_secs_f64((1.5 * scale).max(3.0));
        }
        if self == Profile::Local {
            config.probe_period = Duration::from_millis(500);
            config.probe_rtt = Duration::from_millis(200);
            config.suspect_to_down_after = Duration::from_secs_f64(1.5 * scale);
            if let Some(gossip) = config.periodic_gossip.as_mut() {
                gossip.frequency = Duration::from_millis(100);
            }
        }
        config
    }

    /// Bounds of Lifeguard's dynamic suspicion in a cluster of `cluster_size` (see
    /// [`suspicion`](super::suspicion)): `(min, max, k)`. `max` is foca's fixed suspicion
    /// time; `min` is half of it, but at least three probe periods, so that a healthy
    /// suspect that could not hear for a while has time to get a suspicion notice (one per
    /// probe period) and refute it; `k` confirmations are expected, none
    /// in a cluster too small to give them (memberlist's rule).
    pub fn suspicion_bounds(self, cluster_size: usize) -> (Duration, Duration, u32) {
        let config = self.foca_config(cluster_size);
        let max = config.suspect_to_down_after;
        let min = (max / 2).max(config.probe_period * 3).min(max);
        let k = super::suspicion::EXPECTED_CONFIRMATIONS;
        let k = if (cluster_size.saturating_sub(2) as u32) < k {
            0
        } else {
            k
        };
        (min, max, k)
    }

    /// How often a node exchanges its full member list with a random peer over TCP.
    pub fn push_pull_interval(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(10),
            Profile::Wan => Duration::from_secs(30),
            Profile::Local => Duration::from_secs(3),
        }
    }

    /// Push-pull runs once every this many [`push_pull_interval`](Self::push_pull_interval)s
    /// in a cluster of `cluster_size`: every interval up to 32 members, then one more
    /// interval per doubling (memberlist's scaling), since each exchange carries the whole
    /// member list. Keeps the idle bandwidth per node below ~5 KB/s at 10,000 members.
    pub fn push_pull_scale(cluster_size: usize) -> u32 {
        const FULL_RATE_UP_TO: f64 = 32.0;
        let n = cluster_size as f64;
        if n <= FULL_RATE_UP_TO {
            1
        } else {
            (n / FULL_RATE_UP_TO).log2().ceil() as u32 + 1
        }
    }

    /// How often a node runs anti-entropy of the replicated state with a random peer.
    pub fn sync_interval(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(2),
            Profile::Wan => Duration::from_secs(10),
            Profile::Local => Duration::from_secs(1),
        }
    }

    /// How long the records of a down or left node are kept before they are forgotten
    /// (they leave lookups at once; this only bounds the memory they hold).
    pub fn catalog_grace(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(300),
            Profile::Wan => Duration::from_secs(900),
            Profile::Local => Duration::from_secs(30),
        }
    }

    /// Age after which a deregistration's tombstone is collected.
    pub fn tombstone_horizon(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(600),
            Profile::Wan => Duration::from_secs(1800),
            Profile::Local => Duration::from_secs(60),
        }
    }

    /// How often a node with no live peer retries its seeds.
    pub fn join_retry_interval(self) -> Duration {
        match self {
            Profile::Lan => Duration::from_secs(1),
            Profile::Wan => Duration::from_secs(3),
            Profile::Local => Duration::from_millis(300),
        }
    }

    /// Timeout of one TCP exchange (connect, request, response).
    pub fn tcp_timeout(self) -> Duration {
        match self {
            Profile::Lan | Profile::Local => Duration::from_secs(5),
            Profile::Wan => Duration::from_secs(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pull_slows_down_one_interval_per_doubling_beyond_32_members() {
        let scales: Vec<u32> = [1, 32, 33, 64, 65, 100, 1000, 10_000]
            .into_iter()
            .map(Profile::push_pull_scale)
            .collect();
        assert_eq!(scales, vec![1, 1, 2, 2, 3, 3, 6, 10]);
    }

    #[test]
    fn dynamic_suspicion_spans_half_to_all_of_focas_time_and_three_probes_at_least() {
        let bounds = |n| {
            let (min, max, k) = Profile::Lan.suspicion_bounds(n);
            (min.as_millis(), max.as_millis(), k)
        };
        assert_eq!(bounds(3), (3000, 3000, 0), "too few members to confirm");
        assert_eq!(bounds(4), (3000, 3000, 2));
        // Small clusters keep their fixed time; large ones gain up to half of it.
        assert_eq!(bounds(100), (3000, 3000, 2));
        assert_eq!(bounds(1000), (3000, 4500, 2));
        assert_eq!(bounds(10_000), (3000, 6000, 2));
        let (min, max, _) = Profile::Local.suspicion_bounds(100);
        assert_eq!((min.as_millis(), max.as_millis()), (1500, 3000));
    }

    #[test]
    fn lan_suspicion_is_shorter_than_focas_and_grows_with_the_cluster() {
        let secs = |n| {
            Profile::Lan
                .foca_config(n)
                .suspect_to_down_after
                .as_secs_f64()
        };
        assert_eq!(secs(10), 3.0);
        assert_eq!(secs(100), 3.0);
        assert!((secs(1000) - 4.5).abs() < 1e-9);
        assert!((secs(10_000) - 6.0).abs() < 1e-9);
        let down_after = Profile::Lan
            .foca_config(100)
            .periodic_announce_to_down_members
            .map(|p| p.frequency);
        assert_eq!(down_after, Some(Profile::Lan.push_pull_interval()));
    }
}
