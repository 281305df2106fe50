//! Exchanges on evidence: which peers disagree with this node, as their datagrams say.
//!
//! Every SWIM datagram but an acknowledgement carries its sender's [`DatagramTag`]: 32-bit
//! fingerprints of its replicated state and of its member list. A node that hears only agreeing peers has
//! nothing to repair, so its scheduled anti-entropy round and push-pull do not start: an
//! idle cluster opens no TCP connection, whose handshake and teardown cost about ten
//! packets of headers, several times the SWIM traffic itself (issue 18). A peer heard with
//! another fingerprint is exchanged with on the next tick, as before; by construction no
//! more than one exchange of a kind starts per tick, whatever the tags say. After
//! [`QUIET_SYNC_TICKS`] (or [`QUIET_PUSH_PULL_TICKS`]) ticks without disagreement one
//! exchange runs anyway: it repairs what a fingerprint collision, or a peer this node did
//! not hear from, would hide.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::RngExt;

use crate::wire::DatagramTag;

/// Disagreeing peers remembered between ticks, per kind; more are dropped (one is enough).
const MAX_DISAGREEING: usize = 256;
/// Sync ticks without disagreement before a round runs anyway (5 min at a 2 s interval).
/// The fallback only guards against a 32-bit fingerprint collision or a peer never heard:
/// every real difference shows in the tags within a probe round. At 30 s its TCP
/// handshakes and teardowns were a fifth of an idle node's traffic.
pub(crate) const QUIET_SYNC_TICKS: u32 = 150;
/// Periodic push-pull ticks (already scaled to the cluster's size) without disagreement
/// before one runs anyway (5 min on a LAN below 32 members, then longer with the size).
pub(crate) const QUIET_PUSH_PULL_TICKS: u32 = 30;

/// The tag this node sends, from the 64-bit fingerprints of its state and member list.
pub(crate) fn tag_of(state: u64, members: u64) -> DatagramTag {
    let mut tag = [0; 8];
    tag[..4].copy_from_slice(&(state as u32).to_le_bytes());
    tag[4..].copy_from_slice(&(members as u32).to_le_bytes());
    tag
}

/// Peers heard disagreeing since the last tick, and the ticks since the last exchange.
#[derive(Debug, Default)]
pub(crate) struct Agreement {
    state: BTreeSet<SocketAddr>,
    members: BTreeSet<SocketAddr>,
    quiet_sync_ticks: u32,
    quiet_push_pull_ticks: u32,
}

impl Agreement {
    /// Notes a datagram from `from` tagged `theirs`, `ours` being this node's tag now.
    pub(crate) fn heard(&mut self, from: SocketAddr, theirs: &DatagramTag, ours: &DatagramTag) {
        if theirs[..4] != ours[..4] && self.state.len() < MAX_DISAGREEING {
            self.state.insert(from);
        }
        if theirs[4..] != ours[4..] && self.members.len() < MAX_DISAGREEING {
            self.members.insert(from);
        }
    }

    /// On a sync tick: the peer to run anti-entropy with, if any. A disagreeing peer that
    /// is still `active` comes first; otherwise a random active peer once the quiet ticks
    /// are used up.
    pub(crate) fn sync_target(
        &mut self,
        active: &[SocketAddr],
        rng: &mut SmallRng,
    ) -> Option<SocketAddr> {
        let heard = std::mem::take(&mut self.state);
        pick(
            heard,
            active,
            &mut self.quiet_sync_ticks,
            QUIET_SYNC_TICKS,
            rng,
        )
    }

    /// On a periodic push-pull tick (`scheduled`: the tick the cluster's size scaling
    /// keeps): the peer to swap member lists with, if any. A disagreeing peer is taken on
    /// any tick; without one, a random peer once the quiet scheduled ticks are used up.
    pub(crate) fn push_pull_target(
        &mut self,
        active: &[SocketAddr],
        scheduled: bool,
        rng: &mut SmallRng,
    ) -> Option<SocketAddr> {
        let heard = std::mem::take(&mut self.members);
        if !scheduled && heard.iter().all(|peer| !active.contains(peer)) {
            return None;
        }
        pick(
            heard,
            active,
            &mut self.quiet_push_pull_ticks,
            QUIET_PUSH_PULL_TICKS,
            rng,
        )
    }
}

/// A disagreeing active peer, or after `limit` quiet ticks any active peer.
fn pick(
    heard: BTreeSet<SocketAddr>,
    active: &[SocketAddr],
    quiet: &mut u32,
    limit: u32,
    rng: &mut SmallRng,
) -> Option<SocketAddr> {
    let disagreeing: Vec<SocketAddr> = heard
        .into_iter()
        .filter(|peer| active.contains(peer))
        .collect();
    if !disagreeing.is_empty() {
        *quiet = 0;
        return Some(disagreeing[rng.random_range(0..disagreeing.len())]);
    }
    if active.is_empty() {
        return None;
    }
    *quiet += 1;
    if *quiet < limit {
        return None;
    }
    *quiet = 0;
    Some(active[rng.random_range(0..active.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn peer(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    #[test]
    fn agreeing_peers_start_nothing_until_the_quiet_ticks_are_used_up() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut agreement = Agreement::default();
        let ours = tag_of(7, 9);
        let active = [peer(1), peer(2)];
        let mut started = 0;
        for _ in 0..QUIET_SYNC_TICKS * 4 {
            agreement.heard(peer(1), &ours, &ours);
            agreement.heard(peer(2), &ours, &ours);
            started += usize::from(agreement.sync_target(&active, &mut rng).is_some());
        }
        assert_eq!(
            started, 4,
            "one fallback round per {QUIET_SYNC_TICKS} ticks"
        );
    }

    #[test]
    fn a_disagreeing_peer_is_synced_with_on_the_next_tick_once() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut agreement = Agreement::default();
        let ours = tag_of(7, 9);
        let active = [peer(1), peer(2)];
        // Many datagrams from a peer with another state: still one round per tick.
        for _ in 0..100 {
            agreement.heard(peer(2), &tag_of(8, 9), &ours);
        }
        assert_eq!(agreement.sync_target(&active, &mut rng), Some(peer(2)));
        assert_eq!(agreement.sync_target(&active, &mut rng), None);
        // The member list agreed: no push-pull off schedule.
        assert_eq!(agreement.push_pull_target(&active, false, &mut rng), None);
    }

    #[test]
    fn member_lists_that_differ_push_pull_on_any_tick_with_an_active_peer() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut agreement = Agreement::default();
        let ours = tag_of(7, 9);
        agreement.heard(peer(3), &tag_of(7, 10), &ours);
        // A peer no longer active is not exchanged with.
        assert_eq!(
            agreement.push_pull_target(&[peer(1)], false, &mut rng),
            None
        );
        agreement.heard(peer(3), &tag_of(7, 10), &ours);
        assert_eq!(
            agreement.push_pull_target(&[peer(1), peer(3)], false, &mut rng),
            Some(peer(3))
        );
        // Scheduled ticks without disagreement: the quiet fallback only.
        let fallbacks = (0..QUIET_PUSH_PULL_TICKS * 2)
            .filter(|_| {
                agreement
                    .push_pull_target(&[peer(1)], true, &mut rng)
                    .is_some()
            })
            .count();
        assert_eq!(fallbacks, 2);
    }

    #[test]
    fn only_the_low_halves_of_the_fingerprints_travel() {
        assert_eq!(tag_of(1 << 40 | 5, 6), tag_of(5, 1 << 33 | 6));
        assert_ne!(tag_of(5, 6), tag_of(6, 6));
    }
}
