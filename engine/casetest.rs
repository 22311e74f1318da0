//! Query test cases, the engine of `eddy test`: a query, its input events and the items it must
//! emit, kept as files in one folder, run through the offline runner and compared.
//!
//! A case is a folder holding
//! - the query: `query.rhai`, or `query`, a file whose text is the path of a script relative to
//!   the folder (`../../../queries/vwap.rhai`);
//! - `in.ndjson`, the events (anything `eddy run` reads: NDJSON, an array, one object);
//! - `out.ndjson`, the items expected, one `{"topic","key","value"}` line each, as `eddy run`
//!   prints them;
//! - optionally `case.toml` ([`CaseConfig`]): the stream, a float tolerance, whether order
//!   across keys matters, the topics compared, the number of events rejected, or a compile error
//!   expected at a line instead of any output.
//!
//! [`discover`] finds the cases under some paths; [`run_case`] runs one and returns a
//! [`CaseReport`], whose `Display` is what `eddy test` prints: `ok`, or `FAIL` with the first
//! difference (line of `out.ndjson`, topic, key, field, expected and got) and a count of the
//! rest. Numbers compare by value (`100` equals `100.0`), within the tolerance when one is set.
//! By default items are compared per (topic, key), in order, because that is the order a
//! subscriber can count on; `ordered = true` compares the whole sequence. With `bless`, the
//! output is written to `out.ndjson` instead of being compared. Nothing here is on the hot path.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::compiled::EngineMode;
use crate::offline::{self, RunOptions};
use crate::query::{self, QueryDef, QueryError};
use crate::sandbox::Limits;

/// The query of a case, when it is in the folder.
pub const QUERY_SCRIPT: &str = "query.rhai";
/// The query of a case, when it is elsewhere: this file holds its path.
pub const QUERY_REF: &str = "query";
pub const INPUT: &str = "in.ndjson";
pub const EXPECTED: &str = "out.ndjson";
pub const CONFIG: &str = "case.toml";

/// Longest item text printed in a report; longer ones are cut with `…`.
const SHOWN_CHARS: usize = 300;

/// `case.toml`: every field is optional.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseConfig {
    /// The query's name, which names its topics [default: the script's file stem for `query`,
    /// the folder's name for `query.rhai`].
    pub name: Option<String>,
    /// Stream of events without a `"stream"` field [default: they feed the query].
    pub stream: Option<String>,
    /// Numbers match when `|a - b| <= tolerance * max(1, |a|, |b|)` [default: 0, exact].
    #[serde(default)]
    pub tolerance: f64,
    /// Compare the order of all items, not only per (topic, key) [default: false].
    #[serde(default)]
    pub ordered: bool,
    /// Topics compared [default: all, `.errors` and `.late` included].
    pub topics: Option<Vec<String>>,
    /// Events of `in.ndjson` the runner must reject [default: 0].
    #[serde(default)]
    pub rejected: u64,
    /// The query must fail to compile, at this line; `in.ndjson` and `out.ndjson` are not used.
    pub compile_error: Option<ExpectedCompileError>,
}

/// `[compile_error]` of `case.toml`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedCompileError {
    pub line: usize,
    /// Text the error message must contain.
    pub message: Option<String>,
}

/// Why a case could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{}: `tolerance` must be a finite number >= 0, found {tolerance}", path.display())]
    Tolerance { path: PathBuf, tolerance: f64 },
    #[error("{}: no query: add `query.rhai`, or a `query` file holding the path of a script", dir.display())]
    NoQuery { dir: PathBuf },
    #[error("{}: holds both `query.rhai` and `query`: keep one", dir.display())]
    TwoQueries { dir: PathBuf },
    #[error("{}: no name for the query: set `name` in case.toml", dir.display())]
    NoName { dir: PathBuf },
    #[error("{}: {missing} is missing{hint}", dir.display())]
    Missing {
        dir: PathBuf,
        missing: &'static str,
        hint: &'static str,
    },
    #[error("{}, line {line}: not an item `{{\"topic\",\"key\",\"value\"}}`: {reason}", path.display())]
    BadExpected {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no test cases there (a case is a folder with `query.rhai` or `query`)", path.display())]
    NoCases { path: PathBuf },
    #[error("{}: the run failed: {source}", dir.display())]
    Run {
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaseError + '_ {
    move |source| CaseError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Every case folder at or under `paths`, each path's in name order. A path that is a case is
/// taken as is; any other folder is searched (folders whose name starts with `.` are skipped).
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CaseError> {
    let mut cases = Vec::new();
    for path in paths {
        let before = cases.len();
        if !path.is_dir() {
            return Err(match std::fs::metadata(path) {
                Err(source) => CaseError::Io {
                    path: path.clone(),
                    source,
                },
                Ok(_) => CaseError::NoCases { path: path.clone() },
            });
        }
        walk(path, &mut cases)?;
        if cases.len() == before {
            return Err(CaseError::NoCases { path: path.clone() });
        }
    }
    Ok(cases)
}

fn is_case(dir: &Path) -> bool {
    dir.join(QUERY_SCRIPT).is_file() || dir.join(QUERY_REF).is_file()
}

fn walk(dir: &Path, cases: &mut Vec<PathBuf>) -> Result<(), CaseError> {
    if is_case(dir) {
        cases.push(dir.to_owned());
        return Ok(());
    }
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_dir() {
            subdirs.push(path);
        }
    }
    subdirs.sort();
    for sub in subdirs {
        walk(&sub, cases)?;
    }
    Ok(())
}

/// A case folder, read.
#[derive(Debug)]
pub struct Case {
    pub dir: PathBuf,
    pub config: CaseConfig,
    /// The query's script file (in the folder or where `query` points).
    pub script_path: PathBuf,
    pub name: String,
}

impl Case {
    /// Reads the folder's query reference and `case.toml`.
    pub fn load(dir: &Path) -> Result<Case, CaseError> {
        let config_path = dir.join(CONFIG);
        let config: CaseConfig = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
            toml::from_str(&text).map_err(|e| CaseError::Config {
                path: config_path.clone(),
                source: Box::new(e),
            })?
        } else {
            CaseConfig::default()
        };
        if !config.tolerance.is_finite() || config.tolerance < 0.0 {
            return Err(CaseError::Tolerance {
                path: config_path,
                tolerance: config.tolerance,
            });
        }
        let inline = dir.join(QUERY_SCRIPT);
        let reference = dir.join(QUERY_REF);
        let (script_path, default_name) = match (inline.is_file(), reference.is_file()) {
            (true, true) => {
                return Err(CaseError::TwoQueries {
                    dir: dir.to_owned(),
                })
            }
            (false, false) => {
                return Err(CaseError::NoQuery {
                    dir: dir.to_owned(),
                })
            }
            (true, false) => {
                let name = dir
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_owned));
                (inline, name)
            }
            (false, true) => {
                let text = std::fs::read_to_string(&reference).map_err(io(&reference))?;
                let target = dir.join(text.trim());
                let name = query::name_of_file(&target).map(str::to_owned);
                (target, name)
            }
        };
        let name = config
            .name
            .clone()
            .or(default_name)
            .ok_or_else(|| CaseError::NoName {
                dir: dir.to_owned(),
            })?;
        Ok(Case {
            dir: dir.to_owned(),
            config,
            script_path,
            name,
        })
    }
}

/// How a case went.
#[derive(Debug)]
pub enum Verdict {
    /// Everything compared matched.
    Passed {
        items: usize,
    },
    /// `--bless`: the output was written to `out.ndjson`.
    Blessed {
        items: usize,
    },
    Failed(Box<Failure>),
}

fn failed(failure: Failure) -> Verdict {
    Verdict::Failed(Box::new(failure))
}

/// Why a case failed.
#[derive(Debug)]
pub enum Failure {
    /// The output is not what `out.ndjson` says.
    Items {
        first: Difference,
        rest: usize,
        expected: usize,
        got: usize,
    },
    /// The query does not compile, and the case did not expect that.
    Compile(QueryError),
    /// The case expected a compile error, and the query compiled.
    Compiled { line: usize },
    /// The case expected a compile error at one line, and it came at another, or said something
    /// else.
    OtherCompileError {
        expected: ExpectedCompileError,
        error: QueryError,
    },
    /// The runner rejected more or fewer events than `rejected` says.
    Rejected {
        expected: u64,
        got: u64,
        reasons: Vec<String>,
    },
}

/// One difference between the expected and the emitted items.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    /// An item differs in one field (the first that differs, as a path such as `value.top[2]`).
    Field {
        line: usize,
        topic: Value,
        key: Value,
        field: String,
        expected: Option<Value>,
        got: Option<Value>,
        /// Both items as written (in `out.ndjson`, by the runner).
        expected_item: String,
        got_item: String,
    },
    /// An expected item (at `line` of `out.ndjson`) was not emitted.
    Missing {
        line: usize,
        item: Value,
        text: String,
    },
    /// An item was emitted (the `index`th, from 0) that was not expected.
    Unexpected {
        index: usize,
        item: Value,
        text: String,
    },
}

impl Difference {
    /// Where it comes in the report: expected items in file order, then the unexpected ones.
    fn order(&self) -> (usize, usize) {
        match self {
            Difference::Field { line, .. } | Difference::Missing { line, .. } => (*line, 0),
            Difference::Unexpected { index, .. } => (usize::MAX, *index),
        }
    }
}

/// The result of one case, ready to print.
#[derive(Debug)]
pub struct CaseReport {
    pub dir: PathBuf,
    pub result: Result<Verdict, CaseError>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        matches!(
            self.result,
            Ok(Verdict::Passed { .. } | Verdict::Blessed { .. })
        )
    }
}

/// Runs the case in `dir`; with `bless`, writes its output to `out.ndjson` instead of
/// comparing.
pub fn run_case(dir: &Path, limits: &Limits, bless: bool) -> CaseReport {
    run_case_on(dir, limits, bless, EngineMode::Auto)
}

/// [`run_case`] on the given engine (to hold the compiled and interpreted runs to one case).
pub fn run_case_on(dir: &Path, limits: &Limits, bless: bool, engine: EngineMode) -> CaseReport {
    CaseReport {
        dir: dir.to_owned(),
        result: Case::load(dir).and_then(|case| run_loaded(&case, limits, bless, engine)),
    }
}

fn run_loaded(
    case: &Case,
    limits: &Limits,
    bless: bool,
    engine: EngineMode,
) -> Result<Verdict, CaseError> {
    let script = std::fs::read_to_string(&case.script_path).map_err(io(&case.script_path))?;
    let compiled = QueryDef::compile(&case.name, &script, limits);
    let def = match (compiled, &case.config.compile_error) {
        (Err(error), Some(expected)) => {
            let line_matches = error.line_column().0 == Some(expected.line);
            let text_matches = expected
                .message
                .as_ref()
                .is_none_or(|m| error.to_string().contains(m.as_str()));
            return Ok(if line_matches && text_matches {
                Verdict::Passed { items: 0 }
            } else {
                failed(Failure::OtherCompileError {
                    expected: expected.clone(),
                    error,
                })
            });
        }
        (Ok(_), Some(expected)) => {
            return Ok(failed(Failure::Compiled {
                line: expected.line,
            }))
        }
        (Err(error), None) => return Ok(failed(Failure::Compile(error))),
        (Ok(def), None) => def,
    };

    let input_path = case.dir.join(INPUT);
    if !input_path.is_file() {
        return Err(CaseError::Missing {
            dir: case.dir.clone(),
            missing: INPUT,
            hint: ": the events the query is run over",
        });
    }
    let input = std::fs::read(&input_path).map_err(io(&input_path))?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let options = RunOptions {
        stream: case.config.stream.clone(),
        engine,
    };
    let summary =
        offline::run(vec![def], input, limits, &options, &mut out, &mut err).map_err(|source| {
            CaseError::Run {
                dir: case.dir.clone(),
                source,
            }
        })?;

    let wanted = |topic: &str| {
        case.config
            .topics
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == topic))
    };
    // The output, as lines exactly as `eddy run` prints them, and parsed.
    let out = String::from_utf8(out).expect("the runner writes UTF-8");
    let mut got: Vec<Item> = Vec::new();
    for text in out.lines() {
        let value: Value = serde_json::from_str(text).expect("the runner writes valid JSON");
        if wanted(value["topic"].as_str().unwrap_or_default()) {
            got.push(Item {
                line: got.len() + 1,
                value,
                text,
            });
        }
    }

    let verdict = if bless {
        let path = case.dir.join(EXPECTED);
        let text: String = got.iter().map(|i| format!("{}\n", i.text)).collect();
        std::fs::write(&path, text).map_err(io(&path))?;
        Verdict::Blessed { items: got.len() }
    } else {
        let path = case.dir.join(EXPECTED);
        if !path.is_file() {
            return Err(CaseError::Missing {
                dir: case.dir.clone(),
                missing: EXPECTED,
                hint: ": write the items expected, or draft it with `eddy test --bless` and check every line",
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let expected = parse_expected(&path, &text, &wanted)?;
        let mut differences = if case.config.ordered {
            compare_ordered(&expected, &got, case.config.tolerance)
        } else {
            compare_per_key(&expected, &got, case.config.tolerance)
        };
        differences.sort_by_key(Difference::order);
        let mut differences = differences.into_iter();
        match differences.next() {
            None => Verdict::Passed { items: got.len() },
            Some(first) => failed(Failure::Items {
                first,
                rest: differences.len(),
                expected: expected.len(),
                got: got.len(),
            }),
        }
    };
    if summary.rejected != case.config.rejected && !matches!(verdict, Verdict::Failed(_)) {
        let reasons = String::from_utf8_lossy(&err)
            .lines()
            .map(str::to_owned)
            .collect();
        return Ok(failed(Failure::Rejected {
            expected: case.config.rejected,
            got: summary.rejected,
            reasons,
        }));
    }
    Ok(verdict)
}

/// One item, expected or emitted: where it is (line of `out.ndjson`, or position in the output,
/// from 1), parsed, and as written.
struct Item<'a> {
    line: usize,
    value: Value,
    text: &'a str,
}

/// The items of `out.ndjson` whose topic is compared.
fn parse_expected<'a>(
    path: &Path,
    text: &'a str,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<Item<'a>>, CaseError> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| CaseError::BadExpected {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let item: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let Some(fields) = item.as_object() else {
            return Err(bad("not a JSON object".into()));
        };
        for field in fields.keys() {
            if !["topic", "key", "value"].contains(&field.as_str()) {
                return Err(bad(format!("unknown field `{field}`")));
            }
        }
        let Some(topic) = item.get("topic").and_then(Value::as_str) else {
            return Err(bad("`topic` must be a string".into()));
        };
        if !item.get("key").is_some_and(valid_key) {
            return Err(bad(
                "`key` must be a string, an integer, a boolean or null".into()
            ));
        }
        if item.get("value").is_none() {
            return Err(bad("`value` is missing".into()));
        }
        if wanted(topic) {
            items.push(Item {
                line: i + 1,
                value: item,
                text: line.trim(),
            });
        }
    }
    Ok(items)
}

fn valid_key(key: &Value) -> bool {
    key.is_null() || key.is_string() || key.is_boolean() || key.is_i64() || key.is_u64()
}

fn compare_ordered(expected: &[Item], got: &[Item], tolerance: f64) -> Vec<Difference> {
    let pairs: Vec<(Option<usize>, Option<usize>)> = (0..expected.len().max(got.len()))
        .map(|i| {
            (
                (i < expected.len()).then_some(i),
                (i < got.len()).then_some(i),
            )
        })
        .collect();
    differences(expected, got, &pairs, tolerance)
}

/// Compares the items of each (topic, key) in order, whatever their order across keys.
fn compare_per_key(expected: &[Item], got: &[Item], tolerance: f64) -> Vec<Difference> {
    let group = |item: &Item| {
        (
            item.value["topic"].to_string(),
            item.value["key"].to_string(),
        )
    };
    let mut groups: HashMap<(String, String), (Vec<usize>, Vec<usize>)> = HashMap::new();
    for (i, item) in expected.iter().enumerate() {
        groups.entry(group(item)).or_default().0.push(i);
    }
    for (i, item) in got.iter().enumerate() {
        groups.entry(group(item)).or_default().1.push(i);
    }
    let mut pairs = Vec::new();
    for (want, have) in groups.values() {
        for i in 0..want.len().max(have.len()) {
            pairs.push((want.get(i).copied(), have.get(i).copied()));
        }
    }
    differences(expected, got, &pairs, tolerance)
}

fn differences(
    expected: &[Item],
    got: &[Item],
    pairs: &[(Option<usize>, Option<usize>)],
    tolerance: f64,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for &pair in pairs {
        match pair {
            (Some(e), Some(g)) => {
                let (want, have) = (&expected[e], &got[g]);
                if let Some((field, a, b)) = first_difference(&want.value, &have.value, tolerance) {
                    out.push(Difference::Field {
                        line: want.line,
                        topic: want.value["topic"].clone(),
                        key: want.value["key"].clone(),
                        field,
                        expected: a.cloned(),
                        got: b.cloned(),
                        expected_item: want.text.to_owned(),
                        got_item: have.text.to_owned(),
                    });
                }
            }
            (Some(e), None) => out.push(Difference::Missing {
                line: expected[e].line,
                item: expected[e].value.clone(),
                text: expected[e].text.to_owned(),
            }),
            (None, Some(g)) => out.push(Difference::Unexpected {
                index: g,
                item: got[g].value.clone(),
                text: got[g].text.to_owned(),
            }),
            (None, None) => {}
        }
    }
    out
}

/// Whether two numbers match: by value (an integer equals the same float), within `tolerance`
/// relative to the larger of 1 and their magnitudes.
fn numbers_match(a: &serde_json::Number, b: &serde_json::Number, tolerance: f64) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        if x == y {
            return true;
        }
    }
    let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
        return a == b;
    };
    x == y || (x - y).abs() <= tolerance * x.abs().max(y.abs()).max(1.0)
}

/// The first field where `want` and `got` differ: its path (`value.top[2].count`, empty for the
/// whole value) and both sides (`None` where the field is absent).
fn first_difference<'a>(
    want: &'a Value,
    got: &'a Value,
    tolerance: f64,
) -> Option<(String, Option<&'a Value>, Option<&'a Value>)> {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => {
            (!numbers_match(a, b, tolerance)).then(|| (String::new(), Some(want), Some(got)))
        }
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let path = |inner: String| {
                    if inner.is_empty() || inner.starts_with('[') {
                        format!("{k}{inner}")
                    } else {
                        format!("{k}.{inner}")
                    }
                };
                match b.get(k) {
                    None => return Some((k.clone(), Some(va), None)),
                    Some(vb) => {
                        if let Some((inner, x, y)) = first_difference(va, vb, tolerance) {
                            return Some((path(inner), x, y));
                        }
                    }
                }
            }
            b.iter()
                .find(|(k, _)| !a.contains_key(*k))
                .map(|(k, vb)| (k.clone(), None, Some(vb)))
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => {
                        if let Some((inner, x, y)) = first_difference(x, y, tolerance) {
                            let sep = if inner.is_empty() || inner.starts_with('[') {
                                ""
                            } else {
                                "."
                            };
                            return Some((format!("[{i}]{sep}{inner}"), x, y));
                        }
                    }
                    (x, y) => return Some((format!("[{i}]"), x, y)),
                }
            }
            None
        }
        _ => (want != got).then(|| (String::new(), Some(want), Some(got))),
    }
}

fn count(items: usize) -> String {
    match items {
        1 => "1 item".to_owned(),
        n => format!("{n} items"),
    }
}

fn shown(v: &Value) -> String {
    shown_text(&v.to_string())
}

fn shown_text(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn shown_opt(v: Option<&Value>) -> String {
    v.map_or_else(|| "(absent)".to_owned(), shown)
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Field {
                line,
                topic,
                key,
                field,
                expected,
                got,
                expected_item,
                got_item,
            } => {
                let field = if field.is_empty() {
                    "(the item)"
                } else {
                    field
                };
                writeln!(
                    f,
                    "{EXPECTED} line {line}: topic {topic}, key {key}, field {field}: expected {}, got {}",
                    shown_opt(expected.as_ref()),
                    shown_opt(got.as_ref())
                )?;
                writeln!(f, "    expected: {}", shown_text(expected_item))?;
                write!(f, "    got:      {}", shown_text(got_item))
            }
            Difference::Missing { line, item, text } => {
                writeln!(
                    f,
                    "{EXPECTED} line {line}: topic {}, key {}: expected, not emitted",
                    item["topic"], item["key"]
                )?;
                write!(f, "    expected: {}", shown_text(text))
            }
            Difference::Unexpected { index, item, text } => {
                writeln!(
                    f,
                    "output item {}: topic {}, key {}: emitted, not expected",
                    index + 1,
                    item["topic"],
                    item["key"]
                )?;
                write!(f, "    got:      {}", shown_text(text))
            }
        }
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.dir.display();
        match &self.result {
            Ok(Verdict::Passed { items }) => write!(f, "ok      {dir} ({})", count(*items)),
            Ok(Verdict::Blessed { items }) => write!(
                f,
                "blessed {dir}: wrote {} to {EXPECTED}; read every line before you trust it",
                count(*items)
            ),
            Err(e) => write!(f, "FAIL    {dir}\n  {e}"),
            Ok(Verdict::Failed(failure)) => {
                writeln!(f, "FAIL    {dir}")?;
                match failure.as_ref() {
                    Failure::Items {
                        first,
                        rest,
                        expected,
                        got,
                    } => {
                        writeln!(f, "  {first}")?;
                        let more = match rest {
                            0 => "no other difference".to_owned(),
                            1 => "1 more difference".to_owned(),
                            n => format!("{n} more differences"),
                        };
                        write!(f, "  {more} ({expected} items expected, {got} emitted)")
                    }
                    Failure::Compile(e) => {
                        let line = e.line_column().0;
                        match line {
                            Some(line) => write!(f, "  compile error at line {line}: {e}"),
                            None => write!(f, "  compile error: {e}"),
                        }
                    }
                    Failure::Compiled { line } => write!(
                        f,
                        "  expected a compile error at line {line}, but the query compiled"
                    ),
                    Failure::OtherCompileError { expected, error } => {
                        let at = match error.line_column().0 {
                            Some(l) => format!("line {l}"),
                            None => "no line".to_owned(),
                        };
                        write!(
                            f,
                            "  expected a compile error at line {}{}, got one at {at}: {error}",
                            expected.line,
                            expected
                                .message
                                .as_ref()
                                .map(|m| format!(" containing {m:?}"))
                                .unwrap_or_default()
                        )
                    }
                    Failure::Rejected {
                        expected,
                        got,
                        reasons,
                    } => {
                        write!(
                            f,
                            "  {got} events rejected, expected {expected} (set `rejected` in {CONFIG})"
                        )?;
                        for reason in reasons.iter().take(5) {
                            write!(f, "\n    {reason}")?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value_within_tolerance() {
        let n = |v: Value| v.as_number().unwrap().clone();
        assert!(numbers_match(&n(json!(100)), &n(json!(100.0)), 0.0));
        assert!(!numbers_match(&n(json!(100)), &n(json!(101)), 0.0));
        assert!(!numbers_match(&n(json!(0.1)), &n(json!(0.1000001)), 0.0));
        assert!(numbers_match(&n(json!(0.1)), &n(json!(0.1000001)), 1e-6));
        // Relative for large numbers, absolute below 1.
        assert!(numbers_match(&n(json!(1e9)), &n(json!(1e9 + 50.0)), 1e-7));
        assert!(!numbers_match(&n(json!(1e-3)), &n(json!(2e-3)), 1e-4));
    }

    #[test]
    fn the_first_difference_names_its_field() {
        let want =
            json!({"topic": "t", "key": "a", "value": {"x": 1, "top": [{"c": 2}, {"c": 3}]}});
        let got = json!({"topic": "t", "key": "a", "value": {"x": 1, "top": [{"c": 2}, {"c": 4}]}});
        let (field, a, b) = first_difference(&want, &got, 0.0).unwrap();
        assert_eq!(field, "value.top[1].c");
        assert_eq!((a, b), (Some(&json!(3)), Some(&json!(4))));
        let got = json!({"topic": "t", "key": "a", "value": {"x": 1, "top": [{"c": 2}]}});
        let (field, a, b) = first_difference(&want, &got, 0.0).unwrap();
        assert_eq!(field, "value.top[1]");
        assert_eq!((a, b), (Some(&json!({"c": 3})), None));
        let got = json!({"topic": "t", "key": "a", "value": {"x": 1, "y": 2, "top": [{"c": 2}, {"c": 3}]}});
        let (field, a, b) = first_difference(&want, &got, 0.0).unwrap();
        assert_eq!(field, "value.y");
        assert_eq!((a, b), (None, Some(&json!(2))));
        assert_eq!(first_difference(&want, &want, 0.0), None);
        let (field, _, _) =
            first_difference(&json!([1, [2, 3]]), &json!([1, [2, 5]]), 0.0).unwrap();
        assert_eq!(field, "[1][1]");
    }

    fn items(values: &[Value]) -> Vec<Item<'static>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Item {
                line: i + 1,
                value: v.clone(),
                text: "",
            })
            .collect()
    }

    #[test]
    fn per_key_order_ignores_the_interleaving_across_keys() {
        let a1 = json!({"topic": "t", "key": "a", "value": 1});
        let a2 = json!({"topic": "t", "key": "a", "value": 2});
        let b1 = json!({"topic": "t", "key": "b", "value": 1});
        let want = items(&[a1.clone(), b1.clone(), a2.clone()]);
        let got = items(&[b1.clone(), a1.clone(), a2.clone()]);
        assert_eq!(compare_per_key(&want, &got, 0.0), vec![]);
        // Ordered, the same items differ at the first two positions.
        assert_eq!(compare_ordered(&want, &got, 0.0).len(), 2);
        // Swapped within a key: a difference, at the first line of that key.
        let got = items(&[a2.clone(), b1.clone(), a1.clone()]);
        let mut d = compare_per_key(&want, &got, 0.0);
        d.sort_by_key(Difference::order);
        assert_eq!(d.len(), 2);
        assert!(matches!(&d[0], Difference::Field { line: 1, field, .. } if field == "value"));
        // A missing item and an unexpected one.
        let c = json!({"topic": "t", "key": "c", "value": 1});
        let got = items(&[a1.clone(), a2.clone(), c.clone()]);
        let mut d = compare_per_key(&want, &got, 0.0);
        d.sort_by_key(Difference::order);
        assert_eq!(
            d,
            vec![
                Difference::Missing {
                    line: 2,
                    item: b1,
                    text: String::new()
                },
                Difference::Unexpected {
                    index: 2,
                    item: c,
                    text: String::new()
                }
            ]
        );
    }
}
