//! What the run measures outside its own counters, at the edges of each
//! measured window: the server's process CPU and RSS, the `ksoftirqd`
//! threads of the server's cpus, those cpus' busy time from /proc/stat, the
//! server's syscalls and context switches (`perf.rs`), and the client's own
//! CPU over all its processes, with its subscriber side (receive) apart from
//! its publishers. Loopback delivery work that the kernel defers
//! to `ksoftirqd` runs under another pid than the server's, so a server that
//! batches ~1,000 sends per `io_uring_enter` looks cheaper by its process
//! time alone; the core's busy time charges it for all the work it causes.

use crate::clock::now_ns;
use crate::perf::{self, PerfCounts, PerfStat};
use crate::procstat::{self, CpuTicks};
use crate::sub::THREAD_PREFIX;

/// The server as seen from outside, fixed for the run.
pub(crate) struct ServerProbe {
    /// Server pids, with their direct children.
    pub(crate) pids: Vec<String>,
    /// The server's cpus, when they are known and apart from the client's.
    pub(crate) cpus: Option<Vec<usize>>,
    /// `ksoftirqd/N` of those cpus.
    softirqd: Vec<String>,
    /// Why perf counts are skipped, if they are.
    perf_skipped: Option<String>,
    /// Why core busy time is not measured, if it is not.
    pub(crate) cpus_note: Option<String>,
}

impl ServerProbe {
    /// Finds the server's processes and cpus; `server_cpus` overrides the
    /// affinity read from the server.
    pub(crate) fn new(server_pids: &[u32], server_cpus: Option<Vec<usize>>, perf: bool) -> Self {
        let pids = procstat::with_children(server_pids);
        let mine = procstat::affinity(0).unwrap_or_default();
        let online = procstat::online_cpus();
        let (cpus, cpus_note) = match server_cpus {
            Some(c) => (Some(c), None),
            None if pids.is_empty() => (None, None),
            None => {
                let mut c: Vec<usize> = server_pids
                    .iter()
                    .filter_map(|&p| procstat::affinity(p))
                    .flatten()
                    .collect();
                c.sort_unstable();
                c.dedup();
                if c.is_empty() || c.len() >= online || c.iter().any(|x| mine.contains(x)) {
                    (
                        None,
                        Some(
                            "server not pinned apart from this client (taskset): core busy \
                             not measured; pin both or give --server-cpus"
                                .to_string(),
                        ),
                    )
                } else {
                    (Some(c), None)
                }
            }
        };
        let softirqd = cpus.as_deref().map(procstat::ksoftirqd).unwrap_or_default();
        let perf_skipped = if pids.is_empty() {
            Some("no --server-pid".to_string())
        } else if !perf {
            Some("--no-perf".to_string())
        } else {
            perf::check().err()
        };
        ServerProbe {
            pids,
            cpus,
            softirqd,
            perf_skipped,
            cpus_note,
        }
    }

    /// The server's summed RSS now.
    pub(crate) fn rss(&self) -> Option<u64> {
        procstat::sample(&self.pids).map(|s| s.1)
    }

    /// Prepares one window: attaches perf (counters off) ahead of time.
    pub(crate) fn begin(&self) -> Window<'_> {
        let (perf, perf_note) = match &self.perf_skipped {
            Some(why) => (None, Some(format!("perf skipped: {why}"))),
            None => match PerfStat::attach(&self.pids) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(format!("perf skipped: {e:#}"))),
            },
        };
        Window {
            probe: self,
            perf,
            perf_note,
            start: Point::default(),
        }
    }

    fn point(&self, client_pids: &[String]) -> Point {
        let client_cpu = std::iter::once("self")
            .chain(client_pids.iter().map(String::as_str))
            .map(procstat::cpu_seconds)
            .sum();
        // Children hold only subscribers; here only the `sub-` threads do.
        let client_recv_cpu =
            procstat::threads_cpu_seconds("self", THREAD_PREFIX).and_then(|own| {
                client_pids
                    .iter()
                    .map(|p| procstat::cpu_seconds(p))
                    .sum::<Option<f64>>()
                    .map(|kids| own + kids)
            });
        Point {
            t_ns: now_ns(),
            server: if self.pids.is_empty() {
                None
            } else {
                procstat::sample(&self.pids)
            },
            server_user: self
                .pids
                .iter()
                .map(|p| procstat::cpu_times(p).map(|t| t.0))
                .sum(),
            softirqd: if self.softirqd.is_empty() {
                None
            } else {
                self.softirqd.iter().map(|p| procstat::cpu_seconds(p)).sum()
            },
            cores: self.cpus.as_deref().and_then(procstat::cpus_ticks),
            client_cpu,
            client_recv_cpu,
            machine: procstat::machine_ticks(),
        }
    }
}

/// A measured window in progress.
pub(crate) struct Window<'a> {
    probe: &'a ServerProbe,
    perf: Option<PerfStat>,
    perf_note: Option<String>,
    start: Point,
}

impl Window<'_> {
    /// Samples the window's start and starts perf counting.
    pub(crate) fn start(&mut self, client_pids: &[String]) {
        if let Some(p) = self.perf.as_mut() {
            if let Err(e) = p.enable() {
                self.perf_note = Some(format!("perf skipped: {e:#}"));
                self.perf = None;
            }
        }
        self.start = self.probe.point(client_pids);
    }

    /// Samples the window's end and collects perf's counts.
    pub(crate) fn stop(self, client_pids: &[String]) -> Samples {
        let stop = self.probe.point(client_pids);
        let mut perf_note = self.perf_note;
        let perf = self.perf.and_then(|p| match p.finish() {
            Ok(c) => Some(c),
            Err(e) => {
                perf_note = Some(format!("perf failed: {e:#}"));
                None
            }
        });
        Samples {
            start: self.start,
            stop,
            perf,
            perf_note,
        }
    }
}

/// Counters read at one instant.
#[derive(Clone, Default)]
struct Point {
    t_ns: u64,
    /// Server (CPU seconds, RSS bytes).
    server: Option<(f64, u64)>,
    /// Server user-mode CPU seconds.
    server_user: Option<f64>,
    /// CPU seconds of the server cpus' ksoftirqd threads.
    softirqd: Option<f64>,
    /// The server cpus' /proc/stat ticks.
    cores: Option<CpuTicks>,
    /// CPU seconds of this process and its subscriber children.
    client_cpu: Option<f64>,
    /// CPU seconds of the subscriber side: this process's `sub-` threads and
    /// the children.
    client_recv_cpu: Option<f64>,
    /// Machine-wide ticks.
    machine: Option<CpuTicks>,
}

/// The counters at both edges of a window, and perf's counts.
pub(crate) struct Samples {
    start: Point,
    stop: Point,
    /// Server syscalls and context switches in the window.
    pub(crate) perf: Option<PerfCounts>,
    /// Why `perf` is missing.
    pub(crate) perf_note: Option<String>,
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some((b? - a?).max(0.0))
}

impl Samples {
    /// Window length, seconds.
    pub(crate) fn wall_s(&self) -> f64 {
        self.stop.t_ns.saturating_sub(self.start.t_ns) as f64 / 1e9
    }

    /// Server process CPU seconds.
    pub(crate) fn server_cpu_s(&self) -> Option<f64> {
        delta(
            self.start.server.map(|s| s.0),
            self.stop.server.map(|s| s.0),
        )
    }

    /// Server RSS at the end.
    pub(crate) fn server_rss(&self) -> Option<u64> {
        self.stop.server.map(|s| s.1)
    }

    /// CPU seconds of the server cpus' ksoftirqd threads.
    pub(crate) fn softirqd_s(&self) -> Option<f64> {
        delta(self.start.softirqd, self.stop.softirqd)
    }

    fn cores(&self) -> Option<CpuTicks> {
        Some(self.stop.cores?.since(&self.start.cores?))
    }

    /// Busy seconds of the server's cpus (everything that ran there).
    pub(crate) fn core_busy_s(&self) -> Option<f64> {
        self.cores().map(|c| c.busy_s(self.wall_s()))
    }

    /// Softirq seconds of the server's cpus, in any context.
    pub(crate) fn core_softirq_s(&self) -> Option<f64> {
        self.cores().map(|c| c.softirq as f64 / procstat::clk_tck())
    }

    /// User-mode seconds on the server's cpus not spent by the server: other
    /// processes that shared its cpus (and inflate `core_busy_s`).
    pub(crate) fn foreign_user_s(&self) -> Option<f64> {
        let core_user = self.cores()?.user as f64 / procstat::clk_tck();
        let server_user = delta(self.start.server_user, self.stop.server_user)?;
        Some((core_user - server_user).max(0.0))
    }

    /// CPU seconds of the client (this process and its children).
    pub(crate) fn client_cpu_s(&self) -> Option<f64> {
        delta(self.start.client_cpu, self.stop.client_cpu)
    }

    /// CPU seconds of the client's subscriber side (handshakes and receive).
    pub(crate) fn client_recv_cpu_s(&self) -> Option<f64> {
        delta(self.start.client_recv_cpu, self.stop.client_recv_cpu)
    }

    /// Machine busy share.
    pub(crate) fn machine_busy(&self) -> Option<f64> {
        let d = self.stop.machine?.since(&self.start.machine?);
        let capacity = self.wall_s() * d.cpus as f64;
        (capacity > 0.0).then(|| d.busy_s(self.wall_s()) / capacity)
    }
}
