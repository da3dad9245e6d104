//! Nodes joined through Redis (`[cluster]`): a broker thread per node
//! speaks to Redis and exchanges envelopes with the shards over the bus.

mod broker;
mod gate;
mod interest;
mod liveness;
mod presence;
mod registry;
mod relay;
mod status;
mod streams;
mod subscriptions;
mod tls;
pub mod wire;

pub use broker::{spawn, BrokerHandle};
pub use status::{ClusterStats, ClusterStatus};
