//! Pusher Channels protocol compatibility (version 7): `[[apps]]`, each an
//! id, key and secret with its own limits, and the signatures Pusher's
//! clients and server libraries make (`sign.rs`). The front-end that speaks
//! the protocol over the shards' one core comes on top of these.

pub mod apps;
pub mod sign;

pub use apps::{App, FileApp};
