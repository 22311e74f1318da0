//! `scaler()`: running standardisation of features, River's `preprocessing.StandardScaler`,
//! to put features on one scale before `linreg`, `logreg` or `kmeans`.
//!
//! Per feature it keeps the count, the running mean and the population variance, updated
//! with Welford's rule exactly as River does:
//!
//! ```text
//! n += 1;  old = mean;  mean += (x - old) / n;  var += ((x - old) * (x - mean) - var) / n
//! ```
//!
//! `transform(x)` gives `(x - mean) / sqrt(var)` per feature, and 0.0 where the variance is 0
//! (a feature seen once, or never). With `#{ with_std: false }` it only centres: `x - mean`.
//! `learn` and `transform` are separate, as in River: learn first to include the event in the
//! statistics (River's pipelines learn the scaler in `learn_one`).

use rhai::plugin::*;
use rhai::{Map, INT};
use serde::{Deserialize, Serialize};

use crate::features::{self, Features, Options, Table};
use crate::num::{self, Res};

/// Count, mean and population variance of one feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub var: f64,
}

/// A running standard scaler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    with_std: bool,
    stats: Table<Moments>,
}

impl Scaler {
    pub fn new(with_std: bool) -> Self {
        Scaler {
            with_std,
            stats: Table::new(),
        }
    }

    pub fn learn<X: Features>(&mut self, x: &X) -> Res<()> {
        let ctx = "scaler.learn";
        let stats = &mut self.stats;
        x.each(ctx, &mut |name, xi| {
            let m = stats.entry(name, ctx)?;
            m.n += 1;
            let old = m.mean;
            m.mean += (xi - old) / m.n as f64;
            m.var += ((xi - old) * (xi - m.mean) - m.var) / m.n as f64;
            Ok(())
        })
    }

    /// Calls `f(name, scaled)` for every feature of `x`.
    pub fn each_scaled<X: Features>(
        &self,
        x: &X,
        f: &mut dyn FnMut(&str, f64) -> Res<()>,
    ) -> Res<()> {
        x.each("scaler.transform", &mut |name, xi| {
            let m = self.stats.get(name).copied().unwrap_or_default();
            let z = if !self.with_std {
                xi - m.mean
            } else if m.var != 0.0 {
                (xi - m.mean) / m.var.sqrt()
            } else {
                0.0
            };
            f(name, z)
        })
    }

    pub fn transform<X: Features>(&self, x: &X) -> Res<Map> {
        let mut out = Map::new();
        self.each_scaled(x, &mut |name, z| {
            out.insert(name.into(), Dynamic::from_float(z));
            Ok(())
        })?;
        Ok(out)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.stats.heap_bytes()
    }

    /// `#{features: #{name: #{count, mean, std}}, with_std}`.
    pub fn to_map(&self) -> Map {
        let features: Map = self
            .stats
            .iter()
            .map(|(name, m)| {
                let mut s = Map::new();
                s.insert("count".into(), num::int(m.n).into());
                s.insert("mean".into(), m.mean.into());
                s.insert("std".into(), m.var.sqrt().into());
                (name.into(), Dynamic::from_map(s))
            })
            .collect();
        let mut m = Map::new();
        m.insert("features".into(), features.into());
        m.insert("with_std".into(), self.with_std.into());
        m
    }
}

/// The methods that take a feature vector, for vectors of type `X`.
pub(crate) fn register<X: Features>(m: &mut dyn features::Sink) {
    features::set_mut::<Scaler, X>(m, "learn", |s, x, _| s.learn(x).map(|()| Dynamic::UNIT));
    features::set_pure::<Scaler, X>(m, "transform", |s, x| s.transform(x).map(Dynamic::from_map));
}

/// Rhai functions of `scaler` that take no feature vector.
#[export_module(manifest)]
pub mod scaler_functions {
    use super::*;

    /// A running standard scaler (River's `StandardScaler()`).
    ///
    /// ```rhai
    /// let s = scaler();
    /// s.learn(#{ temp: 20.0 }); s.learn(#{ temp: 22.0 });
    /// print(s.transform(#{ temp: 22.0 }));   // #{ temp: 1.0 }
    /// ```
    #[rhai_fn(name = "scaler")]
    pub fn new_scaler() -> Scaler {
        Scaler::new(true)
    }

    /// A running scaler with options: `with_std` (default `true`; `false` only centres).
    ///
    /// ```rhai
    /// let s = scaler(#{ with_std: false });
    /// ```
    #[rhai_fn(name = "scaler", return_raw)]
    pub fn new_scaler_with(opts: Map) -> Res<Scaler> {
        let made = (|| -> Res<Scaler> {
            let o = Options::new(&opts, "scaler(opts)", &["with_std"])?;
            Ok(Scaler::new(o.flag("with_std", true)?))
        })();
        made.and_then(crate::charged)
    }

    /// Number of features seen.
    ///
    /// ```rhai
    /// print(s.len);
    /// ```
    #[rhai_fn(get = "len", pure)]
    pub fn len(s: &mut Scaler) -> INT {
        s.stats.len() as INT
    }

    /// `#{features: #{name: #{count, mean, std}}, with_std}`.
    ///
    /// ```rhai
    /// emit(s.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(s: &mut Scaler) -> Map {
        s.to_map()
    }

    /// Text form, e.g. `scaler#{...}`.
    ///
    /// ```rhai
    /// print(s);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(s: &mut Scaler) -> String {
        format!("scaler{}", Dynamic::from_map(s.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn standardises_with_the_population_variance() {
        let xs = [3.0, 7.5, -2.0, 10.0, 4.25, 6.0];
        let out: rhai::Array = eval_with(
            "let s = scaler(); for x in xs { s.learn(#{ v: x, c: 5 }) }
             [s.transform(#{ v: 1.0, c: 5, fresh: 9 }), s.to_map()]",
            vec![("xs", mixed(&xs))],
        );
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let t = out[0].clone().cast::<Map>();
        assert_close(f(&t["v"]), (1.0 - mean) / var.sqrt(), 1e-12);
        // No variance, or never seen: 0.
        assert_eq!(f(&t["c"]), 0.0);
        assert_eq!(f(&t["fresh"]), 0.0);
        let m = out[1].clone().cast::<Map>();
        let v = m["features"].clone().cast::<Map>()["v"]
            .clone()
            .cast::<Map>();
        assert_close(f(&v["mean"]), mean, 1e-12);
        assert_close(f(&v["std"]), var.sqrt(), 1e-12);
        assert_eq!(v["count"].as_int().unwrap(), 6);
    }

    #[test]
    fn centring_only_and_arrays() {
        let t: Map = eval(
            "let s = scaler(#{ with_std: false }); s.learn([1, 10]); s.learn([3, 30]);
             s.transform([4, 0])",
        );
        assert_eq!(f(&t["0"]), 2.0);
        assert_eq!(f(&t["1"]), -20.0);
        let e = eval_err("scaler(#{ with_std: 1 })");
        assert!(e.contains("with_std"), "{e}");
    }

    #[test]
    fn state_round_trips() {
        let s: Scaler = eval("let s = scaler(); s.learn(#{ a: 1, b: 2.5 }); s.learn(#{ a: 4 }); s");
        assert_eq!(round_trip(&s), s);
    }
}
