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
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counters as a map from name to value, for the control protocol: a CLI and an agent of
/// different builds still understand each other (counters one side lacks read as 0 or are
/// skipped), and `grapevine info --json` prints an object.
pub(crate) mod by_name {
    use std::collections::BTreeMap;

    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::StatsSnapshot;

    pub(crate) fn serialize<S: Serializer>(
        stats: &StatsSnapshot,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let named = stats.named();
        let mut map = serializer.serialize_map(Some(named.len()))?;
        for (name, value) in named {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<StatsSnapshot, D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(deserializer)?;
        let mut stats = StatsSnapshot::default();
        for (name, value) in map {
            // A newer agent's counter this build does not know: skipped.
            stats.set_named(&name, value);
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Carrier {
        #[serde(with = "by_name")]
        stats: StatsSnapshot,
    }

    #[test]
    fn counters_travel_by_name_between_builds() {
        let stats = StatsSnapshot {
            udp_received: 7,
            stalls: 3,
            ..StatsSnapshot::default()
        };
        let carrier = Carrier { stats };
        let mut bytes = Vec::new();
        wire::encode_datagram_into(&carrier, &mut bytes, wire::MAX_DATAGRAM).unwrap();
        let (back, _): (Carrier, usize) = wire::decode_datagram_prefix(&bytes).unwrap();
        assert_eq!(back, carrier);

        // An agent of another build: one counter this build lacks, most of ours missing.
        let mut other: std::collections::BTreeMap<String, u64> = Default::default();
        other.insert("udp_received".into(), 11);
        other.insert("counter_of_a_newer_build".into(), 5);
        let mut bytes = Vec::new();
        wire::encode_datagram_into(&(other,), &mut bytes, wire::MAX_DATAGRAM).unwrap();
        let (back, _): (Carrier, usize) = wire::decode_datagram_prefix(&bytes).unwrap();
        assert_eq!(back.stats.udp_received, 11);
        assert_eq!(back.stats.stalls, 0);

        let json = serde_json::to_value(&carrier).unwrap();
        assert_eq!(json["stats"]["stalls"], 3);
    }
}
