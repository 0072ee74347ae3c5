//! Re-prediction runs: stored transactions predicted again by a model, into
//! `prediction_history` only (kind `repredict`); the current predictions
//! change only when a version is promoted (`txnflow models promote`).
//!
//! A run reads the selected transactions in id order, a chunk at a time,
//! reading, predicting and writing three successive chunks at once, and
//! asks the ML API through the same [`MlClient`] as the pipeline
//! (batches, retries, breaker, bisection, per-record checks), holding at
//! most `repredict.max_share` of `predict.concurrency` in requests. Each
//! chunk's history rows, failures and the run's counts are written in one
//! database transaction, in order, so a run killed at any point resumes
//! after its last whole chunk with whole counts. The session that writes a
//! run holds its advisory lock: one run id never runs twice at once, and a run whose
//! process died is free to resume at once.
//!
//! Every selected transaction ends in history or in `repredict_failures`
//! with its reason. While the API answers nobody (outage, open breaker),
//! the chunk waits and is tried again, at most `repredict.max_unavailable_ms`;
//! then the run stops as failed, resumable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;

use crate::config::Config;
use crate::db::history::{self, RepredictRun, RunStart};
use crate::db::{self, WriteError};
use crate::domain::backoff::Backoff;
use crate::domain::prediction::{PredictRequestItem, Prediction};
use crate::domain::rollout::Selection;
use crate::ml::client::{MlClient, Predicted};
use crate::observability::metrics::METRICS;

/// Why a run did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("re-prediction run {0} is running (another process or session holds it)")]
    Running(String),
    #[error("re-prediction run {0} was started with another selection ({1}); use another run id")]
    OtherSelection(String, String),
    #[error("{0}")]
    Database(String),
}

/// A run this session holds: its lock's connection and its row.
pub struct ClaimedRun {
    session: Session,
    run: RepredictRun,
    resumed: bool,
}

/// What a start came to.
pub enum Claim {
    Run(ClaimedRun),
    /// The run id completed before; nothing to do.
    Completed(RepredictRun),
}

/// A connection of a run. The writer's holds the run's lock: after the
/// database dropped it, the next call connects again and takes the lock
/// back; when another session has taken it meanwhile, the run is that
/// session's. The reader's holds no lock: it only reads the selection.
struct Session {
    url: String,
    run_id: String,
    connection: Option<PgConnection>,
    locked: bool,
}

impl Session {
    async fn call<T, F>(&mut self, call: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T, WriteError> + Send + 'static,
    {
        let (url, run_id, locked) = (self.url.clone(), self.run_id.clone(), self.locked);
        let connection = self.connection.take();
        let (connection, result) = tokio::task::spawn_blocking(move || {
            let mut connection = match connection {
                Some(connection) => connection,
                None => match reconnect(&url, &run_id, locked) {
                    Ok(connection) => connection,
                    Err(error) => return (None, Err(error)),
                },
            };
            let result = call(&mut connection);
            // A connection the database dropped is not kept.
            let broken = matches!(result, Err(WriteError::Unavailable(_)));
            (if broken { None } else { Some(connection) }, result)
        })
        .await
        .unwrap_or_else(|error| (None, Err(WriteError::Unavailable(format!("the database call panicked: {error}")))));
        self.connection = connection;
        result
    }
}

fn reconnect(url: &str, run_id: &str, locked: bool) -> Result<PgConnection, WriteError> {
    let mut connection = db::connect(url).map_err(|e| WriteError::Unavailable(e.to_string()))?;
    if locked && !history::lock_run(&mut connection, run_id)? {
        return Err(WriteError::Refused(format!("run {run_id} was taken over by another session")));
    }
    Ok(connection)
}

/// Takes the run `run_id` for this process: new, or resumed where it
/// stopped. `instance` names this process in the run's row.
pub async fn claim(db_url: &str, instance: &str, run_id: &str, selection: Selection) -> Result<Claim, StartError> {
    let (url, instance, run_id) = (db_url.to_string(), instance.to_string(), run_id.to_string());
    tokio::task::spawn_blocking(move || {
        let mut connection = db::connect(&url).map_err(|e| StartError::Database(format!("{e:#}")))?;
        let database = |e: WriteError| StartError::Database(crate::domain::redaction::short_reason(e));
        if !history::lock_run(&mut connection, &run_id).map_err(database)? {
            return Err(StartError::Running(run_id));
        }
        let session = |connection| Session { url, run_id: run_id.clone(), connection: Some(connection), locked: true };
        match history::start_run(&mut connection, &run_id, &selection, &instance).map_err(database)? {
            RunStart::New(run) => Ok(Claim::Run(ClaimedRun { session: session(connection), run, resumed: false })),
            RunStart::Resumed(run) => Ok(Claim::Run(ClaimedRun { session: session(connection), run, resumed: true })),
            RunStart::Completed(run) => Ok(Claim::Completed(run)),
            RunStart::OtherSelection(run) => Err(StartError::OtherSelection(run_id, describe(&run.selection()))),
        }
    })
    .await
    .unwrap_or_else(|error| Err(StartError::Database(format!("the database call panicked: {error}"))))
}

/// A selection in words, for messages.
pub fn describe(selection: &Selection) -> String {
    let mut parts = Vec::new();
    if let Some(since) = selection.since {
        parts.push(format!("since {}", since.to_rfc3339()));
    }
    if let Some(until) = selection.until {
        parts.push(format!("until {}", until.to_rfc3339()));
    }
    if let Some(model) = &selection.from_model {
        parts.push(format!("from model {model}"));
    }
    if parts.is_empty() { "every stored transaction".into() } else { parts.join(", ") }
}

/// The run's summary line, as `txnflow repredict` prints it.
pub fn summary(run: &RepredictRun, seconds: f64) -> String {
    format!(
        "run {} {}: selected {} repredicted {} failed {} model {} in {seconds:.1} s",
        run.run_id,
        run.status,
        run.selected,
        run.predicted,
        run.failed,
        run.model_version.as_deref().unwrap_or("-"),
    )
}

/// What a run needs beside its claim.
pub struct RunContext {
    pub ml: Arc<MlClient>,
    pub config: Config,
    /// Asked between chunks and while waiting: true stops the run, which
    /// stays resumable.
    pub stop: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Progress drawn on a terminal when there is one (the command); the
    /// service's runs say it in a log line every 5 s.
    pub progress_on_terminal: bool,
}

/// How a run ended in this process.
#[derive(Debug)]
pub struct RunEnd {
    /// Its row as last written (status `running` when it was stopped).
    pub run: RepredictRun,
    pub seconds: f64,
}

/// Runs a claimed run until it completes, fails, or is stopped.
pub async fn execute(claimed: ClaimedRun, context: RunContext) -> RunEnd {
    let ClaimedRun { mut session, mut run, resumed } = claimed;
    let started = Instant::now();
    let backlog = run.backlog();
    METRICS.repredict_backlog.add(backlog);
    tracing::info!(
        run_id = run.run_id,
        selected = run.selected,
        done = run.predicted + run.failed,
        requests = context.config.repredict_requests(),
        "{} re-prediction of {}",
        if resumed { "resuming" } else { "starting" },
        describe(&run.selection())
    );
    let mut remaining = backlog;
    let outcome = run_chunks(&mut session, &mut run, &context, &mut remaining).await;
    METRICS.repredict_backlog.sub(remaining);
    let end = match outcome {
        Ok(Finished::Completed) => finish(&mut session, &mut run, None).await,
        Ok(Finished::Stopped) => {
            tracing::info!(run_id = run.run_id, "re-prediction stopped; run it again to resume");
            Ok(())
        }
        Err(reason) => finish(&mut session, &mut run, Some(reason)).await,
    };
    if let Err(error) = end {
        tracing::warn!(
            run_id = run.run_id,
            error = crate::domain::redaction::short_reason(&error),
            "cannot record the run's end"
        );
    }
    RunEnd { run, seconds: started.elapsed().as_secs_f64() }
}

enum Finished {
    Completed,
    Stopped,
}

async fn finish(session: &mut Session, run: &mut RepredictRun, error: Option<String>) -> Result<(), WriteError> {
    let run_id = run.run_id.clone();
    *run = session.call(move |c| history::finish_run(c, &run_id, error.as_deref())).await?;
    Ok(())
}

/// One write of the run, in the order the chunks were read: a chunk's
/// predictions and failures, and `done_through`, its last id, once the
/// whole chunk is answered.
struct ChunkWrite {
    predictions: Vec<Prediction>,
    failures: Vec<(uuid::Uuid, String)>,
    done_through: Option<uuid::Uuid>,
}

/// The chunks, in three stages that overlap: the reader selects chunk
/// k + 2 while the ML API answers chunk k + 1 and the writer stores chunk
/// k. Each queue between them holds one chunk, so a run holds at most
/// five chunks in memory. One chunk is at the API at a time, so the run's
/// share of `predict.concurrency` stays what `repredict.max_share` allows,
/// and the writer stores the chunks in order, so the resume point is
/// always the end of a chunk that is whole in the database.
///
/// Err is why the run failed; the writer's reason comes first, then the
/// reader's, then the API stage's.
async fn run_chunks(
    session: &mut Session,
    run: &mut RepredictRun,
    context: &RunContext,
    remaining: &mut i64,
) -> Result<Finished, String> {
    let (chunk_sender, chunks) = tokio::sync::mpsc::channel(1);
    let (write_sender, writes) = tokio::sync::mpsc::channel(1);
    let reader = Session { url: session.url.clone(), run_id: run.run_id.clone(), connection: None, locked: false };
    let read = read_chunks(reader, run.clone(), run.resume_after, context, chunk_sender);
    let run_id = run.run_id.clone();
    let predict = predict_chunks(&run_id, context, chunks, write_sender);
    let write = write_chunks(session, run, context, remaining, writes);
    let (read, predict, write) = tokio::join!(read, predict, write);
    let ends = [write, read, predict];
    if let Some(reason) = ends.iter().find_map(|end| match end {
        Err(Ended::Failed(reason)) => Some(reason.clone()),
        _ => None,
    }) {
        return Err(reason);
    }
    Ok(if ends.iter().all(Result::is_ok) { Finished::Completed } else { Finished::Stopped })
}

/// Why a stage ended before the run was whole.
enum Ended {
    /// Stopped, or its neighbour ended: the run stays resumable.
    Stopped,
    Failed(String),
}

impl Ended {
    fn from_retry<T>(result: Result<Option<T>, String>) -> Result<T, Ended> {
        match result {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(Ended::Stopped),
            Err(reason) => Err(Ended::Failed(reason)),
        }
    }
}

/// The reader: each chunk of the selection after `after`, in id order,
/// until none is left (Ok) or the run stops.
async fn read_chunks(
    mut session: Session,
    snapshot: RepredictRun,
    mut after: Option<uuid::Uuid>,
    context: &RunContext,
    chunks: tokio::sync::mpsc::Sender<history::Chunk>,
) -> Result<(), Ended> {
    let settings = &context.config.repredict;
    let (max_unavailable, limit) = (Duration::from_millis(settings.max_unavailable_ms), settings.chunk_size);
    let snapshot = Arc::new(snapshot);
    loop {
        if (context.stop)() {
            return Err(Ended::Stopped);
        }
        let run = snapshot.clone();
        let read = move |c: &mut PgConnection| history::next_chunk(c, &run, after, limit);
        let chunk =
            Ended::from_retry(retry(&mut session, &*context.stop, max_unavailable, "read the next chunk", read).await)?;
        if chunk.last.is_none() {
            return Ok(());
        }
        after = chunk.last;
        chunks.send(chunk).await.map_err(|_| Ended::Stopped)?;
    }
}

/// The API stage: each chunk asked of the ML API, within the run's
/// share. While the API answers nobody, what it did answer is written and
/// the rest is asked again, for at most `repredict.max_unavailable_ms`.
async fn predict_chunks(
    run_id: &str,
    context: &RunContext,
    mut chunks: tokio::sync::mpsc::Receiver<history::Chunk>,
    writes: tokio::sync::mpsc::Sender<ChunkWrite>,
) -> Result<(), Ended> {
    let max_unavailable = Duration::from_millis(context.config.repredict.max_unavailable_ms);
    while let Some(history::Chunk { items, last }) = chunks.recv().await {
        if items.is_empty() {
            // Done before a stop: only the resume point moves.
            let write = ChunkWrite { predictions: Vec::new(), failures: Vec::new(), done_through: last };
            writes.send(write).await.map_err(|_| Ended::Stopped)?;
            continue;
        }
        let mut pending = items;
        let mut unavailable_since: Option<Instant> = None;
        let mut api_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let requests = context.config.repredict_requests();
            let predicted = context.ml.predict_at_most(pending.clone(), "repredict", requests).await;
            let (left, predictions, failures) = split(&pending, predicted);
            let whole = left.is_empty();
            let write = ChunkWrite { predictions, failures, done_through: if whole { last } else { None } };
            writes.send(write).await.map_err(|_| Ended::Stopped)?;
            if whole {
                break;
            }
            // The API answered none of these: wait for it, within bounds.
            let since = *unavailable_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= max_unavailable {
                return Err(Ended::Failed(format!(
                    "the ML API answered none of {} transactions for {} s (repredict.max_unavailable_ms)",
                    left.len(),
                    since.elapsed().as_secs()
                )));
            }
            let (failures, delay) = api_backoff.next_attempt();
            tracing::warn!(
                run_id,
                waiting = left.len(),
                failures,
                "the ML API is unavailable; trying the chunk again in {} ms",
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
            // A writer that has ended (the database refused the run) stops
            // the wait too, instead of it lasting to max_unavailable_ms.
            if (context.stop)() || writes.is_closed() {
                return Err(Ended::Stopped);
            }
            pending = left;
        }
        if (context.stop)() {
            return Err(Ended::Stopped);
        }
    }
    Ok(())
}

/// The writer: each write in one database transaction on the session
/// that holds the run's lock, in order, with the run's counts and resume
/// point; its progress on the terminal, or in a line every 5 s.
async fn write_chunks(
    session: &mut Session,
    run: &mut RepredictRun,
    context: &RunContext,
    remaining: &mut i64,
    mut writes: tokio::sync::mpsc::Receiver<ChunkWrite>,
) -> Result<(), Ended> {
    let max_unavailable = Duration::from_millis(context.config.repredict.max_unavailable_ms);
    use crate::observability::progress::{Progress, Unit};
    let what = format!("re-prediction {}", run.run_id);
    let mut progress = if context.progress_on_terminal {
        Progress::start(what, Unit::Rows)
    } else {
        Progress::lines(what, Unit::Rows)
    };
    // Done out of selected; the progress counts its rate from its first
    // figure, so rows an earlier attempt did are not this attempt's rate.
    let progress_of = |run: &RepredictRun| {
        let detail = format!("repredicted {} failed {}", run.predicted, run.failed);
        ((run.predicted + run.failed).max(0) as u64, Some(run.selected.max(0) as u64), detail)
    };
    let (done, total, detail) = progress_of(run);
    progress.show(done, total, &detail);
    while let Some(ChunkWrite { predictions, failures, done_through }) = writes.recv().await {
        let write = write_or_isolate(run.run_id.clone(), predictions, failures, done_through);
        let (stored, failed) =
            Ended::from_retry(retry(session, &*context.stop, max_unavailable, "write a chunk", write).await)?;
        run.predicted += stored.len() as i64;
        run.failed += failed as i64;
        if let Some(version) = stored.last().map(|p| p.model_version.clone()) {
            run.model_version = Some(version);
        }
        METRICS.count_predictions(stored.iter().map(|p| p.model_version.as_str()), "repredict");
        let done = (stored.len() as u64 + failed) as i64;
        let settled = done.min(*remaining);
        METRICS.repredict_backlog.sub(settled);
        *remaining -= settled;
        if done_through.is_some() {
            run.resume_after = done_through;
        }
        let (done, total, detail) = progress_of(run);
        progress.show(done, total, &detail);
    }
    let (done, total, detail) = progress_of(run);
    progress.finish(done, total, &detail);
    Ok(())
}

/// A database call tried again while the database is unavailable, at most
/// `max_unavailable`; None when stopped meanwhile.
async fn retry<T, F>(
    session: &mut Session,
    stop: &(dyn Fn() -> bool + Send + Sync),
    max_unavailable: Duration,
    what: &str,
    call: F,
) -> Result<Option<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut PgConnection) -> Result<T, WriteError> + Send + Sync + Clone + 'static,
{
    let since = Instant::now();
    let mut backoff = Backoff::outage();
    loop {
        match session.call(call.clone()).await {
            Ok(value) => return Ok(Some(value)),
            Err(WriteError::Refused(reason)) => {
                return Err(format!("cannot {what}: {}", crate::domain::redaction::short_reason(reason)));
            }
            Err(WriteError::Unavailable(reason)) if since.elapsed() < max_unavailable => {
                let reason = crate::domain::redaction::short_reason(reason);
                let (failures, delay) = backoff.next_attempt();
                tracing::warn!(failures, error = reason, "cannot {what}; again in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
                if stop() {
                    return Ok(None);
                }
            }
            Err(WriteError::Unavailable(reason)) => {
                return Err(format!(
                    "cannot {what} for {} s: {}",
                    since.elapsed().as_secs(),
                    crate::domain::redaction::short_reason(reason)
                ));
            }
        }
    }
}

/// Splits an answer into the items to ask again (the API answered nobody),
/// the predictions, and the records' own failures with their reason.
fn split(
    asked: &[PredictRequestItem],
    predicted: Predicted,
) -> (Vec<PredictRequestItem>, Vec<Prediction>, Vec<(uuid::Uuid, String)>) {
    let mut failures = Vec::new();
    for (id, failure) in predicted.failures {
        if !predicted.unavailable.contains(&id) {
            failures.push((id, failure.message));
        }
    }
    let left = asked.iter().filter(|item| predicted.unavailable.contains(&item.id)).cloned().collect();
    (left, predicted.predictions, failures)
}

/// Writes a chunk's outcome; when the database refuses the predictions as
/// a whole (a value a column cannot hold), each on its own, so that the
/// refused ones join the failures. Returns the predictions stored and the
/// number of failures recorded.
fn write_or_isolate(
    run_id: String,
    predictions: Vec<Prediction>,
    failures: Vec<(uuid::Uuid, String)>,
    done_through: Option<uuid::Uuid>,
) -> impl Fn(&mut PgConnection) -> Result<(Vec<Prediction>, u64), WriteError> + Send + Sync + Clone + 'static {
    move |connection| {
        match history::write_chunk(connection, &run_id, &predictions, &failures, done_through) {
            Ok((stored, failed)) => {
                // Rows written before a resume are not counted twice.
                let stored = if stored as usize == predictions.len() {
                    predictions.clone()
                } else {
                    predictions.iter().take(stored as usize).cloned().collect()
                };
                return Ok((stored, failed));
            }
            Err(WriteError::Refused(_)) => {}
            Err(error) => return Err(error),
        }
        let mut stored = Vec::new();
        let mut failed = 0;
        for prediction in &predictions {
            let one = std::slice::from_ref(prediction);
            match history::write_chunk(connection, &run_id, one, &[], None) {
                Ok((1, _)) => stored.push(prediction.clone()),
                Ok(_) => {}
                Err(WriteError::Refused(reason)) => {
                    let reason = format!(
                        "prediction refused by the database: {}",
                        crate::domain::redaction::short_reason(reason)
                    );
                    failed +=
                        history::write_chunk(connection, &run_id, &[], &[(prediction.transaction_id, reason)], None)?.1;
                }
                Err(error) => return Err(error),
            }
        }
        failed += history::write_chunk(connection, &run_id, &[], &failures, done_through)?.1;
        Ok((stored, failed))
    }
}

/// The ML API client of re-predictions: `repredict.url` with a breaker of
/// its own, or the pipeline's (`predict.url`).
pub fn client(config: &Config) -> anyhow::Result<MlClient> {
    let mut predict = config.predict.clone();
    if !config.repredict.url.is_empty() {
        predict.url = config.repredict.url.clone();
    }
    if config.repredict.url.is_empty() {
        MlClient::new(&predict, crate::ml::breaker::build(&config.breaker))
    } else {
        MlClient::other_model(&predict, crate::ml::breaker::build_named(&config.breaker, "repredict_api"))
    }
}

pub fn new_run_id() -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("repredict-{}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), &suffix[..6])
}
