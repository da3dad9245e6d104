//! `--protocol pusher` against a real `ringcast` serving one Pusher app
//! (`[[apps]]`): subscribers on `/app/{key}` with `pusher:subscribe`,
//! publishes through the signed HTTP API, and every expected delivery
//! arriving once.

mod common;

use common::{assert_complete, run_load, start_server_with};
use serde_json::Value;

/// The app `--pusher-app` defaults to.
const APPS: &str = r#"
[[apps]]
id = "4711"
key = "app-key"
secret = "app-secret"
client_events = true
"#;

/// The server under test: ringcast with the app, unless
/// `RINGCAST_LOAD_TARGET` names a server that may not serve it.
fn pusher_server() -> Option<common::Server> {
    if std::env::var("RINGCAST_LOAD_TARGET").is_ok() {
        return None;
    }
    Some(start_server_with(Some(APPS)))
}

fn assert_pusher_run(r: &Value, subscribers: u64, per_topic: u64) {
    assert_complete(r, subscribers);
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    assert_eq!(n("expected"), n("published") * per_topic, "{r:#}");
    assert_eq!(r["publish_rejected"].as_u64(), Some(0), "{r:#}");
    assert_eq!(r["scenario"]["protocol"].as_str(), Some("pusher"), "{r:#}");
    assert!(
        r["scenario"]["sub_url"]
            .as_str()
            .is_some_and(|u| u.contains("/app/app-key?protocol=7")),
        "{r:#}"
    );
}

#[test]
fn every_pusher_event_reaches_every_subscriber_of_its_channel() {
    let Some(server) = pusher_server() else {
        return;
    };
    let r = run_load(
        &server,
        &[
            "--protocol",
            "pusher",
            "--topic-prefix",
            "t",
            "--subscribers",
            "100",
            "--topics",
            "10",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--drain",
            "5s",
        ],
    );
    assert_pusher_run(&r, 100, 10);
}

#[test]
fn pusher_subscribers_in_child_processes_on_the_tokio_path_count_the_same() {
    let Some(server) = pusher_server() else {
        return;
    };
    let pid = server.child.as_ref().map(|c| c.id().to_string());
    let mut extra = vec![
        "--protocol",
        "pusher",
        "--pusher-app",
        "4711:app-key:app-secret",
        "--recv-path",
        "tokio",
        "--procs",
        "2",
        "--publishers",
        "2",
        "--pipeline-depth",
        "8",
        "--subscribers",
        "60",
        "--topics",
        "3",
        "--rate",
        "150",
        "--duration",
        "1s",
        "--warmup",
        "300ms",
        "--drain",
        "5s",
    ];
    if let Some(pid) = pid.as_deref() {
        extra.extend(["--server-pid", pid, "--no-perf"]);
    }
    let r = run_load(&server, &extra);
    assert_pusher_run(&r, 60, 20);
    if pid.is_some() {
        assert!(r["server_cpu_s"].as_f64().is_some(), "{r:#}");
    }
}

#[test]
fn a_wrong_secret_is_rejected_not_delivered() {
    let Some(server) = pusher_server() else {
        return;
    };
    let r = run_load(
        &server,
        &[
            "--protocol",
            "pusher",
            "--pusher-app",
            "4711:app-key:not-the-secret",
            "--subscribers",
            "10",
            "--topics",
            "2",
            "--rate",
            "50",
            "--duration",
            "500ms",
            "--warmup",
            "200ms",
            "--drain",
            "2s",
        ],
    );
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    assert_eq!(r["connections"]["ready"].as_u64(), Some(10), "{r:#}");
    assert!(n("publish_rejected") > 0, "{r:#}");
    assert_eq!(n("published"), 0, "{r:#}");
    assert_eq!(n("delivered"), 0, "{r:#}");
}
