//! Presence across nodes: who is in a topic, counted on every node.
//!
//! Each node keeps its own members of a topic in Redis, refreshed on a
//! timer, so a node that dies stops counting within the TTL:
//!
//! ```text
//! {prefix}:p:{T}:<node>   hash conn id -> meta (JSON), expires presence_ttl after the last refresh
//! {prefix}:pn:{T}         sorted set of nodes with members, scored by when their entry expires
//! ```
//!
//! A shard's presence query asks its node's shards and the broker; the
//! broker answers for the other nodes with one Lua script that drops
//! expired nodes and reads the others' hashes. Members from other nodes are
//! named `<node>/<conn id>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;

use crate::bus::{self, Envelope, MemberQuery, ShardId};

use super::broker::Broker;

const QUERY_SCRIPT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local nodes = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, node in ipairs(nodes) do
  if node ~= ARGV[2] then
    table.insert(out, node)
    table.insert(out, redis.call('HGETALL', ARGV[3] .. node))
  end
end
return out
"#;

/// This node's presence members, per topic: conn id -> meta.
#[derive(Default)]
pub(super) struct Members {
    topics: HashMap<Arc<str>, HashMap<String, Arc<str>>>,
}

/// One topic's members as written to Redis: hash key, node-set key, and
/// (conn id, meta) pairs.
type TopicMembers = (String, String, Vec<(String, String)>);

/// A presence answer for the broker's loop.
pub(super) struct PresenceDone {
    pub(super) from: ShardId,
    pub(super) ticket: u64,
    pub(super) members: bus::Members,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The score of a node whose members were written now: when they expire.
fn expiry(ttl: Duration) -> f64 {
    (now_ms() + ttl.as_millis() as u64) as f64
}

impl Broker {
    fn presence_keys(&self, topic: &str) -> (String, String) {
        (
            format!("{}:p:{{{topic}}}:{}", self.prefix, self.status.node),
            format!("{}:pn:{{{topic}}}", self.prefix),
        )
    }

    /// A member of `topic` on this node came (`meta`) or went.
    pub(super) fn on_presence_change(
        &mut self,
        topic: Arc<str>,
        conn_id: String,
        meta: Option<Arc<str>>,
    ) {
        let members = self.members.topics.entry(topic.clone()).or_default();
        match &meta {
            Some(meta) => {
                members.insert(conn_id.clone(), meta.clone());
            }
            None => {
                members.remove(&conn_id);
            }
        }
        let empty = members.is_empty();
        if empty {
            self.members.topics.remove(&topic);
        }
        if !self.status.is_up() {
            return; // written on the next refresh after reconnecting
        }
        let (hash, nodes) = self.presence_keys(&topic);
        let client = self.publisher.clone();
        let node = self.status.node.clone();
        let ttl = self.presence_ttl;
        tokio::spawn(async move {
            let result: Result<(), Error> = async {
                match meta {
                    Some(meta) => {
                        let _: () = client.hset(&hash, (conn_id, meta.to_string())).await?;
                        let _: () = client.pexpire(&hash, ttl.as_millis() as i64, None).await?;
                        let _: () = client
                            .zadd(&nodes, None, None, false, false, (expiry(ttl), node))
                            .await?;
                    }
                    None => {
                        let _: i64 = client.hdel(&hash, conn_id).await?;
                        if empty {
                            let _: i64 = client.del(&hash).await?;
                            let _: i64 = client.zrem(&nodes, node).await?;
                        }
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                tracing::debug!("cluster: presence update failed: {e}");
            }
        });
    }

    /// Rewrites every member of this node with a fresh expiry: keeps them
    /// counted, and restores them in a Redis that lost them.
    pub(super) fn refresh_presence(&self) {
        if !self.status.is_up() || self.members.topics.is_empty() {
            return;
        }
        let client = self.publisher.clone();
        let node = self.status.node.clone();
        let ttl = self.presence_ttl;
        let writes: Vec<TopicMembers> = self
            .members
            .topics
            .iter()
            .map(|(topic, members)| {
                let (hash, nodes) = self.presence_keys(topic);
                let members = members
                    .iter()
                    .map(|(id, meta)| (id.clone(), meta.to_string()))
                    .collect();
                (hash, nodes, members)
            })
            .collect();
        tokio::spawn(async move {
            let expires = expiry(ttl);
            for (hash, nodes, members) in writes {
                let result: Result<(), Error> = async {
                    // Rewritten whole: members that left while Redis was
                    // unreachable must not stay.
                    let _: i64 = client.del(&hash).await?;
                    let _: () = client.hset(&hash, members).await?;
                    let _: () = client.pexpire(&hash, ttl.as_millis() as i64, None).await?;
                    let _: () = client
                        .zadd(&nodes, None, None, false, false, (expires, node.clone()))
                        .await?;
                    Ok(())
                }
                .await;
                if let Err(e) = result {
                    tracing::debug!("cluster: presence refresh failed: {e}");
                    return;
                }
            }
        });
    }

    /// A shard counts `topic`'s members: answer for the other nodes, with
    /// the page of them the query asks for.
    pub(super) fn on_presence_query(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: Arc<str>,
        query: MemberQuery,
    ) {
        if !self.status.is_up() {
            // Degraded: the node counts its own members only.
            return self.answer_presence(PresenceDone {
                from,
                ticket,
                members: bus::Members::default(),
            });
        }
        let (_, nodes) = self.presence_keys(&topic);
        let hash_prefix = format!("{}:p:{{{topic}}}:", self.prefix);
        let client = self.publisher.clone();
        let done = self.presence_done.clone();
        let args = vec![now_ms().to_string(), self.status.node.clone(), hash_prefix];
        tokio::spawn(async move {
            let reply = client
                .eval::<Value, _, _, _>(QUERY_SCRIPT, vec![nodes], args)
                .await;
            let members = match reply {
                Ok(value) => gather_members(value, &query),
                Err(e) => {
                    tracing::debug!("cluster: presence query failed: {e}");
                    bus::Members::default()
                }
            };
            let _ = done.send(PresenceDone {
                from,
                ticket,
                members,
            });
        });
    }

    pub(super) fn answer_presence(&mut self, done: PresenceDone) {
        let reply = Envelope::PresenceReply {
            ticket: done.ticket,
            members: Box::new(done.members),
        };
        self.outbox.send(&self.bus, done.from, reply);
    }
}

/// The other nodes' members, as a shard answers for its own: the count,
/// and the page the query asks for of `{"conn_id":"node/id","meta":..}`.
fn gather_members(value: Value, query: &MemberQuery) -> bus::Members {
    let mut items = value.into_array().into_iter();
    let mut members = bus::Members::default();
    while let (Some(node), Some(hash)) = (items.next(), items.next()) {
        let Some(node) = node.as_str().map(|n| n.into_owned()) else {
            continue;
        };
        let fields = hash.into_array();
        for pair in fields.chunks(2) {
            let (Some(id), Some(meta)) = (pair[0].as_str(), pair.get(1).and_then(|m| m.as_str()))
            else {
                continue;
            };
            // Metas were JSON when stored; anything else is not ours.
            if serde_json::from_str::<serde::de::IgnoredAny>(&meta).is_err() {
                continue;
            }
            members.offer(
                query,
                || format!("{node}/{id}"),
                |conn_id| {
                    let conn_id = serde_json::to_string(conn_id).unwrap_or_default();
                    format!("{{\"conn_id\":{conn_id},\"meta\":{meta}}}")
                },
            );
        }
    }
    members.trim(query.limit);
    members
}
