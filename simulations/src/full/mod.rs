//! The full-stack tier: the real node code on turmoil's deterministic network.
//!
//! Every node is a [`grapevine::Node`] started on its own turmoil host with
//! [`TurmoilTransport`], so UDP gossip, TCP push-pull, anti-entropy and RPC all run exactly as
//! in production, on simulated links. One run is a function of its [`Options`]: turmoil's
//! random numbers are seeded from `options.seed`, the simulation's epoch is fixed, and every
//! node gets an explicit generation, RNG seed and a wall clock read from simulated time. The
//! same options give a byte-identical [`Report`].
//!
//! # The simulated network
//!
//! * One host per node, `node-000`, `node-001`, …, each listening on port 7946 (UDP and TCP).
//!   Every node seeds from the first three nodes (itself excluded), so any restarted node can
//!   rejoin.
//! * Profile [`Profile::Lan`] (probe every 1 s, suspicion `max(3, 1.5·log10 n)` s, lengthened by
//!   local health).
//! * Links: latency 1–20 ms (turmoil's exponential distribution, mean ≈ 5 ms); receive buffers
//!   of 1,024 datagrams and TCP segments. Time advances in ticks of 10 ms: messages are
//!   delivered at tick boundaries, so a measured time is precise to about one tick.
//! * Loss (`options.loss`) is turmoil's `fail_rate`, applied once the cluster has joined: each
//!   message breaks its link with that probability, which drops the message and whatever is
//!   in flight on that link; TCP segments are not retransmitted, so a lossy TCP exchange stalls
//!   until the node's own timeout ends it. Effective datagram loss is therefore a little above
//!   the figure given.
//!
//! # Observation
//!
//! Between ticks the driver loop reads each node's published views (`members()`,
//! `catalog()`, `config()`), which never lock a node, and a log of member events that a task
//! on every host fills from `node.events()` with the simulated time of each event. Times are
//! simulated seconds from turmoil's clock, rounded to the millisecond; byte and packet rates
//! are sums of the nodes' `stats()` (`udp_sent_bytes + tcp_bytes / 2`, and `udp_sent`) over
//! every incarnation, divided by the cluster size and the simulated seconds of the whole run.
//! `push_pull_full` and `push_pull_skipped` are the halved sums of `push_pull_ok` and
//! `push_pull_skipped` (both sides of an exchange count it), over the whole run.
//!
//! # Scenarios
//!
//! Every scenario first starts all nodes at once and waits until every node sees every node
//! alive (`join_s`); a cluster that does not converge within 120 simulated seconds is an
//! error. "False positives" are nodes whose running incarnation some node declared down.
//!
//! | scenario | what happens | main figures |
//! |---|---|---|
//! | `converge` | one node registers a service | `join_s`, `disseminate_p50_s`, `disseminate_p999_s`, `disseminate_max_s`, `idle_bytes_per_node_per_s` (20–40 s after the join) |
//! | `crash` | one node's host crashes | `detect_p50_s`, `detect_max_s`, `suspect_p50_s`, `undetected` |
//! | `leave` | one node leaves gracefully | `left_p50_s`, `left_max_s`, `wrong_downs` |
//! | `partition` | two halves are cut apart (`duration_s`, default 30 s), both write catalog and config, then heal | `converged_after_heal_s`, `membership_after_heal_s`, `converged` |
//! | `loss` | packet loss (default 0.05) for `duration_s` (default 120 s), then none | `false_positives`, `down_events`, `suspect_events`, `renewals`, `converged` |
//! | `freeze` | one node's links are held for twice the suspicion time, then released | `suspected`, `false_positives`, `frozen_view_downs`, `recovered_s` |
//! | `churn` | random nodes crash and restart with a higher generation for `duration_s` (default 60 s) | `restarts`, `converged`, `converged_after_s`, `false_positives` |
//! | `rolling-restart` | every node, one at a time, restarts (1 s down) | `max_unavailable_s`, `max_lookup_gap_s`, `converged` |
//! | `idle` | nothing, for `duration_s` (default 30 s) after the join | `anti_entropy_max_per_node`, `anti_entropy_allowed_per_node`, `nodes_over_schedule`, `push_pulls`, `push_pulls_allowed`, `suppressed`, `idle_bytes_per_node_per_s` |
//! | `rpc` | a client calls a service served on several nodes while instances crash and restart, for `duration_s` (default 60 s) | `calls_ok`, `calls_failed`, `availability`, `call_p50_ms`, `call_p99_ms`, `call_max_ms` |
//!
//! Every report also has `bytes_per_node_per_s` and `packets_per_node_per_s`.
//! `options.duration_s` sets the free length of `partition`, `loss`, `churn` and `rpc`; the
//! other scenarios run until what they measure has happened (at most 120 simulated seconds
//! per wait) and ignore it. Scenario-specific figures that could not be measured (nothing was
//! detected, say) are left out, and a count such as `undetected` says why.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use grapevine::net::turmoil_net::TurmoilTransport;
use grapevine::{
    AppError, Health, MemberEvent, MemberEvents, MemberStatus, Node, Profile, RpcService, Service,
    StatsSnapshot,
};
use tokio::sync::mpsc;

use crate::report::{Engine, Options, Report};

/// The port every node gossips and serves on.
const PORT: u16 = 7946;
/// The port the registered test services claim.
const SERVICE_PORT: u16 = 8080;
/// The simulation's epoch (2023-11-14T22:13:20Z), so that no clock reads the system's.
const EPOCH_S: u64 = 1_700_000_000;
/// Simulated time per turmoil step.
const TICK: Duration = Duration::from_millis(10);
/// How often slow conditions (catalog and config comparisons, event scans) are checked.
const OBSERVE: Duration = Duration::from_millis(50);
/// How many nodes every node seeds from.
const SEEDS: usize = 3;
/// Timing profile of every node.
const PROFILE: Profile = Profile::Lan;
/// Smallest and largest cluster accepted.
const MIN_NODES: usize = 3;
const MAX_NODES: usize = 200;
/// Longest wait for the initial join.
const JOIN_LIMIT: Duration = Duration::from_secs(120);
/// Quiet time between the join and the scenario's fault.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest wait for a detection, a dissemination or a recovery.
const WAIT_LIMIT: Duration = Duration::from_secs(120);
/// How long after a partition heals convergence is awaited.
const HEAL_LIMIT: Duration = Duration::from_secs(300);
/// Pause between one node being back and the next restart of `rolling-restart`.
const RESTART_GAP: Duration = Duration::from_millis(500);
/// When, after the join, `converge` starts measuring background traffic: past the
/// push-pulls that follow a join, in the steady state.
const IDLE_START: Duration = Duration::from_secs(20);
/// Idle window in which `converge` measures background traffic.
const IDLE_WINDOW: Duration = Duration::from_secs(20);
/// Extra time observed after some faults, to catch late wrong verdicts.
const TAIL: Duration = Duration::from_secs(10);
/// Name of the service the scenarios register.
const WEB: &str = "web";
/// Name of the RPC service of the `rpc` scenario.
const ECHO: &str = "echo";
/// Pause between two calls of the `rpc` client.
const CALL_PERIOD: Duration = Duration::from_millis(20);
/// Deadline of one call of the `rpc` client.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The scenarios this tier runs.
pub const SCENARIOS: [&str; 10] = [
    "converge",
    "idle",
    "crash",
    "leave",
    "partition",
    "loss",
    "freeze",
    "churn",
    "rolling-restart",
    "rpc",
];

/// Runs `options.scenario` with the real node code on turmoil hosts. `options.progress` is
/// ignored: nothing is printed.
pub fn run(options: &Options) -> Result<Report, String> {
    if !(MIN_NODES..=MAX_NODES).contains(&options.nodes) {
        return Err(format!(
            "the full-stack tier runs {MIN_NODES} to {MAX_NODES} nodes, not {}",
            options.nodes
        ));
    }
    if let Some(loss) = options.loss {
        if !(0.0..1.0).contains(&loss) {
            return Err(format!("loss must be in [0, 1), not {loss}"));
        }
    }
    if let Some(duration) = options.duration_s {
        if !(duration.is_finite() && duration > 0.0 && duration <= 86_400.0) {
            return Err(format!(
                "duration must be a positive number of seconds, not {duration}"
            ));
        }
    }
    match options.scenario.as_str() {
        "converge" => converge(options),
        "idle" => idle(options),
        "crash" => crash(options),
        "leave" => leave(options),
        "partition" => partition(options),
        "loss" => loss(options),
        "freeze" => freeze(options),
        "churn" => churn(options),
        "rolling-restart" => rolling_restart(options),
        "rpc" => rpc(options),
        other => Err(format!(
            "unknown scenario {other:?}; the full-stack tier runs {}",
            SCENARIOS.join(", ")
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Simultaneous start, then one registration spreading to every node.
fn converge(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    let joined = c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let owner = c.rng.below(n);
    let t0 = c.now();
    c.act(owner, Action::Register(web_service(&c.names[owner])));
    let mut informed: Vec<Option<Duration>> = vec![None; n];
    c.run_until(WAIT_LIMIT, TICK, |c| {
        for (i, slot) in informed.iter_mut().enumerate() {
            if slot.is_none()
                && c.node(i)
                    .is_some_and(|node| !node.catalog().lookup(WEB).is_empty())
            {
                *slot = Some(c.now() - t0);
            }
        }
        informed.iter().all(Option::is_some)
    })?;
    let mut delays: Vec<f64> = (0..n)
        .filter(|&i| i != owner)
        .filter_map(|i| informed[i].map(secs))
        .collect();
    delays.sort_by(f64::total_cmp);
    out.set("uninformed", (n - 1 - delays.len()) as f64);
    if !delays.is_empty() {
        out.set("disseminate_p50_s", percentile(&delays, 0.5));
        out.set("disseminate_p999_s", percentile(&delays, 0.999));
        out.set("disseminate_max_s", percentile(&delays, 1.0));
    }
    let mut all: Vec<f64> = informed.iter().flatten().map(|d| secs(*d)).collect();
    all.sort_by(f64::total_cmp);
    out.curve = all
        .iter()
        .enumerate()
        .map(|(k, t)| (*t, round3((k + 1) as f64 / n as f64)))
        .collect();

    let quiet = (joined + IDLE_START).saturating_sub(c.now());
    c.run_for(quiet)?;
    let before = c.traffic();
    let start = c.now();
    c.run_for(IDLE_WINDOW)?;
    let idle = c.traffic().minus(before);
    let window = secs(c.now() - start);
    out.set(
        "idle_bytes_per_node_per_s",
        idle.bytes() as f64 / n as f64 / window,
    );
    let (full, skipped) = idle.push_pulls();
    out.set("idle_push_pull_full", full);
    out.set("idle_push_pull_skipped", skipped);
    Ok(c.finish(out))
}

/// Simultaneous start, then nothing at all: every node's exchanges must keep to their
/// schedule (issue 18: an idle cluster once ran an exchange after every datagram). Counted
/// from the moment every node sees every other alive, so the join's own exchanges (first
/// contact, three follow-ups) are in the window and in the allowance.
fn idle(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    let window = Duration::from_secs_f64(options.duration_s.unwrap_or(30.0));
    let before = c.live_stats();
    c.run_for(window)?;
    let after = c.live_stats();
    let ticks = |interval: Duration| (window.as_secs_f64() / interval.as_secs_f64()).ceil() + 1.0;
    // One round per tick, one more at first contact.
    let allowed = ticks(PROFILE.sync_interval()) + 1.0;
    let mut max = 0.0f64;
    let mut over = 0.0;
    let (mut push_pulls, mut suppressed) = (0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        let rounds = ((a.sync_ok + a.sync_failed) - (b.sync_ok + b.sync_failed)) as f64;
        max = max.max(rounds);
        if rounds > allowed {
            over += 1.0;
        }
        push_pulls +=
            (a.push_pull_ok + a.push_pull_skipped) - (b.push_pull_ok + b.push_pull_skipped);
        suppressed += (a.sync_suppressed + a.push_pull_suppressed)
            - (b.sync_suppressed + b.push_pull_suppressed);
    }
    let bytes: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| Traffic::of(a).minus(Traffic::of(b)).bytes())
        .sum();
    out.set("anti_entropy_max_per_node", max);
    out.set("anti_entropy_allowed_per_node", allowed);
    out.set("nodes_over_schedule", over);
    // Both ends count a push-pull.
    out.set("push_pulls", (push_pulls / 2) as f64);
    // Per node: one per tick, a join push-pull, first contact and three follow-ups.
    let push_pulls_allowed = n as f64 * (ticks(PROFILE.push_pull_interval()) + 5.0);
    out.set("push_pulls_allowed", push_pulls_allowed);
    out.set("suppressed", suppressed as f64);
    out.set(
        "idle_bytes_per_node_per_s",
        bytes as f64 / n as f64 / window.as_secs_f64(),
    );
    Ok(c.finish(out))
}

/// One host crashes; every other node must declare it down.
fn crash(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let victim = c.rng.below(n);
    let t_crash = c.now();
    c.crash(victim);
    let victim_name = c.names[victim].clone();
    let mut detected: Vec<Option<Duration>> = vec![None; n];
    let mut suspected: Vec<Option<Duration>> = vec![None; n];
    let mut cursor = 0;
    c.run_until(WAIT_LIMIT, OBSERVE, |c| {
        for event in c.events_since(&mut cursor) {
            if event.subject != victim_name || event.t < t_crash {
                continue;
            }
            let at = Some(event.t - t_crash);
            match event.kind {
                Seen::Suspect => suspected[event.observer] = suspected[event.observer].or(at),
                Seen::Down | Seen::Left => {
                    suspected[event.observer] = suspected[event.observer].or(at);
                    detected[event.observer] = detected[event.observer].or(at);
                }
                _ => {}
            }
        }
        (0..n).all(|i| i == victim || detected[i].is_some())
    })?;
    let mut times: Vec<f64> = (0..n)
        .filter(|&i| i != victim)
        .filter_map(|i| detected[i].map(secs))
        .collect();
    times.sort_by(f64::total_cmp);
    let mut suspect_times: Vec<f64> = (0..n)
        .filter(|&i| i != victim)
        .filter_map(|i| suspected[i].map(secs))
        .collect();
    suspect_times.sort_by(f64::total_cmp);
    out.set("undetected", (n - 1 - times.len()) as f64);
    if !times.is_empty() {
        out.set("detect_p50_s", percentile(&times, 0.5));
        out.set("detect_max_s", percentile(&times, 1.0));
    }
    if !suspect_times.is_empty() {
        out.set("suspect_p50_s", percentile(&suspect_times, 0.5));
    }
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_crash, now, |_| true, |_| true).len() as f64,
    );
    out.detections = times;
    Ok(c.finish(out))
}

/// One node leaves gracefully; every other node must show it as left, never as down.
fn leave(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let victim = c.rng.below(n);
    let t_leave = c.now();
    c.act(victim, Action::Leave);
    c.mark_gone(victim);
    let victim_name = c.names[victim].clone();
    let mut left: Vec<Option<Duration>> = vec![None; n];
    c.run_until(WAIT_LIMIT, TICK, |c| {
        for (i, slot) in left.iter_mut().enumerate() {
            if i == victim || slot.is_some() {
                continue;
            }
            if c.sees(i, &victim_name, |m| m.status == MemberStatus::Left) {
                *slot = Some(c.now() - t_leave);
            }
        }
        (0..n).all(|i| i == victim || left[i].is_some())
    })?;
    c.run_for(TAIL)?;
    let mut times: Vec<f64> = left.iter().flatten().map(|d| secs(*d)).collect();
    times.sort_by(f64::total_cmp);
    out.set("not_left", (n - 1 - times.len()) as f64);
    if !times.is_empty() {
        out.set("left_p50_s", percentile(&times, 0.5));
        out.set("left_max_s", percentile(&times, 1.0));
    }
    let wrong: BTreeSet<usize> = c
        .events()
        .iter()
        .filter(|e| e.t >= t_leave && e.kind == Seen::Down && e.subject == victim_name)
        .map(|e| e.observer)
        .collect();
    out.set("wrong_downs", wrong.len() as f64);
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_leave, now, |_| true, |_| true).len() as f64,
    );
    out.detections = times;
    Ok(c.finish(out))
}

/// Two halves are cut apart, both sides write, then the network heals.
fn partition(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let length = options
        .duration_s
        .map_or(Duration::from_secs(30), Duration::from_secs_f64);
    let left: Vec<usize> = (0..n / 2).collect();
    let right: Vec<usize> = (n / 2..n).collect();
    let (a, b) = (left[0], right[0]);
    c.cut(&left, &right);
    let t_cut = c.now();
    c.run_for(length / 4)?;
    c.act(
        a,
        Action::Register(Service::new("alpha", "alpha-1", SERVICE_PORT)),
    );
    c.act(a, Action::Set("app/left".into(), "1".into()));
    c.act(a, Action::Set("app/shared".into(), "from-left".into()));
    c.act(
        b,
        Action::Register(Service::new("beta", "beta-1", SERVICE_PORT)),
    );
    c.act(b, Action::Set("app/right".into(), "1".into()));
    c.act(b, Action::Set("app/shared".into(), "from-right".into()));
    c.run_for(length - length / 4)?;
    // A last write on one side just before the heal must win everywhere.
    c.act(b, Action::Set("app/shared".into(), "last".into()));
    c.run_for(TICK * 2)?;
    c.heal(&left, &right);
    let t_heal = c.now();
    out.set("partition_s", secs(t_heal - t_cut));
    let mut membership_at = None;
    let converged = c.run_until(HEAL_LIMIT, OBSERVE, |c| {
        if !c.converged() {
            return false;
        }
        membership_at = membership_at.or(Some(c.now()));
        c.state_converged()
    })?;
    if let Some(at) = membership_at {
        out.set("membership_after_heal_s", secs(at - t_heal));
    }
    out.set(
        "converged_after_heal_s",
        secs(converged.unwrap_or(c.now()) - t_heal),
    );
    out.set("converged", flag(converged.is_some()));
    let shared_ok = (0..n).all(|i| {
        c.node(i).is_none_or(|node| {
            node.config()
                .get_str("app/shared")
                .ok()
                .flatten()
                .as_deref()
                == Some("last")
        })
    });
    out.set("last_write_won", flag(shared_ok));
    Ok(c.finish(out))
}

/// Packet loss for a while; healthy nodes must never be declared down.
fn loss(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let mut out = Figures::default();
    c.join(&mut out)?;
    let generations = c.generations();
    c.run_for(SETTLE)?;
    let rate = options.loss.unwrap_or(0.05);
    let length = options
        .duration_s
        .map_or(Duration::from_secs(120), Duration::from_secs_f64);
    c.set_loss(rate);
    let t_start = c.now();
    c.run_for(length)?;
    c.set_loss(0.0);
    let t_stop = c.now();
    out.set("loss_s", secs(t_stop - t_start));
    let recovered = c.run_until(WAIT_LIMIT, OBSERVE, Cluster::converged)?;
    out.set("converged", flag(recovered.is_some()));
    out.set(
        "converged_after_s",
        secs(recovered.unwrap_or(c.now()) - t_stop),
    );
    let events = c.events();
    let count = |kind: Seen| {
        events
            .iter()
            .filter(|e| e.t >= t_start && e.kind == kind)
            .count() as f64
    };
    out.set("down_events", count(Seen::Down));
    out.set("suspect_events", count(Seen::Suspect));
    let renewals: u64 = c
        .generations()
        .iter()
        .zip(&generations)
        .map(|(now, then)| now.saturating_sub(*then))
        .sum();
    out.set("renewals", renewals as f64);
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_start, now, |_| true, |_| true).len() as f64,
    );
    Ok(c.finish(out))
}

/// One node's links are held (a long pause: GC, VM migration) and then released.
fn freeze(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let victim = c.rng.below(n);
    let victim_name = c.names[victim].clone();
    let victim_generation = c.generations()[victim];
    let others: Vec<usize> = (0..n).filter(|&i| i != victim).collect();
    let hold = PROFILE.foca_config(n).suspect_to_down_after * 2;
    c.hold(victim, &others);
    let t_hold = c.now();
    c.run_for(hold)?;
    c.release(victim, &others);
    let t_release = c.now();
    out.set("hold_s", secs(t_release - t_hold));
    let recovered = c.run_until(WAIT_LIMIT, OBSERVE, Cluster::converged)?;
    out.set("converged", flag(recovered.is_some()));
    out.set(
        "recovered_s",
        secs(recovered.unwrap_or(c.now()) - t_release),
    );
    c.run_for(TAIL)?;
    let events = c.events();
    let about_victim = |kinds: &[Seen]| -> BTreeSet<usize> {
        events
            .iter()
            .filter(|e| {
                e.t >= t_hold
                    && e.observer != victim
                    && e.subject == victim_name
                    && kinds.contains(&e.kind)
            })
            .map(|e| e.observer)
            .collect()
    };
    out.set(
        "suspected",
        flag(!about_victim(&[Seen::Suspect, Seen::Down]).is_empty()),
    );
    out.set("victim_down_by", about_victim(&[Seen::Down]).len() as f64);
    out.set(
        "victim_renewals",
        c.generations()[victim].saturating_sub(victim_generation) as f64,
    );
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_hold, now, |o| o != victim, |s| s != victim)
            .len() as f64,
    );
    out.set(
        "frozen_view_downs",
        c.false_positives(t_hold, now, |o| o == victim, |s| s != victim)
            .len() as f64,
    );
    Ok(c.finish(out))
}

/// Random nodes crash and come back with a higher generation, again and again.
fn churn(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan::default());
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    c.run_for(SETTLE)?;
    let length = options
        .duration_s
        .map_or(Duration::from_secs(60), Duration::from_secs_f64);
    let max_down = (n / 10).max(1);
    let interval = Duration::from_secs(2);
    let t_start = c.now();
    let t_end = t_start + length;
    let mut down: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut restarts = 0usize;
    let mut next_crash = t_start;
    while c.now() < t_end {
        let now = c.now();
        let due: Vec<usize> = down
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            down.remove(&i);
            c.bounce(i);
            restarts += 1;
        }
        if now >= next_crash {
            next_crash = now + interval;
            if down.len() < max_down {
                let candidates: Vec<usize> = (0..n).filter(|i| !down.contains_key(i)).collect();
                let victim = candidates[c.rng.below(candidates.len())];
                let downtime = Duration::from_millis(1000 + c.rng.below(4000) as u64);
                c.crash(victim);
                down.insert(victim, now + downtime);
            }
        }
        c.step()?;
    }
    for i in down.into_keys() {
        c.bounce(i);
        restarts += 1;
    }
    let t_stop = c.now();
    out.set("churn_s", secs(t_stop - t_start));
    out.set("restarts", restarts as f64);
    out.set("max_down", max_down as f64);
    let converged = c.run_until(WAIT_LIMIT, OBSERVE, Cluster::converged)?;
    out.set("converged", flag(converged.is_some()));
    out.set(
        "converged_after_s",
        secs(converged.unwrap_or(c.now()) - t_stop),
    );
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_start, now, |_| true, |_| true).len() as f64,
    );
    Ok(c.finish(out))
}

/// Every node restarts, one at a time, each waiting for the previous one to be back.
fn rolling_restart(options: &Options) -> Result<Report, String> {
    let mut c = Cluster::new(options, |_| Plan {
        register_web: true,
        serve_echo: false,
    });
    let n = c.n();
    let mut out = Figures::default();
    c.join(&mut out)?;
    let full = c.run_until(WAIT_LIMIT, OBSERVE, |c| {
        (0..n).all(|i| {
            c.node(i)
                .is_some_and(|node| node.catalog().lookup(WEB).len() == n)
        })
    })?;
    if full.is_none() {
        return Err(format!(
            "the catalogs did not list all {n} instances within {WAIT_LIMIT:?}"
        ));
    }
    c.run_for(SETTLE)?;
    let t_start = c.now();
    let downtime = Duration::from_secs(1);
    let mut unavailable: Vec<f64> = Vec::new();
    let mut max_gap = Duration::ZERO;
    let mut not_back = 0usize;
    for victim in 0..n {
        let t_crash = c.now();
        c.crash(victim);
        // Gaps: (observer, owner) → when the owner's instance went missing from its lookup.
        let mut gaps: BTreeMap<(usize, usize), Duration> = BTreeMap::new();
        let mut track = |c: &Cluster| {
            let now = c.now();
            for observer in (0..n).filter(|&o| o != victim) {
                let Some(node) = c.node(observer) else {
                    continue;
                };
                let owners: BTreeSet<String> = node
                    .catalog()
                    .lookup(WEB)
                    .into_iter()
                    .map(|i| i.node)
                    .collect();
                for owner in (0..n).filter(|&o| o != observer) {
                    if owners.contains(&c.names[owner]) {
                        if let Some(since) = gaps.remove(&(observer, owner)) {
                            max_gap = max_gap.max(now - since);
                        }
                    } else {
                        gaps.entry((observer, owner)).or_insert(now);
                    }
                }
            }
        };
        c.run_until(downtime, OBSERVE, |c| {
            track(c);
            false
        })?;
        c.bounce(victim);
        let victim_name = c.names[victim].clone();
        let back = c.run_until(WAIT_LIMIT, OBSERVE, |c| {
            track(c);
            let Some(node) = c.node(victim) else {
                return false;
            };
            let generation = node.identity().generation;
            (0..n).filter(|&o| o != victim).all(|o| {
                c.sees(o, &victim_name, |m| {
                    m.status == MemberStatus::Alive && m.generation == generation
                }) && c.node(o).is_some_and(|node| {
                    node.catalog()
                        .lookup(WEB)
                        .iter()
                        .any(|i| i.node == victim_name)
                })
            })
        })?;
        let now = c.now();
        for since in gaps.values() {
            max_gap = max_gap.max(now - *since);
        }
        match back {
            Some(at) => unavailable.push(secs(at - t_crash)),
            None => not_back += 1,
        }
        c.run_for(RESTART_GAP)?;
    }
    out.set("restarts", n as f64);
    out.set("not_back", not_back as f64);
    unavailable.sort_by(f64::total_cmp);
    if !unavailable.is_empty() {
        out.set("max_unavailable_s", percentile(&unavailable, 1.0));
        out.set(
            "mean_unavailable_s",
            unavailable.iter().sum::<f64>() / unavailable.len() as f64,
        );
    }
    out.set("max_lookup_gap_s", secs(max_gap));
    let converged = c.run_until(WAIT_LIMIT, OBSERVE, Cluster::converged)?;
    out.set("converged", flag(converged.is_some()));
    let now = c.now();
    out.set(
        "false_positives",
        c.false_positives(t_start, now, |_| true, |_| true).len() as f64,
    );
    Ok(c.finish(out))
}

/// A client calls a replicated service continuously while its instances crash and restart.
fn rpc(options: &Options) -> Result<Report, String> {
    let n = options.nodes;
    let servers: Vec<usize> = (1..=(n / 3).clamp(2, 5).min(n - 1)).collect();
    let serving = servers.clone();
    let mut c = Cluster::new(options, |i| Plan {
        register_web: false,
        serve_echo: serving.contains(&i),
    });
    let mut out = Figures::default();
    c.join(&mut out)?;
    let client = 0;
    let ready = c.run_until(WAIT_LIMIT, OBSERVE, |c| {
        c.node(client)
            .is_some_and(|node| node.catalog().lookup(ECHO).len() == servers.len())
    })?;
    if ready.is_none() {
        return Err(format!(
            "the client never saw the {} instances of {ECHO}",
            servers.len()
        ));
    }
    c.run_for(SETTLE)?;
    let length = options
        .duration_s
        .map_or(Duration::from_secs(60), Duration::from_secs_f64);
    c.act(client, Action::CallLoop);
    let t_start = c.now();
    let t_end = t_start + length;
    let crash_every = Duration::from_secs(10);
    let downtime = Duration::from_secs(5);
    let mut next_crash = t_start + crash_every / 2;
    let mut turn = 0usize;
    let mut down: Option<(usize, Duration)> = None;
    let mut crashes = 0usize;
    while c.now() < t_end {
        let now = c.now();
        if let Some((server, until)) = down {
            if now >= until {
                c.bounce(server);
                down = None;
            }
        }
        if now >= next_crash && down.is_none() {
            let server = servers[turn % servers.len()];
            turn += 1;
            c.crash(server);
            crashes += 1;
            down = Some((server, now + downtime));
            next_crash = now + crash_every;
        }
        c.step()?;
    }
    let calls: Vec<CallRecord> = lock(&c.record)
        .calls
        .iter()
        .filter(|call| call.start >= t_start && call.end <= t_end)
        .cloned()
        .collect();
    let ok = calls.iter().filter(|call| call.ok).count();
    let failed = calls.len() - ok;
    out.set("servers", servers.len() as f64);
    out.set("crashes", crashes as f64);
    out.set("calls_ok", ok as f64);
    out.set("calls_failed", failed as f64);
    out.set(
        "availability",
        if calls.is_empty() {
            0.0
        } else {
            ok as f64 / calls.len() as f64
        },
    );
    let mut latencies: Vec<f64> = calls
        .iter()
        .filter(|call| call.ok)
        .map(|call| (call.end - call.start).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    if !latencies.is_empty() {
        out.set("call_p50_ms", percentile(&latencies, 0.5));
        out.set("call_p99_ms", percentile(&latencies, 0.99));
    }
    // The slowest call, failed ones included: how long a caller can be stuck.
    if let Some(slowest) = calls.iter().map(|call| call.end - call.start).max() {
        out.set("call_max_ms", slowest.as_secs_f64() * 1000.0);
    }
    Ok(c.finish(out))
}

// ---------------------------------------------------------------------------------------
// The simulated cluster
// ---------------------------------------------------------------------------------------

/// What a host runs besides its node.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// Registers an instance of [`WEB`] at every start.
    register_web: bool,
    /// Serves the [`ECHO`] RPC service at every start.
    serve_echo: bool,
}

/// A request from the driver loop to a host.
#[derive(Debug)]
enum Action {
    Register(Service),
    Set(String, String),
    Leave,
    CallLoop,
}

/// Member events, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Joined,
    Suspect,
    Down,
    Left,
    Updated,
}

#[derive(Debug, Clone)]
struct EventRecord {
    /// Simulated time of the event.
    t: Duration,
    /// Index of the node that saw it.
    observer: usize,
    kind: Seen,
    subject: String,
    generation: u64,
}

/// One incarnation of a node: from its start to its crash or leave.
#[derive(Debug, Clone)]
struct Life {
    host: usize,
    generation: u64,
    start: Duration,
    end: Option<Duration>,
}

#[derive(Debug, Clone)]
struct CallRecord {
    start: Duration,
    end: Duration,
    ok: bool,
}

/// Traffic a node sent, and how its push-pulls went.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    udp_bytes: u64,
    udp_packets: u64,
    tcp_bytes: u64,
    /// Member lists applied: both sides of a push-pull that shipped them count one each.
    push_pull_applied: u64,
    /// Fingerprint checks that found the views equal: both sides count one each.
    push_pull_skipped: u64,
}

impl Traffic {
    fn of(stats: &StatsSnapshot) -> Self {
        Traffic {
            udp_bytes: stats.udp_sent_bytes,
            udp_packets: stats.udp_sent,
            tcp_bytes: stats.tcp_bytes,
            push_pull_applied: stats.push_pull_ok,
            push_pull_skipped: stats.push_pull_skipped,
        }
    }

    fn add(&mut self, other: Traffic) {
        self.udp_bytes += other.udp_bytes;
        self.udp_packets += other.udp_packets;
        self.tcp_bytes += other.tcp_bytes;
        self.push_pull_applied += other.push_pull_applied;
        self.push_pull_skipped += other.push_pull_skipped;
    }

    fn minus(self, other: Traffic) -> Traffic {
        Traffic {
            udp_bytes: self.udp_bytes.saturating_sub(other.udp_bytes),
            udp_packets: self.udp_packets.saturating_sub(other.udp_packets),
            tcp_bytes: self.tcp_bytes.saturating_sub(other.tcp_bytes),
            push_pull_applied: self
                .push_pull_applied
                .saturating_sub(other.push_pull_applied),
            push_pull_skipped: self
                .push_pull_skipped
                .saturating_sub(other.push_pull_skipped),
        }
    }

    /// Push-pull exchanges that shipped member lists, and those the fingerprints skipped
    /// (each exchange once, as the core tier counts them).
    fn push_pulls(self) -> (f64, f64) {
        (
            (self.push_pull_applied / 2) as f64,
            (self.push_pull_skipped / 2) as f64,
        )
    }

    /// Bytes sent: datagrams, plus half the TCP bytes (each node counts both directions).
    fn bytes(self) -> u64 {
        self.udp_bytes + self.tcp_bytes / 2
    }
}

/// What the driver loop knows of one host.
#[derive(Default)]
struct HostSlot {
    /// The node of the current (or last) incarnation.
    node: Option<Arc<Node>>,
    /// Whether that node is running (started and neither crashed nor gone).
    live: bool,
    actions: Option<mpsc::UnboundedSender<Action>>,
    /// Traffic of the previous incarnations.
    past: Traffic,
    /// Lifetime events lagged by the recorder of the previous incarnations.
    past_lagged: u64,
}

/// Everything hosts record, shared with the driver loop. The simulation runs on one thread,
/// in a fixed host order, so what is appended here is in a deterministic order.
#[derive(Default)]
struct Record {
    hosts: Vec<HostSlot>,
    events: Vec<EventRecord>,
    lives: Vec<Life>,
    calls: Vec<CallRecord>,
}

type Shared = Arc<Mutex<Record>>;

fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Simulated time, from inside a host.
fn sim_now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The nodes' wall clock: the fixed epoch plus simulated time.
fn wall_clock() -> u64 {
    turmoil::since_epoch().map_or(EPOCH_S * 1000, |d| d.as_millis() as u64)
}

/// Named figures and plot data of a run.
#[derive(Default)]
struct Figures {
    figures: BTreeMap<String, f64>,
    curve: Vec<(f64, f64)>,
    detections: Vec<f64>,
}

impl Figures {
    fn set(&mut self, name: &str, value: f64) {
        self.figures.insert(name.to_string(), round3(value));
    }
}

/// The cluster under simulation, driven step by step.
struct Cluster {
    sim: turmoil::Sim<'static>,
    names: Vec<String>,
    ips: Vec<IpAddr>,
    record: Shared,
    /// Whether each host should be running (not crashed, not gone).
    up: Vec<bool>,
    rng: SplitMix,
    options: Options,
    loss: f64,
}

impl Cluster {
    fn new(options: &Options, plan: impl Fn(usize) -> Plan) -> Cluster {
        let n = options.nodes;
        let mut builder = turmoil::Builder::new();
        builder
            .simulation_duration(Duration::from_secs(1_000_000))
            .tick_duration(TICK)
            .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(20))
            .udp_capacity(1024)
            .tcp_capacity(1024)
            .rng_seed(options.seed);
        let mut sim = builder.build();
        let names: Vec<String> = (0..n).map(|i| format!("node-{i:03}")).collect();
        let ips: Vec<IpAddr> = names.iter().map(|name| sim.lookup(name.as_str())).collect();
        let record: Shared = Arc::new(Mutex::new(Record {
            hosts: (0..n).map(|_| HostSlot::default()).collect(),
            ..Record::default()
        }));
        let shared_names = Arc::new(names.clone());
        let shared_ips = Arc::new(ips.clone());
        for (index, name) in names.iter().enumerate() {
            let host = HostSpec {
                index,
                names: shared_names.clone(),
                ips: shared_ips.clone(),
                plan: plan(index),
                seed: options.seed,
                record: record.clone(),
            };
            sim.host(name.as_str(), move || host.clone().run());
        }
        Cluster {
            sim,
            names,
            ips,
            record,
            up: vec![true; n],
            rng: SplitMix(options.seed ^ 0x6a09_e667_f3bc_c908),
            options: options.clone(),
            loss: 0.0,
        }
    }

    fn n(&self) -> usize {
        self.names.len()
    }

    fn now(&self) -> Duration {
        self.sim.elapsed()
    }

    fn step(&mut self) -> Result<(), String> {
        self.sim
            .step()
            .map(drop)
            .map_err(|error| format!("simulation failed: {error}"))
    }

    fn run_for(&mut self, length: Duration) -> Result<(), String> {
        let until = self.now() + length;
        while self.now() < until {
            self.step()?;
        }
        Ok(())
    }

    /// Steps until `done` holds (checked every `every`), at most `limit` from now; returns
    /// when it first held.
    fn run_until(
        &mut self,
        limit: Duration,
        every: Duration,
        mut done: impl FnMut(&Cluster) -> bool,
    ) -> Result<Option<Duration>, String> {
        let deadline = self.now() + limit;
        loop {
            if done(self) {
                return Ok(Some(self.now()));
            }
            if self.now() >= deadline {
                return Ok(None);
            }
            let next = self.now() + every;
            while self.now() < next {
                self.step()?;
            }
        }
    }

    /// Waits for the initial convergence and records `join_s`; then applies the loss the
    /// options ask for.
    fn join(&mut self, out: &mut Figures) -> Result<Duration, String> {
        let joined = self.run_until(JOIN_LIMIT, TICK, Cluster::converged)?;
        let Some(at) = joined else {
            return Err(format!(
                "{} nodes did not converge within {JOIN_LIMIT:?}",
                self.n()
            ));
        };
        out.set("join_s", secs(at));
        if self.options.scenario != "loss" {
            if let Some(loss) = self.options.loss {
                self.set_loss(loss);
            }
        }
        Ok(at)
    }

    fn set_loss(&mut self, loss: f64) {
        self.sim.set_fail_rate(loss);
        self.loss = self.loss.max(loss);
    }

    /// The running node of host `i`.
    fn node(&self, i: usize) -> Option<Arc<Node>> {
        if !self.up[i] {
            return None;
        }
        let record = lock(&self.record);
        let slot = &record.hosts[i];
        slot.node.clone().filter(|_| slot.live)
    }

    fn act(&self, i: usize, action: Action) {
        if let Some(actions) = &lock(&self.record).hosts[i].actions {
            let _ = actions.send(action);
        }
    }

    /// Whether node `observer` lists `name` in a state that satisfies `check`.
    fn sees(
        &self,
        observer: usize,
        name: &str,
        check: impl Fn(&grapevine::Member) -> bool,
    ) -> bool {
        self.node(observer).is_some_and(|node| {
            let members = node.members();
            members
                .binary_search_by(|m| m.name.as_str().cmp(name))
                .is_ok_and(|at| check(&members[at]))
        })
    }

    /// Stops a host without warning: turmoil drops its runtime, sockets and tasks.
    fn crash(&mut self, i: usize) {
        self.sim.crash(self.ips[i]);
        self.mark_gone(i);
    }

    /// Records that host `i` stopped running (crashed or left).
    fn mark_gone(&mut self, i: usize) {
        self.up[i] = false;
        let now = self.now();
        let mut record = lock(&self.record);
        record.hosts[i].live = false;
        record.hosts[i].actions = None;
        if let Some(life) = record
            .lives
            .iter_mut()
            .rev()
            .find(|l| l.host == i && l.end.is_none())
        {
            life.end = Some(now);
        }
    }

    /// Restarts a crashed host: its node starts again, same name, higher generation.
    fn bounce(&mut self, i: usize) {
        self.sim.bounce(self.ips[i]);
        self.up[i] = true;
    }

    fn cut(&self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.sim.partition(self.ips[a], self.ips[b]);
            }
        }
    }

    fn heal(&self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.sim.repair(self.ips[a], self.ips[b]);
            }
        }
    }

    fn hold(&self, victim: usize, others: &[usize]) {
        for &b in others {
            self.sim.hold(self.ips[victim], self.ips[b]);
        }
    }

    fn release(&self, victim: usize, others: &[usize]) {
        for &b in others {
            self.sim.release(self.ips[victim], self.ips[b]);
        }
    }

    /// Every running node sees every running node alive, at its current generation.
    fn converged(&self) -> bool {
        let nodes: Vec<(usize, Arc<Node>)> = (0..self.n())
            .filter(|&i| self.up[i])
            .map(|i| self.node(i).map(|node| (i, node)))
            .collect::<Option<_>>()
            .unwrap_or_default();
        if nodes.len() != self.up.iter().filter(|u| **u).count() {
            return false;
        }
        let expected: Vec<(&str, u64)> = nodes
            .iter()
            .map(|(i, node)| (self.names[*i].as_str(), node.identity().generation))
            .collect();
        nodes.iter().all(|(_, node)| {
            let members = node.members();
            expected.iter().all(|(name, generation)| {
                members
                    .binary_search_by(|m| m.name.as_str().cmp(name))
                    .is_ok_and(|at| {
                        members[at].status == MemberStatus::Alive
                            && members[at].generation == *generation
                    })
            })
        })
    }

    /// Every running node holds the same catalog (instances of live nodes) and config.
    fn state_converged(&self) -> bool {
        type Catalog = Vec<(String, String, String, Health)>;
        type Config = Vec<(String, Vec<u8>)>;
        let mut first: Option<(Catalog, Config)> = None;
        for i in (0..self.n()).filter(|&i| self.up[i]) {
            let Some(node) = self.node(i) else {
                return false;
            };
            let mut catalog: Catalog = node
                .catalog()
                .all_instances()
                .into_iter()
                .filter(|i| i.node_status.is_active())
                .map(|i| (i.service, i.id, i.node, i.health))
                .collect();
            catalog.sort();
            let config = node.config().list("");
            match &first {
                None => first = Some((catalog, config)),
                Some((c, k)) => {
                    if *c != catalog || *k != config {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The identity generation of every host's current (or last) node.
    fn generations(&self) -> Vec<u64> {
        lock(&self.record)
            .hosts
            .iter()
            .map(|slot| {
                slot.node
                    .as_ref()
                    .map_or(0, |node| node.identity().generation)
            })
            .collect()
    }

    fn events(&self) -> Vec<EventRecord> {
        lock(&self.record).events.clone()
    }

    /// Events recorded since `cursor`, which moves past them.
    fn events_since(&self, cursor: &mut usize) -> Vec<EventRecord> {
        let record = lock(&self.record);
        let new = record.events[*cursor..].to_vec();
        *cursor = record.events.len();
        new
    }

    /// Hosts whose running incarnation some node declared down between `from` and `to`,
    /// counting only observers and subjects the filters keep.
    fn false_positives(
        &self,
        from: Duration,
        to: Duration,
        observer: impl Fn(usize) -> bool,
        subject: impl Fn(usize) -> bool,
    ) -> BTreeSet<usize> {
        let index: BTreeMap<&str, usize> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.as_str(), i))
            .collect();
        let record = lock(&self.record);
        let mut out = BTreeSet::new();
        for event in &record.events {
            if event.kind != Seen::Down
                || event.t < from
                || event.t > to
                || !observer(event.observer)
            {
                continue;
            }
            let Some(&s) = index.get(event.subject.as_str()) else {
                continue;
            };
            if !subject(s) {
                continue;
            }
            let running = record.lives.iter().any(|life| {
                life.host == s
                    && life.start <= event.t
                    && life.end.is_none_or(|end| event.t < end)
                    && event.generation >= life.generation
            });
            if running {
                out.insert(s);
            }
        }
        out
    }

    /// Traffic sent by every incarnation of every node so far.
    fn traffic(&self) -> Traffic {
        let record = lock(&self.record);
        let mut total = Traffic::default();
        for slot in &record.hosts {
            total.add(slot.past);
            if let Some(node) = &slot.node {
                total.add(Traffic::of(&node.stats()));
            }
        }
        total
    }

    /// The counters of every host's current node, in host order.
    fn live_stats(&self) -> Vec<StatsSnapshot> {
        let record = lock(&self.record);
        record
            .hosts
            .iter()
            .map(|slot| slot.node.as_ref().map(|n| n.stats()).unwrap_or_default())
            .collect()
    }

    fn lagged(&self) -> u64 {
        let record = lock(&self.record);
        record
            .hosts
            .iter()
            .map(|slot| {
                slot.past_lagged + slot.node.as_ref().map_or(0, |n| n.stats().events_lagged)
            })
            .sum()
    }

    /// The report: the scenario's figures plus traffic rates over the whole run.
    fn finish(self, mut out: Figures) -> Report {
        let n = self.n() as f64;
        let elapsed = secs(self.now());
        let traffic = self.traffic();
        out.set("bytes_per_node_per_s", traffic.bytes() as f64 / n / elapsed);
        out.set(
            "packets_per_node_per_s",
            traffic.udp_packets as f64 / n / elapsed,
        );
        let (full, skipped) = traffic.push_pulls();
        out.set("push_pull_full", full);
        out.set("push_pull_skipped", skipped);
        let lagged = self.lagged();
        if lagged > 0 {
            out.set("events_lagged", lagged as f64);
        }
        let report = Report {
            scenario: self.options.scenario.clone(),
            engine: Engine::Full,
            nodes: self.n(),
            seed: self.options.seed,
            loss: self.loss,
            simulated_s: elapsed,
            figures: out.figures,
            dissemination_curve: out.curve,
            detection_times: out.detections,
        };
        // Nodes hold no turmoil resource outside their (already dropped or still running)
        // runtimes; drop the simulation first, then the records.
        drop(self.sim);
        report
    }
}

/// What one host runs, cloned for every (re)start.
#[derive(Clone)]
struct HostSpec {
    index: usize,
    names: Arc<Vec<String>>,
    ips: Arc<Vec<IpAddr>>,
    plan: Plan,
    seed: u64,
    record: Shared,
}

impl HostSpec {
    async fn run(self) -> turmoil::Result {
        let index = self.index;
        let name = self.names[index].clone();
        // A restarted node comes back newer than anything its previous life announced.
        let generation = lock(&self.record).hosts[index]
            .node
            .as_ref()
            .map_or(1, |old| old.identity().generation + 1);
        let seeds: Vec<SocketAddr> = (0..self.names.len().min(SEEDS))
            .filter(|&s| s != index)
            .map(|s| SocketAddr::new(self.ips[s], PORT))
            .collect();
        let node = Node::builder(name.clone())
            .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT))
            .advertise(SocketAddr::new(self.ips[index], PORT))
            .seeds(seeds)
            .profile(PROFILE)
            .generation(generation)
            .rng_seed(mix(self.seed, index as u64, generation))
            .wall_clock(wall_clock)
            .start_on(TurmoilTransport)
            .await?;
        let node = Arc::new(node);
        let events = node.events();
        let (actions, mut inbox) = mpsc::unbounded_channel();
        let previous = {
            let mut record = lock(&self.record);
            let start = sim_now();
            record.lives.push(Life {
                host: index,
                generation,
                start,
                end: None,
            });
            let slot = &mut record.hosts[index];
            let previous = slot.node.replace(node.clone());
            if let Some(old) = &previous {
                let stats = old.stats();
                slot.past.add(Traffic::of(&stats));
                slot.past_lagged += stats.events_lagged;
            }
            slot.live = true;
            slot.actions = Some(actions);
            previous
        };
        drop(previous);
        tokio::spawn(record_events(index, events, self.record.clone()));
        if self.plan.register_web {
            node.register(web_service(&name)).await?;
        }
        if self.plan.serve_echo {
            node.serve(echo_service()).await?;
        }
        while let Some(action) = inbox.recv().await {
            match action {
                Action::Register(service) => {
                    node.register(service).await?;
                }
                Action::Set(key, value) => {
                    node.config().set_str(&key, &value).await?;
                }
                Action::Leave => node.leave().await?,
                Action::CallLoop => {
                    tokio::spawn(call_loop(node.clone(), self.record.clone()));
                }
            }
        }
        // The driver loop dropped this incarnation's sender: it is gone; idle until the
        // host is crashed or the simulation ends.
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Appends every member event node `observer` sees to the shared log.
async fn record_events(observer: usize, mut events: MemberEvents, record: Shared) {
    while let Some(event) = events.next().await {
        let kind = match &event {
            MemberEvent::Joined(_) => Seen::Joined,
            MemberEvent::Suspect(_) => Seen::Suspect,
            MemberEvent::Down(_) => Seen::Down,
            MemberEvent::Left(_) => Seen::Left,
            MemberEvent::Updated(_) => Seen::Updated,
        };
        let member = event.member();
        let entry = EventRecord {
            t: sim_now(),
            observer,
            kind,
            subject: member.name.clone(),
            generation: member.generation,
        };
        lock(&record).events.push(entry);
    }
}

/// Calls `echo` on the service's instances back to back, recording each outcome.
async fn call_loop(node: Arc<Node>, record: Shared) {
    let client = node.client(ECHO).idempotent(true).timeout(CALL_TIMEOUT);
    let mut sequence = 0u64;
    loop {
        sequence += 1;
        let start = sim_now();
        let answer = client.call::<u64, u64>("echo", &sequence).await;
        let ok = matches!(answer, Ok(echoed) if echoed == sequence);
        let end = sim_now();
        lock(&record).calls.push(CallRecord { start, end, ok });
        tokio::time::sleep(CALL_PERIOD).await;
    }
}

fn web_service(node: &str) -> Service {
    Service::new(WEB, format!("{WEB}-{node}"), SERVICE_PORT)
}

fn echo_service() -> RpcService {
    RpcService::new(ECHO).method("echo", |x: u64| async move { Ok::<u64, AppError>(x) })
}

// ---------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------

/// Seconds, rounded to the millisecond.
fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Nearest-rank percentile of sorted, non-empty `values` (`q` in (0, 1]).
fn percentile(values: &[f64], q: f64) -> f64 {
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// splitmix64: the scenarios' own seeded choices (victims, downtimes).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// A node's RNG seed from the run's seed, its index and its generation.
fn mix(seed: u64, index: u64, generation: u64) -> u64 {
    let mut rng =
        SplitMix(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(32));
    rng.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(scenario: &str, nodes: usize, seed: u64) -> Options {
        Options {
            scenario: scenario.to_string(),
            nodes,
            seed,
            loss: None,
            duration_s: None,
            progress: false,
        }
    }

    fn figure(report: &Report, name: &str) -> f64 {
        *report
            .figures
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", report.figures))
    }

    #[test]
    fn full_converge_10_nodes() {
        let report = run(&options("converge", 10, 1)).expect("converge runs");
        assert!(figure(&report, "join_s") <= 10.0, "{:?}", report.figures);
        assert_eq!(figure(&report, "uninformed"), 0.0);
        assert!(
            figure(&report, "disseminate_max_s") <= 5.0,
            "{:?}",
            report.figures
        );
        assert!(figure(&report, "bytes_per_node_per_s") > 0.0);
        assert_eq!(report.dissemination_curve.last().map(|p| p.1), Some(1.0));
        let again = run(&options("converge", 10, 1)).expect("converge runs");
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            serde_json::to_string(&again).unwrap()
        );
    }

    #[test]
    fn full_crash_10_nodes() {
        let report = run(&options("crash", 10, 2)).expect("crash runs");
        assert_eq!(figure(&report, "undetected"), 0.0, "{:?}", report.figures);
        assert!(
            figure(&report, "detect_max_s") <= 15.0,
            "{:?}",
            report.figures
        );
        assert_eq!(figure(&report, "false_positives"), 0.0);
        assert_eq!(report.detection_times.len(), 9);
        let again = run(&options("crash", 10, 2)).expect("crash runs");
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            serde_json::to_string(&again).unwrap()
        );
    }

    #[test]
    fn full_rejects_bad_options() {
        assert!(run(&options("nope", 10, 1)).is_err());
        assert!(run(&options("converge", 1, 1)).is_err());
    }
}
