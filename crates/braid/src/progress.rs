//! The progress line of a run on a terminal: records read, rate, watermark, the
//! state's size by tier, and the time left where the input's size is known.

use std::time::{Duration, Instant};

use braid_core::Watermark;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const PROGRESS_REFRESH: Duration = Duration::from_millis(250);

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last: Instant,
    /// The input's done fraction at the first tick (a resumed run starts past 0).
    first_fraction: Option<f64>,
}

/// What the progress line shows, taken from the reading loop.
pub struct ProgressView {
    pub records: u64,
    pub watermark: Watermark,
    /// Bytes of state in memory and on disk.
    pub state: (u64, u64),
    /// The share of the bounded input read, where its size is known.
    pub done_fraction: Option<f64>,
}

impl ProgressView {
    /// The line, `elapsed_s` into a run that started at `first_fraction` of its input:
    /// records, rate, watermark, state by tier, and the time left when the input's
    /// size is known (the rate of this run so far, over what is left).
    pub fn line(&self, elapsed_s: f64, first_fraction: f64) -> String {
        let rate = self.records as f64 / elapsed_s.max(1e-9);
        let mark = if self.watermark.is_infinite() {
            self.watermark.to_string()
        } else {
            braid_io::format_rfc3339_ms(self.watermark.millis())
        };
        let mib = |b: u64| b as f64 / 1_048_576.0;
        let mut line = format!(
            "{} records, {rate:.0}/s, watermark {mark}, state {:.1} MiB in memory, {:.1} MiB on disk",
            self.records,
            mib(self.state.0),
            mib(self.state.1)
        );
        if let Some(done) = self.done_fraction {
            line.push_str(&format!(", {:.0} % read", done * 100.0));
            let gained = done - first_fraction;
            if gained > 0.0 && done < 1.0 {
                let left_s = elapsed_s * (1.0 - done) / gained;
                line.push_str(&format!(
                    ", about {} left",
                    crate::units::format_duration_ms(left_s.round() as i64 * 1_000)
                ));
            }
        }
        line
    }
}

impl Progress {
    /// Shows progress only when `enabled` (stderr is a terminal and not `--quiet`).
    pub fn new(enabled: bool) -> Progress {
        let bar = enabled.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            started: now,
            last: now,
            first_fraction: None,
        }
    }

    pub fn tick(&mut self, view: &ProgressView) {
        let Some(bar) = &self.bar else {
            return;
        };
        if self.last.elapsed() < PROGRESS_REFRESH {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let first = *self
            .first_fraction
            .get_or_insert(view.done_fraction.unwrap_or(0.0));
        bar.set_message(view.line(elapsed, first));
        bar.tick();
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_state_by_tier_and_the_time_left() {
        let view = ProgressView {
            records: 1_000,
            watermark: Watermark::MAX,
            state: (3 << 20, 512 << 10),
            done_fraction: Some(0.6),
        };
        // A resumed run: 0.2 of the input was read before it; 0.4 in 10 s here, so
        // the 0.4 left takes 10 s more.
        let line = view.line(10.0, 0.2);
        assert!(line.contains("100/s"), "{line}");
        assert!(
            line.contains("state 3.0 MiB in memory, 0.5 MiB on disk"),
            "{line}"
        );
        assert!(line.contains("60 % read, about 10s left"), "{line}");
        let unknown = ProgressView {
            done_fraction: None,
            ..view
        };
        assert!(!unknown.line(10.0, 0.0).contains("left"));
        let done = ProgressView {
            done_fraction: Some(1.0),
            ..unknown
        };
        assert!(
            !done.line(10.0, 0.0).contains("left"),
            "nothing left at 100 %"
        );
    }
}
