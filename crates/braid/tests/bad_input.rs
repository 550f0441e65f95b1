//! Proves that every kind of malformed input lands in `_dead/` with its file and line,
//! that late events land in `_late/` with the watermark they missed, that nothing is
//! dropped silently (the summary's counts add up), and that the good records around the
//! bad ones are still joined.

mod common;

use common::{assert_success, braid, committed_lines, summary};
use serde_json::Value;

const JOB: &str = r#"name = "bad-input"
parallelism = 1

[[source]]
name = "left"
kind = "files"
path = "left.ndjson"
key = ["k"]
time = "ts"
max_line_bytes = "200B"

[[source]]
name = "right"
kind = "files"
path = "right.ndjson"
key = ["k"]
time = "ts"

[join]
left = "left"
right = "right"
type = "inner"
within = ["0s", "10s"]

# Every time counts for the watermark at once, as in Flink: the right side's jump to
# 100 s makes the events after it late. (With the guard on, that jump is what it
# refutes; tests/time_jumps.rs covers it.)
[time]
corroborate = 0

[output]
kind = "files"
path = "out"

[state]
dir = "state"
"#;

fn records(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("folder exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "ndjson") {
            let text = std::fs::read_to_string(path).expect("read");
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).expect("records are JSON")),
            );
        }
    }
    out
}

#[test]
fn malformed_lines_are_dead_lettered_with_their_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let long = format!(r#"{{"k":1,"ts":1000,"pad":"{}"}}"#, "x".repeat(300));
    let mut left: Vec<Vec<u8>> = vec![
        br#"{"k":1,"ts":1000,"v":"good"}"#.to_vec(),
        br#"{"k":1,"ts":10"#.to_vec(),
        br#"[1,2,3]"#.to_vec(),
        b"{\"k\":\"\xff\",\"ts\":1000}".to_vec(),
        br#"{"ts":1000}"#.to_vec(),
        br#"{"k":1}"#.to_vec(),
        br#"{"k":{"a":1},"ts":1000}"#.to_vec(),
        br#"{"k":[1],"ts":1000}"#.to_vec(),
        br#"{"k":null,"ts":1000}"#.to_vec(),
        br#"{"k":1.5,"ts":1000}"#.to_vec(),
        br#"{"k":1,"ts":"soon"}"#.to_vec(),
        long.into_bytes(),
    ];
    let want_errors = [
        "invalid JSON",
        "not an object",
        "invalid UTF-8",
        "`k` is missing",
        "`ts` is missing",
        "`k` is an object",
        "`k` is an array",
        "`k` is null",
        "`k` is a float",
        "unparsable time",
        "over the limit",
    ];
    left.push(br#"{"k":2,"ts":50000}"#.to_vec());
    let mut bytes = Vec::new();
    for l in &left {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    std::fs::write(dir.path().join("left.ndjson"), bytes).expect("write");
    // The right side reaches 100 s, then sends events from long before: late.
    std::fs::write(
        dir.path().join("right.ndjson"),
        "{\"k\":1,\"ts\":5000,\"v\":\"match\"}\n{\"k\":9,\"ts\":100000}\n{\"k\":2,\"ts\":1}\n{\"k\":2,\"ts\":2}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("job.toml"), JOB).expect("write");
    let out = braid(&[
        "run",
        "--quiet",
        dir.path().join("job.toml").to_str().expect("utf-8"),
    ]);
    assert_success(&out);

    let dead = records(&dir.path().join("out/_dead"));
    assert_eq!(dead.len(), want_errors.len(), "{dead:#?}");
    for (i, want) in want_errors.iter().enumerate() {
        let line = i + 2;
        let record = dead
            .iter()
            .find(|r| {
                r["position"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("left.ndjson:{line}")))
            })
            .unwrap_or_else(|| panic!("no dead letter for line {line}: {dead:#?}"));
        assert_eq!(record["source"], "left");
        let error = record["error"].as_str().expect("error text");
        assert!(error.contains(want), "line {line}: {error} lacks {want}");
        assert!(record["raw"].is_string());
    }

    let late = records(&dir.path().join("out/_late"));
    assert_eq!(late.len(), 2, "{late:#?}");
    for record in &late {
        assert_eq!(record["source"], "right");
        assert!(record["event"]["ts"].as_i64().expect("ts") < 10);
        assert!(record["watermark"].as_i64().expect("watermark") > 10);
    }

    let joined = committed_lines(&dir.path().join("out"));
    assert_eq!(
        joined,
        vec![
            r#"{"left":{"k":1,"ts":1000,"v":"good"},"right":{"k":1,"ts":5000,"v":"match"}}"#
                .to_string()
        ]
    );
    let s = summary(&dir.path().join("out"));
    assert_eq!(s["accounted"], true);
    assert_eq!(s["left"]["read"], 13);
    assert_eq!(s["left"]["dead"], 11);
    assert_eq!(s["right"]["late"], 2);
    assert_eq!(s["right"]["unmatched_expired"], 1);
}

/// A second run into an output folder that holds committed output would mix two runs'
/// records: it is refused with exit 1 and a message naming the folder.
#[test]
fn earlier_output_is_refused_with_exit_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("left.ndjson"), "{\"k\":1,\"ts\":1000}\n").expect("write");
    std::fs::write(dir.path().join("right.ndjson"), "{\"k\":1,\"ts\":2000}\n").expect("write");
    std::fs::write(dir.path().join("job.toml"), JOB).expect("write");
    let job = dir.path().join("job.toml");
    let job = job.to_str().expect("utf-8");
    assert_success(&braid(&["run", "--quiet", job]));
    let again = braid(&["run", "--quiet", job]);
    assert_eq!(again.status.code(), Some(1));
    let err = common::stderr(&again);
    assert!(err.contains("already holds committed output"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line without -v: {err}");
    let verbose = braid(&["run", "--quiet", "-v", job]);
    assert_eq!(verbose.status.code(), Some(1));
}
