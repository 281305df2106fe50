//! Control requests: what the `grapevine` CLI asks a running agent over its TCP port.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::protocol::{exchange, Request, Response};
use super::stats::StatsSnapshot;
use crate::error::{Error, Result};
use crate::membership::{Member, Profile};
use crate::net::TokioTransport;

/// A command for a running node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// The member list as the node sees it.
    Members,
    /// The node's identity, profile and counters.
    Info,
}

/// A node's answer to a [`ControlRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlResponse {
    /// Answer to [`ControlRequest::Members`].
    Members(Vec<Member>),
    /// Answer to [`ControlRequest::Info`].
    Info(NodeInfo),
}

/// Identity and counters of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Advertised address.
    pub addr: SocketAddr,
    /// Current identity generation.
    pub generation: u64,
    /// Timing profile.
    pub profile: Profile,
    /// Traffic counters.
    pub stats: StatsSnapshot,
}

/// Default time a control request may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `request` to the node at `agent` and returns its answer.
pub async fn control_request(
    agent: SocketAddr,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse> {
    let (response, _) =
        exchange(&TokioTransport, agent, &Request::Control(request), timeout).await?;
    match response {
        Response::Control(answer) => Ok(answer),
        Response::Error(message) => Err(Error::Remote(message)),
        Response::PushPull(_) => Err(Error::Protocol(
            "unexpected push-pull answer to a control request".into(),
        )),
    }
}

/// The member list of the node at `agent`.
pub async fn members(agent: SocketAddr) -> Result<Vec<Member>> {
    match control_request(agent, ControlRequest::Members, CONTROL_TIMEOUT).await? {
        ControlResponse::Members(members) => Ok(members),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}

/// Identity and counters of the node at `agent`.
pub async fn info(agent: SocketAddr) -> Result<NodeInfo> {
    match control_request(agent, ControlRequest::Info, CONTROL_TIMEOUT).await? {
        ControlResponse::Info(info) => Ok(info),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}
