//! Repeated log lines folded into one per cause and interval: a client
//! that retries a broker that is down says so once every
//! [`REPEAT_INTERVAL`], with the count of the lines it held back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The least time between two lines of one cause.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// The most causes remembered; past it the oldest are forgotten (and
/// their next line is said again).
const MAX_CAUSES: usize = 256;

/// Which lines of each cause are said, and how many were held back.
#[derive(Debug, Default)]
pub struct Repeats {
    causes: HashMap<String, (Instant, u64)>,
}

impl Repeats {
    /// Whether a line of `cause` is said at `now`: `Some(held)` with the
    /// lines of that cause held back since it was last said, or `None` to
    /// hold this one back too.
    pub fn admit(&mut self, cause: &str, now: Instant) -> Option<u64> {
        if let Some((said, held)) = self.causes.get_mut(cause) {
            if now.duration_since(*said) < REPEAT_INTERVAL {
                *held += 1;
                return None;
            }
            let before = *held;
            *said = now;
            *held = 0;
            return Some(before);
        }
        if self.causes.len() >= MAX_CAUSES
            && let Some(oldest) = self.causes.iter().min_by_key(|(_, (said, _))| *said).map(|(cause, _)| cause.clone())
        {
            self.causes.remove(&oldest);
        }
        self.causes.insert(cause.to_string(), (now, 0));
        Some(0)
    }
}

/// A line's cause: its text without digits, so that the same failure of
/// another broker, port or duration counts as a repeat.
pub fn cause_of(facility: &str, message: &str) -> String {
    let mut cause = String::with_capacity(facility.len() + message.len() + 1);
    cause.push_str(facility);
    cause.push(' ');
    cause.extend(message.chars().filter(|c| !c.is_ascii_digit()).take(200));
    cause
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_and_interval_with_the_count_held_back() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit("down", start), Some(0), "the first is said");
        for n in 1..=59 {
            assert_eq!(repeats.admit("down", start + Duration::from_millis(500 * n)), None);
        }
        assert_eq!(repeats.admit("other", start + Duration::from_secs(1)), Some(0), "another cause is its own");
        assert_eq!(repeats.admit("down", start + REPEAT_INTERVAL), Some(59), "then one, with the 59 held back");
        assert_eq!(repeats.admit("down", start + REPEAT_INTERVAL + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_causes_remembered_are_bounded() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        for n in 0..(MAX_CAUSES as u64 + 10) {
            repeats.admit(&n.to_string(), start + Duration::from_millis(n));
        }
        assert_eq!(repeats.causes.len(), MAX_CAUSES);
    }

    #[test]
    fn a_cause_ignores_numbers() {
        let a = cause_of("FAIL", "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed (after 0ms)");
        let b = cause_of("FAIL", "127.0.0.1:2/bootstrap: Connect to ipv4#127.0.0.1:2 failed (after 12ms)");
        assert_eq!(a, b);
        assert_ne!(a, cause_of("CONNECT", "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed (after 0ms)"));
    }
}
