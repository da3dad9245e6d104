//! The Pusher protocol's messages (version 7), without I/O: what a client
//! sends, read; what it gets, written; and how an app's channel is named
//! among the core's topics.
//!
//! Every message is `{"event":E,"channel"?:C,"data":D}`. The core speaks
//! ringcast's JSON, so what it sends a Pusher connection is translated here
//! ([`translate`]): a push becomes the channel's event, `subscribed`
//! becomes `pusher_internal:subscription_succeeded`, an error
//! `pusher:error`; what has no Pusher counterpart is not sent.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::{frame, message};

/// Seconds of silence after which a client pings (Pusher's 120).
pub const ACTIVITY_TIMEOUT_S: u32 = 120;
/// Pusher's limit on a channel name, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 164;
/// Pusher's limit on an event name.
pub const MAX_EVENT_NAME_BYTES: usize = 200;

/// The core topic of `app`'s channel `channel`. The control characters
/// make it a name ringcast's own clients cannot give (topic names refuse
/// them), and the app id keeps apps apart: no second index is needed.
pub fn topic(app_id: &str, channel: &str) -> String {
    format!("\u{1}{app_id}\u{1}{channel}")
}

/// The prefix every topic of `app_id` starts with.
pub fn topic_prefix(app_id: &str) -> String {
    format!("\u{1}{app_id}\u{1}")
}

/// The channel a core topic names, if it is a Pusher app's.
pub fn channel_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix('\u{1}')?;
    let (_, channel) = rest.split_once('\u{1}')?;
    Some(channel)
}

/// Whether `name` is a channel name Pusher accepts: 1 to 164 of
/// `A-Z a-z 0-9 _ - = @ , . ;`.
pub fn valid_channel(name: &str) -> bool {
    (1..=MAX_CHANNEL_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// What a Pusher client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    Ping,
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    /// `client-*` on a channel, with its data as raw JSON.
    ClientEvent {
        channel: String,
        event: String,
        data: &'a str,
    },
    /// Anything else: ignored, as Pusher does with events it does not know.
    Other,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    event: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    channel: Option<String>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    auth: Option<String>,
    channel_data: Option<String>,
}

/// Reads a client's message, or says why it is not one.
pub fn parse(text: &str) -> Result<Incoming<'_>, String> {
    let envelope: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| format!("not a Pusher message: {e}"))?;
    // pusher-js sends `data` as an object; some clients send it as a
    // string holding the object.
    let data = |raw: Option<&RawValue>| -> Result<SubscribeData, String> {
        let raw = raw.ok_or("no data")?.get();
        let object = match serde_json::from_str::<String>(raw) {
            Ok(inner) => serde_json::from_str(&inner),
            Err(_) => serde_json::from_str(raw),
        };
        object.map_err(|e| format!("bad data: {e}"))
    };
    Ok(match envelope.event.as_str() {
        "pusher:ping" => Incoming::Ping,
        "pusher:subscribe" => {
            let SubscribeData {
                channel,
                auth,
                channel_data,
            } = data(envelope.data)?;
            Incoming::Subscribe {
                channel,
                auth,
                channel_data,
            }
        }
        "pusher:unsubscribe" => Incoming::Unsubscribe {
            channel: data(envelope.data)?.channel,
        },
        name if name.starts_with("client-") => Incoming::ClientEvent {
            channel: envelope.channel.ok_or("a client event names no channel")?,
            event: envelope.event,
            data: envelope.data.ok_or("a client event has no data")?.get(),
        },
        _ => Incoming::Other,
    })
}

/// `pusher:connection_established` with the connection's socket id.
pub fn connection_established(socket_id: &str) -> Bytes {
    let data =
        format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{ACTIVITY_TIMEOUT_S}}}");
    event_frame("pusher:connection_established", None, &json_string(&data))
}

/// `pusher:pong`.
pub fn pong() -> Bytes {
    event_frame("pusher:pong", None, "{}")
}

/// `pusher:error`, with Pusher's code (4000-4299) when there is one.
pub fn error(code: Option<u16>, message: &str) -> Bytes {
    let data = match code {
        Some(code) => format!("{{\"code\":{code},\"message\":{}}}", json_string(message)),
        None => format!("{{\"code\":null,\"message\":{}}}", json_string(message)),
    };
    event_frame("pusher:error", None, &data)
}

/// `pusher:subscription_error`: a private or presence channel's
/// authorization did not hold.
pub fn subscription_error(channel: &str, message: &str) -> Bytes {
    let data = format!(
        "{{\"type\":\"AuthError\",\"error\":{},\"status\":401}}",
        json_string(message)
    );
    event_frame("pusher:subscription_error", Some(channel), &data)
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// `{"event":E,"channel":C,"data":D}` framed, `data_json` as given.
fn event_frame(event: &str, channel: Option<&str>, data_json: &str) -> Bytes {
    let hint = 40 + event.len() + channel.map_or(0, str::len) + data_json.len();
    frame::text_with(hint, |out| {
        out.extend_from_slice(b"{\"event\":");
        out.extend_from_slice(json_string(event).as_bytes());
        if let Some(channel) = channel {
            out.extend_from_slice(b",\"channel\":");
            out.extend_from_slice(json_string(channel).as_bytes());
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data_json.as_bytes());
        out.push(b'}');
    })
}

/// A core message as the Pusher client reads it.
#[derive(Deserialize)]
struct CoreMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Option<std::borrow::Cow<'a, str>>,
}

/// What a Pusher connection gets for the core's `bytes`: a frame in
/// Pusher's words, the bytes as they are when they are not a core message
/// (the `101`, a close frame, a Pusher frame), or nothing for a message
/// Pusher has no word for.
pub fn translate(bytes: Bytes) -> Option<Bytes> {
    let Some(json) = message::frame_json(&bytes) else {
        return Some(bytes);
    };
    // A frame written in Pusher's words already (no `type`) goes as it is.
    let Ok(core) = serde_json::from_slice::<CoreMessage<'_>>(json) else {
        return Some(bytes);
    };
    let channel = || core.topic.as_deref().and_then(channel_of);
    match core.kind {
        "push" => {
            let data = core.payload.map_or("null", RawValue::get);
            Some(event_frame(core.event.as_deref()?, Some(channel()?), data))
        }
        "subscribed" => Some(event_frame(
            "pusher_internal:subscription_succeeded",
            Some(channel()?),
            "\"{}\"",
        )),
        "error" => Some(error(None, core.message.as_deref().unwrap_or("error"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &Bytes) -> String {
        String::from_utf8(message::frame_json(frame).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn an_apps_channel_is_a_topic_no_ringcast_client_can_name() {
        let topic = topic("4711", "room-1");
        assert_eq!(channel_of(&topic), Some("room-1"));
        assert!(message::check_topic(&topic, 256).is_err());
        assert_eq!(channel_of("room-1"), None);
        assert!(topic.starts_with(&topic_prefix("4711")));
        assert!(!topic.starts_with(&topic_prefix("471")));
    }

    #[test]
    fn channel_names_are_pushers() {
        assert!(valid_channel("private-a_b-c=d@e,f.g;h"));
        for bad in ["", "a b", "a/b", "é", &"x".repeat(165)] {
            assert!(!valid_channel(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_clients_messages_are_read_with_data_as_object_or_string() {
        assert_eq!(
            parse(r#"{"event":"pusher:ping","data":{}}"#),
            Ok(Incoming::Ping)
        );
        let expected = Incoming::Subscribe {
            channel: "private-x".into(),
            auth: Some("k:s".into()),
            channel_data: None,
        };
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"k:s"}}"#),
            Ok(expected)
        );
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"x\"}"}"#),
            Ok(Incoming::Subscribe {
                channel: "x".into(),
                auth: None,
                channel_data: None
            })
        );
        assert!(matches!(
            parse(r#"{"event":"client-typing","channel":"private-x","data":{"a":1}}"#),
            Ok(Incoming::ClientEvent { .. })
        ));
        assert_eq!(parse(r#"{"event":"pusher:whatever"}"#), Ok(Incoming::Other));
        for bad in [
            "",
            "[]",
            r#"{"event":"pusher:subscribe"}"#,
            r#"{"event":"client-x","data":1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cores_messages_become_pushers() {
        let push = message::push(&topic("1", "room"), "greeting", r#""{\"text\":\"hi\"}""#);
        assert_eq!(
            text(&translate(push).unwrap()),
            r#"{"event":"greeting","channel":"room","data":"{\"text\":\"hi\"}"}"#
        );
        let subscribed = message::subscribed(&topic("1", "room"));
        assert_eq!(
            text(&translate(subscribed).unwrap()),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"room","data":"{}"}"#
        );
        let error = translate(message::error("no")).unwrap();
        assert_eq!(
            text(&error),
            r#"{"event":"pusher:error","data":{"code":null,"message":"no"}}"#
        );
        assert_eq!(translate(message::unsubscribed(&topic("1", "room"))), None);
        let http = Bytes::from_static(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(translate(http.clone()), Some(http), "not a message: as is");
        assert_eq!(translate(pong()), Some(pong()), "Pusher's own: as is");
        let established = connection_established("1.2");
        assert_eq!(
            text(&established),
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
        );
    }
}
