//! Event streams over plain HTTP: `GET /sse` (Server-Sent Events, read as
//! a browser's `EventSource` reads them) and `GET /stream` (NDJSON): many
//! topics on one connection, resume from `Last-Event-ID` with nothing
//! lost or repeated, a gone position said in-band, refusals before the
//! stream, heartbeats, slow consumers, shutdown, and the same auth as `/ws`.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::sse::Sse;
use common::{TestServer, IO_TIMEOUT};
use serde_json::{json, Value};

/// `s:*` are streams (history 100); everything else is plain.
const CONFIG: &str = r#"
stream_heartbeat_ms = 300
stream_retry_ms = 1500

[[rules]]
pattern = "s:*"
client_publish = true
history_size = 100
history_ttl_s = 60

[[rules]]
pattern = "*"
client_publish = true
"#;

fn publish(server: &TestServer, topic: &str, event: &str, payload: Value) {
    let body = json!({"topic": topic, "event": event, "payload": payload}).to_string();
    let status = server.publish(&body);
    assert!(status == 200 || status == 202, "publish answered {status}");
}

/// Opens `/sse` and reads until every topic is subscribed.
fn subscribed(server: &TestServer, query: &str, extra: &str, topics: usize) -> Sse {
    let mut sse = Sse::open(server.addr, &format!("/sse?{query}"), extra);
    assert_eq!(sse.status, 200, "{}", sse.body);
    for _ in 0..topics {
        sse.expect("ringcast.subscribed");
    }
    sse
}

#[test]
fn one_sse_connection_gets_every_topic_as_named_events_with_the_websocket_json() {
    let server = TestServer::start(2, Some(CONFIG));
    let mut sse = Sse::open(server.addr, "/sse?topic=news&topic=sport", "");
    assert_eq!(sse.status, 200);
    assert!(sse
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache, no-store"));
    let first = sse.next().unwrap();
    assert_eq!(sse.retry, Some(1500), "retry: comes first");
    let second = sse.next().unwrap();
    let mut topics = [first.json(), second.json()].map(|v| {
        assert_eq!(v["type"], "subscribed");
        v["topic"].as_str().unwrap().to_string()
    });
    topics.sort();
    assert_eq!(topics, ["news", "sport"]);
    assert_eq!(first.event, "ringcast.subscribed");

    // Published over HTTP, accepted on either shard.
    for i in 0..10 {
        publish(&server, "news", "created", json!({"i": i, "text": "a\nb"}));
        publish(&server, "sport", "message", json!(i));
    }
    let (mut news, mut sport) = (Vec::new(), Vec::new());
    while news.len() + sport.len() < 20 {
        let event = sse.next_push();
        let value = event.json();
        assert_eq!(value["type"], "push");
        assert_eq!(value["event"], event.event.as_str());
        match value["topic"].as_str().unwrap() {
            "news" => news.push(value["payload"]["i"].as_i64().unwrap()),
            "sport" => sport.push(value["payload"].as_i64().unwrap()),
            other => panic!("push of {other}"),
        }
        assert_eq!(event.id, None, "plain topics carry no position");
    }
    assert_eq!(news, (0..10).collect::<Vec<_>>());
    assert_eq!(sport, (0..10).collect::<Vec<_>>());
    assert_eq!(server.metric("event_streams"), 1);
    sse.shutdown();
    server.wait_for("the stream to close", || {
        server.metric("event_streams") == 0
    });
}

#[test]
fn an_event_source_that_reconnects_with_last_event_id_gets_every_missed_publication_once() {
    let server = TestServer::start(2, Some(CONFIG));
    let mut sse = subscribed(&server, "topic=s:a&topic=plain&topic=s:b", "", 3);
    let start = sse.last_id.clone().expect("subscribed carries the cursor");
    assert_eq!(start.split(',').count(), 3, "{start}");
    for i in 1..=6 {
        publish(&server, "s:a", "tick", json!(i));
        publish(&server, "s:b", "tock", json!(-i));
    }
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    while seen_a.len() + seen_b.len() < 6 {
        let event = sse.next_push();
        let value = event.json();
        match event.event.as_str() {
            "tick" => seen_a.push(value["payload"].as_i64().unwrap()),
            "tock" => seen_b.push(-value["payload"].as_i64().unwrap()),
            other => panic!("{other}"),
        }
        assert!(event.id.is_some(), "a stream push moves the cursor");
    }
    // The connection drops; what the browser kept is the last id.
    let cursor = sse.last_id.clone().unwrap();
    sse.shutdown();
    drop(sse);
    for i in 7..=10 {
        publish(&server, "s:a", "tick", json!(i));
        publish(&server, "s:b", "tock", json!(-i));
    }
    let header = format!("Last-Event-ID: {cursor}\r\n");
    let mut again = Sse::open(server.addr, "/sse?topic=s:a&topic=plain&topic=s:b", &header);
    assert_eq!(again.status, 200);
    let mut recovered = 0;
    while seen_a.len() + seen_b.len() < 20 {
        let event = again.next().expect("the stream ended");
        let value = event.json();
        match event.event.as_str() {
            "ringcast.subscribed" => {
                if value["topic"] != "plain" {
                    assert_eq!(value["recovered"], true, "{value}");
                    recovered += 1;
                }
            }
            "tick" => seen_a.push(value["payload"].as_i64().unwrap()),
            "tock" => seen_b.push(-value["payload"].as_i64().unwrap()),
            other => panic!("{other}"),
        }
    }
    assert_eq!(recovered, 2);
    assert_eq!(seen_a, (1..=10).collect::<Vec<_>>(), "s:a once, in order");
    assert_eq!(seen_b, (1..=10).collect::<Vec<_>>(), "s:b once, in order");
    // Then live, and nothing else was owed.
    publish(&server, "s:a", "tick", json!(11));
    let live = again.next_push();
    assert_eq!(live.json()["payload"], 11);
    assert_eq!(live.json()["offset"], 11);

    // `?last_event_id=` does the same for a client that cannot set headers.
    let cursor = again.last_id.clone().unwrap();
    again.shutdown();
    publish(&server, "s:b", "tock", json!(-11));
    let query = format!(
        "topic=s:a&topic=plain&topic=s:b&last_event_id={}",
        cursor.replace(',', "%2C")
    );
    let mut third = Sse::open(server.addr, &format!("/sse?{query}"), "");
    let event = third.next_push();
    assert_eq!(
        (event.event.as_str(), event.json()["payload"].clone()),
        ("tock", json!(-11))
    );
}

#[test]
fn a_position_that_is_gone_is_said_in_band_and_the_stream_goes_on_live() {
    let server = TestServer::start(1, Some(CONFIG));
    publish(&server, "s:x", "m", json!(1));
    let mut sse = subscribed(
        &server,
        "topic=s:x",
        "Last-Event-ID: 5.0123456789abcdef\r\n",
        0,
    );
    let reply = sse.expect("ringcast.subscribed").json();
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 1);
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    assert_eq!(sse.last_id.as_deref(), Some(format!("1.{epoch}").as_str()));
    publish(&server, "s:x", "m", json!(2));
    let push = sse.next_push();
    assert_eq!(push.json()["offset"], 2);
    assert_eq!(push.id.as_deref(), Some(format!("2.{epoch}").as_str()));
}

#[test]
fn refusals_come_as_a_status_before_anything_is_streamed() {
    let auth = format!("{CONFIG}\n[auth]\njwt_secret = \"secret\"\n");
    let server = TestServer::start(1, Some(CONFIG));
    let cases = [
        ("/sse", 400, "topic"),
        ("/sse?topic=", 400, "topic"),
        ("/stream?topic=a&since=x.y", 400, "cursor"),
        ("/sse?topic=a&last_event_id=1.e,2.f", 400, "cursor"),
    ];
    for (path, status, needle) in cases {
        let sse = Sse::open(server.addr, path, "");
        assert_eq!(sse.status, status, "{path}: {}", sse.body);
        assert!(sse.body.contains(needle), "{path}: {}", sse.body);
    }
    let (status, _) = server.http("POST", "/sse?topic=a", Some("{}"));
    assert_eq!(status, 405);

    let restricted = TestServer::start(
        1,
        Some("[[rules]]\npattern = \"only:*\"\nclient_publish = true\n"),
    );
    let sse = Sse::open(restricted.addr, "/sse?topic=other", "");
    assert_eq!(sse.status, 403, "{}", sse.body);

    let authed = TestServer::start(1, Some(&auth));
    let sse = Sse::open(authed.addr, "/sse?topic=a", "");
    assert_eq!(sse.status, 401, "{}", sse.body);
}

#[test]
fn ndjson_streams_one_line_per_message_and_resumes_from_since() {
    let server = TestServer::start(2, Some(CONFIG));
    for i in 1..=3 {
        publish(&server, "s:n", "e", json!(i));
    }
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /stream?topic=s:n HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut content_type = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-type:") {
            content_type = v.trim().to_string();
        }
    }
    assert_eq!(content_type, "application/x-ndjson");
    let mut next = || -> Value {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["type"] != "heartbeat" {
                return value;
            }
        }
    };
    let subscribed = next();
    assert_eq!(subscribed["type"], "subscribed");
    let epoch = subscribed["epoch"].as_str().unwrap().to_string();
    publish(&server, "s:n", "e", json!(4));
    let push = next();
    assert_eq!(
        (push["offset"].clone(), push["payload"].clone()),
        (json!(4), json!(4))
    );

    // `since` takes the same cursor: offset.epoch per topic.
    let path = format!("/stream?topic=s:n&since=1.{epoch}");
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    let mut line = String::new();
    while lines.len() < 4 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with('{') && !line.contains("heartbeat") {
            lines.push(serde_json::from_str::<Value>(&line).unwrap());
        }
    }
    assert_eq!(lines[0]["recovered"], true);
    let offsets: Vec<_> = lines[1..].iter().map(|v| v["offset"].clone()).collect();
    assert_eq!(offsets, [json!(2), json!(3), json!(4)]);
}

#[test]
fn heartbeats_keep_an_idle_stream_talking() {
    let server = TestServer::start(1, Some(CONFIG));
    let mut sse = subscribed(&server, "topic=quiet", "", 1);
    sse.set_timeout(Duration::from_secs(5));
    // A heartbeat is a comment: no event is dispatched for it. Reading
    // the next event waits; meanwhile comments arrive every scan.
    let reader = std::thread::spawn(move || {
        let event = sse.next();
        (sse.comments, event)
    });
    std::thread::sleep(Duration::from_millis(2500));
    publish(&server, "quiet", "wake", json!(null));
    let (comments, event) = reader.join().unwrap();
    assert!(comments >= 1, "no heartbeat in 2.5 s");
    assert_eq!(event.unwrap().event, "wake");
}

#[test]
fn a_stream_that_reads_nothing_is_closed_as_a_slow_consumer_and_counted() {
    let config = format!("{CONFIG}\n[limits]\nmax_outbound_bytes_per_connection = 65536\n");
    let server = TestServer::start(1, Some(&config));
    let mut stream = TcpStream::connect(server.addr).unwrap();
    // A small receive window, never read.
    stream
        .write_all(b"GET /sse?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    server.wait_for("the stream to open", || server.metric("subscriptions") == 1);
    let payload = "x".repeat(16 * 1024);
    for _ in 0..400 {
        publish(&server, "flood", "m", json!(payload));
        if server.metric("slow_consumer_disconnects_total") == 1 {
            break;
        }
    }
    server.wait_for("the slow stream to be closed", || {
        server.metric("slow_consumer_disconnects_total") == 1 && server.metric("event_streams") == 0
    });
    drop(stream);
}

#[test]
fn shutdown_ends_a_stream_with_a_close_event_after_what_was_accepted() {
    let mut server = TestServer::start(2, Some(CONFIG));
    let mut sse = subscribed(&server, "topic=bye", "", 1);
    publish(&server, "bye", "last", json!(1));
    server.signal(15);
    let last = sse.next_push();
    assert_eq!(last.event, "last");
    let close = sse.expect("ringcast.close").json();
    assert_eq!(close["code"], 1001, "{close}");
    assert!(sse.next().is_none(), "then the stream ends");
    assert_eq!(server.terminate(), Some(0));
}

#[test]
fn an_authenticated_stream_gets_publications_to_its_user() {
    let config = format!("{CONFIG}\n[auth]\njwt_secret = \"secret\"\n");
    let server = TestServer::start(2, Some(&config));
    let token = common::jwt("secret", "alice", 3600);
    let mut sse = subscribed(
        &server,
        "topic=inbox",
        &format!("Authorization: Bearer {token}\r\n"),
        1,
    );
    let mut by_query = subscribed(&server, &format!("topic=inbox&token={token}"), "", 1);
    let body = json!({"topic": "inbox", "event": "dm", "payload": "hi", "user_id": "alice"});
    let (status, _) = server.http("POST", "/publish", Some(&body.to_string()));
    assert!(status == 200 || status == 202, "{status}");
    for s in [&mut sse, &mut by_query] {
        let push = s.next_push();
        assert_eq!(
            (push.event.as_str(), push.json()["payload"].clone()),
            ("dm", json!("hi"))
        );
    }
}

#[test]
fn the_python_sseclient_library_reads_named_events_and_resumes() {
    let server = TestServer::start(2, Some(CONFIG));
    common::run_python("sse_client.py", server.addr);
}

#[test]
fn allowed_origins_decide_which_pages_may_connect_and_read_answers() {
    let config = format!("{CONFIG}\n[http]\nallowed_origins = [\"https://app.example\"]\n");
    let server = TestServer::start(2, Some(&config));
    let app = "Origin: https://app.example\r\n";
    let evil = "Origin: https://evil.example\r\n";

    // Event streams: the allowed page's stream names it in CORS headers.
    let mut sse = Sse::open(server.addr, "/sse?topic=news", app);
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(sse.header("access-control-allow-credentials"), Some("true"));
    sse.expect("ringcast.subscribed");
    let refused = Sse::open(server.addr, "/sse?topic=news", evil);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("allowed_origins"), "{}", refused.body);
    // The node's own pages, and clients that are not browsers, pass.
    // (`Sse::open` sends `Host: x`.)
    let own = "Origin: http://x\r\n";
    assert_eq!(Sse::open(server.addr, "/sse?topic=news", own).status, 200);
    assert_eq!(Sse::open(server.addr, "/stream?topic=news", "").status, 200);

    // WebSocket upgrades: cross-site WebSocket hijacking is refused.
    assert_eq!(server.upgrade_status("/ws", evil), 403);
    assert_eq!(server.upgrade_status("/echo", evil), 403);
    assert_eq!(server.upgrade_status("/ws", app), 101);
    assert_eq!(server.upgrade_status("/ws", ""), 101);

    // A preflight (an EventSource reconnecting cross-site sends
    // Last-Event-ID, which browsers ask about first).
    let preflight = |origin: &str| {
        server.raw(
            format!(
                "OPTIONS /sse?topic=news HTTP/1.1\r\nHost: x\r\n{origin}\
                 Access-Control-Request-Method: GET\r\n\
                 Access-Control-Request-Headers: last-event-id\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    let allowed = preflight(app);
    assert!(allowed.starts_with("HTTP/1.1 204"), "{allowed}");
    assert!(allowed
        .contains("Access-Control-Allow-Headers: Authorization, Content-Type, Last-Event-ID"));
    assert!(preflight(evil).starts_with("HTTP/1.1 403"));

    // Plain answers carry CORS headers for allowed pages only.
    let health = |origin: &str| {
        server.raw(
            format!("GET /health HTTP/1.1\r\nHost: x\r\n{origin}Connection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    assert!(health(app).contains("Access-Control-Allow-Origin: https://app.example\r\n"));
    assert!(!health(evil).contains("Access-Control-Allow-Origin"));
}

#[test]
fn a_config_with_an_origin_that_cannot_match_is_refused_at_start() {
    let path = std::env::temp_dir().join(format!("ringcast-origins-{}.toml", std::process::id()));
    std::fs::write(&path, "[http]\nallowed_origins = [\"app.example/path\"]\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("allowed_origins"), "{stderr}");
}

#[test]
fn an_event_stream_counts_in_presence_like_a_websocket() {
    let config = "[[rules]]\npattern = \"room:*\"\npresence = true\njoin_leave = true\n";
    let server = TestServer::start(2, Some(config));
    let mut ws = server.ws("/ws");
    ws.subscribe("room:a");
    let sse = subscribed(&server, "topic=room:a&user_id=sue", "", 1);
    // The WebSocket subscriber hears the stream join, across shards.
    let join = loop {
        let value = ws.recv_json();
        if value["event"] == "join" && value["payload"]["user_id"] == "sue" {
            break value;
        }
    };
    assert_eq!(join["payload"]["count"], 2, "{join}");
    let (status, body) = server.http("GET", "/topics/room:a/presence", None);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["count"], 2, "{body}");
    sse.shutdown();
    let leave = loop {
        let value = ws.recv_json();
        if value["event"] == "leave" && value["payload"]["user_id"] == "sue" {
            break value;
        }
    };
    assert_eq!(leave["payload"]["count"], 1, "{leave}");
}
