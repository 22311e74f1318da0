//! Bounded memory and connections under hostile load, measured on `eddy serve` run as a
//! process: resident memory is read from `/proc/PID/status` (`VmRSS` now, `VmHWM` at peak).
//!
//! Each test states the bound it checks and why that bound; the figures they print (run with
//! `--nocapture`) are the ones quoted in the README.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{http_at, metric, proc_status_kib, spawn_serve_with_files, TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The tests that start a server process and measure it run one at a time: each figure is then
/// the server's alone, and none waits behind another's load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A queries folder with `queries` and an `eddy.toml` holding `toml` (plus the test token).
fn folder(queries: &[(&str, &str)], toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, script) in queries {
        std::fs::write(dir.path().join(format!("{name}.rhai")), script).unwrap();
    }
    std::fs::write(
        dir.path().join("eddy.toml"),
        format!("admin_token = \"{TOKEN}\"\n{toml}"),
    )
    .unwrap();
    dir
}

/// `eddy serve` on `dir` (its queries and its `eddy.toml`), optionally with `nofile` open files.
async fn serve(dir: &Path, nofile: Option<u64>) -> (tokio::process::Child, String, u32) {
    let config = dir.join("eddy.toml");
    let (child, _lines, addr) =
        spawn_serve_with_files(dir, &["--config", config.to_str().unwrap()], nofile).await;
    let pid = child.id().unwrap();
    (child, addr, pid)
}

async fn metrics_at(addr: &str) -> String {
    let (status, text) = http_at(addr, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    text
}

/// `POST /ingest?stream=STREAM` of an NDJSON body; returns the answer.
async fn post(addr: &str, stream: &str, body: &str) -> Value {
    let (status, text) = http_at(
        addr,
        "POST",
        &format!("/ingest?stream={stream}"),
        None,
        body,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// 2,000,000 distinct keys through a query allowed 100,000: the least recently seen keys are
/// evicted (exactly 2,000,100 − 100,000 of them, each counted), the keys seen all along keep
/// their full state, and resident memory stays under 400 MB: 100,000 states of a few hundred
/// bytes, the frames in flight (`max_ingest_bytes_in_flight`, 64 MiB here) and the process's
/// own ~80 MB. Without the limit it grew past 5 GB.
#[test]
fn two_million_keys_with_max_keys_per_query_stay_bounded_and_evictions_are_counted() {
    let _alone = one_at_a_time();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        // The full figures in a release build (`.ci/run` runs this test so); a debug build
        // (`cargo test`) runs a fifth of them, in the same proportions, to stay within a minute.
        let (distinct, kept) = if cfg!(debug_assertions) {
            (400_000, 20_000)
        } else {
            (2_000_000, 100_000)
        };
        let query = r#"let source = "t"; let key_by = "k";
            fn on_event(ev) {
                this.n = (this.n ?? 0) + ev.x;
                if ev.contains("check") { emit(this.n) }
            }"#;
        let dir = folder(
            &[("q", query)],
            &format!("max_ingest_bytes_in_flight = 67108864\n[limits]\nmax_keys_per_query = {kept}\n"),
        );
        let (_child, addr, pid) = serve(dir.path(), None).await;
        let before = proc_status_kib(pid, "VmRSS");
        // Every eviction is reported on q.errors, grouped: the reports add up to the count.
        let url = format!("ws://{addr}/subscribe");
        let (mut errors, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        errors
            .send(Message::Text(
                json!({"op": "subscribe", "topic": "q.errors"}).to_string().into(),
            ))
            .await
            .unwrap();
        assert_eq!(next_text(&mut errors).await["type"], "subscribed");
        let reported = tokio::spawn(async move {
            let mut evicted = 0;
            let mut reports = 0;
            while evicted < (distinct + 100 - kept) as u64 {
                let msg = next_text(&mut errors).await;
                for item in msg["items"].as_array().into_iter().flatten() {
                    evicted += item["value"]["evicted"].as_u64().unwrap();
                    reports += 1;
                }
            }
            (evicted, reports)
        });
        // 10,000 events of 100 hot keys, spread evenly: each is seen 100 times, again after
        // every distinct / 100 others, a fifth of what a shard keeps: always among the most
        // recent.
        let every = distinct / 10_000;
        let mut body = String::new();
        let mut sent = 0u64;
        for i in 0..distinct {
            body.push_str(&format!("{{\"k\":\"k{i}\",\"x\":1}}\n"));
            if i % every == 0 {
                body.push_str(&format!("{{\"k\":\"hot{}\",\"x\":1}}\n", (i / every) % 100));
            }
            if body.len() > 1 << 20 || i + 1 == distinct {
                let answer = post(&addr, "t", &body).await;
                assert_eq!(answer["rejected"], 0, "{answer}");
                sent += answer["accepted"].as_u64().unwrap();
                body.clear();
            }
        }
        assert_eq!(sent, (distinct + 10_000) as u64);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::Text(json!({"op": "subscribe", "topic": "q"}).to_string().into()))
            .await
            .unwrap();
        let checks: String = (0..100)
            .map(|j| format!("{{\"k\":\"hot{j}\",\"x\":0,\"check\":true}}\n"))
            .collect();
        // The subscription is confirmed before the checks are sent.
        let reply = next_text(&mut ws).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        post(&addr, "t", &checks).await;
        let mut totals = Vec::new();
        while totals.len() < 100 {
            let msg = next_text(&mut ws).await;
            for item in msg["items"].as_array().into_iter().flatten() {
                totals.push(item["value"].as_i64().unwrap());
            }
        }
        assert!(totals.iter().all(|&n| n == 100), "{totals:?}");
        // Shards publish their counters as they go: wait for the last.
        let deadline = Instant::now() + Duration::from_secs(20);
        let evicted = loop {
            let text = metrics_at(&addr).await;
            let evicted = metric(&text, "eddy_keys_evicted_total{query=\"q\"}") as usize;
            if evicted == distinct + 100 - kept || Instant::now() > deadline {
                break evicted;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(evicted, distinct + 100 - kept);
        let (reported, reports) = reported.await.unwrap();
        assert_eq!(reported, evicted as u64);
        println!("{reported} evictions reported in {reports} items on q.errors");
        let rss = proc_status_kib(pid, "VmRSS");
        let peak = proc_status_kib(pid, "VmHWM");
        println!(
            "{distinct} keys, max_keys_per_query {kept}: RSS {:.0} MiB before, {:.0} MiB after, peak {:.0} MiB; {evicted} evicted",
            mib(before),
            mib(rss),
            mib(peak)
        );
        assert!(peak < 400 * 1024, "peak RSS {} MiB", mib(peak));
        // Deleting the query gives its memory back: 20 MiB, or half of what the server grew
        // by when that is less (the debug build's fifth of the keys grows by about 30 MiB).
        let (status, _) = http_at(&addr, "DELETE", "/queries/q", Some(TOKEN), "").await;
        assert_eq!(status, 204);
        let owed = (20 * 1024).min(rss.saturating_sub(before) / 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        let freed = loop {
            let now = proc_status_kib(pid, "VmRSS");
            if now < rss.saturating_sub(owed) || Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!("after DELETE /queries/q: RSS {:.0} MiB", mib(freed));
        assert!(
            freed < rss.saturating_sub(owed),
            "RSS {} MiB after the delete, {} MiB before: less than {} MiB given back",
            mib(freed),
            mib(rss),
            mib(owed)
        );
    });
}

/// The next text message of a WebSocket as JSON.
async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// 60 events whose key is 15 MiB: each is rejected (naming `max_key_bytes`), and resident
/// memory stays flat: the whole adds less than 128 MiB (each such key held about 100 MB before
/// the limit), and in a release build the last 30 add less than 48 MiB (three of those keys) to
/// what the first 30 left.
#[test]
fn sixty_events_with_15_mib_keys_are_rejected_and_memory_stays_flat() {
    let _alone = one_at_a_time();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let query = r#"let source = "t"; let key_by = "symbol";
            fn on_event(ev) { this.n = (this.n ?? 0) + 1; }"#;
        let dir = folder(&[("q", query)], "");
        let (_child, addr, pid) = serve(dir.path(), None).await;
        let before = proc_status_kib(pid, "VmRSS");
        let mut warm = 0;
        for i in 0..60 {
            if i == 30 {
                warm = proc_status_kib(pid, "VmRSS");
            }
            // (Made by one fill, not char by char: in a debug build that took most of the test.)
            let symbol = char::from(b'a' + (i % 26) as u8).to_string().repeat(15 << 20);
            let body = format!("{{\"symbol\":\"{symbol}\",\"price\":1}}");
            let answer = post(&addr, "t", &body).await;
            assert_eq!(answer["accepted"], 0, "event {i}");
            assert_eq!(answer["rejected"], 1, "event {i}");
            let error = answer["errors"][0]["error"].as_str().unwrap();
            assert!(
                error.contains("15728640 bytes long") && error.contains("(max_key_bytes)"),
                "{error}"
            );
        }
        let after = proc_status_kib(pid, "VmRSS");
        let peak = proc_status_kib(pid, "VmHWM");
        println!(
            "60 events with 15 MiB keys: RSS {:.0} MiB before, {:.0} MiB after 30, {:.0} MiB after 60, peak {:.0} MiB",
            mib(before),
            mib(warm),
            mib(after),
            mib(peak)
        );
        // 900 MiB of keys went through: a server that kept one key in seven would pass 128 MiB.
        assert!(after < before + 128 * 1024, "RSS grew from {} to {} MiB", mib(before), mib(after));
        // The first ones leave buffers the allocator keeps for the next (a few times 15 MiB); the
        // 30 after them add no more than a few frames' worth. A release build reaches that
        // plateau within 15 events (130-136 MiB from 15 to 150 events, measured by hand). A debug
        // build, whose unoptimised code holds more copies of a body at once, was seen still
        // climbing at 60 (112 MiB after 30, 195 after 60, in a CI run), so the plateau is
        // checked in the release run of this file, which CI makes too.
        if !cfg!(debug_assertions) {
            assert!(after < warm + 48 * 1024, "RSS grew from {} to {} MiB after the first 30", mib(warm), mib(after));
        }
    });
}

/// 500 connections sending their request head one byte every 200 ms and 500 that send nothing
/// are all closed once `handshake_timeout` (1 s here) has passed, while a client asking for
/// `/healthz` and producing events is served throughout; again with the server limited to 256
/// open files, where slots past `max_connections` go to connections that speak.
#[test]
fn slowloris_and_silent_connections_are_closed_and_a_normal_client_is_served() {
    let _alone = one_at_a_time();
    for nofile in [None, Some(256)] {
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let query = r#"let source = "t"; fn on_event(ev) { }"#;
            let dir = folder(&[("q", query)], "handshake_timeout = \"1s\"\n");
            let (_child, addr, _pid) = serve(dir.path(), nofile).await;
            let started = Instant::now();
            let mut attackers = Vec::new();
            let mut streams = Vec::new();
            for _ in 0..1000 {
                streams.push(TcpStream::connect(&addr).await.unwrap());
            }
            for (i, mut s) in streams.into_iter().enumerate() {
                attackers.push(tokio::spawn(async move {
                    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                    let mut buf = [0u8; 256];
                    let mut at = 0;
                    loop {
                        let slow = i % 2 == 0 && at < head.len();
                        tokio::select! {
                            n = s.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return Instant::now(),
                                Ok(_) => {}
                            },
                            _ = tokio::time::sleep(Duration::from_millis(200)), if slow => {
                                if s.write_all(&head[at..at + 1]).await.is_err() {
                                    return Instant::now();
                                }
                                at += 1;
                            }
                        }
                    }
                }));
            }
            // The normal client, every 100 ms while the attackers hold on.
            let mut served = 0;
            while attackers.iter().any(|a| !a.is_finished()) {
                let (status, body) = http_at(&addr, "GET", "/healthz", None, "").await;
                assert_eq!(status, 200, "{body}");
                let answer = post(&addr, "t", "{\"x\":1}\n").await;
                assert_eq!(answer["accepted"], 1, "{answer}");
                served += 1;
                if started.elapsed() > Duration::from_secs(20) {
                    let open: Vec<usize> = (0..attackers.len()).filter(|&i| !attackers[i].is_finished()).collect();
                    panic!("{} attackers still connected after 20 s: {:?}\n{}", open.len(), &open[..open.len().min(20)], metrics_at(&addr).await);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut last = Duration::ZERO;
            for a in attackers {
                last = last.max(a.await.unwrap().duration_since(started));
            }
            let text = metrics_at(&addr).await;
            let closed = metric(&text, "eddy_handshake_timeouts_total")
                + metric(&text, "eddy_connections_shed_total")
                + metric(&text, "eddy_connections_refused_total");
            println!(
                "nofile {nofile:?}: 1000 attackers closed within {last:?} ({} timed out, {} shed, {} refused); normal client served {served} times",
                metric(&text, "eddy_handshake_timeouts_total"),
                metric(&text, "eddy_connections_shed_total"),
                metric(&text, "eddy_connections_refused_total"),
            );
            assert!(closed >= 1000.0, "{closed} closed by the limits");
            assert!(served >= 5);
        });
    }
}

/// 4 producers sending garbage as fast as the server takes it: truncated JSON, 100,000 levels
/// of nesting, a 15 MiB string, an object with a million fields. With
/// `max_ingest_bytes_in_flight` at 64 MiB, peak resident memory stays under that plus a stated
/// overhead of 432 MiB: an input whose worst case is more than the whole budget waits until it
/// is alone and then parses (its worst case, about 19 × 16 MiB, less the budget: 240 MiB); what
/// the 4 connections have read and not yet parsed (up to 16 MiB each, `max_frame_bytes`, twice:
/// the WebSocket buffer and the payload: 128 MiB); and 64 MiB for memory the allocator keeps
/// after large frames are freed, the hub and the runtime. Before the budget: 8.7 GB.
#[test]
fn garbage_on_four_connections_stays_within_the_ingest_budget() {
    let _alone = one_at_a_time();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let query = r#"let source = "t"; fn on_event(ev) { this.n = (this.n ?? 0) + 1; }"#;
        let dir = folder(&[("q", query)], "max_ingest_bytes_in_flight = 67108864\n");
        let (_child, addr, pid) = serve(dir.path(), None).await;
        let before = proc_status_kib(pid, "VmRSS");
        let truncated = "{\"a\":[1,2,3],\"b\":\"x\"".repeat(50_000);
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let long_string = format!("{{\"s\":\"{}\"}}", "a".repeat(15 << 20));
        let mut fields = String::with_capacity(16 << 20);
        fields.push('{');
        for i in 0..1_000_000 {
            if i > 0 {
                fields.push(',');
            }
            fields.push_str(&format!("\"{i}\":0"));
        }
        fields.push('}');
        let garbage = std::sync::Arc::new([truncated, nested, long_string, fields]);
        let until = Instant::now() + Duration::from_secs(8);
        let mut producers = Vec::new();
        for c in 0..4 {
            let garbage = std::sync::Arc::clone(&garbage);
            let url = format!("ws://{addr}/ingest?stream=t&ack=true");
            producers.push(tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let mut sent = 0;
                while Instant::now() < until {
                    let text = garbage[(c + sent) % garbage.len()].clone();
                    ws.send(Message::Text(text.into())).await.unwrap();
                    let ack = next_text(&mut ws).await;
                    assert_eq!(ack["type"], "ack", "{ack}");
                    sent += 1;
                }
                sent
            }));
        }
        let mut frames = 0;
        for p in producers {
            frames += p.await.unwrap();
        }
        let text = metrics_at(&addr).await;
        let peak = proc_status_kib(pid, "VmHWM");
        let after = proc_status_kib(pid, "VmRSS");
        println!(
            "garbage on 4 connections, {frames} frames: RSS {:.0} MiB before, peak {:.0} MiB, {:.0} MiB after; {} waits for the budget",
            mib(before),
            mib(peak),
            mib(after),
            metric(&text, "eddy_ingest_budget_waits_total")
        );
        assert!(frames >= 8, "{frames} frames");
        let overhead = (19 * 16 - 64) + 4 * 2 * 16 + 64;
        assert!(
            peak < before + (64 + overhead) * 1024,
            "peak {} MiB",
            mib(peak)
        );
        assert_eq!(metric(&text, "eddy_ingest_bytes_in_flight"), 0.0);
    });
}

/// 5,000 idle subscribers, each subscribed to a topic: the memory each costs the server is
/// stated (printed) and at most 20 KB.
#[test]
fn five_thousand_idle_subscribers_cost_at_most_20_kb_each() {
    let _alone = one_at_a_time();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let query = r#"let source = "t"; fn on_event(ev) { emit(1) }"#;
        let dir = folder(&[("q", query)], "");
        let (_child, addr, pid) = serve(dir.path(), None).await;
        // The topic exists once something was emitted.
        post(&addr, "t", "{\"x\":1}").await;
        let mut subscribers = Vec::new();
        let connect = |addr: String| async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/subscribe"))
                .await
                .unwrap();
            ws.send(Message::Text(
                json!({"op": "subscribe", "topic": "q"}).to_string().into(),
            ))
            .await
            .unwrap();
            assert_eq!(next_text(&mut ws).await["type"], "subscribed");
            ws
        };
        // A first batch brings the allocator and the runtime to their working size.
        for _ in 0..200 {
            subscribers.push(connect(addr.clone()).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = proc_status_kib(pid, "VmRSS");
        const N: usize = 5_000;
        for _ in 0..N {
            subscribers.push(connect(addr.clone()).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = proc_status_kib(pid, "VmRSS");
        let per = (after.saturating_sub(before) * 1024) as f64 / N as f64;
        println!(
            "{N} idle subscribers: RSS {:.1} → {:.1} MiB, {:.0} bytes each",
            mib(before),
            mib(after),
            per
        );
        assert!(per <= 20_000.0, "{per:.0} bytes per idle subscriber");
        drop(subscribers);
    });
}

/// A subscriber cannot make the hub keep topics no query emits: `<query>.anything` is refused
/// until the query emits it, unless the script names it literally (`emit("alerts", …)`), which
/// may be subscribed to before its first item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_creates_no_topic_a_query_does_not_name() {
    support::bounded(async {
        let query = r#"let source = "t";
            fn on_event(ev) { if ev.x > 1 { emit("alerts", ev.x) } emit(ev.name, 1) }"#;
        let (server, _dir) = support::start(&[("q", query)], |_| {}).await;
        let mut sub = support::connect(&server, "/subscribe").await;
        for topic in ["q.made_up_1", "nope", "q.dyn"] {
            support::send_json(&mut sub, json!({"op": "subscribe", "topic": topic})).await;
            let answer = support::next_json(&mut sub).await;
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("unknown topic") && error.contains("emit(\"name\""),
                "{answer}"
            );
        }
        support::send_json(&mut sub, json!({"op": "subscribe", "topic": "q.alerts"})).await;
        assert_eq!(support::next_json(&mut sub).await["type"], "subscribed");
        let sent = support::produce(
            &server,
            "t",
            b"{\"x\":1,\"name\":\"dyn\"}\n{\"x\":5,\"name\":\"dyn\"}\n",
            2,
        )
        .await;
        assert_eq!(sent, 2);
        let items = support::collect(&mut sub, "q.alerts", 1).await;
        assert_eq!(items[0]["value"], 5);
        // Once emitted, a dynamic name is a topic like any other.
        support::send_json(&mut sub, json!({"op": "subscribe", "topic": "q.dyn"})).await;
        assert_eq!(support::next_json(&mut sub).await["type"], "subscribed");
        server.shutdown().await;
    })
    .await;
}

/// The latest values kept for snapshots stay within `snapshot_bytes`, all topics together: past
/// it, new keys' values are not kept, and that is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_keep_at_most_snapshot_bytes() {
    support::bounded(async {
        let query = r#"let source = "t"; let key_by = "k";
            fn on_event(ev) { emit(#{ pad: "0123456789012345678901234567890123456789" }) }"#;
        let (server, _dir) = support::start(&[("q", query)], |c| c.snapshot_bytes = 2000).await;
        let input: String = (0..100).map(|i| format!("{{\"k\":\"k{i}\"}}\n")).collect();
        // Once a subscriber has every item, the hub has kept what it keeps.
        let mut all = support::subscribe(&server, json!({"op": "subscribe", "topic": "q"})).await;
        assert_eq!(
            support::produce(&server, "t", input.as_bytes(), 10).await,
            100
        );
        support::collect(&mut all, "q", 100).await;
        let (_, text) = support::http(&server, "GET", "/metrics", None, "").await;
        let kept_bytes = metric(&text, "eddy_snapshot_bytes");
        let skipped = metric(&text, "eddy_snapshot_skipped_total");
        assert!(kept_bytes > 0.0 && kept_bytes <= 2000.0, "{kept_bytes}");
        let mut sub = support::connect(&server, "/subscribe").await;
        support::send_json(
            &mut sub,
            json!({"op": "subscribe", "topic": "q", "snapshot": true}),
        )
        .await;
        assert_eq!(support::next_json(&mut sub).await["type"], "subscribed");
        let snapshot = support::next_json(&mut sub).await;
        let kept = snapshot["items"].as_array().unwrap().len();
        // Each value is about 60 bytes of JSON plus 64 of overhead.
        assert!((10..=20).contains(&kept), "{kept} kept");
        assert_eq!(kept as f64 + skipped, 100.0);
        server.shutdown().await;
    })
    .await;
}

/// Past `max_connections`, when every open connection has asked for something: `/healthz`,
/// `/metrics` and the admin API still answer from the reserve, other paths get 503 naming
/// the setting; past the reserve too, a bare 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_the_reserve_answers_health_metrics_and_admin() {
    support::bounded(async {
        let (server, _dir) = support::start(&[], |c| c.max_connections = 2).await;
        let mut subscribers = Vec::new();
        for _ in 0..2 {
            let mut ws = support::connect(&server, "/subscribe").await;
            support::send_json(&mut ws, json!({"op": "topics"})).await;
            assert_eq!(support::next_json(&mut ws).await["type"], "topics");
            subscribers.push(ws);
        }
        let (status, _) = support::http(&server, "GET", "/healthz", None, "").await;
        assert_eq!(status, 200);
        let (status, _) = support::http(&server, "GET", "/queries", Some(TOKEN), "").await;
        assert_eq!(status, 200);
        let (status, body) = support::http(&server, "POST", "/ingest?stream=t", None, "{}").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("(max_connections)"), "{body}");
        // Fill the reserve with keep-alive connections that have asked for /healthz.
        let mut held = Vec::new();
        for _ in 0..eddy::server::accept::RESERVE {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200");
            held.push(s);
        }
        let (status, body) = support::http(&server, "GET", "/healthz", None, "").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("(max_connections)"), "{body}");
        drop(held);
        server.shutdown().await;
    })
    .await;
}

/// Out of file descriptors, a failed accept backs off instead of spinning: while 200 silent
/// clients hold every descriptor of a server limited to 64 (and told it may keep 1,000
/// connections, so it never sheds them), the server's CPU time stays low; once they go, it
/// answers again and `eddy_accept_errors_total` has counted the failures.
#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let _alone = one_at_a_time();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::bounded(async {
            let dir = folder(&[], "max_connections = 1000\nhandshake_timeout = \"30s\"\n");
            let (_child, addr, pid) = serve(dir.path(), Some(64)).await;
            let mut silent = Vec::new();
            for _ in 0..200 {
                match tokio::net::TcpStream::connect(&addr).await {
                    Ok(s) => silent.push(s),
                    Err(_) => break,
                }
            }
            // Connections past the descriptors wait in the listen queue; the accept loop fails on
            // each try. Give it a second of that.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cpu = || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .collect();
                // utime and stime, in clock ticks (100 a second on Linux).
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
            };
            let before = cpu();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let spent = cpu() - before;
            assert!(
                spent < 30,
                "{spent} ticks of CPU in 1 s with no descriptor left: spinning"
            );
            drop(silent);
            let metrics = metrics_at(&addr).await;
            let errors = support::metric(&metrics, "eddy_accept_errors_total");
            assert!(errors >= 1.0, "{metrics}");
            // Backing off from 10 ms, doubling to 1 s: a few tries a second, not thousands.
            assert!(errors < 100.0, "{errors} failed accepts");
        }));
}
