//! Open-loop publishers: one OS thread each with blocking sockets, so the
//! schedule is kept by `nanosleep` rather than a millisecond timer wheel.
//! Message `k` of publisher `p` is due at `t0 + (k * P + p) / rate`; a late
//! publisher sends at once but keeps the scheduled time in the payload, so
//! server stalls show up as latency instead of silently slowing the load
//! (no coordinated omission). Responses are read by a separate thread per
//! connection and never waited for before the next send (HTTP pipelining).

use crate::account::Marker;
use crate::clock::{now_ns, sleep_until};
use crate::offsets;
use crate::pusher;
use crate::sub::new_histogram;
use crate::ws::{self, Decoded, Upgrade, Url};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Times an unanswered HTTP publish is re-sent on a new connection after the
/// server closed the old one (nginx closes a keep-alive connection after
/// `keepalive_requests` and drops what was pipelined behind it).
const MAX_RESENDS: u8 = 3;

/// Bytes a publisher batches into one `write` when it is behind schedule.
/// Bounds the burst a stalled publisher emits per syscall.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Topics one WebSocket publishing connection subscribes to; ringcast's default
/// `max_subscriptions_per_connection` is 50.
pub(crate) const WS_TOPICS_PER_CONN: usize = 50;

/// How a message reaches the server.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// `POST` to a URL template; `json` wraps the marker as ringcast's
    /// `{"topic":..,"message":..}`, otherwise the body is the raw marker.
    Http { url: String, json: bool },
    /// ringcast's `{"type":"message",..}` over a WebSocket subscribed to the topic.
    Ws { url: String },
    /// Pusher's HTTP API: `POST` of `{"name":..,"channels":[..],"data":..}` to
    /// the events URL, each request signed for `app` (keep-alive and
    /// pipelined as `Http`).
    Pusher { url: String, app: pusher::App },
}

impl Via {
    /// Publishes are HTTP requests (answered in order on a keep-alive connection).
    fn http(&self) -> bool {
        matches!(self, Via::Http { .. } | Via::Pusher { .. })
    }
}

/// The fixed parts of a signed Pusher publish request.
struct PusherWire {
    app: pusher::App,
    /// The events path, as signed (no query).
    path: String,
    /// From the end of the query to `Content-Length: `.
    tail: Vec<u8>,
}

/// Counters summed over all publishers, reset by the main thread per epoch
/// (except `last_offsets`, which spans the run).
#[derive(Default)]
pub(crate) struct PubCounters {
    /// Per topic, the highest stream offset a `202` reply reported (0: none),
    /// so subscribers' missing offsets at the tail can be counted.
    pub(crate) last_offsets: Vec<AtomicU64>,
    /// Distinct messages the schedule produced (each counted once, however often re-sent).
    pub(crate) attempted: AtomicU64,
    /// Messages accepted: answered 2xx (HTTP) or written (WebSocket).
    pub(crate) sent: AtomicU64,
    /// Sum over sent messages of the ready subscriber count of their topic.
    pub(crate) expected: AtomicU64,
    /// Deliveries expected for messages scheduled inside the measurement window.
    pub(crate) measured_expected: AtomicU64,
    /// 2xx HTTP responses.
    pub(crate) ok: AtomicU64,
    /// Non-2xx HTTP responses.
    pub(crate) rejected: AtomicU64,
    /// Messages that could not be written (connection failed).
    pub(crate) write_failed: AtomicU64,
    /// Publisher connections re-opened after a failure.
    pub(crate) reconnects: AtomicU64,
    /// HTTP publishes sent on a connection of their own (the server closes
    /// each connection after one answer).
    pub(crate) conns_per_request: AtomicU64,
    /// Last non-2xx status line.
    pub(crate) last_rejection: Mutex<Option<String>>,
}

impl PubCounters {
    /// Zeroed counters for `topics` topics.
    pub(crate) fn new(topics: usize) -> PubCounters {
        PubCounters {
            last_offsets: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            ..PubCounters::default()
        }
    }

    /// The last offsets the publish replies reported, per topic.
    pub(crate) fn last_offsets(&self) -> Vec<u64> {
        self.last_offsets.iter().map(|o| o.load(Relaxed)).collect()
    }

    /// Publishes neither accepted, rejected nor given up on yet.
    pub(crate) fn unanswered(&self) -> u64 {
        self.attempted.load(Relaxed).saturating_sub(
            self.sent.load(Relaxed) + self.rejected.load(Relaxed) + self.write_failed.load(Relaxed),
        )
    }

    /// Resets all counters to zero.
    pub(crate) fn reset(&self) {
        for c in [
            &self.attempted,
            &self.sent,
            &self.expected,
            &self.measured_expected,
            &self.ok,
            &self.rejected,
            &self.write_failed,
            &self.reconnects,
            &self.conns_per_request,
        ] {
            c.store(0, Relaxed);
        }
    }
}

/// One epoch's schedule.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Epoch stamped into markers.
    pub(crate) epoch: u32,
    /// Schedule origin, process-clock ns.
    pub(crate) t0: u64,
    /// Messages with schedule time at or after this are measured.
    pub(crate) measure_start: u64,
    /// No message is scheduled at or after this.
    pub(crate) end: u64,
    /// Total messages per second over all publishers.
    pub(crate) rate: f64,
}

struct TopicWire {
    /// Everything before the body length digits (HTTP) or before the marker (WS).
    head: Vec<u8>,
    /// Bytes between the length header and the marker (HTTP body prefix).
    body_prefix: Vec<u8>,
    /// Bytes after the marker.
    body_suffix: Vec<u8>,
}

/// An HTTP publish written but not yet answered.
#[derive(Clone, Copy)]
struct Pending {
    marker: Marker,
    measured: bool,
    resends: u8,
}

/// Requests in flight on one HTTP connection, in order; the reader thread pops
/// one per response and counts it, so a publish is expected only once the
/// server accepted it.
#[derive(Default)]
struct Inflight {
    queue: Mutex<VecDeque<Pending>>,
    closed: AtomicBool,
}

struct PubConn {
    stream: Option<TcpStream>,
    inflight: Arc<Inflight>,
    reader: Option<JoinHandle<()>>,
    out: Vec<u8>,
    url: Url,
    /// For WebSocket publishing: the topic indices this connection subscribed to.
    topics: Vec<u32>,
}

/// One publisher and its connections.
pub(crate) struct Publisher {
    id: u32,
    publishers: u32,
    addr: SocketAddr,
    via: Via,
    names: Vec<String>,
    wires: Vec<TopicWire>,
    seq: Vec<u64>,
    conns: Vec<PubConn>,
    payload_bytes: usize,
    pipeline_depth: u64,
    counters: Arc<PubCounters>,
    topic_subs: Arc<Vec<u64>>,
    scratch: Vec<u8>,
    rng: u64,
    /// With `Via::Pusher`: what every request shares.
    pusher: Option<PusherWire>,
    /// What this publisher's HTTP response readers share.
    http: Arc<HttpShared>,
    /// Once the server closes every connection after one answer: a
    /// connection per publish.
    one_shot: Option<OneShot>,
    /// One HTTP request being built.
    request: Vec<u8>,
}

fn topic_conn(via: &Via, topic: usize) -> usize {
    match via {
        Via::Http { url, .. } if url.contains("{topic}") => 0,
        Via::Http { .. } | Via::Pusher { .. } => 0,
        Via::Ws { .. } => topic / WS_TOPICS_PER_CONN,
    }
}

impl Publisher {
    /// Opens the connections of publisher `id` (and, for WebSocket publishing,
    /// subscribes them to their topics).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn connect(
        id: u32,
        publishers: u32,
        addr: SocketAddr,
        via: Via,
        names: Vec<String>,
        payload_bytes: usize,
        pipeline_depth: u64,
        counters: Arc<PubCounters>,
        topic_subs: Arc<Vec<u64>>,
    ) -> Result<Publisher> {
        let mut wires = Vec::with_capacity(names.len());
        let mut conns: Vec<PubConn> = Vec::new();
        let mut pusher_wire = None;
        for (t, name) in names.iter().enumerate() {
            match &via {
                Via::Pusher { url, app } => {
                    wires.push(TopicWire {
                        head: Vec::new(),
                        body_prefix: pusher::body_prefix(name).into_bytes(),
                        body_suffix: pusher::BODY_SUFFIX.as_bytes().to_vec(),
                    });
                    if conns.is_empty() {
                        let u = Url::parse(url)?;
                        let path = u.path.split('?').next().unwrap_or("/").to_string();
                        pusher_wire = Some(PusherWire {
                            app: app.clone(),
                            path,
                            tail: format!(
                                " HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: ",
                                u.authority
                            )
                            .into_bytes(),
                        });
                        conns.push(PubConn::new(u, Vec::new()));
                    }
                }
                Via::Http { url, json } => {
                    let u = Url::parse(&ws::fill(url, name))?;
                    let ctype = if *json {
                        "application/json"
                    } else {
                        "text/plain"
                    };
                    let head = format!(
                        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: {ctype}\r\nContent-Length: ",
                        u.path, u.authority
                    );
                    let (body_prefix, body_suffix) = if *json {
                        (
                            format!(r#"{{"topic":"{name}","message":""#),
                            "\"}".to_string(),
                        )
                    } else {
                        (String::new(), String::new())
                    };
                    wires.push(TopicWire {
                        head: head.into_bytes(),
                        body_prefix: body_prefix.into_bytes(),
                        body_suffix: body_suffix.into_bytes(),
                    });
                    if conns.is_empty() {
                        conns.push(PubConn::new(u, Vec::new()));
                    }
                }
                Via::Ws { url } => {
                    wires.push(TopicWire {
                        head: format!(
                            r#"{{"type":"message","topic":"{name}","event":"load","payload":""#
                        )
                        .into_bytes(),
                        body_prefix: Vec::new(),
                        body_suffix: b"\"}".to_vec(),
                    });
                    let c = topic_conn(&via, t);
                    if conns.len() <= c {
                        conns.push(PubConn::new(Url::parse(&ws::fill(url, name))?, Vec::new()));
                    }
                    conns[c].topics.push(t as u32);
                }
            }
        }
        let http = Arc::new(HttpShared {
            counters: counters.clone(),
            subs: topic_subs.clone(),
            server_closes: AtomicBool::new(false),
        });
        let mut p = Publisher {
            id,
            publishers,
            addr,
            via,
            seq: vec![0; names.len()],
            names,
            wires,
            conns,
            payload_bytes,
            pipeline_depth: pipeline_depth.max(1),
            counters,
            topic_subs,
            scratch: Vec::with_capacity(payload_bytes + 256),
            rng: 0x9e37_79b9_7f4a_7c15 ^ id as u64,
            pusher: pusher_wire,
            http,
            one_shot: None,
            request: Vec::new(),
        };
        for c in 0..p.conns.len() {
            p.open(c)?;
        }
        Ok(p)
    }

    fn open(&mut self, c: usize) -> Result<()> {
        let stream = TcpStream::connect(self.addr)
            .with_context(|| format!("publisher connect {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut reader = stream.try_clone()?;
        let conn = &mut self.conns[c];
        match &self.via {
            Via::Http { .. } | Via::Pusher { .. } => {
                let inflight = Arc::new(Inflight::default());
                conn.inflight = inflight.clone();
                let shared = self.http.clone();
                conn.reader = Some(
                    std::thread::Builder::new()
                        .name("pub-http-reader".into())
                        .spawn(move || http_reader(&mut reader, &inflight, &shared))?,
                );
            }
            Via::Ws { .. } => {
                let mut w = &stream;
                w.write_all(&ws::upgrade_request(&conn.url, self.rng ^ c as u64))?;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let used = loop {
                    let n = reader.read(&mut chunk)?;
                    if n == 0 {
                        bail!("publisher WebSocket closed during upgrade");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match ws::check_upgrade(&buf) {
                        Upgrade::Done(u) => break u,
                        Upgrade::Partial => {}
                        Upgrade::Refused(s) => bail!("publisher upgrade refused: {s}"),
                    }
                };
                buf.drain(..used);
                let mut out = Vec::new();
                for &t in &conn.topics {
                    let msg = format!(
                        r#"{{"type":"subscribe","topic":"{}"}}"#,
                        self.names[t as usize]
                    );
                    ws::encode_masked(&mut out, ws::OP_TEXT, msg.as_bytes(), [9, 8, 7, 6]);
                }
                w.write_all(&out)?;
                let want = conn.topics.len();
                reader.set_read_timeout(Some(Duration::from_secs(10)))?;
                while memchr::memmem::find_iter(&buf, br#""subscribed""#).count() < want {
                    let n = reader
                        .read(&mut chunk)
                        .context("publisher waiting for subscribe acks")?;
                    if n == 0 {
                        bail!(
                            "publisher WebSocket closed before its subscriptions were acknowledged"
                        );
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                reader.set_read_timeout(None)?;
                std::thread::Builder::new()
                    .name("pub-ws-reader".into())
                    .spawn(move || ws_drain(&mut reader))?;
            }
        }
        conn.stream = Some(stream);
        Ok(())
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: masks need not be secret against our own test server.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng as u32).to_le_bytes()
    }

    /// Appends the HTTP request publishing `m` to `out`.
    fn http_request(&mut self, topic: usize, m: &Marker, out: &mut Vec<u8>) {
        self.scratch.clear();
        let w = &self.wires[topic];
        self.scratch.extend_from_slice(&w.body_prefix);
        m.write_padded(&mut self.scratch, self.payload_bytes);
        self.scratch.extend_from_slice(&w.body_suffix);
        match &self.pusher {
            Some(p) => {
                let query = p.app.signed_query(&p.path, &self.scratch, unix_now_s());
                out.extend_from_slice(b"POST ");
                out.extend_from_slice(p.path.as_bytes());
                out.push(b'?');
                out.extend_from_slice(query.as_bytes());
                out.extend_from_slice(&p.tail);
            }
            None => out.extend_from_slice(&w.head),
        }
        let _ = write!(out, "{}\r\n\r\n", self.scratch.len());
        out.extend_from_slice(&self.scratch);
    }

    fn encode(&mut self, topic: usize, m: &Marker, measured: bool, resends: u8) -> usize {
        let c = topic_conn(&self.via, topic);
        let pending = Pending {
            marker: *m,
            measured,
            resends,
        };
        if self.via.http() {
            if let Some(one_shot) = self.one_shot.take() {
                let mut request = std::mem::take(&mut self.request);
                request.clear();
                self.http_request(topic, m, &mut request);
                one_shot.send(
                    self.addr,
                    &request,
                    pending,
                    self.pipeline_depth,
                    &self.counters,
                );
                self.request = request;
                self.one_shot = Some(one_shot);
                return c;
            }
            let mut out = std::mem::take(&mut self.conns[c].out);
            self.http_request(topic, m, &mut out);
            let conn = &mut self.conns[c];
            conn.out = out;
            // Queued before the write so the reader can never see an unknown response.
            conn.inflight
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(pending);
            return c;
        }
        self.scratch.clear();
        let w = &self.wires[topic];
        self.scratch.extend_from_slice(&w.head);
        m.write_padded(&mut self.scratch, self.payload_bytes);
        self.scratch.extend_from_slice(&w.body_suffix);
        let mask = self.next_mask();
        ws::encode_masked(&mut self.conns[c].out, ws::OP_TEXT, &self.scratch, mask);
        c
    }

    /// Re-opens every HTTP connection the server closed and re-queues what it
    /// left unanswered (keeping the original schedule times). Once the
    /// server has said `Connection: close`, publishes go on a connection
    /// each instead, and what was pipelined behind that answer (never read
    /// by the server) is sent that way, not counted as a re-send.
    fn revive(&mut self) {
        if !self.via.http() {
            return;
        }
        if self.one_shot.is_none() && self.http.server_closes.load(Relaxed) {
            // Without its reader threads it goes on reconnecting as before.
            self.one_shot = OneShot::start(&self.http).ok();
        }
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if conn.stream.is_some() && !conn.inflight.closed.load(Relaxed) {
                continue;
            }
            if self.one_shot.is_some() && conn.stream.is_none() && conn.reader.is_none() {
                // Retired once per-request connections took over.
                continue;
            }
            if let Some(s) = conn.stream.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            // The reader has exited (or will, the socket is shut down): after the
            // join no response can pop the queue, so nothing is sent twice.
            if let Some(r) = conn.reader.take() {
                let _ = r.join();
            }
            let left: Vec<Pending> = std::mem::take(
                &mut *conn
                    .inflight
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            )
            .into();
            if self.one_shot.is_some() {
                conn.out.clear();
                for p in left {
                    self.encode(p.marker.topic as usize, &p.marker, p.measured, p.resends);
                }
                continue;
            }
            self.counters.reconnects.fetch_add(1, Relaxed);
            if self.open(c).is_err() {
                self.counters
                    .write_failed
                    .fetch_add(left.len() as u64, Relaxed);
                continue;
            }
            for p in left {
                if p.resends >= MAX_RESENDS {
                    self.counters.write_failed.fetch_add(1, Relaxed);
                    continue;
                }
                self.encode(
                    p.marker.topic as usize,
                    &p.marker,
                    p.measured,
                    p.resends + 1,
                );
            }
            self.flush(c);
        }
    }

    /// Publishes one epoch's schedule; returns the send-lag histogram (actual
    /// write time minus scheduled time, ns).
    pub(crate) fn run(&mut self, plan: &Plan) -> Histogram<u64> {
        let mut lag = new_histogram();
        if plan.rate <= 0.0 {
            return lag;
        }
        let ns_per_msg = 1e9 / plan.rate;
        let p = self.publishers as u64;
        let topics = self.seq.len() as u64;
        let offset = self.id as u64 * topics / p;
        let id = self.id as u64;
        let sched = |k: u64| plan.t0 + (((k * p + id) as f64) * ns_per_msg) as u64;
        let mut k: u64 = 0;
        // Per batch: (topic, measured) of each message, to count them once written.
        let mut batch: Vec<(u32, bool, usize)> = Vec::with_capacity(1024);
        loop {
            let due = sched(k);
            if due >= plan.end {
                break;
            }
            sleep_until(due);
            self.revive();
            self.wait_pipeline();
            let now = now_ns();
            batch.clear();
            let mut bytes = 0;
            while bytes < MAX_BATCH_BYTES {
                let due = sched(k);
                if due > now || due >= plan.end {
                    break;
                }
                let topic = ((k + offset) % topics) as usize;
                let m = Marker {
                    epoch: plan.epoch,
                    publisher: self.id,
                    topic: topic as u32,
                    seq: self.seq[topic],
                    sched_ns: due,
                };
                self.seq[topic] += 1;
                let measured = due >= plan.measure_start;
                self.counters.attempted.fetch_add(1, Relaxed);
                let c = self.encode(topic, &m, measured, 0);
                bytes += self.conns[c].out.len();
                batch.push((topic as u32, due >= plan.measure_start, c));
                lag.saturating_record(now.saturating_sub(due).max(1_000));
                k += 1;
            }
            let mut failed_conns = 0u64;
            for c in 0..self.conns.len() {
                if self.conns[c].out.is_empty() {
                    continue;
                }
                if !self.flush(c) {
                    failed_conns |= 1 << c.min(63);
                }
            }
            if self.via.http() {
                // HTTP publishes are counted by the reader when answered; a failed
                // write leaves them queued for `revive`.
                continue;
            }
            for &(topic, measured, c) in &batch {
                if failed_conns & (1 << c.min(63)) != 0 {
                    self.counters.write_failed.fetch_add(1, Relaxed);
                    continue;
                }
                let subs = self.topic_subs[topic as usize];
                self.counters.sent.fetch_add(1, Relaxed);
                self.counters.expected.fetch_add(subs, Relaxed);
                if measured {
                    self.counters.measured_expected.fetch_add(subs, Relaxed);
                }
            }
        }
        lag
    }

    /// Waits while any HTTP connection has `pipeline_depth` unanswered requests.
    fn wait_pipeline(&self) {
        if !self.via.http() {
            return;
        }
        let deadline = now_ns() + 10_000_000_000;
        for c in &self.conns {
            while c.stream.is_some()
                && !c.inflight.closed.load(Relaxed)
                && c.inflight.queue.lock().map_or(0, |q| q.len()) as u64 >= self.pipeline_depth
                && now_ns() < deadline
            {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Writes connection `c`'s buffer. On failure an HTTP connection is marked
    /// closed (its queue is re-sent by `revive`); a WebSocket one is reopened.
    fn flush(&mut self, c: usize) -> bool {
        let conn = &mut self.conns[c];
        let ok = match conn.stream.as_mut() {
            Some(s) => s.write_all(&conn.out).is_ok(),
            None => false,
        };
        conn.out.clear();
        if !ok {
            match self.via {
                Via::Http { .. } | Via::Pusher { .. } => conn.inflight.closed.store(true, Relaxed),
                Via::Ws { .. } => {
                    conn.stream = None;
                    self.counters.reconnects.fetch_add(1, Relaxed);
                    let _ = self.open(c);
                }
            }
        }
        ok
    }
}

/// Unix time in seconds: a Pusher request's `auth_timestamp`.
fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PubConn {
    fn new(url: Url, topics: Vec<u32>) -> PubConn {
        PubConn {
            stream: None,
            inflight: Arc::new(Inflight::default()),
            reader: None,
            out: Vec::with_capacity(MAX_BATCH_BYTES + 4096),
            url,
            topics,
        }
    }
}

/// Outcome of parsing one HTTP response from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Response {
    /// Status code, bytes used, and whether the server closes the
    /// connection after it (`Connection: close`).
    Complete(u16, usize, bool),
    /// More bytes needed.
    Partial,
    /// Not HTTP.
    Invalid,
}

/// Parses one HTTP/1.1 response (Content-Length or chunked body).
pub(crate) fn parse_response(buf: &[u8]) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Response::Partial,
        Err(_) => return Response::Invalid,
    };
    let code = r.code.unwrap_or(0);
    let mut len: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"chunked"));
        }
    }
    if chunked {
        let mut at = head;
        loop {
            let Some(eol) = memchr::memmem::find(&buf[at..], b"\r\n") else {
                return Response::Partial;
            };
            let size_str = std::str::from_utf8(&buf[at..at + eol]).unwrap_or("");
            let size_str = size_str.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(size_str, 16) else {
                return Response::Invalid;
            };
            at += eol + 2;
            if size == 0 {
                // Trailers end with an empty line.
                return match memchr::memmem::find(&buf[at..], b"\r\n") {
                    Some(0) => Response::Complete(code, at + 2, close),
                    Some(_) => match memchr::memmem::find(&buf[at..], b"\r\n\r\n") {
                        Some(e) => Response::Complete(code, at + e + 4, close),
                        None => Response::Partial,
                    },
                    None => Response::Partial,
                };
            }
            if buf.len() < at + size + 2 {
                return Response::Partial;
            }
            at += size + 2;
        }
    }
    // 1xx, 204 and 304 have no body; otherwise no length means none was sent here.
    let body = if code == 204 || code == 304 || (100..200).contains(&code) {
        0
    } else {
        len.unwrap_or(0)
    };
    if buf.len() < head + body {
        return Response::Partial;
    }
    Response::Complete(code, head + body, close)
}

fn http_reader(stream: &mut TcpStream, inflight: &Inflight, shared: &HttpShared) {
    http_read_loop(stream, inflight, shared);
    inflight.closed.store(true, Relaxed);
}

/// What every HTTP response reader of one publisher shares.
struct HttpShared {
    counters: Arc<PubCounters>,
    /// Ready subscribers per topic: the deliveries an accepted publish owes.
    subs: Arc<Vec<u64>>,
    /// Set once a response said `Connection: close`: the server answers one
    /// request per connection, so the publisher stops pipelining and opens a
    /// connection per request.
    server_closes: AtomicBool,
}

fn http_read_loop(stream: &mut TcpStream, inflight: &Inflight, shared: &HttpShared) {
    read_loop(stream, |data| match parse_response(data) {
        Response::Complete(code, used, close) => {
            let pending = inflight
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            account(code, &data[..used], pending, shared);
            if close {
                // Whatever was pipelined behind this answer was not read:
                // `revive` sends it again once the socket is closed.
                shared.server_closes.store(true, Relaxed);
                return Step::Stop;
            }
            Step::Used(used)
        }
        Response::Partial => Step::NeedMore,
        Response::Invalid => Step::Stop,
    });
}

/// Counts one HTTP publish response (`response` is all of it) for the
/// publish it answers.
fn account(code: u16, response: &[u8], pending: Option<Pending>, shared: &HttpShared) {
    let counters = &shared.counters;
    if (200..300).contains(&code) {
        counters.ok.fetch_add(1, Relaxed);
        if let Some(p) = pending {
            let topic = p.marker.topic as usize;
            if let (Some(o), Some(last)) = (
                offsets::reply_offset(response),
                counters.last_offsets.get(topic),
            ) {
                last.fetch_max(o, Relaxed);
            }
            let n = shared.subs.get(topic).copied().unwrap_or(0);
            counters.sent.fetch_add(1, Relaxed);
            counters.expected.fetch_add(n, Relaxed);
            if p.measured {
                counters.measured_expected.fetch_add(n, Relaxed);
            }
        }
    } else {
        counters.rejected.fetch_add(1, Relaxed);
        if let Ok(mut l) = counters.last_rejection.lock() {
            let line = response.split(|&b| b == b'\r').next().unwrap_or_default();
            *l = Some(String::from_utf8_lossy(line).into_owned());
        }
    }
}

/// Threads reading the answers of publishes sent on a connection each.
const ONE_SHOT_READERS: usize = 2;
/// Longest wait for the answer of a publish sent on its own connection.
const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishing to a server that closes every connection after one answer:
/// each publish opens its own connection, writes its request and hands the
/// socket to a reader thread (at most `--pipeline-depth` unanswered).
struct OneShot {
    tx: mpsc::Sender<(TcpStream, Pending)>,
    /// Sent and not yet answered (or given up).
    inflight: Arc<AtomicU64>,
}

impl OneShot {
    fn start(shared: &Arc<HttpShared>) -> Result<OneShot> {
        let (tx, rx) = mpsc::channel::<(TcpStream, Pending)>();
        let rx = Arc::new(Mutex::new(rx));
        let inflight = Arc::new(AtomicU64::new(0));
        for _ in 0..ONE_SHOT_READERS {
            let (rx, inflight, shared) = (rx.clone(), inflight.clone(), shared.clone());
            // Detached: each ends once the publisher (the sender) is gone.
            std::thread::Builder::new()
                .name("pub-http-oneshot".into())
                .spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((mut stream, pending)) = next else {
                        return;
                    };
                    let mut answered = false;
                    read_loop(&mut stream, |data| match parse_response(data) {
                        Response::Complete(code, used, _) => {
                            account(code, &data[..used], Some(pending), &shared);
                            answered = true;
                            Step::Stop
                        }
                        Response::Partial => Step::NeedMore,
                        Response::Invalid => Step::Stop,
                    });
                    if !answered {
                        shared.counters.write_failed.fetch_add(1, Relaxed);
                    }
                    inflight.fetch_sub(1, Relaxed);
                })?;
        }
        Ok(OneShot { tx, inflight })
    }

    /// Sends `request` on a new connection to `addr`, after waiting while
    /// `depth` publishes are unanswered.
    fn send(&self, addr: SocketAddr, request: &[u8], p: Pending, depth: u64, c: &PubCounters) {
        let deadline = now_ns() + ONE_SHOT_TIMEOUT.as_nanos() as u64;
        while self.inflight.load(Relaxed) >= depth && now_ns() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
        c.conns_per_request.fetch_add(1, Relaxed);
        let sent = TcpStream::connect(addr).and_then(|mut s| {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(ONE_SHOT_TIMEOUT))?;
            s.write_all(request)?;
            Ok(s)
        });
        match sent {
            Ok(s) => {
                self.inflight.fetch_add(1, Relaxed);
                if self.tx.send((s, p)).is_err() {
                    self.inflight.fetch_sub(1, Relaxed);
                    c.write_failed.fetch_add(1, Relaxed);
                }
            }
            Err(_) => {
                c.write_failed.fetch_add(1, Relaxed);
            }
        }
    }
}

fn ws_drain(stream: &mut TcpStream) {
    read_loop(stream, |data| match ws::decode(data) {
        Decoded::Complete(f) if f.opcode == ws::OP_CLOSE => Step::Stop,
        Decoded::Complete(f) => Step::Used(f.end()),
        Decoded::Partial => Step::NeedMore,
        Decoded::Invalid(_) => Step::Stop,
    });
}

/// What a parser made of the front of the read buffer.
enum Step {
    /// A complete item of this many bytes was handled.
    Used(usize),
    /// The rest is incomplete: read more.
    NeedMore,
    /// Stop reading (close frame, garbage).
    Stop,
}

/// Reads `stream` into one growing buffer and feeds it to `step` until the
/// stream ends or `step` says stop; incomplete tails are kept for the next read.
fn read_loop(stream: &mut TcpStream, mut step: impl FnMut(&[u8]) -> Step) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match stream.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let mut at = 0;
        loop {
            match step(&buf[at..have]) {
                Step::Used(used) => at += used,
                Step::NeedMore => break,
                Step::Stop => return,
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// An HTTP server that answers one request per connection with
    /// `Connection: close` (as sockudo's API does), then drains and closes.
    fn closing_server() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                count.fetch_add(1, Relaxed);
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One whole request: its head and Content-Length body.
                    loop {
                        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .split("content-length: ")
                                .nth(1)
                                .and_then(|v| v.split("\r\n").next())
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
                    );
                    let _ = s.shutdown(Shutdown::Write);
                    while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
                });
            }
        });
        (addr, accepted)
    }

    #[test]
    fn a_server_that_closes_after_each_answer_gets_a_connection_per_publish() {
        let (addr, accepted) = closing_server();
        let counters = Arc::new(PubCounters::new(2));
        let mut p = Publisher::connect(
            0,
            1,
            addr,
            Via::Pusher {
                url: format!("http://{addr}/apps/4711/events"),
                app: pusher::App::parse("4711:app-key:app-secret").unwrap(),
            },
            vec!["t0".into(), "t1".into()],
            64,
            16,
            counters.clone(),
            Arc::new(vec![3, 4]),
        )
        .unwrap();
        let t0 = now_ns();
        let plan = Plan {
            epoch: 1,
            t0,
            measure_start: t0,
            end: t0 + 300_000_000,
            rate: 400.0,
        };
        p.run(&plan);
        let deadline = now_ns() + 5_000_000_000;
        while counters.unanswered() > 0 && now_ns() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = |c: &AtomicU64| c.load(Relaxed);
        let attempted = n(&counters.attempted);
        assert!(attempted >= 100, "{attempted} publishes");
        assert_eq!(n(&counters.sent), attempted, "every publish answered once");
        assert_eq!(n(&counters.write_failed), 0);
        assert_eq!(n(&counters.rejected), 0);
        // The first went on the keep-alive connection; from its answer on,
        // one connection each (and nothing sent twice).
        assert!(n(&counters.conns_per_request) >= attempted - 16);
        assert_eq!(
            n(&accepted),
            1 + n(&counters.conns_per_request),
            "one connection per publish after the first"
        );
        assert_eq!(
            n(&counters.expected),
            (0..attempted)
                .map(|k| if k % 2 == 0 { 3 } else { 4 })
                .sum::<u64>()
        );
    }

    #[test]
    fn pipelined_responses_with_length_and_chunked_bodies_parse() {
        let a = b"HTTP/1.1 202 Accepted\r\nContent-Length: 22\r\n\r\n{\"delivered_shards\":1}";
        assert_eq!(parse_response(a), Response::Complete(202, a.len(), false));
        assert_eq!(parse_response(&a[..a.len() - 1]), Response::Partial);
        let c = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1";
        assert_eq!(
            parse_response(c),
            Response::Complete(201, c.len() - 8, false)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Response::Complete(204, 27, false)
        );
        let closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_response(closing),
            Response::Complete(200, closing.len(), true)
        );
        assert_eq!(parse_response(b"garbage\r\n\r\n"), Response::Invalid);
    }
}
