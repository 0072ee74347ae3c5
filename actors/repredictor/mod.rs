//! Repredictor: runs the re-prediction runs POSTed to the service
//! (`POST /repredictions`), at most `repredict.max_concurrent_runs` at
//! once, with the pipeline's ML API client (or `repredict.url`'s own).
//! The run itself is [`crate::actors::repredictor::engine`]: recorded, resumable, into
//! history only. A run stops between chunks when the service shuts down,
//! and is resumed by POSTing it again, here or on another replica.

pub mod engine;

use actix::{Actor, ActorFutureExt, Context, Handler, Message, ResponseActFuture, Supervised, WrapFuture};
use std::collections::HashSet;
use std::sync::Arc;

use crate::actors::Pipeline;
use crate::db::history::RepredictRun;
use crate::domain::rollout::Selection;
use crate::ml::client::MlClient;
use engine::{Claim, RunContext, StartError};

pub struct Repredictor {
    pipeline: Arc<Pipeline>,
    ml: Arc<MlClient>,
    /// The runs this process runs now.
    running: HashSet<String>,
    /// Starts whose claim is in flight: each holds a place under
    /// `max_concurrent_runs` until it runs or is refused, so starts that
    /// arrive together cannot all pass the check.
    claiming: usize,
}

impl Repredictor {
    pub fn new(pipeline: Arc<Pipeline>) -> Repredictor {
        let ml = if pipeline.config.repredict.url.is_empty() {
            pipeline.ml.clone()
        } else {
            Arc::new(engine::client(&pipeline.config).expect("repredict.url was checked with the configuration"))
        };
        Repredictor { pipeline, ml, running: HashSet::new(), claiming: 0 }
    }
}

/// Start (or resume) a run.
#[derive(Message)]
#[rtype(result = "Result<Started, StartRefused>")]
pub struct StartRepredict {
    pub run_id: Option<String>,
    pub selection: Selection,
}

pub enum Started {
    /// Running now, here.
    Running(String),
    /// The run id completed before: its row.
    Completed(Box<RepredictRun>),
}

#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("{0} re-prediction runs are running in this process (repredict.max_concurrent_runs)")]
    TooMany(usize),
    #[error("the service is shutting down")]
    ShuttingDown,
}

impl Handler<StartRepredict> for Repredictor {
    type Result = ResponseActFuture<Self, Result<Started, StartRefused>>;

    fn handle(&mut self, start: StartRepredict, _ctx: &mut Context<Self>) -> Self::Result {
        let max = self.pipeline.config.repredict.max_concurrent_runs;
        if self.pipeline.is_shutting_down() {
            return Box::pin(actix::fut::ready(Err(StartRefused::ShuttingDown)));
        }
        if self.running.len() + self.claiming >= max {
            return Box::pin(actix::fut::ready(Err(StartRefused::TooMany(max))));
        }
        self.claiming += 1;
        let run_id = start.run_id.unwrap_or_else(engine::new_run_id);
        let (url, instance) = (self.pipeline.config.db.url.clone(), self.pipeline.instance.clone());
        let claiming = {
            let run_id = run_id.clone();
            async move { engine::claim(&url, &instance, &run_id, start.selection).await }
        };
        Box::pin(claiming.into_actor(self).map(move |claimed, actor, ctx| {
            actor.claiming -= 1;
            match claimed? {
                Claim::Completed(run) => Ok(Started::Completed(Box::new(run))),
                Claim::Run(claimed) => {
                    actor.running.insert(run_id.clone());
                    let pipeline = actor.pipeline.clone();
                    let context = RunContext {
                        ml: actor.ml.clone(),
                        config: pipeline.config.clone(),
                        stop: Arc::new(move || pipeline.is_shutting_down()),
                    };
                    let id = run_id.clone();
                    actix::AsyncContext::spawn(
                        ctx,
                        engine::execute(claimed, context).into_actor(actor).map(move |end, actor, _ctx| {
                            actor.running.remove(&id);
                            tracing::info!("{}", engine::summary(&end.run, end.seconds));
                        }),
                    );
                    Ok(Started::Running(run_id))
                }
            }
        }))
    }
}

impl Actor for Repredictor {
    type Context = Context<Self>;
}

impl Supervised for Repredictor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Its runs were dropped with the old context, and their sessions
        // with them: each is resumable by POSTing it again.
        self.running.clear();
        self.claiming = 0;
        crate::actors::supervisor::restarted("repredictor", "restarted by its supervisor");
    }
}

crate::actors::supervisor::chaos_hook!(Repredictor, "repredictor");
