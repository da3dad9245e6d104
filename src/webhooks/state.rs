//! The webhook thread's decisions, without I/O: notices and ticks in, POSTs
//! out. It sums the shards' transitions per name (a topic is occupied
//! while any shard holds it), delays the vacated and offline events so a
//! name that comes back in time produces neither, queues the events within
//! a byte bound, and sends them in batches, one POST at a time (so the
//! backend sees them in order), retrying a failed one with backoff.
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
use super::{ClientEvent, Notice, Subject};

/// The first wait after a failed POST; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// POST `body` (signed by the driver); answer with
    /// [`WebhookState::posted`] and this `id`.
    Post { id: u64, body: Bytes },
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
    config: Arc<WebhookConfig>,
    holding: HashMap<Key, Holding>,
    /// With `[cluster]`: where the node's transitions are decided.
    cluster: Option<Arbiter>,
    /// Names whose last holder left, by deadline (the delays are fixed per
    /// subject, so each subject's deadlines come in order).
    vacating: [VecDeque<(Instant, Key, u64)>; 3],
    /// Encoded events waiting, oldest first; the first `in_flight` of them
    /// are being posted.
    queue: VecDeque<String>,
    queued_bytes: usize,
    in_flight: Option<(u64, usize)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    next_post: u64,
    ops: Vec<Op>,
    /// The wall clock at the latest input, for a batch's `time_ms`.
    unix_ms: u64,
    /// Events queued, and dropped over the byte bound.
    pub events_total: u64,
    pub dropped_total: u64,
}

impl WebhookState {
    pub fn new(config: Arc<WebhookConfig>) -> WebhookState {
        WebhookState {
            config,
            holding: HashMap::new(),
            cluster: None,
            vacating: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            next_post: 0,
            ops: Vec::new(),
            unix_ms: 0,
            events_total: 0,
            dropped_total: 0,
        }
    }

    /// The same for a node of a cluster: `arbiter` decides its transitions.
    pub fn clustered(config: Arc<WebhookConfig>, arbiter: Arbiter) -> WebhookState {
        WebhookState {
            cluster: Some(arbiter),
            ..WebhookState::new(config)
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

    /// A client's publication, reported as it is (`client_event`).
    pub fn client_event(&mut self, event: ClientEvent, now: Instant, unix_ms: u64) {
        self.unix_ms = unix_ms;
        if !self.config.wants("client_event") {
            return;
        }
        let text = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let user = event.user.as_deref().map_or("null".to_string(), text);
        // The payload is raw JSON the client sent, parsed on its way in.
        let encoded = format!(
            "{{\"name\":\"client_event\",\"topic\":{},\"event\":{},\"user\":{user},\"payload\":{},\"time_ms\":{unix_ms}}}",
            text(&event.topic),
            text(&event.event),
            event.payload
        );
        self.queue_event(encoded);
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
        self.retry_at = None;
        self.pump(now);
    }

    /// The POST `id` ended: delivered (`ok`) or to be retried after a backoff.
    pub fn posted(&mut self, id: u64, ok: bool, now: Instant) {
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
        self.pump(now);
    }

    /// What the driver must do now.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// When [`tick`](Self::tick) has something to do next, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let vacate = self.vacating.iter().filter_map(|q| q.front()).map(|v| v.0);
        let retry = self.retry_at.filter(|_| self.in_flight.is_none());
        let redis = self.cluster.as_ref().and_then(Arbiter::next_deadline);
        vacate.chain(retry).chain(redis).min()
    }

    /// Bytes of events waiting (the one in flight included).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Whether nothing waits to be sent or is being sent (with a cluster:
    /// and the arbiter said goodbye after a flush).
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.cluster.as_ref().map_or(true, Arbiter::idle)
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

    /// Queues event `event` about `key` if it is wanted and fits.
    fn event(&mut self, event: &str, key: &Key, unix_ms: u64) {
        if !self.config.wants(event) {
            return;
        }
        let (subject, name, user) = (key.0, &*key.1, key.2.as_deref());
        let encoded = match subject {
            Subject::Topic => {
                serde_json::json!({"name": event, "topic": name, "time_ms": unix_ms})
            }
            Subject::User => serde_json::json!({"name": event, "user": name, "time_ms": unix_ms}),
            Subject::Member => serde_json::json!({
                "name": event, "topic": name, "user": user, "time_ms": unix_ms
            }),
        }
        .to_string();
        self.queue_event(encoded);
    }

    /// Queues an encoded event within `max_queued_bytes`, else drops it.
    fn queue_event(&mut self, encoded: String) {
        if self.queued_bytes + encoded.len() > self.config.max_queued_bytes {
            self.dropped_total += 1;
            return;
        }
        self.events_total += 1;
        self.queued_bytes += encoded.len();
        self.queue.push_back(encoded);
    }

    /// Starts the next Redis batch and the next POST, if none is in
    /// flight and no backoff runs.
    fn pump(&mut self, now: Instant) {
        if let Some((id, commands)) = self.cluster.as_mut().and_then(|a| a.next_batch(now)) {
            self.ops.push(Op::Redis { id, commands });
        }
        if self.in_flight.is_some() || self.queue.is_empty() {
            return;
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.retry_at = None;
        let count = self.queue.len().min(self.config.max_batch_events);
        debug_assert!(count > 0);
        let mut body = String::with_capacity(64 + self.queued_bytes.min(1 << 20));
        body.push_str("{\"time_ms\":");
        body.push_str(&self.unix_ms.to_string());
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
        self.ops.push(Op::Post {
            id: self.next_post,
            body: Bytes::from(body),
        });
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
    use super::*;

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
                let Op::Post { id, body } = op else {
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
                state.posted(id, true, now);
            }
        }
    }

    fn pair(event: &str, name: &str) -> (String, String) {
        (event.to_string(), name.to_string())
    }

    #[test]
    fn a_topic_held_by_two_shards_is_occupied_and_vacated_once() {
        let mut state = WebhookState::new(config(0, 0));
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
        let mut state = WebhookState::new(config(1000, 5000));
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
        let mut state = WebhookState::new(config(0, 0));
        let t0 = Instant::now();
        for topic in ["a", "b", "c", "d"] {
            state.notice(notice(0, Subject::Topic, topic, true), t0, 1);
        }
        let [Op::Post { id, body }] = &state.take_ops()[..] else {
            panic!("one POST at a time");
        };
        assert!(std::str::from_utf8(body).unwrap().contains("\"a\""));
        state.posted(*id, false, t0);
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
        let mut state = WebhookState::new(config(1000, 0));
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
        let mut state = WebhookState::new(Arc::new(config));
        let t0 = Instant::now();
        for i in 0..10 {
            state.notice(notice(0, Subject::Topic, &format!("t{i}"), true), t0, 1);
        }
        assert!(state.queued_bytes() <= 200);
        assert!(state.dropped_total > 0);
        assert_eq!(state.events_total + state.dropped_total, 10);
    }

    #[test]
    fn stopping_vacates_at_once_what_waits_for_its_delay() {
        let mut state = WebhookState::new(config(60_000, 60_000));
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
