//! One transaction's predictions, across model versions and the archive:
//! `txnflow models history ID` and `GET /transactions/<id>/predictions`.

use diesel::connection::SimpleConnection;
use serde_json::json;

use crate::helpers::{TestDatabase, run, stderr, stdout, txnflow};
use crate::scenario::Scenario;
use txnflow::domain::identity::canonical_id;

/// Transaction `1` with a current v2 prediction and four past ones: v0
/// archived, v1 from the pipeline, v2 from a re-prediction run, v3 from a
/// shadow model; transaction `2` with one, which must not show.
fn seed(database: &TestDatabase) {
    let (one, two) = (canonical_id("1").unwrap(), canonical_id("2").unwrap());
    database
        .connect()
        .batch_execute(&format!(
            "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side)
             VALUES ('{one}', 'Card expense at EDF', -952.40, '2024-01-01T10:00:00Z', 'EDF', 'payment', 'debit'),
                    ('{two}', 'Salary', 2000, '2024-01-02T10:00:00Z', NULL, 'transfer', 'credit');
             INSERT INTO predictions (transaction_id, category, confidence_score, model_version, predicted_at)
             VALUES ('{one}', 'Utilities', 0.8, 'v2', '2024-03-01T00:00:00Z'),
                    ('{two}', 'Income', 0.9, 'v1', '2024-01-02T10:00:01Z');
             INSERT INTO prediction_history_archive
                    (transaction_id, category, confidence_score, model_version, predicted_at, kind)
             VALUES ('{one}', 'Shopping', 0.4, 'v0', '2023-12-01T00:00:00Z', 'migrated');
             INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, predicted_at, kind, run_id)
             VALUES ('{one}', 'Housing', 0.6, 'v1', '2024-01-01T10:00:01Z', 'pipeline', NULL),
                    ('{one}', 'Utilities', 0.8, 'v2', '2024-03-01T00:00:00Z', 'repredict', 'r1'),
                    ('{one}', 'Utilities', 0.7, 'v3', '2024-04-01T00:00:00Z', 'shadow', NULL),
                    ('{two}', 'Income', 0.9, 'v1', '2024-01-02T10:00:01Z', 'pipeline', NULL);"
        ))
        .unwrap();
}

fn expected_one() -> serde_json::Value {
    let past = |category: &str, score: f64, version: &str, at: &str, kind: &str, run: Option<&str>, archived: bool| {
        json!({"category": category, "confidence_score": score, "model_version": version, "predicted_at": at,
               "kind": kind, "run_id": run, "archived": archived})
    };
    json!({
        "transaction_id": canonical_id("1").unwrap(),
        "stored": true,
        "current": {"category": "Utilities", "confidence_score": 0.8, "model_version": "v2",
                    "predicted_at": "2024-03-01T00:00:00Z"},
        "history": [
            past("Utilities", 0.7, "v3", "2024-04-01T00:00:00Z", "shadow", None, false),
            past("Utilities", 0.8, "v2", "2024-03-01T00:00:00Z", "repredict", Some("r1"), false),
            past("Housing", 0.6, "v1", "2024-01-01T10:00:01Z", "pipeline", None, false),
            past("Shopping", 0.4, "v0", "2023-12-01T00:00:00Z", "migrated", None, true),
        ],
        "truncated": false,
    })
}

fn history(database: &TestDatabase, args: &[&str]) -> std::process::Output {
    run(txnflow().args(["models", "history"]).args(args).env("TXNFLOW__DB__URL", &database.url))
}

#[test]
fn models_history_lists_one_transactions_predictions_newest_first_across_the_archive() {
    let database = TestDatabase::migrated();
    seed(&database);

    // By source id and by UUID alike.
    for id in ["1".to_string(), canonical_id("1").unwrap().to_string()] {
        let output = history(&database, &[&id, "--format", "json"]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout(&output)).unwrap(), expected_one());
    }

    let output = history(&database, &["1", "--limit", "2", "--format", "json"]);
    let limited: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(limited["history"], json!(expected_one()["history"].as_array().unwrap()[..2]));
    assert_eq!(limited["truncated"], true);

    let output = history(&database, &["1"]);
    let lines: Vec<String> = stdout(&output).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 6, "the current line, a header and 4 predictions:\n{}", lines.join("\n"));
    assert!(lines[0].ends_with("current Utilities (0.800, v2, 2024-03-01T00:00:00Z)"), "{}", lines[0]);
    assert!(lines[2].starts_with("2024-04-01T00:00:00Z  v3"), "{}", lines[2]);
    assert!(lines[5].starts_with("2023-12-01T00:00:00Z  v0") && lines[5].ends_with("yes"), "{}", lines[5]);

    let output = history(&database, &["999"]);
    assert_eq!(output.status.code(), Some(1));
    let unknown = canonical_id("999").unwrap();
    assert!(stderr(&output).contains(&format!("no transaction {unknown} is stored")), "{}", stderr(&output));

    let output = history(&database, &[&"x".repeat(300)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("transaction id: longer than 200 characters (300)"), "{}", stderr(&output));
}

#[tokio::test]
async fn the_admin_server_answers_one_transactions_predictions() {
    let scenario = Scenario::new("lookup").await;
    let service = scenario.start_service(&[]).await;
    seed(&scenario.db);
    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{}{path}", service.admin);
        async move {
            let answer = client.get(url).send().await.unwrap();
            (answer.status().as_u16(), answer.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(get("/transactions/1/predictions".into()).await, (200, expected_one()));
    let (status, limited) = get("/transactions/1/predictions?limit=1".into()).await;
    assert_eq!((status, limited["history"].as_array().unwrap().len(), &limited["truncated"]), (200, 1, &json!(true)));
    let (status, unknown) = get("/transactions/999/predictions".into()).await;
    assert_eq!((status, &unknown["stored"], &unknown["history"]), (404, &json!(false), &json!([])));
    let (status, refused) = get("/transactions/1/predictions?limit=0".into()).await;
    assert_eq!((status, refused), (400, json!({"error": "limit must be between 1 and 1000"})));
    let (status, refused) = get(format!("/transactions/{}/predictions", "x".repeat(300))).await;
    assert_eq!((status, refused), (400, json!({"error": "transaction id: longer than 200 characters (300)"})));
}
