//! Operational metrics: counters recorded where they happen, merged only when `/metrics` is read.
//!
//! Ingest counters are atomics looked up once per connection (by stream label), never per event.
//! Shards keep their own counters and histograms and publish them as they go (so reading them
//! never waits behind a busy shard); the hub reports on request; socket latencies are merged in
//! by each subscriber once per flush, never per item. [`render`] gathers them and writes the
//! Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::event::{RejectKind, Rejection};

use super::hub::HubControl;
use super::pipeline::ShardReport;
use super::State;

/// Distinct stream labels kept; past this, new ones are counted under `other`.
const MAX_STREAM_LABELS: usize = 1000;

#[derive(Default)]
pub struct StreamCounters {
    accepted: AtomicU64,
    rejected: [AtomicU64; RejectKind::ALL.len()],
}

impl StreamCounters {
    pub fn count(&self, accepted: u64, rejections: &[Rejection]) {
        self.accepted.fetch_add(accepted, Ordering::Relaxed);
        for r in rejections {
            let i = RejectKind::ALL
                .iter()
                .position(|k| *k == r.kind)
                .unwrap_or(0);
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct Metrics {
    streams: Mutex<HashMap<String, Arc<StreamCounters>>>,
    connections: [AtomicI64; 2],
    /// Socket latencies, merged in by each subscriber once per flush (not per item), and by a
    /// shard for each batch it writes straight to an idle subscriber's socket.
    socket: SocketRecorder,
}

/// Where socket latencies are recorded; shared with the mailboxes that write straight to their
/// sockets (see [`super::mailbox`]).
#[derive(Clone, Default)]
pub struct SocketRecorder(Arc<Mutex<SocketLatency>>);

impl SocketRecorder {
    /// [`SocketRecorder::record`] for a batch a shard wrote straight to an idle subscriber's
    /// socket, and counts it.
    pub fn record_direct(&self, sample: (u64, Option<u64>, u64)) {
        let mut socket = self.0.lock().unwrap_or_else(|e| e.into_inner());
        socket.add(&[sample]);
        socket.direct_batches += 1;
    }

    /// Records socket latencies of one write: `(emit→socket µs, ingest→socket µs, items)`.
    pub fn record(&self, samples: &[(u64, Option<u64>, u64)]) {
        if samples.is_empty() {
            return;
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(samples);
    }
}

impl SocketLatency {
    fn add(&mut self, samples: &[(u64, Option<u64>, u64)]) {
        for &(emit, ingest, n) in samples {
            self.emit_to_socket.saturating_record_n(emit, n);
            if let Some(ingest) = ingest {
                self.ingest_to_socket.saturating_record_n(ingest, n);
            }
        }
    }
}

/// Socket-side latencies, µs.
pub struct SocketLatency {
    /// Hub publish to socket write.
    pub emit_to_socket: Histogram<u64>,
    /// Frame received to socket write.
    pub ingest_to_socket: Histogram<u64>,
    /// Batches a shard wrote straight to an idle subscriber's socket.
    pub direct_batches: u64,
}

impl Default for SocketLatency {
    fn default() -> Self {
        SocketLatency {
            emit_to_socket: crate::shard::latency_histogram(),
            ingest_to_socket: crate::shard::latency_histogram(),
            direct_batches: 0,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            streams: Mutex::new(HashMap::new()),
            connections: Default::default(),
            socket: SocketRecorder::default(),
        }
    }
}

/// Counts an open connection until dropped.
pub struct ConnectionGuard<'a>(&'a AtomicI64);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The counters of a stream label, made on first use.
    pub fn stream(&self, label: &str) -> Arc<StreamCounters> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = streams.get(label) {
            return Arc::clone(c);
        }
        let label = if streams.len() >= MAX_STREAM_LABELS {
            "other"
        } else {
            label
        };
        Arc::clone(streams.entry(label.to_owned()).or_default())
    }

    pub fn connection(&self, kind: &str) -> ConnectionGuard<'_> {
        let counter = &self.connections[usize::from(kind == "subscribe")];
        counter.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(counter)
    }

    /// Open connections of `kind` (`ingest` or `subscribe`).
    pub fn open_connections(&self, kind: &str) -> i64 {
        self.connections[usize::from(kind == "subscribe")].load(Ordering::Relaxed)
    }

    /// Records socket latencies of one flush: `(emit→socket µs, ingest→socket µs, items)`.
    pub fn record_socket(&self, samples: &[(u64, Option<u64>, u64)]) {
        self.socket.record(samples);
    }

    /// A handle that records socket latencies into these metrics.
    pub fn socket_recorder(&self) -> SocketRecorder {
        self.socket.clone()
    }

    /// Socket latency histograms (emit→socket, ingest→socket), µs, and the batches written
    /// straight to idle subscribers' sockets.
    pub fn socket_latency(&self) -> (Histogram<u64>, Histogram<u64>, u64) {
        let socket = self.socket.0.lock().unwrap_or_else(|e| e.into_inner());
        (
            socket.emit_to_socket.clone(),
            socket.ingest_to_socket.clone(),
            socket.direct_batches,
        )
    }
}

fn quantiles(out: &mut String, name: &str, help: &str, hist: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for q in [0.5, 0.9, 0.99, 0.999] {
        let seconds = hist.value_at_quantile(q) as f64 / 1e6;
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {seconds}");
    }
    let _ = writeln!(out, "{name}_count {}", hist.len());
}

fn counter_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The connection gauges and counters of [`super::accept`].
fn write_connections(out: &mut String, c: &super::accept::Connections, max: usize) {
    let rows: [(&str, &str, &str, u64); 6] = [
        (
            "eddy_open_connections",
            "gauge",
            "Open TCP connections, HTTP and WebSocket.",
            c.open.load(Ordering::Relaxed) as u64,
        ),
        (
            "eddy_max_connections",
            "gauge",
            "Connections served in full (max_connections); a reserve past it serves health, metrics and admin.",
            max as u64,
        ),
        (
            "eddy_connections_refused_total",
            "counter",
            "Connections or requests answered 503 past max_connections.",
            c.refused.load(Ordering::Relaxed),
        ),
        (
            "eddy_connections_shed_total",
            "counter",
            "Connections closed before their request head to make room past max_connections.",
            c.shed.load(Ordering::Relaxed),
        ),
        (
            "eddy_handshake_timeouts_total",
            "counter",
            "Connections closed for sending no complete request head within handshake_timeout.",
            c.timed_out.load(Ordering::Relaxed),
        ),
        (
            "eddy_accept_errors_total",
            "counter",
            "Failed accepts (each backed off, from 10 ms to 1 s).",
            c.accept_errors.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in rows {
        counter_header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// The Prometheus text of every metric.
pub async fn render(state: &State) -> String {
    let mut out = String::new();
    let streams: Vec<(String, Arc<StreamCounters>)> = {
        let streams = state
            .metrics
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = streams
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    write_connections(&mut out, &state.connections, state.config.max_connections);
    super::cluster::write_metrics(state, &mut out);
    let budget = &state.ingest_budget;
    for (name, kind, help, value) in [
        (
            "eddy_ingest_bytes_in_flight",
            "gauge",
            "Memory held by frames being parsed, routed and queued (max_ingest_bytes_in_flight).",
            budget.in_flight(),
        ),
        (
            "eddy_ingest_budget_waits_total",
            "counter",
            "Inputs that waited for max_ingest_bytes_in_flight (their producers were slowed).",
            budget.waits.load(Ordering::Relaxed),
        ),
        (
            "eddy_ingest_duplicate_frames_total",
            "counter",
            "Idempotent producers' frames sent again that an earlier send had taken (not added again).",
            state.producers_seen.duplicates.load(Ordering::Relaxed)
                + state
                    .cluster
                    .as_ref()
                    .map_or(0, |c| c.duplicate_frames.load(Ordering::Relaxed)),
        ),
        (
            "eddy_ingest_producers",
            "gauge",
            "Idempotent producer ids this node remembers (alone).",
            state.producers_seen.len() as u64,
        ),
        (
            "eddy_ingest_producers_forgotten_total",
            "counter",
            "Idempotent producer ids forgotten to stay within the table's bound.",
            state.producers_seen.forgotten.load(Ordering::Relaxed),
        ),
    ] {
        counter_header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    counter_header(
        &mut out,
        "eddy_events_ingested_total",
        "counter",
        "Events accepted, by stream (\"-\": named by each event).",
    );
    for (stream, c) in &streams {
        let _ = writeln!(
            out,
            "eddy_events_ingested_total{{stream=\"{}\"}} {}",
            label(stream),
            c.accepted.load(Ordering::Relaxed)
        );
    }
    counter_header(
        &mut out,
        "eddy_events_rejected_total",
        "counter",
        "Events rejected, by stream and reason.",
    );
    for (stream, c) in &streams {
        for (i, kind) in RejectKind::ALL.iter().enumerate() {
            let n = c.rejected[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "eddy_events_rejected_total{{stream=\"{}\",reason=\"{}\"}} {n}",
                label(stream),
                kind.label()
            );
        }
    }

    let reports = state.pipeline.reports();
    let router = state.router.load();
    let per_query: Vec<(String, crate::shard::QueryStats, bool)> = router
        .queries()
        .iter()
        .map(|q| {
            let (stats, _) = ShardReport::totals(&reports, q.id);
            (label(&q.def.name), stats, q.control.is_quarantined())
        })
        .collect();
    type Pick = fn(&crate::shard::QueryStats, bool) -> u64;
    let families: [(&str, &str, &str, Pick); 9] = [
        (
            "eddy_query_events_total",
            "counter",
            "Events handled, by query.",
            |s, _| s.events,
        ),
        (
            "eddy_query_errors_total",
            "counter",
            "Script runtime errors, by query.",
            |s, _| s.errors,
        ),
        (
            "eddy_late_events_total",
            "counter",
            "Events older than the watermark, by query.",
            |s, _| s.late,
        ),
        (
            "eddy_query_skipped_events_total",
            "counter",
            "Events skipped while the query was quarantined, by query.",
            |s, _| s.skipped,
        ),
        (
            "eddy_timers_deferred_total",
            "counter",
            "Due timers left for a later round by max_timers_per_advance, by query.",
            |s, _| s.timers_deferred,
        ),
        (
            "eddy_keys_evicted_total",
            "counter",
            "Keys dropped to make room for new ones (max_keys_per_query, on_key_limit = evict), by query.",
            |s, _| s.keys_evicted,
        ),
        (
            "eddy_keys_refused_total",
            "counter",
            "Events of new keys not handled (max_keys_per_query, on_key_limit = reject), by query.",
            |s, _| s.keys_refused,
        ),
        (
            "eddy_keys_expired_total",
            "counter",
            "Keys forgotten after key_ttl without an event, by query.",
            |s, _| s.keys_expired,
        ),
        (
            "eddy_query_quarantined",
            "gauge",
            "1 while the query is quarantined (max_query_cpu), by query.",
            |_, quarantined| u64::from(quarantined),
        ),
    ];
    for (family, kind, help, pick) in families {
        counter_header(&mut out, family, kind, help);
        for (name, stats, quarantined) in &per_query {
            let _ = writeln!(
                out,
                "{family}{{query=\"{name}\"}} {}",
                pick(stats, *quarantined)
            );
        }
    }
    counter_header(
        &mut out,
        "eddy_query_cpu_seconds_total",
        "counter",
        "Script time, by query.",
    );
    for (name, stats, _) in &per_query {
        let _ = writeln!(
            out,
            "eddy_query_cpu_seconds_total{{query=\"{name}\"}} {}",
            stats.cpu_us as f64 / 1e6
        );
    }
    counter_header(
        &mut out,
        "eddy_panics_total",
        "counter",
        "Panics caught in shard threads and the hub (each lost the message in hand).",
    );
    let _ = writeln!(
        out,
        "eddy_panics_total {}",
        state.pipeline.panics() + state.hub.panics()
    );
    if let Some(d) = &state.durable {
        use std::sync::atomic::Ordering::Relaxed;
        let samples = [
            (
                "eddy_log_bytes",
                "gauge",
                "Bytes of ingest log segments on disk.",
                d.log.disk_bytes(),
            ),
            (
                "eddy_log_records_total",
                "counter",
                "Records appended to the ingest log, ever (its end position).",
                d.log.end(),
            ),
            (
                "eddy_log_truncated_bytes",
                "gauge",
                "Bytes cut off a torn or corrupt log tail at start.",
                d.truncated_bytes.load(Relaxed),
            ),
            (
                "eddy_replayed_records",
                "gauge",
                "Log records replayed at start.",
                d.replayed_records.load(Relaxed),
            ),
            (
                "eddy_checkpoints_total",
                "counter",
                "Checkpoints written since start.",
                d.checkpoints.load(Relaxed),
            ),
            (
                "eddy_checkpoint_last_seconds",
                "gauge",
                "Time the last checkpoint took, from request to file.",
                0,
            ),
            (
                "eddy_checkpoint_last_bytes",
                "gauge",
                "Size of the last checkpoint.",
                d.last_checkpoint_bytes.load(Relaxed),
            ),
            (
                "eddy_checkpoint_last_pause_seconds",
                "gauge",
                "The longest a shard stopped to copy its state for the last checkpoint.",
                0,
            ),
        ];
        for (name, kind, help, value) in samples {
            counter_header(&mut out, name, kind, help);
            if name == "eddy_checkpoint_last_seconds" {
                let secs = d.last_checkpoint_us.load(Relaxed) as f64 / 1e6;
                let _ = writeln!(out, "{name} {secs}");
            } else if name == "eddy_checkpoint_last_pause_seconds" {
                let secs = d.last_pause_us.load(Relaxed) as f64 / 1e6;
                let _ = writeln!(out, "{name} {secs}");
            } else {
                let _ = writeln!(out, "{name} {value}");
            }
        }
    }
    counter_header(
        &mut out,
        "eddy_thread_up",
        "gauge",
        "1 while a shard thread runs.",
    );
    for i in 0..state.pipeline.shards() {
        let up = u64::from(state.pipeline.is_alive(i));
        let _ = writeln!(out, "eddy_thread_up{{thread=\"shard-{i}\"}} {up}");
    }

    let (tx, rx) = tokio::sync::oneshot::channel();
    state.hub.control(HubControl::Report { reply: tx });
    let hub = rx.await.unwrap_or_default();
    for (name, kind, help, value) in [
        (
            "eddy_snapshot_bytes",
            "gauge",
            "Bytes of latest values kept for snapshots, all topics (snapshot_bytes).",
            hub.snapshot_bytes,
        ),
        (
            "eddy_snapshot_skipped_total",
            "counter",
            "Latest values not kept for snapshots (snapshot_keys, snapshot_bytes).",
            hub.snapshot_skipped,
        ),
    ] {
        counter_header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    counter_header(
        &mut out,
        "eddy_items_emitted_total",
        "counter",
        "Items emitted, by topic.",
    );
    for t in &hub.topics {
        let _ = writeln!(
            out,
            "eddy_items_emitted_total{{topic=\"{}\"}} {}",
            label(&t.topic),
            t.emitted
        );
    }
    counter_header(
        &mut out,
        "eddy_replay_bytes",
        "gauge",
        "Bytes of the newest batches kept for resuming subscribers, by topic (replay_bytes).",
    );
    for t in &hub.topics {
        let _ = writeln!(
            out,
            "eddy_replay_bytes{{topic=\"{}\"}} {}",
            label(&t.topic),
            t.replay_bytes
        );
    }
    counter_header(
        &mut out,
        "eddy_subscribers",
        "gauge",
        "Subscribers, by topic.",
    );
    for t in &hub.topics {
        let _ = writeln!(
            out,
            "eddy_subscribers{{topic=\"{}\"}} {}",
            label(&t.topic),
            t.subscribers
        );
    }
    counter_header(
        &mut out,
        "eddy_dropped_items_total",
        "counter",
        "Items dropped for slow subscribers, by topic.",
    );
    for t in &hub.topics {
        let _ = writeln!(
            out,
            "eddy_dropped_items_total{{topic=\"{}\"}} {}",
            label(&t.topic),
            t.dropped
        );
    }
    counter_header(
        &mut out,
        "eddy_shard_queue_depth",
        "gauge",
        "Messages waiting for each shard.",
    );
    for i in 0..state.pipeline.shards() {
        let _ = writeln!(
            out,
            "eddy_shard_queue_depth{{shard=\"{i}\"}} {}",
            state.pipeline.queue_depth(i)
        );
    }
    counter_header(
        &mut out,
        "eddy_shard_queue_bytes",
        "gauge",
        "Bytes of the messages waiting for each shard (bounded by shard_queue).",
    );
    for i in 0..state.pipeline.shards() {
        let _ = writeln!(
            out,
            "eddy_shard_queue_bytes{{shard=\"{i}\"}} {}",
            state.pipeline.queue_bytes(i)
        );
    }
    counter_header(
        &mut out,
        "eddy_connections",
        "gauge",
        "Open WebSocket connections, by kind.",
    );
    for (i, kind) in ["ingest", "subscribe"].iter().enumerate() {
        let _ = writeln!(
            out,
            "eddy_connections{{kind=\"{kind}\"}} {}",
            state.metrics.connections[i].load(Ordering::Relaxed)
        );
    }

    let mut ingest_to_emit = crate::shard::latency_histogram();
    for r in &reports {
        let _ = ingest_to_emit.add(&r.ingest_to_emit_us);
    }
    let (emit_to_socket, ingest_to_socket, direct) = state.metrics.socket_latency();
    let _ = writeln!(
        out,
        "# HELP eddy_socket_direct_batches_total Batches a shard wrote straight to an idle \
         subscriber's socket, without waking its connection task.\n\
         # TYPE eddy_socket_direct_batches_total counter\n\
         eddy_socket_direct_batches_total {direct}"
    );
    quantiles(
        &mut out,
        "eddy_ingest_to_emit_seconds",
        "Frame received to items handed to the fan-out.",
        &ingest_to_emit,
    );
    quantiles(
        &mut out,
        "eddy_emit_to_socket_seconds",
        "Batch published to written on a subscriber's socket.",
        &emit_to_socket,
    );
    quantiles(
        &mut out,
        "eddy_ingest_to_socket_seconds",
        "Frame received to written on a subscriber's socket.",
        &ingest_to_socket,
    );
    out
}
