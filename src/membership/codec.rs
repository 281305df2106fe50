//! foca codec: bincode with size limits, and a compact destination on probes.
//!
//! Most SWIM packets (ping, ack, indirect probes) are addressed to a member's current
//! identity, which the receiver already knows: sending that identity in full (name,
//! address, generation) doubled the size of an idle cluster's packets. Such a destination
//! goes as a 4-byte hash instead, which the receiver's codec turns back into its own
//! identity when it matches. An announce, whose destination may be a placeholder, and a
//! codec that does not know its own identity, keep the full form.
//!
//! An acknowledgement (ack, indirect ack, forwarded ack) also sends its *source* as a hash:
//! it answers a probe the receiver sent moments ago to exactly that identity, so the
//! receiver's codec, which remembers the destinations of its last probes, turns it back.
//! An acknowledgement from an identity it did not probe cannot be resolved and is dropped,
//! as foca would ignore it anyway. Other sources stay in full: a pinged node may not know
//! its prober yet (that is how a joiner becomes known).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Buf, BufMut};
use foca::{Header, Incarnation, Member, Message};
use serde::{de::DeserializeOwned, Serialize};

use crate::wire::{self, WireError};

/// Header form: the destination identity in full.
const FULL_DESTINATION: u8 = 0;
/// Header form: the destination as a hash of its identity.
const HASHED_DESTINATION: u8 = 1;
/// Header form, acknowledgements only: destination and source as hashes.
const HASHED_ACKNOWLEDGEMENT: u8 = 2;
/// Probe destinations remembered to resolve acknowledgements: a probe period's direct and
/// indirect probes with room to spare (an acknowledgement later than that is useless).
const REMEMBERED_PROBES: usize = 32;

/// The identity a node's codec decodes hashed destinations against, shared between the
/// node's protocol logic and its codec (which foca owns). The protocol logic calls
/// [`follow`](Self::follow) after every foca call: after a renewal, packets addressed to
/// the new identity must decode as addressed to this node, or its probes all fail.
#[derive(Debug, Clone)]
pub struct LocalIdentity<T>(Arc<Mutex<(T, Option<u32>)>>);

impl<T: Serialize + Clone + PartialEq> LocalIdentity<T> {
    /// Tracks `identity` from the start.
    pub fn new(identity: T) -> Self {
        // An identity too large to encode cannot be a header's destination: no hash.
        let hash = identity_hash(&identity).ok();
        LocalIdentity(Arc::new(Mutex::new((identity, hash))))
    }

    /// Brings the tracked identity up to date with foca's (a no-op unless it renewed).
    pub fn follow(&self, current: &T) {
        let mut local = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if local.0 != *current {
            *local = (current.clone(), identity_hash(current).ok());
        }
    }

    /// This node's identity if `hash` is its hash.
    fn matching(&self, hash: u32) -> Option<T> {
        let local = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (local.1 == Some(hash)).then(|| local.0.clone())
    }

    /// The hash of `identity` if it is this node's current identity.
    fn hash_if_current(&self, identity: &T) -> Option<u32> {
        let local = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if local.0 == *identity {
            local.1
        } else {
            None
        }
    }
}

/// Encodes foca headers and members with bincode. Encoding goes through a scratch buffer so
/// the space left in foca's packet is checked before anything is written.
#[derive(Debug)]
pub struct BincodeCodec<T> {
    scratch: Vec<u8>,
    /// This node's identity, if known: headers addressed to it arrive with a hashed
    /// destination, and it sends hashed destinations only when it can decode them too.
    local: Option<LocalIdentity<T>>,
    /// What a hashed destination that is not this node decodes to: an identity that
    /// matches no node, so foca ignores the payload as addressed to someone else.
    stranger: Option<T>,
    /// The destinations of this node's last probes and their hashes, newest last: the
    /// sources of the acknowledgements that may arrive.
    probed: VecDeque<(u32, T)>,
}

impl<T> Default for BincodeCodec<T> {
    fn default() -> Self {
        BincodeCodec {
            scratch: Vec::new(),
            local: None,
            stranger: None,
            probed: VecDeque::new(),
        }
    }
}

impl<T: Clone> BincodeCodec<T> {
    /// A codec that sends and accepts hashed destinations for `local`; a hashed
    /// destination that is not `local` decodes to `stranger` (which must differ from
    /// every real identity).
    pub fn with_local(local: LocalIdentity<T>, stranger: T) -> Self {
        BincodeCodec {
            scratch: Vec::new(),
            local: Some(local),
            stranger: Some(stranger),
            probed: VecDeque::new(),
        }
    }
}

impl<T: PartialEq> BincodeCodec<T> {
    /// Remembers that a probe went to `identity`, so that its acknowledgement resolves.
    fn remember_probe(&mut self, hash: u32, identity: &T)
    where
        T: Clone,
    {
        // A destination probed again moves to the back: the queue keeps the latest probes.
        if let Some(at) = self
            .probed
            .iter()
            .position(|(h, id)| *h == hash && id == identity)
        {
            if let Some(entry) = self.probed.remove(at) {
                self.probed.push_back(entry);
            }
            return;
        }
        if self.probed.len() == REMEMBERED_PROBES {
            self.probed.pop_front();
        }
        self.probed.push_back((hash, identity.clone()));
    }

    /// This node's identity and the stranger: what a hashed destination decodes to, once
    /// both are known (before, a hashed header cannot be read).
    fn hash_decoding(&self) -> Result<(&LocalIdentity<T>, &T), WireError> {
        match (&self.local, &self.stranger) {
            (Some(local), Some(stranger)) => Ok((local, stranger)),
            _ => Err(WireError::BadEnvelope),
        }
    }

    /// The probed identity whose hash is `hash`, the newest if two share it.
    fn probed_with(&self, hash: u32) -> Option<&T> {
        self.probed
            .iter()
            .rev()
            .find(|(h, _)| *h == hash)
            .map(|(_, id)| id)
    }
}

/// Whether a foca packet encoded by this codec is an acknowledgement with a compact
/// source (its header form comes first).
pub fn is_compact_acknowledgement(packet: &[u8]) -> bool {
    packet.first() == Some(&HASHED_ACKNOWLEDGEMENT)
}

/// Messages that probe their destination (an acknowledgement may come back from it).
fn is_probe<T>(message: &Message<T>) -> bool {
    matches!(
        message,
        Message::Ping(_) | Message::PingReq { .. } | Message::IndirectPing { .. }
    )
}

/// Messages that answer a probe from its destination.
fn is_acknowledgement<T>(message: &Message<T>) -> bool {
    matches!(
        message,
        Message::Ack(_) | Message::IndirectAck { .. } | Message::ForwardedAck { .. }
    )
}

impl<T> BincodeCodec<T> {
    fn put(&mut self, mut buf: impl BufMut) -> Result<(), WireError> {
        if self.scratch.len() > buf.remaining_mut() {
            return Err(WireError::TooLarge {
                size: self.scratch.len(),
                limit: buf.remaining_mut(),
            });
        }
        buf.put_slice(&self.scratch);
        Ok(())
    }

    fn take<V: DeserializeOwned>(mut buf: impl Buf) -> Result<V, WireError> {
        // foca hands over a contiguous slice, so the first chunk is the whole payload.
        let (value, used) = wire::decode_datagram_prefix(buf.chunk())?;
        buf.advance(used);
        Ok(value)
    }
}

/// `N` 4-byte hashes from the front of `buf`.
fn read_hashes<const N: usize>(buf: &mut impl Buf) -> Result<[u32; N], WireError> {
    if buf.remaining() < 4 * N {
        return Err(WireError::BadEnvelope);
    }
    Ok(std::array::from_fn(|_| buf.get_u32_le()))
}

/// The 4-byte hash a destination identity travels as.
fn identity_hash<T: Serialize>(identity: &T) -> Result<u32, WireError> {
    identity_hash_in(identity, &mut Vec::new())
}

/// [`identity_hash`], encoding the identity in `scratch` (left empty): no allocation per
/// datagram once the buffer has grown.
fn identity_hash_in<T: Serialize>(identity: &T, scratch: &mut Vec<u8>) -> Result<u32, WireError> {
    scratch.clear();
    let encoded = wire::encode_datagram_into(identity, scratch, wire::MAX_DATAGRAM);
    let hash = wire::stable_hash(scratch) as u32;
    scratch.clear();
    encoded.map(|_| hash)
}

/// Generic over the identity so that simulations can store a compact identity type with
/// the same encoding as [`NodeId`](super::NodeId).
impl<T> foca::Codec<T> for BincodeCodec<T>
where
    T: foca::Identity + Serialize + DeserializeOwned,
{
    type Error = WireError;

    fn encode_header(&mut self, header: &Header<T>, buf: impl BufMut) -> Result<(), WireError> {
        self.scratch.clear();
        // An announce may go to a placeholder the receiver cannot recognise by hash.
        let hashed = self.local.is_some() && header.message != Message::Announce;
        if hashed {
            let dst_hash = identity_hash_in(&header.dst, &mut self.scratch)?;
            if is_probe(&header.message) {
                self.remember_probe(dst_hash, &header.dst);
            }
            let src_hash = match &self.local {
                Some(local) if is_acknowledgement(&header.message) => {
                    local.hash_if_current(&header.src)
                }
                _ => None,
            };
            if let Some(src_hash) = src_hash {
                self.scratch.push(HASHED_ACKNOWLEDGEMENT);
                self.scratch.extend_from_slice(&dst_hash.to_le_bytes());
                self.scratch.extend_from_slice(&src_hash.to_le_bytes());
                let rest = (header.src_incarnation, &header.message);
                wire::encode_datagram_into(&rest, &mut self.scratch, wire::MAX_DATAGRAM)?;
            } else {
                self.scratch.push(HASHED_DESTINATION);
                self.scratch.extend_from_slice(&dst_hash.to_le_bytes());
                let rest = (&header.src, header.src_incarnation, &header.message);
                wire::encode_datagram_into(&rest, &mut self.scratch, wire::MAX_DATAGRAM)?;
            }
        } else {
            self.scratch.push(FULL_DESTINATION);
            wire::encode_datagram_into(header, &mut self.scratch, wire::MAX_DATAGRAM)?;
        }
        self.put(buf)
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<T>, WireError> {
        if !buf.has_remaining() {
            return Err(WireError::BadEnvelope);
        }
        match buf.get_u8() {
            FULL_DESTINATION => Self::take(buf),
            HASHED_DESTINATION => {
                let (local, stranger) = self.hash_decoding()?;
                let [dst_hash] = read_hashes(&mut buf)?;
                let (src, src_incarnation, message): (T, Incarnation, Message<T>) =
                    Self::take(buf)?;
                Ok(Header {
                    src,
                    src_incarnation,
                    dst: local.matching(dst_hash).unwrap_or_else(|| stranger.clone()),
                    message,
                })
            }
            HASHED_ACKNOWLEDGEMENT => {
                let (local, stranger) = self.hash_decoding()?;
                let [dst_hash, src_hash] = read_hashes(&mut buf)?;
                let (src_incarnation, message): (Incarnation, Message<T>) = Self::take(buf)?;
                if !is_acknowledgement(&message) {
                    return Err(WireError::BadEnvelope);
                }
                let src = self
                    .probed_with(src_hash)
                    .cloned()
                    .ok_or(WireError::UnknownSource)?;
                Ok(Header {
                    src,
                    src_incarnation,
                    dst: local.matching(dst_hash).unwrap_or_else(|| stranger.clone()),
                    message,
                })
            }
            _ => Err(WireError::BadEnvelope),
        }
    }

    fn encode_member(&mut self, member: &Member<T>, buf: impl BufMut) -> Result<(), WireError> {
        self.scratch.clear();
        wire::encode_datagram_into(member, &mut self.scratch, wire::MAX_DATAGRAM)?;
        self.put(buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<T>, WireError> {
        Self::take(buf)
    }
}

#[cfg(test)]
mod tests {
    use foca::Codec;

    use super::*;
    use crate::membership::NodeId;

    fn id(name: &str, port: u16, generation: u64) -> NodeId {
        NodeId {
            name: name.into(),
            addr: ([127, 0, 0, 1], port).into(),
            generation,
        }
    }

    fn codec_of(identity: &NodeId) -> BincodeCodec<NodeId> {
        BincodeCodec::with_local(
            LocalIdentity::new(identity.clone()),
            NodeId::seed(identity.addr),
        )
    }

    fn round_trip(
        from: &mut BincodeCodec<NodeId>,
        to: &mut BincodeCodec<NodeId>,
        header: &Header<NodeId>,
    ) -> (usize, Header<NodeId>) {
        let mut buf = Vec::new();
        from.encode_header(header, &mut buf).unwrap();
        (buf.len(), to.decode_header(&buf[..]).unwrap())
    }

    #[test]
    fn a_probe_to_the_receiver_arrives_addressed_to_it_and_smaller() {
        let (a, b) = (id("node-a", 7001, 1_764_000_000_000), id("node-b", 7002, 9));
        let ping = Header {
            src: a.clone(),
            src_incarnation: 3,
            dst: b.clone(),
            message: Message::Ping(7),
        };
        let (size, decoded) = round_trip(&mut codec_of(&a), &mut codec_of(&b), &ping);
        assert_eq!(decoded, ping);
        let mut full = Vec::new();
        BincodeCodec::default()
            .encode_header(&ping, &mut full)
            .unwrap();
        assert!(
            size + 10 < full.len(),
            "hashed {size} B, full {} B",
            full.len()
        );
    }

    #[test]
    fn a_probe_to_an_older_identity_is_not_for_the_receiver() {
        let (a, b) = (id("node-a", 7001, 1), id("node-b", 7002, 9));
        let stale = Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: id("node-b", 7002, 8),
            message: Message::Ping(1),
        };
        let (_, decoded) = round_trip(&mut codec_of(&a), &mut codec_of(&b), &stale);
        assert_ne!(decoded.dst, b);
        assert_eq!(decoded.dst, NodeId::seed(b.addr));
    }

    #[test]
    fn after_a_renewal_probes_to_the_new_identity_are_for_the_receiver() {
        let (a, old, new) = (
            id("node-a", 7001, 1),
            id("node-b", 7002, 9),
            id("node-b", 7002, 10),
        );
        let local = LocalIdentity::new(old.clone());
        let mut b = BincodeCodec::with_local(local.clone(), NodeId::seed(old.addr));
        let to = |dst: &NodeId| Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: dst.clone(),
            message: Message::Ping(1),
        };
        // Until the node follows its renewal, the new identity is a stranger...
        assert_eq!(
            round_trip(&mut codec_of(&a), &mut b, &to(&new)).1.dst,
            NodeId::seed(old.addr)
        );
        local.follow(&new);
        // ...then it is this node, and the old identity no longer is.
        assert_eq!(round_trip(&mut codec_of(&a), &mut b, &to(&new)).1, to(&new));
        assert_eq!(
            round_trip(&mut codec_of(&a), &mut b, &to(&old)).1.dst,
            NodeId::seed(old.addr)
        );
    }

    #[test]
    fn an_acknowledgement_comes_from_the_probed_identity_in_a_few_bytes() {
        let (a, b) = (id("node-a", 7001, 1_764_000_000_000), id("node-b", 7002, 9));
        let (mut codec_a, mut codec_b) = (codec_of(&a), codec_of(&b));
        let ping = Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: b.clone(),
            message: Message::Ping(7),
        };
        let (ping_size, _) = round_trip(&mut codec_a, &mut codec_b, &ping);
        let ack = Header {
            src: b.clone(),
            src_incarnation: 2,
            dst: a.clone(),
            message: Message::Ack(7),
        };
        let (ack_size, decoded) = round_trip(&mut codec_b, &mut codec_a, &ack);
        assert_eq!(decoded, ack);
        // The source (name, address, generation) went as 4 bytes.
        assert!(
            ack_size + 10 < ping_size,
            "ack {ack_size} B, ping {ping_size} B"
        );
    }

    #[test]
    fn acknowledgements_travel_untagged_and_probes_tagged() {
        let (a, b) = (id("node-a", 7001, 1), id("node-b", 7002, 9));
        let datagram_of = |codec: &mut BincodeCodec<NodeId>, header: &Header<NodeId>| {
            let mut packet = Vec::new();
            codec.encode_header(header, &mut packet).unwrap();
            crate::membership::swim_datagram(&packet)
        };
        let ping = Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: b.clone(),
            message: Message::Ping(1),
        };
        let ack = Header {
            src: b.clone(),
            src_incarnation: 0,
            dst: a.clone(),
            message: Message::Ack(1),
        };
        let (ping, ack) = (
            datagram_of(&mut codec_of(&a), &ping),
            datagram_of(&mut codec_of(&b), &ack),
        );
        assert!(wire::datagram_tag(&ping).is_some());
        assert_eq!(wire::datagram_tag(&ack), None);
        // Both open as SWIM packets whose header the codec reads.
        for datagram in [&ping, &ack] {
            let (kind, packet) = wire::open_datagram(datagram).unwrap();
            assert_eq!(kind, wire::DatagramKind::Swim);
            assert!(!packet.is_empty());
        }
    }

    #[test]
    fn indirect_acknowledgements_resolve_through_the_probes_that_asked_for_them() {
        let (origin, relay, target) = (
            id("origin", 7001, 1),
            id("relay", 7002, 2),
            id("target", 7003, 3),
        );
        let (mut at_origin, mut at_relay, mut at_target) =
            (codec_of(&origin), codec_of(&relay), codec_of(&target));
        let ask = Header {
            src: origin.clone(),
            src_incarnation: 0,
            dst: relay.clone(),
            message: Message::PingReq {
                target: target.clone(),
                probe_number: 4,
            },
        };
        round_trip(&mut at_origin, &mut at_relay, &ask);
        let indirect = Header {
            src: relay.clone(),
            src_incarnation: 0,
            dst: target.clone(),
            message: Message::IndirectPing {
                origin: origin.clone(),
                probe_number: 4,
            },
        };
        round_trip(&mut at_relay, &mut at_target, &indirect);
        let answer = Header {
            src: target.clone(),
            src_incarnation: 0,
            dst: relay.clone(),
            message: Message::IndirectAck {
                target: origin.clone(),
                probe_number: 4,
            },
        };
        assert_eq!(round_trip(&mut at_target, &mut at_relay, &answer).1, answer);
        let forwarded = Header {
            src: relay.clone(),
            src_incarnation: 0,
            dst: origin.clone(),
            message: Message::ForwardedAck {
                origin: target.clone(),
                probe_number: 4,
            },
        };
        assert_eq!(
            round_trip(&mut at_relay, &mut at_origin, &forwarded).1,
            forwarded
        );
    }

    #[test]
    fn an_acknowledgement_from_an_identity_not_probed_is_refused() {
        let (a, b) = (id("node-a", 7001, 1), id("node-b", 7002, 9));
        let (mut codec_a, mut codec_b) = (codec_of(&a), codec_of(&b));
        // `a` probed b's previous generation; b answers as its current one.
        let ping = Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: id("node-b", 7002, 8),
            message: Message::Ping(1),
        };
        let mut buf = Vec::new();
        codec_a.encode_header(&ping, &mut buf).unwrap();
        let ack = Header {
            src: b.clone(),
            src_incarnation: 0,
            dst: a.clone(),
            message: Message::Ack(1),
        };
        let mut buf = Vec::new();
        codec_b.encode_header(&ack, &mut buf).unwrap();
        assert!(matches!(
            codec_a.decode_header(&buf[..]),
            Err(WireError::UnknownSource)
        ));
        // Only acknowledgements may use the compact source.
        buf[0] = HASHED_ACKNOWLEDGEMENT;
        let ping_as_ack = {
            let mut bytes = buf[..9].to_vec();
            wire::encode_datagram_into(
                &(0u16, Message::<NodeId>::Ping(1)),
                &mut bytes,
                wire::MAX_DATAGRAM,
            )
            .unwrap();
            bytes
        };
        assert!(matches!(
            codec_a.decode_header(&ping_as_ack[..]),
            Err(WireError::BadEnvelope)
        ));
    }

    #[test]
    fn a_destination_probed_often_stays_remembered_while_others_come_and_go() {
        let (origin, relay) = (id("origin", 7001, 1), id("relay", 7002, 2));
        let (mut at_origin, mut at_relay) = (codec_of(&origin), codec_of(&relay));
        let ask = |probe_number| Header {
            src: origin.clone(),
            src_incarnation: 0,
            dst: relay.clone(),
            message: Message::PingReq {
                target: id("target", 7003, 3),
                probe_number,
            },
        };
        round_trip(&mut at_origin, &mut at_relay, &ask(0));
        // More probes than the queue holds, the relay asked again halfway: that renewal must
        // keep it from ageing out with its first ask.
        let half = REMEMBERED_PROBES as u16 - 4;
        for round in 1..=2 * half {
            let other = id("other", 9000 + round, 1);
            let ping = Header {
                src: origin.clone(),
                src_incarnation: 0,
                dst: other.clone(),
                message: Message::Ping(round as u8),
            };
            round_trip(&mut at_origin, &mut codec_of(&other), &ping);
            if round == half {
                round_trip(&mut at_origin, &mut at_relay, &ask(round as u8));
            }
        }
        let forwarded = Header {
            src: relay.clone(),
            src_incarnation: 0,
            dst: origin.clone(),
            message: Message::ForwardedAck {
                origin: id("target", 7003, 3),
                probe_number: 120,
            },
        };
        assert_eq!(
            round_trip(&mut at_relay, &mut at_origin, &forwarded).1,
            forwarded
        );
    }

    #[test]
    fn a_probe_keeps_its_source_in_full_and_memory_of_probes_is_bounded() {
        let a = id("node-a", 7001, 1);
        let mut codec_a = codec_of(&a);
        for port in 0..200 {
            let b = id("node-b", 8000 + port, 9);
            let ping = Header {
                src: a.clone(),
                src_incarnation: 0,
                dst: b.clone(),
                message: Message::Ping(1),
            };
            // A node that never heard of `a` learns it from the ping itself.
            assert_eq!(round_trip(&mut codec_a, &mut codec_of(&b), &ping).1, ping);
        }
        assert_eq!(codec_a.probed.len(), REMEMBERED_PROBES);
    }

    #[test]
    fn an_announce_keeps_its_destination_in_full() {
        let (a, b) = (id("node-a", 7001, 1), id("node-b", 7002, 9));
        let announce = Header {
            src: a.clone(),
            src_incarnation: 0,
            dst: NodeId::seed(b.addr),
            message: Message::Announce,
        };
        let (_, decoded) = round_trip(&mut codec_of(&a), &mut codec_of(&b), &announce);
        assert_eq!(decoded, announce);
    }

    #[test]
    fn truncated_or_unknown_headers_are_errors() {
        let mut codec = codec_of(&id("node-b", 7002, 9));
        let short_ack = [HASHED_ACKNOWLEDGEMENT, 1, 2, 3, 4, 5, 6, 7];
        for bad in [
            &[][..],
            &[HASHED_DESTINATION, 1, 2][..],
            &short_ack[..],
            &[9, 0, 0][..],
        ] {
            assert!(codec.decode_header(bad).is_err(), "{bad:?}");
        }
        // Without its own identity a codec cannot resolve a hashed destination.
        let hashed = [HASHED_DESTINATION, 0, 0, 0, 0, 0];
        assert!(BincodeCodec::<NodeId>::default()
            .decode_header(&hashed[..])
            .is_err());
    }
}
