//! Event streams over plain HTTP: Server-Sent Events (`text/event-stream`,
//! what a browser's `EventSource` reads) and newline-delimited JSON
//! (`application/x-ndjson`, for programs and `curl -N`). Both carry the
//! messages of ringcast's JSON protocol unchanged; only their framing
//! differs from a WebSocket's. Pure code over bytes, like the rest of
//! `protocol`.
//!
//! An SSE event is `event:` (a push's event name, or `ringcast.<type>` for
//! the protocol's own messages: `ringcast.subscribed`, `ringcast.error`,
//! ...), `data:` (the JSON text a WebSocket client gets), and, when the
//! message moved the connection's position in a stream topic, `id:` (the
//! connection's [cursor](write_cursor)). An NDJSON line is the JSON text.
//!
//! The part of a message every subscriber shares ([`encode`]: the `event:`
//! and `data:` lines, or the NDJSON line) is made once per publication;
//! only the `id:` line, which is the connection's own, is written per
//! connection.
//!
//! JSON built by ringcast has no line breaks except as whitespace inside a
//! publisher's payload (a JSON string cannot hold a raw one), so they are
//! written as spaces: the text stays the same JSON value and one line.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use super::message::{write_decimal, Since};

/// Which framing an event stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/event-stream`.
    Sse,
    /// `application/x-ndjson`.
    Ndjson,
}

/// Sent every heartbeat interval, so proxies keep the response open and a
/// peer that went away is found by the failed write: an SSE comment (which
/// `EventSource` ignores), or an NDJSON line of its own type.
pub fn heartbeat(format: Format) -> Bytes {
    match format {
        Format::Sse => Bytes::from_static(b":\n\n"),
        Format::Ndjson => Bytes::from_static(b"{\"type\":\"heartbeat\"}\n"),
    }
}

/// The response head and the stream's first bytes: for SSE the reconnection
/// delay (`retry:`) a client waits before it reconnects. The body is
/// delimited by the connection's end (`Connection: close`), which every
/// HTTP/1.1 client reads as a stream; proxies are asked not to buffer it.
pub fn response_head(format: Format, retry: Duration, extra_headers: &[(&str, &str)]) -> Bytes {
    let content_type = match format {
        Format::Sse => "text/event-stream; charset=utf-8",
        Format::Ndjson => "application/x-ndjson",
    };
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(
        b"\r\nCache-Control: no-cache, no-store\r\nX-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    for (name, value) in extra_headers {
        debug_assert!(!name.contains(['\r', '\n']) && !value.contains(['\r', '\n']));
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if format == Format::Sse {
        out.extend_from_slice(b"retry: ");
        write_decimal(&mut out, retry.as_millis() as u64);
        out.extend_from_slice(b"\n\n");
    }
    Bytes::from(out)
}

/// What the stream formats need of a protocol message, read from its JSON
/// (the rest, the payload above all, is skipped).
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    /// `push`, `subscribed`, `reset`, `error`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The topic it is about.
    #[serde(borrow, default)]
    pub topic: Option<Cow<'a, str>>,
    /// A stream position's offset (a push of a stream topic, `subscribed`).
    #[serde(default)]
    pub offset: Option<u64>,
    /// A stream position's epoch (`subscribed`, `reset`).
    #[serde(borrow, default)]
    pub epoch: Option<Cow<'a, str>>,
    /// A push's event name.
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    /// On `subscribed` with a position asked for: whether it was recovered.
    #[serde(default)]
    pub recovered: Option<bool>,
}

impl Head<'_> {
    /// Reads the head of a message's JSON text; `None` if it is not one.
    pub fn parse(json: &[u8]) -> Option<Head<'_>> {
        serde_json::from_slice(json).ok()
    }
}

/// The part of a message every event-stream subscriber of `format` shares:
/// the SSE `event:` and `data:` lines, without the blank line that ends the
/// event (so a connection's `id:` can follow, see [`END`]), or the NDJSON
/// line.
pub fn encode(format: Format, json: &[u8], head: &Head<'_>) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 64);
    if format == Format::Sse {
        out.extend_from_slice(b"event: ");
        if head.kind == "push" {
            write_line(
                &mut out,
                head.event.as_deref().unwrap_or("message").as_bytes(),
            );
        } else {
            out.extend_from_slice(b"ringcast.");
            write_line(&mut out, head.kind.as_bytes());
        }
        out.extend_from_slice(b"\ndata: ");
    }
    write_line(&mut out, json);
    out.push(b'\n');
    Bytes::from(out)
}

/// Ends an SSE event that carries no `id:`.
pub const END: &[u8] = b"\n";

/// Appends `text` with its line breaks as spaces, so it stays one line.
fn write_line(out: &mut Vec<u8>, text: &[u8]) {
    let start = out.len();
    out.extend_from_slice(text);
    for byte in &mut out[start..] {
        if matches!(byte, b'\r' | b'\n') {
            *byte = b' ';
        }
    }
}

/// A server close frame's code and reason, for the event that says why an
/// event stream ends.
pub fn close_frame_parts(frame: &[u8]) -> Option<(u16, &str)> {
    let [0x88, len, rest @ ..] = frame else {
        return None;
    };
    let body = rest.get(..usize::from(*len)).filter(|_| *len < 126)?;
    match body {
        [] => Some((1005, "")),
        [hi, lo, reason @ ..] => Some((
            u16::from_be_bytes([*hi, *lo]),
            std::str::from_utf8(reason).ok()?,
        )),
        [_] => None,
    }
}

/// `{"type":"close","code":C,"reason":R}` in `format`: the last message of
/// an event stream the server ends (a shutdown, a closed registration).
pub fn close_message(format: Format, code: u16, reason: &str) -> Bytes {
    let mut json = Vec::with_capacity(48 + reason.len());
    json.extend_from_slice(b"{\"type\":\"close\",\"code\":");
    write_decimal(&mut json, u64::from(code));
    json.extend_from_slice(b",\"reason\":");
    super::message::write_json_str(&mut json, reason);
    json.push(b'}');
    let head = Head {
        kind: Cow::Borrowed("close"),
        topic: None,
        offset: None,
        epoch: None,
        event: None,
        recovered: None,
    };
    let mut out = encode(format, &json, &head).to_vec();
    if format == Format::Sse {
        out.extend_from_slice(END);
    }
    Bytes::from(out)
}

// ---- cursors -------------------------------------------------------------

/// The longest epoch a cursor may name (ringcast's are 16 characters).
const MAX_EPOCH_BYTES: usize = 64;

/// A cursor that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// More positions than topics.
    #[error("the cursor names {0} positions for {1} topics")]
    TooMany(usize, usize),
    /// A position that is not `offset.epoch`.
    #[error("position {0} of the cursor is not `offset.epoch`")]
    Malformed(usize),
}

/// Writes a cursor: one entry per topic of the connection, in the order of
/// its `topic` parameters, separated by `,`; an entry is `offset.epoch` for
/// a stream topic whose position is known, and empty otherwise. For one
/// stream topic it is just `12.a1b2c3d4e5f6a7b8`.
pub fn write_cursor<'a>(
    out: &mut Vec<u8>,
    positions: impl Iterator<Item = Option<(u64, &'a str)>>,
) {
    for (i, position) in positions.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if let Some((offset, epoch)) = position {
            debug_assert!(valid_epoch(epoch), "an epoch a cursor cannot carry");
            write_decimal(out, offset);
            out.push(b'.');
            out.extend_from_slice(epoch.as_bytes());
        }
    }
}

/// Reads a cursor written by [`write_cursor`] for a connection with
/// `topics` topics: the position to resume each from, if any. An empty
/// cursor resumes nothing.
pub fn parse_cursor(text: &str, topics: usize) -> Result<Vec<Option<Since>>, CursorError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(vec![None; topics]);
    }
    let count = text.split(',').count();
    if count > topics {
        return Err(CursorError::TooMany(count, topics));
    }
    let mut positions = Vec::with_capacity(topics);
    for (i, entry) in text.split(',').enumerate() {
        if entry.is_empty() {
            positions.push(None);
            continue;
        }
        let (offset, epoch) = entry.split_once('.').ok_or(CursorError::Malformed(i))?;
        let offset = offset
            .parse::<u64>()
            .ok()
            .filter(|_| offset.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(CursorError::Malformed(i))?;
        if !valid_epoch(epoch) {
            return Err(CursorError::Malformed(i));
        }
        positions.push(Some(Since {
            offset,
            epoch: epoch.to_owned(),
        }));
    }
    positions.resize(topics, None);
    Ok(positions)
}

/// An epoch a cursor can carry: short, and nothing a cursor or a header
/// line uses as a separator.
fn valid_epoch(epoch: &str) -> bool {
    epoch.len() <= MAX_EPOCH_BYTES
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{frame, message};

    fn json_of(frame: &Bytes) -> &[u8] {
        message::frame_json(frame).expect("a text frame")
    }

    #[test]
    fn a_push_is_one_sse_event_named_after_it_with_the_websocket_json() {
        let frame = message::push("news", "created", "{\"a\":\n 1}");
        let json = json_of(&frame);
        let head = Head::parse(json).unwrap();
        let body = encode(Format::Sse, json, &head);
        assert_eq!(
            &body[..],
            b"event: created\ndata: {\"type\":\"push\",\"topic\":\"news\",\"event\":\"created\",\"payload\":{\"a\":  1}}\n"
        );
        let line = encode(Format::Ndjson, json, &head);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["payload"]["a"], 1, "still the same JSON");
    }

    #[test]
    fn protocol_messages_are_named_ringcast_dot_type() {
        let frame = message::subscribed_at("s", Some(false), 7, "ep", false);
        let json = json_of(&frame);
        let head = Head::parse(json).unwrap();
        assert_eq!(head.kind, "subscribed");
        assert_eq!((head.offset, head.epoch.as_deref()), (Some(7), Some("ep")));
        assert_eq!(head.recovered, Some(false));
        let body = encode(Format::Sse, json, &head);
        assert!(body.starts_with(b"event: ringcast.subscribed\ndata: {"));
        let error = message::error("no");
        let head = Head::parse(json_of(&error)).unwrap();
        assert!(encode(Format::Sse, json_of(&error), &head).starts_with(b"event: ringcast.error\n"));
    }

    #[test]
    fn close_frames_become_close_messages() {
        let frame = frame::close(1001, "server shutting down");
        assert_eq!(
            close_frame_parts(&frame),
            Some((1001, "server shutting down"))
        );
        assert_eq!(close_frame_parts(b"\x81\x00"), None);
        assert_eq!(close_frame_parts(b"\x88\x05\x03"), None, "short");
        let event = close_message(Format::Sse, 1001, "bye");
        assert_eq!(
            &event[..],
            b"event: ringcast.close\ndata: {\"type\":\"close\",\"code\":1001,\"reason\":\"bye\"}\n\n"
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_what_they_cannot_be() {
        let mut out = Vec::new();
        write_cursor(
            &mut out,
            [None, Some((12, "a1b2")), Some((0, "ff"))].into_iter(),
        );
        assert_eq!(out, b",12.a1b2,0.ff");
        let text = std::str::from_utf8(&out).unwrap();
        let parsed = parse_cursor(text, 3).unwrap();
        assert_eq!(parsed[0], None);
        assert_eq!(
            parsed[1],
            Some(Since {
                offset: 12,
                epoch: "a1b2".into()
            })
        );
        assert_eq!(parse_cursor("", 2).unwrap(), vec![None, None]);
        assert_eq!(parse_cursor("5.e", 3).unwrap().len(), 3, "padded");
        assert_eq!(parse_cursor("1.a,2.b", 1), Err(CursorError::TooMany(2, 1)));
        // A stream nobody has published to may stand at 0 in no epoch.
        assert_eq!(
            parse_cursor("0.", 1).unwrap()[0].as_ref().unwrap().epoch,
            ""
        );
        for bad in [
            "x.e",
            "1",
            ".e",
            "+1.e",
            "1.e f",
            "1.e;f",
            "99999999999999999999999.e",
        ] {
            assert!(parse_cursor(bad, 1).is_err(), "{bad:?}");
        }
        let long = format!("1.{}", "e".repeat(65));
        assert!(parse_cursor(&long, 1).is_err());
    }

    #[test]
    fn the_head_tells_the_stream_and_ends_with_retry() {
        let head = response_head(
            Format::Sse,
            Duration::from_millis(1500),
            &[("Vary", "Origin")],
        );
        let text = std::str::from_utf8(&head).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"));
        assert!(text.contains("\r\nVary: Origin\r\n"));
        assert!(text.ends_with("\r\n\r\nretry: 1500\n\n"));
        let head = response_head(Format::Ndjson, Duration::ZERO, &[]);
        assert!(head.ends_with(b"\r\n\r\n"));
    }
}
