//! WebSocket frames on the server side (RFC 6455 section 5): decoding masked
//! client frames into messages with fragment reassembly, and encoding unmasked
//! server frames into `Bytes` that can be shared by every subscriber. The
//! decoder holds only reassembly state; it owns no buffer of unread input and
//! answers the ping/close dance to nobody: the caller decides what to send.

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use super::Decoded;

/// Largest payload of a control frame (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest close reason: the control payload minus the 2-byte code (RFC 6455 5.5.1).
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Largest header of an unmasked server frame: 2 bytes plus a 64-bit length.
const MAX_SERVER_HEADER: usize = 10;

/// Size and reassembly limits for client frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest payload of a single frame. Default 64 KiB; a frame over it is
    /// refused as soon as its header arrives, before any payload is buffered.
    pub max_frame_bytes: usize,
    /// Largest reassembled message. Default 64 KiB; bounds the reassembly
    /// buffer each connection may hold.
    pub max_message_bytes: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_message_bytes: 64 * 1024,
        }
    }
}

/// One decoded unit from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message; the bytes are valid UTF-8.
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// An unsolicited or answering pong.
    Pong(Bytes),
    /// A close frame with its code and reason, if the frame carried one.
    Close(Option<(u16, String)>),
    /// A non-final data fragment was absorbed into the reassembly buffer;
    /// nothing to act on, call again with the rest of the input.
    Fragment,
    /// A complete message whose first frame set RSV1 (permessage-deflate,
    /// when negotiated): its payload is still compressed, and a text
    /// message's UTF-8 is checked once it is inflated.
    Compressed {
        /// A text message (else binary).
        is_text: bool,
        /// The frames' payloads, joined.
        payload: Bytes,
    },
}

/// Why the client's frames are refused; close the connection with
/// [`FrameError::close_code`] and stop reading.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The client broke RFC 6455 framing rules: close with 1002.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or reassembled message over the configured limit: close with 1009.
    #[error("frame or message too big")]
    TooBig,
    /// A text message or close reason that is not UTF-8: close with 1007.
    #[error("invalid UTF-8 in text message or close reason")]
    InvalidUtf8,
}

impl FrameError {
    /// The close code to send (RFC 6455 7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::TooBig => 1009,
            FrameError::InvalidUtf8 => 1007,
        }
    }
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct OpenMessage {
    is_text: bool,
    /// Its first frame set RSV1: compressed.
    compressed: bool,
    payload: Vec<u8>,
}

/// Decodes client frames one at a time, reassembling fragmented messages.
///
/// Sixteen bytes: every WebSocket keeps one for its whole life, and only a
/// fragmented message in progress needs more (boxed).
#[derive(Debug)]
pub struct FrameDecoder {
    /// Limits, at most 4 GiB each (a larger setting is clamped).
    max_frame_bytes: u32,
    max_message_bytes: u32,
    open: Option<Box<OpenMessage>>,
}

/// A parsed frame header.
struct Header {
    is_final: bool,
    /// RSV1: a compressed message's first frame.
    compressed: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl FrameDecoder {
    /// A decoder with no message in progress.
    pub fn new(limits: FrameLimits) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            max_frame_bytes: clamp(limits.max_frame_bytes),
            max_message_bytes: clamp(limits.max_message_bytes),
            open: None,
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> FrameLimits {
        FrameLimits {
            max_frame_bytes: self.max_frame_bytes as usize,
            max_message_bytes: self.max_message_bytes as usize,
        }
    }

    /// Whether a fragmented message is partly received.
    pub fn in_message(&self) -> bool {
        self.open.is_some()
    }

    /// Bytes kept of a fragmented message being reassembled; the caller
    /// charges them to its inbound budget.
    pub fn held_bytes(&self) -> usize {
        self.open.as_ref().map_or(0, |m| {
            std::mem::size_of::<OpenMessage>() + m.payload.capacity()
        })
    }

    /// Decodes one frame from the front of `input`.
    ///
    /// Returns `Complete(item, used)` for a control frame, a frame completing a
    /// message, or [`Incoming::Fragment`] for an absorbed non-final fragment;
    /// `Partial` (state untouched) when the frame is not all there yet.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded<Incoming>, FrameError> {
        self.decode_with(input, false)
    }

    /// [`FrameDecoder::decode`] on a connection that negotiated
    /// permessage-deflate (`deflate`): the first frame of a data message may
    /// set RSV1, and the message comes out as [`Incoming::Compressed`].
    pub fn decode_with(
        &mut self,
        input: &[u8],
        deflate: bool,
    ) -> Result<Decoded<Incoming>, FrameError> {
        let Some(header) = self.parse_header(input, deflate)? else {
            return Ok(Decoded::Partial);
        };
        let end = header.header_len + header.payload_len;
        let Some(masked) = input.get(header.header_len..end) else {
            return Ok(Decoded::Partial);
        };
        let item = match header.opcode {
            OpCode::Control(control) => {
                let mut payload = Vec::with_capacity(masked.len());
                unmask_extend(&mut payload, masked, header.mask);
                match control {
                    Control::Ping => Incoming::Ping(Bytes::from(payload)),
                    Control::Pong => Incoming::Pong(Bytes::from(payload)),
                    Control::Close => Incoming::Close(parse_close(&payload)?),
                    Control::Reserved(_) => return Err(FrameError::Protocol("reserved opcode")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(open) = self.open.as_mut() else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                unmask_extend(&mut open.payload, masked, header.mask);
                if header.is_final {
                    match self.open.take() {
                        Some(open) if open.compressed => Incoming::Compressed {
                            is_text: open.is_text,
                            payload: Bytes::from(open.payload),
                        },
                        Some(open) => finish(open.is_text, open.payload)?,
                        None => return Err(FrameError::Protocol("continuation without a message")),
                    }
                } else {
                    Incoming::Fragment
                }
            }
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                let is_text = data == Data::Text;
                let mut payload = Vec::with_capacity(masked.len());
                unmask_extend(&mut payload, masked, header.mask);
                if header.is_final && header.compressed {
                    Incoming::Compressed {
                        is_text,
                        payload: Bytes::from(payload),
                    }
                } else if header.is_final {
                    finish(is_text, payload)?
                } else {
                    self.open = Some(Box::new(OpenMessage {
                        is_text,
                        compressed: header.compressed,
                        payload,
                    }));
                    Incoming::Fragment
                }
            }
            OpCode::Data(Data::Reserved(_)) => return Err(FrameError::Protocol("reserved opcode")),
        };
        Ok(Decoded::Complete(item, end))
    }

    /// Parses and validates a header; `None` when more bytes are needed.
    /// Size limits are checked here so an oversized frame fails before its
    /// payload is buffered.
    fn parse_header(&self, input: &[u8], deflate: bool) -> Result<Option<Header>, FrameError> {
        let (Some(&b0), Some(&b1)) = (input.first(), input.get(1)) else {
            return Ok(None);
        };
        let is_final = b0 & 0x80 != 0;
        let opcode = OpCode::from(b0 & 0x0F);
        // RSV2 and RSV3 are never negotiated; RSV1 only by
        // permessage-deflate, and only on a data message's first frame
        // (RFC 6455 5.2, RFC 7692 6.1).
        let compressed = b0 & 0x40 != 0;
        let first_data = matches!(opcode, OpCode::Data(Data::Text | Data::Binary));
        if b0 & 0x30 != 0 || (compressed && !(deflate && first_data)) {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            // RFC 6455 5.1: a server must close on an unmasked client frame.
            return Err(FrameError::Protocol("client frame not masked"));
        }
        let (payload_len, len_bytes) = match b1 & 0x7F {
            126 => match input.get(2..4) {
                Some(&[hi, lo]) => (u64::from(u16::from_be_bytes([hi, lo])), 2),
                _ => return Ok(None),
            },
            127 => match input.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                Some(bytes) => {
                    let len = u64::from_be_bytes(bytes);
                    if len >> 63 != 0 {
                        return Err(FrameError::Protocol("payload length has the high bit set"));
                    }
                    (len, 8)
                }
                None => return Ok(None),
            },
            short => (u64::from(short), 0),
        };

        match opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(FrameError::Protocol("reserved opcode"));
            }
            OpCode::Control(_) => {
                if !is_final {
                    return Err(FrameError::Protocol("fragmented control frame"));
                }
                if payload_len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(FrameError::Protocol("control frame payload over 125 bytes"));
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(open) = &self.open else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                self.check_size(payload_len, open.payload.len())?;
            }
            OpCode::Data(_) => {
                if self.open.is_some() {
                    return Err(FrameError::Protocol(
                        "new message inside a fragmented message",
                    ));
                }
                self.check_size(payload_len, 0)?;
            }
        }
        let payload_len = usize::try_from(payload_len).map_err(|_| FrameError::TooBig)?;

        let mask_at = 2 + len_bytes;
        let Some(mask) = input
            .get(mask_at..mask_at + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
        else {
            return Ok(None);
        };
        Ok(Some(Header {
            is_final,
            compressed,
            opcode,
            mask,
            header_len: mask_at + 4,
            payload_len,
        }))
    }

    fn check_size(&self, payload_len: u64, already: usize) -> Result<(), FrameError> {
        let max_frame = u64::from(self.max_frame_bytes);
        let max_message = u64::from(self.max_message_bytes);
        if payload_len > max_frame || payload_len.saturating_add(already as u64) > max_message {
            return Err(FrameError::TooBig);
        }
        Ok(())
    }
}

/// Turns a complete data payload into a message, validating text.
fn finish(is_text: bool, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if is_text {
        if std::str::from_utf8(&payload).is_err() {
            return Err(FrameError::InvalidUtf8);
        }
        Ok(Incoming::Text(Bytes::from(payload)))
    } else {
        Ok(Incoming::Binary(Bytes::from(payload)))
    }
}

/// Parses a close payload (RFC 6455 5.5.1, 7.4).
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 7.4.1, 7.4.2):
/// 1004-1006 and 1015 are reserved for local use; 1012-1014 came later via
/// IANA and Autobahn still expects peers to refuse them.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// XORs `mask` over `buf` in place, as if `buf` started at payload offset 0.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // chunks_exact_mut yields exactly 8 bytes, so the conversion is total.
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // 8 is a multiple of 4, so the tail starts at mask index 0 again.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends `src` unmasked to `dst`: one copy, unmasked a word at a time.
fn unmask_extend(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4]) {
    let start = dst.len();
    dst.extend_from_slice(src);
    apply_mask(&mut dst[start..], mask);
}

/// Writes the header of an unmasked, final frame into `out`; returns its length.
fn write_header(out: &mut [u8; MAX_SERVER_HEADER], opcode: OpCode, len: usize) -> usize {
    out[0] = 0x80 | u8::from(opcode);
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Encodes a final, unmasked server frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_SERVER_HEADER];
    let header_len = write_header(&mut header, opcode, payload.len());
    let mut out = Vec::with_capacity(header_len + payload.len());
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A text frame. The caller guarantees `payload` is UTF-8.
pub fn text(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Text), payload)
}

/// A text message compressed with permessage-deflate: RSV1 set, `deflated`
/// the compressed UTF-8 (RFC 7692 6.1).
pub fn text_deflated(deflated: &[u8]) -> Bytes {
    let mut frame = encode(OpCode::Data(Data::Text), deflated).to_vec();
    frame[0] |= 0x40;
    Bytes::from(frame)
}

/// A binary frame.
pub fn binary(payload: &[u8]) -> Bytes {
    encode(OpCode::Data(Data::Binary), payload)
}

/// A ping frame; the payload is cut to 125 bytes.
pub fn ping(payload: &[u8]) -> Bytes {
    let len = payload.len().min(MAX_CONTROL_PAYLOAD);
    encode(OpCode::Control(Control::Ping), &payload[..len])
}

/// A pong frame; the payload is cut to 125 bytes.
pub fn pong(payload: &[u8]) -> Bytes {
    let len = payload.len().min(MAX_CONTROL_PAYLOAD);
    encode(OpCode::Control(Control::Pong), &payload[..len])
}

/// A close frame with `code` and `reason`, the reason truncated on a char
/// boundary to fit the 123 bytes a control frame leaves for it.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// Writes a text frame whose payload is produced by `write` directly after a
/// reserved header slot, then places the header in front: one allocation, no
/// copy of the payload. `write` must only append, and must append UTF-8.
pub fn text_with(capacity_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_SERVER_HEADER + capacity_hint);
    buf.resize(MAX_SERVER_HEADER, 0);
    write(&mut buf);
    let Some(payload_len) = buf.len().checked_sub(MAX_SERVER_HEADER) else {
        // `write` broke its contract by shrinking the buffer; frame what is left.
        return text(&buf);
    };
    let mut header = [0u8; MAX_SERVER_HEADER];
    let header_len = write_header(&mut header, OpCode::Data(Data::Text), payload_len);
    let start = MAX_SERVER_HEADER - header_len;
    buf[start..MAX_SERVER_HEADER].copy_from_slice(&header[..header_len]);
    Bytes::from(buf).slice(start..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test-only client encoder: masked frame with explicit FIN and opcode byte.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], mask);
        out
    }

    fn decoder() -> FrameDecoder {
        FrameDecoder::new(FrameLimits::default())
    }

    fn decode_all(dec: &mut FrameDecoder, mut input: &[u8]) -> Result<Vec<Incoming>, FrameError> {
        let mut out = Vec::new();
        while let Decoded::Complete(item, used) = dec.decode(input)? {
            out.push(item);
            input = &input[used..];
        }
        assert!(input.is_empty(), "left over {input:?}");
        Ok(out)
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 5.7: a single-frame masked text message containing "Hello".
        let frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        assert_eq!(
            decoder().decode(frame),
            Ok(Decoded::Complete(
                Incoming::Text(Bytes::from_static(b"Hello")),
                11
            ))
        );
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let err = decoder()
            .decode(b"\x81\x05\x48\x65\x6c\x6c\x6f")
            .unwrap_err();
        assert_eq!(err, FrameError::Protocol("client frame not masked"));
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn every_prefix_is_partial() {
        let frame = client_frame(true, 0x2, &[7u8; 300], [1, 2, 3, 4]);
        let mut dec = decoder();
        for cut in 0..frame.len() {
            assert_eq!(dec.decode(&frame[..cut]), Ok(Decoded::Partial));
        }
        assert_eq!(
            dec.decode(&frame),
            Ok(Decoded::Complete(
                Incoming::Binary(Bytes::from(vec![7u8; 300])),
                frame.len()
            ))
        );
    }

    #[test]
    fn fragments_reassemble_with_control_frames_between() {
        let mut input = client_frame(false, 0x1, b"Hel", [9, 8, 7, 6]);
        input.extend(client_frame(true, 0x9, b"p", [1, 1, 1, 1]));
        input.extend(client_frame(false, 0x0, b"lo ", [0, 0, 0, 0]));
        input.extend(client_frame(true, 0xA, b"", [5, 5, 5, 5]));
        input.extend(client_frame(true, 0x0, b"w\xc3\xb6rld", [0xff, 0, 0xff, 0]));
        let mut dec = decoder();
        let items = decode_all(&mut dec, &input).unwrap();
        assert_eq!(
            items,
            vec![
                Incoming::Fragment,
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Fragment,
                Incoming::Pong(Bytes::new()),
                Incoming::Text(Bytes::from_static(b"Hello w\xc3\xb6rld")),
            ]
        );
        assert!(!dec.in_message());
    }

    #[test]
    fn fragmentation_errors() {
        let cont = client_frame(true, 0x0, b"x", [1, 2, 3, 4]);
        assert_eq!(
            decoder().decode(&cont),
            Err(FrameError::Protocol("continuation without a message"))
        );
        let mut dec = decoder();
        let first = client_frame(false, 0x1, b"a", [1, 2, 3, 4]);
        assert!(matches!(
            dec.decode(&first),
            Ok(Decoded::Complete(Incoming::Fragment, _))
        ));
        assert_eq!(
            dec.decode(&client_frame(true, 0x2, b"b", [1, 2, 3, 4])),
            Err(FrameError::Protocol(
                "new message inside a fragmented message"
            ))
        );
        assert_eq!(
            decoder().decode(&client_frame(false, 0x9, b"", [0; 4])),
            Err(FrameError::Protocol("fragmented control frame"))
        );
    }

    #[test]
    fn header_rule_violations() {
        assert_eq!(
            decoder().decode(b"\xc1\x80\0\0\0\0"),
            Err(FrameError::Protocol("reserved bits set"))
        );
        assert_eq!(
            decoder().decode(b"\x83\x80\0\0\0\0"),
            Err(FrameError::Protocol("reserved opcode"))
        );
        assert_eq!(
            decoder().decode(b"\x8b\x80\0\0\0\0"),
            Err(FrameError::Protocol("reserved opcode"))
        );
        assert_eq!(
            decoder().decode(&client_frame(true, 0x9, &[0; 126], [0; 4])),
            Err(FrameError::Protocol("control frame payload over 125 bytes"))
        );
        assert_eq!(
            decoder().decode(b"\x82\xff\x80\0\0\0\0\0\0\0"),
            Err(FrameError::Protocol("payload length has the high bit set"))
        );
    }

    #[test]
    fn oversize_frame_fails_from_the_header_alone() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_message_bytes: 150,
        };
        let mut dec = FrameDecoder::new(limits);
        // 16-bit length of 101, no mask or payload yet.
        let err = dec.decode(b"\x82\xfe\x00\x65").unwrap_err();
        assert_eq!(err, FrameError::TooBig);
        assert_eq!(err.close_code(), 1009);
        assert_eq!(
            decoder().decode(b"\x82\xff\0\0\0\x01\0\0\0\0"),
            Err(FrameError::TooBig)
        );
    }

    #[test]
    fn oversize_reassembled_message_is_too_big() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_message_bytes: 150,
        };
        let mut dec = FrameDecoder::new(limits);
        let first = client_frame(false, 0x2, &[0; 100], [1, 2, 3, 4]);
        assert!(matches!(
            dec.decode(&first),
            Ok(Decoded::Complete(Incoming::Fragment, _))
        ));
        let second = client_frame(true, 0x0, &[0; 51], [1, 2, 3, 4]);
        assert_eq!(dec.decode(&second[..4]), Err(FrameError::TooBig));
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        let err = decoder()
            .decode(&client_frame(true, 0x1, b"\xff\xfe", [3; 4]))
            .unwrap_err();
        assert_eq!(err, FrameError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);
        // A code point split across fragments is fine once the message is complete.
        let mut input = client_frame(false, 0x1, b"\xc3", [3; 4]);
        input.extend(client_frame(true, 0x0, b"\xb6", [4; 4]));
        assert_eq!(
            decode_all(&mut decoder(), &input).unwrap().pop(),
            Some(Incoming::Text(Bytes::from_static("ö".as_bytes())))
        );
    }

    #[test]
    fn close_payloads() {
        let close_of = |payload: &[u8]| decoder().decode(&client_frame(true, 0x8, payload, [7; 4]));
        assert!(matches!(
            close_of(b""),
            Ok(Decoded::Complete(Incoming::Close(None), 6))
        ));
        assert_eq!(
            close_of(b"\x03"),
            Err(FrameError::Protocol("close payload of one byte"))
        );
        assert!(matches!(
            close_of(b"\x03\xe8bye"),
            Ok(Decoded::Complete(Incoming::Close(Some((1000, ref r))), _)) if r == "bye"
        ));
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2999, 5000, 65535,
        ] {
            assert_eq!(
                close_of(&bad.to_be_bytes()),
                Err(FrameError::Protocol("invalid close code")),
                "{bad}"
            );
        }
        for good in [1000u16, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
            assert!(close_of(&good.to_be_bytes()).is_ok(), "{good}");
        }
        assert_eq!(close_of(b"\x03\xe8\xff"), Err(FrameError::InvalidUtf8));
    }

    #[test]
    fn server_frames_are_unmasked_and_final() {
        assert_eq!(&text(b"hi")[..], b"\x81\x02hi");
        assert_eq!(&binary(b"")[..], b"\x82\x00");
        assert_eq!(&pong(b"x")[..], b"\x8a\x01x");
        assert_eq!(&ping(b"")[..], b"\x89\x00");
        assert_eq!(&close(1000, "ok")[..], b"\x88\x04\x03\xe8ok");
        let medium = text(&[b'a'; 126]);
        assert_eq!(&medium[..4], b"\x81\x7e\x00\x7e");
        let large = binary(&vec![0; 70_000]);
        assert_eq!(&large[..10], b"\x82\x7f\0\0\0\0\0\x01\x11\x70");
        assert_eq!(large.len(), 70_010);
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes of 2-byte chars
        let frame = close(1008, &reason);
        assert_eq!(frame[1], 2 + 122);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn text_with_matches_text() {
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload = vec![b'z'; len];
            let built = text_with(3, |buf| buf.extend_from_slice(&payload));
            assert_eq!(built, text(&payload), "len {len}");
        }
        assert_eq!(text_with(0, |buf| buf.clear()), text(b""));
    }

    #[test]
    fn apply_mask_is_an_involution_at_every_length() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut buf = original.clone();
            apply_mask(&mut buf, [0xde, 0xad, 0xbe, 0xef]);
            for (i, (&m, &o)) in buf.iter().zip(&original).enumerate() {
                assert_eq!(m, o ^ [0xde, 0xad, 0xbe, 0xef][i % 4]);
            }
            apply_mask(&mut buf, [0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(buf, original);
        }
    }

    proptest! {
        #[test]
        fn round_trip_through_random_fragmentation(
            is_text in any::<bool>(),
            text_payload in ".{0,300}",
            bin_payload in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
            mask in any::<[u8; 4]>(),
            ping_between in any::<bool>(),
        ) {
            let payload: Vec<u8> = if is_text { text_payload.into_bytes() } else { bin_payload };
            // Split points, sorted and deduplicated, always including the end.
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
            points.push(payload.len());
            points.sort_unstable();
            points.dedup();
            let mut wire = Vec::new();
            let mut start = 0;
            for (n, &end) in points.iter().enumerate() {
                let opcode = if n == 0 { if is_text { 1 } else { 2 } } else { 0 };
                let fin = n + 1 == points.len();
                wire.extend(client_frame(fin, opcode, &payload[start..end], mask));
                if ping_between && !fin {
                    wire.extend(client_frame(true, 0x9, b"ping", mask));
                }
                start = end;
            }
            let mut dec = decoder();
            let items = decode_all(&mut dec, &wire).unwrap();
            let last = items.last().cloned();
            let expected = if is_text {
                Incoming::Text(Bytes::from(payload.clone()))
            } else {
                Incoming::Binary(Bytes::from(payload.clone()))
            };
            prop_assert_eq!(last, Some(expected));
            let fragments = items.iter().filter(|i| **i == Incoming::Fragment).count();
            prop_assert_eq!(fragments, points.len() - 1);
        }

        #[test]
        fn server_frame_round_trips_through_a_masking_client(
            payload in proptest::collection::vec(any::<u8>(), 0..70_000),
            mask in any::<[u8; 4]>(),
        ) {
            // Re-mask a server frame as a client would send it, then decode.
            let frame = binary(&payload);
            let header_len = frame.len() - payload.len();
            let mut wire = frame[..header_len].to_vec();
            wire[1] |= 0x80;
            wire.extend_from_slice(&mask);
            let start = wire.len();
            wire.extend_from_slice(&frame[header_len..]);
            apply_mask(&mut wire[start..], mask);
            let limits = FrameLimits { max_frame_bytes: 1 << 20, max_message_bytes: 1 << 20 };
            let decoded = FrameDecoder::new(limits).decode(&wire).unwrap();
            prop_assert_eq!(decoded, Decoded::Complete(Incoming::Binary(Bytes::from(payload)), wire.len()));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut dec = FrameDecoder::new(FrameLimits { max_frame_bytes: 64, max_message_bytes: 100 });
            let mut input = &bytes[..];
            while let Ok(Decoded::Complete(_, used)) = dec.decode(input) {
                prop_assert!(used > 0 && used <= input.len());
                input = &input[used..];
            }
        }
    }
}
