//! The cluster under the faults an operator and a hostile client bring:
//! churn from one connection, a stalled Redis, publishes during a stall.
//! Each test is the regression test of a fault the previous main had;
//! `RINGCAST_TEST_BIN=<old build>` shows it failing there.
mod common;
#[path = "common/cluster.rs"]
mod cluster;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{start_node_with, wait_for_redis, wait_until, Redis};
use common::redis::RedisServer;
use common::{client_text_frame, TestServer};

const PRESENCE_RULES: &str = r#"
[[rules]]
pattern = "room:*"
presence = true
"#;

/// The resident memory of a node's process.
fn rss_bytes(node: &TestServer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id()))
        .expect("the node is alive");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kb * 1024
}

/// One connection subscribing to and leaving unique topics `prefix-N` as
/// fast as it can write, for `how_long`, with a thread reading its answers.
/// Stops early when `abort` says so (a node growing past its bound).
/// Returns how many `unsubscribed` came back (a subscribe left before
/// its `subscribed` gets none).
fn churn(
    node: &TestServer,
    prefix: &str,
    how_long: Duration,
    abort: impl Fn() -> bool,
) -> u64 {
    let mut stream = node.raw_ws("/ws", None);
    let subscribed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut stream = stream.try_clone().unwrap();
        let (subscribed, done) = (subscribed.clone(), done.clone());
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let needle = b"\"unsubscribed\"";
            let mut carry = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        carry.extend_from_slice(&buf[..n]);
                        let found = carry.windows(needle.len()).filter(|w| w == needle).count();
                        subscribed.fetch_add(found as u64, Ordering::Relaxed);
                        let keep = carry.len().min(needle.len() - 1);
                        carry.drain(..carry.len() - keep);
                    }
                    Err(_) => continue,
                }
            }
        })
    };
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < how_long && !abort() {
        let mut batch = Vec::new();
        for _ in 0..100 {
            n += 1;
            let topic = format!("{prefix}-{n}");
            batch.extend(client_text_frame(&format!(
                r#"{{"type":"subscribe","topic":"{topic}"}}"#
            )));
            batch.extend(client_text_frame(&format!(
                r#"{{"type":"unsubscribe","topic":"{topic}"}}"#
            )));
        }
        if stream.write_all(&batch).is_err() {
            break;
        }
    }
    // Answers still on their way count too.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    subscribed.load(Ordering::Relaxed)
}

/// How long a fresh connection waits for its `subscribed`.
fn time_to_subscribed(node: &TestServer, topic: &str) -> Duration {
    let mut ws = node.ws("/ws");
    let start = Instant::now();
    ws.subscribe(topic);
    start.elapsed()
}

/// Fault: one connection's subscribe/unsubscribe churn queued every change
/// for Redis one at a time, and every later subscribe on the node waited
/// behind the whole queue (56 s after 8 s of churn).
#[test]
fn after_one_clients_churn_a_fresh_subscribe_is_answered_within_two_seconds() {
    let redis = RedisServer::start();
    let node = start_node_with(&redis, "a", "");
    wait_for_redis(&node, "a", Redis::Up);

    let answered = churn(&node, "churn", Duration::from_secs(4), || false);
    assert!(answered > 1000, "the churn was answered {answered} times");

    let waited = time_to_subscribed(&node, "fresh");
    assert!(
        waited < Duration::from_secs(2),
        "a fresh subscribe waited {waited:?} after the churn"
    );
    // And the node still routes between nodes: a second node's publish
    // reaches a subscriber here.
    let other = start_node_with(&redis, "b", "");
    wait_for_redis(&other, "b", Redis::Up);
    let mut ws = node.ws("/ws");
    ws.subscribe("after-churn");
    wait_until("a publish on b to reach a", || {
        let body = r#"{"topic":"after-churn","event":"e","payload":1}"#;
        assert_eq!(other.publish(body), 202);
        match cluster::recv_within(&mut ws, Duration::from_millis(200)) {
            Some(_) => Ok(()),
            None => Err("nothing yet".into()),
        }
    });
    // The churn left no Redis subscription behind.
    wait_until("the churned channels to be unsubscribed", || {
        let held = node.metric("cluster_channels");
        if held <= 2 {
            Ok(())
        } else {
            Err(format!("{held} channels still held"))
        }
    });
}

/// Fault: every presence join and leave spawned its own unbounded task
/// writing Redis; churn with presence on grew a node by ~750 MB/s.
#[test]
fn presence_churn_keeps_a_node_within_its_memory_bound() {
    const BOUND: u64 = 256 << 20;
    let redis = RedisServer::start();
    let node = start_node_with(&redis, "a", PRESENCE_RULES);
    wait_for_redis(&node, "a", Redis::Up);

    let peak = AtomicU64::new(0);
    let over = || {
        let rss = rss_bytes(&node);
        peak.fetch_max(rss, Ordering::Relaxed);
        rss > BOUND
    };
    let answered = churn(&node, "room:churn", Duration::from_secs(4), over);
    let peak = peak.load(Ordering::Relaxed).max(rss_bytes(&node));
    assert!(
        peak <= BOUND,
        "RSS reached {} MiB under presence churn (bound {} MiB)",
        peak >> 20,
        BOUND >> 20
    );
    assert!(answered > 1000, "the churn was answered {answered} times");

    // Every churned member is gone from Redis once the writes settle.
    wait_until("the churned members to leave Redis", || {
        let keys = redis.cmd(&["KEYS", "ringcast-test:p:*"]);
        if keys.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("left: {}", &keys[..keys.len().min(200)]))
        }
    });
    assert_eq!(node.http("GET", "/health", None).0, 200);
    let _ = TcpStream::connect(node.addr).map(|mut s| s.write_all(b""));
}

/// Watches a node while something is done to it: the peak of its RSS and
/// when its `/health` first said `degraded`.
struct Watch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    degraded_after_ms: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(node: &TestServer, since: Instant) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let degraded_after_ms = Arc::new(AtomicU64::new(u64::MAX));
        let (pid, addr) = (node.child.id(), node.addr);
        let thread = {
            let (stop, peak, degraded) = (stop.clone(), peak.clone(), degraded_after_ms.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                    if degraded.load(Ordering::Relaxed) == u64::MAX && health_of(addr) == "degraded" {
                        degraded.store(since.elapsed().as_millis() as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Watch {
            stop,
            peak,
            degraded_after_ms,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn degraded_after(&self) -> Option<Duration> {
        match self.degraded_after_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// `/health`'s `status`, read on a fresh connection with a short timeout.
fn health_of(addr: std::net::SocketAddr) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Fault: with Redis stopped (SIGSTOP) under publish load, `/health` said
/// ok, every publish was answered 202, and the node grew from 100 MB to
/// 5.2 GB in 10 s (the broker's queues counted messages, not bytes).
#[test]
fn a_stalled_redis_turns_the_node_degraded_within_five_seconds_and_never_grows_it() {
    const BOUND: u64 = 320 << 20;
    let redis = RedisServer::start();
    let a = start_node_with(&redis, "a", "");
    let b = start_node_with(&redis, "b", "");
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    // Subscribed before the stall, to a topic the stall's publishes miss.
    let mut on_b = b.ws("/ws");
    on_b.subscribe("quiet");

    redis.pause();
    let paused = Instant::now();
    let watch = Watch::start(&a, paused);
    let body = format!(
        r#"{{"topic":"stall","payload":"{}"}}"#,
        "x".repeat(512 * 1024)
    );
    let mut statuses: Vec<(u16, String)> = Vec::new();
    std::thread::scope(|s| {
        let publishers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut seen = Vec::new();
                    while paused.elapsed() < Duration::from_secs(8)
                        && watch.peak() <= BOUND
                        && watch.degraded_after().is_none()
                    {
                        let (status, reply) = a.http("POST", "/publish", Some(&body));
                        seen.push((status, reply));
                    }
                    seen
                })
            })
            .collect();
        for publisher in publishers {
            statuses.extend(publisher.join().unwrap());
        }
    });
    let peak = watch.peak();
    assert!(
        peak <= BOUND,
        "RSS reached {} MiB with Redis stopped (bound {} MiB)",
        peak >> 20,
        BOUND >> 20
    );
    let degraded = watch
        .degraded_after()
        .expect("/health never said degraded in 8 s of a stopped Redis");
    assert!(
        degraded < Duration::from_secs(5),
        "/health said degraded only {degraded:?} after Redis stopped"
    );
    let busy = statuses
        .iter()
        .filter(|(status, reply)| *status == 503 && reply.contains("cluster busy"))
        .count();
    let accepted = statuses.iter().filter(|(status, _)| *status == 202).count();
    println!(
        "degraded after {degraded:?}; peak RSS {} MiB; {accepted} publishes accepted, {busy} refused as busy",
        peak >> 20
    );
    assert!(
        busy > 0,
        "past max_queued_bytes a publish is refused: {accepted} accepted"
    );
    for (status, reply) in &statuses {
        assert!([202, 503].contains(status), "{status} {reply}");
    }
    drop(watch);
    // Subscribed while Redis is stopped: served once it answers again.
    wait_for_redis(&b, "b", Redis::Down);
    let mut during = b.ws("/ws");
    during.subscribe("during");

    redis.resume();
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    wait_until("the bytes queued for Redis to drain", || {
        match a.metric("cluster_queued_bytes") {
            0 => Ok(()),
            held => Err(format!("{held} bytes still queued")),
        }
    });
    // Across nodes again, for subscriptions made before and during the stall.
    for (topic, ws) in [("quiet", &mut on_b), ("during", &mut during)] {
        let marker = format!(r#"{{"topic":"{topic}","event":"after","payload":1}}"#);
        assert_eq!(a.publish(&marker), 202);
        let text = cluster::recv_within(ws, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("the publish to {topic} after the stall never reached b"));
        assert!(text.contains("\"after\""), "{text}");
    }
    let rss = rss_bytes(&a);
    assert!(rss <= BOUND, "RSS {} MiB after the stall", rss >> 20);
}
