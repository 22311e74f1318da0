//! The load tools against a server that dies: `eddy feed` and `eddy probe` run as processes
//! against a spawned `eddy serve`, which is stopped (SIGTERM), killed (SIGKILL), frozen
//! (SIGSTOP: a silent server) or never there, before the connection, during the WebSocket
//! handshake, or while events flow. Each tool must print its report and exit non-zero within
//! 2 s of the server going away, or, with `--reconnect`, carry on once a new server listens on
//! the same port. The counts are checked against each other: what the feed saw acknowledged is
//! what the probe received and what vwap counted.

mod support;

use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The bound the issue sets: a tool notices and reports within 2 s of its server going away.
const NOTICE: Duration = Duration::from_secs(2);

fn queries() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vwap.rhai"), query_file("vwap")).unwrap();
    dir
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("the server is running").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `eddy ARGS` with stdout piped (killed when dropped).
fn tool(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn feed(addr: &str, extra: &[&str]) -> Child {
    let url = format!("ws://{addr}");
    let mut args = vec!["feed", &url, "--batch", "10", "--json"];
    args.extend_from_slice(extra);
    tool(&args)
}

fn probe(addr: &str, extra: &[&str]) -> Child {
    let url = format!("ws://{addr}");
    let mut args = vec![
        "probe",
        &url,
        "--topic",
        "vwap",
        "--count-field",
        "trades",
        "--json",
    ];
    args.extend_from_slice(extra);
    tool(&args)
}

/// Waits (at most `limit`) for a tool to end; its status, its report (the last line of its
/// stdout) and its stderr.
async fn finish(child: Child, limit: Duration) -> (ExitStatus, Value, String) {
    let (status, mut lines, err) = finish_lines(child, limit).await;
    let last = lines
        .pop()
        .unwrap_or_else(|| panic!("no report; stderr: {err}"));
    (status, last, err)
}

/// As [`finish`], with every line of its stdout as JSON.
async fn finish_lines(mut child: Child, limit: Duration) -> (ExitStatus, Vec<Value>, String) {
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the tool ended within {limit:?}"))
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (status, lines, err)
}

/// `/metrics` of the server at `addr`: the sample `name`.
async fn metric_of(addr: &str, name: &str) -> f64 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    metric(&text, name)
}

/// Waits until the kernel holds `n` established connections to `addr` (`host:port`), read from
/// `/proc/net/tcp`: a stopped server's kernel still completes handshakes into its backlog.
async fn established(addr: &str, n: usize) {
    let port = addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let local = format!(":{port:04X}");
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let count = table
            .lines()
            .skip(1)
            .filter(|row| {
                let cols: Vec<&str> = row.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&local) && cols[3] == "01"
            })
            .count();
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the server at `addr` has ingested at least `n` events.
async fn ingested(addr: &str, n: f64) {
    let name = "eddy_events_ingested_total{stream=\"trades\"}";
    while metric_of(addr, name).await < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_both_tools_report_and_fail_at_once() {
    bounded(async {
        // A port nothing listens on: bind one, then free it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let started = Instant::now();
        let f = feed(&addr, &["--duration", "5s"]);
        let p = probe(&addr, &["--duration", "5s"]);
        for (status, report, err) in [finish(f, NOTICE).await, finish(p, NOTICE).await] {
            assert!(!status.success());
            assert_eq!(report["connect_failures"], 1, "{report}");
            assert!(report["error"].as_str().unwrap().contains("cannot connect"));
            assert!(err.contains("stopped: cannot connect"), "{err}");
        }
        assert!(started.elapsed() < NOTICE);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_during_the_handshake_is_noticed() {
    bounded(async {
        let dir = queries();
        // Frozen, the server's kernel still accepts the TCP connection, but nobody answers the
        // upgrade: the tools are in the handshake.
        let (frozen, _lines, addr) = spawn_serve(dir.path(), &[]).await;
        signal(&frozen, "-STOP");
        let f = feed(&addr, &["--duration", "5s"]);
        let p = probe(&addr, &["--duration", "5s"]);
        let started = Instant::now();
        for (status, report, _) in [finish(f, NOTICE).await, finish(p, NOTICE).await] {
            assert!(!status.success());
            assert_eq!(report["connect_failures"], 1, "{report}");
            assert!(
                report["error"].as_str().unwrap().contains("no WebSocket"),
                "{report}"
            );
        }
        assert!(started.elapsed() < NOTICE);

        // Killed while they wait for its answer to the upgrade.
        let f = feed(&addr, &["--duration", "5s", "--timeout", "10s"]);
        let p = probe(&addr, &["--duration", "5s", "--timeout", "10s"]);
        // Both are connected (and so in the handshake, not still connecting) before the kill.
        established(&addr, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        signal(&frozen, "-KILL");
        let started = Instant::now();
        for (status, report, _) in [finish(f, NOTICE).await, finish(p, NOTICE).await] {
            assert!(!status.success());
            assert_eq!(report["connect_failures"], 1, "{report}");
            assert!(
                report["error"].as_str().unwrap().contains("handshake"),
                "{report}"
            );
        }
        assert!(started.elapsed() < NOTICE);
    })
    .await;
}

/// A feed and a probe on a running server, until `ending` (a signal) hits it mid-stream.
async fn mid_stream(ending: &str) {
    let dir = queries();
    let (mut server, _lines, addr) = spawn_serve(dir.path(), &[]).await;
    let p = probe(&addr, &["--duration", "30s"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let f = feed(&addr, &["--rate", "2000", "--duration", "30s"]);
    ingested(&addr, 1000.0).await;
    signal(&server, ending);
    if ending == "-STOP" {
        // Silent from now on.
    } else {
        tokio::time::timeout(Duration::from_secs(20), server.wait())
            .await
            .expect("the server stops")
            .unwrap();
    }
    let gone = Instant::now();
    let (f_status, fed, _) = finish(f, NOTICE).await;
    let (p_status, probed, _) = finish(p, NOTICE).await;
    assert!(gone.elapsed() < NOTICE);
    assert!(!f_status.success() && !p_status.success());
    let accepted = fed["accepted"].as_u64().unwrap();
    assert!(accepted >= 1000, "{fed}");
    assert_eq!(fed["events"], fed["frames"].as_u64().unwrap() * 10);
    // Sent = acknowledged + in doubt.
    assert_eq!(
        fed["events"].as_u64().unwrap(),
        accepted + fed["unacked"].as_u64().unwrap()
    );
    assert_eq!(
        (fed["lost"].as_u64(), fed["ack_gaps"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(probed["lost"], 1);
    assert_eq!(
        (probed["seq_gaps"].as_u64(), probed["count_gaps"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(probed["count_duplicates"], 0);
    match ending {
        // A stopping server hands every acknowledged event's result to its subscribers
        // first: vwap emits one item per trade.
        "-TERM" => {
            assert!(fed["error"].as_str().unwrap().contains("closed"), "{fed}");
            assert!(
                probed["error"].as_str().unwrap().contains("1001"),
                "{probed}"
            );
            assert!(
                probed["items"].as_u64().unwrap() >= accepted,
                "{probed} {fed}"
            );
            assert!(probed["counted"].as_u64().unwrap() >= accepted);
            assert_eq!(probed["counted"], probed["items"]);
        }
        "-STOP" => {
            for report in [&fed, &probed] {
                assert!(
                    report["error"].as_str().unwrap().contains("nothing for"),
                    "{report}"
                );
            }
            signal(&server, "-KILL");
        }
        _ => {
            for report in [&fed, &probed] {
                assert!(report["error"].is_string(), "{report}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_stream_delivers_what_it_acked_and_the_tools_report() {
    bounded(mid_stream("-TERM")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_stream_is_noticed() {
    bounded(mid_stream("-KILL")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_within_the_timeout() {
    bounded(mid_stream("-STOP")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reconnect_both_tools_carry_on_on_a_new_server() {
    bounded(async {
        let dir = queries();
        let (first, _lines, addr) = spawn_serve(dir.path(), &[]).await;
        let p = probe(&addr, &["--duration", "60s", "--reconnect"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let f = feed(
            &addr,
            &["--rate", "2000", "--duration", "6s", "--reconnect"],
        );
        ingested(&addr, 1000.0).await;
        // Stopped (not killed: without durability, a killed server loses what it acked and
        // has not delivered yet), so the counts below add up exactly. (A killed durable
        // server: the next test.)
        signal(&first, "-TERM");
        let mut first = first;
        first.wait().await.unwrap();
        // Down for a while: both keep trying.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (second, _lines2, again) = spawn_serve_on(&addr, dir.path(), &[]).await;
        assert_eq!(again, addr);
        ingested(&addr, 1000.0).await;
        let (status, fed, err) = finish(f, Duration::from_secs(20)).await;
        assert!(status.success(), "{fed} {err}");
        assert!(fed["error"].is_null());
        assert_eq!(fed["lost"], 1, "{fed}");
        assert_eq!(fed["reconnects"], 1);
        assert!(fed["connect_failures"].as_u64().unwrap() >= 1);
        let (accepted, unacked) = (
            fed["accepted"].as_u64().unwrap(),
            fed["unacked"].as_u64().unwrap(),
        );
        assert_eq!(fed["events"].as_u64().unwrap(), accepted + unacked);
        // Everything the new server acknowledged reaches the probe: stop the server, which
        // delivers it, then the probe, which reports.
        signal(&second, "-TERM");
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(&p, "-TERM");
        let (status, probed, err) = finish(p, Duration::from_secs(20)).await;
        assert!(status.success(), "{probed} {err}");
        assert!(probed["reconnects"].as_u64().unwrap() >= 1, "{probed}");
        assert!(probed["lost"].as_u64().unwrap() >= 1);
        assert_eq!(probed["seq_gaps"], 0);
        assert_eq!(probed["count_gaps"], 0);
        assert_eq!(probed["count_duplicates"], 0);
        // vwap's count per key, summed over both servers, is every trade they handled: at
        // least what was acknowledged, at most what was sent.
        let counted = probed["counted"].as_u64().unwrap();
        assert!(
            counted >= accepted && counted <= accepted + unacked,
            "{probed} {fed}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_durable_server_the_probe_resumes_across_a_kill_with_nothing_lost_or_twice() {
    bounded(async {
        let dir = queries();
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap().to_owned();
        let durable = [
            "--data-dir",
            data_dir.as_str(),
            "--fsync",
            "always",
            "--checkpoint-interval",
            "300ms",
        ];
        let (first, _lines, addr) = spawn_serve(dir.path(), &durable).await;
        let p = probe(&addr, &["--duration", "60s", "--reconnect"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let f = feed(
            &addr,
            &["--rate", "2000", "--duration", "5s", "--reconnect"],
        );
        ingested(&addr, 2000.0).await;
        // Killed: what it acknowledged is in its log, and the items the probe got before the
        // kill have positions the replay gives again.
        signal(&first, "-KILL");
        let mut first = first;
        first.wait().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (second, _lines2, again) = spawn_serve_on(&addr, dir.path(), &durable).await;
        assert_eq!(again, addr);
        let (status, fed, err) = finish(f, Duration::from_secs(30)).await;
        assert!(status.success(), "{fed} {err}");
        assert_eq!(fed["lost"], 1, "{fed}");
        let (accepted, unacked) = (
            fed["accepted"].as_u64().unwrap(),
            fed["unacked"].as_u64().unwrap(),
        );
        signal(&second, "-TERM");
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(&p, "-TERM");
        let (status, probed, err) = finish(p, Duration::from_secs(20)).await;
        assert!(status.success(), "{probed} {err}");
        // One stream across the kill: resumed, nothing gone, every key's count rising by one
        // through the reconnect.
        assert!(probed["resumed"].as_u64().unwrap() >= 1, "{probed}");
        assert_eq!(probed["gone"], 0, "{probed}");
        assert_eq!(probed["dropped"], 0, "{probed}");
        assert_eq!(probed["count_gaps"], 0, "{probed}");
        assert_eq!(probed["count_duplicates"], 0, "{probed}");
        // Every acknowledged trade counted once; those sent but not acknowledged (in doubt at
        // the kill) at most once.
        let counted = probed["counted"].as_u64().unwrap();
        assert!(
            counted >= accepted && counted <= accepted + unacked,
            "{probed} {fed}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_in_latest_mode_counts_every_trade_and_reports_intervals() {
    bounded(async {
        let dir = queries();
        let (server, _lines, addr) = spawn_serve(dir.path(), &[]).await;
        let p = probe(
            &addr,
            &[
                "--mode",
                "latest",
                "--interval",
                "500ms",
                "--duration",
                "60s",
            ],
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let f = feed(
            &addr,
            &["--rate", "2000", "--duration", "2s", "--keys", "5"],
        );
        let (status, fed, err) = finish(f, Duration::from_secs(20)).await;
        assert!(status.success(), "{fed} {err}");
        let accepted = fed["accepted"].as_u64().unwrap();
        assert_eq!(accepted, fed["events"].as_u64().unwrap());
        // Stopping the server hands every result to the probe first; then the probe reports.
        signal(&server, "-TERM");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        signal(&p, "-TERM");
        let (status, mut lines, err) = finish_lines(p, Duration::from_secs(20)).await;
        assert!(!status.success(), "the server closed under it: {err}");
        let report = lines.pop().unwrap();
        // Mode latest coalesces a key's values, so fewer items than trades; the newest value of
        // each key still carries its count of trades, so the counts add up to every trade.
        let items = report["items"].as_u64().unwrap();
        assert!(items > 0 && items <= accepted, "{report}");
        assert_eq!(report["counted"].as_u64(), Some(accepted), "{report}");
        assert_eq!(report["count_duplicates"], 0);
        assert_eq!(report["count_gaps"], 0, "not counted in mode latest");
        // One line per half second, whose items add up to the report's.
        assert!(lines.len() >= 4, "{lines:?}");
        let mut sum = 0;
        for line in &lines {
            let one = &line["interval"];
            sum += one["items"].as_u64().unwrap();
            assert!(one["p50_us"].as_u64() <= one["p99_us"].as_u64(), "{one}");
        }
        assert!(sum > 0 && sum <= items, "{sum} of {items}");
    })
    .await;
}
