//! The bus between shards: one bounded lock-free queue per ordered pair of
//! shards, and an eventfd per shard to wake it.
//!
//! It knows envelopes and queues, not sockets. Queues are created at start-up
//! and kept for the life of the process. A push to a full queue hands the
//! envelope back to the caller, who decides: publishes are dropped and counted,
//! control envelopes wait in the sender's backlog (see [`Outbox`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;

use crate::engine::{Page, StreamLimit};

mod members;
pub use members::{user_of, MemberQuery, Members};

/// Index of a shard, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

/// The shard of `shards` that decides for `name` on a node: a hash of the
/// name, the same on every shard and the broker (SipHash with fixed keys).
pub fn shard_of(name: &str, shards: usize) -> ShardId {
    use std::hash::{DefaultHasher, Hash, Hasher};
    debug_assert!(shards > 0, "a node has a shard");
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    ShardId((hasher.finish() % shards as u64) as usize)
}

/// Set of shards as a bitmask; the config caps shards at 64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSet(pub u64);

// One bit per member: every shard and the cluster broker after them.
const _: () = assert!(crate::config::MAX_SHARDS < u64::BITS as usize);

impl ShardSet {
    /// Adds a shard.
    pub fn insert(&mut self, shard: ShardId) {
        self.0 |= 1 << shard.0;
    }
    /// Removes a shard.
    pub fn remove(&mut self, shard: ShardId) {
        self.0 &= !(1 << shard.0);
    }
    /// True if no shard is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The shards in the set, lowest first.
    pub fn iter(self) -> impl Iterator<Item = ShardId> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(ShardId(i))
        })
    }
}

/// Which of a shard's name indexes an interest notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexKind {
    /// Topic -> relay subscribers.
    Topic,
    /// User id -> that user's relay connections.
    User,
    /// User id -> that user's `/chat` connections.
    Chat,
}

/// A message from one shard to another.
#[derive(Debug)]
pub enum Envelope {
    /// Deliver an already framed push to the local subscribers of `topic`.
    Publish {
        /// Topic name.
        topic: Arc<str>,
        /// The complete WebSocket frame, shared with every other receiver.
        frame: Bytes,
    },
    /// Deliver a framed push to the local connections of `user` that hold `topic`.
    UserPublish {
        /// The user id.
        user: Arc<str>,
        /// Topic name.
        topic: Arc<str>,
        /// The complete WebSocket frame.
        frame: Bytes,
    },
    /// Deliver a framed chat line to the local `/chat` connections of `user`.
    Chat {
        /// The recipient's user id.
        user: Arc<str>,
        /// The complete WebSocket frame.
        frame: Bytes,
    },
    /// The sender gained (`on`) or lost its first/last local holder of `name`.
    Interest {
        /// Which index.
        kind: IndexKind,
        /// Topic name or user id.
        name: Arc<str>,
        /// Gained or lost.
        on: bool,
        /// Echoed in the ack so the sender can match it to this notice.
        epoch: u64,
    },
    /// The receiver has recorded an `Interest { on: true }` notice: traffic it
    /// accepts from now on will be forwarded to the sender.
    InterestAck {
        /// Which index.
        kind: IndexKind,
        /// Topic name or user id.
        name: Arc<str>,
        /// The epoch of the notice acknowledged.
        epoch: u64,
    },
    /// A Pusher presence channel's member (a user) gained (`joined`) or
    /// lost a connection on the sending shard: for the channel's home
    /// shard, which counts each user's connections on the node and tells
    /// the channel when a user comes or goes.
    PusherMember {
        /// The channel's core topic.
        topic: Arc<str>,
        /// The member's meta, `{"user_id":U,"user_info":I}`.
        meta: Arc<str>,
        /// The user id in the meta.
        user: Arc<str>,
        joined: bool,
        /// A joining connection's socket id: its own `member_added` is
        /// not sent to it.
        socket: Option<Box<str>>,
    },
    /// A user's first connection on this node to a Pusher presence
    /// channel came (`joined`), or its last one went: from the channel's
    /// home shard to the cluster broker, which records it in Redis, where
    /// it is decided once for the cluster whether the user came or went;
    /// answered with `MemberDecided`.
    MemberTransition {
        /// Returned in the answer.
        ticket: u64,
        /// The channel's core topic.
        topic: Arc<str>,
        /// The user id.
        user: Arc<str>,
        /// The member's meta, `{"user_id":U,"user_info":I}`.
        meta: Arc<str>,
        joined: bool,
        /// The `member_added` or `member_removed` push, framed: Redis
        /// publishes it to the channel in the step that decides, so the
        /// channel hears its members' comings and goings in the order they
        /// were decided. `None` for a stream topic (a presence cache
        /// channel), whose pushes its home orders: the shard publishes.
        frame: Option<Bytes>,
    },
    /// The broker's answer to a `MemberTransition`: whether the shard
    /// tells the channel itself (Redis is away, or it decided for a
    /// transition without a frame).
    MemberDecided {
        /// The transition's ticket.
        ticket: u64,
        tell: bool,
    },
    /// Users of a Pusher presence channel that came or went for the whole
    /// cluster without a transition of this node's (from the broker: the
    /// users of a node that died, or this node's, back after Redis lost
    /// them): the receiving shard tells the channel.
    MembersChanged {
        /// The channel's core topic.
        topic: Arc<str>,
        /// Metas of the users who came, `{"user_id":U,"user_info":I}`.
        added: Vec<Arc<str>>,
        /// Ids of the users who went.
        removed: Vec<String>,
    },
    /// Record a client registration (every shard keeps every registration).
    Register {
        /// Returned in the `Ack`.
        ticket: u64,
        /// Registration id.
        id: Arc<str>,
        /// Its user id.
        user: Arc<str>,
        /// Topics its connection starts with.
        topics: Arc<[String]>,
    },
    /// Forget a registration and close its live connections with 1000.
    Unregister {
        /// Returned in the `Ack`.
        ticket: u64,
        /// Registration id.
        id: Arc<str>,
    },
    /// Count the receiver's presence members of `topic` and reply with
    /// the page of them the query asks for.
    PresenceQuery {
        /// Returned in the reply.
        ticket: u64,
        /// Topic name.
        topic: Arc<str>,
        /// The members wanted.
        query: MemberQuery,
    },
    /// A connection's presence in `topic` began (`meta`) or ended (`None`):
    /// to the cluster broker, which keeps the node's members in Redis.
    PresenceChange {
        /// Topic name.
        topic: Arc<str>,
        /// The member's connection id on this node.
        conn_id: String,
        /// Its presence meta (a JSON object), or `None` when it left.
        meta: Option<Arc<str>>,
    },
    /// One shard's presence members of the topic asked about.
    PresenceReply {
        /// The query's ticket.
        ticket: u64,
        /// Its count and page of members (boxed: envelopes queue by the
        /// thousand).
        members: Box<Members>,
    },
    /// The receiver has applied the envelope carrying `ticket`.
    Ack {
        /// The ticket.
        ticket: u64,
    },
    /// A publication of a stream topic for its home shard, which assigns
    /// its offset and fans it out. `ticket` asks for a `StreamReply` (an
    /// HTTP publish waits for its offset).
    StreamPublish {
        /// Topic name.
        topic: Arc<str>,
        /// Event name.
        event: String,
        /// The payload as JSON text.
        payload: String,
        /// Reply ticket, if the publisher waits for the outcome.
        ticket: Option<u64>,
        /// The publisher's idempotency key: a retry with it is answered
        /// with the first outcome and not stored again.
        idempotency_key: Option<Box<str>>,
    },
    /// A subscriber on the sender opens a stream topic, or asks for the next
    /// page of its replay: the home answers with `StreamOpened` (the
    /// position, and a page of what to replay). Sent only once the home
    /// routes the topic's publications to the sender, so everything after
    /// the position follows the answer on the same ordered queue.
    StreamOpen {
        /// Returned in the answer.
        ticket: u64,
        /// Topic name.
        topic: Arc<str>,
        /// The position to recover from: the client's, or where the replay
        /// has reached.
        since: Option<(u64, Arc<str>)>,
        /// Publications at or before this offset are last values (sent
        /// marked); 0 for none.
        mark_through: u64,
    },
    /// The home's answer to `StreamOpen`: a page, or the stream limit
    /// that kept the stream from being opened.
    StreamOpened {
        /// The request's ticket.
        ticket: u64,
        /// Boxed: envelopes queue by the thousand, and pages are rare.
        answer: Result<Box<Page>, StreamLimit>,
    },
    /// `GET /topics/{topic}/history` for the stream's home.
    StreamQuery {
        /// Returned in the `StreamReply`.
        ticket: u64,
        /// Topic name.
        topic: Arc<str>,
        /// Publications after this offset; all retained when absent.
        since: Option<u64>,
        /// The epoch `since` belongs to, if the client gave it.
        epoch: Option<String>,
        /// Most publications to return (the answer also stops at a page's
        /// bytes and names where the next page starts).
        limit: usize,
    },
    /// An HTTP answer from a stream's home: to a ticketed `StreamPublish` or a `StreamQuery`.
    StreamReply {
        /// The request's ticket.
        ticket: u64,
        /// HTTP status.
        status: u16,
        /// JSON body.
        body: Bytes,
    },
    /// A publication for the other nodes of a cluster, to the broker.
    /// `seq` numbers the node's publications in the order they were
    /// accepted (one counter for all shards): the broker sends them to Redis
    /// in that order, so a publisher's sequential publishes, accepted on
    /// different shards, reach the other nodes in order.
    ForNodes {
        /// Position in the node's order of accepted publications.
        seq: u64,
        /// Topic, user (publish to a user) or chat user (chat line).
        kind: IndexKind,
        /// The topic or user id.
        name: Arc<str>,
        /// For a publish to a user: the topic the user's connections must hold.
        topic: Option<Arc<str>>,
        /// The complete WebSocket frame.
        frame: Bytes,
    },
    /// The sender has stopped accepting publishes (it is shutting down):
    /// everything it published to the receiver is ahead of this marker.
    Drained,
    /// Stop accepting, close every connection with 1001, and exit.
    Shutdown,
    /// The backend's verdict on the subscription waiting under `ticket`
    /// (from the proxy thread, on the shard's own queue).
    ProxyVerdict {
        ticket: u64,
        verdict: crate::proxy::Verdict,
    },
}

impl Envelope {
    /// A home's HTTP answer to ticket `ticket`, for the shard that asked.
    pub fn stream_reply(ticket: u64, response: &crate::protocol::http::Response) -> Envelope {
        Envelope::StreamReply {
            ticket,
            status: response.status(),
            body: response.body().clone(),
        }
    }

    /// Control envelopes must never be dropped: losing one corrupts routing state.
    pub fn is_control(&self) -> bool {
        !matches!(
            self,
            Envelope::Publish { .. }
                | Envelope::UserPublish { .. }
                | Envelope::Chat { .. }
                | Envelope::StreamPublish { .. }
                | Envelope::ForNodes { .. }
        )
    }
}

/// How a member is woken: an eventfd its ring reads, or, from another
/// shard, a message onto its ring (IORING_OP_MSG_RING, submitted with the
/// sender's turn: no syscall of its own, no eventfd read to re-arm); and the
/// flag that spares senders either when a wake-up is already pending.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    pending: AtomicBool,
    /// The member's io_uring descriptor while its ring runs, or -1.
    ring_fd: AtomicI32,
}

impl Waker {
    /// Creates an eventfd. Blocking, because io_uring returns EAGAIN for reads of O_NONBLOCK files instead of waiting.
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: AtomicBool::new(false),
            ring_fd: AtomicI32::new(-1),
        })
    }

    /// Publishes (or, with `None`, withdraws) the owner's ring for
    /// [`Waker::ring_fd`]. A sender that read the descriptor just before it
    /// was withdrawn gets an error from its message and signals the eventfd.
    pub fn set_ring(&self, fd: Option<RawFd>) {
        self.ring_fd.store(fd.unwrap_or(-1), Ordering::Release);
    }

    /// The owner's ring, for a shard to wake it with a ring message.
    pub fn ring_fd(&self) -> Option<RawFd> {
        let fd = self.ring_fd.load(Ordering::Acquire);
        (fd >= 0).then_some(fd)
    }

    /// The eventfd, for the owning shard to read and register with its ring.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wakes the owner unless a wake-up is already on its way. Call after
    /// pushing to the owner's queues.
    pub fn wake(&self) {
        if self.claim() {
            self.signal();
        }
    }

    /// True if the caller must deliver a wake-up (signal the eventfd or
    /// message the ring): none is pending. Call after pushing to the owner's
    /// queues.
    pub fn claim(&self) -> bool {
        // Sender: push (store), then read `pending`; owner: clear `pending`
        // (store), then read the queues. Without a SeqCst fence on both sides
        // each could miss the other's store (store buffering) and a wake-up
        // would be lost; with them, either the owner sees the push or the
        // sender sees `pending == false` and delivers a wake-up.
        fence(Ordering::SeqCst);
        !self.pending.swap(true, Ordering::SeqCst)
    }

    /// Writes the eventfd unconditionally (the kernel and timers use this path too).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own. A full counter
        // (EAGAIN) means a wake-up is pending anyway, so the result is ignored.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Called by the owner before it checks its queues one last time and
    /// sleeps: any push the check misses signals the eventfd (see `wake`).
    pub fn rearm(&self) {
        self.pending.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
}

/// Every queue and waker of the process, shared by all shards and, in a
/// cluster, the broker: a member of the bus like a shard, numbered after them.
#[derive(Debug)]
pub struct Bus {
    shards: usize,
    /// Shards plus the broker, if any.
    members: usize,
    /// `queues[from * members + to]`.
    queues: Vec<ArrayQueue<Envelope>>,
    wakers: Vec<Waker>,
}

impl Bus {
    /// Creates the queues between `shards` shards, each holding `capacity` envelopes.
    pub fn new(shards: usize, capacity: usize) -> io::Result<Bus> {
        Bus::with_members(shards, shards, capacity)
    }

    /// As [`Bus::new`], plus a broker member (`ShardId(shards)`) that every
    /// shard can address and that wakes them like a shard.
    pub fn with_broker(shards: usize, capacity: usize) -> io::Result<Bus> {
        Bus::with_members(shards, shards + 1, capacity)
    }

    fn with_members(shards: usize, members: usize, capacity: usize) -> io::Result<Bus> {
        let queues = (0..members * members)
            .map(|_| ArrayQueue::new(capacity.max(1)))
            .collect();
        let wakers = (0..members)
            .map(|_| Waker::new())
            .collect::<io::Result<_>>()?;
        Ok(Bus {
            shards,
            members,
            queues,
            wakers,
        })
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Shards plus the broker: every member a shard drains envelopes from.
    pub fn members(&self) -> usize {
        self.members
    }

    /// The cluster broker's id, when there is one.
    pub fn broker(&self) -> Option<ShardId> {
        (self.members > self.shards).then_some(ShardId(self.shards))
    }

    /// The waker of `member`.
    pub fn waker(&self, member: ShardId) -> &Waker {
        &self.wakers[member.0]
    }

    /// Queues an envelope without waking the receiver; on a full queue the
    /// envelope comes back.
    pub fn push(&self, from: ShardId, to: ShardId, envelope: Envelope) -> Result<(), Envelope> {
        self.queues[from.0 * self.members + to.0].push(envelope)
    }

    /// True if any queue to `to` holds an envelope.
    pub fn has_mail(&self, to: ShardId) -> bool {
        (0..self.members).any(|from| !self.queues[from * self.members + to.0].is_empty())
    }

    /// Takes one envelope sent from `from` to `to`.
    pub fn pop(&self, from: ShardId, to: ShardId) -> Option<Envelope> {
        self.queues[from.0 * self.members + to.0].pop()
    }

    /// Sends `Shutdown` to every shard from outside the shards. Retries while a
    /// queue is full, since shards drain their queues every loop turn.
    pub fn shutdown_all(&self) {
        for to in 0..self.shards {
            let mut envelope = Envelope::Shutdown;
            // The diagonal queue (to, to) is unused by shards; it carries outside control.
            while let Err(back) = self.push(ShardId(to), ShardId(to), envelope) {
                envelope = back;
                std::thread::yield_now();
            }
            self.wakers[to].signal();
        }
    }
}

/// A shard's sending side: control envelopes that found their queue full wait
/// here, in order, and go out before anything newer to the same shard.
#[derive(Debug)]
pub struct Outbox {
    me: ShardId,
    backlog: Vec<VecDeque<Envelope>>,
    /// Shards that got envelopes since the last [`Outbox::wake_all`].
    touched: ShardSet,
}

/// What happened to a publish handed to [`Outbox::send`].
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued for the receiver.
    Queued,
    /// The queue was full and the publish was dropped.
    Dropped,
}

impl Outbox {
    /// An outbox for member `me` of a bus of `members`.
    pub fn new(me: ShardId, members: usize) -> Outbox {
        Outbox {
            me,
            backlog: (0..members).map(|_| VecDeque::new()).collect(),
            touched: ShardSet::default(),
        }
    }

    /// Sends an envelope. Publishes to a full queue are dropped; control
    /// envelopes are kept and retried by [`Outbox::retry_backlog`].
    pub fn send(&mut self, bus: &Bus, to: ShardId, envelope: Envelope) -> Sent {
        let backlog = &mut self.backlog[to.0];
        if !backlog.is_empty() {
            if envelope.is_control() {
                backlog.push_back(envelope);
                return Sent::Queued;
            }
            return Sent::Dropped;
        }
        match bus.push(self.me, to, envelope) {
            Ok(()) => {
                self.touched.insert(to);
                Sent::Queued
            }
            Err(back) if back.is_control() => {
                backlog.push_back(back);
                Sent::Queued
            }
            Err(_) => Sent::Dropped,
        }
    }

    /// Moves backlogged control envelopes into their queues while there is room.
    /// Returns true if any remain.
    pub fn retry_backlog(&mut self, bus: &Bus) -> bool {
        let mut left = false;
        for (to, backlog) in self.backlog.iter_mut().enumerate() {
            while let Some(envelope) = backlog.pop_front() {
                match bus.push(self.me, ShardId(to), envelope) {
                    Ok(()) => self.touched.insert(ShardId(to)),
                    Err(back) => {
                        backlog.push_front(back);
                        left = true;
                        break;
                    }
                }
            }
        }
        left
    }

    /// The most control envelopes waiting for any one peer.
    pub fn longest_backlog(&self) -> usize {
        self.backlog.iter().map(VecDeque::len).max().unwrap_or(0)
    }

    /// Wakes every shard that received something since the last call: one
    /// eventfd write per shard per loop turn at most.
    pub fn wake_all(&mut self, bus: &Bus) {
        for shard in self.take_touched().iter() {
            bus.waker(shard).wake();
        }
    }

    /// The shards that received something since the last call, for a
    /// caller that wakes them its own way.
    pub fn take_touched(&mut self) -> ShardSet {
        std::mem::take(&mut self.touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str) -> Envelope {
        Envelope::Publish {
            topic: topic.into(),
            frame: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn shard_set_iterates_its_members_in_order() {
        let mut set = ShardSet::default();
        set.insert(ShardId(5));
        set.insert(ShardId(0));
        set.insert(ShardId(63));
        assert_eq!(set.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 5, 63]);
        set.remove(ShardId(5));
        assert_eq!(set.iter().count(), 2);
    }

    #[test]
    fn full_queue_drops_publishes_but_keeps_control_in_order() {
        let bus = Bus::new(2, 1).unwrap();
        let mut out = Outbox::new(ShardId(0), 2);
        assert_eq!(out.send(&bus, ShardId(1), publish("a")), Sent::Queued);
        assert_eq!(out.send(&bus, ShardId(1), publish("b")), Sent::Dropped);
        let interest = |epoch| Envelope::Interest {
            kind: IndexKind::Topic,
            name: "t".into(),
            on: true,
            epoch,
        };
        assert_eq!(out.send(&bus, ShardId(1), interest(1)), Sent::Queued);
        assert_eq!(out.send(&bus, ShardId(1), interest(2)), Sent::Queued);
        // A publish may not overtake backlogged control envelopes.
        assert_eq!(out.send(&bus, ShardId(1), publish("c")), Sent::Dropped);
        assert!(matches!(
            bus.pop(ShardId(0), ShardId(1)),
            Some(Envelope::Publish { .. })
        ));
        assert!(out.retry_backlog(&bus));
        assert!(matches!(
            bus.pop(ShardId(0), ShardId(1)),
            Some(Envelope::Interest { epoch: 1, .. })
        ));
        assert!(!out.retry_backlog(&bus));
        assert!(matches!(
            bus.pop(ShardId(0), ShardId(1)),
            Some(Envelope::Interest { epoch: 2, .. })
        ));
        assert!(bus.pop(ShardId(0), ShardId(1)).is_none());
    }

    #[test]
    fn waker_signals_once_until_rearmed() {
        let waker = Waker::new().unwrap();
        waker.wake();
        waker.wake();
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our own eventfd.
        let n = unsafe { libc::read(waker.raw_fd(), (&mut value as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(value, 1, "second wake must not write again");
        waker.rearm();
        waker.wake();
        // SAFETY: as above.
        let n = unsafe { libc::read(waker.raw_fd(), (&mut value as *mut u64).cast(), 8) };
        assert_eq!((n, value), (8, 1));
    }
}
