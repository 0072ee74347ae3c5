//! Configuration: `config/default.toml`, then `config/local.toml`,
//! then `--config FILE`, then `TXNFLOW__SECTION__KEY` environment variables.
//!
//! The defaults file is compiled in, so it is the single place where a key
//! and its default are written. An environment value is parsed with the type
//! of the key's default, so `TXNFLOW__KAFKA__BROKERS=a:1` stays text while
//! `TXNFLOW__BUFFER__MAX_RECORDS=x` is refused, naming the key.

use serde::Deserialize;
use std::net::SocketAddr;

mod load;
mod validate;

/// The compiled-in defaults: every key, with a comment.
pub const DEFAULTS_TOML: &str = include_str!("../../config/default.toml");
const ENV_PREFIX: &str = "TXNFLOW__";
const LOCAL_FILE: &str = "config/local.toml";

/// A configuration that cannot be used. `key` is the dotted path of the
/// culprit, or the path of a file that cannot be read as configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration {} `{key}`: {message}", if *.is_file { "file" } else { "key" })]
pub struct ConfigError {
    pub key: String,
    pub message: String,
    /// `key` names a file rather than a key.
    pub is_file: bool,
}

impl ConfigError {
    /// The message may quote the value refused: any password in it (a
    /// URL's user info, a `password=` parameter) is hidden.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: crate::domain::redaction::redact(&message.into()), is_file: false }
    }

    /// A file given as configuration that cannot be read or parsed.
    pub fn file(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { is_file: true, ..ConfigError::new(path, message) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub shutdown_timeout_ms: u64,
    pub kafka: KafkaConfig,
    pub buffer: BufferConfig,
    pub predict: PredictConfig,
    pub breaker: BreakerConfig,
    pub backfill: BackfillConfig,
    pub repredict: RepredictConfig,
    pub db: DbConfig,
    pub s3: S3Config,
    pub schema_registry: SchemaRegistryConfig,
    pub batch: BatchConfig,
    pub admin: AdminConfig,
    pub chaos: ChaosConfig,
    pub ml_api: MlApiConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub dlq_topic: String,
    pub predictions_topic: String,
    pub session_timeout_ms: u64,
    /// `classic` or `consumer` (KIP-848).
    pub group_protocol: GroupProtocol,
    pub partitions: i32,
    /// Replicas of each topic txnflow creates.
    pub replication_factor: i32,
    /// Create topics with one replica on a cluster of several brokers.
    pub allow_single_replica: bool,
    pub auto_offset_reset: String,
    /// A record larger than this is dead-lettered as invalid, unread.
    pub max_record_bytes: usize,
    /// How record values are read: `auto` reads the registry's framing
    /// when a record has it and plain JSON otherwise.
    pub value_format: ValueFormat,
    /// A record without the registry's framing is invalid (`no schema`).
    pub require_schema: bool,
    /// How `predictions_topic`'s records are written.
    pub predictions_format: PredictionsFormat,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER` (empty without SASL).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    /// A secret: never logged; `sasl_password_file` fills it at load time.
    pub sasl_password: String,
    pub sasl_password_file: String,
    /// PEM file of the CAs that sign the brokers' certificates (empty: the system's).
    pub ssl_ca_location: String,
    /// Client certificate and key (PEM), for brokers that authenticate clients by TLS.
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    /// A secret: never logged.
    pub ssl_key_password: String,
    /// Any other librdkafka setting, passed as it is (checked at start).
    #[serde(deserialize_with = "librdkafka_properties")]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// The librdkafka settings txnflow itself sets, which `[kafka.properties]`
/// may not change: what it commits, to which group and brokers, how it
/// produces, and the security settings, which have keys of their own.
pub const MANAGED_PROPERTIES: [&str; 15] = [
    "bootstrap.servers",
    "group.id",
    "group.protocol",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
];

/// `[kafka.properties]`: text, numbers and booleans, all passed as text.
fn librdkafka_properties<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    let table = std::collections::BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    table
        .into_iter()
        .map(|(key, value)| match value {
            toml::Value::String(text) => Ok((key, text)),
            toml::Value::Integer(n) => Ok((key, n.to_string())),
            toml::Value::Float(x) => Ok((key, x.to_string())),
            toml::Value::Boolean(b) => Ok((key, b.to_string())),
            _ => Err(serde::de::Error::custom(format!("{key}: expected text, a number or a boolean"))),
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    pub max_records: usize,
    pub max_wait_ms: u64,
    pub capacity: usize,
    pub capacity_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfig {
    pub url: String,
    pub batch_size: usize,
    pub concurrency: usize,
    pub adaptive_concurrency: bool,
    pub timeout_ms: u64,
    pub max_response_bytes: usize,
    pub max_retries: u32,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub default_model_version: String,
    pub categories: Vec<String>,
    pub backfill_interval_ms: u64,
    pub shadow_url: String,
    pub shadow_sample: f64,
    pub shadow_concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    pub failure_rate: f64,
    pub window: usize,
    pub half_open_probes: usize,
    pub open_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepredictConfig {
    pub url: String,
    pub max_share: f64,
    pub chunk_size: usize,
    pub max_unavailable_ms: u64,
    pub max_concurrent_runs: usize,
}

impl Config {
    /// The requests in flight a re-prediction may hold: `max_share` of
    /// `predict.concurrency`, at least one.
    pub fn repredict_requests(&self) -> usize {
        ((self.predict.concurrency as f64 * self.repredict.max_share).floor() as usize).max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    pub max_attempts: u32,
    pub full_scan_interval_ms: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    pub url: String,
    pub pool_size: u32,
    pub auto_migrate: bool,
    pub connect_timeout_ms: u64,
    pub write_method: WriteMethod,
}

/// How a flush's rows go into their tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMethod {
    /// Binary `COPY` straight into the tables; a flush it cannot take as a
    /// whole (a record stored before, a refused value) is rolled back and
    /// written again with `unnest`.
    Copy,
    /// `INSERT … SELECT FROM UNNEST(column arrays) ON CONFLICT`.
    Unnest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

pub use crate::domain::schema_event::ValueFormat;

/// The least `schema_registry.max_cached_schemas`: every schema of the
/// records the reader takes at once stays known while they are read.
pub const MIN_CACHED_SCHEMAS: usize = 1024;

/// How the predictions fan-out writes its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionsFormat {
    Json,
    /// Framed for the registry, with `schemas/prediction.avsc`.
    Avro,
}

/// A Confluent-compatible schema registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// The base of its Confluent API (empty: none).
    pub url: String,
    /// Basic authentication; the password is a secret, or `password_file`.
    pub username: String,
    pub password: String,
    pub password_file: String,
    /// A bearer token instead, a secret, or `token_file`.
    pub token: String,
    pub token_file: String,
    /// PEM file of the CAs that sign its certificate (empty: the system's).
    pub ca_file: String,
    pub timeout_ms: u64,
    /// Schemas kept in memory, at most; past it the oldest is fetched again
    /// when it is next needed.
    pub max_cached_schemas: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub heartbeat_ms: u64,
    pub stale_after_ms: u64,
    /// Buckets `POST /batches` may read; empty means `[s3.bucket]`.
    pub allowed_buckets: Vec<String>,
    /// Local directories `POST /batches` may read; empty means none.
    pub local_roots: Vec<String>,
    /// Runs at once in one process; more are refused (429).
    pub max_concurrent_runs: usize,
    /// A CSV row larger than this goes to the error file, unparsed.
    pub max_record_bytes: usize,
}

impl BatchConfig {
    /// The buckets `POST /batches` may read.
    pub fn buckets_allowed<'a>(&'a self, s3: &'a S3Config) -> Vec<&'a str> {
        if self.allowed_buckets.is_empty() {
            vec![s3.bucket.as_str()]
        } else {
            self.allowed_buckets.iter().map(String::as_str).collect()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token of every endpoint but /health, /ready and /metrics.
    /// Empty means none. `token_file` fills it at load time.
    pub token: String,
    pub token_file: String,
    pub allow_unauthenticated: bool,
}

impl AdminConfig {
    /// Refuses a listen address beyond loopback without a token, unless
    /// `allow_unauthenticated` says so. Checked by the commands that listen,
    /// not at load time: `txnflow batch` with the service's settings serves nothing.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && self.token.is_empty() && !self.allow_unauthenticated {
            return Err(ConfigError::new(
                "admin.token",
                format!(
                    "admin.listen {} is not a loopback address, so a token is required: set admin.token or \
                     admin.token_file (or admin.allow_unauthenticated = true to accept anyone who can reach it)",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlApiConfig {
    pub listen: SocketAddr,
    /// The fault knobs it starts with.
    pub faults: MlApiFaults,
}

/// The reference ML API's fault knobs (`[ml_api.faults]`, `POST /faults`). Rates are shares in [0, 1], drawn per request (per item
/// for `drop_rate`).
/// `MlApiFaults::default()` is a well-behaved server.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlApiFaults {
    pub error_rate: f64,
    pub latency_ms: u64,
    pub malformed_rate: f64,
    pub drop_rate: f64,
    /// Answer `confidence_score` and `model_version` too.
    pub extended: bool,
    /// When not empty, any item whose description contains it makes the
    /// whole request fail with `marker_status`: a poison record.
    pub poison_marker: String,
    /// The status of a request holding a poison record: 422 (the seed
    /// server's validation error), or e.g. 500 or 401 to test those paths.
    pub marker_status: u16,
    /// The body of that answer, as text (empty: a JSON `detail`).
    pub marker_body: String,
    /// How much later a request holding a poison record is answered: past
    /// the client's timeout, the record is one that times out.
    pub marker_latency_ms: u64,
    /// Share of ids refused (422) on every request, chosen by id, so the
    /// same ids are refused every time (`reference_api::refuses`).
    pub refuse_rate: f64,
    /// The model version answered with `extended` (empty: the reference one).
    pub model_version: String,
    /// Requests the model works on at once (0: no limit). The others wait
    /// their turn, in arrival order, as on a model server with a fixed pool
    /// of workers; with `latency_ms` each turn lasts that long.
    pub max_concurrent: u32,
    /// Another model: the category index becomes `(hash(id) + shift) mod 15`
    /// ([`shifted_category`](crate::domain::categories::shifted_category)); 0 is the seed's answer.
    pub shift: u64,
    /// Answer every request 200 with a body that never ends: a hostile
    /// server, for the client's bound on answers.
    pub endless_body: bool,
}

impl Default for MlApiFaults {
    fn default() -> MlApiFaults {
        MlApiFaults {
            error_rate: 0.0,
            latency_ms: 0,
            malformed_rate: 0.0,
            drop_rate: 0.0,
            extended: false,
            poison_marker: String::new(),
            marker_status: 422,
            marker_body: String::new(),
            marker_latency_ms: 0,
            refuse_rate: 0.0,
            model_version: String::new(),
            max_concurrent: 0,
            shift: 0,
            endless_body: false,
        }
    }
}

/// OpenTelemetry traces over OTLP; off while `otlp_endpoint` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL (`http://host:4318/v1/traces`).
    pub otlp_endpoint: String,
    /// `http/protobuf`, the only one built in.
    pub protocol: String,
    /// The share of traces exported, decided by trace id for every trace
    /// (a record's sampled `traceparent` included); a `traceparent` that
    /// says "not sampled" is never exported.
    pub sample_ratio: f64,
    /// `service.name`; `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
    /// Ended spans waiting for export at most; more are dropped and counted.
    pub max_queue_spans: usize,
    /// Spans per export request at most.
    pub max_export_batch: usize,
    /// How long one export may take before its spans count as dropped.
    pub export_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// The consumer group protocol the reader speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol: the client-side assignor, an eager rebalance,
    /// and the session timeout of `kafka.session_timeout_ms`.
    Classic,
    /// KIP-848's protocol (Kafka 4): the broker assigns, a rebalance moves
    /// only the partitions that change owner, and the session timeout is
    /// the broker's `group.consumer.session.timeout.ms`.
    Consumer,
}

impl GroupProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// What the tests of loading and of validation share.
#[cfg(test)]
mod test_support {
    use super::{Config, ConfigError};
    use std::path::Path;

    pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub fn load_with(files: &[&Path], pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_layers(files.iter().copied(), env(pairs))
    }
}
