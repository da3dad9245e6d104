//! The memory engine: streams kept by their home shard, in memory.
//!
//! Each stream keeps its publications oldest first, bounded by its rule's
//! `history_size` and `history_ttl_s`; the engine as a whole is bounded by
//! `max_history_bytes`, evicting the oldest publications first whatever
//! their stream. A stream whose history is empty and that nobody holds,
//! idle for a whole TTL, is forgotten: its next publication starts a new
//! epoch, so no client can mistake the new offsets for the old. A stream
//! that someone holds keeps its offset and epoch however empty its history
//! (TTL, byte bound): its subscribers' offsets must keep growing, and a
//! position older than what is kept is refused as gone all the same.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{EngineStats, Position, Publication, Recovery, StreamEngine};
use crate::rules::History;

/// Bytes a stored publication costs beyond its frame: its entry in the
/// stream, its place in the eviction order (a shared topic name and a
/// sequence number) and the frame's `Bytes` handle. Counted so the byte
/// bound holds for many small publications too.
const ENTRY_OVERHEAD_BYTES: usize =
    std::mem::size_of::<Entry>() + std::mem::size_of::<(Arc<str>, u64)>();

/// One stored publication.
struct Entry {
    offset: u64,
    /// Position in the engine-wide eviction order.
    seq: u64,
    frame: Bytes,
    at: Instant,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.frame.len() + ENTRY_OVERHEAD_BYTES
    }
}

struct Stream {
    epoch: Arc<str>,
    /// Offset of the latest publication.
    offset: u64,
    entries: VecDeque<Entry>,
    history: History,
    /// When it was created or last published to: a stream idle for its TTL
    /// with nothing left in history is forgotten.
    touched: Instant,
}

/// The memory engine of one home shard.
pub struct MemoryEngine {
    streams: HashMap<Arc<str>, Stream>,
    /// Stored publications in the order they were appended, across streams.
    /// Entries a stream dropped on its own (size, TTL) stay until they reach
    /// the front or a compaction, and are recognised by their sequence number.
    order: VecDeque<(Arc<str>, u64)>,
    next_seq: u64,
    max_bytes: usize,
    stats: EngineStats,
}

impl MemoryEngine {
    /// An empty engine keeping at most `max_bytes` of history.
    pub fn new(max_bytes: usize) -> MemoryEngine {
        MemoryEngine {
            streams: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            max_bytes,
            stats: EngineStats::default(),
        }
    }

    /// The stream of `topic` with expired publications dropped, created if
    /// absent (or forgotten meanwhile).
    fn open(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> &mut Stream {
        self.drop_expired(topic, now);
        if !self.streams.contains_key(topic) {
            self.stats.streams += 1;
            self.stats.epoch_changes += 1;
            let stream = Stream {
                epoch: epoch(),
                offset: 0,
                entries: VecDeque::new(),
                history: *history,
                touched: now,
            };
            self.streams.insert(Arc::from(topic), stream);
        }
        let stream = self
            .streams
            .get_mut(topic)
            .expect("inserted above when absent");
        // A rule's settings may differ from when the stream was created (a
        // library changed its hook); the newest win.
        stream.history = *history;
        stream
    }

    /// Drops `topic`'s expired publications.
    fn drop_expired(&mut self, topic: &str, now: Instant) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        let ttl = stream.history.ttl;
        while let Some(entry) = stream.entries.front() {
            if now.saturating_duration_since(entry.at) < ttl {
                break;
            }
            let bytes = entry.bytes();
            stream.entries.pop_front();
            self.stats.publications -= 1;
            self.stats.stored_bytes -= bytes as u64;
            self.stats.evictions += 1;
        }
    }

    /// Evicts the oldest publications, whatever their stream, until the
    /// engine is within its byte bound. A stream emptied this way keeps its
    /// position (forgetting it is for [`StreamEngine::expire`]).
    fn enforce_bytes(&mut self) {
        while self.stats.stored_bytes as usize > self.max_bytes {
            let Some((topic, seq)) = self.order.pop_front() else {
                break;
            };
            let Some(stream) = self.streams.get_mut(&topic) else {
                continue;
            };
            if stream.entries.front().map(|e| e.seq) != Some(seq) {
                continue; // already dropped by the stream's own bounds
            }
            if let Some(entry) = stream.entries.pop_front() {
                self.stats.publications -= 1;
                self.stats.stored_bytes -= entry.bytes() as u64;
                self.stats.evictions += 1;
            }
        }
        self.compact_order();
    }

    /// Drops order entries of publications already gone once they are the
    /// majority, so the order stays proportional to what is stored.
    fn compact_order(&mut self) {
        let live = self.stats.publications as usize;
        if self.order.len() <= 2 * live + 1024 {
            return;
        }
        let streams = &self.streams;
        self.order.retain(|(topic, seq)| {
            streams
                .get(topic)
                .is_some_and(|s| s.entries.binary_search_by_key(seq, |e| e.seq).is_ok())
        });
    }
}

impl StreamEngine for MemoryEngine {
    fn publish(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
        frame: &mut dyn FnMut(u64) -> Bytes,
    ) -> (Position, Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let stream = self.open(topic, history, now, epoch);
        stream.offset += 1;
        stream.touched = now;
        let offset = stream.offset;
        let frame = frame(offset);
        let entry = Entry {
            offset,
            seq,
            frame: frame.clone(),
            at: now,
        };
        let mut added = entry.bytes() as i64;
        stream.entries.push_back(entry);
        let mut evicted = 0;
        while stream.entries.len() > stream.history.size.max(1) {
            if let Some(old) = stream.entries.pop_front() {
                added -= old.bytes() as i64;
                evicted += 1;
            }
        }
        let position = Position {
            offset,
            epoch: stream.epoch.clone(),
        };
        self.stats.publications = self.stats.publications + 1 - evicted;
        self.stats.stored_bytes = (self.stats.stored_bytes as i64 + added) as u64;
        self.stats.evictions += evicted;
        self.order.push_back((
            self.streams
                .get_key_value(topic)
                .map_or_else(|| Arc::from(topic), |(k, _)| k.clone()),
            seq,
        ));
        self.enforce_bytes();
        (position, frame)
    }

    fn position(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Position {
        let stream = self.open(topic, history, now, epoch);
        Position {
            offset: stream.offset,
            epoch: stream.epoch.clone(),
        }
    }

    fn recover(
        &mut self,
        topic: &str,
        history: &History,
        since: &Position,
        limit: usize,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Recovery {
        let stream = self.open(topic, history, now, epoch);
        let position = Position {
            offset: stream.offset,
            epoch: stream.epoch.clone(),
        };
        let oldest = stream
            .entries
            .front()
            .map_or(stream.offset + 1, |e| e.offset);
        let in_history = since.epoch == stream.epoch
            && since.offset <= stream.offset
            && since.offset.saturating_add(1) >= oldest;
        if !in_history {
            return Recovery::Gone { position };
        }
        let publications = stream
            .entries
            .iter()
            .filter(|e| e.offset > since.offset)
            .take(limit)
            .map(|e| Publication {
                offset: e.offset,
                frame: e.frame.clone(),
            })
            .collect();
        Recovery::Recovered {
            publications,
            position,
        }
    }

    fn latest(&mut self, topic: &str, count: usize, now: Instant) -> Vec<Publication> {
        self.drop_expired(topic, now);
        let Some(stream) = self.streams.get(topic) else {
            return Vec::new();
        };
        let skip = stream.entries.len().saturating_sub(count);
        stream
            .entries
            .iter()
            .skip(skip)
            .map(|e| Publication {
                offset: e.offset,
                frame: e.frame.clone(),
            })
            .collect()
    }

    fn expire(&mut self, now: Instant, held: &dyn Fn(&str) -> bool) {
        let topics: Vec<Arc<str>> = self.streams.keys().cloned().collect();
        for topic in topics {
            self.drop_expired(&topic, now);
            let forget = self.streams.get(&topic).is_some_and(|s| {
                s.entries.is_empty() && now.saturating_duration_since(s.touched) >= s.history.ttl
            });
            if forget && !held(&topic) {
                self.streams.remove(&topic);
                self.stats.streams -= 1;
            }
        }
        self.compact_order();
    }

    fn stats(&self) -> EngineStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn history(size: usize, ttl_s: u64) -> History {
        History {
            size,
            ttl: Duration::from_secs(ttl_s),
            replay_on_subscribe: 0,
        }
    }

    /// Epochs "e1", "e2", ... in creation order.
    fn epochs() -> impl FnMut() -> Arc<str> {
        let mut n = 0;
        move || {
            n += 1;
            Arc::from(format!("e{n}"))
        }
    }

    fn frame(offset: u64) -> Bytes {
        Bytes::from(format!("push-{offset}"))
    }

    fn offsets(publications: &[Publication]) -> Vec<u64> {
        publications.iter().map(|p| p.offset).collect()
    }

    fn publish(
        engine: &mut MemoryEngine,
        topic: &str,
        h: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Position {
        engine.publish(topic, h, now, epoch, &mut frame).0
    }

    #[test]
    fn offsets_count_up_per_topic_and_the_frame_is_built_for_its_offset() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        let (a1, f1) = engine.publish("a", &h, now, &mut epoch, &mut frame);
        let (b1, _) = engine.publish("b", &h, now, &mut epoch, &mut frame);
        let (a2, f2) = engine.publish("a", &h, now, &mut epoch, &mut frame);
        assert_eq!((a1.offset, b1.offset, a2.offset), (1, 1, 2));
        assert_eq!((f1, f2), (frame(1), frame(2)));
        assert_eq!(a1.epoch, a2.epoch);
        assert_ne!(a1.epoch, b1.epoch, "each stream has its own epoch");
    }

    #[test]
    fn recovery_replays_what_came_after_the_position_in_order() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        let mut last = Position {
            offset: 0,
            epoch: Arc::from(""),
        };
        for _ in 0..5 {
            last = publish(&mut engine, "t", &h, now, &mut epoch);
        }
        let since = Position {
            offset: 2,
            epoch: last.epoch.clone(),
        };
        match engine.recover("t", &h, &since, usize::MAX, now, &mut epoch) {
            Recovery::Recovered {
                publications,
                position,
            } => {
                assert_eq!(offsets(&publications), [3, 4, 5]);
                assert_eq!(position, last);
            }
            Recovery::Gone { .. } => panic!("offset 2 is in history"),
        }
        let current = engine.recover("t", &h, &last, usize::MAX, now, &mut epoch);
        assert!(
            matches!(current, Recovery::Recovered { publications, .. } if publications.is_empty())
        );
    }

    #[test]
    fn a_stale_epoch_an_evicted_offset_or_a_future_offset_is_gone() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, now, mut epoch) = (history(3, 60), Instant::now(), epochs());
        let mut last = Position {
            offset: 0,
            epoch: Arc::from(""),
        };
        for _ in 0..6 {
            last = publish(&mut engine, "t", &h, now, &mut epoch);
        }
        let gone = |engine: &mut MemoryEngine, offset: u64, e: &Arc<str>| {
            let since = Position {
                offset,
                epoch: e.clone(),
            };
            let mut epoch = epochs();
            matches!(
                engine.recover("t", &h, &since, usize::MAX, now, &mut epoch),
                Recovery::Gone { .. }
            )
        };
        assert!(gone(&mut engine, 5, &Arc::from("other")), "another epoch");
        assert!(
            gone(&mut engine, 2, &last.epoch),
            "offsets 3 and below were evicted (size 3 keeps 4..6)"
        );
        assert!(
            !gone(&mut engine, 3, &last.epoch),
            "from 3, everything after is kept"
        );
        assert!(
            gone(&mut engine, 7, &last.epoch),
            "a position the stream never reached"
        );
    }

    #[test]
    fn publications_expire_and_an_idle_empty_stream_starts_a_new_epoch() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, start, mut epoch) = (history(10, 10), Instant::now(), epochs());
        let first = publish(&mut engine, "t", &h, start, &mut epoch);
        publish(
            &mut engine,
            "t",
            &h,
            start + Duration::from_secs(5),
            &mut epoch,
        );
        let nobody = |_: &str| false;
        engine.expire(start + Duration::from_secs(12), &nobody);
        assert_eq!(
            offsets(&engine.latest("t", 10, start + Duration::from_secs(12))),
            [2]
        );
        engine.expire(start + Duration::from_secs(16), &nobody);
        assert_eq!(engine.stats().streams, 0, "empty and idle for its TTL");
        let again = publish(
            &mut engine,
            "t",
            &h,
            start + Duration::from_secs(20),
            &mut epoch,
        );
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, first.epoch);
    }

    #[test]
    fn a_held_stream_is_not_forgotten_however_long_idle() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, start, mut epoch) = (history(10, 10), Instant::now(), epochs());
        let first = publish(&mut engine, "t", &h, start, &mut epoch);
        let later = start + Duration::from_secs(60);
        engine.expire(later, &|topic| topic == "t");
        assert!(engine.latest("t", 10, later).is_empty(), "expired");
        let next = publish(&mut engine, "t", &h, later, &mut epoch);
        assert_eq!((next.offset, &next.epoch), (2, &first.epoch));
        let before = Position {
            offset: 0,
            epoch: first.epoch.clone(),
        };
        match engine.recover("t", &h, &before, 10, later, &mut epoch) {
            Recovery::Gone { position } => assert_eq!(position, next),
            Recovery::Recovered { .. } => panic!("offset 1 expired"),
        }
    }

    #[test]
    fn the_byte_bound_evicts_oldest_first_across_topics_and_an_emptied_stream_keeps_its_position() {
        let per = frame(1).len() + ENTRY_OVERHEAD_BYTES;
        let mut engine = MemoryEngine::new(3 * per);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        let a = publish(&mut engine, "a", &h, now, &mut epoch);
        publish(&mut engine, "b", &h, now, &mut epoch);
        publish(&mut engine, "b", &h, now, &mut epoch);
        publish(&mut engine, "b", &h, now, &mut epoch);
        let stats = engine.stats();
        assert_eq!(
            (stats.publications, stats.evictions, stats.streams),
            (3, 1, 2),
            "`a` is empty, and kept until `expire` forgets it"
        );
        assert!(stats.stored_bytes as usize <= 3 * per);
        let since = Position {
            offset: 0,
            epoch: a.epoch.clone(),
        };
        assert!(
            matches!(engine.recover("a", &h, &since, 10, now, &mut epoch), Recovery::Gone { position } if position == a),
            "offset 1 was evicted; the stream is still at 1"
        );
        let next = publish(&mut engine, "a", &h, now, &mut epoch);
        assert_eq!((next.offset, &next.epoch), (2, &a.epoch));
    }

    #[test]
    fn the_eviction_order_stays_proportional_to_what_is_stored() {
        let mut engine = MemoryEngine::new(1 << 30);
        let (h, now, mut epoch) = (history(2, 60), Instant::now(), epochs());
        for _ in 0..100_000 {
            publish(&mut engine, "t", &h, now, &mut epoch);
        }
        assert_eq!(engine.stats().publications, 2);
        assert!(engine.order.len() <= 2 * 2 + 1024 + 1);
    }

    #[test]
    fn latest_returns_the_newest_oldest_first() {
        let mut engine = MemoryEngine::new(1 << 20);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        for _ in 0..5 {
            publish(&mut engine, "t", &h, now, &mut epoch);
        }
        assert_eq!(offsets(&engine.latest("t", 2, now)), [4, 5]);
        assert_eq!(offsets(&engine.latest("t", 9, now)), [1, 2, 3, 4, 5]);
        assert!(engine.latest("nope", 3, now).is_empty());
    }
}
