//! Stream topics on a shard, the subscriber side: opening a subscription at
//! its home, and replaying what the home sends page by page, paced by the
//! connection's outbound queue.
//!
//! A subscriber is added to the topic's subscribers only when its replay is
//! done. The open is sent once the home routes the topic to this shard
//! (interest acknowledged), so every publication after the position in an
//! answer follows the answer on the same ordered queue, and every one
//! before it is either in the replay or not owed: no gap, no duplicate, and
//! nothing live overtakes the replay.
//!
//! A replay larger than a page (a quarter of the outbound budget) goes one
//! page at a time: the next is asked for when the connection's queue has
//! drained to its mark (`Command::WatchDrain`), from the offset the last
//! page ended at, and the subscriber stays out of the live fan-out until a
//! page reaches the stream's head. Publications made meanwhile are read
//! from history with the rest, so a reader that reads gets everything its
//! stream still holds, exactly once, while the node holds no more than a
//! page for it. One replay per connection runs at a time; the others wait
//! their turn with only a position. A replay that falls so far behind that
//! what it still needs was evicted gets `subscribed` with
//! `"recovered":false` and goes on live from the head.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::Envelope;
use crate::engine::{Page, StreamLimit};
use crate::metrics::ShardStats;
use crate::protocol::message::{self, Since};
use crate::shard::key::ConnKey;

use super::conn::Closing;
use super::names::NameId;
use super::{Command, ShardState};

/// What a `StreamOpen` in flight asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenKind {
    /// A subscription's first page: its `subscribed` follows the answer.
    First,
    /// The next page of a replay under way.
    Next,
    /// A repeated subscribe of an active subscription: only the position.
    Restate,
}

/// A replay that still has pages to send: where it is.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    topic: Arc<str>,
    epoch: Arc<str>,
    /// The offset the next page follows.
    after: u64,
    /// Publications up to here are last values (sent marked).
    mark_through: u64,
}

/// A connection's replays: the one running, and those waiting their turn.
#[derive(Debug, Default)]
pub(crate) struct Replays {
    /// The replay whose pages are going out, and whether its next page has
    /// been asked for (else it waits for the connection to drain).
    running: Option<(Replay, bool)>,
    waiting: VecDeque<Replay>,
}

impl ShardState {
    /// Opens connection `key`'s subscription to stream topic `id`: asks the
    /// home for the position and the first page. The connection waits in
    /// the topic's waiting list until its replay is done.
    pub(super) fn open_stream(&mut self, key: ConnKey, id: NameId) {
        let name = self.topics.entry(id).name.clone();
        let since = self.conns.get_mut(key).and_then(|c| {
            c.subs
                .iter_mut()
                .find(|s| s.topic == id)
                .and_then(|s| s.since.take())
        });
        self.ask_home(key, name, since.map(|s| *s), 0, OpenKind::First);
    }

    /// Connection `key` subscribes again to stream topic `id`, which it
    /// holds: the answer is `subscribed` with the position its pushes have
    /// reached. The home knows it: every publication it assigned before
    /// answering was routed to this shard ahead of the answer, on the same
    /// ordered queue, and so was sent to the connection before the reply.
    pub(super) fn restate_stream_position(&mut self, key: ConnKey, id: NameId) {
        let name = self.topics.entry(id).name.clone();
        self.ask_home(key, name, None, 0, OpenKind::Restate);
    }

    /// Sends a `StreamOpen` to `topic`'s home, or answers it here when this
    /// shard is the home.
    fn ask_home(
        &mut self,
        key: ConnKey,
        topic: Arc<str>,
        since: Option<Since>,
        mark_through: u64,
        kind: OpenKind,
    ) {
        let Some(history) = self.stream_history(&topic) else {
            return;
        };
        if self.home_of(&topic) == self.id {
            let answer = self.home_open(&topic, &history, since.as_ref(), mark_through);
            return self.on_answer(key, &topic, kind, answer);
        }
        let ticket = self.stream_ticket();
        self.streams
            .opening
            .insert(ticket, (key, topic.clone(), kind));
        self.streams.opens_of.entry(key).or_default().push(ticket);
        let home = self.home_of(&topic);
        self.post_control(
            home,
            Envelope::StreamOpen {
                ticket,
                topic,
                since: since.map(|s| (s.offset, Arc::from(s.epoch.as_str()))),
                mark_through,
            },
        );
    }

    /// The home's answer arrived.
    pub(super) fn on_stream_opened(&mut self, ticket: u64, answer: Result<Box<Page>, StreamLimit>) {
        let Some((key, topic, kind)) = self.streams.opening.remove(&ticket) else {
            return; // its subscription was dropped meanwhile
        };
        self.forget_open(key, ticket);
        self.on_answer(key, &topic, kind, answer.map(|page| *page));
    }

    fn on_answer(
        &mut self,
        key: ConnKey,
        topic: &str,
        kind: OpenKind,
        answer: Result<Page, StreamLimit>,
    ) {
        let Some(id) = self.subscription(key, topic) else {
            return; // unsubscribed or closed while the home answered
        };
        let page = match answer {
            Ok(page) => page,
            Err(limit) => return self.refuse_stream(key, id, topic, limit),
        };
        let active = self
            .conns
            .get(key)
            .is_some_and(|c| c.subs.iter().any(|s| s.topic == id && s.pos().is_some()));
        match kind {
            OpenKind::Restate if active => {
                let position = &page.position;
                let reply = message::subscribed_at(
                    topic,
                    None,
                    position.offset,
                    &position.epoch,
                    self.cluster_degraded(),
                );
                self.send(key, reply)
            }
            // Opens of a subscription dropped meanwhile were cancelled.
            OpenKind::Restate => {}
            OpenKind::First if active => {}
            OpenKind::First => self.first_page(key, id, topic, page),
            OpenKind::Next => self.next_page(key, id, topic, page),
        }
    }

    /// The first page: `subscribed` with the position, then the page, now
    /// or when the connection's running replay is done.
    fn first_page(&mut self, key: ConnKey, id: NameId, topic: &str, page: Page) {
        match page.recovered {
            Some(true) => ShardStats::add(&self.stats().stream_recoveries_total, 1),
            Some(false) => ShardStats::add(&self.stats().stream_recovery_failures_total, 1),
            None => {}
        }
        let position = &page.position;
        let reply = message::subscribed_at(
            topic,
            page.recovered,
            position.offset,
            &position.epoch,
            self.cluster_degraded(),
        );
        self.send(key, reply);
        let busy = self
            .streams
            .replays
            .get(&key)
            .is_some_and(|r| r.running.is_some());
        if busy && !page.frames.is_empty() {
            // Its frames would pass the page this connection may queue:
            // ask again from where they started once its turn comes.
            let replay = Replay {
                topic: Arc::from(topic),
                epoch: page.position.epoch.clone(),
                after: page.after,
                mark_through: marked_through(&page, 0),
            };
            if let Some(replays) = self.streams.replays.get_mut(&key) {
                replays.waiting.push_back(replay);
            }
            return;
        }
        self.send_page(key, id, topic, page, 0, false);
    }

    /// A later page of the running replay.
    fn next_page(&mut self, key: ConnKey, id: NameId, topic: &str, page: Page) {
        let Some(replays) = self.streams.replays.get_mut(&key) else {
            return;
        };
        let Some((running, _)) = replays.running.take() else {
            return;
        };
        debug_assert_eq!(&*running.topic, topic, "a page of another replay");
        if page.recovered == Some(false) {
            // What the replay still needed was evicted before it could go
            // out: the client learns it as after a failed recovery.
            ShardStats::add(&self.stats().stream_recovery_failures_total, 1);
            let position = &page.position;
            let reply = message::subscribed_at(
                topic,
                Some(false),
                position.offset,
                &position.epoch,
                self.cluster_degraded(),
            );
            self.send(key, reply);
        }
        self.send_page(key, id, topic, page, running.mark_through, true);
    }

    /// Sends a page's frames; then either the subscriber goes live (the
    /// page reached the head; the connection's next replay starts if this
    /// was the running one) or its replay runs, waiting for the connection
    /// to drain before the next page.
    fn send_page(
        &mut self,
        key: ConnKey,
        id: NameId,
        topic: &str,
        page: Page,
        mark_through: u64,
        was_running: bool,
    ) {
        debug_assert!(
            !page.more || !page.frames.is_empty(),
            "a page that asks for more must carry something, or the replay never ends"
        );
        ShardStats::add(
            &self.stats().stream_replayed_total,
            page.frames.len() as u64,
        );
        let mark_through = marked_through(&page, mark_through);
        for (i, frame) in page.frames.into_iter().enumerate() {
            let frame = if i < page.marked {
                message::replayed(&frame).unwrap_or(frame)
            } else {
                frame
            };
            self.send(key, frame);
        }
        if !page.more {
            self.go_live(key, id);
            if was_running {
                self.start_next_replay(key);
            }
            return;
        }
        let replay = Replay {
            topic: Arc::from(topic),
            epoch: page.position.epoch,
            after: page.last,
            mark_through,
        };
        let replays = self.streams.replays.entry(key).or_default();
        replays.running = Some((replay, false));
        self.commands.push(Command::WatchDrain(key));
    }

    /// The connection drained to its mark: the running replay's next page.
    pub(super) fn on_drained(&mut self, key: ConnKey) {
        let Some(replays) = self.streams.replays.get_mut(&key) else {
            return;
        };
        let Some((replay, asked)) = replays.running.as_mut() else {
            return;
        };
        if *asked {
            return;
        }
        *asked = true;
        let since = Since {
            offset: replay.after,
            epoch: replay.epoch.to_string(),
        };
        let (topic, mark_through) = (replay.topic.clone(), replay.mark_through);
        self.ask_home(key, topic, Some(since), mark_through, OpenKind::Next);
    }

    /// Starts the connection's next waiting replay, if any, once it drains.
    /// A closing connection's replays are dropped with its subscriptions.
    fn start_next_replay(&mut self, key: ConnKey) {
        let open = self
            .conns
            .get(key)
            .is_some_and(|c| c.closing == Closing::No);
        let Some(replays) = self.streams.replays.get_mut(&key) else {
            return;
        };
        match replays.waiting.pop_front() {
            Some(next) if open => {
                replays.running = Some((next, false));
                self.commands.push(Command::WatchDrain(key));
            }
            _ => {
                self.streams.replays.remove(&key);
            }
        }
    }

    /// Moves a waiting subscriber of a stream into the topic's subscribers:
    /// live from here.
    fn go_live(&mut self, key: ConnKey, id: NameId) {
        let waiting = self
            .topics
            .get(id)
            .is_some_and(|e| e.waiting.contains(&key));
        if !waiting {
            return;
        }
        self.topics.remove_waiting(id, key);
        let pos = self.topics.add_subscriber(id, key);
        if let Some(sub) = self
            .conns
            .get_mut(key)
            .and_then(|c| c.subs.iter_mut().find(|s| s.topic == id))
        {
            sub.set_pos(pos);
        }
    }

    /// The home could not open the stream (its stream limit): the
    /// subscription is dropped and the client told why.
    fn refuse_stream(&mut self, key: ConnKey, id: NameId, topic: &str, limit: StreamLimit) {
        self.unsubscribe(key, id);
        self.send_error(key, &format!("cannot subscribe to `{topic}`: {limit}"));
    }

    /// Cancels connection `key`'s opens and replay of `topic`: its
    /// subscription is dropped, so their answers must find nothing.
    pub(super) fn cancel_stream_opens(&mut self, key: ConnKey, topic: &str) {
        if let Some(tickets) = self.streams.opens_of.get_mut(&key) {
            let opening = &mut self.streams.opening;
            tickets.retain(|ticket| {
                let of_topic = opening.get(ticket).is_some_and(|(_, t, _)| **t == *topic);
                if of_topic {
                    opening.remove(ticket);
                }
                !of_topic
            });
            if tickets.is_empty() {
                self.streams.opens_of.remove(&key);
            }
        }
        let Some(replays) = self.streams.replays.get_mut(&key) else {
            return;
        };
        replays.waiting.retain(|r| &*r.topic != topic);
        if replays
            .running
            .as_ref()
            .is_some_and(|(r, _)| &*r.topic == topic)
        {
            replays.running = None;
            self.start_next_replay(key);
        } else if replays.running.is_none() && replays.waiting.is_empty() {
            self.streams.replays.remove(&key);
        }
    }

    fn forget_open(&mut self, key: ConnKey, ticket: u64) {
        if let Some(tickets) = self.streams.opens_of.get_mut(&key) {
            tickets.retain(|t| *t != ticket);
            if tickets.is_empty() {
                self.streams.opens_of.remove(&key);
            }
        }
    }

    /// Whether connection `key` has a replay of `topic` running or waiting:
    /// it has had its `subscribed`.
    pub(super) fn replaying(&self, key: ConnKey, topic: &str) -> bool {
        self.streams.replays.get(&key).is_some_and(|r| {
            r.running
                .as_ref()
                .is_some_and(|(run, _)| &*run.topic == topic)
                || r.waiting.iter().any(|w| &*w.topic == topic)
        })
    }

    /// Connections with a replay under way or waiting, for `/metrics`.
    pub(super) fn replaying_connections(&self) -> usize {
        self.streams.replays.len()
    }
}

/// Where a replay's last values end after `page`. A page that is not a
/// recovery starts the replay afresh with last values up to the head it
/// answered with (if it has any); a recovered page goes on with the last
/// values the replay had.
fn marked_through(page: &Page, before: u64) -> u64 {
    match page.recovered {
        Some(true) => before,
        _ if page.marked > 0 => page.position.offset,
        _ => 0,
    }
}
