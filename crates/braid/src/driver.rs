//! `braid run`: reads the sources, decodes, tracks watermarks, routes late and dead
//! records to their outputs and events to the engine, and accounts for every record.
//!
//! One reader thread reads the sources (`source::Source`: files, the generator) in
//! batches of up to [`READ_BATCH_LINES`] lines, always from the source whose watermark
//! is lowest (event alignment, SPEC §3).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::{
    Arrival, Candidate, Event, EventTime, Held, PartitionId, Rejected, Side, TimeGuard,
    TimeGuardState, Verdict, Votes, Watermark, Watermarks,
};
use braid_io::{
    format_rfc3339_ms, BatchDecoder, DecodeError, Decoded, DecodedLines, FileSink, Line, LineBatch,
    PendingFile, Position,
};

use crate::checkpoint::coordinator::{recover_output, Checkpointing, HandedOver};
use crate::checkpoint::{
    parse_watermark, watermark_text, GuardState, HeldState, Part, ReaderSnapshot, ReaderState,
    SinkState, SourceAt, SourceState, WatermarkState,
};
use crate::config::{Output, Plan};
use crate::counts::SourceCounts;
use crate::engine::{Engine, EngineConfig, Layout, ShardReport};
use crate::kafka::output::{key_json, KafkaOutput, KafkaRecords};
use crate::live::{Live, Publisher, Sample};
use crate::progress::{Progress, ProgressView};
use crate::results::{RecordShape, Records, StdoutLines};
use crate::source::{self, Source};
use crate::summary::Summary;
use crate::units;

/// Lines read from one source per round.
pub const READ_BATCH_LINES: usize = 1_024;
/// Output files are committed when they reach this size, and at the end of the run.
pub const OUTPUT_ROLL_BYTES: u64 = 256 << 20;
/// The longest raw text a dead-letter record keeps.
const DEAD_RAW_BYTES_MAX: usize = 64 << 10;

/// Where late and dead records go.
enum SideOutput {
    Files {
        late: Box<FileSink>,
        dead: Box<FileSink>,
    },
    Stderr,
    /// The Kafka output's late and dead topics, in the transaction of `epoch`.
    Kafka {
        out: Arc<KafkaOutput>,
        epoch: u64,
    },
}

impl SideOutput {
    /// Writes a late (or else dead) record; `key` is its join key, when it has one.
    fn write(&mut self, late: bool, key: Option<&[u8]>, record: &[u8]) -> anyhow::Result<()> {
        match self {
            SideOutput::Files { late: l, dead: d } => Ok(if late { l } else { d }.write(record)?),
            SideOutput::Kafka { out, epoch } => {
                let topics = out.topics();
                let topic = if late {
                    &topics.late_topic
                } else {
                    &topics.dead_topic
                };
                out.send(*epoch, topic, key, record)
            }
            SideOutput::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(record)?;
                err.write_all(b"\n")?;
                Ok(())
            }
        }
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        if let SideOutput::Files { late, dead } = self {
            if !late.is_two_phase() {
                late.commit()?;
                dead.commit()?;
            }
        }
        Ok(())
    }

    /// Closes the side outputs' files as pending, for the checkpoint of `epoch`; a
    /// Kafka output begins the next epoch's transaction, which every record written
    /// after this barrier joins (the shards' too).
    fn barrier(&mut self, epoch: u64) -> anyhow::Result<(Vec<PendingFile>, Vec<SinkState>)> {
        let mut pending = Vec::new();
        let mut sinks = Vec::new();
        if let SideOutput::Kafka {
            out,
            epoch: current,
        } = self
        {
            out.begin(epoch + 1)?;
            *current = epoch + 1;
        }
        if let SideOutput::Files { late, dead } = self {
            for sink in [late, dead] {
                pending.extend(sink.barrier()?);
                sinks.push(SinkState::of(sink));
            }
        }
        Ok((pending, sinks))
    }
}

#[derive(Default)]
pub struct RunOptions {
    pub progress: bool,
    /// Delete the job's checkpoints and start from the beginning of the inputs.
    pub reset: bool,
    /// `--instance`: the partitions the group assigned this process (`None`: all).
    pub owned: Option<Arc<Vec<u32>>>,
    /// `--instance`: set when the group takes the partitions away; the run then ends
    /// with a checkpoint that commits them.
    pub revoked: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `--instance`: this member of the group in the generation that assigned `owned`.
    pub member: Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>>,
    /// `[metrics]`: the process's metrics and status page.
    pub live: Option<Arc<Live>>,
}

/// Where a sink's file numbering continues: at the restored checkpoint's number, and
/// past any committed file of the same prefix already in the folder (written by a run
/// with more shards than the checkpoint's, before a restore with fewer: its files are
/// committed output, never overwritten). 0 for a fresh start.
fn next_file(checkpointing: Option<&Checkpointing>, dir: &Path, prefix: &str) -> u64 {
    let saved = checkpointing
        .and_then(|c| c.restored.as_ref())
        .and_then(|r| {
            r.manifest
                .sinks
                .iter()
                .find(|s| s.dir == dir && s.prefix == prefix)
        })
        .map_or(0, |s| s.next_file);
    let past_existing = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| FileSink::file_number(&e.ok()?.file_name().to_string_lossy(), prefix))
        .map(|n| n + 1)
        .max()
        .unwrap_or(0);
    saved.max(past_existing)
}

/// A files sink: two-phase (published by checkpoints) when the job checkpoints.
fn file_sink(checkpointing: Option<&Checkpointing>, dir: &Path, prefix: &str) -> FileSink {
    match checkpointing {
        Some(_) => FileSink::two_phase(
            dir,
            prefix,
            OUTPUT_ROLL_BYTES,
            next_file(checkpointing, dir, prefix),
        ),
        None => FileSink::new(dir, prefix, OUTPUT_ROLL_BYTES),
    }
}

/// Runs a validated job, resuming from its newest usable checkpoint: bounded inputs to
/// their end, unbounded ones until `SIGTERM` or `SIGINT` (then a final checkpoint).
pub fn run(plan: &Plan, options: &RunOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut checkpointing =
        match (&plan.checkpoint, &options.owned) {
            (Some(c), Some(owned)) if plan.instance.is_some() => Some(
                Checkpointing::open_instance(plan, c, owned, options.member.clone())?,
            ),
            (Some(c), _) => Some(Checkpointing::open(plan, c, options.reset)?),
            (None, _) => None,
        };
    let handed_over = checkpointing
        .as_mut()
        .map(|c| std::mem::take(&mut c.handed_over))
        .unwrap_or_default();
    let manifest = checkpointing
        .as_ref()
        .and_then(|c| c.restored.as_ref())
        .map(|r| r.manifest.clone());
    let restore = checkpointing
        .as_mut()
        .and_then(|c| c.restored.as_mut())
        .map(|r| std::mem::take(&mut r.units))
        .unwrap_or_default();
    let handed_units: usize = handed_over.iter().map(|h| h.units.len()).sum();
    let mut restore = restore;
    let mut handed_over = handed_over;
    for h in &mut handed_over {
        restore.append(&mut h.units);
    }
    let parts = checkpointing.as_ref().map(|c| c.committer.parts());
    let owned = options.owned.as_deref().map(Vec::as_slice);
    let readers = [
        source::open(&plan.sources[0], owned)?,
        source::open(&plan.sources[1], owned)?,
    ];
    let group_of = state_partitions(plan, &readers)?;
    let engine_config = EngineConfig {
        spec: plan.spec,
        layout: Layout {
            shards: plan.parallelism,
            partitions: group_of.iter().flatten().max().map_or(1, |&p| p + 1),
            owned: options.owned.clone(),
        },
        memory_max_bytes: plan.memory_max_bytes,
        cold_probes: plan.cold_probes,
        payloads: plan.payloads,
        state_dir: &plan.state_dir,
        checkpoints: parts.clone(),
        restore,
    };
    let shape = RecordShape::new(&plan.sources[0].name, &plan.sources[1].name);
    let (engine, side_output) = match &plan.output {
        Output::Files(dir) => {
            recover_output(dir, manifest.as_ref())?;
            let c = checkpointing.as_ref();
            let engine = Engine::start_with(engine_config, |i| {
                Ok(Records::new(
                    shape.clone(),
                    file_sink(c, dir, &format!("part-{i}")),
                ))
            })?;
            (
                engine,
                SideOutput::Files {
                    late: Box::new(file_sink(c, &dir.join("_late"), "late")),
                    dead: Box::new(file_sink(c, &dir.join("_dead"), "dead")),
                },
            )
        }
        Output::Stdout => {
            let out = Arc::new(Mutex::new(std::io::stdout()));
            let engine = Engine::start_with(engine_config, |_| {
                Ok(Records::new(shape.clone(), StdoutLines::new(out.clone())))
            })?;
            (engine, SideOutput::Stderr)
        }
        Output::Kafka(_) => {
            let c = checkpointing
                .as_ref()
                .context("a kafka output needs [checkpoint]")?;
            let out = c.kafka.clone().context("the Kafka output is open")?;
            let epoch = c.next_epoch;
            let engine = Engine::start_with(engine_config, |_| {
                Ok(KafkaRecords::new(out.clone(), epoch, shape.clone()))
            })?;
            (engine, SideOutput::Kafka { out, epoch })
        }
    };
    let _ = std::fs::remove_dir_all(plan.state_dir.join("restore"));
    let restore_ms = manifest
        .as_ref()
        .map(|_| started.elapsed().as_secs_f64() * 1e3);
    tracing::info!(
        job = %plan.name,
        shards = plan.parallelism,
        memory_max_bytes = plan.memory_max_bytes,
        state = %plan.state_dir.display(),
        "starting"
    );
    let mut reading = Reading::new(plan, engine, side_output, readers, group_of, started);
    if let Some(m) = &manifest {
        reading.restore(&m.reader)?;
    }
    if !handed_over.is_empty() {
        reading.take_over(&handed_over)?;
    }
    let restore_ms = restore_ms
        .or_else(|| (!handed_over.is_empty()).then(|| started.elapsed().as_secs_f64() * 1e3));
    if !handed_over.is_empty() {
        tracing::info!(
            partitions = handed_over
                .iter()
                .map(|h| h.partitions.len())
                .sum::<usize>(),
            units = handed_units,
            restore_ms = restore_ms.unwrap_or(0.0),
            "partitions restored"
        );
    }
    let mut publisher = options
        .live
        .as_ref()
        .map(|live| Publisher::new(Arc::clone(live), &reading.sample()));
    let mut progress = Progress::new(options.progress);
    let mut stopped = false;
    while !reading.done() {
        if crate::signals::stop_requested() {
            tracing::info!("stop requested: taking a final checkpoint");
            stopped = true;
            break;
        }
        if options
            .revoked
            .as_ref()
            .is_some_and(|r| r.load(std::sync::atomic::Ordering::Acquire))
        {
            tracing::info!("partitions revoked: committing them before they go");
            stopped = true;
            break;
        }
        if let Some(c) = checkpointing.as_mut() {
            c.poll()?;
            if c.due() {
                let epoch = c.begin();
                reading.barrier(epoch, parts.as_ref().expect("checkpointing"))?;
            }
        }
        reading.round()?;
        progress.tick(&reading.progress_view());
        if let Some(p) = publisher.as_mut().filter(|p| p.due()) {
            let committed = checkpointing
                .as_ref()
                .map_or(&[][..], |c| c.committed.as_slice());
            p.publish(&reading.sample(), committed);
        }
    }
    progress.finish();
    if let Some(c) = checkpointing.as_mut() {
        // The final checkpoint publishes (commits) the rest of the output.
        c.wait()?;
        let epoch = c.begin();
        reading.barrier(epoch, parts.as_ref().expect("checkpointing"))?;
        c.wait()?;
    }
    let held = reading.held();
    let counts = [reading.totals(0), reading.totals(1)];
    let reader_sample = publisher.as_ref().map(|_| reading.sample_reader());
    // What the state holds at the end (a stopped run keeps it for the next).
    let state_at_end = reading.engine.gauges().totals();
    let Reading {
        engine,
        mut side_output,
        ..
    } = reading;
    let reports: Vec<ShardReport> = engine.finish()?;
    side_output.commit()?;
    let committed = match &plan.output {
        Output::Files(dir) => Some(dir.clone()),
        Output::Stdout | Output::Kafka(_) => None,
    };
    let mut summary = Summary::new(plan, counts, &reports, started.elapsed(), committed);
    if let (Some(p), Some(mut sample)) = (publisher.as_mut(), reader_sample) {
        // The final counts: the summary's.
        sample.add_join(source_names(plan), &summary.join, state_at_end);
        let committed = checkpointing
            .as_ref()
            .map_or(&[][..], |c| c.committed.as_slice());
        p.publish(&sample, committed);
        p.end(if stopped { "stopped" } else { "finished" });
    }
    if stopped {
        summary.stopped = Some(held);
    }
    summary.resumed_input = manifest
        .as_ref()
        .map_or(0, |m| m.reader.sources.iter().map(|s| s.counts.input).sum());
    if let Some(c) = &checkpointing {
        summary.checkpoints = Some(crate::summary::CheckpointCounts::new(
            manifest.as_ref().map(|m| m.epoch),
            restore_ms,
            &c.committed,
        ));
    }
    if let Output::Files(dir) = &plan.output {
        let path = dir.join("_summary.json");
        std::fs::write(&path, format!("{:#}\n", summary.to_json()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(summary)
}

fn source_names(plan: &Plan) -> [&str; 2] {
    [&plan.sources[0].name, &plan.sources[1].name]
}

/// Which partition of the join's state each partition of each source feeds (SPEC §6):
/// partition p of co-partitioned Kafka topics is joined on its own, with its own
/// watermark; anything else (files, the generator, a topic with history files) is
/// joined as one partition, 0. Kafka topics of different partition counts are not
/// co-partitioned: an error that says how to fix it, unless the job sets `[join]
/// repartition = true`, which joins every partition of both as one partition, 0, whose
/// keys the engine splits over the shards by key group: a repartition by key inside
/// the process, with one watermark over every input partition.
fn state_partitions(plan: &Plan, readers: &[Box<dyn Source>; 2]) -> anyhow::Result<Vec<Vec<u32>>> {
    let counts = [readers[0].partitions(), readers[1].partitions()];
    let co_partitioned = !plan.repartition && readers.iter().all(|r| r.co_partitioned());
    anyhow::ensure!(
        !co_partitioned || counts[0] == counts[1],
        "source `{}` has {} partitions and source `{}` has {}: a join of Kafka topics needs them co-partitioned (the same partition count, and records with equal join keys in the same partition number, as a producer keying them by the join key gives); recreate one topic with the other's partition count, or copy it into one that has it, or set `repartition = true` under [join] to repartition them by key inside this process (one process only, not with --instance)",
        plan.sources[0].name,
        counts[0],
        plan.sources[1].name,
        counts[1]
    );
    Ok(counts
        .iter()
        .map(|&n| (0..n).map(|p| if co_partitioned { p } else { 0 }).collect())
        .collect())
}

/// The state of one run's reading loop.
struct Reading<'p> {
    plan: &'p Plan,
    engine: Engine,
    side_output: SideOutput,
    readers: [Box<dyn Source>; 2],
    decoders: [BatchDecoder; 2],
    /// The decoded lines of the batch being admitted.
    decoded: DecodedLines,
    /// The key of a held line decoded again when its time guard releases it.
    held_key: Vec<u8>,
    exhausted: [bool; 2],
    /// Per source and partition: whether a bounded partition has reached its end.
    finished: [Vec<bool>; 2],
    /// Whether a source's last read found nothing to read (a live source waiting for
    /// records): the other is read first.
    dry: [bool; 2],
    /// The source read last.
    last_read: usize,
    /// Per source and partition: whether it waits to be read (a topic behind its
    /// history files), as last told to the watermarks.
    dormant: [Vec<bool>; 2],
    /// Per source and partition, its guard against times its stream does not follow.
    guards: [Vec<TimeGuard<HeldLine>>; 2],
    verdicts: Vec<Verdict<HeldLine>>,
    /// Per source partition; grouped by the partition of the join's state they feed.
    marks: Watermarks,
    /// Per partition of the join's state: the watermark last sent to the shards.
    sent: Vec<Watermark>,
    /// Per source and partition: what the reader counted (a partition's counts move
    /// with it to another instance).
    counts: [Vec<SourceCounts>; 2],
    batch: LineBatch,
    record: Vec<u8>,
    key: Vec<u8>,
    started: Instant,
    /// Per source: time it waited with records while the other, behind in event time,
    /// was read (event alignment), for the metrics.
    aligned: [Duration; 2],
    /// The source that waits so during this round, and when the round began.
    waiting: Option<usize>,
    round_began: Duration,
}

impl<'p> Reading<'p> {
    fn new(
        plan: &'p Plan,
        engine: Engine,
        side_output: SideOutput,
        readers: [Box<dyn Source>; 2],
        group_of: Vec<Vec<u32>>,
        started: Instant,
    ) -> Reading<'p> {
        let partitions = [readers[0].partitions(), readers[1].partitions()];
        let guards = |s: usize| {
            (0..partitions[s])
                .map(|_| TimeGuard::new(plan.time_guard))
                .collect()
        };
        let marks = Watermarks::grouped(
            group_of,
            plan.max_out_of_orderness_ms,
            plan.idle_timeout_ms,
            0,
        );
        Reading {
            plan,
            engine,
            side_output,
            decoders: [0, 1].map(|s| {
                let source = &plan.sources[s];
                BatchDecoder::new(source.schema.clone(), source.max_line_bytes)
            }),
            decoded: DecodedLines::default(),
            held_key: Vec::new(),
            exhausted: [false; 2],
            finished: [
                vec![false; partitions[0] as usize],
                vec![false; partitions[1] as usize],
            ],
            dry: [false; 2],
            last_read: 0,
            dormant: [
                vec![false; partitions[0] as usize],
                vec![false; partitions[1] as usize],
            ],
            guards: [guards(0), guards(1)],
            verdicts: Vec::new(),
            sent: vec![Watermark::MIN; marks.groups() as usize],
            marks,
            readers,
            counts: [
                vec![SourceCounts::default(); partitions[0] as usize],
                vec![SourceCounts::default(); partitions[1] as usize],
            ],
            batch: LineBatch::default(),
            record: Vec::new(),
            key: Vec::new(),
            started,
            aligned: [Duration::ZERO; 2],
            waiting: None,
            round_began: Duration::ZERO,
        }
    }

    fn done(&self) -> bool {
        self.exhausted == [true, true]
    }

    /// Events the time guards hold, per source (read, not yet anywhere else).
    fn held(&self) -> [u64; 2] {
        [0, 1].map(|s| {
            self.guards[s]
                .iter()
                .map(|g| g.state().held.len() as u64)
                .sum()
        })
    }

    /// Continues where a checkpoint's reader stood.
    fn restore(&mut self, state: &ReaderState) -> anyhow::Result<()> {
        anyhow::ensure!(
            state.sources.len() == 2,
            "the checkpoint holds {} sources",
            state.sources.len()
        );
        let now_ms = self.now_ms();
        for (s, saved) in state.sources.iter().enumerate() {
            anyhow::ensure!(
                saved.name == self.plan.sources[s].name,
                "the checkpoint's source {} is `{}`, the job's `{}`",
                s + 1,
                saved.name,
                self.plan.sources[s].name
            );
            self.readers[s]
                .seek(&saved.at)
                .with_context(|| format!("cannot resume source `{}`", saved.name))?;
            anyhow::ensure!(
                saved.partitions.len() == self.finished[s].len(),
                "source `{}` has {} partitions, the checkpoint {}",
                saved.name,
                self.finished[s].len(),
                saved.partitions.len()
            );
            self.counts[s] = saved.partition_counts(self.finished[s].len());
            for (p, &(_, exhausted)) in saved.partitions.iter().enumerate() {
                self.finished[s][p] = exhausted;
            }
            self.exhausted[s] = self.finished[s].iter().all(|&f| f);
            for (guard, saved) in self.guards[s].iter_mut().zip(&saved.guards) {
                guard.restore(guard_from_checkpoint(saved));
            }
        }
        let partitions: Vec<Vec<(Option<i64>, bool)>> =
            state.sources.iter().map(|s| s.partitions.clone()).collect();
        anyhow::ensure!(
            state.partitions.len() == self.sent.len(),
            "the checkpoint's join state has {} partitions, the job's {}",
            state.partitions.len(),
            self.sent.len()
        );
        let groups = state
            .partitions
            .iter()
            .map(|w| parse_watermark(&w.watermark))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.marks.restore(&partitions, &groups, now_ms);
        self.sent = state
            .partitions
            .iter()
            .map(|w| parse_watermark(&w.sent))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(())
    }

    /// Continues, for each partition handed over (`--instance`), where the checkpoint
    /// it came from stood; the other partitions start fresh.
    fn take_over(&mut self, handed_over: &[HandedOver]) -> anyhow::Result<()> {
        let now_ms = self.now_ms();
        let mut partitions: Vec<Vec<(Option<i64>, bool)>> = (0..2)
            .map(|s| vec![(None, false); self.finished[s].len()])
            .collect();
        let mut groups = vec![Watermark::MIN; self.sent.len()];
        for (s, restored) in partitions.iter_mut().enumerate() {
            let mut at = self.readers[s].position();
            let SourceAt::Kafka { offsets, end, .. } = &mut at else {
                anyhow::bail!("only Kafka sources are handed over");
            };
            for h in handed_over {
                let saved = h
                    .reader
                    .sources
                    .get(s)
                    .filter(|saved| saved.name == self.plan.sources[s].name)
                    .with_context(|| {
                        format!(
                            "checkpoint {} has no source `{}`",
                            h.tag, self.plan.sources[s].name
                        )
                    })?;
                let SourceAt::Kafka {
                    offsets: their_offsets,
                    end: their_end,
                    ..
                } = &saved.at
                else {
                    anyhow::bail!(
                        "checkpoint {} holds no Kafka offsets of `{}`",
                        h.tag,
                        saved.name
                    );
                };
                let n = offsets.len();
                anyhow::ensure!(
                    their_offsets.len() == n && saved.partitions.len() == n,
                    "topic of source `{}` has {n} partitions, checkpoint {} {}: braid cannot re-split state over a changed partition count",
                    saved.name,
                    h.tag,
                    their_offsets.len()
                );
                let counts = saved.partition_counts(n);
                for &p in &h.partitions {
                    let p = p as usize;
                    offsets[p] = their_offsets[p];
                    // A partition ends where its first owner said it does.
                    if let (Some(end), Some(theirs)) = (end.as_mut(), their_end) {
                        end[p] = theirs[p];
                    }
                    restored[p] = saved.partitions[p];
                    self.finished[s][p] = saved.partitions[p].1;
                    self.counts[s][p] = counts[p];
                    if let Some(guard) = saved.guards.get(p) {
                        self.guards[s][p].restore(guard_from_checkpoint(guard));
                    }
                }
            }
            self.readers[s]
                .seek(&at)
                .with_context(|| format!("cannot resume source `{}`", self.plan.sources[s].name))?;
        }
        for h in handed_over {
            for &p in &h.partitions {
                let saved = h.reader.partitions.get(p as usize).with_context(|| {
                    format!("checkpoint {} has no watermark of partition {p}", h.tag)
                })?;
                groups[p as usize] = parse_watermark(&saved.watermark)?;
                self.sent[p as usize] = parse_watermark(&saved.sent)?;
            }
        }
        self.marks.restore(&partitions, &groups, now_ms);
        Ok(())
    }

    /// Cuts the sources here: closes the side outputs' files as pending, sends the
    /// barrier behind every event read so far, and hands the reader's part to the
    /// committer.
    fn barrier(
        &mut self,
        epoch: u64,
        parts: &crossbeam_channel::Sender<Part>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let (pending, sinks) = self.side_output.barrier(epoch)?;
        let partitions = self.marks.partitions();
        let sources = (0..2)
            .map(|s| SourceState {
                name: self.plan.sources[s].name.clone(),
                at: self.readers[s].position(),
                partitions: partitions[s].clone(),
                counts: self.totals(s),
                partition_counts: self.counts[s].clone(),
                guards: self.guards[s].iter().map(guard_to_checkpoint).collect(),
            })
            .collect();
        let watermark = self.marks.current();
        self.engine.barrier(epoch)?;
        let snapshot = ReaderSnapshot {
            epoch,
            state: ReaderState {
                sources,
                watermark: watermark_text(watermark),
                partitions: self
                    .marks
                    .group_watermarks()
                    .iter()
                    .zip(&self.sent)
                    .map(|(&w, &sent)| WatermarkState {
                        watermark: watermark_text(w),
                        sent: watermark_text(sent),
                    })
                    .collect(),
            },
            watermark_ms: (!watermark.is_infinite() || watermark == Watermark::MAX)
                .then(|| watermark.millis()),
            pending,
            sinks,
            pause: started.elapsed(),
        };
        parts
            .send(Part::Reader(snapshot))
            .map_err(|_| anyhow::anyhow!("the checkpoint thread stopped"))
    }

    /// What the progress line shows now. The input's done fraction is the smaller of
    /// the two sources' (the one further behind sets the time left).
    fn progress_view(&self) -> ProgressView {
        let fractions = [
            self.readers[0].done_fraction(),
            self.readers[1].done_fraction(),
        ];
        ProgressView {
            records: self.input_total(),
            watermark: self.marks.current(),
            state: self.engine.gauges().totals(),
            done_fraction: fractions[0].zip(fractions[1]).map(|(a, b)| a.min(b)),
        }
    }

    /// Every value the metrics show, with the join's counts and state as the shards
    /// last stored them.
    fn sample(&self) -> Sample {
        let mut sample = self.sample_reader();
        let gauges = self.engine.gauges();
        sample.add_join(source_names(self.plan), &gauges.counts(), gauges.totals());
        sample
    }

    /// What the reader knows: records per partition, late and dead records,
    /// watermarks, Kafka lag and ownership, alignment.
    fn sample_reader(&self) -> Sample {
        let mut sample = Sample::default();
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for (s, marks) in self.marks.partitions().iter().enumerate() {
            let source = || self.plan.sources[s].name.clone();
            for (p, counts) in self.counts[s].iter().enumerate() {
                let labels = vec![("source", source()), ("partition", p.to_string())];
                sample.counter("braid_records_in_total", labels.clone(), counts.input);
                if let Some(Some(t)) = marks.get(p).map(|m| m.0) {
                    let w = t.saturating_sub(self.plan.max_out_of_orderness_ms);
                    sample.gauge("braid_watermark_ms", labels.clone(), w as f64);
                }
                let reader = &self.readers[s];
                if let Some(topic) = reader
                    .topic()
                    .filter(|_| reader.is_topic_partition(p as u32))
                {
                    let mut labels = labels;
                    labels.push(("topic", topic.to_string()));
                    let owned = self.readers[s].owned(p as u32);
                    sample.gauge(
                        "braid_partition_owned",
                        labels.clone(),
                        f64::from(u8::from(owned)),
                    );
                    // 0 for a partition not read here (an earlier generation's value
                    // must not stay up).
                    let lag = self.readers[s].lag(p as u32).unwrap_or(0);
                    sample.gauge("braid_consumer_lag", labels, lag as f64);
                }
            }
            let totals = self.totals(s);
            sample.counter("braid_late_total", vec![("source", source())], totals.late);
            sample.counter(
                "braid_dead_letters_total",
                vec![("source", source())],
                totals.dead,
            );
            sample.gauge(
                "braid_alignment_paused_seconds_total",
                vec![("source", source())],
                self.aligned[s].as_secs_f64(),
            );
        }
        let watermark = self.marks.current();
        if watermark == Watermark::MAX {
            sample.gauge("braid_watermark_lag_seconds", Vec::new(), 0.0);
        } else if !watermark.is_infinite() {
            let lag_ms = wall_ms.saturating_sub(watermark.millis());
            sample.gauge(
                "braid_watermark_lag_seconds",
                Vec::new(),
                lag_ms as f64 / 1e3,
            );
        }
        sample
    }

    fn input_total(&self) -> u64 {
        (0..2).map(|s| self.totals(s).input).sum()
    }

    /// What the reader counted of source `s`, over its partitions.
    fn totals(&self, s: usize) -> SourceCounts {
        let mut total = SourceCounts::default();
        for c in &self.counts[s] {
            total.add(c);
        }
        total
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The source to read next: the unexhausted one with the lowest watermark, so that
    /// the sources advance together in event time. This is event alignment (SPEC §3)
    /// with no slack: the faster source waits while the slower one holds the watermark,
    /// and state does not pile up on the faster side. Ties go to the left source. A
    /// live source that had nothing to read last time goes after one that had; when
    /// neither had, they take turns, so that records arriving on the one ahead are not
    /// left unread while the one behind stays quiet.
    fn next_source(&self, now_ms: u64) -> Option<usize> {
        let open = || (0..2).filter(|&s| !self.exhausted[s]);
        if open().all(|s| self.dry[s]) {
            return open().find(|&s| s != self.last_read).or(open().next());
        }
        open().min_by_key(|&s| {
            (
                self.dry[s],
                self.marks.source(s, now_ms).unwrap_or(Watermark::MIN),
            )
        })
    }

    /// Reads one batch from the source that holds the watermark back, then passes the
    /// new watermark on.
    fn round(&mut self) -> anyhow::Result<()> {
        let now = self.started.elapsed();
        if let Some(o) = self.waiting.take() {
            self.aligned[o] += now.saturating_sub(self.round_began);
        }
        self.round_began = now;
        let now_ms = now.as_millis() as u64;
        let Some(s) = self.next_source(now_ms) else {
            return Ok(());
        };
        let o = 1 - s;
        if !self.exhausted[o]
            && !self.dry[o]
            && !self.dry[s]
            && self.marks.source(o, now_ms) > self.marks.source(s, now_ms)
        {
            self.waiting = Some(o);
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let more = self.readers[s].read(&mut batch, READ_BATCH_LINES)?;
        self.dry[s] = batch.is_empty();
        self.last_read = s;
        let lines: Vec<Line<'_>> = batch.iter().collect();
        let mut decoded = std::mem::take(&mut self.decoded);
        self.decoders[s].decode(&lines, &mut decoded);
        for (i, line) in lines.into_iter().enumerate() {
            let (result, key) = decoded.get(i);
            self.admit(s, line, result.clone(), key, now_ms)?;
        }
        self.decoded = decoded;
        self.batch = batch;
        for p in 0..self.finished[s].len() {
            if !self.finished[s][p] && (!more || self.readers[s].finished(p as u32)) {
                self.finish_partition(s, p)?;
            }
        }
        if !more {
            self.exhausted[s] = true;
            tracing::info!(source = %self.plan.sources[s].name, records = self.totals(s).input, "source exhausted");
        }
        // A partition that waits its turn to be read is not idle; one that has
        // delivered everything there was is, once idle_timeout passes.
        for other in 0..2 {
            for p in 0..self.finished[other].len() {
                let dormant = self.readers[other].dormant(p as u32);
                if dormant != self.dormant[other][p] {
                    self.dormant[other][p] = dormant;
                    self.marks
                        .set_dormant(other, PartitionId(p as u32), dormant, now_ms);
                }
                if !self.finished[other][p] && !self.readers[other].caught_up(p as u32) {
                    self.marks.touch(other, PartitionId(p as u32), now_ms);
                }
            }
        }
        self.marks.update(now_ms);
        let mut moved = Vec::new();
        for (g, (&w, sent)) in self
            .marks
            .group_watermarks()
            .iter()
            .zip(&mut self.sent)
            .enumerate()
        {
            if w > *sent {
                moved.push((g as u32, w));
                *sent = w;
            }
        }
        if !moved.is_empty() {
            tracing::debug!(?moved, "watermarks advance");
            self.engine.advance(&moved)?;
        }
        Ok(())
    }

    /// A bounded partition has reached its end: what its guard still holds is decided
    /// now (nothing more can follow it), and it no longer holds the watermark back.
    fn finish_partition(&mut self, s: usize, p: usize) -> anyhow::Result<()> {
        self.guards[s][p].finish(&mut self.verdicts);
        self.settle(s)?;
        self.finished[s][p] = true;
        self.marks.exhaust(s, PartitionId(p as u32));
        Ok(())
    }

    /// Sends one line of source `s`, decoded with the rest of its batch (`decoded`, with
    /// its `key`), where it belongs: the join, `_late/` or `_dead/`, or its partition's
    /// time guard, which holds it while its time is far ahead.
    fn admit(
        &mut self,
        s: usize,
        line: Line<'_>,
        decoded: Result<Decoded, DecodeError>,
        key: &[u8],
        now_ms: u64,
    ) -> anyhow::Result<()> {
        let decoded = match decoded {
            Ok(d) => d,
            Err(error) => {
                let p = self.readers[s].partition_of(line.position) as usize;
                self.counts[s][p].input += 1;
                return self.dead_letter(s, line.bytes, line.position, &error.to_string());
            }
        };
        let p = self.readers[s].partition_of(line.position) as usize;
        if !self.readers[s].keeps(p as u32, decoded.time.0) {
            // The other part of the input (history or topic) has it.
            return Ok(());
        }
        self.counts[s][p].input += 1;
        let arrival = self.guards[s][p].offer(
            decoded.time,
            || HeldLine {
                line: line.bytes.to_vec(),
                position: line.position,
                record_time: line.record_time,
            },
            &mut self.verdicts,
        );
        if arrival == Arrival::Admit {
            self.route(s, p as u32, line.bytes, line.position, decoded, key)?;
        }
        self.settle(s)?;
        self.observe(s, p, now_ms);
        Ok(())
    }

    /// Sends a decoded event of partition `p` of source `s` with its `key` to `_late/`
    /// or to the join.
    fn route(
        &mut self,
        s: usize,
        p: u32,
        line: &[u8],
        position: Position,
        decoded: Decoded,
        key: &[u8],
    ) -> anyhow::Result<()> {
        let allowed_lateness_ms = self.plan.spec.allowed_lateness_ms;
        let group = self.marks.group_of(s, PartitionId(p));
        let watermark = self.marks.group(group);
        if watermark.is_late(decoded.time, allowed_lateness_ms) {
            self.counts[s][p as usize].late += 1;
            self.record.clear();
            write!(
                self.record,
                r#"{{"source":{},"position":{},"watermark":{},"event":"#,
                serde_json::to_string(&self.plan.sources[s].name)?,
                serde_json::to_string(&self.readers[s].describe(position))?,
                watermark.millis()
            )?;
            self.record.extend_from_slice(line);
            self.record.push(b'}');
            key_json(key, &mut self.key);
            let record = std::mem::take(&mut self.record);
            let result = self.side_output.write(true, Some(&self.key), &record);
            self.record = record;
            return result;
        }
        self.engine.push(
            group,
            &Event {
                side: if s == 0 { Side::Left } else { Side::Right },
                key,
                key_hash: braid_core::hash_key(key),
                time: decoded.time,
                id: decoded.id,
                payload: line,
            },
        )
    }

    /// Acts on the time guard's verdicts: released events go on as if they arrived
    /// now (decoded again: only their bytes were kept), rejected ones are dead letters.
    fn settle(&mut self, s: usize) -> anyhow::Result<()> {
        if self.verdicts.is_empty() {
            return Ok(());
        }
        let mut verdicts = std::mem::take(&mut self.verdicts);
        let mut result = Ok(());
        for verdict in verdicts.drain(..) {
            result = match verdict {
                Verdict::Release(held) => {
                    let decoder = self.decoders[s].single();
                    match decoder.decode_at(&held.line, held.record_time) {
                        Ok(decoded) => {
                            let mut key = std::mem::take(&mut self.held_key);
                            key.clear();
                            key.extend_from_slice(decoder.key().bytes());
                            let p = self.readers[s].partition_of(held.position);
                            let routed = self.route(s, p, &held.line, held.position, decoded, &key);
                            self.held_key = key;
                            routed
                        }
                        Err(e) => Err(anyhow::anyhow!(
                            "a held line no longer decodes: {e} (a bug: it decoded when read)"
                        )),
                    }
                }
                Verdict::Reject(rejected) => {
                    let p = self.readers[s].partition_of(rejected.item.position) as usize;
                    self.counts[s][p].time_jumps += 1;
                    let error = time_jump_error(&rejected, self.plan.time_guard.max_jump_ms);
                    let held = rejected.item;
                    self.dead_letter(s, &held.line, held.position, &error)
                }
            };
            if result.is_err() {
                break;
            }
        }
        self.verdicts = verdicts;
        result
    }

    /// Passes the partition's corroborated time on to its watermark.
    fn observe(&mut self, s: usize, p: usize, now_ms: u64) {
        let partition = PartitionId(p as u32);
        match self.guards[s][p].corroborated() {
            Some(time) if self.marks.observe(s, partition, EventTime(time), now_ms) => {
                self.marks.update(now_ms);
            }
            Some(_) => {}
            None => self.marks.touch(s, partition, now_ms),
        }
    }

    fn dead_letter(
        &mut self,
        s: usize,
        line: &[u8],
        position: Position,
        error: &str,
    ) -> anyhow::Result<()> {
        let p = self.readers[s].partition_of(position) as usize;
        self.counts[s][p].dead += 1;
        let raw = String::from_utf8_lossy(&line[..line.len().min(DEAD_RAW_BYTES_MAX)]);
        let record = serde_json::json!({
            "source": self.plan.sources[s].name,
            "position": self.readers[s].describe(position),
            "error": error,
            "raw": raw,
        });
        self.side_output
            .write(false, None, record.to_string().as_bytes())
    }
}

/// What a held event is kept as: its bytes and where it was read.
#[derive(Clone, Debug)]
struct HeldLine {
    line: Vec<u8>,
    position: Position,
    /// The record's own timestamp (Kafka), for a source whose time it is.
    record_time: Option<i64>,
}

fn guard_to_checkpoint(guard: &TimeGuard<HeldLine>) -> GuardState {
    let state = guard.state();
    GuardState {
        corroborated: state.corroborated,
        seen: state.seen,
        candidates: state.candidates.iter().map(|c| (c.time, c.seq)).collect(),
        held: state
            .held
            .into_iter()
            .map(|h| HeldState {
                time: h.votes.time,
                agree: h.votes.agree,
                disagree: h.votes.disagree,
                file: h.item.position.file,
                line: h.item.position.line,
                record_time: h.item.record_time,
                text: String::from_utf8(h.item.line).expect("a held line decoded, so it is UTF-8"),
            })
            .collect(),
    }
}

fn guard_from_checkpoint(saved: &GuardState) -> TimeGuardState<HeldLine> {
    TimeGuardState {
        corroborated: saved.corroborated,
        seen: saved.seen,
        candidates: saved
            .candidates
            .iter()
            .map(|&(time, seq)| Candidate { time, seq })
            .collect(),
        held: saved
            .held
            .iter()
            .map(|h| Held {
                votes: Votes {
                    time: h.time,
                    agree: h.agree,
                    disagree: h.disagree,
                },
                item: HeldLine {
                    line: h.text.clone().into_bytes(),
                    position: Position {
                        file: h.file,
                        line: h.line,
                    },
                    record_time: h.record_time,
                },
            })
            .collect(),
    }
}

/// The dead letter's reason for an event whose time the stream did not follow.
fn time_jump_error(rejected: &Rejected<HeldLine>, max_jump_ms: Option<i64>) -> String {
    let time = rejected.time.0;
    let ahead = match rejected.corroborated {
        Some(c) => format!(
            "{} ahead of its partition's corroborated time {}",
            units::format_duration_ms(time.saturating_sub(c)),
            format_rfc3339_ms(c)
        ),
        None => "ahead of a partition that has corroborated no time yet".to_string(),
    };
    format!(
        "time {} is {ahead} (max_time_jump {}): of the {} events after it, {} would be late \
         against it, so the stream did not follow it (a corrupt time?)",
        format_rfc3339_ms(time),
        max_jump_ms.map_or_else(|| "off".to_string(), units::format_duration_ms),
        rejected.votes.agree + rejected.votes.disagree,
        rejected.votes.disagree,
    )
}

#[cfg(test)]
mod tests {
    use braid_core::{EventTime, TimeGuardConfig};

    use super::*;

    /// A shard's sink continues past committed files of its prefix already in the
    /// folder (a run with more shards wrote them before a restore with fewer), and
    /// only of its prefix.
    #[test]
    fn a_sink_numbers_its_files_past_those_in_its_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(next_file(None, dir.path(), "part-2"), 0, "an empty folder");
        for name in [
            "part-2-000003.ndjson",
            "part-20-000009.ndjson",
            "part-2-x.ndjson",
        ] {
            std::fs::write(dir.path().join(name), b"{}\n").expect("write");
        }
        assert_eq!(next_file(None, dir.path(), "part-2"), 4);
        assert_eq!(next_file(None, dir.path(), "part-20"), 10);
        assert_eq!(next_file(None, dir.path(), "part-1"), 0);
    }

    /// A guard's state survives the checkpoint's form (and its JSON) unchanged.
    #[test]
    fn guard_state_round_trips_through_a_checkpoint() {
        let mut guard = TimeGuard::new(TimeGuardConfig {
            confirm_events: 4,
            slack_ms: 5_000,
            max_jump_ms: Some(3_600_000),
        });
        let mut verdicts = Vec::new();
        for (i, t) in [1_000, 2_000, 3_000, 9_000_000_000, 4_000, 5_000]
            .into_iter()
            .enumerate()
        {
            let line = format!(r#"{{"ts":{t},"k":"é{i}"}}"#).into_bytes();
            let position = Position {
                file: 1,
                line: i as u64 + 1,
            };
            guard.offer(
                EventTime(t),
                || HeldLine {
                    line,
                    position,
                    record_time: Some(t),
                },
                &mut verdicts,
            );
        }
        let saved = guard_to_checkpoint(&guard);
        assert!(!saved.held.is_empty() && !saved.candidates.is_empty());
        let json = serde_json::to_string(&saved).expect("serialises");
        let back: GuardState = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back, saved);
        let restored = guard_from_checkpoint(&back);
        let state = guard.state();
        assert_eq!(restored.corroborated, state.corroborated);
        assert_eq!(restored.candidates, state.candidates);
        let lines = |held: &[Held<HeldLine>]| -> Vec<(Votes, Vec<u8>, Position)> {
            held.iter()
                .map(|h| (h.votes, h.item.line.clone(), h.item.position))
                .collect()
        };
        assert_eq!(lines(&restored.held), lines(&state.held));
    }
}
