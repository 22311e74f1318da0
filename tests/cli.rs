//! End-to-end tests of the `eddy` binary: `run` over files and stdin, rejected events, broken
//! and hostile queries, bad paths, `check` and `generate`. Expected values are computed here
//! by hand, not copied from the binary's output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Hand-written trades: two symbols, integer sizes, prices that give exact VWAPs.
const TRADES: &str = r#"{"symbol":"AAPL","price":100.0,"size":10}
{"symbol":"MSFT","price":200.0,"size":5}
{"symbol":"AAPL","price":110.0,"size":30}
{"symbol":"AAPL","price":90.0,"size":60}
{"symbol":"MSFT","price":210.0,"size":15}
"#;

/// The VWAP after each trade of [`TRADES`], worked out by hand: (symbol, vwap, volume, trades).
///   AAPL: 100*10 / 10 = 100; (1000 + 3300) / 40 = 107.5; (4300 + 5400) / 100 = 97
///   MSFT: 200*5 / 5 = 200;   (1000 + 3150) / 20 = 207.5
const EXPECTED: [(&str, f64, i64, i64); 5] = [
    ("AAPL", 100.0, 10, 1),
    ("MSFT", 200.0, 5, 1),
    ("AAPL", 107.5, 40, 2),
    ("AAPL", 97.0, 100, 3),
    ("MSFT", 207.5, 20, 2),
];

fn eddy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eddy"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("EDDY_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn query(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("queries")
        .join(format!("{name}.rhai"))
}

/// Runs `cmd`, killing it if it takes longer than a generous bound, so no test can hang.
fn output(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    use std::time::{Duration, Instant};
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start eddy");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(data).expect("write stdin");
    }
    let started = Instant::now();
    while child.try_wait().expect("poll eddy").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().expect("kill eddy");
            panic!("eddy took more than 30 s: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect eddy's output")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8 output")
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    text(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn write_temp(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write a temp file");
    path
}

fn check_vwap_items(items: &[Value]) {
    assert_eq!(items.len(), EXPECTED.len(), "{items:?}");
    for (item, (symbol, vwap, volume, trades)) in items.iter().zip(EXPECTED) {
        assert_eq!(item["topic"], "vwap", "{item}");
        assert_eq!(item["key"], symbol, "{item}");
        let value = &item["value"];
        let got = value["vwap"].as_f64().expect("vwap is a number");
        assert!((got - vwap).abs() < 1e-9, "vwap {got} != {vwap}: {item}");
        assert_eq!(value["volume"].as_i64(), Some(volume), "{item}");
        assert_eq!(value["trades"].as_i64(), Some(trades), "{item}");
    }
}

#[test]
fn run_vwap_over_a_file_is_right_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_temp(&dir, "trades.ndjson", TRADES);
    let run = || {
        let out = output(
            eddy()
                .arg("run")
                .arg(query("vwap"))
                .arg("--input")
                .arg(&input),
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        out
    };
    let first = run();
    check_vwap_items(&json_lines(&first.stdout));
    let last = json_lines(&first.stdout)[3]["value"]["last"].clone();
    assert_eq!(last.as_f64(), Some(90.0));
    let second = run();
    assert_eq!(text(&first.stdout), text(&second.stdout));
}

#[test]
fn run_reads_stdin() {
    let out = output(
        eddy().arg("run").arg(query("vwap")).args(["--input", "-"]),
        Some(TRADES.as_bytes()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    check_vwap_items(&json_lines(&out.stdout));
}

#[test]
fn rejected_event_is_reported_and_the_rest_still_run() {
    let input = "{\"symbol\":\"AAPL\",\"price\":100.0,\"size\":10}\n\
                 {\"price\":5.0,\"size\":1}\n\
                 {\"symbol\":\"AAPL\",\"price\":110.0,\"size\":30}\n";
    let out = output(
        eddy().arg("run").arg(query("vwap")).args(["--input", "-"]),
        Some(input.as_bytes()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let items = json_lines(&out.stdout);
    let vwaps: Vec<f64> = items
        .iter()
        .map(|i| i["value"]["vwap"].as_f64().unwrap())
        .collect();
    assert_eq!(vwaps, vec![100.0, 107.5]);
    let stderr = text(&out.stderr);
    let rejected: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("rejected:"))
        .collect();
    assert_eq!(rejected.len(), 1, "{stderr}");
    assert!(
        rejected[0].contains("line 2")
            && rejected[0].contains("`symbol`")
            && rejected[0].contains("missing"),
        "{stderr}"
    );
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_temp(
        &dir,
        "broken.rhai",
        "let source = \"trades\";\nfn on_event(ev) {\n  let x = ;\n}\n",
    );
    let input = write_temp(&dir, "trades.ndjson", TRADES);
    let run = output(eddy().arg("run").arg(&bad).arg("--input").arg(&input), None);
    let check = output(eddy().arg("check").arg(query("vwap")).arg(&bad), None);
    for (what, out) in [("run", run), ("check", check)] {
        assert!(!out.status.success(), "{what} succeeded");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&bad.display().to_string())
                && stderr.contains("line 3")
                && stderr.contains("column"),
            "{what}: {stderr}"
        );
    }
}

#[test]
fn check_accepts_the_shipped_queries() {
    let mut names: Vec<PathBuf> = std::fs::read_dir(query("x").parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .collect();
    names.sort();
    assert!(names.len() >= 6, "{names:?}");
    let out = output(eddy().arg("check").args(&names), None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), names.len());
}

#[test]
fn unreadable_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-events.ndjson");
    let out = output(
        eddy()
            .arg("run")
            .arg(query("vwap"))
            .arg("--input")
            .arg(&missing),
        None,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}

#[test]
fn endless_loop_is_stopped_and_published_on_the_errors_topic() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = write_temp(
        &dir,
        "hostile.rhai",
        "let source = \"trades\";\nfn on_event(ev) {\n  if ev.size > 20 { loop { } }\n  emit(ev.size);\n}\n",
    );
    let input = write_temp(&dir, "trades.ndjson", TRADES);
    let out = output(
        eddy().arg("run").arg(&hostile).arg("--input").arg(&input),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let items = json_lines(&out.stdout);
    let sizes: Vec<i64> = items
        .iter()
        .filter(|i| i["topic"] == "hostile")
        .map(|i| i["value"].as_i64().unwrap())
        .collect();
    assert_eq!(sizes, vec![10, 5, 15]);
    let errors: Vec<&Value> = items
        .iter()
        .filter(|i| i["topic"] == "hostile.errors")
        .collect();
    assert_eq!(errors.len(), 2, "{items:?}");
    for e in errors {
        let message = e["value"]["error"].as_str().unwrap_or_default();
        assert!(message.contains("operations"), "{e}");
    }
}

#[test]
fn generate_is_deterministic_trades() {
    let run = || {
        let out = output(
            eddy().args([
                "generate",
                "--scenario",
                "trades",
                "--count",
                "10",
                "--seed",
                "1",
            ]),
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        out.stdout
    };
    let first = run();
    assert_eq!(first, run());
    let events = json_lines(&first);
    assert_eq!(events.len(), 10);
    for ev in &events {
        assert!(ev["symbol"].is_string(), "{ev}");
    }
}
