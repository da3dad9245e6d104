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

use crate::bus::{Envelope, MemberQuery, Members, ShardId};
use crate::hooks::{Action, ChannelHook, ChannelId, ClientMessage, HookContext, Verdict};
use crate::metrics::ShardStats;
use crate::protocol::http::Response;
use crate::protocol::message;
use crate::shard::key::ConnKey;

use super::conn::Deferred;
use super::names::NameId;
use super::proxied::Publication;
use super::streams::Published;
use super::ShardState;

/// Presence queries one connection may have in flight: each costs a pass
/// over the topic's members on every shard, so a client must not queue
/// thousands. A dashboard needs one at a time; four allows some overlap.
const MAX_PRESENCE_PER_CONN: u8 = 4;
/// Presence queries one shard may have in flight, from all its connections.
/// Each gathers at most two pages of members (about 220 KiB at 100
/// members of 1 KiB metas), so this bounds them to about 56 MiB.
const MAX_PRESENCE_PER_SHARD: usize = 256;

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
    /// A Pusher presence subscription waiting for the channel's members
    /// (`joining`: the member it becomes, unless it is one already).
    PusherSucceeded {
        key: ConnKey,
        joining: Option<Arc<str>>,
        cache_miss: bool,
    },
    /// `GET /apps/{id}/channels/{channel}[/users]` (its connection is
    /// parked): a channel's counts, or a presence channel's users.
    PusherChannel {
        key: ConnKey,
        query: super::pusher_api::ChannelQuery,
    },
    /// `GET /apps/{id}/channels` (its connection is parked): the app's
    /// occupied channels under a prefix.
    PusherChannels {
        key: ConnKey,
        prefix: Arc<str>,
        user_count: bool,
    },
    /// A trigger's `info` (its connection is parked): one channel counted.
    PusherTriggerInfo {
        key: ConnKey,
        info: Box<super::pusher_api::TriggerInfo>,
    },
}

/// A presence query waiting for other shards.
pub(crate) struct PresenceWait {
    topic: Arc<str>,
    remaining: usize,
    query: MemberQuery,
    /// The members gathered so far (at most the query's limit).
    members: Members,
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
    /// Presence queries per connection in the current second, for the
    /// connections that asked any: (second, count).
    rates: HashMap<ConnKey, (u32, u32)>,
    /// What the connect proxy's backend said about the connections it
    /// allowed with a `meta` (a JSON object within `max_presence_meta_bytes`),
    /// shown in their presence; beside the connections, so the others pay
    /// nothing for it.
    infos: HashMap<ConnKey, Arc<str>>,
}

/// Distinct metas interned per shard; past it, unused ones are dropped and,
/// if still full, new ones are not shared.
const MAX_INTERNED_METAS: usize = 4096;

impl PresenceQueries {
    /// Bytes held: interned metas and the answers being gathered.
    pub(crate) fn bytes(&self) -> usize {
        let metas: usize = self.metas.iter().map(|m| m.len() + 2 * 16).sum();
        let waits: usize = self
            .waits
            .values()
            .map(|w| {
                let listed: usize = w
                    .members
                    .list
                    .iter()
                    .map(|(a, b)| a.len() + b.len() + 48)
                    .sum();
                std::mem::size_of::<PresenceWait>() + listed
            })
            .sum();
        let infos: usize = self.infos.values().map(|i| i.len() + 48).sum();
        metas + waits + self.rates.len() * 32 + infos
    }

    pub(super) fn intern(&mut self, meta: String) -> Arc<str> {
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
    pub(super) fn conn_id(&self, key: ConnKey) -> String {
        format!("{}-{}-{}", self.id.0, key.slot(), key.generation())
    }

    /// Admits a presence query from connection `key`, or says why not:
    /// `429` for a connection over its own bounds (in flight, per second),
    /// `503` when the shard is.
    pub(super) fn admit_presence(&mut self, key: ConnKey) -> Result<(), (u16, String)> {
        let in_flight = self.conns.get(key).map_or(0, |c| c.presence_queries);
        let per_second = self.config().limits.max_presence_queries_per_second;
        let second = self.millis().0 / 1000;
        let (window, asked) = self
            .presence
            .rates
            .get(&key)
            .copied()
            .unwrap_or((second, 0));
        let asked = if window == second { asked } else { 0 };
        let refusal = if in_flight >= MAX_PRESENCE_PER_CONN {
            Some((
                429,
                format!(
                    "at most {MAX_PRESENCE_PER_CONN} presence queries in flight per connection"
                ),
            ))
        } else if asked >= per_second {
            Some((
                429,
                format!("at most {per_second} presence queries a second per connection"),
            ))
        } else if !self.presence_has_room() {
            Some((
                503,
                "server busy: too many presence queries in flight, try again".to_string(),
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            ShardStats::add(&self.stats().presence_refused_total, 1);
            return Err(refusal);
        }
        self.presence.rates.insert(key, (second, asked + 1));
        if let Some(conn) = self.conns.get_mut(key) {
            conn.presence_queries += 1;
        }
        Ok(())
    }

    /// The page of members a query gets: `limit` capped by
    /// `max_presence_members` (which is also the default).
    pub(super) fn member_query(&self, limit: Option<usize>, after: Option<&str>) -> MemberQuery {
        let max = self.config().limits.max_presence_members;
        MemberQuery {
            limit: limit.map_or(max, |l| l.min(max)),
            after: after.map(Arc::from),
            ..MemberQuery::default()
        }
    }

    /// Forgets a closed connection's presence rate window and info.
    pub(super) fn forget_presence(&mut self, key: ConnKey) {
        self.presence.rates.remove(&key);
        self.presence.infos.remove(&key);
    }

    /// Keeps what the backend said about connection `key` for its presence.
    pub(super) fn set_conn_info(&mut self, key: ConnKey, info: Arc<str>) {
        self.presence.infos.insert(key, info);
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
        let info = self.presence.infos.get(&key);
        let mut ctx = HookContext::new(topic, &conn_id, user.as_deref(), subscribed)
            .with_info(info.map(|i| &**i));
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
        idempotency_key: Option<&str>,
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
        let proxied = self.shared.channels.hook(channel).publish_proxy();
        match verdict {
            Verdict::Broadcast if proxied => {
                let publication = Publication {
                    topic,
                    event: message.event,
                    payload: message.payload.get(),
                    idempotency_key,
                };
                self.ask_to_publish(key, publication);
            }
            Verdict::Rewrite { event, payload } if proxied => {
                let payload = payload.to_string();
                let publication = Publication {
                    topic,
                    event: &event,
                    payload: &payload,
                    idempotency_key,
                };
                self.ask_to_publish(key, publication);
            }
            Verdict::Broadcast => {
                let (event, payload) = (message.event, message.payload.get());
                self.publish_from_client(key, topic, event, payload, idempotency_key);
            }
            Verdict::Rewrite { event, payload } => {
                let payload = payload.to_string();
                self.publish_from_client(key, topic, &event, &payload, idempotency_key);
            }
            Verdict::Drop => {}
            Verdict::Reject(reason) => self.send_error(key, &reason),
        }
        self.apply_actions(key, topic, actions);
    }

    /// Publishes what connection `key` published, once its rule, its hook
    /// and (with `publish_proxy`) the backend allowed it; tells the client
    /// when it did not go everywhere, and reports it as a `client_event`.
    pub(super) fn publish_from_client(
        &mut self,
        key: ConnKey,
        topic: &str,
        event: &str,
        payload: &str,
        idempotency_key: Option<&str>,
    ) {
        match self.publish(topic, event, payload, None, idempotency_key) {
            Published::Refused(_, why) => return self.send_error(key, &why),
            Published::LocalOnly { why, .. } => self.send_error(key, why.message()),
            _ => {}
        }
        self.report_client_event(key, topic, event, payload);
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
                    self.publish(&topic, &event, &payload_json, None, None);
                }
                Action::Track { meta_json } => {
                    // A hook may build its meta from what the client sent;
                    // every presence answer copies it, so it is bounded.
                    let max = self.config().limits.max_presence_meta_bytes;
                    if meta_json.len() > max {
                        ShardStats::add(&self.stats().presence_refused_total, 1);
                        let reason =
                            format!("presence meta over {max} bytes: not tracked on `{topic}`");
                        self.send_error(key, &reason);
                        continue;
                    }
                    let meta = self.presence.intern(meta_json);
                    self.set_presence_meta(key, topic, Some(meta))
                }
                Action::Untrack => self.set_presence_meta(key, topic, None),
                Action::Announce { event } => {
                    let user = self.conns.get(key).and_then(|c| c.user().cloned());
                    // Only the count is announced: no member is gathered.
                    let query = MemberQuery::default();
                    self.start_presence(topic, query, PresenceThen::Announce { event, user });
                }
            }
        }
    }

    pub(super) fn set_presence_meta(&mut self, key: ConnKey, topic: &str, meta: Option<Arc<str>>) {
        let Some(id) = self.topics.lookup(topic) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(sub) = conn.subs.iter_mut().find(|s| s.topic == id) {
            if sub.meta != meta {
                let was = std::mem::replace(&mut sub.meta, meta.clone());
                self.presence_to_other_nodes(key, id, meta.clone());
                if was.is_some() != meta.is_some() {
                    self.member_changed(key, id, meta.is_some());
                }
                if let Some(was) = &was {
                    self.pusher_member_changed(key, id, was, false);
                }
                if let Some(meta) = &meta {
                    self.pusher_member_changed(key, id, meta, true);
                }
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

    /// This shard's members of `topic`: the count, and the page `query`
    /// asks for.
    fn local_presence(&self, topic: &str, query: &MemberQuery) -> Members {
        if let Some(prefix) = &query.topics_under {
            return self.local_topics(prefix, query);
        }
        let mut members = Members::default();
        let Some(id) = self.topics.lookup(topic) else {
            return members;
        };
        let entry = self.topics.entry(id);
        for &key in entry.subscribers.iter().chain(entry.waiting.iter()) {
            if query.subscribers && query.limit == 0 {
                members.count += 1;
                continue;
            }
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
            if query.by_user {
                // The meta is the member (one per user, however many
                // connections it has).
                let Some(user) = crate::bus::user_of(meta) else {
                    continue;
                };
                members.offer(query, || user, |_| meta.to_string());
                continue;
            }
            members.offer(
                query,
                || self.conn_id(key),
                |conn_id| {
                    let mut json = String::with_capacity(24 + conn_id.len() + meta.len());
                    json.push_str("{\"conn_id\":\"");
                    json.push_str(conn_id);
                    json.push_str("\",\"meta\":");
                    json.push_str(meta);
                    json.push('}');
                    json
                },
            );
        }
        members.trim(query.limit);
        members
    }

    /// The user of connection `key`'s presence member in `topic`, if it
    /// is one and its meta names a user.
    pub(super) fn member_user(&self, key: ConnKey, topic: NameId) -> Option<String> {
        let conn = self.conns.get(key)?;
        let sub = conn.subs.iter().find(|s| s.topic == topic)?;
        crate::bus::user_of(sub.meta.as_deref()?)
    }

    /// This shard's topics under `prefix` with subscribers, as members
    /// (see `MemberQuery::topics_under`).
    fn local_topics(&self, prefix: &str, query: &MemberQuery) -> Members {
        let mut members = Members::default();
        for (id, entry) in self.topics.iter() {
            if entry.subscribers.is_empty() || !entry.name.starts_with(prefix) {
                continue;
            }
            if !query.by_user {
                members.offer(query, || entry.name.to_string(), |_| String::new());
                continue;
            }
            for &key in &entry.subscribers {
                if let Some(user) = self.member_user(key, id) {
                    let pair = || format!("{}\0{user}", entry.name);
                    members.offer(query, pair, |_| String::new());
                }
            }
        }
        members.trim(query.limit);
        members
    }

    /// Counts `topic`'s members here and asks every other shard for the
    /// page `query` names; `then` says where the total goes.
    pub(super) fn start_presence(&mut self, topic: &str, query: MemberQuery, then: PresenceThen) {
        let members = self.local_presence(topic, &query);
        let topic: Arc<str> = Arc::from(topic);
        // In a cluster the broker answers for the other nodes.
        let others = self.shared.bus.members() - 1;
        let wait = PresenceWait {
            topic: topic.clone(),
            remaining: others,
            query,
            members,
            then,
        };
        if others == 0 {
            return self.finish_presence(wait);
        }
        let (ticket, query) = self.wait_for_presence(wait);
        self.broadcast_interest(|| Envelope::PresenceQuery {
            ticket,
            topic: topic.clone(),
            query: query.clone(),
        });
    }

    /// Keeps `wait` until its answers come: its ticket, and the query the
    /// others are asked.
    fn wait_for_presence(&mut self, wait: PresenceWait) -> (u64, MemberQuery) {
        let ticket = self.presence.next_ticket;
        self.presence.next_ticket += 1;
        let query = wait.query.clone();
        self.presence.waits.insert(ticket, wait);
        (ticket, query)
    }

    /// Whether this shard may start another presence query.
    pub(super) fn presence_has_room(&self) -> bool {
        self.presence.waits.len() < MAX_PRESENCE_PER_SHARD && self.control_has_room()
    }

    pub(super) fn on_presence_query(
        &mut self,
        from: ShardId,
        ticket: u64,
        topic: &str,
        query: &MemberQuery,
    ) {
        let members = Box::new(self.local_presence(topic, query));
        self.post_control(from, Envelope::PresenceReply { ticket, members });
    }

    pub(super) fn on_presence_reply(&mut self, ticket: u64, members: Members) {
        let Some(wait) = self.presence.waits.get_mut(&ticket) else {
            return;
        };
        wait.members.merge(members, wait.query.limit);
        wait.remaining -= 1;
        if wait.remaining == 0 {
            if let Some(wait) = self.presence.waits.remove(&ticket) {
                self.finish_presence(wait);
            }
        }
    }

    fn finish_presence(&mut self, wait: PresenceWait) {
        let members = &wait.members;
        match wait.then {
            PresenceThen::Http { key } => {
                self.presence_answered(key);
                let parked = self.take_deferred(key, |d| matches!(d, Deferred::Presence { .. }));
                if let Some(Deferred::Presence { reply }) = parked {
                    let mut body = Vec::with_capacity(64);
                    body.push(b'{');
                    let (count, next) = (members.count, members.next());
                    message::write_members(&mut body, count, members.objects(), next);
                    body.push(b'}');
                    self.answer_parked(key, reply.answer(Response::json(200, body)));
                }
            }
            PresenceThen::Ws { key } => {
                self.presence_answered(key);
                let (count, next) = (members.count, members.next());
                let answer = message::presence(&wait.topic, count, members.objects(), next);
                self.send(key, answer);
            }
            PresenceThen::Announce { event, user } => {
                let payload =
                    serde_json::json!({ "user_id": user.as_deref(), "count": members.count });
                self.publish(&wait.topic, &event, &payload.to_string(), None, None);
            }
            PresenceThen::PusherChannels {
                key,
                prefix,
                user_count,
            } => {
                self.presence_answered(key);
                self.pusher_channels_answered(key, &prefix, user_count, members);
            }
            PresenceThen::PusherTriggerInfo { key, info } => {
                self.trigger_info_counted(key, info, members);
            }
            PresenceThen::PusherChannel { key, query } => {
                self.presence_answered(key);
                self.pusher_channel_answered(key, query, members);
            }
            PresenceThen::PusherSucceeded {
                key,
                joining,
                cache_miss,
            } => {
                self.pusher_presence_answered(key, &wait.topic, joining, cache_miss, members);
            }
        }
    }

    pub(super) fn presence_answered(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.presence_queries = conn.presence_queries.saturating_sub(1);
        }
    }
}
