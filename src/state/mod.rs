//! Sans-IO replicated state: the service catalog and the configuration store.

pub mod catalog;
pub mod config;
pub mod hlc;
