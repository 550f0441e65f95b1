//! Watermark tracking over sources and their partitions (SPEC §3, "Watermark").
//!
//! A partition's watermark is the largest event time it delivered minus the allowed
//! out-of-orderness; a source's is the minimum over its partitions that are neither
//! exhausted nor idle. Partitions belong to *groups*, each joined on its own (SPEC §6:
//! partition number p of co-partitioned inputs is one group); a group's watermark is the
//! minimum over its partitions of every source that are neither exhausted nor idle.
//! Without groups every partition is in group 0, whose watermark is then the join's.
//! No watermark moves backwards. Processing time is passed in, so tests control the
//! clock.

use crate::time::{EventTime, Watermark};

/// A partition of one source, numbered from zero within the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartitionId(pub u32);

#[derive(Clone, Debug, Default)]
struct Partition {
    max_time: Option<i64>,
    last_active_ms: u64,
    exhausted: bool,
    /// Not read yet (a topic while its history is read first): it neither holds the
    /// watermark back nor counts as exhausted.
    dormant: bool,
}

#[derive(Clone, Debug)]
pub struct Watermarks {
    max_out_of_orderness_ms: i64,
    idle_timeout_ms: u64,
    /// Partitions per source.
    sources: Vec<Vec<Partition>>,
    /// Per source and partition: its group.
    group_of: Vec<Vec<u32>>,
    /// Per group: its watermark.
    current: Vec<Watermark>,
}

impl Watermarks {
    /// `partitions[i]` is the partition count of source `i`; all in one group.
    pub fn new(
        partitions: &[u32],
        max_out_of_orderness_ms: i64,
        idle_timeout_ms: u64,
        now_ms: u64,
    ) -> Watermarks {
        let groups = partitions.iter().map(|&n| vec![0; n as usize]).collect();
        Watermarks::grouped(groups, max_out_of_orderness_ms, idle_timeout_ms, now_ms)
    }

    /// `group_of[i][p]` is the group of partition `p` of source `i`. Groups are numbered
    /// from zero with none left out.
    pub fn grouped(
        group_of: Vec<Vec<u32>>,
        max_out_of_orderness_ms: i64,
        idle_timeout_ms: u64,
        now_ms: u64,
    ) -> Watermarks {
        let start = Partition {
            last_active_ms: now_ms,
            ..Partition::default()
        };
        let groups = group_of.iter().flatten().map(|&g| g + 1).max().unwrap_or(1);
        Watermarks {
            max_out_of_orderness_ms,
            idle_timeout_ms,
            sources: group_of
                .iter()
                .map(|g| vec![start.clone(); g.len()])
                .collect(),
            group_of,
            current: vec![Watermark::MIN; groups as usize],
        }
    }

    pub fn groups(&self) -> u32 {
        self.current.len() as u32
    }

    /// The group of a source's partition.
    pub fn group_of(&self, source: usize, partition: PartitionId) -> u32 {
        self.group_of[source][partition.0 as usize]
    }

    /// Records an event delivered by a partition. Returns true when it raised the
    /// partition's largest time (only then can the watermark move).
    pub fn observe(
        &mut self,
        source: usize,
        partition: PartitionId,
        time: EventTime,
        now_ms: u64,
    ) -> bool {
        let p = &mut self.sources[source][partition.0 as usize];
        p.last_active_ms = now_ms;
        p.exhausted = false;
        let raised = p.max_time.is_none_or(|m| time.0 > m);
        if raised {
            p.max_time = Some(time.0);
        }
        raised
    }

    /// Records that a partition is reading but delivered nothing new (it is not idle).
    pub fn touch(&mut self, source: usize, partition: PartitionId, now_ms: u64) {
        self.sources[source][partition.0 as usize].last_active_ms = now_ms;
    }

    /// Records that a bounded partition has no more events.
    pub fn exhaust(&mut self, source: usize, partition: PartitionId) {
        self.sources[source][partition.0 as usize].exhausted = true;
    }

    /// Puts a partition to sleep (it will be read later) or wakes it, active from
    /// `now_ms`.
    pub fn set_dormant(
        &mut self,
        source: usize,
        partition: PartitionId,
        dormant: bool,
        now_ms: u64,
    ) {
        let p = &mut self.sources[source][partition.0 as usize];
        p.dormant = dormant;
        p.last_active_ms = now_ms;
    }

    /// A partition's watermark, or `None` when it does not hold the watermark back
    /// (idle, exhausted or dormant).
    fn holding(&self, p: &Partition, now_ms: u64) -> Option<Watermark> {
        let holds = !p.exhausted
            && !p.dormant
            && now_ms.saturating_sub(p.last_active_ms) < self.idle_timeout_ms;
        holds.then(|| match p.max_time {
            Some(t) => Watermark::at(EventTime(t.saturating_sub(self.max_out_of_orderness_ms))),
            None => Watermark::MIN,
        })
    }

    /// The watermark of one source, or `None` when none of its partitions holds it
    /// (all idle or exhausted).
    pub fn source(&self, source: usize, now_ms: u64) -> Option<Watermark> {
        self.sources[source]
            .iter()
            .filter_map(|p| self.holding(p, now_ms))
            .min()
    }

    /// Recomputes every group's watermark; returns the lowest (see
    /// [`current`](Self::current)).
    pub fn update(&mut self, now_ms: u64) -> Watermark {
        // Per group: the lowest holding partition, and whether every one is exhausted.
        let mut next = vec![(None::<Watermark>, true); self.current.len()];
        for (source, groups) in self.sources.iter().zip(&self.group_of) {
            for (p, &g) in source.iter().zip(groups) {
                let (low, exhausted) = &mut next[g as usize];
                *exhausted &= p.exhausted;
                if let Some(w) = self.holding(p, now_ms) {
                    *low = Some(low.map_or(w, |l| l.min(w)));
                }
            }
        }
        for (current, (low, exhausted)) in self.current.iter_mut().zip(next) {
            let next = if exhausted { Some(Watermark::MAX) } else { low };
            // With every partition of a group idle nothing holds its watermark and
            // nothing moves it.
            if let Some(w) = next {
                *current = (*current).max(w);
            }
        }
        self.current()
    }

    /// The lowest group watermark: no group expects an event before it (the join's
    /// watermark when there is one group).
    pub fn current(&self) -> Watermark {
        self.current.iter().copied().min().unwrap_or(Watermark::MIN)
    }

    /// The watermark of one group.
    pub fn group(&self, group: u32) -> Watermark {
        self.current[group as usize]
    }

    /// Every group's watermark, by group.
    pub fn group_watermarks(&self) -> &[Watermark] {
        &self.current
    }

    /// Per source and partition: the largest time delivered and whether it is
    /// exhausted. With [`group_watermarks`](Self::group_watermarks) this is what a
    /// checkpoint keeps.
    pub fn partitions(&self) -> Vec<Vec<(Option<i64>, bool)>> {
        self.sources
            .iter()
            .map(|s| s.iter().map(|p| (p.max_time, p.exhausted)).collect())
            .collect()
    }

    /// Restores what [`partitions`](Self::partitions) and `group_watermarks`
    /// returned; the partitions count as active from `now_ms`. No watermark moves
    /// backwards.
    pub fn restore(
        &mut self,
        partitions: &[Vec<(Option<i64>, bool)>],
        groups: &[Watermark],
        now_ms: u64,
    ) {
        for (source, saved) in self.sources.iter_mut().zip(partitions) {
            for (p, &(max_time, exhausted)) in source.iter_mut().zip(saved) {
                p.max_time = max_time;
                p.exhausted = exhausted;
                p.last_active_ms = now_ms;
            }
        }
        for (current, &saved) in self.current.iter_mut().zip(groups) {
            *current = (*current).max(saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: PartitionId = PartitionId(0);
    const P1: PartitionId = PartitionId(1);

    #[test]
    fn minimum_over_sources_minus_disorder() {
        let mut w = Watermarks::new(&[1, 1], 5, 1_000, 0);
        w.observe(0, P0, EventTime(100), 0);
        assert_eq!(
            w.update(0),
            Watermark::MIN,
            "source 1 has delivered nothing"
        );
        w.observe(1, P0, EventTime(50), 0);
        assert_eq!(w.update(0), Watermark::at(EventTime(45)));
        w.observe(1, P0, EventTime(40), 0);
        assert_eq!(w.update(0), Watermark::at(EventTime(45)), "max, not last");
    }

    #[test]
    fn idle_partitions_stop_holding_and_rejoin() {
        let mut w = Watermarks::new(&[2], 0, 1_000, 0);
        w.observe(0, P0, EventTime(500), 0);
        w.observe(0, P1, EventTime(100), 0);
        assert_eq!(w.update(10), Watermark::at(EventTime(100)));
        w.observe(0, P0, EventTime(600), 1_500);
        assert_eq!(w.update(1_500), Watermark::at(EventTime(600)), "P1 idle");
        w.observe(0, P1, EventTime(200), 1_600);
        assert_eq!(
            w.update(1_600),
            Watermark::at(EventTime(600)),
            "never backwards"
        );
    }

    #[test]
    fn exhausted_sources_release_and_all_exhausted_is_infinite() {
        let mut w = Watermarks::new(&[1, 1], 0, u64::MAX, 0);
        w.observe(0, P0, EventTime(10), 0);
        w.observe(1, P0, EventTime(20), 0);
        w.exhaust(0, P0);
        assert_eq!(w.update(0), Watermark::at(EventTime(20)));
        w.exhaust(1, P0);
        assert_eq!(w.update(0), Watermark::MAX);
    }

    /// A dormant partition (a topic waiting for its history to be read) neither holds
    /// the watermark back nor lets it run to infinity when the rest is exhausted.
    #[test]
    fn dormant_partitions_neither_hold_nor_release() {
        let mut w = Watermarks::new(&[2, 1], 0, u64::MAX, 0);
        w.set_dormant(0, P0, true, 0);
        w.observe(0, P1, EventTime(30), 0);
        w.observe(1, P0, EventTime(50), 0);
        assert_eq!(
            w.update(0),
            Watermark::at(EventTime(30)),
            "P0 does not hold"
        );
        w.exhaust(0, P1);
        w.exhaust(1, P0);
        assert_eq!(
            w.update(0),
            Watermark::at(EventTime(30)),
            "a dormant partition is not exhausted: nothing moves"
        );
        w.set_dormant(0, P0, false, 5);
        assert_eq!(
            w.update(5),
            Watermark::at(EventTime(30)),
            "awake, empty: holds"
        );
        w.observe(0, P0, EventTime(90), 6);
        assert_eq!(w.update(6), Watermark::at(EventTime(90)));
    }

    /// Partition p of both sources is a group of its own: a partition that lags holds
    /// back its group only, and a group whose partitions are all exhausted is infinite
    /// while the others are not.
    #[test]
    fn groups_move_on_their_own() {
        let mut w = Watermarks::grouped(vec![vec![0, 1], vec![0, 1]], 0, u64::MAX, 0);
        assert_eq!(w.groups(), 2);
        assert_eq!(w.group_of(1, P1), 1);
        w.observe(0, P0, EventTime(100), 0);
        w.observe(1, P0, EventTime(80), 0);
        w.observe(0, P1, EventTime(10), 0);
        w.observe(1, P1, EventTime(500), 0);
        assert_eq!(
            w.update(0),
            Watermark::at(EventTime(10)),
            "the lowest group"
        );
        assert_eq!(w.group(0), Watermark::at(EventTime(80)));
        assert_eq!(w.group(1), Watermark::at(EventTime(10)));
        w.exhaust(0, P1);
        w.exhaust(1, P1);
        w.update(0);
        assert_eq!(w.group(1), Watermark::MAX);
        assert_eq!(w.group(0), Watermark::at(EventTime(80)), "group 0 unmoved");
        assert_eq!(w.current(), Watermark::at(EventTime(80)));
        let mut restored = Watermarks::grouped(vec![vec![0, 1], vec![0, 1]], 0, u64::MAX, 0);
        restored.restore(&w.partitions(), w.group_watermarks(), 0);
        assert_eq!(restored.group_watermarks(), w.group_watermarks());
    }
}
