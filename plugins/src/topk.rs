//! `topk(k)`: approximate heavy hitters with the Space-Saving algorithm (Metwally et al.).
//! At most `k` items are tracked. An untracked item arriving when all `k` slots are used
//! replaces the item with the smallest count, inheriting that count as its `error`.
//! Guarantees: every item whose true count exceeds `total / k` is tracked, each tracked
//! `count` over-estimates the true count by at most `error`, and while at most `k` distinct
//! items were seen, counts are exact. Items are strings or `INT`s; `add` costs O(log k).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use rhai::plugin::*;
use rhai::{Array, Map, INT};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Largest `k` a script may ask of `topk(k)`.
pub const MAX_TOPK: usize = 10_000;

/// A tracked item: an integer or a string. Integers sort before strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Item {
    /// An `INT` item.
    Int(i64),
    /// A string item.
    Str(String),
}

impl Item {
    fn to_dynamic(&self) -> Dynamic {
        match self {
            Item::Int(i) => Dynamic::from_int(*i),
            Item::Str(s) => s.clone().into(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Item::Int(_) => 0,
            Item::Str(s) => s.capacity(),
        }
    }
}

/// A count with a total order, so it can key a `BTreeSet`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Count(f64);

impl Eq for Count {}

impl PartialOrd for Count {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Count {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// One row of [`TopK::top`].
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The item.
    pub item: Item,
    /// Estimated count (an over-estimate by at most `error`).
    pub count: f64,
    /// Maximum over-estimation of `count`.
    pub error: f64,
}

/// Space-Saving heavy-hitters sketch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "TopKRepr", try_from = "TopKRepr")]
pub struct TopK {
    k: usize,
    /// item -> (count, error)
    counts: HashMap<Item, (f64, f64)>,
    /// (count, item), to find the smallest count.
    order: BTreeSet<(Count, Item)>,
    /// Sum of all weights added.
    total: f64,
    /// True while every weight added was a whole number (counts are then `INT`s).
    integral: bool,
    /// Bytes of string items held (in both maps).
    item_bytes: usize,
}

/// Serialized form of [`TopK`]: entries as a list (JSON maps need string keys).
#[derive(Serialize, Deserialize)]
struct TopKRepr {
    k: usize,
    total: f64,
    integral: bool,
    entries: Vec<(Item, f64, f64)>,
}

impl From<TopK> for TopKRepr {
    fn from(t: TopK) -> Self {
        let entries = t
            .order
            .iter()
            .map(|(_, item)| {
                let (c, e) = t.counts[item];
                (item.clone(), c, e)
            })
            .collect();
        Self {
            k: t.k,
            total: t.total,
            integral: t.integral,
            entries,
        }
    }
}

impl TryFrom<TopKRepr> for TopK {
    type Error = String;

    fn try_from(r: TopKRepr) -> Result<Self, String> {
        let mut t = TopK::new(r.k)?;
        if r.entries.len() > r.k {
            return Err(format!("topk: {} entries for k = {}", r.entries.len(), r.k));
        }
        for (item, count, error) in r.entries {
            t.insert(item, count, error);
        }
        t.total = r.total;
        t.integral = r.integral;
        Ok(t)
    }
}

impl TopK {
    /// A sketch tracking at most `k` (1..=[`MAX_TOPK`]) items.
    pub fn new(k: usize) -> Result<Self, String> {
        if !(1..=MAX_TOPK).contains(&k) {
            return Err(format!(
                "topk(k): k must be between 1 and {MAX_TOPK}, got {k}"
            ));
        }
        Ok(Self {
            k,
            counts: HashMap::new(),
            order: BTreeSet::new(),
            total: 0.0,
            integral: true,
            item_bytes: 0,
        })
    }

    fn insert(&mut self, item: Item, count: f64, error: f64) {
        self.item_bytes += 2 * item.heap_bytes();
        self.order.insert((Count(count), item.clone()));
        self.counts.insert(item, (count, error));
    }

    /// Adds `weight` (finite, > 0) occurrences of `item`.
    pub fn add(&mut self, item: Item, weight: f64) -> Result<(), String> {
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(format!(
                "topk.add(item, weight): weight must be a finite number > 0, got {weight}"
            ));
        }
        self.total += weight;
        self.integral &= weight.fract() == 0.0;
        if let Some((count, _)) = self.counts.get_mut(&item) {
            let old = *count;
            *count += weight;
            let new = *count;
            // Re-key in the order set (moves the item, no clone).
            let (_, item) = self
                .order
                .take(&(Count(old), item))
                .expect("order and counts agree");
            self.order.insert((Count(new), item));
        } else if self.counts.len() < self.k {
            self.insert(item, weight, 0.0);
        } else if let Some((Count(min), victim)) = self.order.pop_first() {
            self.counts.remove(&victim);
            self.item_bytes -= 2 * victim.heap_bytes();
            self.insert(item, min + weight, min);
        }
        Ok(())
    }

    /// Tracked items, by count descending then item ascending; the first `n` if given.
    pub fn top(&self, n: Option<usize>) -> Vec<Entry> {
        let mut rows: Vec<Entry> = self
            .counts
            .iter()
            .map(|(item, &(count, error))| Entry {
                item: item.clone(),
                count,
                error,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.count
                .total_cmp(&a.count)
                .then_with(|| a.item.cmp(&b.item))
        });
        if let Some(n) = n {
            rows.truncate(n);
        }
        rows
    }

    /// Number of items tracked (<= k).
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The `k` of `topk(k)`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Sum of all weights added.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Heap bytes: both indexes plus string items.
    pub(crate) fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Item, (f64, f64))>() + 8;
        let node = std::mem::size_of::<(Count, Item)>() + 8;
        self.counts.capacity() * slot + self.order.len() * node + self.item_bytes
    }

    /// A count as a Rhai value: `INT` while every weight was whole, else `FLOAT`.
    fn count_value(&self, c: f64) -> Dynamic {
        if self.integral && c.abs() < 9.0e15 {
            Dynamic::from_int(c as INT)
        } else {
            Dynamic::from_float(c)
        }
    }

    fn top_array(&self, n: Option<usize>) -> Array {
        self.top(n)
            .into_iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("item".into(), e.item.to_dynamic());
                m.insert("count".into(), self.count_value(e.count));
                m.insert("error".into(), self.count_value(e.error));
                Dynamic::from_map(m)
            })
            .collect()
    }

    /// `#{k, len, total, top}` where `top` is the full `top()` array.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("k".into(), (self.k as INT).into());
        m.insert("len".into(), (self.len() as INT).into());
        m.insert("total".into(), self.count_value(self.total));
        m.insert("top".into(), Dynamic::from_array(self.top_array(None)));
        m
    }
}

fn item_arg(v: &Dynamic, ctx: &str) -> Res<Item> {
    if let Ok(i) = v.as_int() {
        Ok(Item::Int(i))
    } else if let Some(s) = v.read_lock::<ImmutableString>() {
        Ok(Item::Str(s.to_string()))
    } else {
        num::err(format!(
            "{ctx}: the item must be a string or an INT, got {}",
            num::type_of(v)
        ))
    }
}

/// Rhai functions of `topk`.
#[export_module(manifest)]
pub mod topk_functions {
    use super::*;

    /// Creates a heavy-hitters sketch tracking at most `k` items, 1 <= `k` <= 10000.
    ///
    /// ```rhai
    /// let hot = topk(10);
    /// ```
    #[rhai_fn(name = "topk", return_raw)]
    pub fn new_topk(k: Dynamic) -> Res<TopK> {
        let made = (|| -> Res<TopK> {
            let k = num::size(&k, "topk(k)", 1, MAX_TOPK)?;
            TopK::new(k).or_else(num::err)
        })();
        made.and_then(crate::charged)
    }

    /// Counts one occurrence of `item` (a string or an `INT`).
    ///
    /// ```rhai
    /// let hot = topk(10); hot.add(ev.symbol);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add(t: &mut TopK, item: Dynamic) -> Res<()> {
        let item = item_arg(&item, "topk.add(item)")?;
        t.add(item, 1.0).or_else(num::err)
    }

    /// Counts `item` with a `weight` (`INT` or `FLOAT`, > 0), e.g. traded volume.
    /// Counts stay `INT` while every weight is a whole number, and become `FLOAT` after.
    ///
    /// ```rhai
    /// let hot = topk(10); hot.add(ev.symbol, ev.size);
    /// ```
    #[rhai_fn(name = "add", return_raw)]
    pub fn add_weight(t: &mut TopK, item: Dynamic, weight: Dynamic) -> Res<()> {
        let ctx = "topk.add(item, weight)";
        let item = item_arg(&item, ctx)?;
        let weight = num::number(&weight, ctx)?;
        t.add(item, weight).or_else(num::err)
    }

    /// All tracked items as `[#{item, count, error}, ...]`, by count descending, ties by
    /// item ascending (`INT` items before strings).
    ///
    /// ```rhai
    /// let hot = topk(3); hot.add("a"); hot.add("b"); hot.add("a");
    /// print(hot.top());   // [#{"count": 2, "error": 0, "item": "a"}, #{"count": 1, ...}]
    /// ```
    #[rhai_fn(name = "top", pure)]
    pub fn top(t: &mut TopK) -> Array {
        t.top_array(None)
    }

    /// The first `n` (>= 0) rows of `top()`.
    ///
    /// ```rhai
    /// let best = hot.top(1)[0].item;
    /// ```
    #[rhai_fn(name = "top", return_raw, pure)]
    pub fn top_n(t: &mut TopK, n: Dynamic) -> Res<Array> {
        let n = num::size(&n, "topk.top(n)", 0, usize::MAX >> 1)?;
        Ok(t.top_array(Some(n)))
    }

    /// Number of items tracked (at most `k`).
    ///
    /// ```rhai
    /// let hot = topk(3); hot.add(1); hot.add(2); hot.add(1);
    /// print(hot.len);     // 2
    /// ```
    #[rhai_fn(get = "len", pure)]
    pub fn len(t: &mut TopK) -> INT {
        t.len() as INT
    }

    /// Total weight added (`INT` while every weight was whole).
    ///
    /// ```rhai
    /// let hot = topk(1); hot.add(1); hot.add(2);
    /// print(hot.total);   // 2
    /// ```
    #[rhai_fn(get = "total", pure)]
    pub fn total(t: &mut TopK) -> Dynamic {
        t.count_value(t.total())
    }

    /// Summary map: `#{k, len, total, top}`.
    ///
    /// ```rhai
    /// emit("hot", this.hot.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(t: &mut TopK) -> Map {
        t.to_map()
    }

    /// Text form, e.g. `topk#{"k": 10, ...}`.
    ///
    /// ```rhai
    /// print(topk(10));
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(t: &mut TopK) -> String {
        format!("topk{}", Dynamic::from_map(t.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::collections::BTreeMap;

    fn rows(a: &Array) -> Vec<(Dynamic, f64, f64)> {
        a.iter()
            .map(|r| {
                let m = r.clone().cast::<Map>();
                (m["item"].clone(), f(&m["count"]), f(&m["error"]))
            })
            .collect()
    }

    #[test]
    fn exact_when_distinct_items_fit() {
        let mut rng = Lcg::new(4);
        let names = ["AAPL", "MSFT", "GOOG", "TSLA", "NVDA", "AMZN", "META"];
        let mut items = Vec::new();
        let mut exact: BTreeMap<Item, i64> = BTreeMap::new();
        for _ in 0..2000 {
            // Skewed: low indexes much more frequent; a few INT items too.
            let r = rng.unit();
            let i = (r * r * 9.0) as usize;
            let item = if i < names.len() {
                Item::Str(names[i].to_string())
            } else {
                Item::Int(i as i64 - 100)
            };
            *exact.entry(item.clone()).or_default() += 1;
            items.push(item.to_dynamic());
        }
        let k = exact.len(); // exactly as many slots as distinct items
        let out: Map = eval_with(
            &format!(
                "let t = topk({k}); for x in items {{ t.add(x) }}
                 #{{top: t.top(), top3: t.top(3), top0: t.top(0), len: t.len, total: t.total}}"
            ),
            vec![("items", Dynamic::from_array(items))],
        );
        let mut want: Vec<(Item, i64)> = exact.into_iter().collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let got = rows(&out["top"].clone().cast::<Array>());
        assert_eq!(got.len(), want.len());
        for ((gi, gc, ge), (wi, wc)) in got.iter().zip(&want) {
            assert_eq!(gi.to_string(), wi.to_dynamic().to_string());
            assert_eq!(*gc, *wc as f64);
            assert_eq!(*ge, 0.0);
        }
        let top3 = rows(&out["top3"].clone().cast::<Array>());
        assert_eq!(top3.len(), 3);
        assert_eq!(top3[0].0.to_string(), want[0].0.to_dynamic().to_string());
        assert!(out["top0"].clone().cast::<Array>().is_empty());
        assert_eq!(out["len"].as_int().unwrap() as usize, k);
        assert_eq!(out["total"].as_int().unwrap(), 2000);
        // Counts are INT when all weights were whole.
        let first = out["top"].clone().cast::<Array>()[0].clone().cast::<Map>();
        assert!(first["count"].is_int() && first["error"].is_int());
    }

    #[test]
    fn ties_break_by_item_and_weights() {
        let out: Array = eval(
            r#"let t = topk(10);
               t.add("b", 2); t.add("a", 2); t.add(7, 2); t.add(-1, 2); t.add("c"); t.add("a", 1.5);
               t.top()"#,
        );
        let got = rows(&out);
        let items: Vec<String> = got.iter().map(|r| r.0.to_string()).collect();
        assert_eq!(items, ["a", "-1", "7", "b", "c"]);
        assert_eq!(got[0].1, 3.5);
        // A fractional weight turned counts into FLOAT.
        let first = out[0].clone().cast::<Map>();
        assert!(first["count"].is_float());
        assert!(eval::<Dynamic>("let t = topk(2); t.add(1, 2.5); t.total").is_float());
        assert_eq!(
            eval::<INT>("let t = topk(2); t.add(1, 3); t.add(1, 2.0); t.total"),
            5
        );
    }

    #[test]
    fn space_saving_guarantees_with_more_items_than_k() {
        let mut rng = Lcg::new(8);
        let k = 20;
        let n = 5000;
        let mut exact: HashMap<i64, i64> = HashMap::new();
        let mut items = Vec::new();
        for _ in 0..n {
            // Zipf-like: a few very heavy items, a long tail of 500 light ones.
            let r = rng.unit();
            let x = (r.powi(4) * 500.0) as i64;
            *exact.entry(x).or_default() += 1;
            items.push(Dynamic::from_int(x));
        }
        let out: Array = eval_with(
            &format!("let t = topk({k}); for x in items {{ t.add(x) }} t.top()"),
            vec![("items", Dynamic::from_array(items))],
        );
        let got = rows(&out);
        assert_eq!(got.len(), k);
        let tracked: HashMap<i64, (f64, f64)> = got
            .iter()
            .map(|(i, c, e)| (i.as_int().unwrap(), (*c, *e)))
            .collect();
        // Counts add up to n; each is an over-estimate by at most its error.
        assert_eq!(got.iter().map(|r| r.1).sum::<f64>(), n as f64);
        for (item, (c, e)) in &tracked {
            let t = exact[item] as f64;
            assert!(
                *c >= t && c - e <= t,
                "{item}: count {c} error {e} true {t}"
            );
        }
        // Every item above n/k is tracked.
        for (item, &t) in &exact {
            if t > (n / k) as i64 {
                assert!(tracked.contains_key(item), "heavy item {item} ({t}) lost");
            }
        }
        // Sorted by count descending.
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn errors() {
        for bad in [
            "topk(0)",
            "topk(-2)",
            "topk(10001)",
            "topk(1e9)",
            "topk(1.5)",
        ] {
            let e = eval_err(bad);
            assert!(e.contains("topk(k)"), "{bad}: {e}");
        }
        assert!(eval_err("topk(\"3\")").contains("got string"));
        assert!(eval_err("let t = topk(3); t.add(1.5)")
            .contains("must be a string or an INT, got FLOAT"));
        assert!(eval_err("let t = topk(3); t.add([1])").contains("got array"));
        for bad in ["0", "-1", "0.0/0.0", "1.0/0.0"] {
            let e = eval_err(&format!("let t = topk(3); t.add(\"a\", {bad})"));
            assert!(e.contains("weight must be"), "{bad}: {e}");
        }
        assert!(eval_err("let t = topk(3); t.add(\"a\", \"w\")").contains("got string"));
        assert!(eval_err("let t = topk(3); t.top(-1)").contains("topk.top(n)"));
    }

    #[test]
    fn map_type_and_serde() {
        let out: Map = eval(
            r#"let t = topk(2); t.add("x"); t.add(5, 3); t.add("y"); #{t: type_of(t), m: t.to_map()}"#,
        );
        assert_eq!(out["t"].clone().into_string().unwrap(), "topk");
        let m = out["m"].clone().cast::<Map>();
        assert_eq!(m["k"].as_int().unwrap(), 2);
        assert_eq!(m["len"].as_int().unwrap(), 2);
        assert_eq!(m["total"].as_int().unwrap(), 5);
        // "x" (count 1) was replaced by "y", which inherits error 1.
        let top = rows(&m["top"].clone().cast::<Array>());
        assert_eq!(top[1].0.to_string(), "y");
        assert_eq!((top[1].1, top[1].2), (2.0, 1.0));
        let t: TopK = eval(
            r#"let t = topk(3); for x in ["a", "b", "a", 9, "c", "d", 9, 9] { t.add(x) } t.add("e", 0.5); t"#,
        );
        let mut back: TopK = round_trip(&t);
        assert_eq!(format!("{:?}", back.to_map()), format!("{:?}", t.to_map()));
        assert_eq!(back.heap_bytes() > 0, t.heap_bytes() > 0);
        let mut orig = t.clone();
        for x in ["z", "a", "q"] {
            orig.add(Item::Str(x.into()), 1.0).unwrap();
            back.add(Item::Str(x.into()), 1.0).unwrap();
        }
        assert_eq!(back.top(None), orig.top(None));
        let bad = r#"{"k":1,"total":2.0,"integral":true,"entries":[[1,1.0,0.0],[2,1.0,0.0]]}"#;
        assert!(serde_json::from_str::<TopK>(bad).is_err());
    }
}
