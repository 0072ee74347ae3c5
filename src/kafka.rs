//! Kafka adapter: client settings shared by every producer and consumer, and
//! topic creation.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use std::time::Duration;

use crate::config::KafkaConfig;

/// Settings every client shares.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", crate::SERVICE)
        // A broker restart must not leave a client stuck on a dead address.
        .set("reconnect.backoff.max.ms", "2000");
    config
}

/// An idempotent producer: a retried send never writes a record twice, and a
/// record counts as sent only once every in-sync replica has it.
pub fn producer(kafka: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    client_config(kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka producer for {}: {e}", kafka.brokers))
}

/// Creates each `(topic, partitions)` that does not exist yet.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(kafka).create().map_err(|e| anyhow::anyhow!("cannot create a Kafka admin client: {e}"))?;
    let new_topics: Vec<NewTopic<'_>> =
        topics.iter().map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1))).collect();
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

/// The topics of contract §5, with the input topic's partition count.
pub fn pipeline_topics(kafka: &KafkaConfig) -> Vec<(&str, i32)> {
    let mut topics = vec![(kafka.topic.as_str(), kafka.partitions), (kafka.dlq_topic.as_str(), 1)];
    if !kafka.predictions_topic.is_empty() {
        topics.push((kafka.predictions_topic.as_str(), 1));
    }
    topics
}
