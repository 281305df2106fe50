//! Requests and responses on a node's TCP port. A connection carries a few request/response
//! rounds (an anti-entropy exchange takes two), each frame length-prefixed and size-checked.

use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::FrameCodec;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::codec::Framed;

use super::control::{ControlRequest, ControlResponse};
use crate::error::{Error, Result};
use crate::membership::PushPull;
use crate::net::Transport;
use crate::sync::{SyncDigest, SyncPush, SyncPushReply, SyncReply};
use crate::wire;

/// Most requests served on one connection.
pub(crate) const MAX_REQUESTS_PER_CONNECTION: usize = 4;

/// What a TCP client asks.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Exchange of full member lists.
    PushPull(PushPull),
    /// Anti-entropy, round zero: the fingerprint of the sender's digest.
    SyncCheck(u64),
    /// Anti-entropy, first round: the sender's digest.
    Sync(SyncDigest),
    /// Anti-entropy, second round: what the receiver lacked, and what the sender wants.
    SyncPush(SyncPush),
    /// A command from the CLI or an operator.
    Control(ControlRequest),
    /// Turns the connection into a persistent, multiplexed RPC connection.
    Rpc {
        /// RPC protocol version.
        version: u8,
    },
    /// Push-pull, round zero: the fingerprint of the sender's member list
    /// (`membership::members_fingerprint`). Answered [`Response::InSync`] or
    /// [`Response::OutOfSync`]; after the latter the sender goes on with
    /// [`Request::PushPull`] on the same connection. Last variant, so that the tags of the
    /// older ones stay as they were: a node of the previous version closes the connection
    /// on it, and the sender falls back to a plain push-pull.
    PushPullCheck(u64),
}

/// Version of the RPC protocol spoken after [`Request::Rpc`] (2: calls carry a trace context;
/// 3: the connection opens with a hello, see [`wire::dial`]).
pub(crate) const RPC_VERSION: u8 = 3;

/// The first frame of every RPC connection.
pub(crate) fn rpc_preface() -> bytes::Bytes {
    // Encoding a two-field enum cannot fail or exceed the frame limit.
    wire::encode_frame(&Request::Rpc {
        version: RPC_VERSION,
    })
    .map(bytes::Bytes::from)
    .unwrap_or_default()
}

/// What the node answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Response {
    /// The node's member list, in answer to a push-pull.
    PushPull(PushPull),
    /// What the asker lacks, the answering node's digest and config versions.
    Sync(SyncReply),
    /// The config entries the asker wanted.
    SyncPushed(SyncPushReply),
    /// The fingerprints match: nothing to exchange.
    InSync,
    /// The fingerprints differ: send the digest (anti-entropy) or the member list
    /// (push-pull).
    OutOfSync,
    /// The answer to a control request.
    Control(ControlResponse),
    /// The request could not be served.
    Error(String),
}

/// A client connection to a node's TCP port.
pub(crate) struct Connection<S> {
    framed: Framed<S, FrameCodec>,
    addr: SocketAddr,
    /// Bytes sent and received so far.
    pub(crate) bytes: u64,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Connection<S> {
    /// Sends one request and reads its response.
    pub(crate) async fn call(&mut self, request: &Request) -> Result<Response> {
        let addr = self.addr;
        let frame = wire::encode_frame(request)?;
        self.bytes += frame.len() as u64 + 4;
        self.framed
            .send(bytes::Bytes::from(frame))
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        match self.framed.next().await {
            Some(Ok(bytes)) => {
                self.bytes += bytes.len() as u64 + 4;
                match wire::decode_frame(&bytes)? {
                    Response::Error(message) => Err(Error::Remote(message)),
                    response => Ok(response),
                }
            }
            Some(Err(source)) => Err(Error::Connect { addr, source }),
            None => Err(Error::Protocol(format!("{addr} closed the connection"))),
        }
    }
}

/// Opens a connection to the node at `addr`.
pub(crate) async fn connect<T: Transport>(
    transport: &T,
    addr: SocketAddr,
) -> Result<Connection<T::Stream>> {
    let stream = transport
        .connect(addr)
        .await
        .map_err(|source| Error::Connect { addr, source })?;
    Ok(Connection {
        framed: wire::dial(stream),
        addr,
        bytes: 0,
    })
}

/// Sends one request to `addr` and waits for its response, all within `timeout`.
pub(crate) async fn exchange<T: Transport>(
    transport: &T,
    addr: SocketAddr,
    request: &Request,
    timeout: Duration,
) -> Result<(Response, u64)> {
    let work = async {
        let mut connection = connect(transport, addr).await?;
        let response = connection.call(request).await?;
        Ok((response, connection.bytes))
    };
    within(timeout, "request", work).await
}

/// Runs `work` with a deadline.
pub(crate) async fn within<F, R>(timeout: Duration, what: &'static str, work: F) -> Result<R>
where
    F: std::future::Future<Output = Result<R>>,
{
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| Error::Timeout {
            what,
            after: timeout,
        })?
}
