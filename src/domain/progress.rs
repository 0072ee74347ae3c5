//! How far a long run is, and when it should end: the percent done and
//! the time left, from its counts and the time it has been working.

/// A run's progress, as its progress line and its status answer give it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Done out of the total, rounded down to a tenth: 100 only once every
    /// item is done.
    pub percent: f64,
    /// Seconds left at the rate so far; unknown (`None`) before anything
    /// is done, 0 once everything is.
    pub eta_seconds: Option<f64>,
}

/// `done` of `total`, `done_now` of them in the last `seconds` (those
/// done by earlier attempts of a resumed run do not count for the rate).
pub fn estimate(done: u64, total: u64, done_now: u64, seconds: f64) -> Estimate {
    if done >= total {
        return Estimate { percent: 100.0, eta_seconds: Some(0.0) };
    }
    let percent = (1000 * done / total) as f64 / 10.0;
    let eta_seconds =
        (done_now > 0 && seconds > 0.0).then(|| ((total - done) as f64 * seconds / done_now as f64).round());
    Estimate { percent, eta_seconds }
}

impl Estimate {
    /// "42.5%, about 1 min 20 s left" (or "time left unknown").
    pub fn describe(&self) -> String {
        let left = match self.eta_seconds {
            None => "time left unknown".to_string(),
            Some(seconds) if seconds < 60.0 => format!("about {seconds:.0} s left"),
            Some(seconds) => {
                let seconds = seconds as u64;
                if seconds < 3600 {
                    format!("about {} min {} s left", seconds / 60, seconds % 60)
                } else {
                    format!("about {} h {} min left", seconds / 3600, seconds % 3600 / 60)
                }
            }
        };
        format!("{:.1}%, {left}", self.percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percent_is_rounded_down_and_reaches_100_only_at_the_end() {
        assert_eq!(estimate(0, 1000, 0, 0.0), Estimate { percent: 0.0, eta_seconds: None });
        assert_eq!(estimate(999, 1000, 999, 9.99).percent, 99.9);
        assert_eq!(estimate(1, 3, 1, 1.0).percent, 33.3);
        assert_eq!(estimate(2, 3, 2, 1.0).percent, 66.6);
        assert_eq!(estimate(1000, 1000, 1000, 10.0), Estimate { percent: 100.0, eta_seconds: Some(0.0) });
        // An empty selection is done from the start.
        assert_eq!(estimate(0, 0, 0, 0.0), Estimate { percent: 100.0, eta_seconds: Some(0.0) });
    }

    #[test]
    fn the_time_left_follows_this_attempts_rate() {
        // 250 of 1,000 in 5 s: 750 more at 50 a second.
        assert_eq!(estimate(250, 1000, 250, 5.0).eta_seconds, Some(15.0));
        // Resumed at 500: the 100 done in the last 10 s set the rate.
        assert_eq!(estimate(600, 1000, 100, 10.0).eta_seconds, Some(40.0));
        // Nothing done yet in this attempt: unknown.
        assert_eq!(estimate(500, 1000, 0, 10.0).eta_seconds, None);
    }

    #[test]
    fn it_reads_as_a_person_would_say_it() {
        assert_eq!(estimate(250, 1000, 250, 5.0).describe(), "25.0%, about 15 s left");
        assert_eq!(estimate(100, 1000, 100, 10.0).describe(), "10.0%, about 1 min 30 s left");
        assert_eq!(estimate(1, 1000, 1, 10.0).describe(), "0.1%, about 2 h 46 min left");
        assert_eq!(estimate(0, 1000, 0, 1.0).describe(), "0.0%, time left unknown");
    }
}
