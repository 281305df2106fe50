//! grapevine: decentralized service discovery.
#![warn(missing_docs)]

pub mod state;
