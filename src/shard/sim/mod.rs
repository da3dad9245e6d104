//! Deterministic simulation of the sharded relay, in the manner of
//! FoundationDB's simulator and TigerBeetle's VOPR: N real shard states
//! ([`ShardState`]) run in one thread under a seeded scheduler that reorders
//! their messages, injects faults and checks invariants after every step.
//! A failing run prints its seed and replays exactly.
//!
//! # Model
//!
//! - **Shards**: 2-4 [`ShardState`]s sharing one real [`Bus`](crate::bus::Bus).
//!   An envelope is delivered by popping one queue (FIFO per ordered pair,
//!   as on the real bus) and feeding it to the receiver; which receiver and
//!   which source queue go next is chosen at random, which is the reordering
//!   the real shards allow.
//! - **Driver** (`driver.rs`): per shard, keys from a
//!   [`ConnTable`](crate::shard::key::ConnTable) and, per connection, the
//!   real driver's own I/O lifecycle (`shard::conn_io`, the same code the
//!   io_uring driver calls): the real
//!   [`Outbound`](crate::shard::outbound::Outbound) queue under a small
//!   budget, overflow, the close modes (`Linger`, `AfterFlush`, `Now`) and
//!   their deadlines, the drain watch, and the write delay (none in half
//!   the runs, 1-20 ms in the others: pushes are held until simulated time
//!   passes it, and a settle moves time to the first due when nothing else
//!   is left); a slot is freed and `Closed` fed only once nothing is pending.
//!   The "kernel" completes a send with any number of bytes, so clients see
//!   frames cut anywhere, and completes shutdowns when the scheduler says.
//!   Sends are handed to the kernel at the end of a step, or of a driver
//!   *pass* (some completions, then some envelopes, then one flush), as the
//!   real loop does; a partly sent frame's tail waits outside a send meanwhile.
//! - **Clients** (`client.rs`): real bytes. HTTP/1.1 requests (publish,
//!   register, unregister, presence, health, upgrades to `/ws`,
//!   `/ws?user_id=`, `/ws/{id}`) split at random points into several
//!   `Input` events; RFC 6455 masked frames (sometimes fragmented, with a
//!   ping between the fragments) carrying the JSON relay messages. They parse
//!   every byte the server sends strictly, answer pings and close frames,
//!   and can stall (read nothing), half-close, reset, or break the protocol.
//! - **Scheduler** (this file: the run, its steps and passes),
//!   **workload** (`workload.rs`: what a step does) and **checkers**
//!   (`checkers.rs`: what clients read, and the checks at quiescence):
//!   every decision comes from a [`Choices`] source, a
//!   seeded generator ([`Seeded`]) or fuzzer bytes ([`FuzzInput`]). A step
//!   opens a connection (or reuses an idle keep-alive one), has a client
//!   send, feeds part of a client's bytes, delivers a burst of envelopes,
//!   completes sends, runs a driver pass, injects a fault (reset,
//!   half-close, a reader that stalls, a close frame, a subscriber flooding
//!   its own topic, a protocol error) or advances time. Time is a fixed base
//!   [`Instant`] plus a simulated offset that only the scheduler advances,
//!   then every shard gets a `Tick`. Nothing reads the OS clock or OS
//!   randomness (registration ids come from `ShardState::with_seed`). Some
//!   runs end with a graceful shutdown under a burst of publishes.
//! - **Streams** (`streams.rs`): three runs in four also have stream topics
//!   `s:0`.. (rule `s:*`: a small `history_size`, a TTL of 30 s or of 2-5 s
//!   against time steps of 0.1-2 s, sometimes `replay_on_subscribe = 2`,
//!   sometimes a `max_history_bytes` of a few KiB) besides the plain `t0`..
//!   (rule `*`). Each has a home shard (a hash of the name), so publishes
//!   and subscriptions hop to it through the bus. Clients subscribe to
//!   streams fresh or from a position (`since`, alone or in
//!   `{"topics":[..]}`); clients that leave (reset, close frame,
//!   half-close, or closed by the server) often come back on any shard and
//!   resubscribe from the offset of the last push they read and the epoch of
//!   their `subscribed`, sometimes spoiled (ahead of the stream, evicted,
//!   of an epoch that never was). HTTP clients query
//!   `/topics/{t}/history?since=&epoch=&limit=`.
//! - **Quiescence**: a *settle* runs without client initiative until nothing
//!   changes (every envelope delivered, every push held for the write
//!   delay released, every send completed, stalled
//!   readers reading again, every client reply fed). A run settles at one to
//!   three checkpoints and at its end.
//!
//! # Invariants
//!
//! After every step: each state's own `check_invariants`; no command names
//! a key the driver released, and no `Send` follows a `Close` for its key;
//! every client's stream parses (no garbage, nothing after a close frame or
//! a `Connection: close` response, no push for a topic outside its
//! `subscribed`..`unsubscribed` window, no publish twice, except a stream's
//! in a later subscription's replay); a connection that
//! ends after a flush ends on a frame boundary, with a close frame for a
//! WebSocket (1013 after an overflow) and with every HTTP request answered;
//! registrations are seen everywhere once acknowledged (`201` then no `404`;
//! `204` then no `101`). No panic. (One known driver fault is recognised
//! rather than failed: an overflow before a `101` is sent drops the `101`
//! and sends a close frame to a client still reading HTTP; the client
//! resets, and `Summary::lost_upgrades` counts it.)
//!
//! At quiescence: no entry waits for acknowledgements; shard A lists shard B
//! as interested in a name iff B has local holders of it (so no entry
//! outlives its last holder anywhere); state and driver hold the same
//! connections, all open (a close still under way is stuck); every request
//! is answered and no client holds part of a frame; a presence query counts
//! exactly the open clients holding the topic; a deleted registration gets
//! `404` on every shard. Deliveries: a subscriber that read `subscribed` for
//! a topic and kept it got every publish to it accepted (`202`) after that,
//! exactly once (unless the bus dropped publishes: a full queue drops them
//! by design); after a graceful shutdown the same holds up to its 1001
//! close frame, and every shard finishes by its deadline. At the end every
//! client leaves, and every index on every shard must be empty.
//!
//! Streams (judged from the bytes clients read; see `streams.rs`): a
//! stream's `subscribed` carries `offset` M and `epoch`, and `recovered`
//! exactly when the subscribe that created the subscription gave a
//! position (a repeated subscribe while subscribed answers with where the
//! pushes stand, in the same epoch); after `"recovered":true` from N the
//! pushes are N+1, N+2, ... (the replay up to M, then live) with no gap and
//! no duplicate until the client leaves the topic, except gaps in live
//! pushes of a run whose bus dropped publishes; otherwise at most
//! `replay_on_subscribe` pushes marked `"replay":true`, consecutive and
//! ending at M, then M+1, M+2, ...; recovery is refused only for a
//! position that is gone (another epoch, ahead, or evicted, which the
//! model knows for certain by size and TTL when no byte bound is set).
//! One order per topic: an offset of an epoch is one publication, whoever
//! reads it (pushes to any client, a `202`, which carries `offset` and
//! `epoch` for a stream, the history endpoint), and a publication has one
//! offset. The history endpoint answers `200` with consecutive
//! publications from `since`+1 to the stream's offset (within the limit),
//! and `410` only for a stale epoch or a position that is gone. At
//! quiescence every replay has arrived whole, each stream's history is
//! probed, and no offset anyone read is past the stream's.
//!
//! # Replaying
//!
//! A failure prints `SIM_SEED=<seed>`, the run's parameters and the last
//! steps; `SIM_SEED=<seed> cargo test --test simulation` replays that run
//! exactly (see `tests/simulation.rs`).

mod checkers;
mod choices;
mod client;
mod driver;
mod requests;
mod streams;
mod workload;

use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::bus::{Envelope, IndexKind, ShardId, ShardSet};
use crate::config::{Config, Limits};
use crate::hooks::Channels;
use crate::rules::{History, Pattern, Rule, RuleSet};
use crate::shard::state::{Command, Event, ShardState};
use crate::shard::Shared;

pub use choices::{Choices, FuzzInput, Seeded};
use client::{Client, Inbound, Req, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use driver::{SendResult, SimShard};
pub use requests::run_request;
use streams::{is_stream_topic, Ledger, Since};

/// Trace lines kept for a failure report.
const TRACE_LINES: usize = 48;
/// Actions a settle may take before the run is declared livelocked. A
/// settle of the largest runs here takes a few thousand.
const MAX_SETTLE_ACTIONS: usize = 200_000;
/// Random steps while a graceful shutdown finishes, before the rest is left
/// to a settle and the deadlines: with time advancing about one step in
/// nine, the 5 s shutdown deadline passes within a few hundred.
const MAX_SHUTDOWN_STEPS: usize = 2_000;
/// The client-side limit on subscriptions, small so the limit is hit.
const MAX_SUBSCRIPTIONS: usize = 4;

/// The shape of one run, chosen from the seed (or fixed by a scenario).
#[derive(Debug, Clone)]
pub struct Params {
    /// Shards, 2-4.
    pub shards: usize,
    /// `max_outbound_bytes_per_connection`: small, so slow consumers overflow.
    pub outbound_budget: usize,
    /// `max_outbound_bytes_per_shard`: half to twice a connection's budget
    /// in one run in four, so the shard's bound closes connections that
    /// are behind.
    pub shard_outbound_budget: usize,
    /// Topic names in play (`t0`, `t1`, ...): few, so traffic collides.
    pub topics: usize,
    /// User ids in play (`u0`, ...).
    pub users: usize,
    /// Connections each shard allows.
    pub max_conns: usize,
    /// Envelopes per bus queue: small values make control envelopes wait in
    /// the backlog and publishes drop (which lifts delivery obligations).
    pub bus_capacity: usize,
    /// Pings after 2 s of silence, dropped 1 s later; else pings are off.
    pub ping: bool,
    /// `http_idle_timeout`.
    pub http_idle_timeout: Duration,
    /// `max_registrations`.
    pub max_registrations: usize,
    /// Random steps before the final checks.
    pub steps: usize,
    /// Start a graceful shutdown after this many steps.
    pub shutdown_at: Option<usize>,
    /// What the random steps favour.
    pub profile: Profile,
    /// Most WebSocket clients subscribe to a topic as soon as they read
    /// their `101`, as real clients do (off for scripts, which say what
    /// their clients send).
    pub auto_subscribe: bool,
    /// Stream topics besides the plain ones, if any.
    pub streams: Option<StreamParams>,
    /// `write_delay`: zero in half the runs, else 1-20 ms, for which the
    /// driver holds pushes (as the real one does) until simulated time
    /// has passed it.
    pub write_delay: Duration,
}

/// The stream topics of a run (`s:0`, `s:1`, ...) and their rule:
///
/// ```toml
/// [[rules]]
/// pattern = "s:*"
/// client_publish = true
/// presence = true
/// history_size = 3..10
/// history_ttl_s = 30 or 2..5
/// replay_on_subscribe = 0 or 2
/// [[rules]]
/// pattern = "*"
/// client_publish = true
/// presence = true
/// ```
#[derive(Debug, Clone)]
pub struct StreamParams {
    /// Stream topics in play, besides the `topics` plain ones.
    pub topics: usize,
    /// `history_size`: small, so eviction and `"recovered":false` happen.
    pub history_size: usize,
    /// `history_ttl_s`: sometimes short against the time steps (0.1-2 s
    /// each), so publications expire and idle streams start afresh.
    pub ttl_s: u64,
    /// `replay_on_subscribe`.
    pub replay_on_subscribe: usize,
    /// `max_history_bytes`: sometimes a few KiB, so one stream's
    /// publications evict another's.
    pub max_history_bytes: usize,
}

impl StreamParams {
    /// Stream settings drawn from `choices`.
    pub fn random(choices: &mut dyn Choices) -> StreamParams {
        let mut pick = |n| choices.below(n);
        StreamParams {
            topics: 1 + pick(3),
            history_size: 3 + pick(8),
            ttl_s: if pick(3) == 0 { 2 + pick(4) as u64 } else { 30 },
            replay_on_subscribe: if pick(3) == 0 { 2 } else { 0 },
            max_history_bytes: if pick(6) == 0 {
                2048 + 1024 * pick(4)
            } else {
                64 << 20
            },
        }
    }

    /// A fixed stream rule for scripted scenarios: two stream topics,
    /// history 8, TTL 30 s, no replay on subscribe, no byte bound.
    pub fn fixed() -> StreamParams {
        StreamParams {
            topics: 2,
            history_size: 8,
            ttl_s: 30,
            replay_on_subscribe: 0,
            max_history_bytes: 64 << 20,
        }
    }

    /// The stream rule.
    fn history(&self) -> History {
        History {
            size: self.history_size,
            ttl: Duration::from_secs(self.ttl_s),
            replay_on_subscribe: self.replay_on_subscribe,
        }
    }
}

/// What a run's random steps favour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Everything: subscriptions, publishes, presence, faults.
    Mixed,
    /// Registrations created, used, deleted and reconnected, with resets.
    Churn,
}

impl Params {
    /// A run's shape drawn from `choices`.
    pub fn random(choices: &mut dyn Choices) -> Params {
        let mut pick = |n| choices.below(n);
        let shards = 2 + pick(3);
        let outbound_budget = 2048 + 1024 * pick(7);
        let topics = 3 + pick(4);
        let users = 2 + pick(3);
        let max_conns = if pick(8) == 0 { 4 + pick(8) } else { 1000 };
        let bus_capacity = if pick(4) == 0 { 8 } else { 4096 };
        let ping = pick(2) == 0;
        let http_idle_timeout = Duration::from_secs(if pick(3) == 0 { 4 } else { 30 });
        let max_registrations = if pick(4) == 0 { 3 } else { 100_000 };
        let steps = 150 + pick(350);
        let shutdown_at = (pick(4) == 0).then(|| steps * (5 + pick(5)) / 10);
        let profile = if pick(5) == 0 {
            Profile::Churn
        } else {
            Profile::Mixed
        };
        // Three runs in four have stream topics besides the plain ones.
        let streams = (pick(4) != 0).then(|| StreamParams::random(choices));
        let mut pick = |n| choices.below(n);
        let shard_outbound_budget = if pick(4) == 0 {
            outbound_budget * (1 + pick(4)) / 2
        } else {
            Limits::default().max_outbound_bytes_per_shard
        };
        let write_delay = if pick(2) == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(1 + pick(20) as u64)
        };
        Params {
            shards,
            outbound_budget,
            shard_outbound_budget,
            topics,
            users,
            max_conns,
            bus_capacity,
            ping,
            http_idle_timeout,
            max_registrations,
            steps,
            shutdown_at,
            profile,
            auto_subscribe: true,
            streams,
            write_delay,
        }
    }

    /// A fixed shape for scripted scenarios: `shards` shards, a 2 KiB
    /// budget, no pings, no shutdown, no write delay.
    pub fn fixed(shards: usize) -> Params {
        Params {
            shards,
            outbound_budget: 2048,
            shard_outbound_budget: Limits::default().max_outbound_bytes_per_shard,
            topics: 4,
            users: 3,
            max_conns: 1000,
            bus_capacity: 4096,
            ping: false,
            http_idle_timeout: Duration::from_secs(30),
            max_registrations: 100_000,
            steps: 300,
            shutdown_at: None,
            profile: Profile::Mixed,
            auto_subscribe: false,
            streams: None,
            write_delay: Duration::ZERO,
        }
    }
}

/// What kind of step the scheduler takes.
#[derive(Debug, Clone, Copy)]
enum StepKind {
    Open,
    Ws,
    Transmit,
    Deliver,
    Kernel,
    Fault,
    Time,
    Pass,
}

const STEP_KINDS: [StepKind; 8] = [
    StepKind::Open,
    StepKind::Ws,
    StepKind::Transmit,
    StepKind::Deliver,
    StepKind::Kernel,
    StepKind::Fault,
    StepKind::Time,
    StepKind::Pass,
];

impl Profile {
    /// Weights of [`STEP_KINDS`].
    fn step_weights(self) -> [usize; 8] {
        match self {
            Profile::Mixed => [10, 18, 22, 16, 16, 3, 4, 10],
            Profile::Churn => [20, 10, 20, 16, 14, 8, 4, 8],
        }
    }

    /// Weights of the connections opened: anonymous, identified and
    /// registered upgrades, then topic publish, user publish, register,
    /// delete, presence, health.
    fn open_weights(self) -> [usize; 9] {
        match self {
            Profile::Mixed => [4, 4, 2, 5, 2, 1, 1, 1, 1],
            Profile::Churn => [1, 2, 6, 2, 1, 4, 3, 1, 0],
        }
    }
}

/// Step weights while a graceful shutdown finishes: time must pass for the
/// close and shutdown deadlines.
const SHUTDOWN_WEIGHTS: [usize; 8] = [2, 6, 15, 20, 20, 2, 10, 10];

/// How a simulated WebSocket is opened.
#[derive(Debug, Clone)]
pub enum Upgrade {
    /// `GET /ws`.
    Anonymous,
    /// `GET /ws?user_id=U`: its `101` waits for every shard's acknowledgement.
    User(String),
    /// `GET /ws/{id}` for the simulation's registration with this index.
    Registration(usize),
}

/// An HTTP request a simulated client sends.
#[derive(Debug, Clone)]
pub enum HttpCall {
    /// `POST /publish` to a topic, or to a user's connections holding it,
    /// with `pad` bytes of padding in the payload.
    Publish {
        topic: String,
        user: Option<String>,
        pad: usize,
    },
    /// `POST /register`.
    Register { user: String, topics: Vec<String> },
    /// `DELETE /register/{id}` of the registration with this index.
    Delete { registration: usize },
    /// `GET /topics/{topic}/presence`.
    Presence { topic: String },
    /// `GET /health`.
    Health,
    /// `GET /topics/{topic}/history` with `since`, `epoch` and `limit` if given.
    History {
        topic: String,
        since: Option<u64>,
        epoch: Option<String>,
        limit: Option<usize>,
    },
}

/// A WebSocket message a simulated client sends.
#[derive(Debug, Clone)]
pub enum WsCall {
    Subscribe(String),
    /// A subscribe from a stream position: `"since":{"offset":N,"epoch":E}`.
    SubscribeAt(String, (u64, String)),
    Unsubscribe(String),
    /// `{"topics":[..]}`.
    SetTopics(Vec<String>),
    /// `{"topics":[..]}` with a position for some: `{"topic":T,"since":..}`.
    SetTopicsAt(Vec<(String, Option<(u64, String)>)>),
    /// A client publish with `pad` bytes of padding.
    Publish {
        topic: String,
        pad: usize,
    },
    Presence(String),
    /// `{"type":"ping"}`.
    Ping,
    /// The plain text `ping`.
    PingText,
    /// A binary frame (refused with an error on `/ws`).
    Binary,
    /// Text that is not JSON.
    BadJson,
    /// An unmasked frame: the server fails the connection with 1002.
    Unmasked,
    /// A close frame with this code.
    Close(u16),
}

/// A publish some client sent, by its index (its payload's `id`).
#[derive(Debug)]
struct Publish {
    topic: String,
    user: Option<String>,
    /// Over HTTP (acknowledged with `202`) rather than from a WebSocket.
    http: bool,
    /// When its request's first byte reached the server.
    first_fed: Option<u64>,
    /// A `202` was read.
    accepted: bool,
    /// Simulated time when the client wrote it: no later than its home
    /// stored it, which bounds when it can expire from a stream's history.
    written_at: Duration,
}

/// A registration some client created (read its `201`).
#[derive(Debug)]
struct Registration {
    id: String,
    user: String,
    /// What its connections start subscribed to.
    topics: Vec<String>,
    created_at: u64,
    /// When each `DELETE` for it first reached a server.
    deletes_fed: Vec<u64>,
    /// When a `204` for it was read.
    deleted_at: Option<u64>,
}

/// What a successful run did, for coverage and the replay check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Random steps taken (including a shutdown's).
    pub steps: usize,
    /// Connections opened.
    pub clients: usize,
    /// HTTP publishes acknowledged with `202`.
    pub publishes_accepted: usize,
    /// Pushes clients received.
    pub pushes: usize,
    /// WebSockets that read their `101`.
    pub upgrades: usize,
    /// `subscribed` replies read.
    pub subscriptions: usize,
    /// WebSockets dropped for an unanswered ping.
    pub ping_timeouts: usize,
    /// (subscriber, publish) pairs the delivery check required.
    pub obligations: usize,
    /// Connections that went over their outbound budget.
    pub overflows: usize,
    /// Of those, closed because their shard was over its outbound budget.
    pub shard_overflows: usize,
    /// The run ended with a graceful shutdown.
    pub shutdown: bool,
    /// The bus dropped publishes (a full queue), so deliveries were not required.
    pub lossy: bool,
    /// Pushes of stream publications (with an offset) clients read,
    /// replays included.
    pub stream_pushes: usize,
    /// `subscribed` replies with `"recovered":true`, and with `false`.
    pub recovered: usize,
    pub not_recovered: usize,
    /// Pushes marked `"replay":true` read.
    pub marked_replays: usize,
    /// History queries answered `200`, and `410`.
    pub history_ok: usize,
    pub history_gone: usize,
    /// Epochs seen beyond each stream topic's first: streams that started
    /// afresh (idle for their TTL with no subscriber).
    pub epoch_changes: usize,
    /// Upgrades whose `101` an overflow dropped (a known driver fault: the
    /// client read a close frame while reading HTTP).
    pub lost_upgrades: usize,
    /// A hash of the whole trace: equal for two runs of one seed.
    pub digest: u64,
}

/// A failed run: what broke, and how to get back to it.
#[derive(Debug)]
pub struct Failure {
    /// `SIM_SEED=<seed>`, or the scenario or fuzz input that failed.
    pub label: String,
    /// The violation or panic.
    pub message: String,
    /// The run's parameters.
    pub params: String,
    /// The last steps, oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "simulation failed: {}", self.message)?;
        writeln!(f, "{}", self.label)?;
        if let Some(seed) = self.label.strip_prefix("SIM_SEED=") {
            writeln!(
                f,
                "replay: SIM_SEED={seed} cargo test --test simulation random_seeds"
            )?;
        }
        writeln!(f, "params: {}", self.params)?;
        writeln!(f, "last {} steps:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Runs the simulation of `seed`.
pub fn run_seed(seed: u64) -> Result<Summary, Failure> {
    let mut choices = Seeded::new(seed);
    let params = Params::random(&mut choices);
    run_with(
        format!("SIM_SEED={seed}"),
        Box::new(choices),
        params,
        Sim::run,
    )
}

/// Runs the simulation of `seed` with its parameters changed by `adjust`
/// (a profile forced, say); `name` labels a failure.
pub fn run_seed_with(
    name: &str,
    seed: u64,
    adjust: impl FnOnce(&mut Params),
) -> Result<Summary, Failure> {
    let mut choices = Seeded::new(seed);
    let mut params = Params::random(&mut choices);
    adjust(&mut params);
    let label = format!("{name}: seed {seed}");
    run_with(label, Box::new(choices), params, Sim::run)
}

/// Runs the simulation of `seed` keeping every trace line (each message
/// clients read included) and returns them with the outcome: for reading a
/// whole run. The decisions are those of [`run_seed`], so it is the same run.
pub fn trace_seed(seed: u64) -> (Vec<String>, Result<Summary, Failure>) {
    let mut choices = Seeded::new(seed);
    let params = Params::random(&mut choices);
    let mut lines = Vec::new();
    let outcome = run_with(
        format!("SIM_SEED={seed}"),
        Box::new(choices),
        params,
        |sim| {
            sim.trace_lines = usize::MAX;
            sim.verbose = true;
            let outcome = sim.run();
            lines = sim.trace.drain(..).collect();
            outcome
        },
    );
    (lines, outcome)
}

/// Runs a short simulation whose every decision comes from `data` (a fuzzer's
/// input); it ends when the input runs dry or after 400 steps.
pub fn run_fuzz(data: &[u8]) -> Result<Summary, Failure> {
    let mut choices = FuzzInput::new(data);
    let mut params = Params::random(&mut choices);
    params.steps = params.steps.min(400);
    if let Some(at) = &mut params.shutdown_at {
        *at = (*at).min(params.steps * 9 / 10);
    }
    run_with("fuzz input".into(), Box::new(choices), params, Sim::run)
}

/// Runs a scripted scenario: `script` drives a simulation of `params`
/// (further choices from `seed`), then the final checks run.
pub fn run_scenario(
    name: &str,
    seed: u64,
    params: Params,
    script: impl FnOnce(&mut Sim) -> Result<(), String>,
) -> Result<Summary, Failure> {
    let label = format!("scenario `{name}` (seed {seed})");
    run_with(label, Box::new(Seeded::new(seed)), params, |sim| {
        script(sim)?;
        sim.check()?;
        sim.finish()
    })
}

fn run_with(
    label: String,
    choices: Box<dyn Choices>,
    params: Params,
    body: impl FnOnce(&mut Sim) -> Result<Summary, String>,
) -> Result<Summary, Failure> {
    let params_text = format!("{params:?}");
    let mut sim = match Sim::new(choices, params) {
        Ok(sim) => sim,
        Err(message) => {
            return Err(Failure {
                label,
                message,
                params: params_text,
                trace: Vec::new(),
            })
        }
    };
    // A panic anywhere (the state, the driver model, a client) is a failure
    // of this run like any violation: report it with the seed and trace.
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut sim)));
    let message = match outcome {
        Ok(Ok(summary)) => return Ok(summary),
        Ok(Err(message)) => message,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            format!("panic at step {}: {text}", sim.steps)
        }
    };
    Err(Failure {
        label,
        message,
        params: params_text,
        trace: sim.trace.iter().cloned().collect(),
    })
}

/// N shard states, their simulated drivers and clients, under one scheduler.
pub struct Sim {
    params: Params,
    choices: Box<dyn Choices>,
    base: Instant,
    /// Simulated time since `base`.
    elapsed: Duration,
    budget: usize,
    /// Queued bytes at which a watched connection is `Drained`.
    drain_mark: usize,
    close_timeout: Duration,
    shutdown_timeout: Duration,
    /// How long the driver holds pushes (the config's `write_delay`).
    write_delay: Duration,
    shared: Shared,
    shards: Vec<SimShard>,
    clients: Vec<Client>,
    publishes: Vec<Publish>,
    registrations: Vec<Registration>,
    /// Reused buffer for the state's commands.
    commands: Vec<Command>,
    /// Orders everything that reaches a server or a client: a publish fed
    /// after a subscriber read `subscribed` has a larger number.
    seq: u64,
    steps: usize,
    shutdown_started: bool,
    violation: Option<String>,
    trace: VecDeque<String>,
    /// Trace lines kept; older ones are dropped.
    trace_lines: usize,
    /// Trace every message clients read (off by default: it costs time).
    verbose: bool,
    digest: u64,
    /// Masks come from their own counter so they spend no choices.
    masks: u64,
    overflows: usize,
    pushes: usize,
    subscriptions: usize,
    obligations: usize,
    /// What clients learnt of the streams.
    ledger: Ledger,
    /// Stream positions of clients that left, for a later reconnect.
    resumes: Vec<Vec<(String, Since)>>,
    stream_pushes: usize,
    recovered: usize,
    not_recovered: usize,
    marked_replays: usize,
    history_ok: usize,
    history_gone: usize,
    lost_upgrades: usize,
}

impl Sim {
    /// A simulation of `params` whose decisions come from `choices`.
    pub fn new(mut choices: Box<dyn Choices>, params: Params) -> Result<Sim, String> {
        let mut config = Config::default();
        config
            .set_shards(params.shards)
            .map_err(|e| e.to_string())?;
        config.pin_cores = false;
        config.limits.max_outbound_bytes_per_connection = params.outbound_budget;
        config.limits.max_outbound_bytes_per_shard = params.shard_outbound_budget;
        config.limits.bus_queue_capacity = params.bus_capacity;
        config.limits.max_registrations = params.max_registrations;
        config.limits.max_subscriptions_per_connection = MAX_SUBSCRIPTIONS;
        config.http_idle_timeout = params.http_idle_timeout;
        config.write_delay = params.write_delay;
        if let Some(streams) = &params.streams {
            let rule = |pattern: &str, history| Rule {
                client_publish: true,
                presence: true,
                history,
                ..Rule::new(Pattern::parse(pattern).expect("a valid pattern"))
            };
            config.rules =
                RuleSet::new(vec![rule("s:*", Some(streams.history())), rule("*", None)])
                    .map_err(|e| e.to_string())?;
            config.limits.max_history_bytes = streams.max_history_bytes;
        }
        // Every webhook event on, so the shards keep their member counts
        // and `check_invariants` checks them after every step; nothing
        // reads the notices (no webhook thread runs here).
        config.webhooks = Some(crate::config::WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "sim".into(),
            events: crate::config::WEBHOOK_EVENTS
                .iter()
                .map(|e| e.to_string())
                .collect(),
            vacated_delay: Duration::from_secs(1),
            offline_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_queued_bytes: 1 << 20,
            max_batch_events: 100,
        });
        if params.ping {
            config.ping_interval = Duration::from_secs(2);
            config.pong_timeout = Duration::from_secs(1);
        } else {
            config.ping_interval = Duration::ZERO;
        }
        config.validate().map_err(|e| e.to_string())?;
        let (budget, close_timeout, shutdown_timeout, write_delay) = (
            config.limits.max_outbound_bytes_per_connection,
            config.close_timeout,
            config.shutdown_timeout,
            config.write_delay,
        );
        let channels = Channels::from_rules(&config.rules);
        let shared = Shared::new(config, channels).map_err(|e| e.to_string())?;
        // Only differences of instants matter to the state, so the base may
        // come from the OS; everything after it is simulated.
        let base = Instant::now();
        let ids = choices.below(1 << 16) as u64;
        let shards = (0..params.shards)
            .map(|i| {
                let state = ShardState::new(ShardId(i), shared.clone(), params.max_conns, base)
                    .with_seed(ids << 8 | i as u64);
                SimShard::new(state, shared.config.limits.max_outbound_bytes_per_shard)
            })
            .collect();
        Ok(Sim {
            params,
            choices,
            base,
            elapsed: Duration::ZERO,
            budget,
            drain_mark: crate::shard::driver::drain_mark(budget),
            close_timeout,
            shutdown_timeout,
            write_delay,
            shared,
            shards,
            clients: Vec::new(),
            publishes: Vec::new(),
            registrations: Vec::new(),
            commands: Vec::new(),
            seq: 0,
            steps: 0,
            shutdown_started: false,
            violation: None,
            trace: VecDeque::with_capacity(TRACE_LINES),
            trace_lines: TRACE_LINES,
            verbose: false,
            digest: 0xcbf2_9ce4_8422_2325,
            masks: 0,
            overflows: 0,
            pushes: 0,
            subscriptions: 0,
            obligations: 0,
            ledger: Ledger::default(),
            resumes: Vec::new(),
            stream_pushes: 0,
            recovered: 0,
            not_recovered: 0,
            marked_replays: 0,
            history_ok: 0,
            history_gone: 0,
            lost_upgrades: 0,
        })
    }

    /// The whole run: random steps (and a shutdown if planned), then the
    /// final checks.
    pub fn run(&mut self) -> Result<Summary, String> {
        let weights = self.params.profile.step_weights();
        // Checkpoints split the run into one to three stretches, so the
        // quiescent checks also see states in the middle of a run, and
        // deliveries are checked for subscribers that die later.
        let stretch = self.params.steps / (1 + self.pick(3));
        for i in 1..=self.params.steps {
            if self.choices.exhausted() {
                break;
            }
            if self.params.shutdown_at == Some(i) {
                self.publish_storm();
                self.begin_shutdown();
            }
            self.step(&weights);
            self.take_violation()?;
            if i % stretch.max(1) == 0 && i < self.params.steps && !self.shutdown_started {
                self.checkpoint()?;
            }
        }
        self.finish()
    }

    /// Settles and checks what holds at quiescence, in the middle of a run.
    pub fn checkpoint(&mut self) -> Result<(), String> {
        self.settle()?;
        self.check_quiescent()?;
        self.probe_presence()?;
        self.probe_history()?;
        self.check_deliveries()
    }

    /// Takes `n` random steps with the run's profile, checking after each.
    pub fn random_steps(&mut self, n: usize) -> Result<(), String> {
        let weights = self.params.profile.step_weights();
        for _ in 0..n {
            self.step(&weights);
            self.take_violation()?;
        }
        Ok(())
    }

    /// For scripts, after each action: what every random step ends with
    /// (sends handed to the kernel, each state's invariants), and the first
    /// violation so far.
    pub fn check(&mut self) -> Result<(), String> {
        self.after_step();
        self.take_violation()
    }

    /// [`Sim::check`] without handing sends to the kernel, so what a
    /// script left queued (a partly sent frame's tail) stays queued.
    pub fn check_without_flush(&mut self) -> Result<(), String> {
        for s in 0..self.shards.len() {
            self.shards[s].state.wake_peers();
            if let Err(e) = self.shards[s].state.check_invariants() {
                self.fail(format!("shard {s} invariant: {e}"));
            }
        }
        self.take_violation()
    }

    fn take_violation(&mut self) -> Result<(), String> {
        match self.violation.take() {
            Some(violation) => Err(violation),
            None => Ok(()),
        }
    }

    /// Final checks: quiescence, probes and deliveries, then every client
    /// leaves and every index must be empty. Finishes a started shutdown first.
    pub fn finish(&mut self) -> Result<Summary, String> {
        if self.shutdown_started {
            self.finish_shutdown()?;
        } else {
            self.settle()?;
            self.check_quiescent()?;
            self.probe_presence()?;
            self.probe_history()?;
            self.probe_registrations()?;
            self.check_quiescent()?;
            self.check_deliveries()?;
            self.teardown()?;
        }
        self.check_empty()?;
        let lossy = self.lossy();
        Ok(Summary {
            steps: self.steps,
            clients: self.clients.len(),
            publishes_accepted: self.publishes.iter().filter(|p| p.accepted).count(),
            pushes: self.pushes,
            upgrades: self.clients.iter().filter(|c| c.ws).count(),
            subscriptions: self.subscriptions,
            ping_timeouts: self
                .shared
                .stats()
                .iter()
                .map(|s| s.ping_timeouts_total.load(Ordering::Relaxed) as usize)
                .sum(),
            obligations: self.obligations,
            overflows: self.overflows,
            shard_overflows: self
                .shared
                .stats()
                .iter()
                .map(|s| s.shard_outbound_overflows_total.load(Ordering::Relaxed) as usize)
                .sum(),
            shutdown: self.shutdown_started,
            lossy,
            stream_pushes: self.stream_pushes,
            recovered: self.recovered,
            not_recovered: self.not_recovered,
            marked_replays: self.marked_replays,
            history_ok: self.history_ok,
            history_gone: self.history_gone,
            lost_upgrades: self.lost_upgrades,
            epoch_changes: self
                .ledger
                .epochs
                .values()
                .map(|e| e.len().saturating_sub(1))
                .sum(),
            digest: self.digest,
        })
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    /// Records the first violation; the run stops after the current step.
    fn fail(&mut self, message: String) {
        if self.violation.is_none() {
            self.note(format!("  VIOLATION: {message}"));
            self.violation = Some(format!("step {}: {message}", self.steps));
        }
    }

    fn note(&mut self, line: String) {
        for byte in line.bytes() {
            self.digest = (self.digest ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.trace.len() >= self.trace_lines {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    // ---- inspection for scenarios --------------------------------------------

    /// The close code client `c` read, if any.
    pub fn close_code(&self, c: usize) -> Option<u16> {
        self.clients[c].close_received
    }

    /// Whether client `c`'s connection is still there.
    pub fn is_connected(&self, c: usize) -> bool {
        self.clients[c].ended.is_none()
    }

    /// Whether client `c` read its `101`.
    pub fn is_upgraded(&self, c: usize) -> bool {
        self.clients[c].ws
    }

    /// Whether the driver found client `c` over its outbound budget.
    pub fn overflowed(&self, c: usize) -> bool {
        self.clients[c].overflowed
    }

    /// Whether client `c` read `subscribed` for `topic` and has not left it.
    pub fn holds(&self, c: usize, topic: &str) -> bool {
        self.clients[c].observed.contains(topic)
    }

    /// Registrations created so far (their `201` read).
    pub fn registrations(&self) -> usize {
        self.registrations.len()
    }

    /// Whether registration `r`'s delete was acknowledged with `204`.
    pub fn is_deleted(&self, r: usize) -> bool {
        self.registrations[r].deleted_at.is_some()
    }

    /// The shards of this run.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }
}

/// Topic `i` of a run with `plain` plain topics: `t{i}`, then streams `s:{i - plain}`.
fn topic_name(plain: usize, i: usize) -> String {
    if i < plain {
        format!("t{i}")
    } else {
        format!("s:{}", i - plain)
    }
}

/// A payload with a publish's id, padded.
fn payload(id: usize, pad: usize) -> String {
    if pad == 0 {
        format!("{{\"id\":{id}}}")
    } else {
        format!("{{\"id\":{id},\"pad\":\"{}\"}}", "x".repeat(pad))
    }
}

/// `{"offset":N,"epoch":E}`.
fn since_json((offset, epoch): &Since) -> String {
    format!("{{\"offset\":{offset},\"epoch\":\"{epoch}\"}}")
}

/// An envelope in a trace line.
fn describe(envelope: &Envelope) -> String {
    let short = |id: &str| id.chars().take(6).collect::<String>();
    match envelope {
        Envelope::Publish { topic, .. } => format!("Publish {topic}"),
        Envelope::UserPublish { user, topic, .. } => format!("UserPublish {user}/{topic}"),
        Envelope::Chat { user, .. } => format!("Chat {user}"),
        Envelope::ForNodes {
            seq, kind, name, ..
        } => format!("ForNodes #{seq} {kind:?} {name}"),
        Envelope::PresenceChange {
            topic,
            conn_id,
            meta,
        } => format!("PresenceChange {topic} {conn_id} {}", meta.is_some()),
        Envelope::PusherMember {
            topic,
            user,
            joined,
            ..
        } => format!("PusherMember {topic:?} {user} {joined}"),
        Envelope::MemberTransition {
            topic,
            user,
            joined,
            ..
        } => format!("MemberTransition {topic:?} {user} {joined}"),
        Envelope::MemberDecided { ticket, tell } => format!("MemberDecided {ticket} {tell}"),
        Envelope::MembersChanged {
            topic,
            added,
            removed,
        } => format!(
            "MembersChanged {topic:?} +{} -{}",
            added.len(),
            removed.len()
        ),
        Envelope::Interest {
            kind,
            name,
            on,
            epoch,
        } => format!(
            "Interest {kind:?} {name} {} e{epoch}",
            if *on { "on" } else { "off" }
        ),
        Envelope::InterestAck { kind, name, epoch } => {
            format!("InterestAck {kind:?} {name} e{epoch}")
        }
        Envelope::Register { ticket, id, .. } => format!("Register #{ticket} {}", short(id)),
        Envelope::Unregister { ticket, id } => format!("Unregister #{ticket} {}", short(id)),
        Envelope::PresenceQuery {
            ticket,
            topic,
            query,
        } => format!("PresenceQuery #{ticket} {topic} {query:?}"),
        Envelope::PresenceReply { ticket, members } => {
            format!("PresenceReply #{ticket} {}", members.count)
        }
        Envelope::Ack { ticket } => format!("Ack #{ticket}"),
        Envelope::StreamPublish { topic, ticket, .. } => {
            format!("StreamPublish {topic} #{ticket:?}")
        }
        Envelope::StreamOpen {
            ticket,
            topic,
            since,
            mark_through,
        } => {
            format!("StreamOpen #{ticket} {topic} since {since:?} marks to {mark_through}")
        }
        Envelope::StreamOpened {
            ticket,
            answer: Ok(page),
        } => format!(
            "StreamOpened #{ticket} {:?} @{} +{} {}",
            page.recovered,
            page.position.offset,
            page.frames.len(),
            if page.more { "more" } else { "done" }
        ),
        Envelope::StreamOpened {
            ticket,
            answer: Err(limit),
        } => format!("StreamOpened #{ticket} refused: {limit}"),
        Envelope::StreamQuery { ticket, topic, .. } => format!("StreamQuery #{ticket} {topic}"),
        Envelope::StreamReply { ticket, status, .. } => format!("StreamReply #{ticket} {status}"),
        Envelope::Drained => "Drained".into(),
        Envelope::Shutdown => "Shutdown".into(),
        Envelope::ProxyVerdict { ticket, verdict } => format!("ProxyVerdict #{ticket} {verdict:?}"),
    }
}
