//! A shard's name index: a name (a topic, or a user id) -> the local
//! connections holding it, plus which other shards hold it too (interest), so
//! traffic for the name is forwarded only where it is wanted. Each shard has
//! three: topics -> subscribers, user ids -> relay connections, user ids ->
//! `/chat` connections.
//!
//! Plain data, no I/O: the shard decides what to send when a name gains its
//! first or loses its last local holder; this module tells it when.

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use crate::bus::{ShardId, ShardSet};
use crate::hooks::ChannelId;
use crate::shard::key::ConnKey;

/// A name's slot in one shard's index; meaningless on another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NameId(pub u32);

/// Everything a shard knows about one name.
#[derive(Debug)]
pub struct NameEntry {
    /// The name, shared with envelopes.
    pub name: Arc<str>,
    /// Local connections that receive its traffic. Order is arbitrary.
    pub subscribers: Vec<ConnKey>,
    /// Local connections waiting for other shards to acknowledge this shard's
    /// interest; they become active (a subscriber gets `subscribed`, an
    /// identified upgrade its `101`) when the last acknowledgement arrives.
    pub waiting: Vec<ConnKey>,
    /// Other shards with local holders of this name.
    pub remote: ShardSet,
    /// Acknowledgements still expected for the interest notice of `epoch`.
    pub acks_pending: usize,
    /// Epoch of the latest interest notice this shard sent for the name.
    pub epoch: u64,
    /// For topics: the channel (hook) governing it, resolved once when a local
    /// subscriber first needs it.
    pub channel: Option<ChannelId>,
}

impl NameEntry {
    /// Local connections holding the name, active or waiting.
    pub fn local_count(&self) -> usize {
        self.subscribers.len() + self.waiting.len()
    }
}

/// The name limit of this index is reached: refuse the subscription (or
/// identified connection) that asked for a new name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("topic limit of {0} reached on this shard")]
pub struct NameLimit(pub usize);

/// The index itself.
#[derive(Debug)]
pub struct NameIndex {
    by_name: HashMap<Arc<str>, NameId>,
    entries: Slab<NameEntry>,
    max_names: usize,
}

impl NameIndex {
    /// An empty index holding at most `max_names` names created by local holders.
    pub fn new(max_names: usize) -> NameIndex {
        NameIndex {
            by_name: HashMap::new(),
            entries: Slab::new(),
            max_names,
        }
    }

    /// Names with any local holder or remote interest.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the index holds no name.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds a name.
    pub fn lookup(&self, name: &str) -> Option<NameId> {
        self.by_name.get(name).copied()
    }

    /// The entry of a live id.
    pub fn entry(&self, id: NameId) -> &NameEntry {
        &self.entries[id.0 as usize]
    }

    /// The entry of `id`, if it is live.
    pub fn get(&self, id: NameId) -> Option<&NameEntry> {
        self.entries.get(id.0 as usize)
    }

    /// Every live entry with its id.
    pub fn iter(&self) -> impl Iterator<Item = (NameId, &NameEntry)> {
        self.entries.iter().map(|(i, e)| (NameId(i as u32), e))
    }

    /// The entry of a live id, mutably.
    pub fn entry_mut(&mut self, id: NameId) -> &mut NameEntry {
        &mut self.entries[id.0 as usize]
    }

    /// The entry of `name`, created if absent. `local` creations count
    /// against the limit; remote interest must always be recorded.
    pub fn get_or_insert(&mut self, name: &str, local: bool) -> Result<NameId, NameLimit> {
        if let Some(id) = self.lookup(name) {
            return Ok(id);
        }
        if local && self.entries.len() >= self.max_names {
            return Err(NameLimit(self.max_names));
        }
        let name: Arc<str> = Arc::from(name);
        let id = NameId(self.entries.insert(NameEntry {
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
    pub fn add_subscriber(&mut self, id: NameId, conn: ConnKey) -> u32 {
        let subs = &mut self.entry_mut(id).subscribers;
        subs.push(conn);
        (subs.len() - 1) as u32
    }

    /// Removes the active subscriber at `pos`. If another connection moved into
    /// `pos` to fill the hole, returns it so the caller can update its position.
    pub fn remove_subscriber(&mut self, id: NameId, pos: u32) -> Option<ConnKey> {
        let subs = &mut self.entry_mut(id).subscribers;
        let pos = pos as usize;
        if pos >= subs.len() {
            return None;
        }
        subs.swap_remove(pos);
        subs.get(pos).copied()
    }

    /// Removes `conn` from the waiting list, if it is there.
    pub fn remove_waiting(&mut self, id: NameId, conn: ConnKey) {
        let waiting = &mut self.entry_mut(id).waiting;
        if let Some(i) = waiting.iter().position(|&c| c == conn) {
            waiting.swap_remove(i);
        }
    }

    /// Records that shard `from` gained or lost interest in `name`. Returns
    /// true if the name went (nobody holds it any more).
    pub fn set_remote_interest(&mut self, name: &str, from: ShardId, on: bool) -> bool {
        if on {
            if let Ok(id) = self.get_or_insert(name, false) {
                self.entry_mut(id).remote.insert(from);
            }
            false
        } else if let Some(id) = self.lookup(name) {
            self.entry_mut(id).remote.remove(from);
            self.remove_if_unused(id)
        } else {
            false
        }
    }

    /// Drops a name nobody local or remote holds. Returns true if it went.
    pub fn remove_if_unused(&mut self, id: NameId) -> bool {
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

    fn k(slot: u32) -> ConnKey {
        ConnKey::new(slot, 1)
    }

    #[test]
    fn removal_reports_the_subscriber_that_moved() {
        let mut index = NameIndex::new(10);
        let t = index.get_or_insert("orders", true).unwrap();
        let p0 = index.add_subscriber(t, k(10));
        let _p1 = index.add_subscriber(t, k(11));
        let _p2 = index.add_subscriber(t, k(12));
        assert_eq!(index.remove_subscriber(t, p0), Some(k(12)));
        assert_eq!(index.entry(t).subscribers, vec![k(12), k(11)]);
        assert_eq!(
            index.remove_subscriber(t, 1),
            None,
            "removing the last moves nobody"
        );
    }

    #[test]
    fn topics_live_while_local_or_remote_interest_remains() {
        let mut index = NameIndex::new(10);
        let t = index.get_or_insert("a", true).unwrap();
        index.add_subscriber(t, k(1));
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
        let mut index = NameIndex::new(1);
        index.get_or_insert("a", true).unwrap();
        assert_eq!(index.get_or_insert("b", true), Err(NameLimit(1)));
        index.set_remote_interest("b", ShardId(1), true);
        assert!(index.lookup("b").is_some());
        assert!(
            index.get_or_insert("a", true).is_ok(),
            "existing topics are always found"
        );
    }
}
