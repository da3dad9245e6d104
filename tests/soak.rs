//! Soak: connection and subscription churn against a two-shard server for a
//! while, watching its memory, then a check that every gauge returns to idle.
//!
//! Ignored by `cargo test`; run it with `scripts/soak.sh [SECONDS]` (release
//! build, `SOAK_SECONDS`, default 600). Client threads mix plain and
//! identified connections, subscribes and unsubscribes over a topic pool,
//! publishes over HTTP, over `{"type":"message"}` and to a user,
//! registrations (`POST /register`, `/ws/{id}`, `DELETE /register/{id}`),
//! clean closes, abrupt resets (SO_LINGER 0, so the server sees RST) and
//! half-open HTTP requests. The server's RSS is sampled every 10 s. At the
//! end every client closes; `/metrics` must show no connection but its own,
//! no WebSocket, subscription or topic, and no client may have seen a
//! protocol error or any other unexpected answer.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, IO_TIMEOUT};
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Client threads. Four keep both shards busy without starving the server
/// of the two cores it shares with them.
const CLIENT_THREADS: u64 = 4;
/// WebSockets one thread holds open at once; with 4 threads that is about 24
/// live connections, each drained every loop turn so none becomes a slow consumer.
const HELD_PER_THREAD: usize = 6;
/// Topics one held connection subscribes to at most (the server's default limit is 50).
const SUBS_PER_CONNECTION: usize = 8;
/// Topic pool: small enough that topics gain and lose their last subscriber
/// often, which is the cross-shard interest path.
const TOPICS: u64 = 32;
/// User-name pool for identified connections and publish-to-user.
const USERS: u64 = 16;
/// Pause between operations of one thread: a steady churn, not a flood.
const PACE: Duration = Duration::from_millis(1);
/// RSS sampling period.
const RSS_EVERY: Duration = Duration::from_secs(10);
/// How long the gauges may take to return to idle after the last close.
const SETTLE: Duration = Duration::from_secs(10);
/// How long to keep watching a gauge that missed `SETTLE`, to tell a
/// connection the server held until its 30 s HTTP idle timeout (it missed
/// the client's FIN) from one it never lets go.
const DIAGNOSE: Duration = Duration::from_secs(40);
/// Anomalies printed in full; the rest are only counted.
const NOTES_KEPT: usize = 30;

/// What the clients did, by kind.
#[derive(Clone, Copy)]
enum Op {
    Connect,
    IdentifiedConnect,
    Subscribe,
    Unsubscribe,
    WsPublish,
    HttpPublish,
    UserPublish,
    Registration,
    CleanClose,
    Reset,
    HalfOpenHttp,
    PushReceived,
}

const OP_NAMES: [&str; 12] = [
    "connects (/ws)",
    "identified connects (/ws?user_id)",
    "subscribes",
    "unsubscribes",
    "publishes over WebSocket",
    "publishes over HTTP",
    "publishes to a user",
    "registration cycles",
    "clean closes",
    "resets (RST)",
    "half-open HTTP requests",
    "pushes received",
];

/// Whether an anomaly breaks the protocol or is some other surprise.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Anomaly {
    /// A frame or message the protocol does not allow, an `error` reply to a
    /// valid request, or a close for a protocol violation.
    Protocol,
    /// Anything else unexpected: a timeout, a wrong HTTP status, a lost connection.
    Other,
}

#[derive(Default)]
struct Tally {
    ops: [AtomicU64; 12],
    protocol_errors: AtomicU64,
    other_errors: AtomicU64,
    notes: Mutex<Vec<String>>,
}

impl Tally {
    fn count(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn anomaly(&self, kind: Anomaly, what: String) {
        let counter = match kind {
            Anomaly::Protocol => &self.protocol_errors,
            Anomaly::Other => &self.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut notes = self.notes.lock().unwrap();
        if notes.len() < NOTES_KEPT {
            let label = if kind == Anomaly::Protocol {
                "protocol"
            } else {
                "other"
            };
            eprintln!("soak: {label}: {what}");
            notes.push(format!("{label}: {what}"));
        }
    }
}

/// xorshift64*: per-thread randomness from a printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T>(&mut self, items: &[T]) -> usize {
        self.below(items.len() as u64) as usize
    }
}

fn topic(n: u64) -> String {
    format!("soak:{n}")
}

/// A failed expectation: what kind, and what happened.
type Failure = (Anomaly, String);

fn other(what: impl Into<String>) -> Failure {
    (Anomaly::Other, what.into())
}

/// Classifies a tungstenite error: protocol-level ones are the server's fault.
fn ws_failure(context: &str, e: tungstenite::Error) -> Failure {
    use tungstenite::Error as E;
    let kind = match e {
        E::Protocol(_) | E::Utf8(_) | E::Capacity(_) | E::AttackAttempt => Anomaly::Protocol,
        _ => Anomaly::Other,
    };
    (kind, format!("{context}: {e}"))
}

/// One open WebSocket and what it holds.
struct Client {
    ws: WebSocket<TcpStream>,
    topics: Vec<String>,
    user: Option<String>,
}

/// One message from the server, sorted.
enum Got {
    /// A push (counted) or a control frame: nothing to answer.
    Skip,
    /// A `subscribed` or `unsubscribed` reply.
    Reply(Value),
    /// The server's close frame, with its code.
    Closed(u16),
    /// Nothing arrived: the socket is drained, or the read timed out.
    Nothing,
}

impl Got {
    /// The failure this is when something else was expected.
    fn failure(self, context: &str) -> Failure {
        match self {
            Got::Closed(code) => {
                let kind = if matches!(code, 1002 | 1007 | 1008 | 1009 | 1011) {
                    Anomaly::Protocol
                } else {
                    Anomaly::Other
                };
                (kind, format!("{context}: server closed with {code}"))
            }
            Got::Reply(reply) => (Anomaly::Protocol, format!("{context}: unexpected {reply}")),
            Got::Nothing => other(format!("{context}: nothing within {IO_TIMEOUT:?}")),
            Got::Skip => other(format!("{context}: skipped message")),
        }
    }
}

impl Client {
    fn connect(addr: SocketAddr, path: &str) -> Result<Client, Failure> {
        let stream = TcpStream::connect(addr).map_err(|e| other(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| other(format!("timeout: {e}")))?;
        let (ws, _) = tungstenite::client::client(format!("ws://{addr}{path}"), stream)
            .map_err(|e| other(format!("upgrade on {path}: {e}")))?;
        Ok(Client {
            ws,
            topics: Vec::new(),
            user: None,
        })
    }

    fn send(&mut self, text: String) -> Result<(), Failure> {
        self.ws
            .send(Message::text(text))
            .map_err(|e| ws_failure("send", e))
    }

    /// Reads the next message and sorts it; pushes are counted.
    fn next(&mut self, tally: &Tally) -> Result<Got, Failure> {
        match self.ws.read() {
            Ok(Message::Text(text)) => {
                let value: Value = serde_json::from_str(&text).map_err(|_| {
                    (
                        Anomaly::Protocol,
                        format!("text that is not JSON: {text:?}"),
                    )
                })?;
                match value["type"].as_str() {
                    Some("push") => {
                        tally.count(Op::PushReceived);
                        Ok(Got::Skip)
                    }
                    Some("subscribed" | "unsubscribed") => Ok(Got::Reply(value)),
                    Some("error") => Err((Anomaly::Protocol, format!("error reply: {text}"))),
                    _ => Err((Anomaly::Protocol, format!("unexpected message: {text}"))),
                }
            }
            Ok(Message::Close(frame)) => Ok(Got::Closed(
                frame.map_or(u16::from(CloseCode::Status), |f| u16::from(f.code)),
            )),
            Ok(Message::Ping(_) | Message::Pong(_)) => Ok(Got::Skip),
            Ok(frame) => Err((Anomaly::Protocol, format!("unexpected frame {frame:?}"))),
            // A read timeout on a blocking socket is EAGAIN too.
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => Ok(Got::Nothing),
            Err(e) => Err(ws_failure("read", e)),
        }
    }

    /// Reads until the reply `{"type":kind,"topic":topic}`, skipping pushes.
    fn await_reply(&mut self, tally: &Tally, kind: &str, topic: &str) -> Result<(), Failure> {
        loop {
            match self.next(tally)? {
                Got::Skip => {}
                Got::Reply(reply) if reply["type"] == kind && reply["topic"] == topic => {
                    return Ok(())
                }
                unexpected => return Err(unexpected.failure(&format!("awaiting {kind} {topic}"))),
            }
        }
    }

    /// Reads whatever has already arrived, without waiting.
    fn drain(&mut self, tally: &Tally) -> Result<(), Failure> {
        let set = |s: &TcpStream, nonblocking: bool| {
            s.set_nonblocking(nonblocking)
                .map_err(|e| other(format!("set_nonblocking: {e}")))
        };
        set(self.ws.get_ref(), true)?;
        let result = loop {
            match self.next(tally) {
                Ok(Got::Skip) => {}
                Ok(Got::Nothing) => break Ok(()),
                Ok(unexpected) => break Err(unexpected.failure("between requests")),
                Err(e) => break Err(e),
            }
        };
        set(self.ws.get_ref(), false)?;
        result
    }

    fn subscribe(&mut self, tally: &Tally, topic: String) -> Result<(), Failure> {
        self.send(format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#))?;
        self.await_reply(tally, "subscribed", &topic)?;
        self.topics.push(topic);
        tally.count(Op::Subscribe);
        Ok(())
    }

    fn unsubscribe(&mut self, tally: &Tally, index: usize) -> Result<(), Failure> {
        let topic = self.topics.swap_remove(index);
        self.send(format!(r#"{{"type":"unsubscribe","topic":"{topic}"}}"#))?;
        self.await_reply(tally, "unsubscribed", &topic)?;
        tally.count(Op::Unsubscribe);
        Ok(())
    }

    /// Sends a close frame and reads until the server's answer ends the connection.
    fn close_cleanly(mut self, tally: &Tally) -> Result<(), Failure> {
        self.ws.close(None).map_err(|e| ws_failure("close", e))?;
        self.finish_close(tally)
    }

    /// After a close was sent or received: reads until the connection ends.
    fn finish_close(mut self, tally: &Tally) -> Result<(), Failure> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(_)) => tally.count(Op::PushReceived),
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => {
                    tally.count(Op::CleanClose);
                    return Ok(());
                }
                Err(e) => return Err(ws_failure("closing", e)),
            }
        }
    }

    /// Drops the connection with SO_LINGER 0: the kernel sends RST, not FIN.
    fn reset(self, tally: &Tally) -> Result<(), Failure> {
        socket2::SockRef::from(self.ws.get_ref())
            .set_linger(Some(Duration::ZERO))
            .map_err(|e| other(format!("SO_LINGER: {e}")))?;
        drop(self);
        tally.count(Op::Reset);
        Ok(())
    }
}

/// One HTTP request on a fresh connection; returns the status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String), Failure> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let response = exchange(addr, request.as_bytes(), false)?;
    parse_response(&response)
}

/// Sends `bytes` on a fresh connection (half-closing it after, if asked)
/// and reads until the server closes.
fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Result<String, Failure> {
    let io = |what: &str, e: std::io::Error| other(format!("{what}: {e}"));
    let mut stream = TcpStream::connect(addr).map_err(|e| io("connect", e))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| io("timeout", e))?;
    stream.write_all(bytes).map_err(|e| io("write", e))?;
    if half_close {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| io("shutdown", e))?;
    }
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .map_err(|e| io("read response", e))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn parse_response(response: &str) -> Result<(u16, String), Failure> {
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| other(format!("no HTTP status in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn expect_status(what: &str, got: (u16, String), want: u16) -> Result<String, Failure> {
    if got.0 == want {
        Ok(got.1)
    } else {
        Err(other(format!("{what}: HTTP {} {}", got.0, got.1.trim())))
    }
}

/// One client thread: picks operations at random until `stop`, then closes
/// everything it holds.
struct Worker {
    addr: SocketAddr,
    thread: u64,
    rng: Rng,
    held: Vec<Client>,
    tally: Arc<Tally>,
    sequence: u64,
}

impl Worker {
    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let step = self.rng.below(100);
            if let Err((kind, what)) = self.step(step) {
                self.tally
                    .anomaly(kind, format!("thread {}: {what}", self.thread));
            }
            self.drain_all();
            std::thread::sleep(PACE);
        }
        for client in std::mem::take(&mut self.held) {
            if let Err((kind, what)) = client.close_cleanly(&self.tally) {
                self.tally
                    .anomaly(kind, format!("thread {}: final close: {what}", self.thread));
            }
        }
    }

    /// Runs the operation `step` (0..100) names; the ranges are its weights.
    fn step(&mut self, step: u64) -> Result<(), Failure> {
        match step {
            0..=9 => self.connect(),
            10..=29 => self.subscribe(),
            30..=41 => self.unsubscribe(),
            42..=53 => self.ws_publish(),
            54..=63 => self.http_publish(None),
            64..=71 => {
                let user = format!("soak-user-{}", self.rng.below(USERS));
                self.http_publish(Some(user))
            }
            72..=76 => self.registration(),
            77..=82 => self.close_one(false),
            83..=87 => self.close_one(true),
            _ => self.half_open_http(),
        }
    }

    fn connect(&mut self) -> Result<(), Failure> {
        if self.held.len() >= HELD_PER_THREAD {
            let reset = self.rng.below(2) == 0;
            return self.close_one(reset);
        }
        let client = if self.rng.below(2) == 0 {
            let user = format!("soak-user-{}", self.rng.below(USERS));
            let mut client = Client::connect(self.addr, &format!("/ws?user_id={user}"))?;
            client.user = Some(user);
            self.tally.count(Op::IdentifiedConnect);
            client
        } else {
            let client = Client::connect(self.addr, "/ws")?;
            self.tally.count(Op::Connect);
            client
        };
        self.held.push(client);
        Ok(())
    }

    fn subscribe(&mut self) -> Result<(), Failure> {
        if self.held.is_empty() {
            return self.connect();
        }
        let i = self.rng.pick(&self.held);
        let wanted = topic(self.rng.below(TOPICS));
        let client = &mut self.held[i];
        if client.topics.len() >= SUBS_PER_CONNECTION || client.topics.contains(&wanted) {
            return Ok(());
        }
        let result = client.subscribe(&self.tally, wanted);
        self.keep_if_ok(i, result)
    }

    fn unsubscribe(&mut self) -> Result<(), Failure> {
        let Some(i) = self.with_topics() else {
            return Ok(());
        };
        let t = self.rng.pick(&self.held[i].topics);
        let result = self.held[i].unsubscribe(&self.tally, t);
        self.keep_if_ok(i, result)
    }

    fn ws_publish(&mut self) -> Result<(), Failure> {
        let Some(i) = self.with_topics() else {
            return Ok(());
        };
        let t = self.rng.pick(&self.held[i].topics);
        self.sequence += 1;
        let text = format!(
            r#"{{"type":"message","topic":"{}","event":"soak","payload":{{"thread":{},"n":{}}}}}"#,
            self.held[i].topics[t], self.thread, self.sequence
        );
        let result = self.held[i].send(text);
        self.tally.count(Op::WsPublish);
        self.keep_if_ok(i, result)
    }

    fn http_publish(&mut self, user: Option<String>) -> Result<(), Failure> {
        self.sequence += 1;
        let topic = topic(self.rng.below(TOPICS));
        let (op, user_field) = match &user {
            Some(u) => (Op::UserPublish, format!(r#","user_id":"{u}""#)),
            None => (Op::HttpPublish, String::new()),
        };
        let body = format!(
            r#"{{"topic":"{topic}","event":"soak","payload":{{"thread":{},"n":{}}}{user_field}}}"#,
            self.thread, self.sequence
        );
        expect_status("publish", http(self.addr, "POST", "/publish", &body)?, 202)?;
        self.tally.count(op);
        Ok(())
    }

    /// Register, connect with the id, see the starting topics, delete the
    /// registration and see the connection closed with 1000.
    fn registration(&mut self) -> Result<(), Failure> {
        let mut topics: Vec<String> = (0..1 + self.rng.below(3))
            .map(|_| topic(self.rng.below(TOPICS)))
            .collect();
        topics.sort();
        topics.dedup();
        let body = serde_json::json!({
            "user_id": format!("soak-reg-{}", self.thread),
            "topics": topics,
        })
        .to_string();
        let reply = expect_status(
            "register",
            http(self.addr, "POST", "/register", &body)?,
            201,
        )?;
        let reply: Value =
            serde_json::from_str(&reply).map_err(|_| other(format!("register reply {reply}")))?;
        let id = reply["id"]
            .as_str()
            .ok_or_else(|| other(format!("register reply {reply}")))?
            .to_string();
        let mut client = Client::connect(self.addr, &format!("/ws/{id}"))?;
        // The starting topics are answered in any order.
        let mut waiting = topics;
        while !waiting.is_empty() {
            match client.next(&self.tally)? {
                Got::Skip => {}
                Got::Reply(reply) if reply["type"] == "subscribed" => {
                    let t = reply["topic"].as_str().unwrap_or_default();
                    match waiting.iter().position(|w| w == t) {
                        Some(at) => drop(waiting.swap_remove(at)),
                        None => return Err(Got::Reply(reply).failure("registered connection")),
                    }
                }
                unexpected => return Err(unexpected.failure("registered connection")),
            }
        }
        expect_status(
            "delete registration",
            http(self.addr, "DELETE", &format!("/register/{id}"), "")?,
            204,
        )?;
        loop {
            match client.next(&self.tally)? {
                Got::Skip => {}
                Got::Closed(1000) => break,
                unexpected => return Err(unexpected.failure("deleted registration")),
            }
        }
        client.finish_close(&self.tally)?;
        self.tally.count(Op::Registration);
        Ok(())
    }

    fn close_one(&mut self, reset: bool) -> Result<(), Failure> {
        if self.held.is_empty() {
            return Ok(());
        }
        let i = self.rng.pick(&self.held);
        let client = self.held.swap_remove(i);
        if reset {
            client.reset(&self.tally)
        } else {
            client.close_cleanly(&self.tally)
        }
    }

    /// Three ways to leave an HTTP request unfinished.
    fn half_open_http(&mut self) -> Result<(), Failure> {
        self.tally.count(Op::HalfOpenHttp);
        match self.rng.below(3) {
            0 => {
                // A head cut short, then FIN: the server must just close.
                let got = exchange(self.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n", true)?;
                if !got.is_empty() {
                    return Err(other(format!("answer to half a head: {got:?}")));
                }
                Ok(())
            }
            1 => {
                // A whole request, then FIN: the server still answers it.
                let got = exchange(self.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", true)?;
                expect_status("half-closed /health", parse_response(&got)?, 200).map(drop)
            }
            _ => {
                // A body cut short, then RST.
                let mut stream =
                    TcpStream::connect(self.addr).map_err(|e| other(format!("connect: {e}")))?;
                stream
                    .write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"topic\":")
                    .map_err(|e| other(format!("write: {e}")))?;
                std::thread::sleep(Duration::from_millis(self.rng.below(5)));
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .map_err(|e| other(format!("SO_LINGER: {e}")))?;
                Ok(())
            }
        }
    }

    /// A held connection with at least one topic, if any.
    fn with_topics(&mut self) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.held.len())
            .filter(|&i| !self.held[i].topics.is_empty())
            .collect();
        (!candidates.is_empty()).then(|| candidates[self.rng.pick(&candidates)])
    }

    /// Drops held connection `i` when `result` failed: its state is unknown.
    fn keep_if_ok(&mut self, i: usize, result: Result<(), Failure>) -> Result<(), Failure> {
        if result.is_err() {
            drop(self.held.swap_remove(i));
        }
        result
    }

    fn drain_all(&mut self) {
        let mut i = 0;
        while i < self.held.len() {
            match self.held[i].drain(&self.tally) {
                Ok(()) => i += 1,
                Err((kind, what)) => {
                    let user = self.held[i].user.clone().unwrap_or_default();
                    self.tally.anomaly(
                        kind,
                        format!("thread {}: drain (user {user:?}): {what}", self.thread),
                    );
                    drop(self.held.swap_remove(i));
                }
            }
        }
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The idle gauges, read from one `/metrics` response.
fn gauges(server: &TestServer) -> Vec<(&'static str, u64)> {
    let (_, text) = server.http("GET", "/metrics", None);
    ["connections", "websockets", "subscriptions", "topics"]
        .into_iter()
        .map(|name| {
            let prefix = format!("ringcast_{name} ");
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("metric {name} missing"));
            (name, value)
        })
        .collect()
}

#[test]
#[ignore = "minutes long; run with scripts/soak.sh"]
fn churn_for_a_while_leaks_nothing_and_breaks_no_client() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .map(|s| s.parse().expect("SOAK_SECONDS is a number of seconds"))
        .unwrap_or(600);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("SOAK_SEED is a number"))
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            nanos as u64 | 1
        });
    let mut server = TestServer::start(2, None);
    let pid = server.child.id();
    println!(
        "soak: {seconds} s, {CLIENT_THREADS} client threads, server pid {pid} on {}, seed {seed}",
        server.addr
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENT_THREADS)
        .map(|thread| {
            let worker = Worker {
                addr: server.addr,
                thread,
                // Odd and distinct per thread; xorshift needs a non-zero state.
                rng: Rng(seed.wrapping_add(thread.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1),
                held: Vec::new(),
                tally: Arc::clone(&tally),
                sequence: 0,
            };
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || worker.run(&stop))
        })
        .collect();

    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut rss = vec![(0, rss_kib(pid).expect("server RSS readable"))];
    println!("soak: t=0s rss={} KiB", rss[0].1);
    let mut next_sample = start + RSS_EVERY;
    while Instant::now() < deadline {
        std::thread::sleep(
            next_sample
                .min(deadline)
                .saturating_duration_since(Instant::now()),
        );
        if Instant::now() >= next_sample {
            let t = start.elapsed().as_secs();
            let kib = rss_kib(pid).expect("the server is still running");
            println!("soak: t={t}s rss={kib} KiB");
            rss.push((t, kib));
            next_sample += RSS_EVERY;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("client thread panicked");
    }
    let churn_seconds = start.elapsed().as_secs_f64();

    let settle_start = Instant::now();
    let idle = loop {
        let now = gauges(&server);
        // The connection reading /metrics is the only one left.
        let at_baseline = now
            .iter()
            .all(|&(name, v)| v == u64::from(name == "connections"));
        if at_baseline || settle_start.elapsed() > SETTLE {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let settle_ms = settle_start.elapsed().as_millis();
    if idle
        .iter()
        .any(|&(name, v)| v != u64::from(name == "connections"))
    {
        let cleared = loop {
            let now = gauges(&server);
            if now
                .iter()
                .all(|&(name, v)| v == u64::from(name == "connections"))
            {
                break Some(settle_start.elapsed());
            }
            if settle_start.elapsed() > DIAGNOSE {
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        println!("  DIAGNOSIS: the gauges reached idle after {cleared:?} (None: not within {DIAGNOSE:?})");
    }
    let (_, metrics) = server.http("GET", "/metrics", None);
    let counter = |name: &str| -> u64 {
        let prefix = format!("ringcast_{name} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let final_rss = rss_kib(pid).expect("the server is still running");

    println!("soak: summary after {churn_seconds:.0} s of churn");
    let mut total = 0;
    for (name, count) in OP_NAMES.iter().zip(&tally.ops) {
        let count = count.load(Ordering::Relaxed);
        if !name.starts_with("pushes") {
            total += count;
        }
        println!(
            "  {name:<36} {count:>9}  ({:.0}/s)",
            count as f64 / churn_seconds
        );
    }
    println!("  {:<36} {total:>9}", "operations in all");
    let series: Vec<String> = rss.iter().map(|(t, kib)| format!("{t}s:{kib}")).collect();
    println!("  RSS series (KiB): {}", series.join(" "));
    let max = rss.iter().map(|&(_, kib)| kib).chain([final_rss]).max();
    println!(
        "  RSS first/max/last: {} / {} / {final_rss} KiB (last: after every client closed)",
        rss[0].1,
        max.unwrap_or(final_rss)
    );
    println!("  gauges {settle_ms} ms after the last close: {idle:?}");
    for name in [
        "connections_accepted_total",
        "protocol_closes_total",
        "slow_consumer_disconnects_total",
        "bus_drops_total",
        "ws_errors_total",
        "http_errors_total",
    ] {
        println!("  server {name}: {}", counter(name));
    }
    let protocol_errors = tally.protocol_errors.load(Ordering::Relaxed);
    let other_errors = tally.other_errors.load(Ordering::Relaxed);
    println!("  client protocol errors: {protocol_errors}, other anomalies: {other_errors}");
    for note in tally.notes.lock().unwrap().iter() {
        println!("    {note}");
    }

    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    for (name, value) in &idle {
        let baseline = u64::from(*name == "connections");
        assert_eq!(*value, baseline, "{name} back to idle");
    }
    assert_eq!(protocol_errors, 0, "no client saw a protocol error");
    assert_eq!(
        counter("protocol_closes_total"),
        0,
        "the server saw no protocol error"
    );
    assert_eq!(other_errors, 0, "no client saw anything unexpected");
}
