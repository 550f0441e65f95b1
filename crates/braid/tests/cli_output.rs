//! What `braid run` prints for machines (issue 11, item 4): `--json` prints the run
//! summary as one JSON object on stdout, whose counts agree with the rows an
//! independent reference join gives; `--log-format json` makes every log line on
//! stderr one JSON object.

mod common;

use common::{
    assert_success, braid, committed_lines, generate, reference_events, reference_join, write_job,
};
use serde_json::Value;

#[test]
fn json_summary_counts_agree_with_the_reference_join() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 20_000, 41);
    let job = write_job(dir.path(), "full", ("0s", "1h"), "4MiB");
    let out = braid(&["run", "--quiet", "--json", job.to_str().expect("utf-8")]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout:\n{stdout}");
    let summary: Value = serde_json::from_str(lines[0]).expect("the summary is JSON");
    let (left, _) = reference_events(&dir.path().join("data/impressions"));
    let (right, _) = reference_events(&dir.path().join("data/plays"));
    let want = reference_join(&left, &right, "full", 0, 3_600_000);
    let count = |path: &str| -> u64 {
        path.split('.')
            .fold(&summary, |v, k| &v[k])
            .as_u64()
            .unwrap_or_else(|| panic!("{path} in {summary}"))
    };
    let rows = count("pairs") + count("left.unmatched_emitted") + count("right.unmatched_emitted");
    assert_eq!(rows as usize, want.len(), "{summary}");
    assert_eq!(committed_lines(&dir.path().join("out")).len(), want.len());
    assert_eq!(summary["accounted"], true, "{summary}");
    assert_eq!(
        count("left.read") + count("right.read"),
        20_000,
        "{summary}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 5_000, 42);
    let job = write_job(dir.path(), "left", ("0s", "1h"), "4MiB");
    let out = braid(&[
        "run",
        "-v",
        "--quiet",
        "--log-format",
        "json",
        job.to_str().expect("utf-8"),
    ]);
    assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut messages = Vec::new();
    for line in stderr.lines() {
        let log: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(log["level"].is_string(), "{line}");
        messages.push(log["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    assert!(
        messages.iter().any(|m| m == "starting"),
        "no `starting` among the logs:\n{stderr}"
    );
}
