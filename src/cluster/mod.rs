//! Nodes joined through Redis (`[cluster]`): a broker thread per node
//! speaks to Redis and exchanges envelopes with the shards over the bus.
//! Its decisions are plain data (`state`), carried out by a driver
//! (`broker`) with a Redis client (`redis`), or by the simulation (`sim`)
//! against a fake Redis.

mod broker;
mod gate;
mod interest;
mod liveness;
mod presence;
mod redis;
mod relay;
#[cfg(test)]
mod sim;
mod state;
mod status;
mod subscriptions;
mod tls;
pub mod wire;

pub use broker::{redis_client, spawn, BrokerHandle};
pub use status::{ClusterStats, ClusterStatus};
