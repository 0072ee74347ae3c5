//! One transaction's predictions, across model versions and the archive:
//! the first question asked of a history.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Bool, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{QueryableByName, RunQueryDsl};
use uuid::Uuid;

use crate::db::WriteError;

/// The most predictions one lookup returns (`--limit`, `?limit=`).
pub const MAX_LOOKUP: i64 = 1_000;

/// A prediction: what the model said, and when.
#[derive(QueryableByName, Debug, Clone, serde::Serialize)]
pub struct Predicted {
    #[diesel(sql_type = Text)]
    pub category: String,
    #[diesel(sql_type = Double)]
    pub confidence_score: f64,
    #[diesel(sql_type = Text)]
    pub model_version: String,
    #[diesel(sql_type = Timestamptz)]
    pub predicted_at: DateTime<Utc>,
}

/// One prediction of the transaction in its history, live or archived.
#[derive(QueryableByName, Debug, Clone, serde::Serialize)]
pub struct PastPrediction {
    #[diesel(embed)]
    #[serde(flatten)]
    pub prediction: Predicted,
    /// `pipeline`, `backfill`, `repredict`, `shadow` or `migrated`.
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub run_id: Option<String>,
    /// In `prediction_history_archive`.
    #[diesel(sql_type = Bool)]
    pub archived: bool,
}

/// What is known of one transaction's predictions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransactionPredictions {
    pub transaction_id: Uuid,
    /// Whether the transaction is stored at all.
    pub stored: bool,
    /// Its current prediction (`predictions`).
    pub current: Option<Predicted>,
    /// Newest first, at most the limit asked.
    pub history: Vec<PastPrediction>,
    /// More rows than the limit exist.
    pub truncated: bool,
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = Bool)]
    stored: bool,
}

/// Every prediction of `transaction_id`, newest first, at most `limit`
/// (clamped to [`MAX_LOOKUP`]), from the history and its archive.
pub fn transaction_predictions(
    connection: &mut PgConnection,
    transaction_id: Uuid,
    limit: i64,
) -> Result<TransactionPredictions, WriteError> {
    let limit = limit.clamp(1, MAX_LOOKUP);
    let stored: Stored = diesel::sql_query("SELECT EXISTS (SELECT 1 FROM transactions WHERE id = $1) AS stored")
        .bind::<SqlUuid, _>(transaction_id)
        .get_result(connection)?;
    let current: Option<Predicted> = diesel::sql_query(
        "SELECT category, confidence_score, model_version, predicted_at FROM predictions WHERE transaction_id = $1",
    )
    .bind::<SqlUuid, _>(transaction_id)
    .load(connection)?
    .pop();
    let mut history: Vec<PastPrediction> = diesel::sql_query(
        "(SELECT category, confidence_score, model_version, predicted_at, kind, run_id, false AS archived
          FROM prediction_history WHERE transaction_id = $1)
         UNION ALL
         (SELECT category, confidence_score, model_version, predicted_at, kind, run_id, true AS archived
          FROM prediction_history_archive WHERE transaction_id = $1)
         ORDER BY predicted_at DESC
         LIMIT $2",
    )
    .bind::<SqlUuid, _>(transaction_id)
    .bind::<BigInt, _>(limit + 1)
    .load(connection)?;
    let truncated = history.len() as i64 > limit;
    history.truncate(limit as usize);
    Ok(TransactionPredictions { transaction_id, stored: stored.stored, current, history, truncated })
}
