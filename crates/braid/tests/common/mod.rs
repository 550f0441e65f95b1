//! Helpers of the end-to-end tests: run the real binary, read committed output, and an
//! independent reference join over the same input files.

#![allow(dead_code)]

pub mod chromium;
pub mod kafka;
pub mod moto;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn braid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(args)
        .output()
        .expect("the braid binary runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "braid failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// Generates a take-rate data set under `dir/data` with `braid generate`.
pub fn generate(dir: &Path, events: u64, seed: u64) {
    generate_for_members(dir, events, seed, 300);
}

/// [`generate`] with `profiles` members instead of 300: the rows of a join grow with
/// the square of the events per key (50 titles; an hour's window spans them all).
pub fn generate_for_members(dir: &Path, events: u64, seed: u64, profiles: u64) {
    let out = braid(&[
        "generate",
        "--out",
        dir.to_str().expect("utf-8 path"),
        "--events",
        &events.to_string(),
        "--seed",
        &seed.to_string(),
        "--lines-per-file",
        &(events / 3 + 1).to_string(),
        "--malformed-rate",
        "0.002",
        "--duplicate-rate",
        "0.02",
        // Few members and titles, so that keys repeat and plays find impressions.
        "--profiles",
        &profiles.to_string(),
        "--titles",
        "50",
    ]);
    assert_success(&out);
}

/// A job over `dir/data` with the given join type and bounds, writing to `dir/out`.
pub fn write_job(dir: &Path, kind: &str, within: (&str, &str), memory_max: &str) -> PathBuf {
    let job = format!(
        r#"name = "e2e"
parallelism = 2

[[source]]
name = "impressions"
kind = "files"
path = "data/impressions/*.ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[[source]]
name = "plays"
kind = "files"
path = "data/plays/*.ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[join]
left = "impressions"
right = "plays"
type = "{kind}"
within = ["{}", "{}"]

[time]
max_out_of_orderness = "5s"

[output]
kind = "files"
path = "out"

[state]
dir = "state"
memory_max = "{memory_max}"
"#,
        within.0, within.1
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, job).expect("write job");
    path
}

/// Every line of the committed (visible) `.ndjson` files in `dir`, sorted.
pub fn committed_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return lines;
    };
    for entry in entries {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.starts_with('.') || name.starts_with('_') || !name.ends_with(".ndjson") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read output");
        lines.extend(text.lines().map(str::to_string));
    }
    lines.sort();
    lines
}

pub fn summary(out_dir: &Path) -> Value {
    let text = std::fs::read_to_string(out_dir.join("_summary.json")).expect("summary written");
    serde_json::from_str(&text).expect("summary is JSON")
}

/// One valid input event as the reference sees it.
#[derive(Clone, Debug)]
pub struct RefEvent {
    pub raw: String,
    pub key: Vec<Value>,
    pub time: i64,
}

/// Reads a source's files (sorted) and keeps the valid, first-seen events. Returns them
/// and the number of invalid lines.
pub fn reference_events(folder: &Path) -> (Vec<RefEvent>, usize) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .expect("data")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let mut events = Vec::new();
    let mut invalid = 0;
    let mut seen = HashSet::new();
    for file in files {
        let bytes = std::fs::read(&file).expect("read data");
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match reference_decode(line) {
                Some((event, id)) => {
                    if id.is_none_or(|id| seen.insert(id)) {
                        events.push(event);
                    }
                }
                None => invalid += 1,
            }
        }
    }
    (events, invalid)
}

fn reference_decode(line: &[u8]) -> Option<(RefEvent, Option<String>)> {
    let text = std::str::from_utf8(line).ok()?;
    let value: Value = serde_json::from_str(text).ok()?;
    let object = value.as_object()?;
    let mut key = Vec::new();
    for field in ["profile_id", "title_id"] {
        match object.get(field)? {
            v @ Value::String(_) => key.push(v.clone()),
            v @ Value::Number(n) if n.as_i64().is_some() => key.push(v.clone()),
            _ => return None,
        }
    }
    let time = match object.get("ts")? {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis(),
        _ => return None,
    };
    if !(0..=253_402_300_799_999).contains(&time) {
        return None;
    }
    let id = match object.get("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(format!("s{s}")),
        Some(Value::Number(n)) if n.as_i64().is_some() => Some(format!("i{n}")),
        Some(_) => return None,
    };
    Some((
        RefEvent {
            raw: text.to_string(),
            key,
            time,
        },
        id,
    ))
}

/// The interval join of the reference events plus the outer rows of `kind`, as the
/// exact output lines braid must write.
pub fn reference_join(
    left: &[RefEvent],
    right: &[RefEvent],
    kind: &str,
    lower_ms: i64,
    upper_ms: i64,
) -> Vec<String> {
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, r) in right.iter().enumerate() {
        by_key
            .entry(serde_json::to_string(&r.key).expect("key"))
            .or_default()
            .push(i);
    }
    let mut rows = Vec::new();
    let mut right_matched = vec![false; right.len()];
    for l in left {
        let mut matched = false;
        for &ri in by_key
            .get(&serde_json::to_string(&l.key).expect("key"))
            .into_iter()
            .flatten()
        {
            let d = right[ri].time - l.time;
            if lower_ms <= d && d <= upper_ms {
                rows.push(format!(
                    r#"{{"impressions":{},"plays":{}}}"#,
                    l.raw, right[ri].raw
                ));
                matched = true;
                right_matched[ri] = true;
            }
        }
        if !matched && (kind == "left" || kind == "full") {
            rows.push(format!(r#"{{"impressions":{},"plays":null}}"#, l.raw));
        }
    }
    if kind == "right" || kind == "full" {
        for (ri, r) in right.iter().enumerate() {
            if !right_matched[ri] {
                rows.push(format!(r#"{{"impressions":null,"plays":{}}}"#, r.raw));
            }
        }
    }
    rows.sort();
    rows
}

/// Adds a `[checkpoint]` section to a job file written by [`write_job`].
pub fn add_checkpoints(job: &Path, dir: &str, interval: &str) {
    let mut text = std::fs::read_to_string(job).expect("read job");
    text.push_str(&format!(
        "\n[checkpoint]\ndir = \"{dir}\"\ninterval = \"{interval}\"\n"
    ));
    std::fs::write(job, text).expect("write job");
}

/// Every line of the committed files of `_late/` and `_dead/` in `out`, sorted.
pub fn committed_side_lines(out: &Path) -> (Vec<String>, Vec<String>) {
    (
        committed_lines(&out.join("_late")),
        committed_lines(&out.join("_dead")),
    )
}

/// Whether `part` is a sub-multiset of `whole` (both sorted).
pub fn is_sub_multiset(part: &[String], whole: &[String]) -> bool {
    let mut i = 0;
    for line in part {
        while i < whole.len() && whole[i] < *line {
            i += 1;
        }
        if i == whole.len() || whole[i] != *line {
            return false;
        }
        i += 1;
    }
    true
}

/// The seed of a randomised test: `BRAID_SEED`, or one from the clock. Callers print
/// it so that a failure can be replayed.
pub fn seed() -> u64 {
    match std::env::var("BRAID_SEED") {
        Ok(s) => s.parse().expect("BRAID_SEED is a number"),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos();
            u64::try_from(nanos % 1_000_000).expect("below a million")
        }
    }
}

/// A small deterministic generator for test schedules (splitmix64).
pub struct TestRng(pub u64);

impl TestRng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// The newest manifest in a checkpoint folder, as JSON (the header line dropped).
pub fn newest_manifest(checkpoints: &Path) -> Value {
    let newest = std::fs::read_dir(checkpoints.join("manifests"))
        .expect("the manifests folder")
        .map(|e| e.expect("an entry").path())
        .max_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .expect("a manifest");
    let text = std::fs::read_to_string(&newest).expect("a manifest");
    let body = &text[text.find('\n').expect("a header line") + 1..];
    serde_json::from_str(body).expect("a manifest is JSON")
}

/// `GET path` of an HTTP server at `addr` (HOST:PORT): the status and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Prometheus' text format as series (`name{label="value",...}`, labels as written)
/// and their values.
pub fn parse_metrics(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut series = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("a series and its value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("a number in `{line}`"));
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        series.push((name.to_string(), labels, value));
    }
    series
}
