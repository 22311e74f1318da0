//! Feature vectors for the online learners (`linreg`, `logreg`, `scaler`, `hst`, `kmeans`):
//! how a script passes them, how a learner stores what it learned per feature, and how
//! their hyper-parameters and labels are read.
//!
//! A feature vector is, as in River, a set of named numbers. A script passes it as a Rhai
//! map (`#{ temp: 21.5, load: 3 }`), as an array of numbers (feature names are then the
//! positions `"0"`, `"1"`, …), or as any other type that implements [`Features`]: the engine
//! registers its event type so that `ev.features`, a nested object of the event, is read
//! where it lies, without building a map. `INT`, `FLOAT` and `bool` values mix (a `bool` is
//! 1.0 or 0.0); anything else, and NaN or an infinity, is an error naming the feature.
//!
//! [`register_learners`] adds every learner function that takes a feature vector, for one
//! concrete vector type, to a Rhai module. [`Table`] is the per-feature store of a learner:
//! a vector sorted by name, so lookups do not hash or allocate and the state serializes as
//! plain data.

use rhai::{Array, Dynamic, Map, Module};
use serde::{Deserialize, Serialize};

use crate::num::{self, Res};

/// Most distinct features one learner keeps; past it, new features are an error.
pub const MAX_FEATURES: usize = 10_000;

/// A set of named numeric features.
pub trait Features: Clone + 'static {
    /// Calls `f(name, value)` for every feature, stopping at the first error. `ctx` names the
    /// calling function in error messages.
    fn each(&self, ctx: &str, f: &mut dyn FnMut(&str, f64) -> Res<()>) -> Res<()>;
}

/// A feature value: a finite `INT`, `FLOAT` or `bool`.
pub fn feature_value(v: &Dynamic, ctx: &str, name: &str) -> Res<f64> {
    let x = if let Ok(b) = v.as_bool() {
        f64::from(u8::from(b))
    } else if v.is_int() || v.is_float() {
        num::number(v, ctx)?
    } else {
        return num::err(format!(
            "{ctx}: feature `{name}` must be a number (INT, FLOAT or bool), got {}",
            num::type_of(v)
        ));
    };
    if x.is_finite() {
        Ok(x)
    } else {
        num::err(format!("{ctx}: feature `{name}` must be finite, got {x}"))
    }
}

impl Features for Map {
    fn each(&self, ctx: &str, f: &mut dyn FnMut(&str, f64) -> Res<()>) -> Res<()> {
        for (name, v) in self {
            f(name, feature_value(v, ctx, name)?)?;
        }
        Ok(())
    }
}

impl Features for Array {
    fn each(&self, ctx: &str, f: &mut dyn FnMut(&str, f64) -> Res<()>) -> Res<()> {
        let mut buf = itoa::Buffer::new();
        for (i, v) in self.iter().enumerate() {
            let name = buf.format(i);
            f(name, feature_value(v, ctx, name)?)?;
        }
        Ok(())
    }
}

/// What a learner keeps per feature, sorted by feature name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Table<T> {
    entries: Vec<(Box<str>, T)>,
}

impl<T: Clone + Default> Table<T> {
    pub fn new() -> Self {
        Table {
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.find(name).ok().map(|i| &self.entries[i].1)
    }

    /// The value of `name`, inserted as `T::default()` when new (at most [`MAX_FEATURES`]).
    pub fn entry(&mut self, name: &str, ctx: &str) -> Res<&mut T> {
        self.entry_or(name, ctx, T::default)
    }

    /// The value of `name`, inserted as `init()` when new (at most [`MAX_FEATURES`]).
    pub fn entry_or(&mut self, name: &str, ctx: &str, init: impl FnOnce() -> T) -> Res<&mut T> {
        let i = match self.find(name) {
            Ok(i) => i,
            Err(i) => {
                if self.entries.len() >= MAX_FEATURES {
                    return num::err(format!(
                        "{ctx}: more than {MAX_FEATURES} distinct features; `{name}` is one too many"
                    ));
                }
                self.entries.insert(i, (name.into(), init()));
                i
            }
        };
        Ok(&mut self.entries[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(n, v)| (&**n, v))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    /// Heap bytes: the entries and their names.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(Box<str>, T)>()
            + self.entries.iter().map(|(n, _)| n.len()).sum::<usize>()
    }
}

/// Reads the hyper-parameters map of a learner's constructor: every key must be one of
/// `known`, so a typo is an error rather than a silent default.
pub(crate) struct Options<'a> {
    map: &'a Map,
    ctx: &'a str,
}

impl<'a> Options<'a> {
    pub(crate) fn new(map: &'a Map, ctx: &'a str, known: &[&str]) -> Res<Self> {
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                return num::err(format!(
                    "{ctx}: unknown option `{key}`; the options are {}",
                    known.join(", ")
                ));
            }
        }
        Ok(Options { map, ctx })
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Dynamic> {
        self.map.get(key)
    }

    fn ctx(&self, key: &str) -> String {
        format!("{}: option `{key}`", self.ctx)
    }

    /// A finite number in `[min, max]`, or `default` when absent.
    pub(crate) fn number(&self, key: &str, default: f64, min: f64, max: f64) -> Res<f64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let x = num::finite(v, &self.ctx(key))?;
        if x < min || x > max {
            return num::err(format!(
                "{}: must be between {min} and {max}, got {x}",
                self.ctx(key)
            ));
        }
        Ok(x)
    }

    /// A whole number in `min..=max`, or `default` when absent.
    pub(crate) fn size(&self, key: &str, default: usize, min: usize, max: usize) -> Res<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => num::size(v, &self.ctx(key), min, max),
        }
    }

    /// A boolean, or `default` when absent.
    pub(crate) fn flag(&self, key: &str, default: bool) -> Res<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().or_else(|_| {
                num::err(format!(
                    "{}: expected true or false, got {}",
                    self.ctx(key),
                    num::type_of(v)
                ))
            }),
        }
    }
}

/// A class label: `true`/`false`, or `1`/`0` as an `INT` or `FLOAT`.
pub(crate) fn label(v: &Dynamic, ctx: &str) -> Res<bool> {
    if let Ok(b) = v.as_bool() {
        return Ok(b);
    }
    if v.is_int() || v.is_float() {
        let x = num::number(v, ctx)?;
        if x == 0.0 {
            return Ok(false);
        }
        if x == 1.0 {
            return Ok(true);
        }
    }
    num::err(format!(
        "{ctx}: a class label must be true, false, 1 or 0, got {}",
        if v.is_int() || v.is_float() {
            v.to_string()
        } else {
            num::type_of(v).to_owned()
        }
    ))
}

/// Registers every learner function that takes a feature vector of type `X` into `m`:
/// `learn`/`predict`/`predict_proba`/`transform`/`score` of `linreg`, `logreg`, `scaler`,
/// `hst` and `kmeans`. The package does this for maps and arrays; the engine for its events.
pub fn register_learners<X: Features>(m: &mut Module) {
    add_learners::<X>(m);
}

/// The learner functions [`register_learners`] registers for `X`, as a list instead of in a
/// module: eddy's query compiler calls them directly.
pub fn learner_methods<X: Features>() -> Vec<LearnerMethod> {
    let mut out = Vec::new();
    add_learners::<X>(&mut out);
    out
}

fn add_learners<X: Features>(m: &mut dyn Sink) {
    crate::linear::register::<X>(m);
    crate::scaler::register::<X>(m);
    crate::hst::register::<X>(m);
    crate::kmeans::register::<X>(m);
}

/// One learner function for one feature vector type: its name, parameter types (the learner
/// first) and the function.
pub struct LearnerMethod {
    pub name: &'static str,
    pub params: Vec<std::any::TypeId>,
    pub func: Box<dyn rhai::plugin::PluginFunc + Send + Sync>,
}

/// Where the learner functions go: a module (registered) or a list ([`learner_methods`]).
pub(crate) trait Sink {
    fn add(
        &mut self,
        name: &'static str,
        params: Vec<std::any::TypeId>,
        func: Box<dyn rhai::plugin::PluginFunc + Send + Sync>,
    );
}

impl Sink for Module {
    fn add(
        &mut self,
        name: &'static str,
        params: Vec<std::any::TypeId>,
        func: Box<dyn rhai::plugin::PluginFunc + Send + Sync>,
    ) {
        let func: Box<dyn rhai::plugin::PluginFunc> = func;
        rhai::FuncRegistration::new(name).set_into_module_raw(
            self,
            params,
            rhai::plugin::RhaiFunc::Plugin { func: func.into() },
        );
    }
}

impl Sink for Vec<LearnerMethod> {
    fn add(
        &mut self,
        name: &'static str,
        params: Vec<std::any::TypeId>,
        func: Box<dyn rhai::plugin::PluginFunc + Send + Sync>,
    ) {
        self.push(LearnerMethod { name, params, func });
    }
}

/// A learner method registered for one feature vector type: `this` of type `T`, the vector
/// of type `X` read in place (borrowed, never copied), and for `learn` a target of any type.
enum Method<T, X> {
    Mut(fn(&mut T, &X, Option<&Dynamic>) -> Res<Dynamic>),
    Pure(fn(&T, &X) -> Res<Dynamic>),
}

impl<T: Clone + 'static, X: Features> rhai::plugin::PluginFunc for Method<T, X> {
    fn call(
        &self,
        _: Option<rhai::NativeCallContext>,
        args: &mut [&mut Dynamic],
    ) -> rhai::plugin::RhaiResult {
        let (this, rest) = args.split_first_mut().expect("a method has a `this`");
        let x = rest[0]
            .read_lock::<X>()
            .expect("registered for this feature type");
        match self {
            Method::Pure(f) => f(&this.read_lock::<T>().expect("registered for T"), &x),
            Method::Mut(f) => {
                let y = rest.get(1).map(|d| &**d);
                f(
                    &mut this.write_lock::<T>().expect("registered for T"),
                    &x,
                    y,
                )
            }
        }
    }

    fn is_method_call(&self) -> bool {
        true
    }

    fn has_context(&self) -> bool {
        false
    }

    fn is_pure(&self) -> bool {
        matches!(self, Method::Pure(_))
    }

    fn is_volatile(&self) -> bool {
        false
    }
}

fn set<T: Clone + 'static, X: Features>(
    m: &mut dyn Sink,
    name: &'static str,
    method: Method<T, X>,
    target: bool,
) {
    use std::any::TypeId;
    let mut types = vec![TypeId::of::<T>(), TypeId::of::<X>()];
    if target {
        types.push(TypeId::of::<Dynamic>());
    }
    m.add(name, types, Box::new(method));
}

/// Registers `x.name(features)`, which changes `x`.
pub(crate) fn set_mut<T: Clone + 'static, X: Features>(
    m: &mut dyn Sink,
    name: &'static str,
    f: fn(&mut T, &X, Option<&Dynamic>) -> Res<Dynamic>,
) {
    set(m, name, Method::Mut(f), false);
}

/// Registers `x.name(features)`, which reads `x` only.
pub(crate) fn set_pure<T: Clone + 'static, X: Features>(
    m: &mut dyn Sink,
    name: &'static str,
    f: fn(&T, &X) -> Res<Dynamic>,
) {
    set(m, name, Method::Pure(f), false);
}

/// Registers `x.name(features, target)`, which changes `x`.
pub(crate) fn set_mut2<T: Clone + 'static, X: Features>(
    m: &mut dyn Sink,
    name: &'static str,
    f: fn(&mut T, &X, Option<&Dynamic>) -> Res<Dynamic>,
) {
    set(m, name, Method::Mut(f), true);
}

/// The target of a two-argument method (always present for those).
pub(crate) fn target(y: Option<&Dynamic>) -> &Dynamic {
    y.expect("registered with a target")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn collect<X: Features>(x: &X) -> Result<Vec<(String, f64)>, String> {
        let mut out = Vec::new();
        x.each("t", &mut |n, v| {
            out.push((n.to_owned(), v));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn maps_and_arrays_mix_ints_floats_and_bools() {
        let m: Map = eval("#{ b: 2, a: 1.5, c: true, d: false }");
        assert_eq!(
            collect(&m).unwrap(),
            vec![
                ("a".into(), 1.5),
                ("b".into(), 2.0),
                ("c".into(), 1.0),
                ("d".into(), 0.0)
            ]
        );
        let a: Array = eval("[3, 0.25, true]");
        let names: Vec<_> = (0..3).map(|i| i.to_string()).collect();
        let got = collect(&a).unwrap();
        assert_eq!(
            got.iter().map(|p| &p.0).collect::<Vec<_>>(),
            names.iter().collect::<Vec<_>>()
        );
        assert_eq!(
            got.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![3.0, 0.25, 1.0]
        );
    }

    #[test]
    fn bad_feature_values_name_the_feature() {
        let m: Map = eval(r#"#{ temp: "hot" }"#);
        let e = collect(&m).unwrap_err();
        assert!(e.contains("feature `temp`") && e.contains("string"), "{e}");
        let m: Map = eval("#{ x: 1.0 / 0.0 }");
        assert!(collect(&m).unwrap_err().contains("finite"));
        let a: Array = eval("[1, ()]");
        assert!(collect(&a).unwrap_err().contains("feature `1`"));
    }

    #[test]
    fn table_keeps_names_sorted_and_bounded() {
        let mut t: Table<f64> = Table::new();
        for name in ["b", "a", "c", "a"] {
            *t.entry(name, "t").unwrap() += 1.0;
        }
        let got: Vec<_> = t.iter().map(|(n, v)| (n.to_owned(), *v)).collect();
        assert_eq!(
            got,
            vec![("a".into(), 2.0), ("b".into(), 1.0), ("c".into(), 1.0)]
        );
        assert_eq!(t.get("b"), Some(&1.0));
        assert_eq!(t.get("z"), None);
        assert_eq!(round_trip(&t), t);
        let mut big: Table<f64> = Table::new();
        for i in 0..MAX_FEATURES {
            big.entry(&format!("f{i}"), "t").unwrap();
        }
        let e = big.entry("one-more", "t").unwrap_err().to_string();
        assert!(e.contains("one-more"), "{e}");
        assert!(big.heap_bytes() >= MAX_FEATURES * 16);
    }

    #[test]
    fn labels_are_bools_or_zero_one() {
        for (s, want) in [
            ("true", true),
            ("false", false),
            ("1", true),
            ("0", false),
            ("1.0", true),
            ("0.0", false),
        ] {
            assert_eq!(label(&eval::<Dynamic>(s), "t").unwrap(), want, "{s}");
        }
        for s in ["2", "0.5", r#""yes""#, "()"] {
            let e = label(&eval::<Dynamic>(s), "t").unwrap_err().to_string();
            assert!(e.contains("class label"), "{s}: {e}");
        }
    }

    #[test]
    fn unknown_options_are_errors() {
        let e = eval_err("linreg(#{ learning_rate: 0.1 })");
        assert!(
            e.contains("unknown option `learning_rate`") && e.contains("lr"),
            "{e}"
        );
        let e = eval_err("linreg(#{ lr: -1 })");
        assert!(e.contains("option `lr`"), "{e}");
    }
}
