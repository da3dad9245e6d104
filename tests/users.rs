//! Users: registration, `/ws/{id}`, publish-to-user and one-to-one chat, across shards.
mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

fn register(server: &TestServer, body: &str) -> Value {
    let (status, reply) = server.http("POST", "/register", Some(body));
    assert_eq!(status, 201, "{reply}");
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn a_registered_client_connects_with_its_id_and_starts_with_its_topics() {
    let server = TestServer::start(2, None);
    let reg = register(&server, r#"{"user_id":"u1","topics":["alerts","news"]}"#);
    let id = reg["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(reg["url"], format!("ws://{}/ws/{id}", server.addr));
    // Connect several times so both shards answer /ws/{id}.
    for _ in 0..6 {
        let mut ws = server.ws(&format!("/ws/{id}"));
        let mut replies = vec![ws.recv_text(), ws.recv_text()];
        replies.sort();
        assert_eq!(
            replies,
            [
                r#"{"type":"subscribed","topic":"alerts"}"#,
                r#"{"type":"subscribed","topic":"news"}"#
            ]
        );
        server.publish(r#"{"topic":"news","payload":"n"}"#);
        assert_eq!(ws.recv_json()["payload"], "n");
    }
}

#[test]
fn an_unknown_registration_id_gets_404() {
    let server = TestServer::start(2, None);
    let raw = server.raw(
        b"GET /ws/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert_eq!(server.http("DELETE", "/register/nope", None).0, 404);
}

#[test]
fn deleting_a_registration_closes_its_live_connection_and_forgets_it() {
    let server = TestServer::start(2, None);
    let reg = register(&server, r#"{"user_id":"gone"}"#);
    let id = reg["id"].as_str().unwrap();
    let mut live: Vec<_> = (0..4).map(|_| server.ws(&format!("/ws/{id}"))).collect();
    assert_eq!(
        server.http("DELETE", &format!("/register/{id}"), None).0,
        204
    );
    for ws in &mut live {
        assert_eq!(ws.expect_close(), 1000);
    }
    assert_eq!(
        server.http("DELETE", &format!("/register/{id}"), None).0,
        404
    );
    for _ in 0..4 {
        let raw = server.raw(
            format!("GET /ws/{id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
        );
        assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    }
}

#[test]
fn bad_registrations_get_400() {
    let server = TestServer::start(1, None);
    for body in [
        r#"{}"#,
        r#"{"user_id":""}"#,
        r#"{"user_id":true}"#,
        r#"{"user_id":"u","topics":[1]}"#,
        "nope",
    ] {
        assert_eq!(
            server.http("POST", "/register", Some(body)).0,
            400,
            "{body}"
        );
    }
}

#[test]
fn a_publish_to_one_user_reaches_only_that_users_subscribed_connections_on_every_shard() {
    let server = TestServer::start(2, None);
    let mut alice: Vec<_> = (0..8).map(|_| server.ws("/ws?user_id=alice")).collect();
    let mut bob: Vec<_> = (0..8).map(|_| server.ws("/ws?user_id=bob")).collect();
    let mut anonymous = server.ws("/ws");
    for ws in alice.iter_mut().chain(bob.iter_mut()) {
        ws.subscribe("inbox");
    }
    anonymous.subscribe("inbox");
    let mut alice_elsewhere = server.ws("/ws?user_id=alice");
    alice_elsewhere.subscribe("other");
    assert!(server.shard_metric("websockets", 0) > 0 && server.shard_metric("websockets", 1) > 0);

    let (status, body) = server.http(
        "POST",
        "/publish",
        Some(r#"{"topic":"inbox","user_id":"alice","payload":{"for":"alice"}}"#),
    );
    assert_eq!(status, 202);
    let shards: Value = serde_json::from_str(&body).unwrap();
    assert!(shards["delivered_shards"].as_u64().unwrap() >= 1);
    for ws in &mut alice {
        assert_eq!(
            ws.recv_json(),
            json!({"type":"push","topic":"inbox","event":"message","payload":{"for":"alice"}})
        );
    }
    for ws in bob.iter_mut().chain([&mut anonymous, &mut alice_elsewhere]) {
        assert!(
            ws.is_silent_for(Duration::from_millis(100)),
            "only alice's subscribed connections"
        );
    }
}

#[test]
fn a_numeric_user_id_is_read_as_its_decimal_string() {
    let server = TestServer::start(2, None);
    let reg = register(&server, r#"{"user_id":42,"topics":["t"]}"#);
    let mut ws = server.ws(&format!("/ws/{}", reg["id"].as_str().unwrap()));
    assert_eq!(ws.recv_json()["type"], "subscribed");
    assert_eq!(
        server.publish(r#"{"topic":"t","user_id":42,"payload":1}"#),
        202
    );
    assert_eq!(ws.recv_json()["payload"], 1);
}

#[test]
fn chat_lines_travel_both_ways_between_two_users_on_any_shard() {
    let server = TestServer::start(2, None);
    let mut a: Vec<_> = (0..4)
        .map(|_| server.ws("/chat?user_id=ann&recipient_id=ben"))
        .collect();
    let mut b: Vec<_> = (0..4)
        .map(|_| server.ws("/chat?user_id=ben&recipient_id=ann"))
        .collect();
    a[0].send_text("hello ben");
    for ws in &mut b {
        assert_eq!(ws.recv_text(), "ann: hello ben");
    }
    b[3].send_text("hi ann");
    for ws in &mut a {
        assert_eq!(ws.recv_text(), "ben: hi ann");
    }
    assert!(
        a[1].is_silent_for(Duration::from_millis(100)),
        "a sender does not get its own line"
    );
}

#[test]
fn chat_without_both_users_gets_400() {
    let server = TestServer::start(1, None);
    let upgrade = |path: &str| {
        server.raw(format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes())
    };
    assert!(upgrade("/chat?user_id=a").starts_with("HTTP/1.1 400"));
    assert!(upgrade("/chat?recipient_id=b").starts_with("HTTP/1.1 400"));
    assert!(upgrade("/chat?user_id=&recipient_id=b").starts_with("HTTP/1.1 400"));
}

#[test]
fn registrations_past_the_limit_get_503() {
    let server = TestServer::start(2, Some("[limits]\nmax_registrations = 2\n"));
    register(&server, r#"{"user_id":"a"}"#);
    let second = register(&server, r#"{"user_id":"b"}"#);
    let (status, body) = server.http("POST", "/register", Some(r#"{"user_id":"c"}"#));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("registration limit of 2"), "{body}");
    let id = second["id"].as_str().unwrap();
    assert_eq!(
        server.http("DELETE", &format!("/register/{id}"), None).0,
        204
    );
    register(&server, r#"{"user_id":"c"}"#);
}

#[test]
fn concurrent_registrations_on_every_shard_never_pass_the_limit() {
    let server = TestServer::start(2, Some("[limits]\nmax_registrations = 5\n"));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let body = format!(r#"{{"user_id":"u{i}"}}"#);
                    server.http("POST", "/register", Some(&body)).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|&&s| s == 201).count(), 5);
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 35);
}
