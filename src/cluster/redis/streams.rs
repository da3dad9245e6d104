//! Topic streams in Redis: the scripts that order and keep them, and the
//! tasks that run them for the broker's driver (the decisions are in
//! `cluster::state::streams`).
//!
//! In Redis, per topic `T` (the name in a hash tag, beside its channel):
//!
//! ```text
//! {prefix}:s:{T}:meta   hash: e = epoch, o = latest offset     (kept META_TTL after the last publication)
//! {prefix}:s:{T}:log    stream of the publications, id "<offset>-1", fields e (event) and p (payload);
//!                       MAXLEN history_size, expires history_ttl after the last publication
//! {prefix}:s:{T}:k:<K>  a publication's idempotency key K: "<offset> <epoch>" of its first run
//! ```
//!
//! One Lua script per publication assigns the offset, appends and publishes
//! `S<offset> <epoch> <event length>\n<event><payload>` on the topic's
//! channel, atomically, so every node sees one order.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::LuaInterface;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::mpsc;

use crate::engine::home::os_epoch;
use crate::engine::Position;
use crate::protocol::message;

use super::super::state::{Event, Failure, Read, ReadFrom, ReadRequest, StreamPublication};

/// A stream's epoch and offset live this long after its last publication
/// (its publications only for `history_ttl`): a client reconnecting after
/// the history expired learns `recovered:false` under the same epoch,
/// rather than a new stream whose offsets restart.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
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

/// Replicas a stream publication must reach before it is acknowledged, and
/// how long Redis waits for them (under the command timeout).
#[derive(Debug, Clone, Copy)]
pub(in crate::cluster) struct WaitReplicas {
    pub(in crate::cluster) replicas: u32,
    pub(in crate::cluster) timeout_ms: u64,
}

/// Keys of topic `T`'s stream.
fn keys(prefix: &str, topic: &str) -> Vec<String> {
    vec![
        format!("{prefix}:s:{{{topic}}}:meta"),
        format!("{prefix}:s:{{{topic}}}:log"),
    ]
}

/// The publish script's keys and arguments for `job`.
fn publish_arguments(prefix: &str, job: &StreamPublication) -> (Vec<String>, Vec<String>) {
    let topic = &job.answer.topic;
    let mut keys = keys(prefix, topic);
    if let Some(key) = &job.key {
        // Beside the stream's keys (the same hash tag, so the same slot).
        keys.push(format!("{prefix}:s:{{{topic}}}:k:{key}"));
    }
    let args = vec![
        job.channel.clone(),
        os_epoch().to_string(),
        job.history_size.to_string(),
        job.ttl_ms.to_string(),
        (META_TTL.as_millis() as u64).max(job.ttl_ms).to_string(),
        job.event.clone(),
        job.payload.clone(),
        job.window_ms.to_string(),
    ];
    (keys, args)
}

/// Runs a read of a stream's log and reports it.
pub(super) async fn read(
    client: Client,
    prefix: &str,
    request: ReadRequest,
    done: mpsc::UnboundedSender<Event>,
) {
    let keys = keys(prefix, &request.topic);
    let (since, latest) = match request.from {
        ReadFrom::Nowhere => (-1, request.latest),
        // Past any offset a stream reaches: the position alone tells.
        ReadFrom::After(offset) if offset > MAX_SCRIPT_OFFSET => (-1, request.latest),
        ReadFrom::After(offset) => (i128::from(offset), request.latest),
        ReadFrom::Window(window) => (-2, window),
    };
    let args = vec![
        os_epoch().to_string(),
        META_TTL.as_millis().to_string(),
        since.to_string(),
        request.limit.to_string(),
        latest.to_string(),
        u8::from(request.create).to_string(),
    ];
    let result = match client.eval::<Value, _, _, _>(READ_SCRIPT, keys, args).await {
        Ok(value) => parse_read(&request.topic, value).ok_or_else(|| "bad reply".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let _ = done.send(Event::Read {
        id: request.id,
        result,
    });
}

/// Runs stream publications in pipelines, in the order they came.
pub(super) async fn publish_task(
    client: Client,
    prefix: String,
    mut jobs: mpsc::UnboundedReceiver<StreamPublication>,
    done: mpsc::UnboundedSender<Event>,
    wait: Option<WaitReplicas>,
) {
    // The script goes by its digest; Redis has it cached after the first
    // EVAL, and a Redis that lost its cache (a restart) answers NOSCRIPT
    // without running anything, so those are sent again whole.
    let digest = fred::util::sha1_hash(PUBLISH_SCRIPT);
    let mut batch = Vec::with_capacity(256);
    while jobs.recv_many(&mut batch, 256).await > 0 {
        let sent =
            run_publications(&client, &prefix, &digest, std::mem::take(&mut batch), wait).await;
        let (unknown_script, mut answered): (Vec<_>, Vec<_>) = sent
            .into_iter()
            .partition(|(_, sent)| sent.unknown_script());
        if !unknown_script.is_empty() {
            let jobs = unknown_script.into_iter().map(|(job, _)| job).collect();
            answered.extend(run_publications(&client, &prefix, PUBLISH_SCRIPT, jobs, wait).await);
        }
        for (job, sent) in answered {
            let result = match sent {
                Sent::Not(e) => Err(Failure::NotStored(e.to_string())),
                Sent::Answered(Ok(value)) => position(value)
                    .ok_or_else(|| Failure::Unknown("an unreadable reply".to_string())),
                Sent::Answered(Err(e)) => Err(failure(&e)),
            };
            let _ = done.send(Event::Published {
                answer: job.answer,
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
    prefix: &str,
    script: &str,
    jobs: Vec<StreamPublication>,
    wait: Option<WaitReplicas>,
) -> Vec<(StreamPublication, Sent)> {
    let by_digest = script.len() == 40 && script.bytes().all(|b| b.is_ascii_hexdigit());
    let command = if by_digest { "EVALSHA" } else { "EVAL" };
    let pipeline = client.pipeline();
    let mut queued = Vec::with_capacity(jobs.len());
    for job in jobs {
        // A custom command: fred's pipeline has no Lua interface. The slot
        // is the first key's (argument 2).
        let (keys, job_args) = publish_arguments(prefix, &job);
        let mut args: Vec<Value> = vec![script.into(), Value::from(keys.len() as i64)];
        args.extend(keys.iter().map(|k| Value::from(k.as_str())));
        args.extend(job_args.into_iter().map(Value::from));
        let eval = CustomCommand::new_static(command, ClusterHash::Offset(2), false);
        let mut sent: Result<(), Error> = pipeline.custom(eval, args).await;
        if let (Some(wait), Ok(())) = (wait, &sent) {
            // To the connection that ran the script: its slot's.
            let slot = fred::util::redis_keyslot(keys[0].as_bytes());
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

/// What a failed round trip means for a publication that was sent.
fn failure(error: &Error) -> Failure {
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
