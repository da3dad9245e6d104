//! The Pusher protocol (version 7) on a shard: a front-end over the same
//! core as ringcast's own protocol. An app's channel is a core topic under
//! the app's prefix (`pusher::wire::topic`); what the core sends a Pusher
//! connection is translated on its way out (`send`, `Encodings`), so
//! subscriptions, fan-out, limits and the cluster are the core's, once.
//!
//! Built so far: `/app/{key}` (connection established with a socket id,
//! ping and pong, subscribe and unsubscribe on public and private
//! channels, a private channel's authorization checked against the socket
//! id), `POST /apps/{id}/events` (signed, up to 100 channels) and
//! `POST /apps/{id}/batch_events` (up to 10). Presence
//! channels and client events are refused with Pusher's messages until
//! they are built.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::metrics::ShardStats;
use crate::protocol::http::{Request, Response};
use crate::pusher::wire::{self, Incoming};
use crate::pusher::{sign, App};
use crate::shard::key::ConnKey;

use super::conn::WsKind;
use super::streams::Published;
use super::users::Opening;
use super::ShardState;

/// Channels one `POST /apps/{id}/events` may name (Pusher's limit).
const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Events one `POST /apps/{id}/batch_events` may carry (Pusher's limit).
const MAX_BATCH_EVENTS: usize = 10;

/// A `POST /apps/{id}/events` body.
#[derive(Deserialize)]
struct Trigger {
    name: String,
    data: String,
    channels: Option<Vec<String>>,
    channel: Option<String>,
}

/// A `POST /apps/{id}/batch_events` body.
#[derive(Deserialize)]
struct Batch {
    batch: Vec<BatchEvent>,
}

#[derive(Deserialize)]
struct BatchEvent {
    channel: String,
    name: String,
    data: String,
}

impl ShardState {
    /// `GET /app/{key}`: a Pusher client's upgrade; `404` for a key no
    /// app has.
    pub(super) fn pusher_upgrade(&mut self, key: ConnKey, request: &Request, app_key: &str) {
        let Some(index) = self.config().apps.iter().position(|a| a.key == app_key) else {
            let text = format!("App key {app_key} not in this cluster");
            return self.respond(key, pusher_error(404, &text));
        };
        let index = u8::try_from(index).expect("the config holds at most 256 apps");
        self.upgrade_request(key, request, Opening::anonymous(WsKind::Pusher(index)));
    }

    /// The socket id Pusher's signatures cover: the connection's shard and
    /// slot, then this run's random salt and the slot's generation, so no
    /// other connection, here or on another node, has it (an authorization
    /// signed for it is good for this connection only).
    pub(super) fn socket_id(&self, key: ConnKey) -> String {
        let high = (self.id.0 as u64) << 32 | key.slot() as u64;
        let low = u64::from(self.shared.socket_salt) << 32 | u64::from(key.generation());
        format!("{high}.{low}")
    }

    /// The first message of a Pusher connection, after its `101`.
    pub(super) fn pusher_opened(&mut self, key: ConnKey) {
        let socket_id = self.socket_id(key);
        self.send(key, wire::connection_established(&socket_id));
    }

    /// A Pusher client's text message.
    pub(super) fn pusher_text(&mut self, key: ConnKey, app: u8, text: &[u8]) {
        // The frame decoder has validated UTF-8 for text messages.
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        let Some(app) = self.config().apps.get(usize::from(app)).cloned() else {
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
                if let Some(id) = self.subscription(key, &wire::topic(&app.id, &channel)) {
                    self.unsubscribe(key, id);
                }
            }
            Ok(Incoming::ClientEvent { channel, .. }) => {
                let why = format!("client events are not supported yet (on {channel})");
                self.send(key, wire::error(None, &why));
            }
            Ok(Incoming::Other) => {}
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
        if !wire::valid_channel(channel) {
            let why = format!(
                "Invalid channel name: 1 to {} of A-Z, a-z, 0-9 and _-=@,.;",
                wire::MAX_CHANNEL_BYTES
            );
            return self.send(key, wire::error(Some(4009), &why));
        }
        if channel.starts_with("presence-") {
            let why = "presence channels are not supported yet";
            return self.send(key, wire::subscription_error(channel, why));
        }
        if channel.starts_with("private-") {
            let socket_id = self.socket_id(key);
            let auth = auth.unwrap_or_default();
            if !sign::channel_authorized(app, &socket_id, channel, channel_data.as_deref(), &auth) {
                let why = format!("Invalid signature: auth for {channel} on socket {socket_id}");
                return self.send(key, wire::subscription_error(channel, &why));
            }
        }
        self.subscribe(key, &wire::topic(&app.id, channel), None);
    }

    /// `POST /apps/{id}/events`: an event for up to 100 channels, signed
    /// with the app's secret.
    pub(super) fn pusher_events(&mut self, request: &Request, app_id: &str) -> Response {
        let app = match self.signed_app(request, app_id) {
            Ok(app) => app,
            Err(refusal) => return refusal,
        };
        let trigger: Trigger = match serde_json::from_slice(&request.body) {
            Ok(trigger) => trigger,
            Err(e) => return pusher_error(400, &format!("Invalid JSON: {e}")),
        };
        let channels = match (trigger.channels, trigger.channel) {
            (Some(channels), None) => channels,
            (None, Some(channel)) => vec![channel],
            _ => return pusher_error(400, "Give channels or channel"),
        };
        let event = (channels, trigger.name, trigger.data);
        if let Err(refusal) = checked_event(&app, &event) {
            return refusal;
        }
        match self.publish_event(&app, &event) {
            Ok(()) => Response::json(200, "{}".to_string()),
            Err(refusal) => refusal,
        }
    }

    /// `POST /apps/{id}/batch_events`: up to 10 events, each for one
    /// channel; all are checked before any is published.
    pub(super) fn pusher_batch_events(&mut self, request: &Request, app_id: &str) -> Response {
        let app = match self.signed_app(request, app_id) {
            Ok(app) => app,
            Err(refusal) => return refusal,
        };
        let batch: Batch = match serde_json::from_slice(&request.body) {
            Ok(batch) => batch,
            Err(e) => return pusher_error(400, &format!("Invalid JSON: {e}")),
        };
        if batch.batch.is_empty() || batch.batch.len() > MAX_BATCH_EVENTS {
            let why = format!("1 to {MAX_BATCH_EVENTS} events per batch");
            return pusher_error(400, &why);
        }
        let events: Vec<Event> = batch
            .batch
            .into_iter()
            .map(|e| (vec![e.channel], e.name, e.data))
            .collect();
        if let Some(refusal) = events.iter().find_map(|e| checked_event(&app, e).err()) {
            return refusal;
        }
        for event in &events {
            if let Err(refusal) = self.publish_event(&app, event) {
                return refusal;
            }
        }
        Response::json(200, "{}".to_string())
    }

    /// The app `app_id` names, if `request` is signed with its secret.
    fn signed_app(&self, request: &Request, app_id: &str) -> Result<App, Response> {
        let Some(app) = self.config().apps.iter().find(|a| a.id == app_id) else {
            return Err(pusher_error(404, &format!("Unknown app {app_id}")));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (path, query, body) = (&request.path, &request.query, &request.body);
        sign::check_api_request(app, "POST", path, query, body, now)
            .map_err(|why| pusher_error(401, &why.to_string()))?;
        Ok(app.clone())
    }

    /// Publishes a checked event to each of its channels.
    fn publish_event(&mut self, app: &App, (channels, name, data): &Event) -> Result<(), Response> {
        let payload = serde_json::to_string(data).expect("a string serialises");
        for channel in channels {
            let topic = wire::topic(&app.id, channel);
            // An app's topics are plain (its channel resolves to no
            // history), so a publish is decided here, never parked.
            match self.publish(&topic, name, &payload, None, None) {
                Published::Done { .. } => {}
                Published::LocalOnly { why, .. } => return Err(pusher_error(503, why.message())),
                Published::Refused(status, why) => return Err(pusher_error(status, &why)),
                Published::Parked => debug_assert!(false, "an app's channel is never a stream"),
            }
        }
        Ok(())
    }
}

/// An event to publish: its channels, name and data (a string, as
/// Pusher's libraries send it).
type Event = (Vec<String>, String, String);

/// Whether `app` takes the event: 1 to 100 valid channels, a name of 1 to
/// 200 bytes, data within its `max_event_bytes`.
fn checked_event(app: &App, (channels, name, data): &Event) -> Result<(), Response> {
    if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
        let why = format!("1 to {MAX_CHANNELS_PER_EVENT} channels per event");
        return Err(pusher_error(400, &why));
    }
    if let Some(bad) = channels.iter().find(|c| !wire::valid_channel(c)) {
        return Err(pusher_error(400, &format!("Invalid channel name `{bad}`")));
    }
    if name.is_empty() || name.len() > wire::MAX_EVENT_NAME_BYTES {
        let why = format!(
            "Event name must be 1 to {} bytes",
            wire::MAX_EVENT_NAME_BYTES
        );
        return Err(pusher_error(400, &why));
    }
    if data.len() > app.max_event_bytes {
        let why = format!("Event data over {} bytes", app.max_event_bytes);
        return Err(pusher_error(413, &why));
    }
    Ok(())
}

/// Pusher answers its HTTP API's errors with the message as text.
fn pusher_error(status: u16, message: &str) -> Response {
    Response::text(status, "text/plain; charset=utf-8", format!("{message}\n"))
}
