//! `txnflow run`: the streaming service. Starts the pipeline and the admin
//! server, reports progress, and shuts down gracefully (guarantee 8): on
//! SIGTERM or SIGINT it stops reading, flushes, waits for the writes,
//! commits, and exits 0 within `shutdown_timeout_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::ActorSystem;
use crate::config::Config;
use crate::ml::{breaker, client as ml_client};
use crate::observability::metrics::METRICS;
use crate::{db, kafka};

pub mod admin;
pub mod shutdown;
pub mod status;

use shutdown::{shutdown, wait_for_signal};

pub fn run(config: Config) -> anyhow::Result<()> {
    // Before anything connects: an exposed admin port without a token is a
    // configuration error (exit 2), not a runtime failure.
    config.admin.check_exposure()?;
    actix_rt::System::new().block_on(async move {
        if config.db.auto_migrate {
            migrate_when_reachable(&config).await?;
        }
        if let Err(error) = kafka::ensure_topics(&config.kafka, &kafka::pipeline_topics(&config.kafka)).await {
            tracing::warn!(%error, "cannot create the topics; expecting them to exist");
        }
        let ml = ml_client::MlClient::new(&config.predict, breaker::build(&config.breaker))?;
        let system = ActorSystem::new(config.clone(), db::pool(&config.db), ml, kafka::producer(&config.kafka)?);
        system.start(true);
        let admin = admin::start(&config.admin, system.clone(), config.chaos.enabled)?;
        let admin_handle = admin.handle();
        actix_rt::spawn(admin);
        let progress = actix_rt::spawn(report_progress(system.clone()));
        tracing::info!(
            topic = config.kafka.topic,
            group = config.kafka.group_id,
            page = %format!("http://{}/", config.admin.listen),
            metrics = %format!("http://{}/metrics", config.admin.listen),
            "txnflow is running"
        );
        wait_for_signal().await;
        let clean = shutdown(&system, Duration::from_millis(config.shutdown_timeout_ms)).await;
        progress.abort();
        admin_handle.stop(true).await;
        system.stop_arbiters(Duration::from_secs(5));
        let read = METRICS.records.with_label_values(&["kafka", "read"]).get();
        if clean {
            tracing::info!(read, "stopped cleanly: every record read is durable and committed");
        } else {
            tracing::warn!(
                read,
                in_flight = system.capacity.in_flight(),
                "stopped at the shutdown timeout; uncommitted records will be read again"
            );
        }
        Ok(())
    })
}

/// Applies migrations, waiting for PostgreSQL if it is not up yet, with
/// a line a minute that says since when. A refusal that waiting will not
/// change (a wrong password, an unknown database) ends the command,
/// naming the key to fix.
pub(crate) async fn migrate_when_reachable(config: &Config) -> anyhow::Result<()> {
    let since = Instant::now();
    let mut warned: Option<Instant> = None;
    loop {
        let url = config.db.url.clone();
        let result =
            tokio::task::spawn_blocking(move || db::connect(&url).and_then(|mut c| db::migrate(&mut c))).await?;
        match result {
            Ok(applied) => {
                if !applied.is_empty() {
                    tracing::info!(?applied, "migrations applied");
                }
                return Ok(());
            }
            Err(error) if error.to_string().contains("cannot connect") => {
                if let Some(fix) = db::refusal_that_will_not_heal(&error.to_string()) {
                    anyhow::bail!("{error}. Waiting will not change this: check {fix}");
                }
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    let waited = since.elapsed().as_secs();
                    tracing::warn!(%error, waited_seconds = waited, "waiting for PostgreSQL (db.url) to answer");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// One line every 5 s: records in, written, predicted, dead-lettered,
/// buffer depth, in flight, breaker state.
async fn report_progress(system: Arc<ActorSystem>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let count = |outcome: &str| METRICS.records_of(outcome);
        tracing::info!(
            "in {} written {} predicted {} dead-lettered {} buffer {} in-flight {} breaker {} (status page http://{}/)",
            count("read"),
            count("written"),
            count("predicted"),
            count("dead_lettered"),
            METRICS.buffer_depth.get(),
            system.capacity.in_flight(),
            breaker::state().as_str(),
            system.config.admin.listen
        );
    }
}
