//! Stream topics on a shard: the home side (offsets, history, recovery, in
//! the [`MemoryEngine`]) and the subscriber side (publishing through the
//! home, opening a subscription at a position).
//!
//! Every stream topic has one home shard, a hash of its name. Publications
//! accepted anywhere travel to the home, which assigns the offset, frames the
//! push once, stores it and fans it out like any publish: to its own
//! subscribers and to every shard with interest, each over its own ordered
//! queue. So every subscriber sees one order.
//!
//! A subscriber is added to the topic's subscribers only when the home's
//! answer to its `StreamOpen` arrives. The open is sent once the home routes
//! the topic to this shard (interest acknowledged), so every publication
//! after the position in the answer follows the answer on the same queue,
//! and every one before it is either in the replay or not owed: no gap, no
//! duplicate, and nothing live overtakes the replay.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::engine::memory::MemoryEngine;
use crate::engine::{Position, Recovery, StreamEngine, EXPIRE_INTERVAL};
use crate::metrics::ShardStats;
use crate::protocol::http::{error_json, Request, Response};
use crate::protocol::message::{self, Since};
use crate::rules::History;
use crate::shard::key::ConnKey;

use super::cluster::LocalOnly;
use super::conn::Deferred;
use super::names::NameId;
use super::ShardState;

/// Bytes of randomness in an epoch: 16 hex characters, enough that two runs
/// of a stream never share one.
const EPOCH_BYTES: usize = 8;

/// Stream bookkeeping of one shard: the engine for the topics it is home
/// to, and the requests it has sent to other homes.
pub(crate) struct Streams {
    engine: MemoryEngine,
    last_expire: Instant,
    next_ticket: u64,
    /// Subscriptions waiting for their home's `StreamOpened`.
    opening: HashMap<u64, (ConnKey, Arc<str>)>,
    /// The tickets in `opening` per connection, so a subscription dropped
    /// before its answer cancels its open: the answer must not open the
    /// connection's next subscription to the topic, which asked for its own
    /// position and may wait for another round of interest acknowledgements.
    opens_of: HashMap<ConnKey, Vec<u64>>,
    /// HTTP requests parked until a home answers: ticket -> connection.
    replies: HashMap<u64, ConnKey>,
}

impl Streams {
    pub(crate) fn new(max_history_bytes: usize, now: Instant) -> Streams {
        Streams {
            engine: MemoryEngine::new(max_history_bytes),
            last_expire: now,
            next_ticket: 0,
            opening: HashMap::new(),
            opens_of: HashMap::new(),
            replies: HashMap::new(),
        }
    }
}

/// What a home answers a subscriber opening its stream.
pub(crate) struct Opened {
    recovered: Option<bool>,
    position: Position,
    frames: Vec<Bytes>,
    marked: bool,
}

/// The outcome of a publish.
pub(crate) enum Published {
    /// Delivered here and forwarded: how many shards took it, and the
    /// position a stream publication got.
    Done {
        shards: usize,
        position: Option<Position>,
    },
    /// Sent to the stream's home; the HTTP answer follows when it replies.
    Parked,
    /// Refused, with the HTTP status and why.
    Refused(u16, String),
    /// Delivered on this node (to `shards` shards) but not to the others.
    LocalOnly { shards: usize, why: LocalOnly },
}

impl ShardState {
    /// The history settings of `topic` if it is a stream.
    pub(super) fn stream_history(&self, topic: &str) -> Option<History> {
        let channel = self.channel_for(topic)?;
        self.shared.channels.hook(channel).history()
    }

    /// The shard that orders `topic`'s stream: a hash of the name, the same
    /// on every shard (SipHash with fixed keys).
    /// In a cluster, Redis orders every stream, through the broker.
    pub(super) fn home_of(&self, topic: &str) -> ShardId {
        if let Some(broker) = self.shared.bus.broker() {
            return broker;
        }
        let mut hasher = DefaultHasher::new();
        topic.hash(&mut hasher);
        ShardId((hasher.finish() % self.shared.bus.shards() as u64) as usize)
    }

    fn stream_ticket(&mut self) -> u64 {
        self.streams.next_ticket += 1;
        self.streams.next_ticket
    }

    // ---- publishing ------------------------------------------------------------

    /// Publishes `event`/`payload_json` to `topic`: through its home when it
    /// is a stream, else delivered here and forwarded at once. `reply` is the
    /// HTTP connection waiting for the outcome, if any.
    pub(super) fn publish(
        &mut self,
        topic: &str,
        event: &str,
        payload_json: &str,
        reply: Option<(ConnKey, bool)>,
    ) -> Published {
        if !self.accepting_publishes() {
            return Published::Refused(503, "server shutting down: publishes are refused".into());
        }
        let Some(history) = self.stream_history(topic) else {
            let frame = message::push(topic, event, payload_json);
            ShardStats::add(&self.stats().publishes_total, 1);
            let shards = self.fan_out(topic, frame.clone());
            let nodes = self.send_to_other_nodes(IndexKind::Topic, topic, None, frame);
            return match nodes {
                Ok(()) => Published::Done {
                    shards,
                    position: None,
                },
                Err(why) => Published::LocalOnly { shards, why },
            };
        };
        let home = self.home_of(topic);
        if home == self.id {
            let (position, shards) = self.home_publish(topic, &history, event, payload_json);
            return Published::Done {
                shards,
                position: Some(position),
            };
        }
        let ticket = reply.map(|(key, keep_alive)| self.park_for_home(key, keep_alive));
        let envelope = Envelope::StreamPublish {
            topic: Arc::from(topic),
            event: event.to_string(),
            payload: payload_json.to_string(),
            ticket,
        };
        if !self.forward(home, envelope) {
            if let (Some((key, _)), Some(ticket)) = (reply, ticket) {
                self.streams.replies.remove(&ticket);
                self.take_deferred(key, |d| matches!(d, Deferred::Stream { .. }));
            }
            return Published::Refused(
                503,
                "server busy: the stream's home shard is flooded".into(),
            );
        }
        match ticket {
            Some(_) => Published::Parked,
            // A client publish asks for no answer: it is on its way.
            None => Published::Done {
                shards: 0,
                position: None,
            },
        }
    }

    /// Delivers a framed push to local subscribers and forwards it to every
    /// shard with interest. Returns how many shards took it.
    fn fan_out(&mut self, topic: &str, frame: Bytes) -> usize {
        let Some(id) = self.topics.lookup(topic) else {
            return 0;
        };
        let mut shards = usize::from(self.deliver_local(id, &frame) > 0);
        let entry = self.topics.entry(id);
        let (name, remote) = (entry.name.clone(), entry.remote);
        for to in remote.iter() {
            let envelope = Envelope::Publish {
                topic: name.clone(),
                frame: frame.clone(),
            };
            shards += usize::from(self.forward(to, envelope));
        }
        shards
    }

    /// On the home: assigns the next offset, frames the push once with it,
    /// stores it and fans it out.
    fn home_publish(
        &mut self,
        topic: &str,
        history: &History,
        event: &str,
        payload_json: &str,
    ) -> (Position, usize) {
        ShardStats::add(&self.stats().publishes_total, 1);
        let (position, frame) = self.streams.engine.publish(
            topic,
            history,
            self.now,
            &mut || new_epoch(&mut self.ids),
            &mut |offset| message::push_at(topic, offset, event, payload_json),
        );
        let shards = self.fan_out(topic, frame);
        (position, shards)
    }

    /// The position of `topic` on its home, creating the stream if needed.
    fn home_position(&mut self, topic: &str, history: &History) -> Position {
        self.streams
            .engine
            .position(topic, history, self.now, &mut || new_epoch(&mut self.ids))
    }

    /// Parks HTTP connection `key` until a home answers; returns the ticket.
    fn park_for_home(&mut self, key: ConnKey, keep_alive: bool) -> u64 {
        let ticket = self.stream_ticket();
        if let Some(conn) = self.conns.get_mut(key) {
            conn.deferred = Some(Box::new(Deferred::Stream { ticket, keep_alive }));
        }
        self.streams.replies.insert(ticket, key);
        ticket
    }

    /// A `StreamPublish` from another shard, on the home.
    pub(super) fn on_stream_publish(
        &mut self,
        from: ShardId,
        topic: &str,
        event: &str,
        payload_json: &str,
        ticket: Option<u64>,
    ) {
        let answer = match self.stream_history(topic) {
            _ if !self.accepting_publishes() => {
                error_json(503, "server shutting down: publishes are refused")
            }
            Some(history) => {
                let (position, shards) = self.home_publish(topic, &history, event, payload_json);
                publish_accepted(shards, Some(&position))
            }
            None => error_json(404, &format!("topic `{topic}` has no history here")),
        };
        if let Some(ticket) = ticket {
            self.reply_stream(from, ticket, answer);
        }
    }

    fn reply_stream(&mut self, to: ShardId, ticket: u64, response: Response) {
        self.post_control(to, stream_reply(ticket, &response));
    }

    /// A home's HTTP answer (to a publish or a history query) for a parked connection.
    pub(super) fn on_stream_reply(&mut self, ticket: u64, status: u16, body: Bytes) {
        let Some(key) = self.streams.replies.remove(&ticket) else {
            return;
        };
        let parked = self.take_deferred(
            key,
            |d| matches!(d, Deferred::Stream { ticket: t, .. } if *t == ticket),
        );
        if let Some(Deferred::Stream { keep_alive, .. }) = parked {
            self.answer_parked(key, Response::json(status, body).keep_alive(keep_alive));
        }
    }

    // ---- subscribing -------------------------------------------------------------

    /// Opens connection `key`'s subscription to stream topic `id`: asks the
    /// home for the position (and what to replay). The connection waits in
    /// the topic's waiting list until the answer arrives.
    pub(super) fn open_stream(&mut self, key: ConnKey, id: NameId) {
        let name = self.topics.entry(id).name.clone();
        let Some(history) = self.stream_history(&name) else {
            return;
        };
        let since = self.conns.get_mut(key).and_then(|c| {
            c.subs
                .iter_mut()
                .find(|s| s.topic == id)
                .and_then(|s| s.since.take())
        });
        let home = self.home_of(&name);
        if home == self.id {
            let opened = self.home_open(&name, &history, since.as_deref());
            return self.finish_stream_subscribe(key, id, opened);
        }
        let ticket = self.stream_ticket();
        self.streams.opening.insert(ticket, (key, name.clone()));
        self.streams.opens_of.entry(key).or_default().push(ticket);
        let since = since.map(|s| (s.offset, Arc::from(s.epoch.as_str())));
        self.post_control(
            home,
            Envelope::StreamOpen {
                ticket,
                topic: name,
                since,
            },
        );
    }

    /// Connection `key` subscribes again to stream topic `id`, which it
    /// holds: the answer is `subscribed` with the position its pushes have
    /// reached. The home knows it: every publication it assigned before
    /// answering was routed to this shard ahead of the answer, on the same
    /// ordered queue, and so was sent to the connection before the reply.
    pub(super) fn restate_stream_position(&mut self, key: ConnKey, id: NameId) {
        let name = self.topics.entry(id).name.clone();
        let Some(history) = self.stream_history(&name) else {
            return;
        };
        let home = self.home_of(&name);
        if home == self.id {
            let position = self.home_position(&name, &history);
            let reply = message::subscribed_at(&name, None, position.offset, &position.epoch);
            return self.send(key, reply);
        }
        let ticket = self.stream_ticket();
        self.streams.opening.insert(ticket, (key, name.clone()));
        self.streams.opens_of.entry(key).or_default().push(ticket);
        self.post_control(
            home,
            Envelope::StreamOpen {
                ticket,
                topic: name,
                since: None,
            },
        );
    }

    /// On the home: the position of `topic` and what a new subscriber gets
    /// before live publications.
    fn home_open(&mut self, topic: &str, history: &History, since: Option<&Since>) -> Opened {
        let current = self.home_position(topic, history);
        let now = self.now;
        if let Some(since) = since {
            let asked = Position {
                offset: since.offset,
                epoch: Arc::from(since.epoch.as_str()),
            };
            let mut same = || current.epoch.clone();
            match self
                .streams
                .engine
                .recover(topic, history, &asked, usize::MAX, now, &mut same)
            {
                Recovery::Recovered {
                    publications,
                    position,
                } => {
                    return Opened {
                        recovered: Some(true),
                        position,
                        frames: publications.into_iter().map(|p| p.frame).collect(),
                        marked: false,
                    }
                }
                Recovery::Gone { .. } => {}
            }
        }
        let frames = match history.replay_on_subscribe {
            0 => Vec::new(),
            count => self
                .streams
                .engine
                .latest(topic, count, now)
                .into_iter()
                .map(|p| p.frame)
                .collect(),
        };
        Opened {
            recovered: since.map(|_| false),
            position: current,
            frames,
            marked: true,
        }
    }

    /// A `StreamOpen` from another shard, on the home.
    pub(super) fn on_stream_open(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: &str,
        since: Option<(u64, Arc<str>)>,
    ) {
        let since = since.map(|(offset, epoch)| Since {
            offset,
            epoch: epoch.to_string(),
        });
        let opened = match self.stream_history(topic) {
            Some(history) => self.home_open(topic, &history, since.as_ref()),
            None => Opened {
                recovered: since.map(|_| false),
                position: Position {
                    offset: 0,
                    epoch: Arc::from(""),
                },
                frames: Vec::new(),
                marked: false,
            },
        };
        self.post_control(
            from,
            Envelope::StreamOpened {
                ticket,
                recovered: opened.recovered,
                offset: opened.position.offset,
                epoch: opened.position.epoch,
                frames: opened.frames,
                marked: opened.marked,
            },
        );
    }

    /// The home's answer arrived: the subscriber becomes active.
    pub(super) fn on_stream_opened(
        &mut self,
        ticket: u64,
        recovered: Option<bool>,
        position: Position,
        frames: Vec<Bytes>,
        marked: bool,
    ) {
        let Some((key, topic)) = self.streams.opening.remove(&ticket) else {
            return; // its subscription was dropped meanwhile
        };
        self.forget_open(key, ticket);
        let Some(id) = self.topics.lookup(&topic) else {
            return; // the connection left meanwhile
        };
        let opened = Opened {
            recovered,
            position,
            frames,
            marked,
        };
        self.finish_stream_subscribe(key, id, opened);
    }

    /// Cancels connection `key`'s opens of `topic` still in flight: its
    /// subscription to it is dropped, so their answers must find nothing.
    pub(super) fn cancel_stream_opens(&mut self, key: ConnKey, topic: &str) {
        let Some(tickets) = self.streams.opens_of.get_mut(&key) else {
            return;
        };
        let opening = &mut self.streams.opening;
        tickets.retain(|ticket| {
            let of_topic = opening.get(ticket).is_some_and(|(_, t)| **t == *topic);
            if of_topic {
                opening.remove(ticket);
            }
            !of_topic
        });
        if tickets.is_empty() {
            self.streams.opens_of.remove(&key);
        }
    }

    fn forget_open(&mut self, key: ConnKey, ticket: u64) {
        if let Some(tickets) = self.streams.opens_of.get_mut(&key) {
            tickets.retain(|t| *t != ticket);
            if tickets.is_empty() {
                self.streams.opens_of.remove(&key);
            }
        }
    }

    /// Moves a waiting subscriber of a stream into the topic's subscribers
    /// and sends it `subscribed` with the position, then the replay. For a
    /// subscriber active already (it subscribed again) only the position.
    fn finish_stream_subscribe(&mut self, key: ConnKey, id: NameId, opened: Opened) {
        let active = self
            .conns
            .get(key)
            .is_some_and(|c| c.subs.iter().any(|s| s.topic == id && s.pos.is_some()));
        if active {
            // Opens of a subscription dropped meanwhile were cancelled, so
            // this answers a repeated subscribe of the one held now.
            let name = self.topics.entry(id).name.clone();
            let position = &opened.position;
            let reply = message::subscribed_at(&name, None, position.offset, &position.epoch);
            return self.send(key, reply);
        }
        let waiting = self
            .topics
            .get(id)
            .is_some_and(|e| e.waiting.contains(&key));
        let holds = self
            .conns
            .get(key)
            .is_some_and(|c| c.subs.iter().any(|s| s.topic == id && s.pos.is_none()));
        if !waiting || !holds {
            return; // unsubscribed or closed while the home answered
        }
        self.topics.remove_waiting(id, key);
        let pos = self.topics.add_subscriber(id, key);
        if let Some(sub) = self
            .conns
            .get_mut(key)
            .and_then(|c| c.subs.iter_mut().find(|s| s.topic == id))
        {
            sub.pos = Some(pos);
        }
        let name = self.topics.entry(id).name.clone();
        match opened.recovered {
            Some(true) => ShardStats::add(&self.stats().stream_recoveries_total, 1),
            Some(false) => ShardStats::add(&self.stats().stream_recovery_failures_total, 1),
            None => {}
        }
        ShardStats::add(
            &self.stats().stream_replayed_total,
            opened.frames.len() as u64,
        );
        let reply = message::subscribed_at(
            &name,
            opened.recovered,
            opened.position.offset,
            &opened.position.epoch,
        );
        self.send(key, reply);
        for frame in opened.frames {
            let frame = if opened.marked {
                message::replayed(&frame).unwrap_or(frame)
            } else {
                frame
            };
            self.send(key, frame);
        }
    }

    // ---- history over HTTP ---------------------------------------------------------

    /// `GET /topics/{topic}/history?since=N&epoch=E&limit=L`, answered by the home.
    pub(super) fn history_request(
        &mut self,
        key: ConnKey,
        request: &Request,
        topic: &str,
    ) -> Option<Response> {
        let Some(history) = self.stream_history(topic) else {
            return Some(error_json(
                404,
                &format!("topic `{topic}` has no history: its rule sets no history_size"),
            ));
        };
        let query = match HistoryQuery::parse(request, &history) {
            Ok(query) => query,
            Err(message) => return Some(error_json(400, &message)),
        };
        let home = self.home_of(topic);
        if home == self.id {
            return Some(self.home_history(topic, &history, &query));
        }
        let ticket = self.park_for_home(key, request.keep_alive());
        self.post_control(
            home,
            Envelope::StreamQuery {
                ticket,
                topic: Arc::from(topic),
                since: query.since,
                epoch: query.epoch,
                limit: query.limit,
            },
        );
        None
    }

    /// A history query from another shard, on the home.
    pub(super) fn on_stream_query(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: &str,
        query: HistoryQuery,
    ) {
        let answer = match self.stream_history(topic) {
            Some(history) => self.home_history(topic, &history, &query),
            None => error_json(404, &format!("topic `{topic}` has no history")),
        };
        self.reply_stream(from, ticket, answer);
    }

    /// On the home: the publications the query asks for, or 410 for a
    /// position that is gone.
    fn home_history(&mut self, topic: &str, history: &History, query: &HistoryQuery) -> Response {
        let current = self.home_position(topic, history);
        let now = self.now;
        if let Some(epoch) = query.epoch.as_deref().filter(|e| *e != &*current.epoch) {
            return gone(
                format!("epoch `{epoch}` is gone: the stream started afresh"),
                &current,
            );
        }
        let (publications, position) = match query.since {
            Some(offset) => {
                let asked = Position {
                    offset,
                    epoch: current.epoch.clone(),
                };
                let mut same = || current.epoch.clone();
                match self.streams.engine.recover(
                    topic,
                    history,
                    &asked,
                    query.limit,
                    now,
                    &mut same,
                ) {
                    Recovery::Recovered {
                        publications,
                        position,
                    } => (publications, position),
                    Recovery::Gone { position } => {
                        return gone(
                            format!("offset {offset} is no longer in history"),
                            &position,
                        )
                    }
                }
            }
            None => (self.streams.engine.latest(topic, query.limit, now), current),
        };
        history_found(topic, &position, publications.iter().map(|p| &p.frame))
    }

    // ---- timers ----------------------------------------------------------------------

    /// Drops expired publications once a second and publishes the engine's
    /// counters.
    pub(super) fn expire_streams(&mut self) {
        if self.now.saturating_duration_since(self.streams.last_expire) < EXPIRE_INTERVAL {
            return;
        }
        self.streams.last_expire = self.now;
        // A home's topic entry lives while any shard has a subscriber of the
        // topic, active or about to be opened (interest reaches the home
        // before the open does).
        let topics = &self.topics;
        self.streams
            .engine
            .expire(self.now, &|topic| topics.lookup(topic).is_some());
        let stats = self.streams.engine.stats();
        let s = self.stats();
        ShardStats::set(&s.streams, stats.streams);
        ShardStats::set(&s.stream_publications, stats.publications);
        ShardStats::set(&s.stream_stored_bytes, stats.stored_bytes);
        ShardStats::set(&s.stream_evictions_total, stats.evictions);
        ShardStats::set(&s.stream_epochs_total, stats.epoch_changes);
    }
}

/// `410`: the position a history query asked for is gone; `current` is
/// where the stream stands.
pub(crate) fn gone(why: String, current: &Position) -> Response {
    let body = serde_json::json!({
        "error": why,
        "offset": current.offset,
        "epoch": &*current.epoch,
    });
    Response::json(410, body.to_string())
}

/// `200` to a history query: the stream's position and the publications,
/// each as the push subscribers got.
pub(crate) fn history_found<'a>(
    topic: &str,
    position: &Position,
    frames: impl Iterator<Item = &'a Bytes> + Clone,
) -> Response {
    let size: usize = frames.clone().map(|f| f.len()).sum();
    let mut body = Vec::with_capacity(64 + size);
    body.extend_from_slice(b"{\"topic\":");
    message::write_json_str(&mut body, topic);
    body.extend_from_slice(format!(",\"offset\":{},\"epoch\":", position.offset).as_bytes());
    message::write_json_str(&mut body, &position.epoch);
    body.extend_from_slice(b",\"publications\":[");
    for (i, frame) in frames.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message::frame_json(frame).unwrap_or(b"null"));
    }
    body.extend_from_slice(b"]}");
    Response::json(200, body)
}

/// A fresh random epoch: 16 hex characters. Without randomness it falls
/// back to the clock, which still differs between two starts of a stream.
/// A home's HTTP answer to ticket `ticket`, for the shard that asked.
pub(crate) fn stream_reply(ticket: u64, response: &Response) -> Envelope {
    Envelope::StreamReply {
        ticket,
        status: response.status(),
        body: response.body().clone(),
    }
}

/// A fresh epoch from the OS's randomness (the clock without it), for a
/// home outside the shards (the cluster broker).
pub(crate) fn os_epoch() -> Arc<str> {
    new_epoch(&mut super::Ids::Os)
}

fn new_epoch(ids: &mut super::Ids) -> Arc<str> {
    let mut bytes = [0u8; EPOCH_BYTES];
    if ids.fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_le_bytes();
    }
    Arc::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The body of a `202` for a publish: shards reached, and the position of a
/// stream publication.
pub(crate) fn publish_accepted(shards: usize, position: Option<&Position>) -> Response {
    let body = match position {
        Some(p) => serde_json::json!({
            "delivered_shards": shards,
            "offset": p.offset,
            "epoch": &*p.epoch,
        }),
        None => serde_json::json!({ "delivered_shards": shards }),
    };
    Response::json(202, body.to_string())
}

/// `?since=N&epoch=E&limit=L` of a history request.
pub(crate) struct HistoryQuery {
    pub(crate) since: Option<u64>,
    pub(crate) epoch: Option<String>,
    pub(crate) limit: usize,
}

impl HistoryQuery {
    fn parse(request: &Request, history: &History) -> Result<HistoryQuery, String> {
        let number = |name: &str| -> Result<Option<u64>, String> {
            request
                .query_param(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("`{name}` must be a non-negative integer"))
                })
                .transpose()
        };
        let limit = number("limit")?.map_or(history.size, |l| (l as usize).min(history.size));
        Ok(HistoryQuery {
            since: number("since")?,
            epoch: request.query_param("epoch").filter(|e| !e.is_empty()),
            limit,
        })
    }
}
