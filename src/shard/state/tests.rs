//! The shard state driven by hand: N states over a real bus, events in,
//! commands and envelopes out, no driver. Each test is a sequence the
//! simulation (`shard::sim`) found or could find, pinned down.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::hooks::Channels;

/// States of `shards` shards with the default rules.
struct Shards {
    shared: Shared,
    states: Vec<ShardState>,
    keys: ConnTable<()>,
    now: Instant,
}

impl Shards {
    fn new(shards: usize, adjust: impl FnOnce(&mut Config)) -> Shards {
        let mut config = Config::default();
        config.set_shards(shards).unwrap();
        adjust(&mut config);
        let channels = Channels::from_rules(&config.rules);
        let shared = Shared::new(config, channels).unwrap();
        let now = Instant::now();
        let states = (0..shards)
            .map(|i| ShardState::new(ShardId(i), shared.clone(), 100, now).with_seed(i as u64))
            .collect();
        Shards {
            shared,
            states,
            keys: ConnTable::default(),
            now,
        }
    }

    /// Feeds `event` to shard `s` and returns its commands.
    fn handle(&mut self, s: usize, event: Event<'_>) -> Vec<Command> {
        self.states[s].handle(self.now, event);
        let mut commands = Vec::new();
        self.states[s].take_commands(&mut commands);
        for state in &self.states {
            state.check_invariants().unwrap();
        }
        commands
    }

    /// A connection on shard `s` that has sent `bytes`.
    fn connect(&mut self, s: usize, bytes: &[u8]) -> (ConnKey, Vec<Command>) {
        let key = self.keys.insert(());
        let mut commands = self.handle(s, Event::Opened(key));
        commands.extend(self.handle(s, Event::Input(key, bytes)));
        (key, commands)
    }

    /// Delivers the oldest envelope from `from` to `to`.
    fn deliver(&mut self, from: usize, to: usize) -> Vec<Command> {
        let envelope = self.shared.bus().pop(ShardId(from), ShardId(to)).unwrap();
        self.handle(to, Event::Envelope(ShardId(from), envelope))
    }
}

/// Every byte the commands queue for `key`, close's last bytes included.
fn bytes_to(commands: &[Command], key: ConnKey) -> Vec<u8> {
    let mut out = Vec::new();
    for command in commands {
        match command {
            Command::Send(k, bytes) if *k == key => out.extend_from_slice(bytes),
            Command::Close {
                conn,
                last: Some(bytes),
                ..
            } if *conn == key => out.extend_from_slice(bytes),
            _ => {}
        }
    }
    out
}

fn closes(commands: &[Command], key: ConnKey) -> bool {
    commands
        .iter()
        .any(|c| matches!(c, Command::Close { conn, .. } if *conn == key))
}

fn upgrade(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A masked close frame with code 1000 (mask of zeros: the payload as is).
const CLOSE_1000: &[u8] = b"\x88\x82\0\0\0\0\x03\xe8";

fn starts_with(bytes: &[u8], prefix: &str) -> bool {
    bytes.starts_with(prefix.as_bytes())
}

#[test]
fn a_user_whose_first_upgrade_closes_at_once_keeps_routing_to_the_second() {
    let mut shards = Shards::new(2, |_| {});
    let mut first = upgrade("/ws?user_id=u");
    first.extend_from_slice(CLOSE_1000);
    let (a, _) = shards.connect(1, &first);
    let (b, _) = shards.connect(1, &upgrade("/ws?user_id=u"));
    shards.deliver(1, 0);
    // The last acknowledgement finishes both upgrades; the first reads its
    // parked close frame and leaves. This panicked (a freed index entry).
    let commands = shards.deliver(0, 1);
    assert!(starts_with(&bytes_to(&commands, a), "HTTP/1.1 101"));
    assert!(closes(&commands, a));
    assert!(starts_with(&bytes_to(&commands, b), "HTTP/1.1 101"));
    assert!(!closes(&commands, b));
    // Shard 1 still holds the user, so it must not have told shard 0 otherwise.
    assert!(shards.shared.bus().pop(ShardId(1), ShardId(0)).is_none());
    let users = shards.states[0].name_index(IndexKind::User);
    let id = users.lookup("u").expect("shard 0 routes u to shard 1");
    assert_eq!(
        users.entry(id).remote.iter().collect::<Vec<_>>(),
        [ShardId(1)]
    );
}

#[test]
fn a_half_closed_client_gets_answers_to_requests_behind_a_parked_one() {
    let mut shards = Shards::new(2, |_| {});
    let requests = b"GET /topics/t/presence HTTP/1.1\r\nHost: t\r\n\r\n\
                     GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    let (key, _) = shards.connect(0, requests);
    assert!(shards.handle(0, Event::InputEnded(key)).is_empty());
    shards.deliver(0, 1);
    let commands = shards.deliver(1, 0);
    let answered = String::from_utf8(bytes_to(&commands, key)).unwrap();
    assert_eq!(answered.matches("HTTP/1.1 200").count(), 2, "{answered}");
    assert!(
        answered.contains("\"status\":\"ok\""),
        "the health answer too"
    );
    assert!(closes(&commands, key), "then the connection ends");
}

#[test]
fn a_parked_upgrade_is_not_pinged() {
    let mut shards = Shards::new(2, |config| {
        config.ping_interval = Duration::from_secs(2);
        config.pong_timeout = Duration::from_secs(1);
    });
    let (key, commands) = shards.connect(1, &upgrade("/ws?user_id=u"));
    assert!(
        bytes_to(&commands, key).is_empty(),
        "the 101 waits for shard 0"
    );
    shards.now += Duration::from_secs(3);
    let commands = shards.handle(1, Event::Tick);
    assert!(
        bytes_to(&commands, key).is_empty(),
        "no ping before the 101"
    );
    let commands = shards.deliver(1, 0);
    assert!(commands.is_empty());
    let commands = shards.deliver(0, 1);
    assert!(starts_with(&bytes_to(&commands, key), "HTTP/1.1 101"));
}

#[test]
fn a_parked_upgrade_refused_at_shutdown_gets_an_http_answer() {
    let mut shards = Shards::new(2, |_| {});
    let (key, _) = shards.connect(1, &upgrade("/ws?user_id=u"));
    shards.shared.bus().shutdown_all();
    shards.deliver(0, 0);
    shards.deliver(1, 1);
    let commands = shards.deliver(0, 1);
    let sent = bytes_to(&commands, key);
    assert!(
        starts_with(&sent, "HTTP/1.1 503"),
        "{:?}",
        Bytes::from(sent)
    );
    assert!(closes(&commands, key));
}
