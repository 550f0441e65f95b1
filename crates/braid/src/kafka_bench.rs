//! `braid bench --workload kafka`: Kafka → join → Kafka on a broker the caller runs
//! (issue 9). Three measurements, each on fresh topics of its own (4 partitions,
//! co-partitioned by the join key, kept forever):
//!
//! - **ceiling**: one process consumes both input topics `read_committed` with braid's
//!   consumer settings and produces every record, wrapped as an output-sized record, in
//!   one transaction per checkpoint interval with the consumed offsets, as braid's
//!   output does; no join. Timed from the first poll to the last commit.
//! - **braid**: the take-rate job (left join within an hour) over the same topics,
//!   bounded at their ends (`end = "latest"`), run in process (`driver::run`); its
//!   events/s and the ratio to the ceiling.
//! - **latency**: braid runs live (a child `braid run`) while the bench appends events at
//!   a steady rate, each carrying its append time (`append_ms`); a `read_committed`
//!   consumer of the output takes, for each joined record, the time it became visible
//!   minus the newest append time in it. Only pairs are emitted within such a run (an
//!   unmatched impression waits an hour of event time), which is what the checkpoint
//!   interval bounds.
//!
//! Filling the input topics is not timed. docs/kafka-spike.md holds the facts about the
//! test broker (noida-db) that shape the settings here.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use braid_io::takerate::{TakeRate, TakeRateConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::driver::{run, RunOptions};
use crate::kafka::output::PRODUCER_DEFAULTS;
use crate::kafka::source::CONSUMER_DEFAULTS;

/// Partitions of every topic the bench creates.
pub(crate) const PARTITIONS: i32 = 4;
/// Timeout of one client call (metadata, admin, offsets, transactions).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A phase that sees no record for this long has stalled: the bench stops.
const STALL_MAX: Duration = Duration::from_secs(60);
/// noida-db ignores fetch limits and answers with whole partitions
/// (docs/kafka-spike.md): a smaller limit never finishes.
const RECEIVE_MESSAGE_MAX_BYTES: &str = "1000000000";
/// braid's consumer settings, and what this broker needs.
const CONSUMER_SETTINGS: &[&[(&str, &str)]] = &[
    CONSUMER_DEFAULTS,
    &[("receive.message.max.bytes", RECEIVE_MESSAGE_MAX_BYTES)],
];
/// braid's producer settings, and the `transaction.timeout.ms` braid's config gives a
/// 10 s interval.
const PRODUCER_SETTINGS: &[&[(&str, &str)]] =
    &[PRODUCER_DEFAULTS, &[("transaction.timeout.ms", "60000")]];
/// The fast producer that fills the input topics (not transactional, not timed).
const FILL_SETTINGS: &[(&str, &str)] = &[
    ("linger.ms", "5"),
    ("batch.num.messages", "10000"),
    ("queue.buffering.max.messages", "1000000"),
    ("queue.buffering.max.kbytes", "1048576"),
    ("message.timeout.ms", "60000"),
];
/// The field the latency run adds to every event: its append time, epoch ms.
const APPEND_FIELD: &[u8] = b"\"append_ms\":";
/// How long the latency run waits after the last append before stopping braid: two
/// checkpoint intervals commit everything appended.
const LIVE_DRAIN_INTERVALS: u32 = 2;

pub struct KafkaBenchOptions {
    pub brokers: String,
    /// Events of the throughput runs (both topics together).
    pub events: u64,
    pub parallelism: usize,
    pub memory_max_bytes: u64,
    pub checkpoint_interval_ms: i64,
    /// Scratch folder for the jobs' state and checkpoints.
    pub dir: std::path::PathBuf,
    /// The latency run's append rate, events/s, and length; 0 s skips it.
    pub live_rate: u64,
    pub live_seconds: u64,
    /// Impressions per second of event time in the generated input: with the job's
    /// one-hour window, what sets the size of the state.
    pub impressions_per_s: u64,
}

/// The five topics of one job: two inputs, the output and its side outputs.
pub(crate) struct Topics {
    pub(crate) impressions: String,
    pub(crate) plays: String,
    pub(crate) out: String,
}

impl Topics {
    pub(crate) fn new(prefix: &str) -> Topics {
        Topics {
            impressions: format!("{prefix}-impressions"),
            plays: format!("{prefix}-plays"),
            out: format!("{prefix}-out"),
        }
    }
    pub(crate) fn all(&self) -> Vec<String> {
        vec![
            self.impressions.clone(),
            self.plays.clone(),
            self.out.clone(),
            format!("{}.late", self.out),
            format!("{}.dead", self.out),
        ]
    }
}

/// Runs the three measurements; returns the JSON result line.
pub fn kafka(options: &KafkaBenchOptions) -> anyhow::Result<Value> {
    let run_id = now_ms();
    let prefix = format!("braid-bench-{run_id}");
    let topics = Topics::new(&prefix);
    let ceiling_out = format!("{prefix}-ceiling-out");
    let mut created = topics.all();
    created.push(ceiling_out.clone());
    create_topics(&options.brokers, &created)?;
    eprintln!(
        "braid bench kafka: filling {} and {} with {} events",
        topics.impressions, topics.plays, options.events
    );
    let config = TakeRateConfig {
        events: options.events,
        impressions_per_s: options.impressions_per_s,
        ..TakeRateConfig::default()
    };
    let fill_started = Instant::now();
    fill(&options.brokers, &topics, TakeRate::new(config), None)?;
    let fill_seconds = fill_started.elapsed().as_secs_f64();

    eprintln!("braid bench kafka: ceiling (consume, produce in transactions, no join)");
    let ceiling = ceiling(options, &topics, &ceiling_out, &format!("{prefix}-ceiling"))?;
    eprintln!("braid bench kafka: braid (the take-rate join)");
    let dir = options.dir.join(&prefix);
    let job = write_job(options, &topics, &format!("{prefix}-join"), &dir, true)?;
    let plan = crate::config::load(&job)?;
    // Timed here, not by the summary: the run's end (the last transaction's commit) too.
    let (braid_started, braid_cpu) = (Instant::now(), cpu_seconds());
    let summary = run(
        &plan,
        &RunOptions {
            progress: false,
            reset: false,
            ..Default::default()
        },
    )?;
    let braid_seconds = braid_started.elapsed().as_secs_f64();
    let braid_cores = (cpu_seconds() - braid_cpu) / braid_seconds;
    summary.check().map_err(anyhow::Error::msg)?;
    let events = summary.input();
    anyhow::ensure!(
        events == options.events,
        "braid read {events} of the {} events",
        options.events
    );
    let braid_rate = events as f64 / braid_seconds;
    // Counted by the join: reading them back takes this broker minutes.
    let output_records = summary.join.pairs + summary.join.unmatched_emitted.iter().sum::<u64>();
    delete_topics(&options.brokers, &created);

    let latency = if options.live_seconds > 0 {
        eprintln!(
            "braid bench kafka: latency ({} events/s for {} s, braid live)",
            options.live_rate, options.live_seconds
        );
        Some(live(options, &format!("{prefix}-live"))?)
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "workload": "kafka",
        "brokers": options.brokers,
        "parallelism": options.parallelism,
        "memory_max_mb": options.memory_max_bytes >> 20,
        "checkpoint_interval_ms": options.checkpoint_interval_ms,
        "events": events,
        "fill_events_per_s": (events as f64 / fill_seconds).round(),
        "events_per_s": braid_rate.round(),
        "seconds": round2(braid_seconds),
        "summary_seconds": round2(summary.seconds),
        "cores": round2(braid_cores),
        "pairs": summary.join.pairs,
        "output_records": output_records,
        "ceiling_events_per_s": ceiling.events_per_s.round(),
        "ceiling_seconds": round2(ceiling.seconds),
        "ceiling_cores": round2(ceiling.cores),
        "ratio_to_ceiling": round2(braid_rate / ceiling.events_per_s),
        "latency": latency,
    }))
}

/// CPU time this process has used so far (all threads, user and system), seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed value passed.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The current time, epoch milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Drives a future to completion on this thread: the AdminClient has its own polling
/// thread, so its futures need no runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = TaskContext::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .with_context(|| format!("cannot create a Kafka admin client for {brokers}"))
}

/// Creates the topics, [`PARTITIONS`] each, kept forever (the data's times are years
/// old).
pub(crate) fn create_topics(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let admin = admin(brokers)?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)).set("retention.ms", "-1"))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
    let results = block_on(admin.create_topics(&topics, &options))
        .with_context(|| format!("cannot create topics at {brokers}; is the broker up?"))?;
    for result in results {
        if let Err((topic, code)) = result {
            anyhow::bail!("cannot create topic {topic} at {brokers}: {code:?}");
        }
    }
    Ok(())
}

/// Deletes the topics, so that the broker can free their records; best effort.
pub(crate) fn delete_topics(brokers: &str, names: &[String]) {
    let Ok(admin) = admin(brokers) else { return };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
    if let Err(e) = block_on(admin.delete_topics(&names, &options)) {
        tracing::warn!("cannot delete the bench's topics: {e}");
    }
}

/// A record's Kafka key (its join key as a JSON array, as braid's output writes it),
/// partition (a stable hash of the key, the same for both topics) and event time;
/// a malformed line gets no key and partition `index % PARTITIONS`.
fn placement(line: &[u8], index: u64) -> (Option<String>, i32, Option<i64>) {
    let value: Option<Value> = serde_json::from_slice(line).ok();
    let object = value.as_ref().and_then(Value::as_object);
    let key = object.and_then(|o| {
        let parts = [o.get("profile_id")?, o.get("title_id")?];
        parts
            .iter()
            .all(|v| v.is_i64() || v.is_string())
            .then(|| serde_json::to_string(&parts).expect("a JSON array"))
    });
    let time = object.and_then(|o| match o.get("ts")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => braid_io::parse_rfc3339_ms(s).ok(),
        _ => None,
    });
    let partition = match &key {
        // FNV-1a: stable across runs and processes.
        Some(k) => {
            let hash = k.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            (hash % PARTITIONS as u64) as i32
        }
        None => (index % PARTITIONS as u64) as i32,
    };
    (key, partition, time)
}

fn fill_producer(brokers: &str) -> anyhow::Result<BaseProducer> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in FILL_SETTINGS {
        config.set(*k, *v);
    }
    config
        .create()
        .with_context(|| format!("cannot create a Kafka producer for {brokers}"))
}

/// Sends one record, waiting for room in the producer's queue.
fn send(producer: &BaseProducer, mut record: BaseRecord<'_, [u8], [u8]>) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(1));
                record = back;
            }
            Err((e, _)) => anyhow::bail!("cannot produce to Kafka: {e}"),
        }
    }
}

/// Waits until every record sent is delivered; fails if any delivery failed.
fn drain(producer: &BaseProducer) -> anyhow::Result<()> {
    // Short polls: rdkafka's flush polls in 100 ms slices that always run out.
    let deadline = Instant::now() + STALL_MAX;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
    producer
        .flush(CALL_TIMEOUT)
        .context("the broker did not take every record")
}

/// Produces the take-rate lines into the two input topics, record time = event time;
/// at most `rate` events/s when given.
pub(crate) fn fill(
    brokers: &str,
    topics: &Topics,
    lines: TakeRate,
    rate: Option<u64>,
) -> anyhow::Result<()> {
    let producer = fill_producer(brokers)?;
    let started = Instant::now();
    for (i, (stream, line)) in lines.enumerate() {
        if let (Some(rate), true) = (rate, i % 1024 == 0) {
            let due = Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let topic = match stream {
            braid_io::takerate::Stream::Impressions => &topics.impressions,
            braid_io::takerate::Stream::Plays => &topics.plays,
        };
        let (key, partition, time) = placement(&line, i as u64);
        let mut record = BaseRecord::to(topic)
            .partition(partition)
            .payload(&line[..]);
        if let Some(k) = &key {
            record = record.key(k.as_bytes());
        }
        if let Some(t) = time {
            record = record.timestamp(t);
        }
        send(&producer, record)?;
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    drain(&producer)
}

/// A consumer with braid's settings, then `extra`.
fn consumer(brokers: &str, group: &str, extra: &[(&str, &str)]) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group);
    for (k, v) in CONSUMER_SETTINGS.iter().copied().flatten().chain(extra) {
        config.set(*k, *v);
    }
    config
        .create()
        .with_context(|| format!("cannot create a Kafka consumer for {brokers}"))
}

/// Assigns every partition of `topics` from its beginning; returns the committed
/// records to read (the inputs are not transactional: offsets are records).
fn assign_all(consumer: &BaseConsumer, topics: &[&str]) -> anyhow::Result<u64> {
    let mut list = TopicPartitionList::new();
    let mut records = 0;
    for topic in topics {
        for p in 0..PARTITIONS {
            let (low, high) = consumer.fetch_watermarks(topic, p, CALL_TIMEOUT)?;
            records += (high - low).max(0) as u64;
            list.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    consumer.assign(&list)?;
    Ok(records)
}

struct Ceiling {
    events_per_s: f64,
    seconds: f64,
    /// CPU used by the ceiling's process per second, in cores.
    cores: f64,
}

/// The ceiling: consume both inputs and produce every record (wrapped as braid wraps an
/// unmatched impression) in one transaction per interval, with the consumed offsets.
fn ceiling(
    options: &KafkaBenchOptions,
    topics: &Topics,
    out: &str,
    group: &str,
) -> anyhow::Result<Ceiling> {
    // Timed from here, as braid's run is: connecting and starting transactions count.
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let consumer = consumer(&options.brokers, group, &[])?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("transactional.id", group);
    for (k, v) in PRODUCER_SETTINGS.iter().copied().flatten() {
        config.set(*k, *v);
    }
    let producer: BaseProducer = config.create()?;
    producer.init_transactions(CALL_TIMEOUT)?;
    let inputs = [topics.impressions.as_str(), topics.plays.as_str()];
    let interval = Duration::from_millis(options.checkpoint_interval_ms as u64);
    let total = assign_all(&consumer, &inputs)?;
    producer.begin_transaction()?;
    let mut epoch_started = Instant::now();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let (mut n, mut last, mut value) = (0u64, Instant::now(), Vec::new());
    while n < total {
        anyhow::ensure!(last.elapsed() < STALL_MAX, "the ceiling's consumer stalled");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
            last = Instant::now();
            value.clear();
            value.extend_from_slice(br#"{"impressions":"#);
            value.extend_from_slice(m.payload().unwrap_or_default());
            value.extend_from_slice(br#","plays":null}"#);
            let mut record = BaseRecord::to(out).payload(&value[..]);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            send(&producer, record)?;
            next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            n += 1;
            if n % 1024 == 0 {
                producer.poll(Duration::ZERO);
            }
        }
        if epoch_started.elapsed() >= interval || n == total {
            commit_epoch(&producer, &consumer, &next)?;
            if n < total {
                producer.begin_transaction()?;
            }
            epoch_started = Instant::now();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Ceiling {
        events_per_s: n as f64 / seconds,
        seconds,
        cores: (cpu_seconds() - cpu) / seconds,
    })
}

/// Sends the consumed offsets into the transaction, drains and commits it.
fn commit_epoch(
    producer: &BaseProducer,
    consumer: &BaseConsumer,
    next: &HashMap<(String, i32), i64>,
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    for ((topic, p), offset) in next {
        list.add_partition_offset(topic, *p, Offset::Offset(*offset))?;
    }
    let metadata = consumer
        .group_metadata()
        .context("no group metadata for the ceiling's consumer")?;
    producer.send_offsets_to_transaction(&list, &metadata, CALL_TIMEOUT)?;
    drain(producer)?;
    producer.commit_transaction(CALL_TIMEOUT)?;
    Ok(())
}

/// Writes the take-rate job over `topics` to `dir/job.toml`: bounded at the topics'
/// ends (throughput) or live.
pub(crate) fn write_job(
    options: &KafkaBenchOptions,
    topics: &Topics,
    name: &str,
    dir: &Path,
    bounded: bool,
) -> anyhow::Result<std::path::PathBuf> {
    let source = |source: &str, topic: &str| {
        format!(
            r#"[[source]]
name = "{source}"
kind = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{name}"
start = "earliest"
{end}format = "ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"
[source.properties]
"receive.message.max.bytes" = "{RECEIVE_MESSAGE_MAX_BYTES}"

"#,
            brokers = options.brokers,
            end = if bounded { "end = \"latest\"\n" } else { "" },
        )
    };
    let text = format!(
        r#"name = "{name}"
parallelism = {parallelism}

{impressions}{plays}[join]
left = "impressions"
right = "plays"
type = "left"
within = ["0s", "1h"]

[time]
max_out_of_orderness = "5s"

[output]
kind = "kafka"
brokers = "{brokers}"
topic = "{out}"

[state]
dir = "state"
memory_max = "{memory_mb}MiB"

[checkpoint]
dir = "checkpoints"
interval = "{interval}ms"
"#,
        parallelism = options.parallelism,
        impressions = source("impressions", &topics.impressions),
        plays = source("plays", &topics.plays),
        brokers = options.brokers,
        out = topics.out,
        memory_mb = options.memory_max_bytes >> 20,
        interval = options.checkpoint_interval_ms,
    );
    std::fs::create_dir_all(dir)?;
    let job = dir.join(format!("{name}.toml"));
    std::fs::write(&job, text)?;
    Ok(job)
}

/// The newest `append_ms` in a joined record (its newest input's append time).
fn newest_append_ms(record: &[u8]) -> Option<i64> {
    let mut newest = None;
    let mut rest = record;
    while let Some(at) = rest
        .windows(APPEND_FIELD.len())
        .position(|w| w == APPEND_FIELD)
    {
        rest = &rest[at + APPEND_FIELD.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let ms: Option<i64> = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|s| s.parse().ok());
        newest = newest.max(ms);
    }
    newest
}

/// The latency run: braid live, events appended at a steady rate, the output read
/// `read_committed` as it is committed.
fn live(options: &KafkaBenchOptions, prefix: &str) -> anyhow::Result<Value> {
    let topics = Topics::new(prefix);
    create_topics(&options.brokers, &topics.all())?;
    let dir = options.dir.join(prefix);
    let job = write_job(options, &topics, prefix, &dir, false)?;
    let braid = std::env::current_exe().context("cannot find the braid binary")?;
    let log = std::fs::File::create(dir.join("braid.log"))?;
    let mut child = std::process::Command::new(braid)
        .args(["run", "--quiet"])
        .arg(&job)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start braid run")?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, out, stop) = (options.brokers.clone(), topics.out.clone(), stop.clone());
        std::thread::spawn(move || read_latencies(&brokers, &out, &stop))
    };
    // braid connects and assigns its partitions before the first append.
    std::thread::sleep(Duration::from_secs(2));
    let appended = append_live(options, &topics);
    if appended.is_ok() {
        std::thread::sleep(
            Duration::from_millis(options.checkpoint_interval_ms as u64) * LIVE_DRAIN_INTERVALS
                + Duration::from_secs(2),
        );
    }
    stop.store(true, Ordering::Relaxed);
    // SAFETY: kill(2) on the child's pid, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait()?;
    let latencies = reader.join().expect("the latency reader does not panic");
    let appended = appended?;
    anyhow::ensure!(
        status.success(),
        "the live braid run failed ({status}); see {}",
        dir.join("braid.log").display()
    );
    let mut latencies = latencies?;
    delete_topics(&options.brokers, &topics.all());
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    Ok(json!({
        "rate_events_per_s": options.live_rate,
        "appended": appended.events,
        "append_seconds": round2(appended.seconds),
        "records_seen": latencies.len(),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": latencies.last(),
    }))
}

struct Appended {
    events: u64,
    seconds: f64,
}

/// Appends `live_rate × live_seconds` take-rate events at a steady rate, each with its
/// append time in `append_ms` (and as its record time).
fn append_live(options: &KafkaBenchOptions, topics: &Topics) -> anyhow::Result<Appended> {
    let producer = fill_producer(&options.brokers)?;
    let events = options.live_rate * options.live_seconds;
    let config = TakeRateConfig {
        events,
        ..TakeRateConfig::default()
    };
    let started = Instant::now();
    let mut line = Vec::new();
    for (i, (stream, generated)) in TakeRate::new(config).enumerate() {
        let due = Duration::from_secs_f64(i as f64 / options.live_rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let topic = match stream {
            braid_io::takerate::Stream::Impressions => &topics.impressions,
            braid_io::takerate::Stream::Plays => &topics.plays,
        };
        let (key, partition, _) = placement(&generated, i as u64);
        let now = now_ms();
        line.clear();
        line.extend_from_slice(&generated);
        // A JSON object gets its append time as its last field; a malformed line stays.
        if key.is_some() && line.last() == Some(&b'}') {
            line.pop();
            line.push(b',');
            line.extend_from_slice(APPEND_FIELD);
            line.extend_from_slice(now.to_string().as_bytes());
            line.push(b'}');
        }
        let mut record = BaseRecord::to(topic)
            .partition(partition)
            .payload(&line[..])
            .timestamp(now);
        if let Some(k) = &key {
            record = record.key(k.as_bytes());
        }
        send(&producer, record)?;
        producer.poll(Duration::ZERO);
    }
    drain(&producer)?;
    Ok(Appended {
        events,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads the output `read_committed` until `stop`; per record, the time it became
/// visible here minus its newest input's append time, ms.
fn read_latencies(brokers: &str, topic: &str, stop: &AtomicBool) -> anyhow::Result<Vec<i64>> {
    // Short fetch waits, so that a record is seen soon after its commit.
    let consumer = consumer(
        brokers,
        &format!("{topic}-latency"),
        &[("fetch.wait.max.ms", "10")],
    )?;
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
            if let Some(appended) = m.payload().and_then(newest_append_ms) {
                latencies.push(now_ms() - appended);
            }
        }
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_append_time_of_a_joined_record() {
        let pair = br#"{"impressions":{"a":1,"append_ms":100},"plays":{"b":2,"append_ms":250}}"#;
        assert_eq!(newest_append_ms(pair), Some(250));
        assert_eq!(newest_append_ms(br#"{"impressions":{"a":1}}"#), None);
    }

    #[test]
    fn both_topics_place_a_key_alike() {
        let impression = br#"{"event_id":"i","profile_id":7,"title_id":3,"ts":1700000000000}"#;
        let play = br#"{"event_id":"p","profile_id":7,"title_id":3,"ts":"2023-11-14T22:13:21Z"}"#;
        let (k1, p1, t1) = placement(impression, 0);
        let (k2, p2, t2) = placement(play, 1);
        assert_eq!(k1.as_deref(), Some("[7,3]"));
        assert_eq!((k1, p1), (k2, p2));
        assert_eq!((t1, t2), (Some(1_700_000_000_000), Some(1_700_000_001_000)));
        assert_eq!(placement(b"[1,2,3]", 6), (None, 2, None));
    }
}
