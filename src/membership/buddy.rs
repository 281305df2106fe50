//! Lifeguard's buddy system: tell a suspected member directly that it is suspected.
//!
//! foca spreads "X is suspect" by piggybacking it on a bounded number of messages
//! (`max_transmissions`), which eager broadcast spends within a fraction of a second. When
//! every copy is lost on its way to X (seen at 25 % packet loss), nothing else tells X, so
//! X never refutes and the suspicion runs out: a healthy node declared down. Lifeguard
//! (Dadgar et al., 2018, §IV-C) has the prober's ping to a suspect carry the suspicion;
//! here each node that holds X as suspect sends X, at once and then once per probe
//! period, a foca `Gossip` message whose only update is X's own suspect state. X's foca
//! refutes on receipt (incarnation bump and gossip of its Alive state), with no new wire
//! format. Nothing is sent while nobody is suspected.

use std::time::{Duration, Instant};

use bytes::BufMut;
use foca::{Codec, Header, Identity, Incarnation, Member, Message, State, Timer};

/// Members this node suspects, and when each is next told so. Generic over the identity for
/// simulations that store a compact one.
pub struct SuspicionNotices<T> {
    /// `(member, incarnation suspected, next notice due)`; few entries, so a vector.
    watched: Vec<(T, Incarnation, Instant)>,
    period: Duration,
    sent: u64,
}

impl<T: Identity> SuspicionNotices<T> {
    /// Notices repeated every `period` (the probe period) while a suspicion lasts.
    pub fn new(period: Duration) -> Self {
        SuspicionNotices {
            watched: Vec::new(),
            period,
            sent: 0,
        }
    }

    /// Notes a timer foca scheduled: a suspicion verdict means the member became suspect
    /// here, and it is told right away.
    pub fn note_timer(&mut self, timer: &Timer<T>, now: Instant) {
        if let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = timer
        {
            match self.watched.iter_mut().find(|(id, _, _)| id == member_id) {
                Some(entry) => *entry = (member_id.clone(), *incarnation, now),
                None => self.watched.push((member_id.clone(), *incarnation, now)),
            }
        }
    }

    /// Whether a notice is due at `now`.
    pub fn any_due(&self, now: Instant) -> bool {
        self.watched.iter().any(|(_, _, due)| *due <= now)
    }

    /// The foca packets due at `now`, as `(suspect, packet)`, given foca's membership state.
    /// Members no longer suspect (refuted, or declared down) are forgotten. `me` is this
    /// node's identity.
    pub fn take_due<'a, C: Codec<T>>(
        &mut self,
        now: Instant,
        me: &T,
        members: impl IntoIterator<Item = &'a Member<T>>,
        codec: &mut C,
    ) -> Vec<(T, Vec<u8>)>
    where
        T: 'a,
    {
        if !self.any_due(now) {
            return Vec::new();
        }
        // One pass over the state, only when a notice is due (once per probe period).
        let mut suspect: Vec<Option<Incarnation>> = vec![None; self.watched.len()];
        for member in members {
            if member.state() != State::Suspect {
                continue;
            }
            if let Some(i) = self.watched.iter().position(|(id, _, _)| id == member.id()) {
                suspect[i] = Some(member.incarnation());
            }
        }
        let mut packets = Vec::new();
        let mut kept = Vec::with_capacity(self.watched.len());
        for ((id, _, due), state) in self.watched.drain(..).zip(suspect) {
            let Some(incarnation) = state else { continue };
            if due <= now {
                match notice(me, &id, incarnation, codec) {
                    Ok(packet) => {
                        self.sent += 1;
                        packets.push((id.clone(), packet));
                    }
                    Err(()) => tracing::debug!("could not encode a suspicion notice"),
                }
                kept.push((id, incarnation, now + self.period));
            } else {
                kept.push((id, incarnation, due));
            }
        }
        self.watched = kept;
        packets
    }

    /// How many notices were produced.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// A foca `Gossip` packet from `me` to `suspect` carrying one update: `suspect` is suspect
/// at `incarnation`. The header's incarnation of `me` is 0: foca ignores it when it knows a
/// newer one, and a member that talks is alive at least at 0.
fn notice<T: Identity, C: Codec<T>>(
    me: &T,
    suspect: &T,
    incarnation: Incarnation,
    codec: &mut C,
) -> Result<Vec<u8>, ()> {
    let header = Header {
        src: me.clone(),
        src_incarnation: 0,
        dst: suspect.clone(),
        message: Message::Gossip,
    };
    let mut packet = Vec::new();
    codec.encode_header(&header, &mut packet).map_err(|_| ())?;
    packet.put_u16(1);
    let update = Member::new(suspect.clone(), incarnation, State::Suspect);
    codec.encode_member(&update, &mut packet).map_err(|_| ())?;
    Ok(packet)
}
