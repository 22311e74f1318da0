//! `ohlc()`: an open/high/low/close bar with traded volume and volume-weighted average
//! price, built from prices in arrival order. Pair it with `window_start` to build
//! time bars, and `reset()` it when a bar is emitted.

use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// An OHLC bar with volume and VWAP.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ohlc {
    open: Option<f64>,
    high: Option<f64>,
    low: Option<f64>,
    close: Option<f64>,
    volume: f64,
    /// Sum of price * volume.
    notional: f64,
    count: u64,
}

impl Ohlc {
    /// An empty bar.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a trade; `volume` must be finite and >= 0.
    pub fn add(&mut self, price: f64, volume: f64) -> Result<(), String> {
        if !(volume >= 0.0 && volume.is_finite()) {
            return Err(format!(
                "ohlc.add(price, volume): volume must be a finite number >= 0, got {volume}"
            ));
        }
        self.open.get_or_insert(price);
        self.high = Some(self.high.map_or(price, |h| h.max(price)));
        self.low = Some(self.low.map_or(price, |l| l.min(price)));
        self.close = Some(price);
        self.volume += volume;
        self.notional += price * volume;
        self.count += 1;
        Ok(())
    }

    /// Empties the bar.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// First price.
    pub fn open(&self) -> Option<f64> {
        self.open
    }

    /// Highest price.
    pub fn high(&self) -> Option<f64> {
        self.high
    }

    /// Lowest price.
    pub fn low(&self) -> Option<f64> {
        self.low
    }

    /// Last price.
    pub fn close(&self) -> Option<f64> {
        self.close
    }

    /// Total volume.
    pub fn volume(&self) -> f64 {
        self.volume
    }

    /// `sum(price * volume) / sum(volume)`; `None` while the volume is 0.
    pub fn vwap(&self) -> Option<f64> {
        (self.volume > 0.0).then(|| self.notional / self.volume)
    }

    /// Number of trades added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Heap bytes used (none: the summary is fixed-size).
    pub(crate) fn heap_bytes(&self) -> usize {
        0
    }

    /// `#{open, high, low, close, volume, vwap, count}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("open".into(), num::opt_float(self.open));
        m.insert("high".into(), num::opt_float(self.high));
        m.insert("low".into(), num::opt_float(self.low));
        m.insert("close".into(), num::opt_float(self.close));
        m.insert("volume".into(), self.volume.into());
        m.insert("vwap".into(), num::opt_float(self.vwap()));
        m.insert("count".into(), num::int(self.count).into());
        m
    }
}

/// Rhai functions of `ohlc`.
#[export_module(manifest)]
pub mod ohlc_functions {
    use super::*;

    /// Creates an empty OHLC bar.
    ///
    /// ```rhai
    /// let bar = ohlc();
    /// ```
    #[rhai_fn(name = "ohlc")]
    pub fn new_ohlc() -> Ohlc {
        Ohlc::new()
    }

    /// Adds a trade with volume 1. `price` is an `INT` or a finite `FLOAT`.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(101.5);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add(o: &mut Ohlc, price: Dynamic) -> Res<()> {
        let price = num::finite(&price, "ohlc.add(price)")?;
        o.add(price, 1.0).or_else(num::err)
    }

    /// Adds a trade with the given volume (`INT` or `FLOAT`, finite and >= 0).
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(ev.price, ev.size);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add_volume(o: &mut Ohlc, price: Dynamic, volume: Dynamic) -> Res<()> {
        let ctx = "ohlc.add(price, volume)";
        let price = num::finite(&price, ctx)?;
        let volume = num::number(&volume, ctx)?;
        o.add(price, volume).or_else(num::err)
    }

    /// First price as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3); bar.add(4); print(bar.open);   // 3.0
    /// ```
    #[rhai_fn(get = "open", pure)]
    pub fn open(o: &mut Ohlc) -> Dynamic {
        num::opt_float(o.open())
    }

    /// Highest price as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3); bar.add(4); print(bar.high);   // 4.0
    /// ```
    #[rhai_fn(get = "high", pure)]
    pub fn high(o: &mut Ohlc) -> Dynamic {
        num::opt_float(o.high())
    }

    /// Lowest price as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3); bar.add(4); print(bar.low);    // 3.0
    /// ```
    #[rhai_fn(get = "low", pure)]
    pub fn low(o: &mut Ohlc) -> Dynamic {
        num::opt_float(o.low())
    }

    /// Last price as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3); bar.add(4); print(bar.close);  // 4.0
    /// ```
    #[rhai_fn(get = "close", pure)]
    pub fn close(o: &mut Ohlc) -> Dynamic {
        num::opt_float(o.close())
    }

    /// Total volume as a `FLOAT` (0.0 when empty).
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3, 10); bar.add(4, 5); print(bar.volume);  // 15.0
    /// ```
    #[rhai_fn(get = "volume", pure)]
    pub fn volume(o: &mut Ohlc) -> FLOAT {
        o.volume()
    }

    /// Volume-weighted average price `sum(price * volume) / sum(volume)`; `()` while
    /// the volume is 0.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3, 10); bar.add(6, 5); print(bar.vwap);    // 4.0
    /// ```
    #[rhai_fn(get = "vwap", pure)]
    pub fn vwap(o: &mut Ohlc) -> Dynamic {
        num::opt_float(o.vwap())
    }

    /// Number of trades added.
    ///
    /// ```rhai
    /// let bar = ohlc(); bar.add(3); print(bar.count);             // 1
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(o: &mut Ohlc) -> INT {
        num::int(o.count())
    }

    /// Empties the bar, e.g. after emitting it.
    ///
    /// ```rhai
    /// emit("bars", this.bar.to_map()); this.bar.reset();
    /// ```
    #[rhai_fn(name = "reset")]
    pub fn reset(o: &mut Ohlc) {
        o.reset();
    }

    /// Summary map: `#{open, high, low, close, volume, vwap, count}`.
    ///
    /// ```rhai
    /// emit("bars", this.bar.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(o: &mut Ohlc) -> Map {
        o.to_map()
    }

    /// Text form, e.g. `ohlc#{"close": (), ...}`.
    ///
    /// ```rhai
    /// print(ohlc());
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(o: &mut Ohlc) -> String {
        format!("ohlc{}", Dynamic::from_map(o.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use rhai::Array;

    #[test]
    fn matches_hand_computed_bar() {
        let mut rng = Lcg::new(9);
        let prices: Vec<f64> = (0..300)
            .map(|_| (rng.range(99.0, 101.0) * 100.0).round() / 100.0)
            .collect();
        let sizes: Vec<f64> = (0..300)
            .map(|i| {
                if i % 4 == 0 {
                    0.5
                } else {
                    rng.below(50) as f64
                }
            })
            .collect();
        let notional: f64 = prices.iter().zip(&sizes).map(|(p, v)| p * v).sum();
        let volume: f64 = sizes.iter().sum();
        let m: Map = eval_with(
            "let bar = ohlc(); for i in 0..ps.len() { bar.add(ps[i], vs[i]) }
             #{open: bar.open, high: bar.high, low: bar.low, close: bar.close,
               volume: bar.volume, vwap: bar.vwap, count: bar.count, map: bar.to_map()}",
            vec![("ps", floats(&prices)), ("vs", mixed(&sizes))],
        );
        assert_eq!(f(&m["open"]), prices[0]);
        assert_eq!(f(&m["close"]), prices[299]);
        assert_eq!(
            f(&m["high"]),
            prices.iter().copied().fold(f64::MIN, f64::max)
        );
        assert_eq!(
            f(&m["low"]),
            prices.iter().copied().fold(f64::MAX, f64::min)
        );
        assert_close(f(&m["volume"]), volume, 1e-12);
        assert_close(f(&m["vwap"]), notional / volume, 1e-12);
        assert_eq!(m["count"].as_int().unwrap(), 300);
        let map = m["map"].clone().cast::<Map>();
        let keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            ["close", "count", "high", "low", "open", "volume", "vwap"]
        );
        assert_close(f(&map["vwap"]), notional / volume, 1e-12);
    }

    #[test]
    fn one_arg_add_uses_volume_one() {
        let m: Map = eval("let b = ohlc(); b.add(10); b.add(13.5); b.add(11); b.to_map()");
        assert_eq!(f(&m["open"]), 10.0);
        assert_eq!(f(&m["high"]), 13.5);
        assert_eq!(f(&m["low"]), 10.0);
        assert_eq!(f(&m["close"]), 11.0);
        assert_eq!(f(&m["volume"]), 3.0);
        assert_close(f(&m["vwap"]), (10.0 + 13.5 + 11.0) / 3.0, 1e-15);
        assert_eq!(m["count"].as_int().unwrap(), 3);
    }

    #[test]
    fn empty_zero_volume_and_reset() {
        let out: Array = eval(
            "let b = ohlc(); let e = b.to_map();
             b.add(5, 0); let z = b.to_map();
             b.add(7, 2); b.reset(); let r = b.to_map();
             [e, z, r]",
        );
        for (i, m) in out.into_iter().enumerate() {
            let m = m.cast::<Map>();
            assert!(m["vwap"].is_unit(), "{i}");
            assert_eq!(f(&m["volume"]), 0.0);
            if i == 1 {
                assert_eq!(f(&m["open"]), 5.0);
                assert_eq!(m["count"].as_int().unwrap(), 1);
            } else {
                for k in ["open", "high", "low", "close"] {
                    assert!(m[k].is_unit(), "{i} {k}");
                }
                assert_eq!(m["count"].as_int().unwrap(), 0);
            }
        }
    }

    #[test]
    fn errors() {
        assert!(eval_err(r#"let b = ohlc(); b.add("1")"#)
            .contains("ohlc.add(price): expected a number"));
        assert!(eval_err("let b = ohlc(); b.add(1, -3)").contains("volume must be"));
        assert!(eval_err("let b = ohlc(); b.add(1, 0.0/0.0)").contains("volume must be"));
        assert!(eval_err("let b = ohlc(); b.add(1, true)").contains("got bool"));
        assert!(eval_err("let b = ohlc(); b.add(1.0/0.0, 1)").contains("finite"));
    }

    #[test]
    fn type_name_and_serde() {
        assert_eq!(eval::<String>("type_of(ohlc())"), "ohlc");
        let o: Ohlc = eval("let b = ohlc(); b.add(2, 3); b.add(1.5, 1); b.add(4, 0.5); b");
        let mut back: Ohlc = round_trip(&o);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", o.to_map()));
        back.add(0.5, 1.0).unwrap();
        assert_eq!(back.low(), Some(0.5));
        assert_eq!(back.open(), Some(2.0));
        let empty: Ohlc = round_trip(&Ohlc::new());
        assert!(empty.vwap().is_none());
    }
}
