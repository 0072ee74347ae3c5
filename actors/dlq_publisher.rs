//! DlqPublisher: writes dead letters to the DLQ topic with the headers of
//! contract §5, through an idempotent producer. A record counts as
//! dead-lettered only once the broker acknowledges it; then, for an invalid
//! or refused record, its origin is durable. Sends are retried with backoff
//! until the broker takes them: a dead letter is never dropped.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use std::sync::Arc;
use std::time::Duration;

use super::messages::{Chaos, DeadLetter, DeadLetters};
use super::{Pipeline, source_label};
use crate::domain::dead_letter::dlq_headers;
use crate::domain::prediction::Prediction;
use crate::domain::retry::backoff_delay;
use crate::metrics::METRICS;

pub struct DlqPublisher {
    pipeline: Arc<Pipeline>,
}

impl DlqPublisher {
    pub fn new(pipeline: Arc<Pipeline>) -> DlqPublisher {
        DlqPublisher { pipeline }
    }
}

impl Actor for DlqPublisher {
    type Context = Context<Self>;
}

impl Supervised for DlqPublisher {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.pipeline.work_lost("dlq_publisher", "restarted by its supervisor");
    }
}

async fn publish(pipeline: &Pipeline, letter: DeadLetter) {
    let topic = &pipeline.config.kafka.dlq_topic;
    let mut headers = OwnedHeaders::new();
    for (key, value) in
        dlq_headers(&letter.failure, &letter.origin, letter.run_id.as_deref(), chrono::Utc::now(), crate::SERVICE)
    {
        headers = headers.insert(Header { key, value: Some(&value) });
    }
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut record = FutureRecord::to(topic).payload(&letter.value).headers(headers.clone());
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
        match pipeline.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => break,
            Err((error, _)) => {
                let delay =
                    backoff_delay(attempt, Duration::from_millis(100), Duration::from_secs(5), rand::rng().random());
                tracing::warn!(%error, attempt, ?delay, source = %letter.origin, "DLQ send failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    METRICS.dlq_records.with_label_values(&[letter.failure.error_type.as_str()]).inc();
    METRICS.records.with_label_values(&[source_label(&letter.origin), "dead_lettered"]).inc();
    pipeline.dead_lettered(&letter);
}

impl Handler<DeadLetters> for DlqPublisher {
    type Result = ();

    fn handle(&mut self, DeadLetters(letters): DeadLetters, ctx: &mut Context<Self>) {
        let pipeline = self.pipeline.clone();
        let send_all = async move {
            let sends = letters.into_iter().map(|letter| publish(&pipeline, letter));
            futures_util::future::join_all(sends).await;
        };
        ctx.spawn(send_all.into_actor(self).map(|(), _, _| ()));
    }
}

impl Handler<Chaos> for DlqPublisher {
    type Result = ();

    fn handle(&mut self, chaos: Chaos, ctx: &mut Context<Self>) {
        super::chaos("dlq_publisher", chaos, ctx);
    }
}

/// Publishes written predictions to `kafka.predictions_topic`, as JSON keyed
/// by transaction id. Best effort: the database is the record of truth.
pub fn fan_out_predictions(pipeline: &Pipeline, predictions: Vec<Prediction>) {
    let producer = pipeline.producer.clone();
    let topic = pipeline.config.kafka.predictions_topic.clone();
    actix::spawn(async move {
        for prediction in predictions {
            let key = prediction.transaction_id.to_string();
            let value = serde_json::json!({
                "transaction_id": key,
                "category": prediction.category,
                "confidence_score": prediction.confidence_score,
                "model_version": prediction.model_version,
            })
            .to_string();
            if let Err((error, _)) =
                producer.send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(30)).await
            {
                tracing::warn!(%error, "prediction fan-out failed");
            }
        }
    });
}
