//! HTTP routes on a shard: health, metrics, publish, registration, and the
//! upgrades to `/ws`, `/ws/{id}`, `/chat` and `/echo`. Requests arrive parsed;
//! answers are queued in order, so pipelined requests get pipelined responses
//! (a request that waits for other shards holds back the ones behind it).

use crate::metrics;
use crate::protocol::deflate;
use crate::protocol::event_stream::Format;
use crate::protocol::handshake;
use crate::protocol::http::{error_json, Method, Request, Response};
use crate::protocol::message;
use crate::protocol::origin::{preflight, with_cors};

use std::sync::Arc;

use crate::shard::key::ConnKey;

use super::channels::PresenceThen;
use super::cluster::LocalOnly;
use super::conn::{Deferred, Reply, WsKind};
use super::connect::ConnectRoute;
use super::route::Route;
use super::streams::Published;
use super::users::Opening;
use super::ShardState;
use crate::engine::home::publish_accepted;

/// The built-in chat page.
const CHAT_PAGE: &str = include_str!("../../../static/chat.html");

impl ShardState {
    pub(super) fn handle_request(&mut self, key: ConnKey, request: Request) {
        let keep_alive = request.keep_alive();
        let route = Route::parse(request.path());
        let origin = self.config().allowed_origins.check(&request);
        if route.opens_connection() && request.method == Method::Get {
            // A page of another site must not open a connection that
            // carries its visitor's credentials (cross-site hijacking).
            if let Some(refusal) = origin.refusal() {
                return self.respond(key, refusal.keep_alive(keep_alive));
            }
        }
        let cors = origin.cors_origin();
        let response = match route {
            Route::NotFound => error_json(404, "not found"),
            _ if request.method == Method::Options
                && request.header("access-control-request-method").is_some() =>
            {
                preflight(&origin, route.allowed())
            }
            _ if !route.allows(request.method) => {
                error_json(405, "method not allowed").header("Allow", route.allowed())
            }
            _ if route.needs_api_key() && !self.api_key_ok(&request) => {
                unauthorized("missing or invalid API key: send Authorization: Bearer <api_key>")
            }
            Route::Health => self.health(),
            Route::Metrics => {
                let mut text = metrics::render_prometheus(&self.shared.stats);
                if let Some(cluster) = &self.shared.cluster {
                    cluster.render_prometheus(&mut text);
                }
                if let Some(webhooks) = &self.shared.webhooks {
                    webhooks.render_prometheus(&mut text);
                }
                if let Some(proxy) = &self.shared.proxy {
                    proxy.render_prometheus(&mut text);
                }
                let apps = &self.config().apps;
                self.shared
                    .app_connections
                    .render_prometheus(apps, &mut text);
                Response::text(200, "text/plain; version=0.0.4", text)
            }
            Route::Publish => match self.http_publish(key, &request, cors) {
                Some(response) => response,
                None => return,
            },
            Route::Register => match self.register(key, &request) {
                Some(response) => response,
                None => return,
            },
            Route::Ws if request.method == Method::Get && self.connect_needs_backend(&request) => {
                return self.ask_to_connect(key, request, ConnectRoute::Ws, cors);
            }
            Route::Sse if request.method == Method::Get && self.connect_needs_backend(&request) => {
                let route = ConnectRoute::Stream(Format::Sse);
                return self.ask_to_connect(key, request, route, cors);
            }
            Route::Stream
                if request.method == Method::Get && self.connect_needs_backend(&request) =>
            {
                let route = ConnectRoute::Stream(Format::Ndjson);
                return self.ask_to_connect(key, request, route, cors);
            }
            Route::Ws => match self.identify(&request, "user_id") {
                Ok(user) => {
                    let mut opening = Opening::anonymous(WsKind::Relay);
                    opening.user = user;
                    return self.upgrade_request(key, &request, opening);
                }
                Err(response) => response,
            },
            // With JWT auth on, echo needs a token like every other upgrade.
            Route::Echo => match self.identify(&request, "user_id") {
                Ok(_) => {
                    return self.upgrade_request(key, &request, Opening::anonymous(WsKind::Echo))
                }
                Err(response) => response,
            },
            Route::Chat => match self.chat_opening(&request) {
                Ok(opening) => return self.upgrade_request(key, &request, opening),
                Err(response) => response,
            },
            Route::History(ref topic) => match self.checked_topic_request(&request, topic) {
                Err(response) => response,
                Ok(()) => match self.history_request(key, &request, topic, cors) {
                    Some(response) => response,
                    None => return,
                },
            },
            Route::PusherApp(app_key) => return self.pusher_upgrade(key, &request, app_key),
            Route::PusherEvents(app_id) => match self.pusher_events(key, &request, app_id, cors) {
                Some(response) => response,
                None => return,
            },
            Route::PusherBatchEvents(app_id) => {
                match self.pusher_batch_events(key, &request, app_id, cors) {
                    Some(response) => response,
                    None => return,
                }
            }
            Route::PusherTerminate(app_id, user) => self.pusher_terminate(&request, app_id, user),
            Route::PusherTerminateByKey(user) => {
                let key = request.query_param("auth_key").unwrap_or_default();
                let app = self.config().apps.iter().find(|a| *a.key == *key).cloned();
                match app {
                    Some(app) => self.pusher_terminate(&request, &app.id, user),
                    None => super::pusher_api::pusher_error(401, "Unknown auth_key"),
                }
            }
            Route::PusherChannels(app_id) => {
                match self.pusher_channels_query(key, &request, app_id, cors) {
                    Some(response) => response,
                    None => return,
                }
            }
            Route::PusherChannel(app_id, channel) => {
                match self.pusher_channel_query(key, &request, app_id, channel, false, cors) {
                    Some(response) => response,
                    None => return,
                }
            }
            Route::PusherUsers(app_id, channel) => {
                match self.pusher_channel_query(key, &request, app_id, channel, true, cors) {
                    Some(response) => response,
                    None => return,
                }
            }
            Route::Presence(ref topic) => match self.presence_request(key, &request, topic, cors) {
                Some(response) => response,
                None => return,
            },
            Route::Sse => match self.event_stream_request(key, &request, Format::Sse, cors) {
                Some(response) => response,
                None => return,
            },
            Route::Stream => match self.event_stream_request(key, &request, Format::Ndjson, cors) {
                Some(response) => response,
                None => return,
            },
            Route::Index => Response::text(200, "text/html; charset=utf-8", CHAT_PAGE),
            Route::WsRegistered(id) if self.users_state.registry.contains_key(id) => {
                return self.open_registered(key, &request, id);
            }
            Route::WsRegistered(id) if self.shared.cluster.is_some() => {
                let id = Arc::from(id);
                return self.await_registration(key, request, id);
            }
            Route::WsRegistered(_) => error_json(404, "unknown registration id"),
            Route::Registration(id) => match self.unregister(key, id, keep_alive) {
                Some(response) => response,
                None => return,
            },
        };
        let head_only = request.method == Method::Head;
        let response = with_cors(response, cors);
        self.respond(key, response.keep_alive(keep_alive).head_only(head_only));
    }

    /// `GET /health`: always `200` while the node serves; `degraded` when
    /// it serves its own clients but cannot reach the other nodes.
    fn health(&self) -> Response {
        let connections = metrics::total(&self.shared.stats, |s| &s.connections);
        let cluster = self.shared.cluster.as_deref();
        let status = if self.shutdown.begun {
            "shutting_down"
        } else if cluster.is_some_and(|c| !c.is_up()) {
            "degraded"
        } else {
            "ok"
        };
        // Written by hand, keys in the order serde_json's map would give:
        // load balancers poll this, and a `Value` costs a map and a dozen
        // allocations per request, and `write!` goes through `fmt`.
        let mut body = Vec::with_capacity(96);
        body.push(b'{');
        if let Some(cluster) = cluster {
            body.extend_from_slice(b"\"cluster\":{\"node\":");
            message::write_json_str(&mut body, &cluster.node);
            let redis: &[u8] = if cluster.is_up() { b"up" } else { b"down" };
            body.extend_from_slice(b",\"redis\":\"");
            body.extend_from_slice(redis);
            body.extend_from_slice(b"\"},");
        }
        body.extend_from_slice(b"\"connections\":");
        message::write_decimal(&mut body, connections);
        body.extend_from_slice(b",\"shards\":");
        message::write_decimal(&mut body, self.shared.bus.shards() as u64);
        body.extend_from_slice(b",\"status\":\"");
        body.extend_from_slice(status.as_bytes());
        body.extend_from_slice(b"\"}");
        Response::json(200, body)
    }

    /// `POST /publish`; `None` when the answer waits for a stream's home.
    /// `cors`: the allowed origin a parked answer names.
    fn http_publish(
        &mut self,
        key: ConnKey,
        request: &Request,
        cors: Option<&str>,
    ) -> Option<Response> {
        let content_type = request.header("content-type").unwrap_or("application/json");
        if !is_json_media_type(content_type) {
            return Some(error_json(415, "Content-Type must be application/json"));
        }
        let bounds = self.config().limits.name_bounds();
        let publish = match message::parse_publish(&request.body, bounds) {
            Ok(publish) => publish,
            Err(e) => return Some(error_json(400, &e.to_string())),
        };
        if let Some(user) = &publish.user_id {
            if !self.accepting_publishes() {
                return Some(error_json(
                    503,
                    "server shutting down: publishes are refused",
                ));
            }
            let frame = message::push(&publish.topic, &publish.event, publish.payload_json);
            return Some(match self.publish_to_user(user, &publish.topic, frame) {
                (shards, Ok(())) => publish_accepted(shards, None),
                (shards, Err(why)) => local_only(shards, why),
            });
        }
        let reply = (key, Reply::to(request, cors));
        match self.publish(
            &publish.topic,
            &publish.event,
            publish.payload_json,
            Some(reply),
            publish.idempotency_key.as_deref(),
        ) {
            Published::Done { shards, position } => {
                Some(publish_accepted(shards, position.as_ref()))
            }
            Published::Parked => None,
            Published::Refused(status, message) => Some(error_json(status, &message)),
            Published::LocalOnly { shards, why } => Some(local_only(shards, why)),
        }
    }

    /// API key and topic checks shared by `/topics/{topic}/...` requests.
    fn checked_topic_request(&self, request: &Request, topic: &str) -> Result<(), Response> {
        if !self.api_key_ok(request) {
            return Err(unauthorized(
                "missing or invalid API key: send Authorization: Bearer <api_key>",
            ));
        }
        message::check_topic(topic, self.config().limits.max_topic_bytes)
            .map_err(|e| error_json(400, &e.to_string()))
    }

    fn api_key_ok(&self, request: &Request) -> bool {
        self.shared.auth.api_key_ok(request.bearer_token())
    }

    /// The user a `/ws` or `/chat` upgrade speaks for: the token's `sub` when
    /// JWT auth is on (the token from `Authorization: Bearer` or, for browsers,
    /// `?token=`), else the `param` query parameter if given.
    /// A user id longer than `max_name_bytes` is refused (400): it would be
    /// kept on the connection and in the user index for its whole life.
    pub(super) fn identify(
        &self,
        request: &Request,
        param: &str,
    ) -> Result<Option<Arc<str>>, Response> {
        let auth = &self.shared.auth;
        let user = if auth.jwt_enabled() {
            let token = request
                .bearer_token()
                .map(str::to_string)
                .or_else(|| request.query_param("token"));
            match auth.verify_token(token.as_deref().unwrap_or("")) {
                Ok(identity) => Some(identity.user_id),
                Err(e) => return Err(unauthorized(&e.to_string())),
            }
        } else {
            request.query_param(param).filter(|u| !u.is_empty())
        };
        if let Some(user) = &user {
            self.check_name(user, "user_id")?;
        }
        Ok(user.map(Arc::from))
    }

    /// 400 for a user id (or another name) over `max_name_bytes`.
    fn check_name(&self, name: &str, field: &'static str) -> Result<(), Response> {
        let max = self.config().limits.max_name_bytes;
        message::check_name(name, field, max).map_err(|e| error_json(400, &e.to_string()))
    }

    /// `/chat?user_id=A&recipient_id=B`: both required (with JWT auth the
    /// token names A, and a `user_id` that differs is refused).
    fn chat_opening(&self, request: &Request) -> Result<Opening, Response> {
        let user = self.identify(request, "user_id")?;
        if self.shared.auth.jwt_enabled() {
            let claimed = request.query_param("user_id").filter(|u| !u.is_empty());
            if claimed.is_some_and(|c| Some(c.as_str()) != user.as_deref()) {
                return Err(error_json(403, "user_id does not match the token"));
            }
        }
        let recipient = request
            .query_param("recipient_id")
            .filter(|v| !v.is_empty());
        if let Some(recipient) = &recipient {
            self.check_name(recipient, "recipient_id")?;
        }
        match (user, recipient) {
            (Some(user), Some(recipient)) => Ok(Opening {
                kind: WsKind::Chat,
                user: Some(user),
                topics: Arc::from([]),
                registration: None,
                recipient: Some(Arc::from(recipient)),
                stream: None,
                deflate: false,
            }),
            _ => Err(error_json(
                400,
                "/chat needs both user_id and recipient_id query parameters",
            )),
        }
    }

    /// `GET /topics/{topic}/presence`: parks the request while every shard counts.
    fn presence_request(
        &mut self,
        key: ConnKey,
        request: &Request,
        topic: &str,
        cors: Option<&str>,
    ) -> Option<Response> {
        if let Err(response) = self.checked_topic_request(request, topic) {
            return Some(response);
        }
        if !self.presence_tracked(topic) {
            return Some(error_json(
                404,
                &format!("presence is not tracked for topic `{topic}`"),
            ));
        }
        let limit = match request.query_param("limit").map(|l| l.parse::<usize>()) {
            None => None,
            Some(Ok(limit)) => Some(limit),
            Some(Err(_)) => {
                return Some(error_json(400, "`limit` must be a non-negative integer"));
            }
        };
        let after = request.query_param("after");
        if let Some(after) = &after {
            if let Err(response) = self.check_name(after, "after") {
                return Some(response);
            }
        }
        if let Err((status, reason)) = self.admit_presence(key) {
            let response = error_json(status, &reason);
            return Some(match status {
                429 => response.header("Retry-After", "1"),
                _ => response,
            });
        }
        let reply = Reply::to(request, cors);
        self.park(key, Deferred::Presence { reply });
        let query = self.member_query(limit, after.as_deref());
        self.start_presence(topic, query, PresenceThen::Http { key });
        None
    }

    pub(super) fn upgrade_request(&mut self, key: ConnKey, request: &Request, opening: Opening) {
        if !handshake::is_upgrade_request(request) {
            let response = error_json(
                426,
                "this endpoint speaks WebSocket: send an upgrade request",
            )
            .header("Upgrade", "websocket")
            .keep_alive(request.keep_alive());
            return self.respond(key, response);
        }
        // permessage-deflate where the client offers it and the config
        // allows it (on /ws and /echo: /chat lines are short).
        let deflate = match opening.kind {
            WsKind::Relay | WsKind::Echo if self.config().websocket.compression => {
                deflate::negotiate(request.header_tokens("sec-websocket-extensions"))
            }
            _ => None,
        };
        let mut opening = opening;
        opening.deflate = deflate.is_some();
        match handshake::accept_with(request, deflate.map(|agreed| agreed.response())) {
            Ok(switching) => self.open_websocket(key, switching, opening),
            Err(e) => self.respond(key, e.response().keep_alive(request.keep_alive())),
        }
    }
}

/// `503`: delivered on this node's `shards` shards, not on the others.
fn local_only(shards: usize, why: LocalOnly) -> Response {
    let body = serde_json::json!({ "error": why.message(), "delivered_shards": shards });
    Response::json(503, body.to_string())
}

/// 401 with the Bearer challenge.
fn unauthorized(message: &str) -> Response {
    error_json(401, message).header("WWW-Authenticate", "Bearer")
}

/// Whether a `Content-Type` names JSON (`application/json`, any case, with
/// or without parameters), checked in place: every publish asks.
fn is_json_media_type(content_type: &str) -> bool {
    const JSON: &[u8] = b"application/json";
    let media = content_type.trim_start().as_bytes();
    media
        .get(..JSON.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(JSON))
}

#[cfg(test)]
mod tests {
    use super::is_json_media_type;

    #[test]
    fn json_media_types_match_in_any_case_with_parameters() {
        for ok in ["application/json", " Application/JSON; charset=utf-8"] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for refused in ["", "text/plain", "application/js", "xapplication/json"] {
            assert!(!is_json_media_type(refused), "{refused}");
        }
    }
}
