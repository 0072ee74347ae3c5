//! Backfill: every `predict.backfill_interval_ms`, predicts the stored
//! transactions that have no prediction, in batches, until none are left
//! or the API stops answering (guarantee 2: coverage returns to 100% with
//! no operator action). The scan that finds them reads the whole table, so
//! a tick runs it only when there is reason to (`domain::backfill_scan`).
//!
//! Each transaction is claimed from the `prediction_backlog` with an
//! attempt count and a next-try time (exponential backoff), so a record the
//! API always refuses does not hold back the ones behind it, and replicas
//! never claim the same rows. Attempts lost to the API as a whole (open
//! breaker, outage, 401/403/404) are given back. Past
//! `backfill.max_attempts` a transaction is refused: it leaves the queue and
//! shows in the `refused_predictions` view.
//!
//! While the breaker is open the calls are refused at once, without
//! touching the API; after its open time the breaker lets trial calls
//! through, so the backfill is also how an idle pipeline finds the API back.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, SpawnHandle, Supervised, WrapFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::prediction_fan_out::PredictionFanOut;
use super::system::Stopping;
use crate::config::{BackfillConfig, PredictConfig};
use crate::db::{self, PgPool};
use crate::domain::backfill_scan::{ScanReason, ScanSchedule};
use crate::domain::prediction::Prediction;
use crate::ml::client::MlClient;
use crate::observability::metrics::METRICS;

pub struct Backfill {
    params: Arc<BackfillParams>,
    running: Option<SpawnHandle>,
    schedule: ScanSchedule,
}

/// What the Backfill is built from.
pub struct BackfillParams {
    /// Its tick (`backfill_interval_ms`) and round size (`batch_size` x `concurrency`).
    pub predict: PredictConfig,
    pub backfill: BackfillConfig,
    pub pool: PgPool,
    /// The pipeline's ML API client, breaker included.
    pub ml: Arc<MlClient>,
    pub fan_out: PredictionFanOut,
    pub stored_unpredicted: StoredUnpredicted,
    pub stopping: Stopping,
}

/// Set by the DbWriter when a flush stored rows without their prediction:
/// the backfill scans for them at its next tick (see `domain::backfill_scan`).
#[derive(Clone, Default)]
pub struct StoredUnpredicted(Arc<AtomicBool>);

impl StoredUnpredicted {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Backfill {
    pub fn new(params: BackfillParams) -> Backfill {
        let schedule = ScanSchedule::new(Duration::from_millis(params.backfill.full_scan_interval_ms));
        Backfill { params: Arc::new(params), running: None, schedule }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.running.is_some() || self.params.stopping.is_set() {
            return;
        }
        let params = self.params.clone();
        let started = Instant::now();
        let known = self.schedule.due(started, params.stored_unpredicted.is_set());
        let handle = ctx.spawn(scan_if_due(params, known).into_actor(self).map(move |scanned, actor, _ctx| {
            actor.running = None;
            let Some((reason, predicted, finished)) = scanned else { return };
            actor.schedule.scanning(started);
            actor.schedule.scanned(finished);
            METRICS.backfill_scans.with_label_values(&[reason.as_str()]).inc();
            if predicted > 0 {
                tracing::info!(predicted, "backfill predicted stored transactions");
            }
        }));
        self.running = Some(handle);
    }
}

/// Scans when `known` gives a reason, or when the backlog holds a due
/// retry; returns the reason, how many it predicted, and whether it saw
/// every row it could claim.
async fn scan_if_due(params: Arc<BackfillParams>, known: Option<ScanReason>) -> Option<(ScanReason, usize, bool)> {
    let reason = match known {
        Some(reason) => reason,
        None => match db::blocking(&params.pool, db::backlog_due).await {
            Ok(true) => ScanReason::BacklogDue,
            Ok(false) => return None,
            Err(error) => {
                tracing::debug!(
                    error = crate::domain::redaction::short_reason(&error),
                    "backfill cannot read the backlog"
                );
                return None;
            }
        },
    };
    // Rows stored unpredicted from here on are committed after the scan's
    // snapshot may have been taken: they set the flag again.
    params.stored_unpredicted.clear();
    let (predicted, finished) = backfill(params).await;
    Some((reason, predicted, finished))
}

/// Predicts the claimable transactions until none are left or a round
/// leaves some unpredicted. Returns how many it predicted, and false when
/// it stopped before it had seen every claimable row.
async fn backfill(params: Arc<BackfillParams>) -> (usize, bool) {
    let round = (params.predict.batch_size * params.predict.concurrency) as i64;
    let settings = &params.backfill;
    let mut predicted_total = 0;
    loop {
        let (initial, max) = (settings.initial_backoff_ms, settings.max_backoff_ms);
        let items = match db::blocking(&params.pool, move |c| db::claim_unpredicted(c, round, initial, max)).await {
            Ok(items) if !items.is_empty() => items,
            Ok(_) => return (predicted_total, true),
            Err(error) => {
                tracing::debug!(
                    error = crate::domain::redaction::short_reason(&error),
                    "backfill cannot read the database"
                );
                return (predicted_total, false);
            }
        };
        let asked = items.len();
        let predicted = params.ml.predict(items, "backfill").await;
        let stored;
        let (not_at_fault, failed): (Vec<_>, Vec<_>) =
            predicted.failures.into_iter().partition(|(id, _)| predicted.unavailable.contains(id));
        let failed: Vec<(uuid::Uuid, String)> = failed.into_iter().map(|(id, failure)| (id, failure.message)).collect();
        let not_at_fault: Vec<uuid::Uuid> = not_at_fault.into_iter().map(|(id, _)| id).collect();
        let predictions = predicted.predictions;
        let max_attempts = settings.max_attempts;
        let written = db::blocking(&params.pool, move |connection| {
            let (stored, failed) = write_predictions(connection, predictions, failed)?;
            let refused = db::record_backfill_failures(connection, &failed, &not_at_fault, max_attempts)?;
            Ok((stored, refused))
        })
        .await;
        match written {
            Ok((predictions, refused)) => {
                stored = predictions.len();
                METRICS.count_predictions(predictions.iter().map(|p| p.model_version.as_str()), "backfill");
                predicted_total += stored;
                if refused > 0 {
                    METRICS.backfill_refused.inc_by(refused as u64);
                    tracing::warn!(
                        refused,
                        max_attempts,
                        "the backfill gave up on transactions it could not predict (see the refused_predictions view)"
                    );
                }
                // Late predictions are published like the flush's own.
                if params.fan_out.is_on() && !predictions.is_empty() {
                    let room = params.fan_out.room(predictions.len()).await;
                    params.fan_out.publish(predictions, room);
                }
            }
            Err(error) => {
                tracing::debug!(
                    error = crate::domain::redaction::short_reason(&error),
                    "backfill cannot write; next round later"
                );
                return (predicted_total, false);
            }
        }
        if stored < asked {
            // Some stayed unpredicted: they are tried again once their backoff is over.
            tracing::debug!(asked, predicted = stored, "backfill round left some unpredicted; next round later");
            // The ones left are in the backlog, found when due; a full
            // round may have more behind it.
            return (predicted_total, (asked as i64) < round);
        }
    }
}

/// A transaction whose prediction failed, with the reason.
type Failed = (uuid::Uuid, String);

/// Stores the round's predictions in one database transaction; when the
/// database refuses that while it answers, each on its own, so that one
/// prediction it refuses (a value a column cannot hold, say) fails alone
/// and joins `failed`, instead of stalling every round.
fn write_predictions(
    connection: &mut diesel::pg::PgConnection,
    predictions: Vec<Prediction>,
    mut failed: Vec<Failed>,
) -> Result<(Vec<Prediction>, Vec<Failed>), db::WriteError> {
    if predictions.is_empty() || db::write_backfilled(connection, &predictions).is_ok() {
        return Ok((predictions, failed));
    }
    {
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT 1").execute(connection)?;
    }
    let mut stored = Vec::with_capacity(predictions.len());
    for prediction in predictions {
        match db::write_backfilled(connection, std::slice::from_ref(&prediction)) {
            Ok(()) => stored.push(prediction),
            Err(error) => failed.push((
                prediction.transaction_id,
                format!("prediction refused by the database: {}", crate::domain::redaction::short_reason(&error)),
            )),
        }
    }
    Ok((stored, failed))
}

impl Actor for Backfill {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Registered here, not in new(): a restart keeps the struct but not its timers.
        let interval = Duration::from_millis(self.params.predict.backfill_interval_ms);
        ctx.run_interval(interval, |actor, ctx| actor.tick(ctx));
    }
}

impl Supervised for Backfill {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.running = None;
        // The backfill holds no pipeline records: its work is in the database.
        super::supervisor::restarted("backfill", "restarted by its supervisor");
    }
}

super::supervisor::chaos_hook!(Backfill, "backfill");
