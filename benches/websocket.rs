//! The server over loopback WebSockets: a producer sends frames of trades with `ack=true`, the
//! shards run `vwap.rhai`, a subscriber receives the batches. An iteration sends its frames and
//! ends when the subscriber has every item. Each event carries its send time, so besides
//! criterion's throughput the bench prints the per-event latency from send to receive as
//! HdrHistogram percentiles (p50/p99/p999), for 1 and for 100 events per frame. Those are
//! latencies at saturation (the producer sends as fast as acks allow); after them the bench
//! prints latency at fixed, unsaturated rates (1,000 events/s in frames of 1, 10,000 in frames
//! of 10, 100,000 in frames of 100), paced by the producer, which is what a live feed sees.

mod common;
#[path = "common/server.rs"]
mod server_setup;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eddy::feed::now_us;
use eddy::synth::{Feed, Scenario};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 2000;

fn websocket(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (server, _queries) = server_setup::vwap(&rt);
    let addr = server.addr;
    let mut group = c.benchmark_group("websocket");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for per_frame in [1usize, 100] {
        let mut latency = eddy::shard::latency_histogram();
        let (mut producer, mut subscriber) = rt.block_on(connect(addr));
        let mut feed = Feed::new(Scenario::Trades, 5, 0);
        group.bench_function(BenchmarkId::new("vwap_events_per_frame", per_frame), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let (mut tx, mut rx) = (&mut producer).split();
                        let send = async {
                            for _ in 0..EVENTS / per_frame {
                                let buf = frame(&mut feed, per_frame);
                                tx.send(Message::Binary(buf.into())).await.unwrap();
                            }
                        };
                        let acks = async {
                            for _ in 0..EVENTS / per_frame {
                                rx.next().await.unwrap().unwrap();
                            }
                        };
                        let receive = receive(&mut subscriber, EVENTS, &mut latency);
                        tokio::join!(send, acks, receive);
                    }
                    start.elapsed()
                })
            })
        });
        println!(
            "websocket/vwap_events_per_frame/{per_frame}: latency send→receive over {} events: p50 {} µs  p99 {} µs  p999 {} µs  max {} µs",
            latency.len(),
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.value_at_quantile(0.999),
            latency.max()
        );
    }
    group.finish();
    let seconds = if std::env::var_os("EDDY_BENCH_QUICK").is_some() {
        1
    } else {
        3
    };
    for (rate, per_frame) in [(1_000, 1), (10_000, 10), (100_000, 100)] {
        paced(&rt, addr, rate, per_frame, Duration::from_secs(seconds));
    }
    rt.block_on(server.shutdown());
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A producer (with acks) and a subscriber to `vwap`.
async fn connect(addr: std::net::SocketAddr) -> (Ws, Ws) {
    let (producer, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ingest?stream=trades&ack=true"))
            .await
            .unwrap();
    let (mut sub, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/subscribe"))
        .await
        .unwrap();
    sub.send(Message::Text(r#"{"op":"subscribe","topic":"vwap"}"#.into()))
        .await
        .unwrap();
    sub.next().await.unwrap().unwrap();
    (producer, sub)
}

/// A frame of `per_frame` trades (NDJSON), each stamped with the send time.
fn frame(feed: &mut Feed, per_frame: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(per_frame * 128);
    let sent = now_us();
    for i in 0..per_frame {
        if i > 0 {
            buf.push(b'\n');
        }
        feed.write_event_stamped(sent / 1000, sent, &mut buf);
    }
    buf
}

/// Receives `events` items, recording each one's send → receive latency.
async fn receive(subscriber: &mut Ws, events: usize, latency: &mut hdrhistogram::Histogram<u64>) {
    let mut got = 0;
    while got < events {
        let msg = subscriber.next().await.unwrap().unwrap();
        let now = now_us();
        let mut bytes = msg.into_data().to_vec();
        let v = simd_json::to_owned_value(&mut bytes).unwrap();
        use simd_json::prelude::*;
        for item in v.get_array("items").unwrap() {
            let sent = item
                .get("value")
                .and_then(|v| v.get_i64("sent_us"))
                .unwrap();
            latency.saturating_record((now - sent).max(0) as u64);
            got += 1;
        }
    }
}

/// Latency at a fixed rate: a frame of `per_frame` events every `per_frame / rate` seconds for
/// `duration` (the producer paces itself; it never waits for an ack before the next frame).
fn paced(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    rate: u64,
    per_frame: usize,
    duration: Duration,
) {
    let frames = (rate as f64 * duration.as_secs_f64()) as usize / per_frame;
    let mut latency = eddy::shard::latency_histogram();
    rt.block_on(async {
        let (mut producer, mut subscriber) = connect(addr).await;
        let mut feed = Feed::new(Scenario::Trades, 11, 0);
        let (mut tx, mut rx) = (&mut producer).split();
        let mut ticker =
            tokio::time::interval(Duration::from_secs_f64(per_frame as f64 / rate as f64));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let send = async {
            for _ in 0..frames {
                ticker.tick().await;
                let buf = frame(&mut feed, per_frame);
                tx.send(Message::Binary(buf.into())).await.unwrap();
            }
        };
        let acks = async {
            for _ in 0..frames {
                rx.next().await.unwrap().unwrap();
            }
        };
        let receive = receive(&mut subscriber, frames * per_frame, &mut latency);
        tokio::join!(send, acks, receive);
    });
    println!(
        "websocket/paced/{rate}_events_per_s_{per_frame}_per_frame: latency send→receive over {} events: p50 {} µs  p99 {} µs  p999 {} µs  max {} µs",
        latency.len(),
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = websocket
}
criterion_main!(benches);
