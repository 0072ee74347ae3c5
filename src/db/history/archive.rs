//! Archiving: history rows older than a cut moved out, window by window,
//! never the one that is a transaction's current prediction.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel::{Connection, RunQueryDsl};

use super::super::WriteError;
use super::ChunkDone;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    rows: i64,
}

/// The history rows predicted in `[from, to)`, of `version` (or of any
/// version): a window's size before it is used.
pub fn rows_in_window(
    connection: &mut PgConnection,
    version: Option<&str>,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<u64, WriteError> {
    let count: Count = diesel::sql_query(
        "SELECT count(*) AS rows FROM prediction_history
         WHERE predicted_at >= $1 AND predicted_at < $2 AND ($3::text IS NULL OR model_version = $3)",
    )
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(to)
    .bind::<Nullable<Text>, _>(version)
    .get_result(connection)?;
    Ok(count.rows as u64)
}

#[derive(diesel::QueryableByName)]
struct Latest {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    at: Option<DateTime<Utc>>,
}

/// `version`'s last prediction in history at or after `from`, found through
/// the BRIN index: rows that arrived after a walk's span was taken.
pub fn last_prediction_since(
    connection: &mut PgConnection,
    version: &str,
    from: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, WriteError> {
    let latest: Latest = diesel::sql_query(
        "SELECT max(predicted_at) AS at FROM prediction_history WHERE predicted_at >= $1 AND model_version = $2",
    )
    .bind::<Timestamptz, _>(from)
    .bind::<Text, _>(version)
    .get_result(connection)?;
    Ok(latest.at)
}

/// Some history rows: how many, and their first and last prediction.
#[derive(diesel::QueryableByName, Debug, Clone)]
pub struct HistorySpan {
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub first_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_at: Option<DateTime<Utc>>,
}

/// The history rows older than `cut`: how many, the first and the last.
pub fn span_before(connection: &mut PgConnection, cut: DateTime<Utc>) -> Result<HistorySpan, WriteError> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS rows, min(predicted_at) AS first_at, max(predicted_at) AS last_at
         FROM prediction_history WHERE predicted_at < $1",
    )
    .bind::<Timestamptz, _>(cut)
    .get_result(connection)?)
}

/// One archive chunk, in one database transaction: of the history rows
/// predicted in `[from, to)` (found through the BRIN index on
/// `predicted_at`), those that are not a current
/// prediction move to `prediction_history_archive`. Returns the rows
/// examined and moved.
pub fn archive_chunk(
    connection: &mut PgConnection,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<(u64, u64), WriteError> {
    connection.transaction::<(u64, u64), WriteError, _>(|tx| {
        let done: ChunkDone = diesel::sql_query(
            "WITH chunk AS (
                 SELECT ctid AS row_id FROM prediction_history WHERE predicted_at >= $1 AND predicted_at < $2
             ), moved AS (
                 DELETE FROM prediction_history h USING chunk c
                 WHERE h.ctid = c.row_id
                   AND NOT EXISTS (SELECT 1 FROM predictions p
                                   WHERE p.transaction_id = h.transaction_id AND p.model_version = h.model_version
                                     AND p.predicted_at = h.predicted_at)
                 RETURNING h.transaction_id, h.category, h.confidence_score, h.model_version, h.predicted_at,
                           h.kind, h.run_id
             ), archived AS (
                 INSERT INTO prediction_history_archive
                     (transaction_id, category, confidence_score, model_version, predicted_at, kind, run_id)
                 SELECT * FROM moved
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM chunk) AS examined, (SELECT count(*) FROM archived) AS changed",
        )
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .get_result(tx)?;
        Ok((done.examined as u64, done.changed as u64))
    })
}
