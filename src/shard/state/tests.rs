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

// ---- topic streams ----------------------------------------------------------

/// `s:*` topics are streams (history 8, TTL `ttl_s`); the rest plain.
fn stream_rules(config: &mut Config, ttl_s: u64) {
    use crate::rules::{History, Pattern, Rule, RuleSet};
    let rule = |pattern: &str, history| Rule {
        client_publish: true,
        history,
        ..Rule::new(Pattern::parse(pattern).unwrap())
    };
    let history = History {
        size: 8,
        ttl: Duration::from_secs(ttl_s),
        replay_on_subscribe: 0,
    };
    config.rules = RuleSet::new(vec![rule("s:*", Some(history)), rule("*", None)]).unwrap();
}

/// A stream topic whose home is shard `home`.
fn stream_homed_on(shards: &Shards, home: usize) -> String {
    (0..)
        .map(|i| format!("s:{i}"))
        .find(|t| shards.states[0].home_of(t) == ShardId(home))
        .unwrap()
}

/// A masked client text frame (a mask of zeros: the payload as is).
fn text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// The JSON messages the commands send or push to `key`, in order.
fn messages(commands: &[Command], key: ConnKey) -> Vec<serde_json::Value> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Send(k, bytes) | Command::Push(k, bytes) if *k == key => {
                crate::protocol::message::frame_json(bytes)
            }
            _ => None,
        })
        .map(|json| serde_json::from_slice(json).unwrap())
        .collect()
}

/// An upgraded `/ws` connection on shard `s`.
fn relay_client(shards: &mut Shards, s: usize) -> ConnKey {
    let (key, commands) = shards.connect(s, &upgrade("/ws"));
    assert!(starts_with(&bytes_to(&commands, key), "HTTP/1.1 101"));
    key
}

/// Delivers everything queued from `from` to `to`.
fn deliver_all(shards: &mut Shards, from: usize, to: usize) -> Vec<Command> {
    let mut commands = Vec::new();
    while let Some(envelope) = shards.shared.bus().pop(ShardId(from), ShardId(to)) {
        commands.extend(shards.handle(to, Event::Envelope(ShardId(from), envelope)));
    }
    commands
}

fn http_publish(shards: &mut Shards, s: usize, topic: &str) -> Vec<Command> {
    let body = format!("{{\"topic\":\"{topic}\",\"payload\":1}}");
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    shards.connect(s, request.as_bytes()).1
}

#[test]
fn a_stale_stream_open_does_not_open_the_next_subscription_to_the_topic() {
    let mut shards = Shards::new(2, |c| stream_rules(c, 30));
    let topic = stream_homed_on(&shards, 0);
    let sub = relay_client(&mut shards, 1);
    let subscribe =
        format!(r#"{{"type":"subscribe","topic":"{topic}","since":{{"offset":0,"epoch":"x"}}}}"#);
    shards.handle(1, Event::Input(sub, &text_frame(&subscribe)));
    shards.deliver(1, 0); // interest
    shards.deliver(0, 1); // its ack: shard 1 asks the home to open
                          // Left and rejoined, without a position, while that open is in flight.
    let mut again = text_frame(&format!(r#"{{"type":"unsubscribe","topic":"{topic}"}}"#));
    again.extend(text_frame(&format!(
        r#"{{"type":"subscribe","topic":"{topic}"}}"#
    )));
    shards.handle(1, Event::Input(sub, &again));
    shards.deliver(1, 0); // the first open, answered at offset 0
    shards.deliver(1, 0); // interest off: the home stops routing to shard 1
    http_publish(&mut shards, 0, &topic); // offset 1, for no one on shard 1
    let commands = shards.deliver(0, 1); // the first open's answer
    assert!(
        messages(&commands, sub).is_empty(),
        "the answer to a dropped subscription opened its successor: {:?}",
        messages(&commands, sub)
    );
    shards.deliver(1, 0); // interest on, for the rejoin
    shards.deliver(0, 1); // its ack
    shards.deliver(1, 0); // the rejoin's open
    let commands = shards.deliver(0, 1);
    let replies = messages(&commands, sub);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["type"], "subscribed");
    assert_eq!(replies[0]["offset"], 1, "{}", replies[0]);
    assert!(replies[0].get("recovered").is_none(), "{}", replies[0]);
}

#[test]
fn a_repeated_stream_subscribe_is_answered_with_where_the_pushes_stand() {
    let mut shards = Shards::new(2, |c| stream_rules(c, 30));
    let topic = stream_homed_on(&shards, 0);
    let subscribe = text_frame(&format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#));
    // Shard 1 opens through the home; shard 0 is the home.
    let remote = relay_client(&mut shards, 1);
    shards.handle(1, Event::Input(remote, &subscribe));
    shards.deliver(1, 0);
    shards.deliver(0, 1);
    shards.deliver(1, 0);
    let opened = messages(&shards.deliver(0, 1), remote);
    assert_eq!(opened[0]["offset"], 0, "{opened:?}");
    let local = relay_client(&mut shards, 0);
    shards.handle(0, Event::Input(local, &subscribe));
    shards.deliver(0, 1);
    assert_eq!(messages(&shards.deliver(1, 0), local)[0]["offset"], 0);
    http_publish(&mut shards, 0, &topic);
    http_publish(&mut shards, 0, &topic);
    // The remote subscriber asks again before the second push reaches it.
    shards.deliver(0, 1);
    let mut commands = shards.handle(1, Event::Input(remote, &subscribe));
    for (from, to) in [(0, 1), (1, 0), (0, 1)] {
        commands.extend(deliver_all(&mut shards, from, to));
    }
    let replies = messages(&commands, remote);
    let got: Vec<_> = replies
        .iter()
        .map(|r| (r["type"].as_str(), r["offset"].as_u64()))
        .collect();
    assert_eq!(
        got,
        [(Some("push"), Some(2)), (Some("subscribed"), Some(2))],
        "{replies:?}"
    );
    assert_eq!(replies[1]["epoch"], opened[0]["epoch"]);
    assert!(replies[1].get("recovered").is_none());
    // On the home, the answer is immediate.
    let replies = messages(&shards.handle(0, Event::Input(local, &subscribe)), local);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["offset"], 2, "{}", replies[0]);
    assert_eq!(replies[0]["epoch"], opened[0]["epoch"]);
}

#[test]
fn a_stream_with_a_subscriber_keeps_its_offsets_past_its_ttl_and_the_byte_bound() {
    let mut shards = Shards::new(2, |c| {
        stream_rules(c, 2);
        c.limits.max_history_bytes = 1024;
    });
    let topic = stream_homed_on(&shards, 0);
    let other = (0..)
        .map(|i| format!("s:x{i}"))
        .find(|t| shards.states[0].home_of(t) == ShardId(0))
        .unwrap();
    let sub = relay_client(&mut shards, 1);
    let subscribe = text_frame(&format!(r#"{{"type":"subscribe","topic":"{topic}"}}"#));
    shards.handle(1, Event::Input(sub, &subscribe));
    shards.deliver(1, 0);
    shards.deliver(0, 1);
    shards.deliver(1, 0);
    let opened = messages(&shards.deliver(0, 1), sub);
    let offsets = |shards: &mut Shards| -> Vec<u64> {
        let commands = deliver_all(shards, 0, 1);
        messages(&commands, sub)
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    };
    http_publish(&mut shards, 0, &topic);
    assert_eq!(offsets(&mut shards), [1]);
    // Idle past its TTL: its history empties, but a subscriber holds it.
    shards.now += Duration::from_secs(5);
    shards.handle(0, Event::Tick);
    http_publish(&mut shards, 0, &topic);
    assert_eq!(offsets(&mut shards), [2], "offsets went back to 1");
    // Another stream's publications evict all of its history.
    for _ in 0..8 {
        http_publish(&mut shards, 0, &other);
    }
    http_publish(&mut shards, 0, &topic);
    assert_eq!(offsets(&mut shards), [3], "offsets went back to 1");
    // Its subscriber's epoch still names the stream, and a repeated
    // subscribe tells the same.
    shards.handle(1, Event::Input(sub, &subscribe));
    shards.deliver(1, 0);
    let replies = messages(&shards.deliver(0, 1), sub);
    assert_eq!(replies[0]["offset"], 3, "{replies:?}");
    assert_eq!(replies[0]["epoch"], opened[0]["epoch"]);
}

#[test]
fn a_peer_that_never_drains_its_bus_gets_new_subscriptions_refused_not_queued_forever() {
    const BUS: usize = 8;
    let mut shards = Shards::new(2, |config| {
        config.limits.bus_queue_capacity = BUS;
        config.limits.max_subscriptions_per_connection = 10_000;
    });
    let key = relay_client(&mut shards, 0);
    // Each new topic tells shard 1 of shard 0's interest; shard 1 never
    // reads, so past the bus queue the envelopes wait in shard 0's backlog.
    let fill = BUS + MAX_CONTROL_BACKLOG;
    let mut input = Vec::new();
    for i in 0..fill + 3 {
        input.extend(text_frame(&format!(
            r#"{{"type":"subscribe","topic":"t{i}"}}"#
        )));
    }
    let commands = shards.handle(0, Event::Input(key, &input));

    let errors: Vec<_> = messages(&commands, key)
        .into_iter()
        .filter(|m| m["type"] == "error")
        .collect();
    assert_eq!(
        errors.len(),
        3,
        "only the subscribes past the backlog bound: {errors:?}"
    );
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("server busy"));
    assert_eq!(shards.states[0].control_backlog(), MAX_CONTROL_BACKLOG);
    let refused = &shards.shared.stats[0].control_refused_total;
    assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 3);

    // Once the peer catches up, subscribing works again.
    // (Delivered without the per-event invariant check, which is
    // quadratic over four thousand topics; checked once after.)
    let now = shards.now;
    while shards.states[0].control_backlog() > 0 {
        for (from, to) in [(0, 1), (1, 0)] {
            while let Some(envelope) = shards.shared.bus().pop(ShardId(from), ShardId(to)) {
                shards.states[to].handle(now, Event::Envelope(ShardId(from), envelope));
            }
            shards.states[from].wake_peers();
        }
    }
    shards.states[0].take_commands(&mut Vec::new());
    let more = text_frame(r#"{"type":"subscribe","topic":"after"}"#);
    let commands = shards.handle(0, Event::Input(key, &more));
    assert!(messages(&commands, key)
        .iter()
        .all(|m| m["type"] != "error"));
}
