//! The library example `examples/chat_room.rs`, run as a user would: hooks that
//! reject a join, rewrite messages, and announce joins and leaves.
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::TestServer;

fn example() -> TestServer {
    // Integration tests live in target/<profile>/deps; cargo builds examples beside them.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path: PathBuf = profile_dir.join("examples").join("chat_room");
    assert!(
        path.exists(),
        "{} missing: cargo test builds examples; run it through cargo",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.arg("127.0.0.1:0");
    TestServer::spawn(cmd, None)
}

#[test]
fn the_chat_room_example_rewrites_messages_and_announces_joins_and_leaves() {
    let server = example();
    let mut ann = server.ws("/ws?user_id=ann");
    ann.subscribe("room:lobby");
    assert_eq!(ann.recv_json()["event"], "join");
    let mut ben = server.ws("/ws?user_id=ben");
    ben.subscribe("room:lobby");
    let join = ann.recv_json();
    assert_eq!(
        (join["event"].as_str(), join["payload"]["user_id"].as_str()),
        (Some("join"), Some("ben"))
    );
    assert_eq!(join["payload"]["count"], 2);
    assert_eq!(ben.recv_json()["event"], "join");

    ann.send_text(r#"{"type":"message","topic":"room:lobby","event":"x","payload":{"text":"  hello  ","extra":1}}"#);
    for ws in [&mut ann, &mut ben] {
        let say = ws.recv_json();
        assert_eq!(say["event"], "say");
        assert_eq!(
            say["payload"],
            serde_json::json!({"from":"ann","text":"hello"}),
            "rewritten by the hook"
        );
    }
    ann.send_text(r#"{"type":"message","topic":"room:lobby","payload":{"text":"   "}}"#);
    assert!(
        ben.is_silent_for(Duration::from_millis(200)),
        "empty lines are dropped"
    );
    ann.send_text(r#"{"type":"message","topic":"room:lobby","payload":42}"#);
    assert_eq!(
        ann.recv_json()["type"],
        "error",
        "malformed chat messages are rejected"
    );

    drop(ben);
    let leave = ann.recv_json();
    assert_eq!(
        (leave["event"].as_str(), leave["payload"]["count"].as_u64()),
        (Some("leave"), Some(1))
    );
}

#[test]
fn the_chat_room_example_rejects_anonymous_and_closed_room_joins() {
    let server = example();
    let mut anonymous = server.ws("/ws");
    anonymous.send_text(r#"{"type":"subscribe","topic":"room:lobby"}"#);
    let refusal = anonymous.recv_json();
    assert_eq!(refusal["type"], "error");
    assert!(refusal["message"].as_str().unwrap().contains("with a name"));
    let mut ann = server.ws("/ws?user_id=ann");
    ann.send_text(r#"{"type":"subscribe","topic":"room:closed"}"#);
    let refusal = ann.recv_json();
    assert_eq!(refusal["type"], "error");
    assert!(
        refusal["message"].as_str().unwrap().contains("closed"),
        "exact pattern wins over room:*"
    );
}
