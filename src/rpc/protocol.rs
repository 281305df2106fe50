//! Frames of an RPC connection.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{AppError, RpcError, MAX_PAYLOAD};
use crate::wire;

/// One frame on an RPC connection, either direction.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Frame {
    /// Client → server: run a method.
    Call {
        id: u64,
        service: String,
        method: String,
        /// Milliseconds the caller still waits; the server drops the call after that.
        timeout_ms: u32,
        payload: ByteBuf,
    },
    /// Client → server: the caller gave up on call `id`.
    Cancel { id: u64 },
    /// Server → client: the outcome of call `id`.
    Reply { id: u64, outcome: Outcome },
}

/// The result of a call as it travels back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Ok(ByteBuf),
    App(AppError),
    NotFound(String),
    Unavailable(String),
    DeadlineExceeded,
    BadRequest(String),
}

impl Outcome {
    pub(crate) fn into_result(self, timeout: std::time::Duration) -> Result<Vec<u8>, RpcError> {
        match self {
            Outcome::Ok(bytes) => Ok(bytes.into_vec()),
            Outcome::App(error) => Err(RpcError::Remote(error)),
            Outcome::NotFound(what) => Err(RpcError::NotFound(what)),
            Outcome::Unavailable(reason) => Err(RpcError::Unavailable {
                reason,
                retryable: true,
            }),
            Outcome::DeadlineExceeded => Err(RpcError::Timeout(timeout)),
            Outcome::BadRequest(message) => Err(RpcError::Protocol(message)),
        }
    }
}

/// Encodes a frame, refusing payloads above the limit.
pub(crate) fn encode(frame: &Frame) -> Result<bytes::Bytes, RpcError> {
    wire::encode_frame(frame)
        .map(bytes::Bytes::from)
        .map_err(|error| match error {
            wire::WireError::TooLarge { size, .. } => RpcError::FrameTooLarge {
                size,
                limit: MAX_PAYLOAD,
            },
            other => RpcError::Protocol(other.to_string()),
        })
}

/// Decodes a frame.
pub(crate) fn decode(bytes: &[u8]) -> Result<Frame, RpcError> {
    wire::decode_frame(bytes).map_err(|error| RpcError::Protocol(error.to_string()))
}

/// Serializes a typed value into a payload.
pub(crate) fn to_payload<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, RpcError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|error| RpcError::Protocol(error.to_string()))?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(RpcError::FrameTooLarge {
            size: bytes.len(),
            limit: MAX_PAYLOAD,
        });
    }
    Ok(bytes)
}

/// Deserializes a typed value from a payload; trailing bytes are an error.
pub(crate) fn from_payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    wire::decode_frame(bytes).map_err(|error| RpcError::Protocol(error.to_string()))
}
