//! Waiting between attempts: exponential backoff with full jitter, capped
//! (the delays of [`crate::domain::retry::backoff_delay`]), counted per
//! operation. One helper for every retry loop of the service; the loop
//! itself sleeps, so this stays a rule without I/O or a runtime.

use rand::Rng;
use std::time::Duration;

use crate::domain::retry::backoff_delay;

pub struct Backoff {
    failures: u32,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { failures: 0, initial, max }
    }

    /// While a dependency (the database, the broker) is down: 100 ms,
    /// doubling, at most 5 s.
    pub fn outage() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failed attempt and gives the delay before the next one,
    /// for a caller that waits on something else meanwhile.
    pub fn next_delay(&mut self) -> Duration {
        self.failures += 1;
        backoff_delay(self.failures, self.initial, self.max, rand::rng().random())
    }

    /// Counts a failed attempt: the failures so far, and the delay before
    /// the next attempt (for the caller to log, then sleep).
    pub fn next_attempt(&mut self) -> (u32, Duration) {
        let delay = self.next_delay();
        (self.failures, delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_counts_a_failure_and_gives_its_capped_delay() {
        let (initial, max) = (Duration::from_millis(1), Duration::from_millis(4));
        let mut backoff = Backoff::new(initial, max);
        let mut said = Vec::new();
        for _ in 0..4 {
            said.push(backoff.next_attempt());
        }
        assert_eq!(backoff.failures(), 4);
        assert_eq!(said.iter().map(|(failures, _)| *failures).collect::<Vec<_>>(), [1, 2, 3, 4]);
        for (failures, delay) in said {
            let ceiling = initial.saturating_mul(1 << (failures - 1)).min(max);
            assert!(delay >= initial && delay <= ceiling, "attempt {failures}: {delay:?} within [1 ms, {ceiling:?}]");
        }
    }
}
