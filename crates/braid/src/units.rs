//! Durations and sizes as written in job files and on the command line.

/// Parses `250ms`, `5s`, `10m`, `1h`, `2d`, with an optional leading `-`, to milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: i64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{text}` is not a duration; write a whole number and a unit: 250ms, 5s, 10m, 1h, 2d (negative with a leading -)"
            ))
        }
    };
    let value: i64 = digits.parse().map_err(|_| {
        format!("`{text}` is not a duration; it needs digits before the unit, as in 5s")
    })?;
    let ms = value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too long a duration"))?;
    Ok(if negative { -ms } else { ms })
}

/// Formats milliseconds in the job file's units, the largest two that apply: `3d 4h`,
/// `2m 5s`, `250ms`, `-5s`.
pub fn format_duration_ms(ms: i64) -> String {
    const UNITS: [(i64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    let sign = if ms < 0 { "-" } else { "" };
    let mut left = ms.unsigned_abs();
    let mut parts = Vec::new();
    for (scale, unit) in UNITS {
        let scale = scale as u64;
        if left >= scale && parts.len() < 2 {
            parts.push(format!("{}{unit}", left / scale));
            left %= scale;
        } else if !parts.is_empty() {
            break;
        }
    }
    if parts.is_empty() {
        return "0s".to_string();
    }
    format!("{sign}{}", parts.join(" "))
}

/// Parses `512MiB`, `4GiB`, `64KiB`, `100B` (or a bare number of bytes) to bytes.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}` is not a size; write a whole number and a unit: 64KiB, 512MiB, 4GiB"
            ))
        }
    };
    let value: u64 = digits.parse().map_err(|_| {
        format!("`{text}` is not a size; it needs digits before the unit, as in 512MiB")
    })?;
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("250ms", 250),
            ("5s", 5_000),
            ("10m", 600_000),
            ("1h", 3_600_000),
            ("2d", 172_800_000),
            ("-5s", -5_000),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(parse_duration_ms(text), Ok(ms), "{text}");
        }
        for bad in [
            "5",
            "s",
            "5 sec",
            "1.5s",
            "--5s",
            "5S",
            "99999999999999999d",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatted_durations() {
        let cases = [
            (0, "0s"),
            (250, "250ms"),
            (5_000, "5s"),
            (125_000, "2m 5s"),
            (3_600_000, "1h"),
            (3_660_000, "1h 1m"),
            (3_600_500, "1h"),
            (277_200_000, "3d 5h"),
            (-5_000, "-5s"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_duration_ms(ms), text, "{ms}");
        }
    }

    #[test]
    fn sizes() {
        let ok = [
            ("512MiB", 512 << 20),
            ("4GiB", 4 << 30),
            ("64KiB", 64 << 10),
            ("100", 100),
            ("7B", 7),
        ];
        for (text, bytes) in ok {
            assert_eq!(parse_size_bytes(text), Ok(bytes), "{text}");
        }
        for bad in ["512MB", "MiB", "-1MiB", "1.5GiB"] {
            assert!(parse_size_bytes(bad).is_err(), "{bad}");
        }
    }
}
