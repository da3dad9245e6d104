//! Three ringcast nodes of two shards each joined through one private
//! `redis-server`, and the probes the cluster tests share: a node's view of
//! Redis, polling with a deadline, connections on every shard, silence checks.
//! Test files that need Redis include it with
//! `#[path = "common/cluster.rs"] mod cluster;` beside `mod common;`, so the
//! other test binaries do not compile it.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

use crate::common::redis::RedisServer;
use crate::common::{TestServer, Ws, IO_TIMEOUT};

/// Shards per node: two, so a node also routes between its own shards.
pub const SHARDS: usize = 2;

/// Longest wait for a node to see Redis leave or come back. Reconnects back
/// off to about 2 s between attempts; the rest is room for a machine running
/// every test at once. Only a failing test waits this long.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection must stay silent to count as having nothing more on
/// its way (a duplicate, a stray delivery): long against a hop through
/// loopback Redis, short enough to keep the suite quick. A silence check can
/// miss a very late duplicate; it never fails a correct relay.
pub const QUIET: Duration = Duration::from_millis(500);

/// One Redis and nodes `a`, `b` and `c`, each told about Redis in `[cluster]`.
pub struct Cluster {
    // Fields drop in order: the nodes are killed before Redis.
    pub a: TestServer,
    pub b: TestServer,
    pub c: TestServer,
    pub redis: RedisServer,
}

impl Cluster {
    /// Starts Redis and the three nodes, and returns once every node reports
    /// Redis up (before that a node is degraded and delivers only locally).
    pub fn start() -> Cluster {
        Cluster::start_with(RedisServer::start(), "")
    }

    /// The same around a Redis the caller started (a persistent one), with
    /// `config` (rules, limits) added to every node's configuration file.
    pub fn start_with(redis: RedisServer, config: &str) -> Cluster {
        let cluster = Cluster {
            a: start_node_with(&redis, "a", config),
            b: start_node_with(&redis, "b", config),
            c: start_node_with(&redis, "c", config),
            redis,
        };
        for (name, node) in cluster.nodes() {
            wait_for_redis(node, name, Redis::Up);
        }
        cluster
    }

    pub fn nodes(&self) -> [(&'static str, &TestServer); 3] {
        [("a", &self.a), ("b", &self.b), ("c", &self.c)]
    }
}

/// A node of two shards joined to `redis` under the name `name`.
pub fn start_node(redis: &RedisServer, name: &str) -> TestServer {
    start_node_with(redis, name, "")
}

/// The same with `config` after the `[cluster]` table.
pub fn start_node_with(redis: &RedisServer, name: &str, config: &str) -> TestServer {
    let config = format!(
        "[cluster]\nredis_url = \"{}\"\nnode_name = \"{name}\"\nprefix = \"ringcast-test\"\n{config}",
        redis.url()
    );
    TestServer::start(SHARDS, Some(&config))
}

/// Whether a node can reach Redis, as `/health` and the metrics tell it.
#[derive(Debug, Clone, Copy)]
pub enum Redis {
    Up,
    Down,
}

/// `/health` as JSON; it answers 200 whether or not Redis is reachable.
pub fn health(node: &TestServer) -> Value {
    let (status, body) = node.http("GET", "/health", None);
    assert_eq!(
        status, 200,
        "/health answers 200 even when degraded: {body}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON: {body:?}: {e}"))
}

/// Waits until `node` reports Redis `state` both in `/health` (`status` and
/// `cluster.redis`) and in `ringcast_cluster_up`, and checks its name there.
pub fn wait_for_redis(node: &TestServer, name: &str, state: Redis) {
    let (status, redis, up) = match state {
        Redis::Up => ("ok", "up", 1),
        Redis::Down => ("degraded", "down", 0),
    };
    wait_until(&format!("node {name} to see Redis {redis}"), || {
        let health = health(node);
        let cluster_up = node.metric("cluster_up");
        if health["status"] == status && health["cluster"]["redis"] == redis && cluster_up == up {
            Ok(())
        } else {
            Err(format!(
                "/health {health}, ringcast_cluster_up {cluster_up}"
            ))
        }
    });
    assert_eq!(health(node)["cluster"]["node"], name);
}

/// Polls `probe` until it succeeds; panics with its last error after
/// `CLUSTER_TIMEOUT`.
pub fn wait_until(what: &str, mut probe: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(()) => return,
            Err(last) => assert!(
                start.elapsed() < CLUSTER_TIMEOUT,
                "timed out after {CLUSTER_TIMEOUT:?} waiting for {what}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens subscribers to `topic` on `node` until each of its shards holds at
/// least `per_shard` more WebSockets than before (SO_REUSEPORT spreads
/// connections by hash, so the number needed varies).
pub fn subscribers_on_every_shard(node: &TestServer, topic: &str, per_shard: u64) -> Vec<Ws> {
    connections_on_every_shard(node, per_shard, |ws| ws.subscribe(topic))
}

/// The same with `open` run on each new connection (a subscribe whose
/// reply carries more than `ws.subscribe` expects, a stream position).
pub fn connections_on_every_shard(
    node: &TestServer,
    per_shard: u64,
    mut open: impl FnMut(&mut Ws),
) -> Vec<Ws> {
    let count = |shard| node.shard_metric("websockets", shard);
    let before: Vec<u64> = (0..SHARDS).map(count).collect();
    let mut connections = Vec::new();
    while (0..SHARDS).any(|shard| count(shard) < before[shard] + per_shard) {
        assert!(
            connections.len() < 100,
            "100 connections did not reach every shard"
        );
        let mut ws = node.ws("/ws");
        open(&mut ws);
        connections.push(ws);
    }
    connections
}

/// The next text message if one arrives within `wait`.
pub fn recv_within(ws: &mut Ws, wait: Duration) -> Option<String> {
    let set_timeout = |ws: &mut Ws, timeout| {
        if let MaybeTlsStream::Plain(stream) = ws.0.get_mut() {
            stream.set_read_timeout(Some(timeout)).unwrap();
        }
    };
    // One deadline for the whole wait: the server pings an idle connection
    // every 25 s, and a timeout restarted after each ping would never expire
    // for a `wait` longer than that.
    let deadline = Instant::now() + wait;
    let message = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        set_timeout(ws, left);
        match ws.0.read() {
            Ok(Message::Text(text)) => break Some(text.to_string()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected text, got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break None
            }
            Err(e) => panic!("read failed: {e}"),
        }
    };
    set_timeout(ws, IO_TIMEOUT);
    message
}

/// Asserts nothing more arrives on `ws` (a duplicate or a stray delivery).
pub fn assert_quiet(ws: &mut Ws, who: &str) {
    if let Some(message) = recv_within(ws, QUIET) {
        panic!("{who} expected nothing more, got {message}");
    }
}
