//! The simulation's checkers: what clients read, checked strictly as it
//! arrives, and the invariants checked once a run is quiet.

use super::*;

impl Sim {
    // ---- what clients read ---------------------------------------------------

    /// The kernel handed `bytes` to client `c`.
    pub(super) fn client_receive(&mut self, c: usize, bytes: &[u8]) {
        let client = &mut self.clients[c];
        if bytes.is_empty() || client.reset {
            return;
        }
        client.inbuf.extend_from_slice(bytes);
        loop {
            match self.clients[c].next_inbound() {
                Ok(Some(inbound)) => self.on_inbound(c, inbound),
                Ok(None) => break,
                Err(_) if self.lost_101(c) => {
                    // A known driver fault, reported: a batch that passes the
                    // budget before the `101` is sent (a pipelined subscribe
                    // recovering on its home queues the replay behind it)
                    // drops the queued `101` too, then sends 1013 as a frame
                    // to a client still reading HTTP. It gives up (resets).
                    self.note(format!("  c{c} lost its 101 to an overflow"));
                    self.lost_upgrades += 1;
                    self.clients[c].inbuf.clear();
                    self.reset(c);
                    break;
                }
                Err(e) => {
                    let label = self.clients[c].label.clone();
                    self.fail(format!("c{c} ({label}) read garbage: {e}"));
                    self.clients[c].inbuf.clear();
                    break;
                }
            }
        }
    }

    /// Whether client `c`, over its budget before reading its `101`, got a
    /// close frame instead.
    pub(super) fn lost_101(&self, c: usize) -> bool {
        let client = &self.clients[c];
        client.overflowed
            && !client.ws
            && client.inbuf.first() == Some(&0x88)
            && matches!(
                client.pending.front().map(|p| &p.req),
                Some(Req::Upgrade { .. })
            )
    }

    pub(super) fn on_inbound(&mut self, c: usize, inbound: Inbound) {
        self.seq += 1;
        let client = &self.clients[c];
        if client.close_received.is_some() {
            return self.fail(format!("c{c} got {inbound:?} after a close frame"));
        }
        if client.close_response {
            return self.fail(format!("c{c} got {inbound:?} after `Connection: close`"));
        }
        match inbound {
            Inbound::Response {
                status,
                close,
                body,
            } => self.on_response(c, status, close, &body),
            Inbound::Frame { opcode, payload } => self.on_frame(c, opcode, &payload),
        }
    }

    pub(super) fn on_response(&mut self, c: usize, status: u16, close: bool, body: &[u8]) {
        let seq = self.seq;
        let Some(pending) = self.clients[c].pending.pop_front() else {
            return self.fail(format!("c{c} got a {status} it did not ask for"));
        };
        self.note(format!(
            "  c{c} reads {status}{}",
            if close { " (close)" } else { "" }
        ));
        if close {
            self.clients[c].close_response = true;
        }
        if self.clients[c].overflowed && !matches!(pending.req, Req::Upgrade { .. }) {
            // Over its budget, the connection's queued answers were dropped,
            // but one queued with its close still goes: it may answer a
            // later request than the one it would be matched with.
            return;
        }
        let fed = pending.first_fed.unwrap_or(u64::MAX);
        let body_text = String::from_utf8_lossy(body).into_owned();
        let unexpected = |what: &str| format!("c{c}: {what} answered {status} {body_text}");
        match (&pending.req, status) {
            (_, 408) if close => {}
            // A full shard refuses with `Connection: close`; shutdown refuses
            // publishes; busy or full registries and presence refuse too.
            (_, 503) if close || self.shutdown_started => {}
            (Req::Register { .. } | Req::Delete { .. } | Req::Presence { .. }, 503) => {}
            // A stream publish travels to its home as a publish, which a
            // full bus queue drops (counted): the publisher is told.
            (Req::Publish { .. }, 503) if self.lossy() => {}
            (Req::Upgrade { registration }, 101) => {
                let client = &mut self.clients[c];
                client.ws = true;
                client.upgraded_at = Some(seq);
                let resume = std::mem::take(&mut client.resume);
                if !resume.is_empty() {
                    for call in self.resubscribe_calls(resume) {
                        self.ws(c, call);
                    }
                } else if self.params.auto_subscribe && !self.one_in(4) {
                    // What most clients do first.
                    let topic = self.topic();
                    self.ws(c, WsCall::Subscribe(topic));
                }
                if let Some(r) = *registration {
                    let reg = &self.registrations[r];
                    if reg.deleted_at.is_some_and(|d| d < fed) {
                        let id = reg.id.clone();
                        self.fail(format!("c{c}: /ws/{id} upgraded after its DELETE got 204"));
                    }
                }
            }
            (
                Req::Upgrade {
                    registration: Some(r),
                },
                404,
            ) => {
                // Any DELETE fed so far may have overtaken this upgrade.
                let reg = &self.registrations[*r];
                if reg.created_at < fed && reg.deletes_fed.is_empty() {
                    let id = reg.id.clone();
                    self.fail(format!(
                        "c{c}: /ws/{id} got 404 though registered and never deleted"
                    ));
                }
            }
            (Req::Publish { id }, 202) => {
                self.publishes[*id].accepted = true;
                self.on_publish_position(c, *id, body);
            }
            (Req::History { .. }, 200 | 404 | 410) => {
                self.on_history(c, &pending.req, status, body)
            }
            (Req::Register { user, topics }, 201) => {
                let id = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_string));
                match id {
                    Some(id) => self.registrations.push(Registration {
                        id,
                        user: user.clone(),
                        topics: topics.clone(),
                        created_at: seq,
                        deletes_fed: Vec::new(),
                        deleted_at: None,
                    }),
                    None => self.fail(unexpected("register (no id)")),
                }
            }
            (Req::Delete { registration }, 204) => {
                self.registrations[*registration]
                    .deleted_at
                    .get_or_insert(seq);
            }
            (Req::Delete { registration }, 404) => {
                // Only the sole DELETE of a registration must find it: two
                // concurrent ones may finish in either order.
                let reg = &self.registrations[*registration];
                if reg.created_at < fed && reg.deletes_fed.len() == 1 {
                    let id = reg.id.clone();
                    self.fail(format!("c{c}: the only DELETE of {id} got 404"));
                }
            }
            (Req::Presence { topic, expect }, 200) => {
                let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
                let count = parsed.as_ref().and_then(|v| v.get("count")?.as_u64());
                let members = parsed
                    .as_ref()
                    .and_then(|v| Some(v.get("members")?.as_array()?.len() as u64));
                match (count, members, expect) {
                    (Some(n), Some(m), _) if n != m => {
                        self.fail(unexpected("presence (count is not the members)"))
                    }
                    (Some(n), Some(_), Some(e)) if n != *e as u64 => self.fail(format!(
                        "c{c}: presence of {topic} is {n} at quiescence; {e} clients hold it"
                    )),
                    (Some(_), Some(_), _) => {}
                    _ => self.fail(unexpected("presence (bad body)")),
                }
            }
            (Req::Health, 200) => {}
            (req, _) => {
                let what = format!("{req:?}");
                self.fail(unexpected(&what));
            }
        }
        let client = &self.clients[c];
        if client.pending.is_empty()
            && !client.ws
            && !client.close_response
            && client.fed == client.out.len()
            && self.one_in(2)
        {
            self.clients[c].eof_requested = true;
        }
    }

    pub(super) fn on_frame(&mut self, c: usize, opcode: u8, payload: &[u8]) {
        match opcode {
            OP_TEXT => self.on_text(c, payload),
            OP_PING => {
                if !self.clients[c].close_sent {
                    let mask = self.mask();
                    let pong = client::masked_frame(true, OP_PONG, payload, mask);
                    self.clients[c].out.extend_from_slice(&pong);
                }
            }
            OP_PONG => {}
            OP_CLOSE => {
                let code = match payload {
                    [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                    _ => 1005,
                };
                self.note(format!("  c{c} reads close {code}"));
                let echo = self.one_in(3);
                let mask = self.mask();
                let client = &mut self.clients[c];
                client.close_received = Some(code);
                client.observed.clear();
                client.leaving = true;
                // After a graceful shutdown's 1001 the delivery check still
                // applies: everything acknowledged must precede this frame.
                if code != 1001 {
                    client.drop_all();
                }
                if !client.close_sent {
                    client.close_sent = true;
                    let reply = if echo { code } else { 1000 };
                    let frame =
                        client::masked_frame(true, OP_CLOSE, &client::close_payload(reply), mask);
                    client.out.extend_from_slice(&frame);
                }
            }
            _ => self.fail(format!("c{c} got a frame with opcode {opcode:#x} on /ws")),
        }
    }

    pub(super) fn on_text(&mut self, c: usize, payload: &[u8]) {
        if payload == b"pong" {
            return;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
            let text = String::from_utf8_lossy(payload).into_owned();
            return self.fail(format!("c{c} got a text frame that is not JSON: {text}"));
        };
        let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if self.verbose {
            self.note(format!("  c{c} reads {value}"));
        }
        let topic = value
            .get("topic")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string();
        let seq = self.seq;
        match kind {
            "subscribed" => {
                self.note(format!("  c{c} reads subscribed {topic}"));
                self.subscriptions += 1;
                self.on_subscribed_position(c, &topic, &value);
                self.clients[c].read_subscribed(&topic, seq);
            }
            "unsubscribed" => self.clients[c].read_unsubscribed(&topic),
            "push" => {
                let id = value
                    .get("payload")
                    .and_then(|p| p.get("id"))
                    .and_then(|i| i.as_u64())
                    .map(|i| i as usize);
                let Some(publish) = id.and_then(|id| self.publishes.get(id)) else {
                    return self.fail(format!("c{c} got a push of no known publish: {value}"));
                };
                let id = id.unwrap_or_default();
                let client = &self.clients[c];
                let violation = if !client.observed.contains(&topic) {
                    Some(format!("a push for {topic}, which it does not hold"))
                } else if publish.topic != topic {
                    Some(format!(
                        "publish {id} to {} as a push for {topic}",
                        publish.topic
                    ))
                } else if publish.user.is_some() && publish.user != client.user {
                    Some(format!("publish {id} for {:?}", publish.user))
                } else {
                    None
                };
                if let Some(violation) = violation {
                    let label = client.label.clone();
                    return self.fail(format!("c{c} ({label}) got {violation}"));
                }
                // A stream may send a publication again in a later
                // subscription of the same connection (a replay); within
                // one, its offsets tell a duplicate.
                let replayable = is_stream_topic(&topic) && publish.user.is_none();
                if !self.clients[c].received.insert(id) && !replayable {
                    return self.fail(format!("c{c} got publish {id} twice"));
                }
                self.pushes += 1;
                self.on_push_position(c, &topic, id, &value);
            }
            "presence" => {
                let count = value.get("count").and_then(|v| v.as_u64());
                let members = value
                    .get("members")
                    .and_then(|m| m.as_array())
                    .map(|m| m.len());
                if count.is_none() || count != members.map(|m| m as u64) {
                    self.fail(format!("c{c} got a bad presence answer: {value}"));
                }
            }
            "pong" | "error" => {}
            _ => self.fail(format!("c{c} got an unknown message: {value}")),
        }
    }

    /// The driver released client `c`'s connection.
    pub(super) fn client_ended(&mut self, c: usize, graceful: bool) {
        self.keep_positions(c);
        let shutdown = self.shutdown_started;
        let client = &mut self.clients[c];
        client.ended = Some(graceful);
        if client.close_received != Some(1001) {
            client.drop_all();
        }
        let label = client.label.clone();
        let unanswered = client.pending.iter().any(|p| p.end <= client.fed);
        let violation = if !graceful || client.reset {
            None
        } else if !client.inbuf.is_empty() {
            Some(format!(
                "ended after a flush with {} bytes of a cut frame or response",
                client.inbuf.len()
            ))
        } else if client.ws && client.close_received.is_none() {
            Some("a WebSocket ended after a flush without a close frame".into())
        } else if client.ws && client.owed_1013 && client.close_received != Some(1013) {
            Some(format!(
                "an overflowed WebSocket ended with close {:?}, not 1013",
                client.close_received
            ))
        } else if !client.ws
            && unanswered
            && !client.close_response
            && !client.overflowed
            && !shutdown
        {
            Some("an HTTP connection ended after a flush with a request unanswered".into())
        } else {
            None
        };
        self.note(format!(
            "  c{c} connection ended ({})",
            if graceful { "after flush" } else { "cut" }
        ));
        if let Some(violation) = violation {
            self.fail(format!("c{c} ({label}): {violation}"));
        }
    }

    // ---- quiescence ----------------------------------------------------------

    /// Runs without client initiative until nothing changes: every envelope
    /// delivered, every send completed (stalled clients read again), every
    /// byte clients wrote (answers to pings and close frames) fed.
    pub fn settle(&mut self) -> Result<(), String> {
        for client in &mut self.clients {
            client.stalled = false;
        }
        self.note(format!("#{} settle", self.steps));
        for _ in 0..MAX_SETTLE_ACTIONS {
            for s in 0..self.shards.len() {
                self.flush(s);
            }
            let progressed = match self.pick(3) {
                0 => {
                    self.deliver_random() || self.kernel_random(true) || self.transmit_random(true)
                }
                1 => {
                    self.kernel_random(true) || self.transmit_random(true) || self.deliver_random()
                }
                _ => {
                    self.transmit_random(true) || self.deliver_random() || self.kernel_random(true)
                }
            };
            self.after_step();
            self.take_violation()?;
            if !progressed && self.shards.iter().all(|s| s.state.control_backlog() == 0) {
                // Pushes held for the write delay go once it has passed:
                // time moves to the first due (a few milliseconds, less
                // than a tick, so no shard ticks meanwhile).
                let Some(due) = self.next_delayed() else {
                    return Ok(());
                };
                self.elapsed = self.elapsed.max(due);
                self.note(format!(
                    "#{} settle: time = {:.3}s for the write delay",
                    self.steps,
                    self.elapsed.as_secs_f64()
                ));
            }
        }
        Err(format!(
            "no quiescence after {MAX_SETTLE_ACTIONS} actions (livelock)"
        ))
    }

    /// Invariants that hold once everything has settled.
    pub(super) fn check_quiescent(&mut self) -> Result<(), String> {
        let n = self.shards.len();
        for s in 0..n {
            let shard = &self.shards[s];
            shard
                .state
                .check_invariants()
                .map_err(|e| format!("shard {s} invariant at quiescence: {e}"))?;
            if shard.state.connections() != shard.conns.len() {
                return Err(format!(
                    "shard {s}: the state holds {} connections, the driver {}",
                    shard.state.connections(),
                    shard.conns.len()
                ));
            }
        }
        for kind in [IndexKind::Topic, IndexKind::User, IndexKind::Chat] {
            // Shards holding each name locally.
            let mut holders: Vec<(String, ShardSet)> = Vec::new();
            for s in 0..n {
                for (_, entry) in self.shards[s].state.name_index(kind).iter() {
                    if !entry.waiting.is_empty() || entry.acks_pending > 0 {
                        return Err(format!(
                            "shard {s}: {kind:?} `{}` still waits for acknowledgements at quiescence",
                            entry.name
                        ));
                    }
                    if entry.local_count() > 0 {
                        match holders.iter_mut().find(|(name, _)| **name == *entry.name) {
                            Some((_, set)) => set.insert(ShardId(s)),
                            None => {
                                let mut set = ShardSet::default();
                                set.insert(ShardId(s));
                                holders.push((entry.name.to_string(), set));
                            }
                        }
                    }
                }
            }
            for a in 0..n {
                let index = self.shards[a].state.name_index(kind);
                for (name, set) in &holders {
                    let mut expected = *set;
                    expected.remove(ShardId(a));
                    let listed = index
                        .lookup(name)
                        .map(|id| index.entry(id).remote)
                        .unwrap_or_default();
                    if listed != expected {
                        return Err(format!(
                            "shard {a}: {kind:?} `{name}` lists shards {:?}, but {:?} hold it",
                            listed.iter().map(|s| s.0).collect::<Vec<_>>(),
                            expected.iter().map(|s| s.0).collect::<Vec<_>>()
                        ));
                    }
                }
                for (_, entry) in index.iter() {
                    if !holders.iter().any(|(name, _)| **name == *entry.name) {
                        return Err(format!(
                            "shard {a}: {kind:?} `{}` outlived every holder (lists {:?})",
                            entry.name,
                            entry.remote.iter().map(|s| s.0).collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_some() {
                continue;
            }
            let closing = client.close_sent
                || client.close_received.is_some()
                || client.eof_requested
                || client.close_response;
            if closing {
                return Err(format!(
                    "c{c} ({}) is still connected at quiescence though closing",
                    client.label
                ));
            }
            if let Some(pending) = client.pending.front() {
                return Err(format!(
                    "c{c} ({}): {:?} unanswered at quiescence",
                    client.label, pending.req
                ));
            }
            if !client.inbuf.is_empty() {
                return Err(format!(
                    "c{c} ({}) holds {} bytes of a frame or response that never completes",
                    client.label,
                    client.inbuf.len()
                ));
            }
        }
        self.check_stream_replays()?;
        // Every close finishes without time passing: clients answer close
        // frames and read everything, so a connection still closing is stuck.
        for (s, shard) in self.shards.iter().enumerate() {
            for (_, conn) in shard.conns.iter() {
                if conn.io.lifecycle != driver::Lifecycle::Open {
                    let client = &self.clients[conn.client];
                    return Err(format!(
                        "shard {s}: c{} ({}) is {:?} at quiescence",
                        conn.client, client.label, conn.io.lifecycle
                    ));
                }
            }
        }
        Ok(())
    }

    /// Asks every topic's presence through a fresh connection; it must count
    /// exactly the clients that hold the topic.
    pub(super) fn probe_presence(&mut self) -> Result<(), String> {
        for topic in self.all_topics() {
            let expect = self
                .clients
                .iter()
                .filter(|c| c.ws && c.ended.is_none() && c.observed.contains(&topic))
                .count();
            let s = self.pick(self.shards.len());
            let Some(c) = self.connect(s, format!("presence probe {topic}")) else {
                continue;
            };
            self.write_http(c, HttpCall::Presence { topic }, true, Some(expect));
        }
        self.settle()
    }

    /// Deleted registrations must get 404 on every shard, and a few live ones 101.
    pub(super) fn probe_registrations(&mut self) -> Result<(), String> {
        let deleted: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deleted_at.is_some())
            .take(3)
            .collect();
        let live: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deletes_fed.is_empty())
            .take(2)
            .collect();
        for r in deleted {
            for s in 0..self.shards.len() {
                self.open_ws(s, Upgrade::Registration(r), Vec::new());
            }
        }
        for r in live {
            let s = self.pick(self.shards.len());
            self.open_ws(s, Upgrade::Registration(r), Vec::new());
        }
        self.settle()
    }

    /// Every subscriber that kept a topic got every acknowledged publish to
    /// it fed after its `subscribed` (and, for a user publish, after its
    /// `101`), exactly once; after a graceful shutdown, before its 1001.
    pub(super) fn check_deliveries(&mut self) -> Result<(), String> {
        if self.lossy() {
            return Ok(());
        }
        for (c, client) in self.clients.iter().enumerate() {
            let eligible = client.ws
                && !client.overflowed
                && (client.ended.is_none() || client.close_received == Some(1001));
            if !eligible {
                continue;
            }
            for (topic, &since) in &client.held_since {
                for (id, publish) in self.publishes.iter().enumerate() {
                    let fed = publish.first_fed.unwrap_or(0);
                    if !publish.http || !publish.accepted || publish.topic != *topic || fed <= since
                    {
                        continue;
                    }
                    if let Some(user) = &publish.user {
                        let upgraded = client.upgraded_at.unwrap_or(u64::MAX);
                        if client.user.as_ref() != Some(user) || upgraded >= fed {
                            continue;
                        }
                    }
                    self.obligations += 1;
                    if !client.received.contains(&id) {
                        return Err(format!(
                            "c{c} ({}) held {topic} since #{since} but never got publish {id} \
                             (fed at #{fed}, accepted with 202)",
                            client.label
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every client leaves (close frame, half-close or reset), then the run settles.
    pub(super) fn teardown(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            if self.clients[c].ended.is_some() {
                continue;
            }
            match self.pick(3) {
                0 if self.clients[c].ws && self.clients[c].can_send() => {
                    self.ws(c, WsCall::Close(1000))
                }
                1 => self.reset(c),
                _ => self.end_input(c),
            }
        }
        self.settle()
    }

    /// After everyone left: no connection and no name anywhere.
    pub(super) fn check_empty(&mut self) -> Result<(), String> {
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_none() {
                return Err(format!(
                    "c{c} ({}) is still connected at the end",
                    client.label
                ));
            }
        }
        for s in 0..self.shards.len() {
            let shard = &self.shards[s];
            if shard.state.connections() != 0 || !shard.conns.is_empty() {
                return Err(format!("shard {s} still holds connections at the end"));
            }
            for kind in [IndexKind::Topic, IndexKind::User, IndexKind::Chat] {
                if let Some((_, entry)) = shard.state.name_index(kind).iter().next() {
                    return Err(format!(
                        "shard {s}: {kind:?} `{}` outlived every connection",
                        entry.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Keeps stepping until every shard has shut down and every connection
    /// is gone, then checks what shutdown promises.
    pub(super) fn finish_shutdown(&mut self) -> Result<(), String> {
        let shut_down = |sim: &Sim| {
            sim.shards
                .iter()
                .all(|s| s.shutdown_deadline.is_some() && s.conns.is_empty())
        };
        for _ in 0..MAX_SHUTDOWN_STEPS {
            if shut_down(self) || self.choices.exhausted() {
                break;
            }
            self.step(&SHUTDOWN_WEIGHTS);
            self.take_violation()?;
        }
        // The rest must finish without clients acting: every envelope
        // delivered, then past every close and shutdown deadline.
        self.settle()?;
        if !shut_down(self) {
            self.advance(self.shutdown_timeout + self.close_timeout);
            self.check()?;
            self.settle()?;
        }
        for (s, shard) in self.shards.iter().enumerate() {
            if shard.shutdown_deadline.is_none() || !shard.conns.is_empty() {
                return Err(format!(
                    "shard {s} still has connections after its shutdown deadline"
                ));
            }
            if !shard.state.is_shutting_down() {
                return Err(format!("shard {s} never began its shutdown"));
            }
        }
        self.check_quiescent()?;
        self.check_deliveries()
    }

    /// Whether a bus queue was ever full and dropped a publish.
    pub(super) fn lossy(&self) -> bool {
        self.shared
            .stats()
            .iter()
            .any(|s| s.bus_drops_total.load(Ordering::Relaxed) > 0)
    }
}
