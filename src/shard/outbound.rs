//! A connection's outbound queue: shared frames waiting for the kernel, and
//! the buffers of the one send in flight.
//!
//! Plain data, no I/O: the shard asks for a `msghdr` to submit and reports
//! how many bytes the kernel took. A send takes everything queued (up to
//! `IOV_MAX` frames) as one iovec array. While the kernel holds a send, its
//! buffers and iovecs live in a boxed [`InFlight`], so they do not move when
//! the connection slab grows.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Frames per send: Linux's `IOV_MAX`.
const MAX_IOVECS: usize = 1024;

/// Buffers owned by the kernel during a send.
struct InFlight {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
    msg: libc::msghdr,
    /// Bytes this send carries.
    bytes: usize,
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

/// Outcome of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; the connection may need a send.
    Yes,
    /// The connection is closing; the frame was discarded.
    Discarded,
    /// Over the outbound budget: the caller must close it as a slow consumer.
    OverBudget,
}

/// The outbound side of one connection.
#[derive(Default)]
pub struct Outbound {
    queue: VecDeque<Bytes>,
    /// Bytes queued and in flight that the kernel has not taken yet.
    queued_bytes: usize,
    inflight: Option<Box<InFlight>>,
    sending: bool,
}

impl Outbound {
    /// Queues a frame unless that would pass `budget` bytes not yet taken by the kernel.
    pub fn enqueue(&mut self, frame: Bytes, budget: usize) -> Enqueued {
        if self.queued_bytes + frame.len() > budget {
            return Enqueued::OverBudget;
        }
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
        Enqueued::Yes
    }

    /// Queues a frame regardless of budget and closing state: close frames and
    /// the last HTTP response.
    pub fn enqueue_final(&mut self, frame: Bytes) {
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
    }

    /// Drops frames not yet handed to the kernel (a slow consumer's backlog).
    /// Frames in flight stay: a frame cut in half would corrupt the stream.
    pub fn discard_queued(&mut self) {
        let dropped: usize = self.queue.iter().map(Bytes::len).sum();
        self.queued_bytes -= dropped;
        self.queue.clear();
        self.queue.shrink_to(0);
    }

    /// True if nothing is queued or in flight.
    pub fn is_flushed(&self) -> bool {
        self.queue.is_empty() && !self.sending
    }

    /// True if a send is in flight.
    pub fn is_sending(&self) -> bool {
        self.sending
    }

    /// Moves queued frames into the in-flight buffers and returns the msghdr
    /// for a send, or `None` if nothing is queued or a send is already in flight.
    pub fn prepare_send(&mut self) -> Option<*const libc::msghdr> {
        if self.sending || self.queue.is_empty() {
            return None;
        }
        let inflight = self.inflight.get_or_insert_with(InFlight::new);
        inflight.frames.clear();
        inflight.iovecs.clear();
        inflight.bytes = 0;
        while inflight.frames.len() < MAX_IOVECS {
            let Some(frame) = self.queue.pop_front() else {
                break;
            };
            inflight.bytes += frame.len();
            inflight.iovecs.push(libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            });
            inflight.frames.push(frame);
        }
        inflight.msg.msg_iov = inflight.iovecs.as_mut_ptr();
        inflight.msg.msg_iovlen = inflight.iovecs.len() as _;
        self.sending = true;
        Some(&inflight.msg as *const libc::msghdr)
    }

    /// Accounts a finished send of `sent` bytes; unsent remainders go back to
    /// the front of the queue in order. Returns the bytes sent.
    pub fn complete_send(&mut self, sent: usize) -> usize {
        self.sending = false;
        let Some(inflight) = self.inflight.as_mut() else {
            return 0;
        };
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
    pub fn fail_send(&mut self) {
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
    pub fn release_idle_buffers(&mut self) {
        if self.is_flushed() {
            self.inflight = None;
            if self.queue.capacity() > 0 {
                self.queue = VecDeque::new();
            }
        }
    }

    /// Bytes queued or in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sends_requeue_the_unsent_tail_in_order() {
        let mut c = Outbound::default();
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
        let mut c = Outbound::default();
        c.enqueue(Bytes::from(vec![0; 60]), 100);
        c.prepare_send();
        assert_eq!(
            c.enqueue(Bytes::from(vec![0; 50]), 100),
            Enqueued::OverBudget
        );
        c.complete_send(60);
        assert_eq!(c.enqueue(Bytes::from(vec![0; 50]), 100), Enqueued::Yes);
    }

    #[test]
    fn discarding_keeps_frames_in_flight() {
        let mut c = Outbound::default();
        c.enqueue(Bytes::from_static(b"in-flight"), 100);
        c.prepare_send();
        c.enqueue(Bytes::from_static(b"queued"), 100);
        c.discard_queued();
        assert_eq!(c.queued_bytes, 9);
        c.complete_send(9);
        assert!(c.is_flushed());
    }
}
