#![no_main]
use libfuzzer_sys::fuzz_target;
use ringcast::protocol::message::{parse_client, parse_publish};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_client(text, ringcast::protocol::message::Bounds::default());
    }
    let _ = parse_publish(data, ringcast::protocol::message::Bounds::default());
});
