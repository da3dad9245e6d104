//! Presence across nodes, the broker's decisions: this node's members are
//! written to Redis one coalesced write at a time (`cluster::presence`),
//! refreshed on a timer, and other nodes' members are read for a shard's
//! query through a bounded gate (the reads are in `cluster::redis::presence`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::{self, Envelope, ShardId};

use super::{node_queries, BrokerState, Op, PresenceQuery};

impl BrokerState {
    /// A member of `topic` on this node came (`meta`) or went.
    pub(super) fn on_presence_change(
        &mut self,
        topic: Arc<str>,
        conn_id: String,
        meta: Option<Arc<str>>,
    ) {
        self.members.change(topic, conn_id, meta);
        self.write_presence();
    }

    /// Rewrites every member of this node with a fresh expiry: keeps them
    /// counted, and restores them in a Redis that lost them.
    pub(super) fn refresh_presence(&mut self) {
        self.members.rewrite_all();
        self.write_presence();
        self.refresh_member_events();
    }

    /// Starts the next presence write if none is in flight (and Redis is
    /// reachable: a node that comes back rewrites everything).
    fn write_presence(&mut self) {
        let waiting = self.members.waiting() as u64;
        let stats = &self.status.stats;
        stats.presence_waiting.store(waiting, Ordering::Relaxed);
        if !self.status.is_up() {
            return;
        }
        if let Some(writes) = self.members.next_write() {
            self.ops.push(Op::WritePresence(writes));
        }
    }

    /// The presence write in flight is done: the next may go.
    pub(super) fn on_presence_written(&mut self, ok: bool) {
        if !ok {
            tracing::debug!("cluster: a presence write failed; everything is rewritten next");
        }
        self.members.written(ok);
        self.write_presence();
    }

    /// A shard counts a topic's members: ask Redis for the other nodes'
    /// (or, for what Redis keeps no record of, the nodes themselves).
    /// Bounded in flight like stream reads: a stalled Redis holds at most
    /// that many; the rest wait (each connection asks at most
    /// `max_presence_queries_per_second`).
    pub(super) fn on_presence_query(&mut self, query: PresenceQuery) {
        if !self.status.is_up() {
            // Degraded: the node counts its own members only.
            let (from, ticket) = (query.from, query.ticket);
            return self.answer_presence(from, ticket, bus::Members::default());
        }
        if let Some(query) = self.presence_queries.admit(query) {
            self.start_presence_query(query);
        }
    }

    fn start_presence_query(&mut self, query: PresenceQuery) {
        if node_queries::asks_nodes(&query.query) {
            self.ask_nodes(query);
        } else {
            self.ops.push(Op::QueryPresence(query));
        }
    }

    /// A query's answer came back (from Redis or the nodes): it goes to
    /// the shard that asked, and the next waiting query starts.
    pub(super) fn presence_answered(&mut self, from: ShardId, ticket: u64, members: bus::Members) {
        if let Some(next) = self.presence_queries.done() {
            self.start_presence_query(next);
        }
        self.answer_presence(from, ticket, members);
    }

    fn answer_presence(&mut self, from: ShardId, ticket: u64, members: bus::Members) {
        let reply = Envelope::PresenceReply {
            ticket,
            members: Box::new(members),
        };
        self.send(from, reply);
    }
}
