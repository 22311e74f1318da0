//! Differential testing of the query compiler: random queries over the subset it compiles, and
//! random events, run by both engines, whose outputs must be byte-identical (errors included).
//!
//! [`program`] writes a query from a seed: arithmetic on state fields and event fields (which
//! may be missing, strings, huge or zero, so overflow, division by zero and type errors happen),
//! locals, `if`/`else`, `switch`, loops (`for`, `while`, `loop`, `do`, with `break` and
//! `continue`), `&&`/`||`, script functions (plainly, and helpers called as methods on `this`
//! that change the state), number methods, `in`, a map and an array in state
//! indexed, written and walked (methods and properties through an index), emits of map literals
//! and of locals, `emit_to`, named topics, timers, `forget`, plugin functions, and plugin
//! objects (in state, in locals and in the state's map) with their methods and properties, given
//! any value. [`events`] writes NDJSON for it.
//! [`run_both`] runs a query over events with `--engine auto` and `--engine interpreter` and
//! says where they differ. The same code serves the quick test in `cargo test`
//! (`tests/compiled.rs`) and the cargo-fuzz target `differential`.

use crate::compiled::EngineMode;
use crate::offline::{self, RunOptions};
use crate::query::QueryDef;
use crate::sandbox::Limits;

/// A small deterministic generator (xorshift), so that a seed names one program everywhere.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const FIELDS: [&str; 4] = ["a", "b", "c", "f"];
const EVENT_FIELDS: [&str; 3] = ["x", "y", "z"];
const INTS: [&str; 9] = [
    "0",
    "1",
    "2",
    "-3",
    "7",
    "1000",
    "9223372036854775807",
    "-9223372036854775807",
    "4611686018427387904",
];
const FLOATS: [&str; 6] = ["0.0", "0.5", "1.5", "-2.25", "1e300", "3.0"];
/// Indexes of the state's array `l` (three items): in range, from the end, out of range, not
/// an integer.
const ARRAY_INDEXES: [&str; 7] = ["0", "1", "-1", "2", "3", "-4", "\"a\""];

/// A plugin type the generator keeps in state field `p`: its constructor, the calls that change
/// it (`name/arity`) and the reads of it (a getter, or a method `name/arity`).
struct Plugin {
    make: &'static str,
    changes: &'static [&'static str],
    reads: &'static [&'static str],
}

const PLUGINS: [Plugin; 11] = [
    Plugin {
        make: "scaler()",
        changes: &["learn/m"],
        reads: &["transform/m", "transform/a", "to_map/0"],
    },
    Plugin {
        make: "hst(#{ trees: 3, height: 3, window: 4 })",
        changes: &["learn/m", "learn/a", "learn/1"],
        reads: &["score/m", "score/a", "ready", "count"],
    },
    Plugin {
        make: "linreg()",
        changes: &["learn/me", "learn/ae"],
        reads: &["predict/m", "predict/a"],
    },
    Plugin {
        make: "ring(4)",
        changes: &["push/1"],
        reads: &[
            "len", "capacity", "is_full", "sum", "mean", "std", "min", "max", "zscore/1",
            "values/0", "to_map/0",
        ],
    },
    Plugin {
        make: "ewma(0.3)",
        changes: &["add/1", "add/2"],
        reads: &["value", "count", "variance", "std", "zscore/1", "to_map/0"],
    },
    Plugin {
        make: "stats()",
        changes: &["add/1"],
        reads: &[
            "count", "mean", "variance", "std", "min", "max", "sum", "zscore/1",
        ],
    },
    Plugin {
        make: "ohlc()",
        changes: &["add/1", "add/2", "reset/0"],
        reads: &["open", "high", "low", "close", "volume", "vwap", "count"],
    },
    Plugin {
        make: "quantiles()",
        changes: &["record/1"],
        reads: &["p/1", "count", "min", "max", "mean"],
    },
    Plugin {
        make: "topk(2)",
        changes: &["add/1", "add/2"],
        reads: &["top/0", "top/1", "len", "total"],
    },
    Plugin {
        make: "time_window(1000)",
        changes: &["add/2"],
        reads: &["count", "sum", "mean", "rate", "min", "max", "evicted"],
    },
    Plugin {
        make: "holt(0.5, 0.3)",
        changes: &["learn/1"],
        reads: &["forecast/1", "steps_to/1", "level", "trend", "count"],
    },
];

/// The top-level constants a program may name in its functions.
const CONSTANTS: &str = "const K_INT = 7;\nconst K_FLOAT = 2.5;\nconst K_STR = \"ab\";\n\
    const K_LIST = [1, 2.5, ()];\nconst K_MAP = #{ a: 1, b: #{ v: 2.5 } };\n";

struct Writer<'g> {
    g: &'g mut Gen,
    locals: Vec<String>,
    next: usize,
    /// The plugin object in state field `p`, if any.
    plugin: Option<&'static Plugin>,
    /// Whether the state has a map `m` and an array `l` (indexed, walked by loops).
    containers: bool,
    /// Whether the script declares the top-level constants of [`CONSTANTS`].
    constants: bool,
    /// The loop the statements being written are in: `None`, `Some(true)` for one whose body
    /// may `continue`, `Some(false)` for a `do` loop (where `continue` skips the test that ends
    /// it, so only `break` is written).
    in_loop: Option<bool>,
}

impl Writer<'_> {
    fn expr(&mut self, depth: usize) -> String {
        let leaf = depth == 0 || self.g.chance(30);
        if leaf {
            return match self.g.below(7) {
                0 => self.g.pick(&INTS).to_owned(),
                1 => self.g.pick(&FLOATS).to_owned(),
                2 | 3 => format!("ev.{}", self.g.pick(&EVENT_FIELDS)),
                4 => format!("this.{}", self.g.pick(&FIELDS)),
                5 if !self.locals.is_empty() => {
                    let i = self.g.below(self.locals.len());
                    self.locals[i].clone()
                }
                5 => "()".to_owned(),
                // Booleans and strings among the numbers: typed code must box them and give
                // Rhai's answers (`true == false`, `"ab" + 1`, `true + 1` an error, ...).
                _ if self.g.chance(12) => {
                    self.g.pick(&["true", "false", "\"ab\"", "true"]).to_owned()
                }
                // An index that is no field name: the event as a value, by Rhai.
                _ if self.g.chance(5) => "ev[1]".to_owned(),
                // The state's map and array, by any key (missing, of the wrong type, ...).
                _ if self.containers && self.g.chance(30) => {
                    let key = self.key();
                    format!("this.m[{key}]")
                }
                _ if self.containers && self.g.chance(20) => {
                    format!("this.l[{}]", self.g.pick(&ARRAY_INDEXES))
                }
                // Top-level constants: put in place as values, or read by index, property and
                // standard function where Rhai keeps the name.
                _ if self.constants && self.g.chance(30) => match self.g.below(4) {
                    0 => self
                        .g
                        .pick(&["K_INT", "K_FLOAT", "K_STR", "K_LIST", "K_MAP"])
                        .to_owned(),
                    1 => format!("K_LIST[{}]", self.g.pick(&ARRAY_INDEXES)),
                    2 => {
                        let key = self.key();
                        format!("K_MAP[{key}]")
                    }
                    _ => self
                        .g
                        .pick(&[
                            "K_MAP.a",
                            "K_STR.len()",
                            "K_LIST.len()",
                            "K_MAP.keys()",
                            "K_LIST.contains(2.5)",
                            "K_STR.contains(\"b\")",
                            "K_MAP.contains(\"b\")",
                        ])
                        .to_owned(),
                },
                _ => format!("ev[\"{}\"]", self.g.pick(&EVENT_FIELDS)),
            };
        }
        let d = depth - 1;
        match self.g.below(12) {
            0..=4 => {
                let op = self.g.pick(&[
                    "+", "-", "*", "/", "%", "==", "!=", "<", ">", "<=", ">=", "+", "*",
                ]);
                format!("({} {op} {})", self.expr(d), self.expr(d))
            }
            5 if self.g.chance(30) => format!("this.bump({})", self.expr(d)),
            5 => format!("mix({}, {})", self.expr(d), self.expr(d)),
            // The standard math functions (done in Rust by compiled code when given their
            // numbers), as methods, functions and getters, given any value.
            6 if self.g.chance(40) => format!(
                "({}).{}()",
                self.expr(d),
                self.g.pick(&[
                    "abs",
                    "to_float",
                    "to_string",
                    "sqrt",
                    "floor",
                    "round",
                    "to_int",
                    "sign",
                    "ln",
                    "is_nan",
                    "exp",
                    "fraction",
                    "len",
                    "is_empty",
                    "to_upper",
                    "keys",
                    "split",
                    "parse_int",
                    "parse_float",
                ])
            ),
            6 if self.g.chance(40) => {
                let f = self.g.pick(&[
                    "max",
                    "min",
                    "log",
                    "atan",
                    "hypot",
                    "contains",
                    "starts_with",
                    "index_of",
                    "split",
                    "sub_string",
                    "parse_int",
                ]);
                if self.g.chance(50) {
                    format!("({}).{f}({})", self.expr(d), self.expr(d))
                } else {
                    format!("{f}({}, {})", self.expr(d), self.expr(d))
                }
            }
            6 if self.g.chance(70) => {
                let f = self.g.pick(&[
                    "abs",
                    "sqrt",
                    "floor",
                    "ceiling",
                    "to_int",
                    "sign",
                    "to_float",
                    "exp",
                    "is_finite",
                    "int",
                ]);
                format!("{f}({})", self.expr(d))
            }
            6 => format!(
                "({}).{}",
                self.expr(d),
                self.g
                    .pick(&["floor", "round", "int", "is_zero", "ceiling", "len"])
            ),
            7 => format!(
                "if {} {{ {} }} else {{ {} }}",
                self.cond(d),
                self.expr(d),
                self.expr(d)
            ),
            // Interpolation: strings as they are, anything else by its `to_string`.
            8 if self.g.chance(25) => format!("`id-${{{}}}:${{{}}}`", self.expr(d), self.expr(d)),
            8 => format!("(\"{}\" in ev)", self.g.pick(&EVENT_FIELDS)),
            9 => format!("-({})", self.expr(d)),
            10 => format!("({} ?? {})", self.expr(d), self.expr(d)),
            11 if self.plugin.is_some() && self.g.chance(50) => {
                let read = self.g.pick(self.plugin.expect("checked").reads);
                self.plugin_call("this.p", read, d)
            }
            // Plugin functions that are not methods, given any value.
            11 if self.g.chance(30) => {
                let size = self.g.pick(&["\"1s\"", "1000", "\"bad\"", "0"]);
                format!("window_start({}, {size})", self.expr(d))
            }
            11 if self.g.chance(30) => format!("sentiment({})", self.expr(d)),
            11 if self.containers && self.g.chance(50) => {
                let key = self.key();
                format!("this.m[{key}].v")
            }
            _ => self.cond(d),
        }
    }

    /// `on.name` or `on.name(args)` for `spec`: `name`, or `name/args` where the arguments are
    /// a count of expressions, or one letter each: `e` an expression, `m` a feature map, `a` a
    /// feature array.
    fn plugin_call(&mut self, on: &str, spec: &str, depth: usize) -> String {
        let Some((name, kinds)) = spec.split_once('/') else {
            return format!("{on}.{spec}");
        };
        let mut args = Vec::new();
        for k in kinds.chars() {
            match k {
                'm' => {
                    let (u, w) = (self.expr(depth), self.expr(depth));
                    args.push(format!("#{{ u: {u}, w: {w} }}"));
                }
                'a' => {
                    let (u, w) = (self.expr(depth), self.expr(depth));
                    args.push(format!("[{u}, {w}]"));
                }
                'e' => args.push(self.expr(depth)),
                n => {
                    for _ in 0..n.to_digit(10).expect("a count") {
                        args.push(self.expr(depth));
                    }
                }
            }
        }
        format!("{on}.{name}({})", args.join(", "))
    }

    fn cond(&mut self, depth: usize) -> String {
        let d = depth.saturating_sub(1);
        match self.g.below(12) {
            0 | 1 => format!("({} && {})", self.cmp(d), self.cmp(d)),
            2 | 3 => format!("({} || {})", self.cmp(d), self.cmp(d)),
            4 | 5 => format!("!{}", self.cmp(d)),
            6 | 7 => format!("(\"{}\" in ev)", self.g.pick(&EVENT_FIELDS)),
            // A value that may be no bool, alone or beside a comparison: Rhai's type error, at
            // the expression's position (the `.` of `ev.f`).
            8 => format!("ev.{}", self.g.pick(&EVENT_FIELDS)),
            9 => format!("({} && ev.{})", self.cmp(d), self.g.pick(&EVENT_FIELDS)),
            _ => self.cmp(d),
        }
    }

    fn cmp(&mut self, depth: usize) -> String {
        let op = self.g.pick(&["==", "!=", "<", ">", "<=", ">="]);
        format!("({} {op} {})", self.expr(depth), self.expr(depth))
    }

    fn emit_map(&mut self) -> String {
        let n = 1 + self.g.below(4);
        let mut fields = Vec::new();
        for i in 0..n {
            let name = self.g.pick(&["v", "w", "total", "n", "z9", "a_b"]);
            if fields
                .iter()
                .any(|f: &String| f.starts_with(&format!("{name}:")))
            {
                continue;
            }
            let _ = i;
            fields.push(format!("{name}: {}", self.expr(2)));
        }
        format!("#{{ {} }}", fields.join(", "))
    }

    /// A key for the state's map: mostly one of three strings, sometimes a number's text, an
    /// event field of any type or an integer (which a map refuses).
    fn key(&mut self) -> String {
        match self.g.below(7) {
            0..=3 => self.g.pick(&["\"a\"", "\"b\"", "\"c\""]).to_owned(),
            4 => format!("({}).to_string()", self.expr(1)),
            5 => format!("ev.{}", self.g.pick(&EVENT_FIELDS)),
            _ => self.g.pick(&INTS).to_owned(),
        }
    }

    /// Statements on the state's map `m` (entries that are numbers, maps `#{ v: .. }` or the
    /// plugin's objects) and array `l`, and on a local map: index reads, writes and
    /// op-assignments, methods and properties through an index, `in`.
    fn containers(&mut self, out: &mut String) {
        let key = self.key();
        match self.g.below(7) {
            0 => {
                let op = self.g.pick(&["=", "+=", "-=", "*=", "="]);
                out.push_str(&format!("this.m[{key}] {op} {};\n", self.expr(2)));
            }
            1 => {
                out.push_str(&format!(
                    "if !({key} in this.m) {{ this.m[{key}] = #{{ v: 0 }}; }}\n"
                ));
                let op = self.g.pick(&["+=", "=", "*="]);
                out.push_str(&format!("this.m[{key}].v {op} {};\n", self.expr(1)));
            }
            2 if self.plugin.is_some() => {
                let plugin = self.plugin.expect("checked");
                out.push_str(&format!(
                    "if !({key} in this.m) {{ this.m[{key}] = {}; }}\n",
                    plugin.make
                ));
                let change = self.g.pick(plugin.changes);
                let call = self.plugin_call(&format!("this.m[{key}]"), change, 1);
                out.push_str(&format!("{call};\n"));
                let read = self.g.pick(plugin.reads);
                let read = self.plugin_call(&format!("this.m[{key}]"), read, 1);
                out.push_str(&format!("emit(#{{ read: {read} }});\n"));
            }
            3 => {
                let op = self.g.pick(&["=", "+=", "*=", "-="]);
                let i = self.g.pick(&ARRAY_INDEXES);
                out.push_str(&format!("this.l[{i}] {op} {};\n", self.expr(2)));
            }
            4 => {
                let name = format!("lm{}", self.next);
                self.next += 1;
                out.push_str(&format!("let {name} = #{{ a: {} }};\n", self.expr(1)));
                out.push_str(&format!("{name}[{key}] = {};\n", self.expr(1)));
                let op = self.g.pick(&["+=", "*=", "="]);
                out.push_str(&format!("{name}[\"a\"] {op} {};\n", self.expr(1)));
                out.push_str(&format!("emit({name});\n"));
            }
            5 => out.push_str(&format!(
                "emit(#{{ has: {key} in this.m, n: this.m.len() }});\n"
            )),
            // The array changed in place (Rust in compiled code), its items of any type.
            6 if self.g.chance(60) => {
                let change = match self.g.below(5) {
                    0 | 1 => format!("this.l.push({})", self.expr(1)),
                    2 => format!("this.l.remove({})", self.g.pick(&ARRAY_INDEXES)),
                    3 => self.g.pick(&["this.l.pop()", "this.l.shift()"]).to_owned(),
                    _ => "if this.l.len() > 5 { this.l.clear() }".to_owned(),
                };
                out.push_str(&format!("emit(#{{ changed: {change}, l: this.l }});\n"));
            }
            _ => out.push_str(&format!("emit(#{{ at: this.m[{key}], l: this.l }});\n")),
        }
    }

    /// A loop whose number of turns is bounded (a counter the other statements never see):
    /// `for` over arrays, ranges, strings, the state's map keys and any event field (which may
    /// not be iterable), `while`, `loop`, `do ... while` and `do ... until`; the body may
    /// `break` and `continue`.
    fn a_loop(&mut self, depth: usize, out: &mut String, timers: bool) {
        let counter = format!("n{}", self.next);
        self.next += 1;
        let scope = self.locals.len();
        let was = self.in_loop;
        let k = 1 + self.g.below(3);
        let kind = self.g.below(6);
        self.in_loop = Some(kind < 5);
        match kind {
            0..=2 => {
                let items = match self.g.below(7) {
                    0 | 1 => format!("[{}, {}, {}]", self.expr(1), self.expr(1), self.expr(1)),
                    2 => self.g.pick(&["0..3", "1..=2", "-1..1", "5..2"]).to_owned(),
                    3 => "\"ab\"".to_owned(),
                    4 if self.containers => "this.m.keys()".to_owned(),
                    5 if self.containers => "this.l".to_owned(),
                    _ => format!("ev.{}", self.g.pick(&EVENT_FIELDS)),
                };
                let var = format!("x{}", self.next);
                self.next += 1;
                if self.g.chance(30) {
                    let index = format!("i{}", self.next);
                    self.next += 1;
                    out.push_str(&format!("for ({var}, {index}) in {items} {{\n"));
                    self.locals.push(index);
                } else {
                    out.push_str(&format!("for {var} in {items} {{\n"));
                }
                self.locals.push(var);
                self.stmts(depth, k, out, timers);
                out.push_str("}\n");
            }
            3 => {
                out.push_str(&format!("let {counter} = 0;\nwhile {counter} < 3 {{\n"));
                out.push_str(&format!("{counter} += 1;\n"));
                self.stmts(depth, k, out, timers);
                out.push_str("}\n");
            }
            4 => {
                out.push_str(&format!("let {counter} = 0;\nloop {{\n"));
                out.push_str(&format!("{counter} += 1;\nif {counter} > 2 {{ break; }}\n"));
                self.stmts(depth, k, out, timers);
                out.push_str("}\n");
            }
            _ => {
                out.push_str(&format!("let {counter} = 0;\ndo {{\n{counter} += 1;\n"));
                self.stmts(depth, k, out, timers);
                if self.g.chance(50) {
                    out.push_str(&format!("}} while {counter} < 2;\n"));
                } else {
                    out.push_str(&format!("}} until {counter} >= 2;\n"));
                }
            }
        }
        self.in_loop = was;
        self.locals.truncate(scope);
    }

    fn stmts(&mut self, depth: usize, n: usize, out: &mut String, timers: bool) {
        let scope = self.locals.len();
        for _ in 0..n {
            match self.g.below(20) {
                0..=2 => {
                    let op = self.g.pick(&["=", "+=", "-=", "*=", "/=", "+=", "%="]);
                    out.push_str(&format!(
                        "this.{} {op} {};\n",
                        self.g.pick(&FIELDS),
                        self.expr(2)
                    ));
                }
                3 | 4 => {
                    let name = format!("v{}", self.next);
                    self.next += 1;
                    out.push_str(&format!("let {name} = {};\n", self.expr(3)));
                    self.locals.push(name);
                }
                // A change of a constant: Rhai's error, which makes the query interpreted.
                5 if self.constants && self.g.chance(5) => {
                    let change = self
                        .g
                        .pick(&["K_INT += 1", "K_LIST.push(1)", "K_STR += \"c\""]);
                    out.push_str(&format!("if ev.x == 0 {{ {change}; }}\n"));
                }
                5 if !self.locals.is_empty() => {
                    let i = self.g.below(self.locals.len());
                    let op = self.g.pick(&["=", "+=", "*=", "-=", "/=", "%="]);
                    let value = self.expr(2);
                    out.push_str(&format!("{} {op} {value};\n", self.locals[i]));
                }
                6 | 7 if depth > 0 => {
                    out.push_str(&format!("if {} {{\n", self.cond(2)));
                    let k = 1 + self.g.below(3);
                    self.stmts(depth - 1, k, out, timers);
                    if self.g.chance(50) {
                        out.push_str("} else {\n");
                        let k = 1 + self.g.below(2);
                        self.stmts(depth - 1, k, out, timers);
                    }
                    out.push_str("}\n");
                }
                8 | 9 => out.push_str(&format!("emit({});\n", self.emit_map())),
                10 => {
                    let name = format!("m{}", self.next);
                    self.next += 1;
                    let map = self.emit_map();
                    out.push_str(&format!("let {name} = {map};\n"));
                    if self.g.chance(50) {
                        // A local map only given fields, read and emitted: a record, never a
                        // map, in the compiled code; a field given on one branch only.
                        let first = map[3..].split(':').next().unwrap_or("v").to_owned();
                        out.push_str(&format!("if {} {{\n", self.cond(1)));
                        out.push_str(&format!("{name}.extra = {};\n", self.expr(1)));
                        out.push_str("}\n");
                        out.push_str(&format!("{name}.{first} = {};\n", self.expr(1)));
                        out.push_str(&format!("{name}.again = {name}.{first};\n"));
                        out.push_str(&format!("emit({name});\n"));
                    } else {
                        out.push_str(&format!("{name}.extra = {};\n", self.expr(1)));
                        out.push_str(&format!("emit(\"side\", {name});\n"));
                    }
                }
                11 if timers => out.push_str(&format!("set_timer({});\n", self.expr(1))),
                11 | 12 if self.plugin.is_some() => {
                    // Plugin methods, on the state's object or on a local one.
                    let plugin = self.plugin.expect("checked");
                    let change = self.g.pick(plugin.changes);
                    if self.g.chance(75) {
                        let call = self.plugin_call("this.p", change, 1);
                        out.push_str(&format!("{call};\n"));
                    } else {
                        let name = format!("o{}", self.next);
                        self.next += 1;
                        out.push_str(&format!("let {name} = {};\n", plugin.make));
                        let call = self.plugin_call(&name, change, 1);
                        out.push_str(&format!("{call};\n"));
                        let read = self.g.pick(plugin.reads);
                        let read = self.plugin_call(&name, read, 1);
                        out.push_str(&format!("emit(#{{ local: {read} }});\n"));
                    }
                }
                12 if depth < 2 && self.g.chance(20) => out.push_str("return;\n"),
                13 if self.g.chance(10) => out.push_str("forget();\n"),
                // The event itself as a value: `on_event` then holds it boxed.
                13 if self.g.chance(10) => out.push_str("emit(ev);\n"),
                14 if depth > 0 => self.switch(depth - 1, out, timers),
                15 | 16 if self.containers => self.containers(out),
                17 if depth > 0 => self.a_loop(depth - 1, out, timers),
                18 if self.in_loop.is_some() => {
                    let jump = if self.in_loop == Some(true) {
                        self.g.pick(&["break", "continue"])
                    } else {
                        "break"
                    };
                    out.push_str(&format!("if {} {{ {jump}; }}\n", self.cond(1)));
                }
                18 => {
                    let key = self.key();
                    let map = self.emit_map();
                    match self.g.below(3) {
                        0 => out.push_str(&format!("emit_to({key}, {map});\n")),
                        1 => out.push_str(&format!("emit_to(\"side\", {key}, {map});\n")),
                        _ => {
                            let name = self.g.pick(&["\"side\"", "\"other\"", "1"]);
                            out.push_str(&format!("emit({name}, {map});\n"));
                        }
                    }
                }
                _ => out.push_str(&format!("emit({});\n", self.expr(2))),
            }
        }
        self.locals.truncate(scope);
    }

    /// A `switch` on any expression (so on ints, floats, strings, booleans, `()` and event
    /// fields of any type): cases of distinct literals, some as `a | b` lists, whose bodies are
    /// blocks of statements (`return` among them) or one statement; then integer ranges and
    /// `_`, each maybe. Now and then a guarded case (`x if cond`), which is not compiled, and a
    /// `switch` whose value is a local's.
    fn switch(&mut self, depth: usize, out: &mut String, timers: bool) {
        let as_value = self.g.chance(20);
        let value = self.expr(2);
        let name = format!("v{}", self.next);
        if as_value {
            self.next += 1;
            out.push_str(&format!("let {name} = switch {value} {{\n"));
        } else {
            out.push_str(&format!("switch {value} {{\n"));
        }
        let mut pool = vec![
            "0",
            "1",
            "2",
            "7",
            "1000",
            "0.5",
            "1.5",
            "3.0",
            "\"text\"",
            "\"ab\"",
            "true",
            "false",
            "'x'",
            "9223372036854775807",
        ];
        for _ in 0..1 + self.g.below(3) {
            let mut labels = Vec::new();
            for _ in 0..1 + usize::from(self.g.chance(25)) {
                if !pool.is_empty() {
                    labels.push(pool.remove(self.g.below(pool.len())));
                }
            }
            let guard = if self.g.chance(4) {
                format!(" if {}", self.cond(1))
            } else {
                String::new()
            };
            out.push_str(&format!("{}{guard} => ", labels.join(" | ")));
            self.case_body(as_value, depth, out, timers);
        }
        if self.g.chance(40) {
            let (a, b) = (self.g.below(5) as i64 - 2, self.g.below(10));
            let range = if self.g.chance(50) {
                format!("{a}..{b}")
            } else {
                format!("{a}..={b}")
            };
            out.push_str(&format!("{range} => "));
            self.case_body(as_value, depth, out, timers);
        }
        if self.g.chance(50) {
            out.push_str("_ => ");
            self.case_body(as_value, depth, out, timers);
        }
        out.push_str("};\n");
        if as_value {
            self.locals.push(name);
        }
    }

    fn case_body(&mut self, as_value: bool, depth: usize, out: &mut String, timers: bool) {
        if as_value {
            out.push_str(&format!("{},\n", self.expr(2)));
        } else if self.g.chance(30) {
            let op = self.g.pick(&["=", "+=", "*="]);
            let field = self.g.pick(&FIELDS);
            out.push_str(&format!("this.{field} {op} {},\n", self.expr(1)));
        } else {
            out.push_str("{\n");
            let k = 1 + self.g.below(2);
            self.stmts(depth, k, out, timers);
            out.push_str("}\n");
        }
    }
}

/// A random query over the compiled subset.
pub fn program(seed: u64) -> String {
    let mut g = Gen::new(seed);
    let timers = g.chance(40);
    let plugin = g.chance(50).then(|| &PLUGINS[g.below(PLUGINS.len())]);
    let containers = g.chance(40);
    let constants = g.chance(30);
    let mut w = Writer {
        g: &mut g,
        locals: Vec::new(),
        next: 0,
        plugin,
        containers,
        constants,
        in_loop: None,
    };
    let mut s = String::from("let source = \"s\";\nlet key_by = \"k\";\n");
    if constants {
        s.push_str(CONSTANTS);
    }
    s.push_str(&format!(
        "fn mix(p, q) {{ {} }}\n",
        [
            "p + q",
            "p * 2 - q",
            "if p > q { p } else { q }",
            "(p ?? 0) / (q ?? 1)"
        ][w.g.below(4)]
    ));
    // Helpers called as methods on `this`: they change the state and give a value, and one
    // calls the other.
    let (f, g) = (w.g.pick(&FIELDS), w.g.pick(&FIELDS));
    s.push_str(&format!("fn twice(p) {{ this.{g} * p }}\n"));
    s.push_str(&format!(
        "fn bump(p) {{ {} }}\n",
        [
            format!("this.{f} += p; this.{g}"),
            format!("this.{f} = p * 2; p - this.{g}"),
            format!("if p > this.{f} {{ this.{f} = p; }} this.{f}"),
            format!("this.{f} += 1; this.twice(p)"),
        ][w.g.below(4)]
    ));
    let init: Vec<String> = FIELDS
        .iter()
        .map(|f| {
            let v = match w.g.below(4) {
                0 => w.g.pick(&INTS).to_owned(),
                1 => w.g.pick(&FLOATS).to_owned(),
                2 => "0".to_owned(),
                _ => "()".to_owned(),
            };
            format!("{f}: {v}")
        })
        .collect();
    let mut init = init;
    if let Some(p) = w.plugin {
        init.push(format!("p: {}", p.make));
    }
    if containers {
        init.push("m: #{ a: 1, b: #{ v: 2.5 } }".to_owned());
        init.push("l: [1, 2.5, ()]".to_owned());
    }
    s.push_str(&format!("fn init(key) {{ #{{ {} }} }}\n", init.join(", ")));
    s.push_str("fn on_event(ev) {\n");
    let n = 2 + w.g.below(6);
    w.stmts(2, n, &mut s, timers);
    s.push_str("}\n");
    if timers {
        // The timer's time is called `ev` too: event-style reads of a number must fail alike.
        s.push_str("fn on_timer(ev) {\n");
        w.locals.push("ev".into());
        let n = 1 + w.g.below(3);
        w.stmts(1, n, &mut s, false);
        w.locals.clear();
        s.push_str("}\n");
    }
    s
}

/// Random events for [`program`]'s queries, as NDJSON.
pub fn events(seed: u64, count: usize) -> Vec<u8> {
    let mut g = Gen::new(seed ^ 0x5EED);
    let mut out = String::new();
    for _ in 0..count {
        let mut fields = vec![format!("\"k\":\"{}\"", g.pick(&["a", "b", "c"]))];
        for f in EVENT_FIELDS {
            let v = match g.below(10) {
                0 => continue,
                1 => "\"text\"".to_owned(),
                2 => "null".to_owned(),
                3 => "0".to_owned(),
                4..=5 => g.pick(&INTS).to_owned(),
                6 => "true".to_owned(),
                _ => g.pick(&FLOATS).to_owned(),
            };
            fields.push(format!("\"{f}\":{v}"));
        }
        out.push('{');
        out.push_str(&fields.join(","));
        out.push_str("}\n");
    }
    out.into_bytes()
}

/// What one engine made of a run: the items as `eddy run` prints them, the rejections, and
/// whether the query ran compiled.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub items: Vec<u8>,
    pub rejected: Vec<u8>,
}

/// `eddy run` of `def` over `events` on `engine`, in memory.
pub fn run_on(def: &QueryDef, events: &[u8], limits: &Limits, engine: EngineMode) -> Output {
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    let options = RunOptions {
        engine,
        ..RunOptions::default()
    };
    offline::run(
        vec![def.clone()],
        events.to_vec(),
        limits,
        &options,
        &mut items,
        &mut rejected,
    )
    .expect("writing to memory cannot fail");
    Output { items, rejected }
}

/// How a differential run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Both engines wrote the same bytes; `compiled` says whether `auto` compiled the query.
    Same { compiled: bool },
    /// The script does not compile as a query (not a compiler question).
    NotAQuery,
}

/// Runs `script` over `events` on both engines: `Err` with both outputs when they differ.
pub fn run_both(script: &str, events: &[u8], limits: &Limits) -> Result<Verdict, String> {
    let Ok(def) = QueryDef::compile("q", script, limits) else {
        return Ok(Verdict::NotAQuery);
    };
    let compiled = run_on(&def, events, limits, EngineMode::Auto);
    let interpreted = run_on(&def, events, limits, EngineMode::Interpreter);
    if compiled == interpreted {
        return Ok(Verdict::Same {
            compiled: def.engine.compiled(),
        });
    }
    Err(format!(
        "the engines differ on\n{script}\n--- compiled:\n{}{}\n--- interpreted:\n{}{}",
        String::from_utf8_lossy(&compiled.items),
        String::from_utf8_lossy(&compiled.rejected),
        String::from_utf8_lossy(&interpreted.items),
        String::from_utf8_lossy(&interpreted.rejected),
    ))
}
