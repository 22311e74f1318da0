//! `ring(n)`: the last `n` numbers of a stream (a count-based sliding window) with their
//! sum, mean, sample standard deviation, min and max. Sum, mean and variance are kept
//! incrementally (Welford with removal) and recomputed exactly once every `n` evictions,
//! so rounding error cannot build up; min and max are found by a scan when asked
//! (at most [`MAX_RING`] values).

use std::collections::VecDeque;

use rhai::plugin::*;
use rhai::{Array, Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Largest capacity a script may ask of `ring(n)`.
pub const MAX_RING: usize = 100_000;

/// The last `capacity` numbers of a stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ring {
    cap: usize,
    buf: VecDeque<f64>,
    sum: f64,
    mean: f64,
    /// Sum of squared differences from the mean.
    m2: f64,
    /// Evictions since the last exact recomputation.
    since_exact: usize,
}

impl Ring {
    /// A ring holding at most `cap` numbers (1..=[`MAX_RING`]). Memory grows as it fills.
    pub fn new(cap: usize) -> Result<Self, String> {
        if !(1..=MAX_RING).contains(&cap) {
            return Err(format!(
                "ring(n): n must be between 1 and {MAX_RING}, got {cap}"
            ));
        }
        Ok(Self {
            cap,
            buf: VecDeque::new(),
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            since_exact: 0,
        })
    }

    /// Appends `x`, evicting the oldest value when full.
    pub fn push(&mut self, x: f64) {
        if self.buf.len() == self.cap {
            if let Some(y) = self.buf.pop_front() {
                let n = self.buf.len() as f64;
                if self.buf.is_empty() {
                    self.sum = 0.0;
                    self.mean = 0.0;
                    self.m2 = 0.0;
                } else {
                    let old_mean = self.mean;
                    self.mean = old_mean + (old_mean - y) / n;
                    self.m2 -= (y - old_mean) * (y - self.mean);
                    self.sum -= y;
                }
                self.since_exact += 1;
            }
        }
        self.buf.push_back(x);
        let n = self.buf.len() as f64;
        let delta = x - self.mean;
        self.mean += delta / n;
        self.m2 += delta * (x - self.mean);
        self.sum += x;
        if self.since_exact >= self.cap {
            self.recompute();
        }
    }

    /// Two-pass exact sum, mean and squared deviations.
    fn recompute(&mut self) {
        self.since_exact = 0;
        let n = self.buf.len() as f64;
        self.sum = self.buf.iter().sum();
        self.mean = if self.buf.is_empty() {
            0.0
        } else {
            self.sum / n
        };
        self.m2 = self
            .buf
            .iter()
            .map(|x| (x - self.mean) * (x - self.mean))
            .sum();
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no value is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Maximum number of values held.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// True when `len == capacity`.
    pub fn is_full(&self) -> bool {
        self.buf.len() == self.cap
    }

    /// Sum of the values held.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Mean of the values held; 0.0 when empty.
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Sample variance (n - 1); 0.0 with fewer than 2 values.
    pub fn variance(&self) -> f64 {
        if self.buf.len() < 2 {
            0.0
        } else {
            (self.m2 / (self.buf.len() - 1) as f64).max(0.0)
        }
    }

    /// Sample standard deviation.
    pub fn std(&self) -> f64 {
        self.variance().sqrt()
    }

    /// Smallest value held (O(len)).
    pub fn min(&self) -> Option<f64> {
        self.buf.iter().copied().reduce(f64::min)
    }

    /// Largest value held (O(len)).
    pub fn max(&self) -> Option<f64> {
        self.buf.iter().copied().reduce(f64::max)
    }

    /// `(x - mean) / std`, 0.0 when `std` is 0.
    pub fn zscore(&self, x: f64) -> f64 {
        let sd = self.std();
        if sd == 0.0 {
            0.0
        } else {
            (x - self.mean) / sd
        }
    }

    /// The values, oldest first.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.buf.iter().copied()
    }

    /// Heap bytes used by the buffer.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buf.capacity() * std::mem::size_of::<f64>()
    }

    /// `#{len, capacity, sum, mean, std, min, max, values}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("len".into(), (self.len() as INT).into());
        m.insert("capacity".into(), (self.cap as INT).into());
        m.insert("sum".into(), self.sum.into());
        m.insert("mean".into(), self.mean.into());
        m.insert("std".into(), self.std().into());
        m.insert("min".into(), num::opt_float(self.min()));
        m.insert("max".into(), num::opt_float(self.max()));
        m.insert("values".into(), Dynamic::from_array(self.values_array()));
        m
    }

    fn values_array(&self) -> Array {
        self.buf.iter().map(|&x| Dynamic::from_float(x)).collect()
    }
}

/// Rhai functions of `ring`.
#[export_module(manifest)]
pub mod ring_functions {
    use super::*;

    /// Creates a ring keeping the last `n` numbers, 1 <= `n` <= 100000.
    ///
    /// ```rhai
    /// let w = ring(20);
    /// ```
    #[rhai_fn(name = "ring", return_raw)]
    pub fn new_ring(n: Dynamic) -> Res<Ring> {
        let made = (|| -> Res<Ring> {
            let n = num::size(&n, "ring(n)", 1, MAX_RING)?;
            Ring::new(n).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Appends a number (`INT` or finite `FLOAT`), evicting the oldest when full.
    ///
    /// ```rhai
    /// let w = ring(3); w.push(1); w.push(2.5);
    /// ```
    #[rhai_fn(name = "push", return_raw)]
    pub fn push(r: &mut Ring, x: Dynamic) -> Res<()> {
        r.push(num::finite(&x, "ring.push(x)")?);
        Ok(())
    }

    /// Number of values held.
    ///
    /// ```rhai
    /// let w = ring(3); w.push(1); print(w.len);   // 1
    /// ```
    #[rhai_fn(get = "len", pure)]
    pub fn len(r: &mut Ring) -> INT {
        r.len() as INT
    }

    /// Maximum number of values held (the `n` of `ring(n)`).
    ///
    /// ```rhai
    /// print(ring(3).capacity);                    // 3
    /// ```
    #[rhai_fn(get = "capacity", pure)]
    pub fn capacity(r: &mut Ring) -> INT {
        r.capacity() as INT
    }

    /// True once `len == capacity`.
    ///
    /// ```rhai
    /// let w = ring(1); w.push(1); print(w.is_full);  // true
    /// ```
    #[rhai_fn(get = "is_full", pure)]
    pub fn is_full(r: &mut Ring) -> bool {
        r.is_full()
    }

    /// Sum of the values held (0.0 when empty).
    ///
    /// ```rhai
    /// let w = ring(2); w.push(1); w.push(2); w.push(3);
    /// print(w.sum);                               // 5.0
    /// ```
    #[rhai_fn(get = "sum", pure)]
    pub fn sum(r: &mut Ring) -> FLOAT {
        r.sum()
    }

    /// Mean of the values held (0.0 when empty).
    ///
    /// ```rhai
    /// let w = ring(2); w.push(1); w.push(2); w.push(3);
    /// print(w.mean);                              // 2.5
    /// ```
    #[rhai_fn(get = "mean", pure)]
    pub fn mean(r: &mut Ring) -> FLOAT {
        r.mean()
    }

    /// Sample standard deviation of the values held (0.0 with fewer than 2).
    ///
    /// ```rhai
    /// let w = ring(2); w.push(1); w.push(3);
    /// print(w.std);                               // 1.414...
    /// ```
    #[rhai_fn(get = "std", pure)]
    pub fn std(r: &mut Ring) -> FLOAT {
        r.std()
    }

    /// Smallest value held as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let w = ring(2); w.push(1); w.push(5); w.push(3);
    /// print(w.min);                               // 3.0
    /// ```
    #[rhai_fn(get = "min", pure)]
    pub fn min(r: &mut Ring) -> Dynamic {
        num::opt_float(r.min())
    }

    /// Largest value held as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let w = ring(2); w.push(9); w.push(5); w.push(3);
    /// print(w.max);                               // 5.0
    /// ```
    #[rhai_fn(get = "max", pure)]
    pub fn max(r: &mut Ring) -> Dynamic {
        num::opt_float(r.max())
    }

    /// `(x - mean) / std` over the values held; 0.0 when `std` is 0.
    ///
    /// ```rhai
    /// if w.len >= 5 && w.zscore(ev.price).abs() > 3.0 { emit("alerts", ev) }
    /// w.push(ev.price);
    /// ```
    #[rhai_fn(name = "zscore", return_raw, pure)]
    pub fn zscore(r: &mut Ring, x: Dynamic) -> Res<FLOAT> {
        Ok(r.zscore(num::number(&x, "ring.zscore(x)")?))
    }

    /// The values held as an array of `FLOAT`, oldest first.
    ///
    /// ```rhai
    /// let w = ring(2); w.push(1); w.push(2); w.push(3);
    /// print(w.values());                          // [2.0, 3.0]
    /// ```
    #[rhai_fn(name = "values", pure)]
    pub fn values(r: &mut Ring) -> Array {
        r.values_array()
    }

    /// Summary map: `#{len, capacity, sum, mean, std, min, max, values}`.
    ///
    /// ```rhai
    /// emit("window", this.w.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(r: &mut Ring) -> Map {
        r.to_map()
    }

    /// Text form, e.g. `ring#{"capacity": 3, ...}`.
    ///
    /// ```rhai
    /// print(ring(3));
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(r: &mut Ring) -> String {
        format!("ring{}", Dynamic::from_map(r.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn matches_brute_force_over_the_last_n() {
        let mut rng = Lcg::new(5);
        let n = 17;
        let xs: Vec<f64> = (0..400)
            .map(|i| {
                if i % 3 == 0 {
                    rng.below(1000) as f64
                } else {
                    1e6 + rng.range(0.0, 1.0)
                }
            })
            .collect();
        // Snapshot every 13 pushes, so both partial and full windows are checked.
        let snaps: Array = eval_with(
            "let w = ring(17); let out = [];
             for i in 0..xs.len() {
                 w.push(xs[i]);
                 if i % 13 == 0 || i == xs.len() - 1 {
                     out.push(#{i: i, len: w.len, sum: w.sum, mean: w.mean, std: w.std,
                                min: w.min, max: w.max, full: w.is_full, z: w.zscore(1e6),
                                values: w.values(), cap: w.capacity});
                 }
             }
             out",
            vec![("xs", mixed(&xs))],
        );
        assert_eq!(snaps.len(), 32);
        for s in snaps {
            let s = s.cast::<Map>();
            let i = s["i"].as_int().unwrap() as usize;
            let win = &xs[(i + 1).saturating_sub(n)..=i];
            let len = win.len() as f64;
            let mean = win.iter().sum::<f64>() / len;
            let var = if win.len() < 2 {
                0.0
            } else {
                win.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (len - 1.0)
            };
            assert_eq!(s["len"].as_int().unwrap() as usize, win.len());
            assert_eq!(s["cap"].as_int().unwrap(), 17);
            assert_eq!(s["full"].as_bool().unwrap(), win.len() == n);
            assert_close(f(&s["sum"]), win.iter().sum(), 1e-12);
            assert_close(f(&s["mean"]), mean, 1e-12);
            assert_close(f(&s["std"]), var.sqrt(), 1e-7);
            let expect_z = if var == 0.0 {
                0.0
            } else {
                (1e6 - mean) / var.sqrt()
            };
            assert_close(f(&s["z"]), expect_z, 1e-7);
            let min = win.iter().copied().fold(f64::INFINITY, f64::min);
            let max = win.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(f(&s["min"]), min);
            assert_eq!(f(&s["max"]), max);
            let values: Vec<f64> = s["values"].clone().cast::<Array>().iter().map(f).collect();
            assert_eq!(values, win);
        }
    }

    #[test]
    fn empty_one_and_capacity_one() {
        let out: Map = eval(
            "let w = ring(4);
             #{len: w.len, sum: w.sum, mean: w.mean, std: w.std, min: w.min, max: w.max,
               full: w.is_full, z: w.zscore(1), values: w.values()}",
        );
        assert_eq!(out["len"].as_int().unwrap(), 0);
        assert_eq!(f(&out["sum"]), 0.0);
        assert_eq!(f(&out["mean"]), 0.0);
        assert_eq!(f(&out["std"]), 0.0);
        assert!(out["min"].is_unit() && out["max"].is_unit());
        assert!(!out["full"].as_bool().unwrap());
        assert_eq!(f(&out["z"]), 0.0);
        assert!(out["values"].clone().cast::<Array>().is_empty());
        let out: Map = eval(
            "let w = ring(1.0); w.push(3); w.push(-8.5);
             #{len: w.len, sum: w.sum, mean: w.mean, min: w.min, max: w.max, std: w.std}",
        );
        assert_eq!(out["len"].as_int().unwrap(), 1);
        assert_eq!(f(&out["sum"]), -8.5);
        assert_eq!(f(&out["mean"]), -8.5);
        assert_eq!(f(&out["min"]), -8.5);
        assert_eq!(f(&out["max"]), -8.5);
        assert_eq!(f(&out["std"]), 0.0);
    }

    #[test]
    fn size_and_type_errors() {
        for bad in [
            "ring(0)",
            "ring(-1)",
            "ring(1_000_000_000)",
            "ring(100001)",
            "ring(2.5)",
        ] {
            let e = eval_err(bad);
            assert!(
                e.contains("ring(n)")
                    && (e.contains("between 1 and 100000") || e.contains("whole")),
                "{bad}: {e}"
            );
        }
        assert!(eval_err("ring(0.0/0.0)").contains("whole number"));
        assert!(eval_err(r#"ring("5")"#).contains("got string"));
        assert!(eval_err("let w = ring(2); w.push([])").contains("got array"));
        assert!(eval_err("let w = ring(2); w.push(1.0/0.0)").contains("finite"));
        assert_eq!(eval::<INT>("ring(100000).capacity"), 100_000);
    }

    #[test]
    fn map_type_and_serde() {
        let out: Map = eval(
            "let w = ring(2); w.push(1); w.push(2); w.push(4); #{t: type_of(w), m: w.to_map()}",
        );
        assert_eq!(out["t"].clone().into_string().unwrap(), "ring");
        let m = out["m"].clone().cast::<Map>();
        let values: Vec<f64> = m["values"].clone().cast::<Array>().iter().map(f).collect();
        assert_eq!(values, vec![2.0, 4.0]);
        assert_eq!(f(&m["mean"]), 3.0);
        let r: Ring = eval("let w = ring(3); for x in [5, 1, 4, 1.5] { w.push(x) } w");
        let mut back: Ring = round_trip(&r);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", r.to_map()));
        back.push(10.0);
        assert_eq!(back.values().collect::<Vec<_>>(), vec![4.0, 1.5, 10.0]);
    }
}
