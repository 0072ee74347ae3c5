//! Migrations and the `migrate` command, on databases of their own.

use diesel::RunQueryDsl;
use diesel::connection::SimpleConnection;
use serde_json::json;

use crate::helpers::{TestDatabase, query_json, run, stdout, txnflow};

fn migrate(database: &TestDatabase) -> std::process::Output {
    run(txnflow().arg("migrate").env("TXNFLOW__DB__URL", &database.url))
}

#[test]
fn migrate_applies_the_schema_once_and_is_harmless_twice() {
    let database = TestDatabase::create();
    let first = migrate(&database);
    assert!(first.status.success(), "{first:?}");
    assert_eq!(
        stdout(&first).trim(),
        "applied migrations: 20261126000001, 20261126000002, 20261126000003, 20261201000004, 20261203000005, 20261203000006, 20261204000007, 20261204000008, 20261205000009, 20261205000010, 20261205000011",
        "every migration, in order"
    );
    let second = migrate(&database);
    assert!(second.status.success());
    assert_eq!(stdout(&second).trim(), "schema up to date");

    let mut connection = database.connect();
    let columns = query_json(
        &mut connection,
        "SELECT table_name, column_name, data_type, is_nullable, numeric_precision, numeric_scale
         FROM information_schema.columns
         WHERE table_name IN ('transactions', 'predictions', 'batch_runs', 'prediction_backlog', 'prediction_history')
         ORDER BY table_name, ordinal_position",
    );
    let described: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{}.{} {} null={}",
                c["table_name"].as_str().unwrap(),
                c["column_name"].as_str().unwrap(),
                c["data_type"].as_str().unwrap(),
                c["is_nullable"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            "batch_runs.run_id text null=NO",
            "batch_runs.uri text null=NO",
            "batch_runs.status text null=NO",
            "batch_runs.instance text null=NO",
            "batch_runs.report jsonb null=NO",
            "batch_runs.updated_at timestamp with time zone null=NO",
            "prediction_backlog.transaction_id uuid null=NO",
            "prediction_backlog.attempts integer null=NO",
            "prediction_backlog.next_attempt_at timestamp with time zone null=NO",
            "prediction_backlog.last_error text null=YES",
            "prediction_backlog.refused_at timestamp with time zone null=YES",
            "prediction_history.transaction_id uuid null=NO",
            "prediction_history.category character varying null=NO",
            "prediction_history.confidence_score double precision null=NO",
            "prediction_history.model_version character varying null=NO",
            "prediction_history.predicted_at timestamp with time zone null=NO",
            "prediction_history.kind character varying null=NO",
            "prediction_history.run_id text null=YES",
            "predictions.id bigint null=NO",
            "predictions.transaction_id uuid null=NO",
            "predictions.category character varying null=NO",
            "predictions.confidence_score double precision null=NO",
            "predictions.model_version character varying null=NO",
            "predictions.predicted_at timestamp with time zone null=NO",
            "transactions.id uuid null=NO",
            "transactions.description text null=NO",
            "transactions.amount numeric null=NO",
            "transactions.timestamp timestamp with time zone null=NO",
            "transactions.merchant character varying null=YES",
            "transactions.operation_type character varying null=NO",
            "transactions.side character varying null=NO",
            "transactions.created_at timestamp with time zone null=NO",
            "transactions.updated_at timestamp with time zone null=NO",
            "transactions.processing_type character varying null=NO",
            "transactions.run_id text null=YES",
            "transactions.batch_id text null=YES",
            "transactions.source text null=YES",
        ]
    );
    let amount = columns.iter().find(|c| c["column_name"] == "amount").unwrap();
    assert_eq!((amount["numeric_precision"].clone(), amount["numeric_scale"].clone()), (json!(12), json!(2)));
    let views = query_json(
        &mut connection,
        "SELECT table_name FROM information_schema.views WHERE table_schema = 'public' ORDER BY table_name",
    );
    assert_eq!(
        views,
        [
            json!({"table_name": "model_versions"}),
            json!({"table_name": "refused_predictions"}),
            json!({"table_name": "transaction_stats"}),
            json!({"table_name": "transactions_with_predictions"}),
            json!({"table_name": "unprocessed_transactions"})
        ]
    );
}

#[test]
fn the_views_report_what_is_predicted() {
    let database = TestDatabase::create();
    assert!(migrate(&database).status.success());
    let mut connection = database.connect();
    connection
        .batch_execute(
        "INSERT INTO transactions (id, description, amount, timestamp, merchant, operation_type, side, processing_type, run_id, batch_id, source)
         VALUES ('00000000-0000-0000-0000-000000000001', 'Purchase at Fnac', -9999999999.99, '2026-01-11T10:00:00Z', NULL, 'payment', 'debit', 'batch', 'r1', 's3://b/k.csv', 's3://b/k.csv:2'),
                ('00000000-0000-0000-0000-000000000002', 'Incoming transfer', 1500.00, '2026-01-12T10:00:00Z', 'SNCF', 'transfer', 'credit', 'streaming', NULL, NULL, 'transactions/0/7');
         INSERT INTO predictions (transaction_id, category, confidence_score, model_version)
         VALUES ('00000000-0000-0000-0000-000000000002', 'Salary Income', 1.0, 'v1.0.0');",
        )
        .unwrap();
    let unprocessed =
        query_json(&mut connection, "SELECT id, merchant, amount::text AS amount FROM unprocessed_transactions");
    assert_eq!(
        unprocessed,
        [json!({"id": "00000000-0000-0000-0000-000000000001", "merchant": null, "amount": "-9999999999.99"})]
    );
    let stats = query_json(
        &mut connection,
        "SELECT total_transactions, predicted_transactions, unprocessed_transactions, prediction_coverage_pct::text AS coverage,
                streaming_transactions, batch_transactions FROM transaction_stats",
    );
    assert_eq!(
        stats,
        [
            json!({"total_transactions": 2, "predicted_transactions": 1, "unprocessed_transactions": 1, "coverage": "50.00",
                "streaming_transactions": 1, "batch_transactions": 1})
        ]
    );
    let joined = query_json(&mut connection, "SELECT id, category FROM transactions_with_predictions ORDER BY id");
    assert_eq!(joined[1], json!({"id": "00000000-0000-0000-0000-000000000002", "category": "Salary Income"}));
    // The checks mirror the domain rules.
    let bad_side = diesel::sql_query(
        "INSERT INTO transactions (id, description, amount, timestamp, operation_type, side)
         VALUES ('00000000-0000-0000-0000-000000000003', 'x', 1, now(), 'payment', 'sideways')",
    )
    .execute(&mut connection);
    assert!(bad_side.is_err());
}

/// A database the seed system already populated is upgraded in place.
#[test]
fn a_seed_system_database_is_upgraded_in_place() {
    let database = TestDatabase::create();
    let mut connection = database.connect();
    let seed_schema = include_str!("../../migrations/2026-11-26-000001_seed_schema/up.sql");
    connection.batch_execute(seed_schema).unwrap();
    diesel::sql_query(
        "INSERT INTO transactions (id, description, amount, timestamp, merchant, operation_type, side)
         VALUES ('e15d1546-4798-54fb-b2ff-35d10197b1b9', 'Card expense at EDF', -952.40, '2023-11-28 06:35:12+00', 'EDF', 'refund', 'debit')",
    )
    .execute(&mut connection)
    .unwrap();
    let output = migrate(&database);
    assert!(output.status.success(), "{output:?}");
    let rows = query_json(&mut connection, "SELECT id, amount::text AS amount, processing_type FROM transactions");
    assert_eq!(
        rows,
        [json!({"id": "e15d1546-4798-54fb-b2ff-35d10197b1b9", "amount": "-952.40", "processing_type": "streaming"})]
    );
}

/// Reverting txnflow's migrations gives the seed schema back, views and
/// all, and migrating again restores txnflow's.
#[test]
fn reverting_txnflow_migrations_restores_the_seed_schema() {
    use diesel_migrations::MigrationHarness;
    let database = TestDatabase::create();
    assert!(migrate(&database).status.success());
    let mut connection = database.connect();
    let reverted: Vec<String> =
        (0..10).map(|_| connection.revert_last_migration(txnflow::db::MIGRATIONS).unwrap().to_string()).collect();
    assert_eq!(
        reverted,
        [
            "20261205000011",
            "20261205000010",
            "20261205000009",
            "20261204000008",
            "20261204000007",
            "20261203000006",
            "20261203000005",
            "20261201000004",
            "20261126000003",
            "20261126000002"
        ]
    );

    let tables = query_json(
        &mut connection,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'
         AND table_name <> '__diesel_schema_migrations' ORDER BY table_name",
    );
    let tables: Vec<&str> = tables.iter().map(|t| t["table_name"].as_str().unwrap()).collect();
    assert_eq!(
        tables,
        [
            "predictions",
            "transaction_stats",
            "transactions",
            "transactions_with_predictions",
            "unprocessed_transactions"
        ],
        "the seed's tables and views, and none of txnflow's"
    );
    let lineage = query_json(
        &mut connection,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'transactions'
         AND column_name IN ('processing_type', 'run_id', 'batch_id', 'source')",
    );
    assert_eq!(lineage, Vec::<serde_json::Value>::new(), "no lineage columns");
    // The seed's views work on the seed's columns.
    connection
        .batch_execute(
            "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side)
             VALUES ('00000000-0000-0000-0000-000000000009', 'Coffee', -3.5, now(), 'Cafe', 'card', 'debit')",
        )
        .unwrap();
    let stats =
        query_json(&mut connection, "SELECT total_transactions, unprocessed_transactions FROM transaction_stats");
    assert_eq!(stats, [json!({"total_transactions": 1, "unprocessed_transactions": 1})]);

    let again = migrate(&database);
    assert_eq!(
        stdout(&again).trim(),
        "applied migrations: 20261126000002, 20261126000003, 20261201000004, 20261203000005, 20261203000006, 20261204000007, 20261204000008, 20261205000009, 20261205000010, 20261205000011"
    );
    let stored = query_json(&mut connection, "SELECT processing_type, run_id FROM transactions");
    assert_eq!(stored, [json!({"processing_type": "streaming", "run_id": null})]);
}

/// The seed's views and queries, as the seed system and its users ask them.
const SEED_QUERIES: [&str; 4] = [
    "SELECT total_transactions, predicted_transactions, unprocessed_transactions, prediction_coverage_pct::text,
            total_debits::text, total_credits::text FROM transaction_stats",
    "SELECT id, category, model_version, confidence_score FROM transactions_with_predictions ORDER BY id",
    "SELECT id FROM unprocessed_transactions ORDER BY id",
    "SELECT category, count(*) AS n FROM predictions GROUP BY category ORDER BY category",
];

fn seed_answers(connection: &mut diesel::PgConnection) -> Vec<Vec<serde_json::Value>> {
    SEED_QUERIES.iter().map(|query| query_json(connection, query)).collect()
}

/// The history migration keeps the seed's answers: on a database with
/// predictions, the seed's views and queries answer the same before it,
/// after it, and after it is reverted. Each current prediction found becomes a `migrated` history
/// row, so that it can be promoted back.
#[test]
fn the_history_migration_keeps_the_seed_answers() {
    use diesel_migrations::MigrationHarness;
    let database = TestDatabase::create();
    assert!(migrate(&database).status.success());
    let mut connection = database.connect();
    let revert = |connection: &mut diesel::PgConnection| {
        connection.revert_last_migration(txnflow::db::MIGRATIONS).unwrap().to_string()
    };
    // The rollout migrations (000006 on), newest first.
    let rollout_reverted =
        |connection: &mut diesel::PgConnection| -> [String; 6] { std::array::from_fn(|_| revert(connection)) };
    assert_eq!(
        rollout_reverted(&mut connection),
        ["20261205000011", "20261205000010", "20261205000009", "20261204000008", "20261204000007", "20261203000006"]
    );
    assert_eq!(revert(&mut connection), "20261203000005");
    connection
        .batch_execute(
            "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side)
             SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'row ' || i, i * 1.5 - 4,
                    '2024-01-01'::timestamptz + i * interval '1 hour', 'm' || (i % 3), 'card',
                    CASE WHEN i % 2 = 0 THEN 'debit' ELSE 'credit' END
             FROM generate_series(1, 12) AS i;
             INSERT INTO predictions (transaction_id, category, confidence_score, model_version)
             SELECT id, CASE WHEN amount < 5 THEN 'Food' ELSE 'Rent' END, 0.9, 'v1.0.0'
             FROM transactions WHERE description <> 'row 12';",
        )
        .unwrap();
    let before = seed_answers(&mut connection);
    assert_eq!(before[0][0]["predicted_transactions"], 11);

    let applied = migrate(&database);
    assert_eq!(
        stdout(&applied).trim(),
        "applied migrations: 20261203000005, 20261203000006, 20261204000007, 20261204000008, 20261205000009, 20261205000010, 20261205000011"
    );
    assert_eq!(seed_answers(&mut connection), before, "the same answers after the migrations");
    let history = query_json(
        &mut connection,
        "SELECT count(*)::int AS n, count(DISTINCT transaction_id)::int AS ids, min(kind) AS kind,
                bool_and(h.category = p.category AND h.model_version = p.model_version
                         AND h.predicted_at = p.predicted_at) AS same
         FROM prediction_history h JOIN predictions p USING (transaction_id)",
    );
    assert_eq!(history, [json!({"n": 11, "ids": 11, "kind": "migrated", "same": true})]);
    let versions = query_json(
        &mut connection,
        "SELECT model_version, predictions, transactions, coverage_pct::text AS coverage, current_predictions
         FROM model_versions",
    );
    assert_eq!(
        versions,
        [json!({"model_version": "v1.0.0", "predictions": 11, "transactions": 11, "coverage": "91.67",
                "current_predictions": 11})]
    );

    // The rollout migrations on a database with history (a second
    // version's re-predictions beside the migrated rows): the same answers
    // before them, after them, and after their revert.
    assert_eq!(
        rollout_reverted(&mut connection),
        ["20261205000011", "20261205000010", "20261205000009", "20261204000008", "20261204000007", "20261203000006"]
    );
    connection
        .batch_execute(
            "INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, kind, run_id)
             SELECT transaction_id, 'Travel', 0.5, 'v2', 'repredict', 'r1' FROM predictions",
        )
        .unwrap();
    assert_eq!(seed_answers(&mut connection), before, "history rows change none of the seed's answers");
    assert_eq!(
        stdout(&migrate(&database)).trim(),
        "applied migrations: 20261203000006, 20261204000007, 20261204000008, 20261205000009, 20261205000010, 20261205000011"
    );
    assert_eq!(seed_answers(&mut connection), before, "the same answers after the rollout migrations");
    assert_eq!(
        rollout_reverted(&mut connection),
        ["20261205000011", "20261205000010", "20261205000009", "20261204000008", "20261204000007", "20261203000006"]
    );
    assert_eq!(seed_answers(&mut connection), before, "and after its revert");

    assert_eq!(revert(&mut connection), "20261203000005");
    assert_eq!(seed_answers(&mut connection), before, "the same answers after it is reverted");
}
