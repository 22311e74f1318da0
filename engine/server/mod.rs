//! `eddy serve`: HTTP and WebSocket on one address, shards behind, fan-out in front.
//!
//! [`Server::start`] loads the queries folder, starts the hub thread and the shard threads, and
//! accepts connections (hyper 1, upgraded to WebSocket with fastwebsockets). Routes:
//! `GET /` (dashboard), `GET /ingest` (WebSocket) and `POST /ingest`, `GET /subscribe`
//! (WebSocket), `GET|PUT|DELETE /queries[/NAME]`, `GET /models` and `PUT|DELETE /models/NAME`,
//! `GET /metrics`, `GET /healthz`.
//!
//! Shutdown ([`Server::shutdown`], or Ctrl-C / SIGTERM under [`run`]), all within the configured
//! shutdown timeout:
//! 1. stop accepting; each producer finishes the frame in hand, sends its ack, then gets 1001
//!    (and what it sent after that is read and discarded until it closes, so the close is not
//!    lost to a TCP reset); wait for every ingest task and `POST /ingest` in progress;
//! 2. let the shards finish their queues and the hub hand everything to the mailboxes;
//! 3. let subscribers write what they have and close with 1001; wait for every subscriber task.
//!
//! So every acknowledged event reaches the subscribers before the process exits. Every WebSocket
//! task is tracked ([`State::producers`], [`State::subscribers`]), not detached.

pub mod accept;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod deflate;
pub mod demo;
pub mod durability;
pub mod hub;
pub mod ingest;
pub mod mailbox;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod producer;
pub mod replay;
pub mod subscribe;
pub mod supervise;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::router::Router;

pub use config::{Config, RawConfig};

/// Everything the connection tasks share.
pub struct State {
    pub config: Config,
    pub admin_token: String,
    pub pipeline: pipeline::Pipeline,
    pub hub: hub::HubHandle,
    /// The routing table, swapped whole when a query is deployed or removed.
    pub router: ArcSwap<Router>,
    /// Deployed queries by name; the lock serialises deploys and removals (never on the event
    /// path).
    pub catalog: tokio::sync::Mutex<admin::Catalog>,
    pub next_query: AtomicU64,
    pub next_source: AtomicU64,
    pub next_subscriber: AtomicU64,
    pub metrics: metrics::Metrics,
    /// Set when shutdown begins: producers stop.
    pub shutdown: watch::Sender<bool>,
    /// Set when everything produced has reached the mailboxes: subscribers finish.
    pub closing: watch::Sender<bool>,
    /// Producer WebSocket tasks and `POST /ingest` requests in progress.
    pub producers: TaskTracker,
    /// Subscriber WebSocket tasks.
    pub subscribers: TaskTracker,
    /// The data directory; `None` in memory (`--ephemeral`).
    pub durable: Option<durability::Durability>,
    /// Open connections and what the connection limits did.
    pub connections: accept::Connections,
    /// The bytes of frames in flight (`max_ingest_bytes_in_flight`).
    pub ingest_budget: ingest::IngestBudget,
    /// Cluster mode (`--cluster`): this node's membership; `None` alone.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// Idempotent producers' frames taken (alone; a cluster leaves it to JetStream).
    pub producers_seen: producer::Producers,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the queries folder {path}: {source}")]
    Queries {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Query {
        file: String,
        source: crate::QueryError,
    },
    #[error("models folder: {0}")]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    Durability(#[from] durability::DurabilityError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

impl Server {
    /// Binds, loads the queries folder and starts serving.
    pub async fn start(mut config: Config) -> Result<Server, StartError> {
        let listener = accept::bind(config.listen).map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        // A node given no name is named after the port it bound (`--listen …:0` included).
        if let Some(c) = config.cluster.as_mut().filter(|c| c.default_node) {
            c.node = cluster::config::default_node_name(addr.port());
        }
        let durable = match &config.data_dir {
            Some(dir) => Some(durability::Durability::open(dir, config.fsync)?),
            None => None,
        };
        let hub_settings = hub::HubSettings {
            shards: config.shards,
            snapshot_keys: config.snapshot_keys,
            snapshot_bytes: config.snapshot_bytes,
            replay_bytes: config.replay_bytes,
        };
        let hub = hub::start(hub_settings, durable.as_ref().map(|d| d.log.gate()));
        // In cluster mode the shards' output goes to NATS, and the hub takes every node's.
        let (cluster, output) = match &config.cluster {
            Some(c) => {
                let c = cluster::Cluster::connect(c, hub.clone()).await?;
                let out = pipeline::Output::Forward(c.shard_output());
                (Some(c), out)
            }
            None => (None, pipeline::Output::Hub(hub.clone())),
        };
        let settings = pipeline::ShardSettings {
            limits: config.limits.per_shard(config.shards),
            budget: (config.max_query_cpu < 1.0).then_some(crate::shard::CpuBudget {
                share: config.max_query_cpu,
                window: config.query_cpu_window,
            }),
            engine: config.engine,
        };
        let pipeline =
            pipeline::Pipeline::start(config.shards, config.shard_queue, &settings, &output);
        let admin_token = config
            .admin_token
            .clone()
            .unwrap_or_else(config::generate_token);
        let state = Arc::new(State {
            admin_token,
            pipeline,
            hub,
            router: ArcSwap::from_pointee(Router::new(Vec::new(), config.time_policy())),
            catalog: tokio::sync::Mutex::new(admin::Catalog::default()),
            next_query: AtomicU64::new(1),
            next_source: AtomicU64::new(1),
            next_subscriber: AtomicU64::new(1),
            metrics: metrics::Metrics::default(),
            shutdown: watch::channel(false).0,
            closing: watch::channel(false).0,
            producers: TaskTracker::new(),
            subscribers: TaskTracker::new(),
            durable,
            connections: accept::Connections::default(),
            ingest_budget: ingest::IngestBudget::new(config.max_ingest_bytes_in_flight),
            producers_seen: producer::Producers::default(),
            cluster,
            config,
        });
        models::load_folder(&state)?;
        admin::load_folder(&state).await?;
        durability::apply_catalog(&state).await;
        durability::recover(&state).await?;
        cluster::start(&state).await?;
        if state.durable.is_some() {
            tokio::spawn(durability::checkpointer(Arc::clone(&state)));
        }
        let connections = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let accept = tokio::spawn(accept::accept_loop(
            listener,
            Arc::clone(&state),
            Arc::clone(&connections),
        ));
        if state.config.demo {
            demo::start(&state);
        }
        if let Some(idle) = state.config.idle_timeout {
            tokio::spawn(idle_ticker(Arc::clone(&state), idle));
        }
        Ok(Server {
            addr,
            state,
            accept,
            connections,
        })
    }

    /// Stops gracefully: see the module documentation.
    pub async fn shutdown(self) {
        let state = &self.state;
        let deadline = tokio::time::Instant::now() + state.config.shutdown_timeout;
        self.accept.abort();
        state.shutdown.send_replace(true);
        // Producers see the signal, finish the frame in hand and close.
        state.producers.close();
        let _ = tokio::time::timeout_at(deadline, state.producers.wait()).await;
        let _ = tokio::time::timeout_at(deadline, cluster::leave(state)).await;
        // What the shards hand on is in the mailboxes when a flush is answered.
        let flush = state
            .pipeline
            .ask_all(|done| pipeline::ShardMsg::Flush { done });
        let _ = tokio::time::timeout_at(deadline, flush).await;
        // The last checkpoint: a restart replays nothing.
        if let Some(d) = &state.durable {
            match durability::checkpoint(state).await {
                Ok(bytes) => tracing::info!(
                    "checkpoint at shutdown: {bytes} bytes in {:.1} ms (shards paused at most \
                     {:.1} ms)",
                    d.last_checkpoint_us.load(Ordering::Relaxed) as f64 / 1e3,
                    d.last_pause_us.load(Ordering::Relaxed) as f64 / 1e3
                ),
                Err(e) => tracing::error!("checkpoint at shutdown failed: {e}"),
            }
        }
        state.closing.send_replace(true);
        state.subscribers.close();
        let _ = tokio::time::timeout_at(deadline, state.subscribers.wait()).await;
        let mut connections = self.connections.lock().await;
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            connections.abort_all();
        }
    }
}

/// Moves the watermark of every quiet query on with processing time (see `idle_timeout`), and
/// tells the shards, so that the last windows of a stream that stopped close.
async fn idle_ticker(state: Arc<State>, idle: std::time::Duration) {
    let idle_ms = idle.as_millis() as i64;
    let every = (idle / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    let mut shutdown = state.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let now = crate::router::wall_ms();
        let _order = match &state.durable {
            Some(d) => Some(d.order.lock().await),
            None => None,
        };
        let moved = idle_moves(&state, now, idle_ms);
        if moved.is_empty() {
            continue;
        }
        // Logged before the shards hear of it (see `ingest::route_input`).
        if let Some(d) = &state.durable {
            d.append(&crate::durable::Record::Idle { now });
        }
        send_marks(&state, moved, now).await;
    }
}

/// Moves quiet queries' marks on as of wall-clock `now` and tells the shards (also a replay of
/// the log). Returns whether any moved.
pub async fn advance_idle(state: &State, now: i64, idle_ms: i64) -> bool {
    let moved = idle_moves(state, now, idle_ms);
    if moved.is_empty() {
        return false;
    }
    send_marks(state, moved, now).await;
    true
}

/// Moves quiet queries' marks on as of `now`; returns the ones that moved.
fn idle_moves(state: &State, now: i64, idle_ms: i64) -> Vec<(crate::shard::QueryId, i64)> {
    let router = state.router.load_full();
    router
        .queries()
        .iter()
        .filter(|q| q.def.functions.on_timer)
        .filter_map(|q| Some((q.id, q.advance_idle(now, idle_ms)?)))
        .collect()
}

/// Tells every shard of queries' new marks.
async fn send_marks(state: &State, moved: Vec<(crate::shard::QueryId, i64)>, now: i64) {
    for shard in 0..state.pipeline.shards() {
        let msg = pipeline::ShardMsg::Batch {
            deliveries: Vec::new(),
            watermarks: moved.clone(),
            now,
            received: std::time::Instant::now(),
        };
        if state.pipeline.send(shard, msg).await.is_err() {
            break;
        }
    }
}

type Body = Full<Bytes>;

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}

pub fn json_error(status: StatusCode, text: &str) -> Response<Body> {
    let mut body = Vec::new();
    crate::json::Object::new(&mut body).str("error", text).end();
    respond(status, "application/json", body)
}

/// The query string as a map (no percent-decoding beyond `+` and `%XX`).
pub fn query_params(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the request carries `token` (`Authorization: Bearer …` or `?token=…`).
pub fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer
        .map(str::to_owned)
        .or_else(|| query_params(req).remove("token"));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Browsers send `Origin`; other clients do not. Same-origin and configured origins pass.
fn origin_allowed(state: &State, req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get("origin").and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let allowed = &state.config.allowed_origins;
    if allowed.iter().any(|a| a == "*" || a == origin) {
        return true;
    }
    let host = req.headers().get("host").and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    host.is_some_and(|h| h == origin_host)
}

async fn route(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        (Method::GET, "/healthz") => health(&state),
        (Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&state).await,
        ),
        (Method::GET, "/ingest") | (Method::GET, "/subscribe") => {
            let ingest = path == "/ingest";
            let token = if ingest {
                &state.config.ingest_token
            } else {
                &state.config.subscribe_token
            };
            if token.as_ref().is_some_and(|t| !authorized(&req, t)) {
                return json_error(StatusCode::UNAUTHORIZED, "missing or wrong token");
            }
            if !origin_allowed(&state, &req) {
                return json_error(
                    StatusCode::FORBIDDEN,
                    "origin not allowed (allowed_origins)",
                );
            }
            if *state.shutdown.borrow() {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            let params = query_params(&req);
            let frame_id = if ingest {
                match producer_of(&params) {
                    Ok(id) => id,
                    Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
                }
            } else {
                None
            };
            // permessage-deflate pays on the way out, where a batch is compressed once for
            // every subscriber; producers' frames are not compressed.
            let (response, upgrade, deflate) = match ws::handshake(&mut req, !ingest) {
                Ok(r) => r,
                Err(response) => return response,
            };
            if ingest {
                let params = ingest::IngestParams {
                    stream: params.get("stream").cloned().filter(|s| !s.is_empty()),
                    ack: params.get("ack").is_some_and(|v| v == "true" || v == "1"),
                    first_frame: frame_id,
                };
                // A source of its stream from before the handshake's answer, so that the
                // stream's mark waits for it.
                let source = ingest::Source::new(&state);
                if let Some(stream) = &params.stream {
                    source.open(&state, stream).await;
                }
                let task = ingest::websocket(Arc::clone(&state), upgrade, params, source);
                state.producers.spawn(task);
            } else {
                let socket = req.extensions().get::<accept::SocketFd>().copied();
                let task = subscribe::websocket(Arc::clone(&state), upgrade, deflate, socket);
                state.subscribers.spawn(task);
            }
            response
        }
        (Method::POST, "/ingest") => post_ingest(&state, req).await,
        (Method::GET, "/cluster") => match cluster::describe(&state).await {
            Some(body) => respond(StatusCode::OK, "application/json", body),
            None => json_error(StatusCode::NOT_FOUND, "not in cluster mode (--cluster)"),
        },
        (_, "/ingest") | (_, "/subscribe") | (_, "/metrics") | (_, "/healthz") | (_, "/") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, p) if p == "/queries" || p.starts_with("/queries/") => admin::route(&state, req).await,
        (_, p) if p == "/models" || p.starts_with("/models/") => models::route(&state, req).await,
        _ => json_error(StatusCode::NOT_FOUND, "no such path"),
    }
}

/// Reads a body of at most `limit` bytes, the limit `setting` names; `Err` is the response to
/// send instead.
pub async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    setting: &str,
) -> Result<Vec<u8>, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes().to_vec()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes ({setting})"),
        )),
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read body: {e}"),
        )),
    }
}

/// The idempotent producer an ingest request names (`producer=`, `frame=`); `Err` says why
/// they are refused.
fn producer_of(params: &HashMap<String, String>) -> Result<Option<producer::FrameId>, String> {
    producer::from_params(
        params.get("producer").map(String::as_str),
        params.get("frame").map(String::as_str),
    )
}

async fn post_ingest(state: &State, req: Request<Incoming>) -> Response<Body> {
    if let Some(token) = &state.config.ingest_token {
        if !authorized(&req, token) {
            return json_error(StatusCode::UNAUTHORIZED, "missing or wrong token");
        }
    }
    if !origin_allowed(state, &req) {
        return json_error(
            StatusCode::FORBIDDEN,
            "origin not allowed (allowed_origins)",
        );
    }
    // Shutdown waits for this request to finish before it flushes the shards.
    let _in_progress = state.producers.token();
    if *state.shutdown.borrow() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let mut params = query_params(&req);
    let frame_id = match producer_of(&params) {
        Ok(id) => id,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let stream = params.remove("stream").filter(|s| !s.is_empty());
    let body = match read_body(req, state.config.max_frame_bytes, "max_frame_bytes").await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let counters = state.metrics.stream(stream.as_deref().unwrap_or("-"));
    let mut source = ingest::Source::new(state);
    let outcome = ingest::ingest(
        state,
        &mut source,
        body,
        stream.as_deref(),
        &counters,
        frame_id.as_ref(),
    )
    .await;
    source.close(state).await;
    let out = outcome.to_json();
    let status = if outcome.nothing_was_json {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    respond(status, "application/json", out)
}

/// `GET /healthz`: the shards and their queues; 503 when the server cannot accept work (a shard
/// is not running, or shutdown has begun).
fn health(state: &State) -> Response<Body> {
    let pipeline = &state.pipeline;
    let shutting_down = *state.shutdown.borrow();
    let shards_ok = (0..pipeline.shards()).all(|i| pipeline.is_alive(i));
    let ok = shards_ok && !shutting_down;
    let mut body = b"{\"status\":".to_vec();
    crate::json::write_str(&mut body, if ok { "ok" } else { "unavailable" });
    body.extend_from_slice(b",\"shutting_down\":");
    body.extend_from_slice(if shutting_down { b"true" } else { b"false" });
    body.extend_from_slice(b",\"shards\":[");
    for i in 0..pipeline.shards() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"shard\":");
        crate::json::write_int(&mut body, i as i64);
        body.extend_from_slice(b",\"alive\":");
        body.extend_from_slice(if pipeline.is_alive(i) {
            b"true"
        } else {
            b"false"
        });
        body.extend_from_slice(b",\"queue\":");
        crate::json::write_int(&mut body, pipeline.queue_depth(i) as i64);
        body.push(b'}');
    }
    body.extend_from_slice(b"],\"panics\":");
    crate::json::write_int(&mut body, (pipeline.panics() + state.hub.panics()) as i64);
    body.push(b'}');
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    respond(status, "application/json", body)
}

/// The live dashboard.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Runs the server until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn run(server: Server) {
    let terminate = async {
        #[cfg(unix)]
        {
            if let Ok(mut sig) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                sig.recv().await;
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
}
