//! Topic streams in a cluster: Redis orders and keeps them; the broker is
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
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::LuaInterface;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::mpsc;

use crate::bus::{Envelope, ShardId};
use crate::engine::home::{
    self, history_found, http_page_bytes, os_epoch, publish_accepted, replay_page_bytes, Log,
    Refusal,
};
use crate::engine::{Page, Position, Publication, Recovery, Window};
use crate::protocol::http::Response;
use crate::protocol::message;
use crate::rules::History;

use super::broker::Broker;
use super::relay::Action;
use super::ClusterStatus;

/// A stream's epoch and offset live this long after its last publication
/// (its publications only for `history_ttl`): a client reconnecting after
/// the history expired learns `recovered:false` under the same epoch,
/// rather than a new stream whose offsets restart.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the key a node gives its own stream publications in a Redis
/// Cluster lives: longer than any resend of the command by the client.
const REPLAY_WINDOW: Duration = Duration::from_secs(30);
/// Stream publications waiting for Redis, per node; past it a publish gets
/// 503 (`cluster busy`).
const PUBLISH_QUEUE: usize = 16_384;

const PUBLISH_SCRIPT: &str = r#"
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    local space = string.find(first, ' ', 1, true)
    return {tonumber(string.sub(first, 1, space - 1)), string.sub(first, space + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-1', 'e', ARGV[6], 'p', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SPUBLISH', ARGV[1], 'S' .. string.format('%d', offset) .. ' ' .. epoch .. ' ' .. #ARGV[6] .. '\n' .. ARGV[6] .. ARGV[7])
if KEYS[3] then
  redis.call('SET', KEYS[3], string.format('%d', offset) .. ' ' .. epoch, 'PX', ARGV[8])
end
return {offset, epoch}
"#;

/// Returns `{epoch, offset, first offset kept (offset + 1 if none), entries,
/// latest}`: entries after ARGV[3] (up to ARGV[4]; none when it is -1) and
/// the latest ARGV[5], newest first. ARGV[3] of -2 reads the window of the
/// latest ARGV[5] from its start instead (up to ARGV[4] of it, no latest).
/// A stream without meta is created with epoch ARGV[1] when ARGV[6] is 1
/// (a holder opens it); a read alone (ARGV[6] 0) answers offset 0 of no
/// epoch and stores nothing.
const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  if ARGV[6] ~= '1' then return {'', 0, 1, {}, {}} end
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'o'))
local first = offset + 1
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
local entries = {}
local latest = {}
local since = tonumber(ARGV[3])
if since == -2 then
  since = math.max(first - 1, offset - tonumber(ARGV[5]))
elseif tonumber(ARGV[5]) > 0 then
  latest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[5])
end
if since >= 0 then
  entries = redis.call('XRANGE', KEYS[2], '(' .. since .. '-1', '+', 'COUNT', ARGV[4])
end
return {epoch, offset, first, entries, latest}
"#;

/// Offsets above this are not exact as Lua numbers (doubles): no stream
/// gets that far, so a position past it is simply not in history, and is
/// never handed to a script.
const MAX_SCRIPT_OFFSET: u64 = (1 << 53) - 1;

/// Where a read of a stream's log starts.
#[derive(Debug, Clone, Copy)]
enum ReadFrom {
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
pub(super) struct Opening {
    from: ShardId,
    ticket: u64,
    topic: Arc<str>,
    since: Option<(u64, Arc<str>)>,
    mark_through: u64,
    replay: usize,
}

/// A read of a stream's log.
#[derive(Debug, Clone)]
pub(super) struct Read {
    pub(super) epoch: Arc<str>,
    /// The stream's latest offset.
    pub(super) offset: u64,
    /// The oldest offset the log holds (`offset + 1` when it holds none).
    pub(super) first: u64,
    /// Offsets and frames after the position asked for, oldest first.
    pub(super) entries: Vec<(u64, Bytes)>,
    /// The latest publications, oldest first.
    pub(super) latest: Vec<(u64, Bytes)>,
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

/// A Redis answer for the broker's loop.
pub(super) enum StreamDone {
    Published {
        from: ShardId,
        ticket: Option<u64>,
        topic: Arc<str>,
        held: usize,
        result: Result<Position, Failure>,
    },
    Opened {
        opening: Opening,
        result: Result<Read, String>,
    },
    Queried {
        query: Query,
        result: Result<Read, String>,
    },
    Filled {
        topic: Arc<str>,
        result: Result<Read, String>,
    },
    /// Where Redis stands on a stream, read after a reconnection.
    Checked {
        topic: Arc<str>,
        result: Result<Read, String>,
    },
}

/// Why a stream publication got no position.
#[derive(Debug)]
pub(super) enum Failure {
    /// Redis never ran it (it was not sent, or Redis refused the script).
    NotStored(String),
    /// Sent, and no answer came (a timeout, a dropped connection): Redis
    /// may have stored and delivered it.
    Unknown(String),
}

impl Failure {
    /// What a failed round trip means for a publication that was sent.
    fn of(error: &Error) -> Failure {
        match error.kind() {
            // Checked or refused before anything ran.
            ErrorKind::Config
            | ErrorKind::Auth
            | ErrorKind::Url
            | ErrorKind::InvalidCommand
            | ErrorKind::InvalidArgument
            | ErrorKind::Backpressure => Failure::NotStored(error.to_string()),
            _ => Failure::Unknown(error.to_string()),
        }
    }
}

/// Replicas a stream publication must reach before it is acknowledged, and
/// how long Redis waits for them (under the command timeout).
#[derive(Debug, Clone, Copy)]
pub(super) struct WaitReplicas {
    pub(super) replicas: u32,
    pub(super) timeout_ms: u64,
}

/// Stream reads the broker has in flight at most; more wait their turn.
pub(super) const READS_IN_FLIGHT: usize = 256;

/// A read of a stream's log, ready to run.
pub(super) type ReadJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

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

/// A publication for the stream publish task.
pub(super) struct PublishJob {
    from: ShardId,
    ticket: Option<u64>,
    topic: Arc<str>,
    /// Bytes counted against `max_queued_bytes` until Redis answers.
    held: usize,
    keys: Vec<String>,
    args: Vec<String>,
}

/// Keys of topic `T`'s stream.
fn keys(prefix: &str, topic: &str) -> Vec<String> {
    vec![
        format!("{prefix}:s:{{{topic}}}:meta"),
        format!("{prefix}:s:{{{topic}}}:log"),
    ]
}

/// Parses a stream message: `S<offset> <epoch> <event length>\n<event><payload>`.
pub(super) fn parse_message(message: &[u8]) -> Option<(u64, &str, &str, &str)> {
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

/// Runs stream publications in pipelines, in the order they came.
pub(super) async fn publish_task(
    client: Client,
    mut jobs: mpsc::Receiver<PublishJob>,
    done: mpsc::UnboundedSender<StreamDone>,
    wait: Option<WaitReplicas>,
) {
    // The script goes by its digest; Redis has it cached after the first
    // EVAL, and a Redis that lost its cache (a restart) answers NOSCRIPT
    // without running anything, so those are sent again whole.
    let digest = fred::util::sha1_hash(PUBLISH_SCRIPT);
    let mut batch = Vec::with_capacity(256);
    while jobs.recv_many(&mut batch, 256).await > 0 {
        let sent = run_publications(&client, &digest, std::mem::take(&mut batch), wait).await;
        let (unknown_script, mut answered): (Vec<_>, Vec<_>) = sent
            .into_iter()
            .partition(|(_, sent)| sent.unknown_script());
        if !unknown_script.is_empty() {
            let jobs = unknown_script.into_iter().map(|(job, _)| job).collect();
            answered.extend(run_publications(&client, PUBLISH_SCRIPT, jobs, wait).await);
        }
        for (job, sent) in answered {
            let result = match sent {
                Sent::Not(e) => Err(Failure::NotStored(e.to_string())),
                Sent::Answered(Ok(value)) => position(value)
                    .ok_or_else(|| Failure::Unknown("an unreadable reply".to_string())),
                Sent::Answered(Err(e)) => Err(Failure::of(&e)),
            };
            let _ = done.send(StreamDone::Published {
                from: job.from,
                ticket: job.ticket,
                topic: job.topic,
                held: job.held,
                result,
            });
        }
        batch = Vec::with_capacity(256);
    }
}

/// A script's answer, once `WAIT` says how many replicas have it: fewer
/// than asked is a timeout (the publication may yet be lost in a failover).
fn replicated(
    ran: Result<Value, Error>,
    waited: Result<Value, Error>,
    replicas: u32,
) -> Result<Value, Error> {
    let ran = ran?;
    let reached = waited?.as_u64().unwrap_or(0);
    if reached < u64::from(replicas) {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!("stored, and reached {reached} of {replicas} replicas in time"),
        ));
    }
    Ok(ran)
}

/// What became of one publication in a pipeline.
enum Sent {
    /// It could not be queued: Redis ran nothing.
    Not(Error),
    /// Redis's answer, or the error in its place.
    Answered(Result<Value, Error>),
}

impl Sent {
    /// Redis did not know the script's digest and ran nothing.
    fn unknown_script(&self) -> bool {
        matches!(self, Sent::Answered(Err(e)) if e.details().starts_with("NOSCRIPT"))
    }
}

/// Runs the publish script for each job in one pipeline: by digest
/// (EVALSHA, `script` a SHA-1 in hex) or by text (EVAL); with `wait`, each
/// followed by a `WAIT` on the same connection, and a publication that
/// reached fewer replicas fails with a timeout (outcome unknown).
async fn run_publications(
    client: &Client,
    script: &str,
    jobs: Vec<PublishJob>,
    wait: Option<WaitReplicas>,
) -> Vec<(PublishJob, Sent)> {
    let by_digest = script.len() == 40 && script.bytes().all(|b| b.is_ascii_hexdigit());
    let command = if by_digest { "EVALSHA" } else { "EVAL" };
    let pipeline = client.pipeline();
    let mut queued = Vec::with_capacity(jobs.len());
    for job in jobs {
        // A custom command: fred's pipeline has no Lua interface. The slot
        // is the first key's (argument 2).
        let mut args: Vec<Value> = vec![script.into(), Value::from(job.keys.len() as i64)];
        args.extend(job.keys.iter().map(|k| Value::from(k.as_str())));
        args.extend(job.args.iter().map(|a| Value::from(a.as_str())));
        let eval = CustomCommand::new_static(command, ClusterHash::Offset(2), false);
        let mut sent: Result<(), Error> = pipeline.custom(eval, args).await;
        if let (Some(wait), Ok(())) = (wait, &sent) {
            // To the connection that ran the script: its slot's.
            let slot = fred::util::redis_keyslot(job.keys[0].as_bytes());
            let command = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false);
            let args = vec![
                Value::from(i64::from(wait.replicas)),
                Value::from(wait.timeout_ms as i64),
            ];
            sent = pipeline.custom(command, args).await;
        }
        queued.push((job, sent));
    }
    let mut results = pipeline.try_all::<Value>().await.into_iter();
    let mut next = || {
        results
            .next()
            .unwrap_or_else(|| Err(Error::new(ErrorKind::IO, "no reply")))
    };
    queued
        .into_iter()
        .map(|(job, sent)| {
            let sent = match sent {
                Err(e) => Sent::Not(e),
                Ok(()) => {
                    let ran = next();
                    match wait {
                        None => Sent::Answered(ran),
                        Some(wait) => Sent::Answered(replicated(ran, next(), wait.replicas)),
                    }
                }
            };
            (job, sent)
        })
        .collect()
}

fn position(value: Value) -> Option<Position> {
    let mut items = value.into_array().into_iter();
    let offset = items.next()?.as_u64()?;
    let epoch = items.next()?.as_str()?.into_owned();
    Some(Position {
        offset,
        epoch: Arc::from(epoch),
    })
}

fn parse_read(topic: &str, value: Value) -> Option<Read> {
    let mut items = value.into_array().into_iter();
    let epoch: Arc<str> = Arc::from(items.next()?.as_str()?.into_owned());
    let offset = items.next()?.as_u64()?;
    let first = items.next()?.as_u64()?;
    let entries = parse_entries(topic, items.next()?)?;
    let latest = parse_entries(topic, items.next()?)?;
    Some(Read {
        epoch,
        offset,
        first,
        entries,
        latest,
    })
}

/// Log entries as framed pushes, oldest first.
fn parse_entries(topic: &str, value: Value) -> Option<Vec<(u64, Bytes)>> {
    let mut entries = Vec::new();
    for entry in value.into_array() {
        let mut entry = entry.into_array().into_iter();
        let id = entry.next()?.as_str()?.into_owned();
        let at: u64 = id.split('-').next()?.parse().ok()?;
        let fields = entry.next()?.into_array();
        let (mut event, mut payload) = (None, None);
        for pair in fields.chunks(2) {
            match (pair[0].as_str().as_deref(), pair.get(1)) {
                (Some("e"), Some(v)) => event = v.as_str().map(|s| s.into_owned()),
                (Some("p"), Some(v)) => payload = v.as_str().map(|s| s.into_owned()),
                _ => {}
            }
        }
        let frame = message::push_at(topic, at, &event?, &payload?);
        entries.push((at, frame));
    }
    entries.sort_by_key(|(at, _)| *at);
    Some(entries)
}

impl Broker {
    /// The history settings of `topic`, if its rule makes it a stream.
    fn history(&self, topic: &str) -> Option<History> {
        let channel = self.shared.channels.resolve(topic)?;
        self.shared.channels.hook(channel).history()
    }

    fn reply(&mut self, to: ShardId, ticket: u64, response: Response) {
        self.outbox
            .send(&self.bus, to, Envelope::stream_reply(ticket, &response));
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
        let Some(history) = self.history(&topic) else {
            self.status.release(held);
            if let Some(ticket) = ticket {
                let answer = Refusal::NoHistory { topic }.response();
                self.reply(from, ticket, answer);
            }
            return;
        };
        if !self.status.is_up() {
            self.status.release(held);
            ClusterStatus::count(&self.status.stats.refused_total);
            if let Some(ticket) = ticket {
                self.reply(from, ticket, Refusal::NeedsRedis.response());
            }
            return;
        }
        let channel = super::wire::channel(&self.prefix, crate::bus::IndexKind::Topic, &topic);
        let ttl_ms = history.ttl.as_millis().max(1);
        let mut keys = keys(&self.prefix, &topic);
        let mut window_ms = self.shared.config.limits.idempotency_window_s.max(1) * 1000;
        let key = match idempotency_key {
            Some(key) => Some(key.to_string()),
            // A Redis Cluster client sends a command again after a
            // redirection, or after its connection dropped with the command
            // unanswered: a key of the node's own makes a second run answer
            // with the first one's position instead of storing it twice.
            None if self.publisher.is_clustered() => {
                window_ms = REPLAY_WINDOW.as_millis() as u64;
                self.replay_keys += 1;
                Some(format!("~{:016x}-{}", self.node, self.replay_keys))
            }
            None => None,
        };
        if let Some(key) = key {
            // Beside the stream's keys (the same hash tag, so the same slot).
            keys.push(format!("{}:s:{{{topic}}}:k:{key}", self.prefix));
        }
        let job = PublishJob {
            from,
            ticket,
            topic: topic.clone(),
            held,
            keys,
            args: vec![
                channel,
                os_epoch().to_string(),
                history.size.to_string(),
                ttl_ms.to_string(),
                META_TTL.as_millis().max(ttl_ms).to_string(),
                event,
                payload,
                window_ms.to_string(),
            ],
        };
        if self.stream_publishes.try_send(job).is_ok() {
            self.drain.publishing += 1;
        } else {
            self.status.release(held);
            ClusterStatus::count(&self.status.stats.drops_total);
            if let Some(ticket) = ticket {
                self.reply(from, ticket, Refusal::RedisBusy.response());
            }
        }
    }

    pub(super) fn on_stream_published(
        &mut self,
        from: ShardId,
        ticket: Option<u64>,
        topic: Arc<str>,
        held: usize,
        result: Result<Position, Failure>,
    ) {
        self.status.release(held);
        self.drain.publishing -= 1;
        let answer = match result {
            Ok(position) => {
                // Acknowledged: this node's subscribers get it before a
                // drain closes them (see `Broker::check_drain`).
                self.relay.acknowledged(&topic, &position);
                ClusterStatus::count(&self.status.stats.published_total);
                // This node's shards holding the topic: Redis has sent it
                // to them, as to every node's.
                let key = (crate::bus::IndexKind::Topic, topic);
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
            self.reply(from, ticket, answer);
        }
    }

    /// Starts a read of `topic`'s log: up to `limit` entries from where
    /// `from` says, and the latest `latest`. A holder's read (`create`)
    /// starts the stream if Redis has none; a plain read stores nothing.
    fn read(
        &mut self,
        topic: &str,
        from: ReadFrom,
        limit: usize,
        latest: usize,
        create: bool,
        then: impl FnOnce(Result<Read, String>) -> StreamDone + Send + 'static,
    ) {
        let client = self.publisher.clone();
        let done = self.stream_done.clone();
        let keys = keys(&self.prefix, topic);
        let (since, latest) = match from {
            ReadFrom::Nowhere => (-1, latest),
            // Past any offset a stream reaches: the position alone tells.
            ReadFrom::After(offset) if offset > MAX_SCRIPT_OFFSET => (-1, latest),
            ReadFrom::After(offset) => (i128::from(offset), latest),
            ReadFrom::Window(window) => (-2, window),
        };
        let args = vec![
            os_epoch().to_string(),
            META_TTL.as_millis().to_string(),
            since.to_string(),
            limit.to_string(),
            latest.to_string(),
            u8::from(create).to_string(),
        ];
        let topic = topic.to_string();
        let job: ReadJob = Box::pin(async move {
            let result = match client.eval::<Value, _, _, _>(READ_SCRIPT, keys, args).await {
                Ok(value) => parse_read(&topic, value).ok_or_else(|| "bad reply".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = done.send(then(result));
        });
        if let Some(job) = self.reads.admit(job) {
            tokio::spawn(job);
        }
    }

    /// A read came back: the next waiting one starts.
    pub(super) fn read_done(&mut self) {
        if let Some(job) = self.reads.done() {
            tokio::spawn(job);
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
        let opening = Opening {
            from,
            ticket,
            topic: topic.clone(),
            since: since.clone(),
            mark_through,
            replay,
        };
        if !self.status.is_up() {
            // Degraded: history lives in Redis, so a recovery asked for
            // is not possible now.
            let recovered = opening.since.as_ref().map(|_| false);
            return self.answer_open_from_last_seen(opening, recovered);
        }
        let from = since
            .as_ref()
            .map_or(ReadFrom::Nowhere, |(offset, _)| ReadFrom::After(*offset));
        self.read(&topic, from, READ_PAGE, replay, true, move |result| {
            StreamDone::Opened { opening, result }
        });
    }

    pub(super) fn on_stream_opened(&mut self, opening: Opening, result: Result<Read, String>) {
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
        self.outbox.send(&self.bus, opening.from, opened);
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
        self.read(&topic, start, limit, 0, false, move |result| {
            StreamDone::Queried { query, result }
        });
    }

    pub(super) fn on_stream_queried(&mut self, query: Query, result: Result<Read, String>) {
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
                    let t = topic.clone();
                    self.read(
                        &topic,
                        ReadFrom::After(after),
                        READ_PAGE,
                        0,
                        true,
                        move |result| StreamDone::Filled { topic: t, result },
                    );
                }
                Action::Check { topic } => {
                    let t = topic.clone();
                    // A holder's read: a stream Redis lost starts its new run now.
                    self.read(&topic, ReadFrom::Nowhere, 0, 0, true, move |result| {
                        StreamDone::Checked { topic: t, result }
                    });
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

    pub(super) fn on_stream_filled(&mut self, topic: Arc<str>, result: Result<Read, String>) {
        if let Err(e) = &result {
            tracing::debug!("cluster: filling a stream gap failed: {e}");
        }
        self.relay.filled(&topic, result.ok());
        self.run_relay();
    }

    pub(super) fn on_stream_checked(&mut self, topic: Arc<str>, result: Result<Read, String>) {
        self.relay.checked(&topic, result.ok());
        self.run_relay();
    }

    fn deliver(&mut self, topic: &Arc<str>, frame: Bytes) {
        let key = (crate::bus::IndexKind::Topic, topic.clone());
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

/// The stream publish queue and its task.
pub(super) fn start(
    publisher: &Client,
    done: mpsc::UnboundedSender<StreamDone>,
    wait: Option<WaitReplicas>,
) -> mpsc::Sender<PublishJob> {
    let (jobs, rx) = mpsc::channel(PUBLISH_QUEUE);
    tokio::spawn(publish_task(publisher.clone(), rx, done, wait));
    jobs
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
