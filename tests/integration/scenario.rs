//! A streaming scenario: its own database, topics, consumer group and ML API,
//! and `txnflow run` started as a real process, so that tests can stop it
//! with SIGTERM or SIGKILL as an operator would.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::helpers::{
    ChildGuard, ReadRecord, TestDatabase, brokers, free_port, kafka_config_for, no_faults, query_json, read_topic_from,
    spawn_ml_api, txnflow,
};

pub const PARTITIONS: i32 = 3;

pub struct Scenario {
    pub db: TestDatabase,
    pub topic: String,
    pub dlq_topic: String,
    group: std::sync::Mutex<String>,
    pub ml_api: SocketAddr,
    producer: std::sync::Mutex<txnflow::kafka::Producer>,
    pub brokers: String,
}

/// One produced event: its key, its bytes, and where the broker put it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub key: String,
    pub partition: i32,
    pub offset: i64,
}

impl Scenario {
    pub async fn new(name: &str) -> Scenario {
        Scenario::with_database(name, TestDatabase::create()).await
    }

    /// A scenario whose database is `db` (for example on a private cluster).
    pub async fn with_database(name: &str, db: TestDatabase) -> Scenario {
        Scenario::with(name, db, brokers()).await
    }

    /// A scenario on the broker at `brokers` (for example a private one).
    pub async fn with(name: &str, db: TestDatabase, brokers: String) -> Scenario {
        let scenario = Scenario::without_topics(name, db, brokers);
        scenario.create_topics().await;
        scenario
    }

    /// A scenario on librdkafka's mock cluster, whose topics have 3 replicas.
    pub fn on_mock(name: &str, db: TestDatabase, cluster: &MockCluster<'static, DefaultProducerContext>) -> Scenario {
        let scenario = Scenario::without_topics(name, db, cluster.bootstrap_servers());
        cluster.create_topic(&scenario.topic, PARTITIONS, 3).unwrap();
        cluster.create_topic(&scenario.dlq_topic, 1, 3).unwrap();
        scenario
    }

    fn without_topics(name: &str, db: TestDatabase, brokers: String) -> Scenario {
        let topic = format!("test-{name}-{}", Uuid::new_v4().simple());
        Scenario {
            db,
            group: std::sync::Mutex::new(format!("{topic}-group")),
            dlq_topic: format!("{topic}-dlq"),
            topic,
            ml_api: spawn_ml_api(no_faults()),
            producer: std::sync::Mutex::new(test_producer(&brokers)),
            brokers,
        }
    }

    /// The consumer group the scenario's services join.
    pub fn group(&self) -> String {
        self.group.lock().unwrap().clone()
    }

    /// Services started from now on join `group` instead.
    pub fn switch_group(&self, group: String) {
        *self.group.lock().unwrap() = group;
    }

    /// A new producer, for a topic deleted and created again under the old one.
    pub fn renew_producer(&self) {
        *self.producer.lock().unwrap() = test_producer(&self.brokers);
    }

    /// A scenario whose DLQ topic has its replicas on `dlq_replicas` only
    /// (for example to take it below its min ISR with one broker down).
    pub async fn with_dlq_replicas(name: &str, db: TestDatabase, dlq_replicas: &[i32]) -> Scenario {
        let scenario = Scenario::without_topics(name, db, brokers());
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            txnflow::kafka::client_config(&kafka_config_for(&scenario.brokers)).create().unwrap();
        let assignment = [dlq_replicas];
        let dlq = rdkafka::admin::NewTopic::new(
            &scenario.dlq_topic,
            1,
            rdkafka::admin::TopicReplication::Variable(&assignment),
        );
        let created = admin.create_topics([&dlq], &rdkafka::admin::AdminOptions::new()).await.unwrap();
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        scenario.create_topics().await;
        scenario
    }

    /// Creates the scenario's input and DLQ topics (again, after a broker lost them).
    pub async fn create_topics(&self) {
        let topics = [(self.topic.as_str(), PARTITIONS), (self.dlq_topic.as_str(), 1)];
        txnflow::kafka::ensure_topics(&kafka_config_for(&self.brokers), &topics).await.expect("the broker answers");
    }

    pub fn ml_api_url(&self) -> String {
        format!("http://{}", self.ml_api)
    }

    /// Turns the fault knobs of this scenario's own reference ML API.
    pub async fn set_faults(&self, knobs: serde_json::Value) {
        let response =
            reqwest::Client::new().post(format!("{}/faults", self.ml_api_url())).json(&knobs).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }

    /// Starts `txnflow run` for this scenario, with `extra` overrides.
    pub async fn start_service(&self, extra: &[(&str, &str)]) -> Service {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{port}.log", self.topic));
        let mut command = txnflow();
        command
            .arg("run")
            .env("TXNFLOW__KAFKA__BROKERS", &self.brokers)
            .env("TXNFLOW__KAFKA__TOPIC", &self.topic)
            .env("TXNFLOW__KAFKA__DLQ_TOPIC", &self.dlq_topic)
            .env("TXNFLOW__KAFKA__GROUP_ID", self.group())
            .env("TXNFLOW__KAFKA__PARTITIONS", PARTITIONS.to_string())
            .env("TXNFLOW__DB__URL", &self.db.url)
            .env("TXNFLOW__PREDICT__URL", self.ml_api_url())
            .env("TXNFLOW__PREDICT__BACKFILL_INTERVAL_MS", "500")
            .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{port}"))
            .env("TXNFLOW__CHAOS__ENABLED", "true")
            .env("TXNFLOW__SHUTDOWN_TIMEOUT_MS", "20000");
        for (key, value) in extra {
            command.env(key, value);
        }
        let log_file = std::fs::File::create(&log).unwrap();
        command.stdout(Stdio::null()).stderr(log_file);
        let service = Service {
            child: Some(ChildGuard(command.spawn().expect("txnflow run starts"))),
            admin: format!("http://127.0.0.1:{port}"),
            log,
        };
        service.wait_ready().await;
        service
    }

    /// Sends every `(key, value)` and returns where each landed.
    pub async fn produce(&self, events: &[(String, Vec<u8>)]) -> Vec<Sent> {
        self.produce_with_traceparents(events, &vec![None; events.len()]).await
    }

    /// Produces each event with its `traceparent` header, where it has one
    /// (the header's bytes as given, well-formed or not).
    pub async fn produce_with_traceparents(
        &self,
        events: &[(String, Vec<u8>)],
        traceparents: &[Option<String>],
    ) -> Vec<Sent> {
        let headers: Vec<Vec<(&str, String)>> = traceparents
            .iter()
            .map(|traceparent| traceparent.iter().map(|value| ("traceparent", value.clone())).collect())
            .collect();
        self.produce_with_headers(events, &headers).await
    }

    /// Produces each event with its headers, as given.
    pub async fn produce_with_headers(
        &self,
        events: &[(String, Vec<u8>)],
        headers: &[Vec<(&str, String)>],
    ) -> Vec<Sent> {
        assert_eq!(events.len(), headers.len());
        let mut sent = Vec::with_capacity(events.len());
        let producer = self.producer.lock().unwrap().clone();
        for (chunk, headers) in events.chunks(2000).zip(headers.chunks(2000)) {
            let deliveries = chunk.iter().zip(headers).map(|((key, value), headers)| {
                let producer = producer.clone();
                async move {
                    let mut record = FutureRecord::to(&self.topic).key(key).payload(value);
                    if !headers.is_empty() {
                        let mut owned = rdkafka::message::OwnedHeaders::new();
                        for (name, value) in headers {
                            owned = owned.insert(rdkafka::message::Header { key: name, value: Some(value) });
                        }
                        record = record.headers(owned);
                    }
                    let delivery =
                        producer.send(record, Duration::from_secs(120)).await.expect("the broker takes the event");
                    Sent { key: key.clone(), partition: delivery.partition, offset: delivery.offset }
                }
            });
            sent.extend(futures_util::future::join_all(deliveries).await);
        }
        sent
    }

    /// One past the last offset sent, per partition, from the sends.
    pub fn end_offsets(sent: &[Sent]) -> BTreeMap<i32, i64> {
        let mut ends = BTreeMap::new();
        for s in sent {
            let end = ends.entry(s.partition).or_insert(0);
            *end = (*end).max(s.offset + 1);
        }
        ends
    }

    /// The group's committed offsets, per partition (without joining it).
    pub fn committed_offsets(&self) -> BTreeMap<i32, i64> {
        self.try_committed_offsets().expect("the group coordinator answers")
    }

    /// [`Scenario::committed_offsets`], or None while the coordinator does not answer.
    pub fn try_committed_offsets(&self) -> Option<BTreeMap<i32, i64>> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).set("group.id", self.group()).create().ok()?;
        let mut partitions = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            partitions.add_partition(&self.topic, partition);
        }
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10)).ok()?;
        Some(
            committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(offset) => Some((e.partition(), offset)),
                    _ => None,
                })
                .collect(),
        )
    }

    /// The stored transaction ids, or None while the database is down.
    pub fn try_transaction_ids(&self) -> Option<BTreeSet<Uuid>> {
        use diesel::Connection;
        let mut connection = diesel::PgConnection::establish(&self.db.url).ok()?;
        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            id: Uuid,
        }
        let ids = diesel::RunQueryDsl::load::<Id>(diesel::sql_query("SELECT id FROM transactions"), &mut connection);
        Some(ids.ok()?.into_iter().map(|row| row.id).collect())
    }

    pub fn transaction_ids(&self) -> BTreeSet<Uuid> {
        query_json(&mut self.db.connect(), "SELECT id FROM transactions")
            .into_iter()
            .map(|row| Uuid::parse_str(row["id"].as_str().unwrap()).unwrap())
            .collect()
    }

    pub fn count(&self, sql: &str) -> i64 {
        query_json(&mut self.db.connect(), &format!("SELECT ({sql}) AS n"))[0]["n"].as_i64().unwrap()
    }

    /// Category per transaction id.
    pub fn predictions(&self) -> BTreeMap<Uuid, String> {
        query_json(&mut self.db.connect(), "SELECT transaction_id, category FROM predictions")
            .into_iter()
            .map(|row| {
                (
                    Uuid::parse_str(row["transaction_id"].as_str().unwrap()).unwrap(),
                    row["category"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn dlq(&self, expected: usize) -> Vec<ReadRecord> {
        read_topic_from(&self.brokers, &self.dlq_topic, 1, expected, Duration::from_secs(60))
    }

    /// Waits until the committed offsets equal `ends`; returns the last seen.
    /// A coordinator that does not answer one read (it moves while a node
    /// restarts) is asked again, until the deadline.
    pub async fn wait_committed(&self, ends: &BTreeMap<i32, i64>, deadline: Duration) -> BTreeMap<i32, i64> {
        let started = Instant::now();
        let mut committed = BTreeMap::new();
        loop {
            if let Some(now) = self.try_committed_offsets() {
                committed = now;
            }
            if &committed == ends || started.elapsed() > deadline {
                eprintln!("committed offsets {committed:?} (end offsets {ends:?}) after {:?}", started.elapsed());
                return committed;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until `condition` holds or `deadline` passes; returns whether it held.
    pub async fn wait_for(&self, deadline: Duration, mut condition: impl FnMut(&Scenario) -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < deadline {
            if condition(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        condition(self)
    }
}

/// The tests' producer: txnflow's, made patient enough (through
/// `[kafka.properties]`) for a partition whose leader is down for 30 s.
fn test_producer(brokers: &str) -> txnflow::kafka::Producer {
    let mut kafka = kafka_config_for(brokers);
    kafka.properties.insert("message.timeout.ms".into(), "120000".into());
    txnflow::kafka::producer(&kafka).unwrap()
}

/// A running `txnflow run` process.
pub struct Service {
    child: Option<ChildGuard>,
    pub admin: String,
    pub log: PathBuf,
}

impl Service {
    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(response) = client.get(format!("{}/ready", self.admin)).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("txnflow run did not become ready; log:\n{}", self.log_tail());
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until this instance holds at least one partition of its group.
    pub async fn wait_assigned(&self, deadline: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < deadline {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.lines().rev().find(|line| line.contains("partitions assigned")).is_some_and(|l| l.contains("[(")) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Whether the process has ended (by itself: a crash).
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.0.try_wait().ok().flatten().is_some())
    }

    /// Peak resident memory of the process so far (VmHWM), in MB.
    pub fn peak_rss_mb(&self) -> f64 {
        let pid = self.child.as_ref().map_or(0, |c| c.0.id());
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }

    /// The value of one metric series, as written in the exposition.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }

    pub async fn chaos(&self, actor: &str, kind: &str) {
        let response =
            reqwest::Client::new().post(format!("{}/chaos/{actor}/{kind}", self.admin)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 202, "chaos {actor}/{kind}");
    }

    /// Sends a signal and waits for the exit status (None: still running at the deadline).
    pub fn signal(&mut self, signal: &str, deadline: Duration) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.take().expect("the service is running");
        let pid = guard.0.id().to_string();
        std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
        let started = Instant::now();
        while started.elapsed() < deadline {
            if let Some(status) = guard.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// `count` valid events from a seeded generator: (key, bytes).
pub fn valid_events(seed: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(seed, 0.0);
    (0..count)
        .map(|_| {
            let record = generator.next_record();
            (record.key, record.value)
        })
        .collect()
}

/// `count` invalid events, the five kinds in turn.
pub fn invalid_events(seed: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(seed, 1.0);
    (0..count)
        .map(|_| {
            let record = generator.next_record();
            (format!("bad-{}", record.key), record.value)
        })
        .collect()
}

pub fn ids_of(events: &[(String, Vec<u8>)]) -> BTreeSet<Uuid> {
    events.iter().map(|(key, _)| Uuid::parse_str(key).unwrap()).collect()
}
