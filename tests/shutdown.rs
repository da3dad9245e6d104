//! SIGTERM and SIGINT: every connection gets close 1001 and the process exits 0.
mod common;

use std::time::{Duration, Instant};

use common::TestServer;

fn stops_gracefully_on(signal: i32) {
    let mut server = TestServer::start(2, None);
    let mut clients: Vec<_> = (0..6).map(|_| server.ws("/ws")).collect();
    for c in &mut clients {
        c.subscribe("t");
    }
    server.signal(signal);
    for c in &mut clients {
        assert_eq!(c.expect_close(), 1001);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits_zero() {
    stops_gracefully_on(libc::SIGTERM);
}

#[test]
fn sigint_closes_every_connection_with_1001_and_exits_zero() {
    stops_gracefully_on(libc::SIGINT);
}

/// Subscribers spread over both shards; publishers keep going while the
/// signal arrives.
const DRAIN_SUBSCRIBERS: usize = 200;

#[test]
fn every_publish_acknowledged_before_shutdown_reaches_every_subscriber() {
    let server = TestServer::start(2, None);
    let subscribers: Vec<_> = (0..DRAIN_SUBSCRIBERS)
        .map(|_| {
            let mut ws = server.ws("/ws");
            ws.subscribe("news");
            ws
        })
        .collect();
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut ws| {
            std::thread::spawn(move || {
                let mut seen = std::collections::HashSet::new();
                loop {
                    match ws.0.read() {
                        Ok(tungstenite::Message::Text(text)) => {
                            let push: serde_json::Value = serde_json::from_str(&text).unwrap();
                            seen.insert(push["payload"]["id"].as_str().unwrap().to_string());
                        }
                        Ok(tungstenite::Message::Close(frame)) => {
                            let code = frame.map(|f| u16::from(f.code));
                            assert_eq!(code, Some(1001));
                            return seen;
                        }
                        Ok(_) => {}
                        Err(e) => panic!("no close frame: {e}"),
                    }
                }
            })
        })
        .collect();

    // Publishers on keep-alive connections (on both shards), recording which
    // publishes were acknowledged with 202.
    let publishers: Vec<_> = (0..6)
        .map(|p| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut conn = std::net::TcpStream::connect(addr).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                for seq in 0.. {
                    let id = format!("{p}-{seq}");
                    let body = format!(r#"{{"topic":"news","payload":{{"id":"{id}"}}}}"#);
                    let request = format!(
                        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    use std::io::{BufRead, Read, Write};
                    if conn.write_all(request.as_bytes()).is_err() {
                        return acked;
                    }
                    let mut status = String::new();
                    if reader.read_line(&mut status).unwrap_or(0) == 0 {
                        return acked;
                    }
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    if status.contains(" 202 ") {
                        acked.push(id);
                    } else {
                        assert!(status.contains(" 503 "), "unexpected {status}");
                        return acked;
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGTERM);
    let acked: Vec<String> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    assert!(
        acked.len() > 10,
        "the publishers got going ({})",
        acked.len()
    );
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = reader.join().unwrap();
        let missing: Vec<_> = acked.iter().filter(|id| !seen.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "subscriber {i} missed {} acknowledged publishes, e.g. {:?}",
            missing.len(),
            missing.first()
        );
    }
}
