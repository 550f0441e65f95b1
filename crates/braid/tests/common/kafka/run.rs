//! Kafka jobs of the tests: the job file, `braid run` processes (killed, stopped with
//! SIGTERM), and waiting for a live job's output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::check::{check_exact, flush_events, is_flush_row, max_time, read_outputs, Input};
use super::{IMPRESSIONS, OUT, OUT_DEAD, OUT_LATE, PLAYS, RECEIVE_MESSAGE_MAX_BYTES};

/// How long braid may take to stop after SIGTERM: a final checkpoint and commit, or,
/// for an instance whose join the group has not answered yet, up to its
/// `JOIN_WAIT_ON_LEAVE` (60 s) for the answer and `LEAVE_WAIT` (5 s) to leave
/// (noida-db now and then answers no join for a minute; 1 schedule of about 20 this
/// session hit the 30 s this was before).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long output may take to appear, or to become complete, while braid runs.
pub const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The job file of the Kafka tests: the take-rate left join of `common::write_job`
/// between topics `impressions` and `plays`, into `out`, `out.late` and `out.dead`.
pub struct KafkaJob {
    pub brokers: String,
    /// `end` of both sources: `Some("latest")` for a bounded job.
    pub end: Option<String>,
    pub impressions_topic: String,
    pub output_topic: String,
    pub idle_timeout: Option<String>,
    pub checkpoint_interval: String,
    pub parallelism: usize,
    /// Lines added under `[output.properties]`.
    pub output_properties: Vec<(String, String)>,
    /// Lines added under each source's `[source.properties]`.
    pub source_properties: Vec<(String, String)>,
    /// `[join] repartition = true`.
    pub repartition: bool,
    /// `[checkpoint] keep`, if set.
    pub checkpoint_keep: Option<usize>,
}

/// `"name" = "value"` lines of a TOML properties table.
fn properties(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("\"{name}\" = \"{value}\"\n"))
        .collect()
}

impl KafkaJob {
    pub fn new(brokers: &str) -> KafkaJob {
        KafkaJob {
            brokers: brokers.to_string(),
            end: Some("latest".to_string()),
            impressions_topic: IMPRESSIONS.to_string(),
            output_topic: OUT.to_string(),
            idle_timeout: None,
            checkpoint_interval: "100ms".to_string(),
            parallelism: 2,
            output_properties: Vec::new(),
            source_properties: Vec::new(),
            repartition: false,
            checkpoint_keep: None,
        }
    }

    fn source(&self, name: &str, topic: &str) -> String {
        let end = self
            .end
            .as_ref()
            .map_or(String::new(), |e| format!("end = \"{e}\"\n"));
        format!(
            r#"[[source]]
name = "{name}"
kind = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "kafka-test"
start = "earliest"
{end}format = "ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"
[source.properties]
"receive.message.max.bytes" = "{RECEIVE_MESSAGE_MAX_BYTES}"
{extra}
"#,
            brokers = self.brokers,
            extra = properties(&self.source_properties),
        )
    }

    /// Writes `dir/job.toml`; state and checkpoints go under `dir`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let mut text = format!(
            "name = \"kafka-test\"\nparallelism = {}\n\n",
            self.parallelism
        );
        text.push_str(&self.source(IMPRESSIONS, &self.impressions_topic));
        text.push_str(&self.source(PLAYS, PLAYS));
        text.push_str(
            "[join]\nleft = \"impressions\"\nright = \"plays\"\ntype = \"left\"\n\
             within = [\"0s\", \"1h\"]\n",
        );
        if self.repartition {
            text.push_str("repartition = true\n");
        }
        text.push_str("\n[time]\nmax_out_of_orderness = \"5s\"\n");
        if let Some(idle) = &self.idle_timeout {
            text.push_str(&format!("idle_timeout = \"{idle}\"\n"));
        }
        text.push_str(&format!(
            "\n[output]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{}\"\n\
             late_topic = \"{OUT_LATE}\"\ndead_topic = \"{OUT_DEAD}\"\n",
            self.brokers, self.output_topic
        ));
        if !self.output_properties.is_empty() {
            text.push_str("[output.properties]\n");
            text.push_str(&properties(&self.output_properties));
        }
        text.push_str(&format!(
            "\n[state]\ndir = \"state\"\nmemory_max = \"1MiB\"\n\n\
             [checkpoint]\ndir = \"checkpoints\"\ninterval = \"{}\"\n",
            self.checkpoint_interval
        ));
        if let Some(keep) = self.checkpoint_keep {
            text.push_str(&format!("keep = {keep}\n"));
        }
        let path = dir.join("job.toml");
        std::fs::write(&path, text).expect("write job");
        path
    }
}

/// A `braid run JOB --quiet` process, its stderr in a file; killed when dropped.
pub struct BraidRun {
    child: Child,
    log: PathBuf,
    pub started: Instant,
}

impl BraidRun {
    /// Starts braid; `faults` is passed as `BRAID_FAULTS`. Its stderr goes to `log`.
    pub fn start(job: &Path, faults: Option<&str>, log: &Path) -> BraidRun {
        BraidRun::start_with(job, &[], faults, log, |_| {})
    }

    /// Starts braid as `--instance name` of a shared job (`-v`: its log tells of
    /// assignments and restores); `configure` may add to the command.
    pub fn start_instance(
        job: &Path,
        name: &str,
        log: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> BraidRun {
        BraidRun::start_with(job, &["--instance", name, "-v"], None, log, configure)
    }

    fn start_with(
        job: &Path,
        args: &[&str],
        faults: Option<&str>,
        log: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> BraidRun {
        let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
        configure(&mut command);
        command
            .args(["run", job.to_str().expect("utf-8 path"), "--quiet"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create braid's log"));
        if let Some(f) = faults {
            command.env("BRAID_FAULTS", f);
        }
        BraidRun {
            child: command.spawn().expect("braid starts"),
            log: log.to_path_buf(),
            started: Instant::now(),
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll braid")
    }

    /// The exit status, if braid ends within `timeout`.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: a clean stop (`kill`, since libc is no dependency of the tests).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// SIGTERM; braid must exit 0 within [`STOP_TIMEOUT`].
    pub fn stop_cleanly(&mut self, what: &str) {
        let asked = Instant::now();
        self.terminate();
        let status = self.wait_for(STOP_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "{what}: after SIGTERM braid ended with {status:?} (None: still running after \
             {STOP_TIMEOUT:?}):\n{}",
            self.stderr()
        );
        eprintln!("{what}: stopped in {:.1} s", asked.elapsed().as_secs_f64());
    }

    /// What braid wrote to stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BraidRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Polls `check` every half second until it holds or `timeout` passes; returns its
/// last answer.
pub fn wait_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = check();
        if answer.is_ok() || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits while an unbounded job runs until its committed output is exact over `input`
/// (flush rows left out), then stops it with SIGTERM and checks once more.
pub fn complete_and_stop(bootstrap: &str, input: &Input, run: &mut BraidRun, what: &str) {
    let waited = Instant::now();
    let answer = wait_until(OUTPUT_TIMEOUT, || {
        if let Some(status) = run.try_wait() {
            panic!(
                "{what}: braid ended ({status}) while live:\n{}",
                run.stderr()
            );
        }
        check_exact(input, &read_outputs(bootstrap), &is_flush_row)
    });
    if let Err(e) = answer {
        panic!("{what}: output not exact after {OUTPUT_TIMEOUT:?}: {e}");
    }
    eprintln!(
        "{what}: output exact after {:.1} s",
        waited.elapsed().as_secs_f64()
    );
    run.stop_cleanly(what);
    if let Err(e) = check_exact(input, &read_outputs(bootstrap), &is_flush_row) {
        panic!("{what}: after the stop: {e}");
    }
}

/// Produces the last part of the input, then flush events after all of it (added to
/// `input`, whose rows the comparison leaves out), so that a live job emits everything.
pub fn produce_the_rest(bootstrap: &str, input: &mut Input, rest: &Input) {
    let flush = flush_events(max_time(input));
    rest.produce(bootstrap);
    flush.produce(bootstrap);
    input.extend(flush);
}
