//! Re-splitting a join's state by key: when a partition's state was split over shards
//! by key and the job restarts with another number of shards, every piece of the
//! checkpoint is moved, event by event, into the piece that now holds its key
//! ([`Join::split_into`]).

use std::borrow::BorrowMut;

use super::{Event, Join};
use crate::bucket::{decode_events, Segment};
use crate::key::hash_key;
use crate::spec::Side;
use crate::store::{SegmentId, StateStore, StoreError};
use crate::time::EventTime;

impl<S: StateStore> Join<S> {
    /// Moves this join's whole state into `pieces`: each retained event, with its
    /// matched mark, into `pieces[route(key_hash)]`; every remembered id into every
    /// piece; the watermark into each; the counts of what already left the state into
    /// `pieces[0]` (so that the pieces' counts add up to this join's). Called once per
    /// old piece of a partition, the new pieces end up holding exactly the partition's
    /// state, split the new way.
    ///
    /// Ids are copied to every piece because the join keeps an id without its event's
    /// key: a piece remembers ids of events it does not hold, which costs memory (ids
    /// are about 25 bytes each) until their buckets expire, and never drops an event
    /// that was not a duplicate on its source (SPEC §3: an id seen on the source).
    ///
    /// Memory: the pieces keep their budgets as they fill, spilling after every
    /// segment moved, so they overshoot by at most one segment. This join's cold
    /// segments are read from its store whole, one at a time.
    pub fn split_into<T: StateStore, P: BorrowMut<Join<T>>>(
        mut self,
        pieces: &mut [P],
        route: impl Fn(u64) -> usize,
    ) -> Result<(), StoreError> {
        assert!(
            !pieces.is_empty(),
            "a state is split into at least one piece"
        );
        assert!(
            self.probes.is_empty(),
            "a state is split as a checkpoint left it, without waiting cold probes"
        );
        let mut pieces: Vec<&mut Join<T>> = pieces.iter_mut().map(BorrowMut::borrow_mut).collect();
        let mut done = self.counts;
        done.retained = [0, 0];
        pieces[0].counts.add(&done);
        for piece in pieces.iter_mut() {
            // Pieces of one partition share its watermark at a checkpoint barrier.
            piece.watermark = piece.watermark.max(self.watermark);
        }
        let width = self.bucket_width_ms;
        for side in Side::BOTH {
            let state = std::mem::take(&mut self.sides[side.index()]);
            for piece in pieces.iter_mut() {
                let ids = &mut piece.sides[side.index()].ids;
                state.ids.for_each(|id, bucket| {
                    ids.insert(id, bucket);
                });
            }
            let mut shaped = Vec::new();
            for (bucket_id, bucket) in state.buckets {
                for segment in &bucket.segments {
                    // Each piece stores the payload by its own shapes.
                    let mut put = |matched: bool, key: &[u8], time: i64, stored: &[u8]| {
                        let payload = state.shapes.decode(stored, &mut shaped);
                        let event = Event {
                            side,
                            key,
                            key_hash: hash_key(key),
                            time: EventTime(time),
                            id: None,
                            payload,
                        };
                        let piece = &mut pieces[route(event.key_hash)];
                        piece.insert(&event, time.div_euclid(width), matched);
                    };
                    match segment {
                        Segment::Hot(hot) => hot.for_each(&mut put),
                        Segment::Cold(cold) => {
                            let id = SegmentId {
                                side,
                                bucket: bucket_id,
                                segment: cold.number,
                            };
                            self.store.scan_segment(id, &mut |key, value| {
                                decode_events(value, |ordinal, time, payload| {
                                    put(cold.marks.get(ordinal), key, time, payload);
                                });
                            })?;
                        }
                    }
                    for piece in pieces.iter_mut() {
                        piece.enforce_memory_max()?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::RowSink;
    use crate::{JoinKind, JoinSpec, MemStore, Watermark};

    const SPEC: JoinSpec = JoinSpec {
        kind: JoinKind::Full,
        lower_ms: 0,
        upper_ms: 1_000,
        allowed_lateness_ms: 0,
    };

    fn event<'a>(side: Side, key: &'a [u8], time: i64, id: u128, payload: &'a [u8]) -> Event<'a> {
        Event {
            side,
            key,
            key_hash: hash_key(key),
            time: EventTime(time),
            id: Some(id),
            payload,
        }
    }

    /// Left events of 40 keys, half of them spilled, some matched; split three ways,
    /// then right events and duplicates arrive at the pieces that hold their keys.
    #[test]
    fn a_split_keeps_marks_ids_counts_and_cold_events() {
        let keys: Vec<Vec<u8>> = (0..40u8).map(|k| vec![b'k', k]).collect();
        let mut whole = Join::new(SPEC, MemStore::default(), 4_096);
        let mut sink = RowSink::default();
        for (i, key) in keys.iter().enumerate() {
            let id = i as u128;
            whole
                .on_event(&event(Side::Left, key, 100, id, b"l"), &mut sink)
                .expect("model store");
            if i % 4 == 0 {
                // A match now: the left event is marked matched.
                whole
                    .on_event(&event(Side::Right, key, 150, 1_000 + id, b"r0"), &mut sink)
                    .expect("model store");
            }
        }
        assert!(whole.counts().spilled_events > 0, "some state is cold");
        whole.flush_cold_probes(&mut sink).expect("model store");
        let before = whole.counts();
        let route = |hash: u64| (hash % 3) as usize;
        let mut pieces: Vec<Join<MemStore>> = (0..3)
            .map(|_| Join::new(SPEC, MemStore::default(), 4_096))
            .collect();
        whole.split_into(&mut pieces, route).expect("model store");
        let retained: u64 = pieces.iter().map(|p| p.counts().retained[0]).sum();
        assert_eq!(retained, before.retained[0], "every left event moved once");
        for (i, key) in keys.iter().enumerate() {
            let piece = &mut pieces[route(hash_key(key))];
            // A duplicate of the left event: refused by the piece.
            piece
                .on_event(&event(Side::Left, key, 100, i as u128, b"dup"), &mut sink)
                .expect("model store");
            piece
                .on_event(
                    &event(Side::Right, key, 200, 2_000 + i as u128, b"r1"),
                    &mut sink,
                )
                .expect("model store");
        }
        for piece in &mut pieces {
            piece
                .advance(Watermark::MAX, &mut sink)
                .expect("model store");
        }
        let mut counts = crate::JoinCounts::default();
        for piece in &pieces {
            counts.add(&piece.counts());
        }
        assert_eq!(counts.duplicates[0], 40, "ids moved with the state");
        assert_eq!(
            counts.pairs,
            10 + 40,
            "every left event met its second right"
        );
        assert_eq!(counts.retained, [0, 0]);
        // Left events all matched; the first right events matched, the second too.
        assert_eq!(
            counts.unmatched_emitted,
            [0, 0],
            "marks moved with the events"
        );
        assert_eq!(counts.matched, [40, 50]);
        let mut rows = sink.0;
        rows.sort();
        assert_eq!(rows.iter().filter(|r| r.ends_with("l|r1")).count(), 40);
        assert!(!rows.iter().any(|r| r.contains("dup")));
    }
}
