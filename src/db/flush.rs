//! A flush's writes: its transactions, their predictions and the
//! predictions' history rows, in one database transaction, by binary
//! `COPY` first and by `UNNEST` statements when `COPY` fails whole.

use diesel::pg::PgConnection;
use diesel::{Connection, ExecuteCopyFromDsl, RunQueryDsl};

use super::WriteError;
use super::binary_copy::BinaryCopy;
use crate::config::WriteMethod;
use crate::domain::prediction::PredictionKind;

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

/// One transaction to store, with its lineage.
pub struct TransactionRow<'a> {
    pub transaction: &'a crate::domain::transaction::Transaction,
    pub processing_type: crate::domain::transaction::ProcessingType,
    pub run_id: Option<&'a str>,
    pub batch_id: Option<&'a str>,
    pub source: String,
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
/// Returns the method that stored the flush, and the transactions another
/// run stored before it.
pub fn write_flush(
    connection: &mut PgConnection,
    rows: &[TransactionRow<'_>],
    predictions: &[crate::domain::prediction::Prediction],
    method: WriteMethod,
) -> Result<Flushed, WriteError> {
    if method == WriteMethod::Copy
        && connection
            .transaction(|tx| EncodedFlush::of(rows, predictions, PredictionKind::Pipeline).copy_into(tx))
            .is_ok()
    {
        return Ok(Flushed { method: WriteMethod::Copy, already_stored: Vec::new() });
    }
    connection.transaction::<Flushed, WriteError, _>(|tx| {
        let already_stored = insert_transactions(tx, rows)?;
        insert_new_predictions(tx, predictions, PredictionKind::Pipeline)?;
        Ok(Flushed { method: WriteMethod::Unnest, already_stored })
    })
}

/// What a flush's write did.
#[derive(Debug, PartialEq, Eq)]
pub struct Flushed {
    /// The method that stored it.
    pub method: WriteMethod,
    /// The ids of its transactions that another run (another `run_id`,
    /// or streaming for a batch row) stored before it: they are left as
    /// they were. Rows stored before by the same run are its own.
    pub already_stored: Vec<uuid::Uuid>,
}

/// A flush as three binary `COPY` streams, one per table, encoded before
/// any of them is sent. The benchmarks' ceiling loader sends the same
/// streams with nothing else around them.
pub struct EncodedFlush {
    transaction_count: usize,
    prediction_count: usize,
    transactions: Vec<u8>,
    predictions: Vec<u8>,
    history: Vec<u8>,
}

impl EncodedFlush {
    /// The streams of `rows` and of `predictions`, whose history rows are
    /// of `kind`.
    pub fn of(
        rows: &[TransactionRow<'_>],
        predictions: &[crate::domain::prediction::Prediction],
        kind: PredictionKind,
    ) -> EncodedFlush {
        EncodedFlush {
            transaction_count: rows.len(),
            prediction_count: predictions.len(),
            transactions: transaction_copy(rows),
            predictions: prediction_copy(predictions, None),
            history: prediction_copy(predictions, Some(kind)),
        }
    }

    /// Sends the three streams on `connection`, in the caller's database
    /// transaction. Empty tables are skipped.
    pub fn copy_into(&self, connection: &mut PgConnection) -> diesel::QueryResult<()> {
        use diesel::pg::CopyFormat;
        use schema::{prediction_history::dsl as h, predictions::dsl as p, transactions::dsl as t};
        if self.transaction_count > 0 {
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
                .from_raw_data(columns, |out| write_copy(out, &self.transactions))
                .with_format(CopyFormat::Binary)
                .execute(connection)?;
        }
        if self.prediction_count > 0 {
            diesel::copy_from(p::predictions)
                .from_raw_data((p::transaction_id, p::category, p::confidence_score, p::model_version), |out| {
                    write_copy(out, &self.predictions)
                })
                .with_format(CopyFormat::Binary)
                .execute(connection)?;
            // `predicted_at` defaults to `now()`, the transaction's start, as
            // the `predictions` rows' does: the two rows of one prediction agree.
            diesel::copy_from(h::prediction_history)
                .from_raw_data(
                    (h::transaction_id, h::category, h::confidence_score, h::model_version, h::kind),
                    |out| write_copy(out, &self.history),
                )
                .with_format(CopyFormat::Binary)
                .execute(connection)?;
        }
        Ok(())
    }
}

/// Hands a finished binary COPY stream to the connection.
fn write_copy(out: &mut dyn std::io::Write, bytes: &[u8]) -> diesel::QueryResult<()> {
    out.write_all(bytes).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

/// The binary `COPY` stream of `transactions`' rows.
fn transaction_copy(rows: &[TransactionRow<'_>]) -> Vec<u8> {
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
    copy.finish()
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

/// Inserts the rows whose id is not stored yet; returns, in row order, the
/// ids of those another run stored before.
fn insert_transactions(
    connection: &mut PgConnection,
    rows: &[TransactionRow<'_>],
) -> Result<Vec<uuid::Uuid>, WriteError> {
    use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if rows.is_empty() {
        return Ok(Vec::new());
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
    let inserted = diesel::sql_query(
        "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side,
                                   processing_type, run_id, batch_id, source)
         SELECT id, description, amount::numeric(12, 2), ts, merchant, operation_type, side,
                processing_type, run_id, batch_id, source
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[], $11::text[])
              AS r(id, description, amount, ts, merchant, operation_type, side, processing_type, run_id, batch_id, source)
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
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
    .load::<StoredId>(connection)?;
    // Every row new, the usual case on the records' path: nothing to look up.
    if inserted.len() == rows.len() {
        return Ok(Vec::new());
    }
    let inserted: std::collections::HashSet<uuid::Uuid> = inserted.into_iter().map(|row| row.id).collect();
    let (found_ids, found_runs): (Vec<uuid::Uuid>, Vec<Option<&str>>) = rows
        .iter()
        .filter(|row| !inserted.contains(&row.transaction.id))
        .map(|row| (row.transaction.id, row.run_id))
        .unzip();
    if found_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Rows this run stored itself (a row sent again after a crash, a run
    // resumed or taken over, a redelivered record) count as its own.
    let others: Vec<StoredId> = diesel::sql_query(
        "SELECT t.id FROM UNNEST($1::uuid[], $2::text[]) WITH ORDINALITY AS r(id, run_id, position)
         JOIN transactions t ON t.id = r.id
         WHERE t.run_id IS DISTINCT FROM r.run_id
         ORDER BY r.position",
    )
    .bind::<Array<SqlUuid>, _>(&found_ids)
    .bind::<Array<Nullable<Text>>, _>(&found_runs)
    .load(connection)?;
    Ok(others.into_iter().map(|row| row.id).collect())
}

#[derive(diesel::QueryableByName)]
struct StoredId {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
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
