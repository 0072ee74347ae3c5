//! Retry policy of calls to the ML API and the database: exponential backoff
//! with full jitter, capped. Pure: the caller supplies the random draw.

use std::time::Duration;

/// The delay before retry number `attempt` (1 for the first retry):
/// `initial * 2^(attempt-1)`, capped at `max`, scaled by `jitter` in [0, 1]
/// drawn by the caller. Full jitter spreads retries of many clients apart.
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let ceiling = initial.saturating_mul(1u32 << exponent).min(max);
    // Never zero: a retry storm at full speed is what backoff is for avoiding.
    ceiling.mul_f64(jitter.clamp(0.0, 1.0)).max(Duration::from_millis(1).min(ceiling))
}

/// How an HTTP status from the ML API is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    /// 408, 429 and 5xx: the API may answer next time.
    Retriable,
    /// 401, 403 and 404: txnflow is not allowed in, or calls the wrong
    /// URL. No record is at fault, and none will do better until the
    /// configuration is fixed.
    Misconfigured,
    /// Any other 4xx: the request itself is refused; split it to find why.
    Rejected,
}

pub fn classify_status(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Success,
        408 | 429 | 500..=599 => StatusClass::Retriable,
        401 | 403 | 404 => StatusClass::Misconfigured,
        _ => StatusClass::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delays_double_up_to_the_cap() {
        assert_eq!(backoff_delay(1, MS(100), MS(5000), 1.0), MS(100));
        assert_eq!(backoff_delay(2, MS(100), MS(5000), 1.0), MS(200));
        assert_eq!(backoff_delay(4, MS(100), MS(5000), 1.0), MS(800));
        assert_eq!(backoff_delay(10, MS(100), MS(5000), 1.0), MS(5000));
        assert_eq!(backoff_delay(u32::MAX, MS(100), MS(5000), 1.0), MS(5000));
    }

    #[test]
    fn jitter_scales_the_delay_and_never_reaches_zero() {
        assert_eq!(backoff_delay(3, MS(100), MS(5000), 0.5), MS(200));
        assert_eq!(backoff_delay(3, MS(100), MS(5000), 0.0), MS(1));
        assert_eq!(backoff_delay(3, MS(100), MS(5000), 7.0), MS(400));
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status(200), StatusClass::Success);
        assert_eq!(classify_status(429), StatusClass::Retriable);
        assert_eq!(classify_status(503), StatusClass::Retriable);
        assert_eq!(classify_status(401), StatusClass::Misconfigured);
        assert_eq!(classify_status(403), StatusClass::Misconfigured);
        assert_eq!(classify_status(404), StatusClass::Misconfigured);
        assert_eq!(classify_status(408), StatusClass::Retriable);
        assert_eq!(classify_status(422), StatusClass::Rejected);
        assert_eq!(classify_status(400), StatusClass::Rejected);
    }
}
