//! One pass's records, each decoded with the pure rules into an envelope
//! for the Buffer or a dead letter for the DlqPublisher, and sent on.

use rdkafka::message::{Message, OwnedMessage};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::ReadOffsets;
use super::ReaderParams;
use crate::actors::acknowledgement::Ack;
use crate::actors::buffer::Buffer;
use crate::actors::capacity::Reserved;
use crate::actors::dlq_publisher::DlqPublisher;
use crate::actors::mailbox::Mailbox;
use crate::actors::messages::{DeadLetter, DeadLetters, Envelope, Ingest, Lineage};
use crate::domain::dead_letter::{ErrorType, Failure};
use crate::domain::event::{RecordError, RejectStage};
use crate::domain::origin::Origin;
use crate::domain::schema_event::{SchemaLookup, read_value};
use crate::domain::transaction::ProcessingType;
use crate::domain::validation::validate;
use crate::kafka::schema_registry::SchemaRegistry;
use crate::observability::metrics::{self, METRICS, Phase};
use crate::observability::spans::ReadAt;

/// Records read at once, at most.
pub(super) const READ_BATCH: usize = 500;
/// Bytes of records (headers included) read at once, at most, past the first.
pub(super) const READ_PASS_MAX_BYTES: usize = 8 * 1024 * 1024;

/// A record's bytes as fetched: value, key and every header.
pub(super) fn message_bytes(message: &OwnedMessage) -> usize {
    use rdkafka::message::Headers;
    let headers = message
        .headers()
        .map_or(0, |headers| headers.iter().map(|header| header.key.len() + header.value.map_or(0, <[u8]>::len)).sum());
    message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len) + headers
}

/// The stages the reader sends to.
#[derive(Clone)]
pub(super) struct Next {
    pub(super) buffer: Mailbox<Buffer>,
    pub(super) dlq_publisher: Mailbox<DlqPublisher>,
}

/// What one pass of the read loop sends on: valid records to the Buffer,
/// invalid ones to the DlqPublisher.
pub(super) struct ReadPass<'r> {
    /// The schemas of the records framed for the registry, fetched first.
    pub(super) registry: Option<&'r SchemaRegistry>,
    pub(super) valid: Vec<Envelope>,
    pub(super) invalid: Vec<DeadLetter>,
    /// Counted here and added to the metrics once per send, not per record.
    pub(super) read: u64,
    pub(super) rejected: u64,
    pub(super) started: Instant,
    /// When its records were received: their read spans start there.
    pub(super) received: SystemTime,
    /// Held back by the capacity or the Buffer, in this pass.
    pub(super) waited: Duration,
}

impl<'r> ReadPass<'r> {
    pub(super) fn new(registry: Option<&'r SchemaRegistry>) -> ReadPass<'r> {
        ReadPass {
            registry,
            valid: Vec::new(),
            invalid: Vec::new(),
            read: 0,
            rejected: 0,
            started: Instant::now(),
            received: SystemTime::now(),
            waited: Duration::ZERO,
        }
    }

    /// Counts the pass's time: held back, and at work.
    pub(super) fn observe(&self) {
        metrics::Stage::Read.observe(Phase::Wait, self.waited);
        metrics::Stage::Read.observe(Phase::Work, self.started.elapsed().saturating_sub(self.waited));
    }

    pub(super) fn add(
        &mut self,
        params: &ReaderParams,
        offsets: &Arc<ReadOffsets>,
        message: &OwnedMessage,
        traceparent: Option<String>,
        permit: Reserved,
    ) {
        let origin = Origin::Kafka {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let generation = offsets.lock().read(message.partition(), message.offset());
        let ack = Ack::new(origin, permit, offsets.clone(), generation);
        self.read += 1;
        let payload = message.payload().unwrap_or_default();
        let key = message.key().map(<[u8]>::to_vec);
        let max_bytes = params.kafka.max_record_bytes;
        let decoded = if payload.len() > max_bytes {
            Err(RecordError {
                stage: RejectStage::Decode,
                message: format!("record of {} bytes, over kafka.max_record_bytes ({max_bytes})", payload.len()),
            })
        } else {
            let kafka = &params.kafka;
            let lookup = |id| match self.registry {
                // Fetched before the pass; a schema evicted since reads as
                // unusable rather than wait here.
                Some(registry) => registry
                    .cached(id)
                    .unwrap_or_else(|| SchemaLookup::Unusable("evicted from the cache during its read".to_string())),
                None => SchemaLookup::NoRegistry,
            };
            read_value(payload, kafka.value_format, kafka.require_schema, lookup)
                .and_then(|raw| validate(&raw).map_err(RecordError::from))
        };
        let at = ReadAt {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            group: &params.kafka.group_id,
        };
        let rejected = decoded.is_err().then_some(ErrorType::Invalid.as_str());
        let trace = crate::observability::spans::read(message, traceparent, at, self.received, rejected);
        match decoded {
            Ok(transaction) => {
                let lineage = Lineage {
                    processing_type: transaction.processing_type.unwrap_or(ProcessingType::Streaming),
                    run_id: transaction.run_id.clone(),
                    batch_id: transaction.batch_id.clone(),
                };
                let raw = Some(payload.to_vec());
                self.valid.push(Envelope { transaction, raw, key, lineage, trace, ack });
            }
            Err(error) => {
                self.rejected += 1;
                let failure = Failure {
                    error_type: ErrorType::Invalid,
                    stage: error.stage.into(),
                    message: error.message,
                    attempts: 1,
                };
                let value = payload.to_vec();
                self.invalid.push(DeadLetter { key, value, failure, run_id: None, trace, ack });
            }
        }
    }

    /// send().await, not do_send: a slow Buffer slows the reader. Records
    /// that a restarting actor's mailbox drops report their loss through
    /// their handles, and are read again.
    pub(super) async fn send(&mut self, next: &Next) {
        let sending = Instant::now();
        METRICS.records.with_label_values(&["kafka", "read"]).inc_by(std::mem::take(&mut self.read));
        METRICS.records.with_label_values(&["kafka", "invalid"]).inc_by(std::mem::take(&mut self.rejected));
        if !self.valid.is_empty() && next.buffer.send(Ingest(std::mem::take(&mut self.valid))).await.is_err() {
            tracing::warn!("the Buffer is restarting; its records will be read again");
        }
        if !self.invalid.is_empty()
            && next.dlq_publisher.send(DeadLetters(std::mem::take(&mut self.invalid))).await.is_err()
        {
            tracing::warn!("the DlqPublisher is restarting; its records will be read again");
        }
        self.waited += sending.elapsed();
    }
}
