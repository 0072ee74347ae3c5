//! W3C Trace Context: the `traceparent` header a record may carry, kept
//! with the record so that its DLQ copy (and a replay of it) stays in the
//! producer's trace.

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// `value` if it is a well-formed `traceparent`: `version-traceid-parentid-flags`
/// in lowercase hex, a trace id and a parent id not all zeros, version `ff`
/// refused; a later version may carry more fields after a `-`. Anything
/// else is dropped, as the specification asks, and the record goes on
/// without one.
///
/// What is kept is at most [`TRACEPARENT_BYTES`]: a later version's extra
/// fields are dropped (the specification reads only the first four), so
/// a header of any size costs the record 55 bytes.
pub fn valid_traceparent(value: &[u8]) -> Option<String> {
    let (fields, rest) = value.split_at_checked(TRACEPARENT_BYTES)?;
    let fields = std::str::from_utf8(fields).ok()?;
    // Version 00 has exactly four fields; a later one may go on after a `-`.
    let rest_ok = rest.is_empty() || (!fields.starts_with("00-") && rest[0] == b'-');
    (rest_ok && well_formed(fields)).then(|| fields.to_string())
}

/// The bytes of a `traceparent` txnflow keeps: version, trace id, parent
/// id and flags, with their dashes.
pub const TRACEPARENT_BYTES: usize = 55;

/// Whether `text` is the four fields of a `traceparent`, as
/// [`valid_traceparent`] keeps them.
fn well_formed(text: &str) -> bool {
    let hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if text.len() != TRACEPARENT_BYTES {
        return false;
    }
    let mut parts = text.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex_fields = hex(version, 2) && hex(trace_id, 32) && hex(parent_id, 16) && hex(flags, 2);
    let meaningful = version != "ff" && trace_id.bytes().any(|b| b != b'0') && parent_id.bytes().any(|b| b != b'0');
    hex_fields && meaningful
}

/// What a well-formed `traceparent` says: the trace, the producer's span,
/// and whether the producer sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub sampled: bool,
}

/// The ids and the sampled flag of a `traceparent` that
/// [`valid_traceparent`] kept.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let valid = well_formed(value).then_some(value)?;
    let flags = u8::from_str_radix(&valid[53..55], 16).ok()?;
    Some(TraceParent {
        trace_id: u128::from_str_radix(&valid[3..35], 16).ok()?,
        parent_id: u64::from_str_radix(&valid[36..52], 16).ok()?,
        sampled: flags & 1 == 1,
    })
}

/// Whether a trace is sampled at `ratio`, from its id alone: OpenTelemetry's
/// `TraceIdRatioBased` rule (the id's lower 64 bits, shifted right by one,
/// under `ratio × 2⁶³`). Every span of a trace, and every process with the
/// same ratio, gets the same answer.
pub fn sampled_at(ratio: f64, trace_id: u128) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

/// The `tracestate` header's name.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` kept: the specification lets a vendor drop
/// one longer than 512 characters.
pub const MAX_TRACESTATE: usize = 512;

/// `value` if it can be a `tracestate`: printable ASCII, at most
/// [`MAX_TRACESTATE`] bytes. Its list syntax is checked where it is used.
pub fn valid_tracestate(value: &[u8]) -> Option<String> {
    let printable = value.iter().all(|b| (0x20..0x7f).contains(b));
    (printable && !value.is_empty() && value.len() <= MAX_TRACESTATE)
        .then(|| String::from_utf8(value.to_vec()).expect("ASCII"))
}

/// A new sampled `traceparent` with these ids (a zero id, which the
/// format forbids, becomes 1).
pub fn new_traceparent(trace_id: u128, parent_id: u64) -> String {
    format!("00-{:032x}-{:016x}-01", trace_id.max(1), parent_id.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_well_formed_traceparent_is_kept_as_it_came() {
        assert_eq!(valid_traceparent(VALID.as_bytes()).as_deref(), Some(VALID));
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert_eq!(valid_traceparent(later.as_bytes()).as_deref(), Some(&later[..55]), "its first four fields");
        let huge = format!("{}-{}", &later[..55], "x".repeat(900_000));
        assert_eq!(valid_traceparent(huge.as_bytes()).as_deref(), Some(&later[..55]), "55 bytes of 900 KB");
        let glued = format!("{}x", &later[..55]);
        assert_eq!(valid_traceparent(glued.as_bytes()), None, "a later field must follow a dash");
        let long_00 = format!("{VALID}-extra");
        assert_eq!(valid_traceparent(long_00.as_bytes()), None, "version 00 has exactly four fields");
    }

    #[test]
    fn a_new_traceparent_is_well_formed_even_from_zero_ids() {
        for (trace_id, parent_id) in [(0, 0), (1, 2), (u128::MAX, u64::MAX)] {
            let traceparent = new_traceparent(trace_id, parent_id);
            assert_eq!(valid_traceparent(traceparent.as_bytes()), Some(traceparent));
        }
    }

    #[test]
    fn a_kept_traceparent_gives_its_ids_and_flag() {
        let parsed = parse_traceparent(VALID).unwrap();
        assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parsed.parent_id, 0x00f067aa0ba902b7);
        assert!(parsed.sampled);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!parse_traceparent(&unsampled).unwrap().sampled);
        assert_eq!(parse_traceparent("00-zz"), None);
    }

    #[test]
    fn the_ratio_rule_depends_on_the_trace_ids_lower_bits_only() {
        assert!(sampled_at(1.0, u128::MAX) && !sampled_at(0.0, 0));
        assert!(sampled_at(0.1, 7 << 64), "lower bits zero: under any positive bound");
        assert!(!sampled_at(0.1, u64::MAX as u128), "lower bits all ones: over any bound below 1");
        let ids = (0..10_000u64).map(|n| u128::from(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let sampled = ids.filter(|id| sampled_at(0.25, *id)).count();
        assert!((2_300..=2_700).contains(&sampled), "{sampled} of 10,000 at 0.25");
    }

    #[test]
    fn a_tracestate_is_kept_only_printable_and_bounded() {
        assert_eq!(valid_tracestate(b"congo=t61rcWkgMzE").as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(valid_tracestate(b""), None);
        assert_eq!(valid_tracestate(&[b'a', b'=', 0x01]), None);
        assert_eq!(valid_tracestate(&vec![b'a'; MAX_TRACESTATE + 1]), None);
    }

    #[test]
    fn anything_else_is_dropped() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(valid_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(valid_traceparent(&[0xff, 0xfe, 0x00]), None);
    }
}
