#![no_main]
//! One client's arbitrary bytes through the shard state's HTTP handling
//! (every route, percent-encodings, bodies, upgrades) on two shards; a
//! panic, a broken invariant or anything held after the connection is gone
//! is a crash.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(failure) = ringcast::shard::sim::run_request(data) {
        panic!("{failure}");
    }
});
