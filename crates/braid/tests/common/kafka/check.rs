//! The exactness check of a Kafka job's output: the input as lines, the independent
//! reference (`common::reference_events` and `reference_join`) over the input less the
//! events the job reported late, and the comparison.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    key_of, partition_of, produce_lines, read_committed, IMPRESSIONS, OUT, OUT_DEAD, OUT_LATE,
    PARTITIONS, PLAYS, WINDOW_MS,
};
use crate::common::{reference_events, reference_join, RefEvent};

/// The input lines of a job: each source's lines in order.
#[derive(Default)]
pub struct Input {
    pub impressions: Vec<Vec<u8>>,
    pub plays: Vec<Vec<u8>>,
}

impl Input {
    /// The lines of a data set written by `common::generate` under `dir/data`, each
    /// source's files in lexical order.
    pub fn generated(dir: &Path) -> Input {
        Input {
            impressions: folder_lines(&dir.join("data").join(IMPRESSIONS)),
            plays: folder_lines(&dir.join("data").join(PLAYS)),
        }
    }

    /// Appends `more`'s lines.
    pub fn extend(&mut self, more: Input) {
        self.impressions.extend(more.impressions);
        self.plays.extend(more.plays);
    }

    /// Produces every line to its topic.
    pub fn produce(&self, bootstrap: &str) {
        produce_lines(bootstrap, IMPRESSIONS, PARTITIONS, &self.impressions);
        produce_lines(bootstrap, PLAYS, PARTITIONS, &self.plays);
    }

    /// The input cut in three: the first half, a quarter, the rest (of each source).
    pub fn thirds(&self) -> [Input; 3] {
        let cut = |lines: &[Vec<u8>]| {
            let (a, b) = (lines.len() / 2, lines.len() * 3 / 4);
            [
                lines[..a].to_vec(),
                lines[a..b].to_vec(),
                lines[b..].to_vec(),
            ]
        };
        let [i1, i2, i3] = cut(&self.impressions);
        let [p1, p2, p3] = cut(&self.plays);
        [
            Input {
                impressions: i1,
                plays: p1,
            },
            Input {
                impressions: i2,
                plays: p2,
            },
            Input {
                impressions: i3,
                plays: p3,
            },
        ]
    }

    fn source(&self, name: &str) -> &[Vec<u8>] {
        match name {
            IMPRESSIONS => &self.impressions,
            PLAYS => &self.plays,
            other => panic!("no source {other}"),
        }
    }
}

fn folder_lines(folder: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap_or_else(|e| panic!("read {}: {e}", folder.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).expect("read data");
        lines.extend(
            bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .map(<[u8]>::to_vec),
        );
    }
    lines
}

/// The reference's valid first-seen events among `lines`, and how many lines it holds
/// invalid: `common::reference_events` over the lines written to a file.
pub fn reference_of_lines(lines: &[Vec<u8>]) -> (Vec<RefEvent>, usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    std::fs::write(dir.path().join("part-0000.ndjson"), bytes).expect("write lines");
    reference_events(dir.path())
}

/// What a job's output topics hold (committed records only).
pub struct Outputs {
    pub joined: Vec<String>,
    pub late: Vec<String>,
    pub dead: Vec<String>,
}

pub fn read_outputs(bootstrap: &str) -> Outputs {
    Outputs {
        joined: read_committed(bootstrap, OUT),
        late: read_committed(bootstrap, OUT_LATE),
        dead: read_committed(bootstrap, OUT_DEAD),
    }
}

/// A JSON text in one canonical form (keys sorted), to compare events whatever their
/// spacing or key order.
fn canonical(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON")
}

/// Takes the late records' events out of the input: each late record must be a valid
/// input line of its source, one input line per late record. Returns the remaining
/// lines of each source. Removing the line rather than the event keeps duplicates
/// right: if the first of two copies was late, the second becomes the first seen.
fn without_late(input: &Input, late: &[String]) -> Result<Input, String> {
    let mut removed: BTreeMap<&str, HashSet<usize>> = BTreeMap::new();
    let mut by_text: BTreeMap<&str, HashMap<String, VecDeque<usize>>> = BTreeMap::new();
    for source in [IMPRESSIONS, PLAYS] {
        let mut index: HashMap<String, VecDeque<usize>> = HashMap::new();
        for (i, line) in input.source(source).iter().enumerate() {
            if let Ok(value) = serde_json::from_slice::<Value>(line) {
                index.entry(canonical(&value)).or_default().push_back(i);
            }
        }
        by_text.insert(source, index);
        removed.insert(source, HashSet::new());
    }
    for record in late {
        let parsed: Value = serde_json::from_str(record)
            .map_err(|e| format!("a late record is not JSON ({e}): {record}"))?;
        let source = parsed["source"].as_str().unwrap_or_default();
        let index = by_text
            .get_mut(source)
            .ok_or_else(|| format!("a late record names no source of the job: {record}"))?;
        let i = index
            .get_mut(&canonical(&parsed["event"]))
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| {
                format!("a late record's event is not an input line of {source} (or is late twice): {record}")
            })?;
        removed.get_mut(source).expect("listed").insert(i);
    }
    let keep = |source: &str| -> Vec<Vec<u8>> {
        let gone = &removed[source];
        let lines = input.source(source);
        (0..lines.len())
            .filter(|i| !gone.contains(i))
            .map(|i| lines[i].clone())
            .collect()
    };
    let remaining = Input {
        impressions: keep(IMPRESSIONS),
        plays: keep(PLAYS),
    };
    for source in [IMPRESSIONS, PLAYS] {
        let before = reference_of_lines(input.source(source)).1;
        let after = reference_of_lines(remaining.source(source)).1;
        if before != after {
            return Err(format!(
                "{} late records of {source} are lines the reference holds invalid (dead letters)",
                before - after
            ));
        }
    }
    Ok(remaining)
}

/// The joined rows the reference expects of a left join within [`WINDOW_MS`] over the
/// input less the late records' events, sorted.
pub fn expected_rows(input: &Input, late: &[String]) -> Result<Vec<String>, String> {
    let remaining = without_late(input, late)?;
    let (left, _) = reference_of_lines(&remaining.impressions);
    let (right, _) = reference_of_lines(&remaining.plays);
    Ok(reference_join(
        &left,
        &right,
        "left",
        WINDOW_MS.0,
        WINDOW_MS.1,
    ))
}

/// The texts of the lines the reference holds valid, duplicates or not. The reference
/// keeps only the first of the events that share an id, so the lines go to it in
/// rounds in which no id repeats: the first line of each id, then the second, ...
fn valid_texts(lines: &[Vec<u8>]) -> HashSet<String> {
    let mut rounds: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in lines {
        let id = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("event_id").map(canonical));
        let round = id.map_or(0, |id| {
            let n = seen.entry(id).or_insert(0);
            *n += 1;
            *n - 1
        });
        if rounds.len() <= round {
            rounds.resize(round + 1, Vec::new());
        }
        rounds[round].push(line.clone());
    }
    rounds
        .iter()
        .flat_map(|round| reference_of_lines(round).0)
        .map(|event| event.raw)
        .collect()
}

/// `(source, raw)` of every input line the reference holds invalid, as a dead letter
/// shows it (invalid UTF-8 replaced), sorted.
fn expected_dead(input: &Input) -> Vec<(String, String)> {
    let mut dead = Vec::new();
    for source in [IMPRESSIONS, PLAYS] {
        let lines = input.source(source);
        let valid = valid_texts(lines);
        for line in lines {
            if std::str::from_utf8(line).map_or(true, |text| !valid.contains(text)) {
                dead.push((
                    source.to_string(),
                    String::from_utf8_lossy(line).into_owned(),
                ));
            }
        }
    }
    dead.sort();
    dead
}

/// Checks a job's committed output against the reference over `input`: the dead
/// letters are exactly the invalid lines (compared by `raw`); every late record is a
/// valid input event, once; the joined rows equal the reference join over the input
/// less the late events exactly (nothing missing, nothing extra, nothing twice).
/// Rows for which `ignore` holds are left out on both sides.
pub fn check_exact(
    input: &Input,
    got: &Outputs,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let dead = dead_letters(&got.dead)?;
    let want_dead = expected_dead(input);
    if dead != want_dead {
        return Err(format!(
            "dead letters differ from the invalid input lines: {} got, {} expected{}",
            dead.len(),
            want_dead.len(),
            describe_difference(&dead, &want_dead)
        ));
    }
    let mut want = expected_rows(input, &got.late)?;
    want.retain(|row| !ignore(row));
    let mut joined = got.joined.clone();
    joined.retain(|row| !ignore(row));
    if joined != want {
        return Err(format!(
            "joined rows differ from the reference less {} late events: {} got, {} expected{}",
            got.late.len(),
            joined.len(),
            want.len(),
            describe_difference(&joined, &want)
        ));
    }
    Ok(())
}

/// Checks what a job committed so far, or after a failure it may not recover from
/// completely: nothing the reference over `input` does not expect (no wrong row, no
/// row twice, no dead letter that is not an invalid input line, every late record a
/// valid input line, once). Returns how many expected rows are missing.
pub fn check_safe(input: &Input, got: &Outputs) -> Result<usize, String> {
    let dead = dead_letters(&got.dead)?;
    let want_dead = expected_dead(input);
    if !is_sub_multiset(&dead, &want_dead) {
        return Err(format!(
            "dead letters that are not invalid input lines, or twice:{}",
            describe_difference(&dead, &want_dead)
        ));
    }
    let want = expected_rows(input, &got.late)?;
    if !is_sub_multiset(&got.joined, &want) {
        return Err(format!(
            "joined rows that the reference less {} late events does not have, or twice:{}",
            got.late.len(),
            describe_difference(&got.joined, &want)
        ));
    }
    Ok(want.len() - got.joined.len())
}

/// Whether `part` is a sub-multiset of `whole` (both sorted).
fn is_sub_multiset<T: Ord>(part: &[T], whole: &[T]) -> bool {
    let mut i = 0;
    for item in part {
        while i < whole.len() && whole[i] < *item {
            i += 1;
        }
        if i == whole.len() || whole[i] != *item {
            return false;
        }
        i += 1;
    }
    true
}

/// `(source, raw)` of each dead letter, sorted.
fn dead_letters(records: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut dead = Vec::new();
    for record in records {
        let parsed: Value = serde_json::from_str(record)
            .map_err(|e| format!("a dead letter is not JSON ({e}): {record}"))?;
        let source = parsed["source"].as_str().unwrap_or_default().to_string();
        let raw = parsed["raw"].as_str().unwrap_or_default().to_string();
        dead.push((source, raw));
    }
    dead.sort();
    Ok(dead)
}

/// The first few rows missing from and extra in `got`, against `want` (both sorted).
pub fn describe_difference<T: Ord + std::fmt::Debug>(got: &[T], want: &[T]) -> String {
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < got.len() || j < want.len() {
        if j == want.len() || (i < got.len() && got[i] < want[j]) {
            extra.push(&got[i]);
            i += 1;
        } else if i == got.len() || want[j] < got[i] {
            missing.push(&want[j]);
            j += 1;
        } else {
            i += 1;
            j += 1;
        }
    }
    let first = |rows: &[&T]| -> String {
        rows.iter()
            .take(3)
            .map(|r| format!("\n    {r:?}"))
            .collect::<String>()
    };
    format!(
        "\n  {} missing, first:{}\n  {} extra (or twice), first:{}",
        missing.len(),
        first(&missing),
        extra.len(),
        first(&extra)
    )
}

/// Whether a joined row involves a flush event (see [`flush_events`]).
pub fn is_flush_row(row: &str) -> bool {
    row.contains("\"flush-")
}

/// Flush events per partition of each topic: more than the time guard's `corroborate`
/// (32), so that their jump is corroborated and moves the watermark.
const FLUSH_PER_PARTITION: usize = 80;
const DAY_MS: i64 = 86_400_000;

/// Events two days after `after_ms` for every partition of both topics, increasing in
/// time, with keys no other event has (impressions and plays apart too): an unbounded
/// job's watermark passes everything before them, so that every outer row comes out.
/// Their own rows stay pending; comparisons leave them out ([`is_flush_row`]).
pub fn flush_events(after_ms: i64) -> Input {
    let mut flush = Input::default();
    let mut next = 900_000_000;
    let mut n = 0;
    for _ in 0..FLUSH_PER_PARTITION {
        for p in 0..PARTITIONS {
            n += 1;
            let ts = after_ms + 2 * DAY_MS + n * 1_000;
            let profile = key_in(p, &mut next, 0);
            flush
                .impressions
                .push(impression_line(&format!("flush-imp-{n}"), profile, 0, ts));
            let profile = key_in(p, &mut next, 1);
            flush
                .plays
                .push(play_line(&format!("flush-play-{n}"), profile, 1, ts));
        }
    }
    flush
}

/// A profile id, the first from `*next` on, whose key `[profile, title]` falls in
/// partition `p` (so that keys of a test never repeat).
pub fn key_in(p: i32, next: &mut u64, title: u64) -> u64 {
    loop {
        let profile = *next;
        *next += 1;
        let key = format!("[{profile},{title}]");
        if partition_of(&key, PARTITIONS) == p {
            debug_assert_eq!(
                key_of(impression_line("x", profile, title, 0).as_slice()).as_deref(),
                Some(key.as_str())
            );
            return profile;
        }
    }
}

pub fn impression_line(id: &str, profile: u64, title: u64, ts: i64) -> Vec<u8> {
    format!(r#"{{"event_id":"{id}","profile_id":{profile},"title_id":{title},"ts":{ts},"row":1}}"#)
        .into_bytes()
}

pub fn play_line(id: &str, profile: u64, title: u64, ts: i64) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","profile_id":{profile},"title_id":{title},"ts":{ts},"device":"tv"}}"#
    )
    .into_bytes()
}

/// The largest event time of the input's valid events.
pub fn max_time(input: &Input) -> i64 {
    let (left, _) = reference_of_lines(&input.impressions);
    let (right, _) = reference_of_lines(&input.plays);
    left.iter()
        .chain(&right)
        .map(|e| e.time)
        .max()
        .expect("events")
}
