//! The arbiter's commands in Redis (the decisions are in `arbiter.rs`,
//! the layout of the keys at its top): Lua scripts, so each name's change
//! and its answer are one atomic step, run by digest in one pipeline per
//! batch.
//!
//! Each script touches one key, or keys under one hash tag, so a Redis
//! Cluster runs them too. A script Redis no longer knows (a restart)
//! answers NOSCRIPT and fails the batch; the scripts are loaded again and
//! the arbiter sends the batch again (every command can run twice).

use std::time::Duration;

use fred::clients::Pipeline;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::arbiter::{entry, parse_entry, Answer, Command};

/// Redis's clock in Unix ms, as a string (a Lua number is a double:
/// exact for these, and `%.0f` writes no exponent).
const NOW: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return string.format('%.0f', t[1] * 1000 + math.floor(t[2] / 1000))
end
"#;

/// How many holders a name has: its fields but the marks.
const HOLDERS: &str = r#"
local function holders(key)
  local n = redis.call('HLEN', key)
  for _, mark in ipairs({'~a', '~t'}) do
    n = n - redis.call('HEXISTS', key, mark)
  end
  return n
end
"#;

/// Reports `key` vacant once, if it has no holder, was announced, and
/// (with a token) no join came since the leave that gave the token: the
/// time it was decided, or '' if it is not. The reporter's `tag` and that
/// time are kept in `vacated` (the name's `:v` hash, in the same slot) for
/// as long as the name, so a retry answers alike even after a join
/// announced the name again.
const VACATE: &str = r#"
local function vacate(key, vacated, tag, token, ttl)
  local before = redis.call('HGET', vacated, tag)
  if before then return before end
  if holders(key) > 0 then return '' end
  redis.call('PEXPIRE', key, ttl)
  if token ~= '' and redis.call('HGET', key, '~t') ~= token then return '' end
  if redis.call('HDEL', key, '~a') == 0 then return '' end
  local at = now_ms()
  redis.call('HSET', vacated, tag, at)
  redis.call('PEXPIRE', vacated, ttl)
  return at
end
"#;

/// KEYS: the name. ARGV: node, tag. If this join announced the name,
/// the time it did ("<ms> <tag>" is kept in `~a`), else ''.
const JOIN_BODY: &str = r#"
redis.call('PERSIST', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('HINCRBY', KEYS[1], '~t', 1)
local by = redis.call('HGET', KEYS[1], '~a')
if not by then
  local at = now_ms()
  redis.call('HSET', KEYS[1], '~a', at .. ' ' .. ARGV[2])
  return at
end
local at, tag = string.match(by, '^(%d+) (.*)$')
if tag == ARGV[2] then return at end
return ''
"#;

/// KEYS: the name. ARGV: node, expiry (ms). A check token if no node
/// holds it now, else -1. A name without holders expires, so Redis keeps
/// only held names and recent ones.
const LEAVE_BODY: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
if holders(KEYS[1]) > 0 then return -1 end
local token = redis.call('HINCRBY', KEYS[1], '~t', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
"#;

/// KEYS: the name, its vacated tags. ARGV: token, tag, expiry (ms).
const CHECK_BODY: &str = "return vacate(KEYS[1], KEYS[2], ARGV[2], ARGV[1], ARGV[3])";

/// KEYS: the name, its vacated tags. ARGV: the dead node, tag, expiry (ms).
const SWEEP_BODY: &str = r#"
redis.call('HDEL', KEYS[1], ARGV[1])
return vacate(KEYS[1], KEYS[2], ARGV[2], '', ARGV[3])
"#;

/// KEYS: nodes, this node's live key. ARGV: node, live ttl (ms), the live
/// keys' prefix, the claim keys' prefix, claim ttl (ms). Whether the live
/// key was still there, and the dead nodes this node claimed (now or
/// before: a claim answers its claimer again until it expires).
const HEARTBEAT: &str = r#"
local present = redis.call('EXISTS', KEYS[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. node) == 0 then
    local by = redis.call('GET', ARGV[4] .. node)
    if not by then
      redis.call('SET', ARGV[4] .. node, ARGV[1], 'PX', ARGV[5])
      table.insert(dead, node)
    elseif by == ARGV[1] then
      table.insert(dead, node)
    end
  end
end
return {present, dead}
"#;

/// KEYS: nodes, the dead node's live key, its index. ARGV: the dead node.
/// Forgets it, unless it came back (it was slow, not dead: its heartbeat
/// joins its names again).
const FORGET_NODE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"#;

/// KEYS: nodes, this node's live key, its index. ARGV: node.
const GOODBYE: &str = r#"
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"#;

/// A script's text (loaded into Redis) and digest (what calls name).
struct Script {
    text: String,
    digest: String,
}

impl Script {
    fn new(text: String) -> Script {
        let digest = fred::util::sha1_hash(&text);
        Script { text, digest }
    }
}

/// The scripts.
struct Scripts {
    join: Script,
    leave: Script,
    check: Script,
    sweep: Script,
    heartbeat: Script,
    forget_node: Script,
    goodbye: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            join: Script::new(format!("{NOW}{JOIN_BODY}")),
            leave: Script::new(format!("{HOLDERS}{LEAVE_BODY}")),
            check: Script::new(format!("{NOW}{HOLDERS}{VACATE}{CHECK_BODY}")),
            sweep: Script::new(format!("{NOW}{HOLDERS}{VACATE}{SWEEP_BODY}")),
            heartbeat: Script::new(HEARTBEAT.to_string()),
            forget_node: Script::new(FORGET_NODE.to_string()),
            goodbye: Script::new(GOODBYE.to_string()),
        }
    }

    fn all(&self) -> [&Script; 7] {
        [
            &self.join,
            &self.leave,
            &self.check,
            &self.sweep,
            &self.heartbeat,
            &self.forget_node,
            &self.goodbye,
        ]
    }
}

/// This node's keys and timings in Redis.
pub(super) struct ClusterKeys {
    prefix: String,
    node: String,
    /// How long the node's `live` key outlives its last heartbeat.
    live_ttl: Duration,
    /// How long a name without holders stays (longer than any delay).
    name_ttl: Duration,
}

impl ClusterKeys {
    pub(super) fn new(
        prefix: &str,
        node: &str,
        live_ttl: Duration,
        longest_delay: Duration,
    ) -> Self {
        ClusterKeys {
            prefix: prefix.to_string(),
            node: node.to_string(),
            live_ttl,
            name_ttl: longest_delay + Duration::from_secs(60),
        }
    }

    /// Under one hash tag: one slot of a Redis Cluster.
    fn node_key(&self, what: &str) -> String {
        format!("{{{}:whn}}:{what}", self.prefix)
    }

    fn nodes(&self) -> String {
        self.node_key("nodes")
    }

    fn live(&self, node: &str) -> String {
        self.node_key(&format!("live:{node}"))
    }

    fn index(&self, node: &str) -> String {
        self.node_key(&format!("idx:{node}"))
    }

    fn name(&self, entry: &str) -> String {
        format!("{}:wh:{{{entry}}}", self.prefix)
    }

    /// A name and its vacated tags: one hash tag, so one slot.
    fn name_and_vacated(&self, entry: &str) -> [String; 2] {
        let name = self.name(entry);
        let vacated = format!("{name}:v");
        [name, vacated]
    }
}

/// Runs the arbiter's batches on one Redis client.
pub(super) struct ClusterRunner {
    client: Client,
    keys: ClusterKeys,
    scripts: Scripts,
    loaded: bool,
}

/// One command queued in a pipeline: what its answer means.
#[derive(Clone, Copy)]
enum Queued {
    Heartbeat,
    Joined,
    Left,
    Checked,
    /// A command's last step, with nothing to say but success.
    Done,
    /// A step before the command's last (the `SADD` to the index before a
    /// join): no answer of its own.
    Step,
}

impl ClusterRunner {
    pub(super) fn new(client: Client, keys: ClusterKeys) -> ClusterRunner {
        ClusterRunner {
            client,
            keys,
            scripts: Scripts::new(),
            loaded: false,
        }
    }

    /// Runs `commands` in order; `None` if any failed (the batch is then
    /// sent again whole).
    pub(super) async fn run(&mut self, commands: &[Command]) -> Option<Vec<Answer>> {
        match self.try_run(commands).await {
            Ok(answers) => Some(answers),
            Err(e) => {
                if e.details().starts_with("NOSCRIPT") {
                    self.loaded = false;
                }
                tracing::debug!("webhooks: a Redis batch failed: {e}");
                None
            }
        }
    }

    async fn try_run(&mut self, commands: &[Command]) -> Result<Vec<Answer>, Error> {
        if !self.loaded {
            for script in self.scripts.all() {
                let text = script.text.as_str();
                if self.client.is_clustered() {
                    let _: () = self.client.script_load_cluster(text).await?;
                } else {
                    let _: Value = self.client.script_load(text).await?;
                }
            }
            self.loaded = true;
        }
        let mut answers = Vec::with_capacity(commands.len());
        // Commands before a sweep go in one pipeline; a sweep reads first.
        let mut run = Vec::new();
        for command in commands {
            if let Command::Sweep { dead, tag } = command {
                answers.extend(self.pipeline(&std::mem::take(&mut run)).await?);
                answers.push(self.sweep(dead, tag).await?);
            } else {
                run.push(command.clone());
            }
        }
        answers.extend(self.pipeline(&run).await?);
        Ok(answers)
    }

    async fn pipeline(&self, commands: &[Command]) -> Result<Vec<Answer>, Error> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.keys;
        let ms = |d: Duration| Value::from(d.as_millis() as i64);
        let pipeline = self.client.pipeline();
        let mut queued = Vec::with_capacity(commands.len() + 8);
        for command in commands {
            match command {
                Command::Heartbeat => {
                    let args = vec![
                        Value::from(keys.node.as_str()),
                        ms(keys.live_ttl),
                        Value::from(keys.live("")),
                        Value::from(keys.node_key("sweep:")),
                        ms((keys.live_ttl * 2).max(Duration::from_secs(10))),
                    ];
                    let k = [keys.nodes(), keys.live(&keys.node)];
                    eval(&pipeline, &self.scripts.heartbeat, &k, args).await?;
                    queued.push(Queued::Heartbeat);
                }
                Command::Join { key, tag } => {
                    let entry = entry(key);
                    let add = [keys.index(&keys.node), entry.clone()];
                    plain(&pipeline, "SADD", &add).await?;
                    queued.push(Queued::Step);
                    let args = vec![Value::from(keys.node.as_str()), Value::from(tag.as_str())];
                    eval(&pipeline, &self.scripts.join, &[keys.name(&entry)], args).await?;
                    queued.push(Queued::Joined);
                }
                Command::Leave { key } => {
                    let args = vec![Value::from(keys.node.as_str()), ms(keys.name_ttl)];
                    let name = keys.name(&entry(key));
                    eval(&pipeline, &self.scripts.leave, &[name], args).await?;
                    queued.push(Queued::Left);
                }
                Command::Check { key, token, tag } => {
                    let args = vec![
                        Value::from(token.to_string()),
                        Value::from(tag.as_str()),
                        ms(keys.name_ttl),
                    ];
                    let k = keys.name_and_vacated(&entry(key));
                    eval(&pipeline, &self.scripts.check, &k, args).await?;
                    queued.push(Queued::Checked);
                }
                Command::Forget { key } => {
                    plain(&pipeline, "SREM", &[keys.index(&keys.node), entry(key)]).await?;
                    queued.push(Queued::Done);
                }
                Command::ForgetNode { dead } => {
                    let k = [keys.nodes(), keys.live(dead), keys.index(dead)];
                    let args = vec![Value::from(dead.as_str())];
                    eval(&pipeline, &self.scripts.forget_node, &k, args).await?;
                    queued.push(Queued::Done);
                }
                Command::Goodbye => {
                    let k = [keys.nodes(), keys.live(&keys.node), keys.index(&keys.node)];
                    let args = vec![Value::from(keys.node.as_str())];
                    eval(&pipeline, &self.scripts.goodbye, &k, args).await?;
                    queued.push(Queued::Done);
                }
                Command::Sweep { .. } => unreachable!("sweeps run on their own"),
            }
        }
        let mut results = pipeline.try_all::<Value>().await.into_iter();
        let mut answers = Vec::with_capacity(commands.len());
        for queued in queued {
            let value = results
                .next()
                .unwrap_or_else(|| Err(Error::new(ErrorKind::IO, "no reply")))?;
            if let Some(answer) = parse(queued, value)? {
                answers.push(answer);
            }
        }
        Ok(answers)
    }

    /// Removes `dead` from every name on its index (kept until a
    /// [`Command::ForgetNode`], so a sweep sent again answers alike).
    async fn sweep(&self, dead: &str, tag: &str) -> Result<Answer, Error> {
        let keys = &self.keys;
        let members: Value = self
            .client
            .custom(
                CustomCommand::new_static("SMEMBERS", ClusterHash::Offset(0), false),
                vec![keys.index(dead)],
            )
            .await?;
        let entries: Vec<String> = members
            .into_array()
            .into_iter()
            .filter_map(|v| v.as_string())
            .collect();
        let pipeline = self.client.pipeline();
        for entry in &entries {
            let args = vec![
                Value::from(dead),
                Value::from(tag),
                Value::from(keys.name_ttl.as_millis() as i64),
            ];
            let k = keys.name_and_vacated(entry);
            eval(&pipeline, &self.scripts.sweep, &k, args).await?;
        }
        let results = pipeline.try_all::<Value>().await;
        let mut vacated = Vec::new();
        for (entry, result) in entries.iter().zip(results) {
            if let Some(at) = decided_at(result?) {
                // An entry this version cannot read is swept, not reported.
                vacated.extend(parse_entry(entry).map(|key| (key, at)));
            }
        }
        if !vacated.is_empty() {
            tracing::info!(
                "webhooks: node {dead} stopped answering; {} of its names are vacant",
                vacated.len()
            );
        }
        Ok(Answer::Swept { vacated })
    }
}

/// Queues `script` by its digest.
async fn eval(
    pipeline: &Pipeline<Client>,
    script: &Script,
    keys: &[String],
    args: Vec<Value>,
) -> Result<(), Error> {
    let mut all: Vec<Value> = vec![
        Value::from(script.digest.as_str()),
        Value::from(keys.len() as i64),
    ];
    all.extend(keys.iter().map(|k| Value::from(k.as_str())));
    all.extend(args);
    // The slot is the first key's (argument 2).
    let command = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
    pipeline.custom(command, all).await
}

/// Queues a command whose first argument is its key.
async fn plain(
    pipeline: &Pipeline<Client>,
    name: &'static str,
    args: &[String],
) -> Result<(), Error> {
    let command = CustomCommand::new_static(name, ClusterHash::Offset(0), false);
    pipeline.custom(command, args.to_vec()).await
}

/// A script's decision: the time (Redis's clock, Unix ms) it was made, or
/// nothing ('') if it was not.
fn decided_at(value: Value) -> Option<u64> {
    value.as_string()?.parse().ok()
}

/// The answer `value` gives to a command queued as `queued`; `None` for a
/// step that is not a command's last.
fn parse(queued: Queued, value: Value) -> Result<Option<Answer>, Error> {
    let bad = || {
        Error::new(
            ErrorKind::Parse,
            "an unexpected answer from a webhook script",
        )
    };
    Ok(Some(match queued {
        Queued::Heartbeat => {
            let mut items = value.into_array().into_iter();
            let present = items.next().and_then(|v| v.as_i64()).ok_or_else(bad)? == 1;
            let dead = items
                .next()
                .ok_or_else(bad)?
                .into_array()
                .into_iter()
                .filter_map(|v| v.as_string())
                .collect();
            Answer::Heartbeat { present, dead }
        }
        Queued::Joined => Answer::Joined {
            announced: decided_at(value),
        },
        Queued::Left => {
            let token = value.as_i64().ok_or_else(bad)?;
            Answer::Left {
                token: (token > 0).then_some(token),
            }
        }
        Queued::Checked => Answer::Checked {
            vacated: decided_at(value),
        },
        Queued::Done => Answer::Done,
        Queued::Step => return Ok(None),
    }))
}
