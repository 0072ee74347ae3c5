//! The requests in flight toward the ML API, across every caller of one
//! client, bounded by an adaptive (or fixed) limit.

use crate::domain::concurrency::{AdaptiveLimit, RequestOutcome};
use crate::observability::metrics::METRICS;

/// The requests in flight toward the API, across every caller, under an
/// [`AdaptiveLimit`] (or a fixed one, without `adaptive_concurrency`).
pub(super) struct RequestSlots {
    state: std::sync::Mutex<SlotsState>,
    freed: tokio::sync::Notify,
    adaptive: bool,
    /// Whether the limit is the pipeline's, shown in its metric.
    reported: bool,
}

struct SlotsState {
    limit: AdaptiveLimit,
    in_flight: usize,
}

/// One request's slot, given back when dropped.
pub(super) struct Slot<'a>(&'a RequestSlots);

impl RequestSlots {
    pub(super) fn new(max: usize, adaptive: bool, reported: bool) -> RequestSlots {
        if reported {
            METRICS.ml_api_concurrency_limit.set(max as i64);
        }
        let state = SlotsState { limit: AdaptiveLimit::new(max), in_flight: 0 };
        RequestSlots { state: std::sync::Mutex::new(state), freed: tokio::sync::Notify::new(), adaptive, reported }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until fewer requests than the limit are in flight.
    pub(super) async fn acquire(&self) -> Slot<'_> {
        loop {
            // Made before the check, so that a slot freed meanwhile wakes it.
            let freed = self.freed.notified();
            {
                let mut state = self.lock();
                if state.in_flight < state.limit.current() {
                    state.in_flight += 1;
                    return Slot(self);
                }
            }
            freed.await;
        }
    }

    /// Adapts the limit to how a request ended.
    pub(super) fn record(&self, outcome: RequestOutcome) {
        if !self.adaptive {
            return;
        }
        let mut state = self.lock();
        let before = state.limit.current();
        state.limit.record(outcome);
        let after = state.limit.current();
        drop(state);
        if after != before {
            if self.reported {
                METRICS.ml_api_concurrency_limit.set(after as i64);
            }
            tracing::debug!(before, after, "ML API requests allowed in flight");
        }
        if after > before {
            self.freed.notify_waiters();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
        self.0.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::concurrency::RequestOutcome;
    use std::time::Duration;

    /// Whether an `acquire` would wait now.
    fn waits(slots: &RequestSlots) -> bool {
        futures_util::FutureExt::now_or_never(slots.acquire()).is_none()
    }

    #[test]
    fn the_slots_follow_the_limit_down_and_back_up() {
        let slots = RequestSlots::new(4, true, true);
        let held: Vec<Slot<'_>> =
            (0..4).map(|_| futures_util::FutureExt::now_or_never(slots.acquire()).unwrap()).collect();
        assert!(waits(&slots), "4 of 4 in flight");
        slots.record(RequestOutcome::Overloaded);
        assert_eq!(slots.lock().limit.current(), 2);
        let mut held = held;
        held.truncate(2);
        assert!(waits(&slots), "2 in flight at a limit of 2: none is given");
        held.truncate(1);
        let third = futures_util::FutureExt::now_or_never(slots.acquire()).expect("1 in flight: one more");
        assert!(waits(&slots));
        // Two answers at their pace grow a limit of 2 to 2.9: still 2.
        slots.record(RequestOutcome::Answered(Duration::from_millis(5)));
        slots.record(RequestOutcome::Answered(Duration::from_millis(5)));
        assert!(waits(&slots));
        slots.record(RequestOutcome::Answered(Duration::from_millis(5)));
        assert_eq!(slots.lock().limit.current(), 3);
        assert!(!waits(&slots), "a third slot once the limit is 3");
        drop((held, third));
        assert_eq!(slots.lock().in_flight, 0, "every slot given back");
    }

    #[test]
    fn without_adaptive_concurrency_the_limit_stays_fixed() {
        let slots = RequestSlots::new(3, false, true);
        for _ in 0..5 {
            slots.record(RequestOutcome::Overloaded);
        }
        assert_eq!(slots.lock().limit.current(), 3);
    }

    /// A waiter is woken when a slot is given back.
    #[tokio::test]
    async fn a_slot_given_back_wakes_a_waiter() {
        let slots = std::sync::Arc::new(RequestSlots::new(1, true, true));
        let first = slots.acquire().await;
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire().await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
    }
}
