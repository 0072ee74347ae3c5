//! Prometheus metrics. One registry for the process; every
//! family has help text and the `txnflow_` prefix.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    /// Records by source (`kafka` | `file`) and outcome (`written`,
    /// `predicted`, `dead_lettered`, `invalid`).
    pub records: IntCounterVec,
    pub buffer_depth: IntGauge,
    pub flush_size: HistogramVec,
    pub flush_duration: HistogramVec,
    pub ml_api_latency: HistogramVec,
    pub ml_api_batch_size: HistogramVec,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGauge,
    pub breaker_transitions: IntCounterVec,
    pub dlq_records: IntCounterVec,
    pub db_write_duration: HistogramVec,
    pub db_pool_connections: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub actor_restarts: IntCounterVec,
    pub in_flight: IntGauge,
    pub in_flight_bytes: IntGauge,
    /// ML API answers that mean txnflow is misconfigured (401, 403, 404).
    pub ml_api_config_errors: IntCounterVec,
    /// Stored transactions the backfill gave up predicting (`backfill.max_attempts`).
    pub backfill_refused: prometheus::IntCounter,
    /// Dead letters the DLQ topic refused for good, stored in `dead_letters`.
    pub dead_letters_stored: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: T) -> T {
    registry.register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        Metrics {
            records: register(
                r,
                IntCounterVec::new(
                    Opts::new("txnflow_records_total", "Records by source (kafka, file) and outcome (read, written, predicted, dead_lettered, invalid)."),
                    &["source", "outcome"],
                )
                .unwrap(),
            ),
            buffer_depth: register(r, IntGauge::new("txnflow_buffer_depth", "Records waiting in the Buffer for the next flush.").unwrap()),
            flush_size: register(
                r,
                HistogramVec::new(HistogramOpts::new("txnflow_flush_size", "Records per Buffer flush, by trigger (size, time, forced).").buckets(SIZE_BUCKETS.to_vec()), &["trigger"]).unwrap(),
            ),
            flush_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new("txnflow_flush_duration_seconds", "From a flush to its batch being durable (predicted and written).").buckets(SECONDS_BUCKETS.to_vec()),
                    &["trigger"],
                )
                .unwrap(),
            ),
            ml_api_latency: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new("txnflow_ml_api_latency_seconds", "Latency of one ML API request, by outcome (ok, retriable, rejected).").buckets(SECONDS_BUCKETS.to_vec()),
                    &["outcome"],
                )
                .unwrap(),
            ),
            ml_api_batch_size: register(
                r,
                HistogramVec::new(HistogramOpts::new("txnflow_ml_api_batch_size", "Transactions per ML API request.").buckets(SIZE_BUCKETS.to_vec()), &["caller"]).unwrap(),
            ),
            breaker_state: register(r, IntGauge::new("txnflow_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.").unwrap()),
            breaker_transitions: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_circuit_breaker_transitions_total", "Circuit breaker transitions, by the state entered."), &["to"]).unwrap(),
            ),
            dlq_records: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_dlq_records_total", "Records acknowledged by the DLQ topic, by error_type."), &["error_type"]).unwrap(),
            ),
            db_write_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new("txnflow_db_write_duration_seconds", "One database transaction of a flush, by outcome (ok, retry, data_error).").buckets(SECONDS_BUCKETS.to_vec()),
                    &["outcome"],
                )
                .unwrap(),
            ),
            db_pool_connections: register(
                r,
                IntGaugeVec::new(Opts::new("txnflow_db_pool_connections", "Database pool connections by state (idle, in_use)."), &["state"]).unwrap(),
            ),
            consumer_lag: register(
                r,
                IntGaugeVec::new(Opts::new("txnflow_consumer_lag", "Records not yet committed, per input partition."), &["topic", "partition"]).unwrap(),
            ),
            actor_restarts: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_actor_restarts_total", "Actor restarts by supervisor or watchdog, per actor."), &["actor"]).unwrap(),
            ),
            in_flight: register(r, IntGauge::new("txnflow_in_flight_records", "Records read and not yet durable (the bounded capacity in use).").unwrap()),
            in_flight_bytes: register(r, IntGauge::new("txnflow_in_flight_bytes", "Bytes held by the records in flight (bounded by buffer.capacity_bytes).").unwrap()),
            ml_api_config_errors: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_ml_api_config_errors_total", "ML API answers that mean txnflow is misconfigured (401, 403, 404: check predict.url and its credentials), by status."), &["status"]).unwrap(),
            ),
            dead_letters_stored: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_dead_letters_stored_total", "Dead letters the DLQ topic refused for good (too large, not authorised, no such topic), stored in the dead_letters table instead, by error_type."), &["error_type"]).unwrap(),
            ),
            backfill_refused: register(
                r,
                prometheus::IntCounter::new("txnflow_backfill_refused_total", "Stored transactions the backfill stopped predicting after backfill.max_attempts (see the refused_predictions view).").unwrap(),
            ),
            registry,
        }
    }

    /// Creates the series of every known label value at zero, so that each
    /// family is visible in `/metrics` before its first event.
    fn with_known_series(self) -> Metrics {
        for source in ["kafka", "file"] {
            for outcome in ["read", "written", "predicted", "dead_lettered", "invalid"] {
                self.records.with_label_values(&[source, outcome]);
            }
        }
        for trigger in ["size", "time", "forced"] {
            self.flush_size.with_label_values(&[trigger]);
            self.flush_duration.with_label_values(&[trigger]);
        }
        for outcome in ["ok", "retriable", "rejected", "misconfigured"] {
            self.ml_api_latency.with_label_values(&[outcome]);
        }
        for status in ["401", "403", "404"] {
            self.ml_api_config_errors.with_label_values(&[status]);
        }
        for caller in ["pipeline", "backfill"] {
            self.ml_api_batch_size.with_label_values(&[caller]);
        }
        for state in ["closed", "half_open", "open"] {
            self.breaker_transitions.with_label_values(&[state]);
        }
        for error_type in ["invalid", "prediction_failed", "persist_failed"] {
            self.dlq_records.with_label_values(&[error_type]);
            self.dead_letters_stored.with_label_values(&[error_type]);
        }
        for outcome in ["ok", "retry", "data_error"] {
            self.db_write_duration.with_label_values(&[outcome]);
        }
        for state in ["idle", "in_use"] {
            self.db_pool_connections.with_label_values(&[state]);
        }
        self
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new().with_known_series());
