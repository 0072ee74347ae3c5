//! `txnflow produce` against the stack's broker, read back exactly.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::{brokers, create_topic, read_topic, run, seed_csv_path, stderr, stdout, txnflow};
use txnflow::cli::produce::TransactionGenerator;
use txnflow::domain::event::parse_event;

const PARTITIONS: i32 = 3;

#[tokio::test]
async fn a_steady_rate_sends_exactly_count_records_keyed_by_id() {
    let topic = create_topic("produce", PARTITIONS).await;
    let output = run(txnflow()
        .args([
            "produce",
            "--count",
            "300",
            "--rate",
            "2000",
            "--invalid-ratio",
            "0.2",
            "--seed",
            "9",
            "--topic",
            &topic,
        ])
        .env("TXNFLOW__KAFKA__BROKERS", brokers()));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "produced 300 records");

    // With one producer loop, the records are the generator's first 300.
    let mut generator = TransactionGenerator::new(9, 0.2);
    let expected: Vec<_> = (0..300).map(|_| generator.next_record()).collect();
    let expected_keys: BTreeSet<String> = expected.iter().map(|r| r.key.clone()).collect();
    let expected_invalid: BTreeSet<String> =
        expected.iter().filter(|r| r.invalid.is_some()).map(|r| r.key.clone()).collect();

    let records = read_topic(&topic, PARTITIONS, 300, Duration::from_secs(60));
    assert_eq!(records.len(), 300, "exactly the records sent, no more");
    let keys: BTreeSet<String> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, expected_keys);
    let invalid: BTreeSet<String> =
        records.iter().filter(|r| parse_event(&r.value).is_err()).map(|r| r.key.clone()).collect();
    assert_eq!(invalid, expected_invalid);
    assert!(!expected_invalid.is_empty());
    for record in records.iter().filter(|r| !invalid.contains(&r.key)) {
        assert_eq!(parse_event(&record.value).unwrap().id.to_string(), record.key, "keyed by id");
    }
    let used_partitions: BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(used_partitions, (0..PARTITIONS).collect(), "keys spread over every partition");
}

#[tokio::test]
async fn the_two_seed_producers_share_the_count() {
    let topic = create_topic("produce-two", PARTITIONS).await;
    let output =
        run(txnflow().args(["produce", "--count", "40", "--topic", &topic]).env("TXNFLOW__KAFKA__BROKERS", brokers()));
    assert!(output.status.success(), "{}", stderr(&output));
    let records = read_topic(&topic, PARTITIONS, 40, Duration::from_secs(60));
    assert_eq!(records.len(), 40);
    assert!(records.iter().all(|r| parse_event(&r.value).is_ok()));
}

#[tokio::test]
async fn a_csv_file_is_replayed_with_its_own_ids() {
    let topic = create_topic("produce-csv", PARTITIONS).await;
    let seed_file = seed_csv_path();
    let output = run(txnflow()
        .args(["produce", "--count", "100", "--rate", "5000", "--topic", &topic, "--from"])
        .arg(&seed_file)
        .env("TXNFLOW__KAFKA__BROKERS", brokers()));
    assert!(output.status.success(), "{}", stderr(&output));
    let records = read_topic(&topic, PARTITIONS, 100, Duration::from_secs(60));
    let keys: BTreeSet<u32> = records.iter().map(|r| r.key.parse().unwrap()).collect();
    assert_eq!(keys, (1..=100).collect(), "the file's first 100 rows");
    let first = records.iter().find(|r| r.key == "1").unwrap();
    let transaction = parse_event(&first.value).unwrap();
    assert_eq!(transaction.id.to_string(), "e15d1546-4798-54fb-b2ff-35d10197b1b9");
    assert_eq!(transaction.amount.to_string(), "-952.40");
    assert_eq!(transaction.description, "Card expense at EDF");
}

/// `--traceparent` gives each record a well-formed, sampled W3C
/// `traceparent` of its own trace; without it, records carry none.
#[tokio::test]
async fn traceparent_gives_each_record_its_own_trace() {
    let topic = create_topic("produce-traced", PARTITIONS).await;
    let produce = |extra: &[&str]| {
        let mut args = vec!["produce", "--count", "50", "--rate", "1000", "--topic", &topic];
        args.extend_from_slice(extra);
        run(txnflow().args(&args).env("TXNFLOW__KAFKA__BROKERS", brokers()))
    };
    let traced = produce(&["--traceparent"]);
    assert!(traced.status.success(), "{}", stderr(&traced));
    let plain = produce(&["--seed", "7"]);
    assert!(plain.status.success(), "{}", stderr(&plain));

    let records = read_topic(&topic, PARTITIONS, 100, Duration::from_secs(60));
    assert_eq!(records.len(), 100);
    let traceparents: Vec<Option<String>> = records
        .iter()
        .map(|r| r.headers.iter().find(|(name, _)| name == "traceparent").map(|(_, v)| v.clone()))
        .collect();
    let given: Vec<&String> = traceparents.iter().flatten().collect();
    assert_eq!(given.len(), 50, "the 50 records of the traced run, and only those");
    let mut trace_ids = BTreeSet::new();
    for traceparent in given {
        let kept = txnflow::domain::trace_context::valid_traceparent(traceparent.as_bytes());
        assert_eq!(kept.as_ref(), Some(traceparent), "well-formed");
        assert!(traceparent.ends_with("-01"), "sampled: {traceparent}");
        trace_ids.insert(traceparent[3..35].to_string());
    }
    assert_eq!(trace_ids.len(), 50, "a trace of its own for each record");
}

/// `--format avro`: the repository's schema registered under
/// `<topic>-value`, and 300 records (20% malformed) written: the 240 valid
/// ones framed for that schema id, read back as the same transactions as
/// their JSON (to the timestamp, which the generator takes from the
/// clock), and the malformed ones sent as they were, unframed.
#[tokio::test]
async fn avro_records_are_framed_for_the_registered_schema() {
    use txnflow::domain::schema_event::{EventSchema, SchemaFormat, TRANSACTION_AVRO};
    use txnflow::domain::wire_format::{Framing, framing};
    let topic = create_topic("produce-avro", PARTITIONS).await;
    let output = run(txnflow()
        .args(["produce", "--count", "300", "--rate", "2000", "--invalid-ratio", "0.2", "--seed", "9"])
        .args(["--format", "avro", "--topic", &topic])
        .env("TXNFLOW__KAFKA__BROKERS", brokers()));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "produced 300 records");
    let config = txnflow::config::Config::from_layers([], []).unwrap();
    let registry = txnflow::kafka::schema_registry::SchemaRegistry::new(&config.schema_registry).unwrap().unwrap();
    let id = registry.register(&format!("{topic}-value"), SchemaFormat::Avro, TRANSACTION_AVRO).await.unwrap();
    let schema = EventSchema::parse(SchemaFormat::Avro, TRANSACTION_AVRO).unwrap();

    let mut generator = TransactionGenerator::new(9, 0.2);
    let expected: Vec<_> = (0..300).map(|_| generator.next_record()).collect();
    let records = read_topic(&topic, PARTITIONS, 300, Duration::from_secs(60));
    assert_eq!(records.len(), 300);
    let mut framed = 0;
    for record in &records {
        let sent = expected.iter().find(|e| e.key == record.key).unwrap();
        match framing(&record.value).unwrap() {
            Framing::Framed { schema_id, body } => {
                framed += 1;
                assert_eq!(schema_id, id, "framed for the registered schema");
                let mut read = txnflow::domain::validation::validate(&schema.decode(body).unwrap()).unwrap();
                // The generator dates events when it makes them: the one made
                // again here is later than the one sent.
                let again = parse_event(&sent.value).unwrap();
                assert!(read.timestamp <= again.timestamp);
                read.timestamp = again.timestamp;
                assert_eq!(read, again, "the same transaction as its JSON");
            }
            Framing::Unframed(_) => assert!(sent.invalid.is_some(), "only malformed records go unframed"),
        }
    }
    assert_eq!(framed, expected.iter().filter(|r| r.invalid.is_none()).count());
}
