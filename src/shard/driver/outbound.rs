//! A connection's outbound queue: shared frames waiting for the kernel, and
//! the buffers of the one send in flight.
//!
//! Plain data, no I/O: the shard asks for a `msghdr` to submit and reports
//! how many bytes the kernel took. A send takes everything queued (up to
//! `IOV_MAX` frames) as one iovec array. While the kernel holds a send, its
//! buffers and iovecs live in a boxed `InFlight`, so they do not move when
//! the connection slab grows. When a connection has nothing left to send it
//! hands its whole queue to the shard's [`SendBuffers`] pool, so an idle
//! connection holds one empty pointer of write state and a busy shard does
//! not allocate per delivery.

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
    /// The first frame is the tail of a frame already partly sent.
    first_partial: bool,
}

impl InFlight {
    fn new() -> Box<InFlight> {
        Box::new(InFlight {
            frames: Vec::new(),
            iovecs: Vec::new(),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            bytes: 0,
            first_partial: false,
        })
    }
}

/// Queues the pool keeps per shard. A pooled queue is about 200 bytes (its
/// inner buffers are shrunk first), so the pool stays under a few megabytes;
/// 16,384 covers a broadcast to that many subscribers of one shard without a
/// malloc per subscriber per publish, which cost more than the rest of the
/// in-memory fan-out together (criterion, fanout/one_publish_to_10k).
const POOLED_QUEUES: usize = 16_384;
/// Inner buffers that grew past this many entries (a burst to a slow reader)
/// are freed before a queue is pooled, so the pool does not hoard them.
const POOLED_MAX_ENTRIES: usize = 8;

/// A shard's send side shared by its connections: the pool of queues
/// released by idle connections, and the bytes queued across all of them,
/// bounded by the shard's outbound budget.
pub struct SendBuffers {
    // Boxed on purpose: a connection takes one out, and the kernel reads the
    // msghdr and iovecs inside by address, which must not move.
    #[allow(clippy::vec_box)]
    queues: Vec<Box<Queue>>,
    /// Bytes queued or in flight on every connection of the shard. A frame
    /// shared by many connections (one publication) counts once per
    /// connection: an upper bound of the memory they pin.
    queued_bytes: usize,
    /// Most `queued_bytes` a connection that already has bytes queued may
    /// add to; past it, that connection is closed as a slow consumer.
    limit: usize,
}

impl Default for SendBuffers {
    fn default() -> Self {
        SendBuffers::new(usize::MAX)
    }
}

impl SendBuffers {
    /// An empty pool for a shard whose connections may queue `limit` bytes together.
    pub fn new(limit: usize) -> SendBuffers {
        SendBuffers {
            queues: Vec::new(),
            queued_bytes: 0,
            limit,
        }
    }

    /// Bytes queued or in flight on every connection of the shard.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The shard's outbound budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.queued_bytes, "released more than was queued");
        self.queued_bytes -= bytes;
    }
}

/// Outcome of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; the connection may need a send.
    Yes,
    /// Over the connection's outbound budget: the caller must close it as a
    /// slow consumer.
    OverBudget,
    /// The shard's connections together are over the shard's outbound
    /// budget, and this one is behind (it has bytes queued): the caller
    /// must close it as a slow consumer. A connection with nothing queued
    /// always takes its frame, so readers that keep up are never cut for
    /// what the slow ones hold.
    OverShardBudget,
}

/// What to submit for a connection's next send.
#[derive(Debug, Clone, Copy)]
pub enum SendPlan {
    /// Exactly one frame is queued: a plain `send` of these bytes.
    One {
        /// Start of the bytes.
        ptr: *const u8,
        /// Their length.
        len: usize,
    },
    /// Several frames: a `sendmsg` whose iovecs are all of them.
    Many(*const libc::msghdr),
}

/// What the kernel holds during a send.
enum Sending {
    Idle,
    /// One frame; `partial` if it is the tail of a frame already partly sent.
    One {
        frame: Bytes,
        partial: bool,
    },
    /// The frames in `inflight`.
    Many,
}

/// The queue of a connection with something to send.
///
/// Frames leave in order: first the unsent tail of a frame the kernel has
/// taken part of (`partial`), then the queue. The oldest queued frame lives
/// inline in `head`, so the common case of a subscriber that takes each push
/// as it comes allocates nothing: the frame moves from `head` into
/// `Sending::One` and is sent with a plain `send`. Only a backlog of two or
/// more frames uses `rest` and the vectored path.
struct Queue {
    /// The rest of a frame whose beginning is on the wire. It must go out
    /// before anything else, whole, and discarding never touches it: anything
    /// written after half a frame would be read as the rest of that frame.
    partial: Option<Bytes>,
    /// Oldest queued frame; `None` implies `rest` is empty.
    head: Option<Bytes>,
    rest: VecDeque<Bytes>,
    /// Bytes queued, partial or in flight that the kernel has not taken yet.
    queued_bytes: usize,
    sending: Sending,
    inflight: Option<Box<InFlight>>,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            partial: None,
            head: None,
            rest: VecDeque::new(),
            queued_bytes: 0,
            sending: Sending::Idle,
            inflight: None,
        }
    }
}

impl Queue {
    fn push_back(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.queued_bytes += frame.len();
        if self.head.is_none() {
            self.head = Some(frame);
            return;
        }
        self.rest.push_back(frame);
    }

    /// Puts an untouched frame back in front of everything queued.
    fn push_front(&mut self, frame: Bytes) {
        if let Some(old) = self.head.replace(frame) {
            self.rest.push_front(old);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        let frame = self.head.take()?;
        self.head = self.rest.pop_front();
        Some(frame)
    }

    /// Drops frames not yet handed to the kernel (a slow consumer's backlog).
    /// Frames in flight and a partly sent frame's tail stay: a frame cut in
    /// half would corrupt the stream.
    fn discard_queued(&mut self) {
        let dropped: usize = self
            .head
            .iter()
            .chain(self.rest.iter())
            .map(Bytes::len)
            .sum();
        self.queued_bytes -= dropped;
        self.head = None;
        self.rest = VecDeque::new();
    }

    /// True if nothing is queued or in flight.
    fn is_flushed(&self) -> bool {
        self.head.is_none() && self.partial.is_none() && !self.is_sending()
    }

    /// True if a send is in flight.
    fn is_sending(&self) -> bool {
        !matches!(self.sending, Sending::Idle)
    }

    /// Hands queued frames to the in-flight state and says what to submit, or
    /// `None` if nothing is queued or a send is already in flight. The pointers
    /// stay valid until `complete_send` or `fail_send`.
    fn prepare_send(&mut self) -> Option<SendPlan> {
        if self.is_sending() {
            return None;
        }
        let frames = usize::from(self.partial.is_some())
            + usize::from(self.head.is_some())
            + self.rest.len();
        match frames {
            0 => None,
            1 => {
                let (frame, partial) = match self.partial.take() {
                    Some(frame) => (frame, true),
                    None => (self.head.take()?, false),
                };
                let plan = SendPlan::One {
                    ptr: frame.as_ptr(),
                    len: frame.len(),
                };
                self.sending = Sending::One { frame, partial };
                Some(plan)
            }
            _ => Some(self.prepare_many()),
        }
    }

    fn prepare_many(&mut self) -> SendPlan {
        let mut inflight = self.inflight.take().unwrap_or_else(InFlight::new);
        inflight.frames.clear();
        inflight.iovecs.clear();
        inflight.bytes = 0;
        inflight.first_partial = self.partial.is_some();
        let mut next = self.partial.take();
        while inflight.frames.len() < MAX_IOVECS {
            let Some(frame) = next.take().or_else(|| self.pop_front()) else {
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
        let msg = &inflight.msg as *const libc::msghdr;
        self.inflight = Some(inflight);
        self.sending = Sending::Many;
        SendPlan::Many(msg)
    }

    /// Accounts a finished send of `sent` bytes: a frame the kernel took part
    /// of keeps its tail in the partial slot, untouched frames go back to the
    /// front of the queue in order. Returns the bytes sent.
    fn complete_send(&mut self, sent: usize) -> usize {
        match std::mem::replace(&mut self.sending, Sending::Idle) {
            Sending::Idle => 0,
            Sending::One { frame, partial } => {
                let sent = sent.min(frame.len());
                self.queued_bytes -= sent;
                self.put_back(frame, sent, partial);
                sent
            }
            Sending::Many => {
                let Some(mut inflight) = self.inflight.take() else {
                    return 0;
                };
                let sent = sent.min(inflight.bytes);
                self.queued_bytes -= sent;
                let mut skip = sent;
                let mut unsent = Vec::new();
                for (i, frame) in inflight.frames.drain(..).enumerate() {
                    if skip >= frame.len() {
                        skip -= frame.len();
                        continue;
                    }
                    let was_partial = i == 0 && inflight.first_partial;
                    unsent.push((frame, skip, was_partial));
                    skip = 0;
                }
                inflight.iovecs.clear();
                self.inflight = Some(inflight);
                for (frame, taken, was_partial) in unsent.into_iter().rev() {
                    self.put_back(frame, taken, was_partial);
                }
                sent
            }
        }
    }

    /// Returns an unsent frame or tail: into the partial slot if any of the
    /// frame is already on the wire, else to the front of the queue.
    fn put_back(&mut self, mut frame: Bytes, taken: usize, was_partial: bool) {
        if taken >= frame.len() {
            return;
        }
        if taken > 0 || was_partial {
            frame.advance(taken);
            self.partial = Some(frame);
        } else {
            self.push_front(frame);
        }
    }

    /// Forgets everything in flight after a failed send: the connection is
    /// going away.
    fn fail_send(&mut self) {
        match std::mem::replace(&mut self.sending, Sending::Idle) {
            Sending::Idle => {}
            Sending::One { frame, .. } => self.queued_bytes -= frame.len(),
            Sending::Many => {
                if let Some(inflight) = self.inflight.as_mut() {
                    self.queued_bytes -= inflight.bytes;
                    inflight.frames.clear();
                    inflight.iovecs.clear();
                    inflight.bytes = 0;
                }
            }
        }
    }

    /// Drops inner buffers that grew for a burst, so a pooled queue stays small.
    fn shrink(&mut self) {
        if self.rest.capacity() > POOLED_MAX_ENTRIES {
            self.rest = VecDeque::new();
        }
        if self
            .inflight
            .as_ref()
            .is_some_and(|i| i.frames.capacity() > POOLED_MAX_ENTRIES)
        {
            self.inflight = None;
        }
        if let Some(inflight) = self.inflight.as_mut() {
            inflight.frames.clear();
            inflight.iovecs.clear();
        }
    }
}

/// The outbound side of one connection: nothing at all while idle (the
/// common state of a subscriber between pushes), a pooled `Queue` while
/// anything is queued or in flight.
#[derive(Default)]
pub struct Outbound {
    queue: Option<Box<Queue>>,
}

impl Outbound {
    fn queue(&mut self, pool: &mut SendBuffers) -> &mut Queue {
        self.queue
            .get_or_insert_with(|| pool.queues.pop().unwrap_or_default())
    }

    /// Queues a frame unless that would pass `budget` bytes not yet taken by
    /// the kernel, or the shard's budget while this connection is behind.
    /// A connection with nothing queued takes its frame whatever its size
    /// (a response the node made, such as `/metrics`, or a publication
    /// within the message limit): it is not behind, and the frame goes out
    /// alone; anything queued behind a frame over the budget is over it.
    /// So a connection holds at most its budget, or one frame.
    pub fn enqueue(&mut self, frame: Bytes, budget: usize, pool: &mut SendBuffers) -> Enqueued {
        let queued = self.queued_bytes();
        if queued > 0 {
            if frame.len() > budget.saturating_sub(queued) {
                return Enqueued::OverBudget;
            }
            if frame.len() > pool.limit.saturating_sub(pool.queued_bytes) {
                return Enqueued::OverShardBudget;
            }
        }
        self.enqueue_final(frame, pool);
        Enqueued::Yes
    }

    /// Queues a frame regardless of budget: close frames (at most 131 bytes).
    pub fn enqueue_final(&mut self, frame: Bytes, pool: &mut SendBuffers) {
        pool.queued_bytes += frame.len();
        self.queue(pool).push_back(frame);
    }

    /// Drops frames not yet handed to the kernel (a slow consumer's backlog),
    /// but the oldest if `keep_first`. Frames in flight and a partly sent
    /// frame's tail stay: a frame cut in half would corrupt the stream.
    pub fn discard_queued(&mut self, keep_first: bool, pool: &mut SendBuffers) {
        if let Some(queue) = self.queue.as_mut() {
            let before = queue.queued_bytes;
            let first = keep_first.then(|| queue.pop_front()).flatten();
            if let Some(first) = &first {
                queue.queued_bytes -= first.len();
            }
            queue.discard_queued();
            if let Some(first) = first {
                queue.push_back(first);
            }
            pool.release(before - queue.queued_bytes);
        }
    }

    /// Gives back the shard's count of whatever is left (a partly sent
    /// frame's tail) when the connection is freed.
    pub fn release(&mut self, pool: &mut SendBuffers) {
        if let Some(queue) = self.queue.as_mut() {
            debug_assert!(!queue.is_sending(), "freed with a send in flight");
            pool.release(queue.queued_bytes);
            queue.queued_bytes = 0;
        }
    }

    /// True if nothing is queued or in flight.
    pub fn is_flushed(&self) -> bool {
        self.queue.as_ref().map_or(true, |q| q.is_flushed())
    }

    /// True if a send is in flight.
    pub fn is_sending(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| q.is_sending())
    }

    /// Hands queued frames to the in-flight state and says what to submit, or
    /// `None` if nothing is queued or a send is already in flight. The pointers
    /// stay valid until `complete_send` or `fail_send`.
    pub fn prepare_send(&mut self) -> Option<SendPlan> {
        self.queue.as_mut()?.prepare_send()
    }

    /// Accounts a finished send of `sent` bytes: a frame the kernel took part
    /// of keeps its tail in the partial slot, untouched frames go back to the
    /// front of the queue in order. Returns the bytes sent.
    pub fn complete_send(&mut self, sent: usize, pool: &mut SendBuffers) -> usize {
        let sent = self.queue.as_mut().map_or(0, |q| q.complete_send(sent));
        pool.release(sent);
        sent
    }

    /// Forgets everything in flight after a failed send: the connection is
    /// going away.
    pub fn fail_send(&mut self, pool: &mut SendBuffers) {
        if let Some(queue) = self.queue.as_mut() {
            let before = queue.queued_bytes;
            queue.fail_send();
            pool.release(before - queue.queued_bytes);
        }
    }

    /// Once nothing is queued or in flight, gives the queue back to the
    /// shard's pool, so an idle connection holds no write state.
    pub fn release_idle_buffers(&mut self, pool: &mut SendBuffers) {
        if !self.is_flushed() {
            return;
        }
        if let Some(mut queue) = self.queue.take() {
            if pool.queues.len() < POOLED_QUEUES {
                queue.shrink();
                pool.queues.push(queue);
            }
        }
    }

    /// Bytes queued or in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.queued_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte not yet taken by the kernel, in the order it will be sent.
    fn pending(c: &Outbound) -> Vec<u8> {
        let Some(q) = c.queue.as_ref() else {
            return Vec::new();
        };
        q.partial
            .iter()
            .chain(q.head.iter())
            .chain(q.rest.iter())
            .flat_map(|b| b.iter().copied())
            .collect()
    }

    #[test]
    fn partial_sends_requeue_the_unsent_tail_in_order() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        assert_eq!(
            c.enqueue(Bytes::from_static(b"abc"), 100, &mut pool),
            Enqueued::Yes
        );
        assert_eq!(
            c.enqueue(Bytes::from_static(b"defg"), 100, &mut pool),
            Enqueued::Yes
        );
        assert!(c.prepare_send().is_some());
        assert!(c.prepare_send().is_none(), "one send in flight at a time");
        c.enqueue(Bytes::from_static(b"h"), 100, &mut pool);
        assert_eq!(c.complete_send(5, &mut pool), 5);
        assert_eq!(pending(&c), b"fgh");
        assert_eq!(c.queued_bytes(), 3);
    }

    #[test]
    fn the_budget_counts_bytes_in_flight_and_refuses_past_it() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        c.enqueue(Bytes::from(vec![0; 60]), 100, &mut pool);
        c.prepare_send();
        assert_eq!(
            c.enqueue(Bytes::from(vec![0; 50]), 100, &mut pool),
            Enqueued::OverBudget
        );
        c.complete_send(60, &mut pool);
        assert_eq!(
            c.enqueue(Bytes::from(vec![0; 50]), 100, &mut pool),
            Enqueued::Yes
        );
    }

    #[test]
    fn a_connection_with_nothing_queued_takes_a_frame_over_its_budget_alone() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        assert_eq!(
            c.enqueue(Bytes::from(vec![0; 300]), 100, &mut pool),
            Enqueued::Yes,
            "nothing queued: the frame goes out whatever its size"
        );
        assert_eq!(
            c.enqueue(Bytes::from_static(b"x"), 100, &mut pool),
            Enqueued::OverBudget,
            "behind it, the connection is over its budget"
        );
        c.prepare_send();
        c.complete_send(300, &mut pool);
        assert_eq!(
            c.enqueue(Bytes::from_static(b"x"), 100, &mut pool),
            Enqueued::Yes
        );
    }

    #[test]
    fn discarding_keeps_frames_in_flight() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        c.enqueue(Bytes::from_static(b"in-flight"), 100, &mut pool);
        c.prepare_send();
        c.enqueue(Bytes::from_static(b"queued"), 100, &mut pool);
        c.discard_queued(false, &mut pool);
        assert_eq!(c.queued_bytes(), 9);
        c.complete_send(9, &mut pool);
        assert!(c.is_flushed());
    }

    #[test]
    fn an_idle_connection_returns_its_queue_to_the_pool_and_the_next_reuses_it() {
        let mut pool = SendBuffers::default();
        let mut a = Outbound::default();
        a.enqueue(Bytes::from_static(b"x"), 100, &mut pool);
        a.enqueue(Bytes::from_static(b"z"), 100, &mut pool);
        a.prepare_send();
        a.release_idle_buffers(&mut pool);
        assert!(pool.queues.is_empty(), "nothing released while sending");
        a.complete_send(2, &mut pool);
        a.release_idle_buffers(&mut pool);
        assert_eq!(pool.queues.len(), 1);
        assert!(a.queue.is_none(), "an idle connection holds no queue");
        assert!(
            pool.queues[0].inflight.is_some(),
            "the pooled queue keeps its small send buffers"
        );
        let mut b = Outbound::default();
        b.enqueue(Bytes::from_static(b"y"), 100, &mut pool);
        b.enqueue(Bytes::from_static(b"w"), 100, &mut pool);
        b.prepare_send();
        assert!(pool.queues.is_empty(), "reused");
    }

    #[test]
    fn a_single_frame_is_sent_inline_without_buffers() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        c.enqueue(Bytes::from_static(b"hello"), 100, &mut pool);
        match c.prepare_send() {
            Some(SendPlan::One { len, .. }) => assert_eq!(len, 5),
            other => panic!("expected a plain send, got {other:?}"),
        }
        let queue = c.queue.as_ref().unwrap();
        assert!(queue.inflight.is_none() && queue.rest.capacity() == 0);
        c.enqueue(Bytes::from_static(b"!"), 100, &mut pool);
        assert_eq!(c.complete_send(2, &mut pool), 2);
        assert_eq!(
            pending(&c),
            b"llo!",
            "the unsent tail stays ahead of newer frames"
        );
        assert_eq!(c.queued_bytes(), 4);
    }

    #[test]
    fn discarding_after_a_short_send_keeps_the_tail_of_the_cut_frame() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        c.enqueue(Bytes::from_static(b"frame-one"), 100, &mut pool);
        c.enqueue(Bytes::from_static(b"frame-two"), 100, &mut pool);
        c.prepare_send();
        assert_eq!(
            c.complete_send(4, &mut pool),
            4,
            "the kernel took half of frame-one"
        );
        c.discard_queued(false, &mut pool);
        c.enqueue_final(Bytes::from_static(b"close"), &mut pool);
        assert_eq!(
            pending(&c),
            b"e-oneclose",
            "the rest of the cut frame goes out before the close, frame-two is dropped"
        );
        assert_eq!(c.queued_bytes(), 10);
    }

    #[test]
    fn a_tail_sent_with_zero_progress_stays_partial() {
        let mut pool = SendBuffers::default();
        let mut c = Outbound::default();
        c.enqueue(Bytes::from_static(b"abcdef"), 100, &mut pool);
        c.prepare_send();
        c.complete_send(2, &mut pool);
        c.enqueue(Bytes::from_static(b"next"), 100, &mut pool);
        c.prepare_send();
        c.complete_send(0, &mut pool);
        c.discard_queued(false, &mut pool);
        assert_eq!(
            pending(&c),
            b"cdef",
            "the tail survives a send that took nothing"
        );
        c.prepare_send();
        c.complete_send(4, &mut pool);
        assert!(c.is_flushed());
    }

    #[test]
    fn the_shard_counts_every_queued_byte_and_gets_them_all_back() {
        let mut pool = SendBuffers::new(1000);
        let mut a = Outbound::default();
        let mut b = Outbound::default();
        a.enqueue(Bytes::from(vec![0; 100]), 500, &mut pool);
        a.enqueue(Bytes::from(vec![0; 50]), 500, &mut pool);
        b.enqueue(Bytes::from(vec![0; 30]), 500, &mut pool);
        assert_eq!(pool.queued_bytes(), 180);
        a.prepare_send();
        a.complete_send(120, &mut pool);
        assert_eq!(pool.queued_bytes(), 60, "30 of a's and b's 30");
        a.discard_queued(false, &mut pool);
        assert_eq!(pool.queued_bytes(), 60, "a's partly sent tail stays");
        b.enqueue_final(Bytes::from_static(b"close"), &mut pool);
        assert_eq!(pool.queued_bytes(), 65);
        a.release(&mut pool);
        b.release(&mut pool);
        assert_eq!(pool.queued_bytes(), 0);
    }

    #[test]
    fn past_the_shard_budget_only_a_connection_that_is_behind_is_refused() {
        let mut pool = SendBuffers::new(100);
        let mut slow = Outbound::default();
        let mut fresh = Outbound::default();
        assert_eq!(
            slow.enqueue(Bytes::from(vec![0; 90]), 1000, &mut pool),
            Enqueued::Yes
        );
        assert_eq!(
            slow.enqueue(Bytes::from(vec![0; 20]), 1000, &mut pool),
            Enqueued::OverShardBudget
        );
        assert_eq!(
            fresh.enqueue(Bytes::from(vec![0; 20]), 1000, &mut pool),
            Enqueued::Yes,
            "a connection with nothing queued always takes its frame"
        );
        assert_eq!(
            fresh.enqueue(Bytes::from(vec![0; 1]), 1000, &mut pool),
            Enqueued::OverShardBudget
        );
    }
}
