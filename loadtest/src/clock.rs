//! The one clock: CLOCK_MONOTONIC in nanoseconds. It is system-wide, not
//! per process, so a publisher in the parent process stamps schedule times
//! that subscriber processes (`--procs`) subtract from their receipt times:
//! latency is a subtraction within one clock even across processes.

/// Nanoseconds on CLOCK_MONOTONIC (system-wide, the same in every process).
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists
    // on Linux, so the call cannot fail (and `ts` stays zero if it did).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until the clock reads `t_ns` (returns at once if past).
pub(crate) fn sleep_until(t_ns: u64) {
    let now = now_ns();
    if t_ns > now {
        std::thread::sleep(std::time::Duration::from_nanos(t_ns - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic_and_counts_nanoseconds() {
        let a = now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = now_ns();
        assert!(b - a >= 2_000_000, "{a} -> {b}");
    }
}
