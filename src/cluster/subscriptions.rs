//! The node's Redis channel subscriptions as a plan: which changes to send
//! next, coalesced, in batches, one batch in flight at a time.
//!
//! Plain data (no I/O): the broker records each change a shard's interest
//! asks for, takes a batch when none is in flight, sends it pipelined and
//! reports it done. A channel has at most one change waiting: a newer one
//! replaces it, and an unsubscribe of a channel Redis was never asked to
//! hold cancels outright. So however fast one client subscribes and leaves,
//! the changes waiting never outnumber the channels, and a fresh subscribe
//! waits for at most the batch in flight and its own.

use std::collections::{BTreeMap, HashMap, HashSet};

/// A channel change for Redis, with the sequence number its answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Change<K> {
    pub(super) seq: u64,
    pub(super) channel: String,
    pub(super) subscribe: bool,
    /// What the broker finds the change's waiters by.
    pub(super) key: K,
}

/// Subscription changes waiting for Redis, and what Redis was asked to hold.
pub(super) struct Plan<K> {
    /// At most one change per channel, not sent yet.
    waiting: HashMap<String, Change<K>>,
    /// The waiting changes' channels in the order they were asked for.
    order: BTreeMap<u64, String>,
    /// Channels Redis was asked to hold, by the batches sent so far.
    asked: HashSet<String>,
    /// Channels whose last change has no known outcome (it failed, or was
    /// answered for a connection since replaced): the client may still
    /// write it, on this connection or the next, so Redis may hold them
    /// whatever was asked.
    uncertain: HashMap<String, K>,
    /// A batch was sent and has not been answered.
    in_flight: bool,
}

impl<K> Default for Plan<K> {
    fn default() -> Self {
        Plan {
            waiting: HashMap::new(),
            order: BTreeMap::new(),
            asked: HashSet::new(),
            uncertain: HashMap::new(),
            in_flight: false,
        }
    }
}

impl<K> Plan<K> {
    /// Records a change; returns whether it will be sent (`false`: it
    /// cancelled a subscribe not sent yet, and Redis holds nothing to drop).
    pub(super) fn change(&mut self, change: Change<K>) -> bool {
        if let Some(replaced) = self.waiting.remove(&change.channel) {
            self.order.remove(&replaced.seq);
        }
        if !change.subscribe && !self.asked.contains(&change.channel) {
            return false;
        }
        debug_assert!(
            self.order.keys().all(|&seq| seq < change.seq),
            "changes come in sequence order"
        );
        self.order.insert(change.seq, change.channel.clone());
        self.waiting.insert(change.channel.clone(), change);
        self.check();
        true
    }

    /// The next batch to send (at most `max` changes, oldest first), if none
    /// is in flight; `None` when there is nothing to send or one is.
    pub(super) fn next_batch(&mut self, max: usize) -> Option<Vec<Change<K>>> {
        if self.in_flight || self.waiting.is_empty() {
            return None;
        }
        let mut batch = Vec::with_capacity(max.min(self.waiting.len()));
        while batch.len() < max {
            let Some((_, channel)) = self.order.pop_first() else {
                break;
            };
            let change = self
                .waiting
                .remove(&channel)
                .expect("every ordered channel has its change");
            if change.subscribe {
                self.asked.insert(change.channel.clone());
            } else {
                self.asked.remove(&change.channel);
            }
            batch.push(change);
        }
        self.in_flight = true;
        self.check();
        Some(batch)
    }

    /// Whether a change numbered `seq` or lower waits to be sent.
    pub(super) fn waits_up_to(&self, seq: u64) -> bool {
        self.order
            .first_key_value()
            .is_some_and(|(&first, _)| first <= seq)
    }

    /// Redis may hold `channel` though this connection's batches never
    /// asked for it (a command the client wrote late): an unsubscribe of
    /// it is sent, not cancelled.
    pub(super) fn assume_asked(&mut self, channel: &str) {
        self.asked.insert(channel.to_string());
    }

    /// The batch in flight was answered (each change's result is the
    /// broker's to act on).
    pub(super) fn batch_done(&mut self) {
        debug_assert!(self.in_flight, "a batch answered that was never sent");
        self.in_flight = false;
    }

    /// A new connection to Redis holds no channel: forget what was asked
    /// and the subscribes that wait (the broker asks for every held
    /// channel again). Unsubscribes waiting are kept: a subscribe the
    /// client queued before the connection dropped may still be written
    /// on the new one, and they undo it.
    pub(super) fn reset(&mut self) {
        self.waiting.retain(|_, change| !change.subscribe);
        let waiting = &self.waiting;
        self.order
            .retain(|_, channel| waiting.contains_key(channel));
        self.asked = self.uncertain.keys().cloned().collect();
        self.check();
    }

    /// A change of `channel` was answered for the current connection: its
    /// state in Redis is known.
    pub(super) fn known(&mut self, channel: &str) {
        self.uncertain.remove(channel);
    }

    /// A change of `channel` has no known outcome.
    pub(super) fn unknown(&mut self, channel: String, key: K) {
        self.asked.insert(channel.clone());
        self.uncertain.insert(channel, key);
    }

    /// The channels whose state in Redis is not known, in name order.
    pub(super) fn uncertain(&self) -> Vec<(String, K)>
    where
        K: Clone,
    {
        let mut uncertain: Vec<(String, K)> = self
            .uncertain
            .iter()
            .map(|(c, k)| (c.clone(), k.clone()))
            .collect();
        uncertain.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        uncertain
    }

    /// Changes not sent yet.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn check(&self) {
        debug_assert_eq!(
            self.order.len(),
            self.waiting.len(),
            "one order entry per waiting change"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, channel: &str, subscribe: bool) -> Change<()> {
        Change {
            seq,
            channel: channel.into(),
            subscribe,
            key: (),
        }
    }

    fn channels(batch: &[Change<()>]) -> Vec<(&str, bool)> {
        batch
            .iter()
            .map(|c| (c.channel.as_str(), c.subscribe))
            .collect()
    }

    #[test]
    fn a_subscribe_left_before_it_was_sent_costs_redis_nothing() {
        let mut plan = Plan::default();
        for n in 0..10_000u64 {
            let channel = format!("churn-{n}");
            assert!(plan.change(change(2 * n, &channel, true)));
            assert!(!plan.change(change(2 * n + 1, &channel, false)));
        }
        assert_eq!(plan.waiting(), 0);
        assert_eq!(plan.next_batch(1024), None);
    }

    #[test]
    fn one_batch_flies_at_a_time_and_later_changes_wait_coalesced() {
        let mut plan = Plan::default();
        plan.change(change(1, "a", true));
        plan.change(change(2, "b", true));
        let batch = plan.next_batch(1024).unwrap();
        assert_eq!(channels(&batch), [("a", true), ("b", true)]);
        // While it flies: a leaves and comes back, b leaves, c comes.
        plan.change(change(3, "a", false));
        plan.change(change(4, "b", false));
        plan.change(change(5, "a", true));
        plan.change(change(6, "c", true));
        assert_eq!(plan.next_batch(1024), None, "one batch in flight");
        plan.batch_done();
        let batch = plan.next_batch(1024).unwrap();
        assert_eq!(channels(&batch), [("b", false), ("a", true), ("c", true)]);
        assert_eq!(
            batch.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [4, 5, 6],
            "the newest change of a channel, in the order asked"
        );
    }

    #[test]
    fn batches_are_bounded_and_a_reset_forgets_everything() {
        let mut plan = Plan::default();
        for n in 0..5u64 {
            plan.change(change(n, &format!("t{n}"), true));
        }
        assert_eq!(plan.next_batch(2).unwrap().len(), 2);
        plan.batch_done();
        assert_eq!(plan.next_batch(2).unwrap().len(), 2);
        plan.reset();
        plan.batch_done();
        assert_eq!(plan.next_batch(2), None);
        // Redis holds nothing after a reset: leaving needs no unsubscribe.
        assert!(!plan.change(change(9, "t0", false)));
    }
}
