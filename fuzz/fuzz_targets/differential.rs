//! Random queries over the compiled subset and random events, run by the compiler and by the
//! interpreter, which must write the same bytes; see `harness::differential_one`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::differential_one(data));
