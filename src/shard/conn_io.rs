//! A connection's I/O lifecycle, sans-IO: its outbound queue, whether it
//! waits to be sent or held for the write delay, whether it is watched for a
//! drain, and where its socket is in its life (open, over budget, closing,
//! shut down). The real driver (`driver`, io_uring) and the simulation's
//! (`sim::driver`) both keep one [`ConnIo`] per connection and call the same
//! transitions, so the simulation runs the real lifecycle.
//!
//! Each transition changes only this plain data and answers with what the
//! driver must do about it: push the key on one of its lists (dirty,
//! delayed, closing, overflowed, drained), issue the shutdown of the socket,
//! count a frame. The ring, the descriptor, the lists and the counters stay
//! in the drivers. `T` is the time of deadlines: `Instant` in the real
//! driver, the simulated `Duration` since the start in the simulation.

use bytes::Bytes;

use super::outbound::{Enqueued, Outbound, SendBuffers, SendPlan};
use super::state::CloseMode;

/// Where a connection's socket is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle<T> {
    /// Open: sends are queued within the outbound budget.
    Open,
    /// A send passed the budget: the queue was dropped and further sends are
    /// discarded until the state closes the connection. Until the state has
    /// heard of it (`reported`), a close it asked for in the same batch shuts
    /// the socket down at once: its last bytes were meant to follow what was
    /// just dropped (an HTTP response after pipelined ones would answer the
    /// wrong request), and the state, having closed it, will not again.
    Overflowed { reported: bool },
    /// Sending its last bytes; then shut down (`AfterFlush`), or wait for
    /// the peer to close (`Linger`), in either case by `deadline`.
    Closing { mode: CloseMode, deadline: T },
    /// Shut down; the slot is freed once the kernel has returned every
    /// operation on it (`shutdown_pending` is the shutdown op itself).
    ShuttingDown { shutdown_pending: bool },
}

/// The I/O state of one connection, without the I/O.
pub(crate) struct ConnIo<T> {
    pub(crate) lifecycle: Lifecycle<T>,
    pub(crate) out: Outbound,
    /// In the driver's list of connections with queued output.
    pub(crate) dirty: bool,
    /// A byte has been handed to the kernel: the first queued bytes (the
    /// `101` of an upgrade, a first response) are no longer at stake.
    pub(crate) sent_any: bool,
    /// Holding pushes for the write delay (in the driver's delayed queue).
    pub(crate) delayed: bool,
    /// The state asked to hear when the queue falls to the drain mark.
    pub(crate) watch_drain: bool,
}

/// What queueing bytes asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Queued {
    /// Not open (over budget, closing or shut down): the bytes were dropped.
    Ignored,
    /// Queued, and the connection just became dirty: add it to the list.
    Dirty,
    /// Queued, and the connection is now held for the write delay: add it
    /// to the delayed queue, due at now plus the delay.
    Delayed,
    /// Queued; the connection is already dirty or held.
    Held,
    /// Over its budget (`over_shard_budget`: the shard's, while it is
    /// behind): its queue was dropped; report it to the state after the batch.
    Overflowed { over_shard_budget: bool },
}

/// What a close asks of the driver. All false: it was shut down already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub(crate) struct Closed {
    /// It began closing, with a new deadline: watch that deadline.
    pub(crate) began: bool,
    /// Its last bytes were queued (a frame to count).
    pub(crate) queued_last: bool,
    /// It just became dirty: add it to the list.
    pub(crate) dirty: bool,
    /// It was shut down: issue the shutdown of its socket.
    pub(crate) terminated: bool,
    /// It was shut down because everything queued had been sent
    /// (`AfterFlush`), not cut.
    pub(crate) flushed: bool,
}

/// What a send's completion asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) struct Sent {
    /// Bytes the kernel took.
    pub(crate) bytes: usize,
    /// The watched queue fell to the drain mark: tell the state `Drained`.
    pub(crate) drained: bool,
    /// Something is left and it just became dirty: add it to the list.
    pub(crate) dirty: bool,
    /// Everything was sent on an `AfterFlush` close, so it was shut down:
    /// issue the shutdown of its socket.
    pub(crate) terminated: bool,
}

impl<T> Default for ConnIo<T> {
    fn default() -> ConnIo<T> {
        ConnIo {
            lifecycle: Lifecycle::Open,
            out: Outbound::default(),
            dirty: false,
            sent_any: false,
            delayed: false,
            watch_drain: false,
        }
    }
}

impl<T: Copy + Ord> ConnIo<T> {
    /// A connection just accepted: open, nothing queued.
    pub(crate) fn new() -> ConnIo<T> {
        ConnIo::default()
    }

    /// Shut down (or shutting down): no more input, no more output.
    #[inline]
    pub(crate) fn is_shut_down(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::ShuttingDown { .. })
    }

    /// Marks it dirty; true if it was not (the driver adds it to its list).
    #[inline]
    #[must_use]
    pub(crate) fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Queues `bytes` on an open connection within `budget`. `delay`: this
    /// is a push and a write delay is set, so unless the connection is
    /// already dirty or held it is held rather than made dirty. Past the
    /// budget its queue is dropped (but the first bytes if nothing was ever
    /// sent: they are its `101` or first response, and a close frame
    /// without them is garbage to a client still reading HTTP).
    #[inline]
    pub(crate) fn queue(
        &mut self,
        bytes: Bytes,
        budget: usize,
        pool: &mut SendBuffers,
        delay: bool,
    ) -> Queued {
        if self.lifecycle != Lifecycle::Open {
            return Queued::Ignored;
        }
        match self.out.enqueue(bytes, budget, pool) {
            Enqueued::Yes => {
                if delay {
                    if !self.dirty && !self.delayed {
                        self.delayed = true;
                        Queued::Delayed
                    } else {
                        Queued::Held
                    }
                } else if self.mark_dirty() {
                    Queued::Dirty
                } else {
                    Queued::Held
                }
            }
            over @ (Enqueued::OverBudget | Enqueued::OverShardBudget) => {
                self.out.discard_queued(!self.sent_any, pool);
                self.lifecycle = Lifecycle::Overflowed { reported: false };
                self.watch_drain = false;
                Queued::Overflowed {
                    over_shard_budget: over == Enqueued::OverShardBudget,
                }
            }
        }
    }

    /// The write delay of a held connection has passed; true if it just
    /// became dirty (the driver adds it to its list).
    #[inline]
    #[must_use]
    pub(crate) fn delay_passed(&mut self) -> bool {
        debug_assert!(self.delayed, "released a connection that was not held");
        self.delayed = false;
        self.mark_dirty()
    }

    /// The state wants `Drained` once the queue is at or below `mark`.
    /// True if it is already (tell it after this batch); otherwise it is
    /// watched, and a send completion tells. Ignored unless open.
    #[inline]
    #[must_use]
    pub(crate) fn watch_drain(&mut self, mark: usize) -> bool {
        if self.lifecycle != Lifecycle::Open {
            return false;
        }
        let drained = self.out.queued_bytes() <= mark;
        self.watch_drain = !drained;
        drained
    }

    /// The state closes the connection, with `last` bytes to send first.
    /// `Now`, or an overflow the state has not heard of yet, shuts it down
    /// at once; a connection already closing keeps its first deadline and
    /// the stronger of the two modes; otherwise it closes by `deadline()`
    /// (asked only then).
    /// `AfterFlush` with nothing left to send shuts it down.
    pub(crate) fn close(
        &mut self,
        mode: CloseMode,
        last: Option<Bytes>,
        deadline: impl FnOnce() -> T,
        pool: &mut SendBuffers,
    ) -> Closed {
        let mut closed = Closed::default();
        let (mode, deadline) = match self.lifecycle {
            Lifecycle::ShuttingDown { .. } => return closed,
            _ if mode == CloseMode::Now => {
                closed.terminated = self.terminate(pool);
                return closed;
            }
            Lifecycle::Overflowed { reported: false } => {
                closed.terminated = self.terminate(pool);
                return closed;
            }
            Lifecycle::Closing {
                mode: was,
                deadline,
            } => (was.max(mode), deadline),
            Lifecycle::Open | Lifecycle::Overflowed { reported: true } => {
                closed.began = true;
                (mode, deadline())
            }
        };
        debug_assert!(mode != CloseMode::Now, "a close `Now` never lingers");
        self.lifecycle = Lifecycle::Closing { mode, deadline };
        if let Some(last) = last {
            self.out.enqueue_final(last, pool);
            closed.queued_last = true;
            closed.dirty = self.mark_dirty();
        }
        if mode == CloseMode::AfterFlush && self.out.is_flushed() {
            closed.terminated = self.terminate(pool);
            closed.flushed = closed.terminated;
        }
        closed
    }

    /// Shuts it down: what is queued is dropped (what is in flight stays),
    /// nobody watches the drain any more. True unless it was shut down
    /// already: the driver then issues the shutdown of its socket.
    #[must_use]
    pub(crate) fn terminate(&mut self, pool: &mut SendBuffers) -> bool {
        if self.is_shut_down() {
            return false;
        }
        self.lifecycle = Lifecycle::ShuttingDown {
            shutdown_pending: true,
        };
        self.out.discard_queued(false, pool);
        self.watch_drain = false;
        true
    }

    /// The state has heard of the overflow (after the batch that caused it):
    /// a close from now on sends its last bytes.
    #[inline]
    pub(crate) fn overflow_reported(&mut self) {
        if self.lifecycle == (Lifecycle::Overflowed { reported: false }) {
            self.lifecycle = Lifecycle::Overflowed { reported: true };
        }
    }

    /// The kernel finished the socket's shutdown.
    #[inline]
    pub(crate) fn shutdown_done(&mut self) {
        debug_assert!(
            self.lifecycle
                == Lifecycle::ShuttingDown {
                    shutdown_pending: true
                },
            "a shutdown completed that was not pending"
        );
        self.lifecycle = Lifecycle::ShuttingDown {
            shutdown_pending: false,
        };
    }

    /// Shut down, its shutdown completed and no send in flight: the slot
    /// may be freed once the driver's own operations on it (a receive) are
    /// done too.
    #[inline]
    pub(crate) fn is_idle(&self) -> bool {
        self.lifecycle
            == Lifecycle::ShuttingDown {
                shutdown_pending: false,
            }
            && !self.out.is_sending()
    }

    /// Takes it off the dirty list and says what to hand the kernel: nothing
    /// once shut down, nothing queued, or a send already in flight.
    #[inline]
    pub(crate) fn take_send(&mut self) -> Option<SendPlan> {
        self.dirty = false;
        if self.is_shut_down() {
            return None;
        }
        self.out.prepare_send()
    }

    /// The kernel took `sent` bytes of the send in flight. A watched queue
    /// at or below `mark` is drained; what is left makes it dirty again;
    /// once everything is sent, an `AfterFlush` close shuts it down and an
    /// open connection gives its buffers back to the shard.
    #[inline]
    pub(crate) fn send_done(&mut self, sent: usize, mark: usize, pool: &mut SendBuffers) -> Sent {
        debug_assert!(
            self.out.is_sending(),
            "a send completed that was not in flight"
        );
        let bytes = self.out.complete_send(sent, pool);
        self.sent_any |= bytes > 0;
        let drained = self.watch_drain && self.out.queued_bytes() <= mark;
        if drained {
            self.watch_drain = false;
        }
        let mut done = Sent {
            bytes,
            drained,
            dirty: false,
            terminated: false,
        };
        if !self.out.is_flushed() {
            done.dirty = self.mark_dirty();
        } else {
            match self.lifecycle {
                Lifecycle::Closing {
                    mode: CloseMode::AfterFlush,
                    ..
                } => done.terminated = self.terminate(pool),
                Lifecycle::Open => self.out.release_idle_buffers(pool),
                _ => {}
            }
        }
        done
    }

    /// The send in flight failed (the socket was shut down under it, or
    /// broke): it is shut down. True if the driver must issue the shutdown.
    #[must_use]
    pub(crate) fn send_failed(&mut self, pool: &mut SendBuffers) -> bool {
        self.out.fail_send(pool);
        self.terminate(pool)
    }

    /// Its close deadline, while it is closing.
    #[inline]
    pub(crate) fn close_deadline(&self) -> Option<T> {
        match self.lifecycle {
            Lifecycle::Closing { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Whether its close deadline has passed at `now`: time to shut it down.
    #[inline]
    pub(crate) fn close_expired(&self, now: T) -> bool {
        self.close_deadline()
            .is_some_and(|deadline| now >= deadline)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    type Io = ConnIo<Duration>;

    const S: Duration = Duration::from_secs(1);

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// Sends everything queued, whole.
    fn send_all(io: &mut Io, pool: &mut SendBuffers) -> Sent {
        io.take_send().expect("something to send");
        let len = io.out.queued_bytes();
        io.send_done(len, 0, pool)
    }

    #[test]
    fn queueing_marks_dirty_once_and_a_push_with_delay_is_held() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert_eq!(io.queue(b("a"), 100, &mut pool, false), Queued::Dirty);
        assert_eq!(io.queue(b("b"), 100, &mut pool, false), Queued::Held);
        assert_eq!(
            io.queue(b("c"), 100, &mut pool, true),
            Queued::Held,
            "already dirty: the push goes with the next send"
        );
        let mut held = Io::new();
        assert_eq!(held.queue(b("a"), 100, &mut pool, true), Queued::Delayed);
        assert_eq!(held.queue(b("b"), 100, &mut pool, true), Queued::Held);
        assert!(held.delay_passed(), "dirty once the delay passed");
        assert!(!held.delayed);
    }

    #[test]
    fn an_overflow_keeps_the_first_bytes_while_nothing_was_sent() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert_eq!(io.queue(b("101"), 8, &mut pool, false), Queued::Dirty);
        assert_eq!(io.queue(b("push"), 8, &mut pool, false), Queued::Held);
        assert_eq!(
            io.queue(b("more"), 8, &mut pool, false),
            Queued::Overflowed {
                over_shard_budget: false
            }
        );
        assert_eq!(io.lifecycle, Lifecycle::Overflowed { reported: false });
        assert_eq!(io.out.queued_bytes(), 3, "the 101 stays");
        assert_eq!(io.queue(b("x"), 8, &mut pool, false), Queued::Ignored);

        let mut io = Io::new();
        assert_eq!(io.queue(b("101"), 8, &mut pool, false), Queued::Dirty);
        let _ = send_all(&mut io, &mut pool);
        assert!(io.sent_any);
        assert_eq!(io.queue(b("push"), 8, &mut pool, false), Queued::Dirty);
        let over = io.queue(b("more!"), 8, &mut pool, false);
        assert!(matches!(over, Queued::Overflowed { .. }));
        assert_eq!(io.out.queued_bytes(), 0, "after a send, everything goes");
    }

    #[test]
    fn a_close_while_closing_keeps_the_first_deadline_and_the_stronger_mode() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert_eq!(io.queue(b("data"), 100, &mut pool, false), Queued::Dirty);
        let first = io.close(CloseMode::Linger, None, || S, &mut pool);
        assert!(first.began && !first.terminated);
        let again = io.close(CloseMode::AfterFlush, Some(b("bye")), || 5 * S, &mut pool);
        assert!(!again.began && again.queued_last && !again.terminated);
        assert!(!again.dirty, "already dirty");
        assert_eq!(
            io.lifecycle,
            Lifecycle::Closing {
                mode: CloseMode::AfterFlush,
                deadline: S
            }
        );
        let weaker = io.close(CloseMode::Linger, None, || 9 * S, &mut pool);
        assert_eq!(weaker, Closed::default());
        assert_eq!(
            io.lifecycle,
            Lifecycle::Closing {
                mode: CloseMode::AfterFlush,
                deadline: S
            }
        );
        assert!(!io.close_expired(S / 2));
        assert!(io.close_expired(S));
    }

    #[test]
    fn after_flush_on_a_flushed_queue_terminates() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        let closed = io.close(CloseMode::AfterFlush, None, || S, &mut pool);
        assert!(closed.began && closed.terminated && closed.flushed);
        assert!(io.is_shut_down());

        // With last bytes: once they are sent.
        let mut io = Io::new();
        let closed = io.close(CloseMode::AfterFlush, Some(b("bye")), || S, &mut pool);
        assert!(closed.dirty && !closed.terminated);
        let sent = send_all(&mut io, &mut pool);
        assert!(sent.terminated && !sent.dirty);
        assert_eq!(
            io.lifecycle,
            Lifecycle::ShuttingDown {
                shutdown_pending: true
            }
        );

        // Linger waits for the peer instead.
        let mut io = Io::new();
        let closed = io.close(CloseMode::Linger, None, || S, &mut pool);
        assert!(closed.began && !closed.terminated);
    }

    #[test]
    fn an_unreported_overflow_closed_in_the_same_batch_terminates_at_once() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert_eq!(io.queue(b("0123"), 4, &mut pool, false), Queued::Dirty);
        let _ = send_all(&mut io, &mut pool);
        assert_eq!(io.queue(b("0123"), 4, &mut pool, false), Queued::Dirty);
        let over = io.queue(b("x"), 4, &mut pool, false);
        assert!(matches!(over, Queued::Overflowed { .. }));
        let closed = io.close(CloseMode::Linger, Some(b("1013")), || S, &mut pool);
        assert!(closed.terminated && !closed.flushed && !closed.queued_last);
        assert_eq!(io.out.queued_bytes(), 0, "no last bytes");

        // Once reported, the close sends its last bytes.
        let mut io = Io::new();
        assert_eq!(io.queue(b("0123"), 4, &mut pool, false), Queued::Dirty);
        let _ = send_all(&mut io, &mut pool);
        let _ = io.queue(b("0123"), 4, &mut pool, false);
        let _ = io.queue(b("x"), 4, &mut pool, false);
        io.overflow_reported();
        assert_eq!(io.lifecycle, Lifecycle::Overflowed { reported: true });
        let closed = io.close(CloseMode::AfterFlush, Some(b("1013")), || S, &mut pool);
        assert!(closed.began && closed.queued_last && !closed.terminated);
    }

    #[test]
    fn idle_only_once_the_shutdown_completed_and_nothing_is_sending() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert_eq!(io.queue(b("data"), 100, &mut pool, false), Queued::Dirty);
        assert!(io.take_send().is_some());
        assert!(io.terminate(&mut pool));
        assert!(!io.terminate(&mut pool), "once");
        assert!(!io.is_idle(), "shutdown pending, send in flight");
        io.shutdown_done();
        assert!(!io.is_idle(), "send in flight");
        assert!(!io.send_failed(&mut pool), "already shut down");
        assert!(io.is_idle());
        assert!(io.take_send().is_none());
        assert_eq!(pool.queued_bytes(), 0);
    }

    #[test]
    fn a_watched_queue_drains_at_the_mark() {
        let mut pool = SendBuffers::default();
        let mut io = Io::new();
        assert!(io.watch_drain(0), "nothing queued: drained now");
        assert_eq!(io.queue(b("data"), 100, &mut pool, false), Queued::Dirty);
        assert!(!io.watch_drain(0));
        assert!(io.watch_drain);
        let sent = send_all(&mut io, &mut pool);
        assert!(sent.drained && !io.watch_drain);
        assert_eq!(sent.bytes, 4);
    }
}
