//! Sans-IO protocol core: HTTP/1.1 request parsing, the RFC 6455 server
//! handshake, WebSocket framing and the JSON relay messages, all as pure code
//! over byte buffers. Nothing here knows a socket, a runtime or a clock; the
//! shard loop feeds bytes in and writes the returned bytes out.

pub mod deflate;
pub mod event_stream;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod message;
pub mod origin;

/// Outcome of decoding from the front of a buffer. Short input is not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The value and how many bytes it used.
    Complete(T, usize),
    /// More bytes are needed; nothing was consumed.
    Partial,
}

impl<T> Decoded<T> {
    /// Maps the decoded value, keeping the byte count.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::Complete(value, used) => Decoded::Complete(f(value), used),
            Decoded::Partial => Decoded::Partial,
        }
    }

    /// Whether a complete value was decoded.
    pub fn is_complete(&self) -> bool {
        matches!(self, Decoded::Complete(..))
    }
}
