//! The few bytes the floor server must read and write, sans-IO: the
//! WebSocket upgrade, a client's masked frames, `POST /publish` requests in
//! ringcast's shape, and the push frame every subscriber of a topic gets.
//! Only what `ringcast-load` sends is understood; anything else ends the
//! connection (an instrument, not a server).

use ring::digest;

/// The GUID RFC 6455 appends to a client's key before hashing it.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// ringcast's answer to a publish, byte for byte, so the publisher's parser
/// and the bytes on the wire are the same as with ringcast.
pub(crate) const ACCEPTED: &[u8] =
    b"HTTP/1.1 202 Accepted\r\nContent-Length: 22\r\n\r\n{\"delivered_shards\":1}";

/// The answer to any other complete request (`GET /health`, ...).
pub(crate) const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// What the front of a connection's input holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request<'a> {
    /// Not a whole request yet.
    Partial,
    /// A WebSocket upgrade with this key; `used` bytes.
    Upgrade { key: &'a [u8], used: usize },
    /// `POST /publish` of `{"topic":T,"message":M}`: T and M as they were
    /// written (JSON string contents, escapes kept). Without a string
    /// `message` (a body with ringcast's `event` and `payload` instead, as
    /// `loadtest/http.sh` posts) the push carries `null`.
    Publish {
        topic: &'a [u8],
        message: Option<&'a [u8]>,
        used: usize,
    },
    /// Any other whole request, answered `200 ok`.
    Other { used: usize },
    /// Not HTTP this floor can read.
    Bad,
}

/// Reads the request at the front of `buf`.
pub(crate) fn request(buf: &[u8]) -> Request<'_> {
    let Some(head_end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > 16 * 1024 {
            Request::Bad
        } else {
            Request::Partial
        };
    };
    let head = &buf[..head_end];
    let body_at = head_end + 4;
    let mut length = 0usize;
    let mut key = None;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) if n <= 1 << 20 => length = n,
                _ => return Request::Bad,
            }
        } else if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            key = Some(value);
        }
    }
    if buf.len() - body_at < length {
        return Request::Partial;
    }
    let used = body_at + length;
    if let Some(key) = key {
        return Request::Upgrade { key, used };
    }
    if !head.starts_with(b"POST /publish ") {
        return Request::Other { used };
    }
    let body = &buf[body_at..used];
    match string_field(body, b"topic") {
        Some(topic) => Request::Publish {
            topic,
            message: string_field(body, b"message"),
            used,
        },
        None => Request::Bad,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// The contents of the JSON string field `"name":"..."` of a flat object
/// (escapes kept as written), or `None`.
fn string_field<'a>(body: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut pattern = Vec::with_capacity(name.len() + 4);
    pattern.push(b'"');
    pattern.extend_from_slice(name);
    pattern.extend_from_slice(b"\":\"");
    let start = memchr::memmem::find(body, &pattern)? + pattern.len();
    let mut i = start;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(&body[start..i]),
            _ => i += 1,
        }
    }
    None
}

/// The `101 Switching Protocols` answer to `key`.
pub(crate) fn upgrade_response(key: &[u8]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(WS_GUID);
    let accept = crate::ws::base64(ctx.finish().as_ref());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A client frame at the front of a connection's input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Not a whole frame yet.
    Partial,
    /// A whole frame: its opcode, its unmasked payload, and `used` bytes.
    Whole {
        opcode: u8,
        payload: Vec<u8>,
        used: usize,
    },
    /// A frame longer than this floor reads, or unmasked.
    Bad,
}

/// Reads (and unmasks) the client frame at the front of `buf`.
pub(crate) fn frame(buf: &[u8]) -> Frame {
    if buf.len() < 2 {
        return Frame::Partial;
    }
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 == 0 {
        return Frame::Bad;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        126 => return Frame::Partial,
        127 => return Frame::Bad,
        n => (usize::from(n), 2),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Frame::Partial;
    };
    let Some(data) = buf.get(at + 4..at + 4 + len) else {
        return Frame::Partial;
    };
    let payload = data
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Frame::Whole {
        opcode,
        payload,
        used: at + 4 + len,
    }
}

/// The topic of a `{"type":"subscribe","topic":T}` message, as written.
pub(crate) fn subscribe_topic(message: &[u8]) -> Option<&[u8]> {
    memchr::memmem::find(message, b"\"subscribe\"")?;
    string_field(message, b"topic")
}

/// Appends an unmasked server frame (`opcode`, FIN set) of `payload` to `out`.
pub(crate) fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// ringcast's push of a publication, framed: the bytes every subscriber of
/// `topic` is sent (`topic` and `message` as they were written in the
/// request; no message is a `null` payload).
pub(crate) fn push_frame(topic: &[u8], message: Option<&[u8]>) -> Vec<u8> {
    let mut text = Vec::with_capacity(64 + topic.len() + message.map_or(4, <[u8]>::len));
    text.extend_from_slice(br#"{"type":"push","topic":""#);
    text.extend_from_slice(topic);
    text.extend_from_slice(br#"","event":"message","payload":"#);
    match message {
        Some(message) => {
            text.push(b'"');
            text.extend_from_slice(message);
            text.push(b'"');
        }
        None => text.extend_from_slice(b"null"),
    }
    text.push(b'}');
    let mut frame = Vec::with_capacity(text.len() + 4);
    server_frame(&mut frame, 1, &text);
    frame
}

/// The acknowledgement of a subscription to `topic`, framed.
pub(crate) fn subscribed_frame(topic: &[u8]) -> Vec<u8> {
    let mut text = br#"{"type":"subscribed","topic":""#.to_vec();
    text.extend_from_slice(topic);
    text.extend_from_slice(b"\"}");
    let mut frame = Vec::new();
    server_frame(&mut frame, 1, &text);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn upgrade_answers_the_rfc_example_key() {
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nrest";
        let Request::Upgrade { key, used } = request(req) else {
            panic!("not an upgrade")
        };
        assert_eq!(used, req.len() - 4);
        let answer = String::from_utf8(upgrade_response(key)).unwrap();
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn pipelined_publishes_are_read_one_at_a_time() {
        let body = br#"{"topic":"load-3","message":"m\"x"}"#;
        let one = [
            format!(
                "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat();
        let two = [one.clone(), one.clone()].concat();
        assert_eq!(
            request(&two),
            Request::Publish {
                topic: b"load-3",
                message: Some(br#"m\"x"#),
                used: one.len()
            }
        );
        assert_eq!(request(&one[..one.len() - 1]), Request::Partial);
        let push = push_frame(b"load-3", Some(br#"m\"x"#));
        assert_eq!(
            &push[2..],
            br#"{"type":"push","topic":"load-3","event":"message","payload":"m\"x"}"#
        );
        assert_eq!(usize::from(push[1]), push.len() - 2);
        assert!(push_frame(b"t", None).ends_with(br#""payload":null}"#));
    }

    #[test]
    fn subscribe_frames_are_unmasked_and_read() {
        let msg = br#"{"type":"subscribe","topic":"load-0"}"#;
        let mut buf = masked(1, msg);
        buf.push(0x81);
        let Frame::Whole {
            opcode,
            payload,
            used,
        } = frame(&buf)
        else {
            panic!("not whole")
        };
        assert_eq!((opcode, used), (1, buf.len() - 1));
        assert_eq!(subscribe_topic(&payload), Some(&b"load-0"[..]));
        assert_eq!(frame(&buf[..5]), Frame::Partial);
        assert_eq!(subscribe_topic(br#"{"type":"ping"}"#), None);
    }

    #[test]
    fn long_frames_get_the_16_bit_length() {
        let mut out = Vec::new();
        server_frame(&mut out, 1, &[b'a'; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        assert_eq!(out.len(), 304);
    }
}
