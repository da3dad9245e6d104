//! One connection's state inside its shard: protocol phase, partial input,
//! outbound queue, subscriptions and close progress.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::protocol::frame::FrameDecoder;
use crate::protocol::http::Response;
use crate::shard::outbound::{Enqueued, Outbound, SendBuffers};
use crate::shard::topics::TopicId;

/// What the connection speaks now.
pub(crate) enum Phase {
    /// HTTP/1.1 requests, possibly pipelined.
    Http,
    /// An upgraded WebSocket.
    WebSocket {
        /// Which endpoint it was upgraded on.
        kind: WsKind,
        /// Frame decoder with its reassembly state.
        decoder: Box<FrameDecoder>,
    },
}

/// The endpoint a WebSocket was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WsKind {
    /// `/ws`: the JSON relay protocol.
    Relay,
    /// `/echo`: raw echo.
    Echo,
    /// `/chat`: one-to-one plain-text chat with `Conn::chat_recipient`.
    Chat,
}

/// Where an identified connection sits in its shard's user (or chat user) index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ident {
    pub(crate) entry: TopicId,
    /// Position among the user's active connections; `None` while waiting for
    /// other shards to acknowledge that this shard holds the user.
    pub(crate) pos: Option<u32>,
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
        /// Whether the request asked to keep the connection open.
        keep_alive: bool,
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

/// One subscription held by the connection.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    pub(crate) topic: TopicId,
    /// Position in the topic's subscriber list, or `None` while waiting for
    /// other shards to acknowledge interest.
    pub(crate) pos: Option<u32>,
    /// Presence meta (a JSON object) when the channel's hook tracks this
    /// connection on the topic.
    pub(crate) meta: Option<Arc<str>>,
}

/// How far the connection is in closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// Open.
    No,
    /// Send what is queued (a close frame or the last HTTP response), then
    /// wait for the peer's close frame or the deadline.
    AfterFlush {
        /// When to give up waiting and drop the TCP connection.
        deadline: Instant,
        /// Terminate as soon as the queue is flushed, without waiting for the peer.
        then_terminate: bool,
    },
    /// The socket is shut down; waiting for the kernel to finish its operations
    /// before the fd is closed and the slot freed.
    Terminating,
}

/// A connection.
pub(crate) struct Conn {
    /// The direct descriptor: an index in the ring's file table.
    pub(crate) file: u32,
    pub(crate) generation: u32,
    pub(crate) phase: Phase,
    /// Input not yet forming a complete request or frame. Empty (and
    /// unallocated) between messages, which is the common idle state.
    pub(crate) inbuf: BytesMut,
    pub(crate) subs: Vec<Sub>,
    pub(crate) closing: Closing,
    /// The multishot receive is armed (it ends on EOF, error or ENOBUFS).
    pub(crate) recv_armed: bool,
    /// A shutdown operation is in flight; the slot and its descriptor stay
    /// ours until it completes.
    pub(crate) shutdown_pending: bool,
    /// A close frame has been queued; nothing but the close may follow it.
    pub(crate) close_sent: bool,
    /// In the shard's list of connections with queued output.
    pub(crate) dirty: bool,
    pub(crate) out: Outbound,
    /// The user id, for identified connections.
    pub(crate) user: Option<Arc<str>>,
    /// This connection's entry in the user or chat index.
    pub(crate) ident: Option<Ident>,
    /// The registration it was opened with (`/ws/{id}`).
    pub(crate) registration: Option<Arc<str>>,
    /// For `/chat`: whose chat connections get this one's lines.
    pub(crate) chat_recipient: Option<Arc<str>>,
    pub(crate) deferred: Option<Deferred>,
    /// While in HTTP: when the next complete request must have arrived.
    pub(crate) http_deadline: Instant,
    /// A `100 Continue` went out for the request being received.
    pub(crate) continue_sent: bool,
}

impl Conn {
    pub(crate) fn new(file: u32, generation: u32, http_deadline: Instant) -> Conn {
        Conn {
            file,
            generation,
            phase: Phase::Http,
            inbuf: BytesMut::new(),
            subs: Vec::new(),
            closing: Closing::No,
            recv_armed: false,
            shutdown_pending: false,
            close_sent: false,
            dirty: false,
            out: Outbound::default(),
            user: None,
            ident: None,
            registration: None,
            chat_recipient: None,
            deferred: None,
            http_deadline,
            continue_sent: false,
        }
    }

    /// True once close has begun: no more pushes are accepted.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing != Closing::No || self.close_sent
    }

    /// Queues a frame unless the connection is closing or the frame would
    /// pass `budget` bytes not yet taken by the kernel.
    pub(crate) fn enqueue(
        &mut self,
        frame: Bytes,
        budget: usize,
        pool: &mut SendBuffers,
    ) -> Enqueued {
        if self.is_closing() {
            return Enqueued::Discarded;
        }
        self.out.enqueue(frame, budget, pool)
    }
}
