//! What every ringcast-load integration test needs: a real `ringcast` on
//! port 0 (optionally with a TOML config), the real `ringcast-load` binary
//! run against it with `--json`, and the check that every expected delivery
//! arrived once.
//!
//! The server binary comes from `RINGCAST_BIN`, else `<target>/debug/ringcast`
//! (CI runs `cargo build --workspace` first). `RINGCAST_LOAD_TARGET=host:port`
//! points the tests at an already running server speaking ringcast's protocol
//! instead (e.g. the axum peer relay).
#![allow(dead_code)] // each test file uses its own part

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A server process killed when the test ends, however it ends.
pub(crate) struct Server {
    pub(crate) child: Option<Child>,
    pub(crate) addr: String,
    /// The config file, removed with the server.
    config: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = &self.config {
            let _ = std::fs::remove_file(p);
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

/// Starts ringcast with two shards and its built-in rules.
pub(crate) fn start_server() -> Server {
    start_server_with(None)
}

/// Starts ringcast with two shards and, if given, this TOML config.
pub(crate) fn start_server_with(config_toml: Option<&str>) -> Server {
    if let Ok(addr) = std::env::var("RINGCAST_LOAD_TARGET") {
        return Server {
            child: None,
            addr,
            config: None,
        };
    }
    let bin = ringcast_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["--listen", "127.0.0.1:0", "--shards", "2"]);
    let config = config_toml.map(|text| {
        let path = std::env::temp_dir().join(format!(
            "ringcast-load-test-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, text).expect("write the server config");
        cmd.arg("--config").arg(&path);
        path
    });
    let mut server = spawn_listening(cmd, &bin);
    server.config = config;
    server
}

/// Starts `ringcast-floor` (this package's floor server) on port 0.
pub(crate) fn start_floor() -> Server {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ringcast-floor"));
    let mut cmd = Command::new(&bin);
    cmd.arg("127.0.0.1:0");
    spawn_listening(cmd, &bin)
}

/// Spawns a server that prints `listening on ADDR` once bound.
fn spawn_listening(mut cmd: Command, bin: &std::path::Path) -> Server {
    let mut child = cmd
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
        config: None,
    }
}

/// Runs ringcast-load against `server` with `extra` arguments; its JSON report.
pub(crate) fn run_load(server: &Server, extra: &[&str]) -> Value {
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
pub(crate) fn assert_complete(r: &Value, subscribers: u64) {
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

/// Subscribes a bare WebSocket client to `topic` and returns the text of
/// the server's first frame (its `subscribed` reply), to learn what the
/// server speaks before a test relies on it.
pub(crate) fn first_reply(addr: &str, topic: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("upgrade response");
        buf.push(byte[0]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 101"), "upgrade refused");
    let msg = format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#);
    // A masked client text frame (RFC 6455 section 5.3), mask 0.
    let mut frame = vec![0x81, 0x80 | msg.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(msg.as_bytes());
    s.write_all(&frame).unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("a reply frame");
    let len = match head[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            usize::from(u16::from_be_bytes(l))
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    String::from_utf8_lossy(&payload).into_owned()
}
