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

pub mod home;
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

impl Position {
    /// Where a stream nobody has published to or holds stands: offset 0 in
    /// no epoch. A read of an unknown stream answers this without storing
    /// anything; the stream gets an epoch when it is published to or held.
    pub fn empty() -> Position {
        Position {
            offset: 0,
            epoch: Arc::from(""),
        }
    }
}

/// How much one answer may carry: a count (an HTTP `limit`) and bytes (a
/// page, so the answer fits the connection's outbound budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Most publications.
    pub limit: usize,
    /// Most bytes of frames; the first publication is always included, so
    /// a single publication larger than this still gets through.
    pub max_bytes: usize,
}

/// What a request for the publications after a position finds.
#[derive(Debug, Clone)]
pub enum Recovery {
    /// The publications after the position asked for, oldest first, as
    /// many as the window allows, and where the stream stands now.
    Recovered {
        /// The publications.
        publications: Vec<Publication>,
        /// The stream's position now.
        position: Position,
        /// Publications after the last one returned are still kept: ask
        /// again from its offset.
        more: bool,
    },
    /// The position is from another epoch, or older than the history: the
    /// client must reload its state elsewhere.
    Gone {
        /// The stream's position now.
        position: Position,
    },
}

/// A new stream would pass the home's `max_streams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream limit of {0} reached: try again later")]
pub struct StreamLimit(pub usize);

/// A home's answer to a subscriber opening its stream or asking for the
/// next page of a replay: the same policy on a home shard and on the
/// cluster broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// For an open with a position: whether it was recovered; `None` when
    /// no position was asked for.
    pub recovered: Option<bool>,
    /// Where the stream stood when the home answered: every publication
    /// after it follows the answer live.
    pub position: Position,
    /// The offset the frames follow: the next page of a replay that had to
    /// wait for its turn asks again from here.
    pub after: u64,
    /// Frames to send before live ones, oldest first, at most the page's
    /// bytes (but at least one).
    pub frames: Vec<Bytes>,
    /// Leading frames that are last values (`replay_on_subscribe`), sent
    /// marked `"replay":true`.
    pub marked: usize,
    /// Offset of the last frame, where the next page starts after;
    /// `position.offset` when nothing is left for a next page.
    pub last: u64,
    /// Publications between `last` and `position` were left for the next
    /// page.
    pub more: bool,
}

impl Page {
    /// A page of `publications` (oldest first, offsets growing, following
    /// offset `after`) up to `max_bytes`, at `position`; `more` if the
    /// publications given are not all there are up to `position`. Those at
    /// or before `mark_through` are last values.
    pub fn of(
        recovered: Option<bool>,
        position: Position,
        after: u64,
        publications: impl IntoIterator<Item = Publication>,
        more: bool,
        max_bytes: usize,
        mark_through: u64,
    ) -> Page {
        let mut page = Page {
            recovered,
            last: after,
            position,
            after,
            frames: Vec::new(),
            marked: 0,
            more,
        };
        let mut bytes = 0;
        for publication in publications {
            debug_assert!(publication.offset > page.last, "offsets must grow");
            if !page.frames.is_empty() && bytes + publication.frame.len() > max_bytes {
                page.more = true;
                break;
            }
            bytes += publication.frame.len();
            page.last = publication.offset;
            if publication.offset <= mark_through {
                page.marked += 1;
            }
            page.frames.push(publication.frame);
        }
        if !page.more {
            page.last = page.position.offset;
        }
        page
    }

    /// A stream's latest values as the page a subscriber starts with, all
    /// of them last values (marked), following the offset before the first.
    pub fn last_values(
        recovered: Option<bool>,
        position: Position,
        latest: Vec<Publication>,
        max_bytes: usize,
    ) -> Page {
        let after = Page::offset_before(&latest, position.offset);
        let through = position.offset;
        Page::of(
            recovered, position, after, latest, false, max_bytes, through,
        )
    }

    /// A window of history read from its start (the latest `limit` of a
    /// history query): `more` if it goes on past the publications given.
    pub fn window(
        position: Position,
        publications: Vec<Publication>,
        more: bool,
        max_bytes: usize,
    ) -> Page {
        let after = Page::offset_before(&publications, position.offset);
        Page::of(None, position, after, publications, more, max_bytes, 0)
    }

    /// Nothing to send: a subscriber goes live at `position` at once.
    pub fn empty(recovered: Option<bool>, position: Position) -> Page {
        let after = position.offset;
        Page::of(recovered, position, after, Vec::new(), false, 0, 0)
    }

    /// The offset publications follow: the one before the first, or
    /// `otherwise` when there are none.
    fn offset_before(publications: &[Publication], otherwise: u64) -> u64 {
        publications
            .first()
            .map_or(otherwise, |p| p.offset.saturating_sub(1))
    }

    /// The frames' total bytes.
    pub fn bytes(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }
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
    /// Bytes of the streams' own bookkeeping (name, epoch, table entries).
    pub meta_bytes: u64,
    /// Publications evicted by a stream's size, TTL or the byte limit.
    pub evictions: u64,
    /// Streams that started afresh with a new epoch after the first.
    pub epoch_changes: u64,
    /// Streams refused because `max_streams` was reached.
    pub refused: u64,
}

/// What a stream's home does. The memory engine does it synchronously on
/// the home shard; a Redis engine does the same against Redis from a broker
/// thread and answers the envelopes asynchronously.
pub trait StreamEngine {
    /// Appends a publication to `topic`'s stream (created with a new epoch
    /// from `epoch` if absent, within the stream limit). `frame` builds the
    /// push for the assigned offset; it is stored and returned, so it is
    /// encoded once.
    fn publish(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
        frame: &mut dyn FnMut(u64) -> Bytes,
    ) -> Result<(Position, Bytes), StreamLimit>;

    /// Where `topic`'s stream stands; [`Position::empty`] for one that does
    /// not exist, which a read does not create.
    fn position(&mut self, topic: &str, now: Instant) -> Position;

    /// Where `topic`'s stream stands for a subscriber that holds it: the
    /// stream is created (with a new epoch) if absent, within the stream
    /// limit, so the epoch the subscriber is told stays.
    fn hold(
        &mut self,
        topic: &str,
        history: &History,
        now: Instant,
        epoch: &mut dyn FnMut() -> Arc<str>,
    ) -> Result<Position, StreamLimit>;

    /// The publications after `since` within `window`, or `Gone`. An
    /// unknown stream recovers nothing from offset 0 of no epoch, and
    /// anything else is gone; it is not created.
    fn recover(&mut self, topic: &str, since: &Position, window: Window, now: Instant) -> Recovery;

    /// The latest `count` publications, oldest first.
    fn latest(&mut self, topic: &str, count: usize, now: Instant) -> Vec<Publication>;

    /// Drops expired publications and forgets streams with nothing left in
    /// history, idle for their TTL and not `held` (a stream someone
    /// subscribes to keeps its offset and epoch: its subscribers' offsets
    /// must keep growing in the epoch their `subscribed` named). Costs
    /// what it expires, not what is stored.
    fn expire(&mut self, now: Instant, held: &dyn Fn(&str) -> bool);

    /// Nobody holds `topic` any more: a stream that was never published to
    /// is forgotten at once (a subscribe and unsubscribe leaves nothing
    /// behind), as is one with nothing in history idle past its TTL.
    fn release(&mut self, topic: &str, now: Instant);

    /// The engine's counters.
    fn stats(&self) -> EngineStats;
}

/// Publications past a stream's TTL are dropped by `expire`, which the home
/// runs this often; lookups also check ages, so nothing expired is served.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
