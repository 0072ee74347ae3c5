//! KafkaReader: consumes the input topic in the consumer group, decodes and
//! validates each record with the pure rules, sends valid records to the
//! Buffer and invalid ones to the DlqPublisher, and commits offsets only as
//! far as every record before them is durable (guarantee 1).
//!
//! - The consumer runs on this actor's own arbiter, so a rebalance, whose
//!   callback may wait for in-flight records, stalls no other actor.
//! - Backpressure: every record takes a capacity permit. When none is left
//!   the reader stops polling until one returns; librdkafka then stops
//!   fetching once its prefetch queue (`queued.max.messages.kbytes`, set to
//!   4 MB) is full. We tried pausing and resuming the partitions instead, as
//!   the design card says, but a resumed partition fetches from the middle
//!   of a record batch, which Tansu 0.6 answers with the next batch: our
//!   PostgreSQL-outage test lost 326 records that way. The cost of not
//!   pausing: a stall longer than `max.poll.interval.ms` (5 min) makes the
//!   consumer leave the group; it re-reads from its last commit when back.
//! - Starting mid-batch (a committed offset, a seek) has the same hazard;
//!   [`check_start`] detects the skip and reads the gap again.
//! - On a revoke it flushes the Buffer, waits (bounded) for the records of
//!   the revoked partitions to become durable, and commits them.
//! - When another actor lost in-flight records (the pipeline's epoch moved),
//!   it seeks every partition back to its first record not durable.

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, SpawnHandle, Supervised, WrapFuture};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pipeline;
use super::messages::{Chaos, CommitNow, DeadLetter, DeadLetters, Envelope, Ingest, Lineage, StopReading};
use crate::domain::dead_letter::{ErrorType, Failure, Origin};
use crate::domain::event::{RecordError, RejectStage, parse_event};
use crate::domain::transaction::ProcessingType;
use crate::metrics::METRICS;

/// How long a revoke waits for in-flight records before committing what is durable.
const REVOKE_WAIT: Duration = Duration::from_secs(10);
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The consumer's callbacks: rebalances and statistics (consumer lag).
pub struct ReaderContext {
    pipeline: Arc<Pipeline>,
    /// The partitions this reader holds, with the group's committed offset
    /// when they were assigned: the lag's starting point.
    assigned: std::sync::Mutex<std::collections::BTreeMap<i32, Option<i64>>>,
    /// Where each partition's reading (re)started, until its first record
    /// arrives: see [`check_start`].
    starts: std::sync::Mutex<std::collections::HashMap<i32, i64>>,
}

impl ClientContext for ReaderContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::log_from_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::error_from_librdkafka(&error, reason);
    }

    /// The lag of every partition held, from the high watermark and the
    /// best known committed offset (librdkafka's, or the one read at the
    /// assignment, whichever is later).
    fn stats(&self, statistics: Statistics) {
        let topic = &self.pipeline.config.kafka.topic;
        let Some(stats) = statistics.topics.get(topic) else { return };
        let assigned = self.assigned.lock().expect("assigned lock");
        for (partition, at_assignment) in assigned.iter() {
            let Some(partition_stats) = stats.partitions.get(partition) else { continue };
            let committed = [Some(partition_stats.committed_offset), *at_assignment].into_iter().flatten().max();
            if let Some(lag) =
                crate::domain::offsets::partition_lag(partition_stats.hi_offset, partition_stats.lo_offset, committed)
            {
                METRICS.consumer_lag.with_label_values(&[topic.as_str(), &partition.to_string()]).set(lag);
            }
        }
    }
}

impl ConsumerContext for ReaderContext {
    /// Assigns partitions at explicit offsets: the group's committed offset,
    /// or, when there is none, 0 (`auto_offset_reset = "earliest"`) or the
    /// end of the partition ("latest"). Leaving it to `auto.offset.reset` asks the
    /// broker for its earliest offset, and Tansu 0.6 answered that with a
    /// later offset while records were being appended: our SIGTERM test then
    /// lost the first 288 records of a partition, committed past unread.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10));
                for element in tpl.clone().elements() {
                    let start = committed
                        .as_ref()
                        .ok()
                        .and_then(|c| c.find_partition(element.topic(), element.partition()))
                        .map(|c| c.offset())
                        .and_then(|offset| match offset {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        });
                    // No commit yet: `kafka.auto_offset_reset` decides, with
                    // "earliest" as an explicit 0 (see above) and "latest" as
                    // the end of the partition.
                    let start = match start {
                        Some(offset) => Some(offset),
                        None if self.pipeline.config.kafka.auto_offset_reset == "latest" => None,
                        None => Some(0),
                    };
                    let offset = start.map_or(Offset::End, Offset::Offset);
                    let _ = tpl.set_partition_offset(element.topic(), element.partition(), offset);
                    if let Some(start) = start {
                        self.starts.lock().expect("starts lock").insert(element.partition(), start);
                    }
                }
                if let Err(error) = &committed {
                    tracing::warn!(%error, "cannot read committed offsets; starting as kafka.auto_offset_reset says");
                }
                self.hold(tpl, committed.as_ref().ok());
                tracing::info!(assigned = ?tpl.elements().iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>(), "partitions assigned");
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                if let Err(error) = consumer.assign(tpl) {
                    tracing::error!(%error, "assign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.release(tpl);
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "unassign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions revoked: flushing and committing what is durable");
        if let Some(addrs) = self.pipeline.addrs.read().expect("addrs lock").as_ref() {
            addrs.buffer.do_send(super::messages::FlushNow);
        }
        // Blocking is fine here: this is the reader's own thread.
        let deadline = Instant::now() + REVOKE_WAIT;
        while partitions.iter().any(|p| self.pipeline.offsets().in_flight(*p) > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let topic = self.pipeline.config.kafka.topic.clone();
        let mut offsets = self.pipeline.offsets();
        let mut commit = TopicPartitionList::new();
        for (partition, offset) in offsets.committable() {
            if partitions.contains(&partition) {
                let _ = commit.add_partition_offset(&topic, partition, Offset::Offset(offset));
            }
        }
        for partition in &partitions {
            offsets.forget(*partition);
        }
        drop(offsets);
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(%error, "commit on revoke failed; the next owner re-reads from the last commit");
        }
    }
}

impl ReaderContext {
    /// Partitions assigned: their lag is exported from now on, 0 until the
    /// first statistics (every 5 s) say more, so an idle partition shows 0
    /// and the metric is never absent for a partition someone holds.
    fn hold(&self, tpl: &TopicPartitionList, committed: Option<&TopicPartitionList>) {
        let topic = &self.pipeline.config.kafka.topic;
        let mut assigned = self.assigned.lock().expect("assigned lock");
        for element in tpl.elements() {
            let offset = committed.and_then(|c| c.find_partition(element.topic(), element.partition())).and_then(|c| {
                match c.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                }
            });
            assigned.insert(element.partition(), offset);
            METRICS.consumer_lag.with_label_values(&[topic.as_str(), &element.partition().to_string()]).set(0);
        }
    }

    /// Partitions revoked: this reader no longer exports their lag (their
    /// new owner does).
    fn release(&self, tpl: &TopicPartitionList) {
        let topic = &self.pipeline.config.kafka.topic;
        let mut assigned = self.assigned.lock().expect("assigned lock");
        for element in tpl.elements() {
            assigned.remove(&element.partition());
            let _ = METRICS.consumer_lag.remove_label_values(&[topic.as_str(), &element.partition().to_string()]);
        }
    }
}

type Reader = StreamConsumer<ReaderContext>;

pub struct KafkaReader {
    pipeline: Arc<Pipeline>,
    consumer: Option<Arc<Reader>>,
    read_loop: Option<SpawnHandle>,
    /// Since when this reader holds no partition, and when it last said so.
    unassigned: Option<(Instant, Option<Instant>)>,
}

/// How long a reader may hold no partition before it warns.
const UNASSIGNED_WARNING: Duration = Duration::from_secs(30);

impl KafkaReader {
    pub fn new(pipeline: Arc<Pipeline>) -> KafkaReader {
        KafkaReader { pipeline, consumer: None, read_loop: None, unassigned: None }
    }

    /// Warns, once a minute, while the reader holds no partition. Normal when
    /// the group has more members than partitions; otherwise the group may
    /// be waiting for a member that died (Tansu waits for the rebalance
    /// timeout, 5 min, when a member joins before a dead one's session
    /// expired; see the README).
    fn watch_assignment(&mut self) {
        let Some(consumer) = &self.consumer else { return };
        let holds_partitions = consumer.assignment().is_ok_and(|tpl| tpl.count() > 0);
        if holds_partitions || self.pipeline.is_shutting_down() {
            self.unassigned = None;
            return;
        }
        let now = Instant::now();
        let (since, warned) = self.unassigned.get_or_insert((now, None));
        let due = warned.is_none_or(|at| now.duration_since(at) >= 2 * UNASSIGNED_WARNING);
        if now.duration_since(*since) >= UNASSIGNED_WARNING && due {
            tracing::warn!(
                seconds = now.duration_since(*since).as_secs(),
                "this reader holds no partition of its group; normal only if the group has more members than partitions"
            );
            *warned = Some(now);
        }
    }

    fn create_consumer(&self) -> anyhow::Result<Arc<Reader>> {
        let kafka = &self.pipeline.config.kafka;
        let consumer: Reader = crate::kafka::client_config(kafka)
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &kafka.auto_offset_reset)
            .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
            .set("statistics.interval.ms", "5000")
            .set("queued.max.messages.kbytes", "4096")
            // Tansu answers a fetch only at its max wait; keep that short so
            // a record's time in the Buffer dominates its latency.
            .set("fetch.wait.max.ms", "100")
            .create_with_context(ReaderContext {
                pipeline: self.pipeline.clone(),
                starts: Default::default(),
                assigned: Default::default(),
            })?;
        consumer.subscribe(&[&kafka.topic])?;
        Ok(Arc::new(consumer))
    }

    /// Commits every offset whose records are all durable.
    fn commit(&self, mode: CommitMode) {
        let Some(consumer) = &self.consumer else { return };
        let commits = match mode {
            CommitMode::Sync => self.pipeline.offsets().committable(),
            CommitMode::Async => self.pipeline.offsets().take_commits(),
        };
        if commits.is_empty() {
            return;
        }
        let topic = &self.pipeline.config.kafka.topic;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in commits {
            let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        if let Err(error) = consumer.commit(&list, mode) {
            tracing::warn!(%error, "offset commit failed; it is retried on the next tick");
        }
    }
}

/// Reads until stopped or an unrecoverable error.
async fn read_loop(pipeline: Arc<Pipeline>, consumer: Arc<Reader>) -> anyhow::Result<()> {
    let topic = pipeline.config.kafka.topic.clone();
    let mut seen_epoch = pipeline.epoch();
    let mut rewound = std::collections::HashSet::new();
    loop {
        if pipeline.is_shutting_down() {
            return Ok(());
        }
        if pipeline.epoch() != seen_epoch {
            seen_epoch = pipeline.epoch();
            rewind(&pipeline, &consumer, &topic)?;
        }
        let first = match consumer.recv().await {
            Ok(message) => message.detach(),
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                continue;
            }
        };
        // Take what else is already fetched, without waiting, so that one
        // message to the Buffer carries many records.
        let mut messages = vec![first];
        while messages.len() < READ_BATCH {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => messages.push(message.detach()),
                _ => break,
            }
        }
        let mut batch = ReadBatch::default();
        let mut restarted: Vec<i32> = Vec::new();
        for message in messages {
            if restarted.contains(&message.partition()) {
                continue; // fetched before the seek back; read again after it
            }
            if !check_start(&consumer, &message, &mut rewound)? {
                restarted.push(message.partition());
                continue;
            }
            // The permit is taken once a record is in hand, so an idle reader
            // holds none. When none is left, what is read so far goes on and
            // the reader stops polling until a permit returns: see the module
            // comment on why this is not pause/resume.
            let bytes = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
            let permit = match pipeline.try_reserve(bytes) {
                Some(permit) => permit,
                None => {
                    batch.send(&pipeline).await;
                    tracing::debug!(in_flight = pipeline.in_flight(), "capacity full: reading stops");
                    pipeline.reserve(bytes).await
                }
            };
            batch.add(&pipeline, &message, permit);
        }
        batch.send(&pipeline).await;
    }
}

/// Records read at once, at most.
const READ_BATCH: usize = 500;

/// What one pass of the read loop sends on: valid records to the Buffer,
/// invalid ones to the DlqPublisher.
#[derive(Default)]
struct ReadBatch {
    valid: Vec<Envelope>,
    invalid: Vec<DeadLetter>,
    /// Counted here and added to the metrics once per send, not per record.
    read: u64,
    rejected: u64,
}

impl ReadBatch {
    fn add(&mut self, pipeline: &Pipeline, message: &OwnedMessage, permit: super::messages::Capacity) {
        let origin = Origin::Kafka {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
        };
        pipeline.offsets().read(message.partition(), message.offset());
        self.read += 1;
        let payload = message.payload().unwrap_or_default();
        let key = message.key().map(<[u8]>::to_vec);
        let max_bytes = pipeline.config.kafka.max_record_bytes;
        let decoded = if payload.len() > max_bytes {
            Err(RecordError {
                stage: RejectStage::Decode,
                message: format!("record of {} bytes, over kafka.max_record_bytes ({max_bytes})", payload.len()),
            })
        } else {
            parse_event(payload)
        };
        match decoded {
            Ok(transaction) => {
                let lineage = Lineage {
                    processing_type: transaction.processing_type.unwrap_or(ProcessingType::Streaming),
                    run_id: transaction.run_id.clone(),
                    batch_id: transaction.batch_id.clone(),
                };
                self.valid.push(Envelope { transaction, origin, raw: Some(payload.to_vec()), key, lineage, permit });
            }
            Err(error) => {
                self.rejected += 1;
                let failure = Failure {
                    error_type: ErrorType::Invalid,
                    stage: error.stage.into(),
                    message: error.message,
                    attempts: 1,
                };
                self.invalid.push(DeadLetter {
                    key,
                    value: payload.to_vec(),
                    failure,
                    origin,
                    run_id: None,
                    acknowledges_origin: true,
                    permit: Some(permit),
                });
            }
        }
    }

    /// send().await, not do_send: a slow Buffer slows the reader. A record
    /// lost to a restarting actor was tracked as read and never acknowledged,
    /// so no commit passes it, and the rewind reads it again.
    async fn send(&mut self, pipeline: &Pipeline) {
        METRICS.records.with_label_values(&["kafka", "read"]).inc_by(std::mem::take(&mut self.read));
        METRICS.records.with_label_values(&["kafka", "invalid"]).inc_by(std::mem::take(&mut self.rejected));
        let addrs = pipeline.addrs();
        if !self.valid.is_empty() && addrs.buffer.send(Ingest(std::mem::take(&mut self.valid))).await.is_err() {
            tracing::warn!("the Buffer is restarting; its records will be read again");
        }
        if !self.invalid.is_empty()
            && addrs.dlq_publisher.send(DeadLetters(std::mem::take(&mut self.invalid))).await.is_err()
        {
            tracing::warn!("the DlqPublisher is restarting; its records will be read again");
        }
    }
}

/// Seeks each partition back to its first record that is not durable.
fn rewind(pipeline: &Pipeline, consumer: &Reader, topic: &str) -> anyhow::Result<()> {
    let positions = pipeline.offsets().rewind();
    tracing::info!(?positions, "rewinding to the first records not yet durable");
    for (partition, offset) in positions {
        seek(consumer, topic, partition, offset)?;
    }
    Ok(())
}

fn seek(consumer: &Reader, topic: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    consumer
        .seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot seek {topic}/{partition} to {offset}: {e}"))?;
    consumer.context().starts.lock().expect("starts lock").insert(partition, offset);
    Ok(())
}

/// How far back a read that started mid-batch steps to find a batch start.
const GAP_REWIND: i64 = 10_000;

/// Whether `message` may be used, given where its partition's reading
/// started. Tansu 0.6 answers a fetch from an offset inside a record batch
/// with the *next* batch (fetching a 10-record batch from offset 5 returned
/// offsets 10..; from 15 of 20, nothing), so a reader starting mid-batch,
/// at a committed offset or after a seek, would silently skip records. When
/// the first record after a start lies beyond it, the reader seeks back by
/// `GAP_REWIND` (to a batch start before it) and reads the gap again; records
/// read twice are harmless, writes being idempotent. Only the first record
/// after a start is checked: within continuous reading, a gap is the topic's
/// own (compaction, transaction markers) and is kept.
fn check_start(
    consumer: &Reader,
    message: &OwnedMessage,
    rewound: &mut std::collections::HashSet<(i32, i64)>,
) -> anyhow::Result<bool> {
    let partition = message.partition();
    let Some(start) = consumer.context().starts.lock().expect("starts lock").remove(&partition) else {
        return Ok(true);
    };
    if message.offset() <= start || !rewound.insert((partition, start)) {
        return Ok(true);
    }
    let back = (start - GAP_REWIND).max(0);
    tracing::warn!(
        partition,
        start,
        first = message.offset(),
        back,
        "records skipped by the broker after a start; reading again from further back"
    );
    seek(consumer, message.topic(), partition, back)?;
    Ok(false)
}

impl Actor for KafkaReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let consumer = match self.create_consumer() {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, "cannot create the Kafka consumer; retrying");
                ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                return;
            }
        };
        self.consumer = Some(consumer.clone());
        // A fresh consumer resumes from the committed offsets: forget what
        // the previous one had in flight.
        *self.pipeline.offsets() = Default::default();
        let pipeline = self.pipeline.clone();
        self.read_loop = Some(ctx.spawn(read_loop(pipeline, consumer).into_actor(self).map(|result, actor, ctx| {
            if let Err(error) = result {
                tracing::error!(%error, "the read loop failed; restarting the reader");
                actor.pipeline.work_lost("kafka_reader", "its read loop failed");
                ctx.stop();
            }
        })));
        ctx.run_interval(COMMIT_INTERVAL, |actor, _| {
            actor.commit(CommitMode::Async);
            actor.watch_assignment();
        });
    }
}

impl Supervised for KafkaReader {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Commit what is durable, then leave the group; the new consumer
        // re-reads everything after the last commit.
        self.commit(CommitMode::Sync);
        self.consumer = None;
        METRICS.actor_restarts.with_label_values(&["kafka_reader"]).inc();
    }
}

impl Handler<StopReading> for KafkaReader {
    type Result = ();

    fn handle(&mut self, _: StopReading, ctx: &mut Context<Self>) {
        // Dropping the loop drops a record caught mid-way: it was never
        // tracked as read, so no commit passes it, and it is read again.
        if let Some(read_loop) = self.read_loop.take() {
            ctx.cancel_future(read_loop);
        }
    }
}

impl Handler<CommitNow> for KafkaReader {
    type Result = ();

    fn handle(&mut self, _: CommitNow, _ctx: &mut Context<Self>) {
        self.commit(CommitMode::Sync);
    }
}

impl Handler<Chaos> for KafkaReader {
    type Result = ();

    fn handle(&mut self, chaos: Chaos, ctx: &mut Context<Self>) {
        super::chaos("kafka_reader", chaos, ctx);
    }
}
