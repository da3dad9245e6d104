//! One connection as the shard state sees it: protocol phase, unparsed
//! input, subscriptions, identity, parked work and how far it is in closing.
//! The driver keeps the I/O side (descriptor, outbound queue) under the same
//! [`ConnKey`](crate::shard::key::ConnKey).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use crate::protocol::event_stream::{write_cursor, Format, Head};
use crate::protocol::frame::FrameDecoder;
use crate::protocol::http::{Request, RequestDecoder, Response};
use crate::protocol::message::Since;
use crate::protocol::origin::with_cors;

use super::names::NameId;

/// What the connection speaks now.
pub(crate) enum Phase {
    /// HTTP/1.1 requests, possibly pipelined.
    Http(Box<HttpConn>),
    /// An upgraded WebSocket.
    WebSocket(WsConn),
    /// An event stream (SSE or NDJSON): a response that stays open and
    /// carries the relay protocol's messages; input after its request is
    /// ignored.
    Stream(Box<StreamConn>),
}

/// An event-stream connection: its format and the topics it asked for,
/// with how far it has got in each stream topic.
pub(crate) struct StreamConn {
    pub(crate) format: Format,
    /// The `topic` parameters, in their order: the cursor's order.
    pub(crate) topics: Vec<StreamTopic>,
}

/// One topic of an event stream.
pub(crate) struct StreamTopic {
    pub(crate) name: Arc<str>,
    /// For a stream topic, the offset of the last publication the client
    /// has and its epoch: from the cursor it resumed with, then from each
    /// `subscribed`, push and `reset` it was sent.
    pub(crate) at: Option<(u64, Arc<str>)>,
}

impl StreamConn {
    /// Moves the connection's position for a message it is sent; true if
    /// it moved (an SSE event then carries the cursor as its `id:`).
    /// Offsets only grow within an epoch: last values replayed on
    /// subscribe come after a `subscribed` at the head.
    pub(crate) fn advance(&mut self, head: &Head<'_>) -> bool {
        // A plain topic's push (the common case) names no position.
        if head.offset.is_none() && head.epoch.is_none() {
            return false;
        }
        let Some(topic) = head.topic.as_deref() else {
            return false;
        };
        let Some(entry) = self.topics.iter_mut().find(|t| &*t.name == topic) else {
            return false;
        };
        match (&*head.kind, head.offset, head.epoch.as_deref()) {
            ("push", Some(offset), None) => match &mut entry.at {
                Some((at, _)) if offset > *at => {
                    *at = offset;
                    true
                }
                _ => false,
            },
            ("subscribed", Some(offset), Some(epoch)) => {
                // Recovered: the replay that follows moves it from where
                // the client was.
                let keep = head.recovered == Some(true)
                    && entry.at.as_ref().is_some_and(|(_, e)| &**e == epoch);
                if !keep {
                    entry.at = Some((offset, Arc::from(epoch)));
                }
                true
            }
            ("reset", _, Some(epoch)) => {
                entry.at = Some((0, Arc::from(epoch)));
                true
            }
            _ => false,
        }
    }

    /// The cursor's `id:` line.
    pub(crate) fn id_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.topics.len() * 28);
        out.extend_from_slice(b"id: ");
        write_cursor(
            &mut out,
            self.topics
                .iter()
                .map(|t| t.at.as_ref().map(|(offset, epoch)| (*offset, &**epoch))),
        );
        out.extend_from_slice(b"\n\n");
        out
    }
}

/// An HTTP connection between or inside requests.
pub(crate) struct HttpConn {
    pub(crate) decoder: RequestDecoder,
    /// When the next complete request must have arrived.
    pub(crate) deadline: Instant,
    /// A `100 Continue` went out for the request being received.
    pub(crate) continue_sent: bool,
}

/// An upgraded connection.
pub(crate) struct WsConn {
    pub(crate) kind: WsKind,
    /// Frame decoder with its reassembly state (16 bytes, kept inline).
    pub(crate) decoder: FrameDecoder,
    /// When the peer last sent anything, in the state's clock.
    pub(crate) last_seen: Millis,
    /// When our unanswered ping went out, if one is outstanding.
    pub(crate) ping_sent: Option<Millis>,
    /// permessage-deflate was negotiated: pushes of at least
    /// `compression_min_bytes` go compressed, and the client may compress.
    pub(crate) deflate: bool,
}

/// Milliseconds since the shard state started, wrapping after 49 days; only
/// differences of less than that are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Millis(pub(crate) u32);

impl Millis {
    /// Milliseconds from `earlier` to `self`.
    pub(crate) fn since(self, earlier: Millis) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }
}

/// The endpoint a WebSocket was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WsKind {
    /// `/ws`: the JSON relay protocol.
    Relay,
    /// `/echo`: raw echo.
    Echo,
    /// `/chat`: one-to-one plain-text chat with the identity's recipient.
    Chat,
    /// `/app/{key}`: the Pusher protocol, for the app at this index of
    /// `[[apps]]` (a byte: the kind stays within the connection's padding,
    /// which every idle connection pays for; `[[apps]]` holds at most 256).
    Pusher(u8),
}

/// Where an identified connection sits in its shard's user (or chat user) index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ident {
    pub(crate) entry: NameId,
    /// Position among the user's active connections; `None` while waiting for
    /// other shards to acknowledge that this shard holds the user.
    pub(crate) pos: Option<u32>,
}

/// Who an identified connection speaks for. Boxed on the connection: most
/// connections of a broadcast workload are anonymous.
#[derive(Debug, Default)]
pub(crate) struct Identity {
    /// The user id.
    pub(crate) user: Option<Arc<str>>,
    /// This connection's entry in the user or chat index.
    pub(crate) ident: Option<Ident>,
    /// The registration it was opened with (`/ws/{id}`).
    pub(crate) registration: Option<Arc<str>>,
    /// For `/chat`: whose chat connections get this one's lines.
    pub(crate) chat_recipient: Option<Arc<str>>,
}

/// Work parked until other shards have answered; the connection reads no
/// further input meanwhile, so pipelined requests stay in order.
pub(crate) enum Deferred {
    /// The `101` response and starting topics of an identified WebSocket.
    Upgrade {
        /// The complete `101 Switching Protocols` response.
        switching: Bytes,
        /// Topics to subscribe right after it (from a registration).
        topics: Arc<[String]>,
    },
    /// A presence count gathered from every shard, answered over HTTP.
    Presence {
        /// How to answer it.
        reply: Reply,
    },
    /// An HTTP request answered by a stream's home shard (a publish waiting
    /// for its offset, a history query).
    Stream {
        /// The request's ticket.
        ticket: u64,
        /// How to answer it.
        reply: Reply,
    },
    /// A `/ws/{id}` upgrade for a registration this node has not heard of
    /// yet: in a cluster it may be on its way from the node that made it.
    Registration {
        /// The upgrade request, answered when the registration arrives.
        request: Box<Request>,
        id: Arc<str>,
        /// When it is answered `404` if the registration has not come.
        until: Instant,
    },
    /// A `/ws`, `/sse` or `/stream` request waiting for the connect
    /// proxy's verdict on who it is.
    Connect {
        ticket: u64,
        request: Box<Request>,
        route: super::connect::ConnectRoute,
        /// The allowed origin its answer names.
        cors: Option<Box<str>>,
    },
    /// A client publication waiting for the publish proxy's verdict; the
    /// connection's later input waits behind it, so its publications stay
    /// in order.
    Publish {
        ticket: u64,
        topic: Box<str>,
        event: Box<str>,
        payload: Box<str>,
        idempotency_key: Option<Box<str>>,
    },
    /// An HTTP response to send once the registry change with this ticket is
    /// acknowledged everywhere.
    Response {
        /// The ticket of the broadcast.
        ticket: u64,
        /// The response.
        response: Response,
    },
}

/// How a parked HTTP request is answered when its answer comes: whether
/// its connection stays open, and the origin its CORS headers name.
pub(crate) struct Reply {
    pub(crate) keep_alive: bool,
    pub(crate) cors: Option<Box<str>>,
    /// A request of Pusher's HTTP API: answered in Pusher's words (`{}`
    /// for a success, the message as text otherwise).
    pub(crate) pusher: bool,
}

impl Reply {
    /// The reply for `request`; `cors`: the allowed origin (not the
    /// node's own) its page came from, if any.
    pub(crate) fn to(request: &Request, cors: Option<&str>) -> Reply {
        Reply {
            keep_alive: request.keep_alive(),
            cors: cors.map(Box::from),
            pusher: false,
        }
    }

    /// The same for a request of Pusher's HTTP API.
    pub(crate) fn pusher(request: &Request, cors: Option<&str>) -> Reply {
        Reply {
            pusher: true,
            ..Reply::to(request, cors)
        }
    }

    /// `response` as this reply.
    pub(crate) fn answer(self, response: Response) -> Response {
        let response = match self.pusher {
            true if (200..300).contains(&response.status()) => {
                Response::json(200, "{}".to_string())
            }
            true => {
                let text = String::from_utf8_lossy(response.body()).into_owned();
                Response::text(response.status(), "text/plain; charset=utf-8", text)
            }
            false => response,
        };
        with_cors(response, self.cors.as_deref()).keep_alive(self.keep_alive)
    }
}

impl Deferred {
    /// Bytes it holds: its box, and what it keeps to send later.
    pub(crate) fn bytes(&self) -> usize {
        let own = match self {
            Deferred::Upgrade { switching, topics } => {
                switching.len() + topics.iter().map(String::len).sum::<usize>()
            }
            Deferred::Response { response, .. } => response.body().len(),
            Deferred::Registration { request, id, .. } => request.head_bytes() + id.len(),
            Deferred::Connect { request, cors, .. } => {
                request.head_bytes() + cors.as_deref().map_or(0, str::len)
            }
            Deferred::Publish {
                topic,
                event,
                payload,
                idempotency_key,
                ..
            } => {
                topic.len()
                    + event.len()
                    + payload.len()
                    + idempotency_key.as_deref().map_or(0, str::len)
            }
            Deferred::Presence { reply } | Deferred::Stream { reply, .. } => {
                reply.cors.as_deref().map_or(0, str::len)
            }
        };
        std::mem::size_of::<Deferred>() + own
    }
}

/// One subscription held by the connection: 32 bytes, the first one inside
/// the connection.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    pub(crate) topic: NameId,
    /// Position in the topic's subscriber list plus one; `None` while
    /// waiting for other shards to acknowledge interest. (Plus one so the
    /// option takes four bytes.)
    listed: Option<NonZeroU32>,
    /// Presence meta (a JSON object) when the channel's hook tracks this
    /// connection on the topic (the default rules track every topic).
    pub(crate) meta: Option<Arc<str>>,
    /// For a stream topic: the position the client asked to recover from,
    /// kept until the subscription is opened at the topic's home.
    pub(crate) since: Option<Box<Since>>,
}

impl Sub {
    pub(crate) fn new(topic: NameId, pos: Option<u32>, since: Option<Since>) -> Sub {
        let mut sub = Sub {
            topic,
            listed: None,
            meta: None,
            since: since.map(Box::new),
        };
        if let Some(pos) = pos {
            sub.set_pos(pos);
        }
        sub
    }

    /// Position in the topic's subscriber list, or `None` while waiting for
    /// other shards to acknowledge interest.
    pub(crate) fn pos(&self) -> Option<u32> {
        self.listed.map(|p| p.get() - 1)
    }

    pub(crate) fn set_pos(&mut self, pos: u32) {
        debug_assert!(pos < u32::MAX, "a subscriber list longer than u32");
        self.listed = NonZeroU32::new(pos.saturating_add(1));
    }
}

/// How far the connection is in closing, as far as the state is concerned
/// (the driver tracks the socket's side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// Open.
    No,
    /// Our close frame is queued; waiting for the peer's. Input is read only
    /// to find that close frame.
    Handshake,
    /// The driver was told to end the connection; input is ignored.
    Done,
}

/// A connection.
pub(crate) struct Conn {
    pub(crate) phase: Phase,
    /// Input not yet forming a complete request or frame. Empty (and
    /// unallocated) between messages, which is the common idle state.
    pub(crate) inbuf: Pending,
    /// Its subscriptions; most connections hold one, kept inline.
    pub(crate) subs: SmallVec<[Sub; 1]>,
    pub(crate) closing: Closing,
    /// The peer closed its sending side: answer what was asked, then close.
    pub(crate) input_ended: bool,
    pub(crate) identity: Option<Box<Identity>>,
    pub(crate) deferred: Option<Box<Deferred>>,
    /// Presence queries this connection has in flight.
    pub(crate) presence_queries: u8,
    /// Bytes of partial input held for it (unparsed input and what its
    /// decoder keeps of a request or message under way), as last charged
    /// to the shard's inbound budget.
    pub(crate) held_input: u32,
}

impl Conn {
    pub(crate) fn new(decoder: RequestDecoder, deadline: Instant) -> Conn {
        Conn {
            phase: Phase::Http(Box::new(HttpConn {
                decoder,
                deadline,
                continue_sent: false,
            })),
            inbuf: Pending::default(),
            subs: SmallVec::new(),
            closing: Closing::No,
            input_ended: false,
            identity: None,
            deferred: None,
            presence_queries: 0,
            held_input: 0,
        }
    }

    /// The user id, for identified connections.
    pub(crate) fn user(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()?.user.as_ref()
    }

    /// The identity, created on first use.
    pub(crate) fn identity_mut(&mut self) -> &mut Identity {
        self.identity.get_or_insert_with(Default::default)
    }

    /// Whether the connection's `101` is parked (an identified upgrade
    /// waiting for other shards). Its client has had no `101` and still
    /// reads HTTP: it must get no frame, and an HTTP answer if it is refused.
    pub(crate) fn upgrade_parked(&self) -> bool {
        matches!(self.deferred.as_deref(), Some(Deferred::Upgrade { .. }))
    }

    /// The WebSocket endpoint, if upgraded.
    pub(crate) fn ws_kind(&self) -> Option<WsKind> {
        match &self.phase {
            Phase::WebSocket(ws) => Some(ws.kind),
            Phase::Http(_) | Phase::Stream(_) => None,
        }
    }
}
/// A connection's unparsed input: boxed, since an idle connection has none
/// and a `BytesMut` inline would cost every connection 32 bytes.
#[derive(Default)]
pub(crate) struct Pending(Option<Box<BytesMut>>);

impl Pending {
    /// Bytes held.
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.len())
    }

    /// Bytes allocated for it (what the inbound budget charges).
    pub(crate) fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.capacity())
    }

    /// Takes the bytes out, leaving nothing.
    pub(crate) fn take(&mut self) -> BytesMut {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    /// Holds `bytes` (nothing allocated when they are empty and unallocated).
    pub(crate) fn set(&mut self, bytes: BytesMut) {
        self.0 = (bytes.capacity() > 0).then(|| Box::new(bytes));
    }
}

#[cfg(test)]
#[test]
fn a_connection_costs_the_state_at_most_104_bytes_with_its_first_subscription() {
    // Every idle connection pays this; the README's memory table counts it.
    // The first subscription is inside it (no allocation of its own).
    assert!(std::mem::size_of::<Sub>() <= 32);
    assert!(std::mem::size_of::<Conn>() <= 104);
}

#[cfg(test)]
mod cursor_tests {
    use super::*;
    use crate::protocol::message;

    fn stream(at: Option<(u64, &str)>) -> StreamConn {
        StreamConn {
            format: Format::Sse,
            topics: vec![
                StreamTopic {
                    name: Arc::from("plain"),
                    at: None,
                },
                StreamTopic {
                    name: Arc::from("s"),
                    at: at.map(|(o, e)| (o, Arc::from(e))),
                },
            ],
        }
    }

    /// Feeds a server frame's message to the connection's cursor.
    fn see(stream: &mut StreamConn, frame: &Bytes) -> bool {
        let json = message::frame_json(frame).unwrap();
        stream.advance(&Head::parse(json).unwrap())
    }

    fn id(stream: &StreamConn) -> String {
        String::from_utf8(stream.id_line()).unwrap()
    }

    #[test]
    fn a_recovery_keeps_the_clients_offset_until_the_replay_moves_it() {
        let mut s = stream(Some((3, "e")));
        assert!(see(
            &mut s,
            &message::subscribed_at("s", Some(true), 9, "e", false)
        ));
        assert_eq!(id(&s), "id: ,3.e\n\n", "still where the client was");
        assert!(see(&mut s, &message::push_at("s", 4, "m", "1")));
        assert_eq!(id(&s), "id: ,4.e\n\n");
        assert!(
            !see(&mut s, &message::push("plain", "m", "1")),
            "no position"
        );
    }

    #[test]
    fn a_gone_position_or_a_fresh_subscription_starts_at_the_head() {
        let mut gone = stream(Some((3, "old")));
        assert!(see(
            &mut gone,
            &message::subscribed_at("s", Some(false), 9, "new", false)
        ));
        assert_eq!(id(&gone), "id: ,9.new\n\n");
        let mut fresh = stream(None);
        assert!(see(
            &mut fresh,
            &message::subscribed_at("s", None, 9, "e", false)
        ));
        // Last values replayed on subscribe are older than the head: they
        // never move the cursor back.
        let replayed = message::replayed(&message::push_at("s", 8, "m", "1")).unwrap();
        assert!(!see(&mut fresh, &replayed));
        assert_eq!(id(&fresh), "id: ,9.e\n\n");
    }

    #[test]
    fn a_reset_starts_the_new_run_at_zero() {
        let mut s = stream(Some((7, "e1")));
        assert!(see(&mut s, &message::stream_reset("s", "e2")));
        assert_eq!(id(&s), "id: ,0.e2\n\n");
        assert!(see(&mut s, &message::push_at("s", 1, "m", "1")));
        assert_eq!(id(&s), "id: ,1.e2\n\n");
    }
}
