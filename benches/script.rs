//! Script cost per event.
//!
//! `call_path`: the same VWAP logic made four ways, to choose how the engine calls Rhai:
//! - `native`: plain Rust over the same parsed events (the floor);
//! - `this_event`: eddy's way: `fn on_event(ev)` with `this` bound to the key's state, the event
//!   passed as a handle into the parsed frame, the scope reused;
//! - `this_map`: the same, but the event converted to a Rhai map first;
//! - `state_arg`: `fn on_event(state, ev)` returning the new state (no `this`);
//! - `eval_scope`: a script re-evaluated per event with `state` and `ev` in its scope.
//!
//! `query`: each shipped query over its sample input through the real router and shard,
//! emitted items encoded and dropped: the per-event cost an analyst's query has on one core.
//!
//! `learner`: the same, for a query per online learner and one for the ONNX model, over the
//! sensors sample (200 devices, one model per device): `baseline` builds the feature map and
//! nothing else, so each learner's own cost is its figure minus the baseline's.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eddy::compiled::EngineMode;
use eddy::router::{Clock, Delivery, Deployed, RouteSink, Router, Unnamed};
use eddy::{Emitted, Event, Key, Limits, Parser, QueryDef, QueryId, Shard};
use rhai::{CallFnOptions, Dynamic, Scope};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn sample(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(file),
    )
    .unwrap()
}

fn symbol(ev: &Event) -> String {
    ev.get("symbol").into_string().unwrap()
}

fn call_path(c: &mut Criterion) {
    let parsed = Parser::default().parse(sample("trades.ndjson"));
    let frame = parsed.frame;
    let events: Vec<Event> = (0..frame.len()).map(|i| frame.event(i)).collect();
    let n = events.len() as u64;
    let engine = eddy::sandbox::new_engine(&Limits::default());
    let mut group = c.benchmark_group("call_path");
    group.throughput(Throughput::Elements(n));

    group.bench_function("native", |b| {
        let mut states: HashMap<String, (f64, i64)> = HashMap::new();
        b.iter(|| {
            let mut last = 0.0;
            for ev in &events {
                let price = ev.get("price").as_float().unwrap();
                let size = ev.get("size").as_int().unwrap();
                let s = states.entry(symbol(ev)).or_default();
                s.0 += price * size as f64;
                s.1 += size;
                last = s.0 / s.1 as f64;
            }
            last
        })
    });

    let this_ast = engine
        .compile(
            "fn on_event(ev) { this.notional += ev.price * ev.size; this.volume += ev.size; this.notional / this.volume }",
        )
        .unwrap();
    let fresh = || {
        let mut m = rhai::Map::new();
        m.insert("notional".into(), Dynamic::from_float(0.0));
        m.insert("volume".into(), Dynamic::from_int(0));
        Dynamic::from_map(m)
    };
    let mut getters = eddy::sandbox::new_engine(&Limits::default());
    for field in ["price", "size"] {
        getters.register_get(field, move |ev: &mut Event| ev.get(field));
    }
    for (name, as_map, engine) in [
        ("this_event_indexer", false, &engine),
        ("this_event_getters", false, &getters),
        ("this_map", true, &engine),
    ] {
        group.bench_function(name, |b| {
            let mut states: HashMap<String, Dynamic> = HashMap::new();
            let mut scope = Scope::new();
            b.iter(|| {
                let mut last = Dynamic::UNIT;
                for ev in &events {
                    let state = states.entry(symbol(ev)).or_insert_with(fresh);
                    let arg = if as_map {
                        Dynamic::from_map(ev.to_map())
                    } else {
                        Dynamic::from(ev.clone())
                    };
                    let options = CallFnOptions::new()
                        .eval_ast(false)
                        .rewind_scope(true)
                        .bind_this_ptr(state);
                    last = engine
                        .call_fn_with_options::<Dynamic>(
                            options,
                            &mut scope,
                            &this_ast,
                            "on_event",
                            (arg,),
                        )
                        .unwrap();
                }
                last
            })
        });
    }

    let arg_ast = engine
        .compile("fn on_event(state, ev) { state.notional += ev.price * ev.size; state.volume += ev.size; state }")
        .unwrap();
    group.bench_function("state_arg", |b| {
        let mut states: HashMap<String, Dynamic> = HashMap::new();
        let mut scope = Scope::new();
        b.iter(|| {
            for ev in &events {
                let state = states.entry(symbol(ev)).or_insert_with(fresh);
                let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
                *state = engine
                    .call_fn_with_options::<Dynamic>(
                        options,
                        &mut scope,
                        &arg_ast,
                        "on_event",
                        (state.clone(), Dynamic::from(ev.clone())),
                    )
                    .unwrap();
            }
        })
    });

    let eval_ast = engine
        .compile_with_scope(
            &{
                let mut s = Scope::new();
                s.push("state", ());
                s.push("ev", ());
                s
            },
            "state.notional += ev.price * ev.size; state.volume += ev.size;",
        )
        .unwrap();
    group.bench_function("eval_scope", |b| {
        let mut states: HashMap<String, Dynamic> = HashMap::new();
        b.iter(|| {
            for ev in &events {
                let state = states.entry(symbol(ev)).or_insert_with(fresh);
                let mut scope = Scope::new();
                scope.push("state", std::mem::take(state));
                scope.push("ev", ev.clone());
                engine.run_ast_with_scope(&mut scope, &eval_ast).unwrap();
                *state = scope.get_value::<Dynamic>("state").unwrap();
            }
        })
    });
    group.finish();
}

/// Delivers straight into one shard and throws the output away.
struct Discard<'a> {
    shard: &'a mut Shard,
    out: Vec<Emitted>,
}

impl RouteSink for Discard<'_> {
    fn deliver(&mut self, _shard: usize, _: eddy::event::Position, d: Delivery) {
        self.shard.event(d);
        self.shard.take_output(&mut self.out);
        self.out.clear();
    }
    fn advanced(&mut self, _: QueryId, _: i64) {}
    fn reject(&mut self, r: eddy::event::Rejection) {
        panic!("rejected: {r}");
    }
}

fn queries(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("query");
    for (query, file) in [
        ("vwap", "trades.ndjson"),
        ("asof_join", "trades.ndjson"),
        ("trade_anomaly", "trades.ndjson"),
        ("ohlc_1m", "trades.ndjson"),
        ("price_alerts", "trades.ndjson"),
        ("sensor_anomaly", "sensors.ndjson"),
        ("hashtag_sentiment", "social.ndjson"),
        ("player_stats", "games.ndjson"),
    ] {
        let script = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("queries/{query}.rhai")),
        )
        .unwrap();
        let def = Arc::new(QueryDef::compile(query, &script, &limits).unwrap());
        let frame = Parser::default().parse(sample(file)).frame;
        // Side by side: compiled (where the compiler takes the query) and interpreted.
        for engine in [EngineMode::Auto, EngineMode::Interpreter] {
            let id = format!("{query}/{engine}");
            bench_query(
                &mut group,
                &id,
                Arc::clone(&def),
                Arc::clone(&frame),
                &limits,
                engine,
            );
        }
    }
    group.finish();
    let _ = Key::None;
}

/// Routes `frame` through a fresh shard running `def`, per iteration.
fn bench_query(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    def: Arc<QueryDef>,
    frame: Arc<eddy::Frame>,
    limits: &Limits,
    engine: EngineMode,
) {
    group.throughput(Throughput::Elements(frame.len() as u64));
    group.bench_with_input(BenchmarkId::from_parameter(id), &frame, |b, frame| {
        let mut round = 0u64;
        b.iter_batched_ref(
            || {
                // A fresh deployment each batch: state and watermark start over.
                round += 1;
                let mut shard = Shard::new(limits);
                shard.set_engine(engine);
                shard.deploy(QueryId(round), Arc::clone(&def)).unwrap();
                let router = Router::new(
                    vec![Arc::new(Deployed::new(QueryId(round), Arc::clone(&def)))],
                    eddy::router::TimePolicy::default(),
                );
                (shard, router)
            },
            |(shard, router)| {
                let mut sink = Discard {
                    shard,
                    out: Vec::new(),
                };
                router.route(
                    frame,
                    0,
                    None,
                    Unnamed::AllQueries,
                    Clock::Position,
                    1,
                    &mut sink,
                )
            },
            criterion::BatchSize::PerIteration,
        )
    });
}

fn learners(c: &mut Criterion) {
    let limits = Limits::default();
    limits
        .models
        .load_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
            &limits,
        )
        .unwrap();
    let mut group = c.benchmark_group("learner");
    let x = "#{ temp: ev.temp, humidity: ev.humidity }";
    for (name, init, call) in [
        ("baseline", "0", format!("let x = {x};")),
        (
            "linreg",
            "linreg()",
            format!("this.m.predict({x}); this.m.learn(#{{ humidity: ev.humidity }}, ev.temp);"),
        ),
        (
            "logreg",
            "logreg()",
            format!("this.m.predict_proba({x}); this.m.learn({x}, ev.temp > 25.0);"),
        ),
        (
            "scaler",
            "scaler()",
            format!("this.m.learn({x}); this.m.transform({x});"),
        ),
        (
            "hst",
            "hst()",
            format!("this.m.score({x}); this.m.learn({x});"),
        ),
        ("kmeans", "kmeans(5)", format!("this.m.learn({x});")),
        (
            "holt",
            "holt(0.3, 0.1)",
            "this.m.learn(ev.temp); this.m.forecast(10);".to_owned(),
        ),
        (
            "onnx_churn",
            "0",
            "model(\"churn\").predict([ev.temp, 1, 2, ev.humidity, 3]);".to_owned(),
        ),
    ] {
        let script = format!(
            "let source = \"sensors\"; let key_by = \"device.id\";
             fn init(key) {{ #{{ m: {init} }} }}
             fn on_event(ev) {{ {call} }}"
        );
        let def = Arc::new(QueryDef::compile(name, &script, &limits).unwrap());
        let frame = Parser::default().parse(sample("sensors.ndjson")).frame;
        bench_query(&mut group, name, def, frame, &limits, EngineMode::Auto);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = call_path, queries, learners
}
criterion_main!(benches);
