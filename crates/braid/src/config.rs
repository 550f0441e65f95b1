//! The job file (SPEC §2): read raw with serde, then resolved into one validated
//! [`Plan`] before anything runs. Every error names the file, the field and the reason.

use std::fmt;
use std::path::{Path, PathBuf};

use braid_core::{JoinKind, JoinSpec, TimeGuardConfig};
use braid_io::takerate::{Stream, TakeRateConfig};
use braid_io::Schema;
use serde::Deserialize;

use crate::units::{parse_duration_ms, parse_size_bytes};

/// The longest input line; longer ones are dead-lettered.
pub const MAX_LINE_BYTES_DEFAULT: usize = 1 << 20;
const MEMORY_MAX_DEFAULT: &str = "512MiB";
const MEMORY_MAX_MIN_BYTES: u64 = 64 << 10;
const IDLE_TIMEOUT_DEFAULT: &str = "30s";
/// Later events of a partition that must agree with a time before it moves the
/// watermark (README "Times far ahead").
const CORROBORATE_DEFAULT: u32 = 32;
/// Events further ahead of their partition's corroborated time are held until the
/// stream follows them, and dead letters if it does not.
const MAX_TIME_JUMP_DEFAULT: &str = "1h";
/// Completed checkpoints kept when the job file does not say (Flink keeps 1; a few give
/// a fallback when the newest turns out broken).
const CHECKPOINTS_KEPT_DEFAULT: usize = 3;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: String,
    parallelism: Option<usize>,
    #[serde(rename = "source", default)]
    sources: Vec<SourceFile>,
    join: JoinFile,
    #[serde(default)]
    time: TimeFile,
    output: OutputFile,
    #[serde(default)]
    state: StateFile,
    checkpoint: Option<CheckpointFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    name: String,
    kind: String,
    path: Option<String>,
    format: Option<String>,
    key: Vec<String>,
    time: String,
    id: Option<String>,
    max_line_bytes: Option<String>,
    // kind = "kafka"
    brokers: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    // kind = "generator"
    stream: Option<String>,
    events: Option<u64>,
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinFile {
    left: String,
    right: String,
    #[serde(rename = "type")]
    kind: String,
    within: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeFile {
    max_out_of_orderness: Option<String>,
    allowed_lateness: Option<String>,
    idle_timeout: Option<String>,
    corroborate: Option<u32>,
    max_time_jump: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputFile {
    kind: String,
    path: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    dir: Option<String>,
    memory_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    dir: Option<String>,
    interval: Option<String>,
    keep: Option<usize>,
}

/// A job file that cannot run, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct JobError {
    pub file: PathBuf,
    pub message: String,
}

/// Where a source's events come from.
#[derive(Clone, Debug)]
pub enum Input {
    Files {
        pattern: String,
        files: Vec<PathBuf>,
    },
    Generator {
        config: TakeRateConfig,
        stream: Stream,
    },
}

#[derive(Clone, Debug)]
pub struct SourcePlan {
    pub name: String,
    pub input: Input,
    pub schema: Schema,
    pub max_line_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Files(PathBuf),
    Stdout,
}

#[derive(Clone, Debug)]
pub struct CheckpointPlan {
    /// A folder (resolved against the job file's folder) or `s3://bucket/prefix`.
    pub dir: String,
    pub interval_ms: i64,
    /// Completed checkpoints kept; older ones and their files are deleted.
    pub keep: usize,
}

/// A validated job: everything `braid run` needs, with paths resolved.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub file: PathBuf,
    /// The left source first, then the right.
    pub sources: [SourcePlan; 2],
    pub spec: JoinSpec,
    pub max_out_of_orderness_ms: i64,
    pub idle_timeout_ms: u64,
    /// The guard of every source partition's watermark against uncorroborated times.
    pub time_guard: TimeGuardConfig,
    pub output: Output,
    pub state_dir: PathBuf,
    pub memory_max_bytes: u64,
    pub checkpoint: Option<CheckpointPlan>,
    pub parallelism: usize,
}

/// Reads and validates a job file.
pub fn load(file: &Path) -> Result<Plan, JobError> {
    let text = std::fs::read_to_string(file).map_err(|e| JobError {
        file: file.to_path_buf(),
        message: format!("cannot read the job file: {e}"),
    })?;
    parse(file, &text)
}

/// Validates job-file text; `file` names it in errors and anchors relative paths.
pub fn parse(file: &Path, text: &str) -> Result<Plan, JobError> {
    let fail = |message: String| JobError {
        file: file.to_path_buf(),
        message,
    };
    let raw: JobFile =
        toml::from_str(text).map_err(|e| fail(e.to_string().trim_end().to_string()))?;
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    resolve(raw, file, base).map_err(fail)
}

fn resolve(raw: JobFile, file: &Path, base: &Path) -> Result<Plan, String> {
    if raw.name.trim().is_empty() {
        return Err("name: must not be empty".into());
    }
    let duration = |field: &str, value: &Option<String>, default: &str| {
        parse_duration_ms(value.as_deref().unwrap_or(default)).map_err(|e| format!("{field}: {e}"))
    };
    let max_out_of_orderness_ms = duration(
        "[time] max_out_of_orderness",
        &raw.time.max_out_of_orderness,
        "0s",
    )?;
    let allowed_lateness_ms =
        duration("[time] allowed_lateness", &raw.time.allowed_lateness, "0s")?;
    let idle_timeout_ms = duration(
        "[time] idle_timeout",
        &raw.time.idle_timeout,
        IDLE_TIMEOUT_DEFAULT,
    )?;
    for (field, v) in [
        ("[time] max_out_of_orderness", max_out_of_orderness_ms),
        ("[time] allowed_lateness", allowed_lateness_ms),
        ("[time] idle_timeout", idle_timeout_ms),
    ] {
        if v < 0 {
            return Err(format!("{field}: must not be negative"));
        }
    }
    let spec = join_spec(&raw.join, allowed_lateness_ms)?;
    let time_guard = time_guard(&raw.time, max_out_of_orderness_ms + allowed_lateness_ms)?;
    let mut names = Vec::new();
    for (i, s) in raw.sources.iter().enumerate() {
        if names.contains(&s.name.as_str()) {
            return Err(format!(
                "[[source]] #{}: name `{}` is used twice",
                i + 1,
                s.name
            ));
        }
        names.push(s.name.as_str());
    }
    if raw.sources.len() != 2 {
        return Err(format!(
            "[[source]]: a join needs exactly two sources, found {}",
            raw.sources.len()
        ));
    }
    let find = |field: &str, name: &str| -> Result<&SourceFile, String> {
        raw.sources.iter().find(|s| s.name == name).ok_or_else(|| {
            format!(
                "[join] {field}: no source is named `{name}`; the sources are {}",
                names.join(", ")
            )
        })
    };
    let left = find("left", &raw.join.left)?;
    let right = find("right", &raw.join.right)?;
    if raw.join.left == raw.join.right {
        return Err("[join] right: must name a different source than left".into());
    }
    let sources = [source(left, base)?, source(right, base)?];
    if left.key.len() != right.key.len() {
        return Err(format!(
            "[[source]] {}: key has {} fields but {} has {}; the join pairs key fields in order",
            right.name,
            right.key.len(),
            left.name,
            left.key.len()
        ));
    }
    let output = output(&raw.output, base)?;
    let state = &raw.state;
    let state_dir = match &state.dir {
        Some(dir) => base.join(dir),
        None => base.join(".braid").join(&raw.name).join("state"),
    };
    let memory_max_bytes =
        parse_size_bytes(state.memory_max.as_deref().unwrap_or(MEMORY_MAX_DEFAULT))
            .map_err(|e| format!("[state] memory_max: {e}"))?;
    if memory_max_bytes < MEMORY_MAX_MIN_BYTES {
        return Err(format!(
            "[state] memory_max: {memory_max_bytes} bytes is below the minimum of 64KiB (state would be spilled an event at a time)"
        ));
    }
    let checkpoint = match &raw.checkpoint {
        None => None,
        Some(c) => Some(CheckpointPlan {
            dir: match &c.dir {
                Some(d) if d.starts_with("s3://") => {
                    if d.trim_start_matches("s3://").trim_matches('/').is_empty() {
                        return Err(format!(
                            "[checkpoint] dir: `{d}` names no bucket; write s3://BUCKET/PREFIX"
                        ));
                    }
                    d.clone()
                }
                Some(d) => base.join(d).to_string_lossy().into_owned(),
                None => base
                    .join(".braid")
                    .join(&raw.name)
                    .join("checkpoints")
                    .to_string_lossy()
                    .into_owned(),
            },
            keep: match c.keep {
                Some(0) => return Err("[checkpoint] keep: must be at least 1".into()),
                Some(n) => n,
                None => CHECKPOINTS_KEPT_DEFAULT,
            },
            interval_ms: match duration("[checkpoint] interval", &c.interval, "10s")? {
                ms if ms > 0 => ms,
                _ => return Err("[checkpoint] interval: must be positive".into()),
            },
        }),
    };
    let parallelism = match raw.parallelism {
        Some(0) => return Err("parallelism: must be at least 1".into()),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    Ok(Plan {
        name: raw.name,
        file: file.to_path_buf(),
        sources,
        spec,
        max_out_of_orderness_ms,
        idle_timeout_ms: idle_timeout_ms as u64,
        time_guard,
        output,
        state_dir,
        memory_max_bytes,
        checkpoint,
        parallelism,
    })
}

/// `[time] corroborate` (0 turns the guard off) and `max_time_jump` (`"off"` holds
/// nothing back); the slack is what lateness tolerates.
fn time_guard(time: &TimeFile, slack_ms: i64) -> Result<TimeGuardConfig, String> {
    let confirm_events = time.corroborate.unwrap_or(CORROBORATE_DEFAULT);
    if confirm_events == 0 {
        return Ok(TimeGuardConfig::OFF);
    }
    let max_jump_ms = match time
        .max_time_jump
        .as_deref()
        .unwrap_or(MAX_TIME_JUMP_DEFAULT)
    {
        "off" => None,
        text => match parse_duration_ms(text) {
            Ok(ms) if ms > 0 => Some(ms),
            Ok(_) => return Err("[time] max_time_jump: must be positive, or \"off\"".into()),
            Err(e) => return Err(format!("[time] max_time_jump: {e}, or \"off\"")),
        },
    };
    Ok(TimeGuardConfig {
        confirm_events,
        slack_ms,
        max_jump_ms,
    })
}

fn join_spec(join: &JoinFile, allowed_lateness_ms: i64) -> Result<JoinSpec, String> {
    let kind = match join.kind.as_str() {
        "inner" => JoinKind::Inner,
        "left" => JoinKind::Left,
        "right" => JoinKind::Right,
        "full" => JoinKind::Full,
        other => {
            return Err(format!(
                "[join] type: `{other}` is not a join type; use inner, left, right or full"
            ))
        }
    };
    let [lower, upper] = join.within.as_slice() else {
        return Err(format!(
            "[join] within: needs two durations [lower, upper], found {}",
            join.within.len()
        ));
    };
    let lower_ms = parse_duration_ms(lower).map_err(|e| format!("[join] within: {e}"))?;
    let upper_ms = parse_duration_ms(upper).map_err(|e| format!("[join] within: {e}"))?;
    if lower_ms > upper_ms {
        return Err(format!(
            "[join] within: lower bound {lower} is after upper bound {upper}"
        ));
    }
    Ok(JoinSpec {
        kind,
        lower_ms,
        upper_ms,
        allowed_lateness_ms,
    })
}

fn source(s: &SourceFile, base: &Path) -> Result<SourcePlan, String> {
    let field = |f: &str| format!("[[source]] {}: {f}", s.name);
    if s.key.is_empty() {
        return Err(format!(
            "{}: the key needs at least one field",
            field("key")
        ));
    }
    if s.key.iter().any(|k| k.is_empty()) || s.time.is_empty() {
        return Err(format!("{}: field names must not be empty", field("key")));
    }
    if let Some(format) = &s.format {
        if format != "ndjson" {
            return Err(format!(
                "{}: `{format}` is not supported; use ndjson",
                field("format")
            ));
        }
    }
    let max_line_bytes = match &s.max_line_bytes {
        None => MAX_LINE_BYTES_DEFAULT,
        Some(t) => {
            parse_size_bytes(t).map_err(|e| format!("{}: {e}", field("max_line_bytes")))? as usize
        }
    };
    let only_for = |present: bool, name: &str, kind: &str| {
        if present {
            Err(format!("{}: only a `{kind}` source takes it", field(name)))
        } else {
            Ok(())
        }
    };
    let input = match s.kind.as_str() {
        "files" => {
            only_for(s.stream.is_some(), "stream", "generator")?;
            only_for(s.events.is_some(), "events", "generator")?;
            only_for(s.seed.is_some(), "seed", "generator")?;
            let pattern = s
                .path
                .clone()
                .ok_or_else(|| format!("{}: a files source needs a path glob", field("path")))?;
            let files = braid_io::resolve_glob(&s.name, base, &pattern)
                .map_err(|e| format!("{}: {e}", field("path")))?;
            Input::Files { pattern, files }
        }
        "generator" => {
            only_for(s.path.is_some(), "path", "files")?;
            let stream = match s.stream.as_deref() {
                Some("impressions") => Stream::Impressions,
                Some("plays") => Stream::Plays,
                _ => {
                    return Err(format!(
                        "{}: a generator source needs stream = \"impressions\" or \"plays\"",
                        field("stream")
                    ))
                }
            };
            let mut config = TakeRateConfig::default();
            config.events = s.events.unwrap_or(config.events);
            config.seed = s.seed.unwrap_or(config.seed);
            Input::Generator { config, stream }
        }
        "kafka" => {
            let _ = (&s.brokers, &s.topic, &s.group);
            return Err(format!(
                "{}: kafka sources are not built yet (issue 4); use files or generator",
                field("kind")
            ));
        }
        other => {
            return Err(format!(
                "{}: `{other}` is not a source kind; use files or generator",
                field("kind")
            ))
        }
    };
    Ok(SourcePlan {
        name: s.name.clone(),
        input,
        schema: Schema {
            key: s.key.clone(),
            time: s.time.clone(),
            id: s.id.clone(),
        },
        max_line_bytes,
    })
}

fn output(o: &OutputFile, base: &Path) -> Result<Output, String> {
    if let Some(format) = &o.format {
        if format != "ndjson" {
            return Err(format!(
                "[output] format: `{format}` is not supported; use ndjson"
            ));
        }
    }
    match o.kind.as_str() {
        "files" => {
            let path = o
                .path
                .as_ref()
                .ok_or("[output] path: a files output needs a folder")?;
            Ok(Output::Files(base.join(path)))
        }
        "stdout" => Ok(Output::Stdout),
        "kafka" => Err(
            "[output] kind: kafka output is not built yet (issue 4); use files or stdout".into(),
        ),
        other => Err(format!(
            "[output] kind: `{other}` is not an output kind; use files or stdout"
        )),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.spec;
        writeln!(f, "job `{}` ({})", self.name, self.file.display())?;
        for (side, source) in ["left ", "right"].iter().zip(&self.sources) {
            write!(
                f,
                "  {side} source `{}`: key {:?}, time `{}`",
                source.name, source.schema.key, source.schema.time
            )?;
            if let Some(id) = &source.schema.id {
                write!(f, ", id `{id}`")?;
            }
            match &source.input {
                Input::Files { pattern, files } => {
                    writeln!(f, ", {} file(s) matching {pattern}", files.len())?
                }
                Input::Generator { config, stream } => writeln!(
                    f,
                    ", generated {} (seed {}, {} lines)",
                    stream.name(),
                    config.seed,
                    config.events
                )?,
            }
        }
        writeln!(
            f,
            "  join: {:?}, right.time - left.time within [{} ms, {} ms], buckets of {} ms",
            s.kind,
            s.lower_ms,
            s.upper_ms,
            s.bucket_width_ms()
        )?;
        writeln!(
            f,
            "  time: max out of orderness {} ms, allowed lateness {} ms, idle timeout {} ms",
            self.max_out_of_orderness_ms, s.allowed_lateness_ms, self.idle_timeout_ms
        )?;
        let g = &self.time_guard;
        match (g.enabled(), g.max_jump_ms) {
            (false, _) => writeln!(f, "  times ahead: not guarded (corroborate = 0)")?,
            (true, jump) => writeln!(
                f,
                "  times ahead: a time moves the watermark once {} later events agree with it; {}",
                g.confirm_events,
                match jump {
                    Some(ms) => format!("events more than {ms} ms ahead are held until then"),
                    None => "none is held (max_time_jump = \"off\")".to_string(),
                }
            )?,
        }
        match &self.output {
            Output::Files(dir) => writeln!(f, "  output: files in {}", dir.display())?,
            Output::Stdout => writeln!(f, "  output: stdout")?,
        }
        writeln!(
            f,
            "  state: {} with memory_max {} MiB over {} shard(s)",
            self.state_dir.display(),
            self.memory_max_bytes >> 20,
            self.parallelism
        )?;
        if let Some(c) = &self.checkpoint {
            writeln!(
                f,
                "  checkpoint: {} every {} ms, keeping {}",
                c.dir, c.interval_ms, c.keep
            )?;
        }
        Ok(())
    }
}
