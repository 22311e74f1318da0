//! `kmeans(k, opts)`: streaming k-means, River's `cluster.KMeans`, with its update rule and
//! defaults.
//!
//! Each of the `k` centers holds one coordinate per feature. `predict(x)` is the index of the
//! center nearest to `x` by `Σ |cᵢ - xᵢ|^p` over the features of the center and of `x` (a
//! feature absent from `x` counts as 0, as in River). `learn(x)` moves that center toward `x`:
//! `cᵢ += halflife · (xᵢ - cᵢ)` for every feature of `x`.
//!
//! A center's coordinate of a feature it has not seen yet starts at a draw from
//! `Normal(mu, sigma)`, as in River. River draws these lazily from one generator, in an order
//! that depends on Python's set iteration; eddy derives each draw from `(seed, center, feature
//! name)` alone, so the same coordinate is the same whichever event first names the feature,
//! `predict` never changes the state, and runs repeat exactly.

use rhai::plugin::*;
use rhai::{Array, Map, INT};
use serde::{Deserialize, Serialize};

use crate::features::{self, Features, Options, Table};
use crate::num::{self, Res};

/// Most centers one `kmeans` may have.
pub const MAX_CLUSTERS: usize = 1000;

/// Hyper-parameters (River's names in the README).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KMeansParams {
    /// Number of centers (River: `n_clusters`), default 5.
    pub k: usize,
    /// Share of the distance a center moves toward each point it wins (River: `halflife`),
    /// default 0.5.
    pub halflife: f64,
    /// Mean of the initial coordinates (River: `mu`), default 0.0.
    pub mu: f64,
    /// Standard deviation of the initial coordinates (River: `sigma`), default 1.0.
    pub sigma: f64,
    /// Power of the distance (River: `p`), default 2.
    pub p: f64,
    /// Seed of the initial coordinates (River: `seed`, default `None`); default 42.
    pub seed: u64,
}

impl Default for KMeansParams {
    fn default() -> Self {
        KMeansParams {
            k: 5,
            halflife: 0.5,
            mu: 0.0,
            sigma: 1.0,
            p: 2.0,
            seed: 42,
        }
    }
}

/// A streaming k-means model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KMeans {
    params: KMeansParams,
    centers: Vec<Table<f64>>,
    learned: u64,
}

/// SplitMix64: one well-mixed 64-bit value from another.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl KMeans {
    pub fn new(params: KMeansParams) -> Self {
        KMeans {
            params,
            centers: vec![Table::new(); params.k],
            learned: 0,
        }
    }

    /// The initial coordinate of `feature` in center `c`: Box-Muller on two uniforms drawn
    /// from a hash of `(seed, c, feature)`.
    fn initial(&self, c: usize, feature: &str) -> f64 {
        // FNV-1a of the name, then mixed with the seed and the center.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in feature.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let a = mix(h ^ mix(self.params.seed ^ mix(c as u64)));
        let b = mix(a);
        let u1 = ((a >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // (0, 1]
        let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        self.params.mu + self.params.sigma * z
    }

    fn distance(&self, c: usize, x: &[(&str, f64)]) -> f64 {
        let p = self.params.p;
        let pow = |d: f64| if p == 2.0 { d * d } else { d.abs().powf(p) };
        let center = &self.centers[c];
        let mut total = 0.0;
        // Both sorted by name: walk them together.
        let mut xs = x.iter().peekable();
        for (name, &ci) in center.iter() {
            while let Some(&&(xn, xv)) = xs.peek() {
                if xn < name {
                    total += pow(self.initial(c, xn) - xv);
                    xs.next();
                } else {
                    break;
                }
            }
            match xs.peek() {
                Some(&&(xn, xv)) if xn == name => {
                    total += pow(ci - xv);
                    xs.next();
                }
                _ => total += pow(ci),
            }
        }
        for &(xn, xv) in xs {
            total += pow(self.initial(c, xn) - xv);
        }
        total
    }

    fn nearest(&self, x: &[(&str, f64)]) -> usize {
        let mut best = (0, f64::INFINITY);
        for c in 0..self.centers.len() {
            let d = self.distance(c, x);
            // Strictly smaller: ties go to the lowest index, as Python's `min`.
            if d < best.1 {
                best = (c, d);
            }
        }
        best.0
    }

    /// `x` as (name, value) pairs sorted by name, duplicates dropped.
    fn sorted<'a, X: Features>(
        x: &X,
        ctx: &str,
        names: &'a mut Vec<(String, f64)>,
    ) -> Res<Vec<(&'a str, f64)>> {
        x.each(ctx, &mut |n, v| {
            names.push((n.to_owned(), v));
            Ok(())
        })?;
        names.sort_by(|a, b| a.0.cmp(&b.0));
        names.dedup_by(|a, b| a.0 == b.0);
        Ok(names.iter().map(|(n, v)| (n.as_str(), *v)).collect())
    }

    pub fn predict<X: Features>(&self, x: &X) -> Res<usize> {
        let mut buf = Vec::new();
        let x = Self::sorted(x, "kmeans.predict", &mut buf)?;
        Ok(self.nearest(&x))
    }

    /// Moves the nearest center toward `x`; returns its index.
    pub fn learn<X: Features>(&mut self, x: &X) -> Res<usize> {
        let ctx = "kmeans.learn";
        let mut buf = Vec::new();
        let x = Self::sorted(x, ctx, &mut buf)?;
        let c = self.nearest(&x);
        let halflife = self.params.halflife;
        for &(name, xv) in &x {
            let init = self.initial(c, name);
            let ci = self.centers[c].entry_or(name, ctx, || init)?;
            *ci += halflife * (xv - *ci);
        }
        self.learned += 1;
        Ok(c)
    }

    /// The centers, each a map of feature name to coordinate.
    pub fn centers(&self) -> Array {
        self.centers
            .iter()
            .map(|c| {
                let m: Map = c
                    .iter()
                    .map(|(n, v)| (n.into(), Dynamic::from_float(*v)))
                    .collect();
                Dynamic::from_map(m)
            })
            .collect()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.centers.capacity() * std::mem::size_of::<Table<f64>>()
            + self.centers.iter().map(Table::heap_bytes).sum::<usize>()
    }

    /// `#{k, halflife, p, learned, centers}`.
    pub fn to_map(&self) -> Map {
        let mut m = Map::new();
        m.insert("k".into(), (self.params.k as INT).into());
        m.insert("halflife".into(), self.params.halflife.into());
        m.insert("p".into(), self.params.p.into());
        m.insert("learned".into(), num::int(self.learned).into());
        m.insert("centers".into(), self.centers().into());
        m
    }
}

/// The methods that take a feature vector, for vectors of type `X`.
pub(crate) fn register<X: Features>(m: &mut dyn features::Sink) {
    features::set_mut::<KMeans, X>(m, "learn", |k, x, _| {
        Ok(Dynamic::from_int(k.learn(x)? as INT))
    });
    features::set_pure::<KMeans, X>(m, "predict", |k, x| {
        Ok(Dynamic::from_int(k.predict(x)? as INT))
    });
}

fn build(k: &Dynamic, opts: &Map) -> Res<KMeans> {
    let ctx = "kmeans(k, opts)";
    let o = Options::new(opts, ctx, &["halflife", "mu", "sigma", "p", "seed"])?;
    let d = KMeansParams::default();
    Ok(KMeans::new(KMeansParams {
        k: num::size(k, "kmeans(k)", 1, MAX_CLUSTERS)?,
        halflife: o.number("halflife", d.halflife, 0.0, 1.0)?,
        mu: o.number("mu", d.mu, -1e300, 1e300)?,
        sigma: o.number("sigma", d.sigma, 0.0, 1e300)?,
        p: o.number("p", d.p, 1.0, 64.0)?,
        seed: o.size("seed", d.seed as usize, 0, i64::MAX as usize)? as u64,
    }))
}

/// Rhai functions of `kmeans` that take no feature vector.
#[export_module(manifest)]
pub mod kmeans_functions {
    use super::*;

    /// Streaming k-means with `k` centers and River's defaults
    /// (`halflife: 0.5, mu: 0.0, sigma: 1.0, p: 2`), seed 42.
    ///
    /// ```rhai
    /// let km = kmeans(3);
    /// let cluster = km.learn(#{ x: 1.0, y: 2.0 });
    /// ```
    #[rhai_fn(name = "kmeans", return_raw)]
    pub fn new_kmeans(k: Dynamic) -> Res<KMeans> {
        let made: Res<KMeans> = build(&k, &Map::new());
        made.and_then(crate::charged)
    }

    /// Streaming k-means with options: `halflife`, `mu`, `sigma`, `p`, `seed`.
    ///
    /// ```rhai
    /// let km = kmeans(4, #{ halflife: 0.1, sigma: 3.0, seed: 7 });
    /// ```
    #[rhai_fn(name = "kmeans", return_raw)]
    pub fn new_kmeans_with(k: Dynamic, opts: Map) -> Res<KMeans> {
        let made: Res<KMeans> = build(&k, &opts);
        made.and_then(crate::charged)
    }

    /// The centers: an array of `k` maps of feature name to coordinate.
    ///
    /// ```rhai
    /// for c in km.centers() { print(c) }
    /// ```
    #[rhai_fn(name = "centers", pure)]
    pub fn centers(k: &mut KMeans) -> Array {
        k.centers()
    }

    /// Number of `learn` calls so far.
    ///
    /// ```rhai
    /// print(km.count);
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn count(k: &mut KMeans) -> INT {
        num::int(k.learned)
    }

    /// `#{k, halflife, p, learned, centers}`.
    ///
    /// ```rhai
    /// emit(km.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn to_map(k: &mut KMeans) -> Map {
        k.to_map()
    }

    /// Text form, e.g. `kmeans#{...}`.
    ///
    /// ```rhai
    /// print(km);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn to_string(k: &mut KMeans) -> String {
        format!("kmeans{}", Dynamic::from_map(k.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn center(out: &Array, c: usize) -> Map {
        out[c].clone().cast::<Map>()
    }

    #[test]
    fn steps_computed_by_hand() {
        // sigma 0: every center starts at the origin; ties go to the lowest index.
        let out: Array = eval(
            "let km = kmeans(3, #{ halflife: 0.25, sigma: 0.0 });
             let w1 = km.learn(#{ a: 4.0, b: -1 });
             let w2 = km.learn(#{ a: -4, b: 1.0 });
             let w3 = km.learn(#{ a: 2.0, b: 0.0 });
             [w1, w2, w3, km.centers(), km.predict(#{ a: -1.0, b: 0.25 }), km.predict(#{ c: 9 })]",
        );
        let won: Vec<i64> = (0..3).map(|i| out[i].as_int().unwrap()).collect();
        // Step 1: all at the origin, center 0 wins and moves to (1, -0.25).
        // Step 2: center 0 is at 25 + 1.5625, centers 1 and 2 at 16 + 1: center 1 wins, moves
        // to (-1, 0.25).
        // Step 3: center 0 at 1 + 0.0625, center 1 at 9 + 0.0625, center 2 at 4: center 0
        // wins, moves to (1 + 0.25, -0.25 + 0.0625).
        assert_eq!(won, vec![0, 1, 0]);
        let centers = out[3].clone().cast::<Array>();
        let c0 = center(&centers, 0);
        assert_eq!((f(&c0["a"]), f(&c0["b"])), (1.25, -0.1875));
        let c1 = center(&centers, 1);
        assert_eq!((f(&c1["a"]), f(&c1["b"])), (-1.0, 0.25));
        assert!(center(&centers, 2).is_empty());
        assert_eq!(out[4].as_int().unwrap(), 1);
        // `c` is new to every center (initial 0): all three see 81, plus |c|^2 of the features
        // they have and x lacks, so the empty center 2 is nearest.
        assert_eq!(out[5].as_int().unwrap(), 2);
    }

    #[test]
    fn finds_three_separated_clusters() {
        let mut rng = Lcg::new(11);
        let truth = [(-10.0, 0.0), (0.0, 10.0), (10.0, -5.0)];
        let mut xs = Vec::new();
        for i in 0..900 {
            let (cx, cy) = truth[i % 3];
            xs.push(cx + rng.range(-1.0, 1.0));
            xs.push(cy + rng.range(-1.0, 1.0));
        }
        let out: Array = eval_with(
            "let km = kmeans(3, #{ halflife: 0.05, sigma: 10.0, seed: 3 });
             let i = 0; while i < xs.len() { km.learn(#{ x: xs[i], y: xs[i + 1] }); i += 2; }
             [km.centers(), km.predict(#{ x: -10, y: 0 }), km.predict(#{ x: 0, y: 10 }), km.predict(#{ x: 10, y: -5 })]",
            vec![("xs", floats(&xs))],
        );
        let centers = out[0].clone().cast::<Array>();
        let picks: Vec<usize> = (1..4).map(|i| out[i].as_int().unwrap() as usize).collect();
        let mut distinct = picks.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{picks:?}");
        for (t, &c) in truth.iter().zip(&picks) {
            let m = center(&centers, c);
            assert!(
                (f(&m["x"]) - t.0).abs() < 1.5 && (f(&m["y"]) - t.1).abs() < 1.5,
                "{m:?} vs {t:?}"
            );
        }
    }

    #[test]
    fn initial_coordinates_are_normal_and_stable() {
        let km = KMeans::new(KMeansParams {
            mu: 3.0,
            sigma: 2.0,
            ..KMeansParams::default()
        });
        let draws: Vec<f64> = (0..4000)
            .map(|i| km.initial(i % 5, &format!("f{i}")))
            .collect();
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let sd = (draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (mean - 3.0).abs() < 0.15 && (sd - 2.0).abs() < 0.15,
            "{mean} {sd}"
        );
        assert_eq!(km.initial(2, "temp"), km.initial(2, "temp"));
        assert_ne!(km.initial(2, "temp"), km.initial(3, "temp"));
    }

    #[test]
    fn predict_does_not_change_state_and_state_round_trips() {
        let km: KMeans = eval("let km = kmeans(2); km.learn([1, 2]); km.predict(#{ z: 5 }); km");
        let again: KMeans = eval("let km = kmeans(2); km.learn([1, 2]); km");
        assert_eq!(km, again);
        assert_eq!(round_trip(&km), km);
        for (script, needle) in [
            ("kmeans(0)", "kmeans(k)"),
            ("kmeans(2, #{ halflife: 2 })", "halflife"),
            ("kmeans(2, #{ q: 1 })", "unknown option"),
        ] {
            let e = eval_err(script);
            assert!(e.contains(needle), "{script}: {e}");
        }
    }
}
