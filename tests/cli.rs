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
    let stdout = text(&out.stdout);
    // One line per query, then one per function, each compiled or interpreted with a reason.
    let queries: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("  ")).collect();
    assert_eq!(queries.len(), names.len(), "{stdout}");
    assert!(stdout.contains("vwap.rhai: ok: vwap (source [\"trades\"], key_by symbol): compiled\n  init: compiled\n  on_event: compiled\n"), "{stdout}");
    // Loops and chains through an index (`this.bars[id].add(..)`) compile: every shipped
    // query does.
    assert!(!stdout.contains("interpreted"), "{stdout}");
    assert!(
        stdout.contains("hashtag_sentiment (source [\"social\"]): compiled"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ohlc_1m (source [\"trades\"], key_by symbol): compiled\n  init: compiled\n  on_event: compiled\n  on_timer: compiled\n"),
        "{stdout}"
    );
    // A construct the compiler leaves to the interpreter is named with its place.
    let dir = tempfile::tempdir().unwrap();
    let guarded = write_temp(
        &dir,
        "guarded.rhai",
        "let source = \"trades\";\nfn on_event(ev) {\n  try { emit(ev.size); } catch { }\n}\n",
    );
    let out = output(eddy().arg("check").arg(&guarded), None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reason = text(&out.stdout);
    assert!(
        reason.contains("guarded (source [\"trades\"]): interpreted (3:3 try/catch)\n  on_event: interpreted (3:3 try/catch)"),
        "{reason}"
    );
    // `switch` and an index at the end of a chain (`out.probabilities[1]`) compile.
    for name in ["player_stats", "player_churn"] {
        assert!(
            stdout.contains(&format!(
                "{name}.rhai: ok: {name} (source [\"games\"], key_by player): compiled\n  init: compiled\n  on_event: compiled\n"
            )),
            "{stdout}"
        );
    }
}

#[test]
fn run_gives_the_same_bytes_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("trades.ndjson");
    let data = output(
        eddy().args(["generate", "--scenario", "trades", "--count", "300"]),
        None,
    );
    std::fs::write(&input, &data.stdout).unwrap();
    let run = |engine: &str| {
        let out = output(
            eddy()
                .arg("run")
                .arg(query("vwap"))
                .arg("--input")
                .arg(&input)
                .args(["--engine", engine]),
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        out.stdout
    };
    let compiled = run("auto");
    assert_eq!(text(&compiled).lines().count(), 300);
    assert!(compiled == run("interpreter"));
    let bad = output(
        eddy()
            .arg("run")
            .arg(query("vwap"))
            .arg("--input")
            .arg(&input)
            .args(["--engine", "jit"]),
        None,
    );
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("auto"), "{}", text(&bad.stderr));
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

// ------------------------------------------------------------------------------- eddy test

/// Every case folder under `tests/queries/`, found by walking it here.
fn shipped_cases() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        if dir.join("query").is_file() || dir.join("query.rhai").is_file() {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            out.push(dir.strip_prefix(root).unwrap().display().to_string());
            return;
        }
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut cases = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/queries"),
        &mut cases,
    );
    cases.sort();
    cases
}

#[test]
fn eddy_test_passes_on_the_shipped_and_cookbook_cases() {
    let cases = shipped_cases();
    assert!(cases.len() >= 13, "{cases:?}");
    for recipe in ["tumbling_window", "session_window", "asof_join", "dedup"] {
        assert!(cases.contains(&format!("tests/queries/cookbook/{recipe}")));
    }
    let out = output(eddy().arg("test"), None);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for case in &cases {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok ") && l.contains(case.as_str())),
            "{case} not reported ok:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.lines().last(),
        Some(format!("eddy test: {} passed, 0 failed", cases.len()).as_str())
    );
}

/// The items `vwap` emits for [`TRADES`], from [`EXPECTED`] and the trades' prices, as
/// `out.ndjson` lines.
fn vwap_expected_lines() -> Vec<String> {
    let prices = [100.0, 200.0, 110.0, 90.0, 210.0];
    EXPECTED
        .iter()
        .zip(prices)
        .map(|((symbol, vwap, volume, trades), last)| {
            serde_json::json!({"topic": "vwap", "key": symbol, "value": {
                "vwap": vwap, "volume": volume, "trades": trades, "last": last, "ts": null}})
            .to_string()
        })
        .collect()
}

/// A case folder `name` in `dir` for the shipped vwap query over [`TRADES`], expecting
/// `out` (no out.ndjson when `None`).
fn vwap_case(dir: &Path, name: &str, out: Option<&[String]>) -> PathBuf {
    let case = dir.join(name);
    std::fs::create_dir_all(&case).unwrap();
    std::fs::write(case.join("query"), query("vwap").display().to_string()).unwrap();
    std::fs::write(case.join("in.ndjson"), TRADES).unwrap();
    if let Some(lines) = out {
        std::fs::write(case.join("out.ndjson"), lines.join("\n") + "\n").unwrap();
    }
    case
}

fn eddy_test(args: &[&Path]) -> (bool, String) {
    let out = output(eddy().arg("test").args(args), None);
    let mut report = text(&out.stdout).to_owned();
    report.push_str(text(&out.stderr));
    (out.status.success(), report)
}

#[test]
fn eddy_test_names_the_field_when_one_expected_value_is_edited() {
    let dir = tempfile::tempdir().unwrap();
    let right = vwap_expected_lines();
    let case = vwap_case(dir.path(), "vwap", Some(&right));
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");
    assert!(report.contains("1 passed, 0 failed"), "{report}");

    // Line 3 is AAPL's second trade: VWAP (1000 + 3300) / 40 = 107.5. Say 108.5 instead.
    let mut edited = right.clone();
    edited[2] = edited[2].replace("107.5", "108.5");
    assert_ne!(edited[2], right[2]);
    std::fs::write(case.join("out.ndjson"), edited.join("\n")).unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(!ok, "{report}");
    let first = "out.ndjson line 3: topic \"vwap\", key \"AAPL\", field value.vwap: expected 108.5, got 107.5";
    assert!(
        report.contains("FAIL") && report.contains(first),
        "{report}"
    );
    assert!(
        report.contains("no other difference (5 items expected, 5 emitted)"),
        "{report}"
    );

    // Another value wrong and the last item gone: the first is named, the rest counted.
    edited[3] = edited[3].replace("\"volume\":100", "\"volume\":99");
    edited.pop();
    std::fs::write(case.join("out.ndjson"), edited.join("\n")).unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(!ok);
    assert!(report.contains(first), "{report}");
    assert!(
        report.contains("2 more differences (4 items expected, 5 emitted)"),
        "{report}"
    );
}

#[test]
fn eddy_test_compares_per_key_unless_told_order_matters() {
    let dir = tempfile::tempdir().unwrap();
    // MSFT's first item moved after AAPL's second: per key, the order is unchanged.
    let mut lines = vwap_expected_lines();
    lines.swap(1, 2);
    let case = vwap_case(dir.path(), "vwap", Some(&lines));
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");
    std::fs::write(case.join("case.toml"), "ordered = true\n").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(!ok, "{report}");
    assert!(report.contains("out.ndjson line 2: topic \"vwap\", key \"AAPL\", field key: expected \"AAPL\", got \"MSFT\""), "{report}");
    // Within a key the order always counts.
    let mut lines = vwap_expected_lines();
    lines.swap(2, 3);
    std::fs::remove_file(case.join("case.toml")).unwrap();
    std::fs::write(case.join("out.ndjson"), lines.join("\n")).unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(
        !ok && report.contains("line 3: topic \"vwap\", key \"AAPL\", field value.last"),
        "{report}"
    );
}

#[test]
fn eddy_test_tolerance_and_topics_from_case_toml() {
    let dir = tempfile::tempdir().unwrap();
    // 97 + 1e-10: exact comparison fails, a tolerance of 1e-9 passes.
    let mut lines = vwap_expected_lines();
    lines[3] = lines[3].replace("\"vwap\":97.0", "\"vwap\":97.0000000001");
    assert_ne!(lines[3], vwap_expected_lines()[3]);
    let case = vwap_case(dir.path(), "vwap", Some(&lines));
    let (ok, report) = eddy_test(&[&case]);
    assert!(
        !ok && report.contains("expected 97.0000000001, got 97.0"),
        "{report}"
    );
    std::fs::write(case.join("case.toml"), "tolerance = 1e-9\n").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");

    // A query that also fails on one event: `.errors` is compared by default; `topics` can
    // leave it out.
    let case = dir.path().join("errors");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::write(
        case.join("query.rhai"),
        "let source = \"t\";\nfn on_event(ev) {\n  emit(10 / ev.n);\n}\n",
    )
    .unwrap();
    std::fs::write(case.join("in.ndjson"), "{\"n\":2}\n{\"n\":0}\n{\"n\":5}\n").unwrap();
    let main = "{\"topic\":\"errors\",\"key\":null,\"value\":5}\n{\"topic\":\"errors\",\"key\":null,\"value\":2}\n";
    std::fs::write(case.join("out.ndjson"), main).unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(!ok, "{report}");
    assert!(
        report.contains("output item 2: topic \"errors.errors\", key null: emitted, not expected"),
        "{report}"
    );
    std::fs::write(case.join("case.toml"), "topics = [\"errors\"]\n").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");
}

#[test]
fn eddy_test_reports_a_compile_error_at_its_line_or_expects_it() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("broken");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::write(
        case.join("query.rhai"),
        "let source = \"t\";\nfn on_event(ev) {\n  emit(ev.x +);\n}\n",
    )
    .unwrap();
    std::fs::write(case.join("in.ndjson"), "{\"x\":1}\n").unwrap();
    std::fs::write(case.join("out.ndjson"), "").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(!ok, "{report}");
    assert!(report.contains("compile error at line 3"), "{report}");

    // Expected at line 3: the case passes, without running anything.
    std::fs::write(case.join("case.toml"), "[compile_error]\nline = 3\n").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");
    // Expected elsewhere, or with another message: it fails and says where it was.
    std::fs::write(case.join("case.toml"), "[compile_error]\nline = 2\n").unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(
        !ok && report.contains("expected a compile error at line 2")
            && report.contains("got one at line 3"),
        "{report}"
    );
    std::fs::write(
        case.join("case.toml"),
        "[compile_error]\nline = 3\nmessage = \"no such thing\"\n",
    )
    .unwrap();
    let (ok, report) = eddy_test(&[&case]);
    assert!(
        !ok && report.contains("containing \"no such thing\""),
        "{report}"
    );
    // A query that compiles when an error was expected.
    let good = vwap_case(dir.path(), "good", Some(&vwap_expected_lines()));
    std::fs::write(good.join("case.toml"), "[compile_error]\nline = 3\n").unwrap();
    let (ok, report) = eddy_test(&[&good]);
    assert!(
        !ok && report.contains("expected a compile error at line 3, but the query compiled"),
        "{report}"
    );
}

#[test]
fn eddy_test_bless_writes_a_draft_that_then_passes() {
    let dir = tempfile::tempdir().unwrap();
    let case = vwap_case(dir.path(), "vwap", None);
    let (ok, report) = eddy_test(&[&case]);
    assert!(
        !ok && report.contains("out.ndjson is missing") && report.contains("--bless"),
        "{report}"
    );
    let out = output(eddy().args(["test", "--bless"]).arg(&case), None);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("wrote 5 items to out.ndjson; read every line"),
        "{report}"
    );
    // The draft holds what `eddy run` prints, which here is right (checked by hand above).
    let written = std::fs::read_to_string(case.join("out.ndjson")).unwrap();
    let run = output(
        eddy().arg("run").arg(query("vwap")).args(["--input", "-"]),
        Some(TRADES.as_bytes()),
    );
    assert_eq!(written, text(&run.stdout));
    check_vwap_items(&json_lines(written.as_bytes()));
    let (ok, report) = eddy_test(&[&case]);
    assert!(ok, "{report}");
}

#[test]
fn eddy_test_bad_cases_are_named_and_the_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cases");
    vwap_case(&root, "a_good", Some(&vwap_expected_lines()));
    let bad_toml = vwap_case(&root, "b_bad_toml", Some(&vwap_expected_lines()));
    std::fs::write(bad_toml.join("case.toml"), "tolerence = 0.1\n").unwrap();
    // An out.ndjson line with no key.
    vwap_case(
        &root,
        "c_bad_out",
        Some(&["{\"topic\":\"vwap\"}".to_owned()]),
    );
    let rejects = vwap_case(&root, "d_rejects", Some(&vwap_expected_lines()));
    std::fs::write(rejects.join("in.ndjson"), format!("{TRADES}[1]\n")).unwrap();
    let no_input = vwap_case(&root, "e_no_input", Some(&vwap_expected_lines()));
    std::fs::remove_file(no_input.join("in.ndjson")).unwrap();
    let (ok, report) = eddy_test(&[&root]);
    assert!(!ok, "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("ok ") && l.contains("a_good")),
        "{report}"
    );
    assert!(
        report.contains("case.toml") && report.contains("tolerence"),
        "{report}"
    );
    assert!(
        report.contains("out.ndjson, line 1") && report.contains("`key`"),
        "{report}"
    );
    assert!(report.contains("1 events rejected, expected 0"), "{report}");
    assert!(report.contains("in.ndjson is missing"), "{report}");
    assert!(report.contains("eddy test: 1 passed, 4 failed"), "{report}");
    // Told to expect the rejection, that case passes.
    std::fs::write(rejects.join("case.toml"), "rejected = 1\n").unwrap();
    let (ok, report) = eddy_test(&[&rejects]);
    assert!(ok, "{report}");

    // A path that does not exist, and a folder without cases.
    let (ok, report) = eddy_test(&[&dir.path().join("nowhere")]);
    assert!(!ok && report.contains("nowhere"), "{report}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, report) = eddy_test(&[&empty]);
    assert!(!ok && report.contains("no test cases there"), "{report}");
}

#[test]
fn eddy_test_loads_models_from_the_flag_or_the_models_folder() {
    // The player_churn case calls model("churn"); run it from a folder without `models/`.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("churn");
    std::fs::create_dir_all(&case).unwrap();
    for file in ["in.ndjson", "out.ndjson", "case.toml"] {
        std::fs::copy(
            repo.join("tests/queries/player_churn").join(file),
            case.join(file),
        )
        .unwrap();
    }
    let script = repo.join("queries/player_churn.rhai");
    std::fs::write(case.join("query"), script.to_str().unwrap()).unwrap();
    let run = |models: Option<&Path>| {
        let mut cmd = eddy();
        cmd.current_dir(dir.path()).arg("test").arg(&case);
        if let Some(m) = models {
            cmd.arg("--models").arg(m);
        }
        let out = output(&mut cmd, None);
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        (out.status.success(), report)
    };
    // Without the model every session's item is an error instead.
    let (ok, report) = run(None);
    assert!(!ok && report.contains("expected, not emitted"), "{report}");
    let (ok, report) = run(Some(&repo.join("models")));
    assert!(ok, "{report}");
    assert!(report.contains("eddy test: 1 passed, 0 failed"), "{report}");
    let (ok, report) = run(Some(&dir.path().join("nowhere")));
    assert!(
        !ok && report.contains("--models") && report.contains("not a folder"),
        "{report}"
    );
    // From the repository, `models/` is found without the flag.
    let out = output(eddy().arg("test").arg("tests/queries/player_churn"), None);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

/// A reader that went away (`eddy check q.rhai | head -1`) makes each command that prints say so
/// and exit with an error, not panic: stdout is a pipe whose read end is closed before eddy
/// starts, so every write to it fails.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_temp(&dir, "trades.ndjson", TRADES);
    let commands: [Vec<std::ffi::OsString>; 3] = [
        vec!["check".into(), query("vwap").into()],
        vec![
            "run".into(),
            query("vwap").into(),
            "--input".into(),
            input.clone().into(),
        ],
        vec![
            "generate".into(),
            "--scenario".into(),
            "trades".into(),
            "--count".into(),
            "10".into(),
        ],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut cmd = eddy();
        cmd.args(&args).stdout(writer).stderr(Stdio::piped());
        let child = cmd.spawn().expect("start eddy");
        let out = child.wait_with_output().expect("eddy exits");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
