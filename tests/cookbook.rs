//! The cookbook's expected outputs, computed by plain code: each recipe in
//! `tests/queries/cookbook/<recipe>/` has a helper here that works out, from the case's
//! `in.ndjson` alone, the items its query should emit, in the order the engine emits them. The
//! test checks that each case's `out.ndjson` is exactly that, so no expected file is a copy of
//! the engine's output; `tests/cli.rs` runs `eddy test` over the cases, which compares them with
//! the engine. `EDDY_WRITE_EXPECTED=1 cargo test --test cookbook` rewrites the files from the
//! helpers after a helper or an input changed.
//!
//! Event time, as the engine defines it (README, "Event time"): the watermark is the newest event
//! time minus `lateness`; an event older than the watermark is late; timers fire in time order,
//! ties in key order, before the event that moved the watermark; at the end of the input every
//! pending timer fires.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn item(topic: &str, key: impl Into<Value>, value: Value) -> Value {
    json!({"topic": topic, "key": key.into(), "value": value})
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn float(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

fn late(topic: &str, key: impl Into<Value>, event: &Value, time: i64, watermark: i64) -> Value {
    item(
        topic,
        key,
        json!({"event": event, "event_time": time, "watermark": watermark}),
    )
}

const MINUTE: i64 = 60_000;

/// Per device and minute: count, mean, min, max; closed when the watermark (lateness 5 s)
/// reaches the minute's end.
fn tumbling_window(events: &[Value]) -> Vec<Value> {
    let mut open: BTreeMap<(i64, String), Vec<f64>> = BTreeMap::new();
    let mut items = Vec::new();
    let mut watermark = i64::MIN;
    let close = |(end, device): (i64, String), temps: Vec<f64>| {
        let n = temps.len() as f64;
        let min = temps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = temps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        item(
            "tumbling_window",
            device,
            json!({"start": end - MINUTE, "end": end, "count": temps.len(),
                   "mean": temps.iter().sum::<f64>() / n, "min": min, "max": max}),
        )
    };
    for e in events {
        let (device, ts) = (text(&e["device"]), int(&e["ts"]));
        if ts < watermark {
            items.push(late("tumbling_window.late", device, e, ts, watermark));
            continue;
        }
        watermark = watermark.max(ts - 5000);
        while let Some(entry) = open.first_entry() {
            if entry.key().0 > watermark {
                break;
            }
            let (k, v) = entry.remove_entry();
            items.push(close(k, v));
        }
        let end = ts - ts.rem_euclid(MINUTE) + MINUTE;
        open.entry((end, device))
            .or_default()
            .push(float(&e["temp"]));
    }
    items.extend(open.into_iter().map(|(k, v)| close(k, v)));
    items
}

/// Per symbol, on every trade: trades and volume with event time in (ts - 30 s, ts].
fn sliding_window(events: &[Value]) -> Vec<Value> {
    let mut seen: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    let mut items = Vec::new();
    for e in events {
        let (symbol, ts) = (text(&e["symbol"]), int(&e["ts"]));
        let trades = seen.entry(symbol.clone()).or_default();
        trades.push((ts, int(&e["size"])));
        let recent: Vec<i64> = trades
            .iter()
            .filter(|(t, _)| *t > ts - 30_000 && *t <= ts)
            .map(|(_, s)| *s)
            .collect();
        let volume: i64 = recent.iter().sum();
        items.push(item(
            "sliding_window",
            symbol,
            json!({"ts": ts, "trades": recent.len(), "volume": volume,
                   "mean_size": volume as f64 / recent.len() as f64}),
        ));
    }
    items
}

/// Per user: clicks less than 30 s apart make a session; it closes when the watermark reaches
/// its last click + 30 s (sessions closing together: by that time, then by user).
fn session_window(events: &[Value]) -> Vec<Value> {
    struct Session {
        start: i64,
        last: i64,
        clicks: usize,
        pages: Vec<String>,
    }
    let gap = 30_000;
    let mut open: BTreeMap<String, Session> = BTreeMap::new();
    let mut items = Vec::new();
    let mut watermark = i64::MIN;
    let close_due = |open: &mut BTreeMap<String, Session>, items: &mut Vec<Value>, wm: i64| {
        let mut due: Vec<(i64, String)> = open
            .iter()
            .filter(|(_, s)| s.last + gap <= wm)
            .map(|(u, s)| (s.last + gap, u.clone()))
            .collect();
        due.sort();
        for (_, user) in due {
            let s = open.remove(&user).unwrap();
            items.push(item(
                "session_window",
                user,
                json!({"start": s.start, "end": s.last, "duration_ms": s.last - s.start,
                       "clicks": s.clicks, "pages": s.pages}),
            ));
        }
    };
    for e in events {
        let (user, ts) = (text(&e["user"]), int(&e["ts"]));
        assert!(ts >= watermark, "the recipe's input is in time order");
        watermark = ts;
        close_due(&mut open, &mut items, watermark);
        let s = open.entry(user).or_insert(Session {
            start: ts,
            last: ts,
            clicks: 0,
            pages: Vec::new(),
        });
        s.last = ts;
        s.clicks += 1;
        let page = text(&e["page"]);
        if !s.pages.contains(&page) {
            s.pages.push(page);
        }
    }
    close_due(&mut open, &mut items, i64::MAX);
    items
}

/// Each trade with the last quote of its symbol received before it.
fn asof_join(events: &[Value]) -> Vec<Value> {
    let mut quotes: HashMap<String, (f64, f64, i64)> = HashMap::new();
    let mut items = Vec::new();
    for e in events {
        let (symbol, ts) = (text(&e["symbol"]), int(&e["ts"]));
        if e.get("bid").is_some() {
            quotes.insert(symbol, (float(&e["bid"]), float(&e["ask"]), ts));
            continue;
        }
        let price = float(&e["price"]);
        let Some(&(bid, ask, quoted)) = quotes.get(&symbol) else {
            items.push(item(
                "asof_join.unquoted",
                symbol,
                json!({"ts": ts, "price": e["price"], "size": e["size"]}),
            ));
            continue;
        };
        let mid = (bid + ask) / 2.0;
        let side = if price > mid {
            "buy"
        } else if price < mid {
            "sell"
        } else {
            "mid"
        };
        items.push(item(
            "asof_join",
            symbol,
            json!({"ts": ts, "price": e["price"], "size": e["size"], "bid": bid, "ask": ask,
                   "mid": mid, "spread": ask - bid, "side": side,
                   "slippage_bps": (price - mid) / mid * 10_000.0, "quote_age_ms": ts - quoted}),
        ));
    }
    items
}

/// Per minute of event time: posts and the three most used hashtags (ties by name).
fn topk_window(events: &[Value]) -> Vec<Value> {
    let mut open: BTreeMap<i64, (usize, HashMap<String, i64>)> = BTreeMap::new();
    let mut items = Vec::new();
    let close = |end: i64, (posts, counts): (usize, HashMap<String, i64>)| {
        let mut top: Vec<(String, i64)> = counts.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let top: Vec<Value> = top
            .into_iter()
            .take(3)
            .map(|(tag, n)| json!({"item": tag, "count": n, "error": 0}))
            .collect();
        item(
            "topk_window",
            Value::Null,
            json!({"start": end - MINUTE, "end": end, "posts": posts, "top": top}),
        )
    };
    let mut watermark = i64::MIN;
    for e in events {
        let ts = int(&e["ts"]);
        assert!(ts >= watermark, "the recipe's input is in time order");
        watermark = ts;
        while let Some(entry) = open.first_entry() {
            if *entry.key() > watermark {
                break;
            }
            let (end, w) = entry.remove_entry();
            items.push(close(end, w));
        }
        let window = open.entry(ts - ts.rem_euclid(MINUTE) + MINUTE).or_default();
        window.0 += 1;
        for tag in e["hashtags"].as_array().unwrap() {
            *window.1.entry(text(tag)).or_default() += 1;
        }
    }
    items.extend(open.into_iter().map(|(end, w)| close(end, w)));
    items
}

/// Per device: "hot" when the temperature rises above 30, "cleared" when it falls below 28.
fn hysteresis_alert(events: &[Value]) -> Vec<Value> {
    let mut hot_since: HashMap<String, i64> = HashMap::new();
    let mut items = Vec::new();
    for e in events {
        let (device, ts, temp) = (text(&e["device"]), int(&e["ts"]), float(&e["temp"]));
        match hot_since.get(&device) {
            None if temp > 30.0 => {
                hot_since.insert(device.clone(), ts);
                items.push(item(
                    "hysteresis_alert",
                    device,
                    json!({"state": "hot", "temp": e["temp"], "ts": ts}),
                ));
            }
            Some(&since) if temp < 28.0 => {
                hot_since.remove(&device);
                items.push(item(
                    "hysteresis_alert",
                    device,
                    json!({"state": "cleared", "temp": e["temp"], "ts": ts, "hot_ms": ts - since}),
                ));
            }
            _ => {}
        }
    }
    items
}

/// The first event of each id passes; repeats within a minute of event time of the first are
/// reported as duplicates; after that minute the id is forgotten.
fn dedup(events: &[Value]) -> Vec<Value> {
    let mut seen: HashMap<String, (i64, i64)> = HashMap::new();
    let mut items = Vec::new();
    let mut watermark = i64::MIN;
    for e in events {
        let (id, ts) = (text(&e["id"]), int(&e["ts"]));
        if ts < watermark {
            items.push(late("dedup.late", id, e, ts, watermark));
            continue;
        }
        watermark = ts;
        seen.retain(|_, (first, _)| *first + MINUTE > watermark);
        match seen.get_mut(&id) {
            None => {
                seen.insert(id.clone(), (ts, 0));
                items.push(item("dedup", id, e.clone()));
            }
            Some((first, repeats)) => {
                *repeats += 1;
                items.push(item(
                    "dedup.duplicates",
                    id,
                    json!({"ts": ts, "first_ts": *first, "repeats": *repeats}),
                ));
            }
        }
    }
    items
}

type Helper = fn(&[Value]) -> Vec<Value>;

/// Every recipe and the helper that computes its expected items.
const RECIPES: [(&str, Helper); 7] = [
    ("tumbling_window", tumbling_window),
    ("sliding_window", sliding_window),
    ("session_window", session_window),
    ("asof_join", asof_join),
    ("topk_window", topk_window),
    ("hysteresis_alert", hysteresis_alert),
    ("dedup", dedup),
];

fn cookbook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/queries/cookbook")
}

fn ndjson(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// Numbers compare by value (`100` = `100.0`), everything else exactly.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => a.as_f64() == b.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

#[test]
fn every_recipe_folder_has_a_helper() {
    let mut folders: Vec<String> = std::fs::read_dir(cookbook())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    folders.sort();
    let mut names: Vec<String> = RECIPES.iter().map(|(n, _)| (*n).to_owned()).collect();
    names.sort();
    assert_eq!(folders, names);
}

#[test]
fn recipes_expect_what_plain_code_computes() {
    let rewrite = std::env::var_os("EDDY_WRITE_EXPECTED").is_some();
    for (name, helper) in RECIPES {
        let dir = cookbook().join(name);
        let want = helper(&ndjson(&dir.join("in.ndjson")));
        assert!(want.len() >= 3, "{name}: a recipe should show a few items");
        if rewrite {
            let text: String = want
                .iter()
                .map(|i| {
                    let (topic, key, value) = (&i["topic"], &i["key"], &i["value"]);
                    format!("{{\"topic\":{topic},\"key\":{key},\"value\":{value}}}\n")
                })
                .collect();
            std::fs::write(dir.join("out.ndjson"), text).unwrap();
        }
        let expected = ndjson(&dir.join("out.ndjson"));
        for (i, (got, want)) in expected.iter().zip(&want).enumerate() {
            assert!(
                same(got, want),
                "{name}/out.ndjson line {}: {got}\n  is not what plain code computes: {want}",
                i + 1
            );
        }
        assert_eq!(expected.len(), want.len(), "{name}: number of items");
    }
}

/// The recipes show what they claim: each input exercises the behaviour its comment describes.
#[test]
fn recipe_inputs_show_what_the_recipes_are_about() {
    let run = |name: &str| {
        let dir = cookbook().join(name);
        (RECIPES.iter().find(|(n, _)| *n == name).unwrap().1)(&ndjson(&dir.join("in.ndjson")))
    };
    let topics =
        |items: &[Value], topic: &str| items.iter().filter(|i| i["topic"] == topic).count();
    let tumbling = run("tumbling_window");
    assert_eq!(topics(&tumbling, "tumbling_window.late"), 1);
    let sessions = run("session_window");
    assert!(sessions.iter().filter(|i| i["key"] == "u1").count() >= 2);
    let joined = run("asof_join");
    assert_eq!(topics(&joined, "asof_join.unquoted"), 1);
    assert!(joined.iter().any(|i| i["value"]["side"] == "buy"));
    assert!(joined.iter().any(|i| i["value"]["side"] == "sell"));
    let alerts = run("hysteresis_alert");
    // Four readings are above 30, but it fires twice: once per heating after a cool-down.
    let hot = alerts
        .iter()
        .filter(|i| i["value"]["state"] == "hot")
        .count();
    assert_eq!(hot, 2);
    let deduped = run("dedup");
    assert!(topics(&deduped, "dedup.duplicates") >= 2);
    let passed_twice = deduped
        .iter()
        .filter(|i| i["topic"] == "dedup" && i["key"] == "p1")
        .count();
    assert_eq!(passed_twice, 2, "p1 passes again after a minute");
}

/// `docs/queries.md` shows each recipe's query as the file that is tested.
#[test]
fn the_cookbook_page_shows_the_tested_queries() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/queries.md"))
            .unwrap();
    for (name, _) in RECIPES {
        let dir = cookbook().join(name);
        let script = match std::fs::read_to_string(dir.join("query")) {
            Ok(reference) => dir.join(reference.trim()),
            Err(_) => dir.join("query.rhai"),
        };
        let code = std::fs::read_to_string(&script).unwrap();
        assert!(
            page.contains(&format!("```rhai\n{code}```")),
            "docs/queries.md does not show {} as it is",
            script.display()
        );
        assert!(page.contains(&format!("tests/queries/cookbook/{name}/")));
    }
}
