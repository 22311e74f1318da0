//! The binary fixes Rhai's hash seed before it makes any engine (`sandbox::fix_hashing_seed`).
//! This test is alone in its process, as `main` is, so it can do the same: with the seed fixed,
//! both engines still find functions and `switch` cases (compiled `switch` computes Rhai's hash
//! itself, and must follow the seed).

use eddy::compiled::EngineMode;
use eddy::difftest::run_on;
use eddy::sandbox::{fix_hashing_seed, HASHING_SEED};
use eddy::{Limits, QueryDef};

const QUERY: &str = r#"
let source = "s";
let key_by = "k";
fn bucket(x) { switch x { "a" => 1, "b" | "c" => 2, 3 => 30, _ => 0 } }
fn on_event(ev) { emit(#{ b: bucket(ev.v), listed: ["a", "z"].contains(ev.v) }); }
"#;

#[test]
fn a_fixed_seed_finds_functions_and_switch_cases_on_both_engines() {
    fix_hashing_seed();
    fix_hashing_seed();
    assert_eq!(
        rhai::config::hashing::get_hashing_seed(),
        &Some(HASHING_SEED)
    );
    let limits = Limits::default();
    let def = QueryDef::compile("q", QUERY, &limits).expect("compiles");
    // Compiled `switch` only when its hashes are Rhai's under the seed that is set.
    assert_eq!(
        def.engine.function_lines(),
        vec!["bucket: compiled", "on_event: compiled"]
    );
    let input = br#"{"k":"x","v":"a"}
{"k":"x","v":"c"}
{"k":"x","v":3}
{"k":"x","v":"q"}
{"k":"x","v":"z"}
"#;
    // By hand: the case of each value, and whether it is "a" or "z".
    let expected = [(1, true), (2, false), (30, false), (0, false), (0, true)];
    for engine in [EngineMode::Auto, EngineMode::Interpreter] {
        let out = run_on(&def, input, &limits, engine);
        assert!(out.rejected.is_empty(), "{out:?}");
        let got: Vec<(i64, bool)> = String::from_utf8(out.items)
            .unwrap()
            .lines()
            .map(|l| {
                let item: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(item["topic"], "q", "{l}");
                let v = &item["value"];
                (v["b"].as_i64().unwrap(), v["listed"].as_bool().unwrap())
            })
            .collect();
        assert_eq!(got, expected, "on {engine}");
    }
}
