//! The stream-home policy: what a stream's home answers, whichever home it
//! is. A shard reads its [`MemoryEngine`](super::memory::MemoryEngine); the
//! cluster broker reads what Redis returned. Both go through [`open`] and
//! [`history`] over a [`Log`], and refuse with one [`Refusal`], so a client
//! gets the same page, the same status and the same words from either.

use std::sync::Arc;

use crate::config::Limits;
use crate::protocol::http::{error_json, Response};
use crate::protocol::message;

use super::{Page, Position, Publication, Recovery, StreamLimit, Window};

/// A stream's history as a home sees it while it answers one request.
pub trait Log {
    /// Where the stream stands.
    fn position(&mut self) -> Position;

    /// The publications after `since` (its epoch must be the stream's)
    /// within `window`, or `Gone` when the history no longer holds every
    /// one of them.
    fn recover(&mut self, since: &Position, window: Window) -> Recovery;

    /// The latest `count` publications, oldest first.
    fn latest(&mut self, count: usize) -> Vec<Publication>;

    /// The window of the latest `limit`, oldest first, and whether more of
    /// it follows than was read (a home that reads in pages).
    fn window(&mut self, limit: usize) -> (Vec<Publication>, bool) {
        (self.latest(limit), false)
    }
}

/// Why a home does not answer with a page or an acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The topic's rule keeps no history.
    NoHistory { topic: Arc<str> },
    /// A query names another run of the stream than the current one.
    EpochGone { asked: String, current: Position },
    /// A query starts before what the history still holds.
    OffsetGone { offset: u64, current: Position },
    /// The home is stopping.
    ShuttingDown,
    /// A stream home that needs Redis cannot reach it.
    NeedsRedis,
    /// Too many stream publications already wait for Redis.
    RedisBusy,
    /// Redis refused the publication, or it was never sent: not stored.
    NotStored,
    /// Sent to Redis, and no answer came in time: it may have been stored
    /// and delivered. A retry with the same idempotency key tells.
    OutcomeUnknown,
    /// A limit of the home (streams, history bytes).
    Limit(StreamLimit),
}

impl Refusal {
    /// The HTTP answer, each text written once here.
    pub fn response(&self) -> Response {
        match self {
            Refusal::NoHistory { topic } => error_json(
                404,
                &format!("topic `{topic}` has no history: its rule sets no history_size"),
            ),
            Refusal::EpochGone { asked, current } => {
                let shown = message::truncate(asked, message::MAX_EPOCH_BYTES);
                let cut = if shown.len() < asked.len() { "…" } else { "" };
                gone(
                    &format!("epoch `{shown}{cut}` is gone: the stream started afresh"),
                    current,
                )
            }
            Refusal::OffsetGone { offset, current } => {
                gone(&format!("offset {offset} is no longer in history"), current)
            }
            Refusal::ShuttingDown => error_json(503, "server shutting down: publishes are refused"),
            Refusal::NeedsRedis => error_json(
                503,
                "cluster unavailable: stream offsets and history live in Redis",
            ),
            Refusal::RedisBusy => error_json(
                503,
                "cluster busy: too many stream publications wait for Redis; try again",
            ),
            Refusal::NotStored => {
                error_json(503, "cluster unavailable: the publication was not stored")
            }
            Refusal::OutcomeUnknown => Response::json(
                504,
                r#"{"error":"outcome unknown: Redis did not answer in time; the publication may have been stored and delivered. Retry with the same idempotency_key to get its outcome without storing it twice","outcome":"unknown"}"#,
            ),
            Refusal::Limit(limit) => error_json(503, &limit.to_string()),
        }
    }
}

/// `410` with where the stream stands now.
fn gone(why: &str, current: &Position) -> Response {
    let body = serde_json::json!({
        "error": why,
        "offset": current.offset,
        "epoch": &*current.epoch,
    });
    Response::json(410, body.to_string())
}

/// A subscriber's first page (or the next page of its replay): every
/// publication after `since` when the log still holds them
/// (`recovered:true`), else the latest `replay` as last values at the
/// stream's position (`recovered:false` when a position was asked for).
/// Those at or before `mark_through` are last values.
pub fn open(
    log: &mut dyn Log,
    since: Option<&Position>,
    replay: usize,
    page_bytes: usize,
    mark_through: u64,
) -> Page {
    if let Some(since) = since {
        let window = Window {
            limit: usize::MAX,
            max_bytes: page_bytes,
        };
        if let Recovery::Recovered {
            publications,
            position,
            more,
        } = log.recover(since, window)
        {
            return Page::of(
                Some(true),
                position,
                since.offset,
                publications,
                more,
                page_bytes,
                mark_through,
            );
        }
    }
    let latest = match replay {
        0 => Vec::new(),
        count => log.latest(count),
    };
    let position = log.position();
    Page::last_values(since.map(|_| false), position, latest, page_bytes)
}

/// One page of a history query: the publications after `since` (of
/// `epoch`, when named), or the window of the latest `limit`.
pub fn history(
    log: &mut dyn Log,
    since: Option<u64>,
    epoch: Option<&str>,
    limit: usize,
    page_bytes: usize,
) -> Result<Page, Refusal> {
    let current = log.position();
    if let Some(asked) = epoch.filter(|e| **e != *current.epoch) {
        return Err(Refusal::EpochGone {
            asked: asked.to_string(),
            current,
        });
    }
    let Some(offset) = since else {
        let (latest, more) = log.window(limit);
        return Ok(Page::window(current, latest, more, page_bytes));
    };
    let asked = Position {
        offset,
        epoch: current.epoch.clone(),
    };
    let window = Window {
        limit,
        max_bytes: page_bytes,
    };
    match log.recover(&asked, window) {
        Recovery::Recovered {
            publications,
            position,
            more,
        } => Ok(Page::of(
            None,
            position,
            offset,
            publications,
            more,
            page_bytes,
            0,
        )),
        Recovery::Gone { position } => Err(Refusal::OffsetGone {
            offset,
            current: position,
        }),
    }
}

/// `200` to a history query: the stream's position, one page of
/// publications (each as the push subscribers got), and, when more follow,
/// `next`: the `since` that asks for them.
pub fn history_found(topic: &str, page: &Page) -> Response {
    let mut body = Vec::with_capacity(96 + page.bytes());
    body.extend_from_slice(b"{\"topic\":");
    message::write_json_str(&mut body, topic);
    body.extend_from_slice(b",\"offset\":");
    message::write_decimal(&mut body, page.position.offset);
    body.extend_from_slice(b",\"epoch\":");
    message::write_json_str(&mut body, &page.position.epoch);
    body.extend_from_slice(b",\"publications\":[");
    for (i, frame) in page.frames.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message::frame_json(frame).unwrap_or(b"null"));
    }
    body.push(b']');
    if page.more {
        body.extend_from_slice(b",\"next\":");
        message::write_decimal(&mut body, page.last);
    }
    body.push(b'}');
    Response::json(200, body)
}

/// The body of a `202` for a publish: shards reached, and the position of a
/// stream publication. Written by hand (keys in serde_json's order): every
/// `POST /publish` answers with it, and a `Value` cost three allocations.
pub fn publish_accepted(shards: usize, position: Option<&Position>) -> Response {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(b"{\"delivered_shards\":");
    message::write_decimal(&mut body, shards as u64);
    if let Some(p) = position {
        body.extend_from_slice(b",\"epoch\":");
        message::write_json_str(&mut body, &p.epoch);
        body.extend_from_slice(b",\"offset\":");
        message::write_decimal(&mut body, p.offset);
    }
    body.push(b'}');
    Response::json(202, body)
}

/// Bytes of randomness in an epoch: 16 hex characters, enough that two runs
/// of a stream never share one.
pub const EPOCH_BYTES: usize = 8;

/// An epoch from `fill`'s randomness, or from the clock when it fails
/// (which still differs between two starts of a stream).
pub fn new_epoch(fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>) -> Arc<str> {
    let mut bytes = [0u8; EPOCH_BYTES];
    if fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_le_bytes();
    }
    Arc::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// An epoch from the OS's randomness, for a home outside the shards (the
/// cluster broker).
pub fn os_epoch() -> Arc<str> {
    new_epoch(|bytes| getrandom::fill(bytes).map_err(|e| std::io::Error::other(e.to_string())))
}

/// Bytes of frames in one page of a replay: what the connection's queue may
/// take on top of the drain mark, leaving half its budget for live traffic.
pub fn replay_page_bytes(limits: &Limits) -> usize {
    limits.drain_mark()
}

/// Bytes of frames in one answer to an HTTP history query: half the
/// outbound budget, so the response always fits it.
pub fn http_page_bytes(limits: &Limits) -> usize {
    limits.max_outbound_bytes_per_connection / 2
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A history of offsets `first..=last` of epoch `e`.
    struct Kept {
        first: u64,
        last: u64,
    }

    impl Kept {
        fn at(&self, offset: u64) -> Publication {
            Publication {
                offset,
                frame: Bytes::from(format!("p{offset}")),
            }
        }
    }

    #[test]
    fn publish_accepted_is_the_json_serde_would_write() {
        let body = |r: Response| String::from_utf8(r.body().to_vec()).unwrap();
        let position = Position {
            offset: 42,
            epoch: Arc::from("00ff\"x"),
        };
        let expected = serde_json::json!({
            "delivered_shards": 3,
            "offset": 42,
            "epoch": "00ff\"x",
        });
        assert_eq!(
            body(publish_accepted(3, Some(&position))),
            expected.to_string()
        );
        assert_eq!(body(publish_accepted(0, None)), r#"{"delivered_shards":0}"#);
    }

    impl Log for Kept {
        fn position(&mut self) -> Position {
            Position {
                offset: self.last,
                epoch: Arc::from("e"),
            }
        }

        fn recover(&mut self, since: &Position, window: Window) -> Recovery {
            let position = self.position();
            if *since.epoch != *position.epoch
                || since.offset + 1 < self.first
                || since.offset > self.last
            {
                return Recovery::Gone { position };
            }
            let end = self
                .last
                .min(since.offset.saturating_add(window.limit as u64));
            Recovery::Recovered {
                publications: (since.offset + 1..=end).map(|o| self.at(o)).collect(),
                position,
                more: end < self.last,
            }
        }

        fn latest(&mut self, count: usize) -> Vec<Publication> {
            let from = self.last.saturating_sub(count as u64).max(self.first - 1);
            (from + 1..=self.last).map(|o| self.at(o)).collect()
        }
    }

    fn offsets(page: &Page) -> Vec<String> {
        page.frames
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect()
    }

    #[test]
    fn history_refuses_another_epoch_and_a_gone_offset_with_410() {
        let mut log = Kept { first: 5, last: 9 };
        let epoch = history(&mut log, Some(6), Some("old"), 100, 1 << 20).unwrap_err();
        assert!(matches!(&epoch, Refusal::EpochGone { asked, .. } if asked == "old"));
        assert_eq!(epoch.response().status(), 410);
        let offset = history(&mut log, Some(2), None, 100, 1 << 20).unwrap_err();
        assert_eq!(offset.response().status(), 410);
        let page = history(&mut log, Some(6), Some("e"), 2, 1 << 20).unwrap();
        assert_eq!(offsets(&page), ["p7", "p8"]);
        assert!(page.more, "a limit that cuts names the next page");
        let window = history(&mut log, None, None, 3, 1 << 20).unwrap();
        assert_eq!(offsets(&window), ["p7", "p8", "p9"]);
    }

    #[test]
    fn an_open_recovers_what_is_kept_or_falls_back_to_the_latest() {
        let mut log = Kept { first: 5, last: 9 };
        let kept = Position {
            offset: 7,
            epoch: Arc::from("e"),
        };
        let page = open(&mut log, Some(&kept), 2, 1 << 20, 0);
        assert_eq!(page.recovered, Some(true));
        assert_eq!(offsets(&page), ["p8", "p9"]);
        let gone = Position {
            offset: 1,
            epoch: Arc::from("e"),
        };
        let page = open(&mut log, Some(&gone), 2, 1 << 20, 0);
        assert_eq!(page.recovered, Some(false));
        assert_eq!(
            offsets(&page),
            ["p8", "p9"],
            "the latest two as last values"
        );
        let fresh = open(&mut log, None, 0, 1 << 20, 0);
        assert_eq!((fresh.recovered, fresh.frames.len()), (None, 0));
        assert_eq!(fresh.position.offset, 9);
    }
}
