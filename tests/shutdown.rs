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
