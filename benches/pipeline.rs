//! End-to-end benchmark of `txnflow run` on the local stack (`make up`).
//!
//! Each of `BENCH_RUNS` runs (default 3, back to back) measures:
//!
//! 1. Throughput, twice: with events keyed by their id, and with events
//!    without a key produced in bulk (a tight loop, as a file replay is).
//!    N events are put on a fresh 3-partition topic first, then the service
//!    (release build) starts and the clock runs until every offset is
//!    committed, i.e. every row is durable. Beside it, in the same run, the
//!    same rows are loaded with `psql \copy` into both tables of a fresh,
//!    migrated database: the database's own bulk-load rate. Each throughput
//!    run also prints where the time went, stage by stage
//!    (`txnflow_stage_seconds`), the CPU of each process (txnflow, the ML
//!    API, the broker, PostgreSQL), txnflow's CPU per 1,000 records and its
//!    peak RSS.
//! 2. Latency from the producer's acknowledgement to the row's `created_at`,
//!    at the seed system's rate (about 23 events/s) and at 2,000 events/s,
//!    with the default configuration.
//!
//! The end gives the median and the spread (min–max) of every figure.
//! Then one keyed throughput run each at `BENCH_LARGE_EVENTS` (default
//! 1,000,000 and 5,000,000 on the local cluster; `0` skips them) gives the peak RSS at
//! those counts, and the rate beside `\copy` where the start weighs less.
//!
//! `BENCH_BROKER=mock` runs it on a 3-broker librdkafka mock cluster hosted
//! by the benchmark process (whose CPU is then the broker's), instead of
//! the local stack's three Kafka nodes. A mock partition keeps at most 5 MiB (its log
//! drops the oldest records beyond, as retention does), so there the default
//! is 30,000 events, 10,000 a partition.
//!
//! `BENCH_BASELINE_BIN=PATH` (with `BENCH_BASELINE_NAME`) compares this
//! build with another `txnflow` binary instead: keyed throughput only, each
//! run once with each binary, the order alternated from run to run, and the
//! ratio of this build's rate to the baseline's per run. `make
//! bench-history` uses it against the last build that wrote no prediction
//! history.
//!
//! `BENCH_STATUS_PAGE=1` asks for `/status.json` every 2 s during each
//! run, as an open status page does (a build without the page answers 404).
//!
//! `BENCH_TRACING=1` measures tracing's cost instead: keyed throughput
//! with tracing off, at `sample_ratio` 0.01 and at 1.0, each run once
//! with each, every event carrying a sampled `traceparent` of its own, the
//! spans exported to an OTLP/HTTP receiver in this process. `make
//! bench-tracing` runs it.
//!
//! `BENCH_FORMATS=json,avro` measures the event formats instead: keyed
//! throughput with the events in each format (`json`, `avro`, `protobuf`,
//! `json_schema`), framed for the local registry under `<topic>-value`,
//! each run once with each, the order rotated, each beside `\copy` of the
//! same rows. `make bench-schemas` runs it at 1,000,000 events.
//!
//! `BENCH_PEER=1` compares txnflow with the tool teams run instead: Kafka
//! Connect and the Debezium JDBC sink land the same events first, then
//! txnflow streams them, run by run (`pipeline/peer.rs`). `make
//! bench-peers` runs it at 1,000,000 events.
//!
//!   cargo bench --bench pipeline   (BENCH_RUNS=3, BENCH_EVENTS=300000, BENCH_LATENCY_SECONDS=20, BENCH_BROKER=stack)

use diesel::{Connection, RunQueryDsl};
use futures_util::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureRecord};
use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;
#[path = "../tests/integration/otlp_receiver.rs"]
mod otlp_receiver;
#[path = "pipeline/peer.rs"]
mod peer;

use txnflow::domain::schema_event::{EventSchema, SchemaFormat, transaction_schema_text};
use txnflow::domain::transaction::ProcessingType;
use txnflow::kafka::schema_registry::SchemaRegistry;

use common::{
    Ceiling, CopyRow, CpuSample, TestDatabase, WaitSampler, copy_rate, env_or, median, median_and_spread, pids_named,
    print_stage_table, processing_window, stage_phases,
};

/// The brokers of this benchmark, when not the stack's.
static BROKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn kafka() -> txnflow::config::KafkaConfig {
    let mut kafka = txnflow::config::Config::from_layers([], []).unwrap().kafka;
    if let Some(brokers) = BROKER.get() {
        kafka.brokers = brokers.clone();
    }
    kafka
}

/// Creates a topic on the benchmark's broker.
async fn create_topic(topic: &str, partitions: i32, mock: Option<&MockCluster<'static, DefaultProducerContext>>) {
    match mock {
        Some(cluster) => cluster.create_topic(topic, partitions, 1).unwrap(),
        None => txnflow::kafka::ensure_topics(&kafka(), &[(topic, partitions)]).await.unwrap(),
    }
}

/// Whether events carry their id as the key, or no key at all.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    ById,
    None,
}

impl Keys {
    fn as_str(self) -> &'static str {
        match self {
            Keys::ById => "keyed",
            Keys::None => "unkeyed",
        }
    }
}

/// Produces every event as fast as the producer takes them, and returns
/// each partition's end offset.
async fn produce(topic: &str, events: &[(String, Vec<u8>)], keys: Keys, traceparents: bool) -> BTreeMap<i32, i64> {
    let producer = txnflow::kafka::producer(&kafka()).unwrap();
    let mut ends = BTreeMap::new();
    for (done, chunk) in events.chunks(5_000).enumerate() {
        let sends = chunk.iter().enumerate().map(|(n, (key, value))| {
            let record = FutureRecord::to(topic).payload(value);
            let record = if keys == Keys::ById { record.key(key) } else { record };
            // Each event its own trace, sampled by its producer.
            let record = if traceparents {
                let traceparent =
                    txnflow::domain::trace_context::new_traceparent(rand::random(), (done * 5_000 + n) as u64);
                let header = rdkafka::message::Header { key: "traceparent", value: Some(&traceparent) };
                record.headers(rdkafka::message::OwnedHeaders::new().insert(header))
            } else {
                record
            };
            producer.send(record, Duration::from_secs(30))
        });
        for delivery in futures_util::future::join_all(sends).await {
            let delivery = delivery.map_err(|(e, _)| e).unwrap();
            let end = ends.entry(delivery.partition).or_insert(0);
            *end = (*end).max(delivery.offset + 1);
        }
        if (done + 1) % 20 == 0 {
            println!("  produced {} / {}", (done + 1) * 5_000, events.len());
        }
    }
    ends
}

fn committed(topic: &str, group: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &kafka().brokers).set("group.id", group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        list.add_partition(topic, partition);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// A child process that is stopped (SIGTERM, then waited for) when dropped.
struct Child(std::process::Child);

impl Child {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn peak_rss_mb(&self) -> f64 {
        common::rss_mb(self.0.id()).1
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// `txnflow ml-api` as its own process, so that its CPU is its own.
fn start_ml_api(port: u16) -> (Child, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_txnflow"))
        .args(["ml-api", "--listen", &format!("127.0.0.1:{port}")])
        .env("TXNFLOW__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the ML API does not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Child(child), url)
}

/// This build's `txnflow`.
const THIS_BUILD: &str = env!("CARGO_BIN_EXE_txnflow");

/// How the service under test runs: which binary, with which more
/// environment, and whether the events carry a `traceparent` header.
struct Setup<'a> {
    binary: &'a str,
    env: Vec<(&'static str, String)>,
    traceparents: bool,
    /// Plain JSON events (None), or events framed for the registry in a
    /// schema format, registered under `<topic>-value`.
    format: Option<SchemaFormat>,
}

impl Setup<'_> {
    fn of(binary: &str) -> Setup<'_> {
        Setup { binary, env: Vec::new(), traceparents: false, format: None }
    }
}

fn start_service(setup: &Setup<'_>, topic: &str, db: &str, admin_port: u16, ml_api: &str) -> Child {
    let child = Command::new(setup.binary)
        .arg("run")
        .env("TXNFLOW__KAFKA__BROKERS", kafka().brokers)
        .env("TXNFLOW__KAFKA__TOPIC", topic)
        .env("TXNFLOW__KAFKA__DLQ_TOPIC", format!("{topic}-dlq"))
        .env("TXNFLOW__KAFKA__GROUP_ID", format!("{topic}-group"))
        .env("TXNFLOW__DB__URL", db)
        .env("TXNFLOW__PREDICT__URL", ml_api)
        .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("TXNFLOW__LOG__LEVEL", "warn")
        .envs(setup.env.iter().map(|(key, value)| (key, value)))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Child(child)
}

async fn scrape(admin_port: u16) -> String {
    let url = format!("http://127.0.0.1:{admin_port}/metrics");
    match reqwest::get(&url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Deletes a run's topics once it is measured: a topic of a million
/// events holds 200 MB a replica, and idle partitions still cost the
/// nodes CPU. The mock cluster goes with the process.
async fn delete_topics(topics: &[&str], mock: Option<&MockCluster<'static, DefaultProducerContext>>) {
    if mock.is_some() {
        return;
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &kafka().brokers).create().unwrap();
    if let Err(error) = admin.delete_topics(topics, &rdkafka::admin::AdminOptions::new()).await {
        println!("  could not delete the topics {topics:?}: {error}");
    }
}

/// The events of run `run`: `count` valid events from the producer's
/// generator, seeded by the run, as (key, value).
fn bench_events(run: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(99 + run, 0.0);
    (0..count).map(|_| generator.next_record()).map(|r| (r.key, r.value)).collect()
}

/// What one throughput run measured.
struct Throughput {
    rate: f64,
    copy: f64,
    /// The ceiling loader's best rate for the same rows (`common::Ceiling`).
    ceiling: f64,
    /// Its rate while the CPU the run's other processes used is taken (NaN
    /// with `BENCH_CEILING_SHARED=0`).
    ceiling_shared: f64,
    rss_mb: f64,
    txnflow_cpu_ms_per_1000: f64,
    postgresql_cpu_seconds: f64,
    /// Trace spans exported and dropped (queue full or export failed), as
    /// the service counted them when the last row was committed.
    spans_exported: f64,
    spans_dropped: f64,
}

fn stored_rows(db: &str) -> usize {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let count: Count = diesel::sql_query("SELECT count(*) AS n FROM transactions")
        .get_result(&mut diesel::PgConnection::establish(db).unwrap())
        .unwrap();
    count.n as usize
}

/// How the rows of each partition were spread over the processing window:
/// the share of the window in which each partition's rows were stored.
fn partition_spans(db: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Span {
        #[diesel(sql_type = diesel::sql_types::Text)]
        partition: String,
        #[diesel(sql_type = diesel::sql_types::Double)]
        from_s: f64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        to_s: f64,
    }
    let spans: Vec<Span> = diesel::sql_query(
        "WITH t0 AS (SELECT min(created_at) AS t0 FROM transactions)
         SELECT split_part(source, '/', 2) AS partition,
                extract(epoch FROM min(created_at) - t0)::float8 AS from_s,
                extract(epoch FROM max(created_at) - t0)::float8 AS to_s
         FROM transactions, t0 GROUP BY 1, t0 ORDER BY 1",
    )
    .load(&mut diesel::PgConnection::establish(db).unwrap())
    .unwrap();
    spans
        .iter()
        .map(|s| format!("partition {} {:.1}–{:.1} s", s.partition, s.from_s, s.to_s))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn throughput(
    setup: &Setup<'_>,
    run: u64,
    keys: Keys,
    count: usize,
    ml_api: &str,
    ml_api_pid: u32,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) -> Throughput {
    println!("run {run}, {} events: generating and producing {count} to a fresh topic", keys.as_str());
    let events = bench_events(run, count);
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 3, mock).await;
    create_topic(&format!("{topic}-dlq"), 1, mock).await;
    let ends = match setup.format {
        None => produce(&topic, &events, keys, setup.traceparents).await,
        Some(format) => {
            let framed = framed_events(&topic, format, &events).await;
            produce(&topic, &framed, keys, setup.traceparents).await
        }
    };
    println!("  partitions' ends: {ends:?}");
    if mock.is_none() {
        bare_read(&topic, &ends).await;
    }
    let database = TestDatabase::create();
    let db = database.url.clone();
    let admin_port = 18391;
    let service = start_service(setup, &topic, &db, admin_port, ml_api);
    let mut roles = vec![("txnflow", vec![service.pid()]), ("ml-api", vec![ml_api_pid])];
    roles.push(("broker", if mock.is_some() { vec![std::process::id()] } else { common::kafka_pids() }));
    roles.push(("postgresql", pids_named("postgres")));
    let cpu = CpuSample::start(roles);
    let waits = WaitSampler::start(&db);
    // An open status page: its JSON asked for every 2 s, as the page does.
    let page = std::env::var("BENCH_STATUS_PAGE").is_ok_and(|value| value == "1").then(|| {
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let _ = client.get(format!("http://127.0.0.1:{admin_port}/status.json")).send().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    });
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let done = committed(&topic, &format!("{topic}-group"));
        if done == ends {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            let progress: i64 = done.values().sum();
            println!("  {progress} / {count} committed after {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(page) = page {
        page.abort();
    }
    let metrics = scrape(admin_port).await;
    let (used, cpu_seconds) = cpu.end();
    let waits = waits.end();
    let rss_mb = service.peak_rss_mb();
    drop(service);
    delete_topics(&[&topic, &format!("{topic}-dlq")], mock).await;
    // The processing window, from the first row stored to the last; the
    // wall time above also holds the start and the consumer group join.
    let window = processing_window(&db);
    let stored = stored_rows(&db);
    assert_eq!(
        stored, count,
        "every event is stored (a broker that keeps less, such as the mock cluster's 5 MiB per partition, fails here)"
    );
    let rate = count as f64 / window;
    println!(
        "  {count} events durable {elapsed:.1} s after the start; first to last row {window:.1} s = {rate:.0} transactions/s"
    );
    println!("  rows stored, per partition, from the first row: {}", partition_spans(&db));
    let described: Vec<String> =
        used.iter().map(|(role, s)| format!("{role} {s:.1} s ({:.0}% of a core)", 100.0 * s / cpu_seconds)).collect();
    println!("  CPU over {cpu_seconds:.1} s (2 cores = 200%): {}", described.join(", "));
    if mock.is_none() {
        println!("  Kafka nodes' RSS, now / peak since start: {}", common::kafka_rss_line());
    }
    let txnflow_cpu = used.iter().find(|(role, _)| *role == "txnflow").map_or(0.0, |(_, s)| *s);
    let txnflow_cpu_ms_per_1000 = 1000.0 * txnflow_cpu / (count as f64 / 1000.0);
    let postgresql_cpu_seconds = used.iter().find(|(role, _)| *role == "postgresql").map_or(0.0, |(_, s)| *s);
    println!("  txnflow's PostgreSQL backends, sampled every 50 ms: {waits}");
    println!("  where the time went (txnflow_stage_seconds over the {window:.1} s window):");
    print_stage_table(&stage_phases(&metrics), window);
    let rows: Vec<CopyRow> = events
        .iter()
        .enumerate()
        .map(|(offset, (_, value))| CopyRow {
            transaction: txnflow::domain::event::parse_event(value).unwrap(),
            processing_type: ProcessingType::Streaming,
            run_id: String::new(),
            batch_id: String::new(),
            source: format!("bench/0/{offset}"),
        })
        .collect();
    let copy = copy_rate(rows.iter());
    println!(
        "  psql \\copy of the same rows: {copy:.0} rows/s; pipeline / copy = {:.2}; txnflow CPU {txnflow_cpu_ms_per_1000:.0} ms per 1,000 records; peak RSS {rss_mb:.1} MB",
        rate / copy
    );
    // The cores every process but PostgreSQL used over the run.
    let others_cores = used.iter().filter(|(role, _)| *role != "postgresql").map(|(_, s)| s).sum::<f64>() / cpu_seconds;
    let ceiling = Ceiling::measure(&rows, others_cores);
    let ceiling_shared = ceiling.shared.map_or(f64::NAN, |(_, rate, _)| rate);
    println!(
        "  ceiling (binary COPY of the same rows, predictions and history, pre-encoded): {}; pipeline / ceiling = {:.2}, / the ceiling with that CPU taken = {:.2}; the pipeline's PostgreSQL {:.1} µs CPU per row",
        ceiling.describe(),
        rate / ceiling.rate,
        rate / ceiling_shared,
        1e6 * postgresql_cpu_seconds / count as f64
    );
    let spans = |outcome: &str| {
        let series = format!("txnflow_trace_spans_total{{outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|line| line.strip_prefix(&series)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    let spans_exported = spans("exported");
    let spans_dropped = spans("dropped_queue_full") + spans("dropped_export_failed");
    Throughput {
        rate,
        copy,
        ceiling: ceiling.rate,
        ceiling_shared,
        rss_mb,
        txnflow_cpu_ms_per_1000,
        postgresql_cpu_seconds,
        spans_exported,
        spans_dropped,
    }
}

/// The events framed for the registry in `format`, its schema registered
/// under `<topic>-value` first, as `txnflow produce --format` does.
async fn framed_events(topic: &str, format: SchemaFormat, events: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let config = txnflow::config::Config::from_layers([], []).unwrap().schema_registry;
    let registry = SchemaRegistry::new(&config).unwrap().expect("schema_registry.url is set by default");
    let text = transaction_schema_text(format);
    let id = registry.register(&format!("{topic}-value"), format, text).await.expect("the local registry is up");
    let schema = EventSchema::parse(format, text).unwrap();
    let framed: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|(key, value)| {
            let event: serde_json::Value = serde_json::from_slice(value).unwrap();
            (key.clone(), schema.frame(id, &event).unwrap())
        })
        .collect();
    let size = |events: &[(String, Vec<u8>)]| events.iter().map(|(_, value)| value.len()).sum::<usize>();
    println!(
        "  framed in {} (schema id {id}): {:.0} bytes an event, against {:.0} as JSON",
        format.as_str(),
        size(&framed) as f64 / events.len() as f64,
        size(events) as f64 / events.len() as f64
    );
    framed
}

/// Reads the whole topic with a bare librdkafka consumer (no group, no
/// decoding, nothing sent on) with the reader's prefetch settings, and
/// prints its rate (`BENCH_READ_QUEUE_KB`, `BENCH_READ_BACKOFF_MS` change
/// the two): how fast the brokers and librdkafka alone hand over
/// these records on this machine, the ceiling of the reading stage.
async fn bare_read(topic: &str, ends: &BTreeMap<i32, i64>) {
    use rdkafka::consumer::StreamConsumer;
    let queue_kb = env_or("BENCH_READ_QUEUE_KB", 16384).to_string();
    let backoff_ms = env_or("BENCH_READ_BACKOFF_MS", 10).to_string();
    let consumer: StreamConsumer = txnflow::kafka::client_config_with(
        &kafka(),
        &[
            ("group.id", "bench-bare-read"),
            ("enable.auto.commit", "false"),
            ("queued.max.messages.kbytes", queue_kb.as_str()),
            ("fetch.queue.backoff.ms", backoff_ms.as_str()),
        ],
    )
    .create()
    .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in ends.keys() {
        list.add_partition_offset(topic, *partition, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let total: i64 = ends.values().sum();
    let (mut read, mut bytes) = (0i64, 0usize);
    let mut first = None;
    while read < total {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("the bare reader gets every record within 30 s")
            .unwrap();
        first.get_or_insert_with(Instant::now);
        bytes += rdkafka::message::Message::payload(&message).map_or(0, <[u8]>::len);
        read += 1;
    }
    let seconds = first.map_or(0.0, |at| at.elapsed().as_secs_f64());
    println!(
        "  bare librdkafka read of the topic (queued.max.messages.kbytes {queue_kb}, fetch.queue.backoff.ms {backoff_ms}): {read} records in {seconds:.1} s = {:.0} records/s, {:.1} MB/s",
        read as f64 / seconds,
        bytes as f64 / seconds / 1e6
    );
}

/// Produces at `rate` events/s for `seconds`, and returns when each event's
/// delivery was acknowledged, by its id.
async fn produce_at_rate(
    topic: &str,
    rate: u64,
    seconds: u64,
    generator: &mut txnflow::cli::produce::TransactionGenerator,
) -> HashMap<String, SystemTime> {
    let producer = txnflow::kafka::producer(&kafka()).unwrap();
    // Sent in ticks of 10 ms (or one event per tick below 100 events/s).
    let per_tick = (rate / 100).max(1);
    let tick = Duration::from_secs_f64(per_tick as f64 / rate as f64);
    let mut ticker = tokio::time::interval(tick);
    let mut deliveries = futures_util::stream::FuturesUnordered::new();
    let mut acked = HashMap::new();
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        ticker.tick().await;
        for _ in 0..per_tick {
            let record = generator.next_record();
            let send = producer
                .send_result(FutureRecord::to(topic).key(&record.key).payload(&record.value))
                .map_err(|(e, _)| e)
                .unwrap();
            let key = record.key;
            deliveries.push(async move {
                let delivered = send.await;
                (key, delivered, SystemTime::now())
            });
        }
        while let Some(Some((key, delivered, at))) = futures_util::FutureExt::now_or_never(deliveries.next()) {
            delivered.unwrap().map_err(|(e, _)| e).unwrap();
            acked.insert(key, at);
        }
    }
    while let Some((key, delivered, at)) = deliveries.next().await {
        delivered.unwrap().map_err(|(e, _)| e).unwrap();
        acked.insert(key, at);
    }
    acked
}

/// Latency percentiles, in ms: p50, p99, p99.9, max.
async fn latency(
    run: u64,
    rate: u64,
    seconds: u64,
    ml_api: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) -> [f64; 4] {
    let topic = format!("bench-latency-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 3, mock).await;
    create_topic(&format!("{topic}-dlq"), 1, mock).await;
    let database = TestDatabase::create();
    let db = database.url.clone();
    let service = start_service(&Setup::of(THIS_BUILD), &topic, &db, 18392, ml_api);
    // Let the consumer join its group before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!("run {run}, latency: {rate} events/s for {seconds} s, default configuration");
    let mut generator = txnflow::cli::produce::TransactionGenerator::new(7 + run, 0.0);
    let acked = produce_at_rate(&topic, rate, seconds, &mut generator).await;
    let mut connection = diesel::PgConnection::establish(&db).unwrap();
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
        #[diesel(sql_type = diesel::sql_types::Double)]
        at: f64,
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows: Vec<Row> = loop {
        let rows: Vec<Row> =
            diesel::sql_query("SELECT id::text AS id, extract(epoch FROM created_at)::float8 AS at FROM transactions")
                .load(&mut connection)
                .unwrap();
        if rows.len() >= acked.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(service);
    let mut latencies: Vec<f64> = rows
        .iter()
        .filter_map(|row| {
            acked.get(&row.id).map(|sent| row.at - sent.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64())
        })
        .collect();
    assert_eq!(latencies.len(), acked.len(), "every event produced is stored");
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] * 1000.0;
    let figures = [percentile(0.5), percentile(0.99), percentile(0.999), latencies.last().unwrap() * 1000.0];
    println!(
        "  latency over {} events: p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms, max {:.0} ms",
        latencies.len(),
        figures[0],
        figures[1],
        figures[2],
        figures[3]
    );
    figures
}

fn main() {
    let runs = env_or("BENCH_RUNS", 3);
    let mocked = std::env::var("BENCH_BROKER").as_deref() == Ok("mock");
    let count = env_or("BENCH_EVENTS", if mocked { 30_000 } else { 300_000 }) as usize;
    let latency_seconds = env_or("BENCH_LATENCY_SECONDS", 20);
    // For a quicker look: BENCH_KEYS=keyed or unkeyed, BENCH_LATENCY_SECONDS=0.
    let only_keys = std::env::var("BENCH_KEYS").unwrap_or_default();
    let large_counts = large_event_counts(mocked);
    let mock = mocked.then(|| MockCluster::new(3).expect("librdkafka's mock cluster starts"));
    if let Some(cluster) = &mock {
        BROKER.set(cluster.bootstrap_servers()).unwrap();
        println!("broker: a 3-broker librdkafka mock cluster at {}", cluster.bootstrap_servers());
    } else {
        println!("broker: the local stack's Apache Kafka cluster, 3 nodes");
    }
    let mock = mock.as_ref();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (ml_api_process, ml_api) = start_ml_api(18393);
        if let Ok(baseline) = std::env::var("BENCH_BASELINE_BIN") {
            let name = std::env::var("BENCH_BASELINE_NAME").unwrap_or_else(|_| baseline.clone());
            compare_builds(runs, count, &baseline, &name, &ml_api, ml_api_process.pid(), mock).await;
            return;
        }
        if std::env::var("BENCH_TRACING").as_deref() == Ok("1") {
            compare_tracing(runs, count, &ml_api, ml_api_process.pid(), mock).await;
            return;
        }
        if std::env::var("BENCH_PEER").as_deref() == Ok("1") {
            compare_peer(runs, count, &ml_api, ml_api_process.pid()).await;
            return;
        }
        if let Ok(formats) = std::env::var("BENCH_FORMATS") {
            compare_formats(runs, count, &formats, &ml_api, ml_api_process.pid(), mock).await;
            return;
        }
        let mut throughputs: HashMap<&str, Vec<Throughput>> = HashMap::new();
        let mut latencies: HashMap<u64, Vec<[f64; 4]>> = HashMap::new();
        for run in 1..=runs {
            for keys in [Keys::ById, Keys::None] {
                if !only_keys.is_empty() && only_keys != keys.as_str() {
                    continue;
                }
                let measured =
                    throughput(&Setup::of(THIS_BUILD), run, keys, count, &ml_api, ml_api_process.pid(), mock).await;
                throughputs.entry(keys.as_str()).or_default().push(measured);
            }
            for rate in [23, 2_000].into_iter().filter(|_| latency_seconds > 0) {
                latencies.entry(rate).or_default().push(latency(run, rate, latency_seconds, &ml_api, mock).await);
            }
        }
        println!();
        println!("summary: median (min–max) of {runs} runs of {count} events, release build, this machine");
        println!(
            "| events | txn/s | psql \\copy rows/s | pipeline / copy | ceiling rows/s | share of ceiling | share of the ceiling with the others' CPU taken | txnflow CPU ms per 1,000 | peak RSS MB |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for keys in ["keyed", "unkeyed"] {
            let Some(measured) = throughputs.get(keys) else { continue };
            let figures = |f: fn(&Throughput) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
            println!(
                "| {keys} | {} | {} | {} | {} | {} | {} | {} | {} |",
                median_and_spread(&figures(|t| t.rate), 0),
                median_and_spread(&figures(|t| t.copy), 0),
                median_and_spread(&figures(|t| t.rate / t.copy), 2),
                median_and_spread(&figures(|t| t.ceiling), 0),
                median_and_spread(&figures(|t| t.rate / t.ceiling), 2),
                median_and_spread(&figures(|t| t.rate / t.ceiling_shared), 2),
                median_and_spread(&figures(|t| t.txnflow_cpu_ms_per_1000), 0),
                median_and_spread(&figures(|t| t.rss_mb), 0),
            );
        }
        println!("| rate | p50 ms | p99 ms | p99.9 ms | max ms |");
        println!("|---|---|---|---|---|");
        for rate in [23, 2_000] {
            let Some(measured) = latencies.get(&rate) else { continue };
            let figure = |i: usize| median_and_spread(&measured.iter().map(|f| f[i]).collect::<Vec<_>>(), 0);
            println!("| {rate} events/s | {} | {} | {} | {} |", figure(0), figure(1), figure(2), figure(3));
        }
        if let Some(seed_rate) = latencies.get(&23) {
            let p99 = median(&seed_rate.iter().map(|f| f[1]).collect::<Vec<_>>());
            println!("target: p99 at 23 events/s <= buffer.max_wait_ms + 250 = 1250 ms; median p99 {p99:.0} ms");
        }
        let mut large = Vec::new();
        for (i, &events) in large_counts.iter().enumerate() {
            println!();
            println!("large run {}/{}: {events} keyed events, one run", i + 1, large_counts.len());
            let run = runs + 1 + i as u64;
            let measured =
                throughput(&Setup::of(THIS_BUILD), run, Keys::ById, events, &ml_api, ml_api_process.pid(), mock).await;
            large.push((events, measured));
        }
        if !large.is_empty() {
            println!();
            println!("memory and rate at large counts, keyed, one run each (target: peak RSS <= 150 MB, flat):");
            println!(
                "| events | txn/s | psql \\copy rows/s | pipeline / copy | ceiling rows/s | share of ceiling | txnflow CPU ms per 1,000 | peak RSS MB |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for (events, t) in &large {
                println!(
                    "| {events} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.1} |",
                    t.rate,
                    t.copy,
                    t.rate / t.copy,
                    t.ceiling,
                    t.rate / t.ceiling,
                    t.txnflow_cpu_ms_per_1000,
                    t.rss_mb
                );
            }
        }
    });
}

/// `make bench-peers`: each run lands its events with the peer
/// (`peer::land`), then streams the same events through txnflow's full
/// pipeline, ML API and history included, beside `\copy` and the ceiling.
async fn compare_peer(runs: u64, count: usize, ml_api: &str, ml_api_pid: u32) {
    let lib = peer::jars();
    let mut pairs = Vec::new();
    for run in 1..=runs {
        println!("run {run} of {runs}");
        let landed = peer::land(&lib, run, &bench_events(run, count)).await;
        let streamed = throughput(&Setup::of(THIS_BUILD), run, Keys::ById, count, ml_api, ml_api_pid, None).await;
        println!("  txnflow / peer = {:.2}", streamed.rate / landed.rate);
        pairs.push((streamed, landed));
    }
    let txnflow = |f: fn(&Throughput) -> f64| pairs.iter().map(|(t, _)| f(t)).collect::<Vec<f64>>();
    let peer = |f: fn(&peer::PeerLanding) -> f64| pairs.iter().map(|(_, p)| f(p)).collect::<Vec<f64>>();
    println!();
    println!("summary: median (min–max) of {runs} runs of {count} keyed events, the same events for both");
    println!("| | rows/s | CPU ms per 1,000 | peak RSS MB | writes |");
    println!("|---|---|---|---|---|");
    println!(
        "| txnflow | {} | {} | {} | transactions, predictions (ML API), history |",
        median_and_spread(&txnflow(|t| t.rate), 0),
        median_and_spread(&txnflow(|t| t.txnflow_cpu_ms_per_1000), 0),
        median_and_spread(&txnflow(|t| t.rss_mb), 0),
    );
    println!(
        "| Kafka Connect + Debezium JDBC sink | {} | {} | {} | transactions (upsert) |",
        median_and_spread(&peer(|p| p.rate), 0),
        median_and_spread(&peer(|p| p.cpu_ms_per_1000), 0),
        median_and_spread(&peer(|p| p.rss_mb), 0),
    );
    let ratios: Vec<f64> = pairs.iter().map(|(t, p)| t.rate / p.rate).collect();
    let shares: Vec<f64> = pairs.iter().map(|(t, _)| t.rate / t.ceiling).collect();
    let shared_shares: Vec<f64> = pairs.iter().map(|(t, _)| t.rate / t.ceiling_shared).collect();
    println!("txnflow / peer, run by run: {}", median_and_spread(&ratios, 2));
    println!("txnflow / ceiling, run by run: {}", median_and_spread(&shares, 2));
    println!(
        "txnflow / the ceiling with the CPU the others used taken, run by run: {}",
        median_and_spread(&shared_shares, 2)
    );
    println!(
        "bench-peers: txnflow={:.0} peer={:.0} ratio_to_peer={:.2} share_of_ceiling={:.2}",
        median(&txnflow(|t| t.rate)),
        median(&peer(|p| p.rate)),
        median(&ratios),
        median(&shares)
    );
}

/// Keyed throughput of this build against `baseline`, run by run, the
/// order alternated so that neither always runs on a warmer machine.
async fn compare_builds(
    runs: u64,
    count: usize,
    baseline: &str,
    name: &str,
    ml_api: &str,
    ml_api_pid: u32,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) {
    let baseline = std::fs::canonicalize(baseline).expect("BENCH_BASELINE_BIN is a txnflow binary");
    let baseline = baseline.to_str().unwrap();
    let mut pairs = Vec::new();
    for run in 1..=runs {
        let mut order = [(THIS_BUILD, "this build"), (baseline, name)];
        if run % 2 == 0 {
            order.reverse();
        }
        let mut measured = HashMap::new();
        for (binary, label) in order {
            println!("run {run}: {label}");
            let setup = Setup::of(binary);
            measured.insert(label, throughput(&setup, run, Keys::ById, count, ml_api, ml_api_pid, mock).await);
        }
        pairs.push((measured.remove("this build").unwrap(), measured.remove(name).unwrap()));
    }
    println!();
    println!(
        "summary: this build against {name}, median (min–max) of {runs} runs of {count} keyed events each, alternated"
    );
    println!("| build | txn/s | pipeline / copy | PostgreSQL CPU s | txnflow CPU ms per 1,000 | peak RSS MB |");
    println!("|---|---|---|---|---|---|");
    for (label, side) in [("this build", 0), (name, 1)] {
        let figures = |f: fn(&Throughput) -> f64| {
            pairs.iter().map(|pair| f(if side == 0 { &pair.0 } else { &pair.1 })).collect::<Vec<f64>>()
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            median_and_spread(&figures(|t| t.rate), 0),
            median_and_spread(&figures(|t| t.rate / t.copy), 2),
            median_and_spread(&figures(|t| t.postgresql_cpu_seconds), 1),
            median_and_spread(&figures(|t| t.txnflow_cpu_ms_per_1000), 0),
            median_and_spread(&figures(|t| t.rss_mb), 0),
        );
    }
    let ratios: Vec<f64> = pairs.iter().map(|(this, other)| this.rate / other.rate).collect();
    println!("this build / {name}, run by run: {}", median_and_spread(&ratios, 3));
}

/// Keyed throughput with tracing off, at `sample_ratio` 0.01 and at 1.0,
/// every event with a sampled `traceparent` of its own, the spans exported
/// to an OTLP receiver in this process; the order rotated from run to run.
async fn compare_tracing(
    runs: u64,
    count: usize,
    ml_api: &str,
    ml_api_pid: u32,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) {
    let receiver = otlp_receiver::Receiver::listen(false);
    let variants = ["off", "0.01", "1.0"];
    let mut measured: HashMap<&str, Vec<Throughput>> = HashMap::new();
    for run in 1..=runs {
        let mut order = variants;
        order.rotate_left((run as usize - 1) % variants.len());
        for variant in order {
            println!("run {run}: tracing {variant}");
            let mut setup = Setup { traceparents: true, ..Setup::of(THIS_BUILD) };
            if variant != "off" {
                setup.env = vec![
                    ("TXNFLOW__TRACING__OTLP_ENDPOINT", receiver.url()),
                    ("TXNFLOW__TRACING__SAMPLE_RATIO", variant.to_string()),
                ];
            }
            let before = receiver.span_count();
            let result = throughput(&setup, run, Keys::ById, count, ml_api, ml_api_pid, mock).await;
            println!(
                "  spans: {:.0} exported, {:.0} dropped; {} received (by the service's exit)",
                result.spans_exported,
                result.spans_dropped,
                receiver.span_count() - before
            );
            measured.entry(variant).or_default().push(result);
        }
    }
    receiver.stop();
    println!();
    println!("summary: tracing, median (min–max) of {runs} runs of {count} keyed events each, order rotated");
    println!(
        "| tracing | txn/s | / off, run by run | pipeline / copy | txnflow CPU ms per 1,000 | spans exported | spans dropped |"
    );
    println!("|---|---|---|---|---|---|---|");
    let off: Vec<f64> = measured["off"].iter().map(|t| t.rate).collect();
    for variant in variants {
        let results = &measured[variant];
        let figures = |f: fn(&Throughput) -> f64| results.iter().map(f).collect::<Vec<f64>>();
        let ratios: Vec<f64> = results.iter().zip(&off).map(|(t, off)| t.rate / off).collect();
        println!(
            "| {variant} | {} | {} | {} | {} | {} | {} |",
            median_and_spread(&figures(|t| t.rate), 0),
            median_and_spread(&ratios, 3),
            median_and_spread(&figures(|t| t.rate / t.copy), 2),
            median_and_spread(&figures(|t| t.txnflow_cpu_ms_per_1000), 0),
            median_and_spread(&figures(|t| t.spans_exported), 0),
            median_and_spread(&figures(|t| t.spans_dropped), 0),
        );
    }
}

/// Keyed throughput with the events in each of `formats` (commas between
/// them: `json` for plain JSON, or a schema format), the order rotated from
/// run to run; each beside `\copy` of the same rows in the same run.
async fn compare_formats(
    runs: u64,
    count: usize,
    formats: &str,
    ml_api: &str,
    ml_api_pid: u32,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
) {
    let variants: Vec<(&str, Option<SchemaFormat>)> = formats
        .split(',')
        .map(str::trim)
        .map(|name| match name {
            "json" => (name, None),
            "avro" => (name, Some(SchemaFormat::Avro)),
            "protobuf" => (name, Some(SchemaFormat::Protobuf)),
            "json_schema" => (name, Some(SchemaFormat::JsonSchema)),
            _ => panic!("BENCH_FORMATS: json, avro, protobuf or json_schema, with commas between them"),
        })
        .collect();
    let mut measured: HashMap<&str, Vec<Throughput>> = HashMap::new();
    for run in 1..=runs {
        let mut order = variants.clone();
        order.rotate_left((run as usize - 1) % variants.len());
        for (name, format) in order {
            println!("run {run}: events in {name}");
            let setup = Setup { format, ..Setup::of(THIS_BUILD) };
            measured
                .entry(name)
                .or_default()
                .push(throughput(&setup, run, Keys::ById, count, ml_api, ml_api_pid, mock).await);
        }
    }
    println!();
    println!("summary: event formats, median (min–max) of {runs} runs of {count} keyed events each, order rotated");
    println!(
        "| events | txn/s | / {}, run by run | pipeline / copy | txnflow CPU ms per 1,000 | peak RSS MB |",
        variants[0].0
    );
    println!("|---|---|---|---|---|---|");
    let first: Vec<f64> = measured[variants[0].0].iter().map(|t| t.rate).collect();
    for (name, _) in &variants {
        let results = &measured[name];
        let figures = |f: fn(&Throughput) -> f64| results.iter().map(f).collect::<Vec<f64>>();
        let ratios: Vec<f64> = results.iter().zip(&first).map(|(t, first)| t.rate / first).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            median_and_spread(&figures(|t| t.rate), 0),
            median_and_spread(&ratios, 3),
            median_and_spread(&figures(|t| t.rate / t.copy), 2),
            median_and_spread(&figures(|t| t.txnflow_cpu_ms_per_1000), 0),
            median_and_spread(&figures(|t| t.rss_mb), 0),
        );
    }
}

/// The event counts of the large keyed runs: `BENCH_LARGE_EVENTS`, commas
/// between them, `0` for none. A mock partition keeps only 5 MiB, so there
/// are none by default on the mock cluster.
fn large_event_counts(mocked: bool) -> Vec<usize> {
    let default = if mocked { "0" } else { "1000000,5000000" };
    let spec = std::env::var("BENCH_LARGE_EVENTS").unwrap_or_else(|_| default.to_string());
    spec.split(',')
        .map(|n| n.trim().parse::<usize>().expect("BENCH_LARGE_EVENTS: event counts with commas between them"))
        .filter(|&n| n > 0)
        .collect()
}
