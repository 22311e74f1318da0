//! Queries: a Rhai script compiled, its settings read and its functions checked, once, when it
//! is deployed.
//!
//! [`QueryDef::compile`] turns `(name, script)` into a validated definition or a
//! [`QueryError`] that says where the script is wrong (line and column) or lists every problem
//! with its settings at once. A definition is plain data (`Send`): each shard compiles the script
//! again with its own engine, because a Rhai `AST` is not `Send`.

use std::fmt;

use rhai::{Dynamic, Engine, Position, Scope, AST};

use crate::event::FieldPath;
use crate::sandbox::{self, Limits, SETTINGS};

/// The settings a query's top-level statements set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryConfig {
    /// Streams whose events feed the query.
    pub sources: Vec<String>,
    /// Field path of the partition key; `None`: one state for all events.
    pub key_by: Option<FieldPath>,
    /// Field with the event time in epoch milliseconds; `None`: arrival time.
    pub time_field: Option<FieldPath>,
    /// How far event time may run behind the newest seen before an event is late, in ms.
    pub lateness_ms: i64,
    /// What happens to a new key when the query holds `max_keys_per_query` keys on a shard.
    pub on_key_limit: OnKeyLimit,
    /// A key not seen for this long in event time (behind the watermark) is forgotten, in ms.
    pub key_ttl_ms: Option<i64>,
}

/// A query's answer to a new key once it holds `max_keys_per_query` keys on a shard
/// (`on_key_limit = "evict" | "reject"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnKeyLimit {
    /// The least recently seen key is dropped (state and timers), counted and reported on
    /// `<query>.errors`, and the new key gets a fresh state.
    #[default]
    Evict,
    /// The new key's event is not handled: counted and reported on `<query>.errors`; the keys
    /// already held keep their state.
    Reject,
}

/// Which optional functions a query defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Functions {
    pub init: bool,
    pub on_timer: bool,
}

/// A compiled and validated query.
#[derive(Clone, Debug)]
pub struct QueryDef {
    pub name: String,
    pub script: String,
    pub config: QueryConfig,
    pub functions: Functions,
    /// The named topics the script spells out (`emit("name", value)` with a literal name), which
    /// subscribers may ask for before their first item.
    pub declared_topics: Vec<String>,
    /// What the compiler made of each function (the query runs compiled only if all of it is).
    pub engine: crate::compiled::Report,
}

/// Why a query cannot be deployed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("query name {0:?} is not valid: use letters, digits, '_' and '-' (at most 64)")]
    BadName(String),
    #[error("query `{query}`, line {line}, column {column}: syntax error: {message}")]
    Syntax {
        query: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("query `{query}`{}: top-level statements failed: {message}", at(*line, *column))]
    Setup {
        query: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("query `{query}` is not valid: {}", problems.join("; "))]
    Invalid {
        query: String,
        problems: Vec<String>,
    },
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}

impl QueryError {
    /// Line and column of the error in the script, when it has one.
    pub fn line_column(&self) -> (Option<usize>, Option<usize>) {
        match self {
            QueryError::Syntax { line, column, .. } => (Some(*line), Some(*column)),
            QueryError::Setup { line, column, .. } => (*line, *column),
            _ => (None, None),
        }
    }
}

/// Checks a query or topic name: letters, digits, `_` and `-`, 1 to 64 of them.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The name of the query a script file holds: its file stem (`queries/vwap.rhai` → `vwap`).
/// `None` when the path has no stem in UTF-8; the name is checked when the query compiles.
pub fn name_of_file(path: &std::path::Path) -> Option<&str> {
    path.file_stem().and_then(|s| s.to_str())
}

/// Compiles `script` with `engine`, seeing the settings as defined variables.
pub(crate) fn compile(engine: &Engine, name: &str, script: &str) -> Result<AST, QueryError> {
    let mut scope = Scope::new();
    for setting in SETTINGS {
        scope.push(setting, ());
    }
    engine
        .compile_with_scope(&scope, script)
        .map_err(|e| QueryError::Syntax {
            query: name.to_owned(),
            line: e.1.line().unwrap_or(0),
            column: e.1.position().unwrap_or(0),
            message: e.0.to_string(),
        })
}

impl QueryDef {
    /// Compiles and validates a query: syntax, settings, required functions.
    pub fn compile(name: &str, script: &str, limits: &Limits) -> Result<QueryDef, QueryError> {
        if !valid_name(name) {
            return Err(QueryError::BadName(name.to_owned()));
        }
        let mut engine = sandbox::new_engine(limits);
        // Built-ins bound to a context that is never active: calling them at the top level
        // fails with a message that says where they may be called.
        let ctx = std::rc::Rc::new(std::cell::RefCell::new(crate::builtins::CallCtx::new(
            limits,
        )));
        crate::builtins::register(&mut engine, &ctx);
        let ast = compile(&engine, name, script)?;

        let mut scope = Scope::new();
        for setting in SETTINGS {
            scope.push(setting, ());
        }
        eddy_plugins::set_call_budget(limits.max_state_bytes);
        engine.run_ast_with_scope(&mut scope, &ast).map_err(|e| {
            let (line, column) = line_column(e.position());
            QueryError::Setup {
                query: name.to_owned(),
                line,
                column,
                message: crate::shard::error_message(&e),
            }
        })?;

        let mut problems = Vec::new();
        let config = read_config(&scope, &mut problems);
        let functions = check_functions(&ast, &mut problems);
        match (config, problems.is_empty()) {
            (Some(config), true) => Ok(QueryDef {
                name: name.to_owned(),
                script: script.to_owned(),
                config,
                engine: crate::compiled::compile(&engine, &ast, functions.init).1,
                functions,
                declared_topics: declared_topics(script),
            }),
            _ => Err(QueryError::Invalid {
                query: name.to_owned(),
                problems,
            }),
        }
    }

    /// Topic of `emit(value)`: the query's name.
    pub fn topic(&self) -> String {
        self.name.clone()
    }
}

impl fmt::Display for QueryDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (source {:?}", self.name, self.config.sources)?;
        if let Some(key) = &self.config.key_by {
            write!(f, ", key_by {key}")?;
        }
        f.write_str(")")
    }
}

/// The names in `emit("name", …)` calls with a literal name, in order, without repeats (text in
/// comments and strings may add a name no call uses: subscribing to it is harmless).
fn declared_topics(script: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut rest = script;
    while let Some(at) = rest.find("emit(") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "emit(".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(literal) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        let Some(end) = literal.find('"') else { break };
        let name = &literal[..end];
        if literal[end + 1..].trim_start().starts_with(',')
            && valid_name(name)
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_owned());
        }
    }
    names
}

pub(crate) fn line_column(pos: Position) -> (Option<usize>, Option<usize>) {
    (pos.line(), pos.position())
}

fn read_config(scope: &Scope, problems: &mut Vec<String>) -> Option<QueryConfig> {
    let get = |name: &str| scope.get_value::<Dynamic>(name).unwrap_or(Dynamic::UNIT);

    let sources = match get("source") {
        v if v.is_unit() => {
            problems.push("`source` is not set: name the stream (or array of streams) that feeds this query, e.g. `let source = \"trades\";`".into());
            Vec::new()
        }
        v if v.is_string() => vec![v.into_string().unwrap_or_default()],
        v if v.is_array() => {
            let mut names = Vec::new();
            for item in v.into_array().unwrap_or_default() {
                match item.into_string() {
                    Ok(s) => names.push(s),
                    Err(t) => problems.push(format!("`source` must hold only strings, found {t}")),
                }
            }
            if names.is_empty() {
                problems.push("`source` is an empty array".into());
            }
            names
        }
        v => {
            problems.push(format!(
                "`source` must be a string or an array of strings, found {}",
                v.type_name()
            ));
            Vec::new()
        }
    };
    for s in &sources {
        if s.is_empty() {
            problems.push("`source` names an empty stream".into());
        }
    }

    let mut path = |name: &str| -> Option<FieldPath> {
        match get(name) {
            v if v.is_unit() => None,
            v if v.is_string() => {
                let text = v.into_string().unwrap_or_default();
                FieldPath::parse(&text)
                    .map_err(|e| problems.push(format!("`{name}`: {e}")))
                    .ok()
            }
            v => {
                problems.push(format!(
                    "`{name}` must be a field path string like \"device.id\", found {}",
                    v.type_name()
                ));
                None
            }
        }
    };
    let key_by = path("key_by");
    let time_field = path("time_field");

    let lateness_ms = match get("lateness") {
        v if v.is_unit() => 0,
        v if v.is_int() => v.as_int().unwrap_or(0),
        v if v.is_string() => {
            let text = v.into_string().unwrap_or_default();
            eddy_plugins::parse_duration_ms(&text).unwrap_or_else(|e| {
                problems.push(format!("`lateness`: {e}"));
                0
            })
        }
        v => {
            problems.push(format!(
                "`lateness` must be milliseconds or a duration string like \"5s\", found {}",
                v.type_name()
            ));
            0
        }
    };
    if lateness_ms < 0 {
        problems.push(format!(
            "`lateness` must not be negative, found {lateness_ms}"
        ));
    }

    let on_key_limit = match get("on_key_limit") {
        v if v.is_unit() => OnKeyLimit::default(),
        v => match v.into_string().as_deref() {
            Ok("evict") => OnKeyLimit::Evict,
            Ok("reject") => OnKeyLimit::Reject,
            Ok(other) => {
                problems.push(format!(
                    "`on_key_limit` must be \"evict\" or \"reject\", found {other:?}"
                ));
                OnKeyLimit::default()
            }
            Err(t) => {
                problems.push(format!(
                    "`on_key_limit` must be \"evict\" or \"reject\", found {t}"
                ));
                OnKeyLimit::default()
            }
        },
    };
    let key_ttl_ms = match get("key_ttl") {
        v if v.is_unit() => None,
        v if v.is_int() => Some(v.as_int().unwrap_or(0)),
        v if v.is_string() => {
            let text = v.into_string().unwrap_or_default();
            match eddy_plugins::parse_duration_ms(&text) {
                Ok(ms) => Some(ms),
                Err(e) => {
                    problems.push(format!("`key_ttl`: {e}"));
                    None
                }
            }
        }
        v => {
            problems.push(format!(
                "`key_ttl` must be milliseconds or a duration string like \"1h\", found {}",
                v.type_name()
            ));
            None
        }
    };
    if let Some(ttl) = key_ttl_ms.filter(|&t| t <= 0) {
        problems.push(format!("`key_ttl` must be more than 0, found {ttl}"));
    }

    Some(QueryConfig {
        sources,
        key_by,
        time_field,
        lateness_ms,
        on_key_limit,
        key_ttl_ms,
    })
}

fn check_functions(ast: &AST, problems: &mut Vec<String>) -> Functions {
    let mut functions = Functions {
        init: false,
        on_timer: false,
    };
    let mut on_event = false;
    for f in ast.iter_functions() {
        let (wanted, slot) = match f.name {
            "on_event" => ("fn on_event(ev)", &mut on_event),
            "init" => ("fn init(key)", &mut functions.init),
            "on_timer" => ("fn on_timer(t)", &mut functions.on_timer),
            _ => continue,
        };
        if f.params.len() == 1 {
            *slot = true;
        } else {
            problems.push(format!(
                "`{}` takes {} parameters; it must be `{wanted}`",
                f.name,
                f.params.len()
            ));
        }
    }
    if !on_event && !problems.iter().any(|p| p.starts_with("`on_event`")) {
        problems.push("`fn on_event(ev)` is missing: it is called for every event".into());
    }
    functions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(script: &str) -> Result<QueryDef, QueryError> {
        QueryDef::compile("q", script, &Limits::default())
    }

    #[test]
    fn settings_are_read() {
        let def = compile(
            r#"
            let source = ["trades", "quotes"];
            key_by = "device.id";
            let time_field = "ts";
            let lateness = "2s";
            fn init(key) { #{} }
            fn on_event(ev) { }
            fn on_timer(t) { }
            "#,
        )
        .unwrap();
        assert_eq!(def.config.sources, vec!["trades", "quotes"]);
        assert_eq!(def.config.key_by.unwrap().to_string(), "device.id");
        assert_eq!(def.config.time_field.unwrap().to_string(), "ts");
        assert_eq!(def.config.lateness_ms, 2000);
        assert!(def.functions.init && def.functions.on_timer);
    }

    #[test]
    fn key_settings_are_read_and_checked() {
        let def = compile(
            "let source = \"t\"; let key_by = \"k\"; let on_key_limit = \"reject\"; let key_ttl = \"1h\"; fn on_event(ev) {}",
        )
        .unwrap();
        assert_eq!(def.config.on_key_limit, OnKeyLimit::Reject);
        assert_eq!(def.config.key_ttl_ms, Some(3_600_000));
        let def = compile("let source = \"t\"; fn on_event(ev) {}").unwrap();
        assert_eq!(def.config.on_key_limit, OnKeyLimit::Evict);
        assert_eq!(def.config.key_ttl_ms, None);
        let err = compile(
            "let source = \"t\"; let on_key_limit = \"drop\"; let key_ttl = 0; fn on_event(ev) {}",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`on_key_limit` must be \"evict\" or \"reject\", found \"drop\""),
            "{text}"
        );
        assert!(text.contains("`key_ttl` must be more than 0"), "{text}");
    }

    #[test]
    fn literal_topic_names_are_declared() {
        let def = compile(
            r#"let source = "t";
            fn on_event(ev) { emit("alerts", 1); emit( "alerts" , 2); emit(ev.x); submit("no", 1); emit("x" + "y", 1); emit("hot-1", 3) }"#,
        )
        .unwrap();
        assert_eq!(def.declared_topics, ["alerts", "hot-1"]);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = compile("let source = \"t\";\nfn on_event(ev) {\n  let x = ;\n}").unwrap_err();
        let (line, column) = err.line_column();
        assert_eq!(line, Some(3));
        assert!(column.is_some());
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn undefined_variable_is_a_compile_error() {
        let err = compile("let source = \"t\";\nfn on_event(ev) { emit(pricee) }").unwrap_err();
        assert!(matches!(err, QueryError::Syntax { line: 2, .. }), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = compile("let key_by = 5; let lateness = -1; fn on_timer() {}").unwrap_err();
        let QueryError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let text = problems.join("\n");
        for needle in [
            "`source` is not set",
            "`key_by` must be",
            "`lateness` must not",
            "`on_timer` takes 0",
            "on_event(ev)` is missing",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }

    #[test]
    fn failing_setup_is_reported_with_position() {
        let err = compile("let source = \"t\";\nlet x = 1 / 0;\nfn on_event(ev) {}").unwrap_err();
        assert!(
            matches!(err, QueryError::Setup { line: Some(2), .. }),
            "{err}"
        );
    }

    #[test]
    fn endless_top_level_loop_is_stopped() {
        let err = compile("let source = \"t\"; loop { } fn on_event(ev) {}").unwrap_err();
        assert!(err.to_string().contains("operations"), "{err}");
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("vwap_1m-x"));
        assert!(!valid_name("a.b"));
        assert!(!valid_name(""));
        assert!(matches!(
            QueryDef::compile("bad name", "", &Limits::default()),
            Err(QueryError::BadName(_))
        ));
    }
}
