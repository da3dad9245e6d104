//! Pusher presence channels on a shard. A member is a user, not a
//! connection: the core keeps each subscription's member as its presence
//! meta (so counts, pages and the cluster are the core's), and lists an app
//! topic's members by user (`MemberQuery::by_user`). Three steps make
//! Pusher's semantics:
//!
//! - **Joining.** A presence subscription is tracked only once the core has
//!   subscribed it (its publications reach it) and the channel has room:
//!   the core's `subscribed` starts a query of the members, and its answer
//!   either refuses (the app's `max_presence_members` reached, the user not
//!   among them) or tracks the member and sends
//!   `subscription_succeeded` with every member, this one included.
//! - **Member events.** Each channel has a home shard on the node, which
//!   counts each user's connections there (told by every shard, in order
//!   per shard): a user's first connection is `member_added` (not sent to
//!   that connection), its last one leaving is `member_removed`, so a user
//!   with several tabs is one member. In a cluster the broker records each
//!   such transition in Redis, which decides once for the cluster whether
//!   the user came or went (`cluster::state::member_events`), and tells a
//!   shard of the users of a node that died.
//! - **Leaving** is the core's: an unsubscribe or a close drops the meta.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::{Envelope, MemberQuery, Members};
use crate::metrics::ShardStats;
use crate::protocol::message;
use crate::pusher::{presence, wire};
use crate::shard::key::ConnKey;

use super::channels::PresenceThen;
use super::names::NameId;
use super::streams::Published;
use super::ShardState;

/// Presence channels' state on one shard.
#[derive(Default)]
pub(crate) struct PusherPresence {
    /// Subscriptions the core is subscribing, with the member each will
    /// be once it has (its meta), by connection and topic.
    joining: HashMap<(ConnKey, Arc<str>), Arc<str>>,
    /// On a channel's home: its users' connections on this node (a user
    /// at 0 stays until the broker answered its going).
    users: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    /// On a channel's home: the node's transitions the broker decides, by
    /// ticket.
    deciding: HashMap<u64, Transition>,
    next_ticket: u64,
}

/// A user's first connection on the node to a presence channel came
/// (`joined`), or its last went.
#[derive(Debug)]
struct Transition {
    topic: Arc<str>,
    user: Arc<str>,
    /// The member's meta, `{"user_id":U,"user_info":I}`.
    meta: Arc<str>,
    joined: bool,
    /// The joining connection's socket id: it is not told of itself.
    socket: Option<Box<str>>,
}

impl Transition {
    /// The event and its payload as the channel is told, without the
    /// joining connection (told by its `subscription_succeeded`).
    fn payload(&self) -> (&'static str, String) {
        let (event, data) = if self.joined {
            let data = presence::added_data(&self.meta);
            ("pusher_internal:member_added", data)
        } else {
            let data = presence::removed_data(&self.user);
            ("pusher_internal:member_removed", data)
        };
        let except = self.socket.as_deref().filter(|_| self.joined);
        (event, wire::payload(&data, except, None))
    }
}

impl PusherPresence {
    /// The connections a joining member waits for.
    pub(crate) fn joining_keys(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.joining.keys().map(|(key, _)| *key)
    }

    /// Bytes held: bounded by the subscriptions of presence channels.
    pub(crate) fn bytes(&self) -> usize {
        let joining: usize = self
            .joining
            .iter()
            .map(|((_, topic), meta)| topic.len() + meta.len() + 64)
            .sum();
        let users: usize = self
            .users
            .iter()
            .map(|(topic, users)| {
                topic.len() + 48 + users.keys().map(|u| u.len() + 40).sum::<usize>()
            })
            .sum();
        // Topic and user are shared with `users`.
        let deciding: usize = (self.deciding.values())
            .map(|t| t.meta.len() + t.socket.as_ref().map_or(0, |s| s.len()) + 96)
            .sum();
        joining + users + deciding
    }
}

/// Whether `topic` is an app's presence channel.
pub(super) fn is_presence(topic: &str) -> bool {
    wire::channel_of(topic).is_some_and(|c| c.starts_with("presence-"))
}

impl ShardState {
    /// A `pusher:subscribe` to a presence channel whose authorization
    /// held: the core subscribes it, and the member waits for that.
    pub(super) fn pusher_presence_subscribe(&mut self, key: ConnKey, topic: &str, meta: String) {
        let max = self.config().limits.max_presence_meta_bytes;
        if meta.len() > max {
            let channel = wire::channel_of(topic).unwrap_or_default();
            let why = format!("channel_data over {max} bytes");
            return self.send(key, wire::subscription_error(channel, &why));
        }
        let pending = (key, Arc::<str>::from(topic));
        let tracked = self.subscription(key, topic).is_some();
        if !tracked {
            self.pusher_presence
                .joining
                .insert(pending.clone(), meta.into());
        }
        self.subscribe(key, topic, None);
        if self.subscription(key, topic).is_none() {
            // Refused by the core (it told the client why).
            self.pusher_presence.joining.remove(&pending);
        }
    }

    /// The core subscribed connection `key` to presence channel `topic`:
    /// its members are gathered before it is told (and, on a presence
    /// cache channel with nothing kept, told so after).
    pub(super) fn pusher_presence_subscribed(
        &mut self,
        key: ConnKey,
        topic: &str,
        cache_miss: bool,
    ) {
        let Some(app) = self.app_of(key) else {
            return;
        };
        let joining = self
            .pusher_presence
            .joining
            .remove(&(key, Arc::from(topic)));
        if !self.presence_has_room() {
            ShardStats::add(&self.stats().presence_refused_total, 1);
            if let Some(id) = self.subscription(key, topic) {
                self.unsubscribe(key, id);
            }
            let channel = wire::channel_of(topic).unwrap_or_default();
            let why = "server busy: too many presence queries in flight, try again";
            return self.send(key, wire::subscription_error(channel, why));
        }
        let query = MemberQuery {
            limit: app.max_presence_members,
            by_user: true,
            ..MemberQuery::default()
        };
        let then = PresenceThen::PusherSucceeded {
            key,
            joining,
            cache_miss,
        };
        self.start_presence(topic, query, then);
    }

    /// The members of presence channel `topic` were gathered for
    /// connection `key`: it joins them (if `joining` is its member and the
    /// channel has room) and is told who is there.
    pub(super) fn pusher_presence_answered(
        &mut self,
        key: ConnKey,
        topic: &str,
        joining: Option<Arc<str>>,
        cache_miss: bool,
        members: &Members,
    ) {
        let (Some(app), Some(id)) = (self.app_of(key), self.subscription(key, topic)) else {
            return;
        };
        let channel = wire::channel_of(topic).unwrap_or_default().to_string();
        let mut metas: Vec<&str> = members.objects().collect();
        if let Some(meta) = &joining {
            // Listed by user: the ids are the members' user ids.
            let user = crate::bus::user_of(meta);
            let listed = members.list.iter().any(|(id, _)| Some(id) == user.as_ref());
            if !listed {
                if metas.len() >= app.max_presence_members {
                    ShardStats::add(&self.stats().presence_refused_total, 1);
                    self.unsubscribe(key, id);
                    let why = format!(
                        "The maximum members per presence channel ({}) was reached",
                        app.max_presence_members
                    );
                    return self.send(key, wire::subscription_limit(&channel, &why));
                }
                metas.push(meta);
            }
        }
        let data = presence::succeeded_data(metas.into_iter());
        self.send(key, wire::subscription_succeeded(&channel, &data));
        if cache_miss {
            self.send(key, wire::cache_miss_frame(&channel));
            self.report_cache_miss(topic);
        }
        if let Some(meta) = joining {
            let meta = self.presence.intern(meta.to_string());
            self.set_presence_meta(key, topic, Some(meta));
        }
    }

    /// Connection `key`'s member of `topic` came (`joined`) or went: the
    /// channel's home counts it.
    pub(super) fn pusher_member_changed(
        &mut self,
        key: ConnKey,
        topic: NameId,
        meta: &Arc<str>,
        joined: bool,
    ) {
        let name = self.topics.entry(topic).name.clone();
        if !is_presence(&name) {
            return;
        }
        let Some(user) = crate::bus::user_of(meta) else {
            debug_assert!(false, "a presence channel's member without a user id");
            return;
        };
        let socket = joined.then(|| self.socket_id(key).into_boxed_str());
        let home = self.shard_home_of(&name);
        let (meta, user) = (meta.clone(), Arc::<str>::from(user));
        // The app's webhooks count members as users too.
        self.report_member(topic, user.clone(), joined);
        if home == self.id {
            self.on_pusher_member(name, meta, user, joined, socket);
        } else {
            let envelope = Envelope::PusherMember {
                topic: name,
                meta,
                user,
                joined,
                socket,
            };
            self.post_control(home, envelope);
        }
    }

    /// On a channel's home: a user's connection on this node came or went.
    /// A user's first connection here, or its last going, is the node's
    /// transition; in a cluster the broker records it in Redis and says
    /// whether it is the cluster's.
    pub(super) fn on_pusher_member(
        &mut self,
        topic: Arc<str>,
        meta: Arc<str>,
        user: Arc<str>,
        joined: bool,
        socket: Option<Box<str>>,
    ) {
        let users = self.pusher_presence.users.entry(topic.clone()).or_default();
        let connections = users.entry(user.clone()).or_default();
        let transition = if joined {
            *connections += 1;
            *connections == 1
        } else {
            debug_assert!(*connections > 0, "a member left that never joined");
            *connections = connections.saturating_sub(1);
            *connections == 0
        };
        if !transition {
            return;
        }
        let transition = Transition {
            topic,
            user,
            meta,
            joined,
            socket,
        };
        let Some(broker) = self.shared.bus.broker() else {
            return self.member_decided(transition, true);
        };
        // A stream's pushes are ordered by its home: the shard publishes.
        let frame = self.stream_history(&transition.topic).is_none().then(|| {
            let (event, payload) = transition.payload();
            message::push(&transition.topic, event, &payload)
        });
        let ticket = self.pusher_presence.next_ticket;
        self.pusher_presence.next_ticket += 1;
        let envelope = Envelope::MemberTransition {
            ticket,
            topic: transition.topic.clone(),
            user: transition.user.clone(),
            meta: transition.meta.clone(),
            joined,
            frame,
        };
        self.pusher_presence.deciding.insert(ticket, transition);
        self.post_control(broker, envelope);
    }

    /// The broker decided transition `ticket`.
    pub(super) fn on_member_decided(&mut self, ticket: u64, tell: bool) {
        if let Some(transition) = self.pusher_presence.deciding.remove(&ticket) {
            self.member_decided(transition, tell);
        }
    }

    /// A transition was decided: a user at no connection is forgotten (if
    /// it did not come back meanwhile), and the channel is told if this
    /// shard is to tell it.
    fn member_decided(&mut self, transition: Transition, tell: bool) {
        let topic = &transition.topic;
        if !transition.joined {
            if let Some(users) = self.pusher_presence.users.get_mut(topic) {
                if users.get(&transition.user) == Some(&0) {
                    users.remove(&transition.user);
                }
                if users.is_empty() {
                    self.pusher_presence.users.remove(topic);
                }
            }
        }
        if tell {
            let (event, payload) = transition.payload();
            self.tell_members(topic, event, &payload);
        }
    }

    /// Users came or went for the whole cluster without a transition of
    /// this node's (the broker found them in Redis): the channel is told.
    pub(super) fn on_pusher_members_changed(
        &mut self,
        topic: &str,
        added: &[Arc<str>],
        removed: &[String],
    ) {
        for meta in added {
            let payload = wire::payload(&presence::added_data(meta), None, None);
            self.tell_members(topic, "pusher_internal:member_added", &payload);
        }
        for user in removed {
            let payload = wire::payload(&presence::removed_data(user), None, None);
            self.tell_members(topic, "pusher_internal:member_removed", &payload);
        }
    }

    /// Publishes a member event to the channel, on every node.
    fn tell_members(&mut self, topic: &str, event: &str, payload: &str) {
        if !self.accepting_publishes() {
            return;
        }
        match self.publish(topic, event, payload, None, None) {
            Published::LocalOnly { why, .. } => {
                tracing::debug!(
                    "pusher: a member event reached this node only: {}",
                    why.message()
                );
            }
            Published::Refused(_, why) => tracing::debug!("pusher: a member event refused: {why}"),
            Published::Done { .. } | Published::Parked => {}
        }
    }

    /// Forgets what waits for connection `key`'s subscriptions (it closed
    /// or left them).
    pub(super) fn forget_pusher_joining(&mut self, key: ConnKey, topic: &str) {
        if !self.pusher_presence.joining.is_empty() {
            self.pusher_presence
                .joining
                .remove(&(key, Arc::from(topic)));
        }
    }
}
