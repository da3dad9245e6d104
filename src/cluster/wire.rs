//! What goes through Redis: channel names and the messages on them.
//!
//! A name held by any shard of a node (a topic, a user id for publishes to
//! that user, a user id for `/chat`) is one Redis channel, subscribed with
//! sharded pub/sub. The name sits in a hash tag, so in a Redis Cluster a
//! topic's channel (and later its stream keys) live on one slot:
//!
//! ```text
//! {prefix}:t:{orders:eu}     topic
//! {prefix}:u:{alice}         publishes to user alice
//! {prefix}:c:{alice}         chat lines to alice
//! ```
//!
//! A message is the frame subscribers get, framed once on the publishing
//! node, behind a small header: the publishing node's id (so a node skips
//! its own publications, which its shards delivered already) and, for a
//! publish to a user, the topic the user's connections must hold.
//!
//! ```text
//! 'F' | node id (8, little-endian) | topic length (2, LE; 0 but for user publishes) | topic | frame
//! ```
//!
//! Stream publications (`S...`, see `cluster::streams`) are written by a
//! Redis script instead, and every node, the publisher's too, delivers them.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::bus::{Envelope, IndexKind};

/// The letter of an index kind in channel names.
fn letter(kind: IndexKind) -> char {
    match kind {
        IndexKind::Topic => 't',
        IndexKind::User => 'u',
        IndexKind::Chat => 'c',
    }
}

/// The publisher of a message that every node delivers, the one that
/// published it too (node ids are never 0): Redis publishes it for the
/// node, in the step that decided it (`cluster::state::member_events`).
pub const EVERY_NODE: u64 = 0;

/// The Redis channel of `name` in index `kind`.
pub fn channel(prefix: &str, kind: IndexKind, name: &str) -> String {
    format!("{prefix}:{}:{{{name}}}", letter(kind))
}

/// The index kind and name a channel of ours stands for.
pub fn parse_channel<'a>(prefix: &str, channel: &'a str) -> Option<(IndexKind, &'a str)> {
    let rest = channel.strip_prefix(prefix)?.strip_prefix(':')?;
    let mut chars = rest.chars();
    let kind = match chars.next()? {
        't' => IndexKind::Topic,
        'u' => IndexKind::User,
        'c' => IndexKind::Chat,
        _ => return None,
    };
    let name = chars.as_str().strip_prefix(":{")?.strip_suffix('}')?;
    Some((kind, name))
}

/// The Redis channel and message carrying a publication to the other
/// nodes; `None` for a topic too long for the header (never a valid one).
pub fn encode(
    prefix: &str,
    node: u64,
    kind: IndexKind,
    name: &str,
    topic: Option<&str>,
    frame: &[u8],
) -> Option<(String, Bytes)> {
    let topic = topic.unwrap_or("");
    let topic_len = u16::try_from(topic.len()).ok()?;
    let mut message = BytesMut::with_capacity(11 + topic.len() + frame.len());
    message.put_u8(b'F');
    message.put_u64_le(node);
    message.put_u16_le(topic_len);
    message.put_slice(topic.as_bytes());
    message.put_slice(frame);
    Some((channel(prefix, kind, name), message.freeze()))
}

/// A message read from a channel: who published it, and the envelope for
/// the shards holding the channel's name.
pub struct Received {
    /// The publishing node's id.
    pub node: u64,
    /// What the shards get.
    pub envelope: Envelope,
}

/// Decodes a message on the channel of (`kind`, `name`); `None` if it is
/// not one of ours (too short, a topic that is not UTF-8).
pub fn decode(kind: IndexKind, name: &Arc<str>, mut message: Bytes) -> Option<Received> {
    if message.len() < 11 || message[0] != b'F' {
        return None;
    }
    let _ = message.split_to(1);
    let node = u64::from_le_bytes(message[..8].try_into().ok()?);
    let topic_len = usize::from(u16::from_le_bytes(message[8..10].try_into().ok()?));
    if message.len() < 10 + topic_len {
        return None;
    }
    let topic = std::str::from_utf8(&message[10..10 + topic_len]).ok()?;
    let topic: Arc<str> = Arc::from(topic);
    let frame = message.split_off(10 + topic_len);
    let envelope = match kind {
        IndexKind::Topic => Envelope::Publish {
            topic: name.clone(),
            frame,
        },
        IndexKind::User => Envelope::UserPublish {
            user: name.clone(),
            topic,
            frame,
        },
        IndexKind::Chat => Envelope::Chat {
            user: name.clone(),
            frame,
        },
    };
    Some(Received { node, envelope })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_kind_and_keep_the_name_in_a_hash_tag() {
        assert_eq!(
            channel("rc", IndexKind::Topic, "orders:eu"),
            "rc:t:{orders:eu}"
        );
        assert_eq!(channel("rc", IndexKind::Chat, "al}ce"), "rc:c:{al}ce}");
        for (kind, name) in [
            (IndexKind::Topic, "orders:eu"),
            (IndexKind::User, "a{b}c"),
            (IndexKind::Chat, ""),
        ] {
            let ch = channel("rc", kind, name);
            assert_eq!(parse_channel("rc", &ch), Some((kind, name)));
        }
        assert_eq!(parse_channel("other", "rc:t:{x}"), None);
        assert_eq!(parse_channel("rc", "rc:x:{x}"), None);
        assert_eq!(parse_channel("rc", "rc:t:x"), None);
    }

    #[test]
    fn a_user_publish_survives_the_round_trip_with_its_topic() {
        let frame = b"\x81\x02hi";
        let (ch, message) = encode("rc", 7, IndexKind::User, "alice", Some("news"), frame).unwrap();
        assert_eq!(ch, "rc:u:{alice}");
        let name: Arc<str> = "alice".into();
        let received = decode(IndexKind::User, &name, message).unwrap();
        assert_eq!(received.node, 7);
        match received.envelope {
            Envelope::UserPublish { user, topic, frame } => {
                assert_eq!(
                    (&*user, &*topic, &frame[..]),
                    ("alice", "news", &b"\x81\x02hi"[..])
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn truncated_messages_are_not_ours() {
        let name: Arc<str> = "t".into();
        assert!(decode(IndexKind::Topic, &name, Bytes::from_static(b"short")).is_none());
        let mut claims_long_topic = b"F".to_vec();
        claims_long_topic.extend_from_slice(&[0u8; 8]);
        claims_long_topic.extend_from_slice(&500u16.to_le_bytes());
        claims_long_topic.extend_from_slice(b"abc");
        assert!(decode(IndexKind::User, &name, claims_long_topic.into()).is_none());
    }
}
