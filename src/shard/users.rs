//! Users on a shard: identified WebSockets, registrations, publish-to-user and
//! one-to-one chat.
//!
//! Each shard indexes its own connections by user id (relay connections and
//! `/chat` connections separately) and knows which other shards hold each
//! user, so a direct delivery goes only where that user is. Registrations are
//! small and rare, so every shard keeps all of them: `/ws/{id}` is answered
//! locally on whichever shard the kernel picked, and a registration change
//! is acknowledged by every shard before the HTTP response goes out.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind};
use crate::metrics::ShardStats;
use crate::protocol::frame;
use crate::protocol::http::{error_json, Request, Response};
use crate::protocol::message;

use super::conn::{Deferred, Ident, Phase, WsKind};
use super::Shard;

/// A client registration: who connects with the id and what it starts with.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) user: Arc<str>,
    pub(crate) topics: Arc<[String]>,
}

/// Registration ids are 16 random bytes as 32 hex characters.
const REGISTRATION_ID_BYTES: usize = 16;

/// An HTTP response waiting for acknowledgements of a broadcast.
pub(crate) struct Ticket {
    key: usize,
    generation: u32,
    remaining: usize,
}

/// Per-shard user state that is not an index.
#[derive(Default)]
pub(crate) struct Users {
    pub(crate) registry: HashMap<Arc<str>, Registration>,
    pub(crate) tickets: HashMap<u64, Ticket>,
    pub(crate) next_ticket: u64,
}

/// Identity and starting state of a WebSocket being opened.
pub(crate) struct Opening {
    pub(crate) kind: WsKind,
    pub(crate) user: Option<Arc<str>>,
    pub(crate) topics: Arc<[String]>,
    pub(crate) registration: Option<Arc<str>>,
    pub(crate) recipient: Option<Arc<str>>,
}

impl Opening {
    pub(crate) fn anonymous(kind: WsKind) -> Opening {
        Opening {
            kind,
            user: None,
            topics: Arc::from([]),
            registration: None,
            recipient: None,
        }
    }
}

impl Shard {
    /// Switches a connection to WebSocket. An identified one gets its `101`
    /// only when every shard knows this shard holds the user.
    pub(super) fn open_websocket(&mut self, key: usize, switching: Bytes, opening: Opening) {
        self.upgrade(key, opening.kind);
        let conn = &mut self.conns[key];
        conn.registration = opening.registration;
        conn.chat_recipient = opening.recipient;
        conn.deferred = Some(Deferred::Upgrade {
            switching,
            topics: opening.topics,
        });
        let Some(user) = opening.user else {
            return self.finish_upgrade(key);
        };
        conn.user = Some(user.clone());
        let kind = if opening.kind == WsKind::Chat {
            IndexKind::Chat
        } else {
            IndexKind::User
        };
        match self.join_index(kind, key, &user) {
            Ok((entry, pos)) => {
                self.conns[key].ident = Some(Ident { entry, pos });
                if pos.is_some() {
                    self.finish_upgrade(key);
                }
            }
            Err(limit) => {
                self.conns[key].deferred = None;
                self.respond(key, error_json(503, &limit.to_string()).keep_alive(false));
            }
        }
    }

    /// Sends the parked `101`, subscribes the starting topics, and resumes
    /// reading whatever the client sent meanwhile.
    pub(super) fn finish_upgrade(&mut self, key: usize) {
        let Some(Deferred::Upgrade { switching, topics }) = self.conns[key].deferred.take() else {
            return;
        };
        self.conns[key]
            .out
            .enqueue_final(switching, &mut self.send_buffers);
        self.mark_dirty(key);
        for topic in topics.iter() {
            self.subscribe(key, topic);
        }
        self.on_input(key, &[]);
    }

    /// Takes a connection out of the user or chat index (it is closing).
    pub(super) fn drop_identity(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(ident) = conn.ident.take() else {
            return;
        };
        let kind = match conn.phase {
            Phase::WebSocket {
                kind: WsKind::Chat, ..
            } => IndexKind::Chat,
            _ => IndexKind::User,
        };
        self.leave_index(kind, key, ident.entry, ident.pos);
    }

    /// `POST /register {"user_id":U,"topics"?:[..]}`.
    pub(super) fn register(&mut self, key: usize, request: &Request) -> Option<Response> {
        let limits = &self.config().limits;
        let (user, topics) = match parse_registration(&request.body, limits.max_topic_bytes) {
            Ok(parsed) => parsed,
            Err(message) => return Some(error_json(400, &message)),
        };
        if self.users_state.registry.len() >= limits.max_registrations {
            let message = format!("registration limit of {} reached", limits.max_registrations);
            return Some(error_json(503, &message));
        }
        let max = limits.max_subscriptions_per_connection;
        if topics.len() > max {
            return Some(error_json(
                400,
                &format!("at most {max} topics per registration"),
            ));
        }
        let id: Arc<str> = match new_registration_id() {
            Ok(id) => id.into(),
            Err(e) => return Some(error_json(500, &format!("no randomness for an id: {e}"))),
        };
        let host = request
            .header("host")
            .filter(|h| !h.is_empty() && !h.contains(['/', ' ']));
        let host = host.map_or_else(|| self.config().listen.to_string(), str::to_string);
        let body =
            serde_json::json!({"id": &*id, "url": format!("ws://{host}/ws/{id}")}).to_string();
        let topics: Arc<[String]> = topics.into();
        let user: Arc<str> = user.into();
        self.users_state.registry.insert(
            id.clone(),
            Registration {
                user: user.clone(),
                topics: topics.clone(),
            },
        );
        let response = Response::json(201, body).keep_alive(request.keep_alive());
        self.broadcast_with_ack(key, response, |ticket| Envelope::Register {
            ticket,
            id: id.clone(),
            user: user.clone(),
            topics: topics.clone(),
        })
    }

    /// `DELETE /register/{id}`: forget it everywhere and close its connections.
    pub(super) fn unregister(
        &mut self,
        key: usize,
        id: &str,
        keep_alive: bool,
    ) -> Option<Response> {
        let Some((id, _)) = self.users_state.registry.remove_entry(id) else {
            return Some(error_json(404, "unknown registration id"));
        };
        self.close_registered(&id);
        let response = Response::new(204).keep_alive(keep_alive);
        self.broadcast_with_ack(key, response, |ticket| Envelope::Unregister {
            ticket,
            id: id.clone(),
        })
    }

    /// Broadcasts a registry change and parks `response` until every shard has
    /// acknowledged it; answers at once when there is no other shard.
    fn broadcast_with_ack(
        &mut self,
        key: usize,
        response: Response,
        make: impl Fn(u64) -> Envelope,
    ) -> Option<Response> {
        let others = self.shared.bus.shards() - 1;
        if others == 0 {
            return Some(response);
        }
        let ticket = self.users_state.next_ticket;
        self.users_state.next_ticket += 1;
        let generation = self.conns[key].generation;
        self.users_state.tickets.insert(
            ticket,
            Ticket {
                key,
                generation,
                remaining: others,
            },
        );
        self.conns[key].deferred = Some(Deferred::Response { ticket, response });
        self.broadcast_control(|| make(ticket));
        None
    }

    pub(super) fn on_ack(&mut self, ticket: u64) {
        let Some(entry) = self.users_state.tickets.get_mut(&ticket) else {
            return;
        };
        entry.remaining -= 1;
        if entry.remaining > 0 {
            return;
        }
        let Some(Ticket {
            key, generation, ..
        }) = self.users_state.tickets.remove(&ticket)
        else {
            return;
        };
        let parked = self.take_deferred(
            key,
            generation,
            |d| matches!(d, Deferred::Response { ticket: t, .. } if *t == ticket),
        );
        if let Some(Deferred::Response { response, .. }) = parked {
            self.answer_parked(key, response);
        }
    }

    pub(super) fn on_register(
        &mut self,
        from: crate::bus::ShardId,
        ticket: u64,
        id: Arc<str>,
        registration: Registration,
    ) {
        self.users_state.registry.insert(id, registration);
        self.outbox
            .send(&self.shared.bus, from, Envelope::Ack { ticket });
    }

    pub(super) fn on_unregister(&mut self, from: crate::bus::ShardId, ticket: u64, id: &str) {
        self.users_state.registry.remove(id);
        self.close_registered(id);
        self.outbox
            .send(&self.shared.bus, from, Envelope::Ack { ticket });
    }

    /// Closes (1000) this shard's connections opened with registration `id`.
    fn close_registered(&mut self, id: &str) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.registration.as_deref() == Some(id))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.close_ws(key, 1000, "registration deleted");
        }
    }

    /// Delivers `frame` to the local connections of `user` in index `kind`;
    /// for relay users only to those holding `topic`. Returns how many got it.
    pub(super) fn deliver_to_user(
        &mut self,
        kind: IndexKind,
        user: &str,
        topic: Option<&str>,
        frame: &Bytes,
    ) -> usize {
        let Some(entry) = self.index(kind).lookup(user) else {
            return 0;
        };
        let topic = match topic {
            Some(name) => match self.topics.lookup(name) {
                Some(id) => Some(id),
                None => return 0,
            },
            None => None,
        };
        let budget = self.config().limits.max_outbound_bytes_per_connection;
        let index = match kind {
            IndexKind::Chat => &self.chatters,
            _ => &self.users,
        };
        let targets = &index.entry(entry).subscribers;
        let holds_topic = |conn: &super::conn::Conn| match topic {
            Some(topic) => conn
                .subs
                .iter()
                .any(|s| s.topic == topic && s.pos.is_some()),
            None => true,
        };
        let outcome = super::enqueue_all(
            &mut self.conns,
            &mut self.dirty,
            &mut self.send_buffers,
            budget,
            targets,
            frame,
            holds_topic,
        );
        self.settle_fan_out(outcome)
    }

    /// Delivers to `user` here and on every shard that holds the user.
    /// Returns how many shards took it.
    pub(super) fn send_to_user(
        &mut self,
        kind: IndexKind,
        user: &str,
        topic: Option<&str>,
        frame: Bytes,
    ) -> usize {
        let mut shards = usize::from(self.deliver_to_user(kind, user, topic, &frame) > 0);
        let Some(entry) = self.index(kind).lookup(user) else {
            return shards;
        };
        let entry = self.index(kind).entry(entry);
        let (name, remote) = (entry.name.clone(), entry.remote);
        let topic: Option<Arc<str>> = topic.map(Arc::from);
        for to in remote.iter() {
            let envelope = match &topic {
                Some(topic) => Envelope::UserPublish {
                    user: name.clone(),
                    topic: topic.clone(),
                    frame: frame.clone(),
                },
                None => Envelope::Chat {
                    user: name.clone(),
                    frame: frame.clone(),
                },
            };
            match self.outbox.send(&self.shared.bus, to, envelope) {
                crate::bus::Sent::Queued => {
                    shards += 1;
                    ShardStats::add(&self.stats().bus_sent_total, 1);
                }
                crate::bus::Sent::Dropped => ShardStats::add(&self.stats().bus_drops_total, 1),
            }
        }
        shards
    }

    /// A text line from a `/chat` connection: `sender: text` to every chat
    /// connection of its recipient.
    pub(super) fn chat_line(&mut self, key: usize, text: &[u8]) {
        let conn = &self.conns[key];
        let (Some(sender), Some(recipient)) = (conn.user.clone(), conn.chat_recipient.clone())
        else {
            return;
        };
        let text = String::from_utf8_lossy(text);
        let line =
            frame::text(format!("{sender}: {}", text.trim_end_matches(['\r', '\n'])).as_bytes());
        ShardStats::add(&self.stats().publishes_total, 1);
        self.send_to_user(IndexKind::Chat, &recipient, None, line);
    }

    /// `POST /publish` with `user_id`.
    pub(super) fn publish_to_user(&mut self, user: &str, topic: &str, frame: Bytes) -> usize {
        ShardStats::add(&self.stats().publishes_total, 1);
        self.send_to_user(IndexKind::User, user, Some(topic), frame)
    }
}

/// Reads `{"user_id":U,"topics"?:[..]}`.
fn parse_registration(
    body: &[u8],
    max_topic_bytes: usize,
) -> Result<(String, Vec<String>), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let user = value
        .get("user_id")
        .and_then(message::user_id_from_json)
        .ok_or("`user_id` is required: a non-empty string or an integer")?;
    let mut topics = Vec::new();
    match value.get("topics") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(list)) => {
            for topic in list {
                let topic = topic
                    .as_str()
                    .ok_or("`topics` must be an array of strings")?;
                message::check_topic(topic, max_topic_bytes).map_err(|e| e.to_string())?;
                if !topics.iter().any(|t| t == topic) {
                    topics.push(topic.to_string());
                }
            }
        }
        Some(_) => return Err("`topics` must be an array of strings".into()),
    }
    Ok((user, topics))
}

fn new_registration_id() -> std::io::Result<String> {
    let mut bytes = [0u8; REGISTRATION_ID_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_bodies_are_validated() {
        assert_eq!(
            parse_registration(br#"{"user_id":"u1"}"#, 16).unwrap(),
            ("u1".into(), vec![])
        );
        assert_eq!(
            parse_registration(br#"{"user_id":42,"topics":["a","a","b"]}"#, 16).unwrap(),
            ("42".into(), vec!["a".into(), "b".into()])
        );
        assert!(parse_registration(br#"{"topics":[]}"#, 16).is_err());
        assert!(parse_registration(br#"{"user_id":"u","topics":"a"}"#, 16).is_err());
        assert!(parse_registration(br#"{"user_id":"u","topics":[""]}"#, 16).is_err());
        assert!(parse_registration(b"nope", 16).is_err());
    }

    #[test]
    fn registration_ids_are_32_hex_characters_and_differ() {
        let a = new_registration_id().unwrap();
        let b = new_registration_id().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
