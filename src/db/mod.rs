//! PostgreSQL adapter: the r2d2 connection pool and the embedded migrations.

use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, ExecuteCopyFromDsl, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::time::Duration;

use crate::config::{DbConfig, WriteMethod};
use crate::domain::prediction::PredictionKind;

mod binary_copy;
pub mod history;

use binary_copy::BinaryCopy;

/// The columns a flush writes, for `COPY`'s column lists.
mod schema {
    diesel::table! {
        transactions (id) {
            id -> Uuid,
            description -> Text,
            amount -> Numeric,
            timestamp -> Timestamptz,
            merchant -> Nullable<Text>,
            operation_type -> Text,
            side -> Text,
            processing_type -> Text,
            run_id -> Nullable<Text>,
            batch_id -> Nullable<Text>,
            source -> Nullable<Text>,
        }
    }

    diesel::table! {
        predictions (transaction_id) {
            transaction_id -> Uuid,
            category -> Text,
            confidence_score -> Double,
            model_version -> Text,
        }
    }

    // Append-only and keyless in the database; the macro wants a key
    // column, and these declarations only name columns for `COPY`.
    diesel::table! {
        prediction_history (transaction_id) {
            transaction_id -> Uuid,
            category -> Text,
            confidence_score -> Double,
            model_version -> Text,
            kind -> Text,
        }
    }
}

/// The migrations of `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Opens one connection, for one-shot commands such as `txnflow migrate`.
pub fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::establish(url)
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {}: {}", redact(url), redact(&e.to_string())))
}

/// What to fix when PostgreSQL refused a connection for a reason that
/// waiting will not change (libpq's message: a wrong password, no
/// `pg_hba.conf` entry, an unknown role or database, no right to
/// connect); `None` for an outage, which may heal.
pub fn refusal_that_will_not_heal(message: &str) -> Option<&'static str> {
    // Each refusal: the texts its message holds, all of them, and what to fix.
    const REFUSALS: [(&[&str], &str); 5] = [
        (&["authentication failed"], "the user and password of db.url"),
        (&["no pg_hba.conf entry"], "db.url's user and host, or the server's pg_hba.conf"),
        (&["role \"", "does not exist"], "the user of db.url"),
        (&["database \"", "does not exist"], "the database name of db.url"),
        (&["permission denied for database"], "the user of db.url, or its CONNECT right"),
    ];
    REFUSALS.iter().find(|(texts, _)| texts.iter().all(|text| message.contains(text))).map(|(_, fix)| *fix)
}

/// Builds the pool. It does not fail when the database is down: connections
/// are made on demand, so the service can start and wait for PostgreSQL.
pub fn pool(config: &DbConfig) -> PgPool {
    Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .build_unchecked(ConnectionManager::new(&config.url))
}

/// Applies pending migrations and returns the versions it applied (none when
/// the schema is up to date, so running it twice is harmless).
pub fn migrate(connection: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    // Two replicas starting at once must not both apply the same migration:
    // a transaction-scoped advisory lock serialises them.
    connection.transaction(|tx| {
        diesel::sql_query("SELECT pg_advisory_xact_lock(7365726966)").execute(tx)?;
        let applied = tx
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"))?
            .into_iter()
            .map(|version| version.to_string())
            .collect();
        Ok(applied)
    })
}

/// `text` with its secrets hidden, for messages and logs: the password of
/// any URL's user info (`scheme://user:***@host`), and the value of any
/// `password=`, `secret=` or `token=`-style parameter (URL query or libpq
/// keyword string).
pub fn redact(text: &str) -> String {
    hide_parameter_values(&hide_url_passwords(text))
}

fn hide_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let authority_end =
            rest.find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace()).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user_info = &authority[..at];
                match user_info.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str(user_info),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Keys whose values are secrets, matched at the end of a parameter name
/// (`password`, `sasl.password`, `secret_key`, `access_token`, ...).
const SECRET_KEYS: [&str; 6] = ["password", "passwd", "pwd", "secret", "secret_key", "token"];

fn hide_parameter_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let name_start = rest[..equals]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .map_or(0, |i| i + 1);
        let name = rest[name_start..equals].to_ascii_lowercase();
        out.push_str(&rest[..=equals]);
        rest = &rest[equals + 1..];
        if SECRET_KEYS
            .iter()
            .any(|key| name == *key || name.ends_with(&format!(".{key}")) || name.ends_with(&format!("_{key}")))
        {
            let value_end = match rest.chars().next() {
                // A quoted libpq value: up to its closing quote.
                Some(quote @ ('\'' | '"')) => rest[1..].find(quote).map_or(rest.len(), |i| i + 2),
                _ => rest.find(|c: char| c == '&' || c == ';' || c == ',' || c.is_whitespace()).unwrap_or(rest.len()),
            };
            out.push_str("***");
            rest = &rest[value_end..];
        }
    }
    out.push_str(rest);
    out
}

/// An error for an answer or a log line: secrets hidden, at most 200 characters.
pub fn short_reason(error: impl std::fmt::Display) -> String {
    let text = redact(&error.to_string());
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn refusals_that_will_not_heal_name_what_to_fix() {
        use super::refusal_that_will_not_heal as refusal;
        let password = "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"txnflow\"";
        assert_eq!(refusal(password), Some("the user and password of db.url"));
        assert_eq!(refusal("FATAL:  database \"nope\" does not exist"), Some("the database name of db.url"));
        assert_eq!(refusal("FATAL:  role \"nobody\" does not exist"), Some("the user of db.url"));
        let outage = "connection to server at \"127.0.0.1\", port 5432 failed: Connection refused";
        assert_eq!(refusal(outage), None, "an outage may heal");
        assert_eq!(refusal("FATAL:  the database system is starting up"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://txnflow:secret@db:5432/x"), "postgres://txnflow:***@db:5432/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("postgres://txnflow@db/x"), "postgres://txnflow@db/x");
        assert_eq!(
            redact("cannot reach postgres://u:p@a/x, then https://k:s3cr@t@b:9/y?q=1"),
            "cannot reach postgres://u:***@a/x, then https://k:***@b:9/y?q=1"
        );
        assert_eq!(
            redact("postgres://db/x?sslmode=require&password=hunter2&user=u"),
            "postgres://db/x?sslmode=require&password=***&user=u"
        );
        assert_eq!(redact("host=db password='x y' user=u"), "host=db password=*** user=u");
        assert_eq!(
            redact("sasl.password=abc secret_key=def access_token=ghi a=b"),
            "sasl.password=*** secret_key=*** access_token=*** a=b"
        );
        assert_eq!(redact("no secrets: x=1"), "no secrets: x=1");
    }
}

/// One transaction to store, with its lineage.
pub struct TransactionRow<'a> {
    pub transaction: &'a crate::domain::transaction::Transaction,
    pub processing_type: crate::domain::transaction::ProcessingType,
    pub run_id: Option<&'a str>,
    pub batch_id: Option<&'a str>,
    pub source: String,
}

/// Why a write failed, as the writer must react to it.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The database is unreachable or busy: retry the same write later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The data itself was refused: retrying it as it is cannot succeed.
    #[error("data refused by the database: {0}")]
    Refused(String),
}

impl From<diesel::result::Error> for WriteError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match &error {
            Error::DatabaseError(
                Kind::CheckViolation | Kind::NotNullViolation | Kind::ForeignKeyViolation | Kind::UniqueViolation,
                _,
            ) => WriteError::Refused(error.to_string()),
            Error::DatabaseError(Kind::Unknown, info)
                if ["invalid input", "out of range", "value too long", "invalid byte sequence", "violates"]
                    .iter()
                    .any(|needle| info.message().contains(needle)) =>
            {
                WriteError::Refused(error.to_string())
            }
            _ => WriteError::Unavailable(error.to_string()),
        }
    }
}

/// Runs `call` with a connection from `pool` on tokio's blocking pool
/// (diesel is synchronous), off the async threads. No connection, or a call
/// that panicked, is [`WriteError::Unavailable`]; the call's own error is
/// kept as it is.
pub async fn blocking<T, F>(pool: &PgPool, call: F) -> Result<T, WriteError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, WriteError> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut connection = pool.get().map_err(|e| WriteError::Unavailable(e.to_string()))?;
        call(&mut connection)
    })
    .await
    .unwrap_or_else(|join_error| Err(WriteError::Unavailable(format!("the database call panicked: {join_error}"))))
}

/// Writes one flush in one database transaction: transactions inserted
/// `ON CONFLICT (id) DO NOTHING`, predictions inserted for transactions
/// that have none, and each prediction stored appended to
/// `prediction_history` (kind `pipeline`). A record stored before (a
/// redelivery, a replay) changes nothing and adds no history row.
///
/// With [`WriteMethod::Copy`], both go in by binary `COPY` first, in one
/// transaction. `COPY` has no `ON CONFLICT`: a flush holding a record
/// stored before (a redelivery, a replay) or a value the database refuses
/// makes it fail as a whole, and then that transaction is rolled back and
/// the flush is written in a second one with `UNNEST` statements, whose
/// outcome (and error) is the flush's. Each `UNNEST` statement takes
/// column arrays, so a flush of any size binds 11 and 4 parameters, far
/// under PostgreSQL's 65,535.
///
/// Returns the method that stored the flush.
pub fn write_flush(
    connection: &mut PgConnection,
    rows: &[TransactionRow<'_>],
    predictions: &[crate::domain::prediction::Prediction],
    method: WriteMethod,
) -> Result<WriteMethod, WriteError> {
    if method == WriteMethod::Copy
        && connection
            .transaction::<(), diesel::result::Error, _>(|tx| {
                copy_transactions(tx, rows)?;
                copy_predictions(tx, predictions)?;
                copy_history(tx, predictions, PredictionKind::Pipeline)
            })
            .is_ok()
    {
        return Ok(WriteMethod::Copy);
    }
    connection.transaction::<WriteMethod, WriteError, _>(|tx| {
        insert_transactions(tx, rows)?;
        insert_new_predictions(tx, predictions, PredictionKind::Pipeline)?;
        Ok(WriteMethod::Unnest)
    })
}

/// Hands a finished binary COPY stream to the connection.
fn write_copy(out: &mut dyn std::io::Write, bytes: &[u8]) -> diesel::QueryResult<()> {
    out.write_all(bytes).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

/// Binary `COPY` of the rows into `transactions`.
fn copy_transactions(connection: &mut PgConnection, rows: &[TransactionRow<'_>]) -> diesel::QueryResult<()> {
    use diesel::pg::CopyFormat;
    use schema::transactions::dsl as t;
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = BinaryCopy::with_capacity(rows.len(), 256);
    for row in rows {
        let transaction = row.transaction;
        copy.row(11)
            .uuid(&transaction.id)
            .text(&transaction.description)
            .numeric_cents(transaction.amount.cents())
            .timestamptz(&transaction.timestamp)
            .optional_text(transaction.merchant.as_deref())
            .text(&transaction.operation_type)
            .text(transaction.side.as_str())
            .text(row.processing_type.as_str())
            .optional_text(row.run_id)
            .optional_text(row.batch_id)
            .text(&row.source);
    }
    let bytes = copy.finish();
    let columns = (
        t::id,
        t::description,
        t::amount,
        t::timestamp,
        t::merchant,
        t::operation_type,
        t::side,
        t::processing_type,
        t::run_id,
        t::batch_id,
        t::source,
    );
    diesel::copy_from(t::transactions)
        .from_raw_data(columns, |out| write_copy(out, &bytes))
        .with_format(CopyFormat::Binary)
        .execute(connection)?;
    Ok(())
}

/// Binary `COPY` of the predictions into `predictions`.
fn copy_predictions(
    connection: &mut PgConnection,
    predictions: &[crate::domain::prediction::Prediction],
) -> diesel::QueryResult<()> {
    use diesel::pg::CopyFormat;
    use schema::predictions::dsl as p;
    if predictions.is_empty() {
        return Ok(());
    }
    let bytes = prediction_copy(predictions, None);
    diesel::copy_from(p::predictions)
        .from_raw_data((p::transaction_id, p::category, p::confidence_score, p::model_version), |out| {
            write_copy(out, &bytes)
        })
        .with_format(CopyFormat::Binary)
        .execute(connection)?;
    Ok(())
}

/// Binary `COPY` of the predictions into `prediction_history`. Its
/// `predicted_at` defaults to `now()`, the transaction's start, as the
/// `predictions` rows' does: the two rows of one prediction agree.
fn copy_history(
    connection: &mut PgConnection,
    predictions: &[crate::domain::prediction::Prediction],
    kind: PredictionKind,
) -> diesel::QueryResult<()> {
    use diesel::pg::CopyFormat;
    use schema::prediction_history::dsl as h;
    if predictions.is_empty() {
        return Ok(());
    }
    let bytes = prediction_copy(predictions, Some(kind));
    diesel::copy_from(h::prediction_history)
        .from_raw_data((h::transaction_id, h::category, h::confidence_score, h::model_version, h::kind), |out| {
            write_copy(out, &bytes)
        })
        .with_format(CopyFormat::Binary)
        .execute(connection)?;
    Ok(())
}

/// The binary `COPY` stream of predictions: `transaction_id`, `category`,
/// `confidence_score`, `model_version`, and `kind` when one is given.
fn prediction_copy(predictions: &[crate::domain::prediction::Prediction], kind: Option<PredictionKind>) -> Vec<u8> {
    let fields = if kind.is_some() { 5 } else { 4 };
    let mut copy = BinaryCopy::with_capacity(predictions.len(), 96);
    for prediction in predictions {
        let row = copy
            .row(fields)
            .uuid(&prediction.transaction_id)
            .text(prediction.category.as_str())
            .float8(prediction.confidence_score)
            .text(&prediction.model_version);
        if let Some(kind) = kind {
            row.text(kind.as_str());
        }
    }
    copy.finish()
}

fn insert_transactions(connection: &mut PgConnection, rows: &[TransactionRow<'_>]) -> Result<(), WriteError> {
    use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if rows.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut descriptions = Vec::with_capacity(rows.len());
    let mut amounts = Vec::with_capacity(rows.len());
    let mut timestamps = Vec::with_capacity(rows.len());
    let mut merchants = Vec::with_capacity(rows.len());
    let mut operation_types = Vec::with_capacity(rows.len());
    let mut sides = Vec::with_capacity(rows.len());
    let mut processing_types = Vec::with_capacity(rows.len());
    let mut run_ids = Vec::with_capacity(rows.len());
    let mut batch_ids = Vec::with_capacity(rows.len());
    let mut sources = Vec::with_capacity(rows.len());
    for row in rows {
        let t = row.transaction;
        ids.push(t.id);
        descriptions.push(t.description.as_str());
        amounts.push(t.amount.to_string());
        timestamps.push(t.timestamp);
        merchants.push(t.merchant.as_deref());
        operation_types.push(t.operation_type.as_str());
        sides.push(t.side.as_str());
        processing_types.push(row.processing_type.as_str());
        run_ids.push(row.run_id);
        batch_ids.push(row.batch_id);
        sources.push(row.source.as_str());
    }
    diesel::sql_query(
        "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side,
                                   processing_type, run_id, batch_id, source)
         SELECT id, description, amount::numeric(12, 2), ts, merchant, operation_type, side,
                processing_type, run_id, batch_id, source
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[], $11::text[])
              AS r(id, description, amount, ts, merchant, operation_type, side, processing_type, run_id, batch_id, source)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Array<Text>, _>(descriptions)
    .bind::<Array<Text>, _>(amounts)
    .bind::<Array<Timestamptz>, _>(timestamps)
    .bind::<Array<Nullable<Text>>, _>(merchants)
    .bind::<Array<Text>, _>(operation_types)
    .bind::<Array<Text>, _>(sides)
    .bind::<Array<Text>, _>(processing_types)
    .bind::<Array<Nullable<Text>>, _>(run_ids)
    .bind::<Array<Nullable<Text>>, _>(batch_ids)
    .bind::<Array<Text>, _>(sources)
    .execute(connection)?;
    Ok(())
}

/// Stores the live model's predictions of transactions that have none,
/// and appends each one stored to `prediction_history` as `kind`, in the
/// same statement. A transaction that has a current prediction keeps it:
/// only a promotion replaces one, so a redelivery, a DLQ replay or a
/// backfill answer landing after a promotion leaves the promoted one.
/// Repeats of one id within the call keep the last.
pub fn insert_new_predictions(
    connection: &mut PgConnection,
    predictions: &[crate::domain::prediction::Prediction],
    kind: PredictionKind,
) -> Result<(), WriteError> {
    use diesel::sql_types::{Array, Double, Text, Uuid as SqlUuid};
    if predictions.is_empty() {
        return Ok(());
    }
    let mut latest: std::collections::HashMap<uuid::Uuid, &crate::domain::prediction::Prediction> =
        std::collections::HashMap::with_capacity(predictions.len());
    for prediction in predictions {
        latest.insert(prediction.transaction_id, prediction);
    }
    let ids: Vec<uuid::Uuid> = latest.keys().copied().collect();
    let categories: Vec<&str> = ids.iter().map(|id| latest[id].category.as_str()).collect();
    let scores: Vec<f64> = ids.iter().map(|id| latest[id].confidence_score).collect();
    let versions: Vec<&str> = ids.iter().map(|id| latest[id].model_version.as_str()).collect();
    diesel::sql_query(
        "WITH stored AS (
             INSERT INTO predictions (transaction_id, category, confidence_score, model_version)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::float8[], $4::text[])
             ON CONFLICT (transaction_id) DO NOTHING
             RETURNING transaction_id, category, confidence_score, model_version, predicted_at
         )
         INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, predicted_at, kind)
         SELECT transaction_id, category, confidence_score, model_version, predicted_at, $5 FROM stored",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Array<Text>, _>(categories)
    .bind::<Array<Double>, _>(scores)
    .bind::<Array<Text>, _>(versions)
    .bind::<Text, _>(kind.as_str())
    .execute(connection)?;
    Ok(())
}

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

/// Marks a stored dead letter as replayed (it stays, for the record).
pub fn mark_replayed(connection: &mut PgConnection, id: i64) -> Result<(), WriteError> {
    diesel::sql_query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(id)
        .execute(connection)?;
    Ok(())
}
