//! A shard's topic index: topic -> local subscribers, plus which other shards
//! have subscribers of their own (interest), so a publish is forwarded only
//! where it is wanted.
//!
//! Plain data, no I/O: the shard decides what to send when a topic gains its
//! first or loses its last local subscriber; this module tells it when.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use crate::bus::{ShardId, ShardSet};
use crate::hooks::ChannelId;

/// A connection's slot in its shard's slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u32);

/// A topic's slot in one shard's index; meaningless on another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(pub u32);

/// Everything a shard knows about one topic.
#[derive(Debug)]
pub struct TopicEntry {
    /// The topic name, shared with envelopes.
    pub name: Arc<str>,
    /// Local connections that receive pushes. Order is arbitrary.
    pub subscribers: Vec<ConnId>,
    /// Local connections whose subscription waits for other shards to
    /// acknowledge this shard's interest; they get `subscribed` when it arrives.
    pub waiting: Vec<ConnId>,
    /// Other shards with subscribers of this topic.
    pub remote: ShardSet,
    /// Acknowledgements still expected for the interest notice of `epoch`.
    pub acks_pending: usize,
    /// Epoch of the latest interest notice this shard sent for the topic.
    pub epoch: u64,
    /// The channel (hook) governing the topic, resolved once when a local
    /// subscriber first needs it.
    pub channel: Option<ChannelId>,
}

impl TopicEntry {
    /// Local connections holding the topic, active or waiting.
    pub fn local_count(&self) -> usize {
        self.subscribers.len() + self.waiting.len()
    }
}

/// The topic limit of this shard is reached.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("topic limit of {0} reached on this shard")]
pub struct TopicLimit(pub usize);

/// The index itself.
#[derive(Debug)]
pub struct TopicIndex {
    by_name: HashMap<Arc<str>, TopicId>,
    entries: Slab<TopicEntry>,
    max_topics: usize,
}

impl TopicIndex {
    /// An empty index holding at most `max_topics` topics created by local subscribers.
    pub fn new(max_topics: usize) -> TopicIndex {
        TopicIndex {
            by_name: HashMap::new(),
            entries: Slab::new(),
            max_topics,
        }
    }

    /// Topics with any local subscriber or remote interest.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the index holds no topic.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds a topic by name.
    pub fn lookup(&self, name: &str) -> Option<TopicId> {
        self.by_name.get(name).copied()
    }

    /// The entry of a live topic id.
    pub fn entry(&self, id: TopicId) -> &TopicEntry {
        &self.entries[id.0 as usize]
    }

    /// The entry of a live topic id, mutably.
    pub fn entry_mut(&mut self, id: TopicId) -> &mut TopicEntry {
        &mut self.entries[id.0 as usize]
    }

    /// The topic named `name`, created if absent. `local` creations count
    /// against the topic limit; remote interest must always be recorded.
    pub fn get_or_insert(&mut self, name: &str, local: bool) -> Result<TopicId, TopicLimit> {
        if let Some(id) = self.lookup(name) {
            return Ok(id);
        }
        if local && self.entries.len() >= self.max_topics {
            return Err(TopicLimit(self.max_topics));
        }
        let name: Arc<str> = Arc::from(name);
        let id = TopicId(self.entries.insert(TopicEntry {
            name: name.clone(),
            subscribers: Vec::new(),
            waiting: Vec::new(),
            remote: ShardSet::default(),
            acks_pending: 0,
            epoch: 0,
            channel: None,
        }) as u32);
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// Makes `conn` an active subscriber; returns its position, which the
    /// caller keeps to remove it in O(1).
    pub fn add_subscriber(&mut self, id: TopicId, conn: ConnId) -> u32 {
        let subs = &mut self.entry_mut(id).subscribers;
        subs.push(conn);
        (subs.len() - 1) as u32
    }

    /// Removes the active subscriber at `pos`. If another connection moved into
    /// `pos` to fill the hole, returns it so the caller can update its position.
    pub fn remove_subscriber(&mut self, id: TopicId, pos: u32) -> Option<ConnId> {
        let subs = &mut self.entry_mut(id).subscribers;
        let pos = pos as usize;
        if pos >= subs.len() {
            return None;
        }
        subs.swap_remove(pos);
        subs.get(pos).copied()
    }

    /// Removes `conn` from the waiting list, if it is there.
    pub fn remove_waiting(&mut self, id: TopicId, conn: ConnId) {
        let waiting = &mut self.entry_mut(id).waiting;
        if let Some(i) = waiting.iter().position(|&c| c == conn) {
            waiting.swap_remove(i);
        }
    }

    /// Records that shard `from` gained or lost interest in `name`.
    pub fn set_remote_interest(&mut self, name: &str, from: ShardId, on: bool) {
        if on {
            if let Ok(id) = self.get_or_insert(name, false) {
                self.entry_mut(id).remote.insert(from);
            }
        } else if let Some(id) = self.lookup(name) {
            self.entry_mut(id).remote.remove(from);
            self.remove_if_unused(id);
        }
    }

    /// Drops a topic nobody local or remote holds. Returns true if it went.
    pub fn remove_if_unused(&mut self, id: TopicId) -> bool {
        let entry = self.entry(id);
        if entry.local_count() > 0 || !entry.remote.is_empty() {
            return false;
        }
        let entry = self.entries.remove(id.0 as usize);
        self.by_name.remove(&entry.name);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_reports_the_subscriber_that_moved() {
        let mut index = TopicIndex::new(10);
        let t = index.get_or_insert("orders", true).unwrap();
        let p0 = index.add_subscriber(t, ConnId(10));
        let _p1 = index.add_subscriber(t, ConnId(11));
        let _p2 = index.add_subscriber(t, ConnId(12));
        assert_eq!(index.remove_subscriber(t, p0), Some(ConnId(12)));
        assert_eq!(index.entry(t).subscribers, vec![ConnId(12), ConnId(11)]);
        assert_eq!(
            index.remove_subscriber(t, 1),
            None,
            "removing the last moves nobody"
        );
    }

    #[test]
    fn topics_live_while_local_or_remote_interest_remains() {
        let mut index = TopicIndex::new(10);
        let t = index.get_or_insert("a", true).unwrap();
        index.add_subscriber(t, ConnId(1));
        index.set_remote_interest("a", ShardId(3), true);
        index.remove_subscriber(t, 0);
        assert!(!index.remove_if_unused(t), "shard 3 still wants it");
        assert_eq!(
            index.entry(t).remote.iter().collect::<Vec<_>>(),
            vec![ShardId(3)]
        );
        index.set_remote_interest("a", ShardId(3), false);
        assert!(index.lookup("a").is_none());
        assert!(index.is_empty());
    }

    #[test]
    fn the_limit_applies_to_local_topics_only() {
        let mut index = TopicIndex::new(1);
        index.get_or_insert("a", true).unwrap();
        assert_eq!(index.get_or_insert("b", true), Err(TopicLimit(1)));
        index.set_remote_interest("b", ShardId(1), true);
        assert!(index.lookup("b").is_some());
        assert!(
            index.get_or_insert("a", true).is_ok(),
            "existing topics are always found"
        );
    }
}
