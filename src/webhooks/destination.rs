//! Where webhook events go, without I/O: ringcast's own `[webhooks]`
//! (every topic and user outside the Pusher apps, in ringcast's words) and
//! each Pusher app's `webhook_url` (its channels, in Pusher's words). The
//! transitions are decided once for all of them (`state.rs`, and across
//! nodes `arbiter.rs`); a destination only says which events are its,
//! writes them, and keeps its own queue (`outbox.rs`), so a slow backend
//! holds back only its own events.

use super::arbiter::Key;
use super::outbox::Outbox;
use super::{ClientEvent, Subject};

/// How a destination's events are written and signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `{"name":E,"topic":T,"user"?:U,"time_ms":T}`, signed with
    /// `X-Ringcast-Signature`.
    Ringcast,
    /// `{"name":E,"channel":C,"user_id"?:U}` for the app whose topics
    /// start with `prefix`, signed with `X-Pusher-Key` and
    /// `X-Pusher-Signature`.
    Pusher { prefix: String },
}

/// One destination: its format, the events it wants, its queue.
#[derive(Debug)]
pub struct Destination {
    pub(super) format: Format,
    events: Vec<String>,
    pub(super) outbox: Outbox,
}

impl Destination {
    /// A destination wanting `events`, holding at most `max_queued_bytes`
    /// of them waiting, `max_batch_events` per POST.
    pub fn new(
        format: Format,
        events: Vec<String>,
        max_queued_bytes: usize,
        max_batch_events: usize,
    ) -> Destination {
        Destination {
            format,
            events,
            outbox: Outbox::new(max_queued_bytes, max_batch_events),
        }
    }

    /// Whether `event` is wanted here.
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    /// Whether events about `key` are this destination's: an app's
    /// channels are its app's, everything else ringcast's.
    pub(super) fn takes(&self, key: &Key) -> bool {
        match &self.format {
            Format::Ringcast => !key.1.starts_with('\u{1}'),
            Format::Pusher { prefix } => {
                key.0 != Subject::User && key.1.starts_with(prefix.as_str())
            }
        }
    }

    /// `event` about `key` in this destination's words.
    pub(super) fn encode(&self, event: &str, key: &Key, unix_ms: u64) -> String {
        let (subject, name, user) = (key.0, &*key.1, key.2.as_deref());
        match &self.format {
            Format::Ringcast => match subject {
                Subject::Topic => {
                    serde_json::json!({"name": event, "topic": name, "time_ms": unix_ms})
                }
                Subject::User => {
                    serde_json::json!({"name": event, "user": name, "time_ms": unix_ms})
                }
                Subject::Member => serde_json::json!({
                    "name": event, "topic": name, "user": user, "time_ms": unix_ms
                }),
            },
            Format::Pusher { prefix } => {
                let channel = name.strip_prefix(prefix.as_str()).unwrap_or(name);
                match user {
                    Some(user) => {
                        serde_json::json!({"name": event, "channel": channel, "user_id": user})
                    }
                    None => serde_json::json!({"name": event, "channel": channel}),
                }
            }
        }
        .to_string()
    }
}

impl Destination {
    /// A client's publication in this destination's words: ringcast's
    /// with the payload as JSON; Pusher's with the data as text, the
    /// sender's socket id, and its user id on a presence channel.
    pub(super) fn encode_client_event(&self, event: &ClientEvent, unix_ms: u64) -> String {
        let text = |s: &str| serde_json::to_string(s).expect("a string serialises");
        let user = event.user.as_deref().map_or("null".to_string(), text);
        match &self.format {
            // The payload is raw JSON the client sent, parsed on its way in.
            Format::Ringcast => format!(
                "{{\"name\":\"client_event\",\"topic\":{},\"event\":{},\"user\":{user},\"payload\":{},\"time_ms\":{unix_ms}}}",
                text(&event.topic),
                text(&event.event),
                event.payload
            ),
            Format::Pusher { prefix } => {
                let channel = event.topic.strip_prefix(prefix.as_str()).unwrap_or(&event.topic);
                let mut encoded = serde_json::json!({
                    "name": "client_event",
                    "channel": channel,
                    "event": &*event.event,
                    "data": &*event.payload,
                    "socket_id": event.socket_id.as_deref(),
                });
                if let Some(user) = &event.user {
                    encoded["user_id"] = user.as_ref().into();
                }
                encoded.to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn an_apps_channels_are_its_own_and_written_in_pushers_words() {
        let ringcast = Destination::new(Format::Ringcast, vec![], 1024, 10);
        let prefix = crate::pusher::wire::topic_prefix("4711");
        let app = Destination::new(Format::Pusher { prefix }, vec![], 1024, 10);
        let channel = crate::pusher::wire::topic("4711", "presence-room");
        let member: Key = (
            Subject::Member,
            Arc::from(channel.as_str()),
            Some(Arc::from("ann")),
        );
        let native: Key = (Subject::Topic, Arc::from("news"), None);
        let other_app: Key = (
            Subject::Topic,
            Arc::from(crate::pusher::wire::topic("47", "x").as_str()),
            None,
        );
        assert!(app.takes(&member) && !ringcast.takes(&member));
        assert!(ringcast.takes(&native) && !app.takes(&native));
        assert!(!app.takes(&other_app) && !ringcast.takes(&other_app));
        assert_eq!(
            app.encode("member_added", &member, 7),
            r#"{"channel":"presence-room","name":"member_added","user_id":"ann"}"#
        );
        assert_eq!(
            ringcast.encode("channel_occupied", &native, 7),
            r#"{"name":"channel_occupied","time_ms":7,"topic":"news"}"#
        );
    }
}
