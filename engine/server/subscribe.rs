//! Subscribers: WebSocket `/subscribe`, JSON control messages in, batch frames out.
//!
//! The connection runs on the shared WebSocket loops ([`ws`]): this task reads the client's
//! requests (at most 64 KiB each) and hands them to the hub; the writer task owns the write half
//! and, through [`Delivery`], the [`Mailbox`]. When the hub signals the mailbox, the writer
//! takes everything in it and writes it with one flush: `dropped` notices first, then control
//! messages and batches in order (batches of one topic waiting back to back merged into one
//! frame), then the conflated `latest` values. A batch frame is `{"type":"batch","topic":T,"seq":S,
//! "n":N,"pos":P,"items":…}`, where the items array was encoded once by the hub, `seq` counts
//! this subscriber's batches of that topic from 0, without gaps, `n` is how many items the batch
//! holds (so a client may count them without decoding them), and `pos` is the topic's position
//! after the batch (mode `all`), which a later subscribe may hand back as `from` to resume.
//!
//! While the writer task has written everything and waits, a shard that publishes a batch for
//! this subscriber writes the batch frame straight to the socket instead of waking the writer
//! (see [`super::mailbox`]): an idle subscriber's batch leaves on the shard's thread. The frame
//! is the same, numbered in the same sequence.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::upgrade::UpgradeFut;
use serde::Deserialize;
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use crate::json::{self, Object};
use crate::{Key, Topic};

use super::deflate;
use super::hub::{error_message, HubControl, Mode, Subscribe};
use super::mailbox::{Items, Mailbox, Outgoing, Seqs};
use super::metrics::Metrics;
use super::replay::Position;
use super::ws::{self, Gather, Wake, Writer, COMPRESSED, TEXT};
use super::State;

/// Largest control message a subscriber may send.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Subscribe {
        topic: String,
        keys: Option<Vec<serde_json::Value>>,
        #[serde(default)]
        mode: ModeName,
        #[serde(default)]
        snapshot: bool,
        from: Option<String>,
    },
    Unsubscribe {
        topic: String,
    },
    Topics {},
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    #[default]
    All,
    Latest,
}

/// Serves one subscriber's WebSocket: the reader loop handles requests, the writer loop
/// delivers the mailbox. With `deflate` (negotiated in the handshake), batch frames go out
/// compressed and compressed requests are taken.
///
/// `socket` is the connection's socket, when known: while the writer is idle, the shard that
/// publishes a batch writes it straight to the socket (see [`super::mailbox`]).
pub async fn websocket(
    state: Arc<State>,
    upgrade: UpgradeFut,
    deflate: bool,
    socket: Option<super::accept::SocketFd>,
) {
    let Ok(ws) = upgrade.await else { return };
    let _conn = state.metrics.connection("subscribe");
    let id = state.next_subscriber.fetch_add(1, Ordering::Relaxed);
    let mut mailbox = Mailbox::new(
        state.config.subscriber_queue_bytes,
        state.config.slow_consumer_timeout,
    )
    .compressing(deflate);
    // The upgraded connection (`ws`) holds the socket open, so its descriptor is valid here.
    if let Some(fd) = socket.and_then(|s| s.duplicate()) {
        mailbox = mailbox.writing_to(fd, state.metrics.socket_recorder());
    }
    let mailbox = Arc::new(mailbox);
    let delivery = Delivery {
        mailbox: Arc::clone(&mailbox),
        seqs: Seqs::default(),
        deflate,
        closing: state.closing.subscribe(),
        // A client that reads nothing at all blocks our writes; past this it is dropped
        // without a close frame (there is no room left to send one).
        stuck_after: state.config.slow_consumer_timeout + state.config.ping_interval * 2,
        state: Arc::clone(&state),
    };
    let mut conn = ws::open_naming(
        ws.into_inner(),
        (
            MAX_REQUEST_BYTES,
            "request larger than 64 KiB, the limit on a subscriber's request",
        ),
        state.config.ping_interval,
        deflate,
        delivery,
    );
    let mut opening = Opening::new();
    while let Some(message) = conn.inbox.next().await {
        request(&state, id, &mailbox, &message.payload, &mut opening).await;
    }
    // A subscribe still taking its topic from NATS ends before the subscriber is forgotten.
    for (_, task) in opening.drain() {
        let _ = task.await;
    }
    conn.finish().await;
    state.hub.control(HubControl::Disconnect { subscriber: id });
    if let Some(cluster) = &state.cluster {
        cluster.unwant(id, None).await;
    }
}

/// A subscriber's side of the writer loop: its mailbox, and the server's closing signal.
struct Delivery {
    state: Arc<State>,
    mailbox: Arc<Mailbox>,
    seqs: Seqs,
    /// Batch frames go out compressed (permessage-deflate).
    deflate: bool,
    closing: watch::Receiver<bool>,
    stuck_after: Duration,
}

impl ws::Source for Delivery {
    async fn wake(&mut self) -> Wake {
        tokio::select! {
            _ = self.mailbox.notify.notified() => Wake::Ready,
            // The hub has handed over everything produced before shutdown.
            _ = self.closing.changed() => Wake::Closing,
        }
    }

    async fn write<W: AsyncWrite + Unpin + Send>(
        &mut self,
        ws: &mut Writer<W>,
    ) -> io::Result<Option<(u16, &'static str)>> {
        let delivered = deliver(
            &self.mailbox,
            ws,
            &mut self.seqs,
            self.deflate,
            &self.state.metrics,
        );
        match tokio::time::timeout(self.stuck_after, delivered).await {
            Ok(Ok(close)) => Ok(close.map(|code| (code, "slow consumer"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    fn busy(&mut self) -> Option<(bytes::Bytes, Duration)> {
        let rest = self.mailbox.busy(&mut self.seqs)?;
        Some((rest, self.stuck_after))
    }

    fn idle(&mut self) {
        self.mailbox.idle(&mut self.seqs);
    }
}

impl Drop for Delivery {
    /// The writer is gone: nobody writes to the socket any more.
    fn drop(&mut self) {
        self.mailbox.detach();
    }
}

/// Cluster mode: per topic, this subscriber's subscribe that is still taking the topic from
/// NATS (see [`super::cluster::Cluster::want`]).
type Opening = HashMap<String, tokio::task::JoinHandle<()>>;

/// Handles one client request; answers go through the mailbox, in order with everything else,
/// except that in a cluster a subscribe that first takes its topic from NATS is answered when
/// that is done, while the requests after it (of other topics) go on.
async fn request(
    state: &Arc<State>,
    id: u64,
    mailbox: &Arc<Mailbox>,
    text: &[u8],
    opening: &mut Opening,
) {
    let request: Request = match serde_json::from_slice(text) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "bad request: {e}; expected {{\"op\":\"subscribe\"|\"unsubscribe\"|\"topics\", …}}"
            );
            mailbox.push_control(error_message(&msg).into());
            return;
        }
    };
    let control = match request {
        Request::Subscribe {
            topic,
            keys,
            mode,
            snapshot,
            from,
        } => {
            let from = match (from.as_deref().map(Position::parse), mode) {
                (Some(Err(e)), _) => {
                    mailbox.push_control(error_message(&e).into());
                    return;
                }
                (Some(Ok(_)), ModeName::Latest) => {
                    let e = "`from` resumes mode \"all\"; mode \"latest\" catches up with                              \"snapshot\":true instead";
                    mailbox.push_control(error_message(e).into());
                    return;
                }
                (Some(Ok(p)), ModeName::All) => Some(p),
                (None, _) => None,
            };
            let keys =
                match keys.map(|k| k.iter().map(key_of).collect::<Result<Vec<Key>, String>>()) {
                    Some(Err(e)) => {
                        mailbox.push_control(error_message(&e).into());
                        return;
                    }
                    Some(Ok(keys)) => Some(keys),
                    None => None,
                };
            let control = HubControl::Subscribe(Subscribe {
                subscriber: id,
                mailbox: Arc::clone(mailbox),
                topic: topic.clone(),
                keys,
                mode: match mode {
                    ModeName::All => Mode::All,
                    ModeName::Latest => Mode::Latest,
                },
                snapshot,
                from,
            });
            // In cluster mode the node takes the topic from NATS first (with its snapshot): on
            // a task of its own, after this subscriber's earlier request of the same topic.
            if let Some(cluster) = &state.cluster {
                if let Some(earlier) = opening.remove(&topic) {
                    let _ = earlier.await;
                }
                opening.retain(|_, task| !task.is_finished());
                let (state, cluster, mailbox) =
                    (Arc::clone(state), Arc::clone(cluster), Arc::clone(mailbox));
                let name = topic.clone();
                let task = tokio::spawn(async move {
                    match cluster.want(id, &name).await {
                        Ok(()) => state.hub.control(control),
                        Err(e) => mailbox.push_control(error_message(&e).into()),
                    }
                });
                opening.insert(topic, task);
                return;
            }
            control
        }
        Request::Unsubscribe { topic } => {
            if let Some(cluster) = &state.cluster {
                if let Some(earlier) = opening.remove(&topic) {
                    let _ = earlier.await;
                }
                cluster.unwant(id, Some(&topic)).await;
            }
            HubControl::Unsubscribe {
                subscriber: id,
                topic,
                mailbox: Arc::clone(mailbox),
            }
        }
        Request::Topics {} => HubControl::Topics {
            subscriber: id,
            mailbox: Arc::clone(mailbox),
        },
    };
    state.hub.control(control);
}

fn key_of(value: &serde_json::Value) -> Result<Key, String> {
    match value {
        serde_json::Value::String(s) => Ok(Key::Str(s.as_str().into())),
        serde_json::Value::Bool(b) => Ok(Key::Bool(*b)),
        serde_json::Value::Number(n) if n.is_i64() => Ok(Key::Int(n.as_i64().unwrap_or(0))),
        serde_json::Value::Null => Ok(Key::None),
        other => Err(format!(
            "keys must be strings, integers or booleans, found {other}"
        )),
    }
}

/// Bytes of items past which no further batch is merged into a frame. Kept small: a client's
/// read buffer grows to its largest frame, and a thousand subscribers that fell behind would
/// otherwise each take megabyte frames, and the client the page faults of buffers that keep
/// growing, which puts it further behind.
const MERGED_BYTES: usize = 64 * 1024;

/// Writes everything in the mailbox with one flush; with `deflate`, batch frames compressed.
/// Returns the close code when the subscriber must be closed.
async fn deliver<W: AsyncWrite + Unpin>(
    mailbox: &Mailbox,
    write: &mut Writer<W>,
    seqs: &mut Seqs,
    deflate: bool,
    metrics: &Metrics,
) -> io::Result<Option<u16>> {
    let inbox = mailbox.take();
    let mut frames = Gather::default();
    for (topic, items) in &inbox.dropped {
        let msg = json::message("dropped", |o| {
            o.str("topic", topic).int("items", *items as i64);
        });
        frames.frame(TEXT, &[&msg], &[]);
    }
    let mut stamps = Vec::new();
    let mut queue = inbox.queue.iter().peekable();
    while let Some(out) = queue.next() {
        match out {
            Outgoing::Control(msg) => frames.frame(TEXT, &[], &[msg]),
            Outgoing::Batch {
                topic,
                items,
                count,
                ingest,
                published,
                pos,
            } => {
                stamps.push((*published, *ingest, *count));
                // Batches of one topic queued back to back (the subscriber fell behind the
                // shards) go out as one frame, up to MERGED_BYTES: fewer frames to write and to
                // read for the same items, in the same order, with the last one's position.
                let (mut count, mut pos) = (*count, pos);
                let mut arrays = vec![&**items];
                let mut size = items.json.len();
                while let Some(Outgoing::Batch {
                    topic: next,
                    items,
                    count: n,
                    ingest,
                    published,
                    pos: more_pos,
                }) = queue.peek()
                {
                    if next != topic || size >= MERGED_BYTES {
                        break;
                    }
                    size += items.json.len();
                    count += n;
                    pos = more_pos;
                    stamps.push((*published, *ingest, *n));
                    arrays.push(&**items);
                    queue.next();
                }
                batch_frame(
                    &mut frames,
                    seqs,
                    topic,
                    &arrays,
                    count,
                    pos.as_deref(),
                    deflate,
                );
            }
            Outgoing::Replay { topic, batches } => {
                for b in batches {
                    let head = batch_head(seqs, topic, b.count, Some(&b.pos));
                    frames.frame(TEXT, &[&head], &[&b.items, b"}"]);
                }
            }
        }
    }
    if let Some((published, ingest)) = inbox.latest_since {
        let count = inbox.latest.values().map(|p| p.len() as u64).sum();
        stamps.push((published, ingest, count));
    }
    for (topic, pending) in &inbox.latest {
        let mut items: Vec<&[u8]> = Vec::with_capacity(2 * pending.len() + 1);
        for element in pending.values() {
            items.push(if items.is_empty() { b"[" } else { b"," });
            items.push(element);
        }
        if items.is_empty() {
            items.push(b"[");
        }
        items.push(b"]}");
        let head = batch_head(seqs, topic, pending.len() as u64, None);
        frames.frame(TEXT, &[&head], &items);
    }
    write.gathered(&frames).await?;
    write.flush().await?;
    let now = Instant::now();
    let us = |t: Instant| now.duration_since(t).as_micros() as u64;
    let samples: Vec<(u64, Option<u64>, u64)> = stamps
        .into_iter()
        .map(|(published, ingest, count)| (us(published), ingest.map(us), count))
        .collect();
    metrics.record_socket(&samples);
    Ok(inbox.close)
}

/// Adds to `frames` one batch frame of `topic` whose items are the arrays `arrays` joined, and
/// counts it in `seqs`; with `deflate`, compressed.
pub(super) fn batch_frame<'a>(
    frames: &mut Gather<'a>,
    seqs: &mut Seqs,
    topic: &Topic,
    arrays: &[&'a Items],
    count: u64,
    pos: Option<&str>,
    deflate: bool,
) {
    let head = batch_head(seqs, topic, count, pos);
    if deflate {
        let mut prefix = Vec::with_capacity(head.len() + 16);
        deflate::stored(&mut prefix, &head);
        deflate::stored(&mut prefix, b"[");
        frames.frame(TEXT | COMPRESSED, &[&prefix], &compressed_joined(arrays));
    } else {
        let json: Vec<&[u8]> = arrays.iter().map(|a| &a.json[..]).collect();
        frames.frame(TEXT, &[&head], &joined(&json));
    }
}

/// A batch frame up to its items: `{"type":"batch","topic":T,"seq":S,"n":N,"pos":P,"items":`
/// (the items and the closing brace follow). Counts the frame in `seqs`.
fn batch_head(seqs: &mut Seqs, topic: &Topic, count: u64, pos: Option<&str>) -> Vec<u8> {
    let seq = seqs.entry(Arc::clone(topic)).or_insert(0);
    let mut head = Vec::with_capacity(topic.len() + pos.map_or(0, str::len) + 64);
    let mut o = Object::new(&mut head);
    o.str("type", "batch")
        .str("topic", topic)
        .int("seq", *seq as i64)
        .int("n", count as i64);
    if let Some(pos) = pos {
        o.str("pos", pos);
    }
    o.key("items");
    *seq += 1;
    head
}

/// The shared parts of a compressed batch frame (see [`deflate`]), after its head and `[`
/// (stored, the subscriber's own): each array's elements compressed once for every subscriber,
/// `,` between them, `]}` and the end. None of it is copied.
fn compressed_joined<'a>(arrays: &[&'a Items]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(2 * arrays.len() + 1);
    for items in arrays {
        let piece = items.deflated();
        if piece.is_empty() {
            continue;
        }
        if !parts.is_empty() {
            parts.push(deflate::COMMA);
        }
        parts.push(&piece[..]);
    }
    parts.push(deflate::CLOSE);
    parts
}

/// The parts of a batch frame, after its head, whose items are the JSON arrays `arrays` joined
/// into one: the elements of each (its brackets left out), in order, without copying them.
fn joined<'a>(arrays: &[&'a [u8]]) -> Vec<&'a [u8]> {
    if let [items] = arrays {
        return vec![items, b"}"];
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * arrays.len() + 2);
    parts.push(b"[");
    for array in arrays {
        let elements = array
            .get(1..array.len().saturating_sub(1))
            .unwrap_or_default();
        if elements.is_empty() {
            continue;
        }
        if parts.len() > 1 {
            parts.push(b",");
        }
        parts.push(elements);
    }
    parts.push(b"]}");
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    /// The payloads of the unmasked frames in `bytes`; a compressed one (RSV1) is inflated the
    /// way RFC 7692 says, with flate2's plain reader.
    fn payloads(mut bytes: &[u8]) -> Vec<(serde_json::Value, bool)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let compressed = bytes[0] & 0x40 != 0;
            let (len, head) = match bytes[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (usize::from(n), 2),
            };
            let mut payload = bytes[head..head + len].to_vec();
            if compressed {
                payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
                let mut text = Vec::new();
                let mut reader = flate2::read::DeflateDecoder::new(&payload[..]);
                // No final block: read until the input runs out.
                let _ = std::io::Read::read_to_end(&mut reader, &mut text);
                payload = text;
            }
            out.push((serde_json::from_slice(&payload).unwrap(), compressed));
            bytes = &bytes[head + len..];
        }
        out
    }

    #[test]
    fn joined_arrays_are_one_array_of_their_elements_in_order() {
        let frame = |arrays: &[&'static str]| {
            let arrays: Vec<Bytes> = arrays
                .iter()
                .map(|a| Bytes::from_static(a.as_bytes()))
                .collect();
            let arrays: Vec<&[u8]> = arrays.iter().map(|a| &a[..]).collect();
            let text: Vec<u8> = [&b"{\"items\":"[..]]
                .into_iter()
                .chain(joined(&arrays))
                .collect::<Vec<_>>()
                .concat();
            serde_json::from_slice::<serde_json::Value>(&text).unwrap()
        };
        let items = |v: serde_json::Value| serde_json::json!({ "items": v });
        assert_eq!(frame(&["[1,2]"]), items(serde_json::json!([1, 2])));
        assert_eq!(
            frame(&["[]", "[1]", "[]", r#"[{"a":[2]},"]"]"#]),
            items(serde_json::json!([1, {"a": [2]}, "]"]))
        );
        assert_eq!(frame(&["[]", "[]"]), items(serde_json::json!([])));
    }

    #[tokio::test]
    async fn batches_of_a_topic_queued_back_to_back_go_out_as_one_frame() {
        for deflate in [false, true] {
            merged_frames(deflate).await;
        }
    }

    /// Without and with permessage-deflate: the same frames, batches compressed and nothing else.
    async fn merged_frames(deflate: bool) {
        let mailbox = Mailbox::new(1 << 20, Duration::from_secs(10));
        let (a, b): (Topic, Topic) = ("a".into(), "b".into());
        let batch = |topic: &Topic, items: &'static str, n: u64, pos: &str| {
            let items = Arc::new(Items::from(Bytes::from(items)));
            mailbox.push_batch(
                topic,
                &items,
                n,
                (Instant::now(), None, Some(&Arc::from(pos))),
                false,
            );
        };
        batch(&a, "[1,2]", 2, "p1");
        batch(&a, "[3]", 1, "p2");
        batch(&a, r#"[{"x":[4]}]"#, 1, "p3");
        mailbox.push_control(Bytes::from(r#"{"type":"unsubscribed","topic":"c"}"#));
        batch(&a, "[5]", 1, "p4");
        batch(&b, "[6]", 1, "q1");
        batch(&a, "[7,8]", 2, "p5");
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut writer = Writer::new(server);
        let mut seqs = Seqs::default();
        let close = deliver(
            &mailbox,
            &mut writer,
            &mut seqs,
            deflate,
            &Metrics::default(),
        )
        .await
        .unwrap();
        assert_eq!(close, None);
        drop(writer);
        let mut bytes = Vec::new();
        client.read_to_end(&mut bytes).await.unwrap();
        let frame = |topic: &str, seq: u64, items: serde_json::Value, pos: &str| {
            let n = items.as_array().unwrap().len();
            serde_json::json!({"type": "batch", "topic": topic, "seq": seq, "n": n, "pos": pos,
                               "items": items})
        };
        // Merged up to the control message and across no other topic; seq counts frames.
        assert_eq!(
            payloads(&bytes),
            [
                (
                    frame("a", 0, serde_json::json!([1, 2, 3, {"x": [4]}]), "p3"),
                    deflate
                ),
                (
                    serde_json::json!({"type": "unsubscribed", "topic": "c"}),
                    false
                ),
                (frame("a", 1, serde_json::json!([5]), "p4"), deflate),
                (frame("b", 0, serde_json::json!([6]), "q1"), deflate),
                (frame("a", 2, serde_json::json!([7, 8]), "p5"), deflate),
            ]
        );
    }

    /// A connected pair of loopback sockets: (client, the server side's descriptor, which is
    /// non-blocking as the runtime leaves it).
    fn socket_pair() -> (std::net::TcpStream, std::os::fd::OwnedFd) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server.into())
    }

    /// Reads `len` bytes from `client`.
    fn read_exactly(client: &mut std::net::TcpStream, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::io::Read::read_exact(client, &mut bytes).unwrap();
        bytes
    }

    fn batch_json(topic: &str, seq: u64, items: serde_json::Value, pos: &str) -> serde_json::Value {
        let n = items.as_array().unwrap().len();
        serde_json::json!({"type": "batch", "topic": topic, "seq": seq, "n": n, "pos": pos,
                           "items": items})
    }

    #[test]
    fn an_idle_subscriber_gets_batches_straight_on_its_socket_and_only_while_idle() {
        for deflate in [false, true] {
            let (mut client, server) = socket_pair();
            let recorder = super::super::metrics::SocketRecorder::default();
            let mailbox = Mailbox::new(1 << 20, Duration::from_secs(10))
                .compressing(deflate)
                .writing_to(server, recorder);
            let topic: Topic = "t".into();
            let batch = |items: &'static str| Arc::new(Items::from(Bytes::from(items)));
            let push = |items: &Arc<Items>, n: u64, pos: &str, direct: bool| {
                mailbox.push_batch(
                    &topic,
                    items,
                    n,
                    (Instant::now(), None, Some(&Arc::from(pos))),
                    direct,
                )
            };
            // The connection task has not said it is idle yet: queued.
            push(&batch("[0]"), 1, "p0", true);
            assert_eq!(mailbox.take().queue.len(), 1);
            // It wrote that one (seq 0) and is idle: the next two go straight, numbered on.
            let mut seqs = Seqs::from_iter([(topic.clone(), 1)]);
            mailbox.idle(&mut seqs);
            push(&batch(r#"[{"a":1},2]"#), 2, "p1", true);
            push(&batch("[3]"), 1, "p2", true);
            // Not when the hub says the publish has spent its time on direct writes.
            push(&batch("[4]"), 1, "p3", false);
            let inbox = mailbox.take();
            assert_eq!(inbox.queue.len(), 1, "only the last one is queued");
            let mut first = Gather::default();
            let (mut a, mut b) = (Seqs::default(), Seqs::default());
            a.insert(topic.clone(), 1);
            b.insert(topic.clone(), 2);
            let (x, y) = (batch(r#"[{"a":1},2]"#), batch("[3]"));
            batch_frame(&mut first, &mut a, &topic, &[&x], 2, Some("p1"), deflate);
            batch_frame(&mut first, &mut b, &topic, &[&y], 1, Some("p2"), deflate);
            let bytes = read_exactly(&mut client, first.len());
            assert_eq!(
                payloads(&bytes),
                [
                    (
                        batch_json("t", 1, serde_json::json!([{"a": 1}, 2]), "p1"),
                        deflate
                    ),
                    (batch_json("t", 2, serde_json::json!([3]), "p2"), deflate),
                ]
            );
            // The connection task takes the socket back, with the numbering (next: 3), and
            // nothing of a frame to finish.
            assert!(mailbox.busy(&mut seqs).is_none());
            assert_eq!(seqs[&topic], 3);
            push(&batch("[5]"), 1, "p4", true);
            assert_eq!(mailbox.take().queue.len(), 1, "busy: queued");
            // Gone: never straight again.
            mailbox.idle(&mut seqs);
            mailbox.detach();
            push(&batch("[6]"), 1, "p5", true);
            assert_eq!(mailbox.take().queue.len(), 1, "detached: queued");
        }
    }

    #[test]
    fn a_batch_the_socket_takes_in_part_is_finished_by_the_connection_task_first() {
        let (mut client, server) = socket_pair();
        let writer_side = std::net::TcpStream::from(server.try_clone().unwrap());
        let mailbox = Mailbox::new(64 << 20, Duration::from_secs(10))
            .writing_to(server, super::super::metrics::SocketRecorder::default());
        let topic: Topic = "t".into();
        // Far more than a loopback socket buffers while nobody reads.
        let values: Vec<u64> = (0..2_000_000).collect();
        let big = Arc::new(Items::from(Bytes::from(
            serde_json::to_vec(&values).unwrap(),
        )));
        let mut seqs = Seqs::default();
        mailbox.idle(&mut seqs);
        mailbox.push_batch(
            &topic,
            &big,
            values.len() as u64,
            (Instant::now(), None, Some(&Arc::from("p"))),
            true,
        );
        // A frame begun must be finished before any other: the next batch waits in the queue.
        let small = Arc::new(Items::from(Bytes::from_static(b"[7]")));
        mailbox.push_batch(
            &topic,
            &small,
            1,
            (Instant::now(), None, Some(&Arc::from("q"))),
            true,
        );
        let rest = mailbox
            .busy(&mut seqs)
            .expect("the socket took part of the frame");
        let mut whole = Gather::default();
        batch_frame(
            &mut whole,
            &mut Seqs::default(),
            &topic,
            &[&big],
            values.len() as u64,
            Some("p"),
            false,
        );
        assert!(!rest.is_empty() && rest.len() < whole.len());
        assert_eq!(seqs[&topic], 1, "the frame begun was numbered 0");
        // What the connection task writes: the rest, then what was queued.
        let queued = mailbox.take();
        assert_eq!(queued.queue.len(), 1);
        let mut frames = Gather::default();
        batch_frame(
            &mut frames,
            &mut seqs,
            &topic,
            &[&small],
            1,
            Some("q"),
            false,
        );
        let mut out = rest.to_vec();
        out.extend_from_slice(&frames.rest_after(0));
        let total = whole.len() + frames.len();
        let reader = std::thread::spawn(move || read_exactly(&mut client, total));
        let mut w = &writer_side;
        let mut at = 0;
        while at < out.len() {
            match std::io::Write::write(&mut w, &out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let bytes = reader.join().unwrap();
        let got = payloads(&bytes);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, batch_json("t", 0, serde_json::json!(values), "p"));
        assert_eq!(got[1].0, batch_json("t", 1, serde_json::json!([7]), "q"));
    }
}
