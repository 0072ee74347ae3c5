//! Re-prediction runs in `repredict_runs`: started, resumed, walked chunk
//! by chunk into `prediction_history`, finished.

use chrono::{DateTime, Utc};
use diesel::deserialize::QueryableByName;
use diesel::pg::PgConnection;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{Connection, RunQueryDsl};
use uuid::Uuid;

use super::super::{ClaimedRow, WriteError};
use crate::domain::prediction::{PredictRequestItem, Prediction};
use crate::domain::rollout::Selection;

/// A `repredict_runs` row.
#[derive(diesel::QueryableByName, Debug, Clone, serde::Serialize)]
pub struct RepredictRun {
    #[diesel(sql_type = Text)]
    pub run_id: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub since: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub from_model: Option<String>,
    #[diesel(sql_type = Text)]
    pub instance: String,
    #[diesel(sql_type = BigInt)]
    pub selected: i64,
    #[diesel(sql_type = BigInt)]
    pub predicted: i64,
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    #[serde(skip)]
    pub resume_after: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    pub model_version: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub started_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl RepredictRun {
    pub fn selection(&self) -> Selection {
        Selection { since: self.since, until: self.until, from_model: self.from_model.clone() }
    }

    /// Selected transactions neither re-predicted nor failed yet.
    pub fn backlog(&self) -> i64 {
        (self.selected - self.predicted - self.failed).max(0)
    }
}

const RUN_COLUMNS: &str = "run_id, status, since, until, from_model, instance, selected, predicted, failed,
                           resume_after, model_version, error, started_at, updated_at, finished_at";

pub fn load_run(connection: &mut PgConnection, run_id: &str) -> Result<Option<RepredictRun>, WriteError> {
    let mut rows: Vec<RepredictRun> =
        diesel::sql_query(format!("SELECT {RUN_COLUMNS} FROM repredict_runs WHERE run_id = $1"))
            .bind::<Text, _>(run_id)
            .load(connection)?;
    Ok(rows.pop())
}

/// The `limit` re-prediction runs started last, newest first, each with
/// whether a session holds it (a running run nobody holds is interrupted).
pub fn recent_runs(connection: &mut PgConnection, limit: i64) -> Result<Vec<(RepredictRun, bool)>, WriteError> {
    let runs: Vec<RepredictRun> =
        diesel::sql_query(format!("SELECT {RUN_COLUMNS} FROM repredict_runs ORDER BY started_at DESC LIMIT $1"))
            .bind::<diesel::sql_types::BigInt, _>(limit)
            .load(connection)?;
    runs.into_iter()
        .map(|run| {
            let held = run.status == "running" && super::run_is_held(connection, &run.run_id)?;
            Ok((run, held))
        })
        .collect()
}

/// How a run's start went, in the session holding its lock.
#[derive(Debug)]
pub enum RunStart {
    /// A new run, with how many transactions it selected.
    New(RepredictRun),
    /// An interrupted or failed run, to go on after `resume_after`.
    Resumed(RepredictRun),
    /// Completed before: nothing to do.
    Completed(RepredictRun),
    /// The run id was used with another selection.
    OtherSelection(RepredictRun),
}

/// The `WHERE` conditions of a selection on `transactions t`, with its
/// parameters at `$first`, `$first + 1` and `$first + 2`.
fn selection_filter(first: usize) -> String {
    format!(
        "(${since}::timestamptz IS NULL OR t.\"timestamp\" >= ${since})
         AND (${until}::timestamptz IS NULL OR t.\"timestamp\" < ${until})
         AND (${model}::text IS NULL OR EXISTS (
                 SELECT 1 FROM predictions p WHERE p.transaction_id = t.id AND p.model_version = ${model}))",
        since = first,
        until = first + 1,
        model = first + 2
    )
}

/// Starts the run `run_id`, or finds it to resume, in this session (which
/// holds its lock). A new run counts what it selects: the backlog.
pub fn start_run(
    connection: &mut PgConnection,
    run_id: &str,
    selection: &Selection,
    instance: &str,
) -> Result<RunStart, WriteError> {
    let start = connection.transaction::<RunStart, WriteError, _>(|tx| {
        if let Some(run) = load_run(tx, run_id)? {
            if run.selection() != *selection {
                return Ok(RunStart::OtherSelection(run));
            }
            if run.status == "completed" {
                return Ok(RunStart::Completed(run));
            }
            let run: RepredictRun = diesel::sql_query(format!(
                "UPDATE repredict_runs SET status = 'running', instance = $2, error = NULL, finished_at = NULL,
                        updated_at = now()
                 WHERE run_id = $1 RETURNING {RUN_COLUMNS}"
            ))
            .bind::<Text, _>(run_id)
            .bind::<Text, _>(instance)
            .get_result(tx)?;
            return Ok(RunStart::Resumed(run));
        }
        // The selection is fixed here, in the run's first transaction.
        let run: RepredictRun = diesel::sql_query(format!(
            "WITH selected AS (
                 INSERT INTO repredict_selection (run_id, transaction_id)
                 SELECT $1, t.id FROM transactions t WHERE {}
                 RETURNING 1
             )
             INSERT INTO repredict_runs (run_id, status, since, until, from_model, instance, selected)
             SELECT $1, 'running', $2, $3, $4, $5, (SELECT count(*) FROM selected)
             RETURNING {RUN_COLUMNS}",
            selection_filter(2)
        ))
        .bind::<Text, _>(run_id)
        .bind::<Nullable<Timestamptz>, _>(selection.since)
        .bind::<Nullable<Timestamptz>, _>(selection.until)
        .bind::<Nullable<Text>, _>(selection.from_model.as_deref())
        .bind::<Text, _>(instance)
        .get_result(tx)?;
        Ok(RunStart::New(run))
    })?;
    // The chunk query reads the selection in its key's order only when the
    // planner knows how many rows it holds: without statistics (a million
    // rows just inserted), it sorts the whole rest of it on every chunk
    // until autovacuum gets to the table. ANALYZE samples a fixed number of
    // rows, so this costs about the same at any size.
    if matches!(start, RunStart::New(_) | RunStart::Resumed(_)) {
        diesel::sql_query("ANALYZE repredict_selection").execute(connection)?;
    }
    Ok(start)
}

/// A chunk of a run's selection: its transactions not yet re-predicted
/// nor failed, and the last selected id it covered, where the next chunk
/// starts. `last` is None once the selection is walked.
pub struct Chunk {
    pub items: Vec<PredictRequestItem>,
    pub last: Option<Uuid>,
}

#[derive(diesel::QueryableByName)]
struct ChunkRow {
    #[diesel(embed)]
    transaction: ClaimedRow,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    done: bool,
}

/// The next `limit` selected transactions of the run (fixed when it
/// started) after `after`, in id order; those the run has already
/// re-predicted or failed (a chunk written in part before a stop) are
/// left out of `items` but still move `last`.
pub fn next_chunk(
    connection: &mut PgConnection,
    run: &RepredictRun,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Chunk, WriteError> {
    let rows: Vec<ChunkRow> = diesel::sql_query(next_chunk_query(after.is_some()))
        .bind::<Text, _>(&run.run_id)
        .bind::<BigInt, _>(limit as i64)
        .bind::<Nullable<SqlUuid>, _>(after)
        .load(connection)?;
    let last = rows.last().map(|chunk_row| chunk_row.transaction.id());
    let items = rows
        .into_iter()
        .filter(|chunk_row| !chunk_row.done)
        .map(|chunk_row| chunk_row.transaction.into_item())
        .collect();
    Ok(Chunk { items, last })
}

/// The chunk query, with the run id at `$1`, the limit at `$2` and the
/// last id done at `$3`. Each chunk must cost what the first did, whatever
/// plan PostgreSQL picks and whatever statistics it has (a table loaded a
/// minute ago has none):
/// - the selection is read first, `limit` ids on from `$3` in its primary
///   key's order; the first chunk has its own query, since a keyset
///   condition that may be NULL would keep the index from bounding the
///   scan under a generic plan;
/// - each selected transaction is then looked up by its id, in a lateral
///   subquery that `OFFSET 0` keeps the planner from turning into a join
///   (which, misjudging the sizes, could hash or merge the whole table);
/// - whether the run did a transaction already is asked per row too, by
///   index; `OFFSET 0` again keeps the planner from hashing the run's
///   whole history (or failures) instead.
pub fn next_chunk_query(after: bool) -> String {
    let selection_after = if after { "AND transaction_id > $3" } else { "AND $3::uuid IS NULL" };
    format!(
        "SELECT t.id, t.description, t.amount, t.\"timestamp\", t.merchant, t.operation_type, t.side,
                EXISTS (SELECT 1 FROM prediction_history h
                        WHERE h.kind = 'repredict' AND h.run_id = $1 AND h.transaction_id = s.transaction_id
                        OFFSET 0)
                OR EXISTS (SELECT 1 FROM repredict_failures f
                           WHERE f.run_id = $1 AND f.transaction_id = s.transaction_id OFFSET 0) AS done
         FROM (SELECT transaction_id FROM repredict_selection
               WHERE run_id = $1 {selection_after}
               ORDER BY transaction_id
               LIMIT $2) s
         CROSS JOIN LATERAL (
             SELECT id, description, amount::text AS amount, \"timestamp\", merchant, operation_type, side
             FROM transactions WHERE id = s.transaction_id OFFSET 0
         ) t
         ORDER BY s.transaction_id"
    )
}

#[derive(diesel::QueryableByName)]
struct Written {
    #[diesel(sql_type = BigInt)]
    predicted: i64,
    #[diesel(sql_type = BigInt)]
    failed: i64,
}

/// Writes what a chunk came to, in one database transaction: its history
/// rows (kind `repredict`), its failures, and the run's counts, and moves
/// the run's resume point to `done_through` when the whole chunk is done.
/// A row already there for this run is left alone and not counted again,
/// so the counts stay whole however often a chunk is written.
pub fn write_chunk(
    connection: &mut PgConnection,
    run_id: &str,
    predictions: &[Prediction],
    failures: &[(Uuid, String)],
    done_through: Option<Uuid>,
) -> Result<(u64, u64), WriteError> {
    let ids: Vec<Uuid> = predictions.iter().map(|p| p.transaction_id).collect();
    let categories: Vec<&str> = predictions.iter().map(|p| p.category.as_str()).collect();
    let scores: Vec<f64> = predictions.iter().map(|p| p.confidence_score).collect();
    let versions: Vec<&str> = predictions.iter().map(|p| p.model_version.as_str()).collect();
    let last_version = versions.last().map(|v| v.to_string());
    let failed_ids: Vec<Uuid> = failures.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<String> =
        failures.iter().map(|(_, reason)| crate::domain::dead_letter::sanitized_reason(reason)).collect();
    connection.transaction::<(u64, u64), WriteError, _>(|tx| {
        let written: Written = diesel::sql_query(
            "WITH predicted AS (
                 INSERT INTO prediction_history
                     (transaction_id, category, confidence_score, model_version, kind, run_id)
                 SELECT id, category, score, version, 'repredict', $1
                 FROM UNNEST($2::uuid[], $3::text[], $4::float8[], $5::text[]) AS u (id, category, score, version)
                 ON CONFLICT (run_id, transaction_id) WHERE kind = 'repredict' DO NOTHING
                 RETURNING 1
             ), failed AS (
                 INSERT INTO repredict_failures (run_id, transaction_id, reason)
                 SELECT $1, id, reason FROM UNNEST($6::uuid[], $7::text[]) AS u (id, reason)
                 ON CONFLICT (run_id, transaction_id) DO NOTHING
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM predicted) AS predicted, (SELECT count(*) FROM failed) AS failed",
        )
        .bind::<Text, _>(run_id)
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<Text>, _>(&categories)
        .bind::<Array<Double>, _>(&scores)
        .bind::<Array<Text>, _>(&versions)
        .bind::<Array<SqlUuid>, _>(&failed_ids)
        .bind::<Array<Text>, _>(&reasons)
        .get_result(tx)?;
        diesel::sql_query(
            "UPDATE repredict_runs SET predicted = predicted + $2, failed = failed + $3,
                    resume_after = coalesce($4, resume_after), model_version = coalesce($5, model_version),
                    updated_at = now()
             WHERE run_id = $1",
        )
        .bind::<Text, _>(run_id)
        .bind::<BigInt, _>(written.predicted)
        .bind::<BigInt, _>(written.failed)
        .bind::<Nullable<SqlUuid>, _>(done_through)
        .bind::<Nullable<Text>, _>(last_version)
        .execute(tx)?;
        Ok((written.predicted as u64, written.failed as u64))
    })
}

/// Ends the run as `completed` or `failed` (with its reason).
pub fn finish_run(
    connection: &mut PgConnection,
    run_id: &str,
    error: Option<&str>,
) -> Result<RepredictRun, WriteError> {
    // A completed run's selection is not needed again; a failed one's is,
    // to resume it.
    Ok(diesel::sql_query(format!(
        "WITH done AS (DELETE FROM repredict_selection WHERE run_id = $1 AND $2::text IS NULL)
         UPDATE repredict_runs SET status = CASE WHEN $2::text IS NULL THEN 'completed' ELSE 'failed' END,
                error = $2, finished_at = now(), updated_at = now()
         WHERE run_id = $1 RETURNING {RUN_COLUMNS}"
    ))
    .bind::<Text, _>(run_id)
    .bind::<Nullable<Text>, _>(error.map(crate::domain::dead_letter::sanitized_reason))
    .get_result(connection)?)
}
