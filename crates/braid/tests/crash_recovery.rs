//! Exactly-once through crashes, on the real binary: `braid run` is SIGKILLed at random
//! moments and restarted until its input is consumed; the committed output then equals
//! an independent reference join exactly (nothing lost, nothing twice), for a left and a
//! full join with most state on disk. After every kill the visible output must already
//! be a part of the reference: a crash never exposes a row that is wrong or doubled.
//!
//! The full join's data also carries far-future events (one every
//! [`FAR_FUTURE_EVERY`] lines of each stream), which the time guard holds and then
//! dead-letters: kills that land while it holds some prove that what it holds is
//! checkpointed and restored, neither lost nor doubled.
//!
//! Each schedule prints its seed; `BRAID_CRASH_SEED=N` replays one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{
    add_checkpoints, assert_success, braid, committed_lines, committed_side_lines,
    generate_for_members, is_sub_multiset, newest_manifest, reference_events, reference_join,
    summary, write_job, TestRng,
};

/// Kills per schedule; four schedules give at least 20 per test run.
const KILLS_PER_SCHEDULE: usize = 6;
/// Lines of a schedule's input, over [`MEMBERS`] members: enough for about 20
/// checkpoints in a whole run (about 2 s here), so that kills drawn as shares of the
/// input land inside runs. (At 200,000 lines a whole run took 0.4 s and 4 checkpoints,
/// and too many kills came after its end.)
const EVENTS: u64 = 600_000;
/// Members of the generated data: 5 times `generate`'s 300 for 3 times its usual
/// events, so that the joined rows (about 1.1 M) grow with the events, not their square.
const MEMBERS: u64 = 1_500;
/// A kill inside a run lands once a checkpoint of the run has read up to this share,
/// in thousandths, of the input lines left.
const KILL_SHARE_MAX: u64 = 600;
/// ... and then up to this long later: one checkpoint interval (100 ms), so that such
/// kills hit every phase of an epoch.
const KILL_EXTRA_MS_MAX: u64 = 100;
/// How long a run may take to reach a kill's share of its input before it is killed
/// anyway.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines between injected far-future events, in the full join's schedules.
const FAR_FUTURE_EVERY: usize = 300;

/// Inserts a far-future event (event id `far-N`, years ahead) every `every` lines of
/// each stream's files; returns how many.
fn inject_far_future(dir: &std::path::Path, every: usize) -> usize {
    let mut injected = 0;
    for (stream, ts) in [
        ("impressions", "4800000000000"),
        ("plays", "\"2099-01-01T00:00:00Z\""),
    ] {
        for entry in std::fs::read_dir(dir.join("data").join(stream)).expect("data") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            let mut out = Vec::with_capacity(bytes.len());
            for (i, line) in bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                if i % every == every / 2 {
                    injected += 1;
                    out.extend_from_slice(
                        format!(r#"{{"event_id":"far-{injected}","profile_id":1,"title_id":1,"ts":{ts}}}"#)
                            .as_bytes(),
                    );
                    out.push(b'\n');
                }
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            std::fs::write(&path, out).expect("write");
        }
    }
    injected
}

/// When a run is killed, drawn from the seed for each run.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// This long after the start: at start-up, restore, or wherever the run is then.
    Delay(u64),
    /// Once a checkpoint of the run has read more than `share` thousandths of the
    /// input lines left, and `extra_ms` after that. A share of the input, not a time,
    /// so that the kill lands inside the run however fast braid is.
    Read { share: u64, extra_ms: u64 },
}

impl KillAt {
    fn draw(rng: &mut TestRng, delay_ms: (u64, u64)) -> KillAt {
        let share = rng.range(0, KILL_SHARE_MAX);
        let extra_ms = rng.range(0, KILL_EXTRA_MS_MAX);
        match rng.range(0, 10) {
            0..=3 => KillAt::Delay(rng.range(delay_ms.0, delay_ms.1)),
            _ => KillAt::Read { share, extra_ms },
        }
    }
}

/// The input lines the newest checkpoint in a folder has read, over the sources.
struct CheckpointWatch {
    manifests: PathBuf,
    /// The newest epoch seen and its lines: a manifest is parsed once.
    seen: Option<(u64, u64)>,
}

impl CheckpointWatch {
    fn new(checkpoints: &Path) -> CheckpointWatch {
        CheckpointWatch {
            manifests: checkpoints.join("manifests"),
            seen: None,
        }
    }

    /// The lines; 0 before the first checkpoint, `None` while the newest manifest
    /// cannot be read (being replaced).
    fn input(&mut self) -> Option<u64> {
        let Ok(entries) = std::fs::read_dir(&self.manifests) else {
            return Some(0);
        };
        let Some(newest) = entries
            .filter_map(|e| e.ok()?.path().file_stem()?.to_str()?.parse::<u64>().ok())
            .max()
        else {
            return Some(0);
        };
        if let Some((epoch, lines)) = self.seen {
            if epoch == newest {
                return Some(lines);
            }
        }
        let text =
            std::fs::read_to_string(self.manifests.join(format!("{newest:020}.manifest"))).ok()?;
        let manifest: serde_json::Value =
            serde_json::from_str(&text[text.find('\n')? + 1..]).ok()?;
        let lines = manifest["reader"]["sources"]
            .as_array()?
            .iter()
            .map(|source| source["counts"]["input"].as_u64())
            .sum::<Option<u64>>()?;
        self.seen = Some((newest, lines));
        Some(lines)
    }
}

/// Waits for the moment `at` of `child`, which has `lines_left` input lines past the
/// checkpoints `watch` sees; returns its exit status if it ended first.
fn wait_for_moment(
    child: &mut Child,
    watch: &mut CheckpointWatch,
    at: KillAt,
    lines_left: u64,
) -> Option<ExitStatus> {
    let wait_until = |child: &mut Child, reached: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if reached() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.try_wait().expect("wait")
    };
    let after = |ms: u64| {
        let from = Instant::now();
        move || from.elapsed() >= Duration::from_millis(ms)
    };
    match at {
        KillAt::Delay(ms) => wait_until(child, &mut after(ms)),
        KillAt::Read { share, extra_ms } => {
            let mark = watch.input().unwrap_or(0) + lines_left * share / 1000;
            let mut read_past_mark = || watch.input().is_some_and(|n| n > mark);
            if let Some(status) = wait_until(child, &mut read_past_mark) {
                return Some(status);
            }
            wait_until(child, &mut after(extra_ms))
        }
    }
}

/// Runs one kill-and-restart schedule; returns the number of kills that hit a running
/// process.
fn crash_schedule(kind: &str, seed: u64) -> usize {
    crash_schedule_with(kind, seed, &[2], (20, 400)).0
}

/// [`crash_schedule`], with run `i` (killed or not) on `parallelisms[i % len]` shards,
/// each killed at a moment drawn with delays from `delay_ms`. Returns the kills, and the runs
/// that logged a re-split of the restored state.
fn crash_schedule_with(
    kind: &str,
    seed: u64,
    parallelisms: &[usize],
    delay_ms: (u64, u64),
) -> (usize, usize) {
    let seed = std::env::var("BRAID_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);
    eprintln!("crash schedule: {kind} join, seed {seed} (replay with BRAID_CRASH_SEED={seed})");
    let dir = tempfile::tempdir().expect("temp dir");
    generate_for_members(dir.path(), EVENTS, seed, MEMBERS);
    let far = if kind == "full" {
        inject_far_future(dir.path(), FAR_FUTURE_EVERY)
    } else {
        0
    };
    let job = write_job(dir.path(), kind, ("0s", "1h"), "1MiB");
    add_checkpoints(&job, "checkpoints", "100ms");
    let not_far = |e: &common::RefEvent| !e.raw.contains("\"far-");
    let (mut left, left_invalid) = reference_events(&dir.path().join("data/impressions"));
    let (mut right, right_invalid) = reference_events(&dir.path().join("data/plays"));
    left.retain(not_far);
    right.retain(not_far);
    let want = reference_join(&left, &right, kind, 0, 3_600_000);
    let out = dir.path().join("out");
    let mut rng = TestRng(seed);
    let mut kills = 0;
    let mut runs = 0;
    let mut resplits = 0;
    let job_text = std::fs::read_to_string(&job).expect("job");
    let set_parallelism = |run: usize| {
        let p = parallelisms[run % parallelisms.len()];
        let text = job_text.replace("parallelism = 2", &format!("parallelism = {p}"));
        std::fs::write(&job, text).expect("write job");
    };
    // Logs of each run, read after it ends, to count re-splits.
    let log = dir.path().join("run.log");
    let logged_resplit = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("re-split the checkpoint's state by key")
    };
    let mut watch = CheckpointWatch::new(&dir.path().join("checkpoints"));
    let lines = EVENTS + far as u64;
    while kills < KILLS_PER_SCHEDULE {
        let at = KillAt::draw(&mut rng, delay_ms);
        let lines_left = lines.saturating_sub(watch.input().unwrap_or(0));
        set_parallelism(runs);
        let mut child = Command::new(env!("CARGO_BIN_EXE_braid"))
            .args(["run", "-v", job.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("braid starts");
        runs += 1;
        let started = Instant::now();
        let finished = wait_for_moment(&mut child, &mut watch, at, lines_left);
        let moment = format!(
            "{at:?}, {} ms into run {runs}",
            started.elapsed().as_millis()
        );
        match finished {
            Some(status) => {
                assert!(
                    status.success(),
                    "seed {seed}, run {runs}: braid failed: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                resplits += usize::from(logged_resplit());
                break;
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reaped");
                kills += 1;
                resplits += usize::from(logged_resplit());
            }
        }
        let visible = committed_lines(&out);
        eprintln!(
            "seed {seed}: {moment}: {} of {} rows visible",
            visible.len(),
            want.len()
        );
        assert!(
            is_sub_multiset(&visible, &want),
            "seed {seed}: after kill {kills} ({moment}) the visible output holds a row that is not in the reference, or one row twice"
        );
    }
    // Resume to the end; when rescaling, on shards other than the last checkpoint's,
    // so that this run re-splits whatever the kills left.
    let checkpointed_shards = dir
        .path()
        .join("checkpoints/manifests")
        .exists()
        .then(|| newest_manifest(&dir.path().join("checkpoints")))
        .and_then(|m| {
            let shards = m["units"]
                .as_array()?
                .iter()
                .filter_map(|u| u["shard"].as_u64());
            shards.max().map(|s| s as usize + 1)
        });
    let last_parallelism = parallelisms
        .iter()
        .position(|&p| Some(p) != checkpointed_shards)
        .unwrap_or(0);
    set_parallelism(last_parallelism);
    let last = braid(&["run", "-v", job.to_str().expect("utf-8")]);
    assert_success(&last);
    let last_resplit =
        String::from_utf8_lossy(&last.stderr).contains("re-split the checkpoint's state by key");
    if parallelisms.len() > 1 && checkpointed_shards.is_some() {
        assert!(
            last_resplit,
            "seed {seed}: the last run, on {} shards, restored a checkpoint of {checkpointed_shards:?} shards without re-splitting it",
            parallelisms[last_parallelism]
        );
    }
    resplits += usize::from(last_resplit);
    let got = committed_lines(&out);
    assert_eq!(
        got.len(),
        want.len(),
        "seed {seed}: row count of a {kind} join after {kills} kills"
    );
    assert!(
        got == want,
        "seed {seed}: rows of a {kind} join after {kills} kills differ from the reference"
    );
    let (late, dead) = committed_side_lines(&out);
    assert!(late.is_empty());
    assert_eq!(
        dead.len(),
        left_invalid + right_invalid + far,
        "seed {seed}: dead letters exactly once"
    );
    assert_eq!(
        dead.iter().filter(|l| l.contains("\"far-")).count(),
        far,
        "seed {seed}: each far-future event dead-lettered once"
    );
    let s = summary(&out);
    assert_eq!(s["accounted"], true, "{s:#}");
    let read =
        s["left"]["read"].as_u64().expect("count") + s["right"]["read"].as_u64().expect("count");
    assert_eq!(
        read,
        EVENTS + far as u64,
        "seed {seed}: every line read exactly once over all runs"
    );
    eprintln!(
        "seed {seed}: {kills} kills over {runs} runs ({resplits} re-split the state), output exact"
    );
    (kills, resplits)
}

#[test]
fn left_join_survives_sigkill_at_random_moments() {
    let kills = crash_schedule("left", 101) + crash_schedule("left", 102);
    assert!(kills >= 10, "only {kills} kills hit a running process");
}

#[test]
fn full_join_survives_sigkill_at_random_moments() {
    let kills = crash_schedule("full", 201) + crash_schedule("full", 202);
    assert!(kills >= 10, "only {kills} kills hit a running process");
}

/// Rescaling in one process (issue 10): every run has another `parallelism` (2, 3, 1,
/// ...) and the job's single partition is split over the shards by key group, so each
/// restore re-splits the checkpoint's state by key. Killed at random moments as above
/// (delays of 40 to 300 ms land in start-up and the restore's re-split), the output is
/// still exactly the reference.
#[test]
fn a_restart_with_another_parallelism_re_splits_the_state() {
    let (kills, resplits) = crash_schedule_with("full", 301, &[2, 3, 1], (40, 300));
    assert!(kills >= 4, "only {kills} kills hit a running process");
    // The last run re-splits for certain (asserted in the schedule); the killed ones
    // only when a kill lands after their re-split, which depends on the machine.
    assert!(resplits >= 1, "no run re-split a restored state");
}
