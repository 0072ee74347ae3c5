//! The ML API's circuit breaker: `recloser`, with its state made visible.
//!
//! The design card names the `circuit_breaker` crate. It is synchronous only,
//! its closed state never resets its failure count on success, it lets any
//! number of probes through when half-open, and it runs callbacks under its
//! lock. `recloser` is maintained and async-aware, counts failures over a
//! sliding window of calls, limits half-open trials, and takes an error
//! predicate, so that a 422 (a bad request, not a sick API) does not count
//! as a failure.
//!
//! `recloser` has no state getter, but with its `tracing` feature it emits an
//! event on every transition (target `recloser_event`). [`BreakerStateLayer`]
//! turns those events into the `txnflow_circuit_breaker_state` metric and the
//! shared [`BreakerState`] that the backfill and the progress line read.

use recloser::{AsyncRecloser, Recloser};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::config::BreakerConfig;
use crate::observability::metrics::METRICS;

/// The name recloser puts on its events, to tell ours from any other.
const BREAKER_NAME: &str = "ml_api";

/// The breaker's state, as last reported by recloser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

static STATE: AtomicU8 = AtomicU8::new(BreakerState::Closed as u8);

impl BreakerState {
    fn from_u8(value: u8) -> BreakerState {
        match value {
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            _ => BreakerState::Closed,
        }
    }
}

/// The current state of the ML API breaker.
pub fn state() -> BreakerState {
    BreakerState::from_u8(STATE.load(Ordering::Relaxed))
}

/// Records a state recloser reports. Recloser also reports the state a
/// breaker starts in (closed): that is no transition, so it is neither
/// counted nor logged.
fn record_transition(to: BreakerState) {
    let from = STATE.swap(to as u8, Ordering::Relaxed);
    METRICS.breaker_state.set(to as i64);
    if from == to as u8 {
        return;
    }
    METRICS.breaker_transitions.with_label_values(&[to.as_str()]).inc();
    crate::observability::recent::note_breaker_transition(BreakerState::from_u8(from).as_str(), to.as_str());
    match to {
        BreakerState::Open => {
            tracing::warn!(state = to.as_str(), "ML API circuit breaker opened: predictions wait for the backfill")
        }
        BreakerState::HalfOpen | BreakerState::Closed => {
            tracing::info!(state = to.as_str(), "ML API circuit breaker changed state")
        }
    }
}

/// Builds the breaker from `[breaker]`.
pub fn build(config: &BreakerConfig) -> AsyncRecloser {
    build_named(config, BREAKER_NAME)
}

/// A breaker of another API (a shadow or re-prediction model), with the
/// same settings; its transitions leave the pipeline's state alone.
pub fn build_named(config: &BreakerConfig, name: &'static str) -> AsyncRecloser {
    Recloser::custom()
        .name(name)
        .error_rate(config.failure_rate as f32)
        .closed_len(config.window)
        .half_open_len(config.half_open_probes)
        .open_wait(Duration::from_millis(config.open_ms))
        .build()
        .into()
}

/// A tracing layer that watches recloser's transition events.
pub struct BreakerStateLayer;

#[derive(Default)]
struct TransitionVisitor {
    name: Option<String>,
    state: Option<String>,
    started: bool,
}

impl Visit for TransitionVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "name" => self.name = Some(value.to_string()),
            "state" => self.state = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, _value: u64) {
        if field.name() == "started_ts" {
            self.started = true;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, text.trim_matches('"'));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BreakerStateLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != recloser::RECLOSER_EVENT {
            return;
        }
        let mut visitor = TransitionVisitor::default();
        event.record(&mut visitor);
        if !visitor.started || visitor.name.as_deref() != Some(BREAKER_NAME) {
            return;
        }
        let to = match visitor.state.as_deref() {
            Some("Open") => BreakerState::Open,
            Some("HalfOpen") => BreakerState::HalfOpen,
            Some("Closed") => BreakerState::Closed,
            _ => return,
        };
        record_transition(to);
    }
}

/// The filter that lets exactly recloser's events reach [`BreakerStateLayer`].
pub fn layer_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target(recloser::RECLOSER_EVENT, tracing::Level::INFO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_of_state_counts_as_a_transition() {
        let count = |to: BreakerState| METRICS.breaker_transitions.with_label_values(&[to.as_str()]).get();
        let (closed, open) = (count(BreakerState::Closed), count(BreakerState::Open));
        record_transition(BreakerState::Closed); // the state a breaker starts in
        assert_eq!(count(BreakerState::Closed), closed);
        record_transition(BreakerState::Open);
        record_transition(BreakerState::Open);
        assert_eq!((state(), count(BreakerState::Open)), (BreakerState::Open, open + 1));
        record_transition(BreakerState::Closed);
        assert_eq!((state(), count(BreakerState::Closed)), (BreakerState::Closed, closed + 1));
        assert_eq!(METRICS.breaker_state.get(), 0);
    }
}
