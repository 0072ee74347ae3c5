//! The supervised actix pipeline (contract §1), one file per actor:
//!
//! ```text
//! KafkaReader ─┐                      ┌─> DbWriter ──> PostgreSQL
//!              ├─> Buffer ─> PredictClient
//! CsvLoader ───┘                      └─> DlqPublisher ──> Kafka DLQ
//!                                Backfill: predicts stored transactions that have none
//! ```
//!
//! Every actor runs on an arbiter (thread) of its own under a `Supervisor`,
//! so an actor that fails through its error path is restarted in place, and
//! one that panics takes only its own thread down: the watchdog here sees its
//! closed mailbox and starts it again. Either way the records it held are
//! lost from memory, so [`Pipeline::work_lost`] bumps an epoch that makes
//! the KafkaReader rewind to its last durable offset and read them again;
//! writes are idempotent, so re-reading never duplicates a row.
//!
//! The pipeline's memory is bounded by a semaphore: every record read takes
//! a permit, held inside its [`messages::Envelope`] until it is durable or
//! dropped. When none are left, sources pause (backpressure).

pub mod backfill;
pub mod buffer;
pub mod csv_loader;
pub mod db_writer;
pub mod dlq_publisher;
pub mod kafka_reader;
pub mod messages;
pub mod predict_client;
pub mod prediction_fan_out;

use actix::{Actor, Addr, Arbiter, ArbiterHandle, Context, Supervised, Supervisor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::batch::BatchRuns;
use crate::config::Config;
use crate::db::PgPool;
use crate::domain::offsets::OffsetTracker;
use crate::domain::origin::Origin;
use crate::domain::run_progress::RowOutcome;
use crate::metrics::METRICS;
use crate::ml_client::MlClient;

/// The actors' names, as the chaos endpoint and the restart metric name them.
pub const ACTOR_NAMES: [&str; 7] =
    ["kafka_reader", "buffer", "predict_client", "db_writer", "dlq_publisher", "csv_loader", "backfill"];

/// What every actor shares: configuration, clients, the capacity, the
/// offsets in flight and the addresses of the other actors.
pub struct Pipeline {
    pub config: Config,
    pub pool: PgPool,
    pub ml: MlClient,
    pub producer: crate::kafka::Producer,
    /// Records in memory (`buffer.capacity`).
    pub capacity: Arc<Semaphore>,
    /// Bytes those records hold (`buffer.capacity_bytes`).
    pub capacity_bytes: Arc<Semaphore>,
    /// Predictions queued for the fan-out topic (`buffer.capacity`).
    pub fan_out_slots: Arc<Semaphore>,
    offsets: Mutex<OffsetTracker>,
    /// Batch runs and the progress of each (the CsvLoader's acknowledgements).
    pub batches: BatchRuns,
    /// This process, as the `batch_runs` table names the one running a run:
    /// `host/pid`.
    pub instance: String,
    epoch: AtomicU64,
    shutting_down: AtomicBool,
    addrs: RwLock<Option<Addrs>>,
    /// Every arbiter thread started, joined by [`Pipeline::stop_arbiters`].
    threads: Mutex<Vec<Arbiter>>,
}

/// The running actors and the arbiters they live on.
#[derive(Clone)]
pub struct Addrs {
    pub kafka_reader: Option<Addr<kafka_reader::KafkaReader>>,
    pub buffer: Addr<buffer::Buffer>,
    pub predict_client: Addr<predict_client::PredictClient>,
    pub db_writer: Addr<db_writer::DbWriter>,
    pub dlq_publisher: Addr<dlq_publisher::DlqPublisher>,
    pub csv_loader: Addr<csv_loader::CsvLoader>,
    pub backfill: Addr<backfill::Backfill>,
    arbiters: Vec<ArbiterHandle>,
}

impl Addrs {
    /// Sends a chaos hook to the actor of that name; false when none runs.
    pub fn chaos(&self, actor: &str, chaos: messages::Chaos) -> bool {
        match actor {
            "kafka_reader" => match &self.kafka_reader {
                Some(reader) => reader.do_send(chaos),
                None => return false,
            },
            "buffer" => self.buffer.do_send(chaos),
            "predict_client" => self.predict_client.do_send(chaos),
            "db_writer" => self.db_writer.do_send(chaos),
            "dlq_publisher" => self.dlq_publisher.do_send(chaos),
            "csv_loader" => self.csv_loader.do_send(chaos),
            "backfill" => self.backfill.do_send(chaos),
            _ => return false,
        }
        true
    }
}

/// `host/pid`: unique among live processes. A container restarted in place
/// keeps its name (same host, pid 1), which is harmless: the old process is
/// gone, and its runs are the new one's to resume.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

/// Starts an actor under a supervisor on an arbiter of its own; the
/// arbiter's thread joins `threads`, to be joined at the end.
fn spawn_supervised<A, F>(threads: &Mutex<Vec<Arbiter>>, actor: &'static str, make: F) -> (Addr<A>, ArbiterHandle)
where
    A: Actor<Context = Context<A>> + Supervised,
    F: FnOnce() -> A + Send + 'static,
{
    let arbiter = Arbiter::new();
    let handle = arbiter.handle();
    // The thread runs this actor alone, so a span entered on it for good
    // names the actor in every log line the actor writes (`actor` field),
    // without a span in each handler. Runs before the actor starts: an
    // arbiter runs what it is given in order. The span lives as long as the
    // thread (its guard is never dropped).
    handle.spawn_fn(move || std::mem::forget(tracing::info_span!("actor", actor).entered()));
    let addr = Supervisor::start_in_arbiter(&handle, move |_| make());
    threads.lock().expect("threads lock").push(arbiter);
    (addr, handle)
}

impl Pipeline {
    pub fn new(config: Config, pool: PgPool, ml: MlClient, producer: crate::kafka::Producer) -> Arc<Pipeline> {
        let capacity = Arc::new(Semaphore::new(config.buffer.capacity));
        let capacity_bytes = Arc::new(Semaphore::new(config.buffer.capacity_bytes));
        let fan_out_slots = Arc::new(Semaphore::new(config.buffer.capacity));
        Arc::new(Pipeline {
            fan_out_slots,
            config,
            pool,
            ml,
            producer,
            capacity,
            capacity_bytes,
            offsets: Mutex::new(OffsetTracker::default()),
            batches: BatchRuns::default(),
            instance: instance_name(),
            epoch: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            addrs: RwLock::new(None),
            threads: Mutex::default(),
        })
    }

    /// Starts every actor; `read_kafka` adds the KafkaReader.
    pub fn start(self: &Arc<Self>, read_kafka: bool) {
        let mut arbiters = Vec::new();
        macro_rules! start {
            ($module:ident :: $actor:ident) => {{
                let pipeline = self.clone();
                let (addr, arbiter) =
                    spawn_supervised(&self.threads, stringify!($module), move || $module::$actor::new(pipeline));
                arbiters.push(arbiter);
                addr
            }};
        }
        let dlq_publisher = start!(dlq_publisher::DlqPublisher);
        let db_writer = start!(db_writer::DbWriter);
        let predict_client = start!(predict_client::PredictClient);
        let buffer = start!(buffer::Buffer);
        let backfill = start!(backfill::Backfill);
        let csv_loader = start!(csv_loader::CsvLoader);
        *self.addrs.write().expect("addrs lock") = Some(Addrs {
            kafka_reader: None,
            buffer,
            predict_client,
            db_writer,
            dlq_publisher,
            csv_loader,
            backfill,
            arbiters: Vec::new(),
        });
        if read_kafka {
            let reader = start!(kafka_reader::KafkaReader);
            self.with_addrs(|addrs| addrs.kafka_reader = Some(reader));
        }
        self.with_addrs(|addrs| addrs.arbiters = arbiters);
        self.clone().start_watchdog();
    }

    fn with_addrs(&self, change: impl FnOnce(&mut Addrs)) {
        if let Some(addrs) = self.addrs.write().expect("addrs lock").as_mut() {
            change(addrs);
        }
    }

    /// The current addresses (they change when the watchdog restarts an actor).
    pub fn addrs(&self) -> Addrs {
        self.addrs.read().expect("addrs lock").clone().expect("the pipeline is started")
    }

    /// Re-creates every actor whose mailbox closed: a panic ended its thread.
    fn start_watchdog(self: Arc<Self>) {
        actix::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            loop {
                ticker.tick().await;
                let addrs = self.addrs();
                macro_rules! revive {
                    ($field:ident, $module:ident :: $actor:ident) => {
                        if !addrs.$field.connected() {
                            let p = self.clone();
                            let (addr, arbiter) =
                                spawn_supervised(&self.threads, stringify!($module), move || $module::$actor::new(p));
                            self.with_addrs(|a| {
                                a.$field = addr;
                                a.arbiters.push(arbiter);
                            });
                            self.work_lost(stringify!($field), "its mailbox closed (panic)");
                        }
                    };
                }
                revive!(buffer, buffer::Buffer);
                revive!(predict_client, predict_client::PredictClient);
                revive!(db_writer, db_writer::DbWriter);
                revive!(dlq_publisher, dlq_publisher::DlqPublisher);
                revive!(backfill, backfill::Backfill);
                if !addrs.csv_loader.connected() {
                    // Its unsent rows are read again by the new loader's
                    // started(); nothing elsewhere was lost.
                    let p = self.clone();
                    let (addr, arbiter) =
                        spawn_supervised(&self.threads, "csv_loader", move || csv_loader::CsvLoader::new(p));
                    self.with_addrs(|a| {
                        a.csv_loader = addr;
                        a.arbiters.push(arbiter);
                    });
                    METRICS.actor_restarts.with_label_values(&["csv_loader"]).inc();
                    tracing::warn!(actor = "csv_loader", "actor restarted; its batch runs resume");
                }
                if let Some(reader) = &addrs.kafka_reader
                    && !reader.connected()
                    && !self.is_shutting_down()
                {
                    let p = self.clone();
                    let (addr, arbiter) =
                        spawn_supervised(&self.threads, "kafka_reader", move || kafka_reader::KafkaReader::new(p));
                    self.with_addrs(|a| {
                        a.kafka_reader = Some(addr);
                        a.arbiters.push(arbiter);
                    });
                    self.work_lost("kafka_reader", "its mailbox closed (panic)");
                }
            }
        });
    }

    /// An actor restarted and the records it held are gone: count it, and
    /// make the sources read again from what is durable.
    pub fn work_lost(&self, actor: &'static str, why: &str) {
        METRICS.actor_restarts.with_label_values(&[actor]).inc();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(actor, why, "actor restarted; in-flight records will be read again");
    }

    /// Changes whenever in-flight work may have been lost.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The records are in PostgreSQL (`predicted` tells which got their
    /// prediction). A Kafka offset is durable now; a file row is settled
    /// once it is predicted, or once its `prediction_failed` dead letter is
    /// acknowledged.
    pub fn written<'a>(&self, records: impl IntoIterator<Item = (&'a messages::Envelope, bool)>) {
        let mut settled: Vec<(&str, &str, u64)> = Vec::new();
        {
            let mut offsets = self.offsets.lock().expect("offsets lock");
            for (record, predicted) in records {
                match &record.origin {
                    Origin::Kafka { partition, offset, .. } => offsets.durable(*partition, *offset),
                    Origin::File { uri, line } if predicted => {
                        settled.push((record.lineage.run_id.as_deref().unwrap_or_default(), uri, *line));
                    }
                    Origin::File { .. } => {}
                }
            }
        }
        // Rows of one flush mostly share one run and file: settle them together.
        settled.sort_unstable();
        for group in settled.chunk_by(|a, b| a.0 == b.0 && a.1 == b.1) {
            let lines = group.iter().map(|&(_, _, line)| (line, RowOutcome::Predicted));
            self.batches.settle(group[0].0, group[0].1, lines);
        }
    }

    /// The DLQ acknowledged a dead letter. An invalid or refused record's
    /// origin is durable now; a file row is settled either way.
    pub fn dead_lettered(&self, letter: &messages::DeadLetter) {
        match &letter.origin {
            Origin::Kafka { partition, offset, .. } if letter.acknowledges_origin => {
                self.offsets.lock().expect("offsets lock").durable(*partition, *offset);
            }
            Origin::Kafka { .. } => {}
            Origin::File { uri, line } => {
                let outcome =
                    if letter.acknowledges_origin { RowOutcome::Refused } else { RowOutcome::PredictionFailed };
                self.batches.settle(letter.run_id.as_deref().unwrap_or_default(), uri, [(*line, outcome)]);
            }
        }
    }

    /// The Kafka offsets in flight, for the KafkaReader.
    pub fn offsets(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        self.offsets.lock().expect("offsets lock")
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
    /// `wait`, for their threads to end, so that the actors and the clients
    /// they hold are gone before the process ends. (The "double free" once
    /// seen at exit had another cause: see `leave` in main.rs.)
    pub fn stop_arbiters(&self, wait: Duration) {
        if let Some(addrs) = self.addrs.read().expect("addrs lock").as_ref() {
            for arbiter in &addrs.arbiters {
                arbiter.stop();
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        let (done, joined) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for thread in threads {
                // A thread a panic ended joins with an error: nothing to do.
                let _ = thread.join();
            }
            let _ = done.send(());
        });
        if joined.recv_timeout(wait).is_err() {
            tracing::warn!(?wait, "actor threads still running at exit");
        }
    }
}

/// The source label of the records metric.
pub fn source_label(origin: &Origin) -> &'static str {
    match origin {
        Origin::Kafka { .. } => "kafka",
        Origin::File { .. } => "file",
    }
}

/// Applies a chaos hook inside an actor's handler: `Crash` fails through the
/// error path (the supervisor restarts the actor), `Panic` panics.
pub fn chaos<A: Actor<Context = Context<A>>>(actor: &'static str, chaos: messages::Chaos, ctx: &mut Context<A>) {
    use actix::ActorContext;
    match chaos {
        messages::Chaos::Crash => {
            tracing::warn!(actor, "chaos: crashing through the error path");
            ctx.stop();
        }
        messages::Chaos::Panic => {
            tracing::warn!(actor, "chaos: panicking in a handler");
            panic!("chaos: {actor} panics in a handler");
        }
    }
}
