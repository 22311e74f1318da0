//! Rhai's standard functions on numbers, strings, arrays and maps that queries call most
//! (`sqrt`, `abs`, `max`, `floor`, `to_int`, `len`, `to_lower`, `keys`, ...), done in Rust for
//! compiled queries.
//!
//! Through the interpreter such a call costs thousands of instructions (a helper function, its
//! call setup and the function lookup); rolling statistics, anomaly checks and text queries make
//! several per event. Here each is chosen at compile time ([`lookup`], [`getter`]) and does what
//! the standard library's function for those argument types does. It answers only when the
//! arguments are exactly the types that function takes and the call succeeds: for any other
//! type, or a call that fails (`to_int` out of range, the sign of NaN, `abs` of the smallest
//! integer), [`StdFn::apply`] gives `None` and the caller runs the call as before, which finds
//! the same function, or another one, or gives the interpreter's error. A result that holds data
//! (a string, an array) is checked against the engine's size limits ([`StdFn::apply_within`]),
//! and one over a limit is left to Rhai too.
//!
//! A function of the same name and arity that the engine has outside the standard library (a
//! plugin's, a model's, eddy's own) on one of these types is never looked up here: the compiler
//! asks [`shadowed`] first.

use std::any::TypeId;
use std::collections::HashSet;

use rhai::{Array, Dynamic, Engine, ImmutableString, Map, FLOAT, INT};

/// One standard function, by name and number of arguments.
#[derive(Clone, Copy, Debug)]
pub enum StdFn {
    /// `f(x: FLOAT) -> FLOAT`.
    Float(FloatFn),
    /// `f(x: FLOAT) -> bool`.
    Test(TestFn),
    /// `f(x: FLOAT, y: FLOAT) -> FLOAT`.
    Float2(fn(FLOAT, FLOAT) -> FLOAT),
    Abs,
    Sign,
    IsZero,
    ToInt,
    ToFloat,
    Max,
    Min,
    /// `PI()`, `E()`.
    Constant(FLOAT),
    /// Of a string (its characters), an array or a map.
    Len,
    IsEmpty,
    ToLower,
    ToUpper,
    /// A map's keys, or its values, as an array.
    Keys,
    Values,
    /// An item of an array (by Rhai's `==`), a string or a character in a string, a key of a
    /// map.
    Contains,
    /// Of a string, by a string or a character.
    StartsWith,
    EndsWith,
    /// Where a string or a character first is in a string, in characters (-1: nowhere).
    IndexOf,
    /// A string's parts: by whitespace, by a string or a character, or in two at a position.
    Split,
    /// Characters of a string from a position, to the end or so many.
    SubString,
    /// The number a string spells (blanks around it ignored): an integer (in a radix from 2 to
    /// 36, 10 by default), or a float.
    ParseInt,
    ParseFloat,
    /// The functions that change the array they are called on (see [`StdFn::apply_mut`]).
    Push,
    Pop,
    Shift,
    Remove,
    Clear,
}

type FloatFn = fn(FLOAT) -> FLOAT;
type TestFn = fn(FLOAT) -> bool;

/// The standard functions of one argument on a float, by name (`log` is base 10).
const FLOAT_FNS: [(&str, FloatFn); 23] = [
    ("sqrt", FLOAT::sqrt),
    ("exp", FLOAT::exp),
    ("ln", FLOAT::ln),
    ("log", FLOAT::log10),
    ("floor", FLOAT::floor),
    ("ceiling", FLOAT::ceil),
    ("round", FLOAT::round),
    ("int", FLOAT::trunc),
    ("fraction", FLOAT::fract),
    ("to_radians", FLOAT::to_radians),
    ("to_degrees", FLOAT::to_degrees),
    ("sin", FLOAT::sin),
    ("cos", FLOAT::cos),
    ("tan", FLOAT::tan),
    ("sinh", FLOAT::sinh),
    ("cosh", FLOAT::cosh),
    ("tanh", FLOAT::tanh),
    ("asin", FLOAT::asin),
    ("acos", FLOAT::acos),
    ("atan", FLOAT::atan),
    ("asinh", FLOAT::asinh),
    ("acosh", FLOAT::acosh),
    ("atanh", FLOAT::atanh),
];

const TESTS: [(&str, TestFn); 3] = [
    ("is_nan", FLOAT::is_nan),
    ("is_finite", FLOAT::is_finite),
    ("is_infinite", FLOAT::is_infinite),
];

/// The functions that are also property getters (`x.floor`, `s.len`).
const GETTERS: [&str; 11] = [
    "floor",
    "ceiling",
    "round",
    "int",
    "fraction",
    "is_nan",
    "is_finite",
    "is_infinite",
    "is_zero",
    "len",
    "is_empty",
];

/// The standard function `name` of `arity` arguments (a method's receiver counted), if it is
/// one done here.
pub fn lookup(name: &str, arity: usize) -> Option<StdFn> {
    if arity == 1 {
        if let Some((_, f)) = FLOAT_FNS.iter().find(|(n, _)| *n == name) {
            return Some(StdFn::Float(*f));
        }
        if let Some((_, f)) = TESTS.iter().find(|(n, _)| *n == name) {
            return Some(StdFn::Test(*f));
        }
    }
    Some(match (name, arity) {
        ("log", 2) => StdFn::Float2(FLOAT::log),
        ("atan", 2) => StdFn::Float2(FLOAT::atan2),
        ("hypot", 2) => StdFn::Float2(FLOAT::hypot),
        ("abs", 1) => StdFn::Abs,
        ("is_zero", 1) => StdFn::IsZero,
        ("sign", 1) => StdFn::Sign,
        ("to_int", 1) => StdFn::ToInt,
        ("to_float", 1) => StdFn::ToFloat,
        ("max", 2) => StdFn::Max,
        ("min", 2) => StdFn::Min,
        ("PI", 0) => StdFn::Constant(std::f64::consts::PI),
        ("E", 0) => StdFn::Constant(std::f64::consts::E),
        ("len", 1) => StdFn::Len,
        ("is_empty", 1) => StdFn::IsEmpty,
        ("to_lower", 1) => StdFn::ToLower,
        ("to_upper", 1) => StdFn::ToUpper,
        ("keys", 1) => StdFn::Keys,
        ("values", 1) => StdFn::Values,
        ("contains", 2) => StdFn::Contains,
        ("starts_with", 2) => StdFn::StartsWith,
        ("ends_with", 2) => StdFn::EndsWith,
        ("index_of", 2) => StdFn::IndexOf,
        ("split", 1 | 2) => StdFn::Split,
        ("sub_string", 2 | 3) => StdFn::SubString,
        ("parse_int", 1 | 2) => StdFn::ParseInt,
        ("parse_float", 1) => StdFn::ParseFloat,
        ("push", 2) => StdFn::Push,
        ("pop", 1) => StdFn::Pop,
        ("shift", 1) => StdFn::Shift,
        ("remove", 2) => StdFn::Remove,
        ("clear", 1) => StdFn::Clear,
        _ => return None,
    })
}

/// The standard property getter `x.name` (of a number, a string or an array), if it is one
/// done here.
pub fn getter(name: &str) -> Option<StdFn> {
    GETTERS.contains(&name).then(|| lookup(name, 1)).flatten()
}

/// The names (with their arity; `get$name` for getters) that the engine has a function for
/// outside the standard library whose first parameter may be a number, a string, an array or a
/// map: calls of those names are left to the general call. (A plugin's `len` on its own type,
/// such as a ring's, does not count.)
pub fn shadowed(engine: &Engine) -> HashSet<(String, usize)> {
    let std_types = [
        TypeId::of::<INT>(),
        TypeId::of::<FLOAT>(),
        TypeId::of::<bool>(),
        TypeId::of::<ImmutableString>(),
        TypeId::of::<String>(),
        TypeId::of::<&str>(),
        TypeId::of::<char>(),
        TypeId::of::<Array>(),
        TypeId::of::<Map>(),
        TypeId::of::<Dynamic>(),
    ];
    engine
        .collect_fn_metadata(
            None,
            |f| {
                let first = f.metadata.param_types.first();
                first
                    .is_none_or(|t| std_types.contains(t))
                    .then(|| (f.metadata.name.to_string(), f.metadata.num_params))
            },
            false,
        )
        .into_iter()
        .collect()
}

impl StdFn {
    /// Whether the function changes what it is called on (an array): called as a method, on
    /// the value in place, by [`StdFn::apply_mut`].
    pub fn mutates(self) -> bool {
        matches!(
            self,
            StdFn::Push | StdFn::Pop | StdFn::Shift | StdFn::Remove | StdFn::Clear
        )
    }

    /// `on.name(args)` for the functions that change an array, done on `on` in place, when it
    /// is an array that may be changed and the call succeeds: an array that `push` takes past
    /// `engine`'s size limits is given back as it was and the call left to Rhai, which makes
    /// the same change and gives its error. `None` (nothing changed) otherwise.
    pub fn apply_mut(self, engine: &Engine, on: &mut Dynamic, args: &[Dynamic]) -> Option<Dynamic> {
        if !on.is_array() || on.is_shared() || on.is_read_only() {
            return None;
        }
        let mut array = on.as_array_mut().ok()?;
        let out = match (self, args) {
            (StdFn::Push, [item]) => {
                array.push(item.clone());
                drop(array);
                if engine.ensure_data_size_within_limits(on).is_err() {
                    on.as_array_mut().ok()?.pop();
                    return None;
                }
                return Some(Dynamic::UNIT);
            }
            (StdFn::Pop, []) => array.pop().unwrap_or(Dynamic::UNIT),
            (StdFn::Shift, []) if array.is_empty() => Dynamic::UNIT,
            (StdFn::Shift, []) => array.remove(0),
            (StdFn::Remove, [index]) => {
                // Rhai's index: from the end when negative; out of range removes nothing.
                let index = index.as_int().ok()?;
                let len = array.len();
                let at = if index < 0 {
                    usize::try_from(index.unsigned_abs())
                        .ok()
                        .filter(|&back| back <= len)
                        .map(|back| len - back)
                } else {
                    usize::try_from(index).ok().filter(|&i| i < len)
                };
                at.map_or(Dynamic::UNIT, |i| array.remove(i))
            }
            (StdFn::Clear, []) => {
                array.clear();
                Dynamic::UNIT
            }
            _ => return None,
        };
        Some(out)
    }

    /// [`StdFn::apply`], with a result that holds data (a string, an array) within `engine`'s
    /// size limits: one over a limit is left to Rhai, which gives its error.
    pub fn apply_within(self, engine: &Engine, args: &[&Dynamic]) -> Option<Dynamic> {
        let value = self.apply(args)?;
        let holds_data = matches!(
            self,
            StdFn::ToLower | StdFn::ToUpper | StdFn::Keys | StdFn::Values | StdFn::Split
        );
        if holds_data && engine.ensure_data_size_within_limits(&value).is_err() {
            return None;
        }
        Some(value)
    }

    /// The call's result as the standard library gives it, or `None` when the arguments are not
    /// the numbers it takes or the call fails (see the module's note).
    #[inline]
    pub fn apply(self, args: &[&Dynamic]) -> Option<Dynamic> {
        // A plugin's object (or any custom type) first: none of these takes one. One check,
        // so that a plugin getter such as a ring's `len` goes on to the plugin at once.
        if args.first().is_some_and(|a| a.is_variant()) || self.mutates() {
            return None;
        }
        let float = |v: &Dynamic| v.as_float().ok();
        let int = |v: &Dynamic| v.as_int().ok();
        Some(match (self, args) {
            (StdFn::Float(f), [x]) => Dynamic::from_float(f(float(x)?)),
            (StdFn::Test(f), [x]) => Dynamic::from_bool(f(float(x)?)),
            (StdFn::Float2(f), [x, y]) => Dynamic::from_float(f(float(x)?, float(y)?)),
            (StdFn::Abs, [x]) => match int(x) {
                Some(i) => Dynamic::from_int(i.checked_abs()?),
                None => Dynamic::from_float(float(x)?.abs()),
            },
            (StdFn::Sign, [x]) => match int(x) {
                Some(i) => Dynamic::from_int(i.signum()),
                None => {
                    let f = float(x)?;
                    if f.is_nan() {
                        return None;
                    }
                    Dynamic::from_int(if f == 0.0 { 0 } else { f.signum() as INT })
                }
            },
            (StdFn::IsZero, [x]) => match int(x) {
                Some(i) => Dynamic::from_bool(i == 0),
                None => Dynamic::from_bool(float(x)? == 0.0),
            },
            (StdFn::ToInt, [x]) => match int(x) {
                Some(i) => Dynamic::from_int(i),
                None => {
                    let f = float(x)?;
                    #[allow(clippy::cast_precision_loss)]
                    if f > INT::MAX as FLOAT || f < INT::MIN as FLOAT {
                        return None;
                    }
                    Dynamic::from_int(f.trunc() as INT)
                }
            },
            (StdFn::ToFloat, [x]) => match int(x) {
                Some(i) => Dynamic::from_float(i as FLOAT),
                None => Dynamic::from_float(float(x)?),
            },
            (StdFn::Max | StdFn::Min, [x, y]) => {
                let max = matches!(self, StdFn::Max);
                if let (Some(a), Some(b)) = (int(x), int(y)) {
                    let pick_a = if max { a >= b } else { a <= b };
                    Dynamic::from_int(if pick_a { a } else { b })
                } else {
                    // An integer beside a float is taken as a float.
                    let a = int(x).map_or_else(|| float(x), |i| Some(i as FLOAT))?;
                    let b = int(y).map_or_else(|| float(y), |i| Some(i as FLOAT))?;
                    let pick_a = if max { a >= b } else { a <= b };
                    Dynamic::from_float(if pick_a { a } else { b })
                }
            }
            (StdFn::Constant(c), []) => Dynamic::from_float(c),
            (StdFn::Len | StdFn::IsEmpty, [x]) => {
                let n = if let Ok(s) = x.as_immutable_string_ref() {
                    s.chars().count()
                } else if let Ok(a) = x.as_array_ref() {
                    a.len()
                } else if let Ok(m) = x.as_map_ref() {
                    m.len()
                } else {
                    return None;
                };
                if matches!(self, StdFn::Len) {
                    Dynamic::from_int(INT::try_from(n).unwrap_or(INT::MAX))
                } else {
                    Dynamic::from_bool(n == 0)
                }
            }
            (StdFn::ToLower | StdFn::ToUpper, [x]) => {
                let s = x.as_immutable_string_ref().ok()?;
                let lower = matches!(self, StdFn::ToLower);
                let same = if lower {
                    s.is_empty() || s.chars().all(char::is_lowercase)
                } else {
                    s.chars().all(char::is_uppercase)
                };
                if same {
                    Dynamic::from((*s).clone())
                } else if lower {
                    Dynamic::from(s.to_lowercase())
                } else {
                    Dynamic::from(s.to_uppercase())
                }
            }
            (StdFn::Keys | StdFn::Values, [x]) => {
                let m = x.as_map_ref().ok()?;
                let items: Array = if matches!(self, StdFn::Keys) {
                    m.keys().cloned().map(Into::into).collect()
                } else {
                    m.values().cloned().collect()
                };
                Dynamic::from_array(items)
            }
            (StdFn::Contains, [on, v]) => {
                if let Ok(items) = on.as_array_ref() {
                    // Rhai's `==` on each item in turn, up to the first that equals `v`: an
                    // item before it that this does not compare leaves the call to Rhai.
                    for item in items.iter() {
                        if crate::compiled::std_equals(item, v)? {
                            return Some(Dynamic::TRUE);
                        }
                    }
                    Dynamic::FALSE
                } else if let Ok(s) = on.as_immutable_string_ref() {
                    if let Ok(sub) = v.as_immutable_string_ref() {
                        Dynamic::from_bool(s.contains(sub.as_str()))
                    } else {
                        Dynamic::from_bool(s.contains(v.as_char().ok()?))
                    }
                } else {
                    let key = v.as_immutable_string_ref().ok()?;
                    Dynamic::from_bool(on.as_map_ref().ok()?.contains_key(key.as_str()))
                }
            }
            // What does not parse is Rhai's error: left to Rhai.
            (StdFn::ParseInt, [s, radix @ ..]) => {
                let s = s.as_immutable_string_ref().ok()?;
                let radix = match radix {
                    [] => 10,
                    [r] => u32::try_from(r.as_int().ok()?)
                        .ok()
                        .filter(|r| (2..=36).contains(r))?,
                    _ => return None,
                };
                Dynamic::from_int(INT::from_str_radix(s.trim(), radix).ok()?)
            }
            (StdFn::ParseFloat, [s]) => {
                let s = s.as_immutable_string_ref().ok()?;
                Dynamic::from_float(s.trim().parse::<FLOAT>().ok()?)
            }
            (StdFn::Split, [s, at]) if at.is_int() => {
                let s = s.as_immutable_string_ref().ok()?;
                let (head, tail) = split_at(&s, at.as_int().ok()?);
                Dynamic::from_array(vec![head.into(), tail.into()])
            }
            (StdFn::SubString, [s, start, len @ ..]) => {
                let s = s.as_immutable_string_ref().ok()?;
                let start = start.as_int().ok()?;
                // Without a length, to the end: Rhai passes the length in bytes, at least the
                // length in characters.
                let len = match len {
                    [] => INT::try_from(s.len()).unwrap_or(INT::MAX),
                    [len] => len.as_int().ok()?,
                    _ => return None,
                };
                Dynamic::from(ImmutableString::from(sub_string(&s, start, len)))
            }
            (StdFn::StartsWith | StdFn::EndsWith | StdFn::IndexOf | StdFn::Split, [s, ..]) => {
                let s = s.as_immutable_string_ref().ok()?;
                // The second argument, a string or a character, or none (`split()`).
                let text = args.get(1).and_then(|v| v.as_immutable_string_ref().ok());
                let by = match (args.get(1), &text) {
                    (None, _) => None,
                    (Some(_), Some(t)) => Some(Pattern::Str(t.as_str())),
                    (Some(v), None) => Some(Pattern::Char(v.as_char().ok()?)),
                };
                match (self, by) {
                    (StdFn::StartsWith, Some(Pattern::Str(t))) => {
                        Dynamic::from_bool(s.starts_with(t))
                    }
                    (StdFn::StartsWith, Some(Pattern::Char(c))) => {
                        Dynamic::from_bool(s.starts_with(c))
                    }
                    (StdFn::EndsWith, Some(Pattern::Str(t))) => Dynamic::from_bool(s.ends_with(t)),
                    (StdFn::EndsWith, Some(Pattern::Char(c))) => Dynamic::from_bool(s.ends_with(c)),
                    (StdFn::IndexOf, Some(p)) => {
                        // In characters; an empty string finds nothing, as in Rhai.
                        let at = match p {
                            _ if s.is_empty() => None,
                            Pattern::Str(t) => s.find(t),
                            Pattern::Char(c) => s.find(c),
                        };
                        Dynamic::from_int(
                            at.map_or(-1, |i| INT::try_from(s[..i].chars().count()).unwrap_or(-1)),
                        )
                    }
                    (StdFn::Split, None) if s.is_empty() => {
                        Dynamic::from_array(vec![s.clone().into()])
                    }
                    (StdFn::Split, None) => {
                        Dynamic::from_array(s.split_whitespace().map(Into::into).collect())
                    }
                    // Rhai's: the whole string when it is empty or holds no (non-empty)
                    // delimiter, else Rust's split.
                    (StdFn::Split, Some(Pattern::Str(t))) => {
                        if s.is_empty() || (!t.is_empty() && !s.contains(t)) {
                            Dynamic::from_array(vec![s.clone().into()])
                        } else {
                            Dynamic::from_array(s.split(t).map(Into::into).collect())
                        }
                    }
                    (StdFn::Split, Some(Pattern::Char(c))) => {
                        if s.is_empty() || !s.contains(c) {
                            Dynamic::from_array(vec![s.clone().into()])
                        } else {
                            Dynamic::from_array(s.split(c).map(Into::into).collect())
                        }
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}

/// Rhai's `sub_string(s, start, len)`: `len` characters from character `start` (from the end
/// when negative, from the beginning when before it), as many as there are; nothing when `s` is
/// empty, `len` is not positive or `start` is past the end.
fn sub_string(s: &str, start: INT, len: INT) -> &str {
    if s.is_empty() || len <= 0 {
        return "";
    }
    let count = s.chars().count();
    let offset = if start < 0 {
        let Ok(back) = usize::try_from(start.unsigned_abs()) else {
            return "";
        };
        count.saturating_sub(back)
    } else {
        match usize::try_from(start) {
            Ok(start) if start < count => start,
            _ => return "",
        }
    };
    // (`len` is positive here.)
    let len = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(count - offset);
    let from = char_at(s, offset);
    &s[from..from + char_at(&s[from..], len)]
}

/// Rhai's `split(s, index)`: the first `index` characters and the rest; counted from the end
/// when `index` is not positive (all of `s` second when that is before the beginning).
fn split_at(s: &str, index: INT) -> (&str, &str) {
    let at = if index <= 0 {
        let count = s.chars().count();
        match usize::try_from(index.unsigned_abs()) {
            Ok(back) if back <= count => char_at(s, count - back),
            _ => 0,
        }
    } else {
        usize::try_from(index).map_or(s.len(), |n| char_at(s, n))
    };
    s.split_at(at)
}

/// The byte where character `n` of `s` starts (`s.len()` when `s` has no more).
fn char_at(s: &str, n: usize) -> usize {
    s.char_indices().nth(n).map_or(s.len(), |(i, _)| i)
}

/// What a string function looks for: a string or a character.
enum Pattern<'a> {
    Str(&'a str),
    Char(char),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every function gives what Rhai's own gives for the same arguments (the interpreter is
    /// the reference), and answers whenever Rhai succeeds on numbers; otherwise it leaves the
    /// call to Rhai.
    #[test]
    fn each_function_gives_what_rhai_gives() {
        let engine = Engine::new();
        let values = [
            "0.0",
            "-0.0",
            "0.5",
            "2.5",
            "-2.5",
            "9.0",
            "1e300",
            "-1e300",
            "0",
            "7",
            "-7",
            "9223372036854775807",
            "(-9223372036854775807 - 1)",
            "1",
            "\"s\"",
            "\"x\"",
            "\"AbC é\"",
            "\" a,b  é,\"",
            "\",\"",
            "\" 42 \"",
            "\"-7.5e3\"",
            "\"fF\"",
            "' '",
            "\"\"",
            "'c'",
            "[1, \"x\"]",
            "[]",
            "#{a: 1, b: \"x\"}",
            "#{}",
            "()",
            "true",
        ];
        let one: Vec<&str> = FLOAT_FNS
            .iter()
            .map(|(n, _)| *n)
            .chain(TESTS.iter().map(|(n, _)| *n))
            .chain(["abs", "sign", "is_zero", "to_int", "to_float"])
            .chain([
                "len",
                "is_empty",
                "to_lower",
                "to_upper",
                "keys",
                "values",
                "split",
                "parse_int",
                "parse_float",
            ])
            .collect();
        let mut calls: Vec<(String, Vec<&str>, usize)> = Vec::new();
        for name in one {
            for v in values {
                calls.push((name.to_owned(), vec![v], 1));
            }
        }
        for name in [
            "log",
            "atan",
            "hypot",
            "max",
            "min",
            "contains",
            "starts_with",
            "ends_with",
            "index_of",
            "split",
            "sub_string",
            "parse_int",
        ] {
            for a in values {
                for b in values {
                    calls.push((name.to_owned(), vec![a, b], 2));
                }
            }
        }
        for a in values {
            for b in values {
                for c in ["0", "2", "-1", "9223372036854775807", "\"x\""] {
                    calls.push(("sub_string".to_owned(), vec![a, b, c], 3));
                }
            }
        }
        calls.push(("PI".to_owned(), vec![], 0));
        calls.push(("E".to_owned(), vec![], 0));
        let mut answered = 0;
        for (name, args, arity) in &calls {
            let f = lookup(name, *arity).unwrap_or_else(|| panic!("{name}/{arity}"));
            let script = format!("{name}({})", args.join(", "));
            let want = engine.eval::<Dynamic>(&script);
            let values: Vec<Dynamic> = args
                .iter()
                .map(|a| engine.eval::<Dynamic>(a).unwrap())
                .collect();
            let refs: Vec<&Dynamic> = values.iter().collect();
            match (f.apply(&refs), want) {
                (Some(got), Ok(want)) => {
                    assert_eq!(got.type_name(), want.type_name(), "{script}");
                    let same = match (got.as_float(), want.as_float()) {
                        (Ok(g), Ok(w)) => g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        _ => got.to_string() == want.to_string(),
                    };
                    assert!(same, "{script}: {got} against Rhai's {want}");
                    answered += 1;
                }
                (Some(got), Err(e)) => panic!("{script}: {got}, where Rhai fails: {e}"),
                // Numbers, and strings, arrays and maps for the functions of those: answered.
                (None, Ok(want))
                    if values.iter().all(|v| v.is_int() || v.is_float())
                        || (["len", "is_empty", "to_lower", "to_upper", "keys", "values"]
                            .contains(&name.as_str())
                            && (values[0].is_string()
                                || values[0].is_array()
                                || values[0].is_map()))
                        || (name == "contains"
                            && (values[0].is_array() && !values[1].is_char()
                                || values[0].is_string()
                                || values[0].is_map()))
                        || (["starts_with", "ends_with", "index_of", "split"]
                            .contains(&name.as_str())
                            && values[0].is_string()
                            && values.get(1).is_none_or(|v| v.is_string() || v.is_char()))
                        || (["parse_int", "parse_float"].contains(&name.as_str())
                            && values[0].is_string())
                        || (["split", "sub_string"].contains(&name.as_str())
                            && values[0].is_string()
                            && values[1..].iter().all(|v| v.is_int())) =>
                {
                    panic!("{script}: left to Rhai, which gives {want}")
                }
                (None, _) => {}
            }
        }
        assert!(
            answered > 500,
            "{answered} of {} calls answered",
            calls.len()
        );
    }

    /// The getters (`x.floor`) give what Rhai's give, and leave to Rhai what it refuses.
    #[test]
    fn getters_give_what_rhai_gives() {
        let engine = Engine::new();
        for name in GETTERS {
            for v in [
                "2.5", "-2.5", "0.0", "1e300", "0", "3", "\"Ab\"", "[1, 2]", "[]",
            ] {
                let want = engine.eval::<Dynamic>(&format!("let x = {v}; x.{name}"));
                let x: Dynamic = engine.eval(v).unwrap();
                match (getter(name).unwrap().apply(&[&x]), want) {
                    (Some(got), Ok(want)) => {
                        assert_eq!(got.to_string(), want.to_string(), "{v}.{name}")
                    }
                    (None, Err(_)) => {}
                    (got, want) => panic!("{v}.{name}: {got:?} against Rhai's {want:?}"),
                }
            }
        }
    }

    /// The functions that change an array leave it, and give, what Rhai's leave and give, and
    /// change nothing where they leave the call to Rhai.
    #[test]
    fn array_changes_give_what_rhai_gives() {
        let engine = Engine::new();
        let receivers = ["[]", "[1, \"x\", 2.5]", "\"text\"", "#{a: 1}", "7"];
        let calls: [(&str, &[&str]); 5] = [
            ("push", &["4", "\"y\"", "()"]),
            ("pop", &[]),
            ("shift", &[]),
            ("remove", &["0", "2", "-1", "-3", "-4", "3", "\"a\""]),
            ("clear", &[]),
        ];
        for on in receivers {
            for (name, args) in calls {
                let with: Vec<Option<&str>> = if args.is_empty() {
                    vec![None]
                } else {
                    args.iter().map(|a| Some(*a)).collect()
                };
                for arg in with {
                    let call = format!("{name}({})", arg.unwrap_or(""));
                    let script = format!("let a = {on}; let r = a.{call}; [a, r]");
                    let want = engine.eval::<Dynamic>(&script);
                    let mut value: Dynamic = engine.eval(on).unwrap();
                    let before = value.to_string();
                    let args: Vec<Dynamic> = arg
                        .iter()
                        .map(|a| engine.eval::<Dynamic>(a).unwrap())
                        .collect();
                    let f = lookup(name, args.len() + 1).unwrap();
                    match (f.apply_mut(&engine, &mut value, &args), want) {
                        (Some(got), Ok(want)) => {
                            let got = Dynamic::from_array(vec![value.clone(), got]).to_string();
                            assert_eq!(got, want.to_string(), "{on}.{call}");
                        }
                        (None, want) => {
                            assert_eq!(value.to_string(), before, "{on}.{call} changed it");
                            assert!(!on.starts_with('[') || want.is_err(), "{on}.{call}");
                        }
                        (Some(got), Err(e)) => panic!("{on}.{call}: {got}, where Rhai fails: {e}"),
                    }
                }
            }
        }
    }

    /// The compiler can reach every function here: the engine queries run on (plugins, models
    /// and eddy's built-ins registered) has no other function of these names on their types.
    /// Were one listed, the function would silently go back to Rhai's helper.
    #[test]
    fn the_query_engine_shadows_none_of_them() {
        let limits = crate::Limits::default();
        let mut engine = crate::sandbox::new_engine(&limits);
        let ctx = std::rc::Rc::new(std::cell::RefCell::new(crate::builtins::CallCtx::new(
            &limits,
        )));
        crate::builtins::register(&mut engine, &ctx);
        let shadowed = shadowed(&engine);
        // (The check sees plugin functions: `window_start` takes a number first.)
        assert!(
            shadowed.iter().any(|(n, _)| n == "window_start"),
            "{shadowed:?}"
        );
        let names = FLOAT_FNS
            .iter()
            .map(|(n, _)| (*n, 1))
            .chain(TESTS.iter().map(|(n, _)| (*n, 1)));
        let others = [
            ("log", 2),
            ("atan", 2),
            ("hypot", 2),
            ("abs", 1),
            ("is_zero", 1),
            ("sign", 1),
            ("to_int", 1),
            ("to_float", 1),
            ("max", 2),
            ("min", 2),
            ("PI", 0),
            ("E", 0),
            ("len", 1),
            ("is_empty", 1),
            ("to_lower", 1),
            ("to_upper", 1),
            ("keys", 1),
            ("values", 1),
            ("push", 2),
            ("pop", 1),
            ("shift", 1),
            ("remove", 2),
            ("clear", 1),
        ];
        for (name, arity) in names.chain(others) {
            assert!(lookup(name, arity).is_some(), "{name}/{arity}");
            assert!(
                !shadowed.contains(&(name.to_owned(), arity)),
                "{name}/{arity} is shadowed"
            );
        }
        for name in GETTERS {
            assert!(
                !shadowed.contains(&(format!("get${name}"), 1)),
                "get${name} is shadowed"
            );
        }
    }
}
