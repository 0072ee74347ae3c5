//! `txnflow dlq replay`: feeds dead-lettered records back through the
//! pipeline by republishing each one, key and value unchanged,
//! to the input topic. Replaying is idempotent: a transaction already stored
//! is not stored twice, and one that has a prediction keeps it.
//!
//! It reads the DLQ in its own consumer group, so a second replay resumes
//! where the first stopped, and commits a DLQ offset only once the input
//! topic has acknowledged the record. It stops when the DLQ has been quiet
//! for `idle`. Then it replays the dead letters the topic refused, stored in
//! the `dead_letters` table, marking each replayed once the input topic has it.
//!
//! By default it replays `prediction_failed` and `persist_failed`: an
//! `invalid` record fails again as it is, so it is replayed only when asked.

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

use crate::config::KafkaConfig;
use crate::domain::trace_context::TRACEPARENT;
use crate::observability::progress::{Progress, Unit};

/// How long consumer errors alone may come before a replay gives up.
const CONSUMER_ERRORS_FOR_AT_MOST: Duration = Duration::from_secs(30);

/// What `txnflow dlq replay` replays unless told otherwise.
pub const DEFAULT_ERROR_TYPES: [&str; 2] = ["prediction_failed", "persist_failed"];

pub struct ReplayOptions {
    /// Replay only records whose `error_type` header is one of these.
    pub error_types: Vec<String>,
    /// Stop after the DLQ has been quiet this long.
    pub idle: Duration,
    /// Consumer group of the replay.
    pub group: String,
}

/// Replays the topic, then the table (when `db` is given). Returns
/// (replayed, skipped by the filter).
pub async fn run(
    kafka: &KafkaConfig,
    db: Option<&crate::config::DbConfig>,
    options: ReplayOptions,
) -> anyhow::Result<(u64, u64)> {
    let (mut replayed, skipped) = replay_topic(kafka, &options).await?;
    if let Some(db) = db {
        replayed += replay_table(kafka, db, &options.error_types).await?;
    }
    Ok((replayed, skipped))
}

async fn replay_topic(kafka: &KafkaConfig, options: &ReplayOptions) -> anyhow::Result<(u64, u64)> {
    let producer = crate::kafka::producer(kafka)?;
    let session_timeout = kafka.session_timeout_ms.to_string();
    let defaults = [
        ("group.id", options.group.as_str()),
        ("enable.auto.commit", "false"),
        ("auto.offset.reset", "earliest"),
        ("session.timeout.ms", session_timeout.as_str()),
    ];
    let consumer: StreamConsumer = crate::kafka::client_config_with(kafka, &defaults).create()?;
    consumer.subscribe(&[&kafka.dlq_topic])?;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    // Out of the records past the group's committed offsets when it starts.
    // Blocking librdkafka calls, once, before the replay reads anything.
    let pending = pending_records(&consumer, &kafka.dlq_topic);
    let mut progress = Progress::start(format!("dlq replay of {}", kafka.dlq_topic), Unit::Rows);
    let detail = |replayed: u64, skipped: u64| format!("replayed {replayed} skipped {skipped} (another error type)");
    // A consumer error is often passing (a connection dropped and made
    // again): it ends the replay only once errors alone came for this long.
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let message = match tokio::time::timeout(options.idle, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(error)) => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= CONSUMER_ERRORS_FOR_AT_MOST {
                    anyhow::bail!(
                        "reading {}: {error} (errors only, for {} s)",
                        kafka.dlq_topic,
                        since.elapsed().as_secs()
                    );
                }
                crate::kafka::warn_consumer_error(&error, "dlq replay: consumer error; reading on");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(message)) => {
                failing_since = None;
                message
            }
        };
        let error_type = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "error_type")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if error_type.as_ref().is_some_and(|kind| options.error_types.contains(kind)) {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "replayed_from",
                value: Some(&format!("{}/{}/{}", message.topic(), message.partition(), message.offset())),
            });
            // The replay continues the record's trace.
            if let Some(traceparent) = &crate::kafka::traceparent_of(&message) {
                headers = headers.insert(Header { key: TRACEPARENT, value: Some(traceparent) });
            }
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
        let done = replayed + skipped;
        progress.show(done, pending.map(|pending| pending.max(done)), &detail(replayed, skipped));
    }
    consumer.commit_consumer_state(CommitMode::Sync).ok();
    let done = replayed + skipped;
    progress.finish(done, Some(done), &detail(replayed, skipped));
    Ok((replayed, skipped))
}

/// The records of `topic` past the group's committed offsets (past the
/// low watermark where none is committed); None when the broker does
/// not say.
fn pending_records(consumer: &StreamConsumer, topic: &str) -> Option<u64> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let partitions: Vec<i32> = metadata.topics().first()?.partitions().iter().map(|p| p.id()).collect();
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, timeout).ok()?;
    let mut pending = 0u64;
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout).ok()?;
        let from = match committed.find_partition(topic, partition).map(|element| element.offset()) {
            Some(Offset::Offset(offset)) if offset >= low => offset,
            _ => low,
        };
        pending += (high - from).max(0) as u64;
    }
    Some(pending)
}

/// Republishes the pending rows of `dead_letters` of those types to the
/// input topic, each marked replayed once the topic has it.
async fn replay_table(
    kafka: &KafkaConfig,
    db: &crate::config::DbConfig,
    error_types: &[String],
) -> anyhow::Result<u64> {
    let producer = crate::kafka::producer(kafka)?;
    let pool = crate::db::pool(db);
    let mut replayed = 0u64;
    let mut failed: Vec<i64> = Vec::new();
    let types = error_types.to_vec();
    let pending = crate::db::blocking(&pool, move |c| crate::db::pending_dead_letters(c, &types)).await?;
    let mut progress = Progress::start("dlq replay of the dead_letters table", Unit::Rows);
    loop {
        let types = error_types.to_vec();
        // The ones that failed stay pending: read past them.
        let limit = 500 + failed.len() as i64;
        let rows = crate::db::blocking(&pool, move |c| crate::db::dead_letters(c, &types, true, limit)).await?;
        let rows: Vec<_> = rows.into_iter().filter(|row| !failed.contains(&row.id)).collect();
        if rows.is_empty() {
            let done = replayed + failed.len() as u64;
            let detail = format!("replayed {replayed} failed {}", failed.len());
            progress.finish(done, Some(pending.max(done)), &detail);
            if !failed.is_empty() {
                anyhow::bail!(
                    "replayed {replayed} from the dead_letters table; {} could not be republished (ids {:?}), see the log",
                    failed.len(),
                    failed
                );
            }
            return Ok(replayed);
        }
        for row in rows {
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: "replayed_from", value: Some(&format!("dead_letters/{}", row.id)) });
            // The record's trace goes on with it, as from the topic.
            if let Some(traceparent) = &row.traceparent {
                headers = headers.insert(Header { key: TRACEPARENT, value: Some(traceparent) });
            }
            let mut record = FutureRecord::to(&kafka.topic).payload(&row.record_value).headers(headers);
            if let Some(key) = &row.record_key {
                record = record.key(key);
            }
            if let Err((error, _)) = producer.send(record, Duration::from_secs(30)).await {
                // Too large for the input topic too, most likely: it stays
                // in the table, unreplayed, and the others go on.
                tracing::warn!(id = row.id, %error, "cannot republish this dead letter; it stays in the table");
                failed.push(row.id);
                continue;
            }
            crate::db::blocking(&pool, move |c| crate::db::mark_replayed(c, row.id)).await?;
            replayed += 1;
            let done = replayed + failed.len() as u64;
            progress.show(done, Some(pending.max(done)), &format!("replayed {replayed} failed {}", failed.len()));
        }
    }
}

/// `txnflow dlq list`: one line per stored dead letter, without its value
/// (it is the input record).
pub fn list(
    db: &crate::config::DbConfig,
    error_types: &[String],
    pending_only: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let mut connection = crate::db::connect(&db.url)?;
    let rows = crate::db::dead_letters(&mut connection, error_types, pending_only, limit)?;
    println!("id\terror_type\tsource\tbytes\treplayed\trefused_by\terror_message");
    for row in &rows {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            row.id,
            row.error_type,
            row.source,
            row.record_value.len(),
            row.replayed_at.map_or("no".to_string(), |at| at.to_rfc3339()),
            row.refused_by,
            row.error_message
        );
    }
    eprintln!("{} dead letter(s) in the table", rows.len());
    Ok(())
}
