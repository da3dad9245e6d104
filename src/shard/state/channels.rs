//! Channel hooks on a shard: running a topic's hook for joins, client
//! messages and leaves, carrying out what it asked for, and presence queries
//! gathered from every shard.
//!
//! Presence is not a separate store: a topic's members are its subscribers
//! whose hook tracked them, with the meta it gave. A query counts them here
//! and asks every other shard for theirs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::bus::{Envelope, ShardId};
use crate::hooks::{Action, ChannelHook, ChannelId, ClientMessage, HookContext, Verdict};
use crate::metrics::ShardStats;
use crate::protocol::http::Response;
use crate::protocol::message;
use crate::shard::key::ConnKey;

use super::conn::Deferred;
use super::names::NameId;
use super::streams::Published;
use super::ShardState;

/// Presence queries one connection may have in flight: each costs a pass
/// over the topic's members on every shard, so a client must not queue
/// thousands. A dashboard needs one at a time; four allows some overlap.
const MAX_PRESENCE_PER_CONN: u8 = 4;
/// Presence queries one shard may have in flight, from all its connections.
const MAX_PRESENCE_PER_SHARD: usize = 1024;

/// Where a presence answer goes once every shard has replied.
pub(crate) enum PresenceThen {
    /// An HTTP `GET /topics/{topic}/presence` (its connection is parked).
    Http { key: ConnKey },
    /// A `{"type":"presence"}` request on a WebSocket.
    Ws { key: ConnKey },
    /// A join/leave announcement waiting for the new count.
    Announce {
        event: String,
        user: Option<Arc<str>>,
    },
}

/// A presence query waiting for other shards.
pub(crate) struct PresenceWait {
    topic: Arc<str>,
    remaining: usize,
    count: usize,
    /// Member objects so far, comma-separated.
    members: String,
    then: PresenceThen,
}

/// Presence queries in flight, by ticket, and the presence metas in use.
#[derive(Default)]
pub(crate) struct PresenceQueries {
    waits: HashMap<u64, PresenceWait>,
    next_ticket: u64,
    /// Metas shared by the subscriptions that have them: with the default
    /// rules every subscription of an anonymous connection tracks the same
    /// `{"user_id":null}`, and one allocation each would be most of what an
    /// idle subscriber costs.
    metas: HashSet<Arc<str>>,
}

/// Distinct metas interned per shard; past it, unused ones are dropped and,
/// if still full, new ones are not shared.
const MAX_INTERNED_METAS: usize = 4096;

impl PresenceQueries {
    fn intern(&mut self, meta: String) -> Arc<str> {
        if let Some(shared) = self.metas.get(meta.as_str()) {
            return shared.clone();
        }
        if self.metas.len() >= MAX_INTERNED_METAS {
            self.metas.retain(|m| Arc::strong_count(m) > 1);
        }
        let meta: Arc<str> = meta.into();
        if self.metas.len() < MAX_INTERNED_METAS {
            self.metas.insert(meta.clone());
        }
        meta
    }
}

impl ShardState {
    /// The process-unique id hooks and presence show for a connection.
    fn conn_id(&self, key: ConnKey) -> String {
        format!("{}-{}-{}", self.id.0, key.slot(), key.generation())
    }

    /// Admits a presence query from connection `key`, or says why not.
    pub(super) fn admit_presence(&mut self, key: ConnKey) -> Result<(), String> {
        let in_flight = self.conns.get(key).map_or(0, |c| c.presence_queries);
        let refusal = if in_flight >= MAX_PRESENCE_PER_CONN {
            Some(format!(
                "at most {MAX_PRESENCE_PER_CONN} presence queries in flight per connection"
            ))
        } else if self.presence.waits.len() >= MAX_PRESENCE_PER_SHARD || !self.control_has_room() {
            Some("server busy: too many presence queries in flight, try again".to_string())
        } else {
            None
        };
        if let Some(reason) = refusal {
            ShardStats::add(&self.stats().presence_refused_total, 1);
            return Err(reason);
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.presence_queries += 1;
        }
        Ok(())
    }

    /// The channel governing `topic`: cached on the topic entry when there is one.
    pub(super) fn channel_for(&self, topic: &str) -> Option<ChannelId> {
        let cached = self
            .topics
            .lookup(topic)
            .and_then(|id| self.topics.entry(id).channel);
        cached.or_else(|| self.shared.channels.resolve(topic))
    }

    /// Runs one hook call for connection `key` on `topic` and returns its
    /// result with the actions it queued.
    fn run_hook<R>(
        &self,
        key: ConnKey,
        channel: ChannelId,
        topic: &str,
        subscribed: bool,
        call: impl FnOnce(&dyn ChannelHook, &mut HookContext<'_>) -> R,
    ) -> (R, Vec<Action>) {
        let conn_id = self.conn_id(key);
        let user = self.conns.get(key).and_then(|c| c.user().cloned());
        let mut ctx = HookContext::new(topic, &conn_id, user.as_deref(), subscribed);
        let result = call(self.shared.channels.hook(channel), &mut ctx);
        (result, ctx.actions)
    }

    /// Asks the topic's hook whether `key` may join. `Err` carries the reason
    /// for the client; `Ok` carries the actions to apply once it has joined.
    pub(super) fn hook_join(
        &self,
        key: ConnKey,
        channel: ChannelId,
        topic: &str,
    ) -> Result<Vec<Action>, String> {
        let (result, actions) =
            self.run_hook(key, channel, topic, false, |hook, ctx| hook.join(ctx));
        result.map(|()| actions)
    }

    /// Tells the topic's hook that `key` left, then applies what it asked for.
    pub(super) fn hook_leave(
        &mut self,
        key: ConnKey,
        channel: Option<ChannelId>,
        topic: &Arc<str>,
    ) {
        let Some(channel) = channel else { return };
        let (_, actions) = self.run_hook(key, channel, topic, false, |hook, ctx| hook.leave(ctx));
        self.apply_actions(key, topic, actions);
    }

    /// A client's `{"type":"message"}`: the hook decides what is broadcast.
    pub(super) fn client_publish(
        &mut self,
        key: ConnKey,
        topic: &str,
        event: Option<&str>,
        payload: Option<&RawValue>,
    ) {
        let Some(channel) = self.channel_for(topic) else {
            return self.send_error(key, &format!("no rule allows topic `{topic}`"));
        };
        let subscribed = self.subscription(key, topic).is_some();
        let null = RawValue::NULL;
        let message = ClientMessage {
            event: event.unwrap_or("message"),
            payload: payload.unwrap_or(null),
        };
        let (verdict, actions) = self.run_hook(key, channel, topic, subscribed, |hook, ctx| {
            hook.message(ctx, &message)
        });
        if !self.accepting_publishes()
            && matches!(verdict, Verdict::Broadcast | Verdict::Rewrite { .. })
        {
            return self.send_error(key, "server shutting down: publishes are refused");
        }
        let published = match verdict {
            Verdict::Broadcast => {
                Some(self.publish(topic, message.event, message.payload.get(), None))
            }
            Verdict::Rewrite { event, payload } => {
                Some(self.publish(topic, &event, &payload.to_string(), None))
            }
            Verdict::Drop => None,
            Verdict::Reject(reason) => {
                self.send_error(key, &reason);
                None
            }
        };
        if let Some(Published::LocalOnly { why, .. }) = published {
            self.send_error(key, why.message());
        }
        self.apply_actions(key, topic, actions);
    }

    /// Carries out what a hook asked for on behalf of connection `key`
    /// (which may be closing: pushes and announcements still happen).
    pub(super) fn apply_actions(&mut self, key: ConnKey, topic: &str, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Push {
                    topic,
                    event,
                    payload_json,
                } => {
                    self.publish(&topic, &event, &payload_json, None);
                }
                Action::Track { meta_json } => {
                    let meta = self.presence.intern(meta_json);
                    self.set_presence_meta(key, topic, Some(meta))
                }
                Action::Untrack => self.set_presence_meta(key, topic, None),
                Action::Announce { event } => {
                    let user = self.conns.get(key).and_then(|c| c.user().cloned());
                    self.start_presence(topic, PresenceThen::Announce { event, user });
                }
            }
        }
    }

    fn set_presence_meta(&mut self, key: ConnKey, topic: &str, meta: Option<Arc<str>>) {
        let Some(id) = self.topics.lookup(topic) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(sub) = conn.subs.iter_mut().find(|s| s.topic == id) {
            if sub.meta != meta {
                sub.meta = meta.clone();
                self.presence_to_other_nodes(key, id, meta);
            }
        }
    }

    /// In a cluster, tells the broker a member of `topic` came or went, so
    /// the other nodes count it.
    pub(super) fn presence_to_other_nodes(
        &mut self,
        key: ConnKey,
        topic: NameId,
        meta: Option<Arc<str>>,
    ) {
        let Some(broker) = self.shared.bus.broker() else {
            return;
        };
        let change = Envelope::PresenceChange {
            topic: self.topics.entry(topic).name.clone(),
            conn_id: self.conn_id(key),
            meta,
        };
        self.post_control(broker, change);
    }

    /// Whether presence is answered for `topic`.
    pub(super) fn presence_tracked(&self, topic: &str) -> bool {
        self.channel_for(topic)
            .is_some_and(|c| self.shared.channels.hook(c).tracks_presence())
    }

    /// This shard's members of `topic`: count and comma-separated member objects.
    fn local_presence(&self, topic: &str) -> (usize, String) {
        let Some(id) = self.topics.lookup(topic) else {
            return (0, String::new());
        };
        let entry = self.topics.entry(id);
        let mut members = String::new();
        let mut count = 0;
        for &key in entry.subscribers.iter().chain(entry.waiting.iter()) {
            let Some(meta) = self
                .conns
                .get(key)
                .into_iter()
                .flat_map(|c| c.subs.iter())
                .find(|s| s.topic == id)
                .and_then(|s| s.meta.as_deref())
            else {
                continue;
            };
            if count > 0 {
                members.push(',');
            }
            count += 1;
            members.push_str("{\"conn_id\":\"");
            members.push_str(&self.conn_id(key));
            members.push_str("\",\"meta\":");
            members.push_str(meta);
            members.push('}');
        }
        (count, members)
    }

    /// Counts `topic`'s members here and asks every other shard; `then` says
    /// where the total goes.
    pub(super) fn start_presence(&mut self, topic: &str, then: PresenceThen) {
        let (count, members) = self.local_presence(topic);
        let topic: Arc<str> = Arc::from(topic);
        // In a cluster the broker answers for the other nodes.
        let others = self.shared.bus.members() - 1;
        let wait = PresenceWait {
            topic: topic.clone(),
            remaining: others,
            count,
            members,
            then,
        };
        if others == 0 {
            return self.finish_presence(wait);
        }
        let ticket = self.presence.next_ticket;
        self.presence.next_ticket += 1;
        self.presence.waits.insert(ticket, wait);
        self.broadcast_interest(|| Envelope::PresenceQuery {
            ticket,
            topic: topic.clone(),
        });
    }

    pub(super) fn on_presence_query(&mut self, from: ShardId, ticket: u64, topic: &str) {
        let (count, members) = self.local_presence(topic);
        self.post_control(
            from,
            Envelope::PresenceReply {
                ticket,
                count,
                members,
            },
        );
    }

    pub(super) fn on_presence_reply(&mut self, ticket: u64, count: usize, members: &str) {
        let Some(wait) = self.presence.waits.get_mut(&ticket) else {
            return;
        };
        wait.count += count;
        if !members.is_empty() {
            if !wait.members.is_empty() {
                wait.members.push(',');
            }
            wait.members.push_str(members);
        }
        wait.remaining -= 1;
        if wait.remaining == 0 {
            if let Some(wait) = self.presence.waits.remove(&ticket) {
                self.finish_presence(wait);
            }
        }
    }

    fn finish_presence(&mut self, wait: PresenceWait) {
        let members = format!("[{}]", wait.members);
        match wait.then {
            PresenceThen::Http { key } => {
                self.presence_answered(key);
                let parked = self.take_deferred(key, |d| matches!(d, Deferred::Presence { .. }));
                if let Some(Deferred::Presence { keep_alive }) = parked {
                    let body = format!("{{\"count\":{},\"members\":{members}}}", wait.count);
                    self.answer_parked(key, Response::json(200, body).keep_alive(keep_alive));
                }
            }
            PresenceThen::Ws { key } => {
                self.presence_answered(key);
                self.send(key, message::presence(&wait.topic, wait.count, &members));
            }
            PresenceThen::Announce { event, user } => {
                let payload =
                    serde_json::json!({ "user_id": user.as_deref(), "count": wait.count });
                self.publish(&wait.topic, &event, &payload.to_string(), None);
            }
        }
    }

    fn presence_answered(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.presence_queries = conn.presence_queries.saturating_sub(1);
        }
    }
}
