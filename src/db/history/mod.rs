//! Model rollouts in the database, over `prediction_history`: the locks
//! that keep runs apart, model versions and their comparison, and shadow
//! rows; re-prediction runs in [`runs`], promotion in [`promote`],
//! archiving in [`archive`], one transaction's predictions in [`lookup`].

use chrono::{DateTime, Utc};
use diesel::RunQueryDsl;
use diesel::pg::PgConnection;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use super::WriteError;
use crate::domain::prediction::Prediction;
use crate::domain::rollout::Confusion;

mod archive;
mod lookup;
mod promote;
mod runs;

pub use archive::*;
pub use lookup::*;
pub use promote::*;
pub use runs::*;

/// The advisory lock key of a re-prediction run: held by the session that
/// runs it, released by PostgreSQL when that session ends.
const RUN_LOCK_KEY: &str = "hashtextextended('txnflow.repredict:' || $1, 0)";

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    flag: bool,
}

#[derive(diesel::QueryableByName)]
struct ChunkDone {
    #[diesel(sql_type = BigInt)]
    examined: i64,
    #[diesel(sql_type = BigInt)]
    changed: i64,
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
struct Found {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    found: bool,
}

/// Whether `version` has a prediction in the history.
pub fn has_predictions(connection: &mut PgConnection, version: &str) -> Result<bool, WriteError> {
    let row: Found =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM prediction_history WHERE model_version = $1) AS found")
            .bind::<Text, _>(version)
            .get_result(connection)?;
    Ok(row.found)
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
