//! A chat room on the ringcast library: hooks by pattern decide who may join,
//! what a message becomes, and announce joins and leaves with the room's
//! presence count.
//!
//! ```sh
//! cargo run --example chat_room -- 127.0.0.1:8000
//! websocat 'ws://127.0.0.1:8000/ws?user_id=ann'
//! {"type":"subscribe","topic":"room:lobby"}
//! {"type":"message","topic":"room:lobby","event":"say","payload":{"text":"hi"}}
//! ```
//! Everyone in `room:lobby` then gets `{"event":"say","payload":{"from":"ann","text":"hi"}}`,
//! and `join`/`leave` events as people come and go.

use std::io::Write as _;
use std::net::SocketAddr;

use ringcast::hooks::{ChannelHook, ClientMessage, HookContext, Verdict};
use ringcast::{Config, Relay};
use serde_json::{json, Value};

/// Longest chat line accepted, in characters.
const MAX_TEXT_CHARS: usize = 500;

/// `room:*`: named users only; messages are `{"text":..}`, stamped with the sender.
struct ChatRoom;

impl ChannelHook for ChatRoom {
    fn tracks_presence(&self) -> bool {
        true
    }

    fn join(&self, ctx: &mut HookContext<'_>) -> Result<(), String> {
        let Some(user) = ctx.user_id() else {
            return Err("join a room with a name: connect to /ws?user_id=NAME".into());
        };
        ctx.track_presence(&json!({ "user_id": user }));
        ctx.announce("join");
        Ok(())
    }

    fn message(&self, ctx: &mut HookContext<'_>, message: &ClientMessage<'_>) -> Verdict {
        if !ctx.is_subscribed() {
            return Verdict::Reject(format!("join {} before talking in it", ctx.topic()));
        }
        let payload: Value = serde_json::from_str(message.payload.get()).unwrap_or(Value::Null);
        let Some(text) = payload.get("text").and_then(Value::as_str).map(str::trim) else {
            return Verdict::Reject("a chat message is {\"text\":\"...\"}".into());
        };
        if text.is_empty() {
            return Verdict::Drop;
        }
        let text: String = text.chars().take(MAX_TEXT_CHARS).collect();
        Verdict::Rewrite {
            event: "say".into(),
            payload: json!({ "from": ctx.user_id(), "text": text }),
        }
    }

    fn leave(&self, ctx: &mut HookContext<'_>) {
        ctx.announce("leave");
    }
}

/// `room:closed`: nobody gets in.
struct Closed;

impl ChannelHook for Closed {
    fn join(&self, ctx: &mut HookContext<'_>) -> Result<(), String> {
        Err(format!("{} is closed", ctx.topic()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:8000")
        .parse()?;
    let mut config = Config {
        listen,
        ..Config::default()
    };
    config.set_shards(2)?;
    let relay = Relay::builder(config)
        .channel("room:*", ChatRoom)?
        .channel("room:closed", Closed)?
        .start()?;
    println!("listening on {}", relay.local_addr());
    std::io::stdout().flush()?;
    // Runs until stdin closes (Ctrl-D, or the parent process going away).
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    relay.shutdown();
    relay.join()?;
    Ok(())
}
