//! Batch-mode benchmark of `txnflow batch` on the local stack (`make up`).
//!
//! 1. Speed: a generated file of N rows (default 1,000,000) in the seed
//!    system's format (`;`, decimal comma, quoted text) is put in S3, then
//!    loaded by `txnflow batch s3://…` (release build) into a fresh database.
//!    Beside it, in the same run, `psql \copy` loads the same rows into both
//!    tables of another fresh database: the database's own bulk-load rate.
//! 2. Memory: peak RSS of `txnflow batch`, from `/usr/bin/time -v`, for N
//!    rows and for a larger file (default 5,000,000 rows), to show it stays
//!    flat whatever the file's size.
//!
//!   cargo bench --bench batch    (BENCH_ROWS=1000000, BENCH_LARGE_ROWS=5000000; 0 skips the large run)

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{CopyRow, copy_rate, env_or, fresh_database, processing_window};

/// Writes `rows` generated transactions as a seed-format CSV file.
fn generate(path: &std::path::Path, rows: u64) {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    writeln!(file, "{}", txnflow::domain::csv_rules::SEED_HEADER).unwrap();
    for (n, t) in transactions(rows).enumerate() {
        writeln!(file, "{}", txnflow::domain::csv_rules::seed_row(&t)).unwrap();
        if (n + 1) % 500_000 == 0 {
            println!("  generated {} / {rows} rows", n + 1);
        }
    }
}

/// The same transactions every time for the same count (seeded).
fn transactions(rows: u64) -> impl Iterator<Item = txnflow::domain::transaction::Transaction> {
    let mut generator = txnflow::produce::TransactionGenerator::new(4242, 0.0);
    (0..rows).map(move |_| txnflow::domain::event::parse_event(&generator.next_record().value).unwrap())
}

async fn upload(path: &std::path::Path, key: &str) -> String {
    let config = txnflow::config::Config::from_layers([], []).unwrap();
    let client = txnflow::s3::client(&config.s3);
    txnflow::s3::ensure_bucket(&client, &config.s3.bucket).await.unwrap();
    let body = aws_sdk_s3::primitives::ByteStream::from_path(path).await.unwrap();
    client.put_object().bucket(&config.s3.bucket).key(key).body(body).send().await.unwrap();
    format!("s3://{}/{key}", config.s3.bucket)
}

struct Loaded {
    summary: String,
    wall_seconds: f64,
    peak_rss_mb: f64,
}

/// `/usr/bin/time -v txnflow batch URI`; its progress lines pass through.
fn load(uri: &str, db: &str, ml_api: &str, run_id: &str) -> Loaded {
    let report = std::env::temp_dir().join(format!("bench-time-{run_id}.txt"));
    let started = Instant::now();
    let mut child = Command::new("/usr/bin/time")
        .args(["-v", "-o"])
        .arg(&report)
        .arg(env!("CARGO_BIN_EXE_txnflow"))
        .args(["batch", uri, "--run-id", run_id])
        .env("TXNFLOW__DB__URL", db)
        .env("TXNFLOW__PREDICT__URL", ml_api)
        .env("TXNFLOW__KAFKA__DLQ_TOPIC", format!("{run_id}-dlq"))
        .env("TXNFLOW__LOG__LEVEL", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/time runs (apt-get install time)");
    let stderr = child.stderr.take().unwrap();
    // Progress lines pass through; the last lines are kept for a failure.
    let echo = std::thread::spawn(move || {
        let mut last = std::collections::VecDeque::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("file ") {
                println!("  {}", line.trim());
            }
            last.push_back(line);
            if last.len() > 30 {
                last.pop_front();
            }
        }
        last
    });
    let output = child.wait_with_output().unwrap();
    let last = echo.join().unwrap();
    let wall_seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "txnflow batch failed ({}); its last lines:\n{}\n{}",
        output.status,
        last.iter().cloned().collect::<Vec<_>>().join("\n"),
        std::fs::read_to_string(&report).unwrap_or_default()
    );
    let summary = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let time = std::fs::read_to_string(&report).unwrap();
    let _ = std::fs::remove_file(report);
    let peak_kb: f64 = time
        .lines()
        .find_map(|line| line.trim().strip_prefix("Maximum resident set size (kbytes): "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    Loaded { summary, wall_seconds, peak_rss_mb: peak_kb / 1024.0 }
}

fn main() {
    let rows = env_or("BENCH_ROWS", 1_000_000);
    let large = env_or("BENCH_LARGE_ROWS", 5_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let ml_api = format!(
        "http://{}",
        txnflow::ml_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap()
    );
    let bench_id = uuid::Uuid::new_v4().simple().to_string();
    let mut peaks = Vec::new();
    for (n, count) in [rows, large].into_iter().filter(|&c| c > 0).enumerate() {
        let path = std::env::temp_dir().join(format!("bench-batch-{bench_id}-{count}.csv"));
        println!("batch: generating {count} rows in the seed's format");
        generate(&path, count);
        let megabytes = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
        println!("batch: uploading {megabytes:.0} MB to S3");
        let uri = runtime.block_on(upload(&path, &format!("bench/{bench_id}/rows-{count}.csv")));
        let db = fresh_database("batch", true);
        println!("batch: txnflow batch {uri}");
        let loaded = load(&uri, &db, &ml_api, &format!("bench-{bench_id}-{count}"));
        let window = processing_window(&db);
        println!("batch: {}", loaded.summary);
        println!(
            "batch: {count} rows in {:.1} s wall ({:.0} rows/s); first to last row {window:.1} s = {:.0} rows/s; peak RSS {:.1} MB",
            loaded.wall_seconds,
            count as f64 / loaded.wall_seconds,
            count as f64 / window,
            loaded.peak_rss_mb
        );
        peaks.push((count, loaded.peak_rss_mb));
        if n == 0 {
            println!("bulk load: psql \\copy of the same rows into both tables");
            let copy = copy_rate(transactions(count).enumerate().map(|(i, transaction)| CopyRow {
                transaction,
                processing_type: "batch",
                run_id: format!("bench-{bench_id}-{count}"),
                batch_id: uri.clone(),
                source: format!("{uri}:{}", i + 2),
            }));
            println!(
                "bulk load: {copy:.0} rows/s; txnflow batch / copy = {:.0}% (first to last row), {:.0}% (wall time)",
                100.0 * count as f64 / window / copy,
                100.0 * count as f64 / loaded.wall_seconds / copy
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    let described: Vec<String> = peaks.iter().map(|(count, mb)| format!("{count} rows: {mb:.1} MB")).collect();
    println!("memory: peak RSS of txnflow batch, {} (target <= 150 MB, flat)", described.join("; "));
}
