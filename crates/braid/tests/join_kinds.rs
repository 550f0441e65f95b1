//! Proves, on the real binary over generated files (duplicates, disorder and malformed
//! lines included), that each join kind writes exactly the rows of an independent
//! reference join written in this test, with each side's bytes verbatim, and that the
//! run's accounting adds up. One test covers a tiny memory budget, so that most state
//! lives on disk.

mod common;

use common::{
    assert_success, braid, committed_lines, generate, reference_events, reference_join, summary,
    write_job,
};

fn check(kind: &str, within: (&str, &str), bounds_ms: (i64, i64), memory_max: &str, seed: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 30_000, seed);
    let job = write_job(dir.path(), kind, within, memory_max);
    let out = braid(&["run", "--quiet", job.to_str().expect("utf-8")]);
    assert_success(&out);
    let (left, left_invalid) = reference_events(&dir.path().join("data/impressions"));
    let (right, right_invalid) = reference_events(&dir.path().join("data/plays"));
    let want = reference_join(&left, &right, kind, bounds_ms.0, bounds_ms.1);
    let got = committed_lines(&dir.path().join("out"));
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len(), "row count of a {kind} join");
    assert!(
        got == want,
        "rows of a {kind} join differ from the reference"
    );
    let s = summary(&dir.path().join("out"));
    assert_eq!(s["accounted"], true, "{s:#}");
    assert_eq!(s["left"]["dead"], left_invalid as u64, "{s:#}");
    assert_eq!(s["right"]["dead"], right_invalid as u64, "{s:#}");
    assert_eq!(s["left"]["late"], 0);
    let total_read =
        s["left"]["read"].as_u64().expect("count") + s["right"]["read"].as_u64().expect("count");
    assert_eq!(total_read, 30_000);
    let want_pairs = want
        .iter()
        .filter(|r| !r.starts_with(r#"{"impressions":null,"#) && !r.ends_with(r#","plays":null}"#))
        .count() as u64;
    assert_eq!(s["pairs"], want_pairs);
}

#[test]
fn inner_join_equals_reference() {
    check("inner", ("0s", "1h"), (0, 3_600_000), "64MiB", 11);
}

#[test]
fn left_join_equals_reference() {
    check("left", ("0s", "1h"), (0, 3_600_000), "64MiB", 12);
}

#[test]
fn right_join_equals_reference() {
    check("right", ("-10m", "30m"), (-600_000, 1_800_000), "64MiB", 13);
}

#[test]
fn full_join_equals_reference() {
    check("full", ("0s", "1h"), (0, 3_600_000), "64MiB", 14);
}

#[test]
fn full_join_with_state_on_disk_equals_reference() {
    check("full", ("0s", "1h"), (0, 3_600_000), "256KiB", 15);
}
