//! Criterion benches for the shard's in-memory relay work: the topic index
//! (subscribe, lookup, unsubscribe) and the fan-out of one publish to 10,000
//! local subscribers, without any system call.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringcast::bus::ShardId;
use ringcast::engine::memory::MemoryEngine;
use ringcast::engine::{Position, Recovery, StreamEngine, Window};
use ringcast::hooks::Channels;
use ringcast::protocol::message::{push, push_at};
use ringcast::rules::History;
use ringcast::shard::key::{ConnKey, ConnTable};
use ringcast::shard::names::NameIndex;
use ringcast::shard::outbound::{Enqueued, Outbound, SendBuffers};
use ringcast::shard::state::{Command, Event, ShardState};
use ringcast::shard::Shared;
use ringcast::Config;
use std::sync::Arc;

/// Short runs keep `cargo bench` usable in CI; 3 s gives stable medians here.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);

const WARM_UP_TIME: Duration = Duration::from_secs(1);

/// Each iteration does thousands of operations, so few samples suffice.
const SAMPLE_SIZE: usize = 20;

/// Typical event size in the load test.
const PAYLOAD_BYTES: usize = 200;

/// Default per-connection outbound budget.
const OUTBOUND_BUDGET: usize = 1 << 20;

const CONNS: usize = 10_000;
const SUBSCRIBE_TOPICS: usize = 1_000;
const LOOKUP_TOPICS: usize = 100_000;
const LOOKUP_BATCH: usize = 1_000;

/// Coprime with every count used here, so `i * STRIDE % n` visits `0..n` in a
/// scattered order without a random number generator.
const STRIDE: usize = 7_919;

fn payload_json() -> String {
    format!("{{\"text\":\"{}\"}}", "x".repeat(PAYLOAD_BYTES - 11))
}

fn topic_name(i: usize) -> String {
    format!("room:{i}")
}

fn scattered(n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| i * STRIDE % n)
}

/// An index with one topic whose subscribers are connections `0..CONNS`, and
/// each connection's position in it.
fn one_topic_of(conns: usize) -> (NameIndex, Vec<u32>) {
    let mut index = NameIndex::new(1);
    let topic = index.get_or_insert("room:1", true).unwrap();
    let positions = (0..conns as u32)
        .map(|c| index.add_subscriber(topic, ConnKey::new(c, 1)))
        .collect();
    (index, positions)
}

fn topic_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_index");
    group.measurement_time(MEASUREMENT_TIME);
    group.warm_up_time(WARM_UP_TIME);
    group.sample_size(SAMPLE_SIZE);

    let names: Vec<String> = (0..SUBSCRIBE_TOPICS).map(topic_name).collect();
    group.throughput(Throughput::Elements(CONNS as u64));
    group.bench_function("subscribe", |b| {
        b.iter_batched(
            || NameIndex::new(SUBSCRIBE_TOPICS),
            |mut index| {
                for conn in 0..CONNS {
                    let name = black_box(names[conn % SUBSCRIBE_TOPICS].as_str());
                    let topic = index.get_or_insert(name, true).unwrap();
                    black_box(index.add_subscriber(topic, ConnKey::new(conn as u32, 1)));
                }
                index
            },
            BatchSize::SmallInput,
        )
    });

    let mut index = NameIndex::new(LOOKUP_TOPICS);
    for i in 0..LOOKUP_TOPICS {
        index.get_or_insert(&topic_name(i), true).unwrap();
    }
    let queries: Vec<String> = scattered(LOOKUP_TOPICS)
        .take(LOOKUP_BATCH)
        .map(topic_name)
        .collect();
    group.throughput(Throughput::Elements(LOOKUP_BATCH as u64));
    group.bench_function("lookup", |b| {
        b.iter(|| {
            for name in &queries {
                black_box(index.lookup(black_box(name)));
            }
        })
    });
    drop(index);

    group.throughput(Throughput::Elements(CONNS as u64));
    group.bench_function("unsubscribe", |b| {
        b.iter_batched(
            || one_topic_of(CONNS),
            |(mut index, mut positions)| {
                let topic = index.lookup("room:1").unwrap();
                for conn in scattered(CONNS) {
                    let pos = positions[conn];
                    if let Some(moved) = index.remove_subscriber(topic, pos) {
                        positions[moved.slot()] = pos;
                    }
                }
                debug_assert!(index.entry(topic).subscribers.is_empty());
                (index, positions)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Encodes one push and queues it for every subscriber, as the shard does on publish.
fn enqueue_publish(
    index: &NameIndex,
    outbound: &mut [Outbound],
    pool: &mut SendBuffers,
    payload: &str,
) -> Bytes {
    let frame = push(black_box("room:1"), black_box("say"), black_box(payload));
    let topic = index.lookup(black_box("room:1")).unwrap();
    for &conn in &index.entry(topic).subscribers {
        let queued = outbound[conn.slot()].enqueue(frame.clone(), OUTBOUND_BUDGET, pool);
        debug_assert_eq!(queued, Enqueued::Yes);
    }
    frame
}

/// Builds each subscriber's send and completes it as if the kernel took the
/// whole frame; with `release`, an idle connection then drops its write
/// buffers as the shard's `on_flushed` does.
fn send_all(
    index: &NameIndex,
    outbound: &mut [Outbound],
    pool: &mut SendBuffers,
    frame_len: usize,
    release: bool,
) {
    let topic = index.lookup("room:1").unwrap();
    for &conn in &index.entry(topic).subscribers {
        let out = &mut outbound[conn.slot()];
        if let Some(msg) = out.prepare_send() {
            black_box(msg);
            black_box(out.complete_send(frame_len, pool));
            if release {
                out.release_idle_buffers(pool);
            }
        }
    }
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.measurement_time(MEASUREMENT_TIME);
    group.warm_up_time(WARM_UP_TIME);
    group.sample_size(SAMPLE_SIZE);
    group.throughput(Throughput::Elements(CONNS as u64));

    let payload = payload_json();
    let (index, _) = one_topic_of(CONNS);
    let mut outbound: Vec<Outbound> = (0..CONNS).map(|_| Outbound::default()).collect();
    let mut pool = SendBuffers::default();

    group.bench_function("one_publish_to_10k", |b| {
        b.iter(|| {
            let frame = enqueue_publish(&index, &mut outbound, &mut pool, &payload);
            send_all(&index, &mut outbound, &mut pool, frame.len(), true);
        })
    });

    // Same, but connections keep their queue and in-flight buffers between
    // publishes: the cost of the allocations `release_idle_buffers` causes.
    group.bench_function("one_publish_to_10k_kept_buffers", |b| {
        b.iter(|| {
            let frame = enqueue_publish(&index, &mut outbound, &mut pool, &payload);
            send_all(&index, &mut outbound, &mut pool, frame.len(), false);
        });
        for out in &mut outbound {
            out.release_idle_buffers(&mut pool);
        }
    });

    // Only the encode and enqueue; the queues are drained (and released, as
    // after a real send) outside the timed part.
    group.bench_function("enqueue_only_10k", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let frame = enqueue_publish(&index, &mut outbound, &mut pool, &payload);
                timed += start.elapsed();
                send_all(&index, &mut outbound, &mut pool, frame.len(), true);
            }
            timed
        })
    });
    group.finish();
}

/// A one-shard state with `conns` WebSockets subscribed to `room:1`, driven
/// through the same events the driver feeds it.
fn subscribed_state(conns: usize) -> (ShardState, Vec<ConnKey>) {
    let mut config = Config::default();
    config.set_shards(1).unwrap();
    config.ping_interval = Duration::ZERO;
    let channels = Channels::from_rules(&config.rules);
    let shared = Shared::new(config, channels).unwrap();
    let now = Instant::now();
    let mut state = ShardState::new(ShardId(0), shared, conns + 1, now);
    let mut table = ConnTable::default();
    let mut commands = Vec::new();
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let subscribe = masked(br#"{"type":"subscribe","topic":"room:1"}"#);
    let keys: Vec<ConnKey> = (0..conns)
        .map(|_| {
            let key = table.insert(());
            state.handle(now, Event::Opened(key));
            state.handle(now, Event::Input(key, upgrade));
            state.handle(now, Event::Input(key, &subscribe));
            state.take_commands(&mut commands);
            commands.clear();
            key
        })
        .collect();
    (state, keys)
}

fn masked(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The whole in-memory publish path: an HTTP publish parsed by the state,
/// fanned out as commands, queued on each connection as the driver does,
/// and each send built and completed.
fn state_fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.measurement_time(MEASUREMENT_TIME);
    group.warm_up_time(WARM_UP_TIME);
    group.sample_size(SAMPLE_SIZE);
    group.throughput(Throughput::Elements(CONNS as u64));
    let (mut state, keys) = subscribed_state(CONNS);
    let publisher = ConnKey::new(CONNS as u32 + 7, 1);
    let now = Instant::now();
    state.handle(now, Event::Opened(publisher));
    let body = format!(
        r#"{{"topic":"room:1","event":"say","payload":{}}}"#,
        payload_json()
    );
    let request = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut outbound: Vec<Outbound> = (0..=CONNS + 7).map(|_| Outbound::default()).collect();
    let mut pool = SendBuffers::default();
    let mut commands = Vec::new();
    group.bench_function("state_publish_to_10k", |b| {
        b.iter(|| {
            state.handle(now, Event::Input(publisher, black_box(request.as_bytes())));
            state.take_commands(&mut commands);
            for command in commands.drain(..) {
                if let Command::Send(key, frame) = command {
                    let out = &mut outbound[key.slot()];
                    let queued = out.enqueue(frame, OUTBOUND_BUDGET, &mut pool);
                    debug_assert_eq!(queued, Enqueued::Yes);
                    if let Some(plan) = out.prepare_send() {
                        black_box(plan);
                        let len = out.queued_bytes();
                        black_box(out.complete_send(len, &mut pool));
                        out.release_idle_buffers(&mut pool);
                    }
                }
            }
        })
    });
    black_box(keys);
    group.finish();
}

/// Publications a stream keeps in the history benches: a recovery replays all.
const HISTORY: usize = 1_000;

/// A recovery read whole, as one page.
const ALL: Window = Window {
    limit: usize::MAX,
    max_bytes: usize::MAX,
};

/// The memory engine on a stream's home: appending a publication (in steady
/// state, so each append also evicts the oldest) and reading 1,000 back for
/// a recovering subscriber.
fn history(c: &mut Criterion) {
    let mut group = c.benchmark_group("history");
    group.measurement_time(MEASUREMENT_TIME);
    group.warm_up_time(WARM_UP_TIME);
    group.sample_size(SAMPLE_SIZE);
    let settings = History {
        size: HISTORY,
        ttl: Duration::from_secs(300),
        replay_on_subscribe: 0,
    };
    let payload = payload_json();
    let now = Instant::now();
    let mut engine = MemoryEngine::new(1 << 30, 1_000);
    let mut epoch = || Arc::<str>::from("e");
    for _ in 0..HISTORY {
        engine
            .publish("room:1", &settings, now, &mut epoch, &mut |offset| {
                push_at("room:1", offset, "say", &payload)
            })
            .expect("one stream is within the limit");
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_with_eviction", |b| {
        b.iter(|| {
            engine.publish(
                black_box("room:1"),
                &settings,
                now,
                &mut epoch,
                &mut |offset| push_at("room:1", offset, "say", &payload),
            )
        })
    });
    let position = engine.position("room:1", now);
    let since = Position {
        offset: position.offset - HISTORY as u64,
        epoch: position.epoch.clone(),
    };
    group.throughput(Throughput::Elements(HISTORY as u64));
    group.bench_function("recover_1000", |b| {
        b.iter(
            || match engine.recover("room:1", black_box(&since), ALL, now) {
                Recovery::Recovered { publications, .. } => black_box(publications.len()),
                Recovery::Gone { .. } => unreachable!("the position is in history"),
            },
        )
    });
    group.finish();
}

/// One keep-alive HTTP request through the shard state, from its bytes to
/// the response's bytes: decode, route, answer and encode. `GET /health` is
/// the plain path a load balancer (and `wrk`) sees; a publish to a topic
/// nobody holds is `POST /publish` without any fan-out.
fn http_requests(c: &mut Criterion) {
    let mut group = c.benchmark_group("http_state");
    group.measurement_time(MEASUREMENT_TIME);
    group.warm_up_time(WARM_UP_TIME);
    let (mut state, _) = subscribed_state(0);
    let client = ConnKey::new(3, 1);
    let now = Instant::now();
    state.handle(now, Event::Opened(client));
    let mut commands = Vec::new();
    let mut request = |name: &str, bytes: Vec<u8>, expect: &'static [u8]| {
        state.handle(now, Event::Input(client, &bytes));
        state.take_commands(&mut commands);
        assert!(
            matches!(commands.as_slice(), [Command::Send(_, r)] if r.starts_with(expect)),
            "{name}: {commands:?}"
        );
        commands.clear();
        group.bench_function(name, |b| {
            b.iter(|| {
                state.handle(now, Event::Input(client, black_box(&bytes)));
                state.take_commands(&mut commands);
                black_box(commands.drain(..).count())
            })
        });
    };
    request(
        "get_health",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\n",
    );
    let body = format!(r#"{{"topic":"nobody","payload":{}}}"#, payload_json());
    request(
        "post_publish_unheld_topic",
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        b"HTTP/1.1 202 Accepted\r\n",
    );
    group.finish();
}

criterion_group!(
    benches,
    topic_index,
    fanout,
    state_fanout,
    http_requests,
    history
);
criterion_main!(benches);
