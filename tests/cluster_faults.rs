//! The cluster under the faults an operator and a hostile client bring:
//! churn from one connection, a stalled Redis, publishes during a stall.
//! Each test is the regression test of a fault the previous main had;
//! `RINGCAST_TEST_BIN=<old build>` shows it failing there.
#[path = "common/cluster.rs"]
mod cluster;
mod common;

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

/// The memory bound every node keeps through every test here: a debug
/// build idles at 30-60 MiB; the stall test's queue bound adds 16-64 MiB.
const NODE_BOUND: u64 = 320 << 20;

/// Every fault leaves the node within its bound.
fn assert_within_bound(node: &TestServer, name: &str) {
    let rss = node.rss_bytes();
    assert!(
        rss <= NODE_BOUND,
        "node {name}: RSS {} MiB over the bound of {} MiB",
        rss >> 20,
        NODE_BOUND >> 20
    );
}

/// One connection subscribing to and leaving unique topics `prefix-N` as
/// fast as it can write, for `how_long`, with a thread reading its answers.
/// Stops early when `abort` says so (a node growing past its bound).
/// Returns how many `unsubscribed` came back (a subscribe left before
/// its `subscribed` gets none).
fn churn(node: &TestServer, prefix: &str, how_long: Duration, abort: impl Fn() -> bool) -> u64 {
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
        // Paced by its answers, as a client that reads them: a client far
        // behind is closed as a slow consumer, which is another test.
        while n > subscribed.load(Ordering::Relaxed) + 5000 && start.elapsed() < how_long {
            std::thread::sleep(Duration::from_millis(1));
        }
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
        if let Err(e) = stream.write_all(&batch) {
            eprintln!("churn: write failed after {:?}: {e}", start.elapsed());
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
    println!("after {answered} churned subscriptions a fresh subscribe waited {waited:?}");
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
    assert_within_bound(&node, "a");
}

/// Fault: every presence join and leave spawned its own unbounded task
/// writing Redis; churn with presence on grew a node by ~750 MB/s.
#[test]
fn presence_churn_keeps_a_node_within_its_memory_bound() {
    let redis = RedisServer::start();
    let node = start_node_with(&redis, "a", PRESENCE_RULES);
    wait_for_redis(&node, "a", Redis::Up);

    let peak = AtomicU64::new(0);
    let over = || {
        let rss = node.rss_bytes();
        peak.fetch_max(rss, Ordering::Relaxed);
        rss > NODE_BOUND
    };
    let answered = churn(&node, "room:churn", Duration::from_secs(4), over);
    let peak = peak.load(Ordering::Relaxed).max(node.rss_bytes());
    assert!(
        peak <= NODE_BOUND,
        "RSS reached {} MiB under presence churn (bound {} MiB)",
        peak >> 20,
        NODE_BOUND >> 20
    );
    assert!(answered > 1000, "the churn was answered {answered} times");
    println!(
        "{answered} presence subscriptions churned; peak RSS {} MiB",
        peak >> 20
    );

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

/// Attack: Pusher presence churn on two nodes, each connection a user's
/// first or last (half of them closed before their subscription is even
/// answered), so every one is a transition Redis decides. The nodes stay
/// within their bound and healthy, a member watching from the start is
/// last told every churned user gone (none left behind, none told gone
/// while still there), and Redis keeps no user of the channel afterwards.
#[test]
fn pusher_presence_churn_leaves_no_member_behind() {
    let redis = RedisServer::start();
    let config = format!("presence_ttl_s = 3\n{}", common::pusher::APP);
    let a = start_node_with(&redis, "a", &config);
    let b = start_node_with(&redis, "b", &config);
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    let channel = "presence-churn";
    let (mut watcher, _) = common::pusher::presence_member(&a, channel, "watcher");

    let start = Instant::now();
    let mut churned = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        churned += 1;
        let node = if churned % 2 == 0 { &a } else { &b };
        let user = format!("u{}", churned % 20);
        if churned % 3 == 0 {
            // Gone before the subscription is answered.
            drop(common::pusher::subscribe_presence(node, channel, &user));
        } else {
            drop(common::pusher::presence_member(node, channel, &user));
        }
    }
    for node in [&a, &b] {
        assert!(node.rss_bytes() <= NODE_BOUND, "a node grew past its bound");
        assert_eq!(node.http("GET", "/health", None).0, 200);
    }

    // What the watcher was last told of each user: gone.
    let mut last = std::collections::BTreeMap::new();
    while let Some(text) = cluster::recv_within(&mut watcher, Duration::from_secs(3)) {
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(event["data"].as_str().unwrap_or("{}")).unwrap();
        let user = data["user_id"].as_str().unwrap_or_default().to_string();
        match event["event"].as_str() {
            Some("pusher_internal:member_added") => last.insert(user, "added"),
            Some("pusher_internal:member_removed") => last.insert(user, "removed"),
            _ => None,
        };
    }
    assert!(last.len() >= 10, "the churned users were told: {last:?}");
    let left: Vec<_> = last.iter().filter(|(_, e)| **e != "removed").collect();
    assert!(left.is_empty(), "{churned} churned; left behind: {left:?}");
    let users = redis.cmd(&[
        "HKEYS",
        &format!("ringcast-test:pm:{{\u{1}4711\u{1}{channel}}}"),
    ]);
    assert_eq!(users.trim(), "watcher", "Redis holds only the watcher");
    println!("{churned} presence connections churned over two nodes");
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
                    peak.fetch_max(common::rss_of(pid).unwrap_or(0), Ordering::Relaxed);
                    if degraded.load(Ordering::Relaxed) == u64::MAX && health_of(addr) == "degraded"
                    {
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
    let redis = RedisServer::start();
    // A bound the publishers reach well before the node turns degraded,
    // however slowly a loaded machine lets them go.
    let bounded = "max_queued_bytes = 16777216\n";
    let a = start_node_with(&redis, "a", bounded);
    let b = start_node_with(&redis, "b", bounded);
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
                        && watch.peak() <= NODE_BOUND
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
        peak <= NODE_BOUND,
        "RSS reached {} MiB with Redis stopped (bound {} MiB)",
        peak >> 20,
        NODE_BOUND >> 20
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
    during.subscribe_degraded("during");

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
    let rss = a.rss_bytes();
    assert!(rss <= NODE_BOUND, "RSS {} MiB after the stall", rss >> 20);
}

const STREAM_RULES: &str = r#"
[[rules]]
pattern = "feed:*"
history_size = 1000
history_ttl_s = 300
"#;

fn publish_json(node: &TestServer, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, reply) = node.http("POST", "/publish", Some(&body.to_string()));
    let reply = serde_json::from_str(&reply).unwrap_or(serde_json::Value::String(reply));
    (status, reply)
}

/// Fault: a stream publish Redis did not answer in time was told 503 "not
/// stored", though Redis stored and delivered it once it went on. Now it
/// is told 504 `outcome unknown`, and its retry with the same idempotency
/// key, on any node, gets the first outcome and is stored once.
#[test]
fn a_publish_redis_did_not_answer_is_outcome_unknown_and_its_retry_is_stored_once() {
    use serde_json::json;
    let redis = RedisServer::start();
    let a = start_node_with(&redis, "a", STREAM_RULES);
    let b = start_node_with(&redis, "b", STREAM_RULES);
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    let mut on_b = b.ws("/ws");
    on_b.send_text(r#"{"type":"subscribe","topic":"feed:x"}"#);
    assert_eq!(on_b.recv_json()["type"], "subscribed");
    let (status, first) = publish_json(&a, &json!({"topic":"feed:x","payload":0}));
    assert_eq!(status, 202, "{first}");
    let epoch = first["epoch"].clone();

    redis.pause();
    let keyed = json!({"topic":"feed:x","payload":1,"idempotency_key":"k-1"});
    let (status, unknown) = publish_json(&a, &keyed);
    assert_eq!(status, 504, "a publish Redis did not answer: {unknown}");
    assert_eq!(unknown["outcome"], "unknown", "{unknown}");
    assert!(a.metric("cluster_unknown_total") >= 1);
    redis.resume();
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);

    // The retry, on the other node and again on the first: one outcome.
    let (status, retried) = publish_json(&b, &keyed);
    assert_eq!(status, 202, "{retried}");
    assert_eq!(retried["offset"], 2, "{retried}");
    assert_eq!(retried["epoch"], epoch, "{retried}");
    let (status, again) = publish_json(&a, &keyed);
    assert_eq!((status, &again["offset"]), (202, &json!(2)), "{again}");
    let (status, next) = publish_json(&a, &json!({"topic":"feed:x","payload":3}));
    assert_eq!((status, &next["offset"]), (202, &json!(3)), "{next}");

    let (status, body) = b.http("GET", "/topics/feed:x/history", None);
    assert_eq!(status, 200, "{body}");
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    let stored: Vec<(u64, i64)> = history["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["offset"].as_u64().unwrap(),
                p["payload"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(stored, [(1, 0), (2, 1), (3, 3)], "{body}");
    // b's subscriber got each stored publication once, in order.
    let mut seen = Vec::new();
    while let Some(text) = cluster::recv_within(&mut on_b, Duration::from_secs(2)) {
        let push: serde_json::Value = serde_json::from_str(&text).unwrap();
        seen.push(push["offset"].as_u64().unwrap());
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen, [1, 2, 3]);
    cluster::assert_quiet(&mut on_b, "the subscriber on b");
    assert_within_bound(&a, "a");
    assert_within_bound(&b, "b");
}

/// Fault: a `since` offset at or past 2^53 became a Lua float: the
/// subscriber was told offset 0 of no epoch, and the history GET got 503.
#[test]
fn offsets_past_two_to_the_53_are_not_in_history_rather_than_an_error() {
    use serde_json::json;
    let redis = RedisServer::start();
    let a = start_node_with(&redis, "a", STREAM_RULES);
    wait_for_redis(&a, "a", Redis::Up);
    let (status, first) = publish_json(&a, &json!({"topic":"feed:big","payload":0}));
    assert_eq!(status, 202, "{first}");
    let epoch = first["epoch"].as_str().unwrap().to_string();
    for since in [1u64 << 53, (1 << 53) + 1, u64::MAX] {
        let mut ws = a.ws("/ws");
        let subscribe =
            json!({"type":"subscribe","topic":"feed:big","since":{"offset":since,"epoch":epoch}});
        ws.send_text(&subscribe.to_string());
        let reply = ws.recv_json();
        assert_eq!(reply["type"], "subscribed", "since {since}: {reply}");
        assert_eq!(reply["recovered"], false, "since {since}: {reply}");
        assert_eq!(reply["offset"], 1, "since {since}: {reply}");
        assert_eq!(reply["epoch"], epoch, "since {since}: {reply}");
        let path = format!("/topics/feed:big/history?since={since}&epoch={epoch}");
        let (status, body) = a.http("GET", &path, None);
        assert_eq!(status, 410, "since {since}: {body}");
    }
    assert_within_bound(&a, "a");
}

/// Fault: after Redis restarted empty, a live subscriber's offsets jumped
/// (1080 -> 27): the broker restarted its view of the stream at the new
/// run's latest offset, and nobody told the subscriber the stream had
/// started again. Now it gets a `reset` with the new epoch, then every
/// publication of the new run from offset 1.
#[test]
fn after_redis_restarts_empty_a_live_subscriber_is_told_and_gets_the_new_run_from_its_start() {
    use serde_json::json;
    let mut redis = RedisServer::start();
    let a = start_node_with(&redis, "a", STREAM_RULES);
    let b = start_node_with(&redis, "b", STREAM_RULES);
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);
    let mut on_b = b.ws("/ws");
    on_b.send_text(r#"{"type":"subscribe","topic":"feed:reset"}"#);
    assert_eq!(on_b.recv_json()["type"], "subscribed");
    let next = |ws: &mut common::Ws| -> serde_json::Value {
        let text = cluster::recv_within(ws, Duration::from_secs(5)).expect("a message on b");
        serde_json::from_str(&text).unwrap()
    };
    for n in 1..=3 {
        let (status, reply) = publish_json(&a, &json!({"topic":"feed:reset","payload":n}));
        assert_eq!((status, &reply["offset"]), (202, &json!(n)), "{reply}");
    }
    for n in 1..=3 {
        assert_eq!(next(&mut on_b)["offset"], n);
    }

    redis.restart();
    for (name, node) in [("a", &a), ("b", &b)] {
        wait_until(&format!("node {name} to reconnect"), || {
            match node.metric("cluster_reconnects_total") {
                0 => Err("not yet".into()),
                _ => Ok(()),
            }
        });
        wait_for_redis(node, name, Redis::Up);
    }
    let mut epoch = None;
    for n in 1..=5 {
        // A node may lose Redis again while its second connection notices
        // the restart: 503 is a refusal (nothing stored), retried.
        let body = json!({"topic":"feed:reset","payload":n * 10});
        let mut reply = serde_json::Value::Null;
        wait_until("a publish after the restart to be accepted", || {
            let (status, answer) = publish_json(&a, &body);
            reply = answer;
            match status {
                202 => Ok(()),
                503 => Err(reply.to_string()),
                other => panic!("{other} {reply}"),
            }
        });
        assert_eq!(reply["offset"], n, "{reply}");
        epoch = Some(reply["epoch"].clone());
    }
    let reset = next(&mut on_b);
    assert_eq!(
        reset,
        json!({"type":"reset","topic":"feed:reset","offset":0,"epoch":epoch.unwrap()}),
        "the subscriber is told the stream started again"
    );
    let offsets: Vec<u64> = (0..5)
        .map(|_| next(&mut on_b)["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        [1, 2, 3, 4, 5],
        "the new run, from its first offset"
    );
    cluster::assert_quiet(&mut on_b, "the subscriber on b");
    assert_eq!(b.metric("cluster_stream_resets_total"), 1);
    // The publish script goes by digest; the restarted Redis, which lost
    // its script cache, was sent the text again.
    let stats = redis.cmd(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_evalsha:calls="), "{stats}");
    assert!(stats.contains("cmdstat_eval:calls="), "{stats}");
    assert_within_bound(&a, "a");
    assert_within_bound(&b, "b");
}

/// Fault: SIGTERM closed a node's subscribers once its shards had drained,
/// without waiting for its broker to forward stream publications already
/// acknowledged (1-11 missing in 5 of 11 runs). The broker now takes part
/// in the drain: before the node closes its subscribers it forwards every
/// publication Redis had assigned when the drain began, whichever node
/// acknowledged it. Subscribers on node a, publishers on a and b, five rounds.
#[test]
fn a_node_stopped_with_sigterm_first_delivers_what_it_acknowledged_to_its_subscribers() {
    use serde_json::json;
    let redis = RedisServer::start();
    let b = start_node_with(&redis, "b", STREAM_RULES);
    wait_for_redis(&b, "b", Redis::Up);
    for round in 0..5 {
        let topic = format!("feed:term-{round}");
        let mut a = start_node_with(&redis, "a", STREAM_RULES);
        wait_for_redis(&a, "a", Redis::Up);
        let subscribers = cluster::connections_on_every_shard(&a, 2, |ws| {
            ws.send_text(&json!({"type":"subscribe","topic":topic}).to_string());
            assert_eq!(ws.recv_json()["type"], "subscribed");
        });
        // Each subscriber reads until the server closes it.
        let readers: Vec<_> = subscribers
            .into_iter()
            .map(|mut ws| {
                std::thread::spawn(move || {
                    let mut offsets = Vec::new();
                    let mut code = None;
                    loop {
                        match ws.0.read() {
                            Ok(tungstenite::Message::Text(text)) => {
                                let push: serde_json::Value = serde_json::from_str(&text).unwrap();
                                if let Some(offset) = push["offset"].as_u64() {
                                    offsets.push(offset);
                                }
                            }
                            Ok(tungstenite::Message::Close(frame)) => {
                                code = frame.map(|f| u16::from(f.code));
                                break;
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    (offsets, code)
                })
            })
            .collect();
        let stop = AtomicBool::new(false);
        let signalled = AtomicBool::new(false);
        let acknowledged: Vec<u64> = std::thread::scope(|s| {
            // Two publishing on the node that stops, two on the other.
            let publishers: Vec<_> = [a.addr, a.addr, b.addr, b.addr]
                .into_iter()
                .map(|to| {
                    let (stop, signalled, topic) = (&stop, &signalled, &topic);
                    s.spawn(move || {
                        let mut acked = Vec::new();
                        while !stop.load(Ordering::SeqCst) {
                            let body = json!({"topic":topic,"payload":"x"}).to_string();
                            let Ok(mut stream) = TcpStream::connect(to) else {
                                break;
                            };
                            let request = format!(
                                "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let mut response = String::new();
                            if stream.write_all(request.as_bytes()).is_err()
                                || stream.read_to_string(&mut response).is_err()
                            {
                                break;
                            }
                            // Only what was acknowledged before the signal.
                            if response.starts_with("HTTP/1.1 202") && !signalled.load(Ordering::SeqCst) {
                                let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
                                let reply: serde_json::Value = serde_json::from_str(body).unwrap();
                                acked.push(reply["offset"].as_u64().unwrap());
                            }
                        }
                        acked
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(400));
            signalled.store(true, Ordering::SeqCst);
            a.signal(libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::SeqCst);
            publishers
                .into_iter()
                .flat_map(|p| p.join().unwrap())
                .collect()
        });
        assert!(
            !acknowledged.is_empty(),
            "round {round}: nothing was published"
        );
        for reader in readers {
            let (offsets, code) = reader.join().unwrap();
            assert_eq!(code, Some(1001), "round {round}: closed as the node stops");
            let missing: Vec<&u64> = acknowledged
                .iter()
                .filter(|o| !offsets.contains(o))
                .collect();
            assert!(
                missing.is_empty(),
                "round {round}: a subscriber closed by SIGTERM missed acknowledged offsets {missing:?} (got {} of {})",
                offsets.len(),
                acknowledged.len()
            );
        }
        assert_within_bound(&b, "b");
        assert_eq!(a.terminate(), Some(0));
    }
}

fn register(node: &TestServer, user: &str) -> String {
    let body = serde_json::json!({"user_id": user, "topics": []}).to_string();
    let (status, reply) = node.http("POST", "/register", Some(&body));
    assert_eq!(status, 201, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    reply["id"].as_str().unwrap().to_string()
}

/// Waits until every node answers an upgrade to `/ws/{id}` with `status`.
fn wait_for_upgrade(nodes: &[(&str, &TestServer)], id: &str, status: u16) {
    for (name, node) in nodes {
        wait_until(
            &format!("node {name} to answer /ws/{id} with {status}"),
            || match node.upgrade_status(&format!("/ws/{id}"), "") {
                s if s == status => Ok(()),
                other => Err(format!("{other}")),
            },
        );
    }
}

/// Fault: after Redis restarted empty, nodes that had been running still
/// accepted `/ws/{id}` for registrations Redis no longer held, while a node
/// started afterwards said 404; and a registration deleted while a node was
/// away from Redis lingered on it. Redis is now the truth on every node.
#[test]
fn every_node_answers_a_registration_as_redis_holds_it() {
    let mut redis = RedisServer::start();
    let a = start_node_with(&redis, "a", "");
    let b = start_node_with(&redis, "b", "");
    wait_for_redis(&a, "a", Redis::Up);
    wait_for_redis(&b, "b", Redis::Up);

    // Deleted while the nodes were away: their subscriptions drop, the key
    // goes without an announcement, they come back.
    let away = register(&a, "away");
    wait_for_upgrade(&[("a", &a), ("b", &b)], &away, 101);
    redis.cmd(&["DEL", &format!("ringcast-test:reg:{away}")]);
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    wait_for_upgrade(&[("a", &a), ("b", &b)], &away, 404);

    // Lost with a Redis restarted empty: gone everywhere, like on a node
    // that starts afterwards.
    let lost = register(&b, "lost");
    let also_lost = register(&a, "also lost");
    wait_for_upgrade(&[("a", &a), ("b", &b)], &lost, 101);
    redis.restart();
    let c = start_node_with(&redis, "c", "");
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        wait_for_redis(node, name, Redis::Up);
    }
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    wait_for_upgrade(&nodes, &lost, 404);
    wait_for_upgrade(&nodes, &also_lost, 404);
    // What is registered now is known everywhere.
    let fresh = register(&c, "fresh");
    wait_for_upgrade(&nodes, &fresh, 101);
    for (name, node) in nodes {
        assert_within_bound(node, name);
    }
}
