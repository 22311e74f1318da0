//! The online learners against River, on data nobody here wrote: three datasets bundled with
//! River 0.26.1 (`Phishing`, `TrumpApproval`, `Shuttle`), exported once to NDJSON by
//! `tests/data/ml/make_river_refs.py`, which also printed River's figures recorded below.
//!
//! Each test runs a query through `eddy run`'s engine (`offline::run`): the query learns per
//! event with features read in place from the event (`ev.features`), emits its prediction, and
//! the figure (accuracy, MAE, ROC AUC) is computed here from what it emitted, with plain code.
//!
//! River's figures, from
//! `python tests/data/ml/make_river_refs.py` with river 0.26.1 and scikit-learn 1.9.1:
//!
//! ```text
//! phishing StandardScaler | LogisticRegression()                              Accuracy: 89.28%
//! trump_approval StandardScaler | LinearRegression()                          MAE: 1.314548
//! trump_approval StandardScaler | LinearRegression(SGD(0.005), l2=0.01)       MAE: 1.607348
//! shuttle (10,000 events) MinMaxScaler | HalfSpaceTrees(seed=42)              ROC AUC: 0.900710
//! ```

use std::path::Path;

use eddy::offline::{self, RunOptions};
use eddy::{Limits, QueryDef};
use serde_json::Value;

/// River 0.26.1, `evaluate.progressive_val_score(Phishing, StandardScaler() |
/// LogisticRegression(), Accuracy())`.
const RIVER_PHISHING_ACCURACY: f64 = 0.8928;
/// River 0.26.1, `progressive_val_score(TrumpApproval, StandardScaler() | LinearRegression(),
/// MAE())`.
const RIVER_TRUMP_MAE: f64 = 1.3145482000473083;
/// The same with `LinearRegression(optimizer=optim.SGD(0.005), l2=0.01)`.
const RIVER_TRUMP_MAE_TUNED: f64 = 1.607348127925701;
/// River 0.26.1, `MinMaxScaler() | HalfSpaceTrees(seed=42)` on the first 10,000 events of
/// `Shuttle`, score then learn per event; exact ROC AUC of the scores (scikit-learn
/// `roc_auc_score`), which River's `RollingROCAUC(10_000)` prints as 90.07%.
const RIVER_SHUTTLE_AUC: f64 = 0.9007095962895217;
/// The sum of River's 10,000 scores, and the first event with a score above 0 (the first
/// window is 250 events).
const RIVER_SHUTTLE_SCORE_SUM: f64 = 4239.865142857141;
const RIVER_SHUTTLE_FIRST_SCORED: usize = 250;

/// Tolerances. eddy applies River's update rules in the same order, so the figures agree to
/// rounding; the stated tolerances leave room only for the order of floating-point sums.
const ACCURACY_TOLERANCE: f64 = 0.002;
const MAE_TOLERANCE: f64 = 1e-6;
const AUC_TOLERANCE: f64 = 0.005;

fn data(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/ml")
            .join(format!("{name}.ndjson")),
    )
    .unwrap()
}

/// Runs `script` over `input` and returns the values it emitted on its main topic.
fn run(script: &str, input: Vec<u8>) -> Vec<Value> {
    let limits = Limits::default();
    let def = QueryDef::compile("q", script, &limits).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let summary = offline::run(
        vec![def],
        input,
        &limits,
        &RunOptions::default(),
        &mut out,
        &mut err,
    )
    .unwrap();
    assert_eq!(summary.errors, 0, "{}", String::from_utf8_lossy(&out));
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["topic"] == "q")
        .map(|v| v["value"].clone())
        .collect()
}

/// Progressive validation with a River pipeline `StandardScaler() | model`: predict with the
/// scaler as it is, then learn the scaler, then the model on the newly scaled features.
fn progressive(model: &str, predict: &str) -> String {
    format!(
        r#"let source = "ml";
fn init(key) {{ #{{ sc: scaler(), m: {model} }} }}
fn on_event(ev) {{
    let p = this.m.{predict}(this.sc.transform(ev.features));
    this.sc.learn(ev.features);
    this.m.learn(this.sc.transform(ev.features), ev.y);
    emit(#{{ p: p, y: ev.y }});
}}"#
    )
}

#[test]
fn logreg_matches_rivers_accuracy_on_phishing() {
    let out = run(&progressive("logreg()", "predict"), data("phishing"));
    assert_eq!(out.len(), 1250);
    let right = out.iter().filter(|v| v["p"] == v["y"]).count();
    let accuracy = right as f64 / out.len() as f64;
    assert!(
        (accuracy - RIVER_PHISHING_ACCURACY).abs() <= ACCURACY_TOLERANCE,
        "eddy {accuracy}, River {RIVER_PHISHING_ACCURACY}"
    );
}

fn mae(out: &[Value]) -> f64 {
    out.iter()
        .map(|v| (v["p"].as_f64().unwrap() - v["y"].as_f64().unwrap()).abs())
        .sum::<f64>()
        / out.len() as f64
}

#[test]
fn linreg_matches_rivers_mae_on_trump_approval() {
    let out = run(&progressive("linreg()", "predict"), data("trump_approval"));
    assert_eq!(out.len(), 1001);
    let got = mae(&out);
    assert!(
        (got - RIVER_TRUMP_MAE).abs() <= MAE_TOLERANCE,
        "eddy {got}, River {RIVER_TRUMP_MAE}"
    );
    let out = run(
        &progressive("linreg(#{ lr: 0.005, l2: 0.01 })", "predict"),
        data("trump_approval"),
    );
    let got = mae(&out);
    assert!(
        (got - RIVER_TRUMP_MAE_TUNED).abs() <= MAE_TOLERANCE,
        "eddy {got}, River {RIVER_TRUMP_MAE_TUNED}"
    );
}

/// ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half.
fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[order[k]] = rank;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[test]
fn hst_matches_rivers_roc_auc_on_shuttle() {
    let script = r#"let source = "ml";
fn init(key) { #{ h: hst() } }
fn on_event(ev) {
    let s = this.h.score(ev.features);
    this.h.learn(ev.features);
    emit(#{ s: s, y: ev.y });
}"#;
    let out = run(script, data("shuttle"));
    assert_eq!(out.len(), 10_000);
    let scores: Vec<f64> = out.iter().map(|v| v["s"].as_f64().unwrap()).collect();
    let labels: Vec<bool> = out.iter().map(|v| v["y"] == 1).collect();
    let auc = roc_auc(&scores, &labels);
    assert!(
        (auc - RIVER_SHUTTLE_AUC).abs() <= AUC_TOLERANCE,
        "eddy {auc}, River {RIVER_SHUTTLE_AUC}"
    );
    // Seeded alike, the trees are River's: the scores agree, not just their ranking.
    let first = scores.iter().position(|&s| s > 0.0).unwrap();
    assert_eq!(first, RIVER_SHUTTLE_FIRST_SCORED);
    let sum: f64 = scores.iter().sum();
    assert!(
        (sum - RIVER_SHUTTLE_SCORE_SUM).abs() < 1e-6,
        "eddy {sum}, River {RIVER_SHUTTLE_SCORE_SUM}"
    );
}

#[test]
fn the_auc_helper_agrees_with_hand_computed_cases() {
    assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), 1.0);
    assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), 0.0);
    assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), 0.5);
    // Pairs (pos, neg): (0.8, 0.3) 1, (0.8, 0.6) 1, (0.4, 0.3) 1, (0.4, 0.6) 0 → 3/4.
    assert_eq!(
        roc_auc(&[0.8, 0.3, 0.4, 0.6], &[true, false, true, false]),
        0.75
    );
}

#[test]
fn a_feature_that_is_not_a_number_is_a_query_error_naming_it() {
    let script = r#"let source = "ml";
fn init(key) { #{ m: linreg() } }
fn on_event(ev) { this.m.learn(ev.features, ev.y); emit(this.m.count); }"#;
    let input = br#"{"features":{"a":1,"b":2.5,"c":true},"y":1}
{"features":{"a":1,"b":"two"},"y":1}
{"features":{"a":2,"b":0.5},"y":3}
"#
    .to_vec();
    let limits = Limits::default();
    let def = QueryDef::compile("q", script, &limits).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let summary = offline::run(
        vec![def],
        input,
        &limits,
        &RunOptions::default(),
        &mut out,
        &mut err,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(summary.errors, 1, "{text}");
    assert!(
        text.contains("feature `b`") && text.contains("a string"),
        "{text}"
    );
    // The bad event was skipped; the others learned.
    let counts: Vec<i64> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["topic"] == "q")
        .map(|v| v["value"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, vec![1, 2]);
}
