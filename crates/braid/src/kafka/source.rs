//! A Kafka topic as a source: every partition assigned to this process (no group
//! membership: the checkpoint, not the group, says where each partition stands), read
//! `read_committed`, each record's value one NDJSON line.
//!
//! Each source has a consumer of its own. One consumer shared by both sources, each
//! partition on a queue of its own, was measured slower (`braid bench --workload kafka
//! --events 3000000`, alternating runs: 235 k events/s against 294 k, medians of 3):
//! a consumer parses its fetches on one thread per broker, and two consumers parse in
//! parallel.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use braid_io::{FileSource, LineBatch, Position};

use super::{client_config, Context, BROKER_OUTAGE_MAX, REQUEST_TIMEOUT};
use crate::checkpoint::SourceAt;
use crate::config::{BackfillPlan, KafkaEnd, KafkaSourcePlan, KafkaStart};
use crate::source::Source;

/// How long a read waits for a record when none is buffered; then it returns what it
/// has (possibly nothing), so that the reader can serve the other source.
const POLL_WAIT: Duration = Duration::from_millis(10);

/// braid's consumer settings; `[source.properties]` override them.
pub(crate) const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("isolation.level", "read_committed"),
    ("enable.partition.eof", "true"),
    // Bounds what librdkafka prefetches per partition (the default is 64 MiB).
    ("queued.max.messages.kbytes", "16384"),
];

pub struct KafkaSource {
    name: String,
    brokers: String,
    topic: String,
    consumer: BaseConsumer<Context>,
    /// Per partition: the offset of the next record to read.
    next: Vec<i64>,
    /// Per partition: the offset where a bounded source ends (exclusive).
    end: Option<Vec<i64>>,
    /// Per partition: where this run started reading (after a restore's seek).
    first: Vec<i64>,
    finished: Vec<bool>,
    /// Per partition: whether this process owns it (`--instance`); one it does not is
    /// finished from the start and never assigned.
    owned: Vec<bool>,
    /// Per partition: read up to what the broker had at the last look.
    caught_up: Vec<bool>,
    assigned: bool,
    max_line_bytes: usize,
    /// Since when the broker has not answered (a read error and no record since).
    failing_since: Option<(Instant, String)>,
    /// History files read before the topic (`[source.backfill]`), as one more
    /// partition numbered after the topic's.
    backfill: Option<Backfill>,
}

struct Backfill {
    files: FileSource,
    until_ms: i64,
    /// Whether every file is read; then the topic's partitions wake.
    done: bool,
}

impl KafkaSource {
    /// Connects, checks the topic, and works out where a job without a checkpoint
    /// starts and (for a bounded source) ends.
    pub fn open(
        name: &str,
        plan: &KafkaSourcePlan,
        max_line_bytes: usize,
        owned: Option<&[u32]>,
    ) -> anyhow::Result<KafkaSource> {
        let consumer = group_consumer(name, plan)?;
        let partitions = partition_count(&consumer, &plan.brokers, &plan.topic)
            .map_err(|e| anyhow::anyhow!("source `{name}`: {e}"))?;
        let watermarks = |p: i32| {
            consumer
                .fetch_watermarks(&plan.topic, p, REQUEST_TIMEOUT)
                .with_context(|| {
                    format!(
                        "source `{name}`: cannot read the offsets of {}[{p}] at {}",
                        plan.topic, plan.brokers
                    )
                })
        };
        // Every partition's low (earliest) or high (latest) watermark.
        let ends = |high: bool| -> anyhow::Result<Vec<i64>> {
            (0..partitions)
                .map(|p| watermarks(p).map(|(low, top)| if high { top } else { low }))
                .collect()
        };
        let at_time = |ms: i64| -> anyhow::Result<Vec<i64>> {
            let mut query = TopicPartitionList::new();
            for p in 0..partitions {
                query.add_partition_offset(&plan.topic, p, Offset::Offset(ms))?;
            }
            let found = consumer
                .offsets_for_times(query, REQUEST_TIMEOUT)
                .with_context(|| {
                    format!(
                        "source `{name}`: cannot look up offsets by time in {} at {}",
                        plan.topic, plan.brokers
                    )
                })?;
            (0..partitions)
                .map(
                    |p| match found.find_partition(&plan.topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Ok(o),
                        // No record at or after the time: the partition's end.
                        _ => Ok(watermarks(p)?.1),
                    },
                )
                .collect()
        };
        let next = match (&plan.backfill, plan.start) {
            (Some(b), _) => at_time(b.until_ms.saturating_sub(b.seam_slack_ms))?,
            (None, KafkaStart::Earliest) => ends(false)?,
            (None, KafkaStart::Latest) => ends(true)?,
            (None, KafkaStart::Time(ms)) => at_time(ms)?,
        };
        let end = match plan.end {
            None => None,
            // Under read_committed the high watermark is the last stable offset.
            Some(KafkaEnd::Latest) => Some(ends(true)?),
            Some(KafkaEnd::Time(ms)) => Some(at_time(ms)?),
        };
        let n = partitions as usize;
        let mut source = KafkaSource {
            name: name.to_string(),
            brokers: plan.brokers.clone(),
            topic: plan.topic.clone(),
            consumer,
            first: next.clone(),
            next,
            end,
            owned: (0..partitions as u32)
                .map(|p| owned.is_none_or(|o| o.contains(&p)))
                .collect(),
            finished: vec![false; n],
            caught_up: vec![false; n],
            assigned: false,
            max_line_bytes,
            failing_since: None,
            backfill: plan.backfill.as_ref().map(|b: &BackfillPlan| Backfill {
                files: FileSource::from_files(name, b.files.clone(), max_line_bytes),
                until_ms: b.until_ms,
                done: false,
            }),
        };
        source.check_finished();
        Ok(source)
    }

    /// Marks finished the partitions at their end, and those another instance owns
    /// (never read here).
    fn check_finished(&mut self) {
        for (finished, &owned) in self.finished.iter_mut().zip(&self.owned) {
            *finished |= !owned;
        }
        if let Some(end) = &self.end {
            for ((finished, next), end) in self.finished.iter_mut().zip(&self.next).zip(end) {
                if next >= end {
                    *finished = true;
                }
            }
        }
    }

    fn assign(&mut self) -> anyhow::Result<()> {
        let mut list = TopicPartitionList::new();
        for (p, &offset) in self.next.iter().enumerate() {
            if !self.finished[p] {
                list.add_partition_offset(&self.topic, p as i32, Offset::Offset(offset))?;
            }
        }
        self.consumer.assign(&list).with_context(|| {
            format!(
                "source `{}`: cannot assign the partitions of {}",
                self.name, self.topic
            )
        })?;
        self.assigned = true;
        Ok(())
    }

    /// Stops fetching a partition that reached its end.
    fn finish(&mut self, p: usize) {
        self.finished[p] = true;
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, p as i32);
        if let Err(e) = self.consumer.pause(&list) {
            tracing::debug!("cannot pause {}[{p}]: {e}", self.topic);
        }
    }

    /// At the end of a partition's records: its position (past transaction markers)
    /// may have reached the end even if no record did.
    fn at_eof(&mut self, p: usize) {
        self.caught_up[p] = true;
        let Some(end) = &self.end else { return };
        let position = self.consumer.position().ok().and_then(|list| {
            list.find_partition(&self.topic, p as i32)
                .map(|e| e.offset())
        });
        if let Some(Offset::Offset(o)) = position {
            self.next[p] = self.next[p].max(o);
        }
        if self.next[p] >= end[p] && !self.finished[p] {
            self.finish(p);
        }
    }

    /// The topic's partition count (the history partition comes after them).
    fn topic_partitions(&self) -> u32 {
        self.next.len() as u32
    }

    fn reading_history(&self) -> bool {
        self.backfill.as_ref().is_some_and(|b| !b.done)
    }

    /// Reads history lines; a file's lines are numbered after the topic's partitions.
    fn read_history(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<()> {
        let n = self.topic_partitions();
        let b = self.backfill.as_mut().expect("reading history");
        let start = batch.len();
        let more = b.files.read_batch(batch, max)?;
        batch.renumber_files(start, n);
        if !more {
            b.done = true;
            tracing::info!(source = %self.name, "history read; reading the topic");
        }
        Ok(())
    }

    fn all_finished(&self) -> bool {
        self.end.is_some() && self.finished.iter().all(|&f| f)
    }
}

/// A consumer of a source's group with braid's settings and the job's properties.
pub fn group_consumer(name: &str, plan: &KafkaSourcePlan) -> anyhow::Result<BaseConsumer<Context>> {
    client_config(&plan.brokers, CONSUMER_DEFAULTS, &plan.properties)
        .set("group.id", &plan.group)
        .create_with_context(Context::default())
        .with_context(|| {
            format!(
                "source `{name}`: cannot create a Kafka consumer for {}",
                plan.brokers
            )
        })
}

/// The topic's partition count; errors say whether the broker or the topic is missing.
pub fn partition_count(
    consumer: &BaseConsumer<Context>,
    brokers: &str,
    topic: &str,
) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach Kafka at {brokers} (no metadata within {} s: {e}); check `brokers` and that the broker is up",
            REQUEST_TIMEOUT.as_secs()
        )
    })?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
        _ => anyhow::bail!(
            "topic `{topic}` does not exist at {brokers}; braid does not create topics: create it first (for a join, with as many partitions as the other input's topic)"
        ),
    }
}

impl Source for KafkaSource {
    fn read(&mut self, batch: &mut LineBatch, max: usize) -> anyhow::Result<bool> {
        if self.reading_history() {
            self.read_history(batch, max)?;
            return Ok(true);
        }
        if self.all_finished() {
            return Ok(false);
        }
        if !self.assigned {
            self.assign()?;
        }
        let mut waited = false;
        while batch.len() < max {
            let wait = if batch.is_empty() && !waited {
                POLL_WAIT
            } else {
                Duration::ZERO
            };
            waited = true;
            let Some(result) = self.consumer.poll(wait) else {
                break;
            };
            match result {
                Ok(m) => {
                    self.failing_since = None;
                    let p = m.partition() as usize;
                    if self.finished.get(p).copied().unwrap_or(true) {
                        continue;
                    }
                    if let Some(end) = &self.end {
                        if m.offset() >= end[p] {
                            self.finish(p);
                            continue;
                        }
                    }
                    self.next[p] = m.offset() + 1;
                    self.caught_up[p] = false;
                    let position = Position {
                        file: p as u32,
                        line: m.offset() as u64,
                    };
                    let time = m.timestamp().to_millis();
                    batch.push_record(
                        m.payload().unwrap_or_default(),
                        position,
                        time,
                        Some(self.max_line_bytes),
                    );
                    if self.end.as_ref().is_some_and(|end| self.next[p] >= end[p]) {
                        self.finish(p);
                    }
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    self.failing_since = None;
                    self.at_eof(p as usize);
                }
                Err(e) => {
                    let since = self
                        .failing_since
                        .get_or_insert_with(|| (Instant::now(), String::new()));
                    since.1 = e.to_string();
                    if since.0.elapsed() > BROKER_OUTAGE_MAX {
                        anyhow::bail!(
                            "source `{}`: cannot read {} at {} for {} s (last error: {}); the job stops, and the next `braid run` resumes from its last checkpoint",
                            self.name,
                            self.topic,
                            self.brokers,
                            BROKER_OUTAGE_MAX.as_secs(),
                            since.1
                        );
                    }
                    break;
                }
            }
        }
        Ok(!self.all_finished())
    }

    fn position(&self) -> SourceAt {
        SourceAt::Kafka {
            topic: self.topic.clone(),
            offsets: self.next.clone(),
            end: self.end.clone(),
            history: self
                .backfill
                .as_ref()
                .filter(|b| !b.done)
                .map(|b| b.files.position()),
        }
    }

    fn seek(&mut self, at: &SourceAt) -> anyhow::Result<()> {
        let SourceAt::Kafka {
            topic,
            offsets,
            end,
            history,
        } = at
        else {
            anyhow::bail!("the checkpoint holds a position of another kind of source: {at:?}");
        };
        anyhow::ensure!(
            *topic == self.topic,
            "the checkpoint read topic `{topic}`, the job names `{}`; point [checkpoint] dir elsewhere or run with --reset",
            self.topic
        );
        anyhow::ensure!(
            offsets.len() == self.next.len(),
            "topic `{topic}` has {} partitions, the checkpoint {}: braid cannot yet re-split state over a changed partition count",
            self.next.len(),
            offsets.len()
        );
        self.next = offsets.clone();
        self.first = offsets.clone();
        self.end = end.clone();
        if let Some(b) = &mut self.backfill {
            match history {
                Some(position) => b.files.seek(position)?,
                None => b.done = true,
            }
        }
        self.finished = vec![false; self.next.len()];
        self.check_finished();
        if self.assigned {
            self.assign()?;
        }
        Ok(())
    }

    fn describe(&self, position: Position) -> String {
        let n = self.topic_partitions();
        match &self.backfill {
            Some(b) if position.file >= n => {
                let file = Position {
                    file: position.file - n,
                    line: position.line,
                };
                format!("{}:{}", b.files.path(file).display(), position.line)
            }
            _ => format!("{}[{}]@{}", self.topic, position.file, position.line),
        }
    }

    fn partitions(&self) -> u32 {
        self.topic_partitions() + u32::from(self.backfill.is_some())
    }

    fn partition_of(&self, position: Position) -> u32 {
        position.file.min(self.topic_partitions())
    }

    fn caught_up(&self, partition: u32) -> bool {
        self.caught_up
            .get(partition as usize)
            .copied()
            .unwrap_or(false)
    }

    fn finished(&self, partition: u32) -> bool {
        match self.finished.get(partition as usize) {
            Some(&f) => f,
            None => self.backfill.as_ref().is_some_and(|b| b.done),
        }
    }

    fn dormant(&self, partition: u32) -> bool {
        partition < self.topic_partitions() && self.reading_history()
    }

    /// A topic is; its history files are not (their events have no partition), so a
    /// source with `[source.backfill]` is joined as one partition.
    fn co_partitioned(&self) -> bool {
        self.backfill.is_none()
    }

    fn keeps(&self, partition: u32, time_ms: i64) -> bool {
        match &self.backfill {
            None => true,
            Some(b) if partition >= self.topic_partitions() => time_ms < b.until_ms,
            Some(b) => time_ms >= b.until_ms,
        }
    }

    fn topic(&self) -> Option<&str> {
        Some(&self.topic)
    }

    fn is_topic_partition(&self, partition: u32) -> bool {
        partition < self.topic_partitions()
    }

    fn owned(&self, partition: u32) -> bool {
        match self.owned.get(partition as usize) {
            Some(&owned) => owned,
            // The history files are read by every process that reads the topic.
            None => true,
        }
    }

    /// From the high watermark librdkafka keeps of its last fetch (no request to the
    /// broker); under `read_committed` it is the last stable offset.
    fn lag(&self, partition: u32) -> Option<i64> {
        let p = partition as usize;
        if !self.owned.get(p).copied().unwrap_or(false) || !self.assigned {
            return None;
        }
        // At its end, or at the last record there was (past transaction markers, which
        // `next` does not count): nothing left to read.
        if self.finished[p] || self.caught_up[p] {
            return Some(0);
        }
        let topic = std::ffi::CString::new(self.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer lives as long as `self.consumer`; librdkafka only
        // reads its cache under its own lock and writes the two offsets.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition as i32,
                &mut low,
                &mut high,
            )
        };
        let ok = err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
        (ok && high >= 0).then(|| (high - self.next[p]).max(0))
    }

    /// Of what this run reads up to `end`: not with history files (their share is not
    /// weighed against the topic's yet), nor for an unbounded topic.
    fn done_fraction(&self) -> Option<f64> {
        match (&self.end, &self.backfill) {
            (Some(end), None) => read_share(&self.first, &self.next, end, &self.owned),
            _ => None,
        }
    }
}

/// The share of the records between `first` and `end` that lies before `next`, over
/// the `owned` partitions (1 when there is nothing to read).
fn read_share(first: &[i64], next: &[i64], end: &[i64], owned: &[bool]) -> Option<f64> {
    let (mut done, mut total) = (0i64, 0i64);
    for p in (0..end.len()).filter(|&p| owned.get(p).copied().unwrap_or(false)) {
        let span = (end[p] - first[p]).max(0);
        total += span;
        done += (next[p] - first[p]).clamp(0, span);
    }
    Some(if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_share_weighs_owned_partitions_by_their_records() {
        // Partition 0: 100 to read, 50 read; partition 1: 300 to read, all read;
        // partition 2: another instance's.
        let share = read_share(
            &[0, 100, 0],
            &[50, 400, 0],
            &[100, 400, 1_000],
            &[true, true, false],
        );
        assert_eq!(share, Some(350.0 / 400.0));
        // Past the end (transaction markers) counts as the end; nothing to read is done.
        assert_eq!(read_share(&[0], &[120], &[100], &[true]), Some(1.0));
        assert_eq!(read_share(&[7], &[7], &[7], &[true]), Some(1.0));
    }
}
