//! A bound on the Redis requests of one kind the broker has in flight
//! (stream reads, presence queries): past it, new ones wait their turn in
//! order instead of each starting a task at once. A stalled Redis then
//! holds at most this many requests and their tasks; what waits is bounded
//! by the clients that asked (their subscriptions and query rates).

use std::collections::VecDeque;

/// Jobs in flight, up to a bound, and those waiting, oldest first.
pub(super) struct Gate<J> {
    max: usize,
    in_flight: usize,
    waiting: VecDeque<J>,
}

impl<J> Gate<J> {
    pub(super) fn new(max: usize) -> Gate<J> {
        debug_assert!(max > 0, "a gate that admits nothing would wait for ever");
        Gate {
            max,
            in_flight: 0,
            waiting: VecDeque::new(),
        }
    }

    /// `job` starts now (returned) if there is room, else it waits.
    pub(super) fn admit(&mut self, job: J) -> Option<J> {
        if self.in_flight < self.max {
            self.in_flight += 1;
            return Some(job);
        }
        self.waiting.push_back(job);
        None
    }

    /// A job in flight ended: the next waiting one starts (returned).
    pub(super) fn done(&mut self) -> Option<J> {
        debug_assert!(self.in_flight > 0, "a job ended that never started");
        match self.waiting.pop_front() {
            Some(next) => Some(next),
            None => {
                self.in_flight -= 1;
                None
            }
        }
    }

    /// Jobs in flight and waiting.
    pub(super) fn load(&self) -> (usize, usize) {
        (self.in_flight, self.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_jobs_wait_in_order_and_start_as_others_end() {
        let mut gate = Gate::new(2);
        assert_eq!(gate.admit(1), Some(1));
        assert_eq!(gate.admit(2), Some(2));
        assert_eq!(gate.admit(3), None);
        assert_eq!(gate.admit(4), None);
        assert_eq!(gate.load(), (2, 2));
        assert_eq!(gate.done(), Some(3));
        assert_eq!(gate.done(), Some(4));
        assert_eq!(gate.done(), None);
        assert_eq!(gate.done(), None);
        assert_eq!(gate.load(), (0, 0));
    }
}
