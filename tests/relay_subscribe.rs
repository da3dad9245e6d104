//! The JSON relay protocol on `/ws`: subscribe, publish, unsubscribe, ping, errors.
mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;

#[test]
fn a_subscriber_receives_http_publishes_until_it_unsubscribes() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.subscribe("orders:new");
    let status = server.publish(r#"{"topic":"orders:new","event":"created","payload":{"id":7}}"#);
    assert_eq!(status, 202);
    assert_eq!(
        ws.recv_json(),
        json!({"type":"push","topic":"orders:new","event":"created","payload":{"id":7}})
    );
    ws.send_text(r#"{"type":"unsubscribe","topic":"orders:new"}"#);
    assert_eq!(
        ws.recv_json(),
        json!({"type":"unsubscribed","topic":"orders:new"})
    );
    server.publish(r#"{"topic":"orders:new","payload":1}"#);
    assert!(ws.is_silent_for(Duration::from_millis(300)));
}

#[test]
fn a_message_string_is_pushed_as_event_message() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.subscribe("news");
    let (status, body) = server.http(
        "POST",
        "/publish",
        Some(r#"{"topic":"news","message":"hello"}"#),
    );
    assert_eq!((status, body.as_str()), (202, r#"{"delivered_shards":1}"#));
    assert_eq!(
        ws.recv_json(),
        json!({"type":"push","topic":"news","event":"message","payload":"hello"})
    );
}

#[test]
fn a_client_message_fans_out_to_every_subscriber_including_the_sender() {
    let server = TestServer::start(1, None);
    let mut clients: Vec<_> = (0..5).map(|_| server.ws("/ws")).collect();
    for c in &mut clients {
        c.subscribe("room:1");
    }
    let mut outsider = server.ws("/ws");
    outsider.subscribe("room:2");
    clients[0]
        .send_text(r#"{"type":"message","topic":"room:1","event":"say","payload":{"text":"hi"}}"#);
    for c in &mut clients {
        assert_eq!(
            c.recv_json(),
            json!({"type":"push","topic":"room:1","event":"say","payload":{"text":"hi"}})
        );
    }
    assert!(outsider.is_silent_for(Duration::from_millis(300)));
}

#[test]
fn publishing_to_a_topic_the_client_does_not_hold_is_refused_with_an_error() {
    let server = TestServer::start(1, None);
    let mut sender = server.ws("/ws");
    let mut listener = server.ws("/ws");
    listener.subscribe("room:1");
    sender.send_text(r#"{"type":"message","topic":"room:1","payload":1}"#);
    let reply = sender.recv_json();
    assert_eq!(reply["type"], "error");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("not subscribed"),
        "{reply}"
    );
    assert!(listener.is_silent_for(Duration::from_millis(300)));
}

#[test]
fn both_ping_forms_are_answered() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.send_text(r#"{"type":"ping"}"#);
    assert_eq!(ws.recv_json(), json!({"type":"pong"}));
    ws.send_text("ping");
    assert_eq!(ws.recv_text(), "pong");
}

#[test]
fn a_websocket_ping_frame_gets_a_pong_with_its_payload() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.0.send(tungstenite::Message::Ping(b"abc".to_vec().into()))
        .unwrap();
    match ws.0.read().unwrap() {
        tungstenite::Message::Pong(p) => assert_eq!(&p[..], b"abc"),
        other => panic!("expected pong, got {other:?}"),
    }
}

#[test]
fn bad_json_is_answered_with_an_error_and_the_connection_stays_open() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    for bad in [
        "{nope",
        "[1,2]",
        r#"{"type":"dance"}"#,
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","topic":""}"#,
    ] {
        ws.send_text(bad);
        let reply = ws.recv_json();
        assert_eq!(reply["type"], "error", "for {bad}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    ws.subscribe("still-open");
    assert!(server.metric("ws_errors_total") >= 5);
}

#[test]
fn binary_frames_on_the_relay_get_an_error() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.0.send(tungstenite::Message::Binary(vec![1, 2, 3].into()))
        .unwrap();
    assert_eq!(ws.recv_json()["type"], "error");
}

#[test]
fn the_subscription_limit_is_answered_with_an_error() {
    let server = TestServer::start(1, Some("[limits]\nmax_subscriptions_per_connection = 3\n"));
    let mut ws = server.ws("/ws");
    for t in ["a", "b", "c"] {
        ws.subscribe(t);
    }
    ws.send_text(r#"{"type":"subscribe","topic":"d"}"#);
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "error");
    assert!(
        reply["message"].as_str().unwrap().contains("limit of 3"),
        "{reply}"
    );
    ws.send_text(r#"{"topics":["a","b","c","d"]}"#);
    assert_eq!(ws.recv_json()["type"], "error");
    // The connection keeps its three topics.
    server.publish(r#"{"topic":"c","payload":3}"#);
    assert_eq!(ws.recv_json()["payload"], 3);
}

#[test]
fn a_topics_list_replaces_the_whole_subscription_set() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.subscribe("cats");
    ws.send_text(r#"{"topics":["dogs","birds"]}"#);
    let mut replies: Vec<String> = (0..3).map(|_| ws.recv_text()).collect();
    replies.sort();
    assert_eq!(
        replies,
        vec![
            r#"{"type":"subscribed","topic":"birds"}"#,
            r#"{"type":"subscribed","topic":"dogs"}"#,
            r#"{"type":"unsubscribed","topic":"cats"}"#,
        ]
    );
    server.publish(r#"{"topic":"cats","payload":0}"#);
    server.publish(r#"{"topic":"dogs","payload":1}"#);
    assert_eq!(ws.recv_json()["payload"], 1);
}

#[test]
fn a_disconnected_subscriber_leaves_the_index() {
    let server = TestServer::start(1, None);
    let mut ws = server.ws("/ws");
    ws.subscribe("x");
    assert_eq!(server.metric("subscriptions"), 1);
    drop(ws);
    server.wait_for("the subscription to go", || {
        server.metric("subscriptions") == 0
    });
    assert_eq!(server.metric("topics"), 0);
    let (_, body) = server.http("POST", "/publish", Some(r#"{"topic":"x","payload":1}"#));
    assert_eq!(body, r#"{"delivered_shards":0}"#);
}
