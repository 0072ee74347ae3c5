//! Batch runs' records in `batch_runs`: what each instance reports of the
//! runs it drives, so that another replica can follow or resume them.

use diesel::RunQueryDsl;
use diesel::pg::PgConnection;

use super::WriteError;

#[derive(diesel::QueryableByName)]
struct RecordedRunId {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[allow(dead_code)] // only counted
    run_id: String,
}

/// A batch run's `batch_runs` row.
#[derive(diesel::QueryableByName, Debug)]
pub struct RecordedRun {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub instance: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub report: String,
    /// Since the instance last recorded it.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub age_ms: i64,
}

/// Records `report` (a `GET /batches` answer, as JSON) as `instance`'s.
///
/// A run recorded by another instance is left alone, unless `take_over`
/// and that run is finished or its instance has been silent for longer
/// than `stale_after_ms`: a POST takes a run over only then, and a
/// heartbeat (`take_over` false) never takes one. Returns whether the row
/// is now `instance`'s report.
pub fn record_run(
    connection: &mut PgConnection,
    instance: &str,
    report: &crate::batch::RunReport,
    take_over: bool,
    stale_after_ms: u64,
) -> Result<bool, WriteError> {
    let json = serde_json::to_string(report).expect("a report serialises");
    let status = serde_json::to_value(report.status).expect("a status serialises");
    let rows: Vec<RecordedRunId> = diesel::sql_query(
        "INSERT INTO batch_runs (run_id, uri, status, instance, report, updated_at)
         VALUES ($1, $2, $3, $4, $5::jsonb, now())
         ON CONFLICT (run_id) DO UPDATE SET
             uri = EXCLUDED.uri, status = EXCLUDED.status, instance = EXCLUDED.instance,
             report = EXCLUDED.report, updated_at = now()
         WHERE batch_runs.instance = EXCLUDED.instance
            OR ($6 AND (batch_runs.status <> 'running'
                        OR batch_runs.updated_at < now() - $7 * interval '1 millisecond'))
         RETURNING run_id",
    )
    .bind::<diesel::sql_types::Text, _>(&report.run_id)
    .bind::<diesel::sql_types::Text, _>(&report.uri)
    .bind::<diesel::sql_types::Text, _>(status.as_str().unwrap_or("running"))
    .bind::<diesel::sql_types::Text, _>(instance)
    .bind::<diesel::sql_types::Text, _>(&json)
    .bind::<diesel::sql_types::Bool, _>(take_over)
    .bind::<diesel::sql_types::BigInt, _>(stale_after_ms as i64)
    .load(connection)?;
    Ok(rows.len() == 1)
}

/// The `batch_runs` row of `run_id`, if any.
pub fn recorded_run(connection: &mut PgConnection, run_id: &str) -> Result<Option<RecordedRun>, WriteError> {
    let mut rows: Vec<RecordedRun> = diesel::sql_query(
        "SELECT instance, report::text AS report,
                (EXTRACT(EPOCH FROM now() - updated_at) * 1000)::bigint AS age_ms
         FROM batch_runs WHERE run_id = $1",
    )
    .bind::<diesel::sql_types::Text, _>(run_id)
    .load(connection)?;
    Ok(rows.pop())
}

/// The `limit` batch runs recorded last, newest first, for the status page.
pub fn recent_runs(connection: &mut PgConnection, limit: i64) -> Result<Vec<RecordedRun>, WriteError> {
    Ok(diesel::sql_query(
        "SELECT instance, report::text AS report,
                (EXTRACT(EPOCH FROM now() - updated_at) * 1000)::bigint AS age_ms
         FROM batch_runs ORDER BY updated_at DESC LIMIT $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(connection)?)
}
