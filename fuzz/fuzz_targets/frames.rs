//! Arbitrary client bytes through the WebSocket handshake and frame reader of both endpoints,
//! in-process; see `harness::frames_one`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::frames_one(data));
