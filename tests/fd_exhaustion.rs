//! Out of file descriptors: the server neither spins nor dies; it counts the
//! failed accepts and serves again once descriptors free up.
//!
//! Accepted connections live in the shard ring's direct-descriptor table,
//! never in the process's own descriptor table, and the kernel caps that
//! table at RLIMIT_NOFILE. The table holds the connection limit plus
//! `REFUSAL_HEADROOM` (256) slots for connections refused with 503, which the
//! server closes within a few ring turns; so a steady stream of connections
//! never fills it, only a burst larger than the table does. The test makes
//! that burst certain: it stops the server, lets a flood queue in the listen
//! backlog, and resumes it, so the kernel's multishot accept meets more
//! connections than the table holds before the server can close any it
//! refuses. Each check of the server is one connection at a time, retried
//! until a deadline.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{parse_response, TestServer, IO_TIMEOUT};

/// The server's open-file limit, so its ring's table has 320 slots and its
/// connection limit is 64 (320 less the refusal headroom): far more than the
/// one connection at a time the health checks below use.
const NOFILE: usize = 320;
/// Connections queued while the server is stopped: more than its table
/// holds, so accepting them at once must run out of descriptors.
const FLOOD: usize = 2 * NOFILE;
/// The server's timer period (`TICK` in src/shard/driver/mod.rs). A failed
/// accept is retried on the next tick: retried at once, it would fail again
/// at ring speed for as long as the table is full (a busy loop too short
/// to show as CPU time, but not in the count of failures).
const RETRY_PERIOD: Duration = Duration::from_millis(100);
/// How long one request may take before it is retried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// True once every thread of the process is stopped by a signal: only then
/// is nothing left to accept connections.
fn is_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks.flatten().all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which may contain spaces.
        let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
        matches!(state, Some('T' | 't') | None)
    })
}

/// Connections waiting to be accepted on the listener at `addr`: a
/// listening socket's receive queue in /proc/net/tcp.
fn accept_queue(addr: SocketAddr) -> usize {
    let local = format!(":{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        // Fields: sl, local address, remote address, state (0A = LISTEN), tx:rx queues.
        .find(|f| f[1].ends_with(&local) && f[3] == "0A")
        .map(|f| usize::from_str_radix(f[4].split(':').nth(1).unwrap(), 16).unwrap())
        .expect("the listener is in /proc/net/tcp")
}

/// One GET on a fresh connection; None if the server refused, reset or did
/// not answer in time (it may be out of descriptors, or not yet running).
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    response
        .starts_with("HTTP/1.1 ")
        .then(|| parse_response(&response))
}

/// GETs `path` until it answers 200, one connection at a time; the body.
fn get_ok(addr: SocketAddr, path: &str, what: &str) -> String {
    let start = Instant::now();
    loop {
        match try_get(addr, path) {
            Some((200, body)) => return body,
            last => assert!(
                start.elapsed() < IO_TIMEOUT,
                "timed out waiting for {what}; last answer {last:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sum of one metric over shards, from the text of `/metrics`.
fn metric(text: &str, name: &str) -> u64 {
    let prefix = format!("ringcast_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_stops_the_server() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        somaxconn > FLOOD,
        "net.core.somaxconn ({somaxconn}) must let {FLOOD} connections wait to be accepted"
    );
    // RINGCAST_TEST_BIN runs the test against another build, as in TestServer::start.
    let bin = std::env::var("RINGCAST_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringcast").to_string());
    let mut cmd = Command::new("prlimit");
    cmd.args([
        &format!("--nofile={NOFILE}:{NOFILE}"),
        "--",
        &bin,
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);
    let mut server = TestServer::spawn(cmd, None);
    let pid = server.child.id();
    let metrics = get_ok(server.addr, "/metrics", "the server to start");
    assert_eq!(metric(&metrics, "accept_errors_total"), 0);

    server.signal(libc::SIGSTOP);
    let start = Instant::now();
    while !is_stopped(pid) {
        assert!(start.elapsed() < IO_TIMEOUT, "the server did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let resumed = Instant::now();
    server.signal(libc::SIGCONT);
    // Every accept that fails takes its connection out of the queue, so
    // once the queue is empty no accept will fail again.
    server.wait_for("the server to accept the whole flood", || {
        accept_queue(server.addr) == 0
    });
    let draining = resumed.elapsed();

    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.3,
        "the server must go quiet after the flood: {spent:.2} s of CPU in 1 s"
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited"
    );

    drop(flood);
    get_ok(server.addr, "/health", "the server to serve again");
    let metrics = get_ok(server.addr, "/metrics", "the metrics");
    let failures = metric(&metrics, "accept_errors_total");
    assert!(
        failures > 0,
        "no accept failed: the flood never filled the descriptor table"
    );
    // The accept armed when the flood came, and one per tick while it drained.
    let retries = (draining.as_millis() / RETRY_PERIOD.as_millis()) as u64;
    assert!(
        failures <= 2 + retries,
        "{failures} accepts failed in {draining:?}: a failed accept must wait \
         for the next tick, not be retried at once"
    );
}
