//! Registrations across nodes, the broker's decisions: `POST /register` on
//! one node, `/ws/{id}` on another, `DELETE /register/{id}` on a third.
//!
//! Every shard of every node keeps every registration (as on one node). A
//! registration lives in Redis as the hash `{prefix}:reg:{id}` (`u` user,
//! `t` topics as JSON), and each change is announced on the channel
//! `{prefix}:ctl`; each node's broker hands the other nodes' changes to its
//! shards as `Register`/`Unregister` envelopes. The registering shard's
//! answer (`201`, `204`) waits for the broker's acknowledgement, which comes
//! when the broker hears its own announcement back from Redis: by then Redis
//! has delivered it to every node. A node that connects (or reconnects)
//! loads every registration from Redis, and Redis is the truth: what the
//! node knew and Redis no longer holds (deleted by another node while this
//! one was away, or lost by a Redis restarted without persistence) is
//! dropped on every shard, so every node answers `/ws/{id}` alike.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::{Envelope, ShardId};

use super::{BrokerState, Op};

/// An announcement on the control channel.
#[derive(Serialize, Deserialize)]
struct Notice {
    /// The announcing node's id.
    node: u64,
    /// The registration id.
    id: String,
    /// Set for a registration, absent for a deletion.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
}

/// A registration to store (`registration` set: user and topics) or delete
/// in Redis, then announce with `notice` on the control channel.
pub(in crate::cluster) struct RegistryWrite {
    pub(in crate::cluster) from: ShardId,
    pub(in crate::cluster) ticket: u64,
    pub(in crate::cluster) id: String,
    pub(in crate::cluster) registration: Option<(String, Vec<String>)>,
    pub(in crate::cluster) notice: String,
}

/// Registry changes waiting for their announcement to come back, and the
/// registrations the node's shards were told of.
#[derive(Default)]
pub(super) struct Pending {
    /// Registration id -> (shard, ticket) to acknowledge.
    acks: HashMap<String, Vec<(ShardId, u64)>>,
    /// Every registration id the shards hold (bounded like them, by
    /// `max_registrations`).
    known: HashSet<Arc<str>>,
    /// The last load was cut short: load again.
    pub(super) reload: bool,
}

/// The control channel's name.
pub(in crate::cluster) fn control_channel(prefix: &str) -> String {
    format!("{prefix}:ctl")
}

impl BrokerState {
    /// A shard registered `id`: store it, announce it, acknowledge on echo.
    pub(super) fn on_register(
        &mut self,
        from: ShardId,
        ticket: u64,
        id: Arc<str>,
        user: Arc<str>,
        topics: Arc<[String]>,
    ) {
        self.registry.known.insert(id.clone());
        self.change_registry(from, ticket, &id, Some((user.to_string(), topics.to_vec())));
    }

    /// A shard deleted `id`: delete it, announce it, acknowledge on echo.
    pub(super) fn on_unregister(&mut self, from: ShardId, ticket: u64, id: Arc<str>) {
        self.registry.known.remove(&id);
        self.change_registry(from, ticket, &id, None);
    }

    /// Stores or deletes registration `id` in Redis and announces it;
    /// shard `from` is acknowledged when the announcement comes back, or at
    /// once if Redis fails.
    fn change_registry(
        &mut self,
        from: ShardId,
        ticket: u64,
        id: &str,
        registration: Option<(String, Vec<String>)>,
    ) {
        self.registry
            .acks
            .entry(id.to_string())
            .or_default()
            .push((from, ticket));
        let notice = Notice {
            node: self.node,
            id: id.to_string(),
            user: registration.as_ref().map(|(user, _)| user.clone()),
            topics: registration
                .as_ref()
                .map(|(_, topics)| topics.clone())
                .unwrap_or_default(),
        };
        self.ops.push(Op::WriteRegistration(RegistryWrite {
            from,
            ticket,
            id: id.to_string(),
            registration,
            notice: serde_json::to_string(&notice).unwrap_or_default(),
        }));
    }

    /// An announcement from the control channel.
    pub(super) fn on_notice(&mut self, text: &[u8]) {
        let Ok(notice) = serde_json::from_slice::<Notice>(text) else {
            return;
        };
        if notice.node == self.node {
            // Our own, back from Redis: every node has been sent it.
            for (shard, ticket) in self.registry.acks.remove(&notice.id).unwrap_or_default() {
                self.send(shard, Envelope::Ack { ticket });
            }
            return;
        }
        match notice.user {
            Some(user) => self.tell_shards_registered(&notice.id, &user, notice.topics),
            None => self.tell_shards_unregistered(Arc::from(notice.id)),
        }
    }

    fn tell_shards_unregistered(&mut self, id: Arc<str>) {
        self.registry.known.remove(&id);
        self.tell_every_shard(|| Envelope::Unregister {
            ticket: 0,
            id: id.clone(),
        });
    }

    fn tell_shards_registered(&mut self, id: &str, user: &str, topics: Vec<String>) {
        let (id, user): (Arc<str>, Arc<str>) = (Arc::from(id), Arc::from(user));
        self.registry.known.insert(id.clone());
        let topics: Arc<[String]> = topics.into();
        self.tell_every_shard(|| Envelope::Register {
            ticket: 0,
            id: id.clone(),
            user: user.clone(),
            topics: topics.clone(),
        });
    }

    /// Queues a registry change from another node to every shard (their
    /// acknowledgements are not waited for).
    fn tell_every_shard(&mut self, make: impl Fn() -> Envelope) {
        for to in 0..self.shards {
            self.send(ShardId(to), make());
        }
    }

    /// Storing or deleting failed: acknowledge anyway (the shard answers;
    /// other nodes may not know).
    pub(super) fn on_registry_failed(&mut self, from: ShardId, ticket: u64) {
        for acks in self.registry.acks.values_mut() {
            acks.retain(|&(s, t)| (s, t) != (from, ticket));
        }
        self.registry.acks.retain(|_, acks| !acks.is_empty());
        self.send(from, Envelope::Ack { ticket });
    }

    /// Registrations read from Redis after a connection; only a complete
    /// read may drop registrations.
    pub(super) fn on_registrations_loaded(
        &mut self,
        registrations: Vec<(String, String, Vec<String>)>,
        complete: bool,
    ) {
        // A read cut short (an error, a timeout) is made again at the next
        // health check; what it found counts meanwhile.
        self.registry.reload = !complete;
        if complete {
            // Redis is the truth; a change of this node's still on its way
            // there is not judged by a read that missed it.
            let loaded: HashSet<&str> = registrations.iter().map(|(id, ..)| id.as_str()).collect();
            let gone: Vec<Arc<str>> = self
                .registry
                .known
                .iter()
                .filter(|id| !loaded.contains(&***id) && !self.registry.acks.contains_key(&***id))
                .cloned()
                .collect();
            if !gone.is_empty() {
                tracing::info!(
                    "cluster: {} registrations this node knew are not in Redis: dropped",
                    gone.len()
                );
            }
            for id in gone {
                self.tell_shards_unregistered(id);
            }
        }
        for (id, user, topics) in registrations {
            self.tell_shards_registered(&id, &user, topics);
        }
    }
}
