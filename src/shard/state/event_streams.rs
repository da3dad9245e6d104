//! Event streams on a shard: `GET /sse` (Server-Sent Events) and
//! `GET /stream` (NDJSON). A front-end over the relay's core: an event
//! stream is a connection that subscribes through the same `subscribe` as
//! a `/ws` client (rules, auth, presence, limits, streams and their
//! recovery all apply unchanged), and the messages the core sends it are
//! translated into its framing on the way out (`protocol::event_stream`).
//!
//! Its topics come from the request (`?topic=a&topic=b`); a stream topic
//! resumes from the request's cursor (`Last-Event-ID`, `?last_event_id=`,
//! or `?since=` for NDJSON), so a browser's `EventSource` that lost its
//! connection gets what it missed, once, on any node. A position that is
//! gone is said in-band: `ringcast.subscribed` with `"recovered":false`.
//!
//! In a fan-out, the part of an event every subscriber shares is made once
//! per publication and format (`encodings`); an SSE event of a stream
//! topic adds the connection's own `id:` line after it.

use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::ShardStats;
use crate::protocol::event_stream::{
    self, close_frame_parts, close_message, encode, heartbeat, parse_cursor, Format, Head,
};
use crate::protocol::http::{error_json, Request, Response};
use crate::protocol::message::{self, Since};
use crate::shard::key::ConnKey;

use super::conn::{Closing, Phase, StreamConn, StreamTopic, WsKind};
use super::users::Opening;
use super::{Command, ShardState};

/// The shard's event streams: how many are open (so a fan-out checks
/// formats only when one is), and when they last had a heartbeat.
#[derive(Debug)]
pub(crate) struct EventStreams {
    pub(crate) open: usize,
    pub(crate) last_heartbeat: std::time::Instant,
}

impl ShardState {
    /// `GET /sse` or `GET /stream`: refused with a status before anything
    /// is streamed (a bad topic, cursor or token: a browser does not
    /// retry those), else opened like an identified WebSocket: the `200`
    /// goes out once the user index has room for it, then its topics are
    /// subscribed.
    pub(super) fn event_stream_request(
        &mut self,
        key: ConnKey,
        request: &Request,
        format: Format,
        cors: Option<&str>,
    ) -> Option<Response> {
        match self.identify(request, "user_id") {
            Ok(user) => self.event_stream_request_as(key, request, format, cors, user),
            Err(response) => Some(response),
        }
    }

    /// The same for a request whose user is known (`None`: anonymous).
    pub(super) fn event_stream_request_as(
        &mut self,
        key: ConnKey,
        request: &Request,
        format: Format,
        cors: Option<&str>,
        user: Option<Arc<str>>,
    ) -> Option<Response> {
        let limits = &self.config().limits;
        let (max_topic, max_subs) = (
            limits.max_topic_bytes,
            limits.max_subscriptions_per_connection,
        );
        let mut topics: Vec<Arc<str>> = Vec::new();
        for topic in request.query_params("topic") {
            if let Err(e) = message::check_topic(&topic, max_topic) {
                return Some(error_json(400, &e.to_string()));
            }
            if topics.iter().any(|t| **t == *topic) {
                continue;
            }
            if topics.len() == max_subs {
                let reason = format!("subscription limit of {max_subs} reached: too many topics");
                return Some(error_json(400, &reason));
            }
            topics.push(Arc::from(topic));
        }
        if topics.is_empty() {
            return Some(error_json(400, "name at least one topic: ?topic=a&topic=b"));
        }
        if let Some(topic) = topics.iter().find(|t| self.channel_for(t).is_none()) {
            return Some(error_json(403, &format!("no rule allows topic `{topic}`")));
        }
        let cursor = match format {
            Format::Sse => request
                .header("last-event-id")
                .map(str::to_owned)
                .or_else(|| request.query_param("last_event_id")),
            Format::Ndjson => request.query_param("since"),
        };
        let positions = match parse_cursor(cursor.as_deref().unwrap_or(""), topics.len()) {
            Ok(positions) => positions,
            Err(e) => return Some(error_json(400, &e.to_string())),
        };
        let topics = topics
            .into_iter()
            .zip(positions)
            .map(|(name, since)| StreamTopic {
                name,
                at: since.map(|s| (s.offset, Arc::from(s.epoch))),
            })
            .collect();
        let cors_headers = match cors {
            Some(origin) => vec![
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Vary", "Origin"),
            ],
            None => Vec::new(),
        };
        let retry = self.config().stream_retry;
        let head = event_stream::response_head(format, retry, &cors_headers);
        let opening = Opening {
            kind: WsKind::Relay,
            user,
            topics: Arc::from([]),
            registration: None,
            recipient: None,
            stream: Some(Box::new(StreamConn { format, topics })),
            deflate: false,
        };
        self.open_websocket(key, head, opening);
        None
    }

    /// Switches a connection to an event stream (its `200` is queued or
    /// parked).
    pub(super) fn start_event_stream(&mut self, key: ConnKey, stream: Box<StreamConn>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.phase = Phase::Stream(stream);
        self.event_streams.open += 1;
        ShardStats::add(&self.stats().event_streams, 1);
    }

    /// Subscribes an event stream's topics, each stream topic from the
    /// position its cursor gave.
    pub(super) fn subscribe_event_stream(&mut self, key: ConnKey) {
        let Some(Phase::Stream(stream)) = self.conns.get(key).map(|c| &c.phase) else {
            return;
        };
        let wanted: Vec<(Arc<str>, Option<Since>)> = stream
            .topics
            .iter()
            .map(|t| {
                let since = t.at.as_ref().map(|(offset, epoch)| Since {
                    offset: *offset,
                    epoch: epoch.to_string(),
                });
                (t.name.clone(), since)
            })
            .collect();
        for (topic, since) in wanted {
            self.subscribe(key, &topic, since);
        }
    }

    /// An event stream closed: one fewer to look for.
    pub(super) fn event_stream_closed(&mut self) {
        debug_assert!(self.event_streams.open > 0, "an event stream closed twice");
        self.event_streams.open -= 1;
        ShardStats::sub(&self.stats().event_streams, 1);
    }

    /// Sends each open event stream its heartbeat, every `stream_heartbeat`.
    pub(super) fn heartbeat_event_streams(&mut self) {
        let interval = self.config().stream_heartbeat;
        if self.event_streams.open == 0
            || interval.is_zero()
            || self
                .now
                .saturating_duration_since(self.event_streams.last_heartbeat)
                < interval
        {
            return;
        }
        self.event_streams.last_heartbeat = self.now;
        for (key, conn) in self.conns.iter() {
            if let Phase::Stream(stream) = &conn.phase {
                if conn.closing == Closing::No && !conn.upgrade_parked() {
                    self.commands
                        .push(Command::Send(key, heartbeat(stream.format)));
                }
            }
        }
    }
}

/// What an event stream is sent for `bytes` the core queued for it: a
/// protocol message in the stream's framing (moving its cursor), or, for
/// what is not a message (its response head, or an HTTP refusal while it
/// is parked), the bytes as they are. `None`: nothing (a ping).
pub(super) fn translate(stream: &mut StreamConn, bytes: Bytes) -> Option<Bytes> {
    let Some(json) = message::frame_json(&bytes) else {
        let is_frame = bytes.first().is_some_and(|&b| b & 0x80 != 0);
        return (!is_frame).then_some(bytes);
    };
    let Some(head) = Head::parse(json) else {
        debug_assert!(false, "a message that is not JSON");
        return None;
    };
    let body = encode(stream.format, json, &head);
    if stream.format == Format::Ndjson {
        return Some(body);
    }
    let tail = if stream.advance(&head) {
        stream.id_line()
    } else {
        event_stream::END.to_vec()
    };
    let mut out = Vec::with_capacity(body.len() + tail.len());
    out.extend_from_slice(&body);
    out.extend_from_slice(&tail);
    Some(Bytes::from(out))
}

/// The last bytes of an event stream the core ends with a WebSocket close
/// frame: a `close` message with its code and reason.
pub(super) fn last_message(stream: &StreamConn, last: Option<Bytes>) -> Option<Bytes> {
    let (code, reason) = close_frame_parts(last.as_deref()?)?;
    Some(close_message(stream.format, code, reason))
}
