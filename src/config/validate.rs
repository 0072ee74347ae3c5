//! Validation: every key's bounds and how keys agree with each other,
//! each refusal naming the key.

use super::*;
use std::path::Path;

impl Config {
    /// Sets `repredict.url` from a command's flag (`flag` names it in a
    /// refusal), checked as the key is.
    pub fn set_repredict_url(&mut self, flag: &str, url: &str) -> Result<(), ConfigError> {
        self.repredict.url = url.to_string();
        self.check()
            .map_err(|error| if error.key == "repredict.url" { ConfigError::new(flag, error.message) } else { error })
    }

    /// Rules that types alone cannot express.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
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
                "is set by txnflow itself (see kafka.* and docs/configuration.md); it cannot be changed here",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::load_with;

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
}
