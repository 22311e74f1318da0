//! Resuming a subscription from a topic position (`"from"` in a subscribe request), on the real
//! server on 127.0.0.1 port 0 with a WebSocket client: what comes after a position, exactly;
//! key filters; and every way a position can be gone, each answered with `gone` (and a snapshot
//! when asked for) or an error, the connection going on. Restarts (graceful and SIGKILL) are in
//! `tests/durability.rs`.

use std::collections::HashMap;

use serde_json::{json, Value};

mod support;

use support::*;

/// Batches of `topic` until `n` items have come: each batch's items and its `pos`.
async fn batches(ws: &mut Ws, topic: &str, n: usize) -> Vec<(Vec<Value>, String)> {
    let mut out = Vec::new();
    let mut got = 0;
    while got < n {
        let msg = next_json(ws).await;
        assert_eq!(
            (msg["type"].as_str(), msg["topic"].as_str()),
            (Some("batch"), Some(topic)),
            "{msg}"
        );
        let items = msg["items"].as_array().unwrap().clone();
        got += items.len();
        out.push((
            items,
            msg["pos"].as_str().expect("a batch has a pos").to_owned(),
        ));
    }
    assert_eq!(got, n, "no more items than sent");
    out
}

/// Half of the trades sample, and the other half.
fn halves() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let input = sample("trades.ndjson");
    let lines: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let join = |ls: &[&[u8]]| {
        ls.iter()
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect::<Vec<u8>>()
    };
    let half = lines.len() / 2;
    (join(&lines[..half]), join(&lines[half..]), input)
}

fn count(batches: &[(Vec<Value>, String)]) -> usize {
    batches.iter().map(|(items, _)| items.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscription_gets_exactly_what_came_after_its_position() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let (first, second, all) = halves();
        let mut a = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let n1 = produce(&server, "trades", &first, 50).await as usize;
        let seen = batches(&mut a, "vwap", n1).await;
        drop(a);
        // While nobody listens, the rest.
        let n2 = produce(&server, "trades", &second, 50).await as usize;
        assert_eq!(n1 + n2, 4000);
        drain(&server).await;

        // From the last position seen: the second half, exactly, then live items.
        let last = &seen.last().unwrap().1;
        let mut b = connect(&server, "/subscribe").await;
        send_json(
            &mut b,
            json!({"op": "subscribe", "topic": "vwap", "from": last}),
        )
        .await;
        let answer = next_json(&mut b).await;
        assert_eq!(
            (answer["type"].as_str(), answer["replayed"].as_u64()),
            (Some("subscribed"), Some(n2 as u64)),
            "{answer}"
        );
        let replayed = batches(&mut b, "vwap", n2).await;
        let mut got: Vec<Value> = seen.iter().flat_map(|(i, _)| i.clone()).collect();
        got.extend(replayed.iter().flat_map(|(i, _)| i.clone()));
        assert_eq!(
            by_key(&got),
            by_key(&offline_items("vwap", all.clone())),
            "per key: every item once, in order"
        );
        // The replay's seq starts at 0 for this subscriber, as any subscription's does.
        assert_silent(&mut b, 200, "nothing after the replay").await;
        let extra = b"{\"symbol\":\"AAPL\",\"price\":1.0,\"size\":1,\"ts\":1}\n";
        assert_eq!(produce(&server, "trades", extra, 1).await, 1);
        let live = batches(&mut b, "vwap", 1).await;
        assert_eq!(live[0].0[0]["key"], "AAPL");

        // From a position in the middle of the first half: the rest of it, then the second
        // half, then the live item.
        let mid = seen.len() / 2;
        let mut c = connect(&server, "/subscribe").await;
        send_json(
            &mut c,
            json!({"op": "subscribe", "topic": "vwap", "from": seen[mid].1}),
        )
        .await;
        let answer = next_json(&mut c).await;
        let rest: usize = count(&seen[mid + 1..]);
        assert_eq!(
            answer["replayed"].as_u64(),
            Some((rest + n2 + 1) as u64),
            "{answer}"
        );
        let again = batches(&mut c, "vwap", rest + n2 + 1).await;
        let mut want: Vec<Value> = seen[mid + 1..]
            .iter()
            .flat_map(|(i, _)| i.clone())
            .collect();
        want.extend(replayed.iter().flat_map(|(i, _)| i.clone()));
        want.extend(live[0].0.clone());
        let again: Vec<Value> = again.iter().flat_map(|(i, _)| i.clone()).collect();
        assert_eq!(by_key(&again), by_key(&want));
        // The last position replayed is the topic's position now.
        let mut d = connect(&server, "/subscribe").await;
        send_json(
            &mut d,
            json!({"op": "subscribe", "topic": "vwap", "from": live[0].1}),
        )
        .await;
        assert_eq!(next_json(&mut d).await["replayed"], 0);
        assert_silent(&mut d, 200, "nothing to replay at the head").await;

        let metrics =
            metrics_when(&server, |m| m.contains("eddy_replay_bytes{topic=\"vwap\"}")).await;
        assert!(
            metric(&metrics, "eddy_replay_bytes{topic=\"vwap\"}") > 0.0,
            "{metrics}"
        );
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_keys_replays_only_those_keys() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let (first, second, all) = halves();
        let mut a = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let n1 = produce(&server, "trades", &first, 100).await as usize;
        let seen = batches(&mut a, "vwap", n1).await;
        produce(&server, "trades", &second, 100).await;
        drain(&server).await;
        let mut b = connect(&server, "/subscribe").await;
        send_json(&mut b, json!({"op": "subscribe", "topic": "vwap", "keys": ["AAPL", "MSFT"], "from": seen.last().unwrap().1})).await;
        let answer = next_json(&mut b).await;
        // The items of the second half for AAPL and MSFT: per key, the last as many of `eddy
        // run`'s items over everything as the second half has trades of that key.
        let everything = by_key(&offline_items("vwap", all));
        let mut want: HashMap<String, Vec<Value>> = HashMap::new();
        for key in ["AAPL", "MSFT"] {
            let trades = second
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .filter(|l| serde_json::from_slice::<Value>(l).unwrap()["symbol"] == key)
                .count();
            assert!(trades > 0, "{key}");
            let history = &everything[&format!("\"{key}\"")];
            want.insert(format!("\"{key}\""), history[history.len() - trades..].to_vec());
        }
        let n: usize = want.values().map(Vec::len).sum();
        assert_eq!(answer["replayed"].as_u64(), Some(n as u64), "{answer}");
        let got: Vec<Value> = batches(&mut b, "vwap", n).await.into_iter().flat_map(|(i, _)| i).collect();
        assert_eq!(by_key(&got), want);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_that_are_gone_are_answered_and_a_snapshot_follows_when_asked() {
    bounded(async {
        let vwap = query_file("vwap");
        // Room for a few batches only.
        let (server, _dir) = start(&[("vwap", &vwap)], |c| c.replay_bytes = 4096).await;
        let mut a = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let input = sample("trades.ndjson");
        let start = {
            let mut s = connect(&server, "/subscribe").await;
            send_json(&mut s, json!({"op": "subscribe", "topic": "vwap"})).await;
            next_json(&mut s).await["pos"].as_str().unwrap().to_owned()
        };
        produce(&server, "trades", &input, 100).await;
        let seen = batches(&mut a, "vwap", 4000).await;
        let head = seen.last().unwrap().1.clone();
        let want = by_key(&offline_items("vwap", input));

        // Too old: `gone`, then the snapshot asked for, with the position it stands at.
        let mut b = connect(&server, "/subscribe").await;
        send_json(
            &mut b,
            json!({"op": "subscribe", "topic": "vwap", "from": start, "snapshot": true}),
        )
        .await;
        let answer = next_json(&mut b).await;
        assert_eq!(answer["type"], "subscribed");
        assert!(answer.get("replayed").is_none(), "{answer}");
        let gone = next_json(&mut b).await;
        assert_eq!(
            (
                gone["type"].as_str(),
                gone["from"].as_str(),
                gone["pos"].as_str()
            ),
            (Some("gone"), Some(start.as_str()), Some(head.as_str())),
            "{gone}"
        );
        assert!(
            gone["reason"].as_str().unwrap().contains("replay_bytes"),
            "{gone}"
        );
        let snapshot = next_json(&mut b).await;
        assert_eq!(
            (snapshot["type"].as_str(), snapshot["pos"].as_str()),
            (Some("snapshot"), Some(head.as_str())),
            "{snapshot}"
        );
        let items = snapshot["items"].as_array().unwrap();
        assert_eq!(items.len(), want.len());
        for item in items {
            assert_eq!(
                &item["value"],
                want[&item["key"].to_string()].last().unwrap()
            );
        }

        // Another run of the topic, or ahead of it: `gone`, and no snapshot unless asked.
        let epoch: u64 = head.split(':').next().unwrap().parse().unwrap();
        let counts = head.split(':').nth(1).unwrap();
        let ahead = format!(
            "{epoch}:{}",
            counts
                .split(',')
                .map(|c| (c.parse::<u64>().unwrap() + 5).to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for (from, why) in [
            (format!("{}:{counts}", epoch - 1), "another run"),
            (format!("{epoch}:0"), "another run"),
            (ahead, "ahead"),
        ] {
            let mut c = connect(&server, "/subscribe").await;
            send_json(
                &mut c,
                json!({"op": "subscribe", "topic": "vwap", "from": from}),
            )
            .await;
            assert_eq!(next_json(&mut c).await["type"], "subscribed");
            let gone = next_json(&mut c).await;
            assert_eq!(gone["type"], "gone", "{from}: {gone}");
            assert!(
                gone["reason"].as_str().unwrap().contains(why),
                "{from}: {gone}"
            );
            assert_silent(&mut c, 100, "no snapshot unless asked").await;
        }

        // Not a position, or mode `latest`: an error, and the connection goes on.
        let mut d = connect(&server, "/subscribe").await;
        for (request, says) in [
            (
                json!({"op": "subscribe", "topic": "vwap", "from": "yesterday"}),
                "bad position",
            ),
            (
                json!({"op": "subscribe", "topic": "vwap", "from": 7}),
                "bad request",
            ),
            (
                json!({"op": "subscribe", "topic": "vwap", "mode": "latest", "from": head}),
                "mode \"latest\"",
            ),
        ] {
            send_json(&mut d, request.clone()).await;
            let error = next_json(&mut d).await;
            assert_eq!(error["type"], "error", "{request}: {error}");
            assert!(
                error["error"].as_str().unwrap().contains(says),
                "{request}: {error}"
            );
        }
        send_json(
            &mut d,
            json!({"op": "subscribe", "topic": "vwap", "from": head}),
        )
        .await;
        assert_eq!(next_json(&mut d).await["replayed"], 0);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_deployed_again_starts_a_new_run_of_its_topic() {
    bounded(async {
        let vwap = query_file("vwap");
        let (server, _dir) = start(&[("vwap", &vwap)], |_| {}).await;
        let mut a = subscribe(&server, json!({"op": "subscribe", "topic": "vwap"})).await;
        let one = b"{\"symbol\":\"AAPL\",\"price\":1.0,\"size\":1,\"ts\":1}\n";
        produce(&server, "trades", one, 1).await;
        let pos = batches(&mut a, "vwap", 1).await[0].1.clone();
        let (status, _) = http(&server, "DELETE", "/queries/vwap", Some(TOKEN), "").await;
        assert_eq!(status, 204);
        let (status, _) = http(&server, "PUT", "/queries/vwap", Some(TOKEN), &vwap).await;
        assert_eq!(status, 201);
        produce(&server, "trades", one, 1).await;
        drain(&server).await;
        let mut b = connect(&server, "/subscribe").await;
        send_json(
            &mut b,
            json!({"op": "subscribe", "topic": "vwap", "from": pos}),
        )
        .await;
        assert_eq!(next_json(&mut b).await["type"], "subscribed");
        let gone = next_json(&mut b).await;
        assert_eq!(gone["type"], "gone", "{gone}");
        assert!(
            gone["reason"].as_str().unwrap().contains("another run"),
            "{gone}"
        );
        server.shutdown().await;
    })
    .await;
}
