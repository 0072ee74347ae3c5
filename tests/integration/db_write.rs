//! The flush write against PostgreSQL: binary COPY and UNNEST store the same
//! rows, byte for byte, and a flush COPY cannot take (a record stored
//! before) is rolled back and written whole by UNNEST.

use serde_json::json;
use txnflow::config::WriteMethod;
use txnflow::db::{Flushed, TransactionRow, write_flush};
use txnflow::domain::amount::Amount;
use txnflow::domain::prediction::Prediction;
use txnflow::domain::transaction::{ProcessingType, Side, Transaction};

use crate::helpers::{TestDatabase, query_json};

/// Transactions at the edges of what a row holds: amounts of every digit
/// layout, no merchant, text with quotes, tabs, backslashes and non-ASCII.
fn edge_transactions(salt: u128) -> Vec<Transaction> {
    let cents = [0, 5, -5, 100, -95_240, 1_000_000, 1_000_001, 999_999_999_999, -999_999_999_999, 123_456_789];
    cents
        .iter()
        .enumerate()
        .map(|(i, &cents)| Transaction {
            id: uuid::Uuid::from_u128(salt << 64 | i as u128),
            description: format!("Paiement \"carte\"\t\\ n°{i} — café ☕"),
            amount: Amount::from_cents(cents).unwrap(),
            timestamp: chrono::DateTime::parse_from_rfc3339("2023-11-28T06:35:12.123456+01:00").unwrap().to_utc()
                + chrono::Duration::days(i as i64),
            merchant: (i % 3 != 0).then(|| format!("Café {i}")),
            operation_type: "payment".into(),
            side: if cents < 0 { Side::Debit } else { Side::Credit },
            processing_type: None,
            run_id: None,
            batch_id: None,
        })
        .collect()
}

fn rows(transactions: &[Transaction]) -> Vec<TransactionRow<'_>> {
    transactions
        .iter()
        .enumerate()
        .map(|(i, transaction)| TransactionRow {
            transaction,
            processing_type: if i % 2 == 0 { ProcessingType::Streaming } else { ProcessingType::Batch },
            run_id: (i % 2 == 1).then_some("run-1"),
            batch_id: None,
            source: format!("topic/0/{i}"),
        })
        .collect()
}

fn predictions(transactions: &[Transaction], version: &str) -> Vec<Prediction> {
    transactions
        .iter()
        .map(|t| Prediction {
            transaction_id: t.id,
            category: "Food".into(),
            confidence_score: 0.25,
            model_version: version.into(),
        })
        .collect()
}

const STORED: &str =
    "SELECT t.id::text, description, amount::text, \"timestamp\"::text, merchant, operation_type, side,
                             processing_type, run_id, batch_id, source, p.category, p.confidence_score, p.model_version
                      FROM transactions t LEFT JOIN predictions p ON p.transaction_id = t.id ORDER BY t.id";

/// History by version and kind, and whether each history row of the
/// current version matches its current prediction exactly.
const HISTORY: &str = "SELECT h.model_version, h.kind, count(*)::int AS n,
                              bool_and(p.category = h.category AND p.confidence_score = h.confidence_score
                                       AND (p.model_version <> h.model_version OR p.predicted_at = h.predicted_at))
                                  AS matches_current
                       FROM prediction_history h JOIN predictions p USING (transaction_id)
                       GROUP BY 1, 2 ORDER BY 1, 2";

#[test]
fn copy_and_unnest_store_the_same_rows() {
    let transactions = edge_transactions(1);
    let mut stored = Vec::new();
    for method in [WriteMethod::Copy, WriteMethod::Unnest] {
        let database = TestDatabase::migrated();
        let mut connection = database.connect();
        let stored_by = write_flush(&mut connection, &rows(&transactions), &predictions(&transactions, "v1"), method);
        assert_eq!(
            stored_by.unwrap(),
            Flushed { method, already_stored: vec![] },
            "a new flush is stored by the method asked for"
        );
        stored.push(query_json(&mut connection, STORED));
        assert_eq!(
            query_json(&mut connection, HISTORY),
            [json!({"model_version": "v1", "kind": "pipeline", "n": 10, "matches_current": true})],
            "{method:?}: one history row per prediction, in the same transaction"
        );
    }
    assert_eq!(stored[0].len(), transactions.len());
    assert_eq!(stored[0], stored[1], "COPY and UNNEST store the same values");
    let amounts: Vec<&str> = stored[0].iter().map(|row| row["amount"].as_str().unwrap()).collect();
    assert_eq!(
        amounts,
        [
            "0.00",
            "0.05",
            "-0.05",
            "1.00",
            "-952.40",
            "10000.00",
            "10000.01",
            "9999999999.99",
            "-9999999999.99",
            "1234567.89"
        ]
    );
    assert_eq!(stored[0][0]["timestamp"], "2023-11-28 05:35:12.123456+00");
    assert_eq!(stored[0][0]["merchant"], serde_json::Value::Null);
    assert_eq!(stored[0][1]["description"], "Paiement \"carte\"\t\\ n°1 — café ☕");
}

#[test]
fn a_flush_holding_stored_records_is_written_whole_by_the_fallback() {
    let database = TestDatabase::migrated();
    let mut connection = database.connect();
    let first = edge_transactions(2);
    let stored_by =
        write_flush(&mut connection, &rows(&first[..4]), &predictions(&first[..4], "v1"), WriteMethod::Copy);
    assert_eq!(stored_by.unwrap(), Flushed { method: WriteMethod::Copy, already_stored: vec![] });
    // Four of these are stored already (with v1); COPY fails on them, and
    // the flush is written by UNNEST: six new rows predicted v2, while the
    // four keep their v1 prediction (only a promotion replaces one).
    let stored_by = write_flush(&mut connection, &rows(&first), &predictions(&first, "v2"), WriteMethod::Copy);
    // The four found stored have the same lineage: the same run's own rows.
    assert_eq!(stored_by.unwrap(), Flushed { method: WriteMethod::Unnest, already_stored: vec![] });
    let stored = query_json(&mut connection, STORED);
    assert_eq!(stored.len(), 10);
    let versions: Vec<&str> = stored.iter().map(|row| row["model_version"].as_str().unwrap()).collect();
    assert_eq!(versions, ["v1", "v1", "v1", "v1", "v2", "v2", "v2", "v2", "v2", "v2"], "{stored:?}");
    let sources: Vec<&str> = stored.iter().map(|row| row["source"].as_str().unwrap()).collect();
    assert_eq!(sources, (0..10).map(|i| format!("topic/0/{i}")).collect::<Vec<_>>());
    let history = [
        json!({"model_version": "v1", "kind": "pipeline", "n": 4, "matches_current": true}),
        json!({"model_version": "v2", "kind": "pipeline", "n": 6, "matches_current": true}),
    ];
    assert_eq!(query_json(&mut connection, HISTORY), history, "v1's 4 kept, v2's 6 added");
    // The same flush again (a redelivery): nothing changes, no history row.
    let stored_by = write_flush(&mut connection, &rows(&first), &predictions(&first, "v2"), WriteMethod::Copy);
    assert_eq!(stored_by.unwrap(), Flushed { method: WriteMethod::Unnest, already_stored: vec![] });
    assert_eq!(query_json(&mut connection, HISTORY), history, "a redelivered prediction adds no history row");
    // Another run's rows (a batch run again under a new run id): all found
    // stored by others, and left as they were.
    let again: Vec<TransactionRow<'_>> =
        rows(&first).into_iter().map(|row| TransactionRow { run_id: Some("run-2"), ..row }).collect();
    let stored_by = write_flush(&mut connection, &again, &predictions(&first, "v2"), WriteMethod::Copy);
    let ids: Vec<uuid::Uuid> = first.iter().map(|t| t.id).collect();
    assert_eq!(stored_by.unwrap(), Flushed { method: WriteMethod::Unnest, already_stored: ids });
    assert_eq!(query_json(&mut connection, HISTORY), history, "nothing changes");
    // A refused value fails the fallback too, with the database's reason.
    let mut bad = edge_transactions(3);
    bad[0].operation_type = "x".repeat(51);
    let refused = write_flush(&mut connection, &rows(&bad), &[], WriteMethod::Copy).unwrap_err();
    assert!(matches!(refused, txnflow::db::WriteError::Refused(_)), "{refused:?}");
    assert_eq!(query_json(&mut connection, "SELECT count(*)::int AS n FROM transactions")[0]["n"], 10);
}
