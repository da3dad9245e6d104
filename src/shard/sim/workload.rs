//! The simulation's workload: the random steps a run takes (clients
//! connecting, calling, breaking the protocol; faults; the bus, the kernel
//! and time moving) and the calls they make.

use super::*;

impl Sim {
    // ---- choices -----------------------------------------------------------

    pub(super) fn pick(&mut self, n: usize) -> usize {
        self.choices.below(n)
    }

    pub(super) fn one_in(&mut self, n: usize) -> bool {
        self.pick(n) == 0
    }

    pub(super) fn weighted(&mut self, weights: &[usize]) -> usize {
        let total: usize = weights.iter().sum();
        let mut x = self.pick(total);
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    pub(super) fn pick_from<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.pick(items.len());
        Some(items[i].clone())
    }

    /// A topic in play: plain (`t0`, ...) or, in a stream run, a stream (`s:0`, ...).
    pub(super) fn topic(&mut self) -> String {
        let plain = self.params.topics;
        let i = self.pick(plain + self.stream_topics());
        topic_name(plain, i)
    }

    /// Every topic in play, plain ones first.
    pub(super) fn all_topics(&self) -> Vec<String> {
        let plain = self.params.topics;
        (0..plain + self.stream_topics())
            .map(|i| topic_name(plain, i))
            .collect()
    }

    pub(super) fn stream_topics(&self) -> usize {
        self.params.streams.as_ref().map_or(0, |s| s.topics)
    }

    pub(super) fn user(&mut self) -> String {
        format!("u{}", self.pick(self.params.users))
    }

    pub(super) fn mask(&mut self) -> [u8; 4] {
        self.masks = self.masks.wrapping_add(1);
        (crate::shard::state::splitmix64(self.masks) as u32).to_le_bytes()
    }

    pub(super) fn clients_where(&self, keep: impl Fn(&Client) -> bool) -> Vec<usize> {
        (0..self.clients.len())
            .filter(|&c| keep(&self.clients[c]))
            .collect()
    }

    // ---- steps -------------------------------------------------------------

    pub(super) fn step(&mut self, weights: &[usize; 8]) {
        self.steps += 1;
        let kind = STEP_KINDS[self.weighted(weights)];
        match kind {
            StepKind::Open => self.open_random(),
            StepKind::Ws => self.ws_random(),
            StepKind::Transmit => {
                self.transmit_random(false);
            }
            // Bursts, as a real shard drains its queues and completions in
            // batches: one at a time, the bus could not keep up with four
            // shards' control traffic and every reply would come at the end.
            StepKind::Deliver => {
                for _ in 0..1 + self.pick(6) {
                    self.deliver_random();
                }
            }
            StepKind::Kernel => {
                for _ in 0..1 + self.pick(3) {
                    self.kernel_random(false);
                }
            }
            StepKind::Fault => self.fault_random(),
            StepKind::Time => {
                let ms = 100 + self.pick(1900) as u64;
                self.advance(Duration::from_millis(ms));
            }
            StepKind::Pass => self.pass(),
        }
        self.after_step();
    }

    /// One turn of a real driver on a random shard: some of its sends
    /// complete (possibly in part), then some envelopes arrive, and only
    /// then are sends submitted again. A partly sent frame's tail waits
    /// outside a send meanwhile, while new pushes may find the queue over
    /// budget.
    pub(super) fn pass(&mut self) {
        let s = self.pick(self.shards.len());
        self.flush(s);
        let sending: Vec<_> = self.shards[s]
            .conns
            .iter()
            .filter(|(_, c)| c.plan.is_some() && !self.clients[c.client].stalled)
            .map(|(key, _)| key)
            .collect();
        for _ in 0..self.pick(4) {
            let Some(key) = self.pick_from(&sending) else {
                break;
            };
            if let Some(bytes) = self.in_flight(s, key) {
                // A send of a non-empty buffer takes at least one byte.
                let taken = 1 + self.pick(bytes.len());
                self.note(format!(
                    "#{} pass s{s}: send took {taken} of {}",
                    self.steps,
                    bytes.len()
                ));
                self.complete_send(s, key, SendResult::Took(taken));
            }
        }
        for _ in 0..self.pick(6) {
            let from = self.pick(self.shards.len());
            self.deliver(from, s);
        }
        self.flush(s);
    }

    /// What every step ends with: control backlogs retried, sends handed to
    /// the kernel, and each state's invariants. A shard's sends are
    /// sometimes held back, as the real driver submits them only at the end
    /// of a pass that may handle several completions and envelopes first
    /// (a partly sent frame's tail then waits outside a send).
    pub(super) fn after_step(&mut self) {
        for s in 0..self.shards.len() {
            if self.pick(3) != 0 {
                self.flush(s);
            }
            self.shards[s].state.wake_peers();
        }
        for s in 0..self.shards.len() {
            if let Err(e) = self.shards[s].state.check_invariants() {
                self.fail(format!("shard {s} invariant: {e}"));
            }
            if let Err(e) = self.shards[s].check_outbound(self.budget) {
                self.fail(format!("shard {s} driver: {e}"));
            }
        }
    }

    pub(super) fn open_random(&mut self) {
        // A client that left often comes back for its streams.
        if !self.resumes.is_empty() && self.one_in(3) {
            return self.open_resume();
        }
        // Sometimes an idle keep-alive connection sends another request
        // instead: the only way to reach a shard that stopped accepting.
        let idle = self.clients_where(|c| {
            !c.ws && c.can_send() && c.pending.is_empty() && c.fed == c.out.len()
        });
        if !idle.is_empty() && self.one_in(4) {
            let c = idle[self.pick(idle.len())];
            let kind = 3 + self.pick(6);
            let call = self.random_http_call(kind);
            self.note(format!("#{} c{c} sends {call:?}", self.steps));
            let close = self.one_in(3);
            self.write_http(c, call, close, None);
            return;
        }
        let s = self.pick(self.shards.len());
        let weights = self.params.profile.open_weights();
        let live: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deletes_fed.is_empty())
            .collect();
        match self.weighted(&weights) {
            0 => {
                let pipelined = self.random_pipelined();
                self.open_ws(s, Upgrade::Anonymous, pipelined);
            }
            1 => {
                let user = self.user();
                let pipelined = self.random_pipelined();
                self.open_ws(s, Upgrade::User(user), pipelined);
            }
            2 if !self.registrations.is_empty() => {
                // Mostly live registrations; sometimes one that was deleted.
                let r = match self.pick_from(&live) {
                    Some(r) if !self.one_in(4) => r,
                    _ => self.pick(self.registrations.len()),
                };
                self.open_ws(s, Upgrade::Registration(r), Vec::new());
            }
            kind => {
                let count = 1 + usize::from(self.one_in(3)) + usize::from(self.one_in(6));
                let mut calls = Vec::with_capacity(count);
                for i in 0..count {
                    let kind = if i == 0 { kind } else { 3 + self.pick(6) };
                    calls.push(self.random_http_call(kind));
                }
                let close = self.one_in(2);
                self.open_http(s, calls, close);
            }
        }
    }

    /// An HTTP call of the open-kind index `kind` (3.. of `open_weights`).
    pub(super) fn random_http_call(&mut self, kind: usize) -> HttpCall {
        let pad = if self.one_in(4) {
            300 + self.pick(1200)
        } else {
            0
        };
        match kind {
            4 => HttpCall::Publish {
                topic: self.topic(),
                user: Some(self.user()),
                pad,
            },
            5 | 2 => {
                let user = self.user();
                let topics = self.random_topics(3);
                HttpCall::Register { user, topics }
            }
            6 if !self.registrations.is_empty() => HttpCall::Delete {
                registration: self.pick(self.registrations.len()),
            },
            7 if self.stream_topics() > 0 && self.one_in(2) => self.random_history_call(),
            7 => HttpCall::Presence {
                topic: self.topic(),
            },
            8 => HttpCall::Health,
            _ => HttpCall::Publish {
                topic: self.topic(),
                user: None,
                pad,
            },
        }
    }

    pub(super) fn random_topics(&mut self, max: usize) -> Vec<String> {
        let count = self.pick(max + 1);
        let mut topics = Vec::new();
        for _ in 0..count {
            let topic = self.topic();
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        topics
    }

    /// Frames some clients send right behind their upgrade request, before
    /// the `101`: the state must park them until the upgrade is done.
    pub(super) fn random_pipelined(&mut self) -> Vec<WsCall> {
        if !self.one_in(4) {
            return Vec::new();
        }
        let mut calls = Vec::new();
        for _ in 0..1 + self.pick(2) {
            calls.push(match self.pick(4) {
                0 => WsCall::Close(1000),
                1 => WsCall::Publish {
                    topic: self.topic(),
                    pad: 0,
                },
                _ => WsCall::Subscribe(self.topic()),
            });
        }
        calls
    }

    pub(super) fn ws_random(&mut self) {
        let candidates = self.clients_where(|c| c.ws && c.can_send());
        let Some(c) = self.pick_from(&candidates) else {
            return;
        };
        let observed: Vec<String> = self.clients[c].observed.iter().cloned().collect();
        let call = match self.weighted(&[8, 2, 2, 5, 1, 1, 1, 1, 1, 2]) {
            0 => {
                let topic = self.topic();
                if is_stream_topic(&topic) && self.one_in(3) {
                    let since = self.random_position(&topic);
                    WsCall::SubscribeAt(topic, since)
                } else {
                    WsCall::Subscribe(topic)
                }
            }
            9 => {
                // Leaving and rejoining at once: the rejoin's interest notice
                // has a new epoch while acks for the old one are in flight.
                let topic = match self.pick_from(&observed) {
                    Some(topic) => topic,
                    None => self.topic(),
                };
                self.ws(c, WsCall::Unsubscribe(topic.clone()));
                WsCall::Subscribe(topic)
            }
            1 => match self.pick_from(&observed) {
                Some(topic) if !self.one_in(4) => WsCall::Unsubscribe(topic),
                _ => WsCall::Unsubscribe(self.topic()),
            },
            2 => {
                let topics = self.random_topics(MAX_SUBSCRIPTIONS + 1);
                let mut at = Vec::with_capacity(topics.len());
                for topic in topics {
                    let since = (is_stream_topic(&topic) && self.one_in(2))
                        .then(|| self.random_position(&topic));
                    at.push((topic, since));
                }
                WsCall::SetTopicsAt(at)
            }
            3 => {
                let topic = match self.pick_from(&observed) {
                    Some(topic) if !self.one_in(4) => topic,
                    _ => self.topic(),
                };
                let pad = if self.one_in(4) { self.pick(1500) } else { 0 };
                WsCall::Publish { topic, pad }
            }
            4 => WsCall::Presence(self.topic()),
            5 => WsCall::Ping,
            6 => WsCall::PingText,
            7 => WsCall::Binary,
            _ => WsCall::BadJson,
        };
        self.ws(c, call);
        if self.one_in(2) {
            self.transmit_random_of(c);
        }
    }

    pub(super) fn fault_random(&mut self) {
        let alive = self.clients_where(|c| c.ended.is_none() && !c.reset);
        let Some(c) = self.pick_from(&alive) else {
            return;
        };
        match self.weighted(&[2, 2, 6, 2, 2, 1]) {
            0 => self.reset(c),
            1 => self.end_input(c),
            2 => {
                let stalled = !self.clients[c].stalled;
                self.set_stalled(c, stalled);
            }
            3 if self.clients[c].ws && self.clients[c].can_send() => {
                let code = if self.one_in(2) { 1000 } else { 4000 };
                self.ws(c, WsCall::Close(code));
            }
            4 => self.flood(),
            _ if self.clients[c].ws && self.clients[c].can_send() => {
                self.ws(c, WsCall::Unmasked);
            }
            _ => {}
        }
    }

    /// The solo slow consumer: a subscriber stops reading and publishes to
    /// its own topic until its queue passes the budget, so the fan-out of
    /// its own publish finds it over budget (this once freed the topic in
    /// the middle of that fan-out and killed the shard).
    pub(super) fn flood(&mut self) {
        let candidates = self.clients_where(|c| c.ws && c.can_send() && !c.observed.is_empty());
        let Some(c) = self.pick_from(&candidates) else {
            return;
        };
        let topics: Vec<String> = self.clients[c].observed.iter().cloned().collect();
        let Some(topic) = self.pick_from(&topics) else {
            return;
        };
        self.set_stalled(c, true);
        let count = 3 + self.pick(4);
        for _ in 0..count {
            let pad = 700 + self.pick(600);
            self.ws(
                c,
                WsCall::Publish {
                    topic: topic.clone(),
                    pad,
                },
            );
        }
        self.transmit_all(c);
    }

    // ---- opening connections -----------------------------------------------

    /// Accepts a connection for a new client on `shard`; `None` if the shard
    /// no longer accepts (it is shutting down).
    pub(super) fn connect(&mut self, s: usize, label: String) -> Option<usize> {
        let c = self.clients.len();
        let key = self.accept(s, c)?;
        self.note(format!("#{} open c{c} on s{s}: {label}", self.steps));
        self.clients.push(Client::new(s, key, label));
        self.feed(s, Event::Opened(key));
        Some(c)
    }

    /// Opens a WebSocket client on shard `s`; `pipelined` frames follow the
    /// upgrade request at once. Returns the client, if the shard accepted.
    pub fn open_ws(&mut self, s: usize, upgrade: Upgrade, pipelined: Vec<WsCall>) -> Option<usize> {
        let (path, user, registration, topics) = match &upgrade {
            Upgrade::Anonymous => ("/ws".to_string(), None, None, Vec::new()),
            Upgrade::User(user) => (
                format!("/ws?user_id={user}"),
                Some(user.clone()),
                None,
                Vec::new(),
            ),
            Upgrade::Registration(r) => {
                let reg = self.registrations.get(*r)?;
                let path = format!("/ws/{}", reg.id);
                (path, Some(reg.user.clone()), Some(*r), reg.topics.clone())
            }
        };
        let label = if pipelined.is_empty() {
            format!("GET {path}")
        } else {
            format!("GET {path} + {pipelined:?}")
        };
        let c = self.connect(s, label)?;
        self.clients[c].user = user;
        // The server subscribes a registration's topics right after its `101`.
        for topic in &topics {
            self.clients[c].sent_subscribe(topic, None, MAX_SUBSCRIPTIONS);
        }
        self.clients[c].write_request(
            Req::Upgrade { registration },
            &client::upgrade_request(&path),
        );
        for call in pipelined {
            self.ws(c, call);
        }
        Some(c)
    }

    /// Opens an HTTP client on shard `s` that sends `calls` pipelined, the
    /// last with `Connection: close` if `close`.
    pub fn open_http(&mut self, s: usize, calls: Vec<HttpCall>, close: bool) -> Option<usize> {
        let label = format!("HTTP {calls:?}{}", if close { " close" } else { "" });
        let c = self.connect(s, label)?;
        let count = calls.len();
        for (i, call) in calls.into_iter().enumerate() {
            let last = close && i + 1 == count;
            self.write_http(c, call, last, None);
        }
        Some(c)
    }

    pub(super) fn write_http(
        &mut self,
        c: usize,
        call: HttpCall,
        close: bool,
        expect: Option<usize>,
    ) {
        let (req, bytes) = match call {
            HttpCall::Publish { topic, user, pad } => {
                let id = self.publishes.len();
                self.publishes.push(Publish {
                    topic: topic.clone(),
                    user: user.clone(),
                    http: true,
                    first_fed: None,
                    accepted: false,
                    written_at: self.elapsed,
                });
                let user = user.map_or(String::new(), |u| format!(",\"user_id\":\"{u}\""));
                let body = format!(
                    "{{\"topic\":\"{topic}\",\"event\":\"h\",\"payload\":{}{user}}}",
                    payload(id, pad)
                );
                (
                    Req::Publish { id },
                    client::http_request("POST", "/publish", Some(&body), close),
                )
            }
            HttpCall::Register { user, topics } => {
                let list: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
                let body = format!("{{\"user_id\":\"{user}\",\"topics\":[{}]}}", list.join(","));
                (
                    Req::Register { user, topics },
                    client::http_request("POST", "/register", Some(&body), close),
                )
            }
            HttpCall::Delete { registration } => {
                let path = match self.registrations.get(registration) {
                    Some(reg) => format!("/register/{}", reg.id),
                    None => return,
                };
                (
                    Req::Delete { registration },
                    client::http_request("DELETE", &path, None, close),
                )
            }
            HttpCall::Presence { topic } => {
                let path = format!("/topics/{topic}/presence");
                (
                    Req::Presence { topic, expect },
                    client::http_request("GET", &path, None, close),
                )
            }
            HttpCall::Health => (
                Req::Health,
                client::http_request("GET", "/health", None, close),
            ),
            HttpCall::History {
                topic,
                since,
                epoch,
                limit,
            } => {
                let mut query = Vec::new();
                if let Some(since) = since {
                    query.push(format!("since={since}"));
                }
                if let Some(epoch) = &epoch {
                    query.push(format!("epoch={epoch}"));
                }
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                let path = if query.is_empty() {
                    format!("/topics/{topic}/history")
                } else {
                    format!("/topics/{topic}/history?{}", query.join("&"))
                };
                (
                    Req::History {
                        topic,
                        since,
                        epoch,
                        limit,
                        probe: expect.is_some(),
                    },
                    client::http_request("GET", &path, None, close),
                )
            }
        };
        self.clients[c].write_request(req, &bytes);
    }

    // ---- WebSocket messages ------------------------------------------------

    /// Client `c` sends `call` (queued; transmit steps feed it).
    pub fn ws(&mut self, c: usize, call: WsCall) {
        if !self.clients[c].can_send() {
            return;
        }
        if !matches!(call, WsCall::Publish { .. }) {
            self.note(format!("#{} c{c} sends {call:?}", self.steps));
        }
        let text = match &call {
            WsCall::Subscribe(topic) => {
                self.clients[c].sent_subscribe(topic, None, MAX_SUBSCRIPTIONS);
                format!("{{\"type\":\"subscribe\",\"topic\":\"{topic}\"}}")
            }
            WsCall::SubscribeAt(topic, since) => {
                self.clients[c].sent_subscribe(topic, Some(since.clone()), MAX_SUBSCRIPTIONS);
                format!(
                    "{{\"type\":\"subscribe\",\"topic\":\"{topic}\",\"since\":{}}}",
                    since_json(since)
                )
            }
            WsCall::Unsubscribe(topic) => {
                self.clients[c].sent_unsubscribe(topic);
                format!("{{\"type\":\"unsubscribe\",\"topic\":\"{topic}\"}}")
            }
            WsCall::SetTopics(topics) => {
                let at: Vec<_> = topics.iter().map(|t| (t.clone(), None)).collect();
                self.clients[c].sent_set_topics(&at, MAX_SUBSCRIPTIONS);
                let list: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
                format!("{{\"topics\":[{}]}}", list.join(","))
            }
            WsCall::SetTopicsAt(topics) => {
                self.clients[c].sent_set_topics(topics, MAX_SUBSCRIPTIONS);
                let list: Vec<String> = topics
                    .iter()
                    .map(|(t, since)| match since {
                        Some(since) => {
                            format!("{{\"topic\":\"{t}\",\"since\":{}}}", since_json(since))
                        }
                        None => format!("\"{t}\""),
                    })
                    .collect();
                format!("{{\"topics\":[{}]}}", list.join(","))
            }
            WsCall::Publish { topic, pad } => {
                let id = self.publishes.len();
                self.publishes.push(Publish {
                    topic: topic.clone(),
                    user: None,
                    http: false,
                    first_fed: None,
                    accepted: false,
                    written_at: self.elapsed,
                });
                format!(
                    "{{\"type\":\"message\",\"topic\":\"{topic}\",\"event\":\"m\",\"payload\":{}}}",
                    payload(id, *pad)
                )
            }
            WsCall::Presence(topic) => format!("{{\"type\":\"presence\",\"topic\":\"{topic}\"}}"),
            WsCall::Ping => "{\"type\":\"ping\"}".to_string(),
            WsCall::PingText => "ping".to_string(),
            WsCall::BadJson => "{nope".to_string(),
            WsCall::Binary => {
                let mask = self.mask();
                let frame = client::masked_frame(true, OP_BINARY, b"\x01\x02", mask);
                self.clients[c].out.extend_from_slice(&frame);
                return;
            }
            WsCall::Unmasked => {
                // RFC 6455 5.1: the server must fail the connection. The
                // client expects nothing more but a close frame.
                let client = &mut self.clients[c];
                client.out.extend_from_slice(b"\x81\x02hi");
                client.close_sent = true;
                client.drop_all();
                return;
            }
            WsCall::Close(code) => {
                self.keep_positions(c);
                let mask = self.mask();
                let frame =
                    client::masked_frame(true, OP_CLOSE, &client::close_payload(*code), mask);
                let client = &mut self.clients[c];
                client.out.extend_from_slice(&frame);
                client.close_sent = true;
                client.drop_all();
                return;
            }
        };
        self.ws_text(c, text.as_bytes());
    }

    /// Writes a text message, sometimes fragmented with a ping between the
    /// fragments (control frames may interleave, RFC 6455 5.4).
    pub(super) fn ws_text(&mut self, c: usize, text: &[u8]) {
        if text.len() < 2 || !self.one_in(6) {
            let mask = self.mask();
            let frame = client::masked_frame(true, OP_TEXT, text, mask);
            self.clients[c].out.extend_from_slice(&frame);
            return;
        }
        let cut = 1 + self.pick(text.len() - 1);
        let (first, rest) = text.split_at(cut);
        let mut bytes = client::masked_frame(false, OP_TEXT, first, self.mask());
        if self.one_in(2) {
            bytes.extend(client::masked_frame(true, OP_PING, b"sim", self.mask()));
        }
        bytes.extend(client::masked_frame(true, OP_CONT, rest, self.mask()));
        self.clients[c].out.extend_from_slice(&bytes);
    }

    // ---- feeding client bytes ----------------------------------------------

    pub(super) fn transmit_random(&mut self, whole: bool) -> bool {
        let candidates = self.clients_where(|c| {
            c.ended.is_none() && !c.reset && (c.fed < c.out.len() || c.eof_requested && !c.eof_fed)
        });
        let Some(c) = self.pick_from(&candidates) else {
            return false;
        };
        if whole {
            self.transmit_all(c);
        } else {
            self.transmit_random_of(c);
        }
        true
    }

    /// Feeds a random part of client `c`'s unsent bytes (all of it, half the time).
    pub(super) fn transmit_random_of(&mut self, c: usize) {
        let remaining = self.clients[c].out.len() - self.clients[c].fed;
        let n = if remaining == 0 || self.one_in(2) {
            remaining
        } else {
            1 + self.pick(remaining)
        };
        self.transmit(c, n);
    }

    /// Feeds everything client `c` has written, then its end of input if it
    /// asked for one.
    pub fn transmit_all(&mut self, c: usize) {
        let remaining = self.clients[c].out.len() - self.clients[c].fed;
        self.transmit(c, remaining);
    }

    pub(super) fn transmit(&mut self, c: usize, n: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        if self.clients[c].ended.is_some() || self.clients[c].reset {
            return;
        }
        if n > 0 {
            self.seq += 1;
            let seq = self.seq;
            let client = &mut self.clients[c];
            let chunk = client.out[client.fed..client.fed + n].to_vec();
            client.fed += n;
            let fed = client.fed;
            let mut publishes = Vec::new();
            let mut deletes = Vec::new();
            for pending in client.pending.iter_mut() {
                if pending.first_fed.is_none() && pending.start < fed {
                    pending.first_fed = Some(seq);
                    match pending.req {
                        Req::Publish { id } => publishes.push(id),
                        Req::Delete { registration } => deletes.push(registration),
                        _ => {}
                    }
                }
            }
            for id in publishes {
                self.publishes[id].first_fed = Some(seq);
            }
            for r in deletes {
                self.registrations[r].deletes_fed.push(seq);
            }
            let delivered = self.reads(s, key);
            self.note(format!(
                "#{} c{c} -> s{s}: {n} bytes{}",
                self.steps,
                if delivered {
                    ""
                } else {
                    " (dropped: shut down)"
                }
            ));
            if delivered {
                self.feed(s, Event::Input(key, &chunk));
            }
        }
        let client = &mut self.clients[c];
        if client.eof_requested && !client.eof_fed && client.fed == client.out.len() {
            client.eof_fed = true;
            if self.reads(s, key) {
                self.note(format!("#{} c{c} -> s{s}: end of input", self.steps));
                self.feed(s, Event::InputEnded(key));
            }
        }
    }

    // ---- faults --------------------------------------------------------------

    /// Client `c` resets its connection: the driver shuts it down at once.
    pub fn reset(&mut self, c: usize) {
        if self.clients[c].ended.is_some() || self.clients[c].reset {
            return;
        }
        self.keep_positions(c);
        let client = &mut self.clients[c];
        client.reset = true;
        client.drop_all();
        let (s, key) = (client.shard, client.key);
        self.note(format!("#{} reset c{c}", self.steps));
        self.terminate(s, key, false);
    }

    /// Client `c` half-closes once its output is sent.
    pub fn end_input(&mut self, c: usize) {
        if self.clients[c].eof_requested {
            return;
        }
        self.keep_positions(c);
        let client = &mut self.clients[c];
        client.eof_requested = true;
        client.drop_all();
        self.note(format!("#{} c{c} will half-close", self.steps));
    }

    /// Client `c` stops (or resumes) reading.
    pub fn set_stalled(&mut self, c: usize, stalled: bool) {
        self.clients[c].stalled = stalled;
        self.note(format!(
            "#{} c{c} {}",
            self.steps,
            if stalled { "stalls" } else { "reads again" }
        ));
    }

    // ---- bus, kernel and time ----------------------------------------------

    /// Delivers one envelope: a random receiver with mail, a random source
    /// queue of it. Returns false if the bus is empty.
    pub(super) fn deliver_random(&mut self) -> bool {
        let n = self.shards.len();
        let bus = self.shared.bus().clone();
        let with_mail: Vec<usize> = (0..n).filter(|&to| bus.has_mail(ShardId(to))).collect();
        let Some(to) = self.pick_from(&with_mail) else {
            return false;
        };
        let start = self.pick(n);
        (0..n).any(|i| self.deliver((start + i) % n, to).is_some())
    }

    /// Delivers the oldest envelope from shard `from` to shard `to`;
    /// returns what it was, or `None` if that queue is empty.
    pub fn deliver(&mut self, from: usize, to: usize) -> Option<String> {
        let envelope = self.shared.bus().pop(ShardId(from), ShardId(to))?;
        let what = describe(&envelope);
        self.note(format!("#{} bus s{from} -> s{to}: {what}", self.steps));
        if matches!(envelope, Envelope::Shutdown) {
            self.driver_begin_shutdown(to);
        }
        self.feed(to, Event::Envelope(ShardId(from), envelope));
        Some(what)
    }

    /// The kernel takes `n` bytes of client `c`'s next send and hands them to
    /// it; the rest waits, not yet handed back to the kernel.
    pub fn read_partly(&mut self, c: usize, n: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        self.flush(s);
        if self.in_flight(s, key).is_some() {
            self.complete_send(s, key, SendResult::Took(n));
        }
    }

    /// Client `c` reads everything queued for it: its sends are handed to
    /// the kernel and completed whole until nothing is left.
    pub fn read_all(&mut self, c: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        loop {
            self.flush(s);
            match self.in_flight(s, key) {
                Some(bytes) => self.complete_send(s, key, SendResult::Took(bytes.len())),
                None => break,
            }
        }
    }

    /// The kernel completes one send or shutdown. `drain` ignores stalls.
    pub(super) fn kernel_random(&mut self, drain: bool) -> bool {
        let mut work = Vec::new();
        for s in 0..self.shards.len() {
            let clients = &self.clients;
            let stalled = |c: usize| !drain && clients[c].stalled;
            work.extend(
                self.shards[s]
                    .kernel_work(stalled)
                    .into_iter()
                    .map(|k| (s, k)),
            );
        }
        let Some((s, key)) = self.pick_from(&work) else {
            return false;
        };
        let Some(conn) = self.shards[s].conns.get(key) else {
            return false;
        };
        let (client, shutting_down) = (conn.client, conn.io.is_shut_down());
        match self.in_flight(s, key) {
            Some(bytes) => {
                let len = bytes.len();
                let result = if shutting_down && self.one_in(2) {
                    SendResult::Failed
                } else if shutting_down {
                    SendResult::Took(1 + self.pick(len))
                } else if self.one_in(2) {
                    SendResult::Took(len)
                } else {
                    SendResult::Took(1 + self.pick(len))
                };
                self.note(format!(
                    "#{} kernel s{s}/c{client}: {result:?} of {len}",
                    self.steps
                ));
                self.complete_send(s, key, result);
            }
            None => {
                self.note(format!(
                    "#{} kernel s{s}/c{client}: shutdown done",
                    self.steps
                ));
                self.complete_shutdown(s, key);
            }
        }
        true
    }

    /// Time passes; every shard ticks, in a random order.
    pub fn advance(&mut self, by: Duration) {
        self.elapsed += by;
        self.note(format!(
            "#{} time +{}ms = {:.1}s",
            self.steps,
            by.as_millis(),
            self.elapsed.as_secs_f64()
        ));
        let n = self.shards.len();
        let start = self.pick(n);
        for i in 0..n {
            self.tick((start + i) % n);
        }
    }

    /// A few publishes on random shards, some only partly sent: a shutdown
    /// under load finds them on the bus or still arriving.
    pub(super) fn publish_storm(&mut self) {
        for _ in 0..1 + self.pick(4) {
            let s = self.pick(self.shards.len());
            let calls = (0..1 + self.pick(2))
                .map(|_| HttpCall::Publish {
                    topic: self.topic(),
                    user: None,
                    pad: 0,
                })
                .collect();
            if let Some(c) = self.open_http(s, calls, false) {
                self.transmit_random_of(c);
            }
        }
        for _ in 0..self.pick(4) {
            self.deliver_random();
        }
    }

    /// Asks every shard to shut down gracefully, as the process does.
    pub fn begin_shutdown(&mut self) {
        self.note(format!("#{} graceful shutdown begins", self.steps));
        self.shutdown_started = true;
        self.shared.bus().shutdown_all();
    }
}
