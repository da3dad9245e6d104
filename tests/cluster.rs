//! Nodes joined through Redis: three ringcast processes of two shards each
//! share one private `redis-server`. Publishes, publishes to a user and chat
//! lines cross nodes; a node rides out Redis going away (local delivery, 503
//! for publishes, degraded health) and coming back (it resubscribes by itself),
//! starts without Redis, and the others carry on when one is killed.
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::{
    assert_quiet, health, recv_within, subscribers_on_every_shard, wait_for_redis, wait_until,
    Cluster, Redis, CLUSTER_TIMEOUT, QUIET, SHARDS,
};
use common::redis::{try_redis_cmd, RedisServer};
use common::{TestServer, Ws};
use serde_json::{json, Value};

/// What a subscriber of `topic` receives for a publish.
fn push(topic: &str, event: &str, payload: Value) -> Value {
    json!({"type":"push","topic":topic,"event":event,"payload":payload})
}

/// Publishes `payload` to `topic` over HTTP on `node`; it must be accepted.
fn publish(node: &TestServer, topic: &str, payload: Value) {
    let body = json!({"topic":topic,"payload":payload}).to_string();
    let (status, reply) = node.http("POST", "/publish", Some(&body));
    assert_eq!(status, 202, "publish {body}: {reply}");
}

/// Publishes over HTTP on a node that cannot reach Redis: `503` with a JSON
/// `error` and the number of local shards it was delivered to, returned.
fn publish_refused(node: &TestServer, topic: &str, payload: Value) -> u64 {
    let body = json!({"topic":topic,"payload":payload}).to_string();
    let (status, reply) = node.http("POST", "/publish", Some(&body));
    assert_eq!(status, 503, "publish {body} without Redis: {reply}");
    let reply: Value =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("503 body not JSON: {reply}: {e}"));
    assert!(
        reply["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{reply}"
    );
    reply["delivered_shards"]
        .as_u64()
        .unwrap_or_else(|| panic!("no delivered_shards in {reply}"))
}

/// A client publish (the client must hold `topic`), with event `say`.
fn say(ws: &mut Ws, topic: &str, payload: Value) {
    ws.send_text(
        &json!({"type":"message","topic":topic,"event":"say","payload":payload}).to_string(),
    );
}

/// Sends `probe(k)` for k = 0, 1, ... until every receiver has received
/// something, then drains what is still on its way; every message must pass
/// `is_probe`. For routes the protocol does not confirm (a user's direct
/// messages, chat): a node may set up a connection's route through Redis after
/// the upgrade, and a line sent before that is not promised to arrive.
fn probe_until_routed(
    receivers: &mut [Ws],
    mut probe: impl FnMut(u64),
    is_probe: impl Fn(&str) -> bool,
) {
    let start = Instant::now();
    let mut reached = vec![false; receivers.len()];
    for k in 0.. {
        if !reached.contains(&false) {
            break;
        }
        assert!(
            start.elapsed() < CLUSTER_TIMEOUT,
            "probes did not reach every receiver: {reached:?}"
        );
        probe(k);
        for (ws, reached) in receivers.iter_mut().zip(&mut reached) {
            if *reached {
                continue;
            }
            if let Some(message) = recv_within(ws, Duration::from_millis(100)) {
                assert!(is_probe(&message), "unexpected {message}");
                *reached = true;
            }
        }
    }
    for ws in receivers {
        while let Some(message) = recv_within(ws, QUIET) {
            assert!(is_probe(&message), "unexpected {message}");
        }
    }
}

/// Reads pushes of `topic` from publishers `"http"` and `"ws"` (the event
/// names the publisher, the payload carries its sequence number) until
/// `per_publisher` of each arrived: each publisher's numbers must run 0, 1, 2,
/// ... (nothing lost, repeated or reordered; publishers interleave freely).
/// Then nothing more may arrive.
fn expect_each_publisher_in_order(ws: &mut Ws, who: &str, topic: &str, per_publisher: u64) {
    let publishers = ["http", "ws"];
    let mut next = [0u64; 2];
    for _ in 0..per_publisher * publishers.len() as u64 {
        let message = ws.recv_json();
        let event = message["event"].as_str().unwrap_or_default();
        let publisher = publishers
            .iter()
            .position(|&p| p == event)
            .unwrap_or_else(|| panic!("{who} got an unexpected message {message}"));
        assert_eq!(
            message,
            push(topic, event, json!({"seq": next[publisher]})),
            "{who}: publications from {event} lost, repeated or out of order"
        );
        next[publisher] += 1;
    }
    assert_quiet(ws, who);
}

#[test]
fn every_subscriber_on_every_node_gets_each_publication_once_in_its_publishers_order() {
    const TOPIC: &str = "fanout";
    const PER_PUBLISHER: u64 = 50;
    let cluster = Cluster::start();
    let mut subscribers: Vec<(String, Ws)> = Vec::new();
    for (name, node) in cluster.nodes() {
        for (i, ws) in subscribers_on_every_shard(node, TOPIC, 2)
            .into_iter()
            .enumerate()
        {
            subscribers.push((format!("subscriber {i} on node {name}"), ws));
        }
    }
    // A client publishes only to a topic it holds, so it is a subscriber too.
    let mut client_publisher = cluster.c.ws("/ws");
    client_publisher.subscribe(TOPIC);

    // Node b takes HTTP publishes while a client on node c publishes.
    std::thread::scope(|scope| {
        let b = &cluster.b;
        scope.spawn(move || {
            for seq in 0..PER_PUBLISHER {
                let body = json!({"topic":TOPIC,"event":"http","payload":{"seq":seq}});
                let (status, reply) = b.http("POST", "/publish", Some(&body.to_string()));
                assert_eq!(status, 202, "{reply}");
            }
        });
        for seq in 0..PER_PUBLISHER {
            client_publisher.send_text(
                &json!({"type":"message","topic":TOPIC,"event":"ws","payload":{"seq":seq}})
                    .to_string(),
            );
        }
    });
    subscribers.push(("the publishing client on node c".into(), client_publisher));
    for (who, ws) in &mut subscribers {
        expect_each_publisher_in_order(ws, who, TOPIC, PER_PUBLISHER);
    }
    for (name, node) in [("b", &cluster.b), ("c", &cluster.c)] {
        let published = node.metric("cluster_published_total");
        assert!(
            published >= PER_PUBLISHER,
            "node {name} counted {published}"
        );
    }
    let received = cluster.a.metric("cluster_received_total");
    assert!(received >= 2 * PER_PUBLISHER, "node a counted {received}");
}

#[test]
fn when_a_nodes_last_subscriber_leaves_the_others_still_receive_and_a_newcomer_there_is_served() {
    const TOPIC: &str = "leave";
    let cluster = Cluster::start();
    let mut on_a = subscribers_on_every_shard(&cluster.a, TOPIC, 1);
    let mut on_b = cluster.b.ws("/ws");
    on_b.subscribe(TOPIC);
    let mut on_c = cluster.c.ws("/ws");
    on_c.subscribe(TOPIC);
    publish(&cluster.b, TOPIC, json!("before"));
    for ws in on_a.iter_mut().chain([&mut on_b, &mut on_c]) {
        assert_eq!(ws.recv_json(), push(TOPIC, "message", json!("before")));
    }

    // Every subscriber on node a leaves: one unsubscribes and stays connected,
    // the others disconnect.
    let mut stayer = on_a.pop().unwrap();
    stayer.send_text(&json!({"type":"unsubscribe","topic":TOPIC}).to_string());
    assert_eq!(
        stayer.recv_json(),
        json!({"type":"unsubscribed","topic":TOPIC})
    );
    drop(on_a);
    wait_until("node a to forget the topic", || {
        let (subscriptions, topics) = (
            cluster.a.metric("subscriptions"),
            cluster.a.metric("topics"),
        );
        if subscriptions == 0 && topics == 0 {
            Ok(())
        } else {
            Err(format!("subscriptions {subscriptions}, topics {topics}"))
        }
    });

    // Publishes from the node without subscribers, from b, and from a client on c.
    publish(&cluster.a, TOPIC, json!("from a"));
    publish(&cluster.b, TOPIC, json!("from b"));
    say(&mut on_c, TOPIC, json!("from c"));
    for (who, ws) in [("node b", &mut on_b), ("node c", &mut on_c)] {
        let mut payloads: Vec<String> = (0..3)
            .map(|_| ws.recv_json()["payload"].as_str().unwrap().to_string())
            .collect();
        payloads.sort();
        assert_eq!(payloads, ["from a", "from b", "from c"], "{who}");
        assert_quiet(ws, who);
    }
    assert_quiet(&mut stayer, "the client that unsubscribed on node a");

    // A newcomer on node a, and the client coming back, get what is published
    // after their `subscribed`, once.
    let mut newcomer = cluster.a.ws("/ws");
    newcomer.subscribe(TOPIC);
    stayer.subscribe(TOPIC);
    publish(&cluster.b, TOPIC, json!("again"));
    for (who, ws) in [
        ("the newcomer on node a", &mut newcomer),
        ("the returning client on node a", &mut stayer),
        ("node b", &mut on_b),
        ("node c", &mut on_c),
    ] {
        assert_eq!(
            ws.recv_json(),
            push(TOPIC, "message", json!("again")),
            "{who}"
        );
        assert_quiet(ws, who);
    }
}

#[test]
fn a_publish_to_a_user_reaches_only_that_users_subscribed_connections_on_other_nodes() {
    let cluster = Cluster::start();
    let mut alice = vec![
        cluster.a.ws("/ws?user_id=alice"),
        cluster.c.ws("/ws?user_id=alice"),
    ];
    for ws in &mut alice {
        ws.subscribe("inbox");
    }
    let mut bob = cluster.a.ws("/ws?user_id=bob");
    bob.subscribe("inbox");
    let mut anonymous = cluster.c.ws("/ws");
    anonymous.subscribe("inbox");
    // Alice on the publishing node, not subscribed to the topic.
    let mut alice_elsewhere = cluster.b.ws("/ws?user_id=alice");
    alice_elsewhere.subscribe("other");

    let publish_to_alice = |payload: Value| {
        let body = json!({"topic":"inbox","user_id":"alice","payload":payload}).to_string();
        let (status, reply) = cluster.b.http("POST", "/publish", Some(&body));
        assert_eq!(status, 202, "{reply}");
    };
    probe_until_routed(
        &mut alice,
        |k| publish_to_alice(json!({"probe":k})),
        |m| m.contains(r#""probe""#),
    );
    publish_to_alice(json!({"for":"alice"}));
    for ws in &mut alice {
        assert_eq!(
            ws.recv_json(),
            push("inbox", "message", json!({"for":"alice"}))
        );
        assert_quiet(ws, "alice");
    }
    // Nothing, probes included, reached anyone else.
    assert_quiet(&mut bob, "bob, subscribed to the topic on node a");
    assert_quiet(&mut anonymous, "an anonymous subscriber on node c");
    assert_quiet(
        &mut alice_elsewhere,
        "alice on node b, not subscribed to the topic",
    );
}

#[test]
fn chat_lines_travel_both_ways_between_users_on_different_nodes() {
    let cluster = Cluster::start();
    let mut ann = vec![
        cluster.a.ws("/chat?user_id=ann&recipient_id=ben"),
        cluster.a.ws("/chat?user_id=ann&recipient_id=ben"),
    ];
    let mut ben = vec![
        cluster.b.ws("/chat?user_id=ben&recipient_id=ann"),
        cluster.c.ws("/chat?user_id=ben&recipient_id=ann"),
    ];
    probe_until_routed(
        &mut ben,
        |k| ann[0].send_text(&format!("probe {k}")),
        |m| m.starts_with("ann: probe "),
    );
    probe_until_routed(
        &mut ann,
        |k| ben[1].send_text(&format!("probe {k}")),
        |m| m.starts_with("ben: probe "),
    );

    ann[0].send_text("hello ben");
    for ws in &mut ben {
        assert_eq!(ws.recv_text(), "ann: hello ben");
    }
    ben[1].send_text("hi ann");
    // ann[0]'s next line is ben's: it did not get its own back.
    for ws in &mut ann {
        assert_eq!(ws.recv_text(), "ben: hi ann");
    }
    for (who, ws) in [("ann on a", &mut ann), ("ben on b and c", &mut ben)] {
        for ws in ws {
            assert_quiet(ws, who);
        }
    }
}

#[test]
fn while_redis_is_down_a_node_delivers_locally_and_answers_publishes_with_503() {
    const TOPIC: &str = "down";
    let mut cluster = Cluster::start();
    let mut local = cluster.a.ws("/ws");
    local.subscribe(TOPIC);
    let mut client_publisher = cluster.a.ws("/ws");
    client_publisher.subscribe(TOPIC);
    let mut remote = cluster.b.ws("/ws");
    remote.subscribe(TOPIC);
    let refused_before = cluster.a.metric("cluster_refused_total");

    cluster.redis.stop();
    wait_for_redis(&cluster.a, "a", Redis::Down);

    let shards = publish_refused(&cluster.a, TOPIC, json!("local only"));
    assert!(shards >= 1, "delivered to the local subscriber's shard");
    assert_eq!(
        local.recv_json(),
        push(TOPIC, "message", json!("local only"))
    );
    assert!(cluster.a.metric("cluster_refused_total") > refused_before);

    // A client's publish reaches local subscribers too.
    say(&mut client_publisher, TOPIC, json!("said locally"));
    assert_eq!(local.recv_json(), push(TOPIC, "say", json!("said locally")));

    // Subscribing works, locally, and the reply says the node is degraded.
    let mut newcomer = cluster.a.ws("/ws");
    newcomer.subscribe_degraded("fresh");
    publish_refused(&cluster.a, "fresh", json!("to the newcomer"));
    assert_eq!(
        newcomer.recv_json(),
        push("fresh", "message", json!("to the newcomer"))
    );
    assert!(cluster.a.metric("cluster_refused_total") >= refused_before + 2);
    let degraded = health(&cluster.a);
    assert_eq!(degraded["status"], "degraded");
    assert_eq!(degraded["cluster"]["redis"], "down", "{degraded}");

    assert_quiet(&mut remote, "the subscriber on node b");
    assert_quiet(&mut local, "the subscriber on node a");
}

#[test]
fn after_redis_returns_the_nodes_resubscribe_by_themselves_and_deliver_across_nodes_again() {
    const TOPIC: &str = "back";
    let mut cluster = Cluster::start();
    let mut on_a = subscribers_on_every_shard(&cluster.a, TOPIC, 1);
    let mut on_b = cluster.b.ws("/ws");
    on_b.subscribe(TOPIC);
    let mut on_c = cluster.c.ws("/ws");
    on_c.subscribe(TOPIC);
    let reconnects_before = cluster
        .nodes()
        .map(|(_, node)| node.metric("cluster_reconnects_total"));

    cluster.redis.stop();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Down);
    }
    // Refused and delivered on node b only: it must never turn up elsewhere.
    publish_refused(&cluster.b, TOPIC, json!("refused"));
    assert_eq!(on_b.recv_json(), push(TOPIC, "message", json!("refused")));

    cluster.redis.restart();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Up);
    }
    for ((name, node), before) in cluster.nodes().into_iter().zip(reconnects_before) {
        assert!(
            node.metric("cluster_reconnects_total") > before,
            "node {name} counted its reconnect"
        );
    }

    // No client subscribed again: the nodes did. The next push on node a
    // is the new one, not the refused one.
    publish(&cluster.b, TOPIC, json!("back"));
    for ws in on_a.iter_mut().chain([&mut on_b, &mut on_c]) {
        assert_eq!(ws.recv_json(), push(TOPIC, "message", json!("back")));
    }
    say(&mut on_c, TOPIC, json!("client back"));
    for ws in on_a.iter_mut().chain([&mut on_b, &mut on_c]) {
        assert_eq!(ws.recv_json(), push(TOPIC, "say", json!("client back")));
    }
    for ws in on_a.iter_mut() {
        assert_quiet(ws, "a subscriber on node a");
    }
    assert_quiet(&mut on_b, "the subscriber on node b");
    assert_quiet(&mut on_c, "the subscriber on node c");
}

#[test]
fn a_node_started_while_redis_is_down_serves_locally_and_joins_when_redis_starts() {
    const TOPIC: &str = "late";
    let mut redis = RedisServer::start();
    redis.stop();
    // The default prefix, unlike `Cluster`.
    let url = redis.url();
    let config = |name: &str| format!("[cluster]\nredis_url = \"{url}\"\nnode_name = \"{name}\"\n");
    let early = TestServer::start(SHARDS, Some(&config("early")));
    wait_for_redis(&early, "early", Redis::Down);
    let mut local = early.ws("/ws");
    local.subscribe_degraded(TOPIC);
    assert!(publish_refused(&early, TOPIC, json!("alone")) >= 1);
    assert_eq!(local.recv_json(), push(TOPIC, "message", json!("alone")));

    redis.restart();
    wait_for_redis(&early, "early", Redis::Up);
    let other = TestServer::start(SHARDS, Some(&config("other")));
    wait_for_redis(&other, "other", Redis::Up);
    let mut remote = other.ws("/ws");
    remote.subscribe(TOPIC);

    // The topic subscribed while Redis was down is now subscribed in Redis.
    for (from, node) in [("from other", &other), ("from early", &early)] {
        publish(node, TOPIC, json!(from));
        for (who, ws) in [("early", &mut local), ("other", &mut remote)] {
            assert_eq!(ws.recv_json(), push(TOPIC, "message", json!(from)), "{who}");
        }
    }
    assert_quiet(&mut local, "early");
    assert_quiet(&mut remote, "other");
}

#[test]
fn when_a_node_is_killed_the_other_two_keep_delivering_to_each_other() {
    const TOPIC: &str = "survive";
    let mut cluster = Cluster::start();
    let mut on_a = cluster.a.ws("/ws");
    on_a.subscribe(TOPIC);
    let mut on_b = cluster.b.ws("/ws");
    on_b.subscribe(TOPIC);
    let mut on_c = cluster.c.ws("/ws");
    on_c.subscribe(TOPIC);
    publish(&cluster.b, TOPIC, json!("before"));
    for ws in [&mut on_a, &mut on_b, &mut on_c] {
        assert_eq!(ws.recv_json(), push(TOPIC, "message", json!("before")));
    }

    cluster.c.signal(libc::SIGKILL);
    cluster.c.child.wait().unwrap();

    // One publish at a time, each read everywhere before the next: publishes
    // from different publishers may interleave.
    for (from, node) in [("from a", &cluster.a), ("from b", &cluster.b)] {
        publish(node, TOPIC, json!(from));
        for (who, ws) in [("node a", &mut on_a), ("node b", &mut on_b)] {
            assert_eq!(ws.recv_json(), push(TOPIC, "message", json!(from)), "{who}");
        }
    }
    say(&mut on_a, TOPIC, json!("client on a"));
    for (who, ws) in [("node a", &mut on_a), ("node b", &mut on_b)] {
        assert_eq!(
            ws.recv_json(),
            push(TOPIC, "say", json!("client on a")),
            "{who}"
        );
    }
    let mut newcomer = cluster.b.ws("/ws");
    newcomer.subscribe(TOPIC);
    publish(&cluster.a, TOPIC, json!("after the newcomer"));
    for (who, ws) in [
        ("node a", &mut on_a),
        ("node b", &mut on_b),
        ("the newcomer on node b", &mut newcomer),
    ] {
        assert_eq!(
            ws.recv_json(),
            push(TOPIC, "message", json!("after the newcomer")),
            "{who}"
        );
        assert_quiet(ws, who);
    }
    for (name, node) in [("a", &cluster.a), ("b", &cluster.b)] {
        let health = health(node);
        assert_eq!(health["status"], "ok", "node {name}");
        assert_eq!(health["cluster"]["redis"], "up", "node {name}: {health}");
    }
}

#[test]
fn the_test_redis_answers_on_its_own_port_and_restarts_there_empty() {
    let mut redis = RedisServer::start();
    let other = RedisServer::start();
    assert_ne!(redis.port(), other.port());
    assert_ne!(redis.port(), 6379, "never the shared default port");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(redis.cmd(&["PING"]), "PONG");
    assert_eq!(redis.cmd(&["CONFIG", "GET", "bind"]), "bind\n127.0.0.1");
    assert_eq!(redis.cmd(&["CONFIG", "GET", "save"]), "save\n");
    assert_eq!(
        redis.cmd(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nno"
    );
    // Sharded pub/sub (Redis 7) is there; nobody listens yet.
    assert_eq!(redis.cmd(&["SPUBLISH", "ch", "x"]), "0");
    assert!(redis.cmd(&["NO-SUCH-COMMAND"]).starts_with("-ERR"));
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cmd(&["GET", "k"]), "v");

    let port = redis.port();
    redis.stop();
    assert!(!redis.is_running());
    assert!(try_redis_cmd(redis.addr(), &["PING"]).is_err());
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cmd(&["PING"]), "PONG");
    assert_eq!(redis.cmd(&["GET", "k"]), "", "nothing persisted");
    assert_eq!(other.cmd(&["PING"]), "PONG");
}
