//! Stream topics on a shard, the home side: offsets, history, opening a
//! subscriber at a position, and history over HTTP, in the
//! [`MemoryEngine`]; and publishing through the home. The subscriber side
//! (asking the home, replaying page by page) is [`super::replay`].
//!
//! Every stream topic has one home shard, a hash of its name. Publications
//! accepted anywhere travel to the home, which assigns the offset, frames the
//! push once, stores it and fans it out like any publish: to its own
//! subscribers and to every shard with interest, each over its own ordered
//! queue. So every subscriber sees one order.
//!
//! A stream exists on its home only while it has history or a holder: an
//! HTTP read of an unknown stream answers offset 0 of no epoch and stores
//! nothing, and a stream opened by a subscriber but never published to is
//! forgotten as soon as the home's topic entry goes (its last holder left).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::config::Limits;
use crate::engine::home::{
    self, history_found, http_page_bytes, publish_accepted, replay_page_bytes, Log, Refusal,
};
use crate::engine::memory::MemoryEngine;
use crate::engine::{
    Page, Position, Publication, Recovery, StreamEngine, StreamLimit, Window, EXPIRE_INTERVAL,
};
use crate::metrics::ShardStats;
use crate::protocol::http::{error_json, Request, Response};
use crate::protocol::message::{self, Since};
use crate::rules::History;
use crate::shard::key::ConnKey;

use super::cluster::LocalOnly;
use super::conn::{Deferred, Reply};
use super::idempotency::Idempotency;
use super::replay::{OpenKind, Replays};
use super::ShardState;

/// Stream bookkeeping of one shard: the engine for the topics it is home
/// to, and the requests it has sent to other homes.
pub(crate) struct Streams {
    pub(super) engine: MemoryEngine,
    last_expire: Instant,
    next_ticket: u64,
    /// Subscriptions waiting for their home's `StreamOpened`.
    pub(super) opening: HashMap<u64, (ConnKey, Arc<str>, OpenKind)>,
    /// The tickets in `opening` per connection, so a subscription dropped
    /// before its answer cancels its open: the answer must not open the
    /// connection's next subscription to the topic, which asked for its own
    /// position and may wait for another round of interest acknowledgements.
    pub(super) opens_of: HashMap<ConnKey, Vec<u64>>,
    /// HTTP requests parked until a home answers: ticket -> connection.
    replies: HashMap<u64, ConnKey>,
    /// Replays under way, per connection (only connections replaying).
    pub(super) replays: HashMap<ConnKey, Replays>,
    /// Idempotency keys of the streams this shard is home to.
    pub(super) idempotency: Idempotency,
}

impl Streams {
    pub(crate) fn new(limits: &Limits, now: Instant) -> Streams {
        Streams {
            engine: MemoryEngine::new(limits.max_history_bytes, limits.max_streams),
            last_expire: now,
            next_ticket: 0,
            opening: HashMap::new(),
            opens_of: HashMap::new(),
            replies: HashMap::new(),
            replays: HashMap::new(),
            idempotency: Idempotency::new(
                std::time::Duration::from_secs(limits.idempotency_window_s),
                limits.max_idempotency_bytes,
            ),
        }
    }
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
        match self.shared.bus.broker() {
            Some(broker) => broker,
            None => self.shard_home_of(topic),
        }
    }

    /// The shard of this node that decides for `topic` (a stream's home
    /// without a cluster; a presence channel's member counts always).
    pub(super) fn shard_home_of(&self, topic: &str) -> ShardId {
        crate::bus::shard_of(topic, self.shared.bus.shards())
    }

    pub(super) fn stream_ticket(&mut self) -> u64 {
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
        reply: Option<(ConnKey, Reply)>,
        idempotency_key: Option<&str>,
    ) -> Published {
        if !self.accepting_publishes() {
            return Published::Refused(503, "server shutting down: publishes are refused".into());
        }
        let history = self.stream_history(topic);
        if history.is_none() && idempotency_key.is_some() {
            // Nothing is stored on a plain topic, so nothing could tell a
            // retry from a new publication across shards and nodes.
            let why = format!(
                "idempotency_key needs a stream topic (a rule with history); `{topic}` has none"
            );
            return Published::Refused(400, why);
        }
        let Some(history) = history else {
            return self.publish_framed(topic, message::push(topic, event, payload_json));
        };
        let home = self.home_of(topic);
        if home == self.id {
            return match self.home_publish(topic, &history, event, payload_json, idempotency_key) {
                Ok((position, shards)) => Published::Done {
                    shards,
                    position: Some(position),
                },
                Err(limit) => Published::Refused(503, limit.to_string()),
            };
        }
        // In a cluster the home is the broker: the publication waits for
        // Redis, within the node's bound on bytes waiting.
        let held = event.len() + payload_json.len();
        if let Err(busy) = self.hold_for_broker(home, held) {
            return Published::Refused(503, busy.message().into());
        }
        let parked = reply.map(|(key, reply)| (key, self.park_for_home(key, reply)));
        let ticket = parked.map(|(_, ticket)| ticket);
        let envelope = Envelope::StreamPublish {
            topic: Arc::from(topic),
            event: event.to_string(),
            payload: payload_json.to_string(),
            ticket,
            idempotency_key: idempotency_key.map(Box::from),
        };
        if !self.forward(home, envelope) {
            self.release_for_broker(home, held);
            if let Some((key, ticket)) = parked {
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

    /// Publishes a push framed already to a plain topic: to this shard's
    /// subscribers, every shard with interest and the other nodes.
    pub(super) fn publish_framed(&mut self, topic: &str, frame: Bytes) -> Published {
        debug_assert!(
            self.stream_history(topic).is_none(),
            "a stream orders its pushes"
        );
        ShardStats::add(&self.stats().publishes_total, 1);
        let shards = self.fan_out(topic, frame.clone());
        match self.send_to_other_nodes(IndexKind::Topic, topic, None, frame) {
            Ok(()) => Published::Done {
                shards,
                position: None,
            },
            Err(why) => Published::LocalOnly { shards, why },
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
        idempotency_key: Option<&str>,
    ) -> Result<(Position, usize), StreamLimit> {
        if let Some(key) = idempotency_key {
            if let Some(first) = self.streams.idempotency.get(topic, key, self.now) {
                ShardStats::add(&self.stats().idempotent_retries_total, 1);
                return Ok((first, 0));
            }
        }
        let (position, frame) = self.streams.engine.publish(
            topic,
            history,
            self.now,
            &mut || new_epoch(&mut self.ids),
            &mut |offset| message::push_at(topic, offset, event, payload_json),
        )?;
        ShardStats::add(&self.stats().publishes_total, 1);
        if let Some(key) = idempotency_key {
            let first = position.clone();
            self.streams.idempotency.insert(topic, key, first, self.now);
        }
        let shards = self.fan_out(topic, frame);
        Ok((position, shards))
    }

    /// Parks HTTP connection `key` until a home answers; returns the ticket.
    fn park_for_home(&mut self, key: ConnKey, reply: Reply) -> u64 {
        let ticket = self.stream_ticket();
        self.park(key, Deferred::Stream { ticket, reply });
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
        idempotency_key: Option<&str>,
    ) {
        let answer = match self.stream_history(topic) {
            _ if !self.accepting_publishes() => Refusal::ShuttingDown.response(),
            Some(history) => {
                match self.home_publish(topic, &history, event, payload_json, idempotency_key) {
                    Ok((position, shards)) => publish_accepted(shards, Some(&position)),
                    Err(limit) => Refusal::Limit(limit).response(),
                }
            }
            None => Refusal::NoHistory {
                topic: Arc::from(topic),
            }
            .response(),
        };
        if let Some(ticket) = ticket {
            self.reply_stream(from, ticket, answer);
        }
    }

    fn reply_stream(&mut self, to: ShardId, ticket: u64, response: Response) {
        self.post_control(to, Envelope::stream_reply(ticket, &response));
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
        if let Some(Deferred::Stream { reply, .. }) = parked {
            self.answer_parked(key, reply.answer(Response::json(status, body)));
        }
    }

    // ---- opening subscribers, on the home ------------------------------------------

    /// On the home: the page a subscriber of `topic` gets first (its
    /// recovery from `since`, or the latest values), or the next page of
    /// its replay (`since` is where the replay reached, `mark_through`
    /// where its last values end). The stream is created for a holder; a
    /// stream nobody holds (the holder left while the request travelled) is
    /// only read.
    pub(super) fn home_open(
        &mut self,
        topic: &str,
        history: &History,
        since: Option<&Since>,
        mark_through: u64,
    ) -> Result<Page, StreamLimit> {
        let now = self.now;
        let current = if self.topics.lookup(topic).is_some() {
            let ids = &mut self.ids;
            self.streams
                .engine
                .hold(topic, history, now, &mut || new_epoch(ids))?
        } else {
            self.streams.engine.position(topic, now)
        };
        let page_bytes = replay_page_bytes(&self.config().limits);
        let since = since.map(|since| Position {
            offset: since.offset,
            epoch: Arc::from(since.epoch.as_str()),
        });
        let mut log = EngineLog {
            engine: &mut self.streams.engine,
            topic,
            now,
            current,
        };
        let replay = history.replay_on_subscribe;
        Ok(home::open(
            &mut log,
            since.as_ref(),
            replay,
            page_bytes,
            mark_through,
        ))
    }

    /// A `StreamOpen` from another shard, on the home.
    pub(super) fn on_stream_open(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: &str,
        since: Option<(u64, Arc<str>)>,
        mark_through: u64,
    ) {
        let since = since.map(|(offset, epoch)| Since {
            offset,
            epoch: epoch.to_string(),
        });
        let answer = match self.stream_history(topic) {
            Some(history) => self.home_open(topic, &history, since.as_ref(), mark_through),
            None => Ok(Page::empty(since.map(|_| false), Position::empty())),
        };
        self.post_control(
            from,
            Envelope::StreamOpened {
                ticket,
                answer: answer.map(Box::new),
            },
        );
    }

    /// The home's topic entry for `topic` is gone: nobody on any shard
    /// holds it. A stream it opened for them and nobody published to goes
    /// with it.
    pub(super) fn topic_released(&mut self, topic: &str) {
        if self.home_of(topic) == self.id {
            self.streams.engine.release(topic, self.now);
        }
    }

    // ---- history over HTTP ---------------------------------------------------------

    /// `GET /topics/{topic}/history?since=N&epoch=E&limit=L`, answered by the home.
    pub(super) fn history_request(
        &mut self,
        key: ConnKey,
        request: &Request,
        topic: &str,
        cors: Option<&str>,
    ) -> Option<Response> {
        let Some(history) = self.stream_history(topic) else {
            let topic = Arc::from(topic);
            return Some(Refusal::NoHistory { topic }.response());
        };
        let query = match HistoryQuery::parse(request, &history) {
            Ok(query) => query,
            Err(message) => return Some(error_json(400, &message)),
        };
        let home = self.home_of(topic);
        if home == self.id {
            return Some(self.home_history(topic, &query));
        }
        let ticket = self.park_for_home(key, Reply::to(request, cors));
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
            Some(_) => self.home_history(topic, &query),
            None => Refusal::NoHistory {
                topic: Arc::from(topic),
            }
            .response(),
        };
        self.reply_stream(from, ticket, answer);
    }

    /// On the home: one page of the publications the query asks for, or
    /// 410 for a position that is gone. Reads only: an unknown stream is
    /// at offset 0 of no epoch.
    fn home_history(&mut self, topic: &str, query: &HistoryQuery) -> Response {
        let now = self.now;
        let current = self.streams.engine.position(topic, now);
        let page_bytes = http_page_bytes(&self.config().limits);
        let mut log = EngineLog {
            engine: &mut self.streams.engine,
            topic,
            now,
            current,
        };
        let epoch = query.epoch.as_deref();
        match home::history(&mut log, query.since, epoch, query.limit, page_bytes) {
            Ok(page) => history_found(topic, &page),
            Err(refusal) => refusal.response(),
        }
    }

    // ---- timers ----------------------------------------------------------------------

    /// Drops expired publications once a second and publishes the engine's
    /// counters.
    pub(super) fn expire_streams(&mut self) {
        if self.now.saturating_duration_since(self.streams.last_expire) < EXPIRE_INTERVAL {
            return;
        }
        self.streams.last_expire = self.now;
        self.streams.idempotency.expire(self.now);
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
        ShardStats::set(&s.memory_stream_meta_bytes, stats.meta_bytes);
        let keys = &self.streams.idempotency;
        ShardStats::set(&s.memory_idempotency_bytes, keys.bytes() as u64);
        ShardStats::set(&s.idempotency_evictions_total, keys.evicted());
        ShardStats::set(&s.stream_evictions_total, stats.evictions);
        ShardStats::set(&s.stream_epochs_total, stats.epoch_changes);
        ShardStats::set(&s.streams_refused_total, stats.refused);
    }
}

/// A fresh epoch from the shard's ids (seeded in a simulation).
fn new_epoch(ids: &mut super::Ids) -> Arc<str> {
    home::new_epoch(|bytes| ids.fill(bytes))
}

/// A home shard's engine, read for one request about `topic`.
struct EngineLog<'a> {
    engine: &'a mut MemoryEngine,
    topic: &'a str,
    now: Instant,
    /// Where the stream stands (created for a holder before the read).
    current: Position,
}

impl Log for EngineLog<'_> {
    fn position(&mut self) -> Position {
        self.current.clone()
    }

    fn recover(&mut self, since: &Position, window: Window) -> Recovery {
        self.engine.recover(self.topic, since, window, self.now)
    }

    fn latest(&mut self, count: usize) -> Vec<Publication> {
        self.engine.latest(self.topic, count, self.now)
    }
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
        // At least one: a page that may hold nothing would name itself as
        // the next page for ever.
        let limit =
            number("limit")?.map_or(history.size, |l| (l as usize).clamp(1, history.size.max(1)));
        Ok(HistoryQuery {
            since: number("since")?,
            epoch: request.query_param("epoch").filter(|e| !e.is_empty()),
            limit,
        })
    }
}
