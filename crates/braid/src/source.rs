//! A source of events, as the reader loop (`driver`) sees it: lines to read in
//! batches, a position to checkpoint and to continue from, and a way to name where a
//! line came from. Files and the generator implement it; a new kind of source (Kafka)
//! is one more implementation, not a branch in the reader loop.

use anyhow::Context;
use braid_io::takerate::{Stream, TakeRate};
use braid_io::{FileSource, LineBatch, Position};

use crate::checkpoint::SourceAt;
use crate::config::{Input, SourcePlan};
use crate::kafka::source::KafkaSource;

pub trait Source {
    /// Reads up to `max` lines into `batch`; false once a bounded source is exhausted.
    fn read(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<bool>;
    /// Where the next read starts, as a checkpoint keeps it.
    fn position(&self) -> SourceAt;
    /// Continues at a checkpoint's position.
    fn seek(&mut self, at: &SourceAt) -> anyhow::Result<()>;
    /// Where a line was read, for dead letters and late records (`FILE:LINE`).
    fn describe(&self, position: Position) -> String;
    /// Partitions, numbered from 0; each has its own watermark and time guard.
    fn partitions(&self) -> u32 {
        1
    }
    /// The partition a line was read from.
    fn partition_of(&self, _position: Position) -> u32 {
        0
    }
    /// Whether the partition has delivered everything there was at the last look: only
    /// then can it be idle (a partition waiting for its turn to be read is not).
    fn caught_up(&self, _partition: u32) -> bool {
        false
    }
    /// Whether a bounded partition has reached its end.
    fn finished(&self, _partition: u32) -> bool {
        false
    }
    /// Whether a partition waits to be read (a topic while its history is read): it
    /// does not hold the watermark back.
    fn dormant(&self, _partition: u32) -> bool {
        false
    }
    /// Whether partition p holds exactly the keys of partition p of any other
    /// co-partitioned input (a Kafka topic keyed by the join key), so that partition
    /// number p of the inputs can be joined on its own (SPEC §6).
    fn co_partitioned(&self) -> bool {
        false
    }
    /// Whether an event of this time belongs to the partition's part of the input (the
    /// history files and the topic meet at `backfill.until`, each keeping its side).
    fn keeps(&self, _partition: u32, _time_ms: i64) -> bool {
        true
    }
    /// The share of a bounded input read so far, 0 to 1, where its size is known.
    fn done_fraction(&self) -> Option<f64> {
        None
    }
    /// The Kafka topic read, for the metrics' labels (`None`: not a topic).
    fn topic(&self) -> Option<&str> {
        None
    }
    /// Whether this process reads the partition (`--instance` owns some of a topic's).
    fn owned(&self, _partition: u32) -> bool {
        true
    }
    /// Records in the partition after the next one to read, as the broker last told
    /// (Kafka's consumer lag); `None` where unknown or not a topic's partition.
    fn lag(&self, _partition: u32) -> Option<i64> {
        None
    }
    /// Whether the partition is one of the topic's (not its history files).
    fn is_topic_partition(&self, _partition: u32) -> bool {
        false
    }
}

/// Opens a job's source.
/// Opens a source; of a Kafka topic, only the partitions `owned` (`None`: all).
pub fn open(source: &SourcePlan, owned: Option<&[u32]>) -> anyhow::Result<Box<dyn Source>> {
    Ok(match &source.input {
        Input::Files { files, .. } => Box::new(FileSource::from_files(
            &source.name,
            files.clone(),
            source.max_line_bytes,
        )),
        Input::Generator {
            config,
            stream,
            paced,
        } => Box::new(Generator {
            lines: TakeRate::new(config.clone()),
            stream: *stream,
            produced: 0,
            drawn: 0,
            paced: paced.is_some(),
            waiting: false,
        }),
        Input::Kafka(kafka) => Box::new(KafkaSource::open(
            &source.name,
            kafka,
            source.max_line_bytes,
            owned,
        )?),
    })
}

fn other_kind(at: &SourceAt) -> anyhow::Error {
    anyhow::anyhow!("the checkpoint holds a position of another kind of source: {at:?}")
}

impl Source for FileSource {
    fn read(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<bool> {
        Ok(self.read_batch(batch, max)?)
    }

    fn position(&self) -> SourceAt {
        SourceAt::Files(FileSource::position(self))
    }

    fn seek(&mut self, at: &SourceAt) -> anyhow::Result<()> {
        match at {
            SourceAt::Files(position) => Ok(FileSource::seek(self, position)?),
            at => Err(other_kind(at)),
        }
    }

    fn describe(&self, position: Position) -> String {
        format!("{}:{}", self.path(position).display(), position.line)
    }

    fn done_fraction(&self) -> Option<f64> {
        FileSource::done_fraction(self)
    }
}

/// One stream of the take-rate generator. Both streams of a job draw the same
/// sequence of lines and keep their own.
struct Generator {
    lines: TakeRate,
    stream: Stream,
    produced: u64,
    /// Lines drawn from the generator, of both streams: its position.
    drawn: u64,
    /// Releases lines only once the wall clock reaches their time (`rate`).
    paced: bool,
    /// Paced, and the next line's time is still ahead of the clock.
    waiting: bool,
}

impl Generator {
    /// The next line of this generator's stream, if any is left.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let (s, line) = self.lines.next()?;
            self.drawn += 1;
            if s == self.stream {
                self.produced += 1;
                return Some(line);
            }
        }
    }
}

impl Source for Generator {
    fn read(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<bool> {
        let now_ms = self.paced.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        });
        self.waiting = false;
        while batch.len() < max {
            if now_ms.is_some_and(|now| self.lines.clock_ms() > now) {
                self.waiting = true;
                if batch.is_empty() {
                    // Nothing due yet: do not spin the reader.
                    std::thread::sleep(PACED_WAIT);
                }
                break;
            }
            let Some(line) = self.next_line() else {
                return Ok(false);
            };
            let position = Position {
                file: 0,
                line: self.produced,
            };
            batch.push(&line, position);
        }
        Ok(true)
    }

    fn position(&self) -> SourceAt {
        SourceAt::Generator { lines: self.drawn }
    }

    fn seek(&mut self, at: &SourceAt) -> anyhow::Result<()> {
        let SourceAt::Generator { lines: target } = at else {
            return Err(other_kind(at));
        };
        while self.drawn < *target {
            let (s, _) = self
                .lines
                .next()
                .context("the checkpoint is past the generator's end")?;
            self.drawn += 1;
            if s == self.stream {
                self.produced += 1;
            }
        }
        Ok(())
    }

    fn describe(&self, position: Position) -> String {
        format!("generator:{}", position.line)
    }

    fn caught_up(&self, _partition: u32) -> bool {
        self.waiting
    }
}

/// How long a paced generator with nothing due sleeps before the reader goes on.
const PACED_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use braid_io::takerate::TakeRateConfig;

    use super::*;

    fn generator(stream: Stream) -> Generator {
        Generator {
            lines: TakeRate::new(TakeRateConfig {
                events: 20_000,
                ..TakeRateConfig::default()
            }),
            stream,
            produced: 0,
            drawn: 0,
            paced: false,
            waiting: false,
        }
    }

    fn lines(batch: &LineBatch) -> Vec<(Vec<u8>, Position)> {
        batch
            .iter()
            .map(|l| (l.bytes.to_vec(), l.position))
            .collect()
    }

    /// A generator continued at a checkpoint's position reads on exactly as the one
    /// that was not interrupted.
    #[test]
    fn a_generator_resumes_at_its_position() {
        for stream in [Stream::Impressions, Stream::Plays] {
            let mut whole = generator(stream);
            let mut first = LineBatch::default();
            assert!(whole.read(&mut first, 10).expect("reads"));
            let at = whole.position();
            let mut rest = LineBatch::default();
            whole.read(&mut rest, usize::MAX).expect("reads");

            let mut resumed = generator(stream);
            resumed.seek(&at).expect("seeks");
            let mut again = LineBatch::default();
            assert!(!resumed.read(&mut again, usize::MAX).expect("reads"));
            assert!(rest.len() > 10);
            assert_eq!(lines(&again), lines(&rest), "{stream:?}");
            let files = SourceAt::Events { events: 1 };
            assert!(resumed.seek(&files).is_err(), "another kind's position");
        }
    }

    /// A paced generator releases what the wall clock has reached, then waits.
    #[test]
    fn a_paced_generator_releases_lines_as_the_clock_reaches_them() {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut paced = Generator {
            lines: TakeRate::new(TakeRateConfig {
                events: u64::MAX,
                impressions_per_s: 1_000,
                // Two seconds ago: about 2,000 impressions are due.
                start_ms: now_ms - 2_000,
                malformed_rate: 0.0,
                ..TakeRateConfig::default()
            }),
            stream: Stream::Impressions,
            produced: 0,
            drawn: 0,
            paced: true,
            waiting: false,
        };
        let mut batch = LineBatch::default();
        assert!(paced.read(&mut batch, 1_000_000).expect("reads"));
        let due = batch.len();
        assert!((1_900..2_500).contains(&due), "{due} impressions released");
        assert!(paced.caught_up(0), "it waits for the clock");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut more = LineBatch::default();
        paced.read(&mut more, 1_000_000).expect("reads");
        assert!(
            (200..800).contains(&more.len()),
            "{} more after 300 ms at 1,000 a second",
            more.len()
        );
    }
}
