//! What a join is asked to do: its kind, its interval and its lateness.

/// One input of a two-way join. Left and right share every code path; only
/// [`JoinSpec`] knows which way the interval points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Left, Side::Right];

    #[inline]
    pub fn opposite(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }

    #[inline]
    pub fn index(self) -> usize {
        match self {
            Side::Left => 0,
            Side::Right => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
}

/// A join's contract: `left` and `right` match when their keys are equal and
/// `lower_ms <= right.time - left.time <= upper_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinSpec {
    pub kind: JoinKind,
    pub lower_ms: i64,
    pub upper_ms: i64,
    pub allowed_lateness_ms: i64,
}

impl JoinSpec {
    /// Whether events of `side` that matched nothing are emitted (outer) or only counted.
    pub fn emits_unmatched(&self, side: Side) -> bool {
        matches!(
            (self.kind, side),
            (JoinKind::Left | JoinKind::Full, Side::Left)
                | (JoinKind::Right | JoinKind::Full, Side::Right)
        )
    }

    /// The inclusive range of times on the opposite side that an event of `side` at
    /// `time` matches, saturating at the ends of `i64`.
    #[inline]
    pub fn probe_range(&self, side: Side, time: i64) -> (i64, i64) {
        match side {
            Side::Left => (
                time.saturating_add(self.lower_ms),
                time.saturating_add(self.upper_ms),
            ),
            Side::Right => (
                time.saturating_sub(self.upper_ms),
                time.saturating_sub(self.lower_ms),
            ),
        }
    }

    /// How long after its own time an event of `side` is kept: until
    /// `W > time + retention_ms(side) + allowed_lateness`. The spec's rule is `upper`
    /// for the left side and `-lower` for the right; it is never below zero here so that
    /// an event's id is remembered at least until the event itself would be late, which
    /// makes every duplicate of a non-late event either late or detected.
    pub fn retention_ms(&self, side: Side) -> i64 {
        let rule = match side {
            Side::Left => self.upper_ms,
            Side::Right => self.lower_ms.saturating_neg(),
        };
        rule.max(0)
    }

    /// The width of a state bucket: about an eighth of the window, so that a probe
    /// touches about nine buckets, and at least one second.
    pub fn bucket_width_ms(&self) -> i64 {
        const BUCKETS_PER_WINDOW: i64 = 8;
        const BUCKET_WIDTH_MS_MIN: i64 = 1_000;
        let span = self.upper_ms.saturating_sub(self.lower_ms);
        (span / BUCKETS_PER_WINDOW).max(BUCKET_WIDTH_MS_MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: JoinKind, lower_ms: i64, upper_ms: i64) -> JoinSpec {
        JoinSpec {
            kind,
            lower_ms,
            upper_ms,
            allowed_lateness_ms: 0,
        }
    }

    #[test]
    fn probe_ranges_are_mirror_images() {
        let s = spec(JoinKind::Inner, -5, 10);
        assert_eq!(s.probe_range(Side::Left, 100), (95, 110));
        assert_eq!(s.probe_range(Side::Right, 100), (90, 105));
    }

    #[test]
    fn outer_sides() {
        let table = [
            (JoinKind::Inner, false, false),
            (JoinKind::Left, true, false),
            (JoinKind::Right, false, true),
            (JoinKind::Full, true, true),
        ];
        for (kind, left, right) in table {
            let s = spec(kind, 0, 1);
            assert_eq!(s.emits_unmatched(Side::Left), left, "{kind:?}");
            assert_eq!(s.emits_unmatched(Side::Right), right, "{kind:?}");
        }
    }

    #[test]
    fn retention_is_never_negative() {
        let s = spec(JoinKind::Full, -20, -10);
        assert_eq!(s.retention_ms(Side::Left), 0);
        assert_eq!(s.retention_ms(Side::Right), 20);
        assert_eq!(spec(JoinKind::Full, 0, 0).bucket_width_ms(), 1_000);
        assert_eq!(
            spec(JoinKind::Full, 0, 3_600_000).bucket_width_ms(),
            450_000
        );
    }
}
