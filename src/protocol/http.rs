//! HTTP/1.1 on the server side: parsing one request (head and body) from the
//! front of a buffer with `httparse`, and encoding responses. It owns request
//! limits and the mapping of every parse failure to a status code; it never
//! touches a socket, and pipelining is the caller's loop over `buf[used..]`.

use std::fmt::Write as _;

use bytes::Bytes;
use percent_encoding::percent_decode_str;

use super::Decoded;

/// Header slots kept on the stack; a larger `max_headers` falls back to the heap.
/// 64 covers browsers plus a proxy chain with room to spare.
const STACK_HEADERS: usize = 64;

/// Longest chunk-size line (size plus extensions) accepted in a chunked body.
/// Real clients send a few hex digits; 4 KiB only exists to stop a peer from
/// streaming an endless extension while we keep answering `Partial`.
const MAX_CHUNK_LINE_BYTES: usize = 4096;

/// Bytes of chunked framing allowed per body byte on top of the body limit.
/// One-byte chunks cost `1\r\nX\r\n`, 6 bytes per body byte; 8 leaves room
/// for short extensions while still bounding the bytes we buffer.
const CHUNKED_OVERHEAD_FACTOR: usize = 8;

/// Limits applied while parsing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request head (request line and headers). Default 16 KiB; larger
    /// allows longer cookies and tokens at the cost of buffer per connection.
    pub max_header_bytes: usize,
    /// Most header fields in one request. Default 64.
    pub max_headers: usize,
    /// Largest body, declared or chunked. Default 1 MiB.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// Request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `DELETE`
    Delete,
    /// `HEAD`
    Head,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `OPTIONS`
    Options,
    /// Any other token; routes answer 405.
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        // RFC 9110 9.1: method names are case-sensitive.
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// A parsed request with its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Percent-decoded path without the query (lossy UTF-8).
    pub path: String,
    /// Raw query string after `?`, `""` if none.
    pub query: String,
    /// HTTP minor version: 0 or 1.
    pub version_minor: u8,
    /// Header fields in order; names lowercased, values as sent (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when it was sent chunked.
    pub body: Bytes,
}

impl Request {
    /// Value of the first header named `lowercase_name`.
    pub fn header(&self, lowercase_name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(name, _)| name == lowercase_name)
            .map(|(_, value)| value.as_str())
    }

    /// Every comma-separated token of every header named `lowercase_name`,
    /// trimmed (RFC 9110 5.3: repeated fields combine as a list).
    pub fn header_tokens<'a>(&'a self, lowercase_name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(name, _)| name == lowercase_name)
            .flat_map(|(_, value)| value.split(','))
            .map(str::trim)
            .filter(|token| !token.is_empty())
    }

    /// Whether any token of header `lowercase_name` equals `token`, ignoring ASCII case.
    pub fn has_token(&self, lowercase_name: &str, token: &str) -> bool {
        self.header_tokens(lowercase_name)
            .any(|t| t.eq_ignore_ascii_case(token))
    }

    /// First query parameter called `name`, percent-decoded with `+` as space.
    /// A bare `flag` without `=` yields `Some("")`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_form(key) == name).then(|| decode_form(value))
            })
    }

    /// Whether the connection stays open after this request: HTTP/1.1 unless
    /// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.version_minor >= 1 {
            !self.has_token("connection", "close")
        } else {
            self.has_token("connection", "keep-alive")
        }
    }

    /// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode_form(component: &str) -> String {
    if component.contains('+') {
        percent_decode_str(&component.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    } else {
        percent_decode_str(component)
            .decode_utf8_lossy()
            .into_owned()
    }
}

/// Why a request could not be parsed. Each variant maps to the status to answer
/// with (see [`HttpError::status`]); after any of them, close the connection.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Syntax error in the request line, headers, framing or chunked body: answer 400.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Head larger than `max_header_bytes` or more than `max_headers` fields: answer 431.
    #[error("request header fields too large")]
    HeadersTooLarge,
    /// Body (declared or chunked) larger than `max_body_bytes`: answer 413.
    #[error("request body too large")]
    BodyTooLarge,
    /// A transfer coding other than plain `chunked`: answer 501.
    #[error("unsupported transfer encoding")]
    UnsupportedTransferEncoding,
    /// An HTTP version other than 1.0 or 1.1: answer 505.
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadersTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::UnsupportedTransferEncoding => 501,
            HttpError::UnsupportedVersion => 505,
        }
    }

    /// A `Connection: close` JSON error response for this error.
    pub fn response(&self) -> Response {
        error_json(self.status(), &self.to_string()).keep_alive(false)
    }
}

fn map_httparse(err: httparse::Error) -> HttpError {
    match err {
        httparse::Error::TooManyHeaders => HttpError::HeadersTooLarge,
        httparse::Error::Version => HttpError::UnsupportedVersion,
        httparse::Error::HeaderName => HttpError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("invalid header value"),
        httparse::Error::NewLine => HttpError::Malformed("invalid line ending"),
        httparse::Error::Token => HttpError::Malformed("invalid token in request line"),
        _ => HttpError::Malformed("invalid request line"),
    }
}

/// How the body is delimited, from the head.
enum BodyFraming {
    Length(usize),
    Chunked,
}

/// The interim response that tells a client waiting on `Expect: 100-continue`
/// to send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Whether `buf` starts with a complete request head carrying
/// `Expect: 100-continue` (RFC 9110 10.1.1): such a client (curl, for bodies
/// over 1 KiB) waits for [`CONTINUE`] before sending the body.
pub fn expects_continue(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
        }),
        _ => false,
    }
}

/// Parses one request from the front of `buf`.
///
/// Returns `Partial` while the head or body is incomplete; the caller keeps the
/// bytes and calls again with more. `Complete(request, used)` leaves any
/// pipelined bytes after `used` untouched.
pub fn parse_request(buf: &[u8], limits: &HttpLimits) -> Result<Decoded<Request>, HttpError> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap;
    let slots: &mut [httparse::Header<'_>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
        &mut heap
    };
    let mut parsed = httparse::Request::new(slots);
    let head_len = match parsed.parse(buf).map_err(map_httparse)? {
        httparse::Status::Complete(n) => n,
        // Refuse to buffer an endless head instead of waiting forever.
        httparse::Status::Partial if buf.len() > limits.max_header_bytes => {
            return Err(HttpError::HeadersTooLarge)
        }
        httparse::Status::Partial => return Ok(Decoded::Partial),
    };
    if head_len > limits.max_header_bytes {
        return Err(HttpError::HeadersTooLarge);
    }

    let (Some(method), Some(target), Some(version_minor)) =
        (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let (raw_path, query) = target.split_once('?').unwrap_or((target, ""));
    if !raw_path.starts_with('/') && raw_path != "*" {
        return Err(HttpError::Malformed(
            "request target must be an absolute path",
        ));
    }

    let mut headers = Vec::with_capacity(parsed.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Option<String> = None;
    for header in parsed.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(header.value).into_owned();
        if name == "content-length" {
            // RFC 9112 6.3: a list of identical values is one value; anything else is fatal.
            for item in value.split(',') {
                let n = parse_content_length(item.trim())?;
                if content_length.is_some_and(|seen| seen != n) {
                    return Err(HttpError::Malformed("conflicting content-length"));
                }
                content_length = Some(n);
            }
        } else if name == "transfer-encoding" {
            let combined = transfer_encoding.get_or_insert_with(String::new);
            if !combined.is_empty() {
                combined.push(',');
            }
            combined.push_str(&value);
        }
        headers.push((name, value));
    }

    let framing = match (content_length, transfer_encoding) {
        // RFC 9112 6.3: both is a smuggling vector; refuse rather than pick one.
        (Some(_), Some(_)) => {
            return Err(HttpError::Malformed(
                "both content-length and transfer-encoding",
            ))
        }
        (None, Some(te)) => {
            let mut codings = te.split(',').map(str::trim).filter(|c| !c.is_empty());
            match (codings.next(), codings.next()) {
                (Some(c), None) if c.eq_ignore_ascii_case("chunked") => BodyFraming::Chunked,
                _ => return Err(HttpError::UnsupportedTransferEncoding),
            }
        }
        (Some(n), None) => match usize::try_from(n) {
            Ok(n) if n <= limits.max_body_bytes => BodyFraming::Length(n),
            _ => return Err(HttpError::BodyTooLarge),
        },
        (None, None) => BodyFraming::Length(0),
    };

    let rest = &buf[head_len..];
    let (body, body_used) = match framing {
        BodyFraming::Length(n) => match rest.get(..n) {
            Some(body) => (Bytes::copy_from_slice(body), n),
            None => return Ok(Decoded::Partial),
        },
        BodyFraming::Chunked => match decode_chunked(rest, limits)? {
            Decoded::Complete(body, used) => (body, used),
            Decoded::Partial => return Ok(Decoded::Partial),
        },
    };

    let request = Request {
        method: Method::from_token(method),
        path: percent_decode_str(raw_path)
            .decode_utf8_lossy()
            .into_owned(),
        query: query.to_owned(),
        version_minor,
        headers,
        body,
    };
    Ok(Decoded::Complete(request, head_len + body_used))
}

fn parse_content_length(text: &str) -> Result<u64, HttpError> {
    // `u64::from_str` accepts a leading '+', which RFC 9110 8.6 does not.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("invalid content-length"));
    }
    // Only digits remain, so the only failure is overflow: certainly too large.
    text.parse().map_err(|_| HttpError::BodyTooLarge)
}

/// Decodes a chunked body from the front of `buf` (RFC 9112 7.1), trailers discarded.
fn decode_chunked(buf: &[u8], limits: &HttpLimits) -> Result<Decoded<Bytes>, HttpError> {
    let max_encoded = limits
        .max_body_bytes
        .saturating_mul(CHUNKED_OVERHEAD_FACTOR)
        .saturating_add(limits.max_header_bytes);
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let (line_len, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_LINE_BYTES => {
                return Err(HttpError::Malformed("chunk size line too long"))
            }
            Ok(httparse::Status::Partial) => return Ok(Decoded::Partial),
            Err(_) => return Err(HttpError::Malformed("invalid chunk size")),
        };
        pos += line_len;
        if size == 0 {
            break;
        }
        let size = match usize::try_from(size) {
            Ok(size) if size <= limits.max_body_bytes - body.len() => size,
            _ => return Err(HttpError::BodyTooLarge),
        };
        let Some(chunk) = buf.get(pos..pos.saturating_add(size).saturating_add(2)) else {
            return partial_or_too_large(buf.len(), max_encoded);
        };
        if &chunk[size..] != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF"));
        }
        body.extend_from_slice(&chunk[..size]);
        pos += size + 2;
        if pos > max_encoded {
            return Err(HttpError::BodyTooLarge);
        }
    }
    // Trailer section: header fields we ignore, ending with an empty line.
    let mut trailers = [httparse::EMPTY_HEADER; 16];
    match httparse::parse_headers(&buf[pos..], &mut trailers) {
        Ok(httparse::Status::Complete((n, _))) => Ok(Decoded::Complete(Bytes::from(body), pos + n)),
        Ok(httparse::Status::Partial) if buf.len() - pos > limits.max_header_bytes => {
            Err(HttpError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(Decoded::Partial),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadersTooLarge),
        Err(_) => Err(HttpError::Malformed("invalid trailer")),
    }
}

fn partial_or_too_large<T>(buffered: usize, max_encoded: usize) -> Result<Decoded<T>, HttpError> {
    if buffered > max_encoded {
        Err(HttpError::BodyTooLarge)
    } else {
        Ok(Decoded::Partial)
    }
}

/// Per-connection request decoder; keeps its progress between calls.
// TEMPORARY: a non-incremental stand-in until the incremental decoder lands.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: HttpLimits,
    in_request: bool,
    expects_continue: bool,
}

impl RequestDecoder {
    /// A decoder for requests within `limits`.
    pub fn new(limits: HttpLimits) -> Self {
        RequestDecoder {
            limits,
            in_request: false,
            expects_continue: false,
        }
    }

    /// Reads from the front of `buf`; returns the bytes consumed and the
    /// request once complete.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(usize, Option<Request>), HttpError> {
        match parse_request(buf, &self.limits)? {
            Decoded::Complete(request, used) => {
                self.in_request = false;
                self.expects_continue = false;
                Ok((used, Some(request)))
            }
            Decoded::Partial => {
                self.in_request = !buf.is_empty();
                self.expects_continue = expects_continue(buf);
                Ok((0, None))
            }
        }
    }

    /// A complete head asked for `Expect: 100-continue` and its body is not complete yet.
    pub fn expects_continue(&self) -> bool {
        self.expects_continue
    }

    /// Some bytes of a request have arrived but it is not complete.
    pub fn in_request(&self) -> bool {
        self.in_request
    }
}

/// An HTTP/1.1 response under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    keep_alive: bool,
    head_only: bool,
}

impl Response {
    /// An empty response with `status`, keeping the connection alive.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            keep_alive: true,
            head_only: false,
        }
    }

    /// A response with a JSON body.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Self::text(status, "application/json", body)
    }

    /// A response with a body of the given content type.
    pub fn text(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        let mut response = Self::new(status).header("Content-Type", content_type);
        response.body = body.into();
        response
    }

    /// Adds a header. CR and LF in `value` become spaces, so a value can never
    /// split the head.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        let mut value = value.into();
        if value.contains(['\r', '\n']) {
            value = value.replace(['\r', '\n'], " ");
        }
        self.headers.push((name, value));
        self
    }

    /// Whether the connection stays open after this response.
    pub fn keep_alive(mut self, yes: bool) -> Self {
        self.keep_alive = yes;
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The extra headers, in order.
    pub fn headers(&self) -> &[(&'static str, String)] {
        &self.headers
    }

    /// Whether the connection stays open after this response.
    pub fn is_keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// Answers a HEAD request: the same head, Content-Length included, and
    /// no body (RFC 9110 9.3.2), so the next pipelined response parses.
    pub fn head_only(mut self, yes: bool) -> Self {
        self.head_only = yes;
        self
    }

    /// The full response bytes: status line, headers, `Content-Length`,
    /// `Connection: close` when not kept alive, and the body (unless HEAD).
    pub fn encode(&self) -> Bytes {
        let mut head = String::with_capacity(128);
        // Writing into a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        // RFC 9110 8.6: no Content-Length on 1xx and 204.
        if !(100..200).contains(&self.status) && self.status != 204 {
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        if !self.keep_alive {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = Vec::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(head.as_bytes());
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        Bytes::from(out)
    }
}

/// Canonical reason phrase for `status` (RFC 9110 15), `""` when unknown.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A JSON response `{"error":"<message>"}` with `message` properly escaped.
pub fn error_json(status: u16, message: &str) -> Response {
    let mut body = Vec::with_capacity(message.len() + 12);
    body.extend_from_slice(b"{\"error\":");
    super::message::write_json_str(&mut body, message);
    body.push(b'}');
    Response::json(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(buf: &[u8]) -> Result<Decoded<Request>, HttpError> {
        parse_request(buf, &HttpLimits::default())
    }

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Ok(Decoded::Complete(req, used)) => (req, used),
            other => panic!("expected complete, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_simple_get_with_query() {
        let (req, used) =
            complete(b"GET /ws/a%20b?user_id=42&x=1 HTTP/1.1\r\nHost: x\r\nX-Thing: Yes\r\n\r\n");
        assert_eq!(used, 64);
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/ws/a b");
        assert_eq!(req.query, "user_id=42&x=1");
        assert_eq!(req.version_minor, 1);
        assert_eq!(req.header("x-thing"), Some("Yes"));
        assert_eq!(req.query_param("user_id").as_deref(), Some("42"));
        assert_eq!(req.query_param("nope"), None);
        assert!(req.body.is_empty());
        assert!(req.keep_alive());
    }

    #[test]
    fn query_params_decode_plus_and_percent() {
        let (req, _) = complete(b"GET /?q=a+b%2Bc&flag&t=%E2%9C%93 HTTP/1.1\r\n\r\n");
        assert_eq!(req.query_param("q").as_deref(), Some("a b+c"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("t").as_deref(), Some("\u{2713}"));
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let buf = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\nGET /x";
        let (first, used) = complete(buf);
        assert_eq!(first.method, Method::Post);
        assert_eq!(&first.body[..], b"hello");
        let (second, used2) = complete(&buf[used..]);
        assert_eq!(second.path, "/health");
        assert_eq!(parse(&buf[used + used2..]), Ok(Decoded::Partial));
    }

    #[test]
    fn partial_head_and_partial_body_are_partial() {
        assert_eq!(parse(b""), Ok(Decoded::Partial));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Ok(Decoded::Partial)
        );
        assert_eq!(
            parse(b"POST /publish HTTP/1.1\r\nContent-Length: 10\r\n\r\nhello"),
            Ok(Decoded::Partial)
        );
    }

    #[test]
    fn post_without_content_length_has_empty_body() {
        let (req, used) = complete(b"POST /publish HTTP/1.1\r\n\r\n{}");
        assert!(req.body.is_empty());
        assert_eq!(used, 26);
    }

    #[test]
    fn chunked_body_is_reassembled_and_trailers_skipped() {
        let buf = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (req, used) = complete(buf);
        assert_eq!(&req.body[..], b"hello world");
        assert_eq!(&buf[used..], b"NEXT");
    }

    #[test]
    fn chunked_body_waits_for_every_part() {
        let full: &[u8] =
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(Decoded::Partial), "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_complete());
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(
            parse(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(HttpError::Malformed("invalid chunk size"))
        );
        assert_eq!(
            parse(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n"),
            Err(HttpError::Malformed("chunk not followed by CRLF"))
        );
        let limits = HttpLimits {
            max_body_bytes: 8,
            ..HttpLimits::default()
        };
        let buf = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\n";
        assert_eq!(parse_request(buf, &limits), Err(HttpError::BodyTooLarge));
    }

    #[test]
    fn transfer_encoding_rules() {
        let both = b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(both).unwrap_err().status(), 400);
        let gzip = b"POST /p HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(parse(gzip), Err(HttpError::UnsupportedTransferEncoding));
        assert_eq!(HttpError::UnsupportedTransferEncoding.status(), 501);
    }

    #[test]
    fn content_length_rules() {
        let bad = b"POST /p HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello";
        assert_eq!(
            parse(bad),
            Err(HttpError::Malformed("invalid content-length"))
        );
        let conflict = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello";
        assert_eq!(
            parse(conflict),
            Err(HttpError::Malformed("conflicting content-length"))
        );
        let same = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\nhello";
        assert_eq!(&complete(same).0.body[..], b"hello");
        let huge = b"POST /p HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge), Err(HttpError::BodyTooLarge));
    }

    #[test]
    fn oversized_body_is_refused_before_it_arrives() {
        let limits = HttpLimits {
            max_body_bytes: 4,
            ..HttpLimits::default()
        };
        let buf = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        let err = parse_request(buf, &limits).unwrap_err();
        assert_eq!(err, HttpError::BodyTooLarge);
        assert_eq!(err.status(), 413);
    }

    #[test]
    fn oversized_head_is_refused_without_waiting() {
        let limits = HttpLimits {
            max_header_bytes: 32,
            ..HttpLimits::default()
        };
        let buf = b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(parse_request(buf, &limits), Err(HttpError::HeadersTooLarge));
        let complete_but_big = b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let err = parse_request(complete_but_big, &limits).unwrap_err();
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let limits = HttpLimits {
            max_headers: 2,
            ..HttpLimits::default()
        };
        let buf = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(parse_request(buf, &limits), Err(HttpError::HeadersTooLarge));
        let many = HttpLimits {
            max_headers: 100,
            ..HttpLimits::default()
        };
        assert!(parse_request(buf, &many).unwrap().is_complete());
    }

    #[test]
    fn malformed_and_versions() {
        assert_eq!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HttpError::UnsupportedVersion)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nNo Colon\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(parse(b"GET x HTTP/1.1\r\n\r\n").unwrap_err().status(), 400);
        assert_eq!(parse(b"\x00\x01\x02\r\n\r\n").unwrap_err().status(), 400);
        assert_eq!(
            complete(b"BREW /pot HTTP/1.1\r\n\r\n").0.method,
            Method::Other
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .0
            .keep_alive());
        assert!(
            complete(b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n")
                .0
                .keep_alive()
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive());
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive()
        );
    }

    #[test]
    fn bearer_token_is_extracted() {
        let (req, _) = complete(b"GET / HTTP/1.1\r\nAuthorization: bearer  abc.def \r\n\r\n");
        assert_eq!(req.bearer_token(), Some("abc.def"));
        let (basic, _) = complete(b"GET / HTTP/1.1\r\nAuthorization: Basic abc\r\n\r\n");
        assert_eq!(basic.bearer_token(), None);
        let (empty, _) = complete(b"GET / HTTP/1.1\r\nAuthorization: Bearer\r\n\r\n");
        assert_eq!(empty.bearer_token(), None);
    }

    #[test]
    fn response_encodes_status_length_and_close() {
        let bytes = Response::json(202, &b"{\"delivered_shards\":1}"[..]).encode();
        assert_eq!(
            &bytes[..],
            &b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"delivered_shards\":1}"[..]
        );
        let closing = Response::new(204).keep_alive(false).encode();
        assert_eq!(
            &closing[..],
            &b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"[..]
        );
        let injected = Response::new(200).header("X-A", "a\r\nB: b").encode();
        assert_eq!(
            &injected[..],
            &b"HTTP/1.1 200 OK\r\nX-A: a  B: b\r\nContent-Length: 0\r\n\r\n"[..]
        );
        let text = Response::text(200, "text/plain", "hi").encode();
        assert!(text.ends_with(b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"));
    }

    #[test]
    fn error_json_escapes_the_message() {
        let response = error_json(400, "bad \"x\"\n");
        assert_eq!(response.status(), 400);
        assert_eq!(&response.body()[..], &br#"{"error":"bad \"x\"\n"}"#[..]);
        let close = HttpError::BodyTooLarge.response();
        assert_eq!(close.status(), 413);
        assert!(!close.is_keep_alive());
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = HttpLimits { max_header_bytes: 256, max_headers: 8, max_body_bytes: 64 };
            let _ = parse_request(&bytes, &limits);
        }

        #[test]
        fn parse_request_never_panics_on_plausible_heads(
            method in "(GET|POST|X)",
            path in "/[a-z%0-9?=&+]{0,20}",
            headers in proptest::collection::vec("(Content-Length|Transfer-Encoding|Connection): [a-z0-9, ]{0,12}", 0..4),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
            for h in headers {
                buf.extend_from_slice(h.as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(&body);
            for cut in 0..=buf.len() {
                if let Ok(Decoded::Complete(_, used)) = parse_request(&buf[..cut], &HttpLimits::default()) {
                    prop_assert!(used <= cut);
                }
            }
        }
    }

    #[test]
    fn a_head_response_keeps_the_length_and_drops_the_body() {
        let bytes = Response::json(200, "{\"a\":1}").head_only(true).encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("Content-Length: 7\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn a_complete_head_with_expect_100_continue_is_recognised() {
        let head = b"POST /publish HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n";
        assert!(expects_continue(head));
        assert!(
            !expects_continue(&head[..head.len() - 2]),
            "head not complete yet"
        );
        assert!(!expects_continue(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        ));
    }
}
