//! ringcast-load: open-loop fan-out latency load generator for ringcast and any
//! WebSocket pub/sub server with an HTTP (or WebSocket) publish.
//!
//! # Layout
//!
//! - `main.rs`     the run's phases: plan, connect, measure (epochs, drain), report
//! - `cli.rs`      the command line
//! - `plan.rs`     the run resolved from it: URLs, topics, who connects where
//! - `account.rs`  payload marker and per-(subscriber, publisher) sequence accounting
//! - `offsets.rs`  stream offset accounting per (subscriber, topic): gaps, duplicates, recovery
//! - `churn.rs`    when subscribers drop (`--reconnect-every`, `--storm-at`), seeded
//! - `ws.rs`       sans-IO WebSocket client pieces: URLs, upgrade, frames
//! - `fleet.rs`    the subscribers as the orchestrator sees them (here or in children)
//! - `sub.rs`      subscriber handshake and frame state; the tokio receive path
//! - `uring.rs`    the io_uring receive path (multishot receive, provided buffers)
//! - `child.rs`    `--procs` subscriber child processes and their line protocol
//! - `publish.rs`  open-loop publisher threads (HTTP pipelined or WebSocket)
//! - `pusher.rs`   `--protocol pusher`: the app, subscribe frames, signed HTTP API publishes
//! - `probe.rs`    server and client CPU, core busy, ksoftirqd, RSS per window
//! - `perf.rs`     server syscalls and context switches via `perf stat`
//! - `procstat.rs` /proc readers (CPU, per-cpu ticks, RSS, affinity) and RLIMIT_NOFILE
//! - `report.rs`   the table and the JSON object
//! - `clock.rs`    the system-wide monotonic nanosecond clock
//!
//! A run: subscribers connect (ramped, over several source addresses if asked)
//! and are counted ready once the server acknowledges the subscription; the
//! ready set is then frozen, which defines the expected deliveries of every
//! message. Publishers follow a fixed schedule; each payload carries its
//! scheduled time, so latency is schedule -> receipt. After the duration a
//! drain period lets stragglers arrive before missing deliveries are counted.
//!
//! With `--reconnect-every` or `--storm-at` subscribers drop their sockets
//! abruptly during the measured window and reconnect, re-subscribing from
//! their stream position with `--recover`; the report then adds the offset
//! accounting (missing, duplicated, out of order), the recoveries and their
//! latency, and the storm's time to recover everyone.
//!
//! With `--procs N` the subscribers live in N re-executed children of this
//! binary; this process publishes, measures and merges their counts and
//! histograms.

mod account;
mod child;
mod churn;
mod cli;
mod clock;
mod fleet;
mod offsets;
mod perf;
mod plan;
mod probe;
mod procstat;
mod publish;
mod pusher;
mod report;
mod sub;
mod uring;
mod ws;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{parse_cpu_list, Args};
use clock::{now_ns, sleep_until};
use fleet::{Fleet, Frozen};
use plan::Plan;
use probe::ServerProbe;
use publish::{PubCounters, Publisher};
use report::{Collected, Conns, Env, StepReport};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

/// Schedule origin this far after a step is set up, so every publisher
/// thread is running (and perf attached) before the first message is due.
const STEP_LEAD: Duration = Duration::from_millis(100);
/// Pause after the freeze before reading the server's RSS, so it has settled
/// its per-connection allocations and memory it keeps only while busy has
/// been given back: a ringcast shard returns its receive buffers' pages
/// 100-200 ms after its last receive.
const RSS_SETTLE: Duration = Duration::from_millis(500);
/// Poll interval while waiting for subscribers or for the drain; small
/// against any window, and the polls cost nothing measurable.
const CONNECT_POLL: Duration = Duration::from_millis(10);
const DRAIN_POLL: Duration = Duration::from_millis(5);

fn main() -> Result<()> {
    let plan = Plan::new(Args::parse())?;
    if plan.args.child.is_some() {
        return child::serve(&plan);
    }
    let run = run(&plan)?;
    if plan.args.json {
        println!("{}", serde_json::to_string_pretty(&run.to_json())?);
    } else {
        print!("{}", run.to_table());
    }
    Ok(())
}

/// Progress lines on stderr unless `--quiet`.
struct Progress(bool);

impl Progress {
    fn say(&self, msg: impl AsRef<str>) {
        if !self.0 {
            eprintln!("[ringcast-load] {}", msg.as_ref());
        }
    }
}

/// The whole run: connect, publish and measure each rate step, report.
fn run(plan: &Plan) -> Result<report::Run> {
    let a = &plan.args;
    let progress = Progress(a.quiet);
    let nofile = plan.raise_nofile()?;
    let server_cpus = a.server_cpus.as_deref().map(parse_cpu_list).transpose()?;
    let probe = ServerProbe::new(&server_pids(a)?, server_cpus, !a.no_perf);
    let rss_baseline = probe.rss();

    let (mut fleet, frozen, connect_s) = connect(plan, &progress)?;
    std::thread::sleep(RSS_SETTLE);
    let rss_connected = probe.rss();
    let counters = Arc::new(PubCounters::new(a.topics));
    let mut pubs = open_publishers(plan, &frozen, &counters)?;
    let env = Env {
        cores: plan.cores,
        machine_cpus: procstat::online_cpus().max(plan.cores),
        threads: plan.threads,
        nofile,
        server_pids: probe.pids.clone(),
        rss_baseline,
        rss_connected,
        recv_path: format!("{:?}", a.recv_path).to_lowercase(),
        procs: a.procs,
        server_cpus: probe.cpus.clone(),
        server_cpus_note: probe.cpus_note.clone(),
    };
    let mut rig = Rig {
        plan,
        fleet: &mut fleet,
        pubs: &mut pubs,
        counters: &counters,
        probe: &probe,
        env: &env,
        progress: &progress,
        churn_window: None,
    };
    let steps = rig.measure()?;
    let churn_window = rig.churn_window;
    let streams = report::Streams::new(
        fleet.stream_stats(a.topics)?,
        &counters.last_offsets(),
        plan.churn,
        churn_window,
    );
    let conns = Conns::new(
        a.subscribers,
        frozen.ready,
        connect_s,
        fleet.conn_stats()?,
        fleet.recv_info()?,
    );
    fleet.shutdown();
    Ok(report::Run {
        scenario: plan.scenario(),
        env,
        conns,
        steps,
        streams,
        find_ceiling: a.find_ceiling,
        ceiling_p99_ms: a.ceiling_p99_ms,
    })
}

/// `--server-pid` as numbers.
fn server_pids(a: &Args) -> Result<Vec<u32>> {
    let Some(s) = &a.server_pid else {
        return Ok(Vec::new());
    };
    s.split(',')
        .map(|p| p.trim().parse().with_context(|| format!("bad pid {p}")))
        .collect()
}

/// Connect phase: starts the subscribers, waits until each is ready or has
/// failed (or the deadline passes), then freezes the ready set.
fn connect(plan: &Plan, progress: &Progress) -> Result<(Fleet, Frozen, f64)> {
    let a = &plan.args;
    let start = now_ns();
    let mut fleet = Fleet::start(plan)?;
    let spawn_budget_s = if a.connect_rate > 0.0 {
        a.subscribers as f64 / a.connect_rate
    } else {
        0.0
    };
    let deadline = start + ((spawn_budget_s + a.connect_timeout.as_secs_f64()) * 1e9) as u64;
    let mut last_print = now_ns();
    loop {
        let (ready, settled) = fleet.progress()?;
        if settled >= a.subscribers as u64 || now_ns() >= deadline {
            break;
        }
        std::thread::sleep(CONNECT_POLL);
        if now_ns() - last_print > 1_000_000_000 {
            last_print = now_ns();
            progress.say(format!(
                "connecting: {ready} ready, {} failed of {}",
                settled.saturating_sub(ready),
                a.subscribers
            ));
        }
    }
    let frozen = fleet.freeze(a.topics)?;
    let connect_s = (now_ns() - start) as f64 / 1e9;
    progress.say(format!(
        "{} of {} subscribers ready in {connect_s:.2}s ({} process(es), receive path {:?})",
        frozen.ready, a.subscribers, a.procs, a.recv_path
    ));
    Ok((fleet, frozen, connect_s))
}

/// Opens the publishers' connections (none when nothing is published).
fn open_publishers(
    plan: &Plan,
    frozen: &Frozen,
    counters: &Arc<PubCounters>,
) -> Result<Vec<Publisher>> {
    if !plan.publishing() {
        return Ok(Vec::new());
    }
    let a = &plan.args;
    let topic_subs = Arc::new(frozen.topic_ready.clone());
    (0..a.publishers)
        .map(|p| {
            Publisher::connect(
                p as u32,
                a.publishers as u32,
                plan.pub_addr,
                plan.via(),
                plan.names.clone(),
                a.payload_bytes,
                a.pipeline_depth,
                counters.clone(),
                topic_subs.clone(),
            )
        })
        .collect()
}

/// Everything the measure phase drives.
struct Rig<'a> {
    plan: &'a Plan,
    fleet: &'a mut Fleet,
    pubs: &'a mut [Publisher],
    counters: &'a PubCounters,
    probe: &'a ServerProbe,
    env: &'a Env,
    progress: &'a Progress,
    /// The drop window of the last step (with `--reconnect-every`/`--storm-at`).
    churn_window: Option<churn::Window>,
}

impl Rig<'_> {
    /// Measure phase: one step at the given rate, or, with --find-ceiling,
    /// steps of rising rate until one fails.
    fn measure(&mut self) -> Result<Vec<StepReport>> {
        let a = &self.plan.args;
        let mut steps = Vec::new();
        let mut rate = a.rate.max(if a.find_ceiling { 1.0 } else { 0.0 });
        for epoch in 1u32.. {
            let step = self.step(epoch, rate)?;
            let held = step.held(a.ceiling_p99_ms);
            steps.push(step);
            if !a.find_ceiling || !held || rate * a.ceiling_factor > a.ceiling_max_rate {
                break;
            }
            rate *= a.ceiling_factor;
        }
        Ok(steps)
    }

    /// One rate step: warm-up, the measured window, the drain, the report.
    fn step(&mut self, epoch: u32, rate: f64) -> Result<StepReport> {
        let a = &self.plan.args;
        // perf attaches (counters off) before the schedule is fixed, so its
        // start-up cannot delay the publishers or the window's start.
        let mut window = self.probe.begin();
        self.counters.reset();
        let t0 = now_ns() + STEP_LEAD.as_nanos() as u64;
        let measure_start = t0 + a.warmup.as_nanos() as u64;
        let end = measure_start + a.duration.as_nanos() as u64;
        self.fleet.begin_epoch(epoch, measure_start, end)?;
        if self.plan.churn.drops() {
            self.churn_window = Some(self.plan.churn.window(measure_start, end));
        }
        let schedule = publish::Plan {
            epoch,
            t0,
            measure_start,
            end,
            rate,
        };
        if self.plan.publishing() {
            self.progress.say(format!(
                "step {epoch}: {rate:.0} msgs/s for {:.1}s after {:.1}s warmup",
                a.duration.as_secs_f64(),
                a.warmup.as_secs_f64()
            ));
        }
        if let Some(every) = a.reconnect_every {
            self.progress.say(format!(
                "subscribers drop every {:.2}s on average in the window and reconnect {}",
                every.as_secs_f64(),
                if a.recover { "with since" } else { "afresh" }
            ));
        }
        if let Some(at) = a.storm_at {
            self.progress.say(format!(
                "reconnect storm {:.2}s into the window",
                at.as_secs_f64()
            ));
        }
        let client_pids = self.fleet.child_pids();
        let lag = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pubs
                .iter_mut()
                .map(|p| s.spawn(|| p.run(&schedule)))
                .collect();
            sleep_until(measure_start);
            window.start(&client_pids);
            sleep_until(end);
            let mut lag = sub::new_histogram();
            for h in handles {
                if let Ok(l) = h.join() {
                    let _ = lag.add(&l);
                }
            }
            lag
        });
        let publish_done = now_ns();
        self.drain(publish_done.max(end))?;
        let samples = window.stop(&client_pids);
        let (counts, hist) = self.fleet.take_stats()?;
        let conns = self.fleet.conn_stats()?;
        let collected = Collected {
            rate,
            publishers: self.counters,
            counts,
            hist: &hist,
            lag: &lag,
            samples: &samples,
            publish_overrun_s: publish_done.saturating_sub(end) as f64 / 1e9,
            conns: &conns,
        };
        let window = report::Window {
            duration_s: a.duration.as_secs_f64(),
        };
        Ok(StepReport::build(collected, &window, self.env))
    }

    /// Drain phase: waits up to `--drain` after publishing for deliveries
    /// still in flight, and stops early once every expected delivery arrived
    /// and every dropped subscriber's reconnect was answered.
    fn drain(&mut self, from: u64) -> Result<()> {
        let deadline = from + self.plan.args.drain.as_nanos() as u64;
        while now_ns() < deadline {
            let (unique, resuming) = self.fleet.drain_state()?;
            if self.plan.publishing()
                && self.counters.unanswered() == 0
                && unique >= self.counters.expected.load(SeqCst)
                && resuming == 0
            {
                break;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        Ok(())
    }
}
