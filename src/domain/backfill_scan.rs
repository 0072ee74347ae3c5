//! When the backfill scans `transactions` for rows without a prediction.
//!
//! That scan is an anti-join over the whole table: about 12 s of three
//! PostgreSQL processes at 5,000,000 rows. Run on every tick, it took CPU
//! from the writes it runs beside. So each tick asks the cheap questions
//! first, and the scan runs only when one of them says there is work:
//!
//! - the process has just started (rows left by an earlier run);
//! - this process stored rows without a prediction since the last scan;
//! - the last scan stopped before it had seen everything (a database error,
//!   or a full round: more may be waiting);
//! - the backlog holds transactions whose next try is due (claimed by any
//!   replica, and not predicted yet);
//! - `backfill.full_scan_interval_ms` has passed since the last scan, for
//!   rows other writers stored (a replica that died, a manual insert).

use std::time::{Duration, Instant};

/// Why a tick scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanReason {
    Start,
    StoredUnpredicted,
    Unfinished,
    BacklogDue,
    Periodic,
}

impl ScanReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanReason::Start => "start",
            ScanReason::StoredUnpredicted => "stored_unpredicted",
            ScanReason::Unfinished => "unfinished",
            ScanReason::BacklogDue => "backlog_due",
            ScanReason::Periodic => "periodic",
        }
    }
}

/// The backfill's memory of its scans.
#[derive(Debug)]
pub struct ScanSchedule {
    full_scan_every: Duration,
    last_scan: Option<Instant>,
    unfinished: bool,
}

impl ScanSchedule {
    pub fn new(full_scan_every: Duration) -> ScanSchedule {
        ScanSchedule { full_scan_every, last_scan: None, unfinished: false }
    }

    /// The reason to scan now that needs no database, if there is one.
    /// `stored_unpredicted`: rows were stored without a prediction since
    /// the last scan began.
    pub fn due(&self, now: Instant, stored_unpredicted: bool) -> Option<ScanReason> {
        match self.last_scan {
            None => Some(ScanReason::Start),
            Some(_) if stored_unpredicted => Some(ScanReason::StoredUnpredicted),
            Some(_) if self.unfinished => Some(ScanReason::Unfinished),
            Some(last) if now.duration_since(last) >= self.full_scan_every => Some(ScanReason::Periodic),
            Some(_) => None,
        }
    }

    /// A scan begins now.
    pub fn scanning(&mut self, now: Instant) {
        self.last_scan = Some(now);
        self.unfinished = false;
    }

    /// The scan ended; `finished` is false when it stopped with rows it may
    /// not have seen (a database error, or a round that came back full).
    pub fn scanned(&mut self, finished: bool) {
        self.unfinished = !finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_first_tick_scans_and_a_quiet_one_after_it_does_not() {
        let t0 = Instant::now();
        let mut schedule = ScanSchedule::new(5 * MINUTE);
        assert_eq!(schedule.due(t0, false), Some(ScanReason::Start));
        schedule.scanning(t0);
        schedule.scanned(true);
        assert_eq!(schedule.due(t0 + Duration::from_secs(5), false), None);
        assert_eq!(schedule.due(t0 + 4 * MINUTE, false), None);
    }

    #[test]
    fn rows_stored_unpredicted_or_an_unfinished_scan_bring_the_next_scan_forward() {
        let t0 = Instant::now();
        let mut schedule = ScanSchedule::new(5 * MINUTE);
        schedule.scanning(t0);
        schedule.scanned(true);
        let soon = t0 + Duration::from_secs(5);
        assert_eq!(schedule.due(soon, true), Some(ScanReason::StoredUnpredicted));
        schedule.scanning(soon);
        schedule.scanned(false);
        assert_eq!(schedule.due(soon + Duration::from_secs(5), false), Some(ScanReason::Unfinished));
        schedule.scanning(soon + Duration::from_secs(5));
        schedule.scanned(true);
        assert_eq!(schedule.due(soon + Duration::from_secs(10), false), None);
    }

    #[test]
    fn with_nothing_known_a_scan_still_runs_once_per_interval() {
        let t0 = Instant::now();
        let mut schedule = ScanSchedule::new(5 * MINUTE);
        schedule.scanning(t0);
        schedule.scanned(true);
        assert_eq!(schedule.due(t0 + 5 * MINUTE, false), Some(ScanReason::Periodic));
        schedule.scanning(t0 + 5 * MINUTE);
        schedule.scanned(true);
        assert_eq!(schedule.due(t0 + 9 * MINUTE, false), None);
    }
}
