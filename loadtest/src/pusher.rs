//! Pusher Channels (protocol 7) pieces for `--protocol pusher`: the app
//! (`--pusher-app ID:KEY:SECRET`), the subscriber's URL and frames, and the
//! signature of an HTTP API publish (`POST /apps/{id}/events`). Pure
//! functions, no I/O: the subscriber and publisher paths are the same as for
//! ringcast's own protocol, only the bytes differ.
//!
//! A publish is `{"name":"e","channels":["<topic>"],"data":"<marker+padding>"}`;
//! the server delivers `{"event":"e","channel":"<topic>","data":"<marker+padding>"}`,
//! and the subscriber finds the marker in it exactly as in a ringcast push.

use anyhow::{bail, Result};
use md5::{Digest, Md5};
use std::fmt::Write as _;

/// The event name every publish uses.
pub(crate) const EVENT: &str = "e";
/// Sent by the server once the connection is usable; the subscribe waits for it.
pub(crate) const CONNECTION_ESTABLISHED: &str = "pusher:connection_established";
/// The server's answer to a successful `pusher:subscribe`.
pub(crate) const SUBSCRIBED: &str = "pusher_internal:subscription_succeeded";
/// The subscribe frame (`{topic}` is replaced by the channel name).
pub(crate) const SUBSCRIBE: &str = r#"{"event":"pusher:subscribe","data":{"channel":"{topic}"}}"#;

/// One Pusher app as the load tool uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct App {
    /// In the HTTP API's path.
    pub(crate) id: String,
    /// In the WebSocket URL and every publish's `auth_key`.
    pub(crate) key: String,
    /// Signs the publishes.
    pub(crate) secret: String,
}

impl App {
    /// Parses `ID:KEY:SECRET` (the secret may itself contain `:`).
    pub(crate) fn parse(s: &str) -> Result<App> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                for (what, v) in [("id", id), ("key", key)] {
                    if !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                    {
                        bail!("--pusher-app: the app {what} `{v}` must be A-Z a-z 0-9 . _ -");
                    }
                }
                Ok(App {
                    id: id.into(),
                    key: key.into(),
                    secret: secret.into(),
                })
            }
            _ => bail!("--pusher-app wants ID:KEY:SECRET, got `{s}`"),
        }
    }

    /// The subscribe URL on `host` (Pusher's client query parameters).
    pub(crate) fn sub_url(&self, host: &str) -> String {
        format!(
            "ws://{host}/app/{}?protocol=7&client=ringcast-load&version=1",
            self.key
        )
    }

    /// The HTTP API's events URL on `host`.
    pub(crate) fn events_url(&self, host: &str) -> String {
        format!("http://{host}/apps/{}/events", self.id)
    }

    /// The signed query string of a `POST` of `body` to `path` at Unix time
    /// `timestamp`: `auth_key`, `auth_timestamp`, `auth_version`,
    /// `body_md5` (sorted, as signed) and then `auth_signature`.
    pub(crate) fn signed_query(&self, path: &str, body: &[u8], timestamp: u64) -> String {
        let mut query = String::with_capacity(200);
        let _ = write!(
            query,
            "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5=",
            self.key
        );
        push_hex(&mut query, &Md5::digest(body));
        let mut signed = String::with_capacity(path.len() + query.len() + 8);
        signed.push_str("POST\n");
        signed.push_str(path);
        signed.push('\n');
        signed.push_str(&query);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        query.push_str("&auth_signature=");
        push_hex(&mut query, tag.as_ref());
        query
    }
}

/// The body prefix of a publish to `channel`; the marker and padding follow,
/// then [`BODY_SUFFIX`]. Neither contains a JSON metacharacter, so the
/// data string needs no escaping.
pub(crate) fn body_prefix(channel: &str) -> String {
    format!(r#"{{"name":"{EVENT}","channels":["{channel}"],"data":""#)
}

/// What closes a publish body.
pub(crate) const BODY_SUFFIX: &str = "\"}";

/// Whether `name` is a public Pusher channel name: 1 to 164 of
/// `A-Z a-z 0-9 _ - = @ , . ;`, and not `private-`/`presence-` (those need
/// an authorization this tool does not make).
pub(crate) fn public_channel(name: &str) -> bool {
    (1..=164).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
        && !name.starts_with("private-")
        && !name.starts_with("presence-")
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_pushers_documented_example() {
        // Pusher's HTTP API reference: POST /apps/3/events.
        let app = App::parse("3:278d425bdf160c739803:7ad3773142a6692b25b8").unwrap();
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            app.signed_query("/apps/3/events", body.as_bytes(), 1_353_088_179),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn apps_and_channel_names_parse() {
        let app = App::parse("4711:app-key:app:secret").unwrap();
        assert_eq!(app.id, "4711");
        assert_eq!(app.key, "app-key");
        assert_eq!(app.secret, "app:secret");
        assert!(App::parse("4711:app-key").is_err());
        assert!(App::parse("4711::s").is_err());
        assert!(App::parse("47/11:k:s").is_err());
        assert_eq!(
            app.sub_url("127.0.0.1:6001"),
            "ws://127.0.0.1:6001/app/app-key?protocol=7&client=ringcast-load&version=1"
        );
        assert_eq!(
            app.events_url("127.0.0.1:6001"),
            "http://127.0.0.1:6001/apps/4711/events"
        );
        assert!(public_channel("t17"));
        assert!(public_channel("load-3"));
        assert!(!public_channel("private-x"));
        assert!(!public_channel("a b"));
        assert!(!public_channel(""));
    }
}
