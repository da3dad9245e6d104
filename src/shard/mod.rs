//! A shard: one OS thread running a tokio-uring loop that owns a listener, a
//! slab of connections, a topic index and the shard's end of the bus.
//!
//! This is the only module that does I/O and the only one that names
//! `tokio_uring`. The tokio-uring loop hosts the shard: it waits on the shard's
//! eventfd and runs the timer. Socket I/O goes through the connection ring
//! ([`ring`]), whose completions signal that same eventfd, as do other shards
//! when they queue envelopes. Every wake-up runs one [`Shard::turn`]: handle
//! completions, drain the bus, queue sends, submit once.

mod channels;
mod conn;
mod http;
mod interest;
pub mod outbound;
mod relay;
mod ring;
pub mod topics;
mod users;

use std::cell::RefCell;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use slab::Slab;

use crate::auth::Auth;
use crate::bus::{Bus, Envelope, IndexKind, Outbox, Sent, ShardId};
use crate::config::Config;
use crate::hooks::Channels;
use crate::metrics::ShardStats;
use crate::protocol::frame::{self, FrameDecoder, FrameLimits};
use crate::protocol::http::{expects_continue, parse_request, HttpLimits, Response, CONTINUE};
use crate::protocol::Decoded;

use conn::{Closing, Conn, Deferred, Phase, WsKind};
use outbound::{Enqueued, SendBuffers, SendPlan};
use ring::{Completion, ConnRing, OpKind, Token};
use topics::{ConnId, TopicId, TopicIndex};
use users::{Registration, Users};

/// Completions handled per pass before the bus gets a turn, so a flood of
/// receives cannot starve cross-shard deliveries (and vice versa).
const COMPLETION_BATCH: usize = 1024;
/// Envelopes drained from each peer shard per pass, for the same reason.
const BUS_DRAIN_BOUND: usize = 256;
/// Passes per wake-up before yielding to the timer task; a pass that found
/// nothing to do ends the turn early.
const MAX_PASSES_PER_TURN: usize = 8;
/// Timer period for close deadlines and shutdown progress. Deadlines are
/// seconds long, so a tenth of a second of slack is invisible.
const TICK: Duration = Duration::from_millis(100);
/// Direct descriptors beyond the connection limit, so connections over it can
/// still be accepted and told 503 instead of waiting in the backlog.
const REFUSAL_HEADROOM: usize = 256;
/// Accept failures logged per shard; later ones are only counted, so a
/// descriptor shortage cannot flood the log.
const ACCEPT_ERRORS_LOGGED: u32 = 10;
/// Ticks between scans for HTTP connections past their idle deadline: the
/// scan visits every connection, so it runs once a second, not every tick.
const HTTP_IDLE_SCAN_TICKS: u32 = 10;

/// What every shard shares: configuration, bus and statistics.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) stats: Arc<[ShardStats]>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) auth: Arc<Auth>,
}

/// Runs shard `id` on the calling thread until it has shut down.
pub(crate) fn run(id: ShardId, shared: Shared, listener: TcpListener) -> io::Result<()> {
    if shared.config.pin_cores {
        pin_to_core(id.0);
    }
    tokio_uring::start(async move {
        // The waker keeps its eventfd for other shards to write; the loop reads a duplicate.
        // SAFETY: dup has no memory-safety preconditions; the result is checked.
        let read_fd = unsafe { libc::dup(shared.bus.waker(id).raw_fd()) };
        if read_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `read_fd` is a fresh descriptor owned by nothing else.
        let eventfd =
            tokio_uring::fs::File::from_std(unsafe { std::fs::File::from_raw_fd(read_fd) });
        let shard = Rc::new(RefCell::new(Shard::new(id, shared, listener)?));
        shard.borrow_mut().start()?;

        let ticker = shard.clone();
        tokio_uring::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                ticker.borrow_mut().on_tick();
            }
        });

        let mut buf = vec![0u8; 8];
        loop {
            let (result, back) = eventfd.read_at(buf, 0).await;
            buf = back;
            result?;
            let mut shard = shard.borrow_mut();
            shard.turn();
            if shard.is_finished() {
                return Ok(());
            }
        }
    })
}

fn pin_to_core(shard: usize) {
    let cores = crate::config::available_cores().get();
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the call only
    // reads the set. Failure (e.g. a restricted cpuset) leaves the thread unpinned.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(shard % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Result of feeding input to one connection.
enum Step {
    /// This many bytes were used; call again with the rest.
    Consumed(usize),
    /// More input is needed.
    Partial,
    /// The connection stopped reading (closing or upgraded into a dead end).
    Stop,
    /// The connection waits for other shards; keep the input for later.
    Blocked,
}

/// State of one shard. Lives on its own thread, reached only through `&mut`.
pub(crate) struct Shard {
    id: ShardId,
    shared: Shared,
    ring: ConnRing,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    /// Stamped on each new connection so completions of a previous owner of
    /// the same slot are recognised.
    next_generation: u32,
    /// Connections allowed on this shard: the global limit split evenly.
    max_conns: usize,
    topics: TopicIndex,
    /// User id -> this shard's identified relay connections of that user.
    users: TopicIndex,
    /// User id -> this shard's `/chat` connections of that user.
    chatters: TopicIndex,
    users_state: Users,
    presence: channels::PresenceQueries,
    outbox: Outbox,
    /// Connections with queued output, in the order they got it.
    dirty: Vec<usize>,
    /// Connections whose receive ended with ENOBUFS and must be re-armed.
    rearm: Vec<usize>,
    /// Connections waiting for a close deadline.
    closing: Vec<(usize, u32)>,
    completions: Vec<Completion>,
    /// Send buffers released by idle connections, reused by the next sender.
    send_buffers: SendBuffers,
    /// Set when shutdown began: the deadline for closing every connection.
    shutdown_deadline: Option<Instant>,
    accept_armed: bool,
    accept_errors_logged: u32,
    next_epoch: u64,
    ticks: u32,
}

impl Shard {
    fn new(id: ShardId, shared: Shared, listener: TcpListener) -> io::Result<Shard> {
        let config = &shared.config;
        let shards = config.shards.get();
        let max_conns = config.limits.max_connections.div_ceil(shards);
        let ring = ConnRing::new(shared.bus.waker(id).raw_fd(), direct_descriptors(max_conns))?;
        Ok(Shard {
            id,
            ring,
            listener: Some(listener),
            conns: Slab::new(),
            next_generation: 0,
            max_conns,
            topics: TopicIndex::new(config.limits.max_topics_per_shard),
            users: TopicIndex::new(config.limits.max_connections),
            chatters: TopicIndex::new(config.limits.max_connections),
            users_state: Users::default(),
            presence: channels::PresenceQueries::default(),
            outbox: Outbox::new(id, shards),
            dirty: Vec::new(),
            rearm: Vec::new(),
            closing: Vec::new(),
            completions: Vec::with_capacity(COMPLETION_BATCH),
            send_buffers: SendBuffers::default(),
            shutdown_deadline: None,
            accept_armed: false,
            accept_errors_logged: 0,
            next_epoch: 1,
            ticks: 0,
            shared,
        })
    }

    fn start(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.ring.submit()?;
        Ok(())
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.id.0]
    }

    fn update_topic_gauge(&self) {
        self.stats().topics.store(
            self.topics.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn is_finished(&self) -> bool {
        self.shutdown_deadline.is_some() && self.conns.is_empty() && !self.accept_armed
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        if self.shutdown_deadline.is_none() && self.ring.accept(listener.as_raw_fd()).is_ok() {
            self.accept_armed = true;
        }
    }

    /// One wake-up: completions, bus, sends, one submission.
    fn turn(&mut self) {
        self.shared.bus.waker(self.id).rearm();
        for _ in 0..MAX_PASSES_PER_TURN {
            let mut progressed = self.handle_completions();
            progressed |= self.drain_bus();
            self.flush();
            if !progressed {
                return;
            }
        }
        // Work left after the pass bound: come back after the timer task had its turn.
        self.shared.bus.waker(self.id).signal();
    }

    fn handle_completions(&mut self) -> bool {
        let mut batch = std::mem::take(&mut self.completions);
        self.ring.drain(&mut batch, COMPLETION_BATCH);
        let progressed = !batch.is_empty();
        for completion in batch.drain(..) {
            match completion.token.kind {
                OpKind::Accept => self.on_accept(completion),
                OpKind::Recv => self.on_recv(completion),
                OpKind::Send => self.on_send(completion),
                OpKind::Shutdown => {
                    if let Some(key) = self.live(completion.token) {
                        self.conns[key].shutdown_pending = false;
                        self.maybe_release(key);
                    }
                }
                OpKind::Close => {}
            }
        }
        self.completions = batch;
        progressed
    }

    fn drain_bus(&mut self) -> bool {
        let bus = self.shared.bus.clone();
        let mut progressed = false;
        for from in 0..bus.shards() {
            for _ in 0..BUS_DRAIN_BOUND {
                let Some(envelope) = bus.pop(ShardId(from), self.id) else {
                    break;
                };
                progressed = true;
                ShardStats::add(&self.stats().bus_received_total, 1);
                self.on_envelope(ShardId(from), envelope);
            }
        }
        progressed
    }

    /// Queues sends for connections with output, re-arms receives, pushes the
    /// bus backlog, wakes peers and submits everything in one system call.
    fn flush(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if let Some(plan) = conn.out.prepare_send(&mut self.send_buffers) {
                let (file, generation) = (conn.file, conn.generation);
                // SAFETY: the plan points into frames the connection's in-flight
                // state owns until `on_send` reports the completion.
                let submitted = unsafe {
                    match plan {
                        SendPlan::One { ptr, len } => {
                            self.ring.send_one(file, ptr, len, key as u32, generation)
                        }
                        SendPlan::Many(msg) => self.ring.send(file, msg, key as u32, generation),
                    }
                };
                if submitted.is_err() {
                    self.conns[key].out.fail_send();
                    self.terminate(key);
                    continue;
                }
                ShardStats::add(&self.stats().send_ops_total, 1);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        for key in std::mem::take(&mut self.rearm) {
            self.arm_recv(key);
        }
        // What still finds no room waits for the peer to drain; every turn and
        // every tick retries.
        self.outbox.retry_backlog(&self.shared.bus);
        self.outbox.wake_all(&self.shared.bus);
        if let Err(e) = self.ring.submit() {
            tracing::error!(shard = self.id.0, "io_uring submit failed: {e}");
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks % HTTP_IDLE_SCAN_TICKS == 0 {
            self.expire_idle_http(now);
        }
        if let Some(deadline) = self.shutdown_deadline {
            if now >= deadline {
                let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.terminate(key);
                }
            }
        }
        if !self.accept_armed {
            self.arm_accept();
        }
        let closing = std::mem::take(&mut self.closing);
        for (key, generation) in closing {
            let Some(conn) = self.conns.get(key) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            match conn.closing {
                Closing::AfterFlush { deadline, .. } if now >= deadline => self.terminate(key),
                Closing::AfterFlush { .. } => self.closing.push((key, generation)),
                _ => {}
            }
        }
        self.flush();
        if self.is_finished() {
            self.shared.bus.waker(self.id).signal();
        }
    }

    /// Closes HTTP connections that did not complete a request in time: a
    /// silent close when idle between requests, 408 when one was under way.
    fn expire_idle_http(&mut self, now: Instant) {
        let expired: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.phase, Phase::Http)
                    && c.closing == Closing::No
                    && c.deferred.is_none()
                    && c.out.is_flushed()
                    && c.http_deadline <= now
            })
            .map(|(key, c)| (key, !c.inbuf.is_empty()))
            .collect();
        for (key, partial) in expired {
            if partial {
                let response =
                    crate::protocol::http::error_json(408, "request not completed in time");
                self.respond(key, response.keep_alive(false));
            } else {
                self.terminate(key);
            }
        }
    }

    // ---- accept ----------------------------------------------------------

    fn on_accept(&mut self, c: Completion) {
        if c.result < 0 {
            self.accept_armed = self.accept_armed && c.more;
            if self.shutdown_deadline.is_some() {
                return;
            }
            // Out of descriptors or memory: re-arming now would fail again at
            // once, so the next tick re-arms (see `on_tick`) and connections
            // wait in the listen backlog meanwhile.
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
            let _ = self.ring.close(file);
            return;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let deadline = Instant::now() + self.config().http_idle_timeout;
        let key = self.conns.insert(Conn::new(file, generation, deadline));
        ShardStats::add(&self.stats().connections, 1);
        ShardStats::add(&self.stats().connections_accepted_total, 1);
        if self.conns.len() > self.max_conns {
            ShardStats::add(&self.stats().connections_rejected_total, 1);
            let response = crate::protocol::http::error_json(503, "connection limit reached")
                .keep_alive(false);
            self.respond(key, response);
            return;
        }
        self.arm_recv(key);
    }

    fn arm_recv(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.recv_armed || conn.closing == Closing::Terminating {
            return;
        }
        let (file, generation) = (conn.file, conn.generation);
        if self.ring.recv(file, key as u32, generation).is_ok() {
            self.conns[key].recv_armed = true;
        } else {
            self.terminate(key);
        }
    }

    /// The connection in `slot` if it is still the one the token was made for.
    fn live(&self, token: Token) -> Option<usize> {
        let key = token.slot as usize;
        let conn = self.conns.get(key)?;
        Token::same_generation(conn.generation, token.generation).then_some(key)
    }

    // ---- receive ---------------------------------------------------------

    fn on_recv(&mut self, c: Completion) {
        let live = self.live(c.token);
        if let (Some(id), None) = (c.buffer, live) {
            self.ring.recycle(id);
        }
        let Some(key) = live else { return };
        if !c.more {
            self.conns[key].recv_armed = false;
        }
        match c.result {
            n if n > 0 => {
                if let Some(id) = c.buffer {
                    let data = self.ring.received(id, n as usize);
                    // SAFETY: the buffer belongs to us until `recycle(id)` below;
                    // the kernel does not write it meanwhile, and the memory is a
                    // boxed slice owned by the ring that does not move or shrink.
                    let data: &[u8] =
                        unsafe { std::slice::from_raw_parts(data.as_ptr(), data.len()) };
                    ShardStats::add(&self.stats().bytes_in_total, n as u64);
                    self.on_input(key, data);
                    self.ring.recycle(id);
                }
                if !c.more
                    && self
                        .conns
                        .get(key)
                        .is_some_and(|c| c.closing != Closing::Terminating)
                {
                    self.rearm.push(key);
                }
            }
            0 => self.on_peer_eof(key),
            e if e == -libc::ENOBUFS => self.rearm.push(key),
            _ => self.terminate(key),
        }
        self.maybe_release(key);
    }

    fn on_peer_eof(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.out.is_flushed() || matches!(conn.phase, Phase::WebSocket { .. }) {
            self.terminate(key);
        } else {
            // A client may half-close after its last request; answer it first.
            self.close_after_flush(key, true);
        }
    }

    /// Feeds received bytes to the connection's protocol, keeping any
    /// incomplete tail for the next receive.
    fn on_input(&mut self, key: usize, data: &[u8]) {
        let mut pending = std::mem::take(&mut self.conns[key].inbuf);
        let from_pending = !pending.is_empty();
        if from_pending {
            pending.extend_from_slice(data);
        }
        let input: &[u8] = if from_pending { &pending } else { data };
        let mut used = 0;
        while used < input.len() {
            match self.step(key, &input[used..]) {
                Step::Consumed(n) => used += n,
                Step::Partial | Step::Blocked => break,
                Step::Stop => return,
            }
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.inbuf = if used == input.len() {
            BytesMut::new()
        } else if from_pending {
            pending.advance(used);
            pending
        } else {
            BytesMut::from(&data[used..])
        };
    }

    fn step(&mut self, key: usize, input: &[u8]) -> Step {
        let conn = &mut self.conns[key];
        if conn.closing == Closing::Terminating {
            return Step::Stop;
        }
        if conn.deferred.is_some() {
            return Step::Blocked;
        }
        match &mut conn.phase {
            Phase::Http => {
                if conn.closing != Closing::No {
                    return Step::Stop;
                }
                let limits = HttpLimits {
                    max_header_bytes: self.shared.config.limits.max_http_header_bytes,
                    max_body_bytes: self.shared.config.limits.max_http_body_bytes,
                    ..HttpLimits::default()
                };
                match parse_request(input, &limits) {
                    Ok(Decoded::Partial) => {
                        if !conn.continue_sent && expects_continue(input) {
                            conn.continue_sent = true;
                            let interim = Bytes::from_static(CONTINUE);
                            conn.out.enqueue_final(interim, &mut self.send_buffers);
                            self.mark_dirty(key);
                        }
                        Step::Partial
                    }
                    Ok(Decoded::Complete(request, used)) => {
                        conn.continue_sent = false;
                        conn.http_deadline = Instant::now() + self.shared.config.http_idle_timeout;
                        ShardStats::add(&self.stats().http_requests_total, 1);
                        self.handle_request(key, request);
                        Step::Consumed(used)
                    }
                    Err(e) => {
                        ShardStats::add(&self.stats().http_requests_total, 1);
                        self.respond(key, e.response());
                        Step::Stop
                    }
                }
            }
            Phase::WebSocket { kind, decoder } => {
                let kind = *kind;
                match decoder.decode(input) {
                    Ok(Decoded::Partial) => Step::Partial,
                    Ok(Decoded::Complete(incoming, used)) => {
                        self.handle_ws(key, kind, incoming);
                        Step::Consumed(used)
                    }
                    Err(e) => {
                        ShardStats::add(&self.stats().protocol_closes_total, 1);
                        // RFC 6455 7.1.7: after failing the connection there is
                        // no handshake to wait for; drop it once the close is sent.
                        self.close_ws(key, e.close_code(), &e.to_string());
                        self.close_after_flush(key, true);
                        Step::Stop
                    }
                }
            }
        }
    }

    /// Takes connection `key`'s parked work, if the slot still holds the
    /// connection `generation` names and `parked` recognises the work.
    fn take_deferred(
        &mut self,
        key: usize,
        generation: u32,
        parked: impl Fn(&Deferred) -> bool,
    ) -> Option<Deferred> {
        let conn = self
            .conns
            .get_mut(key)
            .filter(|c| c.generation == generation)?;
        if !conn.deferred.as_ref().is_some_and(parked) {
            return None;
        }
        conn.deferred.take()
    }

    /// Sends a parked HTTP response and reads the requests queued behind it.
    fn answer_parked(&mut self, key: usize, response: Response) {
        self.respond(key, response);
        self.on_input(key, &[]);
    }

    /// Switches a connection to WebSocket after the 101 response was queued.
    fn upgrade(&mut self, key: usize, kind: WsKind) {
        let limits = &self.shared.config.limits;
        let decoder = FrameDecoder::new(FrameLimits {
            max_frame_bytes: limits.max_message_bytes,
            max_message_bytes: limits.max_message_bytes,
        });
        self.conns[key].phase = Phase::WebSocket {
            kind,
            decoder: Box::new(decoder),
        };
        ShardStats::add(&self.stats().websockets, 1);
    }

    // ---- send ------------------------------------------------------------

    fn on_send(&mut self, c: Completion) {
        let Some(key) = self.live(c.token) else {
            return;
        };
        let conn = &mut self.conns[key];
        if c.result < 0 {
            conn.out.fail_send();
            self.terminate(key);
            self.maybe_release(key);
            return;
        }
        let sent = conn.out.complete_send(c.result as usize);
        let flushed = conn.out.is_flushed();
        ShardStats::add(&self.stats().bytes_out_total, sent as u64);
        if !flushed {
            self.mark_dirty(key);
        } else {
            self.on_flushed(key);
        }
        self.maybe_release(key);
    }

    fn on_flushed(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.closing {
            Closing::AfterFlush {
                then_terminate: true,
                ..
            } => self.terminate(key),
            Closing::No => conn.out.release_idle_buffers(&mut self.send_buffers),
            _ => {}
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Queues a frame for a WebSocket, closing it as a slow consumer if the
    /// frame does not fit its outbound budget.
    fn send_frame(&mut self, key: usize, frame: Bytes) {
        let budget = self.shared.config.limits.max_outbound_bytes_per_connection;
        match self.conns[key].enqueue(frame, budget, &mut self.send_buffers) {
            Enqueued::Yes => {
                ShardStats::add(&self.stats().messages_out_total, 1);
                self.mark_dirty(key);
            }
            Enqueued::Discarded => {}
            Enqueued::OverBudget => self.slow_consumer(key),
        }
    }

    /// Queues an HTTP response; a `Connection: close` one ends the connection after it.
    fn respond(&mut self, key: usize, response: Response) {
        if response.status() >= 400 {
            ShardStats::add(&self.stats().http_errors_total, 1);
        }
        let keep_alive = response.is_keep_alive();
        self.conns[key]
            .out
            .enqueue_final(response.encode(), &mut self.send_buffers);
        self.mark_dirty(key);
        if !keep_alive {
            self.close_after_flush(key, true);
        }
    }

    fn slow_consumer(&mut self, key: usize) {
        ShardStats::add(&self.stats().slow_consumer_disconnects_total, 1);
        self.conns[key].out.discard_queued();
        self.close_ws(key, 1013, "slow consumer: outbound queue over its limit");
    }

    // ---- close -----------------------------------------------------------

    /// Starts the WebSocket close handshake with `code`; the connection
    /// receives nothing more and ends when the peer answers or the deadline passes.
    fn close_ws(&mut self, key: usize, code: u16, reason: &str) {
        let conn = &mut self.conns[key];
        if conn.close_sent || conn.closing == Closing::Terminating {
            return;
        }
        conn.close_sent = true;
        conn.out
            .enqueue_final(frame::close(code, reason), &mut self.send_buffers);
        self.mark_dirty(key);
        self.close_after_flush(key, false);
    }

    fn close_after_flush(&mut self, key: usize, then_terminate: bool) {
        self.leave_indexes(key);
        let deadline = Instant::now() + self.shared.config.close_timeout;
        let conn = &mut self.conns[key];
        match conn.closing {
            Closing::Terminating => return,
            Closing::AfterFlush {
                then_terminate: true,
                ..
            } => return,
            _ => {}
        }
        conn.closing = Closing::AfterFlush {
            deadline,
            then_terminate,
        };
        let generation = conn.generation;
        self.closing.push((key, generation));
        if then_terminate && conn.out.is_flushed() {
            self.terminate(key);
        }
    }

    /// Removes a closing connection from every index, so nothing more is
    /// routed to it and other shards learn when this shard lost a name.
    fn leave_indexes(&mut self, key: usize) {
        self.drop_subscriptions(key);
        self.drop_identity(key);
        if let Some(conn) = self.conns.get_mut(key) {
            conn.deferred = None;
        }
    }

    /// Shuts the socket down; the slot is freed once the kernel has returned
    /// every operation on it.
    fn terminate(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.closing == Closing::Terminating {
            return;
        }
        conn.closing = Closing::Terminating;
        conn.out.discard_queued();
        // Ends the pending receive and fails a pending send; their completions,
        // and the shutdown's own, let `maybe_release` free the slot.
        let (file, generation) = (conn.file, conn.generation);
        conn.shutdown_pending = self.ring.shutdown(file, key as u32, generation).is_ok();
        self.leave_indexes(key);
        self.maybe_release(key);
    }

    fn maybe_release(&mut self, key: usize) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.closing != Closing::Terminating
            || conn.recv_armed
            || conn.shutdown_pending
            || conn.out.is_sending()
        {
            return;
        }
        let conn = self.conns.remove(key);
        // No operation on the descriptor is pending any more.
        let _ = self.ring.close(conn.file);
        ShardStats::sub(&self.stats().connections, 1);
        if matches!(conn.phase, Phase::WebSocket { .. }) {
            ShardStats::sub(&self.stats().websockets, 1);
        }
    }

    // ---- bus ---------------------------------------------------------------

    fn on_envelope(&mut self, from: ShardId, envelope: Envelope) {
        match envelope {
            Envelope::Publish { topic, frame } => {
                if let Some(id) = self.topics.lookup(&topic) {
                    self.deliver_local(id, &frame);
                }
            }
            Envelope::UserPublish { user, topic, frame } => {
                self.deliver_to_user(IndexKind::User, &user, Some(&topic), &frame);
            }
            Envelope::Chat { user, frame } => {
                self.deliver_to_user(IndexKind::Chat, &user, None, &frame);
            }
            Envelope::Interest {
                kind,
                name,
                on,
                epoch,
            } => self.on_remote_interest(from, kind, name, on, epoch),
            Envelope::InterestAck { kind, name, epoch } => self.on_interest_ack(kind, &name, epoch),
            Envelope::Register {
                ticket,
                id,
                user,
                topics,
            } => self.on_register(from, ticket, id, Registration { user, topics }),
            Envelope::Unregister { ticket, id } => self.on_unregister(from, ticket, &id),
            Envelope::Ack { ticket } => self.on_ack(ticket),
            Envelope::PresenceQuery { ticket, topic } => {
                self.on_presence_query(from, ticket, &topic)
            }
            Envelope::PresenceReply {
                ticket,
                count,
                members,
            } => self.on_presence_reply(ticket, count, &members),
            Envelope::Shutdown => self.begin_shutdown(),
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(Instant::now() + self.shared.config.shutdown_timeout);
        if let Some(listener) = self.listener.take() {
            // Shutting a listening socket down fails its pending accept
            // (EINVAL), which ends the multishot accept; dropping the listener
            // closes it, and the kernel keeps the file until that completes.
            // SAFETY: shutdown on our own listening socket.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns[key].phase {
                Phase::WebSocket { .. } => self.close_ws(key, 1001, "server shutting down"),
                Phase::Http => self.close_after_flush(key, true),
            }
        }
    }

    // ---- fan-out -----------------------------------------------------------

    /// Queues `frame` to every active local subscriber of a topic.
    fn deliver_local(&mut self, id: TopicId, frame: &Bytes) {
        let budget = self.shared.config.limits.max_outbound_bytes_per_connection;
        let targets = &self.topics.entry(id).subscribers;
        let outcome = enqueue_all(
            &mut self.conns,
            &mut self.dirty,
            &mut self.send_buffers,
            budget,
            targets,
            frame,
            |_| true,
        );
        self.settle_fan_out(outcome);
    }

    /// Counts a fan-out's deliveries and closes its slow consumers (after the
    /// loop, since closing leaves the indexes the loop was reading).
    fn settle_fan_out(&mut self, outcome: FanOut) -> usize {
        ShardStats::add(&self.stats().messages_out_total, outcome.delivered as u64);
        for key in outcome.slow {
            self.slow_consumer(key);
        }
        outcome.delivered
    }

    /// Delivers a framed push to local subscribers and forwards it to every
    /// shard with interest. Returns how many shards took it.
    fn publish(&mut self, topic: &str, frame: Bytes) -> usize {
        ShardStats::add(&self.stats().publishes_total, 1);
        let Some(id) = self.topics.lookup(topic) else {
            return 0;
        };
        let mut shards = 0;
        if !self.topics.entry(id).subscribers.is_empty() {
            self.deliver_local(id, &frame);
            shards += 1;
        }
        let entry = self.topics.entry(id);
        let name = entry.name.clone();
        for to in entry.remote.iter() {
            let envelope = Envelope::Publish {
                topic: name.clone(),
                frame: frame.clone(),
            };
            match self.outbox.send(&self.shared.bus, to, envelope) {
                Sent::Queued => {
                    shards += 1;
                    ShardStats::add(&self.stats().bus_sent_total, 1);
                }
                Sent::Dropped => ShardStats::add(&self.stats().bus_drops_total, 1),
            }
        }
        shards
    }
}

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

/// What one fan-out did.
struct FanOut {
    delivered: usize,
    /// Connections whose outbound budget the frame would have passed.
    slow: Vec<usize>,
}

/// Queues `frame` to each of `targets` that passes `wanted`. Takes the shard's
/// fields separately so the target list can be borrowed from an index while
/// connections are mutated.
fn enqueue_all(
    conns: &mut Slab<Conn>,
    dirty: &mut Vec<usize>,
    pool: &mut SendBuffers,
    budget: usize,
    targets: &[ConnId],
    frame: &Bytes,
    wanted: impl Fn(&Conn) -> bool,
) -> FanOut {
    let mut outcome = FanOut {
        delivered: 0,
        slow: Vec::new(),
    };
    for &ConnId(slot) in targets {
        let key = slot as usize;
        let conn = &mut conns[key];
        if !wanted(conn) {
            continue;
        }
        match conn.enqueue(frame.clone(), budget, pool) {
            Enqueued::Yes => {
                outcome.delivered += 1;
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(key);
                }
            }
            Enqueued::Discarded => {}
            Enqueued::OverBudget => outcome.slow.push(key),
        }
    }
    outcome
}
