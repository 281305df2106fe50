//! Frames of an RPC connection.
//!
//! A frame is a 4-byte big-endian length, then the bincode encoding of a [`Frame`]. Calls
//! borrow their strings and payload from the buffer they are encoded from or decoded in, so
//! neither side allocates to send or to receive a call.

use std::ops::Range;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::metrics::CallFailure;
use super::trace::TraceContext;
use super::{AppError, RpcError, MAX_PAYLOAD};
use crate::wire;

/// One frame on an RPC connection, either direction.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Frame<'a> {
    /// Client → server: run a method.
    Call {
        id: u64,
        #[serde(borrow)]
        service: &'a str,
        #[serde(borrow)]
        method: &'a str,
        /// Milliseconds the caller still waits; the server drops the call after that.
        timeout_ms: u32,
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
        /// The caller's trace context (`traceparent`); `None` is one byte on the wire.
        trace: Option<TraceContext>,
    },
    /// Client → server: the caller gave up on call `id`.
    Cancel { id: u64 },
    /// Server → client: the outcome of call `id`.
    Reply { id: u64, outcome: Outcome },
}

/// The result of a call as it travels back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Ok(ByteBuf),
    App(AppError),
    NotFound(String),
    Unavailable(String),
    DeadlineExceeded,
    BadRequest(String),
}

impl Outcome {
    /// How the call failed, as counted in the figures; `None` for a success.
    pub(crate) fn failure(&self) -> Option<CallFailure> {
        match self {
            Outcome::Ok(_) => None,
            Outcome::App(_) => Some(CallFailure::Remote),
            Outcome::NotFound(_) => Some(CallFailure::NotFound),
            Outcome::Unavailable(_) => Some(CallFailure::Unavailable),
            Outcome::DeadlineExceeded => Some(CallFailure::Timeout),
            Outcome::BadRequest(_) => Some(CallFailure::Protocol),
        }
    }

    pub(crate) fn into_result(self, timeout: std::time::Duration) -> Result<Vec<u8>, RpcError> {
        match self {
            Outcome::Ok(bytes) => Ok(bytes.into_vec()),
            Outcome::App(error) => Err(RpcError::Remote(error)),
            Outcome::NotFound(what) => Err(RpcError::NotFound(what)),
            Outcome::Unavailable(reason) => Err(RpcError::Unavailable {
                reason,
                retryable: true,
            }),
            Outcome::DeadlineExceeded => Err(RpcError::Timeout(timeout)),
            Outcome::BadRequest(message) => Err(RpcError::Protocol(message)),
        }
    }
}

/// A frame as the calling side decodes it: [`Frame`]'s encoding (same variants, same order),
/// with a reply's payload borrowed from the frame rather than copied out of it.
#[derive(Debug, Deserialize)]
pub(crate) enum ReceivedFrame<'a> {
    /// Never valid towards a client; here so that the variant indexes match [`Frame`].
    Call {
        #[allow(dead_code)]
        id: u64,
        #[serde(borrow)]
        #[allow(dead_code)]
        service: &'a str,
        #[serde(borrow)]
        #[allow(dead_code)]
        method: &'a str,
        #[allow(dead_code)]
        timeout_ms: u32,
        #[serde(borrow, with = "serde_bytes")]
        #[allow(dead_code)]
        payload: &'a [u8],
        #[allow(dead_code)]
        trace: Option<TraceContext>,
    },
    /// Never valid towards a client.
    Cancel {
        #[allow(dead_code)]
        id: u64,
    },
    /// The outcome of call `id`.
    Reply {
        id: u64,
        #[serde(borrow)]
        outcome: ReceivedOutcome<'a>,
    },
}

/// [`Outcome`] as received, its payload borrowed.
#[derive(Debug, Deserialize)]
pub(crate) enum ReceivedOutcome<'a> {
    Ok(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    App(AppError),
    NotFound(String),
    Unavailable(String),
    DeadlineExceeded,
    BadRequest(String),
}

impl ReceivedOutcome<'_> {
    /// The call's result: for a success, where its payload lies in `frame`, the bytes it
    /// was decoded from.
    pub(crate) fn into_result(self, frame: &[u8]) -> Result<Range<usize>, RpcError> {
        let outcome = match self {
            ReceivedOutcome::Ok(payload) => {
                let start = (payload.as_ptr() as usize).wrapping_sub(frame.as_ptr() as usize);
                if start > frame.len() || payload.len() > frame.len() - start {
                    return Err(RpcError::Protocol("a payload outside its frame".into()));
                }
                return Ok(start..start + payload.len());
            }
            ReceivedOutcome::App(error) => Outcome::App(error),
            ReceivedOutcome::NotFound(what) => Outcome::NotFound(what),
            ReceivedOutcome::Unavailable(reason) => Outcome::Unavailable(reason),
            ReceivedOutcome::DeadlineExceeded => Outcome::DeadlineExceeded,
            ReceivedOutcome::BadRequest(message) => Outcome::BadRequest(message),
        };
        let error = outcome.into_result(std::time::Duration::ZERO);
        Err(error
            .err()
            .unwrap_or_else(|| RpcError::Protocol("not a failure".into())))
    }
}

/// A reply's payload, kept in the frame it arrived in (no copy, no allocation of its own).
#[derive(Debug)]
pub(crate) struct ReplyPayload {
    frame: BytesMut,
    payload: Range<usize>,
}

impl ReplyPayload {
    /// The payload at `payload` in `frame` (a range [`ReceivedOutcome::into_result`] gave,
    /// so within the frame).
    pub(crate) fn new(frame: BytesMut, payload: Range<usize>) -> ReplyPayload {
        ReplyPayload { frame, payload }
    }

    /// A payload on its own (in tests).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> ReplyPayload {
        ReplyPayload {
            payload: 0..bytes.len(),
            frame: BytesMut::from(bytes),
        }
    }

    /// The payload's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.frame[self.payload.clone()]
    }
}

/// Decodes a frame received by a client (without its length prefix).
pub(crate) fn decode_received(bytes: &[u8]) -> Result<ReceivedFrame<'_>, RpcError> {
    if bytes.len() <= wire::MAX_FRAME {
        if let Some(frame) = read_successful_reply(bytes) {
            return Ok(frame);
        }
    }
    decode_with(bytes)
}

/// A cursor for the hand-written decoders of the two frames every call makes. Each read
/// accepts only what bincode's `standard()` configuration writes; anything else (`None`)
/// goes to bincode, which decodes it the same way or names what is wrong with it.
struct FrameReader<'a> {
    rest: &'a [u8],
}

impl<'a> FrameReader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(count);
        self.rest = rest;
        Some(taken)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|byte| byte[0])
    }

    /// A varint in its shortest form (bincode writes no other).
    fn varint(&mut self) -> Option<u64> {
        match self.byte()? {
            small @ 0..=250 => Some(u64::from(small)),
            251 => {
                let value = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
                (value >= 251).then_some(u64::from(value))
            }
            252 => {
                let value = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
                (value > 0xffff).then_some(u64::from(value))
            }
            253 => {
                let value = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
                (value > 0xffff_ffff).then_some(value)
            }
            _ => None,
        }
    }

    fn varint_u128(&mut self) -> Option<u128> {
        if self.rest.first() == Some(&254) {
            self.take(1)?;
            let value = u128::from_le_bytes(self.take(16)?.try_into().ok()?);
            return (value > u128::from(u64::MAX)).then_some(value);
        }
        self.varint().map(u128::from)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// The frame's last field was read: nothing may follow it.
    fn end<T>(&self, frame: T) -> Option<T> {
        self.rest.is_empty().then_some(frame)
    }
}

/// A call frame read by hand (serde's decoding of it was a sixth of the server's work per
/// call); `None` for any other frame or any irregularity.
fn read_call(bytes: &[u8]) -> Option<Frame<'_>> {
    let mut reader = FrameReader { rest: bytes };
    if reader.varint()? != 0 {
        return None;
    }
    let id = reader.varint()?;
    let service = reader.str()?;
    let method = reader.str()?;
    let timeout_ms = u32::try_from(reader.varint()?).ok()?;
    let payload = reader.bytes()?;
    let trace = match reader.byte()? {
        0 => None,
        1 => Some(TraceContext {
            trace_id: reader.varint_u128()?,
            span_id: reader.varint()?,
            sampled: reader.bool()?,
        }),
        _ => return None,
    };
    reader.end(Frame::Call {
        id,
        service,
        method,
        timeout_ms,
        payload,
        trace,
    })
}

/// A successful reply read by hand, its payload borrowed; `None` for any other frame or
/// any irregularity.
fn read_successful_reply(bytes: &[u8]) -> Option<ReceivedFrame<'_>> {
    let mut reader = FrameReader { rest: bytes };
    if reader.varint()? != 2 {
        return None;
    }
    let id = reader.varint()?;
    if reader.varint()? != 0 {
        return None;
    }
    let payload = reader.bytes()?;
    reader.end(ReceivedFrame::Reply {
        id,
        outcome: ReceivedOutcome::Ok(payload),
    })
}

/// The frame encoding: the same bincode configuration as every other TCP frame.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ wire::MAX_FRAME * 2 }>()
}

/// Appends `frame`, length prefix included, to `out`; refuses frames above the limit
/// (leaving `out` as it was).
pub(crate) fn encode_into(frame: &Frame<'_>, out: &mut BytesMut) -> Result<(), RpcError> {
    let start = out.len();
    out.put_u32(0);
    let written = match frame {
        // The frames of every call, written field by field (bincode through serde writes
        // each field through `io::Write`, several times the work); the same bytes, which
        // `hand_written_frames_are_bincode_frames` checks.
        Frame::Call {
            id,
            service,
            method,
            timeout_ms,
            payload,
            trace,
        } => {
            put_varint(out, 0);
            put_varint(out, *id);
            put_bytes(out, service.as_bytes());
            put_bytes(out, method.as_bytes());
            put_varint(out, u64::from(*timeout_ms));
            put_bytes(out, payload);
            match trace {
                None => out.put_u8(0),
                Some(trace) => {
                    out.put_u8(1);
                    put_varint_u128(out, trace.trace_id);
                    put_varint(out, trace.span_id);
                    out.put_u8(u8::from(trace.sampled));
                }
            }
            Ok(out.len() - start - 4)
        }
        Frame::Reply {
            id,
            outcome: Outcome::Ok(payload),
        } => {
            put_varint(out, 2);
            put_varint(out, *id);
            put_varint(out, 0);
            put_bytes(out, payload);
            Ok(out.len() - start - 4)
        }
        _ => bincode::serde::encode_into_std_write(frame, &mut (&mut *out).writer(), config()),
    };
    let size = match written {
        Ok(size) => size,
        Err(error) => {
            out.truncate(start);
            return Err(RpcError::Protocol(error.to_string()));
        }
    };
    if size > wire::MAX_FRAME {
        out.truncate(start);
        return Err(RpcError::FrameTooLarge {
            size,
            limit: MAX_PAYLOAD,
        });
    }
    // `size` fits in a u32: it is at most MAX_FRAME.
    out[start..start + 4].copy_from_slice(&(size as u32).to_be_bytes());
    Ok(())
}

/// bincode's variable-length integer (its `standard()` configuration).
fn put_varint(out: &mut BytesMut, value: u64) {
    match value {
        0..=250 => out.put_u8(value as u8),
        251..=0xffff => {
            out.put_u8(251);
            out.put_u16_le(value as u16);
        }
        0x1_0000..=0xffff_ffff => {
            out.put_u8(252);
            out.put_u32_le(value as u32);
        }
        _ => {
            out.put_u8(253);
            out.put_u64_le(value);
        }
    }
}

fn put_varint_u128(out: &mut BytesMut, value: u128) {
    match u64::try_from(value) {
        Ok(small) => put_varint(out, small),
        Err(_) => {
            out.put_u8(254);
            out.put_u128_le(value);
        }
    }
}

/// A length-prefixed string or byte string.
fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.put_slice(bytes);
}

/// Decodes one frame (without its length prefix); strings and payload borrow from `bytes`.
pub(crate) fn decode(bytes: &[u8]) -> Result<Frame<'_>, RpcError> {
    if bytes.len() <= wire::MAX_FRAME {
        if let Some(frame) = read_call(bytes) {
            return Ok(frame);
        }
    }
    decode_with(bytes)
}

fn decode_with<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, RpcError> {
    if bytes.len() > wire::MAX_FRAME {
        return Err(RpcError::FrameTooLarge {
            size: bytes.len(),
            limit: wire::MAX_FRAME,
        });
    }
    let (frame, used) = bincode::serde::borrow_decode_from_slice(bytes, config())
        .map_err(|error| RpcError::Protocol(format!("malformed message: {error}")))?;
    if used != bytes.len() {
        return Err(RpcError::Protocol(format!(
            "malformed message: {} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(frame)
}

/// Whether the hand-written decoders agree with bincode on `bytes`: whatever frame they
/// read, bincode reads the same one (checked by the fuzzer and by property tests).
pub(crate) fn hand_decoders_agree(bytes: &[u8]) -> bool {
    let same = |ours: &dyn std::fmt::Debug, theirs: Result<&dyn std::fmt::Debug, &RpcError>| {
        theirs.is_ok_and(|theirs| format!("{ours:?}") == format!("{theirs:?}"))
    };
    let call = read_call(bytes).is_none_or(|ours| {
        let theirs = decode_with::<Frame<'_>>(bytes);
        same(&ours, theirs.as_ref().map(|frame| frame as _))
    });
    let reply = read_successful_reply(bytes).is_none_or(|ours| {
        let theirs = decode_with::<ReceivedFrame<'_>>(bytes);
        same(&ours, theirs.as_ref().map(|frame| frame as _))
    });
    call && reply
}

/// The capacity a payload's buffer starts with.
const PAYLOAD_START: usize = 256;

/// Serializes a typed value into a payload.
pub(crate) fn to_payload<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, RpcError> {
    // Room for a small message at once: growing from empty reallocates on every doubling.
    let mut bytes = Vec::with_capacity(PAYLOAD_START);
    bincode::serde::encode_into_std_write(value, &mut bytes, bincode::config::standard())
        .map_err(|error| RpcError::Protocol(error.to_string()))?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(RpcError::FrameTooLarge {
            size: bytes.len(),
            limit: MAX_PAYLOAD,
        });
    }
    Ok(bytes)
}

/// Deserializes a typed value from a payload; trailing bytes are an error.
pub(crate) fn from_payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    wire::decode_frame(bytes).map_err(|error| RpcError::Protocol(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_their_length_prefix() {
        let mut out = BytesMut::new();
        let call = Frame::Call {
            id: 7 << 32 | 3,
            service: "echo",
            method: "say",
            timeout_ms: 250,
            payload: &[1, 2, 3],
            trace: Some(TraceContext {
                trace_id: 5,
                span_id: 6,
                sampled: true,
            }),
        };
        encode_into(&call, &mut out).unwrap();
        encode_into(&Frame::Cancel { id: 9 }, &mut out).unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        match decode(&out[4..4 + len]).unwrap() {
            Frame::Call {
                id,
                service,
                method,
                timeout_ms,
                payload,
                trace,
            } => {
                assert_eq!(
                    (id, service, method, timeout_ms),
                    (7 << 32 | 3, "echo", "say", 250)
                );
                assert_eq!(trace.map(|t| (t.trace_id, t.span_id)), Some((5, 6)));
                assert_eq!(payload, &[1, 2, 3]);
            }
            other => panic!("{other:?}"),
        }
        let rest = &out[4 + len..];
        let len2 = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert_eq!(len2 + 4, rest.len());
        assert!(matches!(
            decode(&rest[4..]).unwrap(),
            Frame::Cancel { id: 9 }
        ));
    }

    #[test]
    fn the_borrowed_call_is_the_owned_call_on_the_wire() {
        // The borrowed frame must keep the encoding of the owned one (String, ByteBuf).
        #[derive(Serialize)]
        enum Owned {
            Call {
                id: u64,
                service: String,
                method: String,
                timeout_ms: u32,
                payload: ByteBuf,
                trace: Option<TraceContext>,
            },
        }
        let owned = wire::encode_frame(&Owned::Call {
            id: 1,
            service: "s".into(),
            method: "m".into(),
            timeout_ms: 5,
            payload: ByteBuf::from(vec![9; 70]),
            trace: None,
        })
        .unwrap();
        let mut out = BytesMut::new();
        let call = Frame::Call {
            id: 1,
            service: "s",
            method: "m",
            timeout_ms: 5,
            payload: &[9; 70],
            trace: None,
        };
        encode_into(&call, &mut out).unwrap();
        assert_eq!(&out[4..], &owned[..]);
    }

    #[test]
    fn hand_written_frames_are_bincode_frames() {
        let through_serde = |frame: &Frame<'_>| {
            let mut out = BytesMut::new();
            out.put_u32(0);
            let size =
                bincode::serde::encode_into_std_write(frame, &mut (&mut out).writer(), config())
                    .unwrap();
            out[..4].copy_from_slice(&(size as u32).to_be_bytes());
            out
        };
        let edges = [
            0u64,
            1,
            250,
            251,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            1 << 32,
            u64::MAX,
        ];
        let long = vec![3u8; 70_000];
        let traces = [
            None,
            Some(TraceContext {
                trace_id: 7,
                span_id: 251,
                sampled: false,
            }),
            Some(TraceContext {
                trace_id: u128::MAX,
                span_id: u64::MAX,
                sampled: true,
            }),
            Some(TraceContext {
                trace_id: u128::from(u64::MAX) + 1,
                span_id: 1,
                sampled: true,
            }),
        ];
        for (n, &id) in edges.iter().enumerate() {
            let len = [0, 1, 250, 251, 300, 0xffff, 0x1_0000, 70_000][n % 8];
            let payload = &long[..len];
            let frames = [
                Frame::Call {
                    id,
                    service: "échos",
                    method: &"m".repeat(n * 40),
                    timeout_ms: (id & 0xffff_ffff) as u32,
                    payload,
                    trace: traces[n % traces.len()],
                },
                Frame::Reply {
                    id,
                    outcome: Outcome::Ok(ByteBuf::from(payload.to_vec())),
                },
            ];
            for frame in &frames {
                let mut out = BytesMut::new();
                encode_into(frame, &mut out).unwrap();
                assert_eq!(out, through_serde(frame), "{frame:?}");
                // Every frame a call makes is read by hand, as bincode reads it.
                let body = &out[4..];
                assert!(read_call(body).is_some() || read_successful_reply(body).is_some());
                assert!(hand_decoders_agree(body), "{frame:?}");
            }
        }
    }

    #[test]
    fn a_received_reply_is_the_reply_sent() {
        let mut out = BytesMut::new();
        let sent = [
            Outcome::Ok(ByteBuf::from(vec![7; 70])),
            Outcome::App(AppError::new(3, "no")),
            Outcome::NotFound("m".into()),
            Outcome::Unavailable("leaving".into()),
            Outcome::DeadlineExceeded,
            Outcome::BadRequest("bad".into()),
        ];
        let expected = sent
            .iter()
            .map(|outcome| match outcome {
                Outcome::Ok(_) => None,
                Outcome::App(e) => Some(RpcError::Remote(e.clone())),
                Outcome::NotFound(m) => Some(RpcError::NotFound(m.clone())),
                Outcome::Unavailable(r) => Some(RpcError::Unavailable {
                    reason: r.clone(),
                    retryable: true,
                }),
                Outcome::DeadlineExceeded => Some(RpcError::Timeout(std::time::Duration::ZERO)),
                Outcome::BadRequest(m) => Some(RpcError::Protocol(m.clone())),
            })
            .collect::<Vec<_>>();
        for (id, outcome) in sent.into_iter().enumerate() {
            encode_into(
                &Frame::Reply {
                    id: id as u64,
                    outcome,
                },
                &mut out,
            )
            .unwrap();
        }
        for (n, expected) in expected.into_iter().enumerate() {
            let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            let _ = out.split_to(4);
            let frame = out.split_to(len);
            let ReceivedFrame::Reply { id, outcome } = decode_received(&frame).unwrap() else {
                panic!("not a reply");
            };
            assert_eq!(id, n as u64);
            match (outcome.into_result(&frame), expected) {
                (Ok(range), None) => {
                    let payload = ReplyPayload::new(frame.clone(), range);
                    assert_eq!(payload.bytes(), &[7; 70]);
                }
                (result, expected) => assert_eq!(result.err(), expected),
            }
        }
        // A call or a cancel decodes too (and the client refuses them).
        encode_into(&Frame::Cancel { id: 4 }, &mut out).unwrap();
        assert!(matches!(
            decode_received(&out[4..]).unwrap(),
            ReceivedFrame::Cancel { id: 4 }
        ));
    }

    /// Valid call and reply frames, the material of the mutations below.
    fn sample_frames() -> Vec<Vec<u8>> {
        let mut out = BytesMut::new();
        let mut frames = Vec::new();
        let trace = TraceContext {
            trace_id: u128::from(u64::MAX) + 9,
            span_id: 300,
            sampled: true,
        };
        for (id, trace) in [(3, None), (70_000, Some(trace)), (1 << 40, None)] {
            for frame in [
                Frame::Call {
                    id,
                    service: "echo",
                    method: "say",
                    timeout_ms: 251,
                    payload: &[5; 20],
                    trace,
                },
                Frame::Reply {
                    id,
                    outcome: Outcome::Ok(ByteBuf::from(vec![6; 300])),
                },
            ] {
                out.clear();
                encode_into(&frame, &mut out).unwrap();
                frames.push(out[4..].to_vec());
            }
        }
        frames
    }

    proptest::proptest! {
        /// A frame damaged anywhere (a byte changed, cut short, grown) is read by hand only
        /// as bincode reads it; arbitrary bytes likewise.
        #[test]
        fn damaged_frames_are_read_by_hand_only_as_bincode_reads_them(
            pick in 0usize..6,
            at in proptest::prelude::any::<proptest::sample::Index>(),
            value in proptest::prelude::any::<u8>(),
            cut in 0usize..4,
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let mut frame = sample_frames()[pick].clone();
            let at = at.index(frame.len());
            frame[at] = value;
            proptest::prop_assert!(hand_decoders_agree(&frame));
            frame.truncate(frame.len().saturating_sub(cut));
            proptest::prop_assert!(hand_decoders_agree(&frame));
            frame.extend_from_slice(&noise);
            proptest::prop_assert!(hand_decoders_agree(&frame));
            proptest::prop_assert!(hand_decoders_agree(&noise));
        }
    }

    #[test]
    fn non_canonical_integers_are_left_to_bincode() {
        // Id 5 written as a 2-byte varint: not what bincode writes, so not read by hand.
        let frame = [2, 251, 5, 0, 0, 0];
        assert!(read_successful_reply(&frame).is_none());
        assert!(hand_decoders_agree(&frame));
        assert!(read_successful_reply(&[2, 5, 0, 0]).is_some());
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(decode(&[0xde, 0xad, 0xbe, 0xef]).is_err());
        let mut out = BytesMut::new();
        encode_into(&Frame::Cancel { id: 1 }, &mut out).unwrap();
        let mut frame = out[4..].to_vec();
        frame.push(0);
        assert!(decode(&frame).is_err());
    }
}
