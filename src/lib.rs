//! txnflow: classifies financial transactions from a Kafka stream or CSV
//! files, with an ML prediction API, into PostgreSQL, losing nothing.

/// The supervised actix pipeline, one file per actor (`actors/`).
#[path = "../actors/mod.rs"]
pub mod actors;
/// Batch runs: input files, their rows, error files, the run registry, S3.
pub mod batch;
/// The commands besides the service: batch, check, dlq, models, produce.
pub mod cli;
/// Layered configuration: defaults, file, environment; checked at load.
pub mod config;
/// PostgreSQL: pool, migrations, flush writes, history, runs, dead letters.
pub mod db;
/// The business rules: pure functions with no I/O.
pub mod domain;
/// Kafka clients, topics, and the schema registry.
pub mod kafka;
/// The ML prediction API: client, circuit breaker, reference server.
pub mod ml;
/// Metrics, trace spans and their export, the log format.
pub mod observability;
/// `txnflow run`: the streaming service, its admin server and shutdown.
pub mod service;

/// `txnflow/<version>`, as the DLQ's `service` header and logs name us.
pub const SERVICE: &str = concat!("txnflow/", env!("CARGO_PKG_VERSION"));
