//! Webhooks: the node tells the application backend when a topic gains its
//! first subscriber (`channel_occupied`), when it has had none for
//! `vacated_delay` (`channel_vacated`), when a user becomes a presence
//! member of a topic (`member_added`, the user's first tracked subscription
//! there) and has not been one for `vacated_delay` (`member_removed`), and
//! when a user has had no connection for `offline_delay` (`user_offline`).
//!
//! A shard only reports its own transitions (its first local holder of a
//! topic or user came, its last one left) as [`Notice`]s to the webhook
//! thread, which never blocks it. The thread sums them across shards in a
//! sans-IO [`WebhookState`](state::WebhookState), so a transition of the
//! whole node is reported once however many shards hold the name, and
//! POSTs batches of events signed with HMAC-SHA256 (`signature.rs`),
//! retrying with backoff from a queue bounded in bytes (`driver.rs`).
//!
//! With `[cluster]`, which node reports a transition is decided in Redis
//! (`arbiter.rs`, `cluster.rs`): one `channel_occupied` and one
//! `channel_vacated` per transition for the whole cluster, one
//! `user_offline` when a user's last connection anywhere closed, and the
//! vacated events of a node that died within `presence_ttl` of its death.

pub mod arbiter;
mod cluster;
mod driver;
pub mod signature;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::Handoff;
use crate::config::WebhookConfig;

pub use driver::spawn;

/// What a transition is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Topic,
    User,
    /// A user as a presence member of a topic.
    Member,
}

/// One shard's transition: it gained its first (`on`) or lost its last
/// local holder of `name`. A shard's notices arrive in the order it sent
/// them, so on and off alternate per shard and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub shard: usize,
    pub subject: Subject,
    /// The topic, or the user for [`Subject::User`].
    pub name: Arc<str>,
    /// For [`Subject::Member`]: the user.
    pub user: Option<Arc<str>>,
    pub on: bool,
}

/// A client's publication (over `/ws`), for `client_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEvent {
    pub topic: Arc<str>,
    pub event: Box<str>,
    /// The publisher's user id, if it has one.
    pub user: Option<Arc<str>>,
    /// The payload as published (raw JSON).
    pub payload: Box<str>,
}

/// What a shard hands the webhook thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Transition(Notice),
    ClientEvent(ClientEvent),
}

/// The shards' side: where reports go, and the counters `/metrics` shows.
#[derive(Debug)]
pub struct WebhookSink {
    reports: Handoff<Report>,
    topics: bool,
    users: bool,
    members: bool,
    client_events: bool,
    pub stats: WebhookStats,
}

/// Counters of the webhook thread.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub events_total: AtomicU64,
    pub dropped_total: AtomicU64,
    pub posts_total: AtomicU64,
    pub post_failures_total: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub redis_waiting: AtomicU64,
    pub redis_failures_total: AtomicU64,
}

impl WebhookSink {
    pub fn new(config: &WebhookConfig) -> WebhookSink {
        WebhookSink {
            reports: Handoff::default(),
            topics: config.wants("channel_occupied") || config.wants("channel_vacated"),
            users: config.wants("user_offline"),
            members: config.wants("member_added") || config.wants("member_removed"),
            client_events: config.wants("client_event"),
            stats: WebhookStats::default(),
        }
    }

    /// Whether transitions of `subject` are reported at all.
    pub fn wants(&self, subject: Subject) -> bool {
        match subject {
            Subject::Topic => self.topics,
            Subject::User => self.users,
            Subject::Member => self.members,
        }
    }

    /// Hands `notice` to the webhook thread without waiting. A notice is a
    /// few dozen bytes per subscribe or unsubscribe that changed a shard's
    /// holders, and the thread only counts it; nothing but that thread
    /// having stopped (a node shutting down) loses one.
    pub fn notify(&self, notice: Notice) {
        debug_assert!(self.wants(notice.subject), "a notice nobody asked for");
        self.reports.send(Report::Transition(notice));
    }

    /// Whether client publications are reported (`client_event`).
    pub fn wants_client_events(&self) -> bool {
        self.client_events
    }

    /// Hands a client's publication to the webhook thread. It only queues
    /// it (within `max_queued_bytes`, past which it is dropped and
    /// counted), so the channel drains as fast as shards fill it.
    pub fn client_event(&self, event: ClientEvent) {
        debug_assert!(self.client_events, "a client event nobody asked for");
        self.reports.send(Report::ClientEvent(event));
    }

    /// Appends the webhook metrics in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = &self.stats;
        let metrics = [
            (
                "webhook_events_total",
                "counter",
                "Webhook events made (queued for the backend).",
                s.events_total.load(Ordering::Relaxed),
            ),
            (
                "webhook_events_dropped_total",
                "counter",
                "Webhook events dropped because webhooks.max_queued_bytes were waiting for the backend.",
                s.dropped_total.load(Ordering::Relaxed),
            ),
            (
                "webhook_posts_total",
                "counter",
                "Webhook batches the backend accepted (2xx).",
                s.posts_total.load(Ordering::Relaxed),
            ),
            (
                "webhook_post_failures_total",
                "counter",
                "Webhook POSTs that failed (an error, a timeout or a non-2xx status) and were retried.",
                s.post_failures_total.load(Ordering::Relaxed),
            ),
            (
                "webhook_queued_bytes",
                "gauge",
                "Bytes of webhook events waiting for the backend (bounded by webhooks.max_queued_bytes).",
                s.queued_bytes.load(Ordering::Relaxed),
            ),
            (
                "webhook_redis_waiting",
                "gauge",
                "With [cluster]: webhook commands waiting for Redis (changes coalesce per name, so at most a few per name the node holds).",
                s.redis_waiting.load(Ordering::Relaxed),
            ),
            (
                "webhook_redis_failures_total",
                "counter",
                "With [cluster]: webhook batches Redis failed or did not answer in time (each sent again).",
                s.redis_failures_total.load(Ordering::Relaxed),
            ),
        ];
        crate::metrics::write_node_metrics(out, &metrics);
    }
}
