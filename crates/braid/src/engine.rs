//! The engine: shard threads, each owning joins and their state, fed in batches.
//!
//! State is split by *partition* first (partition number p of co-partitioned Kafka
//! inputs, joined on its own with its own watermark, SPEC §6; files and the generator
//! are one partition, 0) and kept separable per partition, so that a partition's state
//! can move to another process. A [`Layout`] places partitions on shards: with at least
//! as many partitions as shards, each partition lives whole on shard `p % shards`;
//! with fewer, every shard holds a piece of every partition and keys hash to one of
//! [`KEY_GROUPS`] key groups and key groups to shards. Either way every event of a key
//! meets the same join. A *unit* is one partition's join on one shard, with its own
//! RocksDB store (`shard-i/part-p`) and its own part of a checkpoint.
//!
//! A shard thread owns its joins, their stores and its result sink alone: no locks on
//! the hot path. Work moves in batches of up to [`BATCH_EVENTS_MAX`] events through
//! bounded channels, so a slow shard pushes back on the reader instead of queueing
//! without limit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;
use braid_core::{
    ColdProbeMode, Event, EventTime, Join, JoinCounts, JoinSink, JoinSpec, PayloadMode, SegmentId,
    Side, Watermark,
};
use braid_io::PendingFile;
use braid_state::{FileOptions, FileStore, ReadThreads};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::checkpoint::{
    store::fault_after, Part, ShardSnapshot, SinkState, UnitRestore, UnitSnapshot,
};

/// Key groups: how the keys of a partition are split over shards when there are fewer
/// partitions than shards.
pub const KEY_GROUPS: u64 = 4_096;
/// Open files wanted for state: the soft limit of open files is raised to this (if the
/// hard limit allows) and half of the limit is shared by the units' stores, which keep
/// that many segment files open (reads of others open their file once per read job).
const STATE_OPEN_FILES_WANTED: u64 = 65_536;
/// Segment files each unit's store keeps open, whatever the limit.
const UNIT_OPEN_FILES_MIN: usize = 16;
/// Memory an old unit of a checkpoint may hold while its state is re-split onto
/// another number of shards (beyond it, its state spills to a temporary store).
const RESPLIT_LOAD_BYTES_MAX: usize = 64 << 20;

/// One partition's join on one shard: the unit of state and of a checkpoint's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unit {
    pub partition: u32,
    pub shard: usize,
}

impl Unit {
    /// The unit's folder, under the state folder and in the checkpoint store.
    pub fn path(&self) -> String {
        format!("part-{}/shard-{}", self.partition, self.shard)
    }
}

/// Where the partitions' state lives among the shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub shards: usize,
    pub partitions: u32,
    /// The partitions this process owns (`--instance`: those the group assigned it);
    /// `None`: all.
    pub owned: Option<Arc<Vec<u32>>>,
}

impl Layout {
    /// Everything as one partition (files, the generator, benchmarks).
    pub fn one_partition(shards: usize) -> Layout {
        Layout {
            shards,
            partitions: 1,
            owned: None,
        }
    }

    /// Whole partitions per shard (at least as many partitions as shards), or pieces
    /// of every partition on every shard, split by key group.
    fn whole_partitions(&self) -> bool {
        self.partitions as usize >= self.shards
    }

    /// The shard that joins a key of a partition.
    pub fn shard_of(&self, partition: u32, key_hash: u64) -> usize {
        if self.whole_partitions() {
            partition as usize % self.shards
        } else {
            let group = (key_hash >> 32) % KEY_GROUPS;
            (group % self.shards as u64) as usize
        }
    }

    /// The partitions a shard holds (a piece of each when they are fewer than shards).
    pub fn partitions_of(&self, shard: usize) -> Vec<u32> {
        (0..self.partitions)
            .filter(|&p| self.holds(shard, p))
            .collect()
    }

    /// Whether a shard holds (a piece of) a partition.
    fn holds(&self, shard: usize, partition: u32) -> bool {
        self.owns(partition)
            && (!self.whole_partitions() || partition as usize % self.shards == shard)
    }

    /// Whether this process owns a partition.
    pub fn owns(&self, partition: u32) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(&partition))
    }

    /// The unit that holds the whole of a partition, if partitions are whole.
    fn unit_of(&self, partition: u32) -> Option<Unit> {
        self.whole_partitions().then(|| Unit {
            partition,
            shard: partition as usize % self.shards,
        })
    }

    /// Places a checkpoint's units in this layout: as they are if they are its units,
    /// or, when the checkpoint holds each partition whole in one unit and so does this
    /// layout, each partition's unit on the shard that now holds the partition (a
    /// restore with another `parallelism`). Pieces of partitions split by key group are
    /// not re-split: `None`.
    fn place(&self, saved: &[Unit]) -> Option<Vec<Unit>> {
        let mut wanted = self.units();
        wanted.sort();
        let mut as_saved = saved.to_vec();
        as_saved.sort();
        if as_saved == wanted {
            return Some(saved.to_vec());
        }
        let mut partitions: Vec<u32> = saved.iter().map(|u| u.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        // Each saved partition whole in one unit; every partition of the layout, or
        // with `owned` some of those (an instance restores the partitions it owns,
        // some perhaps never checkpointed).
        let distinct = partitions.len() == saved.len();
        let whole = distinct
            && match &self.owned {
                None => partitions.iter().copied().eq(0..self.partitions),
                Some(owned) => partitions.iter().all(|p| owned.contains(p)),
            };
        if !whole {
            return None;
        }
        saved.iter().map(|u| self.unit_of(u.partition)).collect()
    }

    /// Every unit, by shard and then partition.
    pub fn units(&self) -> Vec<Unit> {
        (0..self.shards)
            .flat_map(|shard| {
                self.partitions_of(shard)
                    .into_iter()
                    .map(move |partition| Unit { partition, shard })
            })
            .collect()
    }
}
/// Events in one batch sent to a shard.
pub const BATCH_EVENTS_MAX: usize = 2_048;
/// Batches queued per shard before the reader waits.
pub const SHARD_QUEUE_BATCHES: usize = 8;

/// Where a shard's results go; errors are kept and checked after each batch.
pub trait ResultSink: JoinSink + Send + 'static {
    fn take_error(&mut self) -> Option<anyhow::Error>;
    /// At the checkpoint barrier of `epoch`: the files closed since the last one,
    /// pending their commit, and where the sink's numbering stands. What is written
    /// after it belongs to epoch `epoch + 1`.
    fn barrier(&mut self, epoch: u64) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)>;
    fn finish(&mut self) -> anyhow::Result<()>;
}

/// Events for one shard, their bytes back to back.
#[derive(Default)]
struct EventBatch {
    bytes: Vec<u8>,
    events: Vec<BatchEvent>,
}

struct BatchEvent {
    /// The partition whose join takes it.
    partition: u32,
    side: Side,
    time: EventTime,
    key_hash: u64,
    id: Option<u128>,
    start: usize,
    key_len: usize,
    payload_len: usize,
}

enum ShardMessage {
    Events(EventBatch),
    /// New watermarks of the shard's partitions.
    Advance(Vec<(u32, Watermark)>),
    /// Checkpoint barrier of an epoch: everything before it is in the snapshot.
    Barrier(u64),
}

/// How the engine is set up.
pub struct EngineConfig<'a> {
    pub spec: JoinSpec,
    pub layout: Layout,
    pub memory_max_bytes: u64,
    /// When the joins read the cold segments their probes need.
    pub cold_probes: ColdProbeMode,
    /// How the joins keep payloads (`[state] payloads`).
    pub payloads: PayloadMode,
    /// Unit `u` keeps its state under `state_dir/shard-i/part-p`.
    pub state_dir: &'a Path,
    /// Where barriers' snapshots go; `None` without checkpoints.
    pub checkpoints: Option<Sender<Part>>,
    /// Per unit, the state of a restored checkpoint (empty for a fresh start).
    pub restore: Vec<UnitRestore>,
}

/// What a shard did, reported when it ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardReport {
    pub counts: JoinCounts,
    pub peak_state_bytes: usize,
    /// Events in state when the memory peaked.
    pub events_at_peak: u64,
    pub disk_bytes_max: u64,
}

/// The state's size and the join's counts now, per shard, for the live views (the
/// progress line, the metrics): each shard stores its units' memory and counts after
/// every batch, and their disk bytes and counts after every watermark advance.
#[derive(Default)]
pub struct StateGauges {
    shards: Vec<ShardGauges>,
}

/// One shard's gauges, on cache lines no other data shares ([`GAUGE_ALIGN_BYTES`]).
/// A shard stores them after every batch; when they shared a line with the other
/// shard's, or with a small allocation of the reading thread (its key buffer), every
/// touch of that line by another core missed: the reading thread's key hash took up
/// to a fifth of an in-memory flink-peer run's samples, waiting on that line.
#[derive(Default)]
#[repr(align(128))]
struct ShardGauges {
    memory: AtomicU64,
    disk: AtomicU64,
    counts: CountCells,
}

/// [`ShardGauges`]' alignment: two cache lines, as the processor may fetch lines in
/// adjacent pairs.
const GAUGE_ALIGN_BYTES: usize = 128;
const _: () = assert!(std::mem::align_of::<ShardGauges>() == GAUGE_ALIGN_BYTES);

/// A `JoinCounts` another thread can read while its shard updates it (each count on
/// its own; a reader may see one batch's counts in part, never a count going back).
#[derive(Default)]
struct CountCells {
    pairs: AtomicU64,
    matched: [AtomicU64; 2],
    unmatched_emitted: [AtomicU64; 2],
    unmatched_expired: [AtomicU64; 2],
    duplicates: [AtomicU64; 2],
    retained: [AtomicU64; 2],
    spilled_segments: AtomicU64,
    spilled_events: AtomicU64,
    cold_reads: AtomicU64,
    cold_reads_found: AtomicU64,
}

impl CountCells {
    fn store(&self, c: &JoinCounts) {
        let set = |cell: &AtomicU64, v: u64| cell.store(v, Ordering::Relaxed);
        set(&self.pairs, c.pairs);
        for i in 0..2 {
            set(&self.matched[i], c.matched[i]);
            set(&self.unmatched_emitted[i], c.unmatched_emitted[i]);
            set(&self.unmatched_expired[i], c.unmatched_expired[i]);
            set(&self.duplicates[i], c.duplicates[i]);
            set(&self.retained[i], c.retained[i]);
        }
        set(&self.spilled_segments, c.spilled_segments);
        set(&self.spilled_events, c.spilled_events);
        set(&self.cold_reads, c.cold_reads);
        set(&self.cold_reads_found, c.cold_reads_found);
    }

    fn load(&self) -> JoinCounts {
        let get = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        let pair = |cells: &[AtomicU64; 2]| [get(&cells[0]), get(&cells[1])];
        JoinCounts {
            pairs: get(&self.pairs),
            matched: pair(&self.matched),
            unmatched_emitted: pair(&self.unmatched_emitted),
            unmatched_expired: pair(&self.unmatched_expired),
            duplicates: pair(&self.duplicates),
            retained: pair(&self.retained),
            spilled_segments: get(&self.spilled_segments),
            spilled_events: get(&self.spilled_events),
            cold_reads: get(&self.cold_reads),
            cold_reads_found: get(&self.cold_reads_found),
        }
    }
}

impl StateGauges {
    fn new(shards: usize) -> StateGauges {
        StateGauges {
            shards: (0..shards).map(|_| ShardGauges::default()).collect(),
        }
    }

    /// Bytes of state in memory and on disk, over every shard.
    pub fn totals(&self) -> (u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let memory = self.shards.iter().map(|g| get(&g.memory)).sum();
        (memory, self.shards.iter().map(|g| get(&g.disk)).sum())
    }

    /// The join's counts over every shard, restored ones included.
    pub fn counts(&self) -> JoinCounts {
        let mut total = JoinCounts::default();
        for shard in &self.shards {
            total.add(&shard.counts.load());
        }
        total
    }
}

pub struct Engine {
    layout: Layout,
    gauges: Arc<StateGauges>,
    senders: Vec<Sender<ShardMessage>>,
    handles: Vec<JoinHandle<anyhow::Result<ShardReport>>>,
    open: Vec<EventBatch>,
    /// Batches the shards are done with, emptied, for reuse: a batch's buffers are a
    /// few hundred KiB, and allocating and freeing one per batch left glibc holding
    /// freed memory (or, with a fixed mmap threshold, faulting every page in anew).
    recycled: Receiver<EventBatch>,
}

impl Engine {
    /// Starts `shards` shard threads for one partition, splitting `memory_max_bytes`
    /// between them; shard `i` keeps its state under `state_dir/shard-i` and writes to
    /// `make_sink(i)`.
    pub fn start<K: ResultSink>(
        spec: JoinSpec,
        shards: usize,
        memory_max_bytes: u64,
        state_dir: &Path,
        make_sink: impl FnMut(usize) -> anyhow::Result<K>,
    ) -> anyhow::Result<Engine> {
        Engine::start_with(
            EngineConfig {
                spec,
                layout: Layout::one_partition(shards),
                memory_max_bytes,
                cold_probes: ColdProbeMode::default(),
                payloads: PayloadMode::default(),
                state_dir,
                checkpoints: None,
                restore: Vec::new(),
            },
            make_sink,
        )
    }

    /// Starts the shards, restoring their state when `config.restore` holds it.
    pub fn start_with<K: ResultSink>(
        config: EngineConfig<'_>,
        mut make_sink: impl FnMut(usize) -> anyhow::Result<K>,
    ) -> anyhow::Result<Engine> {
        let EngineConfig {
            spec,
            layout,
            memory_max_bytes,
            cold_probes,
            payloads,
            state_dir,
            checkpoints,
            restore,
        } = config;
        let shards = layout.shards;
        let units = layout.units();
        let saved: Vec<Unit> = restore.iter().map(|r| r.unit).collect();
        // A checkpoint in this layout, or with whole partitions onto another number of
        // shards, is placed as it is; otherwise (partitions split by key group, before
        // or now) each partition's pieces are re-split by key after the units start.
        let (restore, to_split) = match (saved.is_empty(), layout.place(&saved)) {
            (true, _) => (std::collections::HashMap::new(), Vec::new()),
            (false, Some(placed)) => {
                if placed != saved {
                    tracing::info!(
                        from = saved.iter().map(|u| u.shard).max().map_or(0, |s| s + 1),
                        to = shards,
                        "restoring whole partitions onto another number of shards"
                    );
                }
                // Each restored unit under the unit that now holds it (its own `unit`
                // says where it was checkpointed).
                (placed.into_iter().zip(restore).collect(), Vec::new())
            }
            (false, None) => {
                if let Some(u) = saved
                    .iter()
                    .find(|u| u.partition >= layout.partitions || !layout.owns(u.partition))
                {
                    anyhow::bail!(
                        "the checkpoint holds state of partition {}, which this job does not have ({} partitions{}); run the job with the inputs it was checkpointed with, or `braid run --reset` to start from scratch",
                        u.partition,
                        layout.partitions,
                        if layout.owned.is_some() { ", of which this instance owns some" } else { "" }
                    );
                }
                tracing::info!(
                    units = saved.len(),
                    from = saved.iter().map(|u| u.shard).max().map_or(0, |s| s + 1),
                    to = shards,
                    "re-splitting the state by key onto another number of shards"
                );
                (std::collections::HashMap::new(), restore)
            }
        };
        let mut restore: std::collections::HashMap<Unit, UnitRestore> = restore;
        for i in 0..shards {
            clear_shard_dir(&state_dir.join(format!("shard-{i}")))?;
        }
        let mut senders = Vec::with_capacity(shards);
        let mut handles = Vec::with_capacity(shards);
        let gauges = Arc::new(StateGauges::new(shards));
        // Never more batches than the queues and the open ones hold, so it never blocks.
        let (recycle, recycled) = bounded(shards * (SHARD_QUEUE_BATCHES + 2));
        let per_shard = usize::try_from(memory_max_bytes / shards as u64).unwrap_or(usize::MAX);
        // A shard's units share its read threads: it serves one unit at a time.
        let open_files = open_files_for_state();
        let read_threads = (0..shards)
            .map(|i| ReadThreads::start(&format!("braid-shard-{i}")))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot start the state's read threads")?;
        // Each unit's state is built (and restored) on a thread of its own, in parallel:
        // loading a join image rebuilds every hot segment's index. Together they stay
        // within the budget: a load streams its image from a file and keeps its unit's
        // share of the budget as it goes, so parallel loads hold at most the budget plus
        // a read buffer and a segment per unit.
        let built: Vec<anyhow::Result<PartJoin>> = std::thread::scope(|scope| {
            let handles: Vec<_> = units
                .iter()
                .map(|&unit| {
                    let in_shard = layout.partitions_of(unit.shard).len();
                    let tuning = FileOptions {
                        fail_writes_after: fault_after("state-write"),
                        read_threads: Some(Arc::clone(&read_threads[unit.shard])),
                        open_files_max: Some(
                            (open_files / units.len().max(1)).max(UNIT_OPEN_FILES_MIN),
                        ),
                    };
                    let dir = state_dir.join(format!("shard-{}", unit.shard));
                    let dir = dir.join(format!("part-{}", unit.partition));
                    let restored = restore.remove(&unit);
                    let budget = per_shard / in_shard;
                    scope.spawn(move || {
                        let mut part = build_unit(unit, &dir, &tuning, spec, budget, restored)?;
                        part.join.set_cold_probe_mode(cold_probes);
                        part.join.set_payload_mode(payloads);
                        Ok(part)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a shard panicked while starting"))?
                })
                .collect()
        });
        let mut built = built
            .into_iter()
            .collect::<anyhow::Result<Vec<PartJoin>>>()?;
        if !to_split.is_empty() {
            let budget = usize::try_from(memory_max_bytes).unwrap_or(usize::MAX);
            resplit(&mut built, to_split, &layout, state_dir, spec, budget)?;
        }
        let mut built = built.into_iter();
        for i in 0..shards {
            let parts = (&mut built)
                .take(layout.partitions_of(i).len())
                .collect::<Vec<PartJoin>>();
            let sink = make_sink(i)?;
            let (tx, rx) = bounded(SHARD_QUEUE_BATCHES);
            senders.push(tx);
            let recycle = recycle.clone();
            let mut local = vec![usize::MAX; layout.partitions as usize];
            for (j, part) in parts.iter().enumerate() {
                local[part.unit.partition as usize] = j;
            }
            let shard = Shard {
                gauges: Arc::clone(&gauges),
                index: i,
                parts,
                local,
                staging: state_dir.join(format!("shard-{i}")).join("staging"),
                checkpoints: checkpoints.clone(),
            };
            // The restored counts, before any event.
            shard.store_counts();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("braid-shard-{i}"))
                    .spawn(move || run_shard(shard, sink, &rx, &recycle))?,
            );
        }
        Ok(Engine {
            layout,
            gauges,
            senders,
            handles,
            open: (0..shards).map(|_| EventBatch::default()).collect(),
            recycled,
        })
    }

    /// The state's size now, as the shards last stored it.
    pub fn gauges(&self) -> &StateGauges {
        &self.gauges
    }

    /// Queues one event of a partition for its shard.
    pub fn push(&mut self, partition: u32, event: &Event<'_>) -> anyhow::Result<()> {
        let shard = self.layout.shard_of(partition, event.key_hash);
        let batch = &mut self.open[shard];
        let start = batch.bytes.len();
        batch.bytes.extend_from_slice(event.key);
        batch.bytes.extend_from_slice(event.payload);
        batch.events.push(BatchEvent {
            partition,
            side: event.side,
            time: event.time,
            key_hash: event.key_hash,
            id: event.id,
            start,
            key_len: event.key.len(),
            payload_len: event.payload.len(),
        });
        if batch.events.len() >= BATCH_EVENTS_MAX {
            self.send(shard)?;
        }
        Ok(())
    }

    /// Sends new watermarks of partitions (`(partition, watermark)`) to the shards
    /// that hold them, behind every event queued for those shards.
    pub fn advance(&mut self, moved: &[(u32, Watermark)]) -> anyhow::Result<()> {
        for shard in 0..self.senders.len() {
            let mine: Vec<(u32, Watermark)> = moved
                .iter()
                .filter(|(p, _)| self.layout.holds(shard, *p))
                .copied()
                .collect();
            if mine.is_empty() {
                continue;
            }
            self.send(shard)?;
            if self.senders[shard]
                .send(ShardMessage::Advance(mine))
                .is_err()
            {
                return Err(self.shard_failure(shard));
            }
        }
        Ok(())
    }

    /// Sends every queued event, then the barrier of `epoch`, to every shard.
    pub fn barrier(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.broadcast(|| ShardMessage::Barrier(epoch))
    }

    /// Sends every queued event, then `message()`, to every shard.
    fn broadcast(&mut self, message: impl Fn() -> ShardMessage) -> anyhow::Result<()> {
        for shard in 0..self.senders.len() {
            self.send(shard)?;
            if self.senders[shard].send(message()).is_err() {
                return Err(self.shard_failure(shard));
            }
        }
        Ok(())
    }

    fn send(&mut self, shard: usize) -> anyhow::Result<()> {
        if self.open[shard].events.is_empty() {
            return Ok(());
        }
        let fresh = self.recycled.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.open[shard], fresh);
        if self.senders[shard]
            .send(ShardMessage::Events(batch))
            .is_err()
        {
            return Err(self.shard_failure(shard));
        }
        Ok(())
    }

    /// A shard hung up: it stopped on an error, which its thread returns.
    fn shard_failure(&mut self, shard: usize) -> anyhow::Error {
        self.senders.clear();
        let handle = self.handles.remove(shard);
        match handle.join() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => anyhow::anyhow!("shard {shard} stopped early"),
            Err(_) => anyhow::anyhow!("shard {shard} panicked"),
        }
    }

    /// Flushes, closes the shards and waits for their reports.
    pub fn finish(mut self) -> anyhow::Result<Vec<ShardReport>> {
        for shard in 0..self.senders.len() {
            self.send(shard)?;
        }
        self.senders.clear();
        std::mem::take(&mut self.handles)
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("shard {i} panicked"))?
            })
            .collect()
    }
}

impl Drop for Engine {
    /// On an early return (an error elsewhere), stops the shards and waits for them:
    /// a process that exits while shard threads are inside RocksDB can crash in its
    /// teardown instead of reporting the error.
    fn drop(&mut self) {
        self.senders.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Raises the soft limit of open files towards [`STATE_OPEN_FILES_WANTED`] as far as
/// the hard limit allows (as databases do at start-up) and returns how many segment
/// files the state may keep open: half the limit, the rest for sockets, outputs and
/// checkpoints.
fn open_files_for_state() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 512;
        }
        let wanted = STATE_OPEN_FILES_WANTED.min(limit.rlim_max);
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = wanted;
            }
        }
    }
    usize::try_from(limit.rlim_cur / 2).unwrap_or(usize::MAX)
}

/// Removes what an earlier run left in a shard's folder besides its units' stores
/// (which clear themselves): checkpoint staging, and the store of a braid version that
/// kept one store per shard (recognised by its marker file).
fn clear_shard_dir(dir: &Path) -> anyhow::Result<()> {
    let mut leftovers = vec![dir.join("staging")];
    if dir.join(braid_state::MARKER_FILE).exists() {
        leftovers.extend(["db", "ingest", "segments"].map(|d| dir.join(d)));
    }
    for path in leftovers.iter().filter(|p| p.exists()) {
        std::fs::remove_dir_all(path)
            .with_context(|| format!("cannot clear {}", path.display()))?;
    }
    Ok(())
}

/// Moves checkpointed units' state into `units` (just started, empty), re-split by key:
/// each old unit is restored on its own under `state_dir/resplit` and every event goes
/// to the unit of its partition that now holds its key ([`Join::split_into`]). Old
/// units are loaded one at a time, with at most [`RESPLIT_LOAD_BYTES_MAX`] of memory
/// (the rest spills to their temporary stores), so a re-split stays near the budget.
fn resplit(
    units: &mut [PartJoin],
    old: Vec<UnitRestore>,
    layout: &Layout,
    state_dir: &Path,
    spec: JoinSpec,
    memory_max_bytes: usize,
) -> anyhow::Result<()> {
    let scratch = state_dir.join("resplit");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    let started = Instant::now();
    let moved = old.len();
    for r in old {
        let partition = r.unit.partition;
        let dir = scratch.join(r.unit.path());
        let budget = (memory_max_bytes / layout.shards.max(1)).min(RESPLIT_LOAD_BYTES_MAX);
        let from = build_unit(r.unit, &dir, &FileOptions::default(), spec, budget, Some(r))?;
        let mut pieces: Vec<&mut PartJoin> = units
            .iter_mut()
            .filter(|u| u.unit.partition == partition)
            .collect();
        // Units are in shard order: a key's shard's position among them.
        let mut position = vec![0; layout.shards];
        for (i, piece) in pieces.iter().enumerate() {
            position[piece.unit.shard] = i;
        }
        let mut joins: Vec<&mut Join<FileStore>> = pieces.iter_mut().map(|p| &mut p.join).collect();
        from.join
            .split_into(&mut joins, |hash| {
                position[layout.shard_of(partition, hash)]
            })
            .with_context(|| {
                format!(
                    "cannot re-split partition {partition} of shard {} onto {} shards",
                    from.unit.shard, layout.shards
                )
            })?;
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()))?;
    tracing::info!(
        units = moved,
        ms = started.elapsed().as_millis() as u64,
        "re-split the checkpoint's state by key"
    );
    Ok(())
}

/// Opens a unit's store in `dir` and its join, restored from a checkpoint if given
/// (possibly checkpointed on another shard).
fn build_unit(
    unit: Unit,
    dir: &Path,
    tuning: &FileOptions,
    spec: JoinSpec,
    memory_max_bytes: usize,
    restored: Option<UnitRestore>,
) -> anyhow::Result<PartJoin> {
    let mut store = FileStore::create(dir, tuning)?;
    let mut checkpointed = BTreeSet::new();
    let Some(r) = restored else {
        return Ok(PartJoin {
            unit,
            join: Join::new(spec, store, memory_max_bytes),
            checkpointed,
            changed: true,
        });
    };
    for &id in &r.segments {
        let from = r.dir.join(braid_state::segment_file_name(id));
        std::fs::rename(&from, store.segment_path(id))
            .with_context(|| format!("cannot move restored {} into the state", from.display()))?;
    }
    store.ingest_segments(&r.segments)?;
    // A partition moved to another shard or from another instance is a new unit to
    // the checkpoint store: its segment files are uploaded again under its new path.
    if r.unit == unit && r.uploaded_here {
        checkpointed.extend(r.segments.iter().copied());
    }
    let mut join = Join::new(spec, store, memory_max_bytes);
    load_image(&mut join, &r.image).with_context(|| {
        format!(
            "cannot restore partition {} of shard {} from its join image {}, which matched its checksum (an image written by another braid version does not load; `braid run --reset` starts from scratch)",
            unit.partition,
            unit.shard,
            r.image.display()
        )
    })?;
    Ok(PartJoin {
        unit,
        join,
        checkpointed,
        changed: true,
    })
}

/// Loads a join image from its file, streaming: the load holds the state it rebuilds
/// and a read buffer, never the image (see [`Join::load_from`]).
fn load_image(join: &mut Join<FileStore>, path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let bytes = file.metadata()?.len();
    join.load_from(&mut file, bytes)?;
    Ok(())
}

/// One partition's join on a shard.
struct PartJoin {
    unit: Unit,
    join: Join<FileStore>,
    /// Segments whose files an earlier barrier handed over.
    checkpointed: BTreeSet<SegmentId>,
    /// Whether it took events or a watermark since the last barrier (else the last
    /// checkpoint's image still holds its state).
    changed: bool,
}

/// One shard's joins and its checkpointing.
struct Shard {
    index: usize,
    /// Where this shard stores its state's size for live views.
    gauges: Arc<StateGauges>,
    parts: Vec<PartJoin>,
    /// By partition number: its index in `parts` (`usize::MAX` if not held here).
    local: Vec<usize>,
    staging: PathBuf,
    checkpoints: Option<Sender<Part>>,
}

impl Shard {
    /// Hands the shard's state at a barrier to the committer: the pause of the pipeline
    /// is this function (sealing the hot segments into images that share them, and a
    /// few hard links); the committer writes the images.
    fn barrier(&mut self, epoch: u64, sink: &mut impl ResultSink) -> anyhow::Result<()> {
        let started = Instant::now();
        // Pairs of waiting cold probes belong to this epoch, and images never hold them.
        for part in &mut self.parts {
            part.join.flush_cold_probes(sink)?;
        }
        let (pending, sink_state) = sink.barrier(epoch)?;
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let staging = self.staging.join(format!("{epoch}"));
        let mut units = Vec::with_capacity(self.parts.len());
        for part in &mut self.parts {
            let dir = staging.join(format!("part-{}", part.unit.partition));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let image = part.changed.then(|| part.join.snapshot());
            part.changed = false;
            let store = part.join.store();
            let files = store.segment_files();
            let mut new_files = Vec::new();
            for (id, path) in files {
                if !part.checkpointed.contains(id) {
                    let link = dir.join(path.file_name().expect("a file name"));
                    std::fs::hard_link(path, &link)
                        .with_context(|| format!("cannot stage {}", path.display()))?;
                    new_files.push((*id, link, store.written_sum(*id)));
                }
            }
            let live: Vec<SegmentId> = files.keys().copied().collect();
            part.checkpointed = live.iter().copied().collect();
            units.push(UnitSnapshot {
                unit: part.unit,
                image,
                live,
                new_files,
                dir,
            });
        }
        let snapshot = ShardSnapshot {
            shard: self.index,
            epoch,
            units,
            staging,
            pending,
            sink: sink_state,
            pause: started.elapsed(),
        };
        checkpoints
            .send(Part::Shard(snapshot))
            .map_err(|_| anyhow::anyhow!("the checkpoint thread stopped"))
    }

    fn memory_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.join.memory_bytes()).sum()
    }

    /// This shard's cells of the live views' gauges.
    fn gauges(&self) -> &ShardGauges {
        &self.gauges.shards[self.index]
    }

    /// Stores the units' counts for the live views.
    fn store_counts(&self) {
        let mut counts = JoinCounts::default();
        for p in &self.parts {
            counts.add(&p.join.counts());
        }
        self.gauges().counts.store(&counts);
    }
}

fn run_shard<K: ResultSink>(
    mut shard: Shard,
    mut sink: K,
    rx: &Receiver<ShardMessage>,
    recycle: &Sender<EventBatch>,
) -> anyhow::Result<ShardReport> {
    let mut report = ShardReport::default();
    for message in rx {
        match message {
            ShardMessage::Events(batch) => {
                // Each partition's events, in the order read.
                let mut by_part: Vec<Vec<Event<'_>>> =
                    (0..shard.parts.len()).map(|_| Vec::new()).collect();
                for e in &batch.events {
                    let key_end = e.start + e.key_len;
                    let j = shard.local[e.partition as usize];
                    anyhow::ensure!(
                        j != usize::MAX,
                        "shard {} got an event of partition {}, which it does not hold (a bug)",
                        shard.index,
                        e.partition
                    );
                    by_part[j].push(Event {
                        side: e.side,
                        key: &batch.bytes[e.start..key_end],
                        key_hash: e.key_hash,
                        time: e.time,
                        id: e.id,
                        payload: &batch.bytes[key_end..key_end + e.payload_len],
                    });
                }
                for (part, events) in shard.parts.iter_mut().zip(&by_part) {
                    if !events.is_empty() {
                        part.changed = true;
                        part.join.on_batch(events, &mut sink)?;
                    }
                }
                drop(by_part);
                let memory = shard.memory_bytes();
                shard
                    .gauges()
                    .memory
                    .store(memory as u64, Ordering::Relaxed);
                shard.store_counts();
                if memory > report.peak_state_bytes {
                    report.peak_state_bytes = memory;
                    report.events_at_peak = shard
                        .parts
                        .iter()
                        .map(|p| p.join.counts().retained.iter().sum::<u64>())
                        .sum();
                }
                let mut batch = batch;
                batch.bytes.clear();
                batch.events.clear();
                // A full recycling queue only means the reader has enough batches.
                let _ = recycle.try_send(batch);
            }
            ShardMessage::Advance(moved) => {
                for (partition, watermark) in moved {
                    let j = shard.local[partition as usize];
                    anyhow::ensure!(
                        j != usize::MAX,
                        "shard {} got a watermark of partition {partition}, which it does not hold (a bug)",
                        shard.index
                    );
                    shard.parts[j].changed = true;
                    shard.parts[j].join.advance(watermark, &mut sink)?;
                }
                let disk = shard
                    .parts
                    .iter()
                    .map(|p| p.join.store().disk_bytes())
                    .sum::<u64>();
                report.disk_bytes_max = report.disk_bytes_max.max(disk);
                shard.gauges().disk.store(disk, Ordering::Relaxed);
                shard.store_counts();
            }
            ShardMessage::Barrier(epoch) => {
                if let Some(e) = sink.take_error() {
                    return Err(e);
                }
                shard.barrier(epoch, &mut sink)?;
            }
        }
        if let Some(e) = sink.take_error() {
            return Err(e);
        }
    }
    for part in &mut shard.parts {
        part.join.flush_cold_probes(&mut sink)?;
    }
    sink.finish()?;
    for part in &shard.parts {
        report.counts.add(&part.join.counts());
    }
    tracing::info!(
        pairs = report.counts.pairs,
        spilled_segments = report.counts.spilled_segments,
        cold_reads = report.counts.cold_reads,
        peak_state_bytes = report.peak_state_bytes,
        "shard done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint of whole partitions restores onto any number of shards that keeps
    /// them whole, each partition on the shard that now holds it; pieces split by key
    /// group, or another partition count, do not.
    #[test]
    fn whole_partitions_move_to_another_number_of_shards() {
        let layout = |shards, partitions| Layout {
            shards,
            partitions,
            owned: None,
        };
        for (from, to) in [(2, 3), (3, 1), (1, 4), (4, 2)] {
            let saved = layout(from, 4).units();
            let placed = layout(to, 4).place(&saved).expect("whole partitions move");
            for (old, new) in saved.iter().zip(&placed) {
                assert_eq!(old.partition, new.partition, "{from} → {to} shards");
                assert_eq!(new.shard, new.partition as usize % to);
            }
            let mut placed = placed;
            placed.sort();
            let mut wanted = layout(to, 4).units();
            wanted.sort();
            assert_eq!(placed, wanted, "{from} → {to} shards: every unit, once");
        }
        let same = layout(3, 2).units();
        assert_eq!(layout(3, 2).place(&same), Some(same), "the same layout");
        assert_eq!(layout(2, 2).place(&layout(3, 2).units()), None, "pieces");
        assert_eq!(
            layout(3, 2).place(&layout(2, 2).units()),
            None,
            "into pieces"
        );
        assert_eq!(
            layout(2, 5).place(&layout(2, 4).units()),
            None,
            "partitions"
        );
        // An instance owning partitions 1 and 3 of 4, with a checkpoint of 3 only.
        let instance = Layout {
            owned: Some(Arc::new(vec![1, 3])),
            ..layout(2, 4)
        };
        assert_eq!(
            instance.units(),
            [
                Unit {
                    partition: 1,
                    shard: 1
                },
                Unit {
                    partition: 3,
                    shard: 1
                }
            ]
        );
        let saved = [Unit {
            partition: 3,
            shard: 0,
        }];
        assert_eq!(
            instance.place(&saved),
            Some(vec![Unit {
                partition: 3,
                shard: 1
            }])
        );
        let not_owned = [Unit {
            partition: 2,
            shard: 0,
        }];
        assert_eq!(instance.place(&not_owned), None, "a partition not owned");
    }

    /// Whole partitions spread over the shards when there are enough of them; pieces
    /// of every partition on every shard, by key group, when there are fewer.
    #[test]
    fn layouts_place_every_key_of_a_partition_on_one_unit() {
        let whole = Layout {
            shards: 2,
            partitions: 5,
            owned: None,
        };
        assert_eq!(whole.partitions_of(0), [0, 2, 4]);
        assert_eq!(whole.partitions_of(1), [1, 3]);
        assert_eq!(whole.units().len(), 5);
        let split = Layout {
            shards: 3,
            partitions: 2,
            owned: None,
        };
        assert_eq!(split.partitions_of(2), [0, 1]);
        assert_eq!(split.units().len(), 6);
        let mut shards_used = BTreeSet::new();
        for key_hash in (0..64u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            assert_eq!(whole.shard_of(3, key_hash), 1);
            let shard = split.shard_of(1, key_hash);
            assert_eq!(shard, split.shard_of(0, key_hash), "a key's shard");
            shards_used.insert(shard);
            for layout in [&whole, &split] {
                let unit = Unit {
                    partition: 1,
                    shard: layout.shard_of(1, key_hash),
                };
                assert!(layout.units().contains(&unit), "{unit:?} of {layout:?}");
            }
        }
        assert_eq!(shards_used.len(), 3, "keys spread over every shard");
        assert_eq!(
            Unit {
                partition: 4,
                shard: 0
            }
            .path(),
            "part-4/shard-0"
        );
    }
}
