//! Helpers for the unit tests of every module: an engine with the package registered,
//! script evaluation with injected variables, a deterministic pseudo-random generator and
//! float comparison.

use rhai::{Array, Dynamic, Engine, Scope};
use serde::{de::DeserializeOwned, Serialize};

use crate::EddyPackage;
use rhai::packages::Package;

/// A fresh engine with the package registered the way the engine crate does it.
pub(crate) fn engine() -> Engine {
    let mut engine = Engine::new();
    engine.register_global_module(EddyPackage::new().as_shared_module());
    engine
}

/// Evaluates `script`, panicking with the script error if it fails.
pub(crate) fn eval<T: Clone + 'static>(script: &str) -> T {
    eval_with(script, Vec::new())
}

/// Evaluates `script` with the given variables in scope.
pub(crate) fn eval_with<T: Clone + 'static>(script: &str, vars: Vec<(&str, Dynamic)>) -> T {
    let mut scope = Scope::new();
    for (name, value) in vars {
        scope.push_dynamic(name, value);
    }
    engine()
        .eval_with_scope::<T>(&mut scope, script)
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Evaluates `script`, which must fail; returns the error text.
pub(crate) fn eval_err(script: &str) -> String {
    match engine().eval::<Dynamic>(script) {
        Ok(v) => panic!("script should have failed but returned {v:?}\n{script}"),
        Err(e) => e.to_string(),
    }
}

/// A `FLOAT` out of a `Dynamic` (an `INT` is converted).
pub(crate) fn f(v: &Dynamic) -> f64 {
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .unwrap_or_else(|_| panic!("not a number: {v:?}"))
}

/// Asserts `|a - b| <= tol * max(1, |b|)`.
#[track_caller]
pub(crate) fn assert_close(a: f64, b: f64, tol: f64) {
    assert!(
        (a - b).abs() <= tol * b.abs().max(1.0),
        "{a} is not within {tol} (relative) of {b}"
    );
}

/// A Rhai array of `FLOAT`s.
pub(crate) fn floats(xs: &[f64]) -> Dynamic {
    Dynamic::from_array(xs.iter().map(|&x| Dynamic::from_float(x)).collect())
}

/// A Rhai array where whole numbers are `INT`s and the rest `FLOAT`s.
pub(crate) fn mixed(xs: &[f64]) -> Dynamic {
    let arr: Array = xs
        .iter()
        .map(|&x| {
            if x.fract() == 0.0 {
                Dynamic::from_int(x as i64)
            } else {
                Dynamic::from_float(x)
            }
        })
        .collect();
    Dynamic::from_array(arr)
}

/// Serializes to JSON and back.
pub(crate) fn round_trip<T: Serialize + DeserializeOwned>(x: &T) -> T {
    let json = serde_json::to_string(x).expect("serialize");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("deserialize {json}: {e}"))
}

/// A small deterministic generator (64-bit LCG, high bits) for test data.
pub(crate) struct Lcg(u64);

impl Lcg {
    pub(crate) fn new(seed: u64) -> Self {
        Self(
            seed.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407),
        )
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        self.next_u64() as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
