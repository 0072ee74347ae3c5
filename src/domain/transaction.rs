//! The validated transaction, as it is predicted and stored.

use chrono::{DateTime, SecondsFormat, Utc};
use std::fmt;
use uuid::Uuid;

use super::amount::Amount;

/// `debit` or `credit`, stored lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Debit,
    Credit,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Debit => "debit",
            Side::Credit => "credit",
        }
    }

    /// Case-insensitive, surrounding blanks ignored.
    pub fn parse(text: &str) -> Option<Side> {
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("debit") {
            Some(Side::Debit)
        } else if trimmed.eq_ignore_ascii_case("credit") {
            Some(Side::Credit)
        } else {
            None
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a transaction entered txnflow (lineage column `processing_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessingType {
    Streaming,
    Batch,
}

impl ProcessingType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessingType::Streaming => "streaming",
            ProcessingType::Batch => "batch",
        }
    }

    pub fn parse(text: &str) -> Option<ProcessingType> {
        match text.trim().to_ascii_lowercase().as_str() {
            "streaming" => Some(ProcessingType::Streaming),
            "batch" => Some(ProcessingType::Batch),
            _ => None,
        }
    }
}

/// A transaction that passed every validation rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// The canonical id (see [`super::identity`]).
    pub id: Uuid,
    pub description: String,
    pub amount: Amount,
    pub timestamp: DateTime<Utc>,
    pub merchant: Option<String>,
    pub operation_type: String,
    pub side: Side,
    /// Set when the event itself carries it (for example rows published by
    /// `batch --via-kafka`); otherwise the pipeline derives it from the origin.
    pub processing_type: Option<ProcessingType>,
    pub run_id: Option<String>,
    pub batch_id: Option<String>,
}

/// RFC 3339 in UTC with microseconds, the precision PostgreSQL keeps.
pub fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::Micros, true)
}
