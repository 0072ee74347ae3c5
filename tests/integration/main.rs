//! Integration tests against the real local stack (`make up`): PostgreSQL,
//! the Kafka-API broker, S3 and the reference ML API. One test binary for
//! every area keeps link time down.

mod batch;
mod broker_chaos;
mod chaos;
mod check;
mod cli;
mod db_write;
mod deploy;
mod docs;
mod faults;
mod helpers;
mod history_lookup;
mod hostile;
mod migrations;
mod ml_api;
mod mock_cluster;
mod otlp_receiver;
mod outage;
mod produce;
mod progress;
mod rollout;
mod scenario;
mod schemas;
mod security;
mod stack;
mod status_page;
mod streaming;
mod supervision;
mod tls;
mod tracing;
