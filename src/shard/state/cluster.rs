//! A shard's side of the cluster: publications for other nodes go to the
//! broker, a member of the bus like a shard, which speaks to Redis. The
//! shard never waits on it: it hands an envelope over and goes on.

use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::cluster::ClusterStatus;

use super::ShardState;

/// A publication reached this node's subscribers but not the other nodes'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalOnly {
    /// The broker has lost Redis.
    ClusterDown,
    /// The queue to the broker is full (Redis is slower than the publishers).
    BrokerBusy,
    /// `cluster.max_queued_bytes` of publications already wait for Redis.
    RedisBehind,
}

impl LocalOnly {
    /// The `error` text a publisher gets.
    pub(crate) fn message(self) -> &'static str {
        match self {
            LocalOnly::ClusterDown => {
                "cluster unavailable: delivered on this node only, other nodes did not get it"
            }
            LocalOnly::BrokerBusy => {
                "cluster busy: delivered on this node only, other nodes did not get it"
            }
            LocalOnly::RedisBehind => {
                "cluster busy: Redis is not keeping up (cluster.max_queued_bytes wait for it); other nodes did not get it"
            }
        }
    }
}

impl ShardState {
    /// Hands a publication to the broker for the other nodes. `Ok` when
    /// there is no cluster, or the broker took it.
    pub(super) fn send_to_other_nodes(
        &mut self,
        kind: IndexKind,
        name: &str,
        topic: Option<&str>,
        frame: Bytes,
    ) -> Result<(), LocalOnly> {
        let (Some(broker), Some(status)) = (self.shared.bus.broker(), &self.shared.cluster) else {
            return Ok(());
        };
        if !status.is_up() {
            ClusterStatus::count(&status.stats.refused_total);
            return Err(LocalOnly::ClusterDown);
        }
        let status = status.clone();
        let held = frame.len();
        if !status.hold(held) {
            return Err(LocalOnly::RedisBehind);
        }
        let envelope = Envelope::ForNodes {
            seq: status.next_seq(),
            kind,
            name: self.interned(kind, name),
            topic: topic.map(|t| self.interned(IndexKind::Topic, t)),
            frame,
        };
        if self.forward(broker, envelope) {
            Ok(())
        } else {
            status.release(held);
            ClusterStatus::count(&status.stats.drops_total);
            Err(LocalOnly::BrokerBusy)
        }
    }

    /// Counts `bytes` of a stream publication for `home` against the
    /// node's bound on bytes waiting for Redis, when `home` is the broker.
    pub(super) fn hold_for_broker(&self, home: ShardId, bytes: usize) -> Result<(), LocalOnly> {
        match &self.shared.cluster {
            Some(status) if self.shared.bus.broker() == Some(home) => {
                if status.hold(bytes) {
                    Ok(())
                } else {
                    Err(LocalOnly::RedisBehind)
                }
            }
            _ => Ok(()),
        }
    }

    /// Gives back what `hold_for_broker` counted: the broker never got it.
    pub(super) fn release_for_broker(&self, home: ShardId, bytes: usize) {
        if let Some(status) = &self.shared.cluster {
            if self.shared.bus.broker() == Some(home) {
                status.release(bytes);
            }
        }
    }

    /// Whether this node is in a cluster it cannot reach now.
    pub(super) fn cluster_degraded(&self) -> bool {
        self.shared.cluster.as_ref().is_some_and(|c| !c.is_up())
    }

    /// The `subscribed` reply for a plain topic, saying when the node
    /// cannot reach the cluster (publications from other nodes wait).
    pub(super) fn subscribed_reply(&self, topic: &str) -> Bytes {
        if self.cluster_degraded() {
            crate::protocol::message::subscribed_degraded(topic)
        } else {
            crate::protocol::message::subscribed(topic)
        }
    }

    /// `name` as the index `kind` holds it, if it does (no allocation).
    fn interned(&self, kind: IndexKind, name: &str) -> Arc<str> {
        let index = self.index(kind);
        match index.lookup(name) {
            Some(id) => index.entry(id).name.clone(),
            None => Arc::from(name),
        }
    }

    /// Members of the bus that keep an index of this shard's names: the
    /// other shards and, in a cluster, the broker (it subscribes the node to
    /// a name's Redis channel while any shard holds it).
    pub(super) fn interest_peers(&self) -> usize {
        self.shared.bus.members() - 1
    }

    /// Sends an interest notice (or a registry change) to every other
    /// member of the bus.
    pub(super) fn broadcast_interest(&mut self, make: impl Fn() -> Envelope) {
        for to in 0..self.shared.bus.members() {
            if to != self.id.0 {
                self.post_control(crate::bus::ShardId(to), make());
            }
        }
    }
}
