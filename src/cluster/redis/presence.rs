//! Presence in Redis (the decisions are in `cluster::state::presence`):
//!
//! ```text
//! {prefix}:p:{T}:<node>   hash conn id -> meta (JSON), expires presence_ttl after the last refresh
//! {prefix}:pn:{T}         sorted set of nodes with members, scored by when their entry expires
//! ```
//!
//! A query drops expired nodes and reads the others' hashes in one script.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use tokio::sync::mpsc;

use crate::bus::{self, MemberQuery};

use super::super::presence::TopicWrite;
use super::super::state::{Event, PresenceQuery};

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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The score of a node whose members were written now: when they expire.
fn expiry(ttl: Duration) -> f64 {
    (now_ms() + ttl.as_millis() as u64) as f64
}

/// A node's hash of `topic`'s members, and the topic's set of nodes.
fn keys(prefix: &str, node: &str, topic: &str) -> (String, String) {
    (
        format!("{prefix}:p:{{{topic}}}:{node}"),
        format!("{prefix}:pn:{{{topic}}}"),
    )
}

/// Writes one batch of presence changes, pipelined, and reports whether
/// every command succeeded.
pub(super) async fn write(
    client: Client,
    prefix: String,
    node: String,
    ttl: Duration,
    writes: Vec<TopicWrite>,
    done: mpsc::UnboundedSender<Event>,
) {
    let expires = expiry(ttl);
    let pipeline = client.pipeline();
    let queued: Result<(), Error> = async {
        for write in writes {
            let (hash, nodes) = keys(&prefix, &node, &write.topic);
            if write.whole {
                let _: () = pipeline.del(&hash).await?;
            }
            if !write.delete.is_empty() {
                let _: () = pipeline.hdel(&hash, write.delete).await?;
            }
            if !write.set.is_empty() {
                let _: () = pipeline.hset(&hash, write.set).await?;
            }
            if write.remains {
                let _: () = pipeline
                    .pexpire(&hash, ttl.as_millis() as i64, None)
                    .await?;
                let _: () = pipeline
                    .zadd(&nodes, None, None, false, false, (expires, node.clone()))
                    .await?;
            } else {
                let _: () = pipeline.del(&hash).await?;
                let _: () = pipeline.zrem(&nodes, node.clone()).await?;
            }
        }
        Ok(())
    }
    .await;
    let ok = queued.is_ok() && pipeline.try_all::<Value>().await.iter().all(Result::is_ok);
    let _ = done.send(Event::PresenceWritten(ok));
}

/// Reads the other nodes' members of a topic and reports them (none if
/// Redis fails).
pub(super) async fn query(
    client: Client,
    prefix: String,
    node: String,
    query: PresenceQuery,
    done: mpsc::UnboundedSender<Event>,
) {
    let (_, nodes) = keys(&prefix, &node, &query.topic);
    let hash_prefix = format!("{prefix}:p:{{{}}}:", query.topic);
    let args = vec![now_ms().to_string(), node, hash_prefix];
    let reply = client
        .eval::<Value, _, _, _>(QUERY_SCRIPT, vec![nodes], args)
        .await;
    let members = match reply {
        Ok(value) => gather_members(value, &query.query),
        Err(e) => {
            tracing::debug!("cluster: presence query failed: {e}");
            bus::Members::default()
        }
    };
    let _ = done.send(Event::PresenceAnswered {
        from: query.from,
        ticket: query.ticket,
        members,
    });
}

/// The other nodes' members, as a shard answers for its own: the count,
/// and the page the query asks for of `{"conn_id":"node/id","meta":..}`
/// (or, `by_user`, of the metas, one per user).
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
            if query.by_user {
                let Some(user) = bus::user_of(&meta) else {
                    continue;
                };
                members.offer(query, || user, |_| meta.to_string());
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
