//! Server pings find WebSocket peers that vanished without a FIN in seconds;
//! peers that answer stay connected.
mod common;

use std::time::Duration;

use common::{read_server_frame, TestServer};

const CONFIG: &str = "ping_interval_ms = 300\npong_timeout_ms = 300\n";

#[test]
fn a_peer_that_never_answers_pings_is_dropped() {
    let server = TestServer::start(1, Some(CONFIG));
    let mut silent = server.raw_ws("/ws", None);
    let (opcode, _) = read_server_frame(&mut silent).unwrap();
    assert_eq!(opcode, 0x9, "a ping after the idle interval");
    server.wait_for("the silent peer to be dropped", || {
        server.metric("ping_timeouts_total") == 1
    });
    server.wait_for("its connection to go", || server.metric("websockets") == 0);
}

#[test]
fn a_peer_that_answers_pings_stays() {
    let server = TestServer::start(1, Some(CONFIG));
    let mut ws = server.ws("/ws");
    ws.subscribe("t");
    // tungstenite answers pings while it reads; nothing else arrives.
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    let mut pings = 0;
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.0.get_mut() {
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
        }
        match ws.0.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connection lost: {e}"),
        }
    }
    assert!(pings >= 2, "pinged while idle ({pings})");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.0.get_mut() {
        s.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    }
    assert_eq!(server.metric("ping_timeouts_total"), 0);
    assert_eq!(
        server.publish(r#"{"topic":"t","message":"still here"}"#),
        202
    );
    assert_eq!(ws.recv_json()["payload"], "still here");
}
