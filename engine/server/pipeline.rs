//! The shard threads and the channels that feed them.
//!
//! Each shard is a named OS thread that owns a [`Shard`] (its Rhai engine, compiled queries, key
//! states, timers and the event time of its queries). It is fed by two bounded crossbeam
//! channels:
//! - the data channel ([`ShardMsg`]): batches of deliveries, retirements of replaced versions and
//!   flushes, in order. Per-key order is the order batches enter it, and a retirement queued after
//!   a version's last events is handled after them, so a replace loses no acknowledged event.
//! - the control channel ([`Control`]): deploys and removals. It is looked at before every data
//!   message and between the events of a batch, so the control plane never waits behind a busy
//!   shard for more than one script call.
//!
//! A shard takes everything waiting, handles it, and publishes what its queries emitted through
//! the hub straight into the subscribers' mailboxes, on its own thread, in one call: under light
//! load that is one event, under heavy load hundreds, and no stage waits on a clock. It publishes its counters ([`ShardReport`]) at most every
//! [`PUBLISH_EVERY`], and within that time of its last work once idle, so `/metrics` and
//! `GET /queries` read them without asking the shard (copying the histograms costs too much to do
//! after every pass).
//!
//! When a shard's data channel is full, [`Pipeline::send`] waits (asynchronously: it never blocks
//! a tokio worker) until the shard signals room, so an ingest connection stops reading and TCP
//! slows the producer. A shard that publishes waits while another holds the hub, which in turn
//! fills the shard's own channel. Nothing is dropped on this path.
//!
//! Supervision: a panic while a shard handles one message is caught, logged and counted
//! (`eddy_panics_total`); that message's work is lost and the shard goes on with its state. If
//! the thread ends anyway, its liveness flag drops, `/healthz` answers 503, and ingest rejects
//! the events bound for it instead of acknowledging them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use hdrhistogram::Histogram;
use tokio::sync::{oneshot, Notify};

use crate::durable::ShardQueryCheckpoint;
use crate::query::{QueryDef, QueryError};
use crate::sandbox::Limits;
use crate::shard::{CpuBudget, Delivery, QueryControl, QueryId, QueryStats, Shard};

use super::hub::{HubHandle, ShardCount};

/// Where the shards' output goes.
#[derive(Clone)]
pub enum Output {
    /// Published into the local hub, on the shard's thread (alone).
    Hub(HubHandle),
    /// Handed to the cluster's forwarder, which publishes it on NATS for every node's hub
    /// (`--cluster`).
    Forward(Sender<Forwarded>),
}

/// What a shard hands the cluster's forwarder, in the order it produced it.
pub enum Forwarded {
    Items {
        shard: usize,
        items: Vec<crate::Emitted>,
        /// When the oldest frame among those that produced the items was received.
        ingest: Option<Instant>,
    },
    /// A checkpoint's place in the shard's output (answered once what came before is handed on).
    Mark {
        shard: usize,
        reply: oneshot::Sender<Vec<ShardCount>>,
    },
}

impl Output {
    /// Hands `items` on: into the mailboxes (waiting while another shard publishes), or to the
    /// forwarder (waiting while its queue is full). Backpressure either way, not loss. What the
    /// hub leaves in `items` (their values' buffers) is the shard's to reuse.
    fn items(&self, shard: usize, items: &mut Vec<crate::Emitted>, ingest: Option<Instant>) {
        match self {
            Output::Hub(hub) => hub.items(shard, items, ingest),
            Output::Forward(tx) => {
                let _ = tx.send(Forwarded::Items {
                    shard,
                    items: std::mem::take(items),
                    ingest,
                });
            }
        }
    }

    /// Answers `reply` with the counts a checkpoint's mark covers, after what came before it.
    fn mark(&self, shard: usize, reply: oneshot::Sender<Vec<ShardCount>>) {
        match self {
            Output::Hub(hub) => {
                let _ = reply.send(hub.mark(shard));
            }
            Output::Forward(tx) => {
                let _ = tx.send(Forwarded::Mark { shard, reply });
            }
        }
    }
}

/// Work for a shard, handled in the order it was sent.
pub enum ShardMsg {
    /// The events of one frame that belong to this shard, then the marks the frame reached.
    Batch {
        deliveries: Vec<Delivery>,
        watermarks: Vec<(QueryId, i64)>,
        now: i64,
        received: Instant,
    },
    /// A replaced version goes, after every event routed to it.
    Retire { id: QueryId },
    /// Replies once everything before it was handled and its output handed to the hub.
    Flush { done: oneshot::Sender<()> },
    /// Replies with a copy of the state of queries `ids` as everything before it left it (see
    /// [`crate::durable`]).
    /// The shard also hands `hub_mark` to the hub after its output so far, for the topic
    /// positions the copy covers.
    Checkpoint {
        ids: Vec<QueryId>,
        done: oneshot::Sender<(Vec<(QueryId, ShardQueryCheckpoint)>, Duration)>,
        hub_mark: oneshot::Sender<Vec<ShardCount>>,
    },
    /// Replaces the script of query `id` keeping its state: the shard prepares (compiles,
    /// migrates), answers on `ready`, and waits for `commit` (true) or abort before it goes on,
    /// so that every shard switches at the same point of its queue or none does.
    Replace {
        id: QueryId,
        def: Arc<QueryDef>,
        ready: oneshot::Sender<Result<usize, String>>,
        commit: std::sync::mpsc::Receiver<bool>,
    },
    /// Puts back the state a checkpoint held of query `id` on this shard.
    Restore {
        id: QueryId,
        data: ShardQueryCheckpoint,
    },
    /// Cluster mode: drops the state of every key in partition `partition` of `partitions`
    /// (handed over to another node), then replies.
    DropPartition {
        partitions: usize,
        partition: usize,
        done: oneshot::Sender<()>,
    },
}

impl ShardMsg {
    /// What the message holds in memory, for `shard_queue`: its deliveries and marks (the
    /// frames they point into count toward `max_ingest_bytes_in_flight`).
    pub fn bytes(&self) -> usize {
        let own = std::mem::size_of::<ShardMsg>();
        match self {
            ShardMsg::Batch {
                deliveries,
                watermarks,
                ..
            } => {
                own + deliveries.len() * std::mem::size_of::<Delivery>()
                    + watermarks.len() * std::mem::size_of::<(QueryId, i64)>()
            }
            _ => own,
        }
    }
}

/// Control requests, handled ahead of queued work.
pub enum Control {
    Deploy {
        id: QueryId,
        def: Arc<QueryDef>,
        control: Arc<QueryControl>,
        done: oneshot::Sender<Result<(), QueryError>>,
    },
    /// Drops a deployment at once, with its state (events still queued for it are skipped).
    Remove {
        id: QueryId,
        done: oneshot::Sender<()>,
    },
    /// Gives the memory freed elsewhere back to the system: what the shard's thread allocated
    /// for the hub (a removed query's latest values and replay chunks, published on this
    /// thread) and another thread freed waits for this thread to collect it.
    Collect { done: oneshot::Sender<()> },
    /// Panics inside the shard, to test supervision.
    #[cfg(test)]
    Panic,
}

/// A shard's counters, for `/metrics` and `GET /queries`.
#[derive(Clone)]
pub struct ShardReport {
    pub queries: Vec<(QueryId, QueryStats, Option<Histogram<u64>>)>,
    /// Ingest (frame received) to emit (output handed to the hub), µs, per event.
    pub ingest_to_emit_us: Histogram<u64>,
}

impl Default for ShardReport {
    fn default() -> Self {
        ShardReport {
            queries: Vec::new(),
            ingest_to_emit_us: crate::shard::latency_histogram(),
        }
    }
}

impl ShardReport {
    /// A query's counters and call-time histogram, added up over every shard's report.
    pub fn totals(reports: &[Arc<ShardReport>], id: QueryId) -> (QueryStats, Histogram<u64>) {
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

/// What the rest of the server sees of one shard thread.
struct ShardHandle {
    data: Sender<ShardMsg>,
    control: Sender<Control>,
    room: Arc<Notify>,
    /// Bytes of the messages waiting (see [`ShardMsg::bytes`]).
    queued: Arc<AtomicUsize>,
    report: Arc<ArcSwap<ShardReport>>,
    alive: Arc<AtomicBool>,
}

/// Handles to the shard threads.
pub struct Pipeline {
    shards: Vec<ShardHandle>,
    panics: Arc<AtomicU64>,
    /// Bytes of messages that may wait for one shard (`shard_queue`).
    queue_bytes: usize,
}

/// The shard has stopped (the server is shutting down, or the thread died).
#[derive(Debug, thiserror::Error)]
#[error("the shard has stopped")]
pub struct Stopped;

/// Most messages a shard handles before it hands its output on.
const MAX_BATCH: usize = 256;

/// Stack of a shard thread: Rhai recursion (bounded by max_call_levels) runs on it.
const SHARD_STACK_BYTES: usize = 64 << 20;

/// Control requests waiting for one shard.
const CONTROL_QUEUE: usize = 64;

/// How long a shard waits for the decision on a replace it prepared before it gives it up.
pub const REPLACE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a busy shard publishes its counters.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// How each shard runs its queries.
#[derive(Clone, Debug)]
pub struct ShardSettings {
    pub limits: Limits,
    pub budget: Option<CpuBudget>,
    pub engine: crate::compiled::EngineMode,
}

impl Pipeline {
    /// Starts `shards` shard threads whose data channels hold up to `queue_bytes` of messages
    /// each (one message always fits), each handing its output to `output`.
    pub fn start(
        shards: usize,
        queue_bytes: usize,
        settings: &ShardSettings,
        output: &Output,
    ) -> Pipeline {
        let panics = Arc::new(AtomicU64::new(0));
        let shards = (0..shards)
            .map(|index| {
                // Bounded in bytes by `send`, not in messages.
                let (data, data_rx) = crossbeam_channel::unbounded();
                let (control, control_rx) = crossbeam_channel::bounded(CONTROL_QUEUE);
                let (alive, flag) = super::supervise::Alive::new();
                let handle = ShardHandle {
                    data,
                    control,
                    room: Arc::new(Notify::new()),
                    queued: Arc::default(),
                    report: Arc::default(),
                    alive: flag,
                };
                let thread = ShardThread {
                    index,
                    name: format!("shard {index}"),
                    data: data_rx,
                    control: control_rx,
                    output: output.clone(),
                    room: Arc::clone(&handle.room),
                    queued: Arc::clone(&handle.queued),
                    report: Arc::clone(&handle.report),
                    panics: Arc::clone(&panics),
                };
                let settings = settings.clone();
                // The thread ends when every sender is dropped, after what is queued.
                std::thread::Builder::new()
                    .name(format!("eddy-shard-{index}"))
                    .stack_size(SHARD_STACK_BYTES)
                    .spawn(move || {
                        let _alive = alive;
                        thread.run(&settings);
                    })
                    .expect("spawn shard thread");
                handle
            })
            .collect();
        Pipeline {
            shards,
            panics,
            queue_bytes,
        }
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Messages waiting for shard `i`.
    pub fn queue_depth(&self, i: usize) -> usize {
        self.shards[i].data.len()
    }

    /// Bytes of the messages waiting for shard `i`.
    pub fn queue_bytes(&self, i: usize) -> usize {
        self.shards[i].queued.load(Ordering::Relaxed)
    }

    /// Whether shard `i`'s thread is running.
    pub fn is_alive(&self, i: usize) -> bool {
        self.shards[i].alive.load(Ordering::Relaxed)
    }

    /// Panics caught in shard threads since start.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Sends `msg` to shard `shard`, waiting (without blocking the thread) while the messages
    /// already waiting for it hold `shard_queue` bytes (a message always goes into an empty
    /// queue, whatever its size).
    pub async fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), Stopped> {
        let handle = &self.shards[shard];
        let bytes = msg.bytes();
        let fits = || {
            let queued = handle.queued.load(Ordering::Acquire);
            queued == 0 || queued + bytes <= self.queue_bytes
        };
        while !fits() {
            if !self.is_alive(shard) {
                return Err(Stopped);
            }
            let room = handle.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if !fits() {
                // The timeout only guards against a lost wake-up; normally the shard's signal
                // comes first.
                let _ = tokio::time::timeout(Duration::from_millis(50), room).await;
            }
        }
        handle.queued.fetch_add(bytes, Ordering::AcqRel);
        match handle.data.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_) | TrySendError::Full(_)) => {
                handle.queued.fetch_sub(bytes, Ordering::AcqRel);
                Err(Stopped)
            }
        }
    }

    /// Every shard's latest published counters; never waits for a shard.
    pub fn reports(&self) -> Vec<Arc<ShardReport>> {
        self.shards.iter().map(|s| s.report.load_full()).collect()
    }

    /// Sends `make()` to every shard's data channel, after what is queued, and waits for every
    /// answer.
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
        collect(replies).await
    }

    /// Sends `make()` to every shard's control channel, ahead of queued work, and waits for
    /// every answer.
    pub async fn control_all<T>(
        &self,
        make: impl Fn(oneshot::Sender<T>) -> Control,
    ) -> Result<Vec<T>, Stopped> {
        let mut replies = Vec::new();
        for shard in &self.shards {
            let (tx, rx) = oneshot::channel();
            let mut msg = make(tx);
            loop {
                match shard.control.try_send(msg) {
                    Ok(()) => break,
                    Err(TrySendError::Disconnected(_)) => return Err(Stopped),
                    Err(TrySendError::Full(back)) => {
                        msg = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            replies.push(rx);
        }
        collect(replies).await
    }
}

async fn collect<T>(replies: Vec<oneshot::Receiver<T>>) -> Result<Vec<T>, Stopped> {
    let mut out = Vec::new();
    for rx in replies {
        out.push(rx.await.map_err(|_| Stopped)?);
    }
    Ok(out)
}

/// What one shard thread holds besides its [`Shard`].
struct ShardThread {
    index: usize,
    /// `shard N`, for the log.
    name: String,
    data: Receiver<ShardMsg>,
    control: Receiver<Control>,
    output: Output,
    room: Arc<Notify>,
    queued: Arc<AtomicUsize>,
    report: Arc<ArcSwap<ShardReport>>,
    panics: Arc<AtomicU64>,
}

/// The state of a shard thread between messages.
struct Running {
    shard: Shard,
    ids: Vec<QueryId>,
    out: Vec<crate::Emitted>,
    latency: Histogram<u64>,
    /// Frames handled since the output was last handed on: when each arrived, and its events.
    received: Vec<(Instant, u64)>,
    published: Instant,
    /// A checkpoint's copy in progress: the longest the shard stopped for it so far, and where
    /// the copy goes once complete.
    export: Option<(Duration, ExportReply)>,
}

type ExportReply = oneshot::Sender<(Vec<(QueryId, ShardQueryCheckpoint)>, Duration)>;

/// Keys a shard copies for a checkpoint in one step between messages (about a millisecond).
const EXPORT_STEP_KEYS: usize = 500;

impl ShardThread {
    fn run(&self, settings: &ShardSettings) {
        let mut shard = Shard::new(&settings.limits);
        shard.measure_calls(true);
        shard.set_cpu_budget(settings.budget);
        shard.set_engine(settings.engine);
        let mut st = Running {
            shard,
            ids: Vec::new(),
            out: Vec::new(),
            latency: crate::shard::latency_histogram(),
            received: Vec::new(),
            published: Instant::now(),
            export: None,
        };
        // Whether counters changed since they were last published.
        let mut dirty = false;
        loop {
            // Counters go out at most every PUBLISH_EVERY, and within PUBLISH_EVERY of the last
            // change once the shard is idle.
            let wait = if st.export.is_some() {
                Duration::ZERO
            } else if dirty {
                PUBLISH_EVERY.saturating_sub(st.published.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            let first = crossbeam_channel::select_biased! {
                recv(self.control) -> msg => match msg {
                    Ok(msg) => {
                        self.guarded(|| self.control_msg(&mut st, msg));
                        continue;
                    }
                    // The control side is gone: finish what is queued, then stop.
                    Err(_) => match self.data.recv() {
                        Ok(msg) => msg,
                        Err(_) => break,
                    },
                },
                recv(self.data) -> msg => match msg {
                    Ok(msg) => msg,
                    Err(_) => break,
                },
                default(wait) => {
                    if st.export.is_some() {
                        self.guarded(|| self.export_step(&mut st));
                        continue;
                    }
                    self.publish(&mut st);
                    dirty = false;
                    continue;
                },
            };
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(msg) = next.take() {
                handled += 1;
                let bytes = msg.bytes();
                self.guarded(|| self.data_msg(&mut st, msg));
                self.queued.fetch_sub(bytes, Ordering::AcqRel);
                if handled < MAX_BATCH {
                    next = self.data.try_recv().ok();
                }
            }
            self.room.notify_waiters();
            if st.export.is_some() {
                self.guarded(|| self.export_step(&mut st));
            }
            self.guarded(|| self.hand_on(&mut st));
            dirty = true;
            if st.published.elapsed() >= PUBLISH_EVERY {
                self.publish(&mut st);
                dirty = false;
            }
        }
        self.publish(&mut st);
    }

    /// Runs `f`; a panic in it is logged and counted, and the shard goes on.
    fn guarded(&self, f: impl FnOnce()) {
        super::supervise::guarded(&self.name, &self.panics, f);
    }

    /// Handles control requests waiting, ahead of the next script call.
    fn pending_control(&self, st: &mut Running) {
        while let Ok(msg) = self.control.try_recv() {
            self.control_msg(st, msg);
        }
    }

    fn data_msg(&self, st: &mut Running, msg: ShardMsg) {
        match msg {
            ShardMsg::Batch {
                deliveries,
                watermarks,
                now,
                received,
            } => {
                st.received.push((received, deliveries.len() as u64));
                for d in deliveries {
                    if !self.control.is_empty() {
                        self.pending_control(st);
                    }
                    st.shard.event(d);
                }
                for (query, watermark) in watermarks {
                    st.shard.advance(query, watermark, now);
                }
            }
            ShardMsg::Retire { id } => {
                st.shard.remove(id);
                st.ids.retain(|&q| q != id);
            }
            ShardMsg::Flush { done } => {
                self.hand_on(st);
                let _ = done.send(());
            }
            ShardMsg::Checkpoint {
                ids,
                done,
                hub_mark,
            } => {
                // Everything emitted before this point goes to the hub ahead of the mark.
                self.hand_on(st);
                self.output.mark(self.index, hub_mark);
                // The copy goes on a few keys at a time between messages (see `run`).
                if let Some((_, earlier)) = st.export.take() {
                    let _ = earlier.send((Vec::new(), Duration::ZERO));
                }
                let started = Instant::now();
                st.shard.begin_export(&ids);
                st.export = Some((started.elapsed(), done));
                self.export_step(st);
            }
            ShardMsg::Restore { id, data } => {
                st.shard.import(id, data);
            }
            ShardMsg::DropPartition {
                partitions,
                partition,
                done,
            } => {
                st.shard.drop_keys(|key| key.shard(partitions) == partition);
                let _ = done.send(());
            }
            ShardMsg::Replace {
                id,
                def,
                ready,
                commit,
            } => match st.shard.prepare_replace(id, def) {
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
                Ok(migration) => {
                    let _ = ready.send(Ok(migration.migrated()));
                    if commit.recv_timeout(REPLACE_TIMEOUT) == Ok(true) {
                        st.shard.commit_replace(id, migration);
                    }
                }
            },
        }
    }

    fn control_msg(&self, st: &mut Running, msg: Control) {
        match msg {
            Control::Deploy {
                id,
                def,
                control,
                done,
            } => {
                let result = st.shard.deploy_controlled(id, def, control);
                if result.is_ok() {
                    st.ids.push(id);
                }
                self.publish(st);
                let _ = done.send(result);
            }
            Control::Remove { id, done } => {
                st.shard.remove(id);
                st.ids.retain(|&q| q != id);
                self.publish(st);
                let _ = done.send(());
            }
            Control::Collect { done } => {
                crate::shard::collect_memory();
                let _ = done.send(());
            }
            #[cfg(test)]
            Control::Panic => panic!("a test asked this shard to panic"),
        }
    }

    /// Copies the next keys of a checkpoint in progress; answers once all are copied.
    fn export_step(&self, st: &mut Running) {
        let started = Instant::now();
        let done = st.shard.export_step(EXPORT_STEP_KEYS);
        let Some((longest, _)) = st.export.as_mut() else {
            return;
        };
        *longest = (*longest).max(started.elapsed());
        if let Some(copies) = done {
            let (longest, reply) = st.export.take().expect("an export in progress");
            let _ = reply.send((copies, longest));
        }
    }

    /// Passes everything emitted so far to the hub, and records how long its frames took.
    fn hand_on(&self, st: &mut Running) {
        st.shard.take_output(&mut st.out);
        let now = Instant::now();
        let oldest = st.received.iter().map(|(at, _)| *at).min();
        for (at, events) in st.received.drain(..) {
            let us = now.duration_since(at).as_micros() as u64;
            st.latency.saturating_record_n(us, events);
        }
        if !st.out.is_empty() {
            // Waits while another shard publishes: backpressure, not loss.
            self.output.items(self.index, &mut st.out, oldest);
            st.shard.recycle(&mut st.out);
        }
    }

    fn publish(&self, st: &mut Running) {
        let queries = st
            .ids
            .iter()
            .filter_map(|&id| {
                let stats = st.shard.stats(id)?;
                Some((id, stats, st.shard.eval_histogram(id).cloned()))
            })
            .collect();
        self.report.store(Arc::new(ShardReport {
            queries,
            ingest_to_emit_us: st.latency.clone(),
        }));
        st.published = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles `script` as query `q` and deploys it as version 1 on every shard.
    async fn deploy(pipeline: &Pipeline, script: &str) -> Arc<QueryDef> {
        let def = Arc::new(QueryDef::compile("q", script, &Limits::default()).unwrap());
        pipeline
            .control_all(|done| Control::Deploy {
                id: QueryId(1),
                def: Arc::clone(&def),
                control: Arc::default(),
                done,
            })
            .await
            .unwrap();
        def
    }

    fn hub() -> Output {
        Output::Hub(super::super::hub::start(
            super::super::hub::HubSettings {
                shards: 1,
                snapshot_keys: 100,
                snapshot_bytes: 1 << 20,
                replay_bytes: 1 << 20,
            },
            None,
        ))
    }

    fn settings() -> ShardSettings {
        ShardSettings {
            limits: Limits::default(),
            budget: None,
            engine: crate::compiled::EngineMode::Auto,
        }
    }

    #[tokio::test]
    async fn a_shard_queue_holds_its_bytes_and_no_more_and_senders_wait_beyond() {
        let budget = 4096;
        let pipeline = Pipeline::start(1, budget, &settings(), &hub());
        let def = deploy(&pipeline, r#"let source = "s"; fn on_event(ev) { }"#).await;
        // The shard stops at a replace until it hears the decision.
        let (ready, ready_rx) = oneshot::channel();
        let (decide, commit) = std::sync::mpsc::channel();
        let replace = ShardMsg::Replace {
            id: QueryId(1),
            def,
            ready,
            commit,
        };
        // Counted until the shard has handled it.
        let held = replace.bytes();
        pipeline.send(0, replace).await.unwrap();
        ready_rx.await.unwrap().unwrap();
        let batch = || ShardMsg::Batch {
            deliveries: Vec::new(),
            watermarks: vec![(QueryId(1), 0); 40],
            now: 0,
            received: Instant::now(),
        };
        let each = batch().bytes();
        assert!(each < budget / 2, "{each}");
        let mut sent = 0;
        while tokio::time::timeout(Duration::from_millis(200), pipeline.send(0, batch()))
            .await
            .is_ok()
        {
            sent += 1;
            assert!(sent <= budget, "the queue never filled");
        }
        assert_eq!(sent, (budget - held) / each);
        assert_eq!(pipeline.queue_bytes(0), held + sent * each);
        // The shard goes on: the queue drains and the waiting side may send again.
        decide.send(false).unwrap();
        tokio::time::timeout(Duration::from_secs(10), pipeline.send(0, batch()))
            .await
            .expect("room once the shard went on")
            .unwrap();
    }

    #[tokio::test]
    async fn a_panic_in_a_shard_is_counted_and_the_shard_goes_on() {
        let pipeline = Pipeline::start(1, 8, &settings(), &hub());
        deploy(
            &pipeline,
            r#"let source = "s"; fn on_event(ev) { emit(ev.x); }"#,
        )
        .await;
        let (tx, _rx) = oneshot::channel::<()>();
        drop(tx);
        pipeline.shards[0].control.send(Control::Panic).unwrap();
        // The shard is still there: a flush after the panic is answered.
        pipeline
            .ask_all(|done| ShardMsg::Flush { done })
            .await
            .unwrap();
        assert_eq!(pipeline.panics(), 1);
        assert!(pipeline.is_alive(0));
    }
}
