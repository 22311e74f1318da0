//! The script sandbox: the one place where a Rhai [`Engine`] for user queries is made.
//!
//! Queries are untrusted code. Every engine that compiles or runs one comes from
//! [`new_engine`], which sets every limit in [`Limits`] (operations per call, call depth,
//! expression depth, string/array/map sizes), refuses `eval` and `import`, sends `print` and
//! `debug` to the log instead of stdout, and registers the event type and the plugins. The
//! limits Rhai cannot see (the size of a key's state, of one emitted value, the number of timers
//! of a key and of topics of a query) are enforced by the shard with the same [`Limits`].

use rhai::packages::Package;
use rhai::Engine;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Resource limits for scripts. Each default is written here and nowhere else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Rhai operations one call (`init`, `on_event`, `on_timer`) may take: ends endless loops.
    pub max_operations: u64,
    /// Nesting of function calls: ends runaway recursion.
    pub max_call_levels: usize,
    /// Nesting of expressions at the top level and inside functions, checked at compile time.
    pub max_expr_depth: usize,
    pub max_function_expr_depth: usize,
    /// Largest string a script may build, in bytes.
    pub max_string_bytes: usize,
    /// Largest array and map, in elements (nested ones count toward their container).
    pub max_array_len: usize,
    pub max_map_len: usize,
    /// Largest state of one key, in (estimated) bytes: checked after every call while the state
    /// is small, and at intervals that shrink as it nears the limit once it is large.
    pub max_state_bytes: usize,
    /// Largest emitted value, in JSON bytes.
    pub max_emit_bytes: usize,
    /// Pending timers of one key.
    pub max_timers_per_key: usize,
    /// Timers one advance of the watermark fires at most; the rest wait for the next advance.
    pub max_timers_per_advance: usize,
    /// Named topics (`emit("name", v)`) of one query.
    pub max_topics_per_query: usize,
    /// Input columns of a model (`model(name).predict(x)`), checked when it is loaded.
    pub max_model_inputs: usize,
    /// Output values of a model for one row, checked when it is loaded.
    pub max_model_outputs: usize,
    /// Longest partition key (the `key_by` value), in bytes: a longer one rejects its event.
    pub max_key_bytes: usize,
    /// Keys (states) one query keeps on one shard; past it, the query's `on_key_limit` decides:
    /// the least recently seen key is evicted, or the new key's event is refused.
    pub max_keys_per_query: usize,
    /// Bytes of `<query>.late` and `<query>.errors` items one query may hand on from one shard
    /// per batch; past it they are counted, and one item says how many were not published.
    pub max_report_bytes: usize,
    /// The models queries may call, shared by every engine made with these limits. Not a
    /// setting: filled from the models folder and by uploads.
    #[serde(skip)]
    pub models: crate::models::ModelCatalog,
}

impl Limits {
    /// The limits of one of `shards` shards: each holds its share of `max_keys_per_query` (keys
    /// spread evenly over the shards by their hash).
    pub fn per_shard(&self, shards: usize) -> Limits {
        Limits {
            max_keys_per_query: self.max_keys_per_query.div_ceil(shards.max(1)),
            ..self.clone()
        }
    }

    /// Every limit with its name, for the check that none is 0 (Rhai reads 0 as "unlimited").
    pub fn named(&self) -> [(&'static str, u64); 17] {
        [
            ("max_operations", self.max_operations),
            ("max_call_levels", self.max_call_levels as u64),
            ("max_expr_depth", self.max_expr_depth as u64),
            (
                "max_function_expr_depth",
                self.max_function_expr_depth as u64,
            ),
            ("max_string_bytes", self.max_string_bytes as u64),
            ("max_array_len", self.max_array_len as u64),
            ("max_map_len", self.max_map_len as u64),
            ("max_state_bytes", self.max_state_bytes as u64),
            ("max_emit_bytes", self.max_emit_bytes as u64),
            ("max_timers_per_key", self.max_timers_per_key as u64),
            ("max_timers_per_advance", self.max_timers_per_advance as u64),
            ("max_topics_per_query", self.max_topics_per_query as u64),
            ("max_model_inputs", self.max_model_inputs as u64),
            ("max_model_outputs", self.max_model_outputs as u64),
            ("max_key_bytes", self.max_key_bytes as u64),
            ("max_keys_per_query", self.max_keys_per_query as u64),
            ("max_report_bytes", self.max_report_bytes as u64),
        ]
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_function_expr_depth: 32,
            max_string_bytes: 64 * 1024,
            max_array_len: 10_000,
            max_map_len: 10_000,
            max_state_bytes: 1024 * 1024,
            max_emit_bytes: 1024 * 1024,
            max_timers_per_key: 1_000,
            max_timers_per_advance: 100_000,
            max_topics_per_query: 64,
            max_model_inputs: 4096,
            max_model_outputs: 4096,
            max_key_bytes: 256,
            max_keys_per_query: 1_000_000,
            max_report_bytes: 1024 * 1024,
            models: crate::models::ModelCatalog::default(),
        }
    }
}

/// Names a query's top-level statements may set; they are defined (as `()`) before the
/// statements run, so `source = "trades";` works as well as `let source = "trades";`.
pub const SETTINGS: [&str; 6] = [
    "source",
    "key_by",
    "time_field",
    "lateness",
    "on_key_limit",
    "key_ttl",
];

/// The seed of Rhai's hashes, fixed: "eddy" in ASCII, then 1, 2, 3 (any value would do).
pub const HASHING_SEED: [u64; 4] = [0x6564_6479, 1, 2, 3];

/// Fixes the seed of Rhai's hashes for this process, so that the interpreter does the same work
/// in every run. Call it first thing, before any Rhai engine is made: an engine made before
/// would look its functions up by other hashes than it stored them under. The binary calls it
/// at the top of `main`; a second call changes nothing.
///
/// Rhai otherwise draws its seed at random when the process starts. Its function lookups then
/// take a different number of steps from one run to the next: on the interpreter, one text
/// query over the same posts counted 1.32 times the instructions in some runs of the same binary
/// as in others (`bash benches/callgrind.sh`'s `word_mood`; see BENCHMARKS.md, round 13). A
/// random seed guards hash tables filled from untrusted keys. Rhai's hash tables hold the
/// functions and `switch` cases of a query, written by the analyst who deploys it, so a fixed
/// seed gives an event's sender nothing to aim at: events' fields are looked up in them, never
/// added.
pub fn fix_hashing_seed() {
    // `Err` when a seed is set already: by an earlier call, since nothing else here sets one.
    let _ = rhai::config::hashing::set_hashing_seed(Some(HASHING_SEED));
}

/// A Rhai engine with every limit of `limits` set, the event type, the plugins and the models of
/// `limits.models` registered, and no way out of the sandbox. The engine's built-ins (`emit`, `key`, …) are added by the
/// shard that owns it.
pub fn new_engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_function_expr_depth)
        .set_max_string_size(limits.max_string_bytes)
        .set_max_array_size(limits.max_array_len)
        .set_max_map_size(limits.max_map_len)
        .set_max_modules(0)
        .set_strict_variables(true)
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.on_print(|text| tracing::info!(target: "eddy::script", "{text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "eddy::script", "{}{pos}: {text}", source.unwrap_or(""));
    });
    engine.register_global_module(eddy_plugins::EddyPackage::new().as_shared_module());
    register_event(&mut engine);
    crate::models::register(&mut engine, &limits.models);
    engine
}

/// The `event` type: read-only field access by name, plus a few methods; and events as feature
/// vectors of the learners (`lr.learn(ev.features, ev.y)` reads the nested object in place).
///
/// Only methods are registered, never property getters, so that `ev.len` still reads a field
/// called `len` through the indexer fallback.
fn register_event(engine: &mut Engine) {
    let mut learners = rhai::Module::new();
    eddy_plugins::register_learners::<Event>(&mut learners);
    engine.register_global_module(learners.into());
    engine
        .register_type_with_name::<Event>("event")
        .register_indexer_get(|ev: &mut Event, name: &str| ev.get(name))
        .register_indexer_set(
            |ev: &mut Event,
             name: &str,
             value: rhai::Dynamic|
             -> Result<(), Box<rhai::EvalAltResult>> {
                // Rhai writes a field back after a method called through it (`ev.tags.len()`,
                // `ev.tags.contains(x)`), whether the method changed it or not: the value the
                // field already holds is taken as it is, any other refused.
                if same_json(&ev.get(name), &value) {
                    return Ok(());
                }
                Err(format!(
                    "events are read-only: cannot set `{name}` (copy it with `ev.to_map()` first)"
                )
                .into())
            },
        )
        .register_fn("contains", |ev: &mut Event, name: &str| ev.contains(name))
        .register_fn("keys", |ev: &mut Event| -> rhai::Array {
            ev.keys()
                .map(|k| rhai::Dynamic::from(k.to_owned()))
                .collect()
        })
        .register_fn("len", |ev: &mut Event| ev.len() as rhai::INT)
        .register_fn("is_empty", |ev: &mut Event| ev.is_empty())
        .register_fn("to_map", |ev: &mut Event| ev.to_map())
        .register_fn("to_string", |ev: &mut Event| event_json(ev))
        .register_fn("to_debug", |ev: &mut Event| event_json(ev))
        .register_fn("to_json", |ev: &mut Event| event_json(ev));
}

/// Whether two values write the same JSON (an event's fields are JSON values).
fn same_json(a: &rhai::Dynamic, b: &rhai::Dynamic) -> bool {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    crate::json::write_dynamic(&mut x, a, usize::MAX).is_ok()
        && crate::json::write_dynamic(&mut y, b, usize::MAX).is_ok()
        && x == y
}

fn event_json(ev: &mut Event) -> String {
    let mut out = Vec::new();
    ev.write_json(&mut out);
    String::from_utf8(out).unwrap_or_default()
}
