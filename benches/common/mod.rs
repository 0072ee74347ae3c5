//! What the benchmarks share: fresh databases (the tests' own fixture),
//! the `psql \copy` baseline and the ceiling loader.

#![allow(dead_code)] // each benchmark uses its own part of this module

use diesel::{Connection, RunQueryDsl};
use std::io::Write;
use std::process::Command;
use std::time::Instant;

use txnflow::domain::transaction::{ProcessingType, Transaction, format_timestamp};

pub const ADMIN_DB: &str = "postgres://txnflow:txnflow@127.0.0.1:5432/txnflow";

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// Fresh databases are the integration tests' own fixture.
#[path = "../../tests/support/database.rs"]
mod database;
pub use database::TestDatabase;

/// Seconds from the first stored row to the last (`created_at`).
pub fn processing_window(db: &str) -> f64 {
    #[derive(diesel::QueryableByName)]
    struct Window {
        #[diesel(sql_type = diesel::sql_types::Double)]
        seconds: f64,
    }
    let window: Window = diesel::sql_query(
        "SELECT extract(epoch FROM max(created_at) - min(created_at))::float8 AS seconds FROM transactions",
    )
    .get_result(&mut diesel::PgConnection::establish(db).unwrap())
    .unwrap();
    window.seconds
}

/// One row as txnflow stores it: the transaction and its lineage.
pub struct CopyRow {
    pub transaction: Transaction,
    pub processing_type: ProcessingType,
    pub run_id: String,
    pub batch_id: String,
    pub source: String,
}

/// `psql \copy` of the rows into both tables of a fresh, migrated database:
/// the database's own bulk-load rate, in rows per second.
pub fn copy_rate<'a>(rows: impl Iterator<Item = &'a CopyRow>) -> f64 {
    let database = TestDatabase::migrated();
    let db = &database.url;
    let dir = std::env::temp_dir();
    let transactions_csv = dir.join(format!("bench-transactions-{}.csv", std::process::id()));
    let predictions_csv = dir.join(format!("bench-predictions-{}.csv", std::process::id()));
    let mut transactions = std::io::BufWriter::new(std::fs::File::create(&transactions_csv).unwrap());
    let mut predictions = std::io::BufWriter::new(std::fs::File::create(&predictions_csv).unwrap());
    let mut count = 0usize;
    for row in rows {
        let t = &row.transaction;
        let mut line = csv::Writer::from_writer(Vec::new());
        line.write_record([
            t.id.to_string(),
            t.description.clone(),
            t.amount.to_string(),
            format_timestamp(&t.timestamp),
            t.merchant.clone().unwrap_or_default(),
            t.operation_type.clone(),
            t.side.as_str().to_string(),
            row.processing_type.as_str().to_string(),
            row.run_id.clone(),
            row.batch_id.clone(),
            row.source.clone(),
        ])
        .unwrap();
        transactions.write_all(&line.into_inner().unwrap()).unwrap();
        writeln!(predictions, "{},{},1.0,v1.0.0", t.id, txnflow::domain::categories::reference_category(t.id)).unwrap();
        count += 1;
    }
    drop((transactions, predictions));
    let started = Instant::now();
    for (table, columns, file) in [
        (
            "transactions",
            "id, description, amount, \"timestamp\", merchant, operation_type, side, processing_type, run_id, batch_id, source",
            &transactions_csv,
        ),
        ("predictions", "transaction_id, category, confidence_score, model_version", &predictions_csv),
    ] {
        let command = format!("\\copy {table} ({columns}) FROM '{}' WITH (FORMAT csv)", file.display());
        let status = Command::new("psql").arg(db).args(["-q", "-c", &command]).status().unwrap();
        assert!(status.success(), "psql \\copy {table}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(transactions_csv);
    let _ = std::fs::remove_file(predictions_csv);
    count as f64 / elapsed
}

/// The database's ceiling for a run's rows: the fastest loader we have,
/// with no broker and no ML API. Each row, its prediction (the reference
/// category, as in `copy_rate`) and its history row are encoded before the
/// clock starts into binary `COPY` streams of `BENCH_CEILING_CHUNK_ROWS` rows (10,000),
/// txnflow's own encoding ([`txnflow::db::EncodedFlush`]); then the chunks
/// are sent on several connections at once, each chunk in one database
/// transaction, into the same three tables of a fresh, migrated database,
/// with the same indexes.
pub struct Ceiling {
    /// The best rate, in rows per second.
    pub rate: f64,
    /// The connection count that gave it.
    pub connections: usize,
    /// Each connection count tried, with its rate and PostgreSQL's CPU
    /// per row, in microseconds.
    pub tried: Vec<(usize, f64, f64)>,
    /// The same load on the best count while busy threads take the cores
    /// the measured run's other processes used (`Ceiling::measure`'s
    /// `others_cores`): the rate and PostgreSQL's CPU per row then.
    pub shared: Option<(f64, f64, f64)>,
}

impl Ceiling {
    /// Loads the rows once per connection count of `BENCH_CEILING_CONNECTIONS`
    /// (default 1,2,4) and keeps the fastest. Then, unless `others_cores`
    /// is 0 or `BENCH_CEILING_SHARED=0`, loads them once more on that count
    /// while busy threads take `others_cores` of the 2 cores, as txnflow, the
    /// ML API, the broker and S3 took them in the measured run: what the
    /// database can do with the CPU that is left to it.
    pub fn measure(rows: &[CopyRow], others_cores: f64) -> Ceiling {
        let counts: Vec<usize> = std::env::var("BENCH_CEILING_CONNECTIONS")
            .unwrap_or_else(|_| "1,2,4".into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .filter(|&n| n > 0)
            .collect();
        let chunks = encode_chunks(rows);
        let tried: Vec<(usize, f64, f64)> = counts
            .iter()
            .map(|&n| {
                let (rate, postgresql_us_per_row) = ceiling_load(&chunks, rows.len(), n);
                (n, rate, postgresql_us_per_row)
            })
            .collect();
        let (connections, rate, _) =
            tried.iter().copied().fold((0, 0.0, 0.0), |best, t| if t.1 > best.1 { t } else { best });
        let shared = (others_cores > 0.0 && env_or("BENCH_CEILING_SHARED", 1) != 0).then(|| {
            let taker = CpuTaker::start(others_cores);
            let (rate, postgresql_us_per_row) = ceiling_load(&chunks, rows.len(), connections);
            drop(taker);
            (others_cores, rate, postgresql_us_per_row)
        });
        Ceiling { rate, connections, tried, shared }
    }

    /// "R rows/s on N connections (1: a rows/s, PostgreSQL c µs CPU per row; …)", for a report line.
    pub fn describe(&self) -> String {
        let tried = self
            .tried
            .iter()
            .map(|(n, rate, us)| format!("{n}: {rate:.0} rows/s, PostgreSQL {us:.1} µs CPU per row"))
            .collect::<Vec<_>>()
            .join("; ");
        let shared = self.shared.map_or(String::new(), |(cores, rate, us)| {
            format!(
                "; with {:.0}% of a core taken as in the run: {rate:.0} rows/s, PostgreSQL {us:.1} µs CPU per row",
                100.0 * cores
            )
        });
        format!("{:.0} rows/s on {} connections ({tried}){shared}", self.rate, self.connections)
    }
}

/// Busy threads that take a share of the CPU until dropped: each spins for
/// part of every 10 ms and sleeps for the rest, as a process that competes
/// for the cores does.
struct CpuTaker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuTaker {
    /// Takes `cores` (1.5 = a core and a half), spread over as many threads
    /// as whole cores it needs.
    fn start(cores: f64) -> CpuTaker {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let count = cores.ceil().max(1.0) as usize;
        let duty = (cores / count as f64).clamp(0.0, 1.0);
        let period = std::time::Duration::from_millis(10);
        let threads = (0..count)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        while started.elapsed() < period.mul_f64(duty) {
                            std::hint::spin_loop();
                        }
                        std::thread::sleep(period.mul_f64(1.0 - duty));
                    }
                })
            })
            .collect();
        CpuTaker { stop, threads }
    }
}

impl Drop for CpuTaker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Rows per chunk of the ceiling loader (`BENCH_CEILING_CHUNK_ROWS`): by
/// default far above a flush, so that each `COPY` costs little beside its
/// rows.
fn ceiling_chunk_rows() -> usize {
    env_or("BENCH_CEILING_CHUNK_ROWS", 10_000).max(1) as usize
}

/// An empty lineage field is NULL, as in `copy_rate`'s CSV.
fn optional(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

fn encode_chunks(rows: &[CopyRow]) -> Vec<txnflow::db::EncodedFlush> {
    use txnflow::domain::prediction::{Prediction, PredictionKind};
    rows.chunks(ceiling_chunk_rows())
        .map(|chunk| {
            let stored: Vec<txnflow::db::TransactionRow<'_>> = chunk
                .iter()
                .map(|row| txnflow::db::TransactionRow {
                    transaction: &row.transaction,
                    processing_type: row.processing_type,
                    run_id: optional(&row.run_id),
                    batch_id: optional(&row.batch_id),
                    source: row.source.clone(),
                })
                .collect();
            let predictions: Vec<Prediction> = chunk
                .iter()
                .map(|row| Prediction {
                    transaction_id: row.transaction.id,
                    category: txnflow::domain::categories::reference_category(row.transaction.id).to_string(),
                    confidence_score: 1.0,
                    model_version: "v1.0.0".to_string(),
                })
                .collect();
            txnflow::db::EncodedFlush::of(&stored, &predictions, PredictionKind::Pipeline)
        })
        .collect()
}

/// One load of the encoded chunks on `connections` connections: rows per
/// second, and PostgreSQL's CPU per row in microseconds.
fn ceiling_load(chunks: &[txnflow::db::EncodedFlush], rows: usize, connections: usize) -> (f64, f64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let database = TestDatabase::migrated();
    let mut opened: Vec<diesel::PgConnection> =
        (0..connections).map(|_| diesel::PgConnection::establish(&database.url).unwrap()).collect();
    let next = AtomicUsize::new(0);
    let cpu = CpuSample::start(vec![("postgresql", pids_named("postgres"))]);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for connection in opened.iter_mut() {
            let next = &next;
            scope.spawn(move || {
                while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    connection.transaction(|tx| chunk.copy_into(tx)).expect("the ceiling's COPY");
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (used, _) = cpu.end();
    let postgresql_seconds: f64 = used.iter().map(|(_, seconds)| seconds).sum();
    (rows as f64 / elapsed, 1e6 * postgresql_seconds / rows as f64)
}

/// CPU seconds (user and system) a process has used so far, from
/// `/proc/<pid>/stat`; 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, false)
}

/// As `cpu_seconds`, plus the CPU of its children that have exited and been
/// waited for: PostgreSQL's postmaster reaps the backends of connections
/// closed during a run, and this is the only place their CPU is left.
pub fn cpu_seconds_with_reaped_children(pid: u32) -> f64 {
    stat_seconds(pid, true)
}

fn stat_seconds(pid: u32, with_children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat(5), cutime and cstime 16
    // and 17; `rest` starts at field 3.
    let children = if with_children { ticks(13) + ticks(14) } else { 0.0 };
    (ticks(11) + ticks(12) + children) / 100.0
}

/// The pids of the processes named exactly `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let output = Command::new("pgrep").args(["-x", name]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&output).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The local Kafka cluster's three nodes, from the pid files `make up` writes.
pub fn kafka_pids() -> Vec<u32> {
    let pids = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack/pids");
    (1..=3)
        .filter_map(|n| std::fs::read_to_string(pids.join(format!("kafka-{n}.pid"))).ok())
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

/// Resident memory of `pid` now and at its peak (VmRSS, VmHWM), in MB.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The Kafka nodes' resident memory, each "now / peak" in MB, for a report line.
pub fn kafka_rss_line() -> String {
    kafka_pids()
        .into_iter()
        .enumerate()
        .map(|(i, pid)| {
            let (now, peak) = rss_mb(pid);
            format!("node {} {now:.0} / {peak:.0} MB", i + 1)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU use of the processes of a run, by role, from a start to an end.
pub struct CpuSample {
    roles: Vec<(&'static str, Vec<u32>, Vec<f64>)>,
    started: Instant,
}

impl CpuSample {
    /// `roles`: a name and its processes. PostgreSQL's backends come and go,
    /// so it is found by name at the start and again at the end.
    pub fn start(roles: Vec<(&'static str, Vec<u32>)>) -> CpuSample {
        let roles = roles
            .into_iter()
            .map(|(role, pids)| {
                let before = pids.iter().map(|&pid| role_cpu_seconds(role, pid)).collect();
                (role, pids, before)
            })
            .collect();
        CpuSample { roles, started: Instant::now() }
    }

    /// Each role's CPU seconds since the start, and the seconds elapsed.
    pub fn end(self) -> (Vec<(&'static str, f64)>, f64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let used = self
            .roles
            .into_iter()
            .map(|(role, pids, before)| {
                let mut total: f64 =
                    pids.iter().zip(&before).map(|(&pid, was)| (role_cpu_seconds(role, pid) - was).max(0.0)).sum();
                if role == "postgresql" {
                    // Backends started during the run count from zero.
                    total += pids_named("postgres")
                        .iter()
                        .filter(|pid| !pids.contains(pid))
                        .map(|&pid| cpu_seconds(pid))
                        .sum::<f64>();
                }
                (role, total)
            })
            .collect();
        (used, elapsed)
    }
}

/// PostgreSQL's CPU includes the backends that ended during the run.
fn role_cpu_seconds(role: &str, pid: u32) -> f64 {
    if role == "postgresql" { cpu_seconds_with_reaped_children(pid) } else { cpu_seconds(pid) }
}

/// The median and the range of some figures, as "median (min–max)".
pub fn median_and_spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if sorted.is_empty() { f64::NAN } else { sorted[sorted.len() / 2] };
    let (low, high) = (sorted.first().copied().unwrap_or(f64::NAN), sorted.last().copied().unwrap_or(f64::NAN));
    format!("{median:.decimals$} ({low:.decimals$}–{high:.decimals$})")
}

/// The median of some figures.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One phase of one stage, from `txnflow_stage_seconds` in a `/metrics` text.
pub struct StagePhase {
    pub stage: String,
    pub phase: String,
    pub count: f64,
    pub seconds: f64,
}

/// The `txnflow_stage_seconds` sums and counts of a `/metrics` text.
pub fn stage_phases(metrics: &str) -> Vec<StagePhase> {
    let mut phases: Vec<StagePhase> = Vec::new();
    for line in metrics.lines() {
        let (kind, rest) = if let Some(rest) = line.strip_prefix("txnflow_stage_seconds_sum{") {
            ("sum", rest)
        } else if let Some(rest) = line.strip_prefix("txnflow_stage_seconds_count{") {
            ("count", rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let (Some(stage), Some(phase), Ok(value)) = (label("stage"), label("phase"), value.trim().parse::<f64>())
        else {
            continue;
        };
        let index = match phases.iter().position(|p| p.stage == stage && p.phase == phase) {
            Some(index) => index,
            None => {
                phases.push(StagePhase { stage, phase, count: 0.0, seconds: 0.0 });
                phases.len() - 1
            }
        };
        match kind {
            "sum" => phases[index].seconds = value,
            _ => phases[index].count = value,
        }
    }
    phases
}

/// The stage table of a run of `window` seconds: per phase, how many
/// items, their mean time, and the mean number in that phase at once.
pub fn print_stage_table(phases: &[StagePhase], window: f64) {
    println!("  | stage | phase | items | mean ms | in this phase at once (mean) |");
    println!("  |---|---|---|---|---|");
    for order in ["read", "buffer", "ml_api", "db_write", "commit"] {
        for p in phases.iter().filter(|p| p.stage == order) {
            let mean = if p.count > 0.0 { 1000.0 * p.seconds / p.count } else { 0.0 };
            println!("  | {} | {} | {:.0} | {mean:.2} | {:.2} |", p.stage, p.phase, p.count, p.seconds / window);
        }
    }
}

/// Samples what PostgreSQL's backends of one database are doing
/// (`pg_stat_activity`'s wait events), every 50 ms, until stopped.
pub struct WaitSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<std::collections::BTreeMap<String, u64>>,
}

impl WaitSampler {
    pub fn start(db_url: &str) -> WaitSampler {
        let database = db_url.rsplit('/').next().unwrap_or_default().to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            #[derive(diesel::QueryableByName)]
            struct Activity {
                #[diesel(sql_type = diesel::sql_types::Text)]
                what: String,
            }
            let mut connection = diesel::PgConnection::establish(ADMIN_DB).unwrap();
            let mut counts = std::collections::BTreeMap::new();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let rows: Vec<Activity> = diesel::sql_query(
                    "SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event, 'on CPU')
                                 ELSE coalesce(state, 'none') END AS what
                     FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
                )
                .bind::<diesel::sql_types::Text, _>(&database)
                .load(&mut connection)
                .unwrap_or_default();
                for row in rows {
                    *counts.entry(row.what).or_insert(0) += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            counts
        });
        WaitSampler { stop, thread }
    }

    /// What the backends were doing, as shares of the samples, most first.
    pub fn end(self) -> String {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = self.thread.join().unwrap();
        let total: u64 = counts.values().sum();
        let mut shares: Vec<(String, u64)> = counts.into_iter().collect();
        shares.sort_by_key(|share| std::cmp::Reverse(share.1));
        shares
            .iter()
            .map(|(what, n)| format!("{what} {:.0}%", 100.0 * *n as f64 / total.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
