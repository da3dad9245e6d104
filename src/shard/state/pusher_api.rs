//! Pusher's HTTP API on a shard, signed with an app's secret (checked
//! before a body is read): triggering events (`POST /apps/{id}/events`,
//! `/batch_events`, each event's `socket_id` skipped),
//! `POST /apps/{id}/users/{user}/terminate_connections`, and the channel
//! queries (`GET /apps/{id}/channels`, `/channels/{channel}` and its
//! `/users`), parked over the core's member gather.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::bus::{MemberQuery, Members};
use crate::protocol::http::{Request, Response};
use crate::pusher::wire::{self, SocketId};
use crate::pusher::{sign, App};
use crate::shard::key::ConnKey;

use super::channels::PresenceThen;
use super::conn::{Deferred, Reply};
use super::streams::Published;
use super::ShardState;

/// Channels (or, with `user_count`, channel users) one
/// `GET /apps/{id}/channels` lists at most; past it the answer is `413`.
const MAX_CHANNELS_LISTED: usize = 10_000;
/// Channels one `POST /apps/{id}/events` may name (Pusher's limit).
const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Events one `POST /apps/{id}/batch_events` may carry (Pusher's limit).
const MAX_BATCH_EVENTS: usize = 10;

/// What a `GET /apps/{id}/channels/{channel}[/users]` asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelQuery {
    /// `/users`: a presence channel's users.
    users: bool,
    /// `info=user_count` (presence channels only).
    user_count: bool,
    /// `info=subscription_count`.
    subscription_count: bool,
}

/// A `POST /apps/{id}/events` body.
#[derive(Deserialize)]
struct Trigger {
    name: String,
    data: String,
    channels: Option<Vec<String>>,
    channel: Option<String>,
    /// The connection that caused the event, which does not get it.
    socket_id: Option<String>,
    /// What to answer of each channel: `subscription_count`, `user_count`.
    info: Option<String>,
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
    socket_id: Option<String>,
    info: Option<String>,
}

/// A trigger's `info`: each channel's counts, gathered one channel after
/// another (over every shard and node) while the request waits parked,
/// within the limits of one presence query.
pub(crate) struct TriggerInfo {
    app_id: Arc<str>,
    /// A presence channel's users are counted up to its app's limit.
    max_members: usize,
    /// Channels still to count, in the answer's order.
    left: std::collections::VecDeque<InfoItem>,
    /// The channel being counted.
    counting: Option<InfoItem>,
    /// Each counted channel and its counts.
    counted: Vec<(String, serde_json::Value)>,
    /// `batch_events`: one answer per event, in order; else one per
    /// channel, by name.
    batch: bool,
}

/// One channel of a trigger's `info`, and what to count of it.
struct InfoItem {
    channel: String,
    subscription_count: bool,
    /// Only for presence channels.
    user_count: bool,
}

impl InfoItem {
    fn new(channel: &str, info: Option<&str>) -> InfoItem {
        let info = info.unwrap_or_default();
        InfoItem {
            channel: channel.to_string(),
            subscription_count: lists(info, "subscription_count"),
            user_count: lists(info, "user_count") && channel.starts_with("presence-"),
        }
    }

    fn asks(&self) -> bool {
        self.subscription_count || self.user_count
    }
}

impl ShardState {
    /// `POST /apps/{id}/events`: an event for up to 100 channels, signed
    /// with the app's secret. `None`: parked until a cache channel's
    /// stream home has it (see [`ShardState::publish_events`]).
    pub(super) fn pusher_events(
        &mut self,
        key: ConnKey,
        request: &Request,
        app_id: &str,
        cors: Option<&str>,
    ) -> Option<Response> {
        let (app, trigger) = match self.signed_body::<Trigger>(request, app_id) {
            Ok(signed) => signed,
            Err(refusal) => return Some(refusal),
        };
        let channels = match (trigger.channels, trigger.channel) {
            (Some(channels), None) => channels,
            (None, Some(channel)) => vec![channel],
            _ => return Some(pusher_error(400, "Give channels or channel")),
        };
        let mut items: Vec<InfoItem> = Vec::new();
        for channel in &channels {
            if !items.iter().any(|i| i.channel == *channel) {
                items.push(InfoItem::new(channel, trigger.info.as_deref()));
            }
        }
        let event = Event {
            channels,
            name: trigger.name,
            data: trigger.data,
            socket_id: trigger.socket_id,
        };
        let published = self.publish_events(key, request, cors, &app, &[event])?;
        self.trigger_info(key, request, cors, &app, published, items, false)
    }

    /// `POST /apps/{id}/batch_events`: up to 10 events, each for one
    /// channel; all are checked before any is published.
    pub(super) fn pusher_batch_events(
        &mut self,
        key: ConnKey,
        request: &Request,
        app_id: &str,
        cors: Option<&str>,
    ) -> Option<Response> {
        let (app, batch) = match self.signed_body::<Batch>(request, app_id) {
            Ok(signed) => signed,
            Err(refusal) => return Some(refusal),
        };
        if batch.batch.is_empty() || batch.batch.len() > MAX_BATCH_EVENTS {
            let why = format!("1 to {MAX_BATCH_EVENTS} events per batch");
            return Some(pusher_error(400, &why));
        }
        let items = (batch.batch.iter())
            .map(|e| InfoItem::new(&e.channel, e.info.as_deref()))
            .collect();
        let events: Vec<Event> = batch
            .batch
            .into_iter()
            .map(|e| Event {
                channels: vec![e.channel],
                name: e.name,
                data: e.data,
                socket_id: e.socket_id,
            })
            .collect();
        let published = self.publish_events(key, request, cors, &app, &events)?;
        self.trigger_info(key, request, cors, &app, published, items, true)
    }

    /// A trigger was answered `published`: if it was published and asked
    /// for `info`, the request waits parked while each channel is counted
    /// (`None`; a request that may not wait, past the presence queries'
    /// limits, is answered without). The events are published either way.
    #[allow(clippy::too_many_arguments)]
    fn trigger_info(
        &mut self,
        key: ConnKey,
        request: &Request,
        cors: Option<&str>,
        app: &App,
        published: Response,
        items: Vec<InfoItem>,
        batch: bool,
    ) -> Option<Response> {
        if published.status() != 200 || !items.iter().any(InfoItem::asks) {
            return Some(published);
        }
        if self.park_channel_query(key, request, cors).is_err() {
            return Some(published);
        }
        let info = TriggerInfo {
            app_id: Arc::from(app.id.as_str()),
            max_members: app.max_presence_members,
            left: items.into(),
            counting: None,
            counted: Vec::new(),
            batch,
        };
        self.count_trigger_info(key, Box::new(info));
        None
    }

    /// Counts the next channel of a trigger's `info`, or, none left,
    /// answers the parked request.
    fn count_trigger_info(&mut self, key: ConnKey, mut info: Box<TriggerInfo>) {
        while let Some(item) = info.left.pop_front() {
            if !item.asks() {
                info.counted.push((item.channel, serde_json::json!({})));
                continue;
            }
            let presence = item.channel.starts_with("presence-");
            let query = MemberQuery {
                limit: if item.user_count { info.max_members } else { 0 },
                by_user: presence,
                subscribers: !presence,
                ..MemberQuery::default()
            };
            let topic = wire::topic(&info.app_id, &item.channel);
            info.counting = Some(item);
            let then = PresenceThen::PusherTriggerInfo { key, info };
            return self.start_presence(&topic, query, then);
        }
        self.presence_answered(key);
        let parked = self.take_deferred(key, |d| matches!(d, Deferred::Presence { .. }));
        let Some(Deferred::Presence { reply }) = parked else {
            return;
        };
        let counted = info.counted.into_iter();
        let body = if info.batch {
            let batch: Vec<serde_json::Value> = counted.map(|(_, counts)| counts).collect();
            serde_json::json!({ "batch": batch })
        } else {
            let channels: serde_json::Map<String, serde_json::Value> = counted.collect();
            serde_json::json!({ "channels": channels })
        };
        self.answer_parked(key, reply.answer(Response::json(200, body.to_string())));
    }

    /// One channel of a trigger's `info` is counted: the next one is.
    pub(super) fn trigger_info_counted(
        &mut self,
        key: ConnKey,
        mut info: Box<TriggerInfo>,
        members: &Members,
    ) {
        if let Some(item) = info.counting.take() {
            let mut counts = serde_json::json!({});
            if item.subscription_count {
                counts["subscription_count"] = members.count.into();
            }
            if item.user_count {
                counts["user_count"] = members.list.len().into();
            }
            info.counted.push((item.channel, counts));
        }
        self.count_trigger_info(key, info);
    }

    /// Checks every event (`checked_event`), then, only if all hold,
    /// publishes each to each of its channels. A cache
    /// channel is a stream whose home orders it: on one node a shard
    /// (reached through the in-process bus, answered at once), in a
    /// cluster Redis, so there the request is answered when Redis has the
    /// event (`None`: parked), and must name that one channel only.
    fn publish_events(
        &mut self,
        key: ConnKey,
        request: &Request,
        cors: Option<&str>,
        app: &App,
        events: &[Event],
    ) -> Option<Response> {
        if let Some(refusal) = events.iter().find_map(|e| checked_event(app, e).err()) {
            return Some(refusal);
        }
        if !self.accepting_publishes() {
            let why = "server shutting down: publishes are refused";
            return Some(pusher_error(503, why));
        }
        let clustered = self.shared.bus.broker().is_some();
        let channels = || events.iter().flat_map(|e| e.channels.iter());
        let awaited = clustered && channels().any(|c| wire::is_cache(c));
        if awaited && channels().count() > 1 {
            let why = "In a cluster a trigger to a cache channel names only that channel: \
                       it is answered once Redis has the event";
            return Some(pusher_error(400, why));
        }
        for event in events {
            let data = serde_json::to_string(&event.data).expect("a string serialises");
            let payload = wire::payload(&data, event.socket_id.as_deref(), None);
            for channel in &event.channels {
                let topic = wire::topic(&app.id, channel);
                let reply = awaited.then(|| (key, Reply::pusher(request, cors)));
                match self.publish(&topic, &event.name, &payload, reply, None) {
                    Published::Done { .. } => {}
                    Published::Parked => return None,
                    Published::LocalOnly { why, .. } => {
                        return Some(pusher_error(503, why.message()))
                    }
                    Published::Refused(status, why) => return Some(pusher_error(status, &why)),
                }
            }
        }
        Some(Response::json(200, "{}".to_string()))
    }

    /// `POST /apps/{id}/users/{user}/terminate_connections`: every
    /// connection signed in as `user`, on every shard and node, is closed
    /// with Pusher's 4009.
    pub(super) fn pusher_terminate(
        &mut self,
        request: &Request,
        app_id: &str,
        user: &str,
    ) -> Response {
        let (app, _) = match self.signed_body::<serde::de::IgnoredAny>(request, app_id) {
            Ok(signed) => signed,
            Err(refusal) => return refusal,
        };
        let Some(channel) = wire::channel_of_user(user) else {
            return pusher_error(400, &format!("Invalid user id `{user}`"));
        };
        let topic = wire::topic(&app.id, &channel);
        let event = "pusher_internal:terminate";
        match self.publish(&topic, event, wire::TERMINATE, None, None) {
            Published::LocalOnly { why, .. } => pusher_error(503, why.message()),
            Published::Refused(status, why) => pusher_error(status, &why),
            _ => Response::json(200, "{}".to_string()),
        }
    }

    /// The app `app_id` names and the request's JSON body, if the request
    /// is signed with the app's secret (checked before the body is read).
    fn signed_body<T: DeserializeOwned>(
        &self,
        request: &Request,
        app_id: &str,
    ) -> Result<(Arc<App>, T), Response> {
        let app = self.signed_app(request, "POST", app_id)?;
        let body = serde_json::from_slice(&request.body)
            .map_err(|e| pusher_error(400, &format!("Invalid JSON: {e}")))?;
        Ok((app, body))
    }

    /// The app `app_id` names, if the request is signed with its secret.
    fn signed_app(
        &self,
        request: &Request,
        method: &str,
        app_id: &str,
    ) -> Result<Arc<App>, Response> {
        let Some(app) = self.config().apps.iter().find(|a| a.id == app_id) else {
            return Err(pusher_error(404, &format!("Unknown app {app_id}")));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (path, query, body) = (request.path(), request.query(), &request.body);
        sign::check_api_request(app, method, path, query, body, now)
            .map_err(|why| pusher_error(401, &why.to_string()))?;
        Ok(app.clone())
    }

    /// `GET /apps/{id}/channels/{channel}` (`users`: its `/users`): the
    /// channel's counts across the node's shards and, through the broker,
    /// the other nodes, answered once all have counted; the connection is
    /// parked meanwhile, within the limits of a presence query.
    pub(super) fn pusher_channel_query(
        &mut self,
        key: ConnKey,
        request: &Request,
        app_id: &str,
        channel: &str,
        users: bool,
        cors: Option<&str>,
    ) -> Option<Response> {
        let app = match self.signed_app(request, "GET", app_id) {
            Ok(app) => app,
            Err(refusal) => return Some(refusal),
        };
        if !wire::valid_channel(channel) && wire::user_channel(channel).is_none() {
            return Some(pusher_error(
                400,
                &format!("Invalid channel name `{channel}`"),
            ));
        }
        let presence = channel.starts_with("presence-");
        let query = ChannelQuery {
            users,
            user_count: info_asks(request, "user_count"),
            subscription_count: info_asks(request, "subscription_count"),
        };
        if (users || query.user_count) && !presence {
            let why = "user_count and users are only for presence channels";
            return Some(pusher_error(400, why));
        }
        if let Err(refusal) = self.park_channel_query(key, request, cors) {
            return Some(refusal);
        }
        let members = MemberQuery {
            // A presence channel's users are listed whole (an app allows at
            // most 1,000); otherwise only counted.
            limit: if users || query.user_count {
                app.max_presence_members
            } else {
                0
            },
            by_user: presence,
            subscribers: !presence,
            ..MemberQuery::default()
        };
        let topic = wire::topic(&app.id, channel);
        self.start_presence(&topic, members, PresenceThen::PusherChannel { key, query });
        None
    }

    /// `GET /apps/{id}/channels?filter_by_prefix=P&info=user_count`: the
    /// app's channels with subscribers on any shard of any node (with
    /// `user_count`, only for `presence-` prefixes, each one's distinct
    /// users), at most [`MAX_CHANNELS_LISTED`] of them.
    pub(super) fn pusher_channels_query(
        &mut self,
        key: ConnKey,
        request: &Request,
        app_id: &str,
        cors: Option<&str>,
    ) -> Option<Response> {
        let app = match self.signed_app(request, "GET", app_id) {
            Ok(app) => app,
            Err(refusal) => return Some(refusal),
        };
        let filter = request.query_param("filter_by_prefix").unwrap_or_default();
        if filter.len() > wire::MAX_CHANNEL_BYTES {
            return Some(pusher_error(
                400,
                "filter_by_prefix is longer than a channel name",
            ));
        }
        let user_count = info_asks(request, "user_count");
        if user_count && !filter.starts_with("presence-") {
            let why = "user_count is only for filter_by_prefix=presence-";
            return Some(pusher_error(400, why));
        }
        if let Err(refusal) = self.park_channel_query(key, request, cors) {
            return Some(refusal);
        }
        let prefix: Arc<str> = Arc::from(wire::topic(&app.id, &filter));
        let query = MemberQuery {
            limit: MAX_CHANNELS_LISTED + 1,
            by_user: user_count,
            topics_under: Some(prefix.clone()),
            ..MemberQuery::default()
        };
        let then = PresenceThen::PusherChannels {
            key,
            prefix: Arc::from(wire::topic_prefix(&app.id)),
            user_count,
        };
        self.start_presence(&prefix, query, then);
        None
    }

    /// Parks a channel query's connection until every shard has counted,
    /// within the bounds of a presence query (`429`, `503`).
    fn park_channel_query(
        &mut self,
        key: ConnKey,
        request: &Request,
        cors: Option<&str>,
    ) -> Result<(), Response> {
        self.admit_presence(key)
            .map_err(|(status, why)| pusher_error(status, &why))?;
        let reply = Reply::to(request, cors);
        self.park(key, Deferred::Presence { reply });
        Ok(())
    }

    /// A channel list is in: the parked request is answered.
    pub(super) fn pusher_channels_answered(
        &mut self,
        key: ConnKey,
        app_prefix: &str,
        user_count: bool,
        members: &Members,
    ) {
        let parked = self.take_deferred(key, |d| matches!(d, Deferred::Presence { .. }));
        let Some(Deferred::Presence { reply }) = parked else {
            return;
        };
        if members.list.len() > MAX_CHANNELS_LISTED {
            let why = format!(
                "more than {MAX_CHANNELS_LISTED} channels{}: narrow filter_by_prefix",
                if user_count { " and users" } else { "" }
            );
            return self.answer_parked(key, reply.answer(pusher_error(413, &why)));
        }
        // Ids are the topics, or with user_count `topic\0user` in order,
        // so a channel's users are consecutive.
        let mut channels = serde_json::Map::new();
        for (id, _) in &members.list {
            let topic = id.split('\0').next().unwrap_or(id);
            let channel = topic.strip_prefix(app_prefix).unwrap_or(topic);
            if wire::user_channel(channel).is_some() {
                continue; // a signed-in user's, not a channel the app named
            }
            let entry = channels
                .entry(channel)
                .or_insert_with(|| serde_json::json!({}));
            if user_count {
                let users = entry["user_count"].as_u64().unwrap_or(0);
                entry["user_count"] = (users + 1).into();
            }
        }
        let body = serde_json::json!({ "channels": channels });
        self.answer_parked(key, reply.answer(Response::json(200, body.to_string())));
    }

    /// A channel query's counts are in: the parked request is answered.
    pub(super) fn pusher_channel_answered(
        &mut self,
        key: ConnKey,
        query: ChannelQuery,
        members: &Members,
    ) {
        let parked = self.take_deferred(key, |d| matches!(d, Deferred::Presence { .. }));
        let Some(Deferred::Presence { reply }) = parked else {
            return;
        };
        let body = if query.users {
            let users: Vec<serde_json::Value> = members
                .list
                .iter()
                .map(|(user, _)| serde_json::json!({ "id": user }))
                .collect();
            serde_json::json!({ "users": users })
        } else {
            let mut body = serde_json::json!({ "occupied": members.count > 0 });
            if query.user_count {
                body["user_count"] = members.list.len().into();
            }
            if query.subscription_count {
                body["subscription_count"] = members.count.into();
            }
            body
        };
        self.answer_parked(key, reply.answer(Response::json(200, body.to_string())));
    }
}

/// An event to publish: its channels, name and data (a string, as
/// Pusher's libraries send it), and the socket that does not get it.
struct Event {
    channels: Vec<String>,
    name: String,
    data: String,
    socket_id: Option<String>,
}

/// Whether `app` takes the event: 1 to 100 valid channels, a name of 1 to
/// 200 bytes, data within its `max_event_bytes`, a socket id ringcast
/// could have made.
fn checked_event(app: &App, event: &Event) -> Result<(), Response> {
    let channels = &event.channels;
    if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
        let why = format!("1 to {MAX_CHANNELS_PER_EVENT} channels per event");
        return Err(pusher_error(400, &why));
    }
    let valid = |c: &String| wire::valid_channel(c) || wire::user_channel(c).is_some();
    if let Some(bad) = channels.iter().find(|c| !valid(c)) {
        return Err(pusher_error(400, &format!("Invalid channel name `{bad}`")));
    }
    if event.name.is_empty() || event.name.len() > wire::MAX_EVENT_NAME_BYTES {
        let why = format!(
            "Event name must be 1 to {} bytes",
            wire::MAX_EVENT_NAME_BYTES
        );
        return Err(pusher_error(400, &why));
    }
    if event.data.len() > app.max_event_bytes {
        let why = format!("Event data over {} bytes", app.max_event_bytes);
        return Err(pusher_error(413, &why));
    }
    if let Some(socket_id) = &event.socket_id {
        if SocketId::parse(socket_id).is_none() {
            return Err(pusher_error(
                400,
                &format!("Invalid socket id `{socket_id}`"),
            ));
        }
    }
    Ok(())
}

/// Whether the request's `info` (a comma-separated list) asks for `what`.
fn info_asks(request: &Request, what: &str) -> bool {
    lists(&request.query_param("info").unwrap_or_default(), what)
}

/// Whether a comma-separated `info` list (a query's or a trigger's) names `what`.
fn lists(info: &str, what: &str) -> bool {
    info.split(',').any(|i| i.trim() == what)
}

/// Pusher answers its HTTP API's errors with the message as text.
pub(super) fn pusher_error(status: u16, message: &str) -> Response {
    Response::text(status, "text/plain; charset=utf-8", format!("{message}\n"))
}
