//! Kafka in and out (SPEC §6), through librdkafka (`rdkafka`, its sync API: no async
//! runtime).
//!
//! - [`source::KafkaSource`]: a topic as a source; each partition is a source partition
//!   with its own watermark; positions are offsets.
//! - [`output::KafkaOutput`]: joined, late and dead records in transactions, one per
//!   checkpoint epoch, with the sources' offsets committed inside the same transaction,
//!   so that the Kafka commit is the commit point (DESIGN "Checkpoints and exactly-once").
//!
//! docs/kafka-spike.md holds what was measured about librdkafka and the test broker.

pub mod output;
pub mod source;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How long a metadata request, an offsets look-up or a transaction call may take
/// before braid calls the broker unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A broker that cannot be reached for this long stops the job (exit 1); the next
/// `braid run` resumes from the last committed checkpoint. Shorter outages cost a pause.
pub const BROKER_OUTAGE_MAX: Duration = Duration::from_secs(60);
/// librdkafka's errors repeat while a broker is down; one is logged per this interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A client's settings: braid's, then the job's `properties`, which win.
pub fn client_config(
    brokers: &str,
    defaults: &[(&str, &str)],
    properties: &[(String, String)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in properties {
        config.set(k, v);
    }
    config
}

/// Logs librdkafka's errors and warnings through `tracing`, at most one per
/// [`ERROR_LOG_INTERVAL`], and remembers when the brokers last failed.
#[derive(Default)]
pub struct Context {
    last_logged: Mutex<Option<Instant>>,
}

impl Context {
    fn should_log(&self) -> bool {
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some(t) if t.elapsed() < ERROR_LOG_INTERVAL => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
}

impl ConsumerContext for Context {}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) && self.should_log() {
            tracing::warn!(target: "braid::kafka", "librdkafka {fac}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is news to the source, not an error.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        if self.should_log() {
            tracing::warn!(target: "braid::kafka", "kafka: {error}: {reason}");
        }
    }
}
