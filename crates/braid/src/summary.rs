//! The run summary: every count of the accounting identity, checked.
//!
//! Every input record is exactly one of: matched (joined at least once), emitted
//! unmatched, expired unmatched, duplicate, late or dead.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use braid_core::JoinCounts;

use crate::checkpoint::Committed;
use crate::config::Plan;
use crate::counts::SourceCounts;
use crate::engine::ShardReport;

#[derive(Clone, Debug)]
pub struct Summary {
    pub name: String,
    pub sources: [(String, SourceCounts); 2],
    pub join: JoinCounts,
    pub seconds: f64,
    pub peak_state_bytes: usize,
    pub disk_bytes_max: u64,
    pub peak_rss_bytes: u64,
    pub output: Option<PathBuf>,
    pub checkpoints: Option<CheckpointCounts>,
    /// Records read by earlier runs, up to the checkpoint this run resumed from.
    pub resumed_input: u64,
    /// A run stopped by a signal: per source, the events its time guards hold. The
    /// events in state and those held are accounted for by the next run.
    pub stopped: Option<[u64; 2]>,
}

/// What checkpointing did in one run.
#[derive(Clone, Debug, Default)]
pub struct CheckpointCounts {
    /// The epoch this run resumed from.
    pub restored_from: Option<u64>,
    /// Time from start until the restored state was ready (fetch, verify, load).
    pub restore_ms: Option<f64>,
    pub taken: usize,
    /// How long the pipeline stood still for a barrier: median, 99th percentile, max.
    pub pause_ms: [f64; 3],
    /// From barrier to committed manifest, median.
    pub duration_ms_median: f64,
    pub last_state_bytes: u64,
}

impl CheckpointCounts {
    pub fn new(
        restored_from: Option<u64>,
        restore_ms: Option<f64>,
        committed: &[Committed],
    ) -> CheckpointCounts {
        let mut pauses: Vec<f64> = committed
            .iter()
            .map(|c| c.pause.as_secs_f64() * 1e3)
            .collect();
        pauses.sort_by(f64::total_cmp);
        let mut durations: Vec<f64> = committed
            .iter()
            .map(|c| c.duration.as_secs_f64() * 1e3)
            .collect();
        durations.sort_by(f64::total_cmp);
        CheckpointCounts {
            restored_from,
            restore_ms,
            taken: committed.len(),
            pause_ms: [
                quantile(&pauses, 0.5),
                quantile(&pauses, 0.99),
                quantile(&pauses, 1.0),
            ],
            duration_ms_median: quantile(&durations, 0.5),
            last_state_bytes: committed.last().map_or(0, |c| c.state_bytes),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "restored_from_epoch": self.restored_from,
            "restore_ms": self.restore_ms,
            "taken": self.taken,
            "pause_ms_p50": self.pause_ms[0],
            "pause_ms_p99": self.pause_ms[1],
            "pause_ms_max": self.pause_ms[2],
            "duration_ms_p50": self.duration_ms_median,
            "last_state_bytes": self.last_state_bytes,
        })
    }
}

/// The `q` quantile of sorted values (nearest rank), 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    (sorted[rank - 1] * 100.0).round() / 100.0
}

impl Summary {
    pub fn new(
        plan: &Plan,
        counts: [SourceCounts; 2],
        reports: &[ShardReport],
        elapsed: Duration,
        output: Option<PathBuf>,
    ) -> Summary {
        let mut join = JoinCounts::default();
        for r in reports {
            join.add(&r.counts);
        }
        Summary {
            name: plan.name.clone(),
            sources: [
                (plan.sources[0].name.clone(), counts[0]),
                (plan.sources[1].name.clone(), counts[1]),
            ],
            join,
            seconds: elapsed.as_secs_f64(),
            peak_state_bytes: reports.iter().map(|r| r.peak_state_bytes).sum(),
            disk_bytes_max: reports.iter().map(|r| r.disk_bytes_max).sum(),
            peak_rss_bytes: peak_rss_bytes(),
            output,
            checkpoints: None,
            resumed_input: 0,
            stopped: None,
        }
    }

    pub fn input(&self) -> u64 {
        self.sources.iter().map(|s| s.1.input).sum()
    }

    /// The accounting identity of one side: what it adds up to, and what was read.
    fn accounted(&self, i: usize) -> (u64, u64) {
        let j = &self.join;
        let s = &self.sources[i].1;
        let sum = j.matched[i]
            + j.unmatched_emitted[i]
            + j.unmatched_expired[i]
            + j.duplicates[i]
            + s.late
            + s.dead;
        (sum, s.input)
    }

    /// Checks that every input record is accounted for exactly once.
    pub fn check(&self) -> Result<(), String> {
        for i in 0..2 {
            let (sum, input) = self.accounted(i);
            if let Some(held) = self.stopped {
                // Stopped: what is still in state or held waits for the next run.
                let pending = self.join.retained[i] + held[i];
                if sum + pending != input {
                    return Err(format!(
                        "accounting of source `{}` does not add up: read {input}, accounted {sum}, still in state or held {pending}",
                        self.sources[i].0
                    ));
                }
                continue;
            }
            if sum != input || self.join.retained[i] != 0 {
                return Err(format!(
                    "accounting of source `{}` does not add up: read {input}, accounted {sum}, still in state {}",
                    self.sources[i].0, self.join.retained[i]
                ));
            }
        }
        Ok(())
    }

    /// Every count as JSON, written beside a files output as `_summary.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let j = &self.join;
        let side = |i: usize| {
            let s = &self.sources[i].1;
            serde_json::json!({
                "name": self.sources[i].0,
                "read": s.input,
                "matched": j.matched[i],
                "unmatched_emitted": j.unmatched_emitted[i],
                "unmatched_expired": j.unmatched_expired[i],
                "duplicates": j.duplicates[i],
                "late": s.late,
                "dead": s.dead,
                "dead_time_jumps": s.time_jumps,
            })
        };
        serde_json::json!({
            "job": self.name,
            "pairs": j.pairs,
            "left": side(0),
            "right": side(1),
            "accounted": self.check().is_ok(),
            "seconds": self.seconds,
            "read_before_resume": self.resumed_input,
            "peak_state_bytes": self.peak_state_bytes,
            "spilled_segments": j.spilled_segments,
            "spilled_events": j.spilled_events,
            "disk_bytes_max": self.disk_bytes_max,
            "peak_rss_bytes": self.peak_rss_bytes,
            "checkpoints": self.checkpoints.as_ref().map(CheckpointCounts::to_json),
        })
    }

    /// Records read by this run, per second of it.
    pub fn events_per_s(&self) -> f64 {
        (self.input() - self.resumed_input) as f64 / self.seconds.max(1e-9)
    }
}

/// The process's peak resident memory (`VmHWM`), or 0 where it cannot be read.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let j = &self.join;
        let resumed = if self.resumed_input > 0 {
            format!(
                " ({} read by earlier runs up to the checkpoint resumed)",
                self.resumed_input
            )
        } else {
            String::new()
        };
        writeln!(
            f,
            "job `{}`: {} records{resumed}; {:.2} s, {:.0} records/s",
            self.name,
            self.input(),
            self.seconds,
            self.events_per_s()
        )?;
        if let Some(held) = self.stopped {
            writeln!(
                f,
                "  stopped by a signal: {} events wait in state for the next run",
                j.retained.iter().sum::<u64>() + held.iter().sum::<u64>()
            )?;
        }
        writeln!(f, "  joined pairs emitted   {}", j.pairs)?;
        writeln!(
            f,
            "  {:<22} {:>12} {:>12}",
            "", self.sources[0].0, self.sources[1].0
        )?;
        let row = |f: &mut fmt::Formatter<'_>, label: &str, a: u64, b: u64| {
            writeln!(f, "  {label:<22} {a:>12} {b:>12}")
        };
        row(f, "read", self.sources[0].1.input, self.sources[1].1.input)?;
        row(f, "matched", j.matched[0], j.matched[1])?;
        row(
            f,
            "unmatched, emitted",
            j.unmatched_emitted[0],
            j.unmatched_emitted[1],
        )?;
        row(
            f,
            "unmatched, expired",
            j.unmatched_expired[0],
            j.unmatched_expired[1],
        )?;
        row(f, "duplicates", j.duplicates[0], j.duplicates[1])?;
        row(
            f,
            "late (_late/)",
            self.sources[0].1.late,
            self.sources[1].1.late,
        )?;
        row(
            f,
            "dead letters (_dead/)",
            self.sources[0].1.dead,
            self.sources[1].1.dead,
        )?;
        row(
            f,
            "  of which far ahead",
            self.sources[0].1.time_jumps,
            self.sources[1].1.time_jumps,
        )?;
        let verdict = match self.check() {
            Ok(()) => "every record accounted for exactly once".to_string(),
            Err(e) => format!("MISMATCH: {e}"),
        };
        writeln!(f, "  accounting             {verdict}")?;
        writeln!(
            f,
            "  state                  peak {:.1} MiB in memory, {} segments ({} events) spilled, {:.1} MiB on disk at most",
            self.peak_state_bytes as f64 / 1048576.0,
            j.spilled_segments,
            j.spilled_events,
            self.disk_bytes_max as f64 / 1048576.0
        )?;
        write!(
            f,
            "  peak RSS               {:.0} MiB",
            self.peak_rss_bytes as f64 / 1048576.0
        )?;
        if let Some(c) = &self.checkpoints {
            write!(
                f,
                "\n  checkpoints            {} taken{}, pause p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                c.taken,
                match (c.restored_from, c.restore_ms) {
                    (Some(e), Some(ms)) => format!(" (resumed from {e}, restored in {ms:.0} ms)"),
                    _ => String::new(),
                },
                c.pause_ms[0],
                c.pause_ms[1],
                c.pause_ms[2]
            )?;
        }
        if let Some(dir) = &self.output {
            write!(f, "\n  output                 {}", dir.display())?;
        }
        Ok(())
    }
}
