//! Per-shard counters, written only by their own shard and summed when read.
//!
//! Each shard owns one [`ShardStats`] and updates it with relaxed atomic
//! stores: no other thread writes it, so the cache line stays on its core and an
//! update costs what a plain add does. `/health` and `/metrics` read every
//! shard's copy and sum them; a read may be a few updates behind, never wrong.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// Counters of one shard.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct ShardStats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl ShardStats {
            /// Name, Prometheus type, help text and current value of every counter.
            pub fn each(&self) -> impl Iterator<Item = (&'static str, &'static str, &'static str, u64)> + '_ {
                [
                    $( (stringify!($name), $kind, concat!($($doc),*), self.$name.load(Ordering::Relaxed)), )*
                ].into_iter()
            }
        }
    };
}

counters! {
    /// Open connections (HTTP and WebSocket).
    connections: "gauge",
    /// Connections accepted since start.
    connections_accepted_total: "counter",
    /// Accept operations that failed (out of descriptors or memory).
    accept_errors_total: "counter",
    /// Connections refused because max_connections (of the node, or of a Pusher app) was reached.
    connections_rejected_total: "counter",
    /// Open WebSocket connections.
    websockets: "gauge",
    /// Open WebSockets that negotiated permessage-deflate.
    websockets_compressed: "gauge",
    /// Open event streams (`/sse` and `/stream`).
    event_streams: "gauge",
    /// Topic subscriptions held by connections.
    subscriptions: "gauge",
    /// Topics with at least one local subscriber.
    topics: "gauge",
    /// HTTP requests parsed.
    http_requests_total: "counter",
    /// HTTP requests answered with a 4xx or 5xx status.
    http_errors_total: "counter",
    /// WebSocket messages received from clients.
    messages_in_total: "counter",
    /// Publishes accepted (HTTP or WebSocket).
    publishes_total: "counter",
    /// Frames queued to clients (pushes, replies, echoes).
    messages_out_total: "counter",
    /// Bytes received from clients.
    bytes_in_total: "counter",
    /// Bytes written to clients.
    bytes_out_total: "counter",
    /// Send submissions made to the kernel.
    send_ops_total: "counter",
    /// Error replies sent to WebSocket clients.
    ws_errors_total: "counter",
    /// Connections closed for a protocol violation or an oversize message.
    protocol_closes_total: "counter",
    /// Connections closed with 1013 because their outbound queue passed its limit.
    slow_consumer_disconnects_total: "counter",
    /// Of those, connections closed because the shard's connections together passed max_outbound_bytes_per_shard while this one was behind.
    shard_outbound_overflows_total: "counter",
    /// Publishes to another shard dropped because its bus queue was full.
    bus_drops_total: "counter",
    /// Envelopes sent to other shards.
    bus_sent_total: "counter",
    /// Envelopes received from other shards.
    bus_received_total: "counter",
    /// Control envelopes waiting for room in the busiest peer's bus queue.
    control_backlog: "gauge",
    /// Requests refused because a peer's control backlog was full (subscribe, register, presence, identified upgrades).
    control_refused_total: "counter",
    /// Presence queries refused: too many in flight per connection or shard.
    presence_refused_total: "counter",
    /// Connections closed because the shard's partial input passed max_inbound_bytes_per_shard while they had held theirs longest (408 or close 1008).
    inbound_evictions_total: "counter",
    /// Connections closed because they kept sending while a request of theirs waited for other shards.
    parked_input_overflows_total: "counter",
    /// WebSockets closed because a ping went unanswered for pong_timeout.
    ping_timeouts_total: "counter",
    /// io_uring_enter system calls made by the shard.
    ring_enters_total: "counter",
    /// Times completions spilled into the kernel's overflow list and were flushed.
    cq_overflow_flushes_total: "counter",
    /// Completions the kernel dropped (must stay 0).
    cq_dropped_total: "counter",
    /// Times a shard gone quiet gave its receive buffers' pages back to the kernel (each page faults back in on the next receive into it).
    receive_page_releases_total: "counter",
    /// Bytes of partial input held for connections (unparsed input, heads waiting for bodies, chunked bodies and fragmented messages under way); bounded by max_inbound_bytes_per_shard.
    memory_inbound_bytes: "gauge",
    /// Bytes queued to connections that the kernel has not taken yet, a frame shared by several counting once per connection; bounded by max_outbound_bytes_per_shard.
    memory_outbound_bytes: "gauge",
    /// Bytes of work parked on connections until other shards answer (upgrade and HTTP responses waiting for acknowledgements).
    memory_parked_bytes: "gauge",
    /// Bytes of the registrations this shard indexes (every shard indexes all; the strings are shared between shards).
    memory_registrations_bytes: "gauge",
    /// Bytes of presence metas and of presence answers being gathered.
    memory_presence_bytes: "gauge",
    /// Connections with a stream replay paging out or waiting its turn.
    stream_replays: "gauge",
    /// Stream topics this shard is home to.
    streams: "gauge",
    /// Streams refused because max_streams was reached (a publish got 503, a subscribe an error).
    streams_refused_total: "counter",
    /// Publications kept in history on this shard.
    stream_publications: "gauge",
    /// Bytes of history kept on this shard (frames and bookkeeping).
    stream_stored_bytes: "gauge",
    /// Bytes of the streams' own bookkeeping on this shard (names, epochs, table and expiry entries).
    memory_stream_meta_bytes: "gauge",
    /// Publications evicted from history (size, TTL or max_history_bytes).
    stream_evictions_total: "counter",
    /// Bytes of stream publications' idempotency keys remembered on this shard.
    memory_idempotency_bytes: "gauge",
    /// Idempotency keys forgotten before their window ended (max_idempotency_bytes).
    idempotency_evictions_total: "counter",
    /// Stream publishes answered from an idempotency key: retries not stored again.
    idempotent_retries_total: "counter",
    /// Streams started, each with a new epoch.
    stream_epochs_total: "counter",
    /// Subscriptions that recovered from the position they asked for.
    stream_recoveries_total: "counter",
    /// Subscriptions whose position was gone (recovered:false).
    stream_recovery_failures_total: "counter",
    /// Publications replayed to subscribers (recovered or last values).
    stream_replayed_total: "counter",
}

impl ShardStats {
    /// Adds `n` to a counter. Only the owning shard calls this.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Sets a gauge or a counter kept elsewhere. Only the owning shard calls this.
    #[inline]
    pub fn set(counter: &AtomicU64, value: u64) {
        counter.store(value, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge. Only the owning shard calls this.
    #[inline]
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }
}

/// Sum of one counter over all shards.
pub fn total(shards: &[ShardStats], pick: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| pick(s).load(Ordering::Relaxed)).sum()
}

/// Prometheus text exposition: each counter summed, then per shard.
/// Appends node-wide metrics, each `(name, kind, help, value)`, in the
/// Prometheus text format (`ringcast_` prefixed).
pub fn write_node_metrics(out: &mut String, metrics: &[(&str, &str, &str, u64)]) {
    for (name, kind, help, value) in metrics {
        let _ = writeln!(out, "# HELP ringcast_{name} {help}");
        let _ = writeln!(out, "# TYPE ringcast_{name} {kind}");
        let _ = writeln!(out, "ringcast_{name} {value}");
    }
}

pub fn render_prometheus(shards: &[ShardStats]) -> String {
    let mut out = String::with_capacity(4096);
    let Some(first) = shards.first() else {
        return out;
    };
    let names: Vec<_> = first.each().map(|(n, k, h, _)| (n, k, h)).collect();
    let per_shard: Vec<Vec<u64>> = shards
        .iter()
        .map(|s| s.each().map(|(.., v)| v).collect())
        .collect();
    for (i, (name, kind, help)) in names.iter().enumerate() {
        let sum: u64 = per_shard.iter().map(|v| v[i]).sum();
        let _ = writeln!(out, "# HELP ringcast_{name} {help}");
        let _ = writeln!(out, "# TYPE ringcast_{name} {kind}");
        let _ = writeln!(out, "ringcast_{name} {sum}");
        for (shard, values) in per_shard.iter().enumerate() {
            let _ = writeln!(out, "ringcast_{name}{{shard=\"{shard}\"}} {}", values[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_sums_shards_and_lists_each() {
        let shards = [ShardStats::default(), ShardStats::default()];
        ShardStats::add(&shards[0].publishes_total, 3);
        ShardStats::add(&shards[1].publishes_total, 4);
        let text = render_prometheus(&shards);
        assert!(text.contains("# TYPE ringcast_publishes_total counter\n"));
        assert!(text.contains("\nringcast_publishes_total 7\n"));
        assert!(text.contains("ringcast_publishes_total{shard=\"1\"} 4\n"));
        assert_eq!(total(&shards, |s| &s.publishes_total), 7);
    }
}
