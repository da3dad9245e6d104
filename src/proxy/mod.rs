//! The application backend's proxies: a connection without a valid token
//! is identified by it (`[proxy] connect_url`, then `refresh_url` before
//! its grant expires); a subscription to a topic whose rule has
//! `subscribe_proxy = true` is made only if it allows it (`subscribe_url`);
//! a client's publication to a topic whose rule has `publish_proxy = true`
//! goes out only as it says, as sent, rewritten or not at all
//! (`publish_url`).
//!
//! A shard never waits for it: it parks the connecting request, keeps the
//! subscription pending (counted against the connection's subscription
//! limit), or parks the publishing connection (its input held, so its
//! publications stay in order), hands
//! the call to the proxy thread (`driver.rs`, a tokio runtime with a pooled
//! keep-alive HTTP/1.1 client), and goes on; at most `max_in_flight` calls
//! per shard.
//! The thread's [`Verdict`] comes back as an envelope on the shard's own
//! bus queue. A timeout or an unreachable backend refuses the subscription
//! (the proxy fails closed).

mod driver;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::backend::Handoff;
use crate::bus::ShardId;

pub use driver::spawn;

/// The longest refusal message passed on to a client.
pub const MAX_MESSAGE_BYTES: usize = 256;

/// Which proxy a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Connect,
    Refresh,
    Subscribe,
    Publish,
}

/// One question for the backend.
#[derive(Debug)]
pub struct Call {
    /// Who gets the verdict, and the ticket it names.
    pub shard: ShardId,
    pub ticket: u64,
    pub kind: CallKind,
    /// The JSON body: `client`, `transport`, `user`, `topic` (and for a
    /// publication `event` and `payload`).
    pub body: Bytes,
}

/// What the backend decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `200 {"result": {...}}`.
    Allowed(Grant),
    /// `200 {"error": {"code": C, "message": M}}`, or a non-2xx status
    /// (its code, no message).
    Refused { code: u32, message: String },
    /// No decision: a timeout, an unreachable backend, an answer that is
    /// not one of the above. The subscription is refused.
    Failed(String),
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    result: Option<AnswerResult<'a>>,
    error: Option<AnswerError>,
}

/// What an allowing answer may carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// A publication's replacement payload (any JSON value, as text).
    pub payload: Option<String>,
    /// A connection's user id.
    pub user: Option<String>,
    /// Topics a WebSocket connection starts with.
    pub topics: Vec<String>,
    /// When a connection must end (its `expire_at`), from when the answer
    /// was read.
    pub expires_in: Option<Duration>,
    /// A connection's `meta`: a JSON object its presence shows (as `info`
    /// beside its `user_id`), as text.
    pub meta: Option<String>,
}

#[derive(Deserialize)]
struct AnswerResult<'a> {
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    user: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
    /// Unix seconds.
    expire_at: Option<u64>,
    #[serde(borrow)]
    meta: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    message: String,
}

impl Verdict {
    /// The verdict of an HTTP answer read at `now_unix_s`.
    pub fn of_answer(status: u16, body: &[u8], now_unix_s: u64) -> Verdict {
        if !(200..300).contains(&status) {
            return Verdict::Refused {
                code: u32::from(status),
                message: String::new(),
            };
        }
        match serde_json::from_slice::<Answer>(body) {
            Ok(Answer {
                error: Some(error), ..
            }) => Verdict::Refused {
                code: error.code,
                message: truncate(error.message, MAX_MESSAGE_BYTES),
            },
            Ok(Answer {
                result: Some(result),
                ..
            }) => Verdict::Allowed(Grant {
                payload: result.payload.map(|p| p.get().to_string()),
                user: result.user.filter(|u| !u.is_empty()),
                topics: result.topics,
                expires_in: result
                    .expire_at
                    .map(|at| Duration::from_secs(at.saturating_sub(now_unix_s))),
                meta: result.meta.map(|m| m.get().to_string()),
            }),
            Ok(_) => Verdict::Failed("the backend answered neither result nor error".into()),
            Err(e) => Verdict::Failed(format!("the backend's answer is not JSON: {e}")),
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The shards' side: where calls go, and the counters `/metrics` shows.
#[derive(Debug)]
pub struct ProxySink {
    calls: Handoff<Call>,
    pub stats: ProxyStats,
}

/// Counters of the proxies, for the whole node.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub calls_total: AtomicU64,
    pub allowed_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub failed_total: AtomicU64,
    /// Subscriptions refused at once because the shard had `max_in_flight`.
    pub busy_total: AtomicU64,
    pub in_flight: AtomicU64,
}

impl Default for ProxySink {
    fn default() -> ProxySink {
        ProxySink::new()
    }
}

impl ProxySink {
    pub fn new() -> ProxySink {
        ProxySink {
            calls: Handoff::default(),
            stats: ProxyStats::default(),
        }
    }

    /// Hands `call` to the proxy thread without waiting. Each shard keeps
    /// at most `max_in_flight` calls outstanding, which bounds the channel.
    pub fn call(&self, call: Call) {
        self.stats.calls_total.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.calls.send(call);
    }

    /// Appends the proxy metrics in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = &self.stats;
        let metrics = [
            (
                "proxy_calls_total",
                "counter",
                "Connect, refresh, subscribe and publish proxy calls made.",
                &s.calls_total,
            ),
            (
                "proxy_allowed_total",
                "counter",
                "Connections, subscriptions and publications the backend allowed.",
                &s.allowed_total,
            ),
            (
                "proxy_refused_total",
                "counter",
                "Connections, subscriptions and publications the backend refused.",
                &s.refused_total,
            ),
            (
                "proxy_failed_total",
                "counter",
                "Proxy calls without a decision (timeout, unreachable, bad answer): refused.",
                &s.failed_total,
            ),
            (
                "proxy_busy_total",
                "counter",
                "Requests refused at once: the shard had proxy.max_in_flight calls outstanding.",
                &s.busy_total,
            ),
            (
                "proxy_in_flight",
                "gauge",
                "Proxy calls outstanding.",
                &s.in_flight,
            ),
        ];
        let metrics = metrics
            .map(|(name, kind, help, value)| (name, kind, help, value.load(Ordering::Relaxed)));
        crate::metrics::write_node_metrics(out, &metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict at an arbitrary time, for answers without `expire_at`.
    impl Verdict {
        fn of_answer_at(status: u16, body: &[u8]) -> Verdict {
            Verdict::of_answer(status, body, 0)
        }
    }

    #[test]
    fn answers_are_read_as_the_contract_says() {
        let allowed = Verdict::Allowed(Grant::default());
        assert_eq!(Verdict::of_answer_at(200, br#"{"result":{}}"#), allowed);
        assert_eq!(
            Verdict::of_answer_at(200, br#"{"result":{"info":{"x":1}}}"#),
            allowed
        );
        assert_eq!(
            Verdict::of_answer_at(200, br#"{"result":{"payload":{"text":"***"}}}"#),
            Verdict::Allowed(Grant {
                payload: Some(r#"{"text":"***"}"#.into()),
                ..Grant::default()
            })
        );
        assert_eq!(
            Verdict::of_answer(
                200,
                br#"{"result":{"user":"ann","topics":["a","b"],"expire_at":1060}}"#,
                1000
            ),
            Verdict::Allowed(Grant {
                user: Some("ann".into()),
                topics: vec!["a".into(), "b".into()],
                expires_in: Some(Duration::from_secs(60)),
                ..Grant::default()
            })
        );
        assert_eq!(
            Verdict::of_answer_at(200, br#"{"error":{"code":4403,"message":"not yours"}}"#),
            Verdict::Refused {
                code: 4403,
                message: "not yours".into()
            }
        );
        assert_eq!(
            Verdict::of_answer_at(403, b"<html>forbidden</html>"),
            Verdict::Refused {
                code: 403,
                message: String::new()
            }
        );
        assert!(matches!(
            Verdict::of_answer_at(200, b"{}"),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            Verdict::of_answer_at(200, b"ok"),
            Verdict::Failed(_)
        ));
        let long = format!(
            r#"{{"error":{{"code":1,"message":"{}é"}}}}"#,
            "x".repeat(255)
        );
        let Verdict::Refused { message, .. } = Verdict::of_answer_at(200, long.as_bytes()) else {
            panic!("a refusal");
        };
        assert_eq!(
            message.len(),
            255,
            "cut before the character that would pass 256"
        );
    }
}
