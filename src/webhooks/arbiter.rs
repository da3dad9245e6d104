//! Across nodes (`[webhooks]` with `[cluster]`): which node's transition is
//! the cluster's, decided in Redis, without I/O. The node tells Redis when
//! it starts or stops holding a name (a topic, a user, a user in a topic);
//! Redis's scripts (`cluster.rs`) answer whether that made the name occupied
//! for the whole cluster, and after the delay whether it is still vacant,
//! each answer given to exactly one node, so each transition is reported
//! once for the cluster.
//!
//! In Redis, per name (one key, so one slot of a Redis Cluster):
//!
//! ```text
//! {prefix}:wh:{<entry>}    hash: <node> -> 1 for each holder,
//!                           ~a: who announced it (the occupied event was sent),
//!                           ~t: a counter bumped by every join and last leave
//!                               (a delayed check carries the value it saw)
//! {prefix}:wh:{<entry>}:v  hash: who reported it vacant (so a retry answers alike)
//! ```
//!
//! Both expire a while after the name's last holder left.
//!
//! and per node, under one hash tag: `live:<node>` (expires `presence_ttl`
//! after the node's last heartbeat), `idx:<node>` (the names it holds or
//! still has to check) and `nodes`. A node that dies without saying
//! goodbye stops refreshing `live`; the next heartbeat of another node
//! claims it, and that node removes it from every name in its index and
//! reports those left without holders vacant at once.
//!
//! Commands go to Redis one batch at a time, in order; a batch that failed
//! (Redis down, a timeout) is sent again as it was, and every command is
//! written so running it twice answers as running it once. While a batch
//! waits, a name's changes coalesce (held, released and held again is no
//! change), so what waits is bounded by the names the node holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Subject;

/// A name: what a transition is about (see `state.rs`).
pub type Key = (Subject, Arc<str>, Option<Arc<str>>);

/// The first wait after a failed batch; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most name changes and checks in one batch (the rest wait for the next).
const MAX_BATCH: usize = 512;

/// One command for Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Refresh this node's `live` key; answers whether it was still there
    /// and which dead nodes this node claimed to sweep.
    Heartbeat,
    /// This node holds `key`; `tag` names this join, so a second run of it
    /// answers `announced` as the first did.
    Join { key: Key, tag: String },
    /// This node no longer holds `key`; answers a check token if no node does.
    Leave { key: Key },
    /// Whether `key` is still vacant since the leave that gave `token`: if
    /// so this node reports it (`tag` makes a second run answer alike).
    Check { key: Key, token: i64, tag: String },
    /// This node has no more business with `key`: off its index.
    Forget { key: Key },
    /// `dead` stopped refreshing its `live` key: remove it from every name
    /// in its index; answers the names that became vacant (`tag` names
    /// this sweep, so a second run answers alike).
    Sweep { dead: String, tag: String },
    /// `dead` was swept (and the answer read): its index and its place on
    /// the list of nodes go, unless it came back.
    ForgetNode { dead: String },
    /// The node stops with nothing held: off the list of nodes.
    Goodbye,
}

/// Redis's answer to each [`Command`], in order. A decision carries
/// Redis's clock (Unix ms) when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Heartbeat { present: bool, dead: Vec<String> },
    Joined { announced: Option<u64> },
    Left { token: Option<i64> },
    Checked { vacated: Option<u64> },
    Swept { vacated: Vec<(Key, u64)> },
    Done,
}

/// The events the cluster decided this node reports, with Redis's clock
/// (Unix ms) when each was decided: one clock for the cluster, so a
/// backend ordering a name's events by it gets them in the order they
/// happened, even when a retried answer made one arrive after a later one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The first holder in the cluster (no event for a user).
    Occupied(Key, u64),
    /// No holder in the cluster for the delay (or a dead node's last).
    Vacated(Key, u64),
}

/// The node's side of the cluster-wide transitions.
#[derive(Debug)]
pub struct Arbiter {
    node: Arc<str>,
    /// The delays after a last leave, per subject.
    delays: [Duration; 3],
    /// How long a node's `live` key outlives its last heartbeat (it
    /// heartbeats every third of it).
    live_ttl: Duration,
    next_heartbeat: Instant,
    heartbeats_answered: u64,
    /// Since when every batch was answered: only a node that heard from
    /// Redis for a whole `live_ttl` sweeps others. After an outage, the
    /// first node back would otherwise find every other node's key expired
    /// and report all their names vacant; they heartbeat again within it.
    answering_since: Option<Instant>,
    /// Names this node holds now.
    held: HashSet<Key>,
    /// Names Redis counts this node a holder of (as last answered).
    joined: HashSet<Key>,
    /// Names whose `held` and `joined` may differ, oldest change first.
    dirty: VecDeque<Key>,
    in_dirty: HashSet<Key>,
    /// Checks waiting for their delay, per subject (fixed delays, so in
    /// order), and each name's latest token (an older one is void).
    checks: [VecDeque<(Instant, Key, i64)>; 3],
    checking: HashMap<Key, i64>,
    /// Names to take off the index.
    forget: Vec<Key>,
    /// Dead nodes this node claimed, and those it swept; `sweeping` has
    /// both until they are forgotten (a claim is answered again by each
    /// heartbeat until then, and must be swept once).
    sweeps: Vec<String>,
    swept: Vec<String>,
    sweeping: HashSet<String>,
    in_flight: Option<(u64, Vec<Command>)>,
    sent: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    next_batch: u64,
    next_tag: u64,
    /// Stopping: checks are due at once, and a goodbye ends it.
    flushing: bool,
    said_goodbye: bool,
    decided: Vec<Decision>,
    /// Batches that failed (each retried).
    pub failures_total: u64,
}

impl Arbiter {
    /// `node` names this run of the node in Redis (random, so a restarted
    /// node is a new one); `delays` per subject; its `live` key lasts
    /// `live_ttl` after each heartbeat.
    pub fn new(node: Arc<str>, delays: [Duration; 3], live_ttl: Duration, now: Instant) -> Arbiter {
        debug_assert!(!node.is_empty() && !node.starts_with('~'));
        debug_assert!(!live_ttl.is_zero());
        Arbiter {
            node,
            delays,
            live_ttl,
            next_heartbeat: now,
            heartbeats_answered: 0,
            answering_since: None,
            held: HashSet::new(),
            joined: HashSet::new(),
            dirty: VecDeque::new(),
            in_dirty: HashSet::new(),
            checks: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            checking: HashMap::new(),
            forget: Vec::new(),
            sweeps: Vec::new(),
            swept: Vec::new(),
            sweeping: HashSet::new(),
            in_flight: None,
            sent: false,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            next_batch: 0,
            next_tag: 0,
            flushing: false,
            said_goodbye: false,
            decided: Vec::new(),
            failures_total: 0,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node started (`on`) or stopped holding `key`.
    pub fn hold(&mut self, key: Key, on: bool) {
        let changed = if on {
            self.held.insert(key.clone())
        } else {
            self.held.remove(&key)
        };
        debug_assert!(changed, "{key:?} held twice or released twice");
        self.mark(key);
    }

    fn mark(&mut self, key: Key) {
        if self.in_dirty.insert(key.clone()) {
            self.dirty.push_back(key);
        }
    }

    /// The node is stopping (its shards released everything): checks are
    /// due at once, then it says goodbye.
    pub fn flush(&mut self) {
        self.flushing = true;
        self.retry_at = None;
    }

    /// The batch to send now, if any (one at a time).
    pub fn next_batch(&mut self, now: Instant) -> Option<(u64, Vec<Command>)> {
        if self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        if let Some((id, commands)) = &self.in_flight {
            if self.sent {
                return None;
            }
            // A failed batch, again as it was.
            self.sent = true;
            self.retry_at = None;
            return Some((*id, commands.clone()));
        }
        let mut commands = Vec::new();
        if now >= self.next_heartbeat && !self.said_goodbye {
            commands.push(Command::Heartbeat);
            self.next_heartbeat = now + self.live_ttl / 3;
        }
        for dead in std::mem::take(&mut self.sweeps) {
            self.next_tag += 1;
            let tag = format!("{}:{}", self.node, self.next_tag);
            commands.push(Command::Sweep { dead, tag });
        }
        commands.extend(
            self.swept
                .drain(..)
                .map(|dead| Command::ForgetNode { dead }),
        );
        // Before this batch's joins: a name held again stays on the index.
        let forget: Vec<Key> = self.forget.drain(..).collect();
        for key in forget {
            let busy = self.held.contains(&key)
                || self.joined.contains(&key)
                || self.checking.contains_key(&key);
            if !busy {
                commands.push(Command::Forget { key });
            }
        }
        while commands.len() < MAX_BATCH {
            let Some(key) = self.dirty.pop_front() else {
                break;
            };
            self.in_dirty.remove(&key);
            match (self.held.contains(&key), self.joined.contains(&key)) {
                (true, false) => {
                    self.next_tag += 1;
                    let tag = format!("{}:{}", self.node, self.next_tag);
                    commands.push(Command::Join { key, tag });
                }
                (false, true) => commands.push(Command::Leave { key }),
                _ => {}
            }
        }
        for subject in 0..3 {
            while let Some((at, _, _)) = self.checks[subject].front() {
                if (*at > now && !self.flushing) || commands.len() >= MAX_BATCH {
                    break;
                }
                let (_, key, token) = self.checks[subject].pop_front().expect("a front");
                if self.checking.get(&key) != Some(&token) {
                    continue;
                }
                if self.held.contains(&key) {
                    // Held again: the join voided the token.
                    self.checking.remove(&key);
                    continue;
                }
                self.next_tag += 1;
                let tag = format!("{}:{}", self.node, self.next_tag);
                commands.push(Command::Check { key, token, tag });
            }
        }
        if commands.is_empty() && self.flushing && !self.said_goodbye && self.settled() {
            self.said_goodbye = true;
            commands.push(Command::Goodbye);
        }
        if commands.is_empty() {
            return None;
        }
        self.next_batch += 1;
        self.in_flight = Some((self.next_batch, commands.clone()));
        self.sent = true;
        Some((self.next_batch, commands))
    }

    /// Nothing held, joined, waiting or checking.
    fn settled(&self) -> bool {
        self.held.is_empty()
            && self.joined.is_empty()
            && self.dirty.is_empty()
            && self.checking.is_empty()
            && self.in_flight.is_none()
    }

    /// Redis answered batch `id` (`None`: it failed, and is sent again
    /// after a backoff).
    pub fn answered(&mut self, id: u64, answers: Option<Vec<Answer>>, now: Instant) {
        let Some((current, commands)) = self.in_flight.take() else {
            debug_assert!(false, "an answer to no batch");
            return;
        };
        debug_assert_eq!(current, id, "one batch at a time");
        let answers = match answers {
            Some(answers) if answers.len() == commands.len() => answers,
            _ => {
                self.failures_total += 1;
                self.answering_since = None;
                self.in_flight = Some((current, commands));
                self.sent = false;
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return;
            }
        };
        self.backoff = FIRST_BACKOFF;
        self.answering_since.get_or_insert(now);
        for (command, answer) in commands.into_iter().zip(answers) {
            self.apply(command, answer, now);
        }
    }

    fn apply(&mut self, command: Command, answer: Answer, now: Instant) {
        match (command, answer) {
            (Command::Heartbeat, Answer::Heartbeat { present, dead }) => {
                if !present && self.heartbeats_answered > 0 {
                    // Redis lost this node's keys (a restart), or the node
                    // was presumed dead and swept: join everything again.
                    tracing::warn!(
                        "webhooks: Redis no longer knew node {}; its names join again",
                        self.node
                    );
                    let joined: Vec<Key> = self.joined.drain().collect();
                    for key in joined {
                        self.mark(key);
                    }
                }
                self.heartbeats_answered += 1;
                let trusted = self
                    .answering_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= self.live_ttl);
                // An untrusted claim is answered again by later heartbeats
                // while it lasts, and the node is swept then if still dead.
                for dead in dead.into_iter().filter(|_| trusted) {
                    if self.sweeping.insert(dead.clone()) {
                        self.sweeps.push(dead);
                    }
                }
            }
            (Command::Join { key, .. }, Answer::Joined { announced }) => {
                if let Some(at) = announced {
                    self.decided.push(Decision::Occupied(key.clone(), at));
                }
                self.joined.insert(key.clone());
                // A check waiting was voided by this join.
                self.checking.remove(&key);
                if !self.held.contains(&key) {
                    self.mark(key);
                }
            }
            (Command::Leave { key }, Answer::Left { token }) => {
                self.joined.remove(&key);
                match token {
                    Some(token) => {
                        let at = now + self.delays[key.0 as usize];
                        self.checking.insert(key.clone(), token);
                        self.checks[key.0 as usize].push_back((at, key.clone(), token));
                    }
                    None if !self.held.contains(&key) => self.forget.push(key.clone()),
                    None => {}
                }
                if self.held.contains(&key) {
                    self.mark(key);
                }
            }
            (Command::Check { key, token, .. }, Answer::Checked { vacated }) => {
                if let Some(at) = vacated {
                    self.decided.push(Decision::Vacated(key.clone(), at));
                }
                if self.checking.get(&key) == Some(&token) {
                    self.checking.remove(&key);
                    if !self.held.contains(&key) && !self.joined.contains(&key) {
                        self.forget.push(key);
                    }
                }
            }
            (Command::Sweep { dead, .. }, Answer::Swept { vacated }) => {
                // Only now: a sweep sent again reads the same index.
                self.swept.push(dead);
                self.decided.extend(
                    vacated
                        .into_iter()
                        .map(|(key, at)| Decision::Vacated(key, at)),
                );
            }
            (Command::ForgetNode { dead }, Answer::Done) => {
                self.sweeping.remove(&dead);
            }
            (Command::Forget { .. } | Command::Goodbye, Answer::Done) => {}
            (command, answer) => {
                debug_assert!(false, "{answer:?} does not answer {command:?}");
            }
        }
    }

    /// The transitions decided since the last call.
    pub fn take_decided(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.decided)
    }

    /// When [`next_batch`](Self::next_batch) has something to send, if no
    /// change comes first.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.in_flight.is_some() {
            return self.retry_at.filter(|_| !self.sent);
        }
        if self.said_goodbye {
            return None;
        }
        let checks = self.checks.iter().filter_map(|q| q.front()).map(|c| c.0);
        checks.chain([self.next_heartbeat]).min()
    }

    /// Commands waiting for Redis: changes, checks and sweeps not yet sent.
    pub fn waiting(&self) -> usize {
        self.dirty.len()
            + self.checks.iter().map(VecDeque::len).sum::<usize>()
            + self.forget.len()
            + self.sweeps.len()
            + self.swept.len()
            + self.in_flight.as_ref().map_or(0, |(_, c)| c.len())
    }

    /// Stopping, and everything owed was sent and answered.
    pub fn idle(&self) -> bool {
        self.said_goodbye && self.in_flight.is_none()
    }
}

/// A name as its index entry: `t:<topic>`, `u:<user>`, or
/// `m:<topic length>:<topic><user>` (any bytes in either).
pub fn entry(key: &Key) -> String {
    match (key.0, &key.2) {
        (Subject::Topic, _) => format!("t:{}", key.1),
        (Subject::User, _) => format!("u:{}", key.1),
        (Subject::Member, user) => format!(
            "m:{}:{}{}",
            key.1.len(),
            key.1,
            user.as_deref().unwrap_or_default()
        ),
    }
}

/// The name an index entry stands for; `None` for one this version does
/// not write (never trusted for a slice).
pub fn parse_entry(entry: &str) -> Option<Key> {
    let (kind, rest) = entry.split_at_checked(2)?;
    match kind {
        "t:" => Some((Subject::Topic, Arc::from(rest), None)),
        "u:" => Some((Subject::User, Arc::from(rest), None)),
        "m:" => {
            let (len, rest) = rest.split_once(':')?;
            let len: usize = len.parse().ok()?;
            let topic = rest.get(..len)?;
            let user = rest.get(len..)?;
            Some((Subject::Member, Arc::from(topic), Some(Arc::from(user))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's side of the scripts, as a model: per name its holders and
    /// marks, per node its index and liveness.
    #[derive(Default)]
    struct FakeRedis {
        names: HashMap<Key, Name>,
        live: HashSet<String>,
        nodes: HashSet<String>,
        index: HashMap<String, HashSet<Key>>,
        /// Dead nodes and who claimed each (a claim lapses with its
        /// claimer, as the claim key expires).
        claimed: HashMap<String, String>,
        /// Redis's clock: one tick per command.
        clock: u64,
    }

    #[derive(Default, Clone)]
    struct Name {
        holders: HashSet<String>,
        announced: Option<String>,
        token: i64,
        announced_at: u64,
        vacated: HashMap<String, u64>,
    }

    impl FakeRedis {
        fn run(&mut self, node: &str, command: &Command) -> Answer {
            self.clock += 1;
            let now = self.clock;
            match command {
                Command::Heartbeat => {
                    let present = !self.live.insert(node.to_string());
                    self.nodes.insert(node.to_string());
                    let dead: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| !self.live.contains(*n) && n.as_str() != node)
                        .filter(|n| {
                            self.claimed
                                .get(*n)
                                .map_or(true, |by| by == node || !self.live.contains(by))
                        })
                        .cloned()
                        .collect();
                    for dead in &dead {
                        self.claimed.insert(dead.clone(), node.to_string());
                    }
                    Answer::Heartbeat { present, dead }
                }
                Command::Join { key, tag } => {
                    self.index
                        .entry(node.to_string())
                        .or_default()
                        .insert(key.clone());
                    let name = self.names.entry(key.clone()).or_default();
                    name.holders.insert(node.to_string());
                    name.token += 1;
                    let announced = match &name.announced {
                        None => {
                            name.announced = Some(tag.clone());
                            name.announced_at = now;
                            Some(now)
                        }
                        Some(by) => (by == tag).then_some(name.announced_at),
                    };
                    Answer::Joined { announced }
                }
                Command::Leave { key } => {
                    let name = self.names.entry(key.clone()).or_default();
                    name.holders.remove(node);
                    if !name.holders.is_empty() {
                        return Answer::Left { token: None };
                    }
                    name.token += 1;
                    Answer::Left {
                        token: Some(name.token),
                    }
                }
                Command::Check { key, token, tag } => {
                    let name = self.names.entry(key.clone()).or_default();
                    Answer::Checked {
                        vacated: name.vacate(tag, Some(*token), now),
                    }
                }
                Command::Forget { key } => {
                    self.index.entry(node.to_string()).or_default().remove(key);
                    Answer::Done
                }
                Command::Sweep { dead, tag } => {
                    let mut vacated = Vec::new();
                    for key in self.index.get(dead).cloned().unwrap_or_default() {
                        let name = self.names.entry(key.clone()).or_default();
                        name.holders.remove(dead);
                        if let Some(at) = name.vacate(tag, None, now) {
                            vacated.push((key, at));
                        }
                    }
                    Answer::Swept { vacated }
                }
                Command::ForgetNode { dead } => {
                    if !self.live.contains(dead) {
                        self.index.remove(dead);
                        self.nodes.remove(dead);
                    }
                    Answer::Done
                }
                Command::Goodbye => {
                    self.live.remove(node);
                    self.nodes.remove(node);
                    self.index.remove(node);
                    Answer::Done
                }
            }
        }
    }

    impl Name {
        fn vacate(&mut self, tag: &str, token: Option<i64>, now: u64) -> Option<u64> {
            if let Some(at) = self.vacated.get(tag) {
                return Some(*at);
            }
            if !self.holders.is_empty() || token.is_some_and(|t| t != self.token) {
                return None;
            }
            self.announced.take()?;
            self.vacated.insert(tag.to_string(), now);
            Some(now)
        }
    }

    fn topic(name: &str) -> Key {
        (Subject::Topic, Arc::from(name), None)
    }

    const DELAY: Duration = Duration::from_millis(1000);

    /// Heartbeats every 10 s.
    const LIVE_TTL: Duration = Duration::from_secs(30);

    fn arbiter(node: &str, now: Instant) -> Arbiter {
        Arbiter::new(Arc::from(node), [DELAY; 3], LIVE_TTL, now)
    }

    /// Runs every batch `arbiter` has at `now` against `redis`: what it
    /// decided (occupied or not), without times.
    fn settle(arbiter: &mut Arbiter, redis: &mut FakeRedis, now: Instant) -> Vec<(bool, Key)> {
        while let Some((id, commands)) = arbiter.next_batch(now) {
            let node = arbiter.node().to_string();
            let answers = commands.iter().map(|c| redis.run(&node, c)).collect();
            arbiter.answered(id, Some(answers), now);
        }
        arbiter
            .take_decided()
            .into_iter()
            .map(|d| match d {
                Decision::Occupied(key, _) => (true, key),
                Decision::Vacated(key, _) => (false, key),
            })
            .collect()
    }

    #[test]
    fn two_nodes_holding_a_topic_make_one_occupied_and_one_vacated() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let (mut a, mut b) = (arbiter("a", t0), arbiter("b", t0));
        a.hold(topic("x"), true);
        b.hold(topic("x"), true);
        assert_eq!(settle(&mut a, &mut redis, t0), [(true, topic("x"))]);
        assert_eq!(settle(&mut b, &mut redis, t0), []);
        a.hold(topic("x"), false);
        b.hold(topic("x"), false);
        assert_eq!(settle(&mut a, &mut redis, t0), []);
        assert_eq!(settle(&mut b, &mut redis, t0), []);
        let later = t0 + DELAY;
        let decided = [
            settle(&mut a, &mut redis, later),
            settle(&mut b, &mut redis, later),
        ]
        .concat();
        assert_eq!(decided, [(false, topic("x"))], "once, by b");
        assert!(redis.index.values().all(HashSet::is_empty), "indexes empty");
    }

    #[test]
    fn a_holder_back_on_another_node_within_the_delay_voids_the_vacate() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let (mut a, mut b) = (arbiter("a", t0), arbiter("b", t0));
        a.hold(topic("x"), true);
        settle(&mut a, &mut redis, t0);
        a.hold(topic("x"), false);
        settle(&mut a, &mut redis, t0);
        b.hold(topic("x"), true);
        assert_eq!(settle(&mut b, &mut redis, t0), [], "still occupied");
        assert_eq!(settle(&mut a, &mut redis, t0 + DELAY), []);
    }

    #[test]
    fn a_lost_answer_is_sent_again_and_answered_alike() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let mut a = arbiter("a", t0);
        a.hold(topic("x"), true);
        let (id, commands) = a.next_batch(t0).unwrap();
        for c in &commands {
            redis.run("a", c);
        }
        a.answered(id, None, t0);
        assert_eq!(a.next_batch(t0), None, "backoff first");
        let retry = t0 + FIRST_BACKOFF;
        assert_eq!(
            settle(&mut a, &mut redis, retry),
            [(true, topic("x"))],
            "the retry's join answers as the lost one would have"
        );
        a.hold(topic("x"), false);
        settle(&mut a, &mut redis, retry);
        let (id, commands) = a.next_batch(retry + DELAY).unwrap();
        for c in &commands {
            redis.run("a", c);
        }
        a.answered(id, None, retry + DELAY);
        assert_eq!(
            settle(&mut a, &mut redis, retry + DELAY + FIRST_BACKOFF),
            [(false, topic("x"))]
        );
    }

    #[test]
    fn a_dead_node_is_swept_once_and_its_names_vacated() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let (mut a, mut b, mut c) = (arbiter("a", t0), arbiter("b", t0), arbiter("c", t0));
        for node in [&mut a, &mut b] {
            settle(node, &mut redis, t0);
        }
        c.hold(topic("only-c"), true);
        c.hold(topic("shared"), true);
        b.hold(topic("shared"), true);
        settle(&mut c, &mut redis, t0);
        settle(&mut b, &mut redis, t0);
        // c dies: its live key expires.
        redis.live.remove("c");
        let later = t0 + LIVE_TTL;
        let decided = [
            settle(&mut a, &mut redis, later),
            settle(&mut b, &mut redis, later),
        ]
        .concat();
        assert_eq!(decided, [(false, topic("only-c"))]);
        b.hold(topic("shared"), false);
        settle(&mut b, &mut redis, later);
        assert_eq!(
            settle(&mut b, &mut redis, later + DELAY),
            [(false, topic("shared"))]
        );
    }

    #[test]
    fn a_node_back_from_an_outage_sweeps_no_one_before_redis_answered_it_for_a_ttl() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let (mut a, mut c) = (arbiter("a", t0), arbiter("c", t0));
        c.hold(topic("x"), true);
        settle(&mut c, &mut redis, t0);
        settle(&mut a, &mut redis, t0);
        // An outage longer than the TTL: c's key expires, a's batch fails.
        redis.live.remove("c");
        let back = t0 + LIVE_TTL + Duration::from_secs(1);
        let (id, _) = a.next_batch(back).unwrap();
        a.answered(id, None, back);
        let retry = back + FIRST_BACKOFF;
        assert_eq!(settle(&mut a, &mut redis, retry), [], "not trusted yet");
        // c comes back within a's TTL of answers: it was never dead.
        settle(&mut c, &mut redis, retry + LIVE_TTL / 3);
        assert_eq!(settle(&mut a, &mut redis, retry + LIVE_TTL), []);
        assert!(redis.names[&topic("x")].holders.contains("c"));
    }

    #[test]
    fn changes_coalesce_while_redis_is_down() {
        let t0 = Instant::now();
        let mut a = arbiter("a", t0);
        let (id, _) = a.next_batch(t0).unwrap();
        a.answered(id, None, t0);
        for _ in 0..100 {
            a.hold(topic("x"), true);
            a.hold(topic("x"), false);
        }
        a.hold(topic("y"), true);
        assert_eq!(a.waiting(), 1 + 2, "the heartbeat, and two names");
        let mut redis = FakeRedis::default();
        assert_eq!(
            settle(&mut a, &mut redis, t0 + FIRST_BACKOFF),
            [(true, topic("y"))]
        );
    }

    #[test]
    fn a_stopping_node_checks_at_once_and_says_goodbye() {
        let t0 = Instant::now();
        let mut redis = FakeRedis::default();
        let mut a = arbiter("a", t0);
        a.hold(topic("x"), true);
        settle(&mut a, &mut redis, t0);
        a.hold(topic("x"), false);
        a.flush();
        assert_eq!(settle(&mut a, &mut redis, t0), [(false, topic("x"))]);
        assert!(a.idle());
        assert!(!redis.nodes.contains("a"), "gone without being swept");
    }

    /// A small seeded generator (xorshift64*), so a failing seed replays.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// Nodes hold and release four topics at random while Redis loses
    /// answers (before or after running the batch) and nodes die (between
    /// batches) and new ones start. Each topic's reported events, in the
    /// order of Redis's clock, alternate occupied, vacated, occupied...
    /// across all nodes (none lost, none twice), and once everything is
    /// released and the dead are swept, each ends vacated.
    fn run_cluster(seed: u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let t0 = Instant::now();
        let mut now = t0;
        let mut redis = FakeRedis::default();
        let mut nodes: Vec<Arbiter> = (0..3).map(|i| arbiter(&format!("n{i}"), t0)).collect();
        let mut started = 3;
        let topics: Vec<Key> = (0..4).map(|i| topic(&format!("t{i}"))).collect();
        let mut reported: HashMap<Key, Vec<(u64, bool)>> = HashMap::new();
        let mut record = |decisions: Vec<Decision>| {
            for decision in decisions {
                let (key, at, occupied) = match decision {
                    Decision::Occupied(key, at) => (key, at, true),
                    Decision::Vacated(key, at) => (key, at, false),
                };
                if std::env::var_os("ARBITER_TRACE").is_some() {
                    eprintln!("  decided {key:?} {occupied} at {at}");
                }
                reported.entry(key).or_default().push((at, occupied));
            }
        };
        let step = |node: &mut Arbiter, redis: &mut FakeRedis, now: Instant, fate: u64| {
            let Some((id, commands)) = node.next_batch(now) else {
                return;
            };
            let name = node.node().to_string();
            if std::env::var_os("ARBITER_TRACE").is_some() {
                eprintln!("{name} fate {fate}: {commands:?}");
            }
            match fate {
                // Lost on the way: Redis ran nothing.
                0 => node.answered(id, None, now),
                // Ran, and the answer was lost (a timeout).
                1 => {
                    for c in &commands {
                        redis.run(&name, c);
                    }
                    node.answered(id, None, now);
                }
                _ => {
                    let answers = commands.iter().map(|c| redis.run(&name, c)).collect();
                    node.answered(id, Some(answers), now);
                }
            }
        };
        for _ in 0..400 {
            let i = rng.below(nodes.len() as u64) as usize;
            match rng.below(100) {
                0..=39 => {
                    let key = topics[rng.below(4) as usize].clone();
                    let on = !nodes[i].held.contains(&key);
                    if std::env::var_os("ARBITER_TRACE").is_some() {
                        eprintln!("{} holds {key:?}: {on}", nodes[i].node());
                    }
                    nodes[i].hold(key, on);
                }
                40..=79 => {
                    let fate = rng.below(10);
                    step(&mut nodes[i], &mut redis, now, fate);
                    record(nodes[i].take_decided());
                }
                80..=95 => now += Duration::from_millis(rng.below(1500)),
                _ if nodes[i].in_flight.is_none() && nodes.len() > 1 => {
                    // Dies without a goodbye: its live key expires.
                    let dead = nodes.swap_remove(i);
                    if std::env::var_os("ARBITER_TRACE").is_some() {
                        eprintln!("{} dies", dead.node());
                    }
                    redis.live.remove(dead.node());
                    if rng.below(2) == 0 {
                        nodes.push(arbiter(&format!("n{started}"), now));
                        started += 1;
                    }
                }
                _ => {}
            }
        }
        // Everything released, Redis answering: past every delay and
        // heartbeat, every topic ends vacated.
        for node in &mut nodes {
            let held: Vec<Key> = node.held.iter().cloned().collect();
            for key in held {
                node.hold(key, false);
            }
        }
        for _ in 0..8 {
            now += LIVE_TTL / 3 + Duration::from_secs(1);
            for node in &mut nodes {
                while node.next_deadline().is_some_and(|at| at <= now) || node.waiting() > 0 {
                    let before = node.waiting();
                    step(node, &mut redis, now, 9);
                    record(node.take_decided());
                    if node.waiting() == before && node.in_flight.is_none() {
                        break;
                    }
                }
            }
        }
        for (key, events) in &mut reported {
            events.sort_unstable();
            let alternate = events.iter().enumerate().all(|(i, e)| e.1 == (i % 2 == 0));
            assert!(alternate, "seed {seed}: {key:?} {events:?}");
            assert_eq!(
                events.last().map(|e| e.1),
                Some(false),
                "seed {seed}: {key:?}"
            );
        }
        for (key, name) in &redis.names {
            assert!(name.holders.is_empty(), "seed {seed}: {key:?} still held");
        }
    }

    #[test]
    fn each_topic_is_occupied_and_vacated_in_turn_across_failures_and_deaths() {
        if let Ok(seed) = std::env::var("ARBITER_SEED") {
            return run_cluster(seed.parse().unwrap());
        }
        let seeds = std::env::var("ARBITER_SEEDS").map_or(500, |s| s.parse().unwrap());
        for seed in 0..seeds {
            run_cluster(seed);
        }
    }

    #[test]
    fn entries_name_their_keys_both_ways() {
        let member = (Subject::Member, Arc::from("ro:om"), Some(Arc::from("a:nn")));
        for key in [topic("a:b"), (Subject::User, Arc::from("u"), None), member] {
            assert_eq!(parse_entry(&entry(&key)), Some(key));
        }
        for bad in ["", "x", "m:99:ab", "m:x:ab", "z:1", "m:1"] {
            assert_eq!(parse_entry(bad), None, "{bad}");
        }
    }
}
