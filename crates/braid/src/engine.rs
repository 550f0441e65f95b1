//! The engine: shard threads, each owning one join and its state, fed in batches.
//!
//! Keys hash to one of [`KEY_GROUPS`] key groups and key groups to shards, so every
//! event of a key meets the same shard. A shard thread owns its join, its RocksDB store
//! and its result sink alone: no locks on the hot path. Work moves in batches of up to
//! [`BATCH_EVENTS_MAX`] events through bounded channels, so a slow shard pushes back on
//! the reader instead of queueing without limit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;
use braid_core::{
    Event, EventTime, Join, JoinCounts, JoinSink, JoinSpec, SegmentId, Side, Watermark,
};
use braid_io::PendingFile;
use braid_state::{RocksOptions, RocksStore};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::checkpoint::{store::fault_after, Part, ShardRestore, ShardSnapshot, SinkState};

/// Key groups: the unit that would move between processes when scaling out.
pub const KEY_GROUPS: u64 = 4_096;
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
    Advance(Watermark),
    /// Checkpoint barrier of an epoch: everything before it is in the snapshot.
    Barrier(u64),
}

/// How the engine is set up.
pub struct EngineConfig<'a> {
    pub spec: JoinSpec,
    pub shards: usize,
    pub memory_max_bytes: u64,
    /// Shard `i` keeps its state under `state_dir/shard-i`.
    pub state_dir: &'a Path,
    /// Where barriers' snapshots go; `None` without checkpoints.
    pub checkpoints: Option<Sender<Part>>,
    /// Per shard, the state of a restored checkpoint (empty for a fresh start).
    pub restore: Vec<ShardRestore>,
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

pub struct Engine {
    senders: Vec<Sender<ShardMessage>>,
    handles: Vec<JoinHandle<anyhow::Result<ShardReport>>>,
    open: Vec<EventBatch>,
    /// Batches the shards are done with, emptied, for reuse: a batch's buffers are a
    /// few hundred KiB, and allocating and freeing one per batch left glibc holding
    /// freed memory (or, with a fixed mmap threshold, faulting every page in anew).
    recycled: Receiver<EventBatch>,
}

impl Engine {
    /// Starts `shards` shard threads, splitting `memory_max_bytes` between them; shard `i`
    /// keeps its state under `state_dir/shard-i` and writes to `make_sink(i)`.
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
                shards,
                memory_max_bytes,
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
            shards,
            memory_max_bytes,
            state_dir,
            checkpoints,
            mut restore,
        } = config;
        anyhow::ensure!(
            restore.is_empty() || restore.len() == shards,
            "the checkpoint has {} shards, the job {shards}",
            restore.len()
        );
        let mut restore = restore.drain(..).map(Some).collect::<Vec<_>>();
        restore.resize_with(shards, || None);
        let tuning = RocksOptions {
            fail_writes_after: fault_after("state-write"),
            ..RocksOptions::default()
        };
        let mut senders = Vec::with_capacity(shards);
        let mut handles = Vec::with_capacity(shards);
        // Never more batches than the queues and the open ones hold, so it never blocks.
        let (recycle, recycled) = bounded(shards * (SHARD_QUEUE_BATCHES + 2));
        let per_shard = usize::try_from(memory_max_bytes / shards as u64).unwrap_or(usize::MAX);
        // Each shard's state is built (and restored) on a thread of its own, in parallel:
        // loading a join image rebuilds every hot segment's index. Together they stay
        // within the budget: a load streams its image from a file and keeps its shard's
        // share of the budget as it goes, so parallel loads hold at most the budget plus
        // a read buffer and a segment per shard.
        let built: Vec<anyhow::Result<(Join<RocksStore>, BTreeSet<SegmentId>)>> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = restore
                    .into_iter()
                    .enumerate()
                    .map(|(i, restored)| {
                        let dir = state_dir.join(format!("shard-{i}"));
                        let tuning = &tuning;
                        scope.spawn(move || build_shard(i, &dir, tuning, spec, per_shard, restored))
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
        for (i, built) in built.into_iter().enumerate() {
            let (join, checkpointed) = built?;
            let sink = make_sink(i)?;
            let (tx, rx) = bounded(SHARD_QUEUE_BATCHES);
            senders.push(tx);
            let recycle = recycle.clone();
            let shard = Shard {
                index: i,
                join,
                staging: state_dir.join(format!("shard-{i}")).join("staging"),
                checkpoints: checkpoints.clone(),
                checkpointed,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("braid-shard-{i}"))
                    .spawn(move || run_shard(shard, sink, &rx, &recycle))?,
            );
        }
        Ok(Engine {
            senders,
            handles,
            open: (0..shards).map(|_| EventBatch::default()).collect(),
            recycled,
        })
    }

    /// Queues one event for its shard.
    pub fn push(&mut self, event: &Event<'_>) -> anyhow::Result<()> {
        let group = (event.key_hash >> 32) % KEY_GROUPS;
        let shard = (group % self.senders.len() as u64) as usize;
        let batch = &mut self.open[shard];
        let start = batch.bytes.len();
        batch.bytes.extend_from_slice(event.key);
        batch.bytes.extend_from_slice(event.payload);
        batch.events.push(BatchEvent {
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

    /// Sends every queued event, then the new watermark, to every shard.
    pub fn advance(&mut self, watermark: Watermark) -> anyhow::Result<()> {
        self.broadcast(|| ShardMessage::Advance(watermark))
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

/// Opens shard `i`'s store in `dir` and its join, restored from a checkpoint if given;
/// returns them with the segments the checkpoint already holds.
fn build_shard(
    i: usize,
    dir: &Path,
    tuning: &RocksOptions,
    spec: JoinSpec,
    memory_max_bytes: usize,
    restored: Option<ShardRestore>,
) -> anyhow::Result<(Join<RocksStore>, BTreeSet<SegmentId>)> {
    let mut store = RocksStore::create(dir, tuning)?;
    let mut checkpointed = BTreeSet::new();
    let Some(r) = restored else {
        return Ok((Join::new(spec, store, memory_max_bytes), checkpointed));
    };
    for &id in &r.segments {
        let from = r.dir.join(braid_state::segment_file_name(id));
        std::fs::rename(&from, store.segment_path(id))
            .with_context(|| format!("cannot move restored {} into the state", from.display()))?;
    }
    store.ingest_segments(&r.segments)?;
    checkpointed.extend(r.segments.iter().copied());
    let mut join = Join::new(spec, store, memory_max_bytes);
    load_image(&mut join, &r.image).with_context(|| {
        format!(
            "cannot restore shard {i} from its join image {}, which matched its checksum (an image written by another braid version does not load; `braid run --reset` starts from scratch)",
            r.image.display()
        )
    })?;
    Ok((join, checkpointed))
}

/// Loads a join image from its file, streaming: the load holds the state it rebuilds
/// and a read buffer, never the image (see [`Join::load_from`]).
fn load_image(join: &mut Join<RocksStore>, path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let bytes = file.metadata()?.len();
    join.load_from(&mut file, bytes)?;
    Ok(())
}

/// One shard's join and its checkpointing.
struct Shard {
    index: usize,
    join: Join<RocksStore>,
    staging: PathBuf,
    checkpoints: Option<Sender<Part>>,
    /// Segments whose files an earlier barrier handed over.
    checkpointed: BTreeSet<SegmentId>,
}

impl Shard {
    /// Hands the shard's state at a barrier to the committer: the pause of the pipeline
    /// is this function (sealing the hot segments into an image that shares them, and a
    /// few hard links); the committer writes the image.
    fn barrier(&mut self, epoch: u64, sink: &mut impl ResultSink) -> anyhow::Result<()> {
        let started = Instant::now();
        let (pending, sink_state) = sink.barrier(epoch)?;
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let staging = self.staging.join(format!("{epoch}"));
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))?;
        let image = self.join.snapshot();
        let files = self.join.store().segment_files();
        let mut new_files = Vec::new();
        for (id, path) in files {
            if !self.checkpointed.contains(id) {
                let link = staging.join(path.file_name().expect("a file name"));
                std::fs::hard_link(path, &link)
                    .with_context(|| format!("cannot stage {}", path.display()))?;
                new_files.push((*id, link));
            }
        }
        let live: Vec<SegmentId> = files.keys().copied().collect();
        self.checkpointed = live.iter().copied().collect();
        let snapshot = ShardSnapshot {
            shard: self.index,
            epoch,
            image: Some(image),
            live,
            new_files,
            staging,
            pending,
            sink: sink_state,
            pause: started.elapsed(),
        };
        checkpoints
            .send(Part::Shard(snapshot))
            .map_err(|_| anyhow::anyhow!("the checkpoint thread stopped"))
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
                let events: Vec<Event<'_>> = batch
                    .events
                    .iter()
                    .map(|e| {
                        let key_end = e.start + e.key_len;
                        Event {
                            side: e.side,
                            key: &batch.bytes[e.start..key_end],
                            key_hash: e.key_hash,
                            time: e.time,
                            id: e.id,
                            payload: &batch.bytes[key_end..key_end + e.payload_len],
                        }
                    })
                    .collect();
                shard.join.on_batch(&events, &mut sink)?;
                drop(events);
                if shard.join.memory_bytes() > report.peak_state_bytes {
                    report.peak_state_bytes = shard.join.memory_bytes();
                    report.events_at_peak = shard.join.counts().retained.iter().sum();
                }
                let mut batch = batch;
                batch.bytes.clear();
                batch.events.clear();
                // A full recycling queue only means the reader has enough batches.
                let _ = recycle.try_send(batch);
            }
            ShardMessage::Advance(watermark) => {
                shard.join.advance(watermark, &mut sink)?;
                report.disk_bytes_max = report.disk_bytes_max.max(shard.join.store().disk_bytes());
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
    sink.finish()?;
    report.counts = shard.join.counts();
    tracing::info!(
        pairs = report.counts.pairs,
        spilled_segments = report.counts.spilled_segments,
        cold_reads = report.counts.cold_reads,
        peak_state_bytes = report.peak_state_bytes,
        "shard done"
    );
    Ok(report)
}
