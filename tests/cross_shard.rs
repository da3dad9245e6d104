//! Delivery across shards: interest routing over the bus.
mod common;

use common::TestServer;
use serde_json::json;

#[test]
fn one_publish_reaches_fifty_subscribers_spread_over_two_shards() {
    let server = TestServer::start(2, None);
    let mut clients: Vec<_> = (0..50).map(|_| server.ws("/ws")).collect();
    for c in &mut clients {
        c.subscribe("broadcast");
    }
    let per_shard = [
        server.shard_metric("websockets", 0),
        server.shard_metric("websockets", 1),
    ];
    assert!(
        per_shard[0] > 0 && per_shard[1] > 0,
        "both shards serve subscribers: {per_shard:?}"
    );
    // Publish from each shard in turn (HTTP connections land on either).
    for round in 0..4 {
        let (status, body) = server.http(
            "POST",
            "/publish",
            Some(&format!(r#"{{"topic":"broadcast","payload":{round}}}"#)),
        );
        assert_eq!((status, body.as_str()), (202, r#"{"delivered_shards":2}"#));
        for c in &mut clients {
            assert_eq!(
                c.recv_json(),
                json!({"type":"push","topic":"broadcast","event":"message","payload":round})
            );
        }
    }
}

#[test]
fn a_client_message_reaches_subscribers_on_the_other_shard() {
    let server = TestServer::start(2, None);
    let mut clients: Vec<_> = (0..20).map(|_| server.ws("/ws")).collect();
    for c in &mut clients {
        c.subscribe("room");
    }
    clients[3].send_text(r#"{"type":"message","topic":"room","event":"say","payload":"x"}"#);
    for c in &mut clients {
        assert_eq!(c.recv_json()["payload"], "x");
    }
}

#[test]
fn interest_is_withdrawn_when_the_last_remote_subscriber_leaves() {
    let server = TestServer::start(2, None);
    let mut clients: Vec<_> = (0..20).map(|_| server.ws("/ws")).collect();
    for c in &mut clients {
        c.subscribe("t");
    }
    drop(clients);
    server.wait_for("subscriptions to drain", || {
        server.metric("subscriptions") == 0
    });
    server.wait_for("topics to be forgotten on both shards", || {
        server.metric("topics") == 0
    });
    let (_, body) = server.http("POST", "/publish", Some(r#"{"topic":"t","payload":1}"#));
    assert_eq!(body, r#"{"delivered_shards":0}"#);
}
