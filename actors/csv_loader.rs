//! CsvLoader: batch mode's source. `LoadCsv { uri, run_id }`
//! checks every file of the run first (uri, bucket, object, header), so a
//! bad input writes nothing; then it streams each file, in key order, row by
//! row, into the same Buffer the KafkaReader feeds.
//!
//! - Memory stays constant: the body is read as it arrives, each row takes
//!   a capacity permit (so a full pipeline pauses the reading), and the
//!   progress keeps one bit per line in flight (`domain::run_progress`).
//! - Valid rows carry `File{uri, line}` and batch lineage; invalid rows go to
//!   the run's error file with their line and reason.
//! - A file is done when every row is settled: written, dead-lettered or in
//!   the error file. Each row's acknowledgement handle reports to the run's
//!   [`RunRows`], which settles it in the run's progress.
//! - Lost work is read again: when a row's handle is dropped unsettled (an
//!   actor crashed with it), or this loader restarts, or the stream breaks,
//!   the file is read again from its first unsettled line; settled rows are
//!   skipped, and a row that settles twice counts once.

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseActFuture, Supervised, WrapFuture,
};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use super::acknowledgement::{Ack, Settlement, Tracker};
use super::buffer::Buffer;
use super::capacity::Capacity;
use super::mailbox::Mailbox;
use super::messages::{Envelope, FlushNow, Ingest, Lineage};
use super::system::Stopping;
use crate::batch::{self, BatchError, ErrorFile, InputFile, RunRegistry, RunSpec};
use crate::config::{BatchConfig, S3Config};
use crate::domain::origin::Origin;
use crate::domain::run_progress::{RowAction, RowOutcome};
use crate::domain::transaction::{ProcessingType, Transaction};
use crate::observability::metrics::METRICS;
use crate::observability::spans::{RecordTrace, RunSpan};

/// Rows sent to the Buffer per message.
const CHUNK: usize = 500;

/// Anyone -> CsvLoader: load a file, a prefix or a local path as one run.
/// Answers once the input is checked, with the run id, or why it cannot run.
#[derive(Message)]
#[rtype(result = "Result<String, BatchError>")]
pub struct LoadCsv {
    pub uri: String,
    pub run_id: Option<String>,
    /// What the asker may read: anything from the CLI, the allowed
    /// buckets and local roots over HTTP.
    pub policy: batch::InputPolicy,
}

pub struct CsvLoader {
    params: Arc<CsvLoaderParams>,
    buffer: Mailbox<Buffer>,
    s3: aws_sdk_s3::Client,
    /// A heartbeat is being written: the next tick skips rather than queue.
    recording: bool,
}

/// What the CsvLoader is built from.
pub struct CsvLoaderParams {
    pub batch: BatchConfig,
    pub s3: S3Config,
    pub capacity: Arc<Capacity>,
    pub stopping: Stopping,
    pub recorder: RunRecorder,
}

impl CsvLoader {
    pub fn new(params: CsvLoaderParams, buffer: Mailbox<Buffer>) -> CsvLoader {
        let s3 = crate::batch::s3::client(&params.s3);
        CsvLoader { params: Arc::new(params), buffer, s3, recording: false }
    }

    fn spawn_run(&self, spec: Arc<RunSpec>, ctx: &mut Context<Self>) {
        let (params, buffer, s3) = (self.params.clone(), self.buffer.clone(), self.s3.clone());
        let span = tracing::info_span!("batch_run", run_id = spec.run_id.as_str());
        ctx.spawn(run(params, buffer, s3, spec).instrument(span).into_actor(self));
    }
}

impl Actor for CsvLoader {
    type Context = Context<Self>;

    /// Also runs after a restart: runs still running go on where they were.
    fn started(&mut self, ctx: &mut Context<Self>) {
        for spec in self.params.recorder.runs.running() {
            tracing::info!(run_id = spec.run_id, "resuming the batch run");
            self.spawn_run(spec, ctx);
        }
        // The heartbeat: every run's progress into `batch_runs`, for the
        // other replicas' GET /batches and to show this process is alive.
        let every = Duration::from_millis(self.params.batch.heartbeat_ms);
        ctx.run_interval(every, |loader, ctx| {
            if !loader.recording {
                loader.recording = true;
                let recorder = loader.params.recorder.clone();
                let record = async move { recorder.record().await };
                ctx.spawn(record.into_actor(loader).map(|(), loader, _| loader.recording = false));
            }
        });
    }
}

impl Supervised for CsvLoader {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Only this loader's unsent rows are lost; started() reads them again.
        super::supervisor::restarted("csv_loader", "restarted by its supervisor");
    }
}

impl Handler<LoadCsv> for CsvLoader {
    type Result = ResponseActFuture<Self, Result<String, BatchError>>;

    fn handle(&mut self, load: LoadCsv, _ctx: &mut Context<Self>) -> Self::Result {
        let s3 = self.s3.clone();
        let params = self.params.clone();
        let check = async move {
            let run_id = load.run_id.unwrap_or_else(batch::new_run_id);
            let spec = batch::prepare(&s3, &load.uri, &run_id, &load.policy).await?;
            if params.recorder.runs.is_running(&run_id) {
                return Err(BatchError::AlreadyRunning(run_id));
            }
            let max_running = params.batch.max_concurrent_runs;
            if params.recorder.runs.running().len() >= max_running {
                return Err(BatchError::TooManyRuns(max_running));
            }
            params.recorder.claim(&spec).await?;
            // A re-run of a run id starts a new error file.
            for file in &spec.files {
                ErrorFile::new(&spec, file).reset();
            }
            params.recorder.runs.begin(spec, max_running)
        };
        Box::pin(check.into_actor(self).map(|checked, actor, ctx| {
            let spec = checked?;
            let run_id = spec.run_id.clone();
            tracing::info!(run_id, uri = spec.uri, files = spec.files.len(), "batch run started");
            actor.spawn_run(spec, ctx);
            Ok(run_id)
        }))
    }
}

super::supervisor::chaos_hook!(CsvLoader, "csv_loader");

/// One batch run's rows in flight: the tracker their handles report to.
/// It settles each row in the run's progress, or notes its loss there.
pub struct RunRows {
    runs: Arc<RunRegistry>,
    spec: Arc<RunSpec>,
}

impl Tracker for RunRows {
    fn report(&self, records: &[(&Origin, u64)], settlement: Settlement) {
        let rows: Vec<(&str, u64)> = records
            .iter()
            .filter_map(|(origin, _)| match origin {
                Origin::File { source_uri, line } => Some((source_uri.as_str(), *line)),
                Origin::Kafka { .. } => None,
            })
            .collect();
        let run_id = &self.spec.run_id;
        let outcome = match settlement {
            Settlement::Predicted => RowOutcome::Predicted,
            Settlement::AlreadyStored => RowOutcome::AlreadyStored,
            // Settled once its prediction_failed dead letter is acknowledged.
            Settlement::StoredUnpredicted => return,
            Settlement::DeadLettered { stored: true } => RowOutcome::PredictionFailed,
            Settlement::DeadLettered { stored: false } => RowOutcome::Refused,
            Settlement::Lost { .. } => {
                for (uri, line) in rows {
                    self.runs.lost(run_id, uri, line);
                }
                return;
            }
        };
        // A flush's rows of one run are of one file: one settle for them all.
        for file in rows.chunk_by(|a, b| a.0 == b.0) {
            self.runs.settle(run_id, file[0].0, file.iter().map(|(_, line)| (*line, outcome)));
        }
    }
}

/// Loads every file of the run not done yet, in order.
async fn run(params: Arc<CsvLoaderParams>, buffer: Mailbox<Buffer>, s3: aws_sdk_s3::Client, spec: Arc<RunSpec>) {
    let runs = &params.recorder.runs;
    let rows = Arc::new(RunRows { runs: runs.clone(), spec: spec.clone() });
    let first = runs.files_done(&spec.run_id);
    // One trace per run (per resumption, after a restart): the run's span,
    // a span per file, and the flushes of its rows under the run.
    let run_span = RunSpan::start(&spec.run_id, spec.files.len());
    let row_trace = RecordTrace::of_run(&run_span);
    for file in &spec.files[first..] {
        let _file_span = run_span.file(&file.uri);
        runs.start_file(&spec.run_id, &file.uri);
        let mut errors = ErrorFile::new(&spec, file);
        let mut backoff = crate::domain::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            if params.stopping.is_set() {
                return;
            }
            let losses = runs.losses(&spec.run_id);
            match read_file(&params, &buffer, &s3, (&rows, &row_trace), file, &mut errors, losses).await {
                Ok(Pass::Complete) => {
                    if wait_settled(runs, &spec.run_id, &file.uri, losses).await {
                        break;
                    }
                }
                Ok(Pass::WorkLost) => {}
                Ok(Pass::ShuttingDown) => return,
                Err(error) => {
                    let (_, delay) = backoff.next_attempt();
                    tracing::warn!(uri = file.uri, %error, ?delay, "reading failed; reading again from the first unsettled row");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            tracing::info!(uri = file.uri, "work was lost; reading again from the first unsettled row");
        }
        let error_file = if !errors.has_rows() {
            // A re-run without invalid rows leaves no error file behind from an earlier one.
            errors.remove_stale(&s3).await;
            None
        } else {
            match errors.finish(&s3).await {
                Ok(uri) => Some(uri),
                Err(error) => {
                    runs.finish(&spec.run_id, Some(format!("cannot store the error file: {error}")));
                    params.recorder.record().await;
                    return;
                }
            }
        };
        runs.file_done(&spec.run_id, error_file);
    }
    runs.finish(&spec.run_id, None);
    if let Some(report) = runs.report(&spec.run_id) {
        tracing::info!(summary = report.summary, "batch run completed");
    }
    params.recorder.record().await;
}

/// Records batch runs in `batch_runs` as this process's.
#[derive(Clone)]
pub struct RunRecorder {
    pub pool: crate::db::PgPool,
    pub runs: Arc<RunRegistry>,
    /// This process, as the table names the one running a run.
    pub instance: String,
    /// `batch.stale_after_ms`: when another process may take a run over.
    pub stale_after_ms: u64,
}

impl RunRecorder {
    /// Records the run in `batch_runs` as this process's, unless another live
    /// process runs it (then `AlreadyRunning`, whichever replica was asked).
    /// When PostgreSQL cannot be reached the run starts anyway: the heartbeat
    /// records it once the database is back.
    async fn claim(&self, spec: &RunSpec) -> Result<(), BatchError> {
        let report = batch::RunRegistry::starting_report(spec);
        match self.write(vec![report], true).await.map(|recorded| recorded[0].1) {
            Ok(true) => Ok(()),
            Ok(false) => Err(BatchError::AlreadyRunning(spec.run_id.clone())),
            Err(error) => {
                tracing::warn!(run_id = spec.run_id, %error, "cannot record the run in PostgreSQL; starting it anyway");
                Ok(())
            }
        }
    }

    /// Writes `reports` to `batch_runs` as this process's (see
    /// [`crate::db::record_run`] for `take_over`), on the blocking pool; each
    /// comes back with whether the row is now this process's.
    async fn write(
        &self,
        reports: Vec<batch::RunReport>,
        take_over: bool,
    ) -> Result<Vec<(batch::RunReport, bool)>, crate::db::WriteError> {
        let (instance, stale_after) = (self.instance.clone(), self.stale_after_ms);
        crate::db::blocking(&self.pool, move |connection| {
            reports
                .into_iter()
                .map(|report| {
                    crate::db::record_run(connection, &instance, &report, take_over, stale_after)
                        .map(|mine| (report, mine))
                })
                .collect()
        })
        .await
    }

    /// Writes what `batch_runs` lacks: every running run's progress, and each
    /// finished run's final report (once it is in, it is not sent again). A
    /// failure is logged and retried by the next heartbeat.
    pub async fn record(&self) {
        let reports = self.runs.to_record();
        if reports.is_empty() {
            return;
        }
        match self.write(reports, false).await {
            Ok(recorded) => {
                for (report, mine) in recorded {
                    if self.runs.recorded(&report, mine) {
                        // Another process took the run over while this one was
                        // silent (see batch.stale_after_ms). Both load it; writes
                        // are idempotent. The table keeps the other's reports.
                        tracing::warn!(run_id = report.run_id, "another instance took this batch run over");
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot record batch runs; the next heartbeat tries again"),
        }
    }
}

enum Pass {
    /// Every row was read and handed on.
    Complete,
    /// Rows in flight were lost.
    WorkLost,
    /// The service is stopping: read no more, so that what is in flight can drain.
    ShuttingDown,
}

/// Waits until every row of the file is settled; false when rows were
/// lost meanwhile (the run's losses moved past `losses`).
async fn wait_settled(runs: &RunRegistry, run_id: &str, uri: &str, losses: u64) -> bool {
    loop {
        if runs.is_file_done(run_id, uri) {
            return true;
        }
        if runs.losses(run_id) != losses {
            return false;
        }
        runs.changed(Duration::from_millis(200)).await;
    }
}

/// Rows read between two reports of the bytes read.
const BYTES_REPORTED_EVERY: u64 = 1024;

/// Reads the file once from the start, sending the rows not yet settled.
async fn read_file(
    params: &CsvLoaderParams,
    buffer: &Mailbox<Buffer>,
    s3: &aws_sdk_s3::Client,
    (tracker, row_trace): (&Arc<RunRows>, &RecordTrace),
    file: &InputFile,
    errors: &mut ErrorFile,
    losses: u64,
) -> Result<Pass, String> {
    let (runs, spec) = (&params.recorder.runs, &tracker.spec);
    let run_id = spec.run_id.as_str();
    let resume = runs.resume_line(run_id, &file.uri);
    let max_bytes = params.batch.max_record_bytes;
    let mut chunk: Vec<Envelope> = Vec::with_capacity(CHUNK);
    let mut rows = batch::RowReader::new(s3, file, max_bytes);
    for count in 0u64.. {
        // How far reading is, for the run's percent: now and then, not per row.
        if count % BYTES_REPORTED_EVERY == 0 {
            runs.read_to(run_id, &file.uri, rows.bytes_read());
        }
        let Some(row) = rows.next().await.map_err(|e| e.to_string())? else { break };
        let line = match &row {
            batch::Row::Record { line, .. } | batch::Row::Oversized { line } => *line,
        };
        if line < resume {
            continue;
        }
        if runs.losses(run_id) != losses {
            return Ok(Pass::WorkLost);
        }
        if params.stopping.is_set() {
            send(buffer, &mut chunk);
            return Ok(Pass::ShuttingDown);
        }
        let record = match row {
            batch::Row::Record { record, .. } => record,
            batch::Row::Oversized { line } => {
                // Its bytes are not kept, nor repeated: the error file says where it is and why.
                if let (RowAction::RecordInvalid, _) = runs.row(run_id, &file.uri, line, || Err::<(), _>(String::new()))
                {
                    let reason = batch::oversized_reason(max_bytes);
                    errors.record(&[], line, &reason).map_err(|e| format!("cannot write the error file: {e}"))?;
                    METRICS.records.with_label_values(&["file", "read"]).inc();
                    METRICS.records.with_label_values(&["file", "invalid"]).inc();
                }
                continue;
            }
        };
        // A settled row (on a re-read) comes back as Skip, unparsed.
        match runs.row(run_id, &file.uri, line, || file.parse_row(record)) {
            (RowAction::Send, Some(Ok(transaction))) => {
                let bytes = record.as_slice().len();
                let permit = match params.capacity.try_reserve(bytes) {
                    Some(permit) => permit,
                    None => {
                        // The pipeline is full: hand on what we hold, then wait (backpressure).
                        send(buffer, &mut chunk);
                        params.capacity.reserve(bytes).await
                    }
                };
                let ack = Ack::new(Origin::File { source_uri: file.uri.clone(), line }, permit, tracker.clone(), 0);
                chunk.push(envelope(spec, file, transaction, row_trace.clone(), ack));
                if chunk.len() >= CHUNK {
                    send(buffer, &mut chunk);
                }
            }
            (RowAction::RecordInvalid, Some(Err(reason))) => {
                let fields: Vec<Vec<u8>> = record.iter().map(<[u8]>::to_vec).collect();
                errors.record(&fields, line, &reason).map_err(|e| format!("cannot write the error file: {e}"))?;
                METRICS.records.with_label_values(&["file", "read"]).inc();
                METRICS.records.with_label_values(&["file", "invalid"]).inc();
            }
            _ => {}
        }
    }
    let last_line = rows.end_line();
    runs.read_to(run_id, &file.uri, rows.bytes_read());
    send(buffer, &mut chunk);
    runs.end_of_file(run_id, &file.uri, last_line);
    // The file's last rows need not wait for the Buffer's timer.
    buffer.do_send(FlushNow);
    Ok(Pass::Complete)
}

fn envelope(spec: &RunSpec, file: &InputFile, transaction: Transaction, trace: RecordTrace, ack: Ack) -> Envelope {
    // No raw bytes and no key: a dead letter builds them from the
    // transaction (Envelope::dead_letter_value), so rows that are written
    // cost neither.
    Envelope {
        key: None,
        raw: None,
        lineage: Lineage {
            processing_type: ProcessingType::Batch,
            run_id: Some(spec.run_id.clone()),
            batch_id: Some(file.uri.clone()),
        },
        trace,
        transaction,
        ack,
    }
}

fn send(buffer: &Mailbox<Buffer>, chunk: &mut Vec<Envelope>) {
    if chunk.is_empty() {
        return;
    }
    METRICS.records.with_label_values(&["file", "read"]).inc_by(chunk.len() as u64);
    buffer.do_send(Ingest(std::mem::take(chunk)));
}
