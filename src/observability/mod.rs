//! What txnflow tells its operators: Prometheus metrics, trace spans and
//! their OTLP export, and the log format.

pub mod log_format;
pub mod metrics;
pub mod progress;
pub mod recent;
pub mod spans;
pub mod telemetry;
