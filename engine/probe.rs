//! `eddy probe`: a subscriber that measures end-to-end latency and checks what it receives.
//!
//! It subscribes to a topic (mode `all` or `latest`) and, for items whose value carries `sent_us`
//! (the send time `eddy feed` stamps into each event, passed through by the query), records
//! `now - sent_us` in an HdrHistogram. So that one probe can keep up with thousands of
//! subscriptions on the same cores as the server, it samples: a batch is read without decoding
//! its items (its `seq`, `n` and `pos`, then the first `sent_us`, which is the batch's oldest
//! item, so the sample errs late), unless a count field asks for every item to be decoded. It
//! checks that each subscription's `seq` has no gaps or repeats and adds up `dropped` notices. With a count field (a field of the item's
//! value that counts the key's items from 1, like `vwap`'s `trades`) it also checks per key that
//! the count rises by exactly one (mode `all`; in mode `latest` only that it rises), and adds up
//! each key's last count per connection: the events the query handled for the keys seen. (After
//! a connection that ended with the server's shutdown close, 1001, counts start afresh. After one
//! lost otherwise, a count that goes on from the key's last one is taken as the same server's and
//! counted from there; one that does not, as a new server's, counted from 0. Once servers resume
//! their state, a shutdown will no longer reset the counts.)
//!
//! It runs over a [`Link`], so a server that closes, dies or falls silent is noticed within the
//! link's timeout; the probe then ends with the reason in its report, or with `reconnect`
//! connects again after a [`Backoff`] and subscribes again (seq starts from 0 on the new
//! subscription). In mode `all` it resumes from the topic position of the last batch it got
//! (`from`): when the server still has what came after it, the new subscription continues the
//! old one exactly, and per-key counts are checked across the reconnect for gaps and repeats;
//! when the position is gone (`gone`: an ephemeral server restarted, or the replay no longer
//! holds it), the heuristics above apply. Producer and probe must share a clock: run both on one
//! machine.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, Payload};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::feed::now_us;
use crate::link::{Backoff, ClientError, Link, Received};
use crate::server::deflate;

/// How the probe subscribes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every item, in order.
    #[default]
    All,
    /// At most one pending value per key, the newest.
    Latest,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Latest => "latest",
        }
    }
}

/// What to probe and how.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub url: String,
    pub topic: String,
    /// How long to listen after the first item (before it, at most a minute).
    pub duration: Duration,
    pub mode: Mode,
    /// Connect and subscribe again (with backoff) when the connection is lost or refused.
    pub reconnect: bool,
    /// How long the server may stay silent (no frame, no pong) before the connection is given
    /// up; also the limit on connecting.
    pub timeout: Duration,
    /// A field of each item's value that counts the key's items from 1.
    pub count_field: Option<String>,
    /// Report latency and items every this often (to the `on_interval` callback).
    pub interval: Option<Duration>,
    /// Offer permessage-deflate: batch frames come compressed; their head is read from its
    /// stored block, and one in [`COMPRESSED_SAMPLE_EVERY`] is inflated as far as its first item
    /// for the latency sample (unless a count field needs every item).
    pub deflate: bool,
}

impl ProbeOptions {
    /// Opens a connection to `/subscribe`, offering permessage-deflate if asked to.
    async fn open(&self) -> Result<Link, ClientError> {
        if self.deflate {
            Link::open_compressed(&self.url, "/subscribe", self.timeout).await
        } else {
            Link::open(&self.url, "/subscribe", self.timeout).await
        }
    }

    pub fn new(url: &str, topic: &str, duration: Duration) -> ProbeOptions {
        ProbeOptions {
            url: url.to_owned(),
            topic: topic.to_owned(),
            duration,
            mode: Mode::All,
            reconnect: false,
            timeout: crate::link::SILENCE,
            count_field: None,
            interval: None,
            deflate: false,
        }
    }
}

/// What the probe saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeReport {
    pub items: u64,
    pub batches: u64,
    /// Payload bytes of the messages received, as they came (compressed or not).
    pub wire_bytes: u64,
    /// Messages that came compressed (permessage-deflate).
    pub compressed: u64,
    /// Items whose latency was recorded: with a count field, every item that carried `sent_us`;
    /// without, the first one of each batch (batches are read without decoding their items).
    pub timed: u64,
    pub dropped: u64,
    /// Batches whose seq skipped ahead (counted in batches skipped).
    pub seq_gaps: u64,
    /// Batches whose seq was not above the last one's.
    pub seq_duplicates: u64,
    pub seconds: f64,
    pub items_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// Reconnects that resumed from the last position seen (mode `all`).
    pub resumed: u64,
    /// Reconnects whose position the server no longer had (`gone`).
    pub gone: u64,
    /// Why, for the first few.
    pub gone_reasons: Vec<String>,
    /// Connections lost (closed, broken or silent server).
    pub lost: u64,
    /// Attempts to connect that failed.
    pub connect_failures: u64,
    /// With a count field: items whose count skipped ahead of the key's last one + 1, in counts
    /// skipped (mode `all` only).
    pub count_gaps: u64,
    /// With a count field: items whose count was not above the key's last one.
    pub count_duplicates: u64,
    /// With a count field: the sum over connections of each key's last count, less its last
    /// count on the previous connection when it went on from there (the same server).
    pub counted: u64,
    /// Why the probe stopped early (without `reconnect`), or never connected.
    pub error: Option<String>,
}

/// Latency and items over one interval, for a live view of a long run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IntervalReport {
    /// Seconds since the probe started, at the interval's end.
    pub t: f64,
    pub items: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Whether a connection was open at the interval's end.
    pub connected: bool,
}

/// What `subscribers` probes saw together.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FanOutReport {
    pub subscribers: usize,
    /// The fewest and most items one subscriber received.
    pub min_items: u64,
    pub max_items: u64,
    pub dropped: u64,
    pub seq_gaps: u64,
    /// Payload bytes received by all subscribers, as they came (compressed or not).
    pub wire_bytes: u64,
    /// Batches received, and messages that came compressed, all subscribers together.
    pub batches: u64,
    pub compressed: u64,
    /// Batches whose first item's send stamp was read (every uncompressed batch, one compressed
    /// batch in eight).
    pub timed: u64,
    /// Latency over every timed item of every subscriber.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Opens `subscribers` connections to `topic` and probes them all.
/// With `deflate`, each offers permessage-deflate (see [`ProbeOptions::deflate`]).
pub async fn fan_out(
    url: &str,
    topic: &str,
    duration: Duration,
    subscribers: usize,
    deflate: bool,
) -> Result<FanOutReport, ClientError> {
    let options = ProbeOptions {
        // Hundreds of subscribers on the server's cores can starve its pongs for a while.
        timeout: Duration::from_secs(10),
        deflate,
        ..ProbeOptions::new(url, topic, duration)
    };
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let options = options.clone();
        // Every subscriber connects before any starts, so all see the feed from its start.
        let link = options.open().await?;
        tasks.push(tokio::spawn(async move {
            probe(&options, Some(link), CancellationToken::new(), |_| {}).await
        }));
    }
    let mut all = crate::shard::latency_histogram();
    let mut report = FanOutReport {
        subscribers,
        min_items: u64::MAX,
        ..FanOutReport::default()
    };
    for t in tasks {
        let Ok((one, latency)) = t.await else {
            continue;
        };
        report.min_items = report.min_items.min(one.items);
        report.max_items = report.max_items.max(one.items);
        report.dropped += one.dropped;
        report.seq_gaps += one.seq_gaps;
        report.wire_bytes += one.wire_bytes;
        report.compressed += one.compressed;
        report.batches += one.batches;
        report.timed += one.timed;
        let _ = all.add(&latency);
    }
    if subscribers == 0 {
        report.min_items = 0;
    }
    if !all.is_empty() {
        report.p50_us = all.value_at_quantile(0.5);
        report.p99_us = all.value_at_quantile(0.99);
        report.p999_us = all.value_at_quantile(0.999);
        report.max_us = all.max();
    }
    Ok(report)
}

/// Subscribes to `topic` on the server at `url` for `duration` (starting at the first item, so
/// a probe may be started before its feed).
pub async fn run(url: &str, topic: &str, duration: Duration) -> Result<ProbeReport, ClientError> {
    run_with(
        &ProbeOptions::new(url, topic, duration),
        CancellationToken::new(),
        |_| {},
    )
    .await
}

/// Probes as `options` say, until the duration is over or `stop` is cancelled; calls
/// `on_interval` at every interval. Connection trouble ends up in the report's `error`.
pub async fn run_with(
    options: &ProbeOptions,
    stop: CancellationToken,
    on_interval: impl FnMut(&IntervalReport),
) -> Result<ProbeReport, ClientError> {
    crate::link::host_of(&options.url)?;
    Ok(probe(options, None, stop, on_interval).await.0)
}

/// What one subscription has seen so far.
#[derive(Default)]
struct Session {
    next_seq: Option<u64>,
    /// Each key's count before this subscription (see [`end_session`]) and last count, with a
    /// count field.
    counts: HashMap<String, (u64, u64)>,
}

async fn probe(
    options: &ProbeOptions,
    mut link: Option<Link>,
    stop: CancellationToken,
    mut on_interval: impl FnMut(&IntervalReport),
) -> (ProbeReport, hdrhistogram::Histogram<u64>) {
    // Which compressed batches this connection inflates: every COMPRESSED_SAMPLE_EVERY-th,
    // starting at a different one on each connection, so that together they sample every
    // batch of the run alike (the first batches, slower, are not over-represented).
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let sampled =
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % COMPRESSED_SAMPLE_EVERY;
    let request = |from: Option<&str>| {
        let mut request = b"{\"op\":\"subscribe\",\"topic\":".to_vec();
        crate::json::write_str(&mut request, &options.topic);
        request.extend_from_slice(b",\"mode\":\"");
        request.extend_from_slice(options.mode.name().as_bytes());
        request.push(b'"');
        if let Some(from) = from {
            request.extend_from_slice(b",\"from\":");
            crate::json::write_str(&mut request, from);
        }
        request.push(b'}');
        request
    };
    // The topic position to resume from (mode `all`), and a lost subscription whose books
    // stay open until the next one says whether it resumed (with whether the server shut down).
    let mut pos: Option<String> = None;
    let mut unsettled: Option<bool> = None;
    let started = Instant::now();
    let mut latency = crate::shard::latency_histogram();
    let mut window = crate::shard::latency_histogram();
    let mut window_items = 0;
    let mut report = ProbeReport::default();
    let mut session = Session::default();
    let mut previous = HashMap::new();
    let mut first: Option<Instant> = None;
    let mut backoff = Backoff::default();
    let mut retry_at = Instant::now();
    let mut connections = 0u64;
    let mut subscribed = false;
    let every = options.interval.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at((Instant::now() + every).into(), every);
    // Made once, not per batch: with a thousand connections, a timer and a cancellation waiter
    // registered and dropped for every batch cost the probe several per cent of its CPU.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    // Until the first item, wait at most a minute for the feed to start.
    let over = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(over);
    loop {
        if link.is_none() && Instant::now() >= retry_at {
            let opened = tokio::select! {
                opened = options.open() => opened,
                _ = &mut cancelled => break,
            };
            match opened {
                Ok(l) => link = Some(l),
                Err(e) => {
                    report.connect_failures += 1;
                    if !options.reconnect {
                        report.error = Some(e.to_string());
                        break;
                    }
                    retry_at = Instant::now() + backoff.next_delay();
                }
            }
        }
        if let Some(l) = &link {
            if !subscribed {
                connections += 1;
                let from = pos.as_deref().filter(|_| options.mode == Mode::All);
                let frame = Frame::text(Payload::Owned(request(from)));
                // If the writer is gone, the reader says why next.
                let _ = l.outgoing.send(frame).await;
                subscribed = true;
            }
        }
        let next = async {
            match &mut link {
                Some(l) => l.incoming.next().await,
                None => {
                    tokio::time::sleep_until(retry_at.into()).await;
                    Ok(Received {
                        payload: Vec::new(),
                        compressed: false,
                    })
                }
            }
        };
        let payload = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            _ = &mut over => break,
            _ = ticker.tick(), if options.interval.is_some() => {
                let mut one = IntervalReport {
                    t: started.elapsed().as_secs_f64(),
                    items: window_items,
                    connected: link.is_some(),
                    ..IntervalReport::default()
                };
                if !window.is_empty() {
                    one.p50_us = window.value_at_quantile(0.5);
                    one.p99_us = window.value_at_quantile(0.99);
                    one.max_us = window.max();
                }
                on_interval(&one);
                window.reset();
                window_items = 0;
                continue;
            }
            next = next => next,
        };
        let received: Received = match payload {
            Ok(received) if link.is_none() => {
                debug_assert!(received.payload.is_empty());
                continue;
            }
            Ok(received) => received,
            Err(lost) => {
                report.lost += 1;
                // A second loss before the first was settled: that one did not resume.
                if let Some(shutdown) = unsettled.take() {
                    settle(&mut report, &mut session, &mut previous, shutdown);
                }
                unsettled = Some(matches!(lost, crate::link::Lost::Closed(1001)));
                link = None;
                subscribed = false;
                if !options.reconnect {
                    report.error = Some(lost.to_string());
                    break;
                }
                backoff.reset();
                retry_at = Instant::now() + backoff.next_delay();
                continue;
            }
        };
        let now = now_us();
        report.wire_bytes += received.payload.len() as u64;
        report.compressed += u64::from(received.compressed);
        // Without a count field, a batch is read without decoding its items: its head, and the
        // first item's send stamp (the oldest item of the batch, so the sample errs late). A
        // compressed batch is inflated only as far as that, and only one in
        // COMPRESSED_SAMPLE_EVERY: the others are counted from their head alone, which eddy
        // sends uncompressed (in a stored block), so they are not inflated at all.
        let mut payload = received.payload;
        let prefix;
        let head = match (options.count_field.is_none(), received.compressed) {
            (false, _) => None,
            (true, false) => Some(&payload[..]),
            (true, true) => {
                let sample = report.compressed % COMPRESSED_SAMPLE_EVERY == sampled;
                let stored = deflate::leading_stored(&payload).filter(|_| !sample);
                prefix = match stored {
                    Some(head) => Some(Cow::Borrowed(head)),
                    None => head_of_compressed(&payload).map(Cow::Owned),
                };
                prefix.as_deref()
            }
        };
        if let Some(head) = head {
            if let Some(batch) = scan_batch(head) {
                report.items += batch.n;
                window_items += batch.n;
                if first.is_none() {
                    first = Some(Instant::now());
                    over.as_mut()
                        .reset((Instant::now() + options.duration).into());
                }
                batch_head(&mut report, &mut session, &mut pos, batch.seq, batch.pos);
                if let Some(sent) = batch.first_sent_us {
                    report.timed += 1;
                    let us = (now - sent).max(0) as u64;
                    latency.saturating_record(us);
                    window.saturating_record(us);
                }
                continue;
            }
        }
        if received.compressed {
            match deflate::inflate(&payload, MAX_INFLATED) {
                Ok(whole) => payload = whole,
                Err(_) => continue,
            }
        }
        let Ok(msg) = simd_json::to_borrowed_value(&mut payload) else {
            continue;
        };
        use simd_json::prelude::*;
        match msg.get_str("type") {
            Some("subscribed") => {
                let resumed = msg.get("replayed").is_some();
                if let Some(shutdown) = unsettled.take() {
                    if resumed {
                        // The same stream goes on: only seq starts again.
                        report.resumed += 1;
                        session.next_seq = None;
                    } else {
                        settle(&mut report, &mut session, &mut previous, shutdown);
                    }
                }
                if !resumed {
                    pos = msg.get_str("pos").map(str::to_owned);
                }
            }
            Some("gone") => {
                report.gone += 1;
                if report.gone_reasons.len() < 5 {
                    let reason = msg.get_str("reason").unwrap_or("gone");
                    let from = msg.get_str("from").unwrap_or("");
                    let pos = msg.get_str("pos").unwrap_or("");
                    report
                        .gone_reasons
                        .push(format!("{reason} (from {from}, topic at {pos})"));
                }
            }
            Some("batch") => {
                if first.is_none() {
                    first = Some(Instant::now());
                    over.as_mut()
                        .reset((Instant::now() + options.duration).into());
                }
                let seq = msg.get_u64("seq");
                batch_head(&mut report, &mut session, &mut pos, seq, msg.get_str("pos"));
                for item in msg
                    .get_array("items")
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                {
                    report.items += 1;
                    window_items += 1;
                    let value = item.get("value");
                    if let Some(sent) = value.and_then(|v| v.get_i64("sent_us")) {
                        report.timed += 1;
                        let us = (now - sent).max(0) as u64;
                        latency.saturating_record(us);
                        window.saturating_record(us);
                    }
                    let Some(field) = &options.count_field else {
                        continue;
                    };
                    let Some(count) = value.and_then(|v| v.get_u64(field.as_str())) else {
                        continue;
                    };
                    let key = item.get("key").map(|k| k.encode()).unwrap_or_default();
                    let (_, last) = session.counts.entry(key).or_insert_with_key(|key| {
                        // After a connection lost without a shutdown (silence, a broken
                        // socket), a count above the key's last one goes on from it (the same
                        // server); otherwise the server started afresh.
                        let before = previous.get(key).copied().filter(|&p| count > p);
                        (before.unwrap_or(0), 0)
                    });
                    if *last > 0 {
                        if count <= *last {
                            report.count_duplicates += 1;
                            continue;
                        }
                        if count > *last + 1 && options.mode == Mode::All {
                            report.count_gaps += count - *last - 1;
                        }
                    }
                    *last = count;
                }
            }
            Some("dropped") => report.dropped += msg.get_u64("items").unwrap_or(0),
            Some("error") => {
                let error = msg.get_str("error").unwrap_or("error");
                report.error = Some(format!("the server said: {error}"));
                break;
            }
            _ => {}
        }
    }
    if let Some(shutdown) = unsettled.take() {
        settle(&mut report, &mut session, &mut previous, shutdown);
    }
    end_session(&mut report, &mut session, &mut previous);
    if report.error.is_none() && connections == 0 {
        report.error = Some(format!("never connected to {}", options.url));
    }
    report.reconnects = connections.saturating_sub(1);
    report.seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    report.items_per_second = if report.seconds > 0.0 {
        report.items as f64 / report.seconds
    } else {
        0.0
    };
    if !latency.is_empty() {
        report.p50_us = latency.value_at_quantile(0.5);
        report.p90_us = latency.value_at_quantile(0.9);
        report.p99_us = latency.value_at_quantile(0.99);
        report.p999_us = latency.value_at_quantile(0.999);
        report.max_us = latency.max();
    }
    (report, latency)
}

/// Counts a batch and checks its `seq`; keeps its position to resume from.
fn batch_head(
    report: &mut ProbeReport,
    session: &mut Session,
    pos: &mut Option<String>,
    seq: Option<u64>,
    batch_pos: Option<&str>,
) {
    if let Some(p) = batch_pos {
        *pos = Some(p.to_owned());
    }
    report.batches += 1;
    if let Some(seq) = seq {
        match session.next_seq {
            Some(n) if seq > n => report.seq_gaps += seq - n,
            Some(n) if seq < n => report.seq_duplicates += 1,
            _ => {}
        }
        session.next_seq = Some(seq + 1);
    }
}

/// One compressed batch in this many is inflated for its first item's send stamp. Inflating
/// even a few hundred bytes costs building the block's Huffman tables, which on 1,000
/// subscribers made the probe, not the server, the bottleneck.
const COMPRESSED_SAMPLE_EVERY: u64 = 8;

/// Bytes of a compressed batch the sampling probe inflates: its head and first item.
const HEAD_BYTES: usize = 1024;

/// Largest message the probe inflates whole.
const MAX_INFLATED: usize = 256 << 20;

/// The first [`HEAD_BYTES`] of a compressed message, cut after its last `,` or `}` when it was
/// cut short, so that no number or string in it is read cut (a `sent_us` missing its last
/// digits would read as a time long ago).
fn head_of_compressed(payload: &[u8]) -> Option<Vec<u8>> {
    let mut head = deflate::inflate_prefix(payload, HEAD_BYTES).ok()?;
    if head.len() == HEAD_BYTES {
        let end = memchr::memrchr2(b',', b'}', &head).map_or(0, |i| i + 1);
        head.truncate(end);
    }
    Some(head)
}

/// A batch frame read without decoding its items.
#[derive(Debug, PartialEq)]
struct ScannedBatch<'a> {
    seq: Option<u64>,
    n: u64,
    pos: Option<&'a str>,
    /// The first item's `sent_us`.
    first_sent_us: Option<i64>,
}

/// Reads a batch frame's head (`type`, `seq`, `n`, `pos`: every member before `items`) and the
/// first `sent_us` after it, without decoding the items. `None` for any other frame, or a batch
/// without `n`: those are decoded in full.
fn scan_batch(frame: &[u8]) -> Option<ScannedBatch<'_>> {
    let items = memchr::memmem::find(frame, b"\"items\"")?;
    let head = &frame[..items];
    if !member(head, b"\"type\"")?.starts_with(b"\"batch\"") {
        return None;
    }
    let number = |v: &[u8]| -> Option<i64> {
        let end = v
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'-'))
            .unwrap_or(v.len());
        std::str::from_utf8(&v[..end]).ok()?.parse().ok()
    };
    let n = u64::try_from(number(member(head, b"\"n\"")?)?).ok()?;
    let seq = member(head, b"\"seq\"").and_then(number).map(|s| s as u64);
    let pos = member(head, b"\"pos\"").and_then(|v| {
        let v = v.strip_prefix(b"\"")?;
        std::str::from_utf8(&v[..memchr::memchr(b'"', v)?]).ok()
    });
    let first_sent_us = member(&frame[items..], b"\"sent_us\"").and_then(number);
    Some(ScannedBatch {
        seq,
        n,
        pos,
        first_sent_us,
    })
}

/// A member's value, from the first `name` (quoted) in `within` followed by optional spaces and a
/// colon (a string equal to the name is followed by `,` or `}` instead).
fn member<'a>(within: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&within[from..], name) {
        from += at + name.len();
        if let Some(rest) = within[from..].trim_ascii_start().strip_prefix(b":") {
            return Some(rest.trim_ascii_start());
        }
    }
    None
}

/// Closes the books of a lost subscription that did not resume.
fn settle(
    report: &mut ProbeReport,
    session: &mut Session,
    previous: &mut HashMap<String, u64>,
    shutdown: bool,
) {
    end_session(report, session, previous);
    if shutdown {
        // The server went away (shut down) and did not resume: the next one starts afresh. A
        // key that had few items would otherwise look as if it went on.
        previous.clear();
    }
}

/// Closes the books of one subscription.
fn end_session(
    report: &mut ProbeReport,
    session: &mut Session,
    previous: &mut HashMap<String, u64>,
) {
    for (key, (before, last)) in session.counts.drain() {
        report.counted += last - before;
        previous.insert(key, last);
    }
    *session = Session::default();
}

/// Prints the report as a few readable lines.
pub fn print(report: &ProbeReport, topic: &str) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "probe {topic}: {} items in {:.1} s ({:.0} items/s), {} batches, {} dropped, {} seq gaps",
        report.items,
        report.seconds,
        report.items_per_second,
        report.batches,
        report.dropped,
        report.seq_gaps
    );
    if report.lost + report.connect_failures + report.seq_duplicates > 0 {
        println!(
            "{} connections lost, {} reconnects ({} resumed, {} positions gone), {} failed connects, {} repeated seqs",
            report.lost,
            report.reconnects,
            report.resumed,
            report.gone,
            report.connect_failures,
            report.seq_duplicates
        );
    }
    if report.counted > 0 || report.count_gaps + report.count_duplicates > 0 {
        println!(
            "counts: {} counted (last count per key and connection, summed), {} gaps, {} repeats",
            report.counted, report.count_gaps, report.count_duplicates
        );
    }
    if report.timed > 0 {
        println!(
            "latency (send → receive, {} timed items: the first of each batch, of one compressed batch in eight, or every item when a count field is checked): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms",
            report.timed,
            ms(report.p50_us),
            ms(report.p90_us),
            ms(report.p99_us),
            ms(report.p999_us),
            ms(report.max_us)
        );
    } else {
        println!("no item carried sent_us: is the topic's query passing it through, and is `eddy feed` the producer?");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_head_is_read_without_decoding_its_items() {
        let frame = br#"{"type":"batch","topic":"vwap","seq":7,"n":2,"pos":"12:5,9","items":[{"key":"A","value":{"sent_us":1700000000000123,"n":5}},{"key":"B","value":{"sent_us":1700000000000999}}]}"#;
        assert_eq!(
            scan_batch(frame),
            Some(ScannedBatch {
                seq: Some(7),
                n: 2,
                pos: Some("12:5,9"),
                first_sent_us: Some(1_700_000_000_000_123),
            })
        );
    }

    #[test]
    fn spaces_other_members_and_topic_names_do_not_confuse_the_scan() {
        // Python's json.dumps puts spaces after colons and commas; a topic may be called "n".
        let frame = br#"{"type": "batch", "topic": "n", "seq": 0, "n": 3, "items": [{"key": 1, "value": {"x": 1}}, {"key": 2, "value": {"sent_us": 42}}]}"#;
        let head = scan_batch(frame).unwrap();
        assert_eq!((head.seq, head.n, head.pos), (Some(0), 3, None));
        // The first item carries no stamp: the first one that does is taken.
        assert_eq!(head.first_sent_us, Some(42));
        let no_stamp =
            br#"{"type":"batch","topic":"t","seq":1,"n":1,"items":[{"key":1,"value":2}]}"#;
        assert_eq!(scan_batch(no_stamp).unwrap().first_sent_us, None);
    }

    #[test]
    fn other_frames_and_batches_without_n_are_left_to_the_full_decode() {
        assert_eq!(
            scan_batch(br#"{"type":"snapshot","topic":"t","items":[]}"#),
            None
        );
        assert_eq!(scan_batch(br#"{"type":"subscribed","topic":"t"}"#), None);
        assert_eq!(
            scan_batch(br#"{"type":"batch","topic":"t","seq":1,"items":[{"key":1,"value":2}]}"#),
            None
        );
        assert_eq!(scan_batch(b"not json"), None);
    }
}
