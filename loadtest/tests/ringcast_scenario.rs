//! Runs short scenarios with the real `ringcast-load` binary against a real
//! `ringcast` started on port 0, and checks that every expected delivery arrived.
//!
//! The server binary comes from `RINGCAST_BIN`, else `<target>/debug/ringcast`
//! (CI runs `cargo build --workspace` first). `RINGCAST_LOAD_TARGET=host:port`
//! points the tests at an already running server speaking ringcast's protocol
//! instead (e.g. the axum peer relay).

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A server process killed when the test ends, however it ends.
struct Server {
    child: Option<Child>,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ringcast_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RINGCAST_BIN") {
        return PathBuf::from(p);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut candidates = vec![workspace.join("target/debug/ringcast")];
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        candidates.insert(0, PathBuf::from(t).join("debug/ringcast"));
    }
    candidates.into_iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "ringcast binary not found (looked in <workspace>/target/debug and $CARGO_TARGET_DIR/debug); \
             run `cargo build --workspace` first or set RINGCAST_BIN=/path/to/ringcast"
        )
    })
}

fn start_server() -> Server {
    if let Ok(addr) = std::env::var("RINGCAST_LOAD_TARGET") {
        return Server { child: None, addr };
    }
    let bin = ringcast_bin();
    let mut child = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(a) = line.trim().strip_prefix("listening on ") {
                    break a.trim().to_string();
                }
            }
            _ => {
                let _ = child.kill();
                panic!(
                    "{} exited without printing `listening on ADDR`",
                    bin.display()
                );
            }
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child: Some(child),
        addr,
    }
}

fn run_load(server: &Server, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-load"))
        .args(["--host", &server.addr, "--json", "--quiet"])
        .args(extra)
        .output()
        .expect("run ringcast-load");
    assert!(
        out.status.success(),
        "ringcast-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ringcast-load prints one JSON object")
}

/// Every subscriber ready, something published, and every expected delivery
/// arrived exactly once, without connection errors.
fn assert_complete(r: &Value, subscribers: u64) {
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {r:#}"))
    };
    assert_eq!(
        r["connections"]["ready"].as_u64(),
        Some(subscribers),
        "{r:#}"
    );
    assert!(n("published") > 0, "{r:#}");
    assert_eq!(n("delivered"), n("expected"), "{r:#}");
    assert_eq!(n("missing"), 0, "{r:#}");
    assert_eq!(n("duplicates"), 0, "{r:#}");
    assert_eq!(n("misrouted"), 0, "{r:#}");
    assert_eq!(n("connection_errors"), 0, "{r:#}");
    assert!(r["latency_ms"]["count"].as_u64().unwrap_or(0) > 0, "{r:#}");
}

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
