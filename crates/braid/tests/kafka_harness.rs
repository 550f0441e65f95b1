//! Proves the Kafka test harness itself (`common/kafka.rs`), without braid's Kafka
//! code: a noida-db broker starts, topics are created, a generated take-rate data set
//! is produced co-partitioned by join key and read back `read_committed` exactly, and a
//! broker stopped and restarted on the same port keeps what it had. The exactness check
//! is also shown to fail on output that is wrong.

mod common;

use std::collections::HashMap;

use common::kafka::check::{check_exact, expected_rows, Input, Outputs};
use common::kafka::{
    create_job_topics, create_topic, exclusive, key_of, partition_of, produce_lines,
    read_committed, read_uncommitted, Broker, IMPRESSIONS, PARTITIONS, PLAYS, WINDOW_MS,
};
use common::{generate, reference_events, reference_join};

fn sorted_text(lines: &[Vec<u8>]) -> Vec<String> {
    let mut text: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    text.sort();
    text
}

#[test]
fn produced_lines_are_read_back_committed_and_survive_a_broker_restart() {
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 10_000, 7);
    let input = Input::generated(dir.path());
    let mut broker = Broker::start();
    let bootstrap = broker.bootstrap();
    create_job_topics(&bootstrap);
    create_topic(&bootstrap, IMPRESSIONS, PARTITIONS); // exists already: fine
    input.produce(&bootstrap);
    let want_impressions = sorted_text(&input.impressions);
    let want_plays = sorted_text(&input.plays);
    // Invalid UTF-8 lines come back replaced; the rest byte for byte.
    let lossy = |topic: &str| -> Vec<String> {
        let mut values: Vec<String> =
            common::kafka::read_values(&bootstrap, topic, "read_committed")
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
        values.sort();
        values
    };
    assert_eq!(lossy(IMPRESSIONS), want_impressions);
    assert_eq!(lossy(PLAYS), want_plays);

    broker.stop();
    broker.restart();
    assert_eq!(
        lossy(IMPRESSIONS),
        want_impressions,
        "the broker kept its records through a stop and restart"
    );
    produce_lines(&bootstrap, PLAYS, PARTITIONS, &input.plays[..10]);
    assert_eq!(lossy(PLAYS).len(), want_plays.len() + 10);
}

#[test]
fn keys_and_partitions_put_equal_keys_together() {
    assert_eq!(
        key_of(br#"{"profile_id":42,"title_id":"t7","ts":1}"#).as_deref(),
        Some(r#"[42,"t7"]"#)
    );
    assert_eq!(key_of(br#"{"profile_id":1.5,"title_id":2}"#), None);
    assert_eq!(key_of(b"[1,2,3]"), None);
    let mut spread = HashMap::new();
    for profile in 0..400 {
        let key = format!("[{profile},3]");
        let p = partition_of(&key, PARTITIONS);
        assert_eq!(p, partition_of(&key, PARTITIONS));
        *spread.entry(p).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 4, "every partition gets keys: {spread:?}");
}

#[test]
fn the_exactness_check_refuses_wrong_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 3_000, 11);
    let input = Input::generated(dir.path());
    let (left, _) = reference_events(&dir.path().join("data").join(IMPRESSIONS));
    let (right, _) = reference_events(&dir.path().join("data").join(PLAYS));
    let joined = reference_join(&left, &right, "left", WINDOW_MS.0, WINDOW_MS.1);
    let (mut dead, mut dead_lines) = (Vec::new(), 0);
    for (source, lines) in [(IMPRESSIONS, &input.impressions), (PLAYS, &input.plays)] {
        let valid: std::collections::HashSet<&str> = if source == IMPRESSIONS {
            left.iter().map(|e| e.raw.as_str()).collect()
        } else {
            right.iter().map(|e| e.raw.as_str()).collect()
        };
        for line in lines.iter() {
            let text = String::from_utf8_lossy(line);
            if std::str::from_utf8(line).map_or(true, |t| !valid.contains(t)) {
                dead.push(serde_json::json!({"source": source, "position": "x[0]@1", "error": "bad", "raw": text}).to_string());
                dead_lines += 1;
            }
        }
    }
    assert!(dead_lines > 0, "the data set has malformed lines");
    let right_output = Outputs {
        joined: joined.clone(),
        late: Vec::new(),
        dead: dead.clone(),
    };
    check_exact(&input, &right_output, &|_| false).expect("the reference output is exact");

    // One impression late: its rows leave the reference, and a plays row that matched
    // only it becomes nothing (a left join).
    let victim = left[left.len() / 2].raw.clone();
    let late = serde_json::json!({
        "source": IMPRESSIONS, "position": "impressions[0]@5", "watermark": 0,
        "event": serde_json::from_str::<serde_json::Value>(&victim).expect("JSON"),
    })
    .to_string();
    let mut without: Vec<String> = joined
        .iter()
        .filter(|r| !r.starts_with(&format!(r#"{{"impressions":{victim}"#)))
        .cloned()
        .collect();
    without.sort();
    let late_output = Outputs {
        joined: without.clone(),
        late: vec![late.clone()],
        dead: dead.clone(),
    };
    check_exact(&input, &late_output, &|_| false).expect("late event taken out");

    let wrong = [
        (
            "a row missing",
            joined[1..].to_vec(),
            Vec::new(),
            dead.clone(),
        ),
        (
            "a row twice",
            {
                let mut j = joined.clone();
                j.push(joined[0].clone());
                j.sort();
                j
            },
            Vec::new(),
            dead.clone(),
        ),
        (
            "a late event still joined",
            joined.clone(),
            vec![late.clone()],
            dead.clone(),
        ),
        (
            "a late event that is no input",
            without.clone(),
            vec![late.replace("\"impressions\"", "\"plays\"")],
            dead.clone(),
        ),
        (
            "the same event late twice",
            without.clone(),
            vec![late.clone(), late.clone()],
            dead.clone(),
        ),
        (
            "a dead letter missing",
            joined.clone(),
            Vec::new(),
            dead[1..].to_vec(),
        ),
    ];
    for (what, joined, late, dead) in wrong {
        let got = Outputs { joined, late, dead };
        assert!(
            check_exact(&input, &got, &|_| false).is_err(),
            "the check accepts output with {what}"
        );
    }
}

/// What noida-db answers when a client asks for a topic that does not exist, printed
/// for the record (braid must say the topic is missing; it must not be created).
#[test]
fn a_missing_topic_is_not_created_by_reading_its_metadata() {
    let _serial = exclusive();
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    create_job_topics(&bootstrap);
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("consumer");
    use rdkafka::consumer::Consumer;
    let metadata = consumer
        .fetch_metadata(Some("absent"), common::kafka::CALL_TIMEOUT)
        .expect("metadata");
    let topic = &metadata.topics()[0];
    eprintln!(
        "metadata of a missing topic: error {:?}, {} partitions",
        topic.error(),
        topic.partitions().len()
    );
    assert!(topic.error().is_some() || topic.partitions().is_empty());
    let all = consumer
        .fetch_metadata(None, common::kafka::CALL_TIMEOUT)
        .expect("metadata");
    assert!(
        all.topics().iter().all(|t| t.name() != "absent"),
        "asking created the topic"
    );
    assert!(read_uncommitted(&bootstrap, common::kafka::OUT).is_empty());
    assert!(read_committed(&bootstrap, common::kafka::OUT).is_empty());
}

#[test]
fn a_repeated_id_is_a_duplicate_not_a_dead_letter() {
    let line = |s: &str| s.as_bytes().to_vec();
    let input = Input {
        impressions: vec![
            line(r#"{"event_id":"a","profile_id":1,"title_id":2,"ts":1000}"#),
            line(r#"{"event_id":"a","profile_id":1,"title_id":2,"ts":1000,"again":true}"#),
            line(r#"{"event_id":"b","profile_id":1.5,"title_id":2,"ts":1000}"#),
        ],
        plays: vec![line(
            r#"{"event_id":"p","profile_id":1,"title_id":2,"ts":2000}"#,
        )],
    };
    let joined = expected_rows(&input, &[]).expect("no late records");
    assert_eq!(
        joined,
        vec![
            r#"{"impressions":{"event_id":"a","profile_id":1,"title_id":2,"ts":1000},"plays":{"event_id":"p","profile_id":1,"title_id":2,"ts":2000}}"#
        ]
    );
    let dead = |raws: &[&str]| -> Vec<String> {
        raws.iter()
            .map(|raw| serde_json::json!({"source": IMPRESSIONS, "raw": raw}).to_string())
            .collect()
    };
    let exact = |dead: Vec<String>| {
        check_exact(
            &input,
            &Outputs {
                joined: joined.clone(),
                late: Vec::new(),
                dead,
            },
            &|_| false,
        )
    };
    let invalid = r#"{"event_id":"b","profile_id":1.5,"title_id":2,"ts":1000}"#;
    exact(dead(&[invalid])).expect("only the float key is a dead letter");
    let duplicate = r#"{"event_id":"a","profile_id":1,"title_id":2,"ts":1000,"again":true}"#;
    assert!(exact(dead(&[invalid, duplicate])).is_err());
}
