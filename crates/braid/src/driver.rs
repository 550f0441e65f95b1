//! `braid run`: reads the sources, decodes, tracks watermarks, routes late and dead
//! records to their outputs and events to the engine, and accounts for every record.
//!
//! One reader thread reads the sources in batches of up to [`READ_BATCH_LINES`] lines,
//! always from the source whose watermark is lowest (event alignment, SPEC §3).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use braid_core::{Event, PartitionId, Side, Watermark, Watermarks};
use braid_io::takerate::{Stream, TakeRate};
use braid_io::{Decoder, FileSink, FileSource, LineBatch, Position};

use crate::config::{Input, Output, Plan, SourcePlan};
use crate::engine::{Engine, ShardReport};
use crate::progress::Progress;
use crate::results::{RecordShape, Records, StdoutLines};
use crate::summary::{SourceCounts, Summary};

/// Lines read from one source per round.
pub const READ_BATCH_LINES: usize = 1_024;
/// Output files are committed when they reach this size, and at the end of the run.
pub const OUTPUT_ROLL_BYTES: u64 = 256 << 20;
/// The longest raw text a dead-letter record keeps.
const DEAD_RAW_BYTES_MAX: usize = 64 << 10;
const PARTITION: PartitionId = PartitionId(0);

/// A source being read.
enum Reader {
    Files(FileSource),
    Generator {
        lines: TakeRate,
        stream: Stream,
        produced: u64,
    },
}

impl Reader {
    fn open(source: &SourcePlan) -> anyhow::Result<Reader> {
        Ok(match &source.input {
            Input::Files { files, .. } => Reader::Files(FileSource::from_files(
                &source.name,
                files.clone(),
                source.max_line_bytes,
            )),
            Input::Generator { config, stream } => Reader::Generator {
                lines: TakeRate::new(config.clone()),
                stream: *stream,
                produced: 0,
            },
        })
    }

    /// Reads up to `max` lines; false once exhausted.
    fn read(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<bool> {
        match self {
            Reader::Files(files) => Ok(files.read_batch(batch, max)?),
            Reader::Generator {
                lines,
                stream,
                produced,
            } => {
                while batch.len() < max {
                    let Some((s, line)) = lines.next() else {
                        return Ok(false);
                    };
                    if s == *stream {
                        *produced += 1;
                        batch.push(
                            &line,
                            Position {
                                file: 0,
                                line: *produced,
                            },
                        );
                    }
                }
                Ok(true)
            }
        }
    }

    fn describe(&self, position: Position) -> String {
        match self {
            Reader::Files(files) => format!("{}:{}", files.path(position).display(), position.line),
            Reader::Generator { .. } => format!("generator:{}", position.line),
        }
    }
}

/// Where late and dead records go.
enum SideOutput {
    Files {
        late: Box<FileSink>,
        dead: Box<FileSink>,
    },
    Stderr,
}

impl SideOutput {
    fn write(&mut self, late: bool, record: &[u8]) -> anyhow::Result<()> {
        match self {
            SideOutput::Files { late: l, dead: d } => Ok(if late { l } else { d }.write(record)?),
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
            late.commit()?;
            dead.commit()?;
        }
        Ok(())
    }
}

/// Makes sure a files output starts clean: refuses committed output of an earlier run
/// (it would be mixed with this run's) and removes files an interrupted run left hidden.
fn prepare_output(dir: &Path) -> anyhow::Result<()> {
    for folder in [dir.to_path_buf(), dir.join("_late"), dir.join("_dead")] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".inprogress") {
                std::fs::remove_file(entry.path())?;
            } else if name.ends_with(".ndjson") {
                anyhow::bail!(
                    "output folder {} already holds committed output ({name}) of an earlier run; remove it or set another [output] path",
                    folder.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))
}

pub struct RunOptions {
    pub progress: bool,
}

/// Runs a validated job over its bounded inputs to the end.
pub fn run(plan: &Plan, options: &RunOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let shape = RecordShape::new(&plan.sources[0].name, &plan.sources[1].name);
    let (engine, side_output) = match &plan.output {
        Output::Files(dir) => {
            prepare_output(dir)?;
            let engine = Engine::start(
                plan.spec,
                plan.parallelism,
                plan.memory_max_bytes,
                &plan.state_dir,
                |i| {
                    let part = FileSink::new(dir, &format!("part-{i}"), OUTPUT_ROLL_BYTES);
                    Ok(Records::new(shape.clone(), part))
                },
            )?;
            let late = FileSink::new(&dir.join("_late"), "late", OUTPUT_ROLL_BYTES);
            let dead = FileSink::new(&dir.join("_dead"), "dead", OUTPUT_ROLL_BYTES);
            (
                engine,
                SideOutput::Files {
                    late: Box::new(late),
                    dead: Box::new(dead),
                },
            )
        }
        Output::Stdout => {
            let out = Arc::new(Mutex::new(std::io::stdout()));
            let engine = Engine::start(
                plan.spec,
                plan.parallelism,
                plan.memory_max_bytes,
                &plan.state_dir,
                |_| Ok(Records::new(shape.clone(), StdoutLines::new(out.clone()))),
            )?;
            (engine, SideOutput::Stderr)
        }
    };
    tracing::info!(
        job = %plan.name,
        shards = plan.parallelism,
        memory_max_bytes = plan.memory_max_bytes,
        state = %plan.state_dir.display(),
        "starting"
    );
    let mut reading = Reading::new(plan, engine, side_output, started)?;
    let mut progress = Progress::new(options.progress);
    while !reading.done() {
        reading.round()?;
        progress.tick(reading.input_total(), reading.marks.current());
    }
    progress.finish();
    let Reading {
        engine,
        mut side_output,
        counts,
        ..
    } = reading;
    let reports: Vec<ShardReport> = engine.finish()?;
    side_output.commit()?;
    let committed = match &plan.output {
        Output::Files(dir) => Some(dir.clone()),
        Output::Stdout => None,
    };
    let summary = Summary::new(plan, counts, &reports, started.elapsed(), committed);
    if let Output::Files(dir) = &plan.output {
        let path = dir.join("_summary.json");
        std::fs::write(&path, format!("{:#}\n", summary.to_json()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(summary)
}

/// The state of one run's reading loop.
struct Reading<'p> {
    plan: &'p Plan,
    engine: Engine,
    side_output: SideOutput,
    readers: [Reader; 2],
    decoders: [Decoder; 2],
    exhausted: [bool; 2],
    marks: Watermarks,
    sent: Watermark,
    counts: [SourceCounts; 2],
    batch: LineBatch,
    record: Vec<u8>,
    started: Instant,
}

impl<'p> Reading<'p> {
    fn new(
        plan: &'p Plan,
        engine: Engine,
        side_output: SideOutput,
        started: Instant,
    ) -> anyhow::Result<Reading<'p>> {
        Ok(Reading {
            plan,
            engine,
            side_output,
            readers: [
                Reader::open(&plan.sources[0])?,
                Reader::open(&plan.sources[1])?,
            ],
            decoders: [
                Decoder::new(plan.sources[0].schema.clone()),
                Decoder::new(plan.sources[1].schema.clone()),
            ],
            exhausted: [false; 2],
            marks: Watermarks::new(
                &[1, 1],
                plan.max_out_of_orderness_ms,
                plan.idle_timeout_ms,
                0,
            ),
            sent: Watermark::MIN,
            counts: Default::default(),
            batch: LineBatch::default(),
            record: Vec::new(),
            started,
        })
    }

    fn done(&self) -> bool {
        self.exhausted == [true, true]
    }

    fn input_total(&self) -> u64 {
        self.counts.iter().map(|c| c.input).sum()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The source to read next: the unexhausted one with the lowest watermark, so that
    /// the sources advance together in event time. This is event alignment (SPEC §3)
    /// with no slack: the faster source waits while the slower one holds the watermark,
    /// and state does not pile up on the faster side. Ties go to the left source.
    fn next_source(&self, now_ms: u64) -> Option<usize> {
        (0..2)
            .filter(|&s| !self.exhausted[s])
            .min_by_key(|&s| self.marks.source(s, now_ms).unwrap_or(Watermark::MIN))
    }

    /// Reads one batch from the source that holds the watermark back, then passes the
    /// new watermark on.
    fn round(&mut self) -> anyhow::Result<()> {
        let now_ms = self.now_ms();
        let Some(s) = self.next_source(now_ms) else {
            return Ok(());
        };
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let more = self.readers[s].read(&mut batch, READ_BATCH_LINES)?;
        for (line, position, oversized) in batch.iter() {
            self.admit(s, line, position, oversized, now_ms)?;
        }
        self.batch = batch;
        if !more {
            self.exhausted[s] = true;
            self.marks.exhaust(s, PARTITION);
            tracing::info!(source = %self.plan.sources[s].name, records = self.counts[s].input, "source exhausted");
        }
        // A source that waits its turn is not idle.
        for other in 0..2 {
            if !self.exhausted[other] {
                self.marks.touch(other, PARTITION, now_ms);
            }
        }
        let watermark = self.marks.update(now_ms);
        if watermark > self.sent {
            self.engine.advance(watermark)?;
            self.sent = watermark;
        }
        Ok(())
    }

    /// Decodes one line and sends it where it belongs: the join, `_late/` or `_dead/`.
    fn admit(
        &mut self,
        s: usize,
        line: &[u8],
        position: Position,
        oversized: Option<usize>,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        self.counts[s].input += 1;
        let decoded = match oversized {
            Some(len) => Err(braid_io::DecodeError::Oversized {
                len,
                max: self.plan.sources[s].max_line_bytes,
            }),
            None => self.decoders[s].decode(line),
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(error) => {
                self.counts[s].dead += 1;
                let raw = String::from_utf8_lossy(&line[..line.len().min(DEAD_RAW_BYTES_MAX)]);
                let record = serde_json::json!({
                    "source": self.plan.sources[s].name,
                    "position": self.readers[s].describe(position),
                    "error": error.to_string(),
                    "raw": raw,
                });
                return self.side_output.write(false, record.to_string().as_bytes());
            }
        };
        let allowed_lateness_ms = self.plan.spec.allowed_lateness_ms;
        if self
            .marks
            .current()
            .is_late(decoded.time, allowed_lateness_ms)
        {
            self.counts[s].late += 1;
            self.record.clear();
            write!(
                self.record,
                r#"{{"source":{},"position":{},"watermark":{},"event":"#,
                serde_json::to_string(&self.plan.sources[s].name)?,
                serde_json::to_string(&self.readers[s].describe(position))?,
                self.marks.current().millis()
            )?;
            self.record.extend_from_slice(line);
            self.record.push(b'}');
            let record = std::mem::take(&mut self.record);
            let result = self.side_output.write(true, &record);
            self.record = record;
            return result;
        }
        let key = self.decoders[s].key();
        self.engine.push(&Event {
            side: if s == 0 { Side::Left } else { Side::Right },
            key: key.bytes(),
            key_hash: key.hash(),
            time: decoded.time,
            id: decoded.id,
            payload: line,
        })?;
        if self.marks.observe(s, PARTITION, decoded.time, now_ms) {
            self.marks.update(now_ms);
        }
        Ok(())
    }
}
