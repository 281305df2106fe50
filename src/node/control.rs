//! Control requests: what the `grapevine` CLI asks a running agent over its TCP port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::Instance;
use super::config::ConfigEvent;
use super::protocol::{exchange, Request, Response};
use super::stats::StatsSnapshot;
use crate::error::{Error, Result};
use crate::membership::{ForceLeave, Member, Profile};
use crate::net::sealed::{Key, KeyError, Keyring};
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
    /// Write a config key.
    ConfigSet {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Read a config key.
    ConfigGet {
        /// The key.
        key: String,
    },
    /// Delete a config key.
    ConfigDelete {
        /// The key.
        key: String,
    },
    /// List the config keys under a prefix.
    ConfigList {
        /// Path prefix (whole segments); empty for all.
        prefix: String,
    },
    /// Write several config keys (a file import); all are validated before any is written.
    ConfigImport {
        /// Keys and values.
        entries: Vec<(String, Vec<u8>)>,
    },
    /// Stream the changes under a prefix until the client disconnects.
    ConfigWatch {
        /// Path prefix.
        prefix: String,
    },
    /// Inspect or change keyrings: this node's, or (with `cluster`) every live member's.
    Keys {
        /// What to do.
        op: KeyOp,
        /// Also on every other live member (as `grapevine keys` does).
        cluster: bool,
    },
    /// Join the cluster through another node at run time (as `consul join` does).
    Join {
        /// The node to join through.
        addr: SocketAddr,
    },
    /// Force a failed member into the `left` state (as `consul force-leave` does).
    ForceLeave {
        /// The member's name.
        node: String,
        /// Also drop it from the agent's member list at once.
        prune: bool,
    },
}

/// A keyring operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOp {
    /// Report the keys.
    List,
    /// Add a key (base64) for receiving.
    Install(String),
    /// Make an installed key (base64) the primary.
    Use(String),
    /// Remove a secondary key (base64).
    Remove(String),
}

impl KeyOp {
    /// Applies the operation to `ring`.
    pub fn apply(&self, ring: &mut Keyring) -> Result<(), KeyError> {
        match self {
            KeyOp::List => Ok(()),
            KeyOp::Install(key) => ring.install(Key::from_base64(key)?),
            KeyOp::Use(key) => ring.use_key(&Key::from_base64(key)?),
            KeyOp::Remove(key) => ring.remove(&Key::from_base64(key)?),
        }
    }
}

/// The outcome of a keyring operation on each node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysReport {
    /// Nodes that applied it, with their keys (base64, primary first).
    pub applied: Vec<(String, Vec<String>)>,
    /// Nodes that refused or could not be reached, with the reason.
    pub failed: Vec<(String, String)>,
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
    /// A write was applied; its local sequence number.
    ConfigWritten {
        /// Sequence number of the (last) change.
        seq: u64,
    },
    /// Answer to [`ControlRequest::ConfigGet`].
    ConfigValue(Option<Vec<u8>>),
    /// Answer to [`ControlRequest::ConfigDelete`]: whether the key existed.
    ConfigDeleted(bool),
    /// Answer to [`ControlRequest::ConfigList`].
    ConfigEntries(Vec<(String, Vec<u8>)>),
    /// One event of a [`ControlRequest::ConfigWatch`] stream.
    ConfigEvent(ConfigEvent),
    /// Answer to [`ControlRequest::Keys`].
    Keys(KeysReport),
    /// Answer to [`ControlRequest::Join`]: the address is an active member now.
    Joined,
    /// The request was refused.
    Refused(String),
    /// Answer to [`ControlRequest::ForceLeave`].
    ForcedLeave(ForceLeave),
}

/// Identity and counters of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(into = "NodeInfoWire", from = "NodeInfoWire")]
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
    /// Counters of components layered on the node (see [`super::StatsSource`]), by name.
    pub extra: BTreeMap<String, u64>,
}

/// [`NodeInfo`] on the wire: every counter in one map by name (see `stats::by_name`), so
/// that builds with different counters still understand each other.
#[derive(Serialize, Deserialize)]
struct NodeInfoWire {
    name: String,
    addr: SocketAddr,
    generation: u64,
    profile: Profile,
    stats: BTreeMap<String, u64>,
}

impl From<NodeInfo> for NodeInfoWire {
    fn from(info: NodeInfo) -> Self {
        NodeInfoWire {
            stats: super::stats::by_name::to_map(&info.stats, &info.extra),
            name: info.name,
            addr: info.addr,
            generation: info.generation,
            profile: info.profile,
        }
    }
}

impl From<NodeInfoWire> for NodeInfo {
    fn from(wire: NodeInfoWire) -> Self {
        let (stats, extra) = super::stats::by_name::from_map(wire.stats);
        NodeInfo {
            name: wire.name,
            addr: wire.addr,
            generation: wire.generation,
            profile: wire.profile,
            stats,
            extra,
        }
    }
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

/// How long an agent waits for a node it was asked to join through (as the HTTP API's
/// `PUT /v1/agent/join`).
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Makes the agent at `agent` join the cluster through `addr` and waits until `addr` is one of
/// its active members.
pub async fn join(agent: SocketAddr, addr: SocketAddr) -> Result<()> {
    // The agent's own wait, plus room for the exchange itself.
    let timeout = JOIN_WAIT + CONTROL_TIMEOUT;
    match control_request(agent, ControlRequest::Join { addr }, timeout).await? {
        ControlResponse::Joined => Ok(()),
        ControlResponse::Refused(message) => Err(Error::Remote(message)),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}

/// Makes the agent at `agent` force the failed member `node` into the `left` state (and,
/// with `prune`, drop it from its member list); see [`crate::Node::force_leave`].
pub async fn force_leave(agent: SocketAddr, node: &str, prune: bool) -> Result<ForceLeave> {
    let request = ControlRequest::ForceLeave {
        node: node.to_string(),
        prune,
    };
    match control_request(agent, request, CONTROL_TIMEOUT * 2).await? {
        ControlResponse::ForcedLeave(outcome) => Ok(outcome),
        ControlResponse::Refused(message) => Err(Error::Remote(message)),
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

/// Sends a control request and unwraps the expected answer, turning refusals into errors.
pub async fn expect<T>(
    agent: SocketAddr,
    request: ControlRequest,
    pick: impl FnOnce(ControlResponse) -> Option<T>,
) -> Result<T> {
    match control_request(agent, request, CONTROL_TIMEOUT).await? {
        ControlResponse::Refused(message) => Err(Error::Remote(message)),
        answer => {
            let shown = format!("{answer:?}");
            pick(answer).ok_or_else(|| Error::Protocol(format!("unexpected answer {shown}")))
        }
    }
}

/// Streams the config changes under `prefix` from the node at `agent`, calling `each` for
/// every event until the connection ends or `each` returns `false`.
pub async fn watch_config(
    agent: SocketAddr,
    prefix: String,
    mut each: impl FnMut(ConfigEvent) -> bool,
) -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    let stream = tokio::time::timeout(CONTROL_TIMEOUT, tokio::net::TcpStream::connect(agent))
        .await
        .map_err(|_| Error::Timeout {
            what: "connect",
            after: CONTROL_TIMEOUT,
        })?
        .map_err(|source| Error::Connect {
            addr: agent,
            source,
        })?;
    let mut framed = crate::wire::dial(stream);
    let request = Request::Control(ControlRequest::ConfigWatch { prefix });
    framed
        .send(bytes::Bytes::from(crate::wire::encode_frame(&request)?))
        .await
        .map_err(|source| Error::Connect {
            addr: agent,
            source,
        })?;
    while let Some(frame) = framed.next().await {
        let frame = frame.map_err(|source| Error::Connect {
            addr: agent,
            source,
        })?;
        match crate::wire::decode_frame::<Response>(&frame)? {
            Response::Control(ControlResponse::ConfigEvent(event)) => {
                if !each(event) {
                    return Ok(());
                }
            }
            Response::Control(ControlResponse::Refused(message)) | Response::Error(message) => {
                return Err(Error::Remote(message))
            }
            other => return Err(Error::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
    Err(Error::Protocol(format!("{agent} closed the watch")))
}
