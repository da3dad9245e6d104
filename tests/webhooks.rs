//! Webhooks against a fake backend (`tests/py/backend.py`, a
//! Python HTTP server that checks every POST's signature and records the
//! events): a topic held on several shards is occupied and vacated once, a
//! subscriber back within the delay cancels the vacated event, a user's
//! last connection closing sends `user_offline` once, a failing backend
//! gets the events again in order, a stopping node sends what waited for
//! its delay, one client's churn against a stalled backend stays within
//! `max_queued_bytes` (the rest dropped and counted), and an `https://`
//! backend gets them only from a node that trusts its CA.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::backend::*;
use common::TestServer;
use serde_json::{json, Value};

/// A node of `shards` shards reporting to `backend`, with `webhooks`
/// (more keys of `[webhooks]`).
fn node(backend: &TestServer, shards: usize, webhooks: &str) -> TestServer {
    TestServer::start(shards, Some(&webhooks_table(backend, webhooks)))
}

fn subscribe(node: &TestServer, topic: &str) -> common::Ws {
    let mut ws = node.ws("/ws");
    ws.send_text(&json!({"type":"subscribe","topic":topic}).to_string());
    let reply: Value = serde_json::from_str(&ws.recv_text()).unwrap();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    ws
}

#[test]
fn a_topic_held_on_every_shard_is_occupied_and_vacated_once() {
    let backend = backend();
    let node = node(&backend, 2, "vacated_delay_ms = 300");
    // Connections until both shards hold the topic (the kernel spreads
    // them by their ports).
    let mut subscribers = Vec::new();
    while (0..2).any(|shard| node.shard_metric("subscriptions", shard) == 0) {
        assert!(subscribers.len() < 64, "every connection went to one shard");
        subscribers.push(subscribe(&node, "room"));
    }
    let occupied = [event("channel_occupied", "room")];
    wait_for_events(&backend, &occupied);
    subscribers.truncate(1);
    assert_no_more(&backend, &occupied, Duration::from_millis(600));
    drop(subscribers);
    let vacated = [
        event("channel_occupied", "room"),
        event("channel_vacated", "room"),
    ];
    wait_for_events(&backend, &vacated);
    assert_no_more(&backend, &vacated, Duration::from_millis(600));
    assert!(node.metric("webhook_posts_total") >= 1);
    assert_eq!(node.metric("webhook_events_total"), 2);
    assert_eq!(node.metric("webhook_queued_bytes"), 0);
}

#[test]
fn a_subscriber_back_within_the_delay_cancels_the_vacated_event() {
    let backend = backend();
    let node = node(&backend, 1, "vacated_delay_ms = 3000");
    let first = subscribe(&node, "lobby");
    let occupied = [event("channel_occupied", "lobby")];
    wait_for_events(&backend, &occupied);
    let left = Instant::now();
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let second = subscribe(&node, "lobby");
    assert!(left.elapsed() < Duration::from_millis(3000), "back in time");
    assert_no_more(&backend, &occupied, Duration::from_millis(3500));
    let left = Instant::now();
    drop(second);
    let vacated = [
        event("channel_occupied", "lobby"),
        event("channel_vacated", "lobby"),
    ];
    wait_for_events(&backend, &vacated);
    assert!(
        left.elapsed() >= Duration::from_millis(2900),
        "vacated only after its delay, here {:?}",
        left.elapsed()
    );
}

#[test]
fn a_users_last_connection_closing_sends_user_offline_once() {
    let backend = backend();
    let node = node(
        &backend,
        2,
        "events = [\"user_offline\"]\noffline_delay_ms = 300",
    );
    let connections: Vec<_> = (0..4).map(|_| node.ws("/ws?user_id=ann")).collect();
    let bob = node.ws("/ws?user_id=bob");
    assert_no_more(&backend, &[], Duration::from_millis(500));
    drop(connections);
    let offline = [event("user_offline", "ann")];
    wait_for_events(&backend, &offline);
    assert_no_more(&backend, &offline, Duration::from_millis(600));
    drop(bob);
    wait_for_events(
        &backend,
        &[event("user_offline", "ann"), event("user_offline", "bob")],
    );
}

#[test]
fn a_user_is_added_to_a_presence_topic_once_and_removed_when_its_last_connection_leaves() {
    let backend = backend();
    let node = node(
        &backend,
        2,
        "events = [\"member_added\", \"member_removed\"]\nvacated_delay_ms = 300\n\
         [[rules]]\npattern = \"room:*\"\npresence = true\n\
         [[rules]]\npattern = \"feed:*\"\n",
    );
    let join = |user: &str, topic: &str| {
        let mut ws = node.ws(&format!("/ws?user_id={user}"));
        ws.send_text(&json!({"type":"subscribe","topic":topic}).to_string());
        let reply: Value = serde_json::from_str(&ws.recv_text()).unwrap();
        assert_eq!(reply["type"], "subscribed", "{reply}");
        ws
    };
    let ann: Vec<_> = (0..4).map(|_| join("ann", "room:1")).collect();
    let bob = join("bob", "room:1");
    // No presence on feed:*: no member events; anonymous members have no user.
    let _reader = join("carl", "feed:1");
    let _anonymous = subscribe(&node, "room:1");
    let mut members: Vec<_> = events(&backend);
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        members = events(&backend);
    }
    members.sort();
    assert_eq!(
        members,
        [
            ("member_added".to_string(), "room:1/ann".to_string()),
            ("member_added".to_string(), "room:1/bob".to_string()),
        ]
    );
    let added = events(&backend);
    drop(ann);
    let mut expected = added.clone();
    expected.push(event("member_removed", "room:1/ann"));
    wait_for_events(&backend, &expected);
    assert_no_more(&backend, &expected, Duration::from_millis(600));
    drop(bob);
    expected.push(event("member_removed", "room:1/bob"));
    wait_for_events(&backend, &expected);
}

#[test]
fn a_failing_backend_gets_every_event_again_in_order() {
    let backend = backend();
    assert_eq!(backend.http("POST", "/fail?n=3", None).0, 204);
    let node = node(&backend, 2, "vacated_delay_ms = 0\nmax_batch_events = 2");
    let topics = ["a", "b", "c", "d", "e"];
    for topic in topics {
        drop(subscribe(&node, topic));
    }
    // Each topic's events in order, once; two topics' events may
    // interleave (a connection's close is read after the next one opens,
    // perhaps on the other shard).
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen = events(&backend);
        if seen.len() >= 10 {
            break seen;
        }
        assert!(Instant::now() < deadline, "the backend got {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for topic in topics {
        let of_topic: Vec<&str> = seen
            .iter()
            .filter(|(_, t)| t == topic)
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(
            of_topic,
            ["channel_occupied", "channel_vacated"],
            "{topic} in {seen:?}"
        );
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert_eq!(recorded(&backend)["failed"], 3);
    // The backend records a batch before the node reads its answer.
    node.wait_for("the last answer to be counted", || {
        node.metric("webhook_queued_bytes") == 0
    });
    assert_eq!(node.metric("webhook_post_failures_total"), 3);
    assert!(node.metric("webhook_posts_total") >= 5, "batches of two");
}

#[test]
fn a_stopping_node_sends_what_waited_for_its_delay() {
    let backend = backend();
    let mut node = node(
        &backend,
        2,
        "vacated_delay_ms = 60000\noffline_delay_ms = 60000",
    );
    let ws = subscribe(&node, "shutting");
    let user = node.ws("/ws?user_id=carol");
    wait_for_events(&backend, &[event("channel_occupied", "shutting")]);
    drop((ws, user));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(node.terminate(), Some(0));
    wait_for_events(
        &backend,
        &[
            event("channel_occupied", "shutting"),
            event("channel_vacated", "shutting"),
            event("user_offline", "carol"),
        ],
    );
}

#[test]
fn one_clients_churn_against_a_stalled_backend_stays_within_the_byte_bound() {
    let backend = backend();
    // The backend takes 30 s per POST: nothing is delivered during the test.
    assert_eq!(backend.http("POST", "/stall?ms=30000", None).0, 204);
    let node = node(
        &backend,
        1,
        "vacated_delay_ms = 0\nmax_queued_bytes = 65536\ntimeout_ms = 60000",
    );
    let mut ws = node.ws("/ws");
    // Each round makes two events of about 70 bytes.
    for i in 0..1500 {
        let topic = format!("churn-{i:05}");
        ws.send_text(&json!({"type":"subscribe","topic":topic}).to_string());
        ws.send_text(&json!({"type":"unsubscribe","topic":topic}).to_string());
    }
    ws.send_text(r#"{"type":"subscribe","topic":"last"}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply: Value = serde_json::from_str(&ws.recv_text()).unwrap();
        if reply["type"] == "subscribed" && reply["topic"] == "last" {
            break;
        }
        assert!(Instant::now() < deadline, "the churn was not answered");
    }
    node.wait_for("the webhook thread to count the churn", || {
        node.metric("webhook_events_total") + node.metric("webhook_events_dropped_total") >= 3001
    });
    let queued = node.metric("webhook_queued_bytes");
    assert!(queued <= 65536, "{queued} bytes queued");
    assert!(queued > 60000, "the bound is what stops it: {queued}");
    assert!(node.metric("webhook_events_dropped_total") > 1000);
    assert_eq!(node.http("GET", "/health", None).0, 200);
}

#[test]
fn an_https_backend_gets_the_events_when_its_ca_is_trusted_and_none_when_not() {
    let dir = std::env::temp_dir().join(format!("ringcast-webhook-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::tls::certificates(&dir, "backend");
    let script = format!("{}/tests/py/backend.py", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(SECRET)
        .arg("--tls")
        .arg(dir.join("backend.pem"))
        .arg(dir.join("backend.key"));
    let backend = TestServer::spawn(cmd, None);
    // The backend speaks TLS only: read what it recorded with Python's
    // urllib, trusting the test CA.
    let events = || -> Value {
        let read = "import ssl, sys, urllib.request\n\
                    c = ssl.create_default_context(cafile=sys.argv[1])\n\
                    print(urllib.request.urlopen(sys.argv[2], context=c).read().decode())";
        let out = Command::new("python3")
            .args(["-c", read])
            .arg(dir.join("ca.pem"))
            .arg(format!("https://{}/events", backend.addr))
            .output()
            .expect("python3 runs");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let node_trusting = |trust: bool| {
        let config = std::env::temp_dir().join(format!(
            "ringcast-webhook-tls-{}-{trust}.toml",
            std::process::id()
        ));
        std::fs::write(
            &config,
            format!(
                "[webhooks]\nurl = \"https://{}/hook\"\nsecret = \"{SECRET}\"\ntimeout_ms = 2000\n",
                backend.addr
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.args(["--listen", "127.0.0.1:0", "--shards", "1", "--config"])
            .arg(&config);
        // rustls-native-certs reads the CAs from SSL_CERT_FILE when it is
        // set; without it, the system's, which do not hold the test CA.
        if trust {
            cmd.env("SSL_CERT_FILE", dir.join("ca.pem"));
        } else {
            cmd.env_remove("SSL_CERT_FILE");
        }
        TestServer::spawn(cmd, Some(common::tempfile_path::TempPath(config)))
    };

    let untrusting = node_trusting(false);
    let _ws = subscribe(&untrusting, "nobody-hears");
    untrusting.wait_for("a failed POST", || {
        untrusting.metric("webhook_post_failures_total") >= 1
    });
    let trusting = node_trusting(true);
    let _ws = subscribe(&trusting, "secure");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = events();
        let names: Vec<&str> = seen["events"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["topic"].as_str()).collect())
            .unwrap_or_default();
        if names == ["secure"] {
            assert_eq!(seen["bad_signatures"], 0);
            break;
        }
        assert!(names.is_empty(), "only the trusting node's event: {seen}");
        assert!(Instant::now() < deadline, "no event over https: {seen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_publications_are_reported_as_client_events_when_asked_for() {
    let backend = backend();
    let node = node(&backend, 1, "events = [\"client_event\"]");
    let mut ws = node.ws("/ws?user_id=ann");
    ws.send_text(r#"{"type":"subscribe","topic":"chat:1"}"#);
    assert_eq!(
        serde_json::from_str::<Value>(&ws.recv_text()).unwrap()["type"],
        "subscribed"
    );
    ws.send_text(
        r#"{"type":"message","topic":"chat:1","event":"said","payload":{"text":"hi \"you\""}}"#,
    );
    assert_eq!(
        node.publish(r#"{"topic":"chat:1","payload":"from the server"}"#),
        202
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let reported = loop {
        let view = recorded(&backend);
        if let Some(events) = view["events"].as_array().filter(|e| !e.is_empty()) {
            break events.clone();
        }
        assert!(Instant::now() < deadline, "no client event");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        recorded(&backend)["events"].as_array().unwrap().len(),
        1,
        "HTTP publishes are not client events"
    );
    let event = &reported[0];
    assert_eq!(event["name"], "client_event");
    assert_eq!(event["topic"], "chat:1");
    assert_eq!(event["event"], "said");
    assert_eq!(event["user"], "ann");
    assert_eq!(event["payload"], json!({"text":"hi \"you\""}));
}
