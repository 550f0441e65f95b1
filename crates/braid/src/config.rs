//! The job file (SPEC §2): read raw with serde, then resolved into one validated
//! [`Plan`] before anything runs. Every error names the file, the field and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use braid_core::{ColdProbeMode, JoinKind, JoinSpec, PayloadMode, TimeGuardConfig};
use braid_io::takerate::{Stream, TakeRateConfig};
use braid_io::Schema;
use serde::Deserialize;

use crate::live::MetricsPlan;
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
/// A Kafka transaction stays open from one barrier to the commit of the next
/// checkpoint: about an interval plus a checkpoint's duration. braid asks
/// `transaction.timeout.ms` to cover twice the interval plus this margin.
pub const TRANSACTION_MARGIN_MS: i64 = 10_000;
/// The largest `transaction.timeout.ms` a Kafka broker accepts by default
/// (`transaction.max.timeout.ms`, 15 minutes).
pub const TRANSACTION_TIMEOUT_MAX_MS: i64 = 900_000;
/// Where `[metrics]` serves without `listen`: Prometheus' conventional exporter port,
/// on the loopback address (another address only when the job names it).
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:9464";

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
    metrics: Option<MetricsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<String>,
    linger: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    name: String,
    kind: String,
    path: Option<String>,
    format: Option<String>,
    key: Vec<String>,
    time: Option<String>,
    id: Option<String>,
    max_line_bytes: Option<String>,
    // kind = "kafka"
    brokers: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    start: Option<String>,
    end: Option<String>,
    properties: Option<BTreeMap<String, String>>,
    backfill: Option<BackfillFile>,
    // kind = "generator"
    stream: Option<String>,
    events: Option<u64>,
    seed: Option<u64>,
    rate: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillFile {
    path: String,
    until: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinFile {
    left: String,
    right: String,
    #[serde(rename = "type")]
    kind: String,
    within: Vec<String>,
    #[serde(default)]
    repartition: bool,
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
    // kind = "kafka"
    brokers: Option<String>,
    topic: Option<String>,
    late_topic: Option<String>,
    dead_topic: Option<String>,
    properties: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    dir: Option<String>,
    memory_max: Option<String>,
    cold_probes: Option<String>,
    payloads: Option<String>,
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
        /// `rate`: impressions released per second of wall clock, each when the clock
        /// reaches its event time (a live stream); `None`: as fast as read.
        paced: Option<u64>,
    },
    Kafka(KafkaSourcePlan),
}

/// A Kafka topic as a source (SPEC §6).
#[derive(Clone, Debug)]
pub struct KafkaSourcePlan {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub start: KafkaStart,
    pub end: Option<KafkaEnd>,
    /// librdkafka settings passed as they are.
    pub properties: Vec<(String, String)>,
    pub backfill: Option<BackfillPlan>,
}

/// Where a Kafka source without a checkpoint begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaStart {
    Earliest,
    Latest,
    /// The first offsets whose record timestamps are at or after this time (ms).
    Time(i64),
}

/// Where a bounded Kafka source ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaEnd {
    /// The offsets that were latest when the job first started.
    Latest,
    /// The offsets of the first records at or after this time (ms).
    Time(i64),
}

/// History files read before a Kafka topic: events before `until_ms`, then the topic
/// from the offsets for `until_ms`.
#[derive(Clone, Debug)]
pub struct BackfillPlan {
    pub pattern: String,
    pub files: Vec<PathBuf>,
    pub until_ms: i64,
    /// The topic is read from the offsets for `until_ms` minus this (the disorder
    /// bound): records stamped a little before their event time are not missed; those
    /// whose events are before `until_ms` are skipped, the files have them.
    pub seam_slack_ms: i64,
}

/// Kafka as the output (SPEC §6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaOutputPlan {
    pub brokers: String,
    pub topic: String,
    pub late_topic: String,
    pub dead_topic: String,
    /// librdkafka settings passed as they are, `transaction.timeout.ms` resolved.
    pub properties: Vec<(String, String)>,
    pub transaction_timeout_ms: i64,
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
    Kafka(KafkaOutputPlan),
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
    /// `[state] cold_probes`: when probes of spilled state are read.
    pub cold_probes: ColdProbeMode,
    /// `[state] payloads`: "shaped" (the default), "auto" or "verbatim".
    pub payloads: PayloadMode,
    pub checkpoint: Option<CheckpointPlan>,
    /// `[metrics]` (or `--metrics`): Prometheus metrics and the status page.
    pub metrics: Option<MetricsPlan>,
    pub parallelism: usize,
    /// `[join] repartition = true`: inputs that are not co-partitioned are joined as
    /// one partition, split over the shards by key (see `driver::state_partitions`).
    pub repartition: bool,
    /// `--instance NAME`: this process is one of several sharing the job (SPEC §6).
    pub instance: Option<String>,
}

impl Plan {
    /// Makes this plan instance `name` of a job several processes share: its local
    /// state under `[state] dir/NAME`. Such a job reads co-partitioned Kafka topics,
    /// writes to Kafka and checkpoints to a store every instance sees.
    pub fn as_instance(mut self, name: &str) -> Result<Plan, JobError> {
        let fail = |message: String| JobError {
            file: self.file.clone(),
            message,
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(fail(format!(
                "--instance `{name}`: use letters, digits, `-`, `_` and `.` only (it names a folder and a Kafka group member)"
            )));
        }
        for source in &self.sources {
            match &source.input {
                Input::Kafka(k) if k.backfill.is_none() => {}
                _ => {
                    return Err(fail(format!(
                        "--instance: source `{}` is not a Kafka topic without history files; instances share the partitions of Kafka topics only",
                        source.name
                    )))
                }
            }
        }
        if !matches!(self.output, Output::Kafka(_)) {
            return Err(fail(
                "--instance: [output] must be Kafka (kind = \"kafka\"); instances commit their output through Kafka transactions".into(),
            ));
        }
        if self.repartition {
            return Err(fail(
                "--instance: [join] repartition = true is not supported across instances yet: braid repartitions inside one process only (run the job without --instance), not through intermediate Kafka topics; for instances, produce both inputs keyed by the join key into topics of the same partition count".into(),
            ));
        }
        if self.checkpoint.is_none() {
            return Err(fail(
                "--instance: the job needs [checkpoint], with a dir every instance sees (a shared folder or s3://): a partition's state moves between instances through it".into(),
            ));
        }
        self.state_dir = self.state_dir.join(name);
        self.instance = Some(name.to_string());
        Ok(self)
    }

    /// The Kafka consumer group of the job's first Kafka source.
    pub fn kafka_group(&self) -> Option<&KafkaSourcePlan> {
        self.sources.iter().find_map(|s| match &s.input {
            Input::Kafka(k) => Some(k),
            _ => None,
        })
    }
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
    let sources = [
        source(
            left,
            base,
            &raw.name,
            max_out_of_orderness_ms + allowed_lateness_ms,
        )?,
        source(
            right,
            base,
            &raw.name,
            max_out_of_orderness_ms + allowed_lateness_ms,
        )?,
    ];
    for s in [left, right] {
        if s.rate.is_some() && s.start.is_none() && raw.checkpoint.is_some() {
            return Err(format!(
                "[[source]] {}: start: a live generator (`rate`) in a job with [checkpoint] needs a `start` time (RFC 3339), so that a resumed run goes on with the same event times; without one each run would start at its own clock",
                s.name
            ));
        }
    }
    if left.key.len() != right.key.len() {
        return Err(format!(
            "[[source]] {}: key has {} fields but {} has {}; the join pairs key fields in order",
            right.name,
            right.key.len(),
            left.name,
            left.key.len()
        ));
    }
    let interval_ms = match &raw.checkpoint {
        Some(c) => Some(
            match duration("[checkpoint] interval", &c.interval, "10s")? {
                ms if ms > 0 => ms,
                _ => return Err("[checkpoint] interval: must be positive".into()),
            },
        ),
        None => None,
    };
    let output = output(&raw.output, base, interval_ms)?;
    if let Output::Kafka(_) = output {
        if let Some(s) = sources.iter().find(|s| !matches!(s.input, Input::Kafka(_))) {
            return Err(format!(
                "[output] kind: a kafka output commits its transactions together with the sources' Kafka offsets, and source `{}` is not kafka; write files or stdout instead",
                s.name
            ));
        }
    }
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
    let cold_probes = match state.cold_probes.as_deref() {
        None => ColdProbeMode::default(),
        Some(name) => parse_cold_probes(name).ok_or_else(|| {
            format!("[state] cold_probes: `{name}` is neither \"deferred\" nor \"eager\"")
        })?,
    };
    let payloads = match state.payloads.as_deref() {
        None | Some("shaped") => PayloadMode::Shaped,
        Some("auto") => PayloadMode::Auto,
        Some("verbatim") => PayloadMode::Verbatim,
        Some(name) => {
            return Err(format!(
                "[state] payloads: `{name}` is not \"auto\", \"shaped\" or \"verbatim\""
            ))
        }
    };
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
            interval_ms: interval_ms.expect("parsed above"),
        }),
    };
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => {
            let listen = m
                .listen
                .clone()
                .unwrap_or_else(|| METRICS_LISTEN_DEFAULT.into());
            crate::live::resolve_listen(&listen).map_err(|e| e.to_string())?;
            let linger_ms = match &m.linger {
                Some(text) => parse_duration_ms(text)
                    .ok()
                    .filter(|&ms| ms >= 0)
                    .ok_or_else(|| {
                        format!("[metrics] linger: `{text}` is not a duration, e.g. \"30s\"")
                    })? as u64,
                None => 0,
            };
            Some(MetricsPlan { listen, linger_ms })
        }
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
        cold_probes,
        payloads,
        checkpoint,
        metrics,
        parallelism,
        repartition: raw.join.repartition,
        instance: None,
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

/// A required text field of a Kafka source or output.
fn required(value: &Option<String>, field: &str, what: &str) -> Result<String, String> {
    match value.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(format!("{field}: {what}")),
    }
}

fn properties(map: &Option<BTreeMap<String, String>>) -> Vec<(String, String)> {
    map.iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn kafka_source(
    s: &SourceFile,
    base: &Path,
    job: &str,
    slack_ms: i64,
) -> Result<KafkaSourcePlan, String> {
    let field = |f: &str| format!("[[source]] {}: {f}", s.name);
    let time = |f: &str, text: &str| {
        braid_io::parse_rfc3339_ms(text).map_err(|e| {
            format!(
                "{}: `{text}` is not earliest, latest or an RFC 3339 time ({e})",
                field(f)
            )
        })
    };
    let start = match s.start.as_deref().unwrap_or("earliest") {
        "earliest" => KafkaStart::Earliest,
        "latest" => KafkaStart::Latest,
        text => KafkaStart::Time(time("start", text)?),
    };
    let end = match s.end.as_deref() {
        None => None,
        Some("latest") => Some(KafkaEnd::Latest),
        Some(text) => Some(KafkaEnd::Time(time("end", text)?)),
    };
    let backfill = match &s.backfill {
        None => None,
        Some(b) => {
            let files = braid_io::resolve_glob(&s.name, base, &b.path)
                .map_err(|e| format!("{}: {e}", field("backfill.path")))?;
            let until_ms = braid_io::parse_rfc3339_ms(&b.until).map_err(|e| {
                format!(
                    "{}: `{}` is not an RFC 3339 time ({e})",
                    field("backfill.until"),
                    b.until
                )
            })?;
            if s.start.is_some() {
                return Err(format!(
                    "{}: a source with [source.backfill] reads the topic from backfill.until on; remove `start`",
                    field("start")
                ));
            }
            Some(BackfillPlan {
                pattern: b.path.clone(),
                files,
                until_ms,
                seam_slack_ms: slack_ms,
            })
        }
    };
    Ok(KafkaSourcePlan {
        brokers: required(
            &s.brokers,
            &field("brokers"),
            "a kafka source needs its bootstrap servers, e.g. \"127.0.0.1:9092\"",
        )?,
        topic: required(&s.topic, &field("topic"), "a kafka source needs a topic")?,
        group: s.group.clone().unwrap_or_else(|| job.to_string()),
        start,
        end,
        properties: properties(&s.properties),
        backfill,
    })
}

fn source(s: &SourceFile, base: &Path, job: &str, slack_ms: i64) -> Result<SourcePlan, String> {
    let field = |f: &str| format!("[[source]] {}: {f}", s.name);
    if s.key.is_empty() {
        return Err(format!(
            "{}: the key needs at least one field",
            field("key")
        ));
    }
    if s.key.iter().any(|k| k.is_empty()) || s.time.as_deref() == Some("") {
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
    if s.kind != "kafka" {
        for (present, name) in [
            (s.brokers.is_some(), "brokers"),
            (s.topic.is_some(), "topic"),
            (s.group.is_some(), "group"),
            (s.start.is_some() && s.kind != "generator", "start"),
            (s.end.is_some(), "end"),
            (s.properties.is_some(), "properties"),
            (s.backfill.is_some(), "backfill"),
        ] {
            only_for(present, name, "kafka")?;
        }
        if s.time.is_none() {
            return Err(format!(
                "{}: a {} source needs the field that holds the event time",
                field("time"),
                s.kind
            ));
        }
    }
    let input = match s.kind.as_str() {
        "files" => {
            only_for(s.rate.is_some(), "rate", "generator")?;
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
            if let Some(start) = &s.start {
                config.start_ms = braid_io::parse_rfc3339_ms(start).map_err(|e| {
                    format!(
                        "{}: `{start}` is not an RFC 3339 time ({e})",
                        field("start")
                    )
                })?;
            }
            match s.rate {
                Some(0) => return Err(format!("{}: must be at least 1", field("rate"))),
                Some(rate) => {
                    // Live: unbounded unless `events` says, its times from `start` (or
                    // now) on at the wall clock's pace.
                    config.impressions_per_s = rate;
                    config.events = s.events.unwrap_or(u64::MAX);
                    if s.start.is_none() {
                        config.start_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64);
                    }
                }
                None => {}
            }
            Input::Generator {
                config,
                stream,
                paced: s.rate,
            }
        }
        "kafka" => {
            only_for(s.path.is_some(), "path", "files")?;
            only_for(s.rate.is_some(), "rate", "generator")?;
            only_for(s.stream.is_some(), "stream", "generator")?;
            only_for(s.events.is_some(), "events", "generator")?;
            only_for(s.seed.is_some(), "seed", "generator")?;
            Input::Kafka(kafka_source(s, base, job, slack_ms)?)
        }
        other => {
            return Err(format!(
                "{}: `{other}` is not a source kind; use files, kafka or generator",
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

fn output(o: &OutputFile, base: &Path, interval_ms: Option<i64>) -> Result<Output, String> {
    if o.kind != "kafka" {
        for (present, name) in [
            (o.brokers.is_some(), "brokers"),
            (o.topic.is_some(), "topic"),
            (o.late_topic.is_some(), "late_topic"),
            (o.dead_topic.is_some(), "dead_topic"),
            (o.properties.is_some(), "properties"),
        ] {
            if present {
                return Err(format!("[output] {name}: only a `kafka` output takes it"));
            }
        }
    }
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
        "kafka" => kafka_output(o, interval_ms).map(Output::Kafka),
        other => Err(format!(
            "[output] kind: `{other}` is not an output kind; use files, kafka or stdout"
        )),
    }
}

fn kafka_output(o: &OutputFile, interval_ms: Option<i64>) -> Result<KafkaOutputPlan, String> {
    if o.path.is_some() {
        return Err("[output] path: only a `files` output takes it".into());
    }
    let Some(interval_ms) = interval_ms else {
        return Err("[output] kind: a kafka output writes one transaction per checkpoint; add a [checkpoint] section".into());
    };
    let topic = required(&o.topic, "[output] topic", "a kafka output needs a topic")?;
    let mut properties = properties(&o.properties);
    let needed_ms = 2 * interval_ms + TRANSACTION_MARGIN_MS;
    let set = properties
        .iter()
        .find(|(k, _)| k == "transaction.timeout.ms")
        .map(|(_, v)| v.clone());
    let transaction_timeout_ms = match set {
        Some(text) => {
            let ms: i64 = text.trim().parse().map_err(|_| {
                format!("[output.properties] transaction.timeout.ms: `{text}` is not a number of milliseconds")
            })?;
            if ms < needed_ms {
                return Err(format!(
                    "[output.properties] transaction.timeout.ms: {ms} ms is too short for [checkpoint] interval {}: a transaction stays open from one checkpoint to the commit of the next, so it needs at least 2 × interval + {} s = {needed_ms} ms; raise it or shorten the interval",
                    crate::units::format_duration_ms(interval_ms),
                    TRANSACTION_MARGIN_MS / 1000
                ));
            }
            ms
        }
        None => {
            if needed_ms > TRANSACTION_TIMEOUT_MAX_MS {
                return Err(format!(
                    "[checkpoint] interval: {} is too long for Kafka transactions: one stays open from one checkpoint to the commit of the next, and brokers allow {} s by default (transaction.max.timeout.ms); shorten the interval, or raise the broker's limit and set [output.properties] transaction.timeout.ms",
                    crate::units::format_duration_ms(interval_ms),
                    TRANSACTION_TIMEOUT_MAX_MS / 1000
                ));
            }
            let ms = needed_ms.max(60_000);
            properties.push(("transaction.timeout.ms".into(), ms.to_string()));
            ms
        }
    };
    Ok(KafkaOutputPlan {
        brokers: required(
            &o.brokers,
            "[output] brokers",
            "a kafka output needs its bootstrap servers, e.g. \"127.0.0.1:9092\"",
        )?,
        late_topic: o
            .late_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.late")),
        dead_topic: o
            .dead_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dead")),
        topic,
        properties,
        transaction_timeout_ms,
    })
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.spec;
        writeln!(f, "job `{}` ({})", self.name, self.file.display())?;
        for (side, source) in ["left ", "right"].iter().zip(&self.sources) {
            write!(
                f,
                "  {side} source `{}`: key {:?}, time {}",
                source.name,
                source.schema.key,
                match &source.schema.time {
                    Some(t) => format!("`{t}`"),
                    None => "the record timestamp".to_string(),
                }
            )?;
            if let Some(id) = &source.schema.id {
                write!(f, ", id `{id}`")?;
            }
            match &source.input {
                Input::Files { pattern, files } => {
                    writeln!(f, ", {} file(s) matching {pattern}", files.len())?
                }
                Input::Generator {
                    config,
                    stream,
                    paced: None,
                } => writeln!(
                    f,
                    ", generated {} (seed {}, {} lines)",
                    stream.name(),
                    config.seed,
                    config.events
                )?,
                Input::Generator {
                    config,
                    stream,
                    paced: Some(rate),
                } => writeln!(
                    f,
                    ", generated {} live (seed {}, {rate} impressions/s of wall clock from {}{})",
                    stream.name(),
                    config.seed,
                    braid_io::format_rfc3339_ms(config.start_ms),
                    if config.events == u64::MAX {
                        ", unbounded".to_string()
                    } else {
                        format!(", {} lines", config.events)
                    }
                )?,
                Input::Kafka(k) => {
                    write!(
                        f,
                        ", kafka topic `{}` at {} (group `{}`), starting {:?}",
                        k.topic, k.brokers, k.group, k.start
                    )?;
                    match k.end {
                        Some(end) => write!(f, ", ending {end:?}")?,
                        None => write!(f, ", unbounded")?,
                    }
                    if let Some(b) = &k.backfill {
                        write!(
                            f,
                            ", after {} history file(s) matching {} before {}",
                            b.files.len(),
                            b.pattern,
                            braid_io::format_rfc3339_ms(b.until_ms)
                        )?;
                    }
                    writeln!(f)?
                }
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
            Output::Kafka(k) => writeln!(
                f,
                "  output: kafka topic `{}` (late `{}`, dead `{}`) at {}, one transaction per checkpoint, transaction.timeout.ms {}",
                k.topic, k.late_topic, k.dead_topic, k.brokers, k.transaction_timeout_ms
            )?,
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
        if let Some(m) = &self.metrics {
            writeln!(
                f,
                "  metrics: http://{}/metrics, status page at /, kept {} ms after a bounded run",
                m.listen, m.linger_ms
            )?;
        }
        Ok(())
    }
}

/// `[state] cold_probes` (and `braid bench --cold-probes`): "deferred" or "eager".
pub fn parse_cold_probes(name: &str) -> Option<ColdProbeMode> {
    match name {
        "deferred" => Some(ColdProbeMode::Deferred),
        "eager" => Some(ColdProbeMode::Eager),
        _ => None,
    }
}

/// The name [`parse_cold_probes`] reads.
pub fn cold_probes_name(mode: ColdProbeMode) -> &'static str {
    match mode {
        ColdProbeMode::Deferred => "deferred",
        ColdProbeMode::Eager => "eager",
    }
}
