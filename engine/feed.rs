//! `eddy feed`: a load generator for eddy (and for anything that speaks its ingest protocol).
//!
//! Each connection sends frames of `batch` synthetic events (the seeded generators of
//! [`crate::synth`]) to `/ingest?stream=S&ack=true`, paced to its share of the asked rate, or as
//! fast as acks allow with at most [`WINDOW`] frames in flight. Every event carries `sent_us`,
//! the wall-clock time (epoch µs) its frame was sent, so a subscriber (`eddy probe`) can measure
//! the latency from producer to subscriber. The report counts events and frames sent, and the
//! accepted and rejected totals from the acks. Events that may repeat are rendered ahead, a few
//! thousand per connection, and sent in turn with their frame's times
//! ([`crate::synth::Rendered`]): the feed then takes little of the CPU it shares with the server
//! it measures.
//!
//! A connection runs over a [`Link`], so a server that closes, dies or falls silent is noticed
//! within the link's timeout: the connection stops, counts the events it sent that were never
//! acknowledged (`unacked`: the server may or may not have handled them), and either ends the
//! feed with the reason in the report or, with `reconnect`, connects again after a [`Backoff`]
//! and goes on with the next events of its generator (nothing is resent). Acks are checked
//! against the frame numbers sent: a skipped number is a gap, a repeated one a duplicate.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastwebsockets::{Frame, Payload};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use crate::link::{connect, host_of, ClientError};
use crate::link::{Backoff, Link, Lost};
use crate::synth::{Feed, Rendered, Scenario};

/// Frames a connection may have sent without an ack.
pub const WINDOW: usize = 64;

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
    /// Connect again (with backoff) when a connection is lost or refused, until `duration`.
    pub reconnect: bool,
    /// How long the server may stay silent (no ack, no pong) before the connection is given up;
    /// also the limit on connecting.
    pub timeout: Duration,
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
    /// Events sent on a connection that was lost before their ack: the server may or may not
    /// have handled them.
    pub unacked: u64,
    /// Connections lost (closed, broken or silent server).
    pub lost: u64,
    /// Connections made after the first one of each connection slot.
    pub reconnects: u64,
    /// Attempts to connect that failed.
    pub connect_failures: u64,
    /// Acks whose frame number skipped ahead of the next one expected (counted in frames).
    pub ack_gaps: u64,
    /// Acks for a frame number already acknowledged.
    pub ack_duplicates: u64,
    /// Why the feed stopped early (without `reconnect`), or never connected.
    pub error: Option<String>,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    frames: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    unacked: AtomicU64,
    lost: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    ack_gaps: AtomicU64,
    ack_duplicates: AtomicU64,
    /// The first reason a connection slot gave up.
    error: Mutex<Option<String>>,
}

/// Runs the feed; prints progress to stderr once a second when `progress` is set.
pub async fn run(options: FeedOptions, progress: bool) -> Result<FeedReport, ClientError> {
    run_until(options, progress, CancellationToken::new()).await
}

/// As [`run`], ending early (with the report of what was done) when `stop` is cancelled.
pub async fn run_until(
    options: FeedOptions,
    progress: bool,
    stop: CancellationToken,
) -> Result<FeedReport, ClientError> {
    host_of(&options.url)?;
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.connections.max(1) {
        let options = options.clone();
        let counters = Arc::clone(&counters);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(why) = slot(&options, c as u64, &counters, start, &stop).await {
                counters.error.lock().unwrap().get_or_insert(why);
            }
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
    let c = &counters;
    let events = c.events.load(Ordering::Relaxed);
    let frames = c.frames.load(Ordering::Relaxed);
    let error = c.error.lock().unwrap().clone();
    Ok(FeedReport {
        events,
        frames,
        accepted: c.accepted.load(Ordering::Relaxed),
        rejected: c.rejected.load(Ordering::Relaxed),
        seconds,
        events_per_second: events as f64 / seconds,
        frames_per_second: frames as f64 / seconds,
        unacked: c.unacked.load(Ordering::Relaxed),
        lost: c.lost.load(Ordering::Relaxed),
        reconnects: c.reconnects.load(Ordering::Relaxed),
        connect_failures: c.connect_failures.load(Ordering::Relaxed),
        ack_gaps: c.ack_gaps.load(Ordering::Relaxed),
        ack_duplicates: c.ack_duplicates.load(Ordering::Relaxed),
        error,
    })
}

/// One connection slot: connects, sends until the duration is over, and with `reconnect`
/// connects again after a lost or refused connection. `Err` says why it gave up.
async fn slot(
    options: &FeedOptions,
    index: u64,
    counters: &Counters,
    start: Instant,
    stop: &CancellationToken,
) -> Result<(), String> {
    let path = format!("/ingest?stream={}&ack=true", options.scenario.stream());
    let mut feed = Events::new(Feed::new(
        options.scenario,
        options.seed.wrapping_add(index),
        options.keys,
    ));
    let mut backoff = Backoff::default();
    let mut connected = false;
    let end = start + options.duration;
    while Instant::now() < end && !stop.is_cancelled() {
        let link = tokio::select! {
            link = Link::open(&options.url, &path, options.timeout) => link,
            _ = stop.cancelled() => break,
        };
        let link = match link {
            Ok(link) => link,
            Err(e) => {
                counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                if !options.reconnect {
                    return Err(e.to_string());
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep_until(end.min(Instant::now() + delay).into()) => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            }
        };
        if connected {
            counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected = true;
        backoff.reset();
        match session(link, &mut feed, options, counters, end, stop).await {
            Ok(()) => return Ok(()),
            Err(lost) => {
                counters.lost.fetch_add(1, Ordering::Relaxed);
                if !options.reconnect {
                    return Err(lost.to_string());
                }
            }
        }
    }
    if connected {
        Ok(())
    } else {
        Err(format!("never connected to {}", options.url))
    }
}

/// Events a connection rendered ahead and sends in turn ([`Rendered`], repeating after
/// [`RENDERED`]), or makes one by one when its scenario's must not repeat.
enum Events {
    Rendered(Rendered),
    Live(Feed),
}

/// Events rendered ahead per connection: about 400 KB of trades.
const RENDERED: usize = 4096;

impl Events {
    fn new(mut feed: Feed) -> Events {
        match feed.render(RENDERED) {
            Some(rendered) => Events::Rendered(rendered),
            None => Events::Live(feed),
        }
    }

    /// Appends a frame of `batch` events, NDJSON, each with event time `stamp_us / 1000` (ms)
    /// and `sent_us` = `stamp_us`.
    fn frame(&mut self, batch: usize, stamp_us: i64, buf: &mut Vec<u8>) {
        let times = Rendered::times(stamp_us / 1000, Some(stamp_us));
        for i in 0..batch {
            if i > 0 {
                buf.push(b'\n');
            }
            match self {
                Events::Rendered(rendered) => rendered.write_body(buf),
                Events::Live(feed) => feed.write_body(buf),
            }
            buf.extend_from_slice(&times);
        }
    }
}

/// Sends on one connection until `end` (or `stop`), then waits a bounded time for the last
/// acks. `Err` when the connection was lost first.
async fn session(
    link: Link,
    feed: &mut Events,
    options: &FeedOptions,
    counters: &Counters,
    end: Instant,
    stop: &CancellationToken,
) -> Result<(), Lost> {
    let Link {
        outgoing,
        mut incoming,
    } = link;
    let window = Arc::new(Semaphore::new(WINDOW));
    let reader_window = Arc::clone(&window);
    // The reader owns the acks' tally; it hands back why the connection ended and how many
    // frames were acknowledged.
    let (tally_tx, tally) = tokio::sync::watch::channel(Tally::default());
    let mut reader = tokio::spawn(async move {
        let mut t = Tally::default();
        let lost = loop {
            match incoming.next().await {
                Ok(payload) => {
                    let ack = ack_fields(&payload.payload);
                    if ack.frame > t.next_frame {
                        t.gaps += ack.frame - t.next_frame;
                    } else if ack.frame < t.next_frame {
                        t.duplicates += 1;
                        continue;
                    }
                    t.next_frame = ack.frame + 1;
                    t.acked += 1;
                    t.accepted += ack.accepted;
                    t.rejected += ack.rejected;
                    tally_tx.send_replace(t);
                    reader_window.add_permits(1);
                }
                Err(lost) => break lost,
            }
        };
        // Wake a sender waiting for the window.
        reader_window.close();
        lost
    });

    let per_connection = options
        .rate
        .map(|r| r as f64 / options.connections.max(1) as f64);
    // Pacing starts afresh on each connection, so a reconnection does not burst.
    let session_start = Instant::now();
    let mut sent: u64 = 0;
    let mut lost = None;
    while Instant::now() < end && !stop.is_cancelled() {
        if let Some(rate) = per_connection {
            let due =
                session_start + Duration::from_secs_f64(sent as f64 * options.batch as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due.min(end).into()) => {}
                why = &mut reader => { lost = Some(why); break; }
                _ = stop.cancelled() => break,
            }
            if Instant::now() >= end {
                break;
            }
        }
        let permit = tokio::select! {
            permit = window.acquire() => permit,
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permit else {
            break;
        };
        permit.forget();
        let mut buf = Vec::with_capacity(options.batch * 160);
        feed.frame(options.batch, now_us(), &mut buf);
        if outgoing
            .send(Frame::text(Payload::Owned(buf)))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
        counters.frames.fetch_add(1, Ordering::Relaxed);
        counters
            .events
            .fetch_add(options.batch as u64, Ordering::Relaxed);
    }
    if lost.is_none() {
        // Wait (a bounded time) for the last acks, or for the reader to see the end.
        let all = window.acquire_many(WINDOW as u32);
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(5), all) => {}
            why = &mut reader => lost = Some(why),
        }
    }
    drop(outgoing);
    if lost.is_none() && window.is_closed() {
        lost = Some((&mut reader).await);
    }
    reader.abort();
    let t = *tally.borrow();
    counters.accepted.fetch_add(t.accepted, Ordering::Relaxed);
    counters.rejected.fetch_add(t.rejected, Ordering::Relaxed);
    counters.ack_gaps.fetch_add(t.gaps, Ordering::Relaxed);
    counters
        .ack_duplicates
        .fetch_add(t.duplicates, Ordering::Relaxed);
    let unacked = sent.saturating_sub(t.acked) * options.batch as u64;
    counters.unacked.fetch_add(unacked, Ordering::Relaxed);
    match lost {
        Some(Ok(why)) if unacked > 0 || (Instant::now() < end && !stop.is_cancelled()) => Err(why),
        _ => Ok(()),
    }
}

/// What the acks of one connection said.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    next_frame: u64,
    acked: u64,
    accepted: u64,
    rejected: u64,
    gaps: u64,
    duplicates: u64,
}

/// The fields of an ack the feed reads.
#[derive(Debug, PartialEq)]
struct Ack {
    frame: u64,
    accepted: u64,
    rejected: u64,
}

/// The frame number and counts of an ack, read without a full parse.
fn ack_fields(payload: &[u8]) -> Ack {
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
    Ack {
        frame: field(b"\"frame\""),
        accepted: field(b"\"accepted\""),
        rejected: field(b"\"rejected\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_read() {
        let ack = br#"{"type":"ack","frame":3,"accepted":99,"rejected":1,"errors":[]}"#;
        let want = Ack {
            frame: 3,
            accepted: 99,
            rejected: 1,
        };
        assert_eq!(ack_fields(ack), want);
        let spaced = br#"{"type": "ack", "frame": 12, "accepted": 7, "rejected": 0}"#;
        let want = Ack {
            frame: 12,
            accepted: 7,
            rejected: 0,
        };
        assert_eq!(ack_fields(spaced), want);
    }
}
