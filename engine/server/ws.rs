//! WebSocket (RFC 6455) for both endpoints: the handshake, one reader loop, one writer loop.
//!
//! fastwebsockets only answers the HTTP upgrade ([`handshake`]); frames are read and written
//! here, so that every rule of the RFC is enforced in one place and the size limit applies to
//! whole messages:
//!
//! - [`Reader`] parses client frames and assembles messages. It refuses unmasked frames,
//!   reserved bits, unknown opcodes, fragmented or oversized (> 125 bytes) control frames, a
//!   continuation with no message started, a new message inside a fragmented one, a 64-bit
//!   length with its top bit set and bad close payloads (1002); invalid UTF-8 in a text message
//!   or a close reason (1007), checked as bytes arrive so that it fails fast; and a message
//!   larger than the connection's limit (1009). The limit is checked against the length a
//!   frame header announces, *before* its payload is read, so a message never holds more than
//!   `limit` bytes and the assembly buffer never grows past it.
//! - [`Inbox`] is the reader loop: it answers pings, echoes the peer's close code, sends the
//!   close code of a violation, and hands complete messages to its endpoint.
//! - [`run_writer`] is the writer loop: it owns the (buffered) write half, writes what the
//!   reader and the endpoint queue on a bounded channel, flushes when it has nothing more
//!   queued, writes what the endpoint's [`Source`] has ready (a subscriber's mailbox), pings
//!   every interval and closes a peer silent for two.
//!
//! Backpressure: the channel to the writer is bounded; when a client does not read, the writer
//! stalls on TCP, the channel fills, and the reader stops reading.

use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fastwebsockets::upgrade::UpgradeFut;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// An upgraded connection.
pub type Io = TokioIo<Upgraded>;

/// The text frame opcode, and the RSV1 bit that marks a compressed message (RFC 7692).
pub const TEXT: u8 = 0x1;
pub const COMPRESSED: u8 = 0x40;

/// Close codes used by the server.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

/// An HTTP answer of the handshake.
pub type HttpResponse = Response<Full<Bytes>>;

/// The WebSocket version this server speaks (RFC 6455).
const VERSION: &str = "13";

/// Checks an upgrade request and answers it. `Err` is the response to send instead: 426 with
/// `Sec-WebSocket-Version: 13` for a request that is not an upgrade or asks for another
/// version (RFC 6455 §4.2.2), 400 for one without a key. With `deflate`, a permessage-deflate
/// offer the server can take is accepted (see [`super::deflate`]); the last value says whether
/// it was.
#[allow(clippy::result_large_err)]
pub fn handshake<B>(
    req: &mut Request<B>,
    deflate: bool,
) -> Result<(HttpResponse, UpgradeFut, bool), HttpResponse> {
    let refuse = |status, text: &str| {
        let mut response = super::json_error(status, text);
        let headers = response.headers_mut();
        headers.insert("sec-websocket-version", HeaderValue::from_static(VERSION));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        response
    };
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this path speaks WebSocket",
        ));
    }
    let version = req.headers().get("sec-websocket-version");
    if version.is_none_or(|v| v.as_bytes() != VERSION.as_bytes()) {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version: this server speaks version 13 (RFC 6455)",
        ));
    }
    let deflate = deflate
        && req
            .headers()
            .get_all("sec-websocket-extensions")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(super::deflate::accepts);
    match fastwebsockets::upgrade::upgrade(req) {
        Ok((response, upgrade)) => {
            let (mut parts, _) = response.into_parts();
            if deflate {
                parts.headers.insert(
                    "sec-websocket-extensions",
                    HeaderValue::from_static(super::deflate::RESPONSE),
                );
            }
            Ok((
                Response::from_parts(parts, Full::new(Bytes::new())),
                upgrade,
                deflate,
            ))
        }
        Err(e) => Err(super::json_error(StatusCode::BAD_REQUEST, &e.to_string())),
    }
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A violation of RFC 6455; the text is the reason sent with close code 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message larger than {limit} bytes ({reason})")]
    TooBig { limit: usize, reason: &'static str },
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
}

impl ReadError {
    /// The close code and reason to send, when one should be sent.
    pub fn close(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Protocol(reason) => Some((close::PROTOCOL, reason)),
            ReadError::TooBig { reason, .. } => Some((close::TOO_BIG, reason)),
            ReadError::InvalidUtf8 => Some((close::INVALID_DATA, "invalid UTF-8")),
        }
    }
}

/// A complete data message.
#[derive(Debug)]
pub struct Message {
    pub binary: bool,
    pub payload: Vec<u8>,
    /// Still compressed (permessage-deflate): only from a reader of a server's frames
    /// ([`Reader::of_server`]).
    pub compressed: bool,
}

/// What [`Reader::next`] read.
#[derive(Debug)]
pub enum Incoming {
    Message(Message),
    Ping(Vec<u8>),
    Pong,
    /// The peer's close frame, with its code if it gave one (already validated).
    Close(Option<u16>),
}

/// Bytes read from the socket at a time, at most: a connection reads in chunks of a 64th of its
/// message limit within [`MIN_READ_CHUNK`, `READ_CHUNK`] (so 16 KiB for producers, 1 KiB for
/// subscribers, whose requests are small), and its read buffer is given back whenever it
/// empties past that, so an idle connection holds no more than one small chunk.
const READ_CHUNK: usize = 16 * 1024;
const MIN_READ_CHUNK: usize = 512;
/// Most a message buffer is grown by ahead of the bytes that fill it, below [`GROW_TO_LIMIT`].
const GROW_AHEAD: usize = 256 * 1024;
/// A message buffer that needs more than this is sized to the limit.
const GROW_TO_LIMIT: usize = 1 << 20;

/// Reads client frames and assembles messages of at most `limit` bytes (see the module docs).
pub struct Reader<R> {
    io: R,
    /// Bytes read but not yet parsed: frame headers, control payloads, the start of a payload.
    buf: BytesMut,
    limit: usize,
    /// Bytes read at a time (see [`READ_CHUNK`]).
    chunk: usize,
    /// The close reason for a message over `limit`, naming the limit.
    too_big: &'static str,
    /// The message being assembled: `Some(binary)` between its first and its final frame.
    partial: Option<bool>,
    /// Whether the connection negotiated permessage-deflate, and whether the message being
    /// assembled is compressed (RSV1 on its first frame).
    deflate: bool,
    compressed: bool,
    /// Read a server's frames (unmasked) rather than a client's (masked); compressed ones are
    /// then handed on as they came, for the client to inflate as much as it needs.
    from_server: bool,
    message: Vec<u8>,
    /// How much of a text `message` is known to be valid UTF-8.
    valid: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R, limit: usize) -> Self {
        let chunk = (limit / 64).clamp(MIN_READ_CHUNK, READ_CHUNK);
        Reader {
            io,
            buf: BytesMut::new(),
            limit,
            chunk,
            too_big: "message larger than max_frame_bytes",
            partial: None,
            deflate: false,
            compressed: false,
            from_server: false,
            message: Vec::new(),
            valid: 0,
        }
    }

    /// Takes compressed messages (permessage-deflate was negotiated): a message whose first
    /// frame has RSV1 set is inflated once complete, to at most the limit (a larger result is
    /// refused with 1009 like a larger message), and its UTF-8 checked then.
    pub fn inflating(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// Reads a server's frames, for a client: they must not be masked, and compressed messages
    /// (when `deflate`) are handed on still compressed.
    pub fn of_server(mut self, deflate: bool) -> Self {
        self.from_server = true;
        self.deflate = deflate;
        self
    }

    /// Names the limit in the close reason of a message over it (`message larger than
    /// max_frame_bytes` by default).
    pub fn naming_limit(mut self, too_big: &'static str) -> Self {
        self.too_big = too_big;
        self
    }

    /// Bytes of memory the reader holds (its buffers' capacities).
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity() + self.message.capacity()
    }

    /// Most bytes the reader ever holds for a limit of `limit` (with permessage-deflate, a
    /// message's inflated copy of at most `limit` more, while it is inflated).
    pub fn max_held_bytes(limit: usize) -> usize {
        limit + 2 * READ_CHUNK + 256
    }

    /// Reads until a message, a control frame or an error.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            self.fill(2).await?;
            let (b0, b1) = (self.buf[0], self.buf[1]);
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0f;
            // RSV1 marks a compressed message, on its first frame only (RFC 7692 §6).
            let rsv1 = b0 & 0x40 != 0;
            if b0 & 0x30 != 0 || (rsv1 && !(self.deflate && matches!(opcode, 0x1 | 0x2))) {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            let masked = b1 & 0x80 != 0;
            if !masked && !self.from_server {
                return Err(ReadError::Protocol("client frames must be masked"));
            }
            if masked && self.from_server {
                return Err(ReadError::Protocol("server frames must not be masked"));
            }
            let mask_len = if masked { 4 } else { 0 };
            let extended = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            self.fill(2 + extended + mask_len).await?;
            let len = match extended {
                0 => u64::from(b1 & 0x7f),
                2 => u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                _ => u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")),
            };
            if len >> 63 != 0 {
                return Err(ReadError::Protocol("64-bit length with its top bit set"));
            }
            let m = 2 + extended;
            let mask = if masked {
                [
                    self.buf[m],
                    self.buf[m + 1],
                    self.buf[m + 2],
                    self.buf[m + 3],
                ]
            } else {
                [0; 4]
            };
            self.buf.advance(m + mask_len);
            match opcode {
                0x8..=0xa => {
                    if !fin {
                        return Err(ReadError::Protocol("fragmented control frame"));
                    }
                    if len > 125 {
                        return Err(ReadError::Protocol("control frame longer than 125 bytes"));
                    }
                    let len = len as usize;
                    self.fill(len).await?;
                    let mut payload = self.buf.split_to(len).to_vec();
                    unmask(&mut payload, mask, 0);
                    return match opcode {
                        0x8 => close_frame(&payload),
                        0x9 => Ok(Incoming::Ping(payload)),
                        _ => Ok(Incoming::Pong),
                    };
                }
                0x0..=0x2 => {
                    match (opcode, self.partial) {
                        (0x0, None) => {
                            return Err(ReadError::Protocol(
                                "continuation frame with no message started",
                            ))
                        }
                        (0x1 | 0x2, Some(_)) => {
                            return Err(ReadError::Protocol(
                                "new message inside a fragmented message",
                            ))
                        }
                        (0x1 | 0x2, None) => {
                            self.partial = Some(opcode == 0x2);
                            self.compressed = rsv1;
                        }
                        _ => {}
                    }
                    // Counted before a byte of the payload is read or buffered.
                    if len > (self.limit - self.message.len()) as u64 {
                        return Err(ReadError::TooBig {
                            limit: self.limit,
                            reason: self.too_big,
                        });
                    }
                    self.payload(len as usize, mask).await?;
                    if fin {
                        let binary = self.partial.take() == Some(true);
                        let mut payload = std::mem::take(&mut self.message);
                        let compressed = std::mem::take(&mut self.compressed);
                        if compressed && self.from_server {
                            self.valid = 0;
                            return Ok(Incoming::Message(Message {
                                binary,
                                payload,
                                compressed,
                            }));
                        }
                        if compressed {
                            payload = self.inflate(&payload)?;
                            if !binary && simdutf8::basic::from_utf8(&payload).is_err() {
                                return Err(ReadError::InvalidUtf8);
                            }
                        } else if !binary && self.valid != payload.len() {
                            return Err(ReadError::InvalidUtf8);
                        }
                        self.valid = 0;
                        return Ok(Incoming::Message(Message {
                            binary,
                            payload,
                            compressed: false,
                        }));
                    }
                }
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
    }

    /// A compressed message, inflated within the limit.
    fn inflate(&self, payload: &[u8]) -> Result<Vec<u8>, ReadError> {
        use super::deflate::InflateError;
        super::deflate::inflate(payload, self.limit).map_err(|e| match e {
            InflateError::TooBig => ReadError::TooBig {
                limit: self.limit,
                reason: self.too_big,
            },
            InflateError::Invalid => ReadError::Protocol("invalid compressed data"),
        })
    }

    /// Makes `buf` hold at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), ReadError> {
        while self.buf.len() < n {
            if self.buf.is_empty() && self.buf.capacity() > self.chunk {
                self.buf = BytesMut::new();
            }
            self.buf
                .reserve(self.chunk.saturating_sub(self.buf.len()).max(n));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
        Ok(())
    }

    /// Appends a frame's payload of `len` bytes to the message, unmasked; a text message's
    /// UTF-8 is checked after every read.
    async fn payload(&mut self, len: usize, mask: [u8; 4]) -> Result<(), ReadError> {
        // A compressed message's text is checked once inflated.
        let text = self.partial == Some(false) && !self.compressed;
        let mut done = 0;
        while done < len {
            let start = self.message.len();
            let want = (len - done).min(if self.buf.is_empty() {
                GROW_AHEAD
            } else {
                self.buf.len()
            });
            self.grow(want);
            if self.buf.is_empty() {
                let mut room = (&mut self.message).limit(want);
                if self.io.read_buf(&mut room).await? == 0 {
                    return Err(ReadError::Closed);
                }
            } else {
                self.message.extend_from_slice(&self.buf[..want]);
                self.buf.advance(want);
            }
            unmask(&mut self.message[start..], mask, done);
            done += self.message.len() - start;
            if text {
                self.check_utf8()?;
            }
        }
        Ok(())
    }

    /// Room for `additional` more bytes, never past the limit. Small messages grow by
    /// doubling; past [`GROW_TO_LIMIT`] the buffer is sized to the limit at once: one more
    /// allocation instead of a chain of copies whose freed blocks the allocator would keep, and
    /// pages not yet written are not resident.
    fn grow(&mut self, additional: usize) {
        let needed = self.message.len() + additional;
        let capacity = self.message.capacity();
        if needed > capacity {
            let target = if needed > GROW_TO_LIMIT {
                self.limit
            } else {
                needed.max(capacity * 2).min(self.limit)
            };
            self.message
                .reserve_exact(target.max(needed) - self.message.len());
        }
    }

    /// Fails on invalid UTF-8 in the text received so far; a sequence cut at the end may still
    /// be completed by the next bytes.
    fn check_utf8(&mut self) -> Result<(), ReadError> {
        match simdutf8::compat::from_utf8(&self.message[self.valid..]) {
            Ok(_) => self.valid = self.message.len(),
            Err(e) if e.error_len().is_none() => self.valid += e.valid_up_to(),
            Err(_) => return Err(ReadError::InvalidUtf8),
        }
        Ok(())
    }

    /// Discards what the peer still sends, for at most `time`: the socket is then closed with
    /// nothing unread, so the peer gets the close frame rather than a reset.
    async fn drain(&mut self, time: Duration) {
        let drain = async {
            let mut sink = [0u8; 4096];
            while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let _ = tokio::time::timeout(time, drain).await;
    }
}

/// A close frame's payload: empty, or a valid code and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Incoming, ReadError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(ReadError::Protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Incoming::Close(Some(code)))
        }
    }
}

/// XORs `data` with `mask`, `data` starting `offset` bytes into the masked payload (nothing to
/// do for an unmasked frame, whose mask reads as zeros).
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    if mask == [0; 4] {
        return;
    }
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) & 3]);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// Something for the writer to send.
#[derive(Debug)]
pub enum Outbound {
    Text(Bytes),
    Binary(Bytes),
    Pong(Vec<u8>),
    /// The answer to the peer's close frame: its code echoed, or an empty close.
    CloseReply(Option<u16>),
    Close(u16, &'static str),
}

/// How long a connection that is being failed keeps reading (and discarding) before it closes.
const LINGER: Duration = Duration::from_secs(1);

/// How long a connection the server closes waits for the peer's close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The reader loop of a connection: messages out, control frames answered (see the module docs).
pub struct Inbox<R = ReadHalf<Io>> {
    reader: Reader<R>,
    out: mpsc::Sender<Outbound>,
    liveness: Liveness,
    done: bool,
}

impl<R: AsyncRead + Unpin> Inbox<R> {
    pub fn new(reader: Reader<R>, out: mpsc::Sender<Outbound>, liveness: Liveness) -> Self {
        Inbox {
            reader,
            out,
            liveness,
            done: false,
        }
    }

    /// The next message; `None` once the connection is over (its close frame, if one is due,
    /// is queued for the writer).
    pub async fn next(&mut self) -> Option<Message> {
        self.liveness.resume();
        while !self.done {
            let incoming = tokio::select! {
                incoming = self.reader.next() => incoming,
                _ = self.out.closed() => break,
            };
            if incoming.is_ok() {
                self.liveness.heard();
            }
            let reply = match incoming {
                Ok(Incoming::Message(message)) => {
                    // Nothing is read until the endpoint asks for the next message.
                    self.liveness.pause();
                    return Some(message);
                }
                Ok(Incoming::Pong) => continue,
                Ok(Incoming::Ping(payload)) => Outbound::Pong(payload),
                Ok(Incoming::Close(code)) => {
                    self.done = true;
                    Outbound::CloseReply(code)
                }
                Err(e) => {
                    self.done = true;
                    let Some((code, reason)) = e.close() else {
                        break;
                    };
                    if self.out.send(Outbound::Close(code, reason)).await.is_ok() {
                        self.reader.drain(LINGER).await;
                    }
                    break;
                }
            };
            if self.out.send(reply).await.is_err() {
                break;
            }
        }
        self.done = true;
        None
    }

    /// Ends the connection from this side with `code`, then reads (and discards) what the peer
    /// still sends until its close, EOF or [`CLOSE_WAIT`]: what it sent after our close is not
    /// taken, and closing the socket with unread data would reset it, so that the peer could
    /// lose the close frame and the answers queued before it.
    pub async fn close(&mut self, code: u16, reason: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        if self.out.send(Outbound::Close(code, reason)).await.is_err() {
            return;
        }
        let until_close = async {
            while let Ok(incoming) = self.reader.next().await {
                if matches!(incoming, Incoming::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, until_close).await;
    }
}

/// Most bytes the writer gathers before it writes them to the socket; larger payloads go
/// straight through.
const WRITE_BUFFER: usize = 64 * 1024;

/// The writing half of a connection: server frames (never masked), gathered in a buffer that
/// is allocated when there is something to write and given back at each flush, so an idle
/// connection holds none.
pub struct Writer<W = WriteHalf<Io>> {
    io: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Self {
        Writer {
            io,
            buf: Vec::new(),
        }
    }

    /// Appends `bytes` to the buffer, writing through when they would not fit.
    async fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buf.len() + bytes.len() > WRITE_BUFFER {
            self.drain().await?;
            if bytes.len() >= WRITE_BUFFER {
                return self.io.write_all(bytes).await;
            }
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(bytes.len().clamp(4096, WRITE_BUFFER));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes what the buffer holds, keeping its allocation.
    async fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    async fn frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.head(opcode, payload.len()).await?;
        self.put(payload).await
    }

    /// A frame's header: final, unmasked, `len` bytes of payload to follow; `opcode` may carry
    /// RSV1.
    async fn head(&mut self, opcode: u8, len: usize) -> io::Result<()> {
        let (head, n) = frame_head(opcode, len);
        self.put(&head[..n]).await
    }

    /// Writes the frames of `gathered` (unflushed) with vectored writes: its shared pieces go
    /// from where they are to the kernel, without being copied into this connection's buffer.
    pub async fn gathered(&mut self, gathered: &Gather<'_>) -> io::Result<()> {
        self.drain().await?;
        let mut slices: Vec<IoSlice<'_>> = gathered.slices().map(IoSlice::new).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self
                .io
                .write_vectored(&rest[..rest.len().min(MAX_IOVECS)])
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    /// Writes one message (unflushed). Returns whether it was a close frame, the connection's
    /// last.
    pub async fn send(&mut self, msg: &Outbound) -> io::Result<bool> {
        match msg {
            Outbound::Text(text) => self.frame(0x1, text).await.map(|_| false),
            Outbound::Binary(data) => self.frame(0x2, data).await.map(|_| false),
            Outbound::Pong(payload) => self.frame(0xa, payload).await.map(|_| false),
            Outbound::CloseReply(code) => {
                let payload = code.map(u16::to_be_bytes);
                self.frame(0x8, payload.as_ref().map_or(&[][..], |p| p))
                    .await
                    .map(|_| true)
            }
            Outbound::Close(code, reason) => {
                // A control frame carries at most 125 bytes: the code and 123 of reason.
                let reason = &reason.as_bytes()[..reason.len().min(123)];
                let mut payload = Vec::with_capacity(2 + reason.len());
                payload.extend_from_slice(&code.to_be_bytes());
                payload.extend_from_slice(reason);
                self.frame(0x8, &payload).await.map(|_| true)
            }
        }
    }

    /// Writes bytes that are already framed (the rest of a frame a shard began to write
    /// straight to the socket), through to the socket.
    pub async fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes).await?;
        self.drain().await
    }

    /// Sends a ping.
    pub async fn ping(&mut self) -> io::Result<()> {
        self.frame(0x9, b"eddy").await
    }

    /// Writes everything gathered and gives the buffer back.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.drain().await?;
        self.buf = Vec::new();
        self.io.flush().await
    }

    /// Flushes and closes the sending direction (after a close frame).
    async fn finish(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// The header of a final, unmasked frame of `len` payload bytes (`opcode` may carry RSV1), and
/// how many of its bytes are used.
fn frame_head(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode;
    let n = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, n)
}

/// Most buffers one `writev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Pieces shorter than this are copied next to their neighbours rather than given their own
/// `iovec`: a copy of a few hundred bytes costs less than the kernel's walk over one more
/// buffer.
const SHARE_FROM: usize = 512;

/// Server frames gathered for one vectored write ([`Writer::gathered`]). Frame heads and short
/// pieces are copied into one buffer of its own; longer pieces (a batch's items, encoded or
/// compressed once for every subscriber) are only borrowed, so fan-out copies each byte once,
/// into the kernel.
#[derive(Default)]
pub struct Gather<'a> {
    own: Vec<u8>,
    pieces: Vec<Piece<'a>>,
}

enum Piece<'a> {
    /// A range of `own`.
    Own(usize, usize),
    Shared(&'a [u8]),
}

impl<'a> Gather<'a> {
    /// Adds one frame whose payload is `owned` then `shared`, each one part after the other;
    /// `opcode` may carry [`COMPRESSED`]. `owned` (this connection's own bytes, such as a batch
    /// frame's head) is copied, `shared` only borrowed when long enough to be worth it.
    pub fn frame(&mut self, opcode: u8, owned: &[&[u8]], shared: &[&'a [u8]]) {
        let len: usize = owned.iter().chain(shared).map(|p| p.len()).sum();
        let (head, n) = frame_head(opcode, len);
        self.copy(&head[..n]);
        for part in owned {
            self.copy(part);
        }
        for part in shared {
            self.share(part);
        }
    }

    fn share(&mut self, bytes: &'a [u8]) {
        if bytes.len() < SHARE_FROM {
            self.copy(bytes);
        } else {
            self.pieces.push(Piece::Shared(bytes));
        }
    }

    fn copy(&mut self, bytes: &[u8]) {
        let start = self.own.len();
        self.own.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Own(_, end)) if *end == start => *end = self.own.len(),
            _ => self.pieces.push(Piece::Own(start, self.own.len())),
        }
    }

    /// The bytes to write, in order.
    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|piece| match *piece {
            Piece::Own(start, end) => &self.own[start..end],
            Piece::Shared(bytes) => bytes,
        })
    }

    /// How many bytes the frames take.
    pub fn len(&self) -> usize {
        self.slices().map(<[u8]>::len).sum()
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// A copy of the bytes after the first `n`.
    pub fn rest_after(&self, mut n: usize) -> Bytes {
        let mut rest = Vec::with_capacity(self.len().saturating_sub(n));
        for slice in self.slices() {
            let skip = n.min(slice.len());
            rest.extend_from_slice(&slice[skip..]);
            n -= skip;
        }
        Bytes::from(rest)
    }
}

/// Writes `gathered` to the socket `fd` without waiting: as much as the socket takes now.
/// Returns how many bytes went out (0 when the socket's buffer is full).
///
/// This is how a shard writes a batch straight to an idle subscriber (see
/// [`super::mailbox`]): the caller must make sure nobody else writes to the socket meanwhile.
pub fn write_now(fd: std::os::fd::BorrowedFd<'_>, gathered: &Gather<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let slices: Vec<&[u8]> = gathered.slices().collect();
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let mut written = 0;
    let mut next = 0;
    // Past the first `skip` bytes of slices[next].
    let mut skip = 0;
    while written < total {
        let iov: Vec<libc::iovec> = slices[next..]
            .iter()
            .take(MAX_IOVECS)
            .enumerate()
            .map(|(i, s)| {
                let s = if i == 0 { &s[skip..] } else { s };
                libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                }
            })
            .collect();
        // SAFETY: a zeroed msghdr is valid (no address, no control data); `iov` outlives the
        // call and each entry points into a slice that does too.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `fd` is an open socket for the duration of the call (borrowed), `msg` is
        // valid as above; MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(written),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        let mut n = n as usize;
        if n == 0 {
            return Ok(written);
        }
        written += n;
        while n > 0 {
            let left = slices[next].len() - skip;
            if n >= left {
                n -= left;
                next += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(written)
}

/// When the peer was last heard from, shared by a connection's reader and writer. While the
/// endpoint holds a message and reads nothing (backpressure: a full shard queue, acks that wait
/// for JetStream), the peer's pongs wait unread in the socket: that time is not silence, so the
/// writer does not close a live peer for "no pong" (it is heard again once reading resumes).
#[derive(Clone)]
pub struct Liveness {
    start: Instant,
    last_ms: Arc<AtomicU64>,
    /// The reader is not reading (see above).
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
            paused: Arc::default(),
        }
    }
}

impl Liveness {
    pub fn heard(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The reader stops reading until [`Liveness::resume`].
    fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    /// The reader reads again: the silence is counted from now.
    fn resume(&self) {
        if self.paused.swap(false, Ordering::Relaxed) {
            self.heard();
        }
    }

    pub fn silent_for(&self) -> Duration {
        if self.paused.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Why an endpoint's [`Source`] woke the writer.
pub enum Wake {
    /// It has something to write.
    Ready,
    /// The server is stopping: write what is left, then close with 1001.
    Closing,
}

/// What an endpoint writes besides what is queued on the connection's channel.
pub trait Source: Send + 'static {
    /// Resolves when there is something to write, or the server is stopping.
    fn wake(&mut self) -> impl Future<Output = Wake> + Send;
    /// Writes what is ready (unflushed). `Some` is a close to send: the connection must end.
    fn write<W: AsyncWrite + Unpin + Send>(
        &mut self,
        ws: &mut Writer<W>,
    ) -> impl Future<Output = io::Result<Option<(u16, &'static str)>>> + Send;
    /// The writer is about to write: from now on only it writes to the socket. Returns the
    /// bytes of a frame someone else began to write, which must go out first, and how long
    /// they may take (a peer that reads nothing is dropped past that).
    fn busy(&mut self) -> Option<(Bytes, Duration)> {
        None
    }
    /// The writer has written and flushed everything it had: until [`Source::busy`], another
    /// thread may write whole frames straight to the socket.
    fn idle(&mut self) {}
}

/// A connection that writes only what its channel carries.
pub struct NoSource;

impl Source for NoSource {
    fn wake(&mut self) -> impl Future<Output = Wake> + Send {
        std::future::pending()
    }
    async fn write<W: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &mut Writer<W>,
    ) -> io::Result<Option<(u16, &'static str)>> {
        Ok(None)
    }
}

/// The writer loop of a connection (see the module docs). Ends after a close frame, on a write
/// error, or when every sender of `rx` is gone.
pub async fn run_writer<W: AsyncWrite + Unpin + Send, S: Source>(
    mut ws: Writer<W>,
    mut rx: mpsc::Receiver<Outbound>,
    liveness: Liveness,
    ping_every: Duration,
    mut source: S,
) {
    let mut ticker = tokio::time::interval(ping_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        // Biased: what the reader queued (pongs, close replies) goes before the source's
        // messages that it caused, in the order the peer asked.
        let closed = tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(msg) => match busy(&mut ws, &mut source).await {
                    Ok(()) => drain(&mut ws, &mut rx, msg).await,
                    Err(e) => Err(e),
                },
                None => break,
            },
            wake = source.wake() => {
                let written = match busy(&mut ws, &mut source).await {
                    Ok(()) => source.write(&mut ws).await,
                    Err(e) => Err(e),
                };
                match (wake, written) {
                    (_, Err(e)) => Err(e),
                    (Wake::Ready, Ok(None)) => Ok(false),
                    (Wake::Ready, Ok(Some((code, reason)))) => {
                        ws.send(&Outbound::Close(code, reason)).await
                    }
                    (Wake::Closing, Ok(_)) => {
                        ws.send(&Outbound::Close(close::GOING_AWAY, "server shutting down")).await
                    }
                }
            }
            _ = ticker.tick() => {
                if let Err(e) = busy(&mut ws, &mut source).await {
                    Err(e)
                } else if liveness.silent_for() > ping_every * 2 {
                    ws.send(&Outbound::Close(close::GOING_AWAY, "no pong")).await
                } else {
                    ws.ping().await.map(|_| false)
                }
            }
        };
        // A peer that reads nothing blocks the flush: past two ping intervals (the time it
        // would have to answer a ping) it is dropped, without a close frame (there is no room
        // left to send one).
        let stalled = ping_every * 2;
        match closed {
            Ok(false) => match tokio::time::timeout(stalled, ws.flush()).await {
                Ok(Ok(())) => source.idle(),
                _ => break,
            },
            Ok(true) => {
                let _ = tokio::time::timeout(stalled, ws.finish()).await;
                break;
            }
            Err(_) => break,
        }
    }
}

/// Takes the socket back from the source (see [`Source::busy`]) and writes the rest of the
/// frame it may have begun.
async fn busy<W: AsyncWrite + Unpin, S: Source>(
    ws: &mut Writer<W>,
    source: &mut S,
) -> io::Result<()> {
    match source.busy() {
        Some((rest, within)) => match tokio::time::timeout(within, ws.raw(&rest)).await {
            Ok(written) => written,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        },
        None => Ok(()),
    }
}

/// Writes `first` and whatever else is queued. Returns whether a close frame went out.
async fn drain<W: AsyncWrite + Unpin>(
    ws: &mut Writer<W>,
    rx: &mut mpsc::Receiver<Outbound>,
    first: Outbound,
) -> io::Result<bool> {
    let mut closed = ws.send(&first).await?;
    while !closed {
        match rx.try_recv() {
            Ok(msg) => closed = ws.send(&msg).await?,
            Err(_) => break,
        }
    }
    Ok(closed)
}

/// Messages queued for the writer before the reader stops reading.
const OUTBOUND_QUEUE: usize = 64;

/// An open connection: its reader loop, a sender to its writer, and the writer's task.
pub struct Connection<R = ReadHalf<Io>> {
    pub inbox: Inbox<R>,
    pub out: mpsc::Sender<Outbound>,
    writer: JoinHandle<()>,
}

/// Splits an upgraded connection and starts its writer. Messages larger than `limit` bytes
/// (`max_frame_bytes`) are refused with 1009.
pub fn open<T, S>(io: T, limit: usize, ping_every: Duration, source: S) -> Connection<ReadHalf<T>>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
    S: Source,
{
    open_naming(
        io,
        (limit, "message larger than max_frame_bytes"),
        ping_every,
        false,
        source,
    )
}

/// [`open`], with the close reason (naming the limit) for a message over it, and whether the
/// connection negotiated permessage-deflate.
pub fn open_naming<T, S>(
    io: T,
    (limit, too_big): (usize, &'static str),
    ping_every: Duration,
    deflate: bool,
    source: S,
) -> Connection<ReadHalf<T>>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
    S: Source,
{
    let (read, write) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let liveness = Liveness::default();
    liveness.heard();
    let writer = tokio::spawn(run_writer(
        Writer::new(write),
        rx,
        liveness.clone(),
        ping_every,
        source,
    ));
    Connection {
        inbox: Inbox::new(
            Reader::new(read, limit)
                .naming_limit(too_big)
                .inflating(deflate),
            tx.clone(),
            liveness,
        ),
        out: tx,
        writer,
    }
}

impl<R> Connection<R> {
    /// Lets the writer send what is queued, then waits for it to end.
    pub async fn finish(self) {
        let Connection { inbox, out, writer } = self;
        drop(inbox);
        drop(out);
        let _ = writer.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(input: Vec<u8>, limit: usize) -> (Vec<Incoming>, Option<ReadError>) {
        let mut reader = Reader::new(&input[..], limit);
        let mut got = Vec::new();
        loop {
            match reader.next().await {
                Ok(incoming) => got.push(incoming),
                Err(ReadError::Closed) => return (got, None),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn fragments_are_joined_and_unmasked_at_any_offset() {
        let mut input = frame(0x01, b"hel", [1, 2, 3, 4]);
        input.extend(frame(0x89, b"ping", [9, 9, 9, 9]));
        input.extend(frame(0x00, b"lo, wo", [5, 6, 7, 8]));
        input.extend(frame(0x80, b"rld!", [0xff, 0, 0xff, 0]));
        let (got, err) = read_all(input, 64).await;
        assert!(err.is_none(), "{err:?}");
        assert!(matches!(&got[0], Incoming::Ping(p) if p == b"ping"));
        let Incoming::Message(m) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(m.payload, b"hello, world!");
        assert!(!m.binary);
    }

    #[tokio::test]
    async fn a_message_of_exactly_the_limit_passes_and_one_more_byte_does_not() {
        let (got, err) = read_all(frame(0x82, &[7; 100], [1, 2, 3, 4]), 100).await;
        assert!(err.is_none() && got.len() == 1);
        let mut input = frame(0x02, &[7; 60], [1, 2, 3, 4]);
        input.extend(frame(0x80, &[7; 41], [1, 2, 3, 4]));
        let (got, err) = read_all(input, 100).await;
        assert!(got.is_empty());
        assert_eq!(
            err.and_then(|e| e.close()),
            Some((1009, "message larger than max_frame_bytes"))
        );
        // A reader for another limit names it.
        let input = frame(0x82, &[7; 101], [1, 2, 3, 4]);
        let mut reader = Reader::new(&input[..], 100).naming_limit("request larger than 100");
        let err = reader.next().await.unwrap_err();
        assert_eq!(err.close(), Some((1009, "request larger than 100")));
    }

    #[tokio::test]
    async fn utf8_split_across_fragments_is_valid_and_bad_utf8_fails_fast() {
        let euro = "€".as_bytes();
        let mut input = frame(0x01, &euro[..1], [1, 2, 3, 4]);
        input.extend(frame(0x80, &euro[1..], [1, 2, 3, 4]));
        let (got, err) = read_all(input, 10).await;
        assert!(err.is_none() && got.len() == 1, "{err:?}");
        // The first fragment is already invalid: no need to wait for the rest.
        let (_, err) = read_all(frame(0x01, &[0xce, 0xba, 0xff], [1, 2, 3, 4]), 10).await;
        assert!(matches!(err, Some(ReadError::InvalidUtf8)));
    }

    /// A vectored sink that takes at most `most` bytes per call, across buffers.
    struct Trickle {
        got: Vec<u8>,
        most: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            assert!(
                bufs.len() <= MAX_IOVECS,
                "{} buffers in one call",
                bufs.len()
            );
            self.calls += 1;
            let mut room = self.most;
            for buf in bufs {
                let n = buf.len().min(room);
                self.got.extend_from_slice(&buf[..n]);
                room -= n;
            }
            std::task::Poll::Ready(Ok(self.most - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The frames a plain writer would produce, one byte at a time: header then payload.
    fn plain_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 65535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// The writer loop of a connection whose peer was just heard, on `io`.
    fn spawn_writer<S: Source>(
        io: tokio::io::DuplexStream,
        rx: mpsc::Receiver<Outbound>,
        ping_every: Duration,
        source: S,
    ) -> JoinHandle<()> {
        let liveness = Liveness::default();
        liveness.heard();
        tokio::spawn(run_writer(
            Writer::new(io),
            rx,
            liveness,
            ping_every,
            source,
        ))
    }

    /// A source with one wake-up, whose socket another thread wrote part of a frame to.
    struct HalfWritten {
        rest: Option<Bytes>,
        woken: bool,
        idle: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Source for HalfWritten {
        async fn wake(&mut self) -> Wake {
            if self.woken {
                std::future::pending::<()>().await;
            }
            self.woken = true;
            Wake::Ready
        }
        async fn write<W: AsyncWrite + Unpin + Send>(
            &mut self,
            ws: &mut Writer<W>,
        ) -> io::Result<Option<(u16, &'static str)>> {
            ws.send(&Outbound::Text(Bytes::from_static(b"after")))
                .await
                .map(|_| None)
        }
        fn busy(&mut self) -> Option<(Bytes, Duration)> {
            self.idle.store(false, Ordering::Relaxed);
            self.rest.take().map(|r| (r, Duration::from_millis(200)))
        }
        fn idle(&mut self) {
            self.idle.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn the_rest_of_a_frame_begun_elsewhere_goes_first_and_a_peer_that_reads_nothing_is_dropped(
    ) {
        // The peer reads: the rest, then the writer's own frame, and the source is told idle.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(4);
        let idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source = HalfWritten {
            rest: Some(Bytes::from_static(b"-rest-of-a-frame-")),
            woken: false,
            idle: Arc::clone(&idle),
        };
        let writer = spawn_writer(server, rx, Duration::from_secs(60), source);
        let mut want = b"-rest-of-a-frame-".to_vec();
        want.extend(plain_frame(TEXT, b"after"));
        let mut got = vec![0; want.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, want);
        // The writer tells the source once its flush returned, which may be after we read.
        let told = async {
            while !idle.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), told)
            .await
            .expect("the source was told the writer is idle");
        drop(tx);
        writer.await.unwrap();

        // The peer reads nothing: the rest cannot go out, and past its time the writer ends.
        let (client, server) = tokio::io::duplex(64);
        let (_tx, rx) = mpsc::channel(4);
        let source = HalfWritten {
            rest: Some(Bytes::from(vec![b'x'; 1 << 16])),
            woken: false,
            idle: Arc::default(),
        };
        let liveness = Liveness::default();
        liveness.heard();
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            run_writer(
                Writer::new(server),
                rx,
                liveness,
                Duration::from_secs(60),
                source,
            ),
        )
        .await;
        assert!(ended.is_ok(), "a writer stuck on the rest of a frame ends");
        drop(client);
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_dropped_when_a_flush_stalls_two_ping_intervals() {
        // An ingest connection's writer (acks only): the peer never reads, its buffer is full.
        let (client, server) = tokio::io::duplex(64);
        let (tx, rx) = mpsc::channel(4);
        let writer = spawn_writer(server, rx, Duration::from_millis(50), NoSource);
        tx.send(Outbound::Text(Bytes::from(vec![b'a'; 4096])))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer gave up on the stalled peer")
            .unwrap();
        drop((client, tx));
    }

    #[tokio::test]
    async fn gathered_frames_arrive_whole_in_order_through_short_vectored_writes() {
        // 3,000 frames of shared pieces long and short: more buffers than one writev takes,
        // and a sink that stops mid-buffer on every call.
        let long: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("[{}]", "7,".repeat(i % 600)).into_bytes())
            .collect();
        let mut gather = Gather::default();
        let mut expected = Vec::new();
        for (i, items) in long.iter().enumerate() {
            let head = format!("{{\"seq\":{i},\"items\":");
            let opcode = if i % 2 == 0 { TEXT } else { TEXT | COMPRESSED };
            gather.frame(opcode, &[head.as_bytes()], &[items, b"}"]);
            expected.extend(plain_frame(
                opcode,
                &[head.as_bytes(), items, b"}"].concat(),
            ));
        }
        let shared = gather
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Shared(_)))
            .count();
        assert!(shared > MAX_IOVECS, "only {shared} shared pieces");
        for most in [7, 100_000, usize::MAX / 2] {
            let mut writer = Writer::new(Trickle {
                got: Vec::new(),
                most,
                calls: 0,
            });
            writer
                .send(&Outbound::Text(Bytes::from_static(b"before")))
                .await
                .unwrap();
            writer.gathered(&gather).await.unwrap();
            writer.flush().await.unwrap();
            let mut want = plain_frame(TEXT, b"before");
            want.extend_from_slice(&expected);
            assert_eq!(writer.io.got, want, "at most {most} bytes per call");
            assert!(writer.io.calls >= 2, "{}", writer.io.calls);
        }
    }

    #[test]
    fn unmask_matches_bytewise_xor_at_every_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..37u8).collect();
        for offset in 0..8 {
            let mut got = data.clone();
            unmask(&mut got, mask, offset);
            let want: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[(offset + i) % 4])
                .collect();
            assert_eq!(got, want, "offset {offset}");
        }
    }
}
