//! Criterion benches for the sans-IO protocol core: frame encode and decode,
//! client JSON parsing and HTTP request parsing, all in memory.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringcast::protocol::frame::{apply_mask, FrameDecoder, FrameLimits};
use ringcast::protocol::http::{parse_request, HttpLimits};
use ringcast::protocol::message::{parse_client, push};

/// Short runs keep `cargo bench` usable in CI; 3 s gives stable medians here.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);

/// Typical event size in the load test.
const PAYLOAD_BYTES: usize = 200;

/// Longest topic accepted by the default config.
const MAX_TOPIC_BYTES: usize = 256;

fn payload_json() -> String {
    format!("{{\"text\":\"{}\"}}", "x".repeat(PAYLOAD_BYTES - 11))
}

fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&mask);
    let start = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[start..], mask);
    frame
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.measurement_time(MEASUREMENT_TIME);
    let payload = payload_json();
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("encode_push_200b", |b| {
        b.iter(|| push(black_box("room:1"), black_box("say"), black_box(&payload)))
    });
    let frame = masked_text_frame(payload.as_bytes());
    group.bench_function("decode_masked_text_200b", |b| {
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        b.iter(|| decoder.decode(black_box(&frame)))
    });
    group.finish();
}

fn client_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_json");
    group.measurement_time(MEASUREMENT_TIME);
    group.throughput(Throughput::Elements(1));
    let subscribe = r#"{"type":"subscribe","topic":"orders:new"}"#;
    group.bench_function("subscribe", |b| {
        b.iter(|| parse_client(black_box(subscribe), MAX_TOPIC_BYTES).is_ok())
    });
    let message = format!(
        r#"{{"type":"message","topic":"room:1","event":"say","payload":{}}}"#,
        payload_json()
    );
    group.bench_function("message_200b", |b| {
        b.iter(|| parse_client(black_box(&message), MAX_TOPIC_BYTES).is_ok())
    });
    group.finish();
}

fn http(c: &mut Criterion) {
    let mut group = c.benchmark_group("http");
    group.measurement_time(MEASUREMENT_TIME);
    let body = format!(
        r#"{{"topic":"room:1","event":"say","payload":{}}}"#,
        payload_json()
    );
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: localhost:8000\r\nUser-Agent: bench\r\nAuthorization: Bearer secret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    group.throughput(Throughput::Bytes(request.len() as u64));
    let limits = HttpLimits::default();
    group.bench_function("parse_post_publish", |b| {
        b.iter(|| parse_request(black_box(request.as_bytes()), &limits))
    });
    group.finish();
}

criterion_group!(benches, frames, client_json, http);
criterion_main!(benches);
