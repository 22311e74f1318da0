//! `ewma(alpha)` and `ewma_halflife(ms)`: exponentially weighted moving average and
//! variance of a stream, in O(1) memory. `ewma` weighs samples by arrival order;
//! `ewma_halflife` weighs them by event time, so bursts and gaps are handled correctly.
//! Both build the same Rhai type, `ewma`.
//!
//! Update rule, for a new sample `x` whose share of the total weight is `a`:
//!
//! ```text
//! diff = x - mean;  mean += a * diff;  var = (1 - a) * (var + a * diff * diff)
//! ```
//!
//! which keeps `mean = Σ wᵢxᵢ / Σ wᵢ` and `var = Σ wᵢ(xᵢ - mean)² / Σ wᵢ` (the weighted
//! population variance) for the weights below. The first sample sets `mean = x`, `var = 0`.
//!
//! * `ewma(alpha)`: `a = alpha`, i.e. `mean = alpha * x + (1 - alpha) * mean`.
//! * `ewma_halflife(h)`: sample `i` has weight `wᵢ = 0.5^((t_newest - tᵢ) / h)`. On each
//!   `add(x, t)` with `t` >= the newest time so far, the weight accumulated by the old
//!   samples decays by `0.5^(dt / h)` and the new sample enters with weight 1, so samples
//!   with equal timestamps count equally. A late sample (`t` older than the newest) enters
//!   with its already-decayed weight and does not move the clock.

use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// How an [`Ewma`] weighs its samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum EwmaMode {
    /// Per-sample smoothing factor in (0, 1].
    Alpha(f64),
    /// Half-life in milliseconds of event time (> 0).
    HalfLifeMs(f64),
}

/// Exponentially weighted moving average and variance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ewma {
    mode: EwmaMode,
    mean: Option<f64>,
    var: f64,
    /// Total (decayed) weight of the samples; half-life mode only.
    weight: f64,
    /// Newest event time seen; half-life mode only.
    last_t: Option<i64>,
    count: u64,
}

impl Ewma {
    /// An average with smoothing factor `alpha` in (0, 1].
    pub fn with_alpha(alpha: f64) -> Result<Self, String> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(format!("ewma(alpha): alpha must be in (0, 1], got {alpha}"));
        }
        Ok(Self::new(EwmaMode::Alpha(alpha)))
    }

    /// An average over event time with the given half-life in milliseconds (> 0).
    pub fn with_halflife_ms(ms: f64) -> Result<Self, String> {
        if !(ms > 0.0 && ms.is_finite()) {
            return Err(format!(
                "ewma_halflife(ms): the half-life must be a positive number of ms, got {ms}"
            ));
        }
        Ok(Self::new(EwmaMode::HalfLifeMs(ms)))
    }

    fn new(mode: EwmaMode) -> Self {
        Self {
            mode,
            mean: None,
            var: 0.0,
            weight: 0.0,
            last_t: None,
            count: 0,
        }
    }

    /// The weighting mode.
    pub fn mode(&self) -> EwmaMode {
        self.mode
    }

    /// Adds `x` with weight share `a` of the new total.
    fn update(&mut self, x: f64, a: f64) {
        self.count += 1;
        match self.mean {
            None => {
                self.mean = Some(x);
                self.var = 0.0;
            }
            Some(mean) => {
                let diff = x - mean;
                let incr = a * diff;
                self.mean = Some(mean + incr);
                self.var = ((1.0 - a) * (self.var + diff * incr)).max(0.0);
            }
        }
    }

    /// Adds a sample to an `ewma(alpha)`.
    pub fn add(&mut self, x: f64) -> Result<(), String> {
        match self.mode {
            EwmaMode::Alpha(alpha) => {
                self.update(x, alpha);
                Ok(())
            }
            EwmaMode::HalfLifeMs(_) => {
                Err("ewma_halflife needs the event time: use add(x, t_ms) instead of add(x)".into())
            }
        }
    }

    /// Adds a sample at event time `t_ms` to an `ewma_halflife(ms)`.
    pub fn add_at(&mut self, x: f64, t_ms: i64) -> Result<(), String> {
        let EwmaMode::HalfLifeMs(h) = self.mode else {
            return Err(
                "ewma(alpha) is weighted by arrival order: use add(x); for event-time decay \
                 create ewma_halflife(ms)"
                    .into(),
            );
        };
        let a = match self.last_t {
            None => {
                self.weight = 1.0;
                self.last_t = Some(t_ms);
                1.0
            }
            Some(last) if t_ms >= last => {
                let dt = (t_ms as f64) - (last as f64);
                self.weight = self.weight * 0.5f64.powf(dt / h) + 1.0;
                self.last_t = Some(t_ms);
                1.0 / self.weight
            }
            Some(last) => {
                let w = 0.5f64.powf(((last as f64) - (t_ms as f64)) / h);
                self.weight += w;
                w / self.weight
            }
        };
        self.update(x, a);
        Ok(())
    }

    /// The average, `None` before the first sample.
    pub fn value(&self) -> Option<f64> {
        self.mean
    }

    /// Number of samples added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Exponentially weighted variance; 0.0 until 2 samples.
    pub fn variance(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            self.var
        }
    }

    /// `sqrt(variance)`.
    pub fn std(&self) -> f64 {
        self.variance().sqrt()
    }

    /// `(x - value) / std`, 0.0 when `std` is 0.
    pub fn zscore(&self, x: f64) -> f64 {
        let sd = self.std();
        match self.mean {
            Some(mean) if sd > 0.0 => (x - mean) / sd,
            _ => 0.0,
        }
    }

    /// Heap bytes used (none: the summary is fixed-size).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }

    /// `#{value, std, variance, count}` plus `alpha` or `halflife_ms`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("value".into(), num::opt_float(self.mean));
        m.insert("std".into(), self.std().into());
        m.insert("variance".into(), self.variance().into());
        m.insert("count".into(), num::int(self.count).into());
        match self.mode {
            EwmaMode::Alpha(a) => m.insert("alpha".into(), a.into()),
            EwmaMode::HalfLifeMs(h) => m.insert("halflife_ms".into(), h.into()),
        };
        m
    }
}

/// Rhai functions of `ewma`.
#[export_module(manifest)]
pub mod ewma_functions {
    use super::*;

    /// Creates an exponentially weighted moving average with smoothing factor
    /// `alpha` in (0, 1] (`INT` or `FLOAT`): `value = alpha * x + (1 - alpha) * value`.
    ///
    /// ```rhai
    /// let e = ewma(0.1);
    /// e.add(10); e.add(20);
    /// print(e.value);     // 11.0
    /// ```
    #[rhai_fn(name = "ewma", return_raw)]
    pub fn new_ewma(alpha: Dynamic) -> Res<Ewma> {
        let made = (|| -> Res<Ewma> {
            let alpha = num::number(&alpha, "ewma(alpha)")?;
            Ewma::with_alpha(alpha).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Creates a moving average over event time whose weights halve every `ms`
    /// milliseconds (a positive number, or a duration string like `"30s"`).
    /// Feed it with `add(x, t_ms)`.
    ///
    /// ```rhai
    /// let e = ewma_halflife("1m");
    /// e.add(ev.price, ev.ts);
    /// ```
    #[rhai_fn(name = "ewma_halflife", return_raw)]
    pub fn new_ewma_halflife(ms: Dynamic) -> Res<Ewma> {
        let made = (|| -> Res<Ewma> {
            let ctx = "ewma_halflife(ms)";
            let ms = if ms.is_string() {
                num::duration_arg(&ms, ctx)? as f64
            } else {
                num::number(&ms, ctx)?
            };
            Ewma::with_halflife_ms(ms).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Adds a sample (`INT` or finite `FLOAT`) to an `ewma(alpha)`.
    ///
    /// ```rhai
    /// let e = ewma(0.5); e.add(1); e.add(2.5);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add(e: &mut Ewma, x: Dynamic) -> Res<()> {
        let x = num::finite(&x, "ewma.add(x)")?;
        e.add(x).or_else(num::err)
    }

    /// Adds a sample at event time `t_ms` (milliseconds) to an `ewma_halflife(ms)`.
    ///
    /// ```rhai
    /// let e = ewma_halflife(1000); e.add(5.0, 0); e.add(7.0, 1000);
    /// print(e.value);     // 6.333... (the first sample's weight has halved)
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add_at(e: &mut Ewma, x: Dynamic, t_ms: Dynamic) -> Res<()> {
        let x = num::finite(&x, "ewma.add(x, t_ms)")?;
        let t = num::timestamp(&t_ms, "ewma.add(x, t_ms)")?;
        e.add_at(x, t).or_else(num::err)
    }

    /// The average as a `FLOAT`; `()` before the first sample.
    ///
    /// ```rhai
    /// let e = ewma(0.2); print(e.value);  // ()
    /// ```
    #[rhai_fn(get = "value", pure)]
    pub fn value(e: &mut Ewma) -> Dynamic {
        num::opt_float(e.value())
    }

    /// Number of samples added.
    ///
    /// ```rhai
    /// let e = ewma(0.2); e.add(1); print(e.count);  // 1
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(e: &mut Ewma) -> INT {
        num::int(e.count())
    }

    /// Exponentially weighted variance (see the module docs); 0.0 until 2 samples.
    ///
    /// ```rhai
    /// let e = ewma(0.5); e.add(0); e.add(2);
    /// print(e.variance);  // 1.0
    /// ```
    #[rhai_fn(get = "variance", pure)]
    pub fn variance(e: &mut Ewma) -> FLOAT {
        e.variance()
    }

    /// Exponentially weighted standard deviation; 0.0 until 2 samples.
    ///
    /// ```rhai
    /// let e = ewma(0.5); e.add(0); e.add(2);
    /// print(e.std);       // 1.0
    /// ```
    #[rhai_fn(get = "std", pure)]
    pub fn std(e: &mut Ewma) -> FLOAT {
        e.std()
    }

    /// `(x - value) / std`; 0.0 while `std` is 0.
    ///
    /// ```rhai
    /// if e.zscore(ev.price).abs() > 3.0 { emit("alerts", ev) }
    /// ```
    #[rhai_fn(name = "zscore", return_raw, pure)]
    pub fn zscore(e: &mut Ewma, x: Dynamic) -> Res<FLOAT> {
        Ok(e.zscore(num::number(&x, "ewma.zscore(x)")?))
    }

    /// Summary map: `#{value, std, variance, count}` plus `alpha` or `halflife_ms`.
    ///
    /// ```rhai
    /// emit("ewma", this.e.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(e: &mut Ewma) -> Map {
        e.to_map()
    }

    /// Text form, e.g. `ewma#{"alpha": 0.1, ...}`.
    ///
    /// ```rhai
    /// print(ewma(0.1));
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(e: &mut Ewma) -> String {
        format!("ewma{}", Dynamic::from_map(e.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Weighted mean and weighted population variance, computed directly.
    fn weighted(xs: &[f64], ws: &[f64]) -> (f64, f64) {
        let wsum: f64 = ws.iter().sum();
        let mean = xs.iter().zip(ws).map(|(x, w)| w * x).sum::<f64>() / wsum;
        let var = xs
            .iter()
            .zip(ws)
            .map(|(x, w)| w * (x - mean) * (x - mean))
            .sum::<f64>()
            / wsum;
        (mean, var)
    }

    #[test]
    fn alpha_matches_recursion_and_explicit_weights() {
        let mut rng = Lcg::new(3);
        let xs: Vec<f64> = (0..200).map(|_| rng.range(90.0, 110.0).round()).collect();
        let alpha = 0.1;
        // Plain recursion for the mean.
        let mut v = xs[0];
        for x in &xs[1..] {
            v = alpha * x + (1.0 - alpha) * v;
        }
        // Explicit weights: first sample (1-a)^(n-1), sample i>0 a(1-a)^(n-1-i).
        let n = xs.len();
        let ws: Vec<f64> = (0..n)
            .map(|i| {
                let age = (n - 1 - i) as i32;
                if i == 0 {
                    (1.0 - alpha).powi(age)
                } else {
                    alpha * (1.0 - alpha).powi(age)
                }
            })
            .collect();
        let (mean, var) = weighted(&xs, &ws);
        assert_close(mean, v, 1e-12);
        let out: Map = eval_with(
            "let e = ewma(0.1); for x in data { e.add(x) }
             #{value: e.value, count: e.count, std: e.std, variance: e.variance,
               z: e.zscore(120)}",
            vec![("data", mixed(&xs))],
        );
        assert_close(f(&out["value"]), v, 1e-12);
        assert_eq!(out["count"].as_int().unwrap(), 200);
        assert_close(f(&out["variance"]), var, 1e-9);
        assert_close(f(&out["std"]), var.sqrt(), 1e-9);
        assert_close(f(&out["z"]), (120.0 - v) / var.sqrt(), 1e-9);
    }

    #[test]
    fn alpha_edge_cases() {
        let out: Map = eval(
            "let e = ewma(1); let before = e.value; e.add(3); let one = e.std;
             e.add(8);
             #{before: before, one: one, value: e.value, std: e.std, z: e.zscore(10)}",
        );
        assert!(out["before"].is_unit());
        assert_eq!(f(&out["one"]), 0.0);
        // alpha = 1 follows the last sample exactly and has no spread.
        assert_eq!(f(&out["value"]), 8.0);
        assert_eq!(f(&out["std"]), 0.0);
        assert_eq!(f(&out["z"]), 0.0);
        // First sample sets the value.
        assert_eq!(eval::<f64>("let e = ewma(0.01); e.add(42); e.value"), 42.0);
        assert_eq!(
            eval::<f64>("let e = ewma(0.5); e.add(0); e.add(2); e.std"),
            1.0
        );
    }

    #[test]
    fn halflife_matches_explicit_weights() {
        let mut rng = Lcg::new(11);
        let h = 5_000.0;
        let mut t = 1_700_000_000_000i64;
        let mut xs = Vec::new();
        let mut ts = Vec::new();
        for i in 0..300 {
            // Bursts with equal timestamps, gaps, and a few late samples.
            if i % 7 != 0 {
                t += rng.below(3000) as i64;
            }
            let late = i % 29 == 5;
            ts.push(if late { t - 4000 } else { t });
            xs.push(rng.range(-10.0, 10.0));
        }
        let newest = *ts.iter().max().unwrap();
        let ws: Vec<f64> = ts
            .iter()
            .map(|&ti| 0.5f64.powf((newest - ti) as f64 / h))
            .collect();
        let (mean, var) = weighted(&xs, &ws);
        let tsd: Vec<rhai::Dynamic> = ts.iter().map(|&t| t.into()).collect();
        let out: Map = eval_with(
            "let e = ewma_halflife(5000);
             for i in 0..xs.len() { e.add(xs[i], ts[i]) }
             #{value: e.value, count: e.count, variance: e.variance, std: e.std,
               z: e.zscore(3)}",
            vec![("xs", floats(&xs)), ("ts", rhai::Dynamic::from_array(tsd))],
        );
        assert_close(f(&out["value"]), mean, 1e-9);
        assert_eq!(out["count"].as_int().unwrap(), 300);
        assert_close(f(&out["variance"]), var, 1e-9);
        assert_close(f(&out["std"]), var.sqrt(), 1e-9);
        assert_close(f(&out["z"]), (3.0 - mean) / var.sqrt(), 1e-9);
    }

    #[test]
    fn halflife_simple_cases() {
        // After one half-life the old sample weighs 0.5 against the new one's 1.
        let v = eval::<f64>("let e = ewma_halflife(1000); e.add(5.0, 0); e.add(7, 1000); e.value");
        assert_close(v, (0.5 * 5.0 + 7.0) / 1.5, 1e-12);
        // Equal timestamps weigh equally; a FLOAT time and a duration string work.
        let v = eval::<f64>(
            r#"let e = ewma_halflife("1s"); e.add(1, 10.0); e.add(3, 10); e.add(5, 10.9); e.value"#,
        );
        assert_close(v, 3.0, 1e-12);
        let v = eval::<f64>("let e = ewma_halflife(2.5); e.add(1, 0); e.add(2, 5); e.value");
        assert_close(v, (0.25 + 2.0) / 1.25, 1e-12);
    }

    #[test]
    fn errors() {
        for bad in ["ewma(0)", "ewma(-0.5)", "ewma(1.5)", "ewma(0.0/0.0)"] {
            let e = eval_err(bad);
            assert!(e.contains("alpha must be in (0, 1]"), "{bad}: {e}");
        }
        assert!(eval_err(r#"ewma("x")"#).contains("expected a number"));
        for bad in [
            "ewma_halflife(0)",
            "ewma_halflife(-5)",
            "ewma_halflife(1.0/0.0)",
        ] {
            let e = eval_err(bad);
            assert!(e.contains("positive number of ms"), "{bad}: {e}");
        }
        assert!(eval_err(r#"ewma_halflife("5 parsecs")"#).contains("5 parsecs"));
        assert!(eval_err("let e = ewma_halflife(10); e.add(1)").contains("add(x, t_ms)"));
        assert!(eval_err("let e = ewma(0.5); e.add(1, 100)").contains("use add(x)"));
        assert!(eval_err(r#"let e = ewma(0.5); e.add("1")"#).contains("got string"));
        assert!(eval_err(r#"let e = ewma_halflife(9); e.add(1, "t")"#).contains("got string"));
    }

    #[test]
    fn map_type_and_serde() {
        let out: Map = eval("let e = ewma(0.25); e.add(4); #{t: type_of(e), m: e.to_map()}");
        assert_eq!(out["t"].clone().into_string().unwrap(), "ewma");
        let m = out["m"].clone().cast::<Map>();
        assert_eq!(f(&m["alpha"]), 0.25);
        assert_eq!(f(&m["value"]), 4.0);
        for script in [
            "let e = ewma(0.3); e.add(1); e.add(2); e.add(10); e",
            "let e = ewma_halflife(100); e.add(1, 5); e.add(4, 60); e.add(2, 10); e",
            "ewma(0.5)",
        ] {
            let e: Ewma = eval(script);
            let mut back: Ewma = round_trip(&e);
            assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", e.to_map()));
            assert_eq!(back.mode(), e.mode());
            // The restored state keeps working like the original.
            let mut orig = e.clone();
            match e.mode() {
                EwmaMode::Alpha(_) => {
                    orig.add(7.0).unwrap();
                    back.add(7.0).unwrap();
                }
                EwmaMode::HalfLifeMs(_) => {
                    orig.add_at(7.0, 80).unwrap();
                    back.add_at(7.0, 80).unwrap();
                }
            }
            assert_eq!(back.value(), orig.value());
            assert_eq!(back.variance(), orig.variance());
        }
    }
}
