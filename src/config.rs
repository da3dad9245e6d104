//! Configuration: the TOML file and CLI flags, parsed once into typed values.
//!
//! Everything the relay bounds is a field of [`Limits`]; the shard code reads
//! these values and never re-parses anything. Unknown keys are rejected so a
//! typo in a limit cannot silently leave the default in place. `[auth]` holds
//! secrets: [`AuthConfig`]'s `Debug` never prints them.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Auth;
use crate::protocol::message::Bounds;
use crate::protocol::origin::AllowedOrigins;
use crate::rules::{History, Pattern, Rule, RuleSet};

/// Shards are addressed by bit in a `u64` interest mask; one more bit is the
/// cluster broker's.
pub const MAX_SHARDS: usize = 63;

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read; check the path and permissions.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types; the message names the key.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// What the TOML parser said, including the offending key.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Limits that bound every resource a peer can make the relay spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message (after reassembling fragments) and frame. Default 64 KiB;
    /// larger messages close the connection with 1009.
    pub max_message_bytes: usize,
    /// Topics one connection may hold at once. Default 50; more is answered with an `error`.
    pub max_subscriptions_per_connection: usize,
    /// Bytes queued for one connection that the kernel has not taken yet. Default 1 MiB;
    /// past it the connection is a slow consumer and is closed with 1013.
    pub max_outbound_bytes_per_connection: usize,
    /// Bytes queued on all of one shard's connections together (a frame
    /// shared by many subscribers counts once per subscriber). Default 512
    /// MiB; past it, a connection that is behind (has bytes queued) is
    /// closed as a slow consumer when it is sent more, while one that keeps
    /// up always gets its next frame.
    pub max_outbound_bytes_per_shard: usize,
    /// Bytes of partial input one shard holds for its connections together
    /// (requests and messages not complete yet). Default 64 MiB; past it,
    /// the connections that have held partial input longest are closed
    /// (408, or close 1008 on a WebSocket).
    pub max_inbound_bytes_per_shard: usize,
    /// HTTP request head (request line and headers). Default 16 KiB; more gets 431.
    pub max_http_header_bytes: usize,
    /// HTTP request body. Default 1 MiB; more gets 413.
    pub max_http_body_bytes: usize,
    /// Length of a topic name in bytes. Default 256.
    pub max_topic_bytes: usize,
    /// Length of a user id (query, token, registration, publish) or an
    /// event name in bytes. Default 256; longer is refused with 400 (or an
    /// `error` on a WebSocket).
    pub max_name_bytes: usize,
    /// Length of a connection's presence meta (a JSON object a channel
    /// hook attaches) in bytes. Default 1 KiB; a hook's longer meta is
    /// not tracked and the subscriber gets an `error`.
    pub max_presence_meta_bytes: usize,
    /// Live connections across all shards. Default 1,000,000; past it new connections get 503.
    pub max_connections: usize,
    /// Distinct topics with subscribers, per shard. Default 1,000,000.
    pub max_topics_per_shard: usize,
    /// Client registrations kept in memory (each shard holds all of them).
    /// Default 100,000; past it `POST /register` gets 503.
    pub max_registrations: usize,
    /// Bytes the registrations hold together (ids, user ids, topics and
    /// their table entries). Default 64 MiB; past it `POST /register` gets
    /// 503.
    pub max_registration_bytes: usize,
    /// Bytes of stream history one shard keeps for the topics it is home
    /// to, across all of them. Default 64 MiB; past it the oldest
    /// publications are evicted first, whatever their topic.
    pub max_history_bytes: usize,
    /// Streams one shard keeps as their home (each holds an epoch, an
    /// offset and its history). Default 100,000 (about 1 KB each with a
    /// short name and one small publication: 100 MB); past it a publish
    /// that would start a new stream gets 503 and a subscribe to one an
    /// `error`. Streams exist only while they have history or a subscriber.
    pub max_streams: usize,
    /// Members one presence answer lists (the count is always exact; a
    /// `next` cursor pages through the rest). Default 100, which is also
    /// the default page.
    pub max_presence_members: usize,
    /// Presence queries one connection may make per second (HTTP or
    /// WebSocket). Default 10; more get 429 (or an `error`).
    pub max_presence_queries_per_second: u32,
    /// How long a stream publish's `idempotency_key` is remembered: a retry
    /// with the same key within it is answered with the first outcome and
    /// not stored again. Default 300 s.
    pub idempotency_window_s: u64,
    /// Bytes of idempotency keys one home shard remembers (about 100 bytes
    /// plus the topic and key each). Default 16 MiB; past it the oldest keys
    /// are forgotten first (counted in `idempotency_evictions_total`).
    pub max_idempotency_bytes: usize,
    /// Envelopes queued from one shard to another. Default 65,536: a full second of a
    /// 20k msgs/s publish burst aimed at one shard, at 24 bytes an envelope.
    pub bus_queue_capacity: usize,
}

/// Queued bytes at or below which a connection counts as drained: a
/// quarter of its budget, so the next page of a replay (at most another
/// quarter) leaves half the budget for live traffic.
pub fn drain_mark(budget: usize) -> usize {
    budget / 4
}

impl Limits {
    /// A connection's drain mark (see [`drain_mark`]).
    pub fn drain_mark(&self) -> usize {
        drain_mark(self.max_outbound_bytes_per_connection)
    }

    /// The bounds on names that message parsing applies.
    pub fn name_bounds(&self) -> Bounds {
        Bounds {
            topic_bytes: self.max_topic_bytes,
            name_bytes: self.max_name_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_subscriptions_per_connection: 50,
            max_outbound_bytes_per_connection: 1024 * 1024,
            max_outbound_bytes_per_shard: 512 * 1024 * 1024,
            max_inbound_bytes_per_shard: 64 * 1024 * 1024,
            max_http_header_bytes: 16 * 1024,
            max_http_body_bytes: 1024 * 1024,
            max_topic_bytes: 256,
            max_name_bytes: 256,
            max_presence_meta_bytes: 1024,
            max_connections: 1_000_000,
            max_topics_per_shard: 1_000_000,
            max_registrations: 100_000,
            max_registration_bytes: 64 * 1024 * 1024,
            max_history_bytes: 64 * 1024 * 1024,
            max_streams: 100_000,
            max_presence_members: 100,
            max_presence_queries_per_second: 10,
            idempotency_window_s: 300,
            max_idempotency_bytes: 16 * 1024 * 1024,
            bus_queue_capacity: 65_536,
        }
    }
}

/// Credentials from `[auth]`. `Debug` prints `<redacted>` for a set value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// HS256 secret; when set, `/ws` and `/chat` need a token whose `sub` is the
    /// user id. Default: none, and clients name themselves with `?user_id=`.
    pub jwt_secret: Option<String>,
    /// When set, HTTP publish, register and presence need `Authorization: Bearer <api_key>`.
    /// Default: none, and those endpoints are open to anyone who can reach the port.
    pub api_key: Option<String>,
}

impl AuthConfig {
    /// The verifier the shards use for these credentials.
    pub fn build(&self) -> Auth {
        Auth::new(self.jwt_secret.as_deref(), self.api_key.as_deref())
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| if v.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &redacted(&self.jwt_secret))
            .field("api_key", &redacted(&self.api_key))
            .finish()
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every shard binds with `SO_REUSEPORT`. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Number of shards (threads). Default: one per available core.
    pub shards: NonZeroUsize,
    /// Resource limits.
    pub limits: Limits,
    /// How long shutdown waits for close handshakes and queued writes. Default 5 s.
    pub shutdown_timeout: Duration,
    /// How long a closing connection may take to finish its close handshake. Default 3 s.
    pub close_timeout: Duration,
    /// How long an HTTP connection may take to send its next complete request
    /// (a keep-alive connection's idle time, or a slow trickled head). Default
    /// 30 s; then it is closed, with 408 if a request was under way.
    pub http_idle_timeout: Duration,
    /// How long a WebSocket may stay silent before the server pings it.
    /// Default 25 s (below common proxy idle timeouts of 30-60 s); zero
    /// turns pings off, leaving dead peers to TCP keepalive (~90 s).
    pub ping_interval: Duration,
    /// How long a ping may go unanswered (by a pong or anything else) before
    /// the connection is dropped as dead. Default 10 s.
    pub pong_timeout: Duration,
    /// How long a publication may wait for more to the same connection so
    /// they leave in one send (Centrifugo's `write_delay`). Default 0: sent
    /// at the end of the loop turn. Trades latency for fewer sends (and
    /// fewer wake-ups of the reader) when connections get many pushes a second.
    pub write_delay: Duration,
    /// How often an event stream (`/sse`, `/stream`) gets a heartbeat
    /// (`stream_heartbeat_ms`; 0 for none): proxies keep an idle response
    /// open, and a peer that vanished is found by the failed write.
    pub stream_heartbeat: Duration,
    /// The reconnection delay an SSE client is told (`retry:`;
    /// `stream_retry_ms`).
    pub stream_retry: Duration,
    /// Web origins whose pages may open WebSockets and event streams and
    /// read answers (`[http] allowed_origins`). Default: none besides the
    /// node's own host; requests without `Origin` (not from a browser)
    /// are never refused for it.
    pub allowed_origins: AllowedOrigins,
    /// permessage-deflate (`[websocket]`).
    pub websocket: WebSocketConfig,
    /// Pin shard `i` to core `i % cores`. Default true.
    pub pin_cores: bool,
    /// JWT secret and API key. Default: both off.
    pub auth: AuthConfig,
    /// Topic rules. Default [`RuleSet::default_rules`] (one catch-all) when the file
    /// has no `[[rules]]`; with rules, a topic none of them matches is refused.
    pub rules: RuleSet,
    /// `[cluster]`: nodes joined through Redis. Default: none, one node.
    pub cluster: Option<ClusterConfig>,
    /// `[webhooks]`: the node tells the application backend when topics
    /// become occupied or vacated and users go offline. Default: none.
    pub webhooks: Option<WebhookConfig>,
    /// `[proxy]`: the application backend allows or refuses subscriptions
    /// to the topics of rules with `subscribe_proxy = true`. Default: none.
    pub proxy: Option<ProxyConfig>,
    /// `[[apps]]`: the Pusher apps served. Default: none.
    pub apps: Vec<Arc<crate::pusher::App>>,
}

/// `[proxy]`: where the node asks the application backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `http://host:port/path` a subscription of a `subscribe_proxy` rule's
    /// topic is POSTed to.
    pub subscribe_url: Option<String>,
    /// `http://host:port/path` a client publication to a `publish_proxy`
    /// rule's topic is POSTed to.
    pub publish_url: Option<String>,
    /// `http://host:port/path` asked about each `/ws`, `/sse` and `/stream`
    /// connection that brings no valid token: the backend names its user
    /// (and starting topics) or refuses it.
    pub connect_url: Option<String>,
    /// `http://host:port/path` asked to renew a granted connection before
    /// its `expire_at`; without it the connection is closed then.
    pub refresh_url: Option<String>,
    /// Request headers passed to the connect proxy (lowercase names).
    /// Default: `cookie`, `user-agent`, `origin`, `x-forwarded-for`,
    /// `x-real-ip`.
    pub forward_headers: Vec<String>,
    /// How long the backend may take; past it the subscription is refused
    /// (the proxy fails closed). Default 3 s.
    pub timeout: Duration,
    /// Calls in flight per shard; past it a subscription or publication is
    /// refused at once (`server busy`) instead of waiting. Default 1,024.
    pub max_in_flight: usize,
}

/// Webhook event names, as they appear in a webhook body and in
/// `[webhooks] events`.
pub const WEBHOOK_EVENTS: [&str; 6] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "user_offline",
    "client_event",
];

/// The events wanted when `[webhooks] events` is left out: every
/// transition, not `client_event` (one per client publication).
pub const DEFAULT_WEBHOOK_EVENTS: [&str; 5] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "user_offline",
];

/// `[webhooks]`: where and how the node reports transitions to the
/// application backend.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `http://host:port/path` the batches are POSTed to.
    pub url: String,
    /// HMAC-SHA256 key of the `X-Ringcast-Signature` header.
    pub secret: String,
    /// The events wanted, from [`WEBHOOK_EVENTS`]. Default:
    /// [`DEFAULT_WEBHOOK_EVENTS`].
    pub events: Vec<String>,
    /// How long a topic must stay without subscribers before
    /// `channel_vacated` is sent (a subscriber back within it cancels it,
    /// and no second `channel_occupied` is sent), and a presence member
    /// gone before `member_removed`. Default 2 s.
    pub vacated_delay: Duration,
    /// How long a user must stay without connections before
    /// `user_offline` is sent. Default 5 s.
    pub offline_delay: Duration,
    /// How long one POST may take before it counts as failed and is
    /// retried. Default 5 s.
    pub timeout: Duration,
    /// Bytes of events waiting to be delivered (retried while the backend
    /// fails). Past it new events are dropped and counted. Default 16 MiB.
    pub max_queued_bytes: usize,
    /// Events per POST at most. Default 100.
    pub max_batch_events: usize,
}

impl WebhookConfig {
    /// The delays and bounds of `[webhooks]` when it gives none (a Pusher
    /// app's webhooks use them without a `[webhooks]` table), with no
    /// destination of its own.
    pub fn defaults() -> WebhookConfig {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            events: Vec::new(),
            vacated_delay: Duration::from_millis(2000),
            offline_delay: Duration::from_millis(5000),
            timeout: Duration::from_millis(5000),
            max_queued_bytes: 16 << 20,
            max_batch_events: 100,
        }
    }

    /// Whether `event` (one of [`WEBHOOK_EVENTS`]) is wanted.
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .field("vacated_delay", &self.vacated_delay)
            .field("offline_delay", &self.offline_delay)
            .field("timeout", &self.timeout)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("max_batch_events", &self.max_batch_events)
            .finish()
    }
}

/// `[cluster]`: where this node meets the others.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub redis_url: String,
    /// How this node names itself to the others (presence, logs). Default:
    /// the host name and the listening port.
    pub node_name: Option<String>,
    /// Namespace of every Redis key and channel. Default `ringcast`.
    pub prefix: String,
    /// How long a node's presence members outlive its last refresh (it
    /// refreshes every third of it): a node that dies stops counting within
    /// this. Default 30 s.
    pub presence_ttl: Duration,
    /// How long Redis may leave the node's PING unanswered before the node
    /// counts it as gone: `/health` says `degraded` and publishes for other
    /// nodes get 503 within this (plus a 200 ms check interval). Default 3 s.
    pub health_timeout: Duration,
    /// Bytes of publications waiting for Redis (handed to the broker and
    /// not yet answered), for the whole node. Default 64 MiB; past it a
    /// publish for other nodes gets 503 (`cluster busy`) instead of queueing,
    /// so a stalled Redis cannot grow the node.
    pub max_queued_bytes: usize,
    /// Replicas that must have a stream publication before it is answered
    /// `202` (Redis `WAIT`, up to 1 s; fewer is `504` outcome unknown).
    /// Default 0. With 1, a failover that promotes the replica keeps every
    /// acknowledged publication.
    pub wait_replicas: u32,
    /// With `rediss://`: PEM certificates of the CAs to trust for Redis's
    /// certificate instead of the system's (a private CA).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("node_name", &self.node_name)
            .field("prefix", &self.prefix)
            .field("presence_ttl", &self.presence_ttl)
            .field("health_timeout", &self.health_timeout)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("wait_replicas", &self.wait_replicas)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// A URL with its credentials (between `://` and `@`) replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://<redacted>@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            shards: available_cores(),
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(3),
            http_idle_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            write_delay: Duration::ZERO,
            stream_heartbeat: Duration::from_secs(15),
            stream_retry: Duration::from_secs(1),
            allowed_origins: AllowedOrigins::default(),
            websocket: WebSocketConfig::default(),
            pin_cores: true,
            auth: AuthConfig::default(),
            rules: RuleSet::default_rules(),
            cluster: None,
            webhooks: None,
            proxy: None,
            apps: Vec::new(),
        }
    }
}

/// `[websocket]`: permessage-deflate (RFC 7692).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketConfig {
    /// Negotiate permessage-deflate on `/ws` and `/echo` when a client
    /// offers it (`compression`). Default off.
    pub compression: bool,
    /// Pushes whose JSON is shorter than this go uncompressed
    /// (`compression_min_bytes`, default 256).
    pub compression_min_bytes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            compression: false,
            compression_min_bytes: 256,
        }
    }
}

/// Cores this process may run on; one shard each by default.
pub fn available_cores() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    shards: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    close_timeout_ms: Option<u64>,
    http_idle_timeout_ms: Option<u64>,
    ping_interval_ms: Option<u64>,
    pong_timeout_ms: Option<u64>,
    write_delay_us: Option<u64>,
    stream_heartbeat_ms: Option<u64>,
    stream_retry_ms: Option<u64>,
    pin_cores: Option<bool>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    websocket: FileWebSocket,
    rules: Option<Vec<FileRule>>,
    cluster: Option<FileCluster>,
    webhooks: Option<FileWebhooks>,
    proxy: Option<FileProxy>,
    apps: Option<Vec<crate::pusher::FileApp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProxy {
    subscribe_url: Option<String>,
    connect_url: Option<String>,
    publish_url: Option<String>,
    refresh_url: Option<String>,
    timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
    forward_headers: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebhooks {
    url: String,
    secret: String,
    events: Option<Vec<String>>,
    vacated_delay_ms: Option<u64>,
    offline_delay_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_queued_bytes: Option<usize>,
    max_batch_events: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    redis_url: String,
    node_name: Option<String>,
    prefix: Option<String>,
    presence_ttl_s: Option<u64>,
    health_timeout_ms: Option<u64>,
    max_queued_bytes: Option<usize>,
    wait_replicas: Option<u32>,
    tls_ca_file: Option<std::path::PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileWebSocket {
    compression: Option<bool>,
    compression_min_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    jwt_secret: Option<String>,
    api_key: Option<String>,
}

/// One `[[rules]]` entry; flags left out are off.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    pattern: String,
    #[serde(default)]
    client_publish: bool,
    #[serde(default)]
    presence: bool,
    #[serde(default)]
    join_leave: bool,
    #[serde(default)]
    require_auth: bool,
    #[serde(default)]
    history_size: usize,
    #[serde(default)]
    history_ttl_s: u64,
    #[serde(default)]
    replay_on_subscribe: usize,
    #[serde(default)]
    subscribe_proxy: bool,
    #[serde(default)]
    publish_proxy: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_message_bytes: Option<usize>,
    max_subscriptions_per_connection: Option<usize>,
    max_outbound_bytes_per_connection: Option<usize>,
    max_outbound_bytes_per_shard: Option<usize>,
    max_inbound_bytes_per_shard: Option<usize>,
    max_http_header_bytes: Option<usize>,
    max_http_body_bytes: Option<usize>,
    max_topic_bytes: Option<usize>,
    max_name_bytes: Option<usize>,
    max_presence_meta_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_topics_per_shard: Option<usize>,
    max_registrations: Option<usize>,
    max_registration_bytes: Option<usize>,
    max_history_bytes: Option<usize>,
    max_streams: Option<usize>,
    max_presence_members: Option<usize>,
    max_presence_queries_per_second: Option<u32>,
    idempotency_window_s: Option<u64>,
    max_idempotency_bytes: Option<usize>,
    bus_queue_capacity: Option<usize>,
}

impl Config {
    /// Reads a TOML file on top of the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text on top of the defaults.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: parse_message(text, &e),
        })?;
        let mut config = Config::default();
        if let Some(listen) = file.listen {
            config.listen = listen.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "listen: `{listen}` is not an address like 127.0.0.1:8000"
                ))
            })?;
        }
        if let Some(shards) = file.shards {
            config.set_shards(shards)?;
        }
        if let Some(ms) = file.shutdown_timeout_ms {
            config.shutdown_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.close_timeout_ms {
            config.close_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.http_idle_timeout_ms {
            config.http_idle_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.ping_interval_ms {
            config.ping_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = file.pong_timeout_ms {
            config.pong_timeout = Duration::from_millis(ms);
        }
        if let Some(us) = file.write_delay_us {
            config.write_delay = Duration::from_micros(us);
        }
        if let Some(ms) = file.stream_heartbeat_ms {
            config.stream_heartbeat = Duration::from_millis(ms);
        }
        if let Some(ms) = file.stream_retry_ms {
            config.stream_retry = Duration::from_millis(ms);
        }
        if let Some(pin) = file.pin_cores {
            config.pin_cores = pin;
        }
        let l = &mut config.limits;
        let f = file.limits;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = f.$field { l.$field = v; } )* };
        }
        take!(
            max_message_bytes,
            max_subscriptions_per_connection,
            max_outbound_bytes_per_connection,
            max_outbound_bytes_per_shard,
            max_inbound_bytes_per_shard,
            max_http_header_bytes,
            max_http_body_bytes,
            max_topic_bytes,
            max_name_bytes,
            max_presence_meta_bytes,
            max_connections,
            max_topics_per_shard,
            max_registrations,
            max_registration_bytes,
            max_history_bytes,
            max_streams,
            max_presence_members,
            max_presence_queries_per_second,
            idempotency_window_s,
            max_idempotency_bytes,
            bus_queue_capacity
        );
        config.auth = auth_config(file.auth)?;
        if let Some(on) = file.websocket.compression {
            config.websocket.compression = on;
        }
        if let Some(min) = file.websocket.compression_min_bytes {
            config.websocket.compression_min_bytes = min;
        }
        config.allowed_origins = AllowedOrigins::new(&file.http.allowed_origins)
            .map_err(|e| ConfigError::Invalid(format!("[http] {e}")))?;
        if let Some(rules) = file.rules {
            config.rules = rule_set(rules)?;
        }
        config.cluster = file.cluster.map(cluster_config).transpose()?;
        config.webhooks = file.webhooks.map(webhook_config).transpose()?;
        config.proxy = file.proxy.map(proxy_config).transpose()?;
        let check_url = |key: &str, url: &str| {
            check_http_url(key, url).map_err(|e| match e {
                ConfigError::Invalid(message) => message,
                other => other.to_string(),
            })
        };
        config.apps = crate::pusher::apps::apps(file.apps.unwrap_or_default(), check_url)
            .map_err(ConfigError::Invalid)?
            .into_iter()
            .map(Arc::new)
            .collect();
        check_proxied_rules(&config)?;
        config.validate()?;
        Ok(config)
    }

    /// Sets the shard count; 0 means one per core.
    pub fn set_shards(&mut self, shards: usize) -> Result<(), ConfigError> {
        self.shards = match NonZeroUsize::new(shards) {
            Some(n) => n,
            None => available_cores(),
        };
        self.validate()
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.get() > MAX_SHARDS {
            return Err(ConfigError::Invalid(format!(
                "shards: at most {MAX_SHARDS} are supported, got {}",
                self.shards
            )));
        }
        let l = &self.limits;
        let positive = [
            ("max_message_bytes", l.max_message_bytes),
            (
                "max_outbound_bytes_per_connection",
                l.max_outbound_bytes_per_connection,
            ),
            (
                "max_outbound_bytes_per_shard",
                l.max_outbound_bytes_per_shard,
            ),
            ("max_inbound_bytes_per_shard", l.max_inbound_bytes_per_shard),
            ("max_http_header_bytes", l.max_http_header_bytes),
            ("max_topic_bytes", l.max_topic_bytes),
            ("max_name_bytes", l.max_name_bytes),
            ("max_presence_meta_bytes", l.max_presence_meta_bytes),
            ("max_connections", l.max_connections),
            ("max_topics_per_shard", l.max_topics_per_shard),
            ("bus_queue_capacity", l.bus_queue_capacity),
            ("max_streams", l.max_streams),
            ("max_presence_members", l.max_presence_members),
            (
                "max_presence_queries_per_second",
                l.max_presence_queries_per_second as usize,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be greater than 0"
                )));
            }
        }
        Ok(())
    }
}

/// The parser's message plus the line and key it points at: type errors
/// ("invalid type: string, expected a boolean") do not name the key themselves.
/// Only the key is quoted, never the line, which may hold a secret.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(start) = e.span().map(|span| span.start) else {
        return message.to_string();
    };
    let Some(before) = text.get(..start) else {
        return message.to_string();
    };
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['));
    let header = line.trim();
    match key {
        Some(key) => format!("line {line_no}, key `{key}`: {message}"),
        // A table header such as `[[rules]]` holds no value, so it is safe to quote.
        None if header.starts_with('[') => format!("line {line_no}, in `{header}`: {message}"),
        None => format!("line {line_no}: {message}"),
    }
}

fn cluster_config(file: FileCluster) -> Result<ClusterConfig, ConfigError> {
    // One Redis (`redis://`) or a Redis Cluster (`redis-cluster://` with
    // more seeds as `?node=host:port&node=...`); `rediss` for TLS.
    let Some(scheme) = [
        "redis://",
        "redis-cluster://",
        "rediss://",
        "rediss-cluster://",
    ]
    .into_iter()
    .find(|scheme| file.redis_url.starts_with(scheme)) else {
        return Err(ConfigError::Invalid(format!(
            "cluster.redis_url: `{}` is not a URL like redis://127.0.0.1:6379, rediss://redis.internal:6380 or redis-cluster://10.0.0.1:7000?node=10.0.0.2:7000",
            redact_url(&file.redis_url)
        )));
    };
    if file.tls_ca_file.is_some() && !scheme.starts_with("rediss") {
        return Err(ConfigError::Invalid(
            "cluster.tls_ca_file needs a rediss:// (TLS) redis_url".into(),
        ));
    }
    let prefix = file.prefix.unwrap_or_else(|| "ringcast".into());
    // The prefix starts every channel and key; braces would move the hash
    // tag that keeps a topic's keys on one Redis Cluster slot.
    if prefix.is_empty() || prefix.contains(['{', '}', ' ']) {
        return Err(ConfigError::Invalid(format!(
            "cluster.prefix: `{prefix}` must be non-empty, without braces or spaces"
        )));
    }
    if file.node_name.as_deref().is_some_and(str::is_empty) {
        return Err(ConfigError::Invalid(
            "cluster.node_name must not be empty".into(),
        ));
    }
    let presence_ttl = Duration::from_secs(file.presence_ttl_s.unwrap_or(30));
    if presence_ttl < Duration::from_secs(3) {
        return Err(ConfigError::Invalid(
            "cluster.presence_ttl_s must be at least 3".into(),
        ));
    }
    let health_timeout = Duration::from_millis(file.health_timeout_ms.unwrap_or(3000));
    if health_timeout < Duration::from_millis(500) {
        return Err(ConfigError::Invalid(
            "cluster.health_timeout_ms must be at least 500".into(),
        ));
    }
    let max_queued_bytes = file.max_queued_bytes.unwrap_or(64 * 1024 * 1024);
    if max_queued_bytes < 1024 * 1024 {
        return Err(ConfigError::Invalid(
            "cluster.max_queued_bytes must be at least 1 MiB (1048576)".into(),
        ));
    }
    Ok(ClusterConfig {
        redis_url: file.redis_url,
        node_name: file.node_name,
        prefix,
        presence_ttl,
        health_timeout,
        max_queued_bytes,
        wait_replicas: file.wait_replicas.unwrap_or(0),
        tls_ca_file: file.tls_ca_file,
    })
}

/// A rule that sends its topics through a proxy needs that proxy's URL.
fn check_proxied_rules(config: &Config) -> Result<(), ConfigError> {
    let proxy = config.proxy.as_ref();
    let has_subscribe = proxy.is_some_and(|p| p.subscribe_url.is_some());
    let has_publish = proxy.is_some_and(|p| p.publish_url.is_some());
    for rule in config.rules.rules() {
        let missing = if rule.subscribe_proxy && !has_subscribe {
            Some(("subscribe_proxy", "subscribe_url"))
        } else if rule.publish_proxy && !has_publish {
            Some(("publish_proxy", "publish_url"))
        } else {
            None
        };
        if let Some((flag, url)) = missing {
            return Err(ConfigError::Invalid(format!(
                "rules: `{}` has {flag} = true but [proxy] has no {url}",
                rule.pattern
            )));
        }
    }
    Ok(())
}

/// `http(s)://host[:port]/path`, or why not.
fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let invalid = |why: &str| {
        Err(ConfigError::Invalid(format!(
            "{key}: `{}` {why}",
            redact_url(url)
        )))
    };
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return invalid(
            "is not a URL like http://127.0.0.1:9000/ringcast or https://backend.example/ringcast",
        );
    };
    if rest.is_empty() || rest.starts_with('/') || url.parse::<hyper::Uri>().is_err() {
        return invalid("names no host");
    }
    Ok(())
}

fn proxy_config(file: FileProxy) -> Result<ProxyConfig, ConfigError> {
    if file.refresh_url.is_some() && file.connect_url.is_none() {
        return Err(ConfigError::Invalid(
            "proxy.refresh_url renews what connect_url granted: set connect_url too".into(),
        ));
    }
    if file.subscribe_url.is_none() && file.publish_url.is_none() && file.connect_url.is_none() {
        return Err(ConfigError::Invalid(
            "proxy: connect_url, subscribe_url or publish_url is required".into(),
        ));
    }
    for (key, url) in [
        ("proxy.connect_url", &file.connect_url),
        ("proxy.refresh_url", &file.refresh_url),
        ("proxy.subscribe_url", &file.subscribe_url),
        ("proxy.publish_url", &file.publish_url),
    ] {
        if let Some(url) = url {
            check_http_url(key, url)?;
        }
    }
    let timeout = Duration::from_millis(file.timeout_ms.unwrap_or(3000));
    if timeout < Duration::from_millis(10) {
        return Err(ConfigError::Invalid(
            "proxy.timeout_ms must be at least 10".into(),
        ));
    }
    let max_in_flight = file.max_in_flight.unwrap_or(1024);
    if !(1..=1_000_000).contains(&max_in_flight) {
        return Err(ConfigError::Invalid(
            "proxy.max_in_flight must be 1 to 1000000".into(),
        ));
    }
    let forward_headers: Vec<String> = match file.forward_headers {
        Some(names) => names
            .iter()
            .map(|n| n.trim().to_ascii_lowercase())
            .collect(),
        None => [
            "cookie",
            "user-agent",
            "origin",
            "x-forwarded-for",
            "x-real-ip",
        ]
        .map(String::from)
        .to_vec(),
    };
    if let Some(bad) = forward_headers
        .iter()
        .find(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(ConfigError::Invalid(format!(
            "proxy.forward_headers: `{bad}` is not a header name"
        )));
    }
    Ok(ProxyConfig {
        subscribe_url: file.subscribe_url,
        publish_url: file.publish_url,
        connect_url: file.connect_url,
        refresh_url: file.refresh_url,
        forward_headers,
        timeout,
        max_in_flight,
    })
}

fn webhook_config(file: FileWebhooks) -> Result<WebhookConfig, ConfigError> {
    let invalid = |message: String| Err(ConfigError::Invalid(format!("webhooks.{message}")));
    check_http_url("webhooks.url", &file.url)?;
    if file.secret.trim().is_empty() {
        return invalid("secret must not be empty: the backend checks it".into());
    }
    let events = match file.events {
        Some(events) => events,
        None => DEFAULT_WEBHOOK_EVENTS
            .iter()
            .map(|e| e.to_string())
            .collect(),
    };
    if let Some(unknown) = events
        .iter()
        .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
    {
        return invalid(format!(
            "events: `{unknown}` is not one of {}",
            WEBHOOK_EVENTS.join(", ")
        ));
    }
    let defaults = WebhookConfig::defaults();
    let max_queued_bytes = file.max_queued_bytes.unwrap_or(defaults.max_queued_bytes);
    if max_queued_bytes < 64 * 1024 {
        return invalid("max_queued_bytes must be at least 64 KiB (65536)".into());
    }
    let max_batch_events = file.max_batch_events.unwrap_or(defaults.max_batch_events);
    if !(1..=10_000).contains(&max_batch_events) {
        return invalid("max_batch_events must be 1 to 10000".into());
    }
    let timeout = file
        .timeout_ms
        .map_or(defaults.timeout, Duration::from_millis);
    if timeout < Duration::from_millis(100) {
        return invalid("timeout_ms must be at least 100".into());
    }
    Ok(WebhookConfig {
        url: file.url,
        secret: file.secret,
        events,
        vacated_delay: file
            .vacated_delay_ms
            .map_or(defaults.vacated_delay, Duration::from_millis),
        offline_delay: file
            .offline_delay_ms
            .map_or(defaults.offline_delay, Duration::from_millis),
        timeout,
        max_queued_bytes,
        max_batch_events,
    })
}

fn auth_config(file: FileAuth) -> Result<AuthConfig, ConfigError> {
    for (name, value) in [("jwt_secret", &file.jwt_secret), ("api_key", &file.api_key)] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(ConfigError::Invalid(format!(
                "auth.{name} must not be empty; leave it out to turn it off"
            )));
        }
    }
    Ok(AuthConfig {
        jwt_secret: file.jwt_secret,
        api_key: file.api_key,
    })
}

/// A rule's history settings: both `history_size` and `history_ttl_s`, or neither.
fn history(i: usize, r: &FileRule) -> Result<Option<History>, ConfigError> {
    let invalid = |message: &str| Err(ConfigError::Invalid(format!("rules[{i}]: {message}")));
    match (r.history_size, r.history_ttl_s) {
        (0, 0) if r.replay_on_subscribe > 0 => {
            invalid("replay_on_subscribe needs history_size and history_ttl_s")
        }
        (0, 0) => Ok(None),
        (0, _) | (_, 0) => invalid("history_size and history_ttl_s must both be greater than 0"),
        (size, _) if r.replay_on_subscribe > size => {
            invalid("replay_on_subscribe must not be greater than history_size")
        }
        (size, ttl_s) => Ok(Some(History {
            size,
            ttl: Duration::from_secs(ttl_s),
            replay_on_subscribe: r.replay_on_subscribe,
        })),
    }
}

fn rule_set(file: Vec<FileRule>) -> Result<RuleSet, ConfigError> {
    let mut rules = Vec::with_capacity(file.len());
    for (i, r) in file.into_iter().enumerate() {
        let pattern = Pattern::parse(&r.pattern)
            .map_err(|e| ConfigError::Invalid(format!("rules[{i}].pattern: {e}")))?;
        let history = history(i, &r)?;
        rules.push(Rule {
            pattern,
            client_publish: r.client_publish,
            presence: r.presence,
            join_leave: r.join_leave,
            require_auth: r.require_auth,
            history,
            subscribe_proxy: r.subscribe_proxy,
            publish_proxy: r.publish_proxy,
        });
    }
    RuleSet::new(rules).map_err(|e| ConfigError::Invalid(format!("rules: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
    }

    #[test]
    fn limits_are_read() {
        let c = Config::from_toml(
            "listen = \"0.0.0.0:9000\"\nshards = 2\n[limits]\nmax_message_bytes = 1024\nmax_subscriptions_per_connection = 3\n",
        )
        .unwrap();
        assert_eq!(c.shards.get(), 2);
        assert_eq!(c.limits.max_message_bytes, 1024);
        assert_eq!(c.limits.max_subscriptions_per_connection, 3);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = Config::from_toml("[limits]\nmax_mesage_bytes = 1\n").unwrap_err();
        assert!(err.to_string().contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn zero_limits_and_too_many_shards_are_rejected() {
        assert!(Config::from_toml("[limits]\nmax_message_bytes = 0\n").is_err());
        assert!(Config::from_toml("shards = 65\n").is_err());
        assert!(Config::from_toml("listen = \"nowhere\"\n").is_err());
    }

    #[test]
    fn no_rules_gives_the_built_in_catch_all() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.rules, RuleSet::default_rules());
        assert!(c.auth.jwt_secret.is_none() && c.auth.api_key.is_none());
    }

    #[test]
    fn rules_are_read_with_flags_defaulting_to_off() {
        let c = Config::from_toml(
            r#"
[[rules]]
pattern = "room:*"
client_publish = true
presence = true
join_leave = true
require_auth = true

[[rules]]
pattern = "chat:lobby"
"#,
        )
        .unwrap();
        let room = c.rules.rule(c.rules.resolve("room:9").unwrap());
        assert_eq!(room.pattern, Pattern::Prefix("room:".into()));
        assert!(room.client_publish && room.presence && room.join_leave && room.require_auth);
        let lobby = c.rules.rule(c.rules.resolve("chat:lobby").unwrap());
        assert_eq!(lobby, &Rule::new(Pattern::Exact("chat:lobby".into())));
        assert_eq!(c.rules.resolve("other"), None);
    }

    #[test]
    fn cluster_settings_are_checked_and_the_password_never_shown() {
        let config = Config::from_toml(
            "[cluster]\nredis_url = \"redis://u:secret@10.0.0.5:6379/2\"\nnode_name = \"edge-1\"\n",
        )
        .unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.prefix, "ringcast");
        assert_eq!(cluster.node_name.as_deref(), Some("edge-1"));
        let shown = format!("{cluster:?}");
        assert!(
            !shown.contains("secret") && shown.contains("10.0.0.5:6379/2"),
            "{shown}"
        );

        for (text, expected) in [
            ("[cluster]\nredis_url = \"http://x\"\n", "cluster.redis_url"),
            (
                "[cluster]\nredis_url = \"redis://x\"\ntls_ca_file = \"/ca.pem\"\n",
                "cluster.tls_ca_file",
            ),
            (
                "[cluster]\nredis_url = \"redis://x\"\nprefix = \"a{b\"\n",
                "cluster.prefix",
            ),
            (
                "[cluster]\nredis_url = \"redis://x\"\nnode_name = \"\"\n",
                "node_name",
            ),
            ("[cluster]\nnode_name = \"a\"\n", "redis_url"),
        ] {
            let error = Config::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(Config::from_toml("").unwrap().cluster.is_none());
    }

    #[test]
    fn pusher_apps_are_read_and_checked() {
        let config = Config::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k1\"\nsecret = \"s1\"\nclient_events = true\n\
             [[apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"s2\"\nwebhook_url = \"http://h:1/p\"\n",
        )
        .unwrap();
        let ids: Vec<_> = config
            .apps
            .iter()
            .map(|a| (a.id.as_str(), a.client_events))
            .collect();
        assert_eq!(ids, [("1", true), ("2", false)]);
        let error = Config::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nwebhook_url = \"ftp://h\"\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error.matches("invalid config").count(),
            1,
            "said once: {error}"
        );
        assert!(error.contains("apps[0].webhook_url"), "{error}");
        assert!(Config::from_toml("").unwrap().apps.is_empty());
    }

    #[test]
    fn webhook_settings_are_checked_and_the_secret_never_shown() {
        let config = Config::from_toml(
            "[webhooks]\nurl = \"http://10.0.0.9:9000/hook\"\nsecret = \"s3cr3t\"\n",
        )
        .unwrap();
        let webhooks = config.webhooks.unwrap();
        assert_eq!(
            webhooks.events, DEFAULT_WEBHOOK_EVENTS,
            "every transition by default"
        );
        assert_eq!(webhooks.vacated_delay, Duration::from_secs(2));
        let shown = format!("{webhooks:?}");
        assert!(
            !shown.contains("s3cr3t") && shown.contains("10.0.0.9"),
            "{shown}"
        );

        let hook =
            |more: &str| format!("[webhooks]\nurl = \"http://h:1/x\"\nsecret = \"s\"\n{more}");
        for (text, expected) in [
            (
                "[webhooks]\nurl = \"ftp://h/x\"\nsecret = \"s\"\n".to_string(),
                "webhooks.url",
            ),
            (
                "[webhooks]\nurl = \"http:///x\"\nsecret = \"s\"\n".to_string(),
                "names no host",
            ),
            (
                "[webhooks]\nurl = \"http://h/x\"\nsecret = \" \"\n".to_string(),
                "webhooks.secret",
            ),
            (hook("events = [\"channel_opened\"]"), "channel_opened"),
            (hook("max_queued_bytes = 10"), "max_queued_bytes"),
            (hook("max_batch_events = 0"), "max_batch_events"),
        ] {
            let error = Config::from_toml(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn proxy_settings_are_checked() {
        let config = Config::from_toml(
            "[proxy]\nsubscribe_url = \"http://10.0.0.9:9000/sub\"\n\
             [[rules]]\npattern = \"private:*\"\nsubscribe_proxy = true\n",
        )
        .unwrap();
        let proxy = config.proxy.unwrap();
        assert_eq!(proxy.timeout, Duration::from_secs(3));
        assert_eq!(proxy.max_in_flight, 1024);
        assert!(config.rules.rules()[0].subscribe_proxy);
        for (text, expected) in [
            (
                "[[rules]]\npattern = \"p:*\"\nsubscribe_proxy = true\n",
                "has subscribe_proxy = true but [proxy] has no subscribe_url",
            ),
            (
                "[proxy]\ntimeout_ms = 100\n",
                "connect_url, subscribe_url or publish_url is required",
            ),
            (
                "[proxy]\nsubscribe_url = \"http://h/s\"\n\
                 [[rules]]\npattern = \"p:*\"\npublish_proxy = true\n",
                "has publish_proxy = true but [proxy] has no publish_url",
            ),
            (
                "[proxy]\nsubscribe_url = \"http://h/s\"\nrefresh_url = \"http://h/c\"\n",
                "set connect_url too",
            ),
            (
                "[proxy]\nconnect_url = \"http://h/c\"\nforward_headers = [\"a b\"]\n",
                "not a header name",
            ),
            (
                "[proxy]\nsubscribe_url = \"ftp://h/s\"\n",
                "proxy.subscribe_url",
            ),
            (
                "[proxy]\nsubscribe_url = \"http://h/s\"\nmax_in_flight = 0\n",
                "max_in_flight",
            ),
        ] {
            let error = Config::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn rule_errors_name_the_rule_and_pattern() {
        let err = Config::from_toml(
            "[[rules]]\npattern = \"a:*\"\n[[rules]]\npattern = \"b\"\n[[rules]]\npattern = \"a:*\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`a:*`"), "{err}");
        let err = Config::from_toml("[[rules]]\npattern = \"a*b\"\n").unwrap_err();
        assert!(err.to_string().contains("rules[0].pattern"), "{err}");
        assert!(err.to_string().contains("a*b"), "{err}");
        let err = Config::from_toml("[[rules]]\npattern = \"\"\n").unwrap_err();
        assert!(err.to_string().contains("rules[0].pattern"), "{err}");
    }

    #[test]
    fn rule_keys_are_checked_by_name() {
        let err = Config::from_toml("[[rules]]\npattern = \"a\"\npublish = true\n").unwrap_err();
        assert!(err.to_string().contains("publish"), "{err}");
        let err = Config::from_toml("[[rules]]\npresence = true\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("line 1, in `[[rules]]`: missing field `pattern`"),
            "{err}"
        );
        let err =
            Config::from_toml("[[rules]]\npattern = \"a\"\npresence = \"yes\"\n").unwrap_err();
        assert!(err.to_string().contains("line 3, key `presence`"), "{err}");
    }

    #[test]
    fn auth_is_read_and_redacted_in_debug() {
        let c =
            Config::from_toml("[auth]\njwt_secret = \"s3cret-jwt\"\napi_key = \"s3cret-key\"\n")
                .unwrap();
        assert_eq!(c.auth.jwt_secret.as_deref(), Some("s3cret-jwt"));
        assert_eq!(c.auth.api_key.as_deref(), Some("s3cret-key"));
        let auth = c.auth.build();
        assert!(auth.jwt_enabled() && auth.api_key_ok(Some("s3cret-key")));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn auth_errors_name_the_key() {
        let err = Config::from_toml("[auth]\njwt_secrt = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("jwt_secrt"), "{err}");
        let err = Config::from_toml("[auth]\napi_key = \"\"\n").unwrap_err();
        assert!(err.to_string().contains("auth.api_key"), "{err}");
        let err = Config::from_toml("[auth]\njwt_secret = \"  \"\n").unwrap_err();
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
        let err = Config::from_toml("[auth]\napi_key = 5\n").unwrap_err();
        assert!(err.to_string().contains("key `api_key`"), "{err}");
    }
}
