//! With `write_delay_us`, pushes to one connection within the delay leave in
//! one send; replies are not held.
mod common;

use std::time::{Duration, Instant};

use common::TestServer;

#[test]
fn pushes_within_the_write_delay_leave_together_and_in_order() {
    let server = TestServer::start(1, Some("write_delay_us = 200000\n"));
    let mut ws = server.ws("/ws");
    ws.subscribe("t");
    let sends_before = server.metric("send_ops_total");
    // One connection pipelines ten publishes: they reach the shard in one
    // turn or a few, well inside the 200 ms delay.
    let mut requests = String::new();
    for n in 0..10 {
        let body = format!(r#"{{"topic":"t","payload":{n}}}"#);
        requests.push_str(&format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    requests.push_str("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let start = Instant::now();
    let replies = server.raw(requests.as_bytes());
    assert_eq!(replies.matches("HTTP/1.1 202").count(), 10);
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "replies are not held"
    );
    for n in 0..10 {
        assert_eq!(ws.recv_json()["payload"], n);
    }
    // Ten pushes in at most two sends; the HTTP replies and the metrics read
    // itself are a few more.
    let sends = server.metric("send_ops_total") - sends_before;
    assert!(sends <= 6, "{sends} sends");
}
