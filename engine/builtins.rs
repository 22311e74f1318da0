//! The built-in functions a query calls into its shard: `emit`, `emit_to`, `key`, `now`,
//! `watermark`, `set_timer`, `forget`.
//!
//! Rhai functions are closures registered on the engine, which lives on one shard thread; they
//! reach the call in progress through a [`CallCtx`] shared with the shard (`Rc<RefCell<_>>`,
//! same thread, never locked). The shard fills the context before each call of `init`,
//! `on_event` or `on_timer` and reads back what the call asked for: emitted items (already
//! encoded as JSON), timers to set and whether to forget the key. Outside a call the built-ins
//! fail with a clear message, which is what a query's top-level statements see.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, INT};

use crate::key::Key;
use crate::query::valid_name;
use crate::sandbox::Limits;

/// A topic name, shared by every item emitted to it.
pub type Topic = Arc<str>;

/// One item a query emitted: its topic, the key whose state emitted it, and the value as JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emitted {
    pub topic: Topic,
    pub key: Key,
    pub value: Vec<u8>,
}

impl Emitted {
    /// The item as one JSON line: `{"topic":T,"key":K,"value":V}`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"topic\":");
        crate::json::write_str(out, &self.topic);
        out.extend_from_slice(b",\"key\":");
        self.key.write_json(out);
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(&self.value);
        out.extend_from_slice(b"}\n");
    }
}

/// Writes items as JSON lines, exactly as [`Emitted::write_line`] does, keeping the line's
/// start (`{"topic":T,"key":`) for the topic of the last item: the topic is the same from one
/// item to the next as a rule, and writing it again (an escape check and small copies) cost
/// more than the rest of the line but the value.
#[derive(Default)]
pub struct LineWriter {
    /// The topic `prefix` was made for (held, so that its address is not reused meanwhile).
    topic: Option<Topic>,
    prefix: Vec<u8>,
}

impl LineWriter {
    pub fn write(&mut self, item: &Emitted, out: &mut Vec<u8>) {
        if !self
            .topic
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &item.topic))
        {
            self.prefix.clear();
            self.prefix.extend_from_slice(b"{\"topic\":");
            crate::json::write_str(&mut self.prefix, &item.topic);
            self.prefix.extend_from_slice(b",\"key\":");
            self.topic = Some(Arc::clone(&item.topic));
        }
        out.extend_from_slice(&self.prefix);
        item.key.write_json(out);
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(&item.value);
        out.extend_from_slice(b"}\n");
    }
}

/// The topics of one query: `<query>`, `<query>.errors`, `<query>.late`, and the named ones
/// (`<query>.<name>`) made the first time a script emits to them.
#[derive(Debug)]
pub struct QueryTopics {
    pub main: Topic,
    pub errors: Topic,
    pub late: Topic,
    named: RefCell<HashMap<Box<str>, Topic>>,
}

/// Sub-topic names the engine itself publishes on.
pub const RESERVED_TOPICS: [&str; 2] = ["errors", "late"];

impl QueryTopics {
    pub fn new(query: &str) -> Self {
        QueryTopics {
            main: query.into(),
            errors: format!("{query}.errors").into(),
            late: format!("{query}.late").into(),
            named: RefCell::new(HashMap::new()),
        }
    }

    /// The topic `<query>.<name>`, made on first use, at most `limit` of them.
    fn named(&self, name: &str, limit: usize) -> Result<Topic, String> {
        if let Some(topic) = self.named.borrow().get(name) {
            return Ok(Arc::clone(topic));
        }
        if !valid_name(name) {
            return Err(format!(
                "topic name {name:?} is not valid: use letters, digits, '_' and '-'"
            ));
        }
        if RESERVED_TOPICS.contains(&name) {
            return Err(format!("topic name {name:?} is reserved for the engine"));
        }
        let mut named = self.named.borrow_mut();
        if named.len() >= limit {
            return Err(format!(
                "a query may emit to at most {limit} named topics (max_topics_per_query)"
            ));
        }
        let topic: Topic = format!("{}.{name}", self.main).into();
        named.insert(name.into(), Arc::clone(&topic));
        Ok(topic)
    }
}

/// What the built-ins see of the call in progress, and what they leave for the shard.
pub(crate) struct CallCtx {
    /// Set while a script function runs; the built-ins refuse to work otherwise.
    pub active: bool,
    pub topics: Option<Rc<QueryTopics>>,
    pub key: Key,
    pub now: i64,
    pub watermark: i64,
    pub has_on_timer: bool,
    /// Timers the call asked for.
    pub timers: Vec<i64>,
    /// Whether the call asked to drop the key's state.
    pub forget: bool,
    /// Items emitted, by this call and earlier ones the shard has not taken yet.
    pub out: Vec<Emitted>,
    /// Length of `out` when the call in progress began: what it emitted starts there.
    pub emit_mark: usize,
    pub max_emit_bytes: usize,
    pub max_topics: usize,
    /// Buffers of items already written out, for the next items' values ([`CallCtx::recycle`]).
    spare: Vec<Vec<u8>>,
}

/// Buffers kept for items' values, at most: a drain's worth for the common case of one item an
/// event, and no more than a few hundred KiB held.
const SPARE_BUFFERS: usize = 1024;
/// A value buffer larger than this is freed, not kept.
const SPARE_BYTES: usize = 1024;

impl CallCtx {
    pub fn new(limits: &Limits) -> Self {
        CallCtx {
            active: false,
            topics: None,
            key: Key::None,
            now: 0,
            watermark: i64::MIN,
            has_on_timer: false,
            timers: Vec::new(),
            forget: false,
            out: Vec::new(),
            emit_mark: 0,
            max_emit_bytes: limits.max_emit_bytes,
            max_topics: limits.max_topics_per_query,
            spare: Vec::new(),
        }
    }

    /// A buffer for an item's value: one given back by [`CallCtx::recycle`], else a new one.
    fn value_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_else(|| Vec::with_capacity(128))
    }

    /// Takes back the value buffers of items written out (`eddy run`'s lines, the hub's
    /// batches), emptied, for the next items: an allocation and a free less per item.
    pub fn recycle(&mut self, values: impl Iterator<Item = Vec<u8>>) {
        for mut value in values {
            if self.spare.len() >= SPARE_BUFFERS {
                return;
            }
            if value.capacity() <= SPARE_BYTES {
                value.clear();
                self.spare.push(value);
            }
        }
    }

    pub(crate) fn check_active(&self, what: &str) -> Result<(), Box<EvalAltResult>> {
        if self.active {
            Ok(())
        } else {
            Err(format!(
                "`{what}` can only be called from init, on_event or on_timer, not at the top level"
            )
            .into())
        }
    }

    /// Encodes `value` and queues it on `topic` under `key` (the current key when `None`).
    pub(crate) fn publish(
        &mut self,
        topic: Topic,
        key: Option<Key>,
        value: &Dynamic,
    ) -> Result<(), Box<EvalAltResult>> {
        let mut json = self.value_buffer();
        crate::json::write_dynamic(&mut json, value, self.max_emit_bytes)
            .map_err(|e| format!("cannot emit: {e}"))?;
        self.out.push(Emitted {
            topic,
            key: key.unwrap_or_else(|| self.key.clone()),
            value: json,
        });
        Ok(())
    }

    /// Queues `value`, written by `encode`, on the main topic under the current key (the same
    /// item and the same error as [`CallCtx::publish`] of the value it encodes).
    pub(crate) fn publish_with(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>, usize) -> Result<(), crate::json::EncodeError>,
    ) -> Result<(), Box<EvalAltResult>> {
        let mut json = self.value_buffer();
        encode(&mut json, self.max_emit_bytes).map_err(|e| format!("cannot emit: {e}"))?;
        let topic = self.main_topic();
        self.out.push(Emitted {
            topic,
            key: self.key.clone(),
            value: json,
        });
        Ok(())
    }

    pub(crate) fn main_topic(&self) -> Topic {
        Arc::clone(&self.topics.as_ref().expect("active call has topics").main)
    }

    pub(crate) fn named_topic(&self, name: &str) -> Result<Topic, Box<EvalAltResult>> {
        let topics = self.topics.as_ref().expect("active call has topics");
        Ok(topics.named(name, self.max_topics)?)
    }
}

/// The key `emit_to` publishes under: what a `key_by` field may hold, nothing else.
fn explicit_key(key: &Dynamic) -> Result<Key, Box<EvalAltResult>> {
    Key::from_dynamic(key).map_err(|why| format!("`emit_to`: the key {why}").into())
}

type Ctx = Rc<RefCell<CallCtx>>;

/// Registers the built-ins on `engine`, bound to `ctx`.
pub(crate) fn register(engine: &mut Engine, ctx: &Ctx) {
    let c = Rc::clone(ctx);
    engine.register_fn(
        "emit",
        move |value: Dynamic| -> Result<(), Box<EvalAltResult>> {
            let mut ctx = c.borrow_mut();
            ctx.check_active("emit")?;
            let topic = ctx.main_topic();
            ctx.publish(topic, None, &value)
        },
    );
    let c = Rc::clone(ctx);
    engine.register_fn(
        "emit",
        move |name: &str, value: Dynamic| -> Result<(), Box<EvalAltResult>> {
            emit_named(&mut c.borrow_mut(), name, &value)
        },
    );
    let c = Rc::clone(ctx);
    engine.register_fn(
        "emit_to",
        move |key: Dynamic, value: Dynamic| -> Result<(), Box<EvalAltResult>> {
            emit_to(&mut c.borrow_mut(), None, &key, &value)
        },
    );
    let c = Rc::clone(ctx);
    engine.register_fn(
        "emit_to",
        move |name: &str, key: Dynamic, value: Dynamic| -> Result<(), Box<EvalAltResult>> {
            emit_to(&mut c.borrow_mut(), Some(name), &key, &value)
        },
    );
    let c = Rc::clone(ctx);
    engine.register_fn("key", move || -> Result<Dynamic, Box<EvalAltResult>> {
        let ctx = c.borrow();
        ctx.check_active("key")?;
        Ok(ctx.key.to_dynamic())
    });
    let c = Rc::clone(ctx);
    engine.register_fn("now", move || -> Result<INT, Box<EvalAltResult>> {
        let ctx = c.borrow();
        ctx.check_active("now")?;
        Ok(ctx.now)
    });
    let c = Rc::clone(ctx);
    engine.register_fn("watermark", move || -> Result<INT, Box<EvalAltResult>> {
        let ctx = c.borrow();
        ctx.check_active("watermark")?;
        Ok(ctx.watermark)
    });
    let c = Rc::clone(ctx);
    engine.register_fn(
        "set_timer",
        move |t: Dynamic| -> Result<(), Box<EvalAltResult>> { set_timer(&mut c.borrow_mut(), &t) },
    );
    let c = Rc::clone(ctx);
    engine.register_fn("forget", move || -> Result<(), Box<EvalAltResult>> {
        forget(&mut c.borrow_mut())
    });
}

// The built-ins that take arguments, shared by the interpreter's registered functions and the
// compiled code (which calls them straight, see `compiled.rs`).

/// `emit(name, value)`: an item on the topic `<query>.<name>`.
pub(crate) fn emit_named(
    ctx: &mut CallCtx,
    name: &str,
    value: &Dynamic,
) -> Result<(), Box<EvalAltResult>> {
    ctx.check_active("emit")?;
    let topic = ctx.named_topic(name)?;
    ctx.publish(topic, None, value)
}

/// `emit_to(key, value)` and `emit_to(name, key, value)`: an item under an explicit key.
pub(crate) fn emit_to(
    ctx: &mut CallCtx,
    name: Option<&str>,
    key: &Dynamic,
    value: &Dynamic,
) -> Result<(), Box<EvalAltResult>> {
    ctx.check_active("emit_to")?;
    let key = explicit_key(key)?;
    let topic = match name {
        Some(name) => ctx.named_topic(name)?,
        None => ctx.main_topic(),
    };
    ctx.publish(topic, Some(key), value)
}

/// `set_timer(t)`: `on_timer(t)` once the query's watermark passes `t`.
pub(crate) fn set_timer(ctx: &mut CallCtx, t: &Dynamic) -> Result<(), Box<EvalAltResult>> {
    ctx.check_active("set_timer")?;
    if !ctx.has_on_timer {
        return Err("`set_timer` needs the query to define `fn on_timer(t)`".into());
    }
    let t = if let Ok(n) = t.as_int() {
        n
    } else if let Ok(x) = t.as_float() {
        if !x.is_finite() {
            return Err(format!("`set_timer` needs a finite time, found {x}").into());
        }
        x as i64
    } else {
        return Err(format!(
            "`set_timer` needs a time in epoch milliseconds, found {}",
            t.type_name()
        )
        .into());
    };
    ctx.timers.push(t);
    Ok(())
}

/// `forget()`: the key's state is dropped once the call ends.
pub(crate) fn forget(ctx: &mut CallCtx) -> Result<(), Box<EvalAltResult>> {
    ctx.check_active("forget")?;
    ctx.forget = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `LineWriter` writes the bytes `Emitted::write_line` writes, whatever the topics in a
    /// row: the same one again, another, one that needs escapes, another of the same text.
    #[test]
    fn line_writer_writes_what_write_line_writes() {
        let vwap: Topic = "vwap".into();
        let odd: Topic = "q\"\\\n.\u{1}x".into();
        let again: Topic = "vwap".into();
        let keys = [
            Key::Str("AAPL".into()),
            Key::Str("a \"quoted\"\tkey".into()),
            Key::Int(-42),
            Key::Bool(true),
            Key::None,
        ];
        let topics = [&vwap, &vwap, &odd, &vwap, &again, &odd, &odd, &again, &vwap];
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut writer = LineWriter::default();
        for (i, topic) in topics.iter().enumerate() {
            let item = Emitted {
                topic: Arc::clone(topic),
                key: keys[i % keys.len()].clone(),
                value: format!("{{\"n\":{i}}}").into_bytes(),
            };
            item.write_line(&mut want);
            writer.write(&item, &mut got);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
        assert_eq!(want.iter().filter(|&&b| b == b'\n').count(), topics.len());
    }
}
