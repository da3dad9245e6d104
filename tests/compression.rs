//! permessage-deflate (RFC 7692) on real sockets: negotiated when a client
//! offers it and `[websocket] compression` is on; pushes of at least
//! `compression_min_bytes` arrive compressed (RSV1) and inflate, on their
//! own, to the JSON an uncompressed subscriber gets; short ones and
//! replies go plain; compressed client messages are read, a zip bomb is
//! refused with 1009, and RSV1 where it does not belong with 1002.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{client_text_frame, TestServer, IO_TIMEOUT};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};

const CONFIG: &str = "[websocket]\ncompression = true\ncompression_min_bytes = 256\n";

/// Upgrades `path` offering `offer` (if any); returns the socket and the
/// response's `Sec-WebSocket-Extensions`.
fn upgrade(server: &TestServer, path: &str, offer: Option<&str>) -> (TcpStream, Option<String>) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let offer = offer
        .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let extensions = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_string);
    (stream, extensions)
}

/// One server frame: its first byte (FIN, RSV1, opcode) and payload.
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).unwrap();
            usize::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (head[0], payload)
}

/// Inflates one message compressed on its own.
fn inflate(compressed: &[u8]) -> Vec<u8> {
    let mut input = compressed.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// A masked client frame with `first` as its first byte.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = client_text_frame(&"x".repeat(payload.len()));
    frame[0] = first;
    let start = frame.len() - payload.len();
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    for (i, b) in payload.iter().enumerate() {
        frame[start + i] = b ^ mask[i % 4];
    }
    frame
}

/// `text` compressed as a client would, on its own, without the tail.
fn deflate(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    Compress::new(Compression::default(), false)
        .compress_vec(text, &mut out, FlushCompress::Sync)
        .unwrap();
    out.truncate(out.len() - 4);
    out
}

fn subscribe(stream: &mut TcpStream, topic: &str) {
    let request = json!({"type": "subscribe", "topic": topic}).to_string();
    stream.write_all(&client_text_frame(&request)).unwrap();
    let (first, reply) = read_frame(stream);
    assert_eq!(first, 0x81, "replies go plain");
    assert!(String::from_utf8_lossy(&reply).contains("subscribed"));
}

#[test]
fn a_long_push_is_compressed_once_and_inflates_to_what_a_plain_subscriber_gets() {
    let server = TestServer::start(2, Some(CONFIG));
    let (mut packed, agreed) = upgrade(
        &server,
        "/ws",
        Some("permessage-deflate; client_max_window_bits"),
    );
    assert_eq!(
        agreed.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let (mut plain, none) = upgrade(&server, "/ws", None);
    assert_eq!(none, None, "not offered, not agreed");
    subscribe(&mut packed, "news");
    subscribe(&mut plain, "news");

    let long: Vec<String> = (0..60)
        .map(|i| format!("item number {i} of the list"))
        .collect();
    for payload in [json!(long), json!("short")] {
        let body = json!({"topic": "news", "event": "e", "payload": payload}).to_string();
        assert_eq!(server.publish(&body) / 100, 2);
        let (first, bytes) = read_frame(&mut plain);
        assert_eq!(first, 0x81);
        let (first_packed, packed_bytes) = read_frame(&mut packed);
        if bytes.len() >= 256 {
            assert_eq!(first_packed, 0xc1, "FIN, RSV1, text");
            assert!(
                packed_bytes.len() * 3 < bytes.len(),
                "{} of {}",
                packed_bytes.len(),
                bytes.len()
            );
            assert_eq!(inflate(&packed_bytes), bytes);
        } else {
            assert_eq!(
                (first_packed, packed_bytes),
                (0x81, bytes),
                "short pushes go plain"
            );
        }
    }
}

#[test]
fn compressed_client_messages_are_read_within_the_message_limit() {
    let server = TestServer::start(1, Some(CONFIG));
    let (mut ws, _) = upgrade(&server, "/ws", Some("permessage-deflate"));
    let subscribe = json!({"type": "subscribe", "topic": "t"}).to_string();
    ws.write_all(&client_frame(0xc1, &deflate(subscribe.as_bytes())))
        .unwrap();
    let (_, reply) = read_frame(&mut ws);
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["type"], "subscribed", "{reply}");

    // Fragmented: RSV1 on the first frame only.
    let (mut echo, _) = upgrade(&server, "/echo", Some("permessage-deflate"));
    let packed = deflate(b"hello, compressed echo");
    let (a, b) = packed.split_at(packed.len() / 2);
    echo.write_all(&client_frame(0x41, a)).unwrap();
    echo.write_all(&client_frame(0x80, b)).unwrap();
    let (first, bytes) = read_frame(&mut echo);
    assert_eq!(
        (first & 0x0f, bytes.as_slice()),
        (0x1, &b"hello, compressed echo"[..])
    );

    // A bomb: 16 MiB of spaces in 16 KiB (a frame within the limit),
    // inflating far past the 64 KiB message limit.
    let (mut bomb, _) = upgrade(&server, "/ws", Some("permessage-deflate"));
    let zeros = vec![b' '; 16 << 20];
    bomb.write_all(&client_frame(0xc1, &deflate(&zeros)))
        .unwrap();
    let (first, close) = read_frame(&mut bomb);
    assert_eq!(first, 0x88);
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1009);

    // RSV1 on a control frame, or without the extension: 1002.
    let (mut rsv_ping, _) = upgrade(&server, "/ws", Some("permessage-deflate"));
    rsv_ping.write_all(&client_frame(0xc9, b"")).unwrap();
    let (_, close) = read_frame(&mut rsv_ping);
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1002);
    let (mut not_agreed, _) = upgrade(&server, "/ws", None);
    not_agreed
        .write_all(&client_frame(0xc1, &deflate(subscribe.as_bytes())))
        .unwrap();
    let (_, close) = read_frame(&mut not_agreed);
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1002);
    assert_eq!(server.http("GET", "/health", None).0, 200);
}

#[test]
fn offers_that_would_need_a_context_per_subscriber_are_declined() {
    let server = TestServer::start(1, Some(CONFIG));
    let (_, agreed) = upgrade(
        &server,
        "/ws",
        Some("permessage-deflate; server_max_window_bits=10"),
    );
    assert_eq!(agreed, None);
    let (_, agreed) = upgrade(
        &server,
        "/ws",
        Some("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
    );
    assert!(agreed.is_some(), "the second offer is taken");
    let off = TestServer::start(1, None);
    let (_, agreed) = upgrade(&off, "/ws", Some("permessage-deflate"));
    assert_eq!(agreed, None, "off unless configured");
}

#[test]
fn python_websockets_negotiates_compression_and_reads_compressed_pushes() {
    let server = TestServer::start(2, Some(CONFIG));
    common::run_python("deflate_client.py", server.addr);
}

#[test]
fn chromiums_websocket_negotiates_compression_both_ways() {
    let server = TestServer::start(2, Some(CONFIG));
    let stdout =
        common::browser::run_script("ws_deflate_test.mjs", &[format!("http://{}", server.addr)]);
    print!("{stdout}");
    assert!(stdout.contains("websocket compression test passed"));
}
