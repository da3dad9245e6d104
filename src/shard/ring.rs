//! The connection ring: a second io_uring per shard, built on the `io-uring`
//! crate, that carries every socket operation of the shard's connections.
//!
//! tokio-uring 0.5 (the latest release) has no provided-buffer rings and no
//! multishot operations. Without them every idle connection would park a read
//! buffer in the kernel. So the shard runs its tokio-uring loop as the host
//! (timers, the wake-up read) and drives this ring itself: a multishot accept,
//! a multishot receive per connection over one provided-buffer ring (the kernel
//! lends a buffer only when bytes arrive), and `send`/`sendmsg` with a
//! connection's queued frames. Connections are direct descriptors: accepted
//! straight into the ring's registered file table, so no operation pays for an
//! fd-table lookup and connections do not occupy the process's fd table. The
//! ring signals the shard's eventfd on every completion, which the tokio-uring
//! loop is reading.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Submission queue entries. Fan-out pushes one send per subscriber per loop
/// turn; when the queue fills it is submitted and reused, so this only sets how
/// many sends share one `io_uring_enter`.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: four times the submission queue, so a burst of
/// multishot receives and sends in one turn does not overflow into the kernel's
/// slower overflow list.
const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Provided receive buffers per shard. Buffers return to the ring as soon as
/// their completion is handled, so this bounds receives pending between two
/// loop turns, not connections.
pub(crate) const RECV_BUFFERS: u16 = 2048;
/// Size of one provided buffer: a full page, larger than any control message
/// and most publishes; longer messages span several receives.
pub(crate) const RECV_BUFFER_BYTES: usize = 4096;
/// Buffer group id of the receive buffers.
const RECV_GROUP: u16 = 0;

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
}

/// A connection slot and the generation that owned it when the op was made,
/// so a completion that outlives its connection is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) kind: OpKind,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl Token {
    fn encode(self) -> u64 {
        ((self.kind as u64) << 56)
            | (u64::from(self.generation & 0x00ff_ffff) << 32)
            | u64::from(self.slot)
    }

    fn decode(data: u64) -> Option<Token> {
        let kind = match data >> 56 {
            1 => OpKind::Accept,
            2 => OpKind::Recv,
            3 => OpKind::Send,
            4 => OpKind::Shutdown,
            5 => OpKind::Close,
            _ => return None,
        };
        Some(Token {
            kind,
            slot: data as u32,
            generation: ((data >> 32) & 0x00ff_ffff) as u32,
        })
    }

    /// Generations are compared modulo 2^24, the bits `user_data` has room for.
    pub(crate) fn same_generation(a: u32, b: u32) -> bool {
        (a ^ b) & 0x00ff_ffff == 0
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
/// descriptors and the buffers themselves, both alive as long as the ring.
struct BufRing {
    entries: NonNull<types::BufRingEntry>,
    entries_layout: std::alloc::Layout,
    data: Box<[u8]>,
    tail: u16,
}

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
        let ptr = unsafe { std::alloc::alloc_zeroed(entries_layout) };
        let entries = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("out of memory"))?;
        Ok(BufRing {
            entries,
            entries_layout,
            data: vec![0u8; count * RECV_BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
        })
    }

    /// Hands buffer `id` (back) to the kernel.
    fn provide(&mut self, id: u16) {
        let mask = RECV_BUFFERS - 1;
        let index = usize::from(self.tail & mask);
        // SAFETY: `index < RECV_BUFFERS`, the allocation holds that many entries,
        // and the kernel only reads entries between its head and our tail, which
        // this slot is not until the tail store below publishes it.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        let offset = usize::from(id) * RECV_BUFFER_BYTES;
        entry.set_addr(self.data[offset..].as_ptr() as u64);
        entry.set_len(RECV_BUFFER_BYTES as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved field, as the
        // kernel ABI defines; the release store publishes the entry written above.
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
        // SAFETY: allocated in `new` with this layout. The ring (and with it the
        // kernel's registration) is dropped before this field, see `ConnRing`.
        unsafe { std::alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout) };
    }
}

/// The shard's connection ring.
pub(crate) struct ConnRing {
    // Field order matters: the ring is dropped (and unregisters the buffers)
    // before the buffer memory is freed.
    ring: IoUring,
    bufs: BufRing,
    /// Submissions pushed since the last `submit`, for the syscall counter.
    queued: usize,
}

impl ConnRing {
    /// Creates the ring with a table of `files` direct descriptors, registers
    /// the receive buffers, and makes every completion signal `eventfd`.
    pub(crate) fn new(eventfd: RawFd, files: u32) -> io::Result<ConnRing> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_submit_all()
            .build(SQ_ENTRIES)?;
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
        ring.submitter().register_eventfd(eventfd)?;
        Ok(ConnRing {
            ring,
            bufs,
            queued: 0,
        })
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built here points only at memory that outlives
            // the operation: the listener/connection fd stays open until its ops
            // complete, and send buffers are owned by the connection's in-flight
            // write until its completion is handled.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Arms a multishot accept on `listener`; each completion carries the
    /// direct descriptor (file table index) of a new connection.
    pub(crate) fn accept(&mut self, listener: RawFd) -> io::Result<()> {
        let token = Token {
            kind: OpKind::Accept,
            slot: 0,
            generation: 0,
        };
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .allocate_file_index(true)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Shuts a connection down (both directions): its pending receive ends
    /// and its pending send fails.
    ///
    /// The kernel runs shutdown from a worker and looks the direct descriptor
    /// up only then, so the slot must not be closed (and reused by an accept)
    /// before this operation's completion has been seen.
    pub(crate) fn shutdown(&mut self, file: u32, slot: u32, generation: u32) -> io::Result<()> {
        let token = Token {
            kind: OpKind::Shutdown,
            slot,
            generation,
        };
        let entry = opcode::Shutdown::new(types::Fixed(file), libc::SHUT_RDWR)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Closes a connection's direct descriptor, freeing its table slot.
    pub(crate) fn close(&mut self, file: u32) -> io::Result<()> {
        let entry = opcode::Close::new(types::Fixed(file)).build().user_data(
            Token {
                kind: OpKind::Close,
                slot: 0,
                generation: 0,
            }
            .encode(),
        );
        self.push(entry)
    }

    /// Arms a multishot receive on a connection's direct descriptor.
    pub(crate) fn recv(&mut self, file: u32, slot: u32, generation: u32) -> io::Result<()> {
        let token = Token {
            kind: OpKind::Recv,
            slot,
            generation,
        };
        let entry = opcode::RecvMulti::new(types::Fixed(file), RECV_GROUP)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Sends the iovecs described by `msg` on a connection.
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it points at must stay valid and
    /// unmoved until the completion for this token has been returned by `drain`.
    pub(crate) unsafe fn send(
        &mut self,
        file: u32,
        msg: *const libc::msghdr,
        slot: u32,
        generation: u32,
    ) -> io::Result<()> {
        let token = Token {
            kind: OpKind::Send,
            slot,
            generation,
        };
        let entry = opcode::SendMsg::new(types::Fixed(file), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Sends `len` bytes at `ptr` on a connection.
    ///
    /// # Safety
    /// The bytes must stay valid and unmoved until the completion for this
    /// token has been returned by `drain`.
    pub(crate) unsafe fn send_one(
        &mut self,
        file: u32,
        ptr: *const u8,
        len: usize,
        slot: u32,
        generation: u32,
    ) -> io::Result<()> {
        let token = Token {
            kind: OpKind::Send,
            slot,
            generation,
        };
        let entry = opcode::Send::new(types::Fixed(file), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Submits everything pushed since the last call in one system call.
    /// Returns how many entries went.
    pub(crate) fn submit(&mut self) -> io::Result<usize> {
        if self.queued == 0 {
            return Ok(0);
        }
        let n = self.queued;
        self.ring.submit()?;
        self.queued = 0;
        Ok(n)
    }

    /// Moves up to `limit` completions into `out`.
    pub(crate) fn drain(&mut self, out: &mut Vec<Completion>, limit: usize) {
        let cq = self.ring.completion();
        for cqe in cq.take(limit) {
            let Some(token) = Token::decode(cqe.user_data()) else {
                continue;
            };
            out.push(Completion {
                token,
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
                buffer: cqueue::buffer_select(cqe.flags()),
            });
        }
    }

    /// The bytes of a filled receive buffer. Valid until `recycle(id)`.
    pub(crate) fn received(&self, id: u16, len: usize) -> &[u8] {
        self.bufs.filled(id, len)
    }

    /// Returns a receive buffer to the kernel.
    pub(crate) fn recycle(&mut self, id: u16) {
        self.bufs.provide(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_user_data() {
        let t = Token {
            kind: OpKind::Send,
            slot: 123_456,
            generation: 0x0123_4567,
        };
        let back = Token::decode(t.encode()).unwrap();
        assert_eq!((back.kind, back.slot), (OpKind::Send, 123_456));
        assert!(Token::same_generation(back.generation, t.generation));
        assert!(Token::decode(0).is_none());
    }
}
