//! ringcast: a thread-per-core io_uring WebSocket pub/sub relay.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and CLI flags, parsed once into typed limits.
//! - [`protocol`]: sans-IO HTTP/1.1 parsing, the WebSocket handshake and
//!   frames, and the JSON relay messages. No runtime, no clock, no sockets.
//! - [`bus`]: bounded lock-free queues between shards and their wake-ups.
//! - [`shard`]: one thread per core. Its driver owns the shard's one
//!   io_uring ring, the listener and each connection's I/O, and is the only
//!   code that does I/O; its [`shard::state`] is the sans-IO state (topics,
//!   interest, users, presence, hooks) driven by events, simulated in memory.
//! - [`rules`]: topic rules by pattern (exact, then longest prefix).
//! - [`hooks`]: the channel hook API; configured rules are hooks too.
//! - [`auth`]: HS256 JWT verification and the API key.
//! - [`metrics`]: per-shard counters summed on read.
//! - [`server`]: [`Relay`] and its builder: binds the listeners, starts the shards.
//!
//! # Library use
//!
//! ```no_run
//! use ringcast::hooks::{ChannelHook, ClientMessage, HookContext, Verdict};
//! use ringcast::{Config, Relay};
//!
//! struct Shout;
//! impl ChannelHook for Shout {
//!     fn message(&self, _ctx: &mut HookContext<'_>, m: &ClientMessage<'_>) -> Verdict {
//!         let text = m.payload.get().to_uppercase();
//!         Verdict::Rewrite { event: m.event.into(), payload: serde_json::json!(text) }
//!     }
//! }
//!
//! let relay = Relay::builder(Config::default()).channel("loud:*", Shout)?.start()?;
//! relay.shutdown();
//! relay.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Rules: `protocol` depends on nothing else here; `bus` knows envelopes, not
//! sockets; only the shard's driver names `io_uring`.

pub mod auth;
pub mod backend;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod hooks;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod pusher;
pub mod rules;
pub mod server;
pub mod shard;
pub mod webhooks;

pub use config::{Config, Limits};
pub use server::{Relay, RelayBuilder};
