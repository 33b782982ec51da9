//! Durations as written in the config: `500ms`, `30s`, `5m`, `1h`, `1h30m`, `2d`.

use std::time::Duration;

/// Units in the order they must appear when combined (`1h30m`, not `30m1h`).
const UNITS: [(&str, Duration); 5] = [
    ("d", Duration::from_secs(86_400)),
    ("h", Duration::from_secs(3_600)),
    ("m", Duration::from_secs(60)),
    ("s", Duration::from_secs(1)),
    ("ms", Duration::from_millis(1)),
];

/// Parses a sequence of `NUMBER UNIT` parts, e.g. `1h30m`; the result must be > 0.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const EXPECTED: &str =
        "expected a number and a unit (ms, s, m, h, d), e.g. \"30s\", \"5m\", \"1h30m\"";
    if text.is_empty() {
        return Err(format!("empty duration; {EXPECTED}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    // Index into UNITS of the last unit seen: each part must use a smaller unit.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_end = rest[digits_end..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |offset| digits_end + offset);
        let (number, unit) = (&rest[..digits_end], &rest[digits_end..unit_end]);
        if number.is_empty() {
            return Err(format!("'{text}' is not a duration; {EXPECTED}"));
        }
        let Some(unit_index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(if unit.is_empty() {
                format!("'{text}' has no unit; {EXPECTED}")
            } else {
                format!("unknown unit '{unit}' in '{text}'; {EXPECTED}")
            });
        };
        if last_unit.is_some_and(|last| unit_index <= last) {
            return Err(format!(
                "'{text}' repeats a unit or lists them out of order (write e.g. \"1h30m\")"
            ));
        }
        last_unit = Some(unit_index);
        let part = number
            .parse::<u32>()
            .ok()
            .and_then(|count| UNITS[unit_index].1.checked_mul(count))
            .ok_or_else(|| format!("'{text}' is too long a duration"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("'{text}' is too long a duration"))?;
        rest = &rest[unit_end..];
    }
    if total.is_zero() {
        return Err(format!(
            "'{text}' is zero; the duration must be greater than 0"
        ));
    }
    Ok(total)
}

/// Formats a duration so that [`parse_duration`] reads it back (millisecond precision;
/// anything finer is dropped, and a zero duration is written `0s`).
pub fn format_duration(duration: Duration) -> String {
    let mut remaining_ms = duration.as_millis();
    if remaining_ms == 0 {
        return "0s".to_string();
    }
    let mut text = String::new();
    // Days are not used on output: `48h` reads better than `2d` for timeouts.
    for (name, unit) in &UNITS[1..] {
        let unit_ms = unit.as_millis();
        let count = remaining_ms / unit_ms;
        if count > 0 {
            text.push_str(&format!("{count}{name}"));
            remaining_ms %= unit_ms;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_combined_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(
            parse_duration("1m30s250ms"),
            Ok(Duration::from_millis(90_250))
        );
    }

    #[test]
    fn rejects_bad_durations_with_reason() {
        for (text, reason) in [
            ("", "empty duration"),
            ("30", "has no unit"),
            ("30x", "unknown unit 'x'"),
            ("s", "is not a duration"),
            ("1.5s", "unknown unit '.'"),
            ("0s", "must be greater than 0"),
            ("0h0m", "must be greater than 0"),
            ("30m1h", "out of order"),
            ("1s1s", "repeats a unit"),
            ("-5s", "is not a duration"),
            (" 5s", "is not a duration"),
            ("99999999999d", "too long"),
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn formats_what_it_parses() {
        for text in ["30s", "5m", "1h", "500ms", "1h30m", "25h1m1s", "1s1ms"] {
            let duration = parse_duration(text).expect(text);
            assert_eq!(format_duration(duration), text);
        }
        assert_eq!(format_duration(Duration::from_secs(172_800)), "48h");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
