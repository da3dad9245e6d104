//! ringcast-floor: how cheaply can a fan-out be done at all on this kernel?
//!
//! A server that does the least any WebSocket fan-out server must do, and
//! nothing else: one thread, one io_uring (single issuer, deferred task
//! work), a multishot accept into direct descriptors, and for each
//! `POST /publish` the push framed once and copied into each subscriber's
//! send buffer, then **one `send` per connection per turn** of the ring.
//! No rules, no limits, no metrics, no queues between threads. It speaks
//! the part of ringcast's relay protocol `ringcast-load` uses (`/ws` with
//! `subscribe`, `POST /publish` of `{"topic","message"}`), with ringcast's
//! bytes on the wire, so the load tool drives it with the same schedule as
//! ringcast and `loadtest/compare.sh` prints ringcast's cost as a ratio to
//! this floor (peer `floor`).
//!
//! usage: ringcast-floor [ADDR] [--taskrun defer|coop]
//!   ADDR defaults to 127.0.0.1:0; prints `listening on ADDR` once bound.
//!   --taskrun: how the kernel runs completion work: `defer` (the default,
//!   IORING_SETUP_DEFER_TASKRUN: in this thread's `io_uring_enter`, batched)
//!   as ringcast's shards do, or `coop` (IORING_SETUP_COOP_TASKRUN: at the
//!   thread's next system call), to measure what the setting is worth.
//!
//! An instrument, not a server: it trusts its one client (`wire.rs` reads
//! only what `ringcast-load` sends; anything else closes the connection).

#[allow(dead_code)]
#[path = "../procstat.rs"]
mod procstat;
mod state;
mod wire;
#[allow(dead_code)]
#[path = "../ws.rs"]
mod ws;

use anyhow::{bail, Context, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use state::{Floor, RECV_BYTES};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

/// Direct descriptors: at most this many connections (fewer when the
/// open-file limit is lower: the kernel bounds the table by it).
const MAX_FILES: u64 = 65_536;
/// Descriptors that stay plain: the listener, stdio, the ring itself.
const PLAIN_FILES: u64 = 16;
const SQ_ENTRIES: u32 = 4096;
const CQ_ENTRIES: u32 = 65_536;

/// What a completion is for: the top 32 bits of its user data.
const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;
const CLOSE: u64 = 3;

fn token(kind: u64, id: u32) -> u64 {
    kind << 32 | u64::from(id)
}

fn main() -> Result<()> {
    let mut addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut defer = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--taskrun" => match args.next().as_deref() {
                Some("defer") => defer = true,
                Some("coop") => defer = false,
                other => bail!("--taskrun defer|coop, not {other:?}"),
            },
            a => addr = a.parse().with_context(|| format!("not an address: {a}"))?,
        }
    }
    let files = procstat::raise_nofile(MAX_FILES + PLAIN_FILES)
        .saturating_sub(PLAIN_FILES)
        .min(MAX_FILES) as u32;
    let listener = listen(addr)?;
    let mut builder = IoUring::builder();
    builder
        .setup_cqsize(CQ_ENTRIES)
        .setup_submit_all()
        .setup_single_issuer();
    if defer {
        builder.setup_defer_taskrun();
    } else {
        builder.setup_coop_taskrun();
    }
    let ring = builder.build(SQ_ENTRIES).context("io_uring setup")?;
    ring.submitter()
        .register_files_sparse(files)
        .context("registering direct descriptors")?;
    println!("listening on {}", listener.local_addr()?);
    Driver {
        ring,
        listener,
        floor: Floor::default(),
        completions: Vec::new(),
    }
    .run()
}

fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a valid int option for its length.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("TCP_NODELAY: {}", std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// A send of `bytes` on connection `id`. The entry points into `bytes`: the
/// caller keeps them unmoved until the send completes.
fn send_entry(id: u32, bytes: &[u8]) -> squeue::Entry {
    opcode::Send::new(types::Fixed(id), bytes.as_ptr(), bytes.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(token(SEND, id))
}

struct Driver {
    ring: IoUring,
    listener: TcpListener,
    floor: Floor,
    completions: Vec<(u64, i32, u32)>,
}

impl Driver {
    fn run(mut self) -> Result<()> {
        self.arm_accept()?;
        loop {
            self.send_ready()?;
            self.ring.submit_and_wait(1)?;
            self.completions.clear();
            self.completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for i in 0..self.completions.len() {
                let (data, res, flags) = self.completions[i];
                self.complete(data, res, flags)?;
            }
        }
    }

    fn push(&mut self, entry: squeue::Entry) -> Result<()> {
        // SAFETY: every entry's buffers are owned by a `Conn` and stay
        // unmoved until its completion (see `arm_recv` and `send_ready`).
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn arm_accept(&mut self) -> Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(token(ACCEPT, 0));
        self.push(entry)
    }

    fn arm_recv(&mut self, id: u32) -> Result<()> {
        let Some(conn) = self.floor.conn(id) else {
            return Ok(());
        };
        debug_assert!(!conn.recv_in_flight);
        conn.input.reserve(RECV_BYTES);
        let spare = conn.input.spare_capacity_mut();
        let (ptr, len) = (spare.as_mut_ptr().cast::<u8>(), spare.len() as u32);
        conn.recv_in_flight = true;
        let entry = opcode::Recv::new(types::Fixed(id), ptr, len)
            .build()
            .user_data(token(RECV, id));
        self.push(entry)
    }

    /// Hands each connection's queued bytes to the kernel in one send.
    fn send_ready(&mut self) -> Result<()> {
        let ready = std::mem::take(&mut self.floor.ready);
        for &id in &ready {
            let Some(conn) = self.floor.conn(id) else {
                continue;
            };
            if conn.send_in_flight || conn.queued.is_empty() {
                continue;
            }
            std::mem::swap(&mut conn.queued, &mut conn.sending);
            conn.queued.clear();
            conn.sent = 0;
            conn.send_in_flight = true;
            let entry = send_entry(id, &conn.sending);
            self.push(entry)?;
        }
        let mut ready = ready;
        ready.clear();
        if self.floor.ready.is_empty() {
            self.floor.ready = ready;
        }
        Ok(())
    }

    fn complete(&mut self, data: u64, res: i32, flags: u32) -> Result<()> {
        let id = data as u32;
        match data >> 32 {
            ACCEPT => {
                if res >= 0 {
                    self.floor.accepted(res as u32);
                    self.arm_recv(res as u32)?;
                }
                if !cqueue::more(flags) {
                    self.arm_accept()?;
                }
            }
            RECV => {
                let Some(conn) = self.floor.conn(id) else {
                    return Ok(());
                };
                conn.recv_in_flight = false;
                if res <= 0 || conn.closing {
                    self.floor.close(id);
                } else {
                    // SAFETY: the kernel wrote `res` bytes into the spare
                    // capacity lent by `arm_recv`.
                    unsafe { conn.input.set_len(conn.input.len() + res as usize) };
                    self.floor.received(id);
                    if self.floor.conn(id).is_some_and(|c| !c.closing) {
                        self.arm_recv(id)?;
                    }
                }
                self.close_if_done(id)?;
            }
            SEND => {
                let Some(conn) = self.floor.conn(id) else {
                    return Ok(());
                };
                if res < 0 {
                    conn.send_in_flight = false;
                    self.floor.close(id);
                } else {
                    conn.sent += res as usize;
                    if conn.sent < conn.sending.len() {
                        // The rest of the same bytes, still unmoved.
                        let entry = send_entry(id, &conn.sending[conn.sent..]);
                        return self.push(entry);
                    }
                    conn.send_in_flight = false;
                    conn.sending.clear();
                    if !conn.queued.is_empty() {
                        self.floor.ready.push(id);
                    }
                }
                self.close_if_done(id)?;
            }
            CLOSE => {}
            _ => unreachable!("unknown completion {data:#x}"),
        }
        Ok(())
    }

    /// Closes a closing connection's descriptor once the kernel holds none of its buffers.
    fn close_if_done(&mut self, id: u32) -> Result<()> {
        let Some(conn) = self.floor.conn(id) else {
            return Ok(());
        };
        if !conn.closing || conn.recv_in_flight || conn.send_in_flight {
            return Ok(());
        }
        self.floor.remove(id);
        let entry = opcode::Close::new(types::Fixed(id))
            .build()
            .user_data(token(CLOSE, id));
        self.push(entry)
    }
}
