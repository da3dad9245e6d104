//! Presence across shards, join/leave announcements, and presence queries.
mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::Value;

const RULES: &str = r#"
[[rules]]
pattern = "room:*"
client_publish = true
presence = true
join_leave = true

[[rules]]
pattern = "quiet:*"
"#;

fn presence(server: &TestServer, topic: &str) -> Value {
    let (status, body) = server.http("GET", &format!("/topics/{topic}/presence"), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn count(server: &TestServer, topic: &str) -> u64 {
    presence(server, topic)["count"].as_u64().unwrap()
}

#[test]
fn presence_counts_rise_and_fall_across_two_shards_including_an_abrupt_reset() {
    let server = TestServer::start(2, Some(RULES));
    let mut members: Vec<_> = (0..10)
        .map(|i| server.ws(&format!("/ws?user_id=user{i}")))
        .collect();
    for ws in &mut members {
        ws.subscribe("room:1");
    }
    assert!(server.shard_metric("websockets", 0) > 0 && server.shard_metric("websockets", 1) > 0);
    let everyone = presence(&server, "room:1");
    assert_eq!(everyone["count"], 10);
    let mut users: Vec<String> = everyone["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["meta"]["user_id"].as_str().unwrap().to_string())
        .collect();
    users.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
    expected.sort();
    assert_eq!(users, expected);
    assert!(everyone["members"][0]["conn_id"].as_str().is_some());

    // A polite unsubscribe, a close, and an abrupt TCP reset.
    members[0].send_text(r#"{"type":"unsubscribe","topic":"room:1"}"#);
    drop(members.remove(1));
    let reset = members.remove(1);
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = reset.0.get_ref() {
        socket2::SockRef::from(stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop(reset);
    server.wait_for("presence to drop to 7", || count(&server, "room:1") == 7);
    drop(members);
    server.wait_for("presence to drop to 0", || count(&server, "room:1") == 0);
    assert_eq!(server.metric("subscriptions"), 0, "no leak");
}

#[test]
fn join_and_leave_events_carry_the_user_and_the_new_count() {
    let server = TestServer::start(2, Some(RULES));
    let mut watcher = server.ws("/ws?user_id=watcher");
    watcher.subscribe("room:events");
    let own = watcher.recv_json();
    assert_eq!(
        (own["event"].as_str(), own["payload"]["user_id"].as_str()),
        (Some("join"), Some("watcher"))
    );
    assert_eq!(own["payload"]["count"], 1);
    let mut guests: Vec<_> = (0..4)
        .map(|i| server.ws(&format!("/ws?user_id=guest{i}")))
        .collect();
    for (i, guest) in guests.iter_mut().enumerate() {
        guest.subscribe("room:events");
        let join = watcher.recv_json();
        assert_eq!(join["type"], "push");
        assert_eq!(join["event"], "join");
        assert_eq!(join["payload"]["user_id"], format!("guest{i}"));
        assert_eq!(join["payload"]["count"], i + 2);
    }
    drop(guests.pop());
    let leave = watcher.recv_json();
    assert_eq!(
        (
            leave["event"].as_str(),
            leave["payload"]["user_id"].as_str()
        ),
        (Some("leave"), Some("guest3"))
    );
    assert_eq!(leave["payload"]["count"], 4);
}

#[test]
fn presence_is_answered_over_the_socket_too() {
    let server = TestServer::start(2, Some(RULES));
    let mut a = server.ws("/ws?user_id=a");
    let mut b = server.ws("/ws?user_id=b");
    for ws in [&mut a, &mut b] {
        ws.subscribe("room:q");
    }
    a.send_text(r#"{"type":"presence","topic":"room:q"}"#);
    let reply = loop {
        let msg = a.recv_json();
        if msg["type"] == "presence" {
            break msg;
        }
    };
    assert_eq!(reply["topic"], "room:q");
    assert_eq!(reply["count"], 2);
    assert_eq!(reply["members"].as_array().unwrap().len(), 2);
}

#[test]
fn presence_of_an_untracked_topic_is_404_and_an_error_over_the_socket() {
    let server = TestServer::start(1, Some(RULES));
    assert_eq!(server.http("GET", "/topics/quiet:1/presence", None).0, 404);
    let mut ws = server.ws("/ws");
    ws.send_text(r#"{"type":"presence","topic":"quiet:1"}"#);
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "error");
    assert!(reply["message"].as_str().unwrap().contains("not tracked"));
}

#[test]
fn the_default_rule_tracks_presence_without_announcing() {
    let server = TestServer::start(2, None);
    let mut a = server.ws("/ws?user_id=a");
    a.subscribe("anything");
    let mut b = server.ws("/ws");
    b.subscribe("anything");
    assert_eq!(count(&server, "anything"), 2);
    assert!(
        a.is_silent_for(Duration::from_millis(200)),
        "no join events by default"
    );
}
