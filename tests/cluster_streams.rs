//! Topic streams across nodes: with `[cluster]`, Redis orders and keeps a
//! stream, so three nodes of two shards each give every subscriber one
//! contiguous order of offsets, recover a client that left another node (or
//! a node that died) from Redis history, answer the history endpoint alike,
//! refuse stream publishes with 503 while Redis is down, and fill from
//! history the gaps a lost subscription or a Redis restart leaves. Without
//! persistence a restarted Redis starts the stream afresh under a new epoch.
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::BTreeMap;

use cluster::{
    assert_quiet, connections_on_every_shard, recv_within, start_node_with, wait_for_redis,
    wait_until, Cluster, Redis, CLUSTER_TIMEOUT,
};
use common::redis::RedisServer;
use common::{TestServer, Ws};
use serde_json::{json, Value};

/// `feed:*` streams keep 1,000 publications, `small:*` five, `ticker:*`
/// replays the latest three to a new subscriber; `plain:*` has no history.
/// TTLs are long against a test, so nothing expires under it.
const CONFIG: &str = r#"
[[rules]]
pattern = "feed:*"
client_publish = true
history_size = 1000
history_ttl_s = 300

[[rules]]
pattern = "small:*"
history_size = 5
history_ttl_s = 300

[[rules]]
pattern = "ticker:*"
history_size = 10
history_ttl_s = 300
replay_on_subscribe = 3

[[rules]]
pattern = "plain:*"
"#;

/// The three nodes around a fresh, empty Redis, with `CONFIG`.
fn cluster() -> Cluster {
    Cluster::start_with(RedisServer::start(), CONFIG)
}

/// A place in a stream: from a `202`, a `subscribed` or a history answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    offset: u64,
    epoch: String,
}

/// `offset` and `epoch` of `reply`; both must be there.
fn position(reply: &Value) -> Position {
    match (reply["offset"].as_u64(), reply["epoch"].as_str()) {
        (Some(offset), Some(epoch)) if !epoch.is_empty() => Position {
            offset,
            epoch: epoch.to_string(),
        },
        _ => panic!("no stream position (offset, epoch) in {reply}"),
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"))
}

/// The next message on `ws`, waiting up to `CLUSTER_TIMEOUT`: a gap filled
/// from Redis after a reconnect may take a while on a loaded machine.
fn next_json(ws: &mut Ws, who: &str) -> Value {
    let text = recv_within(ws, CLUSTER_TIMEOUT)
        .unwrap_or_else(|| panic!("{who} received nothing within {CLUSTER_TIMEOUT:?}"));
    parse(&text)
}

/// Subscribes `ws` to `topic`, from `since` if given, and returns the
/// `subscribed` reply, which must carry the stream's position.
fn open(ws: &mut Ws, topic: &str, since: Option<&Position>) -> Value {
    let mut request = json!({"type":"subscribe","topic":topic});
    if let Some(since) = since {
        request["since"] = json!({"offset":since.offset,"epoch":since.epoch});
    }
    ws.send_text(&request.to_string());
    let reply = next_json(ws, &format!("the subscriber of {topic}"));
    assert_eq!(reply["type"], "subscribed", "answer to {request}: {reply}");
    assert_eq!(reply["topic"], topic, "{reply}");
    position(&reply);
    reply
}

/// What a subscriber of a stream receives for a publication.
fn push(topic: &str, offset: u64, event: &str, payload: &Value) -> Value {
    json!({"type":"push","topic":topic,"offset":offset,"event":event,"payload":payload})
}

/// The next `count` messages on `ws`, each a push with an offset.
fn pushes(ws: &mut Ws, who: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|_| {
            let message = next_json(ws, who);
            assert_eq!(message["type"], "push", "{who}: {message}");
            assert!(message["offset"].is_u64(), "{who}: no offset in {message}");
            message
        })
        .collect()
}

fn offsets(pushes: &[Value]) -> Vec<u64> {
    pushes
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

/// Publishes `payload` to `topic` over HTTP on `node`: it must be accepted
/// (`202`) with its position in the stream.
fn publish(node: &TestServer, topic: &str, payload: &Value) -> Position {
    let body = json!({"topic":topic,"payload":payload}).to_string();
    let (status, reply) = node.http("POST", "/publish", Some(&body));
    assert_eq!(status, 202, "publish {body}: {reply}");
    position(&parse(&reply))
}

/// The same, and it must get offset `offset`: the stream's next, whichever
/// node took it.
fn publish_at(node: &TestServer, topic: &str, payload: &Value, offset: u64) -> Position {
    let accepted = publish(node, topic, payload);
    assert_eq!(
        accepted.offset, offset,
        "publication {payload} of {topic} on {}: {accepted:?}",
        node.addr
    );
    accepted
}

/// A stream publish on a node that cannot reach Redis: `503` with a JSON
/// `error`, and no offset (none was given out).
fn publish_refused(node: &TestServer, topic: &str, payload: &Value) {
    let body = json!({"topic":topic,"payload":payload}).to_string();
    let (status, reply) = node.http("POST", "/publish", Some(&body));
    assert_eq!(status, 503, "stream publish {body} without Redis: {reply}");
    let reply = parse(&reply);
    assert!(
        reply["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{reply}"
    );
    assert!(
        reply.get("offset").is_none(),
        "a refused publish got {reply}"
    );
}

/// `GET /topics/{topic}/history{query}` on `node`: status and JSON body.
fn history(node: &TestServer, topic: &str, query: &str) -> (u16, Value) {
    let (status, body) = node.http("GET", &format!("/topics/{topic}/history{query}"), None);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A `200` history answer's publications; its position must be `at`.
fn history_publications(node: &TestServer, topic: &str, query: &str, at: &Position) -> Vec<Value> {
    let (status, body) = history(node, topic, query);
    assert_eq!(status, 200, "history{query}: {body}");
    assert_eq!(body["topic"], topic, "{body}");
    assert_eq!(&position(&body), at, "history{query}: {body}");
    body["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("no publications in {body}"))
        .clone()
}

#[test]
fn subscribers_on_every_node_see_one_contiguous_order_whoever_publishes_on_whichever_node() {
    const TOPIC: &str = "feed:order";
    const EACH: u64 = 30;
    let cluster = cluster();
    let mut subscribers: Vec<(String, Ws)> = Vec::new();
    let mut opened: Vec<Position> = Vec::new();
    for (name, node) in cluster.nodes() {
        let on_node =
            connections_on_every_shard(node, 1, |ws| opened.push(position(&open(ws, TOPIC, None))));
        for (i, ws) in on_node.into_iter().enumerate() {
            subscribers.push((format!("subscriber {i} on node {name}"), ws));
        }
    }
    // A client publishes only to a topic it holds, so it is a subscriber too.
    let mut client_publisher = cluster.b.ws("/ws");
    opened.push(position(&open(&mut client_publisher, TOPIC, None)));
    // As on one node, `subscribed` tells the position a client can resume
    // from: before any publication, offset 0 of the epoch publications get.
    let epoch = opened[0].epoch.clone();
    for position in &opened {
        assert_eq!(
            position,
            &Position {
                offset: 0,
                epoch: epoch.clone()
            },
            "every node tells the same position of a fresh stream: {opened:?}"
        );
    }

    // One HTTP publisher per node, each on its own thread, while the client
    // on node b publishes; each publisher numbers its own publications.
    let accepted: Vec<(String, Vec<Position>)> = std::thread::scope(|scope| {
        let threads = cluster.nodes().map(|(name, node)| {
            scope.spawn(move || {
                let by = format!("http on {name}");
                let positions: Vec<Position> = (0..EACH)
                    .map(|seq| publish(node, TOPIC, &json!({"by":by,"seq":seq})))
                    .collect();
                (by, positions)
            })
        });
        for seq in 0..EACH {
            client_publisher.send_text(
                &json!({"type":"message","topic":TOPIC,"event":"say","payload":{"by":"ws on b","seq":seq}})
                    .to_string(),
            );
        }
        threads
            .into_iter()
            .map(|thread| thread.join().expect("an HTTP publisher failed"))
            .collect()
    });
    subscribers.push(("the publishing client on node b".into(), client_publisher));

    let total = 4 * EACH;
    let mut given: Vec<u64> = Vec::new();
    for (by, positions) in &accepted {
        let mine: Vec<u64> = positions.iter().map(|p| p.offset).collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "{by} got offsets out of its order: {mine:?}"
        );
        for position in positions {
            assert_eq!(position.epoch, epoch, "{by}: the stream's epoch changed");
        }
        given.extend(mine);
    }
    given.sort_unstable();
    given.dedup();
    assert_eq!(
        given.len() as u64,
        3 * EACH,
        "two HTTP publications got the same offset"
    );
    assert!(
        given.iter().all(|offset| (1..=total).contains(offset)),
        "offsets outside 1..{total}: {given:?}"
    );

    let mut reference: Option<Vec<Value>> = None;
    for (who, ws) in &mut subscribers {
        let got = pushes(ws, who, total as usize);
        assert_eq!(
            offsets(&got),
            (1..=total).collect::<Vec<_>>(),
            "{who}: offsets are not 1..{total} in order"
        );
        match &reference {
            None => reference = Some(got),
            Some(first) => assert_eq!(&got, first, "{who} saw another stream than the first"),
        }
    }
    let stream = reference.unwrap();
    // Each HTTP reply's offset names the publication subscribers got there.
    for (by, positions) in &accepted {
        for (seq, position) in positions.iter().enumerate() {
            assert_eq!(
                stream[position.offset as usize - 1],
                push(
                    TOPIC,
                    position.offset,
                    "message",
                    &json!({"by":by,"seq":seq})
                ),
                "the publication {by} was told is at offset {}",
                position.offset
            );
        }
    }
    // Every publisher's publications are there once, in its order.
    let mut by_publisher: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for message in &stream {
        let payload = &message["payload"];
        if payload["by"] == "ws on b" {
            let offset = message["offset"].as_u64().unwrap();
            assert_eq!(message, &push(TOPIC, offset, "say", payload));
        }
        by_publisher
            .entry(payload["by"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(payload["seq"].as_u64().unwrap_or(u64::MAX));
    }
    assert_eq!(by_publisher.len(), 4, "{by_publisher:?}");
    for (by, seqs) in &by_publisher {
        assert_eq!(
            seqs,
            &(0..EACH).collect::<Vec<_>>(),
            "publications by {by} lost, repeated or reordered"
        );
    }
    for (who, ws) in &mut subscribers {
        assert_quiet(ws, who);
    }
}

#[test]
fn a_client_that_left_one_node_recovers_what_it_missed_on_another_then_goes_live() {
    const TOPIC: &str = "feed:recover";
    let cluster = cluster();
    let mut on_a = cluster.a.ws("/ws");
    let epoch = position(&open(&mut on_a, TOPIC, None)).epoch;
    let payload = |n: u64| json!({"n":n});
    for n in 1..=5 {
        let accepted = publish(&cluster.a, TOPIC, &payload(n));
        assert_eq!(
            accepted,
            Position {
                offset: n,
                epoch: epoch.clone()
            }
        );
    }
    let seen = pushes(&mut on_a, "the client on node a", 5);
    let expected: Vec<Value> = (1..=5)
        .map(|n| push(TOPIC, n, "message", &payload(n)))
        .collect();
    assert_eq!(seen, expected);
    drop(on_a); // abruptly: no close frame, no unsubscribe

    for n in 6..=10 {
        publish_at(&cluster.b, TOPIC, &payload(n), n);
    }
    let mut on_c = cluster.c.ws("/ws");
    let last_seen = Position {
        offset: 5,
        epoch: epoch.clone(),
    };
    let reply = open(&mut on_c, TOPIC, Some(&last_seen));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(
        position(&reply),
        Position {
            offset: 10,
            epoch: epoch.clone()
        }
    );
    let expected: Vec<Value> = (6..=10)
        .map(|n| push(TOPIC, n, "message", &payload(n)))
        .collect();
    assert_eq!(pushes(&mut on_c, "the client back on node c", 5), expected);

    publish_at(&cluster.a, TOPIC, &payload(11), 11);
    assert_eq!(
        next_json(&mut on_c, "the client back on node c"),
        push(TOPIC, 11, "message", &payload(11))
    );
    assert_quiet(&mut on_c, "the client back on node c");
    assert!(cluster.c.metric("stream_recoveries_total") >= 1);
}

#[test]
fn a_client_of_a_killed_node_recovers_on_a_new_node_from_the_history_kept_in_redis() {
    const TOPIC: &str = "feed:moved";
    let mut cluster = cluster();
    let payload = |n: u64| json!({"n":n});
    let expected = |range: std::ops::RangeInclusive<u64>| -> Vec<Value> {
        range
            .map(|n| push(TOPIC, n, "message", &payload(n)))
            .collect()
    };
    let mut on_c = cluster.c.ws("/ws");
    let epoch = position(&open(&mut on_c, TOPIC, None)).epoch;
    for n in 1..=4 {
        let node = if n % 2 == 1 { &cluster.a } else { &cluster.b };
        publish_at(node, TOPIC, &payload(n), n);
    }
    assert_eq!(
        pushes(&mut on_c, "the client on node c", 4),
        expected(1..=4)
    );

    cluster.c.signal(libc::SIGKILL);
    cluster.c.child.wait().unwrap();
    drop(on_c);
    for n in 5..=8 {
        let node = if n % 2 == 1 { &cluster.a } else { &cluster.b };
        publish_at(node, TOPIC, &payload(n), n);
    }

    let d = start_node_with(&cluster.redis, "d", CONFIG);
    wait_for_redis(&d, "d", Redis::Up);
    let mut on_d = d.ws("/ws");
    let last_seen = Position {
        offset: 4,
        epoch: epoch.clone(),
    };
    let reply = open(&mut on_d, TOPIC, Some(&last_seen));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(
        position(&reply),
        Position {
            offset: 8,
            epoch: epoch.clone()
        }
    );
    assert_eq!(
        pushes(&mut on_d, "the client on the new node d", 4),
        expected(5..=8)
    );
    publish_at(&cluster.b, TOPIC, &payload(9), 9);
    assert_eq!(
        pushes(&mut on_d, "the client on the new node d", 1),
        expected(9..=9)
    );
    assert_quiet(&mut on_d, "the client on the new node d");

    // The new node's history is Redis's: everything, the same as node a's.
    let now = Position { offset: 9, epoch };
    let all = history_publications(&d, TOPIC, "", &now);
    assert_eq!(all, expected(1..=9), "history on node d");
    assert_eq!(
        history_publications(&cluster.a, TOPIC, "", &now),
        all,
        "history on node a"
    );
    assert_eq!(
        history_publications(&d, TOPIC, &format!("?since=4&epoch={}", now.epoch), &now),
        expected(5..=9),
        "history on node d after offset 4"
    );
}

#[test]
fn subscribers_riding_out_a_persistent_redis_restart_get_every_accepted_publication_once_in_order()
{
    const TOPIC: &str = "feed:outage";
    const BEFORE_EACH: u64 = 2;
    const AFTER_EACH: u64 = 10;
    let mut cluster = Cluster::start_with(RedisServer::start_persistent(), CONFIG);
    let mut subscribers: Vec<(String, Ws)> = Vec::new();
    let mut opened: Vec<Position> = Vec::new();
    for (name, node) in cluster.nodes() {
        let on_node =
            connections_on_every_shard(node, 1, |ws| opened.push(position(&open(ws, TOPIC, None))));
        for (i, ws) in on_node.into_iter().enumerate() {
            subscribers.push((format!("subscriber {i} on node {name}"), ws));
        }
    }
    let epoch = opened[0].epoch.clone();
    assert!(
        opened.iter().all(|p| p.offset == 0 && p.epoch == epoch),
        "every node tells the same position of a fresh stream: {opened:?}"
    );
    // What subscribers must end with: offset -> push.
    let mut accepted: BTreeMap<u64, Value> = BTreeMap::new();
    let accept = |accepted: &mut BTreeMap<u64, Value>, by: &str, seq: u64, position: Position| {
        assert_eq!(
            position.epoch, epoch,
            "publication {seq} by {by}: a persistent Redis keeps the stream's epoch"
        );
        let pushed = push(
            TOPIC,
            position.offset,
            "message",
            &json!({"by":by,"seq":seq}),
        );
        if let Some(other) = accepted.insert(position.offset, pushed) {
            panic!("offset {} given twice; first to {other}", position.offset);
        }
    };
    for seq in 0..BEFORE_EACH {
        for (name, node) in cluster.nodes() {
            let position = publish(node, TOPIC, &json!({"by":name,"seq":seq}));
            accept(&mut accepted, name, seq, position);
        }
    }
    let before = accepted.len();
    for (who, ws) in &mut subscribers {
        let got = pushes(ws, who, before);
        assert_eq!(
            got,
            accepted.values().cloned().collect::<Vec<_>>(),
            "{who} before Redis stopped"
        );
    }

    let channels = subscribed_channels(&cluster.redis);
    cluster.redis.stop();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Down);
    }
    for (name, node) in cluster.nodes() {
        publish_refused(node, TOPIC, &json!({"by":name,"refused":true}));
    }
    cluster.redis.restart();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Up);
    }

    // All three nodes publish at once, right after they see Redis back: a
    // node whose subscription to the stream is not back yet misses some
    // live and must fetch them from Redis history before newer ones.
    let after: Vec<(&str, Vec<Position>)> = std::thread::scope(|scope| {
        let threads = cluster.nodes().map(|(name, node)| {
            scope.spawn(move || {
                let positions: Vec<Position> = (BEFORE_EACH..BEFORE_EACH + AFTER_EACH)
                    .map(|seq| publish(node, TOPIC, &json!({"by":name,"seq":seq})))
                    .collect();
                (name, positions)
            })
        });
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a publisher after the restart failed"))
            .collect()
    });
    for (name, positions) in after {
        for (seq, position) in (BEFORE_EACH..).zip(positions) {
            accept(&mut accepted, name, seq, position);
        }
    }
    // Once every node is subscribed again, one more publication shows a
    // node that missed the end of the burst its gap.
    wait_for_channels(&cluster.redis, channels);
    let seq = BEFORE_EACH + AFTER_EACH;
    let position = publish(&cluster.c, TOPIC, &json!({"by":"c","seq":seq}));
    accept(&mut accepted, "c", seq, position);
    let total = accepted.len() as u64;
    assert_eq!(
        accepted.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "accepted publications got contiguous offsets across the restart"
    );
    let rest: Vec<Value> = accepted.values().skip(before).cloned().collect();
    for (who, ws) in &mut subscribers {
        let got = pushes(ws, who, rest.len());
        assert_eq!(
            offsets(&got),
            (before as u64 + 1..=total).collect::<Vec<_>>(),
            "{who} after the restart: offsets missing, repeated or out of order"
        );
        assert_eq!(got, rest, "{who} after the restart");
        assert_quiet(ws, who);
    }
}

/// Redis's connections subscribed to channels: (client id, how many
/// channels, `sub` and `ssub` of `CLIENT LIST`).
fn subscribed_connections(redis: &RedisServer) -> Vec<(String, u64)> {
    redis
        .cmd(&["CLIENT", "LIST"])
        .lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or_default()
            };
            let channels: u64 = ["sub", "ssub"]
                .iter()
                .map(|count| field(count).parse::<u64>().unwrap_or(0))
                .sum();
            (channels > 0).then(|| (field("id").to_string(), channels))
        })
        .collect()
}

/// How many channel subscriptions Redis holds, over all connections.
fn subscribed_channels(redis: &RedisServer) -> u64 {
    subscribed_connections(redis).iter().map(|&(_, n)| n).sum()
}

/// Waits until Redis holds at least `channels` subscriptions again: the
/// nodes resubscribed after losing Redis, so a publication made now
/// reaches every node live (and shows a node that missed some the gap).
fn wait_for_channels(redis: &RedisServer, channels: u64) {
    wait_until("the nodes to subscribe their channels again", || {
        let now = subscribed_channels(redis);
        if now >= channels {
            Ok(())
        } else {
            Err(format!("{now} of {channels} channels"))
        }
    });
}

/// Kills every Redis connection subscribed to a channel, as Redis does to a
/// subscriber over its output buffer limit; returns how many. Other
/// connections, a node's publishing one among them if it is separate, stay up.
fn kill_subscriber_connections(redis: &RedisServer) -> usize {
    subscribed_connections(redis)
        .iter()
        .filter(|(id, _)| redis.cmd(&["CLIENT", "KILL", "ID", id]) == "1")
        .count()
}

#[test]
fn a_node_that_lost_its_redis_subscription_fills_the_gap_from_history_before_newer_publications() {
    const TOPIC: &str = "feed:gap";
    /// Publications sent at once after the kill: on loopback they take a
    /// few milliseconds, against a reconnect backoff of at least 50 ms.
    const IN_THE_GAP: u64 = 50;
    let cluster = cluster();
    let mut subscribers: Vec<(String, Ws)> = Vec::new();
    for (name, node) in cluster.nodes() {
        let mut ws = node.ws("/ws");
        open(&mut ws, TOPIC, None);
        subscribers.push((format!("the subscriber on node {name}"), ws));
    }
    let mut accepted: BTreeMap<u64, Value> = BTreeMap::new();
    let first = publish_at(&cluster.a, TOPIC, &json!({"n":0}), 1);
    accepted.insert(1, push(TOPIC, 1, "message", &json!({"n":0})));
    for (who, ws) in &mut subscribers {
        assert_eq!(pushes(ws, who, 1), [accepted[&1].clone()], "{who}");
    }

    let channels = subscribed_channels(&cluster.redis);
    let killed = kill_subscriber_connections(&cluster.redis);
    // Whatever Redis accepts while the nodes resubscribe is missed live; a
    // node refusing with 503 instead is allowed.
    let mut in_the_gap = 0;
    for n in 1..=IN_THE_GAP {
        let payload = json!({"n":n});
        let body = json!({"topic":TOPIC,"payload":payload}).to_string();
        let (status, reply) = cluster.a.http("POST", "/publish", Some(&body));
        match status {
            202 => {
                let at = position(&parse(&reply));
                assert_eq!(at.epoch, first.epoch, "{reply}");
                let pushed = push(TOPIC, at.offset, "message", &payload);
                assert!(accepted.insert(at.offset, pushed).is_none(), "{reply}");
                in_the_gap += 1;
            }
            503 => {}
            _ => panic!("publish {body}: {status} {reply}"),
        }
    }
    println!(
        "killed {killed} subscribed connections; {in_the_gap} publications accepted meanwhile"
    );
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Up);
    }
    wait_for_channels(&cluster.redis, channels);
    // Newer publications from another node show every node the gap.
    for n in IN_THE_GAP + 1..=IN_THE_GAP + 5 {
        let payload = json!({"n":n});
        let at = publish(&cluster.b, TOPIC, &payload);
        assert!(
            accepted
                .insert(at.offset, push(TOPIC, at.offset, "message", &payload))
                .is_none(),
            "offset {} given twice",
            at.offset
        );
    }
    let total = accepted.len() as u64;
    assert_eq!(
        accepted.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "accepted publications got contiguous offsets"
    );
    let want: Vec<Value> = accepted.into_values().skip(1).collect();
    for (who, ws) in &mut subscribers {
        assert_eq!(pushes(ws, who, want.len()), want, "{who}");
        assert_quiet(ws, who);
    }
}

#[test]
fn after_an_empty_redis_restart_a_stream_starts_a_new_epoch_and_old_positions_are_not_recovered() {
    const TOPIC: &str = "feed:amnesia";
    let mut cluster = cluster();
    let mut on_a = cluster.a.ws("/ws");
    open(&mut on_a, TOPIC, None);
    let mut last_seen = None;
    for n in 1..=3 {
        last_seen = Some(publish(&cluster.a, TOPIC, &json!({"n":n})));
    }
    let last_seen = last_seen.unwrap();
    assert_eq!(last_seen.offset, 3);
    assert_eq!(
        offsets(&pushes(&mut on_a, "the client on node a", 3)),
        [1, 2, 3]
    );
    drop(on_a);

    cluster.redis.stop();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Down);
    }
    cluster.redis.restart();
    for (name, node) in cluster.nodes() {
        wait_for_redis(node, name, Redis::Up);
    }

    let fresh = publish(&cluster.b, TOPIC, &json!({"n":"fresh"}));
    assert_eq!(fresh.offset, 1, "Redis lost the stream: it starts again");
    assert_ne!(
        fresh.epoch, last_seen.epoch,
        "a stream started afresh has a new epoch"
    );
    let mut on_c = cluster.c.ws("/ws");
    let reply = open(&mut on_c, TOPIC, Some(&last_seen));
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(position(&reply), fresh, "{reply}");
    // Not recovered, it still goes live.
    publish_at(&cluster.a, TOPIC, &json!({"n":"live"}), 2);
    assert_eq!(
        next_json(&mut on_c, "the client on node c"),
        push(TOPIC, 2, "message", &json!({"n":"live"}))
    );
    assert_quiet(&mut on_c, "the client on node c");
    let (status, body) = history(
        &cluster.a,
        TOPIC,
        &format!("?since=3&epoch={}", last_seen.epoch),
    );
    assert_eq!(status, 410, "the old epoch is gone: {body}");
    assert_eq!(body["epoch"], fresh.epoch.as_str(), "{body}");
}

#[test]
fn the_history_endpoint_answers_the_same_on_every_node_and_refuses_gone_positions_with_410() {
    const TOPIC: &str = "small:h";
    let cluster = cluster();
    let nodes = cluster.nodes();
    let mut now = None;
    for n in 1..=8 {
        let (_, node) = nodes[n as usize % 3];
        now = Some(publish(node, TOPIC, &json!({"n":n})));
    }
    let now = now.unwrap();
    assert_eq!(now.offset, 8, "one stream across nodes: {now:?}");
    let epoch = now.epoch.clone();
    let expected = |range: std::ops::RangeInclusive<u64>| -> Vec<Value> {
        range
            .map(|n| push(TOPIC, n, "message", &json!({"n":n})))
            .collect()
    };

    // `small:*` keeps five: 4..8.
    for (query, want) in [
        (String::new(), expected(4..=8)),
        (format!("?since=3&epoch={epoch}"), expected(4..=8)),
        (format!("?since=5&epoch={epoch}&limit=2"), expected(6..=7)),
        (format!("?since=8&epoch={epoch}"), Vec::new()),
    ] {
        for (name, node) in nodes {
            assert_eq!(
                history_publications(node, TOPIC, &query, &now),
                want,
                "history{query} on node {name}"
            );
        }
    }
    // The latest two, whichever end a limit without `since` takes: the same everywhere.
    let answers = nodes.map(|(_, node)| history(node, TOPIC, "?limit=2"));
    assert_eq!(answers[0].0, 200, "{:?}", answers[0]);
    assert!(
        answers.iter().all(|answer| answer == &answers[0]),
        "history?limit=2 differs between nodes: {answers:?}"
    );

    for query in [
        format!("?since=1&epoch={epoch}"),
        format!("?since=2&epoch={epoch}"),
        "?since=5&epoch=0000000000000000".to_string(),
    ] {
        for (name, node) in nodes {
            let (status, body) = history(node, TOPIC, &query);
            assert_eq!(status, 410, "history{query} on node {name}: {body}");
            assert_eq!(
                position(&body),
                now,
                "a 410 tells the current position: {body}"
            );
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    // Subscribing from those positions is not recovered either; from 3 it is.
    for (name, node) in nodes {
        let who = format!("a client on node {name}");
        for since in [1, 2] {
            let mut ws = node.ws("/ws");
            let reply = open(
                &mut ws,
                TOPIC,
                Some(&Position {
                    offset: since,
                    epoch: epoch.clone(),
                }),
            );
            assert_eq!(reply["recovered"], false, "{who}, from {since}: {reply}");
            assert_eq!(position(&reply), now, "{who}: {reply}");
            assert_quiet(&mut ws, &who);
        }
        let mut ws = node.ws("/ws");
        let reply = open(
            &mut ws,
            TOPIC,
            Some(&Position {
                offset: 3,
                epoch: epoch.clone(),
            }),
        );
        assert_eq!(reply["recovered"], true, "{who}, from 3: {reply}");
        assert_eq!(pushes(&mut ws, &who, 5), expected(4..=8), "{who}");
        assert_quiet(&mut ws, &who);
    }
    for (name, node) in nodes {
        assert_eq!(history(node, TOPIC, "?since=x").0, 400, "node {name}");
        assert_eq!(
            history(node, "plain:p", "").0,
            404,
            "node {name}: a topic without history"
        );
    }
}

#[test]
fn a_new_subscriber_on_any_node_gets_the_latest_publications_of_every_node_as_replay() {
    const TOPIC: &str = "ticker:x";
    let cluster = cluster();
    let nodes = cluster.nodes();
    let mut now = None;
    for n in 1..=5u64 {
        let (_, node) = nodes[n as usize % 3];
        now = Some(publish_at(node, TOPIC, &json!({"n":n}), n));
    }
    let now = now.unwrap();
    for (name, node) in nodes {
        let who = format!("a new subscriber on node {name}");
        let mut ws = node.ws("/ws");
        let reply = open(&mut ws, TOPIC, None);
        assert_eq!(position(&reply), now, "{who}: {reply}");
        let mut want: Vec<Value> = (3..=5)
            .map(|n| push(TOPIC, n, "message", &json!({"n":n})))
            .collect();
        for replayed in &mut want {
            replayed["replay"] = json!(true);
        }
        assert_eq!(pushes(&mut ws, &who, 3), want, "{who}");
        assert_quiet(&mut ws, &who);
    }
    let mut live = cluster.a.ws("/ws");
    open(&mut live, TOPIC, None);
    pushes(&mut live, "the live subscriber", 3);
    publish_at(&cluster.b, TOPIC, &json!({"n":6}), 6);
    assert_eq!(
        next_json(&mut live, "the live subscriber"),
        push(TOPIC, 6, "message", &json!({"n":6})),
        "live pushes are not marked as replay"
    );
}

#[test]
fn the_persistent_test_redis_keeps_acknowledged_writes_across_a_kill_and_restart() {
    let mut redis = RedisServer::start_persistent();
    assert_eq!(
        redis.cmd(&["CONFIG", "GET", "appendonly"]),
        "appendonly\nyes"
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "GET", "appendfsync"]),
        "appendfsync\nalways"
    );
    assert_eq!(redis.cmd(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cmd(&["INCR", "n"]), "1");
    let port = redis.port();
    redis.restart(); // SIGKILL, then start again
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cmd(&["GET", "k"]), "v");
    assert_eq!(redis.cmd(&["INCR", "n"]), "2");

    let mut volatile = RedisServer::start();
    assert_eq!(volatile.cmd(&["SET", "k", "v"]), "OK");
    volatile.restart();
    assert_eq!(volatile.cmd(&["GET", "k"]), "", "nothing persisted");
}

#[test]
fn a_recovery_asked_while_redis_is_down_is_answered_not_recovered() {
    const TOPIC: &str = "feed:offline";
    let mut cluster = cluster();
    let mut on_a = cluster.a.ws("/ws");
    open(&mut on_a, TOPIC, None);
    let last_seen = publish(&cluster.a, TOPIC, &json!({"n":1}));
    assert_eq!(offsets(&pushes(&mut on_a, "the client on node a", 1)), [1]);

    cluster.redis.stop();
    wait_for_redis(&cluster.a, "a", Redis::Down);
    // History lives in Redis: the node cannot replay, and must say so.
    let mut again = cluster.a.ws("/ws");
    let reply = open(&mut again, TOPIC, Some(&last_seen));
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(
        position(&reply),
        last_seen,
        "where node a last saw the stream"
    );
}

#[test]
fn through_redis_a_long_history_and_a_long_recovery_go_out_in_pages_and_reads_store_nothing() {
    // A 32 KiB budget: pages of 8 KiB for a replay, 16 KiB over HTTP,
    // against 60 KB of history. (Not less: a node's own `/metrics`, which
    // the cluster's start polls, is 16 KB with two shards in a cluster,
    // and a response over the budget is dropped with its connection.)
    let config = format!("{CONFIG}\n[limits]\nmax_outbound_bytes_per_connection = 32768\n");
    let cluster = Cluster::start_with(RedisServer::start(), &config);
    let nodes = cluster.nodes();
    let pad = "x".repeat(1000);
    let mut now = None;
    for n in 1..=60u64 {
        let (_, node) = nodes[n as usize % 3];
        now = Some(publish(node, "feed:long", &json!({"n":n,"pad":pad})));
    }
    let now = now.unwrap();

    // Over HTTP, on every node: pages that each name the next, 60 in all.
    for (name, node) in nodes {
        let mut since = 0;
        let mut seen = Vec::new();
        loop {
            let (status, page) = history(node, "feed:long", &format!("?since={since}"));
            assert_eq!(status, 200, "node {name}: {page}");
            let publications = page["publications"].as_array().unwrap();
            assert!(
                publications.len() < 60,
                "node {name} answered one page of all"
            );
            seen.extend(publications.iter().map(|p| p["offset"].as_u64().unwrap()));
            match page["next"].as_u64() {
                Some(next) => since = next,
                None => break,
            }
        }
        assert_eq!(seen, (1..=60).collect::<Vec<_>>(), "node {name}");
    }

    // A recovery of all 60 (60 KB against a 32 KiB budget), on another node
    // than most publishes, arrives whole and in order, then live ones.
    let (_, c) = nodes[2];
    let mut ws = c.ws("/ws");
    let reply = open(
        &mut ws,
        "feed:long",
        Some(&Position {
            offset: 0,
            epoch: now.epoch.clone(),
        }),
    );
    assert_eq!(reply["recovered"], true, "{reply}");
    let live = publish(nodes[0].1, "feed:long", &json!({"n":61,"pad":pad}));
    assert_eq!(live.offset, 61);
    let got = pushes(&mut ws, "the recovering client", 61);
    assert_eq!(offsets(&got), (1..=61).collect::<Vec<_>>());

    // A read of a stream nobody published to answers offset 0 of no epoch
    // and leaves no key in Redis.
    let (status, body) = history(nodes[1].1, "feed:never", "?since=0");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["offset"].as_u64(), body["epoch"].as_str()),
        (Some(0), Some(""))
    );
    assert_eq!(
        cluster
            .redis
            .cmd(&["EXISTS", "ringcast-test:s:{feed:never}:meta"]),
        "0",
        "a read stored the stream's meta"
    );
}

/// An SSE client that read a few publications on node a, lost its
/// connection, and reconnects to node b with its `Last-Event-ID` gets every
/// publication made meanwhile (on any node) once and in order, then live
/// ones published on c: the cursor names positions in Redis's order, so
/// any node resumes it.
#[test]
fn an_sse_client_resumes_on_another_node_from_its_last_event_id() {
    use common::sse::Sse;
    let cluster = cluster();
    let publish = |node: &TestServer, i: u64| {
        let body = json!({"topic": "feed:sse", "event": "tick", "payload": i}).to_string();
        let status = node.publish(&body);
        assert!(status == 200 || status == 202, "publish answered {status}");
    };
    let mut on_a = Sse::open(cluster.a.addr, "/sse?topic=feed:sse", "");
    assert_eq!(on_a.status, 200);
    on_a.expect("ringcast.subscribed");
    for (i, node) in [&cluster.a, &cluster.b, &cluster.c].into_iter().enumerate() {
        publish(node, i as u64 + 1);
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(on_a.next_push().json()["payload"].as_u64().unwrap());
    }
    let cursor = on_a
        .last_id
        .clone()
        .expect("stream pushes carry the cursor");
    on_a.shutdown();
    drop(on_a);
    for i in 4..=6 {
        publish(&cluster.c, i);
    }
    let header = format!("Last-Event-ID: {cursor}\r\n");
    let mut on_b = Sse::open(cluster.b.addr, "/sse?topic=feed:sse", &header);
    assert_eq!(on_b.status, 200);
    let reply = on_b.expect("ringcast.subscribed").json();
    assert_eq!(reply["recovered"], true, "{reply}");
    while got.len() < 6 {
        got.push(on_b.next_push().json()["payload"].as_u64().unwrap());
    }
    publish(&cluster.c, 7);
    got.push(on_b.next_push().json()["payload"].as_u64().unwrap());
    assert_eq!(got, (1..=7).collect::<Vec<_>>(), "once each, in order");
}
