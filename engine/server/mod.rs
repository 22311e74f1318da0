//! `eddy serve`: HTTP and WebSocket on one address, shards behind, fan-out in front.
//!
//! [`Server::start`] loads the queries folder, starts the hub thread and the shard threads, and
//! accepts connections (hyper 1, upgraded to WebSocket with fastwebsockets). Routes:
//! `GET /` (dashboard), `GET /ingest` (WebSocket) and `POST /ingest`, `GET /subscribe`
//! (WebSocket), `GET|PUT|DELETE /queries[/NAME]`, `GET /models` and `PUT|DELETE /models/NAME`,
//! `GET /metrics`, `GET /healthz`.
//!
//! Shutdown ([`Server::shutdown`], or Ctrl-C / SIGTERM under [`run`]): stop accepting and close
//! producers with 1001, let the shards finish their queues and the hub hand everything to the
//! mailboxes, then let subscribers write what they have and close with 1001; all within the
//! configured shutdown timeout.

pub mod admin;
pub mod config;
pub mod demo;
pub mod hub;
pub mod ingest;
pub mod mailbox;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod subscribe;
pub mod ws;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

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
    pub next_subscriber: AtomicU64,
    pub metrics: metrics::Metrics,
    /// Set when shutdown begins: producers stop.
    pub shutdown: watch::Sender<bool>,
    /// Set when everything produced has reached the mailboxes: subscribers finish.
    pub closing: watch::Sender<bool>,
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
}

impl Server {
    /// Binds, loads the queries folder and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let (hub_tx, hub) = hub::start(config.hub_queue, config.snapshot_keys);
        let pipeline =
            pipeline::Pipeline::start(config.shards, config.shard_queue, &config.limits, hub_tx);
        let admin_token = config
            .admin_token
            .clone()
            .unwrap_or_else(config::generate_token);
        let state = Arc::new(State {
            admin_token,
            pipeline,
            hub,
            router: ArcSwap::from_pointee(Router::default()),
            catalog: tokio::sync::Mutex::new(admin::Catalog::default()),
            next_query: AtomicU64::new(1),
            next_subscriber: AtomicU64::new(1),
            metrics: metrics::Metrics::default(),
            shutdown: watch::channel(false).0,
            closing: watch::channel(false).0,
            config,
        });
        models::load_folder(&state)?;
        admin::load_folder(&state).await?;
        let connections = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&state),
            Arc::clone(&connections),
        ));
        if state.config.demo {
            demo::start(&state);
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
        let _ = state.shutdown.send(true);
        // Producers see the signal and close; give them a moment to finish the frame in hand.
        let wait_producers = async {
            while state.metrics.open_connections("ingest") > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, wait_producers).await;
        let flush = async {
            let _ = state
                .pipeline
                .ask_all(|done| pipeline::ShardMsg::Flush { done })
                .await;
            let (tx, rx) = tokio::sync::oneshot::channel();
            state.hub.send(hub::HubControl::Flush { done: tx }).await;
            let _ = rx.await;
        };
        let _ = tokio::time::timeout_at(deadline, flush).await;
        let _ = state.closing.send(true);
        let mut connections = self.connections.lock().await;
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            connections.abort_all();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    connections: Arc<tokio::sync::Mutex<JoinSet<()>>>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let mut set = connections.lock().await;
        // Reap finished connections so the set does not grow.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
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
    let mut body = b"{\"error\":".to_vec();
    crate::json::write_str(&mut body, text);
    body.push(b'}');
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
        (Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
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
            if !fastwebsockets::upgrade::is_upgrade_request(&req) {
                return json_error(StatusCode::UPGRADE_REQUIRED, "this path speaks WebSocket");
            }
            if *state.shutdown.borrow() {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            let params = query_params(&req);
            let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(r) => r,
                Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            if ingest {
                let params = ingest::IngestParams {
                    stream: params.get("stream").cloned().filter(|s| !s.is_empty()),
                    ack: params.get("ack").is_some_and(|v| v == "true" || v == "1"),
                };
                tokio::spawn(ingest::websocket(Arc::clone(&state), upgrade, params));
            } else {
                tokio::spawn(subscribe::websocket(Arc::clone(&state), upgrade));
            }
            let (parts, _) = response.into_parts();
            Response::from_parts(parts, Full::new(Bytes::new()))
        }
        (Method::POST, "/ingest") => post_ingest(&state, req).await,
        (_, "/ingest") | (_, "/subscribe") | (_, "/metrics") | (_, "/healthz") | (_, "/") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, p) if p == "/queries" || p.starts_with("/queries/") => admin::route(&state, req).await,
        (_, p) if p == "/models" || p.starts_with("/models/") => models::route(&state, req).await,
        _ => json_error(StatusCode::NOT_FOUND, "no such path"),
    }
}

/// Reads a body of at most `limit` bytes; `Err` is the response to send instead.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes().to_vec()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes (max_frame_bytes)"),
        )),
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read body: {e}"),
        )),
    }
}

async fn post_ingest(state: &State, req: Request<Incoming>) -> Response<Body> {
    if let Some(token) = &state.config.ingest_token {
        if !authorized(&req, token) {
            return json_error(StatusCode::UNAUTHORIZED, "missing or wrong token");
        }
    }
    if *state.shutdown.borrow() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let stream = query_params(&req)
        .remove("stream")
        .filter(|s| !s.is_empty());
    let body = match read_body(req, state.config.max_frame_bytes).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let counters = state.metrics.stream(stream.as_deref().unwrap_or("-"));
    let mut parser = crate::event::Parser::default();
    let outcome = ingest::ingest(state, &mut parser, body, stream.as_deref(), &counters).await;
    let mut out = Vec::new();
    outcome.write_json(b"", &mut out);
    let status = if outcome.nothing_was_json {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    respond(status, "application/json", out)
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
