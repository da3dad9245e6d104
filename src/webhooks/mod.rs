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
pub mod destination;
mod driver;
mod outbox;
pub mod signature;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::Handoff;
use crate::config::{Config, WebhookConfig};

pub use destination::{Destination, Format};

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

/// A client's publication (over `/ws`, or a Pusher client event), for
/// `client_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEvent {
    pub topic: Arc<str>,
    pub event: Box<str>,
    /// The publisher's user id, if it has one.
    pub user: Option<Arc<str>>,
    /// The payload as published (raw JSON).
    pub payload: Box<str>,
    /// A Pusher client's socket id.
    pub socket_id: Option<Box<str>>,
}

/// Where the webhook thread sends events, and how: one per destination,
/// in the order of the state's destinations.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub format: Format,
    pub events: Vec<String>,
    pub signer: Signer,
}

/// How a destination's POSTs are signed.
#[derive(Clone)]
pub enum Signer {
    /// `X-Ringcast-Signature` with `[webhooks] secret`.
    Ringcast { secret: String },
    /// `X-Pusher-Key` and `X-Pusher-Signature` (the app's secret), as
    /// Pusher's server libraries check them.
    Pusher { key: String, secret: String },
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Ringcast { .. } => f.write_str("Ringcast"),
            Signer::Pusher { key, .. } => write!(f, "Pusher({key})"),
        }
    }
}

/// What the webhook thread serves: its delays and bounds, and the
/// destinations (ringcast's `[webhooks]`, then each app with a
/// `webhook_url`); `None` when nobody wants a webhook.
#[derive(Debug, Clone)]
pub struct Plan {
    pub settings: Arc<WebhookConfig>,
    pub targets: Vec<Target>,
}

impl Plan {
    pub fn of(config: &Config) -> Option<Plan> {
        let mut targets = Vec::new();
        if let Some(webhooks) = &config.webhooks {
            targets.push(Target {
                url: webhooks.url.clone(),
                format: Format::Ringcast,
                events: webhooks.events.clone(),
                signer: Signer::Ringcast {
                    secret: webhooks.secret.clone(),
                },
            });
        }
        for app in &config.apps {
            let Some(url) = &app.webhook_url else {
                continue;
            };
            targets.push(Target {
                url: url.clone(),
                format: Format::Pusher {
                    prefix: crate::pusher::wire::topic_prefix(&app.id),
                },
                events: app.webhook_events.clone(),
                signer: Signer::Pusher {
                    key: app.key.clone(),
                    secret: app.secret.clone(),
                },
            });
        }
        if targets.is_empty() {
            return None;
        }
        // An app's webhooks keep ringcast's delays and bounds, or their
        // defaults without `[webhooks]`.
        let settings = config
            .webhooks
            .clone()
            .unwrap_or_else(WebhookConfig::defaults);
        Some(Plan {
            settings: Arc::new(settings),
            targets,
        })
    }

    /// The state's destinations, in the targets' order.
    pub fn destinations(&self) -> Vec<Destination> {
        self.targets
            .iter()
            .map(|t| {
                Destination::new(
                    t.format.clone(),
                    t.events.clone(),
                    self.settings.max_queued_bytes,
                    self.settings.max_batch_events,
                )
            })
            .collect()
    }

    /// Whether some destination wants `event`.
    fn wants(&self, event: &str) -> bool {
        self.targets
            .iter()
            .any(|t| t.events.iter().any(|e| e == event))
    }
}

/// What a shard hands the webhook thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Transition(Notice),
    ClientEvent(ClientEvent),
    /// A Pusher cache channel (this topic) had nothing for a subscriber.
    CacheMiss(Arc<str>),
}

/// The shards' side: where reports go, and the counters `/metrics` shows.
#[derive(Debug)]
pub struct WebhookSink {
    /// What the webhook thread serves, as the sink was made for it.
    pub plan: Plan,
    reports: Handoff<Report>,
    topics: bool,
    users: bool,
    members: bool,
    client_events: bool,
    cache_misses: bool,
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
    pub fn new(plan: Plan) -> WebhookSink {
        WebhookSink {
            reports: Handoff::default(),
            topics: plan.wants("channel_occupied") || plan.wants("channel_vacated"),
            users: plan.wants("user_offline"),
            members: plan.wants("member_added") || plan.wants("member_removed"),
            client_events: plan.wants("client_event"),
            cache_misses: plan.wants("cache_miss"),
            stats: WebhookStats::default(),
            plan,
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

    /// Whether Pusher cache misses are reported (`cache_miss`).
    pub fn wants_cache_misses(&self) -> bool {
        self.cache_misses
    }

    /// Hands a cache miss of `topic` to the webhook thread (queued within
    /// `max_queued_bytes`, like a client event).
    pub fn cache_miss(&self, topic: Arc<str>) {
        debug_assert!(self.cache_misses, "a cache miss nobody asked for");
        self.reports.send(Report::CacheMiss(topic));
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
