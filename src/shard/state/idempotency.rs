//! Idempotency keys of stream publications, on their home shard: a publish
//! retried with the same key within the window is answered with the first
//! one's position and stored once.
//!
//! A publisher whose request failed without an answer (a dropped
//! connection, a timeout) cannot know whether its publication was stored;
//! with a key it retries safely. The cache is bounded in bytes: past the
//! bound the oldest keys go first (counted), and a retry of an evicted key
//! would be stored again, so the bound is sized for the window's traffic.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::engine::Position;

/// Bookkeeping bytes per key beside the key's text: the table entry, the
/// position, and the expiry queue's entry.
const ENTRY_BYTES: usize = 96;

/// The keys of one home shard's streams, oldest first.
pub(crate) struct Idempotency {
    window: Duration,
    max_bytes: usize,
    bytes: usize,
    /// `<topic length>:<topic><key>` -> the first publication's position.
    positions: HashMap<Box<str>, Position>,
    /// When each key was stored, in that order.
    order: VecDeque<(Instant, Box<str>)>,
    /// Keys dropped for the byte bound before their window ended.
    evicted: u64,
}

impl Idempotency {
    pub(crate) fn new(window: Duration, max_bytes: usize) -> Idempotency {
        Idempotency {
            window,
            max_bytes,
            bytes: 0,
            positions: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    fn id(topic: &str, key: &str) -> Box<str> {
        format!("{}:{topic}{key}", topic.len()).into_boxed_str()
    }

    fn entry_bytes(id: &str, position: &Position) -> usize {
        2 * id.len() + position.epoch.len() + ENTRY_BYTES
    }

    /// The position the first publish with `key` to `topic` got, if it is
    /// still within the window.
    pub(crate) fn get(&mut self, topic: &str, key: &str, now: Instant) -> Option<Position> {
        self.expire(now);
        self.positions.get(&*Self::id(topic, key)).cloned()
    }

    /// Remembers the position a publish with `key` got.
    pub(crate) fn insert(&mut self, topic: &str, key: &str, position: Position, now: Instant) {
        let id = Self::id(topic, key);
        let bytes = Self::entry_bytes(&id, &position);
        if bytes > self.max_bytes {
            self.evicted += 1;
            return;
        }
        if let Some(old) = self.positions.insert(id.clone(), position) {
            // Only a key not found is inserted; keep the accounting exact anyway.
            self.bytes -= Self::entry_bytes(&id, &old);
            self.order.retain(|(_, queued)| *queued != id);
        }
        self.bytes += bytes;
        self.order.push_back((now, id));
        while self.bytes > self.max_bytes {
            self.evicted += 1;
            self.pop_oldest();
        }
        debug_assert_eq!(self.positions.len(), self.order.len());
    }

    /// Forgets keys older than the window.
    pub(crate) fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.window)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            if let Some(position) = self.positions.remove(&id) {
                self.bytes -= Self::entry_bytes(&id, &position);
            }
        }
    }

    /// Bytes the keys hold.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys dropped for the byte bound before their window ended.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn at(offset: u64) -> Position {
        Position {
            offset,
            epoch: Arc::from("e"),
        }
    }

    #[test]
    fn a_key_answers_its_first_position_until_the_window_ends() {
        let start = Instant::now();
        let mut keys = Idempotency::new(Duration::from_secs(300), 1 << 20);
        assert_eq!(keys.get("t", "k", start), None);
        keys.insert("t", "k", at(7), start);
        assert_eq!(
            keys.get("t", "k", start + Duration::from_secs(300)),
            Some(at(7))
        );
        assert_eq!(keys.get("u", "k", start), None, "keys are per topic");
        assert_eq!(keys.get("t", "k", start + Duration::from_secs(301)), None);
        assert_eq!(keys.bytes(), 0);
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_keys_and_counts_them() {
        let start = Instant::now();
        let mut keys = Idempotency::new(Duration::from_secs(300), 10 * 200);
        for n in 0..100u64 {
            keys.insert("topic", &format!("key-{n}"), at(n), start);
            assert!(keys.bytes() <= 10 * 200);
        }
        assert!(keys.evicted() > 0);
        assert_eq!(keys.get("topic", "key-99", start), Some(at(99)));
        assert_eq!(keys.get("topic", "key-0", start), None);
        // Topic and key never run together into another pair's id.
        keys.insert("ab", "c", at(1), start);
        assert_eq!(keys.get("a", "bc", start), None);
    }
}
