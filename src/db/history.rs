//! Model rollouts in the database: re-prediction runs, compare, promote and
//! archive, over `prediction_history`.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use uuid::Uuid;

use super::{ClaimedRow, WriteError};
use crate::domain::prediction::{PredictRequestItem, Prediction};
use crate::domain::rollout::{Confusion, Selection};

/// The advisory lock key of a re-prediction run: held by the session that
/// runs it, released by PostgreSQL when that session ends.
const RUN_LOCK_KEY: &str = "hashtextextended('txnflow.repredict:' || $1, 0)";

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    flag: bool,
}

/// Takes the run's lock for this session, if no other session holds it.
pub fn lock_run(connection: &mut PgConnection, run_id: &str) -> Result<bool, WriteError> {
    let row: Flag = diesel::sql_query(format!("SELECT pg_try_advisory_lock({RUN_LOCK_KEY}) AS flag"))
        .bind::<Text, _>(run_id)
        .get_result(connection)?;
    Ok(row.flag)
}

/// Takes the lock of promote and archive for this session, if no other
/// session holds it: one of them at a time, so that archive never moves a
/// row a promotion is making current.
pub fn lock_promote_and_archive(connection: &mut PgConnection) -> Result<bool, WriteError> {
    let row: Flag = diesel::sql_query("SELECT pg_try_advisory_lock(hashtextextended('txnflow.promote', 0)) AS flag")
        .get_result(connection)?;
    Ok(row.flag)
}

/// Whether some session runs the run now (its lock is held), read from
/// `pg_locks` without taking the lock: a status read must never make a
/// resume, or a run reconnecting after a blip, find its lock taken. A
/// one-`bigint` advisory lock shows as its high and low 32 bits in
/// `classid` and `objid`, with `objsubid` 1.
pub fn run_is_held(connection: &mut PgConnection, run_id: &str) -> Result<bool, WriteError> {
    let row: Flag = diesel::sql_query(format!(
        "WITH lock AS (SELECT {RUN_LOCK_KEY} AS key)
         SELECT EXISTS (
             SELECT 1 FROM pg_locks, lock
             WHERE locktype = 'advisory' AND granted AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid::bigint = (lock.key >> 32) & 4294967295
               AND objid::bigint = lock.key & 4294967295
         ) AS flag"
    ))
    .bind::<Text, _>(run_id)
    .get_result(connection)?;
    Ok(row.flag)
}

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
    connection.transaction::<RunStart, WriteError, _>(|tx| {
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
    })
}

/// The next `limit` transactions of the run's selection (fixed when it
/// started) after `after`, in id order, leaving out those the run has
/// already re-predicted or failed. The first chunk has its own query: a
/// keyset condition that may be NULL would keep the index from bounding
/// the scan under a generic plan.
pub fn next_chunk(
    connection: &mut PgConnection,
    run: &RepredictRun,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Vec<PredictRequestItem>, WriteError> {
    let after_condition = if after.is_some() { "AND s.transaction_id > $3" } else { "AND $3::uuid IS NULL" };
    let rows: Vec<ClaimedRow> = diesel::sql_query(format!(
        "SELECT t.id, t.description, t.amount::text AS amount, t.\"timestamp\", t.merchant, t.operation_type, t.side
         FROM repredict_selection s
         JOIN transactions t ON t.id = s.transaction_id
         WHERE s.run_id = $1 {after_condition}
           AND NOT EXISTS (SELECT 1 FROM prediction_history h
                           WHERE h.kind = 'repredict' AND h.run_id = $1 AND h.transaction_id = s.transaction_id)
           AND NOT EXISTS (SELECT 1 FROM repredict_failures f WHERE f.run_id = $1 AND f.transaction_id = s.transaction_id)
         ORDER BY s.transaction_id
         LIMIT $2"
    ))
    .bind::<Text, _>(&run.run_id)
    .bind::<BigInt, _>(limit as i64)
    .bind::<Nullable<SqlUuid>, _>(after)
    .load(connection)?;
    Ok(rows.into_iter().map(ClaimedRow::into_item).collect())
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

/// A row of the `model_versions` view.
#[derive(diesel::QueryableByName, Debug, Clone, serde::Serialize)]
pub struct ModelVersion {
    #[diesel(sql_type = Text)]
    pub model_version: String,
    #[diesel(sql_type = BigInt)]
    pub predictions: i64,
    #[diesel(sql_type = BigInt)]
    pub transactions: i64,
    #[diesel(sql_type = Double)]
    pub coverage_pct: f64,
    #[diesel(sql_type = BigInt)]
    pub current_predictions: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub first_prediction_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_prediction_at: Option<DateTime<Utc>>,
}

pub fn model_versions(connection: &mut PgConnection) -> Result<Vec<ModelVersion>, WriteError> {
    Ok(diesel::sql_query(
        "SELECT model_version, predictions, transactions, coverage_pct::float8 AS coverage_pct, current_predictions,
                first_prediction_at, last_prediction_at
         FROM model_versions ORDER BY first_prediction_at NULLS LAST, model_version",
    )
    .load(connection)?)
}

#[derive(diesel::QueryableByName)]
struct Pair {
    #[diesel(sql_type = Text)]
    a: String,
    #[diesel(sql_type = Text)]
    b: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The latest prediction of `a` against the latest of `b`, over the
/// transactions both have predicted.
pub fn compare(connection: &mut PgConnection, a: &str, b: &str) -> Result<Confusion, WriteError> {
    let pairs: Vec<Pair> = diesel::sql_query(
        "WITH a AS (
             SELECT DISTINCT ON (transaction_id) transaction_id, category FROM prediction_history
             WHERE model_version = $1 ORDER BY transaction_id, predicted_at DESC
         ), b AS (
             SELECT DISTINCT ON (transaction_id) transaction_id, category FROM prediction_history
             WHERE model_version = $2 ORDER BY transaction_id, predicted_at DESC
         )
         SELECT a.category AS a, b.category AS b, count(*) AS n FROM a JOIN b USING (transaction_id)
         GROUP BY 1, 2",
    )
    .bind::<Text, _>(a)
    .bind::<Text, _>(b)
    .load(connection)?;
    let mut confusion = Confusion::default();
    for pair in pairs {
        confusion.add(&pair.a, &pair.b, pair.n as u64);
    }
    Ok(confusion)
}

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
struct ChunkDone {
    #[diesel(sql_type = BigInt)]
    examined: i64,
    #[diesel(sql_type = BigInt)]
    changed: i64,
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

/// Writes shadow predictions into history (kind `shadow`), for the
/// transactions stored; returns how many.
pub fn write_shadow(connection: &mut PgConnection, predictions: &[Prediction]) -> Result<u64, WriteError> {
    let ids: Vec<Uuid> = predictions.iter().map(|p| p.transaction_id).collect();
    let categories: Vec<&str> = predictions.iter().map(|p| p.category.as_str()).collect();
    let scores: Vec<f64> = predictions.iter().map(|p| p.confidence_score).collect();
    let versions: Vec<&str> = predictions.iter().map(|p| p.model_version.as_str()).collect();
    let written = diesel::sql_query(
        "INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, kind)
         SELECT id, category, score, version, 'shadow'
         FROM UNNEST($1::uuid[], $2::text[], $3::float8[], $4::text[]) AS u (id, category, score, version)",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<Text>, _>(&categories)
    .bind::<Array<Double>, _>(&scores)
    .bind::<Array<Text>, _>(&versions)
    .execute(connection)?;
    Ok(written as u64)
}
