//! `holt(alpha, beta)`: Holt's linear trend method, River's `time_series.HoltWinters(alpha,
//! beta)` without seasonality, for forecasts such as "when will this sensor cross its limit".
//!
//! The first two values set `level = mean(y₁, y₂)` and `trend = y₂ - y₁` (River's
//! initialisation, `k = max(2, seasonality)` values); every later value updates
//!
//! ```text
//! level' = alpha · y + (1 - alpha) · (level + trend)
//! trend' = beta · (level' - level) + (1 - beta) · trend
//! ```
//!
//! `forecast(h)` is `level + h · trend` (River's `forecast(h)[-1]`), `()` before two values.
//! `steps_to(limit)` is the horizon `h >= 0` at which the forecast reaches `limit`:
//! `(limit - level) / trend`, or `()` when the trend never gets there. Steps are counted in
//! `learn` calls; multiply by the interval between readings for a time.

use rhai::plugin::*;
use rhai::{Map, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Holt's linear trend forecaster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    first: Option<f64>,
    level: Option<f64>,
    trend: f64,
    count: u64,
}

impl Holt {
    pub fn new(alpha: f64, beta: f64) -> Result<Self, String> {
        for (name, v) in [("alpha", alpha), ("beta", beta)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "holt(alpha, beta): {name} must be in [0, 1], got {v}"
                ));
            }
        }
        Ok(Holt {
            alpha,
            beta,
            first: None,
            level: None,
            trend: 0.0,
            count: 0,
        })
    }

    pub fn learn(&mut self, y: f64) {
        self.count += 1;
        match (self.level, self.first) {
            (Some(level), _) => {
                let next = self.alpha * y + (1.0 - self.alpha) * (level + self.trend);
                self.trend = self.beta * (next - level) + (1.0 - self.beta) * self.trend;
                self.level = Some(next);
            }
            (None, Some(first)) => {
                self.level = Some((first + y) / 2.0);
                self.trend = y - first;
            }
            (None, None) => self.first = Some(y),
        }
    }

    pub fn forecast(&self, h: f64) -> Option<f64> {
        self.level.map(|l| l + h * self.trend)
    }

    pub fn steps_to(&self, limit: f64) -> Option<f64> {
        let level = self.level?;
        if level == limit {
            return Some(0.0);
        }
        let h = (limit - level) / self.trend;
        (h.is_finite() && h >= 0.0).then_some(h)
    }

    /// `#{level, trend, count, alpha, beta}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("level".into(), num::opt_float(self.level));
        m.insert(
            "trend".into(),
            num::opt_float(self.level.map(|_| self.trend)),
        );
        m.insert("count".into(), num::int(self.count).into());
        m.insert("alpha".into(), self.alpha.into());
        m.insert("beta".into(), self.beta.into());
        m
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }
}

/// Rhai functions of `holt`.
#[export_module(manifest)]
pub mod holt_functions {
    use super::*;

    /// Holt's linear trend with level smoothing `alpha` and trend smoothing `beta`, both in
    /// [0, 1] (River: `HoltWinters(alpha, beta)`).
    ///
    /// ```rhai
    /// let h = holt(0.3, 0.1);
    /// h.learn(20.0); h.learn(20.5); h.learn(21.1);
    /// print(h.forecast(10));
    /// ```
    #[rhai_fn(name = "holt", return_raw)]
    pub fn new_holt(alpha: Dynamic, beta: Dynamic) -> Res<Holt> {
        let made = (|| -> Res<Holt> {
            let alpha = num::finite(&alpha, "holt(alpha, beta): alpha")?;
            let beta = num::finite(&beta, "holt(alpha, beta): beta")?;
            Holt::new(alpha, beta).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Adds the next value of the series (`INT` or finite `FLOAT`).
    ///
    /// ```rhai
    /// h.learn(ev.temp);
    /// ```
    #[rhai_fn(name = "learn", return_raw)]
    pub fn learn(h: &mut Holt, y: Dynamic) -> Res<()> {
        h.learn(num::finite(&y, "holt.learn(y)")?);
        Ok(())
    }

    /// The forecast `h` steps ahead (`h` >= 0), `()` before two values.
    ///
    /// ```rhai
    /// let next = h.forecast(1);
    /// ```
    #[rhai_fn(name = "forecast", return_raw, pure)]
    pub fn forecast(h: &mut Holt, steps: Dynamic) -> Res<Dynamic> {
        let steps = num::finite(&steps, "holt.forecast(h)")?;
        if steps < 0.0 {
            return num::err(format!("holt.forecast(h): h must be >= 0, got {steps}"));
        }
        Ok(num::opt_float(h.forecast(steps)))
    }

    /// Steps until the forecast reaches `limit`, `()` if it never does (or before two values).
    ///
    /// ```rhai
    /// let steps = h.steps_to(80.0);
    /// if steps != () { emit(#{ eta_ms: steps * interval_ms }) }
    /// ```
    #[rhai_fn(name = "steps_to", return_raw, pure)]
    pub fn steps_to(h: &mut Holt, limit: Dynamic) -> Res<Dynamic> {
        let limit = num::finite(&limit, "holt.steps_to(limit)")?;
        Ok(num::opt_float(h.steps_to(limit)))
    }

    /// The smoothed level, `()` before two values.
    ///
    /// ```rhai
    /// print(h.level);
    /// ```
    #[rhai_fn(get = "level", pure)]
    pub fn level(h: &mut Holt) -> Dynamic {
        num::opt_float(h.level)
    }

    /// The smoothed trend per step, `()` before two values.
    ///
    /// ```rhai
    /// print(h.trend);
    /// ```
    #[rhai_fn(get = "trend", pure)]
    pub fn trend(h: &mut Holt) -> Dynamic {
        num::opt_float(h.level.map(|_| h.trend))
    }

    /// Number of values learned.
    ///
    /// ```rhai
    /// print(h.count);
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(h: &mut Holt) -> INT {
        num::int(h.count)
    }

    /// `#{level, trend, count, alpha, beta}`.
    ///
    /// ```rhai
    /// emit(h.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(h: &mut Holt) -> Map {
        h.to_map()
    }

    /// Text form, e.g. `holt#{...}`.
    ///
    /// ```rhai
    /// print(h);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(h: &mut Holt) -> String {
        format!("holt{}", Dynamic::from_map(h.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn follows_the_recurrence_written_out() {
        let ys = [10.0, 12.0, 13.0, 15.5, 16.0, 18.25];
        let out: rhai::Array = eval_with(
            "let h = holt(0.5, 0.3); for y in ys { h.learn(y) } [h.level, h.trend, h.forecast(3), h.count]",
            vec![("ys", mixed(&ys))],
        );
        let (a, b) = (0.5, 0.3);
        let (mut level, mut trend) = ((10.0 + 12.0) / 2.0, 2.0);
        for y in &ys[2..] {
            let next = a * y + (1.0 - a) * (level + trend);
            trend = b * (next - level) + (1.0 - b) * trend;
            level = next;
        }
        assert_close(f(&out[0]), level, 1e-12);
        assert_close(f(&out[1]), trend, 1e-12);
        assert_close(f(&out[2]), level + 3.0 * trend, 1e-12);
        assert_eq!(out[3].as_int().unwrap(), 6);
    }

    #[test]
    fn a_straight_line_is_extrapolated_exactly() {
        let out: rhai::Array = eval(
            "let h = holt(0.4, 0.2); for i in 0..50 { h.learn(20 + 0.5 * i) }
             [h.forecast(10), h.steps_to(50.0), h.steps_to(0.0)]",
        );
        // The level starts at the mean of the first two values, a quarter step behind the
        // line, and that lag decays geometrically: after 50 values the level is the last
        // value, 44.5, and the trend 0.5, to within a few millionths.
        assert_close(f(&out[0]), 49.5, 1e-6);
        assert_close(f(&out[1]), 11.0, 1e-5);
        assert!(out[2].is_unit());
    }

    #[test]
    fn nothing_before_two_values_and_bad_arguments() {
        let out: rhai::Array =
            eval("let h = holt(0.5, 0.5); h.learn(3); [h.forecast(1), h.steps_to(5), h.level]");
        assert!(out.iter().all(Dynamic::is_unit));
        let flat: rhai::Array =
            eval("let h = holt(0.5, 0.5); h.learn(3); h.learn(3); [h.steps_to(3), h.steps_to(4)]");
        assert_eq!(f(&flat[0]), 0.0);
        assert!(flat[1].is_unit());
        for (script, needle) in [
            ("holt(1.5, 0.1)", "alpha must be in [0, 1]"),
            ("holt(0.5, -1)", "beta must be in [0, 1]"),
            ("let h = holt(0.5, 0.5); h.learn(\"x\")", "holt.learn"),
            ("let h = holt(0.5, 0.5); h.forecast(-1)", "h must be >= 0"),
        ] {
            let e = eval_err(script);
            assert!(e.contains(needle), "{script}: {e}");
        }
        let h: Holt = eval("let h = holt(0.5, 0.5); h.learn(1); h.learn(2); h.learn(4); h");
        assert_eq!(round_trip(&h), h);
    }
}
