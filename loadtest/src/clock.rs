//! The one process clock: nanoseconds since the first call, on the monotonic
//! clock (`Instant` is CLOCK_MONOTONIC on Linux). Publishers stamp schedule
//! times with it and subscribers read receipt times from it, so latency is a
//! subtraction within one clock.

use std::sync::OnceLock;
use std::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the process clock started.
pub(crate) fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// Sleeps until the process clock reads `t_ns` (returns at once if past).
pub(crate) fn sleep_until(t_ns: u64) {
    let now = now_ns();
    if t_ns > now {
        std::thread::sleep(std::time::Duration::from_nanos(t_ns - now));
    }
}
