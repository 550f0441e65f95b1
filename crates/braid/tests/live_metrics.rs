//! What a running job shows (issue 11): Prometheus metrics at `/metrics` and the status
//! page at `/`, from `[metrics] listen`.
//!
//! - At the end of a bounded run the counters equal the run summary, and the summary's
//!   and the metrics' records in equal the input's lines counted here, and the output
//!   counters the rows of an independent reference join.
//! - The status page, open in headless Chromium for six seconds while a live job runs,
//!   draws its charts from live data (its DOM says how many points each chart drew and
//!   their last values), and a screenshot of it is kept in the target folder.
//! - Secrets planted in the Kafka properties and in the S3 credentials appear in none of
//!   the logs, the metrics, the page, `braid validate`, `braid checkpoints` or the
//!   checkpoint files.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chromium::Browser;
use common::moto::{moto_server, with_moto, Moto};
use common::{
    add_checkpoints, generate, http_get, parse_metrics, reference_events, reference_join, write_job,
};
use serde_json::Value;

/// How long braid may take to say where it serves.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a bounded run of these tests may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// A braid process with its stdout to read and its stderr collected as it comes.
struct Served {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    addr: String,
}

impl Served {
    /// Starts `command` and waits for the address it prints.
    fn start(mut command: Command) -> Served {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("braid starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (lines, addr_lines): (_, Receiver<String>) = channel();
        let pipe = child.stderr.take().expect("stderr piped");
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                collected.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + SERVE_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = addr_lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "braid named no address within {SERVE_TIMEOUT:?}:\n{}",
                    stderr.lock().unwrap()
                )
            });
            // `braid run`: "status page at http://ADDR/"; the demo: "open http://ADDR/".
            if let Some(rest) = line.split("http://").nth(1) {
                break rest.split('/').next().expect("HOST:PORT").to_string();
            }
        };
        Served {
            stdout: BufReader::new(child.stdout.take().expect("stdout piped")),
            child,
            stderr,
            addr,
        }
    }

    fn get(&self, path: &str) -> String {
        let (status, body) = http_get(&self.addr, path)
            .unwrap_or_else(|e| panic!("GET {path} of {}: {e}", self.addr));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status (within a minute).
    fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM")
    }

    /// Sends `signal` (`-TERM`, `-INT`), then the exit status (within a minute).
    fn signal(&mut self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll braid") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "braid did not stop after SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends `[metrics]` on any free loopback port, kept `linger` after a bounded run.
fn add_metrics(job: &Path, linger: &str) {
    let mut text = std::fs::read_to_string(job).expect("read job");
    text.push_str(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\nlinger = \"{linger}\"\n"
    ));
    std::fs::write(job, text).expect("write job");
}

/// The sum of a metric's series whose labels include `with`.
fn total(
    series: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    with: &[(&str, &str)],
) -> f64 {
    let matching: Vec<f64> = series
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .collect();
    assert!(!matching.is_empty(), "no series {name} with {with:?}");
    matching.iter().sum()
}

/// Non-blank lines of the files in `folder`.
fn lines_in(folder: &Path) -> u64 {
    std::fs::read_dir(folder)
        .expect("data folder")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read data"))
        .map(|bytes| {
            bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .count() as u64
        })
        .sum()
}

#[test]
fn at_the_end_of_a_bounded_run_the_metrics_equal_the_summary() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), 60_000, 51);
    let job = write_job(dir.path(), "left", ("0s", "1h"), "2MiB");
    add_checkpoints(&job, "checkpoints", "200ms");
    add_metrics(&job, "10m");
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command.args(["run", "--quiet", "--json"]).arg(&job);
    let mut braid = Served::start(command);
    // Scrapes while it runs parse, and name the job's sources.
    let running = parse_metrics(&braid.get("/metrics"));
    assert!(
        running.iter().any(|(n, _, _)| n == "braid_running"),
        "{running:?}"
    );
    let mut line = String::new();
    let started = Instant::now();
    braid.stdout.read_line(&mut line).expect("read the summary");
    assert!(started.elapsed() < RUN_TIMEOUT);
    let summary: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the summary is JSON ({e}): {line}\n{}", braid.stderr()));
    let text = braid.get("/metrics");
    let m = parse_metrics(&text);
    let count = |path: &str| -> f64 {
        path.split('.')
            .fold(&summary, |v, k| &v[k])
            .as_f64()
            .unwrap_or_else(|| panic!("{path} in {summary}"))
    };
    for (side, source) in [("left", "impressions"), ("right", "plays")] {
        let of = [("source", source)];
        let read = count(&format!("{side}.read"));
        assert_eq!(
            read,
            lines_in(&dir.path().join("data").join(source)) as f64,
            "{source}: the summary's records read and the input's lines"
        );
        for (metric, field) in [
            ("braid_records_in_total", "read"),
            ("braid_late_total", "late"),
            ("braid_dead_letters_total", "dead"),
            ("braid_duplicates_total", "duplicates"),
            ("braid_matched_total", "matched"),
            ("braid_unmatched_total", "unmatched_emitted"),
            ("braid_expired_total", "unmatched_expired"),
        ] {
            assert_eq!(
                total(&m, metric, &of),
                count(&format!("{side}.{field}")),
                "{metric} of {source} against the summary's {field}:\n{text}"
            );
        }
        assert_eq!(total(&m, "braid_state_events", &of), 0.0, "{text}");
        assert!(
            total(
                &m,
                "braid_watermark_ms",
                &[("source", source), ("partition", "0")]
            ) > 0.0
        );
    }
    assert!(count("left.dead") > 0.0 && count("left.duplicates") > 0.0);
    let (left, _) = reference_events(&dir.path().join("data/impressions"));
    let (right, _) = reference_events(&dir.path().join("data/plays"));
    let want = reference_join(&left, &right, "left", 0, 3_600_000);
    let pairs = total(&m, "braid_output_records_total", &[("kind", "pair")]);
    let unmatched = total(&m, "braid_output_records_total", &[("kind", "unmatched")]);
    assert_eq!(pairs, count("pairs"), "{text}");
    assert_eq!(
        pairs + unmatched,
        want.len() as f64,
        "output counters against the reference join's rows"
    );
    assert!(
        total(&m, "braid_cold_reads_total", &[]) > 0.0,
        "spilled at 2MiB"
    );
    let taken = count("checkpoints.taken");
    assert!(taken >= 1.0, "{summary}");
    assert_eq!(total(&m, "braid_checkpoints_total", &[]), taken);
    assert_eq!(
        total(&m, "braid_checkpoint_duration_seconds_count", &[]),
        taken
    );
    assert_eq!(
        total(&m, "braid_checkpoint_pause_seconds_count", &[]),
        taken
    );
    assert!(total(&m, "braid_last_checkpoint_epoch", &[]) >= 1.0);
    assert_eq!(total(&m, "braid_running", &[]), 0.0);
    let status: Value = serde_json::from_str(&braid.get("/status")).expect("JSON status");
    assert_eq!(status["state"], "finished", "{status}");
    assert_eq!(status["job"], "e2e", "{status}");
    assert!(braid.get("/").contains("<canvas id=\"chart-input\""));
    let (code, _) = http_get(&braid.addr, "/nothing").expect("GET /nothing");
    assert_eq!(code, 404);
    // It lingers for the last scrape; SIGTERM ends the wait.
    let status = braid.stop();
    assert!(status.success(), "{status}:\n{}", braid.stderr());
}

/// The value of attribute `name` of the element with `id` in a DOM dump.
fn attribute(dom: &str, id: &str, name: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..start].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let at = tag.find(&format!("{name}=\""))? + name.len() + 2;
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

#[test]
fn the_status_page_draws_live_data_in_headless_chromium() {
    let dir = tempfile::tempdir().expect("temp dir");
    let job = dir.path().join("job.toml");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let start = chrono::DateTime::from_timestamp_millis(now_ms)
        .expect("a time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let source = |stream: &str| {
        format!(
            "[[source]]\nname = \"{stream}\"\nkind = \"generator\"\nstream = \"{stream}\"\n\
             rate = 3000\nstart = \"{start}\"\nkey = [\"profile_id\", \"title_id\"]\n\
             time = \"ts\"\nid = \"event_id\"\n\n"
        )
    };
    let text = format!(
        "name = \"page-test\"\nparallelism = 2\n\n{}{}[join]\nleft = \"impressions\"\n\
         right = \"plays\"\ntype = \"left\"\nwithin = [\"0s\", \"10m\"]\n\n[output]\n\
         kind = \"files\"\npath = \"out\"\n\n[state]\ndir = \"state\"\nmemory_max = \"8MiB\"\n\n\
         [checkpoint]\ndir = \"checkpoints\"\ninterval = \"1s\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        source("impressions"),
        source("plays")
    );
    std::fs::write(&job, text).expect("write job");
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command.args(["run", "--quiet"]).arg(&job);
    let mut braid = Served::start(command);
    let url = format!("http://{}/", braid.addr);
    let mut browser = Browser::open(&url, 1400, 1500);
    // Six seconds of the page polling a live job, in real time.
    std::thread::sleep(Duration::from_secs(6));
    let dom = browser.html();
    let scrapes: u32 = attribute(&dom, "page", "data-scrapes")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        scrapes >= 3,
        "the page scraped /metrics {scrapes} times:\n{dom}"
    );
    for chart in [
        "chart-input",
        "chart-output",
        "chart-lag",
        "chart-state",
        "chart-bad",
    ] {
        let points: u32 = attribute(&dom, chart, "data-points")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(points >= 2, "{chart} drew {points} points:\n{dom}");
    }
    let last = |chart: &str| -> Vec<f64> {
        attribute(&dom, chart, "data-last")
            .unwrap_or_default()
            .split(',')
            .map(|v| v.parse().unwrap_or(f64::NAN))
            .collect()
    };
    assert!(
        last("chart-input").iter().all(|&rate| rate > 0.0),
        "both sources' input rates are live: {:?}",
        last("chart-input")
    );
    assert!(
        last("chart-state")[0] > 0.0,
        "state in memory: {:?}",
        last("chart-state")
    );
    let lag = last("chart-lag")[0];
    assert!(
        lag.is_finite() && lag < 60.0,
        "a live job's watermark lag: {lag}"
    );
    assert!(dom.contains("page-test"), "the plan names the job");
    assert!(dom.contains(">running<"), "the state badge says running");
    assert!(dom.contains("impressions / 0"), "the partitions table");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(&shot, png).expect("write the screenshot");
    let size = std::fs::metadata(&shot).map_or(0, |m| m.len());
    assert!(size > 20_000, "a screenshot of the page: {size} bytes");
    println!("screenshot: {}", shot.display());
    let status = braid.stop();
    assert!(status.success(), "{status}:\n{}", braid.stderr());
}

/// `braid demo --live`: the page's address first, live input on it, and Ctrl-C (SIGINT)
/// stops it with a summary that adds up.
#[test]
fn the_live_demo_serves_its_page_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("temp dir");
    let demo = dir.path().join("demo");
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command
        .args([
            "demo",
            "--live",
            "--quiet",
            "--rate",
            "1000",
            "--metrics",
            "127.0.0.1:0",
        ])
        .arg("--dir")
        .arg(&demo);
    let mut braid = Served::start(command);
    assert!(braid.get("/").contains("<canvas"));
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        let m = parse_metrics(&braid.get("/metrics"));
        let read = m
            .iter()
            .filter(|(n, _, _)| n == "braid_records_in_total")
            .map(|s| s.2)
            .sum::<f64>();
        if read > 0.0 && total(&m, "braid_running", &[]) == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no input read:\n{}",
            braid.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = braid.signal("-INT");
    assert!(status.success(), "{status}:\n{}", braid.stderr());
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut braid.stdout, &mut summary).expect("stdout");
    assert!(
        summary.contains("stopped by a signal") && summary.contains("accounted for exactly once"),
        "{summary}"
    );
    assert!(
        demo.join(".braid/checkpoints").is_dir(),
        "a final checkpoint"
    );
}

const SECRETS: [&str; 3] = [
    "planted-source-secret-5bd1",
    "planted-output-secret-77ce",
    "planted-s3-secret-c0a9",
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} holds the secret {secret}");
    }
}

#[test]
fn planted_secrets_appear_in_no_log_metric_page_or_checkpoint() {
    use common::kafka::check::Input;
    use common::kafka::run::KafkaJob;
    use common::kafka::{create_job_topics, exclusive, Broker};
    let _serial = exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let moto = Moto::start(&moto_server(), &dir.path().join("moto.log"));
    moto.create_bucket("secrets");
    generate(dir.path(), 6_000, 52);
    create_job_topics(&bootstrap);
    Input::generated(dir.path()).produce(&bootstrap);
    let mut job = KafkaJob::new(&bootstrap);
    job.source_properties = vec![("sasl.password".into(), SECRETS[0].into())];
    job.output_properties = vec![("sasl.password".into(), SECRETS[1].into())];
    let job = job.write(dir.path());
    let text = std::fs::read_to_string(&job)
        .expect("read job")
        .replace("dir = \"checkpoints\"", "dir = \"s3://secrets/job\"");
    std::fs::write(&job, text).expect("write job");
    add_metrics(&job, "10m");
    let with_secret = |command: &mut Command| {
        with_moto(command, moto.port);
        command.env("AWS_SECRET_ACCESS_KEY", SECRETS[2]);
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
    command.args(["run", "-vv", "--quiet", "--json"]).arg(&job);
    with_secret(&mut command);
    let mut braid = Served::start(command);
    let mut pages = vec![braid.get("/metrics"), braid.get("/status"), braid.get("/")];
    let mut line = String::new();
    braid.stdout.read_line(&mut line).expect("read the summary");
    let summary: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the summary is JSON ({e}): {line}\n{}", braid.stderr()));
    assert_eq!(summary["accounted"], true, "{summary}");
    pages.extend([braid.get("/metrics"), braid.get("/status"), braid.get("/")]);
    // The same run shows the Kafka series: every partition of both topics owned here
    // (no --instance), and the consumer lag of each, none left at the end.
    let m = parse_metrics(&pages[3]);
    for topic in ["impressions", "plays"] {
        let owned: Vec<f64> = m
            .iter()
            .filter(|(n, l, _)| {
                n == "braid_partition_owned" && l.get("topic").map(String::as_str) == Some(topic)
            })
            .map(|s| s.2)
            .collect();
        assert_eq!(owned, vec![1.0; owned.len().max(1)], "{topic}: {owned:?}");
        let lag = m.iter().filter(|(n, l, _)| {
            n == "braid_consumer_lag" && l.get("topic").map(String::as_str) == Some(topic)
        });
        assert!(lag.clone().count() > 0, "{topic}: a consumer lag series");
        assert!(lag.clone().all(|s| s.2 <= 1.0), "{topic}: read to the end");
    }
    assert!(braid.stop().success());
    let stderr = braid.stderr();
    assert!(
        stderr.contains("DEBUG"),
        "debug logs were on, so that they are checked too"
    );
    assert_no_secret("the log", &stderr);
    assert_no_secret("the summary", &line);
    for page in &pages {
        assert_no_secret("a page or the metrics", page);
    }
    for args in [vec!["validate"], vec!["checkpoints"]] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_braid"));
        command.args(&args).arg(&job);
        with_secret(&mut command);
        let out = command.output().expect("braid runs");
        assert!(out.status.success(), "braid {args:?}: {out:?}");
        assert_no_secret(
            &format!("braid {args:?}"),
            &String::from_utf8_lossy(&out.stdout),
        );
        assert_no_secret(
            &format!("braid {args:?}"),
            &String::from_utf8_lossy(&out.stderr),
        );
    }
    let keys = moto.keys("secrets", "job/");
    assert!(
        keys.iter().any(|k| k.contains("manifests/")),
        "checkpoints in the bucket: {keys:?}"
    );
    for key in keys {
        assert_no_secret(
            &format!("checkpoint file {key}"),
            &moto.get("secrets", &key),
        );
    }
    for entry in walk(&dir.path().join("state")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert_no_secret(
            &format!("state file {}", entry.display()),
            &String::from_utf8_lossy(&bytes),
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
