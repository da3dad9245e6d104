//! What this shard tells the webhook thread: when it gains its first or
//! loses its last local holder of a topic or user, and when a user becomes
//! or stops being a presence member of a topic here (the user's first
//! tracked subscription to it on this shard, or its last one gone). The
//! thread sums the shards (see `crate::webhooks`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::IndexKind;
use crate::shard::key::ConnKey;
use crate::webhooks::{ClientEvent, Notice, Subject};

use super::names::NameId;
use super::ShardState;

/// Tracked subscriptions per (topic, user) on this shard, for member
/// events: at most one entry per tracked subscription, so bounded by the
/// connections' subscription limits.
pub(super) type Members = HashMap<(Arc<str>, Arc<str>), u32>;

impl ShardState {
    /// Tells the webhook thread this shard gained its first (`on`) or lost
    /// its last local holder of a topic or user, if it wants to know.
    pub(super) fn tell_webhooks(&self, kind: IndexKind, name: Arc<str>, on: bool) {
        let subject = match kind {
            IndexKind::Topic => Subject::Topic,
            IndexKind::User => Subject::User,
            IndexKind::Chat => return,
        };
        if let Some(sink) = self.shared.webhooks.as_ref().filter(|s| s.wants(subject)) {
            sink.notify(Notice {
                shard: self.id.0,
                subject,
                name,
                user: None,
                on,
            });
        }
    }

    /// Reports what connection `key` published, with `client_event`.
    pub(super) fn report_client_event(
        &self,
        key: ConnKey,
        topic: &str,
        event: &str,
        payload: &str,
    ) {
        let Some(sink) = self
            .shared
            .webhooks
            .as_ref()
            .filter(|s| s.wants_client_events())
        else {
            return;
        };
        sink.client_event(ClientEvent {
            topic: Arc::from(topic),
            event: event.into(),
            user: self.conns.get(key).and_then(|c| c.user()).cloned(),
            payload: payload.into(),
            socket_id: None,
        });
    }

    /// Reports a Pusher client event (its sender's socket id, and user on
    /// a presence channel), with `client_event`.
    pub(super) fn report_pusher_client_event(
        &self,
        socket_id: &str,
        user: Option<&str>,
        topic: &str,
        event: &str,
        data: &str,
    ) {
        let Some(sink) = self
            .shared
            .webhooks
            .as_ref()
            .filter(|s| s.wants_client_events())
        else {
            return;
        };
        sink.client_event(ClientEvent {
            topic: Arc::from(topic),
            event: event.into(),
            user: user.map(Arc::from),
            payload: data.into(),
            socket_id: Some(socket_id.into()),
        });
    }

    /// A Pusher cache channel had no event for a new subscriber, with
    /// `cache_miss`.
    pub(super) fn report_cache_miss(&self, topic: &str) {
        if let Some(sink) = self
            .shared
            .webhooks
            .as_ref()
            .filter(|s| s.wants_cache_misses())
        {
            sink.cache_miss(Arc::from(topic));
        }
    }

    /// Connection `key`'s subscription to `topic` became (`joined`) or
    /// stopped being a tracked presence member. Only a connection with a
    /// user id is a member the backend can name.
    pub(super) fn member_changed(&mut self, key: ConnKey, topic: NameId, joined: bool) {
        let Some(user) = self
            .conns
            .get(key)
            .and_then(|c| c.identity.as_ref())
            .and_then(|i| i.user.clone())
        else {
            return;
        };
        self.report_member(topic, user, joined);
    }

    /// `user` became (`joined`) or stopped being a presence member of
    /// `topic` through one more or one fewer subscription here: the shard's
    /// first and last are the webhook thread's transitions.
    pub(super) fn report_member(&mut self, topic: NameId, user: Arc<str>, joined: bool) {
        let Some(sink) = self
            .shared
            .webhooks
            .as_ref()
            .filter(|s| s.wants(Subject::Member))
        else {
            return;
        };
        let topic = self.topics.entry(topic).name.clone();
        let pair = (topic.clone(), user.clone());
        let count = self.webhook_members.entry(pair.clone()).or_insert(0);
        let transition = if joined {
            *count += 1;
            *count == 1
        } else {
            debug_assert!(*count > 0, "a member left that never joined");
            *count = count.saturating_sub(1);
            *count == 0
        };
        if *count == 0 {
            self.webhook_members.remove(&pair);
        }
        if transition {
            sink.notify(Notice {
                shard: self.id.0,
                subject: Subject::Member,
                name: topic,
                user: Some(user),
                on: joined,
            });
        }
    }
}
