//! The built-in demo feeds of `eddy serve --demo`: the four synthetic scenarios (trades,
//! sensors, social, games) pushed through the same ingest path as a producer's frames, each at
//! `demo_rate` events a second, in frames every 20 ms, stamped with the wall clock. The trades
//! feed also sends as many quotes, on stream `quotes`, at the prices it trades at, so that an
//! as-of join of trades with quotes runs live.

use std::sync::Arc;
use std::time::Duration;

use crate::synth::{Feed, Scenario};

use super::ingest::ingest;
use super::State;
use crate::router::wall_ms as now_ms;

/// The stream of the demo's quotes.
const QUOTES: &str = "quotes";

/// Gap between demo frames.
const TICK: Duration = Duration::from_millis(20);

/// Starts one task per scenario; they stop when shutdown begins.
pub fn start(state: &Arc<State>) {
    for (i, scenario) in Scenario::ALL.into_iter().enumerate() {
        let state = Arc::clone(state);
        tokio::spawn(async move { run(state, scenario, 1000 + i as u64).await });
    }
}

async fn run(state: Arc<State>, scenario: Scenario, seed: u64) {
    let rate = f64::from(state.config.demo_rate);
    // The silent sensor stops after about a minute.
    let mut feed = Feed::new(scenario, seed, 0).silence_after((rate * 100.0) as u64);
    let counters = state.metrics.stream(scenario.stream());
    let quotes = (scenario == Scenario::Trades).then(|| state.metrics.stream(QUOTES));
    let mut source = super::ingest::Source::new(&state);
    let mut shutdown = state.shutdown.subscribe();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let per_tick = rate * TICK.as_secs_f64();
    let mut owed = 0.0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        owed += per_tick;
        let n = owed.floor() as usize;
        owed -= n as f64;
        if n == 0 {
            continue;
        }
        let ts = now_ms();
        let mut frame = Vec::with_capacity(n * 128);
        for _ in 0..n {
            feed.write_event(ts, &mut frame);
            frame.push(b'\n');
        }
        ingest(
            &state,
            &mut source,
            frame,
            Some(scenario.stream()),
            &counters,
            None,
        )
        .await;
        if let Some(quote_counters) = &quotes {
            let mut frame = Vec::with_capacity(n * 96);
            for _ in 0..n {
                feed.write_quote(ts, &mut frame);
                frame.push(b'\n');
            }
            ingest(
                &state,
                &mut source,
                frame,
                Some(QUOTES),
                quote_counters,
                None,
            )
            .await;
        }
    }
}
