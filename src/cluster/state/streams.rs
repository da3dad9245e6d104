//! Topic streams in a cluster, the broker's decisions: Redis orders and
//! keeps them (the scripts are in `cluster::redis::streams`); the broker is
//! every stream's home for its node's shards.
//!
//! Shards address `StreamPublish`, `StreamOpen` and `StreamQuery` to the
//! broker (it is the home `home_of` names in a cluster) and get the same
//! answers a home shard gives, so the shard loop does not change.
//!
//! In Redis, per topic `T` (the name in a hash tag, beside its channel):
//!
//! ```text
//! {prefix}:s:{T}:meta   hash: e = epoch, o = latest offset     (kept META_TTL after the last publication)
//! {prefix}:s:{T}:log    stream of the publications, id "<offset>-1", fields e (event) and p (payload);
//!                       MAXLEN history_size, expires history_ttl after the last publication
//! ```
//!
//! One Lua script per publication assigns the offset, appends and publishes
//! `S<offset> <epoch> <event length>\n<event><payload>` on the topic's
//! channel, atomically, so every node sees one order. Each node frames the
//! push once when the message arrives and forwards it in offset order: a
//! gap (a message lost in a Redis restart or failover) is filled from the
//! log before anything newer goes out, and a duplicate is dropped.
//!
//! An open (a subscriber's first position, or a recovery) reads the log;
//! its answer must sit at the right place among the live publications the
//! broker forwards to the same shard, like a home shard's answer on its
//! ordered queue: it answers at the offset it has forwarded (`last`),
//! waiting for live publications to catch up with what Redis reported, or
//! adding the frames it forwarded since, from a short cache.

use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::engine::home::{
    self, history_found, http_page_bytes, publish_accepted, replay_page_bytes, Log, Refusal,
};
use crate::engine::{Page, Position, Publication, Recovery, Window};
use crate::protocol::http::Response;
use crate::protocol::message;
use crate::rules::History;

use super::super::relay::Action;
use super::super::ClusterStatus;
use super::{BrokerState, Op};

/// How long the key a node gives its own stream publications in a Redis
/// Cluster lives: longer than any resend of the command by the client.
const REPLAY_WINDOW_MS: u64 = 30_000;

/// Where a read of a stream's log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::cluster) enum ReadFrom {
    /// No entries, only the position (and the latest, if asked).
    Nowhere,
    /// After this offset.
    After(u64),
    /// At the start of the window of the latest this many.
    Window(usize),
}

/// Publications read from the log per page of a replay or history answer:
/// the page's bytes usually end it first, and a read never carries a whole
/// large history.
const READ_PAGE: usize = 1024;

/// Who asked for an open (or the next page of a replay), and what.
pub(in crate::cluster) struct Opening {
    from: ShardId,
    ticket: u64,
    topic: Arc<str>,
    since: Option<(u64, Arc<str>)>,
    mark_through: u64,
    replay: usize,
}

/// A read of a stream's log.
#[derive(Debug, Clone)]
pub(in crate::cluster) struct Read {
    pub(in crate::cluster) epoch: Arc<str>,
    /// The stream's latest offset.
    pub(in crate::cluster) offset: u64,
    /// The oldest offset the log holds (`offset + 1` when it holds none).
    pub(in crate::cluster) first: u64,
    /// Offsets and frames after the position asked for, oldest first.
    pub(in crate::cluster) entries: Vec<(u64, Bytes)>,
    /// The latest publications, oldest first.
    pub(in crate::cluster) latest: Vec<(u64, Bytes)>,
}

impl Read {
    /// Whether every publication after `offset` of this run is in the log.
    fn holds_after(&self, offset: u64) -> bool {
        offset <= self.offset && offset + 1 >= self.first
    }

    /// Whether the log holds publications after the entries read (the read
    /// stopped at its count).
    fn continues(&self) -> bool {
        self.entries.last().is_some_and(|(at, _)| *at < self.offset)
    }
}

/// What Redis returned for one request, and what this node forwarded
/// after it: a stream's history as the home policy reads it.
struct RedisLog {
    /// Where the answer stands: what was forwarded (an open), or Redis's
    /// position (a query).
    position: Position,
    read: Read,
    /// Frames forwarded after the read's offset, oldest first.
    newer: Vec<(u64, Bytes)>,
    /// `newer` holds every publication between the read and `position`.
    covered: bool,
}

impl Log for RedisLog {
    fn position(&mut self) -> Position {
        self.position.clone()
    }

    /// The read's entries after `since`, if Redis still held them all and
    /// the frames forwarded since are all at hand. A read cut at its count
    /// goes on from its last entry next page; one that reached Redis's
    /// offset goes on with what was forwarded since. (The read was bounded
    /// when it was made; the page cuts it by bytes.)
    fn recover(&mut self, since: &Position, _window: Window) -> Recovery {
        let holds = *since.epoch == *self.read.epoch && self.read.holds_after(since.offset);
        if !holds || !self.covered {
            return Recovery::Gone {
                position: self.position.clone(),
            };
        }
        let more = self.read.continues();
        let mut entries = std::mem::take(&mut self.read.entries);
        if !more {
            entries.append(&mut self.newer);
        }
        let after = since.offset;
        Recovery::Recovered {
            publications: publications(entries).filter(|p| p.offset > after).collect(),
            position: self.position.clone(),
            more,
        }
    }

    fn latest(&mut self, count: usize) -> Vec<Publication> {
        let read = std::mem::take(&mut self.read.latest);
        let newer = std::mem::take(&mut self.newer);
        publications(latest(read, newer, count)).collect()
    }

    fn window(&mut self, _limit: usize) -> (Vec<Publication>, bool) {
        let more = self.read.continues();
        (
            publications(std::mem::take(&mut self.read.entries)).collect(),
            more,
        )
    }
}

/// Log entries as the engine's publications.
fn publications(entries: Vec<(u64, Bytes)>) -> impl Iterator<Item = Publication> {
    entries
        .into_iter()
        .map(|(offset, frame)| Publication { offset, frame })
}

/// Why a stream publication got no position.
#[derive(Debug)]
pub(in crate::cluster) enum Failure {
    /// Redis never ran it (it was not sent, or Redis refused the script).
    NotStored(String),
    /// Sent, and no answer came (a timeout, a dropped connection): Redis
    /// may have stored and delivered it.
    Unknown(String),
}

/// Who a stream publication's answer goes to, and the bytes it holds of
/// `max_queued_bytes` until Redis answers.
#[derive(Debug, Clone)]
pub(in crate::cluster) struct PublishAnswer {
    pub(in crate::cluster) from: ShardId,
    pub(in crate::cluster) ticket: Option<u64>,
    pub(in crate::cluster) topic: Arc<str>,
    pub(in crate::cluster) held: usize,
}

/// A stream publication for Redis's publish script.
#[derive(Debug, Clone)]
pub(in crate::cluster) struct StreamPublication {
    pub(in crate::cluster) answer: PublishAnswer,
    /// The topic's channel, where the script publishes it.
    pub(in crate::cluster) channel: String,
    pub(in crate::cluster) event: String,
    pub(in crate::cluster) payload: String,
    /// The log keeps this many.
    pub(in crate::cluster) history_size: usize,
    /// The log lives this long after the last publication.
    pub(in crate::cluster) ttl_ms: u64,
    /// A second run with this key within `window_ms` answers the first
    /// run's position and stores nothing.
    pub(in crate::cluster) key: Option<String>,
    pub(in crate::cluster) window_ms: u64,
}

/// A read of a stream's log for the read script.
#[derive(Debug, Clone)]
pub(in crate::cluster) struct ReadRequest {
    /// Answered by `Event::Read` with this id.
    pub(in crate::cluster) id: u64,
    pub(in crate::cluster) topic: Arc<str>,
    pub(in crate::cluster) from: ReadFrom,
    /// Entries at most.
    pub(in crate::cluster) limit: usize,
    /// The latest this many too.
    pub(in crate::cluster) latest: usize,
    /// A holder's read: a stream Redis does not have starts now. A plain
    /// read stores nothing.
    pub(in crate::cluster) create: bool,
}

/// What a read in flight is for.
pub(super) enum ReadFor {
    Open(Opening),
    Query(Query),
    /// A gap in what was forwarded, filled from the log.
    Fill(Arc<str>),
    /// Where Redis stands, after a reconnection.
    Check(Arc<str>),
}

/// A shard's history query (`Envelope::StreamQuery`), while Redis reads
/// for it.
pub(super) struct Query {
    pub(super) from: ShardId,
    pub(super) ticket: u64,
    pub(super) topic: Arc<str>,
    pub(super) since: Option<u64>,
    pub(super) epoch: Option<String>,
    pub(super) limit: usize,
}

/// Parses a stream message: `S<offset> <epoch> <event length>\n<event><payload>`.
pub(in crate::cluster) fn parse_message(message: &[u8]) -> Option<(u64, &str, &str, &str)> {
    let rest = message.strip_prefix(b"S")?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&rest[..newline]).ok()?;
    let mut fields = head.split(' ');
    let offset = fields.next()?.parse().ok()?;
    let epoch = fields.next()?;
    let event_len: usize = fields.next()?.parse().ok()?;
    let body = std::str::from_utf8(&rest[newline + 1..]).ok()?;
    if !body.is_char_boundary(event_len) {
        return None;
    }
    let (event, payload) = body.split_at(event_len);
    Some((offset, epoch, event, payload))
}

impl BrokerState {
    /// The history settings of `topic`, if its rule makes it a stream.
    fn history(&self, topic: &str) -> Option<History> {
        let channel = self.shared.channels.resolve(topic)?;
        self.shared.channels.hook(channel).history()
    }

    fn reply(&mut self, to: ShardId, ticket: u64, response: Response) {
        self.send(to, Envelope::stream_reply(ticket, &response));
    }

    pub(super) fn on_stream_publish(
        &mut self,
        from: ShardId,
        topic: Arc<str>,
        event: String,
        payload: String,
        ticket: Option<u64>,
        idempotency_key: Option<Box<str>>,
    ) {
        // The shard counted these bytes against `max_queued_bytes`; they
        // are released when Redis answers, or here when it is not asked.
        let held = event.len() + payload.len();
        let refusal = match self.history(&topic) {
            None => Some(Refusal::NoHistory {
                topic: topic.clone(),
            }),
            Some(_) if !self.status.is_up() => {
                ClusterStatus::count(&self.status.stats.refused_total);
                Some(Refusal::NeedsRedis)
            }
            Some(_) if self.publishing >= super::PUBLISH_QUEUE => {
                ClusterStatus::count(&self.status.stats.drops_total);
                Some(Refusal::RedisBusy)
            }
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            self.status.release(held);
            if let Some(ticket) = ticket {
                self.reply(from, ticket, refusal.response());
            }
            return;
        }
        let history = self.history(&topic).expect("refused above when none");
        let mut window_ms = self.shared.config.limits.idempotency_window_s.max(1) * 1000;
        let key = match idempotency_key {
            Some(key) => Some(key.to_string()),
            // A Redis Cluster client sends a command again after a
            // redirection, or after its connection dropped with the command
            // unanswered: a key of the node's own makes a second run answer
            // with the first one's position instead of storing it twice.
            None if self.clustered => {
                window_ms = REPLAY_WINDOW_MS;
                self.replay_keys += 1;
                Some(format!("~{:016x}-{}", self.node, self.replay_keys))
            }
            None => None,
        };
        let publication = StreamPublication {
            answer: PublishAnswer {
                from,
                ticket,
                topic: topic.clone(),
                held,
            },
            channel: super::wire::channel(&self.prefix, IndexKind::Topic, &topic),
            event,
            payload,
            history_size: history.size,
            ttl_ms: (history.ttl.as_millis() as u64).max(1),
            key,
            window_ms,
        };
        self.publishing += 1;
        self.ops.push(Op::StreamPublish(publication));
    }

    pub(super) fn on_stream_published(
        &mut self,
        answer: PublishAnswer,
        result: Result<Position, Failure>,
    ) {
        debug_assert!(self.publishing > 0, "an answer to no stream publication");
        self.status.release(answer.held);
        self.publishing -= 1;
        let PublishAnswer {
            from,
            ticket,
            topic,
            ..
        } = answer;
        let response = match result {
            Ok(position) => {
                // Acknowledged: this node's subscribers get it before a
                // drain closes them (see `BrokerState::check_drain`).
                self.relay.acknowledged(&topic, &position);
                ClusterStatus::count(&self.status.stats.published_total);
                // This node's shards holding the topic: Redis has sent it
                // to them, as to every node's.
                let key = (IndexKind::Topic, topic);
                let shards = self.interest.holders(&key).map_or(0, |s| s.iter().count());
                publish_accepted(shards, Some(&position))
            }
            Err(Failure::NotStored(e)) => {
                tracing::debug!("cluster: stream publication failed: {e}");
                ClusterStatus::count(&self.status.stats.drops_total);
                Refusal::NotStored.response()
            }
            Err(Failure::Unknown(e)) => {
                tracing::debug!("cluster: stream publication's outcome unknown: {e}");
                ClusterStatus::count(&self.status.stats.unknown_total);
                Refusal::OutcomeUnknown.response()
            }
        };
        if let Some(ticket) = ticket {
            self.reply(from, ticket, response);
        }
    }

    /// Starts a read of `topic`'s log (or queues it behind the gate): up to
    /// `limit` entries from where `from` says, and the latest `latest`.
    fn read(
        &mut self,
        topic: &Arc<str>,
        from: ReadFrom,
        limit: usize,
        latest: usize,
        then: ReadFor,
    ) {
        self.next_read += 1;
        let id = self.next_read;
        // A query reads; a holder's read starts a stream Redis lost.
        let create = !matches!(then, ReadFor::Query(_));
        self.read_for.insert(id, then);
        let request = ReadRequest {
            id,
            topic: topic.clone(),
            from,
            limit,
            latest,
            create,
        };
        if let Some(request) = self.reads.admit(request) {
            self.ops.push(Op::Read(request));
        }
    }

    /// A read came back: the next waiting one starts, and the answer goes
    /// where the read was for.
    pub(super) fn on_read(&mut self, id: u64, result: Result<Read, String>) {
        if let Some(next) = self.reads.done() {
            self.ops.push(Op::Read(next));
        }
        let Some(then) = self.read_for.remove(&id) else {
            debug_assert!(false, "an answer to read {id}, never asked");
            return;
        };
        match then {
            ReadFor::Open(opening) => self.on_stream_opened(opening, result),
            ReadFor::Query(query) => self.on_stream_queried(query, result),
            ReadFor::Fill(topic) => {
                if let Err(e) = &result {
                    tracing::debug!("cluster: filling a stream gap failed: {e}");
                }
                self.relay.filled(&topic, result.ok());
                self.run_relay();
            }
            ReadFor::Check(topic) => {
                self.relay.checked(&topic, result.ok());
                self.run_relay();
            }
        }
    }

    pub(super) fn on_stream_open(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: Arc<str>,
        since: Option<(u64, Arc<str>)>,
        mark_through: u64,
    ) {
        let replay = self.history(&topic).map_or(0, |h| h.replay_on_subscribe);
        let start = since
            .as_ref()
            .map_or(ReadFrom::Nowhere, |(offset, _)| ReadFrom::After(*offset));
        let opening = Opening {
            from,
            ticket,
            topic: topic.clone(),
            since,
            mark_through,
            replay,
        };
        if !self.status.is_up() {
            // Degraded: history lives in Redis, so a recovery asked for
            // is not possible now.
            let recovered = opening.since.as_ref().map(|_| false);
            return self.answer_open_from_last_seen(opening, recovered);
        }
        self.relay.opening(&topic);
        self.read(&topic, start, READ_PAGE, replay, ReadFor::Open(opening));
    }

    fn on_stream_opened(&mut self, opening: Opening, result: Result<Read, String>) {
        match result {
            Ok(read) => {
                let topic = opening.topic.clone();
                self.relay.opened(&topic, opening, read);
                self.run_relay();
            }
            Err(e) => {
                tracing::debug!("cluster: stream read failed: {e}");
                let recovered = opening.since.as_ref().map(|_| false);
                self.answer_open_from_last_seen(opening, recovered);
            }
        }
    }

    /// Answers an open once forwarding reached its read's position, with
    /// the page a home shard would give (`engine::home::open`).
    fn complete_open(&mut self, opening: Opening, mut log: RedisLog) {
        let since = opening.since.as_ref().map(|(offset, epoch)| Position {
            offset: *offset,
            epoch: epoch.clone(),
        });
        let page_bytes = replay_page_bytes(&self.shared.config.limits);
        let (replay, mark_through) = (opening.replay, opening.mark_through);
        let page = home::open(&mut log, since.as_ref(), replay, page_bytes, mark_through);
        self.answer_open(opening, page)
    }

    /// Answers an open without Redis: the subscriber learns where this
    /// node last saw the stream.
    fn answer_open_from_last_seen(&mut self, opening: Opening, recovered: Option<bool>) {
        let position = self.relay.position(&opening.topic);
        let page = Page::empty(recovered, position);
        self.answer_open(opening, page);
    }

    fn answer_open(&mut self, opening: Opening, page: Page) {
        let opened = Envelope::StreamOpened {
            ticket: opening.ticket,
            answer: Ok(Box::new(page)),
        };
        self.send(opening.from, opened);
    }

    pub(super) fn on_stream_query(&mut self, query: Query) {
        if !self.status.is_up() {
            return self.reply(query.from, query.ticket, Refusal::NeedsRedis.response());
        }
        let start = query
            .since
            .map_or(ReadFrom::Window(query.limit), ReadFrom::After);
        let topic = query.topic.clone();
        let limit = query.limit.min(READ_PAGE);
        self.read(&topic, start, limit, 0, ReadFor::Query(query));
    }

    fn on_stream_queried(&mut self, query: Query, result: Result<Read, String>) {
        let Query {
            from,
            ticket,
            topic,
            since,
            epoch,
            limit,
        } = query;
        let Ok(read) = result else {
            return self.reply(from, ticket, Refusal::NeedsRedis.response());
        };
        let page_bytes = http_page_bytes(&self.shared.config.limits);
        let mut log = RedisLog {
            position: Position {
                offset: read.offset,
                epoch: read.epoch.clone(),
            },
            read,
            newer: Vec::new(),
            covered: true,
        };
        let answer = match home::history(&mut log, since, epoch.as_deref(), limit, page_bytes) {
            Ok(page) => history_found(&topic, &page),
            Err(refusal) => refusal.response(),
        };
        self.reply(from, ticket, answer);
    }

    /// A stream publication from Redis.
    pub(super) fn on_stream_message(&mut self, topic: &str, bytes: &[u8]) {
        let Some((offset, epoch, event, payload)) = parse_message(bytes).filter(|m| m.0 > 0) else {
            return;
        };
        if !self.relay.holds(topic) {
            // No subscriber here has opened it yet: its first open reads
            // the position.
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        let frame = message::push_at(&topic, offset, event, payload);
        self.relay.message(&topic, offset, epoch, frame);
        self.run_relay();
    }

    /// After a reconnection (or as a drain begins): reads where Redis
    /// stands on every stream the node's shards hold (see `Relay::check_all`).
    pub(super) fn check_streams(&mut self) {
        self.relay.check_all();
        self.run_relay();
    }

    /// Carries out what the stream relay asks for.
    pub(super) fn run_relay(&mut self) {
        for action in self.relay.take_actions() {
            match action {
                Action::Deliver { topic, frame } => self.deliver(&topic, frame),
                Action::Reset { topic, epoch } => {
                    tracing::warn!(
                        "cluster: stream `{topic}` restarted under epoch {epoch}: Redis lost its history"
                    );
                    ClusterStatus::count(&self.status.stats.stream_resets_total);
                    self.deliver(&topic, message::stream_reset(&topic, &epoch));
                }
                Action::Fill { topic, after } => {
                    let then = ReadFor::Fill(topic.clone());
                    self.read(&topic, ReadFrom::After(after), READ_PAGE, 0, then);
                }
                Action::Check { topic } => {
                    // A holder's read: a stream Redis lost starts its new run now.
                    let then = ReadFor::Check(topic.clone());
                    self.read(&topic, ReadFrom::Nowhere, 0, 0, then);
                }
                Action::Open {
                    opening,
                    read,
                    forwarded,
                    newer,
                    covered,
                } => {
                    let log = RedisLog {
                        position: forwarded,
                        read,
                        newer,
                        covered,
                    };
                    self.complete_open(opening, log);
                }
                Action::Skipped { topic, count } => {
                    // Gone from the log too (trimmed, or Redis lost it):
                    // subscribers see the hole in the offsets.
                    tracing::debug!("cluster: {count} publications of `{topic}` gone from Redis");
                    self.status
                        .stats
                        .drops_total
                        .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    fn deliver(&mut self, topic: &Arc<str>, frame: Bytes) {
        let key = (IndexKind::Topic, topic.clone());
        let Some(shards) = self.interest.holders(&key) else {
            return;
        };
        let envelope = Envelope::Publish {
            topic: topic.clone(),
            frame,
        };
        self.deliver_to_shards(shards, envelope);
    }
}

/// The latest `count` of the read's entries and the newer forwarded ones.
fn latest(entries: Vec<(u64, Bytes)>, newer: Vec<(u64, Bytes)>, count: usize) -> Vec<(u64, Bytes)> {
    let mut all: Vec<(u64, Bytes)> = entries.into_iter().chain(newer).collect();
    all.sort_by_key(|(at, _)| *at);
    all.dedup_by_key(|(at, _)| *at);
    let skip = all.len().saturating_sub(count);
    all.into_iter().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages_split_at_the_event_length() {
        let message = b"S42 0a1b2c3d4e5f6a7b 7\ncreated{\"id\":1}";
        assert_eq!(
            parse_message(message),
            Some((42, "0a1b2c3d4e5f6a7b", "created", "{\"id\":1}"))
        );
        assert_eq!(parse_message(b"S1 e 9\nshort"), None);
        assert_eq!(parse_message(b"F..."), None);
    }

    #[test]
    fn latest_keeps_the_newest_without_duplicates() {
        let f = |n: u64| (n, Bytes::from(n.to_string()));
        let frames = latest(vec![f(1), f(2), f(3)], vec![f(3), f(4)], 3);
        assert_eq!(frames, vec![f(2), f(3), f(4)]);
    }
}
