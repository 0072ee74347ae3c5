//! The typed messages the actors pass, named for what is asked or happened.

use actix::Message;
use std::collections::HashMap;
use std::time::Instant;
use uuid::Uuid;

use super::acknowledgement::Ack;
use crate::domain::dead_letter::Failure;
use crate::domain::prediction::Prediction;
use crate::domain::transaction::{ProcessingType, Transaction};
use crate::observability::spans::{FlushSpan, RecordTrace};

/// How and in which run a record entered txnflow (lineage columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub processing_type: ProcessingType,
    pub run_id: Option<String>,
    pub batch_id: Option<String>,
}

/// A valid record on its way to the database. Its acknowledgement handle
/// holds its origin and its share of the pipeline's bounded capacity until
/// it is settled or dropped.
#[derive(Debug)]
pub struct Envelope {
    pub transaction: Transaction,
    /// The record as it arrived, for the DLQ value. None for a CSV row: its
    /// DLQ value is built only if it is dead-lettered (see
    /// [`Envelope::dead_letter_value`]).
    pub raw: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub lineage: Lineage,
    /// Its `traceparent` and, when sampled, the spans its later spans
    /// hang under.
    pub trace: RecordTrace,
    pub ack: Ack,
}

impl Envelope {
    /// The DLQ value: the bytes as they arrived, or for a CSV row its
    /// canonical batch event.
    pub fn dead_letter_value(&mut self) -> Vec<u8> {
        self.raw.take().unwrap_or_else(|| {
            let id = self.transaction.id.to_string();
            let event = crate::domain::event::TransactionEvent::of_batch_row(
                &self.transaction,
                &id,
                self.lineage.run_id.as_deref().unwrap_or_default(),
                self.lineage.batch_id.as_deref().unwrap_or_default(),
            );
            serde_json::to_vec(&event).expect("an event serialises")
        })
    }
}

/// A record for the DLQ topic.
#[derive(Debug)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub failure: Failure,
    pub run_id: Option<String>,
    /// The record's trace: its `traceparent` is the letter's last header,
    /// and its DLQ span hangs under its `read`.
    pub trace: RecordTrace,
    /// Settled once the DLQ acknowledges the letter.
    pub ack: Ack,
}

/// Source -> Buffer: valid records to batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ingest(pub Vec<Envelope>);

/// Anyone -> Buffer: flush now (rebalance, shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushNow;

/// What made the Buffer flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    Size,
    Time,
    Forced,
}

impl FlushTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushTrigger::Size => "size",
            FlushTrigger::Time => "time",
            FlushTrigger::Forced => "forced",
        }
    }
}

/// Buffer -> PredictClient: one flush.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PredictFlush {
    pub flush_id: u64,
    pub trigger: FlushTrigger,
    pub flushed_at: Instant,
    pub records: Vec<Envelope>,
    /// Ends when the flush is settled.
    pub span: FlushSpan,
}

/// PredictClient -> DbWriter: a flush with its predictions and failures.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteFlush {
    pub flush_id: u64,
    pub trigger: FlushTrigger,
    pub flushed_at: Instant,
    pub records: Vec<Envelope>,
    pub predictions: HashMap<Uuid, Prediction>,
    pub failures: HashMap<Uuid, Failure>,
    pub span: FlushSpan,
}

/// Anyone -> DlqPublisher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeadLetters(pub Vec<DeadLetter>);

/// KafkaReader: stop reading (shutdown); in-flight records go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopReading;

/// KafkaReader: commit every durable offset now, synchronously.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CommitNow;

/// Chaos hooks: fail through the error path, or panic.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum Chaos {
    Crash,
    Panic,
}

/// Records for the actors' unit tests: valid envelopes with ids `1`, `2`, …
/// (canonical UUIDv5s), whose handles report to no source.
#[cfg(test)]
pub(crate) fn test_envelopes(descriptions: &[&str]) -> Vec<Envelope> {
    use super::acknowledgement::{Settlement, Tracker};
    use crate::domain::origin::Origin;
    use std::sync::Arc;

    struct NoSource;
    impl Tracker for NoSource {
        fn report(&self, _: &[(&Origin, u64)], _: Settlement) {}
    }
    let count = descriptions.len();
    let (records, bytes) = (Arc::new(tokio::sync::Semaphore::new(count)), Arc::new(tokio::sync::Semaphore::new(count)));
    descriptions
        .iter()
        .enumerate()
        .map(|(index, description)| {
            let line = index as u64 + 1;
            let event = serde_json::json!({
                "id": line.to_string(), "description": description, "amount": "-12.50",
                "timestamp": "2026-01-11T10:00:00", "operation_type": "payment", "side": "debit",
            });
            let capacity = crate::actors::capacity::Reserved {
                _record: records.clone().try_acquire_owned().expect("one permit per record"),
                _bytes: bytes.clone().try_acquire_owned().expect("one permit per record"),
            };
            let origin = Origin::File { source_uri: "test.csv".into(), line };
            Envelope {
                transaction: crate::domain::event::parse_event(event.to_string().as_bytes()).expect("a valid event"),
                raw: None,
                key: None,
                lineage: Lineage { processing_type: ProcessingType::Batch, run_id: None, batch_id: None },
                trace: RecordTrace::default(),
                ack: Ack::new(origin, capacity, Arc::new(NoSource), 0),
            }
        })
        .collect()
}
