//! Timestamps: RFC 3339 / ISO-8601, or `YYYY-MM-DD HH:MM:SS[.ffffff]`.
//! A value without a zone is read as UTC, as the seed system stored it.

use chrono::{DateTime, Datelike, NaiveDateTime, SubsecRound, Utc};

const ZONED_FORMATS: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"];
const NAIVE_FORMATS: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"];

/// Parses a transaction timestamp, or says why it is not one.
///
/// The result is truncated to microseconds, PostgreSQL's precision, so that
/// the value held in memory is the value stored. Years outside 1..=9999 are
/// refused: RFC 3339 cannot write them.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    let parsed = parse_any(text.trim()).ok_or_else(|| format!("not an ISO-8601 date-time: {text:?}"))?;
    if !(1..=9999).contains(&parsed.year()) {
        return Err(format!("year out of range 1..=9999: {text:?}"));
    }
    Ok(parsed.trunc_subsecs(6))
}

fn parse_any(trimmed: &str) -> Option<DateTime<Utc>> {
    if let Ok(zoned) = DateTime::parse_from_rfc3339(trimmed) {
        return Some(zoned.with_timezone(&Utc));
    }
    for format in ZONED_FORMATS {
        if let Ok(zoned) = DateTime::parse_from_str(trimmed, format) {
            return Some(zoned.with_timezone(&Utc));
        }
    }
    NAIVE_FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(trimmed, format).ok())
        .map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn the_three_seed_system_forms_parse_as_utc() {
        assert_eq!(parse_timestamp("2026-01-11T10:00:00"), Ok(utc(2026, 1, 11, 10, 0, 0)));
        assert_eq!(parse_timestamp("2026-01-11 10:00:00"), Ok(utc(2026, 1, 11, 10, 0, 0)));
        let with_micros = parse_timestamp("2026-01-11T10:00:00.123456").unwrap();
        assert_eq!(with_micros, utc(2026, 1, 11, 10, 0, 0) + chrono::Duration::microseconds(123_456));
    }

    #[test]
    fn zones_are_honoured() {
        assert_eq!(parse_timestamp("2026-01-11T10:00:00Z"), Ok(utc(2026, 1, 11, 10, 0, 0)));
        assert_eq!(parse_timestamp("2026-01-11T10:00:00+01:00"), Ok(utc(2026, 1, 11, 9, 0, 0)));
        assert_eq!(
            parse_timestamp("2026-01-11 10:00:00.5+0200"),
            Ok(utc(2026, 1, 11, 8, 0, 0) + chrono::Duration::milliseconds(500))
        );
    }

    #[test]
    fn precision_is_cut_to_microseconds() {
        let parsed = parse_timestamp("2026-01-11T10:00:00.123456789Z").unwrap();
        assert_eq!(parsed, utc(2026, 1, 11, 10, 0, 0) + chrono::Duration::microseconds(123_456));
    }

    #[test]
    fn other_text_is_rejected_with_the_value() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01 10:00:00",
            "2026-01-11",
            "1700000000",
            "2026-02-30T00:00:00",
            "0000-01-01T00:00:00Z",
        ] {
            let error = parse_timestamp(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}
