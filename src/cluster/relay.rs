//! The node's side of every stream Redis orders, as plain data: what
//! arrives (messages from the topic's channel, reads of its log, the
//! positions this node acknowledged) goes in, and what to do comes out as
//! [`Action`]s the broker carries out (deliver a frame to the shards, tell
//! them the stream started again, read the log, answer an open).
//!
//! Frames go to the shards in offset order, each once. A gap (a message
//! lost while the node resubscribed, or a Redis that failed over) is read
//! from the log before anything newer goes out; a duplicate is dropped; a
//! hole the log no longer holds either (trimmed, or lost) is skipped and
//! counted. An open waits until forwarding reaches the position Redis gave
//! it, so its answer sits at the right place among the live frames. A
//! stream Redis lost (a new epoch) is reset in order and forwarded from
//! its first offset.
//!
//! Time plays no part; the seeded simulation in `tests` runs it against a
//! faulty fake of Redis.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::engine::Position;

use super::state::Read;

/// Frames forwarded per stream kept to complete an open that Redis answered
/// with an older position than the node has forwarded.
const RECENT: usize = 256;
/// Runs of a stream remembered as over: a message or a read of one of them
/// that comes late (the channel and the reads travel on different
/// connections) must not take the stream back to it.
const RETIRED: usize = 4;

/// What the broker does for the relay.
#[derive(Debug)]
pub(super) enum Action<O> {
    /// Send `frame` to the node's shards holding `topic`.
    Deliver { topic: Arc<str>, frame: Bytes },
    /// Redis lost `topic` and started it again under `epoch`: tell its
    /// subscribers, before the new run's frames.
    Reset { topic: Arc<str>, epoch: Arc<str> },
    /// Read `topic`'s log after `after` and report it with `filled`.
    Fill { topic: Arc<str>, after: u64 },
    /// Read where Redis stands on `topic` and report it with `checked`.
    Check { topic: Arc<str> },
    /// Answer `opening` now: `forwarded` is where forwarding stands, and
    /// `newer` the frames forwarded after the open's read (`covered` when
    /// they are all there).
    Open {
        opening: O,
        read: Read,
        forwarded: Position,
        newer: Vec<(u64, Bytes)>,
        covered: bool,
    },
    /// Publications the log no longer held were skipped.
    Skipped { topic: Arc<str>, count: u64 },
}

/// One stream's forwarding.
struct Stream<O> {
    epoch: Option<Arc<str>>,
    /// The latest offset forwarded to the shards.
    last: u64,
    /// Arrived ahead of a gap, waiting for the gap to be filled.
    held: BTreeMap<u64, Bytes>,
    /// A fill from the log is under way.
    filling: bool,
    /// The latest frames forwarded, oldest first.
    recent: VecDeque<(u64, Bytes)>,
    /// Opens answered by Redis with a position not yet forwarded.
    opens: Vec<(u64, O, Read)>,
    /// Fills go on until this offset is forwarded (a check, or a drain).
    catch_up_to: u64,
    /// The latest offset this node acknowledged to a publisher.
    acknowledged: u64,
    /// A check of where Redis stands is under way.
    checking: bool,
    /// The channel was subscribed again while a check was under way: that
    /// check may have run before, so another follows it.
    recheck: bool,
    /// The last check failed: asked again at the next health check.
    check_due: bool,
    /// The first open's read is on its way and nothing is known of the
    /// stream yet: messages are kept (`early`) until it says where
    /// forwarding starts, since they may follow its position.
    first_read: bool,
    early: VecDeque<(Arc<str>, u64, Bytes)>,
    /// Runs this stream left, newest last.
    retired: VecDeque<Arc<str>>,
}

impl<O> Default for Stream<O> {
    fn default() -> Self {
        Stream {
            epoch: None,
            last: 0,
            held: BTreeMap::new(),
            filling: false,
            recent: VecDeque::new(),
            opens: Vec::new(),
            catch_up_to: 0,
            acknowledged: 0,
            checking: false,
            recheck: false,
            check_due: false,
            first_read: false,
            early: VecDeque::new(),
            retired: VecDeque::new(),
        }
    }
}

impl<O> Stream<O> {
    fn position(&self) -> Position {
        Position {
            offset: self.last,
            epoch: self.epoch.clone().unwrap_or_else(|| Arc::from("")),
        }
    }

    /// Whether `epoch` is a run this stream already left.
    fn is_retired(&self, epoch: &str) -> bool {
        self.retired.iter().any(|r| **r == *epoch)
    }

    /// Forwarding goes on from `last` in run `epoch`.
    fn restart(&mut self, epoch: Arc<str>, last: u64) {
        debug_assert!(
            !self.is_retired(&epoch),
            "a stream never goes back to a run it left"
        );
        if let Some(old) = self.epoch.replace(epoch) {
            self.retired.push_back(old);
            if self.retired.len() > RETIRED {
                self.retired.pop_front();
            }
        }
        self.last = last;
        self.catch_up_to = last;
        self.acknowledged = 0;
        self.held.clear();
        self.recent.clear();
    }

    fn caught_up(&self) -> bool {
        !self.checking && self.last >= self.acknowledged.max(self.catch_up_to)
    }

    /// Whether another fill is needed now.
    fn wants_fill(&self) -> bool {
        let waiting = self.opens.iter().any(|(target, ..)| *target > self.last);
        !self.filling && (!self.held.is_empty() || waiting || self.catch_up_to > self.last)
    }

    fn check(&self) {
        debug_assert!(
            self.held.keys().all(|&at| at > self.last),
            "held frames are ahead of what was forwarded"
        );
        debug_assert!(self.recent.len() <= RECENT);
        debug_assert!(
            self.recent.back().map_or(true, |(at, _)| *at == self.last),
            "the newest recent frame is the last forwarded"
        );
    }
}

/// Every stream the node's shards hold, and the actions waiting.
pub(super) struct Relay<O> {
    streams: HashMap<Arc<str>, Stream<O>>,
    actions: Vec<Action<O>>,
}

impl<O> Default for Relay<O> {
    fn default() -> Self {
        Relay {
            streams: HashMap::new(),
            actions: Vec::new(),
        }
    }
}

impl<O> Relay<O> {
    /// The actions to carry out, in order.
    pub(super) fn take_actions(&mut self) -> Vec<Action<O>> {
        std::mem::take(&mut self.actions)
    }

    /// Whether some shard of the node opened `topic` (its messages matter).
    pub(super) fn holds(&self, topic: &str) -> bool {
        self.streams.contains_key(topic)
    }

    /// Where forwarding of `topic` stands (a stream first seen here
    /// starts with no epoch).
    pub(super) fn position(&mut self, topic: &Arc<str>) -> Position {
        let stream = self.streams.entry(topic.clone()).or_default();
        // Answered without a read: the subscribers stand at the start of a
        // run not known yet (see `opened`).
        stream.first_read = false;
        stream.early.clear();
        stream.position()
    }

    /// An open's read of `topic` is on its way; if the stream is new here,
    /// its messages are kept until the read says where forwarding starts.
    pub(super) fn opening(&mut self, topic: &Arc<str>) {
        if !self.streams.contains_key(topic) {
            let stream = self.streams.entry(topic.clone()).or_default();
            stream.first_read = true;
        }
    }

    /// A message from `topic`'s channel: publication `offset` of run
    /// `epoch`, framed. Ignored for a stream nobody here opened yet (its
    /// first open reads the position).
    pub(super) fn message(&mut self, topic: &Arc<str>, offset: u64, epoch: &str, frame: Bytes) {
        debug_assert!(offset > 0, "offsets start at 1");
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        if stream.first_read {
            // Where forwarding starts is not known yet: kept, bounded (a
            // frame dropped here is filled from the log later).
            if stream.early.len() == RECENT {
                stream.early.pop_front();
            }
            stream.early.push_back((Arc::from(epoch), offset, frame));
            return;
        }
        if stream.is_retired(epoch) {
            return; // late, from a run Redis lost
        }
        if stream.epoch.as_deref() != Some(epoch) {
            self.new_run(topic, Arc::from(epoch));
        }
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        if offset <= stream.last {
            return; // a duplicate: a fill got it first
        }
        stream.held.insert(offset, frame);
        self.forward_ready(topic);
        self.fill_if_needed(topic);
    }

    /// An open's read of `topic` came back: answer it once forwarding has
    /// reached the read's position.
    pub(super) fn opened(&mut self, topic: &Arc<str>, opening: O, read: Read) {
        let stream = self.streams.entry(topic.clone()).or_default();
        let first_read = std::mem::take(&mut stream.first_read);
        if stream.is_retired(&read.epoch) {
            // Read before Redis lost the run: the subscriber starts where
            // forwarding of the new run stands.
            let at = stream.last;
            let epoch = stream.epoch.clone().unwrap_or_else(|| Arc::from(""));
            let now = Read {
                epoch,
                offset: at,
                first: at + 1,
                entries: Vec::new(),
                latest: Vec::new(),
            };
            return self.answer_open_at(topic, opening, now, at);
        }
        match &stream.epoch {
            // First sight: forwarding starts where Redis stands, with the
            // messages that came meanwhile and follow it.
            None if first_read => {
                self.first_sight(topic, &read);
                return self.answer_open(topic, opening, read);
            }
            // Subscribers answered while Redis could not be read stand at
            // offset 0 of a run not known then: the run is theirs from its
            // start, as when a message or a check sees it first.
            None => stream.restart(read.epoch.clone(), 0),
            Some(epoch) if *epoch != read.epoch => self.new_run(topic, read.epoch.clone()),
            Some(_) => {}
        }
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        if read.offset > stream.last {
            // Publications Redis has assigned are still on their way here.
            stream.opens.push((read.offset, opening, read));
            self.fill_if_needed(topic);
            return;
        }
        self.answer_open(topic, opening, read);
    }

    /// A fill's read of `topic` came back (`None`: it failed).
    pub(super) fn filled(&mut self, topic: &Arc<str>, read: Option<Read>) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        stream.filling = false;
        let other_run = read.as_ref().is_some_and(|r| {
            stream.epoch.as_deref() != Some(&*r.epoch) && !stream.is_retired(&r.epoch)
        });
        if other_run {
            // Redis lost the run being filled and started another: asking
            // the old one again would never get it. The read tells where
            // the new run stands, as a check does.
            let checking = std::mem::replace(&mut stream.checking, true);
            self.checked(topic, read);
            if let Some(stream) = self.streams.get_mut(topic) {
                stream.checking |= checking;
            }
            return;
        }
        if let Some(read) = read.filter(|r| stream.epoch.as_deref() == Some(&*r.epoch)) {
            let first_missing = stream.last + 1;
            for (at, frame) in read.entries.iter() {
                if *at > stream.last {
                    stream.held.entry(*at).or_insert_with(|| frame.clone());
                }
            }
            // Gone from the log too (trimmed, or lost): skip the hole;
            // subscribers see it in the offsets.
            if !stream.held.contains_key(&first_missing) && read.first > first_missing {
                // Up to what the log or the frames held go on from.
                let held_from = stream.held.keys().next().map_or(u64::MAX, |at| at - 1);
                let to = read.first.saturating_sub(1).min(read.offset).min(held_from);
                let count = to.saturating_sub(stream.last);
                stream.last = to;
                stream.recent.clear();
                if count > 0 {
                    let topic = topic.clone();
                    self.actions.push(Action::Skipped { topic, count });
                }
            }
        }
        self.forward_ready(topic);
        self.fill_if_needed(topic);
    }

    /// Asks where Redis stands on every stream (after a reconnection, or as
    /// a drain begins).
    pub(super) fn check_all(&mut self) {
        for topic in self.topics() {
            if let Some(stream) = self.streams.get_mut(&topic) {
                stream.checking = true;
                self.actions.push(Action::Check { topic });
            }
        }
    }

    /// Every stream is checked once Redis can be asked (the health tick's
    /// `check_due`): messages were lost while it could not.
    pub(super) fn check_all_later(&mut self) {
        for stream in self.streams.values_mut() {
            stream.check_due = true;
        }
    }

    /// Asks where Redis stands on `topic` (its channel was just
    /// subscribed again: messages published before may have been missed).
    pub(super) fn check(&mut self, topic: &Arc<str>) {
        if let Some(stream) = self.streams.get_mut(topic) {
            if stream.checking {
                // The check under way may have been read before the
                // channel was held: what came between is only seen by
                // another.
                stream.recheck = true;
                return;
            }
            stream.checking = true;
            self.actions.push(Action::Check {
                topic: topic.clone(),
            });
        }
    }

    /// The streams held, in name order: what is asked of Redis for all of
    /// them goes in an order that does not depend on the hasher, so a
    /// simulation seed replays exactly.
    fn topics(&self) -> Vec<Arc<str>> {
        let mut topics: Vec<Arc<str>> = self.streams.keys().cloned().collect();
        topics.sort_unstable();
        topics
    }

    /// Asks where Redis stands on the streams whose last check failed, and
    /// on those whose run this node does not know yet (subscribers were
    /// answered while Redis could not be read: once known, the run is
    /// forwarded to them from its start).
    pub(super) fn check_due(&mut self) {
        for topic in self.topics() {
            let Some(stream) = self.streams.get_mut(&topic) else {
                continue;
            };
            let unknown = stream.epoch.is_none() && !stream.first_read;
            if (unknown || stream.check_due) && !stream.checking {
                stream.checking = true;
                stream.check_due = false;
                self.actions.push(Action::Check { topic });
            }
        }
    }

    /// A check of `topic` came back (`None`: it failed): a new run is
    /// reset now, and what Redis assigned is filled.
    pub(super) fn checked(&mut self, topic: &Arc<str>, read: Option<Read>) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        stream.checking = false;
        if std::mem::take(&mut stream.recheck) {
            stream.checking = true;
            self.actions.push(Action::Check {
                topic: topic.clone(),
            });
        }
        let Some(read) = read else {
            if !stream.checking {
                stream.check_due = true;
            }
            return;
        };
        if stream.first_read {
            return self.first_sight(topic, &read);
        }
        // A check is answered on the connection it was sent on, so after
        // any restart before it: it is the truth, even about a run the
        // stream had left (a late message of an older run took it back).
        stream.retired.retain(|run| *run != read.epoch);
        if stream.epoch.as_deref() != Some(&*read.epoch) {
            self.new_run(topic, read.epoch.clone());
        }
        if let Some(stream) = self.streams.get_mut(topic) {
            stream.catch_up_to = stream.catch_up_to.max(read.offset);
        }
        self.fill_if_needed(topic);
    }

    /// This node acknowledged `position` of `topic` to a publisher.
    pub(super) fn acknowledged(&mut self, topic: &Arc<str>, position: &Position) {
        if let Some(stream) = self.streams.get_mut(topic) {
            if stream.epoch.as_deref() == Some(&*position.epoch) {
                stream.acknowledged = stream.acknowledged.max(position.offset);
            }
        }
    }

    /// Streams with something acknowledged or assigned not forwarded yet:
    /// each gets a fill under way.
    pub(super) fn catch_up(&mut self) -> usize {
        let pending: Vec<Arc<str>> = self
            .topics()
            .into_iter()
            .filter(|topic| self.streams.get(topic).is_some_and(|s| !s.caught_up()))
            .collect();
        for topic in &pending {
            if let Some(stream) = self.streams.get_mut(topic) {
                stream.catch_up_to = stream.catch_up_to.max(stream.acknowledged);
            }
            self.fill_if_needed(topic);
        }
        pending.len()
    }

    /// Forgets a stream no shard holds any more.
    pub(super) fn forget(&mut self, topic: &str) {
        self.streams.remove(topic);
    }

    /// The first read of a stream new here (`first_read`): forwarding
    /// starts where it stands, with the messages kept meanwhile that follow.
    fn first_sight(&mut self, topic: &Arc<str>, read: &Read) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        stream.first_read = false;
        stream.restart(read.epoch.clone(), read.offset);
        for (epoch, offset, frame) in std::mem::take(&mut stream.early) {
            if epoch == read.epoch && offset > read.offset {
                stream.held.insert(offset, frame);
            }
        }
        self.forward_ready(topic);
        self.fill_if_needed(topic);
    }

    /// Redis started `topic` again under `epoch`: subscribers are told, in
    /// order, and the new run is forwarded from its first offset.
    fn new_run(&mut self, topic: &Arc<str>, epoch: Arc<str>) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        let lost = stream.epoch.is_some();
        stream.restart(epoch.clone(), 0);
        // Opens waiting for a position of the lost run never get there:
        // they are answered at the new run's start, which is where the
        // subscribers stand too.
        let stranded = std::mem::take(&mut stream.opens);
        if lost {
            let topic = topic.clone();
            self.actions.push(Action::Reset {
                topic,
                epoch: epoch.clone(),
            });
        }
        for (_, opening, _) in stranded {
            let start = Read {
                epoch: epoch.clone(),
                offset: 0,
                first: 1,
                entries: Vec::new(),
                latest: Vec::new(),
            };
            self.answer_open_at(topic, opening, start, 0);
        }
    }

    fn fill_if_needed(&mut self, topic: &Arc<str>) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        if stream.wants_fill() {
            stream.filling = true;
            let (topic, after) = (topic.clone(), stream.last);
            self.actions.push(Action::Fill { topic, after });
        }
    }

    /// Forwards held frames that follow `last`, in order, answering the
    /// opens whose position each reaches right after it.
    fn forward_ready(&mut self, topic: &Arc<str>) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        let mut ready = Vec::new();
        while let Some(frame) = stream.held.remove(&(stream.last + 1)) {
            stream.last += 1;
            stream.recent.push_back((stream.last, frame.clone()));
            if stream.recent.len() > RECENT {
                stream.recent.pop_front();
            }
            ready.push((stream.last, frame));
        }
        let last = stream.last;
        let (mut due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut stream.opens)
            .into_iter()
            .partition(|(target, ..)| *target <= last);
        stream.opens = waiting;
        stream.check();
        due.sort_by_key(|(target, ..)| *target);
        let mut due = due.into_iter().peekable();
        for (at, frame) in ready {
            self.actions.push(Action::Deliver {
                topic: topic.clone(),
                frame,
            });
            while let Some((_, opening, read)) = due.next_if(|(target, ..)| *target <= at) {
                self.answer_open_at(topic, opening, read, at);
            }
        }
        for (_, opening, read) in due {
            self.answer_open(topic, opening, read);
        }
    }

    fn answer_open(&mut self, topic: &Arc<str>, opening: O, read: Read) {
        let last = self.streams.get(topic).map_or(0, |s| s.last);
        self.answer_open_at(topic, opening, read, last);
    }

    /// Answers `opening` as forwarding stood at `at`.
    fn answer_open_at(&mut self, topic: &Arc<str>, opening: O, read: Read, at: u64) {
        let Some(stream) = self.streams.get(topic) else {
            return;
        };
        debug_assert!(
            read.offset <= at,
            "an open is answered once its position went out"
        );
        let newer: Vec<(u64, Bytes)> = stream
            .recent
            .iter()
            .filter(|(offset, _)| *offset > read.offset && *offset <= at)
            .cloned()
            .collect();
        let covered = newer.len() as u64 == at.saturating_sub(read.offset);
        let forwarded = Position {
            offset: at,
            epoch: read.epoch.clone(),
        };
        self.actions.push(Action::Open {
            opening,
            read,
            forwarded,
            newer,
            covered,
        });
    }
}

#[cfg(test)]
mod tests;
