//! Simulated clients: what each one sent and expects, and the wire codecs a
//! real client needs: HTTP/1.1 requests and RFC 6455 masked frames out,
//! HTTP responses and unmasked server frames in. Parsing is strict, because
//! a server stream that a strict client cannot read is a failure.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use crate::shard::key::ConnKey;

use super::streams::{is_stream_topic, StreamView};

/// A fixed, valid `Sec-WebSocket-Key` (RFC 6455's example).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Opcodes (RFC 6455 5.2).
pub(super) const OP_CONT: u8 = 0x0;
pub(super) const OP_TEXT: u8 = 0x1;
pub(super) const OP_BINARY: u8 = 0x2;
pub(super) const OP_CLOSE: u8 = 0x8;
pub(super) const OP_PING: u8 = 0x9;
pub(super) const OP_PONG: u8 = 0xA;

/// Largest response head the client accepts, in headers.
const MAX_RESPONSE_HEADERS: usize = 16;

/// What a request was, so its response can be judged.
#[derive(Debug, Clone)]
pub(super) enum Req {
    /// A WebSocket upgrade; `registration` for `/ws/{id}` (an index in the
    /// simulation's registrations).
    Upgrade { registration: Option<usize> },
    /// `POST /publish` of the simulation's publish with this index.
    Publish { id: usize },
    /// `POST /register`.
    Register { user: String, topics: Vec<String> },
    /// `DELETE /register/{id}` of this registration index.
    Delete { registration: usize },
    /// `GET /topics/{topic}/presence`; `expect` is the count a probe at
    /// quiescence must get.
    Presence {
        topic: String,
        expect: Option<usize>,
    },
    /// `GET /health`.
    Health,
    /// `GET /topics/{topic}/history`; `probe` at quiescence, when nothing
    /// is published meanwhile.
    History {
        topic: String,
        since: Option<u64>,
        epoch: Option<String>,
        limit: Option<usize>,
        probe: bool,
    },
}

/// A request the client wrote, waiting for its response.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) req: Req,
    /// Offsets of its bytes in the client's output stream.
    pub(super) start: usize,
    pub(super) end: usize,
    /// When its first byte reached the server (the simulation's sequence).
    pub(super) first_fed: Option<u64>,
}

/// One simulated client and its connection.
#[derive(Debug)]
pub(super) struct Client {
    pub(super) shard: usize,
    pub(super) key: ConnKey,
    /// For traces: the first request line.
    pub(super) label: String,
    /// The user it speaks for, if identified (by `?user_id=` or registration).
    pub(super) user: Option<String>,
    /// Reading WebSocket frames (a `101` was read).
    pub(super) ws: bool,
    /// Everything the client wrote; `out[..fed]` has reached the server.
    pub(super) out: Vec<u8>,
    pub(super) fed: usize,
    /// The client half-closes once its output is fed.
    pub(super) eof_requested: bool,
    pub(super) eof_fed: bool,
    /// The client reset the connection.
    pub(super) reset: bool,
    /// The client reads nothing: the kernel takes nothing from its queue.
    pub(super) stalled: bool,
    /// Server bytes not yet parsed.
    pub(super) inbuf: Vec<u8>,
    pub(super) pending: VecDeque<Pending>,
    /// A response said `Connection: close`: nothing may follow it.
    pub(super) close_response: bool,
    /// Topics between `subscribed` and `unsubscribed` in the stream: the
    /// only topics a push may name.
    pub(super) observed: BTreeSet<String>,
    /// Topics held without a break since this sequence number: publishes
    /// fed after it must arrive.
    pub(super) held_since: BTreeMap<String, u64>,
    /// The topics the server holds for this connection once it has read
    /// everything sent so far: the client can know exactly, since the
    /// server applies requests in order and the only refusal is the
    /// subscription limit.
    pub(super) server_subs: BTreeSet<String>,
    /// `unsubscribed` replies the server owes per topic, and those read. A
    /// `subscribed` read while one is owed may answer a request from before
    /// the drop, so it proves nothing.
    pub(super) unsub_owed: BTreeMap<String, usize>,
    pub(super) unsub_read: BTreeMap<String, usize>,
    /// The client is leaving: no new obligations.
    pub(super) leaving: bool,
    /// When the `101` was read.
    pub(super) upgraded_at: Option<u64>,
    /// Publish indexes received as pushes.
    pub(super) received: HashSet<usize>,
    /// What the client knows of each stream topic it asked for.
    pub(super) streams: BTreeMap<String, StreamView>,
    /// Stream positions it resumes from once upgraded (a reconnect).
    pub(super) resume: Vec<(String, Option<(u64, String)>)>,
    /// Its positions were kept for a reconnect already.
    pub(super) positions_kept: bool,
    pub(super) close_received: Option<u16>,
    pub(super) close_sent: bool,
    /// The driver found it over its outbound budget.
    pub(super) overflowed: bool,
    /// ... while the state had not closed it: its close must say 1013.
    pub(super) owed_1013: bool,
    /// The driver released the connection; `true` if it ended after a flush
    /// (everything queued was delivered), `false` if it was cut.
    pub(super) ended: Option<bool>,
}

impl Client {
    pub(super) fn new(shard: usize, key: ConnKey, label: String) -> Client {
        Client {
            shard,
            key,
            label,
            user: None,
            ws: false,
            out: Vec::new(),
            fed: 0,
            eof_requested: false,
            eof_fed: false,
            reset: false,
            stalled: false,
            inbuf: Vec::new(),
            pending: VecDeque::new(),
            close_response: false,
            observed: BTreeSet::new(),
            held_since: BTreeMap::new(),
            server_subs: BTreeSet::new(),
            unsub_owed: BTreeMap::new(),
            unsub_read: BTreeMap::new(),
            leaving: false,
            upgraded_at: None,
            received: HashSet::new(),
            streams: BTreeMap::new(),
            resume: Vec::new(),
            positions_kept: false,
            close_received: None,
            close_sent: false,
            overflowed: false,
            owed_1013: false,
            ended: None,
        }
    }

    /// Writes a request and remembers it.
    pub(super) fn write_request(&mut self, req: Req, bytes: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(bytes);
        self.pending.push_back(Pending {
            req,
            start,
            end: self.out.len(),
            first_fed: None,
        });
    }

    /// The client may still send on its own (not closing, not gone).
    pub(super) fn can_send(&self) -> bool {
        self.ended.is_none()
            && !self.reset
            && !self.eof_requested
            && !self.close_sent
            && self.close_received.is_none()
            && !self.close_response
    }

    /// The client gives up every delivery obligation (it is leaving).
    pub(super) fn drop_all(&mut self) {
        self.held_since.clear();
        self.leaving = true;
    }

    /// The client sends a subscribe for `topic` (from position `since`, for
    /// a stream), with `max` the server's subscription limit.
    pub(super) fn sent_subscribe(&mut self, topic: &str, since: Option<(u64, String)>, max: usize) {
        if !self.server_subs.contains(topic) && self.server_subs.len() < max {
            self.server_subs.insert(topic.to_string());
            if is_stream_topic(topic) {
                self.stream_view(topic).sent_creating(since);
            }
        }
    }

    /// The client sends an unsubscribe for `topic`: always answered.
    pub(super) fn sent_unsubscribe(&mut self, topic: &str) {
        self.held_since.remove(topic);
        self.server_subs.remove(topic);
        *self.unsub_owed.entry(topic.to_string()).or_default() += 1;
        if is_stream_topic(topic) {
            self.stream_view(topic).sent_unsubscribe();
        }
    }

    /// The view of stream topic `topic`, created empty.
    pub(super) fn stream_view(&mut self, topic: &str) -> &mut StreamView {
        if !self.streams.contains_key(topic) {
            self.streams
                .insert(topic.to_string(), StreamView::default());
        }
        self.streams
            .get_mut(topic)
            .expect("inserted above when absent")
    }

    /// Where the client stands in each stream topic it holds: the offset of
    /// the last live push it read (else its `subscribed`'s) and the epoch.
    pub(super) fn stream_positions(&self) -> Vec<(String, (u64, String))> {
        self.streams
            .iter()
            .filter(|(topic, _)| self.observed.contains(*topic))
            .filter_map(|(topic, view)| Some((topic.clone(), view.position()?)))
            .collect()
    }

    /// The client sends `{"topics":[..]}`: past the limit nothing changes;
    /// else held topics not listed are dropped (each answered), listed ones
    /// not held are subscribed.
    pub(super) fn sent_set_topics(
        &mut self,
        topics: &[(String, Option<(u64, String)>)],
        max: usize,
    ) {
        if topics.len() > max {
            return;
        }
        let dropped: Vec<String> = self
            .server_subs
            .iter()
            .filter(|t| !topics.iter().any(|(topic, _)| topic == *t))
            .cloned()
            .collect();
        for topic in dropped {
            self.sent_unsubscribe(&topic);
        }
        for (topic, since) in topics {
            self.sent_subscribe(topic, since.clone(), max);
        }
    }

    /// The client read `subscribed` for `topic` at `seq`: from then on it
    /// holds the topic, unless a drop of it is still unanswered.
    pub(super) fn read_subscribed(&mut self, topic: &str, seq: u64) {
        self.observed.insert(topic.to_string());
        let owed = self.unsub_owed.get(topic).copied().unwrap_or(0);
        let read = self.unsub_read.get(topic).copied().unwrap_or(0);
        if !self.leaving && owed == read && self.server_subs.contains(topic) {
            self.held_since.entry(topic.to_string()).or_insert(seq);
        }
    }

    /// The client read `unsubscribed` for `topic`.
    pub(super) fn read_unsubscribed(&mut self, topic: &str) {
        self.observed.remove(topic);
        *self.unsub_read.entry(topic.to_string()).or_default() += 1;
        if let Some(view) = self.streams.get_mut(topic) {
            view.read_unsubscribed();
        }
    }

    /// Parses the next response or frame from `inbuf`, by the phase.
    pub(super) fn next_inbound(&mut self) -> Result<Option<Inbound>, String> {
        let parsed = if self.ws {
            parse_frame(&self.inbuf)?
        } else {
            parse_response(&self.inbuf)?
        };
        Ok(parsed.map(|(inbound, used)| {
            self.inbuf.drain(..used);
            inbound
        }))
    }
}

/// A WebSocket upgrade request for `path`.
pub(super) fn upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A plain HTTP/1.1 request with an optional JSON body.
pub(super) fn http_request(method: &str, path: &str, body: Option<&str>, close: bool) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: sim\r\n");
    if close {
        head.push_str("Connection: close\r\n");
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    if let Some(body) = body {
        head.push_str(body);
    }
    head.into_bytes()
}

/// A client frame: masked, as RFC 6455 5.3 requires.
pub(super) fn masked_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// A close frame's payload: the code and a short reason.
pub(super) fn close_payload(code: u16) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(b"sim");
    payload
}

/// Something the server sent, whole.
#[derive(Debug)]
pub(super) enum Inbound {
    Response {
        status: u16,
        /// `Connection: close`.
        close: bool,
        body: Vec<u8>,
    },
    Frame {
        opcode: u8,
        payload: Vec<u8>,
    },
}

/// One response from the front of `buf`; `None` if incomplete.
fn parse_response(buf: &[u8]) -> Result<Option<(Inbound, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            let shown = String::from_utf8_lossy(&buf[..buf.len().min(40)]);
            return Err(format!("unparsable HTTP response ({e}): {shown:?}"));
        }
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    let mut close = false;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.to_ascii_lowercase().contains("close");
        }
    }
    let length = match (status, length) {
        (100..=199 | 204, None) => 0,
        (100..=199 | 204, Some(_)) => return Err(format!("{status} with a Content-Length")),
        (_, Some(length)) => length,
        (_, None) => return Err(format!("{status} without a Content-Length")),
    };
    if buf.len() < head + length {
        return Ok(None);
    }
    let body = buf[head..head + length].to_vec();
    Ok(Some((
        Inbound::Response {
            status,
            close,
            body,
        },
        head + length,
    )))
}

/// One server frame from the front of `buf`; `None` if incomplete. Server
/// frames are final and unmasked (this server never fragments).
fn parse_frame(buf: &[u8]) -> Result<Option<(Inbound, usize)>, String> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(format!("server frame with reserved bits: {b0:#04x}"));
    }
    if b0 & 0x80 == 0 {
        return Err("fragmented server frame".into());
    }
    let opcode = b0 & 0x0F;
    if ![OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG].contains(&opcode) {
        return Err(format!("server frame with opcode {opcode:#x}"));
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame (RFC 6455 5.1)".into());
    }
    let (len, header) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(&[hi, lo]) => (usize::from(u16::from_be_bytes([hi, lo])), 4),
            _ => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
            Some(bytes) => (
                usize::try_from(u64::from_be_bytes(bytes)).map_err(|_| "huge frame")?,
                10,
            ),
            None => return Ok(None),
        },
        short => (usize::from(short), 2),
    };
    if opcode >= OP_CLOSE && len > 125 {
        return Err(format!("control frame of {len} bytes"));
    }
    let Some(payload) = buf.get(header..header + len) else {
        return Ok(None);
    };
    if opcode == OP_TEXT && std::str::from_utf8(payload).is_err() {
        return Err("text frame that is not UTF-8".into());
    }
    Ok(Some((
        Inbound::Frame {
            opcode,
            payload: payload.to_vec(),
        },
        header + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame;

    #[test]
    fn server_frames_parse_and_partial_ones_wait() {
        let close = frame::close(1013, "slow");
        for cut in 0..close.len() {
            assert!(parse_frame(&close[..cut]).unwrap().is_none());
        }
        match parse_frame(&close).unwrap() {
            Some((Inbound::Frame { opcode, payload }, used)) => {
                assert_eq!((opcode, used), (OP_CLOSE, close.len()));
                assert_eq!(&payload[..2], &1013u16.to_be_bytes());
            }
            other => panic!("{other:?}"),
        }
        let masked = masked_frame(true, OP_TEXT, b"hi", [1, 2, 3, 4]);
        assert!(parse_frame(&masked).is_err());
    }

    #[test]
    fn responses_need_their_whole_body() {
        let bytes = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}";
        assert!(parse_response(&bytes[..bytes.len() - 1]).unwrap().is_none());
        match parse_response(bytes).unwrap() {
            Some((
                Inbound::Response {
                    status,
                    close,
                    body,
                },
                used,
            )) => {
                assert_eq!((status, close, used), (202, false, bytes.len()));
                assert_eq!(body, b"{}");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_response(b"\x88\x02\x03\xe9").is_err());
    }
}
