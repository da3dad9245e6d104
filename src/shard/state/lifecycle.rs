//! How connections end, and the timers: closing (the WebSocket close
//! handshake, HTTP `Connection: close`, slow consumers), forgetting a
//! connection the driver has released, graceful shutdown that delivers every
//! acknowledged publish first, idle HTTP connections and dead WebSocket peers.

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind};
use crate::metrics::ShardStats;
use crate::protocol::frame;
use crate::protocol::http::error_json;
use crate::shard::key::ConnKey;

use super::conn::{Closing, Phase, WsKind};
use super::{CloseMode, ShardState};

/// How often connections are scanned for timeouts. Deadlines are seconds
/// long, so a scan per second is precise enough and costs one pass over the
/// connections per second.
const SCAN_INTERVAL_MS: u128 = 1000;

impl ShardState {
    /// Ends a connection: it leaves every index at once (nothing more is
    /// routed to it), and the driver sends `last` after what is queued and
    /// shuts the socket down as `mode` says.
    pub(super) fn end(&mut self, key: ConnKey, last: Option<Bytes>, mode: CloseMode) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let already = match conn.closing {
            Closing::No => false,
            // Only a stronger mode (sooner shutdown) changes anything now.
            Closing::Handshake => mode == CloseMode::Linger,
            Closing::Done => mode != CloseMode::Now,
        };
        if already {
            return;
        }
        // An event stream's peer sends no close of its own: it gets a
        // `close` message for the core's close frame, and is shut down
        // once that is sent.
        let (last, mode) = match &conn.phase {
            Phase::Stream(stream) => (
                super::event_streams::last_message(stream, last),
                if mode == CloseMode::Linger {
                    CloseMode::AfterFlush
                } else {
                    mode
                },
            ),
            _ => (last, mode),
        };
        conn.closing = if mode == CloseMode::Linger {
            Closing::Handshake
        } else {
            Closing::Done
        };
        self.leave_indexes(key);
        self.commands.push(super::Command::Close {
            conn: key,
            last,
            mode,
        });
    }

    /// Starts the WebSocket close handshake with `code`: the close frame goes
    /// after what is queued, and the connection ends when the peer answers or
    /// the close timeout passes.
    /// A connection whose `101` is still parked is refused over HTTP with
    /// 503 and `reason` instead: its client has not switched to frames.
    pub(super) fn close_ws(&mut self, key: ConnKey, code: u16, reason: &str) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.closing != Closing::No {
            return;
        }
        if conn.upgrade_parked() {
            return self.respond(key, error_json(503, reason).keep_alive(false));
        }
        self.end(key, Some(frame::close(code, reason)), CloseMode::Linger);
    }

    /// Fails a WebSocket (RFC 6455 7.1.7): the close frame goes out and the
    /// socket is shut down without waiting for the peer.
    pub(super) fn fail_ws(&mut self, key: ConnKey, code: u16, reason: &str) {
        let last = match self.conns.get(key).map(|c| c.closing) {
            Some(Closing::No) => Some(frame::close(code, reason)),
            Some(Closing::Handshake) => None,
            Some(Closing::Done) | None => return,
        };
        self.end(key, last, CloseMode::AfterFlush);
    }

    /// The peer's close frame: answer with its code unless ours is out
    /// already (RFC 6455 5.5.1), then end once that is sent.
    pub(super) fn on_peer_close(&mut self, key: ConnKey, code: Option<(u16, String)>) {
        let code = code.map_or(1000, |(code, _)| code);
        self.fail_ws(key, code, "");
    }

    /// The driver found the connection over its outbound budget.
    pub(super) fn on_overflow(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.closing == Closing::Done {
            return;
        }
        ShardStats::add(&self.stats().slow_consumer_disconnects_total, 1);
        match conn.phase {
            Phase::WebSocket(_) if conn.closing == Closing::No => {
                self.close_ws(key, 1013, "slow consumer: outbound queue over its limit")
            }
            _ => self.end(key, None, CloseMode::Now),
        }
    }

    /// The driver released the connection: forget it.
    pub(super) fn on_closed(&mut self, key: ConnKey) {
        if !self.conns.contains(key) {
            return;
        }
        self.leave_indexes(key);
        self.release_input(key);
        self.forget_presence(key);
        self.pusher_conns.forget(key);
        self.connect_expiries.forget(key);
        if let Some(conn) = self.conns.remove(key) {
            match conn.phase {
                Phase::WebSocket(ws) => {
                    ShardStats::sub(&self.stats().websockets, 1);
                    if let WsKind::Pusher(app) = ws.kind {
                        debug_assert!(self.pusher_websockets > 0);
                        self.pusher_websockets -= 1;
                        self.shared.app_connections.close(usize::from(app));
                    }
                    if ws.deflate {
                        self.compression.websockets -= 1;
                        ShardStats::sub(&self.stats().websockets_compressed, 1);
                    }
                }
                Phase::Stream(_) => self.event_stream_closed(),
                Phase::Http(_) => {}
            }
        }
    }

    /// Removes a closing connection from every index, so nothing more is
    /// routed to it and other shards learn when this shard lost a name.
    fn leave_indexes(&mut self, key: ConnKey) {
        self.drop_subscriptions(key);
        self.drop_identity(key);
        self.take_deferred(key, |_| true);
    }

    // ---- shutdown ------------------------------------------------------------

    /// The process asked this shard to stop. Publishes are refused from now
    /// on; every other shard is told so with a drain marker, which follows
    /// everything this shard published on the same ordered queue. Once every
    /// peer's marker has arrived, every publish acknowledged anywhere has been
    /// queued to this shard's connections, and they are closed with 1001.
    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown.begun {
            return;
        }
        self.shutdown.begun = true;
        self.broadcast_control(|| Envelope::Drained);
        if let Some(broker) = self.shared.bus.broker() {
            // It answers with its own once what it acknowledged went out.
            self.post_control(broker, Envelope::Drained);
        }
        self.close_all_if_drained();
    }

    pub(super) fn on_peer_drained(&mut self) {
        self.shutdown.drained_peers += 1;
        self.close_all_if_drained();
    }

    fn close_all_if_drained(&mut self) {
        // The other shards, and the broker in a cluster.
        let peers = self.shared.bus.members() - 1;
        if !self.shutdown.begun || self.shutdown.closing || self.shutdown.drained_peers < peers {
            return;
        }
        self.shutdown.closing = true;
        for key in self.conns.keys() {
            match self.conns.get(key).map(|c| &c.phase) {
                Some(Phase::WebSocket(_) | Phase::Stream(_)) => {
                    self.close_ws(key, 1001, "server shutting down")
                }
                Some(Phase::Http(_)) => self.end(key, None, CloseMode::AfterFlush),
                None => {}
            }
        }
    }

    // ---- timers --------------------------------------------------------------

    pub(super) fn on_tick(&mut self) {
        self.expire_registration_waits();
        if self
            .now
            .saturating_duration_since(self.last_scan)
            .as_millis()
            < SCAN_INTERVAL_MS
        {
            return;
        }
        self.last_scan = self.now;
        self.expire_streams();
        self.publish_memory();
        self.expire_idle_http();
        self.ping_websockets();
        self.heartbeat_event_streams();
        self.expire_granted_connections();
    }

    /// Closes HTTP connections that did not complete a request in time: a
    /// silent close when idle between requests, 408 when one was under way.
    /// A connection whose response the client never reads is closed too.
    fn expire_idle_http(&mut self) {
        let now = self.now;
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .iter()
            .filter_map(|(key, c)| match &c.phase {
                Phase::Http(http)
                    if c.closing == Closing::No && c.deferred.is_none() && http.deadline <= now =>
                {
                    Some((key, http.decoder.in_request()))
                }
                _ => None,
            })
            .collect();
        for (key, partial) in expired {
            if partial {
                let response = error_json(408, "request not completed in time");
                self.respond(key, response.keep_alive(false));
            } else {
                self.end(key, None, CloseMode::Now);
            }
        }
    }

    /// Pings WebSockets that have been silent for `ping_interval`, and ends
    /// those that left a ping unanswered for `pong_timeout`: a peer that
    /// vanished without a FIN is found in seconds, not TCP keepalive's minutes.
    fn ping_websockets(&mut self) {
        let config = self.config();
        let interval = config.ping_interval.as_millis() as u32;
        let timeout = config.pong_timeout.as_millis() as u32;
        if interval == 0 {
            return;
        }
        let now = self.millis();
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        for (key, conn) in self.conns.iter() {
            let Phase::WebSocket(ws) = &conn.phase else {
                continue;
            };
            // A parked upgrade has sent no `101` yet: a ping would reach a
            // client that still reads HTTP.
            if conn.closing != Closing::No || conn.upgrade_parked() {
                continue;
            }
            match ws.ping_sent {
                Some(sent) if now.since(sent) >= timeout => dead.push(key),
                Some(_) => {}
                None if now.since(ws.last_seen) >= interval => ping.push(key),
                None => {}
            }
        }
        for key in dead {
            ShardStats::add(&self.stats().ping_timeouts_total, 1);
            self.end(key, None, CloseMode::Now);
        }
        for key in ping {
            if let Some(Phase::WebSocket(ws)) = self.conns.get_mut(key).map(|c| &mut c.phase) {
                ws.ping_sent = Some(now);
            }
            self.send(key, frame::ping(b""));
        }
    }
}

/// See [`ShardState::check_invariants`]: what the state says it holds is
/// what its connections hold, and within the configured bounds.
fn check_memory(state: &ShardState) -> Result<(), String> {
    let limits = &state.config().limits;
    let memory = state.memory();
    for (key, conn) in state.conns.iter() {
        let decoder = match &conn.phase {
            Phase::Http(http) => http.decoder.held_bytes(),
            Phase::WebSocket(ws) => ws.decoder.held_bytes(),
            Phase::Stream(_) => 0,
        };
        let actual = u32::try_from(conn.inbuf.capacity() + decoder).unwrap_or(u32::MAX);
        if actual != conn.held_input {
            return Err(format!(
                "connection {key:?} holds {actual} bytes of input but is charged {}",
                conn.held_input
            ));
        }
    }
    let held: usize = state.conns.iter().map(|(_, c)| c.held_input as usize).sum();
    let parked: usize = state
        .conns
        .iter()
        .filter_map(|(_, c)| c.deferred.as_deref())
        .map(super::conn::Deferred::bytes)
        .sum();
    if held != memory.inbound {
        return Err(format!(
            "inbound bytes {} charged, {held} held",
            memory.inbound
        ));
    }
    if parked != memory.parked {
        return Err(format!(
            "parked bytes {} counted, {parked} parked",
            memory.parked
        ));
    }
    let bounds = [
        (
            "inbound bytes",
            memory.inbound,
            limits.max_inbound_bytes_per_shard,
        ),
        (
            "history bytes",
            memory.stream_history,
            limits.max_history_bytes,
        ),
        ("streams", memory.streams, limits.max_streams),
    ];
    for (what, used, limit) in bounds {
        if used > limit {
            return Err(format!("{what}: {used} over the bound of {limit}"));
        }
    }
    Ok(())
}

/// See [`ShardState::check_invariants`].
pub(super) fn check_invariants(state: &ShardState) -> Result<(), String> {
    check_memory(state)?;
    let streams = state
        .conns
        .iter()
        .filter(|(_, c)| matches!(c.phase, Phase::Stream(_)))
        .count();
    if streams != state.event_streams.open {
        return Err(format!(
            "{streams} event streams open, {} counted",
            state.event_streams.open
        ));
    }
    let pusher = state
        .conns
        .iter()
        .filter(|(_, c)| matches!(c.ws_kind(), Some(WsKind::Pusher(_))))
        .count();
    if pusher != state.pusher_websockets {
        return Err(format!(
            "{pusher} Pusher websockets open, {} counted",
            state.pusher_websockets
        ));
    }
    if let Some(key) = state
        .pusher_conns
        .keys()
        .chain(state.pusher_presence.joining_keys())
        .find(|&key| !state.conns.contains(key))
    {
        return Err(format!("Pusher state outlived its connection {key:?}"));
    }
    for (kind, index) in [
        (IndexKind::Topic, &state.topics),
        (IndexKind::User, &state.users),
        (IndexKind::Chat, &state.chatters),
    ] {
        for (id, entry) in index.iter() {
            if entry.local_count() == 0 && entry.remote.is_empty() {
                return Err(format!("{kind:?} `{}` outlived its holders", entry.name));
            }
            if entry.remote.iter().any(|s| s == state.id) {
                return Err(format!("{kind:?} `{}` lists its own shard", entry.name));
            }
            for (pos, &key) in entry.subscribers.iter().enumerate() {
                let conn = state
                    .conns
                    .get(key)
                    .ok_or_else(|| format!("{kind:?} `{}` holds a gone connection", entry.name))?;
                if conn.closing != Closing::No {
                    return Err(format!(
                        "{kind:?} `{}` routes to a closing connection",
                        entry.name
                    ));
                }
                let recorded = match kind {
                    IndexKind::Topic => conn
                        .subs
                        .iter()
                        .find(|s| s.topic == id)
                        .and_then(|s| s.pos()),
                    _ => conn
                        .identity
                        .as_ref()
                        .and_then(|i| i.ident)
                        .filter(|i| i.entry == id)
                        .and_then(|i| i.pos),
                };
                if recorded != Some(pos as u32) {
                    return Err(format!(
                        "{kind:?} `{}`: connection at {pos} records {recorded:?}",
                        entry.name
                    ));
                }
            }
        }
    }
    for (key, conn) in state.conns.iter() {
        if conn.closing != Closing::No && !conn.subs.is_empty() {
            return Err(format!("closing connection {key:?} still holds topics"));
        }
        for sub in &conn.subs {
            let entry = state
                .topics
                .get(sub.topic)
                .ok_or_else(|| format!("connection {key:?} holds a gone topic"))?;
            let listed = match sub.pos() {
                Some(pos) => entry.subscribers.get(pos as usize) == Some(&key),
                None => entry.waiting.contains(&key),
            };
            if !listed {
                return Err(format!(
                    "connection {key:?} is not listed in `{}`",
                    entry.name
                ));
            }
        }
    }
    if state.connect_expiries.len() > state.conns.len() {
        return Err("a connection's expiry outlived it".into());
    }
    check_webhook_members(state)
}

/// With member webhooks, the per (topic, user) counts are the tracked
/// subscriptions of connections with a user id: a count that drifted
/// would announce a member that left, or never remove one.
fn check_webhook_members(state: &ShardState) -> Result<(), String> {
    let wanted = state
        .shared
        .webhooks
        .as_ref()
        .is_some_and(|s| s.wants(crate::webhooks::Subject::Member));
    if !wanted {
        return Ok(());
    }
    // Ordered, so a failure reads the same in every replay of a seed.
    let mut counted = std::collections::BTreeMap::new();
    for (_, conn) in state.conns.iter() {
        let Some(user) = conn.identity.as_ref().and_then(|i| i.user.clone()) else {
            continue;
        };
        for sub in conn.subs.iter().filter(|s| s.meta.is_some()) {
            let topic = state.topics.entry(sub.topic).name.clone();
            *counted.entry((topic, user.clone())).or_insert(0) += 1;
        }
    }
    let kept: std::collections::BTreeMap<_, _> = state
        .webhook_members
        .iter()
        .map(|(pair, count)| (pair.clone(), *count))
        .collect();
    if counted != kept {
        return Err(format!(
            "webhook members {kept:?}, tracked subscriptions {counted:?}"
        ));
    }
    Ok(())
}
