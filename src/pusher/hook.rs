//! The core's channel for an app's topics: every topic under the app's
//! prefix (`wire::topic_prefix`) resolves to it, whatever `[[rules]]` say,
//! so an app's channels follow Pusher's semantics, not a rule's. Who may
//! subscribe is decided by the front-end before it asks the core (a
//! private or presence channel's authorization is checked against the
//! connection's socket id), and client events are the front-end's own
//! (`shard/state/pusher.rs`): a Pusher client cannot send the core's
//! `message`.

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
            "`{}` is a Pusher app's: its client events come over /app/{{key}}",
            ctx.topic()
        ))
    }
}
