//! Arbitrary bytes through the event parser; see `harness::parse_one`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::parse_one(data));
