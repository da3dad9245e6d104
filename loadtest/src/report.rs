//! Turns counters, histograms and /proc samples into the report: a human table
//! or one JSON object. Also decides whether a run is trustworthy (client
//! saturated, publishers behind schedule, machine CPU exhausted) and says so.

use crate::account::DeliveryCounts;
use crate::clock::now_ns;
use crate::procstat;
use crate::publish::PubCounters;
use crate::sub::Shared;
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

/// What was run.
pub(crate) struct Scenario {
    pub(crate) label: String,
    pub(crate) sub_url: String,
    pub(crate) pub_url: String,
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
}

/// Measurement window length.
pub(crate) struct Window {
    pub(crate) duration_s: f64,
}

/// Subscriber connection outcome.
pub(crate) struct Conns {
    requested: usize,
    ready: u64,
    connect_failed: u64,
    upgrade_refused: u64,
    not_ready: u64,
    closed_by_server: u64,
    dropped: u64,
    protocol_errors: u64,
    last_close_code: u32,
    connect_s: f64,
    first_error: Option<String>,
}

impl Conns {
    /// Reads the shared connection counters.
    pub(crate) fn read(sh: &Shared, requested: usize, ready: u64, connect_s: f64) -> Conns {
        let c = &sh.conn;
        Conns {
            requested,
            ready,
            connect_failed: c.connect_failed.load(Relaxed),
            upgrade_refused: c.upgrade_refused.load(Relaxed),
            not_ready: c.not_ready.load(Relaxed),
            closed_by_server: c.closed_by_server.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            protocol_errors: c.protocol_errors.load(Relaxed),
            last_close_code: c.last_close_code.load(Relaxed),
            connect_s,
            first_error: sh.first_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn errors(&self) -> u64 {
        self.connect_failed
            + self.upgrade_refused
            + self.not_ready
            + self.closed_by_server
            + self.dropped
            + self.protocol_errors
    }
}

#[derive(Clone, Copy, Default)]
struct Point {
    t_ns: u64,
    server: Option<(f64, u64)>,
    client_cpu: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl Point {
    fn now(procs: &[String]) -> Point {
        Point {
            t_ns: now_ns(),
            server: if procs.is_empty() {
                None
            } else {
                procstat::sample(procs)
            },
            client_cpu: procstat::cpu_seconds("self"),
            machine: procstat::machine_jiffies(),
        }
    }
}

/// CPU and memory samples at the start and end of a measurement window.
#[derive(Default)]
pub(crate) struct Samples {
    start: Point,
    stop: Point,
}

impl Samples {
    /// Samples at measurement start.
    pub(crate) fn start(&mut self, procs: &[String]) {
        self.start = Point::now(procs);
    }
    /// Samples at the end of the drain.
    pub(crate) fn stop(&mut self, procs: &[String]) {
        self.stop = Point::now(procs);
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
    last_rejection: Option<String>,
    expected: u64,
    counts: DeliveryCounts,
    measured_expected: u64,
    latency: Lat,
    send_lag: Lat,
    publish_overrun_s: f64,
    server_cpu_s: Option<f64>,
    server_rss: Option<u64>,
    client_cpu_s: Option<f64>,
    client_util: Option<f64>,
    machine_busy: Option<f64>,
    conn_errors: u64,
    warnings: Vec<String>,
}

impl StepReport {
    /// Builds one step's report from what the run collected.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        rate: f64,
        window: &Window,
        pc: &PubCounters,
        sh: &Shared,
        counts: DeliveryCounts,
        hist: &Histogram<u64>,
        lag: &Histogram<u64>,
        samples: &Samples,
        env: &Env,
        publish_overrun_s: f64,
    ) -> StepReport {
        let (a, b) = (&samples.start, &samples.stop);
        let wall_s = (b.t_ns.saturating_sub(a.t_ns)) as f64 / 1e9;
        let server_cpu_s = match (a.server, b.server) {
            (Some(x), Some(y)) => Some((y.0 - x.0).max(0.0)),
            _ => None,
        };
        let client_cpu_s = match (a.client_cpu, b.client_cpu) {
            (Some(x), Some(y)) => Some((y - x).max(0.0)),
            _ => None,
        };
        let client_util = client_cpu_s.map(|c| c / (wall_s.max(1e-9) * env.cores as f64));
        let machine_busy = match (a.machine, b.machine) {
            (Some(x), Some(y)) if y.1 > x.1 => Some((y.0 - x.0) as f64 / (y.1 - x.1) as f64),
            _ => None,
        };
        let c = &sh.conn;
        let conn_errors = c.connect_failed.load(Relaxed)
            + c.upgrade_refused.load(Relaxed)
            + c.not_ready.load(Relaxed)
            + c.closed_by_server.load(Relaxed)
            + c.dropped.load(Relaxed)
            + c.protocol_errors.load(Relaxed);
        let mut s = StepReport {
            rate,
            duration_s: window.duration_s,
            sent: pc.sent.load(Relaxed),
            unanswered: pc.unanswered(),
            write_failed: pc.write_failed.load(Relaxed),
            ok: pc.ok.load(Relaxed),
            rejected: pc.rejected.load(Relaxed),
            reconnects: pc.reconnects.load(Relaxed),
            last_rejection: pc.last_rejection.lock().ok().and_then(|l| l.clone()),
            expected: pc.expected.load(Relaxed),
            counts,
            measured_expected: pc.measured_expected.load(Relaxed),
            latency: Lat::of(hist),
            send_lag: Lat::of(lag),
            publish_overrun_s,
            server_cpu_s,
            server_rss: b.server.map(|s| s.1),
            client_cpu_s,
            client_util,
            machine_busy,
            conn_errors,
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

    fn delivered_per_s(&self) -> f64 {
        self.counts.measured as f64 / self.duration_s.max(1e-9)
    }

    fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.server_cpu_s?;
        if self.counts.measured == 0 {
            return None;
        }
        Some(cpu / self.counts.measured as f64 * 1e6)
    }

    /// Client-side saturation: the numbers measure the client, not the server.
    fn client_saturated(&self) -> bool {
        self.client_util.is_some_and(|u| u >= CLIENT_SATURATED_UTIL)
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
                self.client_util.unwrap_or(0.0) * 100.0,
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
            .machine_busy
            .is_some_and(|b| b >= MACHINE_SATURATED_UTIL)
        {
            w.push(format!(
                "MACHINE CPU SATURATED ({:.0}% busy over all {} cpus): client and server compete for CPU",
                self.machine_busy.unwrap_or(0.0) * 100.0,
                env.machine_cpus
            ));
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
        w
    }

    fn json(&self) -> Value {
        json!({
            "rate_target": self.rate,
            "duration_s": self.duration_s,
            "published": self.sent,
            "publish_ok": self.ok,
            "publish_unanswered": self.unanswered,
            "publish_rejected": self.rejected,
            "publish_write_failed": self.write_failed,
            "publish_reconnects": self.reconnects,
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
            "measured_delivered": self.counts.measured,
            "delivered_per_s": self.delivered_per_s(),
            "latency_ms": self.latency.json(),
            "send_lag_ms": self.send_lag.json(),
            "publish_overrun_s": self.publish_overrun_s,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_s_per_million_deliveries": self.cpu_per_million(),
            "server_rss_bytes": self.server_rss,
            "client_cpu_s": self.client_cpu_s,
            "client_cpu_util": self.client_util,
            "client_saturated": self.client_saturated(),
            "machine_cpu_busy": self.machine_busy,
            "connection_errors": self.conn_errors,
            "warnings": self.warnings,
        })
    }
}

/// A whole run.
pub(crate) struct Run {
    pub(crate) scenario: Scenario,
    pub(crate) env: Env,
    pub(crate) conns: Conns,
    pub(crate) steps: Vec<StepReport>,
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
                "subscribers": s.subscribers, "topics": s.topics, "dist": s.dist,
                "publishers": s.publishers, "payload_bytes": s.payload_bytes,
                "duration_s": s.duration_s, "warmup_s": s.warmup_s,
            },
            "client": {"cores": self.env.cores, "machine_cpus": self.env.machine_cpus, "threads": self.env.threads, "nofile": self.env.nofile},
            "connections": {
                "requested": c.requested, "ready": c.ready, "connect_failed": c.connect_failed,
                "upgrade_refused": c.upgrade_refused, "not_ready": c.not_ready,
                "closed_by_server": c.closed_by_server, "last_close_code": c.last_close_code,
                "dropped": c.dropped, "protocol_errors": c.protocol_errors,
                "connect_s": c.connect_s, "first_error": c.first_error,
            },
            "server_pids": self.env.server_pids,
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
        v
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
            "  client     {} of {} cpus, {} worker threads, nofile {}",
            self.env.cores, self.env.machine_cpus, self.env.threads, self.env.nofile
        );
        let _ = writeln!(
            o,
            "  connect    {} ready of {} in {:.2}s; errors: {} connect, {} refused, {} not acked, {} closed by server (last code {}), {} dropped, {} protocol",
            c.ready, c.requested, c.connect_s, c.connect_failed, c.upgrade_refused, c.not_ready,
            c.closed_by_server, c.last_close_code, c.dropped, c.protocol_errors
        );
        if let Some(e) = &c.first_error {
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
            "  {:>10} {:>10} {:>12} {:>12} {:>8} {:>6} {:>6} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}",
            "rate", "published", "expected", "delivered", "missing", "dup", "ooo", "deliv/s",
            "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "srv cpu/M", "cli cpu"
        );
        for st in &self.steps {
            let _ = writeln!(
                o,
                "  {:>10.0} {:>10} {:>12} {:>12} {:>8} {:>6} {:>6} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>6.0}%",
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
                st.cpu_per_million().map_or("-".into(), |v| format!("{v:.2}s")),
                st.client_util.unwrap_or(0.0) * 100.0
            );
        }
        if let Some(st) = self.result_step() {
            let _ = writeln!(
                o,
                "\n  send lag p50/p99/max {:.2}/{:.2}/{:.2} ms; publish ok {} rejected {} unwritten {}; misrouted {} stale {} malformed {}",
                st.send_lag.p50, st.send_lag.p99, st.send_lag.max, st.ok, st.rejected, st.write_failed,
                st.counts.misrouted, st.counts.stale, st.counts.malformed
            );
            if let Some(cpu) = st.server_cpu_s {
                let _ = writeln!(
                    o,
                    "  server cpu {:.2}s in window, RSS {:.1} MiB; machine busy {:.0}%",
                    cpu,
                    st.server_rss.unwrap_or(0) as f64 / 1048576.0,
                    st.machine_busy.unwrap_or(0.0) * 100.0
                );
            } else {
                let _ = writeln!(
                    o,
                    "  (no --server-pid: server CPU/RSS not measured); machine busy {:.0}%",
                    st.machine_busy.unwrap_or(0.0) * 100.0
                );
            }
        }
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
        if !warned && self.conns.errors() == 0 {
            let _ = writeln!(o, "\n  OK: client not saturated, no loss, no duplicates");
        }
        o
    }
}
