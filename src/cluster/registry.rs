//! Registrations across nodes: `POST /register` on one node, `/ws/{id}` on
//! another, `DELETE /register/{id}` on a third.
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

use fred::prelude::*;
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::bus::{Envelope, ShardId};

use super::broker::Broker;

/// An announcement on the control channel.
#[derive(Serialize, Deserialize)]
pub(super) struct Notice {
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

/// What a registry task reports to the broker's loop.
pub(super) enum RegistryDone {
    /// Storing or deleting failed: acknowledge anyway (the shard answers;
    /// other nodes may not know).
    Failed { from: ShardId, ticket: u64 },
    /// Registrations read from Redis after a connection, and whether the
    /// read was complete (only a complete one may drop registrations).
    Loaded(Vec<(String, String, Vec<String>)>, bool),
}

/// The control channel's name.
pub(super) fn control_channel(prefix: &str) -> String {
    format!("{prefix}:ctl")
}

fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}:reg:{id}")
}

impl Broker {
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

    /// Stores (`Some`: user and topics) or deletes registration `id` in
    /// Redis and announces it; shard `from` is acknowledged when the
    /// announcement comes back, or at once if Redis fails.
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
        let (user, topics) = registration.unzip();
        let notice = Notice {
            node: self.node,
            id: id.to_string(),
            user,
            topics: topics.unwrap_or_default(),
        };
        let client = self.publisher.clone();
        let done = self.registry_done.clone();
        let key = key(&self.prefix, id);
        let channel = control_channel(&self.prefix);
        let text = serde_json::to_string(&notice).unwrap_or_default();
        tokio::spawn(async move {
            let written: Result<(), Error> = async {
                match &notice.user {
                    Some(user) => {
                        let topics = serde_json::to_string(&notice.topics).unwrap_or_default();
                        let fields = vec![("u", user.clone()), ("t", topics)];
                        let _: () = client.hset(&key, fields).await?;
                    }
                    None => {
                        let _: i64 = client.del(&key).await?;
                    }
                }
                let _: i64 = client.spublish(&channel, text).await?;
                Ok(())
            }
            .await;
            if let Err(e) = written {
                tracing::warn!("cluster: writing registration {} failed: {e}", notice.id);
                let _ = done.send(RegistryDone::Failed { from, ticket });
            }
        });
    }

    /// An announcement from the control channel.
    pub(super) fn on_notice(&mut self, text: &[u8]) {
        let Ok(notice) = serde_json::from_slice::<Notice>(text) else {
            return;
        };
        if notice.node == self.node {
            // Our own, back from Redis: every node has been sent it.
            for (shard, ticket) in self.registry.acks.remove(&notice.id).unwrap_or_default() {
                self.outbox.send(&self.bus, shard, Envelope::Ack { ticket });
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
        for to in 0..self.bus.shards() {
            self.outbox.send(&self.bus, ShardId(to), make());
        }
    }

    pub(super) fn on_registry_done(&mut self, done: RegistryDone) {
        match done {
            RegistryDone::Failed { from, ticket } => {
                for acks in self.registry.acks.values_mut() {
                    acks.retain(|&(s, t)| (s, t) != (from, ticket));
                }
                self.registry.acks.retain(|_, acks| !acks.is_empty());
                self.outbox.send(&self.bus, from, Envelope::Ack { ticket });
            }
            RegistryDone::Loaded(registrations, complete) => {
                // A read cut short (an error, a timeout) is made again at
                // the next health check; what it found counts meanwhile.
                self.registry.reload = !complete;
                if complete {
                    // Redis is the truth; a change of this node's still on
                    // its way there is not judged by a read that missed it.
                    let loaded: HashSet<&str> =
                        registrations.iter().map(|(id, ..)| id.as_str()).collect();
                    let gone: Vec<Arc<str>> = self
                        .registry
                        .known
                        .iter()
                        .filter(|id| {
                            !loaded.contains(&***id) && !self.registry.acks.contains_key(&***id)
                        })
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
    }

    /// Reads every registration from Redis (after a connection).
    pub(super) fn load_registrations(&self) {
        let client = self.publisher.clone();
        let done = self.registry_done.clone();
        let pattern = format!("{}:reg:*", self.prefix);
        let prefix_len = pattern.len() - 1;
        tokio::spawn(async move {
            let mut found = Vec::new();
            let mut complete = true;
            // A Redis Cluster keeps them on every master: scan them all.
            let mut pages = if client.is_clustered() {
                client.scan_cluster(pattern, Some(1000), None).boxed()
            } else {
                client.scan(pattern, Some(1000), None).boxed()
            };
            while let Some(page) = pages.next().await {
                let Ok(mut page) = page else {
                    complete = false;
                    break;
                };
                for key in page.take_results().unwrap_or_default() {
                    let Some(name) = key.as_str().map(|k| k.to_string()) else {
                        continue;
                    };
                    let fields: HashMap<String, String> = match client.hgetall(&name).await {
                        Ok(fields) => fields,
                        Err(_) => {
                            complete = false;
                            continue;
                        }
                    };
                    let (Some(user), topics) = (fields.get("u"), fields.get("t")) else {
                        continue;
                    };
                    let topics: Vec<String> = topics
                        .and_then(|t| serde_json::from_str(t).ok())
                        .unwrap_or_default();
                    found.push((name[prefix_len..].to_string(), user.clone(), topics));
                }
            }
            let _ = done.send(RegistryDone::Loaded(found, complete));
        });
    }
}

/// The broker's registry channel.
pub(super) fn channel() -> (
    mpsc::UnboundedSender<RegistryDone>,
    mpsc::UnboundedReceiver<RegistryDone>,
) {
    mpsc::unbounded_channel()
}
