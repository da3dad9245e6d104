//! The driver: the only code that does I/O. It owns the shard's ring, the
//! I/O side of every connection (its direct descriptor, and its outbound
//! queue and close lifecycle as a sans-IO [`ConnIo`], whose transitions the
//! simulation's driver calls too) and the listener, feeds the shard state
//! events, and carries out the commands the state answers with.
//!
//! One loop per shard thread, one ring, one wait: a turn handles the
//! completions that are ready, drains the bus, submits every send queued in
//! the turn with the next `io_uring_enter`, and then sleeps in that same
//! `io_uring_enter` until a completion (a receive, a send, a wake-up from
//! another shard's ring message or on the eventfd) arrives or the next timer
//! tick is due.

pub mod outbound;
mod ring;

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bus::{Envelope, ShardId};
use crate::metrics::ShardStats;
use crate::shard::conn_io::{ConnIo, Queued};
use crate::shard::key::{ConnKey, ConnTable};
use crate::shard::state::{CloseMode, Command, Event, ShardState};
use crate::shard::Shared;

use outbound::{SendBuffers, SendPlan};
use ring::{Completion, OpKind, Ring};

/// Completions handled per pass before the bus gets a turn and the sends
/// go out. Large enough to take all a saturated broadcast leaves (one send
/// per subscriber), so every connection whose send completed gets, in its
/// next send, every publication read in the same pass; at 1,024 the first
/// connections of a pass sent without the newest publication and waited a
/// round for it (scenario a, 10,000 subscribers: p50 112 ms at 1,024, 84-89
/// ms at this size). Input work per pass stays bounded all the same: the
/// batch is taken before any of it is handled, and a receive that carries
/// bytes holds one of the `ring::RECV_BUFFERS` until then.
const COMPLETION_BATCH: usize = 16_384;
/// Connections sent to per pass (answers aside). A broadcast's sends go out
/// in slices with the completions handled between them, so a publication
/// read mid-round reaches every connection of the round not yet sent to
/// instead of waiting for the next round. Each slice costs one
/// `io_uring_enter`. Scenario a (10,000 subscribers, saturated): all at
/// once against 1,024, p50 0.55x, p99 0.67x; 1,024 -> 256 p50 0.75x;
/// 256 -> 64 p50 0.88x but process CPU 1.03x.
const SENDS_PER_PASS: usize = 256;
/// Envelopes drained from each peer shard per pass, so a flood from one
/// peer cannot hold back the completions and the other peers.
const BUS_DRAIN_BOUND: usize = 256;
/// Passes per turn before the loop checks its timers; a pass that found
/// nothing to do ends the turn early.
const MAX_PASSES_PER_TURN: usize = 8;
/// Timer period for close deadlines, shutdown progress and the state's
/// timers. Deadlines are seconds long, so a tenth of a second of slack is
/// invisible.
const TICK: Duration = Duration::from_millis(100);
/// Quiet time after the last receive before a shard about to sleep gives
/// its receive buffers' pages back (`Ring::release_receive_pages`): long
/// enough that a busy shard never does it between two receives, short enough
/// that a shard whose connections went idle stops holding the 2 MiB.
const RECEIVE_PAGES_IDLE: Duration = TICK;
/// Direct descriptors beyond the connection limit, so connections over it can
/// still be accepted and told 503 instead of waiting in the backlog.
const REFUSAL_HEADROOM: usize = 256;
/// Accept failures logged per shard; later ones are only counted, so a
/// descriptor shortage cannot flood the log.
const ACCEPT_ERRORS_LOGGED: u32 = 10;

/// The I/O side of one connection.
struct IoConn {
    /// The direct descriptor: an index in the ring's file table.
    file: u32,
    /// The multishot receive is armed (it ends on EOF, error or ENOBUFS).
    recv_armed: bool,
    /// Its lifecycle and outbound queue.
    io: ConnIo<Instant>,
}

/// One shard's driver and the state it drives.
pub(crate) struct Driver {
    id: ShardId,
    shared: Shared,
    ring: Ring,
    listener: Option<TcpListener>,
    conns: ConnTable<IoConn>,
    state: ShardState,
    /// Commands taken from the state, kept to reuse the allocation.
    commands: Vec<Command>,
    /// Connections that passed their budget while commands were carried out;
    /// the state hears of them once the batch is done.
    overflowed: Vec<ConnKey>,
    /// Connections with queued output, in the order they got it; sent
    /// from the front, a slice per pass.
    dirty: VecDeque<ConnKey>,
    /// Connections given an answer (a response, not a push) while idle:
    /// sent before `dirty`, so a publisher's 202 goes out ahead of the
    /// fan-out its publication caused.
    answering: Vec<ConnKey>,
    /// Connections holding pushes, with when they go, oldest first.
    delayed: VecDeque<(Instant, ConnKey)>,
    write_delay: Duration,
    /// Connections whose receive ended and must be re-armed.
    rearm: Vec<ConnKey>,
    /// Connections with a close deadline.
    closing: Vec<ConnKey>,
    completions: Vec<Completion>,
    /// Send buffers released by idle connections, reused by the next
    /// sender, and the shard's outbound byte count.
    send_buffers: SendBuffers,
    budget: usize,
    /// Queued bytes at or below which a connection watching its queue
    /// (`Command::WatchDrain`) is told `Drained`.
    drain_mark: usize,
    /// Connections whose watched queue drained, told after the batch.
    drained: Vec<ConnKey>,
    /// Frames queued since the counters were last published.
    frames_queued: u64,
    /// Set when shutdown began: the deadline for closing every connection.
    shutdown_deadline: Option<Instant>,
    accept_armed: bool,
    accept_errors_logged: u32,
    next_tick: Instant,
    /// When a receive last brought bytes.
    last_receive: Instant,
}

impl Driver {
    /// Sets up shard `id`'s ring and state around `listener`.
    pub(crate) fn new(id: ShardId, shared: Shared, listener: TcpListener) -> io::Result<Driver> {
        let config = &shared.config;
        let wanted = config.limits.max_connections.div_ceil(config.shards.get());
        let files = direct_descriptors(wanted);
        let max_conns = wanted.min((files as usize).saturating_sub(REFUSAL_HEADROOM).max(1));
        if max_conns < wanted {
            tracing::info!(
                shard = id.0,
                "connection limit lowered to {max_conns} on this shard (asked {wanted}): \
                 the open-file limit caps the ring's descriptor table at {files}"
            );
        }
        let ring = Ring::new(shared.bus.waker(id).raw_fd(), files, max_conns)?;
        let now = Instant::now();
        let state = ShardState::new(id, shared.clone(), max_conns, now);
        Ok(Driver {
            id,
            ring,
            listener: Some(listener),
            conns: ConnTable::default(),
            state,
            commands: Vec::new(),
            overflowed: Vec::new(),
            dirty: VecDeque::new(),
            answering: Vec::new(),
            delayed: VecDeque::new(),
            write_delay: config.write_delay,
            rearm: Vec::new(),
            closing: Vec::new(),
            completions: Vec::with_capacity(COMPLETION_BATCH),
            send_buffers: SendBuffers::new(config.limits.max_outbound_bytes_per_shard),
            drain_mark: drain_mark(config.limits.max_outbound_bytes_per_connection),
            drained: Vec::new(),
            budget: config.limits.max_outbound_bytes_per_connection,
            frames_queued: 0,
            shutdown_deadline: None,
            accept_armed: false,
            accept_errors_logged: 0,
            next_tick: now + TICK,
            last_receive: now,
            shared,
        })
    }

    /// Runs the shard until it has shut down.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.shared
            .bus
            .waker(self.id)
            .set_ring(Some(self.ring.fd()));
        loop {
            let now = Instant::now();
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.tick(now);
            }
            let busy = self.turn(now);
            if self.is_finished() {
                // The last turn's wake-ups of peers are still in the queue.
                self.ring.submit()?;
                return Ok(());
            }
            if busy || self.ring.has_completions() {
                self.ring.submit()?;
                continue;
            }
            // Clear the wake-up flag, then look at the queues one last time:
            // a push this misses will send a wake-up (a ring message, or the
            // eventfd, whose read is armed).
            self.shared.bus.waker(self.id).rearm();
            if self.shared.bus.has_mail(self.id) {
                self.ring.submit()?;
                continue;
            }
            if now.saturating_duration_since(self.last_receive) >= RECEIVE_PAGES_IDLE {
                // Every completion drained has been handled and its buffer
                // recycled: the turn above ran to the end.
                self.ring.release_receive_pages();
            }
            let wake_at = match self.delayed.front() {
                Some(&(due, _)) => due.min(self.next_tick),
                None => self.next_tick,
            };
            let timeout = wake_at.saturating_duration_since(Instant::now());
            self.ring.submit_and_wait(timeout)?;
        }
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id.0]
    }

    fn is_finished(&self) -> bool {
        self.shutdown_deadline.is_some() && self.conns.is_empty() && !self.accept_armed
    }

    /// Completions and bus until there is nothing left or the pass bound is
    /// hit; then sends. Returns true if work may be left.
    fn turn(&mut self, now: Instant) -> bool {
        let mut progressed = false;
        for _ in 0..MAX_PASSES_PER_TURN {
            progressed = self.handle_completions(now);
            progressed |= self.drain_bus(now);
            progressed |= self.flush();
            if !progressed {
                break;
            }
        }
        self.wake_peers();
        ShardStats::add(&self.stats().messages_out_total, self.frames_queued);
        self.frames_queued = 0;
        progressed
    }

    /// Wakes the peers this turn sent envelopes to: a message on a shard's
    /// ring, submitted with this turn's sends, or the eventfd of a member
    /// without a ring (the cluster broker) or whose ring is not up.
    fn wake_peers(&mut self) {
        let bus = &self.shared.bus;
        for peer in self.state.peers_to_wake().iter() {
            let waker = bus.waker(peer);
            if waker.claim() {
                match waker.ring_fd() {
                    Some(fd) => self.ring.wake_peer(peer.0, fd),
                    None => waker.signal(),
                }
            }
        }
    }

    /// Tells the state `event` and carries out what it answers, including
    /// what that causes (a connection over its budget is reported back).
    fn feed(&mut self, now: Instant, event: Event<'_>) {
        self.state.handle(now, event);
        self.apply_commands(now);
    }

    fn apply_commands(&mut self, now: Instant) {
        loop {
            let mut commands = std::mem::take(&mut self.commands);
            self.state.take_commands(&mut commands);
            if commands.is_empty() && self.overflowed.is_empty() && self.drained.is_empty() {
                self.commands = commands;
                return;
            }
            for command in commands.drain(..) {
                match command {
                    Command::Send(key, bytes) => self.queue(now, key, bytes, false),
                    Command::Push(key, bytes) => self.queue(now, key, bytes, true),
                    Command::Close { conn, last, mode } => self.close(now, conn, last, mode),
                    Command::WatchDrain(key) => self.watch_drain(key),
                }
            }
            self.commands = commands;
            for key in std::mem::take(&mut self.drained) {
                self.state.handle(now, Event::Drained(key));
            }
            for key in std::mem::take(&mut self.overflowed) {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.io.overflow_reported();
                }
                self.state.handle(now, Event::Overflow(key));
            }
        }
    }

    // ---- commands ------------------------------------------------------------

    /// Queues bytes on an open connection; past its budget, drops its queue
    /// and reports it to the state as a slow consumer. A push may be held
    /// for the write delay.
    fn queue(&mut self, now: Instant, key: ConnKey, bytes: Bytes, push: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let delay = push && !self.write_delay.is_zero();
        match conn
            .io
            .queue(bytes, self.budget, &mut self.send_buffers, delay)
        {
            Queued::Ignored => {}
            Queued::Dirty => {
                self.frames_queued += 1;
                if push {
                    self.dirty.push_back(key);
                } else {
                    self.answering.push(key);
                }
            }
            Queued::Delayed => {
                self.frames_queued += 1;
                self.delayed.push_back((now + self.write_delay, key));
            }
            Queued::Held => self.frames_queued += 1,
            Queued::Overflowed { over_shard_budget } => {
                if over_shard_budget {
                    ShardStats::add(
                        &self.shared.stats[self.id.0].shard_outbound_overflows_total,
                        1,
                    );
                }
                self.overflowed.push(key);
            }
        }
    }

    /// Tells the state `Drained` once the connection's queue is at or
    /// below the drain mark: after this batch if it is already.
    fn watch_drain(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.io.watch_drain(self.drain_mark) {
            self.drained.push(key);
        }
    }

    /// Closes a connection as the state asks (see [`ConnIo::close`]):
    /// at once, or after its last bytes by the close timeout.
    fn close(&mut self, now: Instant, key: ConnKey, last: Option<Bytes>, mode: CloseMode) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let close_timeout = self.shared.config.close_timeout;
        let closed = conn
            .io
            .close(mode, last, || now + close_timeout, &mut self.send_buffers);
        if closed.began {
            self.closing.push(key);
        }
        if closed.queued_last {
            self.frames_queued += 1;
        }
        if closed.dirty {
            self.dirty.push_back(key);
        }
        if closed.terminated {
            self.ring.shutdown(conn.file, key);
        }
    }

    /// Shuts the socket down; the slot is freed once the kernel has returned
    /// every operation on it.
    fn terminate(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.io.terminate(&mut self.send_buffers) {
            // Ends the pending receive and fails a pending send; their
            // completions, and the shutdown's own, let `maybe_release` free
            // the slot.
            self.ring.shutdown(conn.file, key);
        }
    }

    /// Frees a shut-down connection's slot once nothing is pending on it,
    /// closes its descriptor, and tells the state it is gone.
    fn maybe_release(&mut self, now: Instant, key: ConnKey) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if !conn.io.is_idle() || conn.recv_armed {
            return;
        }
        if let Some(mut conn) = self.conns.remove(key) {
            conn.io.out.release(&mut self.send_buffers);
            self.ring.close(conn.file);
        }
        ShardStats::sub(&self.stats().connections, 1);
        self.feed(now, Event::Closed(key));
    }

    // ---- completions -----------------------------------------------------------

    fn handle_completions(&mut self, now: Instant) -> bool {
        let mut batch = std::mem::take(&mut self.completions);
        self.ring.drain(&mut batch, COMPLETION_BATCH);
        // Envelopes first: one pushed before a completion was posted (a
        // publish another shard answered 202 before its client sent the next
        // one here) is delivered before what that completion brings, so a
        // publisher's sequential publishes keep their order across shards.
        let progressed = !batch.is_empty();
        if progressed {
            self.drain_bus(now);
        }
        for completion in batch.drain(..) {
            match completion.token.kind {
                OpKind::Accept => self.on_accept(now, completion),
                OpKind::Recv => self.on_recv(now, completion),
                OpKind::Send => self.on_send(now, completion),
                OpKind::Shutdown => {
                    let key = completion.token.key;
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.io.shutdown_done();
                        self.maybe_release(now, key);
                    }
                }
                OpKind::Close | OpKind::Woken => {}
                OpKind::Wake => self.ring.arm_wake(),
                OpKind::WakePeer => {
                    // Only a failed message completes: the peer's ring is
                    // gone or its completion queue full. Its eventfd works.
                    let peer = ShardId(completion.token.key.slot());
                    if peer.0 < self.shared.bus.members() {
                        self.shared.bus.waker(peer).signal();
                    }
                }
            }
        }
        self.completions = batch;
        progressed
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        if self.shutdown_deadline.is_none() && !self.accept_armed {
            self.ring.accept(listener.as_raw_fd());
            self.accept_armed = true;
        }
    }

    fn on_accept(&mut self, now: Instant, c: Completion) {
        if c.result < 0 {
            self.accept_armed = self.accept_armed && c.more;
            if self.shutdown_deadline.is_some() {
                return;
            }
            // Out of descriptors or memory: re-arming now would fail again at
            // once, so the next tick re-arms and connections wait in the
            // listen backlog meanwhile.
            ShardStats::add(&self.stats().accept_errors_total, 1);
            if !self.accept_armed && self.accept_errors_logged < ACCEPT_ERRORS_LOGGED {
                self.accept_errors_logged += 1;
                tracing::warn!(
                    shard = self.id.0,
                    "accept failed: {}",
                    io::Error::from_raw_os_error(-c.result)
                );
            }
            return;
        }
        if !c.more {
            self.accept_armed = false;
            self.arm_accept();
        }
        // A direct descriptor: an index in the ring's file table.
        let file = c.result as u32;
        if self.shutdown_deadline.is_some() {
            self.ring.close(file);
            return;
        }
        let key = self.conns.insert(IoConn {
            file,
            recv_armed: false,
            io: ConnIo::new(),
        });
        ShardStats::add(&self.stats().connections, 1);
        ShardStats::add(&self.stats().connections_accepted_total, 1);
        self.arm_recv(key);
        self.feed(now, Event::Opened(key));
    }

    fn arm_recv(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.recv_armed || conn.io.is_shut_down() {
            return;
        }
        conn.recv_armed = true;
        self.ring.recv(conn.file, key);
    }

    fn on_recv(&mut self, now: Instant, c: Completion) {
        let key = c.token.key;
        let Some(conn) = self.conns.get_mut(key) else {
            if let Some(id) = c.buffer {
                self.ring.recycle(id);
            }
            return;
        };
        if !c.more {
            conn.recv_armed = false;
        }
        let open = !conn.io.is_shut_down();
        match c.result {
            n if n > 0 => {
                if let Some(id) = c.buffer {
                    self.last_receive = now;
                    ShardStats::add(&self.stats().bytes_in_total, n as u64);
                    if open {
                        // SAFETY: the buffer came with this completion and is
                        // recycled only below, after the state has read it.
                        let data = unsafe { self.ring.received(id, n as usize) };
                        self.state.handle(now, Event::Input(key, data));
                        self.apply_commands(now);
                    }
                    self.ring.recycle(id);
                }
                if !c.more && open {
                    self.rearm.push(key);
                }
            }
            0 => {
                if open {
                    self.feed(now, Event::InputEnded(key));
                }
            }
            e if e == -libc::ENOBUFS => self.rearm.push(key),
            _ => self.terminate(key),
        }
        self.maybe_release(now, key);
    }

    fn on_send(&mut self, now: Instant, c: Completion) {
        let key = c.token.key;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if c.result < 0 {
            if conn.io.send_failed(&mut self.send_buffers) {
                self.ring.shutdown(conn.file, key);
            }
            self.maybe_release(now, key);
            return;
        }
        let sent = conn
            .io
            .send_done(c.result as usize, self.drain_mark, &mut self.send_buffers);
        if sent.drained {
            self.drained.push(key);
        }
        ShardStats::add(
            &self.shared.stats[self.id.0].bytes_out_total,
            sent.bytes as u64,
        );
        if sent.dirty {
            self.dirty.push_back(key);
        }
        if sent.terminated {
            self.ring.shutdown(conn.file, key);
        }
        if !self.drained.is_empty() {
            self.apply_commands(now);
        }
        self.maybe_release(now, key);
    }

    // ---- sends and the bus -------------------------------------------------------

    /// Queues a send for every connection with an answer and for the next
    /// [`SENDS_PER_PASS`] connections with output (pushes held past their
    /// write delay included), and re-arms receives. Returns true if
    /// connections with output are left for the next pass; their slice's
    /// sends are submitted now, so their completions, and the receives
    /// that came meanwhile, are there for the next pass to handle first.
    fn flush(&mut self) -> bool {
        if let Some(&(due, _)) = self.delayed.front() {
            let now = Instant::now();
            if due <= now {
                self.release_delayed(now);
            }
        }
        // Answers first; a connection in both lists sends once, here.
        let mut answering = std::mem::take(&mut self.answering);
        for key in answering.drain(..) {
            self.send_queued(key);
        }
        self.answering = answering;
        for _ in 0..self.dirty.len().min(SENDS_PER_PASS) {
            if let Some(key) = self.dirty.pop_front() {
                self.send_queued(key);
            }
        }
        for key in std::mem::take(&mut self.rearm) {
            self.arm_recv(key);
        }
        let more = !self.dirty.is_empty();
        if more {
            // A failed enter is retried by the loop's next submit.
            let _ = self.ring.submit();
        }
        more
    }

    /// Sends what the connection has queued, unless a send of its is in
    /// flight or it has nothing.
    fn send_queued(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(plan) = conn.io.take_send() else {
            return;
        };
        // SAFETY: the plan points into frames the connection's in-flight
        // state owns until `on_send` reports the completion.
        unsafe {
            match plan {
                SendPlan::One { ptr, len } => self.ring.send(conn.file, ptr, len, key),
                SendPlan::Many(msg) => self.ring.send_msg(conn.file, msg, key),
            }
        }
        ShardStats::add(&self.stats().send_ops_total, 1);
    }

    /// Moves connections whose write delay has passed to the dirty list.
    fn release_delayed(&mut self, now: Instant) {
        while let Some(&(due, key)) = self.delayed.front() {
            if due > now {
                return;
            }
            self.delayed.pop_front();
            if let Some(conn) = self.conns.get_mut(key) {
                if conn.io.delay_passed() {
                    self.dirty.push_back(key);
                }
            }
        }
    }

    fn drain_bus(&mut self, now: Instant) -> bool {
        let bus = self.shared.bus.clone();
        let mut progressed = false;
        for from in 0..bus.members() {
            for _ in 0..BUS_DRAIN_BOUND {
                let Some(envelope) = bus.pop(ShardId(from), self.id) else {
                    break;
                };
                progressed = true;
                ShardStats::add(&self.stats().bus_received_total, 1);
                if matches!(envelope, Envelope::Shutdown) {
                    self.begin_shutdown(now);
                }
                self.feed(now, Event::Envelope(ShardId(from), envelope));
            }
        }
        progressed
    }

    // ---- timers and shutdown -------------------------------------------------------

    fn tick(&mut self, now: Instant) {
        self.feed(now, Event::Tick);
        if self
            .shutdown_deadline
            .is_some_and(|deadline| now >= deadline)
        {
            for key in self.conns.keys() {
                self.terminate(key);
            }
        }
        self.arm_accept();
        let closing = std::mem::take(&mut self.closing);
        for key in closing {
            match self.conns.get(key).and_then(|c| c.io.close_deadline()) {
                Some(deadline) if now >= deadline => self.terminate(key),
                Some(_) => self.closing.push(key),
                None => {}
            }
        }
        self.flush();
        self.publish_counters();
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(now + self.shared.config.shutdown_timeout);
        if let Some(listener) = self.listener.take() {
            // Shutting a listening socket down fails its pending accept
            // (EINVAL), which ends the multishot accept; dropping the listener
            // closes it, and the kernel keeps the file until that completes.
            // SAFETY: shutdown on our own listening socket.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn publish_counters(&mut self) {
        let counters = self.ring.counters();
        let stats = self.stats();
        ShardStats::set(&stats.ring_enters_total, counters.enters);
        ShardStats::set(&stats.cq_overflow_flushes_total, counters.overflow_flushes);
        ShardStats::set(&stats.cq_dropped_total, counters.dropped);
        ShardStats::set(
            &stats.receive_page_releases_total,
            counters.receive_page_releases,
        );
        ShardStats::set(&stats.control_backlog, self.state.control_backlog() as u64);
        ShardStats::set(
            &stats.memory_outbound_bytes,
            self.send_buffers.queued_bytes() as u64,
        );
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Peers message the ring while it is published; after this they
        // fall back to the eventfd (one that races gets an error and does).
        self.shared.bus.waker(self.id).set_ring(None);
    }
}

pub(crate) use crate::config::drain_mark;

/// Size of a shard's direct-descriptor table: its connection limit plus room
/// for the connections it refuses with 503, capped by RLIMIT_NOFILE, which the
/// kernel also applies to registered file tables.
fn direct_descriptors(max_conns: usize) -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a live local struct.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    let wanted = max_conns.saturating_add(REFUSAL_HEADROOM) as u64;
    wanted.min(nofile).min(u64::from(u32::MAX)) as u32
}
