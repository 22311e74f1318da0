//! `eddy probe`: a subscriber that measures end-to-end latency.
//!
//! It subscribes to a topic (mode `all`) and, for every item whose value carries `sent_us` (the
//! send time `eddy feed` stamps into each event, passed through by the query), records
//! `now - sent_us` in an HdrHistogram. It also checks that each topic's `seq` has no gaps and
//! adds up `dropped` notices. Producer and probe must share a clock: run both on one machine.

use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use serde::Serialize;

use crate::feed::{connect, now_us, ClientError};

/// What the probe saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeReport {
    pub items: u64,
    pub batches: u64,
    /// Items that carried `sent_us`.
    pub timed: u64,
    pub dropped: u64,
    pub seq_gaps: u64,
    pub seconds: f64,
    pub items_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
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
    /// Latency over every timed item of every subscriber.
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Opens `subscribers` connections to `topic` and probes them all.
pub async fn fan_out(
    url: &str,
    topic: &str,
    duration: Duration,
    subscribers: usize,
) -> Result<FanOutReport, ClientError> {
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let (url, topic) = (url.to_owned(), topic.to_owned());
        let ws = connect(&url, "/subscribe").await?;
        tasks.push(tokio::spawn(
            async move { probe(ws, &topic, duration).await },
        ));
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
    let ws = connect(url, "/subscribe").await?;
    Ok(probe(ws, topic, duration).await.0)
}

async fn probe(
    mut ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    topic: &str,
    duration: Duration,
) -> (ProbeReport, hdrhistogram::Histogram<u64>) {
    let mut request = b"{\"op\":\"subscribe\",\"topic\":".to_vec();
    crate::json::write_str(&mut request, topic);
    request.push(b'}');
    let _ = ws.write_frame(Frame::text(Payload::Owned(request))).await;
    let mut latency = crate::shard::latency_histogram();
    let mut report = ProbeReport::default();
    let mut next_seq: Option<u64> = None;
    let mut first: Option<Instant> = None;
    // Until the first item, wait at most a minute for the feed to start.
    let mut deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = match tokio::time::timeout(left, ws.read_frame()).await {
            Ok(Ok(frame)) => frame,
            _ => break,
        };
        if frame.opcode == OpCode::Close {
            break;
        }
        if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
            continue;
        }
        let now = now_us();
        let mut payload = frame.payload.to_vec();
        let Ok(msg) = simd_json::to_borrowed_value(&mut payload) else {
            continue;
        };
        use simd_json::prelude::*;
        match msg.get_str("type") {
            Some("batch") => {
                if first.is_none() {
                    first = Some(Instant::now());
                    deadline = Instant::now() + duration;
                }
                report.batches += 1;
                if let Some(seq) = msg.get_u64("seq") {
                    if next_seq.is_some_and(|n| n != seq) {
                        report.seq_gaps += 1;
                    }
                    next_seq = Some(seq + 1);
                }
                for item in msg
                    .get_array("items")
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                {
                    report.items += 1;
                    let sent = item.get("value").and_then(|v| v.get_i64("sent_us"));
                    if let Some(sent) = sent {
                        report.timed += 1;
                        latency.saturating_record((now - sent).max(0) as u64);
                    }
                }
            }
            Some("dropped") => report.dropped += msg.get_u64("items").unwrap_or(0),
            Some("error") => {
                tracing::warn!("probe: {}", msg.get_str("error").unwrap_or("error"));
                break;
            }
            _ => {}
        }
    }
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
    if report.timed > 0 {
        println!(
            "latency (send → receive, {} timed items): p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms",
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
