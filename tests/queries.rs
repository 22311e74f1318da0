//! Golden tests of the shipped queries: each runs `queries/<name>.rhai` over its sample input in
//! `tests/data/` through the offline runner, and checks every emitted item against values a
//! plain helper below computes straight from the input (parsed with serde_json). Nothing here
//! is copied from the engine's output.
//!
//! The samples are made by `eddy generate` (see `tests/data/README.md`); a test that reads one
//! also checks that it still is what the generator makes, so they cannot drift apart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

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

#[test]
fn vwap_matches_a_plain_running_sum() {
    let (input, trades) = load(&TRADES);
    let items = run(&["vwap"], input);
    assert_eq!(items.len(), trades.len());
    let mut sums: HashMap<String, (f64, i64, i64)> = HashMap::new();
    for (trade, item) in trades.iter().zip(&items) {
        let symbol = trade["symbol"].as_str().unwrap();
        let (notional, volume, count) = sums.entry(symbol.to_owned()).or_default();
        *notional += f(&trade["price"]) * trade["size"].as_i64().unwrap() as f64;
        *volume += trade["size"].as_i64().unwrap();
        *count += 1;
        assert_eq!(item["topic"], "vwap");
        assert_eq!(item["key"], symbol);
        let v = &item["value"];
        assert_close(&v["vwap"], *notional / *volume as f64, "vwap");
        assert_eq!(v["volume"], json!(*volume));
        assert_eq!(v["trades"], json!(*count));
        assert_eq!(v["last"], trade["price"]);
        assert_eq!(v["ts"], trade["ts"]);
        assert!(v.get("sent_us").is_none());
    }
    // The VWAP of a symbol always lies between its lowest and highest trade price.
    assert!(sums.len() > 40);
}

#[test]
fn ohlc_bars_match_and_close_when_the_watermark_passes_their_end() {
    let (input, trades) = load(&TRADES);
    // Run with vwap, which emits once per trade: the vwap items before a bar count the trades
    // handled before the bar was emitted. ohlc_1m goes first, so the trade that closes a bar is
    // counted after the bar it closed.
    let items = run(&["ohlc_1m", "vwap"], input);
    let lateness = 1000;

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
    let mut bars: BTreeMap<(String, i64), Bar> = BTreeMap::new();
    for t in &trades {
        let ts = t["ts"].as_i64().unwrap();
        let start = ts - ts.rem_euclid(60_000);
        let (p, s) = (f(&t["price"]), t["size"].as_i64().unwrap());
        let bar = bars
            .entry((t["symbol"].as_str().unwrap().to_owned(), start))
            .or_default();
        if bar.count == 0 {
            bar.open = p;
            bar.high = p;
            bar.low = p;
        }
        bar.high = bar.high.max(p);
        bar.low = bar.low.min(p);
        bar.close = p;
        bar.volume += s;
        bar.notional += p * s as f64;
        bar.count += 1;
    }

    let mut trades_before = 0;
    let mut seen = 0;
    for item in &items {
        if item["topic"] == "vwap" {
            trades_before += 1;
            continue;
        }
        assert_eq!(item["topic"], "ohlc_1m");
        seen += 1;
        let v = &item["value"];
        let symbol = item["key"].as_str().unwrap().to_owned();
        let start = v["start"].as_i64().unwrap();
        let bar = bars
            .remove(&(symbol.clone(), start))
            .unwrap_or_else(|| panic!("unexpected or repeated bar {item}"));
        assert_eq!(v["end"], json!(start + 60_000));
        for (field, want) in [
            ("open", bar.open),
            ("high", bar.high),
            ("low", bar.low),
            ("close", bar.close),
        ] {
            assert_close(&v[field], want, field);
        }
        assert_eq!(v["volume"].as_f64().unwrap() as i64, bar.volume);
        assert_eq!(v["count"], json!(bar.count));
        assert_close(&v["vwap"], bar.notional / bar.volume as f64, "vwap");
        // Emitted right before the first trade whose time minus lateness reaches the bar's end,
        // or at the end of the input.
        let first_after = trades
            .iter()
            .position(|t| t["ts"].as_i64().unwrap() - lateness >= start + 60_000)
            .unwrap_or(trades.len());
        assert_eq!(
            trades_before, first_after,
            "bar {symbol} {start} emitted at the wrong time"
        );
    }
    assert!(bars.is_empty(), "bars never emitted: {bars:?}");
    assert!(seen > 100);
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
}

/// Sample standard deviation, two-pass.
fn mean_std(xs: &VecDeque<f64>) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn price_alerts_match_a_plain_rolling_zscore() {
    let (input, trades) = load(&TRADES);
    let items = run(&["price_alerts"], input);
    let mut expected = Vec::new();
    let mut state: HashMap<String, (f64, VecDeque<f64>)> = HashMap::new();
    for t in &trades {
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
                expected.push((symbol.clone(), price, *last, z));
            }
        }
        returns.push_back(change);
        if returns.len() > 50 {
            returns.pop_front();
        }
        *last = price;
    }
    assert!(expected.len() >= 3, "the sample should trip some alerts");
    assert_eq!(items.len(), expected.len());
    for (item, (symbol, price, previous, z)) in items.iter().zip(&expected) {
        assert_eq!(item["topic"], "price_alerts.alerts");
        assert_eq!(item["key"], json!(symbol));
        let v = &item["value"];
        assert_close(&v["price"], *price, "price");
        assert_close(&v["previous"], *previous, "previous");
        assert!(
            (f(&v["zscore"]) - z).abs() < 1e-6 * z.abs(),
            "zscore {} vs {z}",
            v["zscore"]
        );
    }
}

#[test]
fn sensor_anomalies_and_silences_match_a_plain_model() {
    let (input, readings) = load(&SENSORS);
    let items = run(&["sensor_anomaly"], input);

    // EWMA with alpha 0.1: mean and variance by the standard incremental formulas.
    struct Device {
        n: u64,
        mean: f64,
        var: f64,
        last_seen: i64,
        silent: bool,
    }
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    let mut expected: Vec<Value> = Vec::new();
    let alpha = 0.1;
    let mut watermark = i64::MIN;
    for r in &readings {
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
            expected.push(json!({"kind": "silent", "device": id, "last_seen": d.last_seen, "silent_ms": 30_000}));
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
            expected.push(
                json!({"kind": "back", "device": id, "ts": ts, "silent_ms": ts - d.last_seen}),
            );
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
            expected.push(json!({"kind": "anomaly", "device": id, "temp": temp, "expected": d.mean, "zscore": z, "ts": ts}));
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
        expected.push(json!({"kind": "silent", "device": id, "last_seen": devices[&id].last_seen, "silent_ms": 30_000}));
    }

    let kinds = |v: &[Value], k: &str| v.iter().filter(|e| e["kind"] == k).count();
    assert!(
        kinds(&expected, "anomaly") >= 3,
        "the sample should have anomalies"
    );
    let silent_device = expected.iter().any(|e| {
        e["kind"] == "silent"
            && e["device"] == synth::SILENT_DEVICE
            && e["last_seen"].as_i64() < Some(watermark - 30_000)
    });
    assert!(
        silent_device,
        "{} should go silent mid-stream",
        synth::SILENT_DEVICE
    );
    let got: Vec<Value> = items.iter().map(|i| i["value"].clone()).collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "got anomaly {} silent {} back {}",
        kinds(&got, "anomaly"),
        kinds(&got, "silent"),
        kinds(&got, "back")
    );
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g["kind"], e["kind"], "{g} vs {e}");
        assert_eq!(g["device"], e["device"], "{g} vs {e}");
        for field in ["temp", "expected", "zscore"] {
            if let Some(want) = e.get(field) {
                assert!(
                    (f(&g[field]) - f(want)).abs() <= 1e-9 * f(want).abs().max(1.0),
                    "{field}: {g} vs {e}"
                );
            }
        }
        for field in ["ts", "last_seen", "silent_ms"] {
            assert_eq!(g.get(field), e.get(field), "{field}: {g} vs {e}");
        }
    }
}

#[test]
fn hashtag_sentiment_matches_vader_and_exact_counts() {
    let (input, posts) = load(&SOCIAL);
    let items = run(&["hashtag_sentiment"], input);
    let analyzer = vader_sentiment::SentimentIntensityAnalyzer::new();
    let mut tags: HashMap<String, (f64, i64)> = HashMap::new();
    let mut mentions: HashMap<String, i64> = HashMap::new();
    let mut expected = Vec::new();
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
            expected.push((
                "hashtag_sentiment",
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
            expected.push((
                "hashtag_sentiment.trending",
                json!({"posts": n + 1, "top": top}),
            ));
        }
    }
    assert_eq!(items.len(), expected.len());
    assert!(posts
        .iter()
        .any(|p| analyzer.polarity_scores(p["text"].as_str().unwrap())["compound"] < -0.3));
    for (item, (topic, want)) in items.iter().zip(&expected) {
        assert_eq!(item["topic"], *topic);
        let got = &item["value"];
        if *topic == "hashtag_sentiment" {
            assert_eq!(got["hashtag"], want["hashtag"]);
            assert_eq!(got["posts"], want["posts"]);
            assert_close(&got["score"], f(&want["score"]), "score");
            assert_close(&got["sentiment"], f(&want["sentiment"]), "sentiment");
        } else {
            assert_eq!(got, want);
        }
    }
}

#[test]
fn player_stats_match_plain_counts() {
    let (input, events) = load(&GAMES);
    let items = run(&["player_stats"], input);
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
    let mut expected = Vec::new();
    for e in &events {
        let id = e["player"].as_str().unwrap().to_owned();
        let ts = e["ts"].as_i64().unwrap();
        let p = players.entry(id.clone()).or_default();
        p.times.push(ts);
        match e["kind"].as_str().unwrap() {
            "session_start" => {
                p.sessions += 1;
                (p.start, p.s_kills, p.s_deaths, p.s_score) = (ts, 0, 0, 0);
            }
            "session_end" => expected.push((
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
        expected.push((
            "player_stats",
            id.clone(),
            json!({
                "sessions": p.sessions, "kills": p.kills, "deaths": p.deaths, "kd": kd,
                "score": p.score, "events_per_min": recent,
            }),
        ));
    }
    assert!(expected
        .iter()
        .any(|(t, _, _)| *t == "player_stats.sessions"));
    assert_eq!(items.len(), expected.len());
    for (item, (topic, key, want)) in items.iter().zip(&expected) {
        assert_eq!(item["topic"], *topic);
        assert_eq!(item["key"], json!(key));
        let got = &item["value"];
        for (field, value) in want.as_object().unwrap() {
            if field == "kd" {
                assert_close(&got[field], f(value), "kd");
            } else {
                assert_eq!(&got[field], value, "{field} of {item}");
            }
        }
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
    let c: Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ml/churn_coefficients.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let coef: Vec<f64> = c["coef"].as_array().unwrap().iter().map(f).collect();
    let intercept = f(&c["intercept"]);
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
