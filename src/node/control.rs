//! Control requests: what the `grapevine` CLI asks a running agent over its TCP port.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::Instance;
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
    /// Every known instance (of one service, if named), unhealthy and down ones included.
    Services {
        /// Only this service.
        service: Option<String>,
    },
}

/// A node's answer to a [`ControlRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlResponse {
    /// Answer to [`ControlRequest::Members`].
    Members(Vec<Member>),
    /// Answer to [`ControlRequest::Info`].
    Info(NodeInfo),
    /// Answer to [`ControlRequest::Services`].
    Services(Vec<Instance>),
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
        other => Err(Error::Protocol(format!(
            "unexpected answer to a control request: {other:?}"
        ))),
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

/// Instances known to the node at `agent`, of `service` or of all services.
pub async fn services(agent: SocketAddr, service: Option<String>) -> Result<Vec<Instance>> {
    match control_request(agent, ControlRequest::Services { service }, CONTROL_TIMEOUT).await? {
        ControlResponse::Services(instances) => Ok(instances),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}
