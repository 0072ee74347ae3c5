//! Validation: from loosely typed fields to a [`Transaction`].
//!
//! Both sources produce a [`RawTransaction`]: the JSON decoder keeps each
//! field's JSON kind, the CSV reader gives text. Validation reports every
//! failing field, each named, so that a DLQ reader can fix a record in one go.

use std::fmt;

use super::amount::{Amount, DecimalSeparator};
use super::identity::canonical_id;
use super::timestamp::parse_timestamp;
use super::transaction::{ProcessingType, Side, Transaction};

/// One field as it arrived, before any rule was applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RawField {
    #[default]
    Missing,
    Null,
    Text(String),
    Number(serde_json::Number),
    Bool(bool),
    /// A JSON array or object where a scalar was expected.
    Composite,
}

impl RawField {
    fn kind(&self) -> &'static str {
        match self {
            RawField::Missing => "missing",
            RawField::Null => "null",
            RawField::Text(_) => "text",
            RawField::Number(_) => "a number",
            RawField::Bool(_) => "a boolean",
            RawField::Composite => "an array or object",
        }
    }
}

/// A record's fields, by their event names, not yet validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTransaction {
    pub id: RawField,
    pub description: RawField,
    pub amount: RawField,
    pub timestamp: RawField,
    pub merchant: RawField,
    pub operation_type: RawField,
    pub side: RawField,
    pub processing_type: RawField,
    pub run_id: RawField,
    /// The batch a row came from (events published by `batch --via-kafka`).
    pub batch_id: RawField,
    /// CSV files may use a decimal comma; JSON text amounts may not.
    pub decimal_separator: DecimalSeparator,
}

impl Default for RawTransaction {
    fn default() -> Self {
        RawTransaction {
            id: RawField::Missing,
            description: RawField::Missing,
            amount: RawField::Missing,
            timestamp: RawField::Missing,
            merchant: RawField::Missing,
            operation_type: RawField::Missing,
            side: RawField::Missing,
            processing_type: RawField::Missing,
            run_id: RawField::Missing,
            batch_id: RawField::Missing,
            decimal_separator: DecimalSeparator::Dot,
        }
    }
}

impl RawTransaction {
    /// The event's field names, as every format names them.
    pub const FIELDS: [&'static str; 10] = [
        "id",
        "description",
        "amount",
        "timestamp",
        "merchant",
        "operation_type",
        "side",
        "processing_type",
        "run_id",
        "batch_id",
    ];

    /// A record's fields, each found by its name; amounts in decimal dots.
    pub fn from_fields(mut field: impl FnMut(&str) -> RawField) -> RawTransaction {
        let [id, description, amount, timestamp, merchant, operation_type, side, processing_type, run_id, batch_id] =
            Self::FIELDS.map(&mut field);
        RawTransaction {
            id,
            description,
            amount,
            timestamp,
            merchant,
            operation_type,
            side,
            processing_type,
            run_id,
            batch_id,
            decimal_separator: DecimalSeparator::Dot,
        }
    }
}

/// One rule broken by one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

/// Every rule a record broke. Displayed as `field: reason; field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub errors: Vec<FieldError>,
}

impl ValidationError {
    /// The names of the failing fields, in the event's field order.
    pub fn fields(&self) -> Vec<&'static str> {
        self.errors.iter().map(|e| e.field).collect()
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", error.field, error.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Maximum length of each text field, in characters. Every value within
/// them fits its column and its index (PostgreSQL refuses a btree entry
/// over about 2,700 bytes; 255 characters of 4 bytes stay well under).
pub const ID_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 1000;
/// The seed's VARCHAR(255).
pub const MERCHANT_MAX_CHARS: usize = 255;
/// The seed's VARCHAR(50).
pub const OPERATION_TYPE_MAX_CHARS: usize = 50;
/// As `txnflow batch --run-id` takes it.
pub const RUN_ID_MAX_CHARS: usize = 200;
/// A batch's uri.
pub const BATCH_ID_MAX_CHARS: usize = 2048;
/// Amounts, timestamps, sides and processing types are short; a longer
/// value is refused before it is parsed or repeated in a reason.
const SCALAR_MAX_CHARS: usize = 64;

/// PostgreSQL text cannot hold U+0000, so such a record could never be stored.
const NUL_REASON: &str = "contains a NUL character";

/// Collects field errors while each field is checked.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail<T>(&mut self, field: &'static str, reason: impl Into<String>) -> Option<T> {
        self.errors.push(FieldError { field, reason: reason.into() });
        None
    }

    /// Text content of a required field; numbers are accepted as their text
    /// (a JSON id `1` is the same source id as the CSV's `1`).
    fn required_text<'a>(
        &mut self,
        field: &'static str,
        raw: &'a RawField,
        max_chars: usize,
    ) -> Option<std::borrow::Cow<'a, str>> {
        match raw {
            RawField::Text(text) if too_long(text, max_chars) => self.too_long(field, text, max_chars),
            RawField::Text(text) if text.contains('\0') => self.fail(field, NUL_REASON),
            RawField::Text(text) if !text.trim().is_empty() => Some(std::borrow::Cow::Borrowed(text)),
            RawField::Text(_) => self.fail(field, "empty"),
            RawField::Number(number) => Some(std::borrow::Cow::Owned(number.to_string())),
            RawField::Missing | RawField::Null => self.fail(field, "missing"),
            other => self.fail(field, format!("expected text, got {}", other.kind())),
        }
    }

    /// Says how long the value is, never what it holds.
    fn too_long<T>(&mut self, field: &'static str, text: &str, max_chars: usize) -> Option<T> {
        self.fail(field, format!("longer than {max_chars} characters ({})", text.chars().count()))
    }

    fn optional_text(&mut self, field: &'static str, raw: &RawField, max_chars: usize) -> Option<Option<String>> {
        match raw {
            RawField::Missing | RawField::Null => Some(None),
            RawField::Text(text) if too_long(text, max_chars) => self.too_long(field, text, max_chars),
            RawField::Text(text) if text.contains('\0') => self.fail(field, NUL_REASON),
            RawField::Text(text) => Some(Some(text.clone())),
            other => self.fail(field, format!("expected text or null, got {}", other.kind())),
        }
    }
}

/// Whether `text` has more than `max_chars` characters, counted no further than needed.
fn too_long(text: &str, max_chars: usize) -> bool {
    text.len() > max_chars && text.chars().nth(max_chars).is_some()
}

/// Applies the validation rules to one record.
pub fn validate(raw: &RawTransaction) -> Result<Transaction, ValidationError> {
    let mut check = Checker { errors: Vec::new() };

    let id = check.required_text("id", &raw.id, ID_MAX_CHARS).and_then(|text| match canonical_id(&text) {
        Some(id) => Some(id),
        None => check.fail("id", "empty"),
    });
    let description =
        check.required_text("description", &raw.description, DESCRIPTION_MAX_CHARS).map(|text| text.into_owned());
    let amount = match &raw.amount {
        RawField::Text(text) if too_long(text, SCALAR_MAX_CHARS) => {
            Err(format!("longer than {SCALAR_MAX_CHARS} characters ({})", text.chars().count()))
        }
        RawField::Number(number) => Amount::from_json_number(number).map_err(|e| e.to_string()),
        RawField::Text(text) => Amount::parse(text, raw.decimal_separator).map_err(|e| e.to_string()),
        RawField::Missing | RawField::Null => Err("missing".to_string()),
        other => Err(format!("expected a number, got {}", other.kind())),
    }
    .map_or_else(|reason| check.fail("amount", reason), Some);
    let timestamp = match &raw.timestamp {
        RawField::Text(text) if too_long(text, SCALAR_MAX_CHARS) => check.too_long("timestamp", text, SCALAR_MAX_CHARS),
        RawField::Text(text) if !text.trim().is_empty() => match parse_timestamp(text) {
            Ok(timestamp) => Some(timestamp),
            Err(reason) => check.fail("timestamp", reason),
        },
        RawField::Text(_) | RawField::Missing | RawField::Null => check.fail("timestamp", "missing"),
        other => check.fail("timestamp", format!("expected an ISO-8601 text, got {}", other.kind())),
    };
    let merchant = check.optional_text("merchant", &raw.merchant, MERCHANT_MAX_CHARS);
    let operation_type =
        check.required_text("operation_type", &raw.operation_type, OPERATION_TYPE_MAX_CHARS).map(|t| t.into_owned());
    let side = check.required_text("side", &raw.side, SCALAR_MAX_CHARS).and_then(|text| match Side::parse(&text) {
        Some(side) => Some(side),
        None => check.fail("side", format!("expected \"debit\" or \"credit\", got {text:?}")),
    });
    let processing_type =
        check.optional_text("processing_type", &raw.processing_type, SCALAR_MAX_CHARS).and_then(|text| match text {
            None => Some(None),
            Some(text) => match ProcessingType::parse(&text) {
                Some(kind) => Some(Some(kind)),
                None => check.fail("processing_type", format!("expected \"streaming\" or \"batch\", got {text:?}")),
            },
        });
    let run_id = check.optional_text("run_id", &raw.run_id, RUN_ID_MAX_CHARS);
    let batch_id = check.optional_text("batch_id", &raw.batch_id, BATCH_ID_MAX_CHARS);

    match (id, description, amount, timestamp, merchant, operation_type, side, processing_type, run_id, batch_id) {
        (
            Some(id),
            Some(description),
            Some(amount),
            Some(timestamp),
            Some(merchant),
            Some(operation_type),
            Some(side),
            Some(processing_type),
            Some(run_id),
            Some(batch_id),
        ) if check.errors.is_empty() => Ok(Transaction {
            id,
            description,
            amount,
            timestamp,
            merchant,
            operation_type,
            side,
            processing_type,
            run_id: run_id.filter(|run| !run.is_empty()),
            batch_id: batch_id.filter(|batch| !batch.is_empty()),
        }),
        _ => Err(ValidationError { errors: check.errors }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn text(value: &str) -> RawField {
        RawField::Text(value.to_string())
    }

    fn valid_raw() -> RawTransaction {
        RawTransaction {
            id: text("b9fa6684-502b-4695-8f92-247432ba610d"),
            description: text("Card expense at EDF"),
            amount: RawField::Number(serde_json::Number::from_f64(-952.4).unwrap()),
            timestamp: text("2023-11-28 06:35:12"),
            merchant: text("EDF"),
            operation_type: text("payment"),
            side: text("DEBIT"),
            ..RawTransaction::default()
        }
    }

    #[test]
    fn a_valid_record_keeps_its_fields() {
        let transaction = validate(&valid_raw()).unwrap();
        assert_eq!(transaction.id.to_string(), "b9fa6684-502b-4695-8f92-247432ba610d");
        assert_eq!(transaction.description, "Card expense at EDF");
        assert_eq!(transaction.amount.cents(), -95240);
        assert_eq!(transaction.timestamp, Utc.with_ymd_and_hms(2023, 11, 28, 6, 35, 12).unwrap());
        assert_eq!(transaction.merchant.as_deref(), Some("EDF"));
        assert_eq!(transaction.operation_type, "payment");
        assert_eq!(transaction.side, Side::Debit);
        assert_eq!(transaction.processing_type, None);
        assert_eq!(transaction.run_id, None);
    }

    fn rejected_fields(raw: RawTransaction) -> Vec<&'static str> {
        validate(&raw).unwrap_err().fields()
    }

    #[test]
    fn each_missing_required_field_is_named() {
        assert_eq!(rejected_fields(RawTransaction { description: RawField::Missing, ..valid_raw() }), ["description"]);
        assert_eq!(rejected_fields(RawTransaction { description: text("  "), ..valid_raw() }), ["description"]);
        assert_eq!(rejected_fields(RawTransaction { amount: RawField::Missing, ..valid_raw() }), ["amount"]);
        assert_eq!(rejected_fields(RawTransaction { amount: RawField::Null, ..valid_raw() }), ["amount"]);
        assert_eq!(rejected_fields(RawTransaction { timestamp: RawField::Missing, ..valid_raw() }), ["timestamp"]);
        assert_eq!(rejected_fields(RawTransaction { id: RawField::Missing, ..valid_raw() }), ["id"]);
        assert_eq!(rejected_fields(RawTransaction { side: RawField::Missing, ..valid_raw() }), ["side"]);
        assert_eq!(rejected_fields(RawTransaction { operation_type: text(""), ..valid_raw() }), ["operation_type"]);
    }

    #[test]
    fn a_non_numeric_amount_is_rejected_with_its_value() {
        let error = validate(&RawTransaction { amount: text("abc"), ..valid_raw() }).unwrap_err();
        assert_eq!(error.to_string(), "amount: not a number: \"abc\"");
        assert_eq!(rejected_fields(RawTransaction { amount: RawField::Bool(true), ..valid_raw() }), ["amount"]);
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let raw = RawTransaction { amount: text("x"), side: text("sideways"), timestamp: text("soon"), ..valid_raw() };
        let error = validate(&raw).unwrap_err();
        assert_eq!(error.fields(), ["amount", "timestamp", "side"]);
        assert!(error.to_string().contains("side: expected \"debit\" or \"credit\", got \"sideways\""), "{error}");
    }

    #[test]
    fn merchant_may_be_missing_null_or_empty() {
        assert_eq!(validate(&RawTransaction { merchant: RawField::Missing, ..valid_raw() }).unwrap().merchant, None);
        assert_eq!(validate(&RawTransaction { merchant: RawField::Null, ..valid_raw() }).unwrap().merchant, None);
        assert_eq!(
            validate(&RawTransaction { merchant: text(""), ..valid_raw() }).unwrap().merchant.as_deref(),
            Some("")
        );
        assert_eq!(rejected_fields(RawTransaction { merchant: RawField::Composite, ..valid_raw() }), ["merchant"]);
    }

    #[test]
    fn operation_type_is_limited_to_50_characters() {
        let fifty = "é".repeat(50);
        assert!(validate(&RawTransaction { operation_type: text(&fifty), ..valid_raw() }).is_ok());
        let fifty_one = "é".repeat(51);
        assert_eq!(
            rejected_fields(RawTransaction { operation_type: text(&fifty_one), ..valid_raw() }),
            ["operation_type"]
        );
    }

    #[test]
    fn every_text_field_has_a_bound_and_the_reason_gives_lengths_only() {
        let at_bound = RawTransaction {
            id: text(&"i".repeat(ID_MAX_CHARS)),
            description: text(&"é".repeat(DESCRIPTION_MAX_CHARS)),
            merchant: text(&"m".repeat(MERCHANT_MAX_CHARS)),
            run_id: text(&"r".repeat(RUN_ID_MAX_CHARS)),
            batch_id: text(&"b".repeat(BATCH_ID_MAX_CHARS)),
            ..valid_raw()
        };
        assert!(validate(&at_bound).is_ok());
        let over = RawTransaction {
            id: text(&"i".repeat(ID_MAX_CHARS + 1)),
            description: text(&"x".repeat(600_000)),
            merchant: text(&"m".repeat(MERCHANT_MAX_CHARS + 1)),
            run_id: text(&"r".repeat(9_000)),
            batch_id: text(&"b".repeat(BATCH_ID_MAX_CHARS + 1)),
            amount: text(&"1".repeat(100)),
            timestamp: text(&"2".repeat(100)),
            side: text(&"d".repeat(100)),
            processing_type: text(&"p".repeat(100)),
            ..valid_raw()
        };
        let error = validate(&over).unwrap_err();
        assert_eq!(
            error.fields(),
            ["id", "description", "amount", "timestamp", "merchant", "side", "processing_type", "run_id", "batch_id"]
        );
        assert!(error.to_string().contains("description: longer than 1000 characters (600000)"), "{error}");
        assert!(error.to_string().contains("run_id: longer than 200 characters (9000)"), "{error}");
        assert!(error.to_string().len() < 1024, "the reason names lengths, not values");
    }

    #[test]
    fn text_with_a_nul_character_is_rejected() {
        assert_eq!(
            rejected_fields(RawTransaction { description: text("a\0b"), merchant: text("\0"), ..valid_raw() }),
            ["description", "merchant"]
        );
    }

    #[test]
    fn side_is_case_insensitive_and_stored_lowercase() {
        assert_eq!(
            validate(&RawTransaction { side: text(" Credit "), ..valid_raw() }).unwrap().side.as_str(),
            "credit"
        );
    }

    #[test]
    fn a_numeric_id_is_the_same_source_id_as_its_text() {
        let from_number = validate(&RawTransaction { id: RawField::Number(1.into()), ..valid_raw() }).unwrap();
        let from_text = validate(&RawTransaction { id: text("1"), ..valid_raw() }).unwrap();
        assert_eq!(from_number.id, from_text.id);
        assert_eq!(from_text.id.to_string(), "e15d1546-4798-54fb-b2ff-35d10197b1b9");
    }

    #[test]
    fn lineage_fields_are_optional_and_checked() {
        let raw = RawTransaction { processing_type: text("batch"), run_id: text("run-7"), ..valid_raw() };
        let transaction = validate(&raw).unwrap();
        assert_eq!(transaction.processing_type, Some(ProcessingType::Batch));
        assert_eq!(transaction.run_id.as_deref(), Some("run-7"));
        assert_eq!(
            rejected_fields(RawTransaction { processing_type: text("nightly"), ..valid_raw() }),
            ["processing_type"]
        );
    }
}
