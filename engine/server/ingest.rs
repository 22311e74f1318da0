//! Ingest: producers' frames (WebSocket `/ingest`) and bodies (`POST /ingest`) into the shards.
//!
//! Each input is parsed once, routed by the current routing table, and its events are sent to
//! their shards as one message per shard, with the marks the input's event times reached (the
//! shards decide lateness and fire timers). A full shard queue makes the send wait, so the
//! connection stops reading: TCP slows the producer, nothing is dropped, and an acknowledged
//! event is one that is already queued for its shard. An event bound for a shard that is not
//! running is rejected (`unavailable`), never acknowledged. The routing table is held until
//! every message is queued: a replace waits for that before it retires the old version, so each
//! acknowledged event is handled by the version that routed it.
//!
//! Memory: every input takes its share of `max_ingest_bytes_in_flight` ([`IngestBudget`]) before
//! it is parsed: as much as its parse may take at worst (its tape and simd-json's scratch
//! buffers, about 18 bytes per input byte), given back down to what its frame
//! really holds once parsed, and the rest when the frame is dropped, after the last of its events
//! is handled. An input that would go past the budget waits, and its connection reads nothing
//! meanwhile: TCP slows the producer, as with a full shard queue. So the frames parsed, routed and
//! queued for the shards hold at most the budget, all connections together (an input larger
//! than the whole budget waits until it is alone). What connections have read and not yet
//! parsed is bounded apart: one input per connection, at most `max_frame_bytes` each.
//!
//! With `ack=true` every frame is answered with its counts and up to ten errors; otherwise
//! rejected events are reported as `error` messages, at most ten a second per connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::upgrade::UpgradeFut;

use crate::durable::Record;
use crate::event::{Parser, Position, RejectKind, Rejection};
use crate::json::{self, Object};
use crate::router::{Clock, Delivery, RouteSink, SourceId, Unnamed};
use crate::shard::QueryId;

use super::metrics::StreamCounters;
use super::pipeline::ShardMsg;
use super::producer::FrameId;
use super::ws::{self, Outbound};
use super::State;

/// The bytes of frames in flight, all connections together (`max_ingest_bytes_in_flight`): a
/// semaphore counted in KiB.
pub struct IngestBudget {
    permits: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
    /// Inputs that had to wait for the budget.
    pub waits: std::sync::atomic::AtomicU64,
}

impl IngestBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = (bytes / 1024).clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        ) as u32;
        IngestBudget {
            permits: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
            waits: Default::default(),
        }
    }

    /// Takes `bytes` of the budget (all of it, for more than the whole), waiting for them.
    async fn take(&self, bytes: usize) -> tokio::sync::OwnedSemaphorePermit {
        let kib = bytes.div_ceil(1024).clamp(1, self.total_kib as usize) as u32;
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_many_owned(kib) {
            return permit;
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        Arc::clone(&self.permits)
            .acquire_many_owned(kib)
            .await
            .expect("the budget is never closed")
    }

    /// Bytes of the budget taken now.
    pub fn in_flight(&self) -> u64 {
        (self.total_kib as u64 - self.permits.available_permits() as u64) * 1024
    }
}

/// At most this many errors are listed in one answer.
pub const MAX_LISTED_ERRORS: usize = 10;

/// What one input came to.
pub struct Outcome {
    pub accepted: u64,
    pub rejected: u64,
    /// `(index, reason)` of the first rejected items.
    pub errors: Vec<(u32, String)>,
    /// The input held items, and none of them was JSON.
    pub nothing_was_json: bool,
    /// An idempotent producer's frame that an earlier send had stored (all of it, alone; some
    /// or all of its events, in a cluster): `accepted` counts only what this send added.
    pub duplicate: bool,
}

impl Outcome {
    /// `{"accepted":A,"rejected":R,"errors":[{"index":I,"error":E}…]}`, into an object whose
    /// first fields are already written.
    pub fn write_fields(&self, object: &mut Object<'_>) {
        if self.duplicate {
            object.raw("duplicate", b"true");
        }
        object
            .int("accepted", self.accepted as i64)
            .int("rejected", self.rejected as i64)
            .array("errors", &self.errors, |out, (index, error)| {
                Object::new(out)
                    .int("index", i64::from(*index))
                    .str("error", error)
                    .end();
            });
    }

    /// The answer to `POST /ingest`: just the fields of [`Outcome::write_fields`].
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut object = Object::new(&mut out);
        self.write_fields(&mut object);
        object.end();
        out
    }
}

/// Per-shard messages being gathered for one input.
struct Gather<'a> {
    deliveries: Vec<Vec<Delivery>>,
    /// Positions of the events delivered to each shard (an event may go to several).
    positions: Vec<Vec<Position>>,
    watermarks: Vec<(QueryId, i64)>,
    rejections: &'a mut Vec<Rejection>,
}

impl RouteSink for Gather<'_> {
    fn deliver(&mut self, shard: usize, position: Position, delivery: Delivery) {
        self.deliveries[shard].push(delivery);
        if self.positions[shard].last() != Some(&position) {
            self.positions[shard].push(position);
        }
    }
    fn advanced(&mut self, query: QueryId, watermark: i64) {
        self.watermarks.push((query, watermark));
    }
    fn reject(&mut self, rejection: Rejection) {
        self.rejections.push(rejection);
    }
}

/// One source of events (a producer connection, a `POST /ingest`, a demo feed): its parser, and
/// the identity under which its queries keep its mark (see [`crate::router`]).
pub struct Source {
    id: SourceId,
    parser: Parser,
}

impl Source {
    pub fn new(state: &State) -> Self {
        Source {
            id: state.next_source.fetch_add(1, Ordering::Relaxed),
            parser: Parser::default(),
        }
    }

    /// Declares the source a feed of `stream`'s queries before it sends anything, so that the
    /// input's mark waits for it (see [`crate::router`]).
    pub async fn open(&self, state: &State, stream: &str) {
        let wall = crate::router::wall_ms();
        let _order = match &state.durable {
            Some(d) => {
                let guard = d.order.lock().await;
                d.append(&Record::Open {
                    source: self.id,
                    wall,
                    stream,
                });
                Some(guard)
            }
            None => None,
        };
        open_source(state, self.id, stream, wall);
    }

    /// The source has gone: it no longer holds its queries' marks back, and the shards hear of
    /// their marks (which may also have risen when sources settled at the same moment).
    pub async fn close(self, state: &State) {
        let _order = match &state.durable {
            Some(d) => {
                let guard = d.order.lock().await;
                d.append(&Record::Close { source: self.id });
                Some(guard)
            }
            None => None,
        };
        close_source(state, self.id).await;
    }
}

/// [`Source::open`] of source `id` at wall-clock time `wall` (also a replay of the log).
pub fn open_source(state: &State, id: SourceId, stream: &str, wall: i64) {
    let router = state.router.load();
    for q in router.queries() {
        if q.def.config.sources.iter().any(|s| s == stream) {
            q.source_opened(id, wall);
        }
    }
}

/// [`Source::close`] of source `id` (also a replay of the log).
pub async fn close_source(state: &State, id: SourceId) {
    let router = state.router.load_full();
    let rose: Vec<(QueryId, i64)> = router
        .queries()
        .iter()
        .filter(|q| q.def.functions.on_timer && q.source_closed(id))
        .map(|q| (q.id, q.watermark()))
        .filter(|(_, mark)| *mark > i64::MIN)
        .collect();
    drop(router);
    if rose.is_empty() {
        return;
    }
    let now = crate::router::wall_ms();
    for shard in 0..state.pipeline.shards() {
        let msg = ShardMsg::Batch {
            deliveries: Vec::new(),
            watermarks: rose.clone(),
            now,
            received: Instant::now(),
        };
        let _ = state.pipeline.send(shard, msg).await;
    }
}

/// Parses, routes and queues one input. Returns once every event is queued for its shard and,
/// with a data directory, the input is in the ingest log as its fsync policy requires.
pub async fn ingest(
    state: &State,
    source: &mut Source,
    input: Vec<u8>,
    stream: Option<&str>,
    counters: &StreamCounters,
    id: Option<&FrameId>,
) -> Outcome {
    route_input(state, source, input, stream, counters, id)
        .await
        .durable(state)
        .await
}

/// An input whose events are queued for their shards, and whose log record (with a data
/// directory) may still be on its way to the disk: its answer waits for [`Pending::durable`].
/// A connection routes its next frame meanwhile, so that one `fsync` covers many of its frames.
pub struct Pending {
    outcome: Outcome,
    /// The input's position in the ingest log.
    logged: Option<u64>,
    items: u32,
    /// Cluster mode: JetStream's acks of the input's events.
    published: Option<super::cluster::Acks>,
}

impl Pending {
    /// The answer to an idempotent producer's frame that was taken before: nothing is added.
    fn duplicate() -> Self {
        Pending {
            outcome: Outcome {
                accepted: 0,
                rejected: 0,
                errors: Vec::new(),
                nothing_was_json: false,
                duplicate: true,
            },
            logged: None,
            items: 0,
            published: None,
        }
    }
}

impl Pending {
    /// The answer to the input, once the log holds it.
    pub async fn durable(mut self, state: &State) -> Outcome {
        if let Some(acks) = self.published.take() {
            super::cluster::acknowledged(&mut self.outcome, acks.await);
        }
        if let (Some(d), Some(lsn)) = (&state.durable, self.logged) {
            if !d.log.wait_durable(lsn).await {
                // Queued but maybe not on disk: never acknowledged as accepted.
                let listed: std::collections::HashSet<u32> =
                    self.outcome.errors.iter().map(|(i, _)| *i).collect();
                let reason = "the ingest log cannot be written: the event was not made durable";
                let room = MAX_LISTED_ERRORS.saturating_sub(self.outcome.errors.len());
                self.outcome.errors.extend(
                    (0..self.items)
                        .filter(|i| !listed.contains(i))
                        .take(room)
                        .map(|i| (i, reason.to_owned())),
                );
                self.outcome.errors.sort_by_key(|(i, _)| *i);
                self.outcome.rejected += self.outcome.accepted;
                self.outcome.accepted = 0;
            }
        }
        self.outcome
    }
}

/// Parses, routes and queues one input, and appends it to the ingest log. With `id` (an
/// idempotent producer's frame), a node alone first checks that the frame is new (see
/// [`super::producer`]); a cluster node publishes it under ids derived from `id`.
pub async fn route_input(
    state: &State,
    source: &mut Source,
    input: Vec<u8>,
    stream: Option<&str>,
    counters: &StreamCounters,
    id: Option<&FrameId>,
) -> Pending {
    let received = Instant::now();
    // Alone: the producer's turn is held until the frame is queued and recorded.
    let producer = match (id, &state.cluster) {
        (Some(id), None) => Some((state.producers_seen.get(&id.producer), id)),
        _ => None,
    };
    let _turn = match &producer {
        Some((p, id)) => {
            let turn = p.turn.lock().await;
            if id.frame < p.next() {
                state
                    .producers_seen
                    .duplicates
                    .fetch_add(1, Ordering::Relaxed);
                return Pending::duplicate();
            }
            Some(turn)
        }
        None => None,
    };
    // The log keeps the input as it came: parsing works in place.
    let copy = state.durable.as_ref().map(|_| input.clone());
    let worst = input.capacity()
        + copy.as_ref().map_or(0, Vec::len)
        + (input.len() + 2)
            * (crate::event::MAX_TAPE_BYTES_PER_INPUT_BYTE
                + crate::event::MAX_SCRATCH_BYTES_PER_INPUT_BYTE);
    let mut permit = state.ingest_budget.take(worst).await;
    let mut parsed = source.parser.parse(input);
    let held = (parsed.frame.bytes().div_ceil(1024) as u32).max(1);
    if permit.num_permits() > held as usize {
        drop(permit.split(permit.num_permits() - held as usize));
    }
    if let Some(frame) = Arc::get_mut(&mut parsed.frame) {
        frame.hold(permit);
    }
    let mut rejections = parsed.rejections;
    let nothing_was_json = parsed.items > 0
        && parsed.frame.is_empty()
        && rejections
            .iter()
            .all(|r| r.kind == crate::event::RejectKind::InvalidJson);
    let order = match &state.durable {
        Some(d) => Some(d.order.lock().await),
        None => None,
    };
    let now = crate::router::wall_ms();
    // Appended before its events are queued, so that the hub, which publishes nothing before
    // the log has written what was appended, never lets out an item whose input a crash of
    // the process could lose. A frame none of whose events turn out to be accepted is logged
    // too: its replay rejects them again, and nothing else.
    let logged = match (&state.durable, copy) {
        (Some(d), Some(bytes)) if !parsed.frame.is_empty() => Some(d.append(&Record::Frame {
            source: source.id,
            now,
            stream,
            producer: producer.as_ref().map(|(_, id)| (&*id.producer, id.frame)),
            bytes: &bytes,
        })),
        _ => None,
    };
    let (mut routed, unqueued, published) = match &state.cluster {
        // Cluster mode: published to the partitions' owners, not queued here.
        Some(cluster) => {
            let (routed, acks) = super::cluster::publish(
                state,
                cluster,
                super::cluster::Origin {
                    source: source.id,
                    id,
                },
                &parsed.frame,
                stream,
                now,
                &mut rejections,
            )
            .await;
            (routed, Vec::new(), Some(acks))
        }
        None => {
            let (routed, unqueued) = apply(
                state,
                source.id,
                &parsed.frame,
                stream,
                now,
                received,
                &mut rejections,
            )
            .await;
            (routed, unqueued, None)
        }
    };
    // Taken: recorded under the log's order, as its record was (a checkpoint reads the table
    // under that order too).
    if let Some((p, id)) = &producer {
        p.took(id.frame);
    }
    drop(order);
    for (shard, position) in unqueued {
        routed.accepted -= 1;
        rejections.push(Rejection {
            position,
            kind: RejectKind::Unavailable,
            reason: format!("shard {shard} is not running: the event was not queued"),
        });
    }
    counters.count(routed.accepted, &rejections);
    rejections.sort_by_key(|r| r.position.index);
    Pending {
        outcome: Outcome {
            accepted: routed.accepted,
            rejected: rejections.len() as u64,
            errors: rejections
                .iter()
                .take(MAX_LISTED_ERRORS)
                .map(|r| (r.position.index, r.reason.clone()))
                .collect(),
            nothing_was_json,
            duplicate: false,
        },
        logged,
        items: parsed.items,
        published,
    }
}

/// Routes a parsed input from source `id` that arrived at wall-clock `now`, and queues its
/// events for their shards (also a replay of the log). Returns what was routed and the events
/// that could not be queued (their shard is not running), by shard.
pub async fn apply(
    state: &State,
    id: SourceId,
    frame: &Arc<crate::event::Frame>,
    stream: Option<&str>,
    now: i64,
    received: Instant,
    rejections: &mut Vec<Rejection>,
) -> (crate::router::Routed, Vec<(usize, Position)>) {
    // Held until every message is queued (see the module documentation).
    let router = state.router.load_full();
    let shards = state.pipeline.shards();
    let mut gather = Gather {
        deliveries: (0..shards).map(|_| Vec::new()).collect(),
        positions: (0..shards).map(|_| Vec::new()).collect(),
        watermarks: Vec::new(),
        rejections,
    };
    let routed = router.route(
        frame,
        id,
        stream,
        Unnamed::Reject,
        Clock::At(now),
        shards,
        &mut gather,
    );
    // Marks matter to shards only for queries with timers.
    let timed: Vec<(QueryId, i64)> = gather
        .watermarks
        .iter()
        .copied()
        .filter(|(id, _)| router.has_timers(*id))
        .collect();
    let Gather {
        deliveries,
        positions,
        ..
    } = gather;
    let mut unqueued: Vec<(usize, Position)> = Vec::new();
    for (shard, (deliveries, positions)) in deliveries.into_iter().zip(positions).enumerate() {
        if deliveries.is_empty() && timed.is_empty() {
            continue;
        }
        let msg = ShardMsg::Batch {
            deliveries,
            watermarks: timed.clone(),
            now,
            received,
        };
        if state.pipeline.send(shard, msg).await.is_err() {
            unqueued.extend(positions.into_iter().map(|p| (shard, p)));
        }
    }
    router.settle_at(id, &routed, now);
    drop(router);
    unqueued.sort_by_key(|(_, p)| p.index);
    unqueued.dedup_by_key(|(_, p)| p.index);
    (routed, unqueued)
}

/// Options of an ingest connection, from its query string.
pub struct IngestParams {
    pub stream: Option<String>,
    pub ack: bool,
    /// An idempotent producer's id and the number of this connection's first frame.
    pub first_frame: Option<FrameId>,
}

/// Serves one producer's WebSocket: each message is ingested before the next is read.
pub async fn websocket(
    state: Arc<State>,
    upgrade: UpgradeFut,
    params: IngestParams,
    mut source: Source,
) {
    let Ok(ws) = upgrade.await else {
        source.close(&state).await;
        return;
    };
    let _conn = state.metrics.connection("ingest");
    let mut conn = ws::open(
        ws.into_inner(),
        state.config.max_frame_bytes,
        state.config.ping_interval,
        ws::NoSource,
    );
    let counters = state
        .metrics
        .stream(params.stream.as_deref().unwrap_or("-"));
    let mut shutdown = state.shutdown.subscribe();
    // Answers go out in order from their own task, each once its frame is durable, while this
    // loop routes the next frames.
    let (answers, mut pending) = tokio::sync::mpsc::channel::<(u64, Pending)>(MAX_UNANSWERED);
    let answerer = {
        let state = Arc::clone(&state);
        let out = conn.out.clone();
        let ack = params.ack;
        tokio::spawn(async move {
            let mut limiter = ErrorLimiter::default();
            while let Some((frame_no, frame)) = pending.recv().await {
                let outcome = frame.durable(&state).await;
                let messages = if ack {
                    vec![json::message("ack", |o| {
                        o.int("frame", frame_no as i64);
                        outcome.write_fields(o);
                    })]
                } else if outcome.rejected > 0 {
                    limiter.messages(frame_no, &outcome)
                } else {
                    Vec::new()
                };
                for message in messages {
                    if out.send(Outbound::Text(message.into())).await.is_err() {
                        return;
                    }
                }
            }
        })
    };
    let mut frame_no: u64 = params.first_frame.as_ref().map_or(0, |id| id.frame);
    let mut shutting_down = false;
    loop {
        let message = tokio::select! {
            message = conn.inbox.next() => message,
            _ = shutdown.changed() => {
                shutting_down = true;
                None
            }
        };
        let Some(message) = message else { break };
        let id = params.first_frame.as_ref().map(|id| FrameId {
            producer: Arc::clone(&id.producer),
            frame: frame_no,
        });
        let routed = route_input(
            &state,
            &mut source,
            message.payload,
            params.stream.as_deref(),
            &counters,
            id.as_ref(),
        )
        .await;
        if answers.send((frame_no, routed)).await.is_err() {
            break;
        }
        frame_no = frame_no.saturating_add(1);
    }
    // Every frame routed is answered before the close.
    drop(answers);
    let _ = answerer.await;
    if shutting_down {
        conn.inbox
            .close(ws::close::GOING_AWAY, "server shutting down")
            .await;
    }
    conn.finish().await;
    source.close(&state).await;
}

/// Frames of one connection routed and waiting for the log before they are answered; past this
/// the connection stops reading.
const MAX_UNANSWERED: usize = 256;

/// Rate limit for unsolicited error messages: ten a second, the rest counted and summarised.
#[derive(Default)]
struct ErrorLimiter {
    window: Option<Instant>,
    sent: u32,
    suppressed: u64,
}

impl ErrorLimiter {
    const PER_SECOND: u32 = 10;

    fn messages(&mut self, frame_no: u64, outcome: &Outcome) -> Vec<Vec<u8>> {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.sent = 0;
        }
        let mut out = Vec::new();
        if self.suppressed > 0 && self.sent < Self::PER_SECOND {
            out.push(json::message("error", |o| {
                let text = format!("{} more rejected events were not reported", self.suppressed);
                o.str("error", &text);
            }));
            self.sent += 1;
            self.suppressed = 0;
        }
        for (index, error) in &outcome.errors {
            if self.sent >= Self::PER_SECOND {
                self.suppressed += 1;
                continue;
            }
            out.push(json::message("error", |o| {
                o.int("frame", frame_no as i64)
                    .int("index", i64::from(*index))
                    .str("error", error);
            }));
            self.sent += 1;
        }
        self.suppressed += outcome.rejected.saturating_sub(outcome.errors.len() as u64);
        out
    }
}
