//! DbWriter: stores each flush in one database transaction, then settles
//! each record through its acknowledgement handle.
//!
//! Diesel is synchronous, so each write runs in `spawn_blocking` on tokio's
//! blocking pool, not on the async threads, with a connection from the r2d2
//! pool. We chose spawn_blocking over a SyncArbiter because a panic inside a
//! write comes back as a `JoinError` instead of killing an actor thread, and
//! because its concurrency is bounded by the pool without an unbounded
//! SyncArbiter queue in front of it.
//!
//! PostgreSQL unreachable: the same write is retried with backoff, and
//! nothing is acknowledged, so the capacity fills and the sources pause
//! (guarantee 5). Data the database refuses: the flush is split in halves
//! until the refused records stand alone; those go to the DLQ as
//! `persist_failed`, and the rest is written. A lone refused record is tried
//! once more without its prediction: if that is stored, only the prediction
//! failed (`prediction_failed`). An error that persists while the database
//! answers `SELECT 1` counts as a refusal, whatever its text, so no record
//! can hold its partition forever.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

use super::Pipeline;
use super::acknowledgement::Ack;
use super::dlq_publisher::DlqPublisher;
use super::mailbox::Mailbox;
use super::messages::{DeadLetter, DeadLetters, Envelope, WriteFlush};
use crate::config::WriteMethod;
use crate::db::{TransactionRow, WriteError, write_flush};
use crate::domain::dead_letter::{ErrorType, Failure, Stage};
use crate::observability::metrics::{self, METRICS, Phase, StageTimer};

pub struct DbWriter {
    pipeline: Arc<Pipeline>,
    dlq_publisher: Mailbox<DlqPublisher>,
}

impl DbWriter {
    pub fn new(pipeline: Arc<Pipeline>, dlq_publisher: Mailbox<DlqPublisher>) -> DbWriter {
        DbWriter { pipeline, dlq_publisher }
    }
}

impl Actor for DbWriter {
    type Context = Context<Self>;
}

impl Supervised for DbWriter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // The writes in flight were dropped with the old context; their
        // records' handles report them lost.
        super::supervisor::restarted("db_writer", "restarted by its supervisor");
    }
}

/// What a write refused, by position in the flush, with the reason.
#[derive(Debug, Default)]
struct Refusals {
    /// Records the database refused whole: dead-lettered as `persist_failed`.
    records: Vec<(usize, String)>,
    /// Records stored without their prediction, which the database refused:
    /// they count as `prediction_failed`, and the backfill predicts them again.
    predictions: Vec<(usize, String)>,
}

/// How much a failing write is trusted to be the database's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspicion {
    /// An error is the database's (unreachable, busy) unless it says the data is bad.
    Database,
    /// The same write kept failing while the database answers: any error
    /// that persists while `SELECT 1` works is a refusal of the data.
    Data,
}

/// Consecutive failures of one write after which it is suspected, not the database.
const SUSPECT_DATA_AFTER: u32 = 3;

/// Whether the database answers a trivial query on this connection.
fn answers(connection: &mut diesel::pg::PgConnection) -> bool {
    use diesel::RunQueryDsl;
    diesel::sql_query("SELECT 1").execute(connection).is_ok()
}

/// The refusal reason of a failed write, or the error when the database
/// itself is the problem (then the whole write is retried later).
fn refusal(
    connection: &mut diesel::pg::PgConnection,
    error: WriteError,
    suspicion: Suspicion,
) -> Result<String, WriteError> {
    match error {
        WriteError::Refused(reason) => Ok(reason),
        WriteError::Unavailable(reason) if suspicion == Suspicion::Data && answers(connection) => Ok(reason),
        unavailable => Err(unavailable),
    }
}

/// Writes the records at `positions`, splitting on refused data until each
/// refused record stands alone; a lone record is tried once more without
/// its prediction, since a bad prediction must not cost the transaction.
/// The halves of a split are written with `UNNEST`: `COPY` failed on
/// their whole already.
fn write_positions(
    connection: &mut diesel::pg::PgConnection,
    flush: &WriteFlush,
    positions: &[usize],
    method: WriteMethod,
    suspicion: Suspicion,
    refusals: &mut Refusals,
) -> Result<(), WriteError> {
    let rows: Vec<TransactionRow<'_>> = positions
        .iter()
        .map(|&i| {
            let record = &flush.records[i];
            TransactionRow {
                transaction: &record.transaction,
                processing_type: record.lineage.processing_type,
                run_id: record.lineage.run_id.as_deref(),
                batch_id: record.lineage.batch_id.as_deref(),
                source: record.ack.origin().to_string(),
            }
        })
        .collect();
    let predictions: Vec<_> =
        positions.iter().filter_map(|&i| flush.predictions.get(&flush.records[i].transaction.id).cloned()).collect();
    let Err(error) = write_flush(connection, &rows, &predictions, method) else { return Ok(()) };
    let reason = refusal(connection, error, suspicion)?;
    if positions.len() > 1 {
        let (left, right) = positions.split_at(positions.len() / 2);
        write_positions(connection, flush, left, WriteMethod::Unnest, suspicion, refusals)?;
        return write_positions(connection, flush, right, WriteMethod::Unnest, suspicion, refusals);
    }
    if predictions.is_empty() {
        refusals.records.push((positions[0], reason));
        return Ok(());
    }
    match write_flush(connection, &rows, &[], WriteMethod::Unnest) {
        Ok(_) => refusals.predictions.push((positions[0], format!("prediction refused by the database: {reason}"))),
        Err(error) => refusals.records.push((positions[0], refusal(connection, error, suspicion)?)),
    }
    Ok(())
}

/// The position of the first record of each transaction id: a record
/// delivered twice into one flush (a redelivery) is written once, and its
/// repeat is settled as its first is (see [`acknowledge`]).
fn first_of_each_id(records: &[Envelope]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::with_capacity(records.len());
    (0..records.len()).filter(|&i| seen.insert(records[i].transaction.id)).collect()
}

/// Writes a flush; `queued` is when it came to the DbWriter, so that its
/// wait for a connection (and a blocking thread) is counted apart from the write.
fn store_flush(
    pipeline: &Pipeline,
    flush: &WriteFlush,
    suspicion: Suspicion,
    queued: Instant,
) -> Result<Refusals, WriteError> {
    let mut connection = pipeline.pool.get().map_err(|e| WriteError::Unavailable(e.to_string()))?;
    metrics::Stage::DbWrite.observe(Phase::Wait, queued.elapsed());
    let _working = StageTimer::start(metrics::Stage::DbWrite, Phase::Work);
    let positions = first_of_each_id(&flush.records);
    let mut refusals = Refusals::default();
    let method = pipeline.config.db.write_method;
    write_positions(&mut connection, flush, &positions, method, suspicion, &mut refusals)?;
    Ok(refusals)
}

/// Writes a flush until the database takes it, then acknowledges it. While
/// the database is unreachable this retries without end and acknowledges
/// nothing (guarantee 5); once the same write has failed
/// [`SUSPECT_DATA_AFTER`] times, errors the database keeps giving while it
/// answers are taken as refusals of the records, which are isolated.
async fn persist(pipeline: Arc<Pipeline>, dlq_publisher: Mailbox<DlqPublisher>, mut flush: WriteFlush) {
    let mut backoff = crate::domain::backoff::Backoff::outage();
    let refusals = loop {
        let suspicion = if backoff.failures() >= SUSPECT_DATA_AFTER { Suspicion::Data } else { Suspicion::Database };
        let started = Instant::now();
        let shared = pipeline.clone();
        // The blocking pool's thread is outside the actor's span: take it along.
        let span = tracing::Span::current();
        let write_span = crate::observability::spans::DbWrite::start(&flush.span.context(), flush.records.len());
        let outcome = tokio::task::spawn_blocking(move || {
            let result = span.in_scope(|| store_flush(&shared, &flush, suspicion, started));
            (flush, result)
        })
        .await;
        let state = pipeline.pool.state();
        METRICS.db_pool_connections.with_label_values(&["idle"]).set(i64::from(state.idle_connections));
        METRICS
            .db_pool_connections
            .with_label_values(&["in_use"])
            .set(i64::from(state.connections - state.idle_connections));
        match outcome {
            Ok((returned, Ok(refusals))) => {
                let clean = refusals.records.is_empty() && refusals.predictions.is_empty();
                let label = if clean { "ok" } else { "data_error" };
                write_span.end(label);
                METRICS.db_write_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
                flush = returned;
                break refusals;
            }
            Ok((returned, Err(error))) => {
                write_span.end("retry");
                METRICS.db_write_duration.with_label_values(&["retry"]).observe(started.elapsed().as_secs_f64());
                flush = returned;
                let error = crate::domain::redaction::short_reason(&error);
                backoff
                    .wait(|attempt, delay| {
                        tracing::warn!(attempt, ?delay, error, "write failed; retrying (nothing is acknowledged)")
                    })
                    .await;
            }
            Err(join_error) => {
                write_span.end("panicked");
                // The write panicked; its records are gone with it, and
                // their handles reported them lost.
                tracing::error!(%join_error, "a database write panicked; its records are read again");
                return;
            }
        }
    };
    // Room in the fan-out queue first, holding the records: a predictions
    // topic that is down then pauses the sources instead of piling up sends.
    let room = if pipeline.config.kafka.predictions_topic.is_empty() {
        None
    } else {
        Some(super::prediction_fan_out::room(&pipeline, flush.predictions.len()).await)
    };
    acknowledge(&pipeline, &dlq_publisher, flush, refusals, room);
}

/// Settles the records written with their prediction, and sends the failed
/// predictions and the refused records to the DLQ with their handles.
fn acknowledge(
    pipeline: &Pipeline,
    dlq_publisher: &Mailbox<DlqPublisher>,
    flush: WriteFlush,
    refusals: Refusals,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let WriteFlush { flush_id, trigger, flushed_at, records, mut predictions, mut failures, mut span } = flush;
    // By id, so that a repeat of a record in this flush shares its first's fate.
    let refused: std::collections::HashMap<uuid::Uuid, String> =
        refusals.records.into_iter().map(|(position, reason)| (records[position].transaction.id, reason)).collect();
    // A refused prediction: the transaction is stored, its prediction failed.
    for (position, reason) in refusals.predictions {
        let id = records[position].transaction.id;
        predictions.remove(&id);
        let attempts = failures.get(&id).map_or(1, |failure| failure.attempts);
        failures.insert(
            id,
            Failure { error_type: ErrorType::PredictionFailed, stage: Stage::Persist, message: reason, attempts },
        );
    }
    let shadow_slot = super::shadow_scorer::sample(pipeline);
    let mut shadow_items = Vec::new();
    let mut live_categories = std::collections::HashMap::new();
    let mut dead_letters = Vec::new();
    let mut predicted_for_fanout = Vec::new();
    let mut settled = Vec::with_capacity(records.len());
    let total = records.len();
    // Counted per source here, added to the metrics once per flush.
    let (mut written, mut predicted) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    // Ids whose first record in this flush was settled: a repeat is not
    // fanned out or shadow-scored again.
    let mut seen = std::collections::HashSet::with_capacity(total);
    for mut record in records {
        let source = record.ack.origin().source_label();
        let id = record.transaction.id;
        let first = seen.insert(id);
        if let Some(reason) = refused.get(&id) {
            let failure = Failure {
                error_type: ErrorType::PersistFailed,
                stage: Stage::Persist,
                message: reason.clone(),
                attempts: 1,
            };
            dead_letters.push(dead_letter(record, failure));
            continue;
        }
        *written.entry(source).or_insert(0) += 1;
        if shadow_slot.is_some() && first {
            shadow_items.push(crate::domain::prediction::PredictRequestItem::from(&record.transaction));
        }
        if let Some(prediction) = predictions.get(&id) {
            if first {
                if shadow_slot.is_some() {
                    live_categories.insert(prediction.transaction_id, prediction.category.clone());
                }
                predicted_for_fanout.push(prediction.clone());
            }
            *predicted.entry(source).or_insert(0) += 1;
            settled.push(record.ack);
        } else {
            record.ack.stored_unpredicted();
            pipeline.stored_unpredicted.store(true, std::sync::atomic::Ordering::SeqCst);
            let failure = failures.get(&id).cloned().unwrap_or(Failure {
                error_type: ErrorType::PredictionFailed,
                stage: Stage::Predict,
                message: "no prediction".into(),
                attempts: 0,
            });
            dead_letters.push(dead_letter(record, failure));
        }
    }
    Ack::predicted(settled);
    let written_total: u64 = written.values().sum();
    for (source, count) in written {
        METRICS.records.with_label_values(&[source, "written"]).inc_by(count);
    }
    for (source, count) in predicted {
        METRICS.records.with_label_values(&[source, "predicted"]).inc_by(count);
    }
    METRICS.count_predictions(predicted_for_fanout.iter().map(|p| p.model_version.as_str()), "pipeline");
    METRICS.flush_duration.with_label_values(&[trigger.as_str()]).observe(flushed_at.elapsed().as_secs_f64());
    if let Some(slot) = shadow_slot
        && !shadow_items.is_empty()
    {
        pipeline.mailboxes.shadow_scorer.do_send(super::shadow_scorer::ScoreShadow {
            items: shadow_items,
            live: live_categories,
            slot,
        });
    }
    tracing::debug!(flush_id, total, dead_letters = dead_letters.len(), "flush durable");
    span.settled(written_total as usize, dead_letters.len());
    drop(span);
    if !dead_letters.is_empty() {
        dlq_publisher.do_send(DeadLetters(dead_letters));
    }
    if let Some(room) = room
        && !predicted_for_fanout.is_empty()
    {
        super::prediction_fan_out::publish(pipeline, predicted_for_fanout, room);
    }
}

fn dead_letter(mut record: Envelope, failure: Failure) -> DeadLetter {
    DeadLetter {
        value: record.dead_letter_value(),
        key: record.key.or_else(|| Some(record.transaction.id.to_string().into_bytes())),
        failure,
        run_id: record.lineage.run_id,
        trace: record.trace,
        ack: record.ack,
    }
}

impl Handler<WriteFlush> for DbWriter {
    type Result = ();

    fn handle(&mut self, flush: WriteFlush, ctx: &mut Context<Self>) {
        let span = tracing::info_span!("flush", flush_id = flush.flush_id, trace_id = flush.span.trace_id());
        ctx.spawn(
            persist(self.pipeline.clone(), self.dlq_publisher.clone(), flush)
                .instrument(span)
                .into_actor(self)
                .map(|(), _, _| ()),
        );
    }
}

super::supervisor::chaos_hook!(DbWriter, "db_writer");
