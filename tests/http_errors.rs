//! Every HTTP error path answers with a precise status and a JSON body, and
//! the server keeps serving.
mod common;

use common::{parse_response, TestServer};

fn status_of(server: &TestServer, raw: &str) -> (u16, String) {
    parse_response(&server.raw(raw.as_bytes()))
}

#[test]
fn bad_publish_bodies_get_400_with_a_reason() {
    let server = TestServer::start(1, None);
    for body in [
        "{not json",
        r#"{"payload":1}"#,
        r#"{"topic":""}"#,
        r#"{"topic":5}"#,
        "[]",
    ] {
        let (status, reply) = server.http("POST", "/publish", Some(body));
        assert_eq!(status, 400, "for {body}: {reply}");
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(server.http("GET", "/health", None).0, 200);
}

#[test]
fn a_body_over_the_limit_gets_413() {
    let server = TestServer::start(1, Some("[limits]\nmax_http_body_bytes = 1024\n"));
    let big = format!(r#"{{"topic":"t","message":"{}"}}"#, "a".repeat(2000));
    assert_eq!(server.http("POST", "/publish", Some(&big)).0, 413);
    assert_eq!(server.metric("http_errors_total"), 1);
}

#[test]
fn unknown_paths_get_404_and_wrong_methods_get_405_with_allow() {
    let server = TestServer::start(1, None);
    assert_eq!(server.http("GET", "/nope", None).0, 404);
    let raw = server.raw(b"GET /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.contains("Allow: POST\r\n"), "{raw}");
    assert_eq!(server.http("DELETE", "/health", None).0, 405);
}

#[test]
fn a_non_json_content_type_gets_415() {
    let server = TestServer::start(1, None);
    let (status, _) = status_of(
        &server,
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    assert_eq!(status, 415);
}

#[test]
fn malformed_requests_and_oversize_heads_are_refused() {
    let server = TestServer::start(1, Some("[limits]\nmax_http_header_bytes = 1024\n"));
    assert_eq!(status_of(&server, "GARBAGE\r\n\r\n").0, 400);
    assert_eq!(
        status_of(&server, "GET / HTTP/1.1\r\nBad Header\r\n\r\n").0,
        400
    );
    let huge = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    assert_eq!(status_of(&server, &huge).0, 431);
    assert_eq!(
        server.http("GET", "/health", None).0,
        200,
        "server still serves"
    );
}

#[test]
fn bad_upgrades_get_400_or_426() {
    let server = TestServer::start(1, None);
    let plain = status_of(
        &server,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(plain.0, 426);
    let bad_key = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&server, bad_key).0, 400);
    let old = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\nConnection: Upgrade, close\r\n\r\n";
    let raw = server.raw(old.as_bytes());
    assert!(raw.starts_with("HTTP/1.1 426"), "{raw}");
    assert!(raw.contains("Sec-WebSocket-Version: 13"), "{raw}");
}

#[test]
fn pipelined_requests_get_responses_in_order_on_one_connection() {
    let server = TestServer::start(1, None);
    let body = r#"{"topic":"t","payload":1}"#;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\nPOST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let raw = server.raw(request.as_bytes());
    let statuses: Vec<&str> = raw
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &raw[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "202", "404"], "{raw}");
}

#[test]
fn health_reports_shards_and_connections() {
    let server = TestServer::start(2, None);
    let _ws = server.ws("/ws");
    let (status, body) = server.http("GET", "/health", None);
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["shards"], 2);
    assert_eq!(health["connections"], 2, "the websocket and this request");
}

#[test]
fn metrics_are_prometheus_text_with_per_shard_series() {
    let server = TestServer::start(2, None);
    let raw = server.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        raw.contains("Content-Type: text/plain; version=0.0.4"),
        "{raw}"
    );
    for series in [
        "# TYPE ringcast_connections gauge",
        "ringcast_messages_out_total{shard=\"1\"}",
        "ringcast_slow_consumer_disconnects_total 0",
    ] {
        assert!(raw.contains(series), "missing {series}");
    }
}

#[test]
fn idle_and_trickling_http_connections_are_closed_after_the_idle_timeout() {
    use std::io::{Read, Write};
    let server = TestServer::start(1, Some("http_idle_timeout_ms = 1000\n"));
    let mut idle = std::net::TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let mut partial = std::net::TcpStream::connect(server.addr).unwrap();
    partial.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut got).unwrap(),
        0,
        "idle connection closed without a response"
    );
    partial.read_to_end(&mut got).unwrap();
    let reply = String::from_utf8_lossy(&got);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(server.http("GET", "/health", None).0, 200);
}

#[test]
fn a_head_request_gets_headers_only_and_the_next_pipelined_request_still_parses() {
    let server = TestServer::start(1, None);
    let raw = server.raw(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(head.contains("Content-Length: "), "{raw}");
    assert!(
        rest.starts_with("HTTP/1.1 200"),
        "no body after the HEAD response: {raw}"
    );
    assert!(rest.ends_with('}'), "{raw}");
}

#[test]
fn a_client_that_expects_100_continue_is_told_to_send_its_body() {
    use std::io::{Read, Write};
    let server = TestServer::start(1, None);
    let body = r#"{"topic":"t","payload":1}"#;
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 202"), "{rest}");
}
