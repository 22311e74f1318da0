//! The pipeline without sockets: frame bytes in, encoded batches out. Frames of 100 trades go
//! through `ingest` (parse, route, queue for the shards), the shards run `vwap.rhai`, the hub
//! encodes one batch per topic and puts it in a subscriber's mailbox; an iteration ends when every
//! item of its frames is in the mailbox. Throughput is events per second over all shards (the
//! machine's cores); divide by the shard count for per-core throughput.

mod common;
#[path = "common/server.rs"]
mod server_setup;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eddy::server::hub::{HubControl, Mode, Subscribe};
use eddy::server::mailbox::{Mailbox, Outgoing};
use eddy::synth::{Feed, Scenario};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FRAMES: usize = 20;
const PER_FRAME: usize = 100;

fn frames() -> Vec<Vec<u8>> {
    let mut feed = Feed::new(Scenario::Trades, 3, 0);
    (0..FRAMES)
        .map(|f| {
            let mut buf = Vec::new();
            for i in 0..PER_FRAME {
                if i > 0 {
                    buf.push(b'\n');
                }
                feed.write_event(1_700_000_000_000 + (f * PER_FRAME + i) as i64, &mut buf);
            }
            buf
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (server, _queries) = server_setup::vwap(&rt);
    let shards = server.state.pipeline.shards();
    let state = Arc::clone(&server.state);
    let mailbox = Arc::new(Mailbox::new(usize::MAX, Duration::from_secs(3600)));
    state.hub.control(HubControl::Subscribe(Subscribe {
        subscriber: 0,
        mailbox: Arc::clone(&mailbox),
        topic: "vwap".into(),
        keys: None,
        mode: Mode::All,
        snapshot: false,
        from: None,
    }));
    let input = frames();
    let counters = state.metrics.stream("trades");
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements((FRAMES * PER_FRAME) as u64));
    group.bench_function(format!("vwap_{shards}_shards_100_per_frame"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut source = eddy::server::ingest::Source::new(&state);
                let start = Instant::now();
                for _ in 0..iters {
                    for frame in &input {
                        eddy::server::ingest::ingest(
                            &state,
                            &mut source,
                            frame.clone(),
                            Some("trades"),
                            &counters,
                            None,
                        )
                        .await;
                    }
                    let mut got = 0;
                    while got < FRAMES * PER_FRAME {
                        mailbox.notify.notified().await;
                        for out in mailbox.take().queue {
                            if let Outgoing::Batch { count, .. } = out {
                                got += count as usize;
                            }
                        }
                    }
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    rt.block_on(server.shutdown());
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = pipeline
}
criterion_main!(benches);
