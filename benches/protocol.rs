//! Criterion benches for the sans-IO protocol core: frame encode and decode,
//! client JSON parsing and HTTP request decoding, all in memory.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringcast::protocol::frame::{apply_mask, FrameDecoder, FrameLimits};
use ringcast::protocol::http::{HttpLimits, RequestDecoder};
use ringcast::protocol::message::{parse_client, push, Bounds};

/// Short runs keep `cargo bench` usable in CI; 3 s gives stable medians here.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);

/// Typical event size in the load test.
const PAYLOAD_BYTES: usize = 200;

/// Chunk size of the chunked publish bench: a client streaming small writes.
const CHUNK_BYTES: usize = 64;

/// Bytes per read in the chunked publish bench: a slow link or a peer trickling
/// a body, the case that used to cost a re-parse of the whole body per read.
const READ_BYTES: usize = 16;

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
        b.iter(|| parse_client(black_box(subscribe), Bounds::default()).is_ok())
    });
    let message = format!(
        r#"{{"type":"message","topic":"room:1","event":"say","payload":{}}}"#,
        payload_json()
    );
    group.bench_function("message_200b", |b| {
        b.iter(|| parse_client(black_box(&message), Bounds::default()).is_ok())
    });
    group.finish();
}

fn publish_body() -> String {
    format!(
        r#"{{"topic":"room:1","event":"say","payload":{}}}"#,
        payload_json()
    )
}

/// Head of the publish benches, up to the framing field: a typical API client.
const PUBLISH_HEAD: &str = "POST /publish HTTP/1.1\r\nHost: localhost:8000\r\nUser-Agent: bench\r\nAuthorization: Bearer secret\r\nContent-Type: application/json\r\n";

/// `body` in chunks of `CHUNK_BYTES`, each with a short extension.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() * 2);
    for chunk in body.chunks(CHUNK_BYTES) {
        out.extend_from_slice(format!("{:x};seq=1\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn http(c: &mut Criterion) {
    let mut group = c.benchmark_group("http");
    group.measurement_time(MEASUREMENT_TIME);
    let body = publish_body();
    let request = format!("{PUBLISH_HEAD}Content-Length: {}\r\n\r\n{body}", body.len());
    group.throughput(Throughput::Bytes(request.len() as u64));
    // The whole request in one read, as most arrive: the plain path.
    let mut decoder = RequestDecoder::new(HttpLimits::default());
    assert!(matches!(
        decoder.decode(request.as_bytes()),
        Ok((_, Some(_)))
    ));
    group.bench_function("parse_post_publish", |b| {
        b.iter(|| decoder.decode(black_box(request.as_bytes())))
    });

    let mut request = format!("{PUBLISH_HEAD}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
    request.extend_from_slice(&chunked(body.as_bytes()));
    group.throughput(Throughput::Bytes(request.len() as u64));
    let mut held = Vec::with_capacity(request.len());
    group.bench_function("decode_chunked_post_publish_16b_reads", |b| {
        b.iter(|| {
            // What a connection does per read: append, decode, drop what was consumed.
            let mut complete = None;
            for read in black_box(&request).chunks(READ_BYTES) {
                held.extend_from_slice(read);
                if let Ok((used, request)) = decoder.decode(&held) {
                    held.drain(..used);
                    complete = complete.or(request);
                }
            }
            assert!(complete.is_some() && held.is_empty());
            complete
        })
    });
    group.finish();
}

criterion_group!(benches, frames, client_json, http);
criterion_main!(benches);
