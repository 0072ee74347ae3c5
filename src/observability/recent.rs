//! The last few breaker transitions and dead letters, kept in memory for
//! the status page: bounded, and without any record's content.

use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::sync::Mutex;

/// How many breaker transitions the page lists.
pub const BREAKER_TRANSITIONS_KEPT: usize = 10;
/// How many dead letters the page lists.
pub const DEAD_LETTERS_KEPT: usize = 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerTransition {
    pub at: DateTime<Utc>,
    pub from: &'static str,
    pub to: &'static str,
}

/// A dead letter as the page shows it: why and from where, never its bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterSeen {
    pub at: DateTime<Utc>,
    pub error_type: &'static str,
    pub stage: &'static str,
    /// The reason, as the DLQ header has it; [`dead_letters`] gives it with
    /// every quoted value replaced.
    pub reason: String,
    /// `topic/partition/offset` or `uri:line`.
    pub source: String,
    /// `dlq` (the DLQ topic) or `dead_letters` (the table, when the topic refused it).
    pub destination: &'static str,
}

static BREAKER_TRANSITIONS: Mutex<VecDeque<BreakerTransition>> = Mutex::new(VecDeque::new());
static DEAD_LETTERS: Mutex<VecDeque<DeadLetterSeen>> = Mutex::new(VecDeque::new());

fn push<T>(log: &Mutex<VecDeque<T>>, kept: usize, item: T) {
    let mut log = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if log.len() == kept {
        log.pop_front();
    }
    log.push_back(item);
}

/// Newest first.
fn newest_first<T: Clone>(log: &Mutex<VecDeque<T>>) -> Vec<T> {
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().rev().cloned().collect()
}

pub fn note_breaker_transition(from: &'static str, to: &'static str) {
    push(&BREAKER_TRANSITIONS, BREAKER_TRANSITIONS_KEPT, BreakerTransition { at: Utc::now(), from, to });
}

pub fn breaker_transitions() -> Vec<BreakerTransition> {
    newest_first(&BREAKER_TRANSITIONS)
}

/// A dead letter sent or stored, from the DLQ headers already made for it.
/// Only copies here, on the records' path; the reason and the source are
/// cleaned when the page asks ([`dead_letters`]).
pub fn note_dead_letter(
    failure: &crate::domain::dead_letter::Failure,
    headers: &[(&'static str, String)],
    destination: &'static str,
) {
    let header = |name: &str| headers.iter().find(|(key, _)| *key == name).map_or_else(String::new, |(_, v)| v.clone());
    let seen = DeadLetterSeen {
        at: Utc::now(),
        error_type: failure.error_type.as_str(),
        stage: failure.stage.as_str(),
        reason: header("error_message"),
        source: header("source"),
        destination,
    };
    push(&DEAD_LETTERS, DEAD_LETTERS_KEPT, seen);
}

/// The last dead letters, newest first, each reason without the values it
/// quoted and each source without secrets.
pub fn dead_letters() -> Vec<DeadLetterSeen> {
    use crate::domain::redaction::{redact, short_reason, without_quoted_values};
    let mut seen = newest_first(&DEAD_LETTERS);
    for letter in &mut seen {
        letter.reason = short_reason(without_quoted_values(&letter.reason));
        letter.source = redact(&letter.source);
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_keeps_its_newest_items_newest_first() {
        let log = Mutex::new(VecDeque::new());
        for item in 0..25 {
            push(&log, 20, item);
        }
        let kept = newest_first(&log);
        assert_eq!(kept, (5..25).rev().collect::<Vec<_>>());
    }
}
