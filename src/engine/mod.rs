//! The engine seam: where a stream's positions and history live and how
//! recovery reads them (what Centrifugo calls the engine: broker + history +
//! presence). Plain data, no I/O, time as an argument.
//!
//! A stream topic has one *home* that orders its publications: it assigns
//! each an offset, keeps a bounded history, and fans it out. Every other
//! party talks to the home with envelopes on the bus (`StreamPublish`,
//! `StreamOpen`, `StreamHistory` and their replies), never by calling it, so
//! the home can be a shard running the [`memory`] engine (the embedded
//! default: the home is the shard a hash of the topic name picks) or, for a
//! cluster, a broker thread that runs the same operations against Redis and
//! answers with the same envelopes. The shard loop does not change between
//! the two: only where it addresses those envelopes does.
//!
//! The operations a home performs are those of [`StreamEngine`].

pub mod memory;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::rules::History;

/// Where a stream stands: the offset of its latest publication (0 before
/// the first) and the epoch of its history. Two positions with different
/// epochs are incomparable: the history between them is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Offset of the latest publication; offsets start at 1 and grow by 1.
    pub offset: u64,
    /// Opaque id of this run of the stream; new whenever it starts afresh.
    pub epoch: Arc<str>,
}

/// One stored publication.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Its offset in the stream.
    pub offset: u64,
    /// The push frame subscribers got, offset included, framed once.
    pub frame: Bytes,
}

/// What a request for the publications after a position finds.
#[derive(Debug, Clone)]
pub enum Recovery {
    /// Every publication after the position asked for, oldest first (at most
    /// the limit asked), and where the stream stands now.
    Recovered {
        /// The publications.
        publications: Vec<Publication>,
        /// The stream's position now.
        position: Position,
    },
    /// The position is from another epoch, or older than the history: the
    /// client must reload its state elsewhere.
    Gone {
        /// The stream's position now.
        position: Position,
    },
}

/// Counters of one engine, for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Streams held.
    pub streams: u64,
    /// Publications held.
    pub publications: u64,
    /// Bytes of history held (frames plus bookkeeping).
    pub stored_bytes: u64,
    /// Publications evicted by a stream's size, TTL or the byte limit.
    pub evictions: u64,
    /// Streams that started afresh with a new epoch after the first.
    pub epoch_changes: u64,
}

/// What a stream's home does. The memory engine does it synchronously on
/// the home shard; a Redis engine does the same against Redis from a broker
/// thread and answers the envelopes asynchronously.
pub trait StreamEngine {
    /// Appends a publication to `topic`'s stream (created with a new epoch
    /// from `epoch` if absent). `frame` builds the push for the assigned
    /// offset; it is stored and returned, so it is encoded once.
    fn publish(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
        frame: &mut dyn FnMut(u64) -> Bytes,
    ) -> (Position, Bytes);

    /// Where `topic`'s stream stands (created if absent).
    fn position(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Position;

    /// The publications after `since` (at most `limit`), or `Gone`.
    fn recover(
        &mut self,
        topic: &str,
        history: &History,
        since: &Position,
        limit: usize,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Recovery;

    /// The latest `count` publications, oldest first.
    fn latest(&mut self, topic: &str, count: usize, now: Instant) -> Vec<Publication>;

    /// Drops expired publications, and forgets streams with nothing left
    /// in history, idle for their TTL and not `held` (a stream someone
    /// subscribes to keeps its offset and epoch: its subscribers' offsets
    /// must keep growing in the epoch their `subscribed` named).
    fn expire(&mut self, now: Instant, held: &dyn Fn(&str) -> bool);

    /// The engine's counters.
    fn stats(&self) -> EngineStats;
}

/// Publications past a stream's TTL are dropped by `expire`, which the home
/// runs this often; lookups also check ages, so nothing expired is served.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
