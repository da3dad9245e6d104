//! Pusher presence members across nodes, the broker's decisions: whether a
//! user's coming or going on this node is the cluster's (so the channel
//! hears `member_added` or `member_removed` once), and the goings nobody's
//! transition reports: the users of a node that died.
//!
//! Each presence channel's users live in Redis as one hash, beside the
//! nodes that hold them, each live until it stops refreshing:
//!
//! ```text
//! {prefix}:pm:{T}    hash user -> the nodes holding it, one per line
//! {prefix}:pml:{T}   sorted set of those nodes, scored by when they expire
//! ```
//!
//! (Not the presence's set of nodes, `pn`: a node leaves that as soon as
//! its last member goes, while its going may still be on its way here.)
//!
//! A transition is one script: a user's first live node is its coming,
//! its last its going, and the script publishes the event (framed by the
//! home shard) on the channel in the same step, so the channel hears its
//! members' comings and goings in the order Redis decided them: two tabs
//! closing at once on two nodes are one going, told by the second. Every
//! node delivers that message, the deciding one too. On each presence
//! refresh (a third of `presence_ttl`) the node rewrites its part of each
//! of its channels: its users are held again (those Redis had lost come
//! back, and are told), and every user no live node holds any more is
//! dropped and told gone (a dead node's, once its presence expired;
//! whichever live node runs it first). Those are told by a shard.
//!
//! Commands go one batch at a time, in order, so a node's transitions of a
//! user reach Redis in the order they happened. While a batch flies, a
//! user's coming and going on this node that were never sent cancel (the
//! cluster saw neither), so what waits is bounded by the channels' users.
//! What Redis may not have recorded is told as best it can be: a coming in
//! a batch that failed is told by the shard (twice at worst, which
//! Pusher's clients take as once); a going whose outcome is unknown (a
//! failed batch, a record Redis lost, Redis away: then the node tells its
//! own subscribers) is *doubtful*, and the next refresh tells it to the
//! cluster if nobody holds the user by then.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{self, Envelope, ShardId};

use super::super::wire;
use super::{BrokerState, Op};

/// Most commands in one batch.
const MAX_BATCH: usize = 512;

/// A shard's transition, as it came: this node's first connection of
/// `user` to `topic` (`joined`), or its last left, with the push that
/// tells it (framed; `None` for a stream topic).
pub(super) struct Transition {
    pub(super) topic: Arc<str>,
    pub(super) user: Arc<str>,
    /// The member's meta, `{"user_id":U,"user_info":I}`.
    pub(super) meta: Arc<str>,
    pub(super) joined: bool,
    pub(super) frame: Option<Bytes>,
}

/// One command for Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::cluster) enum MemberCommand {
    /// This node's first connection of `user` to `topic` (`joined`), or
    /// its last left; answered with what became of it. When it is the
    /// cluster's, Redis publishes `announce` (a channel and a message), if
    /// given, in the same step.
    Transition {
        topic: Arc<str>,
        user: Arc<str>,
        joined: bool,
        announce: Option<(String, Bytes)>,
    },
    /// This node holds exactly `users` of `topic`: hold them again, drop
    /// what else it held there, and drop every user no live node holds;
    /// answered with the users that came back and those gone (`doubtful`
    /// too, if nobody holds them: their last leave here had no known
    /// outcome).
    Refresh {
        topic: Arc<str>,
        users: Vec<Arc<str>>,
        doubtful: Vec<Arc<str>>,
    },
}

/// What Redis answered to a command, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::cluster) enum MemberAnswer {
    Transition(Outcome),
    /// Users of the topic held again that no live node held, and users no
    /// live node holds any more.
    Refresh {
        back: Vec<String>,
        gone: Vec<String>,
    },
}

/// What became of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::cluster) enum Outcome {
    /// The cluster's coming or going (told in the same step, if it had a
    /// message).
    Told,
    /// Another live node holds the user: the cluster saw no change.
    Held,
    /// A going of a user this node was not recorded as holding, and
    /// nobody holds: a refresh told it already, or Redis lost the record
    /// (a restart): the next refresh tells it if nobody holds it then.
    Unknown,
}

/// A transition waiting to be sent, and the shard waiting for its answer.
struct Waiting {
    command: MemberCommand,
    asker: (ShardId, u64),
}

/// Whom a command's answer is for.
enum Asker {
    /// A transition's shard and ticket.
    Shard(ShardId, u64),
    /// A refresh of this channel's.
    Refresh(Arc<str>),
}

/// Commands waiting and in flight.
#[derive(Default)]
pub(super) struct MemberEvents {
    /// Transitions not sent, in order, at most one per topic and user.
    waiting: BTreeMap<u64, Waiting>,
    /// The waiting transition of each topic and user.
    by_user: HashMap<(Arc<str>, Arc<str>), u64>,
    next: u64,
    /// A refresh of every channel is due: built when it goes, after every
    /// transition received, so it holds what they left.
    refresh_wanted: bool,
    /// The users this node holds, by topic, with a meta of each: as its
    /// transitions say, in the order they go to Redis (a refresh holds
    /// these, so it never gets ahead of a transition on its way).
    held: HashMap<Arc<str>, HashMap<Arc<str>, Arc<str>>>,
    /// Users whose last going here has no known outcome, by topic (a
    /// failed batch, an `Unknown` answer, Redis away): Redis may have
    /// dropped them without anyone telling the channel.
    doubtful: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// The batch in flight: each command and whom it answers.
    in_flight: Option<Vec<(Asker, MemberCommand)>>,
    /// Doubts wait: refresh at the next tick Redis is reachable.
    refresh_due: bool,
}

impl MemberEvents {
    /// A refresh of every channel this node holds users of (or doubts),
    /// as they stand: it carries every doubt.
    fn refresh_batch(&mut self) -> Vec<(Asker, MemberCommand)> {
        let mut doubtful = std::mem::take(&mut self.doubtful);
        self.refresh_due = false;
        let mut refresh = Vec::new();
        for (topic, users) in &self.held {
            let users = users.keys().cloned().collect();
            let doubtful = doubtful.remove(topic).into_iter().flatten().collect();
            refresh.push((topic.clone(), users, doubtful));
        }
        // Channels this node no longer holds users of: only the doubt.
        for (topic, doubtful) in doubtful {
            refresh.push((topic, Vec::new(), doubtful.into_iter().collect()));
        }
        let command = |(topic, users, doubtful): (Arc<str>, _, _)| {
            let asker = Asker::Refresh(topic.clone());
            let command = MemberCommand::Refresh {
                topic,
                users,
                doubtful,
            };
            (asker, command)
        };
        refresh.into_iter().map(command).collect()
    }

    /// Nothing waits or flies.
    #[cfg(test)]
    pub(super) fn idle(&self) -> bool {
        self.waiting.is_empty() && !self.refresh_wanted && self.in_flight.is_none()
    }
}

impl BrokerState {
    /// A shard's user came to or left a channel on this node.
    pub(super) fn on_member_transition(&mut self, asker: (ShardId, u64), transition: Transition) {
        let Transition {
            topic,
            user,
            meta,
            joined,
            frame,
        } = transition;
        let held = &mut self.member_events.held;
        if joined {
            let users = held.entry(topic.clone()).or_default();
            users.insert(user.clone(), meta);
        } else if let Some(users) = held.get_mut(&topic) {
            users.remove(&user);
            if users.is_empty() {
                held.remove(&topic);
            }
        }
        if !self.status.is_up() {
            // Degraded: the node tells its own subscribers (a publish
            // reaches no other node now); a going is told to the cluster
            // by a refresh once Redis is back, if nobody holds the user.
            if !joined {
                self.doubt(topic, [user]);
            }
            return self.answer_transition(asker, true);
        }
        let events = &mut self.member_events;
        let key = (topic.clone(), user.clone());
        if let Some(seq) = events.by_user.remove(&key) {
            // Its opposite was never sent: the cluster sees neither.
            let cancelled = events.waiting.remove(&seq).expect("indexed");
            debug_assert!(
                matches!(cancelled.command, MemberCommand::Transition { joined: j, .. } if j != joined),
                "a user's transitions alternate"
            );
            self.answer_transition(cancelled.asker, false);
            return self.answer_transition(asker, false);
        }
        let seq = events.next;
        events.next += 1;
        events.by_user.insert(key, seq);
        // Every node delivers it from Redis, this one too, in Redis's order.
        let prefix = &self.prefix;
        let announce = frame.and_then(|frame| {
            let kind = bus::IndexKind::Topic;
            wire::encode(prefix, wire::EVERY_NODE, kind, &topic, None, &frame)
        });
        let command = MemberCommand::Transition {
            topic,
            user,
            joined,
            announce,
        };
        events.waiting.insert(seq, Waiting { command, asker });
        self.send_members();
    }

    /// The presence refresh: this node's part of every presence channel it
    /// holds users of is rewritten, and what dead nodes left is swept.
    pub(super) fn refresh_member_events(&mut self) {
        self.member_events.refresh_wanted = true;
        self.send_members();
    }

    /// The health tick: while Redis is away, transitions waiting for it
    /// are decided by the node itself (as new ones are); once it is back,
    /// what waits goes.
    pub(super) fn check_member_events(&mut self) {
        if self.status.is_up() {
            if std::mem::take(&mut self.member_events.refresh_due) {
                self.member_events.refresh_wanted = true;
            }
            return self.send_members();
        }
        let waiting = std::mem::take(&mut self.member_events.waiting);
        self.member_events.by_user.clear();
        for (_, waiting) in waiting {
            if let MemberCommand::Transition {
                topic,
                user,
                joined: false,
                ..
            } = waiting.command
            {
                self.doubt(topic, [user]);
            }
            self.answer_transition(waiting.asker, true);
        }
    }

    /// Sends the next batch if none is in flight (and Redis is reachable).
    fn send_members(&mut self) {
        let events = &mut self.member_events;
        if events.in_flight.is_some() || !self.status.is_up() {
            return;
        }
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some((_, waiting)) = events.waiting.pop_first() else {
                break;
            };
            if let MemberCommand::Transition { topic, user, .. } = &waiting.command {
                events.by_user.remove(&(topic.clone(), user.clone()));
            }
            let (shard, ticket) = waiting.asker;
            batch.push((Asker::Shard(shard, ticket), waiting.command));
        }
        if events.waiting.is_empty() && std::mem::take(&mut events.refresh_wanted) {
            batch.extend(events.refresh_batch());
        }
        if batch.is_empty() {
            return;
        }
        let commands = batch.iter().map(|(_, command)| command.clone()).collect();
        events.in_flight = Some(batch);
        self.ops.push(Op::DecideMembers(commands));
    }

    /// Redis answered the batch in flight (`None`: it failed).
    pub(super) fn on_members_decided(&mut self, answers: Option<Vec<MemberAnswer>>) {
        let Some(batch) = self.member_events.in_flight.take() else {
            return;
        };
        let answers = answers.filter(|a| a.len() == batch.len());
        match answers {
            Some(answers) => {
                for ((asker, command), answer) in batch.into_iter().zip(answers) {
                    match (asker, answer) {
                        (Asker::Shard(shard, ticket), MemberAnswer::Transition(outcome)) => {
                            let MemberCommand::Transition {
                                topic,
                                user,
                                announce,
                                ..
                            } = command
                            else {
                                debug_assert!(false, "a transition's answer");
                                continue;
                            };
                            if outcome == Outcome::Unknown {
                                self.doubt(topic, [user]);
                            }
                            // Redis told the channel, unless it had no push.
                            let tell = outcome == Outcome::Told && announce.is_none();
                            self.answer_transition((shard, ticket), tell)
                        }
                        (Asker::Refresh(topic), MemberAnswer::Refresh { back, gone }) => {
                            self.tell_members_changed(topic, back, gone)
                        }
                        _ => debug_assert!(false, "an answer of another kind"),
                    }
                }
            }
            None => {
                // Redis may have run them or not. A coming is told (twice
                // at worst, which Pusher's clients take as once); a going
                // is left to the next refresh, which tells it if nobody
                // holds the user by then; a refresh is made again then.
                for (asker, command) in batch {
                    match (asker, command) {
                        (
                            Asker::Shard(shard, ticket),
                            MemberCommand::Transition {
                                topic,
                                user,
                                joined: false,
                                ..
                            },
                        ) => {
                            self.doubt(topic, [user]);
                            self.answer_transition((shard, ticket), false);
                        }
                        (Asker::Shard(shard, ticket), _) => {
                            self.answer_transition((shard, ticket), true)
                        }
                        (
                            _,
                            MemberCommand::Refresh {
                                topic, doubtful, ..
                            },
                        ) if !doubtful.is_empty() => self.doubt(topic, doubtful),
                        _ => {}
                    }
                }
            }
        }
        self.send_members();
    }

    /// `users` of `topic` may be gone without anyone telling the channel:
    /// a refresh soon tells them gone if nobody holds them.
    fn doubt(&mut self, topic: Arc<str>, users: impl IntoIterator<Item = Arc<str>>) {
        let events = &mut self.member_events;
        events.doubtful.entry(topic).or_default().extend(users);
        events.refresh_due = true;
    }

    /// The shard that asked is answered; `tell`: it tells the channel.
    fn answer_transition(&mut self, (to, ticket): (ShardId, u64), tell: bool) {
        self.send(to, Envelope::MemberDecided { ticket, tell });
    }

    /// Users came back or went for the cluster: a shard tells the channel
    /// (with the metas this node holds for those that came back).
    fn tell_members_changed(&mut self, topic: Arc<str>, back: Vec<String>, gone: Vec<String>) {
        if back.is_empty() && gone.is_empty() {
            return;
        }
        let held = self.member_events.held.get(&topic);
        let added: Vec<Arc<str>> = back
            .iter()
            .filter_map(|user| held?.get(user.as_str()).cloned())
            .collect();
        let to = bus::shard_of(&topic, self.shards);
        let envelope = Envelope::MembersChanged {
            topic,
            added,
            removed: gone,
        };
        self.send(to, envelope);
    }
}
