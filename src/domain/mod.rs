//! The business rules of txnflow, as plain functions with no I/O.
//!
//! Every record that enters the pipeline, from Kafka or from a CSV file, goes
//! through these rules: [`event::decode_event`] or [`csv_rules::CsvLayout`]
//! turn bytes into a [`validation::RawTransaction`], [`validation::validate`]
//! turns that into a [`transaction::Transaction`] with its canonical
//! [`identity`], and [`prediction::check_answer`] decides which items of an ML
//! API answer can be trusted. The actors only move these values around.

pub mod amount;
pub mod backfill_scan;
pub mod backoff;
pub mod categories;
pub mod concurrency;
pub mod csv_rules;
pub mod dead_letter;
pub mod event;
pub mod identity;
pub mod offsets;
pub mod origin;
pub mod prediction;
pub mod progress;
pub mod rates;
pub mod redaction;
pub mod repeats;
pub mod retry;
pub mod rollout;
pub mod run_progress;
pub mod schema_event;
pub mod time_windows;
pub mod timestamp;
pub mod trace_context;
pub mod transaction;
pub mod validation;
pub mod version_labels;
pub mod wire_format;
