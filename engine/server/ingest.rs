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
//! With `ack=true` every frame is answered with its counts and up to ten errors; otherwise
//! rejected events are reported as `error` messages, at most ten a second per connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{upgrade::UpgradeFut, OpCode, WebSocketError};
use tokio::sync::mpsc;

use crate::event::{Parser, Position, RejectKind, Rejection};
use crate::json::{write_int, write_str};
use crate::router::{Clock, Delivery, RouteSink, SourceId, Unnamed};
use crate::shard::QueryId;

use super::metrics::StreamCounters;
use super::pipeline::ShardMsg;
use super::ws::{self, Outbound};
use super::State;

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
    /// `{"accepted":A,"rejected":R,"errors":[{"index":I,"error":E}…]}`, with `prefix` fields first.
    pub fn write_json(&self, prefix: &[u8], out: &mut Vec<u8>) {
        out.push(b'{');
        out.extend_from_slice(prefix);
        out.extend_from_slice(b"\"accepted\":");
        write_int(out, self.accepted as i64);
        out.extend_from_slice(b",\"rejected\":");
        write_int(out, self.rejected as i64);
        out.extend_from_slice(b",\"errors\":[");
        for (i, (index, error)) in self.errors.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            write_int(out, i64::from(*index));
            out.extend_from_slice(b",\"error\":");
            write_str(out, error);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
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
    let parsed = source.parser.parse(input);
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

/// Serves one producer's WebSocket.
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
    let (mut read, write) = ws::split(ws, state.config.max_frame_bytes);
    let (tx, rx) = mpsc::channel::<Outbound>(64);
    let liveness = ws::Liveness::default();
    liveness.heard();
    let writer = tokio::spawn(ws::run_writer(
        write,
        rx,
        liveness.clone(),
        state.config.ping_interval,
    ));
    let counters = state
        .metrics
        .stream(params.stream.as_deref().unwrap_or("-"));
    let mut shutdown = state.shutdown.subscribe();
    let mut frame_no: u64 = 0;
    let mut limiter = ErrorLimiter::default();
    loop {
        let obliged = tx.clone();
        let mut send_fn = move |frame| {
            let obliged = obliged.clone();
            let msg = ws::obligated(frame);
            async move {
                obliged
                    .send(msg)
                    .await
                    .map_err(|_| WebSocketError::ConnectionClosed)
            }
        };
        let frame = tokio::select! {
            frame = read.read_frame(&mut send_fn) => frame,
            _ = shutdown.changed() => {
                let _ = tx.send(Outbound::Close(ws::close::GOING_AWAY, "server shutting down")).await;
                drain_until_closed(&mut read, &tx).await;
                break;
            }
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                if let Some((code, reason)) = ws::close_for(&e) {
                    let _ = tx.send(Outbound::Close(code, reason)).await;
                }
                break;
            }
        };
        liveness.heard();
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                let input = frame.payload.to_vec();
                let outcome = ingest(
                    &state,
                    &mut source,
                    input,
                    params.stream.as_deref(),
                    &counters,
                )
                .await;
                if params.ack {
                    let mut msg = Vec::with_capacity(96);
                    let mut prefix = b"\"type\":\"ack\",\"frame\":".to_vec();
                    write_int(&mut prefix, frame_no as i64);
                    prefix.push(b',');
                    outcome.write_json(&prefix, &mut msg);
                    if tx.send(Outbound::Text(msg.into())).await.is_err() {
                        break;
                    }
                } else if outcome.rejected > 0 {
                    for msg in limiter.messages(frame_no, &outcome) {
                        if tx.send(Outbound::Text(msg.into())).await.is_err() {
                            break;
                        }
                    }
                }
                frame_no += 1;
            }
            OpCode::Close => break,
            _ => {}
        }
    }
    drop(tx);
    let _ = writer.await;
    source.close(&state).await;
}

/// After the server's close: reads and discards what the producer still sends (unacknowledged,
/// so not accepted) until its close, EOF or [`CLOSE_WAIT`]. Closing the socket with unread data
/// would reset the connection, and the producer could lose the close frame and the last acks.
async fn drain_until_closed(read: &mut ws::WsRead, tx: &mpsc::Sender<Outbound>) {
    let drain = async {
        loop {
            let obliged = tx.clone();
            let mut send_fn = move |frame| {
                let obliged = obliged.clone();
                let msg = ws::obligated(frame);
                async move {
                    // The close is already sent: nothing more goes out.
                    drop((obliged, msg));
                    Ok::<_, WebSocketError>(())
                }
            };
            match read.read_frame(&mut send_fn).await {
                Ok(frame) if frame.opcode == OpCode::Close => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}

/// How long a closing producer is read from, waiting for its close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

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
            let mut msg = b"{\"type\":\"error\",\"error\":\"".to_vec();
            msg.extend_from_slice(
                format!("{} more rejected events were not reported", self.suppressed).as_bytes(),
            );
            msg.extend_from_slice(b"\"}");
            out.push(msg);
            self.sent += 1;
            self.suppressed = 0;
        }
        for (index, error) in &outcome.errors {
            if self.sent >= Self::PER_SECOND {
                self.suppressed += 1;
                continue;
            }
            let mut msg = b"{\"type\":\"error\",\"frame\":".to_vec();
            write_int(&mut msg, frame_no as i64);
            msg.extend_from_slice(b",\"index\":");
            write_int(&mut msg, i64::from(*index));
            msg.extend_from_slice(b",\"error\":");
            write_str(&mut msg, error);
            msg.push(b'}');
            out.push(msg);
            self.sent += 1;
        }
        self.suppressed += outcome.rejected.saturating_sub(outcome.errors.len() as u64);
        out
    }
}
