//! What the benchmarks share: fresh databases and the `psql \copy` baseline.

#![allow(dead_code)] // each benchmark uses its own part of this module

use diesel::{Connection, RunQueryDsl};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use txnflow::domain::transaction::{Transaction, format_timestamp};

pub const ADMIN_DB: &str = "postgres://txnflow:txnflow@127.0.0.1:5432/txnflow";

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A new, empty database; with `migrate`, the schema applied.
pub fn fresh_database(prefix: &str, migrate: bool) -> String {
    let name = format!("bench_{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = diesel::PgConnection::establish(ADMIN_DB).expect("make up first");
    diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin).unwrap();
    let url = format!("postgres://txnflow:txnflow@127.0.0.1:5432/{name}");
    if migrate {
        let status = Command::new(env!("CARGO_BIN_EXE_txnflow"))
            .arg("migrate")
            .env("TXNFLOW__DB__URL", &url)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    url
}

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
    pub processing_type: &'static str,
    pub run_id: String,
    pub batch_id: String,
    pub source: String,
}

/// `psql \copy` of the rows into both tables of a fresh, migrated database:
/// the database's own bulk-load rate, in rows per second.
pub fn copy_rate(rows: impl Iterator<Item = CopyRow>) -> f64 {
    let db = fresh_database("copy", true);
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
            row.processing_type.to_string(),
            row.run_id,
            row.batch_id,
            row.source,
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
        let status = Command::new("psql").arg(&db).args(["-q", "-c", &command]).status().unwrap();
        assert!(status.success(), "psql \\copy {table}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(transactions_csv);
    let _ = std::fs::remove_file(predictions_csv);
    count as f64 / elapsed
}
