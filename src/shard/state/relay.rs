//! WebSocket messages on a shard: the JSON relay protocol on `/ws`, raw echo
//! on `/echo`, control frames, and the subscription bookkeeping behind them.
//!
//! Subscribing to a topic this shard holds no subscriber of yet sends an
//! interest notice to every other shard; the client gets `subscribed` once all
//! of them have acknowledged it, so any publish accepted anywhere after that
//! reply reaches it.

use crate::bus::IndexKind;
use crate::metrics::ShardStats;
use crate::protocol::frame::{self, Incoming};
use crate::protocol::message::{self, ClientMessage, MemberPage, Since, TopicRequest};
use crate::shard::key::ConnKey;

use super::channels::PresenceThen;
use super::conn::{Closing, Sub, WsKind};
use super::names::NameId;
use super::ShardState;

impl ShardState {
    pub(super) fn handle_ws(&mut self, key: ConnKey, kind: WsKind, incoming: Incoming) {
        if !matches!(incoming, Incoming::Fragment) {
            ShardStats::add(&self.stats().messages_in_total, 1);
        }
        let closing = self.conns.get(key).map_or(Closing::Done, |c| c.closing);
        match incoming {
            Incoming::Close(code) => self.on_peer_close(key, code),
            // After our close frame only the peer's close matters (RFC 6455 5.5.1).
            _ if closing != Closing::No => {}
            Incoming::Fragment | Incoming::Pong(_) => {}
            // Inflated before it gets here (`input::step_ws`).
            Incoming::Compressed { .. } => debug_assert!(false, "a message left compressed"),
            Incoming::Ping(payload) => self.send(key, frame::pong(&payload)),
            Incoming::Text(text) => match kind {
                WsKind::Echo => self.send(key, frame::text(&text)),
                WsKind::Relay => self.handle_relay_text(key, &text),
                WsKind::Chat => self.chat_line(key, &text),
                WsKind::Pusher(_) => self.pusher_text(key, &text),
            },
            Incoming::Binary(data) => match kind {
                WsKind::Echo => self.send(key, frame::binary(&data)),
                WsKind::Relay => self.send_error(
                    key,
                    "binary messages are not supported on /ws; send JSON text",
                ),
                WsKind::Chat => {
                    self.send(key, frame::text(b"error: /chat carries text messages only"))
                }
                WsKind::Pusher(_) => self.send(
                    key,
                    crate::pusher::wire::error(None, "binary messages are not Pusher messages"),
                ),
            },
        }
    }

    pub(super) fn send_error(&mut self, key: ConnKey, message: &str) {
        ShardStats::add(&self.stats().ws_errors_total, 1);
        self.send(key, message::error(message));
    }

    fn handle_relay_text(&mut self, key: ConnKey, text: &[u8]) {
        // The frame decoder has validated UTF-8 for text messages.
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        if text.trim() == "ping" {
            self.send(key, message::pong_text());
            return;
        }
        let bounds = self.config().limits.name_bounds();
        match message::parse_client(text, bounds) {
            Err(e) => self.send_error(key, &e.to_string()),
            Ok(ClientMessage::Ping) => self.send(key, message::pong()),
            Ok(ClientMessage::Subscribe { topic, since }) => self.subscribe(key, &topic, since),
            Ok(ClientMessage::Unsubscribe { topic }) => {
                if let Some(id) = self.subscription(key, &topic) {
                    self.unsubscribe(key, id);
                }
                self.cancel_proxied(key, |t| t == topic.as_ref());
                self.send(key, message::unsubscribed(&topic));
            }
            Ok(ClientMessage::SetTopics(topics)) => self.set_topics(key, topics),
            Ok(ClientMessage::Publish {
                topic,
                event,
                payload,
                idempotency_key,
            }) => {
                let idempotency = idempotency_key.as_deref();
                self.client_publish(key, &topic, event.as_deref(), payload, idempotency);
            }
            Ok(ClientMessage::Presence { topic, page }) => self.ws_presence(key, &topic, page),
        }
    }

    fn ws_presence(&mut self, key: ConnKey, topic: &str, page: MemberPage<'_>) {
        if !self.presence_tracked(topic) {
            return self.send_error(key, &format!("presence is not tracked for topic `{topic}`"));
        }
        if let Err((_, reason)) = self.admit_presence(key) {
            return self.send_error(key, &reason);
        }
        let query = self.member_query(page.limit, page.after.as_deref());
        self.start_presence(topic, query, PresenceThen::Ws { key });
    }

    /// The topic id if the connection holds `topic` (active or waiting).
    pub(super) fn subscription(&self, key: ConnKey, topic: &str) -> Option<NameId> {
        let id = self.topics.lookup(topic)?;
        self.conns
            .get(key)?
            .subs
            .iter()
            .any(|s| s.topic == id)
            .then_some(id)
    }

    /// Subscribes connection `key` to `topic`. A stream topic's subscriber
    /// is opened at its home (recovering from `since` if given) before it
    /// gets `subscribed`; `since` means nothing for a plain topic.
    pub(super) fn subscribe(&mut self, key: ConnKey, topic: &str, since: Option<Since>) {
        self.subscribe_with(key, topic, since, false);
    }

    /// The same, for a subscription the backend has allowed.
    pub(super) fn subscribe_allowed(&mut self, key: ConnKey, topic: &str, since: Option<Since>) {
        self.subscribe_with(key, topic, since, true);
    }

    fn subscribe_with(
        &mut self,
        key: ConnKey,
        topic: &str,
        since: Option<Since>,
        allowed_by_backend: bool,
    ) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if let Some(id) = self.subscription(key, topic) {
            // Idempotent; a waiting subscription gets its reply when the acks
            // arrive. A stream's reply tells where the pushes stand, which
            // only its home knows (`since` is not for a topic held already).
            if conn.subs.iter().any(|s| s.topic == id && s.pos().is_some()) {
                if self.stream_history(topic).is_some() {
                    self.restate_stream_position(key, id);
                } else {
                    self.send(key, self.subscribed_reply(topic));
                }
            }
            return;
        }
        let max = self.config().limits.max_subscriptions_per_connection;
        // Subscriptions waiting for the backend count too (the one allowed
        // now no longer waits).
        if conn.subs.len() + self.proxied_count(key) >= max {
            let message =
                format!("subscription limit of {max} reached; unsubscribe from a topic first");
            return self.send_error(key, &message);
        }
        let Some(channel) = self.channel_for(topic) else {
            return self.send_error(key, &format!("no rule allows topic `{topic}`"));
        };
        if !allowed_by_backend && self.shared.channels.hook(channel).subscribe_proxy() {
            return self.ask_to_subscribe(key, topic, since);
        }
        if self.topics.lookup(topic).is_none() && !self.control_has_room() {
            return self.send_error(key, "server busy: cannot subscribe now, try again");
        }
        let actions = match self.hook_join(key, channel, topic) {
            Ok(actions) => actions,
            Err(reason) => return self.send_error(key, &reason),
        };
        let stream = self.stream_history(topic).is_some();
        let (id, pos) = match self.join_index(IndexKind::Topic, key, topic, !stream) {
            Ok(joined) => joined,
            Err(limit) => return self.send_error(key, &limit.to_string()),
        };
        self.topics.entry_mut(id).channel = Some(channel);
        ShardStats::add(&self.stats().subscriptions, 1);
        self.update_topic_gauge();
        if let Some(conn) = self.conns.get_mut(key) {
            // Grow one at a time: most connections hold one or two topics,
            // and the default growth would reserve four.
            conn.subs.reserve_exact(1);
            conn.subs.push(Sub::new(id, pos, since.filter(|_| stream)));
        }
        if pos.is_some() {
            self.send(key, self.subscribed_reply(topic));
        } else if stream && self.topics.entry(id).acks_pending == 0 {
            self.open_stream(key, id);
        }
        self.apply_actions(key, topic, actions);
    }

    /// Removes one subscription of a connection.
    pub(super) fn unsubscribe(&mut self, key: ConnKey, id: NameId) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(index) = conn.subs.iter().position(|s| s.topic == id) else {
            return;
        };
        let sub = conn.subs.swap_remove(index);
        ShardStats::sub(&self.stats().subscriptions, 1);
        if let Some(meta) = &sub.meta {
            self.presence_to_other_nodes(key, id, None);
            self.member_changed(key, id, false);
            self.pusher_member_changed(key, id, meta, false);
        }
        let entry = self.topics.entry(id);
        let (name, channel) = (entry.name.clone(), entry.channel);
        self.forget_pusher_joining(key, &name);
        self.cancel_stream_opens(key, &name);
        self.leave_index(IndexKind::Topic, key, id, sub.pos());
        self.hook_leave(key, channel, &name);
    }

    /// Removes every subscription of a connection (it is closing).
    pub(super) fn drop_subscriptions(&mut self, key: ConnKey) {
        while let Some(sub) = self.conns.get(key).and_then(|c| c.subs.last().cloned()) {
            self.unsubscribe(key, sub.topic);
        }
    }

    /// `{"topics":[...]}`: replaces the whole set, answering `unsubscribed`
    /// for topics dropped and `subscribed` for topics added (a topic added
    /// with a position recovers from it; topics held already keep going).
    fn set_topics(&mut self, key: ConnKey, wanted: Vec<TopicRequest<'_>>) {
        let mut unique: Vec<TopicRequest<'_>> = Vec::with_capacity(wanted.len());
        for request in wanted {
            if !unique.iter().any(|u| u.topic == request.topic) {
                unique.push(request);
            }
        }
        let max = self.config().limits.max_subscriptions_per_connection;
        if unique.len() > max {
            let message = format!(
                "subscription limit of {max} reached: {} topics requested",
                unique.len()
            );
            self.send_error(key, &message);
            return;
        }
        let held: Vec<NameId> = self
            .conns
            .get(key)
            .map(|c| c.subs.iter().map(|s| s.topic).collect())
            .unwrap_or_default();
        for id in held {
            let name = self.topics.entry(id).name.clone();
            if !unique.iter().any(|u| u.topic == name.as_ref()) {
                self.unsubscribe(key, id);
                self.send(key, message::unsubscribed(&name));
            }
        }
        self.cancel_proxied(key, |t| !unique.iter().any(|u| u.topic == t));
        for request in unique {
            if self.subscription(key, &request.topic).is_none() {
                self.subscribe(key, &request.topic, request.since);
            }
        }
    }
}
