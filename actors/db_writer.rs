//! DbWriter: stores each flush in one database transaction (contract §6),
//! then acknowledges its records' origins.
//!
//! Diesel is synchronous, so each write runs in `spawn_blocking` on tokio's
//! blocking pool, not on the async threads, with a connection from the r2d2
//! pool. We chose spawn_blocking over a SyncArbiter because a panic inside a
//! write comes back as a `JoinError` instead of killing an actor thread, and
//! because its concurrency is bounded by the pool without an unbounded
//! SyncArbiter queue in front of it.
//!
//! PostgreSQL unreachable: the same write is retried with backoff, forever,
//! and nothing is acknowledged, so the capacity fills and the sources pause
//! (guarantee 5). Data the database refuses: the flush is split in halves
//! until the refused records stand alone; those go to the DLQ as
//! `persist_failed`, and the rest is written.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use super::messages::{Chaos, DeadLetter, DeadLetters, Envelope, WriteBatch};
use super::{Pipeline, source_label};
use crate::db::{TransactionRow, WriteError, write_flush};
use crate::domain::dead_letter::{ErrorType, Failure, Stage};
use crate::domain::retry::backoff_delay;
use crate::metrics::METRICS;

pub struct DbWriter {
    pipeline: Arc<Pipeline>,
}

impl DbWriter {
    pub fn new(pipeline: Arc<Pipeline>) -> DbWriter {
        DbWriter { pipeline }
    }
}

impl Actor for DbWriter {
    type Context = Context<Self>;
}

impl Supervised for DbWriter {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.pipeline.work_lost("db_writer", "restarted by its supervisor");
    }
}

/// Refused records of a write, by position in the flush, with the reason.
type Refused = Vec<(usize, String)>;

/// Writes the records at `positions`, splitting on refused data.
fn write_positions(
    connection: &mut diesel::pg::PgConnection,
    batch: &WriteBatch,
    positions: &[usize],
) -> Result<Refused, WriteError> {
    let rows: Vec<TransactionRow<'_>> = positions
        .iter()
        .map(|&i| {
            let record = &batch.records[i];
            TransactionRow {
                transaction: &record.transaction,
                processing_type: record.lineage.processing_type,
                run_id: record.lineage.run_id.as_deref(),
                batch_id: record.lineage.batch_id.as_deref(),
                source: record.origin.to_string(),
            }
        })
        .collect();
    let predictions: Vec<_> =
        positions.iter().filter_map(|&i| batch.predictions.get(&batch.records[i].transaction.id).cloned()).collect();
    match write_flush(connection, &rows, &predictions) {
        Ok(()) => Ok(Vec::new()),
        Err(WriteError::Refused(reason)) if positions.len() == 1 => Ok(vec![(positions[0], reason)]),
        Err(WriteError::Refused(_)) => {
            let (left, right) = positions.split_at(positions.len() / 2);
            let mut refused = write_positions(connection, batch, left)?;
            refused.extend(write_positions(connection, batch, right)?);
            Ok(refused)
        }
        Err(unavailable) => Err(unavailable),
    }
}

fn write_batch(pipeline: &Pipeline, batch: &WriteBatch) -> Result<Refused, WriteError> {
    let mut connection = pipeline.pool.get().map_err(|e| WriteError::Unavailable(e.to_string()))?;
    let positions: Vec<usize> = (0..batch.records.len()).collect();
    write_positions(&mut connection, batch, &positions)
}

/// Writes a flush until the database takes it, then acknowledges it.
async fn persist(pipeline: Arc<Pipeline>, mut batch: WriteBatch) {
    let mut attempt = 0u32;
    let refused = loop {
        attempt += 1;
        let started = Instant::now();
        let shared = pipeline.clone();
        // The blocking pool's thread is outside the actor's span: take it along.
        let span = tracing::Span::current();
        let outcome = tokio::task::spawn_blocking(move || {
            let result = span.in_scope(|| write_batch(&shared, &batch));
            (batch, result)
        })
        .await;
        let state = pipeline.pool.state();
        METRICS.db_pool_connections.with_label_values(&["idle"]).set(i64::from(state.idle_connections));
        METRICS
            .db_pool_connections
            .with_label_values(&["in_use"])
            .set(i64::from(state.connections - state.idle_connections));
        match outcome {
            Ok((returned, Ok(refused))) => {
                let label = if refused.is_empty() { "ok" } else { "data_error" };
                METRICS.db_write_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
                batch = returned;
                break refused;
            }
            Ok((returned, Err(error))) => {
                METRICS.db_write_duration.with_label_values(&["retry"]).observe(started.elapsed().as_secs_f64());
                batch = returned;
                let delay =
                    backoff_delay(attempt, Duration::from_millis(100), Duration::from_secs(5), rand::rng().random());
                tracing::warn!(attempt, ?delay, %error, "write failed; retrying (nothing is acknowledged)");
                tokio::time::sleep(delay).await;
            }
            Err(join_error) => {
                // The write panicked; its records are gone with it.
                tracing::error!(%join_error, "a database write panicked");
                pipeline.work_lost("db_writer", "a write panicked");
                return;
            }
        }
    };
    acknowledge(&pipeline, batch, refused);
}

/// Acknowledges the written records, and sends the failed predictions and
/// the refused records to the DLQ.
fn acknowledge(pipeline: &Pipeline, batch: WriteBatch, refused: Refused) {
    let mut refused: std::collections::HashMap<usize, String> = refused.into_iter().collect();
    let WriteBatch { flush_id, trigger, flushed_at, records, mut predictions, mut failures } = batch;
    let mut dead_letters = Vec::new();
    let mut predicted_for_fanout = Vec::new();
    let total = records.len();
    // Counted per source here, added to the metrics once per flush.
    let (mut written, mut predicted) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    pipeline.written(
        records
            .iter()
            .enumerate()
            .filter(|(position, _)| !refused.contains_key(position))
            .map(|(_, record)| (record, predictions.contains_key(&record.transaction.id))),
    );
    for (position, record) in records.into_iter().enumerate() {
        let source = source_label(&record.origin);
        if let Some(reason) = refused.remove(&position) {
            let failure =
                Failure { error_type: ErrorType::PersistFailed, stage: Stage::Persist, message: reason, attempts: 1 };
            dead_letters.push(dead_letter(record, failure, true));
            continue;
        }
        *written.entry(source).or_insert(0) += 1;
        if let Some(prediction) = predictions.remove(&record.transaction.id) {
            *predicted.entry(source).or_insert(0) += 1;
            predicted_for_fanout.push(prediction);
        } else {
            let failure = failures.remove(&record.transaction.id).unwrap_or(Failure {
                error_type: ErrorType::PredictionFailed,
                stage: Stage::Predict,
                message: "no prediction".into(),
                attempts: 0,
            });
            dead_letters.push(dead_letter(record, failure, false));
        }
    }
    for (source, count) in written {
        METRICS.records.with_label_values(&[source, "written"]).inc_by(count);
    }
    for (source, count) in predicted {
        METRICS.records.with_label_values(&[source, "predicted"]).inc_by(count);
    }
    METRICS.flush_duration.with_label_values(&[trigger.as_str()]).observe(flushed_at.elapsed().as_secs_f64());
    tracing::debug!(flush_id, total, dead_letters = dead_letters.len(), "flush durable");
    if !dead_letters.is_empty() {
        pipeline.addrs().dlq_publisher.do_send(DeadLetters(dead_letters));
    }
    if !pipeline.config.kafka.predictions_topic.is_empty() && !predicted_for_fanout.is_empty() {
        super::dlq_publisher::fan_out_predictions(pipeline, predicted_for_fanout);
    }
}

fn dead_letter(mut record: Envelope, failure: Failure, acknowledges_origin: bool) -> DeadLetter {
    DeadLetter {
        value: record.dead_letter_value(),
        key: record.key.or_else(|| Some(record.transaction.id.to_string().into_bytes())),
        failure,
        origin: record.origin,
        run_id: record.lineage.run_id,
        acknowledges_origin,
        permit: Some(record.permit),
    }
}

impl Handler<WriteBatch> for DbWriter {
    type Result = ();

    fn handle(&mut self, batch: WriteBatch, ctx: &mut Context<Self>) {
        let span = tracing::info_span!("flush", flush_id = batch.flush_id);
        ctx.spawn(persist(self.pipeline.clone(), batch).instrument(span).into_actor(self).map(|(), _, _| ()));
    }
}

impl Handler<Chaos> for DbWriter {
    type Result = ();

    fn handle(&mut self, chaos: Chaos, ctx: &mut Context<Self>) {
        super::chaos("db_writer", chaos, ctx);
    }
}
