//! The ML API's requests in flight, adapted to how it answers: additive
//! increase, multiplicative decrease (AIMD), as TCP does with its window.
//!
//! - An answer no slower than usual lets the limit grow by one request per
//!   `limit` answers (one per round of requests), up to the configured
//!   maximum (`predict.concurrency`).
//! - An answer much slower than the moving mean of answer times (a model
//!   that queues requests) cuts the limit by 10%.
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

/// An answer slower than the mean by this factor counts as the API queueing.
const SLOW_FACTOR: f64 = 2.0;
/// Weight of each new answer time in the moving mean.
const MEAN_WEIGHT: f64 = 0.1;
/// The cut on a slow answer, and on a sign of overload.
const SLOW_DECREASE: f64 = 0.9;
const OVERLOAD_DECREASE: f64 = 0.5;

/// The adaptive limit of requests in flight.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    limit: f64,
    max: usize,
    /// Moving mean of the answer times, in seconds; none before the first.
    mean_seconds: Option<f64>,
}

impl AdaptiveLimit {
    /// Starts at `max`: an API that keeps up is used fully from the start.
    pub fn new(max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        AdaptiveLimit { limit: max as f64, max, mean_seconds: None }
    }

    /// Requests that may be in flight now.
    pub fn current(&self) -> usize {
        (self.limit.floor() as usize).clamp(1, self.max)
    }

    /// The moving mean of answer times.
    pub fn mean(&self) -> Option<Duration> {
        self.mean_seconds.map(Duration::from_secs_f64)
    }

    /// Takes a request's outcome into account.
    pub fn record(&mut self, outcome: RequestOutcome) {
        match outcome {
            RequestOutcome::Overloaded => self.limit = (self.limit * OVERLOAD_DECREASE).max(1.0),
            RequestOutcome::Answered(took) => {
                let seconds = took.as_secs_f64();
                let slow = self.mean_seconds.is_some_and(|mean| seconds > mean * SLOW_FACTOR);
                self.mean_seconds =
                    Some(self.mean_seconds.map_or(seconds, |mean| mean + MEAN_WEIGHT * (seconds - mean)));
                self.limit = if slow {
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
        assert_eq!(limit.mean(), Some(Duration::from_millis(10)));
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
    fn answers_far_slower_than_usual_cut_it_by_a_tenth_each() {
        let mut limit = AdaptiveLimit::new(10);
        limit.record(FAST);
        limit.record(RequestOutcome::Answered(Duration::from_millis(19)));
        assert_eq!(limit.current(), 10, "under twice the mean: not slow");
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
}
