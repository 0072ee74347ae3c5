//! `txnflow repredict`: one re-prediction run in this process, through the
//! engine the service's Repredictor uses.

use std::sync::Arc;

use crate::actors::repredictor::engine::{Claim, RunContext, claim, client, execute, new_run_id, summary};
use crate::config::Config;
use crate::db;
use crate::domain::rollout::Selection;

/// `txnflow repredict`: one run in this process, with progress in the log
/// and the summary line on stdout. Ctrl-C or SIGTERM stops it between
/// chunks, resumable.
pub fn run_command(config: Config, run_id: Option<String>, selection: Selection) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        if config.db.auto_migrate {
            let mut connection = db::connect(&config.db.url)?;
            db::migrate(&mut connection)?;
        }
        let run_id = run_id.unwrap_or_else(new_run_id);
        let instance = crate::actors::instance_name();
        let claimed = match claim(&config.db.url, &instance, &run_id, selection).await? {
            Claim::Completed(run) => {
                println!("{}", summary(&run, 0.0));
                eprintln!("run {run_id} completed before; nothing to do");
                return Ok(());
            }
            Claim::Run(claimed) => claimed,
        };
        let ml = Arc::new(client(&config)?);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopping.clone();
        tokio::spawn(async move {
            crate::service::shutdown::wait_for_signal().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let stop = Arc::new(move || stopping.load(std::sync::atomic::Ordering::SeqCst));
        let end = execute(claimed, RunContext { ml, config, stop, progress_on_terminal: true }).await;
        println!("{}", summary(&end.run, end.seconds));
        match end.run.status.as_str() {
            "completed" => Ok(()),
            "failed" => Err(anyhow::anyhow!(
                "re-prediction run {run_id} failed: {}; run it again to resume",
                end.run.error.as_deref().unwrap_or("unknown")
            )),
            _ => Err(anyhow::anyhow!("re-prediction run {run_id} stopped before its end; run it again to resume")),
        }
    })
}
