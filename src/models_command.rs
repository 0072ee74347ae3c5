//! `txnflow models list | compare A B | promote V` and `txnflow archive
//! predictions`: model rollouts over `prediction_history`, in the database
//! only (the ML API is never called).

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::db::{self, history};

/// History rows per promote or archive chunk: each chunk is one database
/// transaction.
const CHUNK_ROWS: usize = 5_000;

fn connect(config: &Config) -> anyhow::Result<diesel::PgConnection> {
    let mut connection = db::connect(&config.db.url)?;
    if config.db.auto_migrate {
        db::migrate(&mut connection)?;
    }
    Ok(connection)
}

fn database(error: db::WriteError) -> anyhow::Error {
    anyhow::anyhow!("{}", db::short_reason(error))
}

/// The versions, with their counts and coverage.
pub fn list(config: &Config) -> anyhow::Result<()> {
    let mut connection = connect(config)?;
    let versions = history::model_versions(&mut connection).map_err(database)?;
    let time = |at: Option<chrono::DateTime<chrono::Utc>>| {
        at.map(|at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "-".into())
    };
    let width = versions.iter().map(|v| v.model_version.chars().count()).max().unwrap_or(0).max(13);
    println!(
        "{:width$}  {:>12}  {:>12}  {:>9}  {:>8}  {:20}  {:20}",
        "model_version", "predictions", "transactions", "coverage", "current", "first", "last"
    );
    for version in &versions {
        println!(
            "{:width$}  {:>12}  {:>12}  {:>8.2}%  {:>8}  {:20}  {:20}",
            version.model_version,
            version.predictions,
            version.transactions,
            version.coverage_pct,
            version.current_predictions,
            time(version.first_prediction_at),
            time(version.last_prediction_at)
        );
    }
    Ok(())
}

/// Agreement and the confusion table of `a` against `b`.
pub fn compare(config: &Config, a: &str, b: &str, csv: bool) -> anyhow::Result<()> {
    let mut connection = connect(config)?;
    eprintln!("comparing {a} and {b} over the transactions both have predicted");
    let confusion = history::compare(&mut connection, a, b).map_err(database)?;
    if csv {
        print!("{}", confusion.to_csv(a, b));
    } else {
        print!("{}", confusion.to_table(a, b));
    }
    Ok(())
}

/// Makes `version`'s latest prediction current for every transaction it
/// has predicted, in chunks; resumes an interrupted promotion of it.
pub fn promote(config: &Config, version: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut connection = connect(config)?;
    if !history::lock_promotions(&mut connection).map_err(database)? {
        anyhow::bail!("another promotion is running; wait for it to end");
    }
    let mut promotion = history::start_promotion(&mut connection, version).map_err(database)?;
    if promotion.rows == 0 {
        anyhow::bail!("model version {version:?} has no prediction in prediction_history (see `txnflow models list`)");
    }
    if promotion.examined > 0 {
        eprintln!(
            "resuming the promotion of {version} after {} of {} history rows",
            promotion.examined, promotion.rows
        );
    } else {
        eprintln!("promoting {version}: {} history rows", promotion.rows);
    }
    let mut last_progress = Instant::now();
    loop {
        let (examined, _) =
            history::promote_chunk(&mut connection, version, &mut promotion, CHUNK_ROWS).map_err(database)?;
        if examined == 0 {
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "promote {version}: {} of {} history rows ({:.0}%), {} current predictions changed",
                promotion.examined,
                promotion.rows,
                100.0 * promotion.examined as f64 / promotion.rows.max(1) as f64,
                promotion.promoted
            );
            last_progress = Instant::now();
        }
    }
    println!(
        "promoted {version}: examined {} history rows, changed {} current predictions in {:.1} s",
        promotion.examined,
        promotion.promoted,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Moves history rows older than `days` days, except current predictions,
/// into `prediction_history_archive`, a version at a time, in chunks.
pub fn archive(config: &Config, days: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut connection = connect(config)?;
    let cut = chrono::Utc::now() - chrono::Duration::days(i64::from(days));
    let versions = history::history_versions(&mut connection).map_err(database)?;
    eprintln!(
        "archiving history rows older than {days} days (before {}), {} versions",
        cut.to_rfc3339(),
        versions.len()
    );
    let (mut examined, mut moved) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    for version in &versions {
        let mut cursor = history::ArchiveCursor::default();
        loop {
            let (seen, gone) =
                history::archive_chunk(&mut connection, version, cut, &mut cursor, CHUNK_ROWS).map_err(database)?;
            if seen == 0 {
                break;
            }
            examined += seen;
            moved += gone;
            if last_progress.elapsed() >= Duration::from_secs(5) {
                eprintln!("archive: {version}: examined {examined}, moved {moved}");
                last_progress = Instant::now();
            }
        }
    }
    println!(
        "archived {moved} of {examined} history rows older than {days} days ({} kept: current predictions) in {:.1} s",
        examined - moved,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
