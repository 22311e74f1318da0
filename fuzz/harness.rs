//! The bodies of the fuzz targets, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`)
//! and the corpus replay test (`tests/fuzz_corpus.rs`), so the replay runs exactly the fuzzed
//! code. Only `eddy`, `serde_json`, `tokio` and `std` are used: this file must also build as part
//! of the root package's tests.
//!
//! Each function must never panic, hang or blow memory, whatever its input; the assertions
//! below are properties the engine promises, so a failing one is a bug the fuzzer found.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use eddy::event::{FieldPath, Format, Parsed, Position};
use eddy::offline::{self, RunOptions};
use eddy::{Frame, Limits, Parser, QueryDef};

/// Stack of the thread that runs scripts: Rhai recurses on the native stack, and the binary
/// gives its script thread this much (see `engine/main.rs`).
const SCRIPT_STACK_BYTES: usize = 64 << 20;

/// Separates the script from the events in a `query` input; never valid UTF-8, so it cannot be
/// part of a script.
pub const QUERY_SPLIT: u8 = 0xFF;

/// An events part that starts with this byte (never valid JSON) runs with `--stream s`: events
/// without a `"stream"` field belong to stream `s` instead of feeding every query.
pub const STREAM_FLAG: u8 = 0xFE;

/// Set before the fuzzed script, on the same line so that line numbers stay those of the
/// input: without a `source` nearly every mutated script would fail validation. A script can
/// still set (or break) `source` itself.
const SCRIPT_PREFIX: &str = "let source = \"s\"; ";

/// Fields read from every parsed event (besides its own keys).
const PROBES: [&str; 6] = ["symbol", "price", "a", "stream", "", "ts"];

/// Arbitrary bytes through the event parser: auto-detected format, then forced NDJSON and
/// forced single document (as frames of a larger input, numbered from a base), reusing one
/// parser. Every event must write valid JSON that parses back to the same event.
pub fn parse_one(data: &[u8]) {
    let mut parser = Parser::default();
    let parsed = parser.parse(data.to_vec());
    check_parsed(&parsed, None);
    let base = Position {
        index: 3,
        line: Some(7),
    };
    for format in [Format::Ndjson, Format::Document] {
        let parsed = parser.parse_with(data.to_vec(), format, base);
        check_parsed(&parsed, Some(base));
    }
}

fn check_parsed(parsed: &Parsed, base: Option<Position>) {
    let frame: &Arc<Frame> = &parsed.frame;
    assert_eq!(
        frame.len() + parsed.rejections.len(),
        parsed.items as usize,
        "every item is an event or a rejection"
    );
    for rejection in &parsed.rejections {
        assert!(!rejection.to_string().is_empty());
        if let Some(base) = base {
            assert!(rejection.position.index >= base.index);
        }
    }
    let mut reparser = Parser::default();
    for i in 0..frame.len() {
        let position = frame.position(i);
        if let Some(base) = base {
            assert!(position.index >= base.index, "{position:?} before {base:?}");
        }
        let ev = frame.event(i);
        let mut json = Vec::new();
        ev.write_json(&mut json);

        // What the engine writes is JSON, and an object (checked where serde_json's recursion
        // limit lets it read the value).
        let value: Option<serde_json::Value> = (nesting(&json) < SERDE_MAX_DEPTH).then(|| {
            serde_json::from_slice(&json).unwrap_or_else(|e| {
                panic!(
                    "event {i} wrote invalid JSON ({e}): {}",
                    String::from_utf8_lossy(&json)
                )
            })
        });
        let object = value
            .as_ref()
            .map(|v| v.as_object().expect("an event is a JSON object"));

        // Written once, it is a fixed point: parsing and writing again gives the same bytes.
        let again = reparser.parse(json.clone());
        assert_eq!(again.frame.len(), 1, "{}", String::from_utf8_lossy(&json));
        let mut json2 = Vec::new();
        again.frame.event(0).write_json(&mut json2);
        assert_eq!(
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&json2)
        );

        // Reading fields.
        let keys: Vec<String> = ev.keys().map(str::to_owned).collect();
        assert_eq!(keys.len(), ev.len());
        assert_eq!(ev.is_empty(), keys.is_empty());
        for key in &keys {
            assert!(ev.contains(key), "key {key:?} listed but not found");
            let _ = ev.get(key);
            if !key.is_empty() && !key.contains('.') {
                let path = FieldPath::parse(key).expect("a path of one segment");
                assert!(ev.lookup(&path).is_some(), "key {key:?} not found by path");
            }
        }
        for probe in PROBES {
            let value = ev.get(probe);
            if !ev.contains(probe) {
                assert!(value.is_unit(), "{probe:?} is missing but reads {value}");
            } else if let (Some(object), 1) = (object, keys.iter().filter(|k| *k == probe).count())
            {
                // `()` exactly for JSON null (serde_json keeps the last of duplicated keys,
                // `get` the first, so only unique keys are compared).
                assert_eq!(value.is_unit(), object[probe].is_null(), "{probe:?}");
            }
        }
        for path in ["a.b", "device.id", "a.b.c.d"] {
            let _ = ev.lookup(&FieldPath::parse(path).expect("valid path"));
        }
        let _ = format!("{ev:?}");

        // As a map: one entry per distinct key, like serde_json's object.
        let map = ev.to_map();
        if let Some(object) = object {
            assert_eq!(map.len(), object.len());
        }
    }
}

/// serde_json refuses values nested this deep (its recursion limit is 128).
const SERDE_MAX_DEPTH: usize = 120;

/// How deep arrays and objects nest in `json`.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A script and events: the bytes before the first [`QUERY_SPLIT`] are the script (lossily
/// decoded, after [`SCRIPT_PREFIX`]), the bytes after it the input of `eddy run` (with
/// `--stream s` if they start with [`STREAM_FLAG`]). The script is compiled under the default
/// limits and, if it compiles, run over the events offline. Everything runs on a thread with
/// the binary's script stack.
pub fn query_one(data: &[u8]) {
    let (script, events) = match data.iter().position(|&b| b == QUERY_SPLIT) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let script = format!("{SCRIPT_PREFIX}{}", String::from_utf8_lossy(script));
    let (stream, events) = match events.split_first() {
        Some((&STREAM_FLAG, rest)) => (Some("s".to_owned()), rest.to_vec()),
        _ => (None, events.to_vec()),
    };
    let worker = std::thread::Builder::new()
        .name("fuzz-query".into())
        .stack_size(SCRIPT_STACK_BYTES)
        .spawn(move || {
            run_query(
                &script,
                events,
                RunOptions {
                    stream,
                    ..RunOptions::default()
                },
            )
        })
        .expect("spawn the script thread");
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

fn run_query(script: &str, events: Vec<u8>, options: RunOptions) {
    let limits = Limits::default();
    let def = match QueryDef::compile("q", script, &limits) {
        Ok(def) => def,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            let _ = e.line_column();
            return;
        }
    };
    let _ = def.to_string();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let summary = offline::run(vec![def], events, &limits, &options, &mut out, &mut err)
        .expect("a query that compiled runs, and writing to a Vec cannot fail");

    let text = std::str::from_utf8(&out).expect("output is UTF-8");
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let item: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("output line is not JSON ({e}): {line}"));
        let topic = item["topic"].as_str().expect("every item has a topic");
        assert!(
            topic == "q" || topic.starts_with("q."),
            "topic {topic:?} of another query"
        );
        assert!(item.get("key").is_some() && item.get("value").is_some());
    }
    assert_eq!(summary.emitted, lines, "every emitted item is one line");
    let err = std::str::from_utf8(&err).expect("rejections are UTF-8");
    let reported = err.lines().filter(|l| l.starts_with("rejected: ")).count();
    assert!(
        reported as u64 >= summary.rejected,
        "{} rejections counted, {reported} reported:\n{err}",
        summary.rejected
    );
}

/// The message limit of the `frames` target: small, so that inputs reach it.
pub const FRAME_LIMIT: usize = 4096;

/// Flag bits of a `frames` input's first byte.
pub const FRAMES_SUBSCRIBE: u8 = 1;
pub const FRAMES_RAW: u8 = 2;

/// Arbitrary bytes from a client, through the server's read path. The first byte holds flags:
/// [`FRAMES_SUBSCRIBE`] picks `/subscribe` over `/ingest?ack=true`, and [`FRAMES_RAW`] sends
/// the rest as it is (the fuzzer writes the HTTP request too) instead of after a valid
/// handshake.
///
/// 1. The rest, as frames, goes through `ws::Reader` (with [`FRAME_LIMIT`]): no message is
///    larger than the limit, a text message is UTF-8, a ping carries at most 125 bytes, an
///    error closes with 1002, 1007 or 1009, and the reader never holds more than
///    `Reader::max_held_bytes(FRAME_LIMIT)` bytes, however long a length a header announces.
/// 2. The whole input goes over a socket to an in-process `eddy serve` (shared by every input,
///    message limit [`FRAME_LIMIT`]), which must answer with HTTP, then well-formed server
///    frames (unmasked, control frames of at most 125 bytes, JSON text), nothing after its
///    close frame, end the connection within 10 s, and not panic in any task.
pub fn frames_one(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (runtime, addr) = frames_server();
    runtime.block_on(read_frames(rest));
    let mut input = Vec::new();
    if flags & FRAMES_RAW == 0 {
        let path = if flags & FRAMES_SUBSCRIBE != 0 {
            "/subscribe"
        } else {
            "/ingest?ack=true"
        };
        input.extend_from_slice(
            format!(
                "GET {path} HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    input.extend_from_slice(rest);
    let panics = PANICS.load(Ordering::SeqCst);
    let output = runtime.block_on(exchange(*addr, &input));
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics,
        "a server task panicked"
    );
    check_server_output(&output);
}

/// Panics seen by the hook [`frames_server`] installs (server tasks' panics do not unwind into
/// the caller).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn frames_server() -> &'static (tokio::runtime::Runtime, SocketAddr) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, SocketAddr)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let config = eddy::server::Config {
            listen: "127.0.0.1:0".parse().expect("an address"),
            shards: 1,
            queries: "/nonexistent/eddy-fuzz-queries".into(),
            max_frame_bytes: FRAME_LIMIT,
            ..eddy::server::Config::default()
        };
        let server = runtime
            .block_on(eddy::server::Server::start(config))
            .expect("the server starts");
        let addr = server.addr;
        // Serves until the process ends.
        std::mem::forget(server);
        (runtime, addr)
    })
}

async fn read_frames(bytes: &[u8]) {
    use eddy::server::ws::{Incoming, ReadError, Reader};
    let mut reader = Reader::new(bytes, FRAME_LIMIT);
    let most = Reader::<&[u8]>::max_held_bytes(FRAME_LIMIT);
    loop {
        let read = reader.next().await;
        assert!(
            reader.held_bytes() <= most,
            "the reader holds {} bytes, more than {most}",
            reader.held_bytes()
        );
        match read {
            Ok(Incoming::Message(message)) => {
                assert!(message.payload.len() <= FRAME_LIMIT);
                if !message.binary {
                    assert!(std::str::from_utf8(&message.payload).is_ok());
                }
            }
            Ok(Incoming::Ping(payload)) => assert!(payload.len() <= 125),
            Ok(Incoming::Pong | Incoming::Close(_)) => {}
            Err(ReadError::Closed) => return,
            Err(e) => {
                let (code, reason) = e.close().expect("a read error other than EOF closes");
                assert!([1002, 1007, 1009].contains(&code), "{e}: {code}");
                assert!(reason.len() <= 123);
                return;
            }
        }
    }
}

/// Sends `input`, closes the sending direction, and reads everything the server answers.
async fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the in-process server");
    // No TIME_WAIT left behind by a long fuzzing run.
    let _ = stream.set_zero_linger();
    let (mut read, mut write) = stream.split();
    let send = async {
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
    };
    let mut output = Vec::new();
    let receive = async {
        let _ = read.read_to_end(&mut output).await;
    };
    let both = async { tokio::join!(send, receive) };
    tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("the server ends the connection within 10 s");
    output
}

/// Checks what the server sent: HTTP, and after a 101 only well-formed server frames.
fn check_server_output(output: &[u8]) {
    if output.is_empty() {
        return;
    }
    // hyper answers an HTTP/1.0 request in HTTP/1.0.
    let http = output.starts_with(b"HTTP/1.1 ") || output.starts_with(b"HTTP/1.0 ");
    assert!(http && output.len() >= 12, "not HTTP: {output:?}");
    if &output[9..12] != b"101" {
        return;
    }
    let head_end = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head")
        + 4;
    let mut rest = &output[head_end..];
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "a cut frame header");
        let (b0, b1) = (rest[0], rest[1]);
        assert_eq!(b0 & 0x70, 0, "reserved bits from the server");
        assert_eq!(b1 & 0x80, 0, "a masked server frame");
        let (len, header) = match b1 & 0x7f {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(rest[2..10].try_into().expect("8")) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert!(rest.len() >= header + len, "a cut frame");
        let payload = &rest[header..header + len];
        rest = &rest[header + len..];
        match b0 & 0x0f {
            0x1 => {
                assert!(b0 & 0x80 != 0, "the server does not fragment");
                let _: serde_json::Value =
                    serde_json::from_slice(payload).expect("the server's messages are JSON");
            }
            op @ (0x8..=0xa) => {
                assert!(
                    b0 & 0x80 != 0 && len <= 125,
                    "control frame {op}: {len} bytes"
                );
                if op == 0x8 {
                    assert_ne!(len, 1, "a close payload of one byte");
                    assert!(rest.is_empty(), "frames after the close frame");
                }
            }
            op => panic!("opcode {op} from the server"),
        }
    }
}

/// The `differential` target: the first 8 bytes seed a random query over the compiled subset
/// (`eddy::difftest::program`), the rest seed its events; both engines must write the same
/// bytes, errors included.
pub fn differential_one(data: &[u8]) {
    let mut seed = [0u8; 8];
    let n = data.len().min(8);
    seed[..n].copy_from_slice(&data[..n]);
    let program_seed = u64::from_le_bytes(seed);
    let event_seed = data[n..]
        .iter()
        .fold(program_seed, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let script = eddy::difftest::program(program_seed);
    let events = eddy::difftest::events(event_seed, 20);
    let worker = std::thread::Builder::new()
        .name("fuzz-differential".into())
        .stack_size(SCRIPT_STACK_BYTES)
        .spawn(move || eddy::difftest::run_both(&script, &events, &Limits::default()))
        .expect("spawn the script thread");
    match worker.join() {
        Ok(Ok(_)) => {}
        Ok(Err(diff)) => panic!("{diff}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
