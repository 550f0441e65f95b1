//! Backfill into live (SPEC §6, `[source.backfill]`): a take-rate data set is cut at a
//! time `until` with ten seconds of overlap on each side (the data set spans about a
//! minute). History files hold every valid event before `until` + 10 s and the
//! malformed lines (a topic's malformed record is read only if it sits after the offset
//! for `until`, which is the broker's business), the topics every valid event from
//! `until` − 10 s on. braid reads the files first, then the
//! topics from the offsets for `until`; the output must be exactly the reference join
//! over the union, every event once: no gap and no duplicate at the seam.

mod common;

use std::path::Path;

use common::kafka::check::{check_exact, read_outputs, Input};
use common::kafka::run::KafkaJob;
use common::kafka::{create_job_topics, exclusive, Broker, IMPRESSIONS, PLAYS};
use common::{assert_success, braid, generate};

const EVENTS: u64 = 20_000;
const OVERLAP_MS: i64 = 10_000;

/// A valid line's event time, as the reference reads it; `None` for a line the
/// reference rejects (malformed, a key or time missing or mistyped, an id mistyped).
fn time_of(line: &[u8]) -> Option<i64> {
    use serde_json::Value;
    let value: Value = serde_json::from_slice(line).ok()?;
    for field in ["profile_id", "title_id"] {
        match value.get(field)? {
            Value::String(_) => {}
            Value::Number(n) if n.as_i64().is_some() => {}
            _ => return None,
        }
    }
    match value.get("event_id") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(Value::Number(n)) if n.as_i64().is_some() => {}
        Some(_) => return None,
    }
    let time = match value.get("ts")? {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis(),
        _ => return None,
    };
    (0..=253_402_300_799_999).contains(&time).then_some(time)
}

/// Writes the lines of one source kept by `keep` into `dir/NAME/part-0.ndjson`.
fn write_history(dir: &Path, name: &str, lines: &[Vec<u8>]) {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).expect("mkdir");
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    std::fs::write(folder.join("part-0.ndjson"), text).expect("write history");
}

#[test]
fn history_files_then_the_topic_give_the_join_over_the_union() {
    let _serial = exclusive();
    let seed = common::seed();
    eprintln!("seed {seed} (replay with BRAID_SEED={seed})");
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), EVENTS, seed);
    let input = Input::generated(dir.path());

    let mut times: Vec<i64> = input
        .impressions
        .iter()
        .chain(&input.plays)
        .filter_map(|l| time_of(l))
        .collect();
    times.sort_unstable();
    let until = times[times.len() / 2];
    let history_of = |lines: &[Vec<u8>]| -> Vec<Vec<u8>> {
        lines
            .iter()
            .filter(|l| time_of(l).is_none_or(|t| t < until + OVERLAP_MS))
            .cloned()
            .collect()
    };
    let topic_of = |lines: &[Vec<u8>]| -> Vec<Vec<u8>> {
        lines
            .iter()
            .filter(|l| time_of(l).is_some_and(|t| t >= until - OVERLAP_MS))
            .cloned()
            .collect()
    };
    let history = dir.path().join("history");
    write_history(&history, IMPRESSIONS, &history_of(&input.impressions));
    write_history(&history, PLAYS, &history_of(&input.plays));
    let topic = Input {
        impressions: topic_of(&input.impressions),
        plays: topic_of(&input.plays),
    };
    let in_history = history_of(&input.impressions).len() + history_of(&input.plays).len();
    assert!(
        in_history > 1_000 && topic.impressions.len() + topic.plays.len() > 1_000,
        "both parts hold events"
    );

    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    create_job_topics(&bootstrap);
    topic.produce(&bootstrap);

    // The tests' job, each source with its history and without `start` (a backfill
    // starts the topic at `until`).
    let job = KafkaJob::new(&bootstrap).write(dir.path());
    let text = std::fs::read_to_string(&job).expect("read job");
    let until_text = chrono::DateTime::from_timestamp_millis(until)
        .expect("a time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut out = String::new();
    for (i, part) in text.split("[[source]]").enumerate() {
        if i == 0 {
            out.push_str(part);
            continue;
        }
        let name = if part.contains(&format!("name = \"{IMPRESSIONS}\"")) {
            IMPRESSIONS
        } else {
            PLAYS
        };
        let part = part.replace("start = \"earliest\"\n", "");
        let (source, rest) = part
            .split_once("\n\n")
            .expect("a source's lines end with a blank line");
        out.push_str(&format!(
            "[[source]]{source}\n[source.backfill]\npath = \"history/{name}/*.ndjson\"\nuntil = \"{until_text}\"\n\n{rest}"
        ));
    }
    std::fs::write(&job, &out).expect("write job");
    let validated = braid(&["validate", job.to_str().expect("utf-8")]);
    assert_success(&validated);
    assert!(
        String::from_utf8_lossy(&validated.stdout).contains("history file(s)"),
        "both sources read history first: {out}"
    );

    let run = braid(&["run", job.to_str().expect("utf-8"), "--quiet"]);
    assert_success(&run);
    let got = read_outputs(&bootstrap);
    assert!(!got.joined.is_empty());
    if let Err(e) = check_exact(&input, &got, &|_| false) {
        panic!("seed {seed}: backfill then topic, cut at {until_text}: {e}");
    }
    eprintln!(
        "seed {seed}: {} rows, {} late, {} dead; the union of {} history and {} topic lines, exact",
        got.joined.len(),
        got.late.len(),
        got.dead.len(),
        in_history,
        topic.impressions.len() + topic.plays.len()
    );
}
