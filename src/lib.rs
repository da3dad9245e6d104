//! ringcast: a thread-per-core io_uring WebSocket pub/sub relay.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and CLI flags, parsed once into typed limits.
//! - [`protocol`]: sans-IO HTTP/1.1 parsing, the WebSocket handshake and
//!   frames, and the JSON relay messages. No runtime, no clock, no sockets.
//! - [`bus`]: bounded lock-free queues between shards and their eventfd wake-ups.
//! - `shard`: one thread per core running a tokio-uring loop with its own
//!   listener, connection slab, topic index and connection ring. The only
//!   module that does I/O. Its [`shard::topics`] index is plain data.
//! - [`metrics`]: per-shard counters summed on read.
//! - [`server`]: binds the listeners and starts the shards.
//!
//! Rules: `protocol` depends on nothing else here; `bus` knows envelopes, not
//! sockets; only `shard` names `tokio_uring` or `io_uring`.

pub mod auth;
pub mod bus;
pub mod config;
pub mod metrics;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod shard;

pub use config::{Config, Limits};
pub use server::Server;
