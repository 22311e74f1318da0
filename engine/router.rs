//! Routing: which queries an event feeds, under which key, on which shard, and whether it is
//! late.
//!
//! The router reads only what routing needs from each event (its stream, each query's `key_by`
//! and `time_field`) straight from the tape. It owns each deployed query's watermark (an atomic,
//! so that every ingest connection and every shard sees one watermark per query, whichever shard
//! a key landed on). An event is accepted by every query of its stream or rejected as a whole,
//! with a reason that names the field, the query and the event's position. Late events (older
//! than the watermark) are not dropped: they become items on `<query>.late`.
//!
//! In: a parsed [`Frame`]. Out, through a [`RouteSink`]: deliveries per shard, watermark
//! advances, late items and rejections.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::builtins::{Emitted, Topic};
use crate::event::{Event, FieldPath, Frame, RejectKind, Rejection, Value};
use crate::key::Key;
use crate::query::QueryDef;
use crate::shard::QueryId;

/// A query as the router knows it: its definition, watermark and routing counters.
#[derive(Debug)]
pub struct Deployed {
    pub id: QueryId,
    pub def: Arc<QueryDef>,
    late_topic: Topic,
    watermark: AtomicI64,
    /// Late events seen.
    pub late: AtomicU64,
}

impl Deployed {
    pub fn new(id: QueryId, def: Arc<QueryDef>) -> Self {
        Deployed {
            id,
            late_topic: format!("{}.late", def.name).into(),
            def,
            watermark: AtomicI64::new(i64::MIN),
            late: AtomicU64::new(0),
        }
    }

    /// Newest event time seen minus lateness; `i64::MIN` before the first event.
    pub fn watermark(&self) -> i64 {
        self.watermark.load(Ordering::Relaxed)
    }
}

/// One event for one query, bound for the shard that owns its key.
#[derive(Debug)]
pub struct Delivery {
    pub query: QueryId,
    pub key: Key,
    pub event: Event,
    pub watermark: i64,
    pub now: i64,
}

/// Where the router's decisions go.
pub trait RouteSink {
    /// `delivery` is for `shard`.
    fn deliver(&mut self, shard: usize, delivery: Delivery);
    /// The watermark of `query` rose to `watermark` while routing this frame; shards that got no
    /// event of it should hear of it too, to fire their timers.
    fn advanced(&mut self, query: QueryId, watermark: i64);
    /// An event older than the watermark, as an item for `<query>.late`.
    fn late(&mut self, item: Emitted);
    fn reject(&mut self, rejection: Rejection);
}

/// What to do with an event that names no stream (no `stream` parameter, no `"stream"` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unnamed {
    /// Feed it to every query (the offline runner, where the input is the stream).
    AllQueries,
    /// Reject it (the server, where a producer must say what it sends).
    Reject,
}

/// Where the arrival time (`now()`, and the event time of queries without `time_field`) comes
/// from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The wall clock at arrival, in epoch ms, the same for every event of the frame.
    At(i64),
    /// The event's index in its input, in ms: a logical clock that makes runs repeatable.
    Position,
}

/// What one call of [`Router::route`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub accepted: u64,
    pub rejected: u64,
    pub late: u64,
}

/// The routing table: the deployed queries, looked up by stream.
#[derive(Debug, Default, Clone)]
pub struct Router {
    queries: Vec<Arc<Deployed>>,
}

impl Router {
    pub fn new(queries: Vec<Arc<Deployed>>) -> Self {
        Router { queries }
    }

    pub fn queries(&self) -> &[Arc<Deployed>] {
        &self.queries
    }

    /// Routes every event of `frame`. `stream` names the stream of events that carry no
    /// `"stream"` field; `clock` gives each event's arrival time.
    pub fn route(
        &self,
        frame: &Arc<Frame>,
        stream: Option<&str>,
        unnamed: Unnamed,
        clock: Clock,
        shards: usize,
        sink: &mut impl RouteSink,
    ) -> Routed {
        static STREAM: std::sync::OnceLock<FieldPath> = std::sync::OnceLock::new();
        let stream_field = STREAM.get_or_init(|| FieldPath::parse("stream").expect("valid path"));
        let mut routed = Routed::default();
        let mut advanced: Vec<(QueryId, i64)> = Vec::new();
        let mut plan: Vec<(usize, Key, i64)> = Vec::new();
        for i in 0..frame.len() {
            let event = frame.event(i);
            let position = frame.position(i);
            let arrival = match clock {
                Clock::At(t) => t,
                Clock::Position => i64::from(position.index),
            };
            let own_stream = match event.lookup(stream_field) {
                Some(Value::Str(s)) => Some(s),
                Some(other) => {
                    routed.rejected += 1;
                    sink.reject(Rejection {
                        position,
                        kind: RejectKind::NoStream,
                        reason: format!("field `stream` must be a string, found {}", other.kind()),
                    });
                    continue;
                }
                None => None,
            };
            let name = own_stream.or(stream);
            if name.is_none() && unnamed == Unnamed::Reject {
                routed.rejected += 1;
                sink.reject(Rejection {
                    position,
                    kind: RejectKind::NoStream,
                    reason: "no stream: give `?stream=NAME` or a \"stream\" field".into(),
                });
                continue;
            }
            plan.clear();
            let mut problem = None;
            for (qi, q) in self.queries.iter().enumerate() {
                let config = &q.def.config;
                if let Some(name) = name {
                    if !config.sources.iter().any(|s| s == name) {
                        continue;
                    }
                }
                match route_one(&event, q, arrival) {
                    Ok((key, time)) => plan.push((qi, key, time)),
                    Err(reason) => {
                        problem = Some(reason);
                        break;
                    }
                }
            }
            if let Some((kind, reason)) = problem {
                routed.rejected += 1;
                sink.reject(Rejection {
                    position,
                    kind,
                    reason,
                });
                continue;
            }
            routed.accepted += 1;
            for (qi, key, time) in plan.drain(..) {
                let q = &self.queries[qi];
                let watermark = q.watermark();
                if q.def.config.time_field.is_some() && time < watermark {
                    routed.late += 1;
                    q.late.fetch_add(1, Ordering::Relaxed);
                    sink.late(late_item(q, key, &event, time, watermark));
                    continue;
                }
                let candidate = time.saturating_sub(q.def.config.lateness_ms);
                let watermark = if candidate > watermark {
                    let before = q.watermark.fetch_max(candidate, Ordering::Relaxed);
                    match advanced.iter_mut().find(|(id, _)| *id == q.id) {
                        Some(entry) => entry.1 = entry.1.max(candidate),
                        None => advanced.push((q.id, candidate)),
                    }
                    before.max(candidate)
                } else {
                    watermark
                };
                let shard = key.shard(shards);
                sink.deliver(
                    shard,
                    Delivery {
                        query: q.id,
                        key,
                        event: event.clone(),
                        watermark,
                        now: arrival,
                    },
                );
            }
        }
        for (query, watermark) in advanced {
            sink.advanced(query, watermark);
        }
        routed
    }
}

/// The key and event time of `event` for query `q`, or why it has none.
fn route_one(
    event: &Event,
    q: &Deployed,
    arrival: i64,
) -> Result<(Key, i64), (RejectKind, String)> {
    let config = &q.def.config;
    let name = &q.def.name;
    let key = match &config.key_by {
        None => Key::None,
        Some(path) => match event.lookup(path) {
            None => {
                let why = format!("field `{path}` (key_by of query `{name}`) is missing");
                return Err((RejectKind::BadKey, why));
            }
            Some(value) => Key::from_value(value).map_err(|why| {
                let why = format!("field `{path}` (key_by of query `{name}`) {why}");
                (RejectKind::BadKey, why)
            })?,
        },
    };
    let time = match &config.time_field {
        None => arrival,
        Some(path) => match event.lookup(path) {
            Some(Value::Int(t)) => t,
            Some(Value::Float(t)) if t.is_finite() => t as i64,
            None => {
                let why = format!("field `{path}` (time_field of query `{name}`) is missing");
                return Err((RejectKind::BadTime, why));
            }
            Some(other) => {
                let why = format!(
                    "field `{path}` (time_field of query `{name}`) must be epoch milliseconds, found {}",
                    other.kind()
                );
                return Err((RejectKind::BadTime, why));
            }
        },
    };
    Ok((key, time))
}

fn late_item(q: &Deployed, key: Key, event: &Event, time: i64, watermark: i64) -> Emitted {
    let mut value = Vec::with_capacity(128);
    value.extend_from_slice(b"{\"event\":");
    event.write_json(&mut value);
    value.extend_from_slice(b",\"event_time\":");
    crate::json::write_int(&mut value, time);
    value.extend_from_slice(b",\"watermark\":");
    crate::json::write_int(&mut value, watermark);
    value.push(b'}');
    Emitted {
        topic: Arc::clone(&q.late_topic),
        key,
        value,
    }
}
