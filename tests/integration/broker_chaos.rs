//! The chaos suite's broker scenarios, on the local three-node Kafka
//! cluster itself: a node killed, a rolling restart, a node paused past
//! the session timeout, two of three nodes down, the DLQ below its min ISR,
//! and three instances joining and leaving under each group protocol.
//! Each checks the books of `chaos.rs` (ids, DLQ, committed = end, no commit
//! ahead of its rows, records read reaching those produced) and prints a row.
//!
//! They stop and start the stack's own nodes (`scripts/stack.sh broker`),
//! so they run one at a time after the rest of `make test` (see the
//! Makefile), and every node is started again when a scenario ends, even
//! when it fails.

use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::chaos::{Chaos, scale};
use crate::helpers::{TestDatabase, brokers};
use crate::scenario::{PARTITIONS, Scenario, Service};

/// `offsets.topic.num.partitions` of the local cluster (scripts/stack.sh).
const OFFSETS_PARTITIONS: i32 = 12;

/// Runs `scripts/stack.sh broker ACTION NODE`; returns whether it succeeded.
fn try_broker(action: &str, node: i32) -> Result<(), String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let output = Command::new("bash")
        .arg(script)
        .args(["broker", action, &node.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim_end());
    match output.status.success() {
        true => Ok(()),
        false => Err(format!("broker {action} {node}: {}", String::from_utf8_lossy(&output.stderr))),
    }
}

fn broker(action: &str, node: i32) {
    try_broker(action, node).unwrap();
}

/// Starts every node again when a scenario ends, whatever happened (and
/// says so, without a second panic, when it cannot).
struct WholeClusterAfter;

impl Drop for WholeClusterAfter {
    fn drop(&mut self) {
        for node in 1..=3 {
            for action in ["resume", "start"] {
                if let Err(error) = try_broker(action, node) {
                    eprintln!("the cluster may not be whole after this scenario: {error}");
                }
            }
        }
    }
}

/// Java's `String.hashCode`, which Kafka uses to place a group.
fn java_hash(text: &str) -> i32 {
    text.encode_utf16().fold(0i32, |hash, unit| hash.wrapping_mul(31).wrapping_add(i32::from(unit)))
}

/// The leader of each partition of `topic`, from the cluster's metadata.
fn leaders(topic: &str) -> BTreeMap<i32, i32> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    metadata.topics()[0].partitions().iter().map(|p| (p.id(), p.leader())).collect()
}

/// The node leading the most input partitions among those that lead an
/// offsets partition, and a group for the scenario that it coordinates.
fn leader_and_coordinator(scenario: &Scenario) -> i32 {
    // The offsets topic exists once any group has been asked for.
    let _ = scenario.try_committed_offsets();
    let offsets_leaders = leaders("__consumer_offsets");
    let mut counts: BTreeMap<i32, usize> = offsets_leaders.values().map(|node| (*node, 0)).collect();
    for leader in leaders(&scenario.topic).values() {
        if let Some(count) = counts.get_mut(leader) {
            *count += 1;
        }
    }
    let most = counts.values().copied().max().unwrap();
    let node = counts.into_iter().find(|(_, count)| *count == most).unwrap().0;
    // A group's coordinator leads its offsets partition: Java's hash of the name.
    let group = (0..1000)
        .map(|i| format!("{}-group-{i}", scenario.topic))
        .find(|group| offsets_leaders[&((java_hash(group) & 0x7fff_ffff) % OFFSETS_PARTITIONS)] == node)
        .expect("a group name that node coordinates");
    scenario.switch_group(group);
    node
}

/// A pace that spreads the scenario's load over `seconds`.
fn pace_over(seconds: u64) -> Duration {
    let (events, _) = scale();
    Duration::from_millis(seconds * 1000 / (events as u64 / 100).max(1))
}

/// `kill -9` of the node that leads the most input partitions and
/// coordinates the group, mid-load; it restarts with its log 5 s later.
#[tokio::test]
async fn chaos_kill_9_the_leader_and_coordinator() {
    let _whole = WholeClusterAfter;
    let chaos = Chaos::new("kill -9 leader + coordinator node", 701).await;
    let target = leader_and_coordinator(&chaos.scenario);
    let led = leaders(&chaos.scenario.topic).values().filter(|leader| **leader == target).count();
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-kill-node").await;
    let producer = chaos.produce(pace_over(12));
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker("kill", target);
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker("start", target);
    chaos.note(&format!("node {target} led {led} of {PARTITIONS} input partitions and the group"));
    chaos.finish(producer, &service, "chaos-kill-node", &[&service]).await;
}

/// A rolling restart of the three nodes under load, one at a time, each
/// back in every ISR before the next one stops.
#[tokio::test]
async fn chaos_rolling_restart() {
    let _whole = WholeClusterAfter;
    let chaos = Chaos::new("rolling restart, 3 nodes", 702).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-rolling").await;
    let producer = chaos.produce(pace_over(40));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in 1..=3 {
        broker("stop", node);
        broker("start", node);
    }
    chaos.finish(producer, &service, "chaos-rolling", &[&service]).await;
}

/// One node paused (SIGSTOP) for longer than the session timeout (6 s),
/// then resumed: the one coordinating the group and leading the most.
#[tokio::test]
async fn chaos_a_node_paused_past_the_session_timeout() {
    let _whole = WholeClusterAfter;
    let chaos = Chaos::new("node paused 10 s (SIGSTOP)", 703).await;
    let target = leader_and_coordinator(&chaos.scenario);
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-pause").await;
    let producer = chaos.produce(pace_over(15));
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker("pause", target);
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker("resume", target);
    chaos.finish(producer, &service, "chaos-pause", &[&service]).await;
}

/// Two of three nodes down: the controller quorum and every min ISR are
/// lost. Producing, DLQ sends and commits stall; nothing is lost, and all
/// resumes once one node is back.
#[tokio::test]
async fn chaos_two_of_three_nodes_down() {
    let _whole = WholeClusterAfter;
    let chaos = Chaos::new("2 of 3 nodes down (quorum lost)", 704).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-quorum").await;
    let producer = chaos.produce(pace_over(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let committed_before: i64 = chaos.scenario.committed_offsets().values().sum();
    broker("stop", 2);
    broker("kill", 3);
    let outage = if std::env::var("CHAOS_SCALE").as_deref() == Ok("full") { 30 } else { 15 };
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(outage)).await;
    // Nothing was committed while the offsets topic was below its min ISR.
    let stalled = chaos.scenario.try_committed_offsets().map(|c| c.values().sum::<i64>());
    chaos.note(&format!(
        "down {:.0} s; committed {committed_before} before, {} during",
        down.elapsed().as_secs_f64(),
        stalled.map_or("unreadable".to_string(), |c| c.to_string())
    ));
    broker("start", 2);
    chaos.finish(producer, &service, "chaos-quorum", &[&service]).await;
}

/// The DLQ topic's only partition below its min ISR (its replicas on nodes
/// 2 and 3, node 3 stopped) while invalid records keep arriving: their
/// sends wait, and commits wait for them; the input topic goes on.
#[tokio::test]
async fn chaos_the_dlq_below_its_min_isr() {
    let _whole = WholeClusterAfter;
    let scenario = Scenario::with_dlq_replicas("chaos-dlq-min-isr", TestDatabase::create(), &[2, 3]).await;
    let chaos = Chaos::on_stack("DLQ below min ISR", 705, scenario).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-dlq").await;
    let producer = chaos.produce(pace_over(15));
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker("stop", 3);
    tokio::time::sleep(Duration::from_secs(15)).await;
    broker("start", 3);
    chaos.finish(producer, &service, "chaos-dlq", &[&service]).await;
}

/// The input partitions `service` holds now: those it exports a lag for.
async fn held_partitions(service: &Service) -> std::collections::BTreeSet<String> {
    service
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("txnflow_consumer_lag{"))
        .filter_map(|line| line.split("partition=\"").nth(1)?.split('"').next().map(str::to_string))
        .collect()
}

/// Three instances joining and leaving under load with `protocol`: one at
/// the start, two more joining, one stopped (SIGTERM), one killed, and a
/// last one joining. Prints each join's time and the pause of the leave.
async fn instances_join_and_leave(name: &'static str, seed: u64, protocol: &str) {
    let chaos = Chaos::new(name, seed).await;
    let env = [("TXNFLOW__KAFKA__GROUP_PROTOCOL", protocol)];
    let mut first = chaos.start_service(&env).await;
    let started = Instant::now();
    assert!(first.wait_assigned(Duration::from_secs(60)).await, "{}", first.log_tail());
    let first_join = started.elapsed();
    chaos.post_batch(&first, "chaos-members").await;
    let producer = chaos.produce(pace_over(25));
    let joined = Instant::now();
    let second = chaos.start_service(&env).await;
    let mut third = chaos.start_service(&env).await;
    assert!(third.wait_assigned(Duration::from_secs(60)).await, "{}", third.log_tail());
    let others_join = joined.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leaving = Instant::now();
    chaos.stop(&mut first, "TERM").await;
    // The leave's pause: until the two left hold every partition.
    let mut taken_over = None;
    for _ in 0..1200 {
        let mut held = held_partitions(&second).await;
        held.extend(held_partitions(&third).await);
        if held.len() == PARTITIONS as usize {
            taken_over = Some(leaving.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    chaos.stop(&mut third, "KILL").await;
    let last = chaos.start_service(&env).await;
    chaos.note(&format!(
        "{protocol}: first join {:.1} s, two more {:.1} s, a leave's partitions reassigned in {}",
        first_join.as_secs_f64(),
        others_join.as_secs_f64(),
        taken_over.map_or("(not seen)".into(), |t| format!("{:.1} s", t.as_secs_f64()))
    ));
    chaos.finish(producer, &second, "chaos-members", &[&second, &last]).await;
}

#[tokio::test]
async fn chaos_instances_join_and_leave_classic() {
    instances_join_and_leave("3 instances join and leave (classic)", 706, "classic").await;
}

#[tokio::test]
async fn chaos_instances_join_and_leave_consumer() {
    instances_join_and_leave("3 instances join and leave (consumer, KIP-848)", 707, "consumer").await;
}

/// The input topic deleted and created again under a running service, then
/// a second load produced to the new topic: the service does not crash, and
/// every record of both loads is stored, each once.
///
/// Known to fail (2026-12-05): the service does not crash, but the running
/// consumer keeps its positions from the old topic and reads the new one
/// from there, so the new log's first records (181 of 600 in one run) are
/// never read. Detecting the new topic id needs an API rust-rdkafka does not
/// wrap yet; see docs/chaos.md. Run it with `--run-ignored all`.
#[tokio::test]
#[ignore = "known gap: a topic re-created under a running service is read from the old positions"]
async fn a_topic_deleted_and_created_again_under_a_running_service() {
    let scenario = Scenario::new("topic-recreated").await;
    let mut service = scenario.start_service(&[]).await;
    let first = crate::scenario::valid_events(721, 600);
    let ends = Scenario::end_offsets(&scenario.produce(&first).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        txnflow::kafka::client_config(&crate::helpers::kafka_config()).create().unwrap();
    let deleted = admin.delete_topics(&[scenario.topic.as_str()], &rdkafka::admin::AdminOptions::new()).await.unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    // Created again once the deletion has gone through.
    let mut created = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let new =
            rdkafka::admin::NewTopic::new(&scenario.topic, PARTITIONS, rdkafka::admin::TopicReplication::Fixed(3));
        let result = admin.create_topics([&new], &rdkafka::admin::AdminOptions::new()).await.unwrap();
        if result.iter().all(Result::is_ok) {
            created = true;
            break;
        }
    }
    assert!(created, "the topic is created again");
    scenario.renew_producer();
    let second = crate::scenario::valid_events(722, 600);
    scenario.produce(&second).await;
    let mut all = crate::scenario::ids_of(&first);
    all.extend(crate::scenario::ids_of(&second));
    let stored_all = scenario.wait_for(Duration::from_secs(90), |s| s.transaction_ids() == all).await;
    assert!(!service.has_exited(), "the service is still running; its log:\n{}", service.log_tail());
    crate::helpers::assert_same_set(&scenario.transaction_ids(), &all, "both loads stored");
    assert!(stored_all);
    assert_eq!(scenario.count("SELECT count(*) - count(DISTINCT id) FROM transactions"), 0);
}
