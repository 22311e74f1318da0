//! Routing: which queries an event feeds, under which key and event time, on which shard.
//!
//! The router reads only what routing needs from each event (its stream, each query's `key_by`
//! and `time_field`) straight from the tape. An event is accepted by every query of its stream or
//! rejected as a whole, with a reason that names the field, the query and the event's position;
//! an event time further ahead of the wall clock than `max_event_time_skew` is rejected too, so
//! one bad timestamp cannot push a watermark to the end of time.
//!
//! The router does not decide lateness and fires no timer: the shard owns each query's event
//! time (see [`crate::shard`]). What the router keeps per query is the stream's high-water mark,
//! the newest event time routed minus lateness, across every producer (an atomic). It stamps
//! each delivery with that mark as it stood after the event, in input order, so that a shard
//! moves its watermark exactly where the offline runner would, whichever shard saw the event
//! that moved it.
//!
//! In: a parsed [`Frame`]. Out, through a [`RouteSink`]: deliveries per shard, the marks the
//! frame reached (for shards that got no event of it), and rejections.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::event::{Event, FieldPath, Frame, Position, RejectKind, Rejection, Value};
use crate::key::Key;
use crate::query::QueryDef;
pub use crate::shard::Delivery;
use crate::shard::{QueryControl, QueryId};

/// A query as the router knows it: its definition, its switches and its stream's high-water
/// mark.
#[derive(Debug)]
pub struct Deployed {
    pub id: QueryId,
    pub def: Arc<QueryDef>,
    /// Shared with every shard that runs this deployment.
    pub control: Arc<QueryControl>,
    watermark: AtomicI64,
    /// The mark as events alone set it (without idle moves).
    event_mark: AtomicI64,
    /// Wall-clock ms of the last event routed, for idle streams.
    last_arrival: AtomicI64,
}

impl Deployed {
    pub fn new(id: QueryId, def: Arc<QueryDef>) -> Self {
        Deployed {
            id,
            def,
            control: Arc::default(),
            watermark: AtomicI64::new(i64::MIN),
            event_mark: AtomicI64::new(i64::MIN),
            last_arrival: AtomicI64::new(i64::MIN),
        }
    }

    /// Newest event time routed minus lateness (or moved on by idleness); `i64::MIN` before the
    /// first event.
    pub fn watermark(&self) -> i64 {
        self.watermark.load(Ordering::Relaxed)
    }

    /// For an idle input: when no event was routed for `idle_ms` up to `now_ms` (wall clock),
    /// the mark moves on with processing time, to the mark of the last event plus the time since
    /// it came. Returns the new mark when it moved.
    pub fn advance_idle(&self, now_ms: i64, idle_ms: i64) -> Option<i64> {
        let last = self.last_arrival.load(Ordering::Relaxed);
        let quiet = now_ms.saturating_sub(last);
        if last == i64::MIN || quiet < idle_ms {
            return None;
        }
        let mark = self.event_mark.load(Ordering::Relaxed);
        if mark == i64::MIN {
            return None;
        }
        let candidate = mark.saturating_add(quiet);
        (self.watermark.fetch_max(candidate, Ordering::Relaxed) < candidate).then_some(candidate)
    }
}

/// Where the router's decisions go.
pub trait RouteSink {
    /// `delivery`, of the event at `position` in the input, is for `shard`.
    fn deliver(&mut self, shard: usize, position: Position, delivery: Delivery);
    /// The mark of `query` rose to `watermark` while routing this frame; shards that got no
    /// event of it after that should hear of it too, to fire their timers.
    fn advanced(&mut self, query: QueryId, watermark: i64);
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
}

/// How far ahead of the wall clock an event time may be, by default: one day.
pub const DEFAULT_MAX_EVENT_TIME_SKEW_MS: i64 = 24 * 3600 * 1000;

/// The routing table: the deployed queries, looked up by stream.
#[derive(Debug, Clone)]
pub struct Router {
    queries: Vec<Arc<Deployed>>,
    max_skew_ms: i64,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(Vec::new(), DEFAULT_MAX_EVENT_TIME_SKEW_MS)
    }
}

/// Wall-clock time in epoch ms.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Router {
    /// A table of `queries` that rejects event times more than `max_skew_ms` ahead of the wall
    /// clock.
    pub fn new(queries: Vec<Arc<Deployed>>, max_skew_ms: i64) -> Self {
        Router {
            queries,
            max_skew_ms,
        }
    }

    pub fn max_skew_ms(&self) -> i64 {
        self.max_skew_ms
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
        let wall = wall_ms();
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
                match route_one(&event, q, arrival, (wall, self.max_skew_ms)) {
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
                q.last_arrival.store(wall, Ordering::Relaxed);
                let candidate = time.saturating_sub(q.def.config.lateness_ms);
                q.event_mark.fetch_max(candidate, Ordering::Relaxed);
                let before = q.watermark.fetch_max(candidate, Ordering::Relaxed);
                let watermark = before.max(candidate);
                if candidate > before {
                    match advanced.iter_mut().find(|(id, _)| *id == q.id) {
                        Some(entry) => entry.1 = entry.1.max(candidate),
                        None => advanced.push((q.id, candidate)),
                    }
                }
                let shard = key.shard(shards);
                sink.deliver(
                    shard,
                    position,
                    Delivery {
                        query: q.id,
                        key,
                        event: event.clone(),
                        time,
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
    (wall, max_skew_ms): (i64, i64),
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
        None => return Ok((key, arrival)),
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
    if time > wall.saturating_add(max_skew_ms) {
        let why = format!(
            "field `{path}` (time_field of query `{name}`) is {time}, more than \
             {max_skew_ms} ms ahead of the wall clock ({wall}), the limit (max_event_time_skew)",
            path = config.time_field.as_ref().expect("has a time field"),
        );
        return Err((RejectKind::BadTime, why));
    }
    Ok((key, time))
}
