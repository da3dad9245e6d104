//! Hostile input measured from outside: a 1 MB publish trickled in 1-byte
//! chunks, absurdly deep JSON, an HTTP/1.0 upgrade. Each gets a precise
//! answer and none holds the shard.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{TestServer, IO_TIMEOUT};

/// Just under the default 1 MiB body limit.
const BODY_BYTES: usize = 1_000_000;

#[test]
fn a_megabyte_in_one_byte_chunks_does_not_hold_the_shard() {
    let server = TestServer::start(1, None);
    let prefix = r#"{"topic":"t","message":""#;
    let suffix = r#""}"#;
    let body: Vec<u8> = prefix
        .bytes()
        .chain(std::iter::repeat(b'x').take(BODY_BYTES - prefix.len() - suffix.len()))
        .chain(suffix.bytes())
        .collect();
    let mut request = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for byte in &body {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");

    let addr = server.addr;
    let trickle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT * 3)).unwrap();
        for piece in request.chunks(64 * 1024) {
            conn.write_all(piece).unwrap();
        }
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).unwrap();
        (String::from_utf8_lossy(&head).into_owned(), start.elapsed())
    });

    // The same (only) shard keeps answering while the body streams in. With
    // the old parser a /health here waited seconds (3.2 s in release).
    let mut slowest = Duration::ZERO;
    while !trickle.is_finished() {
        let start = Instant::now();
        assert_eq!(server.http("GET", "/health", None).0, 200);
        slowest = slowest.max(start.elapsed());
    }
    let (status, took) = trickle.join().unwrap();
    assert_eq!(status, "HTTP/1.1 202", "the publish is accepted");
    assert!(
        slowest < Duration::from_secs(1),
        "/health waited {slowest:?} behind the trickled body"
    );
    assert!(took < Duration::from_secs(5), "the publish took {took:?}");
}

#[test]
fn a_publish_nested_half_a_million_deep_is_refused() {
    let server = TestServer::start(1, None);
    let depth = 500_000;
    let payload = "[".repeat(depth) + &"]".repeat(depth);
    let body = format!(r#"{{"topic":"t","payload":{payload}}}"#);
    let (status, reply) = server.http("POST", "/publish", Some(&body));
    assert_eq!(status, 400);
    assert!(reply.contains("nested deeper than 128"), "{reply}");
}

#[test]
fn an_http_1_0_upgrade_is_refused() {
    let server = TestServer::start(1, None);
    let reply = server.raw(b"GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("HTTP/1.1"), "{reply}");
}
