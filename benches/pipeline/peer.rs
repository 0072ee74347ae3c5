//! `make bench-peers`: the tool teams run instead, on the same events.
//!
//! Kafka Connect in standalone mode, with the Debezium JDBC sink, lands
//! the events in `transactions` of a fresh, migrated database, in upsert
//! mode (`stack/peer/`, jars from `stack/peer/pom.xml`). It calls no ML
//! API and writes no prediction, so it is a generous peer. Its events are
//! the same transactions as txnflow's, in Kafka Connect's JSON schema
//! envelope, which the sink needs. Its rate is measured as txnflow's is:
//! from the first row stored to the last (`created_at`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{self, CpuSample, TestDatabase, processing_window};
use super::{Child, Keys, create_topic, delete_topics, produce, stored_rows};

/// What one landing by the peer measured.
pub struct PeerLanding {
    pub rate: f64,
    pub cpu_ms_per_1000: f64,
    pub rss_mb: f64,
}

/// The Connect schema of an event: one field per column of the seed's
/// `transactions`, typed so that the sink binds each to its column type.
const ENVELOPE_SCHEMA: &str = r#"{"type":"struct","name":"txnflow.peer.Transaction","optional":false,"fields":[
{"field":"id","type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1},
{"field":"description","type":"string","optional":false},
{"field":"amount","type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"2","connect.decimal.precision":"12"}},
{"field":"timestamp","type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1},
{"field":"merchant","type":"string","optional":true},
{"field":"operation_type","type":"string","optional":false},
{"field":"side","type":"string","optional":false}]}"#;

/// An event in Kafka Connect's JSON envelope: the schema, then the
/// payload, with the amount as a JSON number of two decimals.
fn enveloped(event: &[u8]) -> Vec<u8> {
    let t = txnflow::domain::event::parse_event(event).expect("the generator's events are valid");
    let text = |value: &str| serde_json::to_string(value).unwrap();
    format!(
        r#"{{"schema":{schema},"payload":{{"id":"{id}","description":{description},"amount":{amount},"timestamp":"{timestamp}","merchant":{merchant},"operation_type":{operation_type},"side":"{side}"}}}}"#,
        schema = ENVELOPE_SCHEMA.replace('\n', ""),
        id = t.id,
        description = text(&t.description),
        amount = t.amount,
        timestamp = txnflow::domain::transaction::format_timestamp(&t.timestamp),
        merchant = t.merchant.as_deref().map_or("null".to_string(), text),
        operation_type = text(&t.operation_type),
        side = t.side.as_str(),
    )
    .into_bytes()
}

/// The peer's jars, fetched by the stack script when missing.
pub fn jars() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(format!("{root}/scripts/stack.sh"))
        .arg("peer-jars")
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/stack.sh runs");
    assert!(output.status.success(), "scripts/stack.sh peer-jars");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A properties file of `stack/peer/`, with some keys set to other values.
fn properties(file: &str, set: &[(&str, String)]) -> String {
    let text = std::fs::read_to_string(format!("{}/stack/peer/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines()
        .map(|line| match set.iter().find(|(key, _)| line.starts_with(&format!("{key}="))) {
            Some((key, value)) => format!("{key}={value}"),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lands `events` (txnflow's JSON events, keyed by id) with the peer:
/// the same transactions, enveloped, on a fresh topic, into a fresh database.
pub async fn land(lib: &str, run: u64, events: &[(String, Vec<u8>)]) -> PeerLanding {
    let count = events.len();
    println!("peer, run {run}: producing the same {count} events in Kafka Connect's JSON envelope");
    let enveloped: Vec<(String, Vec<u8>)> = events.iter().map(|(key, value)| (key.clone(), enveloped(value))).collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("peer-{id}");
    create_topic(&topic, 3, None).await;
    produce(&topic, &enveloped, Keys::ById, false).await;
    drop(enveloped);
    let database = TestDatabase::migrated();
    let db_name = database.url.rsplit('/').next().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("txnflow-peer-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let worker = dir.join("worker.properties");
    let offsets = dir.join("connect.offsets").display().to_string();
    std::fs::write(&worker, properties("connect-standalone.properties", &[("offset.storage.file.filename", offsets)]))
        .unwrap();
    let sink = dir.join("sink.properties");
    let sink_settings = [
        ("name", format!("peer-{id}")),
        ("topics", topic.clone()),
        ("connection.url", format!("jdbc:postgresql://127.0.0.1:5432/{db_name}")),
    ];
    std::fs::write(&sink, properties("jdbc-sink.properties", &sink_settings)).unwrap();
    let log_path = format!("{}/target/bench-peer.log", env!("CARGO_MANIFEST_DIR"));
    let log = std::fs::File::create(&log_path).unwrap();
    println!("peer, run {run}: starting Kafka Connect (standalone, heap 512 MB; its log: target/bench-peer.log)");
    let connect = Child(
        Command::new("java")
            .args(["-Xmx512m", "-XX:+UseG1GC", "-XX:ParallelGCThreads=1", "-XX:ConcGCThreads=1"])
            .args(["-XX:CICompilerCount=2", "-cp", &format!("{lib}/*")])
            .arg(format!("-Dlog4j2.configurationFile={}/stack/peer/log4j2.properties", env!("CARGO_MANIFEST_DIR")))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .args([&worker, &sink])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("java runs"),
    );
    // The CPU is counted from the first row on, as the rate is: the JVM's
    // start and warm-up (about 10 s of CPU) are left out.
    let roles = || {
        vec![
            ("peer", vec![connect.pid()]),
            ("broker", common::kafka_pids()),
            ("postgresql", common::pids_named("postgres")),
        ]
    };
    let started = Instant::now();
    let (mut cpu, mut last_report, mut last_progress, mut stored) = (None, Instant::now(), Instant::now(), 0);
    while stored < count {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = stored_rows(&database.url);
        if now > stored {
            last_progress = Instant::now();
            cpu.get_or_insert_with(|| CpuSample::start(roles()));
        }
        stored = now;
        assert!(
            last_progress.elapsed() < Duration::from_secs(180),
            "the peer stored nothing for 3 minutes ({stored} of {count}); see {log_path}"
        );
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  peer: {stored} / {count} rows after {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
    }
    let cpu = cpu.expect("rows were stored");
    let (used, cpu_seconds) = cpu.end();
    let rss_mb = connect.peak_rss_mb();
    drop(connect);
    delete_topics(&[&topic], None).await;
    let _ = std::fs::remove_dir_all(&dir);
    let window = processing_window(&database.url);
    let rate = count as f64 / window;
    let peer_cpu = used.iter().find(|(role, _)| *role == "peer").map_or(0.0, |(_, s)| *s);
    let described: Vec<String> =
        used.iter().map(|(role, s)| format!("{role} {s:.1} s ({:.0}% of a core)", 100.0 * s / cpu_seconds)).collect();
    println!(
        "  peer: {count} rows, first to last {window:.1} s = {rate:.0} rows/s; CPU from the first row, over {cpu_seconds:.1} s: {}; peak RSS {rss_mb:.0} MB",
        described.join(", ")
    );
    PeerLanding { rate, cpu_ms_per_1000: 1000.0 * peer_cpu / (count as f64 / 1000.0), rss_mb }
}
