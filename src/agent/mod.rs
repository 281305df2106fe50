//! Agent-side helpers shared by the `grapevine` binary: static configuration files and the
//! address to advertise.

pub mod advertise;
pub mod config_file;
pub mod settings;
