//! Runs short scenarios with the real `ringcast-load` binary against a real
//! `ringcast` started on port 0 (`common`), and checks that every expected
//! delivery arrived.

mod common;

use common::{assert_complete, run_load, start_server};
use serde_json::Value;

/// `assert_complete`, with `per_topic` subscribers on every topic.
fn assert_all_delivered(r: &Value, subscribers: u64, per_topic: u64) {
    assert_complete(r, subscribers);
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    assert_eq!(n("expected"), n("published") * per_topic, "{r:#}");
}

#[test]
fn every_http_published_message_reaches_every_subscriber_of_its_topic() {
    let server = start_server();
    let r = run_load(
        &server,
        &[
            "--subscribers",
            "200",
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
    assert_all_delivered(&r, 200, 20);
    assert_eq!(r["publish_rejected"].as_u64(), Some(0), "{r:#}");
}

#[test]
fn every_websocket_published_message_reaches_every_subscriber_of_its_topic() {
    if std::env::var("RINGCAST_LOAD_TARGET").is_ok() {
        // Peers reached through RINGCAST_LOAD_TARGET may not implement client publish.
        return;
    }
    let server = start_server();
    let r = run_load(
        &server,
        &[
            "--subscribers",
            "100",
            "--topics",
            "60",
            "--dist",
            "hot",
            "--publishers",
            "2",
            "--rate",
            "300",
            "--publish-via",
            "ws",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--drain",
            "5s",
        ],
    );
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    assert_eq!(r["connections"]["ready"].as_u64(), Some(100), "{r:#}");
    assert!(n("published") > 0, "{r:#}");
    assert_eq!(n("delivered"), n("expected"), "{r:#}");
    assert_eq!(n("missing"), 0, "{r:#}");
    assert_eq!(n("duplicates"), 0, "{r:#}");
}

#[test]
fn the_tokio_receive_path_counts_the_same_deliveries() {
    let server = start_server();
    let r = run_load(
        &server,
        &[
            "--recv-path",
            "tokio",
            "--subscribers",
            "100",
            "--topics",
            "5",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--drain",
            "5s",
        ],
    );
    assert_all_delivered(&r, 100, 20);
    assert_eq!(r["client"]["recv_path"].as_str(), Some("tokio"), "{r:#}");
}

#[test]
fn subscribers_split_over_child_processes_are_counted_once() {
    let server = start_server();
    let pid = server.child.as_ref().map(|c| c.id().to_string());
    let mut extra = vec![
        "--procs",
        "3",
        "--threads",
        "2",
        "--recv-batch-us",
        "200",
        "--subscribers",
        "151",
        "--topics",
        "7",
        "--rate",
        "140",
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
    assert_complete(&r, 151);
    assert_eq!(r["client"]["procs"].as_u64(), Some(3), "{r:#}");
    assert_eq!(
        r["latency_ms"]["count"].as_u64(),
        r["measured_delivered"].as_u64(),
        "merged histograms hold every measured delivery: {r:#}"
    );
    assert!(r["client_cpu_s"].as_f64().is_some(), "{r:#}");
    if pid.is_some() {
        assert!(r["server_cpu_s"].as_f64().is_some(), "{r:#}");
    }
}
