//! Batch-mode benchmark of `txnflow batch` on the local stack (`make up`).
//!
//! 1. Speed: a generated file of N rows (default 1,000,000) in the seed
//!    system's format (`;`, decimal comma, quoted text) is put in S3, then
//!    loaded by `txnflow batch s3://…` (release build) into a fresh database.
//!    Beside it, in the same run, `psql \copy` loads the same rows into both
//!    tables of another fresh database: the database's own bulk-load rate.
//!    This runs `BENCH_RUNS` times (default 3), back to back, and the end
//!    gives the median and the spread (min–max).
//! 2. Re-prediction beside it: each run's loaded database is then
//!    re-predicted whole by `txnflow repredict` (release build, default
//!    configuration) with another model (v2, `--shift 3`), in rows/s from the
//!    run's own summary line, with its peak RSS and CPU per 1,000 rows.
//!    `BENCH_REPREDICT=0` skips it.
//! 3. Memory: peak RSS of `txnflow batch`, from `/usr/bin/time -v`, for N
//!    rows and for a larger file (default 5,000,000 rows, loaded once), to
//!    show it stays flat whatever the file's size; and txnflow's CPU per
//!    1,000 rows.
//!
//!   cargo bench --bench batch    (BENCH_RUNS=3, BENCH_ROWS=1000000, BENCH_LARGE_ROWS=5000000; 0 skips the large run)
//!
//! `BENCH_PROGRESS_ETA=1` measures the terminal progress bar's time left
//! instead (`make bench-progress`).
//!
//! `BENCH_TXNFLOW_BIN` runs another `txnflow` binary instead of this build's
//! (one built at another commit by `scripts/build-baseline.sh`), to compare
//! two builds back to back.

mod common;

use diesel::{Connection, RunQueryDsl};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Instant;
use txnflow::domain::transaction::ProcessingType;

use common::{
    Ceiling, CopyRow, CpuSample, TestDatabase, copy_rate, env_or, median, median_and_spread, pids_named,
    processing_window,
};

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
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(4242, 0.0);
    (0..rows).map(move |_| txnflow::domain::event::parse_event(&generator.next_record().value).unwrap())
}

async fn upload(path: &std::path::Path, key: &str) -> String {
    let config = txnflow::config::Config::from_layers([], []).unwrap();
    let client = txnflow::batch::s3::client(&config.s3);
    txnflow::batch::s3::ensure_bucket(&client, &config.s3.bucket).await.unwrap();
    let body = aws_sdk_s3::primitives::ByteStream::from_path(path).await.unwrap();
    client.put_object().bucket(&config.s3.bucket).key(key).body(body).send().await.unwrap();
    format!("s3://{}/{key}", config.s3.bucket)
}

struct Loaded {
    summary: String,
    /// When the command started and ended, in seconds since the epoch.
    started_at: f64,
    ended_at: f64,
    wall_seconds: f64,
    peak_rss_mb: f64,
    cpu_seconds: f64,
    /// The CPU seconds of the other processes over the load, by role.
    others_cpu: Vec<(&'static str, f64)>,
}

/// `/usr/bin/time -v txnflow batch URI`; its progress lines pass through.
fn load(uri: &str, db: &str, ml_api: &str, run_id: &str) -> Loaded {
    let env = [("TXNFLOW__PREDICT__URL", ml_api.to_string()), ("TXNFLOW__KAFKA__DLQ_TOPIC", format!("{run_id}-dlq"))];
    timed_txnflow(&["batch", uri, "--run-id", run_id], db, &env, run_id)
}

/// This build's `txnflow`, or `BENCH_TXNFLOW_BIN`.
fn txnflow_binary() -> String {
    std::env::var("BENCH_TXNFLOW_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_txnflow").to_string())
}

/// `/usr/bin/time -v txnflow ARGS` on `db`, with `env` beside; its progress
/// lines (those about a file or a run) pass through.
fn timed_txnflow(args: &[&str], db: &str, env: &[(&str, String)], run_id: &str) -> Loaded {
    let report = std::env::temp_dir().join(format!("bench-time-{run_id}.txt"));
    // The ML API runs in a thread of this process, which does nothing else
    // while the load runs but pass its progress lines through.
    let others = CpuSample::start(vec![
        ("ml-api", vec![std::process::id()]),
        ("s3", pids_named("weed")),
        ("postgresql", pids_named("postgres")),
        // Idle in a batch run (no Kafka involved), but on the same 2 cores.
        ("kafka nodes", common::kafka_pids()),
    ]);
    let started = Instant::now();
    let started_at = epoch_seconds();
    let mut child = Command::new("/usr/bin/time")
        .args(["-v", "-o"])
        .arg(&report)
        .arg(txnflow_binary())
        .args(args)
        .env("TXNFLOW__DB__URL", db)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
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
            if line.contains("file ") || line.contains("re-predict") {
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
    let ended_at = epoch_seconds();
    let (others_cpu, _) = others.end();
    assert!(
        output.status.success(),
        "txnflow {} failed ({}); its last lines:\n{}\n{}",
        args[0],
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
    let seconds = |label: &str| -> f64 {
        time.lines().find_map(|line| line.trim().strip_prefix(label)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let cpu_seconds = seconds("User time (seconds): ") + seconds("System time (seconds): ");
    Loaded { summary, started_at, ended_at, wall_seconds, peak_rss_mb: peak_kb / 1024.0, cpu_seconds, others_cpu }
}

fn figures_of(measured: &[Measured], f: fn(&Measured) -> f64) -> Vec<f64> {
    measured.iter().map(f).collect()
}

fn epoch_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The first and the last row's `created_at`, in seconds since the epoch.
fn first_and_last_row(db: &str) -> (f64, f64) {
    #[derive(diesel::QueryableByName)]
    struct Span {
        #[diesel(sql_type = diesel::sql_types::Double)]
        first: f64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        last: f64,
    }
    let span: Span = diesel::sql_query(
        "SELECT extract(epoch FROM min(created_at))::float8 AS first, extract(epoch FROM max(created_at))::float8 AS last FROM transactions",
    )
    .get_result(&mut diesel::PgConnection::establish(db).unwrap())
    .unwrap();
    (span.first, span.last)
}

/// What one load measured.
struct Measured {
    rows_per_second: f64,
    /// Rows over the whole command's wall time: start, S3 stream and summary.
    wall_rows_per_second: f64,
    copy: Option<f64>,
    /// The ceiling loader's best rate for the same rows (`common::Ceiling`).
    ceiling: Option<f64>,
    /// Its rate while the CPU the run's other processes used is taken.
    ceiling_shared: Option<f64>,
    peak_rss_mb: f64,
    cpu_ms_per_1000: f64,
    /// The share of a core each process used over the wall time, txnflow first.
    cores: Vec<(&'static str, f64)>,
    repredict: Option<Repredicted>,
}

/// What one re-prediction of a loaded database measured.
struct Repredicted {
    rows_per_second: f64,
    peak_rss_mb: f64,
    cpu_ms_per_1000: f64,
}

/// `txnflow repredict` of every transaction in `db` with the model at
/// `model_api` (v2, shift 3): exact counts asserted, the rate from its
/// summary line (`… in T s`, the run's own time, without the start).
fn repredict(db: &str, model_api: &str, count: u64, run_id: &str) -> Repredicted {
    println!("repredict: txnflow repredict of the {count} stored rows with v2");
    let env = [("TXNFLOW__REPREDICT__URL", model_api.to_string())];
    let loaded = timed_txnflow(&["repredict", "--run-id", run_id], db, &env, run_id);
    let expected = format!("selected {count} repredicted {count} failed 0 model v2 in ");
    let seconds: f64 = loaded
        .summary
        .split_once(&expected)
        .and_then(|(_, rest)| rest.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("every row re-predicted by v2: {}", loaded.summary));
    let rows_per_second = count as f64 / seconds;
    let cpu_ms_per_1000 = 1000.0 * loaded.cpu_seconds / (count as f64 / 1000.0);
    let described: Vec<String> = std::iter::once(("txnflow", loaded.cpu_seconds))
        .chain(loaded.others_cpu.iter().copied())
        .map(|(role, cpu)| format!("{role} {:.0}%", 100.0 * cpu / loaded.wall_seconds))
        .collect();
    println!("repredict: {}", loaded.summary);
    println!(
        "repredict: {rows_per_second:.0} rows/s over the run ({:.1} s wall with the start); peak RSS {:.1} MB; CPU {cpu_ms_per_1000:.0} ms per 1,000 rows; CPU over the wall time: {}",
        loaded.wall_seconds,
        loaded.peak_rss_mb,
        described.join(", ")
    );
    Repredicted { rows_per_second, peak_rss_mb: loaded.peak_rss_mb, cpu_ms_per_1000 }
}

/// The ML APIs of the benchmark: the live model, and v2 for re-predictions
/// (none: no re-prediction).
struct Models<'a> {
    live: &'a str,
    v2: Option<&'a str>,
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    models: &Models,
    bench_id: &str,
    count: u64,
    with_copy: bool,
) -> Measured {
    let ml_api = models.live;
    let path = std::env::temp_dir().join(format!("bench-batch-{bench_id}-{count}.csv"));
    println!("batch: generating {count} rows in the seed's format");
    generate(&path, count);
    let megabytes = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
    println!("batch: uploading {megabytes:.0} MB to S3");
    let uri = runtime.block_on(upload(&path, &format!("bench/{bench_id}/rows-{count}.csv")));
    let database = TestDatabase::migrated();
    let db = database.url.clone();
    println!("batch: txnflow batch {uri}");
    let run_id = format!("bench-{bench_id}-{count}");
    let loaded = load(&uri, &db, ml_api, &run_id);
    let window = processing_window(&db);
    let (first_row, last_row) = first_and_last_row(&db);
    // created_at is the time its flush's transaction began.
    println!(
        "batch: start to first row {:.1} s, rows {window:.1} s, last row to exit {:.1} s",
        first_row - loaded.started_at,
        loaded.ended_at - last_row
    );
    let rows_per_second = count as f64 / window;
    let cpu_ms_per_1000 = 1000.0 * loaded.cpu_seconds / (count as f64 / 1000.0);
    println!("batch: {}", loaded.summary);
    println!(
        "batch: {count} rows in {:.1} s wall ({:.0} rows/s); first to last row {window:.1} s = {rows_per_second:.0} rows/s; peak RSS {:.1} MB; CPU {cpu_ms_per_1000:.0} ms per 1,000 rows",
        loaded.wall_seconds,
        count as f64 / loaded.wall_seconds,
        loaded.peak_rss_mb
    );
    let cores: Vec<(&'static str, f64)> = std::iter::once(("txnflow", loaded.cpu_seconds))
        .chain(loaded.others_cpu.iter().copied())
        .map(|(role, seconds)| (role, seconds / loaded.wall_seconds))
        .collect();
    let described: Vec<String> = cores.iter().map(|(role, c)| format!("{role} {:.0}%", 100.0 * c)).collect();
    println!("batch: CPU over the wall time (2 cores = 200%): {}", described.join(", "));
    let rows: Vec<CopyRow> = if with_copy {
        transactions(count)
            .enumerate()
            .map(|(i, transaction)| CopyRow {
                transaction,
                processing_type: ProcessingType::Batch,
                run_id: run_id.clone(),
                batch_id: uri.clone(),
                source: format!("{uri}:{}", i + 2),
            })
            .collect()
    } else {
        Vec::new()
    };
    let copy = with_copy.then(|| {
        println!("bulk load: psql \\copy of the same rows into both tables");
        let copy = copy_rate(rows.iter());
        println!(
            "bulk load: {copy:.0} rows/s; txnflow batch / copy = {:.2} (first to last row), {:.2} (wall time)",
            rows_per_second / copy,
            count as f64 / loaded.wall_seconds / copy
        );
        copy
    });
    let ceiling = with_copy.then(|| {
        println!(
            "ceiling: binary COPY of the same rows, predictions and history, pre-encoded, on each connection count"
        );
        // The cores every process but PostgreSQL used over the load.
        let others_cores = cores.iter().filter(|(role, _)| *role != "postgresql").map(|(_, c)| c).sum::<f64>();
        let ceiling = Ceiling::measure(&rows, others_cores);
        println!(
            "ceiling: {}; txnflow batch / ceiling = {:.2}{} (first to last row); the batch's PostgreSQL {:.1} µs CPU per row",
            ceiling.describe(),
            rows_per_second / ceiling.rate,
            ceiling.shared.map_or(String::new(), |(_, rate, _)| format!(", / the ceiling with that CPU taken = {:.2}", rows_per_second / rate)),
            1e6 * loaded.others_cpu.iter().find(|(role, _)| *role == "postgresql").map_or(0.0, |(_, s)| *s)
                / count as f64
        );
        ceiling
    });
    drop(rows);
    let _ = std::fs::remove_file(&path);
    let repredict = models.v2.filter(|_| with_copy).map(|v2| repredict(&db, v2, count, &format!("{run_id}-v2")));
    let wall_rows_per_second = count as f64 / loaded.wall_seconds;
    Measured {
        rows_per_second,
        wall_rows_per_second,
        copy,
        ceiling: ceiling.as_ref().map(|c| c.rate),
        ceiling_shared: ceiling.as_ref().and_then(|c| c.shared).map(|(_, rate, _)| rate),
        peak_rss_mb: loaded.peak_rss_mb,
        cpu_ms_per_1000,
        cores,
        repredict,
    }
}

/// `BENCH_PROGRESS_ETA=1`: how good the terminal bar's time left is. A
/// batch of `BENCH_ROWS` runs in a pseudo-terminal (util-linux `script`);
/// each frame is read as it comes. The time left said at the first frame at
/// 25, 50 and 75% or more is set against the time the run then took.
/// Reported, not asserted.
fn progress_eta(runtime: &tokio::runtime::Runtime, ml_api: &str, rows: u64) {
    let bench_id = uuid::Uuid::new_v4().simple().to_string();
    let path = std::env::temp_dir().join(format!("bench-eta-{bench_id}.csv"));
    println!("progress: generating {rows} rows in the seed's format");
    generate(&path, rows);
    let uri = runtime.block_on(upload(&path, &format!("bench/{bench_id}/eta-{rows}.csv")));
    let _ = std::fs::remove_file(&path);
    let database = TestDatabase::migrated();
    let command = format!("stty cols 200 rows 50; exec '{}' batch '{uri}' --run-id eta-{bench_id}", txnflow_binary());
    println!("progress: txnflow batch {uri} in a pseudo-terminal");
    let started = Instant::now();
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("TXNFLOW__DB__URL", &database.url)
        .env("TXNFLOW__PREDICT__URL", ml_api)
        .stdout(Stdio::piped())
        .spawn()
        .expect("util-linux script runs");
    let mut output = child.stdout.take().unwrap();
    // (seconds since the start, percent, seconds left) of every frame.
    let mut frames: Vec<(f64, u64, u64)> = Vec::new();
    let mut pending = String::new();
    let mut buffer = [0u8; 8192];
    loop {
        let read = std::io::Read::read(&mut output, &mut buffer).unwrap_or(0);
        if read == 0 {
            break;
        }
        pending.push_str(&String::from_utf8_lossy(&buffer[..read]));
        let at = started.elapsed().as_secs_f64();
        while let Some(end) = pending.find(" left") {
            let frame: String = pending.drain(..end + 5).collect();
            let percent =
                frame.rsplit_once("] ").and_then(|(_, rest)| rest.trim_start().split('%').next()?.parse().ok());
            let left = frame.rsplit(' ').nth(1).and_then(|clock| {
                let parts: Vec<u64> = clock.split(':').filter_map(|p| p.parse().ok()).collect();
                (parts.len() == 3).then(|| parts[0] * 3600 + parts[1] * 60 + parts[2])
            });
            if let (Some(percent), Some(left)) = (percent, left) {
                frames.push((at, percent, left));
            }
        }
    }
    let status = child.wait().unwrap();
    let total = started.elapsed().as_secs_f64();
    println!("progress: {} frames read; the run took {total:.1} s ({status})", frames.len());
    println!("| done | after | time left said | time it took | said / took |");
    println!("|---|---|---|---|---|");
    for mark in [25, 50, 75] {
        if let Some((at, percent, left)) = frames.iter().find(|(_, percent, _)| *percent >= mark) {
            let took = total - at;
            println!("| {percent}% | {at:.1} s | {left} s | {took:.1} s | {:.2} |", *left as f64 / took);
        }
    }
}

fn main() {
    let runs = env_or("BENCH_RUNS", 3);
    let rows = env_or("BENCH_ROWS", 1_000_000);
    let large = env_or("BENCH_LARGE_ROWS", 5_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let ml_api = format!(
        "http://{}",
        txnflow::ml::reference_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap()
    );
    let v2 = (env_or("BENCH_REPREDICT", 1) > 0).then(|| {
        let model = txnflow::ml::reference_api::Faults {
            extended: true,
            model_version: "v2".into(),
            shift: 3,
            ..Default::default()
        };
        format!(
            "http://{}",
            txnflow::ml::reference_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), model).unwrap()
        )
    });
    if env_or("BENCH_PROGRESS_ETA", 0) > 0 {
        return progress_eta(&runtime, &ml_api, rows);
    }
    let models = Models { live: &ml_api, v2: v2.as_deref() };
    let bench_id = uuid::Uuid::new_v4().simple().to_string();
    println!("txnflow: {}", txnflow_binary());
    let mut measured = Vec::new();
    for run in 1..=runs {
        println!("run {run} of {runs}");
        measured.push(measure(&runtime, &models, &format!("{bench_id}-{run}"), rows, true));
    }
    let large_rss = (large > 0).then(|| measure(&runtime, &models, &bench_id, large, false).peak_rss_mb);
    let figures = |f: fn(&Measured) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
    println!();
    println!("summary: median (min–max) of {runs} runs of {rows} rows, release build, this machine");
    println!(
        "| rows/s (first to last row) | rows/s (wall) | psql \\copy rows/s | batch / copy | batch / copy (wall) | ceiling rows/s | share of ceiling | share of the ceiling with the others' CPU taken | txnflow CPU ms per 1,000 rows | peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        median_and_spread(&figures(|m| m.rows_per_second), 0),
        median_and_spread(&figures(|m| m.wall_rows_per_second), 0),
        median_and_spread(&figures(|m| m.copy.unwrap_or(f64::NAN)), 0),
        median_and_spread(&figures(|m| m.rows_per_second / m.copy.unwrap_or(f64::NAN)), 2),
        median_and_spread(&figures(|m| m.wall_rows_per_second / m.copy.unwrap_or(f64::NAN)), 2),
        median_and_spread(&figures(|m| m.ceiling.unwrap_or(f64::NAN)), 0),
        median_and_spread(&figures(|m| m.rows_per_second / m.ceiling.unwrap_or(f64::NAN)), 2),
        median_and_spread(&figures(|m| m.rows_per_second / m.ceiling_shared.unwrap_or(f64::NAN)), 2),
        median_and_spread(&figures(|m| m.cpu_ms_per_1000), 0),
        median_and_spread(&figures(|m| m.peak_rss_mb), 0),
    );
    let roles: Vec<String> = measured[0]
        .cores
        .iter()
        .enumerate()
        .map(|(i, (role, _))| {
            let shares: Vec<f64> = measured.iter().map(|m| 100.0 * m.cores[i].1).collect();
            format!("{role} {}%", median_and_spread(&shares, 0))
        })
        .collect();
    println!("CPU by process over the wall time (share of one core; 2 cores = 200%): {}", roles.join(", "));
    let repredicted: Vec<&Repredicted> = measured.iter().filter_map(|m| m.repredict.as_ref()).collect();
    if !repredicted.is_empty() {
        let figures = |f: fn(&Repredicted) -> f64| repredicted.iter().map(|r| f(r)).collect::<Vec<f64>>();
        println!(
            "re-prediction of the loaded rows with v2 (txnflow repredict, default configuration), beside the batch load:"
        );
        println!(
            "| rows/s | batch rows/s (first to last row) | repredict / batch | txnflow CPU ms per 1,000 rows | peak RSS MB |"
        );
        println!("|---|---|---|---|---|");
        let ratios: Vec<f64> = measured
            .iter()
            .filter_map(|m| m.repredict.as_ref().map(|r| r.rows_per_second / m.rows_per_second))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} |",
            median_and_spread(&figures(|r| r.rows_per_second), 0),
            median_and_spread(&figures_of(&measured, |m| m.rows_per_second), 0),
            median_and_spread(&ratios, 2),
            median_and_spread(&figures(|r| r.cpu_ms_per_1000), 0),
            median_and_spread(&figures(|r| r.peak_rss_mb), 0),
        );
    }
    let described = match large_rss {
        Some(mb) => {
            format!("{rows} rows: {:.1} MB (median); {large} rows: {mb:.1} MB", median(&figures(|m| m.peak_rss_mb)))
        }
        None => format!("{rows} rows: {:.1} MB (median)", median(&figures(|m| m.peak_rss_mb))),
    };
    println!("memory: peak RSS of txnflow batch, {described} (target <= 150 MB, flat)");
}
