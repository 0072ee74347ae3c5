//! The predictions fan-out: written predictions published to
//! `kafka.predictions_topic`, for consumers downstream. Not an actor: the
//! DbWriter and the Backfill call it once their rows are in PostgreSQL. Its
//! queue is bounded, and it is best effort: the database is the record of
//! truth.

use rdkafka::producer::FutureRecord;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, PredictionsFormat, SchemaRegistryConfig};
use crate::domain::prediction::Prediction;
use crate::domain::schema_event::{EventSchema, PREDICTION_AVRO, SchemaFormat};

/// Registers the predictions' Avro schema under `<topic>-value`.
async fn register(registry: &SchemaRegistryConfig, topic: &str) -> anyhow::Result<(u32, EventSchema)> {
    let registry = crate::kafka::schema_registry::SchemaRegistry::new(registry)?
        .ok_or_else(|| anyhow::anyhow!("no schema_registry.url"))?;
    let id = registry.register(&format!("{topic}-value"), SchemaFormat::Avro, PREDICTION_AVRO).await?;
    let schema = EventSchema::parse(SchemaFormat::Avro, PREDICTION_AVRO).map_err(|e| anyhow::anyhow!(e))?;
    Ok((id, schema))
}

/// The fan-out's queue and producer, shared by the DbWriter and the
/// Backfill. Off when `kafka.predictions_topic` is empty.
#[derive(Clone)]
pub struct PredictionFanOut {
    producer: crate::kafka::Producer,
    topic: String,
    /// The registry to register the Avro schema with, when the topic is
    /// written in Avro (`kafka.predictions_format`).
    avro_registry: Option<SchemaRegistryConfig>,
    /// Predictions queued for the topic (`buffer.capacity`).
    slots: Arc<Semaphore>,
    slot_limit: usize,
    /// The predictions' Avro schema and its registry id, registered on
    /// first use.
    schema: Arc<OnceCell<(u32, EventSchema)>>,
}

impl PredictionFanOut {
    pub fn new(config: &Config, producer: crate::kafka::Producer) -> PredictionFanOut {
        let avro = config.kafka.predictions_format == PredictionsFormat::Avro;
        PredictionFanOut {
            producer,
            topic: config.kafka.predictions_topic.clone(),
            avro_registry: avro.then(|| config.schema_registry.clone()),
            slots: Arc::new(Semaphore::new(config.buffer.capacity)),
            slot_limit: config.buffer.capacity,
            schema: Arc::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        !self.topic.is_empty()
    }

    /// Room for `count` predictions in the fan-out queue, waited for: while
    /// the predictions topic is slow or down, the queue (`buffer.capacity`
    /// predictions) fills and the writer waits here holding its records, so the
    /// sources pause as they do for the DLQ.
    pub async fn room(&self, count: usize) -> OwnedSemaphorePermit {
        let count = count.clamp(1, self.slot_limit) as u32;
        self.slots.clone().acquire_many_owned(count).await.expect("the semaphore is never closed")
    }

    /// Publishes written predictions to `kafka.predictions_topic`, as JSON (or
    /// Avro, `kafka.predictions_format`) keyed by transaction id, in the room
    /// taken by [`PredictionFanOut::room`], freed once every send is done.
    /// Best effort: the database is the record of truth, and a send that
    /// fails (after the producer's 30 s) is logged and dropped.
    pub fn publish(&self, predictions: Vec<Prediction>, room: OwnedSemaphorePermit) {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let avro = self.avro_registry.clone().map(|registry| (self.schema.clone(), registry));
        actix::spawn(async move {
            let _room = room;
            let schema = match &avro {
                None => None,
                Some((schema, registry)) => match schema.get_or_try_init(|| register(registry, &topic)).await {
                    Ok(schema) => Some(schema),
                    Err(error) => {
                        tracing::warn!(%error, "prediction fan-out skipped: its schema is not registered");
                        return;
                    }
                },
            };
            let sends = predictions.into_iter().map(|prediction| {
                let (producer, topic) = (producer.clone(), topic.clone());
                async move {
                    let key = prediction.transaction_id.to_string();
                    let json = serde_json::json!({
                        "transaction_id": key,
                        "category": prediction.category,
                        "confidence_score": prediction.confidence_score,
                        "model_version": prediction.model_version,
                    });
                    let value = match schema {
                        None => json.to_string().into_bytes(),
                        Some((id, schema)) => match schema.frame(*id, &json) {
                            Ok(value) => value,
                            Err(error) => {
                                tracing::warn!(%error, "prediction fan-out: not written in Avro");
                                return;
                            }
                        },
                    };
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
}
