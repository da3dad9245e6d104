//! Nodes joined through a real Redis Cluster (three masters with a replica
//! each): sharded pub/sub, streams, registrations and presence across
//! slots, and a master failover that loses no acknowledged publication.
#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster::{recv_within, wait_for_redis, wait_until, Redis};
use common::{pusher, TestServer, Ws};
use redis_cluster::RedisCluster;
use serde_json::{json, Value};

const RULES: &str = r#"
[[rules]]
pattern = "feed:*"
history_size = 10000
history_ttl_s = 300

[[rules]]
pattern = "room:*"
presence = true

[[rules]]
pattern = "*"
"#;

fn node(redis: &RedisCluster, name: &str, extra: &str) -> TestServer {
    let config = format!(
        "[cluster]\nredis_url = \"{}\"\nnode_name = \"{name}\"\nprefix = \"rc\"\n{extra}\n{RULES}",
        redis.url()
    );
    let node = TestServer::start(cluster::SHARDS, Some(&config));
    wait_for_redis(&node, name, Redis::Up);
    node
}

fn publish(node: &TestServer, body: Value) -> (u16, Value) {
    let (status, reply) = node.http("POST", "/publish", Some(&body.to_string()));
    (
        status,
        serde_json::from_str(&reply).unwrap_or(Value::String(reply)),
    )
}

fn open(ws: &mut Ws, topic: &str) -> Value {
    ws.send_text(&json!({"type":"subscribe","topic":topic}).to_string());
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

fn next(ws: &mut Ws, who: &str) -> Value {
    let text = recv_within(ws, Duration::from_secs(10)).unwrap_or_else(|| panic!("{who}: nothing"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn topics_streams_registrations_and_presence_work_across_the_slots_of_a_redis_cluster() {
    let redis = RedisCluster::start();
    let a = node(&redis, "a", pusher::APP);
    let b = node(&redis, "b", pusher::APP);

    // Topics whose channels fall on different masters.
    let topics: Vec<String> = (0..8).map(|n| format!("news:{n}")).collect();
    let mut on_a = a.ws("/ws");
    for topic in &topics {
        on_a.subscribe(topic);
    }
    for topic in &topics {
        let (status, reply) = publish(&b, json!({"topic":topic,"payload":topic}));
        assert_eq!(status, 202, "{reply}");
        let push = next(&mut on_a, "the subscriber on a");
        assert_eq!(push["topic"], topic.as_str(), "{push}");
    }

    // A stream per slot, published on both nodes: one order everywhere.
    let streams: Vec<String> = (0..4).map(|n| format!("feed:{n}")).collect();
    let mut subscribers = [a.ws("/ws"), b.ws("/ws")];
    for ws in &mut subscribers {
        for topic in &streams {
            open(ws, topic);
        }
    }
    for round in 0..3 {
        for (i, topic) in streams.iter().enumerate() {
            let via = if (round + i) % 2 == 0 { &a } else { &b };
            let (status, reply) = publish(via, json!({"topic":topic,"payload":round}));
            assert_eq!(
                (status, &reply["offset"]),
                (202, &json!(round + 1)),
                "{reply}"
            );
        }
    }
    for (who, ws) in ["a", "b"].into_iter().zip(subscribers.iter_mut()) {
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..streams.len() * 3 {
            let push = next(ws, who);
            let topic = push["topic"].as_str().unwrap().to_string();
            seen.entry(topic)
                .or_default()
                .push(push["offset"].as_u64().unwrap());
        }
        for topic in &streams {
            assert_eq!(seen[topic], [1, 2, 3], "{who}: {topic}");
        }
    }
    let (status, body) = b.http("GET", "/topics/feed:2/history", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["offset"], 3);

    // Registrations live on every master; a node started later finds them.
    let mut ids = Vec::new();
    for n in 0..6 {
        let body = json!({"user_id": format!("u{n}"), "topics": []}).to_string();
        let (status, reply) = a.http("POST", "/register", Some(&body));
        assert_eq!(status, 201, "{reply}");
        ids.push(
            serde_json::from_str::<Value>(&reply).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let c = node(&redis, "c", "");
    for id in &ids {
        for (name, n) in [("b", &b), ("c", &c)] {
            wait_until(
                &format!("node {name} to know registration {id}"),
                || match n.upgrade_status(&format!("/ws/{id}"), "") {
                    101 => Ok(()),
                    other => Err(other.to_string()),
                },
            );
        }
    }

    // Presence counts every node's members.
    let mut in_room = [a.ws("/ws"), b.ws("/ws"), c.ws("/ws")];
    for ws in &mut in_room {
        ws.subscribe("room:1");
    }
    wait_until("presence to count three members on every node", || {
        for n in [&a, &b, &c] {
            let (_, body) = n.http("GET", "/topics/room:1/presence", None);
            let count = serde_json::from_str::<Value>(&body).unwrap()["count"].clone();
            if count != 3 {
                return Err(format!("count {count}"));
            }
        }
        Ok(())
    });

    // A Pusher channel's subscribers on b, counted from a: a question on
    // the control channel, whose SPUBLISH says how many nodes heard it.
    let _on_b = [
        pusher::subscribed(&b, "news"),
        pusher::subscribed(&b, "news"),
    ];
    let (status, counted) =
        pusher::signed_get(&a, "/apps/4711/channels/news", "info=subscription_count");
    assert_eq!(status, 200, "{counted}");
    assert_eq!(counted, json!({"occupied": true, "subscription_count": 2}));
    let listed = pusher::signed_get(&a, "/apps/4711/channels", "");
    assert_eq!(listed, (200, json!({"channels": {"news": {}}})));
    assert_eq!(
        a.metric("cluster_node_queries_partial_total"),
        0,
        "every node answered, none waited for the timeout"
    );

    // A presence channel's member events: Redis decides and publishes them
    // in one script, whose keys and channel share the channel's slot.
    let (mut watcher, _) = pusher::presence_member(&a, "presence-lobby", "obs");
    let (ann, members) = pusher::presence_member(&b, "presence-lobby", "ann");
    assert_eq!(members, ["ann", "obs"]);
    let member_event = |ws: &mut Ws| {
        let text = recv_within(ws, Duration::from_secs(10)).expect("a member event");
        let event: Value = serde_json::from_str(&text).unwrap();
        (
            event["event"].as_str().unwrap().to_string(),
            event["data"].clone(),
        )
    };
    let added = member_event(&mut watcher);
    assert_eq!(added.0, "pusher_internal:member_added", "{added:?}");
    drop(ann);
    let removed = member_event(&mut watcher);
    assert_eq!(
        removed,
        (
            "pusher_internal:member_removed".to_string(),
            json!(r#"{"user_id":"ann"}"#)
        )
    );
}

/// A master dies under publish load; its replica takes over. Every stream
/// publication acknowledged (202) before, during and after is in history
/// and reaches subscribers on both nodes once, in order.
#[test]
fn a_master_failover_loses_no_acknowledged_stream_publication() {
    const TOPIC: &str = "feed:failover";
    let mut redis = RedisCluster::start();
    let a = node(&redis, "a", "wait_replicas = 1");
    let b = node(&redis, "b", "wait_replicas = 1");
    let mut subscribers = [a.ws("/ws"), b.ws("/ws")];
    for ws in &mut subscribers {
        open(ws, TOPIC);
    }
    let master = redis.master_of(&format!("rc:s:{{{TOPIC}}}:log"));
    let stop = AtomicBool::new(false);
    let mut acknowledged: Vec<u64> = std::thread::scope(|s| {
        let publishers: Vec<_> = [&a, &b]
            .into_iter()
            .map(|via| {
                let stop = &stop;
                s.spawn(move || {
                    let mut acked = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let (status, reply) = publish(via, json!({"topic":TOPIC,"payload":"x"}));
                        match status {
                            202 => acked.push(reply["offset"].as_u64().unwrap()),
                            // Refused, or the outcome unknown while the
                            // master is gone: not acknowledged.
                            503 | 504 => std::thread::sleep(Duration::from_millis(20)),
                            other => panic!("{other} {reply}"),
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        redis.kill_and_fail_over(master);
        // Publishing goes on after the failover.
        wait_until("both nodes to be up after the failover", || {
            for (name, n) in [("a", &a), ("b", &b)] {
                if cluster::health(n)["status"] != "ok" {
                    return Err(format!("{name} not ok"));
                }
            }
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
        publishers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect()
    });
    acknowledged.sort_unstable();
    let before = acknowledged.len();
    acknowledged.dedup();
    assert_eq!(before, acknowledged.len(), "an offset acknowledged twice");
    let last = *acknowledged.last().expect("publications were acknowledged");
    println!(
        "{} publications acknowledged, last offset {last}",
        acknowledged.len()
    );

    // History holds every acknowledged one.
    let mut stored = Vec::new();
    let mut since = 0;
    loop {
        let (status, body) = b.http(
            "GET",
            &format!("/topics/{TOPIC}/history?since={since}&limit=10000"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        stored.extend(
            page["publications"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["offset"].as_u64().unwrap()),
        );
        match page["next"].as_u64() {
            Some(next) => since = next,
            None => break,
        }
    }
    let missing: Vec<&u64> = acknowledged
        .iter()
        .filter(|o| !stored.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in history: {missing:?}"
    );

    // Each subscriber got every acknowledged one, once, in order.
    for (who, ws) in ["a", "b"].into_iter().zip(subscribers.iter_mut()) {
        let mut got = Vec::new();
        while !matches!(got.last(), Some(&o) if o >= last) {
            let push = next(ws, who);
            if let Some(offset) = push["offset"].as_u64() {
                got.push(offset);
            }
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(got, sorted, "{who}: offsets repeated or out of order");
        let missing: Vec<&u64> = acknowledged.iter().filter(|o| !got.contains(o)).collect();
        assert!(
            missing.is_empty(),
            "{who} missed acknowledged offsets {missing:?}"
        );
    }
    for (name, n) in [("a", &a), ("b", &b)] {
        let rss = n.rss_bytes();
        assert!(
            rss <= 320 << 20,
            "node {name}: RSS {} MiB through the failover",
            rss >> 20
        );
    }
}

/// Webhooks across two nodes on a Redis Cluster: the scripts touch one slot
/// each (a name, or the nodes' keys under one hash tag), so topics spread
/// over the slots are each occupied and vacated once, and a killed node's
/// topic is vacated by the other after its TTL.
#[test]
fn webhooks_are_decided_once_across_the_slots_of_a_redis_cluster() {
    use common::backend::{
        backend, event, events, wait_for_events, wait_for_events_within, webhooks_table,
    };
    let redis = RedisCluster::start();
    let backend = backend();
    let extra = format!(
        "presence_ttl_s = 3\n{}",
        webhooks_table(&backend, "vacated_delay_ms = 300")
    );
    let a = node(&redis, "a", &extra);
    let b = node(&redis, "b", &extra);
    let topics: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    let mut subscribers = Vec::new();
    for node in [&a, &b] {
        let mut ws = node.ws("/ws");
        for topic in &topics {
            open(&mut ws, topic);
        }
        subscribers.push(ws);
    }
    let expected =
        |name: &str| -> Vec<(String, String)> { topics.iter().map(|t| event(name, t)).collect() };
    let sorted = || {
        let mut seen = events(&backend);
        seen.sort();
        seen
    };
    wait_until("each topic occupied once", || {
        let seen = sorted();
        (seen == expected("channel_occupied"))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    subscribers.clear();
    let mut both = [expected("channel_occupied"), expected("channel_vacated")].concat();
    both.sort();
    wait_until("each topic vacated once", || {
        let seen = sorted();
        (seen == both).then_some(()).ok_or(format!("{seen:?}"))
    });
    let _solo = {
        let mut ws = b.ws("/ws");
        open(&mut ws, "solo");
        ws
    };
    let mut all = events(&backend);
    all.push(event("channel_occupied", "solo"));
    wait_for_events(&backend, &all);
    b.signal(libc::SIGKILL);
    all.push(event("channel_vacated", "solo"));
    wait_for_events_within(&backend, &all, Duration::from_secs(15));
}
