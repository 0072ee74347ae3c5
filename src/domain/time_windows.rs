//! Half-open time windows `[from, to)` that walk a time range in chunks of
//! about a target number of rows, for scans over a BRIN index on time
//! (promote and archive over `prediction_history`). Each window's width
//! follows the rows the last one held, so that dense and sparse stretches
//! both give chunks near the target, and a window found to hold more than
//! twice the target (a burst after a sparse stretch) is narrowed before it
//! is used. Rows that share one timestamp always fall in the same window,
//! so a window's edge never splits them: the narrowest window (1 µs) is
//! taken whatever it holds.

use chrono::{DateTime, Duration, Utc};

/// The narrowest window: one microsecond, PostgreSQL's resolution.
const NARROWEST_US: i64 = 1;
/// A window grows or shrinks at most this much from one to the next.
const MOST_CHANGE: f64 = 8.0;

#[derive(Debug, Clone, PartialEq)]
pub struct TimeWindows {
    /// The start of the next window.
    next: DateTime<Utc>,
    /// The last timestamp to cover (inclusive).
    last: DateTime<Utc>,
    width_us: i64,
    target_rows: u64,
}

impl TimeWindows {
    /// Windows over `[first, last]`, which holds about `rows` rows, sized
    /// for `target_rows` each as if the rows were spread evenly.
    pub fn new(first: DateTime<Utc>, last: DateTime<Utc>, rows: u64, target_rows: u64) -> TimeWindows {
        let span_us = (last - first).num_microseconds().unwrap_or(i64::MAX).max(0);
        let windows = (rows / target_rows.max(1)).max(1);
        let width_us = (span_us / windows as i64).saturating_add(1).max(NARROWEST_US);
        TimeWindows { next: first, last, width_us, target_rows: target_rows.max(1) }
    }

    /// The next window, or None once `last` is covered.
    pub fn next_window(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if self.next > self.last {
            return None;
        }
        let end_of_range = self.last + Duration::microseconds(1);
        let to = (self.next + Duration::microseconds(self.width_us)).min(end_of_range);
        Some((self.next, to))
    }

    /// Whether the next window, found to hold `rows` rows, is small enough
    /// to use; if not, it is narrowed for the caller to ask again.
    pub fn fits(&mut self, rows: u64) -> bool {
        if rows <= 2 * self.target_rows || self.width_us == NARROWEST_US {
            return true;
        }
        let narrowed = (self.width_us as f64 * self.target_rows as f64 / rows as f64) as i64;
        self.width_us = narrowed.clamp(NARROWEST_US, self.width_us / 2);
        false
    }

    /// The window `[_, to)` held `rows` rows: the next starts at `to`, sized
    /// from them.
    pub fn done(&mut self, to: DateTime<Utc>, rows: u64) {
        self.next = to;
        let factor = if rows == 0 { MOST_CHANGE } else { self.target_rows as f64 / rows as f64 };
        let factor = factor.clamp(1.0 / MOST_CHANGE, MOST_CHANGE);
        self.width_us = ((self.width_us as f64 * factor) as i64).max(NARROWEST_US);
    }

    /// More rows may have arrived up to `last`: cover it too.
    pub fn extend_to(&mut self, last: DateTime<Utc>) {
        self.last = self.last.max(last);
    }

    /// Where the next window starts: a resume point.
    pub fn next_start(&self) -> DateTime<Utc> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(us: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(1_700_000_000_000_000 + us).unwrap()
    }

    /// Walks `times` (sorted) with the windows and returns each window's rows.
    fn walk(times: &[i64], target: u64) -> Vec<Vec<i64>> {
        let mut windows = TimeWindows::new(at(times[0]), at(*times.last().unwrap()), times.len() as u64, target);
        let mut chunks = Vec::new();
        while let Some((from, to)) = windows.next_window() {
            let rows: Vec<i64> = times.iter().copied().filter(|&t| at(t) >= from && at(t) < to).collect();
            if !windows.fits(rows.len() as u64) {
                continue;
            }
            windows.done(to, rows.len() as u64);
            chunks.push(rows);
            assert!(chunks.len() < 100_000, "the walk ends");
        }
        chunks
    }

    #[test]
    fn every_row_falls_in_exactly_one_window_in_time_order() {
        let times: Vec<i64> =
            (0..10_000).map(|i| i * 37 % 1_000_000).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let chunks = walk(&times, 500);
        let seen: Vec<i64> = chunks.concat();
        assert_eq!(seen, times);
    }

    #[test]
    fn rows_sharing_a_timestamp_are_never_split() {
        // 10 flushes of 2,000 rows, each flush at one timestamp.
        let times: Vec<i64> = (0..10).flat_map(|f| std::iter::repeat_n(f * 1_000, 2_000)).collect();
        for chunk in walk(&times, 500) {
            assert!(chunk.is_empty() || chunk.len() == 2_000, "one whole flush at most: {}", chunk.len());
        }
    }

    #[test]
    fn windows_follow_the_density_toward_the_target() {
        // A dense hour (1 row per ms) after a sparse day (1 row per minute).
        let sparse: Vec<i64> = (0..1_440).map(|m| m * 60_000_000).collect();
        let start = 1_440 * 60_000_000;
        let dense: Vec<i64> = (0..100_000).map(|i| start + i * 1_000).collect();
        let times: Vec<i64> = sparse.into_iter().chain(dense).collect();
        let chunks = walk(&times, 1_000);
        let full: Vec<usize> = chunks.iter().map(Vec::len).filter(|&n| n > 0).collect();
        assert_eq!(full.iter().sum::<usize>(), times.len());
        let largest = *full.iter().max().unwrap();
        assert!(largest <= 2_000, "no chunk holds more than twice the target: {largest}");
        assert!(chunks.len() < 1_000, "the sparse stretch is crossed in few windows: {}", chunks.len());
    }

    #[test]
    fn a_single_timestamp_is_one_window() {
        let windows = TimeWindows::new(at(5), at(5), 3, 1_000);
        let (from, to) = windows.next_window().unwrap();
        assert_eq!((from, to), (at(5), at(6)));
    }

    #[test]
    fn extending_covers_rows_that_arrived_later() {
        let mut windows = TimeWindows::new(at(0), at(10), 10, 100);
        let (_, to) = windows.next_window().unwrap();
        windows.done(to, 10);
        assert_eq!(windows.next_window(), None);
        windows.extend_to(at(20));
        assert_eq!(windows.next_window().map(|(from, _)| from), Some(at(11)));
    }
}
