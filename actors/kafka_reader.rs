//! KafkaReader: consumes the input topic in the consumer group, decodes and
//! validates each record with the pure rules, sends valid records to the
//! Buffer and invalid ones to the DlqPublisher, and commits offsets only as
//! far as every record before them is durable (guarantee 1).
//!
//! - The consumer runs on this actor's own arbiter, so a rebalance, whose
//!   callback may wait for in-flight records, stalls no other actor.
//! - Backpressure: every record takes its share of the capacity. When none
//!   is left, the reader pauses its partitions and keeps polling until
//!   there is room, then resumes them: a long stall keeps the group
//!   membership (`max.poll.interval.ms` counts time between polls).
//! - Partitions start at the group's committed offsets, as librdkafka reads
//!   them (or as `auto.offset.reset` says when there is no commit). Only a
//!   partition that lost a record in flight is ever sought.
//! - Every record carries an acknowledgement handle that reports to this
//!   reader's [`ReadOffsets`]. Commits follow what it reports: an offset is
//!   committed once every record before it is settled.
//! - On a revoke it flushes the Buffer, waits (bounded) for the records of
//!   the revoked partitions to become durable, and commits them. Records of
//!   a revoked partition still in hand are dropped, and only held
//!   partitions are committed.
//! - A handle dropped unsettled (an actor crashed with its record) makes the
//!   reader seek that record's partition back to its first record not
//!   durable, and read on from there.

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, SpawnHandle, Supervised, WrapFuture};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::Pipeline;
use super::acknowledgement::{Ack, Settlement, Tracker};
use super::buffer::Buffer;
use super::dlq_publisher::DlqPublisher;
use super::mailbox::Mailbox;
use super::messages::{Capacity, CommitNow, DeadLetter, DeadLetters, Envelope, Ingest, Lineage, StopReading};
use crate::config::{GroupProtocol, ValueFormat};
use crate::domain::backoff::Backoff;
use crate::domain::dead_letter::{ErrorType, Failure};
use crate::domain::event::{RecordError, RejectStage};
use crate::domain::offsets::OffsetTracker;
use crate::domain::origin::Origin;
use crate::domain::schema_event::{SchemaLookup, read_value};
use crate::domain::transaction::ProcessingType;
use crate::domain::validation::validate;
use crate::domain::wire_format::{self, Framing};
use crate::kafka::schema_registry::SchemaRegistry;
use crate::observability::metrics::{self, METRICS, Phase, StageTimer};
use crate::observability::spans::{CommitSpan, ReadAt};

/// How long a revoke waits for in-flight records before committing what is durable.
const REVOKE_WAIT: Duration = Duration::from_secs(10);
/// How often a failed commit is offered again, and the assignment watched.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two commits that follow progress: a busy reader
/// commits at most this often, an idle one as soon as its records settle.
const COMMIT_SPACING: Duration = Duration::from_millis(200);

/// One consumer's offsets in flight: the tracker its records' handles
/// report to. A new consumer (after a restart) gets a new one, so the
/// reports of records read by the old one change nothing.
#[derive(Default)]
pub struct ReadOffsets {
    offsets: std::sync::Mutex<OffsetTracker>,
    /// Records became durable: a commit may move.
    progress: tokio::sync::Notify,
    /// A record was lost: its partition is to be read again.
    losses: tokio::sync::Notify,
}

impl ReadOffsets {
    /// The lock is taken in a handle's drop, during a panic's unwinding
    /// too: a poisoned lock is used as it is, never a second panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        self.offsets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reader is going (a restart, a panic, the end): what it has in
    /// flight is the next owner's to read, so the revoke that closing its
    /// consumer brings waits for none of it and commits nothing more.
    fn abandon(&self) {
        *self.lock() = OffsetTracker::default();
    }
}

impl Tracker for ReadOffsets {
    fn report(&self, records: &[(&Origin, u64)], settlement: Settlement) {
        let kafka = records.iter().filter_map(|(origin, generation)| match origin {
            Origin::Kafka { partition, offset, .. } => Some((*partition, *offset, *generation)),
            Origin::File { .. } => None,
        });
        match settlement {
            Settlement::Lost { stored: false } => {
                let mut offsets = self.lock();
                kafka.for_each(|(partition, offset, generation)| offsets.lost(partition, offset, generation));
                drop(offsets);
                self.losses.notify_one();
            }
            // In PostgreSQL already: durable, though its dead letter was lost.
            Settlement::Lost { stored: true } => {}
            Settlement::Predicted | Settlement::StoredUnpredicted | Settlement::DeadLettered { .. } => {
                let mut offsets = self.lock();
                kafka.for_each(|(partition, offset, _)| offsets.durable(partition, offset));
                drop(offsets);
                self.progress.notify_one();
            }
        }
    }
}

/// The consumer's callbacks: rebalances and statistics (consumer lag).
pub struct ReaderContext {
    pipeline: Arc<Pipeline>,
    offsets: Arc<ReadOffsets>,
    /// For the flush on a revoke.
    buffer: Mailbox<Buffer>,
    /// The partitions this reader holds.
    assigned: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

impl ClientContext for ReaderContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::log_from_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::error_from_librdkafka(&error, reason);
    }

    /// The lag of every partition held, from the high watermark and the
    /// committed offset librdkafka knows.
    fn stats(&self, statistics: Statistics) {
        let topic = &self.pipeline.config.kafka.topic;
        let Some(stats) = statistics.topics.get(topic) else { return };
        let assigned = self.assigned.lock().expect("assigned lock");
        for partition in assigned.iter() {
            let Some(partition_stats) = stats.partitions.get(partition) else { continue };
            let (high, low) = (partition_stats.hi_offset, partition_stats.lo_offset);
            if let Some(lag) = crate::domain::offsets::partition_lag(high, low, Some(partition_stats.committed_offset))
            {
                METRICS.consumer_lag.with_label_values(&[topic.as_str(), &partition.to_string()]).set(lag);
            }
        }
    }
}

impl ConsumerContext for ReaderContext {
    /// Assigns the partitions: librdkafka starts each at the group's
    /// committed offset (reading it again until it can), or as
    /// `auto.offset.reset` says when there is none.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.hold(tpl);
                tracing::info!(assigned = ?tpl.elements().iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>(), "partitions assigned");
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                // The consumer protocol (and a cooperative assignor) hands
                // out only what changes: add it to what is held.
                let assigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
                    _ => consumer.assign(tpl),
                };
                if let Err(error) = assigned {
                    tracing::error!(%error, "assign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.release(tpl);
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let unassigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
                    _ => consumer.unassign(),
                };
                if let Err(error) = unassigned {
                    tracing::error!(%error, "unassign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }

    /// An asynchronous commit that failed, as a whole or for a partition,
    /// is offered again on the next tick.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        let mut tracker = self.offsets.lock();
        for element in offsets.elements() {
            let failed = result.as_ref().err().cloned().or_else(|| element.error().err());
            if let (Some(error), Offset::Offset(offset)) = (failed, element.offset()) {
                tracing::warn!(%error, partition = element.partition(), offset, "offset commit failed; it is retried on the next tick");
                tracker.commit_failed(element.partition(), offset);
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions revoked: flushing and committing what is durable");
        self.buffer.do_send(super::messages::FlushNow);
        // Blocking is fine here: this is the reader's own thread.
        let deadline = Instant::now() + REVOKE_WAIT;
        while partitions.iter().any(|p| self.offsets.lock().awaited(*p) > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let topic = self.pipeline.config.kafka.topic.clone();
        let mut offsets = self.offsets.lock();
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
    /// Whether this reader holds `partition` now.
    fn holds(&self, partition: i32) -> bool {
        self.assigned.lock().expect("assigned lock").contains(&partition)
    }

    /// Partitions assigned: their lag is exported from now on, 0 until the
    /// first statistics (every 5 s) say more, so an idle partition shows 0
    /// and the metric is never absent for a partition someone holds.
    fn hold(&self, tpl: &TopicPartitionList) {
        let topic = &self.pipeline.config.kafka.topic;
        let mut assigned = self.assigned.lock().expect("assigned lock");
        for element in tpl.elements() {
            assigned.insert(element.partition());
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
    next: Next,
    consumer: Option<Arc<Reader>>,
    read_loop: Option<SpawnHandle>,
    /// Since when this reader holds no partition, and when it last said so.
    unassigned: Option<(Instant, Option<Instant>)>,
    /// Commit ticks since every committable offset was last committed again.
    ticks: u32,
}

/// Every this many commit ticks, every committable offset is committed
/// again, moved or not: a commit that failed without a word (librdkafka
/// does not always report it) is repaired within that time. Committing
/// the same offset twice is harmless.
const RECOMMIT_EVERY: u32 = 10;

/// How long a reader may hold no partition before it warns.
const UNASSIGNED_WARNING: Duration = Duration::from_secs(30);

impl KafkaReader {
    pub fn new(pipeline: Arc<Pipeline>, buffer: Mailbox<Buffer>, dlq_publisher: Mailbox<DlqPublisher>) -> KafkaReader {
        let next = Next { buffer, dlq_publisher };
        KafkaReader { pipeline, next, consumer: None, read_loop: None, unassigned: None, ticks: 0 }
    }

    /// Warns, once a minute, while the reader holds no partition. Normal when
    /// the group has more members than partitions; otherwise the group may
    /// be waiting for a member that died (until its session expires).
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

    fn create_consumer(&self, offsets: Arc<ReadOffsets>) -> anyhow::Result<Arc<Reader>> {
        let kafka = &self.pipeline.config.kafka;
        let session_timeout = kafka.session_timeout_ms.to_string();
        let mut defaults = vec![
            ("group.id", kafka.group_id.as_str()),
            ("group.protocol", kafka.group_protocol.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", kafka.auto_offset_reset.as_str()),
            ("statistics.interval.ms", "5000"),
            // The prefetch, shared by the partitions held. librdkafka stops
            // fetching while it is full and looks again after
            // fetch.queue.backoff.ms (1 s by default), which left the reader
            // waiting for records a third of the time; 16 MiB looked at
            // every 10 ms kept it fed (see docs/benchmarks.md).
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.queue.backoff.ms", "10"),
        ];
        // With the consumer protocol the broker owns the session timeout,
        // and librdkafka refuses a client-side one.
        if kafka.group_protocol == GroupProtocol::Classic {
            defaults.push(("session.timeout.ms", session_timeout.as_str()));
        }
        let consumer: Reader =
            crate::kafka::client_config_with(kafka, &defaults).create_with_context(ReaderContext {
                pipeline: self.pipeline.clone(),
                offsets,
                buffer: self.next.buffer.clone(),
                assigned: Default::default(),
            })?;
        consumer.subscribe(&[&kafka.topic])?;
        Ok(Arc::new(consumer))
    }

    fn commit(&self, commits: Commits) {
        if let Some(consumer) = &self.consumer {
            commit(consumer, commits);
        }
    }
}

/// Commits every offset whose records are all durable: those that moved
/// since the last commit, or all of them (synchronously at shutdown and on
/// a restart, asynchronously every [`RECOMMIT_EVERY`] ticks).
fn commit(consumer: &Reader, commits: Commits) {
    let context = consumer.context();
    let (commits, mode) = match commits {
        Commits::AllNow => (context.offsets.lock().committable(), CommitMode::Sync),
        Commits::All => (context.offsets.lock().committable(), CommitMode::Async),
        Commits::Moved => (context.offsets.lock().take_commits(), CommitMode::Async),
    };
    if commits.is_empty() {
        return;
    }
    let topic = &context.pipeline.config.kafka.topic;
    let mut list = TopicPartitionList::new();
    // Only what this reader holds: a revoked partition is its new owner's to commit.
    for (partition, offset) in commits.into_iter().filter(|(partition, _)| context.holds(*partition)) {
        let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if list.count() == 0 {
        return;
    }
    let group = &context.pipeline.config.kafka.group_id;
    let span = CommitSpan::start(topic, group, list.count(), matches!(mode, CommitMode::Sync));
    let committed = consumer.commit(&list, mode);
    span.end(committed.is_err());
    if let Err(error) = committed {
        tracing::warn!(%error, "offset commit failed; it is retried on the next tick");
    }
}

/// Commits as the handles report records durable, at most every
/// [`COMMIT_SPACING`].
async fn commit_on_progress(consumer: Arc<Reader>) {
    loop {
        consumer.context().offsets.progress.notified().await;
        let working = StageTimer::start(metrics::Stage::Commit, Phase::Work);
        commit(&consumer, Commits::Moved);
        drop(working);
        tokio::time::sleep(COMMIT_SPACING).await;
    }
}

/// Which offsets a commit sends, and how.
#[derive(Clone, Copy)]
enum Commits {
    /// Those that moved since the last commit, asynchronously.
    Moved,
    /// Every committable one, asynchronously.
    All,
    /// Every committable one, synchronously.
    AllNow,
}

/// Reads until stopped or an unrecoverable error.
async fn read_loop(
    pipeline: Arc<Pipeline>,
    next: Next,
    consumer: Arc<Reader>,
    registry: Option<Arc<SchemaRegistry>>,
) -> anyhow::Result<()> {
    let topic = pipeline.config.kafka.topic.clone();
    let offsets = consumer.context().offsets.clone();
    // Records received while the partitions were paused, read first.
    let mut carried: std::collections::VecDeque<OwnedMessage> = Default::default();
    loop {
        if pipeline.is_shutting_down() {
            return Ok(());
        }
        let rewinds = offsets.lock().take_rewinds();
        if !rewinds.is_empty() {
            carried.retain(|message| rewinds.iter().all(|(partition, _)| *partition != message.partition()));
            rewind(&consumer, &topic, rewinds)?;
        }
        let mut messages: Vec<OwnedMessage> = carried.drain(..).collect();
        if messages.is_empty() {
            let _idle = StageTimer::start(metrics::Stage::Read, Phase::Idle);
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => messages.push(message.detach()),
                    Err(error) => {
                        crate::kafka::warn_consumer_error(&error, "consumer error");
                        continue;
                    }
                },
                // A record was lost: rewind now, even if nothing arrives.
                () = offsets.losses.notified() => continue,
            }
        }
        // Take what else is already fetched, without waiting, so that one
        // message to the Buffer carries many records. The records in hand
        // are bounded in bytes too, headers included: a header is dropped
        // after this pass, but held until then.
        let mut in_hand: usize = messages.iter().map(message_bytes).sum();
        while messages.len() < READ_BATCH && in_hand < READ_PASS_MAX_BYTES {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => {
                    let message = message.detach();
                    in_hand += message_bytes(&message);
                    messages.push(message);
                }
                _ => break,
            }
        }
        if let Some(registry) = &registry
            && !fetch_schemas(&pipeline, &consumer, registry, &messages, &mut carried).await?
        {
            return Ok(());
        }
        let mut pass = ReadPass::new(registry.as_deref());
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            // A partition revoked since this was fetched is someone else's now.
            if !consumer.context().holds(message.partition()) {
                continue;
            }
            // The permit is taken once a record is in hand, so an idle reader
            // holds none. It counts what the record keeps: its value, its
            // key and its traceparent.
            let traceparent = crate::kafka::traceparent_of(&message);
            let bytes = message.payload().map_or(0, <[u8]>::len)
                + message.key().map_or(0, <[u8]>::len)
                + traceparent.as_ref().map_or(0, String::len);
            let permit = match pipeline.try_reserve(bytes) {
                Some(permit) => permit,
                None => {
                    pass.send(&next).await;
                    let waiting = Instant::now();
                    tracing::debug!(in_flight = pipeline.in_flight(), "capacity full: reading waits");
                    // What was fetched before the pause goes on after
                    // this record, before anything received meanwhile.
                    carried.extend(messages.by_ref());
                    let permit = wait_paused(&pipeline, &consumer, bytes, &mut carried).await?;
                    pass.waited += waiting.elapsed();
                    // Revoked during the wait: the permit goes back.
                    if consumer.context().holds(message.partition()) {
                        pass.add(&pipeline, &offsets, &message, traceparent, permit);
                    }
                    break;
                }
            };
            pass.add(&pipeline, &offsets, &message, traceparent, permit);
        }
        pass.send(&next).await;
        pass.observe();
    }
}

/// Waits for capacity. A short wait (a flush being written) is waited
/// out without polling: pausing a partition makes librdkafka drop what it
/// has prefetched for it, to be fetched again after the resume. A longer
/// one (a database outage) pauses the held partitions and keeps polling,
/// so that the group membership holds: `max.poll.interval.ms` counts the
/// time between polls. A record that still arrives is carried to the
/// next pass, in order.
async fn wait_paused(
    pipeline: &Pipeline,
    consumer: &Reader,
    bytes: usize,
    carried: &mut std::collections::VecDeque<OwnedMessage>,
) -> anyhow::Result<Capacity> {
    if let Ok(permit) = tokio::time::timeout(PAUSE_AFTER, pipeline.reserve(bytes)).await {
        return Ok(permit);
    }
    let paused = consumer.assignment()?;
    consumer.pause(&paused)?;
    tracing::info!(partitions = paused.count(), in_flight = pipeline.in_flight(), "capacity full: partitions paused");
    let reserve = pipeline.reserve(bytes);
    tokio::pin!(reserve);
    let permit = loop {
        tokio::select! {
            permit = &mut reserve => break permit,
            received = consumer.recv() => match received {
                Ok(message) => carried.push_back(message.detach()),
                Err(error) => crate::kafka::warn_consumer_error(&error, "consumer error while paused"),
            },
        }
    };
    // Resume what is still held: a rebalance meanwhile may have changed it.
    let held = consumer.assignment()?;
    consumer.resume(&held)?;
    tracing::info!(partitions = held.count(), "capacity back: partitions resumed");
    Ok(permit)
}

/// Fetches the schemas that the records in hand are framed for and that
/// are not known yet, so that each record is then read without waiting.
/// While the registry cannot answer, no record is at fault: the held
/// partitions are paused and polled (as while capacity is full), and the
/// fetch is tried again with backoff, for as long as it takes. Returns
/// false when the service stops meanwhile.
async fn fetch_schemas(
    pipeline: &Pipeline,
    consumer: &Reader,
    registry: &SchemaRegistry,
    messages: &[OwnedMessage],
    carried: &mut std::collections::VecDeque<OwnedMessage>,
) -> anyhow::Result<bool> {
    if pipeline.config.kafka.value_format == ValueFormat::Json {
        return Ok(true);
    }
    let unknown: std::collections::BTreeSet<u32> = messages
        .iter()
        .filter_map(|message| match wire_format::framing(message.payload().unwrap_or_default()) {
            Ok(Framing::Framed { schema_id, .. }) => Some(schema_id),
            _ => None,
        })
        .filter(|id| registry.cached(*id).is_none())
        .collect();
    let mut paused: Option<Instant> = None;
    let mut backoff = Backoff::outage();
    for id in unknown {
        loop {
            if pipeline.is_shutting_down() {
                return Ok(false);
            }
            let unavailable = match registry.fetch(id).await {
                Ok(_) => break,
                Err(unavailable) => unavailable,
            };
            if paused.is_none() {
                consumer.pause(&consumer.assignment()?)?;
                paused = Some(Instant::now());
            }
            METRICS.schema_registry_unavailable.inc();
            let delay = backoff.next_delay();
            crate::kafka::warn_repeated(&format!("{unavailable}; reading waits for it (schema id {id})"));
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    received = consumer.recv() => match received {
                        Ok(message) => carried.push_back(message.detach()),
                        Err(error) => crate::kafka::warn_consumer_error(&error, "consumer error while paused"),
                    },
                }
            }
        }
    }
    if let Some(since) = paused {
        consumer.resume(&consumer.assignment()?)?;
        tracing::info!(waited_s = since.elapsed().as_secs(), "the schema registry answers again: partitions resumed");
    }
    Ok(true)
}

/// How long the reader waits for capacity before it pauses its
/// partitions; far below `max.poll.interval.ms` (5 minutes by default).
const PAUSE_AFTER: Duration = Duration::from_secs(2);

/// Records read at once, at most.
const READ_BATCH: usize = 500;
/// Bytes of records (headers included) read at once, at most, past the first.
const READ_PASS_MAX_BYTES: usize = 8 * 1024 * 1024;

/// A record's bytes as fetched: value, key and every header.
fn message_bytes(message: &OwnedMessage) -> usize {
    use rdkafka::message::Headers;
    let headers = message
        .headers()
        .map_or(0, |headers| headers.iter().map(|header| header.key.len() + header.value.map_or(0, <[u8]>::len)).sum());
    message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len) + headers
}

/// The stages the reader sends to.
#[derive(Clone)]
struct Next {
    buffer: Mailbox<Buffer>,
    dlq_publisher: Mailbox<DlqPublisher>,
}

/// What one pass of the read loop sends on: valid records to the Buffer,
/// invalid ones to the DlqPublisher.
struct ReadPass<'r> {
    /// The schemas of the records framed for the registry, fetched first.
    registry: Option<&'r SchemaRegistry>,
    valid: Vec<Envelope>,
    invalid: Vec<DeadLetter>,
    /// Counted here and added to the metrics once per send, not per record.
    read: u64,
    rejected: u64,
    started: Instant,
    /// When its records were received: their read spans start there.
    received: SystemTime,
    /// Held back by the capacity or the Buffer, in this pass.
    waited: Duration,
}

impl<'r> ReadPass<'r> {
    fn new(registry: Option<&'r SchemaRegistry>) -> ReadPass<'r> {
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
    fn observe(&self) {
        metrics::Stage::Read.observe(Phase::Wait, self.waited);
        metrics::Stage::Read.observe(Phase::Work, self.started.elapsed().saturating_sub(self.waited));
    }

    fn add(
        &mut self,
        pipeline: &Pipeline,
        offsets: &Arc<ReadOffsets>,
        message: &OwnedMessage,
        traceparent: Option<String>,
        permit: Capacity,
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
        let max_bytes = pipeline.config.kafka.max_record_bytes;
        let decoded = if payload.len() > max_bytes {
            Err(RecordError {
                stage: RejectStage::Decode,
                message: format!("record of {} bytes, over kafka.max_record_bytes ({max_bytes})", payload.len()),
            })
        } else {
            let kafka = &pipeline.config.kafka;
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
            group: &pipeline.config.kafka.group_id,
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
    async fn send(&mut self, next: &Next) {
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

/// Seeks each partition that lost a record back to its first record that
/// is not durable.
fn rewind(consumer: &Reader, topic: &str, positions: Vec<(i32, i64)>) -> anyhow::Result<()> {
    tracing::info!(?positions, "records were lost in flight: reading again from the first not yet durable");
    for (partition, offset) in positions {
        seek(consumer, topic, partition, offset)?;
    }
    Ok(())
}

fn seek(consumer: &Reader, topic: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    consumer
        .seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot seek {topic}/{partition} to {offset}: {e}"))?;
    Ok(())
}

impl Actor for KafkaReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A fresh consumer resumes from the committed offsets, with offsets
        // of its own: what the previous one had in flight is not its concern.
        let offsets = Arc::new(ReadOffsets::default());
        let consumer = match self.create_consumer(offsets) {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, "cannot create the Kafka consumer; retrying");
                ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                return;
            }
        };
        let registry = match SchemaRegistry::new(&self.pipeline.config.schema_registry) {
            Ok(registry) => registry.map(Arc::new),
            Err(error) => {
                tracing::error!(%error, "cannot create the schema registry client; retrying");
                ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                return;
            }
        };
        self.consumer = Some(consumer.clone());
        ctx.spawn(commit_on_progress(consumer.clone()).into_actor(self));
        let (pipeline, next) = (self.pipeline.clone(), self.next.clone());
        let reading = read_loop(pipeline, next, consumer, registry);
        self.read_loop = Some(ctx.spawn(reading.into_actor(self).map(|result, _, ctx| {
            if let Err(error) = result {
                tracing::error!(%error, "the read loop failed; restarting the reader");
                ctx.stop();
            }
        })));
        ctx.run_interval(COMMIT_INTERVAL, |actor, _| {
            actor.ticks += 1;
            let everything = actor.ticks.is_multiple_of(RECOMMIT_EVERY);
            actor.commit(if everything { Commits::All } else { Commits::Moved });
            actor.watch_assignment();
        });
    }
}

impl Supervised for KafkaReader {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Commit what is durable, then leave the group; the new consumer
        // re-reads everything after the last commit.
        self.commit(Commits::AllNow);
        if let Some(consumer) = self.consumer.take() {
            consumer.context().offsets.abandon();
        }
        super::supervisor::restarted("kafka_reader", "restarted by its supervisor");
    }
}

impl Drop for KafkaReader {
    /// A reader dropped without a restart (a panic, the end of the process).
    fn drop(&mut self) {
        if let Some(consumer) = &self.consumer {
            consumer.context().offsets.abandon();
        }
    }
}

impl Handler<StopReading> for KafkaReader {
    type Result = ();

    fn handle(&mut self, _: StopReading, ctx: &mut Context<Self>) {
        // Dropping the loop drops the records in hand: their handles report
        // them lost, so no commit passes them, and they are read again.
        if let Some(read_loop) = self.read_loop.take() {
            ctx.cancel_future(read_loop);
        }
    }
}

impl Handler<CommitNow> for KafkaReader {
    type Result = ();

    fn handle(&mut self, _: CommitNow, _ctx: &mut Context<Self>) {
        self.commit(Commits::AllNow);
    }
}

super::supervisor::chaos_hook!(KafkaReader, "kafka_reader");
