//! One simulated node: the real `BrokerState`, a model of its Redis client
//! (fred: commands on two connections, timeouts, reconnection) and a model
//! of its shards that speaks the bus exactly as shards do and checks what
//! the broker sends them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bus::{self, Envelope, IndexKind, MemberQuery, ShardId};
use crate::cluster::liveness::Pong;
use crate::cluster::state::{BrokerState, Event, Failure, Op, PublishAnswer};
use crate::cluster::ClusterStatus;
use crate::protocol::message;

/// fred's command timeout, as the driver sets it.
pub(super) const COMMAND_TIMEOUT: Duration = crate::cluster::redis::COMMAND_TIMEOUT;

/// The node's two connections to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Conn {
    /// SSUBSCRIBE and the messages of the subscribed channels.
    Sub = 0,
    /// Everything else.
    Pub = 1,
}

/// Something Redis sent a node, in the order it was sent on its connection.
pub(super) enum Incoming {
    Reply(u64, Option<Event>),
    Message(String, Bytes),
    /// Where the client dropped messages its buffer could not hold.
    Lagged,
}

/// How a command that got no answer is reported.
enum Unanswered {
    Subscriptions(
        u64,
        Vec<crate::cluster::subscriptions::Change<crate::cluster::interest::Key>>,
    ),
    Publish(usize),
    StreamPublish(PublishAnswer),
    Read(u64),
    Registry(ShardId, u64, String),
    Load(u64),
    PresenceWrite,
    PresenceQuery(ShardId, u64),
    AskNodes(u64),
    Members,
    /// A message with no answer to wait for.
    Told,
    Ping,
}

impl Unanswered {
    fn of(op: &Op) -> Unanswered {
        match op {
            Op::ToShard { .. } => unreachable!("not a command"),
            Op::Subscriptions {
                connection,
                changes,
            } => Unanswered::Subscriptions(*connection, changes.clone()),
            Op::Publish { held, .. } => Unanswered::Publish(*held),
            Op::StreamPublish(p) => Unanswered::StreamPublish(p.answer.clone()),
            Op::Read(r) => Unanswered::Read(r.id),
            Op::WriteRegistration(w) => Unanswered::Registry(w.from, w.ticket, w.id.clone()),
            Op::LoadRegistrations { after } => Unanswered::Load(*after),
            Op::WritePresence(_) => Unanswered::PresenceWrite,
            Op::QueryPresence(q) => Unanswered::PresenceQuery(q.from, q.ticket),
            Op::AskNodes { id, .. } => Unanswered::AskNodes(*id),
            Op::AnswerNode { .. } => Unanswered::Told,
            Op::DecideMembers(_) => Unanswered::Members,
            Op::Ping => Unanswered::Ping,
        }
    }

    /// The error the client reports: a timeout, or a dropped connection.
    fn failed(self, timed_out: bool, status: &ClusterStatus) -> Option<Event> {
        let why = if timed_out {
            "timed out"
        } else {
            "connection closed"
        };
        Some(match self {
            Unanswered::Subscriptions(connection, changes) => Event::Subscribed {
                connection,
                changes: changes.into_iter().map(|c| (c, false)).collect(),
            },
            Unanswered::Publish(held) => {
                status.release(held);
                return None;
            }
            Unanswered::StreamPublish(answer) => Event::Published {
                answer,
                result: Err(Failure::Unknown(why.to_string())),
            },
            Unanswered::Read(id) => Event::Read {
                id,
                result: Err(why.to_string()),
            },
            Unanswered::Registry(from, ticket, id) => Event::RegistryWritten {
                from,
                ticket,
                id,
                ok: false,
            },
            Unanswered::Load(after) => Event::RegistrationsLoaded {
                after,
                found: Vec::new(),
                complete: false,
            },
            Unanswered::PresenceWrite => Event::PresenceWritten(false),
            Unanswered::PresenceQuery(from, ticket) => Event::PresenceAnswered {
                from,
                ticket,
                members: Default::default(),
            },
            Unanswered::AskNodes(id) => Event::NodesAsked {
                id,
                receivers: None,
            },
            Unanswered::Members => Event::MembersDecided(None),
            Unanswered::Told => return None,
            Unanswered::Ping => Event::Pong(if timed_out {
                Pong::TimedOut
            } else {
                Pong::Failed
            }),
        })
    }
}

/// A command the client sent, waiting for its answer.
struct Outstanding {
    issued: Instant,
    unanswered: Unanswered,
}

/// The node's Redis client, as fred behaves for the driver.
pub(super) struct Client {
    pub(super) connected: bool,
    /// When it connects again, once Redis takes connections.
    pub(super) reconnect_at: Option<Instant>,
    next_id: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    /// Issued while disconnected: written once connected (fred queues
    /// them), unless they time out first; a timed-out one may still go.
    pub(super) unsent: VecDeque<(u64, Conn, Op)>,
    /// Commands written to Redis, per connection, not executed yet.
    pub(super) to_redis: [VecDeque<(u64, Op)>; 2],
    /// What Redis sent back, per connection, not read yet.
    pub(super) from_redis: [VecDeque<Incoming>; 2],
}

/// A holder of a stream topic on one shard: one subscriber.
#[derive(Debug, Clone)]
pub(super) enum Holder {
    /// Interest sent (round `round`), waiting for its acknowledgement.
    Joining { round: u64 },
    /// Its open is asked for.
    Opening {
        ticket: u64,
        since: Option<(u64, Arc<str>)>,
    },
    /// Receiving: the run (unknown when the node had none to give) and the
    /// last offset received.
    Live { epoch: Option<Arc<str>>, last: u64 },
}

/// A subscriber of a plain topic (no history) on one shard.
#[derive(Debug, Clone, Default)]
pub(super) struct PlainHolder {
    round: u64,
    /// Acknowledged; when, if the node was up and connected then.
    pub(super) acked: Option<Option<Instant>>,
    /// The publications it got.
    pub(super) got: HashSet<String>,
}

/// A plain publication handed to the broker: its topic, id, and when (the
/// node was up then).
#[derive(Debug, Clone)]
pub(super) struct PlainPublication {
    pub(super) topic: Arc<str>,
    pub(super) id: String,
    pub(super) at: Instant,
}

/// A stream publication a publisher was answered for.
#[derive(Debug, Clone)]
pub(super) struct Acked {
    pub(super) topic: Arc<str>,
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    pub(super) id: String,
    /// Restarts of Redis that lost its data before the answer.
    pub(super) losses: u64,
}

/// A publication waiting for its answer, or to be retried.
#[derive(Debug, Clone)]
pub(super) struct Publication {
    pub(super) topic: Arc<str>,
    pub(super) id: String,
    pub(super) key: Option<String>,
}

/// The node's shards, as the broker sees them through the bus.
pub(super) struct Shards {
    pub(super) count: usize,
    pub(super) holders: HashMap<(usize, Arc<str>), Holder>,
    /// Subscribers of plain topics (`t:N`).
    pub(super) plain: HashMap<(usize, Arc<str>), PlainHolder>,
    /// Plain publications this node handed to the broker.
    pub(super) plain_published: Vec<PlainPublication>,
    rounds: HashMap<(usize, Arc<str>), u64>,
    /// Where a holder that left stood, to recover from.
    left: HashMap<(usize, Arc<str>), (u64, Arc<str>)>,
    next_ticket: u64,
    pub(super) publishing: HashMap<u64, Publication>,
    /// Answered 504 with a key: retried with the same key.
    pub(super) unknown: Vec<Publication>,
    pub(super) acked: Vec<Acked>,
    /// Registrations every shard of the node holds.
    pub(super) registrations: HashSet<String>,
    pub(super) registering: HashMap<u64, String>,
    /// This node's presence members: topic -> conn id -> meta.
    pub(super) members: HashMap<Arc<str>, BTreeMap<String, String>>,
    pub(super) queries: HashSet<u64>,
    /// Of those, the questions for the other nodes' subscribers.
    pub(super) subscriber_queries: HashSet<u64>,
    /// Pusher presence transitions sent to the broker, by ticket: the
    /// channel's topic, the user, and whether it came.
    pub(super) deciding: HashMap<u64, (Arc<str>, String, bool)>,
    pub(super) drained: Vec<bool>,
    /// Envelopes the shards send once the broker's current event is
    /// handled (a shard sends from its own loop, not from the broker's).
    outbox: VecDeque<(usize, Envelope)>,
    /// Whether the next open recovers from where a subscriber left.
    pub(super) recover: bool,
    pub(super) stats: NodeStats,
}

/// What a node's run exercised.
#[derive(Debug, Default, Clone)]
pub(super) struct NodeStats {
    pub(super) pushes: usize,
    pub(super) resets: usize,
    pub(super) recovered: usize,
    pub(super) not_recovered: usize,
    pub(super) acked: usize,
    pub(super) refused: usize,
    pub(super) unknown: usize,
    pub(super) deduplicated: usize,
    /// Subscriber counts answered with another node's subscribers.
    pub(super) counted_elsewhere: usize,
}

pub(super) struct Node {
    pub(super) name: String,
    pub(super) state: BrokerState,
    pub(super) status: Arc<ClusterStatus>,
    pub(super) client: Client,
    pub(super) shards: Shards,
    /// When the node last read a PING's answer: health is judged from it.
    pub(super) last_pong: Option<Instant>,
}

impl Node {
    pub(super) fn new(
        name: String,
        state: BrokerState,
        status: Arc<ClusterStatus>,
        shards: usize,
    ) -> Node {
        Node {
            name,
            state,
            status,
            client: Client {
                connected: false,
                reconnect_at: None,
                next_id: 0,
                outstanding: BTreeMap::new(),
                unsent: VecDeque::new(),
                to_redis: [VecDeque::new(), VecDeque::new()],
                from_redis: [VecDeque::new(), VecDeque::new()],
            },
            last_pong: None,
            shards: Shards {
                count: shards,
                holders: HashMap::new(),
                plain: HashMap::new(),
                plain_published: Vec::new(),
                rounds: HashMap::new(),
                left: HashMap::new(),
                next_ticket: 0,
                publishing: HashMap::new(),
                unknown: Vec::new(),
                acked: Vec::new(),
                registrations: HashSet::new(),
                registering: HashMap::new(),
                members: HashMap::new(),
                queries: HashSet::new(),
                subscriber_queries: HashSet::new(),
                deciding: HashMap::new(),
                drained: vec![false; shards],
                outbox: VecDeque::new(),
                recover: false,
                stats: NodeStats::default(),
            },
        }
    }

    /// Feeds the state one event and carries out its operations (and what
    /// the shards send in answer); the shards' findings go to `checks`.
    pub(super) fn handle(&mut self, event: Event, now: Instant, checks: &mut Checks) {
        self.state.handle(event, now);
        self.carry_out(now, checks);
        while let Some((shard, envelope)) = self.shards.outbox.pop_front() {
            let event = Event::FromShards(vec![(ShardId(shard), envelope)]);
            self.state.handle(event, now);
            self.carry_out(now, checks);
        }
    }

    fn carry_out(&mut self, now: Instant, checks: &mut Checks) {
        for op in self.state.take_ops() {
            match op {
                Op::ToShard { to, envelope } => {
                    let before = checks.failures.len();
                    self.shard_receives(to, envelope, now, checks);
                    for failure in &mut checks.failures[before..] {
                        *failure = format!("{}: {failure}", self.name);
                    }
                }
                op => self.issue(op, now),
            }
        }
    }

    /// The client sends a command (or queues it while disconnected).
    fn issue(&mut self, op: Op, now: Instant) {
        let conn = match op {
            Op::Subscriptions { .. } => Conn::Sub,
            _ => Conn::Pub,
        };
        let client = &mut self.client;
        client.next_id += 1;
        let id = client.next_id;
        super::trace(|| format!("  {} issues {id}: {}", self.name, super::describe(&op)));
        let unanswered = Unanswered::of(&op);
        client.outstanding.insert(
            id,
            Outstanding {
                issued: now,
                unanswered,
            },
        );
        if client.connected {
            client.to_redis[conn as usize].push_back((id, op));
        } else {
            client.unsent.push_back((id, conn, op));
        }
    }

    /// Redis's answer to command `id`: a late one (its command timed out)
    /// is dropped, as the client dropped its waiter.
    pub(super) fn answered(
        &mut self,
        id: u64,
        event: Option<Event>,
        now: Instant,
        checks: &mut Checks,
    ) {
        let Some(outstanding) = self.client.outstanding.remove(&id) else {
            return;
        };
        if let Unanswered::Publish(held) = outstanding.unanswered {
            self.status.release(held);
        }
        if matches!(event, Some(Event::Pong(Pong::Answered))) {
            self.last_pong = Some(now);
        }
        if let Some(event) = event {
            self.handle(event, now, checks);
        }
    }

    /// Commands older than the timeout fail (they may still run in Redis).
    pub(super) fn time_out(&mut self, now: Instant, checks: &mut Checks) {
        let expired: Vec<u64> = self
            .client
            .outstanding
            .iter()
            .filter(|(_, o)| now.duration_since(o.issued) >= COMMAND_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let outstanding = self.client.outstanding.remove(&id).expect("listed");
            if let Some(event) = outstanding.unanswered.failed(true, &self.status) {
                self.handle(event, now, checks);
            }
        }
    }

    /// The connections dropped: every outstanding command fails now.
    pub(super) fn dropped(&mut self, now: Instant, checks: &mut Checks) {
        self.client.connected = false;
        self.client.to_redis.iter_mut().for_each(VecDeque::clear);
        self.client.from_redis.iter_mut().for_each(VecDeque::clear);
        let outstanding = std::mem::take(&mut self.client.outstanding);
        // Still queued for a connection: fred keeps them.
        let unsent: HashSet<u64> = self.client.unsent.iter().map(|(id, ..)| *id).collect();
        for (id, outstanding) in outstanding {
            if unsent.contains(&id) {
                self.client.outstanding.insert(id, outstanding);
                continue;
            }
            if let Some(event) = outstanding.unanswered.failed(false, &self.status) {
                self.handle(event, now, checks);
            }
        }
    }

    /// Connected again: queued commands are written, then the state hears
    /// of the new connection.
    pub(super) fn reconnected(&mut self, now: Instant, checks: &mut Checks) {
        self.client.connected = true;
        self.client.reconnect_at = None;
        for (id, conn, op) in std::mem::take(&mut self.client.unsent) {
            self.client.to_redis[conn as usize].push_back((id, op));
        }
        self.handle(Event::Connected { unsupported: None }, now, checks);
    }

    /// Whether anything is on its way between the node and Redis.
    pub(super) fn busy(&self) -> bool {
        let c = &self.client;
        !c.outstanding.is_empty()
            || !c.unsent.is_empty()
            || c.to_redis.iter().any(|q| !q.is_empty())
            || c.from_redis.iter().any(|q| !q.is_empty())
    }

    fn ticket(&mut self) -> u64 {
        self.shards.next_ticket += 1;
        self.shards.next_ticket
    }

    fn send(&mut self, from: usize, envelope: Envelope, now: Instant, checks: &mut Checks) {
        self.handle(
            Event::FromShards(vec![(ShardId(from), envelope)]),
            now,
            checks,
        );
    }

    /// Shard `shard` takes a subscriber of `topic` (if it has none).
    pub(super) fn subscribe(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        now: Instant,
        checks: &mut Checks,
    ) {
        let key = (shard, topic.clone());
        if self.shards.holders.contains_key(&key) {
            return;
        }
        let round = self.shards.rounds.entry(key.clone()).or_default();
        *round += 1;
        let round = *round;
        self.shards.holders.insert(key, Holder::Joining { round });
        let interest = Envelope::Interest {
            kind: IndexKind::Topic,
            name: topic,
            on: true,
            epoch: round,
        };
        self.send(shard, interest, now, checks);
    }

    /// Shard `shard`'s subscriber of `topic` leaves.
    pub(super) fn unsubscribe(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        now: Instant,
        checks: &mut Checks,
    ) {
        let key = (shard, topic.clone());
        let Some(holder) = self.shards.holders.remove(&key) else {
            return;
        };
        if let Holder::Live {
            epoch: Some(epoch),
            last,
        } = holder
        {
            self.shards.left.insert(key.clone(), (last, epoch));
        }
        let round = self.shards.rounds.get(&key).copied().unwrap_or(0);
        let interest = Envelope::Interest {
            kind: IndexKind::Topic,
            name: topic,
            on: false,
            epoch: round,
        };
        self.send(shard, interest, now, checks);
    }

    /// Shard `shard` publishes `publication` (counting its bytes first, as
    /// a shard does; past `max_queued_bytes` it is refused there).
    pub(super) fn publish(
        &mut self,
        shard: usize,
        publication: Publication,
        now: Instant,
        checks: &mut Checks,
    ) {
        let event = "e".to_string();
        let payload = format!("\"{}\"", publication.id);
        if !self.status.is_up() || !self.status.hold(event.len() + payload.len()) {
            self.shards.stats.refused += 1;
            return;
        }
        let ticket = self.ticket();
        let envelope = Envelope::StreamPublish {
            topic: publication.topic.clone(),
            event,
            payload,
            ticket: Some(ticket),
            idempotency_key: publication.key.clone().map(Box::from),
        };
        self.shards.publishing.insert(ticket, publication);
        self.send(shard, envelope, now, checks);
    }

    /// Shard `shard` takes a subscriber of plain topic `topic` (`on`), or
    /// lets its subscriber go.
    pub(super) fn hold_plain(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        on: bool,
        now: Instant,
        checks: &mut Checks,
    ) {
        let key = (shard, topic.clone());
        if on == self.shards.plain.contains_key(&key) {
            return;
        }
        let round = self.shards.rounds.entry(key.clone()).or_default();
        if on {
            *round += 1;
        }
        let round = *round;
        if on {
            let holder = PlainHolder {
                round,
                ..PlainHolder::default()
            };
            self.shards.plain.insert(key, holder);
        } else {
            self.shards.plain.remove(&key);
        }
        let interest = Envelope::Interest {
            kind: IndexKind::Topic,
            name: topic,
            on,
            epoch: round,
        };
        self.send(shard, interest, now, checks);
    }

    /// Shard `shard` hands a plain publication to the broker for the other
    /// nodes, as a shard does (refused while the node is degraded or past
    /// `max_queued_bytes`).
    pub(super) fn publish_plain(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        id: String,
        now: Instant,
        checks: &mut Checks,
    ) {
        let frame = message::push(&topic, "e", &format!("\"{id}\""));
        if !self.status.is_up() || !self.status.hold(frame.len()) {
            self.shards.stats.refused += 1;
            return;
        }
        let envelope = Envelope::ForNodes {
            seq: self.status.next_seq(),
            kind: IndexKind::Topic,
            name: topic.clone(),
            topic: None,
            frame,
        };
        self.shards
            .plain_published
            .push(PlainPublication { topic, id, at: now });
        self.send(shard, envelope, now, checks);
    }

    pub(super) fn register(&mut self, shard: usize, id: String, now: Instant, checks: &mut Checks) {
        let ticket = self.ticket();
        self.shards.registrations.insert(id.clone());
        self.shards.registering.insert(ticket, id.clone());
        let envelope = Envelope::Register {
            ticket,
            id: Arc::from(id),
            user: Arc::from("u"),
            topics: Arc::from(Vec::new()),
        };
        self.send(shard, envelope, now, checks);
    }

    pub(super) fn unregister(
        &mut self,
        shard: usize,
        id: String,
        now: Instant,
        checks: &mut Checks,
    ) {
        let ticket = self.ticket();
        self.shards.registrations.remove(&id);
        self.shards.registering.insert(ticket, id.clone());
        let envelope = Envelope::Unregister {
            ticket,
            id: Arc::from(id),
        };
        self.send(shard, envelope, now, checks);
    }

    /// A presence member joins (`meta`) or leaves.
    pub(super) fn presence(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        conn_id: String,
        meta: Option<String>,
        now: Instant,
        checks: &mut Checks,
    ) {
        let members = self.shards.members.entry(topic.clone()).or_default();
        let before = match &meta {
            Some(meta) => members.insert(conn_id.clone(), meta.clone()),
            None => members.remove(&conn_id),
        };
        let user = meta.as_deref().or(before.as_deref()).and_then(bus::user_of);
        if members.is_empty() {
            self.shards.members.remove(&topic);
        }
        let envelope = Envelope::PresenceChange {
            topic: topic.clone(),
            conn_id,
            meta: meta.clone().map(Arc::from),
        };
        self.send(shard, envelope, now, checks);
        // A Pusher presence channel's home counts the user's connections
        // on the node: its first coming and last going are transitions.
        let Some(user) = user.filter(|_| before.is_none() != meta.is_none()) else {
            return;
        };
        let connections = self.user_connections(&topic, &user);
        let joined = meta.is_some();
        if connections != usize::from(joined) {
            return;
        }
        let ticket = self.ticket();
        let transition = (topic.clone(), user.clone(), joined);
        self.shards.deciding.insert(ticket, transition);
        let home = bus::shard_of(&topic, self.shards.count);
        let member_meta = meta.or(before).unwrap_or_default();
        let envelope = Envelope::MemberTransition {
            ticket,
            topic,
            user: Arc::from(user),
            meta: Arc::from(member_meta),
            joined,
            frame: Some(Bytes::from_static(b"\x81\x02{}")),
        };
        self.send(home.0, envelope, now, checks);
    }

    /// The node's connections of `user` to `topic`.
    pub(super) fn user_connections(&self, topic: &str, user: &str) -> usize {
        let members = self.shards.members.get(topic).into_iter().flatten();
        members
            .filter(|(_, meta)| bus::user_of(meta).as_deref() == Some(user))
            .count()
    }

    /// A shard asks for `topic`'s members, or (`subscribers`) how many
    /// subscribe to it on every node (a question for the other nodes).
    pub(super) fn query_presence(
        &mut self,
        shard: usize,
        topic: Arc<str>,
        subscribers: bool,
        now: Instant,
        checks: &mut Checks,
    ) {
        let ticket = self.ticket();
        self.shards.queries.insert(ticket);
        if subscribers {
            self.shards.subscriber_queries.insert(ticket);
        }
        let query = MemberQuery {
            limit: 10,
            subscribers,
            ..MemberQuery::default()
        };
        let envelope = Envelope::PresenceQuery {
            ticket,
            topic,
            query,
        };
        self.send(shard, envelope, now, checks);
    }

    /// Every shard hands the broker its drain marker.
    pub(super) fn drain(&mut self, now: Instant, checks: &mut Checks) {
        for shard in 0..self.shards.count {
            self.send(shard, Envelope::Drained, now, checks);
        }
    }

    /// An envelope from the broker for shard `to`, checked.
    fn shard_receives(
        &mut self,
        to: ShardId,
        envelope: Envelope,
        now: Instant,
        checks: &mut Checks,
    ) {
        let shard = to.0;
        super::trace(|| {
            let what = match &envelope {
                Envelope::Publish { topic, frame } => {
                    let json = message::frame_json(frame).unwrap_or(b"");
                    format!("{topic}: {}", String::from_utf8_lossy(json))
                }
                Envelope::StreamOpened { ticket, answer } => {
                    let page = answer
                        .as_ref()
                        .map(|p| (&p.position, p.recovered, p.frames.len()));
                    format!("opened {ticket}: {page:?}")
                }
                other => format!("{other:?}").chars().take(60).collect(),
            };
            format!("  {} shard {shard} <- {what}", self.name)
        });
        if shard >= self.shards.count {
            return checks.fail(format!(
                "an envelope for shard {shard} of {}",
                self.shards.count
            ));
        }
        let up = self.status.is_up() && self.client.connected;
        let shards = &mut self.shards;
        match envelope {
            Envelope::InterestAck { name, epoch, .. } => {
                super::trace(|| {
                    format!(
                        "  {} shard {shard}: ack {name} round {epoch}, up {up}",
                        self.name
                    )
                });
                let key = (shard, name.clone());
                if let Some(plain) = shards.plain.get_mut(&key) {
                    if plain.round == epoch && plain.acked.is_none() {
                        plain.acked = Some(up.then_some(now));
                    }
                    return;
                }
                let Some(Holder::Joining { round }) = shards.holders.get(&key) else {
                    return;
                };
                if *round != epoch {
                    return;
                }
                checks.acked_interest.push((name.clone(), up));
                shards.next_ticket += 1;
                let ticket = shards.next_ticket;
                // Sometimes recover from where an earlier subscriber left.
                let since = if shards.recover {
                    shards.left.get(&key).map(|(o, e)| (*o, e.clone()))
                } else {
                    None
                };
                shards.holders.insert(
                    key,
                    Holder::Opening {
                        ticket,
                        since: since.clone(),
                    },
                );
                let open = Envelope::StreamOpen {
                    ticket,
                    topic: name,
                    since,
                    mark_through: 0,
                };
                shards.outbox.push_back((shard, open));
            }
            Envelope::StreamOpened { ticket, answer } => {
                let Some((key, since)) = shards.holders.iter().find_map(|(k, h)| match h {
                    Holder::Opening { ticket: t, since } if *t == ticket => {
                        Some((k.clone(), since.clone()))
                    }
                    _ => None,
                }) else {
                    return;
                };
                let Ok(page) = answer else {
                    return checks.fail(format!("open of `{}` refused", key.1));
                };
                if page.more {
                    return checks.fail(format!("open of `{}` left a next page", key.1));
                }
                let epoch = (!page.position.epoch.is_empty()).then(|| page.position.epoch.clone());
                let mut last = page.after;
                match (&since, page.recovered) {
                    (Some(_), Some(true)) => shards.stats.recovered += 1,
                    (Some(_), _) => shards.stats.not_recovered += 1,
                    _ => {}
                }
                for frame in &page.frames {
                    match parse(frame) {
                        Some(Pushed::Push(offset, id)) => {
                            if offset != last + 1 {
                                return checks.fail(format!(
                                    "`{}` shard {shard}: replay gives {offset} after {last}",
                                    key.1
                                ));
                            }
                            checks.seen.push((key.1.clone(), epoch.clone(), offset, id));
                            last = offset;
                        }
                        _ => return checks.fail("a replay frame is not a push".into()),
                    }
                }
                if last != page.position.offset {
                    return checks.fail(format!(
                        "`{}` shard {shard}: replay ends at {last}, the position is {}",
                        key.1, page.position.offset
                    ));
                }
                shards.holders.insert(key, Holder::Live { epoch, last });
            }
            Envelope::Publish { topic, frame } => {
                let key = (shard, topic.clone());
                if let Some(plain) = shards.plain.get_mut(&key) {
                    match parse(&frame) {
                        Some(Pushed::Push(_, id)) if plain.got.insert(id.clone()) => {}
                        Some(Pushed::Push(_, id)) => {
                            checks.fail(format!("`{topic}` shard {shard} got {id} twice"))
                        }
                        _ => checks.fail(format!("`{topic}`: an unreadable frame")),
                    }
                    return;
                }
                let Some(Holder::Live { epoch, last }) = shards.holders.get_mut(&key) else {
                    return;
                };
                match parse(&frame) {
                    Some(Pushed::Push(offset, id)) => {
                        if offset != *last + 1 {
                            return checks.fail(format!(
                                "`{topic}` shard {shard}: push {offset} after {last} (run {epoch:?})"
                            ));
                        }
                        *last = offset;
                        shards.stats.pushes += 1;
                        checks.seen.push((topic, epoch.clone(), offset, id));
                    }
                    Some(Pushed::Reset(run)) => {
                        if epoch.as_deref() == Some(&*run) {
                            return checks.fail(format!("`{topic}` reset to the run it is in"));
                        }
                        *epoch = Some(run);
                        *last = 0;
                        shards.stats.resets += 1;
                    }
                    None => checks.fail(format!("`{topic}`: an unreadable frame")),
                }
            }
            Envelope::StreamReply {
                ticket,
                status,
                body,
            } => {
                let Some(publication) = shards.publishing.remove(&ticket) else {
                    return checks.fail(format!("a reply to publish ticket {ticket}, not waiting"));
                };
                match status {
                    202 => {
                        let json: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        let (Some(offset), Some(epoch)) =
                            (json["offset"].as_u64(), json["epoch"].as_str())
                        else {
                            return checks.fail(format!("a 202 without a position: {json}"));
                        };
                        shards.stats.acked += 1;
                        shards.acked.push(Acked {
                            topic: publication.topic,
                            epoch: Arc::from(epoch),
                            offset,
                            id: publication.id,
                            losses: checks.losses,
                        });
                    }
                    504 => {
                        shards.stats.unknown += 1;
                        if publication.key.is_some() {
                            shards.unknown.push(publication);
                        }
                    }
                    503 => shards.stats.refused += 1,
                    other => checks.fail(format!("publish answered {other}")),
                }
            }
            Envelope::Ack { ticket } => {
                if shards.registering.remove(&ticket).is_none() {
                    checks.fail(format!("an ack of ticket {ticket}, not waiting"));
                }
            }
            Envelope::Register { id, .. } => {
                super::trace(|| format!("  {} shard {shard}: +{id}", self.name));
                shards.registrations.insert(id.to_string());
            }
            Envelope::Unregister { id, .. } => {
                super::trace(|| format!("  {} shard {shard}: -{id}", self.name));
                shards.registrations.remove(&*id);
            }
            Envelope::PresenceQuery { ticket, topic, .. } => {
                // Another node's question: this shard's subscribers of it.
                let key = (shard, topic);
                let held = shards.plain.contains_key(&key) || shards.holders.contains_key(&key);
                let members = Box::new(bus::Members {
                    count: usize::from(held),
                    ..bus::Members::default()
                });
                let reply = Envelope::PresenceReply { ticket, members };
                shards.outbox.push_back((shard, reply));
            }
            Envelope::MemberDecided { ticket, .. } => {
                if shards.deciding.remove(&ticket).is_none() {
                    checks.fail(format!(
                        "a member decision for ticket {ticket}, not waiting"
                    ));
                }
            }
            Envelope::MembersChanged { .. } => {}
            Envelope::PresenceReply { ticket, members } => {
                if shards.subscriber_queries.remove(&ticket) && members.count > 0 {
                    shards.stats.counted_elsewhere += 1;
                }
                if !shards.queries.remove(&ticket) {
                    checks.fail(format!("a presence reply to ticket {ticket}, not waiting"));
                }
            }
            Envelope::Drained => {
                if std::mem::replace(&mut shards.drained[shard], true) {
                    checks.fail("a second drain marker".into());
                }
            }
            other => checks.fail(format!("the broker sent a shard {other:?}")),
        }
    }
}

/// A stream frame a shard was sent.
enum Pushed {
    /// A publication: its offset and its payload (the publication's id).
    Push(u64, String),
    /// The stream started again under this epoch.
    Reset(Arc<str>),
}

fn parse(frame: &Bytes) -> Option<Pushed> {
    let json = message::frame_json(frame)?;
    let json: serde_json::Value = serde_json::from_slice(json).ok()?;
    match json["type"].as_str()? {
        // A plain topic's push has no offset.
        "push" => Some(Pushed::Push(
            json["offset"].as_u64().unwrap_or(0),
            json["payload"].as_str()?.to_string(),
        )),
        "reset" => Some(Pushed::Reset(Arc::from(json["epoch"].as_str()?))),
        _ => None,
    }
}

/// A push a subscriber got: its topic, run (if the subscriber knows it),
/// offset and publication id.
pub(super) type Seen = (Arc<str>, Option<Arc<str>>, u64, String);

/// What the shards found, for the scheduler to judge, and what it tells
/// them.
#[derive(Default)]
pub(super) struct Checks {
    pub(super) failures: Vec<String>,
    /// Every push a subscriber got.
    pub(super) seen: Vec<Seen>,
    /// Interest acknowledged: the name, and whether the node was up and
    /// connected then.
    pub(super) acked_interest: Vec<(Arc<str>, bool)>,
    /// Restarts of Redis that lost its data so far.
    pub(super) losses: u64,
}

impl Checks {
    pub(super) fn fail(&mut self, why: String) {
        self.failures.push(why);
    }
}
