//! HTTP/1.1 on the server side: decoding requests (head and body) with
//! `httparse` as their bytes arrive, in work linear in those bytes however
//! they are split ([`RequestDecoder`]), and encoding responses. It owns request
//! limits and the mapping of every parse failure to a status code; it never
//! touches a socket, and pipelining is the caller's loop over what is left.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use bytes::Bytes;
use percent_encoding::percent_decode_str;

use super::message::write_decimal;
use super::Decoded;

mod head;
use head::Head;

/// Header slots kept on the stack; a larger `max_headers` falls back to the heap.
/// 64 covers browsers plus a proxy chain with room to spare.
const STACK_HEADERS: usize = 64;

/// Longest chunk-size line (size plus extensions) accepted in a chunked body.
/// Real clients send a few hex digits; 4 KiB only exists to stop a peer from
/// streaming an endless extension while we keep answering `Partial`.
const MAX_CHUNK_LINE_BYTES: usize = 4096;

/// Most trailer fields after a chunked body; more is answered 431. We drop
/// trailers, so this only bounds work; 16 was the slot count used before.
const MAX_TRAILER_FIELDS: usize = 16;

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
    /// HTTP minor version: 0 or 1.
    pub version_minor: u8,
    /// The body, de-chunked when it was sent chunked.
    pub body: Bytes,
    /// Path, query and header fields.
    head: Head,
}

impl Request {
    /// Percent-decoded path without the query (lossy UTF-8).
    pub fn path(&self) -> &str {
        self.head.path()
    }

    /// Raw query string after `?`, `""` if none.
    pub fn query(&self) -> &str {
        self.head.query()
    }

    /// Header fields in order; names lowercased, values as sent (lossy UTF-8).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.head.fields()
    }

    /// Value of the first header named `lowercase_name`.
    pub fn header(&self, lowercase_name: &str) -> Option<&str> {
        self.headers()
            .find(|(name, _)| *name == lowercase_name)
            .map(|(_, value)| value)
    }

    /// Every comma-separated token of every header named `lowercase_name`,
    /// trimmed (RFC 9110 5.3: repeated fields combine as a list).
    pub fn header_tokens<'a>(&'a self, lowercase_name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers()
            .filter(move |(name, _)| *name == lowercase_name)
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
        self.query()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_form(key) == name).then(|| decode_form(value))
            })
    }

    /// Every value of query parameter `name`, decoded, in order
    /// (`?topic=a&topic=b`).
    pub fn query_params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.query()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter_map(move |pair| {
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

    /// Bytes its head takes in memory.
    pub fn head_bytes(&self) -> usize {
        std::mem::size_of::<Request>() + self.head.heap_bytes()
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

/// The interim response that tells a client waiting on `Expect: 100-continue`
/// to send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn is_expect_continue(field: &httparse::Header<'_>) -> bool {
    field.name.eq_ignore_ascii_case("expect") && field.value.eq_ignore_ascii_case(b"100-continue")
}

/// Parses one request from the front of `buf`: a fresh [`RequestDecoder`]
/// fed the whole buffer at once.
///
/// Returns `Partial` while the head or body is incomplete; the caller keeps the
/// bytes and calls again with more, which reads them all again, so a
/// connection that receives requests in pieces keeps a [`RequestDecoder`]
/// instead. `Complete(request, used)` leaves any pipelined bytes after `used`
/// untouched.
pub fn parse_request(buf: &[u8], limits: &HttpLimits) -> Result<Decoded<Request>, HttpError> {
    match RequestDecoder::new(*limits).decode(buf)? {
        (used, Some(request)) => Ok(Decoded::Complete(request, used)),
        (_, None) => Ok(Decoded::Partial),
    }
}

/// Per-connection request decoder; keeps its progress between calls, so the
/// work per request is linear in its bytes however they are split.
///
/// The head stays in the caller's buffer until it is complete (at most
/// `max_header_bytes`); each call looks only at the bytes that arrived since
/// the last one, and the head is parsed once, then consumed. A
/// `Content-Length` body stays in the caller's buffer until all of it is
/// there. A chunked body is consumed as it is decoded, so the caller holds at
/// most one unfinished chunk-size or trailer line. After an error the decoder
/// starts afresh, but the caller answers [`HttpError::response`] and closes.
#[derive(Debug)]
pub struct RequestDecoder {
    limits: HttpLimits,
    state: State,
}

impl RequestDecoder {
    /// A decoder waiting for the first byte of a request.
    pub fn new(limits: HttpLimits) -> Self {
        Self {
            limits,
            state: State::default(),
        }
    }

    /// Reads from the front of `buf` (the caller's unconsumed input: what it
    /// passed last time minus what was consumed, plus new bytes).
    /// Returns how many bytes of `buf` the decoder consumed (the caller drops
    /// them) and the request once it is complete. Errors map to statuses
    /// through [`HttpError::status`]. Bytes after a complete request are left
    /// alone: call again for a pipelined one.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(usize, Option<Request>), HttpError> {
        // Taken out, so that an error leaves a fresh decoder behind.
        let (mut pending, head_len) = match std::mem::take(&mut self.state) {
            State::Body(pending) => (pending, 0),
            State::Head(mut scan) => match decode_head(&mut scan, buf, &self.limits)? {
                Some(found) => found,
                None => {
                    self.state = State::Head(scan);
                    return Ok((0, None));
                }
            },
        };
        let (body_len, body) = pending.progress.decode(&buf[head_len..], &self.limits)?;
        let used = head_len + body_len;
        match body {
            Some(body) => Ok((used, Some(pending.finish(body)))),
            None => {
                self.state = State::Body(pending);
                Ok((used, None))
            }
        }
    }

    /// A complete head asked for `Expect: 100-continue` and its body is not
    /// complete yet (the shard answers [`CONTINUE`] once per request).
    pub fn expects_continue(&self) -> bool {
        matches!(&self.state, State::Body(pending) if pending.expect_continue)
    }

    /// Bytes the decoder keeps of a request under way beyond the caller's
    /// buffer: a parsed head waiting for its body, and a chunked body
    /// decoded so far. The caller charges them to its inbound budget.
    pub fn held_bytes(&self) -> usize {
        match &self.state {
            State::Head(_) => 0,
            State::Body(pending) => {
                let body = match &pending.progress {
                    BodyProgress::Length(_) => 0,
                    BodyProgress::Chunked(chunked) => chunked.body.capacity(),
                };
                pending.request.head_bytes() + body
            }
        }
    }

    /// Some bytes of a request have arrived but it is not complete (a timeout
    /// then gets 408, not a silent close). Empty lines before a request do not
    /// count (RFC 9112 2.2 lets a server ignore them).
    pub fn in_request(&self) -> bool {
        match &self.state {
            State::Head(scan) => scan.line != HeadLine::Leading,
            State::Body(_) => true,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Looking for the end of the head in the caller's buffer.
    Head(HeadScan),
    /// The head is parsed and consumed; the body is on its way.
    Body(PendingBody),
}

impl Default for State {
    fn default() -> Self {
        State::Head(HeadScan::default())
    }
}

/// Finds the end of the head at the front of `buf` and parses it, or notes
/// how far it looked. Returns the request so far and the head's length.
fn decode_head(
    scan: &mut HeadScan,
    buf: &[u8],
    limits: &HttpLimits,
) -> Result<Option<(PendingBody, usize)>, HttpError> {
    if scan.is_fresh() {
        // The whole head usually arrives in one read: one httparse pass then
        // finds its end and parses it. Anything else falls back to the scan,
        // which reaches the same verdict after looking at each byte once.
        if let Ok(Some(found)) = parse_head(buf, limits) {
            return Ok(Some(found));
        }
    }
    let Some(head_len) = scan.find_end(buf, limits.max_header_bytes)? else {
        return Ok(None);
    };
    // httparse ends a head at the same empty line as the scan (both follow
    // RFC 9112 2.1 with bare LF allowed), so `None` here means a parser bug.
    match parse_head(&buf[..head_len], limits)? {
        Some(found) => Ok(Some(found)),
        None => Err(HttpError::Malformed("incomplete request head")),
    }
}

/// Parses a head with httparse; `None` when `buf` holds no complete head.
fn parse_head(buf: &[u8], limits: &HttpLimits) -> Result<Option<(PendingBody, usize)>, HttpError> {
    // Uninitialised: clearing 64 slots (2 KiB) per request was about half of
    // this function's own time under wrk; httparse writes the slots it
    // fills and hands back only those.
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap;
    let slots = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap = vec![MaybeUninit::uninit(); limits.max_headers];
        &mut heap[..]
    };
    let mut parsed = httparse::Request::new(&mut []);
    let parse = parsed.parse_with_uninit_headers(buf, slots);
    let head_len = match parse.map_err(map_httparse)? {
        httparse::Status::Complete(n) if n > limits.max_header_bytes => {
            return Err(HttpError::HeadersTooLarge)
        }
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    Ok(Some((PendingBody::from_head(&parsed, limits)?, head_len)))
}

/// How far the search for the end of a head has got, so that each byte is
/// looked at once however the head is split across reads.
#[derive(Debug, Clone, Copy, Default)]
struct HeadScan {
    /// Bytes at the front of the caller's buffer already looked at.
    scanned: usize,
    /// Where the line being received starts.
    line_start: usize,
    /// Which line that is.
    line: HeadLine,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum HeadLine {
    /// Empty lines before the request line, skipped (RFC 9112 2.2, as httparse does).
    #[default]
    Leading,
    /// The request line.
    Request,
    /// A header field line, or the empty line that ends the head.
    Field,
}

impl HeadScan {
    fn is_fresh(&self) -> bool {
        self.scanned == 0 && self.line == HeadLine::Leading
    }

    /// The head's length once its empty line has arrived. Looks only at bytes
    /// after `scanned` (and back at the current line), within `max_header_bytes`.
    fn find_end(
        &mut self,
        buf: &[u8],
        max_header_bytes: usize,
    ) -> Result<Option<usize>, HttpError> {
        let window = &buf[..buf.len().min(max_header_bytes)];
        while self.scanned < window.len() {
            if self.line == HeadLine::Leading {
                if !self.skip_leading(window)? {
                    break;
                }
                continue;
            }
            let Some(offset) = window[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = window.len();
                break;
            };
            let lf = self.scanned + offset;
            self.scanned = lf + 1;
            if self.line_ends(window, lf)? {
                return Ok(Some(lf + 1));
            }
        }
        // Refuse to buffer an endless head instead of waiting forever.
        if buf.len() > max_header_bytes {
            return Err(HttpError::HeadersTooLarge);
        }
        Ok(None)
    }

    /// Steps over one empty line before the request line, or finds where the
    /// request line starts; `false` when it needs more bytes.
    fn skip_leading(&mut self, window: &[u8]) -> Result<bool, HttpError> {
        match window[self.scanned..] {
            [] | [b'\r'] => return Ok(false),
            [b'\n', ..] => self.scanned += 1,
            [b'\r', b'\n', ..] => self.scanned += 2,
            [b'\r', ..] => return Err(map_httparse(httparse::Error::NewLine)),
            // The method's first byte already tells non-HTTP (TLS, a wrong
            // port) from a request: answer 400 now, not at a limit or timeout.
            [first, ..] if !is_tchar(first) => return Err(map_httparse(httparse::Error::Token)),
            [_, ..] => {
                self.line = HeadLine::Request;
                self.line_start = self.scanned;
            }
        }
        Ok(true)
    }

    /// Handles the line that ends with the LF at `lf`; `true` when it is the
    /// empty line that ends the head.
    fn line_ends(&mut self, window: &[u8], lf: usize) -> Result<bool, HttpError> {
        let line = &window[self.line_start..lf];
        self.line_start = lf + 1;
        if self.line == HeadLine::Request {
            // Checked once, as soon as it is complete, so a bad method, target
            // or version is refused before the rest of the head arrives.
            let mut no_fields = [];
            httparse::Request::new(&mut no_fields)
                .parse(&window[..=lf])
                .map_err(map_httparse)?;
            self.line = HeadLine::Field;
            return Ok(false);
        }
        Ok(line.is_empty() || line == b"\r")
    }
}

/// RFC 9110 5.6.2 `tchar`, the bytes of a method token.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A request whose head is parsed and whose body is still arriving.
#[derive(Debug)]
struct PendingBody {
    /// The request, with an empty body until the body is complete.
    request: Request,
    /// The head carried `Expect: 100-continue`.
    expect_continue: bool,
    progress: BodyProgress,
}

impl PendingBody {
    /// Validates the request line and framing of a parsed head.
    fn from_head(
        parsed: &httparse::Request<'_, '_>,
        limits: &HttpLimits,
    ) -> Result<Self, HttpError> {
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
        let path = if raw_path.contains('%') {
            percent_decode_str(raw_path).decode_utf8_lossy()
        } else {
            Cow::Borrowed(raw_path)
        };
        let field_bytes = parsed
            .headers
            .iter()
            .map(|field| field.name.len() + field.value.len())
            .sum();
        let mut head = Head::new(&path, query, field_bytes, parsed.headers.len())?;
        let fields = HeadFields::collect(&mut head, parsed.headers)?;
        let progress = BodyProgress::new(fields.framing(limits)?);
        let request = Request {
            method: Method::from_token(method),
            version_minor,
            body: Bytes::new(),
            head,
        };
        Ok(Self {
            request,
            expect_continue: fields.expect_continue,
            progress,
        })
    }

    fn finish(self, body: Bytes) -> Request {
        Request {
            body,
            ..self.request
        }
    }
}

/// What framing and `Expect` need from a head's fields.
struct HeadFields {
    content_length: Option<u64>,
    /// Every `Transfer-Encoding` field, joined with commas.
    transfer_encoding: Option<String>,
    expect_continue: bool,
}

impl HeadFields {
    /// Copies `fields` into `head` and picks out the ones framing needs.
    fn collect(head: &mut Head, fields: &[httparse::Header<'_>]) -> Result<Self, HttpError> {
        let mut out = Self {
            content_length: None,
            transfer_encoding: None,
            expect_continue: false,
        };
        for field in fields {
            // Nearly every value is valid UTF-8, which `from_utf8` checks
            // faster than the lossy conversion walks it.
            let value = match std::str::from_utf8(field.value) {
                Ok(value) => Cow::Borrowed(value),
                Err(_) => String::from_utf8_lossy(field.value),
            };
            match head.push_field(field.name, &value)? {
                "content-length" => out.add_content_length(&value)?,
                "transfer-encoding" => {
                    let combined = out.transfer_encoding.get_or_insert_with(String::new);
                    if !combined.is_empty() {
                        combined.push(',');
                    }
                    combined.push_str(&value);
                }
                "expect" => out.expect_continue |= is_expect_continue(field),
                _ => {}
            }
        }
        Ok(out)
    }

    fn add_content_length(&mut self, value: &str) -> Result<(), HttpError> {
        // RFC 9112 6.3: a list of identical values is one value; anything else is fatal.
        for item in value.split(',') {
            let n = parse_content_length(item.trim())?;
            if self.content_length.is_some_and(|seen| seen != n) {
                return Err(HttpError::Malformed("conflicting content-length"));
            }
            self.content_length = Some(n);
        }
        Ok(())
    }

    fn framing(&self, limits: &HttpLimits) -> Result<BodyFraming, HttpError> {
        match (self.content_length, &self.transfer_encoding) {
            // RFC 9112 6.3: both is a smuggling vector; refuse rather than pick one.
            (Some(_), Some(_)) => Err(HttpError::Malformed(
                "both content-length and transfer-encoding",
            )),
            (None, Some(te)) => {
                let mut codings = te.split(',').map(str::trim).filter(|c| !c.is_empty());
                match (codings.next(), codings.next()) {
                    (Some(c), None) if c.eq_ignore_ascii_case("chunked") => {
                        Ok(BodyFraming::Chunked)
                    }
                    _ => Err(HttpError::UnsupportedTransferEncoding),
                }
            }
            (Some(n), None) => match usize::try_from(n) {
                Ok(n) if n <= limits.max_body_bytes => Ok(BodyFraming::Length(n)),
                _ => Err(HttpError::BodyTooLarge),
            },
            (None, None) => Ok(BodyFraming::Length(0)),
        }
    }
}

fn parse_content_length(text: &str) -> Result<u64, HttpError> {
    // `u64::from_str` accepts a leading '+', which RFC 9110 8.6 does not.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("invalid content-length"));
    }
    // Only digits remain, so the only failure is overflow: certainly too large.
    text.parse().map_err(|_| HttpError::BodyTooLarge)
}

/// How the body is delimited, from the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Length(usize),
    Chunked,
}

#[derive(Debug)]
enum BodyProgress {
    /// Waits until this many bytes are in the caller's buffer, then takes
    /// them: one length check per call.
    Length(usize),
    /// Boxed: most requests are not chunked, and the state is moved on
    /// every call.
    Chunked(Box<ChunkedBody>),
}

impl BodyProgress {
    fn new(framing: BodyFraming) -> Self {
        match framing {
            BodyFraming::Length(n) => BodyProgress::Length(n),
            BodyFraming::Chunked => BodyProgress::Chunked(Box::default()),
        }
    }

    /// Bytes consumed from the front of `buf`, and the body once complete.
    fn decode(
        &mut self,
        buf: &[u8],
        limits: &HttpLimits,
    ) -> Result<(usize, Option<Bytes>), HttpError> {
        match self {
            BodyProgress::Length(n) => Ok(match buf.get(..*n) {
                Some(body) => (*n, Some(Bytes::copy_from_slice(body))),
                None => (0, None),
            }),
            BodyProgress::Chunked(chunked) => chunked.decode(buf, limits),
        }
    }
}

/// A chunked body being decoded (RFC 9112 7.1): decoded bytes move out of the
/// caller's buffer into `body` as they arrive; trailers are checked, then dropped.
#[derive(Debug, Default)]
struct ChunkedBody {
    body: Vec<u8>,
    part: ChunkPart,
    /// Bytes of sizes, extensions, data and CRLFs consumed, bounded through
    /// `CHUNKED_OVERHEAD_FACTOR`.
    encoded: usize,
    /// Bytes of the unfinished line at the front of the caller's buffer
    /// already searched for its end.
    line_scanned: usize,
    /// Trailer section bytes consumed, bounded by `max_header_bytes`.
    trailer_bytes: usize,
    trailer_fields: usize,
}

#[derive(Debug, Clone, Copy, Default)]
enum ChunkPart {
    /// `size[;ext]CRLF`
    #[default]
    SizeLine,
    /// Chunk data, with this many bytes still to come.
    Data(usize),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer fields up to the empty line that ends the body.
    Trailers,
}

/// What one step of chunked decoding did.
enum Step {
    /// Consumed this many bytes; more may follow.
    Used(usize),
    /// Consumed this many bytes, the last of the body.
    Done(usize),
    /// Needs more bytes; consumed nothing.
    NeedMore,
}

impl ChunkedBody {
    fn decode(
        &mut self,
        buf: &[u8],
        limits: &HttpLimits,
    ) -> Result<(usize, Option<Bytes>), HttpError> {
        let max_encoded = limits
            .max_body_bytes
            .saturating_mul(CHUNKED_OVERHEAD_FACTOR)
            .saturating_add(limits.max_header_bytes);
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            let framing = !matches!(self.part, ChunkPart::Trailers);
            let step = match self.part {
                ChunkPart::SizeLine => self.size_line(rest, limits)?,
                ChunkPart::Data(left) => self.data(rest, left),
                ChunkPart::DataEnd => self.data_end(rest)?,
                ChunkPart::Trailers => self.trailer_line(rest, limits)?,
            };
            let n = match step {
                Step::Used(n) => n,
                Step::Done(n) => {
                    let body = Bytes::from(std::mem::take(&mut self.body));
                    return Ok((used + n, Some(body)));
                }
                Step::NeedMore => return Ok((used, None)),
            };
            used += n;
            if framing {
                self.encoded += n;
                if self.encoded > max_encoded {
                    return Err(HttpError::BodyTooLarge);
                }
            }
        }
    }

    fn size_line(&mut self, rest: &[u8], limits: &HttpLimits) -> Result<Step, HttpError> {
        // httparse ends a size line only at CRLF; a bare LF may sit in an extension.
        let Some(len) = self.find_line(rest, MAX_CHUNK_LINE_BYTES, true) else {
            return if rest.len() > MAX_CHUNK_LINE_BYTES {
                Err(HttpError::Malformed("chunk size line too long"))
            } else {
                Ok(Step::NeedMore)
            };
        };
        let size = match httparse::parse_chunk_size(&rest[..len]) {
            Ok(httparse::Status::Complete((_, size))) => size,
            _ => return Err(HttpError::Malformed("invalid chunk size")),
        };
        let room = limits.max_body_bytes.saturating_sub(self.body.len());
        self.part = match usize::try_from(size) {
            Ok(0) => ChunkPart::Trailers,
            Ok(size) if size <= room => ChunkPart::Data(size),
            _ => return Err(HttpError::BodyTooLarge),
        };
        Ok(Step::Used(len))
    }

    fn data(&mut self, rest: &[u8], left: usize) -> Step {
        let take = left.min(rest.len());
        if take == 0 {
            return Step::NeedMore;
        }
        self.body.extend_from_slice(&rest[..take]);
        self.part = if take == left {
            ChunkPart::DataEnd
        } else {
            ChunkPart::Data(left - take)
        };
        Step::Used(take)
    }

    fn data_end(&mut self, rest: &[u8]) -> Result<Step, HttpError> {
        match rest.get(..2) {
            None => Ok(Step::NeedMore),
            Some(b"\r\n") => {
                self.part = ChunkPart::SizeLine;
                Ok(Step::Used(2))
            }
            Some(_) => Err(HttpError::Malformed("chunk not followed by CRLF")),
        }
    }

    fn trailer_line(&mut self, rest: &[u8], limits: &HttpLimits) -> Result<Step, HttpError> {
        let room = limits.max_header_bytes.saturating_sub(self.trailer_bytes);
        let Some(len) = self.find_line(rest, room, false) else {
            return if rest.len() > room {
                Err(HttpError::HeadersTooLarge)
            } else {
                Ok(Step::NeedMore)
            };
        };
        let line = &rest[..len];
        if line == b"\n" || line == b"\r\n" {
            return Ok(Step::Done(len));
        }
        // One field line parses as an unfinished header section exactly when
        // it would be valid inside the whole section.
        if httparse::parse_headers(line, &mut [httparse::EMPTY_HEADER; 1]).is_err() {
            return Err(HttpError::Malformed("invalid trailer"));
        }
        self.trailer_fields += 1;
        if self.trailer_fields > MAX_TRAILER_FIELDS {
            return Err(HttpError::HeadersTooLarge);
        }
        self.trailer_bytes += len;
        Ok(Step::Used(len))
    }

    /// Length, through its LF, of the line at the front of `rest` once it has
    /// arrived within `cap` bytes. Searches only bytes not searched before.
    fn find_line(&mut self, rest: &[u8], cap: usize, crlf_only: bool) -> Option<usize> {
        let window = &rest[..rest.len().min(cap)];
        while let Some(offset) = window
            .get(self.line_scanned..)?
            .iter()
            .position(|&b| b == b'\n')
        {
            let lf = self.line_scanned + offset;
            self.line_scanned = lf + 1;
            if !crlf_only || (lf > 0 && window[lf - 1] == b'\r') {
                self.line_scanned = 0;
                return Some(lf + 1);
            }
        }
        self.line_scanned = window.len();
        None
    }
}

/// An HTTP/1.1 response under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, Cow<'static, str>)>,
    body: Bytes,
    keep_alive: bool,
    head_only: bool,
}

impl Response {
    /// An empty response with `status`, keeping the connection alive.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            content_type: None,
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
        let mut response = Self::new(status);
        response.content_type = Some(content_type);
        response.body = body.into();
        response
    }

    /// Adds a header. CR and LF in `value` become spaces, so a value can never
    /// split the head.
    pub fn header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        let mut value = value.into();
        if value.contains(['\r', '\n']) {
            value = Cow::Owned(value.replace(['\r', '\n'], " "));
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
    /// Written straight into one buffer of exactly its length: every
    /// keep-alive request (each `POST /publish` among them) pays for this,
    /// and a buffer with spare room would cost `Bytes` a second allocation.
    pub fn encode(&self) -> Bytes {
        let len = self.encoded_len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(b"HTTP/1.1 ");
        write_decimal(&mut out, u64::from(self.status));
        out.push(b' ');
        out.extend_from_slice(reason_phrase(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(content_type) = self.content_type {
            push_field(&mut out, "Content-Type", content_type);
        }
        for (name, value) in &self.headers {
            push_field(&mut out, name, value);
        }
        if self.has_content_length() {
            out.extend_from_slice(CONTENT_LENGTH);
            write_decimal(&mut out, self.body.len() as u64);
            out.extend_from_slice(b"\r\n");
        }
        if !self.keep_alive {
            out.extend_from_slice(CONNECTION_CLOSE);
        }
        out.extend_from_slice(b"\r\n");
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        debug_assert_eq!(out.len(), len, "encoded_len disagrees with encode");
        Bytes::from(out)
    }

    /// How many bytes [`Response::encode`] writes.
    fn encoded_len(&self) -> usize {
        let field = |name: &str, value: &str| name.len() + value.len() + 4;
        let status_line = "HTTP/1.1 ".len()
            + decimal_len(u64::from(self.status))
            + 1
            + reason_phrase(self.status).len()
            + 2;
        let content_type = self.content_type.map_or(0, |ct| field("Content-Type", ct));
        let headers: usize = self.headers.iter().map(|(n, v)| field(n, v)).sum();
        let content_length = if self.has_content_length() {
            CONTENT_LENGTH.len() + decimal_len(self.body.len() as u64) + 2
        } else {
            0
        };
        let close = if self.keep_alive {
            0
        } else {
            CONNECTION_CLOSE.len()
        };
        let body = if self.head_only { 0 } else { self.body.len() };
        status_line + content_type + headers + content_length + close + 2 + body
    }

    /// RFC 9110 8.6: no Content-Length on 1xx and 204.
    fn has_content_length(&self) -> bool {
        !(100..200).contains(&self.status) && self.status != 204
    }
}

const CONTENT_LENGTH: &[u8] = b"Content-Length: ";
const CONNECTION_CLOSE: &[u8] = b"Connection: close\r\n";

/// Digits of `n` in decimal.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
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
        assert_eq!(req.path(), "/ws/a b");
        assert_eq!(req.query(), "user_id=42&x=1");
        assert_eq!(req.version_minor, 1);
        assert_eq!(req.header("x-thing"), Some("Yes"));
        assert_eq!(req.query_param("user_id").as_deref(), Some("42"));
        assert_eq!(req.query_param("nope"), None);
        assert!(req.body.is_empty());
        assert!(req.keep_alive());
    }

    #[test]
    fn invalid_utf_8_in_the_path_or_a_value_becomes_replacement_characters() {
        let (req, _) =
            complete(b"GET /a%FFb%2F?x=%FF HTTP/1.1\r\nX-Raw: caf\xe9\r\nHost: h\r\n\r\n");
        assert_eq!(req.path(), "/a\u{FFFD}b/");
        assert_eq!(req.query(), "x=%FF");
        assert_eq!(req.header("x-raw"), Some("caf\u{FFFD}"));
        assert_eq!(req.header("host"), Some("h"));
        let fields: Vec<_> = req.headers().collect();
        assert_eq!(fields, [("x-raw", "caf\u{FFFD}"), ("host", "h")]);
    }

    #[test]
    fn query_params_decode_plus_and_percent() {
        let (req, _) = complete(b"GET /?q=a+b%2Bc&flag&t=%E2%9C%93 HTTP/1.1\r\n\r\n");
        assert_eq!(req.query_param("q").as_deref(), Some("a b+c"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("t").as_deref(), Some("\u{2713}"));
        let (req, _) = complete(b"GET /?topic=a&x=1&topic=b%2Fc&topic= HTTP/1.1\r\n\r\n");
        let topics: Vec<String> = req.query_params("topic").collect();
        assert_eq!(topics, ["a", "b/c", ""]);
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let buf = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\nGET /x";
        let (first, used) = complete(buf);
        assert_eq!(first.method, Method::Post);
        assert_eq!(&first.body[..], b"hello");
        let (second, used2) = complete(&buf[used..]);
        assert_eq!(second.path(), "/health");
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

    /// Everything decoded from `data` delivered in pieces ending at `cuts`,
    /// the way a connection would: keep what was not consumed, append, call
    /// again after each complete request. Also the most bytes ever held.
    fn decode_in_pieces(
        data: &[u8],
        cuts: &[usize],
        limits: HttpLimits,
    ) -> (Vec<Request>, Option<HttpError>, usize) {
        let mut decoder = RequestDecoder::new(limits);
        let (mut pending, mut requests, mut most_held) = (Vec::new(), Vec::new(), 0);
        let mut from = 0;
        for to in cuts.iter().copied().chain([data.len()]) {
            let to = to.clamp(from, data.len());
            pending.extend_from_slice(&data[from..to]);
            from = to;
            most_held = most_held.max(pending.len());
            loop {
                match decoder.decode(&pending) {
                    Ok((used, request)) => {
                        pending.drain(..used);
                        match request {
                            Some(request) => requests.push(request),
                            None => break,
                        }
                    }
                    Err(e) => return (requests, Some(e), most_held),
                }
            }
        }
        (requests, None, most_held)
    }

    /// Everything `parse_request` finds in `data` read at once.
    fn decode_at_once(data: &[u8], limits: HttpLimits) -> (Vec<Request>, Option<HttpError>) {
        let (mut rest, mut requests) = (data, Vec::new());
        loop {
            match parse_request(rest, &limits) {
                Ok(Decoded::Complete(request, used)) => {
                    requests.push(request);
                    rest = &rest[used..];
                }
                Ok(Decoded::Partial) => return (requests, None),
                Err(e) => return (requests, Some(e)),
            }
        }
    }

    fn one_byte_cuts(data: &[u8]) -> Vec<usize> {
        (1..data.len()).collect()
    }

    #[test]
    fn a_request_fed_one_byte_at_a_time_decodes_like_one_read() {
        for data in [
            &b"GET /ws/a%20b?user_id=42 HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\r\n\nGET / HTTP/1.0\nHost: x\n\nGET /b HTTP/1.1\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\n",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"a\nb\"\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT",
        ] {
            let whole = decode_at_once(data, HttpLimits::default());
            let (requests, error, _) = decode_in_pieces(data, &one_byte_cuts(data), HttpLimits::default());
            assert_eq!((requests, error), whole, "{:?}", String::from_utf8_lossy(data));
            assert!(!whole.0.is_empty());
        }
    }

    #[test]
    fn the_head_is_consumed_once_complete_and_a_length_body_waits_in_the_buffer() {
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        let head = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(decoder.decode(&head[..10]), Ok((0, None)));
        assert!(decoder.in_request());
        assert_eq!(decoder.decode(head), Ok((head.len(), None)));
        assert_eq!(decoder.decode(b"hel"), Ok((0, None)));
        let (used, request) = decoder.decode(b"helloGET").unwrap();
        assert_eq!((used, &request.unwrap().body[..]), (5, &b"hello"[..]));
        assert!(!decoder.in_request(), "ready for the next request");
    }

    #[test]
    fn a_chunked_body_is_consumed_as_it_is_decoded() {
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        let head = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(decoder.decode(head), Ok((head.len(), None)));
        assert_eq!(
            decoder.decode(b"a;ext"),
            Ok((0, None)),
            "size line not complete"
        );
        assert_eq!(decoder.decode(b"a;ext\r\n0123"), Ok((11, None)));
        assert_eq!(
            decoder.decode(b"456789\r"),
            Ok((6, None)),
            "CRLF waits for both bytes"
        );
        assert_eq!(decoder.decode(b"\r\n0\r\n"), Ok((5, None)));
        let (used, request) = decoder.decode(b"\r\nGET").unwrap();
        assert_eq!((used, &request.unwrap().body[..]), (2, &b"0123456789"[..]));
    }

    #[test]
    fn expect_continue_holds_from_a_complete_head_until_the_body_is_complete() {
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        let head = b"POST /publish HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(decoder.decode(&head[..head.len() - 1]), Ok((0, None)));
        assert!(!decoder.expects_continue(), "head not complete yet");
        assert_eq!(decoder.decode(head), Ok((head.len(), None)));
        assert!(decoder.expects_continue());
        assert!(decoder.decode(b"{}").unwrap().1.is_some());
        assert!(!decoder.expects_continue());

        let mut whole = head.to_vec();
        whole.extend_from_slice(b"{}");
        assert!(decoder.decode(&whole).unwrap().1.is_some());
        assert!(!decoder.expects_continue(), "body came with the head");
        let plain = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(decoder.decode(plain), Ok((plain.len(), None)));
        assert!(!decoder.expects_continue());
    }

    #[test]
    fn only_bytes_of_a_request_count_as_in_request() {
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        assert!(!decoder.in_request());
        assert_eq!(decoder.decode(b"\r\n\r"), Ok((0, None)));
        assert!(
            !decoder.in_request(),
            "empty lines before a request are ignored"
        );
        assert_eq!(decoder.decode(b"\r\n\r\nG"), Ok((0, None)));
        assert!(decoder.in_request());
    }

    #[test]
    fn garbage_is_refused_at_its_first_byte_or_line_not_at_the_head_limit() {
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(decoder.decode(tls_hello).unwrap_err().status(), 400);
        for (line, status) in [
            (&b"SSH-2.0-OpenSSH_9.6\r\n"[..], 400),
            (b"GET / HTTP/2.0\r\n", 505),
            (b"GET /\r\n", 400),
        ] {
            let mut decoder = RequestDecoder::new(HttpLimits::default());
            assert_eq!(decoder.decode(&line[..1]), Ok((0, None)));
            assert_eq!(decoder.decode(line).unwrap_err().status(), status);
        }
    }

    #[test]
    fn a_mebibyte_in_one_byte_chunks_is_decoded_with_the_caller_holding_a_few_bytes() {
        const BODY_BYTES: usize = 1024 * 1024;
        let mut data = b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for i in 0..BODY_BYTES {
            data.extend_from_slice(b"1\r\n");
            data.push(b'a' + (i % 26) as u8);
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b"0\r\n\r\n");
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        let (mut held, mut most_held, mut body) = (Vec::new(), 0, None);
        // The head arrives in one read, then the body one byte per read.
        let (head, chunks) = data.split_at(data.len() - BODY_BYTES * 6 - 5);
        assert_eq!(decoder.decode(head), Ok((head.len(), None)));
        for &byte in chunks {
            held.push(byte);
            most_held = most_held.max(held.len());
            let (used, request) = decoder.decode(&held).unwrap();
            held.drain(..used);
            body = body.or(request.map(|r| r.body));
        }
        let body = body.expect("complete");
        assert_eq!(body.len(), BODY_BYTES);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8));
        assert!(held.is_empty());
        // A size line waits for its CRLF, a chunk's CRLF for both bytes.
        assert!(most_held <= 3, "held {most_held} bytes");
    }

    #[test]
    fn chunk_size_lines_and_trailers_have_bounds() {
        let head = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let endless_ext = [
            head.clone(),
            b"1;".to_vec(),
            vec![b'x'; MAX_CHUNK_LINE_BYTES],
        ]
        .concat();
        assert_eq!(
            parse(&endless_ext),
            Err(HttpError::Malformed("chunk size line too long"))
        );
        let many_trailers = [
            head.clone(),
            b"0\r\n".to_vec(),
            b"T: 1\r\n".repeat(MAX_TRAILER_FIELDS + 1),
        ]
        .concat();
        assert_eq!(parse(&many_trailers), Err(HttpError::HeadersTooLarge));
        let bad_trailer = [head.clone(), b"0\r\nNo Colon\r\n".to_vec()].concat();
        assert_eq!(
            parse(&bad_trailer),
            Err(HttpError::Malformed("invalid trailer"))
        );
        let limits = HttpLimits {
            max_body_bytes: 2,
            max_header_bytes: 128,
            ..HttpLimits::default()
        };
        let long_extensions = [
            head.clone(),
            format!("1;{}\r\na\r\n", "e".repeat(100))
                .repeat(2)
                .into_bytes(),
        ]
        .concat();
        assert_eq!(
            parse_request(&long_extensions, &limits),
            Err(HttpError::BodyTooLarge)
        );
    }

    /// A request with a random method, path, fields and framing; chunked
    /// bodies get random chunk sizes, extensions and trailers.
    fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
        let fields = proptest::collection::vec(("[A-Za-z-]{1,8}", "[ -~]{0,12}"), 0..4);
        let body = proptest::collection::vec(any::<u8>(), 0..96);
        let chunks =
            proptest::collection::vec((1usize..24, proptest::option::of("[a-z=\"; ]{0,8}")), 1..8);
        (
            ("(GET|POST|X)", "/[a-z%0-9?=&+]{0,12}", "(0|1)"),
            fields,
            body,
            any::<bool>(),
            chunks,
            any::<bool>(),
        )
            .prop_map(
                |((method, path, minor), fields, body, chunked, chunks, trailer)| {
                    let mut out = format!("{method} {path} HTTP/1.{minor}\r\n").into_bytes();
                    for (name, value) in fields {
                        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                    }
                    if !chunked {
                        out.extend_from_slice(
                            format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        );
                        out.extend_from_slice(&body);
                        return out;
                    }
                    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    let mut rest = &body[..];
                    for (size, ext) in chunks.iter().cycle().take(body.len()) {
                        if rest.is_empty() {
                            break;
                        }
                        let (chunk, after) = rest.split_at((*size).min(rest.len()));
                        let ext = ext.as_deref().map(|e| format!(";{e}")).unwrap_or_default();
                        out.extend_from_slice(format!("{:X}{ext}\r\n", chunk.len()).as_bytes());
                        out.extend_from_slice(chunk);
                        out.extend_from_slice(b"\r\n");
                        rest = after;
                    }
                    out.extend_from_slice(if trailer {
                        &b"0\r\nX-T: 1\r\n\r\n"[..]
                    } else {
                        b"0\r\n\r\n"
                    });
                    out
                },
            )
    }

    proptest! {
        #[test]
        fn requests_split_anywhere_decode_like_one_read(
            first in request_strategy(),
            second in request_strategy(),
            pipelined in any::<bool>(),
            damage in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
            mut cuts in proptest::collection::vec(0usize..600, 0..12),
        ) {
            let mut data = first;
            if pipelined {
                data.extend_from_slice(&second);
            }
            if let Some((at, byte)) = damage {
                let at = at.index(data.len());
                data[at] = byte;
            }
            cuts.sort_unstable();
            let limits = HttpLimits { max_header_bytes: 256, max_headers: 8, max_body_bytes: 64 };
            let (requests, error, _) = decode_in_pieces(&data, &cuts, limits);
            prop_assert_eq!((requests, error), decode_at_once(&data, limits));
            if damage.is_none() {
                let (requests, error) = decode_at_once(&data, HttpLimits::default());
                prop_assert_eq!((requests.len(), error), (1 + usize::from(pipelined), None));
            }
        }

        #[test]
        fn requests_fed_one_byte_at_a_time_decode_like_one_read(first in request_strategy()) {
            let limits = HttpLimits::default();
            let (requests, error, _) = decode_in_pieces(&first, &one_byte_cuts(&first), limits);
            prop_assert_eq!((requests, error), decode_at_once(&first, limits));
        }
    }
}
