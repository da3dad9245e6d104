//! A fake Redis for the cluster simulation: the data the scripts keep
//! (streams with their epochs, offsets, logs and idempotency keys;
//! registrations; presence hashes) and what each of the broker's commands
//! does to it, as plain data. Faults (stalls, dropped connections,
//! restarts) are the scheduler's (`sim::mod`); this is what a restart keeps
//! or loses.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bus::{self, IndexKind};
use crate::cluster::liveness::Pong;
use crate::cluster::state::{
    control_channel, Event, MemberAnswer, MemberCommand, Op, Outcome, Read, ReadFrom, ReadRequest,
    StreamPublication,
};
use crate::engine::Position;
use crate::protocol::message;

/// One stream's run: its epoch, latest offset and log (offset -> event,
/// payload). The fake never trims: the simulation keeps every run within
/// `history_size`, so a publication missing from the log is lost.
pub(super) struct Stream {
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    pub(super) log: BTreeMap<u64, (String, String)>,
}

/// What executing one command did: the answer for the node that sent it
/// (none for a plain publish), and messages for every node subscribed to
/// their channels.
pub(super) struct Executed {
    pub(super) reply: Option<Event>,
    pub(super) messages: Vec<(String, Bytes)>,
}

/// Redis's data, and each node's subscribed channels on its current
/// connection.
pub(super) struct FakeRedis {
    prefix: String,
    pub(super) streams: HashMap<Arc<str>, Stream>,
    /// Idempotency keys: (topic, key) -> the first run's position.
    keys: HashMap<(Arc<str>, String), Position>,
    pub(super) registrations: BTreeMap<String, (String, Vec<String>)>,
    /// topic -> node name -> conn id -> meta.
    pub(super) presence: HashMap<Arc<str>, BTreeMap<String, BTreeMap<String, String>>>,
    /// Channels each node's subscriber connection holds.
    pub(super) subscribed: Vec<HashSet<String>>,
    /// Runs started so far: each new stream run gets a new epoch.
    runs: u64,
    /// Every publication ever stored, by run and offset (its payload),
    /// kept through restarts: the one order the checks hold pushes to.
    pub(super) stored: HashMap<Arc<str>, BTreeMap<u64, String>>,
    /// Publications answered with a first run's position (a retry with
    /// the same idempotency key).
    pub(super) deduplicated: usize,
    /// Pusher presence channels' users: topic -> user -> the nodes holding
    /// it.
    pub(super) member_holders: HashMap<Arc<str>, BTreeMap<String, BTreeSet<String>>>,
    /// Each topic's nodes holding users and when they expire (`pml`: set
    /// by the members script's joins and refreshes).
    member_live: HashMap<Arc<str>, BTreeMap<String, Instant>>,
    presence_ttl: Duration,
    /// Every coming (`true`) and going of a channel's user decided for the
    /// cluster, in Redis's order, kept through restarts: what the
    /// channels were told.
    pub(super) members_told: Vec<(Arc<str>, String, bool)>,
}

impl FakeRedis {
    pub(super) fn new(prefix: &str, nodes: usize, presence_ttl: Duration) -> FakeRedis {
        FakeRedis {
            prefix: prefix.to_string(),
            streams: HashMap::new(),
            keys: HashMap::new(),
            registrations: BTreeMap::new(),
            presence: HashMap::new(),
            subscribed: vec![HashSet::new(); nodes],
            runs: 0,
            stored: HashMap::new(),
            deduplicated: 0,
            member_holders: HashMap::new(),
            member_live: HashMap::new(),
            presence_ttl,
            members_told: Vec::new(),
        }
    }

    /// Restarted without persistence: nothing is kept.
    pub(super) fn lose_everything(&mut self) {
        self.streams.clear();
        self.keys.clear();
        self.registrations.clear();
        self.presence.clear();
        self.member_holders.clear();
        self.member_live.clear();
    }

    /// A node's connection closed: its subscriptions went with it.
    pub(super) fn disconnect(&mut self, node: usize) {
        self.subscribed[node].clear();
    }

    fn new_run(&mut self) -> Stream {
        self.runs += 1;
        Stream {
            epoch: Arc::from(format!("run{}", self.runs)),
            offset: 0,
            log: BTreeMap::new(),
        }
    }

    /// Carries out `op` for node `node` (named `name`).
    pub(super) fn execute(&mut self, node: usize, name: &str, op: Op, now: Instant) -> Executed {
        let mut messages = Vec::new();
        let reply = match op {
            Op::ToShard { .. } => unreachable!("envelopes go on the bus"),
            Op::Subscriptions {
                connection,
                changes,
            } => {
                let held = &mut self.subscribed[node];
                for change in &changes {
                    if change.subscribe {
                        held.insert(change.channel.clone());
                    } else {
                        held.remove(&change.channel);
                    }
                }
                let changes = changes.into_iter().map(|c| (c, true)).collect();
                Some(Event::Subscribed {
                    connection,
                    changes,
                })
            }
            Op::Publish {
                channel, message, ..
            } => {
                messages.push((channel, message));
                None
            }
            Op::StreamPublish(publication) => {
                let (position, message) = self.publish(publication.clone());
                messages.extend(message);
                Some(Event::Published {
                    answer: publication.answer,
                    result: Ok(position),
                })
            }
            Op::Read(request) => {
                let id = request.id;
                Some(Event::Read {
                    id,
                    result: Ok(self.read(request)),
                })
            }
            Op::WriteRegistration(write) => {
                match write.registration {
                    Some(registration) => {
                        self.registrations.insert(write.id.clone(), registration);
                    }
                    None => {
                        self.registrations.remove(&write.id);
                    }
                }
                let channel = control_channel(&self.prefix);
                messages.push((channel, Bytes::from(write.notice)));
                Some(Event::RegistryWritten {
                    from: write.from,
                    ticket: write.ticket,
                    id: write.id,
                    ok: true,
                })
            }
            Op::LoadRegistrations { after } => Some(Event::RegistrationsLoaded {
                after,
                found: self
                    .registrations
                    .iter()
                    .map(|(id, (user, topics))| (id.clone(), user.clone(), topics.clone()))
                    .collect(),
                complete: true,
            }),
            Op::WritePresence(writes) => {
                for write in writes {
                    let nodes = self.presence.entry(write.topic.clone()).or_default();
                    let hash = nodes.entry(name.to_string()).or_default();
                    if write.whole {
                        hash.clear();
                    }
                    for id in write.delete {
                        hash.remove(&id);
                    }
                    hash.extend(write.set);
                    if !write.remains || hash.is_empty() {
                        nodes.remove(name);
                    }
                    if nodes.is_empty() {
                        self.presence.remove(&write.topic);
                    }
                }
                Some(Event::PresenceWritten(true))
            }
            Op::QueryPresence(query) => {
                let mut members = bus::Members::default();
                let nodes = self.presence.get(&query.topic);
                for (node, hash) in nodes.into_iter().flatten() {
                    if node == name {
                        continue;
                    }
                    for (id, meta) in hash {
                        members.offer(
                            &query.query,
                            || format!("{node}/{id}"),
                            |conn_id| format!("{{\"conn_id\":\"{conn_id}\",\"meta\":{meta}}}"),
                        );
                    }
                }
                members.trim(query.query.limit);
                Some(Event::PresenceAnswered {
                    from: query.from,
                    ticket: query.ticket,
                    members,
                })
            }
            Op::AskNodes { id, message } => {
                let channel = control_channel(&self.prefix);
                let receivers = self
                    .subscribed
                    .iter()
                    .filter(|s| s.contains(&channel))
                    .count();
                messages.push((channel, message));
                Some(Event::NodesAsked {
                    id,
                    receivers: Some(receivers),
                })
            }
            Op::AnswerNode { message } => {
                messages.push((control_channel(&self.prefix), message));
                None
            }
            Op::DecideMembers(commands) => {
                let answers = commands
                    .into_iter()
                    .map(|command| self.decide_member(name, command, now, &mut messages))
                    .collect();
                Some(Event::MembersDecided(Some(answers)))
            }
            Op::Ping => Some(Event::Pong(Pong::Answered)),
        };
        Executed { reply, messages }
    }

    /// The members script (`cluster::redis::member_events`), for node `node`.
    fn decide_member(
        &mut self,
        node: &str,
        command: MemberCommand,
        now: Instant,
        messages: &mut Vec<(String, Bytes)>,
    ) -> MemberAnswer {
        let (topic, joined) = match &command {
            MemberCommand::Transition { topic, joined, .. } => (topic.clone(), *joined),
            MemberCommand::Refresh { topic, .. } => (topic.clone(), true),
        };
        let nodes = self.member_live.entry(topic.clone()).or_default();
        if joined {
            nodes.insert(node.to_string(), now + self.presence_ttl);
        }
        let live: BTreeSet<String> = (nodes.iter())
            .filter(|(_, expires)| **expires > now)
            .map(|(n, _)| n.clone())
            .collect();
        let alive = |n: &String| n == node || live.contains(n);
        let users = self.member_holders.entry(topic.clone()).or_default();
        match command {
            MemberCommand::Transition { user, announce, .. } => {
                let holders = users.entry(user.to_string()).or_default();
                holders.retain(|n| alive(n));
                let mine = if joined {
                    !holders.insert(node.to_string())
                } else {
                    holders.remove(node)
                };
                let others = holders.len() - usize::from(joined);
                if holders.is_empty() {
                    users.remove(&*user);
                }
                // A join by a node not yet recorded, or a leave by one that
                // was, with nobody else: the cluster's.
                let outcome = if others == 0 && mine != joined {
                    self.members_told.push((topic, user.to_string(), joined));
                    messages.extend(announce);
                    Outcome::Told
                } else if others == 0 && !joined {
                    Outcome::Unknown
                } else {
                    Outcome::Held
                };
                MemberAnswer::Transition(outcome)
            }
            MemberCommand::Refresh {
                users: held,
                doubtful,
                ..
            } => {
                let mut back = Vec::new();
                for user in &held {
                    let nodes = users.entry(user.to_string()).or_default();
                    nodes.retain(|n| alive(n));
                    if nodes.is_empty() {
                        back.push(user.to_string());
                    }
                    nodes.insert(node.to_string());
                }
                let mut gone = Vec::new();
                users.retain(|user, nodes| {
                    let mine = held.iter().any(|u| **u == **user);
                    nodes.retain(|n| if n == node { mine } else { live.contains(n) });
                    if nodes.is_empty() {
                        gone.push(user.clone());
                    }
                    !nodes.is_empty()
                });
                for user in doubtful {
                    let held = users.contains_key(&*user);
                    if !held && !gone.iter().any(|g| **g == *user) {
                        gone.push(user.to_string());
                    }
                }
                if users.is_empty() {
                    self.member_holders.remove(&topic);
                }
                for user in &back {
                    self.members_told.push((topic.clone(), user.clone(), true));
                }
                for user in &gone {
                    self.members_told.push((topic.clone(), user.clone(), false));
                }
                MemberAnswer::Refresh { back, gone }
            }
        }
    }

    /// The publish script: a second run with the same key answers the
    /// first's position; otherwise the next offset, logged and published.
    fn publish(&mut self, publication: StreamPublication) -> (Position, Option<(String, Bytes)>) {
        let topic = publication.answer.topic.clone();
        if let Some(key) = &publication.key {
            if let Some(first) = self.keys.get(&(topic.clone(), key.clone())) {
                self.deduplicated += 1;
                return (first.clone(), None);
            }
        }
        if !self.streams.contains_key(&topic) {
            let run = self.new_run();
            self.streams.insert(topic.clone(), run);
        }
        let stream = self.streams.get_mut(&topic).expect("made above");
        stream.offset += 1;
        let position = Position {
            offset: stream.offset,
            epoch: stream.epoch.clone(),
        };
        let (event, payload) = (publication.event, publication.payload);
        let text = format!(
            "S{} {} {}\n{event}{payload}",
            position.offset,
            position.epoch,
            event.len()
        );
        let runs = self.stored.entry(position.epoch.clone()).or_default();
        runs.insert(position.offset, payload.clone());
        stream.log.insert(position.offset, (event, payload));
        if let Some(key) = publication.key {
            self.keys.insert((topic, key), position.clone());
        }
        (position, Some((publication.channel, Bytes::from(text))))
    }

    /// The read script: the run's position, the entries after where the
    /// request starts (up to its limit), and the latest it asks for.
    fn read(&mut self, request: ReadRequest) -> Read {
        if !self.streams.contains_key(&request.topic) {
            if !request.create {
                return Read {
                    epoch: Arc::from(""),
                    offset: 0,
                    first: 1,
                    entries: Vec::new(),
                    latest: Vec::new(),
                };
            }
            let run = self.new_run();
            self.streams.insert(request.topic.clone(), run);
        }
        let stream = &self.streams[&request.topic];
        let topic = &request.topic;
        let frame = |(at, (event, payload)): (&u64, &(String, String))| {
            (*at, message::push_at(topic, *at, event, payload))
        };
        let first = stream
            .log
            .keys()
            .next()
            .copied()
            .unwrap_or(stream.offset + 1);
        let after = match request.from {
            ReadFrom::Nowhere => None,
            ReadFrom::After(offset) => Some(offset),
            ReadFrom::Window(window) => {
                Some((first - 1).max(stream.offset.saturating_sub(window as u64)))
            }
        };
        let entries = match after {
            Some(after) => stream
                .log
                .range(after.saturating_add(1)..)
                .take(request.limit)
                .map(frame)
                .collect(),
            None => Vec::new(),
        };
        let latest = match request.from {
            ReadFrom::Window(_) => Vec::new(),
            _ => {
                let mut latest: Vec<_> = stream
                    .log
                    .iter()
                    .rev()
                    .take(request.latest)
                    .map(frame)
                    .collect();
                latest.reverse();
                latest
            }
        };
        Read {
            epoch: stream.epoch.clone(),
            offset: stream.offset,
            first,
            entries,
            latest,
        }
    }

    /// The channels of `kind` names a node holds, as names.
    pub(super) fn held_names(&self, node: usize, kind: IndexKind) -> HashSet<String> {
        self.subscribed[node]
            .iter()
            .filter_map(|c| crate::cluster::wire::parse_channel(&self.prefix, c))
            .filter(|(k, _)| *k == kind)
            .map(|(_, name)| name.to_string())
            .collect()
    }
}
