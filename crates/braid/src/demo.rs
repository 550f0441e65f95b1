//! `braid demo`: a realistic data set, the reference job over it, a summary. No setup.

use std::path::{Path, PathBuf};

use anyhow::Context;
use braid_io::takerate::{write_dataset, DatasetCounts, TakeRateConfig};

use crate::driver::{run, RunOptions};

/// Marks a folder as the demo's, so that `braid demo` only ever replaces its own.
const DEMO_MARKER: &str = ".braid-demo";
pub const DEMO_MEMORY_MAX_BYTES: u64 = 64 << 20;

/// The reference job (impressions left-joined with the plays within an hour) over
/// `data/` beside the job file.
/// Output goes to `out/`, state to `.braid/state`, both beside the job file.
fn job_toml(name: &str, memory_max_bytes: u64) -> String {
    format!(
        r#"# The take-rate join: every impression with the plays that followed it within an
# hour, and every impression that led to none (a left join).
name = "{name}"

[[source]]
name = "impressions"
kind = "files"
path = "data/impressions/*.ndjson"
format = "ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[[source]]
name = "plays"
kind = "files"
path = "data/plays/*.ndjson"
format = "ndjson"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"

[join]
left = "impressions"
right = "plays"
type = "left"
within = ["0s", "1h"]

[time]
max_out_of_orderness = "5s"
allowed_lateness = "0s"
idle_timeout = "30s"

{}"#,
        output_state_checkpoint(memory_max_bytes)
    )
}

/// Writes a take-rate data set under `dir/data` and the job over it as `dir/job.toml`
/// (shared by `braid demo`, `braid generate` and the files benchmark). Returns the
/// job file and the line counts.
pub fn write_take_rate(
    dir: &Path,
    config: &TakeRateConfig,
    lines_per_file: u64,
    job_name: &str,
    memory_max_bytes: u64,
) -> anyhow::Result<(PathBuf, DatasetCounts)> {
    let counts = write_dataset(&dir.join("data"), config, lines_per_file)?;
    let job = dir.join("job.toml");
    std::fs::write(&job, job_toml(job_name, memory_max_bytes))?;
    Ok((job, counts))
}

/// The demo jobs' output (`out/`), state and checkpoints (beside the job file).
fn output_state_checkpoint(memory_max_bytes: u64) -> String {
    format!(
        r#"[output]
kind = "files"
path = "out"
format = "ndjson"

[state]
dir = ".braid/state"
memory_max = "{}MiB"

[checkpoint]
dir = ".braid/checkpoints"
interval = "10s"
"#,
        memory_max_bytes >> 20
    )
}

/// The live demo's job: the take-rate join over two paced generators, with the
/// metrics and the status page on `listen`.
fn live_job_toml(rate: u64, start_ms: i64, listen: &str) -> String {
    let source = |stream: &str| {
        format!(
            r#"[[source]]
name = "{stream}"
kind = "generator"
stream = "{stream}"
# impressions per second of wall clock; the event times follow the clock from `start`
rate = {rate}
start = "{start}"
key = ["profile_id", "title_id"]
time = "ts"
id = "event_id"
"#,
            start = braid_io::format_rfc3339_ms(start_ms)
        )
    };
    format!(
        r#"# The take-rate join, live: every impression with the plays that followed it within
# ten minutes (an hour in the reference job: ten minutes shows expiry sooner), and every
# impression that led to none, from two generators that run until Ctrl-C.
name = "take-rate-live"

{}
{}
[join]
left = "impressions"
right = "plays"
type = "left"
within = ["0s", "10m"]

[time]
max_out_of_orderness = "5s"
idle_timeout = "30s"

{}
[metrics]
listen = "{listen}"
"#,
        source("impressions"),
        source("plays"),
        output_state_checkpoint(DEMO_MEMORY_MAX_BYTES)
    )
}

/// Clears `dir` if it is an earlier demo's (or empty), and marks it as the demo's.
fn demo_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        anyhow::ensure!(
            dir.join(DEMO_MARKER).exists() || std::fs::read_dir(dir)?.next().is_none(),
            "{} exists and is not a braid demo folder; remove it or pass --dir",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(DEMO_MARKER), "made by braid demo\n")?;
    Ok(())
}

/// `braid demo --live`: the demo job on unbounded generators at `rate` impressions a
/// second, with the status page on `listen`, until Ctrl-C (a final checkpoint).
pub fn demo_live(dir: &Path, rate: u64, listen: &str, progress: bool) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "--rate: must be at least 1 impression a second");
    demo_dir(dir)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let job = dir.join("job.toml");
    std::fs::write(&job, live_job_toml(rate, now_ms, listen))?;
    let plan = crate::config::load(&job)?;
    let metrics = plan
        .metrics
        .as_ref()
        .context("the live job has [metrics]")?;
    let live = crate::live::Live::start(&plan, metrics)?;
    eprintln!(
        "braid demo: {rate} impressions a second and their plays, joined live\n\n    open http://{}/ to watch it\n\n  Ctrl-C stops it with a final checkpoint; `braid run {}` resumes it",
        live.addr,
        job.display()
    );
    crate::signals::install();
    let summary = run(
        &plan,
        &RunOptions {
            progress,
            live: Some(live),
            ..Default::default()
        },
    )?;
    println!("{summary}");
    summary.check().map_err(anyhow::Error::msg)
}

pub fn demo(dir: &Path, events: u64, progress: bool) -> anyhow::Result<()> {
    demo_dir(dir)?;
    eprintln!(
        "braid demo: generating {events} impressions and plays in {}",
        dir.join("data").display()
    );
    let config = TakeRateConfig {
        events,
        ..TakeRateConfig::default()
    };
    let (job, _) = write_take_rate(
        dir,
        &config,
        250_000,
        "take-rate-demo",
        DEMO_MEMORY_MAX_BYTES,
    )?;
    let plan = crate::config::load(&job)?;
    eprintln!("braid demo: running {}", job.display());
    let summary = run(
        &plan,
        &RunOptions {
            progress,
            reset: false,
            ..Default::default()
        },
    )?;
    println!("{summary}");
    summary.check().map_err(anyhow::Error::msg)?;
    if let Some(sample) = first_line(&dir.join("out")) {
        println!("\na joined record:\n{sample}");
    }
    println!(
        "\nthe job: {job}\n  braid checkpoints {job}   lists its checkpoints\n  braid run {job}           resumes from the last one (the input is done: nothing to add)",
        job = job.display(),
    );
    Ok(())
}

/// The first joined record (with a play) of the committed output, to show its shape.
fn first_line(dir: &Path) -> Option<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    let file = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "ndjson"))?;
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find(|l| !l.ends_with("\"plays\":null}"))
        .map(str::to_string)
}
