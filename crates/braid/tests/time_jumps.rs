//! Proves that a corrupt time cannot make the rest of a stream late (README "Times far
//! ahead"), and that legitimate jumps of event time still join exactly.
//!
//! - Random corruption: 5 % of a take-rate data set's lines are corrupted (flipped bits,
//!   truncation, garbage, a changed digit of the time). Of the pairs an independent
//!   reference join finds between the uncorrupted events, at least 99 % must be in the
//!   output. The same run with the guard off (`corroborate = 0`) must keep fewer.
//! - One far-future event in a clean stream changes nothing but its own row: the output
//!   equals the clean run's, and the event is a dead letter that says why.
//! - Jumps that are real (both streams silent for a day, history months old followed by
//!   current data) and a job's first events join exactly as the reference says.
//!
//! Seeds are printed; `BRAID_SEED` replays one.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{
    assert_success, braid, committed_lines, generate, reference_events, reference_join, summary,
    write_job, TestRng,
};

const CORRUPT_SHARE: f64 = 0.05;
const KEPT_SHARE_MIN: f64 = 0.99;
const DAY_MS: i64 = 86_400_000;

fn seed() -> u64 {
    let seed = common::seed();
    println!("seed {seed} (BRAID_SEED={seed} replays it)");
    seed
}

fn run(job: &Path) -> std::process::Output {
    let out = braid(&["run", "--quiet", job.to_str().expect("utf-8")]);
    assert_success(&out);
    out
}

/// A copy of `job` with `[time]` settings added and its own output and state folders.
fn variant(job: &Path, name: &str, time_settings: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(job)
        .expect("read job")
        .replace(
            "max_out_of_orderness = \"5s\"",
            &format!("max_out_of_orderness = \"5s\"\n{time_settings}"),
        )
        .replace("path = \"out\"", &format!("path = \"out-{name}\""))
        .replace("dir = \"state\"", &format!("dir = \"state-{name}\""));
    let path = job.with_file_name(format!("job-{name}.toml"));
    std::fs::write(&path, text).expect("write job");
    path
}

/// Corrupts one line in one of four ways; never adds a line break.
fn corrupt(line: &[u8], rng: &mut TestRng) -> Vec<u8> {
    let mut bad = line.to_vec();
    match rng.range(0, 4) {
        0 => loop {
            let at = rng.range(0, bad.len() as u64) as usize;
            let flipped = bad[at] ^ (1 << rng.range(0, 8));
            if flipped != b'\n' && flipped != b'\r' {
                bad[at] = flipped;
                break;
            }
        },
        1 => bad.truncate(rng.range(0, bad.len() as u64) as usize),
        2 => {
            bad = (0..rng.range(1, 80))
                .map(|_| b"{}[]\":,0123456789abcxyz \x01\xff"[rng.range(0, 26) as usize])
                .collect();
        }
        _ => {
            // One digit of the time value, as a bit flip inside a digit would.
            let text = String::from_utf8_lossy(line);
            if let Some(at) = text.find("\"ts\":") {
                let digits: Vec<usize> = (at + 5..bad.len())
                    .take_while(|&i| bad[i] != b',' && bad[i] != b'}')
                    .filter(|&i| bad[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let i = digits[rng.range(0, digits.len() as u64) as usize];
                    bad[i] = b'0' + rng.range(0, 10) as u8;
                }
            }
        }
    }
    bad
}

/// Corrupts a share of every data file's lines in place; writes the untouched lines to
/// the same files under `clean/` for the reference.
fn corrupt_data_set(dir: &Path, rng: &mut TestRng) -> usize {
    let mut corrupted = 0;
    for stream in ["impressions", "plays"] {
        let folder = dir.join("data").join(stream);
        let clean_folder = dir.join("clean").join(stream);
        std::fs::create_dir_all(&clean_folder).expect("clean folder");
        for entry in std::fs::read_dir(&folder).expect("data") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            let (mut dirty, mut clean) = (Vec::new(), Vec::new());
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if (rng.next() % 1_000_000) as f64 / 1e6 < CORRUPT_SHARE {
                    dirty.extend_from_slice(&corrupt(line, rng));
                    corrupted += 1;
                } else {
                    dirty.extend_from_slice(line);
                    clean.extend_from_slice(line);
                    clean.push(b'\n');
                }
                dirty.push(b'\n');
            }
            std::fs::write(&path, dirty).expect("write");
            std::fs::write(clean_folder.join(path.file_name().expect("name")), clean)
                .expect("write");
        }
    }
    corrupted
}

/// The share of `reference` rows found in `output` (as multisets).
fn kept_share(reference: &[String], output: &[String]) -> f64 {
    let mut present: HashMap<&str, usize> = HashMap::new();
    for line in output {
        *present.entry(line.as_str()).or_default() += 1;
    }
    let kept = reference
        .iter()
        .filter(|row| match present.get_mut(row.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count();
    kept as f64 / reference.len().max(1) as f64
}

#[test]
fn random_corruption_keeps_the_pairs_of_uncorrupted_events() {
    let mut rng = TestRng(seed());
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 200_000, rng.next() % 1_000);
    let corrupted = corrupt_data_set(dir.path(), &mut rng);
    let job = write_job(dir.path(), "left", ("0s", "1h"), "16MiB");
    run(&job);
    let unguarded = variant(&job, "unguarded", "corroborate = 0");
    run(&unguarded);

    let (left, _) = reference_events(&dir.path().join("clean/impressions"));
    let (right, _) = reference_events(&dir.path().join("clean/plays"));
    let pairs = reference_join(&left, &right, "inner", 0, 3_600_000);
    let guarded = kept_share(&pairs, &committed_lines(&dir.path().join("out")));
    let off = kept_share(&pairs, &committed_lines(&dir.path().join("out-unguarded")));
    let s = summary(&dir.path().join("out"));
    println!(
        "{corrupted} lines corrupted; of {} reference pairs the guarded run kept {:.4}, \
         the unguarded one {:.4}; late {} + {}, far ahead {} + {}",
        pairs.len(),
        guarded,
        off,
        s["left"]["late"],
        s["right"]["late"],
        s["left"]["dead_time_jumps"],
        s["right"]["dead_time_jumps"],
    );
    assert_eq!(s["accounted"], true);
    assert!(pairs.len() > 10_000, "a data set with pairs to lose");
    assert!(guarded >= KEPT_SHARE_MIN, "kept {guarded:.4} of the pairs");
    assert!(off < guarded, "without the guard corrupt times cost pairs");
}

#[test]
fn one_far_future_event_changes_nothing_but_its_own_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 30_000, 7);
    let job = write_job(dir.path(), "full", ("0s", "1h"), "64MiB");
    let clean = variant(&job, "clean", "");
    run(&clean);
    let want = committed_lines(&dir.path().join("out-clean"));

    // Three years ahead, in the middle of each stream.
    for (stream, ts) in [
        ("impressions", "4800000000000"),
        ("plays", "\"2099-01-01T00:00:00Z\""),
    ] {
        let folder = dir.path().join("data").join(stream);
        let mut files: Vec<_> = std::fs::read_dir(&folder)
            .expect("data")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        let bytes = std::fs::read(&files[0]).expect("read");
        let lines: Vec<&[u8]> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let middle = lines.len() / 2;
        let far = format!(r#"{{"event_id":"far-{stream}","profile_id":1,"title_id":1,"ts":{ts}}}"#);
        let mut out: Vec<&[u8]> = lines[..middle].to_vec();
        out.push(far.as_bytes());
        out.extend(&lines[middle..]);
        std::fs::write(&files[0], [out.join(&b'\n'), b"\n".to_vec()].concat()).expect("write");
    }
    run(&job);
    assert_eq!(committed_lines(&dir.path().join("out")), want);
    let dead = committed_lines(&dir.path().join("out/_dead"));
    let far: Vec<&String> = dead.iter().filter(|l| l.contains("far-")).collect();
    assert_eq!(far.len(), 2, "{far:#?}");
    for line in far {
        assert!(
            line.contains("ahead of its partition's corroborated time"),
            "{line}"
        );
    }
    let s = summary(&dir.path().join("out"));
    assert_eq!(s["left"]["dead_time_jumps"], 1);
    assert_eq!(s["right"]["dead_time_jumps"], 1);
}

/// Two data sets back to back in each stream: the second starts `gap_ms` after the
/// first (both streams silent in between), or, with a negative gap, the first is
/// history that old before the second.
fn joins_exactly_across(gap_ms: i64, seed: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let first_start_ms = if gap_ms >= 0 {
        1_700_000_000_000
    } else {
        1_700_000_000_000 + gap_ms
    };
    let parts = [(first_start_ms, "a"), (first_start_ms + gap_ms.abs(), "b")];
    for (i, (start_ms, part)) in parts.iter().enumerate() {
        let at = dir.path().join(part);
        let start = chrono::DateTime::from_timestamp_millis(*start_ms)
            .expect("a time")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_success(&braid(&[
            "generate",
            "--out",
            at.to_str().expect("utf-8"),
            "--events",
            "20000",
            "--seed",
            &(seed + i as u64).to_string(),
            "--start",
            &start,
            "--profiles",
            "300",
            "--titles",
            "50",
        ]));
        for stream in ["impressions", "plays"] {
            let to = dir.path().join("data").join(stream);
            std::fs::create_dir_all(&to).expect("data folder");
            for entry in std::fs::read_dir(at.join("data").join(stream)).expect("part") {
                let path = entry.expect("entry").path();
                let name = format!(
                    "{part}-{}",
                    path.file_name().expect("name").to_string_lossy()
                );
                std::fs::copy(&path, to.join(name)).expect("copy");
            }
        }
    }
    let job = write_job(dir.path(), "full", ("0s", "1h"), "64MiB");
    run(&job);
    let (left, _) = reference_events(&dir.path().join("data/impressions"));
    let (right, _) = reference_events(&dir.path().join("data/plays"));
    let want = reference_join(&left, &right, "full", 0, 3_600_000);
    let got = committed_lines(&dir.path().join("out"));
    assert_eq!(got.len(), want.len(), "gap {gap_ms} ms");
    assert!(
        got == want,
        "gap {gap_ms} ms: output differs from the reference"
    );
    let s = summary(&dir.path().join("out"));
    assert_eq!(s["left"]["late"], 0);
    assert_eq!(s["right"]["late"], 0);
    assert_eq!(s["left"]["dead_time_jumps"], 0);
    assert_eq!(s["right"]["dead_time_jumps"], 0);
}

#[test]
fn streams_silent_for_a_day_resume_and_join_exactly() {
    joins_exactly_across(DAY_MS, 11);
}

#[test]
fn history_months_old_followed_by_current_data_joins_exactly() {
    joins_exactly_across(-120 * DAY_MS, 21);
}
