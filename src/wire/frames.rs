//! TCP framing whose memory follows what arrived, not what a peer declared.
//!
//! A frame is a big-endian `u32` length and that many bytes (the layout of tokio-util's
//! `LengthDelimitedCodec`, which every grapevine version speaks). That codec reserves the
//! whole declared length as soon as it reads a header, so anyone who can reach the port could
//! make the agent allocate 8 MiB per connection by sending four bytes. This one lets the read
//! buffer grow only with the bytes that actually arrived, and, on a node's listening side,
//! charges every partial frame above [`SMALL_FRAME`] to a node-wide [`FrameBudget`]: when the
//! budget is spent, the connection that needs more is refused (and counted) instead of
//! growing the heap.
//!
//! Before any of that, a connecting side opens with a small [hello](hello_frame) (a magic
//! and [`TCP_PROTOCOL`]); until the listening side accepted it, a connection may declare no
//! frame above [`UNPROVEN_FRAME`], so a peer that proved nothing cannot get more than a
//! kilobyte buffered. [`dial`](super::dial) is the one place that sends it.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Bytes of a partial frame every connection may buffer without charging the budget.
pub const SMALL_FRAME: usize = 8 * 1024;
/// Largest frame a connection may declare before its hello was accepted.
pub const UNPROVEN_FRAME: usize = 1024;
/// Version of the TCP protocol a hello announces (1: connections open with a hello).
pub const TCP_PROTOCOL: u16 = 1;
/// What a hello starts with; the protocol version follows, big-endian.
const HELLO_MAGIC: [u8; 8] = *b"grapevin";
/// Bytes of a hello frame's payload.
pub const HELLO_LEN: usize = HELLO_MAGIC.len() + 2;

/// The payload of the hello frame a connecting side sends first.
pub fn hello_frame() -> Bytes {
    let mut hello = BytesMut::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&HELLO_MAGIC);
    hello.put_u16(TCP_PROTOCOL);
    hello.freeze()
}

/// Why a connection's first frame was not an acceptable hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not a hello at all: an older grapevine, another protocol, or junk.
    #[error("the connection did not open with a grapevine hello")]
    Missing,
    /// A hello of a protocol version this node does not speak.
    #[error("TCP protocol version {0} is not supported (this node speaks {TCP_PROTOCOL})")]
    Version(u16),
}

/// Checks that `frame` (a connection's first) is a hello of a version this node speaks.
pub fn check_hello(frame: &[u8]) -> Result<(), HelloError> {
    match frame {
        [magic @ .., high, low] if frame.len() == HELLO_LEN && magic == HELLO_MAGIC => {
            match u16::from_be_bytes([*high, *low]) {
                TCP_PROTOCOL => Ok(()),
                other => Err(HelloError::Version(other)),
            }
        }
        _ => Err(HelloError::Missing),
    }
}

/// Default node-wide budget for partial inbound frames above [`SMALL_FRAME`].
pub const DEFAULT_FRAME_BUDGET: usize = 12 * 1024 * 1024;

/// Memory shared by a node's inbound connections for frames still arriving.
#[derive(Debug)]
pub struct FrameBudget {
    limit: usize,
    used: AtomicUsize,
    refused: AtomicU64,
}

impl FrameBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(FrameBudget {
            limit,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Bytes currently charged.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Connections refused because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(bytes).filter(|n| *n <= self.limit) else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Length-prefixed frames (`u32` big-endian), at most `max_frame` bytes each.
#[derive(Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// Largest frame accepted now: [`UNPROVEN_FRAME`] until [`FrameCodec::prove`].
    limit: usize,
    /// Length of the frame being received, once its header is read.
    pending: Option<usize>,
    budget: Option<Arc<FrameBudget>>,
    /// Bytes charged to the budget for the frame being received.
    charged: usize,
}

impl FrameCodec {
    /// A codec for frames up to `max_frame` bytes, not charging any budget (client side).
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame,
            limit: max_frame,
            pending: None,
            budget: None,
            charged: 0,
        }
    }

    /// A codec whose partial frames above [`SMALL_FRAME`] are charged to `budget`.
    pub fn with_budget(max_frame: usize, budget: Arc<FrameBudget>) -> Self {
        FrameCodec {
            budget: Some(budget),
            ..FrameCodec::new(max_frame)
        }
    }

    /// The listening side's codec: charged to `budget`, and taking no frame above
    /// [`UNPROVEN_FRAME`] until [`FrameCodec::prove`] (a declared length above it is an
    /// error of kind [`io::ErrorKind::PermissionDenied`] before anything is buffered).
    pub fn accepting(max_frame: usize, budget: Arc<FrameBudget>) -> Self {
        let mut codec = FrameCodec::with_budget(max_frame, budget);
        codec.limit = UNPROVEN_FRAME.min(max_frame);
        codec
    }

    /// The peer proved itself (its hello was accepted): frames up to the maximum from now on.
    pub fn prove(&mut self) {
        self.limit = self.max_frame;
    }

    /// Whether frames up to the maximum are accepted (see [`FrameCodec::prove`]).
    pub fn is_proven(&self) -> bool {
        self.limit == self.max_frame
    }

    /// Charges the budget for a read buffer of `capacity` bytes (beyond the free allowance).
    fn charge(&mut self, capacity: usize) -> io::Result<()> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let wanted = capacity.saturating_sub(SMALL_FRAME);
        if wanted <= self.charged {
            return Ok(());
        }
        if !budget.try_take(wanted - self.charged) {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "inbound frame memory budget spent: connection refused",
            ));
        }
        self.charged = wanted;
        Ok(())
    }

    fn release(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(std::mem::take(&mut self.charged));
        }
    }
}

impl Drop for FrameCodec {
    fn drop(&mut self) {
        self.release();
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                if src.len() < 4 {
                    return Ok(None);
                }
                let len = src.get_u32() as usize;
                if len > self.limit && !self.is_proven() {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "frame of {len} bytes declared before the hello; at most {} \
                             bytes until then",
                            self.limit
                        ),
                    ));
                }
                if len > self.max_frame {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "frame of {len} bytes declared; the limit is {}",
                            self.max_frame
                        ),
                    ));
                }
                self.pending = Some(len);
                len
            }
        };
        if src.len() < len {
            // The caller's read buffer grows with what arrives (never to `len` at once):
            // charge what it holds now.
            self.charge(src.capacity().max(src.len()))?;
            return Ok(None);
        }
        self.pending = None;
        let frame = src.split_to(len);
        self.release();
        Ok(Some(frame))
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        if frame.len() > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes; the limit is {}",
                    frame.len(),
                    self.max_frame
                ),
            ));
        }
        dst.reserve(4 + frame.len());
        dst.put_u32(frame.len() as u32);
        dst.extend_from_slice(&frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32) -> BytesMut {
        let mut bytes = BytesMut::new();
        bytes.put_u32(len);
        bytes
    }

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut codec = FrameCodec::new(1024);
        let mut wire = BytesMut::new();
        for frame in [&b"hello"[..], b"", &[7u8; 1000]] {
            codec
                .encode(Bytes::copy_from_slice(frame), &mut wire)
                .unwrap();
        }
        let all = wire.freeze();
        for cut in 0..all.len() {
            let mut decoder = FrameCodec::new(1024);
            let mut buffer = BytesMut::from(&all[..cut]);
            let mut frames = Vec::new();
            while let Some(frame) = decoder.decode(&mut buffer).unwrap() {
                frames.push(frame);
            }
            buffer.extend_from_slice(&all[cut..]);
            while let Some(frame) = decoder.decode(&mut buffer).unwrap() {
                frames.push(frame);
            }
            assert_eq!(frames.len(), 3, "cut at {cut}");
            assert_eq!(&frames[0][..], b"hello");
            assert!(frames[1].is_empty());
            assert_eq!(frames[2].len(), 1000);
        }
    }

    #[test]
    fn a_declared_length_allocates_nothing_and_oversize_is_refused() {
        let mut codec = FrameCodec::new(8 << 20);
        let mut buffer = header(8 << 20);
        buffer.extend_from_slice(&[0; 100]);
        assert!(codec.decode(&mut buffer).unwrap().is_none());
        assert!(buffer.capacity() < 4096, "{}", buffer.capacity());
        let mut codec = FrameCodec::new(1024);
        let error = codec.decode(&mut header(1025)).unwrap_err();
        assert!(error.to_string().contains("limit is 1024"), "{error}");
        assert!(FrameCodec::new(4)
            .encode(Bytes::from_static(b"12345"), &mut BytesMut::new())
            .is_err());
    }

    #[test]
    fn partial_frames_are_charged_to_the_budget_and_given_back() {
        let budget = FrameBudget::new(100_000);
        let mut first = FrameCodec::with_budget(1 << 20, budget.clone());
        let mut buffer = header(200_000);
        buffer.extend_from_slice(&vec![1; 60_000]);
        assert!(first.decode(&mut buffer).unwrap().is_none());
        assert!(budget.used() >= 60_000 - SMALL_FRAME);
        // A second connection cannot take what is left and more.
        let mut second = FrameCodec::with_budget(1 << 20, budget.clone());
        let mut other = header(200_000);
        other.extend_from_slice(&vec![1; 120_000]);
        let error = second.decode(&mut other).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::OutOfMemory);
        assert_eq!(budget.refused(), 1);
        drop(second);
        // A small frame costs nothing.
        let mut small = FrameCodec::with_budget(1 << 20, budget.clone());
        let mut bytes = header(10_000);
        bytes.extend_from_slice(&vec![2; 5_000]);
        let before = budget.used();
        assert!(small.decode(&mut bytes).unwrap().is_none());
        assert_eq!(budget.used(), before);
        // Completing the frame gives its charge back, as does dropping a connection.
        buffer.extend_from_slice(&vec![1; 140_000]);
        assert_eq!(first.decode(&mut buffer).unwrap().unwrap().len(), 200_000);
        assert_eq!(budget.used(), 0);
        let mut third = FrameCodec::with_budget(1 << 20, budget.clone());
        let mut partial = header(200_000);
        partial.extend_from_slice(&vec![1; 50_000]);
        assert!(third.decode(&mut partial).unwrap().is_none());
        assert!(budget.used() > 0);
        drop(third);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn before_the_hello_only_small_frames_are_taken_and_nothing_is_charged() {
        let budget = FrameBudget::new(1 << 20);
        let mut codec = FrameCodec::accepting(8 << 20, budget.clone());
        assert!(!codec.is_proven());
        // A large declared frame is refused from its header, before a byte is buffered.
        let mut big = header(200_000);
        big.extend_from_slice(&vec![1; 60_000]);
        let error = codec.decode(&mut big).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.refused(), 0);
        // So is one above the frame limit, the same way (junk before a hello).
        let mut codec = FrameCodec::accepting(8 << 20, budget.clone());
        let error = codec.decode(&mut header(u32::MAX)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        // A hello passes; after `prove`, the large frame is taken and charged.
        let mut codec = FrameCodec::accepting(8 << 20, budget.clone());
        let mut wire = BytesMut::new();
        FrameCodec::new(64)
            .encode(hello_frame(), &mut wire)
            .unwrap();
        let hello = codec.decode(&mut wire).unwrap().unwrap();
        assert_eq!(check_hello(&hello), Ok(()));
        codec.prove();
        assert!(codec.is_proven());
        let mut big = header(200_000);
        big.extend_from_slice(&vec![1; 60_000]);
        assert!(codec.decode(&mut big).unwrap().is_none());
        assert!(budget.used() > 0);
        drop(codec);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn only_a_hello_of_this_version_is_a_hello() {
        let hello = hello_frame();
        assert_eq!(hello.len(), HELLO_LEN);
        assert_eq!(check_hello(&hello), Ok(()));
        let mut other = hello.to_vec();
        other[HELLO_LEN - 1] = other[HELLO_LEN - 1].wrapping_add(1);
        assert_eq!(
            check_hello(&other),
            Err(HelloError::Version(TCP_PROTOCOL.wrapping_add(1)))
        );
        assert_eq!(
            check_hello(&hello[..HELLO_LEN - 1]),
            Err(HelloError::Missing)
        );
        assert_eq!(check_hello(b""), Err(HelloError::Missing));
        let mut longer = hello.to_vec();
        longer.push(0);
        assert_eq!(check_hello(&longer), Err(HelloError::Missing));
        assert_eq!(check_hello(b"grapevix\0\x01"), Err(HelloError::Missing));
    }
}
