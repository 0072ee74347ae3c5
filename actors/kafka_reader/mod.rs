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
//!
//! The parts, one file each: [`offsets`] (what is in flight and what may
//! be committed), [`callbacks`] (librdkafka's: rebalances, commits,
//! statistics), [`commit`] (sending commits), [`read_loop`] (reading and
//! backpressure), [`decode`] (a record into an envelope or a dead letter).

use actix::{Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, SpawnHandle, Supervised, WrapFuture};
use rdkafka::consumer::{Consumer, StreamConsumer};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::buffer::Buffer;
use super::capacity::Capacity;
use super::dlq_publisher::DlqPublisher;
use super::mailbox::Mailbox;
use super::messages::{CommitNow, StopReading};
use super::system::Stopping;
use crate::config::{GroupProtocol, KafkaConfig, SchemaRegistryConfig};
use crate::kafka::schema_registry::SchemaRegistry;

mod callbacks;
mod commit;
mod decode;
mod offsets;
mod read_loop;

use callbacks::ReaderContext;
use commit::{COMMIT_INTERVAL, commit_on_progress};
use decode::Next;
use offsets::Commits;
pub use offsets::ReadOffsets;
use read_loop::read_loop;

type Reader = StreamConsumer<ReaderContext>;

/// What the KafkaReader is built from.
pub struct ReaderParams {
    pub kafka: KafkaConfig,
    pub schema_registry: SchemaRegistryConfig,
    /// Every record read takes its share; none left pauses reading.
    pub capacity: Arc<Capacity>,
    pub stopping: Stopping,
}

pub struct KafkaReader {
    params: Arc<ReaderParams>,
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
    pub fn new(params: ReaderParams, buffer: Mailbox<Buffer>, dlq_publisher: Mailbox<DlqPublisher>) -> KafkaReader {
        let next = Next { buffer, dlq_publisher };
        KafkaReader { params: Arc::new(params), next, consumer: None, read_loop: None, unassigned: None, ticks: 0 }
    }

    /// Warns, once a minute, while the reader holds no partition. Normal when
    /// the group has more members than partitions; otherwise the group may
    /// be waiting for a member that died (until its session expires).
    fn watch_assignment(&mut self) {
        let Some(consumer) = &self.consumer else { return };
        let holds_partitions = consumer.assignment().is_ok_and(|tpl| tpl.count() > 0);
        if holds_partitions || self.params.stopping.is_set() {
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
        let kafka = &self.params.kafka;
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
                params: self.params.clone(),
                offsets,
                buffer: self.next.buffer.clone(),
                assigned: Default::default(),
            })?;
        consumer.subscribe(&[&kafka.topic])?;
        Ok(Arc::new(consumer))
    }

    fn commit(&self, commits: Commits) {
        if let Some(consumer) = &self.consumer {
            commit::commit(consumer, commits);
        }
    }
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
        let registry = match SchemaRegistry::new(&self.params.schema_registry) {
            Ok(registry) => registry.map(Arc::new),
            Err(error) => {
                tracing::error!(%error, "cannot create the schema registry client; retrying");
                ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                return;
            }
        };
        self.consumer = Some(consumer.clone());
        ctx.spawn(commit_on_progress(consumer.clone()).into_actor(self));
        let (params, next) = (self.params.clone(), self.next.clone());
        let reading = read_loop(params, next, consumer, registry);
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
