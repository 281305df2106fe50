//! grapevine-sim: deterministic failure simulations of grapevine, in two tiers.
//!
//! - [`full`]: the real node code (UDP and TCP) on turmoil's simulated network, up to about
//!   100 nodes.
//! - [`core`]: a discrete-event simulator that drives the sans-IO core (foca plus the
//!   replicated state) directly, for 1,000 and 10,000 nodes.
//!
//! Both report a [`report::Report`]; the same options give byte-identical output.

pub mod core;
pub mod full;
pub mod plot;
pub mod report;

use report::{Engine, Options, Report};

/// Largest cluster the full-stack tier runs by default.
pub const FULL_MAX_NODES: usize = 100;

/// The tier that runs a scenario by default: the full stack up to 100 nodes (and always for
/// `rpc`), the core simulator above.
pub fn default_engine(scenario: &str, nodes: usize) -> Engine {
    if nodes <= FULL_MAX_NODES || scenario == "rpc" {
        Engine::Full
    } else {
        Engine::Core
    }
}

/// Runs a scenario on `engine`.
pub fn run(
    engine: Engine,
    options: &Options,
    core_options: &crate::core::CoreOptions,
) -> Result<Report, String> {
    match engine {
        Engine::Full => full::run(options),
        Engine::Core => crate::core::run_with(options, core_options),
    }
}
