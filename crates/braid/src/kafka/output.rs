//! Kafka output, exactly once: one transaction per checkpoint epoch, committed with the
//! sources' offsets after the epoch's manifest is written (DESIGN "Checkpoints and
//! exactly-once").
//!
//! Records written after barrier `E-1` and before barrier `E` belong to epoch `E`. Two
//! transactional producers take turns, `E` on producer `E % 2`: while epoch `E` waits for
//! its checkpoint to be written (images, uploads, manifest), the shards and the reader
//! already write epoch `E + 1` into the other producer's transaction. There is at most
//! one epoch in flight, so two suffice. When manifest `E` is written, the committer
//! drains producer `E % 2`, sends the sources' offsets at barrier `E` into its
//! transaction, tagged `braid epoch E`, and commits: that commit is the commit point.
//! On restart, the epoch in the group's committed offsets names the checkpoint to
//! restore; a manifest newer than it was never committed and is not used.
//!
//! The transactional ids are `braid.<job>.0` and `.1`, stable per job: a restarted
//! process fences its predecessor and aborts its open transactions when it calls
//! `init_transactions`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use braid_core::{key_parts, JoinSink, KeyPart, Side};
use braid_io::PendingFile;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::source::group_consumer;
use super::{client_config, Context, BROKER_OUTAGE_MAX, REQUEST_TIMEOUT};
use crate::checkpoint::{Manifest, SinkState, SourceAt};
use crate::config::{Input, KafkaOutputPlan, KafkaSourcePlan, Plan};
use crate::engine::ResultSink;
use crate::results::RecordShape;

/// What braid writes into the offsets it commits: the epoch whose transaction they
/// belong to.
const EPOCH_TAG: &str = "braid epoch ";
/// Why a producer was fenced.
const FENCED: &str = "another braid process took over this job's transactional ids: only one process may run a job, and with --instance only one per instance name";
/// The error of a producer fenced by another process with its transactional id.
#[derive(Debug)]
pub struct Fenced(String);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fenced {}

/// Why a send cannot go on once the producer has failed for good: [`Fenced`] when another
/// process took its transactional id.
fn send_failed(topic: &str, code: RDKafkaErrorCode, reason: String) -> anyhow::Error {
    if code == RDKafkaErrorCode::Fenced {
        return anyhow::Error::new(Fenced(format!(
            "cannot send to Kafka topic `{topic}`: {FENCED} ({reason})"
        )));
    }
    anyhow::anyhow!(
        "cannot send to Kafka topic `{topic}`: the producer failed ({code:?}: {reason}); the job stops, and the next `braid run` resumes from the last committed checkpoint"
    )
}

/// Between the epoch and the instance's name in a tag.
const INSTANCE_TAG: &str = " of ";
/// Bounds librdkafka's queue of records waiting to be sent (the default is 1 GiB).
const PRODUCER_QUEUE_KBYTES: &str = "65536";
/// How long a send waits for room in that queue before trying again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(1);

/// braid's producer settings; `[output.properties]` override them.
pub(crate) const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "20"),
    ("batch.num.messages", "10000"),
    ("batch.size", "1000000"),
    ("queue.buffering.max.kbytes", PRODUCER_QUEUE_KBYTES),
    // The partitioner of Kafka's Java client: equal keys, same partition, whoever writes.
    ("partitioner", "murmur2_random"),
];

/// A producer's context: logs like every client, and keeps the first failed delivery
/// (librdkafka reports it only there; a commit would fail later anyway).
#[derive(Default)]
struct OutputContext {
    inner: Context,
    failed: Mutex<Option<String>>,
}

impl ClientContext for OutputContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.inner.log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.inner.error(error, reason);
    }
}

impl ProducerContext for OutputContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut failed = self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            failed.get_or_insert_with(|| e.to_string());
        }
    }
}

type OutputProducer = ThreadedProducer<OutputContext>;

/// A consumer group and the topics whose offsets braid commits in it, in each
/// transaction.
struct Group {
    topics: Vec<String>,
    group: String,
    metadata: Arc<ConsumerGroupMetadata>,
}

pub struct KafkaOutput {
    plan: KafkaOutputPlan,
    producers: [OutputProducer; 2],
    groups: Vec<Group>,
    /// `--instance`: its name (in the epoch tag) and the partitions whose offsets it
    /// commits (those the group assigned it).
    instance: Option<String>,
    owned: Option<Arc<Vec<u32>>>,
}

impl KafkaOutput {
    /// Connects both producers, fences any predecessor (aborting its open
    /// transactions) and begins the transaction of `first_epoch`.
    pub fn open(
        plan: &Plan,
        output: &KafkaOutputPlan,
        first_epoch: u64,
        owned: Option<Arc<Vec<u32>>>,
        member: Option<Arc<ConsumerGroupMetadata>>,
    ) -> anyhow::Result<Arc<KafkaOutput>> {
        let producer = |parity: u64| -> anyhow::Result<OutputProducer> {
            // An instance's producers are its own: a restarted instance fences its
            // predecessor of the same name.
            let id = match &plan.instance {
                Some(name) => format!("braid.{}.{name}.{parity}", plan.name),
                None => format!("braid.{}.{parity}", plan.name),
            };
            let producer: OutputProducer =
                client_config(&output.brokers, PRODUCER_DEFAULTS, &output.properties)
                    .set("transactional.id", &id)
                    .create_with_context(OutputContext::default())
                    .with_context(|| {
                        format!(
                            "[output]: cannot create a Kafka producer for {}",
                            output.brokers
                        )
                    })?;
            Ok(producer)
        };
        let producers = [producer(0)?, producer(1)?];
        // Topics are checked by a consumer: a producer's metadata request may create a
        // missing topic on a broker that allows it, and braid never creates topics.
        let checker: BaseConsumer<Context> =
            client_config(&output.brokers, &[], &output.properties)
                .create_with_context(Context::default())
                .with_context(|| {
                    format!(
                        "[output]: cannot create a Kafka client for {}",
                        output.brokers
                    )
                })?;
        for topic in [&output.topic, &output.late_topic, &output.dead_topic] {
            check_topic(&checker, &output.brokers, topic)?;
        }
        // Each `init_transactions` waits on the broker (finding the coordinator,
        // fencing, aborting): the two wait together.
        std::thread::scope(|scope| {
            let other = scope.spawn(|| init(&producers[1], &output.brokers));
            let first = init(&producers[0], &output.brokers);
            let other = other
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("init_transactions panicked")));
            first.and(other)
        })?;
        let mut groups: Vec<Group> = Vec::new();
        for source in &plan.sources {
            if let Input::Kafka(k) = &source.input {
                if let Some(g) = groups.iter_mut().find(|g| g.group == k.group) {
                    g.topics.push(k.topic.clone());
                    continue;
                }
                // An instance commits in its membership's group as the member of the
                // current generation: a broker that checks it (KIP-447) refuses a
                // zombie's offsets after a rebalance.
                let metadata = match (&member, plan.kafka_group()) {
                    (Some(m), Some(first)) if first.group == k.group => Arc::clone(m),
                    _ => {
                        let consumer = group_consumer(&source.name, k)?;
                        Arc::new(consumer.group_metadata().with_context(|| {
                            format!(
                                "source `{}`: no group metadata for group `{}`",
                                source.name, k.group
                            )
                        })?)
                    }
                };
                groups.push(Group {
                    topics: vec![k.topic.clone()],
                    group: k.group.clone(),
                    metadata,
                });
            }
        }
        let out = Arc::new(KafkaOutput {
            plan: output.clone(),
            producers,
            groups,
            instance: plan.instance.clone(),
            owned,
        });
        out.begin(first_epoch)?;
        Ok(out)
    }

    fn producer(&self, epoch: u64) -> &OutputProducer {
        &self.producers[(epoch % 2) as usize]
    }

    /// Begins the transaction of `epoch` (the previous one on its producer, `epoch - 2`,
    /// is committed: one epoch is in flight at most).
    pub fn begin(&self, epoch: u64) -> anyhow::Result<()> {
        self.producer(epoch)
            .begin_transaction()
            .with_context(|| format!("cannot begin the Kafka transaction of epoch {epoch}"))
    }

    /// Queues one record into epoch `epoch`'s transaction.
    pub fn send(
        &self,
        epoch: u64,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
    ) -> anyhow::Result<()> {
        let producer = self.producer(epoch);
        let mut record = BaseRecord::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                // A fenced (or otherwise failed) producer never empties its queue:
                // waiting for room would wait for ever.
                Err((e, back)) => match producer.client().fatal_error() {
                    Some((code, reason)) => return Err(send_failed(topic, code, reason)),
                    None if matches!(
                        e,
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                    ) =>
                    {
                        record = back;
                        std::thread::sleep(QUEUE_FULL_WAIT);
                    }
                    None => anyhow::bail!("cannot send to Kafka topic `{topic}`: {e}"),
                },
            }
        }
    }

    pub fn topics(&self) -> &KafkaOutputPlan {
        &self.plan
    }

    /// Commits epoch `manifest.epoch`: its records, and the sources' offsets at its
    /// barrier, tagged with the epoch. Called by the committer once the manifest is
    /// written.
    pub fn commit(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let epoch = manifest.epoch;
        let producer = self.producer(epoch);
        let deadline = Instant::now() + BROKER_OUTAGE_MAX;
        // Drained first: rdkafka's flush inside the commit polls in 100 ms slices.
        while producer.in_flight_count() > 0 {
            // A fenced producer's records never leave: say so now, not after the
            // deadline (the instance that fenced it waits for this one to stop).
            match producer.client().fatal_error() {
                Some((RDKafkaErrorCode::Fenced, reason)) => {
                    return Err(anyhow::Error::new(Fenced(format!(
                        "epoch {epoch}: cannot commit: {FENCED} ({reason})"
                    ))))
                }
                Some((code, reason)) => anyhow::bail!(
                    "epoch {epoch}: the Kafka producer failed ({code:?}: {reason}); the job stops, and the next `braid run` resumes from the last committed checkpoint"
                ),
                None => {}
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "epoch {epoch}: Kafka at {} did not take the records within {} s; the job stops, and the next `braid run` resumes from the last committed checkpoint",
                    self.plan.brokers,
                    BROKER_OUTAGE_MAX.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(e) = producer
            .context()
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            anyhow::bail!("epoch {epoch}: a record was not delivered to Kafka ({e}); its transaction cannot commit");
        }
        for group in &self.groups {
            let mut list = TopicPartitionList::new();
            for topic in &group.topics {
                let Some(offsets) = manifest.reader.sources.iter().find_map(|s| match &s.at {
                    SourceAt::Kafka {
                        topic: t, offsets, ..
                    } if t == topic => Some(offsets),
                    _ => None,
                }) else {
                    anyhow::bail!(
                        "epoch {epoch}: the checkpoint has no offsets of topic `{topic}`"
                    );
                };
                let tag = Tag {
                    epoch,
                    instance: self.instance.clone(),
                }
                .to_string();
                for (p, &offset) in offsets.iter().enumerate() {
                    if self
                        .owned
                        .as_ref()
                        .is_some_and(|o| !o.contains(&(p as u32)))
                    {
                        continue;
                    }
                    let mut e = list.add_partition(topic, p as i32);
                    e.set_offset(Offset::Offset(offset))?;
                    e.set_metadata(tag.clone());
                }
            }
            retry(
                deadline,
                &self.plan.brokers,
                "send the offsets of the transaction",
                || producer.send_offsets_to_transaction(&list, &group.metadata, REQUEST_TIMEOUT),
            )
            .with_context(|| format!("epoch {epoch}: group `{}`", group.group))?;
        }
        retry(
            deadline,
            &self.plan.brokers,
            "commit the transaction",
            || producer.commit_transaction(REQUEST_TIMEOUT),
        )
        .with_context(|| format!("epoch {epoch}"))
    }
}

/// Retries a transactional call while its error is retriable and time is left.
fn retry(
    deadline: Instant,
    brokers: &str,
    what: &str,
    mut call: impl FnMut() -> Result<(), KafkaError>,
) -> anyhow::Result<()> {
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                tracing::warn!("cannot {what} yet, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(KafkaError::Transaction(e)) if e.is_fatal() && e.code() == RDKafkaErrorCode::Fenced => {
                return Err(anyhow::Error::new(Fenced(format!("cannot {what}: {FENCED} ({e})"))))
            }
            Err(e) => anyhow::bail!(
                "cannot {what} at {brokers}: {e}; the job stops, and the next `braid run` resumes from the last committed checkpoint"
            ),
        }
    }
}

/// `init_transactions`, with errors that say what to do.
fn init(producer: &OutputProducer, brokers: &str) -> anyhow::Result<()> {
    producer.init_transactions(REQUEST_TIMEOUT).map_err(|e| {
        anyhow::anyhow!(
            "[output]: cannot start Kafka transactions at {brokers}: {e} (is the broker up, and does it allow the job's transaction.timeout.ms?)"
        )
    })
}

fn check_topic(client: &BaseConsumer<Context>, brokers: &str, topic: &str) -> anyhow::Result<()> {
    let metadata = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| {
        anyhow::anyhow!(
            "[output]: cannot reach Kafka at {brokers} (no metadata within {} s: {e}); check `brokers` and that the broker is up",
            REQUEST_TIMEOUT.as_secs()
        )
    })?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
        _ => anyhow::bail!(
            "[output]: topic `{topic}` does not exist at {brokers}; braid does not create topics: create it first"
        ),
    }
}

/// What the group's committed offsets say about the last committed epoch.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// Nothing was ever committed: a fresh start.
    Nothing,
    Epoch(u64),
}

/// Reads the epoch tagged on the committed offsets of the job's Kafka sources, asking
/// for every source at once (each look-up finds the group's coordinator first); every
/// source must agree.
pub fn committed_epoch(plan: &Plan) -> anyhow::Result<Committed> {
    let answers = ask_every_source(plan, &|name, k| source_epoch(name, k));
    let mut found: Option<Committed> = None;
    for this in answers {
        let this = this?;
        match &found {
            None => found = Some(this),
            Some(f) if *f == this => {}
            Some(f) => anyhow::bail!(
                "the sources' groups disagree on the last committed epoch ({f:?} and {this:?})"
            ),
        }
    }
    Ok(found.unwrap_or(Committed::Nothing))
}

/// Asks `ask` of every Kafka source at once (each look-up first finds its group's
/// coordinator, ~150 ms); the answers in the sources' order.
fn ask_every_source<T: Send>(
    plan: &Plan,
    ask: &(dyn Fn(&str, &KafkaSourcePlan) -> anyhow::Result<T> + Sync),
) -> Vec<anyhow::Result<T>> {
    std::thread::scope(|scope| {
        let lookups: Vec<_> = plan
            .sources
            .iter()
            .filter_map(|source| match &source.input {
                Input::Kafka(k) => Some(scope.spawn(move || ask(&source.name, k))),
                _ => None,
            })
            .collect();
        lookups
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("a committed-offsets look-up panicked"))
                })
            })
            .collect()
    })
}

/// The epoch tagged on the committed offsets of one Kafka source's group.
fn source_epoch(name: &str, k: &KafkaSourcePlan) -> anyhow::Result<Committed> {
    let consumer = group_consumer(name, k)?;
    let partitions = super::source::partition_count(&consumer, &k.brokers, &k.topic)
        .map_err(|e| anyhow::anyhow!("source `{name}`: {e}"))?;
    let all: Vec<u32> = (0..partitions as u32).collect();
    let mut epochs = Vec::new();
    for (p, tag) in partition_tags(name, k, &all)? {
        match tag.instance {
            Some(instance) => anyhow::bail!(
                "source `{name}`: group `{}`'s offsets on {}[{p}] were committed by instance `{instance}` of a job shared by several processes; run it with `--instance NAME`",
                k.group,
                k.topic,
            ),
            None => epochs.push(tag.epoch),
        }
    }
    epochs.sort_unstable();
    epochs.dedup();
    match epochs.as_slice() {
        [] => Ok(Committed::Nothing),
        [e] => Ok(Committed::Epoch(*e)),
        _ => anyhow::bail!(
            "source `{name}`: group `{}`'s partitions of {} were committed by different epochs {epochs:?} (by different jobs?)",
            k.group,
            k.topic
        ),
    }
}

/// What braid writes in the metadata of the offsets it commits: the epoch whose
/// manifest holds the state at those offsets, and with `--instance` whose manifest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    pub epoch: u64,
    pub instance: Option<String>,
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{EPOCH_TAG}{}", self.epoch)?;
        match &self.instance {
            Some(name) => write!(f, "{INSTANCE_TAG}{name}"),
            None => Ok(()),
        }
    }
}

impl Tag {
    pub fn parse(metadata: &str) -> Option<Tag> {
        let rest = metadata.strip_prefix(EPOCH_TAG)?;
        let (epoch, instance) = match rest.split_once(INSTANCE_TAG) {
            Some((epoch, name)) => (epoch, Some(name.to_string())),
            None => (rest, None),
        };
        Some(Tag {
            epoch: epoch.parse().ok()?,
            instance,
        })
    }
}

/// Per partition of `owned`, the tag of the offsets committed on it (none: never
/// committed), from every Kafka source's group at once; the sources' offsets of a
/// partition are committed in one transaction, so they agree.
pub fn committed_tags(plan: &Plan, owned: &[u32]) -> anyhow::Result<HashMap<u32, Tag>> {
    let answers = ask_every_source(plan, &|name, k| partition_tags(name, k, owned));
    let mut found: Option<HashMap<u32, Tag>> = None;
    for this in answers {
        let this = this?;
        match &found {
            None => found = Some(this),
            Some(f) if *f == this => {}
            Some(f) => anyhow::bail!(
                "the sources' groups disagree on the checkpoints of their partitions ({f:?} and {this:?}): were their offsets committed by another job?"
            ),
        }
    }
    Ok(found.unwrap_or_default())
}

/// The tags on one Kafka source group's committed offsets of the partitions `owned`.
fn partition_tags(
    name: &str,
    k: &KafkaSourcePlan,
    owned: &[u32],
) -> anyhow::Result<HashMap<u32, Tag>> {
    let consumer = group_consumer(name, k)?;
    let mut query = TopicPartitionList::new();
    for &p in owned {
        query.add_partition(&k.topic, p as i32);
    }
    let committed = consumer
        .committed_offsets(query, REQUEST_TIMEOUT)
        .with_context(|| {
            format!(
                "source `{name}`: cannot read group `{}`'s committed offsets at {}",
                k.group, k.brokers
            )
        })?;
    let mut tags = HashMap::new();
    for e in committed.elements() {
        if let Offset::Offset(_) = e.offset() {
            let Some(tag) = Tag::parse(e.metadata()) else {
                anyhow::bail!(
                    "source `{name}`: group `{}` has offsets committed on {}[{}] that braid did not commit (metadata `{}`); give the job its own group",
                    k.group,
                    k.topic,
                    e.partition(),
                    e.metadata()
                );
            };
            tags.insert(e.partition() as u32, tag);
        }
    }
    Ok(tags)
}

/// The Kafka key of a record: its join key as a JSON array, e.g. `[42,"t7"]`.
pub fn key_json(key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(b'[');
    for (i, part) in key_parts(key).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match part {
            KeyPart::Int(v) => out.extend_from_slice(v.to_string().as_bytes()),
            KeyPart::Str(s) => {
                serde_json::to_writer(&mut *out, s).expect("a string serialises");
            }
        }
    }
    out.push(b']');
}

/// A shard's joined records, into the transaction of the epoch the shard is in.
pub struct KafkaRecords {
    out: Arc<KafkaOutput>,
    epoch: u64,
    shape: RecordShape,
    value: Vec<u8>,
    key: Vec<u8>,
    error: Option<anyhow::Error>,
}

impl KafkaRecords {
    pub fn new(out: Arc<KafkaOutput>, first_epoch: u64, shape: RecordShape) -> KafkaRecords {
        KafkaRecords {
            out,
            epoch: first_epoch,
            shape,
            value: Vec::new(),
            key: Vec::new(),
            error: None,
        }
    }

    fn record(&mut self, key: &[u8], left: Option<&[u8]>, right: Option<&[u8]>) {
        if self.error.is_some() {
            return;
        }
        key_json(key, &mut self.key);
        self.value.clear();
        let value = &mut self.value;
        self.shape.parts(left, right, |parts| {
            for p in parts {
                value.extend_from_slice(p);
            }
        });
        let topic = &self.out.plan.topic;
        if let Err(e) = self
            .out
            .send(self.epoch, topic, Some(&self.key), &self.value)
        {
            self.error = Some(e);
        }
    }
}

impl JoinSink for KafkaRecords {
    fn pair(&mut self, key: &[u8], left: &[u8], right: &[u8]) {
        self.record(key, Some(left), Some(right));
    }
    fn unmatched(&mut self, side: Side, key: &[u8], event: &[u8]) {
        match side {
            Side::Left => self.record(key, Some(event), None),
            Side::Right => self.record(key, None, Some(event)),
        }
    }
}

impl ResultSink for KafkaRecords {
    fn take_error(&mut self) -> Option<anyhow::Error> {
        self.error.take()
    }
    fn barrier(&mut self, epoch: u64) -> anyhow::Result<(Vec<PendingFile>, Option<SinkState>)> {
        self.error.take().map_or(Ok(()), Err)?;
        // What follows the barrier belongs to the next epoch's transaction.
        self.epoch = epoch + 1;
        Ok((Vec::new(), None))
    }
    fn finish(&mut self) -> anyhow::Result<()> {
        self.error.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use braid_core::KeyWriter;

    use super::*;

    /// A record's Kafka key is its join key as a JSON array, strings escaped.
    #[test]
    fn the_kafka_key_is_the_join_key_as_json() {
        let mut key = KeyWriter::default();
        key.push(KeyPart::Int(42));
        key.push(KeyPart::Str("t\"7é"));
        key.push(KeyPart::Int(-1));
        let mut out = Vec::new();
        key_json(key.bytes(), &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#"[42,"t\"7é",-1]"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, serde_json::json!([42, "t\"7é", -1]));
    }
}
