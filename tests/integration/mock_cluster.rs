//! The chaos suite on a three-broker Kafka: librdkafka's mock cluster,
//! hosted by this test process on real TCP ports, with each broker's log
//! kept across its going down and up. `txnflow run` runs as a separate
//! process. The mock injects what a real broker cannot do on demand. Each `chaos_*` scenario runs the chaos load (valid events with 5%
//! invalid, and a batch file beside them) and checks the same books as
//! `chaos.rs`: ids, DLQ, committed offsets equal to the end offsets, and no
//! offset committed before its row was written. `make chaos` runs them at
//! full load with the others; `make test` runs the short pass.

use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr as Error};
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

use crate::chaos::{Chaos, scale};
use crate::helpers::{TestDatabase, assert_same_set};
use crate::outage::PrivatePostgres;
use crate::scenario::{PARTITIONS, Scenario, ids_of, valid_events};

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn three_brokers() -> Cluster {
    MockCluster::new(3).expect("librdkafka's mock cluster starts")
}

/// The pace of the load so that it lasts about `seconds`: chunks of 100.
fn pace_over(seconds: u64) -> Duration {
    let (events, _) = scale();
    Duration::from_millis(seconds * 1000 / (events as u64 / 100).max(1))
}

/// Moves the leader of each input partition to `broker(partition)`, and
/// the DLQ's to `broker(0)`.
fn move_leaders(cluster: &Cluster, scenario: &Scenario, broker: impl Fn(i32) -> i32) {
    for partition in 0..PARTITIONS {
        cluster.partition_leader(&scenario.topic, partition, Some(broker(partition))).unwrap();
    }
    cluster.partition_leader(&scenario.dlq_topic, 0, Some(broker(0))).unwrap();
}

/// A fault that starts `after` the load began, lasts `hold`, and is healed.
async fn chaos_under(
    name: &'static str,
    seed: u64,
    after: Duration,
    fault: impl FnOnce(&Cluster, &Scenario),
    hold: Duration,
    heal: impl FnOnce(&Cluster, &Scenario),
) {
    let cluster = three_brokers();
    let chaos = Chaos::on_mock(name, seed, TestDatabase::create(), &cluster).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "mock-chaos").await;
    // Paced to end soon after the fault starts: the producer stalls while a
    // leader is down, and the rest follows once it is back.
    let producer = chaos.produce(pace_over(after.as_secs() + 3));
    tokio::time::sleep(after).await;
    fault(&cluster, &chaos.scenario);
    tokio::time::sleep(hold).await;
    heal(&cluster, &chaos.scenario);
    chaos.finish(producer, &service, "mock-chaos", &[&service]).await;
}

/// A broker down for 30 s mid-load, then up with its log.
#[tokio::test]
async fn chaos_a_broker_down_30_s_then_back_with_its_log() {
    chaos_under(
        "broker 2 down 30 s, log kept",
        601,
        Duration::from_secs(2),
        |cluster, _| cluster.broker_down(2).unwrap(),
        Duration::from_secs(30),
        |cluster, _| cluster.broker_up(2).unwrap(),
    )
    .await;
}

/// The broker that leads every partition (input and DLQ) and coordinates
/// the group, down for 30 s: nothing can be read, dead-lettered or
/// committed until it is back. (The mock cluster moves no leadership by
/// itself, so this is the outage at its widest.)
#[tokio::test]
async fn chaos_the_leader_of_every_partition_down_30_s() {
    chaos_under(
        "leader of every partition down 30 s",
        602,
        Duration::from_secs(2),
        |cluster, scenario| {
            move_leaders(cluster, scenario, |_| 1);
            cluster.coordinator(MockCoordinator::Group(scenario.group()), 1).unwrap();
            std::thread::sleep(Duration::from_secs(1));
            cluster.broker_down(1).unwrap();
        },
        Duration::from_secs(30),
        |cluster, _| cluster.broker_up(1).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn chaos_partition_leadership_moving_mid_load() {
    chaos_under(
        "partition leaders move",
        603,
        Duration::from_secs(2),
        |cluster, scenario| move_leaders(cluster, scenario, |partition| (partition + 1) % 3 + 1),
        Duration::from_secs(3),
        |cluster, scenario| move_leaders(cluster, scenario, |partition| (partition + 2) % 3 + 1),
    )
    .await;
}

#[tokio::test]
async fn chaos_the_group_coordinator_moving_mid_load() {
    chaos_under(
        "group coordinator moves",
        604,
        Duration::from_secs(2),
        |cluster, scenario| cluster.coordinator(MockCoordinator::Group(scenario.group()), 3).unwrap(),
        Duration::from_secs(3),
        |cluster, scenario| cluster.coordinator(MockCoordinator::Group(scenario.group()), 2).unwrap(),
    )
    .await;
}

/// OffsetCommit answering REBALANCE_IN_PROGRESS 5 times, then
/// COORDINATOR_NOT_AVAILABLE 10 times. librdkafka does not report those
/// failures to the commit callback; the reader's commit of every
/// committable offset every 10 s is what brings the group's offsets to the
/// end.
#[tokio::test]
async fn chaos_offset_commits_refused_for_a_while() {
    chaos_under(
        "OffsetCommit refused (15 errors)",
        605,
        Duration::from_secs(2),
        |cluster, _| {
            let mut errors = vec![Error::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 5];
            errors.extend([Error::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10]);
            cluster.request_errors(RDKafkaApiKey::OffsetCommit, &errors);
        },
        Duration::ZERO,
        |_, _| {},
    )
    .await;
}

/// Produce (the DLQ's, and the test's) answering NOT_ENOUGH_REPLICAS 20
/// times, then every broker 1.5 s slow to answer for 8 s.
#[tokio::test]
async fn chaos_produce_refused_then_slow() {
    chaos_under(
        "Produce refused, then brokers slow 8 s",
        606,
        Duration::from_secs(2),
        |cluster, _| {
            cluster.request_errors(RDKafkaApiKey::Produce, &[Error::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20]);
            for broker in 1..=3 {
                cluster.broker_round_trip_time(broker, Duration::from_millis(1500)).unwrap();
            }
        },
        Duration::from_secs(8),
        |cluster, _| {
            for broker in 1..=3 {
                cluster.broker_round_trip_time(broker, Duration::ZERO).unwrap();
            }
        },
    )
    .await;
}

/// PostgreSQL down for longer than `max.poll.interval.ms`: 6 minutes at
/// librdkafka's default of 5 at full load; 40 s at 30 s in the short pass.
/// The capacity fills, the reader pauses its partitions and keeps polling,
/// so the consumer stays in the group: no rebalance, and each record is
/// read exactly once.
#[tokio::test]
async fn chaos_postgres_down_longer_than_the_poll_interval() {
    let full = std::env::var("CHAOS_SCALE").as_deref() == Ok("full");
    let (outage, poll_interval) = if full { (360, "300000") } else { (40, "30000") };
    let postgres = PrivatePostgres::start();
    let cluster = three_brokers();
    let db = TestDatabase::create_on(&postgres.url("postgres"));
    let chaos = Chaos::on_mock("PostgreSQL down past max.poll.interval.ms", 607, db, &cluster).await;
    chaos.note(&format!("PostgreSQL down {outage} s, max.poll.interval.ms {poll_interval}"));
    let service = chaos
        .start_service(&[
            ("TXNFLOW__KAFKA__PROPERTIES__MAX_POLL_INTERVAL_MS", poll_interval),
            ("TXNFLOW__BUFFER__CAPACITY", "1000"),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "500"),
        ])
        .await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    chaos.post_batch(&service, "mock-postgres").await;
    let producer = chaos.produce(pace_over(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.down();
    tokio::time::sleep(Duration::from_secs(outage)).await;
    postgres.up();
    chaos.finish(producer, &service, "mock-postgres", &[&service]).await;
    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(log.contains("capacity full: partitions paused"), "{}", service.log_tail());
    assert_eq!(log.matches("partitions assigned").count(), 1, "one assignment, no rebalance");
    assert!(!log.contains("partitions revoked"), "no rebalance while PostgreSQL was down");
    let read = service.metric("txnflow_records_total{outcome=\"read\",source=\"kafka\"}").await;
    let events = chaos.valid.len() + chaos.invalid.len();
    assert_eq!(read, events as f64, "each record read once: nothing re-read");
}

/// Three instances joining one after the other mid-load, then the first two
/// leaving (SIGTERM, exit 0): every rebalance commits what is durable, and
/// the last one finishes the load.
#[tokio::test]
async fn chaos_three_instances_joining_and_leaving() {
    let cluster = three_brokers();
    let chaos = Chaos::on_mock("3 instances join, 2 leave", 608, TestDatabase::create(), &cluster).await;
    let mut first = chaos.start_service(&[]).await;
    let producer = chaos.produce(pace_over(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut second = chaos.start_service(&[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = chaos.start_service(&[]).await;
    chaos.post_batch(&last, "mock-instances").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for leaving in [&mut first, &mut second] {
        let status = chaos.stop(leaving, "TERM").await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "a clean leave:\n{}", leaving.log_tail());
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    chaos.finish(producer, &last, "mock-instances", &[&last]).await;
}

/// At capacity the reader pauses its partitions and keeps polling: with
/// every write held (a trigger waits on a flag), the records in flight
/// stay exactly at `buffer.capacity`, the group does not rebalance, and
/// once the writes go through, everything resumes with exact books.
#[tokio::test]
async fn at_capacity_the_reader_pauses_and_resumes_without_a_rebalance() {
    let cluster = three_brokers();
    let scenario = Scenario::on_mock("pause", TestDatabase::create(), &cluster);
    let service =
        scenario.start_service(&[("TXNFLOW__BUFFER__CAPACITY", "500"), ("TXNFLOW__BUFFER__MAX_RECORDS", "500")]).await;
    diesel::connection::SimpleConnection::batch_execute(
        &mut scenario.db.connect(),
        "CREATE TABLE hold_writes_flag (x int); INSERT INTO hold_writes_flag VALUES (1);
         CREATE FUNCTION hold_writes() RETURNS trigger AS $$
         BEGIN WHILE EXISTS (SELECT 1 FROM hold_writes_flag) LOOP PERFORM pg_sleep(0.2); END LOOP; RETURN NULL; END $$
         LANGUAGE plpgsql;
         CREATE TRIGGER hold_writes BEFORE INSERT ON transactions FOR EACH STATEMENT EXECUTE FUNCTION hold_writes();",
    )
    .unwrap();
    let events = valid_events(1403, 3_000);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    let log = || std::fs::read_to_string(&service.log).unwrap_or_default();
    let paused = (0..240).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        log().contains("capacity full: partitions paused")
    });
    assert!(paused, "{}", service.log_tail());
    assert_eq!(service.metric("txnflow_in_flight_records").await, 500.0, "at the bound");
    diesel::connection::SimpleConnection::batch_execute(&mut scenario.db.connect(), "DELETE FROM hold_writes_flag")
        .unwrap();
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    let stored: BTreeSet<Uuid> = scenario.transaction_ids();
    assert_same_set(&stored, &ids_of(&events), "stored ids");
    assert!(log().contains("capacity back: partitions resumed"), "{}", service.log_tail());
    assert!(!log().contains("partitions revoked"), "no rebalance while paused");
}

/// A restarted instance starts at the group's committed offsets, even when
/// reading them fails for a while (OffsetFetch answering
/// COORDINATOR_LOAD_IN_PROGRESS 10 times): it retries, and neither falls
/// back to the start (a re-read of the first 1,000) nor to the end (a skip
/// of the next 1,000). It reads exactly the 1,000 records sent after the
/// first instance left.
#[tokio::test]
async fn a_restart_starts_at_the_committed_offsets_even_when_reading_them_fails() {
    let cluster = three_brokers();
    let scenario = Scenario::on_mock("start-offsets", TestDatabase::create(), &cluster);
    let mut first = scenario.start_service(&[]).await;
    let before = valid_events(1450, 1_000);
    let ends = Scenario::end_offsets(&scenario.produce(&before).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", first.log_tail());
    let status = first.signal("TERM", Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", first.log_tail());
    let after = valid_events(1451, 1_000);
    let mut ends = ends;
    for (partition, end) in Scenario::end_offsets(&scenario.produce(&after).await) {
        ends.insert(partition, end);
    }
    cluster.request_errors(RDKafkaApiKey::OffsetFetch, &[Error::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 10]);
    let second = scenario.start_service(&[]).await;
    assert!(second.wait_assigned(Duration::from_secs(60)).await, "{}", second.log_tail());
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", second.log_tail());
    let mut all = ids_of(&before);
    all.extend(ids_of(&after));
    assert_same_set(&scenario.transaction_ids(), &all, "stored ids");
    let read = second.metric("txnflow_records_total{outcome=\"read\",source=\"kafka\"}").await;
    assert_eq!(read, 1_000.0, "the second instance read exactly what the first left; log:\n{}", second.log_tail());
    eprintln!("mock | start offsets | OffsetFetch refused 10 times; read 1000 of 2000, committed = end");
}
