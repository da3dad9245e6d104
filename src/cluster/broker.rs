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
//! It runs a single-threaded tokio runtime, because the Redis client (fred)
//! is built on tokio: one thread, epoll, off the serving path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{Builder, ClusterHash, CustomCommand, Message};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc};

use crate::bus::{Bus, Envelope, IndexKind, Outbox, Sent, ShardId, ShardSet};
use crate::config::{redact_url, ClusterConfig};
use crate::shard::Shared;

use super::gate::Gate;
use super::interest::{Interest, Key, Step};
use super::liveness::{Liveness, Pong};
use super::presence::{self, PresenceDone};
use super::registry::{self, RegistryDone};
use super::relay::Relay;
use super::streams::{self, Opening, PublishJob, StreamDone};
use super::subscriptions::Change;
use super::wire;
use super::ClusterStatus;

/// Envelopes taken from one shard per wake-up before looking at Redis again.
const DRAIN_BOUND: usize = 4096;
/// Publications waiting for Redis, by count; the real bound is in bytes
/// (`cluster.max_queued_bytes`, checked by the shards before queueing).
const PUBLISH_QUEUE: usize = 65_536;
/// Most publications in one pipeline.
const PIPELINE_BATCH: usize = 1024;
/// Messages from Redis the client buffers for the broker before dropping
/// (counted): a second of a busy node's cross-node traffic.
const RECEIVE_BUFFER: usize = 65_536;
/// A Redis command that takes longer fails: a down Redis is then noticed
/// by publishers within this time, not after TCP gives up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: 50 ms doubling to 2 s, plus up to 100 ms of jitter so
/// the nodes of a cluster do not all reconnect at the same instant.
const BACKOFF_MIN_MS: u32 = 50;
const BACKOFF_MAX_MS: u32 = 2000;
const BACKOFF_JITTER_MS: u32 = 100;
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
    let mut redis = fred::prelude::Config::from_url(&config.redis_url).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cluster.redis_url `{}`: {e}", redact_url(&config.redis_url)),
        )
    })?;
    if let Some(path) = &config.tls_ca_file {
        redis.tls = Some(super::tls::trusting(path)?.into());
    }
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

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the bus owns for the life of the process.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; only adds O_NONBLOCK.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The broker's part in a graceful stop (see `Broker::check_drain`).
#[derive(Default)]
pub(super) struct Drain {
    /// Shards whose drain marker arrived.
    markers: usize,
    /// When the first came.
    since: Option<std::time::Instant>,
    /// Stream publications sent to Redis and not answered.
    pub(super) publishing: usize,
    /// Where Redis stands on every held stream was read.
    checked: bool,
    /// The broker's own marker went to the shards.
    sent: bool,
}

/// A batch of channel changes for the subscription task, sent on the
/// connection to Redis numbered `.0`.
type Batch = (u64, Vec<Change<Key>>);

/// The subscription task's answer to a batch: its connection's number, and
/// each change with whether Redis confirmed it.
type BatchDone = (u64, Vec<(Change<Key>, bool)>);

pub(super) struct Broker {
    me: ShardId,
    pub(super) shared: Shared,
    pub(super) bus: Arc<Bus>,
    pub(super) status: Arc<ClusterStatus>,
    pub(super) prefix: String,
    /// `{prefix}:ctl`: registry announcements.
    control_channel: String,
    /// Random id of this process: its own messages come back and are skipped.
    pub(super) node: u64,
    /// The names the node's shards hold, and their channels (see `cluster::interest`).
    pub(super) interest: Interest,
    pub(super) outbox: Outbox,
    /// Streams the node's shards hold (see `cluster::streams`).
    pub(super) relay: Relay<Opening>,
    /// Stream reads in flight, bounded (see `cluster::gate`).
    pub(super) reads: Gate<streams::ReadJob>,
    /// Presence queries to Redis in flight, bounded the same way.
    pub(super) presence_queries: Gate<streams::ReadJob>,
    /// The version of a Redis too old to serve a cluster.
    unsupported: Option<String>,
    stop: Arc<AtomicBool>,
    subscriber: Client,
    pub(super) publisher: Client,
    /// To the subscription task: one batch at a time.
    batches: mpsc::UnboundedSender<Batch>,
    batch_done: mpsc::UnboundedReceiver<BatchDone>,
    /// Connections to Redis so far.
    connections: u64,
    /// Whether Redis answers PINGs (see `cluster::liveness`).
    liveness: Liveness,
    /// The broker's part in a graceful stop.
    pub(super) drain: Drain,
    /// Keys given to this node's stream publications in a Redis Cluster
    /// so far (see `cluster::streams`).
    pub(super) replay_keys: u64,
    ping_done: mpsc::UnboundedSender<Pong>,
    ping_done_rx: mpsc::UnboundedReceiver<Pong>,
    /// Channel, message, and the bytes it holds of `max_queued_bytes`.
    publishes: mpsc::Sender<(String, Bytes, usize)>,
    pub(super) stream_publishes: mpsc::Sender<PublishJob>,
    pub(super) stream_done: mpsc::UnboundedSender<StreamDone>,
    stream_done_rx: mpsc::UnboundedReceiver<StreamDone>,
    /// Registry changes waiting for their announcement to come back.
    pub(super) registry: registry::Pending,
    pub(super) registry_done: mpsc::UnboundedSender<RegistryDone>,
    registry_done_rx: mpsc::UnboundedReceiver<RegistryDone>,
    /// This node's presence members (see `cluster::presence`).
    pub(super) members: presence::Members,
    pub(super) presence_ttl: Duration,
    pub(super) presence_done: mpsc::UnboundedSender<PresenceDone>,
    presence_done_rx: mpsc::UnboundedReceiver<PresenceDone>,
    /// The presence write in flight came back (ok or not).
    pub(super) presence_written: mpsc::UnboundedSender<bool>,
    presence_written_rx: mpsc::UnboundedReceiver<bool>,
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
        let clustered = redis.server.is_clustered();
        let client = |receive_buffer: usize| {
            let mut redis = redis.clone();
            // Retry the first connection too: Redis may start after us.
            redis.fail_fast = false;
            let mut policy = ReconnectPolicy::new_exponential(0, BACKOFF_MIN_MS, BACKOFF_MAX_MS, 2);
            policy.set_jitter(BACKOFF_JITTER_MS);
            Builder::from_config(redis)
                .set_policy(policy)
                .with_performance_config(|p| {
                    p.default_command_timeout = COMMAND_TIMEOUT;
                    p.broadcast_channel_capacity = receive_buffer;
                })
                .with_connection_config(|c| {
                    c.connection_timeout = COMMAND_TIMEOUT;
                    c.internal_command_timeout = COMMAND_TIMEOUT;
                    // A command in flight when the connection drops is not
                    // sent again on the next one: a publish could arrive
                    // twice. A Redis Cluster answers MOVED or ASK while its
                    // slots move (a failover, resharding), and following
                    // one is a second attempt; there, stream publications
                    // carry a key that makes a second run harmless.
                    c.max_command_attempts = if clustered { 3 } else { 1 };
                })
                .build()
        };
        let subscriber = client(RECEIVE_BUFFER)?;
        let publisher = client(16)?;
        subscriber.connect();
        publisher.connect();

        let (batches, batches_rx) = mpsc::unbounded_channel();
        let (batch_done_tx, batch_done) = mpsc::unbounded_channel();
        tokio::spawn(subscriptions(subscriber.clone(), batches_rx, batch_done_tx));
        let (ping_done, ping_done_rx) = mpsc::unbounded_channel();
        let (publishes, publishes_rx) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish(publisher.clone(), publishes_rx, status.clone()));
        let (stream_done, stream_done_rx) = mpsc::unbounded_channel();
        let wait = (config.wait_replicas > 0).then_some(streams::WaitReplicas {
            replicas: config.wait_replicas,
            // Under the command timeout, so WAIT answers before the client gives up.
            timeout_ms: (COMMAND_TIMEOUT / 2).as_millis() as u64,
        });
        let stream_publishes = streams::start(&publisher, stream_done.clone(), wait);
        let bus = shared.bus.clone();
        let (registry_done, registry_done_rx) = registry::channel();
        let (presence_done, presence_done_rx) = mpsc::unbounded_channel();
        let (presence_written, presence_written_rx) = mpsc::unbounded_channel();

        let mut node = [0u8; 8];
        getrandom::fill(&mut node).map_err(|e| Error::new(ErrorKind::IO, e.to_string()))?;
        Ok(Broker {
            me,
            outbox: Outbox::new(me, bus.members()),
            shared,
            relay: Relay::default(),
            reads: Gate::new(streams::READS_IN_FLIGHT),
            presence_queries: Gate::new(streams::READS_IN_FLIGHT),
            stream_publishes,
            stream_done,
            stream_done_rx,
            registry: registry::Pending::default(),
            registry_done,
            registry_done_rx,
            members: presence::Members::default(),
            presence_ttl: config.presence_ttl,
            presence_done,
            presence_done_rx,
            presence_written,
            presence_written_rx,
            bus,
            status,
            prefix: config.prefix.clone(),
            control_channel: registry::control_channel(&config.prefix),
            node: u64::from_le_bytes(node),
            interest: Interest::default(),
            unsupported: None,
            stop,
            subscriber,
            publisher,
            batches,
            batch_done,
            connections: 0,
            liveness: Liveness::new(config.health_timeout),
            drain: Drain::default(),
            replay_keys: 0,
            ping_done,
            ping_done_rx,
            publishes,
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
        let mut messages = self.subscriber.message_rx();
        let mut connected = self.subscriber.reconnect_rx();
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        let mut presence_refresh = tokio::time::interval(self.presence_ttl / 3);
        loop {
            tokio::select! {
                ready = waker.readable() => {
                    if let Ok(mut guard) = ready {
                        drain_eventfd(guard.get_inner().0);
                        guard.clear_ready();
                    }
                    self.bus.waker(self.me).rearm();
                    self.drain_bus();
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                message = messages.recv() => match message {
                    Ok(message) => self.on_message(message),
                    Err(broadcast::error::RecvError::Lagged(lost)) => {
                        tracing::warn!("cluster: {lost} messages from Redis dropped: the broker fell behind");
                        self.status.stats.drops_total.fetch_add(lost, Ordering::Relaxed);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                server = connected.recv() => {
                    if server.is_ok() {
                        if self.connections > 0 {
                            ClusterStatus::count(&self.status.stats.reconnects_total);
                        }
                        tracing::info!("cluster: connected to Redis; subscribing {} channels", self.interest.len());
                        self.check_version().await;
                        // A new connection holds no channel.
                        self.connections += 1;
                        self.interest.reconnected();
                        self.resubscribe_all(true);
                    }
                }
                Some(done) = self.batch_done.recv() => self.on_batch_done(done),
                Some(pong) = self.ping_done_rx.recv() => {
                    self.liveness.answer(std::time::Instant::now(), pong);
                }
                Some(done) = self.stream_done_rx.recv() => self.on_stream_done(done),
                Some(done) = self.registry_done_rx.recv() => self.on_registry_done(done),
                Some(done) = self.presence_done_rx.recv() => self.on_presence_answered(done),
                Some(ok) = self.presence_written_rx.recv() => self.on_presence_written(ok),
                _ = presence_refresh.tick() => self.refresh_presence(),
                _ = health.tick() => {
                    self.ping();
                    self.check_health();
                    if self.registry.reload && self.status.is_up() {
                        self.registry.reload = false;
                        self.load_registrations();
                    }
                }
            }
            self.check_drain();
            let waiting = self.reads.load().1 + self.presence_queries.load().1;
            self.status
                .stats
                .requests_waiting
                .store(waiting as u64, Ordering::Relaxed);
            self.outbox.retry_backlog(&self.bus);
            self.outbox.wake_all(&self.bus);
        }
        // Let the publish task send what the shards handed over.
        drop(self.publishes);
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, self.publisher.quit()).await;
    }

    /// The node is stopping: once every shard's drain marker has come (no
    /// publish is accepted after it), every stream publication this node
    /// acknowledged, and every one Redis had assigned when the drain began
    /// (acknowledged by any node), has gone out to the shards, the broker
    /// sends its own marker, and the shards close their connections. So no
    /// publication a publisher was told 202 for before the stop is missing
    /// for this node's subscribers. Bounded by half the shutdown timeout,
    /// for a Redis that stopped answering.
    fn check_drain(&mut self) {
        let Some(since) = self.drain.since else {
            return;
        };
        if self.drain.sent || self.drain.markers < self.bus.shards() {
            return;
        }
        if !self.drain.checked {
            // What Redis has assigned by now, whoever acknowledged it, is
            // forwarded before the node closes its subscribers.
            self.drain.checked = true;
            if self.status.is_up() {
                self.check_streams();
            }
        }
        // Streams behind get a fill: a publication's message may have
        // been missed, and the log has it.
        let behind = self.relay.catch_up();
        self.run_relay();
        let limit = self.shared.config.shutdown_timeout / 2;
        let done = self.drain.publishing == 0 && behind == 0;
        if !done && since.elapsed() < limit {
            return;
        }
        if !done {
            tracing::warn!(
                "cluster: stopping with stream publications not delivered here after {limit:?}: Redis does not answer"
            );
        }
        self.drain.sent = true;
        for shard in 0..self.bus.shards() {
            self.outbox
                .send(&self.bus, ShardId(shard), Envelope::Drained);
        }
    }

    fn redis_up(&self) -> bool {
        self.unsupported.is_none()
            && self.subscriber.is_connected()
            && self.publisher.is_connected()
    }

    /// Sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`) needs Redis 7: an older
    /// server would take the connection and silently deliver nothing
    /// across nodes, so the node stays degraded and says why.
    async fn check_version(&mut self) {
        let info = CustomCommand::new_static("INFO", ClusterHash::Random, false);
        let reply = self.publisher.custom::<String, _>(info, vec!["server"]);
        let Ok(Ok(info)) = tokio::time::timeout(COMMAND_TIMEOUT, reply).await else {
            return; // unknown: the connection is being lost again
        };
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 7 {
            tracing::error!(
                "cluster: Redis {version} has no sharded pub/sub; ringcast needs Redis 7 or newer; node {} stays degraded",
                self.status.node
            );
            self.unsupported = Some(version);
        } else {
            self.unsupported = None;
        }
    }

    /// Sends a PING if none is on its way: `/health` turns degraded within
    /// `health_timeout` of Redis not answering, even with its socket open.
    fn ping(&mut self) {
        if !self.redis_up() || !self.liveness.ping_due(std::time::Instant::now()) {
            return;
        }
        let client = self.publisher.clone();
        let done = self.ping_done.clone();
        tokio::spawn(async move {
            let pong = match client.ping::<Value>(None).await {
                Ok(_) => Pong::Answered,
                Err(e) if *e.kind() == ErrorKind::Timeout => Pong::TimedOut,
                Err(_) => Pong::Failed,
            };
            let _ = done.send(pong);
        });
    }

    fn check_health(&mut self) {
        let answering = self.redis_up() && self.liveness.alive(std::time::Instant::now());
        if answering && !self.interest.restoring() && self.interest.take_resync() {
            // A change failed, or Redis is back from a stall (the
            // connection held): every held channel is asked for again;
            // a node coming back counts as up only once they are confirmed.
            let gate = !self.status.is_up();
            self.resubscribe_all(gate);
        }
        let up = answering && !self.interest.restoring();
        if up != self.status.is_up() {
            if up {
                tracing::info!(
                    "cluster: Redis reachable; node {} back in the cluster",
                    self.status.node
                );
            } else {
                tracing::warn!(
                    "cluster: Redis unreachable; node {} serves its own clients only (degraded)",
                    self.status.node
                );
                // Nobody would confirm the subscribes in flight: release
                // their waiters now; reconnecting subscribes again.
                self.interest.lost();
                self.run_interest();
            }
            self.status.set_up(up);
            if up {
                // Members that came or went meanwhile, or a Redis that lost them.
                self.refresh_presence();
            }
        }
    }

    /// Takes what the shards sent. Publications go to Redis in the order
    /// the node accepted them (their `seq`), not queue by queue: passes
    /// repeat until one finds nothing, so a publication pushed before
    /// another that was taken is taken too, and the batch is sorted.
    fn drain_bus(&mut self) {
        let mut publications = Vec::new();
        let mut taken = 0;
        loop {
            let mut found = false;
            for from in 0..self.bus.shards() {
                while let Some(envelope) = self.bus.pop(ShardId(from), self.me) {
                    found = true;
                    taken += 1;
                    match envelope {
                        Envelope::ForNodes { .. } => publications.push(envelope),
                        other => self.on_envelope(ShardId(from), other),
                    }
                    if taken >= DRAIN_BOUND {
                        break;
                    }
                }
            }
            if !found || taken >= DRAIN_BOUND {
                break;
            }
        }
        publications.sort_by_key(|p| match p {
            Envelope::ForNodes { seq, .. } => *seq,
            _ => 0,
        });
        for publication in publications {
            self.send_to_redis(publication);
        }
        if taken >= DRAIN_BOUND {
            // More than the bound: come back after looking at Redis.
            self.bus.waker(self.me).signal();
        }
    }

    fn send_to_redis(&mut self, publication: Envelope) {
        let Envelope::ForNodes {
            kind,
            name,
            topic,
            frame,
            ..
        } = publication
        else {
            return;
        };
        // Counted by the shard against `max_queued_bytes` until Redis answers.
        let held = frame.len();
        let message = wire::encode(
            &self.prefix,
            self.node,
            kind,
            &name,
            topic.as_deref(),
            &frame,
        );
        let Some((channel, message)) = message else {
            self.status.release(held);
            return ClusterStatus::count(&self.status.stats.drops_total);
        };
        if self.publishes.try_send((channel, message, held)).is_err() {
            self.status.release(held);
            ClusterStatus::count(&self.status.stats.drops_total);
        }
    }

    fn on_envelope(&mut self, from: ShardId, envelope: Envelope) {
        match envelope {
            Envelope::Interest {
                kind,
                name,
                on,
                epoch,
            } => self.on_interest(from, kind, name, on, epoch),
            Envelope::StreamPublish {
                topic,
                event,
                payload,
                ticket,
                idempotency_key,
            } => self.on_stream_publish(from, topic, event, payload, ticket, idempotency_key),
            Envelope::StreamOpen {
                ticket,
                topic,
                since,
                mark_through,
            } => self.on_stream_open(from, ticket, topic, since, mark_through),
            Envelope::StreamQuery {
                ticket,
                topic,
                since,
                epoch,
                limit,
            } => self.on_stream_query(streams::Query {
                from,
                ticket,
                topic,
                since,
                epoch,
                limit,
            }),
            Envelope::Register {
                ticket,
                id,
                user,
                topics,
            } => self.on_register(from, ticket, id, user, topics),
            Envelope::Unregister { ticket, id } => self.on_unregister(from, ticket, id),
            Envelope::PresenceChange {
                topic,
                conn_id,
                meta,
            } => self.on_presence_change(topic, conn_id, meta),
            Envelope::PresenceQuery {
                ticket,
                topic,
                query,
            } => self.on_presence_query(from, ticket, topic, query),
            Envelope::Drained => {
                self.drain.markers += 1;
                self.drain.since.get_or_insert_with(std::time::Instant::now);
            }
            // Shards acknowledge the registrations the broker hands them; and
            // send the broker nothing else.
            _ => {}
        }
    }

    fn on_stream_done(&mut self, done: StreamDone) {
        match done {
            StreamDone::Published {
                from,
                ticket,
                topic,
                held,
                result,
            } => self.on_stream_published(from, ticket, topic, held, result),
            read => {
                self.read_done();
                match read {
                    StreamDone::Opened { opening, result } => {
                        self.on_stream_opened(opening, result)
                    }
                    StreamDone::Queried { query, result } => self.on_stream_queried(query, result),
                    StreamDone::Filled { topic, result } => self.on_stream_filled(topic, result),
                    StreamDone::Checked { topic, result } => self.on_stream_checked(topic, result),
                    StreamDone::Published { .. } => unreachable!("matched above"),
                }
            }
        }
    }

    fn on_interest(
        &mut self,
        from: ShardId,
        kind: IndexKind,
        name: Arc<str>,
        on: bool,
        epoch: u64,
    ) {
        let channel = wire::channel(&self.prefix, kind, &name);
        let key = (kind, name);
        if on {
            let up = self.status.is_up();
            self.interest.on(from, key, epoch, channel, up);
        } else {
            self.interest.off(from, key, channel);
        }
        self.run_interest();
    }

    /// Carries out what the interest table asks for.
    fn run_interest(&mut self) {
        for step in self.interest.take_steps() {
            match step {
                Step::Ack { to, key, epoch } => {
                    let ack = Envelope::InterestAck {
                        kind: key.0,
                        name: key.1,
                        epoch,
                    };
                    self.outbox.send(&self.bus, to, ack);
                }
                Step::Send { connection, batch } => {
                    let _ = self.batches.send((connection, batch));
                }
                Step::Forget(topic) => self.relay.forget(&topic),
            }
        }
        let stats = &self.status.stats;
        let waiting = self.interest.changes_waiting() as u64;
        stats.changes_waiting.store(waiting, Ordering::Relaxed);
        stats
            .channels
            .store(self.interest.len() as u64, Ordering::Relaxed);
    }

    fn on_batch_done(&mut self, (connection, done): BatchDone) {
        let restored = self.interest.batch_done(connection, done);
        self.run_interest();
        if restored {
            // Every channel is back: what went by meanwhile is read now,
            // and the node may count as up.
            self.check_streams();
            self.check_health();
        }
        // A failed change's resync waits for the next health check, so a
        // Redis that keeps refusing is asked again every 200 ms, no faster.
    }

    /// Asks for every held channel again; with `gate` (a new connection,
    /// or Redis back from a stall) the node counts as up only once they are
    /// confirmed, and reloads the registrations it may have missed.
    fn resubscribe_all(&mut self, gate: bool) {
        let control = self.control_channel.clone();
        let prefix = self.prefix.clone();
        self.interest
            .resubscribe_all(control, |key| wire::channel(&prefix, key.0, &key.1), gate);
        if gate {
            self.load_registrations();
        }
        self.run_interest();
    }

    fn on_message(&mut self, message: Message) {
        if *message.channel == *self.control_channel {
            if let Some(text) = message.value.as_bytes() {
                self.on_notice(text);
            }
            return;
        }
        let Some((kind, name)) = wire::parse_channel(&self.prefix, &message.channel) else {
            return;
        };
        let key = (kind, Arc::<str>::from(name));
        let Some(shards) = self.interest.holders(&key) else {
            return;
        };
        let Some(bytes) = message.value.into_bytes() else {
            return;
        };
        if kind == IndexKind::Topic && bytes.first() == Some(&b'S') {
            return self.on_stream_message(&key.1, &bytes);
        }
        let Some(received) = wire::decode(kind, &key.1, bytes) else {
            return;
        };
        if received.node == self.node {
            return;
        }
        self.deliver_to_shards(shards, received.envelope);
    }

    /// Queues a publication from another node to each of `shards` (a full
    /// queue drops it, counted).
    pub(super) fn deliver_to_shards(&mut self, shards: ShardSet, envelope: Envelope) {
        ClusterStatus::count(&self.status.stats.received_total);
        let mut envelope = Some(envelope);
        let mut targets = shards.iter().peekable();
        while let Some(to) = targets.next() {
            let this = if targets.peek().is_some() {
                clone_publication(envelope.as_ref().expect("kept for the last shard"))
            } else {
                envelope.take().expect("taken once")
            };
            if self.outbox.send(&self.bus, to, this) == Sent::Dropped {
                ClusterStatus::count(&self.status.stats.drops_total);
            }
        }
    }
}

/// Publication envelopes share their frame; cloning one is cheap.
fn clone_publication(envelope: &Envelope) -> Envelope {
    match envelope {
        Envelope::Publish { topic, frame } => Envelope::Publish {
            topic: topic.clone(),
            frame: frame.clone(),
        },
        Envelope::UserPublish { user, topic, frame } => Envelope::UserPublish {
            user: user.clone(),
            topic: topic.clone(),
            frame: frame.clone(),
        },
        Envelope::Chat { user, frame } => Envelope::Chat {
            user: user.clone(),
            frame: frame.clone(),
        },
        _ => unreachable!("only publications come from Redis"),
    }
}

/// Sends each batch of subscription changes pipelined (the client writes
/// them without waiting for answers; one change per channel in a batch, so
/// their order within it does not matter) and answers once all are
/// confirmed or failed. Batches go one at a time, in order.
async fn subscriptions(
    client: Client,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    done: mpsc::UnboundedSender<BatchDone>,
) {
    while let Some((connection, batch)) = batches.recv().await {
        let results = futures_util::future::join_all(batch.iter().map(|change| {
            let channel = change.channel.clone();
            let client = &client;
            async move {
                if change.subscribe {
                    client.ssubscribe(channel).await
                } else {
                    client.sunsubscribe(channel).await
                }
            }
        }))
        .await;
        let answered = batch
            .into_iter()
            .zip(results)
            .map(|(change, result)| {
                if let Err(e) = &result {
                    // Asked again once Redis answers (`resync`).
                    tracing::debug!(
                        "cluster: {} {} failed: {e}",
                        if change.subscribe {
                            "SSUBSCRIBE"
                        } else {
                            "SUNSUBSCRIBE"
                        },
                        change.channel
                    );
                }
                (change, result.is_ok())
            })
            .collect();
        let _ = done.send((connection, answered));
    }
}

/// Sends publications in pipelines, in the order the shards handed them over.
async fn publish(
    client: Client,
    mut queue: mpsc::Receiver<(String, Bytes, usize)>,
    status: Arc<ClusterStatus>,
) {
    let mut batch = Vec::with_capacity(PIPELINE_BATCH);
    while queue.recv_many(&mut batch, PIPELINE_BATCH).await > 0 {
        let pipeline = client.pipeline();
        let mut queued = 0u64;
        let mut held = 0;
        for (channel, message, bytes) in batch.drain(..) {
            held += bytes;
            let ok: Result<(), Error> = pipeline.spublish(channel, message).await;
            if ok.is_ok() {
                queued += 1;
            } else {
                ClusterStatus::count(&status.stats.drops_total);
            }
        }
        let results: Vec<Result<Value, Error>> = pipeline.try_all().await;
        let sent = results.iter().filter(|r| r.is_ok()).count() as u64;
        status
            .stats
            .published_total
            .fetch_add(sent, Ordering::Relaxed);
        status
            .stats
            .drops_total
            .fetch_add(queued.saturating_sub(sent), Ordering::Relaxed);
        status.release(held);
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
