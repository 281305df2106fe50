//! Tier 2, the protocol at scale: a discrete-event simulator that drives grapevine's sans-IO
//! core (foca through `grapevine::membership`, plus the replicated state of
//! `grapevine::sync`) directly, without tokio, for 1,000 and 10,000 nodes.
//!
//! - [`engine`]: the virtual clock, the network model and the per-node driver that mirrors
//!   `src/node/driver.rs`.
//! - [`member`]: the membership behind one interface, either grapevine's `Membership` or a
//!   lean wrapper of the same foca that fits 10,000 nodes in memory.
//! - [`scenarios`]: the named scenarios and the figures they report.

pub mod engine;
pub mod ident;
pub mod member;
pub mod scenarios;

use crate::report::{Options, Report};
pub use member::Wrapper;

/// Above this size the lean wrapper is the default (the library's member view costs
/// O(n) allocations per call and a second copy of the member list per node).
pub const LIBRARY_MAX_NODES: usize = 100;
/// From this size on the cluster starts formed by default (joins are not simulated).
pub const FORMED_FROM_NODES: usize = 1000;

/// Settings of the core tier that the common [`Options`] do not carry.
#[derive(Debug, Clone, Default)]
pub struct CoreOptions {
    /// Membership implementation; by default the library's up to [`LIBRARY_MAX_NODES`].
    pub wrapper: Option<Wrapper>,
    /// Start from a formed cluster instead of simulating the join; by default from
    /// [`FORMED_FROM_NODES`] nodes on.
    pub formed: Option<bool>,
    /// Threads for forming the cluster (0: all available cores).
    pub threads: usize,
}

impl CoreOptions {
    /// The wrapper used for `nodes` nodes.
    pub fn wrapper_for(&self, nodes: usize) -> Wrapper {
        self.wrapper.unwrap_or(if nodes <= LIBRARY_MAX_NODES {
            Wrapper::Library
        } else {
            Wrapper::Lean
        })
    }

    /// Whether a cluster of `nodes` starts formed.
    pub fn formed_for(&self, nodes: usize) -> bool {
        self.formed.unwrap_or(nodes >= FORMED_FROM_NODES)
    }
}

/// Runs a scenario on the core tier with default [`CoreOptions`].
pub fn run(options: &Options) -> Result<Report, String> {
    run_with(options, &CoreOptions::default())
}

/// Runs a scenario on the core tier.
pub fn run_with(options: &Options, core: &CoreOptions) -> Result<Report, String> {
    scenarios::run(options, core)
}
