//! The node identity gossiped by SWIM.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Longest node name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Who a node is: its unique name, the address it gossips and serves on, and a generation
/// that grows each time the node (re)starts or renews its identity.
///
/// A restarted node reuses name and address with a higher generation, so the cluster sees
/// it as the same member coming back rather than a ghost of its old incarnation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// Unique node name.
    pub name: String,
    /// Advertised address (UDP gossip and TCP share the port).
    pub addr: SocketAddr,
    /// Grows on restart and on identity renewal.
    pub generation: u64,
}

impl NodeId {
    /// A placeholder identity to announce to a seed whose name and generation are unknown.
    /// foca accepts an announce addressed to any identity with its address.
    pub(crate) fn seed(addr: SocketAddr) -> Self {
        NodeId {
            name: String::new(),
            addr,
            generation: 0,
        }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.generation)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // The newest generation is the live process; the name breaks exact ties.
        (self.generation, &self.name) > (adversary.generation, &adversary.name)
    }
}

/// Checks a node name: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits, `.`, `_`, `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "node name must be 1 to {MAX_NAME_LEN} bytes, got {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "node name {name:?} contains {bad:?}; use letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}
