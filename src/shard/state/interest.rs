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
use crate::shard::key::ConnKey;

use super::names::{NameId, NameIndex, NameLimit};
use super::ShardState;

impl ShardState {
    pub(super) fn index(&self, kind: IndexKind) -> &NameIndex {
        match kind {
            IndexKind::Topic => &self.topics,
            IndexKind::User => &self.users,
            IndexKind::Chat => &self.chatters,
        }
    }

    pub(super) fn index_mut(&mut self, kind: IndexKind) -> &mut NameIndex {
        match kind {
            IndexKind::Topic => &mut self.topics,
            IndexKind::User => &mut self.users,
            IndexKind::Chat => &mut self.chatters,
        }
    }

    /// Adds connection `key` under `name`. Returns the entry and, if the
    /// connection is active already, its position; `None` means it waits for
    /// other shards' acknowledgements (see [`ShardState::on_interest_ack`]),
    /// or, when `activate` is false (a stream's subscriber, which its home
    /// must open first), that it waits in any case.
    pub(super) fn join_index(
        &mut self,
        kind: IndexKind,
        key: ConnKey,
        name: &str,
        activate: bool,
    ) -> Result<(NameId, Option<u32>), NameLimit> {
        let peers = self.interest_peers();
        let first_epoch = self.next_epoch;
        let id = self.index_mut(kind).get_or_insert(name, true)?;
        let entry = self.index(kind).entry(id);
        if entry.local_count() == 0 {
            self.tell_webhooks(kind, entry.name.clone(), true);
        }
        let index = self.index_mut(kind);
        let entry = index.entry_mut(id);
        if entry.local_count() == 0 && peers > 0 {
            entry.epoch = first_epoch;
            entry.acks_pending = peers;
            entry.waiting.push(key);
            let name = entry.name.clone();
            self.next_epoch += 1;
            self.broadcast_interest(|| Envelope::Interest {
                kind,
                name: name.clone(),
                on: true,
                epoch: first_epoch,
            });
            return Ok((id, None));
        }
        if entry.acks_pending > 0 || !activate {
            entry.waiting.push(key);
            return Ok((id, None));
        }
        let pos = index.add_subscriber(id, key);
        Ok((id, Some(pos)))
    }

    /// Removes connection `key` from entry `id` (active at `pos`, or waiting),
    /// telling other shards when this shard lost its last holder.
    pub(super) fn leave_index(
        &mut self,
        kind: IndexKind,
        key: ConnKey,
        id: NameId,
        pos: Option<u32>,
    ) {
        let index = self.index_mut(kind);
        let moved = match pos {
            Some(pos) => index.remove_subscriber(id, pos).map(|moved| (moved, pos)),
            None => {
                index.remove_waiting(id, key);
                None
            }
        };
        if let Some((moved, pos)) = moved {
            self.set_position(kind, moved, id, pos);
        }
        let peers = self.interest_peers();
        let index = self.index_mut(kind);
        let entry = index.entry_mut(id);
        if entry.local_count() == 0 {
            entry.acks_pending = 0;
            let (name, epoch) = (entry.name.clone(), entry.epoch);
            self.tell_webhooks(kind, name.clone(), false);
            let index = self.index_mut(kind);
            if index.remove_if_unused(id) && kind == IndexKind::Topic {
                self.topic_released(&name);
            }
            if peers > 0 {
                self.broadcast_interest(|| Envelope::Interest {
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
    fn set_position(&mut self, kind: IndexKind, conn: ConnKey, id: NameId, pos: u32) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        match kind {
            IndexKind::Topic => {
                if let Some(sub) = c.subs.iter_mut().find(|s| s.topic == id) {
                    sub.set_pos(pos);
                }
            }
            IndexKind::User | IndexKind::Chat => {
                let ident = c.identity.as_mut().and_then(|i| i.ident.as_mut());
                if let Some(ident) = ident.filter(|i| i.entry == id) {
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
        let gone = self.index_mut(kind).set_remote_interest(&name, from, on);
        if gone && kind == IndexKind::Topic {
            self.topic_released(&name);
        }
        self.update_topic_gauge();
        if on {
            self.post_control(from, Envelope::InterestAck { kind, name, epoch });
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
        let name = entry.name.clone();
        if kind == IndexKind::Topic && self.stream_history(&name).is_some() {
            // A stream's subscribers stay waiting until their home opens them.
            let waiting = self.topics.entry(id).waiting.clone();
            for conn in waiting {
                self.open_stream(conn, id);
            }
            return;
        }
        let waiting = std::mem::take(&mut self.index_mut(kind).entry_mut(id).waiting);
        // Every waiting connection is active before any is told: finishing
        // an identified upgrade reads the input it parked, which may close
        // that connection and take it (and perhaps the entry) out of the
        // index while the others would still be outside it.
        for &conn in &waiting {
            let pos = self.index_mut(kind).add_subscriber(id, conn);
            self.set_position(kind, conn, id, pos);
        }
        for conn in waiting {
            match kind {
                IndexKind::Topic => self.send(conn, self.subscribed_reply(&name)),
                IndexKind::User | IndexKind::Chat => self.finish_upgrade(conn),
            }
        }
    }
}
