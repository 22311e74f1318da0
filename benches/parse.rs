//! Parsing cost per event: eddy's parser (simd-json into a tape, events as handles) against
//! serde_json into a `Value`, for the three input formats: one object, an array of 100 objects,
//! and 100 NDJSON lines. Setup (making the inputs) is outside the timed loop; each iteration
//! copies the input, because parsing in place consumes it, and the copy is timed for both
//! parsers alike.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use eddy::synth::{Feed, Scenario};
use eddy::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn events(n: usize) -> Vec<Vec<u8>> {
    let mut feed = Feed::new(Scenario::Trades, 1, 0);
    (0..n)
        .map(|i| {
            let mut out = Vec::new();
            feed.write_event(1_700_000_000_000 + i as i64, &mut out);
            out
        })
        .collect()
}

fn inputs() -> Vec<(&'static str, usize, Vec<u8>)> {
    let one = events(1).remove(0);
    let many = events(100);
    let array = [b"[".to_vec(), many.join(&b","[..]), b"]".to_vec()].concat();
    let ndjson = many.join(&b"\n"[..]);
    vec![
        ("object", 1, one),
        ("array100", 100, array),
        ("ndjson100", 100, ndjson),
    ]
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, n, input) in inputs() {
        group.throughput(Throughput::Elements(n as u64));
        let mut parser = Parser::default();
        group.bench_with_input(
            BenchmarkId::new("eddy_simd_tape", name),
            &input,
            |b, input| {
                b.iter(|| {
                    let parsed = parser.parse(input.clone());
                    assert_eq!(parsed.frame.len(), n);
                    parsed
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", name),
            &input,
            |b, input| {
                b.iter(|| {
                    let copy = input.clone();
                    let values: Vec<serde_json::Value> = if name == "ndjson100" {
                        copy.split(|&b| b == b'\n')
                            .map(|l| serde_json::from_slice(l).unwrap())
                            .collect()
                    } else {
                        match serde_json::from_slice(&copy).unwrap() {
                            serde_json::Value::Array(items) => items,
                            one => vec![one],
                        }
                    };
                    assert_eq!(values.len(), n);
                    values
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("simd_json_owned", name),
            &input,
            |b, input| {
                b.iter(|| {
                    let mut copy = input.clone();
                    let values: Vec<simd_json::OwnedValue> = if name == "ndjson100" {
                        copy.split_mut(|&b| b == b'\n')
                            .map(|l| simd_json::to_owned_value(l).unwrap())
                            .collect()
                    } else {
                        match simd_json::to_owned_value(&mut copy).unwrap() {
                            simd_json::OwnedValue::Array(items) => *items,
                            one => vec![one],
                        }
                    };
                    assert_eq!(values.len(), n);
                    values
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = parse
}
criterion_main!(benches);
