//! Tests of the query runtime through the offline runner: built-ins, event time and timers,
//! late events, runtime errors, and the sandbox against hostile scripts.

use serde_json::{json, Value};

use crate::offline::{self, RunOptions, RunSummary};
use crate::{Limits, QueryDef};

struct Run {
    items: Vec<Value>,
    rejected: String,
    summary: RunSummary,
}

impl Run {
    fn topic(&self, topic: &str) -> Vec<&Value> {
        self.items.iter().filter(|i| i["topic"] == topic).collect()
    }
    fn values(&self, topic: &str) -> Vec<&Value> {
        self.topic(topic).into_iter().map(|i| &i["value"]).collect()
    }
}

fn run_with(script: &str, input: &str, limits: &Limits) -> Run {
    let def = QueryDef::compile("q", script, limits).unwrap();
    // Scripts recurse on the native stack: give them the room the binary gives them.
    let input = input.as_bytes().to_vec();
    let limits = limits.clone();
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            // Every case runs on both engines, which must write the same bytes.
            let run_on = |engine| {
                let mut out = Vec::new();
                let mut err = Vec::new();
                let options = RunOptions {
                    engine,
                    ..RunOptions::default()
                };
                let summary = offline::run(
                    vec![def.clone()],
                    input.clone(),
                    &limits,
                    &options,
                    &mut out,
                    &mut err,
                )
                .unwrap();
                (out, err, summary)
            };
            let (out, err, summary) = run_on(crate::compiled::EngineMode::Auto);
            let interpreted = run_on(crate::compiled::EngineMode::Interpreter);
            assert!(
                (&out, &err) == (&interpreted.0, &interpreted.1),
                "the engines differ:\n{}\n---\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&interpreted.0)
            );
            let items = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            Run {
                items,
                rejected: String::from_utf8(err).unwrap(),
                summary,
            }
        })
        .unwrap()
        .join()
        .unwrap()
}

/// The `i`-th event of `frame` for query `id`, with no key and every time at 0.
fn delivery(id: u64, frame: &std::sync::Arc<crate::Frame>, i: usize) -> crate::shard::Delivery {
    crate::shard::Delivery {
        query: crate::QueryId(id),
        key: crate::Key::None,
        event: frame.event(i),
        time: 0,
        watermark: 0,
        source_mark: 0,
        now: 0,
    }
}

fn run(script: &str, input: &str) -> Run {
    run_with(script, input, &Limits::default())
}

#[test]
fn state_is_per_key_and_emit_carries_the_key() {
    let r = run(
        r#"let source = "s"; let key_by = "k";
           fn on_event(ev) { this.n = (this.n ?? 0) + ev.x; emit(this.n); }"#,
        "{\"k\":\"a\",\"x\":1}\n{\"k\":\"b\",\"x\":10}\n{\"k\":\"a\",\"x\":2}\n",
    );
    let got: Vec<_> = r
        .items
        .iter()
        .map(|i| (i["key"].clone(), i["value"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("a"), json!(1)),
            (json!("b"), json!(10)),
            (json!("a"), json!(3))
        ]
    );
    assert_eq!(r.summary.accepted, 3);
}

#[test]
fn init_builds_the_first_state() {
    let r = run(
        r#"let source = "s"; let key_by = "k";
           fn init(key) { #{ name: key, seen: 0 } }
           fn on_event(ev) { this.seen += 1; emit(this); }"#,
        "{\"k\":7}\n{\"k\":7}\n",
    );
    assert_eq!(
        r.values("q"),
        vec![
            &json!({"name": 7, "seen": 1}),
            &json!({"name": 7, "seen": 2})
        ]
    );
}

#[test]
fn int_and_float_fields_mix_and_nested_fields_read() {
    let r = run(
        r#"let source = "s";
           fn on_event(ev) { emit(#{ total: ev.price * ev.size, id: ev.device.id, tag: ev.tags[1],
                                     missing: ev.nope, has: "price" in ev, key: key() }); }"#,
        r#"{"price": 2.5, "size": 4, "device": {"id": "d1"}, "tags": ["x", "y"]}"#,
    );
    assert_eq!(
        r.values("q"),
        vec![
            &json!({"total": 10.0, "id": "d1", "tag": "y", "missing": null, "has": true, "key": null})
        ]
    );
}

#[test]
fn named_topics_and_emitting_the_event() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) { emit("alerts", ev); }"#,
        r#"{"a": [1, {"b": "c\"d"}]}"#,
    );
    assert_eq!(
        r.values("q.alerts"),
        vec![&json!({"a": [1, {"b": "c\"d"}]})]
    );
}

#[test]
fn emit_to_publishes_under_the_key_it_is_given() {
    // One state (no key_by), items keyed by what the script says: a string, an integer, a
    // boolean; on the main topic and on a named one.
    let r = run(
        r#"let source = "s";
           fn on_event(ev) {
               this.n = (this.n ?? 0) + 1;
               emit_to(ev.tag, this.n);
               emit_to("by_size", ev.size, #{ n: this.n });
               emit_to("flag", ev.size > 1, this.n);
           }"#,
        "{\"tag\":\"rust\",\"size\":1}\n{\"tag\":\"ai\",\"size\":2}\n",
    );
    let got: Vec<(Value, Value, Value)> = r
        .items
        .iter()
        .map(|i| (i["topic"].clone(), i["key"].clone(), i["value"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("q"), json!("rust"), json!(1)),
            (json!("q.by_size"), json!(1), json!({"n": 1})),
            (json!("q.flag"), json!(false), json!(1)),
            (json!("q"), json!("ai"), json!(2)),
            (json!("q.by_size"), json!(2), json!({"n": 2})),
            (json!("q.flag"), json!(true), json!(2)),
        ]
    );
}

#[test]
fn emit_to_refuses_keys_key_by_would_refuse() {
    // A float, a map, an array or () cannot be a key: the call fails, is published on
    // `q.errors` under the state's key, and what it emitted before is dropped.
    for (expr, kind) in [
        ("1.5", "a float"),
        ("#{ a: 1 }", "a map"),
        ("[1]", "an array"),
        ("()", "()"),
    ] {
        let script = format!(
            "let source = \"s\"; let key_by = \"k\";\nfn on_event(ev) {{\n  emit_to(\"ok\", 1);\n  emit_to({expr}, 2);\n}}"
        );
        let r = run(&script, "{\"k\":\"a\"}");
        assert_eq!(r.values("q"), Vec::<&Value>::new(), "{expr}");
        let errors = r.topic("q.errors");
        assert_eq!(errors.len(), 1, "{expr}: {:?}", r.items);
        let error = errors[0]["value"]["error"].as_str().unwrap();
        assert!(
            error.contains("`emit_to`: the key must be a string, an integer or a boolean")
                && error.ends_with(&format!("found {kind}")),
            "{expr}: {error}"
        );
        assert_eq!(errors[0]["key"], json!("a"));
        assert_eq!(errors[0]["value"]["line"], json!(4));
    }
    // Topic names are checked as for `emit`.
    let r = run(
        r#"let source = "s"; fn on_event(ev) { emit_to("late", "k", 1); }"#,
        "{}",
    );
    let errors = r.values("q.errors");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("reserved"),
        "{errors:?}"
    );
}

#[test]
fn bad_topic_names_are_errors() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) { emit("errors", 1); }"#,
        "{}",
    );
    let errors = r.values("q.errors");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["error"].as_str().unwrap().contains("reserved"),
        "{errors:?}"
    );
}

#[test]
fn missing_key_or_time_rejects_the_event_with_its_position() {
    let r = run(
        r#"let source = "s"; let key_by = "k"; let time_field = "ts";
           fn on_event(ev) { emit(1); }"#,
        "{\"k\":1,\"ts\":5}\n{\"ts\":6}\n{\"k\":[1],\"ts\":7}\n{\"k\":2,\"ts\":\"x\"}\n{\"k\":3,\"ts\":8}\n",
    );
    assert_eq!(r.values("q").len(), 2);
    assert_eq!(r.summary.rejected, 3);
    let lines: Vec<&str> = r.rejected.lines().collect();
    assert!(
        lines[0].contains("event 1 (line 2)")
            && lines[0].contains("`k`")
            && lines[0].contains("missing"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("line 3") && lines[1].contains("found an array"),
        "{lines:?}"
    );
    assert!(
        lines[2].contains("line 4")
            && lines[2].contains("`ts`")
            && lines[2].contains("found a string"),
        "{lines:?}"
    );
}

#[test]
fn timers_fire_in_order_when_the_watermark_passes_and_at_end_of_input() {
    // Each event sets a timer 10 ms after its time; the watermark is the newest time seen.
    let r = run(
        r#"let source = "s"; let key_by = "k"; let time_field = "t";
           fn on_event(ev) { set_timer(ev.t + 10); emit(#{ event: ev.t, wm: watermark() }); }
           fn on_timer(t) { emit("fired", #{ t: t, wm: watermark() }); }"#,
        "{\"k\":\"a\",\"t\":100}\n{\"k\":\"b\",\"t\":105}\n{\"k\":\"a\",\"t\":112}\n{\"k\":\"b\",\"t\":113}\n",
    );
    let order: Vec<(String, i64)> = r
        .items
        .iter()
        .map(|i| {
            let v = &i["value"];
            let t = v.get("event").or(v.get("t")).unwrap().as_i64().unwrap();
            (i["topic"].as_str().unwrap().to_owned(), t)
        })
        .collect();
    let expected: Vec<(String, i64)> = [
        ("q", 100),
        ("q", 105),
        ("q.fired", 110), // a's timer: watermark reached 112 before the event at 112
        ("q", 112),
        ("q", 113),       // b's timer at 115 is still pending: watermark 113
        ("q.fired", 115), // end of input: everything fires, in time order
        ("q.fired", 122),
        ("q.fired", 123),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b))
    .collect();
    assert_eq!(order, expected);
    assert_eq!(r.summary.timers_fired, 4);
    assert_eq!(r.values("q.fired")[0]["wm"], json!(112));
}

#[test]
fn late_events_go_to_the_late_topic() {
    let r = run(
        r#"let source = "s"; let key_by = "k"; let time_field = "t"; let lateness = 5;
           fn on_event(ev) { emit(ev.t); }"#,
        "{\"k\":1,\"t\":100}\n{\"k\":1,\"t\":96}\n{\"k\":2,\"t\":94}\n{\"k\":1,\"t\":95}\n",
    );
    // watermark after the first event: 95. 96 is in time, 94 is late, 95 is not (< only).
    assert_eq!(r.values("q"), vec![&json!(100), &json!(96), &json!(95)]);
    let late = r.topic("q.late");
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["key"], json!(2));
    assert_eq!(
        late[0]["value"],
        json!({"event": {"k": 2, "t": 94}, "event_time": 94, "watermark": 95})
    );
    assert_eq!(r.summary.late, 1);
}

#[test]
fn forget_drops_the_state_and_its_timers() {
    let r = run(
        r#"let source = "s"; let key_by = "k"; let time_field = "t";
           fn on_event(ev) { this.n = (this.n ?? 0) + 1; emit(this.n); set_timer(1000);
                             if ev.drop == true { forget(); } }
           fn on_timer(t) { emit("fired", this.n); }"#,
        "{\"k\":1,\"t\":1}\n{\"k\":1,\"t\":2,\"drop\":true}\n{\"k\":1,\"t\":3}\n",
    );
    assert_eq!(r.values("q"), vec![&json!(1), &json!(2), &json!(1)]);
    assert_eq!(r.values("q.fired"), vec![&json!(1)]);
}

#[test]
fn runtime_error_skips_the_event_drops_its_emits_and_is_published() {
    let r = run(
        "let source = \"s\"; let key_by = \"k\";\nfn on_event(ev) {\n  emit(\"before\", 1);\n  let x = ev.a * ev.b;\n  emit(x);\n}",
        "{\"k\":\"a\",\"a\":1,\"b\":2}\n{\"k\":\"a\",\"a\":1,\"b\":\"x\"}\n{\"k\":\"a\",\"a\":3,\"b\":4}\n",
    );
    assert_eq!(r.values("q"), vec![&json!(2), &json!(12)]);
    assert_eq!(
        r.values("q.before").len(),
        2,
        "the failed call's emits are dropped"
    );
    let errors = r.topic("q.errors");
    assert_eq!(errors.len(), 1);
    let e = &errors[0]["value"];
    assert_eq!(
        (
            e["line"].as_i64(),
            e["function"].as_str(),
            e["key"].as_str()
        ),
        (Some(4), Some("on_event"), Some("a"))
    );
    assert!(e["error"].as_str().unwrap().contains('*'), "{e}");
    assert_eq!(r.summary.errors, 1);
}

#[test]
fn endless_loop_is_stopped() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) { if ev.bad == true { loop { } } emit(ev.n); }"#,
        "{\"n\":1}\n{\"n\":2,\"bad\":true}\n{\"n\":3}\n",
    );
    assert_eq!(r.values("q"), vec![&json!(1), &json!(3)]);
    let errors = r.values("q.errors");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("max_operations"),
        "{errors:?}"
    );
}

#[test]
fn memory_bombs_are_stopped() {
    for bomb in [
        r#"let s = "xxxxxxxx"; loop { s += s; }"#,
        r#"let a = [1]; loop { a += a; }"#,
        r#"let m = #{}; let i = 0; loop { m[i.to_string()] = i; i += 1; }"#,
        r#"let a = []; a.pad(100000000, 0);"#,
        r#"ring(1000000000);"#,
        r#"let s = "x"; s.pad(1000000000, 'y');"#,
    ] {
        let script = format!(
            "let source = \"s\"; fn on_event(ev) {{ if ev.bad == true {{ {bomb} }} emit(ev.n); }}"
        );
        let r = run(&script, "{\"n\":1}\n{\"n\":2,\"bad\":true}\n{\"n\":3}\n");
        assert_eq!(r.values("q"), vec![&json!(1), &json!(3)], "{bomb}");
        assert_eq!(r.values("q.errors").len(), 1, "{bomb}");
    }
}

#[test]
fn deep_recursion_is_stopped() {
    let r = run(
        r#"let source = "s"; fn down(n) { down(n + 1) } fn on_event(ev) { if ev.bad == true { down(0); } emit(ev.n); }"#,
        "{\"n\":1}\n{\"n\":2,\"bad\":true}\n{\"n\":3}\n",
    );
    assert_eq!(r.values("q"), vec![&json!(1), &json!(3)]);
    let errors = r.values("q.errors");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("max_call_levels"),
        "{errors:?}"
    );
}

#[test]
fn state_that_grows_past_its_limit_is_dropped() {
    let limits = Limits {
        max_state_bytes: 2_000,
        ..Limits::default()
    };
    let r = run_with(
        r#"let source = "s"; fn on_event(ev) { if this.log == () { this.log = []; } this.log.push("0123456789012345678901234567890123456789"); emit(this.log.len()); }"#,
        &"{}\n".repeat(40),
        &limits,
    );
    let counts: Vec<i64> = r.values("q").iter().map(|v| v.as_i64().unwrap()).collect();
    // about 2000 / (40 + 32) entries fit; then the state is dropped and starts over
    let errors = r.values("q.errors");
    assert!(!errors.is_empty());
    assert!(errors[0]["error"]
        .as_str()
        .unwrap()
        .contains("max_state_bytes"));
    let peak = *counts.iter().max().unwrap();
    assert!((20..=40).contains(&peak), "{counts:?}");
    assert!(
        counts.windows(2).any(|w| w[1] == 1 && w[0] > 1),
        "state restarted: {counts:?}"
    );
}

#[test]
fn builtins_refuse_to_run_at_the_top_level() {
    let err = QueryDef::compile(
        "q",
        "let source = \"s\"; emit(1); fn on_event(ev) {}",
        &Limits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("only be called from"), "{err}");
}

#[test]
fn set_timer_without_on_timer_is_an_error() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) { set_timer(5); }"#,
        "{}",
    );
    let errors = r.values("q.errors");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("on_timer"),
        "{errors:?}"
    );
}

#[test]
fn events_are_read_only() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) { ev.x = 1; }"#,
        "{\"x\":0}",
    );
    let errors = r.values("q.errors");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("read-only"),
        "{errors:?}"
    );
}

/// A method called through an event's field reads it (Rhai writes the field back afterwards,
/// unchanged, which the event takes), on both engines; one that changes the field is refused
/// (and the call's items with it).
#[test]
fn methods_through_event_fields_read_and_may_not_change_them() {
    let r = run(
        r#"let source = "s"; fn on_event(ev) {
            emit([ev.tags.len(), ev.tags.contains("b"), ev.m.keys(), ev.m.contains("k"),
                  ev.s.len(), ev.tags.is_empty()]);
            if ev.change { ev.tags.push("c"); }
        }"#,
        "{\"tags\":[\"a\",\"b\"],\"m\":{\"k\":1},\"s\":\"héllo\",\"change\":false}\n\
         {\"tags\":[],\"m\":{},\"s\":\"\",\"change\":false}\n\
         {\"tags\":[],\"m\":{},\"s\":\"\",\"change\":true}",
    );
    assert_eq!(
        r.values("q"),
        [
            &json!([2, true, ["k"], true, 5, false]),
            &json!([0, false, [], false, 0, true])
        ]
    );
    let errors = r.values("q.errors");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("events are read-only: cannot set `tags`"),
        "{errors:?}"
    );
}

#[test]
fn stream_field_selects_queries() {
    let r = run(
        r#"let source = ["a", "b"]; fn on_event(ev) { emit(ev.n); }"#,
        "{\"stream\":\"a\",\"n\":1}\n{\"stream\":\"c\",\"n\":2}\n{\"stream\":\"b\",\"n\":3}\n{\"n\":4}\n",
    );
    assert_eq!(r.values("q"), vec![&json!(1), &json!(3), &json!(4)]);
}

#[test]
fn call_times_are_measured_when_asked() {
    let limits = Limits::default();
    let def = std::sync::Arc::new(
        QueryDef::compile(
            "q",
            "let source = \"s\"; fn on_event(ev) { let x = 0; for i in 0..100 { x += i; } }",
            &limits,
        )
        .unwrap(),
    );
    let mut shard = crate::Shard::new(&limits);
    shard.measure_calls(true);
    shard.deploy(crate::QueryId(1), def).unwrap();
    let frame = crate::Parser::default()
        .parse(b"{}\n{}\n{}\n".to_vec())
        .frame;
    for i in 0..frame.len() {
        shard.event(delivery(1, &frame, i));
    }
    let hist = shard.eval_histogram(crate::QueryId(1)).unwrap();
    assert_eq!(hist.len(), 3);
    // A hundred loop iterations take well over a microsecond.
    assert!(
        hist.value_at_quantile(0.5) > 1_000,
        "{}",
        hist.value_at_quantile(0.5)
    );
    let mut merged = crate::shard::latency_histogram();
    merged.add(hist).unwrap();
    assert_eq!(merged.len(), 3);
}

#[test]
fn property_names_are_found() {
    let names: Vec<&str> =
        super::property_names("this.n += ev.price * ev.dev.id; x.len(); a . b; ev.to_map ()")
            .collect();
    assert_eq!(names, ["n", "price", "dev", "id"]);
}

#[test]
fn a_query_past_its_cpu_budget_is_quarantined_and_its_events_skipped() {
    let limits = Limits::default();
    let def = std::sync::Arc::new(
        QueryDef::compile(
            "greedy",
            "let source = \"s\"; fn on_event(ev) { let x = 0; for i in 0..2000 { x += i; } }",
            &limits,
        )
        .unwrap(),
    );
    let mut shard = crate::Shard::new(&limits);
    shard.set_cpu_budget(Some(crate::shard::CpuBudget {
        share: 0.5,
        window: std::time::Duration::from_millis(20),
    }));
    shard
        .deploy(crate::QueryId(1), std::sync::Arc::clone(&def))
        .unwrap();
    let frame = crate::Parser::default().parse(b"{}\n".repeat(2000)).frame;
    // Alone on its shard, a query is never quarantined: it slows nobody else.
    for i in 0..200 {
        shard.event(delivery(1, &frame, i));
    }
    assert!(!shard.is_quarantined(crate::QueryId(1)));
    let cheap = QueryDef::compile("cheap", "let source = \"s\"; fn on_event(ev) { }", &limits);
    shard
        .deploy(crate::QueryId(2), std::sync::Arc::new(cheap.unwrap()))
        .unwrap();
    for i in 0..frame.len() {
        shard.event(delivery(2, &frame, i));
        shard.event(delivery(1, &frame, i));
    }
    let stats = shard.stats(crate::QueryId(1)).unwrap();
    assert!(shard.is_quarantined(crate::QueryId(1)));
    assert!(!shard.is_quarantined(crate::QueryId(2)));
    assert!(stats.skipped > 0, "{stats:?}");
    assert_eq!(stats.events + stats.skipped, 2200, "{stats:?}");
    assert_eq!(shard.stats(crate::QueryId(2)).unwrap().events, 2000);
    let mut out = Vec::new();
    shard.take_output(&mut out);
    let errors: Vec<_> = out
        .iter()
        .filter(|i| &*i.topic == "greedy.errors")
        .collect();
    assert_eq!(errors.len(), 1);
    let text = String::from_utf8_lossy(&errors[0].value);
    assert!(
        text.contains("quarantined") && text.contains("max_query_cpu"),
        "{text}"
    );
}

/// A checkpoint copies keys a few at a time while events keep coming: the copy must be the
/// state at the moment it began. Checked against a second shard given only the events before
/// that moment and copied at once.
#[test]
fn a_checkpoint_copy_is_the_state_where_it_began_while_events_go_on() {
    use crate::shard::Shard;
    use std::collections::BTreeMap;
    let script = r#"let source = "s"; let key_by = "k"; let time_field = "t";
        fn on_event(ev) {
            this.n = (this.n ?? 0) + 1;
            this.sum = (this.sum ?? 0) + ev.x;
            if this.n == 4 { forget(); }
            set_timer(ev.t + 10);
        }
        fn on_timer(t) { this.fired = (this.fired ?? 0) + 1; }"#;
    let def = std::sync::Arc::new(QueryDef::compile("q", script, &Limits::default()).unwrap());
    let mut input = String::new();
    for i in 0..600 {
        input.push_str(&format!("{{\"k\":{},\"x\":{i},\"t\":{i}}}\n", i % 97));
    }
    let frame = crate::Parser::default().parse(input.into_bytes()).frame;
    let deliver = |shard: &mut Shard, i: usize| {
        let key = crate::Key::Int((i % 97) as i64);
        shard.event(crate::shard::Delivery {
            query: crate::QueryId(1),
            key,
            event: frame.event(i),
            time: i as i64,
            watermark: i as i64 - 5,
            source_mark: i as i64 - 5,
            now: 0,
        });
    };
    let copy_of = |c: crate::durable::ShardQueryCheckpoint| {
        let keys: BTreeMap<String, String> = c
            .keys
            .into_iter()
            .map(|k| {
                let state = k.state.into_dynamic();
                (format!("{:?}", k.key), format!("{state:?} {:?}", k.timers))
            })
            .collect();
        (c.watermark, keys)
    };
    let point = 300;
    let mut reference = Shard::new(&Limits::default());
    reference
        .deploy(crate::QueryId(1), std::sync::Arc::clone(&def))
        .unwrap();
    let mut live = Shard::new(&Limits::default());
    live.deploy(crate::QueryId(1), def).unwrap();
    for i in 0..point {
        deliver(&mut reference, i);
        deliver(&mut live, i);
    }
    let want = copy_of(reference.export(crate::QueryId(1)).unwrap());
    assert!(want.1.len() > 50, "{}", want.1.len());
    // The live shard copies 2 keys between events, while timers fire and keys are forgotten
    // and made anew.
    live.begin_export(&[crate::QueryId(1)]);
    let mut got = None;
    for i in point..600 {
        deliver(&mut live, i);
        if let Some(mut done) = live.export_step(2) {
            got = Some(done.pop().unwrap().1);
            break;
        }
    }
    assert_eq!(copy_of(got.expect("the copy completed")), want);
}

#[test]
fn dropping_a_partitions_keys_takes_their_state_and_timers_and_nothing_else() {
    use crate::shard::Shard;
    let script = r#"let source = "s"; let key_by = "k"; let time_field = "t";
        fn on_event(ev) { this.n = (this.n ?? 0) + 1; set_timer(ev.t + 1000); }
        fn on_timer(t) { emit(this.n); }"#;
    let def = std::sync::Arc::new(QueryDef::compile("q", script, &Limits::default()).unwrap());
    let mut input = String::new();
    for i in 0..200 {
        input.push_str(&format!("{{\"k\":{},\"t\":{i}}}\n", i % 40));
    }
    let frame = crate::Parser::default().parse(input.into_bytes()).frame;
    let mut shard = Shard::new(&Limits::default());
    shard.deploy(crate::QueryId(1), def).unwrap();
    for i in 0..200 {
        shard.event(crate::shard::Delivery {
            query: crate::QueryId(1),
            key: crate::Key::Int((i % 40) as i64),
            event: frame.event(i),
            time: i as i64,
            watermark: i as i64,
            source_mark: i as i64,
            now: 0,
        });
    }
    let in_partition = |k: &crate::Key| k.shard(8) == 3;
    let doomed = (0..40)
        .filter(|&k| in_partition(&crate::Key::Int(k)))
        .count();
    assert!(doomed > 0 && doomed < 40, "{doomed}");
    assert_eq!(shard.drop_keys(in_partition), doomed);
    let left = shard.export(crate::QueryId(1)).unwrap();
    assert_eq!(left.keys.len(), 40 - doomed);
    for k in &left.keys {
        let key = crate::Key::from(k.key.clone());
        assert!(!in_partition(&key), "{key} should be gone");
        assert_eq!(k.timers.len(), 5, "{key} keeps its timers (one per event)");
    }
    // Past every timer: only the keys left fire, five times each, with their count.
    shard.advance(crate::QueryId(1), 10_000, 0);
    let mut fired = Vec::new();
    shard.take_output(&mut fired);
    let fired: Vec<_> = fired.into_iter().filter(|e| &*e.topic == "q").collect();
    assert_eq!(fired.len(), 5 * (40 - doomed), "{fired:?}");
    assert!(fired
        .iter()
        .all(|e| !in_partition(&e.key) && e.value == b"5"));
}

const COUNT_PER_KEY: &str = r#"let source = "s"; let key_by = "k"; let time_field = "ts";
    fn on_event(ev) { this.n = (this.n ?? 0) + 1; emit(this.n); }"#;

/// `(key, value)` of each item on `topic`, in order.
fn keyed(r: &Run, topic: &str) -> Vec<(String, Value)> {
    r.topic(topic)
        .into_iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap_or("").to_owned(),
                i["value"].clone(),
            )
        })
        .collect()
}

fn events(keys: &[(&str, i64)]) -> String {
    keys.iter()
        .map(|(k, ts)| format!("{{\"k\":\"{k}\",\"ts\":{ts}}}\n"))
        .collect()
}

#[test]
fn a_key_longer_than_max_key_bytes_rejects_its_event_with_position_and_reason() {
    let limits = Limits {
        max_key_bytes: 8,
        ..Limits::default()
    };
    let r = run_with(
        COUNT_PER_KEY,
        &events(&[("short", 1), ("much-too-long", 2), ("12345678", 3)]),
        &limits,
    );
    assert_eq!(r.summary.rejected, 1);
    assert_eq!(keyed(&r, "q").len(), 2);
    let line = r.rejected.lines().next().unwrap();
    assert!(
        line.contains("event 1 (line 2)")
            && line.contains("13 bytes long")
            && line.contains("limit of 8 (max_key_bytes)"),
        "{line}"
    );
}

#[test]
fn past_max_keys_per_query_the_least_recently_seen_key_is_evicted_and_reported() {
    let limits = Limits {
        max_keys_per_query: 3,
        ..Limits::default()
    };
    // a b c fill the shard; a is seen again, so b is the least recently seen when d comes,
    // then c when b comes back (with a fresh state).
    let r = run_with(
        COUNT_PER_KEY,
        &events(&[
            ("a", 1),
            ("b", 2),
            ("c", 3),
            ("a", 4),
            ("d", 5),
            ("b", 6),
            ("a", 7),
        ]),
        &limits,
    );
    let counts: Vec<(String, Value)> = [
        ("a", 1),
        ("b", 1),
        ("c", 1),
        ("a", 2),
        ("d", 1),
        ("b", 1),
        ("a", 3),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), json!(n)))
    .collect();
    assert_eq!(keyed(&r, "q"), counts);
    let errors = r.values("q.errors");
    assert_eq!(errors.len(), 2, "{errors:?}");
    // The offline runner hands the output on after every event: one report each.
    let evicted: Vec<&Value> = errors.iter().map(|e| &e["keys"]).collect();
    assert_eq!(evicted, [&json!(["b"]), &json!(["c"])]);
    assert_eq!(errors[0]["evicted"], 1);
    let msg = errors[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("1 least recently seen key(s) evicted") && msg.contains("max_keys_per_query"),
        "{msg}"
    );
}

#[test]
fn with_on_key_limit_reject_new_keys_are_refused_and_old_ones_kept() {
    let limits = Limits {
        max_keys_per_query: 2,
        ..Limits::default()
    };
    let script = format!("let on_key_limit = \"reject\"; {COUNT_PER_KEY}");
    let r = run_with(
        &script,
        &events(&[("a", 1), ("b", 2), ("c", 3), ("a", 4), ("c", 5)]),
        &limits,
    );
    let counts: Vec<(String, Value)> = [("a", 1), ("b", 1), ("a", 2)]
        .iter()
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    assert_eq!(keyed(&r, "q"), counts);
    let refused: Vec<&Value> = r.values("q.errors").iter().map(|e| &e["keys"]).collect();
    assert_eq!(refused, [&json!(["c"]), &json!(["c"])]);
    assert_eq!(r.values("q.errors")[0]["refused"], 1);
    let msg = r.values("q.errors")[0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("not handled") && msg.contains("on_key_limit is \"reject\""),
        "{msg}"
    );
}

#[test]
fn a_key_not_seen_for_key_ttl_in_event_time_is_forgotten() {
    let script = format!("let key_ttl = 10; {COUNT_PER_KEY}");
    // At ts 20 the watermark passes a's last event (0) by more than 10: a is forgotten; b, seen
    // at 15, is kept.
    let r = run(
        &script,
        &events(&[("a", 0), ("b", 15), ("b", 20), ("a", 21), ("b", 22)]),
    );
    let counts: Vec<(String, Value)> = [("a", 1), ("b", 1), ("b", 2), ("a", 1), ("b", 3)]
        .iter()
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    assert_eq!(keyed(&r, "q"), counts);
}

#[test]
fn a_key_with_pending_timers_outlives_its_ttl_until_they_fire() {
    let script = r#"let source = "s"; let key_by = "k"; let time_field = "ts"; let key_ttl = 10;
        fn on_event(ev) { this.n = (this.n ?? 0) + 1; if ev.k == "a" { set_timer(ev.ts + 50) } }
        fn on_timer(t) { emit(this.n) }"#;
    let r = run(
        script,
        &events(&[("a", 0), ("a", 1), ("b", 30), ("b", 60), ("b", 100)]),
    );
    // a's state (2 events) survives its ttl until the timers at 50 and 51 fire.
    assert_eq!(
        keyed(&r, "q"),
        [("a".into(), json!(2)), ("a".into(), json!(2))]
    );
}

#[test]
fn plugin_objects_one_call_creates_are_bounded_by_max_state_bytes() {
    // 10,000 quantiles(5) would take 20 GB; the call fails at the limit instead.
    let r = run(
        r#"let source = "s";
           fn on_event(ev) { let all = []; for i in 0..10000 { all.push(quantiles(5)); } emit(all.len()); }"#,
        "{\"x\":1}\n",
    );
    assert!(r.values("q").is_empty());
    let errors = r.values("q.errors");
    assert_eq!(errors.len(), 1);
    let msg = errors[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("plugin objects created in one call") && msg.contains("(max_state_bytes)"),
        "{msg}"
    );
    // Within the limit, objects are made as before, call after call.
    let r = run(
        r#"let source = "s";
           fn on_event(ev) { let a = [quantiles(), quantiles()]; emit(a.len()); }"#,
        "{\"x\":1}\n{\"x\":2}\n{\"x\":3}\n",
    );
    assert_eq!(r.values("q"), [&json!(2), &json!(2), &json!(2)]);
}

#[test]
fn a_late_event_larger_than_max_emit_bytes_is_reported_without_its_body() {
    let limits = Limits {
        max_emit_bytes: 100,
        ..Limits::default()
    };
    let big = "x".repeat(500);
    let input = format!("{{\"ts\":10}}\n{{\"ts\":1,\"pad\":\"{big}\"}}\n{{\"ts\":2}}\n");
    let r = run_with(
        r#"let source = "s"; let time_field = "ts"; fn on_event(ev) { }"#,
        &input,
        &limits,
    );
    let late = r.values("q.late");
    assert_eq!(late.len(), 2);
    assert_eq!(late[0]["event"], Value::Null);
    // `{"ts":1,"pad":"` + 500 x + `"}`
    assert_eq!(late[0]["event_bytes"], 15 + 500 + 2);
    assert_eq!(late[0]["event_time"], 1);
    assert_eq!(late[1]["event"], json!({"ts": 2}));
}

/// A flood of failing calls and late events publishes at most `max_report_bytes` of items on
/// `.errors` and `.late` per batch, and one item that counts the rest; the counters count all.
#[test]
fn late_and_error_items_are_bounded_per_batch_and_the_rest_counted() {
    use crate::shard::Shard;
    let limits = Limits {
        max_report_bytes: 1000,
        ..Limits::default()
    };
    let script = r#"let source = "s"; let key_by = "k"; let time_field = "t";
        fn on_event(ev) { if ev.x > 0 { throw "bad event"; } }"#;
    let def = std::sync::Arc::new(QueryDef::compile("q", script, &limits).unwrap());
    let mut shard = Shard::new(&limits);
    shard.deploy(crate::QueryId(1), def).unwrap();
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&format!("{{\"k\":{i},\"x\":1,\"t\":{}}}\n", 1000 + i));
    }
    let frame = crate::Parser::default().parse(input.into_bytes()).frame;
    let batch = |shard: &mut Shard, late: bool| {
        for i in 0..100 {
            let time = if late { 0 } else { 1000 + i };
            shard.event(crate::shard::Delivery {
                query: crate::QueryId(1),
                key: crate::Key::Int(i),
                event: frame.event(i as usize),
                time,
                watermark: 500,
                source_mark: 500,
                now: 0,
            });
        }
        let mut out = Vec::new();
        shard.take_output(&mut out);
        out
    };
    for late in [false, true, false] {
        let out = batch(&mut shard, late);
        let topic = if late { "q.late" } else { "q.errors" };
        let is_summary = |v: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(v)
                .unwrap()
                .get("late_not_published")
                .is_some()
        };
        let items: Vec<_> = out
            .iter()
            .filter(|i| &*i.topic == topic && !is_summary(&i.value))
            .collect();
        let bytes: usize = items.iter().map(|i| i.value.len()).sum();
        let summaries: Vec<serde_json::Value> = out
            .iter()
            .filter(|i| &*i.topic == "q.errors")
            .map(|i| serde_json::from_slice(&i.value).unwrap())
            .filter(|v: &serde_json::Value| v.get("late_not_published").is_some())
            .collect();
        assert!(bytes <= 1000, "{bytes}");
        assert!(!items.is_empty());
        let published = items.len();
        let field = if late {
            "late_not_published"
        } else {
            "errors_not_published"
        };
        assert_eq!(summaries.len(), 1, "{summaries:?}");
        assert_eq!(
            summaries[0][field].as_u64().unwrap() as usize + published,
            100,
            "{summaries:?}"
        );
        assert!(summaries[0]["error"]
            .as_str()
            .unwrap()
            .contains("max_report_bytes"));
    }
    let stats = shard.stats(crate::QueryId(1)).unwrap();
    assert_eq!((stats.errors, stats.late), (200, 100));
}

/// The recency list against a plain model (a vector, least recently seen first), through
/// touches, new keys and removals that move the last key into the removed one's place.
#[test]
fn the_recency_list_keeps_the_order_keys_were_last_seen_through_removals() {
    use super::{KeyState, Recency, State, States};
    use crate::key::Key;
    let mut states = States::default();
    let mut recency = Recency::default();
    let mut model: Vec<i64> = Vec::new();
    // A fixed pseudo-random walk (xorshift), so that a failure repeats.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..20_000 {
        let key = next(40) as i64;
        match next(4) {
            0 if !model.is_empty() => {
                // Remove a key as drop_key does.
                let k = model[next(model.len() as u64) as usize];
                let index = states.get_index_of(&Key::Int(k)).expect("held");
                recency.remove(&mut states, index);
                states.swap_remove_index(index);
                model.retain(|&m| m != k);
            }
            _ => {
                let index = match states.get_index_of(&Key::Int(key)) {
                    Some(i) => i,
                    None => {
                        let entry = KeyState::new(State::Slots(Box::new([])));
                        states.insert_full(Key::Int(key), entry).0
                    }
                };
                recency.touch(&mut states, index, step);
                model.retain(|&m| m != key);
                model.push(key);
            }
        }
        let oldest = recency.oldest(&states).cloned();
        assert_eq!(oldest, model.first().map(|&k| Key::Int(k)), "step {step}");
    }
    // Walking the whole list from the oldest gives the model's order.
    let mut order = Vec::new();
    let mut at = recency.head;
    while at != super::NIL {
        let (k, e) = states.get_index(at).expect("linked");
        order.push(k.clone());
        at = e.next;
    }
    let want: Vec<Key> = model.iter().map(|&k| Key::Int(k)).collect();
    assert_eq!(order, want);
}

/// `Shard::has_output`, which `eddy run` checks after every event before it takes the output,
/// is true exactly when `take_output` hands out something: emitted items, a key-limit report
/// or a summary of late items that did not fit, including after events that emitted nothing.
#[test]
fn has_output_is_true_exactly_when_take_output_hands_out_items() {
    use crate::shard::Shard;
    let limits = Limits {
        max_keys_per_query: 2,
        max_report_bytes: 10,
        ..Limits::default()
    };
    let script = r#"let source = "s"; let key_by = "k"; let time_field = "t";
        let on_key_limit = "reject";
        fn on_event(ev) { if ev.x == 1 { emit(#{ x: ev.x }); } }"#;
    let def = std::sync::Arc::new(QueryDef::compile("q", script, &limits).unwrap());
    let mut shard = Shard::new(&limits);
    shard.deploy(crate::QueryId(1), def).unwrap();
    // (key, x, time): x = 1 emits; a third key is refused; time 0 is late (its item is larger
    // than max_report_bytes, so only counted).
    let events = [
        (0, 0, 10),
        (0, 1, 11),
        (1, 0, 12),
        (2, 0, 13),
        (1, 0, 0),
        (1, 0, 14),
        (2, 1, 15),
        (0, 1, 16),
    ];
    let input: String = events
        .iter()
        .map(|(k, x, t)| format!("{{\"k\":{k},\"x\":{x},\"t\":{t}}}\n"))
        .collect();
    let frame = crate::Parser::default().parse(input.into_bytes()).frame;
    let mut handed = Vec::new();
    for (i, &(k, _, t)) in events.iter().enumerate() {
        shard.event(crate::shard::Delivery {
            query: crate::QueryId(1),
            key: crate::Key::Int(k),
            event: frame.event(i),
            time: t,
            watermark: 5,
            source_mark: 5,
            now: 0,
        });
        let said = shard.has_output();
        let mut out = Vec::new();
        shard.take_output(&mut out);
        assert_eq!(said, !out.is_empty(), "after event {i}: {out:?}");
        handed.push(out.len());
        assert!(!shard.has_output(), "after taking the output of event {i}");
    }
    // Emits at 1, 6 (refused: a report instead), 7; refused key at 3 and 6; late at 4.
    assert_eq!(handed, [0, 1, 0, 1, 1, 0, 1, 1]);
}

/// Two queries on one shard name the same top-level constant, with different values, where
/// Rhai keeps the name (the object of `contains`): each call reads its own script's value, on
/// both engines, and a replace brings the new script's value.
#[test]
fn each_script_reads_its_own_top_level_constants_through_a_replace() {
    use crate::shard::{Delivery, Shard};
    let script = |watch: &str| {
        format!(
            r#"let source = "s"; const WATCH = {watch};
            fn on_event(ev) {{ emit(WATCH.contains(ev.sym)); }}"#
        )
    };
    let compile = |name: &str, watch: &str| {
        std::sync::Arc::new(QueryDef::compile(name, &script(watch), &Limits::default()).unwrap())
    };
    let frame = crate::Parser::default()
        .parse(b"{\"sym\":\"A\"}\n".to_vec())
        .frame;
    for engine in [
        crate::compiled::EngineMode::Auto,
        crate::compiled::EngineMode::Interpreter,
    ] {
        let mut shard = Shard::new(&Limits::default());
        shard.set_engine(engine);
        shard
            .deploy(crate::QueryId(1), compile("a", r#"["A", "B"]"#))
            .unwrap();
        shard
            .deploy(crate::QueryId(2), compile("b", r#"["B"]"#))
            .unwrap();
        let send = |shard: &mut Shard| {
            for id in [1, 2] {
                shard.event(Delivery {
                    query: crate::QueryId(id),
                    key: crate::Key::None,
                    event: frame.event(0),
                    time: 0,
                    watermark: 0,
                    source_mark: 0,
                    now: 0,
                });
            }
            let mut out = Vec::new();
            shard.take_output(&mut out);
            out.iter()
                .map(|e| format!("{}={}", e.topic, String::from_utf8_lossy(&e.value)))
                .collect::<Vec<_>>()
        };
        assert_eq!(send(&mut shard), ["a=true", "b=false"], "{engine}");
        let m = shard
            .prepare_replace(crate::QueryId(1), compile("a", r#"["C"]"#))
            .unwrap();
        shard.commit_replace(crate::QueryId(1), m);
        assert_eq!(send(&mut shard), ["a=false", "b=false"], "{engine}");
        let m = shard
            .prepare_replace(crate::QueryId(2), compile("b", r#"["A"]"#))
            .unwrap();
        shard.commit_replace(crate::QueryId(2), m);
        assert_eq!(send(&mut shard), ["a=false", "b=true"], "{engine}");
    }
}

/// The value buffers of items written out come back to the shard ([`crate::Shard::recycle`]) and
/// carry the next items' values, emptied first: the same buffer, only the new value in it. A
/// buffer grown past the size kept is freed, not handed to the next item.
#[test]
fn written_items_give_their_buffers_to_the_next_items() {
    let limits = Limits::default();
    let script = "let source = \"s\"; fn on_event(ev) { emit(#{ v: ev.v }); }";
    for engine in [
        crate::compiled::EngineMode::Auto,
        crate::compiled::EngineMode::Interpreter,
    ] {
        let def = QueryDef::compile("q", script, &limits).unwrap();
        let mut shard = crate::Shard::new(&limits);
        shard.set_engine(engine);
        shard
            .deploy(crate::QueryId(1), std::sync::Arc::new(def))
            .unwrap();
        let big = "x".repeat(5000);
        let input = format!(
            "{{\"v\":\"a-long-first-value\"}}\n{{\"v\":1}}\n{{\"v\":\"{big}\"}}\n{{\"v\":2}}\n"
        );
        let frame = crate::Parser::default().parse(input.into_bytes()).frame;
        let mut out = Vec::new();
        // The item of event `i`: where its value's buffer is, how large, and the value.
        let take = |shard: &mut crate::Shard, i: usize, out: &mut Vec<crate::Emitted>| {
            shard.event(delivery(1, &frame, i));
            shard.take_output(out);
            assert_eq!(out.len(), 1, "{engine}");
            let value = &out[0].value;
            let text = String::from_utf8(value.clone()).unwrap();
            (value.as_ptr(), value.capacity(), text)
        };
        let (first, _, text) = take(&mut shard, 0, &mut out);
        assert_eq!(text, r#"{"v":"a-long-first-value"}"#, "{engine}");
        shard.recycle(&mut out);
        assert!(out.is_empty());
        let (second, _, text) = take(&mut shard, 1, &mut out);
        assert_eq!(text, r#"{"v":1}"#, "{engine}");
        assert_eq!(second, first, "{engine}: the first item's buffer is reused");
        shard.recycle(&mut out);
        let (_, grown, text) = take(&mut shard, 2, &mut out);
        assert_eq!(text, format!(r#"{{"v":"{big}"}}"#), "{engine}");
        assert!(grown > 5000, "{engine}");
        shard.recycle(&mut out);
        let (_, capacity, text) = take(&mut shard, 3, &mut out);
        assert_eq!(text, r#"{"v":2}"#, "{engine}");
        assert!(capacity < 5000, "{engine}: the grown buffer was kept");
    }
}
