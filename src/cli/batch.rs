//! `txnflow batch <uri>`: one batch run in this process, through the same
//! actors as the service (without the KafkaReader), or, with `--via-kafka`,
//! the rows published to the input topic for the consumer group to share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::ActorSystem;
use crate::actors::csv_loader::LoadCsv;
use crate::batch::{InputPolicy, RunStatus};
use crate::config::Config;
use crate::ml::{breaker, client as ml_client};
use crate::observability::progress::{Progress, Unit};
use crate::{db, kafka, service};

/// Runs the batch to completion, prints its summary line, and returns an
/// error when it could not start or did not complete.
pub fn run(config: Config, uri: String, run_id: Option<String>) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(async move {
        // The input first: a bad uri or file fails at once, before any
        // connection to the database or the broker is tried.
        let run_id = run_id.unwrap_or_else(crate::batch::new_run_id);
        let spec =
            crate::batch::prepare(&crate::batch::s3::client(&config.s3), &uri, &run_id, &InputPolicy::Any).await?;
        eprintln!(
            "batch run {run_id}: {} file{} from {uri}; invalid rows, if any, go to {}",
            spec.files.len(),
            if spec.files.len() == 1 { "" } else { "s" },
            spec.errors_destination()
        );
        if config.db.auto_migrate {
            service::migrate_when_reachable(&config).await?;
        }
        if let Err(error) = kafka::ensure_topics(&config.kafka, &kafka::pipeline_topics(&config.kafka)).await {
            tracing::warn!(%error, "cannot create the topics; expecting them to exist");
        }
        let ml = ml_client::MlClient::new(&config.predict, breaker::build(&config.breaker))?;
        let system = ActorSystem::new(config.clone(), db::pool(&config.db), ml, kafka::producer(&config.kafka)?);
        system.start(false);
        let outcome = load(&system, uri, Some(run_id)).await;
        system.stopping.set();
        system.stop_arbiters(Duration::from_secs(10));
        outcome
    })
}

async fn load(system: &Arc<ActorSystem>, uri: String, run_id: Option<String>) -> anyhow::Result<()> {
    let run_id = system.csv_loader().send(LoadCsv { uri, run_id, policy: InputPolicy::Any }).await??;
    // By bytes read of the files' known sizes, with the rows in its detail.
    let mut progress = Progress::start(format!("batch run {run_id}"), Unit::Bytes);
    let detail = |report: &crate::batch::RunReport| {
        format!(
            "file {}/{}: {}",
            (report.files_done + 1).min(report.files),
            report.files,
            report.counts.summary(report.elapsed_seconds)
        )
    };
    loop {
        let report = system.runs.report(&run_id).expect("the run is registered");
        if report.status != RunStatus::Running {
            // The final report into batch_runs before the process ends.
            system.run_recorder().record().await;
            if report.status == RunStatus::Completed {
                progress.finish(report.bytes_read, report.bytes_total, &detail(&report));
            } else {
                progress.abandon();
            }
            println!("{}", report.summary);
            for error_file in &report.error_files {
                eprintln!("invalid rows: {error_file}");
            }
            return match report.error {
                None => Ok(()),
                Some(error) => Err(anyhow::anyhow!("batch run {run_id} failed: {error}")),
            };
        }
        progress.show(report.bytes_read, report.bytes_total, &detail(&report));
        system.runs.changed(Duration::from_millis(200)).await;
    }
}

/// `--via-kafka`: checks the input like a run, then publishes every valid
/// row to the input topic as an event keyed by id, with its batch lineage;
/// invalid rows go to the error file. The replicas of the consumer group
/// share the rows and write them; this command only publishes.
pub fn publish(config: Config, uri: String, run_id: Option<String>) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use rdkafka::producer::FutureRecord;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let s3 = crate::batch::s3::client(&config.s3);
        let run_id = run_id.unwrap_or_else(crate::batch::new_run_id);
        let spec = crate::batch::prepare(&s3, &uri, &run_id, &InputPolicy::Any).await?;
        let topic = config.kafka.topic.clone();
        kafka::ensure_topics(&config.kafka, &[(&topic, config.kafka.partitions)]).await?;
        let producer = kafka::producer(&config.kafka)?;
        let (mut read, mut invalid, mut published) = (0u64, 0u64, 0u64);
        // By bytes read of the files' sizes, when every size is known.
        let total: Option<u64> = spec.files.iter().map(|file| file.size).sum();
        let mut progress = Progress::start(format!("batch run {run_id} via {topic}"), Unit::Bytes);
        let mut bytes_before = 0u64;
        let mut error_files = Vec::new();
        for file in &spec.files {
            let mut errors = crate::batch::ErrorFile::new(&spec, file);
            // A re-run's error file holds its own rows only.
            errors.reset();
            let max_bytes = config.batch.max_record_bytes;
            let mut rows = crate::batch::RowReader::new(&s3, file, max_bytes);
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            while let Some(row) = rows.next().await? {
                read += 1;
                let (line, record) = match row {
                    crate::batch::Row::Record { line, record } => (line, record),
                    crate::batch::Row::Oversized { line } => {
                        invalid += 1;
                        errors.record(&[], line, &crate::batch::oversized_reason(max_bytes))?;
                        continue;
                    }
                };
                let transaction = match file.parse_row(record) {
                    Ok(transaction) => transaction,
                    Err(reason) => {
                        invalid += 1;
                        let fields: Vec<Vec<u8>> = record.iter().map(<[u8]>::to_vec).collect();
                        errors.record(&fields, line, &reason)?;
                        continue;
                    }
                };
                let id = transaction.id.to_string();
                let event = crate::domain::event::TransactionEvent::of_batch_row(&transaction, &id, &run_id, &file.uri);
                let value = serde_json::to_vec(&event)?;
                let producer = producer.clone();
                let topic = topic.clone();
                in_flight.push(async move {
                    let record = FutureRecord::to(&topic).key(&id).payload(&value);
                    producer.send(record, Duration::from_secs(60)).await.map_err(|(error, _)| error)
                });
                // Bounded: at most 10,000 sends in flight.
                while in_flight.len() >= 10_000 {
                    in_flight.next().await.expect("not empty")?;
                    published += 1;
                }
                if read % 1_000 == 0 {
                    let detail = format!("{}: read {read} invalid {invalid} published {published}", file.uri);
                    progress.show(bytes_before + rows.bytes_read(), total, &detail);
                }
            }
            while let Some(sent) = in_flight.next().await {
                sent?;
                published += 1;
            }
            bytes_before += rows.bytes_read();
            if errors.has_rows() {
                error_files.push(errors.finish(&s3).await.map_err(|e| anyhow::anyhow!(e))?);
            } else {
                errors.remove_stale(&s3).await;
            }
        }
        progress.finish(bytes_before, total.map(|total| total.max(bytes_before)), &format!("published {published}"));
        println!(
            "read {read} valid {} invalid {invalid} published {published} to {topic} in {:.1} s",
            read - invalid,
            started.elapsed().as_secs_f64()
        );
        for error_file in error_files {
            eprintln!("invalid rows: {error_file}");
        }
        anyhow::Ok(())
    })
}
