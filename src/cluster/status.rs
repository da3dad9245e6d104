//! What the shards and the broker share about the cluster: whether Redis is
//! reachable, and the counters /metrics shows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The node's view of the cluster, written by the broker, read by shards.
#[derive(Debug)]
pub struct ClusterStatus {
    /// This node's name, as the others see it.
    pub node: String,
    up: AtomicBool,
    /// The next publication's place in this node's order (see
    /// `Envelope::ForNodes`).
    next_seq: AtomicU64,
    /// Bytes of publications handed to the broker that Redis has not
    /// answered yet: shards add, the broker takes away.
    queued_bytes: AtomicU64,
    /// The bound on `queued_bytes` (`cluster.max_queued_bytes`).
    max_queued_bytes: u64,
    /// Counters for /metrics.
    pub stats: ClusterStats,
}

/// Cluster counters (all monotonic but `up`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Publications this node handed to Redis.
    pub published_total: AtomicU64,
    /// Publications from other nodes delivered to this node's shards.
    pub received_total: AtomicU64,
    /// Publications answered `503` (or an `error`) because Redis was down:
    /// delivered on this node only.
    pub refused_total: AtomicU64,
    /// Publications for other nodes lost: Redis failed them, or the queue
    /// between a shard and the broker was full.
    pub drops_total: AtomicU64,
    /// Times the broker got Redis back after losing it.
    pub reconnects_total: AtomicU64,
    /// Redis channels this node subscribes to.
    pub channels: AtomicU64,
    /// Publications refused because `max_queued_bytes` were waiting for Redis.
    pub busy_total: AtomicU64,
    /// Stream publications sent to Redis that got no answer (504 `outcome
    /// unknown`): they may have been stored.
    pub unknown_total: AtomicU64,
    /// Presence changes waiting to be written to Redis.
    pub presence_waiting: AtomicU64,
    /// Channel subscription changes waiting to be sent to Redis.
    pub changes_waiting: AtomicU64,
    /// Stream reads and presence queries waiting for one of the 256 of
    /// each kind the broker lets Redis have at once.
    pub requests_waiting: AtomicU64,
    /// Streams found restarted under a new epoch (Redis lost them): their
    /// subscribers were sent a `reset`.
    pub stream_resets_total: AtomicU64,
    /// Questions this node asked the other nodes (counts Redis keeps no
    /// record of: a channel's subscribers, the channels under a prefix).
    pub node_queries_total: AtomicU64,
    /// Of those, the ones answered when the timeout came, without every
    /// node's answer.
    pub node_queries_partial_total: AtomicU64,
}

impl ClusterStatus {
    /// A node named `node`, not yet connected, that lets at most
    /// `max_queued_bytes` of publications wait for Redis.
    pub fn new(node: String, max_queued_bytes: usize) -> ClusterStatus {
        ClusterStatus {
            node,
            up: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            max_queued_bytes: max_queued_bytes as u64,
            stats: ClusterStats::default(),
        }
    }

    /// Counts `bytes` of a publication on its way to Redis; `false` (and
    /// nothing counted) when that would pass the bound: the caller refuses
    /// the publication.
    pub fn hold(&self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            Self::count(&self.stats.busy_total);
            return false;
        }
        true
    }

    /// Redis answered (or failed) a publication `hold` counted.
    pub fn release(&self, bytes: usize) {
        let before = self.queued_bytes.fetch_sub(bytes as u64, Ordering::AcqRel);
        debug_assert!(before >= bytes as u64, "released more than was held");
    }

    /// Bytes of publications waiting for Redis.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Whether the broker reaches Redis: publications for other nodes are
    /// accepted only then.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A place in the node's order of publications: taken just before the
    /// publication is queued to the broker.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Set by the broker when it gains or loses Redis.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    /// Appends the cluster's metrics in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = &self.stats;
        let metrics = [
            (
                "cluster_up",
                "gauge",
                "1 while this node reaches Redis, else 0.",
                u64::from(self.is_up()),
            ),
            (
                "cluster_channels",
                "gauge",
                "Redis channels this node subscribes to.",
                s.channels.load(Ordering::Relaxed),
            ),
            (
                "cluster_queued_bytes",
                "gauge",
                "Bytes of publications waiting for Redis (bounded by cluster.max_queued_bytes).",
                self.queued_bytes(),
            ),
            (
                "cluster_busy_total",
                "counter",
                "Publications refused (503) because cluster.max_queued_bytes were waiting for Redis.",
                s.busy_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_unknown_total",
                "counter",
                "Stream publications answered 504 outcome unknown: sent to Redis, no answer.",
                s.unknown_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_stream_resets_total",
                "counter",
                "Streams Redis lost and started afresh under a new epoch; subscribers got a reset.",
                s.stream_resets_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_requests_waiting",
                "gauge",
                "Stream reads and presence queries waiting for a turn (256 of each kind in flight at most).",
                s.requests_waiting.load(Ordering::Relaxed),
            ),
            (
                "cluster_node_queries_total",
                "counter",
                "Questions this node asked the other nodes (subscriber counts, channel lists).",
                s.node_queries_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_node_queries_partial_total",
                "counter",
                "Questions to the other nodes answered at the timeout without every node's answer.",
                s.node_queries_partial_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_presence_waiting",
                "gauge",
                "Presence changes waiting to be written to Redis (coalesced per member).",
                s.presence_waiting.load(Ordering::Relaxed),
            ),
            (
                "cluster_changes_waiting",
                "gauge",
                "Channel subscription changes waiting to be sent to Redis (coalesced per channel).",
                s.changes_waiting.load(Ordering::Relaxed),
            ),
            (
                "cluster_published_total",
                "counter",
                "Publications sent to Redis for the other nodes.",
                s.published_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_received_total",
                "counter",
                "Publications from other nodes delivered to this node's shards.",
                s.received_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_refused_total",
                "counter",
                "Publications delivered on this node only because Redis was down (503).",
                s.refused_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_drops_total",
                "counter",
                "Publications between this node and the others lost (Redis errors, full queues).",
                s.drops_total.load(Ordering::Relaxed),
            ),
            (
                "cluster_reconnects_total",
                "counter",
                "Times the node got Redis back after losing it.",
                s.reconnects_total.load(Ordering::Relaxed),
            ),
        ];
        crate::metrics::write_node_metrics(out, &metrics);
    }

    /// Adds one to a counter.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
