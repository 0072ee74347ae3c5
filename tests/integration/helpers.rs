//! Test fixtures: each test gets its own database, its own topics and, when
//! it needs fault knobs, its own ML API server, so tests run in parallel and
//! never share state. Everything is real: the local stack of `make up`.

use diesel::pg::PgConnection;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use uuid::Uuid;

use txnflow::config::{Config, KafkaConfig};

pub fn brokers() -> String {
    std::env::var("TXNFLOW_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094".into())
}

/// The default configuration, as the tests' starting point.
pub fn default_config() -> Config {
    Config::from_layers([], []).expect("defaults are valid")
}

#[path = "../support/database.rs"]
mod database;
pub use database::{TestDatabase, admin_db_url};

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = Text)]
    row: String,
}

/// Runs a query and returns each row as a JSON object, for exact assertions.
pub fn query_json(connection: &mut PgConnection, sql: &str) -> Vec<serde_json::Value> {
    diesel::sql_query(format!("SELECT row_to_json(q)::text AS row FROM ({sql}) q"))
        .load::<JsonRow>(connection)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|r| serde_json::from_str(&r.row).unwrap())
        .collect()
}

/// A topic name no other test uses, created with `partitions` partitions.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    let name = format!("test-{prefix}-{}", Uuid::new_v4().simple());
    txnflow::kafka::ensure_topics(&kafka_config(), &[(&name, partitions)]).await.expect("the stack's broker answers");
    name
}

pub fn kafka_config() -> KafkaConfig {
    kafka_config_for(&brokers())
}

pub fn kafka_config_for(brokers: &str) -> KafkaConfig {
    KafkaConfig { brokers: brokers.to_string(), ..default_config().kafka }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl ReadRecord {
    /// The value of header `name`, empty when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(key, _)| key == name).map_or("", |(_, value)| value.as_str())
    }
}

/// Reads `expected` records from every partition of `topic`, from the start,
/// by assignment, without joining a consumer group (not under test).
/// Fails after `deadline` with what it has read, and past the expected
/// count reads on until no record came for 500 ms, so extra records are
/// seen too.
pub fn read_topic(topic: &str, partitions: i32, expected: usize, deadline: Duration) -> Vec<ReadRecord> {
    read_topic_from(&brokers(), topic, partitions, expected, deadline)
}

/// [`read_topic`] on the broker at `brokers`.
pub fn read_topic_from(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    deadline: Duration,
) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let started = Instant::now();
    let mut records = Vec::new();
    let mut settle_until: Option<Instant> = None;
    while started.elapsed() < deadline {
        if records.len() >= expected {
            let until = *settle_until.get_or_insert_with(|| Instant::now() + Duration::from_millis(500));
            if Instant::now() >= until {
                break;
            }
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            // Past the expected count, read on until the topic is quiet.
            if records.len() >= expected {
                settle_until = Some(Instant::now() + Duration::from_millis(500));
            }
            use rdkafka::message::Headers;
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            records.push(ReadRecord {
                headers,
                partition: message.partition(),
                key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                value: message.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    records
}

/// The `txnflow` binary built with this test run.
pub fn txnflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_txnflow"));
    // Tests set what they need; the developer's local overrides must not leak in.
    command.current_dir(std::env::temp_dir()).env_remove("RUST_LOG");
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("TXNFLOW__")) {
        command.env_remove(name);
    }
    command
}

pub fn run(command: &mut Command) -> Output {
    command.output().expect("txnflow runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Starts a reference ML API of this test's own on a free port.
pub fn spawn_ml_api(faults: txnflow::ml::reference_api::Faults) -> SocketAddr {
    txnflow::ml::reference_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), faults).expect("the ML API starts")
}

pub fn no_faults() -> txnflow::ml::reference_api::Faults {
    txnflow::ml::reference_api::Faults::default()
}

/// A port that was free a moment ago, for servers started as processes.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The seed system's sample file, read where it is shared (never copied):
/// `TXNFLOW_SEED_CSV`, else `../shared/` beside the checkout, else `/work/shared/`.
pub fn seed_csv_path() -> std::path::PathBuf {
    let relative = "shared/seed-data/transactions_fr.csv";
    let candidates = [
        std::env::var("TXNFLOW_SEED_CSV").ok().map(std::path::PathBuf::from),
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)),
        Some(std::path::Path::new("/work").join(relative)),
    ];
    candidates.into_iter().flatten().find(|path| path.exists()).unwrap_or_else(|| {
        panic!("the seed file {relative} is not beside the checkout nor in /work; set TXNFLOW_SEED_CSV")
    })
}

/// A child process killed when the test ends, even when it fails.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asserts two sets are equal, reporting counts and a few examples instead
/// of printing thousands of ids.
#[track_caller]
pub fn assert_same_set<T: Ord + std::fmt::Debug>(
    actual: &std::collections::BTreeSet<T>,
    expected: &std::collections::BTreeSet<T>,
    what: &str,
) {
    let missing: Vec<&T> = expected.difference(actual).take(5).collect();
    let extra: Vec<&T> = actual.difference(expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} expected, {} found; missing {} (e.g. {missing:?}), unexpected {} (e.g. {extra:?})",
        expected.len(),
        actual.len(),
        expected.difference(actual).count(),
        actual.difference(expected).count(),
    );
}
