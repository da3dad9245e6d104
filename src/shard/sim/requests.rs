//! Arbitrary bytes as one client's input through the shard state's HTTP
//! handling (routes, percent-encodings, bodies, upgrades), for the fuzzer
//! and property tests: no input may panic a state, break its invariants or
//! leave anything held once the connection is gone.
//!
//! Two states over a real bus with a stream rule (`s:*`), a presence rule
//! (`p:*`), a catch-all and a Pusher app (`/app/k`, `/apps/4711`), so
//! every route has something behind it. The
//! first input byte picks the API key and where the input is split into
//! receives; the rest is what the client sends.

use std::time::{Duration, Instant};

use crate::bus::ShardId;
use crate::config::Config;
use crate::hooks::Channels;
use crate::rules::{History, Pattern, Rule, RuleSet};
use crate::shard::key::{ConnKey, ConnTable};
use crate::shard::state::{Command, Event, ShardState};
use crate::shard::Shared;

/// Envelope hops allowed before the exchange must be quiet: a request
/// causes a few rounds between two shards, never this many.
const MAX_HOPS: usize = 10_000;

/// Feeds `data` to one connection of shard 0 and checks the states.
pub fn run_request(data: &[u8]) -> Result<(), String> {
    let Some((&flags, input)) = data.split_first() else {
        return Ok(());
    };
    let mut config = Config::default();
    config.set_shards(2).map_err(|e| e.to_string())?;
    config.pin_cores = false;
    config.limits.max_outbound_bytes_per_connection = 4096;
    config.limits.max_inbound_bytes_per_shard = 2048;
    config.limits.max_streams = 4;
    // A request moves a few envelopes; the default 65,536-slot queues
    // would cost every run a few megabytes to allocate.
    config.limits.bus_queue_capacity = 64;
    if flags & 1 == 1 {
        config.auth.api_key = Some("key".into());
    }
    let stream = History {
        size: 8,
        ttl: Duration::from_secs(60),
        replay_on_subscribe: 2,
    };
    let rule = |pattern: &str| Rule::new(Pattern::parse(pattern).expect("a valid pattern"));
    config.rules = RuleSet::new(vec![
        Rule {
            history: Some(stream),
            client_publish: true,
            ..rule("s:*")
        },
        Rule {
            presence: true,
            ..rule("p:*")
        },
        Rule {
            client_publish: true,
            ..rule("*")
        },
    ])
    .map_err(|e| e.to_string())?;
    // A Pusher app with every feature on, so `/app/k` and `/apps/4711/..`
    // have something behind them too.
    let app = "[[apps]]\nid = \"4711\"\nkey = \"k\"\nsecret = \"s\"\nclient_events = true\n\
               max_presence_members = 2\nmax_connections = 1\n";
    config.apps = Config::from_toml(app).map_err(|e| e.to_string())?.apps;
    let channels = Channels::from_rules(&config.rules).with_apps(&config.apps);
    let shared = Shared::new(config, channels).map_err(|e| e.to_string())?;
    let now = Instant::now();
    let mut states: Vec<ShardState> = (0..2)
        .map(|i| ShardState::new(ShardId(i), shared.clone(), 16, now).with_seed(i as u64))
        .collect();
    let mut keys = ConnTable::default();
    let key: ConnKey = keys.insert(());
    let mut exchange = Exchange {
        shared: &shared,
        states: &mut states,
        now,
        closed: false,
    };
    exchange.feed(0, Event::Opened(key), key)?;
    // Up to three receives, cut where the flags say.
    let cut = |bits: u8| (usize::from(bits) * input.len()) / 8;
    let (a, b) = (cut((flags >> 1) & 7), cut((flags >> 4) & 7));
    let (first, second) = (a.min(b), a.max(b));
    for piece in [&input[..first], &input[first..second], &input[second..]] {
        if !piece.is_empty() {
            exchange.feed(0, Event::Input(key, piece), key)?;
        }
    }
    exchange.feed(0, Event::Drained(key), key)?;
    exchange.feed(0, Event::InputEnded(key), key)?;
    exchange.now += Duration::from_secs(2);
    exchange.feed(0, Event::Tick, key)?;
    if !exchange.closed {
        exchange.feed(0, Event::Closed(key), key)?;
    }
    for state in exchange.states.iter() {
        let memory = state.memory();
        let left = (memory.inbound, memory.parked, memory.replays);
        if state.connections() != 0 || left != (0, 0, 0) {
            return Err(format!(
                "shard holds {} connections and (inbound, parked, replays) {left:?} \
                 once its only connection is gone",
                state.connections()
            ));
        }
    }
    Ok(())
}

/// Two states and the envelopes between them.
struct Exchange<'a> {
    shared: &'a Shared,
    states: &'a mut Vec<ShardState>,
    now: Instant,
    /// The connection was released (after the state closed it).
    closed: bool,
}

impl Exchange<'_> {
    /// Feeds `event` to shard `s`, plays the driver for the connection
    /// (a close is carried out at once), and delivers envelopes until both
    /// shards are quiet.
    fn feed(&mut self, s: usize, event: Event<'_>, key: ConnKey) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        self.states[s].handle(self.now, event);
        self.settle(key)
    }

    fn settle(&mut self, key: ConnKey) -> Result<(), String> {
        for _ in 0..MAX_HOPS {
            let mut quiet = true;
            for s in 0..self.states.len() {
                let mut commands = Vec::new();
                self.states[s].take_commands(&mut commands);
                for command in commands {
                    if let Command::Close { conn, .. } = command {
                        if conn == key && s == 0 && !self.closed {
                            self.closed = true;
                            self.states[0].handle(self.now, Event::Closed(key));
                            quiet = false;
                        }
                    }
                }
                self.states[s].wake_peers();
                for state in self.states.iter() {
                    state.check_invariants()?;
                }
            }
            for from in 0..self.states.len() {
                for to in 0..self.states.len() {
                    if let Some(envelope) = self.shared.bus().pop(ShardId(from), ShardId(to)) {
                        quiet = false;
                        self.states[to].handle(self.now, Event::Envelope(ShardId(from), envelope));
                    }
                }
            }
            if quiet {
                return Ok(());
            }
        }
        Err(format!("the shards were still busy after {MAX_HOPS} hops"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(flags: u8, line: &str) -> Vec<u8> {
        let mut data = vec![flags];
        data.extend_from_slice(line.as_bytes());
        data.extend_from_slice(b"\r\nHost: x\r\n\r\n");
        data
    }

    #[test]
    fn event_streams_open_resume_and_leave_nothing_behind() {
        for line in [
            "GET /sse?topic=s:a&topic=p:a&topic=n HTTP/1.1\r\nLast-Event-ID: 0.,,",
            "GET /sse?topic=s:a&last_event_id=3.0123456789abcdef HTTP/1.1",
            "GET /stream?topic=s:a&since=1. HTTP/1.1\r\nOrigin: http://x",
            "GET /sse?topic=a HTTP/1.1\r\nOrigin: https://evil.example",
            "OPTIONS /sse?topic=a HTTP/1.1\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: GET",
        ] {
            for flags in [0, 0x12, 0x7e] {
                let mut data = request(flags, line);
                data.extend_from_slice(b"input after the request is dropped");
                assert_eq!(run_request(&data), Ok(()), "{line}");
            }
        }
    }

    /// A Pusher session of every message the front-end reads, well formed
    /// or not, forged or not; then the HTTP API's routes.
    #[test]
    fn pusher_sessions_and_api_requests_leave_nothing_behind() {
        use super::super::client::{http_request, masked_frame, upgrade_request};
        let messages = [
            r#"{"event":"pusher:ping","data":{}}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":"news"}}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"k:00"}}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"k:00","channel_data":"{\"user_id\":1}"}}"#,
            r##"{"event":"pusher:subscribe","data":{"channel":"#server-to-user-ann"}}"##,
            r#"{"event":"pusher:subscribe","data":"{\"channel\":\"cache-x\"}"}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":"bad name"}}"#,
            r#"{"event":"pusher:signin","data":{"auth":"k:00","user_data":"{\"id\":\"ann\"}"}}"#,
            r#"{"event":"client-x","channel":"news","data":{}}"#,
            r#"{"event":"client-x","channel":"private-x","data":"s"}"#,
            r#"{"event":"pusher:unsubscribe","data":{"channel":"news"}}"#,
            r##"{"event":"pusher:unsubscribe","data":{"channel":"#server-to-user-ann"}}"##,
            r#"{"event":"pusher:whatever"}"#,
            "not json",
        ];
        let mut session = upgrade_request("/app/k?protocol=7");
        for message in messages {
            session.extend(masked_frame(true, 1, message.as_bytes(), [7, 1, 3, 9]));
        }
        for flags in [0, 0x24, 0x7e] {
            let mut data = vec![flags];
            data.extend_from_slice(&session);
            assert_eq!(run_request(&data), Ok(()));
        }
        for (method, path) in [
            (
                "GET",
                "/apps/4711/channels?info=user_count&filter_by_prefix=presence-",
            ),
            (
                "GET",
                "/apps/4711/channels/presence-x?info=user_count,subscription_count",
            ),
            ("GET", "/apps/4711/channels/news/users"),
            ("POST", "/apps/4711/users/ann/terminate_connections"),
            ("POST", "/users/ann/terminate_connections?auth_key=k"),
            (
                "POST",
                "/apps/4711/events?auth_key=k&auth_timestamp=1&auth_version=1.0",
            ),
            ("GET", "/app/nobody"),
        ] {
            let mut data = vec![0];
            data.extend(http_request(method, path, Some("{}"), false));
            assert_eq!(run_request(&data), Ok(()), "{method} {path}");
        }
    }

    #[test]
    fn the_paths_that_once_aborted_the_process_are_answered() {
        for path in [
            "/topics/history",
            "/topics/presence",
            "/topics%2Fpresence",
            "/topics%2fhistory",
            "/topics/",
        ] {
            for flags in [0, 1] {
                let line = format!("GET {path} HTTP/1.1");
                assert_eq!(run_request(&request(flags, &line)), Ok(()), "{line}");
            }
        }
    }

    proptest! {
        /// Any method and path built from the routes' own pieces and
        /// percent-encodings, with any query, in one to three receives.
        #[test]
        fn any_request_line_of_route_pieces_is_answered(
            flags in any::<u8>(),
            method in prop_oneof![
                Just("GET"), Just("POST"), Just("DELETE"), Just("HEAD"), Just("PUT"), Just("X"),
            ],
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("/"), Just("topics"), Just("/topics/"), Just("history"),
                    Just("/history"), Just("presence"), Just("/presence"), Just("ws"),
                    Just("/ws/"), Just("register"), Just("/register/"), Just("s:a"),
                    Just("p:a"), Just("%2F"), Just("%25"), Just("%00"), Just("%"), Just("%C3"),
                    Just("é"), Just("//"), Just("sse"), Just("/stream"),
                    Just("app"), Just("/app/k"), Just("apps"), Just("/apps/4711/"),
                    Just("events"), Just("channels"), Just("/channels/"), Just("users"),
                    Just("/users/"), Just("terminate_connections"), Just("presence-x"),
                ],
                0..8,
            ),
            query in prop_oneof![
                Just(""), Just("?since=0"), Just("?since=0&epoch="), Just("?limit=0"),
                Just("?limit=1&after=z"), Just("?epoch=%FF"), Just("?since=99999999999999999999"),
                Just("?topic=s:a&topic=p:a"), Just("?topic=s:a&since=1.e"),
                Just("?topic=s:a&last_event_id=0.,"), Just("?topic=%00"),
            ],
        ) {
            let line = format!("{method} /{}{query} HTTP/1.1", pieces.concat());
            prop_assert_eq!(run_request(&request(flags, &line)), Ok(()), "{}", line);
        }
    }
}
