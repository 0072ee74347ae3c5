//! Kafka adapter: client settings shared by every producer and consumer,
//! topic creation, and the schema registry that framed records name.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use std::time::Duration;

use crate::config::KafkaConfig;

pub mod schema_registry;

/// Settings every client shares: the brokers, the security settings, and
/// `[kafka.properties]` (after txnflow's own, so they may tune those too).
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    client_config_with(kafka, &[])
}

/// [`client_config`] with `defaults`, txnflow's settings for one kind of
/// client (the producer's timeout, the reader's fetch sizes), set before
/// `[kafka.properties]` so that those tune them as they tune the shared
/// ones. (The settings txnflow manages are refused in the properties at
/// load, so their order does not matter.)
pub fn client_config_with(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", crate::SERVICE)
        // A broker restart must not leave a client stuck on a dead address.
        .set("reconnect.backoff.max.ms", "2000");
    for (property, _, value) in security_settings(kafka) {
        if !value.is_empty() {
            config.set(property, value);
        }
    }
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// The security settings: librdkafka's property, txnflow's key for it, and
/// its value (empty: not set).
fn security_settings(kafka: &KafkaConfig) -> [(&'static str, &'static str, &str); 8] {
    [
        ("security.protocol", "kafka.security_protocol", kafka.security_protocol.as_str()),
        ("sasl.mechanism", "kafka.sasl_mechanism", kafka.sasl_mechanism.as_str()),
        ("sasl.username", "kafka.sasl_username", kafka.sasl_username.as_str()),
        ("sasl.password", "kafka.sasl_password", kafka.sasl_password.as_str()),
        ("ssl.ca.location", "kafka.ssl_ca_location", kafka.ssl_ca_location.as_str()),
        ("ssl.certificate.location", "kafka.ssl_certificate_location", kafka.ssl_certificate_location.as_str()),
        ("ssl.key.location", "kafka.ssl_key_location", kafka.ssl_key_location.as_str()),
        ("ssl.key.password", "kafka.ssl_key_password", kafka.ssl_key_password.as_str()),
    ]
}

/// Whether a librdkafka setting holds a secret, whose value no message repeats.
fn is_secret(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".pem") || key.contains("token")
}

/// Checks every Kafka setting with librdkafka itself, without connecting:
/// an unknown property or a value it refuses is a configuration error
/// (exit 2) naming the key. A secret's value is never repeated.
pub fn check_settings(kafka: &KafkaConfig) -> Result<(), crate::config::ConfigError> {
    let Err(error) = client_config(kafka).create_native_config() else { return Ok(()) };
    let rdkafka::error::KafkaError::ClientConfig(_, description, key, value) = error else {
        return Err(crate::config::ConfigError::new("kafka", "librdkafka refuses the settings"));
    };
    let named = security_settings(kafka)
        .iter()
        .find(|(property, _, _)| *property == key)
        .map_or_else(|| format!("kafka.properties.{key}"), |(_, ours, _)| ours.to_string());
    Err(crate::config::ConfigError::new(named, refusal(&description, &key, &value)))
}

/// librdkafka's reason, with a secret's value hidden if it repeats it.
fn refusal(description: &str, key: &str, value: &str) -> String {
    let description =
        if is_secret(key) && !value.is_empty() { description.replace(value, "***") } else { description.to_string() };
    format!("librdkafka refuses it: {description}")
}

/// What librdkafka says, into txnflow's log, and its last error kept for
/// `/ready`. Without it, its log lines (a TLS handshake refused, a SASL
/// failure) would go to the `log` crate, which nothing here prints.
#[derive(Default, Clone, Copy)]
pub struct KafkaContext;

/// librdkafka's last client error (a broker it cannot reach, a handshake
/// refused), with when it came, for `/ready` to say why the broker fails.
static LAST_ERROR: std::sync::Mutex<Option<(std::time::Instant, String)>> = std::sync::Mutex::new(None);

/// The last client error librdkafka reported within `within`, secrets hidden.
pub fn last_client_error(within: Duration) -> Option<String> {
    let last = LAST_ERROR.lock().expect("last error lock");
    last.as_ref().filter(|(at, _)| at.elapsed() < within).map(|(_, reason)| reason.clone())
}

/// librdkafka's log line, at the matching level.
pub fn log_from_librdkafka(level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as Level;
    // Debug lines are asked for (`debug=`): every one is said.
    let held = if matches!(level, Level::Debug) {
        Some(0)
    } else {
        admitted(&crate::domain::repeats::cause_of(facility, message))
    };
    let Some(held) = held else { return };
    let message = with_repeats(crate::domain::redaction::redact(message), held);
    match level {
        Level::Emerg | Level::Alert | Level::Critical | Level::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        Level::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        Level::Notice | Level::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        Level::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// librdkafka's lines said so far, by cause: a client retrying a broker
/// that is down says so once per cause and interval, not many times a second.
static REPEATS: std::sync::LazyLock<std::sync::Mutex<crate::domain::repeats::Repeats>> =
    std::sync::LazyLock::new(Default::default);

/// Whether a line of `cause` is said now, with the count held back before it.
fn admitted(cause: &str) -> Option<u64> {
    let mut repeats = REPEATS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    repeats.admit(cause, std::time::Instant::now())
}

/// A consumer error that `recv` returned, folded like librdkafka's lines:
/// it hands the same one over and over while a broker is down.
pub(crate) fn warn_consumer_error(error: &rdkafka::error::KafkaError, what: &str) {
    let error = error.to_string();
    if let Some(held) = admitted(&format!("{what} {error}")) {
        tracing::warn!(error, "{}", with_repeats(what.to_string(), held));
    }
}

/// A warning that may repeat many times a second (a dependency down),
/// folded the same way: once per cause and interval, with the count.
pub(crate) fn warn_repeated(message: &str) {
    if let Some(held) = admitted(&crate::domain::repeats::cause_of(message, "")) {
        tracing::warn!("{}", with_repeats(message.to_string(), held));
    }
}

fn with_repeats(message: String, held: u64) -> String {
    if held == 0 {
        return message;
    }
    let seconds = crate::domain::repeats::REPEAT_INTERVAL.as_secs();
    format!("{message} ({held} more like it held back, at most one a {seconds} s)")
}

/// A client error from librdkafka: logged, and kept for `/ready`.
pub fn error_from_librdkafka(error: &rdkafka::error::KafkaError, reason: &str) {
    let reason = crate::domain::redaction::redact(reason);
    let summary = error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown);
    if let Some(held) = admitted(&crate::domain::repeats::cause_of(&error.to_string(), &reason)) {
        let said = if summary {
            format!(
                "no broker of kafka.brokers answers ({reason}): check that the brokers run and that \
                 kafka.brokers and kafka.security_protocol name them; librdkafka keeps trying"
            )
        } else {
            reason.clone()
        };
        tracing::error!(target: "librdkafka", %error, "{}", with_repeats(said, held));
    }
    let mut last = LAST_ERROR.lock().expect("last error lock");
    // "All brokers are down" follows the error that says why: keep that one.
    if !(summary && last.as_ref().is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(30))) {
        *last = Some((std::time::Instant::now(), reason));
    }
}

impl rdkafka::ClientContext for KafkaContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        log_from_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        error_from_librdkafka(&error, reason);
    }
}

impl rdkafka::producer::ProducerContext for KafkaContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl rdkafka::consumer::ConsumerContext for KafkaContext {}

/// txnflow's producer, with its context.
pub type Producer = FutureProducer<KafkaContext>;

/// An idempotent producer: a retried send never writes a record twice, and a
/// record counts as sent only once every in-sync replica has it.
pub fn producer(kafka: &KafkaConfig) -> anyhow::Result<Producer> {
    let defaults =
        [("enable.idempotence", "true"), ("acks", "all"), ("linger.ms", "5"), ("message.timeout.ms", "30000")];
    client_config_with(kafka, &defaults).create_with_context(KafkaContext).map_err(|e| {
        anyhow::anyhow!(
            "cannot create a Kafka producer for {}: {}",
            kafka.brokers,
            crate::domain::redaction::redact(&e.to_string())
        )
    })
}

/// Creates each `(topic, partitions)` that does not exist yet, with
/// `kafka.replication_factor` replicas. One replica on a cluster of several
/// brokers is refused unless `kafka.allow_single_replica`: losing a broker
/// would lose records.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let replication = kafka.replication_factor;
    if replication == 1 && !kafka.allow_single_replica {
        let brokers = cluster(kafka).await?.brokers.len();
        if brokers > 1 {
            anyhow::bail!(
                "kafka.replication_factor is 1 on a cluster of {brokers} brokers: a broker lost would lose records; \
                 set kafka.replication_factor (3 is usual), or kafka.allow_single_replica = true"
            );
        }
    }
    let admin: AdminClient<KafkaContext> = client_config(kafka).create_with_context(KafkaContext).map_err(|e| {
        anyhow::anyhow!("cannot create a Kafka admin client: {}", crate::domain::redaction::redact(&e.to_string()))
    })?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create topics on {}: {e}", kafka.brokers))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// What the cluster says of itself: its brokers, and each topic's
/// partitions with their replica count.
pub struct Cluster {
    pub brokers: Vec<String>,
    pub topics: std::collections::BTreeMap<String, Vec<usize>>,
}

/// Fetches the cluster's metadata (on the blocking pool: librdkafka's call blocks).
pub async fn cluster(kafka: &KafkaConfig) -> anyhow::Result<Cluster> {
    let config = client_config(kafka);
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::producer::BaseProducer<KafkaContext> =
            config.create_with_context(KafkaContext).map_err(|e| {
                anyhow::anyhow!("cannot create a Kafka client: {}", crate::domain::redaction::redact(&e.to_string()))
            })?;
        let metadata = rdkafka::producer::Producer::client(&client)
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| {
                let last = last_client_error(Duration::from_secs(30)).map(|l| format!(" ({l})")).unwrap_or_default();
                anyhow::anyhow!("cannot read the cluster's metadata: {e}{last}")
            })?;
        Ok(Cluster {
            brokers: metadata.brokers().iter().map(|b| format!("{}:{}", b.host(), b.port())).collect(),
            topics: metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), t.partitions().iter().map(|p| p.replicas().len()).collect()))
                .collect(),
        })
    })
    .await?
}

/// A message's `traceparent` header, if it carries a well-formed one.
pub fn traceparent_of(message: &impl rdkafka::message::Message) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    let header = headers.iter().find(|h| h.key == crate::domain::trace_context::TRACEPARENT)?;
    crate::domain::trace_context::valid_traceparent(header.value?)
}

/// The pipeline's topics, with the input topic's partition count.
pub fn pipeline_topics(kafka: &KafkaConfig) -> Vec<(&str, i32)> {
    let mut topics = vec![(kafka.topic.as_str(), kafka.partitions), (kafka.dlq_topic.as_str(), 1)];
    if !kafka.predictions_topic.is_empty() {
        topics.push((kafka.predictions_topic.as_str(), 1));
    }
    topics
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(pairs: &[(&str, &str)]) -> KafkaConfig {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        crate::config::Config::from_layers([], env).unwrap().kafka
    }

    #[test]
    fn properties_tune_txnflow_s_own_defaults() {
        let tuned = kafka(&[("TXNFLOW__KAFKA__PROPERTIES__LINGER_MS", "50")]);
        let config = client_config_with(&tuned, &[("linger.ms", "5"), ("message.timeout.ms", "30000")]);
        assert_eq!(config.get("linger.ms"), Some("50"), "the property wins");
        assert_eq!(config.get("message.timeout.ms"), Some("30000"), "an untuned default stays");
    }

    #[test]
    fn librdkafka_names_an_unknown_or_invalid_property() {
        assert!(check_settings(&kafka(&[])).is_ok());
        let unknown = check_settings(&kafka(&[("TXNFLOW__KAFKA__PROPERTIES__NO_SUCH_THING", "1")])).unwrap_err();
        assert_eq!(unknown.key, "kafka.properties.no.such.thing");
        let invalid = check_settings(&kafka(&[("TXNFLOW__KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS", "soon")])).unwrap_err();
        assert_eq!(invalid.key, "kafka.properties.socket.timeout.ms");
    }

    #[test]
    fn tls_and_sasl_are_built_in() {
        let secured = kafka(&[
            ("TXNFLOW__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("TXNFLOW__KAFKA__SASL_MECHANISM", "SCRAM-SHA-256"),
            ("TXNFLOW__KAFKA__SASL_USERNAME", "txnflow"),
            ("TXNFLOW__KAFKA__SASL_PASSWORD", "s3cret-value"),
        ]);
        assert_eq!(check_settings(&secured).map_err(|e| e.to_string()), Ok(()));
        for mechanism in ["PLAIN", "SCRAM-SHA-512", "OAUTHBEARER"] {
            let mut other = secured.clone();
            other.sasl_mechanism = mechanism.into();
            assert!(check_settings(&other).is_ok(), "{mechanism}");
        }
    }

    #[test]
    fn a_secret_refused_by_librdkafka_is_not_repeated() {
        let said = "Invalid value \"very-secret\" for configuration property \"sasl.password\"";
        assert_eq!(
            refusal(said, "sasl.password", "very-secret"),
            "librdkafka refuses it: Invalid value \"***\" for configuration property \"sasl.password\""
        );
        let said = "Invalid value \"soon\" for configuration property \"socket.timeout.ms\"";
        assert!(refusal(said, "socket.timeout.ms", "soon").contains("\"soon\""), "not a secret: kept");
    }
}
