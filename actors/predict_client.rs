//! PredictClient: asks the ML API for the category of every record of a
//! flush, through [`crate::ml_client::MlClient`] (batches, concurrency,
//! retries, circuit breaker, bisection, per-record checks), then hands the
//! flush to the DbWriter. A record without a usable prediction is still
//! written (guarantee 2); its failure travels with it to the DLQ.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

use super::Pipeline;
use super::db_writer::DbWriter;
use super::mailbox::Mailbox;
use super::messages::{PredictFlush, WriteFlush};
use crate::domain::prediction::PredictRequestItem;

pub struct PredictClient {
    pipeline: Arc<Pipeline>,
    db_writer: Mailbox<DbWriter>,
}

impl PredictClient {
    pub fn new(pipeline: Arc<Pipeline>, db_writer: Mailbox<DbWriter>) -> PredictClient {
        PredictClient { pipeline, db_writer }
    }
}

impl Actor for PredictClient {
    type Context = Context<Self>;
}

impl Supervised for PredictClient {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Flushes being predicted were dropped with the old context.
        self.pipeline.actor_restarted("predict_client", "restarted by its supervisor");
    }
}

impl Handler<PredictFlush> for PredictClient {
    type Result = ();

    fn handle(&mut self, batch: PredictFlush, ctx: &mut Context<Self>) {
        let pipeline = self.pipeline.clone();
        let span = tracing::info_span!("flush", flush_id = batch.flush_id);
        // Spawned, not awaited: the mailbox keeps taking flushes while this
        // one waits for the API; MlClient bounds the requests in flight.
        let predict = async move {
            let items: Vec<PredictRequestItem> =
                batch.records.iter().map(|r| PredictRequestItem::from(&r.transaction)).collect();
            let predicted = pipeline.ml.predict(items, "pipeline").await;
            tracing::debug!(
                asked = batch.records.len(),
                predicted = predicted.predictions.len(),
                failed = predicted.failures.len(),
                "flush predicted"
            );
            (batch, predicted)
        }
        .instrument(span);
        ctx.spawn(predict.into_actor(self).map(|(batch, predicted), actor, _ctx| {
            let write = WriteFlush {
                flush_id: batch.flush_id,
                trigger: batch.trigger,
                flushed_at: batch.flushed_at,
                records: batch.records,
                predictions: predicted.predictions.into_iter().map(|p| (p.transaction_id, p)).collect(),
                failures: predicted.failures.into_iter().collect::<HashMap<_, _>>(),
            };
            actor.db_writer.do_send(write);
        }));
    }
}

super::supervisor::chaos_hook!(PredictClient, "predict_client");
