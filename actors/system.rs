//! The actor system: the resources the actors are built from, their
//! mailboxes, and the supervisor's table of what runs. The supervisor gives
//! each actor its own parameters from these (see `supervisor::ACTORS`); no
//! actor holds the system itself.

use actix::Arbiter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::batch::RunRegistry;
use crate::config::Config;
use crate::db::PgPool;
use crate::ml::client::MlClient;

use super::capacity::Capacity;
use super::{
    Mailbox, backfill, buffer, csv_loader, db_writer, dlq_publisher, kafka_reader, messages, predict_client,
    prediction_fan_out, repredictor, shadow_scorer, supervisor,
};

/// The running actors and what they are built from: built once per
/// process, held by the process and the supervisor.
pub struct ActorSystem {
    pub config: Config,
    pub pool: PgPool,
    pub ml: Arc<MlClient>,
    pub producer: crate::kafka::Producer,
    /// The records in memory and the bytes they hold.
    pub capacity: Arc<Capacity>,
    /// Batch runs and the progress of each.
    pub runs: Arc<RunRegistry>,
    /// This process, as the `batch_runs` table names the one running a run:
    /// `host/pid`.
    pub instance: String,
    pub stopping: Stopping,
    pub(super) stored_unpredicted: backfill::StoredUnpredicted,
    pub(super) fan_out: prediction_fan_out::PredictionFanOut,
    pub(super) shadow_sampler: shadow_scorer::ShadowSampler,
    pub(super) mailboxes: Mailboxes,
    /// The actors running, with their chaos hooks and arbiters.
    pub(super) running: Mutex<supervisor::Running>,
    /// Every arbiter thread started, joined at the end.
    pub(super) threads: Mutex<Vec<Arbiter>>,
}

/// Set once the process shuts down: sources stop reading, and new runs are
/// refused.
#[derive(Clone, Default)]
pub struct Stopping(Arc<AtomicBool>);

impl Stopping {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
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

impl ActorSystem {
    pub fn new(config: Config, pool: PgPool, ml: MlClient, producer: crate::kafka::Producer) -> Arc<ActorSystem> {
        let capacity = Arc::new(Capacity::new(config.buffer.capacity, config.buffer.capacity_bytes));
        let fan_out = prediction_fan_out::PredictionFanOut::new(&config, producer.clone());
        let shadow_sampler = shadow_scorer::ShadowSampler::new(&config.predict);
        Arc::new(ActorSystem {
            fan_out,
            shadow_sampler,
            config,
            pool,
            ml: Arc::new(ml),
            producer,
            capacity,
            runs: Arc::default(),
            instance: instance_name(),
            stopping: Stopping::default(),
            stored_unpredicted: Default::default(),
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

    /// What records a batch run's progress in `batch_runs`.
    pub fn run_recorder(&self) -> csv_loader::RunRecorder {
        csv_loader::RunRecorder {
            pool: self.pool.clone(),
            runs: self.runs.clone(),
            instance: self.instance.clone(),
            stale_after_ms: self.config.batch.stale_after_ms,
        }
    }

    /// Sends a chaos hook to the actor named `actor`; false when none runs.
    pub fn chaos(&self, actor: &str, chaos: messages::Chaos) -> bool {
        supervisor::chaos(self, actor, chaos)
    }

    /// Stops every arbiter (after a graceful shutdown) and waits, at most
    /// `wait`, for their threads to end.
    pub fn stop_arbiters(&self, wait: Duration) {
        supervisor::stop_all(self, wait);
    }
}
