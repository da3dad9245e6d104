//! The io_uring receive path (`--recv-path uring`): a few receive threads,
//! each owning one ring, one provided-buffer ring and the subscriber sockets
//! handed to it after their handshake. Every socket has one multishot receive
//! armed; the kernel fills a lent buffer whenever bytes arrive, and one
//! completion carries every frame that was queued on the socket, all parsed
//! before the buffer goes back. With `DEFER_TASKRUN` the kernel does that
//! receive work inside this thread's `io_uring_enter`, in batches, so the
//! client pays neither an epoll wake-up nor a `read` call per socket per
//! burst. This module owns the ring and the buffers; what the bytes mean is
//! `sub::Conn`'s business.
//!
//! With `--reconnect-every`/`--storm-at` each ring also keeps its sockets'
//! drop times. A due drop cancels the socket's receive; once the receive's
//! final completion is in (the ring holds no reference to the socket any
//! more), the socket is closed abortively (RST) and its `Conn` goes to a
//! reconnect task on the handshake runtime, which hands it back to a ring.

use crate::churn;
use crate::clock::now_ns;
use crate::sub::{self, Conn, Shared, Step};
use anyhow::{Context, Result};
use io_uring::{cqueue, opcode, types, IoUring};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Provided receive buffers per ring. A buffer is lent per completion and
/// returned once its frames are parsed, so this bounds completions pending
/// between two waits, not sockets: a broadcast to 4,096 sockets of one thread
/// fits in one wait. Past it a socket's receive ends with ENOBUFS and is
/// re-armed (counted as `recv_rearms`), which costs a submission, not data.
const RECV_BUFFERS: u16 = 4096;
/// Bytes per provided buffer: a page holds ~30 fan-out frames of a 64-byte
/// payload, so a socket that fell behind is drained in few completions.
const RECV_BUFFER_BYTES: usize = 4096;
/// Buffer group id of the receive buffers.
const RECV_GROUP: u16 = 0;
/// Submission queue entries: only arming receives is ever submitted.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: every data completion holds a buffer, so twice
/// the buffers leaves room for EOF and error completions without overflow.
const CQ_ENTRIES: u32 = 2 * RECV_BUFFERS as u32;
/// Longest wait on a quiet ring before it looks at its inbox of new sockets
/// and the stop flag again. Short enough that a handed-over socket is armed
/// before its subscribe acknowledgement could matter, long enough to cost
/// nothing (100 wake-ups/s).
const INBOX_POLL: Duration = Duration::from_millis(10);
/// Completions a batching wait asks for before its batch window ends: more
/// than any window gathers, so the window, not the count, ends the batch.
const BATCH_COMPLETIONS: u32 = RECV_BUFFERS as u32;
/// Tag in the user data of a receive's cancellation, so its own completion
/// is told from the receive's (slot indices never reach this bit).
const CANCEL_TAG: u64 = 1 << 63;
/// `IORING_ENTER_GETEVENTS` (wait for completions).
const ENTER_GETEVENTS: u32 = 1 << 0;
/// `IORING_ENTER_EXT_ARG` (the argument is a `GetEventsArg`).
const ENTER_EXT_ARG: u32 = 1 << 3;

/// The kernel's `struct io_uring_getevents_arg` as of Linux 6.12, which
/// named the crate's `pad` field `min_wait_usec`: the batch window.
#[repr(C)]
struct GetEventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// A socket whose handshake is done, with its frame state.
type Handoff = (TcpStream, Conn);

struct PoolInner {
    inboxes: Vec<mpsc::Sender<Handoff>>,
    next: AtomicUsize,
    stop: AtomicBool,
    /// Receives re-armed after they ended for want of a buffer.
    rearms: AtomicU64,
    /// Whether the rings run their receive work deferred (batched in the
    /// thread's own `io_uring_enter`), or fell back to the kernel default.
    deferred: AtomicBool,
    /// Batch window, microseconds (0 = wake on the first completion).
    batch_us: u32,
    /// Set when the kernel refused the batch window (before Linux 6.12).
    batch_refused: AtomicBool,
    /// The handshake runtime, where dropped subscribers reconnect.
    rt: tokio::runtime::Handle,
}

/// Handle to the receive threads; clones share them.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    /// Starts `threads` receive threads, each with its own ring; fails if
    /// io_uring cannot be set up here.
    pub(crate) fn start(
        sh: Arc<Shared>,
        threads: usize,
        batch_us: u32,
        rt: tokio::runtime::Handle,
    ) -> Result<Pool> {
        let mut inboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel();
            inboxes.push(tx);
            receivers.push(rx);
        }
        let inner = Arc::new(PoolInner {
            inboxes,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            rearms: AtomicU64::new(0),
            deferred: AtomicBool::new(true),
            batch_us,
            batch_refused: AtomicBool::new(false),
            rt,
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (sh, inner) = (sh.clone(), inner.clone());
            std::thread::Builder::new()
                .name(format!("{}uring-{i}", crate::sub::THREAD_PREFIX))
                .spawn(move || {
                    // The ring is built on the thread that submits to it:
                    // SINGLE_ISSUER and DEFER_TASKRUN require that.
                    let ring = match RecvRing::new() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if !ring.deferred {
                        inner.deferred.store(false, Relaxed);
                    }
                    let _ = ready_tx.send(Ok(()));
                    Receiver::new(ring, sh, rx, inner).run();
                })?;
            ready_rx
                .recv()
                .context("receive thread died during setup")?
                .context("io_uring receive ring setup (try --recv-path tokio)")?;
        }
        Ok(Pool { inner })
    }

    /// Hands a connected, subscribed socket to the next ring (round robin).
    pub(crate) fn adopt(&self, stream: TcpStream, conn: Conn) {
        let i = self.inner.next.fetch_add(1, Relaxed) % self.inner.inboxes.len();
        // A send fails only once the receive thread has stopped (end of run).
        let _ = self.inner.inboxes[i].send((stream, conn));
    }

    /// Receives re-armed after running out of buffers, so far.
    pub(crate) fn rearms(&self) -> u64 {
        self.inner.rearms.load(Relaxed)
    }

    /// True if every ring runs its receive work deferred into its own thread.
    pub(crate) fn deferred(&self) -> bool {
        self.inner.deferred.load(Relaxed)
    }

    /// The batch window in force, microseconds (0 if none, or refused).
    pub(crate) fn batch_us(&self) -> u32 {
        if self.inner.batch_refused.load(Relaxed) {
            0
        } else {
            self.inner.batch_us
        }
    }

    /// Asks the receive threads to stop at their next wake-up.
    pub(crate) fn stop(&self) {
        self.inner.stop.store(true, Relaxed);
    }
}

/// Memory lent to the kernel as the provided-buffer ring: the descriptor
/// ring and the buffers, alive as long as the ring that registered them.
struct BufRing {
    entries: NonNull<types::BufRingEntry>,
    layout: std::alloc::Layout,
    data: Box<[u8]>,
    tail: u16,
}

impl BufRing {
    fn new() -> io::Result<BufRing> {
        let count = usize::from(RECV_BUFFERS);
        // The kernel requires the descriptor ring to be page aligned.
        let layout = std::alloc::Layout::from_size_align(
            count * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let entries = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("out of memory"))?;
        Ok(BufRing {
            entries,
            layout,
            data: vec![0u8; count * RECV_BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
        })
    }

    /// Queues buffer `id` for the kernel; it sees it after `publish`.
    fn give(&mut self, id: u16) {
        let index = usize::from(self.tail & (RECV_BUFFERS - 1));
        // SAFETY: `index < RECV_BUFFERS`, the allocation holds that many
        // entries, and the kernel reads only entries between its head and the
        // published tail, which this slot is not until `publish`.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        let offset = usize::from(id) * RECV_BUFFER_BYTES;
        entry.set_addr(self.data[offset..].as_ptr() as u64);
        entry.set_len(RECV_BUFFER_BYTES as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every buffer given since the last call visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail field overlays the first entry's reserved field, as
        // the kernel ABI defines; the release store publishes the entries
        // written by `give` before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr())
                as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The bytes the kernel wrote into buffer `id`.
    fn filled(&self, id: u16, len: usize) -> &[u8] {
        let offset = usize::from(id) * RECV_BUFFER_BYTES;
        &self.data[offset..offset + len.min(RECV_BUFFER_BYTES)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring that registered
        // it is dropped first (field order of `RecvRing`).
        unsafe { std::alloc::dealloc(self.entries.as_ptr().cast(), self.layout) };
    }
}

/// One receive thread's ring.
struct RecvRing {
    // Field order matters: the ring (and its buffer registration) is dropped
    // before the buffer memory.
    ring: IoUring,
    bufs: BufRing,
    deferred: bool,
}

impl RecvRing {
    fn new() -> io::Result<RecvRing> {
        let (ring, deferred) = match IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(SQ_ENTRIES)
        {
            Ok(r) => (r, true),
            // DEFER_TASKRUN needs Linux 6.1; older kernels run receive work
            // from task_work at any syscall, which is correct, just less batched.
            Err(_) => (
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)?,
                false,
            ),
        };
        let mut bufs = BufRing::new()?;
        // SAFETY: the descriptor memory stays valid until the ring is dropped,
        // which happens before `bufs` is dropped (field order).
        unsafe {
            ring.submitter().register_buf_ring(
                bufs.entries.as_ptr() as u64,
                RECV_BUFFERS,
                RECV_GROUP,
            )?;
        }
        for id in 0..RECV_BUFFERS {
            bufs.give(id);
        }
        bufs.publish();
        Ok(RecvRing {
            ring,
            bufs,
            deferred,
        })
    }

    /// Arms a multishot receive on `fd`, tagged with connection slot `slot`.
    fn arm(&mut self, fd: i32, slot: usize) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), RECV_GROUP)
            .build()
            .user_data(slot as u64);
        // SAFETY: the receive writes only into provided buffers, which
        // outlive the ring; the socket stays open until its final
        // completion has been handled (`Receiver::release`, `Receiver::abort`).
        unsafe { self.push(&entry) }
    }

    /// Asks the kernel to end slot `slot`'s receive; its final completion follows.
    fn cancel(&mut self, slot: usize) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(slot as u64)
            .build()
            .user_data(CANCEL_TAG | slot as u64);
        // SAFETY: a cancellation names a request by its user data and
        // touches no memory of ours.
        unsafe { self.push(&entry) }
    }

    /// Queues `entry`, submitting first if the queue is full.
    ///
    /// # Safety
    /// Whatever `entry` points to must stay valid until its completion.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller's promise.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Submits what is queued, then waits for completions: at most
    /// `timeout` for the first one, and, with a batch window, until the
    /// window has passed since the wait began (`min_wait_usec`, Linux 6.12).
    /// Under load the window gathers many sockets' data into one wake-up and
    /// one batch of receives; a completion after a quiet window returns at
    /// once, so a lone delivery waits for no window. Returns false if the
    /// kernel refused the window, which the caller then drops.
    fn wait(&mut self, batch_us: u32, timeout: Duration) -> io::Result<bool> {
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        let ts = types::Timespec::from(timeout);
        let arg = GetEventsArg {
            sigmask: 0,
            sigmask_sz: 0,
            min_wait_usec: batch_us,
            ts: &ts as *const types::Timespec as u64,
        };
        let want = if batch_us > 0 { BATCH_COMPLETIONS } else { 1 };
        // SAFETY: `arg` is the kernel's getevents argument layout, passed with
        // EXT_ARG and its size; it and the timespec it points to outlive the call.
        let r = unsafe {
            self.ring
                .submitter()
                .enter(0, want, ENTER_GETEVENTS | ENTER_EXT_ARG, Some(&arg))
        };
        match r {
            Ok(_) => Ok(true),
            Err(e) if batch_us > 0 && e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

/// One completion copied out of the queue.
#[derive(Clone, Copy)]
struct Completion {
    slot: usize,
    result: i32,
    flags: u32,
}

/// A socket owned by a receive thread.
struct Slot {
    stream: TcpStream,
    conn: Conn,
    /// Its outcome is counted; waiting for the receive's final completion.
    closing: bool,
    /// Its drop is under way: the receive is cancelled, and the final
    /// completion closes the socket abortively and reconnects.
    dropping: Option<churn::Drop>,
    /// Tells this socket's timers from those of an earlier one in the slot.
    serial: u64,
}

/// A drop due at `.0` for the socket `.2` in slot `.1`.
type Timer = Reverse<(u64, usize, u64)>;

struct Receiver {
    ring: RecvRing,
    sh: Arc<Shared>,
    inbox: mpsc::Receiver<Handoff>,
    pool: Arc<PoolInner>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots of dropped sockets whose receive's cancellation may still sit
    /// in the submission queue: reused only after the next submission, so a
    /// cancellation can never meet the receive of the slot's next socket.
    /// (The kernel runs a cancellation when it is submitted.)
    quarantine: Vec<usize>,
    done: Vec<Completion>,
    /// Drop times, earliest first; stale entries are skipped when popped.
    timers: BinaryHeap<Timer>,
    /// The drop window generation the timers were set for.
    churn_gen: u32,
    serial: u64,
}

impl Receiver {
    fn new(
        ring: RecvRing,
        sh: Arc<Shared>,
        inbox: mpsc::Receiver<Handoff>,
        pool: Arc<PoolInner>,
    ) -> Receiver {
        Receiver {
            ring,
            sh,
            inbox,
            pool,
            slots: Vec::new(),
            free: Vec::new(),
            quarantine: Vec::new(),
            done: Vec::with_capacity(CQ_ENTRIES as usize),
            timers: BinaryHeap::new(),
            churn_gen: 0,
            serial: 0,
        }
    }

    fn run(mut self) {
        let stats = self.sh.register_thread();
        let mut batch_us = self.pool.batch_us;
        while !self.pool.stop.load(Relaxed) {
            while let Ok((stream, conn)) = self.inbox.try_recv() {
                let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
                self.adopt(stream, conn, &mut st);
            }
            self.schedule_all();
            let timeout = match self.timers.peek() {
                Some(Reverse((at, ..))) => {
                    Duration::from_nanos(at.saturating_sub(now_ns())).min(INBOX_POLL)
                }
                None => INBOX_POLL,
            };
            match self.ring.wait(batch_us, timeout) {
                Ok(true) => {}
                Ok(false) => {
                    self.pool.batch_refused.store(true, Relaxed);
                    batch_us = 0;
                }
                Err(_) => return,
            }
            self.free.append(&mut self.quarantine);
            self.fire_timers();
            self.done.clear();
            self.done.extend(
                self.ring
                    .ring
                    .completion()
                    .map(|c: cqueue::Entry| Completion {
                        slot: c.user_data() as usize,
                        result: c.result(),
                        flags: c.flags(),
                    }),
            );
            if self.done.is_empty() {
                continue;
            }
            let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
            for i in 0..self.done.len() {
                let c = self.done[i];
                self.complete(c, &mut st);
            }
            drop(st);
            self.ring.bufs.publish();
        }
    }

    fn adopt(&mut self, stream: TcpStream, mut conn: Conn, st: &mut crate::sub::ThreadStats) {
        // Frames that arrived with the upgrade response are parsed first.
        let step = conn.feed(&self.sh, &[], st, now_ns());
        if !matches!(step, Step::More) {
            conn.finish(&self.sh, step);
            return;
        }
        let fd = stream.as_raw_fd();
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.serial += 1;
        self.slots[slot] = Some(Slot {
            stream,
            conn,
            closing: false,
            dropping: None,
            serial: self.serial,
        });
        if self.ring.arm(fd, slot).is_err() {
            self.end(slot, Step::More);
            self.release(slot);
            return;
        }
        self.schedule(slot);
    }

    /// Sets slot `slot`'s drop timer, if it has a drop to come.
    fn schedule(&mut self, slot: usize) {
        let sh = &self.sh;
        if let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            if let Some(d) = s.conn.next_drop(sh, now_ns()) {
                self.timers.push(Reverse((d.at_ns, slot, s.serial)));
            }
        }
    }

    /// Sets every socket's drop timer once the drop window is fixed.
    fn schedule_all(&mut self) {
        if !self.sh.churn.drops() {
            return;
        }
        let gen = self.sh.churn_gen.load(Relaxed);
        if gen == self.churn_gen {
            return;
        }
        self.churn_gen = gen;
        self.timers.clear();
        for slot in 0..self.slots.len() {
            self.schedule(slot);
        }
    }

    /// Starts every drop that is due: cancels the socket's receive, whose
    /// final completion then finishes the drop (`abort`).
    fn fire_timers(&mut self) {
        let now = now_ns();
        while let Some(&Reverse((at, slot, serial))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if s.serial != serial || s.closing || s.dropping.is_some() {
                continue;
            }
            match s.conn.next_drop(&self.sh, now) {
                Some(d) if d.at_ns <= now => {
                    s.dropping = Some(d);
                    if self.ring.cancel(slot).is_err() {
                        self.end(slot, Step::More);
                    }
                }
                Some(d) => self.timers.push(Reverse((d.at_ns, slot, serial))),
                None => {}
            }
        }
    }

    fn complete(&mut self, c: Completion, st: &mut crate::sub::ThreadStats) {
        if c.slot as u64 & CANCEL_TAG != 0 {
            // The cancellation's own answer; the receive's final completion
            // (or its absence, if it had just ended) is what counts.
            return;
        }
        let more = cqueue::more(c.flags);
        if let Some(id) = cqueue::buffer_select(c.flags) {
            if c.result > 0 {
                if let Some(s) = self.slots.get_mut(c.slot).and_then(Option::as_mut) {
                    if !s.closing {
                        let data = self.ring.bufs.filled(id, c.result as usize);
                        let step = s.conn.feed(&self.sh, data, st, now_ns());
                        if let Some(pong) = s.conn.take_pong() {
                            // Rare and tiny: written directly; a full socket
                            // buffer just loses this pong.
                            let _ = (&s.stream).write(&pong);
                        }
                        if !matches!(step, Step::More) {
                            self.end(c.slot, step);
                        }
                    }
                }
            }
            self.ring.bufs.give(id);
        }
        if more {
            return;
        }
        let state = self
            .slots
            .get(c.slot)
            .and_then(Option::as_ref)
            .map(|s| (s.closing, s.dropping));
        let closing = match state {
            Some((false, Some(d))) => return self.abort(c.slot, d),
            s => s.map(|s| s.0),
        };
        match closing {
            None => {}
            Some(true) => self.release(c.slot),
            Some(false) if c.result > 0 || c.result == -libc::ENOBUFS => {
                // The receive ended with the socket still open (out of
                // buffers, or the kernel stopped the multishot): re-arm.
                if c.result == -libc::ENOBUFS {
                    self.pool.rearms.fetch_add(1, Relaxed);
                }
                let fd = self.slots[c.slot].as_ref().map(|s| s.stream.as_raw_fd());
                if let Some(fd) = fd {
                    if self.ring.arm(fd, c.slot).is_err() {
                        self.end(c.slot, Step::More);
                        self.release(c.slot);
                    }
                }
            }
            Some(false) => {
                // EOF or a socket error without a close frame.
                self.end(c.slot, Step::More);
                self.release(c.slot);
            }
        }
    }

    /// Counts a connection's outcome once and shuts it down, which ends its
    /// receive with a final completion.
    fn end(&mut self, slot: usize, outcome: Step) {
        if let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            if !s.closing {
                s.closing = true;
                s.conn.finish(&self.sh, outcome);
                let _ = s.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Finishes a drop once no receive is armed: closes the socket
    /// abortively and sends its subscriber off to reconnect.
    fn abort(&mut self, slot: usize, d: churn::Drop) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.quarantine.push(slot);
        let Slot {
            stream, mut conn, ..
        } = s;
        sub::set_abortive(stream.as_raw_fd());
        drop(stream);
        conn.dropped(&self.sh, d);
        let pool = Pool {
            inner: self.pool.clone(),
        };
        self.pool
            .rt
            .spawn(sub::rejoin_ring(self.sh.clone(), conn, pool));
    }

    /// Closes the socket once no receive is armed on it.
    fn release(&mut self, slot: usize) {
        if self.slots.get_mut(slot).and_then(Option::take).is_some() {
            self.free.push(slot);
        }
    }
}
