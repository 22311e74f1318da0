//! Native Rust types and functions that eddy registers into its Rhai queries: streaming
//! statistics (`stats`, `ewma`), windows (`ring`, `time_window`), OHLC bars (`ohlc`),
//! quantiles (`quantiles`), heavy hitters (`topk`), sentiment (`sentiment`), duration
//! helpers (`duration`, `window_start`), and online learners that learn one event at a time
//! as River does: linear and logistic regression (`linreg`, `logreg`), standardisation
//! (`scaler`), Half-Space Trees anomaly scores (`hst`), streaming k-means (`kmeans`) and
//! Holt's linear trend forecasts (`holt`). Learners take their features as a map, an array,
//! or any type registered with [`register_learners`] (see [`Features`]). Everything is bundled in [`EddyPackage`]; the
//! engine also uses [`summary`] to serialize emitted plugin objects, [`approx_bytes`] to
//! bound per-key state, and [`parse_duration_ms`] for its own settings.
//!
//! Conventions shared by every function:
//! * Numeric parameters accept `INT` or `FLOAT`; anything else is an error naming the
//!   function and the type received. Values fed into a summary must be finite.
//! * Constructors check their sizes (see [`MAX_RING`], [`MAX_WINDOW_ENTRIES`],
//!   [`MAX_TOPK`]) and return an error rather than allocate for bad ones.
//! * Results are `FLOAT`s (counts are `INT`s); `min`, `max` and other values that do not
//!   exist yet are `()`, while means, sums and deviations of nothing are 0.0.
//! * Each type's Rhai name equals its constructor, and `to_map()` gives its summary.

use rhai::def_package;
use rhai::plugin::*;

mod duration;
mod ewma;
mod features;
mod holt;
mod hst;
mod kmeans;
mod linear;
mod num;
mod ohlc;
mod pyrandom;
mod quantiles;
mod ring;
mod scaler;
mod sentiment;
mod stats;
#[cfg(test)]
mod testutil;
mod time_window;
mod topk;

/// Re-exported so `EddyPackage::new().as_shared_module()` needs no extra import.
pub use rhai::packages::Package;

pub use duration::{parse_duration_ms, window_start_ms, DurationError};
pub use ewma::{Ewma, EwmaMode};
pub use features::{
    feature_value, learner_methods, register_learners, Features, LearnerMethod, Table, MAX_FEATURES,
};
pub use holt::Holt;
pub use hst::{Hst, HstParams, MAX_HST_NODES};
pub use kmeans::{KMeans, KMeansParams, MAX_CLUSTERS};
pub use linear::{GlmParams, LinReg, LogReg};
pub use ohlc::Ohlc;
pub use quantiles::{Quantiles, MAX_QUANTILE_VALUE, QUANTILE_SCALE};
pub use ring::{Ring, MAX_RING};
pub use scaler::Scaler;
pub use sentiment::sentiment_score;
pub use stats::Stats;
pub use time_window::{TimeWindow, MAX_WINDOW_ENTRIES};
pub use topk::{Entry as TopKEntry, Item as TopKItem, TopK, MAX_TOPK};

def_package! {
    /// Every eddy plugin type and function. Register with
    /// `engine.register_global_module(EddyPackage::new().as_shared_module())`.
    pub EddyPackage(lib) {
        lib.set_custom_type::<Stats>("stats");
        lib.set_custom_type::<Ewma>("ewma");
        lib.set_custom_type::<Ring>("ring");
        lib.set_custom_type::<TimeWindow>("time_window");
        lib.set_custom_type::<Ohlc>("ohlc");
        lib.set_custom_type::<Quantiles>("quantiles");
        lib.set_custom_type::<TopK>("topk");
        lib.set_custom_type::<LinReg>("linreg");
        lib.set_custom_type::<LogReg>("logreg");
        lib.set_custom_type::<Scaler>("scaler");
        lib.set_custom_type::<Hst>("hst");
        lib.set_custom_type::<KMeans>("kmeans");
        lib.set_custom_type::<Holt>("holt");

        combine_with_exported_module!(lib, "stats", stats::stats_functions);
        combine_with_exported_module!(lib, "ewma", ewma::ewma_functions);
        combine_with_exported_module!(lib, "ring", ring::ring_functions);
        combine_with_exported_module!(lib, "time_window", time_window::time_window_functions);
        combine_with_exported_module!(lib, "ohlc", ohlc::ohlc_functions);
        combine_with_exported_module!(lib, "quantiles", quantiles::quantiles_functions);
        combine_with_exported_module!(lib, "topk", topk::topk_functions);
        combine_with_exported_module!(lib, "sentiment", sentiment::sentiment_functions);
        combine_with_exported_module!(lib, "duration", duration::duration_functions);
        combine_with_exported_module!(lib, "linear", linear::linear_functions);
        combine_with_exported_module!(lib, "scaler", scaler::scaler_functions);
        combine_with_exported_module!(lib, "hst", hst::hst_functions);
        combine_with_exported_module!(lib, "kmeans", kmeans::kmeans_functions);
        combine_with_exported_module!(lib, "holt", holt::holt_functions);
        register_learners::<rhai::Map>(lib);
        register_learners::<rhai::Array>(lib);
    }
}

/// The static manifests of the plugin modules in [`EddyPackage`]: every exported function with
/// its name and parameter types, callable without the interpreter. eddy's query compiler calls
/// plugin methods through them (the learners' generic functions of [`register_learners`] are
/// not in a manifest).
pub fn manifests() -> [&'static rhai::plugin::ModuleManifest; 14] {
    [
        &stats::stats_functions::RHAI_MANIFEST,
        &ewma::ewma_functions::RHAI_MANIFEST,
        &ring::ring_functions::RHAI_MANIFEST,
        &time_window::time_window_functions::RHAI_MANIFEST,
        &ohlc::ohlc_functions::RHAI_MANIFEST,
        &quantiles::quantiles_functions::RHAI_MANIFEST,
        &topk::topk_functions::RHAI_MANIFEST,
        &sentiment::sentiment_functions::RHAI_MANIFEST,
        &duration::duration_functions::RHAI_MANIFEST,
        &linear::linear_functions::RHAI_MANIFEST,
        &scaler::scaler_functions::RHAI_MANIFEST,
        &hst::hst_functions::RHAI_MANIFEST,
        &kmeans::kmeans_functions::RHAI_MANIFEST,
        &holt::holt_functions::RHAI_MANIFEST,
    ]
}

/// Runs `$body` with `$x` bound to the plugin object inside `$value`, for each type.
macro_rules! with_plugin {
    ($value:expr, $x:ident => $body:expr, $otherwise:expr) => {{
        let v: &Dynamic = $value;
        if let Some($x) = v.read_lock::<Stats>() {
            $body
        } else if let Some($x) = v.read_lock::<Ewma>() {
            $body
        } else if let Some($x) = v.read_lock::<Ring>() {
            $body
        } else if let Some($x) = v.read_lock::<TimeWindow>() {
            $body
        } else if let Some($x) = v.read_lock::<Ohlc>() {
            $body
        } else if let Some($x) = v.read_lock::<Quantiles>() {
            $body
        } else if let Some($x) = v.read_lock::<TopK>() {
            $body
        } else if let Some($x) = v.read_lock::<LinReg>() {
            $body
        } else if let Some($x) = v.read_lock::<LogReg>() {
            $body
        } else if let Some($x) = v.read_lock::<Scaler>() {
            $body
        } else if let Some($x) = v.read_lock::<Hst>() {
            $body
        } else if let Some($x) = v.read_lock::<KMeans>() {
            $body
        } else if let Some($x) = v.read_lock::<Holt>() {
            $body
        } else {
            $otherwise
        }
    }};
}

/// The summary map (`to_map()`) of a plugin object, or `None` for any other value.
pub fn summary(value: &Dynamic) -> Option<rhai::Map> {
    with_plugin!(value, x => Some(x.to_map()), None)
}

/// An O(1) estimate of the memory a plugin object uses (inline size plus heap), or
/// `None` for any other value.
pub fn approx_bytes(value: &Dynamic) -> Option<usize> {
    with_plugin!(value, x => Some(std::mem::size_of_val(&*x) + x.heap_bytes()), None)
}

/// A plugin object by value, for checkpoints: every plugin type is serde-serializable, and this
/// names which one a stored object is.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum PluginObject {
    Stats(Stats),
    Ewma(Ewma),
    Ring(Ring),
    TimeWindow(TimeWindow),
    Ohlc(Ohlc),
    Quantiles(Quantiles),
    TopK(TopK),
    LinReg(LinReg),
    LogReg(LogReg),
    Scaler(Scaler),
    Hst(Hst),
    KMeans(KMeans),
    Holt(Holt),
}

macro_rules! plugin_objects {
    ($($variant:ident),*) => {
        impl PluginObject {
            /// A copy of the plugin object inside `value`, or `None` for any other value.
            pub fn of(value: &Dynamic) -> Option<PluginObject> {
                $(if let Some(x) = value.read_lock::<$variant>() {
                    return Some(PluginObject::$variant(x.clone()));
                })*
                None
            }

            /// The object as a Rhai value again.
            pub fn into_dynamic(self) -> Dynamic {
                match self {
                    $(PluginObject::$variant(x) => Dynamic::from(x),)*
                }
            }
        }
    };
}

plugin_objects!(
    Stats, Ewma, Ring, TimeWindow, Ohlc, Quantiles, TopK, LinReg, LogReg, Scaler, Hst, KMeans, Holt
);
thread_local! {
    /// `(limit, left)`: the bytes plugin objects made in the current script call may take.
    static CALL_BUDGET: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((usize::MAX, usize::MAX)) };
}

/// Sets the bytes the plugin objects one script call creates may take together (the shard sets
/// it to `max_state_bytes` before each call): without it, one call could make 10,000
/// `quantiles(5)` of 2 MiB each before the state's size is checked after the call.
pub fn set_call_budget(bytes: usize) {
    CALL_BUDGET.with(|b| b.set((bytes, bytes)));
}

/// Charges a new plugin object to the call's budget: the object, or an error naming the limit.
pub(crate) fn charged<T: Clone + Send + Sync + 'static>(x: T) -> num::Res<T> {
    let value = Dynamic::from(x);
    let bytes = approx_bytes(&value).unwrap_or(0);
    let (limit, left) = CALL_BUDGET.with(|b| b.get());
    if bytes > left {
        return Err(format!(
            "plugin objects created in one call would take more than {limit} bytes, the limit \
             (max_state_bytes)"
        )
        .into());
    }
    CALL_BUDGET.with(|b| b.set((limit, left - bytes)));
    Ok(value.cast::<T>())
}

/// The Rhai type name of a plugin object, for error messages.
pub(crate) fn plugin_type_name(v: &Dynamic) -> Option<&'static str> {
    with_plugin!(v, x => Some(type_name_of(&*x)), None)
}

trait PluginName {
    const NAME: &'static str;
}

macro_rules! names {
    ($($t:ty => $n:literal),*) => { $(impl PluginName for $t { const NAME: &'static str = $n; })* };
}

names!(Stats => "stats", Ewma => "ewma", Ring => "ring", TimeWindow => "time_window",
       Ohlc => "ohlc", Quantiles => "quantiles", TopK => "topk", LinReg => "linreg",
       LogReg => "logreg", Scaler => "scaler", Hst => "hst", KMeans => "kmeans", Holt => "holt");

fn type_name_of<T: PluginName>(_: &T) -> &'static str {
    T::NAME
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use rhai::{Array, Engine, Map};

    #[test]
    fn summary_and_approx_bytes_cover_every_type() {
        let objs: Array = eval(
            r#"let r = ring(50); for i in 0..40 { r.push(i) }
               let w = time_window(1000); for i in 0..30 { w.add(i, i) }
               let q = quantiles(); q.record(1.5);
               let t = topk(5); t.add("abc"); t.add(3);
               let s = stats(); s.add(1);
               let e = ewma(0.5); e.add(1);
               let o = ohlc(); o.add(2, 3);
               let lr = linreg(); lr.learn(#{ x: 1 }, 2);
               let lg = logreg(); lg.learn(#{ x: 1 }, true);
               let sc = scaler(); sc.learn(#{ x: 1 });
               let h = hst(#{ trees: 2, height: 3 }); h.learn(#{ x: 1 });
               let km = kmeans(2); km.learn(#{ x: 1 });
               let ho = holt(0.5, 0.5); ho.learn(1);
               [s, e, r, w, o, q, t, lr, lg, sc, h, km, ho]"#,
        );
        let names = [
            "stats",
            "ewma",
            "ring",
            "time_window",
            "ohlc",
            "quantiles",
            "topk",
            "linreg",
            "logreg",
            "scaler",
            "hst",
            "kmeans",
            "holt",
        ];
        for (v, name) in objs.iter().zip(names) {
            let m = summary(v).unwrap_or_else(|| panic!("{name} has no summary"));
            assert!(!m.is_empty(), "{name}");
            let bytes = approx_bytes(v).unwrap();
            assert!(bytes >= 16, "{name}: {bytes}");
            assert_eq!(plugin_type_name(v), Some(name));
        }
        // Heap-backed types count their heap.
        assert!(approx_bytes(&objs[2]).unwrap() >= 40 * 8);
        assert!(approx_bytes(&objs[3]).unwrap() >= 30 * 16);
        assert!(approx_bytes(&objs[5]).unwrap() >= 2048 * 8);
        assert!(approx_bytes(&objs[6]).unwrap() >= 3);
        // Summaries equal to_map().
        let m = summary(&objs[4]).unwrap();
        assert_eq!(f(&m["vwap"]), 2.0);
        // Other values are not plugin objects.
        for v in [
            Dynamic::from_int(1),
            Dynamic::from_map(Map::new()),
            "x".into(),
            Dynamic::UNIT,
        ] {
            assert!(summary(&v).is_none() && approx_bytes(&v).is_none());
        }
    }

    #[test]
    fn approx_bytes_grows_with_content() {
        let small: Dynamic = eval("let r = ring(100000); r.push(1); r");
        let big: Dynamic = eval("let r = ring(100000); for i in 0..20000 { r.push(i) } r");
        assert!(approx_bytes(&small).unwrap() < 1024);
        assert!(approx_bytes(&big).unwrap() >= 20_000 * 8);
        let t: Dynamic =
            eval(r#"let t = topk(1000); for i in 0..500 { t.add("item-number-" + i) } t"#);
        assert!(approx_bytes(&t).unwrap() >= 500 * 14);
    }

    #[test]
    fn register_into_engine_and_shared_values_work() {
        let mut engine = Engine::new();
        EddyPackage::new().register_into_engine(&mut engine);
        let n: rhai::INT = engine
            .eval("let s = stats(); s.add(1); s.add(2.5); s.count")
            .unwrap();
        assert_eq!(n, 2);
        // A value captured by a closure is shared; summary still sees through it.
        let v: Dynamic = engine
            .eval("let s = stats(); s.add(4); let f = || s.count; s")
            .unwrap();
        assert!(summary(&v).is_some());
        let shared = Dynamic::from(Stats::new()).into_shared();
        assert!(summary(&shared).is_some());
        assert!(approx_bytes(&shared).is_some());
    }

    #[test]
    fn the_brief_example_runs() {
        let out: Array = eval(
            r#"fn init(key) { #{ s: stats(), bar: ohlc(), w: ring(20) } }
               fn on_event(ev) {
                   let alerts = [];
                   this.s.add(ev.price); this.bar.add(ev.price, ev.size);
                   if this.w.len >= 5 && this.w.zscore(ev.price).abs() > 3.0 { alerts.push(#{price: ev.price}) }
                   this.w.push(ev.price);
                   alerts
               }
               let state = init("AAPL");
               let alerts = [];
               for i in 0..30 { alerts += state.on_event(#{price: 100 + i % 3, size: 10}); }
               alerts += state.on_event(#{price: 150.0, size: 1});
               alerts"#,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(f(&out[0].clone().cast::<Map>()["price"]), 150.0);
    }
}
