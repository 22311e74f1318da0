//! Argument checking shared by every plugin module: turning a Rhai `Dynamic` that may
//! hold an `INT` or a `FLOAT` into a Rust number, validating sizes and durations given
//! by untrusted scripts, and building the error values returned to them.

use rhai::{Dynamic, EvalAltResult};

/// Result type of every fallible native function.
pub(crate) type Res<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error carrying `msg` (a script sees it as a string in `catch (e)`).
#[cold]
pub(crate) fn err<T>(msg: impl AsRef<str>) -> Res<T> {
    Err(msg.into())
}

/// A friendly name for the type held by `v`, for error messages.
pub(crate) fn type_of(v: &Dynamic) -> &'static str {
    if v.is_int() {
        "INT"
    } else if v.is_float() {
        "FLOAT"
    } else {
        crate::plugin_type_name(v).unwrap_or_else(|| v.type_name())
    }
}

/// Any number (`INT` or `FLOAT`, NaN and infinities included) as `f64`.
pub(crate) fn number(v: &Dynamic, ctx: &str) -> Res<f64> {
    if let Ok(i) = v.as_int() {
        Ok(i as f64)
    } else if let Ok(f) = v.as_float() {
        Ok(f)
    } else {
        err(format!(
            "{ctx}: expected a number (INT or FLOAT), got {}",
            type_of(v)
        ))
    }
}

/// A finite number (`INT` or `FLOAT`; NaN and infinities are rejected) as `f64`.
pub(crate) fn finite(v: &Dynamic, ctx: &str) -> Res<f64> {
    let x = number(v, ctx)?;
    if x.is_finite() {
        Ok(x)
    } else {
        err(format!("{ctx}: expected a finite number, got {x}"))
    }
}

/// A whole number in `min..=max`: an `INT`, or a `FLOAT` with no fractional part.
pub(crate) fn whole(v: &Dynamic, ctx: &str, min: i64, max: i64) -> Res<i64> {
    let n = if let Ok(i) = v.as_int() {
        i
    } else {
        let x = number(v, ctx)?;
        // `i64::MAX as f64` rounds up to 2^63, so the upper test is strict.
        if x.is_finite() && x.fract() == 0.0 && x >= i64::MIN as f64 && x < i64::MAX as f64 {
            x as i64
        } else {
            return err(format!("{ctx}: expected a whole number, got {x}"));
        }
    };
    if (min..=max).contains(&n) {
        Ok(n)
    } else if max == i64::MAX {
        err(format!("{ctx}: must be at least {min}, got {n}"))
    } else {
        err(format!("{ctx}: must be between {min} and {max}, got {n}"))
    }
}

/// A size in `min..=max` (see [`whole`]).
pub(crate) fn size(v: &Dynamic, ctx: &str, min: usize, max: usize) -> Res<usize> {
    let n = whole(v, ctx, min as i64, max as i64)?;
    Ok(n as usize)
}

/// A timestamp in milliseconds: an `INT`, or a finite `FLOAT` rounded down.
pub(crate) fn timestamp(v: &Dynamic, ctx: &str) -> Res<i64> {
    if let Ok(i) = v.as_int() {
        return Ok(i);
    }
    let x = number(v, ctx)?.floor();
    if x.is_finite() && x >= i64::MIN as f64 && x < i64::MAX as f64 {
        Ok(x as i64)
    } else {
        err(format!(
            "{ctx}: expected a timestamp in milliseconds, got {x}"
        ))
    }
}

/// A positive length of time in milliseconds: a whole number >= 1 or a duration
/// string such as `"1m30s"` (see [`crate::parse_duration_ms`]).
pub(crate) fn duration_arg(v: &Dynamic, ctx: &str) -> Res<i64> {
    let ms = if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        crate::parse_duration_ms(&s).or_else(|e| err(format!("{ctx}: {e}")))?
    } else if v.is_int() || v.is_float() {
        whole(v, ctx, 1, i64::MAX)?
    } else {
        return err(format!(
            "{ctx}: expected milliseconds (INT or FLOAT) or a duration string, got {}",
            type_of(v)
        ));
    };
    if ms < 1 {
        return err(format!("{ctx}: must be at least 1 ms, got {ms}"));
    }
    Ok(ms)
}

/// `Some(x)` as a `FLOAT`, `None` as `()`.
pub(crate) fn opt_float(v: Option<f64>) -> rhai::Dynamic {
    v.map_or(rhai::Dynamic::UNIT, rhai::Dynamic::from_float)
}

/// A `u64` count as an `INT` (saturating; counts never get near `i64::MAX`).
pub(crate) fn int(n: u64) -> rhai::INT {
    rhai::INT::try_from(n).unwrap_or(rhai::INT::MAX)
}
