//! The hostile suite: every attack the project knows of, each as a small
//! real client with the outcome it must get (a status, a close code, a
//! counter), all run together against ONE server started with a hard
//! address-space limit (`RLIMIT_AS`, as `prlimit --as` sets it). A
//! regression that lets a client make the node hold memory shows here as
//! a failed allocation (the server aborts and every test after fails) or
//! an RSS over `RSS_BOUND`, not as an OOM elsewhere on the machine.
//!
//! Tests that fill a shared bound (the stream table, the inbound budget)
//! take a lock so they do not crowd each other out; everything else runs
//! concurrently, as a node under attack would see it.
//!
//! `RINGCAST_TEST_BIN=<older build>` runs the suite against another binary
//! (without the limits that build does not know), to watch the regression
//! tests fail before their fixes.
#![allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{client_text_frame, read_server_frame, TestServer, Ws, IO_TIMEOUT};
use serde_json::Value;

/// Address space the server may map: its idle 2-shard footprint is about
/// 255 MB (thread stacks, rings, allocator arenas), and the whole suite
/// peaked at 423 MB (up to 128 MiB of it history it may keep).
const ADDRESS_SPACE: u64 = 1 << 30;
/// Resident memory every test checks at its end, whatever ran beside it:
/// the suite peaked at 180 MB.
const RSS_BOUND: u64 = 320 << 20;
const API_KEY: &str = "hostile-key";

/// Per shard (two shards): small enough that the attacks below cross it.
const INBOUND_BUDGET: usize = 4 << 20;
const OUTBOUND_BUDGET: usize = 1 << 20;
const MAX_STREAMS: usize = 2000;
/// Bytes of idempotency keys each home shard remembers.
const IDEMPOTENCY_BUDGET: usize = 1 << 20;

fn config() -> String {
    let limits = if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        // An older build refuses keys it does not know.
        String::new()
    } else {
        format!(
            "max_streams = {MAX_STREAMS}\n\
             max_inbound_bytes_per_shard = {INBOUND_BUDGET}\n\
             max_idempotency_bytes = {IDEMPOTENCY_BUDGET}\n\
             max_outbound_bytes_per_shard = {}\n\
             [websocket]\n\
             compression = true\n",
            64 << 20
        )
    };
    format!(
        r#"
[limits]
max_outbound_bytes_per_connection = {OUTBOUND_BUDGET}
max_history_bytes = {history}
max_registrations = 1000
{limits}
[auth]
api_key = "{API_KEY}"

[[rules]]
pattern = "s:*"
history_size = 30000
history_ttl_s = 300
client_publish = true

[[rules]]
pattern = "r:*"
history_size = 1000
history_ttl_s = 300
replay_on_subscribe = 1000

[[rules]]
pattern = "cap:*"
history_size = 1
history_ttl_s = 1

[[rules]]
pattern = "p:*"
presence = true
client_publish = true

[[rules]]
pattern = "*"
client_publish = true
{apps}"#,
        history = 128 << 20,
        apps = if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
            ""
        } else {
            "\n[[apps]]\nid = \"4711\"\nkey = \"app-key\"\nsecret = \"app-secret\"\nclient_events = true\n"
        }
    )
}

/// The one server, started on first use from a thread that lives as long
/// as the test process: the server gets SIGKILL when that thread ends
/// (`PR_SET_PDEATHSIG`), so no run leaves it behind.
fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let path =
                std::env::temp_dir().join(format!("ringcast-hostile-{}.toml", std::process::id()));
            std::fs::write(&path, config()).unwrap();
            let bin = std::env::var("RINGCAST_TEST_BIN")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringcast").to_string());
            let mut cmd = Command::new(bin);
            cmd.args(["--listen", "127.0.0.1:0", "--shards", "2", "--config"])
                .arg(&path);
            // SAFETY: between fork and exec only async-signal-safe calls
            // (setrlimit, prctl) on plain values.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: ADDRESS_SPACE,
                        rlim_max: ADDRESS_SPACE,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let server = TestServer::spawn(cmd, None);
            // Read at start-up; the server lives in a static that is never
            // dropped, so its file would outlive the run.
            let _ = std::fs::remove_file(&path);
            tx.send(server).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the hostile server starts")
    })
}

/// Tests that fill one of the node's shared bounds take turns.
fn turn(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
static STREAM_TABLE: Mutex<()> = Mutex::new(());
static INBOUND: Mutex<()> = Mutex::new(());

fn rss_bytes() -> u64 {
    server().rss_bytes()
}

/// Every attack ends here: the server still answers, within its bound.
fn still_healthy() {
    assert_eq!(server().http("GET", "/health", None).0, 200);
    let rss = rss_bytes();
    assert!(
        rss < RSS_BOUND,
        "RSS {} MiB over the suite's bound of {} MiB",
        rss >> 20,
        RSS_BOUND >> 20
    );
}

fn metric(name: &str) -> u64 {
    server().metric(name)
}

/// A counter an older build may not have, as 0 there.
fn metric_or_zero(name: &str) -> u64 {
    let (_, text) = server().http("GET", "/metrics", None);
    let prefix = format!("ringcast_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the server has closed `stream`: its first bytes pass `first`
/// (12 bytes, asserted), or the connection was reset.
fn closed_with(stream: &TcpStream, first: impl Fn(&[u8; 12]) -> bool) -> bool {
    let mut stream = stream.try_clone().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut head = [0u8; 12];
    match stream.read_exact(&mut head) {
        Ok(()) => {
            assert!(first(&head), "unexpected answer {head:?}");
            true
        }
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Every shard's partial input is within its budget.
fn inbound_within_budget() {
    for held in per_shard("memory_inbound_bytes") {
        assert!(
            held <= INBOUND_BUDGET as u64,
            "{held} bytes held on a shard"
        );
    }
}

fn per_shard(name: &str) -> Vec<u64> {
    (0..2).map(|s| server().shard_metric(name, s)).collect()
}

fn connect() -> TcpStream {
    let stream = TcpStream::connect(server().addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one HTTP response from a keep-alive connection: status, headers, body.
fn read_response(stream: &mut impl BufRead) -> (u16, String, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let read = stream.read_until(b'\n', &mut head).unwrap_or(0);
        assert!(
            read > 0,
            "no response after {:?}",
            String::from_utf8_lossy(&head)
        );
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, head, body)
}

/// Bytes a client pipelines before it reads the answers: the server holds
/// what arrives while a request waits for another shard (a stream's home)
/// up to one largest request, and closes a client that sends more.
const PIPELINE_BYTES: usize = 512 << 10;

/// Sends `requests` pipelined on one connection, in windows of at most
/// `PIPELINE_BYTES`, and reads every answer.
fn pipelined(requests: &[String]) -> Vec<(u16, Value)> {
    let mut stream = connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut answers = Vec::with_capacity(requests.len());
    let mut start = 0;
    while start < requests.len() {
        let mut end = start + 1;
        let mut bytes = requests[start].len();
        while end < requests.len() && bytes + requests[end].len() <= PIPELINE_BYTES {
            bytes += requests[end].len();
            end += 1;
        }
        stream
            .write_all(requests[start..end].concat().as_bytes())
            .unwrap();
        for _ in start..end {
            let (status, _, body) = read_response(&mut reader);
            answers.push((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
        }
        start = end;
    }
    answers
}

/// Publishes `count` payloads of about `pad` bytes to `topic`, pipelined;
/// returns the epoch.
fn publish_many(topic: &str, count: usize, pad: usize) -> String {
    let padding = "x".repeat(pad);
    let requests: Vec<String> = (0..count)
        .map(|i| {
            post(
                "/publish",
                &format!(r#"{{"topic":"{topic}","payload":{{"i":{i},"pad":"{padding}"}}}}"#),
            )
        })
        .collect();
    let answers = pipelined(&requests);
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
    }
    answers[0].1["epoch"].as_str().unwrap().to_string()
}

/// A WebSocket whose client reads slowly: a small receive buffer, frames
/// read one at a time.
struct SlowReader(TcpStream);

impl SlowReader {
    fn open(path: &str) -> SlowReader {
        SlowReader(server().raw_ws(path, Some(16 << 10)))
    }

    fn send(&mut self, text: &str) {
        self.0.write_all(&client_text_frame(text)).unwrap();
    }

    fn next(&mut self) -> Value {
        loop {
            let (opcode, payload) = read_server_frame(&mut self.0).unwrap();
            match opcode {
                0x1 => return serde_json::from_slice(&payload).unwrap(),
                0x8 => panic!("closed: {:?}", close_code(&payload)),
                _ => continue,
            }
        }
    }
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

// ---- the router ---------------------------------------------------------------

#[test]
fn paths_too_short_for_their_route_get_404_and_never_stop_the_process() {
    for path in [
        "/topics/history",
        "/topics/presence",
        "/topics%2Fpresence",
        "/topics%2fhistory",
        "/topics/",
        "/ws/",
    ] {
        for key in [None, Some(API_KEY)] {
            let (status, body) = match key {
                Some(key) => server().http_with_key("GET", path, None, key),
                None => server().http("GET", path, None),
            };
            assert_eq!(status, 404, "{path}: {body}");
        }
    }
    still_healthy();
}

// ---- streams: reads, churn, the stream table ---------------------------------------

/// Streams counted once the homes' once-a-second sweep has run.
fn streams_after_sweep() -> u64 {
    std::thread::sleep(Duration::from_millis(1100));
    metric("streams")
}

/// Runs `attack` (given the streams counted before it) with the stream
/// table to itself, then checks that the sweeps leave no more streams than
/// there were, and the server healthy. A loaded machine may run a sweep
/// late, so the count is polled (every 200 ms, up to `IO_TIMEOUT`) rather
/// than read once after one sweep's time; a stream left behind keeps it
/// high until the timeout fails the test.
fn leaves_no_stream(what: &str, attack: impl FnOnce(u64)) {
    let _turn = turn(&STREAM_TABLE);
    let before = streams_after_sweep();
    attack(before);
    server().wait_for_every(
        &format!("{what}: streams back to {before}"),
        Duration::from_millis(200),
        || metric("streams") <= before,
    );
    still_healthy();
}

#[test]
fn reads_of_unknown_streams_store_nothing() {
    leaves_no_stream("5,000 reads created streams", |_| {
        let requests: Vec<String> = (0..5000)
            .map(|i| get(&format!("/topics/s:read-{i}/history?since=0")))
            .collect();
        for (status, body) in pipelined(&requests) {
            assert_eq!(status, 200);
            assert_eq!(
                (body["offset"].as_u64(), body["epoch"].as_str()),
                (Some(0), Some(""))
            );
        }
    });
}

#[test]
fn subscribe_and_unsubscribe_churn_leaves_no_stream_behind() {
    leaves_no_stream("churn left streams behind", |_| {
        let mut ws = server().ws("/ws");
        for i in 0..2000 {
            let topic = format!("s:churn-{i}");
            ws.send_text(&format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#));
            let subscribed = ws.recv_json();
            assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
            ws.send_text(&format!(r#"{{"type":"unsubscribe","topic":"{topic}"}}"#));
            assert_eq!(ws.recv_json()["type"], "unsubscribed");
        }
    });
}

/// Every stream publish with a key of its own: the keys a home shard
/// remembers stay within `max_idempotency_bytes`, the oldest go first
/// (counted), and a recent key still answers its retry.
#[test]
fn unique_idempotency_keys_stay_within_their_byte_bound() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no idempotency keys
    }
    let _turn = turn(&STREAM_TABLE);
    let evicted = metric("idempotency_evictions_total");
    // `cap:*` keeps one publication for a second: the keys are what grows.
    let key = |i: usize| format!("{i:0>200}");
    let body = |i: usize| {
        format!(
            r#"{{"topic":"cap:keys","payload":{i},"idempotency_key":"{}"}}"#,
            key(i)
        )
    };
    let requests: Vec<String> = (0..20_000).map(|i| post("/publish", &body(i))).collect();
    let answers = pipelined(&requests);
    assert!(answers.iter().all(|(status, _)| *status == 202));
    let last = &answers.last().unwrap().1;
    let retry = pipelined(&[post("/publish", &body(19_999))]);
    assert_eq!(
        retry[0].1["offset"], last["offset"],
        "a recent key still answers"
    );
    server().wait_for("the key gauges", || {
        metric("idempotency_evictions_total") > evicted && metric("memory_idempotency_bytes") > 0
    });
    let held = metric("memory_idempotency_bytes");
    assert!(
        held <= 2 * IDEMPOTENCY_BUDGET as u64,
        "{held} bytes of keys over two shards' budget"
    );
    still_healthy();
}

#[test]
fn past_max_streams_a_new_stream_is_refused_and_counted() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no stream limit to reach
    }
    let _turn = turn(&STREAM_TABLE);
    let refused = metric("streams_refused_total");
    // `cap:*` streams keep one publication for a second: they go soon after.
    let requests: Vec<String> = (0..2 * MAX_STREAMS + 200)
        .map(|i| {
            post(
                "/publish",
                &format!(r#"{{"topic":"cap:{i}","payload":{i}}}"#),
            )
        })
        .collect();
    let answers = pipelined(&requests);
    let refusals: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 503)
        .map(|(_, body)| body)
        .collect();
    assert!(
        !refusals.is_empty(),
        "{} streams on two shards of {MAX_STREAMS} each",
        requests.len()
    );
    assert!(refusals[0]["error"]
        .as_str()
        .unwrap()
        .contains("stream limit"));
    assert!(answers.iter().all(|(s, _)| *s == 202 || *s == 503));
    std::thread::sleep(Duration::from_millis(1100));
    assert!(metric("streams_refused_total") >= refused + refusals.len() as u64);
    // Idle for their TTL with nothing kept, they are forgotten.
    server().wait_for("the capped streams to go", || {
        per_shard("streams")
            .iter()
            .all(|&n| n < MAX_STREAMS as u64 / 2)
    });
    still_healthy();
}

// ---- replays and history within the outbound budget ----------------------------------

#[test]
fn a_20_mb_backlog_is_recovered_exactly_once_by_a_slow_reader() {
    let _turn = turn(&STREAM_TABLE);
    const BACKLOG: u64 = 20_000;
    const LIVE: u64 = 300;
    let epoch = publish_many("s:backlog", BACKLOG as usize, 1000);
    let mut reader = SlowReader::open("/ws");
    reader.send(&format!(
        r#"{{"type":"subscribe","topic":"s:backlog","since":{{"offset":0,"epoch":"{epoch}"}}}}"#
    ));
    let subscribed = reader.next();
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    // More arrive while the replay is paging out: they follow it, once.
    let publisher = std::thread::spawn(|| publish_many("s:backlog", LIVE as usize, 1000));
    let mut next = 1;
    while next <= BACKLOG + LIVE {
        let push = reader.next();
        assert_eq!(push["type"], "push", "{push}");
        assert_eq!(
            push["offset"].as_u64(),
            Some(next),
            "in order, no gap, no duplicate"
        );
        if next % 500 == 0 {
            std::thread::sleep(Duration::from_millis(5)); // a reader that reads, slowly
        }
        next += 1;
    }
    publisher.join().unwrap();
    assert!(metric("stream_replays") <= 2, "the replay finished");
    still_healthy();
}

#[test]
fn sixty_megabytes_of_last_values_and_history_go_out_a_page_at_a_time() {
    let _turn = turn(&STREAM_TABLE);
    big_history();

    // replay_on_subscribe = 1000 of 60 KB each: 60 times the budget.
    let mut reader = SlowReader::open("/ws");
    reader.send(r#"{"type":"subscribe","topic":"r:big"}"#);
    assert_eq!(reader.next()["type"], "subscribed");
    for offset in 1..=1000u64 {
        let push = reader.next();
        assert_eq!(
            (push["offset"].as_u64(), &push["replay"]),
            (Some(offset), &Value::Bool(true))
        );
    }

    // Over HTTP, on one keep-alive connection: pages that fit the budget,
    // each naming the next.
    let mut stream = connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut since = 0;
    let mut seen = 0;
    loop {
        stream
            .write_all(get(&format!("/topics/r:big/history?since={since}")).as_bytes())
            .unwrap();
        let (status, _, body) = read_response(&mut reader);
        assert_eq!(status, 200);
        assert!(
            body.len() <= OUTBOUND_BUDGET,
            "a page of {} bytes",
            body.len()
        );
        let page: Value = serde_json::from_slice(&body).unwrap();
        for publication in page["publications"].as_array().unwrap() {
            seen += 1;
            assert_eq!(publication["offset"].as_u64(), Some(seen));
        }
        match page["next"].as_u64() {
            Some(next) => since = next,
            None => break,
        }
    }
    assert_eq!(seen, 1000);
    still_healthy();
}

/// `r:big`: 1,000 publications of 60 KB, published once for the tests
/// that read it.
fn big_history() {
    static PUBLISHED: OnceLock<()> = OnceLock::new();
    PUBLISHED.get_or_init(|| {
        publish_many("r:big", 1000, 60_000);
    });
}

#[test]
fn unread_connection_close_answers_hold_at_most_their_budget_each() {
    let _turn = turn(&STREAM_TABLE);
    big_history();
    // A hundred requests for 60 MB of history that never read their answer:
    // each answer is a page within the budget, not a copy of it all.
    let before = rss_bytes();
    let unread: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut stream = connect();
            let request = "GET /topics/r:big/history HTTP/1.1\r\nHost: x\r\n\
                           Authorization: Bearer hostile-key\r\nConnection: close\r\n\r\n";
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 100 * OUTBOUND_BUDGET as u64,
        "100 unread answers grew RSS by {} MiB",
        grown >> 20
    );
    let outbound: u64 = per_shard("memory_outbound_bytes").iter().sum();
    assert!(
        outbound <= 100 * OUTBOUND_BUDGET as u64,
        "{outbound} bytes queued"
    );
    drop(unread);
    still_healthy();
}

// ---- names ------------------------------------------------------------------------

#[test]
fn names_longer_than_the_limit_are_refused_with_400() {
    let long = "u".repeat(300);
    let huge = "u".repeat(900_000);
    let (status, body) = server().http_with_key(
        "POST",
        "/register",
        Some(&format!(r#"{{"user_id":"{huge}"}}"#)),
        API_KEY,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("user_id"), "{body}");
    assert_eq!(
        server().upgrade_status(&format!("/ws?user_id={long}"), ""),
        400
    );
    assert_eq!(
        server().upgrade_status(&format!("/chat?user_id=a&recipient_id={long}"), ""),
        400
    );
    let event = format!(r#"{{"topic":"t","event":"{long}","payload":1}}"#);
    assert_eq!(
        server()
            .http_with_key("POST", "/publish", Some(&event), API_KEY)
            .0,
        400
    );
    still_healthy();
}

// ---- partial input ------------------------------------------------------------------

#[test]
fn stalled_partial_bodies_are_bounded_by_the_shards_inbound_budget() {
    let _turn = turn(&INBOUND);
    let evicted = metric_or_zero("inbound_evictions_total");
    // Each sends nine tenths of a 1 MB body and stops: four times the
    // node's budget in all.
    let stalled: Vec<TcpStream> = (0..36)
        .map(|_| {
            let mut stream = connect();
            let head = format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&vec![b' '; 900_000]).unwrap();
            stream
        })
        .collect();
    // 32 MB sent against 8 MiB of budget: at least 24 are closed at once
    // (not after the 30 s idle timeout). An evicted sender reads 408, or a
    // reset when the server closed with its unread bytes still queued.
    std::thread::sleep(Duration::from_millis(500));
    let closed = stalled
        .iter()
        .filter(|s| closed_with(s, |head| head == b"HTTP/1.1 408"))
        .count();
    assert!(closed >= 24, "{closed} of 36 stalled senders were closed");
    inbound_within_budget();
    assert!(metric("inbound_evictions_total") >= evicted + 24);
    still_healthy();
}

#[test]
fn stalled_partial_websocket_messages_are_bounded_too() {
    let _turn = turn(&INBOUND);
    let evicted = metric_or_zero("inbound_evictions_total");
    // 60 KB frames cut after 50 KB, on 400 connections: 20 MB in all
    // against 8 MiB of budget (each holds at most 64 KiB): at least 100 go.
    let mut frame = client_text_frame(&format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(60_000)
    ));
    frame.truncate(50_000);
    let stalled: Vec<TcpStream> = (0..400)
        .map(|_| {
            let mut stream = server().raw_ws("/ws", None);
            stream.write_all(&frame).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A close frame is 2 + 2 bytes of code + the reason: 0x88, its length, 1008.
    let closed = stalled
        .iter()
        .filter(|s| {
            closed_with(s, |head| {
                head[0] == 0x88 && head[2..4] == 1008u16.to_be_bytes()
            })
        })
        .count();
    assert!(
        closed >= 100,
        "{closed} of 400 stalled messages were closed"
    );
    inbound_within_budget();
    assert!(metric("inbound_evictions_total") >= evicted + 100);
    still_healthy();
}

// ---- presence ------------------------------------------------------------------------

#[test]
fn presence_answers_are_capped_paged_and_rate_limited() {
    let members: Vec<_> = (0..150)
        .map(|_| {
            let mut ws = server().ws("/ws");
            ws.subscribe("p:crowd");
            ws
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    let mut after = String::new();
    loop {
        let (status, body) = server().http_with_key(
            "GET",
            &format!("/topics/p:crowd/presence{after}"),
            None,
            API_KEY,
        );
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["count"], 150, "the count is exact on every page");
        let listed = page["members"].as_array().unwrap();
        assert!(
            listed.len() <= 100,
            "{} members in one answer",
            listed.len()
        );
        for member in listed {
            assert!(ids.insert(member["conn_id"].as_str().unwrap().to_string()));
        }
        match page["next"].as_str() {
            Some(next) => after = format!("?after={next}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 150, "the pages cover every member once");

    // A client asking in a loop is held to its rate.
    let requests: Vec<String> = (0..30)
        .map(|_| get("/topics/p:crowd/presence?limit=1"))
        .collect();
    let statuses: Vec<u16> = pipelined(&requests).iter().map(|(s, _)| *s).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    drop(members);
    still_healthy();
}

// ---- stream positions ------------------------------------------------------------------

#[test]
fn a_position_must_be_an_object_and_a_long_epoch_is_not_echoed() {
    let _turn = turn(&STREAM_TABLE);
    let mut ws = server().ws("/ws");
    ws.send_text(r#"{"type":"subscribe","topic":"s:pos","since":[1,"e"]}"#);
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "error", "{reply}");
    let epoch = "e".repeat(10_000);
    publish_many("s:pos", 1, 10);
    let (status, body) = server().http_with_key(
        "GET",
        &format!("/topics/s:pos/history?since=0&epoch={epoch}"),
        None,
        API_KEY,
    );
    assert_eq!(status, 410);
    assert!(body.len() < 512, "a 410 of {} bytes", body.len());
    still_healthy();
}

// ---- attacks from earlier issues ------------------------------------------------------

/// Just under the default 1 MiB body limit.
const BODY_BYTES: usize = 1_000_000;

#[test]
fn a_megabyte_in_one_byte_chunks_does_not_hold_the_shard() {
    let _turn = turn(&INBOUND);
    let prefix = r#"{"topic":"t","message":""#;
    let suffix = r#""}"#;
    let body: Vec<u8> = prefix
        .bytes()
        .chain(std::iter::repeat(b'x').take(BODY_BYTES - prefix.len() - suffix.len()))
        .chain(suffix.bytes())
        .collect();
    let mut request = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for byte in &body {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let trickle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut conn = connect();
        conn.set_read_timeout(Some(IO_TIMEOUT * 3)).unwrap();
        for piece in request.chunks(64 * 1024) {
            conn.write_all(piece).unwrap();
        }
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).unwrap();
        (String::from_utf8_lossy(&head).into_owned(), start.elapsed())
    });
    let mut slowest = Duration::ZERO;
    while !trickle.is_finished() {
        let start = Instant::now();
        assert_eq!(server().http("GET", "/health", None).0, 200);
        slowest = slowest.max(start.elapsed());
    }
    let (status, took) = trickle.join().unwrap();
    assert_eq!(status, "HTTP/1.1 202", "the publish is accepted");
    assert!(
        slowest < Duration::from_secs(1),
        "/health waited {slowest:?}"
    );
    assert!(took < Duration::from_secs(10), "the publish took {took:?}");
    still_healthy();
}

#[test]
fn a_publish_nested_half_a_million_deep_is_refused() {
    let depth = 500_000;
    let payload = "[".repeat(depth) + &"]".repeat(depth);
    let body = format!(r#"{{"topic":"t","payload":{payload}}}"#);
    let (status, reply) = server().http_with_key("POST", "/publish", Some(&body), API_KEY);
    assert_eq!(status, 400);
    assert!(reply.contains("nested deeper than 128"), "{reply}");
    still_healthy();
}

#[test]
fn an_http_1_0_upgrade_is_refused() {
    let reply = server().raw(b"GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    still_healthy();
}

#[test]
fn a_subscriber_flooding_its_own_topic_without_reading_is_closed_with_1013() {
    // Its own server: the test waits for the close on the server's counter,
    // which the suite's other slow consumers would move too.
    let server = TestServer::start(2, Some(&config()));
    let mut flood = server.raw_ws("/ws", Some(4096));
    flood
        .write_all(&client_text_frame(
            r#"{"type":"subscribe","topic":"self-flood"}"#,
        ))
        .unwrap();
    let (_, subscribed) = read_server_frame(&mut flood).unwrap();
    assert!(String::from_utf8_lossy(&subscribed).contains("subscribed"));
    let message = client_text_frame(&format!(
        r#"{{"type":"message","topic":"self-flood","payload":"{}"}}"#,
        "x".repeat(8000)
    ));
    // It never reads: its own pushes fill the server's socket, then pile
    // up until the budget closes it; only then does it read.
    server.flood_until_closed(&mut flood, &message, OUTBOUND_BUDGET);
    let code = loop {
        match read_server_frame(&mut flood) {
            Ok((0x8, payload)) => break close_code(&payload),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(1013));
    assert_eq!(server.http("GET", "/health", None).0, 200);
}

#[test]
fn registrations_past_the_limit_get_503_and_hold_their_bytes_in_the_gauge() {
    let before = metric_or_zero("memory_registrations_bytes");
    let requests: Vec<String> = (0..1010)
        .map(|i| post("/register", &format!(r#"{{"user_id":"hostile-{i}"}}"#)))
        .collect();
    let statuses: Vec<u16> = pipelined(&requests).iter().map(|(s, _)| *s).collect();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1000);
    std::thread::sleep(Duration::from_millis(1100));
    let after: u64 = per_shard("memory_registrations_bytes").iter().sum();
    assert!(after > before, "registrations are counted in bytes");
    still_healthy();
}

#[test]
fn an_event_stream_that_sends_endless_input_holds_none_of_it() {
    let mut stream = connect();
    stream
        .write_all(b"GET /sse?topic=chatty HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // Nothing is asked after the request: 32 MB of garbage (more than
    // both shards' inbound budgets) is read and dropped, never held.
    let garbage = vec![b'x'; 1 << 20];
    for _ in 0..32 {
        stream.write_all(&garbage).unwrap();
    }
    inbound_within_budget();
    let body = r#"{"topic":"chatty","event":"still","payload":1}"#;
    assert_eq!(status_of(&post("/publish", body)) / 100, 2);
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "event: still\n" {
            break;
        }
    }
    still_healthy();
}

#[test]
fn an_event_stream_cursor_or_topic_list_past_its_bounds_is_refused() {
    // More topics than a connection may subscribe, and a cursor naming
    // more positions than topics or an epoch too long to be one.
    let topics: String = (0..200).map(|i| format!("topic=t{i}&")).collect();
    assert_eq!(status_of(&get(&format!("/sse?{topics}"))), 400);
    let cursor = format!("1.{}", "e".repeat(65));
    let path = format!("/sse?topic=s:c&last_event_id={cursor}");
    assert_eq!(status_of(&get(&path)), 400);
    assert_eq!(status_of(&get("/stream?topic=a&since=1.e,2.e")), 400);
    still_healthy();
}

/// The status of one request on a fresh connection.
fn status_of(request: &str) -> u16 {
    let mut stream = connect();
    stream.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(stream)).0
}

#[test]
fn a_page_of_another_site_cannot_open_a_websocket_or_event_stream() {
    // Cross-site WebSocket hijacking: a page elsewhere opening a connection
    // that would carry its visitor's cookies. Not allowed by default.
    let evil = "Origin: https://evil.example\r\n";
    assert_eq!(server().upgrade_status("/ws", evil), 403);
    assert_eq!(
        server().upgrade_status("/chat?user_id=a&recipient_id=b", evil),
        403
    );
    let request = format!("GET /sse?topic=x HTTP/1.1\r\nHost: x\r\n{evil}\r\n");
    assert_eq!(status_of(&request), 403);
    still_healthy();
}

#[test]
fn a_compressed_bomb_is_refused_with_1009() {
    use flate2::{Compress, Compression, FlushCompress};
    // 32 MiB of spaces in a 32 KiB frame: inflating it would pass the
    // message limit a thousand times over.
    let spaces = vec![b' '; 32 << 20];
    let mut packed = Vec::with_capacity(64 << 10);
    Compress::new(Compression::best(), false)
        .compress_vec(&spaces, &mut packed, FlushCompress::Sync)
        .unwrap();
    packed.truncate(packed.len() - 4);
    let mut frame = client_text_frame(&"x".repeat(packed.len()));
    frame[0] = 0xc1;
    let start = frame.len() - packed.len();
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    for (i, b) in packed.iter().enumerate() {
        frame[start + i] = b ^ mask[i % 4];
    }
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = server().raw_ws_offering("/ws", "permessage-deflate");
        ws.write_all(&frame).unwrap();
        clients.push(ws);
    }
    for ws in &mut clients {
        let code = loop {
            match read_server_frame(ws) {
                Ok((0x8, payload)) => break close_code(&payload),
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, Some(1009));
    }
    still_healthy();
}

/// Pusher's app key is public (it is in every client): forged triggers
/// with it and a fresh timestamp, each with a 64 KiB body, are refused on
/// the signature before the body is hashed or parsed, and private
/// and presence subscriptions without an authorization are refused before
/// the core holds anything.
#[test]
fn forged_pusher_triggers_and_unauthorized_private_subscriptions_hold_nothing() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no Pusher apps
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = format!(
        r#"{{"name":"e","channels":["c"],"data":"{}"}}"#,
        "x".repeat(64 << 10)
    );
    let forged: Vec<String> = (0..300)
        .map(|i| {
            post(
                &format!(
                    "/apps/4711/events?auth_key=app-key&auth_timestamp={now}&auth_version=1.0\
                     &body_md5=00&auth_signature={i:064x}"
                ),
                &body,
            )
        })
        .collect();
    for (status, _) in pipelined(&forged) {
        assert_eq!(status, 401);
    }
    let subscriptions = metric("subscriptions");
    let mut ws = server().ws("/app/app-key");
    assert_eq!(ws.recv_json()["event"], "pusher:connection_established");
    for i in 0..200 {
        ws.send_text(&format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"private-{i}","auth":"app-key:{i:064x}"}}}}"#
        ));
        assert_eq!(ws.recv_json()["event"], "pusher:subscription_error");
        // A presence member is a signed channel_data: a forged one holds
        // no subscription, member or presence gather.
        let member = format!(
            r#"{{\"user_id\":\"u{i}\",\"user_info\":\"{}\"}}"#,
            "x".repeat(900)
        );
        ws.send_text(&format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"presence-{i}","auth":"app-key:{i:064x}","channel_data":"{member}"}}}}"#
        ));
        assert_eq!(ws.recv_json()["event"], "pusher:subscription_error");
    }
    assert_eq!(metric("subscriptions"), subscriptions);
    still_healthy();
}

/// A Pusher client that floods a private channel it may use with client
/// events (1,000 of 8 KiB, written without reading) gets Pusher's 4301 past
/// 10 a second; the channel's other subscriber gets at most the 10 of each
/// second, and the node stays healthy.
#[test]
fn a_client_event_flood_is_cut_at_ten_a_second() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no Pusher apps
    }
    let subscribe = |ws: &mut Ws| {
        let established = ws.recv_json();
        let data: serde_json::Value =
            serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
        let socket_id = data["socket_id"].as_str().unwrap().to_string();
        let signature = ringcast::pusher::sign::hmac_hex(
            "app-secret",
            format!("{socket_id}:private-flood").as_bytes(),
        );
        ws.send_text(&format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"private-flood","auth":"app-key:{signature}"}}}}"#
        ));
        assert_eq!(
            ws.recv_json()["event"],
            "pusher_internal:subscription_succeeded"
        );
    };
    let mut reader = server().ws("/app/app-key");
    subscribe(&mut reader);
    let mut flooder = server().ws("/app/app-key");
    subscribe(&mut flooder);
    let event = format!(
        r#"{{"event":"client-x","channel":"private-flood","data":{{"pad":"{}"}}}}"#,
        "x".repeat(8 << 10)
    );
    let started = Instant::now();
    for _ in 0..1000 {
        flooder.send_text(&event);
    }
    // What each side got, until it has been quiet a while.
    let drain = |ws: &mut Ws| -> Vec<Value> {
        let mut got = Vec::new();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.0.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
        }
        while let Ok(message) = ws.0.read() {
            got.push(serde_json::from_str(message.to_text().unwrap()).unwrap());
        }
        got
    };
    let refusals = drain(&mut flooder);
    let seconds = started.elapsed().as_secs() + 1;
    assert!(
        refusals.iter().all(|r| r["data"]["code"] == 4301),
        "only refusals, never its own event back: {:?}",
        refusals.iter().find(|r| r["data"]["code"] != 4301)
    );
    let relayed = drain(&mut reader);
    assert!(relayed.iter().all(|e| e["event"] == "client-x"));
    assert_eq!(
        relayed.len() + refusals.len(),
        1000,
        "each event relayed or refused"
    );
    assert!(
        (10..=10 * seconds as usize + 10).contains(&relayed.len()),
        "{} relayed in about {seconds} s",
        relayed.len()
    );
    still_healthy();
}

/// Pusher's HTTP API past the trigger: channel queries (which park a
/// request over a gather of every shard) and terminations, forged with the
/// public app key, are refused (401) on the signature before anything is
/// parked, gathered or published; forged sign-ins are closed with 4009 and leave
/// no signed-in user behind (a second one on the same socket is never
/// read).
#[test]
fn forged_pusher_queries_terminations_and_signins_hold_nothing() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no Pusher apps
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |i: usize| {
        format!("auth_key=app-key&auth_timestamp={now}&auth_version=1.0&auth_signature={i:064x}")
    };
    let mut forged = Vec::new();
    for i in 0..300 {
        let query = signed(i);
        forged.push(get(&format!(
            "/apps/4711/channels?filter_by_prefix=presence-&info=user_count&{query}"
        )));
        forged.push(get(&format!(
            "/apps/4711/channels/presence-{i}/users?{query}"
        )));
        forged.push(post(
            &format!("/apps/4711/users/u{i}/terminate_connections?{query}&body_md5=00"),
            "{}",
        ));
        forged.push(post(
            &format!("/users/u{i}/terminate_connections?{query}&body_md5=00"),
            "{}",
        ));
    }
    for (status, _) in pipelined(&forged) {
        assert_eq!(status, 401);
    }
    for i in 0..100 {
        let mut ws = server().ws("/app/app-key");
        assert_eq!(ws.recv_json()["event"], "pusher:connection_established");
        let signin = format!(
            r#"{{"event":"pusher:signin","data":{{"auth":"app-key:{i:064x}","user_data":"{{\"id\":\"u{i}\"}}"}}}}"#
        );
        ws.send_text(&signin);
        ws.send_text(&signin);
        let refused = ws.recv_json();
        assert_eq!(refused["data"]["code"], 4009, "{refused}");
        assert_eq!(ws.expect_close(), 4009);
    }
    still_healthy();
}

/// Public cache channels need no authorization, and each is a stream of
/// one: a client holds at most its `max_subscriptions_per_connection` of
/// them (each answered with `pusher:cache_miss`, the next refused), and a
/// stream nobody published to goes with its last subscriber.
#[test]
fn cache_channel_subscriptions_hold_streams_only_while_held() {
    if std::env::var_os("RINGCAST_TEST_BIN").is_some() {
        return; // an older build has no Pusher apps
    }
    leaves_no_stream("cache streams outlived their subscriber", |before| {
        let mut ws = server().ws("/app/app-key");
        assert_eq!(ws.recv_json()["event"], "pusher:connection_established");
        for i in 0..50 {
            ws.send_text(&format!(
                r#"{{"event":"pusher:subscribe","data":{{"channel":"cache-hostile-{i}"}}}}"#
            ));
            let succeeded = ws.recv_json();
            assert_eq!(
                succeeded["event"], "pusher_internal:subscription_succeeded",
                "{succeeded}"
            );
            assert_eq!(ws.recv_json()["event"], "pusher:cache_miss");
        }
        ws.send_text(r#"{"event":"pusher:subscribe","data":{"channel":"cache-hostile-50"}}"#);
        let refused = ws.recv_json();
        assert_eq!(refused["event"], "pusher:error", "the 51st: {refused}");
        let held = metric("streams");
        assert!(held <= before + 50, "{held} streams for 50 subscriptions");
    });
}
