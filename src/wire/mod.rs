//! Wire formats: bincode with size limits, TCP framing, and the UDP datagram envelope.
//!
//! Every decoder here is bounded: datagrams by [`MAX_DATAGRAM`], TCP frames by
//! [`MAX_FRAME`] (checked from the length prefix before any allocation), and bincode by a
//! byte limit so hostile length prefixes fail without allocating.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

pub mod frames;
pub use frames::{check_hello, hello_frame, FrameBudget, FrameCodec, HelloError};

/// Largest UDP datagram grapevine sends or accepts, envelope included.
pub const MAX_DATAGRAM: usize = 1400;
/// Bytes of the datagram envelope: magic, version, kind, and in SWIM datagrams the
/// sender's [`DatagramTag`].
pub const ENVELOPE_LEN: usize = 3 + TAG_LEN;
/// Bytes of a [`DatagramTag`].
pub const TAG_LEN: usize = 8;

/// What the sender's replicated state and member list look like (two 32-bit
/// fingerprints), carried by every SWIM datagram but an acknowledgement: a node that hears
/// its peers agree with it has nothing to repair, so an idle cluster opens no TCP exchange
/// (issue 18).
pub type DatagramTag = [u8; TAG_LEN];
/// Largest TCP frame (length prefix excluded) accepted or sent.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

const MAGIC: u8 = 0x47; // 'G'
/// 2: SWIM datagrams carry the sender's tag, and config entries carry `flags`; a node of
/// version 1 would misread them, so its datagrams are refused as not grapevine's.
/// 3: acknowledgements carry their source as a hash (`membership::codec`); a node of
/// version 2 would drop them and suspect its peers, so the versions do not mix.
const VERSION: u8 = 3;

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The encoded value is larger than the limit for its channel.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// Limit that applies.
        limit: usize,
    },
    /// Encoding failed.
    #[error("encode failed: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// Bytes were left over after the message.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// A datagram without grapevine's envelope, or of an unknown version or kind.
    #[error("not a grapevine datagram")]
    BadEnvelope,
    /// An encrypted datagram, and this node has no key.
    #[error("an encrypted datagram, and this node has no cluster key")]
    Sealed,
    /// An acknowledgement whose compact source is none of the identities this node
    /// probed lately (late, or not for this node).
    #[error("an acknowledgement from an identity this node did not probe")]
    UnknownSource,
}

fn datagram_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_DATAGRAM * 2 }>()
}

fn frame_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME * 2 }>()
}

/// Encodes `value` for a TCP frame, refusing anything above [`MAX_FRAME`].
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let bytes = bincode::serde::encode_to_vec(value, frame_config())?;
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_FRAME,
        });
    }
    Ok(bytes)
}

/// Decodes one whole TCP frame; trailing bytes are an error.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_FRAME,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, frame_config())?;
    if used != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes a value from the front of a datagram payload, returning it and the bytes used.
pub fn decode_datagram_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), WireError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_DATAGRAM,
        });
    }
    Ok(bincode::serde::decode_from_slice(bytes, datagram_config())?)
}

/// Encodes a value into `out` (appending) for a datagram; fails if `out` would exceed `limit`.
pub fn encode_datagram_into<T: Serialize>(
    value: &T,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), WireError> {
    // Written in place (not into a vector of its own and copied): `out` is left as it was
    // on failure.
    let start = out.len();
    let written = bincode::serde::encode_into_std_write(value, out, datagram_config());
    let size = out.len();
    match written {
        Ok(_) if size <= limit => Ok(()),
        Ok(_) => {
            out.truncate(start);
            Err(WireError::TooLarge { size, limit })
        }
        Err(error) => {
            out.truncate(start);
            Err(error.into())
        }
    }
}

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A SWIM packet for foca.
    Swim,
    /// A notice that the sender is leaving the cluster gracefully.
    Leave,
}

impl DatagramKind {
    fn code(self) -> u8 {
        match self {
            DatagramKind::Swim => 0,
            DatagramKind::Leave => 1,
        }
    }
}

/// Kind code of a SWIM datagram that carries no tag.
const UNTAGGED_SWIM: u8 = 2;

/// Starts a datagram of `kind` in `out` (cleared first); a SWIM datagram's tag is zero
/// until [`stamp_tag`] writes it.
pub fn begin_datagram(kind: DatagramKind, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[MAGIC, VERSION, kind.code()]);
    if kind == DatagramKind::Swim {
        out.extend_from_slice(&[0; TAG_LEN]);
    }
}

/// Starts a SWIM datagram without a tag in `out` (cleared first): for acknowledgements,
/// whose sender's tag reaches peers on its own probes every probe period, so an idle
/// node's evidence halves but its tag bytes do too.
pub fn begin_untagged_swim_datagram(out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[MAGIC, VERSION, UNTAGGED_SWIM]);
}

/// Writes `tag` into a SWIM datagram begun by [`begin_datagram`]; other datagrams are left
/// as they are.
pub fn stamp_tag(datagram: &mut [u8], tag: &DatagramTag) {
    if let [MAGIC, VERSION, 0, slot @ ..] = datagram {
        if let Some(slot) = slot.get_mut(..TAG_LEN) {
            slot.copy_from_slice(tag);
        }
    }
}

/// The sender's tag of a SWIM datagram (`None` for other datagrams and malformed ones).
pub fn datagram_tag(datagram: &[u8]) -> Option<DatagramTag> {
    match datagram {
        [MAGIC, VERSION, 0, rest @ ..] => rest.get(..TAG_LEN)?.try_into().ok(),
        _ => None,
    }
}

/// Splits a received datagram into its kind and payload.
pub fn open_datagram(datagram: &[u8]) -> Result<(DatagramKind, &[u8]), WireError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge {
            size: datagram.len(),
            limit: MAX_DATAGRAM,
        });
    }
    match datagram {
        [MAGIC, VERSION, 0, rest @ ..] => match rest.get(TAG_LEN..) {
            Some(packet) => Ok((DatagramKind::Swim, packet)),
            None => Err(WireError::BadEnvelope),
        },
        [MAGIC, VERSION, 1, rest @ ..] => Ok((DatagramKind::Leave, rest)),
        [MAGIC, VERSION, UNTAGGED_SWIM, rest @ ..] => Ok((DatagramKind::Swim, rest)),
        // The sealed-datagram header (see `net::sealed`).
        [0x53, 1, ..] => Err(WireError::Sealed),
        _ => Err(WireError::BadEnvelope),
    }
}

/// Wraps a TCP stream in grapevine's length-prefixed framing (u32 big-endian prefix,
/// frames above [`MAX_FRAME`] rejected from the header; the buffer grows only with what
/// arrives).
pub fn framed<S: AsyncRead + AsyncWrite>(stream: S) -> Framed<S, FrameCodec> {
    Framed::new(stream, FrameCodec::new(MAX_FRAME))
}

/// Like [`framed`], for the connecting side of a node's TCP port: the
/// [hello](frames::hello_frame) is queued first and goes out with the first frame sent
/// (one write, no extra round trip). Every client of a node's port opens through here.
pub fn dial<S: AsyncRead + AsyncWrite>(stream: S) -> Framed<S, FrameCodec> {
    let mut framed = framed(stream);
    let hello = frames::hello_frame();
    let buffer = framed.write_buffer_mut();
    buffer.extend_from_slice(&(hello.len() as u32).to_be_bytes());
    buffer.extend_from_slice(&hello);
    framed
}

/// Like [`framed`], for an accepted connection: no frame above [`frames::UNPROVEN_FRAME`]
/// until the codec is [proved](FrameCodec::prove), and partial frames above
/// [`frames::SMALL_FRAME`] charged to the node's `budget`.
pub fn framed_accepting<S: AsyncRead + AsyncWrite>(
    stream: S,
    budget: std::sync::Arc<FrameBudget>,
) -> Framed<S, FrameCodec> {
    Framed::new(stream, FrameCodec::accepting(MAX_FRAME, budget))
}

/// Stable 64-bit FNV-1a with a final avalanche (SplitMix64 finalizer), so that sums of
/// entry hashes are well spread. Part of the wire protocol: do not change it.
#[derive(Debug, Clone)]
pub struct StableHasher(u64);

impl StableHasher {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// A hasher with FNV-1a's offset basis.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        StableHasher(Self::OFFSET)
    }

    /// Feeds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// Feeds a length, then the bytes (so that concatenations cannot collide).
    pub fn write_len_prefixed(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// [`StableHasher`] over one byte string.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hasher = StableHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_trailing_rejected() {
        let bytes = encode_frame(&("hello".to_string(), 42u64)).unwrap();
        let back: (String, u64) = decode_frame(&bytes).unwrap();
        assert_eq!(back, ("hello".to_string(), 42));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_frame::<(String, u64)>(&longer),
            Err(WireError::Trailing(1))
        ));
    }

    #[test]
    fn huge_length_prefix_fails_without_allocating() {
        // A varint claiming a string of u64::MAX bytes.
        let bytes = [0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode_frame::<String>(&bytes).is_err());
        assert!(decode_frame::<Vec<String>>(&bytes).is_err());
    }

    #[test]
    fn datagram_values_append_in_place_and_one_over_the_limit_leaves_the_buffer_alone() {
        let mut out = vec![9u8];
        encode_datagram_into(&("ab".to_string(), 300u64), &mut out, 16).unwrap();
        assert_eq!(
            out,
            [
                &[9u8][..],
                &bincode::serde::encode_to_vec(&("ab".to_string(), 300u64), datagram_config())
                    .unwrap()
            ]
            .concat()
        );
        let before = out.clone();
        let refused = encode_datagram_into(&"x".repeat(20), &mut out, 16);
        assert!(
            matches!(
                refused,
                Err(WireError::TooLarge {
                    size: 28,
                    limit: 16
                })
            ),
            "{refused:?}"
        );
        assert_eq!(out, before);
    }

    #[test]
    fn envelope() {
        let mut out = Vec::new();
        begin_datagram(DatagramKind::Leave, &mut out);
        out.push(7);
        assert_eq!(
            open_datagram(&out).unwrap(),
            (DatagramKind::Leave, &[7u8][..])
        );
        assert!(open_datagram(&[1, 2, 3]).is_err());
        assert!(open_datagram(&[]).is_err());
        assert!(open_datagram(&vec![MAGIC; MAX_DATAGRAM + 1]).is_err());
    }

    #[test]
    fn swim_datagrams_carry_a_tag_that_leave_notices_do_not() {
        let mut swim = Vec::new();
        begin_datagram(DatagramKind::Swim, &mut swim);
        swim.extend_from_slice(b"packet");
        assert_eq!(datagram_tag(&swim), Some([0; TAG_LEN]));
        stamp_tag(&mut swim, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(datagram_tag(&swim), Some([1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(
            open_datagram(&swim).unwrap(),
            (DatagramKind::Swim, &b"packet"[..])
        );
        // A SWIM header cut inside its tag is malformed, not an empty packet.
        assert!(open_datagram(&swim[..ENVELOPE_LEN - 1]).is_err());
        assert_eq!(datagram_tag(&swim[..ENVELOPE_LEN - 1]), None);

        let mut leave = Vec::new();
        begin_datagram(DatagramKind::Leave, &mut leave);
        leave.push(9);
        stamp_tag(&mut leave, &[1; TAG_LEN]);
        assert_eq!(leave[3..], [9]);
        assert_eq!(datagram_tag(&leave), None);

        // An untagged SWIM datagram: no tag to read or stamp, the packet right after.
        let mut untagged = Vec::new();
        begin_untagged_swim_datagram(&mut untagged);
        untagged.extend_from_slice(b"ack");
        stamp_tag(&mut untagged, &[1; TAG_LEN]);
        assert_eq!(datagram_tag(&untagged), None);
        assert_eq!(
            open_datagram(&untagged).unwrap(),
            (DatagramKind::Swim, &b"ack"[..])
        );
    }
}
