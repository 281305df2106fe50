//! Agent-side helpers shared by the `grapevine` binary: static configuration files.

pub mod config_file;
