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
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::metrics::ShardStats;
use crate::protocol::frame;
use crate::protocol::http::{error_json, Request, Response};
use crate::protocol::message::{self, Bounds};
use crate::shard::key::ConnKey;

use super::cluster::LocalOnly;
use super::conn::{Deferred, Ident, StreamConn, WsKind};
use super::encodings::{Delivered, Encodings};
use super::ShardState;

/// A client registration: who connects with the id and what it starts with.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) user: Arc<str>,
    pub(crate) topics: Arc<[String]>,
    /// The shard that created it: the one that counts it against
    /// `max_registrations` and gives the count back when it is deleted.
    pub(crate) origin: ShardId,
}

/// Registration ids are 16 random bytes as 32 hex characters.
const REGISTRATION_ID_BYTES: usize = 16;

/// An HTTP response waiting for acknowledgements of a broadcast.
pub(crate) struct Ticket {
    key: ConnKey,
    remaining: usize,
}

impl Registration {
    /// Bytes held for it under an id of `id_len` bytes: the strings, and
    /// the table entry.
    fn bytes(&self, id_len: usize) -> usize {
        let topics: usize = self
            .topics
            .iter()
            .map(|t| t.len() + std::mem::size_of::<String>())
            .sum();
        id_len + self.user.len() + topics + REGISTRATION_ENTRY_BYTES
    }
}

/// Bytes a registration costs beyond its strings: its key and value in the
/// table (with the table's slack for one entry) and the `Arc` headers.
const REGISTRATION_ENTRY_BYTES: usize =
    2 * (std::mem::size_of::<Arc<str>>() + std::mem::size_of::<Registration>()) + 3 * 16;

/// Every registration, by id, with the bytes they hold. Every shard keeps
/// all of them (the strings are shared with the other shards through the
/// envelope that carried them; the table is this shard's).
#[derive(Default)]
pub(crate) struct Registry {
    by_id: HashMap<Arc<str>, Registration>,
    bytes: usize,
}

impl Registry {
    pub(crate) fn get(&self, id: &str) -> Option<&Registration> {
        self.by_id.get(id)
    }

    pub(crate) fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    fn insert(&mut self, id: Arc<str>, registration: Registration) {
        self.bytes += registration.bytes(id.len());
        if let Some(old) = self.by_id.insert(id.clone(), registration) {
            self.bytes -= old.bytes(id.len());
        }
    }

    fn remove_entry(&mut self, id: &str) -> Option<(Arc<str>, Registration)> {
        let (id, registration) = self.by_id.remove_entry(id)?;
        let bytes = registration.bytes(id.len());
        debug_assert!(bytes <= self.bytes, "released more than was charged");
        self.bytes -= bytes;
        Some((id, registration))
    }

    /// Bytes the registrations hold, for `/metrics`.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Per-shard user state that is not an index.
#[derive(Default)]
pub(crate) struct Users {
    pub(crate) registry: Registry,
    pub(crate) tickets: HashMap<u64, Ticket>,
    pub(crate) next_ticket: u64,
    /// Registration id -> `/ws/{id}` upgrades waiting for it to arrive
    /// from another node (parked as `Deferred::Registration`).
    pub(crate) awaited: HashMap<Arc<str>, Vec<ConnKey>>,
}

/// How long, in a cluster, a `/ws/{id}` for an id this node has not heard
/// of waits for it before `404`: the node that gave the id out answered
/// its `201` once Redis had written the announcement to every node's
/// connection, so the registration is a moment away; a client that
/// connects at once must not be told it does not exist.
pub(crate) const REGISTRATION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Identity and starting state of a WebSocket being opened.
pub(crate) struct Opening {
    pub(crate) kind: WsKind,
    pub(crate) user: Option<Arc<str>>,
    pub(crate) topics: Arc<[String]>,
    pub(crate) registration: Option<Arc<str>>,
    pub(crate) recipient: Option<Arc<str>>,
    /// For an event stream (`/sse`, `/stream`): its format and topics. Its
    /// "upgrade" is the streaming `200`.
    pub(crate) stream: Option<Box<StreamConn>>,
    /// permessage-deflate was negotiated in its handshake.
    pub(crate) deflate: bool,
}

impl Opening {
    pub(crate) fn anonymous(kind: WsKind) -> Opening {
        Opening {
            kind,
            user: None,
            topics: Arc::from([]),
            registration: None,
            recipient: None,
            stream: None,
            deflate: false,
        }
    }
}

impl ShardState {
    /// Switches a connection to WebSocket. An identified one gets its `101`
    /// only when every shard knows this shard holds the user.
    pub(super) fn open_websocket(&mut self, key: ConnKey, switching: Bytes, opening: Opening) {
        let index_kind = if opening.kind == WsKind::Chat {
            IndexKind::Chat
        } else {
            IndexKind::User
        };
        if let Some(user) = &opening.user {
            if self.index(index_kind).lookup(user).is_none() && !self.control_has_room() {
                let response = error_json(503, "server busy: try again").keep_alive(false);
                return self.respond(key, response);
            }
        }
        match opening.stream {
            Some(stream) => self.start_event_stream(key, stream),
            None => self.upgrade(key, opening.kind, opening.deflate),
        }
        self.park(
            key,
            Deferred::Upgrade {
                switching,
                topics: opening.topics,
            },
        );
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if opening.registration.is_some() || opening.recipient.is_some() {
            let identity = conn.identity_mut();
            identity.registration = opening.registration;
            identity.chat_recipient = opening.recipient;
        }
        let Some(user) = opening.user else {
            return self.finish_upgrade(key);
        };
        conn.identity_mut().user = Some(user.clone());
        match self.join_index(index_kind, key, &user, true) {
            Ok((entry, pos)) => {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.identity_mut().ident = Some(Ident { entry, pos });
                }
                if pos.is_some() {
                    self.finish_upgrade(key);
                }
            }
            Err(limit) => {
                self.take_deferred(key, |d| matches!(d, Deferred::Upgrade { .. }));
                self.respond(key, error_json(503, &limit.to_string()).keep_alive(false));
            }
        }
    }

    /// Sends the parked `101`, subscribes the starting topics, and resumes
    /// reading whatever the client sent meanwhile.
    pub(super) fn finish_upgrade(&mut self, key: ConnKey) {
        let Some(Deferred::Upgrade { switching, topics }) =
            self.take_deferred(key, |d| matches!(d, Deferred::Upgrade { .. }))
        else {
            return;
        };
        self.send(key, switching);
        if matches!(
            self.conns.get(key).and_then(|c| c.ws_kind()),
            Some(WsKind::Pusher(_))
        ) {
            self.pusher_opened(key);
        }
        for topic in topics.iter() {
            self.subscribe(key, topic, None);
        }
        self.subscribe_event_stream(key);
        self.resume_input(key);
    }

    /// Takes a connection out of the user or chat index (it is closing).
    pub(super) fn drop_identity(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let kind = match conn.ws_kind() {
            Some(WsKind::Chat) => IndexKind::Chat,
            _ => IndexKind::User,
        };
        let Some(ident) = conn.identity.as_mut().and_then(|i| i.ident.take()) else {
            return;
        };
        self.leave_index(kind, key, ident.entry, ident.pos);
    }

    /// `POST /register {"user_id":U,"topics"?:[..]}`.
    pub(super) fn register(&mut self, key: ConnKey, request: &Request) -> Option<Response> {
        let limits = &self.config().limits;
        let (user, topics) = match parse_registration(&request.body, limits.name_bounds()) {
            Ok(parsed) => parsed,
            Err(message) => return Some(error_json(400, &message)),
        };
        let max = limits.max_subscriptions_per_connection;
        if topics.len() > max {
            return Some(error_json(
                400,
                &format!("at most {max} topics per registration"),
            ));
        }
        if !self.control_has_room() {
            return Some(error_json(503, "server busy: try again"));
        }
        if self.shared.cluster.as_ref().is_some_and(|c| !c.is_up()) {
            return Some(error_json(
                503,
                "cluster unavailable: registrations are kept in Redis",
            ));
        }
        let topics: Arc<[String]> = topics.into();
        let user: Arc<str> = user.into();
        let registration = Registration {
            user: user.clone(),
            topics: topics.clone(),
            origin: self.id,
        };
        // Ids are fixed-length hex, so the bytes are known before the id.
        let bytes = registration.bytes(2 * REGISTRATION_ID_BYTES);
        if let Err(refusal) = self.reserve_registration(bytes) {
            return Some(error_json(503, &refusal));
        }
        let id: Arc<str> = match self.new_registration_id() {
            Ok(id) => id.into(),
            Err(e) => {
                self.release_registration(bytes);
                return Some(error_json(500, &format!("no randomness for an id: {e}")));
            }
        };
        debug_assert_eq!(registration.bytes(id.len()), bytes);
        let host = request
            .header("host")
            .filter(|h| !h.is_empty() && !h.contains(['/', ' ']));
        let host = host.map_or_else(|| self.config().listen.to_string(), str::to_string);
        let body =
            serde_json::json!({"id": &*id, "url": format!("ws://{host}/ws/{id}")}).to_string();
        self.users_state.registry.insert(id.clone(), registration);
        let response = Response::json(201, body).keep_alive(request.keep_alive());
        self.broadcast_with_ack(key, response, |ticket| Envelope::Register {
            ticket,
            id: id.clone(),
            user: user.clone(),
            topics: topics.clone(),
        })
    }

    /// Counts a new registration of `bytes` against `max_registrations` and
    /// `max_registration_bytes` across all shards, or says which is full.
    /// Shared atomics, not messages: registrations are rare, and a
    /// per-shard check let concurrent registrations on different shards
    /// pass the limit.
    fn reserve_registration(&self, bytes: usize) -> Result<(), String> {
        let limits = &self.config().limits;
        let (max, max_bytes) = (limits.max_registrations, limits.max_registration_bytes);
        let counted =
            self.shared
                .registrations
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
        if counted.is_err() {
            return Err(format!("registration limit of {max} reached"));
        }
        let sized =
            self.shared
                .registration_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n + bytes <= max_bytes).then_some(n + bytes)
                });
        if sized.is_err() {
            self.shared.registrations.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "registrations hold their limit of {max_bytes} bytes"
            ));
        }
        Ok(())
    }

    fn release_registration(&self, bytes: usize) {
        self.shared.registrations.fetch_sub(1, Ordering::AcqRel);
        self.shared
            .registration_bytes
            .fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Forgets registration `id` here; the shard that created it gives its
    /// count back, so each registration is released exactly once.
    fn forget_registration(&mut self, id: &str) -> Option<Arc<str>> {
        let (id, registration) = self.users_state.registry.remove_entry(id)?;
        if registration.origin == self.id {
            self.release_registration(registration.bytes(id.len()));
        }
        Some(id)
    }

    /// `DELETE /register/{id}`: forget it everywhere and close its connections.
    pub(super) fn unregister(
        &mut self,
        key: ConnKey,
        id: &str,
        keep_alive: bool,
    ) -> Option<Response> {
        if !self.users_state.registry.contains_key(id) {
            return Some(error_json(404, "unknown registration id"));
        }
        if !self.control_has_room() {
            return Some(error_json(503, "server busy: try again"));
        }
        if self.shared.cluster.as_ref().is_some_and(|c| !c.is_up()) {
            return Some(error_json(
                503,
                "cluster unavailable: registrations are kept in Redis",
            ));
        }
        let id = self.forget_registration(id)?;
        self.close_registered(&id);
        let response = Response::new(204).keep_alive(keep_alive);
        self.broadcast_with_ack(key, response, |ticket| Envelope::Unregister {
            ticket,
            id: id.clone(),
        })
    }

    /// Broadcasts a registry change and parks `response` until every other
    /// member of the bus has acknowledged it (in a cluster the broker does
    /// once Redis holds it and the other nodes were told); answers at once
    /// when there is no other member.
    fn broadcast_with_ack(
        &mut self,
        key: ConnKey,
        response: Response,
        make: impl Fn(u64) -> Envelope,
    ) -> Option<Response> {
        let others = self.shared.bus.members() - 1;
        if others == 0 {
            return Some(response);
        }
        let ticket = self.users_state.next_ticket;
        self.users_state.next_ticket += 1;
        self.users_state.tickets.insert(
            ticket,
            Ticket {
                key,
                remaining: others,
            },
        );
        self.park(key, Deferred::Response { ticket, response });
        self.broadcast_interest(|| make(ticket));
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
        let Some(Ticket { key, .. }) = self.users_state.tickets.remove(&ticket) else {
            return;
        };
        let parked = self.take_deferred(
            key,
            |d| matches!(d, Deferred::Response { ticket: t, .. } if *t == ticket),
        );
        if let Some(Deferred::Response { response, .. }) = parked {
            self.answer_parked(key, response);
        }
    }

    pub(super) fn on_register(
        &mut self,
        from: ShardId,
        ticket: u64,
        id: Arc<str>,
        registration: Registration,
    ) {
        self.users_state.registry.insert(id.clone(), registration);
        self.post_control(from, Envelope::Ack { ticket });
        self.registration_arrived(&id);
    }

    /// Opens `/ws/{id}` for a registration this shard holds.
    pub(super) fn open_registered(&mut self, key: ConnKey, request: &Request, id: &str) {
        let Some(registration) = self.users_state.registry.get(id) else {
            let response = error_json(404, "unknown registration id");
            return self.respond(key, response.keep_alive(request.keep_alive()));
        };
        let opening = Opening {
            kind: WsKind::Relay,
            user: Some(registration.user.clone()),
            topics: registration.topics.clone(),
            registration: Some(Arc::from(id)),
            recipient: None,
            stream: None,
            deflate: false,
        };
        self.upgrade_request(key, request, opening);
    }

    /// Parks `/ws/{id}` for an id this node has not heard of, until it
    /// arrives or `REGISTRATION_GRACE` passes.
    pub(super) fn await_registration(&mut self, key: ConnKey, request: Request, id: Arc<str>) {
        let until = self.now + REGISTRATION_GRACE;
        self.users_state
            .awaited
            .entry(id.clone())
            .or_default()
            .push(key);
        let request = Box::new(request);
        self.park(key, Deferred::Registration { request, id, until });
    }

    /// Registration `id` arrived: the upgrades waiting for it go on.
    fn registration_arrived(&mut self, id: &str) {
        let Some(keys) = self.users_state.awaited.remove(id) else {
            return;
        };
        for key in keys {
            let parked = self.take_deferred(key, |d| matches!(d, Deferred::Registration { .. }));
            if let Some(Deferred::Registration { request, id, .. }) = parked {
                self.open_registered(key, &request, &id);
                if self.conns.get(key).is_some_and(|c| c.deferred.is_none()) {
                    self.resume_input(key);
                }
            }
        }
    }

    /// Answers `404` to the upgrades whose registration did not come in
    /// time (and forgets waits of connections that went).
    pub(super) fn expire_registration_waits(&mut self) {
        if self.users_state.awaited.is_empty() {
            return;
        }
        let now = self.now;
        let mut expired = Vec::new();
        for keys in self.users_state.awaited.values_mut() {
            keys.retain(
                |&key| match self.conns.get(key).and_then(|c| c.deferred.as_deref()) {
                    Some(Deferred::Registration { until, .. }) if *until <= now => {
                        expired.push(key);
                        false
                    }
                    Some(Deferred::Registration { .. }) => true,
                    _ => false,
                },
            );
        }
        self.users_state.awaited.retain(|_, keys| !keys.is_empty());
        for key in expired {
            let parked = self.take_deferred(key, |d| matches!(d, Deferred::Registration { .. }));
            if let Some(Deferred::Registration { request, .. }) = parked {
                let response = error_json(404, "unknown registration id");
                self.answer_parked(key, response.keep_alive(request.keep_alive()));
            }
        }
    }

    pub(super) fn on_unregister(&mut self, from: ShardId, ticket: u64, id: &str) {
        if let Some(id) = self.forget_registration(id) {
            self.close_registered(&id);
        }
        self.post_control(from, Envelope::Ack { ticket });
    }

    /// Closes (1000) this shard's connections opened with registration `id`.
    fn close_registered(&mut self, id: &str) {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.identity.as_ref().and_then(|i| i.registration.as_deref()) == Some(id)
            })
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            // An upgrade still parked gets what it would get a moment later.
            if self.conns.get(key).is_some_and(|c| c.upgrade_parked()) {
                let response = error_json(404, "unknown registration id").keep_alive(false);
                self.respond(key, response);
            } else {
                self.close_ws(key, 1000, "registration deleted");
            }
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
        let index = match kind {
            IndexKind::Chat => &self.chatters,
            _ => &self.users,
        };
        let mut delivered = 0;
        let here = self.socket_here();
        let mut encodings = Encodings::new(frame, self.compression.min_bytes, here);
        let topic_name = topic.map(|id| self.topics.entry(id).name.clone());
        for &key in &index.entry(entry).subscribers {
            // A stream subscriber whose replay is still paging has its
            // `subscribed`: a direct message (not in the stream) is owed.
            let holds_topic = match (topic, &topic_name) {
                (Some(topic), Some(name)) => self.conns.get(key).is_some_and(|conn| {
                    conn.subs.iter().any(|s| {
                        s.topic == topic && (s.pos().is_some() || self.replaying(key, name))
                    })
                }),
                _ => true,
            };
            if holds_topic {
                let phase = self.conns.get_mut(key).map(|c| &mut c.phase);
                let outcome = encodings.push(
                    key,
                    phase,
                    &mut self.compression.deflater,
                    &mut self.commands,
                );
                // A Pusher connection is in no user index: nothing here
                // terminates one.
                debug_assert_eq!(outcome, Delivered::Queued);
                delivered += 1;
            }
        }
        delivered
    }

    /// Delivers to `user` here, on every shard that holds the user and, in
    /// a cluster, on the other nodes. Returns how many of this node's
    /// shards took it, and whether the other nodes were reached.
    fn send_to_user(
        &mut self,
        kind: IndexKind,
        user: &str,
        topic: Option<&str>,
        frame: Bytes,
    ) -> (usize, Result<(), LocalOnly>) {
        let mut shards = usize::from(self.deliver_to_user(kind, user, topic, &frame) > 0);
        if let Some(entry) = self.index(kind).lookup(user) {
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
                shards += usize::from(self.forward(to, envelope));
            }
        }
        let nodes = self.send_to_other_nodes(kind, user, topic, frame);
        (shards, nodes)
    }

    /// A text line from a `/chat` connection: `sender: text` to every chat
    /// connection of its recipient.
    pub(super) fn chat_line(&mut self, key: ConnKey, text: &[u8]) {
        let Some(identity) = self.conns.get(key).and_then(|c| c.identity.as_ref()) else {
            return;
        };
        let (Some(sender), Some(recipient)) =
            (identity.user.clone(), identity.chat_recipient.clone())
        else {
            return;
        };
        if !self.accepting_publishes() {
            return self.send(key, frame::text(b"error: server shutting down"));
        }
        let text = String::from_utf8_lossy(text);
        let line =
            frame::text(format!("{sender}: {}", text.trim_end_matches(['\r', '\n'])).as_bytes());
        ShardStats::add(&self.stats().publishes_total, 1);
        if let (_, Err(why)) = self.send_to_user(IndexKind::Chat, &recipient, None, line) {
            self.send(
                key,
                frame::text(format!("error: {}", why.message()).as_bytes()),
            );
        }
    }

    /// `POST /publish` with `user_id`.
    pub(super) fn publish_to_user(
        &mut self,
        user: &str,
        topic: &str,
        frame: Bytes,
    ) -> (usize, Result<(), LocalOnly>) {
        ShardStats::add(&self.stats().publishes_total, 1);
        self.send_to_user(IndexKind::User, user, Some(topic), frame)
    }

    fn new_registration_id(&mut self) -> std::io::Result<String> {
        let mut bytes = [0u8; REGISTRATION_ID_BYTES];
        self.ids.fill(&mut bytes)?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Reads `{"user_id":U,"topics"?:[..]}`.
fn parse_registration(body: &[u8], bounds: Bounds) -> Result<(String, Vec<String>), String> {
    let max_topic_bytes = bounds.topic_bytes;
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let user = value
        .get("user_id")
        .and_then(message::user_id_from_json)
        .ok_or("`user_id` is required: a non-empty string or an integer")?;
    message::check_name(&user, "user_id", bounds.name_bytes).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        topic_bytes: 16,
        name_bytes: 16,
    };

    #[test]
    fn registration_bodies_are_validated() {
        assert_eq!(
            parse_registration(br#"{"user_id":"u1"}"#, B).unwrap(),
            ("u1".into(), vec![])
        );
        assert_eq!(
            parse_registration(br#"{"user_id":42,"topics":["a","a","b"]}"#, B).unwrap(),
            ("42".into(), vec!["a".into(), "b".into()])
        );
        assert!(parse_registration(br#"{"topics":[]}"#, B).is_err());
        assert!(parse_registration(br#"{"user_id":"u","topics":"a"}"#, B).is_err());
        assert!(parse_registration(br#"{"user_id":"u","topics":[""]}"#, B).is_err());
        assert!(parse_registration(b"nope", B).is_err());
        let long = format!(r#"{{"user_id":"{}"}}"#, "u".repeat(17));
        assert_eq!(
            parse_registration(long.as_bytes(), B).unwrap_err(),
            "field `user_id` must be a non-empty string of at most 16 bytes",
            "a user id is kept as long as its registration: bounded"
        );
    }
}
