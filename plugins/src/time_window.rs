//! `time_window(ms)`: the numbers seen in the last `ms` milliseconds of event time, with
//! count, sum, mean, rate, min and max. The window ends at the newest event time added
//! (it moves only when events arrive, never with the wall clock). Entries are kept sorted
//! by time, so out-of-order adds inside the window are kept and evicted at the right moment.
//! At most [`MAX_WINDOW_ENTRIES`] entries are held; past that the oldest are evicted early
//! and counted in `evicted`.

use std::collections::VecDeque;

use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Most entries a `time_window` holds; older ones are evicted beyond it.
pub const MAX_WINDOW_ENTRIES: usize = 100_000;

/// Numbers in a sliding window of event time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimeWindow {
    window_ms: i64,
    /// `(t_ms, x)`, sorted by `t_ms` (ties in arrival order).
    entries: VecDeque<(i64, f64)>,
    newest: Option<i64>,
    sum: f64,
    /// Removals since the last exact recomputation of `sum`.
    since_exact: usize,
    /// Entries evicted early because the window was at [`MAX_WINDOW_ENTRIES`].
    evicted: u64,
}

impl TimeWindow {
    /// A window of `window_ms` milliseconds (>= 1).
    pub fn new(window_ms: i64) -> Result<Self, String> {
        if window_ms < 1 {
            return Err(format!(
                "time_window(ms): the window must be at least 1 ms, got {window_ms}"
            ));
        }
        Ok(Self {
            window_ms,
            entries: VecDeque::new(),
            newest: None,
            sum: 0.0,
            since_exact: 0,
            evicted: 0,
        })
    }

    /// Adds `x` at event time `t_ms`. Returns false (and keeps nothing) when `t_ms` is
    /// already outside the window, i.e. `t_ms <= newest - window_ms`.
    pub fn add(&mut self, t_ms: i64, x: f64) -> bool {
        if let Some(newest) = self.newest {
            if t_ms <= newest.saturating_sub(self.window_ms) {
                return false;
            }
        }
        match self.entries.back() {
            Some(&(last, _)) if last > t_ms => {
                let at = self.entries.partition_point(|&(t, _)| t <= t_ms);
                self.entries.insert(at, (t_ms, x));
            }
            _ => self.entries.push_back((t_ms, x)),
        }
        self.sum += x;
        let newest = self.newest.map_or(t_ms, |n| n.max(t_ms));
        self.newest = Some(newest);
        let cutoff = newest.saturating_sub(self.window_ms);
        while let Some(&(t, _)) = self.entries.front() {
            if t > cutoff {
                break;
            }
            self.pop_front();
        }
        while self.entries.len() > MAX_WINDOW_ENTRIES {
            self.pop_front();
            self.evicted += 1;
        }
        true
    }

    fn pop_front(&mut self) {
        if let Some((_, x)) = self.entries.pop_front() {
            self.sum -= x;
            self.since_exact += 1;
            if self.entries.is_empty() {
                self.sum = 0.0;
                self.since_exact = 0;
            } else if self.since_exact > self.entries.len() {
                self.sum = self.entries.iter().map(|&(_, x)| x).sum();
                self.since_exact = 0;
            }
        }
    }

    /// Window length in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Number of entries in the window.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Sum of the entries.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Mean of the entries; 0.0 when empty.
    pub fn mean(&self) -> f64 {
        if self.entries.is_empty() {
            0.0
        } else {
            self.sum / self.entries.len() as f64
        }
    }

    /// Entries per second over the window length: `count * 1000 / window_ms`.
    pub fn rate(&self) -> f64 {
        self.entries.len() as f64 * 1000.0 / self.window_ms as f64
    }

    /// Smallest entry (O(count)).
    pub fn min(&self) -> Option<f64> {
        self.entries.iter().map(|&(_, x)| x).reduce(f64::min)
    }

    /// Largest entry (O(count)).
    pub fn max(&self) -> Option<f64> {
        self.entries.iter().map(|&(_, x)| x).reduce(f64::max)
    }

    /// Entries evicted early because the window held [`MAX_WINDOW_ENTRIES`].
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Heap bytes used by the entries.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(i64, f64)>()
    }

    /// `#{count, sum, mean, rate, min, max, window_ms, evicted}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("count".into(), (self.count() as INT).into());
        m.insert("sum".into(), self.sum.into());
        m.insert("mean".into(), self.mean().into());
        m.insert("rate".into(), self.rate().into());
        m.insert("min".into(), num::opt_float(self.min()));
        m.insert("max".into(), num::opt_float(self.max()));
        m.insert("window_ms".into(), self.window_ms.into());
        m.insert("evicted".into(), num::int(self.evicted).into());
        m
    }
}

/// Rhai functions of `time_window`.
#[export_module(manifest)]
pub mod time_window_functions {
    use super::*;

    /// Creates a sliding window over the last `ms` milliseconds of event time
    /// (a whole number >= 1, or a duration string like `"5m"`).
    ///
    /// ```rhai
    /// let w = time_window("1m");
    /// ```
    #[rhai_fn(name = "time_window", return_raw)]
    pub fn new_time_window(ms: Dynamic) -> Res<TimeWindow> {
        let made = (|| -> Res<TimeWindow> {
            let ms = num::duration_arg(&ms, "time_window(ms)")?;
            TimeWindow::new(ms).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Adds `x` (`INT` or finite `FLOAT`) at event time `t_ms`, then evicts entries with
    /// `t <= newest_t - ms`. A late add already outside the window is ignored.
    ///
    /// ```rhai
    /// let w = time_window(1000);
    /// w.add(ev.ts, ev.price);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add(w: &mut TimeWindow, t_ms: Dynamic, x: Dynamic) -> Res<()> {
        let t = num::timestamp(&t_ms, "time_window.add(t_ms, x)")?;
        let x = num::finite(&x, "time_window.add(t_ms, x)")?;
        w.add(t, x);
        Ok(())
    }

    /// Number of entries in the window.
    ///
    /// ```rhai
    /// let w = time_window(10); w.add(0, 1); w.add(10, 2);
    /// print(w.count);     // 1
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(w: &mut TimeWindow) -> INT {
        w.count() as INT
    }

    /// Sum of the entries (0.0 when empty).
    ///
    /// ```rhai
    /// let w = time_window(10); w.add(0, 1); w.add(5, 2);
    /// print(w.sum);       // 3.0
    /// ```
    #[rhai_fn(get = "sum", pure)]
    pub fn sum(w: &mut TimeWindow) -> FLOAT {
        w.sum()
    }

    /// Mean of the entries (0.0 when empty).
    ///
    /// ```rhai
    /// let w = time_window(10); w.add(0, 1); w.add(5, 2);
    /// print(w.mean);      // 1.5
    /// ```
    #[rhai_fn(get = "mean", pure)]
    pub fn mean(w: &mut TimeWindow) -> FLOAT {
        w.mean()
    }

    /// Entries per second over the window length: `count * 1000 / ms`.
    ///
    /// ```rhai
    /// let w = time_window(2000); w.add(0, 1); w.add(5, 2);
    /// print(w.rate);      // 1.0
    /// ```
    #[rhai_fn(get = "rate", pure)]
    pub fn rate(w: &mut TimeWindow) -> FLOAT {
        w.rate()
    }

    /// Smallest entry as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let w = time_window(10); w.add(0, 4); w.add(5, 2);
    /// print(w.min);       // 2.0
    /// ```
    #[rhai_fn(get = "min", pure)]
    pub fn min(w: &mut TimeWindow) -> Dynamic {
        num::opt_float(w.min())
    }

    /// Largest entry as a `FLOAT`; `()` when empty.
    ///
    /// ```rhai
    /// let w = time_window(10); w.add(0, 4); w.add(5, 2);
    /// print(w.max);       // 4.0
    /// ```
    #[rhai_fn(get = "max", pure)]
    pub fn max(w: &mut TimeWindow) -> Dynamic {
        num::opt_float(w.max())
    }

    /// Entries evicted early because the window held 100000 entries.
    ///
    /// ```rhai
    /// if w.evicted > 0 { print("window too busy, counts are truncated") }
    /// ```
    #[rhai_fn(get = "evicted", pure)]
    pub fn evicted(w: &mut TimeWindow) -> INT {
        num::int(w.evicted())
    }

    /// Summary map: `#{count, sum, mean, rate, min, max, window_ms, evicted}`.
    ///
    /// ```rhai
    /// emit("last_minute", this.w.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(w: &mut TimeWindow) -> Map {
        w.to_map()
    }

    /// Text form, e.g. `time_window#{"count": 0, ...}`.
    ///
    /// ```rhai
    /// print(time_window(1000));
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(w: &mut TimeWindow) -> String {
        format!("time_window{}", Dynamic::from_map(w.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use rhai::Array;

    #[test]
    fn matches_brute_force_with_out_of_order_adds() {
        let mut rng = Lcg::new(21);
        let ms = 1000i64;
        let mut t = 50_000i64;
        let mut ts = Vec::new();
        let mut xs = Vec::new();
        for i in 0..600 {
            t += rng.below(40) as i64;
            // Some adds are late: a few inside the window, a few outside it.
            let ti = match i % 10 {
                3 => t - rng.below(900) as i64,
                7 => t - 1000 - rng.below(500) as i64,
                _ => t,
            };
            ts.push(ti);
            xs.push(if i % 2 == 0 {
                rng.below(100) as f64
            } else {
                rng.range(-5.0, 5.0)
            });
        }
        let tsd: Array = ts.iter().map(|&t| Dynamic::from_int(t)).collect();
        let snaps: Array = eval_with(
            "let w = time_window(1000); let out = [];
             for i in 0..xs.len() {
                 w.add(ts[i], xs[i]);
                 if i % 17 == 0 || i == xs.len() - 1 {
                     out.push(#{i: i, count: w.count, sum: w.sum, mean: w.mean, rate: w.rate,
                                min: w.min, max: w.max, evicted: w.evicted});
                 }
             }
             out",
            vec![("xs", mixed(&xs)), ("ts", Dynamic::from_array(tsd))],
        );
        for s in snaps {
            let s = s.cast::<Map>();
            let i = s["i"].as_int().unwrap() as usize;
            let newest = *ts[..=i].iter().max().unwrap();
            let win: Vec<f64> = (0..=i)
                .filter(|&j| ts[j] > newest - ms)
                .map(|j| xs[j])
                .collect();
            assert_eq!(s["count"].as_int().unwrap() as usize, win.len(), "at {i}");
            let sum: f64 = win.iter().sum();
            assert_close(f(&s["sum"]), sum, 1e-9);
            assert_close(f(&s["mean"]), sum / win.len() as f64, 1e-9);
            assert_close(f(&s["rate"]), win.len() as f64 * 1000.0 / ms as f64, 1e-12);
            let min = win.iter().copied().fold(f64::INFINITY, f64::min);
            let max = win.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(f(&s["min"]), min);
            assert_eq!(f(&s["max"]), max);
            assert_eq!(s["evicted"].as_int().unwrap(), 0);
        }
    }

    #[test]
    fn boundaries_empty_and_units() {
        // t <= newest - ms is evicted: exactly `ms` old is out.
        let out: Map = eval(
            "let w = time_window(100); let e = #{c: w.count, mean: w.mean, min: w.min, max: w.max, rate: w.rate};
             w.add(0, 1); w.add(99, 2); let a = w.count;
             w.add(100, 3); let b = w.count; let s = w.sum;
             w.add(0, 50); let late = w.count;
             w.add(1.9, 7); let late2 = w.count;
             #{e: e, a: a, b: b, s: s, late: late, late2: late2}",
        );
        let e = out["e"].clone().cast::<Map>();
        assert_eq!(e["c"].as_int().unwrap(), 0);
        assert_eq!(f(&e["mean"]), 0.0);
        assert_eq!(f(&e["rate"]), 0.0);
        assert!(e["min"].is_unit() && e["max"].is_unit());
        assert_eq!(out["a"].as_int().unwrap(), 2);
        assert_eq!(out["b"].as_int().unwrap(), 2);
        assert_eq!(f(&out["s"]), 5.0);
        assert_eq!(out["late"].as_int().unwrap(), 2);
        assert_eq!(out["late2"].as_int().unwrap(), 3);
        assert_eq!(
            eval::<INT>(r#"let w = time_window("1m"); w.add(0, 1); w.add(59999, 1); w.count"#),
            2
        );
        assert_eq!(
            eval::<INT>(r#"let w = time_window("1m"); w.add(0, 1); w.add(60000, 1); w.count"#),
            1
        );
        assert_eq!(
            eval::<f64>("let w = time_window(500); w.add(1, 1); w.add(2, 1); w.rate"),
            4.0
        );
    }

    #[test]
    fn caps_entries_and_counts_evictions() {
        let extra = 25;
        let total = MAX_WINDOW_ENTRIES + extra;
        let out: Map = eval(&format!(
            "let w = time_window(1000); for i in 0..{total} {{ w.add(7, i) }}
             #{{count: w.count, evicted: w.evicted, sum: w.sum, min: w.min, max: w.max}}"
        ));
        assert_eq!(out["count"].as_int().unwrap() as usize, MAX_WINDOW_ENTRIES);
        assert_eq!(out["evicted"].as_int().unwrap() as usize, extra);
        let kept: f64 = (extra..total).map(|i| i as f64).sum();
        assert_close(f(&out["sum"]), kept, 1e-12);
        assert_eq!(f(&out["min"]), extra as f64);
        assert_eq!(f(&out["max"]), (total - 1) as f64);
    }

    #[test]
    fn errors() {
        for bad in [
            "time_window(0)",
            "time_window(-10)",
            "time_window(0.5)",
            r#"time_window("0s")"#,
        ] {
            let e = eval_err(bad);
            assert!(e.contains("time_window(ms)"), "{bad}: {e}");
        }
        assert!(eval_err(r#"time_window("1y")"#).contains("1y"));
        assert!(eval_err("time_window([])").contains("got array"));
        assert!(eval_err(r#"let w = time_window(9); w.add("now", 1)"#).contains("got string"));
        assert!(eval_err("let w = time_window(9); w.add(1, ())").contains("got ()"));
        assert!(eval_err("let w = time_window(9); w.add(1.0/0.0, 1)").contains("timestamp"));
    }

    #[test]
    fn map_type_and_serde() {
        let out: Map =
            eval("let w = time_window(10); w.add(3, 2); #{t: type_of(w), m: w.to_map()}");
        assert_eq!(out["t"].clone().into_string().unwrap(), "time_window");
        let m = out["m"].clone().cast::<Map>();
        assert_eq!(m["window_ms"].as_int().unwrap(), 10);
        assert_eq!(f(&m["sum"]), 2.0);
        let w: TimeWindow =
            eval("let w = time_window(100); w.add(5, 1); w.add(50, 2.5); w.add(20, 4); w");
        let mut back: TimeWindow = round_trip(&w);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", w.to_map()));
        back.add(121, 1.0); // evicts t = 5 and t = 20
        assert_eq!(back.count(), 2);
        assert_eq!(back.sum(), 3.5);
    }
}
