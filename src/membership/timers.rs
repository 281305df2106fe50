//! foca's timers, kept in deadline order, with Lifeguard-style local health awareness.
//!
//! foca asks for timers as "this event, after this delay"; the queue turns them into
//! deadlines. Two ideas from Lifeguard (Dadgar et al., 2018) live here, in grapevine's own
//! layer, because foca 2.0 has a fixed suspicion timeout:
//!
//! - **Stall awareness.** A node that was paused (SIGSTOP, a long GC or swap pause, an
//!   overloaded host) finds its timers far overdue when it runs again. Firing them at once
//!   would judge peers on stale evidence: the acks and refutations that arrived meanwhile
//!   still sit unread in the socket buffer, so the node would declare healthy peers down.
//!   When the earliest due timer is late by more than a probe period, the queue treats the
//!   node as stalled: overdue suspicion verdicts get a fresh, lengthened suspicion period,
//!   and every other overdue timer waits one probe round trip, so the buffered datagrams are
//!   read first.
//! - **Local health.** A node whose own probes fail, or that was stalled, is more likely to
//!   be the sick one than the peers it suspects. A health score (0 = healthy, at most
//!   [`MAX_HEALTH_SCORE`]) rises by one with each probe that fails on a member not already
//!   suspected, and to the maximum after a stall, and decays by one per three quiet probe
//!   periods (a node cut off from the network fails one probe a period, so its score
//!   climbs). Each suspicion this node raises lasts
//!   `suspicion × (1 + score)`, the score taken when the suspicion starts or, if higher,
//!   when it would end (a node cut off from the network keeps failing probes, so its
//!   pending verdicts keep moving out). Peers get more time to refute when this node's
//!   view is the doubtful one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use foca::Timer;

use super::{NodeId, Profile};

/// Highest local health score: suspicions raised by a sick node last up to
/// `1 + MAX_HEALTH_SCORE` times the configured suspicion period.
pub const MAX_HEALTH_SCORE: u32 = 3;

/// Probe periods without a new failure that heal one step of the health score.
const HEALTH_DECAY_PERIODS: u128 = 3;

struct ScheduledTimer<T> {
    deadline: Instant,
    seq: u64,
    /// When the timer was (re-)armed, and the delay foca asked for.
    armed: Instant,
    delay: Duration,
    /// The factor `1 + health score` the delay was stretched by.
    factor: u32,
    timer: Timer<T>,
}

impl<T> PartialEq for ScheduledTimer<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl<T> Eq for ScheduledTimer<T> {}
impl<T> PartialOrd for ScheduledTimer<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for ScheduledTimer<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// foca's pending timers in deadline order (ties in scheduling order), stall-aware and
/// scaled by local health. Sans-IO: every call takes the current instant. Generic over the
/// identity for simulations that store a compact one.
pub struct TimerQueue<T = NodeId> {
    heap: BinaryHeap<Reverse<ScheduledTimer<T>>>,
    seq: u64,
    /// Lateness beyond which the node is considered to have been stalled; also the unit of
    /// the health score's decay.
    probe_period: Duration,
    /// How long overdue timers wait after a stall (one probe round trip).
    grace: Duration,
    score: u32,
    score_since: Instant,
    stalls: u64,
}

impl<T: PartialEq> TimerQueue<T> {
    /// An empty queue for nodes of `profile`.
    pub fn new(profile: Profile, now: Instant) -> Self {
        let config = profile.foca_config(1);
        TimerQueue {
            heap: BinaryHeap::new(),
            seq: 0,
            probe_period: config.probe_period,
            grace: config.probe_rtt,
            score: 0,
            score_since: now,
            stalls: 0,
        }
    }

    /// Schedules `timer` `delay` after `now`. A suspicion this node raises (foca's
    /// `ChangeSuspectToDown`, scheduled when one of its probes failed) lasts
    /// `delay × (1 + health score)`, and the failed probe raises the score.
    pub fn schedule(&mut self, delay: Duration, timer: Timer<T>, now: Instant) {
        if let Timer::ChangeSuspectToDown { member_id, .. } = &timer {
            let factor = 1 + self.health_score(now);
            // Probing a member this node suspects already is no new evidence about itself.
            let known = self.heap.iter().any(|Reverse(t)| {
                matches!(&t.timer, Timer::ChangeSuspectToDown { member_id: m, .. } if m == member_id)
            });
            if !known {
                self.raise(now, 1);
            }
            self.push(now, delay, factor, timer);
        } else {
            self.push(now, delay, 1, timer);
        }
    }

    /// The deadline of the earliest pending timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(t)| t.deadline)
    }

    /// Takes the earliest timer due at `now`, if any. When that timer is overdue by more
    /// than a probe period the node was stalled: every overdue timer is re-armed instead
    /// (see the module docs) and nothing is due.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer<T>> {
        loop {
            let deadline = self.next_deadline()?;
            if deadline > now {
                return None;
            }
            if now.saturating_duration_since(deadline) > self.probe_period {
                self.recover_from_stall(now);
                return None;
            }
            let Reverse(due) = self.heap.pop()?;
            if matches!(due.timer, Timer::ChangeSuspectToDown { .. }) {
                // Health got worse since the suspicion started: stretch it further.
                let factor = 1 + self.health_score(now);
                if factor > due.factor && due.armed + due.delay * factor > now {
                    self.push(due.armed, due.delay, factor, due.timer);
                    continue;
                }
            }
            return Some(due.timer);
        }
    }

    /// The local health score at `now`: 0 when healthy, up to [`MAX_HEALTH_SCORE`].
    pub fn health_score(&self, now: Instant) -> u32 {
        let quiet = now.saturating_duration_since(self.score_since);
        let steps = quiet.as_nanos() / (self.probe_period.as_nanos() * HEALTH_DECAY_PERIODS).max(1);
        self.score
            .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
    }

    /// How many stalls were detected.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn raise(&mut self, now: Instant, by: u32) {
        self.score = (self.health_score(now) + by).min(MAX_HEALTH_SCORE);
        self.score_since = now;
    }

    fn push(&mut self, armed: Instant, delay: Duration, factor: u32, timer: Timer<T>) {
        self.seq += 1;
        self.heap.push(Reverse(ScheduledTimer {
            deadline: armed + delay * factor,
            seq: self.seq,
            armed,
            delay,
            factor,
            timer,
        }));
    }

    fn recover_from_stall(&mut self, now: Instant) {
        self.stalls += 1;
        self.raise(now, MAX_HEALTH_SCORE);
        let factor = 1 + MAX_HEALTH_SCORE;
        let mut overdue = Vec::new();
        while let Some(Reverse(t)) = self.heap.peek() {
            if t.deadline > now {
                break;
            }
            if let Some(Reverse(t)) = self.heap.pop() {
                overdue.push(t);
            }
        }
        // Re-armed in their original order, so ties still fire as foca scheduled them.
        for t in overdue {
            if matches!(t.timer, Timer::ChangeSuspectToDown { .. }) {
                self.push(now, t.delay, factor, t.timer);
            } else {
                self.push(now, self.grace, 1, t.timer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            addr: "10.0.0.1:7946".parse().unwrap(),
            generation: 1,
        }
    }

    fn suspicion(name: &str) -> Timer<NodeId> {
        Timer::ChangeSuspectToDown {
            member_id: id(name),
            incarnation: 0,
            token: 0,
        }
    }

    fn drain(queue: &mut TimerQueue, now: Instant) -> Vec<Timer<NodeId>> {
        std::iter::from_fn(|| queue.pop_due(now)).collect()
    }

    #[test]
    fn timers_fire_in_deadline_then_scheduling_order() {
        let t0 = Instant::now();
        let mut q = TimerQueue::new(Profile::Lan, t0);
        q.schedule(Duration::from_millis(300), Timer::PeriodicGossip(2), t0);
        q.schedule(Duration::from_millis(100), Timer::PeriodicGossip(1), t0);
        q.schedule(Duration::from_millis(300), Timer::PeriodicGossip(3), t0);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(100)));
        assert!(drain(&mut q, t0 + Duration::from_millis(99)).is_empty());
        let fired = drain(&mut q, t0 + Duration::from_millis(300));
        assert_eq!(
            fired,
            vec![
                Timer::PeriodicGossip(1),
                Timer::PeriodicGossip(2),
                Timer::PeriodicGossip(3)
            ]
        );
        assert!(q.is_empty());
        assert_eq!(q.stalls(), 0);
    }

    #[test]
    fn failed_probes_lengthen_later_suspicions_and_the_score_decays() {
        let t0 = Instant::now();
        let mut q = TimerQueue::new(Profile::Lan, t0);
        let s = Duration::from_secs(4);
        // A healthy node: the first suspicion lasts the configured period.
        q.schedule(s, suspicion("a"), t0);
        assert_eq!(q.next_deadline(), Some(t0 + s));
        assert_eq!(q.health_score(t0), 1);
        // Probing the same suspect again is no news about this node.
        q.schedule(s, suspicion("a"), t0);
        assert_eq!(q.health_score(t0), 1);
        // A failure on another member right after: this node looks sick, give the peer
        // more time.
        q.schedule(s, suspicion("b"), t0);
        assert_eq!(q.health_score(t0), 2);
        // The 2nd "a" and "b" started with a score of 1: they last 8 s. The 1st "a" is
        // stretched to 8 s when due, since health is worse than when it started.
        assert!(drain(&mut q, t0 + s).is_empty());
        assert_eq!(q.next_deadline(), Some(t0 + s * 2));
        assert_eq!(
            drain(&mut q, t0 + s * 2),
            vec![suspicion("a"), suspicion("b"), suspicion("a")]
        );
        // Three probe periods (1 s on a LAN) without failure heal one step.
        assert_eq!(q.health_score(t0 + Duration::from_millis(2999)), 2);
        assert_eq!(q.health_score(t0 + Duration::from_secs(3)), 1);
        assert_eq!(q.health_score(t0 + Duration::from_secs(60)), 0);
        // The score never exceeds its cap.
        for _ in 0..10 {
            q.schedule(s, suspicion("c"), t0);
        }
        assert_eq!(q.health_score(t0), MAX_HEALTH_SCORE);
    }

    #[test]
    fn a_node_whose_probes_keep_failing_stretches_its_pending_suspicions() {
        let t0 = Instant::now();
        let mut q = TimerQueue::new(Profile::Lan, t0);
        let s = Duration::from_secs(4);
        q.schedule(s, suspicion("a"), t0);
        // Cut off from the network: every probe fails, one a second.
        for k in 1..4 {
            q.schedule(s, suspicion(&format!("b{k}")), t0 + Duration::from_secs(k));
        }
        assert_eq!(
            q.health_score(t0 + Duration::from_secs(4)),
            MAX_HEALTH_SCORE
        );
        // "a" was due at 4 s; the node now looks sick, so it waits 4 × 4 s from its start.
        let stretched = t0 + s * (1 + MAX_HEALTH_SCORE);
        let mut now = t0;
        while now < stretched {
            assert!(
                !drain(&mut q, now).contains(&suspicion("a")),
                "{:?}",
                now - t0
            );
            now += Duration::from_millis(100);
        }
        assert!(drain(&mut q, stretched).contains(&suspicion("a")));
        assert_eq!(q.stalls(), 0);
    }

    #[test]
    fn a_stall_defers_overdue_timers_and_lengthens_overdue_suspicions() {
        let t0 = Instant::now();
        let mut q = TimerQueue::new(Profile::Lan, t0);
        let s = Duration::from_secs(4);
        q.schedule(s, suspicion("a"), t0);
        q.schedule(Duration::from_secs(1), Timer::ProbeRandomMember(7), t0);
        q.schedule(Duration::from_secs(30), Timer::PeriodicAnnounce(7), t0);
        // Late by 0.5 s: a scheduling hiccup, not a stall; the probe fires.
        let late = t0 + Duration::from_millis(1500);
        assert_eq!(drain(&mut q, late), vec![Timer::ProbeRandomMember(7)]);
        assert_eq!(q.stalls(), 0);
        // The process was paused for 10 s: nothing fires on stale evidence.
        q.schedule(Duration::from_secs(1), Timer::ProbeRandomMember(8), late);
        let resumed = t0 + Duration::from_secs(12);
        assert!(drain(&mut q, resumed).is_empty());
        assert_eq!(q.stalls(), 1);
        assert_eq!(q.health_score(resumed), MAX_HEALTH_SCORE);
        // The probe waits one round trip (500 ms on a LAN) for the buffered acks; the
        // suspicion starts over, lengthened; timers not yet due keep their deadlines.
        let rtt = Duration::from_millis(500);
        assert_eq!(q.next_deadline(), Some(resumed + rtt));
        assert_eq!(
            drain(&mut q, resumed + rtt),
            vec![Timer::ProbeRandomMember(8)]
        );
        let verdict = resumed + s * (1 + MAX_HEALTH_SCORE);
        assert!(drain(&mut q, verdict - Duration::from_millis(1)).is_empty());
        assert_eq!(q.next_deadline(), Some(verdict));
        assert_eq!(drain(&mut q, verdict), vec![suspicion("a")]);
        let announce = t0 + Duration::from_secs(30);
        assert_eq!(drain(&mut q, announce), vec![Timer::PeriodicAnnounce(7)]);
        assert_eq!(q.stalls(), 1);
    }
}
