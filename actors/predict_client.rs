//! PredictClient: asks the ML API for the category of every record of a
//! flush, through [`crate::ml::client::MlClient`] (batches, concurrency,
//! retries, circuit breaker, bisection, per-record checks), then hands the
//! flush to the DbWriter. A record without a usable prediction is still
//! written (guarantee 2); its failure travels with it to the DLQ.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Supervised, WrapFuture};
use opentelemetry::context::FutureExt as _;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument;

use super::db_writer::DbWriter;
use super::mailbox::Mailbox;
use super::messages::{PredictFlush, WriteFlush};
use crate::domain::prediction::PredictRequestItem;
use crate::ml::client::MlClient;

/// The PredictClient, handing its flushes to `Next`: the DbWriter, or a
/// test's stand-in.
pub struct PredictClient<Next: Actor = DbWriter> {
    ml: Arc<MlClient>,
    db_writer: Mailbox<Next>,
}

/// What the PredictClient needs of its next stage: to take a predicted flush.
pub trait TakesWrites: Actor<Context = Context<Self>> + Handler<WriteFlush> {}
impl<A: Actor<Context = Context<A>> + Handler<WriteFlush>> TakesWrites for A {}

impl<Next: TakesWrites> PredictClient<Next> {
    pub fn new(ml: Arc<MlClient>, db_writer: Mailbox<Next>) -> PredictClient<Next> {
        PredictClient { ml, db_writer }
    }
}

impl<Next: TakesWrites> Actor for PredictClient<Next> {
    type Context = Context<Self>;
}

impl<Next: TakesWrites> Supervised for PredictClient<Next> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Flushes being predicted were dropped with the old context.
        super::supervisor::restarted("predict_client", "restarted by its supervisor");
    }
}

impl<Next: TakesWrites> Handler<PredictFlush> for PredictClient<Next> {
    type Result = ();

    fn handle(&mut self, flush: PredictFlush, ctx: &mut Context<Self>) {
        let ml = self.ml.clone();
        let span = tracing::info_span!("flush", flush_id = flush.flush_id, trace_id = flush.span.trace_id());
        // Spawned, not awaited: the mailbox keeps taking flushes while this
        // one waits for the API; MlClient bounds the requests in flight.
        let predict = async move {
            // A record delivered twice into this flush is asked for once.
            let mut seen = std::collections::HashSet::with_capacity(flush.records.len());
            let items: Vec<PredictRequestItem> = flush
                .records
                .iter()
                .filter(|r| seen.insert(r.transaction.id))
                .map(|r| PredictRequestItem::from(&r.transaction))
                .collect();
            // The ML API calls are the flush span's children.
            let predicted = ml.predict(items, "pipeline").with_context(flush.span.context()).await;
            tracing::debug!(
                asked = flush.records.len(),
                predicted = predicted.predictions.len(),
                failed = predicted.failures.len(),
                "flush predicted"
            );
            (flush, predicted)
        }
        .instrument(span);
        ctx.spawn(predict.into_actor(self).map(|(flush, predicted), actor, _ctx| {
            let write = WriteFlush {
                flush_id: flush.flush_id,
                trigger: flush.trigger,
                flushed_at: flush.flushed_at,
                records: flush.records,
                predictions: predicted.predictions.into_iter().map(|p| (p.transaction_id, p)).collect(),
                failures: predicted.failures.into_iter().collect::<HashMap<_, _>>(),
                span: flush.span,
            };
            actor.db_writer.do_send(write);
        }));
    }
}

super::supervisor::chaos_hook!(PredictClient, "predict_client");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::messages::{FlushTrigger, test_envelopes};
    use crate::domain::dead_letter::{ErrorType, Stage};
    use crate::ml::reference_api::{Faults, refuses, spawn_in_thread};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use uuid::Uuid;

    /// The DbWriter's stand-in: keeps each flush it is handed.
    struct Writer(Arc<Mutex<Vec<WriteFlush>>>);

    impl Actor for Writer {
        type Context = Context<Self>;
    }

    impl Handler<WriteFlush> for Writer {
        type Result = ();

        fn handle(&mut self, flush: WriteFlush, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(flush);
        }
    }

    /// Against the reference ML API in this process: one record poisons
    /// any request it is in, and a fixed share of ids is refused by id.
    /// Bisection isolates each of them; every other record is predicted,
    /// and the whole flush reaches the writer, in order, once.
    #[test]
    fn refused_records_fail_alone_and_every_other_record_is_predicted() {
        let faults = Faults { poison_marker: "POISON".into(), refuse_rate: 0.2, ..Faults::default() };
        let address = spawn_in_thread("127.0.0.1:0".parse().unwrap(), faults).unwrap();
        let config = crate::config::Config::load(None).unwrap();
        let predict = crate::config::PredictConfig { url: format!("http://{address}"), ..config.predict };
        let ml = Arc::new(MlClient::new(&predict, crate::ml::breaker::build(&config.breaker)).unwrap());
        let mut descriptions = vec!["a purchase"; 40];
        descriptions[16] = "a POISON purchase";
        let records = test_envelopes(&descriptions);
        let ids: Vec<Uuid> = records.iter().map(|r| r.transaction.id).collect();
        let refused: Vec<Uuid> = ids.iter().copied().filter(|id| refuses(*id, 0.2)).collect();
        assert!(!refused.is_empty() && !refused.contains(&ids[16]), "the seed ids cover both cases");

        let written = Arc::new(Mutex::new(Vec::new()));
        actix::System::new().block_on(async {
            let mailbox = Mailbox::default();
            mailbox.point_to(Writer(written.clone()).start());
            let client = PredictClient::new(ml, mailbox).start();
            let flush = PredictFlush {
                flush_id: 7,
                trigger: FlushTrigger::Size,
                flushed_at: Instant::now(),
                records,
                span: Default::default(),
            };
            client.send(flush).await.unwrap();
            for _ in 0..1000 {
                if !written.lock().unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });

        let written = written.lock().unwrap();
        assert_eq!(written.len(), 1, "one flush in, one flush on");
        let flush = &written[0];
        assert_eq!(flush.flush_id, 7);
        assert_eq!(flush.records.iter().map(|r| r.transaction.id).collect::<Vec<_>>(), ids, "every record, in order");
        let mut failed: Vec<Uuid> = flush.failures.keys().copied().collect();
        failed.sort();
        let mut expected: Vec<Uuid> = refused.iter().copied().chain([ids[16]]).collect();
        expected.sort();
        assert_eq!(failed, expected, "exactly the poison record and the refused ones failed");
        for failure in flush.failures.values() {
            assert_eq!((failure.error_type, failure.stage), (ErrorType::PredictionFailed, Stage::Predict));
            assert!(failure.message.contains("422"), "{}", failure.message);
        }
        assert_eq!(flush.predictions.len(), ids.len() - expected.len());
        for id in ids.iter().filter(|id| !expected.contains(id)) {
            let prediction = &flush.predictions[id];
            assert_eq!(prediction.category, crate::domain::categories::reference_category(*id), "{id}");
        }
    }
}
