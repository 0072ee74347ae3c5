//! `txnflow check`, and the replication factor `txnflow setup` uses.

use crate::helpers::{TestDatabase, run, stdout, txnflow};
use crate::scenario::Scenario;

fn check(scenario: &Scenario, db_url: &str, ml_url: &str, dlq_topic: &str) -> std::process::Output {
    run(txnflow()
        .arg("check")
        .env("TXNFLOW__KAFKA__BROKERS", &scenario.brokers)
        .env("TXNFLOW__KAFKA__TOPIC", &scenario.topic)
        .env("TXNFLOW__KAFKA__DLQ_TOPIC", dlq_topic)
        .env("TXNFLOW__KAFKA__GROUP_ID", scenario.group())
        .env("TXNFLOW__DB__URL", db_url)
        .env("TXNFLOW__PREDICT__URL", ml_url))
}

/// The first word of each line: `ok` or `FAILED`, and what was checked.
fn verdicts(output: &std::process::Output) -> Vec<(String, String)> {
    stdout(output)
        .lines()
        .filter(|line| line.starts_with("ok ") || line.starts_with("FAILED "))
        .map(|line| {
            let (verdict, rest) = line.split_once(' ').unwrap();
            let what = rest.trim_start().split(": ").next().unwrap().to_string();
            (verdict.to_string(), what)
        })
        .collect()
}

#[tokio::test]
async fn check_says_what_answers_one_line_each() {
    let scenario = Scenario::new("check").await;
    assert!(run(txnflow().arg("migrate").env("TXNFLOW__DB__URL", &scenario.db.url)).status.success());
    let output = check(&scenario, &scenario.db.url, &scenario.ml_api_url(), &scenario.dlq_topic);
    assert!(output.status.success(), "{}", stdout(&output));
    let lines: Vec<(String, String)> = verdicts(&output);
    let broker = format!("broker {} (plaintext)", scenario.brokers);
    let db = scenario.db.url.replace("txnflow:txnflow@", "txnflow:***@");
    let expected: Vec<(String, String)> = [
        broker.as_str(),
        &format!("topic {}", scenario.topic),
        &format!("topic {}", scenario.dlq_topic),
        &format!("consumer group {}", scenario.group()),
        &format!("postgresql {db}"),
        "s3 bucket transactions",
        "schema registry http://127.0.0.1:8081/apis/ccompat/v7",
        &format!("ml api {}", scenario.ml_api_url()),
        "sample prediction",
    ]
    .iter()
    .map(|what| ("ok".to_string(), what.to_string()))
    .collect();
    assert_eq!(lines, expected, "{}", stdout(&output));
    assert!(stdout(&output).contains("sample prediction: Transportation"), "{}", stdout(&output));
    assert!(stdout(&output).trim_end().ends_with("9 checks, 0 failed"));
    assert!(!stdout(&output).contains("txnflow:txnflow@"), "the password is hidden");
}

#[tokio::test]
async fn check_fails_naming_each_dependency_that_does_not_answer() {
    let scenario = Scenario::new("check-bad").await;
    let unmigrated = TestDatabase::create();
    let output = check(&scenario, &unmigrated.url, "http://127.0.0.1:1", "no-such-dlq-topic");
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let failed: Vec<String> =
        verdicts(&output).into_iter().filter(|(verdict, _)| verdict == "FAILED").map(|(_, what)| what).collect();
    let db = unmigrated.url.replace("txnflow:txnflow@", "txnflow:***@");
    assert_eq!(
        failed,
        [
            "topic no-such-dlq-topic".to_string(),
            format!("postgresql {db}"),
            "ml api http://127.0.0.1:1".to_string(),
            "sample prediction".to_string()
        ],
        "{}",
        stdout(&output)
    );
    assert!(stdout(&output).contains("migration(s) pending: run txnflow migrate"), "{}", stdout(&output));
    assert!(stdout(&output).trim_end().ends_with("9 checks, 4 failed"));
}

/// On a cluster of three brokers (librdkafka's mock cluster, in this
/// process), one replica is refused before anything is asked of the
/// cluster; the description `txnflow check` reads counts the replicas.
/// (The mock cluster does not serve CreateTopics: its topics are made
/// through its own API.)
#[tokio::test]
async fn one_replica_on_several_brokers_is_refused_unless_allowed() {
    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    let kafka = txnflow::config::KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        replication_factor: 1,
        ..crate::helpers::default_config().kafka
    };
    let refused = txnflow::kafka::ensure_topics(&kafka, &[("single", 3)]).await.unwrap_err().to_string();
    assert!(refused.starts_with("kafka.replication_factor is 1 on a cluster of 3 brokers"), "{refused}");
    cluster.create_topic("replicated", 3, 3).unwrap();
    cluster.create_topic("single", 2, 1).unwrap();
    let described = txnflow::kafka::cluster(&kafka).await.unwrap();
    assert_eq!(described.brokers.len(), 3);
    assert_eq!(described.topics.get("replicated"), Some(&vec![3, 3, 3]));
    assert_eq!(described.topics.get("single"), Some(&vec![1, 1]));
}
