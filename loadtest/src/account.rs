//! Payload marker and delivery accounting: what a publisher stamps into every
//! message and how a subscriber classifies what it receives (new, duplicate,
//! out of order). Pure data, no I/O and no clock: time comes in as arguments.
//!
//! Every payload carries `rcl:<epoch>:<publisher>:<topic>:<seq>:<sched_ns>:`
//! followed by padding. `seq` counts the messages one publisher sent to one
//! topic, so each subscriber sees, per publisher, the gap-free sequence
//! 0, 1, 2, ... when nothing is lost. The marker is plain ASCII with no JSON
//! metacharacters, so it survives a JSON string body and a raw body alike, and
//! subscribers find it with `memmem` instead of parsing JSON.

use memchr::memmem;
use std::sync::OnceLock;

/// The bytes that open every marker.
pub(crate) const MARKER_PREFIX: &[u8] = b"rcl:";

/// Received sequence numbers remembered below the highest one, per
/// (subscriber, publisher). 64 fits one `u64` bitmask: exact duplicate
/// detection for reordering up to 64 messages deep, at 16 bytes of state.
pub(crate) const SEQ_WINDOW: u64 = 64;

/// What a publisher stamps into one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    /// Run phase (one per rate step) the message belongs to.
    pub(crate) epoch: u32,
    /// Publisher index, `0..publishers`.
    pub(crate) publisher: u32,
    /// Topic index, `0..topics`; lets a subscriber detect misrouted deliveries.
    pub(crate) topic: u32,
    /// Per (publisher, topic) sequence number, from 0.
    pub(crate) seq: u64,
    /// Intended send time from the open-loop schedule, ns on the process clock.
    pub(crate) sched_ns: u64,
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Words the padding is made of: a record's vocabulary.
const PADDING_WORDS: [&[u8]; 32] = [
    b"order",
    b"price",
    b"quantity",
    b"status",
    b"shipped",
    b"customer",
    b"total",
    b"eur",
    b"item",
    b"sku",
    b"created",
    b"updated",
    b"pending",
    b"paid",
    b"warehouse",
    b"berlin",
    b"lisbon",
    b"express",
    b"standard",
    b"discount",
    b"tax",
    b"currency",
    b"address",
    b"street",
    b"invoice",
    b"refund",
    b"cancelled",
    b"delivered",
    b"carrier",
    b"tracking",
    b"weight",
    b"kg",
];

impl Marker {
    /// Appends the marker followed by padding so that the marker plus padding
    /// is at least `payload_bytes` long. The padding reads like a record's
    /// text (words and numbers drawn from the sequence number), so a
    /// compressed run measures what compression does to real payloads, not
    /// to a run of one letter.
    pub(crate) fn write_padded(&self, out: &mut Vec<u8>, payload_bytes: usize) {
        let start = out.len();
        out.extend_from_slice(MARKER_PREFIX);
        for v in [
            self.epoch as u64,
            self.publisher as u64,
            self.topic as u64,
            self.seq,
            self.sched_ns,
        ] {
            push_u64(out, v);
            out.push(b':');
        }
        if out.len() - start >= payload_bytes {
            return;
        }
        let mut x = self.seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while out.len() - start < payload_bytes {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(PADDING_WORDS[(x % PADDING_WORDS.len() as u64) as usize]);
            out.push(b' ');
            if x & 3 == 0 {
                push_u64(out, (x >> 8) % 100_000);
                out.push(b' ');
            }
        }
        out.truncate(start + payload_bytes);
    }

    /// Finds and decodes the first marker in `frame`; `None` if there is none
    /// or it is malformed.
    pub(crate) fn find(frame: &[u8]) -> Option<Marker> {
        static FINDER: OnceLock<memmem::Finder<'static>> = OnceLock::new();
        let finder = FINDER.get_or_init(|| memmem::Finder::new(MARKER_PREFIX));
        let at = finder.find(frame)?;
        let mut rest = &frame[at + MARKER_PREFIX.len()..];
        let mut fields = [0u64; 5];
        for f in fields.iter_mut() {
            let mut v: u64 = 0;
            let mut digits = 0;
            while let Some((&c, tail)) = rest.split_first() {
                if !c.is_ascii_digit() {
                    break;
                }
                v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
                digits += 1;
                rest = tail;
            }
            if digits == 0 || rest.first() != Some(&b':') {
                return None;
            }
            rest = &rest[1..];
            *f = v;
        }
        Some(Marker {
            epoch: u32::try_from(fields[0]).ok()?,
            publisher: u32::try_from(fields[1]).ok()?,
            topic: u32::try_from(fields[2]).ok()?,
            seq: fields[3],
            sched_ns: fields[4],
        })
    }
}

/// How one delivery relates to what this subscriber saw before from the same publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// First time seen, in order (possibly after a gap, which may fill later).
    New,
    /// First time seen, but a higher sequence number arrived earlier.
    OutOfOrder,
    /// Older than the window: counted as out of order, cannot be told from a
    /// duplicate. Reported separately so a reader knows the count is inexact.
    OutOfOrderBeyondWindow,
    /// Seen before.
    Duplicate,
}

/// Per (subscriber, publisher) record of received sequence numbers: the next
/// expected one and a bitmask of which of the `SEQ_WINDOW` below it arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqWindow {
    /// One past the highest sequence number seen (0 before any).
    next: u64,
    /// Bit `d` set: sequence `next - 1 - d` was received.
    seen: u64,
}

impl SeqWindow {
    /// Classifies the arrival of `seq` and records it.
    pub(crate) fn observe(&mut self, seq: u64) -> Arrival {
        if seq >= self.next {
            let shift = seq - self.next + 1;
            self.seen = if shift >= SEQ_WINDOW {
                0
            } else {
                self.seen << shift
            } | 1;
            self.next = seq + 1;
            return Arrival::New;
        }
        let depth = self.next - 1 - seq;
        if depth >= SEQ_WINDOW {
            return Arrival::OutOfOrderBeyondWindow;
        }
        let bit = 1u64 << depth;
        if self.seen & bit != 0 {
            Arrival::Duplicate
        } else {
            self.seen |= bit;
            Arrival::OutOfOrder
        }
    }
}

/// Counts kept by each subscriber-side worker thread for one epoch, summed when read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DeliveryCounts {
    /// Unique deliveries of this epoch's messages (all phases).
    pub(crate) unique: u64,
    /// Unique deliveries of messages scheduled inside the measurement window.
    pub(crate) measured: u64,
    /// Deliveries seen before.
    pub(crate) duplicates: u64,
    /// Unique deliveries that arrived after a higher sequence number.
    pub(crate) out_of_order: u64,
    /// Out-of-order arrivals too old for the window (may hide duplicates).
    pub(crate) out_of_order_beyond_window: u64,
    /// Deliveries whose marker names a topic this subscriber did not subscribe to.
    pub(crate) misrouted: u64,
    /// Deliveries from an earlier epoch that arrived after its drain ended.
    pub(crate) stale: u64,
    /// Frames with our prefix that did not decode, or an unknown publisher.
    pub(crate) malformed: u64,
    /// Deliveries of this epoch (duplicates too) that arrived while the
    /// server's CPU was measured, whenever they were scheduled: what that
    /// CPU paid for, a backlog from the warm-up included.
    pub(crate) in_window: u64,
}

impl DeliveryCounts {
    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &DeliveryCounts) {
        self.unique += other.unique;
        self.measured += other.measured;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.out_of_order_beyond_window += other.out_of_order_beyond_window;
        self.misrouted += other.misrouted;
        self.stale += other.stale;
        self.malformed += other.malformed;
        self.in_window += other.in_window;
    }

    /// Records one classified arrival; returns whether it is unique.
    pub(crate) fn record(&mut self, arrival: Arrival, measured: bool) -> bool {
        match arrival {
            Arrival::Duplicate => {
                self.duplicates += 1;
                return false;
            }
            Arrival::OutOfOrder => self.out_of_order += 1,
            Arrival::OutOfOrderBeyondWindow => self.out_of_order_beyond_window += 1,
            Arrival::New => {}
        }
        self.unique += 1;
        if measured {
            self.measured += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(seq: u64) -> Marker {
        Marker {
            epoch: 2,
            publisher: 7,
            topic: 13,
            seq,
            sched_ns: 123_456_789_012,
        }
    }

    #[test]
    fn marker_round_trips_through_padding_and_json() {
        let mut out = Vec::new();
        marker(42).write_padded(&mut out, 64);
        assert_eq!(out.len(), 64);
        assert!(out.starts_with(b"rcl:2:7:13:42:123456789012:"));
        let padding = &out[27..];
        assert!(
            padding
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b' '),
            "text a JSON string holds as is: {}",
            String::from_utf8_lossy(padding)
        );
        let frame = [
            &br#"{"type":"push","topic":"t13","event":"message","payload":""#[..],
            &out,
            b"\"}",
        ]
        .concat();
        assert_eq!(Marker::find(&frame), Some(marker(42)));
    }

    #[test]
    fn marker_longer_than_payload_bytes_is_not_truncated() {
        let mut out = Vec::new();
        marker(1).write_padded(&mut out, 4);
        assert_eq!(Marker::find(&out), Some(marker(1)));
    }

    #[test]
    fn malformed_markers_are_rejected() {
        assert_eq!(Marker::find(b"no marker here"), None);
        assert_eq!(Marker::find(b"rcl:1:2:3:4:"), None);
        assert_eq!(Marker::find(b"rcl:1:2:3:4:5"), None);
        assert_eq!(Marker::find(b"rcl:1:2:x:4:5:"), None);
        assert_eq!(Marker::find(b"rcl:1:2:3:4:99999999999999999999999:"), None);
    }

    #[test]
    fn in_order_sequence_is_all_new() {
        let mut w = SeqWindow::default();
        for s in 0..200 {
            assert_eq!(w.observe(s), Arrival::New);
        }
    }

    #[test]
    fn duplicate_is_detected_right_away_and_deep_in_the_window() {
        let mut w = SeqWindow::default();
        for s in 0..100 {
            w.observe(s);
        }
        assert_eq!(w.observe(99), Arrival::Duplicate);
        assert_eq!(w.observe(100 - 64), Arrival::Duplicate);
        assert_eq!(w.observe(100 - 65), Arrival::OutOfOrderBeyondWindow);
    }

    #[test]
    fn reordered_pair_is_one_out_of_order_and_no_loss() {
        let mut w = SeqWindow::default();
        let mut c = DeliveryCounts::default();
        for s in [0, 1, 3, 2, 4] {
            c.record(w.observe(s), true);
        }
        assert_eq!(c.unique, 5);
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.duplicates, 0);
    }

    #[test]
    fn gap_counts_as_missing_against_expected() {
        // The accounting counts unique deliveries; missing = expected - unique.
        let mut w = SeqWindow::default();
        let mut c = DeliveryCounts::default();
        for s in [0, 1, 5, 6, 6] {
            c.record(w.observe(s), true);
        }
        let expected = 7;
        assert_eq!(c.unique, 4);
        assert_eq!(expected - c.unique, 3);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.out_of_order, 0);
    }

    #[test]
    fn first_message_lost_then_late_arrival_fills_the_gap() {
        let mut w = SeqWindow::default();
        assert_eq!(w.observe(1), Arrival::New);
        assert_eq!(w.observe(0), Arrival::OutOfOrder);
        assert_eq!(w.observe(0), Arrival::Duplicate);
    }

    #[test]
    fn jump_larger_than_window_forgets_old_bits() {
        let mut w = SeqWindow::default();
        w.observe(0);
        assert_eq!(w.observe(1000), Arrival::New);
        assert_eq!(w.observe(999), Arrival::OutOfOrder);
        assert_eq!(w.observe(1000), Arrival::Duplicate);
    }
}
