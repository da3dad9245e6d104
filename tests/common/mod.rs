//! Test harness: starts the real `ringcast` binary on port 0 and talks to it
//! over real sockets with tungstenite's blocking client and raw HTTP.
#![allow(dead_code, unreachable_pub)]

pub mod backend;
pub mod browser;
pub mod cut_proxy;
pub mod pusher;
pub mod redis;
pub mod sse;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Every blocking read in the tests gives up after this, so a bug fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub child: Child,
    _config: Option<tempfile_path::TempPath>,
}

pub mod tempfile_path {
    /// A file removed when dropped.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl TestServer {
    /// Starts ringcast with `shards` shards and an optional TOML config.
    pub fn start(shards: usize, config_toml: Option<&str>) -> TestServer {
        // RINGCAST_TEST_BIN runs the tests against another build (an older
        // commit's binary, to see a regression test fail before its fix).
        let bin = std::env::var("RINGCAST_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringcast").to_string());
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--shards", &shards.to_string()]);
        let config = config_toml.map(|text| {
            let path = std::env::temp_dir().join(format!(
                "ringcast-test-{}-{}.toml",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(&path);
            tempfile_path::TempPath(path)
        });
        TestServer::spawn(cmd, config)
    }

    /// Starts a program that prints `listening on ADDR` first (an example).
    /// Its stdin is a pipe held open for the server's lifetime.
    pub fn spawn(mut cmd: Command, config: Option<tempfile_path::TempPath>) -> TestServer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or("ringcast=warn".into()),
            )
            .spawn()
            .expect("server program starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        TestServer {
            addr,
            child,
            _config: config,
        }
    }

    /// Tries a WebSocket upgrade; returns the HTTP status of a refusal, or 101.
    pub fn upgrade_status(&self, path: &str, extra_headers: &str) -> u16 {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12]).parse().unwrap()
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Opens a WebSocket on `path`.
    pub fn ws(&self, path: &str) -> Ws {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (socket, _) =
            tungstenite::client::client(self.ws_url(path), MaybeTlsStream::Plain(stream))
                .unwrap_or_else(|e| panic!("upgrade on {path} failed: {e}"));
        Ws(socket)
    }

    /// One HTTP request on a fresh connection; returns (status, body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.request(method, path, body, "")
    }

    /// Same, with an `Authorization: Bearer` header.
    pub fn http_with_key(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        key: &str,
    ) -> (u16, String) {
        self.request(
            method,
            path,
            body,
            &format!("Authorization: Bearer {key}\r\n"),
        )
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        extra_headers: &str,
    ) -> (u16, String) {
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        parse_response(&self.raw(request.as_bytes()))
    }

    /// Publishes over HTTP and returns the status.
    pub fn publish(&self, json: &str) -> u16 {
        self.http("POST", "/publish", Some(json)).0
    }

    /// Sends raw bytes, reads until the server closes, returns what came back.
    pub fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The resident memory of the server's process; panics if it is gone.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id()).expect("the server is alive")
    }

    /// The server's anonymous resident memory, counted page by page
    /// (`/proc/PID/smaps_rollup`); VmRSS is read from per-cpu counters that
    /// can lag by hundreds of KiB.
    pub fn anon_bytes(&self) -> u64 {
        let pid = self.child.id();
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .expect("the server is alive");
        proc_kib_field(&rollup, "Anonymous:").expect("smaps_rollup has an Anonymous line")
    }

    /// Sum of one metric over shards, from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.http("GET", "/metrics", None);
        let prefix = format!("ringcast_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// Value of one metric on one shard.
    pub fn shard_metric(&self, name: &str, shard: usize) -> u64 {
        let (_, text) = self.http("GET", "/metrics", None);
        let prefix = format!("ringcast_{name}{{shard=\"{shard}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} of shard {shard} missing"))
    }

    /// Writes `frames` on `stream` again and again without reading, until
    /// more than twice `budget` past what the server's socket can hold
    /// unsent has gone or a write fails (the server dropped it; a write
    /// timeout ends the flood if it stops reading instead), then waits for
    /// this server's first slow-consumer close. Only then may the caller
    /// read: bytes written can still wait in the kernels' buffers, and a
    /// client reading meanwhile drains its pushes as fast as they are made,
    /// so no close would be due.
    pub fn flood_until_closed(&self, stream: &mut TcpStream, frames: &[u8], budget: usize) {
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let flood_bytes = 2 * budget + kernel_send_buffer_max();
        let mut sent = 0;
        while sent < flood_bytes && stream.write_all(frames).is_ok() {
            sent += frames.len();
        }
        self.wait_for("the flooder to be closed as a slow consumer", || {
            self.metric("slow_consumer_disconnects_total") == 1
        });
    }

    /// Waits until `cond` holds, polling; panics after `IO_TIMEOUT`.
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) {
        self.wait_for_every(what, Duration::from_millis(20), cond);
    }

    /// Waits until `cond` holds, polling every `every` (a poll that is a
    /// request the server must see seldom); panics after `IO_TIMEOUT`.
    pub fn wait_for_every(&self, what: &str, every: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < IO_TIMEOUT, "timed out waiting for {what}");
            std::thread::sleep(every);
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sends SIGTERM and waits (up to `IO_TIMEOUT`) for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < IO_TIMEOUT,
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`TestServer::raw_ws`] offering `extensions` (`Sec-WebSocket-Extensions`).
    pub fn raw_ws_offering(&self, path: &str, extensions: &str) -> TcpStream {
        self.raw_ws_with(
            path,
            None,
            &format!("Sec-WebSocket-Extensions: {extensions}\r\n"),
        )
    }

    /// A raw WebSocket handshake on a fresh socket (for clients that must
    /// not read, or must read byte by byte); returns the socket after the 101.
    pub fn raw_ws(&self, path: &str, recv_buffer: Option<usize>) -> TcpStream {
        self.raw_ws_with(path, recv_buffer, "")
    }

    fn raw_ws_with(&self, path: &str, recv_buffer: Option<usize>, extra: &str) -> TcpStream {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(bytes) = recv_buffer {
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        socket.connect(&self.addr.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "upgrade refused: {}",
            String::from_utf8_lossy(&head)
        );
        stream
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tests/py/{script} ADDR`, a third-party client written in Python
/// (`scripts/test.sh` installs what they import), and checks that it
/// exits 0 and prints `all checks passed`.
pub fn run_python(script: &str, addr: SocketAddr) {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg(&path)
        .arg(addr.to_string())
        .output()
        .expect("python3 runs (scripts/test.sh installs the packages the scripts use)");
    assert!(
        output.status.success(),
        "{script} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("all checks passed"));
}

/// The resident memory (VmRSS) of process `pid`, if it is running.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    proc_kib_field(&status, "VmRSS:")
}

/// A `/proc` file's `Field:   N kB` line, in bytes.
fn proc_kib_field(text: &str, field: &str) -> Option<u64> {
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kb * 1024)
}

pub fn parse_response(response: &str) -> (u16, String) {
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub struct Ws(pub WebSocket<MaybeTlsStream<TcpStream>>);

impl Ws {
    pub fn send_text(&mut self, text: &str) {
        self.0.send(Message::text(text)).unwrap();
    }

    /// Next text message, skipping pings; panics on close or timeout.
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.0.read().unwrap_or_else(|e| panic!("read failed: {e}")) {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Next text message parsed as JSON.
    pub fn recv_json(&mut self) -> serde_json::Value {
        let text = self.recv_text();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"))
    }

    pub fn subscribe(&mut self, topic: &str) {
        self.send_text(&format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#));
        let reply = self.recv_json();
        assert_eq!(
            reply,
            serde_json::json!({"type":"subscribed","topic":topic})
        );
    }

    /// Subscribes on a node that cannot reach its cluster: the reply says so.
    pub fn subscribe_degraded(&mut self, topic: &str) {
        self.send_text(&format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#));
        let reply = self.recv_json();
        assert_eq!(
            reply,
            serde_json::json!({"type":"subscribed","topic":topic,"cluster":"degraded"})
        );
    }

    /// Reads until the server's close frame and returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.0.read() {
                Ok(Message::Close(frame)) => {
                    // tungstenite queued the close reply; send it so the server can finish.
                    let _ = self.0.flush();
                    return frame.map_or(u16::from(CloseCode::Status), |f| u16::from(f.code));
                }
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    /// True if no message arrives within `wait`.
    pub fn is_silent_for(&mut self, wait: Duration) -> bool {
        if let MaybeTlsStream::Plain(s) = self.0.get_mut() {
            s.set_read_timeout(Some(wait)).unwrap();
        }
        let result = match self.0.read() {
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Ok(_) => false,
            Err(e) => panic!("unexpected error: {e}"),
        };
        if let MaybeTlsStream::Plain(s) = self.0.get_mut() {
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        }
        result
    }
}

/// The most a server's socket can hold unsent (the third field of
/// `tcp_wmem`, 4 MiB by default): a client that never reads must send more
/// than this past a budget before the server's own queue can pass it.
fn kernel_send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|fields| fields.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// A masked client text frame (RFC 6455 5.3), as a client library would send it.
pub fn client_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One server frame read from a raw stream: (opcode, payload).
pub fn read_server_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((head[0] & 0x0f, payload))
}

/// An HS256 token for `sub` (what an application signing with `secret`
/// makes), expiring `valid_for_secs` from now (negative: expired).
pub fn jwt(secret: &str, sub: &str, valid_for_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({ "sub": sub, "exp": now + valid_for_secs });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
