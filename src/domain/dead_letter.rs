//! What a dead-lettered record says about itself: the DLQ
//! record's headers.

use super::origin::Origin;
use chrono::{DateTime, SecondsFormat, Utc};

/// The DLQ's `error_type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    Invalid,
    PredictionFailed,
    PersistFailed,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Invalid => "invalid",
            ErrorType::PredictionFailed => "prediction_failed",
            ErrorType::PersistFailed => "persist_failed",
        }
    }
}

/// The DLQ's `stage` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Validate,
    Predict,
    Persist,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Predict => "predict",
            Stage::Persist => "persist",
        }
    }
}

impl From<super::event::RejectStage> for Stage {
    fn from(stage: super::event::RejectStage) -> Self {
        match stage {
            super::event::RejectStage::Decode => Stage::Decode,
            super::event::RejectStage::Validate => Stage::Validate,
        }
    }
}

/// Why one record is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error_type: ErrorType,
    pub stage: Stage,
    pub message: String,
    pub attempts: u32,
}

/// The longest `error_message` header, in bytes: a reason, not a copy of the record.
pub const ERROR_MESSAGE_MAX_BYTES: usize = 1024;

/// `message` cut to at most `max` bytes, on a character boundary, with `…` when cut.
pub fn capped(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// A failure reason as it is stored or sent, wherever it came from (an
/// ML API's error body, a database or broker error): line breaks and
/// tabs become spaces, every other control character (NUL included,
/// which PostgreSQL text cannot hold) is removed, and the text is capped
/// at [`ERROR_MESSAGE_MAX_BYTES`].
pub fn sanitized_reason(message: &str) -> String {
    let cleaned: String = message
        .chars()
        .filter_map(|c| match c {
            '\n' | '\r' | '\t' => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect();
    capped(&cleaned, ERROR_MESSAGE_MAX_BYTES)
}

/// The headers of a DLQ record, in the order docs/operations.md documents them;
/// the record's `traceparent` last, when it came with one.
pub fn dlq_headers(
    failure: &Failure,
    origin: &Origin,
    run_id: Option<&str>,
    traceparent: Option<&str>,
    schema_id: Option<u32>,
    failed_at: DateTime<Utc>,
    service: &str,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("error_type", failure.error_type.as_str().to_string()),
        ("error_message", sanitized_reason(&failure.message)),
        ("stage", failure.stage.as_str().to_string()),
        ("failed_at", failed_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        ("attempts", failure.attempts.to_string()),
        ("source", origin.to_string()),
        ("run_id", run_id.unwrap_or_default().to_string()),
        ("service", service.to_string()),
    ];
    if let Some(schema_id) = schema_id {
        headers.push(("schema_id", schema_id.to_string()));
    }
    if let Some(traceparent) = traceparent {
        headers.push((crate::domain::trace_context::TRACEPARENT, traceparent.to_string()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn origins_print_as_the_source_header() {
        let kafka = Origin::Kafka { topic: "transactions".into(), partition: 2, offset: 41 };
        assert_eq!(kafka.to_string(), "transactions/2/41");
        let file = Origin::File { source_uri: "s3://transactions/in/a.csv".into(), line: 7 };
        assert_eq!(file.to_string(), "s3://transactions/in/a.csv:7");
    }

    #[test]
    fn error_messages_are_capped_on_a_character_boundary() {
        assert_eq!(capped("short", 1024), "short");
        assert_eq!(sanitized_reason("bad\0 body\n\tnext\u{7f}\u{1b}[31m"), "bad body  next[31m");
        let long = "é\0".repeat(2_000);
        let cut = sanitized_reason(&long);
        assert!(cut.len() <= ERROR_MESSAGE_MAX_BYTES && cut.ends_with('…') && !cut.contains('\0'), "{}", cut.len());
        let long = "é".repeat(2000);
        let cut = capped(&long, ERROR_MESSAGE_MAX_BYTES);
        assert!(cut.len() <= ERROR_MESSAGE_MAX_BYTES && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(cut.len(), 1023, "511 two-byte characters and the ellipsis");
    }

    #[test]
    fn headers_are_in_their_documented_order() {
        let failure = Failure {
            error_type: ErrorType::Invalid,
            stage: Stage::Validate,
            message: "amount: not a number: \"abc\"".into(),
            attempts: 1,
        };
        let origin = Origin::Kafka { topic: "t".into(), partition: 0, offset: 3 };
        let at = Utc.with_ymd_and_hms(2026, 11, 26, 10, 0, 0).unwrap();
        let headers = dlq_headers(&failure, &origin, Some("run-1"), None, None, at, "txnflow/0.1.0");
        assert_eq!(
            headers,
            [
                ("error_type", "invalid".to_string()),
                ("error_message", "amount: not a number: \"abc\"".to_string()),
                ("stage", "validate".to_string()),
                ("failed_at", "2026-11-26T10:00:00.000Z".to_string()),
                ("attempts", "1".to_string()),
                ("source", "t/0/3".to_string()),
                ("run_id", "run-1".to_string()),
                ("service", "txnflow/0.1.0".to_string()),
            ]
        );
    }
}
