//! A subscriber that stops reading is closed with 1013 once its outbound queue
//! passes its limit; everyone else keeps receiving.
mod common;

use std::net::TcpStream;

use common::{TestServer, IO_TIMEOUT};
use socket2::{Domain, Socket, Type};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

const MESSAGES: usize = 1500;

#[test]
fn a_slow_consumer_is_closed_with_1013_while_others_keep_receiving() {
    let server = TestServer::start(
        1,
        Some("[limits]\nmax_outbound_bytes_per_connection = 65536\n"),
    );

    // A tiny receive buffer so the kernel cannot hide the backlog for us.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut slow, _) =
        tungstenite::client::client(server.ws_url("/ws"), MaybeTlsStream::Plain(stream)).unwrap();
    slow.send(Message::text(r#"{"type":"subscribe","topic":"firehose"}"#))
        .unwrap();
    assert!(matches!(slow.read().unwrap(), Message::Text(t) if t.contains("subscribed")));

    let mut fast = server.ws("/ws");
    fast.subscribe("firehose");
    let reader = std::thread::spawn(move || {
        for i in 0..MESSAGES {
            let push = fast.recv_json();
            assert_eq!(push["payload"]["seq"], i, "in order and complete");
        }
    });

    let padding = "x".repeat(4000);
    for seq in 0..MESSAGES {
        let status = server.publish(&format!(
            r#"{{"topic":"firehose","payload":{{"seq":{seq},"pad":"{padding}"}}}}"#
        ));
        assert_eq!(status, 202);
    }
    reader
        .join()
        .expect("the fast subscriber got every message");

    // The slow one drains what was already on the wire, then finds the close.
    let code = loop {
        match slow.read() {
            Ok(Message::Close(Some(frame))) => break u16::from(frame.code),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, 1013);
    assert_eq!(server.metric("slow_consumer_disconnects_total"), 1);
}

/// A connection with nothing queued takes one frame larger than its
/// outbound budget: `/metrics` (over 4 KiB) is read whole with a 4 KiB
/// budget, and so is a publication over it by a subscriber that keeps up;
/// the budget still bounds what piles up behind.
#[test]
fn one_frame_over_the_budget_reaches_a_connection_that_is_not_behind() {
    let server = TestServer::start(
        1,
        Some("[limits]\nmax_outbound_bytes_per_connection = 4096\n"),
    );
    let (status, metrics) = server.http("GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(metrics.len() > 4096, "/metrics is {} bytes", metrics.len());
    assert!(metrics.contains("ringcast_connections"), "{metrics}");

    let mut reader = server.ws("/ws");
    reader.subscribe("big");
    let payload = "x".repeat(6000);
    let body = format!(r#"{{"topic":"big","payload":"{payload}"}}"#);
    assert_eq!(server.http("POST", "/publish", Some(&body)).0, 202);
    let push = reader.recv_json();
    assert_eq!(push["payload"].as_str().map(str::len), Some(6000));
}
