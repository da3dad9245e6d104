//! The core's channel for an app's topics: every topic under the app's
//! prefix (`wire::topic_prefix`) resolves to it, whatever `[[rules]]` say,
//! so an app's channels follow Pusher's semantics, not a rule's. Who may
//! subscribe is decided by the front-end before it asks the core (a
//! private or presence channel's authorization is checked against the
//! connection's socket id); client events are not relayed yet.

use crate::hooks::{ChannelHook, ClientMessage, HookContext, Verdict};

/// One app's channels.
#[derive(Debug, Clone)]
pub struct PusherHook;

impl ChannelHook for PusherHook {
    fn join(&self, _ctx: &mut HookContext<'_>) -> Result<(), String> {
        Ok(())
    }

    fn message(&self, ctx: &mut HookContext<'_>, _message: &ClientMessage<'_>) -> Verdict {
        Verdict::Reject(format!(
            "client events are not relayed on `{}` yet",
            ctx.topic()
        ))
    }
}
