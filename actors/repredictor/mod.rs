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

use crate::actors::system::Stopping;
use crate::config::Config;
use crate::db::history::RepredictRun;
use crate::domain::rollout::Selection;
use crate::ml::client::MlClient;
use engine::{Claim, RunContext, StartError};

pub struct Repredictor {
    params: RepredictorParams,
    /// The pipeline's client, or `repredict.url`'s own.
    ml: Arc<MlClient>,
    /// The runs this process runs now.
    running: HashSet<String>,
    /// Starts whose claim is in flight: each holds a place under
    /// `max_concurrent_runs` until it runs or is refused, so starts that
    /// arrive together cannot all pass the check.
    claiming: usize,
}

/// What the Repredictor is built from.
pub struct RepredictorParams {
    /// The engine's settings: `repredict`, `predict`, `breaker` and `db`.
    pub config: Config,
    /// The pipeline's ML API client, used when `repredict.url` is empty.
    pub ml: Arc<MlClient>,
    /// This process, as `repredict_runs` names the one running a run.
    pub instance: String,
    pub stopping: Stopping,
}

impl Repredictor {
    pub fn new(params: RepredictorParams) -> Repredictor {
        let ml = if params.config.repredict.url.is_empty() {
            params.ml.clone()
        } else {
            Arc::new(engine::client(&params.config).expect("repredict.url was checked with the configuration"))
        };
        Repredictor { params, ml, running: HashSet::new(), claiming: 0 }
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
        let max = self.params.config.repredict.max_concurrent_runs;
        if self.params.stopping.is_set() {
            return Box::pin(actix::fut::ready(Err(StartRefused::ShuttingDown)));
        }
        if self.running.len() + self.claiming >= max {
            return Box::pin(actix::fut::ready(Err(StartRefused::TooMany(max))));
        }
        self.claiming += 1;
        let run_id = start.run_id.unwrap_or_else(engine::new_run_id);
        let (url, instance) = (self.params.config.db.url.clone(), self.params.instance.clone());
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
                    let stopping = actor.params.stopping.clone();
                    let context = RunContext {
                        ml: actor.ml.clone(),
                        config: actor.params.config.clone(),
                        stop: Arc::new(move || stopping.is_set()),
                        progress_on_terminal: false,
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
