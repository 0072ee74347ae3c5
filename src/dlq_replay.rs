//! `txnflow dlq replay`: feeds dead-lettered records back through the
//! pipeline (contract §5) by republishing each one, key and value unchanged,
//! to the input topic. Replaying is idempotent: a transaction already stored
//! is not stored twice, and a prediction is upserted.
//!
//! It reads the DLQ in its own consumer group, so a second replay resumes
//! where the first stopped, and commits a DLQ offset only once the input
//! topic has acknowledged the record. It stops when the DLQ has been quiet
//! for `idle`.

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

use crate::config::KafkaConfig;

pub struct ReplayOptions {
    /// Replay only records whose `error_type` header is this.
    pub error_type: Option<String>,
    /// Stop after the DLQ has been quiet this long.
    pub idle: Duration,
    /// Consumer group of the replay.
    pub group: String,
}

/// Returns (replayed, skipped by the filter).
pub async fn run(kafka: &KafkaConfig, options: ReplayOptions) -> anyhow::Result<(u64, u64)> {
    let producer = crate::kafka::producer(kafka)?;
    let consumer: StreamConsumer = crate::kafka::client_config(kafka)
        .set("group.id", &options.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .create()?;
    consumer.subscribe(&[&kafka.dlq_topic])?;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    loop {
        let message = match tokio::time::timeout(options.idle, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(error)) => anyhow::bail!("reading {}: {error}", kafka.dlq_topic),
            Ok(Ok(message)) => message,
        };
        let error_type = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "error_type")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if options.error_type.as_deref().is_none_or(|wanted| error_type.as_deref() == Some(wanted)) {
            let headers = OwnedHeaders::new().insert(Header {
                key: "replayed_from",
                value: Some(&format!("{}/{}/{}", message.topic(), message.partition(), message.offset())),
            });
            let mut record =
                FutureRecord::to(&kafka.topic).payload(message.payload().unwrap_or_default()).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("republishing to {}: {e}", kafka.topic))?;
            replayed += 1;
        } else {
            skipped += 1;
        }
        let mut commit = TopicPartitionList::new();
        commit.add_partition_offset(message.topic(), message.partition(), Offset::Offset(message.offset() + 1))?;
        consumer.commit(&commit, CommitMode::Async)?;
        if (replayed + skipped) % 1000 == 0 {
            tracing::info!(replayed, skipped, "replaying the DLQ");
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync).ok();
    Ok((replayed, skipped))
}
