//! Subscriptions and client publications waiting for the application
//! backend's verdict (the subscribe and publish proxies, see
//! `crate::proxy`).
//!
//! A subscription does not hold the connection: it counts against the
//! connection's subscription limit while it waits, an `unsubscribe` (or a
//! `{"topics":[..]}` without the topic) cancels it, and the verdict makes
//! the subscription as if it had just been asked for, or answers an
//! `error` naming the topic. A publication parks the connection
//! (`Deferred::Publish`): its later input waits (bounded like any parked
//! connection's), so one client's publications go out in the order sent.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::protocol::event_stream::Format;
use crate::protocol::message::Since;
use crate::proxy::{Call, CallKind, Verdict};
use crate::shard::key::ConnKey;

use super::conn::{Closing, Deferred, Phase};
use super::streams::Published;
use super::ShardState;

/// The shard's calls in flight, by ticket.
#[derive(Default)]
pub(super) struct Proxied {
    next_ticket: u64,
    waiting: HashMap<u64, Waiting>,
}

/// A call in flight and who waits for it.
struct Waiting {
    key: ConnKey,
    /// What waits: a subscription (here), or a publication (parked on the
    /// connection as `Deferred::Publish`).
    subscription: Option<WaitingSubscription>,
}

struct WaitingSubscription {
    topic: Arc<str>,
    since: Option<Since>,
    /// Unsubscribed meanwhile: the verdict is thrown away. (The entry
    /// stays until then, so `max_in_flight` counts calls truly running.)
    cancelled: bool,
}

/// A client publication for the publish proxy.
pub(super) struct Publication<'a> {
    pub(super) topic: &'a str,
    pub(super) event: &'a str,
    pub(super) payload: &'a str,
    pub(super) idempotency_key: Option<&'a str>,
}

impl ShardState {
    /// Subscriptions of connection `key` waiting for a verdict.
    pub(super) fn proxied_count(&self, key: ConnKey) -> usize {
        if self.proxied.waiting.is_empty() {
            return 0;
        }
        self.proxied
            .waiting
            .values()
            .filter(|w| w.key == key)
            .filter(|w| w.subscription.as_ref().is_some_and(|s| !s.cancelled))
            .count()
    }

    /// Asks the backend whether connection `key` may subscribe to `topic`;
    /// the subscription waits for the verdict.
    pub(super) fn ask_to_subscribe(&mut self, key: ConnKey, topic: &str, since: Option<Since>) {
        let waiting_already = self.proxied.waiting.values().any(|w| {
            w.key == key
                && w.subscription
                    .as_ref()
                    .is_some_and(|s| !s.cancelled && *s.topic == *topic)
        });
        if waiting_already {
            return;
        }
        let subscription = WaitingSubscription {
            topic: Arc::from(topic),
            since,
            cancelled: false,
        };
        let body = |base: serde_json::Value| base;
        self.ask(key, CallKind::Subscribe, topic, Some(subscription), body);
    }

    /// Asks the backend to pass, rewrite or refuse `publication` from
    /// connection `key`, which is parked until the verdict.
    pub(super) fn ask_to_publish(&mut self, key: ConnKey, publication: Publication<'_>) {
        let Publication {
            topic,
            event,
            payload,
            idempotency_key,
        } = publication;
        let body = |mut base: serde_json::Value| {
            base["event"] = serde_json::Value::String(event.to_string());
            base["payload"] = serde_json::from_str::<&RawValue>(payload)
                .ok()
                .and_then(|raw| serde_json::to_value(raw).ok())
                .unwrap_or(serde_json::Value::Null);
            base
        };
        let Some(ticket) = self.ask(key, CallKind::Publish, topic, None, body) else {
            return;
        };
        self.park(
            key,
            Deferred::Publish {
                ticket,
                topic: topic.into(),
                event: event.into(),
                payload: payload.into(),
                idempotency_key: idempotency_key.map(Box::from),
            },
        );
    }

    /// Hands a call about `topic` to the proxy thread and records who waits
    /// for it; `None` (and an `error` to the client) when the shard has
    /// `max_in_flight` calls outstanding.
    fn ask(
        &mut self,
        key: ConnKey,
        kind: CallKind,
        topic: &str,
        subscription: Option<WaitingSubscription>,
        body: impl FnOnce(serde_json::Value) -> serde_json::Value,
    ) -> Option<u64> {
        let (Some(sink), Some(config)) = (self.shared.proxy.clone(), self.config().proxy.as_ref())
        else {
            self.send_error(
                key,
                &format!("`{topic}` needs the application backend, and no [proxy] is configured"),
            );
            return None;
        };
        if self.proxied.waiting.len() >= config.max_in_flight {
            sink.stats.busy_total.fetch_add(1, Ordering::Relaxed);
            self.send_error(
                key,
                &format!("server busy: cannot ask the backend about `{topic}` now, try again"),
            );
            return None;
        }
        let conn = self.conns.get(key)?;
        let transport = match &conn.phase {
            Phase::WebSocket(_) => "websocket",
            Phase::Stream(stream) if stream.format == Format::Sse => "sse",
            Phase::Stream(_) => "ndjson",
            Phase::Http(_) => "http",
        };
        let base = serde_json::json!({
            "client": self.conn_id(key),
            "transport": transport,
            "user": conn.user().map(|u| &**u),
            "topic": topic,
        });
        self.proxied.next_ticket += 1;
        let ticket = self.proxied.next_ticket;
        self.proxied
            .waiting
            .insert(ticket, Waiting { key, subscription });
        sink.call(Call {
            shard: self.id,
            ticket,
            kind,
            body: Bytes::from(body(base).to_string()),
        });
        Some(ticket)
    }

    /// Cancels connection `key`'s waiting subscriptions whose topic `drop`
    /// names.
    pub(super) fn cancel_proxied(&mut self, key: ConnKey, drop: impl Fn(&str) -> bool) {
        for waiting in self.proxied.waiting.values_mut() {
            if waiting.key != key {
                continue;
            }
            if let Some(subscription) = waiting.subscription.as_mut() {
                if drop(&subscription.topic) {
                    subscription.cancelled = true;
                }
            }
        }
    }

    /// The backend's verdict on the call under `ticket`.
    pub(super) fn on_proxy_verdict(&mut self, ticket: u64, verdict: Verdict) {
        let Some(Waiting { key, subscription }) = self.proxied.waiting.remove(&ticket) else {
            debug_assert!(false, "a verdict on no call");
            return;
        };
        match subscription {
            Some(subscription) => self.subscription_verdict(key, subscription, verdict),
            None => self.publication_verdict(key, ticket, verdict),
        }
    }

    fn subscription_verdict(
        &mut self,
        key: ConnKey,
        subscription: WaitingSubscription,
        verdict: Verdict,
    ) {
        let open = self
            .conns
            .get(key)
            .is_some_and(|c| c.closing == Closing::No);
        if subscription.cancelled || !open {
            return;
        }
        let WaitingSubscription { topic, since, .. } = subscription;
        match verdict {
            Verdict::Allowed { .. } => self.subscribe_allowed(key, &topic, since),
            refused => self.send_error(key, &refusal("subscription to", &topic, refused)),
        }
    }

    fn publication_verdict(&mut self, key: ConnKey, ticket: u64, verdict: Verdict) {
        let parked = self.take_deferred(
            key,
            |d| matches!(d, Deferred::Publish { ticket: t, .. } if *t == ticket),
        );
        // Gone: the connection closed meanwhile.
        let Some(Deferred::Publish {
            topic,
            event,
            payload,
            idempotency_key,
            ..
        }) = parked
        else {
            return;
        };
        match verdict {
            Verdict::Allowed { payload: rewritten } => {
                let payload = rewritten.as_deref().unwrap_or(&payload);
                let published =
                    self.publish(&topic, &event, payload, None, idempotency_key.as_deref());
                match published {
                    Published::LocalOnly { why, .. } => self.send_error(key, why.message()),
                    Published::Refused(_, why) => self.send_error(key, &why),
                    _ => {}
                }
            }
            refused => self.send_error(key, &refusal("publication to", &topic, refused)),
        }
        self.resume_input(key);
    }
}

/// The `error` a client gets for a refused subscription or publication.
fn refusal(what: &str, topic: &str, verdict: Verdict) -> String {
    match verdict {
        Verdict::Allowed { .. } => unreachable!("not a refusal"),
        Verdict::Refused { code, message } if message.is_empty() => {
            format!("{what} `{topic}` refused by the backend ({code})")
        }
        Verdict::Refused { code, message } => {
            format!("{what} `{topic}` refused by the backend ({code}): {message}")
        }
        Verdict::Failed(reason) => {
            format!("{what} `{topic}` refused: the backend gave no verdict ({reason})")
        }
    }
}
