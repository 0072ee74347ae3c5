//! Prometheus metrics. One registry for the process; every
//! family has help text and the `txnflow_` prefix.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    pub registry: Registry,
    /// The model versions named in `txnflow_predictions_total`, bounded.
    version_labels: std::sync::Mutex<crate::domain::version_labels::VersionLabels>,
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
    pub ml_api_concurrency_limit: IntGauge,
    pub breaker_transitions: IntCounterVec,
    pub dlq_records: IntCounterVec,
    pub db_write_duration: HistogramVec,
    pub db_pool_connections: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    /// The group's committed offset of each input partition this process holds.
    pub consumer_committed_offset: IntGaugeVec,
    pub actor_restarts: IntCounterVec,
    pub in_flight: IntGauge,
    pub in_flight_bytes: IntGauge,
    /// ML API answers that mean txnflow is misconfigured (401, 403, 404).
    pub ml_api_config_errors: IntCounterVec,
    /// Stored transactions the backfill gave up predicting (`backfill.max_attempts`).
    pub backfill_refused: prometheus::IntCounter,
    pub schema_registry_unavailable: prometheus::IntCounter,
    /// Scans of `transactions` for rows without a prediction, by why they ran.
    pub backfill_scans: IntCounterVec,
    /// Where the time goes, stage by stage (see [`Stage`]).
    pub stage_seconds: HistogramVec,
    /// Dead letters the DLQ topic refused for good, stored in `dead_letters`.
    pub dead_letters_stored: IntCounterVec,
    /// Predictions stored (current or history only), by model version and
    /// how they were made (`pipeline`, `backfill`, `repredict`, `shadow`).
    pub predictions: IntCounterVec,
    /// Transactions the re-prediction runs of this process have yet to do.
    pub repredict_backlog: IntGauge,
    /// Shadow scoring, per sampled flush: `scored`, `skipped` (no request
    /// slot free), `failed` (the shadow API did not answer usably).
    pub shadow_flushes: IntCounterVec,
    /// Records the shadow model scored, by whether it agrees with the
    /// live model's stored category (`agree`, `disagree`).
    pub shadow_agreement: IntCounterVec,
    /// Trace spans handed to the OTLP exporter, by outcome: `exported`,
    /// `dropped_queue_full` (the export queue was full), `dropped_export_failed`
    /// (the collector refused them, or did not answer in time).
    pub trace_spans: IntCounterVec,
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
            version_labels: Default::default(),
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
            ml_api_concurrency_limit: register(r, IntGauge::new("txnflow_ml_api_concurrency_limit", "ML API requests allowed in flight now: predict.concurrency, or less while the API is overloaded or slow (predict.adaptive_concurrency).").unwrap()),
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
            consumer_committed_offset: register(
                r,
                IntGaugeVec::new(Opts::new("txnflow_consumer_committed_offset", "The committed offset of each input partition held."), &["topic", "partition"]).unwrap(),
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
            schema_registry_unavailable: register(
                r,
                prometheus::IntCounter::new("txnflow_schema_registry_unavailable_total", "Schema fetches the registry did not answer (unreachable, 5xx, a timeout, refused credentials); reading waits meanwhile.").unwrap(),
            ),
            backfill_scans: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_backfill_scans_total", "Backfill scans of the transactions table for rows without a prediction, by reason (start, stored_unpredicted, unfinished, backlog_due, periodic)."), &["reason"]).unwrap(),
            ),
            predictions: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_predictions_total", "Predictions stored, by model_version and kind (pipeline, backfill, repredict, shadow); repredict and shadow ones go to prediction_history only."), &["model_version", "kind"]).unwrap(),
            ),
            repredict_backlog: register(r, IntGauge::new("txnflow_repredict_backlog", "Selected transactions the re-prediction runs of this process have not re-predicted or failed yet.").unwrap()),
            shadow_flushes: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_shadow_flushes_total", "Flushes sampled for the shadow model, by outcome: scored, skipped (predict.shadow_concurrency requests already in flight), failed."), &["outcome"]).unwrap(),
            ),
            shadow_agreement: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_shadow_agreement_total", "Records scored by the shadow model, by agreement with the live model's stored category: agree, disagree."), &["agreement"]).unwrap(),
            ),
            trace_spans: register(
                r,
                IntCounterVec::new(Opts::new("txnflow_trace_spans_total", "Trace spans sampled for OTLP export, by outcome: exported, dropped_queue_full (tracing.max_queue_spans reached), dropped_export_failed (the collector refused them or timed out)."), &["outcome"]).unwrap(),
            ),
            stage_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new("txnflow_stage_seconds", "Time spent per stage (read, buffer, ml_api, db_write, commit) and phase: wait (queued for the stage), work (the stage at work) or idle (the reader with nothing fetched). A phase's sum over a period, divided by the period, is how many were in it on average.").buckets(SECONDS_BUCKETS.to_vec()),
                    &["stage", "phase"],
                )
                .unwrap(),
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
        for outcome in ["scored", "skipped", "failed"] {
            self.shadow_flushes.with_label_values(&[outcome]);
        }
        for agreement in ["agree", "disagree"] {
            self.shadow_agreement.with_label_values(&[agreement]);
        }
        for outcome in ["exported", "dropped_queue_full", "dropped_export_failed"] {
            self.trace_spans.with_label_values(&[outcome]);
        }
        for caller in ["pipeline", "backfill", "repredict", "shadow"] {
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
        for (stage, phase) in Stage::ALL.iter().flat_map(|stage| stage.phases().iter().map(move |phase| (stage, phase)))
        {
            self.stage_seconds.with_label_values(&[stage.as_str(), phase.as_str()]);
        }
        self
    }

    /// Counts stored predictions by model version, as `kind`: at most
    /// [`MAX_NAMED_VERSIONS`](crate::domain::version_labels::MAX_NAMED_VERSIONS)
    /// versions by name (the current, the shadow's, the most recent). A
    /// version that gives its name up moves its counts to `other`, so the
    /// sum over the series stays the number of predictions stored.
    pub fn count_predictions<'a>(&self, versions: impl IntoIterator<Item = &'a str>, kind: &str) {
        use crate::domain::version_labels::{OTHER_VERSIONS, VersionRole};
        let role = match kind {
            "pipeline" | "backfill" => VersionRole::Current,
            "shadow" => VersionRole::Shadow,
            _ => VersionRole::Other,
        };
        let mut labels = self.version_labels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for version in versions {
            let labelled = labels.label(version, role);
            if let Some(retired) = labelled.retired {
                for kind in PREDICTION_KINDS {
                    if let Ok(series) = self.predictions.get_metric_with_label_values(&[&retired, kind]) {
                        let count = series.get();
                        let _ = self.predictions.remove_label_values(&[&retired, kind]);
                        if count > 0 {
                            self.predictions.with_label_values(&[OTHER_VERSIONS, kind]).inc_by(count);
                        }
                    }
                }
            }
            // Counted under the lock, one by one: a version retired later
            // in this call or by another thread must not be counted under
            // its name after its move.
            self.predictions.with_label_values(&[labelled.label, kind]).inc();
        }
    }

    /// Records with this outcome (`read`, `written`, …), from Kafka and files together.
    pub fn records_of(&self, outcome: &str) -> u64 {
        ["kafka", "file"].iter().map(|source| self.records.with_label_values(&[source, outcome]).get()).sum()
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

/// The `kind` labels of `txnflow_predictions_total`.
const PREDICTION_KINDS: [&str; 4] = ["pipeline", "backfill", "repredict", "shadow"];

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new().with_known_series());

/// The stages a record's time is counted in, as `txnflow_stage_seconds`
/// labels them. Each observation is one item's time in one phase: a read
/// pass, a record in the Buffer, an ML API request, a flush's write, a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The KafkaReader: `idle` waiting for a fetch with nothing in hand,
    /// `wait` held back by the capacity or the Buffer, `work` decoding.
    Read,
    /// A record in the Buffer, from its read to its flush: `wait` only.
    Buffer,
    /// One request: `wait` for a slot among `predict.concurrency`, `work`
    /// from the request to its last answer, retries included.
    MlApi,
    /// One flush: `wait` from its prediction to a database connection,
    /// `work` the write.
    DbWrite,
    /// One offset commit request: `work` only.
    Commit,
}

/// A phase of a [`Stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Wait,
    Work,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Wait => "wait",
            Phase::Work => "work",
        }
    }
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Read, Stage::Buffer, Stage::MlApi, Stage::DbWrite, Stage::Commit];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Buffer => "buffer",
            Stage::MlApi => "ml_api",
            Stage::DbWrite => "db_write",
            Stage::Commit => "commit",
        }
    }

    /// The phases this stage is observed in.
    pub fn phases(self) -> &'static [Phase] {
        match self {
            Stage::Read => &[Phase::Idle, Phase::Wait, Phase::Work],
            Stage::Buffer => &[Phase::Wait],
            Stage::MlApi | Stage::DbWrite => &[Phase::Wait, Phase::Work],
            Stage::Commit => &[Phase::Work],
        }
    }

    /// The histogram of one phase, to observe many items at once.
    pub fn histogram(self, phase: Phase) -> prometheus::Histogram {
        METRICS.stage_seconds.with_label_values(&[self.as_str(), phase.as_str()])
    }

    /// Counts one item's time in `phase`.
    pub fn observe(self, phase: Phase, time: std::time::Duration) {
        self.histogram(phase).observe(time.as_secs_f64());
    }
}

/// Counts the time from its making to its drop in one stage's phase,
/// whichever way the code it measures returns.
pub struct StageTimer {
    stage: Stage,
    phase: Phase,
    started: std::time::Instant,
}

impl StageTimer {
    pub fn start(stage: Stage, phase: Phase) -> StageTimer {
        StageTimer { stage, phase, started: std::time::Instant::now() }
    }
}

impl Drop for StageTimer {
    fn drop(&mut self) {
        self.stage.observe(self.phase, self.started.elapsed());
    }
}
