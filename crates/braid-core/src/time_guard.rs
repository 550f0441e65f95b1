//! A partition's watermark, guarded against event times its stream does not corroborate.
//!
//! One corrupt time (a flipped bit makes a valid time years ahead) would otherwise raise
//! its partition's largest time, and with it the watermark, and every later event of the
//! stream would be late. The guard keeps two rules (README "Times far ahead"):
//!
//! 1. **Corroboration.** An event's time counts for the watermark only once the next
//!    `confirm_events` events of its partition agree with it: an event agrees when it
//!    would not be late against it (`time >= t - slack`, slack being the disorder bound
//!    plus the allowed lateness) and disagrees otherwise. One disagreeing event before
//!    then refutes the time: a time that would make a later event of its own partition
//!    late is not trusted, and the next time every later event agrees with counts
//!    instead.
//!    A well-ordered stream corroborates every time within `confirm_events` events, so
//!    the watermark lags by that many events and nothing else changes.
//! 2. **Holding.** An event further ahead of the partition's corroborated time than
//!    `max_jump_ms` is held back from the join (not just from the watermark): it is
//!    released when the corroborated time comes within `max_jump_ms` of it (a real jump:
//!    the stream's next events carry it), and rejected (a dead letter) when
//!    [`HOLD_DECISION_EVENTS`] later events have come and the stream has not followed.
//!    So a far-future event never sits in the join's state for years.
//!
//! Legitimate jumps keep working: a partition idle for a day, history followed by live
//! data, and a partition's first events are all followed by events that agree with them
//! (its first events are held until one is corroborated, since nothing is within reach
//! of a partition that has corroborated nothing).
//! The guard is pure: the caller feeds times in arrival order and acts on the verdicts.

use std::collections::VecDeque;

use crate::time::EventTime;

/// Later events after which a held event that the stream has not followed is rejected.
pub const HOLD_DECISION_EVENTS: u32 = 64;
/// Times awaiting corroboration per partition; beyond it the oldest is dropped (it then
/// never counts, which only delays the watermark).
pub const CANDIDATES_MAX: usize = 256;
/// Events held per partition; beyond it the oldest held event is rejected at once.
pub const HELD_EVENTS_MAX: usize = 1_024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeGuardConfig {
    /// Later events that must agree with a time before it counts; 0 turns the guard off.
    pub confirm_events: u32,
    /// How far behind a time a later event may be and still agree with it.
    pub slack_ms: i64,
    /// Events further ahead of the corroborated time are held; `None` holds nothing.
    pub max_jump_ms: Option<i64>,
}

impl TimeGuardConfig {
    pub const OFF: TimeGuardConfig = TimeGuardConfig {
        confirm_events: 0,
        slack_ms: 0,
        max_jump_ms: None,
    };

    pub fn enabled(&self) -> bool {
        self.confirm_events > 0
    }
}

/// A time awaiting corroboration: the partition's largest yet, with no later event
/// disagreeing so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub time: i64,
    /// The partition's event count when it arrived: the events after it are
    /// `seen - seq`, and all of them agreed (one that did not removed it).
    pub seq: u64,
}

/// A held event's time and the votes of the events after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Votes {
    pub time: i64,
    pub agree: u32,
    pub disagree: u32,
}

impl Votes {
    fn new(time: i64) -> Votes {
        Votes {
            time,
            agree: 0,
            disagree: 0,
        }
    }

    /// Counts a later event's vote.
    fn vote(&mut self, later: i64, slack_ms: i64) {
        if agrees(later, self.time, slack_ms) {
            self.agree += 1;
        } else {
            self.disagree += 1;
        }
    }
}

/// Whether a later event at `later` agrees with `time`: it would not be late against it.
fn agrees(later: i64, time: i64, slack_ms: i64) -> bool {
    i128::from(later) >= i128::from(time) - i128::from(slack_ms)
}

/// An event held back from the join, with the votes of the events after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<T> {
    pub votes: Votes,
    pub item: T,
}

/// What became of a held event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// The stream followed it: process it as if it arrived now.
    Release(T),
    /// The stream did not follow it: a dead letter.
    Reject(Rejected<T>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Rejected<T> {
    pub item: T,
    pub time: EventTime,
    /// The partition's corroborated time when it was rejected (`None`: nothing yet).
    pub corroborated: Option<i64>,
    pub votes: Votes,
}

/// What to do with an offered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Process it now.
    Admit,
    /// Held: the guard keeps it and gives it back as a [`Verdict`] later.
    Held,
}

/// The guard of one partition. `T` is what the caller keeps of a held event.
#[derive(Clone, Debug)]
pub struct TimeGuard<T> {
    config: TimeGuardConfig,
    corroborated: Option<i64>,
    /// Events offered so far.
    seen: u64,
    /// Rising times, oldest first: each is larger than every earlier candidate.
    candidates: VecDeque<Candidate>,
    held: VecDeque<Held<T>>,
}

/// A guard's state, as a checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeGuardState<T> {
    pub corroborated: Option<i64>,
    pub seen: u64,
    pub candidates: Vec<Candidate>,
    pub held: Vec<Held<T>>,
}

impl<T> TimeGuard<T> {
    pub fn new(config: TimeGuardConfig) -> TimeGuard<T> {
        TimeGuard {
            config,
            corroborated: None,
            seen: 0,
            candidates: VecDeque::new(),
            held: VecDeque::new(),
        }
    }

    /// The largest corroborated time: what the partition's watermark follows.
    pub fn corroborated(&self) -> Option<i64> {
        self.corroborated
    }

    /// Offers the next event of the partition, at `time`. `keep` makes what is held of
    /// it, called only if it is held. Earlier held events decided by this one are
    /// appended to `verdicts`, in arrival order. With the guard off every event is
    /// admitted and its time counts at once.
    pub fn offer(
        &mut self,
        time: EventTime,
        keep: impl FnOnce() -> T,
        verdicts: &mut Vec<Verdict<T>>,
    ) -> Arrival {
        let t = time.0;
        if !self.config.enabled() {
            self.corroborated = Some(self.corroborated.map_or(t, |c| c.max(t)));
            return Arrival::Admit;
        }
        self.seen += 1;
        let slack_ms = self.config.slack_ms;
        for held in &mut self.held {
            held.votes.vote(t, slack_ms);
        }
        self.vote_candidates(t);
        let arrival = if self.out_of_reach(t) {
            self.held.push_back(Held {
                votes: Votes::new(t),
                item: keep(),
            });
            Arrival::Held
        } else {
            Arrival::Admit
        };
        // Only a new largest time is a candidate: a smaller one is corroborated by
        // nothing that a larger pending one is not.
        let largest = self.candidates.back().map(|c| c.time).or(self.corroborated);
        if largest.is_none_or(|l| t > l) {
            if self.candidates.len() == CANDIDATES_MAX {
                self.candidates.pop_front();
            }
            self.candidates.push_back(Candidate {
                time: t,
                seq: self.seen,
            });
        }
        self.decide_held(verdicts);
        arrival
    }

    /// The partition has ended: every held event is decided now. Nothing can make its
    /// stream late any more, so only an event far ahead of a corroborated time that
    /// more later events disagreed with than agreed is rejected; the rest are released
    /// (a short stream that corroborated nothing is judged on too little to reject).
    pub fn finish(&mut self, verdicts: &mut Vec<Verdict<T>>) {
        while let Some(held) = self.held.pop_front() {
            let refuted = held.votes.disagree > held.votes.agree;
            if refuted && self.corroborated.is_some() && self.out_of_reach(held.votes.time) {
                verdicts.push(self.reject(held));
            } else {
                verdicts.push(Verdict::Release(held.item));
            }
        }
        self.candidates.clear();
    }

    /// Counts a later event's vote on every candidate, in amortised constant time.
    /// Times rise from the front of the queue to its back, so the candidates this event
    /// disagrees with are a suffix (removed: refuted), and those with enough events
    /// after them are a prefix (removed: corroborated).
    fn vote_candidates(&mut self, t: i64) {
        let slack_ms = self.config.slack_ms;
        while self
            .candidates
            .back()
            .is_some_and(|c| !agrees(t, c.time, slack_ms))
        {
            self.candidates.pop_back();
        }
        let confirm = u64::from(self.config.confirm_events);
        while let Some(c) = self.candidates.front() {
            if self.seen - c.seq < confirm {
                break;
            }
            self.corroborated = Some(self.corroborated.map_or(c.time, |r| r.max(c.time)));
            self.candidates.pop_front();
        }
    }

    /// Whether an event at `t` is too far ahead of the corroborated time to be admitted.
    /// Before anything is corroborated nothing is within reach: a partition's first
    /// events are held until one of them is corroborated, so that a corrupt first event
    /// is held and rejected like any other.
    fn out_of_reach(&self, t: i64) -> bool {
        match (self.config.max_jump_ms, self.corroborated) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(max_jump_ms), Some(c)) => i128::from(t) > i128::from(c) + i128::from(max_jump_ms),
        }
    }

    fn decide_held(&mut self, verdicts: &mut Vec<Verdict<T>>) {
        if self.held.is_empty() {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.held.len());
        while let Some(held) = self.held.pop_front() {
            if !self.out_of_reach(held.votes.time) {
                verdicts.push(Verdict::Release(held.item));
            } else if held.votes.agree + held.votes.disagree >= HOLD_DECISION_EVENTS {
                verdicts.push(self.reject(held));
            } else {
                kept.push_back(held);
            }
        }
        while kept.len() > HELD_EVENTS_MAX {
            let oldest = kept.pop_front().expect("more than the limit");
            verdicts.push(self.reject(oldest));
        }
        self.held = kept;
    }

    fn reject(&self, held: Held<T>) -> Verdict<T> {
        Verdict::Reject(Rejected {
            time: EventTime(held.votes.time),
            corroborated: self.corroborated,
            votes: held.votes,
            item: held.item,
        })
    }

    /// The guard's state for a checkpoint.
    pub fn state(&self) -> TimeGuardState<T>
    where
        T: Clone,
    {
        TimeGuardState {
            corroborated: self.corroborated,
            seen: self.seen,
            candidates: self.candidates.iter().copied().collect(),
            held: self.held.iter().cloned().collect(),
        }
    }

    /// Continues from a checkpoint's [`state`](Self::state).
    pub fn restore(&mut self, state: TimeGuardState<T>) {
        self.corroborated = state.corroborated;
        self.seen = state.seen;
        self.candidates = state.candidates.into();
        self.held = state.held.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: TimeGuardConfig = TimeGuardConfig {
        confirm_events: 4,
        slack_ms: 5_000,
        max_jump_ms: Some(3_600_000),
    };
    const DAY_MS: i64 = 86_400_000;

    /// What became of a stream of times: admitted (in processing order), rejected.
    #[derive(Debug, Default)]
    struct Outcome {
        admitted: Vec<i64>,
        rejected: Vec<i64>,
    }

    fn feed(guard: &mut TimeGuard<i64>, times: &[i64], out: &mut Outcome) {
        let mut verdicts = Vec::new();
        for &t in times {
            let arrival = guard.offer(EventTime(t), || t, &mut verdicts);
            settle(&mut verdicts, out);
            if arrival == Arrival::Admit {
                out.admitted.push(t);
            }
        }
    }

    fn settle(verdicts: &mut Vec<Verdict<i64>>, out: &mut Outcome) {
        for v in verdicts.drain(..) {
            match v {
                Verdict::Release(t) => out.admitted.push(t),
                Verdict::Reject(r) => out.rejected.push(r.item),
            }
        }
    }

    fn run(config: TimeGuardConfig, times: &[i64]) -> (Outcome, Option<i64>) {
        let mut guard = TimeGuard::new(config);
        let mut out = Outcome::default();
        feed(&mut guard, times, &mut out);
        let corroborated = guard.corroborated();
        let mut verdicts = Vec::new();
        guard.finish(&mut verdicts);
        settle(&mut verdicts, &mut out);
        (out, corroborated)
    }

    /// Times 1 s apart with up to 4 s of disorder, as a generator would make them.
    fn stream(from: i64, n: i64) -> Vec<i64> {
        (0..n)
            .map(|i| from + i * 1_000 - (i * 7919 % 5) * 1_000)
            .collect()
    }

    fn sorted(mut v: Vec<i64>) -> Vec<i64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn off_admits_everything_at_once() {
        let times = [5, 1_000_000_000_000, 7];
        let (out, corroborated) = run(TimeGuardConfig::OFF, &times);
        assert_eq!(out.admitted, times);
        assert_eq!(corroborated, Some(1_000_000_000_000));
    }

    #[test]
    fn an_ordered_stream_is_admitted_whole_and_its_time_lags_by_the_confirmations() {
        let times = stream(1_000_000, 200);
        let (out, corroborated) = run(CONFIG, &times);
        assert_eq!(
            out.admitted, times,
            "first events held briefly, then in order"
        );
        assert!(out.rejected.is_empty());
        let max_confirmed = times[..times.len() - CONFIG.confirm_events as usize]
            .iter()
            .max()
            .copied();
        assert!(corroborated >= max_confirmed.map(|t| t - 5_000));
        assert!(corroborated <= times.iter().max().copied());
    }

    #[test]
    fn a_far_future_event_is_rejected_and_never_counts() {
        let mut times = stream(1_000_000, 100);
        let bad = 1_000_000 + 3 * 365 * DAY_MS;
        times.insert(50, bad);
        let (out, corroborated) = run(CONFIG, &times);
        assert_eq!(out.rejected, vec![bad]);
        let mut want = times.clone();
        want.retain(|&t| t != bad);
        assert_eq!(out.admitted, want);
        assert!(corroborated < Some(1_000_000 + 100_000));
    }

    #[test]
    fn without_holding_a_far_future_event_is_admitted_and_still_never_counts() {
        let config = TimeGuardConfig {
            max_jump_ms: None,
            ..CONFIG
        };
        let mut times = stream(1_000_000, 100);
        let bad = 1_000_000 + 3 * 365 * DAY_MS;
        times.insert(50, bad);
        let (out, corroborated) = run(config, &times);
        assert!(out.rejected.is_empty());
        assert_eq!(
            out.admitted, times,
            "nothing is held, not even first events"
        );
        assert!(corroborated < Some(1_000_000 + 100_000));
    }

    #[test]
    fn a_small_jump_ahead_is_admitted_but_does_not_move_the_time() {
        // 20 s ahead of a stream at 1 s per event: within reach, refuted by the next
        // events, which are more than the 5 s slack behind it.
        let mut times = stream(1_000_000, 60);
        let ahead = times[30] + 20_000;
        times.insert(31, ahead);
        let mut guard = TimeGuard::new(CONFIG);
        let mut out = Outcome::default();
        feed(&mut guard, &times[..40], &mut out);
        assert!(guard.corroborated() < Some(ahead - 5_000));
        assert!(out.admitted.contains(&ahead));
        assert!(out.rejected.is_empty());
    }

    #[test]
    fn a_partition_idle_for_a_day_resumes_without_loss() {
        let mut times = stream(1_000_000, 50);
        times.extend(stream(1_000_000 + DAY_MS, 50));
        let (out, corroborated) = run(CONFIG, &times);
        assert!(out.rejected.is_empty());
        assert_eq!(out.admitted, times);
        assert!(corroborated > Some(1_000_000 + DAY_MS));
    }

    #[test]
    fn a_corrupt_first_event_is_rejected() {
        let mut times = vec![9_000_000_000_000];
        times.extend(stream(1_000_000, 100));
        let (out, _) = run(CONFIG, &times);
        assert_eq!(out.rejected, vec![9_000_000_000_000]);
        assert_eq!(out.admitted, times[1..]);
    }

    #[test]
    fn at_the_end_held_events_that_nothing_refuted_are_released() {
        let mut times = stream(1_000_000, 50);
        times.push(1_000_000 + DAY_MS);
        times.push(1_000_000 + DAY_MS + 1);
        let (out, _) = run(CONFIG, &times);
        assert!(out.rejected.is_empty());
        assert_eq!(sorted(out.admitted), sorted(times));
    }

    #[test]
    fn a_restored_guard_decides_as_the_uninterrupted_one() {
        let mut times = stream(1_000_000, 120);
        times.insert(40, 5_000_000_000_000);
        times.insert(80, 1_000_000 + DAY_MS);
        let (whole, _) = run(CONFIG, &times);
        for cut in [1, 41, 45, 81, 100] {
            let mut first = TimeGuard::new(CONFIG);
            let mut out = Outcome::default();
            feed(&mut first, &times[..cut], &mut out);
            let mut second = TimeGuard::new(CONFIG);
            second.restore(first.state());
            feed(&mut second, &times[cut..], &mut out);
            let mut verdicts = Vec::new();
            second.finish(&mut verdicts);
            settle(&mut verdicts, &mut out);
            assert_eq!(out.admitted, whole.admitted, "cut at {cut}");
            assert_eq!(out.rejected, whole.rejected, "cut at {cut}");
        }
    }

    #[test]
    fn held_events_are_bounded() {
        // Strictly decreasing times never corroborate each other: everything is held
        // until the limit, then decided oldest first.
        let times: Vec<i64> = (0..(HELD_EVENTS_MAX as i64 + 10))
            .map(|i| 10_000_000_000 - i * 10_000_000)
            .collect();
        let mut guard = TimeGuard::new(CONFIG);
        let mut out = Outcome::default();
        feed(&mut guard, &times, &mut out);
        assert!(guard.held.len() <= HELD_EVENTS_MAX);
        assert_eq!(
            out.admitted.len() + out.rejected.len() + guard.held.len(),
            times.len()
        );
    }
}
