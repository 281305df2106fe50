//! `/metrics` in Prometheus text format.
//!
//! Each HTTP server owns its recorder (never the process-global one), so that several nodes
//! in one process (tests, embedders) keep their figures apart. The node's own counters are
//! copied into it at scrape time: the gossip and sync hot paths only bump the atomics they
//! already had. HTTP request latency is recorded as it happens, into the same recorder.

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
    with_local_recorder, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::membership::MemberStatus;
use crate::node::Node;
use crate::rpc::metrics::LATENCY_BUCKETS as RPC_LATENCY_BUCKETS;
use crate::rpc::{CallSide, ServiceSnapshot};
use crate::state::catalog::Health;

/// Buckets of request latency, in seconds (a blocking query may hold a request for minutes).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// The `# HELP` lines.
fn describe() {
    describe_gauge!(
        "grapevine_members",
        "Members as this node sees them, by status."
    );
    describe_counter!(
        "grapevine_gossip_packets_total",
        "UDP gossip datagrams received (in) and sent (out)."
    );
    describe_counter!(
        "grapevine_gossip_bytes_total",
        Unit::Bytes,
        "Bytes of UDP gossip datagrams received (in) and sent (out)."
    );
    describe_counter!(
        "grapevine_gossip_packets_dropped_total",
        "Datagrams dropped as malformed, oversized or refused."
    );
    describe_gauge!(
        "grapevine_broadcast_queue_depth",
        "Items waiting in the gossip broadcast queues."
    );
    describe_counter!(
        "grapevine_anti_entropy_rounds_total",
        "Anti-entropy exchanges this node started, by result."
    );
    describe_counter!(
        "grapevine_sync_suppressed_total",
        "Unscheduled exchanges (hint fetches, first contacts, follow-ups, rejoins) the rate limit did not start, by exchange."
    );
    describe_counter!(
        "grapevine_push_pull_total",
        "Member-list push-pulls completed."
    );
    describe_counter!(
        "grapevine_exchanges_agreed_total",
        "Scheduled anti-entropy rounds and push-pulls not started because the peers heard from agreed."
    );
    describe_counter!(
        "grapevine_push_pull_skipped_total",
        "Periodic push-pulls that found equal member-list fingerprints and shipped no lists."
    );
    describe_counter!(
        "grapevine_tcp_sync_bytes_total",
        Unit::Bytes,
        "Bytes of TCP push-pull and anti-entropy exchanges."
    );
    describe_counter!(
        "grapevine_tcp_connections_total",
        "Inbound TCP connections: accepted, dropped (bad request), refused (busy)."
    );
    describe_counter!(
        "grapevine_failure_detector_stalls_total",
        "Times this node found its failure-detector timers far overdue (it had been stalled) and re-armed them."
    );
    describe_counter!(
        "grapevine_suspicion_notices_total",
        "Datagrams telling a suspected member that it is suspected, so that it refutes."
    );
    describe_counter!(
        "grapevine_suspicions_shortened_total",
        "Suspects declared down before the fixed suspicion time, on independent confirmations."
    );
    describe_gauge!("grapevine_rpc_in_flight", "RPC calls this node is serving.");
    describe_gauge!(
        "grapevine_rpc_services_served",
        "RPC services this node serves."
    );
    describe_gauge!(
        "grapevine_catalog_instances",
        "Service instances on live nodes, by health."
    );
    describe_gauge!(
        "grapevine_catalog_services",
        "Services with an instance on a live node."
    );
    describe_counter!(
        "grapevine_catalog_index",
        "Catalog views published (catalog and membership changes applied)."
    );
    describe_gauge!("grapevine_config_keys", "Config keys set.");
    describe_counter!(
        "grapevine_config_changes_total",
        "Config changes this node applied."
    );
    describe_gauge!(
        "grapevine_http_watchers",
        "Blocking queries and event streams open."
    );
    describe_counter!(
        "grapevine_http_watchers_refused_total",
        "Blocking queries and streams refused (429) at the watcher limit."
    );
    describe_counter!(
        "grapevine_http_bodies_refused_total",
        "Requests refused (503) because the budget of request bodies arriving was spent."
    );
    describe_counter!(
        "grapevine_http_token_refused_total",
        "Requests refused (403) for a missing or wrong token."
    );
    describe_histogram!(
        "grapevine_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer HTTP API requests (to the first byte for streams)."
    );
}

/// A recorder of one HTTP server and the handle that renders it.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        with_local_recorder(&recorder, describe);
        Metrics { recorder, handle }
    }

    /// Counts a request refused because every watcher slot was taken.
    pub(crate) fn watcher_refused(&self) {
        with_local_recorder(&self.recorder, || {
            counter!("grapevine_http_watchers_refused_total").increment(1);
        });
    }

    /// Counts a request refused because the budget of bodies arriving was spent.
    pub(crate) fn body_refused(&self) {
        with_local_recorder(&self.recorder, || {
            counter!("grapevine_http_bodies_refused_total").increment(1);
        });
    }

    /// Counts a request refused for a missing or wrong token.
    pub(crate) fn token_refused(&self) {
        with_local_recorder(&self.recorder, || {
            counter!("grapevine_http_token_refused_total").increment(1);
        });
    }

    /// Records one answered HTTP request.
    pub(crate) fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let labels = [
            ("route", route.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        with_local_recorder(&self.recorder, || {
            histogram!("grapevine_http_request_duration_seconds", &labels)
                .record(took.as_secs_f64());
        });
    }

    /// Copies the node's figures into the recorder and renders everything.
    pub(crate) fn render(&self, node: &Node, watchers_open: usize) -> String {
        let stats = node.stats();
        let members = node.members();
        let catalog = node.catalog();
        let config = node.config();
        let instances = catalog.all_instances();
        with_local_recorder(&self.recorder, || {
            for status in [
                MemberStatus::Alive,
                MemberStatus::Suspect,
                MemberStatus::Down,
                MemberStatus::Left,
            ] {
                let count = members.iter().filter(|m| m.status == status).count();
                gauge!("grapevine_members", "status" => status.to_string()).set(count as f64);
            }
            counter!("grapevine_gossip_packets_total", "direction" => "in")
                .absolute(stats.udp_received);
            counter!("grapevine_gossip_packets_total", "direction" => "out")
                .absolute(stats.udp_sent);
            counter!("grapevine_gossip_bytes_total", "direction" => "in")
                .absolute(stats.udp_received_bytes);
            counter!("grapevine_gossip_bytes_total", "direction" => "out")
                .absolute(stats.udp_sent_bytes);
            counter!("grapevine_gossip_packets_dropped_total").absolute(stats.udp_dropped);
            gauge!("grapevine_broadcast_queue_depth").set(stats.broadcast_queue as f64);
            counter!("grapevine_anti_entropy_rounds_total", "result" => "ok")
                .absolute(stats.sync_ok);
            counter!("grapevine_anti_entropy_rounds_total", "result" => "failed")
                .absolute(stats.sync_failed);
            counter!("grapevine_sync_suppressed_total", "exchange" => "anti_entropy")
                .absolute(stats.sync_suppressed);
            counter!("grapevine_sync_suppressed_total", "exchange" => "push_pull")
                .absolute(stats.push_pull_suppressed);
            counter!("grapevine_push_pull_total").absolute(stats.push_pull_ok);
            counter!("grapevine_push_pull_skipped_total").absolute(stats.push_pull_skipped);
            counter!("grapevine_exchanges_agreed_total").absolute(stats.exchanges_agreed);
            counter!("grapevine_tcp_sync_bytes_total").absolute(stats.tcp_bytes);
            counter!("grapevine_tcp_connections_total", "result" => "accepted")
                .absolute(stats.tcp_accepted);
            counter!("grapevine_tcp_connections_total", "result" => "dropped")
                .absolute(stats.tcp_dropped);
            counter!("grapevine_tcp_connections_total", "result" => "refused_busy")
                .absolute(stats.tcp_refused_busy);
            counter!("grapevine_tcp_connections_total", "result" => "refused_budget")
                .absolute(stats.tcp_refused_budget);
            counter!("grapevine_tcp_connections_total", "result" => "refused_hello")
                .absolute(stats.tcp_refused_hello);
            counter!("grapevine_member_events_lagged_total").absolute(stats.events_lagged);
            counter!("grapevine_sealed_refused_total").absolute(stats.sealed_refused);
            counter!("grapevine_failure_detector_stalls_total").absolute(stats.stalls);
            counter!("grapevine_suspicion_notices_total").absolute(stats.suspicion_notices);
            counter!("grapevine_suspicions_shortened_total").absolute(stats.suspicions_shortened);
            gauge!("grapevine_rpc_in_flight").set(node.rpc_in_flight() as f64);
            gauge!("grapevine_rpc_services_served").set(node.rpc_services().len() as f64);
            for health in [Health::Passing, Health::Warning, Health::Critical] {
                let count = instances
                    .iter()
                    .filter(|i| i.node_status.is_active() && i.health == health)
                    .count();
                gauge!("grapevine_catalog_instances", "health" => health.to_string())
                    .set(count as f64);
            }
            gauge!("grapevine_catalog_services").set(catalog.services().len() as f64);
            counter!("grapevine_catalog_index").absolute(catalog.index());
            gauge!("grapevine_config_keys").set(config.key_count() as f64);
            counter!("grapevine_config_changes_total").absolute(config.current_seq());
            gauge!("grapevine_http_watchers").set(watchers_open as f64);
        });
        let mut text = self.handle.render();
        render_rpc(&node.rpc_metrics(), &mut text);
        // Components layered on the node (the DNS interface) render their own families.
        for source in node.stats_sources() {
            source.render_prometheus(&mut text);
        }
        text
    }
}

/// Appends the per-service RPC families. They are written here rather than through the
/// recorder because the RPC layer keeps its own fixed-bucket histograms (atomics on the call
/// path), which a recorder cannot take as totals.
fn render_rpc(figures: &[ServiceSnapshot], out: &mut String) {
    use std::fmt::Write;
    let labels = |f: &ServiceSnapshot| {
        format!(
            "side=\"{}\",service=\"{}\"",
            f.side.label(),
            escape_label(&f.service)
        )
    };
    out.push_str("# HELP grapevine_rpc_calls_total RPC calls finished (failed ones included), by side (client: made, server: served) and service.\n");
    out.push_str("# TYPE grapevine_rpc_calls_total counter\n");
    for f in figures {
        let _ = writeln!(
            out,
            "grapevine_rpc_calls_total{{{}}} {}",
            labels(f),
            f.calls
        );
    }
    out.push_str(
        "# HELP grapevine_rpc_errors_total Failed RPC calls, by side, service and kind.\n",
    );
    out.push_str("# TYPE grapevine_rpc_errors_total counter\n");
    for f in figures {
        for (failure, count) in &f.failures {
            let _ = writeln!(
                out,
                "grapevine_rpc_errors_total{{{},kind=\"{}\"}} {count}",
                labels(f),
                failure.label()
            );
        }
    }
    out.push_str("# HELP grapevine_rpc_ejections_total Instances this node's clients ejected after consecutive unavailable failures, by service.\n");
    out.push_str("# TYPE grapevine_rpc_ejections_total counter\n");
    for f in figures.iter().filter(|f| f.side == CallSide::Client) {
        let _ = writeln!(
            out,
            "grapevine_rpc_ejections_total{{service=\"{}\"}} {}",
            escape_label(&f.service),
            f.ejections
        );
    }
    out.push_str("# HELP grapevine_rpc_duration_seconds Time from a call's start to its result (client) or to its reply's flush (server).\n");
    out.push_str("# TYPE grapevine_rpc_duration_seconds histogram\n");
    for f in figures {
        let labels = labels(f);
        let mut cumulative = 0;
        for (bound, count) in RPC_LATENCY_BUCKETS.iter().zip(&f.buckets) {
            cumulative += count;
            let _ = writeln!(
                out,
                "grapevine_rpc_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += f.buckets.last().copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "grapevine_rpc_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "grapevine_rpc_duration_seconds_sum{{{labels}}} {}",
            f.total_seconds
        );
        let _ = writeln!(
            out,
            "grapevine_rpc_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
