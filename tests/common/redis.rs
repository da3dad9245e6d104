//! A private `redis-server` per test, for the cluster tests: its own loopback
//! port (never the shared 6379), its own directory, no persistence unless
//! asked for, killed on drop. It speaks just enough RESP over a plain
//! `TcpStream` to ping Redis and send a command; the tests need no Redis
//! client crate.

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a fresh `redis-server` gets to answer PING. It takes a few
/// milliseconds when idle; the margin covers a CI machine running every test
/// binary at once.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Ports tried by `start` before it gives up: a port can be taken between the
/// check and Redis's own bind, by another test process.
const PORT_ATTEMPTS: usize = 20;

/// Ports below this are reserved or well known; candidates start here.
const LOWEST_PORT: u16 = 10_000;

/// Every port a `RedisServer` of this process holds, stopped ones included,
/// so two tests running in parallel never get the same one and a stopped
/// server can come back on its port.
static PORTS_HELD: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A `redis-server` child process on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// An append-only file in `dir`, fsynced on every write: what Redis
    /// acknowledged survives `stop` and comes back with `restart`.
    persistent: bool,
    /// A Redis Cluster node (`cluster-enabled yes`), not joined to any yet.
    cluster_node: bool,
    /// More `redis-server` arguments (a TLS port, say).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts Redis on a free loopback port and returns once it answers PING.
    /// Panics with Redis's log if it cannot start.
    pub fn start() -> RedisServer {
        RedisServer::launch(false, false)
    }

    /// The same with persistence: an append-only file fsynced before every
    /// reply (`--appendonly yes --appendfsync always`), so a write Redis
    /// acknowledged survives `stop`'s SIGKILL and `restart` loads it back.
    pub fn start_persistent() -> RedisServer {
        RedisServer::launch(true, false)
    }

    /// A persistent node for a Redis Cluster (`cluster-enabled yes`, a
    /// one-second node timeout so a failover takes seconds), not yet part of
    /// any: `common::redis_cluster` joins them.
    pub fn start_cluster_node() -> RedisServer {
        RedisServer::launch(true, true)
    }

    /// A plain Redis with more `redis-server` arguments (PING still goes to
    /// its plain port).
    pub fn start_with_args(extra: Vec<String>) -> RedisServer {
        RedisServer::launch_with(false, false, extra)
    }

    fn launch(persistent: bool, cluster_node: bool) -> RedisServer {
        RedisServer::launch_with(persistent, cluster_node, Vec::new())
    }

    fn launch_with(persistent: bool, cluster_node: bool, extra: Vec<String>) -> RedisServer {
        let mut failures = Vec::new();
        for attempt in 0..PORT_ATTEMPTS {
            let Some(port) = reserve_port(attempt) else {
                continue;
            };
            let mut server = RedisServer {
                port,
                dir: std::env::temp_dir()
                    .join(format!("ringcast-redis-{}-{port}", std::process::id())),
                persistent,
                cluster_node,
                extra: extra.clone(),
                child: None,
            };
            // A directory left by an earlier process with this pid must not
            // hand its append-only file to a persistent server.
            let _ = std::fs::remove_dir_all(&server.dir);
            std::fs::create_dir_all(&server.dir).expect("creating Redis's directory");
            match server.spawn() {
                Ok(()) => return server,
                // Dropping `server` releases the port and removes its directory.
                Err(log) => failures.push(format!("port {port}: {log}")),
            }
        }
        panic!(
            "redis-server did not start on any of {PORT_ATTEMPTS} ports:\n{}",
            failures.join("\n")
        );
    }

    /// `redis://127.0.0.1:PORT`, as a ringcast `[cluster] redis_url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills Redis (SIGKILL: clients see their connections drop, as in a
    /// crash) and waits for it to exit. The port stays reserved for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops Redis without closing anything (SIGSTOP): its sockets stay
    /// open and nothing is answered, like a hung or partitioned server.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused Redis go on (SIGCONT): it answers what waited.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("Redis is running");
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} to Redis");
    }

    /// Starts Redis again on the same port and returns once it answers PING:
    /// empty, or, for a persistent server, with what it had acknowledged.
    pub fn restart(&mut self) {
        self.stop();
        // The old listener is gone once the process is reaped, and Redis sets
        // SO_REUSEADDR, so a failure here is a real problem, not a race;
        // a few tries cover a connection still being torn down.
        let mut last = String::new();
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    /// Sends one command (see [`try_redis_cmd`] for the reply's form);
    /// panics if Redis cannot be reached.
    pub fn cmd(&self, args: &[&str]) -> String {
        try_redis_cmd(self.addr(), args)
            .unwrap_or_else(|e| panic!("Redis on port {} failed {args:?}: {e}", self.port))
    }

    /// Spawns `redis-server` on `self.port` and waits for PING; on failure
    /// the child is reaped and the error carries the end of its log.
    fn spawn(&mut self) -> Result<(), String> {
        // REDIS_SERVER runs another build; the Debian package is the default.
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let log = self.dir.join("redis.log");
        let stderr = File::create(self.dir.join("stderr")).map_err(|e| e.to_string())?;
        let mut child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"].as_slice()
            } else {
                ["--appendonly", "no"].as_slice()
            })
            .args(if self.cluster_node {
                ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"].as_slice()
            } else {
                [].as_slice()
            })
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin}: {e} (scripts/test.sh installs the redis-server package)")
            });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status}: {}", self.log_tail()));
            }
            if try_redis_cmd(self.addr(), &["PING"]).is_ok_and(|reply| reply == "PONG") {
                // The PONG may come from another process's Redis that took
                // the port first (ours then fails to bind and exits): two
                // tests sharing one Redis see each other's keys and restarts.
                let answering = server_pid(self.addr());
                if answering != Some(child.id()) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "port {} is served by another Redis (pid {answering:?}, ours {})",
                        self.port,
                        child.id()
                    ));
                }
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no PONG within {READY_TIMEOUT:?}: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last lines Redis wrote to its log and to stderr.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["redis.log", "stderr"] {
            text += &std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        PORTS_HELD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != self.port);
        let _ = std::fs::remove_file(claim_path(self.port));
    }
}

/// Picks a port nobody listens on and records it in `PORTS_HELD`. Candidates
/// lie below the kernel's ephemeral range, so no outgoing connection (a
/// ringcast node's, to this very Redis) can take the port while Redis is
/// stopped and keep `restart` from binding it.
fn reserve_port(attempt: usize) -> Option<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let mut held = PORTS_HELD.lock().unwrap_or_else(|e| e.into_inner());
    let port = match ephemeral_low.checked_sub(LOWEST_PORT).filter(|&s| s > 0) {
        Some(span) => {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_usize(attempt);
            LOWEST_PORT + (hasher.finish() % u64::from(span)) as u16
        }
        // An unusual range leaves no room below it: let the kernel choose.
        None => TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port(),
    };
    if held.contains(&port) || !claim(port) {
        return None;
    }
    if TcpListener::bind(("127.0.0.1", port)).is_err() {
        let _ = std::fs::remove_file(claim_path(port));
        return None;
    }
    held.push(port);
    Some(port)
}

/// Where a test process claims a port: `PORTS_HELD` keeps the tests of one
/// process apart, this file those of two (two test runs on one machine),
/// including while a server is stopped and its port is free.
fn claim_path(port: u16) -> PathBuf {
    std::env::temp_dir()
        .join("ringcast-test-redis-ports")
        .join(port.to_string())
}

/// Claims `port` for this process unless a live process holds it; a claim
/// left by a process that is gone is taken over. The claim appears with its
/// pid in it at once (a hard link of a file written first), so no other
/// process ever reads a claim without its holder.
fn claim(port: u16) -> bool {
    let path = claim_path(port);
    let Some(dir) = path.parent() else {
        return false;
    };
    let _ = std::fs::create_dir_all(dir);
    let mine = dir.join(format!(".{port}.{}", std::process::id()));
    if std::fs::write(&mine, std::process::id().to_string()).is_err() {
        return false;
    }
    let mut claimed = false;
    for _ in 0..2 {
        match std::fs::hard_link(&mine, &path) {
            Ok(()) => {
                claimed = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|pid| pid.trim().parse::<u32>().ok());
                let alive = holder.map_or(true, |pid| {
                    pid == std::process::id()
                        || std::path::Path::new(&format!("/proc/{pid}")).exists()
                });
                if alive {
                    break;
                }
                // Its process is gone: take the claim over.
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => break,
        }
    }
    let _ = std::fs::remove_file(&mine);
    claimed
}

/// The pid of the Redis answering at `addr` (`INFO server`'s `process_id`).
fn server_pid(addr: SocketAddr) -> Option<u32> {
    let info = try_redis_cmd(addr, &["INFO", "server"]).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Sends one command to the Redis at `addr` on a fresh connection and reads
/// its reply, rendered as text: a simple or bulk string as is, an integer in
/// decimal, an error with its leading `-` (`-ERR unknown command ...`), nil as
/// the empty string, an array as its elements one per line.
pub fn try_redis_cmd(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request += &format!("${}\r\n{arg}\r\n", arg.len());
    }
    stream.write_all(request.as_bytes())?;
    read_reply(&mut BufReader::new(stream))
}

/// One RESP2 reply from the front of `reader`.
fn read_reply(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches("\r\n");
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.to_string());
    let (kind, rest) = line.split_at_checked(1).ok_or_else(invalid)?;
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Ok(line.to_string()),
        "$" => {
            let Ok(len) = usize::try_from(rest.parse::<i64>().map_err(|_| invalid())?) else {
                return Ok(String::new()); // $-1: nil
            };
            let mut data = vec![0u8; len + 2];
            reader.read_exact(&mut data)?;
            data.truncate(len);
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
        "*" => {
            let Ok(count) = usize::try_from(rest.parse::<i64>().map_err(|_| invalid())?) else {
                return Ok(String::new()); // *-1: nil
            };
            let items = (0..count)
                .map(|_| read_reply(reader))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok(items.join("\n"))
        }
        _ => Err(invalid()),
    }
}
