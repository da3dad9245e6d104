//! The memory engine: streams kept by their home shard, in memory.
//!
//! Each stream keeps its publications oldest first, bounded by its rule's
//! `history_size` and `history_ttl_s`; the engine as a whole is bounded by
//! `max_history_bytes`, evicting the oldest publications first whatever
//! their stream, and by `max_streams`. A stream exists only once it is
//! published to or held by a subscriber: reads of an unknown stream answer
//! [`Position::empty`] and store nothing. A stream whose history is empty
//! and that nobody holds, idle for a whole TTL, is forgotten (at once when
//! it was never published to): its next publication starts a new epoch, so
//! no client can mistake the new offsets for the old. A stream that someone
//! holds keeps its offset and epoch however empty its history (TTL, byte
//! bound): its subscribers' offsets must keep growing, and a position older
//! than what is kept is refused as gone all the same.
//!
//! Expiry is driven by a time-ordered index with one entry per stream (when
//! its oldest publication expires, or when it has been idle a TTL), so a
//! sweep costs what it expires, not what is stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{EngineStats, Position, Publication, Recovery, StreamEngine, StreamLimit, Window};
use crate::rules::History;

/// Bytes a stored publication costs beyond its frame: its entry in the
/// stream, its place in the eviction order (a shared topic name and a
/// sequence number) and the frame's `Bytes` handle. Counted so the byte
/// bound holds for many small publications too.
const ENTRY_OVERHEAD_BYTES: usize =
    std::mem::size_of::<Entry>() + std::mem::size_of::<(Arc<str>, u64)>();

/// Bytes a stream costs beyond its name and epoch: its table entry (key
/// and value, twice for the table's slack), its entry in the expiry index
/// (twice, for the tree's nodes), the smallest buffer its publications
/// take (four entries), and the headers and rounding of its name's and
/// epoch's allocations. A model checked against RSS: 20,000 streams of one
/// 100-byte publication each grew a shard by 992 bytes a stream, where
/// this and the publication's own count give 890.
const STREAM_OVERHEAD_BYTES: usize = 2
    * (std::mem::size_of::<Arc<str>>() + std::mem::size_of::<Stream>())
    + 2 * (std::mem::size_of::<DueKey>() + std::mem::size_of::<Arc<str>>())
    + 4 * std::mem::size_of::<Entry>()
    + 2 * 32;

/// Soonest a stream is looked at again after a look.
const MIN_RECHECK: Duration = Duration::from_millis(1);

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

/// When a stream next needs a look, and which run of it (a name forgotten
/// and created again is another run).
type DueKey = (Instant, u64);

struct Stream {
    epoch: Arc<str>,
    /// Offset of the latest publication.
    offset: u64,
    entries: VecDeque<Entry>,
    history: History,
    /// When it was created or last published to: a stream idle for its TTL
    /// with nothing left in history is forgotten.
    touched: Instant,
    /// Its one entry in the expiry index.
    due: DueKey,
}

impl Stream {
    /// When it next needs a look: its oldest publication's expiry, or the
    /// end of its idle TTL when it keeps none.
    fn next_due(&self) -> Instant {
        match self.entries.front() {
            Some(entry) => entry.at + self.history.ttl,
            None => self.touched + self.history.ttl,
        }
    }

    /// Nothing kept, and no publication for a whole TTL.
    fn is_idle(&self, now: Instant) -> bool {
        self.entries.is_empty() && now.saturating_duration_since(self.touched) >= self.history.ttl
    }

    fn meta_bytes(&self, topic: &str) -> usize {
        STREAM_OVERHEAD_BYTES + topic.len() + self.epoch.len()
    }
}

/// The memory engine of one home shard.
pub struct MemoryEngine {
    streams: HashMap<Arc<str>, Stream>,
    /// Stored publications in the order they were appended, across streams.
    /// Entries a stream dropped on its own (size, TTL) stay until they reach
    /// the front or a compaction, and are recognised by their sequence number.
    order: VecDeque<(Arc<str>, u64)>,
    /// Every stream by when it next needs a look, earliest first.
    due: BTreeMap<DueKey, Arc<str>>,
    next_seq: u64,
    /// Numbers runs of streams, so two runs of one name never share a key.
    next_run: u64,
    max_bytes: usize,
    max_streams: usize,
    stats: EngineStats,
    /// Streams looked at by `expire`, to show what a sweep costs.
    #[cfg(test)]
    looks: usize,
}

impl MemoryEngine {
    /// An empty engine keeping at most `max_bytes` of history in at most
    /// `max_streams` streams.
    pub fn new(max_bytes: usize, max_streams: usize) -> MemoryEngine {
        MemoryEngine {
            streams: HashMap::new(),
            order: VecDeque::new(),
            due: BTreeMap::new(),
            next_seq: 0,
            next_run: 0,
            max_bytes,
            max_streams,
            stats: EngineStats::default(),
            #[cfg(test)]
            looks: 0,
        }
    }

    /// The stream of `topic` with expired publications dropped, created if
    /// absent (or forgotten meanwhile) within the stream limit.
    fn open(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Result<&mut Stream, StreamLimit> {
        self.drop_expired(topic, now);
        if !self.streams.contains_key(topic) {
            if self.streams.len() >= self.max_streams {
                self.stats.refused += 1;
                return Err(StreamLimit(self.max_streams));
            }
            self.stats.streams += 1;
            self.stats.epoch_changes += 1;
            self.next_run += 1;
            let mut stream = Stream {
                epoch: epoch(),
                offset: 0,
                entries: VecDeque::new(),
                history: *history,
                touched: now,
                due: (now, self.next_run),
            };
            stream.due.0 = stream.next_due();
            let name: Arc<str> = Arc::from(topic);
            self.stats.meta_bytes += stream.meta_bytes(topic) as u64;
            self.due.insert(stream.due, name.clone());
            self.streams.insert(name, stream);
        }
        let stream = self
            .streams
            .get_mut(topic)
            .expect("inserted above when absent");
        // A rule's settings may differ from when the stream was created (a
        // library changed its hook); the newest win.
        stream.history = *history;
        Ok(stream)
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

    /// Forgets `topic`'s stream.
    fn forget(&mut self, topic: &str) {
        let Some((name, stream)) = self.streams.remove_entry(topic) else {
            return;
        };
        debug_assert!(stream.entries.is_empty(), "forgot a stream with history");
        self.due.remove(&stream.due);
        self.stats.streams -= 1;
        self.stats.meta_bytes -= stream.meta_bytes(&name) as u64;
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

    /// Whether a stream nobody holds may be forgotten now: never published
    /// to, or nothing kept and idle for its TTL.
    fn forgettable(stream: &Stream, now: Instant) -> bool {
        stream.offset == 0 || stream.is_idle(now)
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
    ) -> Result<(Position, Bytes), StreamLimit> {
        let seq = self.next_seq;
        let stream = self.open(topic, history, now, epoch)?;
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
        self.next_seq += 1;
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
        Ok((position, frame))
    }

    fn position(&mut self, topic: &str, now: Instant) -> Position {
        self.drop_expired(topic, now);
        self.streams
            .get(topic)
            .map_or_else(Position::empty, |stream| Position {
                offset: stream.offset,
                epoch: stream.epoch.clone(),
            })
    }

    fn hold(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Result<Position, StreamLimit> {
        let stream = self.open(topic, history, now, epoch)?;
        Ok(Position {
            offset: stream.offset,
            epoch: stream.epoch.clone(),
        })
    }

    fn recover(&mut self, topic: &str, since: &Position, window: Window, now: Instant) -> Recovery {
        self.drop_expired(topic, now);
        let Some(stream) = self.streams.get(topic) else {
            let position = Position::empty();
            return if *since == position {
                Recovery::Recovered {
                    publications: Vec::new(),
                    position,
                    more: false,
                }
            } else {
                Recovery::Gone { position }
            };
        };
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
        // Offsets in a stream are consecutive, so the first one wanted is
        // found by arithmetic, not by a scan.
        let skip = (since.offset + 1).saturating_sub(oldest) as usize;
        let mut publications = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for entry in stream.entries.iter().skip(skip) {
            let full = publications.len() >= window.limit
                || (!publications.is_empty() && bytes + entry.frame.len() > window.max_bytes);
            if full {
                more = true;
                break;
            }
            bytes += entry.frame.len();
            publications.push(Publication {
                offset: entry.offset,
                frame: entry.frame.clone(),
            });
        }
        Recovery::Recovered {
            publications,
            position,
            more,
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
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let topic = entry.remove();
            #[cfg(test)]
            {
                self.looks += 1;
            }
            self.drop_expired(&topic, now);
            let Some(stream) = self.streams.get_mut(&topic) else {
                debug_assert!(false, "a due entry outlived its stream");
                continue;
            };
            let idle = stream.is_idle(now);
            if idle && !held(&topic) {
                self.forget(&topic);
                continue;
            }
            // A held stream idle past its TTL is looked at again a TTL later
            // (its release forgets it sooner). Strictly later than `now`, so
            // the loop ends whatever the TTL.
            let next = if idle {
                now + stream.history.ttl
            } else {
                stream.next_due()
            };
            stream.due.0 = next.max(now + MIN_RECHECK);
            self.due.insert(stream.due, topic);
        }
        self.compact_order();
    }

    fn release(&mut self, topic: &str, now: Instant) {
        self.drop_expired(topic, now);
        if self
            .streams
            .get(topic)
            .is_some_and(|s| MemoryEngine::forgettable(s, now))
        {
            self.forget(topic);
        }
    }

    fn stats(&self) -> EngineStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ALL: Window = Window {
        limit: usize::MAX,
        max_bytes: usize::MAX,
    };

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
        engine.publish(topic, h, now, epoch, &mut frame).unwrap().0
    }

    #[test]
    fn offsets_count_up_per_topic_and_the_frame_is_built_for_its_offset() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        let (a1, f1) = engine
            .publish("a", &h, now, &mut epoch, &mut frame)
            .unwrap();
        let (b1, _) = engine
            .publish("b", &h, now, &mut epoch, &mut frame)
            .unwrap();
        let (a2, f2) = engine
            .publish("a", &h, now, &mut epoch, &mut frame)
            .unwrap();
        assert_eq!((a1.offset, b1.offset, a2.offset), (1, 1, 2));
        assert_eq!((f1, f2), (frame(1), frame(2)));
        assert_eq!(a1.epoch, a2.epoch);
        assert_ne!(a1.epoch, b1.epoch, "each stream has its own epoch");
    }

    #[test]
    fn recovery_replays_what_came_after_the_position_in_order() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
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
        match engine.recover("t", &since, ALL, now) {
            Recovery::Recovered {
                publications,
                position,
                more,
            } => {
                assert_eq!(offsets(&publications), [3, 4, 5]);
                assert!(!more);
                assert_eq!(position, last);
            }
            Recovery::Gone { .. } => panic!("offset 2 is in history"),
        }
        let current = engine.recover("t", &last, ALL, now);
        assert!(
            matches!(current, Recovery::Recovered { publications, .. } if publications.is_empty())
        );
    }

    #[test]
    fn a_stale_epoch_an_evicted_offset_or_a_future_offset_is_gone() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
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
            matches!(engine.recover("t", &since, ALL, now), Recovery::Gone { .. })
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
        let mut engine = MemoryEngine::new(1 << 20, 1000);
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
        let mut engine = MemoryEngine::new(1 << 20, 1000);
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
        match engine.recover("t", &before, ALL, later) {
            Recovery::Gone { position } => assert_eq!(position, next),
            Recovery::Recovered { .. } => panic!("offset 1 expired"),
        }
    }

    #[test]
    fn the_byte_bound_evicts_oldest_first_across_topics_and_an_emptied_stream_keeps_its_position() {
        let per = frame(1).len() + ENTRY_OVERHEAD_BYTES;
        let mut engine = MemoryEngine::new(3 * per, 1000);
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
            matches!(engine.recover("a", &since, ALL, now), Recovery::Gone { position } if position == a),
            "offset 1 was evicted; the stream is still at 1"
        );
        let next = publish(&mut engine, "a", &h, now, &mut epoch);
        assert_eq!((next.offset, &next.epoch), (2, &a.epoch));
    }

    #[test]
    fn the_eviction_order_stays_proportional_to_what_is_stored() {
        let mut engine = MemoryEngine::new(1 << 30, 1000);
        let (h, now, mut epoch) = (history(2, 60), Instant::now(), epochs());
        for _ in 0..100_000 {
            publish(&mut engine, "t", &h, now, &mut epoch);
        }
        assert_eq!(engine.stats().publications, 2);
        assert!(engine.order.len() <= 2 * 2 + 1024 + 1);
    }

    #[test]
    fn latest_returns_the_newest_oldest_first() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        for _ in 0..5 {
            publish(&mut engine, "t", &h, now, &mut epoch);
        }
        assert_eq!(offsets(&engine.latest("t", 2, now)), [4, 5]);
        assert_eq!(offsets(&engine.latest("t", 9, now)), [1, 2, 3, 4, 5]);
        assert!(engine.latest("nope", 3, now).is_empty());
    }

    #[test]
    fn reads_of_an_unknown_stream_store_nothing() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
        let now = Instant::now();
        assert_eq!(engine.position("t", now), Position::empty());
        let all = engine.recover("t", &Position::empty(), ALL, now);
        assert!(matches!(all, Recovery::Recovered { publications, .. } if publications.is_empty()));
        let later = Position {
            offset: 5,
            epoch: Arc::from("e9"),
        };
        assert!(matches!(
            engine.recover("t", &later, ALL, now),
            Recovery::Gone { .. }
        ));
        assert!(engine.latest("t", 10, now).is_empty());
        assert_eq!(engine.stats(), EngineStats::default(), "nothing stored");
    }

    #[test]
    fn a_stream_held_but_never_published_to_is_forgotten_on_release() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        let held = engine.hold("t", &h, now, &mut epoch).unwrap();
        assert_eq!((held.offset, &*held.epoch), (0, "e1"));
        assert_eq!(engine.hold("t", &h, now, &mut epoch).unwrap(), held);
        engine.release("t", now);
        assert_eq!(engine.stats().streams, 0);
        assert_eq!(engine.stats().meta_bytes, 0);
        assert!(engine.due.is_empty(), "no expiry entry outlives its stream");

        let published = publish(&mut engine, "p", &h, now, &mut epoch);
        engine.release("p", now);
        assert_eq!(
            engine.position("p", now),
            published,
            "a stream with history stays for readers after its last holder"
        );
    }

    #[test]
    fn the_stream_limit_refuses_new_streams_and_keeps_serving_existing_ones() {
        let mut engine = MemoryEngine::new(1 << 20, 2);
        let (h, now, mut epoch) = (history(10, 60), Instant::now(), epochs());
        publish(&mut engine, "a", &h, now, &mut epoch);
        engine.hold("b", &h, now, &mut epoch).unwrap();
        assert_eq!(
            engine
                .publish("c", &h, now, &mut epoch, &mut frame)
                .unwrap_err(),
            StreamLimit(2)
        );
        assert_eq!(
            engine.hold("c", &h, now, &mut epoch).unwrap_err(),
            StreamLimit(2)
        );
        assert_eq!(publish(&mut engine, "a", &h, now, &mut epoch).offset, 2);
        assert_eq!(engine.stats().refused, 2);
        engine.release("b", now);
        assert!(engine.hold("c", &h, now, &mut epoch).is_ok(), "room again");
    }

    #[test]
    fn a_recovery_is_paged_by_bytes_and_the_next_page_starts_after_the_last() {
        let mut engine = MemoryEngine::new(1 << 20, 1000);
        let (h, now, mut epoch) = (history(100, 60), Instant::now(), epochs());
        let mut last = Position::empty();
        for _ in 0..10 {
            last = publish(&mut engine, "t", &h, now, &mut epoch);
        }
        let per = frame(1).len();
        let window = Window {
            limit: usize::MAX,
            max_bytes: 3 * per,
        };
        let mut since = Position {
            offset: 0,
            epoch: last.epoch.clone(),
        };
        let mut got = Vec::new();
        loop {
            let Recovery::Recovered {
                publications, more, ..
            } = engine.recover("t", &since, window, now)
            else {
                panic!("in history");
            };
            assert!(publications.len() <= 3);
            got.extend(offsets(&publications));
            since.offset = publications.last().map_or(since.offset, |p| p.offset);
            if !more {
                break;
            }
        }
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
        let tiny = Window {
            limit: 2,
            max_bytes: 1,
        };
        let Recovery::Recovered { publications, .. } =
            engine.recover("t", &Position { offset: 0, ..last }, tiny, now)
        else {
            panic!("in history");
        };
        assert_eq!(offsets(&publications), [1], "a page holds at least one");
    }

    #[test]
    fn an_expiry_sweep_looks_only_at_streams_that_are_due() {
        let mut engine = MemoryEngine::new(1 << 30, 100_000);
        let (long, short, start, mut epoch) =
            (history(10, 600), history(10, 5), Instant::now(), epochs());
        for i in 0..10_000 {
            publish(&mut engine, &format!("long-{i}"), &long, start, &mut epoch);
        }
        for i in 0..3 {
            publish(
                &mut engine,
                &format!("short-{i}"),
                &short,
                start,
                &mut epoch,
            );
        }
        engine.expire(start + Duration::from_secs(10), &|_| false);
        assert_eq!(engine.looks, 3, "only the three due streams were looked at");
        let stats = engine.stats();
        assert_eq!((stats.streams, stats.publications), (10_000, 10_000));
        engine.expire(start + Duration::from_secs(20), &|_| false);
        assert_eq!(engine.looks, 3, "nothing else is due");
    }
}
