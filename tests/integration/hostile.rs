//! Hostile input and permanent failures (guarantee 9): no record can
//! stall a partition, a run or the service, and each still ends in exactly
//! one place with its reason. Every case asserts exact outcomes, committed
//! offsets equal to the end offsets, a healthy service afterwards, and
//! prints its figures (peak RSS among them) on one `hostile |` line.

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::helpers::{assert_same_set, kafka_config_for, query_json};
use crate::scenario::{Scenario, Sent, Service, ids_of, valid_events};

/// A backfill that gives up within a test's time.
const QUICK_BACKFILL: [(&str, &str); 4] = [
    ("TXNFLOW__PREDICT__BACKFILL_INTERVAL_MS", "300"),
    ("TXNFLOW__BACKFILL__MAX_ATTEMPTS", "3"),
    ("TXNFLOW__BACKFILL__INITIAL_BACKOFF_MS", "300"),
    ("TXNFLOW__BACKFILL__MAX_BACKOFF_MS", "1000"),
];

fn source_of(scenario: &Scenario, sent: &Sent) -> String {
    format!("{}/{}/{}", scenario.topic, sent.partition, sent.offset)
}

/// After a case: every offset committed, and the service still answers.
async fn assert_healthy(scenario: &Scenario, service: &mut Service, sent: &[Sent]) {
    let ends = Scenario::end_offsets(sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert!(!service.has_exited(), "the service is still running");
    let ready = reqwest::get(format!("{}/ready", service.admin)).await.unwrap().status().as_u16();
    assert_eq!(ready, 200, "the service is ready after the case");
}

fn event_with(seed: u64, change: impl FnOnce(&mut serde_json::Value)) -> (String, Vec<u8>) {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(seed, 0.0);
    let mut event = generator.valid_event();
    change(&mut event);
    (event["id"].as_str().unwrap().to_string(), event.to_string().into_bytes())
}

/// Case 1 (and field bounds): a 9 KB run_id, a 2,000-character description
/// and a 300-character merchant among 1,000 good events: the three are
/// invalid with their field named, the 1,000 are stored and predicted.
#[tokio::test]
async fn oversized_fields_are_invalid_and_the_rest_flows() {
    let scenario = Scenario::new("hostile-fields").await;
    let mut service = scenario.start_service(&[]).await;
    let good = valid_events(1101, 1_000);
    let bad = [
        event_with(1, |e| e["run_id"] = json!("r".repeat(9_000))),
        event_with(2, |e| e["description"] = json!("d".repeat(2_000))),
        event_with(3, |e| e["merchant"] = json!("m".repeat(300))),
    ];
    let mut events = good.clone();
    events.splice(500..500, bad.iter().cloned());
    let sent = scenario.produce(&events).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.transaction_ids(), &ids_of(&good), "stored ids");
    let covered = scenario.wait_for(Duration::from_secs(60), |s| s.predictions().len() == 1_000).await;
    assert!(covered, "{}", service.log_tail());
    let dlq = scenario.dlq(3);
    let reasons: BTreeSet<(String, String, String)> = dlq
        .iter()
        .map(|r| (r.key.clone(), r.header("error_type").to_string(), r.header("error_message").to_string()))
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        (bad[0].0.clone(), "invalid".into(), "run_id: longer than 200 characters (9000)".into()),
        (bad[1].0.clone(), "invalid".into(), "description: longer than 1000 characters (2000)".into()),
        (bad[2].0.clone(), "invalid".into(), "merchant: longer than 255 characters (300)".into()),
    ]
    .into();
    assert_eq!(reasons, expected);
    for record in &dlq {
        let original = &bad.iter().find(|(key, _)| *key == record.key).unwrap().1;
        assert_eq!(&record.value, original, "the DLQ keeps the original bytes");
    }
    eprintln!(
        "hostile | 9 KB run_id, 2,000-char description, 300-char merchant among 1,000 | stored 1000, invalid 3 (DLQ), \
         committed = end | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Case 2 and 9: a 600 KB field and a 2 MB event. Both are over
/// kafka.max_record_bytes, so neither is decoded: both are invalid. The
/// 600 KB one fits the DLQ topic; the 2 MB one is over the producer's
/// 1 MB message limit, so the DLQ refuses it for good and it is stored in
/// the dead_letters table, from which `txnflow dlq` lists and replays it.
#[tokio::test]
async fn records_over_the_byte_bound_go_to_the_dlq_or_the_dead_letter_table() {
    let scenario = Scenario::new("hostile-bytes").await;
    let mut service = scenario.start_service(&[]).await;
    let good = valid_events(1102, 200);
    let big_field = event_with(4, |e| e["description"] = json!("x".repeat(600_000)));
    let big_event = event_with(5, |e| e["padding"] = json!("p".repeat(2_000_000)));
    // The input topic takes records up to 10 MB (the broker's default is
    // 1 MiB), as a topic of large events would; the DLQ topic keeps 1 MiB.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        txnflow::kafka::client_config(&kafka_config_for(&scenario.brokers)).create().unwrap();
    let large = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&scenario.topic))
        .set("max.message.bytes", "10000000");
    let altered = admin.alter_configs(&[large], &rdkafka::admin::AdminOptions::new()).await.unwrap();
    assert!(altered.iter().all(Result::is_ok), "max.message.bytes set: {altered:?}");
    // The test's own producer may send 2 MB; txnflow's DLQ producer keeps librdkafka's 1 MB.
    let producer: FutureProducer = txnflow::kafka::client_config(&kafka_config_for(&scenario.brokers))
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    let mut sent = scenario.produce(&good[..100]).await;
    let mut hostile = Vec::new();
    // The 2 MB one comes with a traceparent, which its stored dead letter keeps.
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (key, value) in [&big_field, &big_event] {
        let mut record = FutureRecord::to(&scenario.topic).key(key).payload(value);
        if key == &big_event.0 {
            let header = rdkafka::message::Header { key: "traceparent", value: Some(traceparent) };
            record = record.headers(rdkafka::message::OwnedHeaders::new().insert(header));
        }
        let delivery = producer.send(record, Duration::from_secs(30)).await.expect("the broker takes the large event");
        hostile.push(Sent { key: key.clone(), partition: delivery.partition, offset: delivery.offset });
    }
    sent.extend(hostile.iter().cloned());
    sent.extend(scenario.produce(&good[100..]).await);
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.transaction_ids(), &ids_of(&good), "stored ids");

    let dlq = scenario.dlq(1);
    assert_eq!(dlq.len(), 1, "only the 600 KB record fits the DLQ topic");
    assert_eq!(dlq[0].key, big_field.0);
    assert_eq!(dlq[0].value, big_field.1, "unchanged");
    assert_eq!(dlq[0].header("source"), source_of(&scenario, &hostile[0]));
    assert_eq!(
        dlq[0].header("error_message"),
        format!("record of {} bytes, over kafka.max_record_bytes (65536)", big_field.1.len())
    );
    let stored = query_json(
        &mut scenario.db.connect(),
        "SELECT encode(record_key, 'escape') AS key, length(record_value) AS bytes, error_type, error_message, stage,
                source, refused_by LIKE 'too large%' AS too_large, replayed_at, traceparent FROM dead_letters",
    );
    assert_eq!(
        stored,
        [json!({
            "traceparent": traceparent,
            "key": big_event.0,
            "bytes": big_event.1.len(),
            "error_type": "invalid",
            "error_message": format!("record of {} bytes, over kafka.max_record_bytes (65536)", big_event.1.len()),
            "stage": "decode",
            "source": source_of(&scenario, &hostile[1]),
            "too_large": true,
            "replayed_at": null,
        })]
    );
    assert_eq!(service.metric("txnflow_dead_letters_stored_total{error_type=\"invalid\"}").await, 1.0);
    let db_env = [("TXNFLOW__DB__URL", scenario.db.url.as_str())];
    let list = crate::helpers::run(crate::helpers::txnflow().args(["dlq", "list"]).envs(db_env));
    assert!(list.status.success(), "{}", crate::helpers::stderr(&list));
    let listed = crate::helpers::stdout(&list);
    assert_eq!(listed.lines().count(), 2, "a header and the one row: {listed}");
    assert!(listed.contains(&source_of(&scenario, &hostile[1])), "{listed}");
    assert!(!listed.contains("ppppppppp"), "the list never prints the record");
    eprintln!(
        "hostile | 600 KB field, 2 MB event among 200 | stored 200, 600 KB one in the DLQ topic, 2 MB one in \
         dead_letters, committed = end | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Case 3: the API reports a 300-character model_version, longer than its
/// column. Ingestion does not wait on it: every transaction is stored,
/// each prediction fails with the reason, and the backfill, meeting the
/// same answer, gives up after backfill.max_attempts.
#[tokio::test]
async fn a_model_version_longer_than_its_column_costs_the_predictions_only() {
    let scenario = Scenario::new("hostile-model").await;
    scenario.set_faults(json!({"extended": true, "model_version": "v".repeat(300)})).await;
    let mut service = scenario.start_service(&QUICK_BACKFILL).await;
    let events = valid_events(1103, 200);
    let sent = scenario.produce(&events).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    let expected = ids_of(&events);
    assert_same_set(&scenario.transaction_ids(), &expected, "every transaction stored");
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 0);
    let dlq = scenario.dlq(200);
    assert_eq!(dlq.len(), 200);
    for record in &dlq {
        assert_eq!(record.header("error_type"), "prediction_failed");
        assert_eq!(record.header("error_message"), "model_version longer than 50 characters (300)");
    }
    let keys: BTreeSet<Uuid> = dlq.iter().map(|r| r.key.parse().unwrap()).collect();
    assert_same_set(&keys, &expected, "dead-lettered keys");
    let refused = scenario
        .wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM refused_predictions") == 200)
        .await;
    assert!(refused, "the backfill gives up on all 200; log:\n{}", service.log_tail());
    let attempts =
        query_json(&mut scenario.db.connect(), "SELECT DISTINCT attempts, last_error FROM refused_predictions");
    assert_eq!(attempts, [json!({"attempts": 3, "last_error": "model_version longer than 50 characters (300)"})]);
    assert_eq!(service.metric("txnflow_backfill_refused_total").await, 200.0);
    eprintln!(
        "hostile | 300-char model_version from the API, 200 events | stored 200, prediction_failed 200, refused \
         after 3 backfill attempts 200 | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Case 6: one transaction the API answers 500 for, forever, among 500.
/// The failing batch is split while the API answers the others, so only
/// that record fails; the breaker never opens; the backfill gives it up.
#[tokio::test]
async fn a_record_the_api_always_fails_with_500_is_isolated() {
    a_record_the_api_always_fails_on_is_isolated("500", json!({"marker_status": 500}), &[]).await;
}

/// The same with 429 (too many requests) for that one record: isolated
/// like a 5xx, never holding its whole batch.
#[tokio::test]
async fn a_record_the_api_always_answers_429_for_is_isolated() {
    a_record_the_api_always_fails_on_is_isolated("429", json!({"marker_status": 429}), &[]).await;
}

/// The same with 408 (request timeout).
#[tokio::test]
async fn a_record_the_api_always_answers_408_for_is_isolated() {
    a_record_the_api_always_fails_on_is_isolated("408", json!({"marker_status": 408}), &[]).await;
}

/// The same with no answer in time: a request holding that record is
/// answered 3 s late, past `predict.timeout_ms` (500 ms).
#[tokio::test]
async fn a_record_the_api_never_answers_in_time_is_isolated() {
    let late = json!({"marker_latency_ms": 3_000});
    a_record_the_api_always_fails_on_is_isolated("timeout", late, &[("TXNFLOW__PREDICT__TIMEOUT_MS", "500")]).await;
}

/// One record among 500 that the API fails every request for with
/// `faults` (added to the poison marker), under `env`.
async fn a_record_the_api_always_fails_on_is_isolated(name: &str, faults: Value, env: &[(&str, &str)]) {
    let scenario = Scenario::new(&format!("hostile-{name}")).await;
    let mut knobs = json!({"poison_marker": "SERVER-KILLER"});
    knobs.as_object_mut().unwrap().extend(faults.as_object().unwrap().clone());
    scenario.set_faults(knobs).await;
    let mut all_env = QUICK_BACKFILL.to_vec();
    all_env.extend([("TXNFLOW__PREDICT__MAX_RETRIES", "1"), ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "100")]);
    all_env.extend_from_slice(env);
    let mut service = scenario.start_service(&all_env).await;
    let mut events = valid_events(1106, 500);
    let mut poison: serde_json::Value = serde_json::from_slice(&events[250].1).unwrap();
    poison["description"] = json!("Card expense at SERVER-KILLER");
    events[250].1 = poison.to_string().into_bytes();
    let poison_id: Uuid = events[250].0.parse().unwrap();
    let sent = scenario.produce(&events).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.transaction_ids(), &ids_of(&events), "all 500 stored");
    let mut others = ids_of(&events);
    others.remove(&poison_id);
    let predicted = scenario.wait_for(Duration::from_secs(60), |s| s.predictions().len() == 499).await;
    assert!(predicted, "{}", service.log_tail());
    assert_same_set(&scenario.predictions().keys().copied().collect(), &others, "predicted ids");
    let dlq = scenario.dlq(1);
    assert_eq!(dlq.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), [poison_id.to_string()]);
    assert!(
        dlq[0].header("error_message").starts_with("the ML API fails on this record while it answers others"),
        "{}",
        dlq[0].header("error_message")
    );
    let refused =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM refused_predictions") == 1).await;
    assert!(refused, "{}", service.log_tail());
    assert_eq!(service.metric("txnflow_circuit_breaker_transitions_total{to=\"open\"}").await, 0.0, "never opened");
    eprintln!(
        "hostile | one record answered {name} forever among 500 | stored 500, predicted 499, isolated 1 \
         (prediction_failed, then refused), breaker never opened | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Case 7: 500 transactions the API refuses forever, queued in the
/// backfill ahead of 1,000 good ones (stored while the API was down). The
/// backfill predicts the 1,000 behind them, and gives the 500 up.
#[tokio::test]
async fn refused_transactions_do_not_hold_back_the_backfill() {
    let scenario = Scenario::new("hostile-backlog").await;
    scenario.set_faults(json!({"refuse_rate": 0.5})).await;
    let mut env = QUICK_BACKFILL.to_vec();
    env.extend([
        ("TXNFLOW__BREAKER__WINDOW", "10"),
        ("TXNFLOW__BREAKER__OPEN_MS", "1000"),
        ("TXNFLOW__PREDICT__MAX_RETRIES", "1"),
        ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "100"),
    ]);
    let mut service = scenario.start_service(&env).await;
    let pool = valid_events(1107, 4_000);
    let refused: Vec<_> = pool
        .iter()
        .filter(|(key, _)| txnflow::ml::reference_api::refuses(key.parse().unwrap(), 0.5))
        .take(500)
        .cloned()
        .collect();
    let good: Vec<_> = pool
        .iter()
        .filter(|(key, _)| !txnflow::ml::reference_api::refuses(key.parse().unwrap(), 0.5))
        .take(1_000)
        .cloned()
        .collect();
    assert_eq!((refused.len(), good.len()), (500, 1_000));
    let mut sent = scenario.produce(&refused).await;
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends);
    scenario.set_faults(json!({"error_rate": 1.0})).await;
    sent.extend(scenario.produce(&good).await);
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends);
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 0);
    scenario.set_faults(json!({"error_rate": 0.0})).await;
    let done = scenario
        .wait_for(Duration::from_secs(120), |s| {
            s.predictions().len() == 1_000 && s.count("SELECT count(*) FROM refused_predictions") == 500
        })
        .await;
    assert!(done, "{}", service.log_tail());
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.predictions().keys().copied().collect(), &ids_of(&good), "the good ones are predicted");
    let refused_ids: BTreeSet<Uuid> = query_json(&mut scenario.db.connect(), "SELECT id FROM refused_predictions")
        .iter()
        .map(|row| row["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_same_set(&refused_ids, &ids_of(&refused), "the refused ones are given up");
    let dlq = scenario.dlq(1_500);
    assert_eq!(dlq.len(), 1_500, "each dead-lettered once, when the pipeline could not predict it");
    eprintln!(
        "hostile | 500 refused forever ahead of 1,000 in the backfill | predicted 1000, refused 500 after 3 attempts, \
         DLQ 1500 prediction_failed | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Case 8: two replicas backfill the same 6,000 transactions at once: every
/// one is sent to the API exactly once, across both.
#[tokio::test]
async fn two_replicas_backfill_each_transaction_once() {
    let scenario = Scenario::new("hostile-replicas").await;
    scenario.set_faults(json!({"latency_ms": 100})).await;
    // Rows inserted behind the replicas' backs are found by the periodic
    // scan, here on every tick.
    let env = [("TXNFLOW__PREDICT__BACKFILL_INTERVAL_MS", "200"), ("TXNFLOW__BACKFILL__FULL_SCAN_INTERVAL_MS", "200")];
    let first = scenario.start_service(&env).await;
    let second = scenario.start_service(&env).await;
    let started = Instant::now();
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO transactions (id, description, amount, \"timestamp\", merchant, operation_type, side, source)
             SELECT gen_random_uuid(), 'Card expense at EDF', -12.5, now(), 'EDF', 'payment', 'debit', 'test/' || i
             FROM generate_series(1, 6000) AS i",
        ),
        &mut scenario.db.connect(),
    )
    .unwrap();
    let done = scenario.wait_for(Duration::from_secs(120), |s| s.predictions().len() == 6_000).await;
    assert!(done, "{}", first.log_tail());
    let series = "txnflow_ml_api_batch_size_sum{caller=\"backfill\"}";
    let (a, b) = (first.metric(series).await, second.metric(series).await);
    assert_eq!(a + b, 6_000.0, "each transaction sent once across the replicas ({a} + {b})");
    assert_eq!(scenario.count("SELECT count(*) FROM prediction_backlog"), 0, "the backlog is empty");
    eprintln!(
        "hostile | two replicas backfilling 6,000 | sent {a} + {b} = 6000, each once, in {:.1} s | peak RSS {:.1} / {:.1} MB",
        started.elapsed().as_secs_f64(),
        first.peak_rss_mb(),
        second.peak_rss_mb()
    );
}

/// A later version's `traceparent` of 900 KB on each of 200 small
/// records and on one invalid record, tracing off: each keeps the
/// header's first 55 bytes (the four fields this version reads), its DLQ
/// copy too, every record is stored or dead-lettered, each is read once,
/// and the service's peak RSS stays under 150 MB.
#[tokio::test]
async fn a_900_kb_traceparent_costs_a_record_55_bytes() {
    let scenario = Scenario::new("hostile-traceparent").await;
    let mut service = scenario.start_service(&[]).await;
    let good = valid_events(1121, 200);
    let bad = event_with(4, |e| e["amount"] = json!("lots"));
    let mut events = good.clone();
    events.insert(100, bad.clone());
    let fields = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let huge = format!("{fields}-{}", "x".repeat(900_000));
    let headers = vec![vec![("traceparent", huge)]; events.len()];
    let sent = scenario.produce_with_headers(&events, &headers).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.transaction_ids(), &ids_of(&good), "stored ids");
    let dlq = scenario.dlq(1);
    assert_eq!(dlq.len(), 1);
    assert_eq!((dlq[0].key.as_str(), dlq[0].header("error_type")), (bad.0.as_str(), "invalid"));
    assert_eq!(dlq[0].header("traceparent"), fields, "the DLQ copy keeps the 55 bytes");
    let read = service.metric("txnflow_records_total{outcome=\"read\",source=\"kafka\"}").await;
    assert_eq!(read, 201.0, "each record read once");
    let rss = service.peak_rss_mb();
    eprintln!(
        "hostile | 900 KB traceparent (a later version) on 201 records | stored 200, invalid 1 (DLQ, traceparent 55 bytes) | peak RSS {rss:.1} MB"
    );
    assert!(rss < 150.0, "peak RSS {rss:.1} MB");
}

/// Case 10: the API answers 401. That is txnflow's configuration, not the
/// records: nothing is bisected, the breaker opens, an error names the URL
/// (without the password its user info holds), a metric counts it; every
/// transaction is stored, and none is given up.
#[tokio::test]
async fn an_api_answering_401_is_a_configuration_error() {
    let scenario = Scenario::new("hostile-401").await;
    // Every generated description has a space in it.
    scenario.set_faults(json!({"poison_marker": " ", "marker_status": 401})).await;
    let mut env = QUICK_BACKFILL.to_vec();
    let with_password = scenario.ml_api_url().replacen("http://", "http://txnflow:s3cret@", 1);
    env.extend([
        ("TXNFLOW__BREAKER__WINDOW", "10"),
        ("TXNFLOW__BREAKER__OPEN_MS", "1000"),
        ("TXNFLOW__PREDICT__URL", with_password.as_str()),
    ]);
    let mut service = scenario.start_service(&env).await;
    let events = valid_events(1110, 300);
    let sent = scenario.produce(&events).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    assert_same_set(&scenario.transaction_ids(), &ids_of(&events), "all stored");
    let dlq = scenario.dlq(300);
    assert_eq!(dlq.len(), 300);
    for record in &dlq {
        assert_eq!(record.header("error_type"), "prediction_failed");
        let message = record.header("error_message");
        assert!(
            message == "the ML API answered 401: check predict.url and its credentials"
                || message == "circuit breaker open",
            "{message}"
        );
    }
    // Several backfill rounds meet the same 401: none counts against a record.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(scenario.count("SELECT count(*) FROM refused_predictions"), 0, "nothing given up");
    // Claimed (attempt 1) and given back (0), round after round: never more.
    let most = scenario.count("SELECT coalesce(max(attempts), 0) FROM prediction_backlog");
    assert!(most <= 1, "attempts given back, at most the one in progress: {most}");
    assert!(service.metric("txnflow_ml_api_config_errors_total{status=\"401\"}").await >= 1.0);
    assert!(service.metric("txnflow_circuit_breaker_transitions_total{to=\"open\"}").await >= 1.0);
    let requests = service.metric("txnflow_ml_api_latency_seconds_count{outcome=\"misconfigured\"}").await;
    let rejected = service.metric("txnflow_ml_api_latency_seconds_count{outcome=\"rejected\"}").await;
    assert_eq!(rejected, 0.0, "a 401 is never split like a 422");
    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(log.contains("the ML API refuses txnflow") && log.contains(&scenario.ml_api_url()), "names the URL");
    assert!(!log.contains("s3cret"), "the password is never logged");
    eprintln!(
        "hostile | ML API answering 401, 300 events | stored 300, prediction_failed 300, {requests} requests (none \
         split), breaker opened, 0 given up | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Permanent database errors: a write the database keeps refusing, with an
/// error it does not class as bad data, while it answers `SELECT 1`. The
/// flush is bisected: the record it refuses is dead-lettered as
/// `persist_failed`; the one whose prediction alone is refused is stored
/// without it (`prediction_failed`), and the backfill, refused the same
/// way, gives it up. The partition goes on committing.
#[tokio::test]
async fn a_write_refused_while_the_database_answers_is_isolated() {
    let scenario = Scenario::new("hostile-db").await;
    let mut service = scenario.start_service(&QUICK_BACKFILL).await;
    diesel::connection::SimpleConnection::batch_execute(
        &mut scenario.db.connect(),
        "CREATE FUNCTION refuse_marked() RETURNS trigger AS $$
         BEGIN
             IF NEW.description LIKE '%DB-REFUSES-ME%' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_marked BEFORE INSERT ON transactions
             FOR EACH ROW EXECUTE FUNCTION refuse_marked();
         CREATE FUNCTION refuse_prediction() RETURNS trigger AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM transactions t
                        WHERE t.id = NEW.transaction_id AND t.description LIKE '%NO-PREDICTION%')
             THEN RAISE EXCEPTION 'prediction refused by a trigger'; END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse_prediction BEFORE INSERT ON predictions
             FOR EACH ROW EXECUTE FUNCTION refuse_prediction();",
    )
    .unwrap();
    let mut events = valid_events(1111, 500);
    let mark = |event: &mut (String, Vec<u8>), text: &str| {
        let mut value: serde_json::Value = serde_json::from_slice(&event.1).unwrap();
        value["description"] = json!(text);
        event.1 = value.to_string().into_bytes();
        event.0.parse::<Uuid>().unwrap()
    };
    let refused = mark(&mut events[100], "Card expense at DB-REFUSES-ME");
    let unpredictable = mark(&mut events[300], "Card expense at NO-PREDICTION");
    let sent = scenario.produce(&events).await;
    assert_healthy(&scenario, &mut service, &sent).await;
    let mut stored = ids_of(&events);
    stored.remove(&refused);
    assert_same_set(&scenario.transaction_ids(), &stored, "all but the refused one stored");
    let mut predicted = stored.clone();
    predicted.remove(&unpredictable);
    let done = scenario.wait_for(Duration::from_secs(60), |s| s.predictions().len() == 498).await;
    assert!(done, "{}", service.log_tail());
    assert_same_set(&scenario.predictions().keys().copied().collect(), &predicted, "predicted ids");
    let dlq = scenario.dlq(2);
    let outcomes: BTreeSet<(String, String, String)> = dlq
        .iter()
        .map(|r| (r.key.clone(), r.header("error_type").to_string(), r.header("stage").to_string()))
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        (refused.to_string(), "persist_failed".into(), "persist".into()),
        (unpredictable.to_string(), "prediction_failed".into(), "persist".into()),
    ]
    .into();
    assert_eq!(outcomes, expected);
    for record in &dlq {
        assert!(record.header("error_message").contains("refused by a trigger"), "{}", record.header("error_message"));
    }
    let given_up =
        scenario.wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM refused_predictions") == 1).await;
    assert!(given_up, "{}", service.log_tail());
    let row = query_json(&mut scenario.db.connect(), "SELECT id, attempts FROM refused_predictions");
    assert_eq!(row, [json!({"id": unpredictable.to_string(), "attempts": 3})]);
    eprintln!(
        "hostile | a record and a prediction the database refuses (trigger), among 500 | stored 499, predicted 498, \
         persist_failed 1, prediction_failed 1 then refused, committed = end | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// Peak RSS of the children this test process has waited for, in MB.
fn children_peak_rss_mb() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// `count` rows in the seed system's format (quoted, `;`), with their ids.
fn seed_rows(seed: u64, count: usize) -> Vec<(Uuid, String)> {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(seed, 0.0);
    (0..count)
        .map(|_| {
            let event = generator.valid_event();
            let transaction = txnflow::domain::event::parse_event(event.to_string().as_bytes()).unwrap();
            (transaction.id, txnflow::domain::csv_rules::seed_row(&transaction))
        })
        .collect()
}

/// The batch summary's numbers: read, valid, invalid, predicted, written,
/// already-stored, dead-lettered.
fn summary(output: &std::process::Output) -> Vec<u64> {
    let text = crate::helpers::stdout(output);
    text.split_whitespace().skip(1).step_by(2).take(7).map(|n| n.parse().unwrap()).collect()
}

/// `count` rows as a plain comma-separated file writes them: no quotes.
fn plain_rows(seed: u64, count: usize) -> Vec<(Uuid, String)> {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(seed, 0.0);
    (0..count)
        .map(|_| {
            let event = generator.valid_event();
            let t = txnflow::domain::event::parse_event(event.to_string().as_bytes()).unwrap();
            let row = format!(
                "{},{},{},{},{},{},{}",
                t.id,
                t.description,
                t.amount,
                t.timestamp.format("%Y-%m-%d %H:%M:%S"),
                t.merchant.as_deref().unwrap_or_default(),
                t.operation_type,
                t.side.as_str()
            );
            (t.id, row)
        })
        .collect()
}

/// Case 4: an unbalanced quote at line 10 of 100,000 rows, from S3. The
/// quote opens a field that nothing closes, so the rest of the file would
/// be one row; it grows past batch.max_record_bytes and is refused, and
/// reading goes on at line 11: the other 99,999 rows load.
#[tokio::test]
async fn an_unbalanced_quote_costs_one_row() {
    let scenario = Scenario::new("hostile-quote").await;
    let folder = crate::batch::Folder::new().await;
    let rows = plain_rows(1104, 100_000);
    let mut text = "id,description,amount,timestamp,merchant,operation_type,side\n".to_string();
    for (index, (_, row)) in rows.iter().enumerate() {
        // Line 10 is the 9th row: a quote opens its description.
        let row = if index == 8 { row.replacen(',', ",\"", 1) } else { row.clone() };
        text.push_str(&row);
        text.push('\n');
    }
    let uri = folder.put("quote.csv", text.into_bytes()).await;
    let run_id = format!("quote-{}", Uuid::new_v4().simple());
    let output = crate::batch::batch(&scenario, &[&uri, "--run-id", &run_id]);
    assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    assert_eq!(summary(&output), [100_000, 99_999, 1, 99_999, 99_999, 0, 0], "{}", crate::helpers::stdout(&output));
    let mut expected: BTreeSet<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    expected.remove(&rows[8].0);
    assert_same_set(&scenario.transaction_ids(), &expected, "every row but line 10");
    let error_file = String::from_utf8(folder.get(&format!("s3://transactions/errors/{run_id}.csv")).await).unwrap();
    let lines: Vec<&str> = error_file.lines().collect();
    assert_eq!(lines.len(), 2, "the header and line 10 only");
    assert!(lines[1].starts_with(",,,,,,,10,"), "no field of the row is repeated: {}", lines[1]);
    assert!(lines[1].contains("a row longer than batch.max_record_bytes (65536 bytes"), "{}", lines[1]);
    eprintln!(
        "hostile | unbalanced quote at line 10 of 100,000 rows (S3) | written 99999, error file 1 row (line 10), \
         exit 0 | peak RSS {:.1} MB",
        children_peak_rss_mb()
    );
}

/// Case 5: a 50 MB line among 1,000 rows, from a local file: refused
/// unread past the bound, the rows around it load, memory stays flat.
#[tokio::test]
async fn a_50_mb_line_is_refused_without_being_held() {
    let scenario = Scenario::new("hostile-line").await;
    let dir = std::env::temp_dir().join(format!("txnflow-hostile-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("line.csv");
    let rows = seed_rows(1105, 1_000);
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(file, "{}", txnflow::domain::csv_rules::SEED_HEADER).unwrap();
        for (index, (_, row)) in rows.iter().enumerate() {
            if index == 500 {
                let block = "z".repeat(1 << 20);
                for _ in 0..50 {
                    file.write_all(block.as_bytes()).unwrap();
                }
                file.write_all(b"\n").unwrap();
            }
            writeln!(file, "{row}").unwrap();
        }
    }
    let output = crate::batch::batch(&scenario, &[path.to_str().unwrap(), "--run-id", "line"]);
    assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    assert_eq!(summary(&output), [1_001, 1_000, 1, 1_000, 1_000, 0, 0], "{}", crate::helpers::stdout(&output));
    assert_same_set(&scenario.transaction_ids(), &rows.iter().map(|(id, _)| *id).collect(), "the 1,000 rows");
    let error_file = std::fs::read_to_string(dir.join("errors/line.csv")).unwrap();
    let lines: Vec<&str> = error_file.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1].starts_with(";;;;;;;502;"), "line 502 (the header is line 1): {}", lines[1]);
    assert!(error_file.len() < 1024, "the line is not copied");
    let peak = children_peak_rss_mb();
    eprintln!(
        "hostile | one 50 MB line among 1,000 rows (local) | written 1000, error file 1 row, exit 0 | peak RSS {peak:.1} MB"
    );
    assert!(peak < 50.0 * 1.5, "the 50 MB line was never held whole: peak RSS {peak:.1} MB");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Dead letters stored in the table are replayed through the pipeline by
/// `txnflow dlq replay`: by default `prediction_failed` and
/// `persist_failed`, not `invalid` (which would fail again as it is). A
/// replayed record carries its stored `traceparent`, so its trace goes on.
#[tokio::test]
async fn dead_letters_in_the_table_replay_through_the_pipeline() {
    let scenario = Scenario::new("hostile-replay").await;
    let service = scenario.start_service(&[]).await;
    let events = valid_events(1112, 2);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let insert = |(key, value): &(String, Vec<u8>), error_type: &str, source: &str| {
        diesel::RunQueryDsl::execute(
            diesel::sql_query(
                "INSERT INTO dead_letters (topic, record_key, record_value, error_type, error_message, stage,
                                           failed_at, attempts, source, service, refused_by, traceparent)
                 VALUES ('dlq', convert_to($1, 'UTF8'), convert_to($2, 'UTF8'), $3, 'x', 'persist', now(), 1, $4,
                         'txnflow/test', 'too large or invalid for the topic', $5)",
            )
            .bind::<diesel::sql_types::Text, _>(key)
            .bind::<diesel::sql_types::Text, _>(String::from_utf8(value.clone()).unwrap())
            .bind::<diesel::sql_types::Text, _>(error_type)
            .bind::<diesel::sql_types::Text, _>(source)
            .bind::<diesel::sql_types::Text, _>(traceparent),
            &mut scenario.db.connect(),
        )
        .unwrap();
    };
    insert(&events[0], "persist_failed", "t/0/1");
    insert(&events[1], "invalid", "t/0/2");
    let output = crate::helpers::run(
        crate::helpers::txnflow()
            .args(["dlq", "replay", "--idle-ms", "1000", "--group"])
            .arg(format!("{}-replay", scenario.topic))
            .env("TXNFLOW__KAFKA__BROKERS", &scenario.brokers)
            .env("TXNFLOW__KAFKA__TOPIC", &scenario.topic)
            .env("TXNFLOW__KAFKA__DLQ_TOPIC", &scenario.dlq_topic)
            .env("TXNFLOW__DB__URL", &scenario.db.url),
    );
    assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    assert_eq!(crate::helpers::stdout(&output).trim(), "replayed 1 skipped 0");
    let stored = scenario.wait_for(Duration::from_secs(30), |s| s.predictions().len() == 1).await;
    assert!(stored, "{}", service.log_tail());
    assert_eq!(scenario.transaction_ids(), BTreeSet::from([events[0].0.parse::<Uuid>().unwrap()]));
    let replayed = crate::helpers::read_topic_from(
        &scenario.brokers,
        &scenario.topic,
        crate::scenario::PARTITIONS,
        1,
        Duration::from_secs(30),
    );
    let names: Vec<&str> = replayed[0].headers.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!((replayed.len(), replayed[0].key.as_str()), (1, events[0].0.as_str()));
    assert_eq!(names, ["replayed_from", "traceparent"]);
    assert_eq!(replayed[0].headers[1].1, traceparent, "the record's trace goes on");
    let rows = query_json(
        &mut scenario.db.connect(),
        "SELECT error_type, replayed_at IS NOT NULL AS replayed FROM dead_letters ORDER BY error_type",
    );
    assert_eq!(
        rows,
        [
            json!({"error_type": "invalid", "replayed": false}),
            json!({"error_type": "persist_failed", "replayed": true})
        ]
    );
}

/// buffer.capacity_bytes bounds what the records in flight hold: with a
/// bound of 64 KiB (one largest record), 3,000 events all go through, and
/// the bytes in flight sampled meanwhile never pass it.
#[tokio::test]
async fn the_byte_capacity_bounds_the_records_in_flight() {
    let scenario = Scenario::new("hostile-capacity").await;
    let service = scenario.start_service(&[("TXNFLOW__BUFFER__CAPACITY_BYTES", "65536")]).await;
    let events = valid_events(1113, 3_000);
    let admin = service.admin.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let (mut most, mut samples) = (0.0f64, 0u32);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
                let bytes = text
                    .lines()
                    .find_map(|line| line.strip_prefix("txnflow_in_flight_bytes "))
                    .and_then(|value| value.parse::<f64>().ok())
                    .unwrap();
                most = most.max(bytes);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (most, samples)
        })
    };
    let sent = scenario.produce(&events).await;
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most, samples) = sampler.await.unwrap();
    assert_same_set(&scenario.transaction_ids(), &ids_of(&events), "all stored");
    assert!(most <= 65_536.0, "bytes in flight {most} over the bound");
    eprintln!(
        "hostile | buffer.capacity_bytes = 64 KiB, 3,000 events | stored 3000; at most {most} bytes in flight over \
         {samples} samples | peak RSS {:.1} MB",
        service.peak_rss_mb()
    );
}

/// A re-run of a run id replaces its error file: two runs of a file with
/// two invalid rows leave those two rows, not four.
#[tokio::test]
async fn a_rerun_replaces_its_error_file() {
    let scenario = Scenario::new("hostile-rerun").await;
    let dir = std::env::temp_dir().join(format!("txnflow-rerun-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("in.csv");
    let rows = plain_rows(1114, 3);
    let text = format!(
        "id,description,amount,timestamp,merchant,operation_type,side\n{}\nbad-1,x,abc,2026-01-01 00:00:00,m,payment,debit\n{}\nbad-2,x,1,2026-01-01 00:00:00,m,payment,sideways\n{}\n",
        rows[0].1, rows[1].1, rows[2].1
    );
    std::fs::write(&path, text).unwrap();
    for _ in 0..2 {
        let output = crate::batch::batch(&scenario, &[path.to_str().unwrap(), "--run-id", "rerun"]);
        assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    }
    let error_file = std::fs::read_to_string(dir.join("errors/rerun.csv")).unwrap();
    let lines: Vec<&str> = error_file.lines().map(|line| line.split(',').next().unwrap()).collect();
    assert_eq!(lines, ["id", "bad-1", "bad-2"], "{error_file}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// batch.max_concurrent_runs: a run beyond it answers 429 with the reason.
#[tokio::test]
async fn runs_beyond_the_concurrency_bound_are_refused_with_429() {
    let scenario = Scenario::new("hostile-runs").await;
    scenario.set_faults(json!({"latency_ms": 300})).await;
    let dir = std::env::temp_dir().join(format!("txnflow-runs-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = "id,description,amount,timestamp,merchant,operation_type,side\n".to_string();
    for (_, row) in plain_rows(1115, 5_000) {
        text.push_str(&row);
        text.push('\n');
    }
    std::fs::write(dir.join("a.csv"), &text).unwrap();
    let root = dir.display().to_string();
    let service = scenario
        .start_service(&[("TXNFLOW__BATCH__MAX_CONCURRENT_RUNS", "1"), ("TXNFLOW__BATCH__LOCAL_ROOTS", &root)])
        .await;
    let client = reqwest::Client::new();
    let post = |run_id: &str| {
        client
            .post(format!("{}/batches", service.admin))
            .json(&json!({"uri": dir.join("a.csv").display().to_string(), "run_id": run_id}))
            .send()
    };
    assert_eq!(post("first").await.unwrap().status().as_u16(), 202);
    let second = post("second").await.unwrap();
    assert_eq!(second.status().as_u16(), 429);
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(
        body["error"],
        "1 batch runs are running already (batch.max_concurrent_runs); try again when one is done"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
