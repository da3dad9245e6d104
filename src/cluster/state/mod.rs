//! The broker's decisions as plain data, built like a shard's state:
//! events in (envelopes from the shards, Redis's answers and messages, the
//! health timer), operations out (envelopes for the shards, commands for
//! Redis), time as an argument.
//!
//! The driver (`cluster::broker`) carries the operations out with a Redis
//! client and feeds back what came of them; the simulation
//! (`cluster::sim`) does the same against a fake Redis that stalls, drops
//! connections and restarts, with several nodes' states at once. What is in
//! flight is bounded here, not by the driver: stream publications by
//! `PUBLISH_QUEUE`, reads and presence queries (questions to the other
//! nodes among them) by their gates, presence writes one at a time,
//! channel changes and Pusher members' commands one batch at a time.

mod member_events;
mod node_queries;
mod presence;
mod registry;
mod streams;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bus::{self, Envelope, IndexKind, MemberQuery, ShardId, ShardSet};
use crate::shard::Shared;

use super::gate::Gate;
use super::interest::{Interest, Key, Step};
use super::liveness::{Liveness, Pong};
use super::presence::{Members, TopicWrite};
use super::relay::Relay;
use super::subscriptions::Change;
use super::wire;
use super::ClusterStatus;

pub(super) use member_events::{MemberAnswer, MemberCommand, Outcome};
pub(super) use registry::{control_channel, RegistryWrite};
pub(super) use streams::{Failure, PublishAnswer, Read, ReadFrom, ReadRequest, StreamPublication};

/// Stream publications waiting for Redis, per node; past it a publish gets
/// 503 (`cluster busy`). Their bytes are bounded by `max_queued_bytes`.
pub(super) const PUBLISH_QUEUE: usize = 16_384;
/// Stream reads (and, separately, presence queries) in flight at most;
/// more wait their turn.
pub(super) const READS_IN_FLIGHT: usize = 256;

/// What happened, for the broker to decide on.
pub(super) enum Event {
    /// Envelopes taken from the shards' queues in one wake-up, in the
    /// order taken, each with its sender.
    FromShards(Vec<(ShardId, Envelope)>),
    /// A message on a channel the node subscribed.
    Message { channel: String, bytes: Bytes },
    /// The client's buffer of messages overflowed: `lost` were dropped.
    Lagged { lost: u64 },
    /// A new connection to Redis (it holds no channel). `unsupported`
    /// names the version of a Redis too old to serve a cluster.
    Connected { unsupported: Option<String> },
    /// The health timer: whether the client's connections are open.
    Tick { connected: bool },
    /// A batch of channel changes came back, on connection `connection`,
    /// each with whether Redis confirmed it.
    Subscribed {
        connection: u64,
        changes: Vec<(Change<Key>, bool)>,
    },
    /// What became of the PING sent last.
    Pong(Pong),
    /// A stream publication's answer.
    Published {
        answer: PublishAnswer,
        result: Result<crate::engine::Position, Failure>,
    },
    /// A stream read's answer (`ReadRequest::id`).
    Read {
        id: u64,
        result: Result<Read, String>,
    },
    /// A registration was stored or deleted and announced (`ok`), or
    /// that failed (Redis may have done it or not).
    RegistryWritten {
        from: ShardId,
        ticket: u64,
        id: String,
        ok: bool,
    },
    /// Registrations read from Redis, and whether the read was complete.
    RegistrationsLoaded {
        after: u64,
        found: Vec<(String, String, Vec<String>)>,
        complete: bool,
    },
    /// The presence write in flight came back (ok or not).
    PresenceWritten(bool),
    /// A presence query's answer: the other nodes' members.
    PresenceAnswered {
        from: ShardId,
        ticket: u64,
        members: bus::Members,
    },
    /// Question `id` was published to the nodes: `receivers` heard it
    /// (`None`: the command failed).
    NodesAsked { id: u64, receivers: Option<usize> },
    /// The member commands in flight were answered, in order (`None`:
    /// the batch failed).
    MembersDecided(Option<Vec<MemberAnswer>>),
}

/// What the broker asks its driver to do.
pub(super) enum Op {
    /// An envelope for a shard of this node.
    ToShard { to: ShardId, envelope: Envelope },
    /// Channel changes, pipelined, on connection `connection`; answered
    /// by `Event::Subscribed`. One batch at a time.
    Subscriptions {
        connection: u64,
        changes: Vec<Change<Key>>,
    },
    /// A publication for the other nodes (`SPUBLISH`), holding `held`
    /// bytes of `max_queued_bytes` until Redis answers; no event back.
    Publish {
        channel: String,
        message: Bytes,
        held: usize,
    },
    /// A stream publication (the publish script); answered by `Event::Published`.
    StreamPublish(StreamPublication),
    /// A read of a stream's log (the read script); answered by `Event::Read`.
    Read(ReadRequest),
    /// Store or delete a registration and announce it; answered by
    /// `Event::RegistryWritten`.
    WriteRegistration(RegistryWrite),
    /// Read every registration; answered by `Event::RegistrationsLoaded`
    /// with the same `after` (the registry changes this node had seen when
    /// it asked).
    LoadRegistrations { after: u64 },
    /// Write these presence changes; answered by `Event::PresenceWritten`.
    WritePresence(Vec<TopicWrite>),
    /// Read the other nodes' members of a topic; answered by `Event::PresenceAnswered`.
    QueryPresence(PresenceQuery),
    /// A question for the other nodes (`SPUBLISH` on the control channel);
    /// answered by `Event::NodesAsked`, and then by the nodes' messages.
    AskNodes { id: u64, message: Bytes },
    /// An answer to another node's question (`SPUBLISH` on the control
    /// channel); no event back.
    AnswerNode { message: Bytes },
    /// Pusher presence members' commands, in order; answered by
    /// `Event::MembersDecided`. One batch at a time.
    DecideMembers(Vec<MemberCommand>),
    /// PING; answered by `Event::Pong`.
    Ping,
}

/// A shard's presence query, for the other nodes' members.
pub(super) struct PresenceQuery {
    pub(super) from: ShardId,
    pub(super) ticket: u64,
    pub(super) topic: Arc<str>,
    pub(super) query: MemberQuery,
}

/// The broker's part in a graceful stop (see `BrokerState::check_drain`).
#[derive(Default)]
struct Drain {
    /// Shards whose drain marker arrived.
    markers: usize,
    /// When the first came.
    since: Option<Instant>,
    /// Where Redis stands on every held stream was read.
    checked: bool,
    /// The broker's own marker went to the shards.
    sent: bool,
}

/// One node's broker, as plain data.
pub(super) struct BrokerState {
    shared: Shared,
    status: Arc<ClusterStatus>,
    shards: usize,
    prefix: String,
    /// `{prefix}:ctl`: registry announcements.
    control_channel: String,
    /// Random id of this process: its own messages come back and are skipped.
    node: u64,
    /// Redis is a Redis Cluster: a command may run twice (see `streams`).
    clustered: bool,
    presence_ttl: Duration,
    /// The names the node's shards hold, and their channels.
    interest: Interest,
    /// Streams the node's shards hold.
    relay: Relay<streams::Opening>,
    /// Stream reads in flight, bounded, and what each is for.
    reads: Gate<ReadRequest>,
    read_for: HashMap<u64, streams::ReadFor>,
    next_read: u64,
    /// Presence queries in flight, bounded the same way (those for the
    /// other nodes too).
    presence_queries: Gate<PresenceQuery>,
    /// Questions to the other nodes, and theirs to this one.
    node_queries: node_queries::NodeQueries,
    /// Pusher presence members' transitions and refreshes for Redis.
    member_events: member_events::MemberEvents,
    /// Registry changes waiting for their announcement to come back.
    registry: registry::Pending,
    /// This node's presence members.
    members: Members,
    /// When every member is rewritten next (a third of the TTL).
    presence_refresh: Option<Instant>,
    /// Whether Redis answers PINGs.
    liveness: Liveness,
    /// The client's connections are open (as of the last tick).
    connected: bool,
    /// The version of a Redis too old to serve a cluster.
    unsupported: Option<String>,
    /// Connections to Redis so far.
    connections: u64,
    /// Stream publications sent to Redis and not answered.
    publishing: usize,
    drain: Drain,
    /// Keys given to this node's stream publications in a Redis Cluster.
    replay_keys: u64,
    ops: Vec<Op>,
}

/// How one node's broker is set up.
pub(super) struct Setup {
    pub(super) prefix: String,
    pub(super) node: u64,
    pub(super) clustered: bool,
    pub(super) presence_ttl: Duration,
    pub(super) health_timeout: Duration,
}

impl BrokerState {
    pub(super) fn new(shared: Shared, status: Arc<ClusterStatus>, setup: Setup) -> BrokerState {
        let shards = shared.bus.shards();
        BrokerState {
            shared,
            status,
            shards,
            control_channel: control_channel(&setup.prefix),
            prefix: setup.prefix,
            node: setup.node,
            clustered: setup.clustered,
            presence_ttl: setup.presence_ttl,
            interest: Interest::default(),
            relay: Relay::default(),
            reads: Gate::new(READS_IN_FLIGHT),
            read_for: HashMap::new(),
            next_read: 0,
            presence_queries: Gate::new(READS_IN_FLIGHT),
            node_queries: node_queries::NodeQueries::default(),
            member_events: member_events::MemberEvents::default(),
            registry: registry::Pending::default(),
            members: Members::default(),
            presence_refresh: None,
            liveness: Liveness::new(setup.health_timeout),
            connected: false,
            unsupported: None,
            connections: 0,
            publishing: 0,
            drain: Drain::default(),
            replay_keys: 0,
            ops: Vec::new(),
        }
    }

    /// The operations decided so far, in order.
    pub(super) fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// Reads and presence queries: (in flight, waiting).
    pub(super) fn requests(&self) -> (usize, usize) {
        let (reads, presence) = (self.reads.load(), self.presence_queries.load());
        (reads.0 + presence.0, reads.1 + presence.1)
    }

    /// No question to or from the other nodes, and no member command,
    /// waits or flies.
    #[cfg(test)]
    pub(super) fn questions_and_members_idle(&self) -> bool {
        self.node_queries.idle() && self.member_events.idle()
    }

    pub(super) fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::FromShards(envelopes) => self.on_shard_envelopes(envelopes, now),
            Event::Message { channel, bytes } => self.on_message(&channel, bytes),
            Event::Lagged { lost } => self.on_lagged(lost),
            Event::Connected { unsupported } => self.on_connected(unsupported),
            Event::Tick { connected } => {
                self.connected = connected;
                self.ping(now);
                self.check_health(now);
                if self.status.is_up() {
                    self.relay.check_due();
                    self.run_relay();
                }
                if self.registry.reload && self.status.is_up() {
                    self.registry.reload = false;
                    self.load_registrations();
                }
                self.expire_node_queries(now);
                self.check_member_events();
                let refresh = *self.presence_refresh.get_or_insert(now);
                if now >= refresh {
                    self.presence_refresh = Some(now + self.presence_ttl / 3);
                    self.refresh_presence();
                }
            }
            Event::Subscribed {
                connection,
                changes,
            } => self.on_subscribed(connection, changes, now),
            Event::Pong(pong) => self.liveness.answer(now, pong),
            Event::Published { answer, result } => self.on_stream_published(answer, result),
            Event::Read { id, result } => self.on_read(id, result),
            Event::RegistryWritten {
                from,
                ticket,
                id,
                ok,
            } => self.on_registry_written(from, ticket, &id, ok),
            Event::RegistrationsLoaded {
                after,
                found,
                complete,
            } => self.on_registrations_loaded(after, found, complete),
            Event::PresenceWritten(ok) => self.on_presence_written(ok),
            Event::PresenceAnswered {
                from,
                ticket,
                members,
            } => self.presence_answered(from, ticket, members),
            Event::NodesAsked { id, receivers } => self.on_nodes_asked(id, receivers),
            Event::MembersDecided(answers) => self.on_members_decided(answers),
        }
        self.check_drain(now);
        let waiting = self.requests().1;
        let stats = &self.status.stats;
        stats
            .requests_waiting
            .store(waiting as u64, Ordering::Relaxed);
        debug_assert!(
            self.publishing <= PUBLISH_QUEUE,
            "stream publications past their bound"
        );
        debug_assert!(
            self.requests().0 <= 2 * READS_IN_FLIGHT,
            "requests in flight past their gates"
        );
    }

    fn send(&mut self, to: ShardId, envelope: Envelope) {
        debug_assert!(to.0 < self.shards, "an envelope for a shard that is not");
        self.ops.push(Op::ToShard { to, envelope });
    }

    fn redis_up(&self) -> bool {
        self.unsupported.is_none() && self.connected
    }

    fn on_connected(&mut self, unsupported: Option<String>) {
        if self.connections > 0 {
            ClusterStatus::count(&self.status.stats.reconnects_total);
        }
        tracing::info!(
            "cluster: connected to Redis; subscribing {} channels",
            self.interest.len()
        );
        if let Some(version) = &unsupported {
            tracing::error!(
                "cluster: Redis {version} has no sharded pub/sub; ringcast needs Redis 7 or newer; node {} stays degraded",
                self.status.node
            );
        }
        self.unsupported = unsupported;
        self.connected = true;
        self.connections += 1;
        self.interest.reconnected();
        self.resubscribe_all(true);
    }

    /// The node is stopping: once every shard's drain marker has come (no
    /// publish is accepted after it), every stream publication this node
    /// acknowledged, and every one Redis had assigned when the drain began
    /// (acknowledged by any node), has gone out to the shards, the broker
    /// sends its own marker, and the shards close their connections. So no
    /// publication a publisher was told 202 for before the stop is missing
    /// for this node's subscribers. Bounded by half the shutdown timeout,
    /// for a Redis that stopped answering.
    fn check_drain(&mut self, now: Instant) {
        let Some(since) = self.drain.since else {
            return;
        };
        if self.drain.sent || self.drain.markers < self.shards {
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
        let done = self.publishing == 0 && behind == 0;
        if !done && now.duration_since(since) < limit {
            return;
        }
        if !done {
            tracing::warn!(
                "cluster: stopping with stream publications not delivered here after {limit:?}: Redis does not answer"
            );
        }
        self.drain.sent = true;
        for shard in 0..self.shards {
            self.send(ShardId(shard), Envelope::Drained);
        }
    }

    /// Asks for a PING if none is on its way: `/health` turns degraded
    /// within `health_timeout` of Redis not answering, even with its
    /// socket open.
    fn ping(&mut self, now: Instant) {
        if self.redis_up() && self.liveness.ping_due(now) {
            self.ops.push(Op::Ping);
        }
    }

    fn check_health(&mut self, now: Instant) {
        let answering = self.redis_up() && self.liveness.alive(now);
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

    /// What the shards sent. Publications go to Redis in the order the
    /// node accepted them (their `seq`), not queue by queue.
    fn on_shard_envelopes(&mut self, envelopes: Vec<(ShardId, Envelope)>, now: Instant) {
        let mut publications = Vec::new();
        for (from, envelope) in envelopes {
            match envelope {
                Envelope::ForNodes { .. } => publications.push(envelope),
                other => self.on_envelope(from, other, now),
            }
        }
        publications.sort_by_key(|p| match p {
            Envelope::ForNodes { seq, .. } => *seq,
            _ => 0,
        });
        for publication in publications {
            self.send_to_redis(publication);
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
        self.ops.push(Op::Publish {
            channel,
            message,
            held,
        });
    }

    fn on_envelope(&mut self, from: ShardId, envelope: Envelope, now: Instant) {
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
            } => self.on_presence_query(PresenceQuery {
                from,
                ticket,
                topic,
                query,
            }),
            Envelope::MemberTransition {
                ticket,
                topic,
                user,
                meta,
                joined,
                frame,
            } => {
                let transition = member_events::Transition {
                    topic,
                    user,
                    meta,
                    joined,
                    frame,
                };
                self.on_member_transition((from, ticket), transition)
            }
            Envelope::PresenceReply { ticket, members } if self.node_queries.counts(ticket) => {
                self.on_shard_counted(ticket, *members)
            }
            Envelope::Drained => {
                self.drain.markers += 1;
                self.drain.since.get_or_insert(now);
            }
            // Shards acknowledge the registrations the broker hands them, and
            // answer its questions (above); they send the broker nothing else.
            _ => {}
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
                    self.send(to, ack);
                }
                Step::Send { connection, batch } => self.ops.push(Op::Subscriptions {
                    connection,
                    changes: batch,
                }),
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

    fn on_subscribed(&mut self, connection: u64, changes: Vec<(Change<Key>, bool)>, now: Instant) {
        // A stream whose channel Redis holds again may have missed
        // messages meanwhile: where Redis stands is read, and the gap filled.
        let streams: Vec<Arc<str>> = changes
            .iter()
            .filter(|(c, ok)| *ok && c.subscribe && c.key.0 == IndexKind::Topic)
            .map(|(c, _)| c.key.1.clone())
            .collect();
        let restored = self.interest.batch_done(connection, changes);
        self.run_interest();
        for topic in &streams {
            self.relay.check(topic);
        }
        self.run_relay();
        if restored {
            // Every channel is back, the control channel too: what went by
            // meanwhile is read now (streams, and the registrations, whose
            // announcements are heard again from here on), and the node
            // may count as up.
            self.load_registrations();
            self.check_streams();
            self.check_health(now);
        }
        // A failed change's resync waits for the next health check, so a
        // Redis that keeps refusing is asked again every tick, no faster.
    }

    /// Asks for every held channel again; with `gate` (a new connection,
    /// or Redis back from a stall) the node counts as up only once they are
    /// confirmed, and then reloads the registrations it may have missed.
    fn resubscribe_all(&mut self, gate: bool) {
        let control = self.control_channel.clone();
        let prefix = self.prefix.clone();
        self.interest
            .resubscribe_all(control, |key| wire::channel(&prefix, key.0, &key.1), gate);
        self.run_interest();
    }

    fn on_message(&mut self, channel: &str, bytes: Bytes) {
        if channel == self.control_channel {
            if bytes.first() == Some(&b'{') {
                return self.on_notice(&bytes);
            }
            return self.on_node_message(&bytes);
        }
        let Some((kind, name)) = wire::parse_channel(&self.prefix, channel) else {
            return;
        };
        let key = (kind, Arc::<str>::from(name));
        let Some(shards) = self.interest.holders(&key) else {
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

    /// Messages from Redis were dropped before the broker read them (it
    /// fell behind): plain publications among them are lost (counted);
    /// streams are read again and their gaps filled, and registrations
    /// reloaded, since an announcement may have been among them.
    fn on_lagged(&mut self, lost: u64) {
        tracing::warn!("cluster: {lost} messages from Redis dropped: the broker fell behind");
        let stats = &self.status.stats;
        stats.drops_total.fetch_add(lost, Ordering::Relaxed);
        self.registry.reload = true;
        if self.status.is_up() {
            self.check_streams();
        } else {
            // Asked once Redis answers again (the health tick).
            self.relay.check_all_later();
        }
    }

    /// Queues a publication from another node to each of `shards`.
    fn deliver_to_shards(&mut self, shards: ShardSet, envelope: Envelope) {
        ClusterStatus::count(&self.status.stats.received_total);
        let mut envelope = Some(envelope);
        let mut targets = shards.iter().peekable();
        while let Some(to) = targets.next() {
            let this = if targets.peek().is_some() {
                clone_publication(envelope.as_ref().expect("kept for the last shard"))
            } else {
                envelope.take().expect("taken once")
            };
            self.send(to, this);
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
