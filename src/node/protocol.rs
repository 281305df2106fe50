//! Requests and responses on a node's TCP port (one request, one response per connection).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};

use super::control::{ControlRequest, ControlResponse};
use crate::error::{Error, Result};
use crate::membership::PushPull;
use crate::net::Transport;
use crate::wire;

/// What a TCP client asks.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Exchange of full member lists.
    PushPull(PushPull),
    /// A command from the CLI or an operator.
    Control(ControlRequest),
}

/// What the node answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Response {
    /// The node's member list, in answer to a push-pull.
    PushPull(PushPull),
    /// The answer to a control request.
    Control(ControlResponse),
    /// The request could not be served.
    Error(String),
}

/// Sends one request to `addr` and waits for its response, all within `timeout`.
pub(crate) async fn exchange<T: Transport>(
    transport: &T,
    addr: std::net::SocketAddr,
    request: &Request,
    timeout: Duration,
) -> Result<(Response, u64)> {
    let frame = wire::encode_frame(request)?;
    let work = async {
        let stream = transport
            .connect(addr)
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        let mut framed = wire::framed(stream);
        let sent = frame.len() as u64;
        framed
            .send(bytes::Bytes::from(frame))
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        match framed.next().await {
            Some(Ok(bytes)) => Ok((wire::decode_frame(&bytes)?, sent + bytes.len() as u64)),
            Some(Err(source)) => Err(Error::Connect { addr, source }),
            None => Err(Error::Protocol(format!("{addr} closed the connection"))),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::Timeout {
            what: "request",
            after: timeout,
        })?
}
