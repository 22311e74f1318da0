//! `hst(opts)`: Half-Space Trees (Tan, Ting and Liu, 2011), River's streaming anomaly
//! detector `anomaly.HalfSpaceTrees`, with its update and scoring rules and its defaults.
//!
//! Every feature is first scaled to [0, 1]. Limits given in `#{ limits: #{ temp: [0, 120] } }`
//! scale it as `(x - lo) / (hi - lo)`; a feature without given limits is scaled by the smallest
//! and largest values `learn` has seen of it, River's `MinMaxScaler` (`0.0` while they are
//! equal). Values outside the limits are not clipped: they fall on the outer side of every
//! split.
//!
//! The trees are built on the first `learn`, over the features of that event (sorted by name):
//! each node splits a feature drawn with probability proportional to the width of its range, at
//! a point drawn uniformly from the middle 70 % of that range, as River's `make_padded_tree`
//! does, with Python's generator seeded by `seed` ([`crate::pyrandom`]). Given the same scaled
//! stream and seed, eddy's trees and scores are River's.
//!
//! `learn(x)` adds one to the mass of every node on x's path in the current window; every
//! `window` events the current masses become the reference masses and the window restarts.
//! `score(x)` is 0.0 until the first window is complete, then
//! `1 - Σ_trees Σ_depth r_mass · 2^depth / (trees · window · (2^(height+1) - 1))`, walking down
//! until a node's reference mass falls under `0.1 · window`: in [0, 1], higher is more
//! anomalous. A feature missing from x follows the child that saw more events.

use rhai::plugin::*;
use rhai::{Array, Map, INT};
use serde::{Deserialize, Serialize};

use crate::features::{self, Features, Options, Table};
use crate::num::{self, Res};
use crate::pyrandom::PyRandom;

/// Most nodes (over all trees) one detector may have: `trees · (2^(height+1) - 1)`.
pub const MAX_HST_NODES: usize = 1 << 21;

/// Share of a range left out on each side when drawing a split (River's `padding`).
const PADDING: f64 = 0.15;

/// Hyper-parameters (River's names in the README).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HstParams {
    /// Number of trees (River: `n_trees`), default 10.
    pub trees: usize,
    /// Depth of each tree (River: `height`), default 8.
    pub height: usize,
    /// Events per window (River: `window_size`), default 250.
    pub window: usize,
    /// Seed of the tree construction (River: `seed`, default `None`); default 42.
    pub seed: u64,
}

impl Default for HstParams {
    fn default() -> Self {
        HstParams {
            trees: 10,
            height: 8,
            window: 250,
            seed: 42,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Node {
    threshold: f64,
    feature: u32,
    l_mass: u32,
    r_mass: u32,
}

/// How a feature is scaled to [0, 1]: fixed limits, or the range seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Range {
    lo: f64,
    hi: f64,
    fixed: bool,
}

impl Default for Range {
    fn default() -> Self {
        Range {
            lo: f64::INFINITY,
            hi: f64::NEG_INFINITY,
            fixed: false,
        }
    }
}

impl Range {
    fn scale(&self, x: f64) -> f64 {
        let d = self.hi - self.lo;
        if d > 0.0 {
            (x - self.lo) / d
        } else {
            0.0
        }
    }
}

/// A Half-Space Trees anomaly detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hst {
    params: HstParams,
    ranges: Table<Range>,
    /// The features the trees split on, sorted; empty until the first `learn`.
    features: Vec<Box<str>>,
    /// Every tree in heap order (children of `k` at `2k + 1` and `2k + 2`), one after another.
    nodes: Vec<Node>,
    counter: usize,
    first_window: bool,
    learned: u64,
}

impl Hst {
    pub fn new(params: HstParams, limits: &[(String, f64, f64)]) -> Res<Self> {
        let per_tree = (1usize << (params.height + 1)) - 1;
        if params.trees.saturating_mul(per_tree) > MAX_HST_NODES {
            return num::err(format!(
                "hst: {} trees of height {} have {} nodes, more than {MAX_HST_NODES}",
                params.trees,
                params.height,
                params.trees.saturating_mul(per_tree)
            ));
        }
        let mut ranges = Table::new();
        for (name, lo, hi) in limits {
            *ranges.entry(name, "hst")? = Range {
                lo: *lo,
                hi: *hi,
                fixed: true,
            };
        }
        Ok(Hst {
            params,
            ranges,
            features: Vec::new(),
            nodes: Vec::new(),
            counter: 0,
            first_window: true,
            learned: 0,
        })
    }

    fn per_tree(&self) -> usize {
        (1 << (self.params.height + 1)) - 1
    }

    /// The scaled value of every tree feature in `x` (NaN where absent), handed to `f`.
    fn with_scaled<X: Features, R>(
        features: &[Box<str>],
        ranges: &Table<Range>,
        x: &X,
        ctx: &str,
        f: impl FnOnce(&[f64]) -> R,
    ) -> Res<R> {
        let n = features.len();
        let mut stack = [f64::NAN; 32];
        let mut heap = Vec::new();
        let vals: &mut [f64] = if n <= stack.len() {
            &mut stack[..n]
        } else {
            heap.resize(n, f64::NAN);
            &mut heap
        };
        x.each(ctx, &mut |name, xi| {
            if let Ok(i) = features.binary_search_by(|f| (**f).cmp(name)) {
                let range = ranges.get(name).copied().unwrap_or_default();
                vals[i] = range.scale(xi);
            }
            Ok(())
        })?;
        Ok(f(vals))
    }

    fn build(&mut self) {
        let mut rng = PyRandom::new(self.params.seed);
        let per_tree = self.per_tree();
        self.nodes = vec![Node::default(); self.params.trees * per_tree];
        let mut limits = vec![(0.0, 1.0); self.features.len()];
        for t in 0..self.params.trees {
            let tree = &mut self.nodes[t * per_tree..(t + 1) * per_tree];
            grow(tree, 0, self.params.height, &mut limits, &mut rng);
        }
    }

    pub fn learn<X: Features>(&mut self, x: &X) -> Res<()> {
        let ctx = "hst.learn";
        let ranges = &mut self.ranges;
        let mut names = Vec::new();
        let first = self.nodes.is_empty();
        x.each(ctx, &mut |name, xi| {
            let r = ranges.entry(name, ctx)?;
            if !r.fixed {
                r.lo = r.lo.min(xi);
                r.hi = r.hi.max(xi);
            }
            if first {
                names.push(Box::<str>::from(name));
            }
            Ok(())
        })?;
        if first {
            if names.is_empty() {
                return num::err("hst.learn: the first event must have at least one feature");
            }
            names.sort();
            names.dedup();
            self.features = names;
            self.build();
        }
        let height = self.params.height;
        let per_tree = self.per_tree();
        let nodes = &mut self.nodes;
        Self::with_scaled(&self.features, &self.ranges, x, ctx, |vals| {
            for tree in nodes.chunks_exact_mut(per_tree) {
                let mut k = 0;
                for _ in 0..height {
                    tree[k].l_mass += 1;
                    k = next(tree, k, vals);
                }
                tree[k].l_mass += 1;
            }
        })?;
        self.learned += 1;
        self.counter += 1;
        if self.counter == self.params.window {
            for node in &mut self.nodes {
                node.r_mass = node.l_mass;
                node.l_mass = 0;
            }
            self.first_window = false;
            self.counter = 0;
        }
        Ok(())
    }

    pub fn score<X: Features>(&self, x: &X) -> Res<f64> {
        if self.first_window {
            return Ok(0.0);
        }
        let HstParams {
            trees,
            height,
            window,
            ..
        } = self.params;
        let size_limit = 0.1 * window as f64;
        let per_tree = self.per_tree();
        let total = Self::with_scaled(&self.features, &self.ranges, x, "hst.score", |vals| {
            let mut total = 0.0;
            for tree in self.nodes.chunks_exact(per_tree) {
                total += walk_score(tree, vals, height, size_limit);
            }
            total
        })?;
        let max = trees as f64 * window as f64 * ((1u64 << (height + 1)) - 1) as f64;
        Ok(1.0 - total / max)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.ranges.heap_bytes()
            + self.features.capacity() * std::mem::size_of::<Box<str>>()
            + self.features.iter().map(|f| f.len()).sum::<usize>()
    }

    /// `#{trees, height, window, seed, features, learned, ready}`.
    pub fn to_map(&self) -> Map {
        let p = &self.params;
        let mut m = Map::new();
        m.insert("trees".into(), (p.trees as INT).into());
        m.insert("height".into(), (p.height as INT).into());
        m.insert("window".into(), (p.window as INT).into());
        m.insert("seed".into(), num::int(p.seed).into());
        let features: Array = self
            .features
            .iter()
            .map(|f| Dynamic::from(f.to_string()))
            .collect();
        m.insert("features".into(), features.into());
        m.insert("learned".into(), num::int(self.learned).into());
        m.insert("ready".into(), (!self.first_window).into());
        m
    }
}

/// River's `make_padded_tree`, in pre-order, into the heap-ordered `tree` from node `k`.
fn grow(tree: &mut [Node], k: usize, height: usize, limits: &mut [(f64, f64)], rng: &mut PyRandom) {
    if height == 0 {
        return;
    }
    let widths: Vec<f64> = limits.iter().map(|(a, b)| b - a).collect();
    let on = rng.weighted_index(&widths);
    let (a, b) = limits[on];
    let at = rng.uniform(a + PADDING * (b - a), b - PADDING * (b - a));
    tree[k] = Node {
        threshold: at,
        feature: on as u32,
        l_mass: 0,
        r_mass: 0,
    };
    limits[on] = (a, at);
    grow(tree, 2 * k + 1, height - 1, limits, rng);
    limits[on] = (at, b);
    grow(tree, 2 * k + 2, height - 1, limits, rng);
    limits[on] = (a, b);
}

/// The child of branch `k` that `vals` goes to.
fn next(tree: &[Node], k: usize, vals: &[f64]) -> usize {
    let node = &tree[k];
    let (left, right) = (2 * k + 1, 2 * k + 2);
    let v = vals[node.feature as usize];
    if v.is_nan() {
        if tree[left].l_mass < tree[right].l_mass {
            right
        } else {
            left
        }
    } else if v < node.threshold {
        left
    } else {
        right
    }
}

/// River's `_walk_score`.
fn walk_score(tree: &[Node], vals: &[f64], height: usize, size_limit: f64) -> f64 {
    let mut k = 0;
    let mut depth_pow = 1.0;
    let mut score = 0.0;
    for _ in 0..height {
        let r = f64::from(tree[k].r_mass);
        score += r * depth_pow;
        if r < size_limit {
            return score;
        }
        k = next(tree, k, vals);
        depth_pow *= 2.0;
    }
    score + f64::from(tree[k].r_mass) * depth_pow
}

/// The methods that take a feature vector, for vectors of type `X`.
pub(crate) fn register<X: Features>(m: &mut dyn features::Sink) {
    features::set_mut::<Hst, X>(m, "learn", |h, x, _| h.learn(x).map(|()| Dynamic::UNIT));
    features::set_pure::<Hst, X>(m, "score", |h, x| h.score(x).map(Dynamic::from_float));
}

fn parse_limits(v: &Dynamic) -> Res<Vec<(String, f64, f64)>> {
    let ctx = "hst(opts): option `limits`";
    let Some(map) = v.read_lock::<Map>() else {
        return num::err(format!(
            "{ctx}: expected a map of feature name to [low, high], got {}",
            num::type_of(v)
        ));
    };
    let mut out = Vec::new();
    for (name, pair) in map.iter() {
        let bad = || {
            num::err(format!(
                "{ctx}: `{name}` must be [low, high] with finite numbers and low < high"
            ))
        };
        let Some(arr) = pair.read_lock::<Array>() else {
            return bad();
        };
        if arr.len() != 2 {
            return bad();
        }
        let (Ok(lo), Ok(hi)) = (num::finite(&arr[0], ctx), num::finite(&arr[1], ctx)) else {
            return bad();
        };
        if lo >= hi {
            return bad();
        }
        out.push((name.to_string(), lo, hi));
    }
    Ok(out)
}

/// Rhai functions of `hst` that take no feature vector.
#[export_module(manifest)]
pub mod hst_functions {
    use super::*;

    /// Half-Space Trees with River's defaults (`trees: 10, height: 8, window: 250`), seed 42,
    /// every feature scaled by the range seen so far.
    ///
    /// ```rhai
    /// let h = hst();
    /// h.learn(#{ temp: 21.0, load: 0.4 });
    /// let s = h.score(#{ temp: 80.0, load: 0.9 });
    /// ```
    #[rhai_fn(name = "hst", return_raw)]
    pub fn new_hst() -> Res<Hst> {
        let made: Res<Hst> = Hst::new(HstParams::default(), &[]);
        made.and_then(crate::charged)
    }

    /// Half-Space Trees with options: `trees`, `height`, `window`, `seed`, and `limits`, a
    /// map of feature name to `[low, high]` used to scale that feature to [0, 1].
    ///
    /// ```rhai
    /// let h = hst(#{ trees: 25, height: 15, window: 250, seed: 42,
    ///                limits: #{ temp: [0, 120], load: [0, 1] } });
    /// ```
    #[rhai_fn(name = "hst", return_raw)]
    pub fn new_hst_with(opts: Map) -> Res<Hst> {
        let made = (|| -> Res<Hst> {
            let ctx = "hst(opts)";
            let o = Options::new(&opts, ctx, &["trees", "height", "window", "seed", "limits"])?;
            let d = HstParams::default();
            let params = HstParams {
                trees: o.size("trees", d.trees, 1, 1000)?,
                height: o.size("height", d.height, 1, 20)?,
                window: o.size("window", d.window, 1, 1 << 30)?,
                seed: o.size("seed", d.seed as usize, 0, i64::MAX as usize)? as u64,
            };
            let limits = match o.get("limits") {
                None => Vec::new(),
                Some(v) => parse_limits(v)?,
            };
            Hst::new(params, &limits)
        })();
        made.and_then(crate::charged)
    }

    /// Whether the first window is complete (before, `score` is 0.0).
    ///
    /// ```rhai
    /// if h.ready { emit(h.score(x)) }
    /// ```
    #[rhai_fn(get = "ready", pure)]
    pub fn ready(h: &mut Hst) -> bool {
        !h.first_window
    }

    /// Number of `learn` calls so far.
    ///
    /// ```rhai
    /// print(h.count);
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(h: &mut Hst) -> INT {
        num::int(h.learned)
    }

    /// `#{trees, height, window, seed, features, learned, ready}`.
    ///
    /// ```rhai
    /// emit(h.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(h: &mut Hst) -> Map {
        h.to_map()
    }

    /// Text form, e.g. `hst#{...}`.
    ///
    /// ```rhai
    /// print(h);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(h: &mut Hst) -> String {
        format!("hst{}", Dynamic::from_map(h.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// A plain recursive Half-Space Tree over one feature, with explicit nodes, following the
    /// paper's definitions, to check the flat heap-ordered implementation.
    #[derive(Debug)]
    enum Plain {
        Leaf {
            l: u32,
            r: u32,
        },
        Branch {
            at: f64,
            l: u32,
            r: u32,
            kids: Box<[Plain; 2]>,
        },
    }

    impl Plain {
        fn from_flat(tree: &[Node], k: usize, height: usize) -> Plain {
            if height == 0 {
                return Plain::Leaf { l: 0, r: 0 };
            }
            Plain::Branch {
                at: tree[k].threshold,
                l: 0,
                r: 0,
                kids: Box::new([
                    Plain::from_flat(tree, 2 * k + 1, height - 1),
                    Plain::from_flat(tree, 2 * k + 2, height - 1),
                ]),
            }
        }

        fn learn(&mut self, x: f64) {
            match self {
                Plain::Leaf { l, .. } => *l += 1,
                Plain::Branch { at, l, kids, .. } => {
                    *l += 1;
                    kids[usize::from(x >= *at)].learn(x);
                }
            }
        }

        fn pivot(&mut self) {
            match self {
                Plain::Leaf { l, r } | Plain::Branch { l, r, .. } => {
                    *r = *l;
                    *l = 0;
                }
            }
            if let Plain::Branch { kids, .. } = self {
                kids[0].pivot();
                kids[1].pivot();
            }
        }

        fn score(&self, x: f64, depth: u32, limit: f64) -> f64 {
            match self {
                Plain::Leaf { r, .. } => f64::from(*r) * 2f64.powi(depth as i32),
                Plain::Branch { at, r, kids, .. } => {
                    let here = f64::from(*r) * 2f64.powi(depth as i32);
                    if f64::from(*r) < limit {
                        here
                    } else {
                        here + kids[usize::from(x >= *at)].score(x, depth + 1, limit)
                    }
                }
            }
        }
    }

    #[test]
    fn scores_equal_a_plain_tree_walk() {
        let (trees, height, window) = (3, 4, 20);
        let mut rng = Lcg::new(3);
        let xs: Vec<f64> = (0..130).map(|_| rng.range(10.0, 20.0)).collect();
        let h: Dynamic = eval_with(
            "let h = hst(#{ trees: 3, height: 4, window: 20, seed: 5, limits: #{ v: [10, 20] } });
             for x in xs { h.learn(#{ v: x }) } h",
            vec![("xs", floats(&xs))],
        );
        let h = h.cast::<Hst>();
        let per_tree = (1 << (height + 1)) - 1;
        let mut plain: Vec<Plain> = (0..trees)
            .map(|t| Plain::from_flat(&h.nodes[t * per_tree..], 0, height))
            .collect();
        for (i, x) in xs.iter().enumerate() {
            let s = (x - 10.0) / 10.0;
            plain.iter_mut().for_each(|p| p.learn(s));
            if (i + 1) % window == 0 {
                plain.iter_mut().for_each(|p| p.pivot());
            }
        }
        let max = (trees * window) as f64 * ((1 << (height + 1)) - 1) as f64;
        for probe in [9.0, 10.5, 13.3, 15.0, 19.9, 25.0] {
            let s = (probe - 10.0) / 10.0;
            let want = 1.0
                - plain
                    .iter()
                    .map(|p| p.score(s, 0, 0.1 * window as f64))
                    .sum::<f64>()
                    / max;
            let mut m = Map::new();
            m.insert("v".into(), probe.into());
            assert_close(h.score(&m).unwrap(), want, 1e-12);
        }
    }

    #[test]
    fn outliers_score_higher_and_the_first_window_scores_zero() {
        let out: rhai::Array = eval(
            "let h = hst(#{ window: 100, height: 4 }); let before = 0.0; let normal = 0.0; let odd = 0.0;
             for i in 0..400 {
                 let x = #{ a: 50 + (i * 37 % 11), b: 5 + (i * 13 % 7) };
                 if i == 50 { before = h.score(#{ a: 500, b: -40 }) }
                 h.learn(x);
             }
             normal = h.score(#{ a: 55, b: 8 });
             odd = h.score(#{ a: 60, b: -30 });
             [before, normal, odd, h.ready]",
        );
        assert_eq!(f(&out[0]), 0.0);
        let (normal, odd) = (f(&out[1]), f(&out[2]));
        assert!((0.0..=1.0).contains(&normal) && (0.0..=1.0).contains(&odd));
        assert!(odd > normal + 0.05, "normal {normal}, odd {odd}");
        assert!(out[3].as_bool().unwrap());
    }

    #[test]
    fn same_seed_same_trees_and_different_seed_differs() {
        let a: Hst = eval("let h = hst(#{ seed: 1 }); h.learn(#{ x: 0.5, y: 0.2 }); h");
        let b: Hst = eval("let h = hst(#{ seed: 1 }); h.learn(#{ y: 0.2, x: 0.5 }); h");
        let c: Hst = eval("let h = hst(#{ seed: 2 }); h.learn(#{ x: 0.5, y: 0.2 }); h");
        assert!(a == b, "the order of the features must not matter");
        assert!(a.nodes != c.nodes, "another seed must build other trees");
        assert!(round_trip(&a) == a, "round trip");
        assert!(a.heap_bytes() >= 10 * 511 * std::mem::size_of::<Node>());
    }

    #[test]
    fn missing_features_follow_the_busier_child() {
        // Only `x` was seen; scoring without it must not fail and stays in [0, 1].
        let s: rhai::FLOAT = eval(
            "let h = hst(#{ window: 10 }); for i in 0..30 { h.learn(#{ x: i % 10, y: 1 }) }
             h.score(#{ y: 1 })",
        );
        assert!((0.0..=1.0).contains(&s), "{s}");
    }

    #[test]
    fn bad_options_are_errors() {
        for (script, needle) in [
            ("hst(#{ trees: 0 })", "trees"),
            ("hst(#{ height: 21 })", "height"),
            ("hst(#{ trees: 1000, height: 20 })", "nodes"),
            ("hst(#{ limits: #{ x: [1, 1] } })", "low < high"),
            ("hst(#{ limits: #{ x: 5 } })", "[low, high]"),
            ("hst(#{ limits: [1, 2] })", "map"),
            ("hst(#{ size: 3 })", "unknown option"),
        ] {
            let e = eval_err(script);
            assert!(e.contains(needle), "{script}: {e}");
        }
        let e = eval_err("let h = hst(); h.learn(#{})");
        assert!(e.contains("at least one feature"), "{e}");
    }
}
