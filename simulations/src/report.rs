//! What a scenario measured, printed as a summary or as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

/// Which tier ran a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The real node code on turmoil's simulated network (up to ~100 nodes).
    Full,
    /// The sans-IO core (foca + replicated state) on a discrete-event network (1k–10k nodes).
    Core,
}

/// The options every scenario gets.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario name (`converge`, `crash`, `leave`, `partition`, `loss`, `freeze`, `churn`,
    /// `rolling-restart`, `rpc`).
    pub scenario: String,
    /// Cluster size.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Packet loss probability in [0, 1] (scenario default when `None`).
    pub loss: Option<f64>,
    /// Simulated seconds to run where the scenario has a free length (default per scenario).
    pub duration_s: Option<f64>,
    /// Whether to show a progress bar (never in JSON output or tests).
    pub progress: bool,
}

/// The measured figures of one run. Everything in it is a function of the options: the same
/// seed gives byte-identical output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Engine that ran it.
    pub engine: Engine,
    /// Cluster size.
    pub nodes: usize,
    /// Seed.
    pub seed: u64,
    /// Packet loss used.
    pub loss: f64,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Named figures, e.g. `join_s`, `disseminate_p999_s`, `disseminate_max_s`,
    /// `detect_p50_s`, `detect_max_s`, `false_positives`, `bytes_per_node_per_s`,
    /// `packets_per_node_per_s`.
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
    /// Fraction of nodes informed over time `(t_s, fraction)` of the dissemination measured,
    /// if any (for `--plot`).
    #[serde(skip)]
    pub dissemination_curve: Vec<(f64, f64)>,
    /// Per-node detection times in seconds, if any (for `--plot`).
    #[serde(skip)]
    pub detection_times: Vec<f64>,
}

impl Report {
    /// One line of JSON: the scenario, engine, nodes, seed, loss, simulated seconds and every
    /// figure, in a fixed order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// A human summary, one figure a line.
    pub fn summary(&self) -> String {
        let engine = match self.engine {
            Engine::Full => "full",
            Engine::Core => "core",
        };
        let mut out = format!(
            "{} · {} engine · {} nodes · seed {} · loss {}% · {:.3} s simulated\n",
            self.scenario,
            engine,
            self.nodes,
            self.seed,
            self.loss * 100.0,
            self.simulated_s
        );
        let width = self.figures.keys().map(String::len).max().unwrap_or(0);
        for (name, value) in &self.figures {
            out.push_str(&format!("  {name:<width$}  {value}\n"));
        }
        out
    }
}
