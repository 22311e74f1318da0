//! Events: one input buffer parsed once by simd-json into a tape that every event of the input
//! points into.
//!
//! A [`Frame`] owns the bytes of one input (a WebSocket frame, an HTTP body, a chunk of a file)
//! and the simd-json tape of every JSON document in it. An [`Event`] is a cheap handle (an `Arc`
//! and a node index) into a frame: reading `ev.price` walks the few nodes of that object on the
//! tape, so no map is built per event and strings are not copied until a script reads them.
//!
//! Input formats (see [`Parser::parse`]): one JSON object, a JSON array of objects, or NDJSON
//! (one object per line, blank lines ignored). Anything that is not an object is rejected with a
//! [`Rejection`] that names its position; the other events of the input go on.
//!
//! In: owned bytes. Out: an `Arc<Frame>` with its events, and the rejections.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use rhai::Dynamic;
use simd_json::{Buffers, Node, StaticNode, Tape};

/// Where an event stood in its input, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// 0-based index of the item in the input (array element or NDJSON record, counting the
    /// rejected ones too).
    pub index: u32,
    /// 1-based line number, for NDJSON input.
    pub line: Option<u32>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "event {} (line {line})", self.index),
            None => write!(f, "event {}", self.index),
        }
    }
}

/// Why an input item was rejected, in a word: the label of the rejection counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectKind {
    InvalidJson,
    NotObject,
    NoStream,
    BadKey,
    BadTime,
    /// The shard the event was bound for is not running.
    Unavailable,
}

impl RejectKind {
    pub const ALL: [RejectKind; 6] = [
        RejectKind::InvalidJson,
        RejectKind::NotObject,
        RejectKind::NoStream,
        RejectKind::BadKey,
        RejectKind::BadTime,
        RejectKind::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectKind::InvalidJson => "invalid_json",
            RejectKind::NotObject => "not_object",
            RejectKind::NoStream => "no_stream",
            RejectKind::BadKey => "bad_key",
            RejectKind::BadTime => "bad_time",
            RejectKind::Unavailable => "unavailable",
        }
    }
}

/// An input item that did not become an event, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub position: Position,
    pub kind: RejectKind,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.reason)
    }
}

/// Whether two field names are equal. Names are short (a few bytes), where a call of `memcmp`
/// (what `==` on strings becomes) costs more than the comparison: up to 16 bytes are compared as
/// two overlapping words, inline.
#[inline(always)]
pub(crate) fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        0 => true,
        1..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

/// A parsed input: the bytes, their tape, and where each event's object starts on the tape.
pub struct Frame {
    /// Tape of every document in `buf`. The `'static` is a lie told once, in [`Parser::parse`]:
    /// the strings really borrow `buf`, whose heap block never moves or changes after parsing
    /// and lives as long as this struct. Nothing hands out a `Node<'static>`; every accessor
    /// ties the lifetime of what it returns to `&self`.
    nodes: Vec<Node<'static>>,
    events: Vec<(u32, Position)>,
    _buf: Vec<u8>,
    /// Held as long as the frame lives (the server's ingest budget, see [`Frame::hold`]).
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("events", &self.events.len())
            .finish()
    }
}

/// The most memory a frame's tape takes per byte of its input, besides the input itself: a
/// node for as little as two bytes (`[1,1,…]`; `{"":1,…}` takes two nodes per five).
pub const MAX_TAPE_BYTES_PER_INPUT_BYTE: usize = std::mem::size_of::<Node<'static>>() / 2;

/// The scratch memory one parse takes per byte of its input, given back when it is done (for
/// inputs over 1 MiB): simd-json's copy of the input, its string buffer and its structural
/// indexes (4 bytes for each structural character).
pub const MAX_SCRATCH_BYTES_PER_INPUT_BYTE: usize = 6;

impl Frame {
    /// A frame with no events, to parse into.
    fn empty() -> Frame {
        Frame {
            nodes: Vec::new(),
            events: Vec::new(),
            _buf: Vec::new(),
            held: None,
        }
    }

    /// The memory the frame holds, in bytes: its input, its tape and its event index.
    pub fn bytes(&self) -> usize {
        self._buf.capacity()
            + self.nodes.capacity() * std::mem::size_of::<Node<'static>>()
            + self.events.capacity() * std::mem::size_of::<(u32, Position)>()
    }

    /// Keeps `what` until the frame is dropped (after the last event of it is handled).
    pub fn hold(&mut self, what: impl std::any::Any + Send + Sync) {
        self.held = Some(Box::new(what));
    }

    /// Number of events (objects) in the frame.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The `i`-th event of the frame.
    pub fn event(self: &Arc<Self>, i: usize) -> Event {
        Event {
            frame: Arc::clone(self),
            node: self.events[i].0,
        }
    }

    /// Where the `i`-th event stood in the input.
    pub fn position(&self, i: usize) -> Position {
        self.events[i].1
    }

    /// The tape node `i` of this frame, with its lifetime bound to the frame.
    fn node(&self, i: u32) -> Node<'_> {
        self.nodes[i as usize]
    }

    /// Number of tape nodes the value at `i` spans, itself included.
    fn span(&self, i: u32) -> u32 {
        match self.nodes[i as usize] {
            // `count` leaves out the header node itself.
            Node::Object { count, .. } | Node::Array { count, .. } => count as u32 + 1,
            _ => 1,
        }
    }

    /// The value of `field` in the object at node `obj`.
    fn get(&self, obj: u32, field: &str) -> Option<u32> {
        let Node::Object { len, count } = self.node(obj) else {
            return None;
        };
        if count == 2 * len {
            // Only scalar values: every other node is a name, no value's span to walk.
            return (0..len as u32)
                .map(|j| obj + 1 + 2 * j)
                .find(|&at| matches!(self.node(at), Node::String(name) if same_name(name, field)))
                .map(|at| at + 1);
        }
        let mut at = obj + 1;
        for _ in 0..len {
            let name = self.node(at);
            at += 1;
            if let Node::String(name) = name {
                if same_name(name, field) {
                    return Some(at);
                }
            }
            at += self.span(at);
        }
        None
    }

    /// [`Frame::get`], trying first the place `hint` remembers (the field's index among the
    /// object's fields when it was last found): one comparison when events have the same shape.
    /// Only for objects whose values are all scalars, where every other node is a name.
    #[inline]
    fn get_hinted(&self, obj: u32, field: &str, hint: &Cell<u32>) -> Option<u32> {
        self.get_hinted_in_line(obj, field, hint)
    }

    /// [`Frame::get_hinted`], always in line: for routing, which reads two or three fields of
    /// every event, and for compiled code's reads of numbers (`Event::get_hinted_scalar`), where
    /// whether the compiler put `get_hinted` in line changed with unrelated code (93
    /// instructions per event of vwap when it did not).
    #[inline(always)]
    fn get_hinted_in_line(&self, obj: u32, field: &str, hint: &Cell<u32>) -> Option<u32> {
        let Node::Object { len, count } = self.node(obj) else {
            return None;
        };
        if count != 2 * len {
            return self.get(obj, field);
        }
        let name_at = |j: u32| obj + 1 + 2 * j;
        let j = hint.get();
        if (j as usize) < len {
            if let Node::String(name) = self.node(name_at(j)) {
                if same_name(name, field) {
                    return Some(name_at(j) + 1);
                }
            }
        }
        for j in 0..len as u32 {
            if let Node::String(name) = self.node(name_at(j)) {
                if same_name(name, field) {
                    hint.set(j);
                    return Some(name_at(j) + 1);
                }
            }
        }
        None
    }

    /// The value at `path` (object fields, in order) below the node `from`.
    pub fn lookup(&self, from: u32, path: &FieldPath) -> Option<u32> {
        path.0
            .iter()
            .try_fold(from, |at, field| self.get(at, field))
    }

    /// What the value at node `i` is, borrowed from the frame.
    pub fn value(&self, i: u32) -> Value<'_> {
        match self.node(i) {
            Node::String(s) => Value::Str(s),
            Node::Object { .. } => Value::Object,
            Node::Array { .. } => Value::Array,
            Node::Static(StaticNode::Null) => Value::Null,
            Node::Static(StaticNode::Bool(b)) => Value::Bool(b),
            Node::Static(StaticNode::I64(n)) => Value::Int(n),
            Node::Static(StaticNode::U64(n)) => match i64::try_from(n) {
                Ok(n) => Value::Int(n),
                Err(_) => Value::Float(n as f64),
            },
            Node::Static(StaticNode::F64(x)) => Value::Float(x),
        }
    }

    /// The elements of the array or the `(name, value)` pairs of the object at node `i`.
    fn children(&self, i: u32) -> Children<'_> {
        let (len, object) = match self.node(i) {
            Node::Object { len, .. } => (len, true),
            Node::Array { len, .. } => (len, false),
            _ => (0, false),
        };
        Children {
            frame: self,
            at: i + 1,
            left: len,
            object,
        }
    }

    /// The value at node `i` as a Rhai value: numbers keep their JSON kind, objects stay handles
    /// into this frame, arrays become Rhai arrays.
    fn to_dynamic(self: &Arc<Self>, i: u32) -> Dynamic {
        match self.value(i) {
            Value::Null => Dynamic::UNIT,
            Value::Bool(b) => Dynamic::from_bool(b),
            Value::Int(n) => Dynamic::from_int(n),
            Value::Float(x) => Dynamic::from_float(x),
            Value::Str(s) => Dynamic::from(s.to_owned()),
            Value::Object => Dynamic::from(Event {
                frame: Arc::clone(self),
                node: i,
            }),
            Value::Array => {
                let items: rhai::Array = self
                    .children(i)
                    .map(|(_, at)| self.to_dynamic(at))
                    .collect();
                Dynamic::from_array(items)
            }
        }
    }

    /// Writes the value at node `i` as compact JSON.
    pub fn write_json(&self, i: u32, out: &mut Vec<u8>) {
        match self.value(i) {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
            Value::Int(n) => crate::json::write_int(out, n),
            Value::Float(x) => crate::json::write_float(out, x),
            Value::Str(s) => crate::json::write_str(out, s),
            Value::Object => {
                out.push(b'{');
                for (n, (name, at)) in self.children(i).enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    crate::json::write_str(out, name.unwrap_or_default());
                    out.push(b':');
                    self.write_json(at, out);
                }
                out.push(b'}');
            }
            Value::Array => {
                out.push(b'[');
                for (n, (_, at)) in self.children(i).enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    self.write_json(at, out);
                }
                out.push(b']');
            }
        }
    }
}

/// A JSON value read from a frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Object,
    Array,
}

impl Value<'_> {
    /// The JSON kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Object => "an object",
            Value::Array => "an array",
        }
    }
}

struct Children<'a> {
    frame: &'a Frame,
    at: u32,
    left: usize,
    object: bool,
}

impl<'a> Iterator for Children<'a> {
    type Item = (Option<&'a str>, u32);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut name = None;
        if self.object {
            if let Node::String(s) = self.frame.node(self.at) {
                name = Some(s);
            }
            self.at += 1;
        }
        let value = self.at;
        self.at += self.frame.span(value);
        Some((name, value))
    }
}

/// A dotted field path such as `device.id`, split once when a query is deployed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath(Vec<Box<str>>);

impl FieldPath {
    /// Splits `path` at dots; empty segments are an error.
    pub fn parse(path: &str) -> Result<Self, String> {
        let parts: Vec<Box<str>> = path.split('.').map(Box::from).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("field path {path:?} has an empty segment"));
        }
        Ok(FieldPath(parts))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// One event as a script sees it: a read-only JSON object inside a shared [`Frame`].
///
/// Registered in Rhai as the type `event`: `ev.price`, `ev["price"]`, `ev.device.id`; a missing
/// field reads as `()`.
#[derive(Clone)]
pub struct Event {
    frame: Arc<Frame>,
    node: u32,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut json = Vec::new();
        self.write_json(&mut json);
        f.write_str(&String::from_utf8_lossy(&json))
    }
}

impl Event {
    /// The field `name` as a Rhai value, `()` when missing.
    pub fn get(&self, name: &str) -> Dynamic {
        match self.frame.get(self.node, name) {
            Some(at) => self.frame.to_dynamic(at),
            None => Dynamic::UNIT,
        }
    }

    /// [`Event::get`] with a hint of where the field was last found (see [`Frame::get_hinted`]):
    /// for a read compiled once and run on every event.
    pub fn get_hinted(&self, name: &str, hint: &Cell<u32>) -> Dynamic {
        match self.frame.get_hinted(self.node, name, hint) {
            Some(at) => self.frame.to_dynamic(at),
            None => Dynamic::UNIT,
        }
    }

    /// [`Event::get_hinted`] for typed code: a number or a boolean as itself (`Ok`), any other
    /// value (`()` when missing) as the Rhai value `get_hinted` would give (`Err`).
    #[inline]
    pub fn get_hinted_scalar(&self, name: &str, hint: &Cell<u32>) -> Result<Value<'_>, Dynamic> {
        match self.frame.get_hinted_in_line(self.node, name, hint) {
            Some(at) => match self.frame.value(at) {
                v @ (Value::Int(_) | Value::Float(_) | Value::Bool(_)) => Ok(v),
                _ => Err(self.frame.to_dynamic(at)),
            },
            None => Err(Dynamic::UNIT),
        }
    }

    /// The value at `path`, borrowed.
    pub fn lookup(&self, path: &FieldPath) -> Option<Value<'_>> {
        self.frame
            .lookup(self.node, path)
            .map(|at| self.frame.value(at))
    }

    /// [`Event::lookup`] with a hint of where a one-field path was last found (see
    /// [`Frame::get_hinted`]): for a read made on every event of a stream, such as routing's.
    pub fn lookup_hinted(&self, path: &FieldPath, hint: &Cell<u32>) -> Option<Value<'_>> {
        match path.0.as_slice() {
            [field] => self
                .frame
                .get_hinted(self.node, field, hint)
                .map(|at| self.frame.value(at)),
            _ => self.lookup(path),
        }
    }

    /// [`Event::lookup_hinted`] in line, for routing.
    #[inline(always)]
    pub fn lookup_hinted_in_line(&self, path: &FieldPath, hint: &Cell<u32>) -> Option<Value<'_>> {
        match path.0.as_slice() {
            [field] => self
                .frame
                .get_hinted_in_line(self.node, field, hint)
                .map(|at| self.frame.value(at)),
            _ => self.lookup(path),
        }
    }

    /// Whether the object has the field `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.frame.get(self.node, name).is_some()
    }

    /// The field names, in input order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.frame
            .children(self.node)
            .map(|(name, _)| name.unwrap_or_default())
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        match self.frame.node(self.node) {
            Node::Object { len, .. } => len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The object as a Rhai map (nested objects become maps too).
    pub fn to_map(&self) -> rhai::Map {
        self.frame
            .children(self.node)
            .map(|(name, at)| {
                let value = match self.frame.value(at) {
                    Value::Object => Dynamic::from_map(
                        Event {
                            frame: Arc::clone(&self.frame),
                            node: at,
                        }
                        .to_map(),
                    ),
                    _ => self.frame.to_dynamic(at),
                };
                (name.unwrap_or_default().into(), value)
            })
            .collect()
    }

    /// Writes the event as compact JSON.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.frame.write_json(self.node, out);
    }
}

/// An event object is a feature vector for the learners (`model.learn(ev.features, ev.y)`),
/// read in place on the tape: numbers and booleans are features, anything else is an error that
/// names the field.
impl eddy_plugins::Features for Event {
    fn each(
        &self,
        ctx: &str,
        f: &mut dyn FnMut(&str, f64) -> Result<(), Box<rhai::EvalAltResult>>,
    ) -> Result<(), Box<rhai::EvalAltResult>> {
        for (name, at) in self.frame.children(self.node) {
            let name = name.unwrap_or_default();
            let x = match self.frame.value(at) {
                Value::Int(n) => n as f64,
                Value::Float(x) => x,
                Value::Bool(b) => f64::from(u8::from(b)),
                other => {
                    return Err(format!(
                        "{ctx}: feature `{name}` must be a number or a boolean, got {}",
                        other.kind()
                    )
                    .into())
                }
            };
            f(name, x)?;
        }
        Ok(())
    }
}

/// Inputs up to this size leave their scratch buffers to the parser for the next one.
const RETAINED_SCRATCH_BYTES: usize = 1 << 20;

/// The reason a document is not valid JSON. simd-json reads integers beyond 64 bits as floats
/// (as JSON allows); a number too large even for a float (`1e400`) is said to be so, rather than
/// reported by simd-json's internal name for it.
fn invalid_json(e: &simd_json::Error) -> String {
    match e.error() {
        simd_json::ErrorType::InvalidNumber | simd_json::ErrorType::InvalidExponent => format!(
            "invalid JSON: a number at character {} is not finite or not a number (JSON numbers \
             must fit a 64-bit float)",
            e.index()
        ),
        _ => format!("invalid JSON: {e}"),
    }
}

/// Parses inputs into frames, keeping simd-json's scratch buffers between calls.
pub struct Parser {
    buffers: Buffers,
    scratch: Tape<'static>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            buffers: Buffers::new(4096),
            scratch: Tape::null(),
        }
    }
}

/// What [`Parser::parse`] made of one input.
pub struct Parsed {
    pub frame: Arc<Frame>,
    pub rejections: Vec<Rejection>,
    /// Items seen in the input, events and rejected ones together.
    pub items: u32,
    /// The newlines in the input, when the parse counted them (NDJSON without blank lines):
    /// what a reader cutting a file into frames needs for the next frame's line numbers.
    pub newlines: Option<u32>,
}

/// How an input holds its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON document: an object or an array of objects.
    Document,
    /// One object per line; blank lines are ignored.
    Ndjson,
}

impl Format {
    /// Tells the format by the first non-blank line: if it holds a whole object (`{` … `}`) and
    /// more lines follow, the input is NDJSON; otherwise it is one JSON document.
    pub fn detect(input: &[u8]) -> Format {
        if is_ndjson(input) {
            Format::Ndjson
        } else {
            Format::Document
        }
    }
}

/// NDJSON parsed at once ([`Parser::parse_lines_at_once`]): the item count, the array's bytes
/// (which the tape borrows), and the input's newlines when the parse counted them.
struct Joined {
    items: u32,
    bytes: Vec<u8>,
    newlines: Option<u32>,
}

/// Appends `src` to `dst` with every newline made a comma, and returns how many there were:
/// one pass that copies and compares 16 bytes at a time (SSE2, which every x86-64 has; the
/// bytes after the last full 16, and other targets, one at a time).
fn push_newlines_as_commas(dst: &mut Vec<u8>, src: &[u8]) -> usize {
    dst.reserve(src.len());
    let start = dst.len();
    let out = &mut dst.spare_capacity_mut()[..src.len()];
    let mut count = 0;
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
            _mm_storeu_si128, _mm_xor_si128,
        };
        while i + 16 <= src.len() {
            // SAFETY: SSE2 is part of x86-64; the load reads `src[i..i + 16]` and the store
            // writes `out[i..i + 16]`, both in bounds (checked by the loop), unaligned.
            unsafe {
                let bytes = _mm_loadu_si128(src.as_ptr().add(i).cast());
                let newline = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(b'\n' as i8));
                let mask = _mm_movemask_epi8(newline);
                let bytes = if mask == 0 {
                    bytes
                } else {
                    count += mask.count_ones() as usize;
                    let flip = _mm_and_si128(newline, _mm_set1_epi8((b'\n' ^ b',') as i8));
                    _mm_xor_si128(bytes, flip)
                };
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), bytes);
            }
            i += 16;
        }
    }
    for (o, &b) in out[i..].iter_mut().zip(&src[i..]) {
        count += usize::from(b == b'\n');
        o.write(if b == b'\n' { b',' } else { b });
    }
    // SAFETY: every byte of `out`, the `src.len()` bytes after `start`, was written above.
    unsafe { dst.set_len(start + src.len()) };
    count
}

impl Parser {
    /// A parser whose scratch buffers start with room for inputs of `bytes` (up to
    /// [`RETAINED_SCRATCH_BYTES`]): for a run of many frames of about that size, so that none
    /// of them grows a buffer by copying it (simd-json's string buffer doubles whenever a frame
    /// is a little larger than any before).
    pub fn for_frames(bytes: usize) -> Self {
        Parser {
            buffers: Buffers::new(bytes.min(RETAINED_SCRATCH_BYTES)),
            scratch: Tape::null(),
        }
    }

    /// Parses one input: a JSON object, a JSON array of objects, or NDJSON (see
    /// [`Format::detect`]). NDJSON is parsed as if each line were parsed on its own (in one
    /// call when it can: `parse_lines_at_once`), so a broken line rejects that
    /// line alone.
    pub fn parse(&mut self, buf: Vec<u8>) -> Parsed {
        let format = Format::detect(&buf);
        let base = Position {
            index: 0,
            line: Some(0),
        };
        self.parse_with(buf, format, base)
    }

    /// [`Parser::parse_with`] of a copy of `input`: NDJSON parsed at once is copied into its
    /// array form only, not copied first as it is.
    pub fn parse_slice_with(&mut self, input: &[u8], format: Format, base: Position) -> Parsed {
        if format == Format::Ndjson {
            let mut frame = Frame::empty();
            if let Some(joined) = self.parse_lines_at_once(input, &mut frame) {
                let counted = (joined.items, joined.newlines);
                return self.finish(frame, joined.bytes, Vec::new(), counted, base);
            }
        }
        self.parse_with(input.to_vec(), format, base)
    }

    /// Parses one input of a known format, numbering its items from `base` (the index and line
    /// count of what came before it, for inputs cut into several frames).
    pub fn parse_with(&mut self, buf: Vec<u8>, format: Format, base: Position) -> Parsed {
        let mut buf = buf;
        let mut frame = Frame::empty();
        let mut rejections = Vec::new();
        let mut newlines = None;
        let items = match format {
            Format::Ndjson => match self.parse_lines_at_once(&buf, &mut frame) {
                Some(joined) => {
                    buf = joined.bytes;
                    newlines = joined.newlines;
                    joined.items
                }
                None => {
                    // SAFETY: as below.
                    let whole: &'static mut [u8] =
                        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
                    self.parse_lines(whole, &mut frame, &mut rejections)
                }
            },
            Format::Document => {
                // SAFETY: the slice borrows `buf`'s heap block, which is moved (not copied or
                // freed) into the returned `Frame` together with the tape that borrows it; see
                // `Frame::nodes`.
                let whole: &'static mut [u8] =
                    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
                self.parse_document(whole, &mut frame, &mut rejections)
            }
        };
        self.finish(frame, buf, rejections, (items, newlines), base)
    }

    /// The parsed frame given its bytes, its items numbered from `base`; the scratch buffers
    /// made ready for the next input.
    fn finish(
        &mut self,
        mut frame: Frame,
        buf: Vec<u8>,
        mut rejections: Vec<Rejection>,
        (items, newlines): (u32, Option<u32>),
        base: Position,
    ) -> Parsed {
        if base.index > 0 || base.line.is_some_and(|l| l > 0) {
            let shift = |p: &mut Position| {
                p.index += base.index;
                p.line = p.line.map(|l| l + base.line.unwrap_or(0));
            };
            frame.events.iter_mut().for_each(|(_, p)| shift(p));
            rejections.iter_mut().for_each(|r| shift(&mut r.position));
        }
        self.scratch.0.clear();
        // A large input leaves large scratch buffers: give them back rather than keep them for
        // the life of the connection.
        if buf.len() > RETAINED_SCRATCH_BYTES {
            self.scratch = Tape::null();
            self.buffers = Buffers::new(4096);
        }
        // A tape within its budget keeps its spare room: giving it back copies the whole tape
        // (simd-json reserves a node per structural character; trades have about one per 3.7
        // bytes, and fill about half of that).
        let node = std::mem::size_of::<Node<'static>>();
        if frame.nodes.capacity() * node > (buf.len() + 2) * MAX_TAPE_BYTES_PER_INPUT_BYTE {
            frame.nodes.shrink_to_fit();
        }
        frame._buf = buf;
        Parsed {
            frame: Arc::new(frame),
            rejections,
            items,
            newlines,
        }
    }

    fn parse_document(
        &mut self,
        doc: &'static mut [u8],
        frame: &mut Frame,
        rejections: &mut Vec<Rejection>,
    ) -> u32 {
        let position = Position {
            index: 0,
            line: None,
        };
        if doc.iter().all(u8::is_ascii_whitespace) {
            return 0;
        }
        if let Err(e) = simd_json::fill_tape(doc, &mut self.buffers, &mut self.scratch) {
            rejections.push(Rejection {
                position,
                kind: RejectKind::InvalidJson,
                reason: invalid_json(&e),
            });
            return 1;
        }
        std::mem::swap(&mut frame.nodes, &mut self.scratch.0);
        match frame.nodes.first() {
            Some(Node::Object { .. }) => {
                frame.events.push((0, position));
                1
            }
            Some(Node::Array { len, .. }) => {
                let len = *len;
                let elements: Vec<u32> = frame.children(0).map(|(_, at)| at).collect();
                for (index, at) in elements.into_iter().enumerate() {
                    let position = Position {
                        index: index as u32,
                        line: None,
                    };
                    match frame.value(at) {
                        Value::Object => frame.events.push((at, position)),
                        other => rejections.push(Rejection {
                            position,
                            kind: RejectKind::NotObject,
                            reason: format!("expected a JSON object, found {}", other.kind()),
                        }),
                    }
                }
                len as u32
            }
            _ => {
                let kind = frame.value(0).kind();
                rejections.push(Rejection {
                    position,
                    kind: RejectKind::NotObject,
                    reason: format!("expected a JSON object or array of objects, found {kind}"),
                });
                1
            }
        }
    }

    /// NDJSON parsed in one simd-json call rather than one per line: the lines are copied into
    /// one JSON array (`[` line `,` line … `]`, the newline after each line but the last made a
    /// comma) and parsed at once, which spares the per-call set-up and the partly filled 64-byte
    /// blocks of the per-line parse. Returns the item count and the array's bytes (which the
    /// tape borrows), or `None` when the input must be parsed line by line: a line that does
    /// not start with `{"` (a non-object, an empty object, a space after the brace), a broken
    /// line (the array does not parse), or an array whose elements are not the lines.
    ///
    /// Input without blank lines (the usual) takes [`Parser::parse_dense_lines`], which finds
    /// no line in advance; input with blank lines, [`Parser::parse_spaced_lines`].
    fn parse_lines_at_once(&mut self, input: &[u8], frame: &mut Frame) -> Option<Joined> {
        let end = input.iter().rposition(|b| !b.is_ascii_whitespace())? + 1;
        if let Some(parsed) = self.parse_dense_lines(input, end, frame) {
            return Some(parsed);
        }
        // (Only a blank line makes the dense form fail where the spaced one does not.)
        let blank = input[..end]
            .split(|&b| b == b'\n')
            .any(|line| line.iter().all(u8::is_ascii_whitespace));
        if blank {
            self.parse_spaced_lines(input, frame)
        } else {
            None
        }
    }

    /// [`Parser::parse_lines_at_once`] of `input[..end]` (`end` is after its last non-space
    /// byte) when no line is blank: every newline is made a comma in one pass over the bytes,
    /// with no search for each line. Blank lines make empty elements, which do not parse.
    ///
    /// Each element is tied to its line after the parse: the array must have one element more
    /// than there are newlines, each an object whose first field name starts two bytes after
    /// its `{`, and each element but the first must follow (over spaces) a comma that was a
    /// newline. Then the newlines are all the array's separators (a newline inside a string,
    /// or a comma between two values on one line, leaves an element without one), so element
    /// `i` is line `i`, alone, and parses exactly as it would alone.
    fn parse_dense_lines(&mut self, input: &[u8], end: usize, frame: &mut Frame) -> Option<Joined> {
        let len = end + 2;
        let mut joined = Vec::with_capacity(len + simd_json::INPUT_PADDING);
        joined.push(b'[');
        let newlines = push_newlines_as_commas(&mut joined, &input[..end]);
        joined.push(b']');
        joined.resize(len + simd_json::INPUT_PADDING, b' ');
        let lines = newlines + 1;
        let items = self.parse_joined(&mut joined, len, lines, frame, |index, name_at| {
            // Where the element's `{` is in `input` (`joined` has the `[` before it).
            let brace = name_at.wrapping_sub(3);
            if brace >= end || input[brace] != b'{' {
                return None;
            }
            if index > 0 {
                let before = input[..brace]
                    .iter()
                    .rposition(|&b| !matches!(b, b' ' | b'\t' | b'\r'));
                if before.is_none_or(|k| input[k] != b'\n') {
                    return None;
                }
            }
            Some(index + 1)
        })?;
        let trailing = input[end..].iter().filter(|&&b| b == b'\n').count();
        Some(Joined {
            items,
            bytes: joined,
            newlines: Some((newlines + trailing) as u32),
        })
    }

    /// [`Parser::parse_lines_at_once`] of input with blank lines: each line is found first.
    ///
    /// Each element is tied to its line: the first field name of element `i` must start two
    /// bytes after the start of line `i` (simd-json's strings point into the input), so element
    /// `i` starts where line `i` starts; it is followed by only whitespace and the comma put
    /// after line `i`, so it ends where line `i` ends. Each line is then one JSON value, parsed
    /// exactly as it would be alone.
    fn parse_spaced_lines(&mut self, input: &[u8], frame: &mut Frame) -> Option<Joined> {
        // (offset of the line's `{` in the array, its line number); where each line's newline is.
        let mut lines: Vec<(usize, u32)> = Vec::with_capacity(input.len() / 64 + 1);
        let mut newlines: Vec<usize> = Vec::with_capacity(input.len() / 64 + 1);
        let mut start = 0;
        let mut line_no = 0;
        while start < input.len() {
            let end = memchr::memchr(b'\n', &input[start..]).map(|e| start + e);
            let line = &input[start..end.unwrap_or(input.len())];
            line_no += 1;
            let lead = line.iter().position(|b| !b.is_ascii_whitespace());
            if let Some(lead) = lead {
                if line.len() < lead + 2 || line[lead] != b'{' || line[lead + 1] != b'"' {
                    return None;
                }
                lines.push((1 + start + lead, line_no));
                newlines.push(end.map_or(usize::MAX, |e| 1 + e));
            }
            start = end.map_or(input.len(), |e| e + 1);
        }
        if lines.is_empty() {
            return None;
        }
        let len = input.len() + 2;
        let mut joined = Vec::with_capacity(len + simd_json::INPUT_PADDING);
        joined.push(b'[');
        joined.extend_from_slice(input);
        joined.push(b']');
        joined.resize(len + simd_json::INPUT_PADDING, b' ');
        for &at in &newlines[..newlines.len() - 1] {
            joined[at] = b',';
        }
        let items = self.parse_joined(&mut joined, len, lines.len(), frame, |index, name_at| {
            let (line_start, line) = lines[index as usize];
            (name_at == line_start + 2).then_some(line)
        })?;
        Some(Joined {
            items,
            bytes: joined,
            newlines: None,
        })
    }

    /// Parses `joined` (`[`, the lines, `]`: `len` bytes, then simd-json's padding) onto the
    /// frame's tape, and ties its elements to the input's lines: `line_of(i, name_at)` is the
    /// line of element `i`, whose first field name starts at `name_at` in `joined` (simd-json's
    /// strings point into its input), or `None` when element `i` is not line `i` alone. Returns
    /// the item count, or `None`, with the frame left empty, when the array does not parse, has
    /// other than `lines` elements, or has one that is not an object with a field or not tied.
    fn parse_joined(
        &mut self,
        joined: &mut Vec<u8>,
        len: usize,
        lines: usize,
        frame: &mut Frame,
        mut line_of: impl FnMut(u32, usize) -> Option<u32>,
    ) -> Option<u32> {
        // SAFETY: as in `parse_with`: the tape borrows `joined`'s heap block, which is not
        // resized from here on and is moved into the frame with the tape by the caller.
        let bytes: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(joined.as_mut_ptr(), joined.len()) };
        let base = bytes.as_ptr() as usize;
        // No room reserved here: simd-json reserves a node per structural character (an upper
        // bound) once stage 1 has counted them, and growing a reserved tape copies it whole.
        let mut tape = Tape(std::mem::take(&mut frame.nodes));
        if simd_json::fill_tape_padded(bytes, len, &mut self.buffers, &mut tape).is_err() {
            tape.0.clear();
            frame.nodes = tape.0;
            return None;
        }
        let nodes = tape.0;
        let ok = matches!(nodes.first(), Some(Node::Array { len, .. }) if *len == lines);
        let mut events = Vec::with_capacity(lines);
        let mut at = 1usize;
        if ok {
            for index in 0..lines as u32 {
                let name_at = match (nodes.get(at), nodes.get(at + 1)) {
                    (Some(Node::Object { .. }), Some(Node::String(name))) => {
                        (name.as_ptr() as usize).wrapping_sub(base)
                    }
                    _ => break,
                };
                let Some(line) = line_of(index, name_at) else {
                    break;
                };
                events.push((
                    at as u32,
                    Position {
                        index,
                        line: Some(line),
                    },
                ));
                let Node::Object { count, .. } = nodes[at] else {
                    unreachable!("checked")
                };
                at += count + 1;
            }
        }
        frame.nodes = nodes;
        if events.len() != lines {
            frame.nodes.clear();
            return None;
        }
        frame.events = events;
        Some(lines as u32)
    }

    fn parse_lines(
        &mut self,
        mut rest: &'static mut [u8],
        frame: &mut Frame,
        rejections: &mut Vec<Rejection>,
    ) -> u32 {
        let mut index = 0;
        let mut line_no = 0;
        // Room for the tape of the whole input at once, rather than regrowing it (and copying
        // it) many times: about one node per 6 bytes of JSON (small flat events such as
        // trades take one per 7.5; one per 8 made such inputs regrow once, copying the whole
        // tape); `parse_with` gives back what is left over.
        frame.nodes.reserve(rest.len() / 6);
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest);
            let (line, tail) = rest.split_at_mut(end.map_or(rest.len(), |e| e + 1));
            rest = tail;
            line_no += 1;
            let line = trim_ascii_mut(line);
            if line.is_empty() {
                continue;
            }
            let position = Position {
                index,
                line: Some(line_no),
            };
            index += 1;
            if let Err(e) = simd_json::fill_tape(line, &mut self.buffers, &mut self.scratch) {
                rejections.push(Rejection {
                    position,
                    kind: RejectKind::InvalidJson,
                    reason: invalid_json(&e),
                });
                continue;
            }
            match self.scratch.0.first() {
                Some(Node::Object { .. }) => {
                    frame.events.push((frame.nodes.len() as u32, position));
                    frame.nodes.extend_from_slice(&self.scratch.0);
                }
                _ => {
                    let kind = match self.scratch.0.first() {
                        Some(Node::Array { .. }) => "an array",
                        Some(Node::String(_)) => "a string",
                        _ => "a scalar",
                    };
                    rejections.push(Rejection {
                        position,
                        kind: RejectKind::NotObject,
                        reason: format!("expected a JSON object, found {kind}"),
                    });
                }
            }
        }
        index
    }
}

/// Whether `input` is NDJSON: a first non-blank line that is a whole object, and more after it.
fn is_ndjson(input: &[u8]) -> bool {
    let start = input
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(input.len());
    let input = &input[start..];
    let Some(end) = input.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let first = input[..end].trim_ascii();
    let more = input[end..].iter().any(|b| !b.is_ascii_whitespace());
    more && first.first() == Some(&b'{') && first.last() == Some(&b'}')
}

fn trim_ascii_mut(s: &mut [u8]) -> &mut [u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &mut s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &str) -> Parsed {
        Parser::default().parse(input.as_bytes().to_vec())
    }

    fn json(ev: &Event) -> String {
        let mut out = Vec::new();
        ev.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn short_name_comparison_is_string_equality() {
        // Every pair of names from 0 to 20 bytes that differ in one byte at any place, or in
        // length, or not at all: `same_name` must say what `==` says.
        let base = "abcdefghijklmnopqrstu";
        for n in 0..=20 {
            let a = &base[..n];
            assert!(same_name(a, a), "{a:?}");
            for m in 0..=20 {
                assert_eq!(same_name(a, &base[..m]), n == m, "{a:?} {m}");
            }
            for at in 0..n {
                let mut b = a.as_bytes().to_vec();
                b[at] = b'_';
                let b = String::from_utf8(b).unwrap();
                assert!(!same_name(a, &b), "{a:?} {b:?}");
                assert!(!same_name(&b, a), "{b:?} {a:?}");
            }
        }
        assert!(same_name("é", "é"));
        assert!(!same_name("é", "è"));
    }

    #[test]
    fn one_object() {
        let p = parse(r#"{"symbol":"AAPL","price":1.5,"size":100}"#);
        assert_eq!(p.frame.len(), 1);
        assert!(p.rejections.is_empty());
        let ev = p.frame.event(0);
        assert_eq!(ev.get("price").as_float().unwrap(), 1.5);
        assert_eq!(ev.get("size").as_int().unwrap(), 100);
        assert_eq!(ev.get("symbol").into_string().unwrap(), "AAPL");
        assert!(ev.get("missing").is_unit());
    }

    #[test]
    fn integers_beyond_64_bits_are_floats_and_infinite_numbers_say_so() {
        let p = parse("{\"a\":123456789012345678901234567890}\n{\"a\":-99999999999999999999}\n{\"a\":1e400}\n");
        assert_eq!(p.frame.len(), 2, "{:?}", p.rejections);
        let a = p.frame.event(0).get("a").as_float().unwrap();
        assert!((a - 1.2345678901234568e29).abs() < 1e15, "{a}");
        assert_eq!(p.frame.event(1).get("a").as_float().unwrap(), -1e20);
        assert_eq!(p.rejections.len(), 1);
        let reason = &p.rejections[0].reason;
        assert!(
            reason.contains("not finite") && !reason.contains("InternalError"),
            "{reason}"
        );
    }

    #[test]
    fn a_parser_sized_for_frames_parses_as_the_default_one() {
        let ndjson = "{\"a\":1}\n{\"b\":\"x\"}\nnot json\n[1]\n{\"c\":[1,{\"d\":2.5}]}\n";
        let base = Position {
            index: 3,
            line: Some(7),
        };
        for input in [
            ndjson.to_string(),
            ndjson.repeat(5000),
            "[{\"a\":1},2]".into(),
        ] {
            let format = Format::detect(input.as_bytes());
            let mut sized = Parser::for_frames(1 << 16);
            let mut plain = Parser::default();
            for _ in 0..2 {
                let a = sized.parse_slice_with(input.as_bytes(), format, base);
                let b = plain.parse_slice_with(input.as_bytes(), format, base);
                assert_eq!(a.items, b.items);
                assert_eq!(a.rejections.len(), b.rejections.len());
                assert_eq!(a.frame.len(), b.frame.len());
                for i in 0..a.frame.len() {
                    assert_eq!(json(&a.frame.event(i)), json(&b.frame.event(i)));
                    assert_eq!(a.frame.position(i), b.frame.position(i));
                }
            }
        }
    }

    #[test]
    fn a_large_input_does_not_leave_its_scratch_buffers_behind() {
        let mut parser = Parser::default();
        let big = format!("[{}1]", "1,".repeat(1 << 20)).into_bytes();
        let (input, capacity) = (big.len(), big.capacity());
        let parsed = parser.parse(big);
        assert!(parsed.frame.bytes() > 1 << 20);
        assert!(
            parsed.frame.bytes() <= capacity + (input + 2) * MAX_TAPE_BYTES_PER_INPUT_BYTE,
            "{} bytes for {input}: {} per node",
            parsed.frame.bytes(),
            std::mem::size_of::<Node<'static>>()
        );
        assert!(parser.scratch.0.capacity() < 16);
    }

    #[test]
    fn pretty_printed_object_is_one_document() {
        let p = parse("{\n  \"a\": 1,\n  \"b\": {\"c\": [1, 2]}\n}\n");
        assert_eq!(p.frame.len(), 1);
        assert!(p.rejections.is_empty());
        assert_eq!(json(&p.frame.event(0)), r#"{"a":1,"b":{"c":[1,2]}}"#);
    }

    #[test]
    fn array_with_a_non_object_is_rejected_by_index() {
        let p = parse(r#"[{"a":1}, 5, {"a":2}, "x"]"#);
        assert_eq!(p.frame.len(), 2);
        assert_eq!(p.items, 4);
        assert_eq!(p.rejections.len(), 2);
        assert_eq!(p.rejections[0].position.index, 1);
        assert!(p.rejections[0].reason.contains("an integer"));
        assert_eq!(p.rejections[1].position.index, 3);
        assert_eq!(p.frame.event(1).get("a").as_int().unwrap(), 2);
    }

    #[test]
    fn ndjson_broken_line_loses_only_that_line() {
        let p = parse("{\"a\":1}\n\n{\"a\":\n{\"a\":3}\n[1]\n");
        assert_eq!(p.frame.len(), 2);
        assert_eq!(p.items, 4);
        let lines: Vec<_> = p.rejections.iter().map(|r| r.position.line).collect();
        assert_eq!(lines, vec![Some(3), Some(5)]);
        assert!(p.rejections[0].reason.starts_with("invalid JSON"));
        assert_eq!(p.frame.event(1).get("a").as_int().unwrap(), 3);
        assert_eq!(p.frame.position(1).line, Some(4));
    }

    /// NDJSON parsed as one array must give what parsing each line alone gives: the same
    /// events with the same positions, and the same rejections. The inputs include lines the
    /// array would cut differently (`{"a":1},{"b":"}` then `{"}` is two objects as an array,
    /// two broken lines alone), blank lines, `\r\n`, spaces, escapes, nested values and
    /// non-objects.
    #[test]
    fn ndjson_at_once_is_ndjson_line_by_line() {
        type Outcome = (Vec<(String, Position)>, Vec<(Position, String)>);
        fn by_line(input: &str) -> Outcome {
            let (mut events, mut rejections) = (Vec::new(), Vec::new());
            let mut index = 0;
            for (n, line) in input.split('\n').enumerate() {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                let position = Position {
                    index,
                    line: Some(n as u32 + 1),
                };
                index += 1;
                let p = Parser::default().parse(line.trim_ascii().as_bytes().to_vec());
                match (p.frame.len(), p.rejections.first()) {
                    (1, None) => events.push((json(&p.frame.event(0)), position)),
                    (_, Some(r)) if r.reason.starts_with("invalid JSON") => {
                        rejections.push((position, "invalid JSON".to_owned()))
                    }
                    _ => rejections.push((position, "not an object".to_owned())),
                }
            }
            (events, rejections)
        }
        let inputs = [
            "{\"a\":1}\n{\"a\":2}\n",
            "{\"a\":1}\n{\"a\":2}",
            "\n\n  {\"a\":1}  \r\n\r\n\t{\"b\":[1,{\"c\":\"x\"}],\"d\":{}}\n\n",
            "{\"a\":1},{\"b\":\"}\n{\"}\n",
            "{\"a\":1},{\"b\":2}\n{\"x\":[{}\n{}]}\n",
            "{\"a\":[1\n{\"b\":2}]}\n{\"c\":3}\n",
            "{\"\\u0061\":\"\\n\\\"\",\"b\":\"é\"}\n{\"a\":1}\n",
            "{\"a\":1}\n{}\n{\"a\":2}\n",
            "{\"a\":1}\n[1]\n{\"a\":2}\n",
            "{\"a\":1}\n{ \"a\":2}\n",
            "{\"a\":1}\n{\"a\":\n{\"a\":3}\n",
            "{\"a\":1} {\"a\":2}\n{\"a\":3}\n",
            "{\"a\":1}\n{\"a\":2}\n{\"a\":1e400}\n",
            "{\"a\":1}\u{c}\n{\"a\":2}\n",
        ];
        for input in inputs {
            let start = Position {
                index: 0,
                line: Some(0),
            };
            let p = Parser::default().parse_with(input.as_bytes().to_vec(), Format::Ndjson, start);
            let events: Vec<(String, Position)> = (0..p.frame.len())
                .map(|i| (json(&p.frame.event(i)), p.frame.position(i)))
                .collect();
            let rejections: Vec<(Position, String)> = p
                .rejections
                .iter()
                .map(|r| {
                    let what = if r.reason.starts_with("invalid JSON") {
                        "invalid JSON"
                    } else {
                        "not an object"
                    };
                    (r.position, what.to_owned())
                })
                .collect();
            assert_eq!((events, rejections), by_line(input), "{input:?}");
        }
    }

    /// The whole-frame parse is taken for plain NDJSON (not only the line-by-line fallback),
    /// and its strings point into the frame.
    #[test]
    fn plain_ndjson_is_parsed_at_once() {
        let mut parser = Parser::default();
        let mut frame = Frame::empty();
        let input = b"{\"s\":\"x\",\"p\":1.5}\n\n{\"s\":\"y\",\"p\":2}\n";
        let joined = parser.parse_lines_at_once(input, &mut frame).unwrap();
        assert_eq!((joined.items, frame.events.len()), (2, 2));
        assert_eq!(frame.events[1].1.line, Some(3));
        assert!(joined.bytes.starts_with(b"[{\"s\":\"x\",\"p\":1.5},\n{"));
        assert_eq!(
            joined.newlines, None,
            "a blank line: its newlines are not counted"
        );
        let broken = b"{\"a\":1}\n{\"a\":\n";
        assert!(parser.parse_lines_at_once(broken, &mut frame).is_none());
        // Two objects as an array, two broken lines alone.
        let cut = b"{\"a\":1},{\"b\":\"}\n{\"}\n";
        assert!(parser.parse_lines_at_once(cut, &mut frame).is_none());
    }

    /// Input without blank lines takes the dense form: every newline a comma, found in one pass
    /// (checked here against a plain byte-by-byte copy, across the 16-byte steps), each element
    /// tied to its line; what is not one object per line is left to the line-by-line parse.
    #[test]
    fn dense_ndjson_is_parsed_at_once_and_tied_to_its_lines() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..100 {
            let src: Vec<u8> = (0..len)
                .map(|_| *rng.choice(b"\n,{}a \r".iter()).unwrap())
                .collect();
            let mut dst = b"[".to_vec();
            let count = push_newlines_as_commas(&mut dst, &src);
            let plain: Vec<u8> = src
                .iter()
                .map(|&b| if b == b'\n' { b',' } else { b })
                .collect();
            assert_eq!(dst[1..], plain[..], "{src:?}");
            assert_eq!(count, src.iter().filter(|&&b| b == b'\n').count());
        }
        let mut parser = Parser::default();
        let mut frame = Frame::empty();
        // Leading spaces, a CRLF line, a long line, and trailing blank lines.
        let long = format!("{{\"s\":\"{}\"}}", "z".repeat(100));
        let input = format!("{{\"s\":\"x\"}}\r\n  {{\"s\":\"y\",\"p\":2}}\n{long}\n\n \n");
        let joined = parser
            .parse_lines_at_once(input.as_bytes(), &mut frame)
            .unwrap();
        // The newlines counted, the trailing ones too (for the next frame's line numbers): the
        // CRLF, the three after the lines and the one after the spaces.
        assert_eq!((joined.items, joined.newlines), (3, Some(5)));
        assert!(joined.bytes.starts_with(b"[{\"s\":\"x\"}\r,  {\"s\":\"y\""));
        let lines: Vec<_> = frame.events.iter().map(|e| e.1.line).collect();
        assert_eq!(lines, [Some(1), Some(2), Some(3)]);
        for (i, want) in ["x", "y", &"z".repeat(100)].into_iter().enumerate() {
            let at = frame.events[i].0 as usize;
            assert!(matches!(frame.nodes[at + 2], Node::String(s) if s == want));
        }
        // The count reaches the caller of a parse.
        let start = Position {
            index: 0,
            line: Some(0),
        };
        let parsed = parser.parse_slice_with(input.as_bytes(), Format::Ndjson, start);
        assert_eq!((parsed.items, parsed.newlines), (3, Some(5)));
        let spaced = parser.parse_slice_with(b"{\"a\":1}\n\n{\"a\":2}\n", Format::Ndjson, start);
        assert_eq!((spaced.items, spaced.newlines), (2, None));
        for lines in [
            // Two values on one line, a broken line.
            "{\"a\":1},{\"b\":2}\n{\"c\":\n",
            // The same count of values as of lines, one line holding two, one none whole: a
            // newline inside a string (which the commas would make parse) and a comma.
            "{\"a\":\"x\n\",\"b\":1},{\"c\":2}\n",
            // Not objects, or not starting with `{"`.
            "[1]\n{\"a\":1}\n",
            "{\"a\":1}\n{ \"a\":1}\n",
            "{}\n{\"a\":1}\n",
        ] {
            assert!(
                parser
                    .parse_lines_at_once(lines.as_bytes(), &mut frame)
                    .is_none(),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn fields_after_nested_values_are_found() {
        let p = parse(r#"{"a":{"b":{"c":1},"d":[1,[2,3]]},"e":[{"f":1}],"g":7}"#);
        assert_eq!(p.frame.event(0).get("g").as_int().unwrap(), 7);
        let path = FieldPath::parse("a.d").unwrap();
        assert_eq!(p.frame.event(0).lookup(&path), Some(Value::Array));
    }

    #[test]
    fn nested_fields_escapes_and_arrays() {
        let p = parse(r#"{"device":{"id":"d-1","loc":{"x":2}},"tags":["a","b\"c"],"n":null}"#);
        let ev = p.frame.event(0);
        let path = FieldPath::parse("device.loc.x").unwrap();
        assert_eq!(ev.lookup(&path), Some(Value::Int(2)));
        let tags = ev.get("tags").into_array().unwrap();
        assert_eq!(tags[1].clone().into_string().unwrap(), "b\"c");
        assert!(ev.get("n").is_unit());
        assert_eq!(
            json(&ev),
            r#"{"device":{"id":"d-1","loc":{"x":2}},"tags":["a","b\"c"],"n":null}"#
        );
        let keys: Vec<_> = ev.keys().collect();
        assert_eq!(keys, vec!["device", "tags", "n"]);
    }

    #[test]
    fn garbage_and_scalars_are_rejected() {
        assert_eq!(parse("not json").rejections.len(), 1);
        assert!(parse("42").rejections[0].reason.contains("an integer"));
        let empty = parse("  \n ");
        assert_eq!((empty.frame.len(), empty.items), (0, 0));
    }

    #[test]
    fn big_unsigned_becomes_float() {
        let p = parse(r#"{"n":18446744073709551615}"#);
        assert!(p.frame.event(0).get("n").is_float());
    }
}
