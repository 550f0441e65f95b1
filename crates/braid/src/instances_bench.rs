//! `braid bench --workload instances --brokers HOST:PORT`: what sharing a job between
//! processes costs (issue 10), with `braid run --instance` child processes of this
//! binary on the take-rate job over Kafka.
//!
//! - **Throughput**: the same bounded job (the same filled topics, a fresh group each)
//!   run by one instance, then by two started one after the other (the second joins as
//!   soon as the first has its assignment). On one machine two instances share its
//!   cores; the difference is the cost of coordination: a rebalance, a revocation's
//!   commit, the restore.
//! - **Hand-over**: an unbounded job run by instance `a` until it has committed every
//!   input record; then `b` joins and the group moves half the partitions to it. From
//!   the instances' logs: revocation to `a`'s commit, revocation to `b` having restored
//!   the moved partitions (it consumes next), and the bytes of state moved. The
//!   checkpoint store is a local folder, or `--checkpoint-store s3://B/P` (with the
//!   `AWS_*` variables of `[checkpoint] dir`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use braid_io::takerate::{TakeRate, TakeRateConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::kafka_bench::{
    create_topics, delete_topics, fill, now_ms, round2, write_job, KafkaBenchOptions, Topics,
    PARTITIONS,
};

/// How long an instance may take to be assigned partitions, to finish, or to catch up.
const WAIT_MAX: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(100);

/// A `braid run JOB --instance NAME` child; killed when dropped.
struct Instance {
    child: Child,
    log: PathBuf,
}

impl Instance {
    fn start(job: &Path, name: &str, dir: &Path) -> anyhow::Result<Instance> {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(std::env::current_exe()?)
            .args([
                "run",
                &job.to_string_lossy(),
                "--instance",
                name,
                "-v",
                "--quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start an instance")?;
        Ok(Instance { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log line that holds `what`, waiting for it.
    fn wait_for_line(&mut self, what: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(what)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the instance ended ({status}) before `{what}`:\n{}",
                    self.log()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "no `{what}` within {WAIT_MAX:?}");
            std::thread::sleep(POLL);
        }
    }

    fn wait(&mut self) -> anyhow::Result<()> {
        let status = self.child.wait()?;
        anyhow::ensure!(
            status.success(),
            "an instance ended with {status}:\n{}",
            self.log()
        );
        Ok(())
    }

    /// SIGTERM, and the wait for its clean stop.
    fn stop(&mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs both measurements; returns the JSON result line.
///
/// With `fill_rate` (`--fill-rate N`), only the hand-over is measured, and the topics
/// are filled at N events/s while `a` reads them: noida-db answers a fetch with all it
/// holds past the offset, which at 10 M events already filled was 1.3 GB, past what a
/// consumer takes; read as they fill, fetches stay small.
pub fn instances(
    options: &KafkaBenchOptions,
    checkpoint_store: Option<&str>,
    fill_rate: Option<u64>,
) -> anyhow::Result<Value> {
    let prefix = format!("braid-bench-{}", now_ms());
    let topics = Topics::new(&prefix);
    let created = topics.all();
    create_topics(&options.brokers, &created)?;
    let config = TakeRateConfig {
        events: options.events,
        impressions_per_s: options.impressions_per_s,
        ..TakeRateConfig::default()
    };
    // Filled first, unless the hand-over's first instance reads as they fill.
    if fill_rate.is_none() {
        eprintln!(
            "braid bench instances: filling the topics with {} events",
            options.events
        );
        fill(
            &options.brokers,
            &topics,
            TakeRate::new(config.clone()),
            None,
        )?;
    }
    let dir = options.dir.join(&prefix);
    let job = |name: &str, bounded: bool| -> anyhow::Result<PathBuf> {
        let path = write_job(options, &topics, name, &dir.join(name), bounded)?;
        if let Some(store) = checkpoint_store {
            let text = std::fs::read_to_string(&path)?.replace(
                "dir = \"checkpoints\"",
                &format!("dir = \"{store}/{name}\""),
            );
            std::fs::write(&path, text)?;
        }
        Ok(path)
    };
    let mut throughput = Vec::new();
    for n in [1usize, 2].into_iter().filter(|_| fill_rate.is_none()) {
        eprintln!("braid bench instances: the bounded job on {n} instance(s)");
        let name = format!("{prefix}-on-{n}");
        let path = job(&name, true)?;
        let started = Instant::now();
        let mut running = Vec::new();
        for i in 0..n {
            let mut instance = Instance::start(&path, &format!("i{i}"), &dir.join(&name))?;
            instance.wait_for_line("the group assigns partitions")?;
            running.push(instance);
        }
        for instance in &mut running {
            instance.wait()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        throughput.push(json!({
            "instances": n,
            "seconds": round2(seconds),
            "events_per_s": (options.events as f64 / seconds).round(),
        }));
    }
    eprintln!("braid bench instances: hand-over of half the partitions");
    let name = format!("{prefix}-move");
    let path = job(&name, false)?;
    let mut a = Instance::start(&path, "a", &dir.join(&name))?;
    a.wait_for_line("the group assigns partitions")?;
    if let Some(rate) = fill_rate {
        eprintln!(
            "braid bench instances: filling the topics with {} events at {rate}/s while a reads",
            options.events
        );
        fill(&options.brokers, &topics, TakeRate::new(config), Some(rate))?;
    }
    let caught_up = Instant::now();
    wait_until_committed(&options.brokers, &name, &topics)?;
    eprintln!(
        "braid bench instances: a committed everything after {:.1} s; b joins",
        caught_up.elapsed().as_secs_f64()
    );
    let mut b = Instance::start(&path, "b", &dir.join(&name))?;
    let restored = b.wait_for_line("partitions restored")?;
    let revoked = a.wait_for_line("the group revokes")?;
    let committed = a.wait_for_line("revoked partitions committed")?;
    let restoring = b.log();
    let moved_bytes: u64 = restoring
        .lines()
        .filter(|l| l.contains("restoring partitions"))
        .filter_map(|l| field(l, "bytes"))
        .map(|b| b as u64)
        .sum();
    let at = |line: &str| -> anyhow::Result<i64> {
        let stamp = line.split_whitespace().next().unwrap_or_default();
        braid_io::parse_rfc3339_ms(stamp).map_err(|e| anyhow::anyhow!("log time `{stamp}`: {e}"))
    };
    let handover = json!({
        "moved_bytes": moved_bytes,
        "moved_mb": round2(moved_bytes as f64 / 1e6),
        "revoke_to_committed_ms": at(&committed)? - at(&revoked)?,
        "revoke_to_restored_ms": at(&restored)? - at(&revoked)?,
        "restore_ms": field(&restored, "restore_ms").map(f64::round),
    });
    b.stop()?;
    a.stop()?;
    delete_topics(&options.brokers, &created);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "workload": "instances",
        "brokers": options.brokers,
        "events": options.events,
        "parallelism": options.parallelism,
        "memory_max_mb": options.memory_max_bytes >> 20,
        "checkpoint_interval_ms": options.checkpoint_interval_ms,
        "checkpoint_store": checkpoint_store.unwrap_or("local folder"),
        "fill_rate": fill_rate,
        "impressions_per_s": options.impressions_per_s,
        "throughput": throughput,
        "handover": handover,
    }))
}

/// A `name=number` field of a log line.
fn field(line: &str, name: &str) -> Option<f64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let value: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    value.parse().ok()
}

/// Waits until group `group` has committed offsets at the end of every input partition.
fn wait_until_committed(brokers: &str, group: &str, topics: &Topics) -> anyhow::Result<()> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let mut behind = 0i64;
        let mut query = TopicPartitionList::new();
        for topic in [&topics.impressions, &topics.plays] {
            for p in 0..PARTITIONS {
                query.add_partition(topic, p);
            }
        }
        let committed = consumer.committed_offsets(query, Duration::from_secs(10))?;
        for e in committed.elements() {
            let (_, high) =
                consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            behind += (high - at).max(0);
        }
        if behind == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "group {group} is still {behind} records behind after {WAIT_MAX:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
