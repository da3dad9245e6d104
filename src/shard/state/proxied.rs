//! Subscriptions waiting for the application backend's verdict (the
//! subscribe proxy, see `crate::proxy`). The connection goes on meanwhile:
//! a waiting subscription counts against its subscription limit, an
//! `unsubscribe` (or a `{"topics":[..]}` without the topic) cancels it,
//! and the verdict either makes the subscription as if it had just been
//! asked for, or answers an `error` naming the topic.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::event_stream::Format;
use crate::protocol::message::Since;
use crate::proxy::{Call, Verdict};
use crate::shard::key::ConnKey;

use super::conn::{Closing, Phase};
use super::ShardState;

/// The shard's calls in flight, by ticket.
#[derive(Default)]
pub(super) struct Proxied {
    next_ticket: u64,
    waiting: HashMap<u64, Waiting>,
}

/// A subscription the backend has been asked about.
struct Waiting {
    key: ConnKey,
    topic: Arc<str>,
    since: Option<Since>,
    /// Unsubscribed meanwhile: the verdict is thrown away. (The entry
    /// stays until then, so `max_in_flight` counts calls truly running.)
    cancelled: bool,
}

impl ShardState {
    /// Subscriptions of connection `key` waiting for a verdict.
    pub(super) fn proxied_count(&self, key: ConnKey) -> usize {
        self.proxied
            .waiting
            .values()
            .filter(|w| w.key == key && !w.cancelled)
            .count()
    }

    /// Asks the backend whether connection `key` may subscribe to `topic`;
    /// the subscription waits for the verdict. Refused at once when the
    /// shard has `max_in_flight` calls outstanding.
    pub(super) fn ask_backend(&mut self, key: ConnKey, topic: &str, since: Option<Since>) {
        let (Some(sink), Some(config)) = (self.shared.proxy.clone(), self.config().proxy.as_ref())
        else {
            debug_assert!(false, "a subscribe proxy without [proxy]");
            return;
        };
        let waiting_already = self
            .proxied
            .waiting
            .values()
            .any(|w| w.key == key && !w.cancelled && *w.topic == *topic);
        if waiting_already {
            return;
        }
        if self.proxied.waiting.len() >= config.max_in_flight {
            sink.stats.busy_total.fetch_add(1, Ordering::Relaxed);
            return self.send_error(
                key,
                &format!("server busy: cannot ask the backend about `{topic}` now, try again"),
            );
        }
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let transport = match &conn.phase {
            Phase::WebSocket(_) => "websocket",
            Phase::Stream(stream) if stream.format == Format::Sse => "sse",
            Phase::Stream(_) => "ndjson",
            Phase::Http(_) => "http",
        };
        let body = serde_json::json!({
            "client": self.conn_id(key),
            "transport": transport,
            "user": conn.user().map(|u| &**u),
            "topic": topic,
        });
        self.proxied.next_ticket += 1;
        let ticket = self.proxied.next_ticket;
        self.proxied.waiting.insert(
            ticket,
            Waiting {
                key,
                topic: Arc::from(topic),
                since,
                cancelled: false,
            },
        );
        sink.call(Call {
            shard: self.id,
            ticket,
            body: Bytes::from(body.to_string()),
        });
    }

    /// Cancels connection `key`'s waiting subscriptions whose topic `drop`
    /// names.
    pub(super) fn cancel_proxied(&mut self, key: ConnKey, drop: impl Fn(&str) -> bool) {
        for waiting in self.proxied.waiting.values_mut() {
            if waiting.key == key && drop(&waiting.topic) {
                waiting.cancelled = true;
            }
        }
    }

    /// The backend's verdict on the subscription under `ticket`.
    pub(super) fn on_proxy_verdict(&mut self, ticket: u64, verdict: Verdict) {
        let Some(waiting) = self.proxied.waiting.remove(&ticket) else {
            debug_assert!(false, "a verdict on no call");
            return;
        };
        let open = self
            .conns
            .get(waiting.key)
            .is_some_and(|c| c.closing == Closing::No);
        if waiting.cancelled || !open {
            return;
        }
        let Waiting {
            key, topic, since, ..
        } = waiting;
        match verdict {
            Verdict::Allowed => self.subscribe_allowed(key, &topic, since),
            Verdict::Refused { code, message } => {
                let because = if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                };
                self.send_error(
                    key,
                    &format!("subscription to `{topic}` refused by the backend ({code}){because}"),
                );
            }
            Verdict::Failed(reason) => self.send_error(
                key,
                &format!(
                    "subscription to `{topic}` refused: the backend gave no verdict ({reason})"
                ),
            ),
        }
    }
}
