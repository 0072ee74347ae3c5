//! ML API faults (guarantees 2, 3 and 4), each with the scenario's own
//! reference server and its fault knobs.

use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::assert_same_set;
use crate::scenario::{Scenario, ids_of, valid_events};
use txnflow::domain::categories::reference_category;

/// A breaker that reacts within a test's time: 10 calls, 2 s open, quick retries.
const QUICK_BREAKER: [(&str, &str); 5] = [
    ("TXNFLOW__BREAKER__WINDOW", "10"),
    ("TXNFLOW__BREAKER__OPEN_MS", "2000"),
    ("TXNFLOW__PREDICT__MAX_RETRIES", "2"),
    ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "200"),
    ("TXNFLOW__PREDICT__TIMEOUT_MS", "2000"),
];

fn assert_all_predicted(scenario: &Scenario, expected: &BTreeSet<uuid::Uuid>) {
    let predictions = scenario.predictions();
    assert_same_set(&predictions.keys().copied().collect(), expected, "predicted ids");
    for (id, category) in predictions {
        assert_eq!(category, reference_category(id));
    }
    // Each transaction was predicted once, however many tries it took, and
    // its history row is its current prediction.
    let matching = "SELECT count(*) FROM predictions p JOIN prediction_history h USING (transaction_id)
                    WHERE (h.category, h.confidence_score, h.model_version, h.predicted_at)
                        = (p.category, p.confidence_score, p.model_version, p.predicted_at)";
    assert_eq!(scenario.count(matching), expected.len() as i64, "a history row per current prediction");
    assert_eq!(scenario.count("SELECT count(*) FROM prediction_history"), expected.len() as i64, "and no other");
}

fn dlq_types(records: &[crate::helpers::ReadRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.headers.iter().find(|(k, _)| k == "error_type").unwrap().1.clone()).collect()
}

#[tokio::test]
async fn a_30_percent_error_rate_loses_nothing() {
    let scenario = Scenario::new("errors30").await;
    scenario.set_faults(json!({"error_rate": 0.3})).await;
    let events = valid_events(11, 2_000);
    let expected = ids_of(&events);
    let service = scenario.start_service(&[("TXNFLOW__BREAKER__FAILURE_RATE", "0.9")]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_same_set(&scenario.transaction_ids(), &expected, "stored ids");
    let covered =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 2_000).await;
    assert!(covered, "all 2,000 predicted, by retries or backfill; log:\n{}", service.log_tail());
    assert_all_predicted(&scenario, &expected);
}

#[tokio::test]
async fn an_api_outage_opens_the_breaker_writes_anyway_and_backfills() {
    let scenario = Scenario::new("outage").await;
    let service = scenario.start_service(&QUICK_BREAKER).await;
    scenario.set_faults(json!({"error_rate": 1.0})).await;
    let outage = std::time::Instant::now();
    let events = valid_events(12, 1_000);
    let expected = ids_of(&events);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(
        scenario.wait_committed(&ends, Duration::from_secs(120)).await,
        ends,
        "ingestion never waits on the API"
    );
    assert_same_set(&scenario.transaction_ids(), &expected, "transactions written while the API is down");
    assert!(
        service.metric("txnflow_circuit_breaker_transitions_total{to=\"open\"}").await >= 1.0,
        "the breaker opened"
    );
    let dlq = scenario.dlq(1_000);
    assert_eq!(dlq.len(), 1_000, "each unpredicted record is dead-lettered once");
    assert_eq!(dlq_types(&dlq), BTreeSet::from(["prediction_failed".to_string()]));
    let dead: BTreeSet<uuid::Uuid> = dlq.iter().map(|r| r.key.parse().unwrap()).collect();
    assert_same_set(&dead, &expected, "prediction_failed keys");
    for record in &dlq {
        let stage = &record.headers.iter().find(|(k, _)| k == "stage").unwrap().1;
        assert_eq!(stage, "predict");
    }

    // The outage lasts 10 s (the scenario, not a timing check); then the API
    // comes back and coverage returns to 100% with no operator action.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 0, "nothing is predicted while the API is down");
    scenario.set_faults(json!({"error_rate": 0.0})).await;
    let covered =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 1_000).await;
    assert!(covered, "backfill completes; log:\n{}", service.log_tail());
    assert_all_predicted(&scenario, &expected);
    assert_eq!(scenario.count("SELECT count(*) FROM unprocessed_transactions"), 0);
}

#[tokio::test]
async fn malformed_answers_and_dropped_items_are_handled_per_record() {
    let scenario = Scenario::new("malformed").await;
    scenario.set_faults(json!({"malformed_rate": 0.3, "drop_rate": 0.2})).await;
    let events = valid_events(13, 2_000);
    let expected = ids_of(&events);
    let service = scenario.start_service(&[]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends);
    assert_same_set(&scenario.transaction_ids(), &expected, "stored ids");
    let failed = service.metric("txnflow_dlq_records_total{error_type=\"prediction_failed\"}").await;
    assert!(failed > 0.0, "some records lost their prediction to the faults");
    scenario.set_faults(json!({"malformed_rate": 0.0, "drop_rate": 0.0})).await;
    let covered =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 2_000).await;
    assert!(covered, "backfill completes; log:\n{}", service.log_tail());
    assert_all_predicted(&scenario, &expected);
}

#[tokio::test]
async fn a_poison_record_is_the_only_one_dead_lettered() {
    let scenario = Scenario::new("poison").await;
    scenario.set_faults(json!({"poison_marker": "POISON"})).await;
    let mut events = valid_events(14, 500);
    let mut poison: serde_json::Value = serde_json::from_slice(&events[250].1).unwrap();
    poison["description"] = json!("Card expense at POISON");
    let poison_key = events[250].0.clone();
    events[250].1 = poison.to_string().into_bytes();
    let service = scenario
        .start_service(&[("TXNFLOW__BUFFER__MAX_RECORDS", "500"), ("TXNFLOW__BUFFER__MAX_WAIT_MS", "2000")])
        .await;
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    assert_eq!(scenario.transaction_ids().len(), 500, "the poison transaction is stored too");
    let mut expected = ids_of(&events);
    expected.remove(&poison_key.parse().unwrap());
    assert_all_predicted(&scenario, &expected);
    let dlq = scenario.dlq(1);
    assert_eq!(dlq.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), [poison_key.as_str()], "{}", service.log_tail());
    let message = &dlq[0].headers.iter().find(|(k, _)| k == "error_message").unwrap().1;
    assert!(message.starts_with("rejected by the ML API (422)"), "{message}");
}

/// `txnflow dlq replay` brings prediction_failed records back through the
/// pipeline: they get predicted, and no row is duplicated.
#[tokio::test]
async fn dlq_replay_predicts_failed_records_without_duplicates() {
    let scenario = Scenario::new("replay").await;
    let mut env = QUICK_BREAKER.to_vec();
    env.push(("TXNFLOW__PREDICT__BACKFILL_INTERVAL_MS", "3600000"));
    let service = scenario.start_service(&env).await;
    scenario.set_faults(json!({"error_rate": 1.0})).await;
    let events = valid_events(15, 300);
    let expected = ids_of(&events);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    assert_eq!(scenario.dlq(300).len(), 300);
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 0, "the backfill is off in this test");

    scenario.set_faults(json!({"error_rate": 0.0})).await;
    let output = crate::helpers::run(
        crate::helpers::txnflow()
            .args(["dlq", "replay", "--idle-ms", "3000", "--error-type", "prediction_failed", "--group"])
            .arg(format!("{}-replay", scenario.topic))
            .env("TXNFLOW__KAFKA__BROKERS", crate::helpers::brokers())
            .env("TXNFLOW__KAFKA__TOPIC", &scenario.topic)
            .env("TXNFLOW__KAFKA__DLQ_TOPIC", &scenario.dlq_topic)
            .env("TXNFLOW__DB__URL", &scenario.db.url),
    );
    assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    // Records replayed while the breaker is still open fail again, return to
    // the DLQ and are replayed again in the same run: at least 300.
    let summary = crate::helpers::stdout(&output);
    let replayed: u64 = summary.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(replayed >= 300 && summary.trim().ends_with("skipped 0"), "{summary}");
    let covered =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 300).await;
    assert!(covered, "{}", service.log_tail());
    assert_all_predicted(&scenario, &expected);
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 300, "replaying duplicated nothing");
}

/// The backfill's scans so far, by reason, from `/metrics`.
async fn backfill_scans(service: &crate::scenario::Service) -> std::collections::BTreeMap<String, f64> {
    let text = service.metrics().await;
    text.lines()
        .filter_map(|line| line.strip_prefix("txnflow_backfill_scans_total{reason=\""))
        .filter_map(|rest| rest.split_once("\"} "))
        .map(|(reason, value)| (reason.to_string(), value.parse().unwrap()))
        .collect()
}

/// The scan for unpredicted rows reads the whole table, so the backfill
/// makes it only with a reason: once at start, then after rows were
/// stored without a prediction (or their retry is due), never on a quiet
/// tick; and coverage returns to 100% without the periodic scan.
#[tokio::test]
async fn the_backfill_scans_the_table_only_when_there_is_reason_to() {
    let scenario = Scenario::new("backfill-scans").await;
    let mut env = QUICK_BREAKER.to_vec();
    env.push(("TXNFLOW__PREDICT__BACKFILL_INTERVAL_MS", "200"));
    let service = scenario.start_service(&env).await;
    let healthy = valid_events(16, 300);
    let ends = Scenario::end_offsets(&scenario.produce(&healthy).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    assert_all_predicted(&scenario, &ids_of(&healthy));
    // 15 ticks of 200 ms with nothing to find (a span of the scenario, not
    // a timing check): the start scan is the only one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start_only = std::collections::BTreeMap::from([("start".to_string(), 1.0)]);
    assert_eq!(backfill_scans(&service).await, start_only, "no scan on a quiet tick");

    scenario.set_faults(json!({"error_rate": 1.0})).await;
    let unpredicted = valid_events(17, 300);
    let ends = Scenario::end_offsets(&scenario.produce(&unpredicted).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    scenario.set_faults(json!({"error_rate": 0.0})).await;
    let covered =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 600).await;
    assert!(covered, "backfill completes; log:\n{}", service.log_tail());
    let mut expected = ids_of(&healthy);
    expected.extend(ids_of(&unpredicted));
    assert_all_predicted(&scenario, &expected);
    let scans = backfill_scans(&service).await;
    assert_eq!(scans.get("start"), Some(&1.0), "{scans:?}");
    assert_eq!(scans.get("periodic"), None, "coverage came back without the periodic scan: {scans:?}");
    assert!(scans.contains_key("stored_unpredicted"), "{scans:?}");
    let kinds = "SELECT count(*) FROM prediction_history WHERE kind = ";
    assert_eq!(scenario.count(&format!("{kinds}'pipeline'")), 300, "the healthy 300, predicted in their flush");
    assert_eq!(scenario.count(&format!("{kinds}'backfill'")), 300, "the 300 stored unpredicted");
}
