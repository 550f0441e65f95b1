//! The Kafka side of the end-to-end tests: a noida-db broker on a loopback port (which
//! can be stopped and restarted on the same port and data), topics, a producer of
//! NDJSON lines co-partitioned by join key, `read_committed` readers and a watch on a
//! topic's offsets. `check` holds the exactness check of a job's output against the
//! independent reference join of `common`; `run` the job file and runs of the binary.
//!
//! noida-db comes from `BRAID_NOIDA_DB` (the `noida-db` executable), else from
//! `target/noida-venv`, which `cargo xtask setup` installs. Facts about it and rdkafka
//! that shape this file are in `docs/kafka-spike.md`: topics need `retention.ms = -1`
//! (the data's times are years old), consumers need a huge `receive.message.max.bytes`
//! (noida-db ignores fetch limits), and a crashed transactional producer keeps the
//! last stable offset down until its transactional id is initialised again. Found
//! since, measured with this harness:
//!
//! - noida-db keeps its state in memory and saves all of it to `kafka.json` about once
//!   a second and on SIGTERM: a SIGKILLed broker forgets its last second (see
//!   [`Broker::stop`]).
//! - A restart aborts the transactions open at that moment (an abort marker is
//!   written), but their producer is not fenced: it goes on in the same transaction,
//!   and its `commit_transaction` returns Ok. What it wrote before the restart is then
//!   lost, although the commit (and the offsets sent with it) succeeded; what it wrote
//!   after commits. A Kafka broker keeps open transactions across a restart. So no
//!   client can be exactly-once over a noida-db restart in the middle of a transaction
//!   (see `tests/kafka_broker_outage.rs`).
//! - A producer's metadata request creates a missing topic (one partition), as Kafka
//!   does with `auto.create.topics.enable`; a consumer's does not.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode as AdminCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

pub mod check;
pub mod run;

/// Timeout of one client call (metadata, watermarks, admin operations, flush).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to accept connections after it is started.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(10);
const BROKER_START_ATTEMPTS: usize = 3;
/// How long the broker may take to save its data and exit after SIGTERM (~15 s after
/// millions of records, docs/kafka-spike.md; well under a second with the tests' data).
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a bounded read of a topic may take (a few 10,000 records take < 1 s).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// noida-db ignores fetch limits and answers with whole partitions (docs/kafka-spike.md).
pub const RECEIVE_MESSAGE_MAX_BYTES: &str = "1000000000";

/// Partitions of every topic of the tests.
pub const PARTITIONS: i32 = 4;
pub const IMPRESSIONS: &str = "impressions";
pub const PLAYS: &str = "plays";
pub const OUT: &str = "out";
pub const OUT_LATE: &str = "out.late";
pub const OUT_DEAD: &str = "out.dead";
/// The window of the tests' left join, `within = ["0s", "1h"]`.
pub const WINDOW_MS: (i64, i64) = (0, 3_600_000);

/// Serialises the Kafka tests of one test binary: each runs a broker and braid, and on
/// two cores parallel ones would make each other's timing meaningless.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A noida-db broker (Kafka only) on a loopback port, with its data in a temporary
/// folder; killed when dropped.
pub struct Broker {
    exe: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    process: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free port; retries on another port if the one chosen was
    /// taken in between.
    pub fn start() -> Broker {
        let mut broker = Broker {
            exe: noida_exe(),
            dir: tempfile::tempdir().expect("temp dir for the broker"),
            port: 0,
            process: None,
        };
        for attempt in 1..=BROKER_START_ATTEMPTS {
            broker.port = free_port();
            if broker.spawn() {
                eprintln!("broker: {} (attempt {attempt})", broker.bootstrap());
                return broker;
            }
            eprintln!("broker did not start:\n{}", broker.log_text());
        }
        panic!("noida-db did not start in {BROKER_START_ATTEMPTS} attempts; see its log above");
    }

    /// `127.0.0.1:PORT`, the job files' `brokers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker as an outage does: SIGTERM, then waits until it has exited
    /// (SIGKILL after [`BROKER_STOP_TIMEOUT`]). Its data stays for [`Broker::restart`].
    ///
    /// Not SIGKILL: noida-db keeps its state in memory and saves all of it to
    /// `kafka.json` about once a second, so a SIGKILL loses the records, transaction
    /// commits and group offsets of the last second (measured: 1,000 records produced
    /// and read back, SIGKILL, restart: the topic was gone). A Kafka broker killed so
    /// loses nothing (its log is in the page cache); noida-db saves on SIGTERM.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + BROKER_STOP_TIMEOUT;
            while child.try_wait().expect("poll the broker").is_none() {
                if Instant::now() > deadline {
                    eprintln!(
                        "broker: still running {BROKER_STOP_TIMEOUT:?} after SIGTERM; SIGKILL"
                    );
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the broker with SIGKILL (what it wrote in its last second is lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and data ([`Broker::stop`] first if it
    /// runs).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "noida-db did not restart on port {}:\n{}",
            self.port,
            self.log_text()
        );
        eprintln!("broker: restarted on {}", self.bootstrap());
    }

    /// Where the broker keeps its data.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The broker's output so far (all its starts).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Starts the process and waits until the port accepts connections; false if the
    /// process ended first (a port taken, say).
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open the broker's log");
        let child = Command::new(&self.exe)
            .arg("start")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--host", "127.0.0.1", "--only", "kafka", "--kafka-port"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let child = self.process.insert(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        while started.elapsed() < BROKER_START_TIMEOUT {
            if child.try_wait().expect("poll the broker").is_some() {
                self.process = None;
                return false;
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "noida-db did not accept connections on {address} within {BROKER_START_TIMEOUT:?}:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Broker {
    /// SIGKILL, not SIGTERM: under load noida-db takes ~15 s to stop cleanly, and a
    /// test's broker has nothing worth keeping.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The noida-db executable: `BRAID_NOIDA_DB`, else the one in `target/noida-venv`.
fn noida_exe() -> PathBuf {
    if let Some(path) = std::env::var_os("BRAID_NOIDA_DB") {
        return PathBuf::from(path);
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/noida-venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path().join("site-packages/noida_db/noida-db"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "noida-db (the Kafka broker of the tests) is not installed under {}: run \
             `cargo xtask setup`, or set BRAID_NOIDA_DB to a noida-db executable",
            lib.display()
        )
    })
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
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
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Creates a topic that keeps its records forever; one that exists already is fine.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topic =
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)).set("retention.ms", "-1");
    let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
    let results = block_on(admin.create_topics([&topic], &options))
        .unwrap_or_else(|e| panic!("create topic {name} on {bootstrap}: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, AdminCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("create topic {topic} on {bootstrap}: {code:?}"),
        }
    }
}

/// Creates the five topics of the tests' jobs, [`PARTITIONS`] partitions each.
pub fn create_job_topics(bootstrap: &str) {
    for topic in [IMPRESSIONS, PLAYS, OUT, OUT_LATE, OUT_DEAD] {
        create_topic(bootstrap, topic, PARTITIONS);
    }
}

/// The Kafka key the tests give a line: its join key as a JSON array (`[42,"t7"]`), if
/// the line is a JSON object whose `profile_id` and `title_id` are strings or integers.
pub fn key_of(line: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let object = value.as_object()?;
    let mut parts = Vec::new();
    for field in ["profile_id", "title_id"] {
        match object.get(field)? {
            v @ Value::String(_) => parts.push(v.clone()),
            v @ Value::Number(n) if n.as_i64().is_some() => parts.push(v.clone()),
            _ => return None,
        }
    }
    Some(serde_json::to_string(&parts).expect("JSON array"))
}

/// The partition of a key: a stable hash (FNV-1a) of its text, the same for every
/// topic, so that topics with the same number of partitions are co-partitioned.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let partitions = u64::try_from(partitions).expect("a positive partition count");
    i32::try_from(hash % partitions).expect("below the partition count")
}

/// One record to produce.
pub struct Record<'a> {
    pub partition: i32,
    pub key: Option<String>,
    /// Milliseconds; the producer's clock when absent.
    pub timestamp: Option<i64>,
    pub value: &'a [u8],
}

impl Record<'_> {
    /// A line as the tests produce it: keyed by its join key and partitioned by the
    /// key's hash (keyless lines by `index`), timestamped with its integer `ts`.
    pub fn of_line(line: &[u8], index: usize, partitions: i32) -> Record<'_> {
        let key = key_of(line);
        let partition = match &key {
            Some(k) => partition_of(k, partitions),
            None => i32::try_from(index % usize::try_from(partitions).expect("positive"))
                .expect("below the partition count"),
        };
        let timestamp = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("ts").and_then(Value::as_i64));
        Record {
            partition,
            key,
            timestamp,
            value: line,
        }
    }
}

/// Produces each line as a record (see [`Record::of_line`]), in order.
pub fn produce_lines(bootstrap: &str, topic: &str, partitions: i32, lines: &[Vec<u8>]) {
    let records: Vec<Record> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| Record::of_line(line, i, partitions))
        .collect();
    produce(bootstrap, topic, &records);
}

/// Records the delivery errors that a plain producer would drop silently.
#[derive(Default)]
struct Deliveries {
    errors: Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if let Err((error, message)) = result {
            self.errors
                .lock()
                .expect("not poisoned")
                .push(format!("partition {}: {error}", message.partition()));
        }
    }
}

/// Produces the records (a plain producer, not transactional), waits until all are
/// delivered and panics on any delivery error.
pub fn produce(bootstrap: &str, topic: &str, records: &[Record]) {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "30000")
        .create_with_context(Deliveries::default())
        .expect("producer");
    for record in records {
        let mut base = BaseRecord::to(topic)
            .partition(record.partition)
            .payload(record.value);
        if let Some(key) = &record.key {
            base = base.key(key.as_bytes());
        }
        if let Some(ts) = record.timestamp {
            base = base.timestamp(ts);
        }
        let mut base = Some(base);
        while let Some(next) = base.take() {
            match producer.send(next) {
                Ok(()) => {}
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    producer.poll(Duration::from_millis(5));
                    base = Some(back);
                }
                Err((e, _)) => panic!("produce to {topic} on {bootstrap}: {e}"),
            }
        }
    }
    // Short polls first: rdkafka's flush polls in 100 ms slices that always run out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
    producer
        .flush(CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("flush to {topic} on {bootstrap}: {e}"));
    let errors = producer.context().errors.lock().expect("not poisoned");
    assert!(
        errors.is_empty(),
        "{} of {} records to {topic} failed, first: {}",
        errors.len(),
        records.len(),
        errors[0]
    );
}

/// The values of every committed record of `topic` (up to each partition's last stable
/// offset at the time of the call), sorted.
pub fn read_committed(bootstrap: &str, topic: &str) -> Vec<String> {
    to_strings(topic, read_values(bootstrap, topic, "read_committed"))
}

/// The committed records of `topic` readable now, sorted: as [`read_committed`], but
/// once no record has come for [`SETTLE`] the read ends short of the last stable offsets
/// (and says so). For a look right after a crash: noida-db's last stable offset can sit
/// above a killed producer's open transaction (braid has two: the epoch waiting for its
/// commit and the next), and no read reaches it until a new producer aborts them.
pub fn read_committed_now(bootstrap: &str, topic: &str) -> Vec<String> {
    to_strings(
        topic,
        read_values_settling(bootstrap, topic, "read_committed", Some(SETTLE)),
    )
}

/// How long [`read_committed_now`] waits for one more record.
const SETTLE: Duration = Duration::from_secs(3);

/// The values of every record of `topic`, committed or not (for debugging), sorted.
pub fn read_uncommitted(bootstrap: &str, topic: &str) -> Vec<String> {
    to_strings(topic, read_values(bootstrap, topic, "read_uncommitted"))
}

fn to_strings(topic: &str, values: Vec<Vec<u8>>) -> Vec<String> {
    let mut strings: Vec<String> = values
        .into_iter()
        .map(|v| {
            String::from_utf8(v).unwrap_or_else(|e| panic!("a record of {topic} is not UTF-8: {e}"))
        })
        .collect();
    strings.sort();
    strings
}

/// Reads every partition of `topic` from its beginning to the high watermark that
/// `fetch_watermarks` gives under `isolation` (with `read_committed` that is the last
/// stable offset). The end test is the consumer's position: the offset after the last
/// record can stay below the bound, behind transaction markers.
pub fn read_values(bootstrap: &str, topic: &str, isolation: &str) -> Vec<Vec<u8>> {
    read_values_settling(bootstrap, topic, isolation, None)
}

/// [`read_values`], ending early once no record has come for `settle`.
fn read_values_settling(
    bootstrap: &str,
    topic: &str,
    isolation: &str,
    settle: Option<Duration>,
) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "braid-tests-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("receive.message.max.bytes", RECEIVE_MESSAGE_MAX_BYTES)
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("metadata of {topic} on {bootstrap}: {e}"));
    let described = &metadata.topics()[0];
    assert!(
        described.error().is_none() && !described.partitions().is_empty(),
        "topic {topic} on {bootstrap}: {:?}",
        described.error()
    );
    let mut bounds = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in described.partitions() {
        let p = partition.id();
        let (low, high) = consumer
            .fetch_watermarks(topic, p, CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("watermarks of {topic}[{p}]: {e}"));
        if high > low {
            bounds.insert(p, high);
        }
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut values = Vec::new();
    let started = Instant::now();
    let mut last_record = Instant::now();
    let mut pending: HashSet<i32> = bounds.keys().copied().collect();
    while !pending.is_empty() {
        if settle.is_some_and(|s| last_record.elapsed() > s) {
            eprintln!(
                "reading {topic} ({isolation}): nothing for {settle:?}, partitions {pending:?} short of {bounds:?} after {} records (open transactions)",
                values.len()
            );
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            // Records past the bounds (or in a partition empty when they were taken)
            // came after the snapshot: not read.
            Some(Ok(m)) if bounds.get(&m.partition()).is_some_and(|&b| m.offset() < b) => {
                last_record = Instant::now();
                values.push(m.payload().unwrap_or_default().to_vec());
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            _ => {}
        }
        for e in consumer.position().expect("position").elements() {
            if let Offset::Offset(o) = e.offset() {
                if bounds.get(&e.partition()).is_some_and(|&b| o >= b) {
                    pending.remove(&e.partition());
                }
            }
        }
        assert!(
            started.elapsed() < READ_TIMEOUT,
            "reading {topic} ({isolation}) to {bounds:?} took over {READ_TIMEOUT:?}; \
             partitions {pending:?} unfinished after {} records",
            values.len()
        );
    }
    values
}

/// Watches how far a topic's records and its committed records reach: the sums over
/// its partitions of the high watermark and of the last stable offset. A transaction
/// in flight shows as the first above the second; a commit as the second growing.
pub struct OffsetWatch {
    topic: String,
    partitions: Vec<i32>,
    uncommitted: BaseConsumer,
    committed: BaseConsumer,
}

impl OffsetWatch {
    pub fn new(bootstrap: &str, topic: &str) -> OffsetWatch {
        let consumer = |isolation: &str| -> BaseConsumer {
            ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("isolation.level", isolation)
                .create()
                .expect("consumer")
        };
        let uncommitted = consumer("read_uncommitted");
        let metadata = uncommitted
            .fetch_metadata(Some(topic), CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("metadata of {topic} on {bootstrap}: {e}"));
        let partitions = metadata.topics()[0]
            .partitions()
            .iter()
            .map(rdkafka::metadata::MetadataPartition::id)
            .collect();
        OffsetWatch {
            topic: topic.to_string(),
            partitions,
            uncommitted,
            committed: consumer("read_committed"),
        }
    }

    /// `(high watermarks, last stable offsets)`, each summed over the partitions.
    pub fn ends(&self) -> (i64, i64) {
        let sum = |consumer: &BaseConsumer| -> i64 {
            self.partitions
                .iter()
                .map(|&p| {
                    consumer
                        .fetch_watermarks(&self.topic, p, CALL_TIMEOUT)
                        .unwrap_or_else(|e| panic!("watermarks of {}[{p}]: {e}", self.topic))
                        .1
                })
                .sum()
        };
        (sum(&self.uncommitted), sum(&self.committed))
    }
}
