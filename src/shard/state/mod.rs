//! The shard state: everything a shard knows that is not I/O. Topics and
//! their subscribers, interest from other shards and its acknowledgements,
//! users and registrations, presence, channel hooks, and each connection's
//! protocol (HTTP requests, WebSocket frames, the JSON relay messages).
//!
//! It is a state machine in the manner of `quinn-proto`: the driver (or a
//! simulation) feeds it [`Event`]s with the current time and carries out the
//! [`Command`]s it answers with. It never touches a socket, a ring or a
//! clock. Envelopes to other shards go straight onto the lock-free bus (plain
//! memory); waking those shards is the driver's job ([`ShardState::wake_peers`]).
//!
//! Commands are only carried out after the call that produced them returns,
//! so nothing the driver does in reaction (a connection over its outbound
//! budget, a connection that ended) can change an index while the state is
//! iterating it: the driver reports those as later events.

mod channels;
mod cluster;
mod compression;
mod conn;
mod connect;
mod encodings;
mod event_streams;
mod http;
mod idempotency;
mod inbound;
mod input;
mod interest;
mod lifecycle;
pub mod names;
mod proxied;
mod pusher;
mod pusher_api;
mod pusher_presence;
mod relay;
mod replay;
mod route;
pub(crate) mod streams;
mod users;
mod webhooks;

use std::time::Instant;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, Outbox, Sent, ShardId, ShardSet};
use crate::config::Config;
use crate::engine::StreamEngine as _;
use crate::metrics::ShardStats;
use crate::protocol::http::Response;
use crate::pusher::wire::Outgoing;
use crate::shard::key::{ConnKey, ConnTable};
use crate::shard::Shared;

use conn::{Closing, Conn, Millis, Phase, WsKind};
use names::{NameId, NameIndex};
use users::Users;

/// What the driver tells the state.
#[derive(Debug)]
pub enum Event<'a> {
    /// A connection was accepted.
    Opened(ConnKey),
    /// Bytes arrived on a connection.
    Input(ConnKey, &'a [u8]),
    /// The peer closed its sending side (end of stream).
    InputEnded(ConnKey),
    /// A `Send` would have passed the connection's outbound budget: its
    /// queued frames were dropped and further sends are discarded. The state
    /// must close it (a slow consumer).
    Overflow(ConnKey),
    /// The connection is gone; the key will not be used again.
    Closed(ConnKey),
    /// The connection's outbound queue fell to the drain mark (a quarter of
    /// its budget) after a [`Command::WatchDrain`].
    Drained(ConnKey),
    /// An envelope from another shard (or the process, for shutdown).
    Envelope(ShardId, Envelope),
    /// Time passed; timers are checked.
    Tick,
}

/// What the state asks the driver to do, in order.
#[derive(Debug)]
pub enum Command {
    /// Queue bytes on a connection, within its outbound budget.
    Send(ConnKey, Bytes),
    /// The same for a publication delivered to a subscriber: the driver may
    /// hold it for up to `write_delay` so it leaves in one send with the
    /// next ones (replies are never held).
    Push(ConnKey, Bytes),
    /// Report [`Event::Drained`] once the connection's outbound queue is
    /// at or below the drain mark (at once if it is already): a replay
    /// sends its next page then, so what it queues stays within the budget.
    WatchDrain(ConnKey),
    /// End a connection: queue `last` (outside the budget) after what is
    /// queued, then close as `mode` says.
    Close {
        /// The connection.
        conn: ConnKey,
        /// A close frame or a final response, if any.
        last: Option<Bytes>,
        /// When to shut the socket down.
        mode: CloseMode,
    },
}

/// When the driver shuts a closing connection's socket down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CloseMode {
    /// After everything queued is sent, wait for the peer to close (the
    /// WebSocket close handshake), up to the close timeout.
    Linger,
    /// As soon as everything queued is sent.
    AfterFlush,
    /// Now, dropping whatever is queued.
    Now,
}

/// Bytes a shard state holds for clients, by what holds them (see
/// [`ShardState::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Partial input held for connections.
    pub inbound: usize,
    /// Work parked on connections until other shards answer.
    pub parked: usize,
    /// Registrations indexed.
    pub registrations: usize,
    /// Presence metas and answers being gathered.
    pub presence: usize,
    /// Stream publications kept (frames and bookkeeping).
    pub stream_history: usize,
    /// The streams' own bookkeeping.
    pub stream_meta: usize,
    /// Streams this shard is home to.
    pub streams: usize,
    /// Connections with a replay paging out or waiting.
    pub replays: usize,
    /// Idempotency keys of stream publications this shard is home to.
    pub idempotency: usize,
}

/// Where registration ids come from: the OS, or a seeded generator so a
/// simulation replays exactly.
enum Ids {
    Os,
    Seeded(u64),
}

impl Ids {
    fn fill(&mut self, bytes: &mut [u8]) -> std::io::Result<()> {
        match self {
            Ids::Os => getrandom::fill(bytes).map_err(|e| std::io::Error::other(e.to_string())),
            Ids::Seeded(state) => {
                for chunk in bytes.chunks_mut(8) {
                    *state = splitmix64(*state);
                    chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
                }
                Ok(())
            }
        }
    }
}

/// SplitMix64's output function: a seeded sequence good enough for test ids.
pub fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Progress of a graceful shutdown.
#[derive(Debug, Clone, Copy)]
struct Shutdown {
    /// The process asked this shard to stop.
    begun: bool,
    /// Shards whose drain marker arrived: everything they published before
    /// refusing publishes has reached this shard.
    drained_peers: usize,
    /// Connections have been told to close.
    closing: bool,
}

/// One shard's state.
pub struct ShardState {
    id: ShardId,
    shared: Shared,
    conns: ConnTable<Conn>,
    /// Connections allowed on this shard.
    max_conns: usize,
    topics: NameIndex,
    /// User id -> this shard's identified relay connections of that user.
    users: NameIndex,
    /// User id -> this shard's `/chat` connections of that user.
    chatters: NameIndex,
    users_state: Users,
    presence: channels::PresenceQueries,
    streams: streams::Streams,
    inbound: inbound::Inbound,
    /// Bytes of work parked on connections until other shards answer.
    parked_bytes: usize,
    outbox: Outbox,
    commands: Vec<Command>,
    next_epoch: u64,
    ids: Ids,
    started: Instant,
    now: Instant,
    /// When connections were last scanned for timeouts.
    last_scan: Instant,
    event_streams: event_streams::EventStreams,
    /// Open Pusher WebSockets: while there are any, a fan-out looks up
    /// each subscriber's format (a Pusher connection reads its own frame).
    pusher_websockets: usize,
    /// Pusher presence channels: subscriptions joining, users per channel.
    pusher_presence: pusher_presence::PusherPresence,
    /// Pusher connections' users and client event rates.
    pusher_conns: pusher::PusherConns,
    compression: compression::Compression,
    /// Presence members per (topic, user), with `[webhooks]` member events.
    webhook_members: webhooks::Members,
    /// Subscriptions waiting for the backend's verdict (`[proxy]`).
    proxied: proxied::Proxied,
    /// When connections the connect proxy granted expire.
    connect_expiries: connect::Expiries,
    shutdown: Shutdown,
}

impl ShardState {
    /// The state of shard `id`, allowing `max_conns` connections.
    pub fn new(id: ShardId, shared: Shared, max_conns: usize, now: Instant) -> ShardState {
        let limits = &shared.config.limits;
        ShardState {
            id,
            conns: ConnTable::default(),
            max_conns,
            topics: NameIndex::new(limits.max_topics_per_shard),
            users: NameIndex::new(limits.max_connections),
            chatters: NameIndex::new(limits.max_connections),
            users_state: Users::default(),
            presence: channels::PresenceQueries::default(),
            streams: streams::Streams::new(limits, now),
            inbound: inbound::Inbound::new(limits.max_inbound_bytes_per_shard),
            parked_bytes: 0,
            outbox: Outbox::new(id, shared.bus.members()),
            commands: Vec::new(),
            next_epoch: 1,
            ids: Ids::Os,
            started: now,
            now,
            last_scan: now,
            pusher_websockets: 0,
            pusher_presence: pusher_presence::PusherPresence::default(),
            pusher_conns: pusher::PusherConns::default(),
            event_streams: event_streams::EventStreams {
                open: 0,
                last_heartbeat: now,
            },
            compression: compression::Compression::new(
                shared.config.websocket.compression_min_bytes,
            ),
            webhook_members: webhooks::Members::new(),
            proxied: proxied::Proxied::default(),
            connect_expiries: connect::Expiries::default(),
            shutdown: Shutdown {
                begun: false,
                drained_peers: 0,
                closing: false,
            },
            shared,
        }
    }

    /// Makes registration ids come from a generator seeded with `seed`
    /// instead of the OS, so a simulation replays exactly.
    pub fn with_seed(mut self, seed: u64) -> ShardState {
        self.ids = Ids::Seeded(seed);
        self
    }

    /// Handles one event at time `now`; the commands it produces wait in
    /// [`ShardState::take_commands`].
    pub fn handle(&mut self, now: Instant, event: Event<'_>) {
        self.now = now;
        match event {
            Event::Opened(key) => self.on_opened(key),
            Event::Input(key, data) => self.on_input(key, data),
            Event::InputEnded(key) => self.on_input_ended(key),
            Event::Overflow(key) => self.on_overflow(key),
            Event::Closed(key) => self.on_closed(key),
            Event::Drained(key) => self.on_drained(key),
            Event::Envelope(from, envelope) => self.on_envelope(from, envelope),
            Event::Tick => self.on_tick(),
        }
        // Closed only now: a close leaves the topic indexes a fan-out was
        // walking.
        self.close_terminated();
    }

    /// Moves the commands produced so far into `out` (which should be empty).
    pub fn take_commands(&mut self, out: &mut Vec<Command>) {
        std::mem::swap(&mut self.commands, out);
    }

    /// Retries control envelopes that found a peer's queue full and wakes
    /// every shard that got envelopes since the last call with an eventfd
    /// write. The simulation calls it once per turn; the io_uring driver
    /// wakes peers with ring messages and uses [`ShardState::peers_to_wake`].
    pub fn wake_peers(&mut self) {
        self.outbox.retry_backlog(&self.shared.bus);
        self.outbox.wake_all(&self.shared.bus);
    }

    /// Like [`ShardState::wake_peers`], but leaves the waking to the
    /// caller: the peers that got envelopes since the last call.
    pub fn peers_to_wake(&mut self) -> ShardSet {
        self.outbox.retry_backlog(&self.shared.bus);
        self.outbox.take_touched()
    }

    /// True once shutdown has begun: publishes are refused, and connections
    /// close once every peer's drain marker has arrived.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.begun
    }

    /// The longest control backlog toward any peer.
    pub fn control_backlog(&self) -> usize {
        self.outbox.longest_backlog()
    }

    /// Connections the state holds.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// What the state holds for clients, in bytes, by what holds it: the
    /// figures `/metrics` shows and the simulation checks against the
    /// configured bounds.
    pub fn memory(&self) -> Memory {
        let engine = self.streams.engine.stats();
        Memory {
            inbound: self.inbound.bytes(),
            parked: self.parked_bytes,
            registrations: self.users_state.registry.bytes(),
            presence: self.presence.bytes()
                + self.pusher_presence.bytes()
                + self.pusher_conns.bytes(),
            stream_history: engine.stored_bytes as usize,
            stream_meta: engine.meta_bytes as usize,
            streams: engine.streams as usize,
            replays: self.replaying_connections(),
            idempotency: self.streams.idempotency.bytes(),
        }
    }

    /// Publishes [`ShardState::memory`] to the shard's gauges.
    fn publish_memory(&self) {
        let memory = self.memory();
        let s = self.stats();
        ShardStats::set(&s.memory_inbound_bytes, memory.inbound as u64);
        ShardStats::set(&s.memory_parked_bytes, memory.parked as u64);
        ShardStats::set(&s.memory_registrations_bytes, memory.registrations as u64);
        ShardStats::set(&s.memory_presence_bytes, memory.presence as u64);
        ShardStats::set(&s.stream_replays, memory.replays as u64);
    }

    /// Checks the state's internal invariants (index positions, interest,
    /// presence bookkeeping); returns what is wrong. For tests and simulation.
    pub fn check_invariants(&self) -> Result<(), String> {
        lifecycle::check_invariants(self)
    }

    /// One of this shard's name indexes (topics, users or chat users), read
    /// only: each name's local holders, active and waiting, and the other
    /// shards recorded as holding it. For tests and the simulation, which
    /// compare the indexes of all shards (interest is a cross-shard property
    /// no single shard can check).
    pub fn name_index(&self, kind: IndexKind) -> &NameIndex {
        self.index(kind)
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id.0]
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The state's coarse clock, for per-connection timestamps.
    fn millis(&self) -> Millis {
        Millis(self.now.saturating_duration_since(self.started).as_millis() as u32)
    }

    fn update_topic_gauge(&self) {
        self.stats().topics.store(
            self.topics.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    // ---- output ------------------------------------------------------------

    /// Queues a frame (or HTTP bytes) for a connection that is not closing.
    /// An event stream gets it in its own framing.
    fn send(&mut self, key: ConnKey, bytes: Bytes) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.closing != Closing::No {
            return;
        }
        let bytes = match &mut conn.phase {
            Phase::Stream(stream) => match event_streams::translate(stream, bytes) {
                Some(bytes) => bytes,
                None => return,
            },
            Phase::WebSocket(ws) if matches!(ws.kind, WsKind::Pusher(_)) => {
                match crate::pusher::wire::translate(bytes) {
                    Outgoing::Frame(bytes) => bytes,
                    Outgoing::Nothing => return,
                    Outgoing::PresenceSubscribed { topic, cache_miss } => {
                        return self.pusher_presence_subscribed(key, &topic, cache_miss)
                    }
                    Outgoing::CacheMissed { frames, topic } => {
                        self.report_cache_miss(&topic);
                        frames
                    }
                }
            }
            _ => bytes,
        };
        self.commands.push(Command::Send(key, bytes));
    }

    /// Queues an HTTP response; a `Connection: close` one ends the connection
    /// after it. A half-closed connection is not ended here: requests it sent
    /// before its end of input may wait in its buffer, and the input path
    /// ends it once they are answered (`finish_if_input_ended`).
    ///
    /// The last response goes through the outbound budget like any other
    /// (a `Close`'s own bytes do not): a client that sends many
    /// `Connection: close` requests and reads nothing holds at most its
    /// budget, or one response larger than it (taken only when nothing
    /// else is queued), and past that is dropped with the connection.
    fn respond(&mut self, key: ConnKey, response: Response) {
        if response.status() >= 400 {
            ShardStats::add(&self.stats().http_errors_total, 1);
        }
        self.send(key, response.encode());
        if !response.is_keep_alive() {
            self.end(key, None, CloseMode::AfterFlush);
        }
    }

    // ---- bus and fan-out -----------------------------------------------------

    fn on_envelope(&mut self, from: ShardId, envelope: Envelope) {
        match envelope {
            Envelope::Publish { topic, frame } => {
                if let Some(id) = self.topics.lookup(&topic) {
                    self.deliver_local(id, &frame);
                }
            }
            Envelope::UserPublish { user, topic, frame } => {
                self.deliver_to_user(crate::bus::IndexKind::User, &user, Some(&topic), &frame);
            }
            Envelope::Chat { user, frame } => {
                self.deliver_to_user(crate::bus::IndexKind::Chat, &user, None, &frame);
            }
            Envelope::Interest {
                kind,
                name,
                on,
                epoch,
            } => self.on_remote_interest(from, kind, name, on, epoch),
            Envelope::InterestAck { kind, name, epoch } => self.on_interest_ack(kind, &name, epoch),
            Envelope::Register {
                ticket,
                id,
                user,
                topics,
            } => {
                let registration = users::Registration {
                    user,
                    topics,
                    origin: from,
                };
                self.on_register(from, ticket, id, registration)
            }
            Envelope::Unregister { ticket, id } => self.on_unregister(from, ticket, &id),
            Envelope::Ack { ticket } => self.on_ack(ticket),
            Envelope::PresenceQuery {
                ticket,
                topic,
                query,
            } => self.on_presence_query(from, ticket, &topic, &query),
            Envelope::PresenceReply { ticket, members } => self.on_presence_reply(ticket, *members),
            Envelope::StreamPublish {
                topic,
                event,
                payload,
                ticket,
                idempotency_key,
            } => {
                let key = idempotency_key.as_deref();
                self.on_stream_publish(from, &topic, &event, &payload, ticket, key)
            }
            Envelope::PusherMember {
                topic,
                meta,
                user,
                joined,
                socket,
            } => self.on_pusher_member(topic, meta, user, joined, socket),
            Envelope::MembersChanged {
                topic,
                added,
                removed,
            } => self.on_pusher_members_changed(&topic, &added, &removed),
            Envelope::MemberDecided { ticket, tell } => self.on_member_decided(ticket, tell),
            // Addressed to the broker only.
            Envelope::ForNodes { .. }
            | Envelope::PresenceChange { .. }
            | Envelope::MemberTransition { .. } => {}
            Envelope::StreamOpen {
                ticket,
                topic,
                since,
                mark_through,
            } => self.on_stream_open(from, ticket, &topic, since, mark_through),
            Envelope::StreamOpened { ticket, answer } => self.on_stream_opened(ticket, answer),
            Envelope::StreamQuery {
                ticket,
                topic,
                since,
                epoch,
                limit,
            } => {
                let query = streams::HistoryQuery {
                    since,
                    epoch,
                    limit,
                };
                self.on_stream_query(from, ticket, &topic, query)
            }
            Envelope::StreamReply {
                ticket,
                status,
                body,
            } => self.on_stream_reply(ticket, status, body),
            Envelope::Drained => self.on_peer_drained(),
            Envelope::Shutdown => self.begin_shutdown(),
            Envelope::ProxyVerdict { ticket, verdict } => self.on_proxy_verdict(ticket, verdict),
        }
    }

    /// Sends a control envelope to shard `to`; control is never dropped.
    fn post_control(&mut self, to: ShardId, envelope: Envelope) {
        self.outbox.send(&self.shared.bus, to, envelope);
        ShardStats::add(&self.stats().bus_sent_total, 1);
    }

    /// Sends a control envelope to every other shard.
    fn broadcast_control(&mut self, make: impl Fn() -> Envelope) {
        for to in 0..self.shared.bus.shards() {
            if to != self.id.0 {
                self.post_control(ShardId(to), make());
            }
        }
    }

    /// Whether the bus to other shards has room for new control traffic. A
    /// request that would start a broadcast (a first subscriber, an
    /// identified connection, a registration, a presence query) is refused
    /// while a peer's backlog is this long, so a stalled peer cannot make the
    /// backlog grow without bound; leaving, closing and acknowledging are
    /// never refused.
    fn control_has_room(&self) -> bool {
        let room = self.outbox.longest_backlog() < MAX_CONTROL_BACKLOG;
        if !room {
            ShardStats::add(&self.stats().control_refused_total, 1);
        }
        room
    }

    /// Queues `frame` to every active local subscriber of a topic. Returns how
    /// many it was queued for.
    fn deliver_local(&mut self, id: NameId, frame: &Bytes) -> usize {
        let here = self.socket_here();
        let Some(entry) = self.topics.get(id) else {
            return 0;
        };
        self.commands.reserve(entry.subscribers.len());
        let one_format = self.event_streams.open == 0
            && self.compression.websockets == 0
            && self.pusher_websockets == 0;
        if one_format {
            for &key in &entry.subscribers {
                self.commands.push(Command::Push(key, frame.clone()));
            }
        } else {
            // Some connection here is an event stream, compresses or speaks
            // Pusher: each
            // subscriber's format is looked up, and each format's bytes
            // made once.
            let mut encodings = encodings::Encodings::new(frame, self.compression.min_bytes, here);
            let mut terminated = Vec::new();
            for &key in &entry.subscribers {
                let phase = self.conns.get_mut(key).map(|c| &mut c.phase);
                let outcome = encodings.push(
                    key,
                    phase,
                    &mut self.compression.deflater,
                    &mut self.commands,
                );
                if outcome == encodings::Delivered::Terminate {
                    terminated.push(key);
                }
            }
            let count = entry.subscribers.len();
            self.pusher_conns.terminating.extend(terminated);
            return count;
        }
        entry.subscribers.len()
    }

    /// Puts a publish on the bus to `to`; a full queue drops it (counted).
    fn forward(&mut self, to: ShardId, envelope: Envelope) -> bool {
        match self.outbox.send(&self.shared.bus, to, envelope) {
            Sent::Queued => {
                ShardStats::add(&self.stats().bus_sent_total, 1);
                true
            }
            Sent::Dropped => {
                ShardStats::add(&self.stats().bus_drops_total, 1);
                false
            }
        }
    }

    /// Whether publishes are still accepted: not once shutdown has begun, so
    /// everything acknowledged before it is delivered before connections close.
    fn accepting_publishes(&self) -> bool {
        !self.shutdown.begun
    }
}

/// Control envelopes a peer's backlog may hold before new broadcasts are
/// refused. The backlog only forms when the peer's bus queue (65,536 by
/// default) is full, so this is a stalled or flooded peer, not a busy one.
const MAX_CONTROL_BACKLOG: usize = 4096;

#[cfg(test)]
mod tests;
