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

[output]
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

pub fn demo(dir: &Path, events: u64, progress: bool) -> anyhow::Result<()> {
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
