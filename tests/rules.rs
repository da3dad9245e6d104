//! Topic rules from the config file: pattern priority and what each rule allows.
mod common;

use std::time::Duration;

use common::TestServer;

const RULES: &str = r#"
[[rules]]
pattern = "room:*"
client_publish = false

[[rules]]
pattern = "room:open:*"
client_publish = true

[[rules]]
pattern = "room:open:lobby"
client_publish = false

[[rules]]
pattern = "members:*"
client_publish = true
require_auth = true
"#;

/// Subscribes a listener and a talker to `topic`, has the talker publish, and
/// reports whether the listener got it (and the talker's error, if any).
fn client_publish_outcome(server: &TestServer, topic: &str) -> (bool, Option<String>) {
    let mut listener = server.ws("/ws?user_id=l");
    let mut talker = server.ws("/ws?user_id=t");
    listener.subscribe(topic);
    talker.subscribe(topic);
    talker.send_text(&format!(
        r#"{{"type":"message","topic":"{topic}","payload":"x"}}"#
    ));
    let delivered = !listener.is_silent_for(Duration::from_millis(300));
    let reply = talker.recv_json();
    let error = (reply["type"] == "error").then(|| reply["message"].as_str().unwrap().to_string());
    (delivered, error)
}

#[test]
fn an_exact_pattern_beats_a_prefix_and_a_longer_prefix_beats_a_shorter() {
    let server = TestServer::start(2, Some(RULES));
    let (delivered, error) = client_publish_outcome(&server, "room:open:lobby");
    assert!(
        !delivered && error.unwrap().contains("may not publish"),
        "exact rule forbids"
    );
    let (delivered, error) = client_publish_outcome(&server, "room:open:7");
    assert!(delivered && error.is_none(), "room:open:* allows");
    let (delivered, error) = client_publish_outcome(&server, "room:7");
    assert!(
        !delivered && error.unwrap().contains("may not publish"),
        "room:* forbids"
    );
}

#[test]
fn http_publish_is_allowed_where_clients_may_not_publish() {
    let server = TestServer::start(1, Some(RULES));
    let mut ws = server.ws("/ws");
    ws.subscribe("room:1");
    assert_eq!(server.publish(r#"{"topic":"room:1","payload":1}"#), 202);
    assert_eq!(ws.recv_json()["payload"], 1);
}

#[test]
fn a_topic_no_rule_matches_is_refused() {
    let server = TestServer::start(1, Some(RULES));
    let mut ws = server.ws("/ws?user_id=u");
    ws.send_text(r#"{"type":"subscribe","topic":"elsewhere"}"#);
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "error");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("no rule allows topic `elsewhere`"),
        "{reply}"
    );
}

#[test]
fn a_require_auth_rule_refuses_anonymous_subscribers() {
    let server = TestServer::start(1, Some(RULES));
    let mut anonymous = server.ws("/ws");
    anonymous.send_text(r#"{"type":"subscribe","topic":"members:news"}"#);
    let reply = anonymous.recv_json();
    assert_eq!(reply["type"], "error");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("requires an authenticated user"),
        "{reply}"
    );
    let mut named = server.ws("/ws?user_id=ann");
    named.subscribe("members:news");
}

#[test]
fn rule_errors_in_the_config_stop_the_server_with_a_message() {
    let dir = std::env::temp_dir().join(format!("ringcast-bad-rules-{}.toml", std::process::id()));
    std::fs::write(&dir, "[[rules]]\npattern = \"a*b\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("a*b"), "{stderr}");
}
