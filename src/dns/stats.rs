//! Counters of the DNS interface, for `grapevine info` and `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::node::StatsSource;

/// Query types counted apart; the rest count as `other`.
const TYPES: [&str; 9] = [
    "A", "AAAA", "SRV", "ANY", "SOA", "NS", "PTR", "TXT", "other",
];
/// Response codes counted apart; the rest count as `other`.
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

fn type_index(record_type: RecordType) -> usize {
    match record_type {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::SRV => 2,
        RecordType::ANY => 3,
        RecordType::SOA => 4,
        RecordType::NS => 5,
        RecordType::PTR => 6,
        RecordType::TXT => 7,
        _ => 8,
    }
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

/// Live counters, shared by the server's tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    queries: [[AtomicU64; RCODES.len()]; TYPES.len()],
    malformed: AtomicU64,
    truncated: AtomicU64,
    tcp_accepted: AtomicU64,
    tcp_refused_busy: AtomicU64,
    tcp_idle_closed: AtomicU64,
    tcp_open: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts one answered query.
    pub(crate) fn answered(&self, record_type: RecordType, rcode: ResponseCode) {
        bump(&self.queries[type_index(record_type)][rcode_index(rcode)]);
    }

    /// Counts a packet dropped unanswered (malformed, or not a query).
    pub(crate) fn malformed(&self) {
        bump(&self.malformed);
    }

    /// Counts a response cut to fit (TC set).
    pub(crate) fn truncated(&self) {
        bump(&self.truncated);
    }

    pub(crate) fn tcp_accepted(&self) {
        bump(&self.tcp_accepted);
        bump(&self.tcp_open);
    }

    pub(crate) fn tcp_closed(&self) {
        self.tcp_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn tcp_refused_busy(&self) {
        bump(&self.tcp_refused_busy);
    }

    pub(crate) fn tcp_idle_closed(&self) {
        bump(&self.tcp_idle_closed);
    }

    /// A copy of the counters.
    pub(crate) fn snapshot(&self) -> DnsStats {
        let mut queries = Vec::new();
        for (t, row) in self.queries.iter().enumerate() {
            for (r, count) in row.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    queries.push((TYPES[t], RCODES[r], count));
                }
            }
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            queries,
            malformed_dropped: load(&self.malformed),
            truncated: load(&self.truncated),
            tcp_accepted: load(&self.tcp_accepted),
            tcp_refused_busy: load(&self.tcp_refused_busy),
            tcp_idle_closed: load(&self.tcp_idle_closed),
            tcp_open: load(&self.tcp_open),
        }
    }
}

/// A copy of a DNS server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries answered, by query type and response code (only the non-zero ones).
    pub queries: Vec<(&'static str, &'static str, u64)>,
    /// Packets dropped unanswered: malformed, oversized, or not queries.
    pub malformed_dropped: u64,
    /// Responses cut to fit their transport (TC set).
    pub truncated: u64,
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// TCP connections closed at once because the connection limit was reached.
    pub tcp_refused_busy: u64,
    /// TCP connections closed for idleness.
    pub tcp_idle_closed: u64,
    /// TCP connections open now.
    pub tcp_open: u64,
}

impl DnsStats {
    /// Queries answered with this type (`"A"`, `"SRV"`, ..., `"other"`) and response code
    /// (`"NOERROR"`, `"NXDOMAIN"`, ...).
    pub fn queries_of(&self, record_type: &str, rcode: &str) -> u64 {
        self.queries
            .iter()
            .filter(|(t, r, _)| *t == record_type && *r == rcode)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// Queries answered, all types and codes.
    pub fn queries_total(&self) -> u64 {
        self.queries.iter().map(|(_, _, n)| n).sum()
    }

    /// Queries answered with this response code, all types.
    pub fn queries_with(&self, rcode: &str) -> u64 {
        self.queries
            .iter()
            .filter(|(_, r, _)| *r == rcode)
            .map(|(_, _, n)| n)
            .sum()
    }
}

impl StatsSource for Counters {
    fn counters(&self) -> Vec<(String, u64)> {
        let stats = self.snapshot();
        vec![
            ("dns_queries".into(), stats.queries_total()),
            ("dns_nxdomain".into(), stats.queries_with("NXDOMAIN")),
            ("dns_refused".into(), stats.queries_with("REFUSED")),
            ("dns_truncated".into(), stats.truncated),
            ("dns_malformed_dropped".into(), stats.malformed_dropped),
            ("dns_tcp_open".into(), stats.tcp_open),
            ("dns_tcp_refused_busy".into(), stats.tcp_refused_busy),
        ]
    }

    fn render_prometheus(&self, out: &mut String) {
        let stats = self.snapshot();
        out.push_str("# HELP grapevine_dns_queries_total DNS queries answered, by query type and response code.\n");
        out.push_str("# TYPE grapevine_dns_queries_total counter\n");
        for (record_type, rcode, count) in &stats.queries {
            let _ = writeln!(
                out,
                "grapevine_dns_queries_total{{type=\"{record_type}\",rcode=\"{rcode}\"}} {count}"
            );
        }
        let families: [(&str, &str, &str, u64); 6] = [
            (
                "grapevine_dns_dropped_total",
                "counter",
                "DNS packets dropped unanswered (malformed, oversized, not a query).",
                stats.malformed_dropped,
            ),
            (
                "grapevine_dns_truncated_total",
                "counter",
                "DNS responses cut to fit their transport (TC set).",
                stats.truncated,
            ),
            (
                "grapevine_dns_tcp_connections_accepted_total",
                "counter",
                "DNS TCP connections accepted.",
                stats.tcp_accepted,
            ),
            (
                "grapevine_dns_tcp_connections_refused_total",
                "counter",
                "DNS TCP connections closed at once at the connection limit.",
                stats.tcp_refused_busy,
            ),
            (
                "grapevine_dns_tcp_connections_idle_closed_total",
                "counter",
                "DNS TCP connections closed for idleness.",
                stats.tcp_idle_closed,
            ),
            (
                "grapevine_dns_tcp_connections",
                "gauge",
                "DNS TCP connections open.",
                stats.tcp_open,
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}
