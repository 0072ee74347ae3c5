//! The status page's figures from samples of counters: rates per second
//! between two readings, latency quantiles over the observations two
//! readings of a histogram's buckets apart, and the model version in use.

/// Events per second between two readings of a counter taken `seconds`
/// apart. A counter that went back (the process restarted) counts from 0.
pub fn per_second(before: u64, after: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    let events = if after >= before { after - before } else { after };
    events as f64 / seconds
}

/// The `q`-quantile (0 to 1) of what a histogram observed between two
/// readings of its cumulative bucket counts, interpolated within its
/// bucket as Prometheus' `histogram_quantile` does. `bounds` are the
/// buckets' upper bounds, the last one `+Inf`; a quantile that falls in
/// it is the highest finite bound. None when nothing was observed.
pub fn quantile(bounds: &[f64], before: &[u64], after: &[u64], q: f64) -> Option<f64> {
    if bounds.is_empty() || bounds.len() != before.len() || bounds.len() != after.len() {
        return None;
    }
    let counts: Vec<u64> = before.iter().zip(after).map(|(b, a)| a.saturating_sub(*b)).collect();
    let total = *counts.last()?;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let bucket = counts.iter().position(|count| *count as f64 >= rank)?;
    let upper = bounds[bucket];
    if upper.is_infinite() {
        return bounds.iter().rev().find(|bound| bound.is_finite()).copied();
    }
    let (lower, below) = if bucket == 0 { (0.0, 0) } else { (bounds[bucket - 1], counts[bucket - 1]) };
    let in_bucket = counts[bucket] - below;
    if in_bucket == 0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / in_bucket as f64)
}

/// The name whose count rose last over `readings` (oldest first, one map
/// of counts by name each), else the one with the most in the last: the
/// model version the pipeline uses now.
pub fn rose_last(readings: &[&std::collections::BTreeMap<String, u64>]) -> Option<String> {
    for pair in readings.windows(2).rev() {
        let (before, after) = (pair[0], pair[1]);
        if let Some((name, _)) = after.iter().find(|(name, count)| before.get(*name).copied().unwrap_or(0) < **count) {
            return Some(name.clone());
        }
    }
    readings.last()?.iter().max_by_key(|(_, count)| **count).map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
        pairs.iter().map(|(name, count)| (name.to_string(), *count)).collect()
    }

    #[test]
    fn the_version_in_use_is_the_one_that_rose_last() {
        let readings = [
            counts(&[("v1", 10)]),
            counts(&[("v1", 20), ("v2", 1)]),
            counts(&[("v1", 20), ("v2", 5)]),
            counts(&[("v1", 20), ("v2", 5)]),
        ];
        assert_eq!(rose_last(&readings.iter().collect::<Vec<_>>()).as_deref(), Some("v2"));
        let idle = [counts(&[("v1", 10), ("v2", 3)]), counts(&[("v1", 10), ("v2", 3)])];
        assert_eq!(
            rose_last(&idle.iter().collect::<Vec<_>>()).as_deref(),
            Some("v1"),
            "none rose: the one with the most"
        );
        assert_eq!(rose_last(&[]), None);
    }

    #[test]
    fn a_rate_is_events_over_seconds_and_a_restart_counts_from_zero() {
        assert_eq!(per_second(100, 300, 2.0), 100.0);
        assert_eq!(per_second(300, 300, 2.0), 0.0);
        assert_eq!(per_second(500, 40, 2.0), 20.0, "the counter restarted at 0");
        assert_eq!(per_second(0, 10, 0.0), 0.0, "no time passed");
    }

    #[test]
    fn a_quantile_is_interpolated_within_its_bucket() {
        let bounds = [0.01, 0.1, 1.0, f64::INFINITY];
        // 100 observations since the first reading: 50 under 10 ms, 40 under 100 ms, 10 under 1 s.
        let before = [5, 5, 5, 5];
        let after = [55, 95, 105, 105];
        assert_eq!(quantile(&bounds, &before, &after, 0.5), Some(0.01));
        assert!((quantile(&bounds, &before, &after, 0.7).unwrap() - 0.055).abs() < 1e-9);
        assert!((quantile(&bounds, &before, &after, 0.95).unwrap() - 0.55).abs() < 1e-9);
    }

    #[test]
    fn no_observation_gives_no_quantile_and_the_open_bucket_its_lower_bound() {
        let bounds = [0.01, 0.1, f64::INFINITY];
        assert_eq!(quantile(&bounds, &[3, 3, 3], &[3, 3, 3], 0.99), None);
        assert_eq!(quantile(&bounds, &[0, 0, 0], &[0, 0, 10], 0.99), Some(0.1), "all slower than the last bound");
        assert_eq!(quantile(&bounds, &[0, 0], &[0, 0, 1], 0.5), None, "readings of another shape");
    }
}
