//! The Kafka event: a transaction as JSON, keyed by id.
//!
//! [`decode_event`] never panics, whatever the bytes: that is checked by the
//! property tests below and by the fuzz targets.

use serde::Serialize;
use std::fmt;

use super::transaction::{Transaction, format_timestamp};
use super::validation::{RawField, RawTransaction, ValidationError, validate};

/// Where a record was rejected, as the DLQ's `stage` header says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectStage {
    /// The bytes are not a JSON object (or the CSV line is not a row).
    Decode,
    /// The fields break a validation rule.
    Validate,
}

impl RejectStage {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectStage::Decode => "decode",
            RejectStage::Validate => "validate",
        }
    }
}

/// Why an input record cannot become a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub stage: RejectStage,
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RecordError {}

impl From<ValidationError> for RecordError {
    fn from(error: ValidationError) -> Self {
        RecordError { stage: RejectStage::Validate, message: error.to_string() }
    }
}

fn raw_field(value: Option<serde_json::Value>) -> RawField {
    use serde_json::Value;
    match value {
        None => RawField::Missing,
        Some(Value::Null) => RawField::Null,
        Some(Value::String(text)) => RawField::Text(text),
        Some(Value::Number(number)) => RawField::Number(number),
        Some(Value::Bool(flag)) => RawField::Bool(flag),
        Some(Value::Array(_) | Value::Object(_)) => RawField::Composite,
    }
}

/// Decodes an event's bytes into its raw fields. Unknown keys are ignored,
/// so producers can add fields without breaking txnflow.
pub fn decode_event(bytes: &[u8]) -> Result<RawTransaction, RecordError> {
    let decode_error = |message: String| RecordError { stage: RejectStage::Decode, message };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| decode_error(format!("malformed JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(decode_error("expected a JSON object".to_string()));
    };
    Ok(RawTransaction::from_fields(|key| raw_field(object.remove(key))))
}

/// Decodes and validates one event.
pub fn parse_event(bytes: &[u8]) -> Result<Transaction, RecordError> {
    Ok(validate(&decode_event(bytes)?)?)
}

/// The valid transactions and the rejected records of a batch, by position.
#[derive(Debug, Default)]
pub struct BatchSplit {
    pub valid: Vec<Transaction>,
    pub invalid: Vec<(usize, RecordError)>,
}

/// Parses every event of a batch; the order of each list follows the input.
pub fn split_batch<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> BatchSplit {
    let mut split = BatchSplit::default();
    for (position, bytes) in events.into_iter().enumerate() {
        match parse_event(bytes) {
            Ok(transaction) => split.valid.push(transaction),
            Err(error) => split.invalid.push((position, error)),
        }
    }
    split
}

/// The JSON value of an event, as producers write it.
#[derive(Debug, Clone, Serialize)]
pub struct TransactionEvent<'a> {
    pub id: &'a str,
    pub description: &'a str,
    /// A JSON number; f64 carries every 2-decimal amount below 10^10 exactly
    /// enough to round-trip through its shortest decimal text.
    pub amount: f64,
    pub timestamp: String,
    pub merchant: Option<&'a str>,
    pub operation_type: &'a str,
    pub side: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<&'a str>,
}

impl<'a> TransactionEvent<'a> {
    /// The event of a row loaded by batch run `run_id` from the file
    /// `batch_id`: what `batch --via-kafka` publishes, and a CSV row's DLQ
    /// value, which `dlq replay` can send through the pipeline again (a
    /// decimal comma would not decode).
    pub fn of_batch_row(transaction: &'a Transaction, id: &'a str, run_id: &'a str, batch_id: &'a str) -> Self {
        TransactionEvent {
            processing_type: Some(crate::domain::transaction::ProcessingType::Batch.as_str()),
            run_id: Some(run_id),
            batch_id: Some(batch_id),
            ..TransactionEvent::of(transaction, id)
        }
    }

    /// The event of a validated transaction, with `id` as its source id.
    pub fn of(transaction: &'a Transaction, id: &'a str) -> Self {
        TransactionEvent {
            id,
            description: &transaction.description,
            amount: transaction.amount.cents() as f64 / 100.0,
            timestamp: format_timestamp(&transaction.timestamp),
            merchant: transaction.merchant.as_deref(),
            operation_type: &transaction.operation_type,
            side: transaction.side.as_str(),
            processing_type: transaction.processing_type.map(|kind| kind.as_str()),
            run_id: transaction.run_id.as_deref(),
            batch_id: transaction.batch_id.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = r#"{"id":"b9fa6684-502b-4695-8f92-247432ba610d","description":"Purchase at Fnac","amount":-42.5,
        "timestamp":"2026-01-11T10:00:00","merchant":null,"operation_type":"payment","side":"debit","extra":[1,2]}"#;

    #[test]
    fn a_valid_event_parses_and_ignores_unknown_keys() {
        let transaction = parse_event(VALID.as_bytes()).unwrap();
        assert_eq!(transaction.amount.cents(), -4250);
        assert_eq!(transaction.merchant, None);
    }

    #[test]
    fn malformed_bytes_fail_at_decode() {
        for bad in [&b"{not json"[..], b"", b"[1,2]", b"\"text\"", b"null", &[0xff, 0xfe, 0x00]] {
            let error = parse_event(bad).unwrap_err();
            assert_eq!(error.stage, RejectStage::Decode, "{bad:?}: {error}");
        }
    }

    #[test]
    fn rule_breaks_fail_at_validate_and_name_the_field() {
        let error = parse_event(br#"{"id":"1","description":"x","amount":"12,5","timestamp":"2026-01-11","operation_type":"p","side":"debit"}"#)
            .unwrap_err();
        assert_eq!(error.stage, RejectStage::Validate);
        assert!(error.message.starts_with("amount: not a number: \"12,5\"; timestamp:"), "{}", error.message);
    }

    #[test]
    fn mixed_batches_split_by_position() {
        let events: Vec<&[u8]> = vec![VALID.as_bytes(), b"garbage", VALID.as_bytes(), br#"{"id":"2"}"#];
        let split = split_batch(events);
        assert_eq!(split.valid.len(), 2);
        assert_eq!(split.invalid.iter().map(|(position, _)| *position).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(split.invalid[0].1.stage, RejectStage::Decode);
        assert_eq!(split.invalid[1].1.stage, RejectStage::Validate);
    }

    #[test]
    fn empty_input_gives_empty_output() {
        let split = split_batch(Vec::<&[u8]>::new());
        assert!(split.valid.is_empty() && split.invalid.is_empty());
    }

    #[test]
    fn an_event_round_trips() {
        let transaction = parse_event(VALID.as_bytes()).unwrap();
        let id = transaction.id.to_string();
        let bytes = serde_json::to_vec(&TransactionEvent::of(&transaction, &id)).unwrap();
        assert_eq!(parse_event(&bytes).unwrap(), transaction);
    }

    fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            "-?[0-9]{0,12}[.,]?[0-9]{0,4}".prop_map(Value::String),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:?[0-9]{2})?"
                .prop_map(Value::String),
        ];
        let keys = prop_oneof![
            Just("id".to_string()),
            Just("description".to_string()),
            Just("amount".to_string()),
            Just("timestamp".to_string()),
            Just("merchant".to_string()),
            Just("operation_type".to_string()),
            Just("side".to_string()),
            Just("processing_type".to_string()),
            Just("run_id".to_string()),
            "[a-z]{1,8}",
        ];
        leaf.prop_recursive(3, 32, 10, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys.clone(), inner, 0..10)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_event(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(value in arbitrary_json()) {
            let bytes = serde_json::to_vec(&value).unwrap();
            if let Ok(transaction) = parse_event(&bytes) {
                // What passes must satisfy the validation rules and survive a round trip.
                prop_assert!(transaction.amount.cents().unsigned_abs() < 1_000_000_000_000);
                prop_assert!(!transaction.description.trim().is_empty());
                let id = transaction.id.to_string();
                let again = parse_event(&serde_json::to_vec(&TransactionEvent::of(&transaction, &id)).unwrap());
                prop_assert_eq!(again.ok(), Some(transaction));
            }
        }
    }
}
