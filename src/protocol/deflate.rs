//! permessage-deflate (RFC 7692), sans-IO: the negotiation of a
//! `Sec-WebSocket-Extensions` offer, the server's compressor, and a
//! client's decompressor with bounded output.
//!
//! The server always answers with `server_no_context_takeover`: each
//! message it sends is compressed on its own, so the compressed bytes of
//! one publication are valid for every subscriber that negotiated the
//! extension, and are made once and shared like the plain frame. For the
//! same reason it compresses with one window (32 KiB) and declines an
//! offer that asks it to use a smaller one (`server_max_window_bits` under
//! 15): a client that offers another one too gets that one.
//!
//! The answer also always carries `client_no_context_takeover`, which RFC
//! 7692 (7.1.1.1) lets a server ask for when the client did not offer it:
//! each client message is then compressed on its own too, so one
//! decompressor per shard, reset after every message, reads them all, and
//! no client can make the node keep a window (some 44 KiB) per connection.
//! A gateway's clients send little and receive much, so the compression
//! this costs them on what they send is small.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The four bytes a sync flush ends with, removed from each message on
/// the wire (RFC 7692 7.2.1) and put back before decompressing.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What was agreed with a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The client offered `client_no_context_takeover` itself (the answer
    /// asks for it either way).
    pub client_no_context_takeover: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the response: neither side
    /// takes its context over from one message to the next.
    pub fn response(&self) -> &'static str {
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    }
}

/// The first offer of permessage-deflate in `header` (a
/// `Sec-WebSocket-Extensions` value, offers separated by `,`) that the
/// server can accept; `None` if there is none. An offer with an unknown,
/// repeated or invalid parameter is declined (RFC 7692 5.1).
pub fn negotiate<'a>(headers: impl Iterator<Item = &'a str>) -> Option<Agreed> {
    headers
        .flat_map(|value| value.split(','))
        .find_map(|offer| accept_offer(offer.trim()))
}

fn accept_offer(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut agreed = Agreed {
        client_no_context_takeover: false,
    };
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) => {}
            ("client_no_context_takeover", None) => agreed.client_no_context_takeover = true,
            // The server compresses with one window for every subscriber.
            ("server_max_window_bits", Some(bits)) => {
                if window_bits(bits)? != 15 {
                    return None;
                }
            }
            // The client may limit its own window: any is read.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window_bits(bits)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(agreed)
}

/// A window-bits value: 8 to 15, digits only.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 2 {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// The server's compressor: one per shard, reset for every message.
pub struct Deflater {
    compress: Compress,
}

impl Default for Deflater {
    fn default() -> Deflater {
        Deflater {
            // Raw deflate (no zlib header), as the extension sends it. The
            // default level: a publication is compressed once for all of
            // its subscribers, so bytes saved count more than the time.
            compress: Compress::new(Compression::default(), false),
        }
    }
}

impl Deflater {
    /// Compresses one message on its own (no context taken over), without
    /// the sync flush's tail: what goes in the frame.
    pub fn message(&mut self, payload: &[u8]) -> Vec<u8> {
        self.compress.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut input = payload;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(256));
            }
            let before = self.compress.total_in();
            self.compress
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("compressing into a vector cannot fail");
            input = &input[(self.compress.total_in() - before) as usize..];
            // Room left over: the flush is complete.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        debug_assert!(out.ends_with(&TAIL), "a sync flush ends with its tail");
        out.truncate(out.len() - TAIL.len());
        out
    }
}

/// A compressed message that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the message limit (close 1009).
    #[error("compressed message inflates past the message limit")]
    TooBig,
    /// It is not valid deflate data (close 1007 for a text message's bytes,
    /// 1002 here: the framing of the extension was broken).
    #[error("compressed message is not valid deflate data")]
    Invalid,
}

/// A decompressor of client messages. The server asks every client not to
/// take its context over, so one per shard, reset after each message
/// (`Agreed`), reads every client's; one that keeps the context (for a
/// client that was not asked) is there for the RFC's examples and tests.
pub struct Inflater {
    decompress: Decompress,
    /// Reset after each message: the client agreed not to take its
    /// context over.
    reset_each: bool,
}

impl Inflater {
    pub fn new(agreed: Agreed) -> Inflater {
        Inflater {
            decompress: Decompress::new(false),
            reset_each: agreed.client_no_context_takeover,
        }
    }

    /// Bytes it holds, for the connection's memory: the decompressor's
    /// state with its window (miniz_oxide's inflate state is about 43 KiB).
    pub const BYTES: usize = 44 * 1024;

    /// Inflates one message (its frames' payloads joined), refusing one
    /// that would pass `max` bytes as soon as it does.
    pub fn message(&mut self, compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        let mut input = Vec::with_capacity(compressed.len() + TAIL.len());
        input.extend_from_slice(compressed);
        input.extend_from_slice(&TAIL);
        let mut out = Vec::new();
        let result = self.inflate(&input, &mut out, max);
        // A final block ends the client's stream: the next message starts
        // a new one.
        if self.reset_each || !matches!(result, Ok(false)) {
            self.decompress.reset(false);
        }
        result.map(|_| out)
    }

    /// Inflates `input` into `out`, within `max`; true if the stream ended
    /// (a final block).
    fn inflate(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<bool, InflateError> {
        loop {
            if out.len() == out.capacity() {
                if out.len() >= max {
                    return self.nothing_more(input).map(|()| false);
                }
                let grow = out.len().max(256).min(max - out.len());
                out.reserve_exact(grow);
            }
            let (before_in, before_out) = (self.decompress.total_in(), self.decompress.total_out());
            let status = self
                .decompress
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            let used = (self.decompress.total_in() - before_in) as usize;
            let produced = self.decompress.total_out() > before_out;
            input = &input[used..];
            let room = out.len() < out.capacity();
            match status {
                Status::StreamEnd => return Ok(true),
                _ if input.is_empty() && room => return Ok(false),
                _ if used == 0 && !produced && room => return Err(InflateError::Invalid),
                _ => {}
            }
        }
    }

    /// At the limit: an error if the rest of the message would give one
    /// byte more.
    fn nothing_more(&mut self, mut input: &[u8]) -> Result<(), InflateError> {
        let mut probe = [0u8; 1];
        loop {
            let (before_in, before_out) = (self.decompress.total_in(), self.decompress.total_out());
            self.decompress
                .decompress(input, &mut probe, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if self.decompress.total_out() > before_out {
                return Err(InflateError::TooBig);
            }
            let used = (self.decompress.total_in() - before_in) as usize;
            if used == 0 {
                return Ok(());
            }
            input = &input[used..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(header: &str) -> Option<Agreed> {
        negotiate(std::iter::once(header))
    }

    #[test]
    fn offers_the_server_can_keep_are_accepted_others_declined() {
        let plain = Agreed {
            client_no_context_takeover: false,
        };
        assert_eq!(offer("permessage-deflate"), Some(plain));
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits"),
            Some(plain),
            "what browsers send"
        );
        assert_eq!(
            offer("permessage-deflate; client_no_context_takeover; server_no_context_takeover"),
            Some(Agreed {
                client_no_context_takeover: true
            })
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=15"),
            Some(plain)
        );
        assert_eq!(offer("permessage-deflate; server_max_window_bits=10"), None);
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            Some(plain),
            "the next offer is taken"
        );
        for bad in [
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=07",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; foo",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        assert_eq!(
            plain.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "both sides compress each message on its own"
        );
    }

    #[test]
    fn the_rfc_examples_inflate_with_and_without_context() {
        // RFC 7692 7.2.3.1: "Hello", one message.
        let agreed = Agreed {
            client_no_context_takeover: false,
        };
        let mut inflater = Inflater::new(agreed);
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflater.message(&hello, 100).unwrap(), b"Hello");
        // 7.2.3.2: the second "Hello" refers back to the first one.
        let again = [0xf2, 0x00, 0x11, 0x00, 0x00];
        assert_eq!(inflater.message(&again, 100).unwrap(), b"Hello");
        // Without context takeover the second cannot be read alone.
        let mut reset = Inflater::new(Agreed {
            client_no_context_takeover: true,
        });
        assert_eq!(reset.message(&hello, 100).unwrap(), b"Hello");
        let alone = reset.message(&again, 100);
        assert_ne!(
            alone.ok().as_deref(),
            Some(&b"Hello"[..]),
            "no context kept"
        );
    }

    #[test]
    fn compressed_messages_stand_alone_and_round_trip() {
        let mut deflater = Deflater::default();
        let text =
            br#"{"type":"push","topic":"t","event":"e","payload":"aaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        let first = deflater.message(text);
        let second = deflater.message(text);
        assert_eq!(first, second, "no context carried from one to the next");
        assert!(first.len() < text.len());
        assert!(!first.ends_with(&TAIL));
        let mut inflater = Inflater::new(Agreed {
            client_no_context_takeover: true,
        });
        assert_eq!(inflater.message(&first, 1000).unwrap(), text);
        let big: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let packed = deflater.message(&big);
        assert_eq!(inflater.message(&packed, big.len()).unwrap(), big);
        assert_eq!(deflater.message(b""), deflater.message(b""));
        assert_eq!(inflater.message(&deflater.message(b""), 10).unwrap(), b"");
    }

    #[test]
    fn a_zip_bomb_is_refused_at_the_limit_and_garbage_is_invalid() {
        let mut deflater = Deflater::default();
        let zeros = vec![0u8; 10 << 20];
        let bomb = deflater.message(&zeros);
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let mut inflater = Inflater::new(Agreed {
            client_no_context_takeover: false,
        });
        assert_eq!(
            inflater.message(&bomb, 64 * 1024),
            Err(InflateError::TooBig)
        );
        let small = deflater.message(&zeros[..1000]);
        assert_eq!(
            inflater.message(&small, 64 * 1024).unwrap(),
            vec![0u8; 1000],
            "the context was reset after the refusal"
        );
        let exact = deflater.message(&zeros[..4096]);
        assert_eq!(inflater.message(&exact, 4096).unwrap().len(), 4096);
        assert_eq!(inflater.message(&exact, 4095), Err(InflateError::TooBig));
        assert_eq!(
            inflater.message(&[0xff, 0xff, 0xff, 0xff, 0x00], 100),
            Err(InflateError::Invalid)
        );
    }
}
