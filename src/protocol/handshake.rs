//! The RFC 6455 section 4.2 server handshake over an already parsed
//! [`Request`]: deciding whether it is an upgrade, validating it, and building
//! the `101 Switching Protocols` bytes or the error response. Routing and
//! authentication happen before this; no subprotocol or extension is offered.

use bytes::Bytes;
use tungstenite::handshake::derive_accept_key;

use super::http::{error_json, Method, Request, Response};

/// The only protocol version this server speaks (RFC 6455 4.1).
const WEBSOCKET_VERSION: &str = "13";

/// Length of a `Sec-WebSocket-Key`: base64 of 16 bytes is 22 symbols and `==`.
const KEY_LEN: usize = 24;

/// Why an upgrade request was refused; answer with [`HandshakeError::response`].
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The method is not GET: answer 405.
    #[error("websocket upgrade requires GET")]
    NotGet,
    /// An HTTP/1.0 request (RFC 6455 4.1 requires HTTP/1.1 or later): answer 400.
    #[error("websocket upgrade requires HTTP/1.1 or later")]
    NotHttp11,
    /// No `Upgrade: websocket` header: answer 400.
    #[error("missing `Upgrade: websocket` header")]
    MissingUpgrade,
    /// `Connection` does not list `upgrade`: answer 400.
    #[error("missing `Connection: upgrade` header")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Key` absent or not base64 of 16 bytes: answer 400.
    #[error("missing or invalid `Sec-WebSocket-Key` header")]
    BadKey,
    /// `Sec-WebSocket-Version` is not 13: answer 426 naming version 13.
    #[error("unsupported websocket version, use 13")]
    UnsupportedVersion,
}

impl HandshakeError {
    /// The HTTP response to send: a JSON `{"error":..}` with 400, 405 or 426.
    pub fn response(&self) -> Response {
        let message = self.to_string();
        match self {
            HandshakeError::NotGet => error_json(405, &message).header("Allow", "GET"),
            // RFC 6455 4.4: tell the client which versions we speak.
            HandshakeError::UnsupportedVersion => {
                error_json(426, &message).header("Sec-WebSocket-Version", WEBSOCKET_VERSION)
            }
            _ => error_json(400, &message),
        }
    }
}

/// Whether `req` asks for a WebSocket upgrade (`Upgrade` lists `websocket`).
pub fn is_upgrade_request(req: &Request) -> bool {
    req.has_token("upgrade", "websocket")
}

/// Validates an upgrade request and returns the full `101 Switching Protocols`
/// response bytes, ready to write before switching to frames.
pub fn accept(req: &Request) -> Result<Bytes, HandshakeError> {
    accept_with(req, None)
}

/// [`accept`], answering with `extensions` (a `Sec-WebSocket-Extensions`
/// value) when an extension was negotiated.
pub fn accept_with(req: &Request, extensions: Option<&str>) -> Result<Bytes, HandshakeError> {
    if req.method != Method::Get {
        return Err(HandshakeError::NotGet);
    }
    // httparse only accepts 1.0 and 1.1, and 1.0 has no `Upgrade` (RFC 6455 4.1).
    if req.version_minor < 1 {
        return Err(HandshakeError::NotHttp11);
    }
    if !is_upgrade_request(req) {
        return Err(HandshakeError::MissingUpgrade);
    }
    if !req.has_token("connection", "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if req.header("sec-websocket-version").map(str::trim) != Some(WEBSOCKET_VERSION) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = req
        .header("sec-websocket-key")
        .map(str::trim)
        .filter(|key| is_base64_of_16_bytes(key.as_bytes()))
        .ok_or(HandshakeError::BadKey)?;
    let accept = derive_accept_key(key.as_bytes());
    let mut out = Vec::with_capacity(130);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    if let Some(extensions) = extensions {
        debug_assert!(!extensions.contains(['\r', '\n']));
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(extensions.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    Ok(Bytes::from(out))
}

/// Whether `key` is canonical base64 of exactly 16 bytes (RFC 6455 4.2.1 item 5).
fn is_base64_of_16_bytes(key: &[u8]) -> bool {
    let is_symbol = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    match key {
        [symbols @ .., b'=', b'='] if key.len() == KEY_LEN => {
            // 16 bytes = 128 bits = 21 symbols of 6 bits plus 2 bits in the
            // 22nd, whose 4 low bits must be zero in canonical padding.
            let last = symbols.last().copied().unwrap_or(b'!');
            symbols.iter().all(is_symbol) && base64_value(last).is_some_and(|v| v & 0x0F == 0)
        }
        _ => false,
    }
}

fn base64_value(symbol: u8) -> Option<u8> {
    match symbol {
        b'A'..=b'Z' => Some(symbol - b'A'),
        b'a'..=b'z' => Some(symbol - b'a' + 26),
        b'0'..=b'9' => Some(symbol - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http::{parse_request, HttpLimits};
    use crate::protocol::Decoded;

    fn request(head: &[u8]) -> Request {
        match parse_request(head, &HttpLimits::default()) {
            Ok(Decoded::Complete(req, _)) => req,
            other => panic!("{other:?}"),
        }
    }

    const RFC_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc_example_key_is_accepted() {
        let req = request(RFC_REQUEST);
        assert!(is_upgrade_request(&req));
        assert_eq!(
            &accept(&req).unwrap()[..],
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"[..]
        );
    }

    #[test]
    fn connection_is_a_token_list_and_case_insensitive() {
        let req = request(b"GET /ws HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert!(accept(&req).is_ok());
    }

    #[test]
    fn version_8_gets_426_naming_13() {
        let req = request(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
        let err = accept(&req).unwrap_err();
        assert_eq!(err, HandshakeError::UnsupportedVersion);
        let encoded = err.response().encode();
        assert!(encoded.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(encoded
            .windows(27)
            .any(|w| w == b"Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn refusals_and_their_statuses() {
        let post = request(b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(accept(&post), Err(HandshakeError::NotGet));
        assert_eq!(HandshakeError::NotGet.response().status(), 405);
        let plain = request(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\n\r\n");
        assert!(!is_upgrade_request(&plain));
        assert_eq!(accept(&plain), Err(HandshakeError::MissingUpgrade));
        let no_conn =
            request(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(
            accept(&no_conn),
            Err(HandshakeError::MissingConnectionUpgrade)
        );
        let response = HandshakeError::MissingConnectionUpgrade.response();
        assert_eq!(response.status(), 400);
        assert_eq!(
            &response.body()[..],
            &br#"{"error":"missing `Connection: upgrade` header"}"#[..]
        );
    }

    #[test]
    fn keys_must_be_base64_of_16_bytes() {
        for (key, ok) in [
            ("dGhlIHNhbXBsZSBub25jZQ==", true),
            ("AAAAAAAAAAAAAAAAAAAAAA==", true),
            ("dGhlIHNhbXBsZSBub25jZR==", false), // non-zero pad bits
            ("dGhlIHNhbXBsZSBub25jZQ=", false),
            ("dGhlIHNhbXBsZSBub25jZQ", false),
            ("dGhlIHNhbXBsZSBub25j*Q==", false),
            ("dGhlIHNhbXBsZSBub25jZSE=", false), // 17 bytes' worth
            ("", false),
        ] {
            assert_eq!(is_base64_of_16_bytes(key.as_bytes()), ok, "{key}");
        }
        let missing = request(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert_eq!(accept(&missing), Err(HandshakeError::BadKey));
    }

    #[test]
    fn an_http_1_0_upgrade_gets_400_naming_http_1_1() {
        let req = request(b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert!(is_upgrade_request(&req));
        assert_eq!(accept(&req), Err(HandshakeError::NotHttp11));
        let response = HandshakeError::NotHttp11.response();
        assert_eq!(response.status(), 400);
        assert_eq!(
            &response.body()[..],
            &br#"{"error":"websocket upgrade requires HTTP/1.1 or later"}"#[..]
        );
    }
}
