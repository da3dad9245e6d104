//! Out of file descriptors: the server neither spins nor dies; it counts the
//! failed accepts and serves again once descriptors free up.
mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::TestServer;

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_stops_the_server() {
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=48:48",
        "--",
        env!("CARGO_BIN_EXE_ringcast"),
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);
    let server = TestServer::spawn(cmd, None);
    let flood: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(server.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds(server.child.id()) - before;
    assert!(
        spent < 0.3,
        "the accept loop must back off, not spin: {spent:.2} s of CPU in 1 s"
    );
    drop(flood);
    server.wait_for("the server to serve again", || {
        TcpStream::connect(server.addr).is_ok() && server.http("GET", "/health", None).0 == 200
    });
    assert!(server.metric("accept_errors_total") > 0);
}
