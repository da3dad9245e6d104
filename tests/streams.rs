//! Topic streams: one order per topic whoever publishes on whichever shard,
//! offsets and epochs, recovery after a reconnect, last values on
//! subscribe, TTL expiry and the history endpoint.
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::{TestServer, Ws};
use serde_json::{json, Value};

/// `feed:*` topics are streams (history 100, TTL 60 s); `ticker:*` replays
/// the latest 3 to new subscribers; `short:*` forgets after a second; `small:*` keeps 5.
const CONFIG: &str = r#"
[[rules]]
pattern = "feed:*"
client_publish = true
history_size = 100
history_ttl_s = 60

[[rules]]
pattern = "ticker:*"
history_size = 10
history_ttl_s = 60
replay_on_subscribe = 3

[[rules]]
pattern = "short:*"
history_size = 10
history_ttl_s = 1

[[rules]]
pattern = "small:*"
history_size = 5
history_ttl_s = 60

[[rules]]
pattern = "storm:*"
history_size = 1000
history_ttl_s = 60

[[rules]]
pattern = "plain:*"
client_publish = true
"#;

fn server(shards: usize) -> TestServer {
    TestServer::start(shards, Some(CONFIG))
}

/// Subscribes (optionally from a position) and returns the `subscribed` reply.
fn open(ws: &mut Ws, topic: &str, since: Option<(u64, &str)>) -> Value {
    let mut request = json!({"type":"subscribe","topic":topic});
    if let Some((offset, epoch)) = since {
        request["since"] = json!({"offset":offset,"epoch":epoch});
    }
    ws.send_text(&request.to_string());
    let reply = ws.recv_json();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["topic"], topic);
    reply
}

fn publish(server: &TestServer, topic: &str, n: u64) -> Value {
    let body = json!({"topic":topic,"event":"e","payload":{"n":n}}).to_string();
    let (status, reply) = server.http("POST", "/publish", Some(&body));
    assert_eq!(status, 202, "{reply}");
    serde_json::from_str(&reply).unwrap()
}

/// The next `count` pushes: (offset, payload n).
fn pushes(ws: &mut Ws, count: usize) -> Vec<(u64, u64)> {
    (0..count)
        .map(|_| {
            let push = ws.recv_json();
            assert_eq!(push["type"], "push", "{push}");
            (
                push["offset"].as_u64().unwrap(),
                push["payload"]["n"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn publishes_get_consecutive_offsets_and_subscribed_tells_the_position() {
    let server = server(2);
    let mut ws = server.ws("/ws");
    let first = open(&mut ws, "feed:a", None);
    assert_eq!(first["offset"], 0);
    let epoch = first["epoch"].as_str().unwrap().to_string();
    assert_eq!(epoch.len(), 16);
    for n in 1..=3 {
        let reply = publish(&server, "feed:a", n);
        assert_eq!(reply["offset"], n);
        assert_eq!(reply["epoch"], epoch.as_str());
    }
    assert_eq!(pushes(&mut ws, 3), [(1, 1), (2, 2), (3, 3)]);
    let mut late = server.ws("/ws");
    let reply = open(&mut late, "feed:a", None);
    assert_eq!(
        (reply["offset"].as_u64(), reply["epoch"].as_str()),
        (Some(3), Some(epoch.as_str()))
    );
    // Plain topics stay as they were: no offset, no position.
    let mut plain = server.ws("/ws");
    plain.subscribe("plain:x");
    assert_eq!(server.publish(r#"{"topic":"plain:x","message":"m"}"#), 202);
    let push = plain.recv_json();
    assert!(push.get("offset").is_none(), "{push}");
}

#[test]
fn every_subscriber_sees_one_order_whoever_publishes_on_whichever_shard() {
    let server = server(2);
    let mut subscribers: Vec<Ws> = (0..8).map(|_| server.ws("/ws")).collect();
    for ws in &mut subscribers {
        open(ws, "feed:order", None);
    }
    // Ten publishers, five over HTTP and five as clients, on both shards;
    // the clients hold the topic (the rule lets holders publish) before anyone starts.
    const EACH: u64 = 40;
    let mut client_publishers: Vec<Ws> = (0..5).map(|_| server.ws("/ws")).collect();
    for ws in &mut client_publishers {
        open(ws, "feed:order", None);
    }
    std::thread::scope(|scope| {
        for p in 0..5u64 {
            let server = &server;
            scope.spawn(move || {
                for i in 0..EACH {
                    publish(server, "feed:order", p * 1000 + i);
                }
            });
        }
        for (p, mut ws) in (5..10u64).zip(client_publishers) {
            scope.spawn(move || {
                for i in 0..EACH {
                    let message =
                        json!({"type":"message","topic":"feed:order","payload":{"n":p * 1000 + i}});
                    ws.send_text(&message.to_string());
                }
                // Read its own copies too, so it stays subscribed until all are out.
                let _ = pushes(&mut ws, (10 * EACH) as usize);
            });
        }
    });
    let total = (10 * EACH) as usize;
    let sequences: Vec<Vec<(u64, u64)>> =
        subscribers.iter_mut().map(|ws| pushes(ws, total)).collect();
    let offsets: Vec<u64> = sequences[0].iter().map(|&(o, _)| o).collect();
    assert_eq!(
        offsets,
        (1..=total as u64).collect::<Vec<_>>(),
        "consecutive offsets"
    );
    for (i, seq) in sequences.iter().enumerate() {
        assert_eq!(seq, &sequences[0], "subscriber {i} saw another order");
    }
    // Each publisher's own messages keep their order.
    for p in 0..10u64 {
        let mine: Vec<u64> = sequences[0]
            .iter()
            .map(|&(_, n)| n)
            .filter(|n| n / 1000 == p)
            .collect();
        assert_eq!(mine, (0..EACH).map(|i| p * 1000 + i).collect::<Vec<_>>());
    }
}

#[test]
fn a_reconnecting_subscriber_recovers_what_it_missed_then_goes_live() {
    let server = server(2);
    let mut ws = server.ws("/ws");
    let reply = open(&mut ws, "feed:r", None);
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    for n in 1..=5 {
        publish(&server, "feed:r", n);
    }
    assert_eq!(pushes(&mut ws, 2), [(1, 1), (2, 2)]);
    drop(ws); // abruptly: the client saw offsets 1 and 2
    for n in 6..=9 {
        publish(&server, "feed:r", n);
    }
    let mut again = server.ws("/ws");
    let reply = open(&mut again, "feed:r", Some((2, &epoch)));
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["offset"], 9);
    let recovered = pushes(&mut again, 7);
    assert_eq!(recovered, (3..=9).map(|n| (n, n)).collect::<Vec<_>>());
    publish(&server, "feed:r", 10);
    assert_eq!(pushes(&mut again, 1), [(10, 10)]);
    assert!(server.metric("stream_recoveries_total") >= 1);
}

#[test]
fn a_stale_epoch_or_an_evicted_offset_is_not_recovered() {
    let server = server(2);
    for n in 1..=8 {
        publish(&server, "small:s", n);
    }
    let mut ws = server.ws("/ws");
    let reply = open(&mut ws, "small:s", Some((1, "0000000000000000")));
    assert_eq!(reply["recovered"], false, "another epoch: {reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    let mut ws = server.ws("/ws");
    let reply = open(&mut ws, "small:s", Some((1, &epoch)));
    assert_eq!(
        reply["recovered"], false,
        "offsets 2 and 3 were evicted: {reply}"
    );
    let mut ws = server.ws("/ws");
    let reply = open(&mut ws, "small:s", Some((3, &epoch)));
    assert_eq!(reply["recovered"], true, "from 3, 4..8 are kept: {reply}");
    assert_eq!(
        pushes(&mut ws, 5),
        (4..=8).map(|n| (n, n)).collect::<Vec<_>>()
    );
    assert!(server.metric("stream_recovery_failures_total") >= 2);
}

#[test]
fn recovery_races_live_publishes_without_a_gap_or_a_duplicate() {
    let server = server(2);
    let mut first = server.ws("/ws");
    let epoch = open(&mut first, "feed:race", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    const TOTAL: u64 = 300;
    std::thread::scope(|scope| {
        let server = &server;
        scope.spawn(move || {
            for n in 1..=TOTAL {
                publish(server, "feed:race", n);
            }
        });
        // Reconnect repeatedly from the last offset seen while publishes go on.
        let mut seen: Vec<u64> = Vec::new();
        let mut ws = first;
        while seen.len() < TOTAL as usize {
            let want = (1 + seen.len() % 7).min(TOTAL as usize - seen.len());
            let batch = pushes(&mut ws, want);
            seen.extend(batch.iter().map(|&(o, _)| o));
            if seen.len() >= TOTAL as usize {
                break;
            }
            drop(ws);
            ws = server.ws("/ws");
            let last = *seen.last().unwrap();
            let reply = open(&mut ws, "feed:race", Some((last, &epoch)));
            assert_eq!(reply["recovered"], true, "{reply}");
        }
        seen.truncate(TOTAL as usize);
        assert_eq!(
            seen,
            (1..=TOTAL).collect::<Vec<_>>(),
            "every offset once, in order"
        );
    });
}

#[test]
fn new_subscribers_get_the_last_values_marked_as_replay() {
    let server = server(2);
    for n in 1..=5 {
        publish(&server, "ticker:x", n);
    }
    let mut ws = server.ws("/ws");
    let reply = open(&mut ws, "ticker:x", None);
    assert_eq!(reply["offset"], 5);
    let replayed: Vec<(u64, bool)> = (0..3)
        .map(|_| {
            let push = ws.recv_json();
            (push["offset"].as_u64().unwrap(), push["replay"] == true)
        })
        .collect();
    assert_eq!(replayed, [(3, true), (4, true), (5, true)]);
    publish(&server, "ticker:x", 6);
    let live = ws.recv_json();
    assert_eq!(live["offset"], 6);
    assert!(
        live.get("replay").is_none(),
        "live pushes are not marked: {live}"
    );
}

#[test]
fn a_stream_idle_past_its_ttl_starts_afresh_with_a_new_epoch() {
    let server = server(1);
    let first = publish(&server, "short:t", 1);
    std::thread::sleep(Duration::from_millis(2500));
    let mut ws = server.ws("/ws");
    let epoch = first["epoch"].as_str().unwrap();
    let reply = open(&mut ws, "short:t", Some((1, epoch)));
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], first["epoch"]);
    assert_eq!(reply["offset"], 0);
    assert_eq!(publish(&server, "short:t", 2)["offset"], 1);
}

#[test]
fn the_history_endpoint_lists_publications_and_refuses_gone_positions() {
    let server = TestServer::start(2, Some(&format!("{CONFIG}\n[auth]\napi_key = \"k\"\n")));
    let publish = |n: u64| {
        let body = json!({"topic":"small:h","payload":{"n":n}}).to_string();
        let (status, reply) = server.http_with_key("POST", "/publish", Some(&body), "k");
        assert_eq!(status, 202, "{reply}");
        serde_json::from_str::<Value>(&reply).unwrap()
    };
    for n in 1..=7 {
        publish(n);
    }
    let epoch = publish(8)["epoch"].as_str().unwrap().to_string();
    let get = |query: &str| {
        let (status, body) =
            server.http_with_key("GET", &format!("/topics/small:h/history{query}"), None, "k");
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let (status, all) = get("");
    assert_eq!(status, 200);
    assert_eq!(
        (all["offset"].as_u64(), all["epoch"].as_str()),
        (Some(8), Some(epoch.as_str()))
    );
    let offsets: Vec<u64> = all["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 5, 6, 7, 8], "the last five are kept");
    let (status, page) = get(&format!("?since=5&epoch={epoch}&limit=2"));
    assert_eq!(status, 200);
    assert_eq!(page["publications"][0]["payload"]["n"], 6);
    assert_eq!(page["publications"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&format!("?since=1&epoch={epoch}")).0,
        410,
        "offset 1 was evicted"
    );
    assert_eq!(get("?since=5&epoch=stale").0, 410);
    assert_eq!(get("?since=x").0, 400);
    assert_eq!(
        server.http("GET", "/topics/small:h/history", None).0,
        401,
        "behind the API key"
    );
    let (status, body) = server.http_with_key("GET", "/topics/plain:p/history", None, "k");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn the_topics_form_carries_positions_per_topic() {
    let server = server(2);
    let epochs: HashMap<&str, String> = ["feed:1", "feed:2"]
        .into_iter()
        .map(|t| {
            (
                t,
                publish(&server, t, 1)["epoch"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    publish(&server, "feed:2", 2);
    let mut ws = server.ws("/ws");
    let request = json!({"topics":["feed:1", {"topic":"feed:2","since":{"offset":1,"epoch":epochs["feed:2"]}}]});
    ws.send_text(&request.to_string());
    let mut replies = Vec::new();
    while replies.len() < 3 {
        replies.push(ws.recv_json());
    }
    let subscribed_1 = replies
        .iter()
        .find(|r| r["type"] == "subscribed" && r["topic"] == "feed:1")
        .unwrap();
    assert!(subscribed_1.get("recovered").is_none());
    let subscribed_2 = replies
        .iter()
        .find(|r| r["type"] == "subscribed" && r["topic"] == "feed:2")
        .unwrap();
    assert_eq!(subscribed_2["recovered"], true);
    let replay = replies.iter().find(|r| r["type"] == "push").unwrap();
    assert_eq!(
        (replay["topic"].as_str(), replay["offset"].as_u64()),
        (Some("feed:2"), Some(2))
    );
}

#[test]
fn a_reconnect_storm_of_python_clients_ends_with_every_publication_once_in_order() {
    let server = server(2);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/stream_storm.py");
    let output = Command::new("python3")
        .args([script, &server.addr.to_string(), "1000", "10"])
        .output()
        .expect("python3 runs (CI installs it with the websockets package)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "storm failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("storm ok"), "{stdout}");
    println!("{stdout}");
    assert!(server.metric("stream_recoveries_total") >= 1000);
}

/// A publish retried with its `idempotency_key` is answered with the first
/// one's position and stored once, whichever shard takes the retry; a key
/// on a topic without history is refused (nothing could tell a retry apart).
#[test]
fn a_publish_retried_with_its_idempotency_key_is_stored_once() {
    let server = server(2);
    let publish = |body: Value| {
        let (status, reply) = server.http("POST", "/publish", Some(&body.to_string()));
        (status, serde_json::from_str::<Value>(&reply).unwrap())
    };
    let keyed = json!({"topic":"feed:idem","payload":{"n":1},"idempotency_key":"order-17"});
    let (status, first) = publish(keyed.clone());
    assert_eq!(status, 202, "{first}");
    // Retries land on either shard (a fresh connection each).
    for _ in 0..6 {
        let (status, again) = publish(keyed.clone());
        assert_eq!(status, 202, "{again}");
        assert_eq!(again["offset"], first["offset"], "{again}");
        assert_eq!(again["epoch"], first["epoch"], "{again}");
    }
    let (_, other) =
        publish(json!({"topic":"feed:idem","payload":{"n":2},"idempotency_key":"order-18"}));
    assert_eq!(
        other["offset"].as_u64(),
        first["offset"].as_u64().map(|o| o + 1)
    );
    assert_eq!(
        stored_payloads(&server, "feed:idem"),
        [json!({"n":1}), json!({"n":2})]
    );
    assert!(server.metric("idempotent_retries_total") >= 6);

    let (status, refused) = publish(json!({"topic":"plain:x","idempotency_key":"k"}));
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("stream topic"),
        "{refused}"
    );
}

/// The same key over the WebSocket: a client's retried publish is stored once.
#[test]
fn a_client_publish_retried_with_its_idempotency_key_is_stored_once() {
    let server = server(2);
    let mut ws = server.ws("/ws");
    open(&mut ws, "feed:ws-idem", None);
    let message =
        r#"{"type":"publish","topic":"feed:ws-idem","payload":"once","idempotency_key":"m-1"}"#;
    for _ in 0..3 {
        ws.send_text(message);
    }
    ws.send_text(r#"{"type":"publish","topic":"feed:ws-idem","payload":"next"}"#);
    server.wait_for("both publications stored", || {
        let (_, body) = server.http("GET", "/topics/feed:ws-idem/history", None);
        let history: Value = serde_json::from_str(&body).unwrap();
        history["offset"] == 2
    });
    assert_eq!(
        stored_payloads(&server, "feed:ws-idem"),
        [json!("once"), json!("next")]
    );
}

/// The payloads `topic`'s history holds, oldest first.
fn stored_payloads(server: &TestServer, topic: &str) -> Vec<Value> {
    let (status, body) = server.http("GET", &format!("/topics/{topic}/history"), None);
    assert_eq!(status, 200, "{body}");
    let history: Value = serde_json::from_str(&body).unwrap();
    history["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("no publications in {body}"))
        .iter()
        .map(|p| p["payload"].clone())
        .collect()
}
