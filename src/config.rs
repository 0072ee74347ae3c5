//! Configuration: `config/default.toml`, then `config/local.toml`,
//! then `--config FILE`, then `TXNFLOW__SECTION__KEY` environment variables.
//!
//! The defaults file is compiled in, so it is the single place where a key
//! and its default are written. An environment value is parsed with the type
//! of the key's default, so `TXNFLOW__KAFKA__BROKERS=a:1` stays text while
//! `TXNFLOW__BUFFER__MAX_RECORDS=x` is refused, naming the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// The compiled-in defaults: every key, with a comment.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "TXNFLOW__";
const LOCAL_FILE: &str = "config/local.toml";

/// A configuration that cannot be used. `key` is the dotted path of the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// The message may quote the value refused: any password in it (a
    /// URL's user info, a `password=` parameter) is hidden.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: crate::db::redact(&message.into()) }
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
    pub faults: crate::ml_api::Faults,
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

impl Config {
    /// Loads the layers from the process environment and working directory.
    pub fn load(config_file: Option<&Path>) -> Result<Config, ConfigError> {
        let local = Path::new(LOCAL_FILE);
        let local = local.exists().then_some(local);
        Config::from_layers(local.into_iter().chain(config_file), std::env::vars())
    }

    /// Loads the defaults, then each file in order, then the environment.
    pub fn from_layers<'a>(
        files: impl IntoIterator<Item = &'a Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let defaults: toml::Table = DEFAULTS_TOML.parse().expect("config/default.toml is valid TOML");
        let mut merged = defaults.clone();
        for file in files {
            let name = file.display().to_string();
            let text =
                std::fs::read_to_string(file).map_err(|e| ConfigError::new(&name, format!("cannot read file: {e}")))?;
            let table: toml::Table =
                text.parse().map_err(|e| ConfigError::new(&name, format!("not valid TOML: {e}")))?;
            merge(&mut merged, table);
        }
        let mut overrides: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        overrides.sort();
        for (name, value) in overrides {
            apply_env(&defaults, &mut merged, &name, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|error| {
            let key = error.path().to_string();
            ConfigError::new(key, error.into_inner().to_string())
        })?;
        let mut config = config;
        config.read_secret_files()?;
        config.check()?;
        Ok(config)
    }

    /// Fills the secrets given as files (`*_file` keys), trimmed.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let kafka = &mut self.kafka;
        if !kafka.sasl_password_file.is_empty() {
            if !kafka.sasl_password.is_empty() {
                return Err(ConfigError::new(
                    "kafka.sasl_password_file",
                    "set kafka.sasl_password or kafka.sasl_password_file, not both",
                ));
            }
            let path = &kafka.sasl_password_file;
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("kafka.sasl_password_file", format!("cannot read {path}: {e}")))?;
            kafka.sasl_password = text.trim().to_string();
            if kafka.sasl_password.is_empty() {
                return Err(ConfigError::new("kafka.sasl_password_file", format!("{path} is empty")));
            }
        }
        let registry = &mut self.schema_registry;
        for (key, file, secret, other) in [
            (
                "schema_registry.password_file",
                &registry.password_file,
                &mut registry.password,
                "schema_registry.password",
            ),
            ("schema_registry.token_file", &registry.token_file, &mut registry.token, "schema_registry.token"),
        ] {
            if file.is_empty() {
                continue;
            }
            if !secret.is_empty() {
                return Err(ConfigError::new(key, format!("set {other} or {key}, not both")));
            }
            let text =
                std::fs::read_to_string(file).map_err(|e| ConfigError::new(key, format!("cannot read {file}: {e}")))?;
            *secret = text.trim().to_string();
            if secret.is_empty() {
                return Err(ConfigError::new(key, format!("{file} is empty")));
            }
        }
        let admin = &mut self.admin;
        if !admin.token_file.is_empty() {
            if !admin.token.is_empty() {
                return Err(ConfigError::new("admin.token_file", "set admin.token or admin.token_file, not both"));
            }
            // The error names the file, never its content.
            let text = std::fs::read_to_string(&admin.token_file)
                .map_err(|e| ConfigError::new("admin.token_file", format!("cannot read {}: {e}", admin.token_file)))?;
            admin.token = text.trim().to_string();
            if admin.token.is_empty() {
                return Err(ConfigError::new("admin.token_file", format!("{} is empty", admin.token_file)));
            }
        }
        Ok(())
    }

    /// Rules that types alone cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let positive = |key: &str, value: u64| {
            if value == 0 { Err(ConfigError::new(key, "must be greater than 0")) } else { Ok(()) }
        };
        let share = |key: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::new(key, format!("must be in [0, 1], got {value}")))
            }
        };
        let http_url = |key: &str, value: &str| {
            if value.starts_with("http://") || value.starts_with("https://") {
                Ok(())
            } else {
                Err(ConfigError::new(key, format!("must be an http:// or https:// URL, got {value:?}")))
            }
        };
        let non_empty = |key: &str, value: &str| {
            if value.trim().is_empty() { Err(ConfigError::new(key, "must not be empty")) } else { Ok(()) }
        };
        non_empty("kafka.brokers", &self.kafka.brokers)?;
        non_empty("kafka.topic", &self.kafka.topic)?;
        non_empty("kafka.group_id", &self.kafka.group_id)?;
        non_empty("kafka.dlq_topic", &self.kafka.dlq_topic)?;
        positive("kafka.session_timeout_ms", self.kafka.session_timeout_ms)?;
        positive("kafka.partitions", self.kafka.partitions.max(0) as u64)?;
        positive("kafka.replication_factor", self.kafka.replication_factor.max(0) as u64)?;
        if !matches!(self.kafka.auto_offset_reset.as_str(), "earliest" | "latest") {
            return Err(ConfigError::new("kafka.auto_offset_reset", "must be \"earliest\" or \"latest\""));
        }
        self.check_kafka_security()?;
        positive("buffer.max_records", self.buffer.max_records as u64)?;
        positive("buffer.max_wait_ms", self.buffer.max_wait_ms)?;
        if self.buffer.capacity < self.buffer.max_records {
            return Err(ConfigError::new("buffer.capacity", "must be at least buffer.max_records"));
        }
        // One record of either source must fit in the byte capacity, or it
        // could never be admitted.
        positive("kafka.max_record_bytes", self.kafka.max_record_bytes as u64)?;
        positive("batch.max_record_bytes", self.batch.max_record_bytes as u64)?;
        positive("batch.max_concurrent_runs", self.batch.max_concurrent_runs as u64)?;
        let largest = self.kafka.max_record_bytes.max(self.batch.max_record_bytes);
        if self.buffer.capacity_bytes < largest {
            return Err(ConfigError::new(
                "buffer.capacity_bytes",
                "must be at least kafka.max_record_bytes and batch.max_record_bytes",
            ));
        }
        if self.buffer.capacity_bytes > u32::MAX as usize {
            return Err(ConfigError::new("buffer.capacity_bytes", format!("must be at most {}", u32::MAX)));
        }
        http_url("predict.url", &self.predict.url)?;
        positive("predict.batch_size", self.predict.batch_size as u64)?;
        positive("predict.concurrency", self.predict.concurrency as u64)?;
        positive("predict.timeout_ms", self.predict.timeout_ms)?;
        let largest_answer = crate::domain::prediction::largest_valid_answer_bytes(self.predict.batch_size);
        if self.predict.max_response_bytes < largest_answer {
            return Err(ConfigError::new(
                "predict.max_response_bytes",
                format!(
                    "must be at least {largest_answer}, the largest valid answer to predict.batch_size ({}) items",
                    self.predict.batch_size
                ),
            ));
        }
        positive("predict.retry_initial_backoff_ms", self.predict.retry_initial_backoff_ms)?;
        positive("predict.backfill_interval_ms", self.predict.backfill_interval_ms)?;
        non_empty("predict.default_model_version", &self.predict.default_model_version)?;
        let longest = crate::domain::prediction::MODEL_VERSION_MAX_CHARS;
        if self.predict.default_model_version.chars().count() > longest {
            return Err(ConfigError::new("predict.default_model_version", format!("longer than {longest} characters")));
        }
        if let Some(category) = self.predict.categories.iter().find(|c| c.is_empty() || c.chars().count() > 100) {
            return Err(ConfigError::new(
                "predict.categories",
                format!("each category has 1 to 100 characters (the column), got {} characters", category.len()),
            ));
        }
        if self.predict.categories.is_empty() {
            return Err(ConfigError::new("predict.categories", "must name at least one category"));
        }
        if !self.predict.shadow_url.is_empty() {
            http_url("predict.shadow_url", &self.predict.shadow_url)?;
        }
        share("predict.shadow_sample", self.predict.shadow_sample)?;
        positive("predict.shadow_concurrency", self.predict.shadow_concurrency as u64)?;
        if !self.repredict.url.is_empty() {
            http_url("repredict.url", &self.repredict.url)?;
        }
        share("repredict.max_share", self.repredict.max_share)?;
        positive("repredict.chunk_size", self.repredict.chunk_size as u64)?;
        if self.repredict.chunk_size > 10_000 {
            return Err(ConfigError::new("repredict.chunk_size", "must be at most 10000"));
        }
        positive("repredict.max_unavailable_ms", self.repredict.max_unavailable_ms)?;
        positive("repredict.max_concurrent_runs", self.repredict.max_concurrent_runs as u64)?;
        share("breaker.failure_rate", self.breaker.failure_rate)?;
        positive("breaker.window", self.breaker.window as u64)?;
        positive("breaker.half_open_probes", self.breaker.half_open_probes as u64)?;
        positive("breaker.open_ms", self.breaker.open_ms)?;
        positive("backfill.max_attempts", u64::from(self.backfill.max_attempts))?;
        positive("backfill.initial_backoff_ms", self.backfill.initial_backoff_ms)?;
        positive("backfill.full_scan_interval_ms", self.backfill.full_scan_interval_ms)?;
        if self.backfill.max_backoff_ms < self.backfill.initial_backoff_ms {
            return Err(ConfigError::new("backfill.max_backoff_ms", "must be at least backfill.initial_backoff_ms"));
        }
        if !self.db.url.starts_with("postgres://") && !self.db.url.starts_with("postgresql://") {
            return Err(ConfigError::new("db.url", "must be a postgres:// URL"));
        }
        positive("db.pool_size", u64::from(self.db.pool_size))?;
        positive("db.connect_timeout_ms", self.db.connect_timeout_ms)?;
        http_url("s3.endpoint", &self.s3.endpoint)?;
        let registry = &self.schema_registry;
        if !registry.url.is_empty() {
            http_url("schema_registry.url", &registry.url)?;
        }
        if !registry.token.is_empty() && !registry.username.is_empty() {
            return Err(ConfigError::new(
                "schema_registry.token",
                "set schema_registry.username (basic authentication) or schema_registry.token, not both",
            ));
        }
        positive("schema_registry.timeout_ms", registry.timeout_ms)?;
        if registry.max_cached_schemas < MIN_CACHED_SCHEMAS {
            return Err(ConfigError::new(
                "schema_registry.max_cached_schemas",
                format!(
                    "must be at least {MIN_CACHED_SCHEMAS} (the records the reader takes at once), got {}",
                    registry.max_cached_schemas
                ),
            ));
        }
        if self.kafka.predictions_format == PredictionsFormat::Avro && registry.url.is_empty() {
            return Err(ConfigError::new("kafka.predictions_format", "avro needs schema_registry.url"));
        }
        if self.kafka.value_format == ValueFormat::Json && self.kafka.require_schema {
            return Err(ConfigError::new(
                "kafka.require_schema",
                "needs a kafka.value_format that reads the registry's framing (auto, avro, protobuf or json_schema)",
            ));
        }
        non_empty("s3.bucket", &self.s3.bucket)?;
        positive("batch.heartbeat_ms", self.batch.heartbeat_ms)?;
        if self.batch.stale_after_ms <= self.batch.heartbeat_ms {
            return Err(ConfigError::new("batch.stale_after_ms", "must be greater than batch.heartbeat_ms"));
        }
        if !self.admin.token.is_empty() && self.admin.token.chars().count() < 16 {
            return Err(ConfigError::new("admin.token", "must be at least 16 characters"));
        }
        if self.admin.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::new("admin.token", "must not contain spaces or control characters"));
        }
        for (index, root) in self.batch.local_roots.iter().enumerate() {
            if !Path::new(root).is_absolute() {
                return Err(ConfigError::new(
                    format!("batch.local_roots[{index}]"),
                    format!("must be an absolute path, got {root:?}"),
                ));
            }
        }
        let tracing = &self.tracing;
        if !tracing.otlp_endpoint.is_empty() {
            http_url("tracing.otlp_endpoint", &tracing.otlp_endpoint)?;
        }
        if tracing.protocol != "http/protobuf" {
            return Err(ConfigError::new(
                "tracing.protocol",
                format!("must be \"http/protobuf\", got {:?}", tracing.protocol),
            ));
        }
        share("tracing.sample_ratio", tracing.sample_ratio)?;
        non_empty("tracing.service_name", &tracing.service_name)?;
        positive("tracing.max_queue_spans", tracing.max_queue_spans as u64)?;
        positive("tracing.max_export_batch", tracing.max_export_batch as u64)?;
        positive("tracing.export_timeout_ms", tracing.export_timeout_ms)?;
        let faults = &self.ml_api.faults;
        share("ml_api.faults.error_rate", faults.error_rate)?;
        share("ml_api.faults.malformed_rate", faults.malformed_rate)?;
        share("ml_api.faults.drop_rate", faults.drop_rate)?;
        share("ml_api.faults.refuse_rate", faults.refuse_rate)?;
        Ok(())
    }
}

impl Config {
    /// The security keys agree with each other, and their files exist.
    fn check_kafka_security(&self) -> Result<(), ConfigError> {
        let kafka = &self.kafka;
        let protocol = kafka.security_protocol.as_str();
        if !matches!(protocol, "plaintext" | "ssl" | "sasl_plaintext" | "sasl_ssl") {
            return Err(ConfigError::new(
                "kafka.security_protocol",
                format!("must be plaintext, ssl, sasl_plaintext or sasl_ssl, got {protocol:?}"),
            ));
        }
        let sasl = protocol.starts_with("sasl_");
        let mechanism = kafka.sasl_mechanism.as_str();
        match (sasl, mechanism) {
            (false, "") => {}
            (false, _) => {
                return Err(ConfigError::new(
                    "kafka.sasl_mechanism",
                    "is set, but kafka.security_protocol is not sasl_plaintext or sasl_ssl",
                ));
            }
            (true, "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {
                if kafka.sasl_username.is_empty() || kafka.sasl_password.is_empty() {
                    return Err(ConfigError::new(
                        "kafka.sasl_username",
                        format!("{mechanism} needs kafka.sasl_username and kafka.sasl_password (or _file)"),
                    ));
                }
            }
            (true, "OAUTHBEARER") => {}
            (true, other) => {
                return Err(ConfigError::new(
                    "kafka.sasl_mechanism",
                    format!("must be PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER, got {other:?}"),
                ));
            }
        }
        if !sasl && (!kafka.sasl_username.is_empty() || !kafka.sasl_password.is_empty()) {
            return Err(ConfigError::new(
                "kafka.sasl_username",
                "a SASL user is set, but kafka.security_protocol is not sasl_plaintext or sasl_ssl",
            ));
        }
        let tls = protocol == "ssl" || protocol == "sasl_ssl";
        for (key, path) in [
            ("kafka.ssl_ca_location", &kafka.ssl_ca_location),
            ("kafka.ssl_certificate_location", &kafka.ssl_certificate_location),
            ("kafka.ssl_key_location", &kafka.ssl_key_location),
        ] {
            if path.is_empty() {
                continue;
            }
            if !tls {
                return Err(ConfigError::new(key, "is set, but kafka.security_protocol is not ssl or sasl_ssl"));
            }
            if let Err(error) = std::fs::metadata(path) {
                return Err(ConfigError::new(key, format!("cannot read {path}: {error}")));
            }
        }
        if kafka.ssl_certificate_location.is_empty() != kafka.ssl_key_location.is_empty() {
            return Err(ConfigError::new(
                "kafka.ssl_key_location",
                "a client certificate needs its key, and a key its certificate",
            ));
        }
        if let Some(key) = kafka.properties.keys().find(|key| MANAGED_PROPERTIES.contains(&key.as_str())) {
            return Err(ConfigError::new(
                format!("kafka.properties.{key}"),
                "is set by txnflow itself (see kafka.* and the README); it cannot be changed here",
            ));
        }
        Ok(())
    }
}

/// Deep-merges `overlay` into `base`: tables merge, any other value replaces.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `TXNFLOW__SECTION__KEY=value`, typed like the key's default.
fn apply_env(defaults: &toml::Table, merged: &mut toml::Table, name: &str, text: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
    let dotted = path.join(".");
    // `TXNFLOW__KAFKA__PROPERTIES__SOCKET_KEEPALIVE_ENABLE=true` sets
    // librdkafka's `socket.keepalive.enable`: its names use dots only.
    if let [section, properties, property] = path.as_slice()
        && section == "kafka"
        && properties == "properties"
    {
        let table = merged
            .get_mut("kafka")
            .and_then(toml::Value::as_table_mut)
            .and_then(|kafka| kafka.get_mut("properties"))
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| ConfigError::new(dotted.clone(), "kafka.properties is not a table"))?;
        table.insert(property.replace('_', "."), toml::Value::String(text.to_string()));
        return Ok(());
    }
    let unknown = || ConfigError::new(format!("{dotted} (from {name})"), "unknown key");
    let (leaf, sections) = path.split_last().ok_or_else(unknown)?;
    let mut default_table = defaults;
    let mut target = merged;
    for section in sections {
        default_table = default_table.get(section).and_then(toml::Value::as_table).ok_or_else(unknown)?;
        target = target.get_mut(section).and_then(toml::Value::as_table_mut).ok_or_else(unknown)?;
    }
    let default = default_table.get(leaf).ok_or_else(unknown)?;
    let bad = |expected: &str| {
        ConfigError::new(format!("{dotted} (from {name})"), format!("expected {expected}, got {text:?}"))
    };
    let value = match default {
        toml::Value::String(_) => toml::Value::String(text.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(text.trim().parse().map_err(|_| bad("an integer"))?),
        toml::Value::Float(_) => toml::Value::Float(text.trim().parse().map_err(|_| bad("a number"))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(text.trim().parse().map_err(|_| bad("true or false"))?),
        toml::Value::Array(_) => {
            // A TOML array (`["a", "b"]`) or a comma-separated list (`a,b`).
            match format!("v = {text}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")) {
                Some(array @ toml::Value::Array(_)) => array,
                _ => toml::Value::Array(
                    text.split(',').map(|item| toml::Value::String(item.trim().to_string())).collect(),
                ),
            }
        }
        toml::Value::Table(_) => {
            return Err(ConfigError::new(format!("{dotted} (from {name})"), "is a section, not a key"));
        }
        toml::Value::Datetime(_) => toml::Value::String(text.to_string()),
    };
    target.insert(leaf.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load_with(files: &[&Path], pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_layers(files.iter().copied(), env(pairs))
    }

    #[test]
    fn the_defaults_are_complete_and_valid() {
        let config = load_with(&[], &[]).unwrap();
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094");
        assert_eq!(config.kafka.group_id, "txnflow");
        assert_eq!(config.db.url, "postgres://txnflow:txnflow@127.0.0.1:5432/txnflow");
        assert_eq!(config.predict.categories.len(), 15);
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:8088");
    }

    #[test]
    fn environment_overrides_are_typed_by_the_default() {
        let config = load_with(
            &[],
            &[
                ("TXNFLOW__KAFKA__BROKERS", "k1:9092,k2:9092"),
                ("TXNFLOW__BUFFER__MAX_RECORDS", "42"),
                ("TXNFLOW__CHAOS__ENABLED", "true"),
                ("TXNFLOW__ML_API__FAULTS__ERROR_RATE", "0.25"),
                ("TXNFLOW__PREDICT__CATEGORIES", "Food, Rent"),
                ("TXNFLOW__SHUTDOWN_TIMEOUT_MS", "5"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(config.buffer.max_records, 42);
        assert!(config.chaos.enabled);
        assert_eq!(config.ml_api.faults.error_rate, 0.25);
        assert_eq!(config.predict.categories, ["Food", "Rent"]);
        assert_eq!(config.shutdown_timeout_ms, 5);
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let error = load_with(&[], &[("TXNFLOW__KAFKA__BROKER", "x")]).unwrap_err();
        assert_eq!(error.key, "kafka.broker (from TXNFLOW__KAFKA__BROKER)");
        let error = load_with(&[], &[("TXNFLOW__BUFFER__MAX_RECORDS", "many")]).unwrap_err();
        assert!(error.to_string().starts_with("configuration key `buffer.max_records"), "{error}");
        let error = load_with(&[], &[("TXNFLOW__BUFFER__MAX_RECORDS", "0")]).unwrap_err();
        assert_eq!(error.key, "buffer.max_records");
        let error = load_with(&[], &[("TXNFLOW__ADMIN__LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(error.key, "admin.listen");
        let error = load_with(&[], &[("TXNFLOW__BREAKER__FAILURE_RATE", "1.5")]).unwrap_err();
        assert_eq!(error.key, "breaker.failure_rate");
        let error = load_with(&[], &[("TXNFLOW__KAFKA__GROUP_PROTOCOL", "cooperative")]).unwrap_err();
        assert!(error.to_string().starts_with("configuration key `kafka.group_protocol"), "{error}");
        let config = load_with(&[], &[("TXNFLOW__KAFKA__GROUP_PROTOCOL", "consumer")]).unwrap();
        assert_eq!(config.kafka.group_protocol, GroupProtocol::Consumer);
    }

    /// A refused value is quoted with its password hidden.
    #[test]
    fn a_refused_url_is_quoted_without_its_password() {
        let error = load_with(&[], &[("TXNFLOW__TRACING__OTLP_ENDPOINT", "grpc://u:s3cret@c:4317")]).unwrap_err();
        assert_eq!(error.key, "tracing.otlp_endpoint");
        let said = error.to_string();
        assert!(said.contains("grpc://u:***@c:4317") && !said.contains("s3cret"), "{said}");
    }

    /// An answer bound below the largest valid answer to a batch is
    /// refused, naming the key and the size it must reach.
    #[test]
    fn an_answer_bound_below_a_valid_answer_is_refused() {
        let error = load_with(&[], &[("TXNFLOW__PREDICT__BATCH_SIZE", "1000")]).unwrap_err();
        assert_eq!(error.key, "predict.max_response_bytes");
        assert!(error.to_string().contains("at least 1100002"), "{error}");
        let config = load_with(
            &[],
            &[("TXNFLOW__PREDICT__BATCH_SIZE", "1000"), ("TXNFLOW__PREDICT__MAX_RESPONSE_BYTES", "1100002")],
        )
        .unwrap();
        assert_eq!(config.predict.max_response_bytes, 1_100_002);
        assert_eq!(load_with(&[], &[]).unwrap().predict.max_response_bytes, 1_048_576);
    }

    /// A capacity under the default flush size (2,000) is refused, naming
    /// the capacity; with a flush size that fits it, it is taken.
    #[test]
    fn a_capacity_under_the_flush_size_is_named() {
        let error = load_with(&[], &[("TXNFLOW__BUFFER__CAPACITY", "1000")]).unwrap_err();
        assert_eq!(
            (error.key.as_str(), error.to_string().contains("at least buffer.max_records")),
            ("buffer.capacity", true)
        );
        let config =
            load_with(&[], &[("TXNFLOW__BUFFER__CAPACITY", "1000"), ("TXNFLOW__BUFFER__MAX_RECORDS", "500")]).unwrap();
        assert_eq!((config.buffer.capacity, config.buffer.max_records), (1000, 500));
    }

    #[test]
    fn an_exposed_admin_port_needs_a_token_or_the_explicit_escape() {
        let exposed = load_with(&[], &[("TXNFLOW__ADMIN__LISTEN", "0.0.0.0:8088")]).unwrap();
        assert_eq!(exposed.admin.check_exposure().unwrap_err().key, "admin.token");
        let with_token = load_with(
            &[],
            &[("TXNFLOW__ADMIN__LISTEN", "0.0.0.0:8088"), ("TXNFLOW__ADMIN__TOKEN", "0123456789abcdef")],
        )
        .unwrap();
        assert!(with_token.admin.check_exposure().is_ok());
        let escaped = load_with(
            &[],
            &[("TXNFLOW__ADMIN__LISTEN", "[::]:8088"), ("TXNFLOW__ADMIN__ALLOW_UNAUTHENTICATED", "true")],
        )
        .unwrap();
        assert!(escaped.admin.check_exposure().is_ok());
        assert!(load_with(&[], &[]).unwrap().admin.check_exposure().is_ok(), "loopback needs none");
        assert!(load_with(&[], &[("TXNFLOW__ADMIN__LISTEN", "[::1]:8088")]).unwrap().admin.check_exposure().is_ok());
        let short = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN", "hunter2")]).unwrap_err();
        assert_eq!(short.key, "admin.token");
        assert!(!short.to_string().contains("hunter2"), "{short}");
    }

    #[test]
    fn the_token_can_come_from_a_file_whose_content_is_never_repeated() {
        let dir = std::env::temp_dir().join(format!("txnflow-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "0123456789abcdef-from-file\n").unwrap();
        let path = file.display().to_string();
        let config = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", &path)]).unwrap();
        assert_eq!(config.admin.token, "0123456789abcdef-from-file");
        let missing = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
        assert_eq!(missing.key, "admin.token_file");
        let both = load_with(
            &[],
            &[("TXNFLOW__ADMIN__TOKEN_FILE", &path), ("TXNFLOW__ADMIN__TOKEN", "x".repeat(20).as_str())],
        );
        assert_eq!(both.unwrap_err().key, "admin.token_file");
        std::fs::write(&file, "short\n").unwrap();
        let error = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", &path)]).unwrap_err();
        assert_eq!(error.key, "admin.token");
        assert!(!error.to_string().contains("short"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kafka_security_keys_must_agree() {
        let ok = load_with(
            &[],
            &[
                ("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
                ("TXNFLOW__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
                ("TXNFLOW__KAFKA__SASL_USERNAME", "txnflow"),
                ("TXNFLOW__KAFKA__SASL_PASSWORD", "s3cret-value"),
            ],
        )
        .unwrap();
        assert_eq!(ok.kafka.sasl_mechanism, "SCRAM-SHA-512");
        let key_of = |pairs: &[(&str, &str)]| load_with(&[], pairs).unwrap_err().key;
        assert_eq!(key_of(&[("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "tls")]), "kafka.security_protocol");
        assert_eq!(key_of(&[("TXNFLOW__KAFKA__SASL_MECHANISM", "PLAIN")]), "kafka.sasl_mechanism");
        assert_eq!(
            key_of(&[("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"), ("TXNFLOW__KAFKA__SASL_MECHANISM", "PLAIN")]),
            "kafka.sasl_username"
        );
        assert_eq!(
            key_of(&[("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"), ("TXNFLOW__KAFKA__SASL_MECHANISM", "GSSAPI")]),
            "kafka.sasl_mechanism"
        );
        assert_eq!(key_of(&[("TXNFLOW__KAFKA__SSL_CA_LOCATION", "/etc/hostname")]), "kafka.ssl_ca_location");
        assert_eq!(
            key_of(&[("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "ssl"), ("TXNFLOW__KAFKA__SSL_CA_LOCATION", "/nope.pem")]),
            "kafka.ssl_ca_location"
        );
        let password = load_with(
            &[],
            &[("TXNFLOW__KAFKA__SASL_PASSWORD", "s3cret-value"), ("TXNFLOW__KAFKA__SASL_USERNAME", "u")],
        )
        .unwrap_err();
        assert!(!password.to_string().contains("s3cret-value"), "{password}");
    }

    #[test]
    fn librdkafka_properties_come_from_files_and_the_environment() {
        let dir = std::env::temp_dir().join(format!("txnflow-props-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("props.toml");
        std::fs::write(&file, "[kafka.properties]\n\"socket.keepalive.enable\" = true\n\"fetch.wait.max.ms\" = 250\n")
            .unwrap();
        let config = load_with(&[&file], &[("TXNFLOW__KAFKA__PROPERTIES__METADATA_MAX_AGE_MS", "60000")]).unwrap();
        let properties: Vec<(&str, &str)> =
            config.kafka.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            properties,
            [("fetch.wait.max.ms", "250"), ("metadata.max.age.ms", "60000"), ("socket.keepalive.enable", "true")]
        );
        let managed = load_with(&[], &[("TXNFLOW__KAFKA__PROPERTIES__ENABLE_AUTO_COMMIT", "true")]).unwrap_err();
        assert_eq!(managed.key, "kafka.properties.enable.auto.commit");
        // The group protocol has a key of its own, kafka.group_protocol.
        let managed = load_with(&[], &[("TXNFLOW__KAFKA__PROPERTIES__GROUP_PROTOCOL", "consumer")]).unwrap_err();
        assert_eq!(managed.key, "kafka.properties.group.protocol");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_layer_in_order_and_unknown_file_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("txnflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = dir.join("first.toml");
        let second = dir.join("second.toml");
        std::fs::write(&first, "[buffer]\nmax_records = 7\nmax_wait_ms = 9\n").unwrap();
        std::fs::write(&second, "[buffer]\nmax_records = 8\n").unwrap();
        let config = load_with(&[&first, &second], &[]).unwrap();
        assert_eq!((config.buffer.max_records, config.buffer.max_wait_ms), (8, 9));

        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[db]\npool_sise = 3\n").unwrap();
        let error = load_with(&[&typo], &[]).unwrap_err();
        assert_eq!(error.key, "db.pool_sise");

        let wrong_type = dir.join("wrong_type.toml");
        std::fs::write(&wrong_type, "[db]\npool_size = \"four\"\n").unwrap();
        assert_eq!(load_with(&[&wrong_type], &[]).unwrap_err().key, "db.pool_size");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
