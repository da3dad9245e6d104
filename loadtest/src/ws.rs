//! Minimal sans-IO WebSocket client pieces (RFC 6455): URL templates, the
//! upgrade request, masked client frames and decoding of server frames from the
//! front of a caller-owned buffer. No runtime, no allocation while decoding.

use anyhow::{bail, Context, Result};

/// Text frame opcode (RFC 6455 section 5.2).
pub(crate) const OP_CONT: u8 = 0x0;
/// Text frame.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame.
pub(crate) const OP_PONG: u8 = 0xA;

/// A parsed `ws://` or `http://` URL (no TLS: loopback benchmarking only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Url {
    /// `host:port` as written (used for `Host:` and for connecting).
    pub(crate) authority: String,
    /// Path and query, starting with `/`.
    pub(crate) path: String,
}

impl Url {
    /// Parses `scheme://host[:port]/path`; the port defaults to 80.
    pub(crate) fn parse(s: &str) -> Result<Url> {
        let rest = s
            .strip_prefix("ws://")
            .or_else(|| s.strip_prefix("http://"))
            .with_context(|| format!("{s}: only ws:// and http:// URLs are supported"))?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if auth.is_empty() {
            bail!("{s}: missing host");
        }
        let authority = if auth.contains(':') {
            auth.to_string()
        } else {
            format!("{auth}:80")
        };
        Ok(Url {
            authority,
            path: path.to_string(),
        })
    }
}

/// Replaces every `{topic}` in `template` with `topic`.
pub(crate) fn fill(template: &str, topic: &str) -> String {
    template.replace("{topic}", topic)
}

/// The HTTP/1.1 upgrade request for `url`, offering permessage-deflate
/// (each message on its own, both ways) when `deflate`.
pub(crate) fn upgrade_request_with(url: &Url, key_seed: u64, deflate: bool) -> Vec<u8> {
    let mut request = upgrade_request(url, key_seed);
    if deflate {
        request.truncate(request.len() - 2);
        request.extend_from_slice(
            b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
              client_no_context_takeover\r\n\r\n",
        );
    }
    request
}

/// The HTTP/1.1 upgrade request for `url`.
pub(crate) fn upgrade_request(url: &Url, key_seed: u64) -> Vec<u8> {
    // The key only needs to be 16 bytes base64-encoded; servers do not check randomness.
    let raw = [key_seed.to_le_bytes(), (!key_seed).to_le_bytes()].concat();
    let key = base64(&raw);
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        url.path, url.authority
    )
    .into_bytes()
}

/// The `GET` of an event stream (SSE) for `url`, resuming from
/// `last_event_id` when given.
pub(crate) fn stream_request(url: &Url, last_event_id: Option<&str>) -> Vec<u8> {
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n{resume}\r\n",
        url.path, url.authority
    )
    .into_bytes()
}

/// Outcome of looking for the end of the upgrade response.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// 101 received; the response used this many bytes (frames may follow).
    Done(usize),
    /// Headers not complete yet.
    Partial,
    /// The server answered with something other than 101 (status line given).
    Refused(String),
}

/// Checks the upgrade response at the front of `buf`.
pub(crate) fn check_upgrade(buf: &[u8]) -> Upgrade {
    check_response(buf, b"HTTP/1.1 101")
}

/// Checks the response head at the front of `buf` for `status` (the
/// status line's start): a `101` upgrade, or an event stream's `200`.
pub(crate) fn check_response(buf: &[u8], status: &[u8]) -> Upgrade {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            return Upgrade::Refused("oversized upgrade response".into());
        }
        return Upgrade::Partial;
    };
    let status_line = buf[..end].split(|&b| b == b'\r').next().unwrap_or_default();
    if status_line.starts_with(status) {
        Upgrade::Done(end + 4)
    } else {
        Upgrade::Refused(String::from_utf8_lossy(status_line).into_owned())
    }
}

/// One server frame located in a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameRef {
    /// FIN bit.
    pub(crate) fin: bool,
    /// RSV1: compressed with permessage-deflate.
    pub(crate) compressed: bool,
    /// Opcode.
    pub(crate) opcode: u8,
    /// Payload start offset in the buffer.
    pub(crate) payload_at: usize,
    /// Payload length.
    pub(crate) payload_len: usize,
}

impl FrameRef {
    /// Offset just past the frame.
    pub(crate) fn end(&self) -> usize {
        self.payload_at + self.payload_len
    }
}

/// Outcome of decoding one server frame from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A whole frame.
    Complete(FrameRef),
    /// More bytes are needed; nothing was consumed.
    Partial,
    /// The server broke the protocol (masked frame, or an absurd length).
    Invalid(&'static str),
}

/// Frames longer than this are treated as a protocol error: a load test never
/// sends them, and a bogus length must not make us buffer gigabytes.
pub(crate) const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Decodes the frame header at the front of `buf`.
pub(crate) fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < 2 {
        return Decoded::Partial;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 != 0 {
        return Decoded::Invalid("masked server frame");
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Decoded::Partial;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Decoded::Partial;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > MAX_FRAME_BYTES as u64 {
        return Decoded::Invalid("frame too large");
    }
    let len = len as usize;
    if buf.len() < at + len {
        return Decoded::Partial;
    }
    Decoded::Complete(FrameRef {
        fin,
        compressed: buf[0] & 0x40 != 0,
        opcode,
        payload_at: at,
        payload_len: len,
    })
}

/// Appends one masked, final client frame.
pub(crate) fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

pub(crate) fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parses_with_and_without_port() {
        let u = Url::parse("ws://127.0.0.1:8091/sub/t1?x=1").unwrap();
        assert_eq!(u.authority, "127.0.0.1:8091");
        assert_eq!(u.path, "/sub/t1?x=1");
        let u = Url::parse("http://localhost").unwrap();
        assert_eq!(u.authority, "localhost:80");
        assert_eq!(u.path, "/");
        assert!(Url::parse("wss://x/").is_err());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn short_and_extended_lengths_decode() {
        assert_eq!(decode(b"\x81"), Decoded::Partial);
        assert_eq!(
            decode(b"\x81\x02hi"),
            Decoded::Complete(FrameRef {
                fin: true,
                compressed: false,
                opcode: OP_TEXT,
                payload_at: 2,
                payload_len: 2
            })
        );
        assert!(matches!(decode(b"\xc1\x01x"), Decoded::Complete(r) if r.compressed));
        assert_eq!(decode(b"\x81\x02h"), Decoded::Partial);
        let mut f = vec![0x82, 126, 0x01, 0x00];
        f.extend(std::iter::repeat(b'a').take(256));
        assert!(
            matches!(decode(&f), Decoded::Complete(r) if r.payload_len == 256 && r.end() == 260)
        );
        assert_eq!(decode(&f[..100]), Decoded::Partial);
        assert_eq!(
            decode(b"\x81\x82abcd"),
            Decoded::Invalid("masked server frame")
        );
    }

    #[test]
    fn masked_frame_unmasks_to_the_payload() {
        let mut out = Vec::new();
        encode_masked(&mut out, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        // RFC 6455 section 5.7 example.
        assert_eq!(out, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    }

    #[test]
    fn upgrade_response_is_recognised() {
        assert_eq!(check_upgrade(b"HTTP/1.1 101 Switching"), Upgrade::Partial);
        assert_eq!(
            check_upgrade(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00"
            ),
            Upgrade::Done(56)
        );
        assert_eq!(
            check_upgrade(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Upgrade::Refused("HTTP/1.1 404 Not Found".into())
        );
    }
}
