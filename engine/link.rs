//! The client side of a WebSocket to an eddy server, for `eddy feed` and `eddy probe`: it opens
//! the connection and notices when the server is gone.
//!
//! [`Link::open`] connects and does the handshake within a time limit. The write half lives in a
//! task that sends what it is given through [`Link::outgoing`] (a bounded queue: the caller
//! bounds what it queues, here by its ack window or by sending only requests) and pings the
//! server every quarter of the timeout. [`Incoming::next`] returns the server's next data frame,
//! or why the connection is over: a close from the server, an error on the socket, or silence
//! (no frame at all, not even a pong, for the timeout). So a server that closes, dies or stops
//! answering is noticed within the timeout, whatever the caller is doing. [`Backoff`] spaces
//! reconnection attempts.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The default time a server may stay silent before a client gives it up.
pub const SILENCE: Duration = Duration::from_secs(1);

/// Frames the outgoing queue holds. A caller queues at most this many (the feed's ack window is
/// smaller); the reader's pongs are dropped when it is full.
pub const OUTGOING: usize = 128;

/// Why a client could not connect.
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
    #[error("no WebSocket to {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// Why an open connection is over.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("the server sent nothing for {0:?}")]
    Silent(Duration),
    #[error("the server closed the connection (code {0})")]
    Closed(u16),
    #[error("the connection broke: {0}")]
    Broken(#[source] WebSocketError),
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

type Io = TokioIo<Upgraded>;

/// Opens a WebSocket to `path` (with its query string) on the server at `url`, with no time
/// limit (see [`Link::open`] for one).
pub async fn connect(url: &str, path: &str) -> Result<WebSocket<Io>, ClientError> {
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

/// An open connection: frames to send go into `outgoing`, the server's come from `incoming`.
pub struct Link {
    pub outgoing: mpsc::Sender<Frame<'static>>,
    pub incoming: Incoming,
}

/// The read half of a [`Link`]. Dropping it stops the writer task.
pub struct Incoming {
    read: WebSocketRead<ReadHalf<Io>>,
    /// For the pongs and the close echo the reader owes the server.
    owed: mpsc::Sender<Frame<'static>>,
    writer: JoinHandle<()>,
    timeout: Duration,
}

impl Link {
    /// Connects to `path` on `url`; the TCP connection and the handshake together take at most
    /// `timeout`, which is also the silence after which [`Incoming::next`] gives up.
    pub async fn open(url: &str, path: &str, timeout: Duration) -> Result<Link, ClientError> {
        let ws = tokio::time::timeout(timeout, connect(url, path))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: host_of(url).unwrap_or_default(),
                timeout,
            })??;
        let (read, write) = ws.split(tokio::io::split);
        let (outgoing, queue) = mpsc::channel(OUTGOING);
        let writer = tokio::spawn(write_loop(write, queue, timeout / 4));
        Ok(Link {
            incoming: Incoming {
                read,
                owed: outgoing.clone(),
                writer,
                timeout,
            },
            outgoing,
        })
    }
}

impl Incoming {
    /// The payload of the next text or binary frame, or why the connection is over. The payload
    /// is the frame's own bytes in the read buffer, not a copy: a probe on a thousand busy
    /// connections would otherwise spend most of its time allocating (and the kernel zeroing
    /// fresh pages for) copies of large frames.
    pub async fn next(&mut self) -> Result<BytesMut, Lost> {
        let owed = &self.owed;
        let mut send = |frame: Frame<'_>| {
            // A pong or close echo; if the queue is full the server gets the next one.
            let _ = owed.try_send(owned(frame));
            std::future::ready(Ok::<(), WebSocketError>(()))
        };
        loop {
            let frame = tokio::time::timeout(self.timeout, self.read.read_frame(&mut send))
                .await
                .map_err(|_| Lost::Silent(self.timeout))?
                .map_err(Lost::Broken)?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    return Ok(match frame.payload {
                        Payload::Bytes(bytes) => bytes,
                        other => BytesMut::from(&*other),
                    })
                }
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    return Err(Lost::Closed(code));
                }
                _ => {}
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

fn owned(frame: Frame<'_>) -> Frame<'static> {
    Frame::new(
        frame.fin,
        frame.opcode,
        None,
        Payload::Owned(frame.payload.to_vec()),
    )
}

/// Sends what is queued, and a ping every `ping_every`; when the queue's senders are all gone,
/// sends a close and ends.
async fn write_loop(
    mut write: fastwebsockets::WebSocketWrite<WriteHalf<Io>>,
    mut queue: mpsc::Receiver<Frame<'static>>,
    ping_every: Duration,
) {
    let mut ticker = tokio::time::interval(ping_every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            frame = queue.recv() => match frame {
                Some(frame) => frame,
                None => {
                    let close = write.write_frame(Frame::close(1000, b""));
                    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    return;
                }
            },
            _ = ticker.tick() => Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"eddy")),
        };
        if write.write_frame(frame).await.is_err() {
            return;
        }
    }
}

/// Delays between reconnection attempts: 50 ms, doubling up to 1 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Backoff::FIRST,
        }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(1);

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        delay
    }

    /// After a connection that worked.
    pub fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_backoff() {
        assert_eq!(host_of("ws://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(host_of("http://localhost:1/x").unwrap(), "localhost:1");
        assert!(host_of("ws://nowhere").is_err());
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }
}
