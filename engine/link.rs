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

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket, WebSocketError};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::server::ws::{self, ReadError, Reader};

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
    Broken(#[source] ReadError),
}

/// Largest message a client takes from the server (a snapshot of many keys is one message).
const MAX_MESSAGE: usize = 256 << 20;

/// A data message from the server.
pub struct Received {
    pub payload: Vec<u8>,
    /// Still compressed (permessage-deflate, which only [`Link::open_compressed`] offers): see
    /// [`crate::server::deflate::inflate`] and [`crate::server::deflate::inflate_prefix`].
    pub compressed: bool,
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
    connect_offering(url, path, false).await.map(|(ws, _)| ws)
}

/// [`connect`], offering permessage-deflate when `deflate`; the second value says whether the
/// server took it.
async fn connect_offering(
    url: &str,
    path: &str,
    deflate: bool,
) -> Result<(WebSocket<Io>, bool), ClientError> {
    let addr = host_of(url)?;
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let mut request = hyper::Request::builder();
    if deflate {
        request = request.header(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_no_context_takeover; server_no_context_takeover",
        );
    }
    let request = request
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
    let (ws, response) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|source| ClientError::Handshake { addr, source })?;
    let taken = response
        .headers()
        .get("sec-websocket-extensions")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("permessage-deflate"));
    Ok((ws, deflate && taken))
}

/// An open connection: frames to send go into `outgoing`, the server's come from `incoming`.
pub struct Link {
    pub outgoing: mpsc::Sender<Frame<'static>>,
    pub incoming: Incoming,
}

/// The read half of a [`Link`]. Dropping it stops the writer task.
pub struct Incoming {
    read: Reader<ReadHalf<Io>>,
    /// For the pongs and the close echo the reader owes the server.
    owed: mpsc::Sender<Frame<'static>>,
    writer: JoinHandle<()>,
    timeout: Duration,
    /// The silence timer, made once and moved only when it goes off early (see
    /// `Incoming::next_frame`): a timer made and cancelled per frame cost a probe with a thousand
    /// connections about 2 % of its CPU in the runtime's timer wheel.
    silence: Pin<Box<tokio::time::Sleep>>,
    /// When the current read began waiting.
    waiting_since: Instant,
}

impl Link {
    /// Connects to `path` on `url`; the TCP connection and the handshake together take at most
    /// `timeout`, which is also the silence after which [`Incoming::next`] gives up.
    pub async fn open(url: &str, path: &str, timeout: Duration) -> Result<Link, ClientError> {
        Self::open_offering(url, path, timeout, false).await
    }

    /// [`Link::open`], offering permessage-deflate: messages the server compressed come back
    /// still compressed ([`Received::compressed`]), for the caller to inflate as much as it
    /// needs.
    pub async fn open_compressed(
        url: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Link, ClientError> {
        Self::open_offering(url, path, timeout, true).await
    }

    async fn open_offering(
        url: &str,
        path: &str,
        timeout: Duration,
        deflate: bool,
    ) -> Result<Link, ClientError> {
        let (ws, deflate) = tokio::time::timeout(timeout, connect_offering(url, path, deflate))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: host_of(url).unwrap_or_default(),
                timeout,
            })??;
        // Frames are read by the server's own reader (which knows permessage-deflate) and
        // written by fastwebsockets (which masks them, as a client must).
        let (read, write) = tokio::io::split(ws.into_inner());
        let (_, write) =
            fastwebsockets::after_handshake_split(tokio::io::empty(), write, Role::Client);
        let read = Reader::new(read, MAX_MESSAGE).of_server(deflate);
        let (outgoing, queue) = mpsc::channel(OUTGOING);
        let writer = tokio::spawn(write_loop(write, queue, timeout / 4));
        Ok(Link {
            incoming: Incoming {
                read,
                owed: outgoing.clone(),
                writer,
                timeout,
                silence: Box::pin(tokio::time::sleep(timeout)),
                waiting_since: Instant::now(),
            },
            outgoing,
        })
    }
}

impl Incoming {
    /// The next text or binary message, or why the connection is over. Pings are answered
    /// (through the writer's queue; if it is full the server gets the next one), and a close
    /// from the server is echoed.
    pub async fn next(&mut self) -> Result<Received, Lost> {
        loop {
            let incoming = self.next_frame().await?;
            match incoming {
                ws::Incoming::Message(m) => {
                    return Ok(Received {
                        payload: m.payload,
                        compressed: m.compressed,
                    })
                }
                ws::Incoming::Ping(payload) => {
                    let pong = Frame::new(true, OpCode::Pong, None, Payload::Owned(payload));
                    let _ = self.owed.try_send(pong);
                }
                ws::Incoming::Pong => {}
                ws::Incoming::Close(code) => {
                    let echo = match code {
                        Some(code) => Frame::close(code, b""),
                        None => Frame::new(true, OpCode::Close, None, Payload::Owned(Vec::new())),
                    };
                    let _ = self.owed.try_send(echo);
                    return Err(Lost::Closed(code.unwrap_or(1005)));
                }
            }
        }
    }

    /// The next frame, or [`Lost::Silent`] when none came within the timeout of this call: the
    /// same as `tokio::time::timeout(self.timeout, self.read.next())`, without a timer per
    /// frame. The timer is left where it was; when it goes off before this call's timeout it is
    /// moved to that, and the read (which must not be dropped halfway through a frame) goes
    /// on.
    async fn next_frame(&mut self) -> Result<ws::Incoming, Lost> {
        self.waiting_since = Instant::now();
        let read = self.read.next();
        tokio::pin!(read);
        loop {
            tokio::select! {
                biased;
                incoming = &mut read => return incoming.map_err(Lost::Broken),
                () = &mut self.silence => {
                    let due = self.waiting_since + self.timeout;
                    if Instant::now() >= due {
                        return Err(Lost::Silent(self.timeout));
                    }
                    self.silence.as_mut().reset(due.into());
                }
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.writer.abort();
    }
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

    /// A WebSocket server on 127.0.0.1 for one connection: it sends a text frame `"n"` after
    /// each delay of `gaps`, then keeps the connection open and says nothing.
    async fn server_sending_after(gaps: Vec<Duration>) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let gaps = std::sync::Mutex::new(Some(gaps));
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let gaps = gaps.lock().unwrap().take().unwrap_or_default();
                async move {
                    let (response, upgrade) = fastwebsockets::upgrade::upgrade(req)?;
                    tokio::spawn(async move {
                        let mut ws = upgrade.await.unwrap();
                        for (n, gap) in gaps.into_iter().enumerate() {
                            tokio::time::sleep(gap).await;
                            let text = n.to_string().into_bytes();
                            ws.write_frame(Frame::text(Payload::Owned(text)))
                                .await
                                .unwrap();
                        }
                        // Silent, and open: reading nothing, it answers no ping either.
                        std::future::pending::<()>().await;
                        drop(ws);
                    });
                    Ok::<_, WebSocketError>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
        url
    }

    /// The silence timer is made once per connection and moved on (see [`Incoming::next`]):
    /// frames closer together than the timeout never count as silence, however long the
    /// connection lasts; a frame that came while nobody was reading is read, not taken for
    /// silence; and a server that stops sending is given up once the timeout has passed since
    /// the read began, not before.
    #[tokio::test]
    async fn silence_is_measured_from_each_read_and_only_then() {
        let timeout = Duration::from_millis(300);
        // Six frames 200 ms apart (1.2 s in all, four timeouts), then one after a pause.
        let mut gaps = vec![Duration::from_millis(200); 6];
        gaps.push(Duration::from_millis(100));
        let url = server_sending_after(gaps).await;
        let mut link = Link::open(&url, "/", timeout).await.unwrap();
        for n in 0..6 {
            let got = link.incoming.next().await.unwrap();
            assert_eq!(got.payload, n.to_string().into_bytes());
        }
        // The last frame comes 100 ms from now; nobody reads for 500 ms, more than the timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(link.incoming.next().await.unwrap().payload, b"6");
        // Then nothing: given up as silent, no sooner than the timeout after the read began.
        let began = Instant::now();
        let lost = tokio::time::timeout(Duration::from_secs(10), link.incoming.next())
            .await
            .expect("silence is noticed");
        match lost {
            Err(Lost::Silent(t)) => assert_eq!(t, timeout),
            Err(other) => panic!("lost otherwise: {other}"),
            Ok(_) => panic!("a frame the server never sent"),
        }
        assert!(began.elapsed() >= timeout);
    }
}
