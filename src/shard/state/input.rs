//! Input on a connection: new connections, received bytes fed to the
//! connection's protocol (HTTP requests or WebSocket frames), and the switch
//! from one to the other.

use bytes::{Buf, Bytes, BytesMut};

use crate::metrics::ShardStats;
use crate::protocol::deflate::InflateError;
use crate::protocol::frame::{FrameDecoder, FrameError, FrameLimits, Incoming};
use crate::protocol::http::{error_json, HttpLimits, RequestDecoder, CONTINUE};
use crate::protocol::Decoded;
use crate::shard::key::ConnKey;

use crate::protocol::http::Response;

use super::conn::{Closing, Conn, Deferred, Phase, WsConn, WsKind};
use super::{CloseMode, ShardState};

/// Result of feeding input to one connection.
enum Step {
    /// This many bytes were used; call again with the rest.
    Consumed(usize),
    /// More input is needed.
    Partial,
    /// The connection stopped reading (closing).
    Stop,
    /// The connection waits for other shards; keep the input for later.
    Blocked,
}

impl ShardState {
    pub(super) fn http_limits(&self) -> HttpLimits {
        let limits = &self.config().limits;
        HttpLimits {
            max_header_bytes: limits.max_http_header_bytes,
            max_body_bytes: limits.max_http_body_bytes,
            ..HttpLimits::default()
        }
    }

    pub(super) fn on_opened(&mut self, key: ConnKey) {
        let deadline = self.now + self.config().http_idle_timeout;
        let conn = Conn::new(RequestDecoder::new(self.http_limits()), deadline);
        self.conns.insert_at(key, conn);
        if self.conns.len() > self.max_conns {
            ShardStats::add(&self.stats().connections_rejected_total, 1);
            let response = error_json(503, "connection limit reached").keep_alive(false);
            self.respond(key, response);
        }
    }

    /// Feeds received bytes to the connection's protocol, keeping any
    /// incomplete tail for the next receive, and charges what it keeps to
    /// the shard's inbound budget.
    pub(super) fn on_input(&mut self, key: ConnKey, data: &[u8]) {
        self.read_input(key, data);
        self.charge_input(key, !data.is_empty());
    }

    fn read_input(&mut self, key: ConnKey, data: &[u8]) {
        let now = self.millis();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Phase::WebSocket(ws) = &mut conn.phase {
            // Anything from the peer shows it is alive, not only a pong.
            if !data.is_empty() {
                ws.last_seen = now;
                ws.ping_sent = None;
            }
        }
        let mut pending = conn.inbuf.take();
        let from_pending = !pending.is_empty();
        if from_pending {
            pending.extend_from_slice(data);
        }
        let input: &[u8] = if from_pending { &pending } else { data };
        let mut used = 0;
        let mut blocked = false;
        while used < input.len() {
            match self.step(key, &input[used..]) {
                Step::Consumed(n) => used += n,
                Step::Partial => break,
                Step::Blocked => {
                    blocked = true;
                    break;
                }
                Step::Stop => return,
            }
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.inbuf.set(if used == input.len() {
            BytesMut::new()
        } else if from_pending {
            pending.advance(used);
            pending
        } else {
            BytesMut::from(&data[used..])
        });
        if blocked && conn.inbuf.len() > self.max_parked_input() {
            // A client that keeps sending while its request waits for other
            // shards would make the buffer grow without bound.
            ShardStats::add(&self.stats().parked_input_overflows_total, 1);
            self.end(key, None, CloseMode::Now);
        } else if !blocked {
            self.finish_if_input_ended(key);
        }
    }

    /// Most bytes a parked connection may buffer: one largest request or message.
    fn max_parked_input(&self) -> usize {
        let limits = &self.config().limits;
        (limits.max_http_header_bytes + limits.max_http_body_bytes).max(limits.max_message_bytes)
    }

    /// Resumes a parked connection: reads what it sent while it waited.
    pub(super) fn resume_input(&mut self, key: ConnKey) {
        self.on_input(key, &[]);
    }

    /// Parks work on connection `key` until other shards answer; its bytes
    /// count in the shard's parked gauge until it is taken.
    pub(super) fn park(&mut self, key: ConnKey, deferred: Deferred) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        self.parked_bytes += deferred.bytes();
        if let Some(old) = conn.deferred.replace(Box::new(deferred)) {
            debug_assert!(false, "parked twice");
            self.parked_bytes -= old.bytes();
        }
    }

    /// Takes connection `key`'s parked work, if it is still there and
    /// `parked` recognises it.
    pub(super) fn take_deferred(
        &mut self,
        key: ConnKey,
        parked: impl Fn(&Deferred) -> bool,
    ) -> Option<Deferred> {
        let conn = self.conns.get_mut(key)?;
        if !conn.deferred.as_deref().is_some_and(parked) {
            return None;
        }
        let deferred = conn.deferred.take().map(|d| *d)?;
        debug_assert!(
            deferred.bytes() <= self.parked_bytes,
            "unparked more than parked"
        );
        self.parked_bytes -= deferred.bytes();
        Some(deferred)
    }

    /// Sends a parked HTTP response and reads the requests queued behind it.
    pub(super) fn answer_parked(&mut self, key: ConnKey, response: Response) {
        self.respond(key, response);
        self.resume_input(key);
    }

    pub(super) fn on_input_ended(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.input_ended = true;
        match conn.phase {
            // A client may half-close after its last request; answer it first.
            Phase::Http(_) if conn.deferred.is_some() => {}
            Phase::Http(_) => self.end(key, None, CloseMode::AfterFlush),
            Phase::WebSocket(_) | Phase::Stream(_) => self.end(key, None, CloseMode::Now),
        }
    }

    /// After input was read: a half-closed HTTP connection with nothing left
    /// to answer is closed once its responses are sent.
    fn finish_if_input_ended(&mut self, key: ConnKey) {
        if self
            .conns
            .get(key)
            .is_some_and(|c| c.input_ended && c.deferred.is_none())
        {
            self.end(key, None, CloseMode::AfterFlush);
        }
    }

    fn step(&mut self, key: ConnKey, input: &[u8]) -> Step {
        let Some(conn) = self.conns.get_mut(key) else {
            return Step::Stop;
        };
        if conn.closing == Closing::Done {
            return Step::Stop;
        }
        if conn.deferred.is_some() {
            return Step::Blocked;
        }
        match &mut conn.phase {
            Phase::Http(_) if conn.closing != Closing::No => Step::Stop,
            Phase::Http(_) => self.step_http(key, input),
            Phase::WebSocket(_) => self.step_ws(key, input),
            // Nothing is asked after an event stream's request: what its
            // client sends is read and dropped, never held.
            Phase::Stream(_) => Step::Consumed(input.len()),
        }
    }

    fn step_http(&mut self, key: ConnKey, input: &[u8]) -> Step {
        let idle_timeout = self.config().http_idle_timeout;
        let now = self.now;
        let Some(Phase::Http(http)) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
            return Step::Stop;
        };
        match http.decoder.decode(input) {
            Ok((used, Some(request))) => {
                http.continue_sent = false;
                http.deadline = now + idle_timeout;
                ShardStats::add(&self.stats().http_requests_total, 1);
                self.handle_request(key, request);
                Step::Consumed(used)
            }
            Ok((used, None)) => {
                if !http.continue_sent && http.decoder.expects_continue() {
                    http.continue_sent = true;
                    self.send(key, Bytes::from_static(CONTINUE));
                }
                if used > 0 {
                    Step::Consumed(used)
                } else {
                    Step::Partial
                }
            }
            Err(e) => {
                ShardStats::add(&self.stats().http_requests_total, 1);
                self.respond(key, e.response());
                Step::Stop
            }
        }
    }

    fn step_ws(&mut self, key: ConnKey, input: &[u8]) -> Step {
        let Some(Phase::WebSocket(ws)) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
            return Step::Stop;
        };
        let kind = ws.kind;
        match ws.decoder.decode_with(input, ws.deflate) {
            Ok(Decoded::Partial) => Step::Partial,
            Ok(Decoded::Complete(Incoming::Compressed { is_text, payload }, used)) => {
                match self.inflate(is_text, &payload) {
                    Ok(incoming) => self.handle_ws(key, kind, incoming),
                    Err(e) => {
                        ShardStats::add(&self.stats().protocol_closes_total, 1);
                        self.fail_ws(key, e.close_code(), &e.to_string());
                        return Step::Stop;
                    }
                }
                Step::Consumed(used)
            }
            Ok(Decoded::Complete(incoming, used)) => {
                self.handle_ws(key, kind, incoming);
                Step::Consumed(used)
            }
            Err(e) => {
                ShardStats::add(&self.stats().protocol_closes_total, 1);
                // RFC 6455 7.1.7: after failing the connection there is no
                // handshake to wait for; drop it once the close is sent.
                self.fail_ws(key, e.close_code(), &e.to_string());
                Step::Stop
            }
        }
    }

    /// A compressed client message, inflated within the message limit (one
    /// decompressor per shard: every client was asked not to take its
    /// context over), its text checked as UTF-8.
    fn inflate(&mut self, is_text: bool, payload: &[u8]) -> Result<Incoming, FrameError> {
        let max = self.config().limits.max_message_bytes;
        let data = self
            .compression
            .inflater
            .message(payload, max)
            .map_err(|e| match e {
                InflateError::TooBig => FrameError::TooBig,
                InflateError::Invalid => FrameError::Protocol("invalid compressed data"),
            })?;
        if !is_text {
            return Ok(Incoming::Binary(Bytes::from(data)));
        }
        if std::str::from_utf8(&data).is_err() {
            return Err(FrameError::InvalidUtf8);
        }
        Ok(Incoming::Text(Bytes::from(data)))
    }

    /// Switches a connection to WebSocket (its 101 is queued or parked).
    pub(super) fn upgrade(&mut self, key: ConnKey, kind: WsKind, deflate: bool) {
        let limits = &self.config().limits;
        let decoder = FrameDecoder::new(FrameLimits {
            max_frame_bytes: limits.max_message_bytes,
            max_message_bytes: limits.max_message_bytes,
        });
        let last_seen = self.millis();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.phase = Phase::WebSocket(WsConn {
            kind,
            decoder,
            last_seen,
            ping_sent: None,
            deflate,
        });
        ShardStats::add(&self.stats().websockets, 1);
        if let WsKind::Pusher(app) = kind {
            self.pusher_websockets += 1;
            self.shared.app_connections.open(usize::from(app));
        }
        if deflate {
            self.compression.websockets += 1;
            ShardStats::add(&self.stats().websockets_compressed, 1);
        }
    }
}
