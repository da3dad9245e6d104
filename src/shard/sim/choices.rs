//! Where a simulation's decisions come from: a seeded generator for the
//! seed sweep, or the fuzzer's bytes. Nothing else in a run is random.

use crate::shard::state::splitmix64;

/// A source of decisions. Every branch a run takes is a call to
/// [`Choices::below`], so the same source replays the same run.
pub trait Choices {
    /// A number in `0..n`; `n` is at least 1.
    fn below(&mut self, n: usize) -> usize;

    /// True once the source has nothing left to give (fuzzer input used up):
    /// the run stops taking random steps and goes on to its final checks.
    fn exhausted(&self) -> bool;
}

/// SplitMix64 from a seed: fast, and every seed gives an independent stream.
#[derive(Debug, Clone)]
pub struct Seeded {
    state: u64,
}

impl Seeded {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Seeded {
        Seeded { state: seed }
    }
}

impl Choices for Seeded {
    fn below(&mut self, n: usize) -> usize {
        // `splitmix64` adds the increment itself; stepping the state by the
        // same increment makes this the standard SplitMix64 sequence.
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (out % n.max(1) as u64) as usize
    }

    fn exhausted(&self) -> bool {
        false
    }
}

/// Decisions read from fuzzer input: one byte for a choice among at most
/// 256, two for more. Past the end every choice is 0 and the source reports
/// itself exhausted, so any input is a finite, valid run.
#[derive(Debug, Clone)]
pub struct FuzzInput {
    data: Vec<u8>,
    pos: usize,
}

impl FuzzInput {
    /// Decisions from `data`.
    pub fn new(data: &[u8]) -> FuzzInput {
        FuzzInput {
            data: data.to_vec(),
            pos: 0,
        }
    }

    fn byte(&mut self) -> u8 {
        let byte = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        byte
    }
}

impl Choices for FuzzInput {
    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let value = if n <= 1 << 8 {
            usize::from(self.byte())
        } else {
            usize::from(self.byte()) << 8 | usize::from(self.byte())
        };
        value % n
    }

    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_different_seeds_differ() {
        let run = |seed| {
            let mut c = Seeded::new(seed);
            (0..8).map(|_| c.below(1000)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn fuzz_input_runs_dry_into_zeros() {
        let mut c = FuzzInput::new(&[5, 1, 2]);
        assert_eq!(c.below(4), 1);
        assert!(!c.exhausted());
        assert_eq!(c.below(1000), 258, "two bytes, big-endian");
        assert!(c.exhausted());
        assert_eq!(c.below(10), 0);
    }
}
