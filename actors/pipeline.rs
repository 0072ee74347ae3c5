//! What every actor shares: the configuration, the clients, the bounded
//! capacity, the run registry and the stages' mailboxes.

use actix::Arbiter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::batch::RunRegistry;
use crate::config::Config;
use crate::db::PgPool;
use crate::ml::client::MlClient;

use super::{
    Mailbox, backfill, buffer, csv_loader, db_writer, dlq_publisher, kafka_reader, messages, predict_client,
    repredictor, shadow_scorer, supervisor,
};

/// What every actor shares: configuration, clients, the capacity, the
/// batch runs and the stages' mailboxes.
pub struct Pipeline {
    pub config: Config,
    pub pool: PgPool,
    pub ml: Arc<MlClient>,
    pub producer: crate::kafka::Producer,
    /// Records in memory (`buffer.capacity`).
    pub capacity: Arc<Semaphore>,
    /// Bytes those records hold (`buffer.capacity_bytes`).
    pub capacity_bytes: Arc<Semaphore>,
    /// Predictions queued for the fan-out topic (`buffer.capacity`).
    pub fan_out_slots: Arc<Semaphore>,
    /// The predictions' Avro schema and its registry id, registered on the
    /// fan-out's first use (`kafka.predictions_format = "avro"`).
    pub predictions_schema: Arc<tokio::sync::OnceCell<(u32, crate::domain::schema_event::EventSchema)>>,
    /// Flushes being scored by the shadow model (`predict.shadow_concurrency`).
    pub shadow_slots: Arc<Semaphore>,
    /// Batch runs and the progress of each.
    pub runs: Arc<RunRegistry>,
    /// This process, as the `batch_runs` table names the one running a run:
    /// `host/pid`.
    pub instance: String,
    shutting_down: AtomicBool,
    /// Set when a flush stored rows without their prediction: the backfill
    /// scans for them at its next tick (see `domain::backfill_scan`).
    pub stored_unpredicted: AtomicBool,
    pub(super) mailboxes: Mailboxes,
    /// The actors running, with their chaos hooks and arbiters.
    pub(super) running: Mutex<supervisor::Running>,
    /// Every arbiter thread started, joined at the end.
    pub(super) threads: Mutex<Vec<Arbiter>>,
}

/// Every stage's mailbox. The supervisor wires each stage with the
/// mailboxes of the stages after it, and points a mailbox at the new actor
/// when it revives one; the process (shutdown, the admin server, the CLI)
/// reaches the stages through the accessors below.
#[derive(Default)]
pub(super) struct Mailboxes {
    pub(super) kafka_reader: Mailbox<kafka_reader::KafkaReader>,
    pub(super) buffer: Mailbox<buffer::Buffer>,
    pub(super) predict_client: Mailbox<predict_client::PredictClient>,
    pub(super) db_writer: Mailbox<db_writer::DbWriter>,
    pub(super) dlq_publisher: Mailbox<dlq_publisher::DlqPublisher>,
    pub(super) csv_loader: Mailbox<csv_loader::CsvLoader>,
    pub(super) backfill: Mailbox<backfill::Backfill>,
    pub(super) repredictor: Mailbox<repredictor::Repredictor>,
    pub(super) shadow_scorer: Mailbox<shadow_scorer::ShadowScorer>,
}

/// `host/pid`: unique among live processes. A container restarted in place
/// keeps its name (same host, pid 1), which is harmless: the old process is
/// gone, and its runs are the new one's to resume.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

impl Pipeline {
    pub fn new(config: Config, pool: PgPool, ml: MlClient, producer: crate::kafka::Producer) -> Arc<Pipeline> {
        let capacity = Arc::new(Semaphore::new(config.buffer.capacity));
        let capacity_bytes = Arc::new(Semaphore::new(config.buffer.capacity_bytes));
        let fan_out_slots = Arc::new(Semaphore::new(config.buffer.capacity));
        let shadow_slots = Arc::new(Semaphore::new(config.predict.shadow_concurrency));
        Arc::new(Pipeline {
            fan_out_slots,
            predictions_schema: Arc::default(),
            shadow_slots,
            config,
            pool,
            ml: Arc::new(ml),
            producer,
            capacity,
            capacity_bytes,
            runs: Arc::default(),
            instance: instance_name(),
            shutting_down: AtomicBool::new(false),
            stored_unpredicted: AtomicBool::new(false),
            mailboxes: Mailboxes::default(),
            running: Mutex::default(),
            threads: Mutex::default(),
        })
    }

    /// Starts every actor; `read_kafka` adds the KafkaReader.
    pub fn start(self: &Arc<Self>, read_kafka: bool) {
        supervisor::start_all(self, read_kafka);
    }

    /// The KafkaReader (None in batch mode, or before it started).
    pub fn kafka_reader(&self) -> Option<actix::Addr<kafka_reader::KafkaReader>> {
        self.mailboxes.kafka_reader.addr()
    }

    pub fn buffer(&self) -> Mailbox<buffer::Buffer> {
        self.mailboxes.buffer.clone()
    }

    pub fn csv_loader(&self) -> Mailbox<csv_loader::CsvLoader> {
        self.mailboxes.csv_loader.clone()
    }

    pub fn repredictor(&self) -> Mailbox<repredictor::Repredictor> {
        self.mailboxes.repredictor.clone()
    }

    /// Sends a chaos hook to the actor named `actor`; false when none runs.
    pub fn chaos(&self, actor: &str, chaos: messages::Chaos) -> bool {
        supervisor::chaos(self, actor, chaos)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Records read and not yet durable or dropped.
    pub fn in_flight(&self) -> usize {
        self.config.buffer.capacity - self.capacity.available_permits()
    }

    /// The bytes those records hold.
    pub fn in_flight_bytes(&self) -> usize {
        self.config.buffer.capacity_bytes - self.capacity_bytes.available_permits()
    }

    /// A record's share of the capacity, for a record of `bytes`, if both
    /// bounds have room now.
    pub fn try_reserve(&self, bytes: usize) -> Option<messages::Capacity> {
        let record = self.capacity.clone().try_acquire_owned().ok()?;
        let bytes = self.capacity_bytes.clone().try_acquire_many_owned(self.byte_permits(bytes)).ok()?;
        Some(messages::Capacity { _record: record, _bytes: bytes })
    }

    /// The same, waiting until both bounds have room (backpressure).
    pub async fn reserve(&self, bytes: usize) -> messages::Capacity {
        let record = self.capacity.clone().acquire_owned().await.expect("the semaphore is never closed");
        let bytes = self
            .capacity_bytes
            .clone()
            .acquire_many_owned(self.byte_permits(bytes))
            .await
            .expect("the semaphore is never closed");
        messages::Capacity { _record: record, _bytes: bytes }
    }

    /// A record counts at least one byte, and at most the whole byte bound
    /// (a larger one still passes, alone).
    fn byte_permits(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.config.buffer.capacity_bytes) as u32
    }

    /// Stops every arbiter (after a graceful shutdown) and waits, at most
    /// `wait`, for their threads to end.
    pub fn stop_arbiters(&self, wait: Duration) {
        supervisor::stop_all(self, wait);
    }
}
