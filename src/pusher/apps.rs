//! `[[apps]]`: the Pusher apps a node serves. Each is a tenant: its own
//! key and secret, its own limits, and (in the front-end) channels no other
//! app can see, publish to or count.

use std::fmt;

use serde::Deserialize;

/// The webhook events an app may ask for (Pusher's names).
pub const APP_WEBHOOK_EVENTS: [&str; 6] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
];

/// Pusher's own limits, the defaults here.
const DEFAULT_MAX_EVENT_BYTES: usize = 10 * 1024;
const DEFAULT_MAX_PRESENCE_MEMBERS: usize = 100;
/// Above these an app would let one client make a node hold too much.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
const MAX_PRESENCE_MEMBERS: usize = 1_000;
/// App ids and keys: what Pusher's dashboards make, and safe in a URL path.
const MAX_ID_BYTES: usize = 64;
/// Apps one node serves from its config (a connection names its app in a
/// byte).
pub const MAX_APPS: usize = 256;

/// One `[[apps]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApp {
    id: String,
    key: String,
    secret: String,
    client_events: Option<bool>,
    max_connections: Option<u64>,
    max_event_bytes: Option<usize>,
    max_presence_members: Option<usize>,
    webhook_url: Option<String>,
    webhook_events: Option<Vec<String>>,
}

/// A Pusher app.
#[derive(Clone, PartialEq, Eq)]
pub struct App {
    /// In the HTTP API's paths (`/apps/{id}/events`).
    pub id: String,
    /// In the WebSocket URL (`/app/{key}`) and every signature's `auth_key`.
    pub key: String,
    /// Signs channel authorizations and HTTP API requests; never shown.
    pub secret: String,
    /// Whether clients may send `client-*` events on private and presence
    /// channels. Default `false`, as Pusher.
    pub client_events: bool,
    /// Connections the app may hold on a node; `None`: no limit of its own.
    pub max_connections: Option<u64>,
    /// Largest event `data`, in bytes. Default 10 KiB, as Pusher.
    pub max_event_bytes: usize,
    /// Most members of a presence channel. Default 100, as Pusher.
    pub max_presence_members: usize,
    /// Where the app's webhooks go, if anywhere.
    pub webhook_url: Option<String>,
    /// Which (of [`APP_WEBHOOK_EVENTS`]); default the channel and member ones.
    pub webhook_events: Vec<String>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("client_events", &self.client_events)
            .field("max_connections", &self.max_connections)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_presence_members", &self.max_presence_members)
            .field(
                "webhook_url",
                &self.webhook_url.as_deref().map(crate::config::redact_url),
            )
            .field("webhook_events", &self.webhook_events)
            .finish()
    }
}

/// Whether `name` may be an app id or key: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn valid_name(name: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The apps of `files`, or what is wrong with them (`check_url` checks a
/// webhook URL, as `[webhooks] url` is checked).
pub fn apps(
    files: Vec<FileApp>,
    check_url: impl Fn(&str, &str) -> Result<(), String>,
) -> Result<Vec<App>, String> {
    if files.len() > MAX_APPS {
        return Err(format!("at most {MAX_APPS} [[apps]] per node"));
    }
    let mut apps: Vec<App> = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let at = format!("apps[{i}]");
        for (what, name) in [("id", &file.id), ("key", &file.key)] {
            if !valid_name(name) {
                return Err(format!(
                    "{at}.{what} `{name}`: 1 to {MAX_ID_BYTES} of A-Z, a-z, 0-9, `.`, `_`, `-`"
                ));
            }
        }
        if let Some(other) = apps.iter().find(|a| a.id == file.id || a.key == file.key) {
            return Err(format!(
                "{at}: id `{}` or key `{}` is also app `{}`'s: each app needs its own",
                file.id, file.key, other.id
            ));
        }
        if file.secret.trim().is_empty() {
            return Err(format!(
                "{at}.secret must not be empty: it signs everything"
            ));
        }
        let max_event_bytes = file.max_event_bytes.unwrap_or(DEFAULT_MAX_EVENT_BYTES);
        if !(1..=MAX_EVENT_BYTES).contains(&max_event_bytes) {
            return Err(format!(
                "{at}.max_event_bytes must be 1 to {MAX_EVENT_BYTES}"
            ));
        }
        let max_presence_members = file
            .max_presence_members
            .unwrap_or(DEFAULT_MAX_PRESENCE_MEMBERS);
        if !(1..=MAX_PRESENCE_MEMBERS).contains(&max_presence_members) {
            return Err(format!(
                "{at}.max_presence_members must be 1 to {MAX_PRESENCE_MEMBERS}"
            ));
        }
        if let Some(url) = &file.webhook_url {
            check_url(&format!("{at}.webhook_url"), url)?;
        }
        let webhook_events = match file.webhook_events {
            Some(events) => events,
            None => APP_WEBHOOK_EVENTS[..4]
                .iter()
                .map(|e| e.to_string())
                .collect(),
        };
        if let Some(unknown) = webhook_events
            .iter()
            .find(|e| !APP_WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return Err(format!(
                "{at}.webhook_events: `{unknown}` is not one of {}",
                APP_WEBHOOK_EVENTS.join(", ")
            ));
        }
        apps.push(App {
            id: file.id,
            key: file.key,
            secret: file.secret,
            client_events: file.client_events.unwrap_or(false),
            max_connections: file.max_connections,
            max_event_bytes,
            max_presence_members,
            webhook_url: file.webhook_url,
            webhook_events,
        });
    }
    Ok(apps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<App>, String> {
        #[derive(Deserialize)]
        struct File {
            apps: Vec<FileApp>,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        apps(file.apps, |_, url| {
            url.starts_with("http")
                .then_some(())
                .ok_or_else(|| format!("bad url {url}"))
        })
    }

    #[test]
    fn an_app_takes_pushers_defaults() {
        let apps = parse("[[apps]]\nid = \"3\"\nkey = \"278d425bdf160c739803\"\nsecret = \"7ad3773142a6692b25b8\"\n").unwrap();
        let app = &apps[0];
        assert_eq!((app.id.as_str(), app.client_events), ("3", false));
        assert_eq!(
            (app.max_event_bytes, app.max_presence_members),
            (10_240, 100)
        );
        assert_eq!(app.webhook_events.len(), 4);
        assert!(
            !format!("{app:?}").contains("7ad3773142a6692b25b8"),
            "the secret never shows"
        );
    }

    #[test]
    fn apps_that_would_share_or_break_something_are_refused() {
        let app = |id: &str, key: &str, more: &str| {
            format!("[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"s\"\n{more}\n")
        };
        for (text, expected) in [
            (
                app("1", "k", "") + &app("1", "other", ""),
                "each app needs its own",
            ),
            (
                app("1", "k", "") + &app("2", "k", ""),
                "each app needs its own",
            ),
            (app("a/b", "k", ""), "apps[0].id"),
            (app("1", "", ""), "apps[0].key"),
            (app("1", "k", "max_event_bytes = 0"), "max_event_bytes"),
            (
                app("1", "k", "max_presence_members = 100000"),
                "max_presence_members",
            ),
            (app("1", "k", "webhook_url = \"ftp://x\""), "bad url"),
            (
                app("1", "k", "webhook_events = [\"channel_opened\"]"),
                "channel_opened",
            ),
            (
                "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \" \"\n".to_string(),
                "secret",
            ),
            (app("1", "k", "colour = \"red\""), "unknown field"),
        ] {
            let error = parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let many: String = (0..=MAX_APPS)
            .map(|i| app(&i.to_string(), &format!("k{i}"), ""))
            .collect();
        assert!(parse(&many).unwrap_err().contains("at most 256"));
        let most: String = (0..MAX_APPS)
            .map(|i| app(&i.to_string(), &format!("k{i}"), ""))
            .collect();
        assert_eq!(parse(&most).unwrap().len(), MAX_APPS);
    }
}

/// Each app's open connections on this node, across its shards: counted
/// when a connection becomes a Pusher WebSocket and until it closes, for
/// the app's `max_connections` and `/metrics`.
#[derive(Debug, Default)]
pub struct AppConnections(Box<[std::sync::atomic::AtomicU64]>);

impl AppConnections {
    pub fn new(apps: usize) -> AppConnections {
        AppConnections((0..apps).map(|_| Default::default()).collect())
    }

    /// Counts a connection of app `index` opening; the app's count with it.
    pub fn open(&self, index: usize) -> u64 {
        use std::sync::atomic::Ordering;
        self.0
            .get(index)
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// App `index`'s open connections.
    pub fn count(&self, index: usize) -> u64 {
        use std::sync::atomic::Ordering;
        self.0.get(index).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts a connection of app `index` closing.
    pub fn close(&self, index: usize) {
        use std::sync::atomic::Ordering;
        if let Some(count) = self.0.get(index) {
            let before = count.fetch_sub(1, Ordering::Relaxed);
            debug_assert!(before > 0, "an app's connection closed that never opened");
        }
    }

    /// `ringcast_app_connections{app="ID"} N` for each app.
    pub fn render_prometheus(&self, apps: &[std::sync::Arc<App>], out: &mut String) {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering;
        if apps.is_empty() {
            return;
        }
        out.push_str("# TYPE ringcast_app_connections gauge\n");
        for (app, count) in apps.iter().zip(self.0.iter()) {
            // App ids are URL-safe (checked at startup): nothing to escape.
            let count = count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ringcast_app_connections{{app=\"{}\"}} {count}",
                app.id
            );
        }
    }
}
