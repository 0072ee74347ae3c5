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
pub fn valid_traceparent(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if text.len() < 55 || (text.len() > 55 && text.as_bytes()[55] != b'-') {
        return None;
    }
    let head = &text[..55];
    let mut parts = head.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = hex(version, 2) && hex(trace_id, 32) && hex(parent_id, 16) && hex(flags, 2);
    let meaningful = version != "ff" && trace_id.bytes().any(|b| b != b'0') && parent_id.bytes().any(|b| b != b'0');
    if !well_formed || !meaningful || (version == "00" && text.len() != 55) {
        return None;
    }
    Some(text.to_string())
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
    let valid = valid_traceparent(value.as_bytes())?;
    let flags = u8::from_str_radix(&valid[53..55], 16).ok()?;
    Some(TraceParent {
        trace_id: u128::from_str_radix(&valid[3..35], 16).ok()?,
        parent_id: u64::from_str_radix(&valid[36..52], 16).ok()?,
        sampled: flags & 1 == 1,
    })
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
        assert_eq!(valid_traceparent(later.as_bytes()).as_deref(), Some(later));
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
