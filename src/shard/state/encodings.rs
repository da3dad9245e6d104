//! One publication in every wire format its subscribers on this shard
//! read: the WebSocket frame it came as, the same compressed with
//! permessage-deflate, and an event stream's SSE event or NDJSON line.
//! Each is made when the first subscriber of its format is reached and
//! shared by the rest; only an SSE event of a stream topic adds bytes of
//! its own per connection (its `id:` line).

use bytes::Bytes;

use crate::protocol::deflate::Deflater;
use crate::protocol::event_stream::{self, encode, Format, Head};
use crate::protocol::{frame, message};
use crate::pusher::wire::{translate_publication, Publication};
use crate::shard::key::ConnKey;

use super::conn::{Phase, StreamConn, WsKind};
use super::Command;

/// What a publication does to one connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Delivered {
    /// Queued in its format (or skipped: not one it shows).
    Queued,
    /// The connection is to be closed (a Pusher user's connections
    /// terminated by the app).
    Terminate,
}

pub(super) struct Encodings<'f> {
    frame: &'f Bytes,
    /// Pushes shorter than this go uncompressed.
    min_deflate: usize,
    /// `None` until asked; `Some(None)` for a frame that is not a message.
    head: Option<Option<Head<'f>>>,
    /// The frame compressed (or the frame itself when too short).
    deflated: Option<Bytes>,
    /// SSE: `event:` and `data:` lines, and the same ended (no `id:`).
    sse: Option<(Bytes, Bytes)>,
    ndjson: Option<Bytes>,
    /// The Pusher event (`None` inside: the frame is not one Pusher
    /// shows), and the socket it skips.
    pusher: Option<Publication>,
    /// This shard's id and this run's salt: what a skipped socket id must
    /// name to be one of this shard's connections.
    here: (u32, u32),
}

impl<'f> Encodings<'f> {
    /// `here`: the shard's id and the run's socket salt.
    pub(super) fn new(frame: &'f Bytes, min_deflate: usize, here: (u32, u32)) -> Encodings<'f> {
        Encodings {
            frame,
            min_deflate,
            head: None,
            deflated: None,
            sse: None,
            ndjson: None,
            pusher: None,
            here,
        }
    }

    /// Queues the publication to connection `key` (`phase`: what it reads,
    /// if it is still there) in its format; or says the connection is to
    /// be closed instead.
    #[must_use]
    pub(super) fn push(
        &mut self,
        key: ConnKey,
        phase: Option<&mut Phase>,
        deflater: &mut Deflater,
        commands: &mut Vec<Command>,
    ) -> Delivered {
        match phase {
            Some(Phase::Stream(stream)) => self.push_to_stream(key, stream, commands),
            Some(Phase::WebSocket(ws)) if matches!(ws.kind, WsKind::Pusher(_)) => {
                let frame = self.frame;
                let pusher = self
                    .pusher
                    .get_or_insert_with(|| translate_publication(frame));
                if pusher.terminate {
                    return Delivered::Terminate;
                }
                let (shard, salt) = self.here;
                let skipped = pusher.except.is_some_and(|e| {
                    (e.shard, e.salt, e.slot as usize, e.generation)
                        == (shard, salt, key.slot(), key.generation())
                });
                if let (Some(frame), false) = (&pusher.frame, skipped) {
                    commands.push(Command::Push(key, frame.clone()));
                }
            }
            Some(Phase::WebSocket(ws)) if ws.deflate => {
                let frame = self.deflated(deflater).clone();
                commands.push(Command::Push(key, frame));
            }
            _ => commands.push(Command::Push(key, self.frame.clone())),
        }
        Delivered::Queued
    }

    /// The frame as a WebSocket that negotiated permessage-deflate gets it:
    /// compressed once, if it is long enough and shrinks.
    fn deflated(&mut self, deflater: &mut Deflater) -> &Bytes {
        let (frame, min) = (self.frame, self.min_deflate);
        self.deflated
            .get_or_insert_with(|| match message::frame_json(frame) {
                Some(json) if json.len() >= min => {
                    let packed = deflater.message(json);
                    if packed.len() < json.len() {
                        frame::text_deflated(&packed)
                    } else {
                        frame.clone()
                    }
                }
                _ => frame.clone(),
            })
    }

    /// Queues the publication to event stream `key`: the shared bytes, and
    /// for an SSE event that moves its cursor, its `id:` line after them.
    fn push_to_stream(
        &mut self,
        key: ConnKey,
        stream: &mut StreamConn,
        commands: &mut Vec<Command>,
    ) {
        let frame = self.frame;
        let head = self
            .head
            .get_or_insert_with(|| message::frame_json(frame).and_then(Head::parse));
        let Some(head) = head.as_ref() else {
            return;
        };
        let json = message::frame_json(frame).unwrap_or_default();
        match stream.format {
            Format::Ndjson => {
                let line = self
                    .ndjson
                    .get_or_insert_with(|| encode(Format::Ndjson, json, head));
                commands.push(Command::Push(key, line.clone()));
            }
            Format::Sse => {
                let (body, ended) = self.sse.get_or_insert_with(|| {
                    let body = encode(Format::Sse, json, head);
                    let mut ended = Vec::with_capacity(body.len() + 1);
                    ended.extend_from_slice(&body);
                    ended.extend_from_slice(event_stream::END);
                    (body, Bytes::from(ended))
                });
                if stream.advance(head) {
                    commands.push(Command::Push(key, body.clone()));
                    commands.push(Command::Push(key, Bytes::from(stream.id_line())));
                } else {
                    commands.push(Command::Push(key, ended.clone()));
                }
            }
        }
    }
}
