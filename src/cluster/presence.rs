//! Presence across nodes: who is in a topic, counted on every node.
//!
//! Each node keeps its own members of a topic in Redis, refreshed on a
//! timer, so a node that dies stops counting within the TTL:
//!
//! ```text
//! {prefix}:p:{T}:<node>   hash conn id -> meta (JSON), expires presence_ttl after the last refresh
//! {prefix}:pn:{T}         sorted set of nodes with members, scored by when their entry expires
//! ```
//!
//! A shard's presence query asks its node's shards and the broker; the
//! broker answers for the other nodes with one Lua script that drops
//! expired nodes and reads the others' hashes. Members from other nodes are
//! named `<node>/<conn id>`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// This node's presence members, per topic (conn id -> meta), and the
/// changes not written to Redis yet.
///
/// Plain data: one write is in flight at a time, and changes made while it
/// flies wait coalesced per member (a join and a leave of a member never
/// written cancel), so however fast clients come and go the waiting
/// changes never outnumber the members plus those written and gone; and a
/// member's writes reach Redis in the order they happened.
#[derive(Default)]
pub(super) struct Members {
    topics: HashMap<Arc<str>, HashMap<String, Arc<str>>>,
    /// Changes not written yet, per topic and member.
    waiting: HashMap<Arc<str>, HashMap<String, Pending>>,
    /// Changes waiting, over every topic.
    waiting_count: usize,
    /// A write is in flight.
    writing: bool,
    /// Every member is to be rewritten whole (the refresh timer, or a
    /// Redis that lost writes or was away).
    rewrite_due: bool,
    /// Topics whose hash Redis may hold for this node: a whole rewrite
    /// deletes those without members, so a write that failed (and took
    /// its changes with it) leaves nothing behind.
    stored: HashSet<Arc<str>>,
    /// Topics the write in flight deletes: Redis may still hold them if
    /// it fails.
    deleting: Vec<Arc<str>>,
}

/// A member's change waiting for Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    /// Its meta now, or `None`: it left.
    meta: Option<Arc<str>>,
    /// Redis may hold an older write of it, so leaving must delete it.
    written: bool,
}

/// One topic's part of a write to Redis.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TopicWrite {
    pub(super) topic: Arc<str>,
    /// Delete the node's hash first: it is written whole.
    pub(super) whole: bool,
    /// Members to set (conn id, meta).
    pub(super) set: Vec<(String, String)>,
    /// Members to delete.
    pub(super) delete: Vec<String>,
    /// The node still has members of the topic.
    pub(super) remains: bool,
}

impl Members {
    /// A member of `topic` came (`meta`) or went.
    pub(super) fn change(&mut self, topic: Arc<str>, conn_id: String, meta: Option<Arc<str>>) {
        let members = self.topics.entry(topic.clone()).or_default();
        match &meta {
            Some(meta) => {
                members.insert(conn_id.clone(), meta.clone());
            }
            None => {
                members.remove(&conn_id);
            }
        }
        if members.is_empty() {
            self.topics.remove(&topic);
        }
        let waiting = self.waiting.entry(topic.clone()).or_default();
        match (waiting.get_mut(&conn_id), meta) {
            (Some(pending), None) if !pending.written => {
                // Joined and left between two writes: Redis never hears of it.
                waiting.remove(&conn_id);
                self.waiting_count -= 1;
            }
            (Some(pending), meta) => pending.meta = meta,
            (None, meta) => {
                let written = meta.is_none();
                waiting.insert(conn_id, Pending { meta, written });
                self.waiting_count += 1;
            }
        }
        if waiting.is_empty() {
            self.waiting.remove(&topic);
        }
        self.check();
    }

    /// Asks for every member to be rewritten whole with the next write.
    pub(super) fn rewrite_all(&mut self) {
        self.rewrite_due = true;
    }

    /// The next write, if none is in flight and there is something to
    /// write; it counts as in flight until `written`.
    pub(super) fn next_write(&mut self) -> Option<Vec<TopicWrite>> {
        if self.writing || (self.waiting.is_empty() && !self.rewrite_due) {
            return None;
        }
        let waiting = std::mem::take(&mut self.waiting);
        self.waiting_count = 0;
        let mut writes = Vec::new();
        if std::mem::take(&mut self.rewrite_due) {
            for (topic, members) in &self.topics {
                writes.push(TopicWrite {
                    topic: topic.clone(),
                    whole: true,
                    set: members
                        .iter()
                        .map(|(id, meta)| (id.clone(), meta.to_string()))
                        .collect(),
                    delete: Vec::new(),
                    remains: true,
                });
            }
            // Topics whose last member left, in this write or one that
            // failed: their hash goes.
            drop(waiting);
            let mut gone: Vec<Arc<str>> = self
                .stored
                .iter()
                .filter(|topic| !self.topics.contains_key(*topic))
                .cloned()
                .collect();
            gone.sort_unstable();
            for topic in gone {
                writes.push(TopicWrite {
                    topic,
                    whole: true,
                    set: Vec::new(),
                    delete: Vec::new(),
                    remains: false,
                });
            }
        } else {
            for (topic, changes) in waiting {
                let mut write = TopicWrite {
                    remains: self.topics.contains_key(&topic),
                    topic,
                    whole: false,
                    set: Vec::new(),
                    delete: Vec::new(),
                };
                for (id, pending) in changes {
                    match pending.meta {
                        Some(meta) => write.set.push((id, meta.to_string())),
                        None => write.delete.push(id),
                    }
                }
                writes.push(write);
            }
        }
        for write in &writes {
            if write.remains {
                self.stored.insert(write.topic.clone());
            } else if self.stored.remove(&write.topic) {
                self.deleting.push(write.topic.clone());
            }
        }
        self.writing = true;
        self.check();
        Some(writes)
    }

    /// The write in flight is done; one that failed is made good by
    /// rewriting every member with the next.
    pub(super) fn written(&mut self, ok: bool) {
        debug_assert!(self.writing, "a write answered that was never sent");
        self.writing = false;
        let deleting = std::mem::take(&mut self.deleting);
        if !ok {
            self.rewrite_due = true;
            self.stored.extend(deleting);
        }
    }

    /// Changes waiting for Redis.
    pub(super) fn waiting(&self) -> usize {
        self.waiting_count
    }

    fn check(&self) {
        debug_assert_eq!(
            self.waiting_count,
            self.waiting.values().map(HashMap::len).sum::<usize>(),
            "the count of waiting changes is exact"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(text: &str) -> Option<Arc<str>> {
        Some(Arc::from(text))
    }

    #[test]
    fn members_that_come_and_go_between_writes_cost_redis_nothing() {
        let mut members = Members::default();
        let topic: Arc<str> = Arc::from("room:1");
        members.change(topic.clone(), "1".into(), meta("{}"));
        let first = members.next_write().unwrap();
        assert_eq!(first[0].set, [("1".to_string(), "{}".to_string())]);
        // While the first write flies: a thousand members come and go.
        for n in 2..1002 {
            members.change(topic.clone(), n.to_string(), meta("{}"));
            members.change(topic.clone(), n.to_string(), None);
        }
        assert_eq!(members.waiting(), 0);
        assert_eq!(members.next_write(), None, "one write at a time");
        members.written(true);
        assert_eq!(members.next_write(), None, "nothing left to write");
    }

    #[test]
    fn a_written_member_that_leaves_rejoins_and_leaves_is_deleted_once_in_order() {
        let mut members = Members::default();
        let topic: Arc<str> = Arc::from("room:1");
        members.change(topic.clone(), "7".into(), meta("{\"a\":1}"));
        members.next_write().unwrap();
        members.written(true);
        members.change(topic.clone(), "7".into(), None);
        members.change(topic.clone(), "7".into(), meta("{\"a\":2}"));
        members.change(topic.clone(), "7".into(), None);
        let write = members.next_write().unwrap();
        assert_eq!(write.len(), 1);
        assert_eq!(write[0].delete, ["7".to_string()]);
        assert!(write[0].set.is_empty());
        assert!(!write[0].remains, "the hash and the node's entry go");
    }

    #[test]
    fn a_failed_write_rewrites_every_member_whole() {
        let mut members = Members::default();
        members.change(Arc::from("a"), "1".into(), meta("{}"));
        members.change(Arc::from("b"), "2".into(), meta("{}"));
        members.next_write().unwrap();
        members.change(Arc::from("b"), "2".into(), None);
        members.written(false);
        let mut write = members.next_write().unwrap();
        write.sort_by(|x, y| x.topic.cmp(&y.topic));
        assert_eq!(write.len(), 2);
        assert!(write[0].whole && write[0].remains && write[0].set.len() == 1);
        assert!(write[1].whole && !write[1].remains, "b's hash is deleted");
    }
}
