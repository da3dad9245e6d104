//! Stream offset accounting per (subscriber, topic): what ringcast's stream
//! frames say (`subscribed` with a position, pushes with an offset) and a
//! ledger that classifies every push as new, recovered, duplicated or out of
//! order and knows which offsets never came. Pure data, no I/O and no clock:
//! time comes in as arguments. The payload sequence accounting (`account.rs`)
//! runs beside it; the two are independent views of the same deliveries.
//!
//! Offsets count from 1 per topic, +1 per publication, so what a subscriber
//! owes is dense: every offset above the one its first `subscribed` reported
//! up to the topic's last. A ledger keeps the highest offset it accounted for
//! and the holes below it, so its state stays small however long the run.

use hdrhistogram::Histogram;
use memchr::memmem;
use std::sync::OnceLock;

/// The key that precedes a push's offset. ringcast writes
/// `{"type":"push",("replay":true,)"topic":T,"offset":N,...}`: the first
/// occurrence is the field, whatever the payload holds.
const OFFSET_KEY: &[u8] = b"\"offset\":";
/// How a replayed last value (`replay_on_subscribe`) opens: not part of the
/// stream a subscriber owes, so it is counted apart and not accounted.
const REPLAY_PREFIX: &[u8] = b"{\"type\":\"push\",\"replay\":true,";

/// What a `subscribed` reply says about a stream topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Subscribed {
    /// The topic's latest offset when the subscription began.
    pub(crate) offset: u64,
    /// The stream's epoch.
    pub(crate) epoch: Box<str>,
    /// Present when the subscribe carried `since`: whether it was recovered.
    pub(crate) recovered: Option<bool>,
}

/// Parses a `subscribed` reply; `None` when it carries no position (an old
/// server, or a topic without history).
pub(crate) fn parse_subscribed(payload: &[u8]) -> Option<Subscribed> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v["type"] != "subscribed" {
        return None;
    }
    Some(Subscribed {
        offset: v["offset"].as_u64()?,
        epoch: v["epoch"].as_str()?.into(),
        recovered: v["recovered"].as_bool(),
    })
}

/// What a push frame says about its place in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PushAt {
    /// The publication's offset.
    pub(crate) offset: u64,
    /// Marked `"replay":true`: a last value sent on subscribe.
    pub(crate) replay: bool,
}

/// Finds a push's offset without parsing the JSON (this runs per delivery).
pub(crate) fn push_at(payload: &[u8]) -> Option<PushAt> {
    if !payload.starts_with(b"{\"type\":\"push\"") {
        return None;
    }
    Some(PushAt {
        offset: offset_after_key(payload)?,
        replay: payload.starts_with(REPLAY_PREFIX),
    })
}

/// The offset in a `POST /publish` reply to a stream topic
/// (`202 {"delivered_shards":K,"offset":N,"epoch":E}`), headers included.
pub(crate) fn reply_offset(response: &[u8]) -> Option<u64> {
    offset_after_key(response)
}

/// The number after the first `"offset":` in `json`.
fn offset_after_key(json: &[u8]) -> Option<u64> {
    static FINDER: OnceLock<memmem::Finder<'static>> = OnceLock::new();
    let finder = FINDER.get_or_init(|| memmem::Finder::new(OFFSET_KEY));
    let at = finder.find(json)? + OFFSET_KEY.len();
    let mut offset: u64 = 0;
    let mut digits = 0;
    for &c in &json[at..] {
        if !c.is_ascii_digit() {
            break;
        }
        offset = offset.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(offset)
}

/// The `subscribe` frame ringcast resumes from: the topic and the position.
pub(crate) fn subscribe_since(topic: &str, offset: u64, epoch: &str) -> Vec<u8> {
    serde_json::json!({
        "type": "subscribe",
        "topic": topic,
        "since": {"offset": offset, "epoch": epoch},
    })
    .to_string()
    .into_bytes()
}

/// How a `subscribed` reply moved a ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// The first one: accounting starts after its offset.
    First,
    /// `recovered:true`: offsets up to `until` come as a replay (none if
    /// `until` is where the ledger already is).
    Recovered { until: u64 },
    /// `recovered:false`, or a subscribe without `since`: offsets up to the
    /// reply's were written off as missing (`lost` of them).
    Fresh { lost: u64, asked: bool },
    /// The stream started afresh (another epoch): the old one's holes are
    /// kept as missing; the old one's tail cannot be known.
    EpochChanged { asked: bool },
}

/// How one push relates to what the ledger saw before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// At or below the first `subscribed` offset: not owed, not counted.
    NotOwed,
    /// The next offset, or one past a gap of `skipped` offsets (which may
    /// fill later). `recovered`: part of the replay after `recovered:true`.
    New { skipped: u64, recovered: bool },
    /// Fills a hole: a higher offset arrived before it.
    OutOfOrder { recovered: bool },
    /// Received before.
    Duplicate,
}

/// One subscriber's view of one stream topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    /// Epoch of the current position; `None` before the first `subscribed`.
    epoch: Option<Box<str>>,
    /// Offset of the first `subscribed` of this epoch: nothing at or below is owed.
    base: u64,
    /// Highest offset received or written off.
    high: u64,
    /// Offsets of this epoch below `high` that were skipped, as ranges
    /// `(first, last)`, sorted and disjoint: the gaps that may still fill.
    holes: Vec<(u64, u64)>,
    /// After `recovered:true`: the replay runs up to this offset.
    replay_until: u64,
}

impl Ledger {
    /// Whether a `subscribed` with a position has been seen.
    pub(crate) fn tracking(&self) -> bool {
        self.epoch.is_some()
    }

    /// Where to resume from: the offset of the last push received (or
    /// written off by a fresh subscribe) and its epoch.
    pub(crate) fn position(&self) -> Option<(u64, &str)> {
        Some((self.high, self.epoch.as_deref()?))
    }

    /// The highest offset accounted for (received or written off).
    pub(crate) fn high(&self) -> u64 {
        self.high
    }

    /// Offsets in holes now: skipped over and not (yet) received.
    #[cfg(test)]
    pub(crate) fn missing_in_holes(&self) -> u64 {
        self.holes.iter().map(|&(a, b)| b - a + 1).sum()
    }

    /// True while a replay after `recovered:true` is still owed.
    pub(crate) fn replaying(&self) -> bool {
        self.high < self.replay_until
    }

    /// Takes a `subscribed` reply in.
    pub(crate) fn subscribed(&mut self, s: &Subscribed) -> Opened {
        let asked = s.recovered.is_some();
        match self.epoch.as_deref() {
            None => {
                self.epoch = Some(s.epoch.clone());
                self.base = s.offset;
                self.high = s.offset;
                Opened::First
            }
            Some(e) if e != &*s.epoch => {
                // The old epoch's holes can never fill: its offsets are not
                // this epoch's. They stay counted as missing in the totals.
                self.holes.clear();
                self.epoch = Some(s.epoch.clone());
                self.base = s.offset;
                self.high = s.offset;
                self.replay_until = 0;
                Opened::EpochChanged { asked }
            }
            Some(_) if s.recovered == Some(true) => {
                self.replay_until = s.offset;
                Opened::Recovered { until: s.offset }
            }
            Some(_) => {
                self.replay_until = 0;
                let lost = s.offset.saturating_sub(self.high);
                if lost > 0 {
                    self.add_hole(self.high + 1, s.offset);
                    self.high = s.offset;
                }
                Opened::Fresh { lost, asked }
            }
        }
    }

    /// Accounts for a push of `offset`.
    pub(crate) fn push(&mut self, offset: u64) -> Arrival {
        if offset <= self.base {
            return Arrival::NotOwed;
        }
        let recovered = offset <= self.replay_until;
        if offset > self.high {
            let skipped = offset - self.high - 1;
            if skipped > 0 {
                self.add_hole(self.high + 1, offset - 1);
            }
            self.high = offset;
            return Arrival::New { skipped, recovered };
        }
        match self
            .holes
            .iter()
            .position(|&(a, b)| a <= offset && offset <= b)
        {
            Some(i) => {
                let (a, b) = self.holes[i];
                match (a == offset, b == offset) {
                    (true, true) => {
                        self.holes.remove(i);
                    }
                    (true, false) => self.holes[i].0 += 1,
                    (false, true) => self.holes[i].1 -= 1,
                    (false, false) => {
                        self.holes[i].1 = offset - 1;
                        self.holes.insert(i + 1, (offset + 1, b));
                    }
                }
                Arrival::OutOfOrder { recovered }
            }
            None => Arrival::Duplicate,
        }
    }

    fn add_hole(&mut self, first: u64, last: u64) {
        // Holes are only ever added above every existing one.
        match self.holes.last_mut() {
            Some(h) if h.1 + 1 == first => h.1 = last,
            _ => self.holes.push((first, last)),
        }
    }
}

/// Stream figures kept per receiving thread, summed when read. Unlike the
/// per-step delivery counts they run for the whole run: a ledger's history
/// starts at its first `subscribed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamCounts {
    /// Subscribers whose first `subscribed` carried a position.
    pub(crate) tracked: u64,
    /// Subscribers whose first `subscribed` did not (no offsets accounted).
    pub(crate) untracked: u64,
    /// Offsets received for the first time.
    pub(crate) delivered: u64,
    /// Of those, received in a replay after `recovered:true`.
    pub(crate) recovered: u64,
    /// Offsets skipped by a later arrival or written off by a subscribe.
    pub(crate) gap_offsets: u64,
    /// Skipped offsets that arrived after all (also counted out of order).
    pub(crate) gaps_filled: u64,
    /// Offsets received again.
    pub(crate) duplicated: u64,
    /// Offsets received after a higher one.
    pub(crate) out_of_order: u64,
    /// Pushes marked `"replay":true` (last values on subscribe), not accounted.
    pub(crate) last_values: u64,
    /// Pushes at or below the first `subscribed` offset, not accounted.
    pub(crate) not_owed: u64,
    /// Re-subscribes with `since` answered `recovered:true`.
    pub(crate) recoveries_ok: u64,
    /// Re-subscribes with `since` answered `recovered:false`.
    pub(crate) recoveries_failed: u64,
    /// Re-subscribes without `since` (no `--recover`, or no position yet).
    pub(crate) resubscribed_fresh: u64,
    /// Subscribes that found the stream in another epoch.
    pub(crate) epoch_changes: u64,
}

impl StreamCounts {
    /// Adds `o` into `self`.
    pub(crate) fn add(&mut self, o: &StreamCounts) {
        for (a, b) in self.fields_mut().into_iter().zip(o.fields()) {
            *a += b;
        }
    }

    /// Offsets skipped over and never received.
    pub(crate) fn missing_in_gaps(&self) -> u64 {
        self.gap_offsets.saturating_sub(self.gaps_filled)
    }

    /// Every field in a fixed order (the child processes' wire order).
    pub(crate) fn fields(&self) -> [u64; 14] {
        [
            self.tracked,
            self.untracked,
            self.delivered,
            self.recovered,
            self.gap_offsets,
            self.gaps_filled,
            self.duplicated,
            self.out_of_order,
            self.last_values,
            self.not_owed,
            self.recoveries_ok,
            self.recoveries_failed,
            self.resubscribed_fresh,
            self.epoch_changes,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 14] {
        [
            &mut self.tracked,
            &mut self.untracked,
            &mut self.delivered,
            &mut self.recovered,
            &mut self.gap_offsets,
            &mut self.gaps_filled,
            &mut self.duplicated,
            &mut self.out_of_order,
            &mut self.last_values,
            &mut self.not_owed,
            &mut self.recoveries_ok,
            &mut self.recoveries_failed,
            &mut self.resubscribed_fresh,
            &mut self.epoch_changes,
        ]
    }

    /// The inverse of `fields`.
    pub(crate) fn from_fields(f: &[u64]) -> Option<StreamCounts> {
        let mut c = StreamCounts::default();
        if f.len() != 14 {
            return None;
        }
        for (a, b) in c.fields_mut().into_iter().zip(f) {
            *a = *b;
        }
        Some(c)
    }

    /// Records one push's arrival.
    pub(crate) fn record(&mut self, a: Arrival) {
        match a {
            Arrival::NotOwed => self.not_owed += 1,
            Arrival::New { skipped, recovered } => {
                self.gap_offsets += skipped;
                self.delivered += 1;
                self.recovered += u64::from(recovered);
            }
            Arrival::OutOfOrder { recovered } => {
                self.gaps_filled += 1;
                self.out_of_order += 1;
                self.delivered += 1;
                self.recovered += u64::from(recovered);
            }
            Arrival::Duplicate => self.duplicated += 1,
        }
    }
}

/// Where the ledgers of one topic stand, summed over subscribers: with the
/// topic's last offset this gives what never arrived at the tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TopicTails {
    /// Ledgers per topic.
    pub(crate) ledgers: Vec<u64>,
    /// Sum of the ledgers' highest offsets per topic. Signed: a ledger that
    /// moves to another thread, or to a new epoch, subtracts where it added.
    pub(crate) high_sum: Vec<i64>,
    /// Highest offset any ledger reached per topic.
    pub(crate) high_max: Vec<u64>,
}

impl TopicTails {
    /// Empty figures for `topics` topics.
    pub(crate) fn new(topics: usize) -> TopicTails {
        TopicTails {
            ledgers: vec![0; topics],
            high_sum: vec![0; topics],
            high_max: vec![0; topics],
        }
    }

    /// Adds `o` into `self` (same topic count).
    pub(crate) fn add(&mut self, o: &TopicTails) {
        for (a, b) in self.ledgers.iter_mut().zip(&o.ledgers) {
            *a += b;
        }
        for (a, b) in self.high_sum.iter_mut().zip(&o.high_sum) {
            *a += b;
        }
        for (a, b) in self.high_max.iter_mut().zip(&o.high_max) {
            *a = (*a).max(*b);
        }
    }

    /// A ledger's highest offset moved from `from` to `to`.
    pub(crate) fn moved(&mut self, topic: usize, from: u64, to: u64) {
        if let Some(s) = self.high_sum.get_mut(topic) {
            *s += to as i64 - from as i64;
        }
        if let Some(m) = self.high_max.get_mut(topic) {
            *m = (*m).max(to);
        }
    }

    /// Offsets owed and never reached by any ledger, given each topic's
    /// last offset (`last[t]`; a ledger past it counts nothing).
    pub(crate) fn missing_tail(&self, last: &[u64]) -> u64 {
        (0..self.ledgers.len())
            .map(|t| {
                let last = last.get(t).copied().unwrap_or(0).max(self.high_max[t]);
                let owed =
                    i128::from(self.ledgers[t]) * i128::from(last) - i128::from(self.high_sum[t]);
                owed.max(0) as u64
            })
            .sum()
    }
}

/// Recovery and storm timing kept per receiving thread.
#[derive(Clone, Debug)]
pub(crate) struct Recovery {
    /// Reconnect's TCP connect to its `subscribed` reply, ns.
    pub(crate) subscribed: Histogram<u64>,
    /// Reconnect's TCP connect to the last replayed publication (or to
    /// `subscribed` when nothing was owed), ns; `recovered:true` only.
    pub(crate) caught_up: Histogram<u64>,
    /// Storm reconnects answered with `subscribed`.
    pub(crate) storm_subscribed: u64,
    /// Storm reconnects that received everything owed.
    pub(crate) storm_caught_up: u64,
    /// Latest `subscribed` of a storm reconnect, CLOCK_MONOTONIC ns.
    pub(crate) storm_subscribed_last_ns: u64,
    /// Latest catch-up of a storm reconnect, CLOCK_MONOTONIC ns.
    pub(crate) storm_caught_up_last_ns: u64,
}

impl Recovery {
    /// Empty, with histograms from `new_hist`.
    pub(crate) fn new(new_hist: fn() -> Histogram<u64>) -> Recovery {
        Recovery {
            subscribed: new_hist(),
            caught_up: new_hist(),
            storm_subscribed: 0,
            storm_caught_up: 0,
            storm_subscribed_last_ns: 0,
            storm_caught_up_last_ns: 0,
        }
    }

    /// Adds `o` into `self` (histograms of the same bounds).
    pub(crate) fn add(&mut self, o: &Recovery) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.subscribed.add(&o.subscribed);
        let _ = self.caught_up.add(&o.caught_up);
        self.storm_subscribed += o.storm_subscribed;
        self.storm_caught_up += o.storm_caught_up;
        self.storm_subscribed_last_ns = self
            .storm_subscribed_last_ns
            .max(o.storm_subscribed_last_ns);
        self.storm_caught_up_last_ns = self.storm_caught_up_last_ns.max(o.storm_caught_up_last_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(offset: u64, epoch: &str, recovered: Option<bool>) -> Subscribed {
        Subscribed {
            offset,
            epoch: epoch.into(),
            recovered,
        }
    }

    /// Feeds pushes and returns the counts they add up to.
    fn feed(l: &mut Ledger, offsets: &[u64]) -> StreamCounts {
        let mut c = StreamCounts::default();
        for &o in offsets {
            c.record(l.push(o));
        }
        c
    }

    fn started_at(base: u64) -> Ledger {
        let mut l = Ledger::default();
        assert_eq!(l.subscribed(&opened(base, "e", None)), Opened::First);
        l
    }

    #[test]
    fn frames_are_read_without_parsing_pushes() {
        let live = br#"{"type":"push","topic":"load-1","offset":17,"event":"message","payload":"rcl:1:0:1:5:9:"}"#;
        assert_eq!(
            push_at(live),
            Some(PushAt {
                offset: 17,
                replay: false
            })
        );
        let replay = br#"{"type":"push","replay":true,"topic":"t","offset":3,"event":"e","payload":{"offset":9}}"#;
        assert_eq!(
            push_at(replay),
            Some(PushAt {
                offset: 3,
                replay: true
            })
        );
        assert_eq!(
            push_at(br#"{"type":"push","topic":"t","event":"e","payload":1}"#),
            None
        );
        assert_eq!(push_at(br#"{"type":"subscribed","offset":4}"#), None);
        assert_eq!(
            parse_subscribed(
                br#"{"type":"subscribed","topic":"t","recovered":true,"offset":7,"epoch":"e1"}"#
            ),
            Some(opened(7, "e1", Some(true)))
        );
        assert_eq!(
            parse_subscribed(br#"{"type":"subscribed","topic":"t"}"#),
            None,
            "an old server's reply has no position"
        );
        assert_eq!(
            reply_offset(
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 52\r\n\r\n{\"delivered_shards\":2,\"offset\":41,\"epoch\":\"e1\"}"
            ),
            Some(41)
        );
        assert_eq!(reply_offset(b"{\"delivered_shards\":2}"), None);
        let since = subscribe_since("load-1", 5, "e1");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&since).unwrap(),
            serde_json::json!({"type":"subscribe","topic":"load-1","since":{"offset":5,"epoch":"e1"}})
        );
    }

    #[test]
    fn offsets_in_order_after_the_first_subscribed_are_all_new() {
        let mut l = started_at(3);
        let c = feed(&mut l, &[4, 5, 6, 7]);
        assert_eq!(c.delivered, 4);
        assert_eq!(
            (c.gap_offsets, c.duplicated, c.out_of_order, c.recovered),
            (0, 0, 0, 0)
        );
        assert_eq!(l.position(), Some((7, "e")));
    }

    #[test]
    fn offsets_at_or_below_the_first_subscribed_are_not_owed() {
        let mut l = started_at(3);
        let c = feed(&mut l, &[2, 3, 4]);
        assert_eq!((c.not_owed, c.delivered), (2, 1));
    }

    #[test]
    fn a_gap_is_missing_until_it_fills_out_of_order() {
        let mut l = started_at(0);
        let c = feed(&mut l, &[1, 2, 5, 6]);
        assert_eq!(c.gap_offsets, 2);
        assert_eq!(c.missing_in_gaps(), 2);
        assert_eq!(l.missing_in_holes(), 2);
        let late = feed(&mut l, &[4]);
        assert_eq!((late.out_of_order, late.gaps_filled), (1, 1));
        assert_eq!(l.missing_in_holes(), 1);
        let mut all = c;
        all.add(&late);
        assert_eq!(all.missing_in_gaps(), 1, "3 never came");
        assert_eq!(all.delivered, 5);
    }

    #[test]
    fn a_hole_filled_in_its_middle_splits() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 10]);
        assert_eq!(l.missing_in_holes(), 8);
        let c = feed(&mut l, &[5, 2, 9, 5]);
        assert_eq!((c.out_of_order, c.duplicated), (3, 1));
        assert_eq!(l.holes, vec![(3, 4), (6, 8)]);
    }

    #[test]
    fn a_repeated_offset_is_a_duplicate_not_out_of_order() {
        let mut l = started_at(0);
        let c = feed(&mut l, &[1, 2, 2, 3, 1]);
        assert_eq!((c.delivered, c.duplicated, c.out_of_order), (3, 2, 0));
    }

    #[test]
    fn a_recovered_replay_ends_at_the_reply_offset_then_live_follows() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 2]);
        // Dropped at 2; 3..=5 published meanwhile.
        assert_eq!(l.position(), Some((2, "e")));
        assert_eq!(
            l.subscribed(&opened(5, "e", Some(true))),
            Opened::Recovered { until: 5 }
        );
        assert!(l.replaying());
        let replay = feed(&mut l, &[3, 4]);
        assert!(l.replaying());
        let last = feed(&mut l, &[5]);
        assert!(!l.replaying(), "the offset of the reply closes the replay");
        let live = feed(&mut l, &[6, 7]);
        assert_eq!(
            (replay.recovered, last.recovered, live.recovered),
            (2, 1, 0)
        );
        assert_eq!(live.delivered, 2);
        assert_eq!(l.missing_in_holes(), 0);
    }

    #[test]
    fn a_recovery_with_nothing_owed_is_not_a_replay() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 2]);
        l.subscribed(&opened(2, "e", Some(true)));
        assert!(!l.replaying());
        assert_eq!(feed(&mut l, &[3]).recovered, 0);
    }

    #[test]
    fn a_replay_that_repeats_what_arrived_counts_duplicates() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 2, 3]);
        // A server that replays from too early.
        l.replay_until = 4;
        let c = feed(&mut l, &[2, 3, 4]);
        assert_eq!((c.duplicated, c.delivered, c.recovered), (2, 1, 1));
    }

    #[test]
    fn a_fresh_resubscribe_writes_off_what_was_published_meanwhile() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 2]);
        assert_eq!(
            l.subscribed(&opened(6, "e", None)),
            Opened::Fresh {
                lost: 4,
                asked: false
            }
        );
        assert_eq!(l.missing_in_holes(), 4);
        let c = feed(&mut l, &[7]);
        assert_eq!((c.delivered, c.gap_offsets), (1, 0));
        assert_eq!(
            l.subscribed(&opened(9, "e", Some(false))),
            Opened::Fresh {
                lost: 2,
                asked: true
            }
        );
        assert_eq!(l.holes, vec![(3, 6), (8, 9)]);
    }

    #[test]
    fn another_epoch_restarts_the_offsets() {
        let mut l = started_at(0);
        feed(&mut l, &[1, 3]);
        assert_eq!(
            l.subscribed(&opened(0, "f", Some(false))),
            Opened::EpochChanged { asked: true }
        );
        assert_eq!(l.missing_in_holes(), 0, "the old epoch's hole cannot fill");
        let c = feed(&mut l, &[1, 2]);
        assert_eq!((c.delivered, c.out_of_order), (2, 0));
        assert_eq!(l.position(), Some((2, "f")));
    }

    #[test]
    fn the_tail_is_what_no_ledger_reached_by_the_last_offset() {
        let mut t = TopicTails::new(2);
        // Topic 0: two ledgers from 0, one reached 10, one 7; last offset 10.
        t.ledgers[0] = 2;
        t.moved(0, 0, 10);
        t.moved(0, 0, 7);
        // Topic 1: one ledger from 4 that reached 6; the publishers say 9.
        t.ledgers[1] = 1;
        t.moved(1, 0, 4);
        t.moved(1, 4, 6);
        assert_eq!(t.missing_tail(&[10, 9]), 3 + 3);
        // Unknown last offsets fall back to the highest any ledger reached.
        assert_eq!(t.missing_tail(&[]), 3);
        let mut sum = TopicTails::new(2);
        sum.add(&t);
        sum.add(&t);
        assert_eq!(sum.missing_tail(&[10, 9]), 12);
    }
}
