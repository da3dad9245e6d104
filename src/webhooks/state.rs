//! The webhook thread's decisions, without I/O: notices and ticks in, POSTs
//! out. It sums the shards' transitions per name (a topic is occupied
//! while any shard holds it), delays the vacated and offline events so a
//! name that comes back in time produces neither, and hands each event to
//! the destination it is for (`destination.rs`: ringcast's `[webhooks]`,
//! or a Pusher app's), whose queue sends it in order (`outbox.rs`).
//!
//! With `[cluster]`, the node's transitions go to an [`Arbiter`] instead,
//! which asks Redis whether each is the cluster's (`arbiter.rs`); the
//! events it decides are queued here like a single node's.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::WebhookConfig;

use super::arbiter::{Answer, Arbiter, Command, Decision};
use super::destination::Destination;
#[cfg(test)]
use super::destination::Format;
use super::{ClientEvent, Notice, Subject};

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// POST `body` to destination `to` (signed by the driver); answer
    /// with [`WebhookState::posted`], `to` and this `id`.
    Post { to: usize, id: u64, body: Bytes },
    /// Run `commands` in Redis, in order; answer with
    /// [`WebhookState::redis_answered`] and this `id`.
    Redis { id: u64, commands: Vec<Command> },
}

/// Where a name stands across the node's shards.
#[derive(Debug, Default)]
struct Holding {
    /// Shards holding it now.
    shards: usize,
    /// Its occupied transition was reported (or, for a user, happened), so
    /// a vacated/offline event is owed once it has no holder long enough.
    announced: bool,
    /// Bumped whenever a vacate is scheduled or cancelled: a scheduled one
    /// with an older generation is void.
    generation: u64,
}

/// What a transition is about: a topic, a user, or a user in a topic.
type Key = super::arbiter::Key;

const SUBJECTS: [Subject; 3] = [Subject::Topic, Subject::User, Subject::Member];

/// The webhook thread's state.
#[derive(Debug)]
pub struct WebhookState {
    /// The delays (the destinations' own settings are in them).
    config: Arc<WebhookConfig>,
    destinations: Vec<Destination>,
    holding: HashMap<Key, Holding>,
    /// With `[cluster]`: where the node's transitions are decided.
    cluster: Option<Arbiter>,
    /// Names whose last holder left, by deadline (the delays are fixed per
    /// subject, so each subject's deadlines come in order).
    vacating: [VecDeque<(Instant, Key, u64)>; 3],
    ops: Vec<Op>,
    /// The wall clock at the latest input, for a batch's `time_ms`.
    unix_ms: u64,
}

impl WebhookState {
    /// The state for `destinations`, with `config`'s delays.
    pub fn new(config: Arc<WebhookConfig>, destinations: Vec<Destination>) -> WebhookState {
        WebhookState {
            config,
            destinations,
            holding: HashMap::new(),
            cluster: None,
            vacating: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            ops: Vec::new(),
            unix_ms: 0,
        }
    }

    /// The same for a node of a cluster: `arbiter` decides its transitions.
    pub fn clustered(
        config: Arc<WebhookConfig>,
        destinations: Vec<Destination>,
        arbiter: Arbiter,
    ) -> WebhookState {
        WebhookState {
            cluster: Some(arbiter),
            ..WebhookState::new(config, destinations)
        }
    }

    /// A shard's transition, at `now` (`unix_ms` on the wall clock).
    pub fn notice(&mut self, notice: Notice, now: Instant, unix_ms: u64) {
        let Notice {
            subject,
            name,
            user,
            on,
            ..
        } = notice;
        debug_assert_eq!(user.is_some(), subject == Subject::Member);
        self.unix_ms = unix_ms;
        let delay = self.delay(subject);
        let key = (subject, name, user);
        let holding = self.holding.entry(key.clone()).or_default();
        if let Some(arbiter) = &mut self.cluster {
            if on {
                holding.shards += 1;
                if holding.shards == 1 {
                    arbiter.hold(key, true);
                }
            } else {
                debug_assert!(holding.shards > 0, "a shard left {key:?} it never held");
                holding.shards = holding.shards.saturating_sub(1);
                if holding.shards == 0 {
                    self.holding.remove(&key);
                    arbiter.hold(key, false);
                }
            }
            self.pump(now);
            return;
        }
        if on {
            holding.shards += 1;
            if holding.shards > 1 {
                return;
            }
            // A pending vacate is void: the name came back in time.
            holding.generation += 1;
            if !holding.announced {
                holding.announced = true;
                match subject {
                    Subject::Topic => self.event("channel_occupied", &key, unix_ms),
                    Subject::Member => self.event("member_added", &key, unix_ms),
                    // Coming online is no event; going offline is.
                    Subject::User => {}
                }
            }
        } else {
            debug_assert!(holding.shards > 0, "a shard left {key:?} it never held");
            holding.shards = holding.shards.saturating_sub(1);
            if holding.shards > 0 {
                return;
            }
            holding.generation += 1;
            let generation = holding.generation;
            if delay.is_zero() {
                self.vacate(&key, generation, unix_ms);
            } else {
                self.vacating[subject as usize].push_back((now + delay, key, generation));
            }
        }
        self.pump(now);
    }

    /// A client's publication (over `/ws`, or a Pusher client event),
    /// reported as it is (`client_event`) to the destination it is for.
    pub fn client_event(&mut self, event: ClientEvent, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        let key: Key = (Subject::Topic, event.topic.clone(), None);
        let Some(destination) = self.destinations.iter_mut().find(|d| d.takes(&key)) else {
            return;
        };
        if destination.wants("client_event") {
            let encoded = destination.encode_client_event(&event, unix_ms);
            destination.outbox.queue(encoded);
            self.pump(now);
        }
    }

    /// A Pusher cache channel had nothing for a new subscriber
    /// (`cache_miss`), reported to its app.
    pub fn cache_miss(&mut self, topic: Arc<str>, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        self.event("cache_miss", &(Subject::Topic, topic, None), unix_ms);
        self.pump(now);
    }

    /// Time passed: vacates that are due happen, a backoff may end.
    pub fn tick(&mut self, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        for subject in SUBJECTS {
            while let Some((at, _, _)) = self.vacating[subject as usize].front() {
                if *at > now {
                    break;
                }
                let (_, key, generation) = self.vacating[subject as usize]
                    .pop_front()
                    .expect("a front");
                self.vacate(&key, generation, unix_ms);
            }
        }
        self.pump(now);
    }

    /// Redis answered the batch `id` (`None`: it failed).
    pub fn redis_answered(
        &mut self,
        id: u64,
        answers: Option<Vec<Answer>>,
        now: Instant,
        unix_ms: u64,
    ) {
        self.unix_ms = unix_ms;
        let Some(arbiter) = &mut self.cluster else {
            debug_assert!(false, "a Redis answer without a cluster");
            return;
        };
        arbiter.answered(id, answers, now);
        for decision in arbiter.take_decided() {
            // Stamped with Redis's clock: the cluster's one order.
            let (event, key, at) = match &decision {
                Decision::Occupied(key, at) => match key.0 {
                    Subject::Topic => ("channel_occupied", key, *at),
                    Subject::Member => ("member_added", key, *at),
                    Subject::User => continue,
                },
                Decision::Vacated(key, at) => (vacated_event(key.0), key, *at),
            };
            self.event(event, key, at);
        }
        self.pump(now);
    }

    /// The node is stopping: every name without holders is vacated now,
    /// whatever its delay, so the backend is not left believing it occupied.
    pub fn flush(&mut self, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        if let Some(arbiter) = &mut self.cluster {
            arbiter.flush();
        }
        for subject in SUBJECTS {
            while let Some((_, key, generation)) = self.vacating[subject as usize].pop_front() {
                self.vacate(&key, generation, unix_ms);
            }
        }
        for destination in &mut self.destinations {
            destination.outbox.end_backoff();
        }
        self.pump(now);
    }

    /// The POST `id` to destination `to` ended: delivered (`ok`) or to be
    /// retried after a backoff.
    pub fn posted(&mut self, to: usize, id: u64, ok: bool, now: Instant) {
        let Some(destination) = self.destinations.get_mut(to) else {
            debug_assert!(false, "an answer from no destination");
            return;
        };
        destination.outbox.posted(id, ok, now);
        self.pump(now);
    }

    /// What the driver must do now.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// When [`tick`](Self::tick) has something to do next, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let vacate = self.vacating.iter().filter_map(|q| q.front()).map(|v| v.0);
        let retries = self
            .destinations
            .iter()
            .filter_map(|d| d.outbox.retry_deadline());
        let redis = self.cluster.as_ref().and_then(Arbiter::next_deadline);
        vacate.chain(retries).chain(redis).min()
    }

    /// Bytes of events waiting (those in flight included), everywhere.
    pub fn queued_bytes(&self) -> usize {
        self.destinations
            .iter()
            .map(|d| d.outbox.queued_bytes())
            .sum()
    }

    /// Events queued, and dropped over a destination's byte bound.
    pub fn events_counts(&self) -> (u64, u64) {
        self.destinations
            .iter()
            .fold((0, 0), |(queued, dropped), d| {
                (
                    queued + d.outbox.events_total,
                    dropped + d.outbox.dropped_total,
                )
            })
    }

    /// Whether nothing waits to be sent or is being sent (with a cluster:
    /// and the arbiter said goodbye after a flush).
    pub fn idle(&self) -> bool {
        self.destinations.iter().all(|d| d.outbox.is_empty())
            && self.cluster.as_ref().map_or(true, Arbiter::idle)
    }

    /// Commands waiting for Redis, and Redis batches that failed.
    pub fn redis_counts(&self) -> (usize, u64) {
        self.cluster
            .as_ref()
            .map_or((0, 0), |a| (a.waiting(), a.failures_total))
    }

    fn delay(&self, subject: Subject) -> Duration {
        match subject {
            Subject::Topic | Subject::Member => self.config.vacated_delay,
            Subject::User => self.config.offline_delay,
        }
    }

    /// A scheduled vacate of `name`, unless it was voided since.
    fn vacate(&mut self, key: &Key, generation: u64, unix_ms: u64) {
        let Some(holding) = self.holding.get(key) else {
            return;
        };
        if holding.generation != generation || holding.shards > 0 {
            return;
        }
        let announced = holding.announced;
        self.holding.remove(key);
        if announced {
            self.event(vacated_event(key.0), key, unix_ms);
        }
    }

    /// Queues event `event` about `key` at the destination it is for, if
    /// that one wants it and it fits.
    fn event(&mut self, event: &str, key: &Key, unix_ms: u64) {
        let Some(destination) = self.destinations.iter_mut().find(|d| d.takes(key)) else {
            return;
        };
        if destination.wants(event) {
            let encoded = destination.encode(event, key, unix_ms);
            destination.outbox.queue(encoded);
        }
    }

    /// Starts the next Redis batch, and each destination's next POST if
    /// none is in flight there and no backoff runs.
    fn pump(&mut self, now: Instant) {
        if let Some((id, commands)) = self.cluster.as_mut().and_then(|a| a.next_batch(now)) {
            self.ops.push(Op::Redis { id, commands });
        }
        for (to, destination) in self.destinations.iter_mut().enumerate() {
            if let Some((id, body)) = destination.outbox.next_post(now, self.unix_ms) {
                self.ops.push(Op::Post { to, id, body });
            }
        }
    }
}

/// The event of `subject`'s last holder gone for its delay.
fn vacated_event(subject: Subject) -> &'static str {
    match subject {
        Subject::Topic => "channel_vacated",
        Subject::User => "user_offline",
        Subject::Member => "member_removed",
    }
}

#[cfg(test)]
mod tests {
    use super::super::outbox::FIRST_BACKOFF;
    use super::*;

    /// The state with ringcast's destination of `config` only.
    fn ringcast(config: Arc<WebhookConfig>) -> WebhookState {
        let destination = Destination::new(
            Format::Ringcast,
            config.events.clone(),
            config.max_queued_bytes,
            config.max_batch_events,
        );
        WebhookState::new(config, vec![destination])
    }

    fn config(vacated_ms: u64, offline_ms: u64) -> Arc<WebhookConfig> {
        Arc::new(WebhookConfig {
            url: "http://127.0.0.1:1/hook".into(),
            secret: "s".into(),
            events: crate::config::WEBHOOK_EVENTS
                .iter()
                .map(|e| e.to_string())
                .collect(),
            vacated_delay: Duration::from_millis(vacated_ms),
            offline_delay: Duration::from_millis(offline_ms),
            timeout: Duration::from_secs(1),
            max_queued_bytes: 64 * 1024,
            max_batch_events: 3,
        })
    }

    fn notice(shard: usize, subject: Subject, name: &str, on: bool) -> Notice {
        Notice {
            shard,
            subject,
            name: Arc::from(name),
            user: None,
            on,
        }
    }

    fn member(shard: usize, topic: &str, user: &str, on: bool) -> Notice {
        Notice {
            shard,
            subject: Subject::Member,
            name: Arc::from(topic),
            user: Some(Arc::from(user)),
            on,
        }
    }

    /// The events of every POST the state asked for, acknowledging each.
    fn delivered(state: &mut WebhookState, now: Instant) -> Vec<(String, String)> {
        let mut out = Vec::new();
        loop {
            let ops = state.take_ops();
            if ops.is_empty() {
                return out;
            }
            for op in ops {
                let Op::Post { to, id, body } = op else {
                    panic!("no Redis without a cluster");
                };
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                for event in body["events"].as_array().unwrap() {
                    let name = match (event["topic"].as_str(), event["user"].as_str()) {
                        (Some(topic), Some(user)) => format!("{topic}/{user}"),
                        (Some(name), None) | (None, Some(name)) => name.to_string(),
                        (None, None) => panic!("an event about nothing: {event}"),
                    };
                    out.push((event["name"].as_str().unwrap().to_string(), name));
                }
                state.posted(to, id, true, now);
            }
        }
    }

    fn pair(event: &str, name: &str) -> (String, String) {
        (event.to_string(), name.to_string())
    }

    #[test]
    fn a_topic_held_by_two_shards_is_occupied_and_vacated_once() {
        let mut state = ringcast(config(0, 0));
        let t0 = Instant::now();
        state.notice(notice(0, Subject::Topic, "news", true), t0, 1);
        state.notice(notice(1, Subject::Topic, "news", true), t0, 2);
        state.notice(notice(0, Subject::Topic, "news", false), t0, 3);
        assert_eq!(
            delivered(&mut state, t0),
            [pair("channel_occupied", "news")]
        );
        state.notice(notice(1, Subject::Topic, "news", false), t0, 4);
        assert_eq!(delivered(&mut state, t0), [pair("channel_vacated", "news")]);
        assert!(state.holding.is_empty(), "nothing outlives the transitions");
    }

    #[test]
    fn a_subscriber_back_within_the_delay_cancels_the_vacated_event() {
        let mut state = ringcast(config(1000, 5000));
        let t0 = Instant::now();
        state.notice(notice(0, Subject::Topic, "room", true), t0, 1);
        state.notice(notice(0, Subject::User, "ann", true), t0, 1);
        assert_eq!(
            delivered(&mut state, t0),
            [pair("channel_occupied", "room")],
            "a user coming online is no event"
        );
        state.notice(notice(0, Subject::Topic, "room", false), t0, 2);
        state.notice(notice(0, Subject::User, "ann", false), t0, 2);
        let back = t0 + Duration::from_millis(500);
        state.notice(notice(1, Subject::Topic, "room", true), back, 3);
        state.tick(t0 + Duration::from_millis(1500), 4);
        assert_eq!(delivered(&mut state, back), [], "back in time: no events");
        assert_eq!(
            state.next_deadline(),
            Some(t0 + Duration::from_millis(5000)),
            "the user's offline delay runs on"
        );
        state.tick(t0 + Duration::from_millis(5000), 5);
        assert_eq!(delivered(&mut state, back), [pair("user_offline", "ann")]);
        state.notice(notice(1, Subject::Topic, "room", false), back, 6);
        state.tick(back + Duration::from_millis(999), 7);
        assert_eq!(delivered(&mut state, back), []);
        state.tick(back + Duration::from_millis(1000), 8);
        assert_eq!(
            delivered(&mut state, back),
            [pair("channel_vacated", "room")]
        );
    }

    #[test]
    fn a_failed_post_is_retried_with_backoff_and_events_keep_their_order() {
        let mut state = ringcast(config(0, 0));
        let t0 = Instant::now();
        for topic in ["a", "b", "c", "d"] {
            state.notice(notice(0, Subject::Topic, topic, true), t0, 1);
        }
        let [Op::Post { to, id, body }] = &state.take_ops()[..] else {
            panic!("one POST at a time");
        };
        assert!(std::str::from_utf8(body).unwrap().contains("\"a\""));
        state.posted(*to, *id, false, t0);
        assert!(state.take_ops().is_empty(), "no retry before the backoff");
        assert_eq!(state.next_deadline(), Some(t0 + FIRST_BACKOFF));
        state.tick(t0 + FIRST_BACKOFF, 2);
        let occupied: Vec<_> = delivered(&mut state, t0 + FIRST_BACKOFF)
            .into_iter()
            .map(|(_, topic)| topic)
            .collect();
        assert_eq!(occupied, ["a", "b", "c", "d"], "in order, in batches of 3");
        assert_eq!(state.queued_bytes(), 0);
        assert!(state.idle());
    }

    #[test]
    fn a_user_is_a_member_once_whatever_its_connections_and_shards() {
        let mut state = ringcast(config(1000, 0));
        let t0 = Instant::now();
        state.notice(member(0, "room", "ann", true), t0, 1);
        state.notice(member(1, "room", "ann", true), t0, 1);
        state.notice(member(1, "room", "bob", true), t0, 1);
        state.notice(member(0, "room", "ann", false), t0, 2);
        assert_eq!(
            delivered(&mut state, t0),
            [
                pair("member_added", "room/ann"),
                pair("member_added", "room/bob")
            ]
        );
        state.notice(member(1, "room", "ann", false), t0, 3);
        state.notice(member(1, "room", "bob", false), t0, 3);
        let later = t0 + Duration::from_millis(400);
        state.notice(member(0, "room", "bob", true), later, 4);
        state.tick(t0 + Duration::from_millis(1000), 5);
        assert_eq!(
            delivered(&mut state, later),
            [pair("member_removed", "room/ann")],
            "bob came back within the delay"
        );
    }

    #[test]
    fn past_the_byte_bound_events_are_dropped_and_counted() {
        let mut config = (*config(0, 0)).clone();
        config.max_queued_bytes = 200;
        let mut state = ringcast(Arc::new(config));
        let t0 = Instant::now();
        for i in 0..10 {
            state.notice(notice(0, Subject::Topic, &format!("t{i}"), true), t0, 1);
        }
        assert!(state.queued_bytes() <= 200);
        let (queued, dropped) = state.events_counts();
        assert!(dropped > 0);
        assert_eq!(queued + dropped, 10);
    }

    #[test]
    fn stopping_vacates_at_once_what_waits_for_its_delay() {
        let mut state = ringcast(config(60_000, 60_000));
        let t0 = Instant::now();
        state.notice(notice(0, Subject::Topic, "x", true), t0, 1);
        state.notice(notice(0, Subject::User, "u", true), t0, 1);
        delivered(&mut state, t0);
        state.notice(notice(0, Subject::Topic, "x", false), t0, 2);
        state.notice(notice(0, Subject::User, "u", false), t0, 2);
        state.flush(t0, 3);
        assert_eq!(
            delivered(&mut state, t0),
            [pair("channel_vacated", "x"), pair("user_offline", "u")]
        );
    }
}
