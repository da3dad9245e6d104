//! One destination's events on their way, without I/O: encoded events
//! queued within a byte bound, sent in batches of at most
//! `max_batch_events`, one POST at a time (so the backend sees them in
//! order), a failed one retried with a doubling backoff.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The first wait after a failed POST; it doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct Outbox {
    /// Encoded events waiting, oldest first; the first `in_flight` of them
    /// are being posted.
    queue: VecDeque<String>,
    queued_bytes: usize,
    /// The POST in flight: its id and how many events it carries.
    in_flight: Option<(u64, usize)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    next_post: u64,
    max_queued_bytes: usize,
    max_batch_events: usize,
    /// Events queued, and dropped over the byte bound.
    pub(super) events_total: u64,
    pub(super) dropped_total: u64,
}

impl Outbox {
    pub(super) fn new(max_queued_bytes: usize, max_batch_events: usize) -> Outbox {
        debug_assert!(max_batch_events > 0);
        Outbox {
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            next_post: 0,
            max_queued_bytes,
            max_batch_events,
            events_total: 0,
            dropped_total: 0,
        }
    }

    /// Queues an encoded event within the byte bound, else drops it.
    pub(super) fn queue(&mut self, encoded: String) {
        if self.queued_bytes + encoded.len() > self.max_queued_bytes {
            self.dropped_total += 1;
            return;
        }
        self.events_total += 1;
        self.queued_bytes += encoded.len();
        self.queue.push_back(encoded);
    }

    /// The next POST's id and body (`{"time_ms":T,"events":[..]}`), if
    /// events wait, none is in flight and no backoff runs.
    pub(super) fn next_post(&mut self, now: Instant, unix_ms: u64) -> Option<(u64, Bytes)> {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return None;
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        self.retry_at = None;
        let count = self.queue.len().min(self.max_batch_events);
        let mut body = String::with_capacity(64 + self.queued_bytes.min(1 << 20));
        body.push_str("{\"time_ms\":");
        body.push_str(&unix_ms.to_string());
        body.push_str(",\"events\":[");
        for (i, event) in self.queue.iter().take(count).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push_str("]}");
        self.next_post += 1;
        self.in_flight = Some((self.next_post, count));
        Some((self.next_post, Bytes::from(body)))
    }

    /// The POST `id` ended: its events are delivered (`ok`), or are sent
    /// again after a backoff.
    pub(super) fn posted(&mut self, id: u64, ok: bool, now: Instant) {
        let Some((current, count)) = self.in_flight.take() else {
            debug_assert!(false, "an answer to no POST");
            return;
        };
        debug_assert_eq!(current, id, "POSTs are answered in order, one at a time");
        if ok {
            for _ in 0..count {
                let event = self.queue.pop_front().expect("posted events are queued");
                self.queued_bytes -= event.len();
            }
            self.backoff = FIRST_BACKOFF;
        } else {
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// When a backoff ends, if one runs.
    pub(super) fn retry_deadline(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.in_flight.is_none())
    }

    /// Stopping: what waits is sent at once, backoff or not.
    pub(super) fn end_backoff(&mut self) {
        self.retry_at = None;
    }

    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
