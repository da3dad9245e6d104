//! The subscribe proxy against a fake backend (`tests/py/backend.py`, which
//! decides by the topic's name): subscriptions to `private:*` are made only
//! when the backend allows them, over WebSocket and SSE; a refusal, a bare
//! error status, an unreadable answer, a timeout and an unreachable backend
//! all refuse (fail closed) with an `error` naming the topic; an
//! unsubscribe while the backend decides cancels the subscription; and a
//! stalled backend holds no more than `max_in_flight` calls per shard and
//! the connection's subscription limit. The publish proxy passes, rewrites
//! or refuses client publications in their order; the connect proxy names
//! the user of a connection without a token (or refuses it before the
//! upgrade), its grant expires with 4001 or is renewed by the refresh
//! proxy (4003 when refused); and unauthenticated upgrades against a slow
//! backend wait within `max_in_flight`.
mod common;

use std::time::{Duration, Instant};

use common::backend::backend;
use common::sse::Sse;
use common::{TestServer, Ws};
use serde_json::{json, Value};

/// A node whose `private:*` subscriptions and `chat:*` client
/// publications go through the proxy at `url` (`/subscribe` and
/// `/publish`), with `more` config after the `[proxy]` keys.
fn node_with(url: &str, more: &str) -> TestServer {
    let publish_url = url.replace("/subscribe", "/publish");
    TestServer::start(
        1,
        Some(&format!(
            "[proxy]\nsubscribe_url = \"{url}\"\npublish_url = \"{publish_url}\"\n{more}\n\
             [[rules]]\npattern = \"private:*\"\nsubscribe_proxy = true\nclient_publish = true\n\
             [[rules]]\npattern = \"chat:*\"\npublish_proxy = true\nclient_publish = true\n\
             [[rules]]\npattern = \"*\"\nclient_publish = true\n"
        )),
    )
}

fn node(backend: &TestServer, more: &str) -> TestServer {
    node_with(&format!("http://{}/subscribe", backend.addr), more)
}

/// The subscribe calls the backend got.
fn calls(backend: &TestServer) -> Vec<Value> {
    let (status, body) = backend.http("GET", "/calls", None);
    assert_eq!(status, 200);
    let view: Value = serde_json::from_str(&body).unwrap();
    view["calls"].as_array().unwrap().clone()
}

fn send(ws: &mut Ws, message: Value) {
    ws.send_text(&message.to_string());
}

fn next(ws: &mut Ws) -> Value {
    serde_json::from_str(&ws.recv_text()).unwrap()
}

/// Subscribes and returns the answer (`subscribed` or `error`).
fn subscribe(ws: &mut Ws, topic: &str) -> Value {
    send(ws, json!({"type":"subscribe","topic":topic}));
    next(ws)
}

#[test]
fn the_backend_decides_who_subscribes_to_proxied_topics() {
    let backend = backend();
    let node = node(&backend, "timeout_ms = 3000");
    let mut ws = node.ws("/ws?user_id=ann");

    let reply = subscribe(&mut ws, "private:ok");
    assert_eq!(reply, json!({"type":"subscribed","topic":"private:ok"}));
    let asked = calls(&backend);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["topic"], "private:ok");
    assert_eq!(asked[0]["transport"], "websocket");
    assert_eq!(asked[0]["user"], "ann");
    assert!(asked[0]["client"].as_str().is_some_and(|c| !c.is_empty()));

    // Allowed means subscribed: a publication reaches it.
    assert_eq!(
        node.publish(r#"{"topic":"private:ok","payload":{"n":1}}"#),
        202
    );
    assert_eq!(next(&mut ws)["payload"], json!({"n":1}));

    for (topic, says) in [
        ("private:deny", "refused by the backend (4403): not for you"),
        ("private:status", "refused by the backend (403)"),
        ("private:bad", "the backend gave no verdict"),
    ] {
        let reply = subscribe(&mut ws, topic);
        assert_eq!(reply["type"], "error", "{topic}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(topic) && message.contains(says),
            "{topic}: {message}"
        );
        // Refused means not subscribed.
        assert_eq!(
            node.publish(&json!({"topic":topic,"payload":1}).to_string()),
            202
        );
    }
    // A topic without the proxy: no call.
    assert_eq!(subscribe(&mut ws, "public")["type"], "subscribed");
    assert_eq!(calls(&backend).len(), 4);
    send(
        &mut ws,
        json!({"type":"message","topic":"public","payload":"after"}),
    );
    assert_eq!(
        next(&mut ws)["payload"],
        "after",
        "nothing of the refused topics arrived before this"
    );
    assert_eq!(node.metric("proxy_allowed_total"), 1);
    assert_eq!(node.metric("proxy_refused_total"), 2);
    assert_eq!(node.metric("proxy_failed_total"), 1);
    assert_eq!(node.metric("proxy_in_flight"), 0);
}

#[test]
fn an_event_stream_subscribes_to_what_the_backend_allows() {
    let backend = backend();
    let node = node(&backend, "");
    let mut sse = Sse::open(
        node.addr,
        "/sse?topic=private:ok&topic=private:deny&topic=open",
        "",
    );
    assert_eq!(sse.status, 200);
    let mut subscribed = Vec::new();
    let mut refused = Vec::new();
    while subscribed.len() + refused.len() < 3 {
        let event = sse.next().expect("the stream goes on");
        match event.event.as_str() {
            "ringcast.subscribed" => subscribed.push(event.json()["topic"].clone()),
            "ringcast.error" => refused.push(event.json()["message"].clone()),
            _ => panic!("unexpected {event:?}"),
        }
    }
    subscribed.sort_by_key(|t| t.to_string());
    assert_eq!(subscribed, [json!("open"), json!("private:ok")]);
    assert!(
        refused[0].as_str().unwrap().contains("private:deny"),
        "{refused:?}"
    );
    let asked = calls(&backend);
    assert!(asked.iter().all(|c| c["transport"] == "sse"), "{asked:?}");
    assert_eq!(
        node.publish(r#"{"topic":"private:ok","payload":"hello"}"#),
        202
    );
    assert_eq!(sse.next_push().json()["payload"], "hello");
}

#[test]
fn no_verdict_in_time_or_no_backend_refuses_the_subscription() {
    let backend = backend();
    let node = node(&backend, "timeout_ms = 300");
    let mut ws = node.ws("/ws");
    let started = Instant::now();
    let reply = subscribe(&mut ws, "private:slow");
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("no answer within 300 ms"),
        "{reply}"
    );
    // The backend would have answered (allowed) after 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed closed in time"
    );
    assert_eq!(node.metric("proxy_failed_total"), 1);

    // A backend nobody listens for.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let orphan = node_with(&format!("http://127.0.0.1:{port}/subscribe"), "");
    let mut ws = orphan.ws("/ws");
    let reply = subscribe(&mut ws, "private:any");
    assert!(
        reply["message"].as_str().unwrap().contains("unreachable"),
        "{reply}"
    );
    assert_eq!(orphan.http("GET", "/health", None).0, 200);
}

#[test]
fn an_unsubscribe_while_the_backend_decides_cancels_the_subscription() {
    let backend = backend();
    let node = node(&backend, "");
    let mut ws = node.ws("/ws");
    send(&mut ws, json!({"type":"subscribe","topic":"private:slow"}));
    send(
        &mut ws,
        json!({"type":"unsubscribe","topic":"private:slow"}),
    );
    assert_eq!(
        next(&mut ws),
        json!({"type":"unsubscribed","topic":"private:slow"})
    );
    node.wait_for("the backend's verdict", || {
        node.metric("proxy_allowed_total") == 1
    });
    assert_eq!(
        node.publish(r#"{"topic":"private:slow","payload":"missed"}"#),
        202
    );
    assert_eq!(subscribe(&mut ws, "after")["type"], "subscribed");
    send(
        &mut ws,
        json!({"type":"message","topic":"after","payload":"mark"}),
    );
    assert_eq!(
        next(&mut ws)["payload"],
        "mark",
        "no subscribed and no push for the cancelled topic"
    );
}

#[test]
fn a_stalled_backend_holds_at_most_max_in_flight_calls_and_the_subscription_limit() {
    let backend = backend();
    let node = node(
        &backend,
        "timeout_ms = 5000\nmax_in_flight = 4\n[limits]\nmax_subscriptions_per_connection = 3",
    );
    // One connection: the limit counts subscriptions still waiting.
    let mut one = node.ws("/ws");
    for i in 0..3 {
        send(
            &mut one,
            json!({"type":"subscribe","topic":format!("private:slow-{i}")}),
        );
    }
    let reply = subscribe(&mut one, "private:slow-3");
    assert_eq!(reply["type"], "error");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("subscription limit"),
        "{reply}"
    );
    // Others: the shard has one call of room left, then refuses at once.
    let mut two = node.ws("/ws");
    send(
        &mut two,
        json!({"type":"subscribe","topic":"private:slow-a"}),
    );
    let started = Instant::now();
    let reply = subscribe(&mut two, "private:slow-b");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused, not queued"
    );
    assert!(
        reply["message"].as_str().unwrap().contains("server busy"),
        "{reply}"
    );
    assert_eq!(node.metric("proxy_busy_total"), 1);
    assert_eq!(node.metric("proxy_in_flight"), 4);
    // Every waiting subscription is answered.
    let mut answered = Vec::new();
    for _ in 0..3 {
        answered.push(next(&mut one)["topic"].as_str().unwrap().to_string());
    }
    answered.sort();
    assert_eq!(
        answered,
        ["private:slow-0", "private:slow-1", "private:slow-2"]
    );
    assert_eq!(next(&mut two)["topic"], "private:slow-a");
    assert_eq!(node.metric("proxy_in_flight"), 0);
}

#[test]
fn the_backend_passes_rewrites_or_refuses_client_publications() {
    let backend = backend();
    let node = node(&backend, "");
    let mut reader = node.ws("/ws");
    assert_eq!(subscribe(&mut reader, "chat:room")["type"], "subscribed");
    assert_eq!(subscribe(&mut reader, "chat:deny")["type"], "subscribed");
    // Clients publish to topics they are subscribed to (the rule's own
    // check runs first), so the writer reads its own publications too.
    let mut writer = node.ws("/ws?user_id=bob");
    assert_eq!(subscribe(&mut writer, "chat:room")["type"], "subscribed");
    assert_eq!(subscribe(&mut writer, "chat:deny")["type"], "subscribed");
    let say = |ws: &mut Ws, topic: &str, text: &str| {
        send(
            ws,
            json!({"type":"message","topic":topic,"event":"said","payload":{"text":text}}),
        );
    };
    say(&mut writer, "chat:room", "hello");
    let push = next(&mut reader);
    assert_eq!(push["payload"], json!({"text":"hello"}), "{push}");
    assert_eq!(push["event"], "said");
    assert_eq!(next(&mut writer), push);
    say(&mut writer, "chat:room", "a badword here");
    assert_eq!(
        next(&mut reader)["payload"],
        json!({"text":"***"}),
        "rewritten"
    );
    assert_eq!(next(&mut writer)["payload"], json!({"text":"***"}));
    say(&mut writer, "chat:deny", "nope");
    let reply = next(&mut writer);
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("publication to `chat:deny` refused by the backend (4403): not allowed here"),
        "{reply}"
    );
    say(&mut writer, "chat:room", "after");
    assert_eq!(
        next(&mut reader)["payload"],
        json!({"text":"after"}),
        "nothing of the refused publication arrived"
    );
    let asked = calls(&backend);
    assert_eq!(asked.len(), 4, "{asked:?}");
    assert_eq!(asked[0]["user"], "bob");
    assert_eq!(asked[0]["event"], "said");
    assert_eq!(asked[0]["payload"], json!({"text":"hello"}));
    // Publishes over HTTP are the application's own: never proxied.
    assert_eq!(
        node.publish(r#"{"topic":"chat:room","payload":{"text":"badword from the server"}}"#),
        202
    );
    assert_eq!(
        next(&mut reader)["payload"],
        json!({"text":"badword from the server"})
    );
    assert_eq!(calls(&backend).len(), 4);
}

#[test]
fn a_clients_publications_keep_their_order_while_the_backend_decides() {
    let backend = backend();
    let node = node(&backend, "");
    let mut reader = node.ws("/ws");
    assert_eq!(subscribe(&mut reader, "chat:slow")["type"], "subscribed");
    let mut writer = node.ws("/ws");
    assert_eq!(subscribe(&mut writer, "chat:slow")["type"], "subscribed");
    for n in 0..5 {
        send(
            &mut writer,
            json!({"type":"message","topic":"chat:slow","payload":n}),
        );
    }
    // Input after the publications waits behind them.
    send(&mut writer, json!({"type":"subscribe","topic":"later"}));
    let started = Instant::now();
    let got: Vec<Value> = (0..5)
        .map(|_| next(&mut reader)["payload"].clone())
        .collect();
    assert_eq!(got, [json!(0), json!(1), json!(2), json!(3), json!(4)]);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "one at a time, 300 ms each: {:?}",
        started.elapsed()
    );
    for n in 0..5 {
        assert_eq!(next(&mut writer)["payload"], n, "its own, in order");
    }
    assert_eq!(
        next(&mut writer),
        json!({"type":"subscribed","topic":"later"})
    );
}

#[test]
fn a_client_flooding_publications_against_a_stalled_backend_is_closed_at_the_parked_input_bound() {
    let backend = backend();
    let node = node(&backend, "timeout_ms = 8000");
    let mut flooder = node.ws("/ws");
    assert_eq!(subscribe(&mut flooder, "chat:stall")["type"], "subscribed");
    let filler = "x".repeat(50_000);
    // The first waits for the backend; the rest pile up behind it, past
    // the parked input bound (one largest request, about 1 MiB).
    let mut closed = false;
    for _ in 0..40 {
        let message = json!({"type":"message","topic":"chat:stall","payload":filler});
        if flooder
            .0
            .send(tungstenite::Message::text(message.to_string()))
            .is_err()
        {
            closed = true;
            break;
        }
    }
    node.wait_for("the flooder to be closed", || {
        node.shard_metric("parked_input_overflows_total", 0) == 1
    });
    if !closed {
        let read = flooder.0.read();
        assert!(
            !matches!(read, Ok(tungstenite::Message::Text(_))),
            "the flooder got a message: {read:?}"
        );
    }
    assert_eq!(node.metric("proxy_in_flight"), 1, "one call for the flood");
    assert_eq!(node.http("GET", "/health", None).0, 200);
}

/// A node whose `/ws`, `/sse` and `/stream` connections without a valid
/// token are identified by the backend's `/connect`.
fn connect_node(backend: &TestServer, more: &str) -> TestServer {
    TestServer::start(
        2,
        Some(&format!(
            "[proxy]\nconnect_url = \"http://{}/connect\"\n{more}\n",
            backend.addr
        )),
    )
}

#[test]
fn the_backend_names_the_user_of_a_connection_without_a_token() {
    let backend = backend();
    let node = connect_node(&backend, "");
    let stream = std::net::TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = tungstenite::http::Request::builder()
        .uri(node.ws_url("/ws?as=ann"))
        .header("Host", node.addr.to_string())
        .header("Cookie", "session=abc")
        .header("X-Secret", "not forwarded")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .unwrap();
    let (socket, _) =
        tungstenite::client::client(request, tungstenite::stream::MaybeTlsStream::Plain(stream))
            .expect("the backend allowed it");
    let mut ws = Ws(socket);
    // The grant's starting topic.
    assert_eq!(next(&mut ws), json!({"type":"subscribed","topic":"news"}));
    let asked = calls(&backend);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["transport"], "websocket");
    assert_eq!(asked[0]["query"], "as=ann");
    assert_eq!(asked[0]["headers"]["cookie"], "session=abc");
    assert!(asked[0]["headers"].get("x-secret").is_none(), "{asked:?}");
    assert!(asked[0]["user"].is_null());
    // The connection is ann's: a publish to her reaches it.
    assert_eq!(
        node.publish(r#"{"topic":"news","user_id":"ann","payload":"for ann"}"#),
        202
    );
    assert_eq!(next(&mut ws)["payload"], "for ann");

    // An event stream too.
    let mut sse = Sse::open(node.addr, "/sse?topic=news&as=bob", "");
    assert_eq!(sse.status, 200);
    sse.expect("ringcast.subscribed");
    assert_eq!(calls(&backend)[1]["transport"], "sse");
    assert_eq!(
        node.publish(r#"{"topic":"news","user_id":"bob","payload":"for bob"}"#),
        202
    );
    assert_eq!(sse.next_push().json()["payload"], "for bob");
}

#[test]
fn the_backend_s_meta_for_a_connection_shows_in_its_presence() {
    let backend = backend();
    let node = connect_node(&backend, "");
    // `{"name":"Ann"}`, URL-encoded.
    let mut ws = node.ws("/ws?as=ann&meta=%7B%22name%22%3A%22Ann%22%7D");
    assert_eq!(next(&mut ws), json!({"type":"subscribed","topic":"news"}));
    let (status, body) = node.http("GET", "/topics/news/presence", None);
    assert_eq!(status, 200, "{body}");
    let presence: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        presence["members"][0]["meta"],
        json!({"user_id":"ann","info":{"name":"Ann"}}),
        "{presence}"
    );
    // A meta that is no object, or past max_presence_meta_bytes (1 KiB):
    // the backend's mistake, refused before any upgrade.
    assert_eq!(node.upgrade_status("/ws?as=bob&meta=%5B1%5D", ""), 502);
    let big = format!("%7B%22a%22%3A%22{}%22%7D", "x".repeat(1000));
    assert_eq!(
        node.upgrade_status(&format!("/ws?as=bob&meta={big}"), ""),
        502
    );
}

#[test]
fn a_refused_or_unanswered_connection_gets_the_status_before_any_upgrade() {
    let backend = backend();
    let node = connect_node(&backend, "timeout_ms = 300");
    assert_eq!(node.upgrade_status("/ws?deny=1", ""), 403);
    assert_eq!(node.upgrade_status("/ws?status=401", ""), 401);
    assert_eq!(
        node.upgrade_status("/ws?slow=1", ""),
        503,
        "no verdict in time"
    );
    let (status, body) = node.http("GET", "/sse?topic=news&deny=1", None);
    assert_eq!(status, 403);
    assert!(
        body.contains("connection refused by the backend (4403): who are you"),
        "{body}"
    );
    assert_eq!(node.upgrade_status("/ws", ""), 101, "allowed, anonymous");
    assert_eq!(node.metric("proxy_refused_total"), 3);
    assert_eq!(node.metric("proxy_failed_total"), 1);
}

#[test]
fn a_valid_token_skips_the_backend_and_a_grant_expires_with_4001() {
    let backend = backend();
    let secret = "connect-proxy-test-secret";
    let node = connect_node(&backend, &format!("[auth]\njwt_secret = \"{secret}\""));
    let token = common::jwt(secret, "carol", 3600);
    let mut with_token = node.ws(&format!("/ws?token={token}"));
    assert_eq!(subscribe(&mut with_token, "x")["type"], "subscribed");
    assert!(calls(&backend).is_empty(), "a valid token needs no backend");

    let mut granted = node.ws("/ws?as=dan&expire=1");
    assert_eq!(next(&mut granted)["topic"], "news");
    assert_eq!(calls(&backend).len(), 1);
    let started = Instant::now();
    loop {
        match granted.0.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                assert_eq!(frame.reason, "connection expired");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        subscribe(&mut with_token, "y")["type"],
        "subscribed",
        "others go on"
    );
}

#[test]
fn the_backend_renews_a_grant_before_it_expires_or_ends_it_with_4003() {
    let backend = backend();
    let node = connect_node(
        &backend,
        &format!("refresh_url = \"http://{}/refresh\"", backend.addr),
    );
    let mut kept = node.ws("/ws?as=keeper&expire=1");
    assert_eq!(next(&mut kept)["topic"], "news");
    let mut stopped = node.ws("/ws?as=stopper&expire=1");
    assert_eq!(next(&mut stopped)["topic"], "news");
    let started = Instant::now();
    match stopped.0.read() {
        Ok(tungstenite::Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 4003);
            assert_eq!(frame.reason, "connection refused on refresh");
        }
        other => panic!("expected a close frame: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Renewed for 2 s at a time: alive well past its first expire_at.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(subscribe(&mut kept, "still")["type"], "subscribed");
    let refreshes = calls(&backend)
        .iter()
        .filter(|c| c["user"] == "keeper" && c.get("headers").is_none())
        .count();
    assert!(refreshes >= 2, "{refreshes} refreshes");
}

#[test]
fn unauthenticated_upgrades_against_a_slow_backend_wait_within_max_in_flight() {
    use std::io::{Read, Write};
    let backend = backend();
    let node = TestServer::start(
        1,
        Some(&format!(
            "[proxy]\nconnect_url = \"http://{}/connect\"\nmax_in_flight = 2\n",
            backend.addr
        )),
    );
    let upgrade = |query: &str| {
        let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        stream
    };
    let status = |stream: &mut std::net::TcpStream| {
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12])
            .parse::<u16>()
            .unwrap()
    };
    let mut waiting: Vec<_> = (0..2).map(|_| upgrade("slow=1")).collect();
    node.wait_for("two calls in flight", || {
        node.metric("proxy_in_flight") == 2
    });
    let mut third = upgrade("slow=1");
    assert_eq!(status(&mut third), 503, "refused at once, not parked");
    assert_eq!(node.metric("proxy_busy_total"), 1);
    for stream in &mut waiting {
        assert_eq!(status(stream), 101, "the parked ones are answered");
    }
}
