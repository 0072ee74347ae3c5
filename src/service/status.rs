//! The status page at `/` and the JSON it reads, `GET /status.json`.
//!
//! A sampler reads the process's own counters every 2 s and keeps 15
//! minutes of samples; the answer turns them into rates and latency
//! percentiles. Nothing here is on the records' path: it reads atomic
//! counters, and the two small run tables once per request.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::proto::MetricFamily;

use crate::actors::ActorSystem;
use crate::domain::rates;
use crate::observability::metrics::METRICS;

/// The page: plain HTML, CSS and a script that draws its charts as SVG
/// polylines, served from the binary.
pub const PAGE_HTML: &str = include_str!("status_page/index.html");
pub const PAGE_CSS: &str = include_str!("status_page/status.css");
pub const PAGE_JS: &str = include_str!("status_page/status.js");

/// The page loads its own script and style, and talks to this server only.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// 15 minutes of samples, and the one before them.
pub const SAMPLES_KEPT: usize = 451;
/// The ML API's latency percentiles are over this many last samples (1 minute).
const LATENCY_WINDOW_SAMPLES: usize = 30;
/// How many batch and re-prediction runs the page lists.
const RUNS_LISTED: i64 = 10;

/// The record outcomes charted, as `txnflow_records_total` names them.
const OUTCOMES: [(&str, &str); 4] =
    [("in", "read"), ("written", "written"), ("predicted", "predicted"), ("dead_lettered", "dead_lettered")];

/// One reading of the counters the page charts.
struct Sample {
    at: DateTime<Utc>,
    records: [u64; 4],
    /// Cumulative counts of every ML API request's latency bucket, the last `+Inf`.
    latency: Vec<u64>,
    /// Predictions stored by this process, per model version: live (pipeline
    /// and backfill) and shadow.
    live: BTreeMap<String, u64>,
    shadow: BTreeMap<String, u64>,
}

/// The samples of the last 15 minutes, oldest first.
#[derive(Default)]
pub struct Samples(Mutex<VecDeque<Sample>>);

impl Samples {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the counters now.
    pub fn sample_now(&self) {
        let families = gathered();
        let records = OUTCOMES.map(|(_, outcome)| METRICS.records_of(outcome));
        let (mut live, mut shadow) = (BTreeMap::new(), BTreeMap::new());
        for metric in families.get("txnflow_predictions_total").map_or(&[][..], |family| family.get_metric()) {
            let (version, kind) = (label(metric, "model_version"), label(metric, "kind"));
            let count = metric.get_counter().get_value() as u64;
            let into = match kind {
                "pipeline" | "backfill" => &mut live,
                "shadow" => &mut shadow,
                _ => continue,
            };
            *into.entry(version.to_string()).or_insert(0) += count;
        }
        let sample = Sample { at: Utc::now(), records, latency: latency_buckets(&families).1, live, shadow };
        let mut samples = self.lock();
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

/// Samples the counters every [`SAMPLE_EVERY`], for as long as the service runs.
pub async fn sample_counters(samples: Arc<Samples>) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    // After a stall, the next sample comes 2 s later, never at once: a
    // rate is over 2 s, not over a few microseconds.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        samples.sample_now();
    }
}

fn gathered() -> BTreeMap<String, MetricFamily> {
    METRICS.registry.gather().into_iter().map(|family| (family.name().to_string(), family)).collect()
}

fn label<'a>(metric: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    metric.get_label().iter().find(|pair| pair.name() == name).map_or("", |pair| pair.value())
}

/// The ML API latency buckets' upper bounds and cumulative counts, summed
/// over every outcome, with a last `+Inf` bucket.
fn latency_buckets(families: &BTreeMap<String, MetricFamily>) -> (Vec<f64>, Vec<u64>) {
    let (mut bounds, mut counts) = (Vec::new(), Vec::new());
    for metric in families.get("txnflow_ml_api_latency_seconds").map_or(&[][..], |family| family.get_metric()) {
        let histogram = metric.get_histogram();
        let buckets = histogram.get_bucket();
        if bounds.is_empty() {
            bounds = buckets.iter().map(|bucket| bucket.upper_bound()).chain([f64::INFINITY]).collect();
            counts = vec![0; bounds.len()];
        }
        for (count, bucket) in counts.iter_mut().zip(buckets) {
            *count += bucket.cumulative_count();
        }
        if let Some(all) = counts.last_mut() {
            *all += histogram.get_sample_count();
        }
    }
    (bounds, counts)
}

/// The model version `counts` says the pipeline uses now (see [`rates::rose_last`]).
fn in_use<'a>(
    samples: &'a VecDeque<Sample>,
    counts: impl Fn(&'a Sample) -> &'a BTreeMap<String, u64>,
) -> Option<String> {
    rates::rose_last(&samples.iter().map(counts).collect::<Vec<_>>())
}

/// Everything the page shows but the runs, from the samples and the counters.
fn live_figures(system: &ActorSystem, samples: &Samples) -> serde_json::Value {
    let families = gathered();
    let samples = samples.lock();
    let mut rates = serde_json::Map::new();
    let times: Vec<i64> = samples.iter().skip(1).map(|sample| sample.at.timestamp_millis()).collect();
    rates.insert("at".into(), times.into());
    for (index, (name, _)) in OUTCOMES.iter().enumerate() {
        let series: Vec<f64> = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(before, after)| {
                let seconds = (after.at - before.at).num_milliseconds() as f64 / 1000.0;
                (rates::per_second(before.records[index], after.records[index], seconds) * 10.0).round() / 10.0
            })
            .collect();
        rates.insert((*name).into(), series.into());
    }
    let totals: serde_json::Map<String, serde_json::Value> =
        OUTCOMES.iter().map(|(name, outcome)| ((*name).to_string(), METRICS.records_of(outcome).into())).collect();

    let mut partitions: BTreeMap<(String, i64), serde_json::Value> = BTreeMap::new();
    for (family, field) in [("txnflow_consumer_lag", "lag"), ("txnflow_consumer_committed_offset", "committed_offset")]
    {
        for metric in families.get(family).map_or(&[][..], |family| family.get_metric()) {
            let topic = label(metric, "topic").to_string();
            let partition: i64 = label(metric, "partition").parse().unwrap_or(-1);
            let entry = partitions.entry((topic.clone(), partition)).or_insert_with(
                || serde_json::json!({"topic": topic, "partition": partition, "lag": null, "committed_offset": null}),
            );
            entry[field] = (metric.get_gauge().get_value() as i64).into();
        }
    }

    let (bounds, now) = latency_buckets(&families);
    let window_start = samples.len().saturating_sub(LATENCY_WINDOW_SAMPLES + 1);
    let before = samples.get(window_start).map(|sample| sample.latency.clone()).unwrap_or_else(|| vec![0; now.len()]);
    let percentile =
        |q: f64| rates::quantile(&bounds, &before, &now, q).map(|seconds| (seconds * 10_000.0).round() / 10.0);
    let window_seconds =
        samples.back().zip(samples.get(window_start)).map_or(0, |(last, first)| (last.at - first.at).num_seconds());

    let config = &system.config;
    let mut versions: BTreeMap<&String, (u64, u64)> = BTreeMap::new();
    if let Some(last) = samples.back() {
        for (version, count) in &last.live {
            versions.entry(version).or_default().0 = *count;
        }
        for (version, count) in &last.shadow {
            versions.entry(version).or_default().1 = *count;
        }
    }
    let versions: Vec<serde_json::Value> = versions
        .into_iter()
        .map(|(version, (live, shadow))| serde_json::json!({"version": version, "live": live, "shadow": shadow}))
        .collect();
    let agreement = |kind: &str| METRICS.shadow_agreement.with_label_values(&[kind]).get();

    serde_json::json!({
        "generated_at": Utc::now(),
        "instance": system.instance,
        "topic": config.kafka.topic,
        "group": config.kafka.group_id,
        "sample_seconds": SAMPLE_EVERY.as_secs(),
        "rates": rates,
        "totals": totals,
        "partitions": partitions.into_values().collect::<Vec<_>>(),
        "buffer": {"depth": METRICS.buffer_depth.get(), "max_records": config.buffer.max_records},
        "in_flight": {
            "records": system.capacity.in_flight(),
            "max_records": config.buffer.capacity,
            "bytes": system.capacity.in_flight_bytes(),
            "max_bytes": config.buffer.capacity_bytes,
        },
        "breaker": {
            "state": crate::ml::breaker::state().as_str(),
            "transitions": crate::observability::recent::breaker_transitions(),
        },
        "ml_api": {
            "window_seconds": window_seconds,
            "p50_ms": percentile(0.5),
            "p95_ms": percentile(0.95),
            "p99_ms": percentile(0.99),
            "concurrency_limit": METRICS.ml_api_concurrency_limit.get(),
            "concurrency_max": config.predict.concurrency,
        },
        "models": {
            "current": in_use(&samples, |sample| &sample.live),
            "shadow": in_use(&samples, |sample| &sample.shadow),
            "versions": versions,
            "shadow_agreement": {"agree": agreement("agree"), "disagree": agreement("disagree")},
        },
        "dead_letters": crate::observability::recent::dead_letters(),
    })
}

/// The batch runs (this process's own, live, and the last recorded by
/// any instance) and the last re-prediction runs.
async fn runs(system: &ActorSystem) -> Result<(Vec<serde_json::Value>, Vec<serde_json::Value>), String> {
    let recorded = crate::db::blocking(&system.pool, |connection| {
        Ok((
            crate::db::recent_runs(connection, RUNS_LISTED)?,
            crate::db::history::recent_runs(connection, RUNS_LISTED)?,
        ))
    })
    .await
    .map_err(crate::domain::redaction::short_reason)?;
    let (batch_rows, repredict_rows) = recorded;
    let stale_after = system.config.batch.stale_after_ms;
    let mut batches: BTreeMap<String, (DateTime<Utc>, serde_json::Value)> = BTreeMap::new();
    for row in batch_rows {
        let answer = crate::batch::recorded_answer(&row.report, &row.instance, row.age_ms, stale_after);
        let Some(run_id) = answer["run_id"].as_str().map(str::to_string) else { continue };
        let at = Utc::now() - chrono::Duration::milliseconds(row.age_ms);
        batches.insert(run_id, (at, answer));
    }
    for run_id in system.runs.ids() {
        let Some(report) = system.runs.report(&run_id) else { continue };
        // The table's row is newer when another instance took the run over.
        if batches.get(&run_id).is_some_and(|(_, answer)| answer["instance"] != system.instance.as_str()) {
            continue;
        }
        // A running run is current; a finished one keeps the time it was recorded.
        let recorded_at = batches.get(&run_id).map(|(at, _)| *at);
        let at = match report.status {
            crate::batch::RunStatus::Running => Utc::now(),
            _ => recorded_at.unwrap_or_else(Utc::now),
        };
        let mut answer = serde_json::to_value(report).expect("a report serialises");
        answer["instance"] = system.instance.clone().into();
        batches.insert(run_id, (at, answer));
    }
    let mut batches: Vec<(DateTime<Utc>, serde_json::Value)> = batches.into_values().collect();
    batches.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let batches = batches.into_iter().take(RUNS_LISTED as usize).map(|(_, answer)| answer).collect();
    let repredictions = repredict_rows.iter().map(|(run, held)| super::admin::repredict_answer(run, *held)).collect();
    Ok((batches, repredictions))
}

/// What `GET /status.json` answers. A database that does not answer
/// leaves the runs empty and says why in `runs_error`; the rest is live.
pub async fn snapshot(system: &ActorSystem, samples: &Samples) -> serde_json::Value {
    let mut answer = live_figures(system, samples);
    let (batches, repredictions, error) = match runs(system).await {
        Ok((batches, repredictions)) => (batches, repredictions, None),
        Err(error) => (Vec::new(), Vec::new(), Some(error)),
    };
    answer["batches"] = batches.into();
    answer["repredictions"] = repredictions.into();
    answer["runs_error"] = error.into();
    answer
}
