//! Promotion: a model version's history rows made the current predictions,
//! window by window, resumable, with a catch-up of rows that commit late.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel::{Connection, QueryableByName, RunQueryDsl};

use super::super::WriteError;
use super::{ChunkDone, HistorySpan};

/// A promotion's `model_promotions` row, with the version's history span.
#[derive(diesel::QueryableByName, Debug, Clone)]
pub struct Promotion {
    #[diesel(sql_type = Text)]
    pub status: String,
    /// Where the next window starts: every history row of the version
    /// before it is done.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub resume_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    pub examined: i64,
    #[diesel(sql_type = BigInt)]
    pub promoted: i64,
    /// The earliest start of a transaction in flight while this pass of
    /// the walk ran (see [`promote_chunk`]): rows that committed behind the
    /// walk have a `predicted_at` at or after it.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub catch_up_from: Option<DateTime<Utc>>,
    /// The version's history rows (for progress), first and last.
    #[diesel(embed)]
    pub span: HistorySpan,
}

/// Starts promoting `version`, or resumes its unfinished promotion; any
/// other unfinished promotion is superseded (its resume point would be
/// stale once this one has changed current predictions).
pub fn start_promotion(connection: &mut PgConnection, version: &str) -> Result<Promotion, WriteError> {
    connection.transaction::<Promotion, WriteError, _>(|tx| {
        // One promotion at a time, whoever starts it.
        diesel::sql_query("LOCK TABLE model_promotions IN SHARE ROW EXCLUSIVE MODE").execute(tx)?;
        diesel::sql_query(
            "UPDATE model_promotions SET status = 'superseded', updated_at = now()
             WHERE status = 'running' AND model_version <> $1",
        )
        .bind::<Text, _>(version)
        .execute(tx)?;
        Ok(diesel::sql_query(
            "WITH span AS (
                 SELECT count(*) AS rows, min(predicted_at) AS first_at, max(predicted_at) AS last_at
                 FROM prediction_history WHERE model_version = $1
             ), promotion AS (
                 INSERT INTO model_promotions AS m (model_version, status) VALUES ($1, 'running')
                 ON CONFLICT (model_version) DO UPDATE SET
                     status = 'running', updated_at = now(), finished_at = NULL,
                     resume_at = CASE WHEN m.status = 'running' THEN m.resume_at END,
                     examined = CASE WHEN m.status = 'running' THEN m.examined ELSE 0 END,
                     promoted = CASE WHEN m.status = 'running' THEN m.promoted ELSE 0 END,
                     catch_up_from = CASE WHEN m.status = 'running' THEN m.catch_up_from END,
                     started_at = CASE WHEN m.status = 'running' THEN m.started_at ELSE now() END
                 RETURNING status, resume_at, examined, promoted, catch_up_from
             )
             SELECT p.*, s.rows, s.first_at, s.last_at FROM promotion p CROSS JOIN span s",
        )
        .bind::<Text, _>(version)
        .get_result(tx)?)
    })
}

#[derive(diesel::QueryableByName)]
struct Horizon {
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}

/// The day after which no history row is dated: the end of the last pass.
pub fn forever() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("9999-12-31T00:00:00Z").expect("a valid date").to_utc()
}

/// One promotion chunk, in one database transaction: the version's history
/// rows predicted in `[from, to)` (found through the BRIN index on
/// `predicted_at`), each transaction's latest among them made current,
/// unless its current prediction is already this version's and as recent;
/// then the promotion's resume point (`to`) and counts. Windows are walked
/// in time order, so a transaction's later prediction is applied after its
/// earlier one. Returns the rows examined and the current predictions
/// changed.
///
/// A history row's `predicted_at` is its writer's start (`now()`), so a
/// row can commit after the walk has passed its window. Before reading,
/// each chunk notes the earliest start of a transaction in flight (or the
/// time, when none is), kept as `catch_up_from`: every row this chunk
/// cannot see yet is dated at or after it. [`finish_promotion`] goes over
/// those again. Only the sessions the promotion's role may see in
/// `pg_stat_activity` count: txnflow's own, which write history.
pub fn promote_chunk(
    connection: &mut PgConnection,
    version: &str,
    promotion: &mut Promotion,
    window: (DateTime<Utc>, DateTime<Utc>),
) -> Result<(u64, u64), WriteError> {
    connection.transaction::<(u64, u64), WriteError, _>(|tx| {
        let horizon: Horizon = diesel::sql_query(
            "SELECT least(clock_timestamp(), min(xact_start)) AS at FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND datname = current_database()",
        )
        .get_result(tx)?;
        promotion.catch_up_from = Some(promotion.catch_up_from.map_or(horizon.at, |at| at.min(horizon.at)));
        let done = promote_window(tx, version, window)?;
        promotion.resume_at = Some(window.1);
        record_promotion(tx, version, promotion, &done, "running")?;
        Ok((done.examined as u64, done.changed as u64))
    })
}

/// The promotion's last pass, in one database transaction: with writers
/// of history held back (`SHARE` lock: it waits for the inserts in flight
/// to commit, and new ones wait for it), every row of the version from
/// `catch_up_from` on is applied again, and the promotion is completed.
/// So every row committed before it completes is promoted; a row
/// committed after it is a later prediction, for another promotion.
/// Returns the rows examined and the current predictions changed.
pub fn finish_promotion(
    connection: &mut PgConnection,
    version: &str,
    promotion: &mut Promotion,
    from: DateTime<Utc>,
) -> Result<(u64, u64), WriteError> {
    connection.transaction::<(u64, u64), WriteError, _>(|tx| {
        diesel::sql_query("LOCK TABLE prediction_history IN SHARE MODE").execute(tx)?;
        let done = promote_window(tx, version, (from, forever()))?;
        record_promotion(tx, version, promotion, &done, "completed")?;
        Ok((done.examined as u64, done.changed as u64))
    })
}

/// `version`'s rows predicted in `[from, to)` applied to the current
/// predictions: each transaction's latest among them.
fn promote_window(
    tx: &mut PgConnection,
    version: &str,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<ChunkDone, WriteError> {
    Ok(diesel::sql_query(
        "WITH chunk AS (
             SELECT transaction_id, category, confidence_score, model_version, predicted_at
             FROM prediction_history
             WHERE model_version = $1 AND predicted_at >= $2 AND predicted_at < $3
         ), latest AS (
             SELECT DISTINCT ON (transaction_id) * FROM chunk ORDER BY transaction_id, predicted_at DESC
         ), changed AS (
             INSERT INTO predictions AS p (transaction_id, category, confidence_score, model_version, predicted_at)
             SELECT l.transaction_id, l.category, l.confidence_score, l.model_version, l.predicted_at
             FROM latest l WHERE EXISTS (SELECT 1 FROM transactions t WHERE t.id = l.transaction_id)
             ON CONFLICT (transaction_id) DO UPDATE SET
                 category = EXCLUDED.category, confidence_score = EXCLUDED.confidence_score,
                 model_version = EXCLUDED.model_version, predicted_at = EXCLUDED.predicted_at
             WHERE p.model_version <> EXCLUDED.model_version OR p.predicted_at < EXCLUDED.predicted_at
             RETURNING 1
         ), cleared AS (
             -- A transaction promoted has its prediction: the backfill
             -- must not predict it again over the promotion.
             DELETE FROM prediction_backlog b WHERE b.transaction_id IN (SELECT transaction_id FROM latest)
         )
         SELECT (SELECT count(*) FROM chunk) AS examined, (SELECT count(*) FROM changed) AS changed",
    )
    .bind::<Text, _>(version)
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(to)
    .get_result(tx)?)
}

/// Records a chunk's counts, the resume point and the catch-up start.
fn record_promotion(
    tx: &mut PgConnection,
    version: &str,
    promotion: &mut Promotion,
    done: &ChunkDone,
    status: &str,
) -> Result<(), WriteError> {
    promotion.examined += done.examined;
    promotion.promoted += done.changed;
    diesel::sql_query(
        "UPDATE model_promotions SET resume_at = $2, examined = $3, promoted = $4, catch_up_from = $5,
                status = $6, updated_at = now(),
                finished_at = CASE WHEN $6 = 'completed' THEN now() END
         WHERE model_version = $1",
    )
    .bind::<Text, _>(version)
    .bind::<Nullable<Timestamptz>, _>(promotion.resume_at)
    .bind::<BigInt, _>(promotion.examined)
    .bind::<BigInt, _>(promotion.promoted)
    .bind::<Nullable<Timestamptz>, _>(promotion.catch_up_from)
    .bind::<Text, _>(status)
    .execute(tx)?;
    promotion.status = status.to_string();
    Ok(())
}
