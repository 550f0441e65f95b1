//! Event time and watermarks.

use std::fmt;

/// Event time in milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(pub i64);

/// The join's watermark: no event with an earlier time is expected any more.
///
/// It starts at minus infinity and becomes plus infinity when every bounded input is
/// exhausted. Comparisons are done in `i128` so that adding bounds never overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(i128);

impl Watermark {
    /// Beyond any `i64` time plus or minus any `i64` bound.
    pub const MIN: Watermark = Watermark(i128::MIN / 4);
    pub const MAX: Watermark = Watermark(i128::MAX / 4);

    pub fn at(time: EventTime) -> Watermark {
        Watermark(i128::from(time.0))
    }

    pub fn is_infinite(self) -> bool {
        self == Watermark::MIN || self == Watermark::MAX
    }

    /// The watermark as milliseconds, clamped into `i64` (for display and serialisation).
    pub fn millis(self) -> i64 {
        self.0.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// True when `self > time + offset_ms`, computed without overflow.
    pub fn passed(self, time: EventTime, offset_ms: i64) -> bool {
        self.0 > i128::from(time.0) + i128::from(offset_ms)
    }

    /// The watermark as stored in snapshots and manifests.
    pub fn raw(self) -> i128 {
        self.0
    }

    /// A watermark read back from a snapshot, clamped into the infinities.
    pub fn from_raw(raw: i128) -> Watermark {
        Watermark(raw.clamp(Watermark::MIN.0, Watermark::MAX.0))
    }

    /// True when `self > time`, for times already widened to `i128`.
    pub(crate) fn passed_wide(self, time: i128) -> bool {
        self.0 > time
    }

    /// True when an event at `time` is late: `time < W - allowed_lateness`.
    pub fn is_late(self, time: EventTime, allowed_lateness_ms: i64) -> bool {
        i128::from(time.0) < self.0 - i128::from(allowed_lateness_ms)
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Watermark::MIN => f.write_str("-inf"),
            Watermark::MAX => f.write_str("+inf"),
            Watermark(ms) => write!(f, "{ms}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_watermarks_compare_beyond_every_time() {
        let t = EventTime(i64::MAX);
        assert!(Watermark::MAX.passed(t, i64::MAX));
        assert!(!Watermark::MIN.passed(EventTime(i64::MIN), i64::MIN));
        assert!(!Watermark::MIN.is_late(EventTime(i64::MIN), 0));
        assert!(Watermark::MAX.is_late(t, i64::MAX));
    }

    #[test]
    fn lateness_is_strict() {
        let w = Watermark::at(EventTime(1000));
        assert!(!w.is_late(EventTime(1000), 0));
        assert!(w.is_late(EventTime(999), 0));
        assert!(!w.is_late(EventTime(900), 100));
        assert!(w.is_late(EventTime(899), 100));
    }
}
