//! Transaction identity.
//!
//! A source id that already is a UUID is kept as it is (lowercase,
//! hyphenated). Any other id, such as the seed CSV's `1`, `2`, … is mapped to
//! a name-based UUID (v5) so that the same source id always gives the same
//! transaction id, and replays or re-runs are idempotent in the database.

use uuid::Uuid;

/// `uuid5(NAMESPACE_URL, "txnflow/transaction")`, the namespace of derived ids.
pub const TRANSACTION_NAMESPACE: Uuid = Uuid::from_u128(0x87b68a8f_e40c_578d_ab34_85fbb8717d82);

/// The canonical id of a transaction whose source id is `source_id`.
///
/// Returns `None` when the trimmed id is empty: a record without an id cannot
/// be made idempotent, so it is invalid rather than given a random id.
pub fn canonical_id(source_id: &str) -> Option<Uuid> {
    let trimmed = source_id.trim();
    if trimmed.is_empty() {
        return None;
    }
    Some(Uuid::try_parse(trimmed).unwrap_or_else(|_| Uuid::new_v5(&TRANSACTION_NAMESPACE, trimmed.as_bytes())))
}

/// The canonical id of an id a user looks up (`models history`,
/// `GET /transactions/<id>/predictions`): a UUID as it is, a source id (the
/// seed's `1`, `2`, …) as the pipeline derives it. An id longer than a
/// record may carry (`validation::ID_MAX_CHARS`) names no stored transaction.
pub fn lookup_id(id: &str) -> Result<Uuid, String> {
    let max = super::validation::ID_MAX_CHARS;
    let chars = id.chars().count();
    if chars > max {
        return Err(format!("transaction id: longer than {max} characters ({chars})"));
    }
    canonical_id(id).ok_or_else(|| "transaction id is empty".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_uuid5_of_the_url_namespace() {
        assert_eq!(TRANSACTION_NAMESPACE, Uuid::new_v5(&Uuid::NAMESPACE_URL, b"txnflow/transaction"));
    }

    /// Values computed with CPython's `uuid.uuid5(ns, id)`.
    #[test]
    fn non_uuid_ids_map_to_python_uuid5_values() {
        let cases = [
            ("1", "e15d1546-4798-54fb-b2ff-35d10197b1b9"),
            ("2", "ba20d233-56d8-5d75-935d-510547a97fc6"),
            ("10000", "cf975780-197c-546a-a21b-8543593f4ce0"),
            ("abc", "68f28985-3125-508f-a8bf-d36d825a5296"),
            ("  42  ", "2fce01ec-a745-5b45-94fe-ae664923651b"),
            ("tx-ÉÉ", "00deb3f1-6ba5-5937-8cd8-28242e3323f2"),
        ];
        for (source, expected) in cases {
            assert_eq!(canonical_id(source).unwrap().to_string(), expected, "source id {source:?}");
        }
    }

    #[test]
    fn uuid_ids_are_kept_lowercased() {
        let id = canonical_id(" B9FA6684-502B-4695-8F92-247432BA610D ").unwrap();
        assert_eq!(id.to_string(), "b9fa6684-502b-4695-8f92-247432ba610d");
    }

    #[test]
    fn the_same_input_always_gives_the_same_id() {
        assert_eq!(canonical_id("tx-77"), canonical_id("tx-77"));
        assert_ne!(canonical_id("tx-77"), canonical_id("tx-78"));
    }

    #[test]
    fn an_empty_id_has_no_identity() {
        assert_eq!(canonical_id(""), None);
        assert_eq!(canonical_id("   "), None);
    }
}
