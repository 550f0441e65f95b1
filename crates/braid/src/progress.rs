//! The progress line of a bounded run on a terminal: records read, rate, watermark.

use std::time::{Duration, Instant};

use braid_core::Watermark;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const PROGRESS_REFRESH: Duration = Duration::from_millis(250);

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last: Instant,
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
        }
    }

    pub fn tick(&mut self, records: u64, watermark: Watermark) {
        let Some(bar) = &self.bar else {
            return;
        };
        if self.last.elapsed() < PROGRESS_REFRESH {
            return;
        }
        self.last = Instant::now();
        let rate = records as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let mark = if watermark.is_infinite() {
            watermark.to_string()
        } else {
            braid_io::format_rfc3339_ms(watermark.millis())
        };
        bar.set_message(format!("{records} records, {rate:.0}/s, watermark {mark}"));
        bar.tick();
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
