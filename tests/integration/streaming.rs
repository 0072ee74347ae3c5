//! The streaming pipeline against the real stack.

use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

use crate::helpers::assert_same_set;
use crate::scenario::{Scenario, ids_of, invalid_events, valid_events};
use txnflow::domain::categories::reference_category;

const HEADERS: [&str; 8] =
    ["error_type", "error_message", "stage", "failed_at", "attempts", "source", "run_id", "service"];

/// Acceptance 1: 20,000 valid and 1,000 invalid events, then the same again.
#[tokio::test]
async fn every_event_ends_in_exactly_one_place_and_replays_change_nothing() {
    let scenario = Scenario::new("happy").await;
    let valid = valid_events(1, 20_000);
    let invalid = invalid_events(2, 1_000);
    let mut events = valid.clone();
    events.extend(invalid.iter().cloned());
    // Mix the bad records in among the good ones.
    events.sort_by(|a, b| a.0.cmp(&b.0));
    let mut service = scenario.start_service(&[]).await;
    let sent = scenario.produce(&events).await;
    let ends = Scenario::end_offsets(&sent);

    let committed = scenario.wait_committed(&ends, Duration::from_secs(180)).await;
    assert_eq!(committed, ends, "committed offsets equal the end offsets; log:\n{}", service.log_tail());
    assert_same_set(&scenario.transaction_ids(), &ids_of(&valid), "stored transaction ids");
    let predictions = scenario.predictions();
    assert_eq!(predictions.len(), 20_000);
    for (id, category) in &predictions {
        assert_eq!(category, reference_category(*id), "the reference category of {id}");
    }

    let dlq = scenario.dlq(1_000);
    assert_eq!(dlq.len(), 1_000, "exactly the invalid records are dead-lettered");
    let dead_keys: BTreeSet<&str> = dlq.iter().map(|r| r.key.as_str()).collect();
    let invalid_keys: BTreeSet<&str> = invalid.iter().map(|(key, _)| key.as_str()).collect();
    assert_same_set(&dead_keys, &invalid_keys, "dead-lettered keys");
    let by_key: std::collections::HashMap<&str, &Vec<u8>> = invalid.iter().map(|(k, v)| (k.as_str(), v)).collect();
    for record in &dlq {
        let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, HEADERS, "the DLQ headers, in order");
        let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).unwrap().1.as_str();
        assert_eq!(header("error_type"), "invalid");
        assert!(["decode", "validate"].contains(&header("stage")));
        assert_eq!(header("attempts"), "1");
        assert!(header("source").starts_with(&format!("{}/", scenario.topic)));
        assert!(chrono::DateTime::parse_from_rfc3339(header("failed_at")).is_ok());
        assert_eq!(header("service"), txnflow::SERVICE);
        assert!(!header("error_message").is_empty());
        assert_eq!(&record.value, by_key[record.key.as_str()], "the original bytes, unchanged");
    }

    // The same 21,000 events again: nothing changes in the database.
    let again = scenario.produce(&events).await;
    let ends = Scenario::end_offsets(&again);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(180)).await, ends);
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 20_000);
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 20_000);
    assert_eq!(service.signal("TERM", Duration::from_secs(30)).map(|s| s.code()), Some(Some(0)));
}

/// Lineage: streaming rows carry their processing type and Kafka source.
#[tokio::test]
async fn streaming_rows_carry_their_lineage() {
    let scenario = Scenario::new("lineage").await;
    let events = valid_events(3, 10);
    let _service = scenario.start_service(&[]).await;
    let sent = scenario.produce(&events).await;
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    let rows = crate::helpers::query_json(
        &mut scenario.db.connect(),
        "SELECT id, processing_type, run_id, batch_id, source FROM transactions",
    );
    assert_eq!(rows.len(), 10);
    for row in rows {
        let id = Uuid::parse_str(row["id"].as_str().unwrap()).unwrap();
        let sent = sent.iter().find(|s| s.key == id.to_string()).unwrap();
        assert_eq!(row["processing_type"], "streaming");
        assert_eq!(row["run_id"], serde_json::Value::Null);
        assert_eq!(row["source"], format!("{}/{}/{}", scenario.topic, sent.partition, sent.offset));
    }
}

/// The metric families, as `/metrics` must name them.
pub const METRIC_FAMILIES: [&str; 14] = [
    "txnflow_records_total",
    "txnflow_buffer_depth",
    "txnflow_flush_size",
    "txnflow_flush_duration_seconds",
    "txnflow_ml_api_latency_seconds",
    "txnflow_ml_api_batch_size",
    "txnflow_circuit_breaker_state",
    "txnflow_circuit_breaker_transitions_total",
    "txnflow_dlq_records_total",
    "txnflow_db_write_duration_seconds",
    "txnflow_db_pool_connections",
    "txnflow_consumer_lag",
    "txnflow_actor_restarts_total",
    "txnflow_in_flight_records",
];

/// Acceptance 2: flushes on size or time; the metrics show the flush sizes.
#[tokio::test]
async fn the_buffer_flushes_on_size_or_time() {
    let scenario = Scenario::new("flush").await;
    let service = scenario
        .start_service(&[("TXNFLOW__BUFFER__MAX_RECORDS", "100"), ("TXNFLOW__BUFFER__MAX_WAIT_MS", "200")])
        .await;
    // A first event waits for the consumer group join; the second is timed.
    let lone = valid_events(61, 2);
    scenario.produce(&lone[..1]).await;
    assert!(scenario.wait_for(Duration::from_secs(30), |s| s.count("SELECT count(*) FROM transactions") == 1).await);
    let started = std::time::Instant::now();
    scenario.produce(&lone[1..]).await;
    assert!(scenario.wait_for(Duration::from_secs(30), |s| s.count("SELECT count(*) FROM transactions") == 2).await);
    // Measured, not asserted: timing never decides a test.
    eprintln!("a lone event was stored {} ms after it was produced", started.elapsed().as_millis());
    assert_eq!(service.metric("txnflow_flush_size_count{trigger=\"time\"}").await, 2.0, "each lone event left on time");
    assert_eq!(service.metric("txnflow_flush_size_sum{trigger=\"time\"}").await, 2.0);
    assert_eq!(service.metric("txnflow_flush_size_count{trigger=\"size\"}").await, 0.0);

    scenario.produce(&valid_events(62, 1_000)).await;
    assert!(
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM transactions") == 1_002).await
    );
    let mut flushed = 0.0;
    let mut flushes = 0.0;
    for trigger in ["size", "time", "forced"] {
        flushed += service.metric(&format!("txnflow_flush_size_sum{{trigger=\"{trigger}\"}}")).await;
        flushes += service.metric(&format!("txnflow_flush_size_count{{trigger=\"{trigger}\"}}")).await;
    }
    let size_flushes = service.metric("txnflow_flush_size_count{trigger=\"size\"}").await;
    eprintln!("1,002 records in {flushes} flushes, {size_flushes} of them full");
    assert_eq!(flushed, 1_002.0, "every record flushed exactly once");
    // At most 100 per flush, so at least 12 flushes; far fewer than one per record.
    assert!((12.0..=102.0).contains(&flushes), "{flushes} flushes");
    assert!(size_flushes >= 1.0);

    // Every metric family is exported (the lag once librdkafka's statistics arrive).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let has_all = |text: &str| METRIC_FAMILIES.iter().all(|family| text.contains(&format!("# TYPE {family} ")));
    while !has_all(&service.metrics().await) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = service.metrics().await;
    let missing: Vec<&str> =
        METRIC_FAMILIES.iter().copied().filter(|f| !text.contains(&format!("# TYPE {f} "))).collect();
    assert!(missing.is_empty(), "families missing from /metrics: {missing:?}");
}

/// Deliver 3: with `kafka.predictions_topic` set, every written prediction,
/// from a flush or from the backfill, is published once, keyed by id.
#[tokio::test]
async fn written_predictions_fan_out_to_the_predictions_topic() {
    let scenario = Scenario::new("fanout").await;
    let predictions_topic = format!("{}-predictions", scenario.topic);
    let service = scenario
        .start_service(&[
            ("TXNFLOW__KAFKA__PREDICTIONS_TOPIC", predictions_topic.as_str()),
            ("TXNFLOW__PREDICT__MAX_RETRIES", "1"),
            ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "100"),
        ])
        .await;
    // 300 predicted in their flush, then 100 while the API fails, which the
    // backfill predicts once it is back.
    let flushed = valid_events(71, 300);
    let ends = Scenario::end_offsets(&scenario.produce(&flushed).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "log:\n{}", service.log_tail());
    scenario.set_faults(serde_json::json!({"error_rate": 1.0})).await;
    let backfilled = valid_events(72, 100);
    let ends = Scenario::end_offsets(&scenario.produce(&backfilled).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 300, "the last 100 wait for the backfill");
    scenario.set_faults(serde_json::json!({"error_rate": 0.0})).await;
    assert!(scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == 400).await);

    let published = crate::helpers::read_topic(&predictions_topic, 1, 400, Duration::from_secs(30));
    let mut expected = ids_of(&flushed);
    expected.extend(ids_of(&backfilled));
    let keys: BTreeSet<Uuid> = published.iter().map(|r| Uuid::parse_str(&r.key).unwrap()).collect();
    assert_same_set(&keys, &expected, "published prediction keys");
    assert_eq!(published.len(), 400, "one message per prediction");
    for record in &published {
        let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        let id = Uuid::parse_str(&record.key).unwrap();
        assert_eq!(value["transaction_id"], record.key);
        assert_eq!(value["category"], reference_category(id));
        // The compact answer names no model, so `predict.default_model_version` applies.
        assert_eq!(value["model_version"], "unknown");
        assert!(value["confidence_score"].as_f64().is_some_and(|c| (0.0..=1.0).contains(&c)));
    }
}

/// The lag of every partition a reader holds is exported from its
/// assignment: 0 while idle, never absent; and 0 again once a load is
/// committed. Sampled from `/metrics`.
#[tokio::test]
async fn consumer_lag_is_exported_for_every_assigned_partition_from_the_start() {
    let scenario = Scenario::new("lag").await;
    let service = scenario.start_service(&[]).await;
    assert!(service.wait_assigned(std::time::Duration::from_secs(60)).await, "{}", service.log_tail());
    let lags = |text: &str| -> Vec<(String, f64)> {
        let prefix = "txnflow_consumer_lag{partition=\"".to_string();
        text.lines()
            .filter(|line| line.starts_with(&prefix) && line.contains(&scenario.topic))
            .map(|line| {
                let partition = line[prefix.len()..].split('"').next().unwrap().to_string();
                (partition, line.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    };
    let idle = lags(&service.metrics().await);
    assert_eq!(
        idle,
        [("0".to_string(), 0.0), ("1".to_string(), 0.0), ("2".to_string(), 0.0)],
        "every partition held, idle: 0"
    );
    // Writes held for 30 s each (a trigger sleeps), so nothing commits for
    // a while: the lag must then be the whole load, exactly.
    diesel::connection::SimpleConnection::batch_execute(
        &mut scenario.db.connect(),
        "CREATE FUNCTION hold_writes() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$
         LANGUAGE plpgsql;
         CREATE TRIGGER hold_writes BEFORE INSERT ON transactions FOR EACH STATEMENT EXECUTE FUNCTION hold_writes();",
    )
    .unwrap();
    let events = crate::scenario::valid_events(1301, 600);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = lags(&service.metrics().await);
        if seen.iter().map(|(_, lag)| *lag).sum::<f64>() == 600.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let expected: Vec<(String, f64)> = ends.iter().map(|(p, end)| (p.to_string(), *end as f64)).collect();
    assert_eq!(seen, expected, "while nothing is committed, each partition's lag is its end offset");
    diesel::connection::SimpleConnection::batch_execute(
        &mut scenario.db.connect(),
        "DROP TRIGGER hold_writes ON transactions",
    )
    .unwrap();
    assert_eq!(scenario.wait_committed(&ends, std::time::Duration::from_secs(120)).await, ends);
    let mut last = Vec::new();
    for _ in 0..60 {
        last = lags(&service.metrics().await);
        if last.iter().all(|(_, lag)| *lag == 0.0) && last.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(last.iter().map(|(_, lag)| *lag).collect::<Vec<_>>(), [0.0, 0.0, 0.0], "{last:?}");
}

/// A record delivered twice into one flush (here, each event produced
/// twice in a row, so both copies sit in one partition and one flush): each
/// id is sent to the ML API once and stored once with its prediction, and
/// both copies settle as predicted; none is dead-lettered for being a repeat.
#[tokio::test]
async fn a_record_twice_in_one_flush_is_predicted_once_and_stored_once() {
    let scenario = Scenario::new("repeats").await;
    let valid = valid_events(1301, 300);
    let doubled: Vec<(String, Vec<u8>)> = valid.iter().flat_map(|event| [event.clone(), event.clone()]).collect();
    // One time flush holds the whole load: every pair is in it.
    let mut service = scenario
        .start_service(&[("TXNFLOW__BUFFER__MAX_RECORDS", "2000"), ("TXNFLOW__BUFFER__MAX_WAIT_MS", "3000")])
        .await;
    let ends = Scenario::end_offsets(&scenario.produce(&doubled).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
    assert_same_set(&scenario.transaction_ids(), &ids_of(&valid), "stored ids");
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 300, "each id once");
    let predictions = scenario.predictions();
    assert_eq!(predictions.len(), 300);
    for (id, category) in &predictions {
        assert_eq!(category, reference_category(*id), "{id}");
    }
    let metric = |outcome: &str| format!("txnflow_records_total{{outcome=\"{outcome}\",source=\"kafka\"}}");
    assert_eq!(service.metric(&metric("read")).await, 600.0);
    assert_eq!(service.metric(&metric("predicted")).await, 600.0, "both copies settle as predicted");
    let asked = service.metric("txnflow_ml_api_batch_size_sum{caller=\"pipeline\"}").await;
    assert_eq!(asked, 300.0, "each id asked of the ML API once");
    assert!(scenario.dlq(0).is_empty(), "the DLQ is empty");
    assert!(!service.has_exited());
}
