//! HTTP routes on a shard: health, metrics, publish, registration, and the
//! upgrades to `/ws`, `/ws/{id}`, `/chat` and `/echo`. Requests arrive parsed;
//! answers are queued in order, so pipelined requests get pipelined responses
//! (a request that waits for other shards holds back the ones behind it).

use crate::metrics;
use crate::protocol::handshake;
use crate::protocol::http::{error_json, Method, Request, Response};
use crate::protocol::message;

use std::sync::Arc;

use super::conn::WsKind;
use super::users::Opening;
use super::Shard;

/// Paths this server serves, with the methods each allows (for 405's `Allow`).
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/health", "GET, HEAD"),
    ("/metrics", "GET"),
    ("/publish", "POST"),
    ("/register", "POST"),
    ("/ws", "GET"),
    ("/chat", "GET"),
    ("/echo", "GET"),
];

/// Routes with an id after the prefix, with their allowed methods.
const PREFIX_ROUTES: &[(&str, &str)] = &[("/ws/", "GET"), ("/register/", "DELETE")];

/// The built-in chat page.
const CHAT_PAGE: &str = include_str!("../../static/chat.html");

impl Shard {
    pub(super) fn handle_request(&mut self, key: usize, request: Request) {
        let keep_alive = request.keep_alive();
        let path = request.path.as_str();
        let response = match (request.method, path) {
            (Method::Get | Method::Head, "/health") => self.health(),
            (Method::Get, "/metrics") => {
                let text = metrics::render_prometheus(&self.shared.stats);
                Response::text(200, "text/plain; version=0.0.4", text)
            }
            (Method::Post, "/publish") => self.http_publish(&request),
            (Method::Post, "/register") => match self.register(key, &request) {
                Some(response) => response,
                None => return,
            },
            (Method::Get, "/ws") => {
                let mut opening = Opening::anonymous(WsKind::Relay);
                opening.user = request
                    .query_param("user_id")
                    .filter(|u| !u.is_empty())
                    .map(Arc::from);
                return self.upgrade_request(key, &request, opening);
            }
            (Method::Get, "/echo") => {
                return self.upgrade_request(key, &request, Opening::anonymous(WsKind::Echo))
            }
            (Method::Get, "/chat") => match chat_opening(&request) {
                Ok(opening) => return self.upgrade_request(key, &request, opening),
                Err(response) => response,
            },
            (Method::Get, "/") => Response::text(200, "text/html; charset=utf-8", CHAT_PAGE),
            (Method::Get, _) if path.starts_with("/ws/") => {
                let id = &path["/ws/".len()..];
                match self.users_state.registry.get(id) {
                    Some(registration) => {
                        let opening = Opening {
                            kind: WsKind::Relay,
                            user: Some(registration.user.clone()),
                            topics: registration.topics.clone(),
                            registration: Some(Arc::from(id)),
                            recipient: None,
                        };
                        return self.upgrade_request(key, &request, opening);
                    }
                    None => error_json(404, "unknown registration id"),
                }
            }
            (Method::Delete, _) if path.starts_with("/register/") => {
                match self.unregister(key, &path["/register/".len()..], keep_alive) {
                    Some(response) => response,
                    None => return,
                }
            }
            (_, path) => not_routed(path),
        };
        self.respond(key, response.keep_alive(keep_alive));
    }

    fn health(&self) -> Response {
        let connections = metrics::total(&self.shared.stats, |s| &s.connections);
        let body = format!(
            "{{\"status\":\"{}\",\"shards\":{},\"connections\":{connections}}}",
            if self.shutdown_deadline.is_some() {
                "shutting_down"
            } else {
                "ok"
            },
            self.shared.bus.shards(),
        );
        Response::json(200, body)
    }

    fn http_publish(&mut self, request: &Request) -> Response {
        let content_type = request.header("content-type").unwrap_or("application/json");
        if !content_type
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            return error_json(415, "Content-Type must be application/json");
        }
        let max_topic_bytes = self.config().limits.max_topic_bytes;
        let publish = match message::parse_publish(&request.body, max_topic_bytes) {
            Ok(publish) => publish,
            Err(e) => return error_json(400, &e.to_string()),
        };
        let frame = message::push(&publish.topic, &publish.event, &publish.payload_json);
        let shards = match &publish.user_id {
            Some(user) => self.publish_to_user(user, &publish.topic, frame),
            None => self.publish(&publish.topic, frame),
        };
        Response::json(202, format!("{{\"delivered_shards\":{shards}}}"))
    }

    fn upgrade_request(&mut self, key: usize, request: &Request, opening: Opening) {
        if !handshake::is_upgrade_request(request) {
            let response = error_json(
                426,
                "this endpoint speaks WebSocket: send an upgrade request",
            )
            .header("Upgrade", "websocket")
            .keep_alive(request.keep_alive());
            return self.respond(key, response);
        }
        match handshake::accept(request) {
            Ok(switching) => self.open_websocket(key, switching, opening),
            Err(e) => self.respond(key, e.response().keep_alive(request.keep_alive())),
        }
    }
}

/// `/chat?user_id=A&recipient_id=B`: both required.
fn chat_opening(request: &Request) -> Result<Opening, Response> {
    let param = |name: &str| request.query_param(name).filter(|v| !v.is_empty());
    match (param("user_id"), param("recipient_id")) {
        (Some(user), Some(recipient)) => Ok(Opening {
            kind: WsKind::Chat,
            user: Some(Arc::from(user)),
            topics: Arc::from([]),
            registration: None,
            recipient: Some(Arc::from(recipient)),
        }),
        _ => Err(error_json(
            400,
            "/chat needs both user_id and recipient_id query parameters",
        )),
    }
}

/// 405 with `Allow` for a known path and the wrong method, else 404.
fn not_routed(path: &str) -> Response {
    let exact = ROUTES.iter().find(|(p, _)| *p == path);
    let prefixed = PREFIX_ROUTES
        .iter()
        .find(|(p, _)| path.len() > p.len() && path.starts_with(p));
    match exact.or(prefixed) {
        Some((_, allow)) => error_json(405, "method not allowed").header("Allow", *allow),
        None => error_json(404, "not found"),
    }
}
