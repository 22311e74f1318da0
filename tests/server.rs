//! End-to-end tests of `eddy serve`: the real server on 127.0.0.1 port 0, driven by an
//! independent WebSocket client (tokio-tungstenite) and plain HTTP over TCP. Every test is
//! bounded in time and in the traffic it sends, and stops by itself.

use std::collections::HashMap;
use std::time::Duration;

use eddy::server::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_results_equal_eddy_run_and_keep_per_key_order() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = sample("trades.ndjson");
        let accepted = produce(&server, "trades", &input, 100).await;
        assert_eq!(accepted, 4000);
        let got = collect(&mut sub, "vwap", 4000).await;
        let want = offline_items("vwap", input);
        // Across keys the interleaving depends on the shards; per key it is the arrival order.
        assert_eq!(by_key(&got), by_key(&want));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_conflates_and_snapshot_sends_the_newest_per_key() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut latest = subscribe(&server, json!({"op": "subscribe", "topic": "vwap", "mode": "latest", "keys": ["AAPL", "MSFT", "NVDA"]})).await;
        let input = sample("trades.ndjson");
        produce(&server, "trades", &input, 1000).await;
        let want = by_key(&offline_items("vwap", input));
        let last = |k: &str| want[&format!("\"{k}\"")].last().unwrap().clone();

        // Each batch holds a key at most once; the newest value of each key arrives.
        let mut newest: HashMap<String, Value> = HashMap::new();
        let mut received = 0;
        while ["AAPL", "MSFT", "NVDA"].iter().any(|k| newest.get(*k) != Some(&last(k))) {
            let msg = next_json(&mut latest).await;
            assert_eq!(msg["type"], "batch");
            let items = msg["items"].as_array().unwrap();
            let mut keys: Vec<&str> = items.iter().map(|i| i["key"].as_str().unwrap()).collect();
            received += keys.len();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), items.len(), "one value per key per batch: {msg}");
            for i in items {
                newest.insert(i["key"].as_str().unwrap().to_owned(), i["value"].clone());
            }
        }
        let sent: usize = ["AAPL", "MSFT", "NVDA"].iter().map(|k| want[&format!("\"{k}\"")].len()).sum();
        assert!(received < sent, "conflated: {received} of {sent}");

        // A new subscriber asks for a snapshot: the newest value of every key, sorted by key.
        let mut snap = connect(&server, "/subscribe").await;
        send_json(&mut snap, json!({"op": "subscribe", "topic": "vwap", "snapshot": true})).await;
        assert_eq!(next_json(&mut snap).await["type"], "subscribed");
        let snapshot = next_json(&mut snap).await;
        assert_eq!(snapshot["type"], "snapshot");
        let items = snapshot["items"].as_array().unwrap();
        assert_eq!(items.len(), want.len());
        for item in items {
            assert_eq!(&item["value"], want[&item["key"].to_string()].last().unwrap());
        }
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashtag_items_are_keyed_by_hashtag_so_latest_keeps_one_per_hashtag() {
    bounded(async {
        let script = query_file("hashtag_sentiment");
        let (server, _dir) = start(&[("hashtag_sentiment", &script)], |_| {}).await;
        let input = sample("social.ndjson");
        assert_eq!(produce(&server, "social", &input, 50).await, 600);
        drain(&server).await;
        // The newest value per hashtag, from the posts themselves: each post's hashtags, in order.
        let mut tags: Vec<String> = Vec::new();
        for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let post: Value = serde_json::from_slice(line).unwrap();
            for tag in post["hashtags"].as_array().unwrap() {
                let tag = tag.as_str().unwrap().to_owned();
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
        }
        tags.sort();
        let want = by_key(&offline_items("hashtag_sentiment", input));
        // A `latest` subscriber with a snapshot: one item per hashtag, keyed by it.
        let mut sub = connect(&server, "/subscribe").await;
        send_json(
            &mut sub,
            json!({"op": "subscribe", "topic": "hashtag_sentiment", "mode": "latest", "snapshot": true}),
        )
        .await;
        assert_eq!(next_json(&mut sub).await["type"], "subscribed");
        let snapshot = next_json(&mut sub).await;
        assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
        let items = snapshot["items"].as_array().unwrap();
        let keys: Vec<&str> = items.iter().map(|i| i["key"].as_str().unwrap()).collect();
        assert_eq!(keys, tags, "one item per hashtag, sorted by key");
        for item in items {
            assert_eq!(item["value"]["hashtag"], item["key"]);
            let posts = item["value"]["posts"].as_i64().unwrap() as usize;
            let history = &want[&item["key"].to_string()];
            assert_eq!(posts, history.len(), "{item}");
            assert_eq!(&item["value"], history.last().unwrap());
        }
        server.shutdown().await;
    })
    .await;
}

/// A query emitting about 2 KB per event.
const FAT: &str = r#"let source = "fat"; let key_by = "k";
fn init(key) { let pad = ""; for i in 0..2000 { pad += "x"; } #{ pad: pad, n: 0 } }
fn on_event(ev) { this.n += 1; emit(#{ n: this.n, pad: this.pad }); }"#;

fn fat_events(from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .map(|i| format!("{{\"k\":{}}}\n", i % 20))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_told_what_it_lost_then_closed_while_others_miss_nothing() {
    bounded(async {
        let (server, _dir) = start(&[("fat", FAT)], |c| {
            c.subscriber_queue_bytes = 2 << 20;
            c.slow_consumer_timeout = Duration::from_millis(300);
        })
        .await;
        let mut normal = subscribe(&server, json!({"op": "subscribe", "topic": "fat"})).await;
        // The stalled client has a small receive buffer, so TCP cannot hide its stall for long.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.addr).await.unwrap();
        let url = format!("ws://{}/subscribe", server.addr);
        let (mut stalled, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        send_json(&mut stalled, json!({"op": "subscribe", "topic": "fat"})).await;
        assert_eq!(next_json(&mut stalled).await["type"], "subscribed");

        // The normal subscriber reads all along, in its own task, and must see every item.
        let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let normal_reader = tokio::spawn(async move {
            let mut seq = 0;
            loop {
                let msg = next_json(&mut normal).await;
                assert_eq!(
                    msg["type"], "batch",
                    "the normal subscriber lost nothing: {msg}"
                );
                assert_eq!(msg["seq"], json!(seq));
                seq += 1;
                if count_tx
                    .send(msg["items"].as_array().unwrap().len())
                    .is_err()
                {
                    break;
                }
            }
        });
        // Produce while the stalled client reads nothing, until its mailbox overflows (TCP
        // buffers hold a few MB first); bounded to 40 rounds of 1 MB.
        let mut total = 0;
        for round in 0..40 {
            produce(&server, "fat", &fat_events(total, 500), 50).await;
            total += 500;
            // Acks mean queued: wait until the shards have handled what was acked.
            let metrics = metrics_when(&server, |m| {
                metric(m, "eddy_query_events_total{query=\"fat\"}") >= total as f64
            })
            .await;
            let dropped = metrics
                .lines()
                .find_map(|l| l.strip_prefix("eddy_dropped_items_total{topic=\"fat\"} "))
                .map_or(0, |n| n.parse::<u64>().unwrap());
            if dropped > 0 {
                break;
            }
            assert!(round < 39, "the stalled subscriber never overflowed");
        }
        // Stay full past the slow-consumer timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut received = 0;
        while received < total {
            received += tokio::time::timeout(Duration::from_secs(20), count_rx.recv())
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(received, total);
        drop(count_rx);
        normal_reader.abort();

        // The stalled one now reads: batches without seq gaps, a `dropped` notice, then 4008.
        let mut dropped = 0;
        let mut seq = 0;
        let code = loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), stalled.next())
                .await
                .unwrap();
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str().unwrap() {
                        "batch" => {
                            assert_eq!(v["seq"], json!(seq));
                            seq += 1;
                        }
                        "dropped" => dropped += v["items"].as_u64().unwrap(),
                        other => panic!("unexpected {other}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break frame.map(|f| (f.code, f.reason.to_string()))
                }
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert!(dropped > 0);
        assert_eq!(
            code,
            Some((CloseCode::Library(4008), "slow consumer".to_owned()))
        );
        let (_, metrics) = http(&server, "GET", "/metrics", None, "").await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("eddy_dropped_items_total{topic=\"fat\"}"))
            .unwrap();
        assert!(
            line.ends_with(&format!(" {dropped}"))
                || line.split(' ').nth(1).unwrap().parse::<u64>().unwrap() >= dropped,
            "{line}"
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_shard_queue_slows_the_producer_and_loses_no_acknowledged_event() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |c| {
            c.shard_queue = 1;
        })
        .await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = sample("trades.ndjson");
        let accepted = produce(&server, "trades", &input, 5).await;
        assert_eq!(accepted, 4000);
        let got = collect(&mut sub, "vwap", 4000).await;
        assert_eq!(by_key(&got), by_key(&offline_items("vwap", input)));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_requests_are_answered_and_the_connection_goes_on() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |c| c.max_frame_bytes = 4096).await;
        let mut ingest = connect(&server, "/ingest?stream=trades&ack=true").await;
        ingest.send(Message::Text("{\"symbol\": ".into())).await.unwrap();
        let ack = next_json(&mut ingest).await;
        assert_eq!((ack["accepted"].as_u64(), ack["rejected"].as_u64()), (Some(0), Some(1)));
        assert!(ack["errors"][0]["error"].as_str().unwrap().contains("invalid JSON"), "{ack}");
        ingest
            .send(Message::Text("[{\"symbol\":\"A\",\"price\":1,\"size\":1},{\"price\":2},{\"symbol\":{},\"price\":3,\"size\":1}]".into()))
            .await
            .unwrap();
        let ack = next_json(&mut ingest).await;
        assert_eq!((ack["frame"].as_u64(), ack["accepted"].as_u64(), ack["rejected"].as_u64()), (Some(1), Some(1), Some(2)));
        let errors = ack["errors"].as_array().unwrap();
        assert_eq!(errors[0]["index"], 1);
        assert!(errors[0]["error"].as_str().unwrap().contains("`symbol`"), "{ack}");
        assert_eq!(errors[1]["index"], 2);

        // Without a stream, an event must name its own.
        let mut unnamed = connect(&server, "/ingest?ack=true").await;
        unnamed.send(Message::Text("{\"symbol\":\"A\",\"price\":1,\"size\":1}".into())).await.unwrap();
        let ack = next_json(&mut unnamed).await;
        assert!(ack["errors"][0]["error"].as_str().unwrap().contains("no stream"), "{ack}");
        unnamed.send(Message::Text("{\"stream\":\"trades\",\"symbol\":\"A\",\"price\":1,\"size\":1}".into())).await.unwrap();
        assert_eq!(next_json(&mut unnamed).await["accepted"], 1);

        // Without ack, a rejected event is still reported.
        let mut quiet = connect(&server, "/ingest?stream=trades").await;
        quiet.send(Message::Text("[1]".into())).await.unwrap();
        let err = next_json(&mut quiet).await;
        assert_eq!(err["type"], "error");
        assert!(err["error"].as_str().unwrap().contains("expected a JSON object"));

        // An oversized frame closes the connection with 1009.
        ingest.send(Message::Text("x".repeat(10_000).into())).await.unwrap();
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), ingest.next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close, Some(CloseCode::Size));

        // Subscribers: unknown topics and malformed requests are answered; the connection stays.
        let mut sub = connect(&server, "/subscribe").await;
        send_json(&mut sub, json!({"op": "subscribe", "topic": "nope"})).await;
        assert!(next_json(&mut sub).await["error"].as_str().unwrap().contains("unknown topic"));
        sub.send(Message::Text("not json".into())).await.unwrap();
        assert_eq!(next_json(&mut sub).await["type"], "error");
        send_json(&mut sub, json!({"op": "subscribe", "topic": "vwap", "mode": "sometimes"})).await;
        assert_eq!(next_json(&mut sub).await["type"], "error");
        send_json(&mut sub, json!({"op": "topics"})).await;
        let topics = next_json(&mut sub).await;
        let names: Vec<&str> = topics["topics"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["vwap", "vwap.errors", "vwap.late"]);
        assert_eq!(topics["topics"][0], json!({"name": "vwap", "query": "vwap", "source": "trades", "key_by": "symbol"}));

        // HTTP ingest: counts, 400 when nothing is JSON, 413 past the limit.
        let (status, body) = http(&server, "POST", "/ingest?stream=trades", None, "{\"symbol\":\"B\",\"price\":2,\"size\":3}\n{\"price\":1}\n").await;
        assert_eq!(status, 200);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(1), Some(1)));
        assert_eq!(http(&server, "POST", "/ingest?stream=trades", None, "garbage").await.0, 400);
        assert_eq!(http(&server, "POST", "/ingest?stream=trades", None, &"x".repeat(5000)).await.0, 413);
        assert_eq!(http(&server, "GET", "/healthz", None, "").await.0, 200);
        assert_eq!(http(&server, "GET", "/nowhere", None, "").await.0, 404);
        server.shutdown().await;
    })
    .await;
}

const COUNTER: &str = r#"let source = "s"; let key_by = "k";
fn on_event(ev) { this.n = (this.n ?? 0) + 1; emit(this.n); }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_replace_and_delete_at_run_time() {
    bounded(async {
        let (server, _dir) = start(&[], |_| {}).await;
        // Writes need the admin token.
        assert_eq!(
            http(&server, "PUT", "/queries/counter", None, COUNTER)
                .await
                .0,
            401
        );
        assert_eq!(
            http(
                &server,
                "PUT",
                "/queries/counter",
                Some("wrong-token"),
                COUNTER
            )
            .await
            .0,
            401
        );
        let (status, body) = http(
            &server,
            "PUT",
            "/queries/counter",
            Some(TOKEN),
            "let source = \"s\";\nfn on_event(ev) {\n  let x = ;\n}",
        )
        .await;
        assert_eq!(status, 400);
        let err: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["line"], 3);
        assert!(err["column"].is_u64());
        let (status, body) = http(
            &server,
            "PUT",
            "/queries/counter",
            Some(TOKEN),
            "fn on_event(ev) {}",
        )
        .await;
        assert_eq!(status, 400);
        assert!(body.contains("source"), "{body}");

        // A client that asked for the topics hears of every change to the list.
        let mut watcher = connect(&server, "/subscribe").await;
        send_json(&mut watcher, json!({"op": "topics"})).await;
        assert_eq!(next_json(&mut watcher).await, json!({"type": "topics", "topics": []}));
        let names = |msg: &Value| -> Vec<String> {
            assert_eq!(msg["type"], "topics");
            msg["topics"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
        };

        assert_eq!(
            http(&server, "PUT", "/queries/counter", Some(TOKEN), COUNTER)
                .await
                .0,
            201
        );
        assert_eq!(names(&next_json(&mut watcher).await), ["counter", "counter.errors", "counter.late"]);
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "counter"})).await;
        let events = b"{\"k\":1}\n{\"k\":1}\n{\"k\":1}\n";
        produce(&server, "s", events, 3).await;
        let got: Vec<Value> = collect(&mut sub, "counter", 3)
            .await
            .iter()
            .map(|i| i["value"].clone())
            .collect();
        assert_eq!(got, [json!(1), json!(2), json!(3)]);

        let list = loop {
            let (_, list) = http(&server, "GET", "/queries", None, "").await;
            let list: Value = serde_json::from_str(&list).unwrap();
            // Counters are published by the shards as they go.
            if list[0]["events"] == 3 {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(list[0]["name"], "counter");
        // No `init`, so `this.n` has no slot: the query runs on the interpreter, and says why.
        let engine = list[0]["engine"].as_str().unwrap();
        assert!(engine.starts_with("interpreted (2:") && engine.contains("`this.n`"), "{list}");
        assert!(list[0]["functions"][0].as_str().unwrap().starts_with("on_event: interpreted"), "{list}");
        assert_eq!(list[0]["events"], 3);
        assert_eq!(list[0]["keys"], 1);
        let (_, one) = http(&server, "GET", "/queries/counter", None, "").await;
        assert_eq!(
            serde_json::from_str::<Value>(&one).unwrap()["script"],
            COUNTER
        );

        // Replacing starts from fresh state; the subscription carries on.
        assert_eq!(
            http(&server, "PUT", "/queries/counter", Some(TOKEN), COUNTER)
                .await
                .0,
            200
        );
        produce(&server, "s", b"{\"k\":1}\n", 1).await;
        assert_eq!(
            collect_from(&mut sub, "counter", 1, 1).await[0]["value"],
            json!(1)
        );

        // Deleting closes its topics.
        assert_eq!(
            http(&server, "DELETE", "/queries/counter", Some(TOKEN), "")
                .await
                .0,
            204
        );
        assert_eq!(
            next_json(&mut sub).await,
            json!({"type": "closed", "topic": "counter"})
        );
        // The replacement and the removal were announced too; the last list is empty.
        let mut last = names(&next_json(&mut watcher).await);
        while !last.is_empty() {
            last = names(&next_json(&mut watcher).await);
        }
        assert_eq!(
            http(&server, "DELETE", "/queries/counter", Some(TOKEN), "")
                .await
                .0,
            404
        );
        assert_eq!(http(&server, "GET", "/queries", None, "").await.1, "[]");

        // A hostile script is deployed: its endless loop is stopped, reported on
        // `<query>.errors`, and the server and the other events go on.
        let hostile = "let source = \"s\"; let key_by = \"k\";\nfn on_event(ev) {\n  if ev.k == 2 { loop { } }\n  emit(ev.k);\n}";
        assert_eq!(http(&server, "PUT", "/queries/hostile", Some(TOKEN), hostile).await.0, 201);
        let mut errors = subscribe(&server, json!({"op": "subscribe", "topic": "hostile.errors"})).await;
        let mut out = subscribe(&server, json!({"op": "subscribe", "topic": "hostile"})).await;
        produce(&server, "s", b"{\"k\":1}\n{\"k\":2}\n{\"k\":3}\n", 1).await;
        let error = &collect(&mut errors, "hostile.errors", 1).await[0];
        assert_eq!(error["key"], 2);
        assert!(error["value"]["error"].as_str().unwrap().contains("max_operations"), "{error}");
        let got: Vec<Value> = collect(&mut out, "hostile", 2).await.iter().map(|i| i["value"].clone()).collect();
        assert_eq!(got, [json!(1), json!(3)]);

        // A named topic joins the list with its first item.
        let named = "let source = \"n\"; fn on_event(ev) { emit(\"alerts\", 1); }";
        assert_eq!(http(&server, "PUT", "/queries/named", Some(TOKEN), named).await.0, 201);
        produce(&server, "n", b"{}\n", 1).await;
        loop {
            let list = names(&next_json(&mut watcher).await);
            if list.iter().any(|t| t == "named.alerts") {
                break;
            }
        }
        server.shutdown().await;
    })
    .await;
}

const TIMERS: &str = r#"let source = "s"; let key_by = "k"; let time_field = "t";
fn on_event(ev) { set_timer(ev.t + 100); }
fn on_timer(t) { emit(t); }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_is_the_same_on_every_shard() {
    bounded(async {
        let (server, _dir) = start(&[("timers", TIMERS)], |c| c.shards = 4).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "timers"})).await;
        // Forty keys spread over four shards set timers at 200; then one key moves the
        // watermark to 1000: every shard's timers fire, though their keys got nothing more.
        let mut input = String::new();
        for k in 0..40 {
            input.push_str(&format!("{{\"k\":{k},\"t\":100}}\n"));
        }
        produce(&server, "s", input.as_bytes(), 40).await;
        produce(&server, "s", b"{\"k\":0,\"t\":1000}\n", 1).await;
        let items = collect(&mut sub, "timers", 40).await;
        let mut keys: Vec<i64> = items.iter().map(|i| i["key"].as_i64().unwrap()).collect();
        keys.sort();
        assert_eq!(keys, (0..40).collect::<Vec<i64>>());
        assert!(items.iter().all(|i| i["value"] == 200));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_delivers_every_batch_produced_before_it() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = sample("trades.ndjson");
        assert_eq!(produce(&server, "trades", &input, 500).await, 4000);
        // Shut down at once: whatever is still queued in shards and hub must reach the client.
        let shutdown = tokio::spawn(server.shutdown());
        let got = collect(&mut sub, "vwap", 4000).await;
        assert_eq!(got.len(), 4000);
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(Message::Text(t))) => panic!("unexpected message {t}"),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close, Some(CloseCode::Away));
        shutdown.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = b"{\"symbol\":\"A\",\"price\":1,\"size\":1}\n{\"price\":1}\n[1]\n{\"symbol\":\"B\",\"price\":2,\"size\":1}\n";
        produce(&server, "trades", input, 4).await;
        collect(&mut sub, "vwap", 2).await;
        // Shards publish their counters as they go: wait for the last of them.
        let text = metrics_when(&server, |m| {
            metric(m, "eddy_query_events_total{query=\"vwap\"}") == 2.0
        })
        .await;
        for line in [
            "eddy_events_ingested_total{stream=\"trades\"} 2",
            "eddy_events_rejected_total{stream=\"trades\",reason=\"bad_key\"} 1",
            "eddy_events_rejected_total{stream=\"trades\",reason=\"not_object\"} 1",
            "eddy_items_emitted_total{topic=\"vwap\"} 2",
            "eddy_subscribers{topic=\"vwap\"} 1",
            "eddy_query_events_total{query=\"vwap\"} 2",
            "eddy_query_errors_total{query=\"vwap\"} 0",
            "eddy_ingest_to_socket_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscriber_gets_its_batches_straight_from_the_shard_whole_and_in_order() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        // One trade per frame, each acknowledged before the next: the subscriber's connection
        // task has written everything and waits whenever a batch is published.
        let mut input = Vec::new();
        for i in 0..30u32 {
            let line = format!(
                "{{\"symbol\":\"{}\",\"price\":{}.25,\"size\":{}}}\n",
                ["A", "B", "C"][i as usize % 3],
                100 + i % 7,
                1 + i % 4
            );
            assert_eq!(produce(&server, "trades", line.as_bytes(), 1).await, 1);
            input.extend_from_slice(line.as_bytes());
        }
        // Batches numbered from 0 without a gap (checked by `collect`), every item as `eddy run`
        // computes it, per key in order.
        let items = collect(&mut sub, "vwap", 30).await;
        assert_eq!(by_key(&items), by_key(&offline_items("vwap", input)));
        let text = metrics_when(&server, |m| {
            metric(m, "eddy_socket_direct_batches_total") > 0.0
        })
        .await;
        let direct = metric(&text, "eddy_socket_direct_batches_total");
        assert!(direct <= 30.0, "{direct} direct batches for 30 trades");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_feeds_vwap_ordered_and_batched() {
    bounded(async {
        let vwap = query_file("vwap");
        let alerts = query_file("price_alerts");
        let (server, _dir) = start(&[("vwap", &vwap), ("price_alerts", &alerts)], |c| {
            c.demo = true;
            c.demo_rate = 2000;
        })
        .await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let items = collect_at_least(&mut sub, "vwap", 500, 0).await;
        // Per symbol: trades count up by one, and each VWAP follows from the previous one and the
        // trade it adds: vwap' * volume' = vwap * volume + last * (volume' - volume).
        let mut seen: HashMap<String, (i64, i64, f64)> = HashMap::new();
        for item in &items {
            let v = &item["value"];
            let trades = v["trades"].as_i64().unwrap();
            let volume = v["volume"].as_i64().unwrap();
            let (last, vwap) = (v["last"].as_f64().unwrap(), v["vwap"].as_f64().unwrap());
            let key = item["key"].as_str().unwrap().to_owned();
            if let Some(&(t0, vol0, vwap0)) = seen.get(&key) {
                assert_eq!(trades, t0 + 1, "{item}");
                let want = (vwap0 * vol0 as f64 + last * (volume - vol0) as f64) / volume as f64;
                assert!(
                    (vwap - want).abs() < 1e-6 * want,
                    "{item}: want vwap {want}"
                );
            }
            seen.insert(key, (trades, volume, vwap));
        }
        assert!(seen.len() > 10);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_quotes_feed_the_cookbook_as_of_join_live() {
    bounded(async {
        let script = query_file("asof_join");
        let (server, _dir) = start(&[("asof_join", &script)], |c| {
            c.demo = true;
            c.demo_rate = 2000;
        })
        .await;
        let mut sub = subscribe(&server, json!({"op": "subscribe", "topic": "asof_join"})).await;
        let items = collect_at_least(&mut sub, "asof_join", 300, 0).await;
        let mut symbols = std::collections::HashSet::new();
        let mut last_ts: HashMap<String, i64> = HashMap::new();
        for item in &items {
            let v = &item["value"];
            let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {item}"));
            let (bid, ask, price, mid) = (f("bid"), f("ask"), f("price"), f("mid"));
            assert!(bid < ask, "{item}");
            assert_eq!(mid, (bid + ask) / 2.0, "{item}");
            assert_eq!(f("spread"), ask - bid, "{item}");
            let side = if price > mid {
                "buy"
            } else if price < mid {
                "sell"
            } else {
                "mid"
            };
            assert_eq!(v["side"], side, "{item}");
            assert!(
                (f("slippage_bps") - (price - mid) / mid * 1e4).abs() < 1e-9,
                "{item}"
            );
            // The quote came earlier, at most a few demo ticks before, and near the price.
            let age = v["quote_age_ms"].as_i64().unwrap();
            assert!(age >= 0, "{item}");
            assert!((price - mid).abs() < 0.2 * mid, "{item}");
            let key = item["key"].as_str().unwrap().to_owned();
            let ts = v["ts"].as_i64().unwrap();
            assert!(
                last_ts.insert(key.clone(), ts).is_none_or(|t| t <= ts),
                "{item}"
            );
            symbols.insert(key);
        }
        assert!(symbols.len() > 10, "{symbols:?}");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_deploys_and_stops_on_sigterm() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        // It prints its address and the generated admin token.
        let (mut child, mut lines, addr) = spawn_serve(dir.path(), &[]).await;
        let url = format!("http://{addr}");
        let token_line = lines.next_line().await.unwrap().unwrap();
        let token = token_line.strip_prefix("admin token: ").unwrap().to_owned();
        assert_eq!(token.len(), 32);

        let file = dir.path().join("counter.rhai");
        std::fs::write(&file, COUNTER).unwrap();
        let deploy = |token: String| {
            let (file, url) = (file.clone(), url.clone());
            tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
                .arg("deploy")
                .arg(file)
                .args(["--server", &url, "--token", &token])
                .output()
        };
        let out = deploy("wrong-token-123".into()).await.unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
        let out = deploy(token).await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("deployed (201)"));

        let pid = child.id().unwrap();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
    })
    .await;
}

/// A WebSocket upgrade request by hand, to send headers a client library would not.
async fn upgrade_status(server: &Server, path: &str, extra: &str) -> u16 {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_browser_origins_are_checked() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |c| {
            c.ingest_token = Some("ingest-secret".into());
            c.subscribe_token = Some("subscribe-secret".into());
            c.allowed_origins = vec!["http://dash.example".into()];
        })
        .await;
        assert_eq!(
            upgrade_status(&server, "/ingest?stream=trades", "").await,
            401
        );
        assert_eq!(
            upgrade_status(&server, "/ingest?stream=trades&token=wrong", "").await,
            401
        );
        assert_eq!(
            upgrade_status(&server, "/ingest?stream=trades&token=ingest-secret", "").await,
            101
        );
        assert_eq!(
            upgrade_status(
                &server,
                "/ingest",
                "Authorization: Bearer ingest-secret\r\n"
            )
            .await,
            101
        );
        assert_eq!(
            upgrade_status(&server, "/subscribe?token=ingest-secret", "").await,
            401
        );
        let auth = "Authorization: Bearer subscribe-secret\r\n";
        assert_eq!(upgrade_status(&server, "/subscribe", auth).await, 101);
        // Browsers: the configured origin and the server's own pass, others do not.
        let origin = |o: &str| format!("{auth}Origin: {o}\r\n");
        assert_eq!(
            upgrade_status(&server, "/subscribe", &origin("http://dash.example")).await,
            101
        );
        assert_eq!(
            upgrade_status(
                &server,
                "/subscribe",
                &origin(&format!("http://{}", server.addr))
            )
            .await,
            101
        );
        assert_eq!(
            upgrade_status(&server, "/subscribe", &origin("http://evil.example")).await,
            403
        );
        let (status, _) = http(&server, "POST", "/ingest?stream=trades", None, "{}").await;
        assert_eq!(status, 401);
        let (status, _) = http(
            &server,
            "POST",
            "/ingest?stream=trades",
            Some("ingest-secret"),
            "{\"symbol\":\"A\",\"price\":1,\"size\":1}",
        )
        .await;
        assert_eq!(status, 200);
        server.shutdown().await;
    })
    .await;
}

/// Trades to `url` at 2,000 events/s in frames of 10, on two connections, for a second.
fn paced_trades(url: String) -> eddy::feed::FeedOptions {
    eddy::feed::FeedOptions {
        url,
        scenario: eddy::synth::Scenario::Trades,
        rate: Some(2000),
        batch: 10,
        connections: 2,
        duration: Duration::from_secs(1),
        keys: 0,
        seed: 7,
        reconnect: false,
        timeout: eddy::link::SILENCE,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_probe_checks_every_subscriber_gets_every_item() {
    fan_out_probe(false).await;
}

/// The same through permessage-deflate: batches come compressed and the probe inflates only
/// their heads, yet counts every item and seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_probe_with_permessage_deflate_counts_every_item() {
    fan_out_probe(true).await;
}

async fn fan_out_probe(deflate: bool) {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let url = format!("ws://{}", server.addr);
        let probe_url = url.clone();
        let probe = tokio::spawn(async move {
            eddy::probe::fan_out(&probe_url, "vwap", Duration::from_millis(1500), 40, deflate)
                .await
                .unwrap()
        });
        // Every subscriber has subscribed before the feed starts.
        metrics_when(&server, |m| {
            metric(m, "eddy_subscribers{topic=\"vwap\"}") >= 40.0
        })
        .await;
        let options = eddy::feed::FeedOptions {
            connections: 1,
            duration: Duration::from_millis(500),
            seed: 11,
            ..paced_trades(url)
        };
        let feed = eddy::feed::run(options, false).await.unwrap();
        assert_eq!(feed.accepted, feed.events);
        let report = probe.await.unwrap();
        // Every one of the 40 got every item (counted from the batches' `n`), in order.
        assert_eq!(report.subscribers, 40);
        assert_eq!(
            (report.min_items, report.max_items),
            (feed.events, feed.events),
            "{report:?}"
        );
        assert_eq!((report.seq_gaps, report.dropped), (0, 0));
        // With permessage-deflate every batch came compressed (and was counted from its head
        // alone); without, none did.
        assert!(report.batches > 0, "{report:?}");
        let expected = if deflate { report.batches } else { 0 };
        assert_eq!(report.compressed, expected, "{report:?}");
        // Every plain batch is timed; one compressed batch in eight per subscriber is inflated
        // for its stamp, the rest counted from their uncompressed head without inflating.
        if deflate {
            let most = report.batches.div_ceil(8) + report.subscribers as u64;
            assert!(report.timed > 0 && report.timed <= most, "{report:?}");
        } else {
            assert_eq!(report.timed, report.batches, "{report:?}");
        }
        assert!(
            report.p50_us > 0 && report.p50_us <= report.p99_us,
            "{report:?}"
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_and_probe_measure_the_server_end_to_end() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let url = format!("ws://{}", server.addr);
        let probe_url = url.clone();
        let probe = tokio::spawn(async move {
            eddy::probe::run(&probe_url, "vwap", Duration::from_millis(1500))
                .await
                .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let options = paced_trades(url);
        let feed = eddy::feed::run(options, false).await.unwrap();
        // Paced: about 2000 events in the second, all acknowledged as accepted.
        assert!((1500..=2100).contains(&feed.events), "{feed:?}");
        assert_eq!(feed.events, feed.frames * 10);
        assert_eq!((feed.accepted, feed.rejected), (feed.events, 0));
        let report = probe.await.unwrap();
        // Counted from each batch's `n`, without decoding the items; one sample a batch.
        assert_eq!(report.items, feed.events, "{report:?}");
        assert_eq!(report.timed, report.batches);
        assert_eq!((report.seq_gaps, report.dropped), (0, 0));
        assert!(
            report.p50_us > 0 && report.p50_us <= report.p99_us && report.p99_us <= report.max_us
        );
        server.shutdown().await;
    })
    .await;
}

/// A batch that a permessage-deflate subscriber takes is compressed when it is published, before
/// any writer asks for it (so writers never wait on one another's compression), and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_compressed_at_publish_only_for_a_subscriber_that_negotiated_deflate() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let state = std::sync::Arc::clone(&server.state);
        let counters = state.metrics.stream("trades");
        let mut source = eddy::server::ingest::Source::new(&state);
        for (subscriber, deflate) in [(0, false), (1, true)] {
            let mailbox = hub_subscriber(&state, subscriber, deflate).await;
            let price = 100 + subscriber;
            let frame = format!(r#"{{"symbol":"S{subscriber}","price":{price},"size":2,"ts":1}}"#);
            eddy::server::ingest::ingest(
                &state,
                &mut source,
                frame.into_bytes(),
                Some("trades"),
                &counters,
                None,
            )
            .await;
            let items = next_batch(&mailbox).await;
            // Subscriber 1 negotiated deflate: the batch it shares with subscriber 0 came
            // compressed already. With only subscriber 0, nothing was compressed.
            assert_eq!(items.is_deflated(), deflate);
            let value: Value = serde_json::from_slice(&items.json).unwrap();
            assert_eq!(value[0]["value"]["vwap"], json!(price as f64), "{value}");
            if deflate {
                let mut message = items.deflated().to_vec();
                message.extend_from_slice(&[0, 0, 0xff, 0xff]);
                let mut text = Vec::new();
                let _ = std::io::Read::read_to_end(
                    &mut flate2::read::DeflateDecoder::new(&message[..]),
                    &mut text,
                );
                assert_eq!(text, &items.json[1..items.json.len() - 1]);
            }
        }
        server.shutdown().await;
    })
    .await;
}

/// A batch shared by many permessage-deflate subscribers is compressed harder (they all pay for
/// its bytes; the compression is paid once); one shared by a few, at the faster level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_shared_by_many_deflate_subscribers_is_compressed_harder() {
    use eddy::server::deflate::{Compressed, WIDE};
    bounded(async {
        let vwap = query_file("vwap");
        for sharers in [WIDE - 1, WIDE] {
            // One shard, so that one frame's items are one batch.
            let (server, _dir) = start(&[("vwap", &vwap)], |c| c.shards = 1).await;
            let state = std::sync::Arc::clone(&server.state);
            let counters = state.metrics.stream("trades");
            let mut source = eddy::server::ingest::Source::new(&state);
            let mut mailboxes = Vec::new();
            for subscriber in 0..sharers as u64 {
                mailboxes.push(hub_subscriber(&state, subscriber, true).await);
            }
            let trades: Vec<String> = (0..300)
                .map(|i| {
                    let price = 100.0 + (i * 37 % 101) as f64 / 100.0;
                    format!(
                        r#"{{"symbol":"S{}","price":{price},"size":{},"ts":{i}}}"#,
                        i % 40,
                        1 + i % 7
                    )
                })
                .collect();
            let frame = format!("[{}]", trades.join(","));
            eddy::server::ingest::ingest(
                &state,
                &mut source,
                frame.into_bytes(),
                Some("trades"),
                &counters,
                None,
            )
            .await;
            let mut pieces = Vec::new();
            for mailbox in &mailboxes {
                let items = next_batch(mailbox).await;
                assert!(items.is_deflated());
                pieces.push((items.json.clone(), items.deflated().clone()));
            }
            let (json, piece) = &pieces[0];
            assert!(pieces.iter().all(|p| p == &pieces[0]), "one shared piece");
            let n = serde_json::from_slice::<Value>(json)
                .unwrap()
                .as_array()
                .unwrap()
                .len();
            assert_eq!(n, 300, "one batch of every item");
            let faster = Compressed::default().get(json).clone();
            let harder = Compressed::default().get_for(json, WIDE).clone();
            assert!(
                harder.len() < faster.len(),
                "{} {}",
                harder.len(),
                faster.len()
            );
            let expected = if sharers >= WIDE { &harder } else { &faster };
            assert_eq!(piece, expected, "{sharers} subscribers");
            server.shutdown().await;
        }
    })
    .await;
}

/// A mode `all` mailbox subscribed to vwap through the hub itself, once its `subscribed`
/// answer is queued.
async fn hub_subscriber(
    state: &eddy::server::State,
    subscriber: u64,
    deflate: bool,
) -> std::sync::Arc<eddy::server::mailbox::Mailbox> {
    use eddy::server::hub::{HubControl, Mode, Subscribe};
    use eddy::server::mailbox::{Mailbox, Outgoing};
    let mailbox =
        std::sync::Arc::new(Mailbox::new(1 << 20, Duration::from_secs(10)).compressing(deflate));
    state.hub.control(HubControl::Subscribe(Subscribe {
        subscriber,
        mailbox: std::sync::Arc::clone(&mailbox),
        topic: "vwap".into(),
        keys: None,
        mode: Mode::All,
        snapshot: false,
        from: None,
    }));
    loop {
        mailbox.notify.notified().await;
        let queue = mailbox.take().queue;
        if queue.iter().any(|o| matches!(o, Outgoing::Control(_))) {
            return mailbox;
        }
    }
}

/// The next batch `mailbox` receives.
async fn next_batch(
    mailbox: &eddy::server::mailbox::Mailbox,
) -> std::sync::Arc<eddy::server::mailbox::Items> {
    use eddy::server::mailbox::Outgoing;
    loop {
        mailbox.notify.notified().await;
        let batch = mailbox.take().queue.into_iter().find_map(|o| match o {
            Outgoing::Batch { items, .. } => Some(items),
            _ => None,
        });
        if let Some(items) = batch {
            return items;
        }
    }
}

/// Trades `from..from + n` as one NDJSON frame: symbol `S{i % 3}`, price `100 + i % 7`, size
/// `1 + i % 5`.
fn numbered_trades(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| {
            json!({"symbol": format!("S{}", i % 3), "price": 100 + i % 7, "size": 1 + i % 5})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(volume, trades)` per symbol of the trades `numbered_trades(from, n)` holds, for each
/// `(from, n)` of `frames`: computed here, plainly.
fn volumes(frames: &[(usize, usize)]) -> HashMap<String, (i64, i64)> {
    let mut out: HashMap<String, (i64, i64)> = HashMap::new();
    for &(from, n) in frames {
        for i in from..from + n {
            let e = out.entry(format!("S{}", i % 3)).or_default();
            e.0 += 1 + (i % 5) as i64;
            e.1 += 1;
        }
    }
    out
}

/// Every handled event in, then the `vwap` snapshot's `(volume, trades)` per symbol.
async fn vwap_volumes(server: &Server) -> HashMap<String, (i64, i64)> {
    drain(server).await;
    let mut ws = connect(server, "/subscribe").await;
    send_json(
        &mut ws,
        json!({"op": "subscribe", "topic": "vwap", "snapshot": true}),
    )
    .await;
    loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "snapshot" {
            return m["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    let v = &i["value"];
                    (
                        i["key"].as_str().unwrap().to_owned(),
                        (v["volume"].as_i64().unwrap(), v["trades"].as_i64().unwrap()),
                    )
                })
                .collect();
        }
    }
}

/// Sends `frame` on `ws` and returns its ack.
async fn ack_of(ws: &mut Ws, frame: &str) -> Value {
    ws.send(Message::Text(frame.to_owned().into()))
        .await
        .unwrap();
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_frames_sent_again_are_counted_once() {
    bounded(async {
        let (server, _dir) = start(&[("vwap", &query_file("vwap"))], |_| {}).await;
        let frames: Vec<String> = (0..7).map(|f| numbered_trades(f * 4, 4)).collect();
        let mut ws = connect(&server, "/ingest?stream=trades&ack=true&producer=feed-1").await;
        for (i, f) in frames[..4].iter().enumerate() {
            let ack = ack_of(&mut ws, f).await;
            assert_eq!((&ack["frame"], &ack["accepted"]), (&json!(i), &json!(4)));
            assert!(ack.get("duplicate").is_none(), "{ack}");
        }
        drop(ws);
        // The connection was lost before the producer read the acks of frames 2 and 3: it
        // sends them again, numbered as before, then frames 4 and 5.
        let mut ws = connect(
            &server,
            "/ingest?stream=trades&ack=true&producer=feed-1&frame=2",
        )
        .await;
        for (i, f) in frames.iter().enumerate().take(6).skip(2) {
            let ack = ack_of(&mut ws, f).await;
            assert_eq!(ack["frame"], json!(i), "{ack}");
            if i < 4 {
                assert_eq!(
                    (&ack["duplicate"], &ack["accepted"]),
                    (&json!(true), &json!(0))
                );
            } else {
                assert_eq!(ack["accepted"], json!(4), "{ack}");
                assert!(ack.get("duplicate").is_none(), "{ack}");
            }
        }
        drop(ws);
        // Over HTTP: frame 5 again, then the new frame 6.
        let post = |frame: usize, producer: &'static str, body: String| {
            let path = format!("/ingest?stream=trades&producer={producer}&frame={frame}");
            let server = &server;
            async move { http(server, "POST", &path, None, &body).await }
        };
        let (status, body) = post(5, "feed-1", frames[5].clone()).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (&answer["duplicate"], &answer["accepted"]),
            (&json!(true), &json!(0))
        );
        let (_, body) = post(6, "feed-1", frames[6].clone()).await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["accepted"],
            json!(4)
        );
        // Another producer's frame 0 is its own, even with the same events.
        let (_, body) = post(0, "feed-2", frames[0].clone()).await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["accepted"],
            json!(4)
        );
        // Without a producer id nothing is checked: the same frame counts again.
        let (_, body) = http(&server, "POST", "/ingest?stream=trades", None, &frames[1]).await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["accepted"],
            json!(4)
        );
        let sent: Vec<(usize, usize)> =
            (0..7).map(|f| (f * 4, 4)).chain([(0, 4), (4, 4)]).collect();
        assert_eq!(vwap_volumes(&server).await, volumes(&sent));
        let (_, text) = http(&server, "GET", "/metrics", None, "").await;
        assert_eq!(metric(&text, "eddy_ingest_duplicate_frames_total"), 3.0);
        assert_eq!(metric(&text, "eddy_ingest_producers"), 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_sending_one_producers_frames_at_once_apply_each_once() {
    bounded(async {
        let (server, _dir) = start(&[("vwap", &query_file("vwap"))], |_| {}).await;
        let frames: Vec<String> = (0..40).map(|f| numbered_trades(f * 3, 3)).collect();
        // An old connection not yet timed out and its replacement send the same frames at once.
        let send = |frames: Vec<String>| {
            let server = &server;
            async move {
                let ws = connect(server, "/ingest?stream=trades&ack=true&producer=p").await;
                let (mut tx, mut rx) = ws.split();
                let n = frames.len();
                let sender = tokio::spawn(async move {
                    for f in frames {
                        tx.send(Message::Text(f.into())).await.unwrap();
                    }
                    tx
                });
                let mut added = Vec::new();
                for i in 0..n {
                    let ack: Value = loop {
                        let m = rx.next().await.unwrap().unwrap();
                        if let Message::Text(t) = m {
                            break serde_json::from_str(&t).unwrap();
                        }
                    };
                    assert_eq!(ack["frame"], json!(i), "{ack}");
                    let fresh = ack.get("duplicate").is_none();
                    assert_eq!(ack["accepted"], json!(if fresh { 3 } else { 0 }), "{ack}");
                    added.push(fresh);
                }
                drop(sender.await.unwrap());
                added
            }
        };
        let (a, b) = tokio::join!(send(frames.clone()), send(frames.clone()));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(a ^ b, "frame {i}: taken by a: {a}, by b: {b}");
        }
        let sent: Vec<(usize, usize)> = (0..40).map(|f| (f * 3, 3)).collect();
        assert_eq!(vwap_volumes(&server).await, volumes(&sent));
    })
    .await;
}

#[tokio::test]
async fn a_bad_producer_id_or_frame_number_is_refused_with_why() {
    bounded(async {
        let (server, _dir) = start(&[("vwap", &query_file("vwap"))], |_| {}).await;
        for (query, why) in [
            ("producer=a/b", "producer=\\\"a/b\\\": 1 to 64 characters"),
            ("producer=", "producer=\\\"\\\""),
            ("frame=3", "frame= needs producer="),
            (
                "producer=p&frame=-1",
                "frame=\\\"-1\\\": expected a frame number",
            ),
            ("producer=p&frame=x", "frame=\\\"x\\\""),
        ] {
            let path = format!("/ingest?stream=trades&{query}");
            let (status, body) = http(&server, "POST", &path, None, "{}").await;
            assert_eq!(status, 400, "{query}: {body}");
            assert!(body.contains(why), "{query}: {body}");
            assert_eq!(upgrade_status(&server, &path, "").await, 400, "{query}");
        }
        // Nothing was taken from any of them.
        let (_, text) = http(&server, "GET", "/metrics", None, "").await;
        assert_eq!(metric(&text, "eddy_ingest_producers"), 0.0);
        // The subscribe endpoint does not look at them.
        assert_eq!(
            upgrade_status(&server, "/subscribe?producer=a/b", "").await,
            101
        );
    })
    .await;
}

/// A producer the server stops reading from (its shard queue full behind a slow query) is not
/// closed for "no pong" though the pings go unanswered for many intervals: its pongs wait
/// unread in the socket, which is the server's doing, not the producer's silence. Every frame
/// is acknowledged and every event handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_held_back_by_a_full_shard_queue_is_not_closed_for_no_pong() {
    bounded(async {
        let slow = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
                    fn on_event(ev) { let x = 0; for i in 0..10000 { x += i; } this.n = (this.n ?? 0) + 1; emit(this.n); }";
        let (server, _dir) = start(&[("slow", slow)], |c| {
            c.shard_queue = 1;
            c.ping_interval = Duration::from_millis(50);
        })
        .await;
        let frames: Vec<String> = (0..40).map(|f| numbered_trades(f * 5, 5)).collect();
        let ws = connect(&server, "/ingest?stream=trades&ack=true").await;
        let (mut tx, mut rx) = ws.split();
        let sender = tokio::spawn(async move {
            for f in frames {
                tx.send(Message::Text(f.into())).await.unwrap();
            }
            tx
        });
        let started = std::time::Instant::now();
        let mut acks = 0;
        while acks < 40 {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    let ack: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(ack["accepted"], json!(5), "{ack}");
                    acks += 1;
                }
                // Pings, answered by the client library as it reads.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("after {acks} acks: {other:?}"),
            }
        }
        // The server held the producer back for many ping intervals (two unanswered would have
        // closed it before).
        assert!(
            started.elapsed() > Duration::from_millis(200),
            "the feed was not held back: {:?}",
            started.elapsed()
        );
        let _ = sender.await.unwrap().close().await;
        let (_, text) = http(&server, "GET", "/metrics", None, "").await;
        assert!(text.contains("eddy_events_ingested_total{stream=\"trades\"} 200"), "{text}");
    })
    .await;
}
