//! `quantiles()`: streaming percentiles of non-negative numbers with a bounded relative
//! error, backed by an HdrHistogram. Values are recorded in fixed micro-units
//! (`x * 1_000_000`, rounded; see [`QUANTILE_SCALE`]) so fractional inputs down to 0.000001
//! are resolved, and answers come back in the original unit. `quantiles(sigfig)` keeps
//! `sigfig` significant decimal digits (default 3, i.e. relative error <= 0.1%); count,
//! min, max and mean are tracked exactly beside the histogram.
//!
//! Memory grows with the logarithm of the largest value and exponentially with `sigfig`:
//! about 16 KiB at first and up to ~400 KiB with 3 digits, but 2 MiB at first with 5.

use hdrhistogram::Histogram;
use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Recorded values are `round(x * QUANTILE_SCALE)` (micro-units).
pub const QUANTILE_SCALE: f64 = 1_000_000.0;
/// Largest value `record` accepts (in the original unit).
pub const MAX_QUANTILE_VALUE: f64 = 1e12;
/// Significant digits used by `quantiles()`.
pub const DEFAULT_SIGFIG: u8 = 3;

/// Streaming quantiles (HdrHistogram) of non-negative numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quantiles {
    #[serde(with = "hist_v2")]
    hist: Histogram<u64>,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
}

impl Quantiles {
    /// A histogram keeping `sigfig` (1..=5) significant digits.
    pub fn new(sigfig: u8) -> Result<Self, String> {
        if !(1..=5).contains(&sigfig) {
            return Err(format!(
                "quantiles(sigfig): sigfig must be between 1 and 5, got {sigfig}"
            ));
        }
        let hist = Histogram::new(sigfig).map_err(|e| format!("quantiles: {e}"))?;
        Ok(Self {
            hist,
            sum: 0.0,
            min: None,
            max: None,
        })
    }

    /// Records `x`, which must be in `0..=MAX_QUANTILE_VALUE`.
    pub fn record(&mut self, x: f64) -> Result<(), String> {
        if !(0.0..=MAX_QUANTILE_VALUE).contains(&x) {
            return Err(format!(
                "quantiles.record(x): x must be between 0 and {MAX_QUANTILE_VALUE:e}, got {x}"
            ));
        }
        let scaled = (x * QUANTILE_SCALE).round() as u64;
        self.hist
            .record(scaled)
            .map_err(|e| format!("quantiles.record(x): {e}"))?;
        self.sum += x;
        self.min = Some(self.min.map_or(x, |m| m.min(x)));
        self.max = Some(self.max.map_or(x, |m| m.max(x)));
        Ok(())
    }

    /// The value at quantile `q` in [0, 1], `None` when empty. Within the histogram's
    /// precision of the exact order statistic `sorted[max(1, ceil(q * n)) - 1]`, and never
    /// outside the exact [min, max].
    pub fn quantile(&self, q: f64) -> Result<Option<f64>, String> {
        if !(0.0..=1.0).contains(&q) {
            return Err(format!(
                "quantiles.p(q): q must be between 0.0 and 1.0, got {q}"
            ));
        }
        let (Some(min), Some(max)) = (self.min, self.max) else {
            return Ok(None);
        };
        let v = self.hist.value_at_quantile(q) as f64 / QUANTILE_SCALE;
        Ok(Some(v.clamp(min, max)))
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Smallest value recorded (exact).
    pub fn min(&self) -> Option<f64> {
        self.min
    }

    /// Largest value recorded (exact).
    pub fn max(&self) -> Option<f64> {
        self.max
    }

    /// Mean of the values recorded (exact); 0.0 when empty.
    pub fn mean(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum / n as f64,
        }
    }

    /// Significant digits kept.
    pub fn sigfig(&self) -> u8 {
        self.hist.sigfig()
    }

    /// Heap bytes used by the histogram's counts.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.hist.distinct_values() * std::mem::size_of::<u64>()
    }

    /// `#{count, p50, p90, p99, max}`; the quantiles and max are `()` when empty.
    pub fn to_map(&self) -> Map {
        let q = |q: f64| num::opt_float(self.quantile(q).ok().flatten());
        let mut m = Map::new();
        m.insert("count".into(), num::int(self.count()).into());
        m.insert("p50".into(), q(0.5));
        m.insert("p90".into(), q(0.9));
        m.insert("p99".into(), q(0.99));
        m.insert("max".into(), num::opt_float(self.max));
        m
    }
}

/// Serde for the histogram: its compact V2 binary encoding as a byte string.
mod hist_v2 {
    use hdrhistogram::serialization::{
        Deserializer as HdrDeserializer, Serializer as _, V2Serializer,
    };
    use hdrhistogram::Histogram;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut buf)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&buf)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a V2-encoded HdrHistogram as bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let bytes = d.deserialize_bytes(Bytes)?;
        let mut h: Histogram<u64> = HdrDeserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(de::Error::custom)?;
        h.auto(true);
        Ok(h)
    }
}

/// Rhai functions of `quantiles`.
#[export_module(manifest)]
pub mod quantiles_functions {
    use super::*;

    /// Creates a quantile sketch with 3 significant digits (relative error <= 0.1%).
    ///
    /// ```rhai
    /// let lat = quantiles();
    /// ```
    #[rhai_fn(name = "quantiles", return_raw)]
    pub fn new_quantiles() -> Res<Quantiles> {
        let made: Res<Quantiles> = Quantiles::new(DEFAULT_SIGFIG).or_else(num::err);
        made.and_then(crate::charged)
    }

    /// Creates a quantile sketch with `sigfig` significant digits, 1 to 5. Memory grows
    /// tenfold per digit (5 digits: 2 MiB).
    ///
    /// ```rhai
    /// let lat = quantiles(2);
    /// ```
    #[rhai_fn(name = "quantiles", return_raw)]
    pub fn new_quantiles_sigfig(sigfig: Dynamic) -> Res<Quantiles> {
        let made = (|| -> Res<Quantiles> {
            let s = num::whole(&sigfig, "quantiles(sigfig)", 1, 5)?;
            Quantiles::new(s as u8).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Records a value: an `INT` or `FLOAT` between 0 and 1e12. Negative, NaN or larger
    /// values are an error. Resolution is 0.000001.
    ///
    /// ```rhai
    /// let lat = quantiles(); lat.record(ev.latency_ms);
    /// ```
    #[rhai_fn(name = "record", return_raw)]
    pub fn record(h: &mut Quantiles, x: Dynamic) -> Res<()> {
        let x = num::number(&x, "quantiles.record(x)")?;
        h.record(x).or_else(num::err)
    }

    /// The value at quantile `q` (0.0 to 1.0, `INT` or `FLOAT`) as a `FLOAT` in the
    /// original unit; `()` when nothing was recorded.
    ///
    /// ```rhai
    /// let lat = quantiles(); for x in 1..=100 { lat.record(x) }
    /// print(lat.p(0.99));     // 99.0 (within 0.1%)
    /// ```
    #[rhai_fn(name = "p", return_raw, pure)]
    pub fn p(h: &mut Quantiles, q: Dynamic) -> Res<Dynamic> {
        let q = num::number(&q, "quantiles.p(q)")?;
        h.quantile(q).map(num::opt_float).or_else(num::err)
    }

    /// Number of values recorded.
    ///
    /// ```rhai
    /// let lat = quantiles(); lat.record(1); print(lat.count);   // 1
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(h: &mut Quantiles) -> INT {
        num::int(h.count())
    }

    /// Smallest value recorded (exact) as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let lat = quantiles(); lat.record(2); lat.record(0.5); print(lat.min);  // 0.5
    /// ```
    #[rhai_fn(get = "min", pure)]
    pub fn min(h: &mut Quantiles) -> Dynamic {
        num::opt_float(h.min())
    }

    /// Largest value recorded (exact) as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let lat = quantiles(); lat.record(2); lat.record(0.5); print(lat.max);  // 2.0
    /// ```
    #[rhai_fn(get = "max", pure)]
    pub fn max(h: &mut Quantiles) -> Dynamic {
        num::opt_float(h.max())
    }

    /// Mean of the values recorded (exact); 0.0 when empty.
    ///
    /// ```rhai
    /// let lat = quantiles(); lat.record(2); lat.record(1); print(lat.mean);   // 1.5
    /// ```
    #[rhai_fn(get = "mean", pure)]
    pub fn mean(h: &mut Quantiles) -> FLOAT {
        h.mean()
    }

    /// Summary map: `#{count, p50, p90, p99, max}`.
    ///
    /// ```rhai
    /// emit("latency", this.lat.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(h: &mut Quantiles) -> Map {
        h.to_map()
    }

    /// Text form, e.g. `quantiles#{"count": 0, ...}`.
    ///
    /// ```rhai
    /// print(quantiles());
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(h: &mut Quantiles) -> String {
        format!("quantiles{}", Dynamic::from_map(h.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use rhai::Array;

    const QS: [f64; 9] = [0.0, 0.001, 0.1, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0];

    /// The exact order statistic HdrHistogram approximates.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    fn check(xs: &[f64], sigfig: u8) {
        let mut sorted = xs.to_vec();
        sorted.sort_by(f64::total_cmp);
        let ctor = format!("quantiles({sigfig})");
        let out: Map = eval_with(
            &format!(
                "let h = {ctor}; for x in xs {{ h.record(x) }}
                 let ps = []; for q in qs {{ ps.push(h.p(q)) }}
                 #{{ps: ps, count: h.count, min: h.min, max: h.max, mean: h.mean, map: h.to_map()}}"
            ),
            vec![("xs", mixed(xs)), ("qs", floats(&QS))],
        );
        let rel = 2.0 * 10f64.powi(-(sigfig as i32));
        let ps = out["ps"].clone().cast::<Array>();
        for (q, p) in QS.iter().zip(ps) {
            let want = exact(&sorted, *q);
            let got = f(&p);
            assert!(
                (got - want).abs() <= want * rel + 1e-6,
                "sigfig {sigfig} q {q}: got {got}, exact {want}"
            );
        }
        assert_eq!(out["count"].as_int().unwrap() as usize, xs.len());
        assert_eq!(f(&out["min"]), sorted[0]);
        assert_eq!(f(&out["max"]), *sorted.last().unwrap());
        assert_close(
            f(&out["mean"]),
            xs.iter().sum::<f64>() / xs.len() as f64,
            1e-12,
        );
        let map = out["map"].clone().cast::<Map>();
        let keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["count", "max", "p50", "p90", "p99"]);
        for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            let want = exact(&sorted, q);
            assert!((f(&map[k]) - want).abs() <= want * rel + 1e-6, "{k}");
        }
        assert_eq!(f(&map["max"]), *sorted.last().unwrap());
    }

    #[test]
    fn matches_exact_sorted_quantiles() {
        let mut rng = Lcg::new(17);
        // Log-uniform over 0.001 .. 100000, a third of them whole numbers (INT).
        let xs: Vec<f64> = (0..3000)
            .map(|i| {
                let x = 10f64.powf(rng.range(-3.0, 5.0));
                if i % 3 == 0 {
                    x.round()
                } else {
                    (x * 1e6).round() / 1e6
                }
            })
            .collect();
        for sigfig in 1..=5 {
            check(&xs, sigfig);
        }
        // Default is 3 digits.
        let p = eval::<f64>("let h = quantiles(); for x in 1..=1000 { h.record(x) } h.p(0.5)");
        assert!((p - 500.0).abs() <= 0.5, "{p}");
    }

    #[test]
    fn small_fractions_resolve_to_a_thousandth() {
        let xs = [0.001, 0.002, 0.003, 0.004, 0.005, 0.0, 0.010];
        check(&xs, 3);
        let out: Array = eval("let h = quantiles(); for x in [0.001, 0.002, 0.003] { h.record(x) } [h.p(0.0), h.p(0.5), h.p(1.0)]");
        let got: Vec<f64> = out.iter().map(f).collect();
        for (g, w) in got.iter().zip([0.001, 0.002, 0.003]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn empty() {
        let out: Map = eval(
            "let h = quantiles(); #{p: h.p(0.5), count: h.count, min: h.min, max: h.max, mean: h.mean, map: h.to_map()}",
        );
        assert!(out["p"].is_unit());
        assert_eq!(out["count"].as_int().unwrap(), 0);
        assert!(out["min"].is_unit() && out["max"].is_unit());
        assert_eq!(f(&out["mean"]), 0.0);
        let map = out["map"].clone().cast::<Map>();
        assert!(map["p99"].is_unit() && map["max"].is_unit());
    }

    #[test]
    fn errors() {
        for bad in [
            "h.record(-1)",
            "h.record(-0.001)",
            "h.record(0.0/0.0)",
            "h.record(1e13)",
        ] {
            let e = eval_err(&format!("let h = quantiles(); {bad}"));
            assert!(e.contains("x must be between 0 and"), "{bad}: {e}");
        }
        assert!(eval_err(r#"let h = quantiles(); h.record("3")"#).contains("got string"));
        for bad in ["h.p(1.5)", "h.p(-0.1)", "h.p(0.0/0.0)", "h.p(2)"] {
            let e = eval_err(&format!("let h = quantiles(); h.record(1); {bad}"));
            assert!(e.contains("q must be between 0.0 and 1.0"), "{bad}: {e}");
        }
        assert!(eval_err("let h = quantiles(); h.p(())").contains("got ()"));
        for bad in [
            "quantiles(0)",
            "quantiles(6)",
            "quantiles(-3)",
            "quantiles(2.5)",
        ] {
            let e = eval_err(bad);
            assert!(e.contains("quantiles(sigfig)"), "{bad}: {e}");
        }
        // p(0) and p(1) accept INT.
        assert_eq!(
            eval::<f64>("let h = quantiles(); h.record(4); h.record(9); h.p(1)"),
            9.0
        );
        assert_eq!(
            eval::<f64>("let h = quantiles(); h.record(4); h.record(9); h.p(0)"),
            4.0
        );
    }

    #[test]
    fn type_name_and_serde() {
        assert_eq!(eval::<String>("type_of(quantiles())"), "quantiles");
        let h: Quantiles =
            eval("let h = quantiles(2); for x in [0.5, 3, 3, 10.25, 1000, 0] { h.record(x) } h");
        let mut back: Quantiles = round_trip(&h);
        assert_eq!(back.sigfig(), 2);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", h.to_map()));
        for q in QS {
            assert_eq!(back.quantile(q).unwrap(), h.quantile(q).unwrap());
        }
        // Still auto-resizing after the round trip.
        back.record(5e9).unwrap();
        assert_eq!(back.max(), Some(5e9));
        assert!((back.quantile(1.0).unwrap().unwrap() - 5e9).abs() < 1.0);
        let empty: Quantiles = round_trip(&Quantiles::new(3).unwrap());
        assert_eq!(empty.count(), 0);
    }
}
