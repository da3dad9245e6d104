//! Turns counters, histograms and /proc samples into the report: a human table
//! or one JSON object. Also decides whether a run is trustworthy (client
//! saturated, publishers behind schedule, machine CPU exhausted, the server's
//! cpus shared with other work) and says so. With stream topics or drops it
//! adds the offset accounting, the reconnects and the storm (`Streams`).

use crate::account::DeliveryCounts;
use crate::churn;
use crate::fleet::RecvInfo;
use crate::probe::Samples;
use crate::publish::PubCounters;
use crate::sub::{ConnStats, StreamStats};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

/// Client CPU share of available cores above which the client is called saturated.
const CLIENT_SATURATED_UTIL: f64 = 0.85;
/// Machine busy share above which client and server are starving each other.
const MACHINE_SATURATED_UTIL: f64 = 0.95;
/// Publisher lateness (p99, ms) above which the schedule was not kept.
const SEND_LAG_WARN_MS: f64 = 5.0;
/// Share of the window in which other processes ran user code on the
/// server's cpus above which "core busy" is called inflated: a build on the
/// shared machine shows up at several percent, the server's own jitter below one.
const FOREIGN_CORE_WARN: f64 = 0.03;

/// What was run.
pub(crate) struct Scenario {
    pub(crate) label: String,
    pub(crate) sub_url: String,
    pub(crate) pub_url: String,
    /// `ringcast` or `pusher`.
    pub(crate) protocol: String,
    pub(crate) publish_via: String,
    pub(crate) subscribers: usize,
    pub(crate) topics: usize,
    pub(crate) dist: String,
    pub(crate) publishers: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) duration_s: f64,
    pub(crate) warmup_s: f64,
}

/// Where it ran.
pub(crate) struct Env {
    /// Cores this process may run on (affinity).
    pub(crate) cores: usize,
    /// Online cpus of the machine.
    pub(crate) machine_cpus: usize,
    pub(crate) threads: usize,
    pub(crate) nofile: u64,
    pub(crate) server_pids: Vec<String>,
    pub(crate) rss_baseline: Option<u64>,
    pub(crate) rss_connected: Option<u64>,
    /// `tokio` or `uring`.
    pub(crate) recv_path: String,
    /// Subscriber processes.
    pub(crate) procs: usize,
    /// The server's cpus used for "core busy".
    pub(crate) server_cpus: Option<Vec<usize>>,
    /// Why core busy is not measured.
    pub(crate) server_cpus_note: Option<String>,
}

/// Measurement window length.
pub(crate) struct Window {
    pub(crate) duration_s: f64,
}

/// Subscriber connection outcome.
pub(crate) struct Conns {
    requested: usize,
    ready: u64,
    connect_s: f64,
    stats: ConnStats,
    recv: RecvInfo,
}

impl Conns {
    /// The connection outcome of a run.
    pub(crate) fn new(
        requested: usize,
        ready: u64,
        connect_s: f64,
        stats: ConnStats,
        recv: RecvInfo,
    ) -> Conns {
        Conns {
            requested,
            ready,
            connect_s,
            stats,
            recv,
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Latency summary in milliseconds.
#[derive(Clone, Copy, Default)]
struct Lat {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Lat {
    fn of(h: &Histogram<u64>) -> Lat {
        if h.is_empty() {
            return Lat::default();
        }
        Lat {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
    fn json(&self) -> Value {
        json!({"count": self.count, "p50": self.p50, "p90": self.p90, "p99": self.p99,
               "p99_9": self.p999, "max": self.max})
    }
}

/// What one rate step collected, handed to `StepReport::build`.
pub(crate) struct Collected<'a> {
    /// Target rate, messages/s.
    pub(crate) rate: f64,
    /// Publisher counters at the end of the drain.
    pub(crate) publishers: &'a PubCounters,
    /// Delivery counts summed over subscriber threads and processes.
    pub(crate) counts: DeliveryCounts,
    /// Latency of measured unique deliveries.
    pub(crate) hist: &'a Histogram<u64>,
    /// Publisher send lag.
    pub(crate) lag: &'a Histogram<u64>,
    /// /proc and perf samples of the window.
    pub(crate) samples: &'a Samples,
    /// How far publishing ran past its schedule's end, seconds.
    pub(crate) publish_overrun_s: f64,
    /// Subscriber connection counters so far.
    pub(crate) conns: &'a ConnStats,
}

/// Seconds per million deliveries.
fn per_million(seconds: Option<f64>, deliveries: u64) -> Option<f64> {
    (deliveries > 0).then_some(seconds? / deliveries as f64 * 1e6)
}

/// Events per delivery.
fn per_delivery(events: Option<u64>, deliveries: u64) -> Option<f64> {
    (deliveries > 0).then_some(events? as f64 / deliveries as f64)
}

/// CPU and kernel figures of one window.
#[derive(Default)]
struct Cost {
    wall_s: f64,
    server_cpu_s: Option<f64>,
    server_rss: Option<u64>,
    softirqd_s: Option<f64>,
    core_busy_s: Option<f64>,
    core_softirq_s: Option<f64>,
    foreign_user_s: Option<f64>,
    client_cpu_s: Option<f64>,
    client_recv_cpu_s: Option<f64>,
    client_util: Option<f64>,
    machine_busy: Option<f64>,
    syscalls: Option<u64>,
    context_switches: Option<u64>,
    perf_note: Option<String>,
}

impl Cost {
    fn of(s: &Samples, env: &Env) -> Cost {
        let wall_s = s.wall_s();
        let client_cpu_s = s.client_cpu_s();
        Cost {
            wall_s,
            server_cpu_s: s.server_cpu_s(),
            server_rss: s.server_rss(),
            softirqd_s: s.softirqd_s(),
            core_busy_s: s.core_busy_s(),
            core_softirq_s: s.core_softirq_s(),
            foreign_user_s: s.foreign_user_s(),
            client_cpu_s,
            client_recv_cpu_s: s.client_recv_cpu_s(),
            client_util: client_cpu_s.map(|c| c / (wall_s.max(1e-9) * env.cores as f64)),
            machine_busy: s.machine_busy(),
            syscalls: s.perf.map(|p| p.syscalls),
            context_switches: s.perf.map(|p| p.context_switches),
            perf_note: s.perf_note.clone(),
        }
    }
}

/// One rate step.
pub(crate) struct StepReport {
    rate: f64,
    duration_s: f64,
    sent: u64,
    unanswered: u64,
    write_failed: u64,
    ok: u64,
    rejected: u64,
    reconnects: u64,
    conns_per_request: u64,
    last_rejection: Option<String>,
    expected: u64,
    counts: DeliveryCounts,
    measured_expected: u64,
    latency: Lat,
    send_lag: Lat,
    publish_overrun_s: f64,
    cost: Cost,
    conn_errors: u64,
    warnings: Vec<String>,
}

impl StepReport {
    /// Builds one step's report from what the run collected.
    pub(crate) fn build(c: Collected<'_>, window: &Window, env: &Env) -> StepReport {
        let pc = c.publishers;
        let mut s = StepReport {
            rate: c.rate,
            duration_s: window.duration_s,
            sent: pc.sent.load(Relaxed),
            unanswered: pc.unanswered(),
            write_failed: pc.write_failed.load(Relaxed),
            ok: pc.ok.load(Relaxed),
            rejected: pc.rejected.load(Relaxed),
            reconnects: pc.reconnects.load(Relaxed),
            conns_per_request: pc.conns_per_request.load(Relaxed),
            last_rejection: pc.last_rejection.lock().ok().and_then(|l| l.clone()),
            expected: pc.expected.load(Relaxed),
            counts: c.counts,
            measured_expected: pc.measured_expected.load(Relaxed),
            latency: Lat::of(c.hist),
            send_lag: Lat::of(c.lag),
            publish_overrun_s: c.publish_overrun_s,
            cost: Cost::of(c.samples, env),
            conn_errors: c.conns.errors(),
            warnings: Vec::new(),
        };
        s.warnings = s.warn(env);
        s
    }

    fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.counts.unique)
    }

    fn unexpected(&self) -> u64 {
        self.counts.unique.saturating_sub(self.expected)
    }

    /// Deliveries per second as they were scheduled: the measured ones
    /// over the window's length, however long the server took.
    fn scheduled_per_s(&self) -> f64 {
        self.counts.measured as f64 / self.duration_s.max(1e-9)
    }

    /// Deliveries per second achieved: those that arrived while the
    /// server's CPU was measured, over that time (the window and the drain).
    fn delivered_per_s(&self) -> f64 {
        self.cost_deliveries() as f64 / self.cost.wall_s.max(1e-9)
    }

    /// The deliveries the window's CPU paid for: every one that arrived in
    /// it, whenever scheduled (a warm-up backlog included; one due in the
    /// window but arriving after it not). Measured deliveries where the
    /// receive path counts no arrivals.
    fn cost_deliveries(&self) -> u64 {
        match self.counts.in_window {
            0 => self.counts.measured,
            n => n,
        }
    }

    /// Server process CPU seconds per million deliveries in its window.
    fn cpu_per_million(&self) -> Option<f64> {
        per_million(self.cost.server_cpu_s, self.cost_deliveries())
    }

    /// Server process plus its cpus' ksoftirqd, per million deliveries.
    fn cpu_softirqd_per_million(&self) -> Option<f64> {
        let s = self.cost.server_cpu_s? + self.cost.softirqd_s?;
        per_million(Some(s), self.cost_deliveries())
    }

    /// Busy time of the server's cpus per million deliveries.
    fn core_per_million(&self) -> Option<f64> {
        per_million(self.cost.core_busy_s, self.cost_deliveries())
    }

    /// Core busy less other processes' user time on the server's cpus, per
    /// million deliveries: the server's share when the machine is shared.
    fn core_own_per_million(&self) -> Option<f64> {
        let own = (self.cost.core_busy_s? - self.cost.foreign_user_s?).max(0.0);
        per_million(Some(own), self.cost_deliveries())
    }

    /// Client CPU (all its processes) per million deliveries.
    fn client_per_million(&self) -> Option<f64> {
        per_million(self.cost.client_cpu_s, self.cost_deliveries())
    }

    /// The client's subscriber side (receive path) per million deliveries.
    fn client_recv_per_million(&self) -> Option<f64> {
        per_million(self.cost.client_recv_cpu_s, self.cost_deliveries())
    }

    /// Client-side saturation: the numbers measure the client, not the server.
    fn client_saturated(&self) -> bool {
        self.cost
            .client_util
            .is_some_and(|u| u >= CLIENT_SATURATED_UTIL)
    }

    /// True if the step kept every promise: all delivered once, p99 within the limit,
    /// publishers on schedule.
    pub(crate) fn held(&self, p99_limit_ms: f64) -> bool {
        self.sent > 0
            && self.missing() == 0
            && self.counts.duplicates == 0
            && self.write_failed == 0
            && self.rejected == 0
            && self.unanswered == 0
            && self.latency.p99 <= p99_limit_ms
            && self.send_lag.p99 <= p99_limit_ms
    }

    fn warn(&self, env: &Env) -> Vec<String> {
        let mut w = Vec::new();
        if self.client_saturated() {
            w.push(format!(
                "CLIENT SATURATED: ringcast-load used {:.0}% of {} cores; latency and throughput \
                 measure the client, not the server",
                self.cost.client_util.unwrap_or(0.0) * 100.0,
                env.cores
            ));
        }
        if self.send_lag.p99 > SEND_LAG_WARN_MS {
            w.push(format!(
                "publishers fell behind schedule (send lag p99 {:.1} ms, max {:.1} ms): client CPU \
                 or server backpressure; latencies include that lag",
                self.send_lag.p99, self.send_lag.max
            ));
        }
        if self
            .cost
            .machine_busy
            .is_some_and(|b| b >= MACHINE_SATURATED_UTIL)
        {
            w.push(format!(
                "MACHINE CPU SATURATED ({:.0}% busy over all {} cpus): client and server compete for CPU",
                self.cost.machine_busy.unwrap_or(0.0) * 100.0,
                env.machine_cpus
            ));
        }
        if let Some(f) = self.cost.foreign_user_s {
            if f > FOREIGN_CORE_WARN * self.cost.wall_s {
                w.push(format!(
                    "other processes ran {f:.2}s of user code on the server's cpus: core busy \
                     overstates the server"
                ));
            }
        }
        if self.missing() > 0 {
            w.push(format!(
                "{} expected deliveries missing after the drain",
                self.missing()
            ));
        }
        if self.unexpected() > 0 {
            w.push(format!(
                "{} more unique deliveries than expected (subscriber set changed during the run?)",
                self.unexpected()
            ));
        }
        if self.rejected > 0 || self.write_failed > 0 || self.unanswered > 0 {
            w.push(format!(
                "publish errors: {} rejected ({}), {} not written, {} never answered \
                 (not counted as expected)",
                self.rejected,
                self.last_rejection.as_deref().unwrap_or("-"),
                self.write_failed,
                self.unanswered
            ));
        }
        if self.conn_errors > 0 {
            w.push(format!("{} subscriber connection errors", self.conn_errors));
        }
        if self.conns_per_request > 0 {
            w.push(format!(
                "the server closes every HTTP publish connection after one answer (Connection: close): \
                 {} publishes went on a TCP connection each (its connect and accept are in the costs)",
                self.conns_per_request
            ));
        }
        w
    }

    fn json(&self) -> Value {
        let c = &self.cost;
        let m = self.counts.measured;
        let mut v = json!({
            "rate_target": self.rate,
            "duration_s": self.duration_s,
            "published": self.sent,
            "publish_ok": self.ok,
            "publish_unanswered": self.unanswered,
            "publish_rejected": self.rejected,
            "publish_write_failed": self.write_failed,
            "publish_reconnects": self.reconnects,
            "publish_conns_per_request": self.conns_per_request,
            "expected": self.expected,
            "delivered": self.counts.unique,
            "missing": self.missing(),
            "unexpected": self.unexpected(),
            "duplicates": self.counts.duplicates,
            "out_of_order": self.counts.out_of_order,
            "out_of_order_beyond_window": self.counts.out_of_order_beyond_window,
            "misrouted": self.counts.misrouted,
            "stale": self.counts.stale,
            "malformed": self.counts.malformed,
            "measured_expected": self.measured_expected,
            "measured_delivered": m,
            "delivered_in_window": self.counts.in_window,
            "delivered_per_s": self.delivered_per_s(),
            "scheduled_delivered_per_s": self.scheduled_per_s(),
            "latency_ms": self.latency.json(),
            "send_lag_ms": self.send_lag.json(),
            "publish_overrun_s": self.publish_overrun_s,
            "connection_errors": self.conn_errors,
            "warnings": self.warnings,
        });
        let cost = json!({
            "window_s": c.wall_s,
            "server_cpu_s": c.server_cpu_s,
            "server_cpu_s_per_million_deliveries": self.cpu_per_million(),
            "server_ksoftirqd_cpu_s": c.softirqd_s,
            "server_cpu_with_ksoftirqd_s_per_million_deliveries": self.cpu_softirqd_per_million(),
            "server_core_busy_s": c.core_busy_s,
            "server_core_busy_s_per_million_deliveries": self.core_per_million(),
            "server_core_busy_less_foreign_user_s_per_million_deliveries": self.core_own_per_million(),
            "server_core_softirq_s": c.core_softirq_s,
            "server_core_foreign_user_s": c.foreign_user_s,
            "server_rss_bytes": c.server_rss,
            "server_syscalls": c.syscalls,
            "server_context_switches": c.context_switches,
            "server_syscalls_per_delivery": per_delivery(c.syscalls, self.cost_deliveries()),
            "server_context_switches_per_delivery": per_delivery(c.context_switches, self.cost_deliveries()),
            "perf_note": c.perf_note,
            "client_cpu_s": c.client_cpu_s,
            "client_cpu_s_per_million_deliveries": self.client_per_million(),
            "client_recv_cpu_s": c.client_recv_cpu_s,
            "client_recv_cpu_s_per_million_deliveries": self.client_recv_per_million(),
            "client_cpu_util": c.client_util,
            "client_saturated": self.client_saturated(),
            "machine_cpu_busy": c.machine_busy,
        });
        if let (Some(obj), Value::Object(cost)) = (v.as_object_mut(), cost) {
            obj.extend(cost);
        }
        v
    }
}

/// The run's stream figures: offsets accounted per (subscriber, topic), the
/// drops and reconnects, recovery latency and the storm.
pub(crate) struct Streams {
    stats: StreamStats,
    /// Owed offsets beyond every ledger's highest, at the end.
    missing_tail: u64,
    /// Whether publish replies gave the topics' last offsets (else the
    /// highest any subscriber saw stands in).
    last_from_replies: bool,
    churn: churn::Plan,
    window: Option<churn::Window>,
}

impl Streams {
    /// The figures of a run whose publishers saw `last_offsets` per topic.
    pub(crate) fn new(
        stats: StreamStats,
        last_offsets: &[u64],
        churn: churn::Plan,
        window: Option<churn::Window>,
    ) -> Streams {
        Streams {
            missing_tail: stats.tails.missing_tail(last_offsets),
            last_from_replies: last_offsets.iter().any(|&o| o > 0),
            stats,
            churn,
            window,
        }
    }

    /// Whether there is anything to report: stream topics, or drops.
    fn shown(&self) -> bool {
        self.churn.drops() || self.stats.counts.tracked > 0
    }

    /// Owed offsets never received.
    fn missing(&self) -> u64 {
        self.stats.counts.missing_in_gaps() + self.missing_tail
    }

    fn storm_ns(&self) -> Option<u64> {
        self.window.and_then(|w| w.storm_ns)
    }

    /// Seconds from the storm until its last reconnect reached `last_ns`,
    /// if every subscriber the storm dropped got there.
    fn storm_took_s(&self, reached: u64, last_ns: u64) -> Option<f64> {
        let storm = self.storm_ns()?;
        let dropped = self.stats.reconnects.storm_drops;
        (dropped > 0 && reached >= dropped).then(|| last_ns.saturating_sub(storm) as f64 / 1e9)
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.shown() {
            return w;
        }
        let c = &self.stats.counts;
        let r = &self.stats.reconnects;
        if c.duplicated > 0 || c.out_of_order > 0 {
            w.push(format!(
                "stream offsets: {} duplicated, {} out of order",
                c.duplicated, c.out_of_order
            ));
        }
        if self.churn.recover && self.missing() > 0 {
            w.push(format!(
                "stream offsets: {} missing despite --recover ({} in gaps, {} at the tail)",
                self.missing(),
                c.missing_in_gaps(),
                self.missing_tail
            ));
        }
        if self.churn.recover && c.recoveries_failed > 0 {
            w.push(format!(
                "{} recoveries answered recovered:false (history too short, or the epoch changed)",
                c.recoveries_failed
            ));
        }
        if c.untracked > 0 && (self.churn.drops() || c.tracked > 0) {
            w.push(format!(
                "{} subscribers' `subscribed` carried no offset (topics without history, or a server \
                 without streams): their offsets are not accounted{}",
                c.untracked,
                if self.churn.recover {
                    " and they re-subscribe without since"
                } else {
                    ""
                }
            ));
        }
        if c.epoch_changes > 0 {
            w.push(format!(
                "{} subscribes found their stream in another epoch: the old epoch's tail is not counted",
                c.epoch_changes
            ));
        }
        if r.unanswered > 0 {
            w.push(format!(
                "{} reconnects had no `subscribed` by the end of the drain",
                r.unanswered
            ));
        }
        if r.abandoned > 0 {
            w.push(format!(
                "{} subscribers gave up reconnecting (their later deliveries are missing)",
                r.abandoned
            ));
        }
        let rec = &self.stats.recovery;
        if self.storm_ns().is_some() && self.storm_took_s(rec.storm_caught_up, 0).is_none() {
            w.push(format!(
                "storm: only {} of {} dropped subscribers caught up",
                rec.storm_caught_up, r.storm_drops
            ));
        }
        w
    }

    fn json(&self) -> Value {
        if !self.shown() {
            return Value::Null;
        }
        let c = &self.stats.counts;
        let r = &self.stats.reconnects;
        let rec = &self.stats.recovery;
        json!({
            "tracked_subscribers": c.tracked,
            "untracked_subscribers": c.untracked,
            "last_offsets_from": if self.last_from_replies { "publish replies" } else { "subscribers" },
            "delivered": c.delivered,
            "recovered": c.recovered,
            "missing": self.missing(),
            "missing_in_gaps": c.missing_in_gaps(),
            "missing_at_tail": self.missing_tail,
            "duplicated": c.duplicated,
            "out_of_order": c.out_of_order,
            "last_value_replays": c.last_values,
            "not_owed": c.not_owed,
            "epoch_changes": c.epoch_changes,
            "reconnect": {
                "every_s": self.churn.mean_ns.map(|n| n as f64 / 1e9),
                "recover": self.churn.recover,
                "seed": self.churn.seed,
                "drops": r.drops,
                "reconnects": r.reconnects,
                "failed_attempts": r.failed_attempts,
                "abandoned": r.abandoned,
                "interrupted": r.interrupted,
                "unanswered_at_end": r.unanswered,
                "recoveries_ok": c.recoveries_ok,
                "recoveries_failed": c.recoveries_failed,
                "resubscribed_fresh": c.resubscribed_fresh,
            },
            "recovery_ms": {
                "subscribed": Lat::of(&rec.subscribed).json(),
                "caught_up": Lat::of(&rec.caught_up).json(),
            },
            "storm": self.storm_ns().map(|_| json!({
                "at_s": self.churn.storm_after_ns.map(|n| n as f64 / 1e9),
                "dropped": r.storm_drops,
                "subscribed": rec.storm_subscribed,
                "caught_up": rec.storm_caught_up,
                "all_subscribed_s": self.storm_took_s(rec.storm_subscribed, rec.storm_subscribed_last_ns),
                "all_recovered_s": self.storm_took_s(rec.storm_caught_up, rec.storm_caught_up_last_ns),
            })),
        })
    }

    fn offsets_line(&self, o: &mut String) {
        let c = &self.stats.counts;
        let _ = writeln!(
            o,
            "  streams    offsets of {} subscribers: {} delivered ({} recovered in replays), missing {} \
             ({} in gaps, {} at the tail), duplicated {}, out of order {}",
            c.tracked,
            c.delivered,
            c.recovered,
            self.missing(),
            c.missing_in_gaps(),
            self.missing_tail,
            c.duplicated,
            c.out_of_order
        );
    }

    fn table(&self, o: &mut String) {
        if !self.shown() {
            return;
        }
        let c = &self.stats.counts;
        let r = &self.stats.reconnects;
        let rec = &self.stats.recovery;
        if c.tracked == 0 {
            let _ = writeln!(
                o,
                "  streams    no subscriber got a stream position (no offsets in `subscribed`): offsets not accounted"
            );
        } else {
            self.offsets_line(o);
        }
        if !self.churn.drops() {
            return;
        }
        let every = self
            .churn
            .mean_ns
            .map_or("no random drops".to_string(), |n| {
                format!("drops every {:.2}s on average", n as f64 / 1e9)
            });
        let _ = writeln!(
            o,
            "  reconnect  {every} (seed {}), {}: {} drops, {} reconnects ({} failed attempts, {} given up, \
             {} dropped again before subscribed); recoveries {} ok, {} failed; {} fresh subscribes",
            self.churn.seed,
            if self.churn.recover { "with since" } else { "without since (no --recover)" },
            r.drops,
            r.reconnects,
            r.failed_attempts,
            r.abandoned,
            r.interrupted,
            c.recoveries_ok,
            c.recoveries_failed,
            c.resubscribed_fresh
        );
        let lat = |h: &Histogram<u64>| {
            let l = Lat::of(h);
            if l.count == 0 {
                "- (none)".to_string()
            } else {
                format!("{:.2}/{:.2}/{:.2} ms ({})", l.p50, l.p99, l.max, l.count)
            }
        };
        let _ = writeln!(
            o,
            "  recovery   p50/p99/max from the reconnect's TCP connect to subscribed {}; to the last replayed {}",
            lat(&rec.subscribed),
            lat(&rec.caught_up)
        );
        if let Some(at) = self.churn.storm_after_ns {
            let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}s"));
            let _ = writeln!(
                o,
                "  storm      at {:.2}s: {} dropped; {} subscribed again (all in {}), {} caught up (all in {})",
                at as f64 / 1e9,
                r.storm_drops,
                rec.storm_subscribed,
                secs(self.storm_took_s(rec.storm_subscribed, rec.storm_subscribed_last_ns)),
                rec.storm_caught_up,
                secs(self.storm_took_s(rec.storm_caught_up, rec.storm_caught_up_last_ns)),
            );
        }
    }
}

/// A whole run.
pub(crate) struct Run {
    pub(crate) scenario: Scenario,
    pub(crate) env: Env,
    pub(crate) conns: Conns,
    pub(crate) steps: Vec<StepReport>,
    pub(crate) streams: Streams,
    pub(crate) find_ceiling: bool,
    pub(crate) ceiling_p99_ms: f64,
}

impl Run {
    fn result_step(&self) -> Option<&StepReport> {
        if self.find_ceiling {
            self.steps
                .iter()
                .rev()
                .find(|s| s.held(self.ceiling_p99_ms))
                .or(self.steps.first())
        } else {
            self.steps.last()
        }
    }

    fn ceiling_rate(&self) -> Option<f64> {
        if !self.find_ceiling {
            return None;
        }
        self.steps
            .iter()
            .filter(|s| s.held(self.ceiling_p99_ms))
            .map(|s| s.rate)
            .fold(None, |m, r| Some(m.map_or(r, |m: f64| m.max(r))))
    }

    fn rss_per_conn(&self) -> Option<f64> {
        let (a, b) = (self.env.rss_baseline?, self.env.rss_connected?);
        if self.conns.ready == 0 {
            return None;
        }
        Some((b as f64 - a as f64) / self.conns.ready as f64)
    }

    /// The report as one JSON object: scenario, connections, the result step's
    /// fields at top level, and every step under `steps` when searching a ceiling.
    pub(crate) fn to_json(&self) -> Value {
        let s = &self.scenario;
        let c = &self.conns;
        let mut v = json!({
            "label": s.label,
            "scenario": {
                "sub_url": s.sub_url, "pub_url": s.pub_url, "publish_via": s.publish_via,
                "protocol": s.protocol,
                "subscribers": s.subscribers, "topics": s.topics, "dist": s.dist,
                "publishers": s.publishers, "payload_bytes": s.payload_bytes,
                "duration_s": s.duration_s, "warmup_s": s.warmup_s,
            },
            "client": {
                "cores": self.env.cores, "machine_cpus": self.env.machine_cpus,
                "threads": self.env.threads, "nofile": self.env.nofile,
                "recv_path": self.env.recv_path, "procs": self.env.procs,
                "recv_rearms": c.recv.rearms, "rings_not_deferred": c.recv.not_deferred,
                "recv_batch_us": c.recv.batch_us,
            },
            "connections": {
                "requested": c.requested, "ready": c.ready, "connect_failed": c.stats.connect_failed,
                "upgrade_refused": c.stats.upgrade_refused, "not_ready": c.stats.not_ready,
                "closed_by_server": c.stats.closed_by_server, "last_close_code": c.stats.last_close_code,
                "dropped": c.stats.dropped, "protocol_errors": c.stats.protocol_errors,
                "connect_s": c.connect_s, "first_error": c.stats.first_error,
            },
            "server_pids": self.env.server_pids,
            "server_cpus": self.env.server_cpus,
            "server_cpus_note": self.env.server_cpus_note,
            "server_rss_baseline_bytes": self.env.rss_baseline,
            "server_rss_connected_bytes": self.env.rss_connected,
            "server_rss_per_connection_bytes": self.rss_per_conn(),
            "ceiling_rate": self.ceiling_rate(),
            "ceiling_p99_ms": if self.find_ceiling { Some(self.ceiling_p99_ms) } else { None },
        });
        if let (Some(step), Some(obj)) = (self.result_step(), v.as_object_mut()) {
            if let Value::Object(fields) = step.json() {
                obj.extend(fields);
            }
        }
        if self.find_ceiling {
            v["steps"] = Value::Array(self.steps.iter().map(StepReport::json).collect());
        }
        v["streams"] = self.streams.json();
        let stream_warnings = self.streams.warnings();
        if let Some(w) = v["warnings"].as_array_mut() {
            w.extend(stream_warnings.into_iter().map(Value::from));
        }
        v
    }

    /// The CPU, kernel and memory lines of the table for one step.
    fn cost_lines(&self, st: &StepReport) -> String {
        let c = &st.cost;
        let mut o = String::new();
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}s"));
        match c.server_cpu_s {
            Some(cpu) => {
                let _ = writeln!(
                    o,
                    "  server     process cpu {} ({}/M deliveries), + ksoftirqd {} ({}/M); RSS {:.1} MiB",
                    f(Some(cpu)),
                    f(st.cpu_per_million()),
                    f(c.softirqd_s),
                    f(st.cpu_softirqd_per_million()),
                    c.server_rss.unwrap_or(0) as f64 / 1048576.0
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "  server     (no --server-pid: process CPU/RSS not measured)"
                );
            }
        }
        match (&self.env.server_cpus, c.core_busy_s) {
            (Some(cpus), Some(busy)) => {
                let _ = writeln!(
                    o,
                    "  server     cpus {cpus:?} busy {} ({}/M deliveries; softirq {}, other processes' user {}, \
                     {}/M without it)",
                    f(Some(busy)),
                    f(st.core_per_million()),
                    f(c.core_softirq_s),
                    f(c.foreign_user_s),
                    f(st.core_own_per_million())
                );
            }
            _ => {
                let why = self
                    .env
                    .server_cpus_note
                    .as_deref()
                    .unwrap_or("server cpus unknown");
                let _ = writeln!(o, "  server     core busy not measured: {why}");
            }
        }
        match (c.syscalls, c.context_switches) {
            (Some(sc), Some(cs)) => {
                let m = st.cost_deliveries();
                let _ = writeln!(
                    o,
                    "  server     {sc} syscalls ({:.4}/delivery), {cs} context switches ({:.4}/delivery)",
                    per_delivery(Some(sc), m).unwrap_or(0.0),
                    per_delivery(Some(cs), m).unwrap_or(0.0)
                );
            }
            _ => {
                let why = c.perf_note.as_deref().unwrap_or("perf skipped");
                let _ = writeln!(
                    o,
                    "  server     syscalls/context switches not counted: {why}"
                );
            }
        }
        let _ = writeln!(
            o,
            "  client     cpu {} ({}/M deliveries, of which receive {}/M; {:.0}% of its cpus); machine busy {:.0}%",
            f(c.client_cpu_s),
            f(st.client_per_million()),
            f(st.client_recv_per_million()),
            c.client_util.unwrap_or(0.0) * 100.0,
            c.machine_busy.unwrap_or(0.0) * 100.0
        );
        o
    }

    /// The report as a human-readable table.
    pub(crate) fn to_table(&self) -> String {
        let mut o = String::new();
        let s = &self.scenario;
        let c = &self.conns;
        let _ = writeln!(o, "ringcast-load {}", s.label);
        let _ = writeln!(
            o,
            "  subscribe  {}   publish {} ({})",
            s.sub_url, s.pub_url, s.publish_via
        );
        let _ = writeln!(
            o,
            "  scenario   {} subscribers over {} topics ({}), {} publisher(s), {} B payload, {:.1}s + {:.1}s warmup",
            s.subscribers, s.topics, s.dist, s.publishers, s.payload_bytes, s.duration_s, s.warmup_s
        );
        let _ = writeln!(
            o,
            "  client     {} of {} cpus, {} process(es) x {} thread(s), receive path {}{}, nofile {}",
            self.env.cores,
            self.env.machine_cpus,
            self.env.procs,
            self.env.threads,
            self.env.recv_path,
            if self.conns.recv.batch_us > 0 {
                format!(" (batch window {} us)", self.conns.recv.batch_us)
            } else {
                String::new()
            },
            self.env.nofile
        );
        let st = &c.stats;
        let _ = writeln!(
            o,
            "  connect    {} ready of {} in {:.2}s; errors: {} connect, {} refused, {} not acked, {} closed by server (last code {}), {} dropped, {} protocol",
            c.ready, c.requested, c.connect_s, st.connect_failed, st.upgrade_refused, st.not_ready,
            st.closed_by_server, st.last_close_code, st.dropped, st.protocol_errors
        );
        if let Some(e) = &st.first_error {
            let _ = writeln!(o, "  first error: {e}");
        }
        if let (Some(base), Some(conn)) = (self.env.rss_baseline, self.env.rss_connected) {
            let _ = writeln!(
                o,
                "  server RSS {:.1} MiB idle -> {:.1} MiB connected ({:.0} B per connection), pids {}",
                base as f64 / 1048576.0,
                conn as f64 / 1048576.0,
                self.rss_per_conn().unwrap_or(0.0),
                self.env.server_pids.join(",")
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  {:>10} {:>10} {:>12} {:>12} {:>8} {:>6} {:>6} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}",
            "rate", "published", "expected", "delivered", "missing", "dup", "ooo", "deliv/s",
            "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "srv cpu/M", "core/M", "cli cpu/M", "cli cpu"
        );
        let secs = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}s"));
        for st in &self.steps {
            let _ = writeln!(
                o,
                "  {:>10.0} {:>10} {:>12} {:>12} {:>8} {:>6} {:>6} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>9} {:>9} {:>6.0}%",
                st.rate,
                st.sent,
                st.expected,
                st.counts.unique,
                st.missing(),
                st.counts.duplicates,
                st.counts.out_of_order + st.counts.out_of_order_beyond_window,
                st.delivered_per_s(),
                st.latency.p50,
                st.latency.p90,
                st.latency.p99,
                st.latency.p999,
                st.latency.max,
                secs(st.cpu_per_million()),
                secs(st.core_per_million()),
                secs(st.client_per_million()),
                st.cost.client_util.unwrap_or(0.0) * 100.0
            );
        }
        if let Some(st) = self.result_step() {
            let _ = writeln!(
                o,
                "\n  send lag p50/p99/max {:.2}/{:.2}/{:.2} ms; publish ok {} rejected {} unwritten {}; misrouted {} stale {} malformed {}",
                st.send_lag.p50, st.send_lag.p99, st.send_lag.max, st.ok, st.rejected, st.write_failed,
                st.counts.misrouted, st.counts.stale, st.counts.malformed
            );
            let _ = writeln!(
                o,
                "  delivered {:.0}/s achieved ({} in the {:.2} s the server's CPU was measured; {:.0}/s as scheduled)",
                st.delivered_per_s(),
                st.cost_deliveries(),
                st.cost.wall_s,
                st.scheduled_per_s()
            );
            o.push_str(&self.cost_lines(st));
        }
        self.streams.table(&mut o);
        if let Some(r) = self.ceiling_rate() {
            let _ = writeln!(
                o,
                "  CEILING: highest rate held (no loss, p99 <= {} ms): {r:.0} msgs/s",
                self.ceiling_p99_ms
            );
        } else if self.find_ceiling {
            let _ = writeln!(o, "  CEILING: no step held (even the first rate failed)");
        }
        let mut warned = false;
        for st in &self.steps {
            for w in &st.warnings {
                if !warned {
                    let _ = writeln!(o);
                    warned = true;
                }
                let _ = writeln!(o, "  WARNING [{:.0}/s]: {w}", st.rate);
            }
        }
        for w in self.streams.warnings() {
            if !warned {
                let _ = writeln!(o);
                warned = true;
            }
            let _ = writeln!(o, "  WARNING [streams]: {w}");
        }
        if !warned && self.conns.stats.errors() == 0 {
            let _ = writeln!(o, "\n  OK: client not saturated, no loss, no duplicates");
        }
        o
    }
}
