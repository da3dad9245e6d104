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
//!   [`ConnTable`](crate::shard::key::ConnTable), the real
//!   [`Outbound`](crate::shard::outbound::Outbound) queue under a small
//!   budget, and the real driver's close lifecycle (`Linger`, `AfterFlush`,
//!   `Now`; a slot is freed and `Closed` fed only once nothing is pending).
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
//! - **Scheduler**: every decision comes from a [`Choices`] source, a
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
//!   changes (every envelope delivered, every send completed, stalled
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

mod choices;
mod client;
mod driver;
mod requests;
mod streams;

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
        }
    }

    /// A fixed shape for scripted scenarios: `shards` shards, a 2 KiB
    /// budget, no pings, no shutdown.
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
        if params.ping {
            config.ping_interval = Duration::from_secs(2);
            config.pong_timeout = Duration::from_secs(1);
        } else {
            config.ping_interval = Duration::ZERO;
        }
        config.validate().map_err(|e| e.to_string())?;
        let (budget, close_timeout, shutdown_timeout) = (
            config.limits.max_outbound_bytes_per_connection,
            config.close_timeout,
            config.shutdown_timeout,
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

    // ---- choices -----------------------------------------------------------

    fn pick(&mut self, n: usize) -> usize {
        self.choices.below(n)
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.pick(n) == 0
    }

    fn weighted(&mut self, weights: &[usize]) -> usize {
        let total: usize = weights.iter().sum();
        let mut x = self.pick(total);
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    fn pick_from<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.pick(items.len());
        Some(items[i].clone())
    }

    /// A topic in play: plain (`t0`, ...) or, in a stream run, a stream (`s:0`, ...).
    fn topic(&mut self) -> String {
        let plain = self.params.topics;
        let i = self.pick(plain + self.stream_topics());
        topic_name(plain, i)
    }

    /// Every topic in play, plain ones first.
    fn all_topics(&self) -> Vec<String> {
        let plain = self.params.topics;
        (0..plain + self.stream_topics())
            .map(|i| topic_name(plain, i))
            .collect()
    }

    fn stream_topics(&self) -> usize {
        self.params.streams.as_ref().map_or(0, |s| s.topics)
    }

    fn user(&mut self) -> String {
        format!("u{}", self.pick(self.params.users))
    }

    fn mask(&mut self) -> [u8; 4] {
        self.masks = self.masks.wrapping_add(1);
        (crate::shard::state::splitmix64(self.masks) as u32).to_le_bytes()
    }

    fn clients_where(&self, keep: impl Fn(&Client) -> bool) -> Vec<usize> {
        (0..self.clients.len())
            .filter(|&c| keep(&self.clients[c]))
            .collect()
    }

    // ---- steps -------------------------------------------------------------

    fn step(&mut self, weights: &[usize; 8]) {
        self.steps += 1;
        let kind = STEP_KINDS[self.weighted(weights)];
        match kind {
            StepKind::Open => self.open_random(),
            StepKind::Ws => self.ws_random(),
            StepKind::Transmit => {
                self.transmit_random(false);
            }
            // Bursts, as a real shard drains its queues and completions in
            // batches: one at a time, the bus could not keep up with four
            // shards' control traffic and every reply would come at the end.
            StepKind::Deliver => {
                for _ in 0..1 + self.pick(6) {
                    self.deliver_random();
                }
            }
            StepKind::Kernel => {
                for _ in 0..1 + self.pick(3) {
                    self.kernel_random(false);
                }
            }
            StepKind::Fault => self.fault_random(),
            StepKind::Time => {
                let ms = 100 + self.pick(1900) as u64;
                self.advance(Duration::from_millis(ms));
            }
            StepKind::Pass => self.pass(),
        }
        self.after_step();
    }

    /// One turn of a real driver on a random shard: some of its sends
    /// complete (possibly in part), then some envelopes arrive, and only
    /// then are sends submitted again. A partly sent frame's tail waits
    /// outside a send meanwhile, while new pushes may find the queue over
    /// budget.
    fn pass(&mut self) {
        let s = self.pick(self.shards.len());
        self.flush(s);
        let sending: Vec<_> = self.shards[s]
            .conns
            .iter()
            .filter(|(_, c)| c.plan.is_some() && !self.clients[c.client].stalled)
            .map(|(key, _)| key)
            .collect();
        for _ in 0..self.pick(4) {
            let Some(key) = self.pick_from(&sending) else {
                break;
            };
            if let Some(bytes) = self.in_flight(s, key) {
                // A send of a non-empty buffer takes at least one byte.
                let taken = 1 + self.pick(bytes.len());
                self.note(format!(
                    "#{} pass s{s}: send took {taken} of {}",
                    self.steps,
                    bytes.len()
                ));
                self.complete_send(s, key, SendResult::Took(taken));
            }
        }
        for _ in 0..self.pick(6) {
            let from = self.pick(self.shards.len());
            self.deliver(from, s);
        }
        self.flush(s);
    }

    /// What every step ends with: control backlogs retried, sends handed to
    /// the kernel, and each state's invariants. A shard's sends are
    /// sometimes held back, as the real driver submits them only at the end
    /// of a pass that may handle several completions and envelopes first
    /// (a partly sent frame's tail then waits outside a send).
    fn after_step(&mut self) {
        for s in 0..self.shards.len() {
            if self.pick(3) != 0 {
                self.flush(s);
            }
            self.shards[s].state.wake_peers();
        }
        for s in 0..self.shards.len() {
            if let Err(e) = self.shards[s].state.check_invariants() {
                self.fail(format!("shard {s} invariant: {e}"));
            }
            if let Err(e) = self.shards[s].check_outbound(self.budget) {
                self.fail(format!("shard {s} driver: {e}"));
            }
        }
    }

    fn open_random(&mut self) {
        // A client that left often comes back for its streams.
        if !self.resumes.is_empty() && self.one_in(3) {
            return self.open_resume();
        }
        // Sometimes an idle keep-alive connection sends another request
        // instead: the only way to reach a shard that stopped accepting.
        let idle = self.clients_where(|c| {
            !c.ws && c.can_send() && c.pending.is_empty() && c.fed == c.out.len()
        });
        if !idle.is_empty() && self.one_in(4) {
            let c = idle[self.pick(idle.len())];
            let kind = 3 + self.pick(6);
            let call = self.random_http_call(kind);
            self.note(format!("#{} c{c} sends {call:?}", self.steps));
            let close = self.one_in(3);
            self.write_http(c, call, close, None);
            return;
        }
        let s = self.pick(self.shards.len());
        let weights = self.params.profile.open_weights();
        let live: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deletes_fed.is_empty())
            .collect();
        match self.weighted(&weights) {
            0 => {
                let pipelined = self.random_pipelined();
                self.open_ws(s, Upgrade::Anonymous, pipelined);
            }
            1 => {
                let user = self.user();
                let pipelined = self.random_pipelined();
                self.open_ws(s, Upgrade::User(user), pipelined);
            }
            2 if !self.registrations.is_empty() => {
                // Mostly live registrations; sometimes one that was deleted.
                let r = match self.pick_from(&live) {
                    Some(r) if !self.one_in(4) => r,
                    _ => self.pick(self.registrations.len()),
                };
                self.open_ws(s, Upgrade::Registration(r), Vec::new());
            }
            kind => {
                let count = 1 + usize::from(self.one_in(3)) + usize::from(self.one_in(6));
                let mut calls = Vec::with_capacity(count);
                for i in 0..count {
                    let kind = if i == 0 { kind } else { 3 + self.pick(6) };
                    calls.push(self.random_http_call(kind));
                }
                let close = self.one_in(2);
                self.open_http(s, calls, close);
            }
        }
    }

    /// An HTTP call of the open-kind index `kind` (3.. of `open_weights`).
    fn random_http_call(&mut self, kind: usize) -> HttpCall {
        let pad = if self.one_in(4) {
            300 + self.pick(1200)
        } else {
            0
        };
        match kind {
            4 => HttpCall::Publish {
                topic: self.topic(),
                user: Some(self.user()),
                pad,
            },
            5 | 2 => {
                let user = self.user();
                let topics = self.random_topics(3);
                HttpCall::Register { user, topics }
            }
            6 if !self.registrations.is_empty() => HttpCall::Delete {
                registration: self.pick(self.registrations.len()),
            },
            7 if self.stream_topics() > 0 && self.one_in(2) => self.random_history_call(),
            7 => HttpCall::Presence {
                topic: self.topic(),
            },
            8 => HttpCall::Health,
            _ => HttpCall::Publish {
                topic: self.topic(),
                user: None,
                pad,
            },
        }
    }

    fn random_topics(&mut self, max: usize) -> Vec<String> {
        let count = self.pick(max + 1);
        let mut topics = Vec::new();
        for _ in 0..count {
            let topic = self.topic();
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        topics
    }

    /// Frames some clients send right behind their upgrade request, before
    /// the `101`: the state must park them until the upgrade is done.
    fn random_pipelined(&mut self) -> Vec<WsCall> {
        if !self.one_in(4) {
            return Vec::new();
        }
        let mut calls = Vec::new();
        for _ in 0..1 + self.pick(2) {
            calls.push(match self.pick(4) {
                0 => WsCall::Close(1000),
                1 => WsCall::Publish {
                    topic: self.topic(),
                    pad: 0,
                },
                _ => WsCall::Subscribe(self.topic()),
            });
        }
        calls
    }

    fn ws_random(&mut self) {
        let candidates = self.clients_where(|c| c.ws && c.can_send());
        let Some(c) = self.pick_from(&candidates) else {
            return;
        };
        let observed: Vec<String> = self.clients[c].observed.iter().cloned().collect();
        let call = match self.weighted(&[8, 2, 2, 5, 1, 1, 1, 1, 1, 2]) {
            0 => {
                let topic = self.topic();
                if is_stream_topic(&topic) && self.one_in(3) {
                    let since = self.random_position(&topic);
                    WsCall::SubscribeAt(topic, since)
                } else {
                    WsCall::Subscribe(topic)
                }
            }
            9 => {
                // Leaving and rejoining at once: the rejoin's interest notice
                // has a new epoch while acks for the old one are in flight.
                let topic = match self.pick_from(&observed) {
                    Some(topic) => topic,
                    None => self.topic(),
                };
                self.ws(c, WsCall::Unsubscribe(topic.clone()));
                WsCall::Subscribe(topic)
            }
            1 => match self.pick_from(&observed) {
                Some(topic) if !self.one_in(4) => WsCall::Unsubscribe(topic),
                _ => WsCall::Unsubscribe(self.topic()),
            },
            2 => {
                let topics = self.random_topics(MAX_SUBSCRIPTIONS + 1);
                let mut at = Vec::with_capacity(topics.len());
                for topic in topics {
                    let since = (is_stream_topic(&topic) && self.one_in(2))
                        .then(|| self.random_position(&topic));
                    at.push((topic, since));
                }
                WsCall::SetTopicsAt(at)
            }
            3 => {
                let topic = match self.pick_from(&observed) {
                    Some(topic) if !self.one_in(4) => topic,
                    _ => self.topic(),
                };
                let pad = if self.one_in(4) { self.pick(1500) } else { 0 };
                WsCall::Publish { topic, pad }
            }
            4 => WsCall::Presence(self.topic()),
            5 => WsCall::Ping,
            6 => WsCall::PingText,
            7 => WsCall::Binary,
            _ => WsCall::BadJson,
        };
        self.ws(c, call);
        if self.one_in(2) {
            self.transmit_random_of(c);
        }
    }

    fn fault_random(&mut self) {
        let alive = self.clients_where(|c| c.ended.is_none() && !c.reset);
        let Some(c) = self.pick_from(&alive) else {
            return;
        };
        match self.weighted(&[2, 2, 6, 2, 2, 1]) {
            0 => self.reset(c),
            1 => self.end_input(c),
            2 => {
                let stalled = !self.clients[c].stalled;
                self.set_stalled(c, stalled);
            }
            3 if self.clients[c].ws && self.clients[c].can_send() => {
                let code = if self.one_in(2) { 1000 } else { 4000 };
                self.ws(c, WsCall::Close(code));
            }
            4 => self.flood(),
            _ if self.clients[c].ws && self.clients[c].can_send() => {
                self.ws(c, WsCall::Unmasked);
            }
            _ => {}
        }
    }

    /// The solo slow consumer: a subscriber stops reading and publishes to
    /// its own topic until its queue passes the budget, so the fan-out of
    /// its own publish finds it over budget (this once freed the topic in
    /// the middle of that fan-out and killed the shard).
    fn flood(&mut self) {
        let candidates = self.clients_where(|c| c.ws && c.can_send() && !c.observed.is_empty());
        let Some(c) = self.pick_from(&candidates) else {
            return;
        };
        let topics: Vec<String> = self.clients[c].observed.iter().cloned().collect();
        let Some(topic) = self.pick_from(&topics) else {
            return;
        };
        self.set_stalled(c, true);
        let count = 3 + self.pick(4);
        for _ in 0..count {
            let pad = 700 + self.pick(600);
            self.ws(
                c,
                WsCall::Publish {
                    topic: topic.clone(),
                    pad,
                },
            );
        }
        self.transmit_all(c);
    }

    // ---- opening connections -----------------------------------------------

    /// Accepts a connection for a new client on `shard`; `None` if the shard
    /// no longer accepts (it is shutting down).
    fn connect(&mut self, s: usize, label: String) -> Option<usize> {
        let c = self.clients.len();
        let key = self.accept(s, c)?;
        self.note(format!("#{} open c{c} on s{s}: {label}", self.steps));
        self.clients.push(Client::new(s, key, label));
        self.feed(s, Event::Opened(key));
        Some(c)
    }

    /// Opens a WebSocket client on shard `s`; `pipelined` frames follow the
    /// upgrade request at once. Returns the client, if the shard accepted.
    pub fn open_ws(&mut self, s: usize, upgrade: Upgrade, pipelined: Vec<WsCall>) -> Option<usize> {
        let (path, user, registration, topics) = match &upgrade {
            Upgrade::Anonymous => ("/ws".to_string(), None, None, Vec::new()),
            Upgrade::User(user) => (
                format!("/ws?user_id={user}"),
                Some(user.clone()),
                None,
                Vec::new(),
            ),
            Upgrade::Registration(r) => {
                let reg = self.registrations.get(*r)?;
                let path = format!("/ws/{}", reg.id);
                (path, Some(reg.user.clone()), Some(*r), reg.topics.clone())
            }
        };
        let label = if pipelined.is_empty() {
            format!("GET {path}")
        } else {
            format!("GET {path} + {pipelined:?}")
        };
        let c = self.connect(s, label)?;
        self.clients[c].user = user;
        // The server subscribes a registration's topics right after its `101`.
        for topic in &topics {
            self.clients[c].sent_subscribe(topic, None, MAX_SUBSCRIPTIONS);
        }
        self.clients[c].write_request(
            Req::Upgrade { registration },
            &client::upgrade_request(&path),
        );
        for call in pipelined {
            self.ws(c, call);
        }
        Some(c)
    }

    /// Opens an HTTP client on shard `s` that sends `calls` pipelined, the
    /// last with `Connection: close` if `close`.
    pub fn open_http(&mut self, s: usize, calls: Vec<HttpCall>, close: bool) -> Option<usize> {
        let label = format!("HTTP {calls:?}{}", if close { " close" } else { "" });
        let c = self.connect(s, label)?;
        let count = calls.len();
        for (i, call) in calls.into_iter().enumerate() {
            let last = close && i + 1 == count;
            self.write_http(c, call, last, None);
        }
        Some(c)
    }

    fn write_http(&mut self, c: usize, call: HttpCall, close: bool, expect: Option<usize>) {
        let (req, bytes) = match call {
            HttpCall::Publish { topic, user, pad } => {
                let id = self.publishes.len();
                self.publishes.push(Publish {
                    topic: topic.clone(),
                    user: user.clone(),
                    http: true,
                    first_fed: None,
                    accepted: false,
                    written_at: self.elapsed,
                });
                let user = user.map_or(String::new(), |u| format!(",\"user_id\":\"{u}\""));
                let body = format!(
                    "{{\"topic\":\"{topic}\",\"event\":\"h\",\"payload\":{}{user}}}",
                    payload(id, pad)
                );
                (
                    Req::Publish { id },
                    client::http_request("POST", "/publish", Some(&body), close),
                )
            }
            HttpCall::Register { user, topics } => {
                let list: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
                let body = format!("{{\"user_id\":\"{user}\",\"topics\":[{}]}}", list.join(","));
                (
                    Req::Register { user, topics },
                    client::http_request("POST", "/register", Some(&body), close),
                )
            }
            HttpCall::Delete { registration } => {
                let path = match self.registrations.get(registration) {
                    Some(reg) => format!("/register/{}", reg.id),
                    None => return,
                };
                (
                    Req::Delete { registration },
                    client::http_request("DELETE", &path, None, close),
                )
            }
            HttpCall::Presence { topic } => {
                let path = format!("/topics/{topic}/presence");
                (
                    Req::Presence { topic, expect },
                    client::http_request("GET", &path, None, close),
                )
            }
            HttpCall::Health => (
                Req::Health,
                client::http_request("GET", "/health", None, close),
            ),
            HttpCall::History {
                topic,
                since,
                epoch,
                limit,
            } => {
                let mut query = Vec::new();
                if let Some(since) = since {
                    query.push(format!("since={since}"));
                }
                if let Some(epoch) = &epoch {
                    query.push(format!("epoch={epoch}"));
                }
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                let path = if query.is_empty() {
                    format!("/topics/{topic}/history")
                } else {
                    format!("/topics/{topic}/history?{}", query.join("&"))
                };
                (
                    Req::History {
                        topic,
                        since,
                        epoch,
                        limit,
                        probe: expect.is_some(),
                    },
                    client::http_request("GET", &path, None, close),
                )
            }
        };
        self.clients[c].write_request(req, &bytes);
    }

    // ---- WebSocket messages ------------------------------------------------

    /// Client `c` sends `call` (queued; transmit steps feed it).
    pub fn ws(&mut self, c: usize, call: WsCall) {
        if !self.clients[c].can_send() {
            return;
        }
        if !matches!(call, WsCall::Publish { .. }) {
            self.note(format!("#{} c{c} sends {call:?}", self.steps));
        }
        let text = match &call {
            WsCall::Subscribe(topic) => {
                self.clients[c].sent_subscribe(topic, None, MAX_SUBSCRIPTIONS);
                format!("{{\"type\":\"subscribe\",\"topic\":\"{topic}\"}}")
            }
            WsCall::SubscribeAt(topic, since) => {
                self.clients[c].sent_subscribe(topic, Some(since.clone()), MAX_SUBSCRIPTIONS);
                format!(
                    "{{\"type\":\"subscribe\",\"topic\":\"{topic}\",\"since\":{}}}",
                    since_json(since)
                )
            }
            WsCall::Unsubscribe(topic) => {
                self.clients[c].sent_unsubscribe(topic);
                format!("{{\"type\":\"unsubscribe\",\"topic\":\"{topic}\"}}")
            }
            WsCall::SetTopics(topics) => {
                let at: Vec<_> = topics.iter().map(|t| (t.clone(), None)).collect();
                self.clients[c].sent_set_topics(&at, MAX_SUBSCRIPTIONS);
                let list: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
                format!("{{\"topics\":[{}]}}", list.join(","))
            }
            WsCall::SetTopicsAt(topics) => {
                self.clients[c].sent_set_topics(topics, MAX_SUBSCRIPTIONS);
                let list: Vec<String> = topics
                    .iter()
                    .map(|(t, since)| match since {
                        Some(since) => {
                            format!("{{\"topic\":\"{t}\",\"since\":{}}}", since_json(since))
                        }
                        None => format!("\"{t}\""),
                    })
                    .collect();
                format!("{{\"topics\":[{}]}}", list.join(","))
            }
            WsCall::Publish { topic, pad } => {
                let id = self.publishes.len();
                self.publishes.push(Publish {
                    topic: topic.clone(),
                    user: None,
                    http: false,
                    first_fed: None,
                    accepted: false,
                    written_at: self.elapsed,
                });
                format!(
                    "{{\"type\":\"message\",\"topic\":\"{topic}\",\"event\":\"m\",\"payload\":{}}}",
                    payload(id, *pad)
                )
            }
            WsCall::Presence(topic) => format!("{{\"type\":\"presence\",\"topic\":\"{topic}\"}}"),
            WsCall::Ping => "{\"type\":\"ping\"}".to_string(),
            WsCall::PingText => "ping".to_string(),
            WsCall::BadJson => "{nope".to_string(),
            WsCall::Binary => {
                let mask = self.mask();
                let frame = client::masked_frame(true, OP_BINARY, b"\x01\x02", mask);
                self.clients[c].out.extend_from_slice(&frame);
                return;
            }
            WsCall::Unmasked => {
                // RFC 6455 5.1: the server must fail the connection. The
                // client expects nothing more but a close frame.
                let client = &mut self.clients[c];
                client.out.extend_from_slice(b"\x81\x02hi");
                client.close_sent = true;
                client.drop_all();
                return;
            }
            WsCall::Close(code) => {
                self.keep_positions(c);
                let mask = self.mask();
                let frame =
                    client::masked_frame(true, OP_CLOSE, &client::close_payload(*code), mask);
                let client = &mut self.clients[c];
                client.out.extend_from_slice(&frame);
                client.close_sent = true;
                client.drop_all();
                return;
            }
        };
        self.ws_text(c, text.as_bytes());
    }

    /// Writes a text message, sometimes fragmented with a ping between the
    /// fragments (control frames may interleave, RFC 6455 5.4).
    fn ws_text(&mut self, c: usize, text: &[u8]) {
        if text.len() < 2 || !self.one_in(6) {
            let mask = self.mask();
            let frame = client::masked_frame(true, OP_TEXT, text, mask);
            self.clients[c].out.extend_from_slice(&frame);
            return;
        }
        let cut = 1 + self.pick(text.len() - 1);
        let (first, rest) = text.split_at(cut);
        let mut bytes = client::masked_frame(false, OP_TEXT, first, self.mask());
        if self.one_in(2) {
            bytes.extend(client::masked_frame(true, OP_PING, b"sim", self.mask()));
        }
        bytes.extend(client::masked_frame(true, OP_CONT, rest, self.mask()));
        self.clients[c].out.extend_from_slice(&bytes);
    }

    // ---- feeding client bytes ----------------------------------------------

    fn transmit_random(&mut self, whole: bool) -> bool {
        let candidates = self.clients_where(|c| {
            c.ended.is_none() && !c.reset && (c.fed < c.out.len() || c.eof_requested && !c.eof_fed)
        });
        let Some(c) = self.pick_from(&candidates) else {
            return false;
        };
        if whole {
            self.transmit_all(c);
        } else {
            self.transmit_random_of(c);
        }
        true
    }

    /// Feeds a random part of client `c`'s unsent bytes (all of it, half the time).
    fn transmit_random_of(&mut self, c: usize) {
        let remaining = self.clients[c].out.len() - self.clients[c].fed;
        let n = if remaining == 0 || self.one_in(2) {
            remaining
        } else {
            1 + self.pick(remaining)
        };
        self.transmit(c, n);
    }

    /// Feeds everything client `c` has written, then its end of input if it
    /// asked for one.
    pub fn transmit_all(&mut self, c: usize) {
        let remaining = self.clients[c].out.len() - self.clients[c].fed;
        self.transmit(c, remaining);
    }

    fn transmit(&mut self, c: usize, n: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        if self.clients[c].ended.is_some() || self.clients[c].reset {
            return;
        }
        if n > 0 {
            self.seq += 1;
            let seq = self.seq;
            let client = &mut self.clients[c];
            let chunk = client.out[client.fed..client.fed + n].to_vec();
            client.fed += n;
            let fed = client.fed;
            let mut publishes = Vec::new();
            let mut deletes = Vec::new();
            for pending in client.pending.iter_mut() {
                if pending.first_fed.is_none() && pending.start < fed {
                    pending.first_fed = Some(seq);
                    match pending.req {
                        Req::Publish { id } => publishes.push(id),
                        Req::Delete { registration } => deletes.push(registration),
                        _ => {}
                    }
                }
            }
            for id in publishes {
                self.publishes[id].first_fed = Some(seq);
            }
            for r in deletes {
                self.registrations[r].deletes_fed.push(seq);
            }
            let delivered = self.reads(s, key);
            self.note(format!(
                "#{} c{c} -> s{s}: {n} bytes{}",
                self.steps,
                if delivered {
                    ""
                } else {
                    " (dropped: shut down)"
                }
            ));
            if delivered {
                self.feed(s, Event::Input(key, &chunk));
            }
        }
        let client = &mut self.clients[c];
        if client.eof_requested && !client.eof_fed && client.fed == client.out.len() {
            client.eof_fed = true;
            if self.reads(s, key) {
                self.note(format!("#{} c{c} -> s{s}: end of input", self.steps));
                self.feed(s, Event::InputEnded(key));
            }
        }
    }

    // ---- faults --------------------------------------------------------------

    /// Client `c` resets its connection: the driver shuts it down at once.
    pub fn reset(&mut self, c: usize) {
        if self.clients[c].ended.is_some() || self.clients[c].reset {
            return;
        }
        self.keep_positions(c);
        let client = &mut self.clients[c];
        client.reset = true;
        client.drop_all();
        let (s, key) = (client.shard, client.key);
        self.note(format!("#{} reset c{c}", self.steps));
        self.terminate(s, key, false);
    }

    /// Client `c` half-closes once its output is sent.
    pub fn end_input(&mut self, c: usize) {
        if self.clients[c].eof_requested {
            return;
        }
        self.keep_positions(c);
        let client = &mut self.clients[c];
        client.eof_requested = true;
        client.drop_all();
        self.note(format!("#{} c{c} will half-close", self.steps));
    }

    /// Client `c` stops (or resumes) reading.
    pub fn set_stalled(&mut self, c: usize, stalled: bool) {
        self.clients[c].stalled = stalled;
        self.note(format!(
            "#{} c{c} {}",
            self.steps,
            if stalled { "stalls" } else { "reads again" }
        ));
    }

    // ---- bus, kernel and time ----------------------------------------------

    /// Delivers one envelope: a random receiver with mail, a random source
    /// queue of it. Returns false if the bus is empty.
    fn deliver_random(&mut self) -> bool {
        let n = self.shards.len();
        let bus = self.shared.bus().clone();
        let with_mail: Vec<usize> = (0..n).filter(|&to| bus.has_mail(ShardId(to))).collect();
        let Some(to) = self.pick_from(&with_mail) else {
            return false;
        };
        let start = self.pick(n);
        (0..n).any(|i| self.deliver((start + i) % n, to).is_some())
    }

    /// Delivers the oldest envelope from shard `from` to shard `to`;
    /// returns what it was, or `None` if that queue is empty.
    pub fn deliver(&mut self, from: usize, to: usize) -> Option<String> {
        let envelope = self.shared.bus().pop(ShardId(from), ShardId(to))?;
        let what = describe(&envelope);
        self.note(format!("#{} bus s{from} -> s{to}: {what}", self.steps));
        if matches!(envelope, Envelope::Shutdown) {
            self.driver_begin_shutdown(to);
        }
        self.feed(to, Event::Envelope(ShardId(from), envelope));
        Some(what)
    }

    /// The kernel takes `n` bytes of client `c`'s next send and hands them to
    /// it; the rest waits, not yet handed back to the kernel.
    pub fn read_partly(&mut self, c: usize, n: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        self.flush(s);
        if self.in_flight(s, key).is_some() {
            self.complete_send(s, key, SendResult::Took(n));
        }
    }

    /// Client `c` reads everything queued for it: its sends are handed to
    /// the kernel and completed whole until nothing is left.
    pub fn read_all(&mut self, c: usize) {
        let (s, key) = (self.clients[c].shard, self.clients[c].key);
        loop {
            self.flush(s);
            match self.in_flight(s, key) {
                Some(bytes) => self.complete_send(s, key, SendResult::Took(bytes.len())),
                None => break,
            }
        }
    }

    /// The kernel completes one send or shutdown. `drain` ignores stalls.
    fn kernel_random(&mut self, drain: bool) -> bool {
        let mut work = Vec::new();
        for s in 0..self.shards.len() {
            let clients = &self.clients;
            let stalled = |c: usize| !drain && clients[c].stalled;
            work.extend(
                self.shards[s]
                    .kernel_work(stalled)
                    .into_iter()
                    .map(|k| (s, k)),
            );
        }
        let Some((s, key)) = self.pick_from(&work) else {
            return false;
        };
        let Some(conn) = self.shards[s].conns.get(key) else {
            return false;
        };
        let (client, shutting_down) = (
            conn.client,
            matches!(conn.lifecycle, driver::Lifecycle::ShuttingDown { .. }),
        );
        match self.in_flight(s, key) {
            Some(bytes) => {
                let len = bytes.len();
                let result = if shutting_down && self.one_in(2) {
                    SendResult::Failed
                } else if shutting_down {
                    SendResult::Took(1 + self.pick(len))
                } else if self.one_in(2) {
                    SendResult::Took(len)
                } else {
                    SendResult::Took(1 + self.pick(len))
                };
                self.note(format!(
                    "#{} kernel s{s}/c{client}: {result:?} of {len}",
                    self.steps
                ));
                self.complete_send(s, key, result);
            }
            None => {
                self.note(format!(
                    "#{} kernel s{s}/c{client}: shutdown done",
                    self.steps
                ));
                self.complete_shutdown(s, key);
            }
        }
        true
    }

    /// Time passes; every shard ticks, in a random order.
    pub fn advance(&mut self, by: Duration) {
        self.elapsed += by;
        self.note(format!(
            "#{} time +{}ms = {:.1}s",
            self.steps,
            by.as_millis(),
            self.elapsed.as_secs_f64()
        ));
        let n = self.shards.len();
        let start = self.pick(n);
        for i in 0..n {
            self.tick((start + i) % n);
        }
    }

    /// A few publishes on random shards, some only partly sent: a shutdown
    /// under load finds them on the bus or still arriving.
    fn publish_storm(&mut self) {
        for _ in 0..1 + self.pick(4) {
            let s = self.pick(self.shards.len());
            let calls = (0..1 + self.pick(2))
                .map(|_| HttpCall::Publish {
                    topic: self.topic(),
                    user: None,
                    pad: 0,
                })
                .collect();
            if let Some(c) = self.open_http(s, calls, false) {
                self.transmit_random_of(c);
            }
        }
        for _ in 0..self.pick(4) {
            self.deliver_random();
        }
    }

    /// Asks every shard to shut down gracefully, as the process does.
    pub fn begin_shutdown(&mut self) {
        self.note(format!("#{} graceful shutdown begins", self.steps));
        self.shutdown_started = true;
        self.shared.bus().shutdown_all();
    }

    // ---- what clients read ---------------------------------------------------

    /// The kernel handed `bytes` to client `c`.
    fn client_receive(&mut self, c: usize, bytes: &[u8]) {
        let client = &mut self.clients[c];
        if bytes.is_empty() || client.reset {
            return;
        }
        client.inbuf.extend_from_slice(bytes);
        loop {
            match self.clients[c].next_inbound() {
                Ok(Some(inbound)) => self.on_inbound(c, inbound),
                Ok(None) => break,
                Err(_) if self.lost_101(c) => {
                    // A known driver fault, reported: a batch that passes the
                    // budget before the `101` is sent (a pipelined subscribe
                    // recovering on its home queues the replay behind it)
                    // drops the queued `101` too, then sends 1013 as a frame
                    // to a client still reading HTTP. It gives up (resets).
                    self.note(format!("  c{c} lost its 101 to an overflow"));
                    self.lost_upgrades += 1;
                    self.clients[c].inbuf.clear();
                    self.reset(c);
                    break;
                }
                Err(e) => {
                    let label = self.clients[c].label.clone();
                    self.fail(format!("c{c} ({label}) read garbage: {e}"));
                    self.clients[c].inbuf.clear();
                    break;
                }
            }
        }
    }

    /// Whether client `c`, over its budget before reading its `101`, got a
    /// close frame instead.
    fn lost_101(&self, c: usize) -> bool {
        let client = &self.clients[c];
        client.overflowed
            && !client.ws
            && client.inbuf.first() == Some(&0x88)
            && matches!(
                client.pending.front().map(|p| &p.req),
                Some(Req::Upgrade { .. })
            )
    }

    fn on_inbound(&mut self, c: usize, inbound: Inbound) {
        self.seq += 1;
        let client = &self.clients[c];
        if client.close_received.is_some() {
            return self.fail(format!("c{c} got {inbound:?} after a close frame"));
        }
        if client.close_response {
            return self.fail(format!("c{c} got {inbound:?} after `Connection: close`"));
        }
        match inbound {
            Inbound::Response {
                status,
                close,
                body,
            } => self.on_response(c, status, close, &body),
            Inbound::Frame { opcode, payload } => self.on_frame(c, opcode, &payload),
        }
    }

    fn on_response(&mut self, c: usize, status: u16, close: bool, body: &[u8]) {
        let seq = self.seq;
        let Some(pending) = self.clients[c].pending.pop_front() else {
            return self.fail(format!("c{c} got a {status} it did not ask for"));
        };
        self.note(format!(
            "  c{c} reads {status}{}",
            if close { " (close)" } else { "" }
        ));
        if close {
            self.clients[c].close_response = true;
        }
        if self.clients[c].overflowed && !matches!(pending.req, Req::Upgrade { .. }) {
            // Over its budget, the connection's queued answers were dropped,
            // but one queued with its close still goes: it may answer a
            // later request than the one it would be matched with.
            return;
        }
        let fed = pending.first_fed.unwrap_or(u64::MAX);
        let body_text = String::from_utf8_lossy(body).into_owned();
        let unexpected = |what: &str| format!("c{c}: {what} answered {status} {body_text}");
        match (&pending.req, status) {
            (_, 408) if close => {}
            // A full shard refuses with `Connection: close`; shutdown refuses
            // publishes; busy or full registries and presence refuse too.
            (_, 503) if close || self.shutdown_started => {}
            (Req::Register { .. } | Req::Delete { .. } | Req::Presence { .. }, 503) => {}
            // A stream publish travels to its home as a publish, which a
            // full bus queue drops (counted): the publisher is told.
            (Req::Publish { .. }, 503) if self.lossy() => {}
            (Req::Upgrade { registration }, 101) => {
                let client = &mut self.clients[c];
                client.ws = true;
                client.upgraded_at = Some(seq);
                let resume = std::mem::take(&mut client.resume);
                if !resume.is_empty() {
                    for call in self.resubscribe_calls(resume) {
                        self.ws(c, call);
                    }
                } else if self.params.auto_subscribe && !self.one_in(4) {
                    // What most clients do first.
                    let topic = self.topic();
                    self.ws(c, WsCall::Subscribe(topic));
                }
                if let Some(r) = *registration {
                    let reg = &self.registrations[r];
                    if reg.deleted_at.is_some_and(|d| d < fed) {
                        let id = reg.id.clone();
                        self.fail(format!("c{c}: /ws/{id} upgraded after its DELETE got 204"));
                    }
                }
            }
            (
                Req::Upgrade {
                    registration: Some(r),
                },
                404,
            ) => {
                // Any DELETE fed so far may have overtaken this upgrade.
                let reg = &self.registrations[*r];
                if reg.created_at < fed && reg.deletes_fed.is_empty() {
                    let id = reg.id.clone();
                    self.fail(format!(
                        "c{c}: /ws/{id} got 404 though registered and never deleted"
                    ));
                }
            }
            (Req::Publish { id }, 202) => {
                self.publishes[*id].accepted = true;
                self.on_publish_position(c, *id, body);
            }
            (Req::History { .. }, 200 | 404 | 410) => {
                self.on_history(c, &pending.req, status, body)
            }
            (Req::Register { user, topics }, 201) => {
                let id = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_string));
                match id {
                    Some(id) => self.registrations.push(Registration {
                        id,
                        user: user.clone(),
                        topics: topics.clone(),
                        created_at: seq,
                        deletes_fed: Vec::new(),
                        deleted_at: None,
                    }),
                    None => self.fail(unexpected("register (no id)")),
                }
            }
            (Req::Delete { registration }, 204) => {
                self.registrations[*registration]
                    .deleted_at
                    .get_or_insert(seq);
            }
            (Req::Delete { registration }, 404) => {
                // Only the sole DELETE of a registration must find it: two
                // concurrent ones may finish in either order.
                let reg = &self.registrations[*registration];
                if reg.created_at < fed && reg.deletes_fed.len() == 1 {
                    let id = reg.id.clone();
                    self.fail(format!("c{c}: the only DELETE of {id} got 404"));
                }
            }
            (Req::Presence { topic, expect }, 200) => {
                let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
                let count = parsed.as_ref().and_then(|v| v.get("count")?.as_u64());
                let members = parsed
                    .as_ref()
                    .and_then(|v| Some(v.get("members")?.as_array()?.len() as u64));
                match (count, members, expect) {
                    (Some(n), Some(m), _) if n != m => {
                        self.fail(unexpected("presence (count is not the members)"))
                    }
                    (Some(n), Some(_), Some(e)) if n != *e as u64 => self.fail(format!(
                        "c{c}: presence of {topic} is {n} at quiescence; {e} clients hold it"
                    )),
                    (Some(_), Some(_), _) => {}
                    _ => self.fail(unexpected("presence (bad body)")),
                }
            }
            (Req::Health, 200) => {}
            (req, _) => {
                let what = format!("{req:?}");
                self.fail(unexpected(&what));
            }
        }
        let client = &self.clients[c];
        if client.pending.is_empty()
            && !client.ws
            && !client.close_response
            && client.fed == client.out.len()
            && self.one_in(2)
        {
            self.clients[c].eof_requested = true;
        }
    }

    fn on_frame(&mut self, c: usize, opcode: u8, payload: &[u8]) {
        match opcode {
            OP_TEXT => self.on_text(c, payload),
            OP_PING => {
                if !self.clients[c].close_sent {
                    let mask = self.mask();
                    let pong = client::masked_frame(true, OP_PONG, payload, mask);
                    self.clients[c].out.extend_from_slice(&pong);
                }
            }
            OP_PONG => {}
            OP_CLOSE => {
                let code = match payload {
                    [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                    _ => 1005,
                };
                self.note(format!("  c{c} reads close {code}"));
                let echo = self.one_in(3);
                let mask = self.mask();
                let client = &mut self.clients[c];
                client.close_received = Some(code);
                client.observed.clear();
                client.leaving = true;
                // After a graceful shutdown's 1001 the delivery check still
                // applies: everything acknowledged must precede this frame.
                if code != 1001 {
                    client.drop_all();
                }
                if !client.close_sent {
                    client.close_sent = true;
                    let reply = if echo { code } else { 1000 };
                    let frame =
                        client::masked_frame(true, OP_CLOSE, &client::close_payload(reply), mask);
                    client.out.extend_from_slice(&frame);
                }
            }
            _ => self.fail(format!("c{c} got a frame with opcode {opcode:#x} on /ws")),
        }
    }

    fn on_text(&mut self, c: usize, payload: &[u8]) {
        if payload == b"pong" {
            return;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
            let text = String::from_utf8_lossy(payload).into_owned();
            return self.fail(format!("c{c} got a text frame that is not JSON: {text}"));
        };
        let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if self.verbose {
            self.note(format!("  c{c} reads {value}"));
        }
        let topic = value
            .get("topic")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string();
        let seq = self.seq;
        match kind {
            "subscribed" => {
                self.note(format!("  c{c} reads subscribed {topic}"));
                self.subscriptions += 1;
                self.on_subscribed_position(c, &topic, &value);
                self.clients[c].read_subscribed(&topic, seq);
            }
            "unsubscribed" => self.clients[c].read_unsubscribed(&topic),
            "push" => {
                let id = value
                    .get("payload")
                    .and_then(|p| p.get("id"))
                    .and_then(|i| i.as_u64())
                    .map(|i| i as usize);
                let Some(publish) = id.and_then(|id| self.publishes.get(id)) else {
                    return self.fail(format!("c{c} got a push of no known publish: {value}"));
                };
                let id = id.unwrap_or_default();
                let client = &self.clients[c];
                let violation = if !client.observed.contains(&topic) {
                    Some(format!("a push for {topic}, which it does not hold"))
                } else if publish.topic != topic {
                    Some(format!(
                        "publish {id} to {} as a push for {topic}",
                        publish.topic
                    ))
                } else if publish.user.is_some() && publish.user != client.user {
                    Some(format!("publish {id} for {:?}", publish.user))
                } else {
                    None
                };
                if let Some(violation) = violation {
                    let label = client.label.clone();
                    return self.fail(format!("c{c} ({label}) got {violation}"));
                }
                // A stream may send a publication again in a later
                // subscription of the same connection (a replay); within
                // one, its offsets tell a duplicate.
                let replayable = is_stream_topic(&topic) && publish.user.is_none();
                if !self.clients[c].received.insert(id) && !replayable {
                    return self.fail(format!("c{c} got publish {id} twice"));
                }
                self.pushes += 1;
                self.on_push_position(c, &topic, id, &value);
            }
            "presence" => {
                let count = value.get("count").and_then(|v| v.as_u64());
                let members = value
                    .get("members")
                    .and_then(|m| m.as_array())
                    .map(|m| m.len());
                if count.is_none() || count != members.map(|m| m as u64) {
                    self.fail(format!("c{c} got a bad presence answer: {value}"));
                }
            }
            "pong" | "error" => {}
            _ => self.fail(format!("c{c} got an unknown message: {value}")),
        }
    }

    /// The driver released client `c`'s connection.
    fn client_ended(&mut self, c: usize, graceful: bool) {
        self.keep_positions(c);
        let shutdown = self.shutdown_started;
        let client = &mut self.clients[c];
        client.ended = Some(graceful);
        if client.close_received != Some(1001) {
            client.drop_all();
        }
        let label = client.label.clone();
        let unanswered = client.pending.iter().any(|p| p.end <= client.fed);
        let violation = if !graceful || client.reset {
            None
        } else if !client.inbuf.is_empty() {
            Some(format!(
                "ended after a flush with {} bytes of a cut frame or response",
                client.inbuf.len()
            ))
        } else if client.ws && client.close_received.is_none() {
            Some("a WebSocket ended after a flush without a close frame".into())
        } else if client.ws && client.owed_1013 && client.close_received != Some(1013) {
            Some(format!(
                "an overflowed WebSocket ended with close {:?}, not 1013",
                client.close_received
            ))
        } else if !client.ws
            && unanswered
            && !client.close_response
            && !client.overflowed
            && !shutdown
        {
            Some("an HTTP connection ended after a flush with a request unanswered".into())
        } else {
            None
        };
        self.note(format!(
            "  c{c} connection ended ({})",
            if graceful { "after flush" } else { "cut" }
        ));
        if let Some(violation) = violation {
            self.fail(format!("c{c} ({label}): {violation}"));
        }
    }

    // ---- quiescence ----------------------------------------------------------

    /// Runs without client initiative until nothing changes: every envelope
    /// delivered, every send completed (stalled clients read again), every
    /// byte clients wrote (answers to pings and close frames) fed.
    pub fn settle(&mut self) -> Result<(), String> {
        for client in &mut self.clients {
            client.stalled = false;
        }
        self.note(format!("#{} settle", self.steps));
        for _ in 0..MAX_SETTLE_ACTIONS {
            for s in 0..self.shards.len() {
                self.flush(s);
            }
            let progressed = match self.pick(3) {
                0 => {
                    self.deliver_random() || self.kernel_random(true) || self.transmit_random(true)
                }
                1 => {
                    self.kernel_random(true) || self.transmit_random(true) || self.deliver_random()
                }
                _ => {
                    self.transmit_random(true) || self.deliver_random() || self.kernel_random(true)
                }
            };
            self.after_step();
            self.take_violation()?;
            if !progressed && self.shards.iter().all(|s| s.state.control_backlog() == 0) {
                return Ok(());
            }
        }
        Err(format!(
            "no quiescence after {MAX_SETTLE_ACTIONS} actions (livelock)"
        ))
    }

    /// Invariants that hold once everything has settled.
    fn check_quiescent(&mut self) -> Result<(), String> {
        let n = self.shards.len();
        for s in 0..n {
            let shard = &self.shards[s];
            shard
                .state
                .check_invariants()
                .map_err(|e| format!("shard {s} invariant at quiescence: {e}"))?;
            if shard.state.connections() != shard.conns.len() {
                return Err(format!(
                    "shard {s}: the state holds {} connections, the driver {}",
                    shard.state.connections(),
                    shard.conns.len()
                ));
            }
        }
        for kind in [IndexKind::Topic, IndexKind::User, IndexKind::Chat] {
            // Shards holding each name locally.
            let mut holders: Vec<(String, ShardSet)> = Vec::new();
            for s in 0..n {
                for (_, entry) in self.shards[s].state.name_index(kind).iter() {
                    if !entry.waiting.is_empty() || entry.acks_pending > 0 {
                        return Err(format!(
                            "shard {s}: {kind:?} `{}` still waits for acknowledgements at quiescence",
                            entry.name
                        ));
                    }
                    if entry.local_count() > 0 {
                        match holders.iter_mut().find(|(name, _)| **name == *entry.name) {
                            Some((_, set)) => set.insert(ShardId(s)),
                            None => {
                                let mut set = ShardSet::default();
                                set.insert(ShardId(s));
                                holders.push((entry.name.to_string(), set));
                            }
                        }
                    }
                }
            }
            for a in 0..n {
                let index = self.shards[a].state.name_index(kind);
                for (name, set) in &holders {
                    let mut expected = *set;
                    expected.remove(ShardId(a));
                    let listed = index
                        .lookup(name)
                        .map(|id| index.entry(id).remote)
                        .unwrap_or_default();
                    if listed != expected {
                        return Err(format!(
                            "shard {a}: {kind:?} `{name}` lists shards {:?}, but {:?} hold it",
                            listed.iter().map(|s| s.0).collect::<Vec<_>>(),
                            expected.iter().map(|s| s.0).collect::<Vec<_>>()
                        ));
                    }
                }
                for (_, entry) in index.iter() {
                    if !holders.iter().any(|(name, _)| **name == *entry.name) {
                        return Err(format!(
                            "shard {a}: {kind:?} `{}` outlived every holder (lists {:?})",
                            entry.name,
                            entry.remote.iter().map(|s| s.0).collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_some() {
                continue;
            }
            let closing = client.close_sent
                || client.close_received.is_some()
                || client.eof_requested
                || client.close_response;
            if closing {
                return Err(format!(
                    "c{c} ({}) is still connected at quiescence though closing",
                    client.label
                ));
            }
            if let Some(pending) = client.pending.front() {
                return Err(format!(
                    "c{c} ({}): {:?} unanswered at quiescence",
                    client.label, pending.req
                ));
            }
            if !client.inbuf.is_empty() {
                return Err(format!(
                    "c{c} ({}) holds {} bytes of a frame or response that never completes",
                    client.label,
                    client.inbuf.len()
                ));
            }
        }
        self.check_stream_replays()?;
        // Every close finishes without time passing: clients answer close
        // frames and read everything, so a connection still closing is stuck.
        for (s, shard) in self.shards.iter().enumerate() {
            for (_, conn) in shard.conns.iter() {
                if conn.lifecycle != driver::Lifecycle::Open {
                    let client = &self.clients[conn.client];
                    return Err(format!(
                        "shard {s}: c{} ({}) is {:?} at quiescence",
                        conn.client, client.label, conn.lifecycle
                    ));
                }
            }
        }
        Ok(())
    }

    /// Asks every topic's presence through a fresh connection; it must count
    /// exactly the clients that hold the topic.
    fn probe_presence(&mut self) -> Result<(), String> {
        for topic in self.all_topics() {
            let expect = self
                .clients
                .iter()
                .filter(|c| c.ws && c.ended.is_none() && c.observed.contains(&topic))
                .count();
            let s = self.pick(self.shards.len());
            let Some(c) = self.connect(s, format!("presence probe {topic}")) else {
                continue;
            };
            self.write_http(c, HttpCall::Presence { topic }, true, Some(expect));
        }
        self.settle()
    }

    /// Deleted registrations must get 404 on every shard, and a few live ones 101.
    fn probe_registrations(&mut self) -> Result<(), String> {
        let deleted: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deleted_at.is_some())
            .take(3)
            .collect();
        let live: Vec<usize> = (0..self.registrations.len())
            .filter(|&r| self.registrations[r].deletes_fed.is_empty())
            .take(2)
            .collect();
        for r in deleted {
            for s in 0..self.shards.len() {
                self.open_ws(s, Upgrade::Registration(r), Vec::new());
            }
        }
        for r in live {
            let s = self.pick(self.shards.len());
            self.open_ws(s, Upgrade::Registration(r), Vec::new());
        }
        self.settle()
    }

    /// Every subscriber that kept a topic got every acknowledged publish to
    /// it fed after its `subscribed` (and, for a user publish, after its
    /// `101`), exactly once; after a graceful shutdown, before its 1001.
    fn check_deliveries(&mut self) -> Result<(), String> {
        if self.lossy() {
            return Ok(());
        }
        for (c, client) in self.clients.iter().enumerate() {
            let eligible = client.ws
                && !client.overflowed
                && (client.ended.is_none() || client.close_received == Some(1001));
            if !eligible {
                continue;
            }
            for (topic, &since) in &client.held_since {
                for (id, publish) in self.publishes.iter().enumerate() {
                    let fed = publish.first_fed.unwrap_or(0);
                    if !publish.http || !publish.accepted || publish.topic != *topic || fed <= since
                    {
                        continue;
                    }
                    if let Some(user) = &publish.user {
                        let upgraded = client.upgraded_at.unwrap_or(u64::MAX);
                        if client.user.as_ref() != Some(user) || upgraded >= fed {
                            continue;
                        }
                    }
                    self.obligations += 1;
                    if !client.received.contains(&id) {
                        return Err(format!(
                            "c{c} ({}) held {topic} since #{since} but never got publish {id} \
                             (fed at #{fed}, accepted with 202)",
                            client.label
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every client leaves (close frame, half-close or reset), then the run settles.
    fn teardown(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            if self.clients[c].ended.is_some() {
                continue;
            }
            match self.pick(3) {
                0 if self.clients[c].ws && self.clients[c].can_send() => {
                    self.ws(c, WsCall::Close(1000))
                }
                1 => self.reset(c),
                _ => self.end_input(c),
            }
        }
        self.settle()
    }

    /// After everyone left: no connection and no name anywhere.
    fn check_empty(&mut self) -> Result<(), String> {
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_none() {
                return Err(format!(
                    "c{c} ({}) is still connected at the end",
                    client.label
                ));
            }
        }
        for s in 0..self.shards.len() {
            let shard = &self.shards[s];
            if shard.state.connections() != 0 || !shard.conns.is_empty() {
                return Err(format!("shard {s} still holds connections at the end"));
            }
            for kind in [IndexKind::Topic, IndexKind::User, IndexKind::Chat] {
                if let Some((_, entry)) = shard.state.name_index(kind).iter().next() {
                    return Err(format!(
                        "shard {s}: {kind:?} `{}` outlived every connection",
                        entry.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Keeps stepping until every shard has shut down and every connection
    /// is gone, then checks what shutdown promises.
    fn finish_shutdown(&mut self) -> Result<(), String> {
        let shut_down = |sim: &Sim| {
            sim.shards
                .iter()
                .all(|s| s.shutdown_deadline.is_some() && s.conns.is_empty())
        };
        for _ in 0..MAX_SHUTDOWN_STEPS {
            if shut_down(self) || self.choices.exhausted() {
                break;
            }
            self.step(&SHUTDOWN_WEIGHTS);
            self.take_violation()?;
        }
        // The rest must finish without clients acting: every envelope
        // delivered, then past every close and shutdown deadline.
        self.settle()?;
        if !shut_down(self) {
            self.advance(self.shutdown_timeout + self.close_timeout);
            self.check()?;
            self.settle()?;
        }
        for (s, shard) in self.shards.iter().enumerate() {
            if shard.shutdown_deadline.is_none() || !shard.conns.is_empty() {
                return Err(format!(
                    "shard {s} still has connections after its shutdown deadline"
                ));
            }
            if !shard.state.is_shutting_down() {
                return Err(format!("shard {s} never began its shutdown"));
            }
        }
        self.check_quiescent()?;
        self.check_deliveries()
    }

    /// Whether a bus queue was ever full and dropped a publish.
    fn lossy(&self) -> bool {
        self.shared
            .stats()
            .iter()
            .any(|s| s.bus_drops_total.load(Ordering::Relaxed) > 0)
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
    }
}
