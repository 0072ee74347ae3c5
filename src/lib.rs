//! txnflow: classifies financial transactions from a Kafka stream or CSV
//! files, with an ML prediction API, into PostgreSQL, losing nothing.
//!
//! - [`domain`]: the business rules, pure functions with no I/O.
//! - [`config`]: layered configuration.
//! - [`db`], [`kafka`], [`s3`], [`schema_registry`]: adapters to the outside world.
//! - [`ml_api`]: the reference prediction server and its fault knobs.
//! - [`produce`]: the simulated producers.
//! - [`service`], [`admin`], [`metrics`], [`ml_client`], [`breaker`],
//!   [`log_format`]: the streaming service around the actors.
//! - [`actors`]: the supervised actix pipeline (`actors/` at the crate root).

pub mod admin;
pub mod backoff;
pub mod batch;
pub mod batch_command;
pub mod breaker;
pub mod check;
pub mod config;
pub mod db;
pub mod dlq_replay;
pub mod domain;
pub mod kafka;
pub mod log_format;
pub mod metrics;
pub mod ml_api;
pub mod ml_client;
pub mod models_command;
pub mod produce;
pub mod repredict;
pub mod s3;
pub mod schema_registry;
pub mod service;
pub mod spans;
pub mod telemetry;

#[path = "../actors/mod.rs"]
pub mod actors;

/// `txnflow/<version>`, as the DLQ's `service` header and logs name us.
pub const SERVICE: &str = concat!("txnflow/", env!("CARGO_PKG_VERSION"));
