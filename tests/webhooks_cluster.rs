//! Webhooks across three nodes joined through one Redis, against the fake
//! backend (`tests/py/backend.py`): each transition is reported once for
//! the whole cluster, whichever nodes hold the topic or the user, and a
//! node killed without a goodbye has its topics vacated by another within
//! its `presence_ttl`.
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::Cluster;
use common::backend::*;
use common::redis::RedisServer;
use common::{TestServer, Ws};

/// `presence_ttl_s` of the nodes: how long a dead node goes unnoticed.
const PRESENCE_TTL: Duration = Duration::from_secs(3);

/// Three nodes reporting to `backend`, with `webhooks` (more keys of
/// `[webhooks]`).
fn cluster(backend: &TestServer, webhooks: &str) -> Cluster {
    let config = format!(
        "presence_ttl_s = {}\n{}",
        PRESENCE_TTL.as_secs(),
        webhooks_table(backend, webhooks)
    );
    Cluster::start_with(RedisServer::start(), &config)
}

fn subscribe(node: &TestServer, topic: &str) -> Ws {
    let mut ws = node.ws("/ws");
    ws.subscribe(topic);
    ws
}

#[test]
fn a_topic_held_on_every_node_is_occupied_and_vacated_once_for_the_cluster() {
    let backend = backend();
    let cluster = cluster(&backend, "vacated_delay_ms = 1000");
    let mut subscribers: Vec<Ws> = cluster
        .nodes()
        .iter()
        .flat_map(|(_, node)| [subscribe(node, "room"), subscribe(node, "room")])
        .collect();
    let occupied = [event("channel_occupied", "room")];
    wait_for_events(&backend, &occupied);
    // The first node's subscribers leave, then the second's: the third
    // still holds it.
    subscribers.drain(..4);
    assert_no_more(&backend, &occupied, Duration::from_millis(800));
    // Back on the first node within the delay of the last leaving.
    subscribers.clear();
    let back = subscribe(&cluster.a, "room");
    assert_no_more(&backend, &occupied, Duration::from_millis(1500));
    drop(back);
    let vacated = [
        event("channel_occupied", "room"),
        event("channel_vacated", "room"),
    ];
    wait_for_events(&backend, &vacated);
    assert_no_more(&backend, &vacated, Duration::from_millis(1200));
    // A new transition is reported again, once.
    let _again = [subscribe(&cluster.b, "room"), subscribe(&cluster.c, "room")];
    let mut twice = vacated.to_vec();
    twice.push(event("channel_occupied", "room"));
    wait_for_events(&backend, &twice);
    assert_no_more(&backend, &twice, Duration::from_millis(500));
}

#[test]
fn a_user_connected_to_two_nodes_goes_offline_once_when_the_last_connection_closes() {
    let backend = backend();
    let cluster = cluster(
        &backend,
        "events = [\"user_offline\", \"member_added\", \"member_removed\"]\n\
         offline_delay_ms = 300\nvacated_delay_ms = 300\n\
         [[rules]]\npattern = \"room:*\"\npresence = true\n",
    );
    let join = |node: &TestServer| {
        let mut ws = node.ws("/ws?user_id=ann");
        ws.subscribe("room:1");
        ws
    };
    let on_a = join(&cluster.a);
    let on_b = join(&cluster.b);
    let added = [event("member_added", "room:1/ann")];
    wait_for_events(&backend, &added);
    drop(on_a);
    assert_no_more(&backend, &added, Duration::from_millis(800));
    drop(on_b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = events(&backend);
    while seen.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        seen = events(&backend);
    }
    let recorded = seen.clone();
    // Which of the two comes first depends on which check ran first.
    seen[1..].sort();
    assert_eq!(
        seen,
        [
            event("member_added", "room:1/ann"),
            event("member_removed", "room:1/ann"),
            event("user_offline", "ann"),
        ]
    );
    assert_no_more(&backend, &recorded, Duration::from_millis(600));
}

#[test]
fn a_killed_node_s_topics_are_vacated_by_another_node_within_its_presence_ttl() {
    let backend = backend();
    let cluster = cluster(&backend, "vacated_delay_ms = 300");
    let _shared = subscribe(&cluster.a, "shared");
    let _on_c = [
        subscribe(&cluster.c, "shared"),
        subscribe(&cluster.c, "solo"),
    ];
    let mut occupied = vec![
        event("channel_occupied", "shared"),
        event("channel_occupied", "solo"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&backend).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = events(&backend);
    seen.sort();
    assert_eq!(seen, occupied);
    occupied = events(&backend);
    cluster.c.signal(libc::SIGKILL);
    let killed = Instant::now();
    let mut expected = occupied.clone();
    expected.push(event("channel_vacated", "solo"));
    // Another node's heartbeat (every third of the TTL) finds c's key gone.
    let within = PRESENCE_TTL + PRESENCE_TTL / 3 + Duration::from_secs(5);
    let deadline = killed + within;
    loop {
        let seen = events(&backend);
        if seen == expected {
            break;
        }
        assert!(
            seen.len() <= expected.len() && seen[..seen.len().min(2)] == expected[..2],
            "{seen:?}"
        );
        assert!(
            Instant::now() < deadline,
            "not vacated in {within:?}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    assert!(
        took >= PRESENCE_TTL / 2,
        "vacated {took:?} after the kill: too soon"
    );
    // "shared" is still held on a: no event for it.
    assert_no_more(&backend, &expected, PRESENCE_TTL);
}

#[test]
fn a_transition_made_while_redis_is_stopped_is_reported_once_when_it_answers_again() {
    let backend = backend();
    let cluster = cluster(&backend, "vacated_delay_ms = 300");
    cluster.redis.pause();
    // The subscription itself waits for Redis too: its reply comes later.
    let mut late = cluster.a.ws("/ws");
    late.send_text(r#"{"type":"subscribe","topic":"late"}"#);
    // Past the command timeout (2 s): the batch failed and waits to be sent
    // again, and Redis will still run the one it received.
    cluster::wait_until("a failed webhook batch", || {
        match cluster.a.metric("webhook_redis_failures_total") {
            0 => Err("none yet".into()),
            _ => Ok(()),
        }
    });
    assert!(cluster.a.metric("webhook_redis_waiting") > 0);
    assert_no_more(&backend, &[], Duration::ZERO);
    cluster.redis.resume();
    assert_eq!(late.recv_json()["type"], "subscribed");
    let occupied = [event("channel_occupied", "late")];
    wait_for_events(&backend, &occupied);
    assert_no_more(&backend, &occupied, Duration::from_millis(800));
    drop(late);
    let vacated = [
        event("channel_occupied", "late"),
        event("channel_vacated", "late"),
    ];
    wait_for_events(&backend, &vacated);
    cluster::wait_until("nothing waiting for Redis", || {
        match cluster.a.metric("webhook_redis_waiting") {
            0 => Ok(()),
            n => Err(format!("{n} waiting")),
        }
    });
}

#[test]
fn a_node_stopped_with_sigterm_reports_its_vacated_topics_at_once_and_says_goodbye() {
    let backend = backend();
    let mut cluster = cluster(&backend, "vacated_delay_ms = 60000");
    let _shared = subscribe(&cluster.a, "shared");
    let _on_c = [
        subscribe(&cluster.c, "shared"),
        subscribe(&cluster.c, "solo"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&backend).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut expected = events(&backend);
    assert_eq!(expected.len(), 2, "{expected:?}");
    assert_eq!(cluster.c.terminate(), Some(0));
    // Its connections closed as it stopped: what waited for the
    // delay (a minute) was checked at once, and reported before the node exited.
    expected.push(event("channel_vacated", "solo"));
    assert_eq!(events(&backend), expected);
    // It left no live key to expire: no sweep, nothing more.
    assert_no_more(&backend, &expected, PRESENCE_TTL + PRESENCE_TTL / 2);
    let nodes = cluster
        .redis
        .cmd(&["SMEMBERS", "{ringcast-test:whn}:nodes"]);
    assert_eq!(nodes.lines().count(), 2, "c said goodbye: {nodes:?}");
}
