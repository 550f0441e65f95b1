//! The engine: shard threads, each owning one join and its state, fed in batches.
//!
//! Keys hash to one of [`KEY_GROUPS`] key groups and key groups to shards, so every
//! event of a key meets the same shard. A shard thread owns its join, its RocksDB store
//! and its result sink alone: no locks on the hot path. Work moves in batches of up to
//! [`BATCH_EVENTS_MAX`] events through bounded channels, so a slow shard pushes back on
//! the reader instead of queueing without limit.

use std::path::Path;
use std::thread::JoinHandle;

use braid_core::{Event, EventTime, Join, JoinCounts, JoinSink, JoinSpec, Side, Watermark};
use braid_state::{RocksOptions, RocksStore};
use crossbeam_channel::{bounded, Receiver, Sender};

/// Key groups: the unit that would move between processes when scaling out.
pub const KEY_GROUPS: u64 = 4_096;
/// Events in one batch sent to a shard.
pub const BATCH_EVENTS_MAX: usize = 2_048;
/// Batches queued per shard before the reader waits.
pub const SHARD_QUEUE_BATCHES: usize = 8;

/// Where a shard's results go; errors are kept and checked after each batch.
pub trait ResultSink: JoinSink + Send + 'static {
    fn take_error(&mut self) -> Option<anyhow::Error>;
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
        mut make_sink: impl FnMut(usize) -> anyhow::Result<K>,
    ) -> anyhow::Result<Engine> {
        let mut senders = Vec::with_capacity(shards);
        let mut handles = Vec::with_capacity(shards);
        // Never more batches than the queues and the open ones hold, so it never blocks.
        let (recycle, recycled) = bounded(shards * (SHARD_QUEUE_BATCHES + 2));
        let per_shard = usize::try_from(memory_max_bytes / shards as u64).unwrap_or(usize::MAX);
        for i in 0..shards {
            let store = RocksStore::create(
                &state_dir.join(format!("shard-{i}")),
                &RocksOptions::default(),
            )?;
            let join = Join::new(spec, store, per_shard);
            let sink = make_sink(i)?;
            let (tx, rx) = bounded(SHARD_QUEUE_BATCHES);
            senders.push(tx);
            let recycle = recycle.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("braid-shard-{i}"))
                    .spawn(move || run_shard(join, sink, &rx, &recycle))?,
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
        for shard in 0..self.senders.len() {
            self.send(shard)?;
            if self.senders[shard]
                .send(ShardMessage::Advance(watermark))
                .is_err()
            {
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
        self.handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("shard {i} panicked"))?
            })
            .collect()
    }
}

fn run_shard<K: ResultSink>(
    mut join: Join<RocksStore>,
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
                join.on_batch(&events, &mut sink)?;
                drop(events);
                if join.memory_bytes() > report.peak_state_bytes {
                    report.peak_state_bytes = join.memory_bytes();
                    report.events_at_peak = join.counts().retained.iter().sum();
                }
                let mut batch = batch;
                batch.bytes.clear();
                batch.events.clear();
                // A full recycling queue only means the reader has enough batches.
                let _ = recycle.try_send(batch);
            }
            ShardMessage::Advance(watermark) => {
                join.advance(watermark, &mut sink)?;
                report.disk_bytes_max = report.disk_bytes_max.max(join.store().disk_bytes());
            }
        }
        if let Some(e) = sink.take_error() {
            return Err(e);
        }
    }
    sink.finish()?;
    report.counts = join.counts();
    tracing::info!(
        pairs = report.counts.pairs,
        spilled_segments = report.counts.spilled_segments,
        cold_reads = report.counts.cold_reads,
        peak_state_bytes = report.peak_state_bytes,
        "shard done"
    );
    Ok(report)
}
