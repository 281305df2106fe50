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
