//! The backfill's queries: claims of stored transactions that have no
//! prediction, their backlog, and the answers and refusals written back.

use diesel::pg::PgConnection;
use diesel::{Connection, RunQueryDsl};

use super::{WriteError, insert_new_predictions};
use crate::domain::prediction::PredictionKind;

/// A stored transaction, as the ML API is asked about it.
#[derive(diesel::QueryableByName)]
pub(crate) struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    description: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    amount: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    timestamp: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    merchant: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    operation_type: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    side: String,
}

/// Claims up to `limit` stored transactions without a prediction whose
/// next try is due, oldest first, and returns them as ML API items.
///
/// A claim counts an attempt and moves the transaction's next try
/// `initial_ms * 2^(attempts-1)` ahead (at most `max_ms`): that is both
/// its backoff and its lease. Rows are locked `FOR NO KEY UPDATE SKIP
/// LOCKED` (which a prediction's foreign-key check does not wait on), and a
/// row claimed meanwhile by another replica is left alone (`WHERE` on the
/// upsert), so two replicas never claim the same transaction.
pub fn claim_unpredicted(
    connection: &mut PgConnection,
    limit: i64,
    initial_ms: u64,
    max_ms: u64,
) -> Result<Vec<crate::domain::prediction::PredictRequestItem>, WriteError> {
    use diesel::sql_types::{BigInt, Double};
    let rows: Vec<ClaimedRow> = diesel::sql_query(
        "WITH due AS (
             SELECT t.id FROM transactions t
             LEFT JOIN prediction_backlog b ON b.transaction_id = t.id
             WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.transaction_id = t.id)
               AND (b.transaction_id IS NULL OR (b.refused_at IS NULL AND b.next_attempt_at <= now()))
             ORDER BY t.created_at
             LIMIT $1
             FOR NO KEY UPDATE OF t SKIP LOCKED
         ), claimed AS (
             INSERT INTO prediction_backlog AS b (transaction_id, attempts, next_attempt_at)
             SELECT id, 1, now() + $2 * interval '1 millisecond' FROM due
             ON CONFLICT (transaction_id) DO UPDATE
                 SET attempts = b.attempts + 1,
                     next_attempt_at = now() + least($2 * power(2, b.attempts), $3) * interval '1 millisecond'
                 WHERE b.refused_at IS NULL AND b.next_attempt_at <= now()
             RETURNING transaction_id
         )
         SELECT t.id, t.description, t.amount::text AS amount, t.\"timestamp\", t.merchant, t.operation_type, t.side
         FROM claimed c JOIN transactions t ON t.id = c.transaction_id
         ORDER BY t.created_at",
    )
    .bind::<BigInt, _>(limit)
    .bind::<Double, _>(initial_ms as f64)
    .bind::<Double, _>(max_ms as f64)
    .load(connection)?;
    Ok(rows.into_iter().map(ClaimedRow::into_item).collect())
}

impl ClaimedRow {
    pub(crate) fn id(&self) -> uuid::Uuid {
        self.id
    }

    pub(crate) fn into_item(self) -> crate::domain::prediction::PredictRequestItem {
        crate::domain::prediction::PredictRequestItem {
            id: self.id,
            description: self.description,
            amount: self.amount.parse().unwrap_or_default(),
            timestamp: crate::domain::transaction::format_timestamp(&self.timestamp),
            merchant: self.merchant,
            operation_type: self.operation_type,
            side: self.side,
        }
    }
}

/// Whether the backlog holds a transaction whose next try is due: a cheap
/// question, asked before the scan [`claim_unpredicted`] makes.
pub fn backlog_due(connection: &mut PgConnection) -> Result<bool, WriteError> {
    #[derive(diesel::QueryableByName)]
    struct Due {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        due: bool,
    }
    let due: Due = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM prediction_backlog WHERE refused_at IS NULL AND next_attempt_at <= now()) AS due",
    )
    .get_result(connection)?;
    Ok(due.due)
}

/// Stores backfilled predictions, and takes their transactions out of the
/// backlog, in one database transaction.
pub fn write_backfilled(
    connection: &mut PgConnection,
    predictions: &[crate::domain::prediction::Prediction],
) -> Result<(), WriteError> {
    let ids: Vec<uuid::Uuid> = predictions.iter().map(|p| p.transaction_id).collect();
    connection.transaction::<(), WriteError, _>(|tx| {
        insert_new_predictions(tx, predictions, PredictionKind::Backfill)?;
        diesel::sql_query("DELETE FROM prediction_backlog WHERE transaction_id = ANY($1)")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(ids)
            .execute(tx)?;
        Ok(())
    })
}

#[derive(diesel::QueryableByName)]
struct RefusedNow {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    refused: bool,
}

/// Records how claimed transactions failed: `failed` with their reason
/// (a transaction past `max_attempts` is refused from now on), and
/// `not_at_fault` (the API failed as a whole) with their attempt given
/// back. Returns how many were refused now.
pub fn record_backfill_failures(
    connection: &mut PgConnection,
    failed: &[(uuid::Uuid, String)],
    not_at_fault: &[uuid::Uuid],
    max_attempts: u32,
) -> Result<usize, WriteError> {
    use diesel::sql_types::{Array, Integer, Text, Uuid as SqlUuid};
    let ids: Vec<uuid::Uuid> = failed.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<String> =
        failed.iter().map(|(_, reason)| crate::domain::dead_letter::sanitized_reason(reason)).collect();
    connection.transaction::<usize, WriteError, _>(|tx| {
        let refused: Vec<RefusedNow> = diesel::sql_query(
            "UPDATE prediction_backlog b
             SET last_error = f.reason,
                 refused_at = CASE WHEN b.attempts >= $3 THEN now() END
             FROM UNNEST($1::uuid[], $2::text[]) AS f(id, reason)
             WHERE b.transaction_id = f.id
             RETURNING b.refused_at IS NOT NULL AS refused",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Text>, _>(reasons)
        .bind::<Integer, _>(max_attempts as i32)
        .load(tx)?;
        diesel::sql_query(
            "UPDATE prediction_backlog SET attempts = greatest(attempts - 1, 0) WHERE transaction_id = ANY($1)",
        )
        .bind::<Array<SqlUuid>, _>(not_at_fault.to_vec())
        .execute(tx)?;
        Ok(refused.iter().filter(|row| row.refused).count())
    })
}
