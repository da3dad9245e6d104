//! Starting and stopping the relay: binds one `SO_REUSEPORT` listener per
//! shard, creates the bus, and runs each shard on its own thread. The
//! builder takes the configuration and channel hooks by pattern.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::bus::{Bus, ShardId};
use crate::cluster::BrokerHandle;
use crate::config::Config;
use crate::hooks::{ChannelHook, Channels};
use crate::metrics::ShardStats;
use crate::rules::RuleError;
use crate::shard::{self, Shared};

/// Backlog of each shard's listener: large enough for a connection storm of a
/// load test without SYN drops; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 65_535;
/// TCP keepalive, inherited by every accepted socket: a peer that vanished
/// without a FIN (power loss, NAT timeout) is detected within about 90 s
/// (60 s idle, then 3 probes 10 s apart) instead of holding its slot forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// Collects the configuration and channel hooks, then starts a [`Relay`].
pub struct RelayBuilder {
    config: Config,
    channels: Channels,
}

impl RelayBuilder {
    /// Registers `hook` for topics matching `pattern` (`chat:lobby` or
    /// `room:*`); it replaces a configured rule with the same pattern.
    pub fn channel(mut self, pattern: &str, hook: impl ChannelHook) -> Result<Self, RuleError> {
        self.channels.add(pattern, hook)?;
        Ok(self)
    }

    /// Binds the listeners and starts every shard.
    pub fn start(self) -> io::Result<Relay> {
        Relay::start_with(self.config, self.channels)
    }
}

/// A running relay.
pub struct Relay {
    local_addr: SocketAddr,
    shared: Shared,
    stopping: Arc<AtomicBool>,
    exits: mpsc::Receiver<ShardExit>,
    shards: usize,
    /// The cluster broker thread, with `[cluster]`.
    broker: Option<BrokerHandle>,
    /// The webhook thread, with `[webhooks]`.
    webhooks: Option<crate::backend::Worker>,
    /// The subscribe proxy's thread, with `[proxy]`.
    proxy: Option<crate::backend::Worker>,
}

/// How a shard thread ended.
struct ShardExit {
    shard: ShardId,
    outcome: Result<(), String>,
}

/// Asks a running relay to stop; cheap to clone and send to another thread
/// (a signal handler's, say).
#[derive(Clone)]
pub struct ShutdownHandle {
    bus: Arc<Bus>,
    stopping: Arc<AtomicBool>,
}

impl ShutdownHandle {
    /// Asks every shard to stop accepting, deliver what it acknowledged,
    /// close its connections with 1001 and exit.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.bus.shutdown_all();
    }
}

impl Relay {
    /// A builder starting from `config`; its `[[rules]]` become the first channels.
    pub fn builder(config: Config) -> RelayBuilder {
        let channels = Channels::from_rules(&config.rules).with_apps(&config.apps);
        RelayBuilder { config, channels }
    }

    /// Starts a relay with the configured rules and no other hooks.
    pub fn start(config: Config) -> io::Result<Relay> {
        Relay::builder(config).start()
    }

    fn start_with(config: Config, channels: Channels) -> io::Result<Relay> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let shards = config.shards.get();
        // Port 0 binds once to learn the port; the other shards join that port.
        let first = bind_reuseport(config.listen)?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..shards {
            listeners.push(bind_reuseport(local_addr)?);
        }
        let mut config = config;
        if let Some(cluster) = config.cluster.as_mut() {
            cluster
                .node_name
                .get_or_insert_with(|| format!("{}:{}", host_name(), local_addr.port()));
        }
        let shared = Shared::new(config, channels)?;
        let broker = match shared.config.cluster.clone() {
            Some(cluster) => {
                tracing::info!(
                    "cluster: node {} joins through Redis at {}",
                    cluster.node_name.as_deref().unwrap_or_default(),
                    crate::config::redact_url(&cluster.redis_url)
                );
                Some(crate::cluster::spawn(shared.clone(), cluster)?)
            }
            None => None,
        };
        let webhooks = match &shared.webhooks {
            Some(sink) => {
                for target in &sink.plan.targets {
                    tracing::info!(
                        "webhooks: events {:?} go to {} ({:?})",
                        target.events,
                        crate::config::redact_url(&target.url),
                        target.signer,
                    );
                }
                let cluster = shared.config.cluster.clone();
                Some(crate::webhooks::spawn(sink.clone(), cluster)?)
            }
            None => None,
        };
        if !shared.config.apps.is_empty() {
            let keys: Vec<&str> = shared.config.apps.iter().map(|a| a.key.as_str()).collect();
            tracing::info!("pusher: apps at /app/{{key}} for keys {keys:?}");
        }
        let proxy = match (&shared.proxy, &shared.config.proxy) {
            (Some(sink), Some(config)) => Some(crate::proxy::spawn(
                sink.clone(),
                config,
                shared.bus().clone(),
            )?),
            _ => None,
        };
        let (exit_tx, exits) = mpsc::channel();
        for (i, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let exit_tx = exit_tx.clone();
            std::thread::Builder::new()
                .name(format!("ringcast-shard-{i}"))
                .spawn(move || {
                    let shard = ShardId(i);
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        shard::run(shard, shared, listener)
                    }));
                    let outcome = match outcome {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("I/O error: {e}")),
                        Err(panic) => Err(format!("panicked: {}", panic_message(&*panic))),
                    };
                    let _ = exit_tx.send(ShardExit { shard, outcome });
                })?;
        }
        Ok(Relay {
            local_addr,
            shared,
            stopping: Arc::new(AtomicBool::new(false)),
            exits,
            shards,
            broker,
            webhooks,
            proxy,
        })
    }

    /// The address the listeners are bound to (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Per-shard statistics.
    pub fn stats(&self) -> &[ShardStats] {
        self.shared.stats()
    }

    /// A handle that can stop the relay from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            bus: self.shared.bus().clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Asks every shard to stop accepting, deliver what it acknowledged,
    /// close its connections with 1001 and exit.
    pub fn shutdown(&self) {
        self.shutdown_handle().shutdown();
    }

    /// Waits until every shard has stopped. A shard that stops on its own (a
    /// panic, a ring error) is never left half-alive: the others depend on
    /// it for acknowledgements, so they are told to stop at once, and the
    /// error names the shard and why. Waiting for them is bounded by the
    /// shutdown timeout.
    pub fn join(self) -> io::Result<()> {
        let mut failure: Option<String> = None;
        let grace = self.shared.config.shutdown_timeout + SHUTDOWN_GRACE;
        for _ in 0..self.shards {
            let exit = if failure.is_some() {
                match self.exits.recv_timeout(grace) {
                    Ok(exit) => exit,
                    Err(_) => break,
                }
            } else {
                match self.exits.recv() {
                    Ok(exit) => exit,
                    Err(_) => break,
                }
            };
            let unexpected = match exit.outcome {
                Err(reason) => Some(reason),
                Ok(()) if !self.stopping.load(Ordering::SeqCst) => {
                    Some("stopped without being asked to".to_string())
                }
                Ok(()) => None,
            };
            if let (Some(reason), None) = (unexpected, &failure) {
                let message = format!("shard {} {reason}", exit.shard.0);
                tracing::error!("{message}; stopping the other shards");
                failure = Some(message);
                self.shutdown();
            }
        }
        if let Some(broker) = self.broker {
            // The shards have handed over their last publications.
            broker.stop(BROKER_FLUSH);
        }
        if let Some(proxy) = self.proxy {
            proxy.stop(Duration::ZERO);
        }
        if let Some(webhooks) = self.webhooks {
            // The shards' last notices (their connections closed) are in;
            // what waited for its delay is sent now.
            webhooks.stop(WEBHOOK_FLUSH);
        }
        match failure {
            Some(message) => Err(io::Error::other(message)),
            None => Ok(()),
        }
    }
}

/// How long a stopping node tries to deliver its last webhook events.
const WEBHOOK_FLUSH: Duration = Duration::from_secs(2);

/// How long a stopping node waits for its broker to send its last
/// publications to Redis.
const BROKER_FLUSH: Duration = Duration::from_secs(2);

/// This machine's host name, for the default cluster node name.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into a live buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "ringcast".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Time beyond the shutdown timeout that `join` waits for the other shards
/// after one failed: their forced closes run on their next timer tick.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "with a non-string payload".to_string()
    }
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit these from the listener on Linux.
    socket.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Raises this process's open-file limit to its hard limit: every connection is an fd.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a live local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
