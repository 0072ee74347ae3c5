//! End-to-end benchmark of `txnflow run` on the local stack (`make up`).
//!
//! 1. Throughput: N events are put on a fresh topic first, then the service
//!    (release build) starts and the clock runs until every offset is
//!    committed, i.e. every row is durable. Beside it, in the same run, the
//!    same rows are loaded with `psql \copy` into both tables of a fresh
//!    database: the database's own bulk-load rate.
//! 2. Latency: events at the seed system's rate (about 23/s) with the default
//!    configuration; for each, from the producer's acknowledgement to the
//!    row's `created_at`.
//! 3. Peak RSS of the service (VmHWM).
//!
//!   cargo bench --bench pipeline          (BENCH_EVENTS=100000, BENCH_LATENCY_SECONDS=30)

use diesel::{Connection, RunQueryDsl};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;

use common::{CopyRow, copy_rate, env_or, fresh_database, processing_window};

fn kafka() -> txnflow::config::KafkaConfig {
    txnflow::config::Config::from_layers([], []).unwrap().kafka
}

async fn produce(topic: &str, events: &[(String, Vec<u8>)]) -> BTreeMap<i32, i64> {
    let producer = txnflow::kafka::producer(&kafka()).unwrap();
    let mut ends = BTreeMap::new();
    for (done, chunk) in events.chunks(5_000).enumerate() {
        let sends = chunk.iter().map(|(key, value)| {
            producer.send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))
        });
        for delivery in futures_util::future::join_all(sends).await {
            let delivery = delivery.map_err(|(e, _)| e).unwrap();
            let end = ends.entry(delivery.partition).or_insert(0);
            *end = (*end).max(delivery.offset + 1);
        }
        println!("  produced {} / {}", (done + 1) * chunk.len().min(5_000), events.len());
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

struct Service {
    child: std::process::Child,
}

impl Service {
    fn start(topic: &str, db: &str, admin_port: u16, ml_api: &str) -> Service {
        let child = Command::new(env!("CARGO_BIN_EXE_txnflow"))
            .arg("run")
            .env("TXNFLOW__KAFKA__BROKER_QUIRKS", "tansu")
            .env("TXNFLOW__KAFKA__TOPIC", topic)
            .env("TXNFLOW__KAFKA__DLQ_TOPIC", format!("{topic}-dlq"))
            .env("TXNFLOW__KAFKA__GROUP_ID", format!("{topic}-group"))
            .env("TXNFLOW__DB__URL", db)
            .env("TXNFLOW__PREDICT__URL", ml_api)
            .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("TXNFLOW__LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Service { child }
    }

    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn main() {
    let count = env_or("BENCH_EVENTS", 300_000) as usize;
    let latency_seconds = env_or("BENCH_LATENCY_SECONDS", 30);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let ml_api = format!("http://{}", txnflow::ml_api::spawn_in_thread("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap());

        println!("throughput: generating and producing {count} events to a fresh topic");
        let mut generator = txnflow::produce::TransactionGenerator::new(99, 0.0);
        let events: Vec<(String, Vec<u8>)> = (0..count).map(|_| generator.next_record()).map(|r| (r.key, r.value)).collect();
        let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
        txnflow::kafka::ensure_topics(&kafka(), &[(&topic, 3), (&format!("{topic}-dlq"), 1)]).await.unwrap();
        let ends = produce(&topic, &events).await;
        let db = fresh_database("pipeline", false);
        let service = Service::start(&topic, &db, 18391, &ml_api);
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
        let rss = service.peak_rss_mb();
        service.stop();
        // The processing window, from the first row stored to the last; the
        // wall time above also holds the start and the consumer group join.
        let window = processing_window(&db);
        let pipeline_rate = count as f64 / window;
        println!(
            "throughput: {count} events durable {elapsed:.1} s after the start; first to last row {:.1} s = {pipeline_rate:.0} transactions/s",
            window
        );
        println!("bulk load: psql \\copy of the same rows into both tables");
        let copy = copy_rate(events.iter().enumerate().map(|(offset, (_, value))| CopyRow {
            transaction: txnflow::domain::event::parse_event(value).unwrap(),
            processing_type: "streaming",
            run_id: String::new(),
            batch_id: String::new(),
            source: format!("bench/0/{offset}"),
        }));
        println!("bulk load: {copy:.0} rows/s; pipeline / copy = {:.0}%", 100.0 * pipeline_rate / copy);
        println!("peak RSS of txnflow run during the throughput run: {rss:.1} MB");

        println!("latency: ~23 events/s for {latency_seconds} s, default configuration");
        let topic = format!("bench-latency-{}", uuid::Uuid::new_v4().simple());
        txnflow::kafka::ensure_topics(&kafka(), &[(&topic, 3), (&format!("{topic}-dlq"), 1)]).await.unwrap();
        let db = fresh_database("latency", false);
        let service = Service::start(&topic, &db, 18392, &ml_api);
        // Let the consumer join its group before the clock starts.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let producer = txnflow::kafka::producer(&kafka()).unwrap();
        let mut acked: HashMap<String, SystemTime> = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(1000 / 23));
        let until = Instant::now() + Duration::from_secs(latency_seconds);
        while Instant::now() < until {
            ticker.tick().await;
            let record = generator.next_record();
            producer.send(FutureRecord::to(&topic).key(&record.key).payload(&record.value), Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
            acked.insert(record.key, SystemTime::now());
        }
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
            let rows: Vec<Row> = diesel::sql_query("SELECT id::text AS id, extract(epoch FROM created_at)::float8 AS at FROM transactions").load(&mut connection).unwrap();
            if rows.len() >= acked.len() || Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        service.stop();
        let mut latencies: Vec<f64> = rows
            .iter()
            .filter_map(|row| acked.get(&row.id).map(|sent| row.at - sent.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()))
            .collect();
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] * 1000.0;
        println!(
            "latency over {} events: min {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 <= max_wait_ms + 250 = 1250 ms)",
            latencies.len(),
            latencies[0] * 1000.0,
            percentile(0.5),
            percentile(0.99),
            latencies.last().unwrap() * 1000.0
        );
    });
}
