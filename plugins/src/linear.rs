//! `linreg(opts)` and `logreg(opts)`: online linear and logistic regression trained by
//! stochastic gradient descent, one event at a time, with River's update rule and defaults
//! (`linear_model.LinearRegression` and `linear_model.LogisticRegression` with
//! `optim.SGD(lr)`), so that a River pipeline moves over with the same numbers.
//!
//! For a feature vector `x` and target `y`, with `p = intercept + Σ wᵢxᵢ` (absent weights are 0):
//!
//! ```text
//! g = clamp(loss'(y, p), ±clip_gradient)
//! intercept -= intercept_lr * g
//! wᵢ -= lr * (xᵢ * g + l2 * wᵢ)      for every feature i of x
//! ```
//!
//! where `loss'` is `2 (p - y)` for linreg (squared loss) and, for logreg (log loss, label
//! `y` mapped to ±1), `-y / (exp(y p) + 1)` with River's cut-offs at `|y p| > 18`.
//! logreg predicts `sigmoid(p)` (0 below -30, 1 above 30, as River).
//!
//! State: the weights per feature name ([`Table`]), the intercept, the hyper-parameters and a
//! count of updates; it serializes as plain data.

use rhai::plugin::*;
use rhai::{Map, FLOAT, INT};
use serde::{Deserialize, Serialize};

use crate::features::{self, Features, Options, Table};
use crate::num::{self, Res};

/// Hyper-parameters of a linear model (River's names in the README).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlmParams {
    /// SGD learning rate of the weights (River: `optimizer=optim.SGD(lr)`), default 0.01.
    pub lr: f64,
    /// L2 penalty (River: `l2`), default 0.0.
    pub l2: f64,
    /// Learning rate of the intercept (River: `intercept_lr`), default 0.01.
    pub intercept_lr: f64,
    /// Starting intercept (River: `intercept_init`), default 0.0.
    pub intercept_init: f64,
    /// Largest absolute loss gradient (River: `clip_gradient`), default 1e12.
    pub clip_gradient: f64,
}

impl Default for GlmParams {
    fn default() -> Self {
        GlmParams {
            lr: 0.01,
            l2: 0.0,
            intercept_lr: 0.01,
            intercept_init: 0.0,
            clip_gradient: 1e12,
        }
    }
}

const OPTIONS: [&str; 5] = [
    "lr",
    "l2",
    "intercept_lr",
    "intercept_init",
    "clip_gradient",
];

impl GlmParams {
    fn from_map(opts: &Map, ctx: &str) -> Res<Self> {
        let o = Options::new(opts, ctx, &OPTIONS)?;
        let d = GlmParams::default();
        Ok(GlmParams {
            lr: o.number("lr", d.lr, 0.0, 1e6)?,
            l2: o.number("l2", d.l2, 0.0, 1e6)?,
            intercept_lr: o.number("intercept_lr", d.intercept_lr, 0.0, 1e6)?,
            intercept_init: o.number("intercept_init", d.intercept_init, -1e300, 1e300)?,
            clip_gradient: o.number("clip_gradient", d.clip_gradient, 0.0, f64::MAX)?,
        })
    }
}

/// The model shared by both: weights, intercept, parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Glm {
    params: GlmParams,
    weights: Table<f64>,
    intercept: f64,
    updates: u64,
}

impl Glm {
    fn new(params: GlmParams) -> Self {
        Glm {
            params,
            weights: Table::new(),
            intercept: params.intercept_init,
            updates: 0,
        }
    }

    /// `intercept + Σ wᵢxᵢ`.
    fn raw<X: Features>(&self, x: &X, ctx: &str) -> Res<f64> {
        let mut p = self.intercept;
        x.each(ctx, &mut |name, xi| {
            if let Some(w) = self.weights.get(name) {
                p += w * xi;
            }
            Ok(())
        })?;
        Ok(p)
    }

    /// One SGD step with loss gradient `grad(p)`.
    fn step<X: Features>(&mut self, x: &X, ctx: &str, grad: impl Fn(f64) -> f64) -> Res<()> {
        let p = self.raw(x, ctx)?;
        let clip = self.params.clip_gradient;
        let g = grad(p).clamp(-clip, clip);
        if !g.is_finite() {
            return num::err(format!(
                "{ctx}: the gradient is not finite (prediction {p}); lower `lr`"
            ));
        }
        let GlmParams { lr, l2, .. } = self.params;
        let weights = &mut self.weights;
        x.each(ctx, &mut |name, xi| {
            let w = weights.entry(name, ctx)?;
            *w -= lr * (xi * g + l2 * *w);
            Ok(())
        })?;
        self.intercept -= self.params.intercept_lr * g;
        self.updates += 1;
        Ok(())
    }

    fn weights_map(&self) -> Map {
        self.weights
            .iter()
            .map(|(n, w)| (n.into(), Dynamic::from_float(*w)))
            .collect()
    }

    fn to_map(&self) -> Map {
        let p = &self.params;
        let mut m = Map::new();
        m.insert("weights".into(), self.weights_map().into());
        m.insert("intercept".into(), self.intercept.into());
        m.insert("updates".into(), num::int(self.updates).into());
        m.insert("lr".into(), p.lr.into());
        m.insert("l2".into(), p.l2.into());
        m.insert("intercept_lr".into(), p.intercept_lr.into());
        m
    }

    fn heap_bytes(&self) -> usize {
        self.weights.heap_bytes()
    }
}

/// Online linear regression (squared loss).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinReg(Glm);

/// Online logistic regression (log loss), for labels `true`/`false` or 1/0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogReg(Glm);

/// River's `utils.math.sigmoid`.
fn sigmoid(x: f64) -> f64 {
    if x < -30.0 {
        0.0
    } else if x > 30.0 {
        1.0
    } else {
        1.0 / (1.0 + (-x).exp())
    }
}

/// River's `optim.losses.Log().gradient` for a label mapped to ±1.
fn log_loss_gradient(label: bool, p: f64) -> f64 {
    let y = if label { 1.0 } else { -1.0 };
    let z = p * y;
    if z > 18.0 {
        (-z).exp() * -y
    } else if z < -18.0 {
        -y
    } else {
        -y / (z.exp() + 1.0)
    }
}

impl LinReg {
    pub fn new(params: GlmParams) -> Self {
        LinReg(Glm::new(params))
    }

    pub fn learn<X: Features>(&mut self, x: &X, y: f64) -> Res<()> {
        self.0.step(x, "linreg.learn", |p| 2.0 * (p - y))
    }

    pub fn predict<X: Features>(&self, x: &X) -> Res<f64> {
        self.0.raw(x, "linreg.predict")
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }

    /// `#{weights, intercept, updates, lr, l2, intercept_lr}`.
    pub fn to_map(&self) -> Map {
        self.0.to_map()
    }
}

impl LogReg {
    pub fn new(params: GlmParams) -> Self {
        LogReg(Glm::new(params))
    }

    pub fn learn<X: Features>(&mut self, x: &X, label: bool) -> Res<()> {
        self.0
            .step(x, "logreg.learn", |p| log_loss_gradient(label, p))
    }

    pub fn predict_proba<X: Features>(&self, x: &X) -> Res<f64> {
        Ok(sigmoid(self.0.raw(x, "logreg.predict_proba")?))
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }

    /// `#{weights, intercept, updates, lr, l2, intercept_lr}`.
    pub fn to_map(&self) -> Map {
        self.0.to_map()
    }
}

/// The methods that take a feature vector, for vectors of type `X`.
pub(crate) fn register<X: Features>(m: &mut dyn features::Sink) {
    features::set_mut2::<LinReg, X>(m, "learn", |r, x, y| {
        let y = num::finite(features::target(y), "linreg.learn(x, y)")?;
        r.learn(x, y).map(|()| Dynamic::UNIT)
    });
    features::set_pure::<LinReg, X>(m, "predict", |r, x| r.predict(x).map(Dynamic::from_float));
    features::set_mut2::<LogReg, X>(m, "learn", |r, x, y| {
        let label = features::label(features::target(y), "logreg.learn(x, label)")?;
        r.learn(x, label).map(|()| Dynamic::UNIT)
    });
    features::set_pure::<LogReg, X>(m, "predict_proba", |r, x| {
        r.predict_proba(x).map(Dynamic::from_float)
    });
    features::set_pure::<LogReg, X>(m, "predict", |r, x| {
        Ok(Dynamic::from_bool(r.predict_proba(x)? > 0.5))
    });
}

/// Rhai functions of `linreg` and `logreg` that take no feature vector.
#[export_module(manifest)]
pub mod linear_functions {
    use super::*;

    /// Online linear regression with River's defaults
    /// (`lr: 0.01, l2: 0.0, intercept_lr: 0.01, intercept_init: 0.0, clip_gradient: 1e12`).
    ///
    /// ```rhai
    /// let m = linreg();
    /// m.learn(#{ x: 1.0 }, 3.0);
    /// print(m.predict(#{ x: 2.0 }));
    /// ```
    #[rhai_fn(name = "linreg")]
    pub fn new_linreg() -> LinReg {
        LinReg::new(GlmParams::default())
    }

    /// Online linear regression with the given options (any of `lr`, `l2`, `intercept_lr`,
    /// `intercept_init`, `clip_gradient`).
    ///
    /// ```rhai
    /// let m = linreg(#{ lr: 0.05, l2: 0.001 });
    /// ```
    #[rhai_fn(name = "linreg", return_raw)]
    pub fn new_linreg_with(opts: Map) -> Res<LinReg> {
        let made =
            (|| -> Res<LinReg> { Ok(LinReg::new(GlmParams::from_map(&opts, "linreg(opts)")?)) })();
        made.and_then(crate::charged)
    }

    /// Online logistic regression with River's defaults (as `linreg`).
    ///
    /// ```rhai
    /// let m = logreg();
    /// m.learn(#{ x: 1.0 }, true);
    /// print(m.predict_proba(#{ x: 1.0 }));
    /// ```
    #[rhai_fn(name = "logreg")]
    pub fn new_logreg() -> LogReg {
        LogReg::new(GlmParams::default())
    }

    /// Online logistic regression with the given options (as `linreg(opts)`).
    ///
    /// ```rhai
    /// let m = logreg(#{ lr: 0.1 });
    /// ```
    #[rhai_fn(name = "logreg", return_raw)]
    pub fn new_logreg_with(opts: Map) -> Res<LogReg> {
        let made =
            (|| -> Res<LogReg> { Ok(LogReg::new(GlmParams::from_map(&opts, "logreg(opts)")?)) })();
        made.and_then(crate::charged)
    }

    /// The weights by feature name.
    ///
    /// ```rhai
    /// let w = m.weights();   // #{ x: 0.06 }
    /// ```
    #[rhai_fn(name = "weights", pure)]
    pub fn linreg_weights(r: &mut LinReg) -> Map {
        r.0.weights_map()
    }

    /// The weights by feature name.
    ///
    /// ```rhai
    /// let w = m.weights();
    /// ```
    #[rhai_fn(name = "weights", pure)]
    pub fn logreg_weights(r: &mut LogReg) -> Map {
        r.0.weights_map()
    }

    /// The intercept.
    ///
    /// ```rhai
    /// print(m.intercept);
    /// ```
    #[rhai_fn(get = "intercept", pure)]
    pub fn linreg_intercept(r: &mut LinReg) -> FLOAT {
        r.0.intercept
    }

    /// The intercept.
    ///
    /// ```rhai
    /// print(m.intercept);
    /// ```
    #[rhai_fn(get = "intercept", pure)]
    pub fn logreg_intercept(r: &mut LogReg) -> FLOAT {
        r.0.intercept
    }

    /// Number of `learn` calls so far.
    ///
    /// ```rhai
    /// print(m.count);
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn linreg_count(r: &mut LinReg) -> INT {
        num::int(r.0.updates)
    }

    /// Number of `learn` calls so far.
    ///
    /// ```rhai
    /// print(m.count);
    /// ```
    #[rhai_fn(get = "count", pure)]
    pub fn logreg_count(r: &mut LogReg) -> INT {
        num::int(r.0.updates)
    }

    /// `#{weights, intercept, updates, lr, l2, intercept_lr}`.
    ///
    /// ```rhai
    /// emit(m.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn linreg_to_map(r: &mut LinReg) -> Map {
        r.to_map()
    }

    /// `#{weights, intercept, updates, lr, l2, intercept_lr}`.
    ///
    /// ```rhai
    /// emit(m.to_map());
    /// ```
    #[rhai_fn(name = "to_map", pure)]
    pub fn logreg_to_map(r: &mut LogReg) -> Map {
        r.to_map()
    }

    /// Text form, e.g. `linreg#{...}`.
    ///
    /// ```rhai
    /// print(m);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn linreg_to_string(r: &mut LinReg) -> String {
        format!("linreg{}", Dynamic::from_map(r.to_map()))
    }

    /// Text form, e.g. `logreg#{...}`.
    ///
    /// ```rhai
    /// print(m);
    /// ```
    #[rhai_fn(name = "to_string", name = "to_debug", pure)]
    pub fn logreg_to_string(r: &mut LogReg) -> String {
        format!("logreg{}", Dynamic::from_map(r.to_map()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Plain SGD on squared loss, written out for two features.
    fn reference_linreg(data: &[([f64; 2], f64)], lr: f64, l2: f64) -> ([f64; 2], f64) {
        let (mut w, mut b) = ([0.0f64; 2], 0.0f64);
        for (x, y) in data {
            let p = b + w[0] * x[0] + w[1] * x[1];
            let g = 2.0 * (p - y);
            for j in 0..2 {
                w[j] -= lr * (x[j] * g + l2 * w[j]);
            }
            b -= 0.01 * g;
        }
        (w, b)
    }

    fn data(n: usize) -> Vec<([f64; 2], f64)> {
        let mut rng = Lcg::new(7);
        (0..n)
            .map(|_| {
                let x = [rng.range(-1.0, 1.0), (rng.below(5)) as f64];
                (x, 3.0 * x[0] - 0.5 * x[1] + 1.0 + rng.range(-0.1, 0.1))
            })
            .collect()
    }

    fn rows(data: &[([f64; 2], f64)]) -> Dynamic {
        // Second feature as INT, to mix INT and FLOAT features.
        let arr: rhai::Array = data
            .iter()
            .map(|(x, y)| {
                let mut m = Map::new();
                m.insert("a".into(), x[0].into());
                m.insert("b".into(), Dynamic::from_int(x[1] as i64));
                m.insert("y".into(), (*y).into());
                Dynamic::from_map(m)
            })
            .collect();
        arr.into()
    }

    #[test]
    fn linreg_follows_plain_sgd() {
        let d = data(500);
        for (opts, lr, l2) in [("", 0.01, 0.0), ("#{ lr: 0.02, l2: 0.1 }", 0.02, 0.1)] {
            let script = format!(
                "let m = linreg({opts}); for r in rows {{ m.learn(#{{ a: r.a, b: r.b }}, r.y) }}
                 [m.weights(), m.intercept, m.count, m.predict(#{{ a: 0.5, b: 2 }})]"
            );
            let out: rhai::Array = eval_with(&script, vec![("rows", rows(&d))]);
            let (w, b) = reference_linreg(&d, lr, l2);
            let got = out[0].clone().cast::<Map>();
            assert_close(f(&got["a"]), w[0], 1e-12);
            assert_close(f(&got["b"]), w[1], 1e-12);
            assert_close(f(&out[1]), b, 1e-12);
            assert_eq!(out[2].as_int().unwrap(), 500);
            assert_close(f(&out[3]), b + 0.5 * w[0] + 2.0 * w[1], 1e-12);
        }
    }

    #[test]
    fn linreg_learns_a_line_from_arrays() {
        let p: FLOAT = eval(
            "let m = linreg(#{ lr: 0.05, intercept_lr: 0.05 });
             for i in 0..4000 { let x = (i % 21 - 10) / 10.0; m.learn([x], 2.0 * x + 1.0) }
             m.predict([0.5])",
        );
        assert_close(p, 2.0, 1e-3);
    }

    #[test]
    fn logreg_matches_the_log_loss_gradient_by_hand() {
        // Two steps computed by hand: p0 = 0, g = -1/(e^0+1) = -0.5 for label true.
        let out: rhai::Array = eval(
            "let m = logreg(); m.learn(#{ x: 2 }, true); let w1 = m.weights().x;
             m.learn(#{ x: 1.0 }, 0); [w1, m.weights().x, m.intercept, m.predict_proba(#{ x: 1 }), m.predict(#{ x: 1 })]",
        );
        let w1 = 0.01 * 0.5 * 2.0;
        let b1 = 0.01 * 0.5;
        assert_close(f(&out[0]), w1, 1e-15);
        // Second step, label false (-1): p = b1 + w1, g = 1/(e^(-p)+1).
        let p = b1 + w1;
        let g = 1.0 / ((-p).exp() + 1.0);
        let w2 = w1 - 0.01 * g;
        let b2 = b1 - 0.01 * g;
        assert_close(f(&out[1]), w2, 1e-15);
        assert_close(f(&out[2]), b2, 1e-15);
        let proba = 1.0 / (1.0 + (-(b2 + w2)).exp());
        assert_close(f(&out[3]), proba, 1e-15);
        assert_eq!(out[4].as_bool().unwrap(), proba > 0.5);
    }

    #[test]
    fn logreg_separates_two_classes() {
        let acc: FLOAT = eval(
            "let m = logreg(#{ lr: 0.1 }); let right = 0;
             for i in 0..2000 { let x = (i * 7919 % 200 - 100) / 50.0; let y = x > 0.3;
                 if i >= 1000 && m.predict(#{ x: x }) == y { right += 1 }
                 m.learn(#{ x: x }, y) }
             right / 1000.0",
        );
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn extreme_scores_use_rivers_cut_offs() {
        assert_eq!(sigmoid(-31.0), 0.0);
        assert_eq!(sigmoid(31.0), 1.0);
        assert_close(log_loss_gradient(true, 20.0), -(-20.0f64).exp(), 1e-15);
        assert_eq!(log_loss_gradient(false, 20.0), 1.0);
    }

    #[test]
    fn bad_targets_and_labels_are_errors() {
        let e = eval_err(r#"let m = linreg(); m.learn(#{ x: 1 }, "3")"#);
        assert!(e.contains("linreg.learn"), "{e}");
        let e = eval_err("let m = logreg(); m.learn(#{ x: 1 }, 2)");
        assert!(e.contains("class label"), "{e}");
        let e = eval_err(r#"let m = logreg(); m.learn(#{ x: "a" }, true)"#);
        assert!(e.contains("feature `x`"), "{e}");
        // A diverging model says so instead of storing NaN.
        let e = eval_err(
            "let m = linreg(#{ lr: 1e6, clip_gradient: 1e308 }); for i in 0..200 { m.learn(#{ x: 1e6 }, 1.0) }",
        );
        assert!(e.contains("not finite"), "{e}");
    }

    #[test]
    fn state_round_trips_and_is_counted() {
        let m: Dynamic = eval("let m = logreg(); m.learn(#{ a: 1, bb: 2 }, true); m");
        let r = m.clone().cast::<LogReg>();
        assert_eq!(round_trip(&r), r);
        assert!(crate::approx_bytes(&m).unwrap() > std::mem::size_of::<LogReg>());
        let s = crate::summary(&m).unwrap();
        assert_eq!(s["updates"].as_int().unwrap(), 1);
    }
}
