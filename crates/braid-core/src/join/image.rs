//! The join's state as a checkpoint image: [`Join::snapshot`] at a barrier,
//! [`JoinImage::write`] on the checkpoint thread, [`Join::load_from`] at a restore,
//! streaming, within the memory budget. The encoding is `crate::snapshot`'s.

use std::io::Read;

use super::{Join, JoinCounts};
use crate::bucket::{Bucket, BucketImage, Segment};
use crate::ids::IdSet;
use crate::shape::Shapes;
use crate::snapshot::{Reader, SnapshotError, Writer};
use crate::spec::Side;
use crate::store::StateStore;
use crate::time::Watermark;

/// The least bytes a bucket takes in an image: its id, next segment number and count.
const BUCKET_IMAGE_BYTES_MIN: u64 = 8 + 4 + 8;

/// A join's state at a checkpoint barrier, sharing its hot segments with the join;
/// written with [`write`](Self::write) and read back with [`Join::load`].
pub struct JoinImage {
    watermark: Watermark,
    counts: JoinCounts,
    sides: Vec<SideImage>,
}

/// One side of a [`JoinImage`].
struct SideImage {
    buckets: Vec<(i64, BucketImage)>,
    ids: IdSet,
    shapes: Shapes,
}

impl JoinImage {
    pub fn write(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut w = Writer::new(out);
        w.magic();
        w.i128(self.watermark.raw());
        let c = &self.counts;
        for v in [
            c.pairs,
            c.spilled_segments,
            c.spilled_events,
            c.cold_reads,
            c.cold_reads_found,
        ] {
            w.u64(v);
        }
        for i in 0..2 {
            for v in [
                c.matched[i],
                c.unmatched_emitted[i],
                c.unmatched_expired[i],
                c.duplicates[i],
                c.retained[i],
            ] {
                w.u64(v);
            }
        }
        for SideImage {
            buckets,
            ids,
            shapes,
        } in &self.sides
        {
            // Shapes first: a segment's payloads need them.
            shapes.write(&mut w);
            w.len(buckets.len());
            for (id, bucket) in buckets {
                w.i64(*id);
                bucket.write(&mut w);
            }
            ids.write(&mut w);
        }
        w.finish()
    }
}

/// Reads the counts as [`JoinImage::write`] wrote them.
fn read_counts(r: &mut Reader<'_>) -> Result<JoinCounts, SnapshotError> {
    let mut c = JoinCounts {
        pairs: r.u64()?,
        spilled_segments: r.u64()?,
        spilled_events: r.u64()?,
        cold_reads: r.u64()?,
        cold_reads_found: r.u64()?,
        ..JoinCounts::default()
    };
    for i in 0..2 {
        c.matched[i] = r.u64()?;
        c.unmatched_emitted[i] = r.u64()?;
        c.unmatched_expired[i] = r.u64()?;
        c.duplicates[i] = r.u64()?;
        c.retained[i] = r.u64()?;
    }
    Ok(c)
}

impl<S: StateStore> Join<S> {
    /// The join's in-memory state at this moment, as a checkpoint keeps it (see
    /// [`crate::snapshot`]): everything but the cold segments' contents, which are the
    /// store's. It costs the shard little: hot segments are sealed and shared with the
    /// image (new events go to new segments), marks are copied, the id sets are shared
    /// copy-on-write. The image is written later, on another thread, with
    /// [`JoinImage::write`].
    ///
    /// Cold probes still waiting are not part of an image: flush them first
    /// ([`flush_cold_probes`](Self::flush_cold_probes)), so that their pairs belong to
    /// the epoch before the image.
    pub fn snapshot(&mut self) -> JoinImage {
        assert!(
            self.probes.is_empty(),
            "cold probes are flushed before a snapshot, or their pairs would be lost"
        );
        let mut sides = Vec::with_capacity(2);
        for side in &mut self.sides {
            let buckets = side
                .buckets
                .iter_mut()
                .map(|(&id, bucket)| (id, bucket.image()))
                .collect();
            sides.push(SideImage {
                buckets,
                ids: side.ids.clone(),
                shapes: side.shapes.clone(),
            });
        }
        JoinImage {
            watermark: self.watermark,
            counts: self.counts,
            sides,
        }
    }

    /// Replaces the join's in-memory state with a [`snapshot`](Self::snapshot) held in
    /// memory; see [`load_from`](Self::load_from).
    pub fn load(&mut self, image: &[u8]) -> Result<(), SnapshotError> {
        let mut input = image;
        self.load_from(&mut input, image.len() as u64)
    }

    /// Replaces the join's in-memory state with a [`snapshot`](Self::snapshot) of
    /// `image_bytes` bytes read from `image` (a file, when restoring). The store must
    /// hold the snapshot's cold segments.
    ///
    /// The image is decoded as it streams in, straight into arena chunks, slots and
    /// indexes: a load holds the state it rebuilds and a read buffer of
    /// `READ_BUFFER_BYTES`, never the image itself. The memory budget holds during a
    /// load as it does while events arrive (past it, the oldest hot segments are
    /// spilled, checked after every segment), so shards loading in parallel stay
    /// within their shares of the budget, even one lowered since the checkpoint. On an
    /// error the join is left empty (segments it spilled stay in the store).
    pub fn load_from(
        &mut self,
        image: &mut dyn Read,
        image_bytes: u64,
    ) -> Result<(), SnapshotError> {
        self.clear();
        let loaded = self.read_image(&mut Reader::new(image, image_bytes));
        if loaded.is_err() {
            self.clear();
        }
        loaded
    }

    /// Drops the in-memory state (not the store's), keeping hot segments' arena chunks
    /// in the pool for the next ones.
    fn clear(&mut self) {
        for side in &mut self.sides {
            for bucket in side.buckets.values_mut() {
                for segment in &mut bucket.segments {
                    if let Segment::Hot(hot) = segment {
                        hot.release_chunks(&mut self.chunks);
                    }
                }
            }
        }
        self.sides = Default::default();
        self.segments_bytes = 0;
        self.filters_bytes = 0;
        self.watermark = Watermark::MIN;
        self.counts = JoinCounts::default();
        self.spill_retry_bytes = 0;
        self.probes.clear();
    }

    /// Decodes an image into the empty join, in the order [`JoinImage::write`] wrote it.
    fn read_image(&mut self, r: &mut Reader<'_>) -> Result<(), SnapshotError> {
        r.magic()?;
        self.watermark = Watermark::from_raw(r.i128()?);
        self.counts = read_counts(r)?;
        for side in Side::BOTH {
            self.sides[side.index()].shapes = Shapes::read(r)?;
            for _ in 0..r.count(BUCKET_IMAGE_BYTES_MIN)? {
                let id = r.i64()?;
                let (bucket, segments) = Bucket::read_header(r)?;
                if self.sides[side.index()]
                    .buckets
                    .insert(id, bucket)
                    .is_some()
                {
                    return Err(SnapshotError(format!(
                        "bucket {id} of the {side:?} side is listed twice"
                    )));
                }
                for _ in 0..segments {
                    let segment = Segment::read(r, &mut self.chunks)?;
                    self.load_segment(side, id, segment)?;
                }
            }
            self.sides[side.index()].ids = IdSet::read(r)?;
            self.keep_budget()?;
        }
        r.end()
    }

    /// Adds a loaded segment to the end of its bucket, then spills what the memory
    /// budget requires, as after an event: one segment is the most a load can overshoot.
    fn load_segment(
        &mut self,
        side: Side,
        bucket_id: i64,
        segment: Segment,
    ) -> Result<(), SnapshotError> {
        self.segments_bytes += segment.memory_bytes();
        let bucket = self.sides[side.index()]
            .buckets
            .get_mut(&bucket_id)
            .expect("the bucket was inserted before its segments");
        bucket.segments.push(segment);
        self.keep_budget()
    }

    /// Spills what the memory budget requires of the state loaded so far.
    fn keep_budget(&mut self) -> Result<(), SnapshotError> {
        self.enforce_memory_max().map_err(|e| {
            SnapshotError(format!(
                "cannot spill loaded state to keep within the memory budget: {e}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{Event, JoinSink};
    use crate::spec::JoinSpec;
    use crate::time::EventTime;
    use crate::{hash_id, JoinKind, KeyPart, KeyWriter, MemStore};

    #[derive(Default)]
    struct Rows(Vec<String>);

    impl JoinSink for Rows {
        fn pair(&mut self, key: &[u8], left: &[u8], right: &[u8]) {
            self.0.push(format!("{key:?} {left:?}|{right:?}"));
        }
        fn unmatched(&mut self, side: Side, key: &[u8], event: &[u8]) {
            self.0.push(format!("{key:?} {side:?} {event:?}"));
        }
    }

    const SPEC: JoinSpec = JoinSpec {
        kind: JoinKind::Full,
        lower_ms: 0,
        upper_ms: 10_000,
        allowed_lateness_ms: 0,
    };
    /// A budget nothing reaches.
    const UNLIMITED: usize = 1 << 40;

    /// Event `i`: both sides, a few keys, payloads of 200 bytes, ids that repeat on the
    /// same side from event 1,200 on.
    fn push(join: &mut Join<MemStore>, sink: &mut Rows, i: i64) {
        let mut key = KeyWriter::default();
        key.push(KeyPart::Int(i % 7));
        let payload = format!("{i:0>200}");
        let event = Event {
            side: if i % 3 == 0 { Side::Right } else { Side::Left },
            key: key.bytes(),
            key_hash: key.hash(),
            time: EventTime(i * 10),
            id: Some(hash_id(&(i % 400).to_le_bytes())),
            payload: payload.as_bytes(),
        };
        join.on_event(&event, sink)
            .expect("the model store never fails");
    }

    /// A join of `events` events within `memory_max`, and its image.
    fn filled(events: i64, memory_max: usize) -> (Join<MemStore>, Vec<u8>) {
        let mut join = Join::new(SPEC, MemStore::default(), memory_max);
        let mut sink = Rows::default();
        for i in 0..events {
            push(&mut join, &mut sink, i);
        }
        join.flush_cold_probes(&mut sink)
            .expect("the model store never fails");
        let mut image = Vec::new();
        join.snapshot()
            .write(&mut image)
            .expect("a Vec takes every byte");
        (join, image)
    }

    fn assert_empty(join: &Join<MemStore>) {
        assert!(join.sides.iter().all(|s| s.buckets.is_empty()));
        assert_eq!(join.memory_bytes(), join.chunks.memory_bytes());
        assert_eq!(join.counts(), JoinCounts::default());
    }

    #[test]
    fn every_truncation_is_an_error_and_leaves_the_join_empty() {
        // Hot and cold segments, marks and ids: every part of the format.
        let (join, image) = filled(100, 16 << 10);
        let hot = join.sides.iter().flat_map(|s| s.buckets.values());
        let hot = hot
            .flat_map(|b| &b.segments)
            .filter(|s| matches!(s, Segment::Hot(_)));
        assert!(join.counts().spilled_segments > 0 && hot.count() > 0);
        let mut into = Join::new(SPEC, MemStore::default(), UNLIMITED);
        for cut in 0..image.len() {
            // A short file: its stated length is its real one.
            let err = into.load(&image[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("truncated") || err.contains("exceed"),
                "cut at {cut}: {err}"
            );
            assert_empty(&into);
            // A file cut while it is read: the input ends before the stated length.
            let mut input = &image[..cut];
            let err = into
                .load_from(&mut input, image.len() as u64)
                .unwrap_err()
                .to_string();
            assert!(err.contains("truncated"), "cut at {cut}: {err}");
            assert_empty(&into);
        }
        into.load(&image).expect("the whole image loads");
        assert_eq!(into.counts(), join.counts());
    }

    #[test]
    fn corrupted_bytes_never_panic_and_lengths_never_size_memory() {
        let (_, image) = filled(100, 16 << 10);
        let mut into = Join::new(SPEC, MemStore::default(), UNLIMITED);
        let mut failed = 0;
        for at in 0..image.len() {
            for flip in [0x01, 0x80] {
                let mut bad = image.clone();
                bad[at] ^= flip;
                failed += usize::from(into.load(&bad).is_err());
            }
        }
        // Payloads, times and hashes load as they are (a checkpoint's checksum catches
        // them); what matters is that no flip panics, and none makes a count allocate
        // beyond the image (which would abort this test).
        assert!(failed > 0, "no corruption refused");
    }

    #[test]
    fn a_load_keeps_a_smaller_budget_by_spilling_and_finds_the_same_pairs() {
        let (mut whole, image) = filled(1_000, UNLIMITED);
        assert_eq!(whole.counts().spilled_segments, 0);
        let budget = 128 << 10;
        let mut small = Join::new(SPEC, MemStore::default(), budget);
        small.load(&image).expect("the image loads");
        assert!(small.counts().spilled_segments > 0, "the load spilled");
        assert!(
            small.memory_bytes() <= budget + small.segment_bytes_max,
            "{} bytes in memory for a budget of {budget}",
            small.memory_bytes()
        );
        let (mut a, mut b) = (Rows::default(), Rows::default());
        for i in 1_000..1_300 {
            push(&mut whole, &mut a, i);
            push(&mut small, &mut b, i);
        }
        whole.advance(Watermark::MAX, &mut a).unwrap();
        small.advance(Watermark::MAX, &mut b).unwrap();
        a.0.sort();
        b.0.sort();
        assert!(!a.0.is_empty());
        assert_eq!(a.0, b.0);
        let (ca, cb) = (whole.counts(), small.counts());
        assert_eq!(
            (ca.pairs, ca.matched, ca.unmatched_emitted, ca.duplicates),
            (cb.pairs, cb.matched, cb.unmatched_emitted, cb.duplicates)
        );
    }
}
