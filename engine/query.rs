//! Queries: a Rhai script compiled, its settings read and its functions checked, once, when it
//! is deployed.
//!
//! [`QueryDef::compile`] turns `(name, script)` into a validated definition or a
//! [`QueryError`] that says where the script is wrong (line and column) or lists every problem
//! with its settings at once. A definition is plain data (`Send`): each shard compiles the script
//! again with its own engine, because a Rhai `AST` is not `Send`.

use std::fmt;

use rhai::{
    ASTFlags, ASTNode, Dynamic, Engine, EvalAltResult, Expr, ImmutableString, ParseError,
    ParseErrorType, Position, Scope, Stmt, AST,
};

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
///
/// A top-level `const` may be named in the functions. Rhai's functions see no variable of the
/// script, so the constants they name are worked out first, by running the top-level statements
/// once, and then compiled into the functions as values (Rhai's constant propagation): both
/// engines run the same AST.
///
/// Propagation leaves a name where a value cannot stand for it: the object of a method call
/// (`WATCHLIST.contains(s)`), which Rhai may not change. Those names come back with their values,
/// for the shard's variable resolver.
pub(crate) fn compile(
    engine: &Engine,
    name: &str,
    script: &str,
    limits: &Limits,
) -> Result<(AST, Constants), QueryError> {
    let settings = settings_scope();
    let first = match engine.compile_with_scope(&settings, script) {
        Ok(ast) => return checked(name, ast).map(|ast| (ast, Constants::new())),
        Err(e) => e,
    };
    // Each name the parse did not find may be a top-level constant a function uses: parse again
    // with it known, until the script parses or fails for another reason.
    let mut named: Vec<(String, ParseError)> = Vec::new();
    let mut err = first;
    let ast = loop {
        let ParseErrorType::VariableUndefined(var) = &*err.0 else {
            return Err(syntax_error(name, &err));
        };
        if named.len() >= MAX_CONSTANTS_NAMED || named.iter().any(|(n, _)| n == var) {
            return Err(syntax_error(name, &err));
        }
        named.push((var.clone(), err.clone()));
        let mut scope = settings.clone();
        for (n, _) in &named {
            scope.push(n.as_str(), ());
        }
        match engine.compile_with_scope(&scope, script) {
            Ok(ast) => break ast,
            Err(e) => err = e,
        }
    };
    let constants = top_level_constants(&ast);
    if let Some((_, err)) = named.iter().find(|(n, _)| !constants.contains(&n.as_str())) {
        return Err(syntax_error(name, err));
    }
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let problems = shadowed_constants(&ast, &names);
    if !problems.is_empty() {
        return Err(QueryError::Invalid {
            query: name.to_owned(),
            problems,
        });
    }
    // The constants' values: the top-level statements run as at deploy.
    let mut run = settings_scope();
    eddy_plugins::set_call_budget(limits.max_state_bytes);
    engine
        .run_ast_with_scope(&mut run, &ast)
        .map_err(|e| setup_error(name, &e))?;
    let mut known = settings;
    let mut problems = Vec::new();
    let mut values = Constants::new();
    for n in &names {
        let value = run
            .iter_raw()
            .filter(|(m, constant, _)| m == n && *constant)
            .last()
            .map(|(.., v)| v.clone())
            .expect("a top-level constant is in the scope after the top-level statements");
        if !plain_data(&value, 0) {
            problems.push(format!(
                "the constant `{n}` is used in a function but holds a {}: only numbers, strings, \
                 characters, booleans, () and arrays and maps of them can be; make it in `init` \
                 instead",
                engine.map_type_name(value.type_name())
            ));
        }
        known.push_constant_dynamic(*n, value.clone());
        values.push(((*n).into(), value));
    }
    if !problems.is_empty() {
        return Err(QueryError::Invalid {
            query: name.to_owned(),
            problems,
        });
    }
    let ast = engine
        .compile_with_scope(&known, script)
        .map_err(|e| syntax_error(name, &e))
        .and_then(|ast| checked(name, ast))?;
    let mut left = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::Variable(x, ..))) = path.last() {
            if x.2.is_empty() && !left.contains(&x.1) {
                left.push(x.1.clone());
            }
        }
        true
    });
    values.retain(|(n, _)| left.contains(n));
    Ok((ast, values))
}

/// `ast`, unless, at the first place where it does either:
/// - it assigns to a field or an index of a constant map or array (`const M = #{ a: 1 };
///   M.a = 2;`). Rhai's parser lets that through and its optimizer puts the field's value in
///   place of the target, which the interpreter cannot assign to (it panics);
/// - a function names `global::NAME`, Rhai's path to a top-level constant, which is there only
///   while the top-level statements run: in every call it would fail. The plain name works.
fn checked(query: &str, ast: AST) -> Result<AST, QueryError> {
    let mut found: Option<(Position, String)> = None;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Assignment(x))) = path.last() {
            let mut root = &x.1.lhs;
            while let Expr::Dot(be, ..) | Expr::Index(be, ..) = root {
                root = &be.lhs;
            }
            if !matches!(root, Expr::Variable(..) | Expr::ThisPtr(..)) {
                let why = "Cannot assign to a field or an index of a constant".to_owned();
                found = Some((root.start_position(), why));
                return false;
            }
        }
        true
    });
    // `global::` in the functions only (the top level's is Rhai's, and works).
    for f in crate::compiled::functions(&ast) {
        if found.is_some() {
            break;
        }
        for stmt in &f.body {
            stmt.walk(&mut Vec::new(), &mut |path: &[ASTNode]| match path.last() {
                Some(ASTNode::Expr(Expr::Variable(x, ..)))
                    if !x.2.is_empty() && x.2.root() == "global" =>
                {
                    let why = format!(
                        "`global::{0}` in fn `{1}`: functions see the top-level constants \
                             by name, write `{0}`",
                        x.1, f.name
                    );
                    found = Some((x.2.path[0].pos, why));
                    false
                }
                _ => true,
            });
        }
    }
    match found {
        None => Ok(ast),
        Some((pos, message)) => Err(QueryError::Syntax {
            query: query.to_owned(),
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message,
        }),
    }
}

/// Top-level constants a script's functions name, with their values (see [`compile`]).
pub(crate) type Constants = Vec<(ImmutableString, Dynamic)>;

/// Undefined names [`compile`] tries as top-level constants before it gives up.
const MAX_CONSTANTS_NAMED: usize = 256;

/// The settings as defined variables (of no value yet).
fn settings_scope() -> Scope<'static> {
    let mut scope = Scope::new();
    for setting in SETTINGS {
        scope.push(setting, ());
    }
    scope
}

fn syntax_error(query: &str, e: &ParseError) -> QueryError {
    QueryError::Syntax {
        query: query.to_owned(),
        line: e.1.line().unwrap_or(0),
        column: e.1.position().unwrap_or(0),
        message: e.0.to_string(),
    }
}

fn setup_error(query: &str, e: &EvalAltResult) -> QueryError {
    let (line, column) = line_column(e.position());
    QueryError::Setup {
        query: query.to_owned(),
        line,
        column,
        message: crate::shard::error_message(e),
    }
}

/// The names of the constants the script declares at its top level (`const NAME = …;`).
fn top_level_constants(ast: &AST) -> Vec<&str> {
    ast.statements()
        .iter()
        .filter_map(|s| match s {
            Stmt::Var(x, options, _) if options.contains(ASTFlags::CONSTANT) => {
                Some(x.0.name.as_str())
            }
            _ => None,
        })
        .collect()
}

/// Where a name in `constants` is bound again by something Rhai's constant propagation does not
/// see: a function's (or closure's) parameter, a `for` variable, a `catch` variable. There, the
/// constant's value would replace the bound one, so such a script is refused, each place named.
fn shadowed_constants(ast: &AST, constants: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let why = |what: String, n: &str| {
        format!(
            "the top-level constant `{n}` is used in a function, and {what} has the same name: \
             rename one of them"
        )
    };
    for f in ast.iter_functions() {
        for p in f.params.iter().filter(|p| constants.contains(p)) {
            let what = if f.name.starts_with("anon$") {
                "a closure's parameter".to_owned()
            } else {
                format!("a parameter of fn `{}`", f.name)
            };
            problems.push(why(what, p));
        }
    }
    ast.walk(&mut |path: &[ASTNode]| {
        let at = |p: Position| format!("line {}", p.line().unwrap_or(0));
        match path.last() {
            Some(ASTNode::Stmt(Stmt::For(x, pos))) => {
                for v in [Some(&x.0), x.1.as_ref()].into_iter().flatten() {
                    if constants.contains(&v.name.as_str()) {
                        problems.push(why(format!("the `for` variable at {}", at(*pos)), &v.name));
                    }
                }
            }
            Some(ASTNode::Stmt(Stmt::TryCatch(x, pos))) => {
                if let Expr::Variable(v, ..) = &x.expr {
                    if constants.contains(&v.1.as_str()) {
                        problems.push(why(format!("the `catch` variable at {}", at(*pos)), &v.1));
                    }
                }
            }
            _ => {}
        }
        true
    });
    problems
}

/// Whether `value` is data a function may hold as a constant: a number, a string, a character,
/// a boolean, `()`, or an array or a map of such (not a plugin object, which a method could
/// change in a copy and lose).
fn plain_data(value: &Dynamic, depth: usize) -> bool {
    if depth > crate::json::MAX_DEPTH {
        return false;
    }
    if let Some(a) = value.read_lock::<rhai::Array>() {
        return a.iter().all(|v| plain_data(v, depth + 1));
    }
    if let Some(m) = value.read_lock::<rhai::Map>() {
        return m.values().all(|v| plain_data(v, depth + 1));
    }
    value.is_int()
        || value.is_float()
        || value.is_bool()
        || value.is_char()
        || value.is_string()
        || value.is_unit()
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
        let (ast, constants) = compile(&engine, name, script, limits)?;

        let mut scope = settings_scope();
        eddy_plugins::set_call_budget(limits.max_state_bytes);
        engine
            .run_ast_with_scope(&mut scope, &ast)
            .map_err(|e| setup_error(name, &e))?;

        let mut problems = Vec::new();
        let config = read_config(&scope, &mut problems);
        let functions = check_functions(&ast, &mut problems);
        match (config, problems.is_empty()) {
            (Some(config), true) => Ok(QueryDef {
                name: name.to_owned(),
                script: script.to_owned(),
                config,
                engine: crate::compiled::compile(&engine, &ast, functions.init, &constants).1,
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

    /// The line, column and message of the syntax error `script` must fail with.
    fn syntax_error_of(script: &str) -> (usize, usize, String) {
        match compile(script) {
            Err(QueryError::Syntax {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("{script}: {other:?}"),
        }
    }

    #[test]
    fn a_constant_a_function_uses_is_refused_where_another_name_binds_it() {
        // A parameter (of a function and of a closure), a `for` variable and a `catch`
        // variable: Rhai's propagation would put the constant's value in their place.
        let err = compile(
            "let source = \"t\"; const LIMIT = 3;
            fn scale(LIMIT) { LIMIT * 2 }
            fn on_event(ev) {
                let s = LIMIT;
                let f = |LIMIT| LIMIT + 1;
                for (LIMIT, i) in [1, 2] { s += LIMIT + i; }
                try { throw 1; } catch (LIMIT) { s += LIMIT; }
                emit(scale(s) + f.call(1));
            }",
        )
        .unwrap_err();
        let QueryError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(problems.len(), 4, "{err}");
        for needle in [
            "a parameter of fn `scale`",
            "a closure's parameter",
            "the `for` variable at line 6",
            "the `catch` variable at line 7",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)
                    && p.contains("the top-level constant `LIMIT` is used in a function")),
                "missing {needle:?} in {err}"
            );
        }
        // The same names bind freely when no function uses the constant.
        compile(
            "let source = \"t\"; const LIMIT = 3;
            fn scale(LIMIT) { LIMIT * 2 }
            fn on_event(ev) { emit(scale(1)); }",
        )
        .unwrap();
    }

    #[test]
    fn a_constant_a_function_uses_holds_data_not_an_object() {
        let err = compile(
            "let source = \"t\"; const R = ring(3); const N = 3;
            fn on_event(ev) { emit(R.len() + N); }",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("the constant `R` is used in a function but holds a ring")
                && !text.contains("`N`"),
            "{text}"
        );
        compile(
            "let source = \"t\"; const M = #{ a: [1, 2.5, \"x\", 'c', true, ()] };
            fn on_event(ev) { emit(M.a.len()); }",
        )
        .unwrap();
    }

    #[test]
    fn a_name_that_is_no_top_level_constant_is_still_undefined() {
        // In a function, and at the top level (where it is named before its `const`).
        for (script, line, column, name) in [
            (
                "let source = \"t\"; const A = 1;\nfn on_event(ev) { emit(A + NOPE); }",
                2,
                28,
                "NOPE",
            ),
            (
                "let source = \"t\";\nfn on_event(ev) { emit(LOCAL); }\nfn f() { let LOCAL = 1; }",
                2,
                24,
                "LOCAL",
            ),
        ] {
            let (l, c, message) = syntax_error_of(script);
            assert_eq!((l, c), (line, column), "{script}");
            assert_eq!(message, format!("Undefined variable: {name}"), "{script}");
        }
        let err =
            compile("let source = \"t\";\nlet x = LATER;\nconst LATER = 1;\nfn on_event(ev) { emit(LATER); }")
                .unwrap_err();
        assert!(
            matches!(&err, QueryError::Setup { line: Some(2), message, .. } if message.contains("LATER")),
            "{err}"
        );
    }

    #[test]
    fn an_assignment_to_a_field_or_an_index_of_a_constant_is_refused_where_it_is() {
        // Rhai's optimizer puts the field's value where the target was, and its interpreter
        // panics on such an assignment: local and top-level constants, fields and indexes.
        for (script, line, column) in [
            (
                "let source = \"t\";\nfn on_event(ev) { const M = #{a: 1}; M.a = 2; }",
                2,
                38,
            ),
            (
                "let source = \"t\";\nconst M = #{a: 1};\nM[\"a\"] += 2;\nfn on_event(ev) {}",
                3,
                1,
            ),
            (
                "let source = \"t\";\nconst M = #{a: 1};\nfn on_event(ev) {\n  M.a = ev.x; }",
                4,
                3,
            ),
        ] {
            let (l, c, message) = syntax_error_of(script);
            assert_eq!((l, c), (line, column), "{script}");
            assert_eq!(
                message,
                "Cannot assign to a field or an index of a constant"
            );
        }
        // A local map that is no constant still takes its fields.
        compile("let source = \"t\"; fn on_event(ev) { let m = #{a: 1}; m.a = 2; m[\"b\"] = 3; }")
            .unwrap();
    }

    #[test]
    fn global_paths_in_functions_are_refused_with_the_plain_name_to_write() {
        let (line, column, message) = syntax_error_of(
            "let source = \"t\";\nconst LIMIT = 3;\nlet x = global::LIMIT;\nfn on_event(ev) {\n  emit(global::LIMIT); }",
        );
        // The top level's own `global::LIMIT` (line 3) is Rhai's and works.
        assert_eq!((line, column), (5, 8));
        assert_eq!(
            message,
            "`global::LIMIT` in fn `on_event`: functions see the top-level constants by name, \
             write `LIMIT`"
        );
    }
}
