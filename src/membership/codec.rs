//! foca codec: bincode with size limits.

use bytes::{Buf, BufMut};
use foca::{Header, Member};

use crate::wire::{self, WireError};

/// Encodes foca headers and members with bincode. Encoding goes through a scratch buffer so
/// the space left in foca's packet is checked before anything is written.
#[derive(Debug, Default)]
pub struct BincodeCodec {
    scratch: Vec<u8>,
}

impl BincodeCodec {
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

    fn take<T: serde::de::DeserializeOwned>(mut buf: impl Buf) -> Result<T, WireError> {
        // foca hands over a contiguous slice, so the first chunk is the whole payload.
        let (value, used) = wire::decode_datagram_prefix(buf.chunk())?;
        buf.advance(used);
        Ok(value)
    }
}

/// Generic over the identity so that simulations can store a compact identity type with
/// the same encoding as [`NodeId`](super::NodeId).
impl<T> foca::Codec<T> for BincodeCodec
where
    T: foca::Identity + serde::Serialize + serde::de::DeserializeOwned,
{
    type Error = WireError;

    fn encode_header(&mut self, header: &Header<T>, buf: impl BufMut) -> Result<(), WireError> {
        self.scratch.clear();
        wire::encode_datagram_into(header, &mut self.scratch, wire::MAX_DATAGRAM)?;
        self.put(buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<T>, WireError> {
        Self::take(buf)
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
