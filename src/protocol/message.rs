//! The JSON relay protocol (DESIGN.md "Wire protocol"): parsing what clients
//! send over WebSocket and what `POST /publish` carries, and building the
//! server's messages as ready-to-send text frames, each encoded once so it can
//! be shared by every subscriber. It validates shapes and topic names; whether
//! a client may subscribe or publish is the shard's rule engine's call.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::frame;

/// Longest `type` value echoed back in an error, so a peer cannot make us
/// reflect a large string.
const MAX_ECHOED_TYPE_BYTES: usize = 64;
/// Longest epoch a client may name: the server's own are 16 hex characters.
pub const MAX_EPOCH_BYTES: usize = 64;

/// How long the names in a message may be, in bytes. Every name a client
/// gives may end up stored (a topic in the index, a user id on its
/// connections and in registrations, an event name in history), so none
/// is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Topic names.
    pub topic_bytes: usize,
    /// User ids and event names.
    pub name_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            topic_bytes: 256,
            name_bytes: 256,
        }
    }
}

/// Deepest nesting of arrays and objects accepted in a payload (or any other
/// field) of a client message or `POST /publish` body. serde_json stops typed
/// parsing at 128 levels (`Value`, which is how `/register` bodies are read),
/// but skips a `RawValue` (how payloads are kept) and ignored fields without
/// any limit, so a 500,000-deep payload was accepted and relayed to every
/// subscriber, whose own parsers may recurse on it. 128 is serde_json's figure,
/// the common default of JSON parsers.
pub const MAX_PAYLOAD_DEPTH: usize = 128;

/// Bytes whose brackets are summed in `u8` lanes before widening, so the
/// compiler vectorizes the count: at most 255 for the sum to fit. With 64 a
/// 250-byte message is counted in about 16 ns, where a plain
/// `filter().count()` took about 180 ns (more than serde's parse of it).
const BRACKET_COUNT_BLOCK: usize = 64;

/// A message from a WebSocket client.
#[derive(Debug, Clone)]
pub enum ClientMessage<'a> {
    /// `{"type":"subscribe","topic":T,"since"?:{"offset":N,"epoch":E}}`
    Subscribe {
        /// Validated topic name.
        topic: Cow<'a, str>,
        /// The stream position to recover from, if given.
        since: Option<Since>,
    },
    /// `{"type":"unsubscribe","topic":T}`
    Unsubscribe {
        /// Validated topic name.
        topic: Cow<'a, str>,
    },
    /// `{"type":"message","topic":T,"event"?:E,"payload"?:ANY}`: a client publish.
    Publish {
        /// Validated topic name.
        topic: Cow<'a, str>,
        /// The event name, if given.
        event: Option<Cow<'a, str>>,
        /// The payload as raw JSON, if given and not `null`.
        payload: Option<&'a RawValue>,
        /// A retry with the same key (stream topics) is stored once.
        idempotency_key: Option<Cow<'a, str>>,
    },
    /// `{"type":"ping"}` or the plain text `ping`.
    Ping,
    /// `{"topics":[...]}`: replace the whole subscription set. Each element
    /// is a topic name or `{"topic":T,"since":{"offset":N,"epoch":E}}`.
    SetTopics(Vec<TopicRequest<'a>>),
    /// `{"type":"presence","topic":T,"limit"?:N,"after"?:C}`: ask who is on
    /// a topic; at most `limit` members, those after member `C`.
    Presence {
        /// Validated topic name.
        topic: Cow<'a, str>,
        /// The page asked for.
        page: MemberPage<'a>,
    },
}

impl PartialEq for ClientMessage<'_> {
    fn eq(&self, other: &Self) -> bool {
        use ClientMessage::*;
        match (self, other) {
            (
                Subscribe {
                    topic: a,
                    since: sa,
                },
                Subscribe {
                    topic: b,
                    since: sb,
                },
            ) => a == b && sa == sb,
            (Unsubscribe { topic: a }, Unsubscribe { topic: b }) => a == b,
            (Presence { topic: a, page: pa }, Presence { topic: b, page: pb }) => {
                a == b && pa == pb
            }
            (
                Publish {
                    topic: a,
                    event: ea,
                    payload: pa,
                    idempotency_key: ka,
                },
                Publish {
                    topic: b,
                    event: eb,
                    payload: pb,
                    idempotency_key: kb,
                },
            ) => a == b && ea == eb && pa.map(RawValue::get) == pb.map(RawValue::get) && ka == kb,
            (Ping, Ping) => true,
            (SetTopics(a), SetTopics(b)) => a == b,
            _ => false,
        }
    }
}

/// Why a client message or publish body was refused. The `Display` text is the
/// human message to send back in `{"type":"error","message":...}` (or an HTTP
/// 400 `{"error":...}`); the connection stays open.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Not JSON at all; carries serde's description.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but not an object.
    #[error("message must be a JSON object")]
    NotAnObject,
    /// A required field is absent or `null`.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A `type` this server does not know (truncated to 64 bytes).
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field name.
        field: &'static str,
        /// What it must be, as a phrase ("a string").
        expected: &'static str,
    },
    /// Arrays and objects nested deeper than [`MAX_PAYLOAD_DEPTH`] inside the
    /// message: send a flatter payload.
    #[error("JSON nested deeper than {max_depth} levels")]
    TooDeep {
        /// The limit, [`MAX_PAYLOAD_DEPTH`].
        max_depth: usize,
    },
    /// A user id or event name that is empty, too long or contains
    /// control characters.
    #[error("field `{field}` must be a non-empty string of at most {max_bytes} bytes")]
    BadName {
        /// The field name.
        field: &'static str,
        /// The configured maximum length.
        max_bytes: usize,
    },
    /// A topic that is empty, too long or contains control characters.
    #[error("topic must be a non-empty string of at most {max_bytes} bytes")]
    BadTopic {
        /// The configured maximum topic length.
        max_bytes: usize,
    },
}

/// A stream position a client resumes from: the offset of the last
/// publication it has and the epoch that offset belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// Offset of the last publication the client has.
    pub offset: u64,
    /// The epoch of the stream that offset belongs to.
    pub epoch: String,
}

/// One topic of a `{"topics":[..]}` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRequest<'a> {
    /// Validated topic name.
    pub topic: Cow<'a, str>,
    /// The position to recover from, if given.
    pub since: Option<Since>,
}

/// A string that borrows from the input unless it had escapes.
#[derive(Deserialize)]
struct BorrowedStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// Every field we look at, kept raw so type errors get our own messages.
#[derive(Deserialize)]
struct RawClient<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topics: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<&'a RawValue>,
}

/// Longest member id a presence cursor may name: the server's own are a
/// shard, a slot and a generation, or a node name and those.
pub const MAX_CONN_ID_BYTES: usize = 320;

/// Which members of a presence answer are asked for: at most `limit`
/// (the server caps it), those after member `after` in conn-id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberPage<'a> {
    /// Most members wanted.
    pub limit: Option<usize>,
    /// The last member of the previous page.
    pub after: Option<Cow<'a, str>>,
}

/// Parses one text message from a client; `bounds` bounds every name.
pub fn parse_client(text: &str, bounds: Bounds) -> Result<ClientMessage<'_>, ClientError> {
    let max_topic_bytes = bounds.topic_bytes;
    let trimmed = text.trim();
    if trimmed == "ping" || trimmed == "\"ping\"" {
        return Ok(ClientMessage::Ping);
    }
    let raw: RawClient<'_> = parse_object(trimmed)?;
    let topic = || topic_field(raw.topic, max_topic_bytes);
    let Some(kind) = raw.kind else {
        return match raw.topics {
            Some(topics) => Ok(ClientMessage::SetTopics(topic_list(
                topics,
                max_topic_bytes,
            )?)),
            None => Err(ClientError::MissingField("type")),
        };
    };
    let kind = string_field(kind).ok_or(ClientError::WrongType {
        field: "type",
        expected: "a string",
    })?;
    match kind.as_ref() {
        "subscribe" => Ok(ClientMessage::Subscribe {
            topic: topic()?,
            since: since_field(raw.since)?,
        }),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe { topic: topic()? }),
        "message" | "publish" => Ok(ClientMessage::Publish {
            topic: topic()?,
            event: raw
                .event
                .map(|e| name_field(e, "event", bounds.name_bytes))
                .transpose()?,
            payload: raw.payload,
            idempotency_key: raw
                .idempotency_key
                .map(|k| name_field(k, "idempotency_key", bounds.name_bytes))
                .transpose()?,
        }),
        "ping" => Ok(ClientMessage::Ping),
        "presence" => Ok(ClientMessage::Presence {
            topic: topic()?,
            page: MemberPage {
                limit: raw
                    .limit
                    .map(|l| {
                        serde_json::from_str::<usize>(l.get()).map_err(|_| ClientError::WrongType {
                            field: "limit",
                            expected: "a non-negative integer",
                        })
                    })
                    .transpose()?,
                after: raw
                    .after
                    .map(|a| name_field(a, "after", MAX_CONN_ID_BYTES))
                    .transpose()?,
            },
        }),
        other => Err(ClientError::UnknownType(
            truncate(other, MAX_ECHOED_TYPE_BYTES).to_owned(),
        )),
    }
}

/// Deserializes a JSON object, telling "not JSON" from "not an object".
fn parse_object<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, ClientError> {
    // Before serde, which keeps a byte per level while it skips a raw value.
    // The message's own object is one level more than its fields' values.
    if nests_deeper_than(text.as_bytes(), MAX_PAYLOAD_DEPTH + 1) {
        return Err(ClientError::TooDeep {
            max_depth: MAX_PAYLOAD_DEPTH,
        });
    }
    // Checked up front: serde's derived structs would also accept a JSON array.
    if !text.trim_start().starts_with('{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(ClientError::NotAnObject),
            Err(err) => Err(ClientError::InvalidJson(err.to_string())),
        };
    }
    serde_json::from_str(text).map_err(|err| ClientError::InvalidJson(err.to_string()))
}

/// Whether arrays and objects in `json` nest more than `max_depth` levels.
/// One pass with a counter, skipping strings (and escapes in them), so it
/// needs no stack or heap whatever the depth. It does not validate: serde does.
fn nests_deeper_than(json: &[u8], max_depth: usize) -> bool {
    // Nesting needs as many opening brackets as levels, and counting them
    // settles nearly every real message without the byte-by-byte walk below.
    // `[` and `{` differ only in bit 0x20, so one compare finds both.
    let openings: usize = json
        .chunks(BRACKET_COUNT_BLOCK)
        .map(|block| {
            block
                .iter()
                .map(|&b| u8::from(b | 0x20 == b'{'))
                .sum::<u8>()
        })
        .map(usize::from)
        .sum();
    if openings <= max_depth {
        return false;
    }
    let mut depth = 0usize;
    let mut bytes = json.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'"' => skip_string(&mut bytes),
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Advances past the closing quote of a string whose opening quote was read.
fn skip_string(bytes: &mut std::slice::Iter<'_, u8>) {
    while let Some(&byte) = bytes.next() {
        match byte {
            b'"' => return,
            b'\\' => {
                bytes.next();
            }
            _ => {}
        }
    }
}

fn string_field(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<BorrowedStr<'_>>(raw.get())
        .ok()
        .map(|s| s.0)
}

fn string_or<'a>(raw: &'a RawValue, field: &'static str) -> Result<Cow<'a, str>, ClientError> {
    string_field(raw).ok_or(ClientError::WrongType {
        field,
        expected: "a string",
    })
}

fn topic_field(raw: Option<&RawValue>, max_bytes: usize) -> Result<Cow<'_, str>, ClientError> {
    let raw = raw.ok_or(ClientError::MissingField("topic"))?;
    let topic = string_field(raw).ok_or(ClientError::BadTopic { max_bytes })?;
    check_topic(&topic, max_bytes)?;
    Ok(topic)
}

/// `"since":{"offset":N,"epoch":E}`; `null` is the same as absent. Only
/// the object form: serde would also take an array `[N,E]` for the struct.
/// An epoch longer than any this server makes is refused, so a client
/// cannot make it store (or echo) a large one.
fn since_field(raw: Option<&RawValue>) -> Result<Option<Since>, ClientError> {
    let wrong = || ClientError::WrongType {
        field: "since",
        expected: r#"an object {"offset":N,"epoch":E}"#,
    };
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) if !raw.get().starts_with('{') => Err(wrong()),
        Some(raw) => {
            let since: Since = serde_json::from_str(raw.get()).map_err(|_| wrong())?;
            if since.epoch.len() > MAX_EPOCH_BYTES {
                return Err(ClientError::WrongType {
                    field: "since.epoch",
                    expected: "an epoch this server gave (at most 64 bytes)",
                });
            }
            Ok(Some(since))
        }
    }
}

/// An element of `topics` written as an object.
#[derive(Deserialize)]
struct RawTopicObject<'a> {
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
}

fn topic_list(raw: &RawValue, max_bytes: usize) -> Result<Vec<TopicRequest<'_>>, ClientError> {
    let wrong = || ClientError::WrongType {
        field: "topics",
        expected: r#"an array of topic names or {"topic":T,"since":{"offset":N,"epoch":E}}"#,
    };
    let list: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| wrong())?;
    list.into_iter()
        .map(|item| {
            let (topic, since) = if item.get().starts_with('"') {
                (string_field(item).ok_or_else(wrong)?, None)
            } else {
                let object: RawTopicObject<'_> =
                    serde_json::from_str(item.get()).map_err(|_| wrong())?;
                let topic = object.topic.ok_or_else(wrong)?;
                (
                    string_field(topic).ok_or_else(wrong)?,
                    since_field(object.since)?,
                )
            };
            check_topic(&topic, max_bytes)?;
            Ok(TopicRequest { topic, since })
        })
        .collect()
}

/// A string field holding a name (an event name).
fn name_field<'a>(
    raw: &'a RawValue,
    field: &'static str,
    max_bytes: usize,
) -> Result<Cow<'a, str>, ClientError> {
    let name = string_or(raw, field)?;
    check_name(&name, field, max_bytes)?;
    Ok(name)
}

/// Checks a user id or event name: non-empty, at most `max_bytes`, no
/// ASCII control characters (they would reach logs and other clients).
pub fn check_name(name: &str, field: &'static str, max_bytes: usize) -> Result<(), ClientError> {
    if name.is_empty() || name.len() > max_bytes || name.bytes().any(|b| b.is_ascii_control()) {
        return Err(ClientError::BadName { field, max_bytes });
    }
    Ok(())
}

/// Checks a topic name: non-empty, at most `max_bytes`, no ASCII control characters.
pub fn check_topic(topic: &str, max_bytes: usize) -> Result<(), ClientError> {
    if topic.is_empty() || topic.len() > max_bytes || topic.bytes().any(|b| b.is_ascii_control()) {
        return Err(ClientError::BadTopic { max_bytes });
    }
    Ok(())
}

/// The longest prefix of `text` within `max_bytes` that ends on a character boundary.
pub fn truncate(text: &str, max_bytes: usize) -> &str {
    let mut cut = text.len().min(max_bytes);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// A `POST /publish` body after validation, borrowing from the body (a
/// string is copied only when it carried escapes): every publish parses one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest<'a> {
    /// Validated topic name.
    pub topic: Cow<'a, str>,
    /// Event name; `"message"` when not given.
    pub event: Cow<'a, str>,
    /// The payload as raw JSON; `null` when not given.
    pub payload_json: &'a str,
    /// Deliver only to this user's connections, when set.
    pub user_id: Option<String>,
    /// A retry with the same key (stream topics) is answered with the
    /// first outcome and stored once.
    pub idempotency_key: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawPublish<'a> {
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<&'a RawValue>,
}

/// Parses a `POST /publish` body.
///
/// `topic` is required; `event` defaults to `"message"`; `payload` is any JSON,
/// default `null`; a string `message` stands in for a missing `payload`;
/// `user_id` is a string or an integer (read as its decimal string).
/// Unknown fields are ignored.
pub fn parse_publish(body: &[u8], bounds: Bounds) -> Result<PublishRequest<'_>, ClientError> {
    let max_topic_bytes = bounds.topic_bytes;
    let text = std::str::from_utf8(body)
        .map_err(|_| ClientError::InvalidJson("body is not valid UTF-8".to_owned()))?;
    let raw: RawPublish<'_> = parse_object(text)?;
    let topic = topic_field(raw.topic, max_topic_bytes)?;
    let event = match raw.event {
        Some(event) => name_field(event, "event", bounds.name_bytes)?,
        None => Cow::Borrowed("message"),
    };
    if let Some(message) = raw.message {
        string_or(message, "message")?;
    }
    // The raw text of a JSON string is itself valid JSON, so no re-encoding.
    let payload_json = raw.payload.or(raw.message).map_or("null", RawValue::get);
    let user_id = match raw.user_id {
        None => None,
        Some(raw) => {
            let value: serde_json::Value = serde_json::from_str(raw.get())
                .map_err(|e| ClientError::InvalidJson(e.to_string()))?;
            if value.is_null() {
                None
            } else {
                let user = user_id_from_json(&value).ok_or(ClientError::WrongType {
                    field: "user_id",
                    expected: "a non-empty string or an integer",
                })?;
                check_name(&user, "user_id", bounds.name_bytes)?;
                Some(user)
            }
        }
    };
    let idempotency_key = raw
        .idempotency_key
        .map(|key| name_field(key, "idempotency_key", bounds.name_bytes))
        .transpose()?;
    Ok(PublishRequest {
        topic,
        event,
        payload_json,
        user_id,
        idempotency_key,
    })
}

/// A user id from JSON: a non-empty string as is, an integer as its decimal
/// string; anything else is `None`.
pub fn user_id_from_json(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(|u| u.to_string())
            .or_else(|| n.as_i64().map(|i| i.to_string())),
        _ => None,
    }
}

/// Appends `n` in decimal (a JSON number, an HTTP length), without going
/// through `fmt` or a temporary `String`.
pub fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `s` as a JSON string literal, escaped by serde_json.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        // Unreachable: serializing a str only fails on I/O, and Vec writes
        // cannot fail. Keep the output valid JSON anyway.
        out.extend_from_slice(b"\"\"");
    }
}

/// `{"type":"<kind>","topic":<topic>}` as a text frame.
fn typed_topic(kind: &str, topic: &str) -> Bytes {
    frame::text_with(24 + kind.len() + topic.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"topic\":");
        write_json_str(out, topic);
        out.push(b'}');
    })
}

/// `{"type":"subscribed","topic":T}` as a text frame.
pub fn subscribed(topic: &str) -> Bytes {
    typed_topic("subscribed", topic)
}

/// Added to a `subscribed` sent while the node cannot reach the rest of
/// the cluster: publications from other nodes reach the subscriber only
/// once the node is back (`/health` ok); a stream subscriber recovers
/// what it missed with `since`.
const DEGRADED: &[u8] = b",\"cluster\":\"degraded\"";

/// `{"type":"subscribed","topic":T,"cluster":"degraded"}` as a text frame.
pub fn subscribed_degraded(topic: &str) -> Bytes {
    frame::text_with(64 + topic.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"subscribed\",\"topic\":");
        write_json_str(out, topic);
        out.extend_from_slice(DEGRADED);
        out.push(b'}');
    })
}

/// `{"type":"unsubscribed","topic":T}` as a text frame.
pub fn unsubscribed(topic: &str) -> Bytes {
    typed_topic("unsubscribed", topic)
}

/// `{"type":"subscribed","topic":T,"recovered"?:B,"offset":N,"epoch":E}`:
/// the reply for a stream topic, with its position (and whether the
/// position the client asked to resume from was recovered).
pub fn subscribed_at(
    topic: &str,
    recovered: Option<bool>,
    offset: u64,
    epoch: &str,
    degraded: bool,
) -> Bytes {
    frame::text_with(96 + topic.len() + epoch.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"subscribed\",\"topic\":");
        write_json_str(out, topic);
        if let Some(recovered) = recovered {
            out.extend_from_slice(if recovered {
                b",\"recovered\":true"
            } else {
                b",\"recovered\":false"
            });
        }
        out.extend_from_slice(b",\"offset\":");
        write_decimal(out, offset);
        out.extend_from_slice(b",\"epoch\":");
        write_json_str(out, epoch);
        if degraded {
            out.extend_from_slice(DEGRADED);
        }
        out.push(b'}');
    })
}

/// `{"type":"reset","topic":T,"offset":0,"epoch":E}`: the stream lost its
/// history (a Redis restarted without persistence) and runs again from
/// offset 0 under a new epoch; the pushes that follow continue from there.
/// A subscriber replaces the position it kept with this one.
pub fn stream_reset(topic: &str, epoch: &str) -> Bytes {
    frame::text_with(64 + topic.len() + epoch.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"reset\",\"topic\":");
        write_json_str(out, topic);
        out.extend_from_slice(b",\"offset\":0,\"epoch\":");
        write_json_str(out, epoch);
        out.push(b'}');
    })
}

/// `{"type":"pong"}` as a text frame; static, no allocation.
pub fn pong() -> Bytes {
    Bytes::from_static(b"\x81\x0f{\"type\":\"pong\"}")
}

/// The plain text `pong` frame, the answer to a plain text `ping`.
pub fn pong_text() -> Bytes {
    Bytes::from_static(b"\x81\x04pong")
}

/// `{"type":"error","message":M}` as a text frame.
pub fn error(message: &str) -> Bytes {
    frame::text_with(32 + message.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"error\",\"message\":");
        write_json_str(out, message);
        out.push(b'}');
    })
}

/// `{"type":"push","topic":T,"event":E,"payload":P}` framed once; `payload_json`
/// must already be valid JSON (empty is sent as `null`).
pub fn push(topic: &str, event: &str, payload_json: &str) -> Bytes {
    let hint = 48 + topic.len() + event.len() + payload_json.len();
    frame::text_with(hint, |out| {
        out.extend_from_slice(b"{\"type\":\"push\",\"topic\":");
        write_json_str(out, topic);
        out.extend_from_slice(b",\"event\":");
        write_json_str(out, event);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(or_default(payload_json, "null").as_bytes());
        out.push(b'}');
    })
}

/// `{"type":"push","topic":T,"offset":N,"event":E,"payload":P}`: a
/// publication of a stream topic, framed once on its home.
pub fn push_at(topic: &str, offset: u64, event: &str, payload_json: &str) -> Bytes {
    let hint = 64 + topic.len() + event.len() + payload_json.len();
    frame::text_with(hint, |out| {
        out.extend_from_slice(b"{\"type\":\"push\",\"topic\":");
        write_json_str(out, topic);
        out.extend_from_slice(b",\"offset\":");
        write_decimal(out, offset);
        out.extend_from_slice(b",\"event\":");
        write_json_str(out, event);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(or_default(payload_json, "null").as_bytes());
        out.push(b'}');
    })
}

/// The JSON text of a server text frame built here (its payload: server
/// frames are unmasked), or `None` for anything else.
pub fn frame_json(frame: &[u8]) -> Option<&[u8]> {
    let (&first, rest) = frame.split_first()?;
    if first != 0x81 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = match len {
        126 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?,
            rest.get(8..)?,
        ),
        n => (usize::from(n), rest),
    };
    (rest.len() == len).then_some(rest)
}

/// A replayed stream publication (last values sent on subscribe): the stored
/// push with `"replay":true`, so a client can tell it from live traffic.
pub fn replayed(push_frame: &[u8]) -> Option<Bytes> {
    let json = frame_json(push_frame)?;
    let rest = json.strip_prefix(b"{\"type\":\"push\",")?;
    Some(frame::text_with(json.len() + 16, |out| {
        out.extend_from_slice(b"{\"type\":\"push\",\"replay\":true,");
        out.extend_from_slice(rest);
    }))
}

/// `{"type":"presence","topic":T,"count":N,"members":M}` as a text frame;
/// `members_json` must be a JSON array (empty is sent as `[]`).
pub fn presence<'a>(
    topic: &str,
    count: usize,
    members: impl Iterator<Item = &'a str> + Clone,
    next: Option<&str>,
) -> Bytes {
    let hint = 64 + topic.len() + members.clone().map(|m| m.len() + 1).sum::<usize>();
    frame::text_with(hint, |out| {
        out.extend_from_slice(b"{\"type\":\"presence\",\"topic\":");
        write_json_str(out, topic);
        out.push(b',');
        write_members(out, count, members, next);
        out.push(b'}');
    })
}

fn or_default<'a>(json: &'a str, default: &'a str) -> &'a str {
    if json.trim().is_empty() {
        default
    } else {
        json
    }
}

/// `"count":N,"members":[..]` and, when more members follow, `"next":C`:
/// the fields of a presence answer, over HTTP and on a WebSocket.
pub fn write_members<'a>(
    out: &mut Vec<u8>,
    count: usize,
    members: impl Iterator<Item = &'a str>,
    next: Option<&str>,
) {
    out.extend_from_slice(b"\"count\":");
    write_decimal(out, count as u64);
    out.extend_from_slice(b",\"members\":[");
    for (i, member) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(member.as_bytes());
    }
    out.push(b']');
    if let Some(next) = next {
        out.extend_from_slice(b",\"next\":");
        write_json_str(out, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Bounds = Bounds {
        topic_bytes: 16,
        name_bytes: 16,
    };

    fn parse(text: &str) -> Result<ClientMessage<'_>, ClientError> {
        parse_client(text, MAX)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// The JSON payload of an unmasked server text frame.
    fn json_of(frame: &Bytes) -> serde_json::Value {
        assert_eq!(frame[0], 0x81);
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), start + len);
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        assert_eq!(
            parse(r#"{"type":"subscribe","topic":"orders:new"}"#),
            Ok(ClientMessage::Subscribe {
                topic: "orders:new".into(),
                since: None,
            })
        );
        assert_eq!(
            parse(r#" {"topic":"a","type":"unsubscribe","extra":[1,2]} "#),
            Ok(ClientMessage::Unsubscribe { topic: "a".into() })
        );
    }

    #[test]
    fn topics_borrow_unless_escaped() {
        let Ok(ClientMessage::Subscribe { topic, .. }) =
            parse(r#"{"type":"subscribe","topic":"abc"}"#)
        else {
            panic!()
        };
        assert!(matches!(topic, Cow::Borrowed("abc")));
        let Ok(ClientMessage::Subscribe { topic, .. }) =
            parse(r#"{"type":"subscribe","topic":"a\u00e9"}"#)
        else {
            panic!()
        };
        assert_eq!(topic, "aé");
    }

    #[test]
    fn publish_with_and_without_event_and_payload() {
        let Ok(ClientMessage::Publish {
            topic,
            event,
            payload,
            idempotency_key,
        }) = parse(
            r#"{"type":"message","topic":"room:1","event":"say","payload":{"text":"hi"},"idempotency_key":"k"}"#,
        )
        else {
            panic!()
        };
        assert_eq!(idempotency_key.as_deref(), Some("k"));
        assert_eq!(topic, "room:1");
        assert_eq!(event.as_deref(), Some("say"));
        assert_eq!(payload.map(RawValue::get), Some(r#"{"text":"hi"}"#));
        assert_eq!(
            parse(r#"{"type":"message","topic":"t"}"#),
            Ok(ClientMessage::Publish {
                topic: "t".into(),
                event: None,
                payload: None,
                idempotency_key: None,
            })
        );
        assert_eq!(
            err(r#"{"type":"message","topic":"t","event":3}"#),
            "field `event` must be a string"
        );
    }

    #[test]
    fn ping_forms() {
        assert_eq!(parse("ping"), Ok(ClientMessage::Ping));
        assert_eq!(parse(" ping\n"), Ok(ClientMessage::Ping));
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping));
        assert_eq!(
            err("pingx"),
            "invalid JSON: expected value at line 1 column 1"
        );
    }

    fn named(topic: &str) -> TopicRequest<'_> {
        TopicRequest {
            topic: topic.into(),
            since: None,
        }
    }

    #[test]
    fn subscribes_may_carry_a_position_to_recover_from() {
        let since = Some(Since {
            offset: 41,
            epoch: "e1".into(),
        });
        assert_eq!(
            parse(r#"{"type":"subscribe","topic":"t","since":{"offset":41,"epoch":"e1"}}"#),
            Ok(ClientMessage::Subscribe {
                topic: "t".into(),
                since: since.clone(),
            })
        );
        assert_eq!(
            parse(
                r#"{"topics":["a",{"topic":"b","since":{"offset":41,"epoch":"e1"}},{"topic":"c"}]}"#
            ),
            Ok(ClientMessage::SetTopics(vec![
                named("a"),
                TopicRequest {
                    topic: "b".into(),
                    since,
                },
                named("c"),
            ]))
        );
        assert_eq!(
            err(r#"{"type":"subscribe","topic":"t","since":{"offset":-1,"epoch":"e"}}"#),
            r#"field `since` must be an object {"offset":N,"epoch":E}"#
        );
        assert_eq!(
            err(r#"{"type":"subscribe","topic":"t","since":7}"#),
            r#"field `since` must be an object {"offset":N,"epoch":E}"#
        );
        assert_eq!(
            err(r#"{"type":"subscribe","topic":"t","since":[1,"e1"]}"#),
            r#"field `since` must be an object {"offset":N,"epoch":E}"#,
            "serde would read the struct from an array too"
        );
        let long = format!(
            r#"{{"type":"subscribe","topic":"t","since":{{"offset":1,"epoch":"{}"}}}}"#,
            "e".repeat(MAX_EPOCH_BYTES + 1)
        );
        assert!(err(&long).contains("since.epoch"), "{}", err(&long));
    }

    #[test]
    fn stream_replies_carry_positions_and_replays_are_marked() {
        assert_eq!(
            json_of(&subscribed_at("t", Some(true), 7, "e1", false)),
            serde_json::json!({"type":"subscribed","topic":"t","recovered":true,"offset":7,"epoch":"e1"})
        );
        assert_eq!(
            json_of(&subscribed_at("t", None, 0, "e1", true)),
            serde_json::json!({"type":"subscribed","topic":"t","offset":0,"epoch":"e1","cluster":"degraded"})
        );
        let live = push_at("t", 3, "tick", r#"{"v":1}"#);
        assert_eq!(
            json_of(&live),
            serde_json::json!({"type":"push","topic":"t","offset":3,"event":"tick","payload":{"v":1}})
        );
        let big = push_at("t", 4, "e", &format!("\"{}\"", "x".repeat(70_000)));
        assert!(frame_json(&big).is_some(), "a 64-bit length");
        let replay = replayed(&live).unwrap();
        assert_eq!(
            json_of(&replay),
            serde_json::json!({"type":"push","replay":true,"topic":"t","offset":3,"event":"tick","payload":{"v":1}})
        );
    }

    #[test]
    fn set_topics_and_presence() {
        assert_eq!(
            parse(r#"{"topics":["cats","dogs"]}"#),
            Ok(ClientMessage::SetTopics(vec![named("cats"), named("dogs")]))
        );
        assert_eq!(
            parse(r#"{"topics":[]}"#),
            Ok(ClientMessage::SetTopics(vec![]))
        );
        assert_eq!(
            err(r#"{"topics":"cats"}"#),
            r#"field `topics` must be an array of topic names or {"topic":T,"since":{"offset":N,"epoch":E}}"#
        );
        assert_eq!(
            err(r#"{"topics":["ok",""]}"#),
            "topic must be a non-empty string of at most 16 bytes"
        );
        assert_eq!(
            parse(r#"{"type":"presence","topic":"room:1"}"#),
            Ok(ClientMessage::Presence {
                topic: "room:1".into(),
                page: MemberPage::default(),
            })
        );
        assert_eq!(
            parse(r#"{"type":"presence","topic":"room:1","limit":10,"after":"0-4-1"}"#),
            Ok(ClientMessage::Presence {
                topic: "room:1".into(),
                page: MemberPage {
                    limit: Some(10),
                    after: Some("0-4-1".into()),
                },
            })
        );
        assert!(err(r#"{"type":"presence","topic":"r","limit":-1}"#).contains("limit"));
    }

    #[test]
    fn error_texts() {
        assert!(err("{").starts_with("invalid JSON: EOF while parsing an object"));
        assert_eq!(err("[1,2]"), "message must be a JSON object");
        assert_eq!(err("42"), "message must be a JSON object");
        assert_eq!(err(r#"{"topic":"a"}"#), "missing field `type`");
        assert_eq!(err(r#"{"type":"subscribe"}"#), "missing field `topic`");
        assert_eq!(
            err(r#"{"type":"subscribe","topic":null}"#),
            "missing field `topic`"
        );
        assert_eq!(
            err(r#"{"type":"dance","topic":"a"}"#),
            "unknown message type `dance`"
        );
        assert_eq!(err(r#"{"type":7}"#), "field `type` must be a string");
        let long_type = format!(r#"{{"type":"{}"}}"#, "x".repeat(200));
        assert_eq!(
            err(&long_type),
            format!("unknown message type `{}`", "x".repeat(64))
        );
        for bad in [r#""""#, r#""aaaaaaaaaaaaaaaaa""#, r#""a\nb""#, "5", "[]"] {
            let text = format!(r#"{{"type":"subscribe","topic":{bad}}}"#);
            assert_eq!(
                err(&text),
                "topic must be a non-empty string of at most 16 bytes",
                "{bad}"
            );
        }
        assert!(err(r#"{"type":"subscribe","topic":"a","topic":"b"}"#)
            .contains("duplicate field `topic`"));
    }

    #[test]
    fn publish_body_rules() {
        let full = parse_publish(
            br#"{"topic":"t","event":"e","payload":{"a":[1, 2]},"user_id":"u1","x":1,"idempotency_key":"k-1"}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(
            full,
            PublishRequest {
                topic: "t".into(),
                event: "e".into(),
                payload_json: r#"{"a":[1, 2]}"#,
                user_id: Some("u1".into()),
                idempotency_key: Some("k-1".into()),
            }
        );
        for bad in [r#""""#, "1", "[]"] {
            let body = format!(r#"{{"topic":"t","idempotency_key":{bad}}}"#);
            assert!(parse_publish(body.as_bytes(), MAX).is_err(), "{bad}");
        }
        let bare = parse_publish(br#"{"topic":"t"}"#, MAX).unwrap();
        assert_eq!(
            (&*bare.event, bare.payload_json, bare.user_id),
            ("message", "null", None)
        );
        let message = parse_publish(br#"{"topic":"t","message":"hi \"you\""}"#, MAX).unwrap();
        assert_eq!(message.event, "message");
        assert_eq!(message.payload_json, r#""hi \"you\"""#);
        let numeric = parse_publish(br#"{"topic":"t","user_id":42}"#, MAX).unwrap();
        assert_eq!(numeric.user_id.as_deref(), Some("42"));
        let null_user = parse_publish(br#"{"topic":"t","user_id":null}"#, MAX).unwrap();
        assert_eq!(null_user.user_id, None);
    }

    #[test]
    fn publish_body_errors() {
        let e = |body: &[u8]| parse_publish(body, MAX).unwrap_err().to_string();
        assert_eq!(e(br#"{"event":"x"}"#), "missing field `topic`");
        assert_eq!(
            e(br#"{"topic":"t","user_id":1.5}"#),
            "field `user_id` must be a non-empty string or an integer"
        );
        assert_eq!(
            e(br#"{"topic":"t","user_id":true}"#),
            "field `user_id` must be a non-empty string or an integer"
        );
        assert_eq!(
            e(br#"{"topic":"t","message":3}"#),
            "field `message` must be a string"
        );
        assert_eq!(e(b"\xff"), "invalid JSON: body is not valid UTF-8");
        assert_eq!(e(b"[]"), "message must be a JSON object");
        assert!(e(b"").starts_with("invalid JSON: EOF while parsing"));
    }

    #[test]
    fn user_id_from_json_forms() {
        use serde_json::json;
        assert_eq!(user_id_from_json(&json!("abc")).as_deref(), Some("abc"));
        assert_eq!(user_id_from_json(&json!(-7)).as_deref(), Some("-7"));
        assert_eq!(
            user_id_from_json(&json!(18446744073709551615u64)).as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(user_id_from_json(&json!("")), None);
        assert_eq!(user_id_from_json(&json!(null)), None);
        assert_eq!(user_id_from_json(&json!({"id": 1})), None);
    }

    #[test]
    fn server_messages_are_framed_json() {
        assert_eq!(
            &subscribed("a\"b")[..],
            b"\x81\x24{\"type\":\"subscribed\",\"topic\":\"a\\\"b\"}"
        );
        assert_eq!(
            json_of(&unsubscribed("x")),
            serde_json::json!({"type":"unsubscribed","topic":"x"})
        );
        assert_eq!(pong(), frame::text(br#"{"type":"pong"}"#));
        assert_eq!(pong_text(), frame::text(b"pong"));
        assert_eq!(
            json_of(&error("bad\n")),
            serde_json::json!({"type":"error","message":"bad\n"})
        );
        assert_eq!(
            json_of(&push("room:1", "say", r#"{"text":"hi"}"#)),
            serde_json::json!({"type":"push","topic":"room:1","event":"say","payload":{"text":"hi"}})
        );
        assert_eq!(
            json_of(&push("t", "e", "")),
            serde_json::json!({"type":"push","topic":"t","event":"e","payload":null})
        );
        let members = [r#"{"conn_id":1}"#, r#"{"conn_id":2}"#];
        assert_eq!(
            json_of(&presence("t", 2, members.into_iter(), None)),
            serde_json::json!({"type":"presence","topic":"t","count":2,"members":[{"conn_id":1},{"conn_id":2}]})
        );
        assert_eq!(
            json_of(&presence("t", 5, members.into_iter(), Some("0-2-1"))),
            serde_json::json!({"type":"presence","topic":"t","count":5,"members":[{"conn_id":1},{"conn_id":2}],"next":"0-2-1"})
        );
        let big = push("t", "e", &format!("\"{}\"", "y".repeat(300)));
        assert_eq!(json_of(&big)["payload"].as_str().map(str::len), Some(300));
    }

    #[test]
    fn write_json_str_escapes_controls_and_unicode() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a\u{1}é\"\\");
        assert_eq!(out, r#""a\u0001é\"\\""#.as_bytes());
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn payloads_nested_up_to_the_limit_are_accepted_and_deeper_refused() {
        let publish = |payload: &str| {
            let body = format!(r#"{{"topic":"t","payload":{payload}}}"#);
            parse_publish(body.as_bytes(), MAX).map(|p| p.payload_json.to_owned())
        };
        let deepest = nested(MAX_PAYLOAD_DEPTH);
        assert_eq!(publish(&deepest).unwrap(), deepest);
        let too_deep = ClientError::TooDeep {
            max_depth: MAX_PAYLOAD_DEPTH,
        };
        assert_eq!(
            publish(&nested(MAX_PAYLOAD_DEPTH + 1)),
            Err(too_deep.clone())
        );
        assert_eq!(too_deep.to_string(), "JSON nested deeper than 128 levels");

        let message = |payload: &str| {
            let text = format!(r#"{{"type":"message","topic":"t","payload":{payload}}}"#);
            parse_client(&text, MAX)
                .map(|m| matches!(m, ClientMessage::Publish { .. }))
                .map_err(|e| e.to_string())
        };
        assert_eq!(message(&deepest), Ok(true));
        assert_eq!(
            message(&format!("{{\"a\":{}}}", nested(MAX_PAYLOAD_DEPTH))),
            Err("JSON nested deeper than 128 levels".to_owned())
        );
    }

    #[test]
    fn a_half_million_deep_payload_is_refused_by_publish_and_by_clients() {
        let deep = "[".repeat(500_000);
        let body = format!(r#"{{"topic":"t","payload":{deep}"#);
        let too_deep = ClientError::TooDeep {
            max_depth: MAX_PAYLOAD_DEPTH,
        };
        assert_eq!(parse_publish(body.as_bytes(), MAX), Err(too_deep.clone()));
        let text = format!(r#"{{"type":"message","topic":"t","payload":{deep}"#);
        assert_eq!(parse_client(&text, MAX).unwrap_err(), too_deep);
        let elsewhere = format!(r#"{{"type":"ping","junk":{}}}"#, nested(500_000));
        assert_eq!(parse_client(&elsewhere, MAX).unwrap_err(), too_deep);
    }

    #[test]
    fn brackets_inside_strings_do_not_nest() {
        let brackets = format!(r#"{{"topic":"t","payload":["\"{}\\"]}}"#, "[{".repeat(1000));
        assert!(parse_publish(brackets.as_bytes(), MAX).is_ok());
        assert!(!nests_deeper_than(br#""\"[[""#, 0), "escaped quote");
        assert!(nests_deeper_than(br#"["\\",[["#, 2), "escaped backslash");
        assert!(!nests_deeper_than(b"]]]]{}", 1));
    }

    #[test]
    fn serde_json_limits_typed_parsing_but_not_raw_values() {
        // Why the scan exists: `Value` (how `/register` bodies are read) stops
        // at 128 levels, `RawValue` (how payloads are kept) never does.
        let at = |depth| serde_json::from_str::<serde_json::Value>(&nested(depth)).is_ok();
        assert!(at(127) && !at(128));
        assert!(serde_json::from_str::<&RawValue>(&nested(100_000)).is_ok());
    }
}
