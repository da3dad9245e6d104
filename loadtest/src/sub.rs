//! Subscriber connections: the handshake (connect, upgrade, subscribe) on a
//! tokio task, the per-connection frame state (`Conn`) and, for
//! `--recv-path tokio`, the read loop. With `--recv-path uring` the task hands
//! the socket and its `Conn` to a receive ring (`uring.rs`) after the
//! subscribe frame is written. Either way, deliveries are classified with
//! `account` and recorded into per-thread statistics that the main thread sums
//! when it reads them; only a partial frame tail is ever copied into the
//! connection, and nothing on the delivery path allocates.
//!
//! A subscriber outlives its sockets: with `--reconnect-every`/`--storm-at`
//! its `Conn` (sequence windows, stream ledger, drop schedule) is kept when
//! the socket is dropped, and `redial` connects it again, re-subscribing from
//! its position with `--recover`.

use crate::account::{DeliveryCounts, Marker, SeqWindow};
use crate::churn::{self, Reconnects};
use crate::cli::Transport;
use crate::clock::now_ns;
use crate::offsets::{self, Ledger, Opened, PushAt, Recovery, StreamCounts, TopicTails};
use crate::uring;
use crate::ws::{self, Decoded, Upgrade};
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// Bytes read per `read` call on a worker thread. Large enough that a burst of
/// fan-out frames is drained in one syscall (the "batched reads"), small enough
/// to stay in L2 cache.
const READ_BUF_BYTES: usize = 64 * 1024;

/// Name prefix of every subscriber-side thread (handshake and receive), so
/// the client's receive CPU can be told from its publishers' by thread.
pub(crate) const THREAD_PREFIX: &str = "sub-";

/// Latency histogram bounds: 1 us to 10 min, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low).
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Attempts to reconnect a dropped subscriber before giving it up.
const RECONNECT_ATTEMPTS: u32 = 20;
/// Longest a reconnect's connect, upgrade and subscribe may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed reconnect attempt, times the attempt number: 20
/// attempts span about 10 s, longer than a relay restart takes.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// Longest a tokio-path reader waits before looking at its drop schedule
/// again: the schedule appears when the measured window is fixed, after the
/// reader started waiting. Matches the receive rings' inbox poll.
const CHURN_POLL: Duration = Duration::from_millis(10);

/// Per worker thread statistics: the current epoch's delivery counts and
/// latency, and the run's stream accounting (not reset between epochs).
pub(crate) struct ThreadStats {
    /// Delivery classification counts.
    pub(crate) counts: DeliveryCounts,
    /// Latency (schedule to receipt, ns) of unique measured deliveries.
    pub(crate) hist: Histogram<u64>,
    /// Stream offset accounting.
    pub(crate) streams: StreamCounts,
    /// Where this thread's ledgers stand per topic.
    pub(crate) tails: TopicTails,
    /// Reconnect timing.
    pub(crate) recovery: Recovery,
}

/// The stream figures of the whole run, summed over threads and processes.
#[derive(Clone, Debug)]
pub(crate) struct StreamStats {
    /// Offset accounting.
    pub(crate) counts: StreamCounts,
    /// Ledger positions per topic.
    pub(crate) tails: TopicTails,
    /// Reconnect timing.
    pub(crate) recovery: Recovery,
    /// Drops and reconnects.
    pub(crate) reconnects: Reconnects,
}

impl StreamStats {
    /// Empty figures for `topics` topics.
    pub(crate) fn new(topics: usize) -> StreamStats {
        StreamStats {
            counts: StreamCounts::default(),
            tails: TopicTails::new(topics),
            recovery: Recovery::new(new_histogram),
            reconnects: Reconnects::default(),
        }
    }

    /// Adds `o` into `self`.
    pub(crate) fn add(&mut self, o: &StreamStats) {
        self.counts.add(&o.counts);
        self.tails.add(&o.tails);
        self.recovery.add(&o.recovery);
        self.reconnects.add(&o.reconnects);
    }
}

/// Connection failure and lifecycle counters, shared by all subscriber tasks.
#[derive(Default)]
pub(crate) struct ConnCounters {
    /// TCP connect failed or timed out.
    pub(crate) connect_failed: AtomicU64,
    /// The server answered the upgrade with something other than 101.
    pub(crate) upgrade_refused: AtomicU64,
    /// Connected but not acknowledged when the run started; excluded.
    pub(crate) not_ready: AtomicU64,
    /// Ready connections the server closed with a close frame.
    pub(crate) closed_by_server: AtomicU64,
    /// Ready connections that hit EOF or a socket error without a close frame.
    pub(crate) dropped: AtomicU64,
    /// Frames that broke RFC 6455.
    pub(crate) protocol_errors: AtomicU64,
    /// Last close code received (0 if none).
    pub(crate) last_close_code: AtomicU32,
}

/// Drop and reconnect counters, shared by the receive paths and the
/// reconnect tasks.
#[derive(Default)]
pub(crate) struct ReconnectCounters {
    drops: AtomicU64,
    storm_drops: AtomicU64,
    reconnects: AtomicU64,
    failed_attempts: AtomicU64,
    abandoned: AtomicU64,
    interrupted: AtomicU64,
}

impl ReconnectCounters {
    fn snapshot(&self) -> Reconnects {
        Reconnects {
            drops: self.drops.load(Relaxed),
            storm_drops: self.storm_drops.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            failed_attempts: self.failed_attempts.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            interrupted: self.interrupted.load(Relaxed),
            unanswered: 0,
        }
    }
}

/// A plain copy of the connection counters (and the first error), summed over
/// subscriber processes with `add`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnStats {
    pub(crate) connect_failed: u64,
    pub(crate) upgrade_refused: u64,
    pub(crate) not_ready: u64,
    pub(crate) closed_by_server: u64,
    pub(crate) dropped: u64,
    pub(crate) protocol_errors: u64,
    pub(crate) last_close_code: u32,
    pub(crate) first_error: Option<String>,
}

impl ConnStats {
    /// Adds `o` into `self`; the first error and a close code are kept from
    /// whichever side has one.
    pub(crate) fn add(&mut self, o: &ConnStats) {
        self.connect_failed += o.connect_failed;
        self.upgrade_refused += o.upgrade_refused;
        self.not_ready += o.not_ready;
        self.closed_by_server += o.closed_by_server;
        self.dropped += o.dropped;
        self.protocol_errors += o.protocol_errors;
        if self.last_close_code == 0 {
            self.last_close_code = o.last_close_code;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }

    /// Subscribers that failed or were lost, for any reason.
    pub(crate) fn errors(&self) -> u64 {
        self.connect_failed
            + self.upgrade_refused
            + self.not_ready
            + self.closed_by_server
            + self.dropped
            + self.protocol_errors
    }
}

/// State shared by every subscriber task and the main thread.
pub(crate) struct Shared {
    /// Publisher count: sizes each subscriber's per-publisher window array.
    pub(crate) publishers: usize,
    /// When subscribers drop and whether they recover.
    pub(crate) churn: churn::Plan,
    /// The drop window once the measured window is fixed.
    churn_window: Mutex<Option<churn::Window>>,
    /// Changes whenever `churn_window` is set (0: never set), so a
    /// subscriber recomputes its next drop without taking the lock.
    pub(crate) churn_gen: AtomicU32,
    /// Drop and reconnect counters.
    pub(crate) reconnects: ReconnectCounters,
    /// Set when the run ends: reconnects stop trying.
    pub(crate) stopping: AtomicBool,
    /// Drops whose reconnect has not had its `subscribed` yet (nor given
    /// up): the drain waits for them, so the report does not catch a
    /// reconnect halfway.
    pub(crate) resuming: AtomicU64,
    /// Epoch whose deliveries are being counted.
    pub(crate) epoch: AtomicU32,
    /// Deliveries of messages scheduled at or after this instant are measured.
    pub(crate) measure_start_ns: AtomicU64,
    /// Set once publishing may start: later acks are excluded from the run.
    pub(crate) frozen: AtomicBool,
    /// Ready subscribers per topic.
    pub(crate) topic_ready: Vec<AtomicU32>,
    /// Ready subscriber total.
    pub(crate) ready: AtomicU64,
    /// Subscribers that finished trying (ready or failed).
    pub(crate) settled: AtomicU64,
    /// Failure counters.
    pub(crate) conn: ConnCounters,
    /// First error seen, for the report.
    pub(crate) first_error: Mutex<Option<String>>,
    /// Each worker thread's statistics, registered on first use.
    pub(crate) threads: Mutex<Vec<Arc<Mutex<ThreadStats>>>>,
}

impl Shared {
    /// New shared state for `topics` topics and `publishers` publishers.
    pub(crate) fn new(topics: usize, publishers: usize, churn: churn::Plan) -> Shared {
        Shared {
            publishers,
            churn,
            churn_window: Mutex::new(None),
            churn_gen: AtomicU32::new(0),
            reconnects: ReconnectCounters::default(),
            stopping: AtomicBool::new(false),
            resuming: AtomicU64::new(0),
            epoch: AtomicU32::new(0),
            measure_start_ns: AtomicU64::new(u64::MAX),
            frozen: AtomicBool::new(false),
            topic_ready: (0..topics).map(|_| AtomicU32::new(0)).collect(),
            ready: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            conn: ConnCounters::default(),
            first_error: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Registers one receiving thread's statistics, summed by `take_stats`.
    pub(crate) fn register_thread(&self) -> Arc<Mutex<ThreadStats>> {
        let stats = Arc::new(Mutex::new(ThreadStats {
            counts: DeliveryCounts::default(),
            hist: new_histogram(),
            streams: StreamCounts::default(),
            tails: TopicTails::new(self.topic_ready.len()),
            recovery: Recovery::new(new_histogram),
        }));
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats.clone());
        stats
    }

    /// A copy of the connection counters.
    pub(crate) fn conn_stats(&self) -> ConnStats {
        let c = &self.conn;
        ConnStats {
            connect_failed: c.connect_failed.load(Relaxed),
            upgrade_refused: c.upgrade_refused.load(Relaxed),
            not_ready: c.not_ready.load(Relaxed),
            closed_by_server: c.closed_by_server.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            protocol_errors: c.protocol_errors.load(Relaxed),
            last_close_code: c.last_close_code.load(Relaxed),
            first_error: self.first_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn note_error(&self, msg: String) {
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(msg);
        }
    }

    /// Sums and resets every thread's statistics (called between epochs).
    pub(crate) fn take_stats(&self) -> (DeliveryCounts, Histogram<u64>) {
        let mut counts = DeliveryCounts::default();
        let mut hist = new_histogram();
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter() {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            counts.add(&t.counts);
            // Same bounds on both sides, so `add` cannot fail.
            let _ = hist.add(&t.hist);
            t.counts = DeliveryCounts::default();
            t.hist.reset();
        }
        (counts, hist)
    }

    /// Sums the stream figures of every thread (they are never reset).
    pub(crate) fn stream_stats(&self) -> StreamStats {
        let mut sum = StreamStats::new(self.topic_ready.len());
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter() {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            sum.counts.add(&t.streams);
            sum.tails.add(&t.tails);
            sum.recovery.add(&t.recovery);
        }
        sum.reconnects = self.reconnects.snapshot();
        sum.reconnects.unanswered = self.resuming.load(SeqCst);
        sum
    }

    /// Fixes the window subscribers drop in.
    pub(crate) fn set_churn_window(&self, w: churn::Window) {
        *self.churn_window.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        self.churn_gen.fetch_add(1, SeqCst);
    }

    fn churn_window(&self) -> Option<churn::Window> {
        *self.churn_window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sums the unique delivery count without resetting (for early drain exit).
    pub(crate) fn unique_so_far(&self) -> u64 {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).counts.unique)
            .sum()
    }
}

struct Local {
    buf: Box<[u8]>,
    stats: Arc<Mutex<ThreadStats>>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// What one subscriber connects to and sends.
pub(crate) struct SubSpec {
    /// Server address.
    pub(crate) addr: SocketAddr,
    /// Upgrade request bytes (URL already filled in with the topic).
    pub(crate) request: Vec<u8>,
    /// WebSocket frames, or SSE events.
    pub(crate) transport: Transport,
    /// The subscribe URL, topic filled in (an SSE reconnect's request).
    pub(crate) url: ws::Url,
    /// Subscribe frame payload to send after the upgrade, if any.
    pub(crate) subscribe: Option<Vec<u8>>,
    /// Text that marks the subscription acknowledged; `None`: ready after upgrade.
    pub(crate) ack: Option<Arc<[u8]>>,
    /// Text of a server message to wait for after the upgrade before the
    /// subscribe frame is sent (Pusher's `pusher:connection_established`).
    pub(crate) greeting: Option<Arc<[u8]>>,
    /// Topic index.
    pub(crate) topic: u32,
    /// Topic name, for a subscribe from a position.
    pub(crate) topic_name: String,
    /// Subscriber index in the run: seeds its drop schedule.
    pub(crate) index: u64,
    /// Local address to bind before connecting.
    pub(crate) source: Option<Ipv4Addr>,
}

/// A reconnect in progress, from its TCP connect until it has what it is owed.
#[derive(Clone, Copy, Debug)]
struct Resume {
    /// When the reconnect's TCP connect began, ns.
    connect_ns: u64,
    /// The storm's reconnect.
    storm: bool,
    /// Waiting for `subscribed`.
    awaiting_ack: bool,
    /// Answered `recovered:true`.
    recovered: bool,
}

/// One subscriber's state across its sockets: what is needed to classify its
/// deliveries, to carry a partial frame from one read to the next, and to
/// drop and come back on schedule.
pub(crate) struct Conn {
    spec: Arc<SubSpec>,
    ready: bool,
    excluded: bool,
    windows: Box<[SeqWindow]>,
    ledger: Ledger,
    resume: Option<Resume>,
    schedule: churn::Schedule,
    /// The `churn_gen` that `next_drop` was computed for (0: compute again).
    drop_gen: u32,
    next_drop: Option<churn::Drop>,
    /// The drop that ended the last socket, until the reconnect.
    last_drop: Option<churn::Drop>,
    carry: Vec<u8>,
    frag: Vec<u8>,
    in_frag: bool,
    pong: Option<Vec<u8>>,
    close_code: Option<u16>,
}

thread_local! {
    /// One decompressor per receive thread: the server compresses each
    /// message on its own (server_no_context_takeover).
    static INFLATE: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
}

/// A permessage-deflate message inflated; `None` if it is not deflate data.
fn inflate(payload: &[u8]) -> Option<Vec<u8>> {
    INFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut input = Vec::with_capacity(payload.len() + 4);
        input.extend_from_slice(payload);
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(payload.len() * 4 + 64);
        loop {
            let before = d.total_in();
            d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                .ok()?;
            input.drain(..(d.total_in() - before) as usize);
            if input.is_empty() && out.len() < out.capacity() {
                return Some(out);
            }
            if out.len() >= ws::MAX_FRAME_BYTES {
                return None;
            }
            out.reserve(out.capacity());
        }
    })
}

/// What reading a connection came to.
pub(crate) enum Step {
    /// Still open: read more (or, as a final outcome, the socket ended
    /// without a close frame).
    More,
    /// The server sent a close frame.
    Closed,
    /// The server broke RFC 6455.
    Invalid(&'static str),
    /// Its drop is due (`--reconnect-every`, `--storm-at`): drop and reconnect.
    Dropped(churn::Drop),
}

impl Conn {
    /// Handles one complete message (text or binary).
    fn message(
        &mut self,
        sh: &Shared,
        payload: &[u8],
        st: &mut ThreadStats,
        now: u64,
        epoch: u32,
        m0: u64,
    ) {
        if !self.ready {
            if self.acks(payload) {
                self.mark_ready(sh);
                if !self.excluded {
                    self.opened(sh, Some(payload), st, now);
                }
            }
        } else if self.resume.is_some_and(|r| r.awaiting_ack) && self.acks(payload) {
            self.opened(sh, Some(payload), st, now);
        }
        if self.excluded || !self.ready {
            return;
        }
        if self.ledger.tracking() {
            if let Some(p) = offsets::push_at(payload) {
                if !self.pushed(p, st, now) {
                    return;
                }
            }
        }
        let Some(m) = Marker::find(payload) else {
            return;
        };
        if m.epoch != epoch {
            st.counts.stale += 1;
            return;
        }
        if m.topic != self.spec.topic {
            st.counts.misrouted += 1;
            return;
        }
        let Some(w) = self.windows.get_mut(m.publisher as usize) else {
            st.counts.malformed += 1;
            return;
        };
        if now >= m0 {
            st.counts.in_window += 1;
        }
        let measured = m.sched_ns >= m0;
        if st.counts.record(w.observe(m.seq), measured) && measured {
            st.hist
                .saturating_record(now.saturating_sub(m.sched_ns).max(1_000));
        }
    }

    fn acks(&self, payload: &[u8]) -> bool {
        match &self.spec.ack {
            Some(tok) => memchr::memmem::find(payload, tok).is_some(),
            None => true,
        }
    }

    /// Takes the subscription's acknowledgement in (`None`: there is none to
    /// read, ready after the upgrade): the stream position it reports, and a
    /// reconnect's timing.
    fn opened(&mut self, sh: &Shared, reply: Option<&[u8]>, st: &mut ThreadStats, now: u64) {
        let topic = self.spec.topic as usize;
        let c = &mut st.streams;
        let mut recovered = false;
        match reply.and_then(offsets::parse_subscribed) {
            Some(s) => {
                let before = self.ledger.high();
                match self.ledger.subscribed(&s) {
                    Opened::First => {
                        c.tracked += 1;
                        if let Some(n) = st.tails.ledgers.get_mut(topic) {
                            *n += 1;
                        }
                    }
                    Opened::Recovered { .. } => {
                        c.recoveries_ok += 1;
                        recovered = true;
                    }
                    Opened::Fresh { lost, asked } => {
                        c.gap_offsets += lost;
                        if asked {
                            c.recoveries_failed += 1;
                        } else {
                            c.resubscribed_fresh += 1;
                        }
                    }
                    Opened::EpochChanged { asked } => {
                        c.epoch_changes += 1;
                        if asked {
                            c.recoveries_failed += 1;
                        } else {
                            c.resubscribed_fresh += 1;
                        }
                    }
                }
                st.tails.moved(topic, before, self.ledger.high());
            }
            None if self.resume.is_none() => c.untracked += 1,
            None => c.resubscribed_fresh += 1,
        }
        if let Some(r) = self.resume.as_mut() {
            r.awaiting_ack = false;
            sh.resuming.fetch_sub(1, Relaxed);
            r.recovered = recovered;
            let rec = &mut st.recovery;
            rec.subscribed
                .saturating_record(now.saturating_sub(r.connect_ns).max(1_000));
            if r.storm {
                rec.storm_subscribed += 1;
                rec.storm_subscribed_last_ns = rec.storm_subscribed_last_ns.max(now);
            }
            self.caught_up_if_done(st, now);
        }
    }

    /// Accounts a stream push by its offset; false if it is not owed (a last
    /// value, or published before the first `subscribed`), so the payload
    /// accounting must not count it either.
    fn pushed(&mut self, p: PushAt, st: &mut ThreadStats, now: u64) -> bool {
        if p.replay {
            st.streams.last_values += 1;
            return false;
        }
        let before = self.ledger.high();
        let arrival = self.ledger.push(p.offset);
        st.streams.record(arrival);
        st.tails
            .moved(self.spec.topic as usize, before, self.ledger.high());
        if self.resume.is_some() {
            self.caught_up_if_done(st, now);
        }
        arrival != offsets::Arrival::NotOwed
    }

    /// Ends a reconnect once `subscribed` came and its replay is complete.
    fn caught_up_if_done(&mut self, st: &mut ThreadStats, now: u64) {
        let Some(r) = self.resume else {
            return;
        };
        if r.awaiting_ack || self.ledger.replaying() {
            return;
        }
        let rec = &mut st.recovery;
        if r.recovered {
            rec.caught_up
                .saturating_record(now.saturating_sub(r.connect_ns).max(1_000));
        }
        if r.storm {
            rec.storm_caught_up += 1;
            rec.storm_caught_up_last_ns = rec.storm_caught_up_last_ns.max(now);
        }
        self.resume = None;
    }

    fn mark_ready(&mut self, sh: &Shared) {
        self.ready = true;
        if sh.frozen.load(Relaxed) {
            // Acknowledged after publishing began: its expected deliveries are not defined.
            self.excluded = true;
            return;
        }
        sh.topic_ready[self.spec.topic as usize].fetch_add(1, Relaxed);
        sh.ready.fetch_add(1, Relaxed);
        sh.settled.fetch_add(1, Relaxed);
    }

    /// Consumes whole SSE events from `buf` (each one's `data:` is a
    /// message's JSON; comments and `retry:` carry none); returns bytes
    /// used and what to do next.
    fn events(&mut self, sh: &Shared, buf: &[u8], st: &mut ThreadStats, now: u64) -> (usize, Step) {
        let epoch = sh.epoch.load(Relaxed);
        let m0 = sh.measure_start_ns.load(Relaxed);
        let mut at = 0;
        while let Some(len) = memchr::memmem::find(&buf[at..], b"\n\n") {
            let event = &buf[at..at + len + 1];
            at += len + 2;
            if event.starts_with(b"event: ringcast.close\n") {
                let code = memchr::memmem::find(event, b"\"code\":")
                    .and_then(|i| std::str::from_utf8(event.get(i + 7..i + 11)?).ok())
                    .and_then(|c| c.parse().ok());
                self.close_code = Some(code.unwrap_or(1005));
                return (at, Step::Closed);
            }
            let Some(start) = memchr::memmem::find(event, b"data: ") else {
                continue;
            };
            let data = &event[start + 6..];
            let end = memchr::memchr(b'\n', data).unwrap_or(data.len());
            self.message(sh, &data[..end], st, now, epoch, m0);
        }
        (at, Step::More)
    }

    /// Consumes whole frames from `buf`; returns bytes used and what to do next.
    fn frames(&mut self, sh: &Shared, buf: &[u8], st: &mut ThreadStats, now: u64) -> (usize, Step) {
        if self.spec.transport == Transport::Sse {
            return self.events(sh, buf, st, now);
        }
        let epoch = sh.epoch.load(Relaxed);
        let m0 = sh.measure_start_ns.load(Relaxed);
        let mut at = 0;
        loop {
            let f = match ws::decode(&buf[at..]) {
                Decoded::Complete(f) => f,
                Decoded::Partial => return (at, Step::More),
                Decoded::Invalid(why) => return (at, Step::Invalid(why)),
            };
            let payload = &buf[at + f.payload_at..at + f.end()];
            if f.compressed && f.fin && !self.in_frag {
                match inflate(payload) {
                    Some(message) => self.message(sh, &message, st, now, epoch, m0),
                    None => return (at, Step::Invalid("bad compressed message")),
                }
                at += f.end();
                continue;
            }
            match f.opcode {
                ws::OP_TEXT | ws::OP_BINARY if f.fin && !self.in_frag => {
                    self.message(sh, payload, st, now, epoch, m0)
                }
                ws::OP_TEXT | ws::OP_BINARY if !self.in_frag => {
                    self.in_frag = true;
                    self.frag.clear();
                    self.frag.extend_from_slice(payload);
                }
                ws::OP_CONT if self.in_frag => {
                    self.frag.extend_from_slice(payload);
                    if f.fin {
                        self.in_frag = false;
                        let frag = std::mem::take(&mut self.frag);
                        self.message(sh, &frag, st, now, epoch, m0);
                        self.frag = frag;
                    }
                }
                ws::OP_PING => self.pong = Some(payload.to_vec()),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.close_code = Some(code);
                    return (at + f.end(), Step::Closed);
                }
                _ => return (at, Step::Invalid("unexpected opcode")),
            }
            at += f.end();
        }
    }

    fn new(sh: &Shared, spec: Arc<SubSpec>, carry: Vec<u8>) -> Conn {
        let mut conn = Conn {
            ready: false,
            excluded: false,
            windows: vec![SeqWindow::default(); sh.publishers].into_boxed_slice(),
            ledger: Ledger::default(),
            resume: None,
            schedule: churn::Schedule::new(&sh.churn, spec.index),
            drop_gen: 0,
            next_drop: None,
            last_drop: None,
            spec,
            carry,
            frag: Vec::new(),
            in_frag: false,
            pong: None,
            close_code: None,
        };
        if conn.spec.ack.is_none() {
            conn.mark_ready(sh);
        }
        conn
    }

    /// Handles bytes just read: whole frames are consumed where they lie, a
    /// partial tail is kept in the connection for the next read.
    pub(crate) fn feed(
        &mut self,
        sh: &Shared,
        data: &[u8],
        st: &mut ThreadStats,
        now: u64,
    ) -> Step {
        if self.carry.is_empty() {
            let (used, step) = self.frames(sh, data, st, now);
            self.carry.extend_from_slice(&data[used..]);
            step
        } else {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(data);
            let (used, step) = self.frames(sh, &carry, st, now);
            carry.drain(..used);
            self.carry = carry;
            step
        }
    }

    /// The masked pong owed for the last ping, if any.
    pub(crate) fn take_pong(&mut self) -> Option<Vec<u8>> {
        let p = self.pong.take()?;
        let mut out = Vec::with_capacity(p.len() + 8);
        ws::encode_masked(&mut out, ws::OP_PONG, &p, [1, 2, 3, 4]);
        Some(out)
    }

    /// The next scheduled drop (computed again once the drop window is set,
    /// and after each reconnect); `None` while the window is unknown, and
    /// for subscribers that are not part of the run.
    pub(crate) fn next_drop(&mut self, sh: &Shared, now: u64) -> Option<churn::Drop> {
        if !sh.churn.drops() || !self.ready || self.excluded {
            return None;
        }
        let gen = sh.churn_gen.load(Relaxed);
        if gen == 0 {
            return None;
        }
        if self.drop_gen != gen {
            self.drop_gen = gen;
            self.next_drop = sh
                .churn_window()
                .and_then(|w| self.schedule.next(&sh.churn, &w, now));
        }
        self.next_drop
    }

    /// The socket was dropped on schedule: forgets that socket's frame state.
    pub(crate) fn dropped(&mut self, sh: &Shared, d: churn::Drop) {
        self.schedule.dropped(d);
        self.last_drop = Some(d);
        self.drop_gen = 0;
        self.next_drop = None;
        self.carry.clear();
        self.frag.clear();
        self.in_frag = false;
        self.pong = None;
        // A reconnect still catching up is abandoned: its timing is not a recovery's.
        if self.resume.take().is_some_and(|r| r.awaiting_ack) {
            // Still counted in `resuming`: the new reconnect takes its place.
            sh.reconnects.interrupted.fetch_add(1, Relaxed);
        } else {
            sh.resuming.fetch_add(1, Relaxed);
        }
        sh.reconnects.drops.fetch_add(1, Relaxed);
        if d.storm {
            sh.reconnects.storm_drops.fetch_add(1, Relaxed);
        }
    }

    /// The request of a reconnect: an SSE one resumes from the ledger's
    /// position (its `Last-Event-ID`, `offset.epoch`) with `--recover`.
    fn rerequest(&self, recover: bool) -> Vec<u8> {
        match self.ledger.position() {
            Some((offset, epoch)) if recover && self.spec.transport == Transport::Sse => {
                ws::stream_request(&self.spec.url, Some(&format!("{offset}.{epoch}")))
            }
            _ => self.spec.request.clone(),
        }
    }

    /// The subscribe frame of a reconnect: from the ledger's position with
    /// `--recover` (when the server gave one), else the first subscribe's.
    fn resubscribe(&self, recover: bool) -> Option<Vec<u8>> {
        match self.ledger.position() {
            Some((offset, epoch)) if recover && self.spec.subscribe.is_some() => Some(
                offsets::subscribe_since(&self.spec.topic_name, offset, epoch),
            ),
            _ => self.spec.subscribe.clone(),
        }
    }

    /// A reconnect has its socket (`rest` arrived with the upgrade response).
    fn resumed(&mut self, rest: Vec<u8>, connect_ns: u64) {
        self.carry = rest;
        self.resume = Some(Resume {
            connect_ns,
            storm: self.last_drop.take().is_some_and(|d| d.storm),
            awaiting_ack: true,
            recovered: false,
        });
    }

    /// Counts how a ready connection ended.
    pub(crate) fn finish(&self, sh: &Shared, outcome: Step) {
        if !self.ready || self.excluded {
            // Not ready: settled as "not ready" by the main thread's deadline
            // accounting. Excluded: not part of the run.
            return;
        }
        match outcome {
            Step::Closed => {
                sh.conn.closed_by_server.fetch_add(1, Relaxed);
                sh.conn
                    .last_close_code
                    .store(self.close_code.unwrap_or(0) as u32, Relaxed);
                sh.note_error(format!(
                    "server closed a subscriber with code {}",
                    self.close_code.unwrap_or(0)
                ));
            }
            Step::Invalid(why) => {
                sh.conn.protocol_errors.fetch_add(1, Relaxed);
                sh.note_error(format!("protocol error: {why}"));
            }
            Step::More => {
                sh.conn.dropped.fetch_add(1, Relaxed);
                sh.note_error("subscriber connection dropped".into());
            }
            // Dropped on purpose; the reconnect counts its own outcome.
            Step::Dropped(_) => {}
        }
    }
}

/// Makes the next close of `fd` abortive (SO_LINGER with a zero timeout):
/// the kernel sends RST and discards whatever is queued either way, which is
/// how a crashed client or a lost path looks to the server. No close frame.
pub(crate) fn set_abortive(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller for this call; the
    // option value points to a live `linger` of the length passed. A failure
    // only makes the close graceful, which the server survives as well.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Where a connected subscriber is read.
#[derive(Clone)]
pub(crate) enum Reader {
    /// On its own tokio task (`--recv-path tokio`).
    Tokio,
    /// Handed to one of the receive rings (`--recv-path uring`).
    Uring(uring::Pool),
}

/// Runs one subscriber: the handshake, then reading on the chosen path until
/// the server closes it or the run ends (on the tokio path, dropping and
/// reconnecting on schedule in between).
pub(crate) async fn run(
    sh: Arc<Shared>,
    spec: SubSpec,
    gate: Arc<Semaphore>,
    timeout: Duration,
    reader: Reader,
) {
    let permit = gate.acquire().await;
    let dialed = dial(&spec, &spec.request, spec.subscribe.as_deref());
    let connected = tokio::time::timeout(timeout, dialed).await;
    drop(permit);
    if !matches!(connected, Ok(Ok(_))) && sh.frozen.load(Relaxed) {
        // Already counted as not ready when the run froze its subscriber set.
        return;
    }
    let (mut stream, rest) = match connected {
        Ok(Ok(v)) => v,
        Ok(Err(ConnectError::Refused(status))) => {
            sh.conn.upgrade_refused.fetch_add(1, Relaxed);
            sh.settled.fetch_add(1, Relaxed);
            sh.note_error(format!("upgrade refused: {status}"));
            return;
        }
        Ok(Err(ConnectError::Io(e))) => {
            sh.conn.connect_failed.fetch_add(1, Relaxed);
            sh.settled.fetch_add(1, Relaxed);
            sh.note_error(format!("connect: {e}"));
            return;
        }
        Err(_) => {
            sh.conn.connect_failed.fetch_add(1, Relaxed);
            sh.settled.fetch_add(1, Relaxed);
            sh.note_error("connect: timed out".into());
            return;
        }
    };
    let mut conn = Conn::new(&sh, Arc::new(spec), rest);
    match reader {
        Reader::Tokio => loop {
            let outcome = read_loop(&sh, &mut stream, &mut conn).await;
            let Step::Dropped(d) = outcome else {
                conn.finish(&sh, outcome);
                return;
            };
            set_abortive(stream.as_raw_fd());
            drop(stream);
            conn.dropped(&sh, d);
            match redial(&sh, &mut conn).await {
                Some(s) => stream = s,
                None => return,
            }
        },
        Reader::Uring(pool) => match stream.into_std() {
            Ok(stream) => pool.adopt(stream, conn),
            Err(_) => conn.finish(&sh, Step::More),
        },
    }
}

/// Reconnects a subscriber a receive ring dropped and hands it back to the
/// rings (`--recv-path uring`).
pub(crate) async fn rejoin_ring(sh: Arc<Shared>, mut conn: Conn, pool: uring::Pool) {
    let Some(stream) = redial(&sh, &mut conn).await else {
        return;
    };
    match stream.into_std() {
        Ok(stream) => pool.adopt(stream, conn),
        Err(_) => conn.finish(&sh, Step::More),
    }
}

/// Connects a dropped subscriber again and subscribes it (from its position
/// with `--recover`), retrying after a pause; `None` once it is given up or
/// the run is over.
async fn redial(sh: &Shared, conn: &mut Conn) -> Option<TcpStream> {
    let frame = conn.resubscribe(sh.churn.recover);
    let request = conn.rerequest(sh.churn.recover);
    for attempt in 1..=RECONNECT_ATTEMPTS {
        if sh.stopping.load(Relaxed) {
            return None;
        }
        let start = now_ns();
        let dialed = dial(&conn.spec, &request, frame.as_deref());
        match tokio::time::timeout(RECONNECT_TIMEOUT, dialed).await {
            Ok(Ok((stream, rest))) => {
                sh.reconnects.reconnects.fetch_add(1, Relaxed);
                conn.resumed(rest, start);
                if conn.spec.ack.is_none() {
                    with_local(sh, |_, st| conn.opened(sh, None, st, now_ns()));
                }
                return Some(stream);
            }
            Ok(Err(ConnectError::Refused(status))) => {
                sh.note_error(format!("reconnect: upgrade refused: {status}"))
            }
            Ok(Err(ConnectError::Io(e))) => sh.note_error(format!("reconnect: {e}")),
            Err(_) => sh.note_error("reconnect: timed out".into()),
        }
        sh.reconnects.failed_attempts.fetch_add(1, Relaxed);
        tokio::time::sleep(RECONNECT_BACKOFF * attempt).await;
    }
    sh.reconnects.abandoned.fetch_add(1, Relaxed);
    sh.resuming.fetch_sub(1, Relaxed);
    sh.note_error(format!(
        "a subscriber gave up after {RECONNECT_ATTEMPTS} reconnect attempts"
    ));
    None
}

async fn read_loop(sh: &Shared, stream: &mut TcpStream, conn: &mut Conn) -> Step {
    // Frames that arrived together with the upgrade response.
    if !conn.carry.is_empty() {
        let carry = std::mem::take(&mut conn.carry);
        let step = with_local(sh, |_, st| conn.feed(sh, &carry, st, now_ns()));
        if !matches!(step, Step::More) {
            return step;
        }
    }
    loop {
        let ready = match churn_wait(sh, conn) {
            Ok(None) => stream.readable().await,
            Ok(Some(wait)) => match tokio::time::timeout(wait, stream.readable()).await {
                Ok(r) => r,
                Err(_) => continue,
            },
            Err(d) => return Step::Dropped(d),
        };
        if ready.is_err() {
            return Step::More;
        }
        let step = with_local(sh, |buf, st| {
            let n = match stream.try_read(buf) {
                Ok(0) => return Some(Step::More),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(_) => return Some(Step::More),
            };
            match conn.feed(sh, &buf[..n], st, now_ns()) {
                Step::More => None,
                other => Some(other),
            }
        });
        if let Some(step) = step {
            return step;
        }
        if let Some(out) = conn.take_pong() {
            if stream.write_all(&out).await.is_err() {
                return Step::More;
            }
        }
    }
}

/// How long a tokio-path reader may wait for data before its drop is due
/// (`Ok(None)`: no limit), or the drop that is due now.
fn churn_wait(sh: &Shared, conn: &mut Conn) -> Result<Option<Duration>, churn::Drop> {
    if !sh.churn.drops() {
        return Ok(None);
    }
    let now = now_ns();
    match conn.next_drop(sh, now) {
        Some(d) if d.at_ns <= now => Err(d),
        Some(d) => Ok(Some(Duration::from_nanos(d.at_ns - now).min(CHURN_POLL))),
        // The window is not fixed yet: look again soon.
        None if sh.churn_gen.load(Relaxed) == 0 => Ok(Some(CHURN_POLL)),
        None => Ok(None),
    }
}

fn with_local<R>(sh: &Shared, f: impl FnOnce(&mut [u8], &mut ThreadStats) -> R) -> R {
    LOCAL.with(|cell| {
        let mut slot = cell.borrow_mut();
        let local = slot.get_or_insert_with(|| Local {
            buf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
            stats: sh.register_thread(),
        });
        let stats = local.stats.clone();
        let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut local.buf, &mut st)
    })
}

enum ConnectError {
    Io(std::io::Error),
    Refused(String),
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> Self {
        ConnectError::Io(e)
    }
}

/// Opens a TCP connection from `source` (if given) with the port chosen at
/// connect time, so each source address has its own ephemeral port space per
/// destination.
pub(crate) async fn tcp_connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: `sock` owns a valid socket fd for this call; the option value
        // points to a live c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects, sends `request` (an upgrade, or an event stream's `GET`) and
/// `subscribe` (if any); returns the socket and whatever arrived after the
/// response head.
async fn dial(
    spec: &SubSpec,
    request: &[u8],
    subscribe: Option<&[u8]>,
) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let mut stream = tcp_connect(spec.addr, spec.source).await?;
    stream.write_all(request).await?;
    let status: &[u8] = match spec.transport {
        Transport::Ws => b"HTTP/1.1 101",
        Transport::Sse => b"HTTP/1.1 200",
    };
    let mut buf = Vec::with_capacity(512);
    let used = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match ws::check_response(&buf, status) {
            Upgrade::Done(used) => break used,
            Upgrade::Partial => continue,
            Upgrade::Refused(s) => return Err(ConnectError::Refused(s)),
        }
    };
    let mut rest = buf.split_off(used);
    if let Some(sub) = subscribe {
        if let Some(greeting) = &spec.greeting {
            await_greeting(&mut stream, &mut rest, greeting).await?;
        }
        let mut out = Vec::with_capacity(sub.len() + 16);
        ws::encode_masked(&mut out, ws::OP_TEXT, sub, [0x5a, 0xa5, 0x3c, 0xc3]);
        stream.write_all(&out).await?;
    }
    Ok((stream, rest))
}

/// Most bytes read while waiting for the greeting: a server that talks this
/// much without greeting is not the one expected.
const MAX_GREETING_BYTES: usize = 64 * 1024;

/// Reads frames after the upgrade (keeping them in `rest`, where the
/// connection's reader will take them in) until one contains `greeting`.
/// A close frame or a Pusher `pusher:error` first is a refusal.
async fn await_greeting(
    stream: &mut TcpStream,
    rest: &mut Vec<u8>,
    greeting: &[u8],
) -> Result<(), ConnectError> {
    loop {
        let mut at = 0;
        loop {
            let f = match ws::decode(&rest[at..]) {
                Decoded::Complete(f) => f,
                Decoded::Partial => break,
                Decoded::Invalid(why) => return Err(ConnectError::Refused(why.into())),
            };
            let raw = &rest[at + f.payload_at..at + f.end()];
            let inflated;
            let payload = if f.compressed {
                inflated = inflate(raw).ok_or_else(|| {
                    ConnectError::Refused("bad compressed message before the greeting".into())
                })?;
                &inflated[..]
            } else {
                raw
            };
            if f.opcode == ws::OP_CLOSE || memchr::memmem::find(payload, b"pusher:error").is_some()
            {
                let text = String::from_utf8_lossy(payload);
                return Err(ConnectError::Refused(format!(
                    "before the greeting the server sent {}",
                    text.chars().take(200).collect::<String>()
                )));
            }
            if memchr::memmem::find(payload, greeting).is_some() {
                return Ok(());
            }
            at += f.end();
        }
        if rest.len() > MAX_GREETING_BYTES {
            return Err(ConnectError::Refused("no greeting from the server".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}
