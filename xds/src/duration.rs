//! Durations as users write them in config: `250ms`, `2s`, `1.5s`, `1m30s`.

use std::time::Duration;

/// The longest duration any setting accepts; larger values are almost
/// certainly a unit mistake (`5000s` meant as `5000ms`), and a bound keeps
/// arithmetic on them safe.
pub const MAX: Duration = Duration::from_secs(24 * 3600);

/// Parses one or more `<number><unit>` terms (units `ms`, `s`, `m`, `h`;
/// the number may have a decimal part). The result must be a whole number
/// of milliseconds (the resources carry milliseconds) and at most [`MAX`].
pub fn parse(s: &str) -> Result<Duration, String> {
    let hint = "use a number and a unit: ms, s, m or h (e.g. 250ms, 2s, 1m30s)";
    if s.is_empty() {
        return Err(format!("empty duration: {hint}"));
    }
    if s.len() > 32 {
        return Err(format!("duration {s:?} is too long: {hint}"));
    }
    let mut rest = s;
    // Microseconds, so `1.5ms` can be told apart from a whole millisecond.
    let mut total_us: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_us: u128 = match unit {
            "ms" => 1_000,
            "s" => 1_000_000,
            "m" => 60_000_000,
            "h" => 3_600_000_000,
            "" => return Err(format!("duration {s:?} has no unit: {hint}")),
            _ => return Err(format!("duration {s:?} has unknown unit {unit:?}: {hint}")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
            return Err(format!("invalid duration {s:?}: {hint}"));
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse()
                .map_err(|_| format!("invalid duration {s:?}: {hint}"))?
        };
        let frac_us = if frac.is_empty() {
            0
        } else {
            let digits: u128 = frac
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: {hint}"))?;
            let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(9));
            digits * unit_us / scale
        };
        total_us = total_us
            .saturating_add(int.saturating_mul(unit_us))
            .saturating_add(frac_us);
        rest = after;
    }
    if !total_us.is_multiple_of(1_000) {
        return Err(format!(
            "duration {s:?} is not a whole number of milliseconds"
        ));
    }
    let ms = total_us / 1_000;
    if ms > MAX.as_millis() {
        return Err(format!("duration {s:?} is longer than 24h"));
    }
    Ok(Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn rejects_malformed_or_out_of_range_durations() {
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "-1s",
            "1.5.5s",
            "5d",
            "1us",
            "1.5ms",
            "25h",
            "1.s.",
            "abc",
            "99999999999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
