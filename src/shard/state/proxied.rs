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
    what: WaitingFor,
}

/// What waits for a verdict.
pub(super) enum WaitingFor {
    /// A subscription (here: the connection goes on meanwhile).
    Subscription(WaitingSubscription),
    /// A publication, parked on the connection as `Deferred::Publish`.
    Publication,
    /// A connection's request, parked on it as `Deferred::Connect`.
    Connection,
    /// The renewal of a granted connection's expiry (it goes on meanwhile).
    Refresh,
}

pub(super) struct WaitingSubscription {
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
            .filter(|w| matches!(&w.what, WaitingFor::Subscription(s) if !s.cancelled))
            .count()
    }

    /// Asks the backend whether connection `key` may subscribe to `topic`;
    /// the subscription waits for the verdict.
    pub(super) fn ask_to_subscribe(&mut self, key: ConnKey, topic: &str, since: Option<Since>) {
        let waiting_already = self.proxied.waiting.values().any(|w| {
            w.key == key
                && matches!(&w.what, WaitingFor::Subscription(s) if !s.cancelled && *s.topic == *topic)
        });
        if waiting_already {
            return;
        }
        let subscription = WaitingSubscription {
            topic: Arc::from(topic),
            since,
            cancelled: false,
        };
        let mut body = self.call_body(key);
        body["topic"] = topic.into();
        let what = WaitingFor::Subscription(subscription);
        if let Err(why) = self.ask(key, CallKind::Subscribe, what, body) {
            self.send_error(key, &format!("`{topic}`: {why}"));
        }
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
        let mut body = self.call_body(key);
        body["topic"] = topic.into();
        body["event"] = event.into();
        body["payload"] = serde_json::from_str::<&RawValue>(payload)
            .ok()
            .and_then(|raw| serde_json::to_value(raw).ok())
            .unwrap_or(serde_json::Value::Null);
        let ticket = match self.ask(key, CallKind::Publish, WaitingFor::Publication, body) {
            Ok(ticket) => ticket,
            Err(why) => return self.send_error(key, &format!("`{topic}`: {why}")),
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

    /// What every call says of connection `key`: `client`, `transport`
    /// and `user`.
    pub(super) fn call_body(&self, key: ConnKey) -> serde_json::Value {
        let conn = self.conns.get(key);
        let transport = match conn.map(|c| &c.phase) {
            Some(Phase::WebSocket(_)) => "websocket",
            Some(Phase::Stream(stream)) if stream.format == Format::Sse => "sse",
            Some(Phase::Stream(_)) => "ndjson",
            Some(Phase::Http(_)) | None => "http",
        };
        serde_json::json!({
            "client": self.conn_id(key),
            "transport": transport,
            "user": conn.and_then(|c| c.user()).map(|u| &**u),
        })
    }

    /// Hands a call with `body` to the proxy thread and records `what`
    /// waits for it; refused (with why) when the shard has `max_in_flight`
    /// calls outstanding or no proxy runs.
    pub(super) fn ask(
        &mut self,
        key: ConnKey,
        kind: CallKind,
        what: WaitingFor,
        body: serde_json::Value,
    ) -> Result<u64, &'static str> {
        let (Some(sink), Some(config)) = (self.shared.proxy.clone(), self.config().proxy.as_ref())
        else {
            return Err("no [proxy] is configured to ask the backend");
        };
        if self.proxied.waiting.len() >= config.max_in_flight {
            sink.stats.busy_total.fetch_add(1, Ordering::Relaxed);
            return Err("server busy: cannot ask the backend now, try again");
        }
        self.proxied.next_ticket += 1;
        let ticket = self.proxied.next_ticket;
        self.proxied.waiting.insert(ticket, Waiting { key, what });
        sink.call(Call {
            shard: self.id,
            ticket,
            kind,
            body: Bytes::from(body.to_string()),
        });
        Ok(ticket)
    }

    /// Cancels connection `key`'s waiting subscriptions whose topic `drop`
    /// names.
    pub(super) fn cancel_proxied(&mut self, key: ConnKey, drop: impl Fn(&str) -> bool) {
        for waiting in self.proxied.waiting.values_mut() {
            if waiting.key != key {
                continue;
            }
            if let WaitingFor::Subscription(subscription) = &mut waiting.what {
                if drop(&subscription.topic) {
                    subscription.cancelled = true;
                }
            }
        }
    }

    /// The backend's verdict on the call under `ticket`.
    pub(super) fn on_proxy_verdict(&mut self, ticket: u64, verdict: Verdict) {
        let Some(Waiting { key, what }) = self.proxied.waiting.remove(&ticket) else {
            debug_assert!(false, "a verdict on no call");
            return;
        };
        match what {
            WaitingFor::Subscription(subscription) => {
                self.subscription_verdict(key, subscription, verdict)
            }
            WaitingFor::Publication => self.publication_verdict(key, ticket, verdict),
            WaitingFor::Connection => self.connection_verdict(key, ticket, verdict),
            WaitingFor::Refresh => self.refresh_verdict(key, verdict),
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
            Verdict::Allowed(_) => self.subscribe_allowed(key, &topic, since),
            refused => self.send_error(
                key,
                &refusal(&format!("subscription to `{topic}`"), refused),
            ),
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
            Verdict::Allowed(grant) => {
                let payload = grant.payload.as_deref().unwrap_or(&payload);
                let idempotency_key = idempotency_key.as_deref();
                self.publish_from_client(key, &topic, &event, payload, idempotency_key);
            }
            refused => {
                self.send_error(key, &refusal(&format!("publication to `{topic}`"), refused))
            }
        }
        self.resume_input(key);
    }
}

/// Why `what` (a subscription, a publication, a connection) was refused.
pub(super) fn refusal(what: &str, verdict: Verdict) -> String {
    match verdict {
        Verdict::Allowed(_) => unreachable!("not a refusal"),
        Verdict::Refused { code, message } if message.is_empty() => {
            format!("{what} refused by the backend ({code})")
        }
        Verdict::Refused { code, message } => {
            format!("{what} refused by the backend ({code}): {message}")
        }
        Verdict::Failed(reason) => {
            format!("{what} refused: the backend gave no verdict ({reason})")
        }
    }
}
