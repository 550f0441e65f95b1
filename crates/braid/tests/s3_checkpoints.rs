//! Proves that checkpoints kept in S3 are enough to resume a killed run. A left join
//! with a tiny memory budget (so that segments spill and are uploaded) checkpoints every
//! 200 ms to a real S3-compatible server, moto, which this test starts on a free
//! loopback port. The run is killed with SIGKILL soon after its first checkpoint
//! committed, its local state folder is deleted, and it is run again to the end: the
//! second run must restore from the newest manifest in the bucket, and the committed
//! output must equal an independent reference join exactly.
//!
//! moto: `common::moto`. The seed (`BRAID_SEED` replays one) and moto's port are
//! printed.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::moto::{moto_server, with_moto, KillOnDrop, Moto, POLL_INTERVAL};
use common::{
    assert_success, committed_lines, generate, reference_events, reference_join, summary, write_job,
};

const BUCKET: &str = "braid-checkpoints";
/// Keys under the bucket; the job's `[checkpoint] dir` is `s3://BUCKET/PREFIX`.
const PREFIX: &str = "job";
/// How long the first run may take to commit its first checkpoint.
const FIRST_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);
/// Enough that a run lasts well past its first checkpoint, so that the kill finds it
/// running. With 30,000 it could end (about 1.7 s) before the kill; 60,000 lasted
/// about 10 s while segments spilled into RocksDB, and less than a second since they
/// go to braid's own files (a fresh-clone CI run ended before its first manifest).
const EVENTS: u64 = 400_000;
/// The kill lands this long after the first manifest appeared, at most (from the seed),
/// so that it cuts the run at different points of the next epoch's uploads.
const KILL_DELAY_MS_MAX: u64 = 300;
/// Each manifest the first run writes waits this long first
/// (`BRAID_FAULTS=manifest-latency-ms`), so that the next checkpoint cannot commit
/// within the kill's delay. Without it a fresh-clone CI run read all its input while
/// the first checkpoint uploaded (4 s to moto), and the next manifest, the end of
/// input's with no spilled segments left, committed before the kill 0.5 s later. (A
/// wait on every request made the first checkpoint, of many small segment files, take
/// more than a minute.)
const FIRST_RUN_MANIFEST_LATENCY_MS: u64 = 2_000;

/// `braid run --quiet JOB` with credentials and endpoint for moto, and no other AWS
/// setting of the environment (a profile or an S3 endpoint there would win).
fn braid_run(job: &Path, port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command.args(["run", "--quiet"]).arg(job);
    with_moto(&mut command, port);
    command
}

/// Runs the job until its first checkpoint is in the bucket, then `kill_delay` more,
/// and kills it with SIGKILL. Returns the manifests seen before the kill.
fn run_and_kill(dir: &Path, job: &Path, moto: &Moto, kill_delay: Duration) -> Vec<String> {
    let manifests = format!("{PREFIX}/manifests/");
    let log = |name: &str| std::fs::File::create(dir.join(name)).expect("create log");
    let child = braid_run(job, moto.port)
        .env(
            "BRAID_FAULTS",
            format!("manifest-latency-ms:{FIRST_RUN_MANIFEST_LATENCY_MS}"),
        )
        .stdout(log("first-run.stdout"))
        .stderr(log("first-run.stderr"))
        .spawn()
        .expect("start braid");
    let mut braid = KillOnDrop(child);
    let started = Instant::now();
    let first = loop {
        if let Some(status) = braid.0.try_wait().expect("poll braid") {
            panic!(
                "the first run ended ({status}) before any checkpoint was in the bucket:\n{}",
                std::fs::read_to_string(dir.join("first-run.stderr")).unwrap_or_default()
            );
        }
        let keys = moto.keys(BUCKET, &manifests);
        if !keys.is_empty() {
            break keys;
        }
        assert!(
            started.elapsed() < FIRST_CHECKPOINT_TIMEOUT,
            "no checkpoint in the bucket after {FIRST_CHECKPOINT_TIMEOUT:?}"
        );
        std::thread::sleep(POLL_INTERVAL);
    };
    println!(
        "first checkpoint after {} ms: {first:?}",
        started.elapsed().as_millis()
    );
    let segments = moto.keys(BUCKET, &format!("{PREFIX}/files/"));
    assert!(
        segments.iter().any(|k| k.ends_with(".seg")),
        "a checkpoint is in the bucket, but no spilled segment file: {segments:?}"
    );
    std::thread::sleep(kill_delay);
    assert!(
        braid.0.try_wait().expect("poll braid").is_none(),
        "the first run ended before it could be killed; make the data set larger"
    );
    braid.0.kill().expect("SIGKILL braid");
    let status = braid.0.wait().expect("reap braid");
    assert_eq!(
        status.signal(),
        Some(9),
        "the first run was killed: {status}"
    );
    let manifests = moto.keys(BUCKET, &manifests);
    println!(
        "killed after {} ms; manifests in the bucket: {manifests:?}",
        started.elapsed().as_millis()
    );
    manifests
}

fn epoch_of(manifest_key: &str) -> u64 {
    manifest_key
        .rsplit('/')
        .next()
        .and_then(|name| name.strip_suffix(".manifest"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{manifest_key} is not a manifest's key"))
}

/// The number of spilled segments a manifest (a header line, then JSON) lists.
fn segments_in(manifest: &str) -> usize {
    let (_, body) = manifest.split_once('\n').expect("a manifest's header line");
    let manifest: serde_json::Value = serde_json::from_str(body).expect("a manifest's JSON");
    manifest["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|s| s["segments"].as_array().expect("segments").len())
        .sum()
}

fn check_output(dir: &Path, second: &Output, newest_epoch: u64) {
    assert_success(second);
    let out = dir.join("out");
    let s = summary(&out);
    let restored = s["checkpoints"]["restored_from_epoch"].as_u64();
    assert_eq!(
        restored,
        Some(newest_epoch),
        "the second run restores the newest checkpoint in the bucket: {s:#}"
    );
    assert_eq!(s["accounted"], true, "{s:#}");
    let (left, _) = reference_events(&dir.join("data/impressions"));
    let (right, _) = reference_events(&dir.join("data/plays"));
    let want = reference_join(&left, &right, "left", 0, 3_600_000);
    let got = committed_lines(&out);
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len(), "row count after the restore from S3");
    assert!(
        got == want,
        "rows after the restore from S3 differ from the reference"
    );
}

#[test]
fn killed_run_resumes_from_s3_without_local_state() {
    let seed = common::seed();
    let kill_delay = Duration::from_millis(seed % (KILL_DELAY_MS_MAX + 1));
    println!("seed {seed} (replay with BRAID_SEED={seed}); kill delay {kill_delay:?}");
    let exe = moto_server();
    let dir = tempfile::tempdir().expect("temp dir");
    let moto = Moto::start(&exe, &dir.path().join("moto.log"));
    println!("moto: {} on port {}", exe.display(), moto.port);
    moto.create_bucket(BUCKET);

    generate(dir.path(), EVENTS, seed);
    let job = write_job(dir.path(), "left", ("0s", "1h"), "256KiB");
    let text = std::fs::read_to_string(&job).expect("read job");
    let checkpoint =
        format!("[checkpoint]\ndir = \"s3://{BUCKET}/{PREFIX}\"\ninterval = \"200ms\"\n");
    std::fs::write(&job, format!("{text}\n{checkpoint}")).expect("write job");

    let manifests = run_and_kill(dir.path(), &job, &moto, kill_delay);
    let newest = manifests
        .iter()
        .map(|k| epoch_of(k))
        .max()
        .expect("a manifest");
    let segments =
        segments_in(&moto.get(BUCKET, &format!("{PREFIX}/manifests/{newest:020}.manifest")));
    println!("checkpoint {newest} lists {segments} spilled segments");
    assert!(
        segments > 0,
        "the restore must fetch spilled segments from the bucket"
    );
    // Only the bucket can restore the run now.
    std::fs::remove_dir_all(dir.path().join("state")).expect("remove the state folder");

    let started = Instant::now();
    let second = braid_run(&job, moto.port).output().expect("run braid");
    println!("second run: {:.1} s", started.elapsed().as_secs_f64());
    check_output(dir.path(), &second, newest);
    let after = moto.keys(BUCKET, &format!("{PREFIX}/manifests/"));
    assert!(!after.is_empty(), "manifests stay in the bucket");
}
