//! What the end-to-end tests share: a server on 127.0.0.1 port 0 with given queries, a
//! WebSocket client (tokio-tungstenite) that produces with acks and collects batches, plain
//! HTTP over TCP, `eddy run` of the same queries for comparison, and a time bound.
#![allow(dead_code)]

pub mod nats;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use eddy::offline::{self, RunOptions};
use eddy::server::{Config, Server};
use eddy::{Limits, QueryDef};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const TOKEN: &str = "test-admin-token";
pub const LIMIT: Duration = Duration::from_secs(60);

pub fn query_file(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("queries/{name}.rhai")),
    )
    .unwrap()
}

pub fn sample(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(file),
    )
    .unwrap()
}

/// A server on 127.0.0.1:0 with `queries` (name, script) in its queries folder.
pub async fn start(
    queries: &[(&str, &str)],
    tune: impl FnOnce(&mut Config),
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, script) in queries {
        std::fs::write(dir.path().join(format!("{name}.rhai")), script).unwrap();
    }
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        queries: dir.path().to_owned(),
        admin_token: Some(TOKEN.into()),
        ..Config::default()
    };
    tune(&mut config);
    (Server::start(config).await.unwrap(), dir)
}

pub async fn connect(server: &Server, path: &str) -> Ws {
    let url = format!("ws://{}{path}", server.addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text message as JSON (pings and pongs skipped).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .expect("the connection is open")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(b) => return serde_json::from_slice(&b).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

pub async fn subscribe(server: &Server, request: Value) -> Ws {
    let mut ws = connect(server, "/subscribe").await;
    let topic = request["topic"].clone();
    send_json(&mut ws, request).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (&reply["type"], &reply["topic"]),
        (&json!("subscribed"), &topic),
        "{reply}"
    );
    assert!(reply["pos"].is_string(), "{reply}");
    ws
}

/// Sends NDJSON `input` in frames of `per_frame` lines with `ack=true`, pipelined; returns the
/// acks' accepted total.
pub async fn produce(server: &Server, stream: &str, input: &[u8], per_frame: usize) -> u64 {
    let ws = connect(server, &format!("/ingest?stream={stream}&ack=true")).await;
    produce_on(ws, input.to_vec(), per_frame).await
}

/// [`produce`] over a producer connection already open (with `ack=true`).
pub async fn produce_on(ws: Ws, input: Vec<u8>, per_frame: usize) -> u64 {
    let (mut tx, mut rx) = ws.split();
    let lines: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let frames: Vec<Vec<u8>> = lines.chunks(per_frame).map(|c| c.join(&b'\n')).collect();
    let n = frames.len();
    let sender = tokio::spawn(async move {
        for f in frames {
            tx.send(Message::Text(String::from_utf8(f).unwrap().into()))
                .await
                .unwrap();
        }
        tx
    });
    let mut accepted = 0;
    for i in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(30), rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let ack: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["frame"], json!(i));
        accepted += ack["accepted"].as_u64().unwrap();
    }
    let _ = sender.await.unwrap().close().await;
    accepted
}

/// Collects batch items of `topic` until `n` have arrived; checks seq starts at 0 and has no
/// gaps.
pub async fn collect(ws: &mut Ws, topic: &str, n: usize) -> Vec<Value> {
    collect_from(ws, topic, n, 0).await
}

/// As [`collect`], for a subscription whose next batch has seq `seq`.
pub async fn collect_from(ws: &mut Ws, topic: &str, n: usize, seq: u64) -> Vec<Value> {
    let items = collect_at_least(ws, topic, n, seq).await;
    assert_eq!(items.len(), n);
    items
}

/// Whole batches until at least `n` items have arrived, the first batch having seq `seq`.
pub async fn collect_at_least(ws: &mut Ws, topic: &str, n: usize, mut seq: u64) -> Vec<Value> {
    let mut items = Vec::new();
    while items.len() < n {
        let msg = next_json(ws).await;
        assert_eq!(msg["type"], "batch", "{msg}");
        assert_eq!(msg["topic"], topic);
        assert_eq!(msg["seq"], json!(seq));
        seq += 1;
        items.extend(msg["items"].as_array().unwrap().iter().cloned());
    }
    items
}

/// `eddy run` of the shipped `query` over `input`: items of topic `query`.
pub fn offline_items(query: &str, input: Vec<u8>) -> Vec<Value> {
    offline_items_of(query, &query_file(query), input)
}

/// `eddy run` of `script` (a query named for the first part of `topic`) over `input`: items of
/// `topic`, as `{"key","value"}`.
pub fn offline_items_of(topic: &str, script: &str, input: Vec<u8>) -> Vec<Value> {
    let limits = Limits::default();
    let name = topic.split('.').next().unwrap();
    let def = QueryDef::compile(name, script, &limits).unwrap();
    let mut out = Vec::new();
    offline::run(
        vec![def],
        input,
        &limits,
        &RunOptions::default(),
        &mut out,
        &mut Vec::new(),
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["topic"] == topic)
        .map(|v| json!({"key": v["key"], "value": v["value"]}))
        .collect()
}

pub fn by_key(items: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for item in items {
        map.entry(item["key"].to_string())
            .or_default()
            .push(item["value"].clone());
    }
    map
}

/// Waits until every event queued so far has been handled by its shard and its items are in the
/// hub (acks only mean "queued"), so that a snapshot taken next holds them.
pub async fn drain(server: &Server) {
    let state = &server.state;
    state
        .pipeline
        .ask_all(|done| eddy::server::pipeline::ShardMsg::Flush { done })
        .await
        .unwrap();
}

/// Plain HTTP/1.1 request; returns status and body.
pub async fn http(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    http_at(&server.addr.to_string(), method, path, token, body).await
}

/// [`http`] to a server at `addr` (`IP:PORT`), e.g. one started with [`spawn_serve`].
pub async fn http_at(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The value of the sample `name` (with its labels) in a Prometheus text, 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// `/metrics` once `ready` holds of it (shards publish their counters as they go), within 20 s.
pub async fn metrics_when(server: &Server, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http(server, "GET", "/metrics", None, "").await;
        if ready(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test finished in time");
}

/// Asserts that `ws` receives nothing for `millis` ms.
pub async fn assert_silent(ws: &mut Ws, millis: u64, what: &str) {
    let next = tokio::time::timeout(Duration::from_millis(millis), ws.next()).await;
    assert!(next.is_err(), "{what}: {next:?}");
}

/// `eddy serve --listen 127.0.0.1:0 --shards 2 --queries DIR` and `extra` flags, as a process
/// (killed when dropped); returns it, the lines of its stdout after the first, and the address
/// that first line announced.
pub async fn spawn_serve(
    queries: &Path,
    extra: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    spawn_serve_on("127.0.0.1:0", queries, extra).await
}

/// [`spawn_serve`] listening on `listen` (e.g. the address of a server that was stopped).
pub async fn spawn_serve_on(
    listen: &str,
    queries: &Path,
    extra: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    spawn_serve_full(listen, queries, extra, None).await
}

/// [`spawn_serve`] with the soft and hard limit on open files set to `nofile` in the child.
pub async fn spawn_serve_with_files(
    queries: &Path,
    extra: &[&str],
    nofile: Option<u64>,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    spawn_serve_full("127.0.0.1:0", queries, extra, nofile).await
}

async fn spawn_serve_full(
    listen: &str,
    queries: &Path,
    extra: &[&str],
    nofile: Option<u64>,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"));
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command
        .args(["serve", "--listen", listen, "--shards", "2", "--queries"])
        .arg(queries)
        .args(extra)
        // In memory unless the test gives a data directory.
        .args((!extra.contains(&"--data-dir")).then_some("--ephemeral"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let listening = lines.next_line().await.unwrap().unwrap();
    let addr = listening
        .strip_prefix("eddy listening on http://")
        .unwrap()
        .to_owned();
    (child, lines, addr)
}

/// A figure of `/proc/PID/status` in KiB: `VmRSS` (resident now) or `VmHWM` (peak resident).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
