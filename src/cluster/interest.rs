//! Which names the node's shards hold, and when a shard's interest is
//! acknowledged, as plain data.
//!
//! The first shard to hold a name makes the node subscribe its Redis
//! channel; the acknowledgement (and so the client's `subscribed`) waits
//! until Redis confirms, so publications from every node reach it. While
//! Redis is away it is acknowledged at once (the client is told the node is
//! degraded), and the channel is asked for when Redis is back. A change
//! Redis failed keeps its waiters until a resync confirms it. The last
//! shard to let go unsubscribes. Changes go through the coalescing
//! [`Plan`]; what to do comes out as [`Step`]s the broker carries out.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::{IndexKind, ShardId, ShardSet};

use super::subscriptions::{Change, Plan};

/// A name of one of the node's indexes.
pub(super) type Key = (IndexKind, Arc<str>);

/// The control channel's key: a name no index holds (a chat name is a user
/// id, never empty), so its answer releases no waiter.
fn control_key() -> Key {
    (IndexKind::Chat, Arc::from(""))
}

fn is_control(key: &Key) -> bool {
    *key == control_key()
}

/// Most channel changes in one pipelined batch.
const CHANGE_BATCH: usize = 1024;

/// What the broker does for the interest table.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Acknowledge shard `to`'s interest in `key` (its round `epoch`).
    Ack { to: ShardId, key: Key, epoch: u64 },
    /// Send these changes, pipelined, on connection `connection`; report
    /// them with [`Interest::batch_done`].
    Send {
        connection: u64,
        batch: Vec<Change<Key>>,
    },
    /// No shard holds this topic any more: forget its stream.
    Forget(Arc<str>),
}

/// A name some shard of this node holds.
#[derive(Default)]
struct Held {
    shards: ShardSet,
    /// The subscribe sent for it last, not yet confirmed: its sequence number.
    pending: Option<u64>,
    /// Interest notices to acknowledge once that subscribe is confirmed.
    waiting: Vec<(ShardId, u64)>,
}

/// The node's held names and their channel subscriptions.
pub(super) struct Interest {
    names: HashMap<Key, Held>,
    plan: Plan<Key>,
    next_seq: u64,
    /// After a connection (or a resync), the last of the subscribes that
    /// restore every held channel: the node is not up until it is confirmed.
    restoring: Option<u64>,
    /// A change failed, or Redis stopped answering: every held channel is
    /// to be asked for again.
    resync: bool,
    /// Connections to Redis so far: failures on one that is gone need no
    /// resync (the new one asks for everything).
    connection: u64,
    steps: Vec<Step>,
}

impl Default for Interest {
    fn default() -> Self {
        Interest {
            names: HashMap::new(),
            plan: Plan::default(),
            next_seq: 1,
            restoring: None,
            resync: false,
            connection: 0,
            steps: Vec::new(),
        }
    }
}

impl Interest {
    /// The steps to carry out, in order.
    pub(super) fn take_steps(&mut self) -> Vec<Step> {
        std::mem::take(&mut self.steps)
    }

    /// The shards holding `key`.
    pub(super) fn holders(&self, key: &Key) -> Option<ShardSet> {
        self.names.get(key).map(|held| held.shards)
    }

    /// Names held.
    pub(super) fn len(&self) -> usize {
        self.names.len()
    }

    /// Changes waiting to be sent.
    pub(super) fn changes_waiting(&self) -> usize {
        self.plan.waiting()
    }

    /// Whether the channels of a connection (or a resync) are still being
    /// restored: the node is not up meanwhile.
    pub(super) fn restoring(&self) -> bool {
        self.restoring.is_some()
    }

    /// Whether a resync is due (and clears it).
    pub(super) fn take_resync(&mut self) -> bool {
        std::mem::take(&mut self.resync)
    }

    /// Shard `from` holds `key` now (`channel` is its Redis channel). With
    /// Redis `up`, the acknowledgement waits for the subscription.
    pub(super) fn on(&mut self, from: ShardId, key: Key, epoch: u64, channel: String, up: bool) {
        let held = self.names.entry(key.clone()).or_default();
        let first = held.shards.is_empty();
        held.shards.insert(from);
        if first {
            // Planned even while Redis is away, like an unsubscribe: the
            // plan keeps the latest intent per channel, so this replaces an
            // unsubscribe of the channel still waiting to be sent. Holders
            // that come once Redis is back wait for it.
            let seq = self.change(channel, true, key.clone());
            if let Some(held) = self.names.get_mut(&key) {
                held.pending = Some(seq);
            }
        }
        if !up {
            // Local delivery needs no wait: acknowledged now (the client
            // is told the node is degraded).
            self.steps.push(Step::Ack {
                to: from,
                key,
                epoch,
            });
            return;
        }
        match self.names.get_mut(&key) {
            Some(held) if held.pending.is_some() => held.waiting.push((from, epoch)),
            _ => self.steps.push(Step::Ack {
                to: from,
                key,
                epoch,
            }),
        }
    }

    /// Shard `from` let go of `key`.
    pub(super) fn off(&mut self, from: ShardId, key: Key, channel: String) {
        let Some(held) = self.names.get_mut(&key) else {
            return;
        };
        held.shards.remove(from);
        if !held.shards.is_empty() {
            return;
        }
        let held = self.names.remove(&key).unwrap_or_default();
        if key.0 == IndexKind::Topic {
            self.steps.push(Step::Forget(key.1.clone()));
        }
        for (shard, epoch) in held.waiting {
            self.steps.push(Step::Ack {
                to: shard,
                key: key.clone(),
                epoch,
            });
        }
        // Planned even while Redis is away: a channel it was asked for is
        // dropped once it answers; one never asked for costs nothing.
        self.change(channel, false, key);
    }

    /// A batch came back; returns whether it finished restoring the
    /// channels (the node may be up now, and streams are to be checked).
    pub(super) fn batch_done(&mut self, connection: u64, done: Vec<(Change<Key>, bool)>) -> bool {
        self.plan.batch_done();
        let mut restored = false;
        let mut stale = Vec::new();
        for (change, ok) in done {
            if ok && connection == self.connection {
                self.plan.known(&change.channel);
            } else {
                self.plan
                    .unknown(change.channel.clone(), change.key.clone());
            }
            if ok || connection != self.connection {
                self.confirmed(change.seq, &change.key);
            } else {
                // Its waiters wait for the resync's subscribe: a client is
                // told `subscribed` only once Redis holds the channel (or
                // the node turns degraded, and says so).
                self.resync = true;
            }
            // Meant for a connection since replaced: the client queues
            // commands while it reconnects and writes them on the new
            // one (even one it reported as timed out), so a subscribe may
            // have landed where nothing holds the channel any more. It is
            // dropped there.
            let replaced = connection != self.connection;
            if replaced && change.subscribe && !self.names.contains_key(&change.key) {
                stale.push(change);
            }
        }
        // Restored once no change of the restore waits any more (one
        // replaced by a newer change, or cancelled, is not waited for).
        if let Some(last) = self.restoring {
            if !self.plan.waits_up_to(last) {
                self.restoring = None;
                restored = true;
            }
        }
        for change in stale.into_iter().filter(|c| !is_control(&c.key)) {
            self.plan.assume_asked(&change.channel);
            self.change(change.channel, false, change.key);
        }
        self.send_next();
        restored
    }

    /// Redis is gone (or stopped answering): nobody would confirm the
    /// subscribes in flight, so their waiters are acknowledged now, and
    /// every channel is asked for again when Redis is back.
    pub(super) fn lost(&mut self) {
        for (key, held) in &mut self.names {
            held.pending = None;
            for (shard, epoch) in held.waiting.drain(..) {
                self.steps.push(Step::Ack {
                    to: shard,
                    key: key.clone(),
                    epoch,
                });
            }
        }
        self.resync = true;
    }

    /// A new connection to Redis: it holds no channel.
    pub(super) fn reconnected(&mut self) {
        self.connection += 1;
        self.plan.reset();
        self.resync = false;
    }

    /// Asks for every held channel again (and `control` first); `channel`
    /// names a key's channel. With `gate`, the node counts as restoring
    /// until the last is confirmed.
    pub(super) fn resubscribe_all(
        &mut self,
        control: String,
        channel: impl Fn(&Key) -> String,
        gate: bool,
    ) {
        let mut last = self.change(control, true, control_key());
        // In name order, not the hasher's: a simulation seed replays.
        let mut keys: Vec<Key> = self.names.keys().cloned().collect();
        keys.sort_unstable();
        for key in keys {
            let seq = self.change(channel(&key), true, key.clone());
            last = seq;
            if let Some(held) = self.names.get_mut(&key) {
                held.pending = Some(seq);
            }
        }
        // Channels that may have been subscribed by a change whose
        // outcome is unknown, and that nothing holds: dropped.
        for (channel, key) in self.plan.uncertain() {
            if !self.names.contains_key(&key) && !is_control(&key) {
                last = self.change(channel, false, key);
            }
        }
        if gate {
            self.restoring = Some(last);
        }
    }

    /// Plans a change; returns its sequence number.
    fn change(&mut self, channel: String, subscribe: bool, key: Key) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.plan.change(Change {
            seq,
            channel,
            subscribe,
            key,
        });
        self.send_next();
        seq
    }

    fn send_next(&mut self) {
        if let Some(batch) = self.plan.next_batch(CHANGE_BATCH) {
            self.steps.push(Step::Send {
                connection: self.connection,
                batch,
            });
        }
    }

    /// Redis confirmed change `seq` of `key`: its waiters are acknowledged
    /// (an older subscribe's answer does not release a newer one's).
    fn confirmed(&mut self, seq: u64, key: &Key) {
        let Some(held) = self.names.get_mut(key) else {
            return;
        };
        if held.pending != Some(seq) {
            return;
        }
        held.pending = None;
        for (shard, epoch) in std::mem::take(&mut held.waiting) {
            self.steps.push(Step::Ack {
                to: shard,
                key: key.clone(),
                epoch,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        (IndexKind::Topic, Arc::from(name))
    }

    fn channel(name: &str) -> String {
        format!("c:{name}")
    }

    /// Answers every batch sent so far with `ok`; returns the acks they released.
    fn answer(interest: &mut Interest, ok: bool) -> Vec<Step> {
        let mut released = Vec::new();
        loop {
            let steps = interest.take_steps();
            let mut sent = false;
            for step in steps {
                match step {
                    Step::Send { connection, batch } => {
                        sent = true;
                        let done = batch.into_iter().map(|c| (c, ok)).collect();
                        interest.batch_done(connection, done);
                    }
                    other => released.push(other),
                }
            }
            if !sent {
                return released;
            }
        }
    }

    #[test]
    fn a_subscriber_is_acknowledged_only_once_redis_confirms() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), true);
        let steps = interest.take_steps();
        assert!(matches!(&steps[..], [Step::Send { batch, .. }] if batch.len() == 1));
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Ack { .. })),
            "no ack before Redis confirms"
        );
        // A second shard joins while the subscribe flies: it waits too.
        interest.on(ShardId(1), key("a"), 7, channel("a"), true);
        assert!(interest.take_steps().is_empty());
        let Step::Send { connection, batch } = steps.into_iter().next().unwrap() else {
            unreachable!()
        };
        interest.batch_done(connection, batch.into_iter().map(|c| (c, true)).collect());
        let acks = interest.take_steps();
        assert_eq!(
            acks,
            [
                Step::Ack {
                    to: ShardId(0),
                    key: key("a"),
                    epoch: 1
                },
                Step::Ack {
                    to: ShardId(1),
                    key: key("a"),
                    epoch: 7
                },
            ]
        );
    }

    #[test]
    fn a_failed_subscribe_keeps_its_waiters_until_the_resync_confirms() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), true);
        assert!(
            answer(&mut interest, false).is_empty(),
            "a failure releases nobody"
        );
        assert!(interest.take_resync());
        interest.resubscribe_all("ctl".into(), |k| channel(&k.1), false);
        let acks = answer(&mut interest, true);
        assert_eq!(
            acks,
            [Step::Ack {
                to: ShardId(0),
                key: key("a"),
                epoch: 1
            }]
        );
    }

    #[test]
    fn while_redis_is_away_interest_is_acknowledged_at_once_and_restored_after() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), false);
        let steps = interest.take_steps();
        assert!(
            steps.contains(&Step::Ack {
                to: ShardId(0),
                key: key("a"),
                epoch: 1
            }),
            "acknowledged at once: {steps:?}"
        );
        // The subscribe planned meanwhile fails with the connection.
        let Some(Step::Send { connection, batch }) = steps.into_iter().next() else {
            panic!("the subscribe is planned, to replace any unsubscribe waiting")
        };
        let failed = batch.into_iter().map(|c| (c, false)).collect();
        assert!(!interest.batch_done(connection, failed));
        interest.reconnected();
        interest.resubscribe_all("ctl".into(), |k| channel(&k.1), true);
        assert!(interest.restoring());
        let steps = interest.take_steps();
        let Some(Step::Send { connection, batch }) = steps.into_iter().next() else {
            panic!("the control channel goes first")
        };
        let restored =
            interest.batch_done(connection, batch.into_iter().map(|c| (c, true)).collect());
        assert!(!restored, "the held channel is still on its way");
        let Some(Step::Send { connection, batch }) = interest.take_steps().into_iter().next()
        else {
            panic!("then the held channel")
        };
        assert_eq!(batch[0].channel, "c:a");
        assert!(interest.batch_done(connection, batch.into_iter().map(|c| (c, true)).collect()));
        assert!(!interest.restoring());
    }

    #[test]
    fn losing_redis_acknowledges_the_waiters_and_asks_for_a_resync() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), true);
        let _in_flight = interest.take_steps();
        interest.lost();
        assert_eq!(
            interest.take_steps(),
            [Step::Ack {
                to: ShardId(0),
                key: key("a"),
                epoch: 1
            }]
        );
        assert!(interest.take_resync());
    }

    #[test]
    fn the_last_holder_leaving_forgets_the_topic_and_unsubscribes() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), true);
        answer(&mut interest, true);
        interest.on(ShardId(1), key("a"), 2, channel("a"), true);
        assert_eq!(
            interest.take_steps(),
            [Step::Ack {
                to: ShardId(1),
                key: key("a"),
                epoch: 2
            }],
            "held and confirmed: acknowledged at once"
        );
        interest.off(ShardId(0), key("a"), channel("a"));
        assert!(interest.take_steps().is_empty(), "shard 1 still holds it");
        interest.off(ShardId(1), key("a"), channel("a"));
        let steps = interest.take_steps();
        assert_eq!(steps[0], Step::Forget(Arc::from("a")));
        assert!(matches!(&steps[1], Step::Send { batch, .. } if !batch[0].subscribe));
        assert_eq!(interest.len(), 0);
    }

    #[test]
    fn a_change_answered_on_a_connection_that_is_gone_asks_for_no_resync() {
        let mut interest = Interest::default();
        interest.on(ShardId(0), key("a"), 1, channel("a"), true);
        let Some(Step::Send { connection, batch }) = interest.take_steps().into_iter().next()
        else {
            panic!()
        };
        interest.reconnected();
        interest.batch_done(connection, batch.into_iter().map(|c| (c, false)).collect());
        assert!(
            !interest.take_resync(),
            "the new connection asks for everything anyway"
        );
    }
}
