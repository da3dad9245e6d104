//! Reads process, per-cpu and machine CPU and memory from /proc, cpu
//! affinities, and raises RLIMIT_NOFILE. Linux only; every reader returns
//! `None` rather than failing the run when /proc is not what it expects.

use std::fs;

/// Clock ticks per second of /proc's CPU times (USER_HZ).
pub(crate) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields after the `(comm)` of /proc/PID/stat, so field 3 (state) is index 0.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds of one process (all its threads, live and exited).
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    cpu_times(pid).map(|(u, s)| u + s)
}

/// CPU seconds of the live threads of `pid` whose name starts with `prefix`.
pub(crate) fn threads_cpu_seconds(pid: &str, prefix: &str) -> Option<f64> {
    let mut sum = 0.0;
    for e in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let tid = e.file_name().to_string_lossy().into_owned();
        let comm = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            sum += cpu_seconds(&format!("{pid}/task/{tid}")).unwrap_or(0.0);
        }
    }
    Some(sum)
}

/// (user, system) CPU seconds of one process. The kernel scales both so that
/// they sum to the scheduler's exact runtime; only the split is sampled.
pub(crate) fn cpu_times(pid: &str) -> Option<(f64, f64)> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
    let u = f.get(11)?.parse::<u64>().ok()? as f64;
    let s = f.get(12)?.parse::<u64>().ok()? as f64;
    Some((u / clk_tck(), s / clk_tck()))
}

/// Counters of one or more cpus from /proc/stat, in ticks.
///
/// Busy time is taken as elapsed time less idle and iowait, never as the sum
/// of the busy fields: on a tickless kernel idle and iowait come from the
/// exact idle-entry clock, while user/system/softirq are sampled at the
/// timer tick. A server woken by a client whose timer fires with that tick
/// is idle at nearly every tick: in s2 the busy fields showed 10 ticks of
/// cpu 0 while the server process alone ran 99. (An io_uring wait counts as
/// iowait, so iowait is idle here.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpuTicks {
    /// idle + iowait.
    pub(crate) idle: u64,
    /// user + nice (tick-sampled).
    pub(crate) user: u64,
    /// softirq, including what the kernel ran outside any process (tick-sampled).
    pub(crate) softirq: u64,
    /// How many cpus were summed.
    pub(crate) cpus: u64,
}

impl CpuTicks {
    fn parse(fields: &[u64]) -> Option<CpuTicks> {
        // user nice system idle iowait irq softirq steal (guest is inside user).
        Some(CpuTicks {
            idle: fields.get(3)? + fields.get(4).unwrap_or(&0),
            user: fields.first()? + fields.get(1)?,
            softirq: *fields.get(6).unwrap_or(&0),
            cpus: 1,
        })
    }

    /// Counters accumulated from `earlier` to `self`.
    pub(crate) fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            idle: self.idle.saturating_sub(earlier.idle),
            user: self.user.saturating_sub(earlier.user),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            cpus: self.cpus,
        }
    }

    /// Busy seconds of these cpus over a window of `wall_s` seconds (for a
    /// `since` delta).
    pub(crate) fn busy_s(&self, wall_s: f64) -> f64 {
        (wall_s * self.cpus as f64 - self.idle as f64 / clk_tck()).max(0.0)
    }

    fn add(&mut self, o: &CpuTicks) {
        self.idle += o.idle;
        self.user += o.user;
        self.softirq += o.softirq;
        self.cpus += o.cpus;
    }
}

/// The summed /proc/stat counters of `cpus`; `None` if one is missing.
pub(crate) fn cpus_ticks(cpus: &[usize]) -> Option<CpuTicks> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let mut sum = CpuTicks::default();
    let mut found = 0;
    for line in s.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(Ok(n)) = words.next().map(str::parse::<usize>) else {
            continue;
        };
        if cpus.contains(&n) {
            let v: Vec<u64> = words.filter_map(|x| x.parse().ok()).collect();
            sum.add(&CpuTicks::parse(&v)?);
            found += 1;
        }
    }
    (found == cpus.len()).then_some(sum)
}

/// The cpus process (or thread) `pid` may run on; 0 = this process.
pub(crate) fn affinity(pid: u32) -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe {
        libc::sched_getaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &mut set)
    };
    if rc != 0 {
        return None;
    }
    let max = 8 * std::mem::size_of_val(&set);
    // SAFETY: CPU_ISSET only reads `set` at indices below its size in bits.
    Some(
        (0..max)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect(),
    )
}

/// Pids of the `ksoftirqd/N` kernel threads of `cpus`: where the kernel
/// defers softirq work (loopback TCP receive, for one) that it could not
/// finish in the context that raised it.
pub(crate) fn ksoftirqd(cpus: &[usize]) -> Vec<String> {
    let names: Vec<String> = cpus.iter().map(|c| format!("ksoftirqd/{c}")).collect();
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
                if names.iter().any(|n| n == comm.trim()) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Resident set size of one process in bytes (VmRSS).
pub(crate) fn rss_bytes(pid: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The given pids plus their direct children (nginx workers under the master).
pub(crate) fn with_children(pids: &[u32]) -> Vec<String> {
    let mut out: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) || out.contains(&name) {
                continue;
            }
            if let Some(f) = stat_fields(&name) {
                if let Some(ppid) = f.get(1).and_then(|p| p.parse::<u32>().ok()) {
                    if pids.contains(&ppid) {
                        out.push(name);
                    }
                }
            }
        }
    }
    out
}

/// Summed CPU seconds and RSS of a set of processes; `None` if any is gone.
pub(crate) fn sample(pids: &[String]) -> Option<(f64, u64)> {
    let mut cpu = 0.0;
    let mut rss = 0;
    for p in pids {
        cpu += cpu_seconds(p)?;
        rss += rss_bytes(p)?;
    }
    Some((cpu, rss))
}

/// Machine-wide counters from the first line of /proc/stat (all cpus).
pub(crate) fn machine_ticks() -> Option<CpuTicks> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let mut t = CpuTicks::parse(&v)?;
    t.cpus = online_cpus() as u64;
    Some(t)
}

/// Online cpus of the machine (not limited by this process's affinity).
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// Raises the soft (and if needed and permitted, hard) open-file limit to at
/// least `want`; returns the resulting soft limit.
pub(crate) fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 0;
    }
    if r.rlim_cur >= want {
        return r.rlim_cur;
    }
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(r.rlim_max);
    let target = want.min(nr_open.max(r.rlim_max));
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: r.rlim_max.max(target),
    };
    // SAFETY: `raised` is a valid rlimit struct; failure is reported by the return value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return target;
    }
    let soft_only = libc::rlimit {
        rlim_cur: r.rlim_max.min(want),
        rlim_max: r.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft_only) } == 0 {
        return soft_only.rlim_cur;
    }
    r.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_rss() {
        let me = std::process::id().to_string();
        assert!(cpu_seconds(&me).is_some());
        assert!(rss_bytes(&me).unwrap() > 0);
        let m = machine_ticks().unwrap();
        assert!(m.cpus >= 1 && m.user + m.idle > 0);
    }

    #[test]
    fn cpu_zero_has_ticks_and_a_ksoftirqd() {
        let t = cpus_ticks(&[0]).unwrap();
        assert_eq!(t.cpus, 1);
        let later = CpuTicks {
            idle: t.idle + 50,
            ..t
        };
        // Half a second idle in one second of one cpu: half a second busy.
        let busy = later.since(&t).busy_s(1.0);
        assert!((busy - 1.0 + 50.0 / clk_tck()).abs() < 1e-9);
        assert!(cpus_ticks(&[usize::MAX]).is_none());
        assert!(affinity(0).unwrap().contains(&0) || !affinity(0).unwrap().is_empty());
        assert_eq!(ksoftirqd(&[0]).len(), 1);
    }
}
