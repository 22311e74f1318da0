//! The query compiler held to the interpreter: every golden case of the shipped queries passes
//! on both engines, every shipped query writes the same bytes on both over generated input, and
//! random queries over the compiled subset (see `eddy::difftest`) write the same bytes on both,
//! errors included.

use std::path::Path;

use eddy::casetest;
use eddy::compiled::EngineMode;
use eddy::difftest::{self, Verdict};
use eddy::synth::{self, Scenario};
use eddy::{Limits, QueryDef};

fn limits() -> Limits {
    let limits = Limits::default();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    if models.is_dir() {
        limits
            .models
            .load_dir(&models, &limits)
            .expect("load the models");
    }
    limits
}

/// The items `def` emits over `input` on `engine`, then its rejections, as `eddy run` writes
/// them.
fn run(def: &QueryDef, input: &[u8], limits: &Limits, engine: EngineMode) -> Vec<u8> {
    let out = difftest::run_on(def, input, limits, engine);
    [out.items, out.rejected].concat()
}

#[test]
fn golden_cases_pass_on_both_engines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/queries");
    let cases = casetest::discover(&[root]).expect("find the cases");
    assert!(cases.len() >= 6, "found {} cases", cases.len());
    let limits = limits();
    for dir in &cases {
        for engine in [EngineMode::Auto, EngineMode::Interpreter] {
            let report = casetest::run_case_on(dir, &limits, false, engine);
            assert!(report.passed(), "{} on {engine}: {report:?}", dir.display());
        }
    }
}

/// Runs `def` over `input` on both engines, checks that they write the same bytes, and gives the
/// output with its lines parsed.
fn same_on_both(def: &QueryDef, input: &[u8], limits: &Limits) -> (String, Vec<serde_json::Value>) {
    let compiled = String::from_utf8(run(def, input, limits, EngineMode::Auto)).unwrap();
    let interpreted = String::from_utf8(run(def, input, limits, EngineMode::Interpreter)).unwrap();
    assert_eq!(compiled, interpreted);
    let lines = compiled
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (compiled, lines)
}

/// `line` is an item on `q.errors` whose error names `what`.
fn assert_error_naming(line: &serde_json::Value, what: &str, output: &str) {
    assert_eq!(line["topic"], "q.errors", "{output}");
    let error = line["value"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(what),
        "{error:?} names no {what:?}:\n{output}"
    );
}

#[test]
fn shipped_queries_write_the_same_bytes_on_both_engines() {
    let limits = limits();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let mut compiled = 0;
    for entry in std::fs::read_dir(&root).expect("queries folder") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let script = std::fs::read_to_string(&path).unwrap();
        let def = QueryDef::compile(&name, &script, &limits).expect("shipped queries compile");
        let scenario = match def.config.sources[0].as_str() {
            "trades" => Scenario::Trades,
            "sensors" => Scenario::Sensors,
            "games" => Scenario::Games,
            _ => Scenario::Social,
        };
        let input = synth::generate(scenario, 7, 4000, 1_700_000_000_000, 50);
        let a = run(&def, &input, &limits, EngineMode::Auto);
        let b = run(&def, &input, &limits, EngineMode::Interpreter);
        assert!(!b.is_empty(), "{name} wrote nothing");
        assert!(a == b, "{name}: the engines differ");
        compiled += usize::from(def.engine.compiled());
    }
    // Every one: ohlc_1m (`this.bars[id] = ohlc()`, `this.bars[id].add(..)`) and
    // hashtag_sentiment (`for`, `this.tags[tag].mood.add(..)`) were the last two.
    assert_eq!(compiled, 10, "only {compiled} shipped queries compile");
}

/// Loops and indexes compile, and give the values a plain computation of the same steps gives:
/// counts per tag in a map (new keys, op-assignment of existing ones), an array bumped by index
/// (from the end too), a `for` with its counter, `while` with `continue` and `break`, a method
/// on a plugin object through an index, and a read through an index and a property.
#[test]
fn loops_and_indexes_give_hand_computed_values_on_both_engines() {
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ counts: #{}, hist: [0, 0, 0], total: 0, means: #{} } }
        fn on_event(ev) {
            for t in ev.tags {
                if !(t in this.counts) { this.counts[t] = 0; }
                this.counts[t] += 1;
            }
            let i = 0;
            while true {
                i += 1;
                if i > ev.n { break; }
                if i % 2 == 0 { continue; }
                this.hist[-(i % 3) - 1] += 1;
            }
            for (x, j) in ev.xs { this.total += x * (j + 1); }
            if !("all" in this.means) { this.means["all"] = #{ s: stats(), last: 0 }; }
            this.means["all"].s.add(ev.n);
            this.means["all"].last = ev.n;
            emit(#{
                counts: this.counts,
                hist: this.hist,
                total: this.total,
                mean: this.means["all"].s.mean,
                last: this.means["all"].last,
            });
        }"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert!(def.engine.compiled(), "{}", def.engine.summary());
    let events: [(&[&str], i64, &[i64]); 3] = [
        (&["x", "y", "x"], 5, &[1, 2]),
        (&["y"], 2, &[]),
        (&["z", "x"], 7, &[3, 1, 4]),
    ];
    let mut input = String::new();
    for (tags, n, xs) in &events {
        let tags: Vec<String> = tags.iter().map(|t| format!("\"{t}\"")).collect();
        let xs: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
        input.push_str(&format!(
            "{{\"k\":\"a\",\"tags\":[{}],\"n\":{n},\"xs\":[{}]}}\n",
            tags.join(","),
            xs.join(",")
        ));
    }
    let a = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
    let b = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
    assert!(a == b, "the engines differ");
    // The same steps, by hand.
    let mut counts = std::collections::BTreeMap::<&str, i64>::new();
    let mut hist = [0i64; 3];
    let (mut total, mut sum, mut seen) = (0i64, 0i64, 0i64);
    let mut want = Vec::new();
    for (tags, n, xs) in &events {
        for t in tags.iter() {
            *counts.entry(t).or_default() += 1;
        }
        for i in (1..=*n).filter(|i| i % 2 == 1) {
            hist[(3 - (i % 3) - 1) as usize] += 1;
        }
        for (j, x) in xs.iter().enumerate() {
            total += x * (j as i64 + 1);
        }
        sum += n;
        seen += 1;
        want.push(serde_json::json!({
            "counts": counts,
            "hist": hist,
            "total": total,
            "mean": sum as f64 / seen as f64,
            "last": n,
        }));
    }
    let got: Vec<serde_json::Value> = String::from_utf8(a)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].clone())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn random_queries_write_the_same_bytes_on_both_engines() {
    let limits = Limits::default();
    let (mut programs, mut compiled, mut events) = (0, 0, 0);
    // Programs with a `switch`, a loop, an index of a map or an array, and top-level
    // constants, and those of them that compiled.
    let (mut switches, mut switches_compiled) = (0, 0);
    let (mut loops, mut loops_compiled) = (0, 0);
    let (mut indexes, mut indexes_compiled) = (0, 0);
    let (mut constants, mut constants_compiled) = (0, 0);
    let (mut methods, mut methods_compiled) = (0, 0);
    // `DIFF_SEEDS=400..2400 cargo test --test compiled random -- --nocapture` runs more.
    let seeds = std::env::var("DIFF_SEEDS").ok().and_then(|r| {
        let (a, b) = r.split_once("..")?;
        Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?)
    });
    let wide = seeds.is_some();
    for seed in seeds.unwrap_or(0..400) {
        let script = difftest::program(seed);
        let input = difftest::events(seed, 25);
        match difftest::run_both(&script, &input, &limits) {
            Ok(Verdict::Same { compiled: c }) => {
                if !c && std::env::var("SHOW").is_ok() {
                    let def = QueryDef::compile("q", &script, &limits).unwrap();
                    eprintln!("NOTCOMPILED {}", def.engine.summary());
                }
                programs += 1;
                compiled += usize::from(c);
                events += 25;
                if script.contains("switch ") {
                    switches += 1;
                    switches_compiled += usize::from(c);
                }
                let has_loop = ["for ", "while ", "loop {", "do {"]
                    .iter()
                    .any(|l| script.contains(l));
                if has_loop {
                    loops += 1;
                    loops_compiled += usize::from(c);
                }
                if script.contains("this.m[") || script.contains("this.l[") {
                    indexes += 1;
                    indexes_compiled += usize::from(c);
                }
                if script.contains("const K_") {
                    constants += 1;
                    constants_compiled += usize::from(c);
                }
                if script.contains("this.bump(") {
                    methods += 1;
                    methods_compiled += usize::from(c);
                }
            }
            Ok(Verdict::NotAQuery) => {
                if std::env::var("SHOW").is_ok() {
                    eprintln!(
                        "{script}\n{:?}",
                        QueryDef::compile("q", &script, &limits).err()
                    );
                }
            }
            Err(diff) => panic!("seed {seed}: {diff}"),
        }
    }
    eprintln!(
        "{programs} programs ({compiled} compiled), {events} events; \
         {switches} with a switch ({switches_compiled} compiled), \
         {loops} with a loop ({loops_compiled} compiled), \
         {indexes} with an index ({indexes_compiled} compiled), \
         {constants} with top-level constants ({constants_compiled} compiled), \
         {methods} calling a helper as a method on `this` ({methods_compiled} compiled)"
    );
    if wide {
        return;
    }
    assert!(
        switches_compiled >= 40,
        "only {switches_compiled} compiled programs have a switch"
    );
    assert!(
        loops_compiled >= 40,
        "only {loops_compiled} compiled programs have a loop"
    );
    assert!(
        constants_compiled >= 40,
        "only {constants_compiled} compiled programs have top-level constants"
    );
    assert!(
        methods_compiled >= 40,
        "only {methods_compiled} compiled programs call a helper on `this`"
    );
    assert!(
        indexes_compiled >= 40,
        "only {indexes_compiled} compiled programs index a map or an array"
    );
    assert!(
        programs >= 350,
        "only {programs} of 400 programs are queries"
    );
    // The rest (chains through an index, `ev["x"].abs()`) hold the fallback to the same bytes.
    assert!(
        compiled * 5 >= programs * 4,
        "only {compiled} of {programs} compiled"
    );
}

#[test]
fn check_reports_compiled_and_interpreted_functions_with_the_reason() {
    let limits = Limits::default();
    let def = QueryDef::compile(
        "q",
        "let source = \"s\";\nfn init(key) { #{ n: 0 } }\nfn on_event(ev) {\n  try { this.n += 1; } catch { }\n}",
        &limits,
    )
    .unwrap();
    assert!(!def.engine.compiled());
    assert_eq!(def.engine.summary(), "interpreted (4:3 try/catch)");
    assert_eq!(
        def.engine.function_lines(),
        vec!["init: compiled", "on_event: interpreted (4:3 try/catch)"]
    );
    let def = QueryDef::compile(
        "q",
        "let source = \"s\"; fn init(key) { #{ n: 0 } } fn on_event(ev) { this.n += ev.x; emit(#{ n: this.n }); }",
        &limits,
    )
    .unwrap();
    assert_eq!(def.engine.summary(), "compiled");
}

#[test]
fn hostile_scripts_that_compile_are_stopped_alike() {
    let limits = Limits {
        max_state_bytes: 2_000,
        ..Limits::default()
    };
    for body in [
        // State growth: a slot that grows until the key's state is dropped.
        r#"this.log.push("0123456789012345678901234567890123456789"); emit(this.log.len());"#,
        // Memory bombs, each stopped by a size limit.
        r#"if ev.bad == true { let a = []; a.pad(100000000, 0); } emit(ev.n);"#,
        r#"if ev.bad == true { ring(1000000000); } emit(ev.n);"#,
        r#"if ev.bad == true { let s = "x"; s.pad(1000000000, 'y'); } emit(ev.n);"#,
        // Arithmetic errors with their positions.
        r#"emit(#{ q: ev.n / (ev.n - ev.n), big: 9223372036854775807 + ev.n });"#,
        // Endless loops, each stopped by max_operations (compiled loops count their turns).
        r#"if ev.bad == true { loop { } } emit(ev.n);"#,
        r#"if ev.bad == true { while true { this.log.len(); } } emit(ev.n);"#,
        r#"if ev.bad == true { let n = 0; while n >= 0 { n += 1; } } emit(ev.n);"#,
        r#"if ev.bad == true { let n = 0; for i in 0..1000000000000 { n += i; } } emit(ev.n);"#,
        r#"if ev.bad == true { let n = 0; do { n += 1; } while n > 0; } emit(ev.n);"#,
        // A loop that grows the state until a size limit stops it.
        r#"for i in 0..ev.n { this.log.push("0123456789"); } emit(this.log.len());"#,
    ] {
        let script = format!(
            "let source = \"s\";\nfn init(key) {{ #{{ log: [] }} }}\nfn on_event(ev) {{\n  {body}\n}}"
        );
        let def = QueryDef::compile("q", &script, &limits).unwrap();
        assert!(def.engine.compiled(), "{body}: {}", def.engine.summary());
        let mut input = String::new();
        for n in 0..80 {
            input.push_str(&format!("{{\"n\":{n},\"bad\":{}}}\n", n == 3));
        }
        let a = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
        let b = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("\"q.errors\""), "{body}: no error in\n{text}");
        assert!(
            a == b,
            "{body}: the engines differ:\n{text}\n---\n{}",
            String::from_utf8_lossy(&b)
        );
    }
}

/// `switch` compiles, and a value finds the case Rhai finds: by type as well as value (the
/// float `1.0` is not the case `1`), `a | b` lists, `()`, integer ranges (a float in one too),
/// `_`, a case that is one statement, `return` in a case, a `switch` as a value, and an error in
/// a case at its position. A case guarded by `if` keeps the query on the interpreter.
#[test]
fn switch_finds_the_case_rhai_finds() {
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ n: 0 } }
        fn on_event(ev) {
            let tag = switch ev.v {
                1 => "one",
                "a" | "b" => "ab",
                true => "yes",
                () => "unit",
                1.5 => "x1.5",
                _ => "other",
            };
            switch ev.v {
                "stop" => return,
                0 => this.n += 100 / ev.v,
                2..5 => { emit(#{ tag: tag, range: "2..5" }); return; }
                _ => this.n += 1,
            }
            emit(#{ tag: tag, n: this.n });
        }"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let vs = [
        "1", "1.0", "\"b\"", "true", "null", "3", "4.5", "\"stop\"", "0", "1.5", "[1]",
    ];
    let mut input: String = vs
        .iter()
        .map(|v| format!("{{\"k\":\"a\",\"v\":{v}}}\n"))
        .collect();
    input.push_str("{\"k\":\"a\"}\n");
    let a = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
    let b = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
    let text = String::from_utf8_lossy(&a).into_owned();
    assert_eq!(text, String::from_utf8_lossy(&b));
    // By hand: which case each value takes, and the count `n` (the error leaves it alone).
    let values: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|item| item["topic"] == "q")
        .map(|item| item["value"].to_string())
        .collect();
    assert_eq!(
        values,
        [
            r#"{"n":1,"tag":"one"}"#,
            r#"{"n":2,"tag":"other"}"#,
            r#"{"n":3,"tag":"ab"}"#,
            r#"{"n":4,"tag":"yes"}"#,
            r#"{"n":5,"tag":"unit"}"#,
            r#"{"range":"2..5","tag":"other"}"#,
            r#"{"range":"2..5","tag":"other"}"#,
            r#"{"n":6,"tag":"x1.5"}"#,
            r#"{"n":7,"tag":"other"}"#,
            r#"{"n":8,"tag":"unit"}"#,
        ],
        "{text}"
    );
    assert!(
        text.contains("Division by zero") && text.contains("\"q.errors\""),
        "{text}"
    );

    let guarded = r#"let source = "s"; fn init(key) { #{ n: 0 } }
        fn on_event(ev) { switch ev.v { 1 if ev.w > 0 => this.n += 1, _ => () } }"#;
    let def = QueryDef::compile("q", guarded, &limits).unwrap();
    let summary = def.engine.summary();
    assert!(
        summary.starts_with("interpreted (2:")
            && summary.ends_with("switch case with a condition)"),
        "{summary}"
    );
}

/// An index at the end of a chain (`m.a[i]`, `m.inner.b[i]`, as `out.probabilities[1]` in
/// `player_churn`) is read as `(m.a)[i]`: the same values and the same errors (out of bounds, a
/// string or float index, a missing property) on both engines; negative indexes count from the
/// end, as in Rhai.
#[test]
fn an_index_at_the_end_of_a_chain_reads_as_rhai_reads_it() {
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ n: 0 } }
        fn on_event(ev) {
            let m = #{ a: [10, 20, 30], s: "xyz", inner: #{ b: [1, 2] } };
            switch ev.w {
                0 => emit(#{ v: m.a[ev.i] }),
                1 => emit(#{ v: m.s[ev.i] }),
                2 => emit(#{ v: m.inner.b[ev.i] }),
                3 => emit(#{ v: m.q[ev.i] }),
                _ => emit(m.a[ev.i]),
            }
        }"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let mut input = String::new();
    for w in 0..5 {
        for i in ["0", "2", "3", "-1", "\"x\"", "1.5"] {
            input.push_str(&format!("{{\"k\":\"a\",\"w\":{w},\"i\":{i}}}\n"));
        }
    }
    let a = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
    let text = String::from_utf8_lossy(&a).into_owned();
    let b = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
    assert_eq!(text, String::from_utf8_lossy(&b));
    let values: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|item| item["topic"] == "q")
        .map(|item| match item["value"].get("v") {
            Some(v) => v.to_string(),
            None => item["value"].to_string(),
        })
        .collect();
    let want = [
        "10", "30", "30", "\"x\"", "\"z\"", "\"z\"", "1", "2", "10", "30", "30",
    ];
    assert_eq!(values, want, "{text}");
    let errors = text.lines().filter(|l| l.contains("\"q.errors\"")).count();
    assert!(errors > 0, "{text}");
}

/// A query the compiler was not written against, in the shipped queries' style (sums on state
/// fields, ratios, an emitted map literal): it compiles, writes the same bytes on both engines,
/// and its figures are those of a plain computation over the same trades.
#[test]
fn a_hidden_query_in_the_shipped_style_compiles_and_computes_its_figures() {
    let limits = limits();
    let script = include_str!("hidden/order_flow.rhai");
    let def = QueryDef::compile("order_flow", script, &limits).expect("compiles as a query");
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = synth::generate(Scenario::Trades, 11, 3000, 1_700_000_000_000, 50);
    let out = run(&def, &input, &limits, EngineMode::Auto);
    assert!(out == run(&def, &input, &limits, EngineMode::Interpreter));

    // The same figures, by hand: per symbol, in input order.
    #[derive(Default)]
    struct Flow {
        large: i64,
        small: i64,
        notional: f64,
        count: i64,
        high: f64,
    }
    let mut flows: std::collections::HashMap<String, Flow> = Default::default();
    let mut want = Vec::new();
    for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let t: serde_json::Value = serde_json::from_slice(line).unwrap();
        let (price, size) = (t["price"].as_f64().unwrap(), t["size"].as_i64().unwrap());
        let f = flows
            .entry(t["symbol"].as_str().unwrap().to_owned())
            .or_default();
        f.count += 1;
        f.notional += price * size as f64;
        if size >= 500 {
            f.large += size;
        } else {
            f.small += size;
        }
        f.high = f.high.max(price);
        let volume = (f.large + f.small) as f64;
        want.push((
            f.large as f64 / volume,
            f.notional / f.count as f64,
            f.high,
            f.count,
        ));
    }
    let got: Vec<serde_json::Value> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (item, (share, avg, high, trades)) in got.iter().zip(want) {
        let v = &item["value"];
        assert!(close(v["large_share"].as_f64().unwrap(), share), "{v}");
        assert!(close(v["avg_notional"].as_f64().unwrap(), avg), "{v}");
        assert!(close(v["high"].as_f64().unwrap(), high), "{v}");
        assert_eq!(v["trades"].as_i64(), Some(trades), "{v}");
    }
}

/// A local map used as a map (passed on, changed by an operator) is not a record, and one that
/// is only given fields and emitted is: both write the same bytes on both engines, and the
/// record's fields come out in key order with the optional one only when it was given.
#[test]
fn local_maps_emitted_as_records_or_as_maps_write_the_same_bytes() {
    let limits = limits();
    let record = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ n: 0 } }
        fn on_event(ev) {
            this.n += 1;
            let out = #{ z: ev.x, a: this.n };
            if ev.x > 1 { out.flag = true; }
            out.a = out.a * 10;
            emit(out);
            out.z = ();
            emit(out);
        }"#;
    let as_map = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ n: 0 } }
        fn on_event(ev) {
            let out = #{ z: ev.x, a: 1 };
            out.a += 1;
            emit(out);
            emit("side", out);
        }"#;
    let input = b"{\"k\":\"a\",\"x\":1}\n{\"k\":\"a\",\"x\":2}\n".to_vec();
    for script in [record, as_map] {
        let def = QueryDef::compile("q", script, &limits).unwrap();
        assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
        let a = run(&def, &input, &limits, EngineMode::Auto);
        assert_eq!(
            String::from_utf8_lossy(&a),
            String::from_utf8_lossy(&run(&def, &input, &limits, EngineMode::Interpreter))
        );
    }
    let def = QueryDef::compile("q", record, &limits).unwrap();
    let out = String::from_utf8(run(&def, &input, &limits, EngineMode::Auto)).unwrap();
    let values: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].to_string())
        .collect();
    assert_eq!(
        values,
        [
            r#"{"a":10,"z":1}"#,
            r#"{"a":10,"z":null}"#,
            r#"{"a":20,"flag":true,"z":2}"#,
            r#"{"a":20,"flag":true,"z":null}"#,
        ]
    );
}

#[test]
fn plugin_methods_called_directly_give_the_interpreters_values_and_errors() {
    let limits = limits();
    // A ring of 3 and a scaler fed in place; a number method, a getter, a learner with a map.
    let script = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ r: ring(3), s: scaler() } }
        fn on_event(ev) {
            this.r.push(ev.x);
            this.s.learn(#{ x: ev.x });
            emit(#{ n: this.r.len, mean: this.r.mean, sum: this.r.sum, z: this.s.transform(#{ x: ev.x }).x });
        }"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    // The fourth event pushes a string: the same error on both engines, then the ring goes on.
    let xs = ["1", "2", "6", "\"text\"", "10"];
    let input: String = xs
        .iter()
        .map(|x| format!("{{\"k\":\"a\",\"x\":{x}}}\n"))
        .collect();
    let compiled = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
    let interpreted = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
    assert_eq!(
        String::from_utf8_lossy(&compiled),
        String::from_utf8_lossy(&interpreted)
    );
    let out = String::from_utf8(compiled).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["topic"] == "q")
        .map(|l| &l["value"])
        .collect();
    // By hand: the ring holds the last three numbers.
    let expect = [(1, 1.0, 1.0), (2, 1.5, 3.0), (3, 3.0, 9.0), (3, 6.0, 18.0)];
    assert_eq!(values.len(), expect.len(), "{out}");
    for (v, (n, mean, sum)) in values.iter().zip(expect) {
        assert_eq!(v["n"], n, "{v}");
        assert!((v["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{v}");
        assert!((v["sum"].as_f64().unwrap() - sum).abs() < 1e-9, "{v}");
    }
    // The scaler's z of the third event over 1, 2, 6: (6 - 3) / the population std.
    let std = ((4.0 + 1.0 + 9.0) / 3.0f64).sqrt();
    let z = values[2]["z"].as_f64().unwrap();
    assert!(
        (z - 3.0 / std).abs() < 1e-9,
        "z {z}, expected {}",
        3.0 / std
    );
    let errors: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["topic"] == "q.errors").collect();
    assert_eq!(errors.len(), 1, "{out}");
    let message = errors[0].to_string();
    assert!(message.contains("ring.push(x)"), "{message}");
}

#[test]
fn literals_over_a_size_limit_fail_alike_on_both_engines() {
    // Each string fits the limit; two of them in one literal do not.
    let mut limits = limits();
    limits.max_string_bytes = 10;
    limits.max_array_len = 4;
    let bodies = [
        // A map literal emitted straight to JSON.
        "emit(#{ a: ev.s, b: ev.s });",
        // A map literal as a value.
        "this.m = #{ a: ev.s, b: ev.s }; emit(this.m);",
        // A local map kept as one local per field.
        "let out = #{ a: ev.s, n: 1, b: ev.s }; emit(out);",
        // Array literals: string bytes, then items.
        "emit([ev.s, ev.s]);",
        "emit([1, ev.a]);",
    ];
    let input =
        b"{\"k\":\"a\",\"s\":\"abcdefgh\",\"a\":[1,2,3]}\n{\"k\":\"a\",\"s\":\"abc\",\"a\":7}\n"
            .to_vec();
    for body in bodies {
        let script = format!(
            "let source = \"s\"; let key_by = \"k\";\nfn init(key) {{ #{{ m: () }} }}\nfn on_event(ev) {{\n    {body}\n}}"
        );
        let def = QueryDef::compile("q", &script, &limits).unwrap();
        assert_eq!(def.engine.summary(), "compiled", "{body}: {:?}", def.engine);
        let compiled = String::from_utf8(run(&def, &input, &limits, EngineMode::Auto)).unwrap();
        let interpreted =
            String::from_utf8(run(&def, &input, &limits, EngineMode::Interpreter)).unwrap();
        assert_eq!(compiled, interpreted, "{body}");
        // The first event (16 bytes of strings, 5 array items) fails, the second passes.
        let lines: Vec<serde_json::Value> = compiled
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{body}: {compiled}");
        let error = lines[0]["value"]["error"].as_str().unwrap_or_default();
        let expected = if body.contains("ev.a") {
            "Size of array"
        } else {
            "Length of string"
        };
        assert!(error.contains(expected), "{body}: {compiled}");
        assert_eq!(lines[1]["topic"], "q", "{body}: {compiled}");
    }
}

#[test]
fn typed_arithmetic_gives_hand_computed_values_and_rhais_errors_on_both_engines() {
    // Compiled, operands and op-assignments pass unboxed ints, floats and bools; the figures
    // below are worked out by hand, and the errors are Rhai's own messages.
    let limits = limits();
    let script = "let source = \"s\"; let key_by = \"k\";
fn init(key) { #{ n: 0, x: 0.0 } }
fn on_event(ev) {
    this.n += ev.a * ev.b + 1;
    this.x += ev.a * 0.5 + ev.b;
    let q = ev.a / ev.b;
    if this.n > 10 && this.x >= 2.0 { emit(#{ n: this.n, x: this.x, q: q }); } else { emit(#{ q: q }); }
}";
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = b"{\"k\":\"a\",\"a\":3,\"b\":4}
{\"k\":\"b\",\"a\":7,\"b\":0}
{\"k\":\"c\",\"a\":9223372036854775807,\"b\":2}
{\"k\":\"d\",\"a\":5,\"b\":2}
{\"k\":\"e\",\"a\":1,\"b\":1}
";
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 5, "{compiled}");
    // n = 3 * 4 + 1, x = 3 * 0.5 + 4, q = 3 / 4 in integers.
    assert_eq!(
        lines[0]["value"],
        serde_json::json!({ "n": 13, "x": 5.5, "q": 0 })
    );
    let error = |i: usize| {
        lines[i]["value"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(lines[1]["topic"], "q.errors", "{compiled}");
    assert!(error(1).contains("Division by zero: 7 / 0"), "{compiled}");
    assert!(
        error(2).contains("Multiplication overflow: 9223372036854775807 * 2"),
        "{compiled}"
    );
    // n = 5 * 2 + 1 = 11 > 10, x = 2.5 + 2 = 4.5, q = 2.
    assert_eq!(
        lines[3]["value"],
        serde_json::json!({ "n": 11, "x": 4.5, "q": 2 })
    );
    // n = 2 is not over 10: the other branch.
    assert_eq!(lines[4]["value"], serde_json::json!({ "q": 1 }));
}

#[test]
fn conditions_give_hand_computed_branches_and_rhais_errors_on_both_engines() {
    // The conditions compiled straight to a bool: `"f" in ev` on the event read in place and
    // on the event made a value (`ev` passed to a function boxes it), a comparison of every
    // kind, `&&` and `||` (short-circuit included), a number compared with a string (false in
    // Rhai, not an error); and the error of `&&` over a number, which must be the
    // interpreter's, placed where Rhai places it (the `.` of `ev.q`).
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
        fn has_p(e) { if "p" in e { 1 } else { 0 } }
        fn init(key) { #{ n: 0 } }
        fn on_event(ev) {
            let bits = 0;
            if "p" in ev { bits += 1; }
            if has_p(ev) == 1 { bits += 2; }
            if ev.q > 2 { bits += 4; }
            if ev.q >= 2 && ev.q <= 3 { bits += 8; }
            if ev.q < 1 || "z" in ev { bits += 16; }
            if ev.q == 2.0 { bits += 32; }
            if ev.q != 2 { bits += 64; }
            if ev.k == "bad" && ev.q > "x" { bits += 128; }
            if ev.k == "worse" { if ev.q && true { bits += 256; } }
            emit(#{ bits: bits });
        }"#;
    let input = concat!(
        "{\"k\":\"a\",\"q\":1,\"p\":0.5}\n",
        "{\"k\":\"a\",\"q\":2}\n",
        "{\"k\":\"a\",\"q\":3,\"z\":true,\"p\":1}\n",
        "{\"k\":\"a\",\"q\":0.5}\n",
        "{\"k\":\"bad\",\"q\":2}\n",
        "{\"k\":\"worse\",\"q\":2}\n",
    );
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let (output, lines) = same_on_both(&def, input.as_bytes(), &limits);
    // By hand: q=1 with p: 1+2 (has p) + 64 (q != 2); q=2: 8 + 32; q=3 with z and p:
    // 1+2+4+8+16+64; q=0.5: 16 (q < 1) + 64; key "bad", q=2: 8 + 32 (`2 > "x"` is false).
    let bits: Vec<_> = lines
        .iter()
        .take(5)
        .map(|l| l["value"]["bits"].clone())
        .collect();
    assert_eq!(bits, [67, 40, 95, 80, 40], "{output}");
    assert_eq!(lines.len(), 6, "{output}");
    assert_error_naming(&lines[5], "expecting bool", &output);
    assert_eq!(lines[5]["value"]["line"], 14, "{output}");
    assert_eq!(lines[5]["value"]["column"], 39, "{output}");
}

#[test]
fn event_fields_read_several_times_in_a_call_read_alike_on_both_engines() {
    // Fields read several times in one call, typed and as values: numbers, strings (one
    // changed through a local copy), missing fields, nested objects and a string where a
    // number is expected read the same on both engines every time.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
        fn init(key) { #{ n: 0, t: 0.0 } }
        fn on_event(ev) {
            let s = ev.name;
            s += "!";
            this.n += ev.q * 2;
            if ev.q > 2 { this.t += ev.p; } else { this.t -= ev.p; }
            emit(#{ s: s, name: ev.name, q: ev.q + ev.q, m: ev.missing, o: ev.o, n: this.n,
                    t: this.t, p: ev.p * ev.q, again: ev.name + ev.name });
        }"#;
    let input = concat!(
        "{\"k\":\"a\",\"name\":\"x\",\"q\":1,\"p\":0.5,\"o\":{\"z\":[1,2]}}\n",
        "{\"k\":\"a\",\"q\":3,\"p\":1.25,\"name\":\"yy\"}\n",
        "{\"k\":\"b\",\"name\":7,\"q\":2.5}\n",
        "{\"k\":\"b\",\"q\":\"4\",\"p\":2}\n",
    );
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let compiled = run(&def, input.as_bytes(), &limits, EngineMode::Auto);
    let interpreted = run(&def, input.as_bytes(), &limits, EngineMode::Interpreter);
    assert_eq!(
        String::from_utf8_lossy(&compiled),
        String::from_utf8_lossy(&interpreted)
    );
    // By hand, for the first event: n = 1 * 2, t = -0.5, q = 2, p = 0.5.
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&compiled).lines().next().unwrap()).unwrap();
    assert_eq!(
        first["value"],
        serde_json::json!({"s": "x!", "name": "x", "q": 2, "m": null, "o": {"z": [1, 2]},
                           "n": 2, "t": -0.5, "p": 0.5, "again": "xx"})
    );
}

#[test]
fn standard_math_functions_give_rusts_values_and_rhais_errors_on_both_engines() {
    // Calls, methods and getters of the standard library's math functions: compiled code does
    // them in Rust when given their numbers, and leaves anything else (a string, an error such
    // as `to_int` out of range or `abs` of the smallest integer) to Rhai.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
fn init(key) { #{ n: 0 } }
fn on_event(ev) {
    let i = ev.i;
    emit("ints", #{ abs: abs(i), sign: i.sign(), max: max(i, 5), min: i.min(5), f: i.to_float() });
    let x = ev.x;
    emit(#{
        sqrt: sqrt(x), floor: x.floor(), round: x.round, abs: abs(x), sign: x.sign(),
        to_int: x.to_int(), max: max(x, 2), min: x.min(ev.i), ln: x.ln(), exp: exp(x),
        fraction: x.fraction, hyp: hypot(x, 4.0), lg: log(x, 2.0), pi: PI(),
    });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"k":"a","x":9.0,"i":3}
{"k":"a","x":-2.5,"i":-7}
{"k":"a","x":1e300,"i":2}
{"k":"a","x":4,"i":-9223372036854775808}
{"k":"a","x":"text","i":1}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 7, "{compiled}");
    // Integers stay integers; an integer beside a float is taken as a float.
    assert_eq!(
        lines[0]["value"],
        serde_json::json!({ "abs": 3, "sign": 1, "max": 5, "min": 3, "f": 3.0 })
    );
    assert_eq!(
        lines[2]["value"],
        serde_json::json!({ "abs": 7, "sign": -1, "max": 5, "min": -7, "f": -7.0 })
    );
    let near = |v: &serde_json::Value, want: f64| {
        let got = v.as_f64().unwrap_or(f64::NAN);
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{got} against {want}"
        );
    };
    let v = &lines[1]["value"];
    for (field, want) in [
        ("sqrt", 3.0),
        ("floor", 9.0),
        ("round", 9.0),
        ("abs", 9.0),
        ("max", 9.0),
        ("min", 3.0),
        ("ln", 9f64.ln()),
        ("exp", 9f64.exp()),
        ("fraction", 0.0),
        ("hyp", 97f64.sqrt()),
        ("lg", 9f64.log2()),
        ("pi", std::f64::consts::PI),
    ] {
        near(&v[field], want);
    }
    assert_eq!(
        (v["sign"].clone(), v["to_int"].clone()),
        (1.into(), 9.into())
    );
    // -2.5: rounds away from zero, truncates toward it; the square root of a negative is NaN.
    let v = &lines[3]["value"];
    for (field, want) in [
        ("floor", -3.0),
        ("round", -3.0),
        ("abs", 2.5),
        ("max", 2.0),
        ("min", -7.0),
        ("fraction", -0.5),
        ("hyp", 22.25f64.sqrt()),
    ] {
        near(&v[field], want);
    }
    assert_eq!(
        (v["sign"].clone(), v["to_int"].clone()),
        ((-1).into(), (-2).into())
    );
    assert!(v["max"].is_f64() && v["sqrt"].is_null(), "{v}");
    // Rhai's errors, where the call is: out of range, overflow, no such function.
    let error = |i: usize| {
        lines[i]["value"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        error(4).starts_with("Integer overflow: to_int(1000"),
        "{compiled}"
    );
    assert!(error(5).contains("Negation overflow"), "{compiled}");
    assert!(error(6).contains("Function not found: sqrt"), "{compiled}");
}

#[test]
fn a_chain_works_out_its_method_arguments_before_its_root_as_rhai_does() {
    let limits = limits();
    let script = r#"let source = "s";
fn a() { emit("root"); 2.0 }
fn b() { emit("arg1"); 1.0 }
fn c() { emit("arg2"); 3.0 }
fn on_event(ev) {
    emit((a()).max(b()).min(c()));
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = b"{\"x\":1}\n";
    let (_, lines) = same_on_both(&def, input, &limits);
    let values: Vec<serde_json::Value> = lines.iter().map(|l| l["value"].clone()).collect();
    // max(2, 1) = 2, min(2, 3) = 2.
    assert_eq!(
        values,
        serde_json::json!(["arg1", "arg2", "root", 2.0])
            .as_array()
            .unwrap()
            .clone()
    );
}

/// A second hidden query, rolling statistics with the standard math functions (`sqrt`, `min`,
/// `max`, `abs`, `round`): compiled, the same bytes as the interpreter, and the figures of the
/// two-pass textbook formulas (not the query's running ones).
#[test]
fn running_statistics_with_math_functions_compile_and_match_the_textbook_formulas() {
    let limits = limits();
    let script = include_str!("hidden/running_stats.rhai");
    let def = QueryDef::compile("running_stats", script, &limits).expect("compiles as a query");
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = synth::generate(Scenario::Trades, 12, 3000, 1_700_000_000_000, 50);
    let out = run(&def, &input, &limits, EngineMode::Auto);
    assert!(out == run(&def, &input, &limits, EngineMode::Interpreter));

    let mut prices: std::collections::HashMap<String, Vec<f64>> = Default::default();
    let got: Vec<serde_json::Value> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let trades: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(got.len(), trades.len());
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (line, item) in trades.iter().zip(&got) {
        let t: serde_json::Value = serde_json::from_slice(line).unwrap();
        let seen = prices
            .entry(t["symbol"].as_str().unwrap().to_owned())
            .or_default();
        let price = t["price"].as_f64().unwrap();
        seen.push(price);
        let n = seen.len() as f64;
        let mean = seen.iter().sum::<f64>() / n;
        let sd = if seen.len() > 1 {
            (seen.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let high = seen.iter().cloned().fold(f64::MIN, f64::max);
        let low = seen.iter().cloned().fold(f64::MAX, f64::min);
        let v = &item["value"];
        assert!(
            close(v["mean"].as_f64().unwrap(), mean),
            "{v} against {mean}"
        );
        assert!(
            (v["sd"].as_f64().unwrap() - sd).abs() <= 1e-6 * sd.max(1.0),
            "{v} against {sd}"
        );
        assert!(close(v["range"].as_f64().unwrap(), high - low), "{v}");
        assert_eq!(v["trades"].as_i64(), Some(seen.len() as i64), "{v}");
        let z = if sd > 0.0 {
            ((price - mean) / sd).abs()
        } else {
            0.0
        };
        if (z.fract() - 0.5).abs() > 1e-6 {
            assert_eq!(v["z"].as_f64(), Some(z.round()), "{v} against {z}");
        }
    }
}

#[test]
fn string_array_and_map_functions_give_hand_computed_values_on_both_engines() {
    // `to_lower`, `to_upper`, `len` (method and getter), `is_empty` and `keys`, done in Rust by
    // compiled code on strings, arrays and maps; a number given to `to_lower` is Rhai's error.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
fn init(key) { #{ seen: #{}, last: [] } }
fn on_event(ev) {
    let t = ev.tag.to_lower();
    this.seen[t] = true;
    this.last = [t, t];
    emit(#{ n: this.seen.keys().len(), upper: ev.tag.to_upper(), len: ev.tag.len,
            empty: ev.tag.is_empty(), pair: this.last.len() });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"k":"a","tag":"AbC"}
{"k":"a","tag":"abc"}
{"k":"a","tag":"Zz"}
{"k":"a","tag":""}
{"k":"a","tag":12}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 5, "{compiled}");
    // Distinct lower-case tags so far: abc; abc; abc, zz; abc, zz and "".
    let want = [
        (1, "ABC", 3, false),
        (1, "ABC", 3, false),
        (2, "ZZ", 2, false),
        (3, "", 0, true),
    ];
    for (line, (n, upper, len, empty)) in lines.iter().zip(want) {
        assert_eq!(
            line["value"],
            serde_json::json!({ "n": n, "upper": upper, "len": len, "empty": empty, "pair": 2 })
        );
    }
    assert_error_naming(&lines[4], "to_lower", &compiled);
}

#[test]
fn sub_string_and_split_at_a_position_give_hand_computed_parts_on_both_engines() {
    // `sub_string` (to the end, or so many characters; negative starts count from the end) and
    // `split` at a character position, done in Rust by compiled code, on multi-byte text; a
    // number given to `sub_string` is Rhai's error.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
fn on_event(ev) {
    emit(#{ day: ev.ts.sub_string(0, 10), time: ev.ts.sub_string(11), tail: ev.ts.sub_string(-3, 2),
            parts: ev.ts.split(4), back: ev.ts.split(-2) });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = "{\"k\":\"a\",\"ts\":\"2026-12-01T23:45\"}\n\
                 {\"k\":\"a\",\"ts\":\"né\"}\n\
                 {\"k\":\"a\",\"ts\":\"\"}\n\
                 {\"k\":\"a\",\"ts\":5}\n";
    let (compiled, lines) = same_on_both(&def, input.as_bytes(), &limits);
    assert_eq!(lines.len(), 4, "{compiled}");
    // By hand: characters 0..10 and 11.. of the stamp; two characters from the third last;
    // the first four characters and the rest; all but the last two and the last two. A start
    // before the beginning counts from it; a start past the end gives "".
    let want = [
        serde_json::json!({ "day": "2026-12-01", "time": "23:45", "tail": ":4",
            "parts": ["2026", "-12-01T23:45"], "back": ["2026-12-01T23:", "45"] }),
        serde_json::json!({ "day": "né", "time": "", "tail": "né",
            "parts": ["né", ""], "back": ["", "né"] }),
        serde_json::json!({ "day": "", "time": "", "tail": "",
            "parts": ["", ""], "back": ["", ""] }),
    ];
    for (line, want) in lines.iter().zip(want) {
        assert_eq!(line["value"], want, "{compiled}");
    }
    assert_error_naming(&lines[3], "sub_string", &compiled);
}

#[test]
fn floats_and_characters_as_text_read_as_rhai_prints_them_on_both_engines() {
    // `to_string` of a float or a character, and both in an interpolated string, written in
    // Rust by compiled code as Rhai prints them.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
fn on_event(ev) {
    let c = ev.s.to_chars()[0];
    emit(#{ text: ev.x.to_string(), ch: c.to_string(), line: `${ev.x}|${c}|${ev.x * 2.0}` });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = r#"{"k":"a","x":2.5,"s":"ab"}
{"k":"a","x":3.0,"s":"é"}
{"k":"a","x":-0.0,"s":"z"}
{"k":"a","x":1e20,"s":"z"}
{"k":"a","x":0.30000000000000004,"s":"z"}
"#;
    let (compiled, lines) = same_on_both(&def, input.as_bytes(), &limits);
    // By hand, Rhai's rules: a whole float gets ".0", either zero is "0.0", and past 1e13 it is
    // written with an exponent.
    let want = [
        ("2.5", "a", "2.5|a|5.0"),
        ("3.0", "é", "3.0|é|6.0"),
        ("0.0", "z", "0.0|z|0.0"),
        ("1e20", "z", "1e20|z|2e20"),
        (
            "0.30000000000000004",
            "z",
            "0.30000000000000004|z|0.6000000000000001",
        ),
    ];
    assert_eq!(lines.len(), want.len(), "{compiled}");
    for (line, (text, ch, joined)) in lines.iter().zip(want) {
        assert_eq!(
            line["value"],
            serde_json::json!({ "text": text, "ch": ch, "line": joined }),
            "{compiled}"
        );
    }
}

#[test]
fn numbers_sent_as_strings_parse_to_hand_computed_values_on_both_engines() {
    // `parse_float`, `parse_int` (as a method and as a function, with a radix), done in Rust by
    // compiled code; text that is no number is Rhai's error, with the text in it.
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
fn init(key) { #{ notional: 0.0 } }
fn on_event(ev) {
    this.notional += ev.price.parse_float() * parse_int(ev.size);
    emit(#{ notional: this.notional, flags: parse_int(ev.flags, 16) });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"k":"a","price":"2.5","size":" 40 ","flags":"ff"}
{"k":"a","price":"-1e1","size":"3","flags":"10"}
{"k":"a","price":"12,5","size":"1","flags":"0"}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 3, "{compiled}");
    // By hand: 2.5 * 40 = 100; 100 + (-10 * 3) = 70; 0xff = 255, 0x10 = 16.
    assert_eq!(
        lines[0]["value"],
        serde_json::json!({ "notional": 100.0, "flags": 255 })
    );
    assert_eq!(
        lines[1]["value"],
        serde_json::json!({ "notional": 70.0, "flags": 16 })
    );
    assert_error_naming(&lines[2], "12,5", &compiled);
}

#[test]
fn array_changes_in_place_give_hand_computed_windows_and_rhais_size_error() {
    // `push`, `shift`, `remove`, `pop` and `clear` on an array in state, done in place by
    // compiled code; a push past `max_array_len` is Rhai's error on both engines.
    let mut limits = limits();
    limits.max_array_len = 4;
    let script = r#"let source = "s"; let key_by = "k";
fn init(key) { #{ recent: [] } }
fn on_event(ev) {
    if ev.op == "clear" { this.recent.clear(); }
    this.recent.push(ev.x);
    while this.recent.len() > 3 { this.recent.shift(); }
    let last = if ev.op == "pop" { this.recent.pop() } else { () };
    let gone = if ev.op == "rm" { this.recent.remove(-2) } else { () };
    if ev.op == "grow" { this.recent.push(0); this.recent.push(0); this.recent.push(0); }
    emit(#{ recent: this.recent, last: last, gone: gone });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"k":"a","x":1,"op":""}
{"k":"a","x":2,"op":""}
{"k":"a","x":3,"op":""}
{"k":"a","x":4,"op":""}
{"k":"a","x":5,"op":"pop"}
{"k":"a","x":6,"op":"rm"}
{"k":"a","x":7,"op":"clear"}
{"k":"a","x":8,"op":"grow"}
{"k":"a","x":9,"op":""}
"#;
    // (The last event shows the state the failed call left, alike on both engines.)
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 9, "{compiled}");
    let v = |i: usize| lines[i]["value"].clone();
    // A window of the last three; pop takes the newest, remove(-2) the second newest.
    assert_eq!(
        v(0),
        serde_json::json!({ "recent": [1], "last": null, "gone": null })
    );
    assert_eq!(
        v(2),
        serde_json::json!({ "recent": [1, 2, 3], "last": null, "gone": null })
    );
    assert_eq!(
        v(3),
        serde_json::json!({ "recent": [2, 3, 4], "last": null, "gone": null })
    );
    assert_eq!(
        v(4),
        serde_json::json!({ "recent": [3, 4], "last": 5, "gone": null })
    );
    assert_eq!(
        v(5),
        serde_json::json!({ "recent": [3, 6], "last": null, "gone": 4 })
    );
    assert_eq!(
        v(6),
        serde_json::json!({ "recent": [7], "last": null, "gone": null })
    );
    // [7, 8] and three more is five items: over the limit of four.
    assert_error_naming(&lines[7], "array", &compiled);
}

/// Top-level constants named in functions (numbers, a string, an array, a map, one worked out
/// from others), in `init`, `on_event` and a function it calls: compiled, and the values a
/// hand computation gives, on both engines.
#[test]
fn top_level_constants_in_functions_give_hand_computed_values_on_both_engines() {
    let limits = limits();
    let script = r#"let source = "s"; let key_by = "k";
const BIG = 500;
const FEE = 0.25;
const UNIT = "bps";
const TIERS = [100, 1000];
const LABELS = #{ small: "S", large: "L" };
const WINDOW_MS = 60 * 1000;
const WATCH = ["a", "c"];
fn tier(size) { if size >= TIERS[1] { 2 } else if size >= TIERS[0] { 1 } else { 0 } }
fn init(key) { #{ n: 0, big: 0, window: WINDOW_MS } }
fn on_event(ev) {
    this.n += 1;
    if ev.size >= BIG { this.big += 1; }
    emit(#{ n: this.n, big: this.big, fee: ev.size * FEE, unit: UNIT.to_upper(),
            tier: tier(ev.size), label: if ev.size >= BIG { LABELS.large } else { LABELS["small"] },
            window: this.window, tiers: TIERS.len(), watched: WATCH.contains(ev.k) });
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"k":"a","size":50}
{"k":"a","size":500}
{"k":"a","size":2000}
{"k":"b","size":100}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    // (n, big, fee = size / 4, tier, label, watched) per event, by hand.
    let want = [
        (1, 0, 12.5, 0, "S", true),
        (2, 1, 125.0, 1, "L", true),
        (3, 2, 500.0, 2, "L", true),
        (1, 0, 25.0, 1, "S", false),
    ];
    assert_eq!(lines.len(), want.len(), "{compiled}");
    for (line, (n, big, fee, tier, label, watched)) in lines.iter().zip(want) {
        assert_eq!(
            line["value"],
            serde_json::json!({ "n": n, "big": big, "fee": fee, "unit": "BPS", "tier": tier,
                "label": label, "window": 60000, "tiers": 2, "watched": watched }),
            "{compiled}"
        );
    }
}

/// Where Rhai keeps a constant's name (a method that is not a standard one of the compiler),
/// the query runs on the interpreter and reads the value; changing a constant is Rhai's error,
/// alike on both engines, and the next event goes on.
#[test]
fn top_level_constants_are_read_only_on_both_engines() {
    let limits = limits();
    let script = r#"let source = "s";
const WATCH = ["A", "C"];
const LIMIT = 2;
fn on_event(ev) {
    if ev.step == 1 { emit(#{ watched: WATCH.contains(ev.sym), over: ev.n > LIMIT }); }
    if ev.step == 2 { WATCH.push("X"); }
    if ev.step == 3 { LIMIT = 3; }
    if ev.step == 4 { LIMIT += 1; }
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert!(!def.engine.compiled(), "{:?}", def.engine);
    let input = br#"{"sym":"A","n":3,"step":1}
{"step":2}
{"step":3}
{"step":4}
{"sym":"B","n":1,"step":1}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 5, "{compiled}");
    assert_eq!(
        lines[0]["value"],
        serde_json::json!({ "watched": true, "over": true })
    );
    let errors: Vec<&str> = lines[1..4]
        .iter()
        .map(|l| l["value"]["error"].as_str().unwrap())
        .collect();
    assert_eq!(
        errors,
        [
            "Non-pure method 'push' cannot be called on constant",
            "Cannot modify constant LIMIT",
            "Cannot modify constant LIMIT",
        ],
        "{compiled}"
    );
    assert_eq!(
        lines[4]["value"],
        serde_json::json!({ "watched": false, "over": false })
    );
}

/// `contains` of an array (each item by Rhai's `==`: an integer equals the same float, a string
/// no number), of a string (a string or a character) and of a map (a key), done in Rust by
/// compiled code: hand-computed values on both engines; a number is Rhai's error.
#[test]
fn contains_gives_hand_computed_values_on_both_engines() {
    let limits = limits();
    let script = r#"let source = "s";
fn on_event(ev) {
    let list = [1, "x", 2.5, ()];
    let m = #{ a: 1 };
    emit([list.contains(ev.v), "hexagon".contains(ev.s), m.contains(ev.s), ev.n.contains(1)]);
}"#;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = br#"{"v":1.0,"s":"a","n":[1]}
{"v":"x","s":"xag","n":[2]}
{"v":2,"s":"","n":[]}
{"v":null,"s":"hex","n":5}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    assert_eq!(lines.len(), 4, "{compiled}");
    let values: Vec<&serde_json::Value> = lines[..3].iter().map(|l| &l["value"]).collect();
    assert_eq!(
        values,
        [
            &serde_json::json!([true, true, true, true]),
            &serde_json::json!([true, true, false, false]),
            &serde_json::json!([false, true, false, false]),
        ],
        "{compiled}"
    );
    assert_error_naming(&lines[3], "contains", &compiled);
}

/// Words and hashtags of a text (`split`, `starts_with`, `ends_with`, `index_of`, done in Rust
/// by compiled code): hand-computed values on both engines, in characters where Rhai counts
/// characters; a number where a string is wanted is Rhai's error.
#[test]
fn text_functions_give_hand_computed_values_on_both_engines() {
    let limits = limits();
    let script = r##"let source = "s";
fn on_event(ev) {
    let tags = [];
    for w in ev.text.split(" ") {
        if w.starts_with('#') { tags.push(w.to_lower()); }
    }
    emit(#{ tags: tags, at: ev.text.index_of("#"), q: ev.text.ends_with("?"),
            words: ev.text.split().len(), parts: ev.text.split(',').len() });
}"##;
    let def = QueryDef::compile("q", script, &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    let input = "{\"text\":\"Love #Rust and #rhai\"}\n\
                 {\"text\":\"héé #x?\"}\n\
                 {\"text\":\"\"}\n\
                 {\"text\":\"a  b,c\"}\n\
                 {\"text\":5}\n";
    let (compiled, lines) = same_on_both(&def, input.as_bytes(), &limits);
    assert_eq!(lines.len(), 5, "{compiled}");
    let want = [
        serde_json::json!({ "tags": ["#rust", "#rhai"], "at": 5, "q": false, "words": 4, "parts": 1 }),
        // "héé " is 4 characters (6 bytes).
        serde_json::json!({ "tags": ["#x?"], "at": 4, "q": true, "words": 2, "parts": 1 }),
        // An empty text splits into one empty part and finds nothing.
        serde_json::json!({ "tags": [], "at": -1, "q": false, "words": 1, "parts": 1 }),
        // Two spaces make an empty word for `split(" ")`, none for `split()`.
        serde_json::json!({ "tags": [], "at": -1, "q": false, "words": 2, "parts": 2 }),
    ];
    for (line, want) in lines.iter().zip(&want) {
        assert_eq!(&line["value"], want, "{compiled}");
    }
    assert_error_naming(&lines[4], "split", &compiled);
}

/// `tests/hidden/NAME.rhai`, which must compile whole.
fn compiled_hidden_query(name: &str, limits: &Limits) -> QueryDef {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/hidden/{name}.rhai"));
    let def = QueryDef::compile(name, &std::fs::read_to_string(path).unwrap(), limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    def
}

/// The hidden text query (`tests/hidden/word_mood.rhai`: constant word lists, `split`,
/// `contains`, `continue`) compiles and counts the words a hand count gives.
#[test]
fn the_hidden_word_query_compiles_and_counts_by_hand() {
    let limits = limits();
    let def = compiled_hidden_query("word_mood", &limits);
    let input = br#"{"user":"a","text":"the love win"}
{"user":"a","text":"just hate"}
{"user":"b","text":"the the"}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    // Stop words (the, a, about, this, just) are not counted; love, win, best, excellent are
    // positive.
    let want = [
        ("a", 2, 2, 1, 1.0),
        ("a", 3, 2, 2, 2.0 / 3.0),
        ("b", 0, 0, 1, 0.0),
    ];
    assert_eq!(lines.len(), want.len(), "{compiled}");
    for (line, (user, words, positive, posts, ratio)) in lines.iter().zip(want) {
        assert_eq!(line["key"], user, "{compiled}");
        assert_eq!(
            line["value"],
            serde_json::json!({ "words": words, "positive": positive, "posts": posts,
                "ratio": ratio }),
            "{compiled}"
        );
    }
}

/// The hidden fee-table query (`tests/hidden/fee_tiers.rhai`: constant lists read by index in a
/// loop, and `len` of one) compiles and gives the tiers and fees worked out here by hand.
#[test]
fn the_hidden_fee_table_query_compiles_and_gives_hand_computed_fees() {
    let limits = limits();
    let def = compiled_hidden_query("fee_tiers", &limits);
    // Notional 5,000 (below every bound), 60,000 (at or above 10,000 and 50,000), exactly
    // 250,000 (a bound is in the tier above it), 1,500,000 (above every bound).
    let input = br#"{"symbol":"A","price":100.0,"size":50}
{"symbol":"A","price":200.0,"size":300}
{"symbol":"B","price":250.0,"size":1000}
{"symbol":"A","price":500.0,"size":3000}
"#;
    let (compiled, lines) = same_on_both(&def, input, &limits);
    let rates = [0.0030, 0.0025, 0.0020, 0.0015, 0.0010, 0.0005];
    let trades = [
        ("A", 5_000.0, 0),
        ("A", 60_000.0, 2),
        ("B", 250_000.0, 4),
        ("A", 1_500_000.0, 5),
    ];
    assert_eq!(lines.len(), trades.len(), "{compiled}");
    let mut fees = std::collections::HashMap::new();
    let mut counts = std::collections::HashMap::new();
    for (line, (symbol, notional, tier)) in lines.iter().zip(trades) {
        let fee = notional * rates[tier];
        let total = fees.entry(symbol).or_insert(0.0);
        *total += fee;
        let n = counts.entry(symbol).or_insert(0);
        *n += 1;
        assert_eq!(line["key"], symbol, "{compiled}");
        assert_eq!(
            line["value"],
            serde_json::json!({ "tier": tier, "fee": fee, "fees": *total, "trades": *n }),
            "{compiled}"
        );
    }
}

/// Helper functions called as methods on `this` (`this.add(x)`, and from there `this.note(x)`)
/// compile with `this` bound to the key's state, as Rhai binds it: their changes to the state
/// stay, their value is the call's, and an error inside names the place Rhai names. A helper
/// that uses `this` called plainly (Rhai: `this` is not bound), and a state with a field of the
/// method's name (Rhai would call a function pointer held there), stay on the interpreter.
#[test]
fn helpers_called_as_methods_on_this_compile_and_give_hand_computed_values() {
    let limits = limits();
    let script = |state: &str, call: &str| {
        format!(
            "let source = \"s\"; let key_by = \"k\";
fn init(key) {{ {state} }}
fn add(x) {{
    this.n += 1;
    this.total += x;
    this.note(x);
    this.total / this.n
}}
fn note(x) {{ this.last = 100 / x; }}
fn on_event(ev) {{
    let avg = {call};
    emit(#{{ avg: avg, n: this.n, last: this.last, total: this.total }});
    set_timer(ev.t + 10);
}}
fn on_timer(t) {{ this.note(t); emit(\"ticks\", #{{ last: this.last }}); }}"
        )
    };
    let state = "#{ n: 0, total: 0, last: 0 }";
    let def = QueryDef::compile("q", &script(state, "this.add(ev.a)"), &limits).unwrap();
    assert_eq!(def.engine.summary(), "compiled", "{:?}", def.engine);
    assert_eq!(
        def.engine.function_lines(),
        vec![
            "init: compiled",
            "add: compiled",
            "note: compiled",
            "on_event: compiled",
            "on_timer: compiled"
        ]
    );
    let input = b"{\"k\":\"a\",\"a\":4,\"t\":0}
{\"k\":\"a\",\"a\":10,\"t\":1}
{\"k\":\"b\",\"a\":0,\"t\":2}
{\"k\":\"a\",\"a\":1,\"t\":50}
";
    let (out, lines) = same_on_both(&def, input, &limits);
    let values: Vec<(&str, &serde_json::Value)> = lines
        .iter()
        .map(|l| (l["topic"].as_str().unwrap(), &l["value"]))
        .collect();
    // a: n 1, total 4, avg 4 / 1, last 100 / 4; then n 2, total 14, avg 14 / 2, last 100 / 10.
    assert_eq!(
        values[0],
        (
            "q",
            &serde_json::json!({ "avg": 4, "n": 1, "last": 25, "total": 4 })
        ),
        "{out}"
    );
    assert_eq!(
        values[1],
        (
            "q",
            &serde_json::json!({ "avg": 7, "n": 2, "last": 10, "total": 14 })
        ),
        "{out}"
    );
    // b: 100 / 0 inside `note`, called from `add`, called from on_event.
    assert_eq!(values[2].0, "q.errors", "{out}");
    assert_eq!(values[2].1["error"], "Division by zero: 100 / 0", "{out}");
    assert_eq!(values[2].1["function"], "on_event", "{out}");
    // a's timers at 10, 11 and 60 (b's event failed before its `set_timer`): on_timer's
    // `this.note(t)` sets last to 100 / 10, 100 / 11 and 100 / 60 on a's state.
    let ticks: Vec<i64> = values
        .iter()
        .filter(|(t, _)| *t == "q.ticks")
        .map(|(_, v)| v["last"].as_i64().unwrap())
        .collect();
    assert_eq!(ticks, [10, 9, 1], "{out}");
    // a: n 3, total 15, avg 15 / 3, last 100 / 1.
    let last_a = values
        .iter()
        .rev()
        .find(|(t, v)| *t == "q" && v["n"] == 3)
        .unwrap();
    assert_eq!(
        last_a.1,
        &serde_json::json!({ "avg": 5, "n": 3, "last": 100, "total": 15 }),
        "{out}"
    );

    // Called plainly, `add` has no `this`: interpreted, and Rhai's error on both.
    let def = QueryDef::compile("q", &script(state, "add(ev.a)"), &limits).unwrap();
    assert!(!def.engine.compiled());
    let (out, lines) = same_on_both(&def, input, &limits);
    assert_error_naming(&lines[0], "'this' not bound", &out);
    // A field named `note` beside the method `note`: interpreted, the same figures.
    let with_field = "#{ n: 0, total: 0, last: 0, note: 0 }";
    let def = QueryDef::compile("q", &script(with_field, "this.add(ev.a)"), &limits).unwrap();
    assert!(
        def.engine.summary().contains("a method called on `this`"),
        "{:?}",
        def.engine
    );
    let (out, lines) = same_on_both(&def, input, &limits);
    assert_eq!(
        lines[1]["value"],
        serde_json::json!({ "avg": 7, "n": 2, "last": 10, "total": 14 }),
        "{out}"
    );
}
