//! Backfill: every `predict.backfill_interval_ms`, predicts the stored
//! transactions that have no prediction (the `unprocessed_transactions`
//! view), in batches, until none are left or the API stops answering
//! (guarantee 2: coverage returns to 100% with no operator action).
//!
//! While the breaker is open the calls are refused at once, without
//! touching the API; after its open time the breaker lets trial calls
//! through, so the backfill is also how an idle pipeline finds the API back.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, SpawnHandle, Supervised, WrapFuture};
use std::sync::Arc;
use std::time::Duration;

use super::Pipeline;
use super::messages::Chaos;
use crate::db;

pub struct Backfill {
    pipeline: Arc<Pipeline>,
    running: Option<SpawnHandle>,
}

impl Backfill {
    pub fn new(pipeline: Arc<Pipeline>) -> Backfill {
        Backfill { pipeline, running: None }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.running.is_some() || self.pipeline.is_shutting_down() {
            return;
        }
        let pipeline = self.pipeline.clone();
        let handle = ctx.spawn(backfill(pipeline).into_actor(self).map(|predicted, actor, _ctx| {
            actor.running = None;
            if predicted > 0 {
                tracing::info!(predicted, "backfill predicted stored transactions");
            }
        }));
        self.running = Some(handle);
    }
}

/// Predicts unpredicted transactions until none are left or a round makes
/// no progress. Returns how many it predicted.
async fn backfill(pipeline: Arc<Pipeline>) -> usize {
    let round = (pipeline.config.predict.batch_size * pipeline.config.predict.concurrency) as i64;
    let mut predicted_total = 0;
    loop {
        let pool = pipeline.pool.clone();
        let items = match tokio::task::spawn_blocking(move || {
            pool.get()
                .map_err(|e| e.to_string())
                .and_then(|mut c| db::unpredicted(&mut c, round).map_err(|e| e.to_string()))
        })
        .await
        {
            Ok(Ok(items)) if !items.is_empty() => items,
            Ok(Ok(_)) => return predicted_total,
            Ok(Err(error)) => {
                tracing::debug!(%error, "backfill cannot read the database");
                return predicted_total;
            }
            Err(_) => return predicted_total,
        };
        let asked = items.len();
        let predicted = pipeline.ml.predict(items, "backfill").await;
        if predicted.predictions.is_empty() {
            tracing::debug!(asked, failed = predicted.failures.len(), "backfill made no progress; next round later");
            return predicted_total;
        }
        let count = predicted.predictions.len();
        let pool = pipeline.pool.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut connection = pool.get().map_err(|e| e.to_string())?;
            db::upsert_predictions(&mut connection, &predicted.predictions)
                .map(|()| predicted.predictions)
                .map_err(|e| e.to_string())
        })
        .await;
        match written {
            Ok(Ok(predictions)) => {
                predicted_total += count;
                // Late predictions are published like the flush's own.
                if !pipeline.config.kafka.predictions_topic.is_empty() {
                    super::dlq_publisher::fan_out_predictions(&pipeline, predictions);
                }
            }
            _ => return predicted_total,
        }
        if count < asked {
            // Some stayed unpredicted (poison or API trouble): try again next tick.
            return predicted_total;
        }
    }
}

impl Actor for Backfill {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Registered here, not in new(): a restart keeps the struct but not its timers.
        let interval = Duration::from_millis(self.pipeline.config.predict.backfill_interval_ms);
        ctx.run_interval(interval, |actor, ctx| actor.tick(ctx));
    }
}

impl Supervised for Backfill {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.running = None;
        // The backfill holds no pipeline records: nothing to read again.
        crate::metrics::METRICS.actor_restarts.with_label_values(&["backfill"]).inc();
    }
}

impl Handler<Chaos> for Backfill {
    type Result = ();

    fn handle(&mut self, chaos: Chaos, ctx: &mut Context<Self>) {
        super::chaos("backfill", chaos, ctx);
    }
}
