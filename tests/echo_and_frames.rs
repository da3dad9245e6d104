//! `/echo` and the frame layer: text and large binary echo, limits, masking.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{TestServer, IO_TIMEOUT};
use tungstenite::Message;

#[test]
fn echo_returns_text_and_a_100_kb_binary_message() {
    let server = TestServer::start(1, Some("[limits]\nmax_message_bytes = 262144\n"));
    let mut ws = server.ws("/echo");
    ws.send_text("hello echo");
    assert_eq!(ws.recv_text(), "hello echo");
    let blob: Vec<u8> = (0..100 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    ws.0.send(Message::Binary(blob.clone().into())).unwrap();
    match ws.0.read().unwrap() {
        Message::Binary(back) => assert!(back[..] == blob[..], "echoed bytes differ"),
        other => panic!("expected binary, got {other:?}"),
    }
}

#[test]
fn a_fragmented_message_is_reassembled() {
    let server = TestServer::start(1, None);
    let mut stream = upgraded(&server, "/echo");
    // "Hel" + "lo" as two masked fragments, with a ping between them.
    stream.write_all(&masked(0x01, b"Hel")).unwrap();
    stream.write_all(&masked(0x89, b"p")).unwrap();
    stream.write_all(&masked(0x80, b"lo")).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 3 + 7 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        &got[..3],
        b"\x8a\x01p",
        "pong first, while the message is open"
    );
    assert_eq!(&got[3..], b"\x81\x05Hello");
}

#[test]
fn an_oversize_message_closes_with_1009() {
    let server = TestServer::start(1, Some("[limits]\nmax_message_bytes = 1024\n"));
    let mut ws = server.ws("/echo");
    ws.0.send(Message::Binary(vec![0u8; 2048].into())).unwrap();
    assert_eq!(ws.expect_close(), 1009);
    server.wait_for("the counter", || {
        server.metric("protocol_closes_total") == 1
    });
}

#[test]
fn an_unmasked_client_frame_closes_with_1002() {
    let server = TestServer::start(1, None);
    let mut stream = upgraded(&server, "/ws");
    stream.write_all(b"\x81\x02hi").unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert_eq!(got[0], 0x88, "a close frame, got {got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1002, "got {got:?}");
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let server = TestServer::start(1, None);
    let mut stream = upgraded(&server, "/echo");
    stream.write_all(&masked(0x81, b"\xff\xfe")).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1007, "got {got:?}");
}

#[test]
fn a_client_close_is_answered_with_the_same_code() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/echo");
    ws.0.close(Some(tungstenite::protocol::CloseFrame {
        code: 4001u16.into(),
        reason: "bye".into(),
    }))
    .unwrap();
    loop {
        match ws.0.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("no close reply: {e}"),
        }
    }
    server.wait_for("the connection to be released", || {
        server.metric("connections") <= 1
    });
}

/// Of the 2 MiB of receive buffers a busy shard has touched, what a release
/// must give back at least (the metrics polls touch a few pages again).
const RELEASED_AT_LEAST: u64 = 3 << 19;

#[test]
fn a_quiet_shard_gives_its_receive_pages_back_and_later_input_arrives_intact() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/echo");
    // Each try: more receives than the shard has buffers (512), each waiting
    // for its echo so none share a receive, then a quiet spell. A try can
    // be spoiled by a stall of the server mid-burst (a release then, with
    // fewer pages touched after it), so three are allowed.
    let mut drops = Vec::new();
    for attempt in 0..3 {
        let base = attempt * 1_000;
        for n in base..base + 700 {
            echo_checked(&mut ws, n, 32);
        }
        let busy = server.anon_bytes();
        let released = server.metric("receive_page_releases_total");
        // Polled seldom: each poll is a receive, which delays the release.
        server.wait_for_every("a release", Duration::from_millis(300), || {
            server.metric("receive_page_releases_total") > released
        });
        drops.push(busy.saturating_sub(server.anon_bytes()));
        if drops.last() >= Some(&RELEASED_AT_LEAST) {
            break;
        }
    }
    assert!(
        drops.iter().any(|&d| d >= RELEASED_AT_LEAST),
        "anonymous memory fell by {drops:?} bytes after a release; 2 MiB of buffers were resident"
    );
    // Input that arrives around releases: groups sent at once, pauses on
    // both sides of the quiet time, sizes from 1 byte to past one buffer.
    let releases = server.metric("receive_page_releases_total");
    for group in 0..16 {
        let first = 10_000 + group * 8;
        for n in first..first + 8 {
            ws.0.send(Message::Binary(echo_payload(n, 9_000).into()))
                .unwrap();
        }
        for n in first..first + 8 {
            expect_echo(&mut ws, n, 9_000);
        }
        std::thread::sleep(Duration::from_millis(60 + (group as u64 * 37) % 150));
    }
    assert!(server.metric("receive_page_releases_total") > releases);
}

/// Bytes of message `n`, from 1 to `max` long; every byte depends on `n`.
fn echo_payload(n: usize, max: usize) -> Vec<u8> {
    let len = 1 + (n * 997) % max;
    (0..len).map(|i| ((n * 31 + i * 7) % 251) as u8).collect()
}

/// Sends message `n` and checks its echo.
fn echo_checked(ws: &mut common::Ws, n: usize, max: usize) {
    ws.0.send(Message::Binary(echo_payload(n, max).into()))
        .unwrap();
    expect_echo(ws, n, max);
}

fn expect_echo(ws: &mut common::Ws, n: usize, max: usize) {
    match ws.0.read().unwrap() {
        Message::Binary(back) => assert!(back[..] == echo_payload(n, max)[..], "echo {n} differs"),
        other => panic!("expected binary echo {n}, got {other:?}"),
    }
}

/// A raw socket after a successful upgrade on `path`.
fn upgraded(server: &TestServer, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    stream
}

/// A client frame (first byte given) with a fixed mask.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}
