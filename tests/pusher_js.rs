//! The Pusher protocol with Pusher's own libraries: pusher-js (Node build)
//! connects to `/app/{key}`, subscribes to a public and a private channel
//! (authorized by the server SDK as an app's backend would), gets events
//! the server SDK triggers over `POST /apps/{id}/events` and
//! `/batch_events` (a batch with one bad event refused whole), and is refused a
//! channel authorized with another secret; a trigger signed with another
//! secret gets 401. Raw WebSocket checks of what pusher-js hides: the
//! socket id, `pusher:ping`, unknown keys and channel names, and that an
//! app's channels and ringcast's topics of the same name never meet.
//! Presence channels and client events with pusher-js on one node of two
//! shards and on two nodes joined through Redis (`presence_test.mjs`);
//! sign-in, `sendToUser` and `terminateUserConnections` (`user_test.mjs`);
//! webhooks the SDK validates (`webhook_test.mjs`); Laravel Echo
//! (`echo_test.mjs`).
//! `scripts/test.sh` installs the packages (`npm ci --prefix tests/pusher`).
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cluster::Redis;
use common::pusher::{presence_member, pusher_ws, signed, signed_get, subscribed, APP};
use common::redis::RedisServer;
use common::{TestServer, Ws};
use serde_json::{json, Value};

fn node() -> TestServer {
    TestServer::start(2, Some(APP))
}

/// `POST /apps/4711/events` of `data` to `channel`, signed with `secret`
/// as Pusher's libraries sign; the status.
fn trigger(node: &TestServer, secret: &str, channel: &str, data: &str) -> u16 {
    let body = json!({"name":"greeting","channels":[channel],"data":data}).to_string();
    signed_post(node, secret, "/apps/4711/events", &body)
}

/// Nodes `a` and `b` with `config`, joined through a Redis of their own,
/// once both see it (the Redis first: it must outlive them).
fn two_nodes(config: &str) -> (RedisServer, TestServer, TestServer) {
    let redis = RedisServer::start();
    let a = cluster::start_node_with(&redis, "a", config);
    let b = cluster::start_node_with(&redis, "b", config);
    cluster::wait_for_redis(&a, "a", Redis::Up);
    cluster::wait_for_redis(&b, "b", Redis::Up);
    (redis, a, b)
}

/// Runs `script` (in tests/pusher) with Node against `nodes` (the first's
/// address, the app, then the second's address if any); what it printed.
fn run_script(script: &str, nodes: &[&TestServer]) -> Value {
    let dir = format!("{}/tests/pusher", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/pusher-js")).exists(),
        "tests/pusher/node_modules is missing: run ./scripts/test.sh (npm ci --prefix tests/pusher)"
    );
    let mut command = Command::new("node");
    command.current_dir(&dir).args([script, "127.0.0.1"]);
    command.arg(nodes[0].addr.port().to_string());
    command.args(["4711", "app-key", "app-secret"]);
    for node in &nodes[1..] {
        command.arg("127.0.0.1").arg(node.addr.port().to_string());
    }
    let out = command.output().expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn pusher_js_subscribes_and_gets_events_the_server_sdk_triggers() {
    let node = node();
    let result = run_script("client_test.mjs", &[&node]);
    let socket_id = result["socket_id"].as_str().unwrap();
    assert!(
        socket_id
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok()),
        "{result}"
    );
    let mut events = result["events"].as_array().unwrap().clone();
    events.sort_by_key(|e| e["channel"].as_str().unwrap().to_string());
    assert_eq!(
        events,
        [
            json!({"channel":"news","data":{"text":"hi, & welcome"}}),
            json!({"channel":"private-room","data":{"text":"hi, & welcome"}}),
        ],
        "{result}"
    );
    assert_eq!(result["forged_subscribed"], false, "{result}");
    assert_eq!(
        result["errors"],
        json!([{"channel":"private-forged","status":401,"type":"AuthError"}])
    );
    assert_eq!(result["forged_trigger"], 401, "{result}");
    assert_eq!(
        result["queries"],
        json!({
            "news": {"occupied": true, "subscription_count": 1},
            "empty": {"occupied": false},
            "all": {"channels": {"news": {}, "private-room": {}}},
            "private": {"channels": {"private-room": {}}},
            "user_count_of_all": 400,
            "user_count_of_public": 400,
            "forged": 401,
        }),
        "{result}"
    );
    assert_eq!(
        result["trigger_info"],
        json!({"channels": {
            "news": {"subscription_count": 1},
            "nobody-here": {"subscription_count": 0},
        }}),
        "{result}"
    );
    assert_eq!(
        result["batch_info"],
        json!({"batch": [{"subscription_count": 1}, {}]}),
        "{result}"
    );
    assert_eq!(result["bad_batch"], 400, "{result}");
    let mut batched = result["batched"].as_array().unwrap().clone();
    batched.sort_by_key(|e| e["channel"].as_str().unwrap().to_string());
    assert_eq!(
        batched,
        [
            json!({"channel":"news","data":{"n":1}}),
            json!({"channel":"private-room","data":{"n":2}}),
        ],
        "the bad batch's good event never went out: {result}"
    );
}

#[test]
fn the_protocols_own_messages_and_refusals() {
    let node = node();
    let (mut ws, socket_id) = pusher_ws(&node);
    let (_, other_id) = pusher_ws(&node);
    assert_ne!(socket_id, other_id, "each connection its own socket id");
    ws.send_text(r#"{"event":"pusher:ping","data":{}}"#);
    assert_eq!(ws.recv_json(), json!({"event":"pusher:pong","data":{}}));
    ws.send_text(r#"{"event":"pusher:subscribe","data":{"channel":"bad name"}}"#);
    let error = ws.recv_json();
    assert_eq!(error["event"], "pusher:error");
    assert_eq!(error["data"]["code"], 4009, "{error}");
    ws.send_text(r#"{"event":"pusher:subscribe","data":{"channel":"private-x"}}"#);
    let refused = ws.recv_json();
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["channel"], "private-x");
    ws.send_text("not json");
    assert_eq!(ws.recv_json()["event"], "pusher:error");
    // A key no app has: Pusher's 4001, final for its clients (an HTTP
    // error they would retry).
    let mut nobody = node.ws("/app/nobody?protocol=7");
    let refused = nobody.recv_json();
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(refused["data"]["code"], 4001, "{refused}");
    assert_eq!(nobody.expect_close(), 4001);
    assert_eq!(
        node.http("GET", "/app/nobody", None).0,
        404,
        "not an upgrade"
    );
}

#[test]
fn an_apps_channels_and_ringcast_topics_of_the_same_name_never_meet() {
    let node = node();
    let (mut pusher, _) = pusher_ws(&node);
    pusher.send_text(r#"{"event":"pusher:subscribe","data":{"channel":"news"}}"#);
    assert_eq!(
        pusher.recv_json(),
        json!({"event":"pusher_internal:subscription_succeeded","channel":"news","data":"{}"})
    );
    let mut native = node.ws("/ws");
    native.subscribe("news");
    // ringcast's publish to its `news` reaches only its own subscriber.
    assert_eq!(node.publish(r#"{"topic":"news","payload":"native"}"#), 202);
    assert_eq!(native.recv_json()["payload"], "native");
    assert!(pusher.is_silent_for(Duration::from_millis(300)));
    // A Pusher trigger to `news` reaches only the app's subscriber.
    assert_eq!(trigger(&node, "app-secret", "news", "hello"), 200);
    let event = pusher.recv_json();
    assert_eq!(
        event,
        json!({"event":"greeting","channel":"news","data":"hello"})
    );
    assert!(native.is_silent_for(Duration::from_millis(300)));
    assert_eq!(trigger(&node, "other-secret", "news", "forged"), 401);
    // Unsubscribed: nothing more, and no reply (Pusher sends none).
    pusher.send_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"news"}}"#);
    pusher.send_text(r#"{"event":"pusher:ping","data":{}}"#);
    assert_eq!(pusher.recv_json()["event"], "pusher:pong");
}

/// The app of the presence tests: client events on, two members at most.
const PRESENCE_APP: &str = "[[apps]]\nid = \"4711\"\nkey = \"app-key\"\nsecret = \"app-secret\"\nclient_events = true\nmax_presence_members = 2\n";

/// What `presence_test.mjs` must have seen, on one node or two: a user
/// with two connections is one member, announced once and removed once
/// (when the last leaves), never to its own connections; a third user
/// finds the channel full; a client event reaches the others with its
/// sender's user id, never its sender; a trigger skips the socket it names.
fn check_presence(result: &Value) {
    let ann = json!({"count":1,"ids":["ann"],"me":"ann","info":{"name":"ANN"}});
    assert_eq!(result["ann1"]["subscribed"], ann, "{result}");
    let both =
        |me: &str| json!({"count":2,"ids":["ann","bob"],"me":me,"info":{"name":me.to_uppercase()}});
    assert_eq!(result["bob"]["subscribed"], both("bob"), "{result}");
    assert_eq!(result["ann2"]["subscribed"], both("ann"), "{result}");
    assert_eq!(
        result["cy"]["subscribed"],
        json!({"error":"LimitReached","status":4100}),
        "{result}"
    );
    assert_eq!(
        result["channel"],
        json!({"occupied": true, "user_count": 2, "subscription_count": 3}),
        "ann's two connections and bob's: {result}"
    );
    assert_eq!(
        result["users"],
        json!({"users": [{"id": "ann"}, {"id": "bob"}]})
    );
    let seen = |who: &str| result[who]["seen"].clone();
    assert_eq!(
        seen("ann1"),
        json!(["added bob", "said not to bob"]),
        "{result}"
    );
    assert_eq!(
        seen("ann2"),
        json!(["typing ann1 from ann", "said not to bob"]),
        "{result}"
    );
    assert_eq!(
        seen("bob"),
        json!(["typing ann1 from ann", "removed ann", "said end"]),
        "{result}"
    );
    assert_eq!(seen("cy"), json!([]), "{result}");
    assert_eq!(
        result["said_info"],
        json!({"channels": {"presence-room": {"user_count": 2, "subscription_count": 3}}}),
        "the trigger's info: ann's two connections and bob's: {result}"
    );
}

#[test]
fn presence_channels_and_client_events_with_pusher_js() {
    let node = TestServer::start(2, Some(PRESENCE_APP));
    let result = run_script("presence_test.mjs", &[&node]);
    check_presence(&result);
    assert_eq!(
        result["channels"],
        json!({"channels": {"presence-room": {"user_count": 2}}})
    );
    assert_eq!(
        node.metric("presence_refused_total"),
        1,
        "cy's subscription"
    );
}

#[test]
fn presence_members_are_the_clusters_across_two_nodes() {
    let (_redis, a, b) = two_nodes(PRESENCE_APP);
    // bob and ann's second tab are on node b.
    let result = run_script("presence_test.mjs", &[&a, &b]);
    check_presence(&result);
    // The channel list is the cluster's: ann (on both nodes) and bob (on
    // b) are its two users, asked of node a.
    assert_eq!(
        result["channels"],
        json!({"channels": {"presence-room": {"user_count": 2}}})
    );
}

/// The member events a presence channel's subscriber gets: `+user` for
/// each `member_added`, `-user` for each `member_removed`; `expected` many
/// (waiting up to 10 s), then any more that come within `quiet`.
fn member_events(ws: &mut Ws, expected: usize, quiet: Duration) -> Vec<String> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let wait = if events.len() < expected {
            deadline.saturating_duration_since(Instant::now())
        } else {
            quiet
        };
        let Some(text) = cluster::recv_within(ws, wait) else {
            return events;
        };
        let event: Value = serde_json::from_str(&text).unwrap();
        let data: Value = serde_json::from_str(event["data"].as_str().unwrap_or("{}")).unwrap();
        let user = data["user_id"].as_str().unwrap_or_default();
        match event["event"].as_str() {
            Some("pusher_internal:member_added") => events.push(format!("+{user}")),
            Some("pusher_internal:member_removed") => events.push(format!("-{user}")),
            _ => {}
        }
    }
}

/// A presence channel across two nodes hears each member come and go
/// once, as Redis decides it: a user whose two tabs (one per node) close
/// at the same moment is told gone once, never left behind; a node killed
/// with SIGKILL has its users told gone by the other within its
/// presence TTL.
#[test]
fn presence_members_come_and_go_once_across_nodes_and_with_a_dead_node() {
    let config = format!("presence_ttl_s = 3\n{APP}");
    let (_redis, a, b) = two_nodes(&config);
    let (mut observer, _) = presence_member(&a, "presence-room", "obs");
    let quiet = Duration::from_millis(700);
    for round in 0..6 {
        let (tab_on_a, _) = presence_member(&a, "presence-room", "ann");
        let (tab_on_b, ids) = presence_member(&b, "presence-room", "ann");
        assert_eq!(ids, ["ann", "obs"], "round {round}");
        let joined = member_events(&mut observer, 1, quiet);
        assert_eq!(joined, ["+ann"], "round {round}");
        // Both tabs close together: each node's last connection of ann.
        drop((tab_on_a, tab_on_b));
        let left = member_events(&mut observer, 1, quiet);
        assert_eq!(left, ["-ann"], "round {round}");
    }
    let (_bob, _) = presence_member(&b, "presence-room", "bob");
    assert_eq!(member_events(&mut observer, 1, quiet), ["+bob"]);
    signal(&b, libc::SIGKILL);
    // Within its presence TTL (3 s) and a refresh of a's (1 s).
    let started = Instant::now();
    let told = cluster::recv_within(&mut observer, Duration::from_secs(10));
    let told: Value = serde_json::from_str(&told.expect("bob told gone")).unwrap();
    eprintln!("bob told gone {:?} after node b died", started.elapsed());
    assert_eq!(told["event"], "pusher_internal:member_removed", "{told}");
    assert_eq!(told["data"], r#"{"user_id":"bob"}"#);
    let quiet = Duration::from_millis(1500);
    assert_eq!(member_events(&mut observer, 0, quiet), Vec::<String>::new());
    let (_, ids) = presence_member(&a, "presence-room", "cy");
    assert_eq!(ids, ["cy", "obs"], "bob is gone from the members too");
}

/// An app's `max_connections`: the connection past it is told Pusher's
/// 4004 and closed with it (pusher-js does not retry 4000-4099), the app's
/// count is in `/metrics`, and a connection that closes makes room.
#[test]
fn an_apps_connections_are_bounded_per_node() {
    let config = format!("{APP}max_connections = 2\n");
    let node = TestServer::start(2, Some(&config));
    let (first, _) = pusher_ws(&node);
    let (_second, _) = pusher_ws(&node);
    let mut third = node.ws("/app/app-key?protocol=7");
    let refused = third.recv_json();
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(refused["data"]["code"], 4004, "{refused}");
    assert_eq!(third.expect_close(), 4004);
    let count = || {
        let (_, text) = node.http("GET", "/metrics", None);
        text.lines()
            .find_map(|l| l.strip_prefix("ringcast_app_connections{app=\"4711\"} "))
            .map(|v| v.trim().to_string())
    };
    node.wait_for("the refused connection is gone", || {
        count().as_deref() == Some("2")
    });
    drop(first);
    node.wait_for("a closed connection makes room", || {
        count().as_deref() == Some("1")
    });
    let (_fourth, _) = pusher_ws(&node);
    assert!(node.metric("connections_rejected_total") >= 1);
}

/// `pusher:signin` with pusher-js, signed by the server SDK's
/// `authenticateUser`: `sendToUser` reaches only its user, and
/// `terminateUserConnections` closes only that user's connection (with
/// 4009, which pusher-js does not retry).
#[test]
fn signed_in_users_get_their_events_and_can_be_terminated() {
    let node = node();
    let result = run_script("user_test.mjs", &[&node]);
    assert_eq!(
        result["ann"]["user_data"],
        json!({"id":"ann","name":"ANN"}),
        "{result}"
    );
    assert_eq!(result["ann"]["got"], json!([{"to":"ann"}]), "{result}");
    assert_eq!(result["bob"]["got"], json!([{"to":"bob"}]), "{result}");
    assert_eq!(result["terminate"], 200, "{result}");
    assert_ne!(result["ann_state"], "connected", "{result}");
    assert_eq!(result["bob_state"], "connected", "{result}");
    assert!(
        result["ann"]["states"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| *s == "connected")
            .count()
            == 1,
        "terminated, not reconnected: {result}"
    );
}

/// What pusher-js never sends: a forged sign-in is 4009 and a close; a
/// user's channel is refused to a connection not signed in as that user,
/// and kept by one that is (it cannot unsubscribe from its termination).
#[test]
fn forged_signins_and_other_users_channels_are_refused() {
    let node = node();
    let (mut ws, _) = pusher_ws(&node);
    ws.send_text(r##"{"event":"pusher:subscribe","data":{"channel":"#server-to-user-ann"}}"##);
    let refused = ws.recv_json();
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    let (mut ann, socket_id) = pusher_ws(&node);
    let user_data = r#"{"id":"ann"}"#;
    let signature = ringcast::pusher::sign::hmac_hex(
        "app-secret",
        format!("{socket_id}::user::{user_data}").as_bytes(),
    );
    let signin = json!({"event":"pusher:signin","data":{"auth":format!("app-key:{signature}"),"user_data":user_data}});
    ann.send_text(&signin.to_string());
    assert_eq!(ann.recv_json()["event"], "pusher:signin_success");
    assert_eq!(ann.recv_json()["channel"], "#server-to-user-ann");
    ann.send_text(r##"{"event":"pusher:unsubscribe","data":{"channel":"#server-to-user-ann"}}"##);
    // The same signature on another socket is a forgery.
    ws.send_text(&signin.to_string());
    let error = ws.recv_json();
    assert_eq!(error["data"]["code"], 4009, "{error}");
    assert_eq!(ws.expect_close(), 4009);
    let path = "/apps/4711/users/ann/terminate_connections";
    let terminate = signed_post(&node, "app-secret", path, "{}");
    assert_eq!(terminate, 200);
    assert_eq!(ann.recv_json()["data"]["code"], 4009);
    assert_eq!(ann.expect_close(), 4009);
}

/// `POST path` with `body`, signed with `secret` as Pusher's libraries
/// sign; the status.
fn signed_post(node: &TestServer, secret: &str, path: &str, body: &str) -> u16 {
    signed(node, secret, "POST", path, "", body).0
}

/// A channel's counts and the app's channel list are the cluster's: node
/// `a` counts node `b`'s subscribers of a public channel (which Redis keeps
/// no record of) by asking `b`, and lists the channels only `b` holds; a
/// node that does not answer (stopped) leaves the asker its own counts
/// after the timeout, counted as partial.
#[test]
fn channel_counts_and_lists_are_the_clusters() {
    let (_redis, a, b) = two_nodes(APP);
    let _on_a = subscribed(&a, "news");
    let news_on_b = [subscribed(&b, "news"), subscribed(&b, "news")];
    let _cars_on_b = subscribed(&b, "cars");
    let count = |node: &TestServer, channel: &str| {
        let path = format!("/apps/4711/channels/{channel}");
        signed_get(node, &path, "info=subscription_count")
    };
    for node in [&a, &b] {
        let news = json!({"occupied": true, "subscription_count": 3});
        assert_eq!(count(node, "news"), (200, news));
        let cars = json!({"occupied": true, "subscription_count": 1});
        assert_eq!(count(node, "cars"), (200, cars), "held on b only");
        let weather = json!({"occupied": false, "subscription_count": 0});
        assert_eq!(count(node, "weather"), (200, weather));
        let listed = json!({"channels": {"cars": {}, "news": {}}});
        assert_eq!(signed_get(node, "/apps/4711/channels", ""), (200, listed));
    }
    drop(news_on_b);
    let mut counted = Value::Null;
    for _ in 0..100 {
        counted = count(&a, "news").1;
        if counted["subscription_count"] == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted, json!({"occupied": true, "subscription_count": 1}));
    assert_eq!(a.metric("cluster_node_queries_partial_total"), 0);
    // b stops answering: a answers with its own after the timeout.
    signal(&b, libc::SIGSTOP);
    let started = Instant::now();
    let only_a = json!({"channels": {"news": {}}});
    assert_eq!(signed_get(&a, "/apps/4711/channels", ""), (200, only_a));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for b"
    );
    signal(&b, libc::SIGCONT);
    assert_eq!(a.metric("cluster_node_queries_partial_total"), 1);
    assert!(
        a.metric("cluster_node_queries_total") >= 6,
        "4 in the loop, 1 after b left, 1 while b stopped"
    );
}

/// Sends `signal` to the node's process.
fn signal(node: &TestServer, signal: i32) {
    // SAFETY: kill(2) on the test's own child process, which is alive
    // (the TestServer owns it and has not reaped it).
    let sent = unsafe { libc::kill(node.child.id() as i32, signal) };
    assert_eq!(sent, 0, "signal {signal} to the node");
}

/// Pusher-format webhooks to an app's `webhook_url`, checked by the server
/// SDK's `webhook(req).isValid()` as a backend checks them: occupied and
/// member added when the first user subscribes, the client event with its
/// socket and user, a cache channel's miss, then vacated and member
/// removed (after the delay) once it left; ringcast's own topics never
/// reach the app's backend.
#[test]
fn an_apps_webhooks_are_pushers_and_the_server_sdk_validates_them() {
    use std::io::{BufRead, BufReader, Write};
    let dir = format!("{}/tests/pusher", env!("CARGO_MANIFEST_DIR"));
    let mut script = Command::new("node")
        .current_dir(&dir)
        .args(["webhook_test.mjs", "4711", "app-key", "app-secret"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut stdout = BufReader::new(script.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .expect("the receiver's port");
    let config = format!(
        "{APP}client_events = true\nwebhook_events = [\"channel_occupied\", \"channel_vacated\", \"member_added\", \"member_removed\", \"client_event\", \"cache_miss\"]\nwebhook_url = \"http://127.0.0.1:{port}/pusher\"\n"
    );
    let node = TestServer::start(2, Some(&config));
    // A ringcast topic of its own: no webhook for it goes to the app.
    let mut native = node.ws("/ws");
    native.subscribe("news");
    let mut stdin = script.stdin.take().unwrap();
    writeln!(stdin, "127.0.0.1 {}", node.addr.port()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(script.wait().unwrap().success(), "{rest}");
    let result: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(
        result["invalid"], 0,
        "every webhook signed with the app's secret: {result}"
    );
    let socket_id = result["socket_id"].as_str().unwrap();
    assert_eq!(result["cache_miss"], true, "{result}");
    let events = result["events"].as_array().unwrap();
    let mut names: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["name"].as_str().unwrap(),
                e["channel"].as_str().unwrap()
            )
        })
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "cache_miss cache-empty",
            "channel_occupied cache-empty",
            "channel_occupied presence-room",
            "channel_vacated cache-empty",
            "channel_vacated presence-room",
            "client_event presence-room",
            "member_added presence-room",
            "member_removed presence-room",
        ],
        "{result}"
    );
    for event in events {
        match event["name"].as_str().unwrap() {
            "member_added" | "member_removed" => assert_eq!(event["user_id"], "ann"),
            "client_event" => {
                assert_eq!(event["event"], "client-typing");
                assert_eq!(event["data"], r#"{"by":"ann"}"#);
                assert_eq!(event["socket_id"], socket_id);
                assert_eq!(event["user_id"], "ann");
            }
            _ => {}
        }
    }
}

/// Laravel Echo over pusher-js, as a Laravel front end uses it: a private
/// channel's event under Echo's namespace, presence `here`/`joining`/
/// `leaving`, and a whisper (a client event) reaching the other member.
#[test]
fn laravel_echo_listens_joins_and_whispers() {
    let node = TestServer::start(2, Some(PRESENCE_APP));
    let result = run_script("echo_test.mjs", &[&node]);
    assert_eq!(result["ann_here"], json!(["ann"]), "{result}");
    assert_eq!(result["shipped"], json!({"id": 1}), "{result}");
    assert_eq!(result["bob_here"], json!(["ann", "bob"]), "{result}");
    assert_eq!(
        result["ann"],
        json!(["joining bob", "whisper bob", "leaving bob"]),
        "{result}"
    );
}

/// Cache channels: a new subscriber gets the channel's last event (kept
/// 30 minutes, in the core's stream history), or `pusher:cache_miss` when
/// there is none; on one node and, through Redis, across two (the event
/// triggered on one node, the subscriber on the other).
fn check_cache_channel(publisher: &TestServer, subscriber: &TestServer) {
    let subscribe = |node: &TestServer| {
        let (mut ws, _) = pusher_ws(node);
        ws.send_text(r#"{"event":"pusher:subscribe","data":{"channel":"cache-prices"}}"#);
        let succeeded = ws.recv_json();
        assert_eq!(
            succeeded["event"], "pusher_internal:subscription_succeeded",
            "{succeeded}"
        );
        (ws, succeeded)
    };
    let (mut first, _) = subscribe(subscriber);
    assert_eq!(
        first.recv_json(),
        json!({"event":"pusher:cache_miss","channel":"cache-prices","data":{}})
    );
    for price in ["1.10", "1.20"] {
        assert_eq!(trigger(publisher, "app-secret", "cache-prices", price), 200);
        assert_eq!(first.recv_json()["data"], price);
    }
    let (mut late, _) = subscribe(subscriber);
    let cached = late.recv_json();
    assert_eq!(
        cached,
        json!({"event":"greeting","channel":"cache-prices","data":"1.20"}),
        "the last event, not a miss"
    );
    assert!(
        late.is_silent_for(Duration::from_millis(300)),
        "only the last one"
    );
}

#[test]
fn a_cache_channel_gives_new_subscribers_its_last_event() {
    let node = node();
    check_cache_channel(&node, &node);
}

#[test]
fn a_cache_channels_last_event_is_the_clusters() {
    let (_redis, a, b) = two_nodes(APP);
    check_cache_channel(&a, &b);
    // In a cluster the trigger is answered once Redis has the event, so it
    // names that one channel.
    let body = json!({"name":"e","channels":["cache-prices","news"],"data":"x"}).to_string();
    assert_eq!(
        signed_post(&a, "app-secret", "/apps/4711/events", &body),
        400
    );
}
