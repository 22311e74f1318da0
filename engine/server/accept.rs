//! Accepting connections within bounds: how many are open, how long one may take to send its
//! request head, and what happens past the limit.
//!
//! Every accepted TCP stream is wrapped in a [`Counted`] that holds one slot of
//! [`Connections::open`] for as long as the socket lives (through an upgrade to WebSocket, too).
//! A connection must send a complete request head within `handshake_timeout`, or hyper closes
//! it: slowloris clients (one header byte a second) and silent TCP connections are closed, and
//! so are keep-alive connections idle that long between requests.
//!
//! Past `max_connections`, the accept loop first sheds the oldest connection that has not yet
//! sent a request head (it is holding a slot without asking for anything), so that a client that
//! does speak gets in even while slots are held by silent or slow ones. When every slot is held
//! by a connection that has asked for something (producers, subscribers), up to
//! [`RESERVE`] more connections are served for `/healthz`, `/metrics` and the admin API only
//! (`/queries`, `/models`), and others get `503` naming `max_connections`; past the reserve too,
//! a connection gets a bare `503` and is closed. So the operator can always look and act.
//!
//! An accept error (out of file descriptors, most often) backs off, doubling from 10 ms to 1 s,
//! and is logged once per episode instead of once per attempt.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use super::State;

/// Connections served past `max_connections` for `/healthz`, `/metrics` and the admin API.
pub const RESERVE: usize = 32;

/// File descriptors left for everything but connections (listener, files, models, runtime)
/// when `max_connections` is derived from the descriptor limit.
const OTHER_FDS: u64 = 64;

/// Connections the kernel completes and queues for the accept loop (capped by the system's
/// `somaxconn`): a burst of clients past the queue would wait for SYN-ACK retransmissions,
/// seconds later.
const BACKLOG: u32 = 4096;

/// A listener on `addr` with a [`BACKLOG`]-deep accept queue.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The default `max_connections`: the soft limit on open files, less the [`RESERVE`] and what
/// the process needs besides (at least 16).
pub fn default_max_connections() -> usize {
    let soft = open_files_limit().unwrap_or(1024);
    soft.saturating_sub(OTHER_FDS + RESERVE as u64)
        .clamp(16, 1 << 20) as usize
}

/// The soft `RLIMIT_NOFILE`, when the platform has one.
fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
            return Some(limit.rlim_cur as u64);
        }
    }
    None
}

/// The connection counters, read by `/metrics`.
#[derive(Default)]
pub struct Connections {
    /// Open TCP connections (HTTP, and WebSocket after the upgrade).
    pub open: AtomicUsize,
    /// Connections answered 503 because `max_connections` was reached.
    pub refused: AtomicU64,
    /// Connections closed before sending a request head to make room past `max_connections`.
    pub shed: AtomicU64,
    /// Connections closed for not sending a request head within `handshake_timeout`.
    pub timed_out: AtomicU64,
    /// Failed accepts (each backed off).
    pub accept_errors: AtomicU64,
}

/// The socket of the connection a request came on (a request extension), for a subscriber's
/// mailbox to write to straight (see [`super::mailbox`]).
#[derive(Clone, Copy)]
pub struct SocketFd(std::os::fd::RawFd);

impl SocketFd {
    /// A descriptor of its own for the same socket. Only while the connection is open (its
    /// stream, or the upgraded connection, alive): the number could name another file after.
    pub fn duplicate(self) -> Option<std::os::fd::OwnedFd> {
        // SAFETY: the caller holds the connection, so the descriptor is open for the call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) };
        fd.try_clone_to_owned().ok()
    }
}

/// A TCP stream holding a slot of [`Connections::open`] until it is dropped.
pub struct Counted {
    stream: TcpStream,
    slot: Slot,
}

/// One slot of [`Connections::open`], given back once: when the connection is shed (its task
/// is aborted, and dropped by the runtime a little later) or when its stream is dropped.
#[derive(Clone)]
struct Slot {
    state: Arc<State>,
    released: Arc<AtomicBool>,
}

impl Slot {
    fn release(&self) {
        if !self.released.swap(true, Ordering::Relaxed) {
            self.state.connections.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Counted {
    fn new(stream: TcpStream, state: &Arc<State>) -> Counted {
        state.connections.open.fetch_add(1, Ordering::Relaxed);
        Counted {
            stream,
            slot: Slot {
                state: Arc::clone(state),
                released: Arc::default(),
            },
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.slot.release();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Whether `path` is served from the reserve: health, metrics and the admin API.
fn reserved_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/queries" | "/models")
        || path.starts_with("/queries/")
        || path.starts_with("/models/")
}

/// A connection that may be shed while it has not sent a request head.
struct Pending {
    task: AbortHandle,
    spoke: Arc<AtomicBool>,
    slot: Slot,
}

/// Accepts connections until the task is aborted (see the module documentation).
pub async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    connections: Arc<tokio::sync::Mutex<JoinSet<()>>>,
) {
    let max = state.config.max_connections;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut backoff = Duration::ZERO;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                state
                    .connections
                    .accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                if backoff.is_zero() {
                    tracing::warn!(
                        "accept failed: {e}; backing off (open connections: {}, max_connections \
                         = {max})",
                        state.connections.open.load(Ordering::Relaxed)
                    );
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut open = state.connections.open.load(Ordering::Relaxed);
        // Forget connections that have spoken or ended: they cannot be shed.
        let gone = |p: &Pending| p.task.is_finished() || p.spoke.load(Ordering::Relaxed);
        while pending.front().is_some_and(gone) {
            pending.pop_front();
        }
        if pending.len() > 2 * open + 64 {
            pending.retain(|p| !gone(p));
        }
        if open >= max {
            if let Some(silent) = pending.pop_front() {
                // Its socket is closed when the runtime drops the task, soon.
                silent.task.abort();
                silent.slot.release();
                state.connections.shed.fetch_add(1, Ordering::Relaxed);
                open -= 1;
            }
        }
        let stream = Counted::new(stream, &state);
        let slot = stream.slot.clone();
        let reserve = open >= max;
        if open >= max + RESERVE {
            state.connections.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream, max));
            continue;
        }
        let spoke = Arc::new(AtomicBool::new(false));
        let state = Arc::clone(&state);
        let mut set = connections.lock().await;
        // Reap finished connections so the set does not grow.
        while set.try_join_next().is_some() {}
        let flag = Arc::clone(&spoke);
        let task = set.spawn(async move {
            let timeout = state.config.handshake_timeout;
            let service_state = Arc::clone(&state);
            let socket = SocketFd(std::os::fd::AsRawFd::as_raw_fd(&stream.stream));
            let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                if req.uri().path() == "/subscribe" {
                    req.extensions_mut().insert(socket);
                }
                let state = Arc::clone(&service_state);
                flag.store(true, Ordering::Relaxed);
                async move {
                    if reserve && !reserved_path(req.uri().path()) {
                        state.connections.refused.fetch_add(1, Ordering::Relaxed);
                        return Ok::<_, std::convert::Infallible>(super::json_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &too_many(state.config.max_connections),
                        ));
                    }
                    Ok(super::route(state, req).await)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    state.connections.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!("connection ended: {e}");
            }
        });
        if !reserve {
            pending.push_back(Pending { task, spoke, slot });
        }
    }
}

fn too_many(max: usize) -> String {
    format!(
        "too many connections: {max} are open, the limit (max_connections); /healthz, /metrics \
         and the admin API still answer"
    )
}

/// Answers `503` without reading the request, and closes.
async fn refuse(mut stream: Counted, max: usize) {
    let body = too_many(max);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
