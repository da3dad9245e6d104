//! Pusher Channels protocol compatibility (version 7): `[[apps]]`, each an
//! id, key and secret with its own limits (`apps.rs`); the signatures
//! Pusher's clients and server libraries make (`sign.rs`); the protocol's
//! messages and how an app's channel is named among the core's topics
//! (`wire.rs`); presence channels' members (`presence.rs`); and the core channel every topic of an app resolves to
//! (`hook.rs`). The front-end itself runs on the shards
//! (`shard/state/pusher.rs`), over the same core as ringcast's protocol.

pub mod apps;
pub mod hook;
pub mod presence;
pub mod sign;
pub mod wire;

pub use apps::{App, AppConnections, FileApp};
