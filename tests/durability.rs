//! Durability end to end: `eddy serve` as a process with a data directory, killed (SIGKILL) or
//! stopped (SIGTERM) during a feed with acks, then started again on the same directory. The
//! final VWAP per symbol and the OHLC bars are checked against values computed here, plainly,
//! from the events that were acknowledged; the query catalog survives a restart too.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use support::*;

const SYMBOLS: [&str; 4] = ["AAA", "BBB", "CCC", "DDD"];
const PER_FRAME: usize = 10;

/// `(open, high, low, close, volume)` by (symbol, bar start).
type Bars = BTreeMap<(String, i64), (f64, f64, f64, f64, f64)>;

/// One trade.
#[derive(Clone, Copy)]
struct Trade {
    symbol: usize,
    price: i64,
    size: i64,
    ts: i64,
}

/// Trades in event-time order, 250 ms apart, starting an hour ago (whole minutes), with prices
/// and sizes from a fixed sequence.
fn trades(n: usize) -> Vec<Trade> {
    let start = (eddy::router::wall_ms() - 3_600_000) / 60_000 * 60_000;
    let mut x: u64 = 7;
    (0..n)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Trade {
                symbol: (x >> 33) as usize % SYMBOLS.len(),
                price: 100 + ((x >> 40) % 50) as i64,
                size: 1 + ((x >> 20) % 9) as i64,
                ts: start + 250 * i as i64,
            }
        })
        .collect()
}

fn frame(trades: &[Trade]) -> String {
    trades
        .iter()
        .map(|t| {
            json!({"symbol": SYMBOLS[t.symbol], "price": t.price, "size": t.size, "ts": t.ts})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// VWAP per symbol of `trades`: `(notional / volume, volume, trades)`.
fn vwap(trades: &[Trade]) -> BTreeMap<&'static str, (f64, i64, i64)> {
    let mut sums: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for t in trades {
        let e = sums.entry(SYMBOLS[t.symbol]).or_default();
        e.0 += t.price * t.size;
        e.1 += t.size;
        e.2 += 1;
    }
    sums.into_iter()
        .map(|(s, (n, v, c))| (s, (n as f64 / v as f64, v, c)))
        .collect()
}

/// OHLC bars of `trades` per (symbol, start) that the watermark (newest time minus 1 s of
/// lateness) has closed: `(open, high, low, close, volume)`.
fn bars(trades: &[Trade]) -> Bars {
    let newest = trades.iter().map(|t| t.ts).max().unwrap_or(0);
    let mut out: Bars = BTreeMap::new();
    for t in trades {
        let start = t.ts / 60_000 * 60_000;
        if start + 60_000 > newest - 1000 {
            continue;
        }
        let p = t.price as f64;
        let bar = out
            .entry((SYMBOLS[t.symbol].to_owned(), start))
            .or_insert((p, p, p, p, 0.0));
        bar.1 = bar.1.max(p);
        bar.2 = bar.2.min(p);
        bar.3 = p;
        bar.4 += t.size as f64;
    }
    out
}

fn queries_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for q in ["vwap", "ohlc_1m"] {
        std::fs::write(dir.path().join(format!("{q}.rhai")), query_file(q)).unwrap();
    }
    dir
}

/// A subscriber to `topic` (mode `all`) on the server at `addr`, collecting items in the
/// background.
async fn subscriber(addr: &str, topic: &str) -> tokio::task::JoinHandle<Vec<Value>> {
    let (_, task) = resuming(addr, topic, None).await;
    tokio::spawn(async move { task.await.unwrap().items })
}

/// What a subscriber got until its connection closed.
struct Received {
    items: Vec<Value>,
    /// The `pos` of the last batch (or of the subscription, before any batch).
    pos: Option<String>,
    /// `gone` messages.
    gone: Vec<Value>,
}

/// A subscriber to `topic` (mode `all`) that resumes after position `from` when given;
/// returns the `subscribed` answer and the task collecting what follows.
async fn resuming(
    addr: &str,
    topic: &str,
    from: Option<&str>,
) -> (Value, tokio::task::JoinHandle<Received>) {
    let url = format!("ws://{addr}/subscribe");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut request = json!({"op": "subscribe", "topic": topic, "mode": "all"});
    if let Some(from) = from {
        request["from"] = json!(from);
    }
    ws.send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    let subscribed = next_json(&mut ws).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    // Before any batch, the position to resume from is where the subscription started.
    let start = subscribed["pos"].as_str().map(str::to_owned);
    let task = tokio::spawn(async move {
        let mut got = Received {
            items: Vec::new(),
            pos: start,
            gone: Vec::new(),
        };
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await
        {
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "batch" {
                got.items
                    .extend(v["items"].as_array().unwrap().iter().cloned());
                got.pos = Some(v["pos"].as_str().unwrap().to_owned());
            } else if v["type"] == "gone" {
                got.gone.push(v);
            }
        }
        got
    });
    (subscribed, task)
}

/// The items of a snapshot of `topic`.
async fn snapshot(addr: &str, topic: &str) -> Vec<Value> {
    let url = format!("ws://{addr}/subscribe");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let request = json!({"op": "subscribe", "topic": topic, "snapshot": true});
    ws.send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    loop {
        let v = next_json(&mut ws).await;
        if v["type"] == "snapshot" {
            return v["items"].as_array().unwrap().clone();
        }
    }
}

/// Checks that, per key, the `trades` counts of vwap's items go 1, 2, 3, … without a gap or a
/// repeat (vwap emits once per trade), and end at the key's number of trades in `applied`.
fn assert_every_trade_once(items: &[Value], applied: &[Trade]) {
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    for i in items {
        let key = i["key"].as_str().unwrap().to_owned();
        let trades = i["value"]["trades"].as_i64().unwrap();
        let last = seen.entry(key.clone()).or_insert(0);
        assert_eq!(trades, *last + 1, "{key}: after {} came {trades}", *last);
        *last = trades;
    }
    for (n, symbol) in SYMBOLS.iter().enumerate() {
        let want = applied.iter().filter(|t| t.symbol == n).count() as i64;
        assert_eq!(seen.get(*symbol).copied().unwrap_or(0), want, "{symbol}");
    }
}

/// Sends `frames` one at a time with `ack=true`, each after the previous one's ack; stops at
/// the first failure. Returns how many were acknowledged, and whether one was sent and not
/// answered (in doubt: it may or may not have been made durable).
async fn feed(addr: &str, frames: &[String]) -> (usize, bool) {
    feed_signalling(addr, frames, None).await
}

/// [`feed`], signalling `sent.1` once frame `sent.0` is sent.
async fn feed_signalling(
    addr: &str,
    frames: &[String],
    mut sent: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> (usize, bool) {
    let url = format!("ws://{addr}/ingest?stream=trades&ack=true");
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        return (0, false);
    };
    for (i, f) in frames.iter().enumerate() {
        if ws.send(Message::Text(f.clone().into())).await.is_err() {
            return (i, true);
        }
        if sent.as_ref().is_some_and(|(k, _)| *k == i) {
            let _ = sent.take().unwrap().1.send(());
        }
        let ack = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => break Some(t),
                Ok(Some(Ok(_))) => continue,
                _ => break None,
            }
        };
        let Some(ack) = ack else { return (i, true) };
        let ack: Value = serde_json::from_str(&ack).unwrap();
        assert_eq!(ack["accepted"], json!(frame_len(f)), "{ack}");
    }
    let _ = ws.close(None).await;
    (frames.len(), false)
}

fn frame_len(f: &str) -> usize {
    f.lines().count()
}

/// The newest item per key, by the order received.
fn latest(items: &[Value]) -> BTreeMap<String, Value> {
    items
        .iter()
        .map(|i| (i["key"].as_str().unwrap().to_owned(), i["value"].clone()))
        .collect()
}

fn assert_vwap(got: &BTreeMap<String, Value>, want: &BTreeMap<&str, (f64, i64, i64)>) {
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (symbol, (vwap, volume, count)) in want {
        let v = &got[*symbol];
        assert_eq!(v["volume"], json!(volume), "{symbol}: {v}");
        assert_eq!(v["trades"], json!(count), "{symbol}: {v}");
        let got = v["vwap"].as_f64().unwrap();
        assert!(
            (got - vwap).abs() < 1e-9 * vwap,
            "{symbol}: {got} vs {vwap}"
        );
    }
}

/// Bars received, by (symbol, start), with how often each came.
fn received_bars(items: &[Value]) -> BTreeMap<(String, i64), (Value, usize)> {
    let mut out: BTreeMap<(String, i64), (Value, usize)> = BTreeMap::new();
    for i in items {
        let key = (
            i["key"].as_str().unwrap().to_owned(),
            i["value"]["start"].as_i64().unwrap(),
        );
        let e = out.entry(key).or_insert((i["value"].clone(), 0));
        assert_eq!(e.0, i["value"], "a bar came twice with other values");
        e.1 += 1;
    }
    out
}

fn assert_bars(got: &BTreeMap<(String, i64), (Value, usize)>, want: &Bars, once: bool) {
    for (key, (o, h, l, c, v)) in want {
        let Some((bar, times)) = got.get(key) else {
            panic!("bar {key:?} never came");
        };
        let f = |name: &str| bar[name].as_f64().unwrap();
        assert_eq!(
            (f("open"), f("high"), f("low"), f("close"), f("volume")),
            (*o, *h, *l, *c, *v),
            "{key:?}"
        );
        if once {
            assert_eq!(*times, 1, "bar {key:?} came {times} times");
        }
    }
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        extra.is_empty(),
        "bars that should not have closed: {extra:?}"
    );
}

async fn serve(queries: &Path, data: &Path) -> (tokio::process::Child, String) {
    serve_with(queries, data, "10s").await
}

/// A server checkpointing every `every`.
async fn serve_with(queries: &Path, data: &Path, every: &str) -> (tokio::process::Child, String) {
    let data = data.to_str().unwrap();
    let (child, _lines, addr) = spawn_serve(
        queries,
        &[
            "--data-dir",
            data,
            "--admin-token",
            TOKEN,
            "--fsync",
            "always",
            "--checkpoint-interval",
            every,
        ],
    )
    .await;
    (child, addr)
}

#[tokio::test]
async fn a_killed_server_restarts_with_every_acknowledged_event_counted_once() {
    bounded(async {
        let queries = queries_dir();
        let data = tempfile::tempdir().unwrap();
        let all = trades(3000);
        let frames: Vec<String> = all.chunks(PER_FRAME).map(frame).collect();
        // Checkpoints during the feed, so that recovery loads one and replays the log after it.
        let (mut child, addr) = serve_with(queries.path(), data.path(), "20ms").await;
        let (_, bars_a) = resuming(&addr, "ohlc_1m", None).await;
        let (_, vwap_a) = resuming(&addr, "vwap", None).await;
        // A first part, then a checkpoint after it.
        let first = frames.len() / 5;
        assert_eq!(feed(&addr, &frames[..first]).await, (first, false));
        let checkpoints = data.path().join("checkpoints");
        let waited = std::time::Instant::now();
        while !std::fs::read_dir(&checkpoints).unwrap().any(|e| {
            let name = e.unwrap().file_name();
            let name = name.to_str().unwrap();
            name.ends_with(".msgpack") && !name.starts_with("checkpoint-00000000000000000000")
        }) {
            assert!(waited.elapsed() < Duration::from_secs(10), "no checkpoint");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Its metrics: how many, and how long a shard stopped for the last one's copy.
        let metrics = loop {
            let (_, m) = http_at(&addr, "GET", "/metrics", None, "").await;
            if metric(&m, "eddy_checkpoints_total") >= 1.0 {
                break m;
            }
            assert!(waited.elapsed() < Duration::from_secs(10), "{m}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for name in [
            "eddy_checkpoint_last_seconds",
            "eddy_checkpoint_last_bytes",
            "eddy_checkpoint_last_pause_seconds",
        ] {
            let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
            assert!(line.is_some(), "{name} missing:\n{metrics}");
        }
        assert!(metric(&metrics, "eddy_checkpoint_last_bytes") > 0.0);
        // Killed at a moment chosen at random: soon after a random frame was sent (before,
        // during or after its write to the log).
        let at = fastrand::usize(0..(frames.len() - first) * 3 / 4);
        let delay = Duration::from_micros(fastrand::u64(0..3000));
        let (signal, sent) = tokio::sync::oneshot::channel();
        let killer = tokio::spawn(async move {
            let _ = sent.await;
            tokio::time::sleep(delay).await;
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        });
        let (acked, in_doubt) = feed_signalling(&addr, &frames[first..], Some((at, signal))).await;
        let (acked, at) = (first + acked, first + at);
        killer.await.unwrap();
        assert!(
            acked < frames.len(),
            "the kill came after the whole feed: make it earlier"
        );
        let bars_a = bars_a.await.unwrap();
        let vwap_a = vwap_a.await.unwrap();

        // Again on the same data directory: the rest of the feed, after the frame in doubt.
        // The subscribers resume from the last position they saw: the replay gave the items
        // after the checkpoint their old positions.
        let (mut child, addr) = serve(queries.path(), data.path()).await;
        let (_, metrics) = http_at(&addr, "GET", "/metrics", None, "").await;
        assert!(
            (metric(&metrics, "eddy_replayed_records") as usize) < acked + 1,
            "the replay starts at the checkpoint: {metrics}"
        );
        let (vwap_answer, vwap_b) = resuming(&addr, "vwap", vwap_a.pos.as_deref()).await;
        let (bars_answer, bars_b) = resuming(&addr, "ohlc_1m", bars_a.pos.as_deref()).await;
        let rest = acked + usize::from(in_doubt);
        let (fed, _) = feed(&addr, &frames[rest..]).await;
        assert_eq!(fed, frames.len() - rest);
        let (status, _) = http_at(&addr, "GET", "/healthz", None, "").await;
        assert_eq!(status, 200);
        // A graceful stop delivers everything queued to the subscribers before it closes them.
        stop(&mut child).await;
        let vwap_b = vwap_b.await.unwrap();
        let bars_b = bars_b.await.unwrap();
        assert!(
            vwap_b.gone.is_empty() && bars_b.gone.is_empty(),
            "resumed from {:?} and {:?}: {:?} {:?}",
            vwap_a.pos,
            bars_a.pos,
            vwap_b.gone,
            bars_b.gone
        );
        assert!(vwap_answer["replayed"].is_u64(), "{vwap_answer}");
        assert!(bars_answer["replayed"].is_u64(), "{bars_answer}");
        let mut vwap_all = vwap_a.items;
        vwap_all.extend(vwap_b.items.iter().cloned());
        let vwap_b = latest(&vwap_all);
        let mut bars_all = bars_a.items;
        bars_all.extend(bars_b.items.iter().cloned());

        // What was applied: every acknowledged frame, and the frame in doubt either wholly or
        // not at all.
        let acked_trades = |with_doubt: bool| -> Vec<Trade> {
            let mut out: Vec<Trade> = all[..acked * PER_FRAME].to_vec();
            if with_doubt {
                out.extend_from_slice(&all[acked * PER_FRAME..rest * PER_FRAME]);
            }
            out.extend_from_slice(&all[rest * PER_FRAME..]);
            out
        };
        let without = acked_trades(false);
        let with = acked_trades(true);
        let total: i64 = vwap_b.values().map(|v| v["trades"].as_i64().unwrap()).sum();
        let applied = if total as usize == with.len() && in_doubt {
            with
        } else {
            without
        };
        assert_eq!(
            total as usize,
            applied.len(),
            "trades counted; acked {acked} of {}, in doubt {in_doubt}, killed after frame {at}; \
             at restart: {}",
            frames.len(),
            metrics
                .lines()
                .filter(|l| l.starts_with("eddy_log")
                    || l.starts_with("eddy_replayed")
                    || l.starts_with("eddy_check"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_vwap(&vwap_b, &vwap(&applied));
        // Across the crash, each subscriber saw every item once: the one before it up to its
        // last position, the one after it resumed from there. Every vwap item (one per trade)
        // and every bar, none twice, none missing, none that should not have closed.
        assert_every_trade_once(&vwap_all, &applied);
        assert_bars(&received_bars(&bars_all), &bars(&applied), true);
        let restart_mark = all[rest * PER_FRAME - 1].ts - 1000;
        assert!(
            bars(&applied)
                .keys()
                .any(|(_, start)| start + 60_000 > restart_mark),
            "no bar spans the restart"
        );
    })
    .await;
}

/// Sends `frames` as idempotent producer `producer`, `frames[0]` being its frame `first`,
/// pipelined, until every ack came or the connection failed; returns the acks in order.
/// `killed` hears once `kill_after` acks have come.
async fn feed_as(
    addr: &str,
    producer: &str,
    first: usize,
    frames: &[String],
    mut kill_after: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> Vec<Value> {
    let url =
        format!("ws://{addr}/ingest?stream=trades&ack=true&producer={producer}&frame={first}");
    let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await else {
        return Vec::new();
    };
    let (mut tx, mut rx) = ws.split();
    let to_send = frames.to_vec();
    let sender = tokio::spawn(async move {
        for f in to_send {
            if tx.send(Message::Text(f.into())).await.is_err() {
                break;
            }
        }
        tx
    });
    let mut acks = Vec::new();
    while acks.len() < frames.len() {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => acks.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => continue,
            _ => break,
        }
        if kill_after.as_ref().is_some_and(|(n, _)| acks.len() == *n) {
            let _ = kill_after.take().unwrap().1.send(());
        }
    }
    sender.abort();
    acks
}

#[tokio::test]
async fn a_producer_that_sends_its_frames_again_after_a_kill_has_each_counted_once() {
    bounded(async {
        let queries = queries_dir();
        let data = tempfile::tempdir().unwrap();
        let all = trades(3000);
        let frames: Vec<String> = all.chunks(PER_FRAME).map(frame).collect();
        // Checkpoints every 50 ms: what the node knows of the producers comes back from a
        // checkpoint, and from the log after it. Producer "early" sends its five frames before
        // a checkpoint and nothing after it, so only the checkpoint knows them at the restart.
        let (mut child, addr) = serve_with(queries.path(), data.path(), "50ms").await;
        let (early, frames) = frames.split_at(5);
        assert_eq!(feed_as(&addr, "early", 0, early, None).await.len(), 5);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let half = frames.len() / 2;
        let acks = feed_as(&addr, "desk-7", 0, &frames[..half], None).await;
        assert_eq!(acks.len(), half);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The rest pipelined; killed (SIGKILL) with frames sent and not yet acknowledged.
        let (signal, heard) = tokio::sync::oneshot::channel();
        let killer = tokio::spawn(async move {
            let _ = heard.await;
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        });
        let acks = feed_as(&addr, "desk-7", half, &frames[half..], Some((20, signal))).await;
        killer.await.unwrap();
        let acked = half + acks.len();
        assert!(acked < frames.len(), "the kill came after the whole feed");

        // Again on the same directory: the producers send every frame again, from frame 0.
        let (mut child, addr) = serve(queries.path(), data.path()).await;
        for ack in feed_as(&addr, "early", 0, early, None).await {
            assert_eq!(
                (&ack["duplicate"], &ack["accepted"]),
                (&json!(true), &json!(0))
            );
        }
        let again = feed_as(&addr, "desk-7", 0, frames, None).await;
        assert_eq!(again.len(), frames.len());
        for (i, ack) in again.iter().enumerate() {
            assert_eq!(ack["frame"], json!(i), "{ack}");
            if i < acked {
                // Acknowledged before the kill: taken, so not taken again.
                assert_eq!(
                    (&ack["duplicate"], &ack["accepted"]),
                    (&json!(true), &json!(0))
                );
            } else if ack.get("duplicate").is_none() {
                // Not in the log (never sent, or lost with the crash): taken now.
                assert_eq!(ack["accepted"], json!(PER_FRAME), "{ack}");
            }
        }
        // Acks mean "queued": the snapshot is read until the shards have handled every trade
        // (or more, which the comparison below reports).
        let waited = std::time::Instant::now();
        let vwap_now = loop {
            let items = snapshot(&addr, "vwap").await;
            let total: i64 = items
                .iter()
                .map(|i| i["value"]["trades"].as_i64().unwrap())
                .sum();
            if total as usize >= all.len() || waited.elapsed() > Duration::from_secs(10) {
                break items;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop(&mut child).await;
        // Every trade counted once: the acknowledged ones, those in doubt at the kill (whether
        // or not the crash kept them) and the rest.
        assert_vwap(&latest(&vwap_now), &vwap(&all));
    })
    .await;
}

#[tokio::test]
async fn a_graceful_restart_resumes_the_same_state_with_no_bar_twice() {
    bounded(async {
        let queries = queries_dir();
        let data = tempfile::tempdir().unwrap();
        let all = trades(2000);
        let frames: Vec<String> = all.chunks(PER_FRAME).map(frame).collect();
        let half = frames.len() / 2;
        let (child, addr) = serve(queries.path(), data.path()).await;
        let (_, bars_a) = resuming(&addr, "ohlc_1m", None).await;
        let (_, vwap_a) = resuming(&addr, "vwap", None).await;
        assert_eq!(feed(&addr, &frames[..half]).await, (half, false));
        // SIGTERM: a graceful stop, which checkpoints.
        let mut child = child;
        stop(&mut child).await;
        let bars_a = bars_a.await.unwrap();
        let vwap_a = vwap_a.await.unwrap();

        let (mut child, addr) = serve(queries.path(), data.path()).await;
        let (_, metrics) = http_at(&addr, "GET", "/metrics", None, "").await;
        assert_eq!(metric(&metrics, "eddy_replayed_records"), 0.0, "{metrics}");
        // Snapshots hold the latest values from before the stop (nothing was replayed: they
        // came back with the checkpoint).
        let snapshot = snapshot(&addr, "vwap").await;
        assert_vwap(&latest(&snapshot), &vwap(&all[..half * PER_FRAME]));
        // Resuming where they stopped: nothing to send again, and no gap.
        let (answer, vwap_b) = resuming(&addr, "vwap", vwap_a.pos.as_deref()).await;
        assert_eq!(answer["replayed"], 0, "{answer}");
        let (answer, bars_b) = resuming(&addr, "ohlc_1m", bars_a.pos.as_deref()).await;
        assert_eq!(answer["replayed"], 0, "{answer}");
        assert_eq!(
            feed(&addr, &frames[half..]).await,
            (frames.len() - half, false)
        );
        // A graceful stop delivers everything queued to the subscribers before it closes them.
        stop(&mut child).await;
        let (vwap_b, bars_b) = (vwap_b.await.unwrap(), bars_b.await.unwrap());
        assert!(vwap_b.gone.is_empty() && bars_b.gone.is_empty());
        assert_vwap(&latest(&vwap_b.items), &vwap(&all));
        let mut vwap_all = vwap_a.items;
        vwap_all.extend(vwap_b.items);
        assert_every_trade_once(&vwap_all, &all);
        let mut items = bars_a.items;
        items.extend(bars_b.items);
        assert_bars(&received_bars(&items), &bars(&all), true);
    })
    .await;
}

#[tokio::test]
async fn queries_deployed_and_removed_over_the_api_survive_a_restart() {
    bounded(async {
        let queries = queries_dir();
        let data = tempfile::tempdir().unwrap();
        let (mut child, addr) = serve(queries.path(), data.path()).await;
        let counter = "let source = \"trades\";\nfn on_event(ev) { emit(ev.size); }";
        let (status, _) = http_at(&addr, "PUT", "/queries/sizes", Some(TOKEN), counter).await;
        assert_eq!(status, 201);
        let (status, _) = http_at(&addr, "DELETE", "/queries/ohlc_1m", Some(TOKEN), "").await;
        assert_eq!(status, 204);
        child.start_kill().unwrap();
        child.wait().await.unwrap();

        let (mut child, addr) = serve(queries.path(), data.path()).await;
        let (_, body) = http_at(&addr, "GET", "/queries", None, "").await;
        let list: Value = serde_json::from_str(&body).unwrap();
        let names: HashSet<&str> = list
            .as_array()
            .unwrap_or_else(|| list["queries"].as_array().unwrap())
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, HashSet::from(["sizes", "vwap"]), "{body}");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_corrupt_log_tail_is_cut_and_reported_at_start() {
    bounded(async {
        let queries = queries_dir();
        let data = tempfile::tempdir().unwrap();
        let all = trades(200);
        let frames: Vec<String> = all.chunks(PER_FRAME).map(frame).collect();
        let (mut child, addr) = serve(queries.path(), data.path()).await;
        assert_eq!(feed(&addr, &frames).await, (frames.len(), false));
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        // Garbage after the last record, as a torn write leaves.
        let segment = std::fs::read_dir(data.path().join("log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
        std::fs::write(&segment, bytes).unwrap();

        let (mut child, addr) = serve(queries.path(), data.path()).await;
        let (_, metrics) = http_at(&addr, "GET", "/metrics", None, "").await;
        assert_eq!(
            metric(&metrics, "eddy_log_truncated_bytes"),
            10.0,
            "{metrics}"
        );
        // Every acknowledged frame was replayed.
        let vwap_b = subscriber(&addr, "vwap").await;
        let (_, snapshot) = http_at(&addr, "GET", "/queries/vwap", None, "").await;
        assert!(snapshot.contains("vwap"), "{snapshot}");
        // One more trade per symbol shows the totals the replay rebuilt.
        let extra: Vec<Trade> = (0..SYMBOLS.len())
            .map(|s| Trade {
                symbol: s,
                price: 120,
                size: 1,
                ts: all.last().unwrap().ts + 1,
            })
            .collect();
        assert_eq!(feed(&addr, &[frame(&extra)]).await, (1, false));
        // A graceful stop delivers everything queued to the subscribers before it closes them.
        stop(&mut child).await;
        let mut everything = all.clone();
        everything.extend(extra);
        assert_vwap(&latest(&vwap_b.await.unwrap()), &vwap(&everything));
    })
    .await;
}

const VWAP_V2: &str = r#"
let source = "trades";
let key_by = "symbol";
fn init(key) { #{ pv: 0.0, volume: 0, trades: 0 } }
fn migrate(old) { #{ pv: old.notional, volume: old.volume, trades: old.trades } }
fn on_event(ev) {
    this.pv += ev.price * ev.size;
    this.volume += ev.size;
    this.trades += 1;
    emit(#{ vwap: this.pv / this.volume, volume: this.volume, trades: this.trades, version: 2 });
}
"#;

#[tokio::test]
async fn a_hot_replace_with_state_keep_continues_every_key_through_migrate() {
    bounded(async {
        let (server, _dir) = start(&[("vwap", &query_file("vwap"))], |_| {}).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = sample("trades.ndjson");
        let lines: Vec<&[u8]> = input
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let (first, rest) = lines.split_at(lines.len() / 3);
        let (second, third) = rest.split_at(rest.len() / 2);
        assert_eq!(
            produce(&server, "trades", &first.join(&b'\n'), 50).await as usize,
            first.len()
        );

        // A migrate that fails for some key changes nothing, and says why.
        let failing = VWAP_V2.replace(
            "fn migrate(old) {",
            "fn migrate(old) { if old.trades > 3 { throw \"too many\"; }",
        );
        let (status, body) = http(
            &server,
            "PUT",
            "/queries/vwap?state=keep",
            Some(TOKEN),
            &failing,
        )
        .await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body.contains("migrate failed for key") && body.contains("too many"),
            "{body}"
        );
        // So does a script that routes differently.
        let rekeyed = VWAP_V2.replace("let key_by = \"symbol\";", "let key_by = \"stream\";");
        let (status, body) = http(
            &server,
            "PUT",
            "/queries/vwap?state=keep",
            Some(TOKEN),
            &rekeyed,
        )
        .await;
        assert_eq!(status, 409, "{body}");

        // The good replace lands while the second half is being fed.
        let feeding = {
            let ws = connect(&server, "/ingest?stream=trades&ack=true").await;
            let rest = second.join(&b'\n');
            tokio::spawn(async move { produce_on(ws, rest, 10).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (status, body) = http(
            &server,
            "PUT",
            "/queries/vwap?state=keep",
            Some(TOKEN),
            VWAP_V2,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["state_kept"], json!(true));
        assert!(reply["migrated"].as_u64().unwrap() > 0, "{body}");
        assert_eq!(feeding.await.unwrap() as usize, second.len());
        let after = third.join(&b'\n');
        assert_eq!(
            produce(&server, "trades", &after, 50).await as usize,
            third.len()
        );

        let items = collect(&mut sub, "vwap", lines.len()).await;
        // Reference, computed plainly from the file.
        let mut want: BTreeMap<String, (f64, f64, i64)> = BTreeMap::new();
        for l in &lines {
            let t: Value = serde_json::from_slice(l).unwrap();
            let e = want
                .entry(t["symbol"].as_str().unwrap().to_owned())
                .or_default();
            e.0 += t["price"].as_f64().unwrap() * t["size"].as_f64().unwrap();
            e.1 += t["size"].as_f64().unwrap();
            e.2 += 1;
        }
        let mut versions = (0, 0);
        for (key, values) in by_key(&items) {
            // Each key's count runs on across the replace: no restart from zero.
            for (i, v) in values.iter().enumerate() {
                assert_eq!(v["trades"], json!(i + 1), "{key}: {v}");
                if v["version"] == json!(2) {
                    versions.1 += 1;
                } else {
                    assert!(v.get("version").is_none());
                    versions.0 += 1;
                }
            }
            let symbol: String = serde_json::from_str(&key).unwrap();
            let (pv, volume, trades) = want[&symbol];
            let last = values.last().unwrap();
            assert_eq!(last["trades"], json!(trades));
            assert_eq!(last["volume"].as_f64().unwrap(), volume);
            let vwap = last["vwap"].as_f64().unwrap();
            assert!((vwap - pv / volume).abs() < 1e-9 * vwap, "{symbol}: {vwap}");
        }
        assert!(versions.0 >= first.len(), "{versions:?}");
        assert!(versions.1 >= third.len(), "{versions:?}");
        server.shutdown().await;
    })
    .await;
}

/// SIGTERM, and the process's exit within 20 s, with success.
async fn stop(child: &mut tokio::process::Child) {
    let pid = child.id().unwrap() as i32;
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
