//! ringcast: a thread-per-core io_uring WebSocket pub/sub relay.
pub mod protocol;
