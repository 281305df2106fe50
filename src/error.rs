//! The library's error type.

use std::net::SocketAddr;

use crate::membership::MembershipError;
use crate::wire::WireError;

/// Errors returned by grapevine's public API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node's address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address that was asked for.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The node has stopped (after `leave` or `shutdown`).
    #[error("the node has stopped")]
    Stopped,
    /// A remote node could not be reached or failed mid-exchange.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// The remote address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A network exchange took longer than its timeout.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The timeout that expired.
        after: std::time::Duration,
    },
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The membership protocol refused an operation.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// A configuration key or value was refused.
    #[error(transparent)]
    ConfigStore(#[from] crate::state::config::ConfigError),
    /// An RPC call failed.
    #[error(transparent)]
    Rpc(#[from] crate::rpc::RpcError),
    /// A service registration was refused.
    #[error(transparent)]
    Catalog(#[from] crate::state::catalog::CatalogError),
    /// The data directory cannot be used (held, foreign, corrupt, unreadable).
    #[error(transparent)]
    DataDir(#[from] crate::store::StoreError),
    /// A change could not be saved to the data directory.
    #[error("data dir: {0}")]
    Store(String),
    /// The remote side answered with an error.
    #[error("remote error: {0}")]
    Remote(String),
    /// The remote side answered with something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Result with grapevine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
