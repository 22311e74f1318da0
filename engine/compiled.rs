//! The query compiler: a query's functions turned, at deploy time, into a tree of Rust closures
//! that run with Rhai's semantics without walking its AST.
//!
//! [`compile`] reads the Rhai AST (the `internals` feature) of every script function. What it
//! understands it turns into closures over pre-resolved slots: locals by index, `this.field` by
//! slot when `init` returns a map literal (the key's state is then a [`State::Slots`], not a
//! map looked up by name), event fields read from the parsed tape, operators on integers,
//! floats, booleans, strings and `()` done inline with Rhai's exact results and error messages
//! (numbers and booleans passed unboxed between operators, conditions and op-assignments: see
//! [`Num`]), `emit`, `set_timer`, `forget`, `key`, `now`, `watermark` done directly on the call
//! context, and calls of script functions without the interpreter. A local map that is only given
//! fields, read and emitted is a [`Record`]: one local per field, encoded straight to JSON by
//! `emit`, never a `rhai::Map`. A plugin method or property is called as the plugin's own Rust
//! function (`Native`, from the plugin modules' manifests), the one Rhai would resolve for the
//! argument types, with the interpreter's checks around it. `on_event`'s event stays unboxed
//! when the code only reads its fields. Every other native call (an operator on other types, a
//! plugin call no single plugin function fits, other built-ins) goes through a one-line helper
//! function that the same Rhai engine runs, so its result and its error are exactly the
//! interpreter's; the error is moved to the position of the call in the query.
//!
//! `switch` is compiled to a table from the hash Rhai's parser gave each case literal to the
//! case's closure, so the value finds the case Rhai would find (see [`switch_hash`]). Loops
//! (`for` over arrays, ranges, strings and any other iterable, `while`, `loop`, `do`, with
//! `break` and `continue`) run their compiled bodies. A chain with an index in it
//! (`this.bars[id].add(x)`, `m[k] += 1`) is a [`Path`], walked in place through maps and
//! arrays. A plugin function that is not a method (`ohlc()`, `window_start(ts, "1m")`) is
//! called as Rust when no other function has its name.
//!
//! A construct the compiler does not handle (a `switch` case guarded by `if`, `try`, closures,
//! recursion, `this` outside `on_event`/`on_timer`, `?.`, ...)
//! makes the whole query run on the interpreter, as it always did: [`Report`] says which
//! function kept it there and the first construct, with its line and column. That is normal,
//! never an error.
//!
//! Operations are counted per statement, per call and per turn of a loop against
//! `max_operations`, so a script (an endless loop too) stops where the interpreter would stop it
//! give or take the count of expressions (the interpreter also counts each expression); call
//! depth is bounded because recursion is not compiled.

use std::any::TypeId;
use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::OnceLock;

use rhai::plugin::PluginFunc;
use rhai::{
    ASTFlags, ASTNode, BinaryExpr, CallFnOptions, Dynamic, Engine, EvalAltResult, Expr, FnCallExpr,
    FnPtr, ImmutableString, Map, Position, RangeCase, Scope, Stmt, StmtBlock,
    SwitchCasesCollection, Token, AST, FLOAT, INT,
};
use serde::{Deserialize, Serialize};

use crate::builtins::{self, CallCtx};
use crate::event::Event;
use crate::std_fns::StdFn;

type R<T> = Result<T, Box<EvalAltResult>>;

/// Which engine runs the queries: `auto` compiles what it can and interprets the rest;
/// `interpreter` runs everything on Rhai's interpreter, as before the compiler existed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    #[default]
    Auto,
    Interpreter,
}

impl fmt::Display for EngineMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineMode::Auto => "auto",
            EngineMode::Interpreter => "interpreter",
        })
    }
}

/// Why a function was not compiled: the first construct the compiler does not handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unsupported {
    pub line: usize,
    pub column: usize,
    pub what: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} {}", self.line, self.column, self.what)
    }
}

fn unsupported<T>(pos: Position, what: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported {
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        what: what.into(),
    })
}

/// What the compiler made of each function of a query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `(function, None)` when compiled, `(function, Some(why not))` otherwise; in script order.
    pub functions: Vec<(String, Option<Unsupported>)>,
    /// A reason that concerns the query as a whole (the shape of `init`'s state).
    pub query: Option<Unsupported>,
}

impl Report {
    /// Whether the whole query runs compiled.
    pub fn compiled(&self) -> bool {
        self.query.is_none() && self.functions.iter().all(|(_, why)| why.is_none())
    }

    /// `compiled`, or `interpreted (line:col what)` for the first reason.
    pub fn summary(&self) -> String {
        match self.first_reason() {
            None => "compiled".into(),
            Some(why) => format!("interpreted ({why})"),
        }
    }

    fn first_reason(&self) -> Option<&Unsupported> {
        self.query
            .as_ref()
            .or_else(|| self.functions.iter().find_map(|(_, why)| why.as_ref()))
    }

    /// One line per function: `name: compiled` or `name: interpreted (line:col what)`.
    pub fn function_lines(&self) -> Vec<String> {
        self.functions
            .iter()
            .map(|(name, why)| match why {
                None => format!("{name}: compiled"),
                Some(why) => format!("{name}: interpreted ({why})"),
            })
            .collect()
    }
}

/// The state of one key: a Rhai map (interpreted queries, and the form state takes as data), or
/// fixed slots (compiled queries whose `init` returns a map literal).
#[derive(Clone, Debug)]
pub enum State {
    Map(Dynamic),
    Slots(Box<[Dynamic]>),
}

impl State {
    /// The state as a Rhai map (`Dynamic`): what snapshots, checkpoints and the interpreter see.
    pub fn to_dynamic(&self, layout: Option<&Layout>) -> Dynamic {
        match (self, layout) {
            (State::Map(d), _) => d.clone(),
            (State::Slots(slots), Some(layout)) => {
                let mut map = Map::new();
                for (name, v) in layout.fields.iter().zip(slots.iter()) {
                    map.insert(name.as_str().into(), v.clone());
                }
                Dynamic::from_map(map)
            }
            (State::Slots(_), None) => Dynamic::UNIT,
        }
    }

    /// A state from its Rhai map form: slots when `layout` is given (the map must hold exactly
    /// the layout's fields), the map itself otherwise.
    pub fn from_dynamic(value: Dynamic, layout: Option<&Layout>) -> Result<State, String> {
        let Some(layout) = layout else {
            return Ok(State::Map(value));
        };
        let map = value
            .try_cast::<Map>()
            .ok_or_else(|| "the state of a compiled query must be a map".to_owned())?;
        if map.len() != layout.fields.len() {
            return Err(format!(
                "the state has {} fields, the query's `init` makes {}",
                map.len(),
                layout.fields.len()
            ));
        }
        let mut slots = Vec::with_capacity(layout.fields.len());
        for name in &layout.fields {
            match map.get(name.as_str()) {
                Some(v) => slots.push(v.clone()),
                None => return Err(format!("the state has no field `{name}`")),
            }
        }
        Ok(State::Slots(slots.into_boxed_slice()))
    }

    /// The estimated size in bytes, the same figure as [`crate::shard::state_bytes`] of the map.
    pub fn bytes(&self, layout: Option<&Layout>) -> usize {
        match (self, layout) {
            (State::Map(d), _) => crate::shard::state_bytes(d),
            (State::Slots(slots), Some(layout)) => {
                layout.names_bytes + slots.iter().map(crate::shard::state_bytes).sum::<usize>()
            }
            (State::Slots(_), None) => 0,
        }
    }
}

/// The fields of a slot state, in the order of `init`'s map literal.
#[derive(Debug)]
pub struct Layout {
    pub fields: Vec<ImmutableString>,
    /// What the map form counts in [`crate::shard::state_bytes`] besides its values (the map
    /// and each field's name and entry), summed once here: a small state is measured after
    /// every call.
    names_bytes: usize,
}

impl Layout {
    pub fn new(fields: Vec<ImmutableString>) -> Layout {
        const SLOT: usize = 16;
        let names_bytes = SLOT + fields.iter().map(|k| k.len() + SLOT).sum::<usize>();
        Layout {
            fields,
            names_bytes,
        }
    }
}

/// What a compiled call needs from its shard.
pub(crate) struct Rt<'a> {
    pub engine: &'a Engine,
    pub ctx: &'a RefCell<CallCtx>,
    pub max_operations: u64,
}

/// The argument of `on_event` or `on_timer`: an event, kept unboxed for compiled code that only
/// reads its fields, or any value.
pub(crate) enum Arg {
    Event(Event),
    Value(Dynamic),
}

impl Arg {
    /// The argument as a Rhai value (what the interpreter is given).
    pub fn into_dynamic(self) -> Dynamic {
        match self {
            Arg::Event(e) => Dynamic::from(e),
            Arg::Value(v) => v,
        }
    }
}

/// The running state of one compiled call.
struct Frame<'f> {
    locals: Vec<Dynamic>,
    /// The event of an `on_event` call that reads it only by field (see [`CFn::ev_boxed`]),
    /// never made a Rhai value: its local stays `()`.
    event: Option<&'f Event>,
    this: Option<&'f mut [Dynamic]>,
    rt: &'f Rt<'f>,
    helpers: &'f AST,
    ops: &'f mut u64,
}

impl Frame<'_> {
    /// Counts one operation at `pos`. Past `max_operations` the error has no position: the
    /// interpreter's reaches the query without one (the operation it stops at is often inside
    /// a chain or an expression, which the compiled code does not count one by one).
    fn tick(&mut self, _pos: Position) -> R<()> {
        *self.ops += 1;
        if self.rt.max_operations > 0 && *self.ops > self.rt.max_operations {
            return Err(EvalAltResult::ErrorTooManyOperations(Position::NONE).into());
        }
        Ok(())
    }

    fn slot(&mut self, i: usize) -> &mut Dynamic {
        &mut self.this.as_deref_mut().expect("this is bound")[i]
    }
}

enum Flow {
    Normal(Dynamic),
    Return(Dynamic),
    /// `break` (with its value) and `continue`, on their way to the innermost loop.
    Break(Dynamic),
    Continue,
}

/// The items a compiled `for` loop walks.
enum Items {
    Array(std::vec::IntoIter<Dynamic>),
    /// `start..end`.
    Ints(INT, INT),
    /// `start..=end` where `end + 1` does not fit (`None` once `end` was given).
    IntsTo(INT, Option<INT>),
}

impl Iterator for Items {
    type Item = Dynamic;

    fn next(&mut self) -> Option<Dynamic> {
        match self {
            Items::Array(items) => items.next(),
            Items::Ints(next, end) => (*next < *end).then(|| {
                *next += 1;
                Dynamic::from_int(*next - 1)
            }),
            Items::IntsTo(next, end) => {
                let last = (*end)?;
                let n = *next;
                if n > last {
                    return None;
                }
                if n == last {
                    *end = None;
                } else {
                    *next += 1;
                }
                Some(Dynamic::from_int(n))
            }
        }
    }
}

type EFn = Box<dyn Fn(&mut Frame) -> R<Dynamic>>;
type SFn = Box<dyn Fn(&mut Frame) -> R<Flow>>;
type BFn = Box<dyn Fn(&mut Frame) -> R<bool>>;

struct CFn {
    /// Parameters and `let`s: the size of the function's frame.
    locals: usize,
    body: Vec<SFn>,
    /// Whether the event parameter is used as a value (passed, emitted, a method called on
    /// it, ...); when not, `on_event` reads the event's fields without boxing it in a `Dynamic`.
    ev_boxed: bool,
}

type FnTable = Rc<Vec<OnceCell<CFn>>>;

/// A compiled query: its functions, the layout of its state, and the helper functions that run
/// the native calls it does not do itself.
pub struct Compiled {
    table: FnTable,
    /// The expressions of `init`'s map literal, and the size of its frame.
    init: Option<(Vec<EFn>, usize)>,
    on_event: usize,
    on_timer: Option<usize>,
    pub layout: Rc<Layout>,
    helpers: AST,
    /// The locals of the last call, kept for the next (empty between calls).
    scratch: RefCell<Vec<Dynamic>>,
}

impl Compiled {
    /// Runs `init(key)`: the key's first state.
    pub(crate) fn init(&self, rt: &Rt, key: Dynamic) -> R<State> {
        let mut ops = 0;
        let size = self.init.as_ref().map_or(1, |(_, n)| *n);
        let mut frame = Frame {
            locals: vec![Dynamic::UNIT; size.max(1)],
            event: None,
            this: None,
            rt,
            helpers: &self.helpers,
            ops: &mut ops,
        };
        frame.locals[0] = key;
        let mut slots = Vec::with_capacity(self.layout.fields.len());
        if let Some((fields, _)) = &self.init {
            for f in fields {
                slots.push(f(&mut frame)?.flatten());
            }
        }
        Ok(State::Slots(slots.into_boxed_slice()))
    }

    /// Runs `on_event(arg)` or `on_timer(arg)` with `this` bound to `slots`.
    pub(crate) fn call(&self, rt: &Rt, function: &str, slots: &mut [Dynamic], arg: Arg) -> R<()> {
        let index = match function {
            "on_event" => self.on_event,
            "on_timer" => match self.on_timer {
                Some(i) => i,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let f = self.table[index].get().expect("compiled");
        let mut ops = 0;
        // The frame's locals reuse one buffer: no allocation per call. A local is always given
        // its value (parameter, `let`, a record's field) before it is read, so the numbers a
        // call left behind stay; values that hold memory were cleared when it ended.
        let mut locals = self.scratch.take();
        if locals.len() < f.locals.max(1) {
            locals.resize(f.locals.max(1), Dynamic::UNIT);
        }
        let event = match arg {
            Arg::Event(e) if !f.ev_boxed => Some(e),
            other => {
                locals[0] = other.into_dynamic();
                None
            }
        };
        let mut frame = Frame {
            locals,
            event: event.as_ref(),
            this: Some(slots),
            rt,
            helpers: &self.helpers,
            ops: &mut ops,
        };
        let result = run_body(&f.body, &mut frame).map(|_| ());
        let mut locals = frame.locals;
        for l in &mut locals {
            if !(l.is_unit() || l.is_float() || l.is_int() || l.is_bool()) {
                *l = Dynamic::UNIT;
            }
        }
        self.scratch.replace(locals);
        result
    }
}

fn run_body(body: &[SFn], frame: &mut Frame) -> R<Dynamic> {
    let mut last = Dynamic::UNIT;
    for s in body {
        match s(frame)? {
            Flow::Normal(v) => put(&mut last, v),
            Flow::Return(v) => return Ok(v),
            Flow::Break(_) | Flow::Continue => {
                unreachable!("Rhai refuses a loop jump outside a loop")
            }
        }
    }
    Ok(last)
}

/// One script function of the AST, with its body's statements.
pub(crate) struct FnSrc {
    pub(crate) name: String,
    params: Vec<ImmutableString>,
    pub(crate) body: Vec<Stmt>,
}

/// The script functions of `ast` with their statements (cloned: the AST's function bodies are
/// only reachable through a walk).
pub(crate) fn functions(ast: &AST) -> Vec<FnSrc> {
    // Each function with the (line, column) where its body starts and ends.
    type Spanned = (FnSrc, (usize, usize), (usize, usize));
    let mut fns: Vec<Spanned> = ast
        .iter_fn_def()
        .map(|f| {
            let at = |p: Position| (p.line().unwrap_or(0), p.position().unwrap_or(0));
            (
                FnSrc {
                    name: f.name.to_string(),
                    params: f.params.iter().cloned().collect(),
                    body: Vec::new(),
                },
                at(f.body.start_position()),
                at(f.body.end_position()),
            )
        })
        .collect();
    let globals = ast.statements().len();
    let mut seen = 0;
    ast.walk(&mut |path: &[ASTNode]| {
        if let [ASTNode::Stmt(stmt)] = path {
            seen += 1;
            if seen > globals {
                let p = stmt.position();
                let at = (p.line().unwrap_or(0), p.position().unwrap_or(0));
                if let Some(f) = fns.iter_mut().find(|(_, s, e)| *s <= at && at <= *e) {
                    f.0.body.push((*stmt).clone());
                }
            }
        }
        true
    });
    fns.sort_by_key(|(_, start, _)| *start);
    fns.into_iter().map(|(f, ..)| f).collect()
}

/// Compiles the functions of a query's `ast` (made by `engine`). The report says what was
/// compiled; the query is returned only when all of it was.
pub fn compile(
    engine: &Engine,
    ast: &AST,
    has_init: bool,
    constants: &[(ImmutableString, Dynamic)],
) -> (Option<Compiled>, Report) {
    let fns = functions(ast);
    let plain = plain_names(engine);
    let shadowed = crate::std_fns::shadowed(engine);
    let mut report = Report::default();
    // The state's layout: the keys of the map literal `init` returns.
    let mut fields = Vec::new();
    let mut init_exprs: Option<InitExprs> = None;
    if has_init {
        let init = fns.iter().find(|f| f.name == "init");
        match init.map(|f| f.body.as_slice()) {
            Some([Stmt::Expr(e)]) => match &**e {
                Expr::Map(m, _) => {
                    fields = m.0.iter().map(|(k, _)| k.name.clone()).collect();
                    init_exprs = Some(InitExprs::Fields(&m.0));
                }
                // A literal of constants, folded by Rhai's optimizer.
                Expr::DynamicConstant(v, _) if v.is_map() => {
                    let map = v.as_map_ref().expect("checked is_map");
                    fields = map.keys().map(|k| k.as_str().into()).collect();
                    init_exprs = Some(InitExprs::Constant(map.values().cloned().collect()));
                }
                other => {
                    report.query = unsupported::<()>(
                        other.start_position(),
                        "`init` does not return a map literal",
                    )
                    .err()
                }
            },
            Some(body) => {
                let pos = body.first().map_or(Position::NONE, Stmt::position);
                report.query = unsupported::<()>(pos, "`init` is more than one map literal").err();
            }
            None => {}
        }
    }
    let index: HashMap<(String, usize), usize> = fns
        .iter()
        .enumerate()
        .map(|(i, f)| ((f.name.clone(), f.params.len()), i))
        .collect();
    // Two entries per function: called plainly (`this` unbound), and called as a method on
    // `this` (`this.f(x)`, `this` bound to the same state), at `fns.len() + i`.
    let table: FnTable = Rc::new((0..2 * fns.len()).map(|_| OnceCell::new()).collect());
    let helpers = RefCell::new(Helpers::default());
    let layout = Rc::new(Layout::new(fields));
    let mut ok = report.query.is_none();
    for (i, f) in fns.iter().enumerate() {
        let entry = matches!(f.name.as_str(), "on_event" | "on_timer");
        let mut cx = Cx {
            fns: &fns,
            index: &index,
            table: &table,
            layout: &layout,
            this_ok: entry,
            ev_local: None,
            ev_boxed: false,
            names: Vec::new(),
            helpers: &helpers,
            stack: vec![i],
            next_local: 0,
            max_map: engine.max_map_size(),
            data: DataLimits::of(engine),
            records: Vec::new(),
            in_loop: false,
            plain: &plain,
            shadowed: &shadowed,
            constants,
        };
        let result = if f.name == "init" && has_init && f.params.len() == 1 {
            // Compiled field by field into the slots, below.
            Ok(())
        } else {
            // A helper that uses `this` cannot be called plainly (Rhai says `this` is not
            // bound), only as a method on `this`: it counts as compiled when that compiles, and
            // a plain call of it keeps its caller on the interpreter.
            cx.compile_fn(i).or_else(|plain| {
                if entry {
                    return Err(plain);
                }
                cx.child(true).compile_into(i, fns.len() + i)
            })
        };
        if result.is_err() {
            ok = false;
        }
        report.functions.push((f.name.clone(), result.err()));
    }
    let mut init = None;
    if ok {
        if let Some(fields) = init_exprs {
            let init_fn = fns
                .iter()
                .position(|f| f.name == "init")
                .expect("init exists");
            let mut cx = Cx {
                fns: &fns,
                index: &index,
                table: &table,
                layout: &layout,
                this_ok: false,
                ev_local: None,
                ev_boxed: false,
                names: vec![(fns[init_fn].params[0].clone(), 0)],
                helpers: &helpers,
                stack: vec![init_fn],
                next_local: 1,
                max_map: engine.max_map_size(),
                data: DataLimits::of(engine),
                records: Vec::new(),
                in_loop: false,
                plain: &plain,
                shadowed: &shadowed,
                constants,
            };
            let mut compiled: Vec<EFn> = Vec::new();
            let fields = match fields {
                InitExprs::Fields(fields) => fields,
                InitExprs::Constant(values) => {
                    for v in values {
                        compiled.push(Box::new(move |_| Ok(v.clone())));
                    }
                    &[][..]
                }
            };
            for (_, e) in fields {
                match cx.expr(e) {
                    Ok(f) => compiled.push(f),
                    Err(why) => {
                        ok = false;
                        if let Some(slot) = report.functions.iter_mut().find(|(n, _)| n == "init") {
                            slot.1 = Some(why);
                        }
                        break;
                    }
                }
            }
            init = Some((compiled, cx.next_local));
        }
    }
    if !ok {
        return (None, report);
    }
    let source = helpers.into_inner().source;
    let helper_ast = match engine.compile(&source) {
        Ok(ast) => ast,
        Err(e) => {
            report.query = unsupported::<()>(Position::NONE, format!("helper: {e}")).err();
            return (None, report);
        }
    };
    let find = |name: &str| {
        fns.iter()
            .position(|f| f.name == name && f.params.len() == 1)
    };
    let Some(on_event) = find("on_event") else {
        return (None, report);
    };
    let compiled = Compiled {
        table,
        init,
        on_event,
        on_timer: find("on_timer"),
        layout,
        helpers: helper_ast,
        scratch: RefCell::new(Vec::new()),
    };
    (Some(compiled), report)
}

/// What `init` returns: a map literal's fields, or the values of one Rhai folded to a constant.
enum InitExprs<'a> {
    Fields(&'a [(rhai::Ident, Expr)]),
    Constant(Vec<Dynamic>),
}

/// The helper functions, one per distinct native call the compiled code leaves to Rhai.
#[derive(Default)]
struct Helpers {
    source: String,
    names: HashMap<String, Rc<str>>,
}

impl Helpers {
    /// A helper function with `params` parameters and `body`; its name.
    fn add(&mut self, params: usize, body: &str) -> Rc<str> {
        let args: Vec<String> = (0..params).map(|i| format!("a{i}")).collect();
        let key = format!("({}) {{ {body} }}", args.join(", "));
        if let Some(name) = self.names.get(&key) {
            return Rc::clone(name);
        }
        let name: Rc<str> = format!("h{}", self.names.len()).into();
        self.source.push_str(&format!("fn {name}{key}\n"));
        self.names.insert(key, Rc::clone(&name));
        name
    }
}

/// Calls helper `name` with `this` bound to `this`; its error placed at `pos`.
fn call_helper(
    frame: &Frame,
    name: &str,
    this: Option<&mut Dynamic>,
    args: Vec<Dynamic>,
    pos: Position,
) -> R<Dynamic> {
    run_helper(frame.rt.engine, frame.helpers, name, this, args, pos)
}

fn run_helper(
    engine: &Engine,
    helpers: &AST,
    name: &str,
    this: Option<&mut Dynamic>,
    args: Vec<Dynamic>,
    pos: Position,
) -> R<Dynamic> {
    let mut scope = Scope::new();
    let mut options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
    if let Some(this) = this {
        options = options.bind_this_ptr(this);
    }
    engine
        .call_fn_with_options::<Dynamic>(options, &mut scope, helpers, name, args)
        .map_err(|e| relocate(e, pos))
}

/// The error that caused `e`, out of the helper's call, at `pos` (an error without a position,
/// such as a value over its size limit, has none in the interpreter either).
fn relocate(mut e: Box<EvalAltResult>, pos: Position) -> Box<EvalAltResult> {
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = *e {
        e = inner;
    }
    if !e.position().is_none() {
        e.set_position(pos);
    }
    e
}

fn fill(mut e: Box<EvalAltResult>, pos: Position) -> Box<EvalAltResult> {
    if e.position().is_none() {
        e.set_position(pos);
    }
    e
}

/// Compile-time context of one function.
struct Cx<'a> {
    fns: &'a [FnSrc],
    index: &'a HashMap<(String, usize), usize>,
    table: &'a FnTable,
    layout: &'a Rc<Layout>,
    /// Whether `this` is bound (on_event, on_timer).
    this_ok: bool,
    /// The local holding the event (on_event's parameter, never assigned).
    ev_local: Option<usize>,
    /// Whether the event is used as a value, not only read by field (see [`CFn::ev_boxed`]).
    ev_boxed: bool,
    /// Names in scope and their local slots, innermost last.
    names: Vec<(ImmutableString, usize)>,
    helpers: &'a RefCell<Helpers>,
    /// Functions being compiled (to refuse recursion).
    stack: Vec<usize>,
    next_local: usize,
    /// The engine's `max_map_len` (0: none).
    max_map: usize,
    /// The engine's size limits, checked while a literal is built as the interpreter does.
    data: DataLimits,
    /// Locals that are records: a map literal kept as one local per field (see [`Record`]).
    records: Vec<(usize, Rc<Record>)>,
    /// Whether `break` and `continue` are inside a loop of the code being compiled (not across
    /// a block used as a value, which cannot pass them on).
    in_loop: bool,
    /// Names of plugin functions (not methods) the compiled code may call as Rust: no other
    /// function of the engine has that name (see [`plain_natives`]).
    plain: &'a std::collections::HashSet<&'static str>,
    /// Names (and arities) the engine has functions of outside the standard library: a
    /// standard function of such a name is left to the general call (see [`crate::std_fns`]).
    shadowed: &'a std::collections::HashSet<(String, usize)>,
    /// The top-level constants the functions name where Rhai's constant propagation left the
    /// name (see [`crate::query::compile`]): read-only values.
    constants: &'a [(ImmutableString, Dynamic)],
}

/// Names a compiled query may not call: they look at the interpreter's own scope or functions.
const SCOPE_FUNCTIONS: [&str; 7] = [
    "is_def_var",
    "is_def_fn",
    "Fn",
    "call",
    "curry",
    "eval",
    "is_shared",
];

impl Cx<'_> {
    fn compile_fn(&mut self, i: usize) -> Result<(), Unsupported> {
        self.compile_into(i, i)
    }

    /// Compiles function `i` into `table[slot]`: `i` for a plain call, `fns.len() + i` for a
    /// method call on `this` (compiled with `this` bound).
    fn compile_into(&mut self, i: usize, slot: usize) -> Result<(), Unsupported> {
        if self.table[slot].get().is_some() {
            return Ok(());
        }
        let f = &self.fns[i];
        if f.name == "on_event" && f.params.len() == 1 && !assigns(&f.body, &f.params[0]) {
            self.ev_local = Some(0);
        }
        for p in &f.params {
            self.new_local(p.clone());
        }
        let body = self.block(&f.body)?;
        let _ = self.table[slot].set(CFn {
            locals: self.next_local,
            body,
            // A parameter the function assigns is a plain local: always a value.
            ev_boxed: self.ev_boxed || self.ev_local.is_none(),
        });
        Ok(())
    }

    /// A context for compiling another function called from this one: the query's tables,
    /// the functions being compiled, nothing in scope; `this` bound if `this_ok`.
    fn child<'c>(&'c self, this_ok: bool) -> Cx<'c> {
        Cx {
            fns: self.fns,
            index: self.index,
            table: self.table,
            layout: self.layout,
            this_ok,
            ev_local: None,
            ev_boxed: false,
            names: Vec::new(),
            helpers: self.helpers,
            stack: self.stack.clone(),
            next_local: 0,
            max_map: self.max_map,
            data: self.data,
            records: Vec::new(),
            in_loop: false,
            plain: self.plain,
            shadowed: self.shadowed,
            constants: self.constants,
        }
    }

    /// A call of the query's function `i`: plainly, or with `method` as a method on `this`
    /// (`this.f(x)`), which binds the callee's `this` to the caller's state as Rhai binds it.
    fn own_call(
        &mut self,
        i: usize,
        call: &FnCallExpr,
        pos: Position,
        method: bool,
    ) -> Result<EFn, Unsupported> {
        if self.stack.contains(&i) {
            return unsupported(pos, format!("recursive call of `{}`", call.name));
        }
        let args = call
            .args
            .iter()
            .map(|a| self.expr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut inner = self.child(method);
        inner.stack.push(i);
        let slot = if method { self.fns.len() + i } else { i };
        inner.compile_into(i, slot)?;
        let table = Rc::clone(self.table);
        Ok(Box::new(move |fr| {
            let f = table[slot].get().expect("compiled before use");
            let mut locals = vec![Dynamic::UNIT; f.locals];
            for (local, a) in locals.iter_mut().zip(&args) {
                *local = a(fr)?.flatten();
            }
            fr.tick(pos)?;
            let mut frame = Frame {
                locals,
                event: None,
                this: if method { fr.this.as_deref_mut() } else { None },
                rt: fr.rt,
                helpers: fr.helpers,
                ops: &mut *fr.ops,
            };
            run_body(&f.body, &mut frame)
        }))
    }

    /// `this.f(x)` where `f` is one of the query's functions (with as many parameters as
    /// arguments): `Ok(None)` for any other method, which stays unsupported. Rhai first looks
    /// for a function pointer in a property of the map of that name; a state with such a field
    /// is left to the interpreter.
    fn this_method(
        &mut self,
        call: &FnCallExpr,
        pos: Position,
    ) -> Result<Option<EFn>, Unsupported> {
        let Some(&i) = self.index.get(&(call.name.to_string(), call.args.len())) else {
            return Ok(None);
        };
        if self
            .layout
            .fields
            .iter()
            .any(|f| f.as_str() == call.name.as_str())
        {
            return Ok(None);
        }
        self.own_call(i, call, pos, true).map(Some)
    }

    fn local(&self, name: &str) -> Option<usize> {
        self.names
            .iter()
            .rev()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, i)| *i)
    }

    /// The value of top-level constant `name`, if the functions name it (see [`Cx::constants`]).
    fn constant(&self, name: &str) -> Option<Dynamic> {
        self.constants
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.clone())
    }

    /// A chain's root that is no local: a top-level constant, when every step is a property or
    /// a standard function that changes nothing. Rhai runs only pure methods on a constant (any
    /// other is an error); the standard ones that change nothing are pure, other methods are
    /// left to the interpreter.
    fn constant_root(
        &self,
        name: &str,
        segs: &[Seg],
        pos: Position,
    ) -> Result<Dynamic, Unsupported> {
        let Some(value) = self.constant(name) else {
            return unsupported(pos, format!("variable `{name}` outside the function"));
        };
        let pure = |s: &Seg| match s {
            Seg::Prop(..) => true,
            Seg::Method(call, _) => self
                .std_fn(&call.name, call.args.len() + 1)
                .is_some_and(|f| !f.mutates()),
        };
        if !segs.iter().all(pure) {
            return unsupported(pos, format!("a method called on the constant `{name}`"));
        }
        Ok(value)
    }

    /// A new local slot for `name` (slots are never reused within a function).
    fn new_local(&mut self, name: ImmutableString) -> usize {
        let i = self.new_slot();
        self.names.push((name, i));
        i
    }

    /// A new local slot without a name.
    fn new_slot(&mut self) -> usize {
        let i = self.next_local;
        self.next_local += 1;
        i
    }

    fn block(&mut self, stmts: &[Stmt]) -> Result<Vec<SFn>, Unsupported> {
        let depth = self.names.len();
        let records = self.records.len();
        let mut out = Vec::with_capacity(stmts.len());
        for (i, s) in stmts.iter().enumerate() {
            let record = match s {
                Stmt::Var(v, flags, _) if !flags.intersects(ASTFlags::EXPORTED) => match &v.1 {
                    Expr::Map(m, _) => self.record_fields(&v.0.name, &m.0, &stmts[i + 1..]),
                    _ => None,
                },
                _ => None,
            };
            match record {
                Some(extra) => out.push(self.record_let(s, extra)?),
                None => out.push(self.stmt(s)?),
            }
        }
        self.names.truncate(depth);
        self.records.truncate(records);
        Ok(out)
    }

    /// Whether the local map `name`, made by the literal `fields`, can be a [`Record`]: in the
    /// statements after its `let` it is only given fields (`name.f = v`), read by fields the
    /// literal makes (`name.f`) and emitted (`emit(name)`), and the map it would be could not
    /// break a size limit. Returns the fields assigned that the literal does not make.
    fn record_fields(
        &self,
        name: &str,
        fields: &[(rhai::Ident, Expr)],
        rest: &[Stmt],
    ) -> Option<Vec<ImmutableString>> {
        if self.index.contains_key(&("emit".to_owned(), 1)) {
            return None;
        }
        let literal: Vec<&str> = fields.iter().map(|(k, _)| k.name.as_str()).collect();
        let mut extra: Vec<ImmutableString> = Vec::new();
        let mut ok = true;
        for s in rest {
            s.walk(&mut Vec::new(), &mut |path: &[ASTNode]| {
                match path.last() {
                    Some(ASTNode::Stmt(Stmt::Var(v, ..))) if v.0.name.as_str() == name => {
                        ok = false;
                    }
                    Some(ASTNode::Expr(var @ Expr::Variable(x, ..))) if x.1.as_str() == name => {
                        ok &= x.2.is_empty() && record_use(path, var, &literal, &mut extra);
                    }
                    _ => {}
                }
                ok
            });
            if !ok {
                return None;
            }
        }
        // A map of more fields than `max_map_len` fails in the interpreter: leave it to the map.
        let max = self.max_map;
        if max > 0 && literal.len() + extra.len() > max {
            return None;
        }
        Some(extra)
    }

    /// `let name = #{...}` of a record: each field's value into its own local.
    fn record_let(&mut self, s: &Stmt, extra: Vec<ImmutableString>) -> Result<SFn, Unsupported> {
        let pos = s.position();
        let Stmt::Var(v, ..) = s else {
            unreachable!("checked by block")
        };
        let Expr::Map(m, _) = &v.1 else {
            unreachable!("checked by block")
        };
        // Typed: an event field or a slot is read as a number, not made a `Dynamic` and cloned.
        let values =
            m.0.iter()
                .map(|(_, e)| self.num(e))
                .collect::<Result<Vec<_>, _>>()?;
        let data = self.data;
        let own = self.new_local(v.0.name.clone());
        let mut fields = Vec::new();
        let mut set = Vec::new();
        for (k, _) in &m.0 {
            let slot = self.new_slot();
            set.push(slot);
            fields.push(RecordField::new(k.name.clone(), slot, None));
        }
        let mut absent = Vec::new();
        for name in extra {
            let slot = self.new_slot();
            let present = self.new_slot();
            absent.push(present);
            fields.push(RecordField::new(name, slot, Some(present)));
        }
        fields.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        self.records.push((own, Rc::new(Record { fields })));
        Ok(Box::new(move |fr| {
            fr.tick(pos)?;
            let mut total = Sizes::default();
            for (f, &slot) in values.iter().zip(&set) {
                let v = f(fr)?.into_dynamic();
                data.add_entry(&mut total, &v)?;
                put(&mut fr.locals[slot], v);
            }
            for &p in &absent {
                put(&mut fr.locals[p], Dynamic::FALSE);
            }
            Ok(Flow::Normal(Dynamic::UNIT))
        }))
    }

    /// The record a variable expression names, if any.
    fn record(&self, e: &Expr) -> Option<Rc<Record>> {
        let Expr::Variable(x, ..) = e else {
            return None;
        };
        let i = self.local(&x.1)?;
        self.records
            .iter()
            .rev()
            .find(|(l, _)| *l == i)
            .map(|(_, r)| Rc::clone(r))
    }

    fn stmt(&mut self, s: &Stmt) -> Result<SFn, Unsupported> {
        let pos = s.position();
        Ok(match s {
            Stmt::Noop(_) => Box::new(|_| Ok(Flow::Normal(Dynamic::UNIT))),
            Stmt::Expr(e) => {
                let f = self.expr(e)?;
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    Ok(Flow::Normal(f(fr)?))
                })
            }
            Stmt::FnCall(call, cpos) => {
                let f = self.call(call, *cpos)?;
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    Ok(Flow::Normal(f(fr)?))
                })
            }
            Stmt::Block(b) => {
                let body = self.block(b.statements())?;
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    run_block(&body, fr)
                })
            }
            Stmt::If(fc, _) => {
                let cond = self.cond(&fc.expr)?;
                let then = self.block(fc.body.statements())?;
                let other = self.block(fc.branch.statements())?;
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    if cond(fr)? {
                        run_block(&then, fr)
                    } else {
                        run_block(&other, fr)
                    }
                })
            }
            Stmt::Var(v, flags, _) => {
                let (ident, e, _) = &**v;
                if flags.intersects(ASTFlags::EXPORTED) {
                    return unsupported(pos, "export");
                }
                let f = self.expr(e)?;
                let slot = self.new_local(ident.name.clone());
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    let v = f(fr)?.flatten();
                    put(&mut fr.locals[slot], v);
                    Ok(Flow::Normal(Dynamic::UNIT))
                })
            }
            Stmt::Return(value, flags, _) => {
                if flags.intersects(ASTFlags::BREAK) {
                    return unsupported(pos, "throw");
                }
                let f = match value {
                    Some(e) => Some(self.expr(e)?),
                    None => None,
                };
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    let v = match &f {
                        Some(f) => f(fr)?,
                        None => Dynamic::UNIT,
                    };
                    Ok(Flow::Return(v))
                })
            }
            Stmt::Assignment(a) => {
                let (op, be) = &**a;
                self.assignment(op, be, pos)?
            }
            Stmt::While(x, _) => self.while_loop(&x.expr, &x.body, None, pos)?,
            Stmt::Do(x, flags, _) => {
                let until = flags.intersects(ASTFlags::NEGATED);
                self.while_loop(&x.expr, &x.body, Some(until), pos)?
            }
            Stmt::For(x, _) => {
                let (var, counter, flow) = &**x;
                self.for_loop(var, counter.as_ref(), &flow.expr, &flow.body, pos)?
            }
            Stmt::Switch(sw, _) => self.switch(sw, pos)?,
            Stmt::TryCatch(..) => return unsupported(pos, "try/catch"),
            Stmt::BreakLoop(value, flags, _) => {
                if !self.in_loop {
                    return unsupported(pos, "break/continue in a block used as a value");
                }
                let is_break = flags.intersects(ASTFlags::BREAK);
                let value = match value {
                    Some(e) => Some(self.expr(e)?),
                    None => None,
                };
                Box::new(move |fr| {
                    fr.tick(pos)?;
                    let v = match &value {
                        Some(f) => f(fr)?,
                        None => Dynamic::UNIT,
                    };
                    Ok(if is_break {
                        Flow::Break(v)
                    } else {
                        Flow::Continue
                    })
                })
            }
            _ => return unsupported(pos, "statement"),
        })
    }

    /// The body of a loop, compiled with `break` and `continue` allowed in it.
    fn loop_body(&mut self, body: &StmtBlock) -> Result<Vec<SFn>, Unsupported> {
        let in_loop = std::mem::replace(&mut self.in_loop, true);
        let out = self.block(body.statements());
        self.in_loop = in_loop;
        out
    }

    /// `while c { ... }`, `loop { ... }` (`do_until` `None`), `do { ... } while c` and
    /// `do { ... } until c` (`Some(until)`), as Rhai runs them: a `continue` in a `do` loop
    /// goes back to the body without testing the condition, and the loop's value is `()` or
    /// the value given to `break`. Operations are counted per statement of the body, and once
    /// per test of the condition (or per turn of an empty `loop`), so an endless loop stops at
    /// `max_operations` as it does on the interpreter.
    fn while_loop(
        &mut self,
        cond: &Expr,
        body: &StmtBlock,
        do_until: Option<bool>,
        pos: Position,
    ) -> Result<SFn, Unsupported> {
        let forever =
            do_until.is_none() && matches!(cond, Expr::Unit(..) | Expr::BoolConstant(true, ..));
        let test = if forever {
            None
        } else {
            Some(self.cond(cond)?)
        };
        let cond_pos = cond.position();
        let body_pos = body.position();
        let empty = body.is_empty();
        let body = self.loop_body(body)?;
        Ok(Box::new(move |fr| {
            fr.tick(pos)?;
            loop {
                if do_until.is_none() {
                    match &test {
                        Some(test) => {
                            fr.tick(cond_pos)?;
                            if !test(fr)? {
                                return Ok(Flow::Normal(Dynamic::UNIT));
                            }
                        }
                        None if empty => {
                            fr.tick(body_pos)?;
                            continue;
                        }
                        None => {}
                    }
                }
                if !empty {
                    match run_block(&body, fr)? {
                        Flow::Normal(_) => {}
                        Flow::Continue if do_until.is_some() => continue,
                        Flow::Continue => {}
                        Flow::Break(v) => return Ok(Flow::Normal(v)),
                        ret @ Flow::Return(_) => return Ok(ret),
                    }
                }
                if let Some(until) = do_until {
                    fr.tick(cond_pos)?;
                    let test = test.as_ref().expect("a do loop has a condition");
                    if test(fr)? == until {
                        return Ok(Flow::Normal(Dynamic::UNIT));
                    }
                }
            }
        }))
    }

    /// `for x in v { ... }` and `for (x, i) in v { ... }`. Arrays, integer ranges (`a..b`,
    /// `a..=b`) and strings are walked here; any other value is iterated by Rhai itself (its
    /// type's iterator, a plugin's included) in a helper that gathers the items first, which
    /// also gives Rhai's error for a value that cannot be iterated. Operations are counted as
    /// the interpreter counts them: per statement of the body, or per item when it is empty.
    fn for_loop(
        &mut self,
        var: &rhai::Ident,
        counter: Option<&rhai::Ident>,
        iterable: &Expr,
        body: &StmtBlock,
        pos: Position,
    ) -> Result<SFn, Unsupported> {
        let items = self.expr(iterable)?;
        let items_pos = iterable.start_position();
        let helper = self
            .helpers
            .borrow_mut()
            .add(1, "let items = []; for x in a0 { items.push(x) } items");
        let depth = self.names.len();
        let counter_local = counter.map(|c| self.new_local(c.name.clone()));
        let var_local = self.new_local(var.name.clone());
        let var_pos = var.pos;
        let body_pos = body.position();
        let empty = body.is_empty();
        let body = self.loop_body(body);
        self.names.truncate(depth);
        let body = body?;
        Ok(Box::new(move |fr| {
            fr.tick(pos)?;
            let value = items(fr)?.flatten();
            let items = if value.is_array() {
                Items::Array(value.into_array().expect("an array").into_iter())
            } else if value.is::<std::ops::Range<INT>>() {
                let r = value.cast::<std::ops::Range<INT>>();
                Items::Ints(r.start, r.end)
            } else if value.is::<std::ops::RangeInclusive<INT>>() {
                let r = value.cast::<std::ops::RangeInclusive<INT>>();
                match r.end().checked_add(1) {
                    Some(end) => Items::Ints(*r.start(), end),
                    None => Items::IntsTo(*r.start(), Some(*r.end())),
                }
            } else if value.is_string() {
                let text = value.into_immutable_string().expect("a string");
                let chars: Vec<Dynamic> = text.chars().map(Dynamic::from_char).collect();
                Items::Array(chars.into_iter())
            } else {
                let all = call_helper(fr, &helper, None, vec![value], items_pos)?;
                Items::Array(
                    all.into_array()
                        .expect("the helper makes an array")
                        .into_iter(),
                )
            };
            let mut index: INT = -1;
            for item in items {
                if empty {
                    fr.tick(body_pos)?;
                    continue;
                }
                index = index.checked_add(1).ok_or_else(|| {
                    EvalAltResult::ErrorArithmetic(
                        format!("for-loop counter overflow: {index}"),
                        var_pos,
                    )
                })?;
                if let Some(c) = counter_local {
                    put(&mut fr.locals[c], Dynamic::from_int(index));
                }
                put(&mut fr.locals[var_local], item.flatten());
                match run_block(&body, fr)? {
                    Flow::Normal(_) | Flow::Continue => {}
                    Flow::Break(v) => return Ok(Flow::Normal(v)),
                    ret @ Flow::Return(_) => return Ok(ret),
                }
            }
            Ok(Flow::Normal(Dynamic::UNIT))
        }))
    }

    /// `switch v { ... }`: the case Rhai picks, found by the same hash of the value Rhai's
    /// parser gave each case literal ([`switch_hash`]), then the integer ranges in order, then
    /// `_`. A case's body is a block (a `return` in it returns from the function) or an
    /// expression; the switch's value is the body's. A case guarded by `if` is not compiled.
    fn switch(
        &mut self,
        sw: &(Expr, SwitchCasesCollection),
        pos: Position,
    ) -> Result<SFn, Unsupported> {
        let (value, cases) = sw;
        if !switch_hash_is_rhais() {
            return unsupported(pos, "switch");
        }
        // Each case's guard, a constant (`true` when it has none).
        let mut guards = Vec::with_capacity(cases.expressions.len());
        for case in cases.expressions.iter() {
            match case.lhs {
                Expr::BoolConstant(b, _) => guards.push(b),
                ref c => return unsupported(c.start_position(), "switch case with a condition"),
            }
        }
        let value = self.expr(value)?;
        let mut bodies: Vec<SFn> = Vec::with_capacity(cases.expressions.len());
        for case in cases.expressions.iter() {
            bodies.push(match &case.rhs {
                Expr::Stmt(block) => {
                    let body = self.block(block.statements())?;
                    Box::new(move |fr| run_block(&body, fr))
                }
                e => {
                    let f = self.expr(e)?;
                    Box::new(move |fr| Ok(Flow::Normal(f(fr)?)))
                }
            });
        }
        // A value's first case whose guard holds; value hashes with none fall to the ranges.
        let table: HashMap<u64, usize> = cases
            .cases
            .iter()
            .filter_map(|(hash, list)| {
                let first = list.blocks.iter().copied().find(|&i| guards[i])?;
                Some((*hash, first))
            })
            .collect();
        let ranges: Vec<RangeCase> = cases
            .ranges
            .iter()
            .filter(|r| guards[r.index()])
            .cloned()
            .collect();
        let default = cases.def_case;
        Ok(Box::new(move |fr| {
            fr.tick(pos)?;
            let v = value(fr)?;
            let case = match switch_hash(&v) {
                Some(hash) => table.get(&hash).copied().or_else(|| {
                    let v = v.flatten();
                    ranges.iter().find(|r| r.contains(&v)).map(RangeCase::index)
                }),
                None => None,
            };
            match case.or(default) {
                Some(i) => bodies[i](fr),
                None => Ok(Flow::Normal(Dynamic::UNIT)),
            }
        }))
    }

    fn assignment(
        &mut self,
        op: &rhai::OpAssignment,
        be: &BinaryExpr,
        pos: Position,
    ) -> Result<SFn, Unsupported> {
        // The value of `x op= v` is typed (the operator may run unboxed); of `x = v` exactly
        // what the expression gives.
        let value: NFn = if op.is_op_assignment() {
            self.num(&be.rhs)?
        } else {
            let f = self.expr(&be.rhs)?;
            Box::new(move |fr| Ok(Num::D(f(fr)?.flatten())))
        };
        if has_index(&be.lhs) {
            let path = self.path(&be.lhs, Some(op))?;
            let op_pos = op.position();
            let op = op
                .get_op_assignment_info()
                .map(|(_, _, _, _, op, _)| op.clone());
            return Ok(Box::new(move |fr| {
                fr.tick(pos)?;
                let v = value(fr)?.into_dynamic();
                let _ = path.run(fr, Some((op.as_ref(), op_pos, v)))?;
                Ok(Flow::Normal(Dynamic::UNIT))
            }));
        }
        if let Expr::Dot(d, ..) = &be.lhs {
            if let (Some(record), Expr::Property(p, _)) = (self.record(&d.lhs), &d.rhs) {
                let field = record.field(&p.2).expect("record_use saw every field");
                let (slot, present) = (field.slot, field.present);
                return Ok(Box::new(move |fr| {
                    fr.tick(pos)?;
                    let v = value(fr)?.into_dynamic();
                    put(&mut fr.locals[slot], v);
                    if let Some(p) = present {
                        put(&mut fr.locals[p], Dynamic::TRUE);
                    }
                    Ok(Flow::Normal(Dynamic::UNIT))
                }));
            }
        }
        let op_pos = op.position();
        let binop = match op.get_op_assignment_info() {
            None => None,
            Some((_, _, op_assign, _, op, _)) => {
                let helper = self
                    .helpers
                    .borrow_mut()
                    .add(2, &format!("a0 {} a1; a0", op_assign.literal_syntax()));
                Some((op.clone(), helper))
            }
        };
        // The target: a local, a slot of `this`, or a property path under either.
        let mut last_prop = Position::NONE;
        let (root, props) = match &be.lhs {
            Expr::Variable(x, _, vpos) => {
                let name = &x.1;
                let Some(i) = self.local(name) else {
                    return unsupported(*vpos, format!("assignment to `{name}`"));
                };
                if self.ev_local == Some(i) {
                    return unsupported(*vpos, "assignment to the event");
                }
                (Target::Local(i), Vec::new())
            }
            Expr::Dot(..) => {
                let (root, segs) = flatten(&be.lhs)?;
                let mut props = Vec::new();
                for s in &segs {
                    match s {
                        Seg::Prop(name, _, dot) => {
                            props.push(name.clone());
                            last_prop = *dot;
                        }
                        _ => {
                            return unsupported(
                                be.lhs.start_position(),
                                "assignment through a call",
                            )
                        }
                    }
                }
                let target = match root {
                    Expr::ThisPtr(tpos) => {
                        if !self.this_ok {
                            return unsupported(
                                *tpos,
                                "`this` outside on_event, on_timer and methods called on `this`",
                            );
                        }
                        let field = props.remove(0);
                        Target::Slot(self.this_slot(*tpos, &field)?)
                    }
                    Expr::Variable(x, _, vpos) => {
                        let Some(i) = self.local(&x.1) else {
                            return unsupported(*vpos, format!("assignment to `{}`", x.1));
                        };
                        if self.ev_local == Some(i) {
                            return unsupported(*vpos, "assignment to the event");
                        }
                        Target::Local(i)
                    }
                    other => return unsupported(other.start_position(), "assignment target"),
                };
                (target, props)
            }
            other => return unsupported(other.start_position(), "assignment target"),
        };
        // Assigning through properties falls back to a helper that does the whole path on the
        // root, unless every step is a map.
        // Rhai places a failed property set at the property, a failed operator at the operator.
        let path_pos = if binop.is_none() { last_prop } else { op_pos };
        let path_helper = if props.is_empty() {
            None
        } else {
            let path: String = props.iter().map(|p| format!(".{p}")).collect();
            let body = match op.get_op_assignment_info() {
                None => format!("this{path} = a0;"),
                Some((_, _, op_assign, ..)) => {
                    format!("this{path} {} a0;", op_assign.literal_syntax())
                }
            };
            Some(self.helpers.borrow_mut().add(1, &body))
        };
        if props.is_empty() {
            if let Some((op, helper)) = binop {
                return Ok(op_assign(op, helper, root, value, pos, op_pos));
            }
        }
        Ok(Box::new(move |fr| {
            fr.tick(pos)?;
            let v = value(fr)?;
            let engine = fr.rt.engine;
            let helpers = fr.helpers;
            let Some(target) = target_ref(fr, root) else {
                return Ok(Flow::Normal(Dynamic::UNIT));
            };
            if props.is_empty() {
                // (`x op= v` is `op_assign`'s.)
                *target = v.into_dynamic();
                return Ok(Flow::Normal(Dynamic::UNIT));
            }
            // A path of map properties is done in place; anything else by the helper.
            let mut v = Some(v.into_dynamic());
            let done = with_map_path(target, &props, binop.is_none(), &mut |place| match &binop {
                None => {
                    *place = v.take().expect("once");
                    Ok(true)
                }
                Some((op, _)) => match fast_binop(op, place, v.as_ref().expect("once"), op_pos)? {
                    Some(new) => {
                        *place = new;
                        Ok(true)
                    }
                    None => Ok(false),
                },
            })
            .unwrap_or(Ok(false))?;
            if !done {
                let helper = path_helper.as_ref().expect("has props");
                let args = vec![v.take().expect("not used")];
                let _ = run_helper(engine, helpers, helper, Some(target), args, path_pos)?;
            }
            Ok(Flow::Normal(Dynamic::UNIT))
        }))
    }

    fn expr(&mut self, e: &Expr) -> Result<EFn, Unsupported> {
        let pos = e.start_position();
        Ok(match e {
            Expr::DynamicConstant(v, _) => {
                let v = (**v).clone();
                Box::new(move |_| Ok(v.clone()))
            }
            Expr::BoolConstant(b, _) => {
                let b = *b;
                Box::new(move |_| Ok(Dynamic::from_bool(b)))
            }
            Expr::IntegerConstant(n, _) => {
                let n = *n;
                Box::new(move |_| Ok(Dynamic::from_int(n)))
            }
            Expr::FloatConstant(x, _) => {
                let x: FLOAT = **x;
                Box::new(move |_| Ok(Dynamic::from_float(x)))
            }
            Expr::CharConstant(c, _) => {
                let c = *c;
                Box::new(move |_| Ok(Dynamic::from_char(c)))
            }
            Expr::StringConstant(s, _) => {
                let s = s.clone();
                Box::new(move |_| Ok(Dynamic::from(s.clone())))
            }
            Expr::Unit(_) => Box::new(|_| Ok(Dynamic::UNIT)),
            Expr::Variable(x, _, vpos) => {
                if !x.2.is_empty() {
                    return unsupported(*vpos, "module path");
                }
                let Some(i) = self.local(&x.1) else {
                    if let Some(value) = self.constant(&x.1) {
                        return Ok(Box::new(move |_| Ok(value.clone())));
                    }
                    return unsupported(*vpos, format!("variable `{}` outside the function", x.1));
                };
                if self.record(e).is_some() {
                    return unsupported(*vpos, format!("the map `{}` as a value", x.1));
                }
                if self.ev_local == Some(i) {
                    self.ev_boxed = true;
                }
                Box::new(move |fr| Ok(fr.locals[i].clone()))
            }
            Expr::ThisPtr(p) => return unsupported(*p, "`this` as a value"),
            Expr::Map(m, _) => {
                let template = m.1.clone();
                let mut fields = Vec::new();
                for (k, v) in &m.0 {
                    fields.push((k.name.clone(), self.expr(v)?));
                }
                let data = self.data;
                Box::new(move |fr| {
                    let mut map = template.clone();
                    let mut total = Sizes::default();
                    for (k, f) in &fields {
                        let v = f(fr)?.flatten();
                        data.add_entry(&mut total, &v)?;
                        *map.get_mut(k.as_str()).expect("template has every key") = v;
                    }
                    Ok(Dynamic::from_map(map))
                })
            }
            Expr::Array(items, _) => {
                let items = items
                    .iter()
                    .map(|i| self.expr(i))
                    .collect::<Result<Vec<_>, _>>()?;
                let data = self.data;
                Box::new(move |fr| {
                    let mut out = Vec::with_capacity(items.len());
                    let mut total = Sizes::default();
                    for f in &items {
                        let v = f(fr)?.flatten();
                        data.add_item(&mut total, &v)?;
                        out.push(v);
                    }
                    Ok(Dynamic::from_array(out))
                })
            }
            Expr::Stmt(block) => {
                // A block used as a value cannot pass a `break` on: one inside it stays out.
                let in_loop = std::mem::replace(&mut self.in_loop, false);
                let body = self.block(block.statements());
                self.in_loop = in_loop;
                let body = body?;
                Box::new(move |fr| match run_block(&body, fr)? {
                    Flow::Normal(v) | Flow::Return(v) => Ok(v),
                    Flow::Break(_) | Flow::Continue => unreachable!("not compiled in a value"),
                })
            }
            Expr::And(xs, _) | Expr::Or(xs, _) => {
                let is_and = matches!(e, Expr::And(..));
                let mut parts = Vec::new();
                for x in xs.iter() {
                    parts.push(self.cond(x)?);
                }
                Box::new(move |fr| {
                    for p in &parts {
                        let b = p(fr)?;
                        if b != is_and {
                            return Ok(Dynamic::from_bool(b));
                        }
                    }
                    Ok(Dynamic::from_bool(is_and))
                })
            }
            Expr::Coalesce(xs, _) => {
                let parts = xs
                    .iter()
                    .map(|x| self.expr(x))
                    .collect::<Result<Vec<_>, _>>()?;
                Box::new(move |fr| {
                    let mut v = Dynamic::UNIT;
                    for p in &parts {
                        v = p(fr)?;
                        if !v.is_unit() {
                            break;
                        }
                    }
                    Ok(v)
                })
            }
            Expr::FnCall(call, cpos) => self.call(call, *cpos)?,
            Expr::Dot(..) => self.chain(e)?,
            Expr::Index(be, iflags, ipos) => {
                // A read: `ev["price"]` from the tape, anything else by Rhai.
                if matches!(be.lhs, Expr::ThisPtr(_)) {
                    return unsupported(pos, "indexing `this`");
                }
                // `a[i].b` is `Index(a, Dot(i, b))`: a chain goes on in the index, unless
                // `BREAK` says the chain ends here (`a[ev.i]`: the index is all of `rhs`).
                if !iflags.contains(ASTFlags::BREAK)
                    && matches!(be.rhs, Expr::Dot(..) | Expr::Index(..))
                {
                    return self.path_read(e);
                }
                let helper = self.helpers.borrow_mut().add(2, "a0[a1]");
                let ipos = *ipos;
                if let Some(i) = self.ev_param(&be.lhs) {
                    let index = self.expr(&be.rhs)?;
                    return Ok(Box::new(move |fr| {
                        let index = index(fr)?.flatten();
                        if let Ok(name) = index.as_immutable_string_ref() {
                            if let Some(ev) = fr.event {
                                return Ok(ev.get(&name));
                            }
                            if let Some(ev) = fr.locals[i].read_lock::<Event>() {
                                return Ok(ev.get(&name));
                            }
                        }
                        let on = ev_value(fr, i);
                        call_helper(fr, &helper, None, vec![on, index], ipos)
                    }));
                }
                self.path_read(e)?
            }
            Expr::InterpolatedString(parts, _) => {
                // Rhai's own steps: each part in turn, a string as it is and anything else as
                // its `to_string` (inline for numbers, booleans and characters, else by a helper
                // doing the one-part interpolation), the length checked after each part.
                let parts = parts
                    .iter()
                    .map(|p| Ok((self.expr(p)?, p.position())))
                    .collect::<Result<Vec<_>, Unsupported>>()?;
                let helper = self.helpers.borrow_mut().add(1, "`${a0}`");
                let limit = self.data.string;
                Box::new(move |fr| {
                    use std::fmt::Write as _;
                    let mut text = String::new();
                    for (f, at) in &parts {
                        let v = f(fr)?.flatten();
                        if v.is_string() {
                            text.push_str(&v.into_immutable_string().expect("a string"));
                        } else if let Ok(n) = v.as_int() {
                            let _ = write!(text, "{n}");
                        } else if let Ok(b) = v.as_bool() {
                            let _ = write!(text, "{b}");
                        } else if v.is_float() || v.is_char() {
                            // As `to_string` writes them (see `fast_method`).
                            let _ = write!(text, "{v}");
                        } else {
                            let shown = call_helper(fr, &helper, None, vec![v], *at)?;
                            text.push_str(&shown.into_immutable_string().unwrap_or_default());
                        }
                        if limit > 0 && text.len() > limit {
                            return Err(EvalAltResult::ErrorDataTooLarge(
                                "Length of string".into(),
                                *at,
                            )
                            .into());
                        }
                    }
                    Ok(Dynamic::from(ImmutableString::from(text)))
                })
            }
            Expr::Property(..) | Expr::MethodCall(..) => return unsupported(pos, "property"),
            _ => return unsupported(pos, "expression"),
        })
    }

    /// `a.b.c`, `a.m(x).b`, ... rooted on `this`, a local, or any value.
    fn chain(&mut self, e: &Expr) -> Result<EFn, Unsupported> {
        if has_index(e) {
            return self.path_read(e);
        }
        let (root, segs) = flatten(e)?;
        if let (Some(record), [Seg::Prop(name, ..)]) = (self.record(root), segs.as_slice()) {
            let slot = record.field(name).expect("record_use saw every read").slot;
            return Ok(Box::new(move |fr| Ok(fr.locals[slot].clone())));
        }
        // Where the chain starts: a slot of `this`, a local (both in place), or a value.
        let mut segs = segs.as_slice();
        let start = match root {
            Expr::ThisPtr(tpos) => {
                if !self.this_ok {
                    return unsupported(
                        *tpos,
                        "`this` outside on_event, on_timer and methods called on `this`",
                    );
                }
                let Some((Seg::Prop(field, ..), rest)) = segs.split_first() else {
                    if let [Seg::Method(call, mpos)] = segs {
                        if let Some(f) = self.this_method(call, *mpos)? {
                            return Ok(f);
                        }
                    }
                    return unsupported(*tpos, "a method called on `this`");
                };
                segs = rest;
                Start::Place(Target::Slot(self.this_slot(*tpos, field)?))
            }
            Expr::Variable(x, _, vpos) if x.2.is_empty() => match self.local(&x.1) {
                Some(i) => Start::Place(Target::Local(i)),
                None => Start::Const(self.constant_root(&x.1, segs, *vpos)?),
            },
            other => Start::Value(self.expr(other)?),
        };
        // The common reads, without the general machinery: `this.field` and `ev.field`.
        if segs.is_empty() {
            if let Start::Place(Target::Slot(slot)) = start {
                return Ok(Box::new(move |fr| Ok(fr.slot(slot).clone())));
            }
        }
        if let (Start::Place(Target::Local(i)), [Seg::Prop(name, ppos, _)]) = (&start, segs) {
            if self.ev_local == Some(*i) {
                return Ok(self.ev_prop(*i, name, *ppos));
            }
        }
        if let Start::Place(Target::Local(i)) = start {
            if self.ev_local == Some(i) {
                self.ev_boxed = true;
            }
        }
        let mut steps = Vec::new();
        // The event's fields are read-only values: a method on one works on a copy in Rhai too.
        let mut in_place = match start {
            Start::Place(Target::Local(i)) => self.ev_local != Some(i),
            Start::Place(Target::Slot(_)) => true,
            Start::Value(_) | Start::Const(_) => false,
        };
        let mut first = true;
        for s in segs {
            match s {
                Seg::Prop(name, ppos, _) => {
                    let helper = self.helpers.borrow_mut().add(0, &format!("this.{name}"));
                    let natives = natives_for(&format!("get${name}"), 1);
                    let std = self.std_getter(name);
                    steps.push(Step::Prop(name.clone(), helper, *ppos, natives, std));
                }
                Seg::Method(call, mpos) => {
                    // Number methods that change nothing may work on a copy of a property.
                    // (So do the standard functions that change nothing, such as `sqrt`, `len`.)
                    let std = self.std_fn(&call.name, call.args.len() + 1);
                    let pure = std.is_some_and(|f| !f.mutates())
                        || call.args.is_empty() && matches!(call.name.as_str(), "abs" | "to_float");
                    let on_event =
                        matches!(start, Start::Place(Target::Local(i)) if self.ev_local == Some(i));
                    if (in_place || on_event) && !first && !pure {
                        // Changes what it is called on: done in place by a path.
                        return self.path_read(e);
                    }
                    if self.index.keys().any(|(n, _)| n == call.name.as_str()) {
                        return unsupported(*mpos, "a script function called as a method");
                    }
                    if !call.namespace.is_empty() || call.capture_parent_scope {
                        return unsupported(*mpos, "method call");
                    }
                    let args = call
                        .args
                        .iter()
                        .map(|a| self.expr(a))
                        .collect::<Result<Vec<_>, _>>()?;
                    let params: Vec<String> = (0..args.len()).map(|i| format!("a{i}")).collect();
                    let helper = self.helpers.borrow_mut().add(
                        args.len(),
                        &format!("this.{}({})", call.name, params.join(", ")),
                    );
                    let natives = natives_for(&call.name, args.len() + 1);
                    steps.push(Step::Method(
                        call.name.clone(),
                        args,
                        helper,
                        *mpos,
                        natives,
                        std,
                    ));
                    in_place = false;
                }
            }
            first = false;
        }
        // A constant's property or standard function of no argument is a constant too.
        if let Start::Const(v) = &start {
            if let Some(folded) = fold_const(v, &steps) {
                return Ok(Box::new(move |_| Ok(folded.clone())));
            }
        }
        // Rhai works out the methods' arguments first, left to right, then the root, then the
        // steps. That order shows (in side effects and in which error comes first) only when an
        // argument comes after something that may fail or act: a root that is a value, or a
        // step before it. Otherwise each step's arguments are worked out as it comes.
        let args_first = steps.iter().enumerate().any(|(k, step)| {
            matches!(step, Step::Method(_, args, ..) if !args.is_empty())
                && (k > 0 || matches!(start, Start::Value(_)))
        });
        if args_first {
            return Ok(Box::new(move |fr| {
                let mut early = Vec::with_capacity(steps.len());
                for step in &steps {
                    early.push(step.args(fr)?);
                }
                let mut early = early.into_iter();
                walk_chain(fr, &start, &steps, |_, _| {
                    Ok(early.next().expect("one per step"))
                })
            }));
        }
        Ok(Box::new(move |fr| {
            walk_chain(fr, &start, &steps, Step::args)
        }))
    }

    /// Whether `e` is the event parameter.
    fn ev_arg(&self, e: &Expr) -> bool {
        self.ev_param(e).is_some()
    }

    /// The local of the event parameter, when `e` is it.
    fn ev_param(&self, e: &Expr) -> Option<usize> {
        match e {
            Expr::Variable(x, ..) if x.2.is_empty() => {
                self.local(&x.1).filter(|&i| self.ev_local == Some(i))
            }
            _ => None,
        }
    }

    /// The container of `x in c`: the event read in place, or any value.
    fn container(&mut self, c: &Expr, x: &Expr) -> Result<Container, Unsupported> {
        if let Some(i) = self.ev_param(c) {
            return Ok(Container::Event(i));
        }
        // `this.f` or a local, looked at where it is rather than copied, when working out `x`
        // cannot change it first (Rhai takes the container's value before `x`'s).
        let plain = |e: &Expr| match e {
            Expr::StringConstant(..) | Expr::IntegerConstant(..) | Expr::Variable(..) => true,
            Expr::Dot(be, ..) => self.ev_arg(&be.lhs) && matches!(be.rhs, Expr::Property(..)),
            _ => false,
        };
        if plain(x) {
            match c {
                Expr::Dot(be, ..) if matches!(be.lhs, Expr::ThisPtr(_)) && self.this_ok => {
                    if let Expr::Property(p, _) = &be.rhs {
                        if let Some(slot) = self.layout.fields.iter().position(|f| *f == p.2) {
                            return Ok(Container::Place(Target::Slot(slot)));
                        }
                    }
                }
                Expr::Variable(v, ..) if v.2.is_empty() && self.record(c).is_none() => {
                    if let Some(i) = self.local(&v.1) {
                        return Ok(Container::Place(Target::Local(i)));
                    }
                }
                _ => {}
            }
        }
        Ok(Container::Value(self.expr(c)?))
    }

    /// `contains(c, x)`, which `x in c` is: inline for an event or a map and a string.
    /// `name` is `x` when it is a string constant: then `"f" in ev` makes no value for it.
    fn contains(
        &mut self,
        a: Container,
        b: EFn,
        name: Option<ImmutableString>,
        pos: Position,
    ) -> EFn {
        let helper = self.helpers.borrow_mut().add(2, "a1 in a0");
        let name: Option<Box<str>> = name.map(|n| n.as_str().into());
        Box::new(move |fr| {
            let c = match &a {
                Container::Event(i) => {
                    if let (Some(name), Some(ev)) = (&name, fr.event) {
                        return Ok(Dynamic::from_bool(ev.contains(name)));
                    }
                    let x = b(fr)?;
                    if let Ok(s) = x.as_immutable_string_ref() {
                        if let Some(ev) = fr.event {
                            return Ok(Dynamic::from_bool(ev.contains(&s)));
                        }
                    }
                    let c = ev_value(fr, *i);
                    return contains_value(fr, &helper, c, x, pos);
                }
                Container::Value(a) => a(fr)?,
                Container::Place(t) => {
                    let x = b(fr)?;
                    let Some(place) = target_ref(fr, *t) else {
                        return Ok(Dynamic::UNIT);
                    };
                    if let (Ok(map), Ok(s)) = (place.as_map_ref(), x.as_immutable_string_ref()) {
                        return Ok(Dynamic::from_bool(map.contains_key(s.as_str())));
                    }
                    let c = place.clone();
                    return contains_value(fr, &helper, c, x, pos);
                }
            };
            let x = b(fr)?;
            contains_value(fr, &helper, c, x, pos)
        })
    }
}

/// `x in c` on values: inline for an event or a map and a string, by the helper otherwise.
fn contains_value(fr: &Frame, helper: &str, c: Dynamic, x: Dynamic, pos: Position) -> R<Dynamic> {
    if let (Some(ev), Ok(s)) = (c.read_lock::<Event>(), x.as_immutable_string_ref()) {
        return Ok(Dynamic::from_bool(ev.contains(&s)));
    }
    if let (Ok(map), Ok(s)) = (c.as_map_ref(), x.as_immutable_string_ref()) {
        return Ok(Dynamic::from_bool(map.contains_key(s.as_str())));
    }
    call_helper(fr, helper, None, vec![c, x], pos)
}

/// The event parameter in local `i` as a Rhai value: the local itself, or the unboxed event of
/// the call boxed now (a rare path: an index or `in` the compiled code does not do inline).
fn ev_value(fr: &Frame, i: usize) -> Dynamic {
    match fr.event {
        Some(ev) => Dynamic::from(ev.clone()),
        None => fr.locals[i].clone(),
    }
}

/// A built-in the compiled code calls straight (see `builtins.rs`).
#[derive(Clone, Copy)]
enum Builtin {
    /// `emit(name, value)`
    EmitNamed,
    /// `emit_to(key, value)`
    EmitTo,
    /// `emit_to(name, key, value)`
    EmitToNamed,
    SetTimer,
    Forget,
}

/// The container of an `in`.
enum Container {
    /// The event parameter, in this local.
    Event(usize),
    /// A slot of `this` or a local, not copied.
    Place(Target),
    Value(EFn),
}

impl Cx<'_> {
    fn call(&mut self, call: &FnCallExpr, pos: Position) -> Result<EFn, Unsupported> {
        if !call.namespace.is_empty() {
            return unsupported(pos, "module function");
        }
        if call.capture_parent_scope {
            return unsupported(pos, "call capturing the scope");
        }
        let name = call.name.as_str();
        let n = call.args.len();
        if let Some(op) = &call.op_token {
            if n == 2 {
                if matches!(op, Token::In) {
                    let a = self.container(&call.args[0], &call.args[1])?;
                    let b = self.expr(&call.args[1])?;
                    let name = match &call.args[1] {
                        Expr::StringConstant(s, _) => Some(s.clone()),
                        _ => None,
                    };
                    return Ok(self.contains(a, b, name, pos));
                }
                let a = self.num(&call.args[0])?;
                let b = self.num(&call.args[1])?;
                let f = self.binop(op.clone(), a, b, pos);
                return Ok(Box::new(move |fr| Ok(f(fr)?.into_dynamic())));
            }
            if n == 1 {
                let a = self.expr(&call.args[0])?;
                let (helper, kind) = match op {
                    Token::Bang => ("!a0", 0),
                    Token::UnaryMinus | Token::Minus => ("-a0", 1),
                    Token::UnaryPlus | Token::Plus => ("+a0", 2),
                    _ => return unsupported(pos, format!("operator {}", op.literal_syntax())),
                };
                let helper = self.helpers.borrow_mut().add(1, helper);
                return Ok(Box::new(move |fr| {
                    let x = a(fr)?.flatten();
                    match kind {
                        0 => {
                            if let Ok(b) = x.as_bool() {
                                return Ok(Dynamic::from_bool(!b));
                            }
                        }
                        1 => {
                            if let Ok(i) = x.as_int() {
                                return i.checked_neg().map(Dynamic::from_int).ok_or_else(|| {
                                    EvalAltResult::ErrorArithmetic("integer overflow".into(), pos)
                                        .into()
                                });
                            }
                            if let Ok(f) = x.as_float() {
                                return Ok(Dynamic::from_float(-f));
                            }
                        }
                        _ => {}
                    }
                    call_helper(fr, &helper, None, vec![x], pos)
                }));
            }
            return unsupported(pos, format!("operator {}", op.literal_syntax()));
        }
        // A script function of the query.
        if let Some(&i) = self.index.get(&(name.to_owned(), n)) {
            return self.own_call(i, call, pos, false);
        }
        if SCOPE_FUNCTIONS.contains(&name) {
            return unsupported(pos, format!("`{name}`"));
        }
        if let (("emit", 1), Some(record)) =
            ((name, n), call.args.first().and_then(|a| self.record(a)))
        {
            return Ok(Box::new(move |fr| {
                let mut ctx = fr.rt.ctx.borrow_mut();
                ctx.check_active("emit").map_err(|e| fill(e, pos))?;
                ctx.publish_with(|out, limit| record.write(&fr.locals, out, limit))
                    .map_err(|e| fill(e, pos))?;
                Ok(Dynamic::UNIT)
            }));
        }
        if (name, n) == ("contains", 2)
            && (!matches!(call.args[0], Expr::Variable(..)) || self.ev_arg(&call.args[0]))
        {
            let a = self.container(&call.args[0], &call.args[1])?;
            let b = self.expr(&call.args[1])?;
            let name = match &call.args[1] {
                Expr::StringConstant(s, _) => Some(s.clone()),
                _ => None,
            };
            return Ok(self.contains(a, b, name, pos));
        }
        let mut args = call
            .args
            .iter()
            .map(|a| self.expr(a))
            .collect::<Result<Vec<_>, _>>()?;
        match (name, n) {
            ("emit", 1) if matches!(call.args[0], Expr::Map(..)) => {
                // A map literal, encoded straight from its values in key order.
                let Expr::Map(m, _) = &call.args[0] else {
                    unreachable!("checked")
                };
                let mut order: Vec<usize> = (0..m.0.len()).collect();
                order.sort_by(|&a, &b| m.0[a].0.name.as_str().cmp(m.0[b].0.name.as_str()));
                let keys: Vec<RecordField> =
                    m.0.iter()
                        .map(|(k, _)| RecordField::new(k.name.clone(), 0, None))
                        .collect();
                let fields =
                    m.0.iter()
                        .map(|(_, v)| self.num(v))
                        .collect::<Result<Vec<_>, _>>()?;
                let data = self.data;
                // The values wait in locals of their own (no vector per emit; numbers left
                // there need no drop, the rest is cleared when the call ends).
                let slots: Vec<usize> = fields.iter().map(|_| self.new_slot()).collect();
                return Ok(Box::new(move |fr| {
                    let mut total = Sizes::default();
                    for (f, &slot) in fields.iter().zip(&slots) {
                        let v = f(fr)?.into_dynamic();
                        data.add_entry(&mut total, &v)?;
                        put(&mut fr.locals[slot], v);
                    }
                    let mut ctx = fr.rt.ctx.borrow_mut();
                    ctx.check_active("emit").map_err(|e| fill(e, pos))?;
                    let locals = &fr.locals;
                    ctx.publish_with(|out, limit| {
                        let entries = order.iter().map(|&i| (&*keys[i].key, &locals[slots[i]]));
                        crate::json::write_encoded_entries(out, entries, limit)
                    })
                    .map_err(|e| fill(e, pos))?;
                    Ok(Dynamic::UNIT)
                }));
            }
            ("emit", 1) => {
                let v = args.pop().expect("one arg");
                return Ok(Box::new(move |fr| {
                    let value = v(fr)?.flatten();
                    let mut ctx = fr.rt.ctx.borrow_mut();
                    ctx.check_active("emit").map_err(|e| fill(e, pos))?;
                    let topic = ctx.main_topic();
                    ctx.publish(topic, None, &value).map_err(|e| fill(e, pos))?;
                    Ok(Dynamic::UNIT)
                }));
            }
            ("key", 0) => {
                return Ok(Box::new(move |fr| {
                    let ctx = fr.rt.ctx.borrow();
                    ctx.check_active("key").map_err(|e| fill(e, pos))?;
                    Ok(ctx.key.to_dynamic())
                }))
            }
            ("now", 0) => {
                return Ok(Box::new(move |fr| {
                    let ctx = fr.rt.ctx.borrow();
                    ctx.check_active("now").map_err(|e| fill(e, pos))?;
                    Ok(Dynamic::from_int(ctx.now))
                }))
            }
            ("watermark", 0) => {
                return Ok(Box::new(move |fr| {
                    let ctx = fr.rt.ctx.borrow();
                    ctx.check_active("watermark").map_err(|e| fill(e, pos))?;
                    Ok(Dynamic::from_int(ctx.watermark))
                }))
            }
            ("emit", 2) | ("emit_to", 2) | ("emit_to", 3) | ("set_timer", 1) | ("forget", 0) => {
                // The built-ins' own code on the call context, the one to call chosen here (no
                // name compared per call). A topic name that is not a string has no function
                // to call: the helper gives the interpreter's error.
                let builtin = match (name, n) {
                    ("emit", _) => Builtin::EmitNamed,
                    ("emit_to", 2) => Builtin::EmitTo,
                    ("emit_to", _) => Builtin::EmitToNamed,
                    ("set_timer", _) => Builtin::SetTimer,
                    _ => Builtin::Forget,
                };
                let params: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
                let helper = self
                    .helpers
                    .borrow_mut()
                    .add(n, &format!("{name}({})", params.join(", ")));
                let named = matches!(builtin, Builtin::EmitNamed | Builtin::EmitToNamed);
                return Ok(Box::new(move |fr| {
                    let mut values = Vec::with_capacity(args.len());
                    for a in &args {
                        values.push(a(fr)?.flatten());
                    }
                    if named && !values[0].is_string() {
                        return call_helper(fr, &helper, None, values, pos);
                    }
                    let mut ctx = fr.rt.ctx.borrow_mut();
                    let text = |v: &Dynamic| v.as_immutable_string_ref().expect("a string").clone();
                    match (builtin, values.as_slice()) {
                        (Builtin::EmitNamed, [topic, v]) => {
                            builtins::emit_named(&mut ctx, &text(topic), v)
                        }
                        (Builtin::EmitTo, [k, v]) => builtins::emit_to(&mut ctx, None, k, v),
                        (Builtin::EmitToNamed, [topic, k, v]) => {
                            builtins::emit_to(&mut ctx, Some(&text(topic)), k, v)
                        }
                        (Builtin::SetTimer, [t]) => builtins::set_timer(&mut ctx, t),
                        (Builtin::Forget, []) => builtins::forget(&mut ctx),
                        _ => unreachable!("the arity was matched at compile time"),
                    }
                    .map_err(|e| fill(e, pos))?;
                    Ok(Dynamic::UNIT)
                }));
            }
            _ => {}
        }
        // Any other native function: through a helper, the first argument in place when it
        // is a variable (as the interpreter passes it).
        let params: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
        let by_ref = match call.args.first() {
            Some(Expr::Variable(x, _, _)) => self.local(&x.1),
            Some(Expr::ThisPtr(p)) => return unsupported(*p, "`this` as an argument"),
            _ => None,
        };
        let helper = match by_ref {
            Some(_) => {
                let rest: Vec<String> = (1..n).map(|i| format!("a{i}")).collect();
                let mut all = vec!["this".to_owned()];
                all.extend(rest);
                self.helpers
                    .borrow_mut()
                    .add(n, &format!("{name}({})", all.join(", ")))
            }
            None => self
                .helpers
                .borrow_mut()
                .add(n, &format!("{name}({})", params.join(", "))),
        };
        // A plugin function no other function shares a name with: called as Rust when one of
        // that name fits the arguments' types.
        let plain = match by_ref {
            None if self.plain.contains(name) => plain_natives_for(name, n),
            _ => Natives::default(),
        };
        // A standard function: in Rust when the arguments are its types. (Those that change
        // an array are done in place only as methods.)
        if let Some(std) = self.std_fn(name, n).filter(|f| !f.mutates()) {
            return Ok(Box::new(move |fr| {
                let mut values: smallvec::SmallVec<[Dynamic; 2]> = smallvec::SmallVec::new();
                for (k, a) in args.iter().enumerate() {
                    values.push(match by_ref {
                        Some(_) if k == 0 => Dynamic::UNIT,
                        _ => a(fr)?.flatten(),
                    });
                }
                let done = {
                    let refs: smallvec::SmallVec<[&Dynamic; 2]> = values
                        .iter()
                        .enumerate()
                        .map(|(k, v)| match by_ref {
                            Some(i) if k == 0 => &fr.locals[i],
                            _ => v,
                        })
                        .collect();
                    std.apply_within(fr.rt.engine, &refs)
                };
                match done {
                    Some(v) => Ok(v),
                    None => call_native_fn(fr, &plain, by_ref, &helper, values.into_vec(), pos),
                }
            }));
        }
        Ok(Box::new(move |fr| {
            let mut values = Vec::with_capacity(args.len());
            for (k, a) in args.iter().enumerate() {
                values.push(match by_ref {
                    Some(_) if k == 0 => Dynamic::UNIT,
                    _ => a(fr)?.flatten(),
                });
            }
            call_native_fn(fr, &plain, by_ref, &helper, values, pos)
        }))
    }

    /// The standard function `name` of `arity` arguments, when compiled code may call it as
    /// Rust: no function of the engine outside the standard library has its name for its types.
    fn std_fn(&self, name: &str, arity: usize) -> Option<StdFn> {
        crate::std_fns::lookup(name, arity)
            .filter(|_| !self.shadowed.contains(&(name.to_owned(), arity)))
    }

    /// The standard property getter `x.name`, when compiled code may call it as Rust.
    fn std_getter(&self, name: &str) -> Option<StdFn> {
        crate::std_fns::getter(name).filter(|_| {
            !self.shadowed.contains(&(format!("get${name}"), 1))
                && !self.shadowed.contains(&(name.to_owned(), 1))
        })
    }
}

/// A native function call (not a script function, not one done in line) with its arguments
/// evaluated: a plugin function that fits them as Rust, else the helper; the first argument,
/// `by_ref`, passed in place (its value in `values` is `()`).
fn call_native_fn(
    fr: &mut Frame,
    plain: &Natives,
    by_ref: Option<usize>,
    helper: &str,
    mut values: Vec<Dynamic>,
    pos: Position,
) -> R<Dynamic> {
    if !plain.is_empty() {
        if let Some(v) = call_plain(fr.rt.engine, plain, &mut values, pos)? {
            return Ok(v);
        }
        return call_helper(fr, helper, None, values, pos);
    }
    match by_ref {
        Some(i) => {
            let (engine, helpers) = (fr.rt.engine, fr.helpers);
            run_helper(
                engine,
                helpers,
                helper,
                Some(&mut fr.locals[i]),
                values,
                pos,
            )
        }
        None => call_helper(fr, helper, None, values, pos),
    }
}

type NFn = Box<dyn Fn(&mut Frame) -> R<Num>>;

/// Typed code: expressions whose values are mostly numbers, compiled to closures that pass
/// [`Num`]s, not `Dynamic`s. Every result is the one [`Cx::expr`] would give.
impl Cx<'_> {
    /// `e` as typed code: reads of locals, slots and event fields, number and boolean constants
    /// and the operators on them unboxed; anything else through [`Cx::expr`].
    fn num(&mut self, e: &Expr) -> Result<NFn, Unsupported> {
        match e {
            Expr::IntegerConstant(n, _) => {
                let n = *n;
                return Ok(Box::new(move |_| Ok(Num::I(n))));
            }
            Expr::FloatConstant(x, _) => {
                let x: FLOAT = **x;
                return Ok(Box::new(move |_| Ok(Num::F(x))));
            }
            Expr::BoolConstant(b, _) => {
                let b = *b;
                return Ok(Box::new(move |_| Ok(Num::B(b))));
            }
            Expr::Variable(x, _, _) if x.2.is_empty() && self.record(e).is_none() => {
                if let Some(i) = self.local(&x.1).filter(|&i| self.ev_local != Some(i)) {
                    return Ok(Box::new(move |fr| Ok(Num::of(&fr.locals[i]))));
                }
            }
            Expr::FnCall(call, pos)
                if call.namespace.is_empty()
                    && !call.capture_parent_scope
                    && call.args.len() == 2
                    && call
                        .op_token
                        .as_ref()
                        .is_some_and(|t| !matches!(t, Token::In)) =>
            {
                let op = call.op_token.clone().expect("checked");
                let a = self.num(&call.args[0])?;
                let b = self.num(&call.args[1])?;
                return Ok(self.binop(op, a, b, *pos));
            }
            Expr::Dot(..) if !has_index(e) => {
                if let Some(f) = self.num_read(e)? {
                    return Ok(f);
                }
            }
            _ => {}
        }
        let f = self.expr(e)?;
        Ok(Box::new(move |fr| Ok(Num::from_dynamic(f(fr)?))))
    }

    /// `this.f`, `ev.f` and a record's `m.f` as typed reads; `None` for other chains.
    fn num_read(&mut self, e: &Expr) -> Result<Option<NFn>, Unsupported> {
        let (root, segs) = flatten(e)?;
        let [Seg::Prop(name, ..)] = segs.as_slice() else {
            return Ok(None);
        };
        if let Some(record) = self.record(root) {
            let slot = record.field(name).expect("record_use saw every read").slot;
            return Ok(Some(Box::new(move |fr| Ok(Num::of(&fr.locals[slot])))));
        }
        if matches!(root, Expr::ThisPtr(_)) && self.this_ok {
            if let Some(slot) = self.layout.fields.iter().position(|f| f == name) {
                return Ok(Some(Box::new(move |fr| Ok(Num::of(fr.slot(slot))))));
            }
            return Ok(None);
        }
        if self.ev_param(root).is_some() {
            // The general read (an event boxed in a local, or not an event at all) stays as it
            // is; the unboxed event is read straight from its tape.
            let slow = self.chain(e)?;
            // A plain `str`: an `ImmutableString` costs a check of its representation per read.
            let name: Box<str> = name.as_str().into();
            let hint = std::cell::Cell::new(0);
            return Ok(Some(Box::new(move |fr| match fr.event {
                Some(ev) => Ok(match ev.get_hinted_scalar(&name, &hint) {
                    Ok(crate::event::Value::Int(n)) => Num::I(n),
                    Ok(crate::event::Value::Float(x)) => Num::F(x),
                    Ok(crate::event::Value::Bool(b)) => Num::B(b),
                    Ok(_) => unreachable!("get_hinted_scalar gives numbers and booleans"),
                    Err(d) => Num::D(d),
                }),
                None => Ok(Num::from_dynamic(slow(fr)?)),
            })));
        }
        Ok(None)
    }

    /// `a op b` on typed operands: unboxed when both are numbers (or booleans), otherwise boxed
    /// and done as [`Cx::expr`] does it (inline for the standard types, else a helper).
    ///
    /// The arithmetic and comparison operators get a closure each, with the operator a
    /// constant: [`num_binop`] is inlined into it and its match on the operator folds away.
    fn binop(&mut self, op: Token, a: NFn, b: NFn, pos: Position) -> NFn {
        let helper: Rc<str> = self
            .helpers
            .borrow_mut()
            .add(2, &format!("a0 {} a1", op.literal_syntax()));
        macro_rules! typed {
            ($($t:ident)*) => {
                match op {
                    $(Token::$t => Box::new(move |fr: &mut Frame| {
                        const OP: Token = Token::$t;
                        let x = a(fr)?;
                        let y = b(fr)?;
                        if let Some(v) = num_binop(&OP, &x, &y, pos)? {
                            return Ok(v);
                        }
                        boxed_binop(fr, &OP, x, y, &helper, pos)
                    }),)*
                    op => Box::new(move |fr: &mut Frame| {
                        let x = a(fr)?;
                        let y = b(fr)?;
                        if let Some(v) = num_binop(&op, &x, &y, pos)? {
                            return Ok(v);
                        }
                        boxed_binop(fr, &op, x, y, &helper, pos)
                    }),
                }
            };
        }
        typed!(Plus Minus Multiply Divide Modulo EqualsTo NotEqualsTo GreaterThan
            GreaterThanEqualsTo LessThan LessThanEqualsTo)
    }

    /// A condition (`if`, `&&`, `||`): its value as a bool, or the interpreter's type error.
    fn cond(&mut self, e: &Expr) -> Result<BFn, Unsupported> {
        // (Where Rhai places a condition that is no bool: the expression's position, which for
        // `ev.q` is the `.`, not where the expression starts.)
        let pos = e.position();
        let helper: Rc<str> = self
            .helpers
            .borrow_mut()
            .add(1, "if a0 { true } else { false }");
        // `a && b`, `a || b`, `"f" in ev` and the comparisons give their bool straight (no value
        // made and then read as a bool): one closure instead of two or three.
        if let Expr::And(xs, _) | Expr::Or(xs, _) = e {
            let is_and = matches!(e, Expr::And(..));
            let parts = xs
                .iter()
                .map(|x| self.cond(x))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Box::new(move |fr| {
                for p in &parts {
                    if p(fr)? != is_and {
                        return Ok(!is_and);
                    }
                }
                Ok(is_and)
            }));
        }
        if let Expr::FnCall(call, cpos) = e {
            let plain = call.namespace.is_empty() && !call.capture_parent_scope;
            if plain && call.args.len() == 2 {
                // (`x in c` is the call `contains(c, x)`, with no operator token; a script
                // function of that name would be called instead.)
                let contains = call.op_token.is_none()
                    && call.name.as_str() == "contains"
                    && !self.index.contains_key(&("contains".to_owned(), 2));
                match (&call.op_token, &call.args[1]) {
                    (None, Expr::StringConstant(name, _))
                        if contains && self.ev_param(&call.args[0]).is_some() =>
                    {
                        let name: Box<str> = name.as_str().into();
                        let slow = self.expr(e)?;
                        return Ok(Box::new(move |fr| match fr.event {
                            Some(ev) => Ok(ev.contains(&name)),
                            None => {
                                let v = Num::from_dynamic(slow(fr)?);
                                truth(fr, v, &helper, pos)
                            }
                        }));
                    }
                    (Some(op), _) if is_comparison(op) => {
                        let a = self.num(&call.args[0])?;
                        let b = self.num(&call.args[1])?;
                        let op_helper = self
                            .helpers
                            .borrow_mut()
                            .add(2, &format!("a0 {} a1", op.literal_syntax()));
                        let cpos = *cpos;
                        macro_rules! typed {
                            ($($t:ident)*) => {
                                match op.clone() {
                                    $(Token::$t => Box::new(move |fr: &mut Frame| {
                                        const OP: Token = Token::$t;
                                        let x = a(fr)?;
                                        let y = b(fr)?;
                                        let v = match num_binop(&OP, &x, &y, cpos)? {
                                            Some(v) => v,
                                            None => boxed_binop(fr, &OP, x, y, &op_helper, cpos)?,
                                        };
                                        truth(fr, v, &helper, pos)
                                    }),)*
                                    _ => unreachable!("a comparison"),
                                }
                            };
                        }
                        return Ok(typed!(EqualsTo NotEqualsTo GreaterThan GreaterThanEqualsTo
                            LessThan LessThanEqualsTo));
                    }
                    _ => {}
                }
            }
        }
        let f = self.num(e)?;
        Ok(Box::new(move |fr| {
            let v = f(fr)?;
            truth(fr, v, &helper, pos)
        }))
    }
}

/// Whether `op` is one of the six comparisons.
fn is_comparison(op: &Token) -> bool {
    matches!(
        op,
        Token::EqualsTo
            | Token::NotEqualsTo
            | Token::GreaterThan
            | Token::GreaterThanEqualsTo
            | Token::LessThan
            | Token::LessThanEqualsTo
    )
}

/// A condition's value as a bool: a bool as it is, anything else as the interpreter's `if`
/// takes it (by the helper `if a0 { true } else { false }`: its error, or its value).
#[inline(always)]
fn truth(fr: &mut Frame, v: Num, helper: &str, pos: Position) -> R<bool> {
    match v {
        Num::B(b) => Ok(b),
        other => call_helper(fr, helper, None, vec![other.into_dynamic()], pos)?
            .as_bool()
            .map_err(|_| EvalAltResult::ErrorRuntime(Dynamic::UNIT, pos).into()),
    }
}

/// `x op y` when the operands are not both numbers (or booleans): boxed and done as
/// [`Cx::expr`] does it, inline for the standard types, else by a helper.
#[inline(never)]
fn boxed_binop(fr: &Frame, op: &Token, x: Num, y: Num, helper: &str, pos: Position) -> R<Num> {
    let (x, y) = (x.into_dynamic(), y.into_dynamic());
    match fast_binop(op, &x, &y, pos)? {
        Some(v) => Ok(Num::from_dynamic(v)),
        None => call_helper(fr, helper, None, vec![x, y], pos).map(Num::from_dynamic),
    }
}

/// `x op= v` on a local or a slot of `this`: numbers unboxed, the result written over the
/// target; other values as [`boxed_op_assign`] does them. Each arithmetic and comparison
/// operator gets a closure of its own with the operator a constant (as in [`Cx::binop`]).
fn op_assign(
    op: Token,
    helper: Rc<str>,
    root: Target,
    value: NFn,
    pos: Position,
    op_pos: Position,
) -> SFn {
    // The body of one closure, for operator `$op` (a constant, or the captured `op`).
    macro_rules! op_assign {
        ($op:expr) => {
            Box::new(move |fr: &mut Frame| {
                fr.tick(pos)?;
                let v = value(fr)?;
                let (engine, helpers) = (fr.rt.engine, fr.helpers);
                let Some(target) = target_ref(fr, root) else {
                    return Ok(Flow::Normal(Dynamic::UNIT));
                };
                if let Some(x) = Num::scalar(target) {
                    if let Some(new) = num_binop(&$op, &x, &v, op_pos)? {
                        put(target, new.into_dynamic());
                        return Ok(Flow::Normal(Dynamic::UNIT));
                    }
                }
                boxed_op_assign(engine, helpers, target, &$op, v, &helper, op_pos)
            })
        };
    }
    macro_rules! typed {
        ($($t:ident)*) => {
            match op {
                $(Token::$t => {
                    const OP: Token = Token::$t;
                    op_assign!(OP)
                })*
                op => op_assign!(op),
            }
        };
    }
    typed!(Plus Minus Multiply Divide Modulo)
}

/// `target op= v` when the two are not both numbers: inline for the standard types, else by
/// the helper running `a0 op= a1; a0`.
#[inline(never)]
fn boxed_op_assign(
    engine: &Engine,
    helpers: &AST,
    target: &mut Dynamic,
    op: &Token,
    v: Num,
    helper: &str,
    op_pos: Position,
) -> R<Flow> {
    let v = v.into_dynamic();
    *target = match fast_binop(op, target, &v, op_pos)? {
        Some(new) => new,
        None => {
            let args = vec![target.clone(), v];
            run_helper(engine, helpers, helper, None, args, op_pos)?
        }
    };
    Ok(Flow::Normal(Dynamic::UNIT))
}

/// A local map that is never a map: `let m = #{...}` whose later uses are only `m.f = v`,
/// reads of the literal's fields and `emit(m)` (see [`Cx::record_fields`]). Each field is a
/// local of its own, and `emit(m)` encodes them straight to JSON, as the map would be encoded.
struct Record {
    /// In key order, as a map holds them.
    fields: Vec<RecordField>,
}

struct RecordField {
    name: ImmutableString,
    /// `"name":`, encoded once.
    key: Box<[u8]>,
    slot: usize,
    /// For a field the literal does not make: the local saying whether it was given.
    present: Option<usize>,
}

impl RecordField {
    fn new(name: ImmutableString, slot: usize, present: Option<usize>) -> Self {
        let mut key = Vec::with_capacity(name.len() + 3);
        crate::json::write_str(&mut key, &name);
        key.push(b':');
        RecordField {
            name,
            key: key.into_boxed_slice(),
            slot,
            present,
        }
    }
}

impl Record {
    fn field(&self, name: &str) -> Option<&RecordField> {
        self.fields.iter().find(|f| f.name.as_str() == name)
    }

    /// The record as the JSON object of the map it stands for.
    fn write(
        &self,
        locals: &[Dynamic],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), crate::json::EncodeError> {
        let present = self.fields.iter().filter(|f| match f.present {
            None => true,
            Some(p) => locals[p].as_bool().unwrap_or(false),
        });
        crate::json::write_encoded_entries(out, present.map(|f| (&*f.key, &locals[f.slot])), limit)
    }
}

/// Whether the use of a record's variable `var` at the end of `path` is one a record handles:
/// `m.f = v` (the field noted in `extra` when the literal does not make it), a read `m.f` of a
/// field of the literal, or `emit(m)`.
fn record_use(
    path: &[ASTNode],
    var: &Expr,
    literal: &[&str],
    extra: &mut Vec<ImmutableString>,
) -> bool {
    let n = path.len();
    let parent = n.checked_sub(2).map(|i| &path[i]);
    let grand = n.checked_sub(3).map(|i| &path[i]);
    match parent {
        Some(ASTNode::Expr(dot @ Expr::Dot(be, ..))) if std::ptr::eq(&be.lhs, var) => {
            let Expr::Property(p, _) = &be.rhs else {
                return false;
            };
            let field = &p.2;
            if let Some(ASTNode::Stmt(Stmt::Assignment(a))) = grand {
                if std::ptr::eq(&a.1.lhs, *dot) {
                    if a.0.is_op_assignment() {
                        return false;
                    }
                    if !literal.contains(&field.as_str()) && !extra.contains(field) {
                        extra.push(field.clone());
                    }
                    return true;
                }
            }
            literal.contains(&field.as_str())
        }
        Some(ASTNode::Expr(Expr::FnCall(call, _))) | Some(ASTNode::Stmt(Stmt::FnCall(call, _))) => {
            call.name.as_str() == "emit"
                && call.args.len() == 1
                && call.namespace.is_empty()
                && call.op_token.is_none()
                && !call.capture_parent_scope
        }
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Target {
    Slot(usize),
    Local(usize),
}

fn target_ref<'a>(fr: &'a mut Frame, t: Target) -> Option<&'a mut Dynamic> {
    match t {
        Target::Slot(i) => Some(fr.slot(i)),
        Target::Local(i) => fr.locals.get_mut(i),
    }
}

enum Start {
    Place(Target),
    Value(EFn),
    /// A top-level constant: its first step reads it in place where it can (see
    /// [`Step::read`]), since a copy of a large list per call would cost more than the lookup.
    Const(Dynamic),
}

/// The value of `steps` on the top-level constant `v`, worked out once at compile time: when
/// each step is a property the map has, or a standard function of no argument that changes
/// nothing and gives a value, and the end is a number, a boolean, a character, a string or
/// `()`, cheap to copy per call. (`BOUNDS.len()` in a loop's condition.) `None` otherwise, and
/// the chain runs per call, with Rhai's value or error.
fn fold_const(v: &Dynamic, steps: &[Step]) -> Option<Dynamic> {
    let mut value = v.clone();
    for step in steps {
        let next = match step {
            Step::Prop(name, .., std) => match value.as_map_ref() {
                Ok(map) => map.get(name.as_str())?.clone(),
                Err(_) => std.as_ref()?.apply(&[&value])?,
            },
            Step::Method(_, args, .., Some(f)) if args.is_empty() && !f.mutates() => {
                f.apply(&[&value])?
            }
            Step::Method(..) => return None,
        };
        value = next;
    }
    let small = value.is_unit()
        || value.is_int()
        || value.is_float()
        || value.is_bool()
        || value.is_char()
        || value.is_string();
    small.then_some(value)
}

/// Walks a chain: its root, then each step on what the one before gave, `args` giving each
/// step's arguments as it comes.
#[inline(always)]
fn walk_chain(
    fr: &mut Frame,
    start: &Start,
    steps: &[Step],
    mut args: impl FnMut(&Step, &mut Frame) -> R<Vec<Dynamic>>,
) -> R<Dynamic> {
    let mut steps = steps.iter();
    let mut value = match start {
        Start::Value(f) => f(fr)?,
        Start::Const(v) => {
            let Some(step) = steps.next() else {
                return Ok(v.clone());
            };
            let args = args(step, fr)?;
            match step.read(fr.rt.engine, v, &args) {
                Some(read) => read,
                None => step.apply(fr.rt.engine, fr.helpers, &mut v.clone(), args)?,
            }
        }
        Start::Place(t) => {
            // The first step works on the place itself (a method may change it).
            let Some(step) = steps.next() else {
                return Ok(target_ref(fr, *t)
                    .map(|v| v.clone())
                    .unwrap_or(Dynamic::UNIT));
            };
            let args = args(step, fr)?;
            let helpers = fr.helpers;
            let engine = fr.rt.engine;
            let place = target_ref(fr, *t).expect("bound");
            step.apply(engine, helpers, place, args)?
        }
    };
    for step in steps {
        let args = args(step, fr)?;
        value = step.apply(fr.rt.engine, fr.helpers, &mut value, args)?;
    }
    Ok(value)
}

/// One step of a chain: a property or a method, with its helper, the plugin functions of that
/// name it may call directly (see [`Native`]) and the standard function it may do in Rust (see
/// [`crate::std_fns`]).
enum Step {
    Prop(ImmutableString, Rc<str>, Position, Natives, Option<StdFn>),
    Method(
        ImmutableString,
        Vec<EFn>,
        Rc<str>,
        Position,
        Natives,
        Option<StdFn>,
    ),
}

impl Step {
    /// The step on a value it may not change, without a copy: a map's field, or a standard
    /// function that changes nothing. `None` for anything else (done by [`Step::apply`] on a
    /// copy).
    fn read(&self, engine: &Engine, on: &Dynamic, args: &[Dynamic]) -> Option<Dynamic> {
        match self {
            Step::Prop(name, .., std) => match on.as_map_ref() {
                Ok(map) => Some(map.get(name.as_str()).cloned().unwrap_or(Dynamic::UNIT)),
                Err(_) => std.and_then(|f| f.apply_within(engine, &[on])),
            },
            Step::Method(.., Some(f)) if !f.mutates() => match args {
                [] => f.apply_within(engine, &[on]),
                [a] => f.apply_within(engine, &[on, a]),
                _ => None,
            },
            Step::Method(..) => None,
        }
    }

    fn args(&self, fr: &mut Frame) -> R<Vec<Dynamic>> {
        match self {
            Step::Prop(..) => Ok(Vec::new()),
            Step::Method(_, args, ..) => {
                let mut out = Vec::with_capacity(args.len());
                for a in args {
                    out.push(a(fr)?.flatten());
                }
                Ok(out)
            }
        }
    }

    fn apply(
        &self,
        engine: &Engine,
        helpers: &AST,
        on: &mut Dynamic,
        args: Vec<Dynamic>,
    ) -> R<Dynamic> {
        let mut args = args;
        let (helper, pos) = match self {
            Step::Prop(name, helper, pos, natives, std) => {
                if let Some(ev) = on.read_lock::<Event>() {
                    return Ok(ev.get(name));
                }
                if let Ok(map) = on.as_map_ref() {
                    return Ok(map.get(name.as_str()).cloned().unwrap_or(Dynamic::UNIT));
                }
                if let Some(v) = std.and_then(|f| f.apply_within(engine, &[on])) {
                    return Ok(v);
                }
                if let Some(v) = call_native(engine, natives, name, on, &mut args, *pos)? {
                    return Ok(v);
                }
                (helper, *pos)
            }
            Step::Method(name, _, helper, pos, natives, std) => {
                if let Some(v) = fast_method(name, on, &args, *pos)? {
                    return Ok(v);
                }
                let done = std.and_then(|f| match args.as_slice() {
                    _ if f.mutates() => f.apply_mut(engine, on, &args),
                    [] => f.apply_within(engine, &[on]),
                    [a] => f.apply_within(engine, &[on, a]),
                    _ => None,
                });
                if let Some(v) = done {
                    return Ok(v);
                }
                if let Some(v) = call_native(engine, natives, name, on, &mut args, *pos)? {
                    return Ok(v);
                }
                (helper, *pos)
            }
        };
        run_helper(engine, helpers, helper, Some(on), args, pos)
    }
}

/// A plugin function of a manifest ([`eddy_plugins::manifests`]), called as Rust on the value in
/// its slot instead of through a helper: the same function the interpreter would resolve, with
/// the interpreter's checks around it (a non-pure method on a constant, the data size of the
/// result, the error placed at the call).
struct Native {
    /// Parameter types as Rhai matches them (`&str` and `String` as `ImmutableString`); the
    /// first is a plugin type.
    params: Box<[TypeId]>,
    func: &'static (dyn PluginFunc + Send + Sync),
}

/// The plugin functions of one name and arity that a chain step may call directly.
type Natives = Box<[&'static Native]>;

/// Every plugin function that takes a plugin object first and needs no call context, by the
/// name Rhai registers it under (`push`, `get$len`, ...): the manifests' functions and the
/// learners' for maps, arrays and events.
fn natives() -> &'static HashMap<&'static str, Vec<Native>> {
    static TABLE: OnceLock<HashMap<&'static str, Vec<Native>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let manifests = eddy_plugins::manifests();
        // The plugin types: the first parameter of the manifests' methods that is no Rhai type.
        let builtin = [
            TypeId::of::<Dynamic>(),
            TypeId::of::<rhai::INT>(),
            TypeId::of::<FLOAT>(),
            TypeId::of::<bool>(),
            TypeId::of::<char>(),
            TypeId::of::<()>(),
            TypeId::of::<ImmutableString>(),
            TypeId::of::<&str>(),
            TypeId::of::<String>(),
            TypeId::of::<rhai::Array>(),
            TypeId::of::<Map>(),
            TypeId::of::<rhai::Blob>(),
        ];
        let mut table: HashMap<&'static str, Vec<Native>> = HashMap::new();
        for m in manifests {
            m.for_each_fn(true, &mut |entry| {
                let func = entry.func();
                if func.has_context() || !func.is_method_call() {
                    return;
                }
                let mut params = Vec::new();
                entry.with_param_types(&mut |types| {
                    params = types
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| {
                            let text = t == TypeId::of::<&str>() || t == TypeId::of::<String>();
                            if i > 0 && text {
                                TypeId::of::<ImmutableString>()
                            } else {
                                t
                            }
                        })
                        .collect();
                });
                if params.first().is_none_or(|t| builtin.contains(t)) {
                    return;
                }
                table.entry(entry.name()).or_default().push(Native {
                    params: params.into_boxed_slice(),
                    func,
                });
            });
        }
        // The learners' functions for each feature vector type (registered outside the
        // manifests, by `register_learners`), kept for the life of the process.
        let learners = [
            eddy_plugins::learner_methods::<Map>(),
            eddy_plugins::learner_methods::<rhai::Array>(),
            eddy_plugins::learner_methods::<Event>(),
        ];
        for m in learners.into_iter().flatten() {
            if m.func.has_context() || !m.func.is_method_call() {
                continue;
            }
            let func: &'static (dyn PluginFunc + Send + Sync) = Box::leak(m.func);
            table.entry(m.name).or_default().push(Native {
                params: m.params.into_boxed_slice(),
                func,
            });
        }
        table
    })
}

/// The plugin functions called `name` with `params` parameters (the receiver included).
fn natives_for(name: &str, params: usize) -> Natives {
    natives()
        .get(name)
        .map(|fns| fns.iter().filter(|n| n.params.len() == params).collect())
        .unwrap_or_default()
}

/// The plugin functions that are not methods (their first parameter, if any, is a Rhai type:
/// constructors such as `ohlc()`, `window_start(ts, "1m")`, `sentiment(text)`), by name.
fn plain_natives() -> &'static HashMap<&'static str, Vec<Native>> {
    static TABLE: OnceLock<HashMap<&'static str, Vec<Native>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table: HashMap<&'static str, Vec<Native>> = HashMap::new();
        for m in eddy_plugins::manifests() {
            m.for_each_fn(true, &mut |entry| {
                let func = entry.func();
                if func.has_context() || func.is_method_call() {
                    return;
                }
                let mut params = Vec::new();
                entry.with_param_types(&mut |types| {
                    params = types
                        .iter()
                        .map(|&t| {
                            if t == TypeId::of::<&str>() || t == TypeId::of::<String>() {
                                TypeId::of::<ImmutableString>()
                            } else {
                                t
                            }
                        })
                        .collect();
                });
                table.entry(entry.name()).or_default().push(Native {
                    params: params.into_boxed_slice(),
                    func,
                });
            });
        }
        table
    })
}

fn plain_natives_for(name: &str, params: usize) -> Natives {
    plain_natives()
        .get(name)
        .map(|fns| fns.iter().filter(|n| n.params.len() == params).collect())
        .unwrap_or_default()
}

/// The names of [`plain_natives`] that no other function of `engine` has (the standard
/// library's, the engine's own, the learners'): a call by such a name can only resolve to one of
/// them, so picking it by the arguments' types is what Rhai does.
fn plain_names(engine: &Engine) -> std::collections::HashSet<&'static str> {
    let mut all: HashMap<String, usize> = HashMap::new();
    let names = engine.collect_fn_metadata(
        None,
        |f| {
            let name = f.metadata.name.as_str();
            plain_natives().contains_key(name).then(|| name.to_owned())
        },
        true,
    );
    for name in names {
        *all.entry(name).or_default() += 1;
    }
    plain_natives()
        .iter()
        .filter(|(name, fns)| all.get(**name) == Some(&fns.len()))
        .map(|(name, _)| *name)
        .collect()
}

/// Calls the one function of `natives` whose parameter types fit `args` (each exactly, or a
/// `Dynamic` parameter), as Rhai's native call does; `Ok(None)` when none or more than one fits
/// (the helper then asks Rhai).
fn call_plain(
    engine: &Engine,
    natives: &[&'static Native],
    args: &mut [Dynamic],
    pos: Position,
) -> R<Option<Dynamic>> {
    let any = TypeId::of::<Dynamic>();
    let mut found = None;
    for n in natives {
        if n.params
            .iter()
            .zip(args.iter())
            .all(|(&p, a)| p == any || p == a.type_id())
        {
            if found.is_some() {
                return Ok(None);
            }
            found = Some(n);
        }
    }
    let Some(native) = found else {
        return Ok(None);
    };
    let result = match args {
        [] => native.func.call(None, &mut []),
        [a] => native.func.call(None, &mut [a]),
        [a, b] => native.func.call(None, &mut [a, b]),
        [a, b, c] => native.func.call(None, &mut [a, b, c]),
        more => {
            let mut all: Vec<&mut Dynamic> = more.iter_mut().collect();
            native.func.call(None, &mut all)
        }
    };
    let value = result.map_err(|e| fill(e, pos))?;
    engine
        .ensure_data_size_within_limits(&value)
        .map_err(|e| fill(e, pos))?;
    Ok(Some(value))
}

/// The one function of `natives` that Rhai would call on `on` with `args`: the receiver of its
/// type, each argument of its type or a `Dynamic` parameter. `None` when none or more than one
/// fits (the helper then asks Rhai).
fn pick<'n>(natives: &'n [&'static Native], on: &Dynamic, args: &[Dynamic]) -> Option<&'n Native> {
    let on_type = on.type_id();
    let any = TypeId::of::<Dynamic>();
    let mut found = None;
    for n in natives {
        let fits = n.params[0] == on_type
            && n.params[1..]
                .iter()
                .zip(args)
                .all(|(&p, a)| p == any || p == a.type_id());
        if fits {
            if found.is_some() {
                return None;
            }
            found = Some(&**n);
        }
    }
    found
}

/// Calls the plugin function `name` on `on` directly when one of `natives` fits, as the
/// interpreter's native call does; `Ok(None)` leaves the call to the helper.
fn call_native(
    engine: &Engine,
    natives: &[&'static Native],
    name: &str,
    on: &mut Dynamic,
    args: &mut [Dynamic],
    pos: Position,
) -> R<Option<Dynamic>> {
    if natives.is_empty() {
        return Ok(None);
    }
    let Some(native) = pick(natives, on, args) else {
        return Ok(None);
    };
    let func = native.func;
    if !func.is_pure() && on.is_read_only() {
        return Err(EvalAltResult::ErrorNonPureMethodCallOnConstant(name.to_owned(), pos).into());
    }
    let result = match args {
        [] => func.call(None, &mut [on]),
        [a] => func.call(None, &mut [on, a]),
        [a, b] => func.call(None, &mut [on, a, b]),
        [a, b, c] => func.call(None, &mut [on, a, b, c]),
        more => {
            let mut all: Vec<&mut Dynamic> = vec![on];
            all.extend(more.iter_mut());
            func.call(None, &mut all)
        }
    };
    let value = result.map_err(|e| fill(e, pos))?;
    engine
        .ensure_data_size_within_limits(&value)
        .map_err(|e| fill(e, pos))?;
    Ok(Some(value))
}

/// The engine's limits on the data a value holds (0: none): string bytes, array items and map
/// entries, summed over nested values as Rhai's `calc_data_sizes` does.
#[derive(Clone, Copy)]
struct DataLimits {
    string: usize,
    array: usize,
    map: usize,
}

/// Whether `v` counts toward a size limit at all (a string, an array, a BLOB or a map): the
/// cheap test before [`Sizes::of`].
fn holds_data(v: &Dynamic) -> bool {
    v.is_string() || v.is_array() || v.is_map() || v.is_blob()
}

/// A running total of array items, map entries and string bytes.
#[derive(Clone, Copy, Default)]
struct Sizes {
    arrays: usize,
    maps: usize,
    strings: usize,
}

impl Sizes {
    /// What `v` holds, as Rhai counts it for a value at the top.
    fn of(v: &Dynamic) -> Sizes {
        if let Ok(a) = v.as_array_ref() {
            return Sizes::of_array(&a);
        }
        if v.is_blob() {
            let n = v.as_blob_ref().map_or(0, |b| b.len());
            return Sizes {
                arrays: n,
                ..Sizes::default()
            };
        }
        if let Ok(m) = v.as_map_ref() {
            return Sizes::of_map(&m);
        }
        if let Ok(s) = v.as_immutable_string_ref() {
            return Sizes {
                strings: s.len(),
                ..Sizes::default()
            };
        }
        Sizes::default()
    }

    /// What `v` adds inside an array or a map (a BLOB counts one more than at the top).
    fn inner(v: &Dynamic) -> Sizes {
        let mut s = Sizes::of(v);
        if v.is_blob() {
            s.arrays += 1;
        }
        s
    }

    fn of_array(items: &[Dynamic]) -> Sizes {
        let mut total = Sizes::default();
        for v in items {
            let d = Sizes::inner(v);
            total.arrays += 1 + d.arrays;
            total.maps += d.maps;
            total.strings += d.strings;
        }
        total
    }

    fn of_map(map: &Map) -> Sizes {
        let mut total = Sizes::default();
        for v in map.values() {
            let d = Sizes::inner(v);
            total.arrays += d.arrays;
            total.maps += 1 + d.maps;
            total.strings += d.strings;
        }
        total
    }
}

impl DataLimits {
    fn of(engine: &Engine) -> DataLimits {
        DataLimits {
            string: engine.max_string_size(),
            array: engine.max_array_size(),
            map: engine.max_map_size(),
        }
    }

    fn any(&self) -> bool {
        self.string > 0 || self.array > 0 || self.map > 0
    }

    /// Adds value `v` of a map literal's entry to `total`, failing as the interpreter does when
    /// the map being built goes over a limit (an error without a position, as the
    /// interpreter's reaches the query).
    #[inline]
    fn add_entry(&self, total: &mut Sizes, v: &Dynamic) -> R<()> {
        if !self.any() {
            return Ok(());
        }
        total.maps += 1;
        // A number, a bool, `()`...: only the count of entries grew, and only its limit can
        // newly be broken (the others were checked with the entries before).
        if v.is_int() || v.is_float() || v.is_bool() || v.is_unit() {
            if self.map > 0 && total.maps > self.map {
                return self.check(total);
            }
            return Ok(());
        }
        self.add_nested(total, v)
    }

    /// Adds item `v` of an array literal to `total`, as [`DataLimits::add_entry`].
    fn add_item(&self, total: &mut Sizes, v: &Dynamic) -> R<()> {
        if !self.any() {
            return Ok(());
        }
        total.arrays += 1;
        self.add_nested(total, v)
    }

    /// Adds what `v` holds (its strings, arrays and maps) to `total` and checks the limits.
    fn add_nested(&self, total: &mut Sizes, v: &Dynamic) -> R<()> {
        if holds_data(v) {
            let d = Sizes::of(v);
            total.arrays += d.arrays;
            total.maps += d.maps;
            total.strings += d.strings;
        }
        self.check(total)
    }

    fn check(&self, total: &Sizes) -> R<()> {
        let over = |limit: usize, n: usize| limit > 0 && n > limit;
        let what = if over(self.string, total.strings) {
            "Length of string"
        } else if over(self.array, total.arrays) {
            "Size of array/BLOB"
        } else if over(self.map, total.maps) {
            "Size of object map"
        } else {
            return Ok(());
        };
        Err(EvalAltResult::ErrorDataTooLarge(what.into(), Position::NONE).into())
    }
}

/// Methods of numbers done inline: `to_float`, `to_int` of an int, `abs`.
fn fast_method(name: &str, on: &Dynamic, args: &[Dynamic], pos: Position) -> R<Option<Dynamic>> {
    if !args.is_empty() {
        return Ok(None);
    }
    Ok(match name {
        // Rhai writes an integer's decimal digits and a boolean's word (`to_string_generic`).
        "to_string" if on.is_int() => Some(on.as_int().expect("an int").to_string().into()),
        "to_string" if on.is_bool() => Some(on.as_bool().expect("a bool").to_string().into()),
        // A float as Rhai prints it (`3.0`, `0.0` for either zero, `1e20` past 1e13) and a
        // character: what Rhai's `to_string` of each writes is the value's own `Display`.
        "to_string" if on.is_float() || on.is_char() => Some(on.to_string().into()),
        "to_float" => {
            if let Ok(i) = on.as_int() {
                Some(Dynamic::from_float(i as FLOAT))
            } else if let Ok(f) = on.as_float() {
                Some(Dynamic::from_float(f))
            } else {
                None
            }
        }
        "abs" => {
            if let Ok(f) = on.as_float() {
                Some(Dynamic::from_float(f.abs()))
            } else if let Ok(i) = on.as_int() {
                Some(Dynamic::from_int(i.checked_abs().ok_or_else(|| {
                    EvalAltResult::ErrorArithmetic(format!("Negation overflow: -{i}"), pos)
                })?))
            } else {
                None
            }
        }
        _ => None,
    })
}

/// Calls `f` on the entry at the map property path `props` inside `at`, when every step is a
/// map holding it (the last entry may be missing when `insert`: it is added as `()`); `None`
/// otherwise.
fn with_map_path(
    at: &mut Dynamic,
    props: &[ImmutableString],
    insert: bool,
    f: &mut dyn FnMut(&mut Dynamic) -> R<bool>,
) -> Option<R<bool>> {
    let (first, rest) = props.split_first()?;
    if !at.is_map() {
        return None;
    }
    let mut map = at.as_map_mut().ok()?;
    if rest.is_empty() {
        if insert {
            return Some(f(map.entry(first.as_str().into()).or_insert(Dynamic::UNIT)));
        }
        return map.get_mut(first.as_str()).map(f);
    }
    with_map_path(map.get_mut(first.as_str())?, rest, insert, f)
}

/// One step of a [`Path`] below its root.
enum PStep {
    /// `.name`, with the plugin getters of that name and the property's position.
    Prop(ImmutableString, Natives, Position),
    /// `[i]`: the index is the next of the path's values.
    Index,
    /// `.name(...)` with this many arguments (the next values), the plugin functions that may
    /// run it, and its position.
    Method(ImmutableString, usize, Natives, Position),
}

/// Where a [`Path`] starts.
enum PathRoot {
    /// A slot of `this` or a local, worked on in place.
    Place(Target),
    /// Any value (a copy: what a path changes in it is lost, as in Rhai).
    Value(EFn),
    /// A top-level constant, only read: walked in place where every step finds its value (see
    /// [`read_in_place`]), so that `TIERS[i]` does not copy the list on every call.
    Const(Dynamic),
}

/// The assignment at the end of a [`Path`]: the operator of an op-assignment and its position,
/// and the value.
type PathAssign<'v> = (Option<&'v Token>, Position, Dynamic);

/// A chain with indexes in it, or with a method past its first step: `this.bars[id]`,
/// `this.tags[t].mood.add(x)`, `m[a][b] += 1`, `ev.items[0].price`. Its index values and
/// method arguments are worked out first, left to right (Rhai's order), then the root, then the
/// path is walked in place through maps (by a string key they hold) and arrays (by an integer
/// in range) and its last step done there: a read, a method (inline for numbers, a plugin's own
/// function for its objects), or an assignment or op-assignment whose result holds no data (so
/// no size limit can be crossed). Anything else (a key that is not there, a new key, a string
/// or an integer indexed, an indexer or a getter of a custom type) is done by a helper that runs
/// the whole path in Rhai on the same root with the same values, so its result and its error are
/// the interpreter's; the error is moved to the place in the query of the part of the helper it
/// points at.
struct Path {
    root: PathRoot,
    steps: Vec<PStep>,
    values: Vec<EFn>,
    helper: Rc<str>,
    /// Columns of the helper's line and the positions in the query they stand for.
    spots: Vec<(usize, Position)>,
    /// Where an error the spots do not place goes.
    at: Position,
}

impl Path {
    /// Runs the path: its value (`()` for an assignment). `assign` was worked out before the
    /// path's own values, as Rhai does.
    fn run(&self, fr: &mut Frame, assign: Option<PathAssign>) -> R<Dynamic> {
        // (Inline up to four: a path's values rarely need the heap.)
        let mut values = smallvec::SmallVec::<[Dynamic; 4]>::new();
        for f in &self.values {
            values.push(f(fr)?.flatten());
        }
        let mut temp = match &self.root {
            PathRoot::Value(f) => f(fr)?.flatten(),
            PathRoot::Const(c) => match read_in_place(c, &self.steps, &values) {
                Some(v) => return Ok(v),
                // A miss, a step out of range, a string's character...: the general way, on a
                // copy, gives Rhai's value or error.
                None => c.clone(),
            },
            PathRoot::Place(_) => Dynamic::UNIT,
        };
        let (engine, helpers) = (fr.rt.engine, fr.helpers);
        let root = match &self.root {
            PathRoot::Value(_) | PathRoot::Const(_) => &mut temp,
            PathRoot::Place(t) => match target_ref(fr, *t) {
                Some(v) => v,
                None => return Ok(Dynamic::UNIT),
            },
        };
        let (last, walk) = self.steps.split_last().expect("a path has steps");
        let mut done = |at: &mut Dynamic, rest: &mut [Dynamic]| -> R<Option<Dynamic>> {
            last_step(engine, last, at, rest, assign.as_ref())
        };
        if let Some(v) = with_parent(root, walk, &mut values, &mut done)? {
            return Ok(v);
        }
        let mut values = values.into_vec();
        if let Some((.., v)) = assign {
            values.push(v);
        }
        let mut scope = Scope::new();
        let options = CallFnOptions::new()
            .eval_ast(false)
            .rewind_scope(true)
            .bind_this_ptr(root);
        engine
            .call_fn_with_options::<Dynamic>(options, &mut scope, helpers, &self.helper, values)
            .map_err(|e| self.place_error(e))
    }

    fn place_error(&self, mut e: Box<EvalAltResult>) -> Box<EvalAltResult> {
        while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = *e {
            e = inner;
        }
        let pos = e.position();
        if !pos.is_none() {
            let col = pos.position().unwrap_or(0);
            let to = self
                .spots
                .iter()
                .find(|(c, _)| *c == col)
                .map_or(self.at, |(_, p)| *p);
            e.set_position(to);
        }
        e
    }
}

/// What a [`Path`] does at the place its steps lead to, given the values they did not use.
type LastStep<'a> = dyn FnMut(&mut Dynamic, &mut [Dynamic]) -> R<Option<Dynamic>> + 'a;

/// Calls `f` on the value `steps` lead to from `at`, with the values the steps did not use;
/// `Ok(None)` when a step cannot be walked in place (then nothing was changed).
fn with_parent(
    at: &mut Dynamic,
    steps: &[PStep],
    values: &mut [Dynamic],
    f: &mut LastStep,
) -> R<Option<Dynamic>> {
    let Some((step, rest)) = steps.split_first() else {
        return f(at, values);
    };
    match step {
        PStep::Prop(name, ..) => {
            let Ok(mut map) = at.as_map_mut() else {
                return Ok(None);
            };
            match map.get_mut(name.as_str()) {
                Some(v) => with_parent(v, rest, values, f),
                None => Ok(None),
            }
        }
        PStep::Index => {
            let (index, values) = values.split_first_mut().expect("an index value");
            if at.is_map() {
                let Ok(key) = index.as_immutable_string_ref() else {
                    return Ok(None);
                };
                let mut map = at.as_map_mut().expect("a map");
                return match map.get_mut(key.as_str()) {
                    Some(v) => with_parent(v, rest, values, f),
                    None => Ok(None),
                };
            }
            if at.is_array() {
                let Ok(i) = index.as_int() else {
                    return Ok(None);
                };
                let mut items = at.as_array_mut().expect("an array");
                return match array_index(items.len(), i) {
                    Some(j) => with_parent(&mut items[j], rest, values, f),
                    None => Ok(None),
                };
            }
            Ok(None)
        }
        PStep::Method(..) => Ok(None),
    }
}

/// The value `steps` lead to from `at`, read without a copy of `at`: each property a map has,
/// each index an array or a map has. `None` for any other step, which [`Path::run`] then walks
/// on a copy.
fn read_in_place(at: &Dynamic, steps: &[PStep], values: &[Dynamic]) -> Option<Dynamic> {
    let Some((step, rest)) = steps.split_first() else {
        return Some(at.clone());
    };
    match step {
        PStep::Prop(name, ..) => {
            let map = at.as_map_ref().ok()?;
            read_in_place(map.get(name.as_str())?, rest, values)
        }
        PStep::Index => {
            let (index, values) = values.split_first()?;
            if at.is_map() {
                let key = index.as_immutable_string_ref().ok()?;
                let map = at.as_map_ref().ok()?;
                return read_in_place(map.get(key.as_str())?, rest, values);
            }
            let i = index.as_int().ok()?;
            let items = at.as_array_ref().ok()?;
            read_in_place(&items[array_index(items.len(), i)?], rest, values)
        }
        PStep::Method(..) => None,
    }
}

/// Where index `i` is in an array of `len` items (from the end when negative), if it is.
fn array_index(len: usize, i: INT) -> Option<usize> {
    let j = if i < 0 {
        len.checked_sub(usize::try_from(i.unsigned_abs()).ok()?)?
    } else {
        usize::try_from(i).ok()?
    };
    (j < len).then_some(j)
}

/// The last step of a [`Path`] on `at`, the place the others led to; `Ok(None)` leaves it to
/// the helper (nothing was changed).
fn last_step(
    engine: &Engine,
    step: &PStep,
    at: &mut Dynamic,
    values: &mut [Dynamic],
    assign: Option<&PathAssign>,
) -> R<Option<Dynamic>> {
    match step {
        PStep::Prop(name, natives, pos) => match assign {
            None => {
                if let Ok(map) = at.as_map_ref() {
                    return Ok(map.get(name.as_str()).cloned());
                }
                if let Some(ev) = at.read_lock::<Event>() {
                    return Ok(Some(ev.get(name)));
                }
                call_native(engine, natives, name, at, &mut [], *pos)
            }
            Some(assign) => {
                let Ok(mut map) = at.as_map_mut() else {
                    return Ok(None);
                };
                match map.get_mut(name.as_str()) {
                    Some(place) => assign_in_place(place, assign),
                    None => Ok(None),
                }
            }
        },
        PStep::Index => {
            let index = &values[0];
            if at.is_map() {
                let Ok(key) = index.as_immutable_string_ref() else {
                    return Ok(None);
                };
                let mut map = at.as_map_mut().expect("a map");
                let Some(place) = map.get_mut(key.as_str()) else {
                    // `m[k] = v` of a new key: Rhai adds it and checks the size of the value
                    // alone, which one that holds no data cannot break.
                    if let Some((None, _, v)) = assign {
                        if !holds_data(v) {
                            map.insert(key.as_str().into(), v.clone());
                            return Ok(Some(Dynamic::UNIT));
                        }
                    }
                    return Ok(None);
                };
                return match assign {
                    None => Ok(Some(place.clone())),
                    Some(assign) => assign_in_place(place, assign),
                };
            }
            if at.is_array() {
                let Ok(i) = index.as_int() else {
                    return Ok(None);
                };
                let mut items = at.as_array_mut().expect("an array");
                let Some(j) = array_index(items.len(), i) else {
                    return Ok(None);
                };
                return match assign {
                    None => Ok(Some(items[j].clone())),
                    Some(assign) => assign_in_place(&mut items[j], assign),
                };
            }
            Ok(None)
        }
        PStep::Method(name, argc, natives, pos) => {
            debug_assert!(assign.is_none(), "no assignment to a method call");
            // (A native call that does not run leaves the values as they were, for the helper.)
            let args = &mut values[..*argc];
            if let Some(v) = fast_method(name, at, args, *pos)? {
                return Ok(Some(v));
            }
            call_native(engine, natives, name, at, args, *pos)
        }
    }
}

/// `place = v` or `place op= v`, when the result holds no data (no size limit to check).
fn assign_in_place(place: &mut Dynamic, (op, op_pos, v): &PathAssign) -> R<Option<Dynamic>> {
    let new = match op {
        None => v.clone(),
        Some(op) => match fast_binop(op, place, v, *op_pos)? {
            Some(new) => new,
            None => return Ok(None),
        },
    };
    if holds_data(&new) {
        return Ok(None);
    }
    put(place, new);
    Ok(Some(Dynamic::UNIT))
}

/// A step of a chain as written: a property (its position, the dot's), a method (its position,
/// the dot's), or an index (the index expression, the bracket's position).
enum PSeg<'e> {
    Prop(ImmutableString, Position, Position),
    Method(&'e FnCallExpr, Position, Position),
    Index(&'e Expr, Position),
}

/// Whether `e` is a chain with an index in it: one for a [`Path`].
fn has_index(e: &Expr) -> bool {
    match e {
        Expr::Index(..) => true,
        Expr::Dot(be, ..) => has_index(&be.rhs),
        _ => false,
    }
}

/// `root.a[i].m(x)[j]` as its root and its steps. `a[i].b` is `Index(a, Dot(i, b))`: a chain
/// goes on in the index, unless `BREAK` says the index is all of it (`a[ev.i]`).
fn flatten_path(e: &Expr) -> Result<(&Expr, Vec<PSeg<'_>>), Unsupported> {
    let (be, flags, at, dot) = match e {
        Expr::Dot(be, f, p) => (be, *f, *p, true),
        Expr::Index(be, f, p) => (be, *f, *p, false),
        other => return unsupported(other.start_position(), "expression"),
    };
    let mut segs = Vec::new();
    let (mut node, mut flags, mut at, mut dot) = (&be.rhs, flags, at, dot);
    loop {
        if flags.intersects(ASTFlags::NEGATED) {
            return unsupported(at, "`?.` or `?[`");
        }
        let next = match node {
            Expr::Dot(inner, f, p) | Expr::Index(inner, f, p)
                if dot || !flags.contains(ASTFlags::BREAK) =>
            {
                Some((inner, *f, *p, matches!(node, Expr::Dot(..))))
            }
            _ => None,
        };
        let item = match &next {
            Some((inner, ..)) => &inner.lhs,
            None => node,
        };
        if dot {
            match item {
                Expr::Property(p, ppos) => segs.push(PSeg::Prop(p.2.clone(), *ppos, at)),
                Expr::MethodCall(call, mpos) => segs.push(PSeg::Method(call, *mpos, at)),
                other => return unsupported(other.start_position(), "chain"),
            }
        } else {
            segs.push(PSeg::Index(item, at));
        }
        match next {
            Some((inner, f, p, d)) => {
                node = &inner.rhs;
                (flags, at, dot) = (f, p, d);
            }
            None => return Ok((&be.lhs, segs)),
        }
    }
}

impl Cx<'_> {
    /// The slot of `this.field` (a chain's root), or why the query cannot be compiled.
    fn this_slot(&self, tpos: Position, field: &str) -> Result<usize, Unsupported> {
        match self.layout.fields.iter().position(|f| f == field) {
            Some(slot) => Ok(slot),
            None => unsupported(
                tpos,
                format!("`this.{field}`: a field `init` does not make"),
            ),
        }
    }

    /// A [`Path`] for `e`, read (`assign` `None`) or assigned with this operator.
    fn path(&mut self, e: &Expr, assign: Option<&rhai::OpAssignment>) -> Result<Path, Unsupported> {
        let (root, segs) = flatten_path(e)?;
        let mut segs = segs.as_slice();
        let root = match root {
            Expr::ThisPtr(tpos) => {
                if !self.this_ok {
                    return unsupported(
                        *tpos,
                        "`this` outside on_event, on_timer and methods called on `this`",
                    );
                }
                let Some((PSeg::Prop(field, ..), rest)) = segs.split_first() else {
                    return unsupported(*tpos, "indexing `this`");
                };
                segs = rest;
                PathRoot::Place(Target::Slot(self.this_slot(*tpos, field)?))
            }
            Expr::Variable(x, _, vpos) if x.2.is_empty() && self.local(&x.1).is_none() => {
                // A top-level constant, read through properties and indexes (no method, which
                // might change it: see `Cx::constant_root`).
                let reads = segs.iter().all(|s| !matches!(s, PSeg::Method(..)));
                match self.constant(&x.1) {
                    Some(value) if assign.is_none() && reads => PathRoot::Const(value),
                    Some(_) => {
                        let what = format!("a change or a method of the constant `{}`", x.1);
                        return unsupported(*vpos, what);
                    }
                    None => {
                        let what = format!("variable `{}` outside the function", x.1);
                        return unsupported(*vpos, what);
                    }
                }
            }
            Expr::Variable(x, _, vpos) if x.2.is_empty() => {
                let i = self.local(&x.1).expect("checked above");
                if self.record(root).is_some() {
                    return unsupported(*vpos, format!("the map `{}` as a value", x.1));
                }
                if self.ev_local == Some(i) {
                    if assign.is_some() {
                        return unsupported(*vpos, "assignment to the event");
                    }
                    // The event is read-only: its first property is read as a value (from the
                    // tape), and the rest of the path works on that copy, as in Rhai.
                    // A method through a property may write the property back (which the
                    // event refuses): then the whole path runs on the event itself.
                    let method = segs.iter().any(|s| matches!(s, PSeg::Method(..)));
                    match segs.split_first() {
                        Some((PSeg::Prop(name, ppos, _), rest)) if !method => {
                            segs = rest;
                            PathRoot::Value(self.ev_prop(i, name, *ppos))
                        }
                        _ => PathRoot::Value(self.expr(root)?),
                    }
                } else {
                    PathRoot::Place(Target::Local(i))
                }
            }
            other => {
                if assign.is_some() {
                    return unsupported(other.start_position(), "assignment target");
                }
                PathRoot::Value(self.expr(other)?)
            }
        };
        if segs.is_empty() {
            return unsupported(e.start_position(), "chain");
        }
        // The helper's body (`this` is the root) and, for each part an error may point at, its
        // offset in the body and the position in the query.
        let mut text = String::from("this");
        let mut spots = Vec::new();
        let mut steps = Vec::new();
        let mut values = Vec::new();
        for seg in segs {
            match seg {
                PSeg::Prop(name, ppos, dot) => {
                    spots.push((text.len(), *dot));
                    text.push('.');
                    spots.push((text.len(), *ppos));
                    text.push_str(name);
                    let natives = natives_for(&format!("get${name}"), 1);
                    steps.push(PStep::Prop(name.clone(), natives, *ppos));
                }
                PSeg::Index(index, bracket) => {
                    spots.push((text.len(), *bracket));
                    text.push('[');
                    spots.push((text.len(), index.start_position()));
                    text.push_str(&format!("a{}]", values.len()));
                    values.push(self.expr(index)?);
                    steps.push(PStep::Index);
                }
                PSeg::Method(call, mpos, dot) => {
                    if self.index.keys().any(|(n, _)| n == call.name.as_str()) {
                        return unsupported(*mpos, "a script function called as a method");
                    }
                    if !call.namespace.is_empty() || call.capture_parent_scope {
                        return unsupported(*mpos, "method call");
                    }
                    if assign.is_some() {
                        return unsupported(*mpos, "assignment through a call");
                    }
                    spots.push((text.len(), *dot));
                    text.push('.');
                    spots.push((text.len(), *mpos));
                    text.push_str(&call.name);
                    text.push('(');
                    for (j, a) in call.args.iter().enumerate() {
                        if j > 0 {
                            text.push_str(", ");
                        }
                        spots.push((text.len(), a.position()));
                        text.push_str(&format!("a{}", values.len()));
                        values.push(self.expr(a)?);
                    }
                    text.push(')');
                    let natives = natives_for(&call.name, call.args.len() + 1);
                    steps.push(PStep::Method(
                        call.name.clone(),
                        call.args.len(),
                        natives,
                        *mpos,
                    ));
                }
            }
        }
        let mut params = values.len();
        let at = match assign {
            None => e.position(),
            Some(op) => {
                text.push(' ');
                spots.push((text.len(), op.position()));
                match op.get_op_assignment_info() {
                    None => text.push('='),
                    Some((_, _, op_assign, ..)) => text.push_str(op_assign.literal_syntax()),
                }
                text.push_str(&format!(" a{params};"));
                params += 1;
                op.position()
            }
        };
        let helper = self.helpers.borrow_mut().add(params, &text);
        // The body's first column on the helper's line (Rhai counts columns from 1).
        let args: Vec<String> = (0..params).map(|i| format!("a{i}")).collect();
        let start = format!("fn {helper}({}) {{ ", args.join(", ")).len() + 1;
        let spots = spots.into_iter().map(|(o, p)| (start + o, p)).collect();
        Ok(Path {
            root,
            steps,
            values,
            helper,
            spots,
            at,
        })
    }

    /// A read of the path `e` (see [`Path`]).
    fn path_read(&mut self, e: &Expr) -> Result<EFn, Unsupported> {
        let path = self.path(e, None)?;
        Ok(Box::new(move |fr| path.run(fr, None)))
    }

    /// `ev.name`: from the tape when the call's event is unboxed, or from the boxed event; by
    /// a helper when the local holds something else.
    fn ev_prop(&mut self, i: usize, name: &ImmutableString, ppos: Position) -> EFn {
        let helper = self.helpers.borrow_mut().add(0, &format!("this.{name}"));
        let name: Box<str> = name.as_str().into();
        let hint = std::cell::Cell::new(0);
        Box::new(move |fr| {
            if let Some(ev) = fr.event {
                return Ok(ev.get_hinted(&name, &hint));
            }
            if let Some(ev) = fr.locals[i].read_lock::<Event>() {
                return Ok(ev.get_hinted(&name, &hint));
            }
            let (engine, helpers) = (fr.rt.engine, fr.helpers);
            run_helper(
                engine,
                helpers,
                &helper,
                Some(&mut fr.locals[i]),
                Vec::new(),
                ppos,
            )
        })
    }
}

#[derive(Debug)]
enum Seg {
    /// A property, its position and the position of the dot before it.
    Prop(ImmutableString, Position, Position),
    Method(Box<FnCallExpr>, Position),
}

/// `root.a.b(x).c` as its root and its steps (no index: see [`flatten_path`]).
fn flatten(e: &Expr) -> Result<(&Expr, Vec<Seg>), Unsupported> {
    let Expr::Dot(be, _, dot) = e else {
        return unsupported(e.start_position(), "expression");
    };
    let mut segs = Vec::new();
    let mut rhs = &be.rhs;
    let mut dot = *dot;
    loop {
        match rhs {
            Expr::Property(p, ppos) => {
                segs.push(Seg::Prop(p.2.clone(), *ppos, dot));
                break;
            }
            Expr::MethodCall(call, mpos) => {
                segs.push(Seg::Method(call.clone(), *mpos));
                break;
            }
            Expr::Dot(inner, _, inner_dot) => {
                match &inner.lhs {
                    Expr::Property(p, ppos) => segs.push(Seg::Prop(p.2.clone(), *ppos, dot)),
                    Expr::MethodCall(call, mpos) => segs.push(Seg::Method(call.clone(), *mpos)),
                    other => return unsupported(other.start_position(), "chain"),
                }
                rhs = &inner.rhs;
                dot = *inner_dot;
            }
            other => return unsupported(other.start_position(), "indexing in a chain"),
        }
    }
    Ok((&be.lhs, segs))
}

/// Stores `v` in `place`. A number, a boolean or `()` (not shared) holds no memory, so the value
/// it replaces is overwritten without its drop, which is a call per value (about 20
/// instructions, and these stores happen several times per event).
#[inline]
fn put(place: &mut Dynamic, v: Dynamic) {
    if holds_nothing(place) {
        std::mem::forget(std::mem::replace(place, v));
    } else {
        *place = v;
    }
}

/// Whether dropping `v` would free nothing: `()`, a number or a boolean, not shared.
#[inline]
fn holds_nothing(v: &Dynamic) -> bool {
    !v.is_shared() && (v.is_unit() || v.is_int() || v.is_float() || v.is_bool())
}

fn run_block(body: &[SFn], fr: &mut Frame) -> R<Flow> {
    let mut last = Dynamic::UNIT;
    for s in body {
        match s(fr)? {
            Flow::Normal(v) => put(&mut last, v),
            jump => return Ok(jump),
        }
    }
    Ok(Flow::Normal(last))
}

/// The hash by which `switch` finds a value's case: Rhai's own (`calc_switch_value_hash`, not
/// public): the value's `Hash` through the hasher Rhai makes, ahash with Rhai's seed or fixed
/// keys (one `ahash` in the build, so the same keys). `None` for a value Rhai does not hash,
/// which goes to `_`.
fn switch_hash(v: &Dynamic) -> Option<u64> {
    use std::hash::{BuildHasher, Hash, Hasher};
    if !hashable(v) {
        return None;
    }
    let mut hasher = match rhai::config::hashing::get_hashing_seed() {
        Some([a, b, c, d]) if (a | b | c | d) != 0 => {
            ahash::RandomState::with_seeds(*a, *b, *c, *d).build_hasher()
        }
        _ => ahash::AHasher::default(),
    };
    v.hash(&mut hasher);
    Some(hasher.finish())
}

/// Rhai's `Dynamic::is_hashable` (not public): whether `switch` looks a value up by its hash.
fn hashable(v: &Dynamic) -> bool {
    if v.is_shared() {
        return hashable(&v.flatten_clone());
    }
    if v.is_unit()
        || v.is_bool()
        || v.is_string()
        || v.is_char()
        || v.is_int()
        || v.is_float()
        || v.is_blob()
    {
        return true;
    }
    if let Ok(items) = v.as_array_ref() {
        return items.iter().all(hashable);
    }
    if let Ok(map) = v.as_map_ref() {
        return map.values().all(hashable);
    }
    if let Some(f) = v.read_lock::<FnPtr>() {
        return f.curry().iter().all(hashable);
    }
    let t = v.type_id();
    [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<f32>(),
        TypeId::of::<u128>(),
        TypeId::of::<i128>(),
        TypeId::of::<std::ops::Range<INT>>(),
        TypeId::of::<std::ops::RangeInclusive<INT>>(),
    ]
    .contains(&t)
}

/// Whether [`switch_hash`] gives the hashes Rhai's parser gives case literals of each kind, so
/// that a compiled `switch` picks Rhai's case; checked once. When not (another Rhai), `switch`
/// is left to the interpreter.
fn switch_hash_is_rhais() -> bool {
    static SAME: OnceLock<bool> = OnceLock::new();
    *SAME.get_or_init(|| {
        let script = "fn f(x) { switch x { \"a\" => 1, 2 => 2, 1.5 => 3, true => 4, 'c' => 5 } }";
        let Ok(ast) = Engine::new_raw().compile(script) else {
            return false;
        };
        let mut hashes = Vec::new();
        ast.walk(&mut |path: &[ASTNode]| {
            if let Some(ASTNode::Stmt(Stmt::Switch(sw, _))) = path.last() {
                hashes.extend(sw.1.cases.keys().copied());
            }
            true
        });
        let values = [
            Dynamic::from(ImmutableString::from("a")),
            Dynamic::from_int(2),
            Dynamic::from_float(1.5),
            Dynamic::TRUE,
            Dynamic::from_char('c'),
        ];
        hashes.len() == values.len()
            && values
                .iter()
                .all(|v| switch_hash(v).is_some_and(|h| hashes.contains(&h)))
    })
}

/// Whether `stmts` assign to the variable `name` (anywhere, conservatively).
fn assigns(stmts: &[Stmt], name: &str) -> bool {
    let mut found = false;
    for s in stmts {
        s.walk(&mut Vec::new(), &mut |path: &[ASTNode]| {
            if let Some(ASTNode::Stmt(Stmt::Assignment(a))) = path.last() {
                let mut lhs = &a.1.lhs;
                while let Expr::Dot(be, ..) | Expr::Index(be, ..) = lhs {
                    lhs = &be.lhs;
                }
                if let Expr::Variable(x, ..) = lhs {
                    if x.1.as_str() == name {
                        found = true;
                    }
                }
            }
            if let Some(ASTNode::Stmt(Stmt::Var(v, ..))) = path.last() {
                if v.0.name.as_str() == name {
                    found = true;
                }
            }
            true
        });
    }
    found
}

/// A value in typed code: an integer, a float or a boolean unboxed, anything else as the Rhai
/// value. Arithmetic and comparisons of the first three run on them directly
/// ([`num_binop`]), so `a * b + c` makes no `Dynamic` between its steps.
enum Num {
    I(INT),
    F(FLOAT),
    B(bool),
    D(Dynamic),
}

impl Num {
    /// A value read in place (a local, a slot): numbers and booleans copied, the rest cloned.
    fn of(d: &Dynamic) -> Num {
        Num::scalar(d).unwrap_or_else(|| Num::D(d.clone().flatten()))
    }

    /// A number or a boolean read in place, `None` for other values.
    /// (`is_*` first: a failed `as_*` names the value's type, which costs more than the test.)
    fn scalar(d: &Dynamic) -> Option<Num> {
        if d.is_float() {
            d.as_float().ok().map(Num::F)
        } else if d.is_int() {
            d.as_int().ok().map(Num::I)
        } else if d.is_bool() {
            d.as_bool().ok().map(Num::B)
        } else {
            None
        }
    }

    fn from_dynamic(d: Dynamic) -> Num {
        Num::scalar(&d).unwrap_or_else(|| Num::D(d.flatten()))
    }

    fn into_dynamic(self) -> Dynamic {
        match self {
            Num::I(n) => Dynamic::from_int(n),
            Num::F(x) => Dynamic::from_float(x),
            Num::B(b) => Dynamic::from_bool(b),
            Num::D(d) => d,
        }
    }
}

/// `x op y` on unboxed values: what [`fast_binop`] gives for two integers, two numbers one of
/// which is a float, or two booleans; `None` for anything else (the caller boxes both and asks
/// `fast_binop`, then the interpreter).
#[inline(always)]
fn num_binop(op: &Token, x: &Num, y: &Num, pos: Position) -> R<Option<Num>> {
    Ok(match (x, y) {
        (Num::I(a), Num::I(b)) => int_binop(op, *a, *b, pos)?,
        (Num::F(a), Num::F(b)) => float_binop(op, *a, *b),
        (Num::I(a), Num::F(b)) => float_binop(op, *a as FLOAT, *b),
        (Num::F(a), Num::I(b)) => float_binop(op, *a, *b as FLOAT),
        (Num::B(a), Num::B(b)) => bool_binop(op, *a, *b),
        _ => None,
    })
}

/// An operator on two integers, with Rhai's checked arithmetic and its error messages.
#[inline(always)]
fn int_binop(op: &Token, a: INT, b: INT, pos: Position) -> R<Option<Num>> {
    use Token::*;
    let arith =
        |msg: String| -> Box<EvalAltResult> { EvalAltResult::ErrorArithmetic(msg, pos).into() };
    Ok(Some(match op {
        Plus | PlusAssign => Num::I(
            a.checked_add(b)
                .ok_or_else(|| arith(format!("Addition overflow: {a} + {b}")))?,
        ),
        Minus | MinusAssign => Num::I(
            a.checked_sub(b)
                .ok_or_else(|| arith(format!("Subtraction overflow: {a} - {b}")))?,
        ),
        Multiply | MultiplyAssign => Num::I(
            a.checked_mul(b)
                .ok_or_else(|| arith(format!("Multiplication overflow: {a} * {b}")))?,
        ),
        Divide | DivideAssign => {
            if b == 0 {
                return Err(arith(format!("Division by zero: {a} / {b}")));
            }
            Num::I(
                a.checked_div(b)
                    .ok_or_else(|| arith(format!("Division overflow: {a} / {b}")))?,
            )
        }
        Modulo | ModuloAssign => Num::I(
            a.checked_rem(b)
                .ok_or_else(|| arith(format!("Modulo division by zero or overflow: {a} % {b}")))?,
        ),
        EqualsTo => Num::B(a == b),
        NotEqualsTo => Num::B(a != b),
        GreaterThan => Num::B(a > b),
        GreaterThanEqualsTo => Num::B(a >= b),
        LessThan => Num::B(a < b),
        LessThanEqualsTo => Num::B(a <= b),
        _ => return Ok(None),
    }))
}

/// An operator on two numbers at least one of which is a float (the other converted), with
/// Rhai's float comparisons (equal within `FLOAT::EPSILON`, relative).
#[inline(always)]
fn float_binop(op: &Token, a: FLOAT, b: FLOAT) -> Option<Num> {
    use Token::*;
    let near = |a: FLOAT, b: FLOAT| {
        if a * b == 0.0 {
            1.0
        } else {
            a.abs().max(b.abs())
        }
    };
    Some(match op {
        Plus | PlusAssign => Num::F(a + b),
        Minus | MinusAssign => Num::F(a - b),
        Multiply | MultiplyAssign => Num::F(a * b),
        Divide | DivideAssign => Num::F(a / b),
        Modulo | ModuloAssign => Num::F(a % b),
        EqualsTo => {
            let max = near(a, b);
            Num::B(max == 0.0 || (a - b).abs() / max <= FLOAT::EPSILON)
        }
        NotEqualsTo => {
            let max = near(a, b);
            Num::B(max != 0.0 && (a - b).abs() / max > FLOAT::EPSILON)
        }
        GreaterThan => {
            let max = near(a, b);
            Num::B(max != 0.0 && (a - b) / max > FLOAT::EPSILON)
        }
        GreaterThanEqualsTo => {
            let max = near(a, b);
            Num::B(max == 0.0 || (a - b) / max > -FLOAT::EPSILON)
        }
        LessThan => {
            let max = near(a, b);
            Num::B(max != 0.0 && (b - a) / max > FLOAT::EPSILON)
        }
        LessThanEqualsTo => {
            let max = near(a, b);
            Num::B(max == 0.0 || (b - a) / max > -FLOAT::EPSILON)
        }
        _ => return None,
    })
}

/// `==` and `!=` on two booleans (Rhai has no other operator on them built in).
#[inline(always)]
fn bool_binop(op: &Token, a: bool, b: bool) -> Option<Num> {
    match op {
        Token::EqualsTo => Some(Num::B(a == b)),
        Token::NotEqualsTo => Some(Num::B(a != b)),
        _ => None,
    }
}

/// `x op y` for ints, floats, bools, strings and `()`, with Rhai's results and errors; `None`
/// for the other types (the caller asks the interpreter).
/// `x == y` as Rhai's operator gives it for two values of the standard types [`fast_binop`]
/// knows; `None` otherwise (the caller leaves the whole operation to Rhai).
pub(crate) fn std_equals(x: &Dynamic, y: &Dynamic) -> Option<bool> {
    // Two strings first: what `contains` of a list of names compares.
    if let (Ok(a), Ok(b)) = (x.as_immutable_string_ref(), y.as_immutable_string_ref()) {
        return Some(*a == *b);
    }
    fast_binop(&Token::EqualsTo, x, y, Position::NONE)
        .ok()
        .flatten()
        .and_then(|v| v.as_bool().ok())
}

fn fast_binop(op: &Token, x: &Dynamic, y: &Dynamic, pos: Position) -> R<Option<Dynamic>> {
    use Token::*;
    if x.is_int() && y.is_int() {
        let (a, b) = (x.as_int().expect("int"), y.as_int().expect("int"));
        return Ok(int_binop(op, a, b, pos)?.map(Num::into_dynamic));
    }
    let num = |d: &Dynamic| -> Option<FLOAT> {
        d.as_float()
            .ok()
            .or_else(|| d.as_int().ok().map(|i| i as FLOAT))
    };
    if (x.is_float() || y.is_float())
        && (x.is_float() || x.is_int())
        && (y.is_float() || y.is_int())
    {
        let (a, b) = (num(x).expect("number"), num(y).expect("number"));
        return Ok(float_binop(op, a, b).map(Num::into_dynamic));
    }
    if x.is_unit() && y.is_unit() {
        return Ok(match op {
            EqualsTo => Some(Dynamic::TRUE),
            NotEqualsTo | GreaterThan | GreaterThanEqualsTo | LessThan | LessThanEqualsTo => {
                Some(Dynamic::FALSE)
            }
            _ => None,
        });
    }
    if let (Ok(a), Ok(b)) = (x.as_bool(), y.as_bool()) {
        return Ok(bool_binop(op, a, b).map(Num::into_dynamic));
    }
    if let (Ok(a), Ok(b)) = (x.as_immutable_string_ref(), y.as_immutable_string_ref()) {
        return Ok(match op {
            EqualsTo => Some(Dynamic::from_bool(*a == *b)),
            NotEqualsTo => Some(Dynamic::from_bool(*a != *b)),
            _ => None,
        });
    }
    // Values of two different standard types, not both numbers (`x != ()` on a float, a map
    // `== ()`): Rhai's default for comparing different types (no function compares them),
    // `!=` true and every other comparison false.
    let kind = |d: &Dynamic| {
        if d.is_unit() {
            Some(0)
        } else if d.is_int() || d.is_float() {
            Some(1)
        } else if d.is_bool() {
            Some(2)
        } else if d.is_string() {
            // (Not a char: Rhai compares a char with a string.)
            Some(3)
        } else if d.is_map() {
            // (`this.last == ()` on a map: the first-event test of many queries.)
            Some(4)
        } else if d.is_array() {
            Some(5)
        } else {
            None
        }
    };
    if let (Some(a), Some(b)) = (kind(x), kind(y)) {
        if a != b {
            return Ok(match op {
                NotEqualsTo => Some(Dynamic::TRUE),
                EqualsTo | GreaterThan | GreaterThanEqualsTo | LessThan | LessThanEqualsTo => {
                    Some(Dynamic::FALSE)
                }
                _ => None,
            });
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(names: &[&str]) -> Layout {
        Layout::new(names.iter().map(|n| (*n).into()).collect())
    }

    #[test]
    fn slot_state_converts_to_the_map_and_back() {
        let layout = layout(&["volume", "notional", "name"]);
        let slots = State::Slots(Box::new([
            Dynamic::from_int(3),
            Dynamic::from_float(1.5),
            Dynamic::from("abc".to_owned()),
        ]));
        let map = slots.to_dynamic(Some(&layout));
        let mut want = Map::new();
        want.insert("volume".into(), Dynamic::from_int(3));
        want.insert("notional".into(), Dynamic::from_float(1.5));
        want.insert("name".into(), Dynamic::from("abc".to_owned()));
        let want = Dynamic::from_map(want);
        assert_eq!(map.to_string(), want.to_string());
        // The size is the map's, so the state limit acts the same on both engines.
        assert_eq!(slots.bytes(Some(&layout)), crate::shard::state_bytes(&want));
        let back = State::from_dynamic(map, Some(&layout)).unwrap();
        let State::Slots(back) = back else {
            panic!("slots expected")
        };
        assert_eq!(back[0].as_int(), Ok(3));
        assert_eq!(back[1].as_float(), Ok(1.5));
        assert_eq!(back[2].clone().into_string().unwrap(), "abc");
    }

    #[test]
    fn a_map_that_does_not_fit_the_layout_is_refused() {
        let layout = layout(&["a", "b"]);
        let mut map = Map::new();
        map.insert("a".into(), Dynamic::from_int(1));
        let err = State::from_dynamic(Dynamic::from_map(map.clone()), Some(&layout)).unwrap_err();
        assert!(err.contains("1 fields") && err.contains("makes 2"), "{err}");
        map.insert("c".into(), Dynamic::from_int(1));
        let err = State::from_dynamic(Dynamic::from_map(map), Some(&layout)).unwrap_err();
        assert!(err.contains("no field `b`"), "{err}");
        let err = State::from_dynamic(Dynamic::from_int(1), Some(&layout)).unwrap_err();
        assert!(err.contains("must be a map"), "{err}");
        // Without a layout (an interpreted query) the map is the state as it is.
        assert!(matches!(
            State::from_dynamic(Dynamic::from_int(1), None),
            Ok(State::Map(_))
        ));
    }

    #[test]
    fn comparisons_of_different_types_are_rhais() {
        let engine = Engine::new();
        let values = ["1.5", "()", "true", "2", "\"a\"", "#{a: 1}", "[1, 2]"];
        let ops = [
            ("==", Token::EqualsTo),
            ("!=", Token::NotEqualsTo),
            ("<", Token::LessThan),
            ("<=", Token::LessThanEqualsTo),
            (">", Token::GreaterThan),
            (">=", Token::GreaterThanEqualsTo),
        ];
        for a in values {
            for b in values {
                for (text, op) in &ops {
                    let want = engine.eval::<bool>(&format!("{a} {text} {b}")).ok();
                    let x = engine.eval::<Dynamic>(a).unwrap();
                    let y = engine.eval::<Dynamic>(b).unwrap();
                    match fast_binop(op, &x, &y, Position::NONE) {
                        Ok(Some(v)) => assert_eq!(v.as_bool().ok(), want, "{a} {text} {b}"),
                        // Left to the interpreter: nothing to hold to.
                        Ok(None) => {}
                        Err(e) => panic!("{a} {text} {b}: {e}"),
                    }
                }
            }
        }
    }

    #[test]
    fn rhai_float_comparisons_are_kept() {
        let p = Position::NONE;
        let cmp = |op: Token, a: f64, b: f64| {
            fast_binop(&op, &Dynamic::from_float(a), &Dynamic::from_float(b), p)
                .unwrap()
                .unwrap()
                .as_bool()
                .unwrap()
        };
        // Rhai compares floats within a relative epsilon: 0.1 + 0.2 == 0.3.
        assert!(cmp(Token::EqualsTo, 0.1 + 0.2, 0.3));
        assert!(!cmp(Token::LessThan, 0.3, 0.1 + 0.2));
        assert!(cmp(Token::GreaterThan, 1.0, 0.5));
        let overflow = fast_binop(
            &Token::Plus,
            &Dynamic::from_int(i64::MAX),
            &Dynamic::from_int(1),
            p,
        )
        .unwrap_err();
        assert_eq!(
            overflow.to_string(),
            "Addition overflow: 9223372036854775807 + 1"
        );
    }
}
