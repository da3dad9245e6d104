//! Channel hooks: the library's extension point, and the configured topic
//! rules expressed as hooks so there is one code path for both.
//!
//! A hook is registered for a pattern (an exact topic or a `prefix*`; exact
//! wins, then the longest prefix) and runs on the shard that owns the
//! connection, synchronously, inside the shard's loop: it must not block. It
//! decides and asks; the shard acts afterwards on what the hook queued in its
//! [`HookContext`] (pushes, presence tracking, join/leave announcements).
//! Pure code: no I/O, no runtime.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::rules::{History, Pattern, PatternMap, Rule, RuleError, RuleSet};

/// Decides what happens on one channel (all topics its pattern matches).
/// Every method has a permissive default.
pub trait ChannelHook: Send + Sync + 'static {
    /// Whether presence queries are answered for these topics.
    fn tracks_presence(&self) -> bool {
        false
    }

    /// History settings when these topics are streams (ordered publications
    /// with offsets, recovery after a reconnect); `None` for plain topics.
    fn history(&self) -> Option<History> {
        None
    }

    /// Whether the application backend allows each subscription first
    /// (`[proxy] subscribe_url`), before [`ChannelHook::join`] runs.
    fn subscribe_proxy(&self) -> bool {
        false
    }

    /// Whether the application backend passes, rewrites or refuses each
    /// client publication (`[proxy] publish_url`), after
    /// [`ChannelHook::message`] allowed it.
    fn publish_proxy(&self) -> bool {
        false
    }

    /// A connection asks to subscribe to `ctx.topic()`. `Err(reason)` refuses:
    /// the client gets `{"type":"error","message":reason}` instead of `subscribed`.
    fn join(&self, ctx: &mut HookContext<'_>) -> Result<(), String> {
        let _ = ctx;
        Ok(())
    }

    /// A client publishes `message` to `ctx.topic()`; the verdict says whether
    /// and what to broadcast.
    fn message(&self, ctx: &mut HookContext<'_>, message: &ClientMessage<'_>) -> Verdict {
        let _ = (ctx, message);
        Verdict::Broadcast
    }

    /// A connection left `ctx.topic()` (unsubscribed or disconnected). It is
    /// already gone from presence counts.
    fn leave(&self, ctx: &mut HookContext<'_>) {
        let _ = ctx;
    }
}

/// A client's publish, as the hook sees it.
#[derive(Debug)]
pub struct ClientMessage<'a> {
    /// The event name (`"message"` when the client gave none).
    pub event: &'a str,
    /// The payload as raw JSON (`null` when the client gave none).
    pub payload: &'a RawValue,
}

/// What to do with a client's publish.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Broadcast it as sent.
    Broadcast,
    /// Broadcast this instead.
    Rewrite {
        /// The event name to push.
        event: String,
        /// The payload to push.
        payload: Value,
    },
    /// Drop it silently.
    Drop,
    /// Drop it and tell the client why with an `error` message.
    Reject(String),
}

/// Something a hook asked for; carried out by the shard after the hook returns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Push {
        topic: String,
        event: String,
        payload_json: String,
    },
    Track {
        meta_json: String,
    },
    Untrack,
    Announce {
        event: String,
    },
}

/// What a hook may read and ask for.
#[derive(Debug)]
pub struct HookContext<'a> {
    topic: &'a str,
    conn_id: &'a str,
    user_id: Option<&'a str>,
    info: Option<&'a str>,
    subscribed: bool,
    pub(crate) actions: Vec<Action>,
}

impl<'a> HookContext<'a> {
    pub(crate) fn new(
        topic: &'a str,
        conn_id: &'a str,
        user_id: Option<&'a str>,
        subscribed: bool,
    ) -> Self {
        HookContext {
            topic,
            conn_id,
            user_id,
            info: None,
            subscribed,
            actions: Vec::new(),
        }
    }

    /// The same for a connection the connect proxy gave `info` (its
    /// `meta`, a JSON object as text).
    pub(crate) fn with_info(mut self, info: Option<&'a str>) -> Self {
        self.info = info;
        self
    }

    /// The topic this call is about.
    pub fn topic(&self) -> &str {
        self.topic
    }

    /// The connection's id, unique in the process (`shard-slot-generation`).
    pub fn conn_id(&self) -> &str {
        self.conn_id
    }

    /// The connection's user id, if it has one (token `sub`, registration, or `?user_id=`).
    pub fn user_id(&self) -> Option<&str> {
        self.user_id
    }

    /// What the application backend said about the connection when it
    /// allowed it (the connect proxy's `meta`: a JSON object, as text).
    pub fn info(&self) -> Option<&str> {
        self.info
    }

    /// Whether the connection holds the topic (always true in `join` after it succeeds).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed
    }

    /// Publishes `{"type":"push","topic":topic,"event":event,"payload":payload}`
    /// to every subscriber of `topic`, on every shard.
    pub fn push(&mut self, topic: &str, event: &str, payload: &Value) {
        self.actions.push(Action::Push {
            topic: topic.into(),
            event: event.into(),
            payload_json: payload.to_string(),
        });
    }

    /// Lists this connection in the topic's presence with `meta` (a JSON object).
    pub fn track_presence(&mut self, meta: &Value) {
        self.actions.push(Action::Track {
            meta_json: meta.to_string(),
        });
    }

    /// Removes this connection from the topic's presence.
    pub fn untrack_presence(&mut self) {
        self.actions.push(Action::Untrack);
    }

    /// Pushes `event` to the topic with `{"user_id":..,"count":N}`, N being the
    /// presence count across all shards once this call's changes are applied.
    pub fn announce(&mut self, event: &str) {
        self.actions.push(Action::Announce {
            event: event.into(),
        });
    }
}

/// A configured rule as a hook: this is how the binary's `[[rules]]` behave.
#[derive(Debug, Clone)]
pub struct RuleHook(pub Rule);

impl ChannelHook for RuleHook {
    fn tracks_presence(&self) -> bool {
        self.0.presence
    }

    fn history(&self) -> Option<History> {
        self.0.history
    }

    fn subscribe_proxy(&self) -> bool {
        self.0.subscribe_proxy
    }

    fn publish_proxy(&self) -> bool {
        self.0.publish_proxy
    }

    fn join(&self, ctx: &mut HookContext<'_>) -> Result<(), String> {
        if self.0.require_auth && ctx.user_id().is_none() {
            return Err(format!(
                "topic `{}` requires an authenticated user",
                ctx.topic()
            ));
        }
        if self.0.presence {
            let mut meta = serde_json::json!({ "user_id": ctx.user_id() });
            // Checked to be an object when the backend granted it.
            if let Some(info) = ctx.info().and_then(|i| serde_json::from_str(i).ok()) {
                meta["info"] = info;
            }
            ctx.track_presence(&meta);
        }
        if self.0.join_leave {
            ctx.announce("join");
        }
        Ok(())
    }

    fn message(&self, ctx: &mut HookContext<'_>, _message: &ClientMessage<'_>) -> Verdict {
        if !self.0.client_publish {
            return Verdict::Reject(format!("clients may not publish to `{}`", ctx.topic()));
        }
        if !ctx.is_subscribed() {
            return Verdict::Reject(format!(
                "not subscribed to `{}`: subscribe before publishing to it",
                ctx.topic()
            ));
        }
        Verdict::Broadcast
    }

    fn leave(&self, ctx: &mut HookContext<'_>) {
        if self.0.join_leave {
            ctx.announce("leave");
        }
    }
}

/// Index of a hook in a [`Channels`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelId(pub u32);

/// Hooks by pattern. A topic no pattern matches is refused.
#[derive(Clone, Default)]
pub struct Channels {
    index: PatternMap<ChannelId>,
    hooks: Vec<Arc<dyn ChannelHook>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("index", &self.index)
            .finish()
    }
}

impl Channels {
    /// The configured rules, each as a [`RuleHook`].
    pub fn from_rules(rules: &RuleSet) -> Channels {
        let mut channels = Channels::default();
        for rule in rules.rules() {
            channels.set(rule.pattern.clone(), Arc::new(RuleHook(rule.clone())));
        }
        channels
    }

    /// Adds each Pusher app's channel: every topic under the app's prefix
    /// (no rule can name one: patterns refuse control characters).
    pub fn with_apps(mut self, apps: &[Arc<crate::pusher::App>]) -> Channels {
        use crate::pusher::{hook::PusherHook, wire};
        for app in apps {
            let prefix = wire::topic_prefix(&app.id);
            for cache in wire::CACHE_PREFIXES {
                let pattern = Pattern::Prefix(format!("{prefix}{cache}"));
                self.set(pattern, Arc::new(PusherHook::cache()));
            }
            self.set(Pattern::Prefix(prefix), Arc::new(PusherHook::default()));
        }
        self
    }

    /// Registers `hook` for `pattern` (`chat:lobby` or `room:*`), replacing any
    /// hook or rule already there.
    pub fn add(&mut self, pattern: &str, hook: impl ChannelHook) -> Result<(), RuleError> {
        self.set(Pattern::parse(pattern)?, Arc::new(hook));
        Ok(())
    }

    fn set(&mut self, pattern: Pattern, hook: Arc<dyn ChannelHook>) {
        if let Some(id) = self.index.get(&pattern) {
            self.hooks[id.0 as usize] = hook;
            return;
        }
        let id = ChannelId(self.hooks.len() as u32);
        self.hooks.push(hook);
        self.index.insert(&pattern, id);
    }

    /// The channel of `topic`: exact match, then the longest prefix.
    pub fn resolve(&self, topic: &str) -> Option<ChannelId> {
        self.index.resolve(topic)
    }

    /// The hook of a resolved channel.
    pub fn hook(&self, id: ChannelId) -> &dyn ChannelHook {
        self.hooks[id.0 as usize].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);
    impl ChannelHook for Named {
        fn join(&self, _: &mut HookContext<'_>) -> Result<(), String> {
            Err(self.0.into())
        }
    }

    fn name_of(channels: &Channels, topic: &str) -> Option<String> {
        let id = channels.resolve(topic)?;
        let mut ctx = HookContext::new(topic, "0-0-0", None, false);
        channels.hook(id).join(&mut ctx).err()
    }

    #[test]
    fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
        let mut channels = Channels::default();
        channels.add("room:*", Named("room")).unwrap();
        channels.add("room:vip:*", Named("vip")).unwrap();
        channels.add("room:lobby", Named("lobby")).unwrap();
        assert_eq!(name_of(&channels, "room:lobby").as_deref(), Some("lobby"));
        assert_eq!(name_of(&channels, "room:vip:1").as_deref(), Some("vip"));
        assert_eq!(name_of(&channels, "room:2").as_deref(), Some("room"));
        assert_eq!(name_of(&channels, "other"), None);
        channels.add("room:*", Named("replaced")).unwrap();
        assert_eq!(name_of(&channels, "room:2").as_deref(), Some("replaced"));
    }

    #[test]
    fn rule_hooks_enforce_their_flags() {
        let mut rule = Rule::new(Pattern::parse("secret:*").unwrap());
        rule.require_auth = true;
        rule.presence = true;
        rule.join_leave = true;
        let hook = RuleHook(rule);
        let mut anon = HookContext::new("secret:1", "0-1-0", None, false);
        assert!(hook.join(&mut anon).unwrap_err().contains("authenticated"));
        let mut alice = HookContext::new("secret:1", "0-1-0", Some("alice"), false);
        hook.join(&mut alice).unwrap();
        assert_eq!(
            alice.actions,
            vec![
                Action::Track {
                    meta_json: r#"{"user_id":"alice"}"#.into()
                },
                Action::Announce {
                    event: "join".into()
                }
            ]
        );
        let payload = RawValue::from_string("1".into()).unwrap();
        let message = ClientMessage {
            event: "say",
            payload: &payload,
        };
        let mut subscribed = HookContext::new("secret:1", "0-1-0", Some("alice"), true);
        assert!(
            matches!(hook.message(&mut subscribed, &message), Verdict::Reject(r) if r.contains("may not publish"))
        );
    }

    #[test]
    fn the_default_rule_lets_subscribers_publish_and_tracks_presence() {
        let channels = Channels::from_rules(&RuleSet::default_rules());
        let id = channels.resolve("anything").unwrap();
        let hook = channels.hook(id);
        assert!(hook.tracks_presence());
        let payload = RawValue::from_string("null".into()).unwrap();
        let message = ClientMessage {
            event: "message",
            payload: &payload,
        };
        let mut outsider = HookContext::new("anything", "0-1-0", None, false);
        assert!(matches!(
            hook.message(&mut outsider, &message),
            Verdict::Reject(_)
        ));
        let mut member = HookContext::new("anything", "0-1-0", None, true);
        assert_eq!(hook.message(&mut member, &message), Verdict::Broadcast);
    }
}
