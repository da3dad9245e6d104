//! The broker: one thread per node that speaks to Redis for the shards.
//!
//! It is a member of the bus like a shard (`ShardId(shards)`), so shards
//! talk to it the way they talk to each other and never wait on Redis:
//!
//! - Interest notices tell it which names (topics, users, chat users) the
//!   node's shards hold. The first shard to hold a name makes it subscribe
//!   the name's channel (`SSUBSCRIBE`); its acknowledgement waits for Redis to
//!   confirm, so a client's `subscribed` means publications from every node
//!   reach it. The last shard to let go unsubscribes.
//! - Publications (`Publish`, `UserPublish`, `Chat`) are sent with `SPUBLISH`,
//!   pipelined in the order they came.
//! - Messages from other nodes become the same envelopes, queued to the
//!   shards holding the name. A node's own messages come back to it and are
//!   skipped: its shards delivered them already.
//! - It is every stream's home (`cluster::streams`), keeps registrations
//!   (`cluster::registry`) and the node's presence members
//!   (`cluster::presence`) in Redis, answering shards with the envelopes a
//!   shard would.
//!
//! Redis lost: the shards see `up == false`, deliver locally and answer
//! publishes with 503; interest is acknowledged at once (local subscribers
//! are not held hostage). The Redis client reconnects with exponential
//! backoff and jitter; on every connection the broker subscribes every
//! held channel again.
//!
//! The decisions are plain data (`cluster::state::BrokerState`): this is
//! its driver. It runs a single-threaded tokio runtime, because the Redis
//! client (fred) is built on tokio: one thread, epoll, off the serving
//! path. Each wake-up (the bus's eventfd, a message from Redis, an answer
//! from a task of `cluster::redis`, the health timer) becomes one event for
//! the state, and its operations are carried out: envelopes onto the bus,
//! commands to Redis.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::interfaces::EventInterface;
use fred::prelude::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc};

use crate::bus::{Bus, Envelope, Outbox, Sent, ShardId};
use crate::config::{redact_url, ClusterConfig};
use crate::shard::Shared;

use super::redis::Redis;
use super::state::{BrokerState, Event, Op, Setup};
use super::ClusterStatus;

/// Envelopes taken from one shard per wake-up before looking at Redis again.
const DRAIN_BOUND: usize = 4096;
/// How often the broker checks whether it still reaches Redis.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// Stops the broker at shutdown, once the shards have handed it everything.
pub struct BrokerHandle {
    stop: Arc<AtomicBool>,
    bus: Arc<Bus>,
    me: ShardId,
    thread: std::thread::JoinHandle<()>,
}

impl BrokerHandle {
    /// Asks the broker to send what it holds and stop; waits for it at most
    /// `timeout` (Redis may be gone), then leaves it to the process exit.
    pub fn stop(self, timeout: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.bus.waker(self.me).signal();
        let deadline = std::time::Instant::now() + timeout;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts the broker thread of a node whose bus has a broker member.
pub fn spawn(shared: Shared, config: ClusterConfig) -> io::Result<BrokerHandle> {
    let bus = shared.bus.clone();
    let me = bus
        .broker()
        .ok_or_else(|| io::Error::other("the bus has no broker member"))?;
    let status = shared
        .cluster
        .clone()
        .ok_or_else(|| io::Error::other("no cluster status"))?;
    let redis = redis_config(&config)?;
    set_nonblocking(bus.waker(me).raw_fd())?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("ringcast-broker".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a single-threaded tokio runtime starts");
                runtime.block_on(async move {
                    match Broker::connect(me, shared, status, &config, redis, stop) {
                        Ok(broker) => broker.run().await,
                        Err(e) => tracing::error!("cluster broker cannot start: {e}"),
                    }
                });
            })?
    };
    Ok(BrokerHandle {
        stop,
        bus,
        me,
        thread,
    })
}

/// The fred configuration of `[cluster]`'s Redis: its URL, and the CAs to
/// trust with `rediss://`.
fn redis_config(config: &ClusterConfig) -> io::Result<fred::prelude::Config> {
    let mut redis = fred::prelude::Config::from_url(&config.redis_url).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cluster.redis_url `{}`: {e}", redact_url(&config.redis_url)),
        )
    })?;
    if let Some(path) = &config.tls_ca_file {
        redis.tls = Some(super::tls::trusting(path)?.into());
    }
    Ok(redis)
}

/// A client of `[cluster]`'s Redis for another part of the node (the
/// webhook thread), with the broker's policies; it starts connecting on
/// the runtime it is called on.
pub fn redis_client(config: &ClusterConfig) -> io::Result<fred::prelude::Client> {
    let client = super::redis::build_client(redis_config(config)?, 16).map_err(io::Error::other)?;
    fred::interfaces::ClientLike::connect(&client);
    Ok(client)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the bus owns for the life of the process.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; only adds O_NONBLOCK.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Broker {
    me: ShardId,
    bus: Arc<Bus>,
    outbox: Outbox,
    status: Arc<ClusterStatus>,
    state: BrokerState,
    redis: Redis,
    /// What the tasks of `cluster::redis` report.
    events: mpsc::UnboundedReceiver<Event>,
    stop: Arc<AtomicBool>,
}

impl Broker {
    /// Builds the Redis clients and starts connecting (in the background:
    /// a node starts even when Redis is down, degraded, and keeps trying).
    fn connect(
        me: ShardId,
        shared: Shared,
        status: Arc<ClusterStatus>,
        config: &ClusterConfig,
        redis: fred::prelude::Config,
        stop: Arc<AtomicBool>,
    ) -> Result<Broker, Error> {
        let (done, events) = mpsc::unbounded_channel();
        let redis = Redis::connect(config, redis, status.clone(), done)?;
        let mut node = [0u8; 8];
        getrandom::fill(&mut node)
            .map_err(|e| Error::new(fred::error::ErrorKind::IO, e.to_string()))?;
        let setup = Setup {
            prefix: config.prefix.clone(),
            // Never 0: that names a message every node delivers.
            node: u64::from_le_bytes(node).max(1),
            clustered: redis.clustered(),
            presence_ttl: config.presence_ttl,
            health_timeout: config.health_timeout,
        };
        let bus = shared.bus.clone();
        Ok(Broker {
            me,
            outbox: Outbox::new(me, bus.members()),
            bus,
            state: BrokerState::new(shared, status.clone(), setup),
            status,
            redis,
            events,
            stop,
        })
    }

    async fn run(mut self) {
        let fd = WakerFd(self.bus.waker(self.me).raw_fd());
        // SAFETY: the eventfd belongs to the bus, which outlives this task
        // (the broker holds an `Arc` of it) and never closes or reuses it.
        let waker =
            match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                Ok(fd) => fd,
                Err(e) => return tracing::error!("cluster broker cannot watch its eventfd: {e}"),
            };
        let mut messages = self.redis.subscriber.message_rx();
        let mut connected = self.redis.subscriber.reconnect_rx();
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        loop {
            let event = tokio::select! {
                ready = waker.readable() => {
                    if let Ok(mut guard) = ready {
                        drain_eventfd(guard.get_inner().0);
                        guard.clear_ready();
                    }
                    self.bus.waker(self.me).rearm();
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    Event::FromShards(self.drain_bus())
                }
                message = messages.recv() => match message {
                    Ok(message) => {
                        let channel = message.channel.to_string();
                        let Some(bytes) = message.value.into_bytes() else { continue };
                        Event::Message { channel, bytes }
                    }
                    Err(broadcast::error::RecvError::Lagged(lost)) => Event::Lagged { lost },
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                server = connected.recv() => {
                    if server.is_err() {
                        continue;
                    }
                    let unsupported = self.redis.unsupported_version().await;
                    Event::Connected { unsupported }
                }
                Some(event) = self.events.recv() => event,
                _ = health.tick() => Event::Tick { connected: self.redis.connected() },
            };
            self.state.handle(event, Instant::now());
            self.carry_out();
        }
        self.redis.quit().await;
    }

    /// Carries out the state's operations: envelopes onto the bus (a
    /// publication to a full queue is dropped, counted), the rest to Redis.
    fn carry_out(&mut self) {
        for op in self.state.take_ops() {
            match op {
                Op::ToShard { to, envelope } => {
                    if self.outbox.send(&self.bus, to, envelope) == Sent::Dropped {
                        ClusterStatus::count(&self.status.stats.drops_total);
                    }
                }
                op => self.redis.execute(op),
            }
        }
        self.outbox.retry_backlog(&self.bus);
        self.outbox.wake_all(&self.bus);
    }

    /// Takes what the shards sent, in passes over their queues until one
    /// finds nothing, so a publication pushed before another that was
    /// taken is taken too (the state orders them by `seq`).
    fn drain_bus(&mut self) -> Vec<(ShardId, Envelope)> {
        let mut taken = Vec::new();
        loop {
            let mut found = false;
            for from in 0..self.bus.shards() {
                while let Some(envelope) = self.bus.pop(ShardId(from), self.me) {
                    found = true;
                    taken.push((ShardId(from), envelope));
                    if taken.len() >= DRAIN_BOUND {
                        break;
                    }
                }
            }
            if !found || taken.len() >= DRAIN_BOUND {
                break;
            }
        }
        if taken.len() >= DRAIN_BOUND {
            // More than the bound: come back after looking at Redis.
            self.bus.waker(self.me).signal();
        }
        taken
    }
}

/// The broker's eventfd, for tokio to watch.
struct WakerFd(RawFd);

impl AsRawFd for WakerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from the broker's own
    // (non-blocking) eventfd; EAGAIN just means nothing was pending.
    unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}
