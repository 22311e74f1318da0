//! RFC 6455 conformance of `/ingest` and `/subscribe`, with a client written here from raw
//! bytes (no WebSocket library on the client side), so that a regression is caught without
//! Autobahn (see `tests/autobahn.rs` for the full suite).
//!
//! Each item of the issue "WebSocket conformance: RFC 6455 to the letter" has a test: protocol
//! errors close with 1002 (§7.4.1), unmasked client frames are refused (§5.1), control frames
//! over 125 bytes are refused and never sent (§5.5), a wrong version is answered with
//! `Sec-WebSocket-Version: 13` (§4.2.2), a 64-bit length with its top bit set is a protocol
//! error (§5.2), and the size limit counts whole messages, fragments included, and refuses only
//! what is larger than it. Every test runs the real server on 127.0.0.1 port 0 and stops by
//! itself.

use std::time::Duration;

use eddy::server::{Config, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key and accept value of the example in RFC 6455 §1.3.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const ENDPOINTS: [&str; 2] = ["/ingest?ack=true", "/subscribe"];
const WAIT: Duration = Duration::from_secs(20);

/// `/subscribe`'s request limit, as the README states it.
const SUBSCRIBE_LIMIT: usize = 64 * 1024;

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

async fn start(max_frame_bytes: usize) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        queries: dir.path().to_owned(),
        max_frame_bytes,
        ..Config::default()
    };
    (Server::start(config).await.unwrap(), dir)
}

/// A frame as a client sends it: `b0` is FIN, RSV and opcode; masked unless `masked` is false.
fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// What the server sent, frame by frame.
#[derive(Debug, PartialEq)]
enum Got {
    Text(String),
    Pong(Vec<u8>),
    Close(Option<u16>, usize),
    Eof,
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// permessage-deflate was negotiated: RSV1 may mark a compressed message.
    deflate: bool,
    /// Messages that came compressed (RSV1).
    compressed: usize,
}

impl Client {
    /// Sends the request head `head` (without the final blank line) and reads the answer's head.
    async fn request(addr: std::net::SocketAddr, head: &str) -> (Client, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("{head}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut client = Client {
            stream,
            buf: Vec::new(),
            deflate: false,
            compressed: 0,
        };
        let end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                client.fill().await,
                "the server closed during the handshake"
            );
        };
        let head = String::from_utf8(client.buf.drain(..end).collect()).unwrap();
        (client, head)
    }

    async fn open(addr: std::net::SocketAddr, path: &str) -> Client {
        let (client, head) = Client::request(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13"
            ),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "sec-websocket-accept: {}",
                ACCEPT.to_ascii_lowercase()
            )),
            "{head}"
        );
        client
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed: what it said is read afterwards.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame from the server, checked against what RFC 6455 asks of a server.
    async fn next(&mut self) -> Got {
        while self.buf.len() < 2 {
            if !self.fill().await {
                return Got::Eof;
            }
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let compressed = b0 & 0x40 != 0;
        assert_eq!(b0 & 0x30, 0, "reserved bits from the server");
        assert!(
            !compressed || (self.deflate && b0 & 0x0f == 0x1),
            "RSV1 on a frame that cannot be compressed"
        );
        assert_eq!(b1 & 0x80, 0, "a server must not mask its frames (§5.1)");
        let (len, header) = match b1 & 0x7f {
            126 => (2, 4),
            127 => (8, 10),
            n => (n as usize, 2),
        };
        while self.buf.len() < header {
            assert!(self.fill().await, "EOF inside a frame header");
        }
        let len = match header {
            4 => u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize,
            10 => u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
            _ => len,
        };
        while self.buf.len() < header + len {
            assert!(self.fill().await, "EOF inside a frame");
        }
        let mut payload: Vec<u8> = self.buf.drain(..header + len).skip(header).collect();
        if compressed {
            self.compressed += 1;
            payload = inflate(&payload);
        }
        let opcode = b0 & 0x0f;
        if opcode >= 0x8 {
            assert!(b0 & FIN != 0, "fragmented control frame from the server");
            assert!(
                len <= 125,
                "control frame of {len} bytes from the server (§5.5)"
            );
        }
        match opcode {
            0x1 => Got::Text(String::from_utf8(payload).expect("text is UTF-8")),
            0x8 => Got::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                payload.len(),
            ),
            0x9 => Box::pin(self.next()).await,
            0xa => Got::Pong(payload),
            other => panic!("unexpected opcode {other} from the server"),
        }
    }

    /// The next text message as JSON.
    async fn json(&mut self) -> Value {
        match self.next().await {
            Got::Text(text) => serde_json::from_str(&text).unwrap(),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads up to the server's close frame, then expects the connection to end. Returns the
    /// close code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Got::Close(code, _) => {
                    assert_eq!(self.next().await, Got::Eof, "nothing follows a close");
                    return code;
                }
                Got::Eof => panic!("the connection ended without a close frame"),
                Got::Text(_) | Got::Pong(_) => {}
            }
        }
    }
}

/// A compressed message's payload inflated as RFC 7692 §7.2.2 says (the tail `00 00 ff ff`
/// appended), with flate2's plain reader.
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut reader = flate2::read::DeflateDecoder::new(&input[..]);
    // No final block: the reader stops with an error once the input runs out.
    let _ = std::io::Read::read_to_end(&mut reader, &mut out);
    out
}

/// `text` compressed as a client sends it (RFC 7692 §7.2.1): raw DEFLATE, sync flush, the
/// tail `00 00 ff ff` left out.
fn deflated(text: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(text.len() + 64);
    c.compress_vec(text, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(out.len() < out.capacity(), "room enough for one call");
    assert_eq!(out[out.len() - 4..], [0, 0, 0xff, 0xff]);
    out.truncate(out.len() - 4);
    out
}

/// The `Sec-WebSocket-Extensions` answer to an upgrade of `path` offering `offer`, if any.
async fn extension_answer(addr: std::net::SocketAddr, path: &str, offer: &str) -> Option<String> {
    let (_, head) = Client::request(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {offer}"
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

/// Sends `bytes` on a fresh connection to each endpoint and expects it closed with `code`.
async fn closes_with(server: &Server, what: &str, bytes: &[u8], code: u16) {
    for path in ENDPOINTS {
        let mut client = Client::open(server.addr, path).await;
        client.send(bytes).await;
        assert_eq!(client.close_code().await, Some(code), "{what} on {path}");
    }
}

#[tokio::test]
async fn protocol_errors_close_with_1002() {
    let (server, _dir) = start(1 << 20).await;
    let mut long_len = vec![FIN | BINARY, 0x80 | 127];
    long_len.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    long_len.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0, 0]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("RSV1 set", frame(FIN | 0x40 | TEXT, b"{}", true)),
        ("RSV2 set", frame(FIN | 0x20 | TEXT, b"{}", true)),
        ("RSV3 set on a ping", frame(FIN | 0x10 | PING, b"", true)),
        ("reserved data opcode 3", frame(FIN | 0x3, b"", true)),
        ("reserved control opcode 11", frame(FIN | 0xb, b"", true)),
        ("continuation with nothing started", frame(FIN, b"{}", true)),
        ("new message inside a fragmented one", {
            let mut b = frame(TEXT, b"[", true);
            b.extend(frame(FIN | TEXT, b"{}", true));
            b
        }),
        ("ping of 126 bytes", frame(FIN | PING, &[b'x'; 126], true)),
        ("fragmented ping", frame(PING, b"a", true)),
        (
            "close with a 1-byte payload",
            frame(FIN | CLOSE, &[3], true),
        ),
        (
            "close with code 1005",
            frame(FIN | CLOSE, &1005u16.to_be_bytes(), true),
        ),
        ("64-bit length with the top bit set", long_len),
    ];
    for (what, bytes) in &cases {
        closes_with(&server, what, bytes, 1002).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unmasked_client_frames_are_refused() {
    let (server, _dir) = start(1 << 20).await;
    closes_with(
        &server,
        "unmasked text",
        &frame(FIN | TEXT, b"{}", false),
        1002,
    )
    .await;
    closes_with(
        &server,
        "unmasked ping",
        &frame(FIN | PING, b"", false),
        1002,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn close_frames_are_answered_within_125_bytes() {
    let (server, _dir) = start(1 << 20).await;
    // 7.3.6: a close of 126 bytes is itself a protocol error, and is not echoed.
    let mut long_close = 1000u16.to_be_bytes().to_vec();
    long_close.extend_from_slice(&[b'a'; 124]);
    closes_with(
        &server,
        "close of 126 bytes",
        &frame(FIN | CLOSE, &long_close, true),
        1002,
    )
    .await;
    // A valid close with the longest reason is answered with the code alone.
    let mut close = 4321u16.to_be_bytes().to_vec();
    close.extend_from_slice(&[b'r'; 123]);
    for path in ENDPOINTS {
        let mut client = Client::open(server.addr, path).await;
        client.send(&frame(FIN | CLOSE, &close, true)).await;
        assert_eq!(client.next().await, Got::Close(Some(4321), 2), "{path}");
        assert_eq!(client.next().await, Got::Eof);
        // An empty close gets an empty close.
        let mut client = Client::open(server.addr, path).await;
        client.send(&frame(FIN | CLOSE, b"", true)).await;
        assert_eq!(client.next().await, Got::Close(None, 0), "{path}");
        // Invalid UTF-8 in the reason: 1007.
        let mut client = Client::open(server.addr, path).await;
        client
            .send(&frame(FIN | CLOSE, &[0x03, 0xe8, 0xff, 0xfe], true))
            .await;
        assert_eq!(client.close_code().await, Some(1007), "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn pings_are_answered_between_fragments_and_invalid_utf8_is_1007() {
    let (server, _dir) = start(1 << 20).await;
    for path in ENDPOINTS {
        let mut client = Client::open(server.addr, path).await;
        let mut bytes = frame(TEXT, b"{\"op\":", true);
        bytes.extend(frame(FIN | PING, b"are you there", true));
        bytes.extend(frame(FIN, b"\"topics\"}", true));
        client.send(&bytes).await;
        assert_eq!(client.next().await, Got::Pong(b"are you there".to_vec()));
        let answer = client.json().await;
        let kind = if path.starts_with("/ingest") {
            "ack"
        } else {
            "topics"
        };
        assert_eq!(answer["type"], kind, "{path}: {answer}");
        client
            .send(&frame(FIN | CLOSE, &1000u16.to_be_bytes(), true))
            .await;
        assert_eq!(client.close_code().await, Some(1000));
    }
    // The euro sign cut in two fragments is valid; 0xff never is.
    let mut bytes = frame(TEXT, b"{\"op\":\"topics\",\"x\":\"\xe2", true);
    bytes.extend(frame(FIN, b"\x82\xac\"}", true));
    let mut client = Client::open(server.addr, "/subscribe").await;
    client.send(&bytes).await;
    let answer = client.json().await;
    assert!(
        answer["error"].as_str().unwrap().contains("unknown field"),
        "{answer}"
    );
    closes_with(
        &server,
        "invalid UTF-8",
        &frame(FIN | TEXT, b"{\"a\":\"\xff\"}", true),
        1007,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_version_is_told_the_one_we_speak() {
    let (server, _dir) = start(1 << 20).await;
    for path in ENDPOINTS {
        let (_, head) = Client::request(
            server.addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8"
            ),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 426"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-version: 13\r\n"),
            "{head}"
        );
    }
    server.shutdown().await;
}

/// A message of `total` bytes in fragments of at most `piece`: a JSON array padded with spaces,
/// so that what is accepted is also valid input.
fn fragmented(total: usize, piece: usize) -> Vec<u8> {
    let mut message = vec![b' '; total];
    message[0] = b'[';
    message[total - 1] = b']';
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = message.chunks(piece).collect();
    for (i, chunk) in pieces.iter().enumerate() {
        let opcode = if i == 0 { BINARY } else { 0 };
        let fin = if i + 1 == pieces.len() { FIN } else { 0 };
        out.extend(frame(fin | opcode, chunk, true));
    }
    out
}

#[tokio::test]
async fn the_limit_counts_whole_messages_and_refuses_only_larger_ones() {
    const LIMIT: usize = 100_000;
    let (server, _dir) = start(LIMIT).await;
    // /ingest: exactly the limit, in fragments or not, is acknowledged.
    for bytes in [fragmented(LIMIT, 30_000), fragmented(LIMIT, LIMIT)] {
        let mut client = Client::open(server.addr, "/ingest?ack=true").await;
        client.send(&bytes).await;
        let ack = client.json().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["accepted"], 0, "{ack}");
    }
    // One byte more is closed with 1009, fragmented or not.
    for bytes in [
        fragmented(LIMIT + 1, 30_000),
        fragmented(LIMIT + 1, LIMIT + 1),
    ] {
        let mut client = Client::open(server.addr, "/ingest?ack=true").await;
        client.send(&bytes).await;
        assert_eq!(client.close_code().await, Some(1009));
    }
    // /subscribe's 64 KiB: a request of exactly that passes, one byte more in fragments does not.
    let mut request = br#"{"op":"topics"}"#.to_vec();
    request.resize(SUBSCRIBE_LIMIT, b' ');
    let mut bytes = frame(TEXT, &request[..40_000], true);
    bytes.extend(frame(FIN, &request[40_000..], true));
    let mut client = Client::open(server.addr, "/subscribe").await;
    client.send(&bytes).await;
    assert_eq!(client.json().await["type"], "topics");
    request.push(b' ');
    let mut bytes = frame(TEXT, &request[..40_000], true);
    bytes.extend(frame(FIN, &request[40_000..], true));
    let mut client = Client::open(server.addr, "/subscribe").await;
    client.send(&bytes).await;
    assert_eq!(client.close_code().await, Some(1009));
    server.shutdown().await;
}

#[tokio::test]
async fn two_fragments_of_8_mib_and_one_byte_are_closed_with_1009() {
    // The default limit: 16 MiB.
    let (server, _dir) = start(Config::default().max_frame_bytes).await;
    let half = vec![b' '; 8 << 20];
    let mut client = Client::open(server.addr, "/ingest?ack=true").await;
    let mut bytes = frame(BINARY, &half, true);
    bytes.extend(frame(0, &half, true));
    bytes.extend(frame(FIN, b" ", true));
    client.send(&bytes).await;
    assert_eq!(client.close_code().await, Some(1009));
    server.shutdown().await;
}

/// The answer a server sends to an upgrade that takes permessage-deflate.
const DEFLATE_TAKEN: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[tokio::test]
async fn permessage_deflate_is_negotiated_on_subscribe_only_and_offers_are_checked() {
    let (server, _dir) = start(1 << 20).await;
    let answer =
        |path: &'static str, offer: &'static str| extension_answer(server.addr, path, offer);
    // Offers as browsers, Node's `ws` and Python's `websockets` make them.
    for offer in [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate",
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=15",
        // The first offer asks for a smaller window than the shared pieces use: the second is
        // taken.
        "permessage-deflate; server_max_window_bits=10, permessage-deflate",
    ] {
        assert_eq!(
            answer("/subscribe", offer).await.as_deref(),
            Some(DEFLATE_TAKEN),
            "{offer}"
        );
    }
    for offer in [
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; mystery",
        "x-webkit-deflate-frame",
    ] {
        assert_eq!(answer("/subscribe", offer).await, None, "{offer}");
    }
    // Producers' frames are not compressed: /ingest declines.
    assert_eq!(answer("/ingest", "permessage-deflate").await, None);
    server.shutdown().await;
}

/// Opens `/subscribe` offering permessage-deflate, and checks it was taken.
async fn open_deflate(addr: std::net::SocketAddr) -> Client {
    let (mut client, head) = Client::request(
        addr,
        &format!(
            "GET /subscribe HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains(DEFLATE_TAKEN), "{head}");
    client.deflate = true;
    client
}

#[tokio::test]
async fn compressed_batches_carry_the_same_items_and_compressed_requests_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vwap.rhai"),
        include_str!("../queries/vwap.rhai"),
    )
    .unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        queries: dir.path().to_owned(),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let mut sub = open_deflate(server.addr).await;
    // The request itself compressed, as browsers send them.
    let request = deflated(br#"{"op":"subscribe","topic":"vwap"}"#);
    sub.send(&frame(FIN | 0x40 | TEXT, &request, true)).await;
    assert_eq!(sub.json().await["type"], "subscribed");
    // Control answers go out plain.
    assert_eq!(sub.compressed, 0);
    // 300 trades on 7 symbols, in frames of 25.
    let trades: Vec<(String, f64, i64)> = (0..300)
        .map(|i| {
            let symbol = format!("S{}", i % 7);
            (symbol, 100.0 + (i * 37 % 101) as f64 / 4.0, 1 + i * 13 % 50)
        })
        .collect();
    let mut producer = Client::open(server.addr, "/ingest?stream=trades&ack=true").await;
    for chunk in trades.chunks(25) {
        let lines: String = chunk
            .iter()
            .map(|(s, p, n)| {
                format!("{{\"symbol\":\"{s}\",\"price\":{p},\"size\":{n},\"ts\":1}}\n")
            })
            .collect();
        producer
            .send(&frame(FIN | TEXT, lines.as_bytes(), true))
            .await;
        assert_eq!(producer.json().await["accepted"], 25);
    }
    // VWAP by hand, per symbol in order: sum(price * size) / sum(size).
    let mut expected: std::collections::HashMap<String, Vec<f64>> = Default::default();
    let mut sums: std::collections::HashMap<String, (f64, i64)> = Default::default();
    for (s, p, n) in &trades {
        let (notional, volume) = sums.entry(s.clone()).or_default();
        *notional += p * *n as f64;
        *volume += n;
        expected
            .entry(s.clone())
            .or_default()
            .push(*notional / *volume as f64);
    }
    let mut got: std::collections::HashMap<String, Vec<f64>> = Default::default();
    let mut items = 0;
    let mut next_seq = 0;
    while items < trades.len() {
        let batch = sub.json().await;
        assert_eq!(batch["type"], "batch", "{batch}");
        assert_eq!(batch["seq"], next_seq, "{batch}");
        next_seq += 1;
        let list = batch["items"].as_array().unwrap();
        assert_eq!(batch["n"], list.len(), "{batch}");
        for item in list {
            let key = item["key"].as_str().unwrap().to_owned();
            got.entry(key)
                .or_default()
                .push(item["value"]["vwap"].as_f64().unwrap());
        }
        items += list.len();
    }
    assert_eq!(items, trades.len());
    // Every batch came compressed.
    assert_eq!(sub.compressed, next_seq as usize);
    for (symbol, want) in &expected {
        let have = &got[symbol];
        assert_eq!(have.len(), want.len(), "{symbol}");
        for (h, w) in have.iter().zip(want) {
            assert!((h - w).abs() <= 1e-9 * w.abs(), "{symbol}: {h} against {w}");
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn bad_compressed_messages_are_closed_with_their_codes() {
    let (server, _dir) = start(1 << 20).await;
    // A deflate bomb: 1 MiB of spaces in a few KiB, past /subscribe's 64 KiB once inflated.
    let mut bomb = br#"{"op":"topics"}"#.to_vec();
    bomb.resize(1 << 20, b' ');
    let bomb = deflated(&bomb);
    assert!(bomb.len() < SUBSCRIBE_LIMIT / 4, "{}", bomb.len());
    // Exactly the limit once inflated still passes.
    let mut fits = br#"{"op":"topics"}"#.to_vec();
    fits.resize(SUBSCRIBE_LIMIT, b' ');
    let mut client = open_deflate(server.addr).await;
    client
        .send(&frame(FIN | 0x40 | TEXT, &deflated(&fits), true))
        .await;
    assert_eq!(client.json().await["type"], "topics");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a deflate bomb",
            frame(FIN | 0x40 | TEXT, &bomb, true),
            1009,
        ),
        (
            "data that is not DEFLATE",
            frame(FIN | 0x40 | TEXT, &[0xff, 0xfe, 0xfd, 0x07, 0x13], true),
            1002,
        ),
        ("RSV1 on a ping", frame(FIN | 0x40 | PING, b"", true), 1002),
        (
            "RSV1 on a continuation",
            {
                let mut b = frame(0x40 | TEXT, &deflated(b"{\"op\":"), true);
                b.extend(frame(FIN | 0x40, b"x", true));
                b
            },
            1002,
        ),
        (
            "invalid UTF-8 once inflated",
            frame(FIN | 0x40 | TEXT, &deflated(b"{\"op\":\"\xff\"}"), true),
            1007,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut client = open_deflate(server.addr).await;
        client.send(&bytes).await;
        assert_eq!(client.close_code().await, Some(code), "{what}");
    }
    // The server goes on: a fresh subscriber is answered.
    let mut client = open_deflate(server.addr).await;
    client
        .send(&frame(FIN | TEXT, br#"{"op":"topics"}"#, true))
        .await;
    assert_eq!(client.json().await["type"], "topics");
    server.shutdown().await;
}
