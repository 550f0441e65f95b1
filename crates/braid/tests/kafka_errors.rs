//! What stops a Kafka job, and how: an unreachable broker and a missing topic are
//! runtime failures (exit 1, within a bounded time, with a message naming the broker
//! or the topic); a transaction timeout shorter than the checkpoint interval is a job
//! file error (exit 2 from `braid validate` and from `braid run`, before any broker is
//! asked). The tests' own job file is checked to be valid first, so that the failures
//! below are the ones meant.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::check::{check_exact, read_outputs, Input};
use common::kafka::run::{wait_until, BraidRun, KafkaJob, OUTPUT_TIMEOUT};
use common::kafka::{
    create_topic, exclusive, free_port, produce_lines, read_committed, Broker, IMPRESSIONS, OUT,
    OUT_DEAD, OUT_LATE, PARTITIONS, PLAYS,
};
use common::{assert_success, braid, generate, stderr};

/// How long braid may take to give up on a broker nobody answers for.
const GIVE_UP_TIMEOUT: Duration = Duration::from_secs(60);

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `braid run JOB` to its end, which must come within [`GIVE_UP_TIMEOUT`];
/// returns the exit code and stderr.
fn run_until_it_stops(dir: &Path, job: &Path) -> (Option<i32>, String) {
    let mut run = BraidRun::start(job, None, &dir.join("run.log"));
    let status = run.wait_for(GIVE_UP_TIMEOUT);
    let err = run.stderr();
    let status =
        status.unwrap_or_else(|| panic!("braid still runs after {GIVE_UP_TIMEOUT:?}:\n{err}"));
    (status.code(), err)
}

#[test]
fn the_tests_job_file_is_valid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let job = KafkaJob::new(&format!("127.0.0.1:{}", free_port())).write(dir.path());
    let out = braid(&["validate", path_str(&job)]);
    assert_success(&out);
    let mut unbounded = KafkaJob::new("127.0.0.1:9");
    unbounded.end = None;
    unbounded.idle_timeout = Some("1s".to_string());
    let out = braid(&["validate", path_str(&unbounded.write(dir.path()))]);
    assert_success(&out);
}

#[test]
fn an_unreachable_broker_stops_the_job_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Nobody listens there: the port was free a moment ago.
    let brokers = format!("127.0.0.1:{}", free_port());
    let job = KafkaJob::new(&brokers).write(dir.path());
    let (code, err) = run_until_it_stops(dir.path(), &job);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&brokers),
        "stderr names the broker {brokers}: {err}"
    );
}

/// A broker with the job's topics except `missing`, and a little input; the job
/// refers to `missing` in place of `role` ("impressions" or "out").
fn job_with_a_missing_topic(dir: &Path, broker: &Broker, role: &str, missing: &str) -> PathBuf {
    let bootstrap = broker.bootstrap();
    for topic in [IMPRESSIONS, PLAYS, OUT, OUT_LATE, OUT_DEAD] {
        create_topic(&bootstrap, topic, PARTITIONS);
    }
    generate(dir, 2_000, 5);
    let input = common::kafka::check::Input::generated(dir);
    produce_lines(&bootstrap, IMPRESSIONS, PARTITIONS, &input.impressions);
    produce_lines(&bootstrap, PLAYS, PARTITIONS, &input.plays);
    let mut job = KafkaJob::new(&bootstrap);
    match role {
        "impressions" => job.impressions_topic = missing.to_string(),
        "out" => job.output_topic = missing.to_string(),
        other => panic!("no role {other}"),
    }
    job.write(dir)
}

fn assert_missing_topic_named(dir: &Path, job: &Path, topic: &str) {
    let (code, err) = run_until_it_stops(dir, job);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(topic), "stderr names the topic {topic}: {err}");
    assert!(
        err.contains("exist"),
        "stderr says that the topic must exist (braid does not create topics): {err}"
    );
}

#[test]
fn a_missing_input_topic_stops_the_job_naming_it() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start();
    let job = job_with_a_missing_topic(dir.path(), &broker, "impressions", "no-such-impressions");
    assert_missing_topic_named(dir.path(), &job, "no-such-impressions");
}

#[test]
fn a_missing_output_topic_stops_the_job_naming_it() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start();
    let job = job_with_a_missing_topic(dir.path(), &broker, "out", "no-such-out");
    assert_missing_topic_named(dir.path(), &job, "no-such-out");
    let topics: rdkafka::consumer::BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .expect("consumer");
    let metadata =
        rdkafka::consumer::Consumer::fetch_metadata(&topics, None, common::kafka::CALL_TIMEOUT)
            .expect("metadata");
    assert!(
        metadata.topics().iter().all(|t| t.name() != "no-such-out"),
        "braid created the topic"
    );
}

/// Topics of different partition counts cannot be joined partition by partition (nor
/// split across instances): the job stops naming both counts and the fix.
#[test]
fn inputs_of_different_partition_counts_stop_the_job() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let job = job_with_a_missing_topic(dir.path(), &broker, "impressions", "impressions-3");
    create_topic(&bootstrap, "impressions-3", PARTITIONS - 1);
    let (code, err) = run_until_it_stops(dir.path(), &job);
    assert_eq!(code, Some(1), "{err}");
    for expected in [
        format!("has {} partitions", PARTITIONS - 1),
        format!("has {PARTITIONS}"),
        "co-partitioned".to_string(),
        "recreate one topic".to_string(),
        "repartition = true".to_string(),
    ] {
        assert!(err.contains(&expected), "stderr says {expected:?}: {err}");
    }
}

/// With `[join] repartition = true` the same topics are joined in one process, every
/// partition of both as one, split over the shards by key: killed once after its first
/// commit and run again to the end, the output is exactly the reference join. As an
/// instance, the job stops with a message: that repartitioning is one process's.
#[test]
fn inputs_of_different_partition_counts_join_with_repartition() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    generate(dir.path(), 20_000, 31);
    let input = Input::generated(dir.path());
    for topic in [PLAYS, OUT, OUT_LATE, OUT_DEAD] {
        create_topic(&bootstrap, topic, PARTITIONS);
    }
    create_topic(&bootstrap, "impressions-3", PARTITIONS - 1);
    produce_lines(
        &bootstrap,
        "impressions-3",
        PARTITIONS - 1,
        &input.impressions,
    );
    produce_lines(&bootstrap, PLAYS, PARTITIONS, &input.plays);
    let mut job = KafkaJob::new(&bootstrap);
    job.impressions_topic = "impressions-3".to_string();
    job.repartition = true;
    let job = job.write(dir.path());
    let mut first = BraidRun::start(&job, None, &dir.path().join("run-1.log"));
    let committed = wait_until(OUTPUT_TIMEOUT, || {
        if let Some(status) = first.try_wait() {
            return Ok(format!("run 1 ended ({status}) before it was killed"));
        }
        match read_committed(&bootstrap, OUT).len() {
            0 => Err("no output committed yet".to_string()),
            n => Ok(format!("{n} rows committed")),
        }
    });
    first.kill();
    eprintln!(
        "run 1: {}",
        committed.unwrap_or_else(|e| panic!("run 1: {e}:\n{}", first.stderr()))
    );
    let (code, err) = run_until_it_stops(dir.path(), &job);
    assert_eq!(code, Some(0), "{err}");
    let got = read_outputs(&bootstrap);
    if let Err(e) = check_exact(&input, &got, &|_| false) {
        panic!("repartitioned join: {e}");
    }
    let out = braid(&["run", "--instance", "a", path_str(&job)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("repartition = true is not supported across instances"),
        "{err}"
    );
}

#[test]
fn a_transaction_timeout_below_the_checkpoint_interval_is_a_job_file_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No broker: the job file is refused before any is asked.
    let mut job = KafkaJob::new(&format!("127.0.0.1:{}", free_port()));
    job.checkpoint_interval = "10s".to_string();
    job.output_properties = vec![("transaction.timeout.ms".to_string(), "1000".to_string())];
    let job = job.write(dir.path());
    for args in [vec!["validate"], vec!["run", "--quiet"]] {
        let command = args[0];
        let out = braid(&[args.as_slice(), &[path_str(&job)]].concat());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "braid {command}: {err}");
        for named in ["transaction.timeout.ms", "interval"] {
            assert!(
                err.contains(named),
                "braid {command}: stderr names {named}: {err}"
            );
        }
    }
}
