//! The shard's inbound budget: the bytes of partial input it holds for its
//! connections (unparsed input, a parsed head waiting for its body, a
//! chunked body or a fragmented message being put together), charged after
//! every read and bounded for the whole shard.
//!
//! Each connection is already bounded (a head, a body, a message), but a
//! thousand connections each stopping half-way through a 1 MiB body hold
//! a gigabyte. Past the shard's budget, the partial senders that have been
//! stalled longest (sent nothing for the longest time while holding
//! partial input) are closed first (408 over HTTP, close 1008 on a
//! WebSocket): a slowloris sender is stalled, while a client sending a
//! large body or a long pipeline at speed keeps moving to the back.

use std::collections::{BTreeSet, HashMap};

use crate::metrics::ShardStats;
use crate::protocol::frame::FrameDecoder;
use crate::protocol::http::{error_json, RequestDecoder};
use crate::shard::key::ConnKey;

use super::conn::{Closing, Pending, Phase};
use super::ShardState;

/// Partial input held across a shard's connections.
pub(crate) struct Inbound {
    /// Bytes charged, the sum of every connection's `held_input`.
    bytes: usize,
    limit: usize,
    next_seq: u64,
    /// Connections holding partial input, the longest stalled first.
    holders: BTreeSet<(u64, ConnKey)>,
    /// When each holder last sent something, as a place in `holders`.
    since: HashMap<ConnKey, u64>,
}

impl Inbound {
    pub(crate) fn new(limit: usize) -> Inbound {
        Inbound {
            bytes: 0,
            limit,
            next_seq: 0,
            holders: BTreeSet::new(),
            since: HashMap::new(),
        }
    }

    /// Bytes held, for `/metrics`.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records that `key` holds `held` bytes where it held `before`; one
    /// that `sent` something moves to the back of the stalled order.
    fn recharge(&mut self, key: ConnKey, before: usize, held: usize, sent: bool) {
        debug_assert!(before <= self.bytes, "released more than was charged");
        self.bytes = self.bytes - before + held;
        let stalled_since = (before > 0)
            .then(|| self.since.get(&key).copied())
            .flatten();
        if held > 0 && stalled_since.is_some() && !sent {
            return;
        }
        if let Some(seq) = stalled_since {
            self.holders.remove(&(seq, key));
            self.since.remove(&key);
        }
        if held > 0 {
            self.next_seq += 1;
            self.holders.insert((self.next_seq, key));
            self.since.insert(key, self.next_seq);
        }
    }

    /// The connection that has held partial input longest, while the
    /// shard is over its budget.
    fn over_budget(&self) -> Option<ConnKey> {
        (self.bytes > self.limit)
            .then(|| self.holders.first().map(|&(_, key)| key))
            .flatten()
    }
}

impl ShardState {
    /// Charges connection `key`'s partial input after a read (`sent`: it
    /// had sent something); past the shard's inbound budget, closes the
    /// longest-stalled partial senders until it is within it again.
    pub(super) fn charge_input(&mut self, key: ConnKey, sent: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let decoder = match &conn.phase {
            Phase::Http(http) => http.decoder.held_bytes(),
            Phase::WebSocket(ws) => ws.decoder.held_bytes(),
            Phase::Stream(_) => 0,
        };
        let held = u32::try_from(conn.inbuf.capacity() + decoder).unwrap_or(u32::MAX);
        let before = std::mem::replace(&mut conn.held_input, held);
        self.inbound
            .recharge(key, before as usize, held as usize, sent);
        while let Some(oldest) = self.inbound.over_budget() {
            self.evict_partial(oldest);
        }
    }

    /// Gives back connection `key`'s charge: its partial input is dropped
    /// (it closed, or was evicted).
    pub(super) fn release_input(&mut self, key: ConnKey) {
        let limits = self.http_limits();
        let Some(conn) = self.conns.get_mut(key) else {
            debug_assert!(!self.inbound.since.contains_key(&key), "a gone holder");
            return;
        };
        conn.inbuf = Pending::default();
        match &mut conn.phase {
            Phase::Http(http) => http.decoder = RequestDecoder::new(limits),
            Phase::WebSocket(ws) => ws.decoder = FrameDecoder::new(ws.decoder.limits()),
            Phase::Stream(_) => {}
        }
        let before = std::mem::take(&mut conn.held_input);
        self.inbound.recharge(key, before as usize, 0, false);
    }

    /// Closes the longest-stalled partial sender while the shard is over
    /// its inbound budget.
    fn evict_partial(&mut self, key: ConnKey) {
        ShardStats::add(&self.stats().inbound_evictions_total, 1);
        let (websocket, open) = match self.conns.get(key) {
            Some(conn) => (
                matches!(conn.phase, Phase::WebSocket(_)) && !conn.upgrade_parked(),
                conn.closing == Closing::No,
            ),
            None => (false, false),
        };
        let reason = "inbound buffer budget exhausted: message not completed in time";
        match (websocket, open) {
            (true, true) => self.fail_ws(key, 1008, reason),
            (false, true) => self.respond(key, error_json(408, reason).keep_alive(false)),
            _ => {}
        }
        self.release_input(key);
    }
}
