//! Routing: which queries an event feeds, under which key and event time, on which shard.
//!
//! The router reads only what routing needs from each event (its stream, each query's `key_by`
//! and `time_field`) straight from the tape. An event is accepted by every query of its stream or
//! rejected as a whole, with a reason that names the field, the query and the event's position;
//! an event time further ahead of the wall clock than `max_event_time_skew` is rejected too, so
//! one bad timestamp cannot push a watermark to the end of time.
//!
//! The router does not decide lateness and fires no timer: the shard owns each query's event
//! time (see [`crate::shard`]). What the router keeps per query is its input's mark, as Flink
//! keeps one per input partition: each source (a producer connection, a `POST /ingest`, a demo
//! feed) has its own mark, the newest event time it sent minus lateness, and the input's mark is
//! the least of them, so a fast producer never makes a slower one's events late. A source
//! quiet for `idle_timeout` stops holding the mark back, and a closed one is forgotten; a new
//! source starts at the input's mark. The router stamps each delivery with the mark as it stood
//! after the event, in input order, so that a shard moves its watermark exactly where the
//! offline runner (one source) would, whichever shard saw the event that moved it.
//!
//! In: a parsed [`Frame`]. Out, through a [`RouteSink`]: deliveries per shard, the marks the
//! frame reached (for shards that got no event of it), and rejections.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::durable::MarksCheckpoint;
use crate::event::{Event, FieldPath, Frame, Position, RejectKind, Rejection, Value};
use crate::key::Key;
use crate::query::QueryDef;
pub use crate::shard::Delivery;
use crate::shard::{QueryControl, QueryId};

/// A query as the router knows it: its definition, its switches and its input's mark.
#[derive(Debug)]
pub struct Deployed {
    pub id: QueryId,
    pub def: Arc<QueryDef>,
    /// Shared with every shard that runs this deployment.
    pub control: Arc<QueryControl>,
    /// The mark of the whole input: the least of its sources' marks (never falls).
    watermark: AtomicI64,
    /// Each source's own mark, and when it last sent (wall ms).
    sources: Mutex<HashMap<SourceId, SourceMark>>,
    /// Wall-clock ms of the last event routed, for idle inputs.
    last_arrival: AtomicI64,
    /// The input's mark as its events left it, before any idle move.
    event_mark: AtomicI64,
    /// Where the `key_by` and `time_field` fields were last found among an event's fields
    /// (hints, see [`Event::lookup_hinted`]; any value is safe).
    key_hint: AtomicU32,
    time_hint: AtomicU32,
}

/// Identifies one source of events: a producer connection, a `POST /ingest`, a demo feed, or
/// the one input of `eddy run`.
pub type SourceId = u64;

#[derive(Clone, Copy, Debug)]
struct SourceMark {
    mark: i64,
    seen: i64,
}

impl Deployed {
    pub fn new(id: QueryId, def: Arc<QueryDef>) -> Self {
        Deployed {
            id,
            def,
            control: Arc::default(),
            watermark: AtomicI64::new(i64::MIN),
            sources: Mutex::new(HashMap::new()),
            last_arrival: AtomicI64::new(i64::MIN),
            event_mark: AtomicI64::new(i64::MIN),
            key_hint: AtomicU32::new(0),
            time_hint: AtomicU32::new(0),
        }
    }

    /// The input's mark; `i64::MIN` before the first event.
    pub fn watermark(&self) -> i64 {
        self.watermark.load(Ordering::Relaxed)
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<SourceId, SourceMark>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The least mark of the sources other than `source` that sent within `idle_ms` of `wall`
    /// (all of them without `idle_ms`); `None` when there are none.
    fn others(
        sources: &HashMap<SourceId, SourceMark>,
        source: SourceId,
        wall: i64,
        idle_ms: Option<i64>,
    ) -> Option<i64> {
        sources
            .iter()
            .filter(|(id, m)| **id != source && idle_ms.is_none_or(|i| wall - m.seen < i))
            .map(|(_, m)| m.mark)
            .min()
    }

    /// Records `source`'s mark after a frame (a mark never goes back) and raises the input's
    /// mark to the least of the sources'; returns the input's mark when it rose.
    fn settle(&self, source: SourceId, mark: i64, wall: i64, idle_ms: Option<i64>) -> Option<i64> {
        let least = {
            let mut sources = self.sources();
            let mark = sources.get(&source).map_or(mark, |m| m.mark.max(mark));
            sources.insert(source, SourceMark { mark, seen: wall });
            Self::others(&sources, source, wall, idle_ms).map_or(mark, |o| o.min(mark))
        };
        self.event_mark.fetch_max(least, Ordering::Relaxed);
        (self.watermark.fetch_max(least, Ordering::Relaxed) < least).then_some(least)
    }

    /// `source` starts feeding this query: from now on it holds the input's mark back until it
    /// sends (it starts at the input's mark).
    pub fn source_opened(&self, source: SourceId, wall: i64) {
        let floor = self.watermark();
        self.sources().entry(source).or_insert(SourceMark {
            mark: floor,
            seen: wall,
        });
    }

    /// A source has gone (its connection closed): it no longer holds the mark back. Returns
    /// whether it was a source of this query.
    pub fn source_closed(&self, source: SourceId) -> bool {
        let least = {
            let mut sources = self.sources();
            if sources.remove(&source).is_none() {
                return false;
            }
            sources.values().map(|m| m.mark).min()
        };
        if let Some(least) = least {
            self.watermark.fetch_max(least, Ordering::Relaxed);
        }
        true
    }

    /// This deployment with the marks and switches of `old` (a replace that keeps state).
    pub fn with_marks_of(mut self, old: &Deployed) -> Self {
        self.import_marks(&old.export_marks());
        self.control = Arc::clone(&old.control);
        self
    }

    /// A copy of the input's marks, for a checkpoint.
    pub fn export_marks(&self) -> MarksCheckpoint {
        MarksCheckpoint {
            watermark: self.watermark(),
            sources: self
                .sources()
                .iter()
                .map(|(id, m)| (*id, m.mark, m.seen))
                .collect(),
            last_arrival: self.last_arrival.load(Ordering::Relaxed),
            event_mark: self.event_mark.load(Ordering::Relaxed),
        }
    }

    /// Puts back marks that [`Deployed::export_marks`] copied.
    pub fn import_marks(&self, marks: &MarksCheckpoint) {
        self.watermark.fetch_max(marks.watermark, Ordering::Relaxed);
        self.last_arrival
            .fetch_max(marks.last_arrival, Ordering::Relaxed);
        self.event_mark
            .fetch_max(marks.event_mark, Ordering::Relaxed);
        let mut sources = self.sources();
        for &(id, mark, seen) in &marks.sources {
            sources.insert(id, SourceMark { mark, seen });
        }
    }

    /// The sources this query's input is waiting for.
    pub fn source_ids(&self) -> Vec<SourceId> {
        self.sources().keys().copied().collect()
    }

    /// For an idle input: when no event was routed for `idle_ms` up to `now_ms` (wall clock),
    /// the mark moves on with processing time, to the mark the last events left plus the time
    /// since they came. Returns the new mark when it moved.
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

/// What one call of [`Router::route`] counted, and the marks its source reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub accepted: u64,
    pub rejected: u64,
    /// The source's own mark per query the input fed, for [`Router::settle`].
    pub marks: Vec<(usize, i64)>,
}

/// How far ahead of the wall clock an event time may be, by default: one day.
pub const DEFAULT_MAX_EVENT_TIME_SKEW_MS: i64 = 24 * 3600 * 1000;

/// How the router treats event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimePolicy {
    /// Event times further ahead of the wall clock are rejected.
    pub max_skew_ms: i64,
    /// A source quiet this long no longer holds its queries' marks back. `None`: it does until
    /// it closes.
    pub idle_ms: Option<i64>,
    /// Longest key, in bytes (`max_key_bytes`): an event with a longer one is rejected.
    pub max_key_bytes: usize,
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy {
            max_skew_ms: DEFAULT_MAX_EVENT_TIME_SKEW_MS,
            idle_ms: None,
            max_key_bytes: crate::sandbox::Limits::default().max_key_bytes,
        }
    }
}

/// The routing table: the deployed queries, looked up by stream.
#[derive(Debug, Clone, Default)]
pub struct Router {
    queries: Vec<Arc<Deployed>>,
    time: TimePolicy,
}

/// Wall-clock time in epoch ms.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Router {
    pub fn new(queries: Vec<Arc<Deployed>>, time: TimePolicy) -> Self {
        Router { queries, time }
    }

    pub fn queries(&self) -> &[Arc<Deployed>] {
        &self.queries
    }

    /// Whether query `id` has timers (an `on_timer`): only those care about marks on a shard.
    pub fn has_timers(&self, id: QueryId) -> bool {
        self.queries
            .iter()
            .any(|q| q.id == id && q.def.functions.on_timer)
    }

    /// Routes every event of `frame`, which came from `source`. `stream` names the stream of
    /// events that carry no `"stream"` field; `clock` gives each event's arrival time.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        frame: &Arc<Frame>,
        source: SourceId,
        stream: Option<&str>,
        unnamed: Unnamed,
        clock: Clock,
        shards: usize,
        sink: &mut impl RouteSink,
    ) -> Routed {
        static STREAM: std::sync::OnceLock<FieldPath> = std::sync::OnceLock::new();
        let stream_field = STREAM.get_or_init(|| FieldPath::parse("stream").expect("valid path"));
        let mut routed = Routed::default();
        let mut plan: Vec<(usize, Key, i64)> = Vec::new();
        // The frame's arrival, which a replay of the ingest log gives again.
        let wall = match clock {
            Clock::At(t) => t,
            Clock::Position => wall_ms(),
        };
        // Per query this frame feeds: the source's running mark and the least of the others'.
        let mut marks: Vec<Option<(i64, Option<i64>)>> = vec![None; self.queries.len()];
        // Where `stream` was in the last event: events of a frame mostly share one shape.
        let stream_hint = Cell::new(0);
        for i in 0..frame.len() {
            let event = frame.event(i);
            let position = frame.position(i);
            let arrival = match clock {
                Clock::At(t) => t,
                Clock::Position => i64::from(position.index),
            };
            let own_stream = match event.lookup_hinted_in_line(stream_field, &stream_hint) {
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
                    if !config
                        .sources
                        .iter()
                        .any(|s| crate::event::same_name(s, name))
                    {
                        continue;
                    }
                }
                match route_one(&event, q, arrival, wall, &self.time) {
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
            // (Taken in place, cleared with the next event: a `drain` costs more than the one
            // or two deliveries it hands out.)
            for (qi, key, time) in plan.iter_mut() {
                let (qi, time) = (*qi, *time);
                let key = std::mem::replace(key, Key::None);
                let q = &self.queries[qi];
                let (own, others) = marks[qi].get_or_insert_with(|| {
                    let floor = q.watermark();
                    let sources = q.sources();
                    let own = sources.get(&source).map_or(floor, |m| m.mark);
                    let others = Deployed::others(&sources, source, wall, self.time.idle_ms);
                    (own, others)
                });
                *own = (*own).max(time.saturating_sub(q.def.config.lateness_ms));
                let watermark = others.map_or(*own, |o| o.min(*own)).max(q.watermark());
                let source_mark = (*own).max(watermark);
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
                        source_mark,
                        now: arrival,
                    },
                );
            }
        }
        for (qi, (q, mark)) in self.queries.iter().zip(marks).enumerate() {
            let Some((own, others)) = mark else { continue };
            q.last_arrival.store(wall, Ordering::Relaxed);
            routed.marks.push((qi, own));
            let reached = others.map_or(own, |o| o.min(own));
            if reached > q.watermark() {
                sink.advanced(q.id, reached);
            }
        }
        routed
    }

    /// Publishes the marks a routed input reached for its source, once its deliveries are
    /// queued (published earlier, another source's advance could overtake them and fire timers
    /// before they arrive).
    pub fn settle(&self, source: SourceId, routed: &Routed) {
        self.settle_at(source, routed, wall_ms());
    }

    /// [`Router::settle`] as of wall-clock time `wall` (a replay of the ingest log gives the
    /// time the frame first came).
    pub fn settle_at(&self, source: SourceId, routed: &Routed, wall: i64) {
        let _ = self.settle_rising(source, routed, wall);
    }

    /// [`Router::settle_at`], returning the queries whose input mark rose, with the mark.
    pub fn settle_rising(
        &self,
        source: SourceId,
        routed: &Routed,
        wall: i64,
    ) -> Vec<(QueryId, i64)> {
        let mut rose = Vec::new();
        for &(qi, own) in &routed.marks {
            let q = &self.queries[qi];
            if let Some(mark) = q.settle(source, own, wall, self.time.idle_ms) {
                rose.push((q.id, mark));
            }
        }
        rose
    }
}

/// [`Event::lookup_hinted`] with a hint shared by the threads that route for one query.
#[inline]
fn lookup_shared_hint<'e>(
    event: &'e Event,
    path: &FieldPath,
    hint: &AtomicU32,
) -> Option<Value<'e>> {
    let was = hint.load(Ordering::Relaxed);
    let cell = Cell::new(was);
    let found = event.lookup_hinted_in_line(path, &cell);
    if cell.get() != was {
        hint.store(cell.get(), Ordering::Relaxed);
    }
    found
}

/// The key and event time of `event` for query `q`, or why it has none.
#[inline]
fn route_one(
    event: &Event,
    q: &Deployed,
    arrival: i64,
    wall: i64,
    policy: &TimePolicy,
) -> Result<(Key, i64), (RejectKind, String)> {
    let max_skew_ms = policy.max_skew_ms;
    let config = &q.def.config;
    let name = &q.def.name;
    let key = match &config.key_by {
        None => Key::None,
        Some(path) => match lookup_shared_hint(event, path, &q.key_hint) {
            None => {
                let why = format!("field `{path}` (key_by of query `{name}`) is missing");
                return Err((RejectKind::BadKey, why));
            }
            Some(Value::Str(s)) if s.len() > policy.max_key_bytes => {
                let why = format!(
                    "field `{path}` (key_by of query `{name}`) is {} bytes long, longer than the \
                     limit of {} (max_key_bytes)",
                    s.len(),
                    policy.max_key_bytes
                );
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
        Some(path) => match lookup_shared_hint(event, path, &q.time_hint) {
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

#[cfg(test)]
mod tests {
    use crate::offline::{self, RunOptions};
    use crate::{Limits, QueryDef};

    /// Routing remembers where `stream`, `key_by` and `time_field` were in the last event; an
    /// event of another shape (fields moved, added, missing, a nested object) is routed by
    /// its own fields all the same.
    #[test]
    fn fields_are_found_wherever_each_event_has_them() {
        let limits = Limits::default();
        let script = r#"
            let source = "s";
            let key_by = "user";
            let time_field = "ts";
            fn init(key) { #{ n: 0 } }
            fn on_event(ev) { this.n += 1; emit(#{ n: this.n, ts: ev.ts }); }
        "#;
        let def = QueryDef::compile("q", script, &limits).unwrap();
        let input = [
            r#"{"stream":"s","user":"a","ts":1}"#,
            r#"{"stream":"s","user":"a","ts":2}"#,
            r#"{"user":"b","stream":"s","ts":3}"#,
            r#"{"ts":4,"x":1,"user":"a","stream":"s"}"#,
            r#"{"stream":"s","nested":{"user":"c"},"user":"b","ts":5}"#,
            r#"{"stream":"s","ts":6}"#,
            r#"{"stream":"t","user":"a","ts":7}"#,
            r#"{"user":"a","ts":8,"stream":"s"}"#,
        ]
        .join("\n");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let summary = offline::run(
            vec![def],
            input.into_bytes(),
            &limits,
            &RunOptions::default(),
            &mut out,
            &mut err,
        )
        .unwrap();
        let got: Vec<(String, i64, i64)> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let key = v["key"].as_str().unwrap().to_owned();
                (
                    key,
                    v["value"]["n"].as_i64().unwrap(),
                    v["value"]["ts"].as_i64().unwrap(),
                )
            })
            .collect();
        let want = [
            ("a", 1, 1),
            ("a", 2, 2),
            ("b", 1, 3),
            ("a", 3, 4),
            ("b", 2, 5),
            ("a", 4, 8),
        ];
        let want: Vec<(String, i64, i64)> = want
            .iter()
            .map(|(k, n, t)| (k.to_string(), *n, *t))
            .collect();
        assert_eq!(got, want);
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains("field `user` (key_by of query `q`) is missing"),
            "{err}"
        );
        assert_eq!(summary.rejected, 1);
    }
}
