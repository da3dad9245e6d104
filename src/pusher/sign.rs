//! The signatures of the Pusher protocol, all HMAC-SHA256 with the app's
//! secret, in lowercase hex, checked in constant time (`ring::hmac::verify`):
//!
//! - a private or presence channel's authorization, `<key>:<sig>` over
//!   `socket_id:channel` (and `:channel_data` for presence), made by the
//!   app's backend when its client subscribes;
//! - a user's sign-in, over `socket_id::user::user_data`;
//! - an HTTP API request: `auth_key`, `auth_timestamp` (within 600 s of the
//!   node's clock), `auth_version=1.0`, `body_md5` (for a body) and
//!   `auth_signature` over `METHOD\npath\n` and the other query parameters
//!   sorted by key, `key=value` joined with `&`.

use std::fmt;

use md5::{Digest, Md5};
use ring::hmac;

use super::App;

/// How far an HTTP API request's `auth_timestamp` may be from the node's
/// clock, either way (Pusher's 600 s).
pub const MAX_CLOCK_SKEW_S: u64 = 600;
/// Most query parameters of a signed request (Pusher's use at most five).
const MAX_PARAMS: usize = 32;

/// The lowercase hex HMAC-SHA256 of `data` keyed with `secret`.
pub fn hmac_hex(secret: &str, data: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hex(hmac::sign(&key, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// Whether `signature` (hex, either case) is the HMAC of `data`: in
/// constant time once it decodes.
fn verify(secret: &str, data: &[u8], signature: &str) -> bool {
    let Some(tag) = unhex(signature) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, data, &tag).is_ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 128 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

/// Whether `auth` (`<key>:<signature>`) is `app`'s authorization of
/// `socket_id` on `channel`; a presence channel's also covers its
/// `channel_data` (the member's JSON, as the client sent it).
pub fn channel_authorized(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some(signature) = auth
        .split_once(':')
        .filter(|(key, _)| *key == app.key)
        .map(|(_, s)| s)
    else {
        return false;
    };
    let mut data = format!("{socket_id}:{channel}");
    if let Some(channel_data) = channel_data {
        data.push(':');
        data.push_str(channel_data);
    }
    verify(&app.secret, data.as_bytes(), signature)
}

/// Whether `auth` (`<key>:<signature>`) is `app`'s sign-in of the user
/// `user_data` (JSON, as sent) on `socket_id`.
pub fn user_authenticated(app: &App, socket_id: &str, user_data: &str, auth: &str) -> bool {
    let Some((key, signature)) = auth.split_once(':') else {
        return false;
    };
    key == app.key
        && verify(
            &app.secret,
            format!("{socket_id}::user::{user_data}").as_bytes(),
            signature,
        )
}

/// Why an HTTP API request's signature does not hold (the node answers
/// `401` with this text, as Pusher does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAuthError {
    /// A required parameter is missing (or a parameter is malformed).
    Missing(&'static str),
    Malformed(String),
    /// `auth_key` is not the app's key.
    UnknownKey,
    /// `auth_version` is not `1.0`.
    Version,
    /// `auth_timestamp` is more than 600 s from the node's clock.
    Stale {
        timestamp: u64,
        now: u64,
    },
    /// `body_md5` is not the body's MD5.
    BodyMd5,
    /// `auth_signature` is not the request's.
    Signature,
}

impl fmt::Display for ApiAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAuthError::Missing(param) => write!(f, "Missing parameter: {param}"),
            ApiAuthError::Malformed(why) => write!(f, "Malformed query: {why}"),
            ApiAuthError::UnknownKey => write!(f, "Unknown auth_key"),
            ApiAuthError::Version => write!(f, "Invalid auth_version: only 1.0 is supported"),
            ApiAuthError::Stale { timestamp, now } => write!(
                f,
                "Timestamp expired: Given timestamp ({timestamp}) not within {MAX_CLOCK_SKEW_S}s of server time ({now})"
            ),
            ApiAuthError::BodyMd5 => write!(f, "body_md5 does not match the body"),
            ApiAuthError::Signature => write!(f, "Invalid signature: you should have sent HmacSHA256Hex of the method, path and sorted query with your secret"),
        }
    }
}

/// Checks that the request `method path?query` with `body` was signed by
/// `app`, at `now` (Unix seconds). `query` is the raw query string.
pub fn check_api_request(
    app: &App,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now: u64,
) -> Result<(), ApiAuthError> {
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if params.len() == MAX_PARAMS {
            return Err(ApiAuthError::Malformed(format!(
                "more than {MAX_PARAMS} parameters"
            )));
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded =
            |s: &str| percent_decode(s).ok_or_else(|| ApiAuthError::Malformed(format!("`{pair}`")));
        params.push((decoded(key)?.to_ascii_lowercase(), decoded(value)?));
    }
    let get = |name: &'static str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or(ApiAuthError::Missing(name))
    };
    if get("auth_key")? != app.key {
        return Err(ApiAuthError::UnknownKey);
    }
    let timestamp: u64 = get("auth_timestamp")?
        .parse()
        .map_err(|_| ApiAuthError::Malformed("auth_timestamp is not a number".into()))?;
    if timestamp.abs_diff(now) > MAX_CLOCK_SKEW_S {
        return Err(ApiAuthError::Stale { timestamp, now });
    }
    if get("auth_version")? != "1.0" {
        return Err(ApiAuthError::Version);
    }
    let claimed_md5 = if body.is_empty() {
        None
    } else {
        Some(get("body_md5")?.to_string())
    };
    let signature = get("auth_signature")?.to_string();
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let mut signed = format!("{}\n{path}\n", method.to_ascii_uppercase());
    for (i, (key, value)) in params.iter().enumerate() {
        if i > 0 {
            signed.push('&');
        }
        signed.push_str(key);
        signed.push('=');
        signed.push_str(value);
    }
    if !verify(&app.secret, signed.as_bytes(), &signature) {
        return Err(ApiAuthError::Signature);
    }
    // Only a signed request has its body hashed: the key is public (it is
    // in every client), so checking the MD5 first would let anyone make
    // the node hash a megabyte per request.
    match claimed_md5 {
        Some(claimed) if !claimed.eq_ignore_ascii_case(&hex(&Md5::digest(body))) => {
            Err(ApiAuthError::BodyMd5)
        }
        _ => Ok(()),
    }
}

/// `%XX` decoded (a `+` stays: Pusher's libraries sign values as sent);
/// `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_string());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = bytes.get(i + 1..i + 3)?;
            out.push(unhex(std::str::from_utf8(pair).ok()?)?[0]);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The app of Pusher's documentation examples.
    fn app() -> App {
        App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            client_events: false,
            max_connections: None,
            max_event_bytes: 10_240,
            max_presence_members: 100,
            webhook_url: None,
            webhook_events: Vec::new(),
        }
    }

    #[test]
    fn a_private_channel_authorization_matches_pushers_documented_example() {
        let auth =
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert!(channel_authorized(
            &app(),
            "1234.1234",
            "private-foobar",
            None,
            auth
        ));
        assert!(!channel_authorized(
            &app(),
            "1234.1235",
            "private-foobar",
            None,
            auth
        ));
        assert!(!channel_authorized(
            &app(),
            "1234.1234",
            "private-foobaz",
            None,
            auth
        ));
        let other_key = auth.replacen("278d", "378d", 1);
        assert!(!channel_authorized(
            &app(),
            "1234.1234",
            "private-foobar",
            None,
            &other_key
        ));
        for broken in [
            "",
            "278d425bdf160c739803",
            "278d425bdf160c739803:zz",
            "x:y:z",
        ] {
            assert!(!channel_authorized(
                &app(),
                "1234.1234",
                "private-foobar",
                None,
                broken
            ));
        }
    }

    #[test]
    fn a_presence_authorization_covers_its_channel_data() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let signature = hmac_hex(
            "7ad3773142a6692b25b8",
            format!("1234.1234:presence-foobar:{data}").as_bytes(),
        );
        let auth = format!("278d425bdf160c739803:{signature}");
        assert!(channel_authorized(
            &app(),
            "1234.1234",
            "presence-foobar",
            Some(data),
            &auth
        ));
        let forged = data.replace("10", "11");
        assert!(!channel_authorized(
            &app(),
            "1234.1234",
            "presence-foobar",
            Some(&forged),
            &auth
        ));
        assert!(!channel_authorized(
            &app(),
            "1234.1234",
            "presence-foobar",
            None,
            &auth
        ));
    }

    #[test]
    fn a_user_sign_in_is_checked_over_its_user_data() {
        let data = r#"{"id":"ann"}"#;
        let signature = hmac_hex(
            "7ad3773142a6692b25b8",
            format!("1.2::user::{data}").as_bytes(),
        );
        let auth = format!("278d425bdf160c739803:{signature}");
        assert!(user_authenticated(&app(), "1.2", data, &auth));
        assert!(!user_authenticated(&app(), "1.3", data, &auth));
    }

    /// Pusher's HTTP API reference example: POST /apps/3/events.
    const BODY: &str = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
    const QUERY: &str = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
    const THEN: u64 = 1_353_088_179;

    #[test]
    fn an_http_api_request_matches_pushers_documented_example() {
        let check = |query: &str, body: &str, now| {
            check_api_request(
                &app(),
                "POST",
                "/apps/3/events",
                query,
                body.as_bytes(),
                now,
            )
        };
        assert_eq!(check(QUERY, BODY, THEN), Ok(()));
        assert_eq!(check(QUERY, BODY, THEN + 600), Ok(()), "600 s either way");
        assert_eq!(
            check(QUERY, BODY, THEN + 601),
            Err(ApiAuthError::Stale {
                timestamp: THEN,
                now: THEN + 601
            })
        );
        assert_eq!(
            check(QUERY, &BODY.replace("foo", "bar"), THEN),
            Err(ApiAuthError::BodyMd5)
        );
        // The signature is checked before the body is hashed: a forged
        // request never costs an MD5 of its body.
        let forged = QUERY.replace("auth_signature=da45", "auth_signature=0a45");
        assert_eq!(
            check(&forged, &BODY.replace("foo", "bar"), THEN),
            Err(ApiAuthError::Signature)
        );
        let other_path = check_api_request(
            &app(),
            "POST",
            "/apps/4/events",
            QUERY,
            BODY.as_bytes(),
            THEN,
        );
        assert_eq!(other_path, Err(ApiAuthError::Signature));
        // The order of the parameters as sent does not matter, nor hex case.
        let mut pairs: Vec<&str> = QUERY.split('&').collect();
        pairs.reverse();
        assert_eq!(check(&pairs.join("&"), BODY, THEN), Ok(()));
        assert_eq!(
            check(&QUERY.replace("auth_key=278d", "auth_key=378d"), BODY, THEN),
            Err(ApiAuthError::UnknownKey)
        );
        for (missing, param) in [
            ("auth_key", "auth_key"),
            ("auth_timestamp", "auth_timestamp"),
            ("auth_version", "auth_version"),
            ("body_md5", "body_md5"),
            ("auth_signature", "auth_signature"),
        ] {
            let without: Vec<&str> = QUERY
                .split('&')
                .filter(|p| !p.starts_with(missing))
                .collect();
            assert_eq!(
                check(&without.join("&"), BODY, THEN),
                Err(ApiAuthError::Missing(param))
            );
        }
        assert_eq!(
            check(&QUERY.replace("version=1.0", "version=2.0"), BODY, THEN),
            Err(ApiAuthError::Version)
        );
    }

    #[test]
    fn a_get_signs_its_other_parameters_decoded() {
        let params = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&filter_by_prefix=presence-&info=user_count,subscription_count";
        let signature = hmac_hex(
            "7ad3773142a6692b25b8",
            format!("GET\n/apps/3/channels\n{params}").as_bytes(),
        );
        // As sent: shuffled, with the comma escaped.
        let query = format!(
            "info=user_count%2Csubscription_count&filter_by_prefix=presence-&auth_signature={signature}&auth_version=1.0&auth_timestamp=1353088179&auth_key=278d425bdf160c739803"
        );
        assert_eq!(
            check_api_request(&app(), "GET", "/apps/3/channels", &query, b"", THEN),
            Ok(())
        );
        let tampered = query.replace("presence-", "private-");
        assert_eq!(
            check_api_request(&app(), "GET", "/apps/3/channels", &tampered, b"", THEN),
            Err(ApiAuthError::Signature)
        );
        let bad_escape = format!("{query}&x=%zz");
        assert!(matches!(
            check_api_request(&app(), "GET", "/apps/3/channels", &bad_escape, b"", THEN),
            Err(ApiAuthError::Malformed(_))
        ));
        let flood: String = (0..40).map(|i| format!("p{i}=1&")).collect();
        assert!(matches!(
            check_api_request(&app(), "GET", "/apps/3/channels", &flood, b"", THEN),
            Err(ApiAuthError::Malformed(_))
        ));
    }
}
