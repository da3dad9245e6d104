//! A shard that dies is never left half-alive: the relay stops the other
//! shards (they would wait forever for its acknowledgements) and reports
//! which shard failed and why.
mod common;

use std::time::{Duration, Instant};

use ringcast::hooks::{ChannelHook, HookContext};
use ringcast::{Config, Relay};

/// A channel hook with a bug: it panics when anyone joins.
struct Broken;

impl ChannelHook for Broken {
    fn join(&self, _ctx: &mut HookContext<'_>) -> Result<(), String> {
        panic!("hook bug");
    }
}

#[test]
fn a_panicking_shard_stops_the_relay_with_an_error_naming_it() {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    config.set_shards(2).unwrap();
    let relay = Relay::builder(config)
        .channel("boom", Broken)
        .unwrap()
        .start()
        .unwrap();
    let url = format!("ws://{}/ws", relay.local_addr());
    let (mut bystander, _) = tungstenite::connect(&url).unwrap();
    let (mut victim, _) = tungstenite::connect(&url).unwrap();
    victim
        .send(tungstenite::Message::text(
            r#"{"type":"subscribe","topic":"boom"}"#,
        ))
        .unwrap();

    let start = Instant::now();
    let outcome = relay.join();
    let error = outcome.expect_err("a dead shard is an error");
    assert!(error.to_string().contains("panicked: hook bug"), "{error}");
    assert!(start.elapsed() < Duration::from_secs(5), "stopped promptly");
    // The surviving shard closed its connections on the way out.
    let _ = bystander.read();
    assert!(bystander.read().is_err() || start.elapsed() < Duration::from_secs(10));
}
