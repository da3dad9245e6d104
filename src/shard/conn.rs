//! One connection's state inside its shard: protocol phase, partial input,
//! outbound queue, subscriptions and close progress.
//!
//! The outbound queue holds shared frames (`Bytes`); a send takes everything
//! queued (up to `IOV_MAX` frames) as one iovec array. While the kernel holds a
//! send, its buffers and iovecs live in [`InFlight`], boxed so they do not move
//! when the slab grows.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::frame::FrameDecoder;
use crate::shard::topics::TopicId;

/// Frames per send: Linux's `IOV_MAX`.
const MAX_IOVECS: usize = 1024;

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
}

/// One subscription held by the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sub {
    pub(crate) topic: TopicId,
    /// Position in the topic's subscriber list, or `None` while waiting for
    /// other shards to acknowledge interest.
    pub(crate) pos: Option<u32>,
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

/// Buffers owned by the kernel during a send.
pub(crate) struct InFlight {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
    msg: libc::msghdr,
    /// Bytes this send carries.
    pub(crate) bytes: usize,
}

impl InFlight {
    fn new() -> Box<InFlight> {
        Box::new(InFlight {
            frames: Vec::new(),
            iovecs: Vec::new(),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            bytes: 0,
        })
    }
}

/// A connection.
pub(crate) struct Conn {
    pub(crate) fd: RawFd,
    pub(crate) generation: u32,
    pub(crate) phase: Phase,
    /// Input not yet forming a complete request or frame. Empty (and
    /// unallocated) between messages, which is the common idle state.
    pub(crate) inbuf: BytesMut,
    pub(crate) subs: Vec<Sub>,
    pub(crate) closing: Closing,
    /// The multishot receive is armed (it ends on EOF, error or ENOBUFS).
    pub(crate) recv_armed: bool,
    /// A close frame has been queued; nothing but the close may follow it.
    pub(crate) close_sent: bool,
    /// In the shard's list of connections with queued output.
    pub(crate) dirty: bool,
    queue: VecDeque<Bytes>,
    /// Bytes queued and in flight that the kernel has not taken yet.
    queued_bytes: usize,
    inflight: Option<Box<InFlight>>,
    sending: bool,
}

/// Outcome of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Queued; the connection may need a send.
    Yes,
    /// The connection is closing; the frame was discarded.
    Discarded,
    /// Over the outbound budget: the caller must close it as a slow consumer.
    OverBudget,
}

impl Conn {
    pub(crate) fn new(fd: RawFd, generation: u32) -> Conn {
        Conn {
            fd,
            generation,
            phase: Phase::Http,
            inbuf: BytesMut::new(),
            subs: Vec::new(),
            closing: Closing::No,
            recv_armed: false,
            close_sent: false,
            dirty: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight: None,
            sending: false,
        }
    }

    /// True once close has begun: no more pushes are accepted.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing != Closing::No || self.close_sent
    }

    /// Queues a frame unless that would pass `budget` bytes not yet taken by the kernel.
    pub(crate) fn enqueue(&mut self, frame: Bytes, budget: usize) -> Enqueued {
        if self.is_closing() {
            return Enqueued::Discarded;
        }
        if self.queued_bytes + frame.len() > budget {
            return Enqueued::OverBudget;
        }
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
        Enqueued::Yes
    }

    /// Queues a frame regardless of budget and closing state: close frames and
    /// the last HTTP response.
    pub(crate) fn enqueue_final(&mut self, frame: Bytes) {
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Drops frames not yet handed to the kernel (a slow consumer's backlog).
    /// Frames in flight stay: a frame cut in half would corrupt the stream.
    pub(crate) fn discard_queued(&mut self) {
        let dropped: usize = self.queue.iter().map(Bytes::len).sum();
        self.queued_bytes -= dropped;
        self.queue.clear();
        self.queue.shrink_to(0);
    }

    /// True if nothing is queued or in flight.
    pub(crate) fn is_flushed(&self) -> bool {
        self.queue.is_empty() && !self.sending
    }

    /// True if a send is in flight.
    pub(crate) fn is_sending(&self) -> bool {
        self.sending
    }

    /// Moves queued frames into the in-flight buffers and returns the msghdr
    /// for a send, or `None` if nothing is queued or a send is already in flight.
    pub(crate) fn prepare_send(&mut self) -> Option<*const libc::msghdr> {
        if self.sending || self.queue.is_empty() {
            return None;
        }
        let inflight = self.inflight.get_or_insert_with(InFlight::new);
        inflight.frames.clear();
        inflight.iovecs.clear();
        inflight.bytes = 0;
        while inflight.frames.len() < MAX_IOVECS {
            let Some(frame) = self.queue.pop_front() else { break };
            inflight.bytes += frame.len();
            inflight.iovecs.push(libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() });
            inflight.frames.push(frame);
        }
        inflight.msg.msg_iov = inflight.iovecs.as_mut_ptr();
        inflight.msg.msg_iovlen = inflight.iovecs.len() as _;
        self.sending = true;
        Some(&inflight.msg as *const libc::msghdr)
    }

    /// Accounts a finished send of `sent` bytes; unsent remainders go back to
    /// the front of the queue in order. Returns the bytes sent.
    pub(crate) fn complete_send(&mut self, sent: usize) -> usize {
        self.sending = false;
        let Some(inflight) = self.inflight.as_mut() else { return 0 };
        let sent = sent.min(inflight.bytes);
        self.queued_bytes -= sent;
        let mut skip = sent;
        let mut rest = Vec::new();
        for mut frame in inflight.frames.drain(..) {
            if skip >= frame.len() {
                skip -= frame.len();
                continue;
            }
            frame.advance(skip);
            skip = 0;
            rest.push(frame);
        }
        for frame in rest.into_iter().rev() {
            self.queue.push_front(frame);
        }
        inflight.iovecs.clear();
        sent
    }

    /// Forgets everything in flight after a failed send.
    pub(crate) fn fail_send(&mut self) {
        self.sending = false;
        if let Some(inflight) = self.inflight.as_mut() {
            self.queued_bytes -= inflight.bytes;
            inflight.frames.clear();
            inflight.iovecs.clear();
            inflight.bytes = 0;
        }
    }

    /// Releases buffers kept for sends once the queue is empty, so an idle
    /// connection holds no write state.
    pub(crate) fn release_idle_buffers(&mut self) {
        if self.is_flushed() {
            self.inflight = None;
            if self.queue.capacity() > 0 {
                self.queue = VecDeque::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sends_requeue_the_unsent_tail_in_order() {
        let mut c = Conn::new(-1, 0);
        assert_eq!(c.enqueue(Bytes::from_static(b"abc"), 100), Enqueued::Yes);
        assert_eq!(c.enqueue(Bytes::from_static(b"defg"), 100), Enqueued::Yes);
        assert!(c.prepare_send().is_some());
        assert!(c.prepare_send().is_none(), "one send in flight at a time");
        c.enqueue(Bytes::from_static(b"h"), 100);
        assert_eq!(c.complete_send(5), 5);
        let rest: Vec<u8> = c.queue.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(rest, b"fgh");
        assert_eq!(c.queued_bytes, 3);
    }

    #[test]
    fn the_budget_counts_bytes_in_flight_and_refuses_past_it() {
        let mut c = Conn::new(-1, 0);
        c.enqueue(Bytes::from(vec![0; 60]), 100);
        c.prepare_send();
        assert_eq!(c.enqueue(Bytes::from(vec![0; 50]), 100), Enqueued::OverBudget);
        c.complete_send(60);
        assert_eq!(c.enqueue(Bytes::from(vec![0; 50]), 100), Enqueued::Yes);
    }

    #[test]
    fn discarding_keeps_frames_in_flight() {
        let mut c = Conn::new(-1, 0);
        c.enqueue(Bytes::from_static(b"in-flight"), 100);
        c.prepare_send();
        c.enqueue(Bytes::from_static(b"queued"), 100);
        c.discard_queued();
        assert_eq!(c.queued_bytes, 9);
        c.complete_send(9);
        assert!(c.is_flushed());
    }
}
