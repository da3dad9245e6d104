//! The Pusher protocol (version 7) on a shard: a front-end over the same
//! core as ringcast's own protocol. An app's channel is a core topic under
//! the app's prefix (`pusher::wire::topic`); what the core sends a Pusher
//! connection is translated on its way out (`send`, `Encodings`), so
//! subscriptions, fan-out, limits and the cluster are the core's, once.
//!
//! Built so far: `/app/{key}` (connection established with a socket id,
//! ping and pong, subscribe and unsubscribe on public, private and
//! presence channels, a channel's authorization checked against the socket
//! id; presence in `pusher_presence.rs`), client events on private and
//! presence channels (when the app allows them, never echoed to their
//! sender, 10 a second per connection as Pusher does), `POST
//! /apps/{id}/events` (signed, up to 100 channels, a `socket_id` to skip)
//! and `POST /apps/{id}/batch_events` (up to 10).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use bytes::BytesMut;

use crate::metrics::ShardStats;
use crate::protocol::http::Request;
use crate::protocol::{frame, handshake};
use crate::pusher::wire::{self, Incoming, SocketId};
use crate::pusher::{presence, sign, App};
use crate::shard::key::ConnKey;

use super::conn::WsKind;
use super::pusher_api::pusher_error;
use super::streams::Published;
use super::users::Opening;
use super::CloseMode;
use super::ShardState;

/// Client events one connection may send a second (Pusher's limit).
const MAX_CLIENT_EVENTS_PER_SECOND: u32 = 10;

/// Per-connection Pusher state beside the connections (so a connection
/// that uses none of it pays nothing): the users signed in, and client
/// events in the current second.
#[derive(Default)]
pub(crate) struct PusherConns {
    /// `pusher:signin`: the user each signed-in connection is.
    signed_in: HashMap<ConnKey, Arc<str>>,
    pub(crate) client_events: ClientEventRates,
    /// Connections a fan-out found terminated by their app, closed once the
    /// event that found them is handled.
    pub(crate) terminating: Vec<ConnKey>,
}

impl PusherConns {
    pub(crate) fn forget(&mut self, key: ConnKey) {
        self.signed_in.remove(&key);
        self.client_events.forget(key);
    }

    /// The connections something is kept for.
    pub(crate) fn keys(&self) -> impl Iterator<Item = ConnKey> + '_ {
        let signed_in = self.signed_in.keys().copied();
        signed_in.chain(self.client_events.0.keys().copied())
    }

    pub(crate) fn bytes(&self) -> usize {
        let users: usize = self.signed_in.values().map(|u| u.len() + 48).sum();
        users + self.client_events.bytes()
    }
}

/// Client events per connection in the current second, for the
/// connections that sent any: (second, count).
#[derive(Default)]
pub(crate) struct ClientEventRates(HashMap<ConnKey, (u32, u32)>);

impl ClientEventRates {
    /// Counts one more for `key` in `second`; whether it is within the
    /// limit.
    fn admit(&mut self, key: ConnKey, second: u32) -> bool {
        let (window, count) = self.0.entry(key).or_insert((second, 0));
        if *window != second {
            (*window, *count) = (second, 0);
        }
        *count += 1;
        *count <= MAX_CLIENT_EVENTS_PER_SECOND
    }

    fn forget(&mut self, key: ConnKey) {
        self.0.remove(&key);
    }

    fn bytes(&self) -> usize {
        self.0.len() * 32
    }
}

/// The part of a sign-in's `user_data` the server reads.
#[derive(Deserialize)]
struct SigninUser {
    id: String,
}

impl ShardState {
    /// `GET /app/{key}`: a Pusher client's upgrade; `404` for a key no
    /// app has.
    pub(super) fn pusher_upgrade(&mut self, key: ConnKey, request: &Request, app_key: &str) {
        let Some(index) = self.config().apps.iter().position(|a| a.key == app_key) else {
            let text = format!("App key {app_key} not in this cluster");
            return self.refuse_app_key(key, request, &text);
        };
        let index = u8::try_from(index).expect("the config holds at most 256 apps");
        self.upgrade_request(key, request, Opening::anonymous(WsKind::Pusher(index)));
    }

    /// An upgrade to a key no app has: switched, told Pusher's 4001 and
    /// closed with it, which Pusher's clients take as final (a `404` they
    /// would retry for ever). Nothing is held: the connection never
    /// becomes a WebSocket here, it ends once these bytes are out.
    fn refuse_app_key(&mut self, key: ConnKey, request: &Request, text: &str) {
        let Ok(switching) = handshake::accept(request) else {
            let refusal = pusher_error(404, text).keep_alive(request.keep_alive());
            return self.respond(key, refusal);
        };
        let mut last = BytesMut::from(&switching[..]);
        last.extend_from_slice(&wire::error(Some(4001), text));
        last.extend_from_slice(&frame::close(4001, "App does not exist"));
        self.end(key, Some(last.freeze()), CloseMode::AfterFlush);
    }

    /// The socket id Pusher's signatures cover: the connection's shard and
    /// slot, then this run's random salt and the slot's generation, so no
    /// other connection, here or on another node, has it (an authorization
    /// signed for it is good for this connection only).
    pub(super) fn socket_id(&self, key: ConnKey) -> String {
        let (shard, salt) = self.socket_here();
        let id = SocketId {
            shard,
            slot: key.slot() as u32,
            salt,
            generation: key.generation(),
        };
        id.to_string()
    }

    /// What every socket id of this shard starts with: its id and the
    /// run's salt.
    pub(super) fn socket_here(&self) -> (u32, u32) {
        (self.id.0 as u32, self.shared.socket_salt)
    }

    /// The app of Pusher connection `key`.
    pub(super) fn app_of(&self, key: ConnKey) -> Option<Arc<App>> {
        self.app_index_of(key).map(|(_, app)| app)
    }

    /// The same with the app's index in the config.
    fn app_index_of(&self, key: ConnKey) -> Option<(usize, Arc<App>)> {
        match self.conns.get(key)?.ws_kind()? {
            WsKind::Pusher(index) => {
                let index = usize::from(index);
                Some((index, self.config().apps.get(index)?.clone()))
            }
            _ => None,
        }
    }

    /// The first message of a Pusher connection, after its `101`; or
    /// Pusher's 4004 and a close, past the app's `max_connections` (the
    /// count includes this connection since it became a WebSocket).
    pub(super) fn pusher_opened(&mut self, key: ConnKey) {
        let Some((index, app)) = self.app_index_of(key) else {
            return;
        };
        let open = self.shared.app_connections.count(index);
        if app.max_connections.is_some_and(|max| open > max) {
            ShardStats::add(&self.stats().connections_rejected_total, 1);
            let why = "Over connection quota";
            self.send(key, wire::error(Some(4004), why));
            return self.close_ws(key, 4004, why);
        }
        let socket_id = self.socket_id(key);
        self.send(key, wire::connection_established(&socket_id));
    }

    /// A Pusher client's text message.
    pub(super) fn pusher_text(&mut self, key: ConnKey, text: &[u8]) {
        // The frame decoder has validated UTF-8 for text messages.
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        let Some(app) = self.app_of(key) else {
            debug_assert!(false, "a connection of an app the config does not have");
            return;
        };
        match wire::parse(text) {
            Err(why) => {
                ShardStats::add(&self.stats().ws_errors_total, 1);
                self.send(key, wire::error(None, &why));
            }
            Ok(Incoming::Ping) => self.send(key, wire::pong()),
            Ok(Incoming::Subscribe {
                channel,
                auth,
                channel_data,
            }) => self.pusher_subscribe(key, &app, &channel, auth, channel_data),
            Ok(Incoming::Unsubscribe { channel }) => {
                // A signed-in connection keeps its user's channel: it is
                // how the app terminates it.
                if wire::user_channel(&channel).is_some() {
                    return;
                }
                if let Some(id) = self.subscription(key, &wire::topic(&app.id, &channel)) {
                    self.unsubscribe(key, id);
                }
            }
            Ok(Incoming::Signin { auth, user_data }) => {
                self.pusher_signin(key, &app, &auth, &user_data)
            }
            Ok(Incoming::ClientEvent {
                channel,
                event,
                data,
            }) => self.client_event(key, &app, &channel, &event, data),
            Ok(Incoming::Other) => {}
        }
    }

    /// `pusher:signin`: a user authentication the app's backend signed
    /// for this socket id. The connection is then that user's: it holds
    /// the user's channel (`sendToUser`, `terminate_connections`) from
    /// now on. A bad one is Pusher's 4009 and a close.
    fn pusher_signin(&mut self, key: ConnKey, app: &App, auth: &str, user_data: &str) {
        let socket_id = self.socket_id(key);
        let user = serde_json::from_str::<SigninUser>(user_data)
            .ok()
            .and_then(|u| Some((wire::channel_of_user(&u.id)?, u.id)));
        let signed = sign::user_authenticated(app, &socket_id, user_data, auth);
        let (true, Some((channel, user))) = (signed, user) else {
            ShardStats::add(&self.stats().ws_errors_total, 1);
            let why = "Invalid signin: the signature or the user_data's id does not hold";
            self.send(key, wire::error(Some(4009), why));
            return self.close_ws(key, 4009, "Connection not authorized");
        };
        let topic = wire::topic(&app.id, &channel);
        let previous = self
            .pusher_conns
            .signed_in
            .insert(key, Arc::from(user.as_str()));
        if let Some(previous) = previous.filter(|p| **p != *user) {
            let old = wire::channel_of_user(&previous).map(|c| wire::topic(&app.id, &c));
            if let Some(id) = old.and_then(|old| self.subscription(key, &old)) {
                self.unsubscribe(key, id);
            }
        }
        self.send(key, wire::signin_success(user_data));
        self.subscribe(key, &topic, None);
    }

    /// Closes the Pusher connections their app terminated (a signed-in
    /// user's): Pusher's 4009.
    pub(super) fn close_terminated(&mut self) {
        if self.pusher_conns.terminating.is_empty() {
            return;
        }
        let why = "You got disconnected by the app";
        for key in std::mem::take(&mut self.pusher_conns.terminating) {
            self.send(key, wire::error(Some(4009), why));
            self.close_ws(key, 4009, why);
        }
    }

    fn pusher_subscribe(
        &mut self,
        key: ConnKey,
        app: &App,
        channel: &str,
        auth: Option<String>,
        channel_data: Option<String>,
    ) {
        if let Some(user) = wire::user_channel(channel) {
            // Held only by the connections signed in as that user.
            let signed_in = self.pusher_conns.signed_in.get(&key);
            if signed_in.is_some_and(|u| **u == *user) {
                return self.subscribe(key, &wire::topic(&app.id, channel), None);
            }
            let why = format!("{channel} is only for a connection signed in as {user}");
            return self.send(key, wire::subscription_error(channel, &why));
        }
        if !wire::valid_channel(channel) {
            let why = format!(
                "Invalid channel name: 1 to {} of A-Z, a-z, 0-9 and _-=@,.;",
                wire::MAX_CHANNEL_BYTES
            );
            return self.send(key, wire::error(Some(4009), &why));
        }
        let private = channel.starts_with("private-");
        let presence = channel.starts_with("presence-");
        if private || presence {
            let socket_id = self.socket_id(key);
            let auth = auth.unwrap_or_default();
            let data = channel_data.as_deref().filter(|_| presence);
            if !sign::channel_authorized(app, &socket_id, channel, data, &auth) {
                let why = format!("Invalid signature: auth for {channel} on socket {socket_id}");
                return self.send(key, wire::subscription_error(channel, &why));
            }
        }
        let topic = wire::topic(&app.id, channel);
        if presence {
            let member = presence::member(channel_data.as_deref().unwrap_or_default());
            return match member {
                Ok(member) => self.pusher_presence_subscribe(key, &topic, member.meta),
                Err(why) => self.send(key, wire::subscription_error(channel, &why)),
            };
        }
        self.subscribe(key, &topic, None);
    }

    /// A `client-*` event: relayed to the channel's other subscribers when
    /// the app allows client events, the channel is private or presence,
    /// the sender holds it, and it is within 10 a second.
    fn client_event(&mut self, key: ConnKey, app: &App, channel: &str, event: &str, data: &str) {
        let refusal = if !app.client_events {
            Some("Client events are not enabled for this app".to_string())
        } else if channel.starts_with("private-encrypted-") {
            // Pusher relays no client event on an encrypted channel (the
            // server cannot see what it would relay).
            Some(format!(
                "Client events are not supported on encrypted channels ({channel})"
            ))
        } else if !(channel.starts_with("private-") || channel.starts_with("presence-")) {
            Some(format!(
                "Client events are only for private and presence channels, not {channel}"
            ))
        } else if event.len() > wire::MAX_EVENT_NAME_BYTES {
            Some(format!(
                "Event name over {} bytes",
                wire::MAX_EVENT_NAME_BYTES
            ))
        } else if data.len() > app.max_event_bytes {
            Some(format!("Event data over {} bytes", app.max_event_bytes))
        } else {
            None
        };
        if let Some(why) = refusal {
            return self.send(key, wire::error(None, &why));
        }
        let topic = wire::topic(&app.id, channel);
        let Some(id) = self.subscription(key, &topic) else {
            let why = format!("Client event rejected: not subscribed to {channel}");
            return self.send(key, wire::error(None, &why));
        };
        let second = self.millis().0 / 1000;
        if !self.pusher_conns.client_events.admit(key, second) {
            ShardStats::add(&self.stats().ws_errors_total, 1);
            let why = format!(
                "Client event rejected: only {MAX_CLIENT_EVENTS_PER_SECOND} accepted per second"
            );
            return self.send(key, wire::error(Some(4301), &why));
        }
        if !self.accepting_publishes() {
            return self.send(key, wire::error(Some(4200), "Server shutting down"));
        }
        // On a presence channel the sender's user id goes with it.
        let user = self.member_user(key, id);
        let socket_id = self.socket_id(key);
        let payload = wire::payload(data, Some(&socket_id), user.as_deref());
        match self.publish(&topic, event, &payload, None, None) {
            Published::LocalOnly { why, .. } => self.send(key, wire::error(None, why.message())),
            Published::Refused(_, why) => self.send(key, wire::error(None, &why)),
            Published::Done { .. } | Published::Parked => {}
        }
        self.report_pusher_client_event(&socket_id, user.as_deref(), &topic, event, data);
    }
}
