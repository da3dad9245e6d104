//! Pusher presence members' commands in Redis (the decisions and the key
//! layout are in `cluster::state::member_events`): one Lua script, so a
//! user's record and the decision it gives are one atomic step. Both keys
//! carry the topic's hash tag, so a Redis Cluster runs it too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::mpsc;

use super::super::state::{Event, MemberAnswer, MemberCommand, Outcome};

/// `KEYS`: the topic's users hash and the nodes that hold its users. `ARGV`: `join`,
/// `leave` or `refresh`; this node; now and this node's expiry (Unix ms);
/// the users hash's TTL (ms); then the user (`join`, `leave`), or for
/// `refresh` the number of users this node holds, those users, and the
/// users whose last leave here had no known outcome (told gone if nobody
/// holds them).
///
/// `join` and `leave` answer how many other live nodes hold the user (0:
/// the cluster's coming or going, and then the message that tells it, if
/// any, is published: `ARGV[7]` its channel (of the topic's slot), `ARGV[8]`
/// the message; a node already recorded as it says, by a refresh that
/// told the channel, answers 1 so nobody tells it twice; a leave of a
/// user this node was not recorded as holding, with nobody else, answers
/// -1: a refresh told it, or Redis lost the record).
/// `refresh` answers `{back, gone}`.
const SCRIPT: &str = r#"
local op, node, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function live(n)
  local score = redis.call('ZSCORE', KEYS[2], n)
  return score and tonumber(score) > now
end
local function holders(line)
  local list = {}
  if line then
    for n in string.gmatch(line, '[^\n]+') do list[#list + 1] = n end
  end
  return list
end
local function store(user, list)
  if #list == 0 then
    redis.call('HDEL', KEYS[1], user)
  else
    redis.call('HSET', KEYS[1], user, table.concat(list, '\n'))
  end
end
-- The user's other live holders, and whether this node is one.
local function others(user)
  local kept, mine = {}, false
  for _, n in ipairs(holders(redis.call('HGET', KEYS[1], user))) do
    if n == node then mine = true elseif live(n) then kept[#kept + 1] = n end
  end
  return kept, mine
end
-- Holds the user; whether nobody live did.
local function hold(user)
  local kept, mine = others(user)
  kept[#kept + 1] = node
  store(user, kept)
  return #kept == 1 and not mine, #kept - 1, mine
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
-- The cluster's coming or going: the channel is told in this step.
local function announce()
  if ARGV[7] then redis.call('SPUBLISH', ARGV[7], ARGV[8]) end
  return 0
end
if op == 'join' then
  redis.call('ZADD', KEYS[2], ARGV[4], node)
  local came, n = hold(ARGV[6])
  if came then return announce() end
  return math.max(n, 1)
elseif op == 'leave' then
  local kept, mine = others(ARGV[6])
  store(ARGV[6], kept)
  if #kept > 0 then return #kept end
  if mine then return announce() end
  return -1
end
redis.call('ZADD', KEYS[2], ARGV[4], node)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held, back, gone, told = {}, {}, {}, {}
local last = 6 + tonumber(ARGV[6])
for i = 7, last do
  held[ARGV[i]] = true
  if hold(ARGV[i]) then back[#back + 1] = ARGV[i] end
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local user, kept, before = all[i], {}, 0
  for _, n in ipairs(holders(all[i + 1])) do
    before = before + 1
    if (n == node and held[user]) or (n ~= node and live(n)) then kept[#kept + 1] = n end
  end
  if #kept == 0 then
    gone[#gone + 1] = user
    told[user] = true
  end
  if #kept < before then store(user, kept) end
end
-- Users whose last leave here had no known outcome: gone if nobody holds them.
for i = last + 1, #ARGV do
  local user = ARGV[i]
  if not told[user] and not held[user] and #others(user) == 0 then
    gone[#gone + 1] = user
    told[user] = true
  end
end
return {back, gone}
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs one batch of commands, pipelined in order, and reports the
/// answers (none if any failed: the state treats the batch as unknown).
pub(super) async fn decide(
    client: Client,
    prefix: String,
    node: String,
    ttl: Duration,
    commands: Vec<MemberCommand>,
    done: mpsc::UnboundedSender<Event>,
) {
    let now = now_ms();
    let expires = now + ttl.as_millis() as u64;
    // The users hash outlives a few refreshes of the nodes holding it.
    let key_ttl = 3 * ttl.as_millis() as u64;
    let pipeline = client.pipeline();
    let mut refreshes = Vec::with_capacity(commands.len());
    let queued: Result<(), Error> = async {
        for command in &commands {
            let (topic, op, rest): (&str, &str, Vec<Value>) = match command {
                MemberCommand::Transition {
                    topic,
                    user,
                    joined,
                    announce,
                } => {
                    let op = if *joined { "join" } else { "leave" };
                    let mut rest = vec![Value::from(user.to_string())];
                    if let Some((channel, message)) = announce {
                        rest.push(Value::from(channel.as_str()));
                        rest.push(Value::Bytes(message.clone()));
                    }
                    (topic, op, rest)
                }
                MemberCommand::Refresh {
                    topic,
                    users,
                    doubtful,
                } => {
                    let mut rest = vec![Value::from(users.len().to_string())];
                    let named = users.iter().chain(doubtful);
                    rest.extend(named.map(|u| Value::from(u.to_string())));
                    (topic, "refresh", rest)
                }
            };
            refreshes.push(op == "refresh");
            let mut args: Vec<Value> = vec![
                Value::from(SCRIPT),
                Value::from(2),
                Value::from(format!("{prefix}:pm:{{{topic}}}")),
                Value::from(format!("{prefix}:pml:{{{topic}}}")),
                Value::from(op),
                Value::from(node.as_str()),
                Value::from(now.to_string()),
                Value::from(expires.to_string()),
                Value::from(key_ttl.to_string()),
            ];
            args.extend(rest);
            // The slot is the first key's (argument 2).
            let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
            let _: () = pipeline.custom(eval, args).await?;
        }
        Ok(())
    }
    .await;
    let results: Vec<Result<Value, Error>> = match queued {
        Ok(()) => pipeline.try_all().await,
        Err(e) => vec![Err(e)],
    };
    let answers = (results.len() == commands.len())
        .then(|| {
            results
                .into_iter()
                .zip(refreshes)
                .map(|(result, refresh)| answer(result.ok()?, refresh))
                .collect::<Option<Vec<_>>>()
        })
        .flatten();
    if answers.is_none() {
        tracing::debug!("cluster: a batch of presence member commands failed");
    }
    let _ = done.send(Event::MembersDecided(answers));
}

/// A script's answer as the state reads it.
fn answer(value: Value, refresh: bool) -> Option<MemberAnswer> {
    if !refresh {
        let outcome = match value.as_i64()? {
            0 => Outcome::Told,
            -1 => Outcome::Unknown,
            _ => Outcome::Held,
        };
        return Some(MemberAnswer::Transition(outcome));
    }
    let mut lists = value.into_array().into_iter();
    let mut names = || -> Vec<String> {
        let list = lists.next().map(Value::into_array).unwrap_or_default();
        list.into_iter().filter_map(|v| v.as_string()).collect()
    };
    let (back, gone) = (names(), names());
    Some(MemberAnswer::Refresh { back, gone })
}
