//! The core's channel for an app's topics: every topic under the app's
//! prefix (`wire::topic_prefix`) resolves to it, whatever `[[rules]]` say,
//! so an app's channels follow Pusher's semantics, not a rule's. Who may
//! subscribe is decided by the front-end before it asks the core (a
//! private or presence channel's authorization is checked against the
//! connection's socket id), and client events are the front-end's own
//! (`shard/state/pusher.rs`): a Pusher client cannot send the core's
//! `message`.

use std::time::Duration;

use crate::hooks::{ChannelHook, ClientMessage, HookContext, Verdict};
use crate::rules::History;

/// How long a cache channel keeps its last event (Pusher's 30 minutes).
pub const CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// One app's channels; its cache channels keep their last event for each
/// new subscriber (a stream of one, replayed on subscribe).
#[derive(Debug, Clone, Default)]
pub struct PusherHook {
    history: Option<History>,
}

impl PusherHook {
    /// The hook of an app's cache channels.
    pub fn cache() -> PusherHook {
        PusherHook {
            history: Some(History {
                size: 1,
                ttl: CACHE_TTL,
                replay_on_subscribe: 1,
            }),
        }
    }
}

impl ChannelHook for PusherHook {
    fn history(&self) -> Option<History> {
        self.history
    }

    fn join(&self, _ctx: &mut HookContext<'_>) -> Result<(), String> {
        Ok(())
    }

    fn message(&self, ctx: &mut HookContext<'_>, _message: &ClientMessage<'_>) -> Verdict {
        Verdict::Reject(format!(
            "`{}` is a Pusher app's: its client events come over /app/{{key}}",
            ctx.topic()
        ))
    }
}
