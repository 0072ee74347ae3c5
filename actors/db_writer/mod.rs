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
//! until the refused records stand alone ([`split`]); those go to the DLQ as
//! `persist_failed`, and the rest is written. A lone refused record is tried
//! once more without its prediction: if that is stored, only the prediction
//! failed (`prediction_failed`). An error that persists while the database
//! answers `SELECT 1` counts as a refusal, whatever its text, so no record
//! can hold its partition forever.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

use super::acknowledgement::Ack;
use super::backfill::StoredUnpredicted;
use super::dlq_publisher::DlqPublisher;
use super::mailbox::Mailbox;
use super::messages::{DeadLetter, DeadLetters, Envelope, WriteFlush};
use super::prediction_fan_out::PredictionFanOut;
use super::shadow_scorer::{ShadowSampler, ShadowScorer};
use crate::config::WriteMethod;
use crate::db::{PgPool, WriteError};
use crate::domain::dead_letter::{ErrorType, Failure, Stage};
use crate::observability::metrics::{self, METRICS, Phase, StageTimer};

mod split;

use split::{FlushRows, Refusals, SUSPECT_DATA_AFTER, Suspicion, first_of_each_id, write_positions};

pub struct DbWriter {
    params: Arc<DbWriterParams>,
    dlq_publisher: Mailbox<DlqPublisher>,
}

/// What the DbWriter is built from.
pub struct DbWriterParams {
    pub pool: PgPool,
    /// `db.write_method`: how a whole flush is written.
    pub write_method: WriteMethod,
    /// Told when rows are stored without their prediction.
    pub stored_unpredicted: StoredUnpredicted,
    pub fan_out: PredictionFanOut,
    pub shadow_sampler: ShadowSampler,
    pub shadow_scorer: Mailbox<ShadowScorer>,
}

impl DbWriter {
    pub fn new(params: DbWriterParams, dlq_publisher: Mailbox<DlqPublisher>) -> DbWriter {
        DbWriter { params: Arc::new(params), dlq_publisher }
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

/// Writes a flush; `queued` is when it came to the DbWriter, so that its
/// wait for a connection (and a blocking thread) is counted apart from the write.
fn store_flush(
    params: &DbWriterParams,
    flush: &WriteFlush,
    suspicion: Suspicion,
    queued: Instant,
) -> Result<Refusals, WriteError> {
    let mut connection = params.pool.get().map_err(|e| WriteError::Unavailable(e.to_string()))?;
    metrics::Stage::DbWrite.observe(Phase::Wait, queued.elapsed());
    let _working = StageTimer::start(metrics::Stage::DbWrite, Phase::Work);
    let positions = first_of_each_id(&flush.records);
    let mut refusals = Refusals::default();
    let method = params.write_method;
    let rows = FlushRows { records: &flush.records, predictions: &flush.predictions };
    write_positions(&mut *connection, &rows, &positions, method, suspicion, &mut refusals)?;
    Ok(refusals)
}

/// Writes a flush until the database takes it, then acknowledges it. While
/// the database is unreachable this retries without end and acknowledges
/// nothing (guarantee 5); once the same write has failed
/// [`SUSPECT_DATA_AFTER`] times, errors the database keeps giving while it
/// answers are taken as refusals of the records, which are isolated.
async fn persist(params: Arc<DbWriterParams>, dlq_publisher: Mailbox<DlqPublisher>, mut flush: WriteFlush) {
    let mut backoff = crate::domain::backoff::Backoff::outage();
    let refusals = loop {
        let suspicion = if backoff.failures() >= SUSPECT_DATA_AFTER { Suspicion::Data } else { Suspicion::Database };
        let started = Instant::now();
        let shared = params.clone();
        // The blocking pool's thread is outside the actor's span: take it along.
        let span = tracing::Span::current();
        let write_span = crate::observability::spans::DbWrite::start(&flush.span.context(), flush.records.len());
        let outcome = tokio::task::spawn_blocking(move || {
            let result = span.in_scope(|| store_flush(&shared, &flush, suspicion, started));
            (flush, result)
        })
        .await;
        let state = params.pool.state();
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
                let (attempt, delay) = backoff.next_attempt();
                tracing::warn!(attempt, ?delay, error, "write failed; retrying (nothing is acknowledged)");
                tokio::time::sleep(delay).await;
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
    let room = if params.fan_out.is_on() { Some(params.fan_out.room(flush.predictions.len()).await) } else { None };
    acknowledge(&params, &dlq_publisher, flush, refusals, room);
}

/// Settles the records written with their prediction, and sends the failed
/// predictions and the refused records to the DLQ with their handles.
fn acknowledge(
    params: &DbWriterParams,
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
    let shadow_slot = params.shadow_sampler.sample();
    let mut shadow_items = Vec::new();
    let mut live_categories = std::collections::HashMap::new();
    let mut dead_letters = Vec::new();
    let mut predicted_for_fanout = Vec::new();
    let mut settled = Vec::with_capacity(records.len());
    let mut already_stored = Vec::new();
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
            if refusals.already_stored.contains(&id) {
                already_stored.push(record.ack);
            } else {
                settled.push(record.ack);
            }
        } else {
            record.ack.stored_unpredicted();
            params.stored_unpredicted.set();
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
    Ack::already_stored(already_stored);
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
        params.shadow_scorer.do_send(super::shadow_scorer::ScoreShadow {
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
        params.fan_out.publish(predicted_for_fanout, room);
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
            persist(self.params.clone(), self.dlq_publisher.clone(), flush)
                .instrument(span)
                .into_actor(self)
                .map(|(), _, _| ()),
        );
    }
}

super::supervisor::chaos_hook!(DbWriter, "db_writer");
