//! Joining and leaving a shard's name indexes (topics, users, chat users) and
//! keeping other shards' routing in step.
//!
//! When a shard gains its first local holder of a name it tells every other
//! shard and parks the connection until all of them have acknowledged; only
//! then is the connection active (a topic subscriber gets `subscribed`, an
//! identified WebSocket gets its `101`). So whatever a client does after that
//! reply, traffic accepted anywhere from then on reaches it.

use std::sync::Arc;

use crate::bus::{Envelope, IndexKind, ShardId};
use crate::metrics::ShardStats;
use crate::protocol::message;

use super::topics::{ConnId, TopicId, TopicIndex, TopicLimit};
use super::Shard;

impl Shard {
    pub(super) fn index(&self, kind: IndexKind) -> &TopicIndex {
        match kind {
            IndexKind::Topic => &self.topics,
            IndexKind::User => &self.users,
            IndexKind::Chat => &self.chatters,
        }
    }

    pub(super) fn index_mut(&mut self, kind: IndexKind) -> &mut TopicIndex {
        match kind {
            IndexKind::Topic => &mut self.topics,
            IndexKind::User => &mut self.users,
            IndexKind::Chat => &mut self.chatters,
        }
    }

    /// Adds connection `key` under `name`. Returns the entry and, if the
    /// connection is active already, its position; `None` means it waits for
    /// other shards' acknowledgements (see [`Shard::on_interest_ack`]).
    pub(super) fn join_index(
        &mut self,
        kind: IndexKind,
        key: usize,
        name: &str,
    ) -> Result<(TopicId, Option<u32>), TopicLimit> {
        let shards = self.shared.bus.shards();
        let first_epoch = self.next_epoch;
        let index = self.index_mut(kind);
        let id = index.get_or_insert(name, true)?;
        let conn = ConnId(key as u32);
        let entry = index.entry_mut(id);
        if entry.local_count() == 0 && shards > 1 {
            entry.epoch = first_epoch;
            entry.acks_pending = shards - 1;
            entry.waiting.push(conn);
            let name = entry.name.clone();
            self.next_epoch += 1;
            self.broadcast_control(|| Envelope::Interest {
                kind,
                name: name.clone(),
                on: true,
                epoch: first_epoch,
            });
            return Ok((id, None));
        }
        if entry.acks_pending > 0 {
            entry.waiting.push(conn);
            return Ok((id, None));
        }
        let pos = index.add_subscriber(id, conn);
        Ok((id, Some(pos)))
    }

    /// Removes connection `key` from entry `id` (active at `pos`, or waiting),
    /// telling other shards when this shard lost its last holder.
    pub(super) fn leave_index(
        &mut self,
        kind: IndexKind,
        key: usize,
        id: TopicId,
        pos: Option<u32>,
    ) {
        let index = self.index_mut(kind);
        let moved = match pos {
            Some(pos) => index.remove_subscriber(id, pos).map(|moved| (moved, pos)),
            None => {
                index.remove_waiting(id, ConnId(key as u32));
                None
            }
        };
        if let Some((moved, pos)) = moved {
            self.set_position(kind, moved, id, pos);
        }
        let shards = self.shared.bus.shards();
        let index = self.index_mut(kind);
        let entry = index.entry_mut(id);
        if entry.local_count() == 0 {
            entry.acks_pending = 0;
            let (name, epoch) = (entry.name.clone(), entry.epoch);
            index.remove_if_unused(id);
            if shards > 1 {
                self.broadcast_control(|| Envelope::Interest {
                    kind,
                    name: name.clone(),
                    on: false,
                    epoch,
                });
            }
        }
        self.update_topic_gauge();
    }

    /// Records where connection `conn` now sits in entry `id`.
    fn set_position(&mut self, kind: IndexKind, conn: ConnId, id: TopicId, pos: u32) {
        let Some(c) = self.conns.get_mut(conn.0 as usize) else {
            return;
        };
        match kind {
            IndexKind::Topic => {
                if let Some(sub) = c.subs.iter_mut().find(|s| s.topic == id) {
                    sub.pos = Some(pos);
                }
            }
            IndexKind::User | IndexKind::Chat => {
                if let Some(ident) = c.ident.as_mut().filter(|i| i.entry == id) {
                    ident.pos = Some(pos);
                }
            }
        }
    }

    /// Another shard recorded or dropped interest in one of its names.
    pub(super) fn on_remote_interest(
        &mut self,
        from: ShardId,
        kind: IndexKind,
        name: Arc<str>,
        on: bool,
        epoch: u64,
    ) {
        self.index_mut(kind).set_remote_interest(&name, from, on);
        self.update_topic_gauge();
        if on {
            self.outbox.send(
                &self.shared.bus,
                from,
                Envelope::InterestAck { kind, name, epoch },
            );
            ShardStats::add(&self.stats().bus_sent_total, 1);
        }
    }

    /// Another shard acknowledged our interest notice; when the last one has,
    /// the waiting connections become active.
    pub(super) fn on_interest_ack(&mut self, kind: IndexKind, name: &str, epoch: u64) {
        let index = self.index_mut(kind);
        let Some(id) = index.lookup(name) else { return };
        let entry = index.entry_mut(id);
        if entry.epoch != epoch || entry.acks_pending == 0 {
            return;
        }
        entry.acks_pending -= 1;
        if entry.acks_pending > 0 {
            return;
        }
        let waiting = std::mem::take(&mut entry.waiting);
        let name = entry.name.clone();
        for conn in waiting {
            let pos = self.index_mut(kind).add_subscriber(id, conn);
            self.set_position(kind, conn, id, pos);
            let key = conn.0 as usize;
            match kind {
                IndexKind::Topic => self.send_frame(key, message::subscribed(&name)),
                IndexKind::User | IndexKind::Chat => self.finish_upgrade(key),
            }
        }
    }

    /// Sends a control envelope to every other shard; control is never dropped.
    pub(super) fn broadcast_control(&mut self, make: impl Fn() -> Envelope) {
        for to in 0..self.shared.bus.shards() {
            if to != self.id.0 {
                self.outbox.send(&self.shared.bus, ShardId(to), make());
                ShardStats::add(&self.stats().bus_sent_total, 1);
            }
        }
    }
}
