//! Dead letters the DLQ topic refused for good, kept in `dead_letters`
//! for `txnflow dlq list` and `dlq replay`.

use diesel::RunQueryDsl;
use diesel::pg::PgConnection;

use super::WriteError;

/// A dead letter the DLQ topic refused for good, as `dead_letters` stores it.
pub struct StoredDeadLetter<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    /// The DLQ headers (`domain::dead_letter`), by name.
    pub headers: &'a [(&'static str, String)],
    pub refused_by: &'a str,
}

/// Stores a dead letter in `dead_letters`; one row per source and error
/// type, so a record dead-lettered again replaces its row (and is replayable again).
pub fn store_dead_letter(connection: &mut PgConnection, letter: &StoredDeadLetter<'_>) -> Result<(), WriteError> {
    use diesel::sql_types::{Bytea, Integer, Nullable, Text};
    let header = |name: &str| {
        // PostgreSQL text cannot hold NUL: never let a reason be refused for it.
        letter.headers.iter().find(|(key, _)| *key == name).map_or(String::new(), |(_, v)| v.replace('\0', " "))
    };
    let run_id = header("run_id");
    let traceparent = header(crate::domain::trace_context::TRACEPARENT);
    diesel::sql_query(
        "INSERT INTO dead_letters (topic, record_key, record_value, error_type, error_message, stage, failed_at,
                                   attempts, source, run_id, service, refused_by, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7::timestamptz, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (source, error_type) DO UPDATE SET
             topic = EXCLUDED.topic, record_key = EXCLUDED.record_key, record_value = EXCLUDED.record_value,
             error_message = EXCLUDED.error_message, stage = EXCLUDED.stage, failed_at = EXCLUDED.failed_at,
             attempts = EXCLUDED.attempts, run_id = EXCLUDED.run_id, service = EXCLUDED.service,
             refused_by = EXCLUDED.refused_by, traceparent = EXCLUDED.traceparent, stored_at = now(),
             replayed_at = NULL",
    )
    .bind::<Text, _>(letter.topic)
    .bind::<Nullable<Bytea>, _>(letter.key)
    .bind::<Bytea, _>(letter.value)
    .bind::<Text, _>(header("error_type"))
    .bind::<Text, _>(header("error_message"))
    .bind::<Text, _>(header("stage"))
    .bind::<Text, _>(header("failed_at"))
    .bind::<Integer, _>(header("attempts").parse::<i32>().unwrap_or(0))
    .bind::<Text, _>(header("source"))
    .bind::<Nullable<Text>, _>((!run_id.is_empty()).then_some(run_id))
    .bind::<Text, _>(header("service"))
    .bind::<Text, _>(letter.refused_by.replace('\0', " "))
    .bind::<Nullable<Text>, _>((!traceparent.is_empty()).then_some(traceparent))
    .execute(connection)?;
    Ok(())
}

/// One row of `dead_letters`, for `txnflow dlq list` and replay.
#[derive(diesel::QueryableByName, Debug)]
pub struct DeadLetterRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub id: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
    pub record_key: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    pub record_value: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub error_type: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub error_message: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub source: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub refused_by: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    pub replayed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The record's W3C `traceparent`, if it came with one.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub traceparent: Option<String>,
}

/// Dead letters stored in the table, oldest first, of the given error
/// types, at most `limit`; `pending_only` leaves out those replayed.
pub fn dead_letters(
    connection: &mut PgConnection,
    error_types: &[String],
    pending_only: bool,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, WriteError> {
    use diesel::sql_types::{Array, BigInt, Bool, Text};
    Ok(diesel::sql_query(
        "SELECT id, record_key, record_value, error_type, error_message, source, refused_by, replayed_at, traceparent
         FROM dead_letters
         WHERE error_type = ANY($1) AND (NOT $2 OR replayed_at IS NULL)
         ORDER BY id LIMIT $3",
    )
    .bind::<Array<Text>, _>(error_types)
    .bind::<Bool, _>(pending_only)
    .bind::<BigInt, _>(limit)
    .load(connection)?)
}

#[derive(diesel::QueryableByName)]
struct Pending {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pending: i64,
}

/// How many stored dead letters of these types are not replayed yet.
pub fn pending_dead_letters(connection: &mut PgConnection, error_types: &[String]) -> Result<u64, WriteError> {
    use diesel::sql_types::{Array, Text};
    let row: Pending = diesel::sql_query(
        "SELECT count(*) AS pending FROM dead_letters WHERE error_type = ANY($1) AND replayed_at IS NULL",
    )
    .bind::<Array<Text>, _>(error_types)
    .get_result(connection)?;
    Ok(row.pending.max(0) as u64)
}

/// Marks a stored dead letter as replayed (it stays, for the record).
pub fn mark_replayed(connection: &mut PgConnection, id: i64) -> Result<(), WriteError> {
    diesel::sql_query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(id)
        .execute(connection)?;
    Ok(())
}
