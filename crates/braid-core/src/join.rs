//! The interval join as a pure state machine over events and watermark advances.
//!
//! An event first probes the opposite side's buckets that overlap its match interval,
//! emitting every pair it finds and marking both events matched; then it is stored in
//! its own side's bucket. When the watermark passes a bucket's last time plus the side's
//! retention, the whole bucket expires: its unmatched events are emitted (outer sides)
//! or counted (inner sides) and it is dropped. Every matching pair of non-late events is
//! found exactly once, by whichever of the two arrives second: the first is still
//! retained then, because the second was not late (see `JoinSpec::retention_ms`).
//!
//! `Join` is generic over its store, so its code is compiled in the crate that picks
//! the store (`braid`), not here. The small functions of this crate it calls for every
//! event (the hot segments' lookups and inserts, the index, the filters, `Side`) are
//! `#[inline]` for that reason: without it they stay calls across the crate boundary,
//! which cost the in-memory flink-peer run 5 % of its CPU (alternating runs).

use std::collections::BTreeMap;

use crate::bucket::{
    decode_events, Bucket, ChunkPool, ColdSegment, HotSegment, Segment, SpillOrder,
    INDEX_ENTRY_BYTES, NO_GROUP,
};
use crate::ids::IdSet;
use crate::shape::{PayloadMode, Shapes, AUTO_SHAPE_FRACTION, VERBATIM_MARK};
use crate::spec::{JoinSpec, Side};
use crate::store::{SegmentId, StateStore, StoreError};
use crate::time::{EventTime, Watermark};

mod image;
mod probes;
mod split;

pub use image::JoinImage;
pub use probes::ColdProbeMode;
use probes::{ColdProbes, ColdRead};

/// The largest hot segment, as a fraction of the memory budget: spilling happens in
/// units of at most this size, so memory never overshoots by more. 16 while segments
/// went into RocksDB; with segment files, 8 (fewer segments, so fewer filters a probe
/// checks) ran flink-peer 4 % faster at 128 MiB and 9 % at 512 MiB (2-3 alternating
/// rounds), within the RSS limit.
const SEGMENTS_PER_BUDGET: usize = 8;
const SEGMENT_BYTES_MAX: usize = 64 << 20;
const SEGMENT_BYTES_MIN: usize = 16 << 10;
/// A hot segment is spilled only once it holds a quarter of the largest segment's
/// bytes (or of the whole budget, for tiny budgets), so that a budget exhausted by
/// remembered ids never turns into one file per event.
const SPILL_FRACTION_MIN: usize = 4;
/// Freed arena chunks kept for reuse: at most this fraction of the budget.
const CHUNK_POOL_FRACTION: usize = 16;
/// While joining an event, the hash index entries the event this many places later will
/// look up are fetched into cache: a lookup is a cache miss otherwise, one per hot
/// segment probed and one for the insert.
const PREFETCH_DISTANCE: usize = 8;

/// One decoded input event, borrowing its bytes from the reader's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub side: Side,
    /// The encoded key (see [`KeyWriter`](crate::KeyWriter)) and its hash.
    pub key: &'a [u8],
    pub key_hash: u64,
    pub time: EventTime,
    /// The hash of the event's id, when its source names an id field.
    pub id: Option<u128>,
    /// The event exactly as it arrived; written back verbatim in the output (the state
    /// keeps it by shape, `crate::shape`).
    pub payload: &'a [u8],
}

/// Receives the join's results, each with its encoded join key ([`crate::KeyWriter`]).
pub trait JoinSink {
    fn pair(&mut self, key: &[u8], left: &[u8], right: &[u8]);
    fn unmatched(&mut self, side: Side, key: &[u8], event: &[u8]);
}

/// What the join did with events, per side (indexed by [`Side::index`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinCounts {
    /// Joined pairs emitted.
    pub pairs: u64,
    /// Events that matched at least once, counted when they leave state.
    pub matched: [u64; 2],
    /// Events that matched nothing and were emitted with a null opposite side.
    pub unmatched_emitted: [u64; 2],
    /// Events that matched nothing on a side whose unmatched rows are not emitted.
    pub unmatched_expired: [u64; 2],
    pub duplicates: [u64; 2],
    /// Events in state now.
    pub retained: [u64; 2],
    /// Segments written to the cold tier, and the events in them.
    pub spilled_segments: u64,
    pub spilled_events: u64,
    /// Point reads of the cold tier, and those that found the key (the rest are filter
    /// false positives).
    pub cold_reads: u64,
    pub cold_reads_found: u64,
}

impl JoinCounts {
    pub fn add(&mut self, other: &JoinCounts) {
        self.pairs += other.pairs;
        self.spilled_segments += other.spilled_segments;
        self.spilled_events += other.spilled_events;
        self.cold_reads += other.cold_reads;
        self.cold_reads_found += other.cold_reads_found;
        for i in 0..2 {
            self.matched[i] += other.matched[i];
            self.unmatched_emitted[i] += other.unmatched_emitted[i];
            self.unmatched_expired[i] += other.unmatched_expired[i];
            self.duplicates[i] += other.duplicates[i];
            self.retained[i] += other.retained[i];
        }
    }
}

#[derive(Default)]
struct SideState {
    buckets: BTreeMap<i64, Bucket>,
    /// Ids of retained events and the bucket that holds each.
    ids: IdSet,
    /// The shapes the side's payloads are stored by: they outlive every bucket.
    shapes: Shapes,
    /// What the newest closed bucket held, for sizing new segments.
    room: SegmentRoom,
}

/// The size of the newest closed bucket of a side, which a new hot segment's index is
/// sized by: a stream's buckets hold about as many events as the one before. Without
/// it the index grew by doubling, rehashing all it held each time (3 % of an in-memory
/// flink-peer run's samples).
#[derive(Default, Clone, Copy)]
struct SegmentRoom {
    /// Events in the bucket, over all its segments.
    bucket_events: usize,
    /// Events in its largest segment: no new segment is sized beyond it.
    segment_events_max: usize,
    /// Distinct keys per 1024 events in its hot segments.
    keys_per_1024: usize,
}

/// A new segment's reserved index takes at most this fraction of `segment_bytes_max`,
/// so that a segment is never full from its reservation alone.
const ROOM_FRACTION_MAX: usize = 4;

impl SegmentRoom {
    fn of(bucket: &Bucket) -> SegmentRoom {
        let (mut events, mut largest, mut hot_events, mut hot_keys) = (0, 0, 0, 0);
        for segment in &bucket.segments {
            events += segment.len();
            largest = largest.max(segment.len());
            if let Segment::Hot(hot) = segment {
                hot_events += hot.len();
                hot_keys += hot.keys();
            }
        }
        SegmentRoom {
            bucket_events: events,
            segment_events_max: largest,
            keys_per_1024: (hot_keys * 1024).checked_div(hot_events).unwrap_or(1024),
        }
    }

    /// The keys to make room for in a new segment of a bucket that holds `held` events
    /// already: those of the events still to come, within a segment's, and an index
    /// of at most `bytes_max` / [`ROOM_FRACTION_MAX`].
    fn keys_for_segment(&self, held: usize, bytes_max: usize) -> usize {
        let events = self
            .bucket_events
            .saturating_sub(held)
            .min(self.segment_events_max);
        // two entries a key at the index's load
        let keys_max = bytes_max / ROOM_FRACTION_MAX / (2 * INDEX_ENTRY_BYTES);
        (events * self.keys_per_1024 / 1024).min(keys_max)
    }
}

/// The two-way interval join of one shard.
pub struct Join<S> {
    spec: JoinSpec,
    bucket_width_ms: i64,
    store: S,
    sides: [SideState; 2],
    watermark: Watermark,
    memory_max_bytes: usize,
    segment_bytes_max: usize,
    spill_bytes_min: usize,
    /// When nothing could be spilled, the memory at which to look again.
    spill_retry_bytes: usize,
    /// Arena chunks of spilled and expired segments, for reuse.
    chunks: ChunkPool,
    /// Sum of `memory_bytes` over every segment, hot and cold.
    segments_bytes: usize,
    /// Sum of the buckets' group filters and the hashes collected for them.
    filters_bytes: usize,
    counts: JoinCounts,
    /// Cold reads not yet served, and the bytes they may take before they are served
    /// (0: at the end of every batch).
    probes: ColdProbes,
    probes_bytes_max: usize,
    /// Reused buffers: matched ordinals of one hot probe, which of a bucket's group
    /// filters allow a probe's key, the value of one key being spilled.
    hits: Vec<usize>,
    group_hits: Vec<bool>,
    spill: Vec<u8>,
    /// Reused by a spill: the key hashes of the segment, for its filter and its
    /// bucket's whole and group filters (gathered once: each is a walk of the index).
    spill_hashes: Vec<u64>,
    /// Reused by a spill: the segment's events in key order (see `HotSegment::freeze`).
    spill_order: Vec<SpillOrder>,
    /// Reused buffers: the stored form of the event being inserted, and a stored
    /// payload decoded for the sink.
    stored: Vec<u8>,
    shaped: Vec<u8>,
    /// How payloads are stored: by shape (`crate::shape`) or as they came.
    payloads: PayloadMode,
}

/// The last event time bucket `bucket_id` of width `width_ms` holds.
fn bucket_last_time(bucket_id: i64, width_ms: i64) -> i128 {
    (i128::from(bucket_id) + 1) * i128::from(width_ms) - 1
}

/// Marks an event matched wherever its segment is now.
fn mark(sides: &mut [SideState; 2], at: SegmentId, ordinal: usize) {
    let segment = sides[at.side.index()]
        .buckets
        .get_mut(&at.bucket)
        .and_then(|b| b.segment_mut(at.segment))
        .expect("a segment read or written in this batch is still retained");
    segment.marks_mut().set(ordinal);
}

impl<S: StateStore> Join<S> {
    pub fn new(spec: JoinSpec, store: S, memory_max_bytes: usize) -> Join<S> {
        let segment_bytes_max =
            (memory_max_bytes / SEGMENTS_PER_BUDGET).clamp(SEGMENT_BYTES_MIN, SEGMENT_BYTES_MAX);
        Join {
            bucket_width_ms: spec.bucket_width_ms(),
            spec,
            store,
            sides: Default::default(),
            watermark: Watermark::MIN,
            memory_max_bytes,
            segment_bytes_max,
            spill_bytes_min: segment_bytes_max.min(memory_max_bytes) / SPILL_FRACTION_MIN,
            spill_retry_bytes: 0,
            segments_bytes: 0,
            filters_bytes: 0,
            counts: JoinCounts::default(),
            chunks: ChunkPool::new(memory_max_bytes / CHUNK_POOL_FRACTION),
            probes: ColdProbes::default(),
            probes_bytes_max: probes::deferred_bytes_max(
                ColdProbeMode::default(),
                memory_max_bytes,
            ),
            hits: Vec::new(),
            group_hits: Vec::new(),
            spill: Vec::new(),
            spill_hashes: Vec::new(),
            spill_order: Vec::new(),
            stored: Vec::new(),
            shaped: Vec::new(),
            payloads: PayloadMode::default(),
        }
    }

    pub fn counts(&self) -> JoinCounts {
        self.counts
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Memory the state holds: segments, filters, marks, remembered ids, waiting cold
    /// probes and the store's indexes of spilled segments.
    pub fn memory_bytes(&self) -> usize {
        self.segments_bytes
            + self.filters_bytes
            + self.store.memory_bytes()
            + self.probes.memory_bytes()
            + self.chunks.memory_bytes()
            + self
                .sides
                .iter()
                .map(|s| s.ids.memory_bytes() + s.shapes.memory_bytes())
                .sum::<usize>()
    }

    /// Joins one event. The caller has already routed late events elsewhere.
    pub fn on_event(
        &mut self,
        event: &Event<'_>,
        sink: &mut impl JoinSink,
    ) -> Result<(), StoreError> {
        self.on_batch(std::slice::from_ref(event), sink)
    }

    /// Joins a batch of events, in order. Probes of cold segments are gathered and read
    /// together: at the end of the batch ([`ColdProbeMode::Eager`]) or later
    /// ([`ColdProbeMode::Deferred`]); their pairs are emitted and their matched marks
    /// set then. The caller has already routed late events elsewhere.
    pub fn on_batch(
        &mut self,
        events: &[Event<'_>],
        sink: &mut impl JoinSink,
    ) -> Result<(), StoreError> {
        for event in events.iter().take(PREFETCH_DISTANCE) {
            self.prefetch(event);
        }
        for (i, event) in events.iter().enumerate() {
            if let Some(ahead) = events.get(i + PREFETCH_DISTANCE) {
                self.prefetch(ahead);
            }
            debug_assert!(
                !self
                    .watermark
                    .is_late(event.time, self.spec.allowed_lateness_ms),
                "late events never reach the join"
            );
            let own = event.side.index();
            let bucket_id = event.time.0.div_euclid(self.bucket_width_ms);
            if let Some(id) = event.id {
                if !self.sides[own].ids.insert(id, bucket_id) {
                    self.counts.duplicates[own] += 1;
                    continue;
                }
            }
            let reads_before = self.probes.reads.len();
            let matched = self.probe(event, sink);
            let at = self.insert(event, bucket_id, matched);
            if self.probes.reads.len() > reads_before {
                self.probes
                    .add_event(event.side, event.key, event.payload, at);
            }
            self.enforce_memory_max()?;
        }
        if !self.probes.is_empty() && self.probes.pending_bytes() >= self.probes_bytes_max {
            self.flush_cold_probes(sink)?;
        }
        Ok(())
    }

    /// When cold probes are read (see [`ColdProbeMode`]). Reads waiting now are kept.
    pub fn set_cold_probe_mode(&mut self, mode: ColdProbeMode) {
        self.probes_bytes_max = probes::deferred_bytes_max(mode, self.memory_max_bytes);
    }

    /// Defers cold probes until they take `bytes` (0: reads them at the end of every
    /// batch), instead of the share of the budget [`ColdProbeMode::Deferred`] gives
    /// them. For tests, which need long deferrals of small states.
    pub fn set_deferred_probe_bytes_max(&mut self, bytes: usize) {
        self.probes_bytes_max = bytes;
    }

    /// How events from now on keep their payloads (`[state] payloads`).
    pub fn set_payload_mode(&mut self, mode: PayloadMode) {
        self.payloads = mode;
    }

    /// Whether the next event's payload is kept by shape.
    fn shapes_payload(&self) -> bool {
        match self.payloads {
            PayloadMode::Shaped => true,
            PayloadMode::Verbatim => false,
            PayloadMode::Auto => {
                let (part, whole) = AUTO_SHAPE_FRACTION;
                self.memory_bytes() * whole > self.memory_max_bytes * part
            }
        }
    }

    /// Reads every waiting cold probe and emits what they match. Call it before a
    /// [`snapshot`](Self::snapshot) (a checkpoint barrier) and at the end of the input:
    /// the join itself does so before a bucket expires and when the probes fill their
    /// share of the budget.
    pub fn flush_cold_probes(&mut self, sink: &mut impl JoinSink) -> Result<(), StoreError> {
        if self.probes.is_empty() {
            return Ok(());
        }
        let Join {
            store,
            sides,
            counts,
            probes,
            shaped,
            ..
        } = self;
        for (token, read) in probes.reads.iter().enumerate() {
            let key = probes.key(&probes.events[read.event]);
            store.start_read(token, read.segment, key)?;
        }
        counts.cold_reads += probes.reads.len() as u64;
        let mut found = 0;
        store.finish_reads(&mut |token, value| {
            found += 1;
            let read = &probes.reads[token];
            let event = &probes.events[read.event];
            let (key, own) = (probes.key(event), probes.payload(event));
            let mut matched = false;
            decode_events(value, |ordinal, time, payload| {
                if time >= read.lo && time <= read.hi {
                    let payload = sides[read.segment.side.index()]
                        .shapes
                        .decode(payload, shaped);
                    counts.pairs += 1;
                    match event.side {
                        Side::Left => sink.pair(key, own, payload),
                        Side::Right => sink.pair(key, payload, own),
                    }
                    mark(sides, read.segment, ordinal);
                    matched = true;
                }
            });
            if matched {
                mark(sides, event.at.0, event.at.1);
            }
        })?;
        counts.cold_reads_found += found;
        probes.clear();
        Ok(())
    }

    /// Moves the watermark forward and expires every bucket it has passed.
    pub fn advance(
        &mut self,
        watermark: Watermark,
        sink: &mut impl JoinSink,
    ) -> Result<(), StoreError> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        // Waiting probes name their segments and their probing events: read them
        // before either can expire.
        let expires = Side::BOTH.into_iter().any(|side| {
            self.sides[side.index()]
                .buckets
                .first_key_value()
                .is_some_and(|(&bucket_id, _)| self.expired_test(side)(bucket_id))
        });
        if expires {
            self.flush_cold_probes(sink)?;
        }
        for side in Side::BOTH {
            let expired = self.expired_test(side);
            let mut expired_up_to = None;
            while let Some((&bucket_id, _)) = self.sides[side.index()].buckets.first_key_value() {
                if !expired(bucket_id) {
                    break;
                }
                let bucket = self.sides[side.index()]
                    .buckets
                    .remove(&bucket_id)
                    .expect("the first bucket exists");
                self.expire(side, bucket_id, bucket, sink)?;
                expired_up_to = Some(bucket_id);
            }
            if let Some(last) = expired_up_to {
                self.sides[side.index()].ids.forget_up_to(last);
            }
            let closed = self.closed_test();
            let mut grown = 0;
            let mut newest_closed = None;
            let state = &mut self.sides[side.index()];
            for (&bucket_id, bucket) in state.buckets.iter_mut() {
                if !closed(bucket_id) {
                    break;
                }
                grown += bucket.group(true);
                newest_closed = Some(bucket_id);
            }
            if let Some(bucket_id) = newest_closed {
                state.room = SegmentRoom::of(&state.buckets[&bucket_id]);
            }
            self.filters_bytes = self.filters_bytes.wrapping_add_signed(grown);
        }
        Ok(())
    }

    /// Tells whether a bucket of `side` has expired at the current watermark: no event
    /// can reach it or match its events any more.
    fn expired_test(&self, side: Side) -> impl Fn(i64) -> bool {
        let (watermark, width) = (self.watermark, self.bucket_width_ms);
        let keep_ms =
            i128::from(self.spec.retention_ms(side)) + i128::from(self.spec.allowed_lateness_ms);
        move |bucket_id| watermark.passed_wide(bucket_last_time(bucket_id, width) + keep_ms)
    }

    /// Tells whether no event can reach a bucket any more (its last time is late) at
    /// the current watermark. Owns what it needs, so that buckets can be changed while
    /// it is used.
    fn closed_test(&self) -> impl Fn(i64) -> bool {
        let (watermark, width) = (self.watermark, self.bucket_width_ms);
        let lateness = i128::from(self.spec.allowed_lateness_ms);
        move |bucket_id| watermark.passed_wide(bucket_last_time(bucket_id, width) + lateness)
    }

    /// Fetches into cache what joining `event` looks up first: the entry of its id, the
    /// index entries of the hot segments it probes and of the segment it goes into, the
    /// blocks of the group filters and ungrouped cold segments' filters it checks. Only a
    /// hint: it changes nothing.
    fn prefetch(&self, event: &Event<'_>) {
        let (lo, hi) = self.spec.probe_range(event.side, event.time.0);
        let width = self.bucket_width_ms;
        let range = lo.div_euclid(width)..=hi.div_euclid(width);
        for bucket in self.sides[event.side.opposite().index()]
            .buckets
            .range(range)
            .map(|(_, b)| b)
        {
            bucket.groups.prefetch(event.key_hash);
            for segment in &bucket.segments {
                match segment {
                    Segment::Hot(hot) => hot.prefetch(event.key_hash, lo, hi),
                    Segment::Cold(cold) => {
                        if cold.group == NO_GROUP
                            && !cold.in_whole
                            && hi >= cold.time_min
                            && lo <= cold.time_max
                        {
                            cold.bloom.prefetch(event.key_hash);
                        }
                    }
                }
            }
        }
        if let Some(id) = event.id {
            self.sides[event.side.index()].ids.prefetch(id);
        }
        let own = &self.sides[event.side.index()].buckets;
        if let Some(Segment::Hot(hot)) = own
            .get(&event.time.0.div_euclid(width))
            .and_then(|b| b.segments.last())
        {
            hot.prefetch(event.key_hash, i64::MIN, i64::MAX);
        }
    }

    /// Finds the event's matches among the opposite side's hot segments, emitting them,
    /// and queues reads of the cold segments whose filter allows its key (for the
    /// probing event [`ColdProbes`] records next). Returns whether a hot segment
    /// matched.
    fn probe(&mut self, event: &Event<'_>, sink: &mut impl JoinSink) -> bool {
        let (lo, hi) = self.spec.probe_range(event.side, event.time.0);
        let other = event.side.opposite();
        let width = self.bucket_width_ms;
        let Join {
            sides,
            counts,
            hits,
            probes,
            group_hits,
            shaped,
            ..
        } = self;
        let SideState {
            buckets, shapes, ..
        } = &mut sides[other.index()];
        let event_index = probes.events.len();
        let mut matched = false;
        let range = lo.div_euclid(width)..=hi.div_euclid(width);
        for (&bucket, state) in buckets.range_mut(range) {
            // Only a bucket with groups has grouped segments, which read `group_hits`;
            // those are in the whole filter, which rules them out when it excludes.
            let excluded = state.groups.excludes(event.key_hash);
            if !excluded && !state.groups.is_empty() {
                group_hits.clear();
                group_hits.extend(
                    (0..state.groups.len()).map(|g| state.groups.may_contain(g, event.key_hash)),
                );
            }
            for segment in &mut state.segments {
                match segment {
                    Segment::Hot(hot) => {
                        hits.clear();
                        hot.probe(event.key_hash, event.key, lo, hi, |ordinal, payload| {
                            let payload = shapes.decode(payload, shaped);
                            counts.pairs += 1;
                            match event.side {
                                Side::Left => sink.pair(event.key, event.payload, payload),
                                Side::Right => sink.pair(event.key, payload, event.payload),
                            }
                            hits.push(ordinal);
                        });
                        for &ordinal in hits.iter() {
                            hot.marks.set(ordinal);
                        }
                        matched |= !hits.is_empty();
                    }
                    Segment::Cold(cold) => {
                        debug_assert!(!excluded || cold.in_whole || cold.group == NO_GROUP);
                        if (excluded && cold.in_whole)
                            || (cold.group != NO_GROUP && !group_hits[cold.group as usize])
                            || hi < cold.time_min
                            || lo > cold.time_max
                            || !cold.bloom.may_contain(event.key_hash)
                        {
                            continue;
                        }
                        probes.reads.push(ColdRead {
                            event: event_index,
                            segment: SegmentId {
                                side: other,
                                bucket,
                                segment: cold.number,
                            },
                            lo,
                            hi,
                        });
                    }
                }
            }
        }
        matched
    }

    /// Stores an event in its side's open hot segment; returns where it went.
    fn insert(&mut self, event: &Event<'_>, bucket_id: i64, matched: bool) -> (SegmentId, usize) {
        let own = event.side.index();
        // The stored form in two pieces, written end to end: a payload kept as it came
        // is not copied first.
        let stored: [&[u8]; 2] = if self.shapes_payload()
            && self.sides[own]
                .shapes
                .encode(event.payload, &mut self.stored)
        {
            [&self.stored, &[]]
        } else {
            [VERBATIM_MARK, event.payload]
        };
        let state = &mut self.sides[own];
        let bucket = state.buckets.entry(bucket_id).or_default();
        let open = matches!(bucket.segments.last(), Some(Segment::Hot(h)) if h.is_open() && h.filled_bytes() < self.segment_bytes_max);
        if !open {
            let number = bucket.next_segment_number;
            bucket.next_segment_number += 1;
            let held = bucket.segments.iter().map(Segment::len).sum();
            let keys = state.room.keys_for_segment(held, self.segment_bytes_max);
            let hot = HotSegment::with_room(number, keys);
            self.segments_bytes += hot.memory_bytes();
            bucket.segments.push(Segment::Hot(hot));
        }
        let Some(Segment::Hot(hot)) = bucket.segments.last_mut() else {
            unreachable!("an open hot segment was just ensured")
        };
        let before = hot.memory_bytes();
        let ordinal = hot.push(
            event.key_hash,
            event.key,
            event.time.0,
            stored,
            matched,
            &mut self.chunks,
        );
        self.segments_bytes += hot.memory_bytes() - before;
        self.counts.retained[own] += 1;
        let at = SegmentId {
            side: event.side,
            bucket: bucket_id,
            segment: hot.number,
        };
        (at, ordinal)
    }

    /// Spills the oldest hot segments until the state fits in its memory budget.
    fn enforce_memory_max(&mut self) -> Result<(), StoreError> {
        while self.memory_bytes() > self.memory_max_bytes
            && self.memory_bytes() >= self.spill_retry_bytes
        {
            if !self.spill_oldest()? {
                self.spill_retry_bytes = self.memory_bytes() + self.spill_bytes_min.max(1);
                break;
            }
            self.spill_retry_bytes = 0;
        }
        Ok(())
    }

    /// Writes the oldest hot segment (either side) of at least `spill_bytes_min` to the
    /// cold tier. Returns false when there is none.
    fn spill_oldest(&mut self) -> Result<bool, StoreError> {
        let oldest = Side::BOTH
            .into_iter()
            .filter_map(|side| {
                self.sides[side.index()]
                    .buckets
                    .iter()
                    .find_map(|(&id, bucket)| {
                        let min = self.spill_bytes_min;
                        let at = bucket.segments.iter().position(
                            |s| matches!(s, Segment::Hot(h) if h.content_bytes() >= min),
                        )?;
                        Some((id, side, at))
                    })
            })
            .min_by_key(|&(id, _, _)| id);
        let Some((bucket_id, side, at)) = oldest else {
            return Ok(false);
        };
        // The bucket's whole filter, if this is its first spill, is planned for the
        // events of the bucket before it or its own so far, whichever is more.
        let buckets = &self.sides[side.index()].buckets;
        let events = |b: &Bucket| b.segments.iter().map(Segment::len).sum::<usize>();
        let keys_expected = buckets
            .range(..bucket_id)
            .next_back()
            .map(|(_, before)| events(before).max(events(&buckets[&bucket_id])));
        let bucket = self.sides[side.index()]
            .buckets
            .get_mut(&bucket_id)
            .expect("the bucket was just found");
        let Segment::Hot(hot) = &mut bucket.segments[at] else {
            unreachable!("position found a hot segment")
        };
        let number = hot.number;
        let filters_before = bucket.groups.memory_bytes();
        self.spill_hashes.clear();
        self.spill_hashes.extend(hot.key_hashes());
        let in_whole = bucket.groups.add_spilled(
            number,
            keys_expected,
            self.spill_hashes.len(),
            self.spill_hashes.iter().copied(),
        );
        self.filters_bytes = self.filters_bytes + bucket.groups.memory_bytes() - filters_before;
        let (mut entries, bloom) =
            hot.freeze(&self.spill_hashes, &mut self.spill_order, &mut self.spill);
        let id = SegmentId {
            side,
            bucket: bucket_id,
            segment: number,
        };
        self.store.write_segment(id, &mut entries)?;
        let cold = ColdSegment {
            number,
            len: hot.len(),
            bloom: std::sync::Arc::new(bloom),
            marks: std::mem::take(&mut hot.marks),
            time_min: hot.time_min,
            time_max: hot.time_max,
            group: NO_GROUP,
            in_whole,
        };
        self.counts.spilled_segments += 1;
        self.counts.spilled_events += cold.len as u64;
        let mut old = std::mem::replace(&mut bucket.segments[at], Segment::Cold(cold));
        self.segments_bytes =
            self.segments_bytes - old.memory_bytes() + bucket.segments[at].memory_bytes();
        if let Segment::Hot(hot) = &mut old {
            hot.release_chunks(&mut self.chunks);
        }
        let closed = self.closed_test()(bucket_id);
        let bucket = self.sides[side.index()]
            .buckets
            .get_mut(&bucket_id)
            .expect("the bucket was just spilled");
        self.filters_bytes = self.filters_bytes.wrapping_add_signed(bucket.group(closed));
        Ok(true)
    }

    /// Emits or counts the unmatched events of an expired bucket and drops it.
    fn expire(
        &mut self,
        side: Side,
        bucket_id: i64,
        mut bucket: Bucket,
        sink: &mut impl JoinSink,
    ) -> Result<(), StoreError> {
        let emits = self.spec.emits_unmatched(side);
        self.filters_bytes -= bucket.groups.memory_bytes();
        let mut has_cold = false;
        for segment in &mut bucket.segments {
            self.segments_bytes -= segment.memory_bytes();
            let (len, matched) = match segment {
                Segment::Hot(hot) => {
                    if emits {
                        let (shapes, shaped) = (&self.sides[side.index()].shapes, &mut self.shaped);
                        hot.for_each(|matched, key, _time, payload| {
                            if !matched {
                                sink.unmatched(side, key, shapes.decode(payload, shaped));
                            }
                        });
                    }
                    let counts = (hot.len() as u64, hot.marks.count());
                    hot.release_chunks(&mut self.chunks);
                    counts
                }
                Segment::Cold(cold) => {
                    has_cold = true;
                    let matched = cold.marks.count();
                    if emits && matched < cold.len as u64 {
                        let id = SegmentId {
                            side,
                            bucket: bucket_id,
                            segment: cold.number,
                        };
                        let (shapes, shaped) = (&self.sides[side.index()].shapes, &mut self.shaped);
                        self.store.scan_segment(id, &mut |key, value| {
                            decode_events(value, |ordinal, _time, payload| {
                                if !cold.marks.get(ordinal) {
                                    sink.unmatched(side, key, shapes.decode(payload, shaped));
                                }
                            });
                        })?;
                    }
                    (cold.len as u64, matched)
                }
            };
            let i = side.index();
            self.counts.retained[i] -= len;
            self.counts.matched[i] += matched;
            if emits {
                self.counts.unmatched_emitted[i] += len - matched;
            } else {
                self.counts.unmatched_expired[i] += len - matched;
            }
        }
        if has_cold {
            self.store.drop_bucket(side, bucket_id)?;
        }
        self.spill_retry_bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::GROUP_SEGMENTS;
    use crate::key::hash_key;
    use crate::testkit::RowSink;
    use crate::{JoinKind, MemStore};

    const SPEC: JoinSpec = JoinSpec {
        kind: JoinKind::Inner,
        lower_ms: 0,
        upper_ms: 100_000,
        allowed_lateness_ms: 0,
    };

    fn push(join: &mut Join<MemStore>, sink: &mut RowSink, side: Side, key: u64, time: i64) {
        let key = key.to_be_bytes();
        let payload = [b'p'; 200];
        let event = Event {
            side,
            key: &key,
            key_hash: hash_key(&key),
            time: EventTime(time),
            id: None,
            payload: &payload,
        };
        join.on_event(&event, sink)
            .expect("a memory store does not fail");
    }

    /// Pushes `n` events of distinct keys on `side`: key `first_key + i` at time
    /// `first_time + i`.
    fn push_run(
        join: &mut Join<MemStore>,
        sink: &mut RowSink,
        side: Side,
        (first_key, first_time): (u64, i64),
        n: u64,
    ) {
        for i in 0..n {
            push(join, sink, side, first_key + i, first_time + i as i64);
        }
    }

    /// A deferred probe of a cold segment waits: no read, no pair, until the join is
    /// flushed or a bucket it names is about to expire; then its pair is emitted and
    /// both events are counted matched, the probing one though its own bucket expires
    /// in the same advance.
    #[test]
    fn deferred_probes_wait_for_a_flush_or_an_expiry() {
        let mut join = Join::new(SPEC, MemStore::default(), 64 << 10);
        join.set_deferred_probe_bytes_max(usize::MAX);
        let mut sink = RowSink::default();
        push_run(&mut join, &mut sink, Side::Left, (0, 0), 2_000);
        assert!(join.counts().spilled_events > 0);
        // Key 5 was spilled early; key 6 too.
        push(&mut join, &mut sink, Side::Right, 5, 20_000);
        assert_eq!((join.counts().pairs, join.counts().cold_reads), (0, 0));
        assert!(join.memory_bytes() > join.segments_bytes + join.filters_bytes);
        join.flush_cold_probes(&mut sink)
            .expect("a memory store does not fail");
        assert_eq!((join.counts().pairs, join.counts().cold_reads), (1, 1));
        push(&mut join, &mut sink, Side::Right, 6, 20_000);
        assert_eq!(join.counts().pairs, 1);
        // The right event's bucket (retention 0) expires at this watermark; the left
        // bucket does not yet.
        join.advance(Watermark::from_raw(40_000), &mut sink)
            .expect("a memory store does not fail");
        let c = join.counts();
        assert_eq!((c.pairs, c.matched[1], c.unmatched_expired[1]), (2, 2, 0));
        assert_eq!(sink.0.len(), 2);
    }

    /// JSON payloads kept by shape take less memory than kept as they came, and come
    /// out as the same bytes, through hot probes, cold reads and expiry.
    #[test]
    fn payloads_kept_by_shape_take_less_memory_and_come_out_the_same() {
        let spec = JoinSpec {
            kind: JoinKind::Full,
            ..SPEC
        };
        let run = |mode: PayloadMode, memory_max: usize| {
            let mut join = Join::new(spec, MemStore::default(), memory_max);
            join.set_payload_mode(mode);
            let mut sink = RowSink::default();
            let mut peak = 0;
            for i in 0..3_000u64 {
                let side = if i % 3 == 0 { Side::Right } else { Side::Left };
                let key = (i % 500).to_be_bytes();
                let payload = format!(
                    r#"{{"event_id":"e-{i}","profile_id":{},"ts":{},"device":"tv"}}"#,
                    i % 500,
                    i * 10
                );
                let event = Event {
                    side,
                    key: &key,
                    key_hash: hash_key(&key),
                    time: EventTime(i as i64 * 10),
                    id: None,
                    payload: payload.as_bytes(),
                };
                join.on_event(&event, &mut sink)
                    .expect("a memory store does not fail");
                peak = peak.max(join.memory_bytes());
            }
            join.advance(Watermark::MAX, &mut sink)
                .expect("a memory store does not fail");
            let shapes = join
                .sides
                .iter()
                .map(|s| s.shapes.memory_bytes())
                .sum::<usize>();
            let mut rows = sink.0;
            rows.sort();
            (peak, join.counts().spilled_events, rows, shapes > 0)
        };
        let (shaped, _, shaped_rows, _) = run(PayloadMode::Shaped, 1 << 30);
        let (verbatim, _, verbatim_rows, _) = run(PayloadMode::Verbatim, 1 << 30);
        assert!(
            shaped * 10 < verbatim * 8,
            "shaped {shaped} bytes, verbatim {verbatim}"
        );
        assert!(!shaped_rows.is_empty());
        assert_eq!(shaped_rows, verbatim_rows);
        // Spilled: the same rows again, through cold reads and cold expiry.
        let (_, spilled, spilled_rows, _) = run(PayloadMode::Shaped, 32 << 10);
        assert!(spilled > 1_000, "{spilled} events spilled");
        assert_eq!(spilled_rows, verbatim_rows);
        // Auto: as they came while the state is under half its budget, by shape past it.
        let (roomy, _, roomy_rows, roomy_shapes) = run(PayloadMode::Auto, 1 << 30);
        assert_eq!((roomy, roomy_shapes), (verbatim, false));
        assert_eq!(roomy_rows, verbatim_rows);
        let (tight, _, tight_rows, tight_shapes) = run(PayloadMode::Auto, verbatim);
        assert!(tight_shapes && tight < verbatim, "{tight} bytes");
        assert_eq!(tight_rows, verbatim_rows);
    }

    /// A closed bucket whose few cold segments its whole filter covers gets no group
    /// filter (it would answer what the whole filter answers): its pending hashes are
    /// dropped, the memory counted is the filters that remain, and probes still find
    /// their one match with one read and turn absent keys away.
    #[test]
    fn a_whole_filter_stands_for_the_only_group_of_a_closed_bucket() {
        let mut join = Join::new(SPEC, MemStore::default(), 64 << 10);
        join.set_cold_probe_mode(ColdProbeMode::Eager);
        let mut sink = RowSink::default();
        // Bucket 0 (no bucket before it to size a whole filter from), then a few
        // segments' worth in bucket 1 (sized from bucket 0), then bucket 2, so that
        // bucket 1 spills whole.
        push_run(&mut join, &mut sink, Side::Left, (0, 0), 2_000);
        push_run(&mut join, &mut sink, Side::Left, (100_000, 12_500), 300);
        push_run(&mut join, &mut sink, Side::Left, (200_000, 25_000), 600);
        // Bucket 1 closes (the watermark passes its end), bucket 0 stays.
        join.advance(Watermark::at(EventTime(26_000)), &mut sink)
            .expect("a memory store does not fail");
        let bucket = &join.sides[0].buckets[&1];
        let cold: Vec<&ColdSegment> = bucket
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Cold(c) => Some(c),
                Segment::Hot(_) => None,
            })
            .collect();
        assert_eq!(cold.len(), bucket.segments.len(), "bucket 1 spilled whole");
        assert!(
            (2..GROUP_SEGMENTS).contains(&cold.len()),
            "{} segments",
            cold.len()
        );
        assert!(bucket.groups.whole_covers());
        assert!(cold.iter().all(|c| c.in_whole && c.group == NO_GROUP));
        assert!(bucket.groups.is_empty(), "no group beside the whole filter");
        assert!(
            !join.sides[0].buckets[&0].groups.is_empty(),
            "bucket 0 has no whole filter, so it has groups"
        );
        let filters: usize = join.sides[0]
            .buckets
            .values()
            .map(|b| b.groups.memory_bytes())
            .sum();
        assert_eq!(join.filters_bytes, filters);
        // A key of bucket 1: one read, one pair; keys never seen: nearly no reads.
        let before = join.counts().cold_reads;
        push(&mut join, &mut sink, Side::Right, 100_007, 30_000);
        assert_eq!(join.counts().pairs, 1);
        assert_eq!(join.counts().cold_reads - before, 1);
        let before = join.counts().cold_reads;
        for key in 500_000..501_000u64 {
            push(&mut join, &mut sink, Side::Right, key, 30_000);
        }
        assert!(join.counts().cold_reads - before < 20);
    }

    /// A new hot segment's index is sized by the newest closed bucket of its side, and
    /// the room is counted in the join's memory from the start.
    #[test]
    fn a_new_segment_has_room_for_the_keys_of_the_closed_bucket_before() {
        let mut join = Join::new(SPEC, MemStore::default(), 64 << 20);
        let mut sink = RowSink::default();
        let keys = 3_000u64;
        for key in 0..keys {
            push(&mut join, &mut sink, Side::Left, key, (key % 12_000) as i64);
        }
        // Bucket 0 (0..12,500) closes; the first event of bucket 1 opens its segment.
        join.advance(Watermark::at(EventTime(13_000)), &mut sink)
            .expect("a memory store does not fail");
        push(&mut join, &mut sink, Side::Left, 1 << 40, 13_500);
        let Some(Segment::Hot(hot)) = join.sides[0].buckets[&1].segments.last() else {
            panic!("bucket 1 has a hot segment")
        };
        assert_eq!(hot.len(), 1);
        // an index for `keys` keys at half load, beside one 4 KiB arena chunk
        assert!(
            hot.memory_bytes() >= 2 * keys as usize * INDEX_ENTRY_BYTES,
            "{} bytes",
            hot.memory_bytes()
        );
        let segments: usize = join
            .sides
            .iter()
            .flat_map(|s| s.buckets.values())
            .flat_map(|b| &b.segments)
            .map(Segment::memory_bytes)
            .sum();
        assert_eq!(join.segments_bytes, segments);
    }

    /// One bucket spilled in many small segments: its cold segments are grouped under
    /// group filters, a probe finds its one match through them and reads only the
    /// segment that holds it, and the groups' memory is counted and given back.
    #[test]
    fn spilled_segments_are_grouped_and_probes_read_only_the_segment_that_matches() {
        let mut join = Join::new(SPEC, MemStore::default(), 64 << 10);
        join.set_cold_probe_mode(ColdProbeMode::Eager);
        let mut sink = RowSink::default();
        // 2,000 left events in bucket 0 (width 12.5 s): far more than the 64 KiB budget.
        push_run(&mut join, &mut sink, Side::Left, (0, 0), 2_000);
        let bucket = &join.sides[0].buckets[&0];
        let cold = bucket
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Cold(_)))
            .count();
        assert!(cold >= 2 * GROUP_SEGMENTS, "{cold} cold segments");
        let groups = bucket.groups.len();
        assert_eq!(groups, cold / GROUP_SEGMENTS, "{cold} cold segments");
        assert!(join.filters_bytes > 0 && join.filters_bytes == bucket.groups.memory_bytes());
        // A right event for a key spilled early: one read, one pair.
        let before = join.counts().cold_reads;
        push(&mut join, &mut sink, Side::Right, 5, 20_000);
        assert_eq!(join.counts().pairs, 1);
        assert_eq!(join.counts().cold_reads - before, 1);
        // Keys never seen: the group filters turn nearly all of them away.
        let before = join.counts().cold_reads;
        for key in 10_000..11_000u64 {
            push(&mut join, &mut sink, Side::Right, key, 20_000);
        }
        assert!(join.counts().cold_reads - before < 20);
        // Expiry gives the groups' memory back.
        join.advance(Watermark::from_raw(1 << 40), &mut sink)
            .expect("a memory store does not fail");
        assert_eq!(join.filters_bytes, 0);
        assert_eq!(join.counts().pairs, 1);
    }
}
