//! Proves that the RocksDB store agrees with the in-memory model under random sequences
//! of operations, and that the join on RocksDB with a tiny memory budget (so that nearly
//! every event is spilled and every bucket expires from disk) equals the naive join.

use braid_core::testkit::{build, draws, kinds, reference, run_join};
use braid_core::{Join, JoinSpec, MemStore, SegmentEntry, SegmentId, Side, StateStore};
use braid_state::{RocksOptions, RocksStore};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write {
        side: bool,
        bucket: i64,
        entries: Vec<(u8, Vec<u8>)>,
    },
    Get {
        side: bool,
        bucket: i64,
        segment: u32,
        key: u8,
    },
    Scan {
        side: bool,
        bucket: i64,
        segment: u32,
    },
    /// Several reads started, then finished together.
    Reads(Vec<(bool, i64, u32, u8)>),
    Drop {
        side: bool,
        bucket: i64,
    },
    /// The store rebuilt in a new folder from copies of its segment files, as a restore
    /// from a checkpoint does.
    Restore,
}

fn side(left: bool) -> Side {
    if left {
        Side::Left
    } else {
        Side::Right
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let bucket = -3i64..3;
    let op = prop_oneof![
        3 => (any::<bool>(), bucket.clone(), prop::collection::vec((0u8..8, prop::collection::vec(any::<u8>(), 0..20)), 0..6))
            .prop_map(|(side, bucket, entries)| Op::Write { side, bucket, entries }),
        3 => (any::<bool>(), bucket.clone(), 0u32..3, 0u8..8).prop_map(|(side, bucket, segment, key)| Op::Get { side, bucket, segment, key }),
        1 => (any::<bool>(), bucket.clone(), 0u32..3).prop_map(|(side, bucket, segment)| Op::Scan { side, bucket, segment }),
        1 => (any::<bool>(), bucket.clone()).prop_map(|(side, bucket)| Op::Drop { side, bucket }),
        2 => prop::collection::vec((any::<bool>(), bucket.clone(), 0u32..3, 0u8..8), 0..12).prop_map(Op::Reads),
        // Many keys of one segment, repeated ones too: the store reads them in key order
        // through one iterator.
        1 => (any::<bool>(), bucket, 0u32..3, prop::collection::vec(0u8..8, 0..60)).prop_map(|(s, b, seg, keys)| {
            Op::Reads(keys.into_iter().map(|k| (s, b, seg, k)).collect())
        }),
        1 => Just(Op::Restore),
    ];
    prop::collection::vec(op, 1..40)
}

/// Starts every read, finishes them, and returns what was found, by read.
fn read_all(store: &mut dyn StateStore, reads: &[(bool, i64, u32, u8)]) -> Vec<(usize, Vec<u8>)> {
    for (token, &(s, bucket, segment, key)) in reads.iter().enumerate() {
        let id = SegmentId {
            side: side(s),
            bucket,
            segment,
        };
        store
            .start_read(token, id, &[b'k', key])
            .expect("start read");
    }
    let mut found = Vec::new();
    store
        .finish_reads(&mut |token, value| found.push((token, value.to_vec())))
        .expect("finish reads");
    found.sort();
    found
}

fn scan(store: &mut dyn StateStore, id: SegmentId) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut seen = Vec::new();
    store
        .scan_segment(id, &mut |k, v| seen.push((k.to_vec(), v.to_vec())))
        .expect("scan");
    seen
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rocks_store_agrees_with_model(ops in ops()) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut rocks = RocksStore::create(&dir.path().join("state-0"), &RocksOptions::default()).expect("open");
        let mut restores = 0;
        let mut model = MemStore::default();
        // Segment numbers are never reused within a bucket, as in the join.
        let mut next_segment = std::collections::HashMap::new();
        for op in ops {
            match op {
                Op::Write { side: s, bucket, mut entries } => {
                    entries.sort();
                    entries.dedup_by_key(|e| e.0);
                    let keys: Vec<Vec<u8>> = entries.iter().map(|e| vec![b'k', e.0]).collect();
                    let list: Vec<SegmentEntry<'_>> = keys.iter().zip(&entries).map(|(k, e)| SegmentEntry { key: k, value: &e.1 }).collect();
                    let n = next_segment.entry((s, bucket)).or_insert(0u32);
                    let id = SegmentId { side: side(s), bucket, segment: *n };
                    *n += 1;
                    if list.is_empty() { continue; }
                    rocks.write_segment(id, &mut list.as_slice()).expect("rocks write");
                    model.write_segment(id, &mut list.as_slice()).expect("model write");
                }
                Op::Get { side: s, bucket, segment, key } => {
                    let id = SegmentId { side: side(s), bucket, segment };
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    let found_a = rocks.get(id, &[b'k', key], &mut a).expect("rocks get");
                    let found_b = model.get(id, &[b'k', key], &mut b).expect("model get");
                    prop_assert_eq!((found_a, a), (found_b, b));
                }
                Op::Scan { side: s, bucket, segment } => {
                    let id = SegmentId { side: side(s), bucket, segment };
                    prop_assert_eq!(scan(&mut rocks, id), scan(&mut model, id));
                }
                Op::Reads(reads) => {
                    prop_assert_eq!(read_all(&mut rocks, &reads), read_all(&mut model, &reads));
                }
                Op::Drop { side: s, bucket } => {
                    rocks.drop_bucket(side(s), bucket).expect("rocks drop");
                    model.drop_bucket(side(s), bucket).expect("model drop");
                }
                Op::Restore => {
                    restores += 1;
                    let dir = dir.path().join(format!("state-{restores}"));
                    let mut fresh = RocksStore::create(&dir, &RocksOptions::default()).expect("open");
                    let ids: Vec<SegmentId> = rocks.segment_files().keys().copied().collect();
                    for (&id, path) in rocks.segment_files() {
                        std::fs::copy(path, fresh.segment_path(id)).expect("copy a segment file");
                    }
                    fresh.ingest_segments(&ids).expect("ingest");
                    rocks = fresh;
                }
            }
            prop_assert_eq!(rocks.segment_files().len(), model.segment_count(), "one file per live segment");
        }
    }

    #[test]
    fn join_on_rocks_with_tiny_memory_equals_naive_join(
        kind in kinds(),
        lower_ms in -3_000i64..3_000,
        width_ms in prop_oneof![Just(0i64), 0i64..4_000],
        ooo_ms in prop_oneof![Just(0i64), Just(2_000)],
        memory_max in prop_oneof![Just(0usize), Just(2_048)],
        draws in draws(),
        batch_sizes in prop::collection::vec(1usize..20, 1..5),
    ) {
        let spec = JoinSpec { kind, lower_ms, upper_ms: lower_ms + width_ms, allowed_lateness_ms: 0 };
        let events = build(&draws, ooo_ms);
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::create(&dir.path().join("state"), &RocksOptions::default()).expect("open");
        let mut join = Join::new(spec, store, memory_max);
        let got = run_join(&mut join, &events, &batch_sizes, ooo_ms, 0).expect("rocks works");
        let want = reference(&events, &spec, ooo_ms);
        prop_assert_eq!(&got.late, &want.late);
        prop_assert_eq!(&got.rows, &want.rows);
        prop_assert_eq!(join.store().disk_bytes(), 0, "expired buckets leave no files");
    }
}

/// Hundreds of reads over three segments of 50 keys (present, absent, repeated, in
/// any order): the store reads each segment's keys through one iterator, and finds
/// exactly what the model finds.
#[test]
fn many_reads_of_few_segments_agree_with_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rocks =
        RocksStore::create(&dir.path().join("state"), &RocksOptions::default()).expect("open");
    let mut model = MemStore::default();
    for segment in 0..3u32 {
        // Even keys only, so that odd ones fall between two present keys.
        let keys: Vec<Vec<u8>> = (0..50u8).map(|k| vec![b'k', k * 2]).collect();
        let values: Vec<Vec<u8>> = (0..50u8).map(|k| vec![k, segment as u8]).collect();
        let list: Vec<SegmentEntry<'_>> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| SegmentEntry { key: k, value: v })
            .collect();
        let id = SegmentId {
            side: Side::Left,
            bucket: 1,
            segment,
        };
        rocks
            .write_segment(id, &mut list.as_slice())
            .expect("rocks write");
        model
            .write_segment(id, &mut list.as_slice())
            .expect("model write");
    }
    let mut z = 11u64;
    let reads: Vec<(bool, i64, u32, u8)> = (0..400)
        .map(|_| {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (true, 1, (z >> 40) as u32 % 4, (z >> 50) as u8 % 104)
        })
        .collect();
    let got = read_all(&mut rocks, &reads);
    assert!(got.len() > 100, "{} found", got.len());
    assert_eq!(got, read_all(&mut model, &reads));
}
