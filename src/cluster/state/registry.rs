//! Registrations across nodes, the broker's decisions: `POST /register` on
//! one node, `/ws/{id}` on another, `DELETE /register/{id}` on a third.
//!
//! Every shard of every node keeps every registration (as on one node). A
//! registration lives in Redis as the hash `{prefix}:reg:{id}` (`u` user,
//! `t` topics as JSON), and each change is announced on the channel
//! `{prefix}:ctl`; each node's broker hands the other nodes' changes to its
//! shards as `Register`/`Unregister` envelopes. The registering shard's
//! answer (`201`, `204`) waits for the broker's acknowledgement, which comes
//! when Redis answers the announcement's `SPUBLISH`: Redis has written it to
//! every node's connection by then. (Waiting to hear the announcement back
//! instead would wait for ever whenever this node's own subscription to
//! the control channel was being restored.) A node that connects (or reconnects)
//! loads every registration from Redis, and Redis is the truth: what the
//! node knew and Redis no longer holds (deleted by another node while this
//! one was away, or lost by a Redis restarted without persistence) is
//! dropped on every shard, so every node answers `/ws/{id}` alike.

use std::collections::{HashMap, HashSet, VecDeque};
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
    /// The announcing node's number for this write: its own announcement
    /// is applied only if it is its latest write of the id.
    #[serde(default)]
    seq: u64,
}

/// A registration to store (`registration` set: user and topics) or delete
/// in Redis, then announce with `notice` on the control channel.
pub(in crate::cluster) struct RegistryWrite {
    pub(in crate::cluster) from: ShardId,
    pub(in crate::cluster) ticket: u64,
    pub(in crate::cluster) id: String,
    pub(in crate::cluster) registration: Option<(String, Vec<String>)>,
    pub(in crate::cluster) notice: String,
    /// This node's number for the write (in its notice too).
    pub(in crate::cluster) seq: u64,
}

/// Registry changes on their way to Redis, and the registrations the
/// node's shards were told of.
#[derive(Default)]
pub(super) struct Pending {
    /// Registration id -> its writes in flight.
    writing: HashMap<String, usize>,
    /// Every registration id the shards hold (bounded like them, by
    /// `max_registrations`).
    known: HashSet<Arc<str>>,
    /// The last load was cut short: load again.
    pub(super) reload: bool,
    /// Registry changes seen so far (this node's writes and the others'
    /// announcements), and the latest of each id's: a load answers with
    /// what Redis held when it ran, and an announcement read before its
    /// answer (on the other connection) or a write of this node's since it
    /// was asked for is newer, so the load does not judge that id.
    changes: u64,
    changed: HashMap<String, u64>,
    /// Loads asked for and not answered.
    loading: usize,
    /// Writes waiting: one goes to Redis at a time, so this node's
    /// announcements come back in the order it made them.
    queue: VecDeque<RegistryWrite>,
    /// The write in flight: its id and number.
    in_flight: Option<(String, u64)>,
    /// Writes made so far, and the latest per id not yet announced back.
    writes: u64,
    latest: HashMap<String, u64>,
}

impl Pending {
    /// Registration `id` changed (a write of this node's, or another's
    /// announcement): remembered while a load is on its way.
    fn changed(&mut self, id: &str) {
        self.changes += 1;
        if self.loading > 0 {
            self.changed.insert(id.to_string(), self.changes);
        }
    }
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
    /// shard `from` is acknowledged when Redis answers.
    fn change_registry(
        &mut self,
        from: ShardId,
        ticket: u64,
        id: &str,
        registration: Option<(String, Vec<String>)>,
    ) {
        *self.registry.writing.entry(id.to_string()).or_default() += 1;
        self.registry.changed(id);
        self.registry.writes += 1;
        let seq = self.registry.writes;
        self.registry.latest.insert(id.to_string(), seq);
        let notice = Notice {
            node: self.node,
            id: id.to_string(),
            user: registration.as_ref().map(|(user, _)| user.clone()),
            topics: registration
                .as_ref()
                .map(|(_, topics)| topics.clone())
                .unwrap_or_default(),
            seq,
        };
        self.registry.queue.push_back(RegistryWrite {
            from,
            ticket,
            id: id.to_string(),
            registration,
            notice: serde_json::to_string(&notice).unwrap_or_default(),
            seq,
        });
        self.write_next_registration();
    }

    /// Sends the next registry write if none is in flight.
    fn write_next_registration(&mut self) {
        if self.registry.in_flight.is_some() {
            return;
        }
        if let Some(write) = self.registry.queue.pop_front() {
            self.registry.in_flight = Some((write.id.clone(), write.seq));
            self.ops.push(Op::WriteRegistration(write));
        }
    }

    /// An announcement from the control channel.
    pub(super) fn on_notice(&mut self, text: &[u8]) {
        let Ok(notice) = serde_json::from_slice::<Notice>(text) else {
            return;
        };
        if notice.node == self.node {
            // Our own, back from Redis in the order Redis ran it among the
            // others' (another node may have changed the id meanwhile): it
            // is applied again, unless a later write of ours is on its way.
            match self.registry.latest.get(&notice.id) {
                Some(&latest) if latest != notice.seq => return,
                Some(_) => {
                    self.registry.latest.remove(&notice.id);
                }
                None => {}
            }
        }
        self.registry.changed(&notice.id);
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

    /// Redis answered a registry write: the shard answers its client.
    /// One that failed is acknowledged too (the shard answers; other nodes
    /// may not know), and Redis may have run it or not: the registrations
    /// are read again at the next health check, so this node ends up
    /// knowing what Redis holds.
    pub(super) fn on_registry_written(&mut self, from: ShardId, ticket: u64, id: &str, ok: bool) {
        let written = self.registry.in_flight.take();
        debug_assert!(
            written.as_ref().is_some_and(|(w, _)| w == id),
            "the write answered is the one in flight"
        );
        if let (false, Some((id, seq))) = (ok, written) {
            // Its announcement may never come: it no longer hides an
            // earlier one.
            if self.registry.latest.get(&id) == Some(&seq) {
                self.registry.latest.remove(&id);
            }
        }
        self.write_next_registration();
        if let Some(writing) = self.registry.writing.get_mut(id) {
            *writing -= 1;
            if *writing == 0 {
                self.registry.writing.remove(id);
            }
        }
        if !ok {
            self.registry.reload = true;
        }
        self.send(from, Envelope::Ack { ticket });
    }

    /// Asks Redis for every registration.
    pub(super) fn load_registrations(&mut self) {
        self.registry.loading += 1;
        let after = self.registry.changes;
        self.ops.push(Op::LoadRegistrations { after });
    }

    /// Registrations read from Redis (asked for when this node had seen
    /// `after` changes); only a complete read may drop registrations, and
    /// none judges an id changed since it was asked for.
    pub(super) fn on_registrations_loaded(
        &mut self,
        after: u64,
        mut registrations: Vec<(String, String, Vec<String>)>,
        complete: bool,
    ) {
        debug_assert!(self.registry.loading > 0, "a load answered, never asked");
        self.registry.loading = self.registry.loading.saturating_sub(1);
        let changed = std::mem::take(&mut self.registry.changed);
        let newer = |id: &str| changed.get(id).is_some_and(|&at| at > after);
        registrations.retain(|(id, ..)| !newer(id));
        // A read cut short (an error, a timeout) is made again at the next
        // health check; what it found counts meanwhile.
        self.registry.reload |= !complete;
        if complete {
            // Redis is the truth; a change of this node's still on its way
            // there is not judged by a read that missed it.
            let loaded: HashSet<&str> = registrations.iter().map(|(id, ..)| id.as_str()).collect();
            let gone: Vec<Arc<str>> = self
                .registry
                .known
                .iter()
                .filter(|id| {
                    !loaded.contains(&***id)
                        && !self.registry.writing.contains_key(&***id)
                        && !newer(id)
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
        if self.registry.loading > 0 {
            // Kept for the loads still on their way.
            self.registry.changed = changed;
        }
    }
}
