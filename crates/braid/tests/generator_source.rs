//! Proves that `kind = "generator"` sources produce the same events as `braid generate`
//! with the same seed (so a job can run without files), and that the join over them
//! equals the reference join over the generated files. Also checks the `stdout` output.

mod common;

use common::{assert_success, braid, committed_lines, reference_events, reference_join, summary};

const EVENTS: u64 = 20_000;
const SEED: u64 = 3;

fn job(output: &str) -> String {
    format!(
        r#"name = "generated"

[[source]]
name = "impressions"
kind = "generator"
stream = "impressions"
events = {EVENTS}
seed = {SEED}
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[[source]]
name = "plays"
kind = "generator"
stream = "plays"
events = {EVENTS}
seed = {SEED}
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[join]
left = "impressions"
right = "plays"
type = "full"
within = ["0s", "1h"]

[time]
max_out_of_orderness = "5s"

{output}

[state]
dir = "state"
"#
    )
}

#[test]
fn generator_sources_equal_generated_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = braid(&[
        "generate",
        "--out",
        dir.path().to_str().expect("utf-8"),
        "--events",
        &EVENTS.to_string(),
        "--seed",
        &SEED.to_string(),
    ]);
    assert_success(&out);
    let (left, _) = reference_events(&dir.path().join("data/impressions"));
    let (right, _) = reference_events(&dir.path().join("data/plays"));
    let want = reference_join(&left, &right, "full", 0, 3_600_000);

    let job_path = dir.path().join("generated.toml");
    std::fs::write(&job_path, job("[output]\nkind = \"files\"\npath = \"out\"")).expect("write");
    assert_success(&braid(&[
        "run",
        "--quiet",
        job_path.to_str().expect("utf-8"),
    ]));
    assert_eq!(committed_lines(&dir.path().join("out")), want);
    let s = summary(&dir.path().join("out"));
    assert_eq!(s["accounted"], true);
    assert!(s["pairs"].as_u64().expect("pairs") > 0, "{s:#}");

    std::fs::write(&job_path, job("[output]\nkind = \"stdout\"")).expect("write");
    let out = braid(&["run", "--quiet", job_path.to_str().expect("utf-8")]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut records: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with(r#"{"impressions":"#))
        .map(str::to_string)
        .collect();
    records.sort();
    assert_eq!(records, want);
}
