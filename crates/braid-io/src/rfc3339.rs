//! RFC 3339 timestamps to epoch milliseconds and back, without a date library.

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and a space separator are
/// accepted too. Fractions beyond milliseconds are truncated.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, &'static str> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err("too short for RFC 3339");
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, &'static str> {
        let mut v = 0i64;
        for &c in &b[range] {
            if !c.is_ascii_digit() {
                return Err("expected a digit");
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Ok(v)
    };
    let sep = |i: usize, allowed: &[u8]| -> Result<(), &'static str> {
        if allowed.contains(&b[i]) {
            Ok(())
        } else {
            Err("misplaced separator")
        }
    };
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    sep(13, b":")?;
    sep(16, b":")?;
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err("no such date");
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("no such time of day");
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err("empty fraction");
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err("no such offset");
            }
            if sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return Err("expected Z or an offset like +01:00 at the end"),
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Ok(seconds * 1_000 + millis)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1_000 % 60,
        rem % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("1970-01-01T00:00:00Z", 0),
            ("2023-11-14T22:13:20Z", 1_700_000_000_000),
            ("2023-11-14T22:13:20.5Z", 1_700_000_000_500),
            ("2023-11-14T22:13:20.123456Z", 1_700_000_000_123),
            ("2023-11-14t23:13:20.001+01:00", 1_700_000_000_001),
            ("2023-11-14 20:13:20-02:00", 1_700_000_000_000),
            ("2024-02-29T00:00:00Z", 1_709_164_800_000),
        ];
        for (s, want) in ok {
            assert_eq!(parse_rfc3339_ms(s), Ok(want), "{s}");
        }
        let bad = [
            "2023-11-14",
            "2023-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0100",
            "2023/11/14T22:13:20Z",
            "2023-11-14T22:13:20Zjunk",
        ];
        for s in bad {
            assert!(parse_rfc3339_ms(s).is_err(), "{s}");
        }
    }

    #[test]
    fn rfc3339_formatting_round_trips() {
        for ms in [0, 1_700_000_000_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms));
        }
    }
}
