//! Proves that state larger than `memory_max` spills to disk and that the process's
//! peak resident memory stays within `memory_max` plus fixed buffers (SPEC §5, "Bounded
//! memory"), on the Flink peer workload, whose result count is checked exactly.

mod common;

use common::{assert_success, braid};

#[test]
fn state_beyond_memory_max_spills_and_rss_stays_bounded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = braid(&[
        "bench",
        "--workload",
        "flink-peer",
        "--events",
        "1500000",
        "--memory-max",
        "16MiB",
        "--parallelism",
        "2",
        "--dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(line["correct"], true, "{line}");
    assert_eq!(line["results"], line["expected"], "{line}");
    // About 1.2 M impressions of ~130 bytes each are in the window: far beyond 16 MiB.
    let spilled = line["spilled_events"].as_u64().expect("count");
    assert!(spilled > 1_000_000, "{line}");
    let state = line["peak_state_mb"].as_f64().expect("state");
    assert!(state <= 17.0, "in-memory state exceeded memory_max: {line}");
    let rss = line["peak_rss_mb"].as_f64().expect("rss");
    assert!(
        rss <= 16.0 + 100.0,
        "peak RSS beyond memory_max + 100 MiB: {line}"
    );
}
