//! Counters of what a node sent, received and dropped.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, shared by the node's tasks.
        #[derive(Debug, Default)]
        pub(crate) struct Stats { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of a node's counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct StatsSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// Every counter with its name, in declaration order.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }

            /// Sets the counter called `name`; `false` if this build has no such counter.
            pub fn set_named(&mut self, name: &str, value: u64) -> bool {
                match name {
                    $(stringify!($name) => self.$name = value,)*
                    _ => return false,
                }
                true
            }
        }
    };
}

counters! {
    /// Datagrams received.
    udp_received,
    /// Bytes of datagrams received.
    udp_received_bytes,
    /// Datagrams dropped because they were malformed, oversized or refused.
    udp_dropped,
    /// Datagrams sent.
    udp_sent,
    /// Bytes of datagrams sent.
    udp_sent_bytes,
    /// TCP connections accepted.
    tcp_accepted,
    /// TCP connections closed for a malformed, oversized or late request.
    tcp_dropped,
    /// TCP connections refused because too many were open.
    tcp_refused_busy,
    /// TCP connections closed because the node-wide memory budget for frames still
    /// arriving was spent (many large partial frames at once: an attack, or a surge).
    tcp_refused_budget,
    /// TCP connections closed because they did not open with a hello of this node's
    /// protocol, or declared a frame above 1 KiB before it (junk, another protocol, an older
    /// grapevine).
    tcp_refused_hello,
    /// Bytes read from and written to TCP exchanges.
    tcp_bytes,
    /// Push-pull exchanges that completed (either side).
    push_pull_ok,
    /// Periodic push-pulls that found equal member-list fingerprints and so exchanged no
    /// member lists (either side).
    push_pull_skipped,
    /// Anti-entropy exchanges this node started that completed.
    sync_ok,
    /// Outbound TCP exchanges (push-pull, anti-entropy) that failed.
    sync_failed,
    /// Unscheduled anti-entropy rounds (to fetch a hinted change, at first contact) not
    /// started because the rate limit refused them.
    sync_suppressed,
    /// Unscheduled push-pulls (first contact, follow-ups, a member back) not started
    /// because the rate limit refused them.
    push_pull_suppressed,
    /// Member events a slow subscriber missed.
    events_lagged,
    /// Sealed datagrams and connections refused (wrong key or label, plaintext, forged).
    sealed_refused,
    /// Items waiting in the gossip broadcast queues (a gauge, set after every driver step).
    broadcast_queue,
    /// Local changes not queued for gossip because the broadcast queue was full (they
    /// spread by anti-entropy).
    broadcasts_deferred,
    /// Times the failure detector found its timers far overdue (this node had been
    /// stalled) and re-armed them instead of judging peers on stale evidence.
    stalls,
    /// Datagrams telling a member this node suspects that it is suspected, so that it
    /// refutes (Lifeguard's buddy system); none while nobody is suspected.
    suspicion_notices,
    /// Scheduled anti-entropy rounds and push-pulls not started because every peer heard
    /// from since the last tick had the same state and member list (their datagrams' tags).
    exchanges_agreed,
    /// Suspects declared down before the fixed suspicion time because other members
    /// independently confirmed the suspicion (Lifeguard's dynamic suspicion).
    suspicions_shortened,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counters of a component layered on a node (such as the DNS interface), shown beside the
/// node's own: `grapevine info` lists [`StatsSource::counters`], `/metrics` appends
/// [`StatsSource::render_prometheus`]. The node holds sources weakly (see
/// [`crate::Node::add_stats_source`]): a component that stops drops out on its own.
pub trait StatsSource: Send + Sync {
    /// Named counters, `snake_case` and prefixed with the component (`dns_queries`).
    fn counters(&self) -> Vec<(String, u64)>;
    /// Prometheus text-format families, each with its `# HELP` and `# TYPE` lines.
    fn render_prometheus(&self, out: &mut String);
}

/// Counters as a map from name to value, for the control protocol: a CLI and an agent of
/// different builds still understand each other (counters one side lacks read as 0 or are
/// kept apart as extra counters), and `grapevine info --json` prints an object.
pub(crate) mod by_name {
    use std::collections::BTreeMap;

    use super::StatsSnapshot;

    /// The node's counters and the extra ones, in one map.
    pub(crate) fn to_map(
        stats: &StatsSnapshot,
        extra: &BTreeMap<String, u64>,
    ) -> BTreeMap<String, u64> {
        let mut map = extra.clone();
        for (name, value) in stats.named() {
            map.insert(name.to_string(), value);
        }
        map
    }

    /// Splits a map into the counters this build knows and the others (those of layered
    /// components, or of a newer build).
    pub(crate) fn from_map(map: BTreeMap<String, u64>) -> (StatsSnapshot, BTreeMap<String, u64>) {
        let mut stats = StatsSnapshot::default();
        let mut extra = BTreeMap::new();
        for (name, value) in map {
            if !stats.set_named(&name, value) {
                extra.insert(name, value);
            }
        }
        (stats, extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::control::NodeInfo;
    use crate::wire;

    fn info(stats: StatsSnapshot, extra: &[(&str, u64)]) -> NodeInfo {
        NodeInfo {
            name: "n".into(),
            addr: ([127, 0, 0, 1], 7946).into(),
            generation: 1,
            profile: crate::Profile::Lan,
            stats,
            extra: extra.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn counters_travel_by_name_between_builds() {
        let stats = StatsSnapshot {
            udp_received: 7,
            stalls: 3,
            ..StatsSnapshot::default()
        };
        let sent = info(stats, &[("dns_queries", 9)]);
        let mut bytes = Vec::new();
        wire::encode_datagram_into(&sent, &mut bytes, wire::MAX_DATAGRAM).unwrap();
        let (back, _): (NodeInfo, usize) = wire::decode_datagram_prefix(&bytes).unwrap();
        assert_eq!(back.stats, sent.stats);
        assert_eq!(back.extra, sent.extra);

        // An agent of another build: one counter this build lacks, most of ours missing.
        let mut other: std::collections::BTreeMap<String, u64> = Default::default();
        other.insert("udp_received".into(), 11);
        other.insert("counter_of_a_newer_build".into(), 5);
        let older = (
            "n".to_string(),
            std::net::SocketAddr::from(([127, 0, 0, 1], 7946)),
            1u64,
            crate::Profile::Lan,
            other,
        );
        let mut bytes = Vec::new();
        wire::encode_datagram_into(&older, &mut bytes, wire::MAX_DATAGRAM).unwrap();
        let (back, _): (NodeInfo, usize) = wire::decode_datagram_prefix(&bytes).unwrap();
        assert_eq!(back.stats.udp_received, 11);
        assert_eq!(back.stats.stalls, 0);
        assert_eq!(back.extra.get("counter_of_a_newer_build"), Some(&5));

        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(json["stats"]["stalls"], 3);
        assert_eq!(json["stats"]["dns_queries"], 9);
    }
}
