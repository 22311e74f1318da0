//! Golden tests of the shipped queries: each runs `queries/<name>.rhai` over its sample input in
//! `tests/data/` through the offline runner, and checks every emitted item against the items a
//! plain helper below (`expect_<query>`) computes straight from the input (parsed with
//! serde_json). Nothing here is copied from the engine's output.
//!
//! The same helpers are the source of the example cases in `tests/queries/<query>/`: a test
//! checks that each case's `out.ndjson` is what its helper computes from its `in.ndjson` (run it
//! with `EDDY_WRITE_EXPECTED=1` to rewrite them after changing a helper or an input), and
//! `tests/cli.rs` runs `eddy test` over the cases, which compares them with the engine. The
//! Half-Space Trees scores of the `sensor_failure` and `trade_anomaly` cases are River's own,
//! computed once from the cases' inputs and committed (`RiverScores`).
//!
//! The samples are made by `eddy generate` (see `tests/data/README.md`); a test that reads one
//! also checks that it still is what the generator makes, so they cannot drift apart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use eddy::offline::{self, RunOptions};
use eddy::synth::{self, Scenario};
use eddy::{Limits, QueryDef};
use serde_json::{json, Value};

/// A sample input and the `eddy generate` arguments that made it.
struct Sample {
    file: &'static str,
    scenario: Scenario,
    count: u64,
    seed: u64,
    interval_ms: u32,
}

const START_MS: i64 = 1_700_000_000_000;

const TRADES: Sample = Sample {
    file: "trades.ndjson",
    scenario: Scenario::Trades,
    count: 4000,
    seed: 42,
    interval_ms: 100,
};
const SENSORS: Sample = Sample {
    file: "sensors.ndjson",
    scenario: Scenario::Sensors,
    count: 4000,
    seed: 42,
    interval_ms: 50,
};
const SOCIAL: Sample = Sample {
    file: "social.ndjson",
    scenario: Scenario::Social,
    count: 600,
    seed: 42,
    interval_ms: 1000,
};
const GAMES: Sample = Sample {
    file: "games.ndjson",
    scenario: Scenario::Games,
    count: 3000,
    seed: 42,
    interval_ms: 200,
};

fn load(sample: &Sample) -> (Vec<u8>, Vec<Value>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(sample.file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fresh = synth::generate(
        sample.scenario,
        sample.seed,
        sample.count,
        START_MS,
        sample.interval_ms,
    );
    assert!(
        bytes == fresh,
        "{} is not what `eddy generate` makes: regenerate it (tests/data/README.md)",
        sample.file
    );
    let events = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    (bytes, events)
}

/// Runs the shipped queries `names` over `input`; returns every item as parsed JSON.
fn run(names: &[&str], input: Vec<u8>) -> Vec<Value> {
    let limits = Limits::default();
    // The shipped models folder, as `eddy run` and `eddy serve` load it by default.
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    limits.models.load_dir(&models, &limits).unwrap();
    let defs: Vec<QueryDef> = names
        .iter()
        .map(|name| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("queries/{name}.rhai"));
            let script = std::fs::read_to_string(path).unwrap();
            QueryDef::compile(name, &script, &limits).unwrap()
        })
        .collect();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let summary = offline::run(
        defs,
        input,
        &limits,
        &RunOptions::default(),
        &mut out,
        &mut err,
    )
    .unwrap();
    assert_eq!(summary.rejected, 0, "{}", String::from_utf8_lossy(&err));
    let items: Vec<Value> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    for item in &items {
        assert!(
            !item["topic"].as_str().unwrap().ends_with(".errors"),
            "script error: {item}"
        );
    }
    items
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn assert_close(got: &Value, want: f64, what: &str) {
    assert!(close(f(got), want), "{what}: got {got}, want {want}");
}

fn item(topic: &str, key: impl Into<Value>, value: Value) -> Value {
    json!({"topic": topic, "key": key.into(), "value": value})
}

/// Where `got` and `want` differ: numbers by value within `rel` (relative to the larger of 1 and
/// their magnitudes), everything else exactly. Written apart from `eddy test`'s comparison, so
/// that each checks the other.
fn mismatch(got: &Value, want: &Value, rel: f64, path: &str) -> Option<String> {
    match (got, want) {
        (Value::Number(_), Value::Number(_)) => {
            let (a, b) = (f(got), f(want));
            let ok = a == b || (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0);
            (!ok).then(|| format!("{path}: got {got}, want {want}"))
        }
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => mismatch(x, y, rel, &format!("{path}.{k}")),
                (x, y) => Some(format!("{path}.{k}: got {x:?}, want {y:?}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| mismatch(x, y, rel, &format!("{path}[{i}]"))),
        _ => (got != want).then(|| format!("{path}: got {got}, want {want}")),
    }
}

/// Asserts that `got` holds the items of `want`, in the same order.
fn assert_items(got: &[Value], want: &[Value], rel: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if let Some(why) = mismatch(g, w, rel, "") {
            panic!("item {i}: {why}\n  got  {g}\n  want {w}");
        }
    }
    assert_eq!(got.len(), want.len(), "number of items");
}

/// VWAP per symbol after each trade.
fn expect_vwap(trades: &[Value]) -> Vec<Value> {
    let mut sums: HashMap<String, (f64, i64, i64)> = HashMap::new();
    let mut items = Vec::new();
    for trade in trades {
        let symbol = trade["symbol"].as_str().unwrap();
        let (notional, volume, count) = sums.entry(symbol.to_owned()).or_default();
        *notional += f(&trade["price"]) * trade["size"].as_i64().unwrap() as f64;
        *volume += trade["size"].as_i64().unwrap();
        *count += 1;
        items.push(item(
            "vwap",
            symbol,
            json!({
                "vwap": *notional / *volume as f64, "volume": *volume, "trades": *count,
                "last": trade["price"], "ts": trade["ts"],
            }),
        ));
    }
    items
}

/// One-minute bars per symbol, emitted once the watermark (newest time - 1 s) reaches their
/// end, in order of end then symbol; trades older than the watermark go to `ohlc_1m.late`.
/// Also returns, per item, how many trades were handled before it.
fn expect_ohlc(trades: &[Value]) -> (Vec<Value>, Vec<usize>) {
    #[derive(Default, Debug)]
    struct Bar {
        open: f64,
        high: f64,
        low: f64,
        close: f64,
        volume: i64,
        notional: f64,
        count: i64,
    }
    let lateness = 1000;
    let mut open: BTreeMap<(i64, String), Bar> = BTreeMap::new();
    let mut items = Vec::new();
    let mut before = Vec::new();
    let mut watermark = i64::MIN;
    let close = |end: i64, symbol: &str, bar: Bar| {
        item(
            "ohlc_1m",
            symbol,
            json!({
                "start": end - 60_000, "end": end, "open": bar.open, "high": bar.high,
                "low": bar.low, "close": bar.close, "volume": bar.volume,
                "vwap": bar.notional / bar.volume as f64, "count": bar.count,
            }),
        )
    };
    for (i, t) in trades.iter().enumerate() {
        let ts = t["ts"].as_i64().unwrap();
        let symbol = t["symbol"].as_str().unwrap().to_owned();
        if ts < watermark {
            let event = t.clone();
            items.push(item(
                "ohlc_1m.late",
                symbol,
                json!({"event": event, "event_time": ts, "watermark": watermark}),
            ));
            before.push(i);
            continue;
        }
        watermark = watermark.max(ts - lateness);
        while let Some(entry) = open.first_entry() {
            if entry.key().0 > watermark {
                break;
            }
            let ((end, symbol), bar) = entry.remove_entry();
            items.push(close(end, &symbol, bar));
            before.push(i);
        }
        let start = ts - ts.rem_euclid(60_000);
        let (p, s) = (f(&t["price"]), t["size"].as_i64().unwrap());
        let bar = open.entry((start + 60_000, symbol)).or_default();
        if bar.count == 0 {
            (bar.open, bar.high, bar.low) = (p, p, p);
        }
        bar.high = bar.high.max(p);
        bar.low = bar.low.min(p);
        bar.close = p;
        bar.volume += s;
        bar.notional += p * s as f64;
        bar.count += 1;
    }
    for ((end, symbol), bar) in open {
        items.push(close(end, &symbol, bar));
        before.push(trades.len());
    }
    (items, before)
}

/// Sample standard deviation, two-pass.
fn mean_std(xs: &VecDeque<f64>) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A trade whose return is more than 4 sample standard deviations from the mean of the
/// symbol's last 50 returns (once it has 20).
fn expect_price_alerts(trades: &[Value]) -> Vec<Value> {
    let mut items = Vec::new();
    let mut state: HashMap<String, (f64, VecDeque<f64>)> = HashMap::new();
    for t in trades {
        let price = f(&t["price"]);
        let symbol = t["symbol"].as_str().unwrap().to_owned();
        let Some((last, returns)) = state.get_mut(&symbol) else {
            state.insert(symbol, (price, VecDeque::new()));
            continue;
        };
        let change = price / *last - 1.0;
        if returns.len() >= 20 {
            let (mean, std) = mean_std(returns);
            let z = if std == 0.0 {
                0.0
            } else {
                (change - mean) / std
            };
            if z.abs() > 4.0 {
                items.push(item(
                    "price_alerts.alerts",
                    symbol.clone(),
                    json!({
                        "symbol": symbol, "price": t["price"], "previous": *last,
                        "change": change, "zscore": z, "ts": t["ts"],
                    }),
                ));
            }
        }
        returns.push_back(change);
        if returns.len() > 50 {
            returns.pop_front();
        }
        *last = price;
    }
    items
}

/// EWMA (alpha 0.1) anomalies past 5 standard deviations after 10 readings, devices silent for
/// 30 s of event time (in time order, then device order) and back again.
fn expect_sensor_anomaly(readings: &[Value]) -> Vec<Value> {
    struct Device {
        n: u64,
        mean: f64,
        var: f64,
        last_seen: i64,
        silent: bool,
    }
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    let mut items: Vec<Value> = Vec::new();
    let alpha = 0.1;
    let mut watermark = i64::MIN;
    let alert = |id: &str, value: Value| item("sensor_anomaly.alerts", id, value);
    for r in readings {
        let ts = r["ts"].as_i64().unwrap();
        watermark = watermark.max(ts);
        // Silences the watermark reached before this reading, in time order, then device order.
        let mut due: Vec<(i64, String)> = devices
            .iter()
            .filter(|(_, d)| !d.silent && d.last_seen + 30_000 <= watermark)
            .map(|(id, d)| (d.last_seen + 30_000, id.clone()))
            .collect();
        due.sort();
        for (_, id) in due {
            let d = devices.get_mut(&id).unwrap();
            d.silent = true;
            items.push(alert(&id, json!({"kind": "silent", "device": id, "last_seen": d.last_seen, "silent_ms": 30_000})));
        }
        let id = r["device"]["id"].as_str().unwrap().to_owned();
        let temp = f(&r["temp"]);
        let d = devices.entry(id.clone()).or_insert(Device {
            n: 0,
            mean: 0.0,
            var: 0.0,
            last_seen: ts,
            silent: false,
        });
        if d.silent {
            items.push(alert(
                &id,
                json!({"kind": "back", "device": id, "ts": ts, "silent_ms": ts - d.last_seen}),
            ));
            d.silent = false;
        }
        d.last_seen = ts;
        let std = if d.n >= 2 { d.var.sqrt() } else { 0.0 };
        let z = if std == 0.0 {
            0.0
        } else {
            (temp - d.mean) / std
        };
        if d.n >= 10 && z.abs() > 5.0 {
            items.push(alert(&id, json!({"kind": "anomaly", "device": id, "temp": r["temp"], "expected": d.mean, "zscore": z, "ts": ts})));
            continue;
        }
        if d.n == 0 {
            d.mean = temp;
        } else {
            let diff = temp - d.mean;
            d.mean += alpha * diff;
            d.var = (1.0 - alpha) * (d.var + alpha * diff * diff);
        }
        d.n += 1;
    }
    // End of input: every device still speaking goes silent, in time order.
    let mut due: Vec<(i64, String)> = devices
        .iter()
        .filter(|(_, d)| !d.silent)
        .map(|(id, d)| (d.last_seen + 30_000, id.clone()))
        .collect();
    due.sort();
    for (_, id) in due {
        items.push(alert(&id, json!({"kind": "silent", "device": id, "last_seen": devices[&id].last_seen, "silent_ms": 30_000})));
    }
    items
}

/// VADER score per post; per hashtag an EWMA (alpha 0.05) of the scores and a count, keyed by
/// the hashtag; every 50 posts the five most mentioned hashtags (ties by name).
fn expect_hashtag_sentiment(posts: &[Value]) -> Vec<Value> {
    let analyzer = vader_sentiment::SentimentIntensityAnalyzer::new();
    let mut tags: HashMap<String, (f64, i64)> = HashMap::new();
    let mut mentions: HashMap<String, i64> = HashMap::new();
    let mut items = Vec::new();
    for (n, post) in posts.iter().enumerate() {
        let score = *analyzer
            .polarity_scores(post["text"].as_str().unwrap())
            .get("compound")
            .unwrap();
        for tag in post["hashtags"].as_array().unwrap() {
            let tag = tag.as_str().unwrap().to_owned();
            let entry = tags.entry(tag.clone()).or_insert((score, 0));
            if entry.1 > 0 {
                entry.0 += 0.05 * (score - entry.0);
            }
            entry.1 += 1;
            *mentions.entry(tag.clone()).or_default() += 1;
            items.push(item(
                "hashtag_sentiment",
                tag.clone(),
                json!({"hashtag": tag, "sentiment": entry.0, "score": score, "posts": entry.1}),
            ));
        }
        if (n + 1) % 50 == 0 {
            let mut top: Vec<(String, i64)> =
                mentions.iter().map(|(k, v)| (k.clone(), *v)).collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let top: Vec<Value> = top
                .into_iter()
                .take(5)
                .map(|(item, count)| json!({"item": item, "count": count, "error": 0}))
                .collect();
            items.push(item(
                "hashtag_sentiment.trending",
                Value::Null,
                json!({"posts": n + 1, "top": top}),
            ));
        }
    }
    items
}

/// Per-player counters after each event, events in the last minute, and a summary per session.
fn expect_player_stats(events: &[Value]) -> Vec<Value> {
    #[derive(Default)]
    struct Player {
        sessions: i64,
        kills: i64,
        deaths: i64,
        score: i64,
        start: i64,
        s_kills: i64,
        s_deaths: i64,
        s_score: i64,
        times: Vec<i64>,
    }
    let mut players: HashMap<String, Player> = HashMap::new();
    let mut items = Vec::new();
    for e in events {
        let id = e["player"].as_str().unwrap().to_owned();
        let ts = e["ts"].as_i64().unwrap();
        let p = players.entry(id.clone()).or_default();
        p.times.push(ts);
        match e["kind"].as_str().unwrap() {
            "session_start" => {
                p.sessions += 1;
                (p.start, p.s_kills, p.s_deaths, p.s_score) = (ts, 0, 0, 0);
            }
            "session_end" => items.push(item(
                "player_stats.sessions",
                id.clone(),
                json!({
                    "start": p.start, "end": ts, "duration_ms": ts - p.start,
                    "kills": p.s_kills, "deaths": p.s_deaths, "score": p.s_score,
                }),
            )),
            "kill" => {
                p.kills += 1;
                p.s_kills += 1;
            }
            "death" => {
                p.deaths += 1;
                p.s_deaths += 1;
            }
            "score" => {
                let n = e["points"].as_i64().unwrap();
                p.score += n;
                p.s_score += n;
            }
            other => panic!("unknown kind {other}"),
        }
        let kd = if p.deaths == 0 {
            p.kills as f64
        } else {
            p.kills as f64 / p.deaths as f64
        };
        let recent = p
            .times
            .iter()
            .filter(|&&t| t > ts - 60_000 && t <= ts)
            .count();
        items.push(item(
            "player_stats",
            id.clone(),
            json!({
                "sessions": p.sessions, "kills": p.kills, "deaths": p.deaths, "kd": kd,
                "score": p.score, "events_per_min": recent,
            }),
        ));
    }
    items
}

#[test]
fn vwap_matches_a_plain_running_sum() {
    let (input, trades) = load(&TRADES);
    let items = run(&["vwap"], input);
    assert!(items.iter().all(|i| i["value"].get("sent_us").is_none()));
    assert_items(&items, &expect_vwap(&trades), 1e-12);
}

#[test]
fn ohlc_bars_match_and_close_when_the_watermark_passes_their_end() {
    let (input, trades) = load(&TRADES);
    // Run with vwap, which emits once per trade: the vwap items before a bar count the trades
    // handled before the bar was emitted. ohlc_1m goes first, so the trade that closes a bar is
    // counted after the bar it closed.
    let items = run(&["ohlc_1m", "vwap"], input);
    let (want, want_before) = expect_ohlc(&trades);
    assert!(want.len() > 100);
    let mut bars = Vec::new();
    let mut before = Vec::new();
    let mut trades_before = 0;
    for item in items {
        if item["topic"] == "vwap" {
            trades_before += 1;
        } else {
            bars.push(item);
            before.push(trades_before);
        }
    }
    assert_items(&bars, &want, 1e-12);
    assert_eq!(before, want_before, "bars emitted at the wrong time");
}

#[test]
fn ohlc_late_trade_goes_to_the_late_topic() {
    // Two minutes of trades, then one that belongs to the first, closed, minute.
    let input = "{\"symbol\":\"X\",\"price\":10.0,\"size\":1,\"ts\":60000}\n\
                 {\"symbol\":\"X\",\"price\":12.0,\"size\":3,\"ts\":125000}\n\
                 {\"symbol\":\"X\",\"price\":99.0,\"size\":1,\"ts\":61000}\n";
    let items = run(&["ohlc_1m"], input.as_bytes().to_vec());
    let topics: Vec<&str> = items.iter().map(|i| i["topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["ohlc_1m", "ohlc_1m.late", "ohlc_1m"]);
    assert_eq!(items[0]["value"]["open"], json!(10.0));
    assert_eq!(items[0]["value"]["count"], json!(1));
    assert_eq!(items[1]["value"]["event"]["price"], json!(99.0));
    assert_eq!(items[1]["value"]["watermark"], json!(124_000));
    assert_eq!(items[2]["value"]["start"], json!(120_000));
    let events: Vec<Value> = input
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_items(&items, &expect_ohlc(&events).0, 0.0);
}

#[test]
fn price_alerts_match_a_plain_rolling_zscore() {
    let (input, trades) = load(&TRADES);
    let items = run(&["price_alerts"], input);
    let want = expect_price_alerts(&trades);
    assert!(want.len() >= 3, "the sample should trip some alerts");
    // The ring keeps running sums; the helper sums twice: z-scores agree to 1e-6.
    assert_items(&items, &want, 1e-6);
}

#[test]
fn sensor_anomalies_and_silences_match_a_plain_model() {
    let (input, readings) = load(&SENSORS);
    let items = run(&["sensor_anomaly"], input);
    let want = expect_sensor_anomaly(&readings);
    let kinds = |v: &[Value], k: &str| v.iter().filter(|e| e["value"]["kind"] == k).count();
    assert!(
        kinds(&want, "anomaly") >= 3,
        "the sample should have anomalies"
    );
    let last = readings.last().unwrap()["ts"].as_i64().unwrap();
    let silent_device = want.iter().any(|e| {
        e["value"]["kind"] == "silent"
            && e["key"] == synth::SILENT_DEVICE
            && e["value"]["last_seen"].as_i64() < Some(last - 30_000)
    });
    assert!(
        silent_device,
        "{} should go silent mid-stream",
        synth::SILENT_DEVICE
    );
    assert_items(&items, &want, 1e-9);
}

#[test]
fn hashtag_sentiment_matches_vader_and_exact_counts() {
    let (input, posts) = load(&SOCIAL);
    let items = run(&["hashtag_sentiment"], input);
    let want = expect_hashtag_sentiment(&posts);
    assert!(want
        .iter()
        .any(|i| i["value"]["score"].as_f64() < Some(-0.3)));
    // Keyed by hashtag (emit_to), though the query has no key_by; trending has no key.
    for item in &items {
        match item["topic"].as_str() {
            Some("hashtag_sentiment") => assert_eq!(item["key"], item["value"]["hashtag"]),
            _ => assert_eq!(item["key"], Value::Null),
        }
    }
    assert_items(&items, &want, 1e-9);
}

#[test]
fn player_stats_match_plain_counts() {
    let (input, events) = load(&GAMES);
    let items = run(&["player_stats"], input);
    let want = expect_player_stats(&events);
    assert!(want.iter().any(|i| i["topic"] == "player_stats.sessions"));
    assert_items(&items, &want, 1e-12);
}

// ------------------------------------------------------------------ the example cases

/// The Half-Space Trees scores River 0.26.1 gives for the items of an example case, in order:
/// `tests/data/ml/<case>_hst.ndjson`, written by `tests/data/ml/make_hst_case_refs.py` from the
/// case's `in.ndjson` with the query's settings. Each line names the key and time of its item,
/// so that a score cannot be paired with the wrong one.
struct RiverScores {
    case: &'static str,
    rows: std::vec::IntoIter<Value>,
}

impl RiverScores {
    fn load(case: &'static str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/ml")
            .join(format!("{case}_hst.ndjson"));
        RiverScores {
            case,
            rows: ndjson(&path).into_iter(),
        }
    }

    /// River's score of the next item, which must be `key`'s at `ts`.
    fn next(&mut self, key: &str, ts: i64) -> f64 {
        let row = self.rows.next().unwrap_or_else(|| {
            panic!(
                "{}: River scored fewer items than the query emits: rerun make_hst_case_refs.py",
                self.case
            )
        });
        assert!(
            row["key"] == key && row["ts"] == ts,
            "{}: River's next score is for {row}, the next item is {key} at {ts}: rerun make_hst_case_refs.py",
            self.case
        );
        f(&row["score"])
    }

    fn finish(mut self) {
        assert!(
            self.rows.next().is_none(),
            "{}: River scored more items than the query emits",
            self.case
        );
    }
}

/// The limit the `sensor_failure` query forecasts towards, in °C.
const SENSOR_LIMIT: f64 = 40.0;

/// Holt's linear trend (alpha 0.3, beta 0.1) of each device's temperature, the forecast one
/// step ahead, the steps to 40 °C times an EWMA (alpha 0.2) of the gaps between readings, and
/// River's Half-Space Trees score of the reading (from [`RiverScores`]).
fn expect_sensor_failure(readings: &[Value]) -> Vec<Value> {
    #[derive(Default)]
    struct Device {
        first: Option<f64>,
        level: Option<f64>,
        trend: f64,
        gap: Option<f64>,
        last_ts: Option<i64>,
    }
    let (alpha, beta) = (0.3, 0.1);
    let mut river = RiverScores::load("sensor_failure");
    let mut devices: HashMap<String, Device> = HashMap::new();
    let mut items = Vec::new();
    for r in readings {
        let id = r["device"]["id"].as_str().unwrap().to_owned();
        let (temp, ts) = (f(&r["temp"]), r["ts"].as_i64().unwrap());
        let d = devices.entry(id.clone()).or_default();
        if let Some(last) = d.last_ts {
            let gap = (ts - last) as f64;
            d.gap = Some(d.gap.map_or(gap, |g| g + 0.2 * (gap - g)));
        }
        d.last_ts = Some(ts);
        let anomaly = river.next(&id, ts);
        match (d.level, d.first) {
            (Some(level), _) => {
                let next = alpha * temp + (1.0 - alpha) * (level + d.trend);
                d.trend = beta * (next - level) + (1.0 - beta) * d.trend;
                d.level = Some(next);
            }
            (None, Some(first)) => {
                d.level = Some((first + temp) / 2.0);
                d.trend = temp - first;
            }
            (None, None) => d.first = Some(temp),
        }
        let steps = d.level.and_then(|level| {
            if level == SENSOR_LIMIT {
                return Some(0.0);
            }
            Some((SENSOR_LIMIT - level) / d.trend).filter(|h| h.is_finite() && *h >= 0.0)
        });
        let eta_ms = steps.zip(d.gap).map(|(h, g)| h * g);
        items.push(item(
            "sensor_failure",
            id.clone(),
            json!({
                "device": id, "temp": r["temp"], "forecast": d.level.map(|l| l + d.trend),
                "eta_ms": eta_ms, "anomaly": anomaly, "ts": ts,
            }),
        ));
    }
    river.finish();
    items
}

/// Per symbol after its first trade: the return since the previous trade, the size's z-score
/// against the running mean and population variance (Welford, River's StandardScaler, 0 while
/// the variance is 0), the gap, and River's Half-Space Trees score (from [`RiverScores`]).
fn expect_trade_anomaly(trades: &[Value]) -> Vec<Value> {
    #[derive(Default)]
    struct Symbol {
        last: Option<(f64, i64)>,
        n: u64,
        mean: f64,
        var: f64,
    }
    let mut river = RiverScores::load("trade_anomaly");
    let mut symbols: HashMap<String, Symbol> = HashMap::new();
    let mut items = Vec::new();
    for t in trades {
        let sym = t["symbol"].as_str().unwrap().to_owned();
        let (price, size, ts) = (f(&t["price"]), f(&t["size"]), t["ts"].as_i64().unwrap());
        let s = symbols.entry(sym.clone()).or_default();
        s.n += 1;
        let old = s.mean;
        s.mean += (size - old) / s.n as f64;
        s.var += ((size - old) * (size - s.mean) - s.var) / s.n as f64;
        let Some((last_price, last_ts)) = s.last.replace((price, ts)) else {
            continue;
        };
        let size_z = if s.var != 0.0 {
            (size - s.mean) / s.var.sqrt()
        } else {
            0.0
        };
        let score = river.next(&sym, ts);
        items.push(item(
            "trade_anomaly",
            sym.clone(),
            json!({
                "symbol": sym, "price": t["price"], "ret": (price - last_price) / last_price,
                "size_z": size_z, "gap_ms": ts - last_ts, "score": score, "ts": ts,
            }),
        ));
    }
    river.finish();
    items
}

/// The coefficients and intercept of the churn model, as scikit-learn fitted them
/// (`tests/data/ml/churn_coefficients.json`, written by `make_churn_model.py`).
fn churn_coefficients() -> (Vec<f64>, f64) {
    let c: Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ml/churn_coefficients.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let coef = c["coef"].as_array().unwrap().iter().map(f).collect();
    (coef, f(&c["intercept"]))
}

/// When a session ends: its features and the logistic function of them with the committed
/// coefficients, `1 / (1 + e^-(b + w·x))`, at risk when above 0.5.
fn expect_player_churn(events: &[Value]) -> Vec<Value> {
    #[derive(Default)]
    struct P {
        sessions: i64,
        start: Option<i64>,
        kills: i64,
        deaths: i64,
        score: i64,
    }
    let (coef, intercept) = churn_coefficients();
    let mut players: HashMap<String, P> = HashMap::new();
    let mut items = Vec::new();
    for ev in events {
        let id = ev["player"].as_str().unwrap().to_owned();
        let p = players.entry(id.clone()).or_default();
        let ts = ev["ts"].as_i64().unwrap();
        match ev["kind"].as_str().unwrap() {
            "session_start" => {
                p.sessions += 1;
                p.start = Some(ts);
                (p.kills, p.deaths, p.score) = (0, 0, 0);
            }
            "kill" => p.kills += 1,
            "death" => p.deaths += 1,
            "score" => p.score += ev["points"].as_i64().unwrap(),
            "session_end" => {
                let Some(start) = p.start.take() else {
                    continue;
                };
                let minutes = (ts - start) as f64 / 60000.0;
                let x = [
                    minutes,
                    p.kills as f64,
                    p.deaths as f64,
                    p.score as f64,
                    p.sessions as f64,
                ];
                let z = intercept + coef.iter().zip(x).map(|(w, x)| w * x).sum::<f64>();
                let churn = 1.0 / (1.0 + (-z).exp());
                items.push(item(
                    "player_churn",
                    id.clone(),
                    json!({
                        "player": id, "churn": churn, "at_risk": churn > 0.5,
                        "session": {
                            "session_minutes": minutes, "kills": p.kills, "deaths": p.deaths,
                            "score": p.score, "sessions": p.sessions,
                        },
                        "ts": ts,
                    }),
                ));
            }
            other => panic!("unknown kind {other}"),
        }
    }
    items
}

/// Each shipped query's case folder and the helper that computes its expected items.
type Helper = fn(&[Value]) -> Vec<Value>;
const CASES: [(&str, Helper); 9] = [
    ("vwap", expect_vwap),
    ("ohlc_1m", |t| expect_ohlc(t).0),
    ("price_alerts", expect_price_alerts),
    ("sensor_anomaly", expect_sensor_anomaly),
    ("hashtag_sentiment", expect_hashtag_sentiment),
    ("player_stats", expect_player_stats),
    ("sensor_failure", expect_sensor_failure),
    ("trade_anomaly", expect_trade_anomaly),
    ("player_churn", expect_player_churn),
];

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/queries")
}

fn ndjson(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Writes items as `eddy run` prints them: `{"topic","key","value"}`, one per line.
fn write_ndjson(path: &Path, items: &[Value]) {
    let text: String = items
        .iter()
        .map(|i| {
            let (topic, key, value) = (&i["topic"], &i["key"], &i["value"]);
            format!("{{\"topic\":{topic},\"key\":{key},\"value\":{value}}}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// Shipped queries whose example case is a cookbook recipe (its expected items are computed in
/// `tests/cookbook.rs`).
const COOKBOOK_QUERIES: [&str; 1] = ["asof_join"];

#[test]
fn every_shipped_query_has_an_example_case() {
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("queries")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let case = if COOKBOOK_QUERIES.contains(&name.as_str()) {
            cases_dir().join("cookbook").join(&name)
        } else {
            assert!(
                CASES.iter().any(|(case, _)| *case == name),
                "queries/{name}.rhai has no case in tests/queries/{name}/"
            );
            cases_dir().join(&name)
        };
        let target = std::fs::read_to_string(case.join("query")).unwrap();
        assert_eq!(
            case.join(target.trim()).canonicalize().unwrap(),
            path.canonicalize().unwrap()
        );
    }
}

#[test]
fn example_cases_expect_what_the_helpers_compute() {
    let rewrite = std::env::var_os("EDDY_WRITE_EXPECTED").is_some();
    for (name, helper) in CASES {
        let dir = cases_dir().join(name);
        let want = helper(&ndjson(&dir.join("in.ndjson")));
        assert!(!want.is_empty(), "{name}: the case should emit something");
        if rewrite {
            write_ndjson(&dir.join("out.ndjson"), &want);
        }
        let expected = ndjson(&dir.join("out.ndjson"));
        for (i, (g, w)) in expected.iter().zip(&want).enumerate() {
            if let Some(why) = mismatch(g, w, 0.0, "") {
                panic!(
                    "{name}/out.ndjson line {}: {why}: not what the helper computes",
                    i + 1
                );
            }
        }
        assert_eq!(expected.len(), want.len(), "{name}: number of items");
    }
}

fn by_key_values(items: &[Value], topic: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for item in items.iter().filter(|i| i["topic"] == topic) {
        out.entry(item["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(item["value"].clone());
    }
    out
}

#[test]
fn sensor_failure_forecasts_match_holt_written_out() {
    let (input, events) = load(&SENSORS);
    let items = run(&["sensor_failure"], input);
    let got = by_key_values(&items, "sensor_failure");
    let mut readings: BTreeMap<String, Vec<(f64, i64)>> = BTreeMap::new();
    for ev in &events {
        readings
            .entry(ev["device"]["id"].as_str().unwrap().to_owned())
            .or_default()
            .push((f(&ev["temp"]), ev["ts"].as_i64().unwrap()));
    }
    assert_eq!(got.len(), readings.len());
    for (device, rs) in &readings {
        let out = &got[device];
        assert_eq!(out.len(), rs.len(), "{device}");
        let (alpha, beta, limit) = (0.3, 0.1, 40.0);
        let (mut first, mut level, mut trend): (Option<f64>, Option<f64>, f64) = (None, None, 0.0);
        let mut gap: Option<f64> = None;
        for (i, ((temp, ts), v)) in rs.iter().zip(out).enumerate() {
            if i > 0 {
                let d = (ts - rs[i - 1].1) as f64;
                gap = Some(gap.map_or(d, |g| g + 0.2 * (d - g)));
            }
            match (level, first) {
                (Some(l), _) => {
                    let next = alpha * temp + (1.0 - alpha) * (l + trend);
                    trend = beta * (next - l) + (1.0 - beta) * trend;
                    level = Some(next);
                }
                (None, Some(y1)) => {
                    level = Some((y1 + temp) / 2.0);
                    trend = temp - y1;
                }
                (None, None) => first = Some(*temp),
            }
            match level {
                None => assert!(v["forecast"].is_null() && v["eta_ms"].is_null(), "{v}"),
                Some(l) => {
                    assert_close(&v["forecast"], l + trend, "forecast");
                    let steps = if l == limit {
                        Some(0.0)
                    } else {
                        Some((limit - l) / trend).filter(|h| h.is_finite() && *h >= 0.0)
                    };
                    match (steps, gap) {
                        (Some(h), Some(g)) => assert_close(&v["eta_ms"], h * g, "eta_ms"),
                        _ => assert!(v["eta_ms"].is_null(), "{v}"),
                    }
                }
            }
            let score = f(&v["anomaly"]);
            assert!((0.0..=1.0).contains(&score), "{v}");
            if i < 25 {
                assert_eq!(score, 0.0, "first window of {device}");
            }
        }
    }
}

#[test]
fn sensor_failure_scores_spikes_above_ordinary_readings() {
    // 200 readings per device, so that each has many complete windows.
    let input = synth::generate(Scenario::Sensors, 7, 40_000, START_MS, 50);
    let events: Vec<Value> = input
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let items = run(&["sensor_failure"], input);
    let got = by_key_values(&items, "sensor_failure");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<String, f64> = HashMap::new();
    let (mut spikes, mut ordinary) = (Vec::new(), Vec::new());
    for ev in &events {
        let device = ev["device"]["id"].as_str().unwrap().to_owned();
        let i = seen.entry(device.clone()).or_default();
        let temp = f(&ev["temp"]);
        let score = f(&got[&device][*i]["anomaly"]);
        // Spikes are +15 °C on one reading (engine/synth.rs).
        if *i >= 50 {
            if last.get(&device).is_some_and(|l| temp > l + 10.0) {
                spikes.push(score);
            } else {
                ordinary.push(score);
            }
        }
        last.insert(device, temp);
        *i += 1;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(spikes.len() >= 20, "{}", spikes.len());
    assert!(
        mean(&spikes) > mean(&ordinary) + 0.02,
        "spikes {} ordinary {}",
        mean(&spikes),
        mean(&ordinary)
    );
}

#[test]
fn trade_anomaly_features_match_plain_arithmetic() {
    let (input, events) = load(&TRADES);
    let items = run(&["trade_anomaly"], input);
    let got = by_key_values(&items, "trade_anomaly");
    let mut state: HashMap<String, (f64, i64, u64, f64, f64)> = HashMap::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for ev in &events {
        let sym = ev["symbol"].as_str().unwrap().to_owned();
        let (price, size, ts) = (f(&ev["price"]), f(&ev["size"]), ev["ts"].as_i64().unwrap());
        let entry = state
            .entry(sym.clone())
            .or_insert((f64::NAN, 0, 0, 0.0, 0.0));
        // Welford, population variance, as River's StandardScaler.
        entry.2 += 1;
        let old = entry.3;
        entry.3 += (size - old) / entry.2 as f64;
        entry.4 += ((size - old) * (size - entry.3) - entry.4) / entry.2 as f64;
        if entry.2 > 1 {
            let i = at.entry(sym.clone()).or_default();
            let v = &got[&sym][*i];
            *i += 1;
            total += 1;
            assert_close(&v["ret"], (price - entry.0) / entry.0, "ret");
            let z = if entry.4 != 0.0 {
                (size - entry.3) / entry.4.sqrt()
            } else {
                0.0
            };
            assert_close(&v["size_z"], z, "size_z");
            assert_eq!(v["gap_ms"].as_i64().unwrap(), ts - entry.1);
            let score = f(&v["score"]);
            assert!((0.0..=1.0).contains(&score));
            if *i <= 100 {
                assert_eq!(score, 0.0);
            }
        }
        entry.0 = price;
        entry.1 = ts;
    }
    assert_eq!(total, items.len());
}

#[test]
fn player_churn_scores_match_the_logistic_formula() {
    let (input, events) = load(&GAMES);
    let items = run(&["player_churn"], input);
    let got = by_key_values(&items, "player_churn");
    let (coef, intercept) = churn_coefficients();
    #[derive(Default)]
    struct P {
        sessions: u32,
        start: Option<i64>,
        kills: u32,
        deaths: u32,
        score: i64,
        n: usize,
    }
    let mut players: HashMap<String, P> = HashMap::new();
    let mut total = 0;
    for ev in &events {
        let p = players
            .entry(ev["player"].as_str().unwrap().to_owned())
            .or_default();
        let ts = ev["ts"].as_i64().unwrap();
        match ev["kind"].as_str().unwrap() {
            "session_start" => {
                p.sessions += 1;
                p.start = Some(ts);
                p.kills = 0;
                p.deaths = 0;
                p.score = 0;
            }
            "kill" => p.kills += 1,
            "death" => p.deaths += 1,
            "score" => p.score += ev["points"].as_i64().unwrap(),
            "session_end" => {
                let Some(start) = p.start.take() else {
                    continue;
                };
                let x = [
                    (ts - start) as f64 / 60000.0,
                    p.kills as f64,
                    p.deaths as f64,
                    p.score as f64,
                    p.sessions as f64,
                ];
                let z = intercept + coef.iter().zip(x).map(|(w, x)| w * x).sum::<f64>();
                let want = 1.0 / (1.0 + (-z).exp());
                let v = &got[ev["player"].as_str().unwrap()][p.n];
                p.n += 1;
                total += 1;
                // The model computes in f32.
                assert!((f(&v["churn"]) - want).abs() < 1e-5, "{v} vs {want}");
                assert_eq!(v["at_risk"].as_bool().unwrap(), want > 0.5);
                assert_eq!(v["session"]["kills"].as_i64().unwrap(), i64::from(p.kills));
            }
            _ => unreachable!(),
        }
    }
    assert!(total > 50, "{total}");
    assert_eq!(total, items.len());
}
