//! Proves that checkpoints kept in S3 are enough to resume a killed run. A left join
//! with a tiny memory budget (so that segments spill and are uploaded) checkpoints every
//! 200 ms to a real S3-compatible server, moto, which this test starts on a free
//! loopback port. The run is killed with SIGKILL soon after its first checkpoint
//! committed, its local state folder is deleted, and it is run again to the end: the
//! second run must restore from the newest manifest in the bucket, and the committed
//! output must equal an independent reference join exactly.
//!
//! moto comes from `BRAID_MOTO_SERVER` (a `moto_server` executable), else from
//! `target/moto-venv`, which `cargo xtask test` and `cargo xtask setup` install. The seed (`BRAID_SEED` replays one) and moto's port are printed.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_success, committed_lines, generate, reference_events, reference_join, summary, write_job,
};

const BUCKET: &str = "braid-checkpoints";
/// Keys under the bucket; the job's `[checkpoint] dir` is `s3://BUCKET/PREFIX`.
const PREFIX: &str = "job";
/// A first start of moto imports Flask and every service's models: seconds.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);
const MOTO_START_ATTEMPTS: usize = 3;
/// How long the first run may take to commit its first checkpoint.
const FIRST_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// What moto needs to take a request as authenticated; it checks no signature.
const UNCHECKED_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=braid-test/20260101/us-east-1/s3/aws4_request, \
    SignedHeaders=host, Signature=0000000000000000000000000000000000000000000000000000000000000000";
/// Twice the 30,000 of `join_kinds.rs`: over these, a run lasts several seconds past its first
/// checkpoint (about 10 s here, the first manifest after 1.5-2 s), so that the kill
/// finds it running. With 30,000 it could end (about 1.7 s) before the kill.
const EVENTS: u64 = 60_000;
/// The kill lands this long after the first manifest appeared, at most (from the seed),
/// so that it cuts the run at different points of the next epoch's uploads.
const KILL_DELAY_MS_MAX: u64 = 300;

/// A child process killed (SIGKILL) and reaped when the guard goes, panics included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A moto server on a loopback port, stopped when dropped.
struct Moto {
    process: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on a free port and waits until it answers; retries on another port
    /// if the one chosen was taken in between.
    fn start(exe: &Path, log: &Path) -> Moto {
        for attempt in 1..=MOTO_START_ATTEMPTS {
            let port = free_port();
            println!("starting moto on 127.0.0.1:{port} (attempt {attempt})");
            let log_file = std::fs::File::create(log).expect("create moto's log");
            let child = Command::new(exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log handle"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            let mut moto = Moto {
                process: KillOnDrop(child),
                port,
                log: log.to_path_buf(),
            };
            if moto.wait_until_ready() {
                return moto;
            }
            println!("moto exited early:\n{}", moto.log_text());
        }
        panic!("moto did not start in {MOTO_START_ATTEMPTS} attempts; see the log above");
    }

    /// True once moto answers; false if it exited (a port taken, say).
    fn wait_until_ready(&mut self) -> bool {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.0.try_wait().expect("poll moto") {
                println!("moto ended with {status}");
                return false;
            }
            if matches!(http(self.port, "GET", "/"), Ok((200, _))) {
                println!(
                    "moto answers on 127.0.0.1:{} after {:.1} s",
                    self.port,
                    started.elapsed().as_secs_f64()
                );
                return true;
            }
            assert!(
                started.elapsed() < MOTO_START_TIMEOUT,
                "moto did not answer on 127.0.0.1:{} within {MOTO_START_TIMEOUT:?}:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(self.port, "PUT", &format!("/{bucket}")).expect("PUT bucket");
        assert_eq!(status, 200, "creating bucket {bucket}: {body}");
    }

    /// The body of an object.
    fn get(&self, bucket: &str, key: &str) -> String {
        let (status, body) = http(self.port, "GET", &format!("/{bucket}/{key}")).expect("GET");
        assert_eq!(status, 200, "reading {key}: {body}");
        body
    }

    /// The keys under `prefix` (the first 1,000: enough to see that some exist).
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let target = format!("/{bucket}?list-type=2&prefix={prefix}");
        let (status, body) = http(self.port, "GET", &target).expect("list the bucket");
        assert_eq!(status, 200, "listing {target}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(key, _)| key.to_string()))
            .collect()
    }
}

/// A port free a moment ago: bound by the OS and released.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// One plain HTTP/1.0 request; the status and body of the answer. moto does not check
/// signatures, but it refuses anonymous reads of objects: hence an `Authorization`
/// header with a signature of zeros. HTTP/1.0, so that the server closes the connection
/// after one answer and never uses chunked encoding.
fn http(port: u16, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\
         Authorization: {UNCHECKED_AUTHORIZATION}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((status, body.to_string()))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace folder")
}

/// The `moto_server` to run: `BRAID_MOTO_SERVER`, else the workspace's venv, which
/// `cargo xtask test` (or `cargo xtask setup`) installs.
fn moto_server() -> PathBuf {
    if let Some(exe) = std::env::var_os("BRAID_MOTO_SERVER") {
        let exe = PathBuf::from(exe);
        assert!(
            exe.is_file(),
            "BRAID_MOTO_SERVER={} is not a file",
            exe.display()
        );
        return exe;
    }
    let exe = workspace().join("target/moto-venv/bin/moto_server");
    assert!(
        exe.is_file(),
        "{} is missing: moto, the S3 server of this test, is installed by `cargo xtask \
         setup` (or `cargo xtask test`); or set BRAID_MOTO_SERVER to a moto_server executable",
        exe.display()
    );
    exe
}

/// `braid run --quiet JOB` with credentials and endpoint for moto, and no other AWS
/// setting of the environment (a profile or an S3 endpoint there would win).
fn braid_run(job: &Path, port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command.args(["run", "--quiet"]).arg(job);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    command
        .env("AWS_ACCESS_KEY_ID", "braid-test")
        .env("AWS_SECRET_ACCESS_KEY", "braid-test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        // A proxy of the environment must not see loopback traffic.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    command
}

/// Runs the job until its first checkpoint is in the bucket, then `kill_delay` more,
/// and kills it with SIGKILL. Returns the manifests seen before the kill.
fn run_and_kill(dir: &Path, job: &Path, moto: &Moto, kill_delay: Duration) -> Vec<String> {
    let manifests = format!("{PREFIX}/manifests/");
    let log = |name: &str| std::fs::File::create(dir.join(name)).expect("create log");
    let child = braid_run(job, moto.port)
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
        segments.iter().any(|k| k.ends_with(".sst")),
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
