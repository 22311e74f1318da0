//! A script and events (split at the first 0xFF byte) compiled and run under the default
//! sandbox limits; see `harness::query_one`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::query_one(data));
