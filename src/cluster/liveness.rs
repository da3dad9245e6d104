//! Whether Redis answers, not merely whether its socket is open: a stopped
//! Redis (SIGSTOP, a full disk, a network partition that keeps the TCP
//! connection) leaves the socket open and answers nothing.
//!
//! Plain data with time as an argument: the broker sends a PING whenever
//! `ping_due` says so and reports the answer; Redis counts as alive while a
//! PING was answered within the last `timeout`.

use std::time::{Duration, Instant};

/// What became of a PING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pong {
    /// Redis answered.
    Answered,
    /// The client gave up waiting: Redis is slow or stopped; its age says.
    TimedOut,
    /// The connection failed: Redis is gone now.
    Failed,
}

/// The node's PINGs to Redis and their answers.
#[derive(Debug)]
pub(super) struct Liveness {
    timeout: Duration,
    /// When Redis last answered a PING.
    answered: Option<Instant>,
    /// A PING is on its way (sent at this time).
    pending: Option<Instant>,
}

impl Liveness {
    /// Redis is alive while it answered a PING within `timeout`.
    pub(super) fn new(timeout: Duration) -> Liveness {
        debug_assert!(!timeout.is_zero(), "a zero timeout would never be alive");
        Liveness {
            timeout,
            answered: None,
            pending: None,
        }
    }

    /// Whether to send a PING now (one at a time); if so it counts as sent.
    pub(super) fn ping_due(&mut self, now: Instant) -> bool {
        if self.pending.is_some() {
            return false;
        }
        self.pending = Some(now);
        true
    }

    /// What became of the PING sent last: a broken connection counts as
    /// dead at once; a timeout leaves it to the last answer's age.
    pub(super) fn answer(&mut self, now: Instant, pong: Pong) {
        debug_assert!(self.pending.is_some(), "an answer to no PING");
        self.pending = None;
        match pong {
            Pong::Answered => self.answered = Some(now),
            Pong::TimedOut => {}
            Pong::Failed => self.answered = None,
        }
    }

    /// Whether Redis answered within the timeout.
    pub(super) fn alive(&self, now: Instant) -> bool {
        self.answered
            .is_some_and(|at| now.saturating_duration_since(at) <= self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_that_stops_answering_is_dead_after_the_timeout() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut redis = Liveness::new(Duration::from_secs(3));
        assert!(!redis.alive(at(0)), "nothing answered yet");
        assert!(redis.ping_due(at(0)));
        assert!(!redis.ping_due(at(100)), "one PING at a time");
        redis.answer(at(1), Pong::Answered);
        assert!(redis.alive(at(1)));
        // Stopped: the next PING hangs.
        assert!(redis.ping_due(at(200)));
        assert!(redis.alive(at(3001)));
        assert!(!redis.alive(at(3002)), "dead 3 s after the last answer");
        // The client gives up on it: the last answer's age still decides.
        redis.answer(at(2200), Pong::TimedOut);
        assert!(redis.alive(at(2200)));
        assert!(redis.ping_due(at(2400)));
        redis.answer(at(4000), Pong::Answered);
        assert!(redis.alive(at(4000)), "alive again once it answers");
        // A broken connection is dead at once.
        assert!(redis.ping_due(at(4100)));
        redis.answer(at(4101), Pong::Failed);
        assert!(!redis.alive(at(4101)));
    }
}
