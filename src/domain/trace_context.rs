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
