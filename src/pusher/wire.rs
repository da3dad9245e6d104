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

/// The channel of a signed-in user's events (`sendToUser`): only that
/// user's connections hold it.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// The user whose channel `channel` is, if it is one: an id of 1 to 128
/// bytes without control characters.
pub fn user_channel(channel: &str) -> Option<&str> {
    let user = channel.strip_prefix(USER_CHANNEL_PREFIX)?;
    let fits = (1..=crate::pusher::presence::MAX_USER_ID_BYTES).contains(&user.len());
    (fits && !user.chars().any(char::is_control)).then_some(user)
}

/// The channel of `user`'s events, if the id fits one.
pub fn channel_of_user(user: &str) -> Option<String> {
    let channel = format!("{USER_CHANNEL_PREFIX}{user}");
    user_channel(&channel).is_some().then_some(channel)
}

/// `pusher:signin_success` with the user data the backend signed.
pub fn signin_success(user_data: &str) -> Bytes {
    let data = format!("{{\"user_data\":{}}}", json_string(user_data));
    event_frame("pusher:signin_success", None, &data)
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
    /// `pusher:signin`: user authentication, `user_data` as signed.
    Signin {
        auth: String,
        user_data: String,
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
struct SigninData {
    auth: String,
    user_data: String,
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
        "pusher:signin" => {
            let raw = envelope.data.ok_or("no data")?.get();
            let signin: SigninData = match serde_json::from_str::<String>(raw) {
                Ok(inner) => serde_json::from_str(&inner),
                Err(_) => serde_json::from_str(raw),
            }
            .map_err(|e| format!("bad data: {e}"))?;
            Incoming::Signin {
                auth: signin.auth,
                user_data: signin.user_data,
            }
        }
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

/// `pusher:subscription_error` for a presence channel that has its app's
/// `max_presence_members` already.
pub fn subscription_limit(channel: &str, message: &str) -> Bytes {
    let data = format!(
        "{{\"type\":\"LimitReached\",\"error\":{},\"status\":4100}}",
        json_string(message)
    );
    event_frame("pusher:subscription_error", Some(channel), &data)
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
    event_frame_from(event, channel, data_json, None)
}

/// The same with the `user_id` of a client event's sender on a presence
/// channel.
fn event_frame_from(
    event: &str,
    channel: Option<&str>,
    data_json: &str,
    user_id: Option<&str>,
) -> Bytes {
    let hint = 60 + event.len() + channel.map_or(0, str::len) + data_json.len();
    frame::text_with(hint, |out| {
        out.extend_from_slice(b"{\"event\":");
        out.extend_from_slice(json_string(event).as_bytes());
        if let Some(channel) = channel {
            out.extend_from_slice(b",\"channel\":");
            out.extend_from_slice(json_string(channel).as_bytes());
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(data_json.as_bytes());
        if let Some(user_id) = user_id {
            out.extend_from_slice(b",\"user_id\":");
            out.extend_from_slice(json_string(user_id).as_bytes());
        }
        out.push(b'}');
    })
}

/// A connection's socket id: its shard and slot, then the node's per-run
/// salt and the slot's generation, written `high.low` as Pusher's are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketId {
    pub shard: u32,
    pub slot: u32,
    pub salt: u32,
    pub generation: u32,
}

impl SocketId {
    /// Reads a socket id a client or a backend gave; `None` for one no
    /// node of ringcast made.
    pub fn parse(text: &str) -> Option<SocketId> {
        let (high, low) = text.split_once('.')?;
        let (high, low): (u64, u64) = (high.parse().ok()?, low.parse().ok()?);
        Some(SocketId {
            shard: (high >> 32) as u32,
            slot: high as u32,
            salt: (low >> 32) as u32,
            generation: low as u32,
        })
    }
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let high = u64::from(self.shard) << 32 | u64::from(self.slot);
        let low = u64::from(self.salt) << 32 | u64::from(self.generation);
        write!(f, "{high}.{low}")
    }
}

/// The core payload of a publication to an app's channel: Pusher's
/// `data` (as the publisher gave it), the socket that does not get it (a
/// client event's sender, a trigger's `socket_id`), and the sender's
/// `user_id` (a client event on a presence channel). Only Pusher
/// connections read an app's topics (no other connection can subscribe to
/// them), so the envelope is theirs: it travels with the publication to
/// every shard and node, and through a stream's history (cache channels).
pub fn payload(data_json: &str, except: Option<&str>, user_id: Option<&str>) -> String {
    let mut out = String::with_capacity(32 + data_json.len());
    out.push_str("{\"data\":");
    out.push_str(data_json);
    if let Some(except) = except {
        out.push_str(",\"except\":");
        out.push_str(&json_string(except));
    }
    if let Some(user_id) = user_id {
        out.push_str(",\"user_id\":");
        out.push_str(&json_string(user_id));
    }
    out.push('}');
    out
}

/// The payload that closes every connection holding the channel (a
/// signed-in user's) with Pusher's 4009. A trigger's payload always has
/// `data`, so none can be this one.
pub const TERMINATE: &str = r#"{"terminate":true}"#;

/// A Pusher publication's payload, as [`payload`] and [`TERMINATE`] write it.
#[derive(Deserialize)]
struct Carried<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    except: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    user_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    terminate: bool,
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
    /// A stream's position in `subscribed`: 0 for a stream with nothing
    /// in it (a cache channel's miss).
    offset: Option<u64>,
}

impl CoreMessage<'_> {
    /// The push's payload as a Pusher envelope (a payload that is none is
    /// all `data`).
    fn envelope(&self) -> Carried<'_> {
        let raw = self.payload;
        let envelope = raw.and_then(|p| serde_json::from_str::<Carried<'_>>(p.get()).ok());
        match envelope {
            Some(envelope) if envelope.data.is_some() || envelope.terminate => envelope,
            _ => Carried {
                data: raw,
                except: None,
                user_id: None,
                terminate: false,
            },
        }
    }
}

/// What a Pusher connection gets for a core message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// These bytes: a frame in Pusher's words, or the bytes as they were
    /// when they are not a core message (the `101`, a close frame, a
    /// Pusher frame).
    Frame(Bytes),
    /// Nothing: Pusher has no word for it.
    Nothing,
    /// The core subscribed the connection to a presence channel (this
    /// topic): its `subscription_succeeded` needs the members first (and a
    /// presence cache channel with nothing kept, `pusher:cache_miss` after).
    PresenceSubscribed { topic: String, cache_miss: bool },
    /// A cache channel (this topic) with nothing kept: these frames
    /// (`subscription_succeeded`, `pusher:cache_miss`), and the app's
    /// `cache_miss` webhook.
    CacheMissed { frames: Bytes, topic: String },
}

/// Whether `channel` is a cache channel (its last event kept for new
/// subscribers): `cache-`, `private-cache-`, `private-encrypted-cache-`
/// or `presence-cache-`.
pub fn is_cache(channel: &str) -> bool {
    CACHE_PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// The prefixes of cache channels.
pub const CACHE_PREFIXES: [&str; 4] = [
    "cache-",
    "private-cache-",
    "private-encrypted-cache-",
    "presence-cache-",
];

/// `pusher:cache_miss`: a cache channel had no event to give a new
/// subscriber.
pub fn cache_miss_frame(channel: &str) -> Bytes {
    event_frame("pusher:cache_miss", Some(channel), "{}")
}

/// A publication as every Pusher subscriber reads it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Publication {
    /// The frame, or `None` for nothing to send.
    pub frame: Option<Bytes>,
    /// The socket that must not get it (see [`payload`]).
    pub except: Option<SocketId>,
    /// Every subscriber is closed instead (see [`TERMINATE`]).
    pub terminate: bool,
}

/// What every Pusher subscriber of a publication gets.
pub fn translate_publication(bytes: &Bytes) -> Publication {
    let as_is = Publication {
        frame: Some(bytes.clone()),
        ..Publication::default()
    };
    let Some(json) = message::frame_json(bytes) else {
        return as_is;
    };
    let Ok(core) = serde_json::from_slice::<CoreMessage<'_>>(json) else {
        return as_is;
    };
    let (Some(channel), "push") = (core.topic.as_deref().and_then(channel_of), core.kind) else {
        return match pusher_words(&core) {
            Outgoing::Frame(frame) => Publication {
                frame: Some(frame),
                ..Publication::default()
            },
            _ => Publication::default(),
        };
    };
    // The payload is read once per publication, whatever its subscribers.
    let envelope = core.envelope();
    Publication {
        frame: push_words(&core, channel, &envelope),
        except: envelope.except.as_deref().and_then(SocketId::parse),
        terminate: envelope.terminate,
    }
}

/// A push in Pusher's words (`None`: a terminate, or no event).
fn push_words(core: &CoreMessage<'_>, channel: &str, envelope: &Carried<'_>) -> Option<Bytes> {
    if envelope.terminate {
        return None;
    }
    let event = core.event.as_deref()?;
    let data = envelope.data.map_or("null", RawValue::get);
    let user_id = envelope.user_id.as_deref();
    Some(event_frame_from(event, Some(channel), data, user_id))
}

/// What a Pusher connection gets for the core's `bytes`.
pub fn translate(bytes: Bytes) -> Outgoing {
    let Some(json) = message::frame_json(&bytes) else {
        return Outgoing::Frame(bytes);
    };
    // A frame written in Pusher's words already (no `type`) goes as it is.
    match serde_json::from_slice::<CoreMessage<'_>>(json) {
        Ok(core) => pusher_words(&core),
        Err(_) => Outgoing::Frame(bytes),
    }
}

fn pusher_words(core: &CoreMessage<'_>) -> Outgoing {
    let Some(channel) = core.topic.as_deref().and_then(channel_of) else {
        return match core.kind {
            "error" => Outgoing::Frame(error(None, core.message.as_deref().unwrap_or("error"))),
            _ => Outgoing::Nothing,
        };
    };
    // A cache channel's stream at offset 0 has nothing to give.
    let cache_miss = is_cache(channel) && core.offset == Some(0);
    match core.kind {
        "push" => match push_words(core, channel, &core.envelope()) {
            Some(frame) => Outgoing::Frame(frame),
            None => Outgoing::Nothing,
        },
        "subscribed" if channel.starts_with("presence-") => Outgoing::PresenceSubscribed {
            topic: core.topic.as_deref().unwrap_or_default().to_string(),
            cache_miss,
        },
        "subscribed" => {
            let succeeded = subscription_succeeded(channel, "\"{}\"");
            if !cache_miss {
                return Outgoing::Frame(succeeded);
            }
            // Two frames in one write: told it is in, then that nothing is.
            let mut both = bytes::BytesMut::from(&succeeded[..]);
            both.extend_from_slice(&cache_miss_frame(channel));
            Outgoing::CacheMissed {
                frames: both.freeze(),
                topic: core.topic.as_deref().unwrap_or_default().to_string(),
            }
        }
        "error" => Outgoing::Frame(error(None, core.message.as_deref().unwrap_or("error"))),
        _ => Outgoing::Nothing,
    }
}

/// `pusher_internal:subscription_succeeded`, `data_json` as given (a
/// presence channel's members, or `"{}"`).
pub fn subscription_succeeded(channel: &str, data_json: &str) -> Bytes {
    event_frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        data_json,
    )
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
    fn a_socket_id_reads_back_and_a_push_carries_whom_it_skips() {
        let id = SocketId {
            shard: 3,
            slot: 77,
            salt: u32::MAX,
            generation: 9,
        };
        assert_eq!(SocketId::parse(&id.to_string()), Some(id));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.b",
            "1.2.3",
            "-1.2",
            "99999999999999999999.1",
        ] {
            assert_eq!(SocketId::parse(bad), None, "{bad}");
        }
        let data = payload("{}", Some(&id.to_string()), Some("ann"));
        let push = message::push(&topic("1", "room"), "client-x", &data);
        let Publication { frame, except, .. } = translate_publication(&push);
        assert_eq!(
            text(&frame.unwrap()),
            r#"{"event":"client-x","channel":"room","data":{},"user_id":"ann"}"#
        );
        assert_eq!(except, Some(id));
        let plain = message::push(&topic("1", "room"), "e", &payload("1", None, None));
        assert_eq!(translate_publication(&plain).except, None);
        let end = message::push(&topic("1", "#server-to-user-ann"), "x", TERMINATE);
        let end = translate_publication(&end);
        assert!(end.terminate && end.frame.is_none());
        assert_eq!(user_channel("#server-to-user-ann"), Some("ann"));
        for bad in [
            "#server-to-user-",
            "server-to-user-ann",
            "#server-to-user-a\u{1}",
        ] {
            assert_eq!(user_channel(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_cores_messages_become_pushers() {
        let frame = |outgoing| match outgoing {
            Outgoing::Frame(bytes) => bytes,
            other => panic!("{other:?}"),
        };
        let push = message::push(&topic("1", "room"), "greeting", r#""{\"text\":\"hi\"}""#);
        assert_eq!(
            text(&frame(translate(push))),
            r#"{"event":"greeting","channel":"room","data":"{\"text\":\"hi\"}"}"#
        );
        let subscribed = message::subscribed(&topic("1", "room"));
        assert_eq!(
            text(&frame(translate(subscribed))),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"room","data":"{}"}"#
        );
        let error = frame(translate(message::error("no")));
        assert_eq!(
            text(&error),
            r#"{"event":"pusher:error","data":{"code":null,"message":"no"}}"#
        );
        assert_eq!(
            translate(message::unsubscribed(&topic("1", "room"))),
            Outgoing::Nothing
        );
        assert_eq!(
            translate(message::subscribed(&topic("1", "presence-room"))),
            Outgoing::PresenceSubscribed {
                topic: topic("1", "presence-room"),
                cache_miss: false
            }
        );
        let Outgoing::CacheMissed { frames: missed, .. } = translate(message::subscribed_at(
            &topic("1", "cache-x"),
            None,
            0,
            "e",
            false,
        )) else {
            panic!("a cache channel's miss is told");
        };
        // The first frame is short: a 2-byte header, then its payload.
        let second = 2 + usize::from(missed[1] & 0x7f);
        assert_eq!(
            text(&Bytes::copy_from_slice(&missed[second..])),
            r#"{"event":"pusher:cache_miss","channel":"cache-x","data":{}}"#,
            "subscription_succeeded, then the miss"
        );
        let Outgoing::Frame(kept) = translate(message::subscribed_at(
            &topic("1", "cache-x"),
            None,
            3,
            "e",
            false,
        )) else {
            panic!("a cache channel's subscription is told");
        };
        assert_eq!(2 + usize::from(kept[1] & 0x7f), kept.len(), "one frame");
        let http = Bytes::from_static(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(
            translate(http.clone()),
            Outgoing::Frame(http),
            "not a message: as is"
        );
        assert_eq!(
            translate(pong()),
            Outgoing::Frame(pong()),
            "Pusher's own: as is"
        );
        let established = connection_established("1.2");
        assert_eq!(
            text(&established),
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#
        );
    }
}
