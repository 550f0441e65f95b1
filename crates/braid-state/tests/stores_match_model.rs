//! Proves that both disk stores (segment files and RocksDB) agree with the in-memory
//! model under random sequences of operations, and that the join on each with a tiny
//! memory budget (so that nearly every event is spilled and every bucket expires from
//! disk) equals the naive join.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use braid_core::testkit::{build, draws, kinds, reference, run_join, Draw};
use braid_core::{Join, JoinKind, JoinSpec, MemStore, SegmentEntry, SegmentId, Side, StateStore};
use braid_state::{FileOptions, FileStore, RocksOptions, RocksStore};
use proptest::prelude::*;

/// What the tests need of a disk store beyond [`StateStore`].
trait DiskStore: StateStore + Sized {
    fn create(dir: &Path) -> Self;
    fn segment_files(&self) -> &BTreeMap<SegmentId, PathBuf>;
    fn segment_path(&self, id: SegmentId) -> PathBuf;
    fn ingest_segments(&mut self, ids: &[SegmentId]);
    fn disk_bytes(&self) -> u64;
}

impl DiskStore for RocksStore {
    fn create(dir: &Path) -> Self {
        RocksStore::create(dir, &RocksOptions::default()).expect("open")
    }
    fn segment_files(&self) -> &BTreeMap<SegmentId, PathBuf> {
        RocksStore::segment_files(self)
    }
    fn segment_path(&self, id: SegmentId) -> PathBuf {
        RocksStore::segment_path(self, id)
    }
    fn ingest_segments(&mut self, ids: &[SegmentId]) {
        RocksStore::ingest_segments(self, ids).expect("ingest");
    }
    fn disk_bytes(&self) -> u64 {
        RocksStore::disk_bytes(self)
    }
}

impl DiskStore for FileStore {
    fn create(dir: &Path) -> Self {
        // Two open files at most, so that reads of closed files are tested too.
        let options = FileOptions {
            open_files_max: Some(2),
            ..FileOptions::default()
        };
        FileStore::create(dir, &options).expect("open")
    }
    fn segment_files(&self) -> &BTreeMap<SegmentId, PathBuf> {
        FileStore::segment_files(self)
    }
    fn segment_path(&self, id: SegmentId) -> PathBuf {
        FileStore::segment_path(self, id)
    }
    fn ingest_segments(&mut self, ids: &[SegmentId]) {
        FileStore::ingest_segments(self, ids).expect("ingest");
    }
    fn disk_bytes(&self) -> u64 {
        FileStore::disk_bytes(self)
    }
}

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
        // Values up to 3 KiB, so that a segment file has blocks of one and of several entries.
        3 => (any::<bool>(), bucket.clone(), prop::collection::vec((0u8..8, prop_oneof![prop::collection::vec(any::<u8>(), 0..20), prop::collection::vec(any::<u8>(), 0..3_000)]), 0..6))
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

/// Runs `ops` on a fresh store of type `S` and on the model; fails where they differ.
fn agrees_with_model<S: DiskStore>(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = S::create(&dir.path().join("state-0"));
    let mut restores = 0;
    let mut model = MemStore::default();
    // Segment numbers are never reused within a bucket, as in the join.
    let mut next_segment = std::collections::HashMap::new();
    for op in ops {
        match op {
            Op::Write {
                side: s,
                bucket,
                mut entries,
            } => {
                entries.sort();
                entries.dedup_by_key(|e| e.0);
                let keys: Vec<Vec<u8>> = entries.iter().map(|e| vec![b'k', e.0]).collect();
                let list: Vec<SegmentEntry<'_>> = keys
                    .iter()
                    .zip(&entries)
                    .map(|(k, e)| SegmentEntry {
                        key: k,
                        value: &e.1,
                    })
                    .collect();
                let n = next_segment.entry((s, bucket)).or_insert(0u32);
                let id = SegmentId {
                    side: side(s),
                    bucket,
                    segment: *n,
                };
                *n += 1;
                if list.is_empty() {
                    continue;
                }
                store
                    .write_segment(id, &mut list.as_slice())
                    .expect("store write");
                model
                    .write_segment(id, &mut list.as_slice())
                    .expect("model write");
            }
            Op::Get {
                side: s,
                bucket,
                segment,
                key,
            } => {
                let id = SegmentId {
                    side: side(s),
                    bucket,
                    segment,
                };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let found_a = store.get(id, &[b'k', key], &mut a).expect("store get");
                let found_b = model.get(id, &[b'k', key], &mut b).expect("model get");
                prop_assert_eq!((found_a, a), (found_b, b));
            }
            Op::Scan {
                side: s,
                bucket,
                segment,
            } => {
                let id = SegmentId {
                    side: side(s),
                    bucket,
                    segment,
                };
                prop_assert_eq!(scan(&mut store, id), scan(&mut model, id));
            }
            Op::Reads(reads) => {
                prop_assert_eq!(read_all(&mut store, &reads), read_all(&mut model, &reads));
            }
            Op::Drop { side: s, bucket } => {
                store.drop_bucket(side(s), bucket).expect("store drop");
                model.drop_bucket(side(s), bucket).expect("model drop");
            }
            Op::Restore => {
                restores += 1;
                let dir = dir.path().join(format!("state-{restores}"));
                let mut fresh = S::create(&dir);
                let ids: Vec<SegmentId> = store.segment_files().keys().copied().collect();
                for (&id, path) in store.segment_files() {
                    std::fs::copy(path, fresh.segment_path(id)).expect("copy a segment file");
                }
                fresh.ingest_segments(&ids);
                store = fresh;
            }
        }
        prop_assert_eq!(
            store.segment_files().len(),
            model.segment_count(),
            "one file per live segment"
        );
        let on_disk: u64 = store
            .segment_files()
            .values()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        prop_assert_eq!(
            store.disk_bytes(),
            on_disk,
            "disk bytes are the live files' sizes"
        );
    }
    Ok(())
}

/// A join to run: kind, lower bound, width, disorder, budget, events, batch sizes.
type JoinCase = (JoinKind, i64, i64, i64, usize, Vec<Draw>, Vec<usize>);

fn join_case() -> impl Strategy<Value = JoinCase> {
    (
        kinds(),
        -3_000i64..3_000,
        prop_oneof![Just(0i64), 0i64..4_000],
        prop_oneof![Just(0i64), Just(2_000)],
        prop_oneof![Just(0usize), Just(2_048)],
        draws(),
        prop::collection::vec(1usize..20, 1..5),
    )
}

/// The join of `case` on a fresh store of type `S` equals the naive join.
fn join_equals_naive<S: DiskStore>(case: JoinCase) -> Result<(), TestCaseError> {
    let (kind, lower_ms, width_ms, ooo_ms, memory_max, draws, batch_sizes) = case;
    let spec = JoinSpec {
        kind,
        lower_ms,
        upper_ms: lower_ms + width_ms,
        allowed_lateness_ms: 0,
    };
    let events = build(&draws, ooo_ms);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = S::create(&dir.path().join("state"));
    let mut join = Join::new(spec, store, memory_max);
    let got = run_join(&mut join, &events, &batch_sizes, ooo_ms, 0).expect("the store works");
    let want = reference(&events, &spec, ooo_ms);
    prop_assert_eq!(&got.late, &want.late);
    prop_assert_eq!(&got.rows, &want.rows);
    prop_assert_eq!(
        join.store().disk_bytes(),
        0,
        "expired buckets leave no files"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn file_store_agrees_with_model(ops in ops()) {
        agrees_with_model::<FileStore>(ops)?;
    }

    #[test]
    fn rocks_store_agrees_with_model(ops in ops()) {
        agrees_with_model::<RocksStore>(ops)?;
    }

    #[test]
    fn join_on_files_with_tiny_memory_equals_naive_join(case in join_case()) {
        join_equals_naive::<FileStore>(case)?;
    }

    #[test]
    fn join_on_rocks_with_tiny_memory_equals_naive_join(case in join_case()) {
        join_equals_naive::<RocksStore>(case)?;
    }
}

/// Hundreds of reads over three segments of 50 keys (present, absent, repeated, in
/// any order; values large enough for several blocks a segment): the RocksDB store
/// reads each segment's keys through one iterator, the file store each block once, and
/// both find exactly what the model finds.
#[test]
fn many_reads_of_few_segments_agree_with_model() {
    many_reads_agree::<FileStore>();
    many_reads_agree::<RocksStore>();
}

fn many_reads_agree<S: DiskStore>() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rocks = S::create(&dir.path().join("state"));
    let mut model = MemStore::default();
    for segment in 0..3u32 {
        // Even keys only, so that odd ones fall between two present keys.
        let keys: Vec<Vec<u8>> = (0..50u8).map(|k| vec![b'k', k * 2]).collect();
        let values: Vec<Vec<u8>> = (0..50u8)
            .map(|k| vec![k; usize::from(k) * 10 + segment as usize])
            .collect();
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
