//! Pusher's own server SDK (npm `pusher`, pinned in tests/pusher) signs
//! HTTP API requests, channel authorizations and a user sign-in
//! (`tests/pusher/sdk_signatures.mjs`); ringcast's checks (`pusher::sign`)
//! accept every one of them, and refuse each once it is changed. Pusher's
//! Python library (PyPI `pusher`) drives a node's HTTP API as a Python
//! backend would (`tests/py/pusher_api.py`). `scripts/test.sh` installs
//! both (`npm ci --prefix tests/pusher`, `pip install pusher`).
mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use ringcast::pusher::sign::{
    channel_authorized, check_api_request, user_authenticated, ApiAuthError,
};
use ringcast::pusher::App;
use serde_json::Value;

fn app() -> App {
    App {
        id: "4711".into(),
        key: "test-key-1".into(),
        secret: "a secret, not short".into(),
        client_events: false,
        max_connections: None,
        max_event_bytes: 10_240,
        max_presence_members: 100,
        webhook_url: None,
        webhook_events: Vec::new(),
    }
}

fn signed_by_the_sdk() -> Value {
    let dir = format!("{}/tests/pusher", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/pusher")).exists(),
        "tests/pusher/node_modules is missing: run ./scripts/test.sh (npm ci --prefix tests/pusher)"
    );
    let app = app();
    let out = Command::new("node")
        .current_dir(&dir)
        .args(["sdk_signatures.mjs", &app.id, &app.key, &app.secret])
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn every_signature_of_pushers_server_sdk_is_accepted_and_a_changed_one_refused() {
    let app = app();
    let signed = signed_by_the_sdk();
    let requests = signed["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 5, "{signed}");
    for request in requests {
        let method = request["method"].as_str().unwrap();
        let (path, query) = request["url"].as_str().unwrap().split_once('?').unwrap();
        let body = request["body"].as_str().unwrap().as_bytes();
        let check = |path: &str, query: &str, body: &[u8]| {
            check_api_request(&app, method, path, query, body, now())
        };
        assert_eq!(check(path, query, body), Ok(()), "{request}");
        assert_eq!(
            check(&path.replace("4711", "4712"), query, body),
            Err(ApiAuthError::Signature),
            "another app's path: {request}"
        );
        if body.is_empty() {
            let extra = format!("{query}&info=user_count");
            assert_eq!(check(path, &extra, body), Err(ApiAuthError::Signature));
        } else {
            let mut changed = body.to_vec();
            changed[body.len() / 2] ^= 1;
            assert_eq!(check(path, query, &changed), Err(ApiAuthError::BodyMd5));
        }
    }

    let private = signed["private"]["auth"].as_str().unwrap();
    assert!(channel_authorized(
        &app,
        "1234.5678",
        "private-room-2",
        None,
        private
    ));
    assert!(!channel_authorized(
        &app,
        "1234.5679",
        "private-room-2",
        None,
        private
    ));

    let presence = &signed["presence"];
    let data = presence["channel_data"].as_str().unwrap();
    let auth = presence["auth"].as_str().unwrap();
    assert!(channel_authorized(
        &app,
        "1234.5678",
        "presence-b",
        Some(data),
        auth
    ));
    let other_user = data.replace("\"ann\"", "\"bob\"");
    assert!(!channel_authorized(
        &app,
        "1234.5678",
        "presence-b",
        Some(&other_user),
        auth
    ));

    let user = &signed["user"];
    let user_data = user["user_data"].as_str().unwrap();
    let auth = user["auth"].as_str().unwrap();
    assert!(user_authenticated(&app, "1234.5678", user_data, auth));
    assert!(!user_authenticated(
        &app,
        "1234.5678",
        &user_data.replace("Ann", "Bob"),
        auth
    ));
}

/// PyPI `pusher` against a node: trigger, trigger_batch and send_to_user
/// reach a raw subscriber in order, channels_info, channel_info and
/// users_info answer as Pusher's do (users of a public channel: 400), a
/// request signed with another secret is 401, and
/// terminate_user_connections (which this library posts to
/// `/users/{id}/terminate_connections`) closes the user's connection
/// with 4009.
#[test]
fn pushers_python_library_drives_the_http_api() {
    let node = common::TestServer::start(
        2,
        Some("[[apps]]\nid = \"4711\"\nkey = \"app-key\"\nsecret = \"app-secret\"\n"),
    );
    let script = format!("{}/tests/py/pusher_api.py", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&script)
        .arg("127.0.0.1")
        .arg(node.addr.port().to_string())
        .args(["4711", "app-key", "app-secret"])
        .output()
        .expect("python3 runs (scripts/test.sh installs pusher and websockets)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    let expected = serde_json::json!({
        "trigger": {},
        "batch": {},
        "received": [
            ["news", "greeting", "{\"text\": \"hi\"}"],
            ["news", "batched", "1"],
            ["private-orders", "batched", "{\"n\": 2}"],
            ["#server-to-user-ann", "hello", "{\"to\": \"ann\"}"],
        ],
        "channels": {"channels": {"news": {}, "private-orders": {}}},
        "channel": {"occupied": true, "subscription_count": 1},
        "users": 400,
        "forged": 401,
        "terminate": {},
        "terminated": 4009,
        "closed": 4009,
    });
    assert_eq!(result, expected);
}
