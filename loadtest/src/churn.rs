//! When subscribers drop their connections: the seeded exponential schedule
//! of `--reconnect-every` and the one instant of `--storm-at`. Pure data, no
//! I/O and no clock: the receive paths ask it with the time they read, and
//! do the dropping and reconnecting themselves (`sub.rs`, `uring.rs`).
//!
//! Each subscriber draws from its own generator, seeded from `--seed` and its
//! index, so a subscriber's drops do not depend on which process or thread
//! holds it, and a run repeats with the same seed.

use std::time::Duration;

/// What the command line asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Mean time between a subscriber's drops, ns (`--reconnect-every`).
    pub(crate) mean_ns: Option<u64>,
    /// Drop everyone this long into the measured window (`--storm-at`).
    pub(crate) storm_after_ns: Option<u64>,
    /// Re-subscribe with `since` (`--recover`).
    pub(crate) recover: bool,
    /// Seed of every subscriber's generator (`--seed`).
    pub(crate) seed: u64,
}

impl Plan {
    /// The plan for these flags.
    pub(crate) fn new(
        every: Option<Duration>,
        storm_at: Option<Duration>,
        recover: bool,
        seed: u64,
    ) -> Plan {
        Plan {
            mean_ns: every.map(|d| d.as_nanos() as u64),
            storm_after_ns: storm_at.map(|d| d.as_nanos() as u64),
            recover,
            seed,
        }
    }

    /// Whether subscribers drop at all.
    pub(crate) fn drops(&self) -> bool {
        self.mean_ns.is_some() || self.storm_after_ns.is_some()
    }

    /// The window drops happen in, for a measured window `[from, until)`.
    pub(crate) fn window(&self, from_ns: u64, until_ns: u64) -> Window {
        Window {
            from_ns,
            until_ns,
            storm_ns: self.storm_after_ns.map(|s| from_ns + s),
        }
    }
}

/// When drops may happen, known once the measured window is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// No drop before this.
    pub(crate) from_ns: u64,
    /// No drop at or after this (the drain reconnects, it does not drop).
    pub(crate) until_ns: u64,
    /// Every subscriber drops at this instant.
    pub(crate) storm_ns: Option<u64>,
}

/// One subscriber's generator (splitmix64: tiny state, good spread from
/// neighbouring seeds, which is what seeding by index needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dice(u64);

impl Dice {
    /// The generator of subscriber `index` under `seed`.
    pub(crate) fn new(seed: u64, index: u64) -> Dice {
        let mut d = Dice(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
        d.next();
        d
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An exponentially distributed duration of mean `mean_ns`.
    pub(crate) fn exp_ns(&mut self, mean_ns: u64) -> u64 {
        // 53 random bits as a uniform in (0, 1]: never ln(0).
        let u = ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        (-(mean_ns as f64) * u.ln()) as u64
    }
}

/// A subscriber's place in the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    dice: Dice,
    /// Dropped by the storm already.
    stormed: bool,
}

/// A drop that is due: when, and whether it is the storm's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Drop {
    /// Scheduled instant, ns.
    pub(crate) at_ns: u64,
    /// The storm's drop (everyone at once).
    pub(crate) storm: bool,
}

impl Schedule {
    /// Subscriber `index`'s schedule under `plan`.
    pub(crate) fn new(plan: &Plan, index: u64) -> Schedule {
        Schedule {
            dice: Dice::new(plan.seed, index),
            stormed: false,
        }
    }

    /// The next drop of a subscriber connected since `after_ns`, or `None`
    /// when it stays connected for the rest of the window.
    pub(crate) fn next(&mut self, plan: &Plan, w: &Window, after_ns: u64) -> Option<Drop> {
        let random = plan.mean_ns.map(|m| Drop {
            at_ns: after_ns.max(w.from_ns).saturating_add(self.dice.exp_ns(m)),
            storm: false,
        });
        let storm = w
            .storm_ns
            .filter(|_| !self.stormed)
            .map(|at_ns| Drop { at_ns, storm: true });
        let next = match (random, storm) {
            (Some(r), Some(s)) if s.at_ns <= r.at_ns => Some(s),
            (Some(r), _) => Some(r),
            (None, s) => s,
        };
        next.filter(|d| d.at_ns < w.until_ns)
    }

    /// Notes that drop `d` happened.
    pub(crate) fn dropped(&mut self, d: Drop) {
        self.stormed |= d.storm;
    }
}

/// Drops and reconnects over a run, summed over threads and processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reconnects {
    /// Connections dropped on schedule (the storm's included).
    pub(crate) drops: u64,
    /// Of those, dropped by the storm.
    pub(crate) storm_drops: u64,
    /// Reconnects that got their socket upgraded and the subscribe sent.
    pub(crate) reconnects: u64,
    /// Reconnect attempts that failed (each retried after a pause).
    pub(crate) failed_attempts: u64,
    /// Subscribers given up after every attempt failed.
    pub(crate) abandoned: u64,
    /// Reconnects dropped again before their `subscribed` came.
    pub(crate) interrupted: u64,
    /// Drops whose reconnect had no `subscribed` yet when the figures were read.
    pub(crate) unanswered: u64,
}

impl Reconnects {
    /// Adds `o` into `self`.
    pub(crate) fn add(&mut self, o: &Reconnects) {
        self.drops += o.drops;
        self.storm_drops += o.storm_drops;
        self.reconnects += o.reconnects;
        self.failed_attempts += o.failed_attempts;
        self.abandoned += o.abandoned;
        self.interrupted += o.interrupted;
        self.unanswered += o.unanswered;
    }

    /// The fields in a fixed order (the child processes' wire order).
    pub(crate) fn fields(&self) -> [u64; 7] {
        [
            self.drops,
            self.storm_drops,
            self.reconnects,
            self.failed_attempts,
            self.abandoned,
            self.interrupted,
            self.unanswered,
        ]
    }

    /// The inverse of `fields`.
    pub(crate) fn from_fields(f: &[u64]) -> Option<Reconnects> {
        match *f {
            [drops, storm_drops, reconnects, failed_attempts, abandoned, interrupted, unanswered] => {
                Some(Reconnects {
                    drops,
                    storm_drops,
                    reconnects,
                    failed_attempts,
                    abandoned,
                    interrupted,
                    unanswered,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn every(mean_s: u64) -> Plan {
        Plan::new(Some(Duration::from_secs(mean_s)), None, true, 7)
    }

    #[test]
    fn drops_are_exponential_with_the_asked_mean() {
        let mut d = Dice::new(1, 0);
        let n = 20_000;
        let draws: Vec<u64> = (0..n).map(|_| d.exp_ns(2 * S)).collect();
        let mean = draws.iter().sum::<u64>() as f64 / n as f64 / S as f64;
        assert!((mean - 2.0).abs() < 0.1, "mean {mean}");
        // P(X > mean) = 1/e for an exponential.
        let above = draws.iter().filter(|&&x| x > 2 * S).count() as f64 / n as f64;
        assert!((above - (-1.0f64).exp()).abs() < 0.02, "above mean {above}");
    }

    #[test]
    fn the_same_seed_and_index_repeat_and_neighbours_differ() {
        let p = every(2);
        let w = p.window(10 * S, 20 * S);
        let run = |i| {
            let mut s = Schedule::new(&p, i);
            (0..5)
                .map(|_| s.next(&p, &w, 10 * S).map(|d| d.at_ns))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn drops_fall_inside_the_window_only() {
        let p = Plan::new(Some(Duration::from_millis(100)), None, true, 7);
        let w = p.window(10 * S, 12 * S);
        let mut s = Schedule::new(&p, 0);
        let mut at = 0;
        let mut drops = 0;
        while let Some(d) = s.next(&p, &w, at) {
            assert!(d.at_ns >= 10 * S && d.at_ns < 12 * S, "{d:?}");
            assert!(!d.storm);
            at = d.at_ns;
            drops += 1;
        }
        assert!(drops > 5, "{drops} drops in 20 mean gaps");
    }

    #[test]
    fn the_storm_drops_everyone_once_at_its_instant() {
        let p = Plan::new(None, Some(Duration::from_secs(3)), true, 1);
        let w = p.window(10 * S, 20 * S);
        for i in 0..10 {
            let mut s = Schedule::new(&p, i);
            let d = s.next(&p, &w, 0).unwrap();
            assert_eq!(
                d,
                Drop {
                    at_ns: 13 * S,
                    storm: true
                }
            );
            s.dropped(d);
            assert_eq!(s.next(&p, &w, 13 * S), None);
        }
    }

    #[test]
    fn the_storm_comes_between_random_drops() {
        let p = Plan::new(
            Some(Duration::from_millis(100)),
            Some(Duration::from_secs(1)),
            true,
            1,
        );
        let w = p.window(0, 2 * S);
        let mut s = Schedule::new(&p, 0);
        let mut at = 0;
        let mut storms = 0;
        while let Some(d) = s.next(&p, &w, at) {
            storms += u32::from(d.storm);
            s.dropped(d);
            at = d.at_ns;
        }
        assert_eq!(storms, 1);
        assert!(!Plan::default().drops());
    }
}
