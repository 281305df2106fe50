//! The compact node identity of the lean wrapper.
//!
//! foca keeps every member's identity in one `Vec` that it scans on every update, and each
//! simulated node holds the whole cluster: at 10,000 nodes that is 10⁸ identities. grapevine's
//! [`NodeId`] (a `String` name, a `SocketAddr`, a generation) takes 64 bytes plus the name's
//! heap block; [`SimId`] takes 24 bytes with the name interned once per process. It encodes to
//! exactly the bytes of the equal `NodeId`, so the wire, and every figure, stay the same (a
//! unit test checks the encoding; `tests/scenarios.rs` checks lean and library reports match).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{OnceLock, RwLock};

use grapevine::membership::NodeId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Interned names: index → name, name → index. Names are leaked once per process; a
/// simulation only ever meets its nodes' names (and the empty name of an announce target).
#[derive(Default)]
struct Names {
    by_index: Vec<&'static str>,
    by_name: HashMap<&'static str, u32>,
}

fn names() -> &'static RwLock<Names> {
    static NAMES: OnceLock<RwLock<Names>> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

fn intern(name: &str) -> u32 {
    if let Some(&index) = names().read().expect("names lock").by_name.get(name) {
        return index;
    }
    let mut names = names().write().expect("names lock");
    if let Some(&index) = names.by_name.get(name) {
        return index;
    }
    let index = u32::try_from(names.by_index.len()).expect("fewer than 2³² names");
    let name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.by_index.push(name);
    names.by_name.insert(name, index);
    index
}

fn name_of(index: u32) -> &'static str {
    names().read().expect("names lock").by_index[index as usize]
}

/// A node identity with an interned name and an IPv4 address (all the simulator uses).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SimId {
    name: u32,
    /// IPv4 address and port packed as foca's `Addr`, ready for its comparisons.
    addr: u64,
    generation: u64,
}

impl SimId {
    /// The compact form of `id`; `None` for an IPv6 address.
    pub fn new(name: &str, addr: SocketAddr, generation: u64) -> Option<Self> {
        let SocketAddr::V4(v4) = addr else {
            return None;
        };
        Some(SimId {
            name: intern(name),
            addr: u64::from(u32::from(*v4.ip())) << 16 | u64::from(v4.port()),
            generation,
        })
    }

    /// The node's name.
    pub fn name(&self) -> &'static str {
        name_of(self.name)
    }

    /// The interned name's index: equal names, equal indexes (within one process).
    pub fn name_index(&self) -> u32 {
        self.name
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        let ip = Ipv4Addr::from((self.addr >> 16) as u32);
        SocketAddr::V4(SocketAddrV4::new(ip, self.addr as u16))
    }

    /// The node's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The same identity as grapevine's type.
    pub fn to_node_id(&self) -> NodeId {
        NodeId {
            name: self.name().to_owned(),
            addr: self.addr(),
            generation: self.generation,
        }
    }
}

impl fmt::Debug for SimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name(), self.addr(), self.generation)
    }
}

impl foca::Identity for SimId {
    /// IPv4 address and port in one word: foca compares it with every member it holds on
    /// each update, so one comparison instead of two matters at 10,000 nodes.
    type Addr = u64;

    fn renew(&self) -> Option<Self> {
        Some(SimId {
            generation: self.generation.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> u64 {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // As NodeId: the newest generation wins, the name breaks exact ties.
        (self.generation, self.name()) > (adversary.generation, adversary.name())
    }
}

/// `NodeId`'s fields in `NodeId`'s order, borrowed: serde encodes both alike.
#[derive(Serialize)]
#[serde(rename = "NodeId")]
struct NodeIdRef<'a> {
    name: &'a str,
    addr: SocketAddr,
    generation: u64,
}

impl Serialize for SimId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        NodeIdRef {
            name: self.name(),
            addr: self.addr(),
            generation: self.generation,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SimId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = NodeId::deserialize(deserializer)?;
        SimId::new(&id.name, id.addr, id.generation)
            .ok_or_else(|| serde::de::Error::custom("the simulator has IPv4 addresses only"))
    }
}

impl From<&SimId> for NodeId {
    fn from(id: &SimId) -> Self {
        id.to_node_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grapevine::wire;

    #[test]
    fn encodes_like_node_id_and_decodes_back() {
        let node = NodeId {
            name: "node-0042".into(),
            addr: "10.0.0.42:7946".parse().unwrap(),
            generation: 1_767_225_600_123,
        };
        let sim = SimId::new(&node.name, node.addr, node.generation).unwrap();
        let member = foca::Member::new(sim, 7, foca::State::Suspect);
        let mut ours = Vec::new();
        wire::encode_datagram_into(&member, &mut ours, wire::MAX_DATAGRAM).unwrap();
        let mut theirs = Vec::new();
        wire::encode_datagram_into(
            &foca::Member::new(node.clone(), 7, foca::State::Suspect),
            &mut theirs,
            1500,
        )
        .unwrap();
        assert_eq!(ours, theirs);
        let (back, used): (foca::Member<SimId>, usize) =
            wire::decode_datagram_prefix(&theirs).unwrap();
        assert_eq!(used, theirs.len());
        assert_eq!(back, member);
        assert_eq!(back.id().to_node_id(), node);
        assert_eq!(std::mem::size_of::<foca::Member<SimId>>(), 32);
    }

    #[test]
    fn conflicts_resolve_like_node_id() {
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        for (a, b) in [
            (("a", 2), ("b", 1)),
            (("a", 1), ("b", 1)),
            (("b", 1), ("a", 1)),
        ] {
            let (x, y) = (
                SimId::new(a.0, addr, a.1).unwrap(),
                SimId::new(b.0, addr, b.1).unwrap(),
            );
            let (nx, ny) = (x.to_node_id(), y.to_node_id());
            assert_eq!(
                foca::Identity::win_addr_conflict(&x, &y),
                foca::Identity::win_addr_conflict(&nx, &ny)
            );
        }
        assert!(SimId::new("v6", "[::1]:1".parse().unwrap(), 1).is_none());
    }
}
