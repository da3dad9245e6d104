//! The simulated driver: what `shard::driver` does with a ring, done with
//! plain data. Per shard it allocates keys and keeps each connection's
//! [`ConnIo`], the real driver's own I/O lifecycle (the real
//! [`Outbound`](crate::shard::outbound::Outbound) queue under the outbound budget, overflow, the close modes and
//! deadlines, shutdown, the drain watch and the write delay): it carries
//! out the state's commands through the same transitions the real driver
//! calls, and frees a slot (then tells the state `Closed`) only once
//! nothing is pending on it. Pushes are held for the run's write delay
//! (`Params::write_delay`) as the real driver holds them, and go with the
//! first flush after simulated time has passed their due time. The
//! "kernel" completes sends with any number of bytes and shutdowns at a
//! time the scheduler picks.
//!
//! It also checks the command stream: a command for a released key, or a
//! `Send` after a `Close` for the same key, is a violation.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use crate::metrics::ShardStats;
use crate::shard::conn_io::{ConnIo, Queued};
use crate::shard::key::{ConnKey, ConnTable};
use crate::shard::outbound::{SendBuffers, SendPlan};
use crate::shard::state::{CloseMode, Command, Event, ShardState};

use super::Sim;

pub(super) use crate::shard::conn_io::Lifecycle;

/// The I/O side of one connection.
pub(super) struct IoConn {
    pub(super) client: usize,
    /// The real driver's lifecycle and outbound queue, in simulated time.
    pub(super) io: ConnIo<Duration>,
    /// The send in flight: what the kernel was handed.
    pub(super) plan: Option<SendPlan>,
    /// The state has sent a `Close` for it.
    close_commanded: bool,
    /// It was shut down because everything queued had been sent.
    graceful: bool,
    /// The largest frame queued on it: one frame may pass the budget.
    largest_frame: usize,
}

/// One shard: its state and the driver around it.
pub(super) struct SimShard {
    pub(super) state: ShardState,
    pub(super) conns: ConnTable<IoConn>,
    pool: SendBuffers,
    dirty: Vec<ConnKey>,
    /// Connections holding pushes for the write delay, with their due
    /// time (simulated), oldest first.
    delayed: VecDeque<(Duration, ConnKey)>,
    overflowed: Vec<ConnKey>,
    /// Connections whose watched queue drained, told after the batch.
    drained: Vec<ConnKey>,
    /// Set when the `Shutdown` envelope arrived: no more accepts, and every
    /// connection is cut at this time.
    pub(super) shutdown_deadline: Option<Duration>,
}

impl SimShard {
    pub(super) fn new(state: ShardState, outbound_limit: usize) -> SimShard {
        SimShard {
            state,
            conns: ConnTable::default(),
            pool: SendBuffers::new(outbound_limit),
            dirty: Vec::new(),
            delayed: VecDeque::new(),
            overflowed: Vec::new(),
            drained: Vec::new(),
            shutdown_deadline: None,
        }
    }

    /// The shard's outbound count is what its connections hold, and within
    /// its budget but for one frame per connection that had nothing queued
    /// when it passed (at most the connection's budget, or that frame).
    pub(super) fn check_outbound(&self, budget: usize) -> Result<(), String> {
        let held: usize = self
            .conns
            .iter()
            .map(|(_, c)| c.io.out.queued_bytes())
            .sum();
        let counted = self.pool.queued_bytes();
        if held != counted {
            return Err(format!("{counted} outbound bytes counted, {held} queued"));
        }
        let each: usize = (self.conns.iter())
            .map(|(_, c)| budget.max(c.largest_frame))
            .sum();
        let bound = self.pool.limit().saturating_add(each);
        if counted > bound {
            return Err(format!(
                "{counted} outbound bytes over the bound of {bound}"
            ));
        }
        Ok(())
    }

    /// Connections with a send the kernel can complete (`stalled` tells
    /// which clients read nothing) or a shutdown to finish.
    pub(super) fn kernel_work(&self, stalled: impl Fn(usize) -> bool) -> Vec<ConnKey> {
        self.conns
            .iter()
            .filter(|(_, c)| match c.io.lifecycle {
                Lifecycle::ShuttingDown { shutdown_pending } => {
                    shutdown_pending || c.plan.is_some()
                }
                _ => c.plan.is_some() && !stalled(c.client),
            })
            .map(|(key, _)| key)
            .collect()
    }
}

/// How the kernel finishes a send.
#[derive(Debug, Clone, Copy)]
pub(super) enum SendResult {
    /// It took this many bytes.
    Took(usize),
    /// It failed (the socket was shut down under it).
    Failed,
}

impl Sim {
    // ---- feeding the state -------------------------------------------------

    /// Tells shard `s`'s state `event` and carries out its commands.
    pub(super) fn feed(&mut self, s: usize, event: Event<'_>) {
        let now = self.now();
        self.shards[s].state.handle(now, event);
        self.apply_commands(s);
    }

    fn apply_commands(&mut self, s: usize) {
        loop {
            let mut commands = std::mem::take(&mut self.commands);
            self.shards[s].state.take_commands(&mut commands);
            if commands.is_empty()
                && self.shards[s].overflowed.is_empty()
                && self.shards[s].drained.is_empty()
            {
                self.commands = commands;
                return;
            }
            for command in commands.drain(..) {
                match command {
                    Command::Send(key, bytes) => self.queue(s, key, bytes, false),
                    // Held for the write delay, as the real driver holds it.
                    Command::Push(key, bytes) => self.queue(s, key, bytes, true),
                    Command::Close { conn, last, mode } => self.close(s, conn, last, mode),
                    Command::WatchDrain(key) => self.watch_drain(s, key),
                }
            }
            self.commands = commands;
            for key in std::mem::take(&mut self.shards[s].drained) {
                let now = self.now();
                self.shards[s].state.handle(now, Event::Drained(key));
            }
            // As the real driver: over-budget connections are reported after
            // the batch, never while the state is in the middle of one.
            for key in std::mem::take(&mut self.shards[s].overflowed) {
                // A connection the state has not closed yet is owed a 1013;
                // one it closed in the same batch keeps that close's code.
                if let Some(conn) = self.shards[s].conns.get_mut(key) {
                    if !conn.close_commanded {
                        self.clients[conn.client].owed_1013 = true;
                    }
                    conn.io.overflow_reported();
                }
                let now = self.now();
                self.shards[s].state.handle(now, Event::Overflow(key));
            }
        }
    }

    /// Accepts a connection for client `client` on shard `s`; `None` once the
    /// shard has stopped accepting.
    pub(super) fn accept(&mut self, s: usize, client: usize) -> Option<ConnKey> {
        let shard = &mut self.shards[s];
        if shard.shutdown_deadline.is_some() {
            return None;
        }
        let key = shard.conns.insert(IoConn {
            client,
            io: ConnIo::new(),
            plan: None,
            close_commanded: false,
            graceful: false,
            largest_frame: 0,
        });
        Some(key)
    }

    /// Whether input on `key` still reaches the state: not once it is shut down.
    pub(super) fn reads(&self, s: usize, key: ConnKey) -> bool {
        self.shards[s]
            .conns
            .get(key)
            .is_some_and(|c| !c.io.is_shut_down())
    }

    // ---- commands ----------------------------------------------------------

    /// The real driver's `queue`: within the budget, a push held for the
    /// write delay; past it, the connection is reported after the batch.
    fn queue(&mut self, s: usize, key: ConnKey, bytes: Bytes, push: bool) {
        let budget = self.budget;
        let delay = push && !self.write_delay.is_zero();
        let due = self.elapsed + self.write_delay;
        let shard = &mut self.shards[s];
        let Some(conn) = shard.conns.get_mut(key) else {
            return self.fail(format!("shard {s}: Send to released connection {key:?}"));
        };
        if conn.close_commanded {
            let client = conn.client;
            return self.fail(format!("shard {s}: Send after Close to c{client}"));
        }
        conn.largest_frame = conn.largest_frame.max(bytes.len());
        match conn.io.queue(bytes, budget, &mut shard.pool, delay) {
            Queued::Ignored | Queued::Held => {}
            Queued::Dirty => shard.dirty.push(key),
            Queued::Delayed => shard.delayed.push_back((due, key)),
            Queued::Overflowed { over_shard_budget } => {
                if over_shard_budget {
                    // Counted where the real driver counts it.
                    let stats = &self.shared.stats()[s];
                    ShardStats::add(&stats.shard_outbound_overflows_total, 1);
                }
                shard.overflowed.push(key);
                let client = conn.client;
                self.clients[client].overflowed = true;
                self.overflows += 1;
                self.note(format!("  s{s}: c{client} over its outbound budget"));
            }
        }
    }

    /// As the real driver: `Drained` after this batch if the queue is at
    /// the drain mark already, else once a send brings it there.
    fn watch_drain(&mut self, s: usize, key: ConnKey) {
        let mark = self.drain_mark;
        let shard = &mut self.shards[s];
        let Some(conn) = shard.conns.get_mut(key) else {
            return self.fail(format!(
                "shard {s}: WatchDrain of released connection {key:?}"
            ));
        };
        if conn.io.watch_drain(mark) {
            shard.drained.push(key);
        }
    }

    fn close(&mut self, s: usize, key: ConnKey, last: Option<Bytes>, mode: CloseMode) {
        let deadline = self.elapsed + self.close_timeout;
        let shard = &mut self.shards[s];
        let Some(conn) = shard.conns.get_mut(key) else {
            return self.fail(format!("shard {s}: Close of released connection {key:?}"));
        };
        conn.close_commanded = true;
        let closed = conn.io.close(mode, last, || deadline, &mut shard.pool);
        if closed.dirty {
            shard.dirty.push(key);
        }
        if closed.terminated {
            conn.graceful = closed.flushed;
        }
    }

    /// Shuts the socket down; `graceful` if everything queued was sent.
    pub(super) fn terminate(&mut self, s: usize, key: ConnKey, graceful: bool) {
        let shard = &mut self.shards[s];
        let Some(conn) = shard.conns.get_mut(key) else {
            return;
        };
        if conn.io.terminate(&mut shard.pool) {
            conn.graceful = graceful;
        }
    }

    /// Frees a shut-down connection once nothing is pending, ends its
    /// client's connection and tells the state.
    fn maybe_release(&mut self, s: usize, key: ConnKey) {
        let Some(conn) = self.shards[s].conns.get(key) else {
            return;
        };
        if !conn.io.is_idle() {
            return;
        }
        if conn.plan.is_some() {
            return self.fail(format!("shard {s}: a send plan outlived its send"));
        }
        let shard = &mut self.shards[s];
        let Some(mut conn) = shard.conns.remove(key) else {
            return;
        };
        conn.io.out.release(&mut shard.pool);
        self.client_ended(conn.client, conn.graceful);
        self.feed(s, Event::Closed(key));
    }

    // ---- the kernel --------------------------------------------------------

    /// The bytes of connection `key`'s send in flight, if any.
    pub(super) fn in_flight(&self, s: usize, key: ConnKey) -> Option<Vec<u8>> {
        self.shards[s].conns.get(key)?.plan.map(plan_bytes)
    }

    /// The kernel finishes connection `key`'s send: the client gets what was
    /// taken, and the driver reacts as the real one does on a completion.
    pub(super) fn complete_send(&mut self, s: usize, key: ConnKey, result: SendResult) {
        let Some(bytes) = self.in_flight(s, key) else {
            return;
        };
        let shard = &mut self.shards[s];
        let Some(conn) = shard.conns.get_mut(key) else {
            return;
        };
        conn.plan = None;
        let client = conn.client;
        let taken = match result {
            SendResult::Failed => {
                if conn.io.send_failed(&mut shard.pool) {
                    conn.graceful = false;
                }
                return self.maybe_release(s, key);
            }
            SendResult::Took(n) => n.min(bytes.len()),
        };
        let sent = conn.io.send_done(taken, self.drain_mark, &mut shard.pool);
        if sent.drained {
            shard.drained.push(key);
        }
        if sent.dirty {
            shard.dirty.push(key);
        }
        if sent.terminated {
            conn.graceful = true;
        }
        self.client_receive(client, &bytes[..taken]);
        if sent.drained {
            self.apply_commands(s);
        }
        self.maybe_release(s, key);
    }

    /// The kernel finishes connection `key`'s shutdown.
    pub(super) fn complete_shutdown(&mut self, s: usize, key: ConnKey) {
        let Some(conn) = self.shards[s].conns.get_mut(key) else {
            return;
        };
        if conn.io.lifecycle
            == (Lifecycle::ShuttingDown {
                shutdown_pending: true,
            })
        {
            conn.io.shutdown_done();
        }
        self.maybe_release(s, key);
    }

    /// Hands every connection with queued output to the kernel (the real
    /// driver's `flush`, minus the ring), pushes held past their write
    /// delay (in simulated time) included.
    pub(super) fn flush(&mut self, s: usize) {
        let now = self.elapsed;
        let shard = &mut self.shards[s];
        while let Some(&(due, key)) = shard.delayed.front() {
            if due > now {
                break;
            }
            shard.delayed.pop_front();
            if let Some(conn) = shard.conns.get_mut(key) {
                if conn.io.delay_passed() {
                    shard.dirty.push(key);
                }
            }
        }
        for key in std::mem::take(&mut shard.dirty) {
            let Some(conn) = shard.conns.get_mut(key) else {
                continue;
            };
            // `None` while a send is in flight: its plan stays.
            if let Some(plan) = conn.io.take_send() {
                debug_assert!(conn.plan.is_none(), "two sends in flight");
                conn.plan = Some(plan);
            }
        }
    }

    /// When the oldest push held for the write delay on any shard is due.
    pub(super) fn next_delayed(&self) -> Option<Duration> {
        self.shards
            .iter()
            .filter_map(|shard| shard.delayed.front().map(|&(due, _)| due))
            .min()
    }

    // ---- time and shutdown -------------------------------------------------

    /// The real driver's tick: the state's timers, then close deadlines and
    /// the shutdown deadline.
    pub(super) fn tick(&mut self, s: usize) {
        self.feed(s, Event::Tick);
        let now = self.elapsed;
        let cut_all = self.shards[s]
            .shutdown_deadline
            .is_some_and(|deadline| now >= deadline);
        for key in self.shards[s].conns.keys() {
            let expired = self.shards[s]
                .conns
                .get(key)
                .is_some_and(|c| c.io.close_expired(now));
            if cut_all || expired {
                self.terminate(s, key, false);
            }
        }
    }

    /// The `Shutdown` envelope reached shard `s`'s driver: it stops accepting
    /// and gives connections until the shutdown timeout.
    pub(super) fn driver_begin_shutdown(&mut self, s: usize) {
        let deadline = self.elapsed + self.shutdown_timeout;
        self.shards[s].shutdown_deadline.get_or_insert(deadline);
    }
}

/// The bytes a send plan points at, in order.
fn plan_bytes(plan: SendPlan) -> Vec<u8> {
    match plan {
        SendPlan::One { ptr, len } => {
            // SAFETY: `Outbound::prepare_send` keeps the frame a plan points
            // into alive until `complete_send` or `fail_send`; the plan is
            // dropped (set to `None`) before either is called.
            unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
        }
        SendPlan::Many(msg) => {
            // SAFETY: as above: the msghdr lives in the connection's boxed
            // in-flight state until the send is completed or failed.
            let msg = unsafe { &*msg };
            // SAFETY: the iovec array belongs to that same in-flight state and
            // holds `msg_iovlen` entries.
            let iovecs = unsafe { std::slice::from_raw_parts(msg.msg_iov, msg.msg_iovlen as _) };
            let mut bytes = Vec::new();
            for iov in iovecs {
                // SAFETY: each iovec points into a frame the in-flight state owns.
                let part =
                    unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
                bytes.extend_from_slice(part);
            }
            bytes
        }
    }
}
