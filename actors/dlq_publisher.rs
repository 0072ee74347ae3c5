//! DlqPublisher: writes dead letters to the DLQ topic with their error
//! headers (`domain::dead_letter`), through an idempotent producer. A
//! record counts as dead-lettered only once the broker acknowledges it, or,
//! when the broker refuses it for good (too large, not authorised, no such
//! topic), once it is stored in the `dead_letters` table; then its handle is
//! settled. Other send failures (a broker down) are retried with backoff: a
//! dead letter is never dropped.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use std::sync::Arc;
use std::time::Duration;

use super::messages::{DeadLetter, DeadLetters};
use crate::domain::dead_letter::dlq_headers;
use crate::observability::metrics::METRICS;

pub struct DlqPublisher {
    params: Arc<DlqPublisherParams>,
}

/// What the DlqPublisher is built from.
pub struct DlqPublisherParams {
    /// `kafka.dlq_topic`.
    pub topic: String,
    pub producer: crate::kafka::Producer,
    /// For the dead letters the topic refuses for good.
    pub pool: crate::db::PgPool,
}

impl DlqPublisher {
    pub fn new(params: DlqPublisherParams) -> DlqPublisher {
        DlqPublisher { params: Arc::new(params) }
    }
}

impl Actor for DlqPublisher {
    type Context = Context<Self>;
}

impl Supervised for DlqPublisher {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // The sends in flight were dropped with the old context; their
        // records' handles report them lost.
        super::supervisor::restarted("dlq_publisher", "restarted by its supervisor");
    }
}

/// How many times a send may fail with "no such topic" before that counts
/// as permanent: a topic being created answers so for a moment.
const UNKNOWN_TOPIC_ATTEMPTS: u32 = 5;

/// Why the broker will never take this record, if it will not: too large,
/// not authorised, or a topic that does not exist. Anything else (a broker
/// down, a leader moving, a full queue) passes and is retried.
fn refused_for_good(error: &KafkaError, attempt: u32) -> Option<String> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code()? {
        Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge | Code::InvalidMessage => {
            Some(format!("too large or invalid for the topic: {error}"))
        }
        Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed => {
            Some(format!("not authorised on the topic: {error}"))
        }
        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition | Code::InvalidTopic
            if attempt >= UNKNOWN_TOPIC_ATTEMPTS =>
        {
            Some(format!("no such topic: {error}"))
        }
        _ => None,
    }
}

/// Sends one dead letter until the topic takes it, or, when the topic
/// refuses it for good, stores it in the `dead_letters` table. Then the
/// record counts as dead-lettered.
async fn publish(params: &DlqPublisherParams, letter: DeadLetter) {
    let topic = &params.topic;
    let header_values = dlq_headers(
        &letter.failure,
        letter.ack.origin(),
        letter.run_id.as_deref(),
        letter.trace.traceparent.as_deref(),
        // The value is kept as it was read: a framed one names its schema.
        match crate::domain::wire_format::framing(&letter.value) {
            Ok(crate::domain::wire_format::Framing::Framed { schema_id, .. }) => Some(schema_id),
            _ => None,
        },
        chrono::Utc::now(),
        crate::SERVICE,
    );
    let mut headers = OwnedHeaders::new();
    for (key, value) in &header_values {
        headers = headers.insert(Header { key, value: Some(value) });
    }
    let span = crate::observability::spans::DlqSend::start(&letter.trace, topic, letter.failure.error_type.as_str());
    let mut backoff = crate::domain::backoff::Backoff::outage();
    let refused_by = loop {
        let mut record = FutureRecord::to(topic).payload(&letter.value).headers(headers.clone());
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
        match params.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => break None,
            Err((error, _)) => {
                if let Some(reason) = refused_for_good(&error, backoff.failures() + 1) {
                    break Some(reason);
                }
                let (attempt, delay) = backoff.next_attempt();
                tracing::warn!(%error, attempt, ?delay, source = %letter.ack.origin(), "DLQ send failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    };
    span.end(if refused_by.is_none() { "published" } else { "stored" });
    match refused_by {
        None => {
            METRICS.dlq_records.with_label_values(&[letter.failure.error_type.as_str()]).inc();
            crate::observability::recent::note_dead_letter(&letter.failure, &header_values, "dlq");
        }
        Some(reason) => {
            tracing::warn!(
                source = %letter.ack.origin(),
                bytes = letter.value.len(),
                reason,
                "the DLQ topic refuses this dead letter for good; storing it in the dead_letters table"
            );
            store(params, &letter, &header_values, &reason).await;
            METRICS.dead_letters_stored.with_label_values(&[letter.failure.error_type.as_str()]).inc();
            crate::observability::recent::note_dead_letter(&letter.failure, &header_values, "dead_letters");
        }
    }
    METRICS.records.with_label_values(&[letter.ack.origin().source_label(), "dead_lettered"]).inc();
    letter.ack.dead_lettered();
}

/// Stores a dead letter in PostgreSQL, retrying while the database is
/// unreachable (as a flush does: nothing is acknowledged meanwhile).
async fn store(params: &DlqPublisherParams, letter: &DeadLetter, headers: &[(&'static str, String)], refused_by: &str) {
    let mut backoff = crate::domain::backoff::Backoff::outage();
    loop {
        let (topic, key, value) = (params.topic.clone(), letter.key.clone(), letter.value.clone());
        let (headers, refused_by) = (headers.to_vec(), refused_by.to_string());
        let stored = crate::db::blocking(&params.pool, move |connection| {
            let row = crate::db::StoredDeadLetter {
                topic: &topic,
                key: key.as_deref(),
                value: &value,
                headers: &headers,
                refused_by: &refused_by,
            };
            crate::db::store_dead_letter(connection, &row)
        })
        .await;
        match stored {
            Ok(()) => return,
            Err(error) => {
                let error = crate::domain::redaction::short_reason(&error);
                let (attempt, delay) = backoff.next_attempt();
                tracing::warn!(error, attempt, ?delay, "cannot store the dead letter; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Handler<DeadLetters> for DlqPublisher {
    type Result = ();

    fn handle(&mut self, DeadLetters(letters): DeadLetters, ctx: &mut Context<Self>) {
        let params = self.params.clone();
        let send_all = async move {
            let sends = letters.into_iter().map(|letter| publish(&params, letter));
            futures_util::future::join_all(sends).await;
        };
        ctx.spawn(send_all.into_actor(self).map(|(), _, _| ()));
    }
}

super::supervisor::chaos_hook!(DlqPublisher, "dlq_publisher");
