//! The scenarios of the core tier and the figures they report.
//!
//! Every scenario first gets a cluster ready (a simulated join through three seeds, or a
//! cluster formed at time zero), then runs its measured phase of `--duration` simulated
//! seconds (default per scenario). Traffic figures cover the measured phase only.

use std::collections::{BTreeMap, BTreeSet};

use grapevine::membership::Profile;
use indicatif::{ProgressBar, ProgressStyle};

use super::engine::{secs, Nanos, Params, Sim, Traffic, Watch, MS, SEC};
use super::{CoreOptions, Wrapper};
use crate::report::{Engine, Options, Report};

/// Names of the scenarios the core tier runs.
pub const SCENARIOS: &[&str] = &[
    "converge",
    "crash",
    "leave",
    "partition",
    "loss",
    "freeze",
    "churn",
    "rolling-restart",
];

/// Longest a simulated join may take before the scenario goes on regardless.
const JOIN_DEADLINE: Nanos = 120 * SEC;
/// Nodes start at random moments within this span when the join is simulated.
const START_SPREAD: Nanos = SEC;
/// How long a frozen node stays paused.
const FREEZE_FOR: Nanos = 3 * SEC;
/// How often the convergence check runs.
const CHECK_EVERY: Nanos = 250 * MS;

fn default_duration(scenario: &str) -> f64 {
    match scenario {
        "converge" | "crash" => 60.0,
        "leave" => 30.0,
        "loss" => 600.0,
        "partition" => 90.0,
        _ => 120.0,
    }
}

fn default_loss(scenario: &str) -> f64 {
    if scenario == "loss" {
        0.05
    } else {
        0.0
    }
}

/// Runs `options.scenario`.
pub fn run(options: &Options, core: &CoreOptions) -> Result<Report, String> {
    let scenario = options.scenario.as_str();
    if scenario == "rpc" {
        return Err(
            "the rpc scenario measures the real TCP stack: run it with --engine full".into(),
        );
    }
    if !SCENARIOS.contains(&scenario) {
        return Err(format!(
            "unknown scenario {scenario:?}; the core engine runs {}",
            SCENARIOS.join(", ")
        ));
    }
    if options.nodes < 2 {
        return Err("a scenario needs at least 2 nodes".into());
    }
    if options.nodes > 65_000 {
        return Err("the core engine addresses at most 65,000 nodes".into());
    }
    let loss = options.loss.unwrap_or_else(|| default_loss(scenario));
    if !(0.0..1.0).contains(&loss) {
        return Err(format!("loss must be in [0, 1), got {loss}"));
    }
    let duration = options
        .duration_s
        .unwrap_or_else(|| default_duration(scenario));
    if !(duration.is_finite() && duration > 0.0) {
        return Err(format!("duration must be positive, got {duration}"));
    }
    let wrapper = core.wrapper_for(options.nodes);
    let formed = core.formed_for(options.nodes);
    let threads = match core.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let params = Params {
        nodes: options.nodes,
        seed: options.seed,
        loss,
        wrapper,
        profile: Profile::Lan,
        latency: (500_000, 2_000_000),
        seeds: 3,
        threads,
    };
    let mut run = Run::new(params, formed, (duration * SEC as f64) as Nanos, options);
    let mut figures = BTreeMap::new();
    run.setup(&mut figures);
    match scenario {
        "converge" => run.converge(&mut figures),
        "crash" => run.crash(&mut figures),
        "leave" => run.leave(&mut figures),
        "loss" => run.loss(&mut figures),
        "freeze" => run.freeze(&mut figures),
        "partition" => run.partition(&mut figures),
        "churn" => run.churn(&mut figures),
        _ => run.rolling_restart(&mut figures),
    }
    run.sim.finish_progress();
    figures.insert("renewed_identities".into(), run.renewals() as f64);
    if std::env::var_os("GRAPEVINE_SIM_TRACE").is_some() {
        for (at, node) in &run.sim.renewals {
            eprintln!("{:.6} n{node} renews its identity", secs(*at));
        }
        for o in &run.sim.observations {
            eprintln!(
                "{:.6} n{} sees n{}#{} {} (up: {})",
                secs(o.at),
                o.observer,
                o.subject,
                o.generation,
                if o.left { "left" } else { "down" },
                o.subject_up
            );
        }
    }
    run.traffic_figures(&mut figures);
    figures.insert("formed_at_start".into(), f64::from(u8::from(formed)));
    figures.insert(
        "lean_membership".into(),
        f64::from(u8::from(wrapper == Wrapper::Lean)),
    );
    // Without a write to follow (crash, leave), the curve shows the detection spreading.
    let dissemination_curve = match run.sim.watches.first() {
        Some(watch) => curve(watch),
        None => std::mem::take(&mut run.detection_curve),
    };
    Ok(Report {
        scenario: scenario.to_string(),
        engine: Engine::Core,
        nodes: options.nodes,
        seed: options.seed,
        loss,
        simulated_s: secs(run.sim.now()),
        figures,
        dissemination_curve,
        detection_times: run.detection_times,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to the microsecond so that summaries stay readable.
fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Fraction of eligible nodes informed over time, in seconds since the change.
fn curve(watch: &Watch) -> Vec<(f64, f64)> {
    let eligible = watch.eligible.iter().filter(|e| **e).count();
    if eligible == 0 {
        return Vec::new();
    }
    let mut times: Vec<Nanos> = watch
        .informed
        .iter()
        .zip(&watch.eligible)
        .filter(|(_, e)| **e)
        .filter_map(|(t, _)| t.map(|t| t - watch.start))
        .collect();
    times.sort_unstable();
    let step = (times.len() / 2000).max(1);
    let mut points = vec![(0.0, 0.0)];
    for (k, t) in times.iter().enumerate() {
        if (k + 1) % step == 0 || k + 1 == times.len() {
            points.push((secs(*t), (k + 1) as f64 / eligible as f64));
        }
    }
    points
}

/// Fraction of `total` reached by sorted `times`.
fn cumulative(times: &[f64], total: usize) -> Vec<(f64, f64)> {
    let step = (times.len() / 2000).max(1);
    let mut points = vec![(0.0, 0.0)];
    for (k, t) in times.iter().enumerate() {
        if (k + 1) % step == 0 || k + 1 == times.len() {
            points.push((*t, (k + 1) as f64 / total.max(1) as f64));
        }
    }
    points
}

struct Run {
    sim: Sim,
    formed: bool,
    duration: Nanos,
    /// When the cluster was ready and the measured phase began.
    ready: Nanos,
    traffic_at_ready: Traffic,
    idle_from: Option<(Nanos, Traffic)>,
    detection_times: Vec<f64>,
    /// Fraction of observers that saw the crash (or leave) over time.
    detection_curve: Vec<(f64, f64)>,
}

impl Run {
    fn new(params: Params, formed: bool, duration: Nanos, options: &Options) -> Self {
        let mut sim = Sim::new(params);
        if options.progress {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:40}] {pos}/{len} simulated ms ({elapsed}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("{} × {}", options.scenario, options.nodes));
            sim.set_progress(bar);
        }
        Run {
            sim,
            formed,
            duration,
            ready: 0,
            traffic_at_ready: Traffic::default(),
            idle_from: None,
            detection_times: Vec::new(),
            detection_curve: Vec::new(),
        }
    }

    fn nodes(&self) -> usize {
        self.sim.params.nodes
    }

    fn end(&self) -> Nanos {
        self.ready + self.duration
    }

    fn set_progress_len(&self, len: Nanos) {
        self.sim.set_progress_length(len);
    }

    /// Gets the cluster ready: formed at time zero, or joined through the seeds.
    fn setup(&mut self, figures: &mut BTreeMap<String, f64>) {
        let n = self.nodes();
        if self.formed {
            // Wall time goes to stderr only, like the binary's totals: stdout stays
            // byte-identical between runs.
            let started = std::time::Instant::now();
            self.sim.form_cluster();
            eprintln!(
                "grapevine-sim: {n} nodes formed in {:.1} s (wall)",
                started.elapsed().as_secs_f64()
            );
            self.ready = SEC;
            self.sim.run_until(self.ready);
        } else {
            self.sim.track_join();
            let mut last_start = 0;
            for i in 0..n {
                let at = self.sim.random_offset(START_SPREAD);
                last_start = last_start.max(at);
                self.sim.start_at(i, at);
            }
            let joined = self
                .sim
                .run_until_or(JOIN_DEADLINE, 100 * MS, |sim| sim.joined_at().is_some());
            self.ready = self.sim.now();
            figures.insert("joined".into(), f64::from(u8::from(joined)));
            if let Some(at) = self.sim.joined_at() {
                figures.insert("join_s".into(), round(secs(at.saturating_sub(last_start))));
            }
        }
        self.set_progress_len(self.end());
        self.traffic_at_ready = self.sim.total_traffic();
    }

    fn traffic_figures(&self, figures: &mut BTreeMap<String, f64>) {
        let n = self.nodes() as f64;
        let per = |from: &Traffic, since: Nanos| {
            let now = self.sim.total_traffic();
            let span = secs(self.sim.now().saturating_sub(since)).max(1e-9);
            (
                (now.udp_bytes - from.udp_bytes) as f64 / n / span,
                (now.udp_packets - from.udp_packets) as f64 / n / span,
                (now.tcp_bytes - from.tcp_bytes) as f64 / n / span,
                (now.push_pull_bytes - from.push_pull_bytes) as f64 / n / span,
            )
        };
        let (udp, packets, tcp, pp) = per(&self.traffic_at_ready, self.ready);
        figures.insert("bytes_per_node_per_s".into(), round(udp + tcp));
        figures.insert("udp_bytes_per_node_per_s".into(), round(udp));
        figures.insert("tcp_bytes_per_node_per_s".into(), round(tcp));
        figures.insert("push_pull_bytes_per_node_per_s".into(), round(pp));
        figures.insert("packets_per_node_per_s".into(), round(packets));
        let now = self.sim.total_traffic();
        let from = &self.traffic_at_ready;
        figures.insert(
            "push_pull_skipped".into(),
            (now.push_pull_skipped - from.push_pull_skipped) as f64,
        );
        figures.insert(
            "push_pull_full".into(),
            (now.push_pull_full - from.push_pull_full) as f64,
        );
        figures.insert(
            "push_pull_mismatched".into(),
            (now.push_pull_mismatched - from.push_pull_mismatched) as f64,
        );
        if let Some((since, from)) = &self.idle_from {
            let (udp, packets, tcp, _) = per(from, *since);
            figures.insert("idle_bytes_per_node_per_s".into(), round(udp + tcp));
            figures.insert(
                "idle_push_pull_skipped".into(),
                (now.push_pull_skipped - from.push_pull_skipped) as f64,
            );
            figures.insert(
                "idle_push_pull_full".into(),
                (now.push_pull_full - from.push_pull_full) as f64,
            );
            figures.insert("idle_packets_per_node_per_s".into(), round(packets));
        }
    }

    /// A random node that is up, not a seed when avoidable, and not in `except`.
    fn pick(&mut self, except: &BTreeSet<usize>) -> Option<usize> {
        let n = self.nodes();
        let seeds = self.sim.params.seeds.min(n.saturating_sub(1));
        let candidates: Vec<usize> = (seeds..n)
            .chain(0..seeds)
            .filter(|i| self.sim.nodes[*i].is_up() && !except.contains(i))
            .collect();
        let non_seeds = candidates.iter().filter(|i| **i >= seeds).count();
        let pool = if non_seeds > 0 {
            &candidates[..non_seeds]
        } else {
            &candidates[..]
        };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.sim.random_index(pool.len())])
    }

    fn false_positives(&self, since: Nanos) -> usize {
        self.sim
            .observations
            .iter()
            .filter(|o| o.at >= since && o.subject_up && !o.left)
            .count()
    }

    fn watch_figures(&self, watch: &Watch, prefix: &str, figures: &mut BTreeMap<String, f64>) {
        let delays = watch.delays();
        let receivers = watch.receivers().max(1);
        figures.insert(
            format!("{prefix}_informed_fraction"),
            round(delays.len() as f64 / receivers as f64),
        );
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            figures.insert(format!("{prefix}_{name}_s"), round(percentile(&delays, q)));
        }
        figures.insert(
            format!("{prefix}_max_s"),
            round(delays.last().copied().unwrap_or(0.0)),
        );
    }

    fn converge(&mut self, figures: &mut BTreeMap<String, f64>) {
        self.sim.run_until(self.ready + 2 * SEC);
        let writer = self.pick(&BTreeSet::new());
        if let Some(target) = writer.and_then(|w| self.sim.register(w, "web")) {
            self.sim.watch(target);
        }
        self.sim.run_until(self.ready + 4 * SEC);
        let writer = self.pick(&BTreeSet::new());
        if let Some(target) = writer.and_then(|w| self.sim.config_set(w, "app/feature", b"on")) {
            self.sim.watch(target);
        }
        let idle = self.ready + 20 * SEC;
        if self.end() >= idle + 10 * SEC {
            self.sim.run_until(idle);
            self.idle_from = Some((idle, self.sim.total_traffic()));
        }
        self.sim.run_until(self.end());
        let watches = self.sim.watches.clone();
        if let Some(w) = watches.first() {
            self.watch_figures(w, "disseminate", figures);
        }
        if let Some(w) = watches.get(1) {
            self.watch_figures(w, "config", figures);
        }
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
    }

    fn crash(&mut self, figures: &mut BTreeMap<String, f64>) {
        let at = self.ready + 5 * SEC + self.sim.random_offset(SEC);
        self.sim.run_until(at);
        let Some(victim) = self.pick(&BTreeSet::new()) else {
            return;
        };
        let observers: Vec<usize> = (0..self.nodes())
            .filter(|i| *i != victim && self.sim.nodes[*i].is_up())
            .collect();
        self.sim.crash(victim);
        self.sim.run_until(self.end());
        let mut first: BTreeMap<u32, Nanos> = BTreeMap::new();
        for o in &self.sim.observations {
            if o.subject as usize == victim && o.at >= at {
                first.entry(o.observer).or_insert(o.at);
            }
        }
        let mut times: Vec<f64> = observers
            .iter()
            .filter_map(|i| first.get(&(*i as u32)).map(|t| secs(t - at)))
            .collect();
        times.sort_by(f64::total_cmp);
        figures.insert(
            "detected_fraction".into(),
            round(times.len() as f64 / observers.len().max(1) as f64),
        );
        figures.insert("detect_p50_s".into(), round(percentile(&times, 0.5)));
        figures.insert("detect_p99_s".into(), round(percentile(&times, 0.99)));
        figures.insert(
            "detect_max_s".into(),
            round(times.last().copied().unwrap_or(0.0)),
        );
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
        self.detection_curve = cumulative(&times, observers.len());
        self.detection_times = times;
    }

    fn leave(&mut self, figures: &mut BTreeMap<String, f64>) {
        let at = self.ready + 5 * SEC + self.sim.random_offset(SEC);
        self.sim.run_until(at);
        let Some(leaver) = self.pick(&BTreeSet::new()) else {
            return;
        };
        let observers: Vec<usize> = (0..self.nodes())
            .filter(|i| *i != leaver && self.sim.nodes[*i].is_up())
            .collect();
        self.sim.leave(leaver);
        self.sim.run_until(self.end());
        let mut first: BTreeMap<u32, Nanos> = BTreeMap::new();
        let mut as_down = 0;
        for o in &self.sim.observations {
            if o.subject as usize == leaver && o.at >= at {
                if o.left {
                    first.entry(o.observer).or_insert(o.at);
                } else {
                    as_down += 1;
                }
            }
        }
        let mut times: Vec<f64> = observers
            .iter()
            .filter_map(|i| first.get(&(*i as u32)).map(|t| secs(t - at)))
            .collect();
        times.sort_by(f64::total_cmp);
        figures.insert(
            "left_fraction".into(),
            round(times.len() as f64 / observers.len().max(1) as f64),
        );
        figures.insert("leave_p50_s".into(), round(percentile(&times, 0.5)));
        figures.insert(
            "leave_max_s".into(),
            round(times.last().copied().unwrap_or(0.0)),
        );
        figures.insert("left_as_down".into(), as_down as f64);
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
        self.detection_curve = cumulative(&times, observers.len());
        self.detection_times = times;
    }

    /// Identity renewals of running processes during the measured phase.
    fn renewals(&self) -> usize {
        self.sim
            .renewals
            .iter()
            .filter(|(at, _)| *at >= self.ready)
            .count()
    }

    fn loss(&mut self, figures: &mut BTreeMap<String, f64>) {
        self.sim.run_until(self.ready + 10 * SEC);
        let writer = self.pick(&BTreeSet::new());
        if let Some(target) = writer.and_then(|w| self.sim.register(w, "web")) {
            self.sim.watch(target);
        }
        self.sim.run_until(self.end());
        let watches = self.sim.watches.clone();
        if let Some(w) = watches.first() {
            self.watch_figures(w, "disseminate", figures);
        }
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
        figures.insert(
            "converged".into(),
            f64::from(u8::from(self.sim.converged())),
        );
    }

    fn freeze(&mut self, figures: &mut BTreeMap<String, f64>) {
        let mut at = self.ready + 5 * SEC;
        let mut freezes = 0;
        let mut frozen = BTreeSet::new();
        while at + FREEZE_FOR <= self.end() {
            self.sim.run_until(at);
            let Some(victim) = self.pick(&BTreeSet::new()) else {
                break;
            };
            self.sim.freeze(victim);
            frozen.insert(victim as u32);
            freezes += 1;
            self.sim.run_until(at + FREEZE_FOR);
            self.sim.thaw(victim);
            at += 5 * SEC;
        }
        self.sim.run_until(self.end());
        let fp_frozen = self
            .sim
            .observations
            .iter()
            .filter(|o| o.at >= self.ready && o.subject_up && !o.left)
            .filter(|o| frozen.contains(&o.subject))
            .count();
        figures.insert("freezes".into(), freezes as f64);
        figures.insert("freeze_s".into(), secs(FREEZE_FOR));
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
        figures.insert("false_positives_of_frozen".into(), fp_frozen as f64);
        figures.insert(
            "converged".into(),
            f64::from(u8::from(self.sim.converged())),
        );
    }

    fn partition(&mut self, figures: &mut BTreeMap<String, f64>) {
        let n = self.nodes();
        let half = n / 2;
        let split = self.ready + 5 * SEC;
        let heal = self.ready + 35 * SEC;
        self.sim.run_until(split);
        self.sim.set_groups(|i| u32::from(i >= half));
        self.sim.run_until(self.ready + 10 * SEC);
        for writer in [half - 1, n - 1] {
            if let Some(target) = self.sim.register(writer, "web") {
                self.sim.watch(target);
            }
        }
        self.sim.run_until(heal.min(self.end()));
        self.sim.set_groups(|_| 0);
        let healed = self.sim.now();
        let converged = self
            .sim
            .run_until_or(self.end(), CHECK_EVERY, |sim| sim.converged());
        if converged {
            figures.insert(
                "heal_converge_s".into(),
                round(secs(self.sim.now() - healed)),
            );
        }
        self.sim.run_until(self.end());
        let side = |i: u32| (i as usize) >= half;
        let during = |t: Nanos| t >= split && t < healed;
        let (mut across, mut same_side, mut after) = (0, 0, 0);
        for o in &self.sim.observations {
            if o.left || o.at < self.ready {
                continue;
            }
            if during(o.at) {
                if side(o.observer) != side(o.subject) {
                    across += 1;
                } else if o.subject_up {
                    same_side += 1;
                }
            } else if o.at >= healed {
                after += 1;
            }
        }
        figures.insert("partition_s".into(), round(secs(healed - split)));
        figures.insert("downs_across_partition".into(), across as f64);
        figures.insert("false_positives".into(), same_side as f64);
        figures.insert("downs_after_heal".into(), after as f64);
        figures.insert(
            "converged".into(),
            f64::from(u8::from(self.sim.converged())),
        );
    }

    /// Runs `events` (time, action) in order, then checks convergence until the end.
    fn disturb(
        &mut self,
        mut events: Vec<(Nanos, u8, usize)>,
        figures: &mut BTreeMap<String, f64>,
    ) -> Nanos {
        // 0: crash a random node (index ignored), 1: restart index, 2: leave index.
        let mut last = self.ready;
        let mut k = 0;
        while k < events.len() {
            let (at, action, index) = events[k];
            self.sim.run_until(at);
            match action {
                0 => {
                    let down: BTreeSet<usize> = (0..self.nodes())
                        .filter(|i| !self.sim.nodes[*i].is_up())
                        .collect();
                    if let Some(victim) = self.pick(&down) {
                        self.sim.crash(victim);
                        events.push((at + 10 * SEC, 1, victim));
                        events.sort_by_key(|e| e.0);
                    }
                }
                1 => {
                    self.sim.restart(index);
                    self.sim.register(index, "svc");
                    figures
                        .entry("restarts".into())
                        .and_modify(|r| *r += 1.0)
                        .or_insert(1.0);
                }
                _ => {
                    self.sim.leave(index);
                    events.push((at + 2 * SEC, 1, index));
                    events.sort_by_key(|e| e.0);
                }
            }
            last = at;
            k += 1;
        }
        let converged = self
            .sim
            .run_until_or(self.end(), CHECK_EVERY, |sim| sim.converged());
        if converged {
            figures.insert(
                "converge_s".into(),
                round(secs(self.sim.now().saturating_sub(last))),
            );
        }
        figures.insert("converged".into(), f64::from(u8::from(converged)));
        self.sim.run_until(self.end());
        last
    }

    fn churn(&mut self, figures: &mut BTreeMap<String, f64>) {
        let mut events = Vec::new();
        let mut at = self.ready + 5 * SEC;
        while at + 40 * SEC <= self.end() {
            events.push((at, 0, 0));
            at += 5 * SEC;
        }
        figures.insert("crashes".into(), events.len() as f64);
        figures.insert("restarts".into(), 0.0);
        self.disturb(events, figures);
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
    }

    fn rolling_restart(&mut self, figures: &mut BTreeMap<String, f64>) {
        let n = self.nodes();
        let mut events = Vec::new();
        let mut at = self.ready + 5 * SEC;
        let mut k = 0;
        while at + 30 * SEC <= self.end() && k < n {
            events.push((at, 2, n - 1 - k));
            at += 10 * SEC;
            k += 1;
        }
        let left: BTreeSet<u32> = events.iter().map(|e| e.2 as u32).collect();
        figures.insert("restarts".into(), 0.0);
        let first = events.first().map_or(self.ready, |e| e.0);
        self.disturb(events, figures);
        let left_as_down = self
            .sim
            .observations
            .iter()
            .filter(|o| o.at >= first && !o.left && left.contains(&o.subject) && !o.subject_up)
            .count();
        figures.insert("left_as_down".into(), left_as_down as f64);
        figures.insert(
            "false_positives".into(),
            self.false_positives(self.ready) as f64,
        );
    }
}
