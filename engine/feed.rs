//! `eddy feed`: a load generator for eddy (and for anything that speaks its ingest protocol).
//!
//! Each connection sends frames of `batch` synthetic events (the seeded generators of
//! [`crate::synth`]) to `/ingest?stream=S&ack=true`, paced to its share of the asked rate, or as
//! fast as acks allow with at most [`WINDOW`] frames in flight. Every event carries `sent_us`,
//! the wall-clock time (epoch µs) its frame was sent, so a subscriber (`eddy probe`) can measure
//! the latency from producer to subscriber. The report counts events and frames sent, and the
//! accepted and rejected totals from the acks.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::synth::{Feed, Scenario};

/// Frames a connection may have sent without an ack.
pub const WINDOW: usize = 64;

/// Why a client could not run.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?}: expected ws://HOST:PORT or http://HOST:PORT")]
    Url(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("WebSocket handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        source: WebSocketError,
    },
}

/// `host:port` of a `ws://`, `http://` or bare URL.
pub fn host_of(url: &str) -> Result<String, ClientError> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || !host.contains(':') {
        return Err(ClientError::Url(url.to_owned()));
    }
    Ok(host.to_owned())
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Opens a WebSocket to `path` (with its query string) on the server at `url`.
pub async fn connect(url: &str, path: &str) -> Result<WebSocket<TokioIo<Upgraded>>, ClientError> {
    let addr = host_of(url)?;
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let request = hyper::Request::builder()
        .method("GET")
        .uri(format!("http://{addr}{path}"))
        .header("Host", &addr)
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|_| ClientError::Url(url.to_owned()))?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|source| ClientError::Handshake { addr, source })?;
    Ok(ws)
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// What to send.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    pub url: String,
    pub scenario: Scenario,
    /// Events per second over all connections; `None`: as fast as acks allow.
    pub rate: Option<u64>,
    pub batch: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Distinct keys (0: the scenario's default).
    pub keys: usize,
    pub seed: u64,
}

/// What was sent and acknowledged.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FeedReport {
    pub events: u64,
    pub frames: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub frames_per_second: f64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    frames: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// Runs the feed; prints progress to stderr once a second when `progress` is set.
pub async fn run(options: FeedOptions, progress: bool) -> Result<FeedReport, ClientError> {
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.connections.max(1) {
        let ws = connect(
            &options.url,
            &format!("/ingest?stream={}&ack=true", options.scenario.stream()),
        )
        .await?;
        let options = options.clone();
        let counters = Arc::clone(&counters);
        tasks.push(tokio::spawn(async move {
            connection(ws, &options, c as u64, &counters, start).await;
        }));
    }
    let ticker = progress.then(|| {
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let events = counters.events.load(Ordering::Relaxed);
                let acked = counters.accepted.load(Ordering::Relaxed);
                let line = format!(
                    "{:>5.1}s  {:>10} events/s  {:>12} sent  {:>12} accepted",
                    start.elapsed().as_secs_f64(),
                    events - last,
                    events,
                    acked
                );
                last = events;
                if tty {
                    eprint!("\r{line}");
                } else {
                    eprintln!("{line}");
                }
                let _ = std::io::stderr().flush();
            }
        })
    });
    for t in tasks {
        let _ = t.await;
    }
    if let Some(t) = ticker {
        t.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let events = counters.events.load(Ordering::Relaxed);
    let frames = counters.frames.load(Ordering::Relaxed);
    Ok(FeedReport {
        events,
        frames,
        accepted: counters.accepted.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        seconds,
        events_per_second: events as f64 / seconds,
        frames_per_second: frames as f64 / seconds,
    })
}

async fn connection(
    ws: WebSocket<TokioIo<Upgraded>>,
    options: &FeedOptions,
    index: u64,
    counters: &Arc<Counters>,
    start: Instant,
) {
    let (mut read, mut write) = ws.split(tokio::io::split);
    let window = Arc::new(Semaphore::new(WINDOW));
    let reader_window = Arc::clone(&window);
    let reader_counters = Arc::clone(counters);
    let reader = tokio::spawn(async move {
        let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), WebSocketError>(()));
        loop {
            let frame = match read.read_frame(&mut ignore).await {
                Ok(frame) => frame,
                Err(_) => break,
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    let (accepted, rejected) = ack_counts(&frame.payload);
                    reader_counters
                        .accepted
                        .fetch_add(accepted, Ordering::Relaxed);
                    reader_counters
                        .rejected
                        .fetch_add(rejected, Ordering::Relaxed);
                    reader_window.add_permits(1);
                }
                OpCode::Close => break,
                _ => {}
            }
        }
    });

    let connections = options.connections.max(1) as f64;
    let per_connection = options.rate.map(|r| r as f64 / connections);
    let mut feed = Feed::new(
        options.scenario,
        options.seed.wrapping_add(index),
        options.keys,
    );
    let mut sent_frames: u64 = 0;
    let mut buf = Vec::with_capacity(options.batch * 128);
    while start.elapsed() < options.duration {
        if let Some(rate) = per_connection {
            let due =
                start + Duration::from_secs_f64(sent_frames as f64 * options.batch as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        buf.clear();
        let sent = now_us();
        let ts = sent / 1000;
        for i in 0..options.batch {
            if i > 0 {
                buf.push(b'\n');
            }
            feed.write_event_stamped(ts, sent, &mut buf);
        }
        let frame = Frame::text(Payload::Borrowed(&buf));
        if write.write_frame(frame).await.is_err() {
            break;
        }
        sent_frames += 1;
        counters.frames.fetch_add(1, Ordering::Relaxed);
        counters
            .events
            .fetch_add(options.batch as u64, Ordering::Relaxed);
    }
    // Wait (a bounded time) for the last acks.
    let _ = tokio::time::timeout(Duration::from_secs(5), window.acquire_many(WINDOW as u32)).await;
    let _ = write.write_frame(Frame::close(1000, b"done")).await;
    reader.abort();
}

/// `accepted` and `rejected` of an ack, read without a full parse.
fn ack_counts(payload: &[u8]) -> (u64, u64) {
    // The quoted name, then optional spaces, a colon, optional spaces, the digits.
    let field = |name: &[u8]| -> u64 {
        let Some(at) = payload.windows(name.len()).position(|w| w == name) else {
            return 0;
        };
        payload[at + name.len()..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace() || **b == b':')
            .take_while(|b| b.is_ascii_digit())
            .fold(0, |n, b| n * 10 + u64::from(b - b'0'))
    };
    (field(b"\"accepted\""), field(b"\"rejected\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_acks() {
        assert_eq!(host_of("ws://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(host_of("http://localhost:1/x").unwrap(), "localhost:1");
        assert!(host_of("ws://nowhere").is_err());
        let ack = br#"{"type":"ack","frame":3,"accepted":99,"rejected":1,"errors":[]}"#;
        assert_eq!(ack_counts(ack), (99, 1));
        let spaced = br#"{"type": "ack", "frame": 3, "accepted": 7, "rejected": 0}"#;
        assert_eq!(ack_counts(spaced), (7, 0));
    }
}
