//! Counts Redis keeps no record of, asked of the other nodes: how many
//! connections subscribe to a topic, and which topics under a prefix have
//! subscribers (Pusher's `subscription_count`, `occupied` and channel
//! list). Presence members are in Redis (`presence`); plain subscribers
//! are only in the shards that hold them, and writing every subscription
//! to Redis would tax each subscribe for a query a backend makes rarely.
//!
//! So the asking node's broker publishes the question on the control
//! channel (`SPUBLISH` answers with how many nodes heard it: every node
//! holds that channel, so the answers to wait for are that many less this
//! node), each other node's broker asks its own shards and publishes the
//! sum back, and the asker merges what comes within `ANSWER_TIMEOUT` (of
//! the health tick after it asked).
//! Questions are rare and bounded: each shard's queries are limited per
//! connection, the broker's gate lets 256 be in flight, and a node counts
//! at most `COUNTING` other nodes' questions at once (past it, it does not
//! answer, and the asker stops waiting at the timeout).
//!
//! ```text
//! Q{"node":..,"id":..,"topic":..,"query":{..}}   a question, from `node`
//! A{"to":..,"id":..,"count":..,"following":..,"list":[[id,json],..]}
//! ```

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bus::{self, Envelope, MemberQuery, ShardId};

use super::super::ClusterStatus;
use super::{BrokerState, Op, PresenceQuery};

/// How long a question waits for the other nodes' answers; past it the
/// shard gets what came (a node that went away meanwhile never answers).
pub(in crate::cluster) const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Other nodes' questions this node counts at once.
const COUNTING: usize = 1_024;
/// Most members an answer lists, whatever a question asks.
const MAX_LISTED: usize = 16_384;

/// Whether a shard's query is answered by asking the nodes (a count of
/// plain subscribers, or a topic list), not from Redis's presence.
pub(super) fn asks_nodes(query: &MemberQuery) -> bool {
    query.subscribers || query.topics_under.is_some()
}

#[derive(Serialize, Deserialize)]
struct Question {
    node: u64,
    id: u64,
    topic: String,
    query: WireQuery,
}

/// A `MemberQuery` as it travels.
#[derive(Serialize, Deserialize)]
struct WireQuery {
    limit: usize,
    after: Option<String>,
    by_user: bool,
    only: Option<String>,
    subscribers: bool,
    topics_under: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    to: u64,
    id: u64,
    count: usize,
    following: usize,
    list: Vec<(String, String)>,
}

/// A shard's question to the other nodes.
struct Asking {
    query: PresenceQuery,
    /// Answers to wait for, once Redis said how many nodes heard it.
    expected: Option<usize>,
    answered: usize,
    members: bus::Members,
    /// Set by the first health tick after it was asked.
    deadline: Option<Instant>,
}

/// Another node's question, being counted by this node's shards.
struct Counting {
    node: u64,
    id: u64,
    limit: usize,
    /// Shards yet to answer.
    remaining: usize,
    members: bus::Members,
}

/// The questions of this node and of others in flight.
#[derive(Default)]
pub(super) struct NodeQueries {
    next_id: u64,
    asking: HashMap<u64, Asking>,
    /// By the ticket this broker gave its shards.
    counting: HashMap<u64, Counting>,
    next_ticket: u64,
}

impl NodeQueries {
    /// Whether `ticket` is one of this broker's own shard queries.
    pub(super) fn counts(&self, ticket: u64) -> bool {
        self.counting.contains_key(&ticket)
    }

    /// No question is in flight, this node's or another's.
    #[cfg(test)]
    pub(super) fn idle(&self) -> bool {
        self.asking.is_empty() && self.counting.is_empty()
    }
}

impl BrokerState {
    /// Asks the other nodes `query` (admitted by the presence gate).
    pub(super) fn ask_nodes(&mut self, query: PresenceQuery) {
        let id = self.node_queries.next_id;
        self.node_queries.next_id += 1;
        let q = &query.query;
        let question = Question {
            node: self.node,
            id,
            topic: query.topic.to_string(),
            query: WireQuery {
                limit: q.limit,
                after: q.after.as_deref().map(str::to_string),
                by_user: q.by_user,
                only: q.only.as_deref().map(str::to_string),
                subscribers: q.subscribers,
                topics_under: q.topics_under.as_deref().map(str::to_string),
            },
        };
        let message = encode(b'Q', &question);
        let asking = Asking {
            query,
            expected: None,
            answered: 0,
            members: bus::Members::default(),
            deadline: None,
        };
        self.node_queries.asking.insert(id, asking);
        ClusterStatus::count(&self.status.stats.node_queries_total);
        self.ops.push(Op::AskNodes { id, message });
    }

    /// Redis says how many nodes heard question `id` (`None`: it failed,
    /// and the question waits for its timeout).
    pub(super) fn on_nodes_asked(&mut self, id: u64, receivers: Option<usize>) {
        let Some(asking) = self.node_queries.asking.get_mut(&id) else {
            return;
        };
        // Every node holds the control channel, this one too.
        asking.expected = receivers.map(|r| r.saturating_sub(1));
        self.check_answered(id);
    }

    /// A question or an answer on the control channel.
    pub(super) fn on_node_message(&mut self, bytes: &[u8]) {
        match bytes.split_first() {
            Some((b'Q', json)) => {
                if let Ok(question) = serde_json::from_slice::<Question>(json) {
                    self.on_question(question);
                }
            }
            Some((b'A', json)) => {
                if let Ok(answer) = serde_json::from_slice::<Answer>(json) {
                    self.on_answer(answer);
                }
            }
            _ => {}
        }
    }

    fn on_question(&mut self, question: Question) {
        if question.node == self.node || self.node_queries.counting.len() >= COUNTING {
            return;
        }
        let q = question.query;
        let limit = q.limit.min(MAX_LISTED);
        let query = MemberQuery {
            limit,
            after: q.after.map(Arc::from),
            by_user: q.by_user,
            only: q.only.map(Arc::from),
            subscribers: q.subscribers,
            topics_under: q.topics_under.map(Arc::from),
        };
        let ticket = self.node_queries.next_ticket;
        self.node_queries.next_ticket += 1;
        let counting = Counting {
            node: question.node,
            id: question.id,
            limit,
            remaining: self.shards,
            members: bus::Members::default(),
        };
        self.node_queries.counting.insert(ticket, counting);
        let topic: Arc<str> = Arc::from(question.topic);
        for shard in 0..self.shards {
            let envelope = Envelope::PresenceQuery {
                ticket,
                topic: topic.clone(),
                query: query.clone(),
            };
            self.send(ShardId(shard), envelope);
        }
    }

    /// A shard of this node answered another node's question: once all
    /// have, their sum goes back.
    pub(super) fn on_shard_counted(&mut self, ticket: u64, members: bus::Members) {
        let Some(counting) = self.node_queries.counting.get_mut(&ticket) else {
            return;
        };
        counting.members.merge(members, counting.limit);
        counting.remaining -= 1;
        if counting.remaining > 0 {
            return;
        }
        let counting = self
            .node_queries
            .counting
            .remove(&ticket)
            .expect("looked up above");
        let answer = Answer {
            to: counting.node,
            id: counting.id,
            count: counting.members.count,
            following: counting.members.following,
            list: counting.members.list,
        };
        let message = encode(b'A', &answer);
        self.ops.push(Op::AnswerNode { message });
    }

    fn on_answer(&mut self, answer: Answer) {
        if answer.to != self.node {
            return;
        }
        let Some(asking) = self.node_queries.asking.get_mut(&answer.id) else {
            return; // answered late, after the timeout
        };
        let members = bus::Members {
            count: answer.count,
            following: answer.following,
            list: answer.list,
        };
        asking.members.merge(members, asking.query.query.limit);
        asking.answered += 1;
        self.check_answered(answer.id);
    }

    fn check_answered(&mut self, id: u64) {
        let Some(asking) = self.node_queries.asking.get(&id) else {
            return;
        };
        if asking.expected.is_some_and(|e| asking.answered >= e) {
            self.finish_asking(id);
        }
    }

    /// Questions past their timeout are answered with what came.
    pub(super) fn expire_node_queries(&mut self, now: Instant) {
        let mut late = Vec::new();
        for (id, asking) in &mut self.node_queries.asking {
            let deadline = *asking.deadline.get_or_insert(now + ANSWER_TIMEOUT);
            if now >= deadline {
                late.push(*id);
            }
        }
        for id in late {
            let stats = &self.status.stats;
            stats
                .node_queries_partial_total
                .fetch_add(1, Ordering::Relaxed);
            self.finish_asking(id);
        }
    }

    fn finish_asking(&mut self, id: u64) {
        let Some(asking) = self.node_queries.asking.remove(&id) else {
            return;
        };
        let (from, ticket) = (asking.query.from, asking.query.ticket);
        self.presence_answered(from, ticket, asking.members);
    }
}

fn encode(kind: u8, value: &impl Serialize) -> Bytes {
    let mut message = vec![kind];
    serde_json::to_writer(&mut message, value).expect("plain data serialises");
    Bytes::from(message)
}
