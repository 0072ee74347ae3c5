//! ShadowScorer: scores stored flushes with a candidate model
//! (`predict.shadow_url`) beside the live one, into `prediction_history`
//! only (kind `shadow`).
//!
//! The DbWriter hands it a sampled flush (`predict.shadow_sample`) after
//! the flush is durable and settled, with one of `predict.shadow_concurrency`
//! slots; a flush that finds no slot free is skipped and counted. The
//! shadow model has its own client, breaker and database connection, so a
//! shadow that is down, slow or answering garbage never delays, fails or
//! dead-letters a live record: its flushes are counted as failed, and no
//! history row is written for them.

use actix::{Actor, AsyncContext, Context, Handler, Message, Supervised};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{BreakerConfig, DbConfig, PredictConfig};
use crate::db::{self, PgPool};
use crate::domain::prediction::PredictRequestItem;
use crate::ml::client::MlClient;
use crate::observability::metrics::METRICS;

pub struct ShadowScorer {
    ml: Option<Arc<MlClient>>,
    /// One connection of its own: shadow writes never wait for, nor hold,
    /// one of the pipeline's.
    pool: PgPool,
}

/// What the ShadowScorer is built from.
pub struct ShadowScorerParams {
    /// The live model's settings, with the shadow's URL and concurrency.
    pub predict: PredictConfig,
    pub breaker: BreakerConfig,
    pub db: DbConfig,
}

impl ShadowScorer {
    pub fn new(config: ShadowScorerParams) -> ShadowScorer {
        let ml = (!config.predict.shadow_url.is_empty())
            .then(|| {
                let predict = crate::config::PredictConfig {
                    url: config.predict.shadow_url.clone(),
                    concurrency: config.predict.shadow_concurrency,
                    adaptive_concurrency: false,
                    // A shadow score is worth one try: a retry would hold the slot longer.
                    max_retries: 0,
                    ..config.predict.clone()
                };
                let breaker = crate::ml::breaker::build_named(&config.breaker, "shadow_api");
                MlClient::other_model(&predict, breaker)
                    .map_err(
                        |error| tracing::warn!(%error, "cannot build the shadow model's client; shadow scoring off"),
                    )
                    .ok()
                    .map(Arc::new)
            })
            .flatten();
        let pool = db::pool(&crate::config::DbConfig { pool_size: 1, ..config.db.clone() });
        ShadowScorer { ml, pool }
    }
}

/// DbWriter -> ShadowScorer: a stored flush's transactions, with the slot
/// it holds until it is scored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ScoreShadow {
    pub items: Vec<PredictRequestItem>,
    /// The live model's category of each record predicted, to count agreement.
    pub live: std::collections::HashMap<uuid::Uuid, String>,
    pub slot: OwnedSemaphorePermit,
}

/// Which stored flushes go to the shadow model: a share of them
/// (`predict.shadow_sample`), each with one of `predict.shadow_concurrency`
/// slots. Held by the DbWriter.
#[derive(Clone)]
pub struct ShadowSampler {
    /// 0 when there is no shadow model.
    share: f64,
    slots: Arc<Semaphore>,
}

impl ShadowSampler {
    pub fn new(predict: &PredictConfig) -> ShadowSampler {
        let share = if predict.shadow_url.is_empty() { 0.0 } else { predict.shadow_sample };
        ShadowSampler { share, slots: Arc::new(Semaphore::new(predict.shadow_concurrency)) }
    }

    /// Whether this stored flush goes to the shadow model, and its slot if it
    /// does; a sampled flush that finds every slot busy is counted as skipped.
    pub fn sample(&self) -> Option<OwnedSemaphorePermit> {
        if self.share <= 0.0 || rand::random::<f64>() >= self.share {
            return None;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                METRICS.shadow_flushes.with_label_values(&["skipped"]).inc();
                None
            }
        }
    }
}

impl Handler<ScoreShadow> for ShadowScorer {
    type Result = ();

    fn handle(&mut self, score: ScoreShadow, ctx: &mut Context<Self>) {
        let Some(ml) = self.ml.clone() else { return };
        let pool = self.pool.clone();
        ctx.spawn(actix::fut::wrap_future(async move {
            let ScoreShadow { items, live, slot } = score;
            let predicted = ml.predict(items, "shadow").await;
            let predictions = predicted.predictions;
            let agreed = predictions.iter().filter(|p| live.get(&p.transaction_id) == Some(&p.category)).count();
            let compared = predictions.iter().filter(|p| live.contains_key(&p.transaction_id)).count();
            let outcome = if predictions.is_empty() {
                "failed"
            } else {
                let versions: Vec<String> = predictions.iter().map(|p| p.model_version.clone()).collect();
                match db::blocking(&pool, move |c| db::history::write_shadow(c, &predictions)).await {
                    Ok(_) => {
                        METRICS.count_predictions(versions.iter().map(String::as_str), "shadow");
                        METRICS.shadow_agreement.with_label_values(&["agree"]).inc_by(agreed as u64);
                        METRICS.shadow_agreement.with_label_values(&["disagree"]).inc_by((compared - agreed) as u64);
                        "scored"
                    }
                    Err(error) => {
                        tracing::debug!(
                            error = crate::domain::redaction::short_reason(&error),
                            "cannot store shadow predictions"
                        );
                        "failed"
                    }
                }
            };
            METRICS.shadow_flushes.with_label_values(&[outcome]).inc();
            drop(slot);
        }));
    }
}

impl Actor for ShadowScorer {
    type Context = Context<Self>;
}

impl Supervised for ShadowScorer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Shadow scores in flight were dropped with the old context; they
        // were history only, and their slots came back with them.
        super::supervisor::restarted("shadow_scorer", "restarted by its supervisor");
    }
}

super::supervisor::chaos_hook!(ShadowScorer, "shadow_scorer");
