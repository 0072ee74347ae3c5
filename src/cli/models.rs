//! `txnflow models list | compare A B | promote V | history ID` and `txnflow archive
//! predictions`: model rollouts over `prediction_history`, in the database
//! only (the ML API is never called).

use std::time::Instant;

use crate::config::Config;
use crate::db::{self, history};
use crate::domain::time_windows::TimeWindows;
use crate::observability::progress::{Progress, Unit};

/// The history rows a promote or archive chunk aims at (its time window
/// follows the density of the rows); each chunk is one database transaction.
const CHUNK_ROWS: u64 = 5_000;

fn connect(config: &Config) -> anyhow::Result<diesel::PgConnection> {
    let mut connection = db::connect(&config.db.url)?;
    if config.db.auto_migrate {
        db::migrate(&mut connection)?;
    }
    Ok(connection)
}

fn database(error: db::WriteError) -> anyhow::Error {
    anyhow::anyhow!("{}", crate::domain::redaction::short_reason(error))
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
    if confusion.total() == 0 {
        for version in [a, b] {
            if !history::has_predictions(&mut connection, version).map_err(database)? {
                anyhow::bail!(
                    "model version {version:?} has no prediction in prediction_history (see `txnflow models list`)"
                );
            }
        }
    }
    if csv {
        print!("{}", confusion.to_csv(a, b));
    } else {
        print!("{}", confusion.to_table(a, b));
    }
    Ok(())
}

/// Walks of the history a promotion makes at most: the first, and passes
/// over the rows that committed behind the one before, while there are
/// more than a chunk of them. The last pass then holds writers back.
const MOST_WALKS: u32 = 3;

/// Makes `version`'s latest prediction current for every transaction it
/// has predicted, in chunks; resumes an interrupted promotion of it.
pub fn promote(config: &Config, version: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut connection = connect(config)?;
    if !history::lock_promote_and_archive(&mut connection).map_err(database)? {
        anyhow::bail!("another promotion or archive is running; wait for it to end");
    }
    let mut promotion = history::start_promotion(&mut connection, version).map_err(database)?;
    if promotion.span.rows == 0 {
        anyhow::bail!("model version {version:?} has no prediction in prediction_history (see `txnflow models list`)");
    }
    if promotion.examined > 0 {
        eprintln!(
            "resuming the promotion of {version} after {} of {} history rows",
            promotion.examined, promotion.span.rows
        );
    } else {
        eprintln!("promoting {version}: {} history rows", promotion.span.rows);
    }
    let (Some(first), Some(last)) = (promotion.span.first_at, promotion.span.last_at) else {
        anyhow::bail!("model version {version:?} has no prediction in prediction_history");
    };
    let mut start = promotion.resume_at.unwrap_or(first).max(first);
    let mut walk = Walk { last, rows: (promotion.span.rows - promotion.examined).max(1) as u64, number: 1 };
    let mut progress = Progress::start(format!("promote {version}"), Unit::Rows);
    loop {
        let covered = walk_history(&mut connection, version, &mut promotion, start, &walk, &mut progress)?;
        let from = promotion.catch_up_from.unwrap_or(covered);
        let behind =
            history::rows_in_window(&mut connection, Some(version), (from, history::forever())).map_err(database)?;
        let again = if behind > CHUNK_ROWS && walk.number < MOST_WALKS {
            history::last_prediction_since(&mut connection, version, from).map_err(database)?
        } else {
            None
        };
        let Some(last) = again else {
            history::finish_promotion(&mut connection, version, &mut promotion, from).map_err(database)?;
            let (done, total, detail) = promotion_progress(&promotion, &walk);
            progress.finish(done, total, &detail);
            break;
        };
        tracing::info!("promote {version}: going over {behind} history rows again, written while it walked");
        promotion.catch_up_from = None;
        start = from;
        walk = Walk { last, rows: behind, number: walk.number + 1 };
    }
    println!(
        "promoted {version}: examined {} history rows, changed {} current predictions in {:.1} s",
        promotion.examined,
        promotion.promoted,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One walk of a promotion over history: to `last` (or later, as rows
/// arrive), about `rows` rows.
struct Walk {
    last: chrono::DateTime<chrono::Utc>,
    rows: u64,
    number: u32,
}

/// Walks `version`'s history from `start` in windows, one chunk each,
/// until no later row is seen; returns where it stopped.
fn walk_history(
    connection: &mut diesel::PgConnection,
    version: &str,
    promotion: &mut history::Promotion,
    start: chrono::DateTime<chrono::Utc>,
    walk: &Walk,
    progress: &mut Progress,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let mut last = walk.last;
    let mut windows = TimeWindows::new(start, last, walk.rows, CHUNK_ROWS);
    loop {
        let Some(window) = windows.next_window() else {
            return Ok(windows.next_start());
        };
        let rows = history::rows_in_window(connection, Some(version), window).map_err(database)?;
        if !windows.fits(rows) {
            continue;
        }
        let (examined, _) = history::promote_chunk(connection, version, promotion, window).map_err(database)?;
        windows.done(window.1, examined);
        if window.1 > last {
            match history::last_prediction_since(connection, version, window.1).map_err(database)? {
                // Rows of this version arrived while it was being promoted.
                Some(later) => {
                    last = later;
                    windows.extend_to(later);
                }
                None => return Ok(windows.next_start()),
            }
        }
        let (done, total, detail) = promotion_progress(promotion, walk);
        progress.show(done, total, &detail);
    }
}

/// A promotion's progress: history rows examined of those counted at its
/// start (more when a walk goes over rows written meanwhile).
fn promotion_progress(promotion: &history::Promotion, walk: &Walk) -> (u64, Option<u64>, String) {
    let examined = promotion.examined.max(0) as u64;
    let total = (promotion.span.rows.max(0) as u64).max(examined);
    let again = if walk.number > 1 { format!(", walk {} of at most {MOST_WALKS}", walk.number) } else { String::new() };
    (examined, Some(total), format!("{} current predictions changed{again}", promotion.promoted))
}

/// Moves history rows older than `days` days, except current predictions,
/// into `prediction_history_archive`, in time windows of about
/// `CHUNK_ROWS` rows.
pub fn archive(config: &Config, days: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut connection = connect(config)?;
    if !history::lock_promote_and_archive(&mut connection).map_err(database)? {
        anyhow::bail!("a promotion or another archive is running; wait for it to end");
    }
    let cut = chrono::Duration::try_days(i64::from(days))
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
        .ok_or_else(|| anyhow::anyhow!("--older-than {days}: too far back"))?;
    let span = history::span_before(&mut connection, cut).map_err(database)?;
    eprintln!("archiving history rows older than {days} days (before {}): {} rows", cut.to_rfc3339(), span.rows);
    let (mut examined, mut moved) = (0u64, 0u64);
    let mut progress = Progress::start(format!("archive older than {days} days"), Unit::Rows);
    let total = Some(span.rows.max(0) as u64);
    if let (Some(first), Some(last)) = (span.first_at, span.last_at) {
        let mut windows = TimeWindows::new(first, last, span.rows as u64, CHUNK_ROWS);
        // The span's last row is before the cut, so every window ends at the cut at most.
        while let Some(window) = windows.next_window() {
            if !windows.fits(history::rows_in_window(&mut connection, None, window).map_err(database)?) {
                continue;
            }
            let (seen, gone) = history::archive_chunk(&mut connection, window).map_err(database)?;
            windows.done(window.1, seen);
            examined += seen;
            moved += gone;
            progress.show(examined, total, &format!("moved {moved}"));
        }
    }
    progress.finish(examined, total.map(|rows| rows.max(examined)), &format!("moved {moved}"));
    println!(
        "archived {moved} of {examined} history rows older than {days} days ({} kept: current predictions) in {:.1} s",
        examined - moved,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `txnflow models history ID`: every prediction of one transaction,
/// newest first, with the current one marked.
pub fn history(config: &Config, id: &str, limit: i64, json: bool) -> anyhow::Result<()> {
    let transaction_id =
        crate::domain::identity::lookup_id(id).map_err(|reason| anyhow::anyhow!("models history: {reason}"))?;
    let mut connection = connect(config)?;
    let found = history::transaction_predictions(&mut connection, transaction_id, limit).map_err(database)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    if !found.stored {
        anyhow::bail!("models history: no transaction {transaction_id} is stored");
    }
    match &found.current {
        Some(current) => println!(
            "transaction {transaction_id}: current {} ({:.3}, {}, {})",
            current.category,
            current.confidence_score,
            current.model_version,
            current.predicted_at.format("%Y-%m-%dT%H:%M:%SZ")
        ),
        None => println!("transaction {transaction_id}: no current prediction"),
    }
    let width = found.history.iter().map(|p| p.prediction.model_version.chars().count()).max().unwrap_or(0).max(13);
    println!(
        "{:20}  {:width$}  {:24}  {:>10}  {:9}  archived",
        "predicted_at", "model_version", "category", "confidence", "kind"
    );
    for past in &found.history {
        let prediction = &past.prediction;
        println!(
            "{:20}  {:width$}  {:24}  {:>10.3}  {:9}  {}",
            prediction.predicted_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            prediction.model_version,
            prediction.category,
            prediction.confidence_score,
            past.kind,
            if past.archived { "yes" } else { "no" }
        );
    }
    if found.truncated {
        println!("(the newest {} shown; --limit shows more, up to {})", found.history.len(), history::MAX_LOOKUP);
    }
    Ok(())
}
