//! Faults found by a hostile run against the shard, each reproduced over real
//! sockets: a shard that a single client could kill, a slow-consumer close
//! that cut a frame in half, completions stuck in the kernel's overflow list,
//! and queues a client could grow without bound.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{client_text_frame, read_server_frame, TestServer, IO_TIMEOUT};

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;

#[test]
fn a_sole_subscriber_flooding_its_own_topic_is_closed_and_the_shard_lives_on() {
    let mut server = TestServer::start(1, None);
    let mut flooder = server.raw_ws("/ws", Some(4096));
    flooder
        .write_all(&client_text_frame(r#"{"type":"subscribe","topic":"solo"}"#))
        .unwrap();
    let (_, reply) = read_server_frame(&mut flooder).unwrap();
    assert_eq!(reply, br#"{"type":"subscribed","topic":"solo"}"#);

    // Never reading, it publishes to the topic only it holds: the push that
    // passes its outbound budget closes it while that publish is fanned out.
    let message = client_text_frame(&format!(
        r#"{{"type":"message","topic":"solo","payload":"{}"}}"#,
        "x".repeat(1000)
    ));
    let mut batch = Vec::new();
    for _ in 0..100 {
        batch.extend_from_slice(&message);
    }
    // Past the default budget (1 MiB); a failed write means the server
    // has dropped it, which is the point.
    server.flood_until_closed(&mut flooder, &batch, 1 << 20);
    let mut other = server.ws("/ws");
    other.subscribe("solo");
    other.subscribe("another");
    assert_eq!(server.http("GET", "/health", None).0, 200);
    drop(flooder);
    assert_eq!(
        server.terminate(),
        Some(0),
        "a clean exit, not a dead shard"
    );
}

#[test]
fn a_slow_consumer_reads_whole_frames_then_a_1013_close() {
    let server = TestServer::start(
        1,
        Some("[limits]\nmax_outbound_bytes_per_connection = 65536\n"),
    );
    let mut slow = server.raw_ws("/ws", Some(4096));
    slow.write_all(&client_text_frame(
        r#"{"type":"subscribe","topic":"firehose"}"#,
    ))
    .unwrap();
    assert_eq!(read_server_frame(&mut slow).unwrap().0, OPCODE_TEXT);
    // A second subscriber that keeps up, so the topic outlives the slow one.
    let mut fast = server.ws("/ws");
    fast.subscribe("firehose");
    let fast_reader = std::thread::spawn(move || while fast.0.read().is_ok() {});

    // Several publishers pipelining frames of odd sizes, so short sends and
    // publishes are handled in the same loop turns.
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut conn = TcpStream::connect(addr).unwrap();
                let mut requests = Vec::new();
                for seq in 0..400 {
                    let body = format!(
                        r#"{{"topic":"firehose","payload":{{"p":{p},"seq":{seq},"pad":"{}"}}}}"#,
                        "y".repeat(1000 + 37 * seq % 3000)
                    );
                    requests.extend_from_slice(
                        format!(
                            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
                conn.write_all(&requests).unwrap();
                let mut sink = Vec::new();
                conn.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let _ = conn.read_to_end(&mut sink);
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    drop(fast_reader);

    // Everything on the wire must parse as whole frames, ending in a 1013 close.
    loop {
        let (opcode, payload) = read_server_frame(&mut slow).expect("a well-formed frame");
        if opcode == OPCODE_CLOSE {
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1013);
            break;
        }
        assert_eq!(opcode, OPCODE_TEXT, "a push, whole");
        serde_json::from_slice::<serde_json::Value>(&payload).expect("a whole JSON push");
    }
}

/// More subscribers on one shard than the old 16,384-entry completion queue,
/// so one broadcast completes more sends than it held.
const BROADCAST_SUBSCRIBERS: usize = 17_000;

#[test]
fn a_broadcast_bigger_than_the_completion_queue_reaches_everyone() {
    raise_fd_limit();
    let server = TestServer::start(1, None);
    let subscribe = client_text_frame(r#"{"type":"subscribe","topic":"all"}"#);
    let mut subscribers = Vec::with_capacity(BROADCAST_SUBSCRIBERS);
    for _ in 0..BROADCAST_SUBSCRIBERS {
        let mut s = server.raw_ws("/ws", None);
        s.write_all(&subscribe).unwrap();
        subscribers.push(s);
    }
    for s in &mut subscribers {
        assert_eq!(read_server_frame(s).unwrap().0, OPCODE_TEXT, "subscribed");
    }
    assert_eq!(server.publish(r#"{"topic":"all","message":"hello"}"#), 202);
    let deadline = Instant::now() + IO_TIMEOUT;
    for (i, s) in subscribers.iter_mut().enumerate() {
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let (opcode, payload) =
            read_server_frame(s).unwrap_or_else(|e| panic!("subscriber {i} got nothing: {e}"));
        assert_eq!(opcode, OPCODE_TEXT);
        assert!(payload.ends_with(br#""payload":"hello"}"#));
    }
    assert_eq!(server.metric("cq_dropped_total"), 0);
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a live local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    assert!(
        limit.rlim_cur as usize > BROADCAST_SUBSCRIBERS + 500,
        "this test needs {} open files",
        BROADCAST_SUBSCRIBERS + 500
    );
}

#[test]
fn presence_queries_in_flight_per_connection_are_bounded() {
    let server = TestServer::start(2, None);
    let mut ws = server.raw_ws("/ws", None);
    ws.write_all(&client_text_frame(r#"{"type":"subscribe","topic":"room"}"#))
        .unwrap();
    assert_eq!(read_server_frame(&mut ws).unwrap().0, OPCODE_TEXT);
    // Ten queries in one write reach the shard in one receive: the first four
    // wait for the other shard, the rest are refused before any answer.
    let query = client_text_frame(r#"{"type":"presence","topic":"room"}"#);
    ws.write_all(&query.repeat(10)).unwrap();
    let mut answers = 0;
    let mut refusals = 0;
    while answers + refusals < 10 {
        let (_, payload) = read_server_frame(&mut ws).unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        match reply["type"].as_str() {
            Some("presence") => answers += 1,
            Some("error") => {
                assert!(reply["message"].as_str().unwrap().contains("in flight"));
                refusals += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((answers, refusals), (4, 6));
    assert_eq!(server.metric("presence_refused_total"), 6);
}

#[test]
fn a_client_that_keeps_sending_while_its_upgrade_waits_is_closed() {
    let server = TestServer::start(
        2,
        Some("[limits]\nmax_http_header_bytes = 1024\nmax_http_body_bytes = 1024\nmax_message_bytes = 1024\n"),
    );
    // An identified upgrade waits for the other shard's acknowledgement; the
    // bytes behind it in the same receive are more than it may park.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut bytes = b"GET /ws?user_id=greedy HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
    bytes.extend_from_slice(&[b'z'; 3000]);
    stream.write_all(&bytes).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    assert!(
        !String::from_utf8_lossy(&out).starts_with("HTTP/1.1 101"),
        "the upgrade is not completed"
    );
    assert_eq!(server.metric("parked_input_overflows_total"), 1);
}

#[test]
fn an_http_client_that_never_reads_its_responses_is_dropped() {
    let server = TestServer::start(
        1,
        Some("[limits]\nmax_outbound_bytes_per_connection = 65536\n"),
    );
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    // Pipelined requests for the chat page (about 15 KB each), never read.
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let _ = stream.write_all(&request);
    server.wait_for("the connection to be dropped", || {
        server.metric("slow_consumer_disconnects_total") == 1
    });
    server.wait_for("only the metrics connections to remain", || {
        server.metric("connections") <= 1
    });
}
