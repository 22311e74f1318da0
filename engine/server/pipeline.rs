//! The shard threads and the channels that feed them.
//!
//! Each shard is a named OS thread that owns a [`Shard`] (its Rhai engine, compiled queries, key
//! states and timers). It is fed by one bounded crossbeam channel of [`ShardMsg`]; per-key order
//! is the order messages enter that channel. A shard takes everything waiting, handles it, and
//! passes what its queries emitted to the fan-out hub in one message: under light load that is one
//! event, under heavy load hundreds, and no stage waits on a clock.
//!
//! When a shard's channel is full, [`Pipeline::send`] waits (asynchronously: it never blocks a
//! tokio worker) until the shard signals room, so an ingest connection stops reading and TCP slows
//! the producer. The hub's channel is bounded too: a shard blocks on it, which in turn fills the
//! shard's own channel. Nothing is dropped on this path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use hdrhistogram::Histogram;
use tokio::sync::{oneshot, Notify};

use crate::query::{QueryDef, QueryError};
use crate::router::Delivery;
use crate::sandbox::Limits;
use crate::shard::{QueryId, QueryStats, Shard};

use super::hub::HubMsg;

/// What a shard is asked to do.
pub enum ShardMsg {
    /// The events of one frame that belong to this shard, and the watermarks the frame raised.
    Batch {
        deliveries: Vec<Delivery>,
        watermarks: Vec<(QueryId, i64)>,
        /// Late items of keys this shard owns, published in order with the shard's own.
        late: Vec<crate::Emitted>,
        now: i64,
        received: Instant,
    },
    Deploy {
        id: QueryId,
        def: Arc<QueryDef>,
        done: oneshot::Sender<Result<(), QueryError>>,
    },
    Remove {
        id: QueryId,
        done: oneshot::Sender<()>,
    },
    Report {
        reply: oneshot::Sender<ShardReport>,
    },
    /// Replies once everything before it was handled and its output handed to the hub.
    Flush {
        done: oneshot::Sender<()>,
    },
}

/// A shard's counters, for `/metrics` and `GET /queries`.
pub struct ShardReport {
    pub queries: Vec<(QueryId, QueryStats, Option<Histogram<u64>>)>,
    /// Ingest (frame received) to emit (output handed to the hub), µs, per event.
    pub ingest_to_emit_us: Histogram<u64>,
    pub queue_depth: usize,
}

impl ShardReport {
    /// A query's counters and call-time histogram, added up over every shard's report.
    pub fn totals(reports: &[ShardReport], id: QueryId) -> (QueryStats, Histogram<u64>) {
        let mut stats = QueryStats::default();
        let mut eval = crate::shard::latency_histogram();
        for (_, s, hist) in reports
            .iter()
            .flat_map(|r| &r.queries)
            .filter(|(q, ..)| *q == id)
        {
            stats += *s;
            if let Some(h) = hist {
                let _ = eval.add(h);
            }
        }
        (stats, eval)
    }
}

/// Handles to the shard threads.
pub struct Pipeline {
    senders: Vec<Sender<ShardMsg>>,
    rooms: Vec<Arc<Notify>>,
}

/// The shard has stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the shard has stopped")]
pub struct Stopped;

/// Most messages a shard handles before it hands its output on.
const MAX_BATCH: usize = 256;

/// Stack of a shard thread: Rhai recursion (bounded by max_call_levels) runs on it.
const SHARD_STACK_BYTES: usize = 64 << 20;

impl Pipeline {
    /// Starts `shards` shard threads, each sending its output to `hub`.
    pub fn start(shards: usize, queue: usize, limits: &Limits, hub: Sender<HubMsg>) -> Pipeline {
        let mut senders = Vec::new();
        let mut rooms = Vec::new();
        for index in 0..shards {
            let (tx, rx) = crossbeam_channel::bounded(queue);
            let room = Arc::new(Notify::new());
            let thread_room = Arc::clone(&room);
            let limits = limits.clone();
            let hub = hub.clone();
            // The thread ends when every sender is dropped, after what is queued.
            std::thread::Builder::new()
                .name(format!("eddy-shard-{index}"))
                .stack_size(SHARD_STACK_BYTES)
                .spawn(move || run_shard(&limits, &rx, &hub, &thread_room))
                .expect("spawn shard thread");
            senders.push(tx);
            rooms.push(room);
        }
        Pipeline { senders, rooms }
    }

    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// Messages waiting for shard `i`.
    pub fn queue_depth(&self, i: usize) -> usize {
        self.senders[i].len()
    }

    /// Sends `msg` to shard `shard`, waiting (without blocking the thread) while its queue is
    /// full.
    pub async fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), Stopped> {
        let tx = &self.senders[shard];
        let mut msg = msg;
        loop {
            match tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(Stopped),
                Err(TrySendError::Full(back)) => {
                    msg = back;
                    let room = self.rooms[shard].notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if tx.is_full() {
                        // The timeout only guards against a lost wake-up; normally the shard's
                        // signal comes first.
                        let _ = tokio::time::timeout(Duration::from_millis(50), room).await;
                    }
                }
            }
        }
    }

    /// Every shard's report (none when the shards have stopped).
    pub async fn reports(&self) -> Vec<ShardReport> {
        self.ask_all(|reply| ShardMsg::Report { reply })
            .await
            .unwrap_or_default()
    }

    /// Sends `make()` to every shard and waits for every answer.
    pub async fn ask_all<T>(
        &self,
        make: impl Fn(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<Vec<T>, Stopped> {
        let mut replies = Vec::new();
        for shard in 0..self.shards() {
            let (tx, rx) = oneshot::channel();
            self.send(shard, make(tx)).await?;
            replies.push(rx);
        }
        let mut out = Vec::new();
        for rx in replies {
            out.push(rx.await.map_err(|_| Stopped)?);
        }
        Ok(out)
    }
}

fn run_shard(limits: &Limits, rx: &Receiver<ShardMsg>, hub: &Sender<HubMsg>, room: &Notify) {
    let mut shard = Shard::new(limits);
    shard.measure_calls(true);
    let mut ids: Vec<QueryId> = Vec::new();
    let mut out = Vec::new();
    let mut latency = crate::shard::latency_histogram();
    // Frames handled since the output was last handed on: when each arrived, and its events.
    let mut received: Vec<(Instant, u64)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(msg) = next.take() {
            handled += 1;
            match msg {
                ShardMsg::Batch {
                    deliveries,
                    watermarks,
                    late,
                    now,
                    received: at,
                } => {
                    received.push((at, deliveries.len() as u64));
                    for item in late {
                        shard.publish(item);
                    }
                    for (query, watermark) in watermarks {
                        shard.advance(query, watermark, now);
                    }
                    for d in deliveries {
                        shard.event(d.query, d.key, d.event, d.watermark, d.now);
                    }
                }
                control => {
                    hand_on(&mut shard, &mut out, &mut received, &mut latency, hub);
                    control_msg(&mut shard, &mut ids, control, rx.len(), &latency);
                }
            }
            if handled < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        room.notify_waiters();
        hand_on(&mut shard, &mut out, &mut received, &mut latency, hub);
    }
}

/// Passes everything emitted so far to the hub, and records how long its frames took.
fn hand_on(
    shard: &mut Shard,
    out: &mut Vec<crate::Emitted>,
    received: &mut Vec<(Instant, u64)>,
    latency: &mut Histogram<u64>,
    hub: &Sender<HubMsg>,
) {
    shard.take_output(out);
    let now = Instant::now();
    let oldest = received.iter().map(|(at, _)| *at).min();
    for (at, events) in received.drain(..) {
        let us = now.duration_since(at).as_micros() as u64;
        latency.saturating_record_n(us, events);
    }
    if !out.is_empty() {
        let items = std::mem::take(out);
        // Blocks while the hub is full: backpressure, not loss.
        let _ = hub.send(HubMsg::Items {
            items,
            ingest: oldest,
        });
    }
}

fn control_msg(
    shard: &mut Shard,
    ids: &mut Vec<QueryId>,
    msg: ShardMsg,
    queue_depth: usize,
    latency: &Histogram<u64>,
) {
    match msg {
        ShardMsg::Batch { .. } => unreachable!("batches are handled by the caller"),
        ShardMsg::Deploy { id, def, done } => {
            let result = shard.deploy(id, def);
            if result.is_ok() {
                ids.push(id);
            }
            let _ = done.send(result);
        }
        ShardMsg::Remove { id, done } => {
            shard.remove(id);
            ids.retain(|&q| q != id);
            let _ = done.send(());
        }
        ShardMsg::Report { reply } => {
            let queries = ids
                .iter()
                .filter_map(|&id| {
                    let stats = shard.stats(id)?;
                    Some((id, stats, shard.eval_histogram(id).cloned()))
                })
                .collect();
            let _ = reply.send(ShardReport {
                queries,
                ingest_to_emit_us: latency.clone(),
                queue_depth,
            });
        }
        ShardMsg::Flush { done } => {
            let _ = done.send(());
        }
    }
}
