#![no_main]
//! A short simulation of the shard states whose every decision (shards,
//! clients, what they send, message order, faults, time) comes from the
//! input; any violated invariant or panic is a crash.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(failure) = ringcast::shard::sim::run_fuzz(data) {
        panic!("{failure}");
    }
});
