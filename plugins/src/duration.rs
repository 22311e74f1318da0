//! Durations and tumbling windows: `duration("1m30s")` turns a human duration into
//! milliseconds, and `window_start(ts, "1m")` floors a timestamp to the start of its
//! tumbling window. [`parse_duration_ms`] is also what the engine uses for settings such
//! as `lateness`.
//!
//! Grammar: one or more `<number><unit>` parts, optionally separated by spaces, where
//! the unit is `ms`, `s`, `m`, `h` or `d` and the number is a whole or decimal number
//! (`"1.5s"` is 1500 ms; the total must be a whole number of ms). A bare whole number
//! (`"250"`) is milliseconds. Durations are never negative.

use std::fmt;

use rhai::plugin::*;
use rhai::INT;

use crate::num::{self, Res};

/// Why a duration string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError {
    input: String,
    reason: String,
}

impl DurationError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_string(),
            reason: reason.into(),
        }
    }

    /// The rejected input.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for DurationError {}

/// Parses a duration such as `"500ms"`, `"30s"`, `"1m30s"`, `"1.5h"`, `"2d"` or `"250"`
/// (bare number = milliseconds) into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, DurationError> {
    let fail = |reason: String| DurationError::new(s, reason);
    let text = s.trim();
    if text.is_empty() {
        return Err(fail(
            "it is empty; write e.g. \"500ms\", \"30s\", \"1m30s\"".into(),
        ));
    }
    if text.starts_with('-') {
        return Err(fail("durations cannot be negative".into()));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .map_err(|_| fail("the number is too large".into()));
    }
    let bytes = text.as_bytes();
    let mut total: i128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b' ' {
            i += 1;
            continue;
        }
        // <number>: digits, optionally '.' and more digits.
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let number = &text[start..i];
        if number.is_empty() {
            let rest: String = text[start..].chars().take(10).collect();
            return Err(fail(format!("expected a number at {rest:?}")));
        }
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(fail(format!("{number:?} is not a number")));
        }
        // <unit>: letters.
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: i128 = match &text[ustart..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(fail(format!(
                    "{number:?} has no unit (use ms, s, m, h or d; only a lone number means ms)"
                )))
            }
            other => {
                return Err(fail(format!(
                    "unknown unit {other:?} (use ms, s, m, h or d)"
                )))
            }
        };
        let too_large = || fail("it is too large".into());
        if whole.len() > 30 || frac.len() > 30 {
            return Err(too_large());
        }
        let w: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let mut part = w.checked_mul(unit_ms).ok_or_else(too_large)?;
        if !frac.is_empty() {
            let digits: i128 = frac.parse().map_err(|_| too_large())?;
            let scale = 10i128.pow(frac.len() as u32);
            let scaled = digits * unit_ms;
            if scaled % scale != 0 {
                return Err(fail(format!(
                    "{number}{} is not a whole number of ms",
                    &text[ustart..i]
                )));
            }
            part += scaled / scale;
        }
        total = total.checked_add(part).ok_or_else(too_large)?;
        if total > i64::MAX as i128 {
            return Err(too_large());
        }
    }
    Ok(total as i64)
}

/// Start of the tumbling window of `size_ms` (>= 1) containing `ts`: `ts` rounded down
/// to a multiple of `size_ms` (also for negative `ts`). `None` on overflow.
pub fn window_start_ms(ts: i64, size_ms: i64) -> Option<i64> {
    if size_ms < 1 {
        return None;
    }
    ts.div_euclid(size_ms).checked_mul(size_ms)
}

/// Rhai functions for durations and tumbling windows.
#[export_module(manifest)]
pub mod duration_functions {
    use super::*;

    /// Milliseconds in a duration string: units `ms`, `s`, `m`, `h`, `d`, combinable
    /// (`"1m30s"`), decimals allowed (`"1.5s"`); a bare number is ms. Bad input is an
    /// error naming it.
    ///
    /// ```rhai
    /// print(duration("1m30s"));   // 90000
    /// print(duration("250"));     // 250
    /// ```
    #[rhai_fn(name = "duration", return_raw)]
    pub fn duration(s: &str) -> Res<INT> {
        parse_duration_ms(s).or_else(|e| num::err(e.to_string()))
    }

    /// Start of the tumbling window containing timestamp `ts` (ms, `INT` or `FLOAT`);
    /// `size` is a duration string or a number of ms >= 1. Floors, also for negative `ts`.
    ///
    /// ```rhai
    /// let bucket = window_start(ev.ts, "1m");
    /// print(window_start(125_000, 60_000));   // 120000
    /// print(window_start(-1, "1s"));          // -1000
    /// ```
    #[rhai_fn(name = "window_start", return_raw)]
    pub fn window_start(ts: Dynamic, size: Dynamic) -> Res<INT> {
        let ctx = "window_start(ts, size)";
        let ts = num::timestamp(&ts, ctx)?;
        let size = num::duration_arg(&size, ctx)?;
        match window_start_ms(ts, size) {
            Some(start) => Ok(start),
            None => num::err(format!("{ctx}: {ts} is out of range")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn parses_units_and_combinations() {
        let cases: [(&str, i64); 14] = [
            ("0", 0),
            ("250", 250),
            ("500ms", 500),
            ("30s", 30 * 1000),
            ("1m", 60 * 1000),
            ("1m30s", 60 * 1000 + 30 * 1000),
            ("2h", 2 * 60 * 60 * 1000),
            ("1d", 24 * 60 * 60 * 1000),
            ("1h 2m 3s 4ms", ((60 + 2) * 60 + 3) * 1000 + 4),
            ("  7s  ", 7000),
            ("1.5s", 1500),
            ("0.25m", 15 * 1000),
            (".5s", 500),
            ("1d1ms", 24 * 60 * 60 * 1000 + 1),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration_ms(s), Ok(want), "{s}");
            assert_eq!(eval::<INT>(&format!("duration({s:?})")), want, "{s}");
        }
    }

    #[test]
    fn rejects_bad_strings_naming_them() {
        for bad in [
            "",
            "   ",
            "1x",
            "m",
            "5 parsecs",
            "1.5",
            "1ms5",
            "-5",
            "-1s",
            "1.2.3s",
            "0.5ms",
            "1M",
            "99999999999999999999",
            "999999999999999d",
            "1s!",
            ".s",
        ] {
            let e = parse_duration_ms(bad).expect_err(bad);
            assert_eq!(e.input(), bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
            let script_err = eval_err(&format!("duration({bad:?})"));
            assert!(script_err.contains(&format!("{bad:?}")), "{script_err}");
        }
        assert!(parse_duration_ms("1x")
            .unwrap_err()
            .reason()
            .contains("unknown unit"));
        assert!(eval_err("duration(5)").contains("duration"));
    }

    #[test]
    fn window_start_floors_like_integer_math() {
        let mut rng = Lcg::new(13);
        for _ in 0..200 {
            let ts = rng.below(2_000_000_000) as i64 - 1_000_000_000;
            let size = 1 + rng.below(100_000) as i64;
            // Reference: the largest multiple of size that is <= ts, by plain search.
            let mut want = (ts / size) * size;
            if want > ts {
                want -= size;
            }
            let got: INT = eval(&format!("window_start({ts}, {size})"));
            assert_eq!(got, want, "ts {ts} size {size}");
            assert!(got <= ts && ts - got < size);
        }
        assert_eq!(eval::<INT>(r#"window_start(125000, "1m")"#), 120_000);
        assert_eq!(eval::<INT>(r#"window_start(-1, "1s")"#), -1000);
        assert_eq!(eval::<INT>(r#"window_start(-1000, "1s")"#), -1000);
        assert_eq!(eval::<INT>("window_start(1999.9, 1000)"), 1000);
        assert_eq!(eval::<INT>("window_start(59999, 60000.0)"), 0);
    }

    #[test]
    fn window_start_errors() {
        assert!(eval_err("window_start(5, 0)").contains("window_start(ts, size)"));
        assert!(eval_err("window_start(5, -60)").contains("at least 1"));
        assert!(eval_err(r#"window_start(5, "1q")"#).contains("\"1q\""));
        assert!(eval_err(r#"window_start("5", 10)"#).contains("got string"));
        assert!(eval_err("window_start(5, [])").contains("got array"));
        let near_min = i64::MIN + 1;
        assert!(eval_err(&format!("window_start({near_min}, 1000)")).contains("out of range"));
    }
}
