//! Registrations and presence across nodes joined through Redis: three
//! real nodes of two shards and one real Redis, talked to over real sockets.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{assert_quiet, start_node, wait_for_redis, wait_until, Cluster, Redis};
use common::redis::RedisServer;
use serde_json::{json, Value};

/// Rooms track presence; dead nodes' members expire within 3 s.
const PRESENCE: &str = "presence_ttl_s = 3\n\n[[rules]]\npattern = \"room:*\"\npresence = true\n\n[[rules]]\npattern = \"*\"\n";

fn register(node: &common::TestServer, user: &str, topics: &[&str]) -> String {
    let body = json!({"user_id": user, "topics": topics}).to_string();
    let (status, reply) = node.http("POST", "/register", Some(&body));
    assert_eq!(status, 201, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    reply["id"].as_str().unwrap().to_string()
}

#[test]
fn a_registration_made_on_one_node_connects_on_another_and_is_deleted_from_a_third() {
    let cluster = Cluster::start();
    let id = register(&cluster.a, "alice", &["news"]);

    let mut alice = cluster.b.ws(&format!("/ws/{id}"));
    assert_eq!(
        alice.recv_json(),
        json!({"type":"subscribed","topic":"news"}),
        "the registration's topics come with it to node b"
    );
    let body = json!({"topic":"news","payload":"from c"}).to_string();
    assert_eq!(cluster.c.http("POST", "/publish", Some(&body)).0, 202);
    assert_eq!(
        alice.recv_json(),
        json!({"type":"push","topic":"news","event":"message","payload":"from c"})
    );

    let (status, reply) = cluster.c.http("DELETE", &format!("/register/{id}"), None);
    assert_eq!(status, 204, "{reply}");
    assert_eq!(alice.expect_close(), 1000, "node b closes it");
    for (name, node) in cluster.nodes() {
        assert_eq!(
            node.upgrade_status(&format!("/ws/{id}"), ""),
            404,
            "node {name} forgot the registration"
        );
    }
}

#[test]
fn a_node_started_later_knows_the_registrations_made_before() {
    let redis = RedisServer::start();
    let a = start_node(&redis, "a");
    wait_for_redis(&a, "a", Redis::Up);
    let id = register(&a, "late", &[]);
    let d = start_node(&redis, "d");
    wait_for_redis(&d, "d", Redis::Up);
    wait_until("node d to load the registration", || {
        match d.upgrade_status(&format!("/ws/{id}"), "") {
            101 => Ok(()),
            other => Err(format!("upgrade answered {other}")),
        }
    });
}

#[test]
fn registering_while_redis_is_down_is_refused_with_503() {
    let mut cluster = Cluster::start();
    cluster.redis.stop();
    wait_for_redis(&cluster.a, "a", Redis::Down);
    let body = json!({"user_id": "x"}).to_string();
    let (status, reply) = cluster.a.http("POST", "/register", Some(&body));
    assert_eq!(status, 503, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert!(
        reply["error"].as_str().is_some_and(|e| e.contains("Redis")),
        "{reply}"
    );
}

/// `GET /topics/{topic}/presence` on `node`: the count and the users.
fn presence(node: &common::TestServer, topic: &str) -> (u64, Vec<String>) {
    let (status, body) = node.http("GET", &format!("/topics/{topic}/presence"), None);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let mut users: Vec<String> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["meta"]["user_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    users.sort();
    (body["count"].as_u64().unwrap(), users)
}

#[test]
fn presence_counts_every_nodes_members_and_forgets_a_killed_node_within_its_ttl() {
    let mut cluster = Cluster::start_with(RedisServer::start(), PRESENCE);
    let mut members = Vec::new();
    for (user, node) in [
        ("ann", &cluster.a),
        ("ben", &cluster.b),
        ("cat", &cluster.c),
    ] {
        let mut ws = node.ws(&format!("/ws?user_id={user}"));
        ws.subscribe("room:1");
        members.push(ws);
    }
    for (name, node) in cluster.nodes() {
        wait_until(
            &format!("node {name} to count all three"),
            || match presence(node, "room:1") {
                (3, users) if users == ["ann", "ben", "cat"] => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    // ben leaves cleanly: gone everywhere at once (no TTL involved).
    drop(members.remove(1));
    for (name, node) in [("a", &cluster.a), ("c", &cluster.c)] {
        wait_until(
            &format!("node {name} to see ben leave"),
            || match presence(node, "room:1") {
                (2, users) if users == ["ann", "cat"] => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    // Node c dies with cat still connected: it stops counting within the TTL.
    cluster.c.child.kill().unwrap();
    cluster.c.child.wait().unwrap();
    wait_until("node a to forget node c's member", || {
        match presence(&cluster.a, "room:1") {
            (1, users) if users == ["ann"] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let mut ann = members.remove(0);
    assert_quiet(&mut ann, "ann");
}

/// The race a client that connects at once runs: node b reads the upgrade
/// before its broker has handed it the registration's announcement (b is
/// stopped while the registration is made and the upgrade sent, so both
/// wait for it together). The `201` is a promise: b holds the upgrade
/// until the registration arrives, and answers `101`, never `404`.
#[test]
fn an_upgrade_that_overtakes_the_registrations_announcement_waits_for_it() {
    use std::io::{Read, Write};
    let cluster = Cluster::start();
    for round in 0..5 {
        cluster.b.signal(libc::SIGSTOP);
        let id = register(&cluster.a, &format!("u{round}"), &["news"]);
        let mut stream = std::net::TcpStream::connect(cluster.b.addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let request = format!(
            "GET /ws/{id} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        cluster.b.signal(libc::SIGCONT);
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101", "round {round}");
    }
}

/// An id no node gave out is still `404`, once the wait for its
/// announcement is over.
#[test]
fn an_unknown_registration_is_404_after_a_short_wait() {
    let cluster = Cluster::start();
    let start = std::time::Instant::now();
    assert_eq!(
        cluster.b.upgrade_status("/ws/no-such-registration", ""),
        404
    );
    let waited = start.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(5),
        "answered after {waited:?}"
    );
}
