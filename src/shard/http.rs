//! HTTP routes on a shard: health, metrics, publish, and the upgrades to
//! `/ws` and `/echo`. Requests arrive parsed; answers are queued in order, so
//! pipelined requests get pipelined responses.

use crate::metrics;
use crate::protocol::handshake;
use crate::protocol::http::{error_json, Method, Request, Response};
use crate::protocol::message;

use super::conn::WsKind;
use super::Shard;

/// Paths this server serves, with the methods each allows (for 405's `Allow`).
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/health", "GET, HEAD"),
    ("/metrics", "GET"),
    ("/publish", "POST"),
    ("/ws", "GET"),
    ("/echo", "GET"),
];

/// The built-in chat page.
const CHAT_PAGE: &str = include_str!("../../static/chat.html");

impl Shard {
    pub(super) fn handle_request(&mut self, key: usize, request: Request) {
        let keep_alive = request.keep_alive();
        let response = match (request.method, request.path.as_str()) {
            (Method::Get | Method::Head, "/health") => self.health(),
            (Method::Get, "/metrics") => {
                let text = metrics::render_prometheus(&self.shared.stats);
                Response::text(200, "text/plain; version=0.0.4", text)
            }
            (Method::Post, "/publish") => self.http_publish(&request),
            (Method::Get, "/ws") => return self.upgrade_request(key, &request, WsKind::Relay),
            (Method::Get, "/echo") => return self.upgrade_request(key, &request, WsKind::Echo),
            (Method::Get, "/") => Response::text(200, "text/html; charset=utf-8", CHAT_PAGE),
            (_, path) => match ROUTES.iter().find(|(p, _)| *p == path) {
                Some((_, allow)) => error_json(405, "method not allowed").header("Allow", *allow),
                None => error_json(404, "not found"),
            },
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
        let shards = self.publish(&publish.topic, frame);
        Response::json(202, format!("{{\"delivered_shards\":{shards}}}"))
    }

    fn upgrade_request(&mut self, key: usize, request: &Request, kind: WsKind) {
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
            Ok(switching) => {
                self.conns[key]
                    .out
                    .enqueue_final(switching, &mut self.send_buffers);
                self.mark_dirty(key);
                self.upgrade(key, kind);
            }
            Err(e) => self.respond(key, e.response().keep_alive(request.keep_alive())),
        }
    }
}
