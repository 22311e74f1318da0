//! `stats()`: running count, mean, variance, min, max and sum of a stream of numbers in
//! O(1) memory, using Welford's online algorithm (numerically stable, one pass). It is the
//! cheapest summary a query can keep per key.

use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Running statistics of a stream of numbers (Welford's algorithm).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    count: u64,
    mean: f64,
    /// Sum of squared differences from the mean.
    m2: f64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
}

impl Stats {
    /// An empty summary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn add(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.sum += x;
        self.min = Some(self.min.map_or(x, |m| m.min(x)));
        self.max = Some(self.max.map_or(x, |m| m.max(x)));
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean of the samples; 0.0 when empty.
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Sample variance (divides by n - 1); 0.0 with fewer than 2 samples.
    pub fn variance(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / (self.count - 1) as f64).max(0.0)
        }
    }

    /// Sample standard deviation.
    pub fn std(&self) -> f64 {
        self.variance().sqrt()
    }

    /// Smallest sample, if any.
    pub fn min(&self) -> Option<f64> {
        self.min
    }

    /// Largest sample, if any.
    pub fn max(&self) -> Option<f64> {
        self.max
    }

    /// Sum of the samples.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// `(x - mean) / std`, or 0.0 when `std` is 0.
    pub fn zscore(&self, x: f64) -> f64 {
        let sd = self.std();
        if sd == 0.0 {
            0.0
        } else {
            (x - self.mean) / sd
        }
    }

    /// Heap bytes used (none: the summary is fixed-size).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }

    /// `#{count, mean, std, variance, min, max, sum}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("count".into(), num::int(self.count).into());
        m.insert("mean".into(), self.mean.into());
        m.insert("std".into(), self.std().into());
        m.insert("variance".into(), self.variance().into());
        m.insert("min".into(), num::opt_float(self.min));
        m.insert("max".into(), num::opt_float(self.max));
        m.insert("sum".into(), self.sum.into());
        m
    }
}

/// Rhai functions of `stats`.
#[export_module(manifest)]
pub mod stats_functions {
    use super::*;

    /// Creates an empty running-statistics summary (Welford's algorithm).
    ///
    /// ```rhai
    /// let s = stats();
    /// s.add(2); s.add(4.0);
    /// print(s.mean);      // 3.0
    /// ```
    #[rhai_fn(name = "stats")]
    pub fn new_stats() -> Stats {
        Stats::new()
    }

    /// Adds a sample: an `INT` or a finite `FLOAT` (anything else is an error).
    ///
    /// ```rhai
    /// let s = stats();
    /// s.add(ev.price);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add(s: &mut Stats, x: Dynamic) -> Res<()> {
        s.add(num::finite(&x, "stats.add(x)")?);
        Ok(())
    }

    /// Number of samples added.
    ///
    /// ```rhai
    /// let s = stats(); s.add(1);
    /// print(s.count);     // 1
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(s: &mut Stats) -> INT {
        num::int(s.count())
    }

    /// Mean of the samples (0.0 when empty).
    ///
    /// ```rhai
    /// let s = stats(); s.add(1); s.add(2);
    /// print(s.mean);      // 1.5
    /// ```
    #[rhai_fn(get = "mean", pure)]
    pub fn mean(s: &mut Stats) -> FLOAT {
        s.mean()
    }

    /// Sample variance (divides by n - 1); 0.0 with fewer than 2 samples.
    ///
    /// ```rhai
    /// let s = stats(); s.add(1); s.add(3);
    /// print(s.variance);  // 2.0
    /// ```
    #[rhai_fn(get = "variance", pure)]
    pub fn variance(s: &mut Stats) -> FLOAT {
        s.variance()
    }

    /// Sample standard deviation: `sqrt(variance)`.
    ///
    /// ```rhai
    /// let s = stats(); s.add(1); s.add(3);
    /// print(s.std);       // 1.414...
    /// ```
    #[rhai_fn(get = "std", pure)]
    pub fn std(s: &mut Stats) -> FLOAT {
        s.std()
    }

    /// Smallest sample as a `FLOAT`, `()` when empty.
    ///
    /// ```rhai
    /// let s = stats(); s.add(5); s.add(-2);
    /// print(s.min);       // -2.0
    /// ```
    #[rhai_fn(get = "min", pure)]
    pub fn min(s: &mut Stats) -> Dynamic {
        num::opt_float(s.min())
    }

    /// Largest sample as a `FLOAT`, `()` when empty.
    ///
    /// ```rhai
    /// let s = stats(); s.add(5); s.add(-2);
    /// print(s.max);       // 5.0
    /// ```
    #[rhai_fn(get = "max", pure)]
    pub fn max(s: &mut Stats) -> Dynamic {
        num::opt_float(s.max())
    }

    /// Sum of the samples (0.0 when empty).
    ///
    /// ```rhai
    /// let s = stats(); s.add(5); s.add(-2);
    /// print(s.sum);       // 3.0
    /// ```
    #[rhai_fn(get = "sum", pure)]
    pub fn sum(s: &mut Stats) -> FLOAT {
        s.sum()
    }

    /// `(x - mean) / std`; 0.0 when `std` is 0 (fewer than 2 samples, or all equal).
    ///
    /// ```rhai
    /// if s.count >= 10 && s.zscore(ev.price).abs() > 3.0 { emit("alerts", ev) }
    /// ```
    #[rhai_fn(name = "zscore", return_raw, pure)]
    pub fn zscore(s: &mut Stats, x: Dynamic) -> Res<FLOAT> {
        Ok(s.zscore(num::number(&x, "stats.zscore(x)")?))
    }

    /// Summary map: `#{count, mean, std, variance, min, max, sum}`.
    ///
    /// ```rhai
    /// emit("stats", this.s.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(s: &mut Stats) -> Map {
        s.to_map()
    }

    /// Text form, e.g. `stats#{"count": 2, ...}`.
    ///
    /// ```rhai
    /// print(stats());
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(s: &mut Stats) -> String {
        format!("stats{}", Dynamic::from_map(s.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Two-pass reference: (mean, sample variance).
    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = if xs.len() < 2 {
            0.0
        } else {
            xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        };
        (mean, var)
    }

    #[test]
    fn matches_two_pass_reference() {
        let mut rng = Lcg::new(7);
        let xs: Vec<f64> = (0..500).map(|_| 1000.0 + rng.range(-50.0, 50.0)).collect();
        let (mean, var) = mean_var(&xs);
        let out: Map = eval_with(
            "let s = stats(); for x in data { s.add(x) }
             #{count: s.count, mean: s.mean, variance: s.variance, std: s.std,
               min: s.min, max: s.max, sum: s.sum, z: s.zscore(1010), z2: s.zscore(990.5)}",
            vec![("data", floats(&xs))],
        );
        assert_eq!(out["count"].as_int().unwrap(), 500);
        assert_close(f(&out["mean"]), mean, 1e-12);
        assert_close(f(&out["variance"]), var, 1e-9);
        assert_close(f(&out["std"]), var.sqrt(), 1e-9);
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(f(&out["min"]), min);
        assert_eq!(f(&out["max"]), max);
        assert_close(f(&out["sum"]), xs.iter().sum(), 1e-12);
        assert_close(f(&out["z"]), (1010.0 - mean) / var.sqrt(), 1e-9);
        assert_close(f(&out["z2"]), (990.5 - mean) / var.sqrt(), 1e-9);
    }

    #[test]
    fn accepts_ints_and_floats_mixed() {
        let data = mixed(&[3.0, 1.5, 7.0, -2.0, 4.25]);
        let xs = [3.0, 1.5, 7.0, -2.0, 4.25];
        let (mean, var) = mean_var(&xs);
        let out: Map = eval_with(
            "let s = stats(); for x in data { s.add(x) } s.to_map()",
            vec![("data", data)],
        );
        assert_eq!(out["count"].as_int().unwrap(), 5);
        assert_close(f(&out["mean"]), mean, 1e-12);
        assert_close(f(&out["variance"]), var, 1e-12);
        assert_close(f(&out["std"]), var.sqrt(), 1e-12);
        assert_eq!(f(&out["min"]), -2.0);
        assert_eq!(f(&out["max"]), 7.0);
        assert_eq!(f(&out["sum"]), 13.75);
        // The ints really went in as INT.
        assert!(eval::<bool>(
            "let s = stats(); s.add(2); s.add(3); s.sum == 5.0"
        ));
    }

    #[test]
    fn empty_and_single_sample() {
        let out: Map = eval(
            "let s = stats();
             #{count: s.count, mean: s.mean, vari: s.variance, std: s.std, min: s.min,
               max: s.max, sum: s.sum, z: s.zscore(5)}",
        );
        assert_eq!(out["count"].as_int().unwrap(), 0);
        assert_eq!(f(&out["mean"]), 0.0);
        assert_eq!(f(&out["vari"]), 0.0);
        assert_eq!(f(&out["std"]), 0.0);
        assert!(out["min"].is_unit());
        assert!(out["max"].is_unit());
        assert_eq!(f(&out["sum"]), 0.0);
        assert_eq!(f(&out["z"]), 0.0);
        let out: Map = eval(
            "let s = stats(); s.add(4);
             #{vari: s.variance, z: s.zscore(9), min: s.min, max: s.max}",
        );
        assert_eq!(f(&out["vari"]), 0.0);
        assert_eq!(f(&out["z"]), 0.0);
        assert_eq!(f(&out["min"]), 4.0);
        assert_eq!(f(&out["max"]), 4.0);
    }

    #[test]
    fn works_as_state_in_a_map_and_has_type_name() {
        let out: Map = eval(
            "let st = #{s: stats()};
             for x in [1, 2, 3] { st.s.add(x) }
             #{n: st.s.count, t: type_of(st.s), text: st.s.to_string()}",
        );
        assert_eq!(out["n"].as_int().unwrap(), 3);
        assert_eq!(out["t"].clone().into_string().unwrap(), "stats");
        assert!(out["text"]
            .clone()
            .into_string()
            .unwrap()
            .starts_with("stats#{"));
    }

    #[test]
    fn errors_on_bad_input() {
        let e = eval_err(r#"let s = stats(); s.add("x")"#);
        assert!(
            e.contains("stats.add(x): expected a number (INT or FLOAT), got string"),
            "{e}"
        );
        let e = eval_err("let s = stats(); s.add(0.0 / 0.0)");
        assert!(e.contains("finite"), "{e}");
        let e = eval_err("let s = stats(); s.zscore(())");
        assert!(e.contains("expected a number"), "{e}");
    }

    #[test]
    fn serde_round_trip() {
        let s: Stats = eval("let s = stats(); for x in [1, 2.5, 9, -4] { s.add(x) } s");
        let back: Stats = round_trip(&s);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", s.to_map()));
        let empty: Stats = round_trip(&Stats::new());
        assert_eq!(empty.count(), 0);
        assert!(empty.min().is_none());
    }
}
