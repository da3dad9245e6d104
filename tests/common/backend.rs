//! The fake application backend (`tests/py/backend.py`): a Python HTTP
//! server that answers proxy calls by name and records webhook events,
//! checking each POST's signature; and the probes of what it recorded.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestServer;

/// The secret the backend checks webhook signatures with.
pub const SECRET: &str = "webhook-test-secret";

/// Starts the fake backend.
pub fn backend() -> TestServer {
    let script = format!("{}/tests/py/backend.py", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(SECRET);
    TestServer::spawn(cmd, None)
}

/// The `[webhooks]` table of a node reporting to `backend`, with `more` keys.
pub fn webhooks_table(backend: &TestServer, more: &str) -> String {
    format!(
        "[webhooks]\nurl = \"http://{}/hook\"\nsecret = \"{SECRET}\"\n{more}\n",
        backend.addr
    )
}

/// What the backend has recorded.
pub fn recorded(backend: &TestServer) -> Value {
    let (status, body) = backend.http("GET", "/events", None);
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["bad_signatures"], 0, "every POST is signed: {view}");
    view
}

/// The recorded events as (name, topic or user, or topic/user for members).
pub fn events(backend: &TestServer) -> Vec<(String, String)> {
    recorded(backend)["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["time_ms"].as_u64().is_some_and(|t| t > 0), "{e}");
            let name = match (e["topic"].as_str(), e["user"].as_str()) {
                (Some(topic), Some(user)) => format!("{topic}/{user}"),
                (Some(name), None) | (None, Some(name)) => name.to_string(),
                (None, None) => panic!("an event about nothing: {e}"),
            };
            (e["name"].as_str().unwrap().to_string(), name)
        })
        .collect()
}

pub fn event(name: &str, subject: &str) -> (String, String) {
    (name.to_string(), subject.to_string())
}

/// Waits until the backend has recorded `expected` exactly (a later event
/// fails it).
pub fn wait_for_events(backend: &TestServer, expected: &[(String, String)]) {
    wait_for_events_within(backend, expected, Duration::from_secs(10));
}

/// The same, waiting up to `wait`.
pub fn wait_for_events_within(backend: &TestServer, expected: &[(String, String)], wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let seen = events(backend);
        if seen == expected {
            return;
        }
        assert!(
            seen.len() < expected.len() || seen[..expected.len()] != *expected,
            "more or other events than expected: {seen:?}, expected {expected:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the backend got {seen:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nothing more arrives within `quiet`.
pub fn assert_no_more(backend: &TestServer, expected: &[(String, String)], quiet: Duration) {
    std::thread::sleep(quiet);
    assert_eq!(events(backend), expected, "no event after these");
}
