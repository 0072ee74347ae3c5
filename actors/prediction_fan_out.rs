//! The predictions fan-out: written predictions published to
//! `kafka.predictions_topic`, for consumers downstream. Not an actor: the
//! DbWriter and the Backfill call it once their rows are in PostgreSQL. Its
//! queue is bounded, and it is best effort: the database is the record of
//! truth.

use rdkafka::producer::FutureRecord;
use std::time::Duration;

use super::Pipeline;
use crate::domain::prediction::Prediction;

/// Room for `count` predictions in the fan-out queue, waited for: while
/// the predictions topic is slow or down, the queue (`buffer.capacity`
/// predictions) fills and the writer waits here holding its records, so the
/// sources pause as they do for the DLQ.
pub async fn room(pipeline: &Pipeline, count: usize) -> tokio::sync::OwnedSemaphorePermit {
    let count = count.clamp(1, pipeline.config.buffer.capacity) as u32;
    pipeline.fan_out_slots.clone().acquire_many_owned(count).await.expect("the semaphore is never closed")
}

/// Publishes written predictions to `kafka.predictions_topic`, as JSON keyed
/// by transaction id, in the room taken by [`room`], freed once
/// every send is done. Best effort: the database is the record of truth,
/// and a send that fails (after the producer's 30 s) is logged and dropped.
pub fn publish(pipeline: &Pipeline, predictions: Vec<Prediction>, room: tokio::sync::OwnedSemaphorePermit) {
    let producer = pipeline.producer.clone();
    let topic = pipeline.config.kafka.predictions_topic.clone();
    actix::spawn(async move {
        let _room = room;
        let sends = predictions.into_iter().map(|prediction| {
            let (producer, topic) = (producer.clone(), topic.clone());
            async move {
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
        futures_util::future::join_all(sends).await;
    });
}
