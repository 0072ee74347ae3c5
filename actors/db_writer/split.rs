//! Isolating what the database refuses in a flush: the flush is split in
//! halves until each refused record stands alone, and a lone refused
//! record is tried once more without its prediction. Written against a
//! [`FlushStore`], so the rule is tested without a database.

use std::collections::HashMap;
use uuid::Uuid;

use crate::actors::messages::Envelope;
use crate::config::WriteMethod;
use crate::db::{TransactionRow, WriteError, write_flush};
use crate::domain::prediction::Prediction;

/// A write's outcome: done, with the ids that were stored before it, or why not.
type Written = Result<Vec<Uuid>, WriteError>;

/// Where a flush is written: a PostgreSQL connection in the service.
pub(super) trait FlushStore {
    /// Writes the rows and their predictions in one database transaction;
    /// the rows stored before are left as they were.
    fn write(&mut self, rows: &[TransactionRow<'_>], predictions: &[Prediction], method: WriteMethod) -> Written;

    /// Whether the database answers a trivial query.
    fn answers(&mut self) -> bool;
}

impl FlushStore for diesel::pg::PgConnection {
    fn write(&mut self, rows: &[TransactionRow<'_>], predictions: &[Prediction], method: WriteMethod) -> Written {
        write_flush(self, rows, predictions, method).map(|flushed| flushed.already_stored)
    }

    fn answers(&mut self) -> bool {
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT 1").execute(self).is_ok()
    }
}

/// What a write refused, by position in the flush, with the reason, and
/// what it found stored already.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Refusals {
    /// Transactions another run stored before this flush (a batch run
    /// again under a new run id): not refused, left as they were.
    pub(super) already_stored: std::collections::HashSet<Uuid>,
    /// Records the database refused whole: dead-lettered as `persist_failed`.
    pub(super) records: Vec<(usize, String)>,
    /// Records stored without their prediction, which the database refused:
    /// they count as `prediction_failed`, and the backfill predicts them again.
    pub(super) predictions: Vec<(usize, String)>,
}

/// How much a failing write is trusted to be the database's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Suspicion {
    /// An error is the database's (unreachable, busy) unless it says the data is bad.
    Database,
    /// The same write kept failing while the database answers: any error
    /// that persists while `SELECT 1` works is a refusal of the data.
    Data,
}

/// Consecutive failures of one write after which it is suspected, not the database.
pub(super) const SUSPECT_DATA_AFTER: u32 = 3;

/// The refusal reason of a failed write, or the error when the database
/// itself is the problem (then the whole write is retried later).
fn refusal(store: &mut impl FlushStore, error: WriteError, suspicion: Suspicion) -> Result<String, WriteError> {
    match error {
        WriteError::Refused(reason) => Ok(reason),
        WriteError::Unavailable(reason) if suspicion == Suspicion::Data && store.answers() => Ok(reason),
        unavailable => Err(unavailable),
    }
}

/// The flush's records and predictions, as a write reads them.
pub(super) struct FlushRows<'a> {
    pub(super) records: &'a [Envelope],
    pub(super) predictions: &'a HashMap<Uuid, Prediction>,
}

/// Writes the records at `positions`, splitting on refused data until each
/// refused record stands alone; a lone record is tried once more without
/// its prediction, since a bad prediction must not cost the transaction.
/// The halves of a split are written with `UNNEST`: `COPY` failed on
/// their whole already.
pub(super) fn write_positions(
    store: &mut impl FlushStore,
    flush: &FlushRows<'_>,
    positions: &[usize],
    method: WriteMethod,
    suspicion: Suspicion,
    refusals: &mut Refusals,
) -> Result<(), WriteError> {
    let rows: Vec<TransactionRow<'_>> = positions
        .iter()
        .map(|&i| {
            let record = &flush.records[i];
            TransactionRow {
                transaction: &record.transaction,
                processing_type: record.lineage.processing_type,
                run_id: record.lineage.run_id.as_deref(),
                batch_id: record.lineage.batch_id.as_deref(),
                source: record.ack.origin().to_string(),
            }
        })
        .collect();
    let predictions: Vec<_> =
        positions.iter().filter_map(|&i| flush.predictions.get(&flush.records[i].transaction.id).cloned()).collect();
    let error = match store.write(&rows, &predictions, method) {
        Ok(already_stored) => {
            refusals.already_stored.extend(already_stored);
            return Ok(());
        }
        Err(error) => error,
    };
    let reason = refusal(store, error, suspicion)?;
    if positions.len() > 1 {
        let (left, right) = positions.split_at(positions.len() / 2);
        write_positions(store, flush, left, WriteMethod::Unnest, suspicion, refusals)?;
        return write_positions(store, flush, right, WriteMethod::Unnest, suspicion, refusals);
    }
    if predictions.is_empty() {
        refusals.records.push((positions[0], reason));
        return Ok(());
    }
    match store.write(&rows, &[], WriteMethod::Unnest) {
        Ok(already_stored) => {
            refusals.already_stored.extend(already_stored);
            refusals.predictions.push((positions[0], format!("prediction refused by the database: {reason}")))
        }
        Err(error) => refusals.records.push((positions[0], refusal(store, error, suspicion)?)),
    }
    Ok(())
}

/// The position of the first record of each transaction id: a record
/// delivered twice into one flush (a redelivery) is written once, and its
/// repeat is settled as its first is.
pub(super) fn first_of_each_id(records: &[Envelope]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::with_capacity(records.len());
    (0..records.len()).filter(|&i| seen.insert(records[i].transaction.id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::messages::test_envelopes;

    /// A store that refuses every write holding a record whose description
    /// says `refused` or a prediction in category `bad`, and that keeps
    /// what it took. `unavailable` makes a write holding a record
    /// described `stuck` fail as if the database were at fault.
    #[derive(Default)]
    struct ScriptedStore {
        stored: Vec<String>,
        predicted: Vec<String>,
        methods: Vec<(WriteMethod, usize)>,
        answers: bool,
    }

    impl FlushStore for ScriptedStore {
        fn write(&mut self, rows: &[TransactionRow<'_>], predictions: &[Prediction], method: WriteMethod) -> Written {
            self.methods.push((method, rows.len()));
            if rows.iter().any(|row| row.transaction.description == "stuck") {
                return Err(WriteError::Unavailable("canceling statement due to statement timeout".into()));
            }
            if rows.iter().any(|row| row.transaction.description == "refused") {
                return Err(WriteError::Refused("value too long".into()));
            }
            if predictions.iter().any(|prediction| prediction.category == "bad") {
                return Err(WriteError::Refused("invalid byte sequence".into()));
            }
            self.stored.extend(rows.iter().map(|row| row.transaction.description.clone()));
            self.predicted.extend(predictions.iter().map(|prediction| prediction.category.clone()));
            Ok(Vec::new())
        }

        fn answers(&mut self) -> bool {
            self.answers
        }
    }

    /// Each record predicted as its own description.
    fn predicted(records: &[Envelope]) -> HashMap<Uuid, Prediction> {
        records
            .iter()
            .map(|record| {
                let prediction = Prediction {
                    transaction_id: record.transaction.id,
                    category: record.transaction.description.replace("bad prediction", "bad"),
                    confidence_score: 0.9,
                    model_version: "v1".into(),
                };
                (record.transaction.id, prediction)
            })
            .collect()
    }

    fn write(store: &mut ScriptedStore, records: &[Envelope], suspicion: Suspicion) -> Result<Refusals, WriteError> {
        let predictions = predicted(records);
        let flush = FlushRows { records, predictions: &predictions };
        let mut refusals = Refusals::default();
        let positions = first_of_each_id(records);
        write_positions(store, &flush, &positions, WriteMethod::Copy, suspicion, &mut refusals)?;
        Ok(refusals)
    }

    #[test]
    fn a_clean_flush_is_one_copy() {
        let records = test_envelopes(&["a", "b", "c"]);
        let mut store = ScriptedStore::default();
        assert_eq!(write(&mut store, &records, Suspicion::Database).unwrap(), Refusals::default());
        assert_eq!(store.methods, [(WriteMethod::Copy, 3)]);
        assert_eq!(store.stored, ["a", "b", "c"]);
        assert_eq!(store.predicted, ["a", "b", "c"]);
    }

    #[test]
    fn refused_records_are_isolated_by_halves_and_the_rest_is_stored() {
        let records = test_envelopes(&["a", "b", "refused", "c", "d", "refused", "e", "f"]);
        let mut store = ScriptedStore::default();
        let refusals = write(&mut store, &records, Suspicion::Database).unwrap();
        assert_eq!(refusals.records, [(2, "value too long".to_string()), (5, "value too long".to_string())]);
        assert!(refusals.predictions.is_empty());
        assert_eq!(store.stored, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(store.predicted, ["a", "b", "c", "d", "e", "f"]);
        // The whole by COPY, then halves by UNNEST; a refused record alone
        // is tried twice, with and without its prediction.
        let sizes: Vec<usize> = store.methods.iter().map(|(_, rows)| *rows).collect();
        assert_eq!(sizes, [8, 4, 2, 2, 1, 1, 1, 4, 2, 1, 1, 1, 2]);
        assert_eq!(store.methods[0].0, WriteMethod::Copy);
        assert!(store.methods[1..].iter().all(|(method, _)| *method == WriteMethod::Unnest));
    }

    #[test]
    fn a_refused_prediction_costs_only_the_prediction() {
        let records = test_envelopes(&["a", "bad prediction", "c", "d"]);
        let mut store = ScriptedStore::default();
        let refusals = write(&mut store, &records, Suspicion::Database).unwrap();
        assert!(refusals.records.is_empty());
        assert_eq!(
            refusals.predictions,
            [(1, "prediction refused by the database: invalid byte sequence".to_string())]
        );
        assert_eq!(store.stored, ["a", "bad prediction", "c", "d"]);
        assert_eq!(store.predicted, ["a", "c", "d"]);
    }

    #[test]
    fn an_unavailable_database_fails_the_whole_write_until_the_data_is_suspected() {
        let records = test_envelopes(&["a", "stuck", "c"]);
        let mut store = ScriptedStore { answers: true, ..Default::default() };
        let error = write(&mut store, &records, Suspicion::Database).unwrap_err();
        assert!(matches!(error, WriteError::Unavailable(_)));
        assert!(store.stored.is_empty(), "nothing is split while the database is suspected");
        assert_eq!(store.methods.len(), 1);

        // Suspected, and the database answers: the error is the record's.
        let mut store = ScriptedStore { answers: true, ..Default::default() };
        let refusals = write(&mut store, &records, Suspicion::Data).unwrap();
        assert_eq!(refusals.records, [(1, "canceling statement due to statement timeout".to_string())]);
        assert_eq!(store.stored, ["a", "c"]);

        // Suspected, but the database does not answer: it is the database after all.
        let mut store = ScriptedStore { answers: false, ..Default::default() };
        assert!(matches!(write(&mut store, &records, Suspicion::Data), Err(WriteError::Unavailable(_))));
        assert!(store.stored.is_empty());
    }

    #[test]
    fn a_record_delivered_twice_into_one_flush_is_written_once() {
        let mut records = test_envelopes(&["a", "b"]);
        records.extend(test_envelopes(&["a", "b", "c"]));
        assert_eq!(first_of_each_id(&records), [0, 1, 4]);
        let mut store = ScriptedStore::default();
        write(&mut store, &records, Suspicion::Database).unwrap();
        assert_eq!(store.stored, ["a", "b", "c"]);
    }
}
