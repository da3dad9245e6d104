//! The shard's ring: one io_uring, built on the `io-uring` crate, that
//! carries every operation of the shard and is the only thing it waits on.
//!
//! A multishot accept puts new connections straight into the ring's
//! registered file table (direct descriptors: no fd-table lookup per
//! operation, no process fd per connection); each connection has a multishot
//! receive over one provided-buffer ring, so an idle connection holds no read
//! buffer; sends are `send` for one frame or `sendmsg` for a backlog. A read
//! of the shard's eventfd, re-armed after each completion, is how other shards
//! (and the process's shutdown) wake it. The loop waits for completions with a
//! timeout, which is also its timer.
//!
//! tokio-uring 0.5 (the latest release) can submit none of these operations:
//! no multishot, no provided buffers, no direct descriptors.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::shard::key::{ConnKey, GENERATION_BITS};

/// Submission queue entries. Fan-out pushes one send per subscriber per loop
/// turn; when the queue fills it is submitted and reused, so this only sets how
/// many sends share one `io_uring_enter`.
const SQ_ENTRIES: u32 = 4096;
/// Fewest completion queue entries: four times the submission queue, so a
/// burst of receives and sends in one turn stays in the shared ring.
const MIN_CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Most completion queue entries the kernel allows (`IORING_MAX_CQ_ENTRIES`).
const MAX_CQ_ENTRIES: u32 = 65_536;
/// Completions one connection can have outstanding at once: its receive, its
/// send and its shutdown.
const COMPLETIONS_PER_CONN: u32 = 3;
/// Provided receive buffers per shard. Buffers return to the ring as soon as
/// their completion is handled, so this bounds receives pending between two
/// loop turns, not connections; a receive that finds none ends with ENOBUFS
/// and is re-armed, its bytes waiting in the socket meanwhile. The kernel
/// takes buffers round-robin, so every one of them becomes resident while
/// the shard is busy (an idle shard gives the pages back, see
/// `Ring::release_receive_pages`): 2,048 (8 MiB) showed up as 530 bytes per
/// connection at 15,000 idle connections; 512 (2 MiB) is still half a
/// turn's completion batch.
pub(crate) const RECV_BUFFERS: u16 = 512;
/// Size of one provided buffer: a full page, larger than any control message
/// and most publishes; longer messages span several receives.
pub(crate) const RECV_BUFFER_BYTES: usize = 4096;
/// `IORING_ENTER_GETEVENTS`: reap completions. With a `min_complete` of 0
/// it never blocks; on a `DEFER_TASKRUN` ring it is what runs the deferred
/// completion work.
const ENTER_GETEVENTS: u32 = 1;
/// Buffer group id of the receive buffers.
const RECV_GROUP: u16 = 0;

// The kernel rounds ring sizes up to powers of two; these are sized as
// such so what is asked is what is got. A provided-buffer ring's entry
// count must be a power of two, or registering it fails.
const _: () = assert!(SQ_ENTRIES.is_power_of_two() && MIN_CQ_ENTRIES.is_power_of_two());
const _: () = assert!(MIN_CQ_ENTRIES <= MAX_CQ_ENTRIES);
const _: () = assert!(RECV_BUFFERS.is_power_of_two() && RECV_BUFFERS <= 32_768);
// `user_data`: the op kind in the top byte, the generation in the 24 bits
// below it, the slot in the low 32.
const _: () = assert!(GENERATION_BITS <= 24);

/// What a completion belongs to; encoded in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// The multishot accept on the listener.
    Accept = 1,
    /// A connection's multishot receive.
    Recv = 2,
    /// A connection's send.
    Send = 3,
    /// A connection's shutdown.
    Shutdown = 4,
    /// A close of a direct descriptor; nothing to act on.
    Close = 5,
    /// The read of the shard's eventfd: someone woke the shard.
    Wake = 6,
    /// A message another shard put on this ring: it woke the shard.
    Woken = 7,
    /// A message this shard sent to the ring of the shard in the key's
    /// slot; only failures complete (the success is skipped).
    WakePeer = 8,
}

/// An operation's kind and the connection it is for, so a completion that
/// outlives its connection is recognised by the key's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) kind: OpKind,
    pub(crate) key: ConnKey,
}

impl Token {
    fn new(kind: OpKind, key: ConnKey) -> Token {
        Token { kind, key }
    }

    /// For operations that belong to no connection.
    fn shard(kind: OpKind) -> Token {
        Token::new(kind, ConnKey::new(0, 0))
    }

    fn encode(self) -> u64 {
        debug_assert!(self.key.generation() < 1 << GENERATION_BITS);
        ((self.kind as u64) << 56)
            | (u64::from(self.key.generation()) << 32)
            | self.key.slot() as u64
    }

    fn decode(data: u64) -> Option<Token> {
        let kind = match data >> 56 {
            1 => OpKind::Accept,
            2 => OpKind::Recv,
            3 => OpKind::Send,
            4 => OpKind::Shutdown,
            5 => OpKind::Close,
            6 => OpKind::Wake,
            7 => OpKind::Woken,
            8 => OpKind::WakePeer,
            _ => return None,
        };
        let generation = ((data >> 32) & ((1 << GENERATION_BITS) - 1)) as u32;
        Some(Token::new(kind, ConnKey::new(data as u32, generation)))
    }
}

/// One completion, copied out of the queue so handling it can borrow the shard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub(crate) token: Token,
    pub(crate) result: i32,
    /// The operation stays armed (multishot) and will complete again.
    pub(crate) more: bool,
    /// The provided buffer the kernel filled, for receives.
    pub(crate) buffer: Option<u16>,
}

/// Memory handed to the kernel as the provided-buffer ring: the ring of
/// descriptors and the buffers themselves, both raw memory the kernel
/// writes into, alive as long as the ring. The buffers are their own
/// anonymous mapping, so their pages can be given back while the mapping
/// stays.
struct BufRing {
    entries: NonNull<types::BufRingEntry>,
    entries_layout: std::alloc::Layout,
    data: NonNull<u8>,
    tail: u16,
    /// A buffer has been filled since the pages were last given back.
    touched: bool,
    /// Buffers handed out by drained completions and not provided back yet.
    lent: u32,
}

/// Bytes of all the receive buffers together.
const RECV_DATA_BYTES: usize = RECV_BUFFERS as usize * RECV_BUFFER_BYTES;

impl BufRing {
    fn new() -> io::Result<BufRing> {
        let count = usize::from(RECV_BUFFERS);
        // The kernel requires the descriptor ring to be page aligned.
        let entries_layout = std::alloc::Layout::from_size_align(
            count * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let entries = unsafe { std::alloc::alloc_zeroed(entries_layout) };
        let entries: NonNull<types::BufRingEntry> = NonNull::new(entries.cast())
            .ok_or_else(|| io::Error::other("out of memory for receive buffers"))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched. Its pages are zero-filled on first touch.
        let data = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RECV_DATA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if data == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
            return Err(err);
        }
        Ok(BufRing {
            entries,
            entries_layout,
            // mmap never returns null on success (the null page is not mappable).
            data: NonNull::new(data.cast()).expect("mmap returned null"),
            tail: 0,
            touched: false,
            lent: 0,
        })
    }

    /// Hands buffer `id` (back) to the kernel.
    fn provide(&mut self, id: u16) {
        let mask = RECV_BUFFERS - 1;
        let index = usize::from(self.tail & mask);
        let offset = usize::from(id) * RECV_BUFFER_BYTES;
        // SAFETY: `index < RECV_BUFFERS`, the allocation holds that many entries,
        // and the kernel only reads entries between its head and our tail, which
        // this slot is not until the tail store below publishes it. `offset` is
        // inside the data allocation because `id < RECV_BUFFERS`.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(index);
            entry.set_addr(self.data.as_ptr().add(offset) as u64);
            entry.set_len(RECV_BUFFER_BYTES as u32);
            entry.set_bid(id);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved field, as
        // the kernel ABI defines; the pointer comes from our own mutable
        // allocation, is 2-byte aligned, and the kernel only reads it. The
        // release store publishes the entry written above.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr()) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Gives the pages of every buffer back to the kernel; a buffer's page
    /// comes back, zero-filled, when the kernel next receives into it.
    ///
    /// # Safety
    /// No buffer may hold bytes not yet read: every completion that handed
    /// one out must have been drained and its buffer provided back.
    unsafe fn release_pages(&mut self) {
        // SAFETY: the range is exactly our own mapping, which stays mapped:
        // dropping its pages frees nothing Rust can reach, whatever the kernel
        // does meanwhile (a write to a dropped page lands in a fresh one).
        // That no bytes are lost rests on the caller (no buffer holds unread
        // bytes) and on the kernel filling buffers only in this thread's own
        // system calls (on this DEFER_TASKRUN ring a socket receive's copy is
        // work deferred to the single issuer's `io_uring_enter`, never a
        // kernel worker's), so no receive lands in a page being dropped.
        let rc = unsafe {
            libc::madvise(
                self.data.as_ptr().cast(),
                RECV_DATA_BYTES,
                libc::MADV_DONTNEED,
            )
        };
        debug_assert_eq!(rc, 0, "madvise of our own mapping");
        self.touched = false;
    }

    /// The bytes the kernel wrote into buffer `id`.
    ///
    /// # Safety
    /// `id` must be a buffer a completion has handed to us and not yet given
    /// back with `provide`: only then does the kernel leave it alone.
    unsafe fn filled(&self, id: u16, len: usize) -> &[u8] {
        let offset = usize::from(id % RECV_BUFFERS) * RECV_BUFFER_BYTES;
        // SAFETY: the range lies inside the data allocation; the caller
        // guarantees the kernel is not writing it.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().add(offset), len.min(RECV_BUFFER_BYTES))
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated and mapped in `new` with these sizes. The ring (and
        // with it the kernel's registration) is dropped before this field, see
        // `Ring`.
        unsafe {
            std::alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            libc::munmap(self.data.as_ptr().cast(), RECV_DATA_BYTES);
        }
    }
}

/// The shard's ring.
pub(crate) struct Ring {
    // Field order matters: the ring is dropped (and unregisters the buffers)
    // before the buffer memory is freed.
    ring: IoUring,
    bufs: BufRing,
    /// Entries that found the submission queue full while the kernel would not
    /// take more; they go first at the next submission, so none is lost.
    waiting: VecDeque<squeue::Entry>,
    /// Where the eventfd read lands; boxed so it does not move while the
    /// kernel holds the read.
    wake_buf: Box<u64>,
    eventfd: RawFd,
    /// `io_uring_enter` calls made, for the syscall counters.
    enters: u64,
    /// Times the kernel had to keep completions in its overflow list.
    overflow_flushes: u64,
    /// Times the receive buffers' pages were given back.
    receive_page_releases: u64,
}

/// Completion queue size for a shard of `max_conns` connections: room for
/// every connection's receive, send and shutdown at once, so one turn cannot
/// overflow it, within what the kernel allows.
fn cq_entries(max_conns: usize) -> u32 {
    let wanted = (max_conns as u64)
        .saturating_mul(u64::from(COMPLETIONS_PER_CONN))
        .saturating_add(u64::from(SQ_ENTRIES));
    let wanted = wanted.clamp(u64::from(MIN_CQ_ENTRIES), u64::from(MAX_CQ_ENTRIES));
    (wanted as u32).next_power_of_two().min(MAX_CQ_ENTRIES)
}

impl Ring {
    /// Creates the ring with a table of `files` direct descriptors and a
    /// completion queue sized for `max_conns`, registers the receive buffers,
    /// and arms the read of `eventfd`.
    pub(crate) fn new(eventfd: RawFd, files: u32, max_conns: usize) -> io::Result<Ring> {
        Ring::with_sizes(eventfd, files, SQ_ENTRIES, cq_entries(max_conns))
    }

    fn with_sizes(eventfd: RawFd, files: u32, sq: u32, cq: u32) -> io::Result<Ring> {
        // Completion work (a receive's copy, a send's completion) runs only
        // when this thread enters the ring asking for events, in one batch,
        // not at whatever system call the thread makes next (COOP_TASKRUN),
        // as io_uring advises for a ring with a single issuer. Against COOP
        // in a saturated broadcast (loadtest/ab.sh, scenario a, four runs
        // of 5 rounds) p99 0.78x to 1.04x, CPU 1.00x: level to better.
        // `submit` therefore always asks for events (never waiting for any),
        // and the task-run flag says when deferred work is pending.
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_clamp()
            .setup_submit_all()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(sq)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("io_uring setup: {e} (ringcast needs Linux 6.1 or newer)"),
                )
            })?;
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
            bufs.provide(id);
        }
        ring.submitter().register_files_sparse(files)?;
        let mut ring = Ring {
            ring,
            bufs,
            waiting: VecDeque::new(),
            wake_buf: Box::new(0),
            eventfd,
            enters: 0,
            overflow_flushes: 0,
            receive_page_releases: 0,
        };
        ring.arm_wake();
        Ok(ring)
    }

    /// Queues an entry. It never fails: when the submission queue is full and
    /// the kernel will not take it now, the entry waits for the next submit.
    fn push(&mut self, entry: squeue::Entry) {
        if self.waiting.is_empty() && self.try_push(&entry) {
            return;
        }
        if self.submit().is_ok() && self.waiting.is_empty() && self.try_push(&entry) {
            return;
        }
        self.waiting.push_back(entry);
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every entry built here points only at memory that outlives
        // the operation: descriptors stay open until their ops complete, send
        // buffers are owned by the connection's in-flight send until its
        // completion is handled, and the wake buffer lives as long as the ring.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Moves entries that waited for room into the submission queue.
    fn refill(&mut self) {
        while let Some(entry) = self.waiting.pop_front() {
            if !self.try_push(&entry) {
                self.waiting.push_front(entry);
                return;
            }
        }
    }

    /// Arms a multishot accept on `listener`; each completion carries the
    /// direct descriptor (file table index) of a new connection.
    pub(crate) fn accept(&mut self, listener: RawFd) {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .allocate_file_index(true)
            .build()
            .user_data(Token::shard(OpKind::Accept).encode());
        self.push(entry);
    }

    /// Arms the read of the shard's eventfd.
    pub(crate) fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.eventfd), buf.cast(), 8)
            .build()
            .user_data(Token::shard(OpKind::Wake).encode());
        self.push(entry);
    }

    /// Wakes the shard `peer` whose ring is `peer_ring` with a completion on
    /// that ring, submitted with this turn's other entries. If the message
    /// cannot be delivered (the ring is gone, or its completion queue is
    /// full), a `WakePeer` completion names `peer` for a fallback.
    pub(crate) fn wake_peer(&mut self, peer: usize, peer_ring: RawFd) {
        let entry = opcode::MsgRingData::new(
            types::Fd(peer_ring),
            0,
            Token::shard(OpKind::Woken).encode(),
            None,
        )
        .build()
        .flags(squeue::Flags::SKIP_SUCCESS)
        .user_data(Token::new(OpKind::WakePeer, ConnKey::new(peer as u32, 0)).encode());
        self.push(entry);
    }

    /// This ring's descriptor, for other shards to message.
    pub(crate) fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Shuts a connection down (both directions): its pending receive ends
    /// and its pending send fails.
    ///
    /// The kernel runs shutdown from a worker and looks the direct descriptor
    /// up only then, so the slot must not be closed (and reused by an accept)
    /// before this operation's completion has been seen.
    pub(crate) fn shutdown(&mut self, file: u32, key: ConnKey) {
        let entry = opcode::Shutdown::new(types::Fixed(file), libc::SHUT_RDWR)
            .build()
            .user_data(Token::new(OpKind::Shutdown, key).encode());
        self.push(entry);
    }

    /// Closes a connection's direct descriptor, freeing its table slot.
    pub(crate) fn close(&mut self, file: u32) {
        let entry = opcode::Close::new(types::Fixed(file))
            .build()
            .user_data(Token::shard(OpKind::Close).encode());
        self.push(entry);
    }

    /// Arms a multishot receive on a connection's direct descriptor.
    pub(crate) fn recv(&mut self, file: u32, key: ConnKey) {
        let entry = opcode::RecvMulti::new(types::Fixed(file), RECV_GROUP)
            .build()
            .user_data(Token::new(OpKind::Recv, key).encode());
        self.push(entry);
    }

    /// Sends the iovecs described by `msg` on a connection.
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it points at must stay valid and
    /// unmoved until the completion for this key has been returned by `drain`.
    pub(crate) unsafe fn send_msg(&mut self, file: u32, msg: *const libc::msghdr, key: ConnKey) {
        let entry = opcode::SendMsg::new(types::Fixed(file), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(Token::new(OpKind::Send, key).encode());
        self.push(entry);
    }

    /// Sends up to `len` bytes at `ptr` on a connection (at most 4 GiB at
    /// once; the caller sends the rest after the completion).
    ///
    /// # Safety
    /// The bytes must stay valid and unmoved until the completion for this
    /// key has been returned by `drain`.
    pub(crate) unsafe fn send(&mut self, file: u32, ptr: *const u8, len: usize, key: ConnKey) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fixed(file), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Token::new(OpKind::Send, key).encode());
        self.push(entry);
    }

    /// Submits what is queued without waiting, and runs the completion work
    /// deferred to this thread (posting its completions). Enters the kernel
    /// also when nothing is queued but completion work is pending or
    /// completions sit in the kernel's overflow list.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        self.refill();
        let mut sq = self.ring.submission();
        sq.sync();
        let (queued, overflowed, deferred) = (sq.len(), sq.cq_overflow(), sq.taskrun());
        drop(sq);
        if queued == 0 && !overflowed && !deferred {
            return Ok(());
        }
        self.count_enter(overflowed);
        let queued = u32::try_from(queued).unwrap_or(u32::MAX);
        // SAFETY: no argument is passed, and every queued entry points only
        // at memory that outlives its operation (see `try_push`).
        let entered = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(queued, 0, ENTER_GETEVENTS, None)
        };
        match entered {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued and sleeps until a completion arrives or
    /// `timeout` passes.
    pub(crate) fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.refill();
        let overflowed = self.ring.submission().cq_overflow();
        self.count_enter(overflowed);
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn count_enter(&mut self, overflowed: bool) {
        self.enters += 1;
        self.overflow_flushes += u64::from(overflowed);
    }

    /// True if completions are waiting to be drained.
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Moves up to `limit` completions into `out`.
    pub(crate) fn drain(&mut self, out: &mut Vec<Completion>, limit: usize) {
        let cq = self.ring.completion();
        for cqe in cq.take(limit) {
            let buffer = cqueue::buffer_select(cqe.flags());
            let Some(token) = Token::decode(cqe.user_data()) else {
                // Not ours to handle; its buffer, if any, goes straight back.
                if let Some(id) = buffer {
                    self.bufs.provide(id);
                }
                continue;
            };
            self.bufs.lent += u32::from(buffer.is_some());
            out.push(Completion {
                token,
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
                buffer,
            });
        }
    }

    /// The bytes of a filled receive buffer. Valid until `recycle(id)`.
    ///
    /// # Safety
    /// `id` must come from a receive completion and not have been recycled yet.
    pub(crate) unsafe fn received(&self, id: u16, len: usize) -> &[u8] {
        // SAFETY: forwarded from the caller.
        unsafe { self.bufs.filled(id, len) }
    }

    /// Returns a receive buffer to the kernel.
    pub(crate) fn recycle(&mut self, id: u16) {
        debug_assert!(self.bufs.lent > 0, "buffer {id} recycled but none lent");
        self.bufs.provide(id);
        self.bufs.lent = self.bufs.lent.saturating_sub(1);
        self.bufs.touched = true;
    }

    /// Gives the receive buffers' pages back to the kernel if any was filled
    /// since they last were, no buffer is lent out and no completion is
    /// waiting (one may carry a filled buffer); otherwise does nothing. For a
    /// shard about to sleep after a quiet spell: each buffer the kernel takes
    /// round-robin stays resident otherwise, 2 MiB a shard. A page comes back
    /// with one fault on the next receive into it.
    pub(crate) fn release_receive_pages(&mut self) {
        if !self.bufs.touched
            || self.bufs.lent > 0
            || self.has_completions()
            || self.ring.submission().cq_overflow()
        {
            return;
        }
        // SAFETY: no completion is waiting, in the ring or in the kernel's
        // overflow list, and every buffer a drained one handed out has been
        // provided back, so no buffer holds unread bytes.
        unsafe { self.bufs.release_pages() };
        self.receive_page_releases += 1;
    }

    /// Counters for /metrics: `io_uring_enter` calls, overflow flushes,
    /// completions the kernel dropped (must stay 0), and receive-page
    /// releases.
    pub(crate) fn counters(&mut self) -> RingCounters {
        RingCounters {
            enters: self.enters,
            overflow_flushes: self.overflow_flushes,
            dropped: u64::from(self.ring.completion().overflow()),
            receive_page_releases: self.receive_page_releases,
        }
    }
}

/// What the ring has counted since it was created.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RingCounters {
    pub(crate) enters: u64,
    pub(crate) overflow_flushes: u64,
    pub(crate) dropped: u64,
    pub(crate) receive_page_releases: u64,
}

/// Errors of `io_uring_enter` that only mean "try again next turn": a signal,
/// the wait's timeout, or the kernel asking us to reap completions first.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::ETIME | libc::EBUSY | libc::EAGAIN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    /// A small ring and the eventfd it was given, closed after the ring
    /// (field order).
    struct TestRing {
        ring: Ring,
        eventfd: OwnedFd,
    }

    fn test_ring() -> TestRing {
        // SAFETY: eventfd has no memory-safety preconditions; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ring = Ring::with_sizes(fd, 16, 8, 16).unwrap();
        TestRing { ring, eventfd }
    }

    /// A test ring whose file 0 is one end of a socket pair, a multishot
    /// receive for `key` queued on it; returns the end to write to, and
    /// the ring's end, which must stay open.
    fn receiving(key: ConnKey) -> (TestRing, UnixStream, UnixStream) {
        let mut t = test_ring();
        let (client, server) = UnixStream::pair().unwrap();
        t.ring
            .ring
            .submitter()
            .register_files_update(0, &[server.as_raw_fd()])
            .unwrap();
        t.ring.recv(0, key);
        (t, client, server)
    }

    #[test]
    fn tokens_round_trip_through_user_data() {
        let t = Token::new(OpKind::Send, ConnKey::new(123_456, 0x0123_4567));
        let back = Token::decode(t.encode()).unwrap();
        assert_eq!(back, t);
        assert!(Token::decode(0).is_none());
    }

    #[test]
    fn completions_that_overflowed_reach_the_ring_without_new_submissions() {
        let mut t = test_ring();
        let ring = &mut t.ring;
        let nops = 64;
        for _ in 0..nops {
            let nop = opcode::Nop::new()
                .build()
                .user_data(Token::shard(OpKind::Close).encode());
            ring.push(nop);
        }
        ring.submit().unwrap();
        let mut seen = Vec::new();
        for _ in 0..nops {
            ring.drain(&mut seen, usize::MAX);
            // Nothing is queued now: only the overflow flag says to enter.
            ring.submit().unwrap();
        }
        let nops_seen = seen
            .iter()
            .filter(|c| c.token.kind == OpKind::Close)
            .count();
        assert_eq!(
            nops_seen, nops,
            "every completion came out of the overflow list"
        );
        assert!(
            ring.counters().overflow_flushes > 0,
            "the test did overflow the queue"
        );
        assert_eq!(ring.counters().dropped, 0);
    }

    #[test]
    fn a_ring_message_wakes_the_peer_and_a_failed_one_names_it() {
        let (mut ta, mut tb) = (test_ring(), test_ring());
        let fd_b = tb.eventfd.as_raw_fd();
        let (a, b) = (&mut ta.ring, &mut tb.ring);
        a.wake_peer(1, b.fd());
        // Not a ring: the message fails and its completion names the peer.
        a.wake_peer(5, fd_b);
        a.submit().unwrap();

        let mut on_b = Vec::new();
        b.submit_and_wait(Duration::from_secs(5)).unwrap();
        b.drain(&mut on_b, usize::MAX);
        assert_eq!(on_b.len(), 1, "{on_b:?}");
        assert_eq!(on_b[0].token.kind, OpKind::Woken);

        let mut on_a = Vec::new();
        a.drain(&mut on_a, usize::MAX);
        assert_eq!(
            on_a.len(),
            1,
            "the delivered message completes silently: {on_a:?}"
        );
        assert_eq!(on_a[0].token.kind, OpKind::WakePeer);
        assert_eq!(on_a[0].token.key.slot(), 5);
        assert!(on_a[0].result < 0);
    }

    #[test]
    fn receive_pages_are_given_back_only_when_no_buffer_holds_bytes() {
        let key = ConnKey::new(0, 1);
        let (mut t, mut client, _server) = receiving(key);
        let ring = &mut t.ring;
        client.write_all(b"first").unwrap();
        let mut seen = Vec::new();
        while seen.is_empty() {
            ring.submit_and_wait(Duration::from_secs(5)).unwrap();
            ring.drain(&mut seen, usize::MAX);
        }
        let c = seen[0];
        assert_eq!((c.token, c.result), (Token::new(OpKind::Recv, key), 5));
        let id = c.buffer.expect("a provided buffer");

        ring.release_receive_pages();
        assert_eq!(ring.counters().receive_page_releases, 0, "a buffer is lent");
        // SAFETY: the buffer came with the completion above, not recycled.
        assert_eq!(unsafe { ring.received(id, 5) }, b"first");
        ring.recycle(id);
        ring.release_receive_pages();
        assert_eq!(ring.counters().receive_page_releases, 1);
        ring.release_receive_pages();
        assert_eq!(
            ring.counters().receive_page_releases,
            1,
            "nothing touched since"
        );

        // The next receive lands in a page given back, intact.
        client.write_all(b"second").unwrap();
        seen.clear();
        while seen.is_empty() {
            ring.submit_and_wait(Duration::from_secs(5)).unwrap();
            ring.drain(&mut seen, usize::MAX);
        }
        let id = seen[0].buffer.expect("a provided buffer");
        // SAFETY: as above.
        assert_eq!(unsafe { ring.received(id, 6) }, b"second");
        ring.recycle(id);
    }

    #[test]
    fn submitting_runs_the_completion_work_deferred_to_this_thread() {
        let key = ConnKey::new(0, 1);
        let (mut t, mut client, _server) = receiving(key);
        let ring = &mut t.ring;
        ring.submit().unwrap();
        client.write_all(b"data").unwrap();
        // Never waiting: a busy shard only submits, and its receives must
        // still complete.
        let mut seen = Vec::new();
        let start = std::time::Instant::now();
        while seen.is_empty() && start.elapsed() < Duration::from_secs(5) {
            ring.submit().unwrap();
            ring.drain(&mut seen, usize::MAX);
        }
        assert_eq!(seen.len(), 1, "the receive completed without a wait");
        assert_eq!(
            (seen[0].token, seen[0].result),
            (Token::new(OpKind::Recv, key), 4)
        );
        ring.recycle(seen[0].buffer.expect("a provided buffer"));
    }

    #[test]
    fn the_completion_queue_is_sized_from_the_connection_limit() {
        assert_eq!(cq_entries(10), MIN_CQ_ENTRIES);
        assert_eq!(cq_entries(5_000), 32_768);
        assert_eq!(cq_entries(1_000_000), MAX_CQ_ENTRIES);
    }
}
