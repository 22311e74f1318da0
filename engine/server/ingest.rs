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

use crate::event::{Parser, Position, RejectKind, Rejection};
use crate::json::{self, Object};
use crate::router::{Clock, Delivery, RouteSink, SourceId, Unnamed};
use crate::shard::QueryId;

use super::metrics::StreamCounters;
use super::pipeline::ShardMsg;
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
const MAX_LISTED_ERRORS: usize = 10;

/// What one input came to.
pub struct Outcome {
    pub accepted: u64,
    pub rejected: u64,
    /// `(index, reason)` of the first rejected items.
    pub errors: Vec<(u32, String)>,
    /// The input held items, and none of them was JSON.
    pub nothing_was_json: bool,
}

impl Outcome {
    /// `{"accepted":A,"rejected":R,"errors":[{"index":I,"error":E}…]}`, into an object whose
    /// first fields are already written.
    pub fn write_fields(&self, object: &mut Object<'_>) {
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
    pub fn open(&self, state: &State, stream: &str) {
        let wall = crate::router::wall_ms();
        let router = state.router.load();
        for q in router.queries() {
            if q.def.config.sources.iter().any(|s| s == stream) {
                q.source_opened(self.id, wall);
            }
        }
    }

    /// The source has gone: it no longer holds its queries' marks back, and the shards hear of
    /// their marks (which may also have risen when sources settled at the same moment).
    pub async fn close(self, state: &State) {
        let router = state.router.load_full();
        let rose: Vec<(QueryId, i64)> = router
            .queries()
            .iter()
            .filter(|q| q.def.functions.on_timer && q.source_closed(self.id))
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
}

/// Parses, routes and queues one input. Returns once every event is queued for its shard.
pub async fn ingest(
    state: &State,
    source: &mut Source,
    input: Vec<u8>,
    stream: Option<&str>,
    counters: &StreamCounters,
) -> Outcome {
    let received = Instant::now();
    let worst = input.capacity()
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
    // Held until every message is queued (see the module documentation).
    let router = state.router.load_full();
    let shards = state.pipeline.shards();
    let mut gather = Gather {
        deliveries: (0..shards).map(|_| Vec::new()).collect(),
        positions: (0..shards).map(|_| Vec::new()).collect(),
        watermarks: Vec::new(),
        rejections: &mut rejections,
    };
    let now = crate::router::wall_ms();
    let mut routed = router.route(
        &parsed.frame,
        source.id,
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
        .filter(|(id, _)| {
            router
                .queries()
                .iter()
                .any(|q| q.id == *id && q.def.functions.on_timer)
        })
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
    router.settle(source.id, &routed);
    drop(router);
    unqueued.sort_by_key(|(_, p)| p.index);
    unqueued.dedup_by_key(|(_, p)| p.index);
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
    Outcome {
        accepted: routed.accepted,
        rejected: rejections.len() as u64,
        errors: rejections
            .iter()
            .take(MAX_LISTED_ERRORS)
            .map(|r| (r.position.index, r.reason.clone()))
            .collect(),
        nothing_was_json,
    }
}

/// Options of an ingest connection, from its query string.
pub struct IngestParams {
    pub stream: Option<String>,
    pub ack: bool,
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
    let mut frame_no: u64 = 0;
    let mut limiter = ErrorLimiter::default();
    loop {
        let message = tokio::select! {
            message = conn.inbox.next() => message,
            _ = shutdown.changed() => {
                conn.inbox.close(ws::close::GOING_AWAY, "server shutting down").await;
                None
            }
        };
        let Some(message) = message else { break };
        let outcome = ingest(
            &state,
            &mut source,
            message.payload,
            params.stream.as_deref(),
            &counters,
        )
        .await;
        let answers = if params.ack {
            vec![json::message("ack", |o| {
                o.int("frame", frame_no as i64);
                outcome.write_fields(o);
            })]
        } else if outcome.rejected > 0 {
            limiter.messages(frame_no, &outcome)
        } else {
            Vec::new()
        };
        for answer in answers {
            if conn.out.send(Outbound::Text(answer.into())).await.is_err() {
                break;
            }
        }
        frame_no += 1;
    }
    conn.finish().await;
    source.close(&state).await;
}

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
