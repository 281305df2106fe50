//! RPC: typed request/response calls over TCP between nodes.
//!
//! One persistent connection per peer carries many calls at once, each tagged with a request
//! id. Frames are length-prefixed (size-checked before allocation) bincode. The caller's
//! deadline travels with the call and the server drops work whose deadline has passed;
//! dropping a call's future cancels it on the server. Clients resolve service names to
//! instances through the catalog and balance between them (see [`LoadBalance`]).

mod client;
mod layers;
pub mod metrics;
mod outlier;
mod protocol;
mod server;
mod trace;
pub mod typed;

pub use client::{Endpoint, LoadBalance, Resolve, RpcClient, ServiceClient, CONNECT_TIMEOUT};
pub use layers::{RetryRetryable, RpcRequest, RpcResponse};
pub use metrics::{CallFailure, CallSide, ServiceSnapshot};
pub use outlier::{BASE_EJECTION, EJECT_AFTER_FAILURES, MAX_EJECTION};
pub(crate) use server::serve_connection;

/// Decodes an RPC frame (for fuzzing); panics if the hand-written decoders of call and
/// reply frames read `bytes` differently from bincode.
#[doc(hidden)]
pub fn decode_for_fuzzing(bytes: &[u8]) -> bool {
    assert!(
        protocol::hand_decoders_agree(bytes),
        "the hand-written decoders disagree with bincode on {bytes:02x?}"
    );
    protocol::decode(bytes).is_ok() | protocol::decode_received(bytes).is_ok()
}
pub use server::{Registry, RpcService};
pub use trace::{TraceContext, TraceParseError};
pub use typed::{CallError, ServiceError};

use serde::{Deserialize, Serialize};

/// Default time a call may take, from the caller's side, when none is given.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most calls in flight on one connection; further calls wait (back-pressure).
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Largest encoded request or response payload.
pub const MAX_PAYLOAD: usize = crate::wire::MAX_FRAME - 1024;
/// Service name of the methods every node serves (`ping`, `info`).
pub const BUILTIN_SERVICE: &str = "grapevine";

/// An error an application handler returns: a code and a message, carried to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("application error {code}: {message}")]
pub struct AppError {
    /// Application-defined code.
    pub code: u32,
    /// Human-readable message.
    pub message: String,
}

impl AppError {
    /// An application error.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        AppError {
            code,
            message: message.into(),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The catalog lists no live, passing instance of the service.
    #[error("no instances of service {0:?}")]
    NoInstances(String),
    /// The call did not complete before its deadline.
    #[error("call timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The instance could not be reached, dropped the connection, is draining or overloaded.
    /// Safe to retry elsewhere when `retryable`.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// Whether the call certainly did not run (connection refused, draining).
        retryable: bool,
    },
    /// The handler returned an application error.
    #[error(transparent)]
    Remote(#[from] AppError),
    /// The server has no such service or method.
    #[error("{0}")]
    NotFound(String),
    /// A message could not be encoded or decoded.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client refused the call as configured (e.g. hedging a call not marked
    /// idempotent).
    #[error("invalid call: {0}")]
    InvalidCall(String),
    /// A request or response above the frame limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl RpcError {
    /// Whether the call may be retried on another instance without risk of running twice
    /// (for calls the caller marked idempotent, any connection failure qualifies).
    pub fn is_connection_failure(&self) -> bool {
        matches!(self, RpcError::Unavailable { .. })
    }

    /// Whether sending the same call again may succeed: the instance was unreachable,
    /// dropped the connection, was draining or overloaded, or the call timed out. Only
    /// idempotent calls should be retried on these (the first attempt may have run);
    /// application errors, unknown methods and encoding errors are final.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RpcError::Unavailable { .. } | RpcError::Timeout(_))
    }
}
