//! WebSocket plumbing shared by ingest and subscribe connections (fastwebsockets).
//!
//! A connection is split: one task reads frames, another owns the write half. The write half
//! sits on a `BufWriter`, and the writer flushes only when it has nothing more queued, so a burst
//! of small messages leaves in one system call. The reader's obligatory replies (pong, the close
//! echo) and everything else to write reach the writer through a bounded channel: when a client
//! does not read, the writer stalls on TCP, the channel fills, and the reader stops reading.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket, WebSocketError, WebSocketWrite,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

pub type Io = TokioIo<Upgraded>;
pub type WsRead = FragmentCollectorRead<ReadHalf<Io>>;
pub type WsWrite = WebSocketWrite<BufWriter<WriteHalf<Io>>>;

/// Close codes used by the server.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// Splits an upgraded connection into its reading and (buffered) writing halves.
pub fn split(ws: WebSocket<Io>, max_message_bytes: usize) -> (WsRead, WsWrite) {
    let (read, write) = tokio::io::split(ws.into_inner());
    let (mut read, mut write) = fastwebsockets::after_handshake_split(
        read,
        BufWriter::with_capacity(64 * 1024, write),
        Role::Server,
    );
    read.set_max_message_size(max_message_bytes);
    read.set_auto_close(true);
    read.set_auto_pong(true);
    write.set_writev(false);
    (FragmentCollectorRead::new(read), write)
}

/// Something for the writer to send.
pub enum Outbound {
    Text(Bytes),
    Pong(Vec<u8>),
    /// The echo of a client's close frame (raw payload).
    CloseEcho(Vec<u8>),
    Close(u16, &'static str),
}

/// Turns a frame the reader is obliged to send into an [`Outbound`].
pub fn obligated(frame: Frame<'_>) -> Outbound {
    match frame.opcode {
        OpCode::Close => Outbound::CloseEcho(frame.payload.to_vec()),
        _ => Outbound::Pong(frame.payload.to_vec()),
    }
}

/// Writes one message (unflushed). Returns whether the connection should end (a close went out).
pub async fn write(ws: &mut WsWrite, msg: Outbound) -> Result<bool, WebSocketError> {
    match msg {
        Outbound::Text(text) => {
            ws.write_frame(Frame::text(Payload::Borrowed(&text)))
                .await?;
            Ok(false)
        }
        Outbound::Pong(payload) => {
            ws.write_frame(Frame::pong(Payload::Owned(payload))).await?;
            Ok(false)
        }
        Outbound::CloseEcho(payload) => {
            ws.write_frame(Frame::close_raw(Payload::Owned(payload)))
                .await?;
            Ok(true)
        }
        Outbound::Close(code, reason) => {
            ws.write_frame(Frame::close(code, reason.as_bytes()))
                .await?;
            Ok(true)
        }
    }
}

/// Sends a ping.
pub async fn ping(ws: &mut WsWrite) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(b"eddy"),
    ))
    .await
}

/// When the peer was last heard from, shared by a connection's reader and writer.
#[derive(Clone)]
pub struct Liveness {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Liveness {
    pub fn heard(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn silent_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The close code and reason for a read error, when one should be sent.
pub fn close_for(error: &WebSocketError) -> Option<(u16, &'static str)> {
    match error {
        WebSocketError::FrameTooLarge => Some((close::TOO_BIG, "message too large")),
        WebSocketError::InvalidUTF8 => Some((close::INVALID_DATA, "invalid UTF-8")),
        WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF => None,
        _ => Some((close::POLICY, "protocol error")),
    }
}

/// The writer half of a simple connection (ingest): writes what arrives, flushes when idle,
/// pings every `ping` and closes a peer silent for two intervals.
pub async fn run_writer(
    mut ws: WsWrite,
    mut rx: mpsc::Receiver<Outbound>,
    liveness: Liveness,
    ping_every: Duration,
) {
    let mut ticker = tokio::time::interval(ping_every);
    ticker.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let mut done = matches!(write(&mut ws, msg).await, Ok(true) | Err(_));
                while !done {
                    match rx.try_recv() {
                        Ok(msg) => done = matches!(write(&mut ws, msg).await, Ok(true) | Err(_)),
                        Err(_) => break,
                    }
                }
                if ws.flush().await.is_err() || done {
                    break;
                }
            }
            _ = ticker.tick() => {
                if liveness.silent_for() > ping_every * 2 {
                    let _ = write(&mut ws, Outbound::Close(close::GOING_AWAY, "no pong")).await;
                    let _ = ws.flush().await;
                    break;
                }
                if ping(&mut ws).await.is_err() || ws.flush().await.is_err() {
                    break;
                }
            }
        }
    }
}
