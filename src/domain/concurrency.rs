//! The ML API's requests in flight, adapted to how it answers: additive
//! increase, multiplicative decrease (AIMD), as TCP does with its window.
//!
//! - An answer no slower than usual lets the limit grow by one request per
//!   `limit` answers (one per round of requests), up to the configured
//!   maximum (`predict.concurrency`).
//! - An answer that queued cuts the limit by 10%. It queued when it took
//!   more than twice the baseline, and at least [`MIN_QUEUE_DELAY`] more.
//! - The baseline is the model's own time: the fastest answer so far, or
//!   the last answer to a lone request (the limit at 1), which cannot have
//!   waited behind txnflow's own. Neither a moving mean nor the fastest of a
//!   recent window would do: while requests queue, every answer is slow,
//!   and both would follow the queue up until it no longer looked slow.
//! - A sign of overload (a timeout, a connection refused, 429, 5xx) halves it.
//!
//! The limit never falls below one request, so the API is always probed.

use std::time::Duration;

/// How a request ended, as the limit reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequestOutcome {
    /// An answer (2xx, or a 4xx about the request itself) after `Duration`.
    Answered(Duration),
    /// A timeout, a connection error, 429 or 5xx: the API is overloaded or down.
    Overloaded,
}

/// An answer slower than the baseline by this factor counts as queued.
const SLOW_FACTOR: u32 = 2;
/// Less added time than this never counts as queued: a few milliseconds
/// more are the machine's noise (CPU contention), not a model's queue.
pub const MIN_QUEUE_DELAY: Duration = Duration::from_millis(25);
/// The cut on a queued answer, and on a sign of overload.
const SLOW_DECREASE: f64 = 0.9;
const OVERLOAD_DECREASE: f64 = 0.5;

/// The adaptive limit of requests in flight.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    limit: f64,
    max: usize,
    /// The model's own answer time, as far as seen; none before the first.
    baseline: Option<Duration>,
}

impl AdaptiveLimit {
    /// Starts at `max`: an API that keeps up is used fully from the start.
    pub fn new(max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        AdaptiveLimit { limit: max as f64, max, baseline: None }
    }

    /// Requests that may be in flight now.
    pub fn current(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.max)
    }

    /// The model's own answer time, as far as seen.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// Takes a request's outcome into account.
    pub fn record(&mut self, outcome: RequestOutcome) {
        match outcome {
            RequestOutcome::Overloaded => self.limit = (self.limit * OVERLOAD_DECREASE).max(1.0),
            RequestOutcome::Answered(took) => {
                let queued = self
                    .baseline
                    .is_some_and(|baseline| took > baseline * SLOW_FACTOR && took > baseline + MIN_QUEUE_DELAY);
                // A lone request's answer is the model's time, slower or not:
                // how a model that became slower for good is learnt.
                self.baseline = match self.baseline {
                    Some(baseline) if self.current() > 1 => Some(baseline.min(took)),
                    _ => Some(took),
                };
                self.limit = if queued {
                    (self.limit * SLOW_DECREASE).max(1.0)
                } else {
                    (self.limit + 1.0 / self.limit).min(self.max as f64)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: RequestOutcome = RequestOutcome::Answered(Duration::from_millis(10));

    #[test]
    fn it_starts_at_the_maximum_and_stays_there_while_answers_keep_their_pace() {
        let mut limit = AdaptiveLimit::new(4);
        assert_eq!(limit.current(), 4);
        for _ in 0..100 {
            limit.record(FAST);
        }
        assert_eq!(limit.current(), 4, "never past the maximum");
        assert_eq!(limit.baseline(), Some(Duration::from_millis(10)));
    }

    #[test]
    fn overload_halves_the_limit_down_to_one_request() {
        let mut limit = AdaptiveLimit::new(16);
        let seen: Vec<usize> = (0..6)
            .map(|_| {
                limit.record(RequestOutcome::Overloaded);
                limit.current()
            })
            .collect();
        assert_eq!(seen, [8, 4, 2, 1, 1, 1]);
    }

    #[test]
    fn answers_that_queued_cut_it_by_a_tenth_each() {
        let mut limit = AdaptiveLimit::new(10);
        limit.record(FAST);
        limit.record(RequestOutcome::Answered(Duration::from_millis(19)));
        assert_eq!(limit.current(), 10, "under twice the baseline: not queued");
        limit.record(RequestOutcome::Answered(Duration::from_millis(50)));
        assert_eq!(limit.current(), 9, "10 × 0.9");
        limit.record(RequestOutcome::Answered(Duration::from_millis(80)));
        assert_eq!(limit.current(), 8, "9 × 0.9 = 8.1");
    }

    #[test]
    fn after_a_cut_it_grows_back_by_about_one_request_per_round() {
        let mut limit = AdaptiveLimit::new(8);
        limit.record(RequestOutcome::Overloaded);
        limit.record(RequestOutcome::Overloaded);
        assert_eq!(limit.current(), 2);
        let mut seen = Vec::new();
        for _ in 0..40 {
            limit.record(FAST);
            seen.push(limit.current());
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "it only grows: {seen:?}");
        // From 2 to 8 is rounds of 2, 3, ... 7 answers: about 27.
        assert_eq!(seen.iter().position(|&l| l == 8), Some(29), "{seen:?}");
        assert_eq!(seen[9], 4, "{seen:?}");
    }

    #[test]
    fn a_few_milliseconds_more_are_noise_not_a_queue() {
        let mut limit = AdaptiveLimit::new(4);
        limit.record(RequestOutcome::Answered(Duration::from_millis(5)));
        for _ in 0..50 {
            // Over twice the baseline, but only 6 ms more: a busy machine.
            limit.record(RequestOutcome::Answered(Duration::from_millis(11)));
        }
        assert_eq!(limit.current(), 4);
    }

    /// A model that serves `slots` requests at once, each in `service`: with
    /// `limit` requests in flight, an answer waits for the ones before it.
    fn queueing_model(limit: usize, slots: usize, service: Duration) -> RequestOutcome {
        let rounds = limit.div_ceil(slots).max(1) as u32;
        RequestOutcome::Answered(service * rounds)
    }

    #[test]
    fn a_standing_queue_is_cut_until_the_model_is_used_without_waiting_long() {
        let service = Duration::from_millis(100);
        let mut limit = AdaptiveLimit::new(16);
        // The first answer is the model's own time; the rest queue.
        limit.record(RequestOutcome::Answered(service));
        let mut seen = Vec::new();
        for _ in 0..400 {
            let outcome = queueing_model(limit.current(), 2, service);
            limit.record(outcome);
            seen.push(limit.current());
        }
        let settled = &seen[100..];
        // Never under the model's 2 slots (it stays fully used), and an
        // answer waits at most two rounds behind others.
        assert!(settled.iter().all(|&l| (2..=5).contains(&l)), "{settled:?}");
        assert_eq!(limit.baseline(), Some(service));
    }

    #[test]
    fn a_model_slower_for_good_is_learnt_from_a_lone_request() {
        let mut limit = AdaptiveLimit::new(4);
        limit.record(FAST);
        let slower = RequestOutcome::Answered(Duration::from_millis(200));
        let mut seen = Vec::new();
        for _ in 0..20 {
            limit.record(slower);
            seen.push(limit.current());
        }
        // Cut to one request, whose answer is the new baseline; then grown back.
        assert_eq!(seen[..8], [3, 3, 2, 2, 2, 2, 1, 1], "{seen:?}");
        assert_eq!(limit.baseline(), Some(Duration::from_millis(200)));
        assert_eq!(limit.current(), 4, "{seen:?}");
    }
}
