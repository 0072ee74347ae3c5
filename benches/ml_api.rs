//! Throughput of the reference ML API (`txnflow ml-api`) in batches of 100.
//!
//! Starts the server in-process on a free port (2 actix workers, as on this
//! machine), then drives it with concurrent keep-alive clients for a fixed
//! time and prints predictions/s, latency percentiles and peak RSS. Client
//! and server share the machine's cores, so the figure is a lower bound.
//!
//!   cargo bench --bench ml_api              (defaults: 10 s, 4 clients)
//!   BENCH_SECONDS=30 BENCH_CLIENTS=16 cargo bench --bench ml_api
//!
//! Then txnflow's ML API client against a slow model that works on few
//! requests at once (`max_concurrent`, `latency_ms`), with the default
//! `predict` configuration, once with a fixed limit of requests in flight
//! and once adaptive: predictions/s, timeouts, records failed, and the
//! time a flush took. Reported, not asserted.
//!
//!   BENCH_MODEL_WORKERS=1 BENCH_MODEL_LATENCY_MS=1500 BENCH_SLOW_SECONDS=60
//!   BENCH_SLOW_SECONDS=0 skips it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BATCH: usize = 100;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn request_bodies(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|batch| {
            let items: Vec<serde_json::Value> = (0..BATCH)
                .map(|i| {
                    let id = uuid::Uuid::from_u128(((batch * BATCH + i) as u128) << 64 | 0x4000_8000_0000_0000);
                    serde_json::json!({"id": id, "description": "Card expense at EDF", "amount": -952.4,
                        "timestamp": "2023-11-28T06:35:12", "merchant": "EDF", "operation_type": "payment", "side": "debit"})
                })
                .collect();
            serde_json::to_vec(&items).unwrap()
        })
        .collect()
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let clients = env_or("BENCH_CLIENTS", 4) as usize;
    let faults = txnflow::ml::reference_api::Faults::default();
    let address =
        txnflow::ml::reference_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), faults).expect("the server starts");
    let url = format!("http://{address}/predict");
    let bodies = Arc::new(request_bodies(256));
    println!(
        "ml-api benchmark: batches of {BATCH}, {clients} concurrent clients, {seconds} s after a 1 s warm-up, server at {address}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap();
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let predictions = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for worker in 0..clients {
            let (client, url, bodies, measuring, stop, predictions) =
                (client.clone(), url.clone(), bodies.clone(), measuring.clone(), stop.clone(), predictions.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    let body = bodies[n % bodies.len()].clone();
                    n += clients;
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(response.status(), 200);
                    let answer = response.bytes().await.expect("body");
                    assert!(answer.len() > BATCH * 40, "a full answer");
                    if measuring.load(Ordering::Relaxed) {
                        latencies.push(started.elapsed());
                        predictions.fetch_add(BATCH as u64, Ordering::Relaxed);
                    }
                }
                latencies
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        measuring.store(true, Ordering::SeqCst);
        let started = Instant::now();
        for second in 1..=seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            println!(
                "  {second:>3}/{seconds} s: {:>9.0} predictions/s so far",
                predictions.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
            );
        }
        measuring.store(false, Ordering::SeqCst);
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        let mut latencies: Vec<Duration> = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap());
        }
        latencies.sort();
        let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        let total = predictions.load(Ordering::SeqCst);
        println!(
            "result: {:.0} predictions/s ({:.0} requests/s of {BATCH})",
            total as f64 / elapsed,
            latencies.len() as f64 / elapsed
        );
        println!(
            "latency per request: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(0.50).as_secs_f64() * 1e3,
            percentile(0.95).as_secs_f64() * 1e3,
            percentile(0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3
        );
        println!("peak RSS (server and client in one process): {:.1} MB", peak_rss_mb());
    });
    let slow_seconds = env_or("BENCH_SLOW_SECONDS", 60);
    if slow_seconds > 0 {
        let workers = env_or("BENCH_MODEL_WORKERS", 1) as u32;
        let latency_ms = env_or("BENCH_MODEL_LATENCY_MS", 1500);
        println!();
        println!(
            "slow model: {workers} worker(s), {latency_ms} ms a request, {slow_seconds} s per mode, \
             {FLUSH_CALLERS} flushes of {FLUSH_RECORDS} records in flight"
        );
        println!(
            "| requests in flight | predictions/s | timeouts and 5xx | records failed | flush p50 | flush p99 | limit at the end |"
        );
        println!("|---|---|---|---|---|---|---|");
        for adaptive in [false, true] {
            slow_model_run(workers, latency_ms, slow_seconds, adaptive);
        }
    }
}

/// Flushes handed to the client at once, as the PredictClient does while
/// the Buffer holds a backlog, and their size (`buffer.max_records`).
const FLUSH_CALLERS: usize = 4;
const FLUSH_RECORDS: usize = 2_000;

fn slow_model_run(workers: u32, latency_ms: u64, seconds: u64, adaptive: bool) {
    use txnflow::observability::metrics::METRICS;
    let faults = txnflow::ml::reference_api::Faults { latency_ms, max_concurrent: workers, ..Default::default() };
    let address =
        txnflow::ml::reference_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), faults).expect("the server starts");
    let config = txnflow::config::Config::load(None).expect("the default configuration");
    let predict = txnflow::config::PredictConfig {
        url: format!("http://{address}"),
        adaptive_concurrency: adaptive,
        ..config.predict
    };
    let mode = if adaptive { "adaptive, at most" } else { "fixed," };
    let label = format!("{mode} {}", predict.concurrency);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let ml = Arc::new(
            txnflow::ml::client::MlClient::new(&predict, txnflow::ml::breaker::build(&config.breaker))
                .expect("the client"),
        );
        let retriable = || METRICS.ml_api_latency.with_label_values(&["retriable"]).get_sample_count();
        let retriable_before = retriable();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let next_id = Arc::new(AtomicU64::new(0));
        let mut callers = Vec::new();
        for _ in 0..FLUSH_CALLERS {
            let (ml, next_id) = (ml.clone(), next_id.clone());
            callers.push(tokio::spawn(async move {
                let (mut predicted, mut failed, mut flush_times) = (0usize, 0usize, Vec::new());
                while Instant::now() < deadline {
                    let first = next_id.fetch_add(FLUSH_RECORDS as u64, Ordering::Relaxed);
                    let items = (first..first + FLUSH_RECORDS as u64).map(request_item).collect();
                    let flush_started = Instant::now();
                    let outcome = ml.predict(items, "pipeline").await;
                    flush_times.push(flush_started.elapsed());
                    predicted += outcome.predictions.len();
                    failed += outcome.failures.len();
                    if outcome.predictions.is_empty() {
                        // Refused at once (the breaker open): a backlog is
                        // not offered faster than a flush a second.
                        tokio::time::sleep(Duration::from_secs(1).saturating_sub(flush_started.elapsed())).await;
                    }
                }
                (predicted, failed, flush_times)
            }));
        }
        let mut ticker = tokio::time::interval(Duration::from_secs(10));
        ticker.tick().await;
        while Instant::now() < deadline {
            ticker.tick().await;
            println!(
                "  {label}: {:>3.0} s, limit now {}",
                started.elapsed().as_secs_f64(),
                METRICS.ml_api_concurrency_limit.get()
            );
        }
        let (mut predicted, mut failed, mut flush_times) = (0, 0, Vec::new());
        for caller in callers {
            let (p, f, t) = caller.await.unwrap();
            predicted += p;
            failed += f;
            flush_times.extend(t);
        }
        let elapsed = started.elapsed().as_secs_f64();
        flush_times.sort();
        let percentile = |p: f64| flush_times[((flush_times.len() as f64 * p) as usize).min(flush_times.len() - 1)];
        println!(
            "| {label} | {:.0} | {} | {failed} of {} | {:.1} s | {:.1} s | {} |",
            predicted as f64 / elapsed,
            retriable() - retriable_before,
            predicted + failed,
            percentile(0.5).as_secs_f64(),
            percentile(0.99).as_secs_f64(),
            METRICS.ml_api_concurrency_limit.get()
        );
    });
}

fn request_item(n: u64) -> txnflow::domain::prediction::PredictRequestItem {
    txnflow::domain::prediction::PredictRequestItem::example(uuid::Uuid::from_u128(
        u128::from(n) << 64 | 0x4000_8000_0000_0000,
    ))
}
