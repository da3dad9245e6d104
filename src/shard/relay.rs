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
use crate::protocol::message::{self, ClientMessage};

use super::channels::PresenceThen;
use super::conn::{Sub, WsKind};
use super::topics::TopicId;
use super::Shard;

impl Shard {
    pub(super) fn handle_ws(&mut self, key: usize, kind: WsKind, incoming: Incoming) {
        if !matches!(incoming, Incoming::Fragment) {
            ShardStats::add(&self.stats().messages_in_total, 1);
        }
        match incoming {
            Incoming::Fragment | Incoming::Pong(_) => {}
            Incoming::Ping(payload) => self.send_frame(key, frame::pong(&payload)),
            Incoming::Close(code) => self.on_peer_close(key, code),
            Incoming::Text(text) if self.conns[key].close_sent => drop(text),
            Incoming::Binary(_) if self.conns[key].close_sent => {}
            Incoming::Text(text) => match kind {
                WsKind::Echo => self.send_frame(key, frame::text(&text)),
                WsKind::Relay => self.handle_relay_text(key, &text),
                WsKind::Chat => self.chat_line(key, &text),
            },
            Incoming::Binary(data) => match kind {
                WsKind::Echo => self.send_frame(key, frame::binary(&data)),
                WsKind::Relay => self.send_error(
                    key,
                    "binary messages are not supported on /ws; send JSON text",
                ),
                WsKind::Chat => {
                    self.send_frame(key, frame::text(b"error: /chat carries text messages only"))
                }
            },
        }
    }

    fn on_peer_close(&mut self, key: usize, code: Option<(u16, String)>) {
        let conn = &mut self.conns[key];
        if !conn.close_sent {
            // RFC 6455 5.5.1: answer with the code the peer sent.
            let code = code.map_or(1000, |(code, _)| code);
            conn.close_sent = true;
            conn.out
                .enqueue_final(frame::close(code, ""), &mut self.send_buffers);
            self.mark_dirty(key);
        }
        self.close_after_flush(key, true);
    }

    pub(super) fn send_error(&mut self, key: usize, message: &str) {
        ShardStats::add(&self.stats().ws_errors_total, 1);
        self.send_frame(key, message::error(message));
    }

    fn handle_relay_text(&mut self, key: usize, text: &[u8]) {
        // The frame decoder has validated UTF-8 for text messages.
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        if text.trim() == "ping" {
            self.send_frame(key, message::pong_text());
            return;
        }
        let max_topic_bytes = self.config().limits.max_topic_bytes;
        match message::parse_client(text, max_topic_bytes) {
            Err(e) => self.send_error(key, &e.to_string()),
            Ok(ClientMessage::Ping) => self.send_frame(key, message::pong()),
            Ok(ClientMessage::Subscribe { topic }) => self.subscribe(key, &topic),
            Ok(ClientMessage::Unsubscribe { topic }) => {
                if let Some(id) = self.subscription(key, &topic) {
                    self.unsubscribe(key, id);
                }
                self.send_frame(key, message::unsubscribed(&topic));
            }
            Ok(ClientMessage::SetTopics(topics)) => {
                let wanted: Vec<&str> = topics.iter().map(|t| t.as_ref()).collect();
                self.set_topics(key, &wanted);
            }
            Ok(ClientMessage::Publish {
                topic,
                event,
                payload,
            }) => {
                self.client_publish(key, &topic, event.as_deref(), payload);
            }
            Ok(ClientMessage::Presence { topic }) => {
                if !self.presence_tracked(&topic) {
                    return self
                        .send_error(key, &format!("presence is not tracked for topic `{topic}`"));
                }
                let generation = self.conns[key].generation;
                self.start_presence(&topic, PresenceThen::Ws { key, generation });
            }
        }
    }

    /// The topic id if the connection holds `topic` (active or waiting).
    pub(super) fn subscription(&self, key: usize, topic: &str) -> Option<TopicId> {
        let id = self.topics.lookup(topic)?;
        self.conns[key]
            .subs
            .iter()
            .any(|s| s.topic == id)
            .then_some(id)
    }

    pub(super) fn subscribe(&mut self, key: usize, topic: &str) {
        if let Some(id) = self.subscription(key, topic) {
            // Idempotent; a waiting subscription gets its reply when the acks arrive.
            if self.conns[key]
                .subs
                .iter()
                .any(|s| s.topic == id && s.pos.is_some())
            {
                self.send_frame(key, message::subscribed(topic));
            }
            return;
        }
        let max = self.config().limits.max_subscriptions_per_connection;
        if self.conns[key].subs.len() >= max {
            let message =
                format!("subscription limit of {max} reached; unsubscribe from a topic first");
            self.send_error(key, &message);
            return;
        }
        let Some(channel) = self.channel_for(topic) else {
            return self.send_error(key, &format!("no rule allows topic `{topic}`"));
        };
        let actions = match self.hook_join(key, channel, topic) {
            Ok(actions) => actions,
            Err(reason) => return self.send_error(key, &reason),
        };
        let (id, pos) = match self.join_index(IndexKind::Topic, key, topic) {
            Ok(joined) => joined,
            Err(limit) => return self.send_error(key, &limit.to_string()),
        };
        self.topics.entry_mut(id).channel = Some(channel);
        ShardStats::add(&self.stats().subscriptions, 1);
        self.update_topic_gauge();
        self.conns[key].subs.push(Sub {
            topic: id,
            pos,
            meta: None,
        });
        if pos.is_some() {
            self.send_frame(key, message::subscribed(topic));
        }
        self.apply_actions(key, topic, actions);
    }

    /// Removes one subscription of a connection.
    pub(super) fn unsubscribe(&mut self, key: usize, id: TopicId) {
        let subs = &mut self.conns[key].subs;
        let Some(index) = subs.iter().position(|s| s.topic == id) else {
            return;
        };
        let sub = subs.swap_remove(index);
        ShardStats::sub(&self.stats().subscriptions, 1);
        let entry = self.topics.entry(id);
        let (name, channel) = (entry.name.clone(), entry.channel);
        self.leave_index(IndexKind::Topic, key, id, sub.pos);
        self.hook_leave(key, channel, &name);
    }

    /// Removes every subscription of a connection (it is closing).
    pub(super) fn drop_subscriptions(&mut self, key: usize) {
        while let Some(sub) = self.conns.get(key).and_then(|c| c.subs.last().cloned()) {
            self.unsubscribe(key, sub.topic);
        }
    }

    /// `{"topics":[...]}`: replaces the whole set, answering `unsubscribed`
    /// for topics dropped and `subscribed` for topics added.
    fn set_topics(&mut self, key: usize, wanted: &[&str]) {
        let mut unique: Vec<&str> = Vec::with_capacity(wanted.len());
        for &topic in wanted {
            if !unique.contains(&topic) {
                unique.push(topic);
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
        let held: Vec<TopicId> = self.conns[key].subs.iter().map(|s| s.topic).collect();
        for id in held {
            let name = self.topics.entry(id).name.clone();
            if !unique.contains(&name.as_ref()) {
                self.unsubscribe(key, id);
                self.send_frame(key, message::unsubscribed(&name));
            }
        }
        for topic in unique {
            if self.subscription(key, topic).is_none() {
                self.subscribe(key, topic);
            }
        }
    }
}
