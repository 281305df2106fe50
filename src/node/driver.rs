//! The driver task: the one owner of a node's membership state and UDP socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::RngExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::protocol::{exchange, Request, Response};
use super::stats::Stats;
use super::View;
use crate::error::{Error, Result};
use crate::membership::{MemberEvent, Membership, PushPull};
use crate::net::{Transport, UdpSocket};
use crate::wire;

/// Bound of the driver's command queue.
pub(crate) const COMMAND_QUEUE: usize = 256;
/// Most push-pull exchanges this node starts at once.
const MAX_OUTBOUND_SYNCS: usize = 4;

/// Messages to the driver.
pub(crate) enum Command {
    /// A peer's member list arrived over TCP; answer with ours.
    PushPullIn {
        state: PushPull,
        reply: oneshot::Sender<PushPull>,
    },
    /// Leave the cluster gracefully, then report.
    Leave { done: oneshot::Sender<Result<()>> },
}

pub(crate) struct Driver<T: Transport> {
    pub(crate) membership: Membership,
    pub(crate) transport: T,
    pub(crate) udp: T::Udp,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) view: watch::Sender<Arc<View>>,
    pub(crate) events: broadcast::Sender<MemberEvent>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) rng: SmallRng,
}

impl<T: Transport> Driver<T> {
    pub(crate) async fn run(mut self) {
        let profile_push_pull = self.profile().push_pull_interval();
        let mut push_pull_tick = tokio::time::interval(profile_push_pull);
        push_pull_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut join_tick = tokio::time::interval(self.profile().join_retry_interval());
        join_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut syncs: JoinSet<Result<PushPull>> = JoinSet::new();
        let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
        let mut seed_cursor = 0usize;
        let mut published = u64::MAX;
        let mut had_peers = false;
        // After joining, a few quick push-pulls (1 s, 2 s, 4 s) fill in members that joined
        // at the same time, instead of waiting for the periodic exchange.
        let mut followup: Option<(Instant, Duration)> = None;

        loop {
            let deadline = self
                .membership
                .next_deadline()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::PushPullIn { state, reply }) => {
                        self.apply_push_pull(state);
                        let _ = reply.send(self.membership.push_pull_state());
                    }
                    Some(Command::Leave { done }) => {
                        let result = self.membership.leave(now()).map_err(Error::from);
                        self.flush().await;
                        self.publish(&mut published);
                        let _ = done.send(result);
                        return;
                    }
                    // Every handle is gone: the node was dropped.
                    None => return,
                },
                // Timers come before datagrams so that a flood cannot starve the detector.
                () = tokio::time::sleep_until(deadline) => {
                    self.membership.handle_due_timers(now());
                }
                received = self.udp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => self.handle_datagram(&buf[..len], from),
                    Err(error) => tracing::debug!(%error, "udp receive failed"),
                },
                Some(joined) = syncs.join_next(), if !syncs.is_empty() => {
                    match joined {
                        Ok(Ok(state)) => self.apply_push_pull(state),
                        Ok(Err(error)) => {
                            Stats::add(&self.stats.push_pull_failed, 1);
                            tracing::debug!(%error, "push-pull failed");
                        }
                        Err(error) => tracing::debug!(%error, "push-pull task ended abnormally"),
                    }
                }
                () = sleep_until_opt(followup.map(|(at, _)| at)) => {
                    if let Some((_, gap)) = followup.take() {
                        if let Some(peer) = self.random_peer() {
                            self.start_push_pull(peer, &mut syncs);
                        }
                        if gap < FOLLOWUP_LAST {
                            followup = Some((Instant::now() + gap * 2, gap * 2));
                        }
                    }
                }
                _ = join_tick.tick() => {
                    if self.membership.num_active_peers() == 0 {
                        self.try_join(&mut seed_cursor, &mut syncs);
                    }
                }
                _ = push_pull_tick.tick() => {
                    if let Some(peer) = self.random_peer() {
                        self.start_push_pull(peer, &mut syncs);
                    }
                }
            }
            let has_peers = self.membership.num_active_peers() > 0;
            if has_peers && !had_peers {
                // Just joined: fetch the whole member list instead of waiting for gossip.
                if let Some(peer) = self.random_peer() {
                    self.start_push_pull(peer, &mut syncs);
                }
                followup = Some((Instant::now() + FOLLOWUP_FIRST, FOLLOWUP_FIRST));
            }
            had_peers = has_peers;
            self.flush().await;
            self.publish(&mut published);
        }
    }

    fn profile(&self) -> crate::membership::Profile {
        self.view.borrow().profile
    }

    fn handle_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        Stats::add(&self.stats.udp_received, 1);
        Stats::add(&self.stats.udp_received_bytes, datagram.len() as u64);
        if let Err(error) = self.membership.handle_datagram(datagram, now()) {
            Stats::add(&self.stats.udp_dropped, 1);
            tracing::debug!(%from, %error, "dropped datagram");
        }
    }

    fn apply_push_pull(&mut self, state: PushPull) {
        Stats::add(&self.stats.push_pull_ok, 1);
        if let Err(error) = self.membership.apply_push_pull(state, now()) {
            tracing::debug!(%error, "push-pull state rejected");
        }
    }

    fn try_join(&mut self, cursor: &mut usize, syncs: &mut JoinSet<Result<PushPull>>) {
        let me = self.membership.identity().addr;
        let seeds: Vec<SocketAddr> = self.seeds.iter().copied().filter(|s| *s != me).collect();
        if seeds.is_empty() {
            return;
        }
        for seed in &seeds {
            if let Err(error) = self.membership.announce_to(*seed, now()) {
                tracing::debug!(%seed, %error, "announce failed");
            }
        }
        // TCP push-pull with one seed per round also joins when UDP is lossy.
        let seed = seeds[*cursor % seeds.len()];
        *cursor = cursor.wrapping_add(1);
        tracing::debug!(%seed, "joining through seed");
        self.start_push_pull(seed, syncs);
    }

    fn random_peer(&mut self) -> Option<SocketAddr> {
        let peers = self.membership.active_peer_addrs();
        if peers.is_empty() {
            return None;
        }
        Some(peers[self.rng.random_range(0..peers.len())])
    }

    fn start_push_pull(&mut self, peer: SocketAddr, syncs: &mut JoinSet<Result<PushPull>>) {
        if syncs.len() >= MAX_OUTBOUND_SYNCS {
            return;
        }
        let request = Request::PushPull(self.membership.push_pull_state());
        let transport = self.transport.clone();
        let timeout = self.profile().tcp_timeout();
        let stats = self.stats.clone();
        syncs.spawn(async move {
            let (response, bytes) = exchange(&transport, peer, &request, timeout).await?;
            Stats::add(&stats.tcp_bytes, bytes);
            match response {
                Response::PushPull(state) => Ok(state),
                Response::Error(message) => Err(Error::Remote(message)),
                Response::Control(_) => Err(Error::Protocol("control answer to push-pull".into())),
            }
        });
    }

    async fn flush(&mut self) {
        let outgoing: Vec<_> = self.membership.drain_outbox().collect();
        for (to, datagram) in outgoing {
            match self.udp.send_to(&datagram, to).await {
                Ok(_) => {
                    Stats::add(&self.stats.udp_sent, 1);
                    Stats::add(&self.stats.udp_sent_bytes, datagram.len() as u64);
                }
                Err(error) => tracing::debug!(%to, %error, "udp send failed"),
            }
        }
        for event in self.membership.drain_events() {
            tracing::info!(?event, "membership");
            // No subscriber is fine; a lagging one is counted when it reads.
            let _ = self.events.send(event);
        }
    }

    fn publish(&mut self, published: &mut u64) {
        let version = self.membership.view_version();
        if version == *published {
            return;
        }
        *published = version;
        let identity = self.membership.identity().clone();
        let members = self.membership.members();
        self.view.send_modify(|view| {
            *view = Arc::new(View {
                identity,
                members,
                profile: view.profile,
            })
        });
    }
}

/// First and last gap of the push-pulls that follow a join.
const FOLLOWUP_FIRST: Duration = Duration::from_secs(1);
const FOLLOWUP_LAST: Duration = Duration::from_secs(4);

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}
