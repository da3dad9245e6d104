#![no_main]
use libfuzzer_sys::fuzz_target;
use ringcast::protocol::http::{parse_request, HttpLimits};

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data, &HttpLimits::default());
});
