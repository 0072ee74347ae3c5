//! Supervision (guarantee 6), shutdown (guarantee 8) and restarts.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::assert_same_set;
use crate::scenario::{Scenario, ids_of, invalid_events, valid_events};

const ACTORS: [&str; 6] = ["kafka_reader", "buffer", "predict_client", "db_writer", "dlq_publisher", "backfill"];

async fn assert_exact_books(
    scenario: &Scenario,
    valid: &[(String, Vec<u8>)],
    invalid: &[(String, Vec<u8>)],
    log: &str,
) {
    assert_same_set(&scenario.transaction_ids(), &ids_of(valid), &format!("stored ids; log:\n{log}"));
    let covered = scenario
        .wait_for(Duration::from_secs(60), |s| s.count("SELECT count(*) FROM predictions") == valid.len() as i64)
        .await;
    assert!(covered, "every stored transaction is predicted");
    let dlq = scenario.dlq(invalid.len());
    let dead: BTreeSet<&str> = dlq.iter().filter(|r| r.key.starts_with("bad-")).map(|r| r.key.as_str()).collect();
    let expected: BTreeSet<&str> = invalid.iter().map(|(k, _)| k.as_str()).collect();
    assert_same_set(&dead, &expected, "dead-lettered invalid records");
}

#[tokio::test]
async fn every_actor_crashed_and_panicked_under_load_loses_nothing() {
    let scenario = Scenario::new("supervision").await;
    let valid = valid_events(21, 10_000);
    let invalid = invalid_events(22, 200);
    let service = scenario.start_service(&[]).await;
    let mut all = Vec::new();
    let rounds: Vec<(&str, &str)> =
        ACTORS.iter().map(|a| (*a, "crash")).chain(ACTORS.iter().map(|a| (*a, "panic"))).collect();
    let per_round = valid.len() / rounds.len() + 1;
    for (round, (actor, kind)) in rounds.iter().enumerate() {
        let mut chunk: Vec<_> = valid.iter().skip(round * per_round).take(per_round).cloned().collect();
        chunk.extend(invalid.iter().skip(round * 17).take(17).cloned());
        let sending = scenario.produce(&chunk);
        let (sent, ()) = tokio::join!(sending, service.chaos(actor, kind));
        all.extend(sent);
    }
    let rest: Vec<_> = invalid.iter().skip(rounds.len() * 17).cloned().collect();
    all.extend(scenario.produce(&rest).await);
    let ends = Scenario::end_offsets(&all);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(180)).await, ends, "{}", service.log_tail());
    assert_exact_books(&scenario, &valid, &invalid, &service.log_tail()).await;
    for actor in ACTORS {
        let restarts = service.metric(&format!("txnflow_actor_restarts_total{{actor=\"{actor}\"}}")).await;
        assert!(restarts >= 2.0, "{actor}: crashed and panicked, {restarts} restarts counted");
    }
}

/// Records an actor holds when it crashes are dropped with it. Their
/// acknowledgement handles report the loss to the reader, which reads
/// each partition again from its first record not durable: every record
/// is read exactly twice, stored once, and the commits reach the end.
#[tokio::test]
async fn records_held_by_a_crashing_actor_are_read_again_through_their_handles() {
    for kind in ["crash", "panic"] {
        let scenario = Scenario::new(&format!("held-by-a-{kind}")).await;
        // Slow predictions, within the 5 s timeout: the PredictClient holds the flush.
        scenario.set_faults(serde_json::json!({"latency_ms": 4000})).await;
        let valid = valid_events(51, 300);
        let service = scenario.start_service(&[]).await;
        let ends = Scenario::end_offsets(&scenario.produce(&valid).await);
        let mut held = false;
        for _ in 0..300 {
            let in_flight = service.metric("txnflow_in_flight_records").await;
            let buffered = service.metric("txnflow_buffer_depth").await;
            if in_flight == 300.0 && buffered == 0.0 {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(held, "the 300 records never sat in the PredictClient; log:\n{}", service.log_tail());
        service.chaos("predict_client", kind).await;
        scenario.set_faults(serde_json::json!({"latency_ms": 0})).await;
        assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
        assert_exact_books(&scenario, &valid, &[], &service.log_tail()).await;
        let read = service.metric("txnflow_records_total{outcome=\"read\",source=\"kafka\"}").await;
        assert_eq!(read, 600.0, "{kind}: each record read twice; log:\n{}", service.log_tail());
        let log = std::fs::read_to_string(&service.log).unwrap();
        let rewinds: Vec<&str> = log.lines().filter(|line| line.contains("records were lost in flight")).collect();
        assert!(!rewinds.is_empty() && rewinds.len() <= 3, "{kind}: one rewind per partition at most: {rewinds:#?}");
    }
}

/// The restarted instance starts at the offsets the first one committed.
#[tokio::test]
async fn sigterm_under_load_exits_0_and_a_restart_finishes_the_work() {
    let scenario = Scenario::new("sigterm").await;
    let valid = valid_events(31, 5_000);
    let invalid = invalid_events(32, 100);
    let mut events = valid.clone();
    events.extend(invalid.iter().cloned());
    let mut service = scenario.start_service(&[("TXNFLOW__SHUTDOWN_TIMEOUT_MS", "15000")]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    let status = service.signal("TERM", Duration::from_secs(20));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exit 0 within the shutdown timeout; log:\n{}",
        service.log_tail()
    );
    let service = scenario.start_service(&[]).await;
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_exact_books(&scenario, &valid, &invalid, &service.log_tail()).await;
}

#[tokio::test]
async fn kill_9_and_a_restart_lose_nothing() {
    let scenario = Scenario::new("kill9").await;
    let valid = valid_events(41, 5_000);
    let invalid = invalid_events(42, 100);
    let mut events = valid.clone();
    events.extend(invalid.iter().cloned());
    let mut service = scenario.start_service(&[]).await;
    let first = scenario.produce(&events[..2_500]).await;
    // Kill while the first half is being processed.
    let _ = service.signal("KILL", Duration::from_secs(10));
    let mut all = first;
    all.extend(scenario.produce(&events[2_500..]).await);
    let ends = Scenario::end_offsets(&all);
    let service = scenario.start_service(&[]).await;
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_exact_books(&scenario, &valid, &invalid, &service.log_tail()).await;
}

/// Acceptance 7: arbitrary bytes never crash the reader; each is one DLQ record.
#[tokio::test]
async fn arbitrary_bytes_each_become_one_dlq_record() {
    use rand::{Rng, SeedableRng};
    let scenario = Scenario::new("fuzz").await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let events: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| {
            let len = rng.random_range(0..200);
            (format!("fuzz-{i}"), (0..len).map(|_| rng.random::<u8>()).collect())
        })
        .collect();
    let service = scenario.start_service(&[]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
    let dlq = scenario.dlq(500);
    let keys: BTreeSet<&str> = dlq.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(dlq.len(), 500, "one DLQ record per event");
    assert_same_set(&keys, &events.iter().map(|(k, _)| k.as_str()).collect(), "fuzzed keys");
    assert_eq!(
        service.metric("txnflow_actor_restarts_total{actor=\"kafka_reader\"}").await,
        0.0,
        "the reader never crashed"
    );
}

/// Two instances in one group: partitions move when the second joins and
/// again when the first stops; each revoke flushes and commits what is
/// durable. The books stay exact.
#[tokio::test]
async fn rebalances_between_two_instances_lose_nothing() {
    let scenario = Scenario::new("rebalance").await;
    let valid = valid_events(71, 9_000);
    let invalid = invalid_events(72, 90);
    let mut first = scenario.start_service(&[]).await;
    let mut sent = scenario.produce(&valid[..3_000]).await;
    sent.extend(scenario.produce(&invalid[..30]).await);
    let second = scenario.start_service(&[]).await;
    sent.extend(scenario.produce(&valid[3_000..6_000]).await);
    sent.extend(scenario.produce(&invalid[30..60]).await);
    let status = first.signal("TERM", Duration::from_secs(30));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{}", first.log_tail());
    sent.extend(scenario.produce(&valid[6_000..]).await);
    sent.extend(scenario.produce(&invalid[60..]).await);
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", second.log_tail());
    assert_exact_books(&scenario, &valid, &invalid, &second.log_tail()).await;
    let read_by_second = second.metric("txnflow_records_total{outcome=\"read\",source=\"kafka\"}").await;
    assert!(read_by_second > 0.0, "the second instance took part");
}
