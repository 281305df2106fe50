//! grapevine-sim: runs named failure scenarios deterministically. See simulations/README.md.
//!
//! ```text
//! cargo run --release -p grapevine-sim -- SCENARIO --nodes N --seed S [--loss P] [--json] \
//!     [--plot FILE.svg] [--engine full|core] [--duration SECONDS]
//! ```
//!
//! The report goes to stdout and is a function of the options alone (the same seed gives
//! byte-identical output); wall time and peak memory go to stderr.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use grapevine_sim::core::{CoreOptions, Wrapper};
use grapevine_sim::report::{Engine, Options};

/// Deterministic failure simulations of grapevine.
#[derive(Debug, Parser)]
#[command(name = "grapevine-sim", version)]
struct Cli {
    /// converge, crash, leave, partition, loss, freeze, churn, rolling-restart or rpc.
    scenario: String,
    /// Cluster size.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Packet loss probability in [0, 1) (default: 0.05 for `loss`, 0 otherwise).
    #[arg(long)]
    loss: Option<f64>,
    /// Simulated seconds of the measured phase, after the cluster has formed. Core engine
    /// defaults: converge and crash 60, leave 30, partition 90, loss 600, others 120. Full
    /// engine: sets partition (default 30), loss (120), churn (60) and rpc (60); the other
    /// scenarios run until what they measure has happened and ignore it.
    #[arg(long)]
    duration: Option<f64>,
    /// Tier: `full` (real node code on turmoil) or `core` (discrete-event simulator of the
    /// sans-IO core). Default: full up to 100 nodes, core above.
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// Print the report as one line of JSON.
    #[arg(long)]
    json: bool,
    /// Draw the dissemination curve and the detection histogram into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Core engine: membership implementation (default: library up to 100 nodes, lean
    /// above).
    #[arg(long, value_enum)]
    membership: Option<MembershipArg>,
    /// Core engine: `join` simulates the join through three seeds; `formed` starts with
    /// every node knowing every other (default: join below 1,000 nodes, formed from 1,000).
    #[arg(long, value_enum)]
    start: Option<StartArg>,
    /// Core engine: threads used to form a cluster at time zero (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MembershipArg {
    /// grapevine's `Membership`, as the node runs it.
    Library,
    /// foca with `Membership`'s protocol logic but without its member view.
    Lean,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StartArg {
    /// Simulate the join.
    Join,
    /// Start from a formed cluster.
    Formed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    let engine = cli
        .engine
        .unwrap_or_else(|| grapevine_sim::default_engine(&cli.scenario, cli.nodes));
    let options = Options {
        scenario: cli.scenario.clone(),
        nodes: cli.nodes,
        seed: cli.seed,
        loss: cli.loss,
        duration_s: cli.duration,
        progress: !cli.json && std::io::stderr().is_terminal(),
    };
    let core_options = CoreOptions {
        wrapper: cli.membership.map(|m| match m {
            MembershipArg::Library => Wrapper::Library,
            MembershipArg::Lean => Wrapper::Lean,
        }),
        formed: cli.start.map(|s| matches!(s, StartArg::Formed)),
        threads: cli.threads,
    };
    let report = match grapevine_sim::run(engine, &options, &core_options) {
        Ok(report) => report,
        Err(message) => {
            eprintln!("grapevine-sim: {message}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    if let Some(path) = &cli.plot {
        if let Err(message) = grapevine_sim::plot::draw(&report, path) {
            eprintln!("grapevine-sim: {message}");
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "grapevine-sim: wall {:.1} s, peak RSS {}",
        started.elapsed().as_secs_f64(),
        peak_rss().unwrap_or_else(|| "unknown".into())
    );
    ExitCode::SUCCESS
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_rss() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(format!("{:.1} MiB", kib / 1024.0))
}
