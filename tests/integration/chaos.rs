//! The chaos suite (every guarantee at once): under a load of
//! valid events with 5% invalid ones, plus a batch file loading at the same
//! time, each scenario injects its faults, then checks the books exactly:
//! every valid id stored once with its reference prediction, every invalid
//! record in the DLQ with its reason, committed offsets equal to the end
//! offsets. Each prints one table row.
//!
//! `make test` runs every scenario once with a small load (`CHAOS_SCALE`
//! unset). `make chaos` runs them with the full load (`CHAOS_SCALE=full`)
//! and collects the rows in `CHAOS_REPORT`.

use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::batch::Folder;
use crate::helpers::{TestDatabase, assert_same_set};
use crate::outage::PrivatePostgres;
use crate::scenario::{Scenario, Sent, Service, ids_of, invalid_events, valid_events};
use txnflow::domain::categories::reference_category;

/// The counter of records read from Kafka, as the exposition names it.
const READ_SERIES: &str = "txnflow_records_total{outcome=\"read\",source=\"kafka\"}";

/// The broker column of the local cluster's rows.
const STACK_BROKER: &str = "Kafka 4.4, 3 nodes";

/// Events (with 5% invalid) and batch rows per scenario.
pub fn scale() -> (usize, usize) {
    match std::env::var("CHAOS_SCALE").as_deref() {
        Ok("full") => (30_000, 10_000),
        _ => (3_000, 1_000),
    }
}

/// The load of one scenario and what it has sent so far.
pub struct Chaos {
    name: &'static str,
    /// Which broker the scenario runs on, for its table row.
    broker: &'static str,
    pub scenario: Arc<Scenario>,
    pub valid: Vec<(String, Vec<u8>)>,
    pub invalid: Vec<(String, Vec<u8>)>,
    batch_uri: String,
    batch_ids: BTreeSet<Uuid>,
    ends: Arc<Mutex<BTreeMap<i32, i64>>>,
    /// Every event sent, with where the broker put it.
    sent: Arc<Mutex<Vec<Sent>>>,
    peak_lag: Arc<AtomicI64>,
    /// The most valid records seen below a committed offset and not in
    /// the database at once: a commit of what is not durable.
    commits_ahead: Arc<AtomicI64>,
    /// Whether the commits are held to that (off once a broker lost its log).
    pub checking_commits: Arc<AtomicBool>,
    /// How many times they were checked.
    commit_checks: Arc<AtomicI64>,
    probing: Arc<AtomicBool>,
    started: Instant,
    /// What the table row should say beside the numbers.
    notes: Mutex<Vec<String>>,
    /// What the group had committed when the scenario's first service started.
    committed_at_first_start: Mutex<Option<i64>>,
    /// Records read by the services the scenario stopped.
    read_by_stopped: AtomicI64,
}

/// The books at the end of a scenario: one table row.
pub struct Books {
    events: usize,
    /// Records read from Kafka by the services alive at the end.
    read: i64,
    lost: usize,
    duplicated: i64,
    /// Invalid records in the DLQ more than once (the DLQ is at-least-once).
    pub dlq_duplicates: usize,
    unpredicted: usize,
    dead_lettered: usize,
    restarts: f64,
    recovery: Duration,
    peak_lag: i64,
    commits_ahead: i64,
    peak_rss_mb: f64,
}

impl Chaos {
    pub async fn new(name: &'static str, seed: u64) -> Chaos {
        Chaos::on(name, seed, TestDatabase::create()).await
    }

    async fn on(name: &'static str, seed: u64, db: TestDatabase) -> Chaos {
        Chaos::with(name, seed, db, crate::helpers::brokers()).await
    }

    async fn with(name: &'static str, seed: u64, db: TestDatabase, brokers: String) -> Chaos {
        let scenario = Scenario::with(&format!("chaos-{}", slug(name)), db, brokers).await;
        Chaos::of(name, STACK_BROKER, seed, scenario).await
    }

    /// A scenario on the local cluster, with topics the caller made.
    pub async fn on_stack(name: &'static str, seed: u64, scenario: Scenario) -> Chaos {
        Chaos::of(name, STACK_BROKER, seed, scenario).await
    }

    /// A scenario on librdkafka's mock cluster (three brokers).
    pub async fn on_mock(
        name: &'static str,
        seed: u64,
        db: TestDatabase,
        cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    ) -> Chaos {
        let scenario = Scenario::on_mock(&format!("chaos-{}", slug(name)), db, cluster);
        Chaos::of(name, "mock cluster, 3 brokers", seed, scenario).await
    }

    async fn of(name: &'static str, broker: &'static str, seed: u64, scenario: Scenario) -> Chaos {
        let (events, batch_rows) = scale();
        let scenario = Arc::new(scenario);
        let valid = valid_events(seed, events - events / 20);
        let invalid = invalid_events(seed + 1, events / 20);
        // The batch file: transactions of their own, in the seed's CSV format.
        let rows = valid_events(seed + 2, batch_rows);
        let mut text = format!("{}\n", txnflow::domain::csv_rules::SEED_HEADER);
        for (_, value) in &rows {
            let transaction = txnflow::domain::event::parse_event(value).unwrap();
            text.push_str(&txnflow::domain::csv_rules::seed_row(&transaction));
            text.push('\n');
        }
        let batch_uri = Folder::new().await.put(&format!("{name}.csv"), text.into_bytes()).await;
        let chaos = Chaos {
            name,
            broker,
            scenario,
            valid,
            invalid,
            batch_uri,
            batch_ids: ids_of(&rows),
            ends: Arc::default(),
            sent: Arc::default(),
            peak_lag: Arc::default(),
            commits_ahead: Arc::default(),
            checking_commits: Arc::new(AtomicBool::new(true)),
            commit_checks: Arc::default(),
            probing: Arc::new(AtomicBool::new(true)),
            started: Instant::now(),
            notes: Mutex::default(),
            committed_at_first_start: Mutex::default(),
            read_by_stopped: AtomicI64::new(0),
        };
        chaos.start_lag_probe();
        chaos
    }

    /// Samples the consumer lag (sent minus committed) every 300 ms, and
    /// every 900 ms whether each valid record below a committed offset is
    /// in the database. (Committed first, rows after: a row written in
    /// between only hides nothing.)
    fn start_lag_probe(&self) {
        let (scenario, ends, peak, probing) =
            (self.scenario.clone(), self.ends.clone(), self.peak_lag.clone(), self.probing.clone());
        let (sent, ahead, checking) = (self.sent.clone(), self.commits_ahead.clone(), self.checking_commits.clone());
        let checks = self.commit_checks.clone();
        std::thread::spawn(move || {
            for sample in 0u64.. {
                if !probing.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
                // A coordinator or database that is down skips the sample.
                let Some(committed) = scenario.try_committed_offsets() else { continue };
                let end: i64 = ends.lock().unwrap().values().sum();
                peak.fetch_max(end - committed.values().sum::<i64>(), Ordering::Relaxed);
                if sample % 3 != 0 || !checking.load(Ordering::Relaxed) {
                    continue;
                }
                let Some(stored) = scenario.try_transaction_ids() else { continue };
                let below_commit = sent
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| committed.get(&s.partition).is_some_and(|c| s.offset < *c))
                    .filter_map(|s| Uuid::parse_str(&s.key).ok())
                    .filter(|id| !stored.contains(id))
                    .count();
                ahead.fetch_max(below_commit as i64, Ordering::Relaxed);
                checks.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Produces the events, valid and invalid mixed, in chunks of 100 every
    /// `pace`, in the background.
    pub fn produce(&self, pace: Duration) -> tokio::task::JoinHandle<()> {
        let mut events: Vec<(String, Vec<u8>)> = self.valid.iter().chain(&self.invalid).cloned().collect();
        events.sort_by(|a, b| a.0.cmp(&b.0));
        self.produce_events(events, pace)
    }

    fn produce_events(&self, events: Vec<(String, Vec<u8>)>, pace: Duration) -> tokio::task::JoinHandle<()> {
        let (scenario, ends, all_sent) = (self.scenario.clone(), self.ends.clone(), self.sent.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(100) {
                let sent = scenario.produce(chunk).await;
                {
                    let mut ends = ends.lock().unwrap();
                    for (partition, end) in Scenario::end_offsets(&sent) {
                        let known = ends.entry(partition).or_insert(0);
                        *known = (*known).max(end);
                    }
                }
                all_sent.lock().unwrap().extend(sent);
                tokio::time::sleep(pace).await;
            }
        })
    }

    pub async fn start_service(&self, extra: &[(&str, &str)]) -> Service {
        if self.committed_at_first_start.lock().unwrap().is_none() {
            let committed: i64 = self.scenario.try_committed_offsets().unwrap_or_default().values().sum();
            *self.committed_at_first_start.lock().unwrap() = Some(committed);
        }
        self.scenario.start_service(extra).await
    }

    /// Stops `service` with `signal` (TERM or KILL), keeping the count of
    /// records it read: from its last log line after a TERM, or read from
    /// its metrics just before a KILL (what it reads after that cannot be
    /// committed in the moment left, so another service reads it again).
    pub async fn stop(&self, service: &mut Service, signal: &str) -> Option<std::process::ExitStatus> {
        let before = service.metric(READ_SERIES).await as i64;
        let status = service.signal(signal, Duration::from_secs(30));
        let logged = std::fs::read_to_string(&service.log).unwrap_or_default().lines().rev().find_map(|line| {
            let stopped = line.contains("stopped cleanly") || line.contains("stopped at the shutdown timeout");
            stopped.then(|| line.split("read=").nth(1)?.split_whitespace().next()?.parse::<i64>().ok()).flatten()
        });
        self.read_by_stopped.fetch_add(logged.unwrap_or(before), Ordering::Relaxed);
        status
    }

    /// The records read by the scenario's services, stopped or `live`
    /// (`txnflow_records_total{outcome="read"}`), and the least they must
    /// have read together: what was produced after the first one started.
    async fn records_read(&self, live: &[&Service], produced: i64) -> (i64, i64) {
        let mut read = self.read_by_stopped.load(Ordering::Relaxed) as f64;
        for service in live {
            read += service.metric(READ_SERIES).await;
        }
        let baseline = self.committed_at_first_start.lock().unwrap().unwrap_or(0);
        (read as i64, produced - baseline)
    }

    /// Starts the batch file on `service` as run `run_id` (again, after a restart).
    pub async fn post_batch(&self, service: &Service, run_id: &str) {
        let response = reqwest::Client::new()
            .post(format!("{}/batches", service.admin))
            .json(&serde_json::json!({"uri": self.batch_uri, "run_id": run_id}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202, "{}", response.text().await.unwrap());
    }

    /// [`Chaos::post_batch`] of a run a dead instance held: refused (409)
    /// until the run is stale (`batch.stale_after_ms`), then resumed.
    pub async fn post_batch_after_its_instance_died(&self, service: &Service, run_id: &str) {
        let client = reqwest::Client::new();
        for _ in 0..240 {
            let response = client
                .post(format!("{}/batches", service.admin))
                .json(&serde_json::json!({"uri": self.batch_uri, "run_id": run_id}))
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                202 => return,
                409 => tokio::time::sleep(Duration::from_millis(500)).await,
                status => panic!("{}: POST /batches answered {status}: {}", self.name, response.text().await.unwrap()),
            }
        }
        panic!("{}: run {run_id} was never free to resume", self.name);
    }

    /// Waits for the batch run to complete on `service`; returns its report.
    pub async fn batch_done(&self, service: &Service, run_id: &str) -> serde_json::Value {
        let client = reqwest::Client::new();
        for _ in 0..900 {
            let report: serde_json::Value =
                client.get(format!("{}/batches/{run_id}", service.admin)).send().await.unwrap().json().await.unwrap();
            if report["status"] != "running" {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("{}: batch run {run_id} never completed; log:\n{}", self.name, service.log_tail());
    }

    /// The faults are over now: the batch run `run_id` completes on
    /// `runner`, then [`Chaos::books`] with the services `live`.
    pub async fn finish(
        &self,
        producer: tokio::task::JoinHandle<()>,
        runner: &Service,
        run_id: &str,
        live: &[&Service],
    ) -> Books {
        let cleared = Instant::now();
        let report = self.batch_done(runner, run_id).await;
        assert_eq!(report["status"], "completed", "{}: {report}", self.name);
        self.books(producer, cleared, live).await
    }

    /// After the faults: waits for lag zero and full coverage, checks the
    /// books, prints and records the row, and fails on any loss or duplicate.
    pub async fn books(
        &self,
        producer: tokio::task::JoinHandle<()>,
        fault_cleared: Instant,
        live: &[&Service],
    ) -> Books {
        self.books_with(producer, fault_cleared, live, &self.invalid).await
    }

    /// [`Chaos::books`], expecting `invalid` in the DLQ.
    async fn books_with(
        &self,
        producer: tokio::task::JoinHandle<()>,
        fault_cleared: Instant,
        live: &[&Service],
        invalid: &[(String, Vec<u8>)],
    ) -> Books {
        producer.await.unwrap();
        let ends = self.ends.lock().unwrap().clone();
        let committed = self.scenario.wait_committed(&ends, Duration::from_secs(300)).await;
        let recovery = fault_cleared.elapsed();
        self.probing.store(false, Ordering::Relaxed);
        let logs: Vec<String> = live.iter().map(|s| s.log_tail()).collect();
        assert_eq!(
            committed,
            ends,
            "{}: committed offsets equal the end offsets; logs:\n{}",
            self.name,
            logs.join("\n")
        );

        let mut expected = ids_of(&self.valid);
        expected.extend(&self.batch_ids);
        let total = expected.len() as i64;
        self.scenario
            .wait_for(Duration::from_secs(120), |s| s.count("SELECT count(*) FROM predictions") >= total)
            .await;
        let stored = self.scenario.transaction_ids();
        let lost_rows = expected.difference(&stored).count() + stored.difference(&expected).count();
        let duplicated = self.scenario.count("SELECT count(*) - count(DISTINCT id) FROM transactions")
            + self.scenario.count("SELECT count(*) - count(DISTINCT transaction_id) FROM predictions");
        let predictions = self.scenario.predictions();
        let unpredicted = expected
            .iter()
            .filter(|id| predictions.get(id).map(String::as_str) != Some(reference_category(**id)))
            .count();
        let dlq = self.scenario.dlq(invalid.len());
        let invalid_keys: BTreeSet<&str> = invalid.iter().map(|(k, _)| k.as_str()).collect();
        let mut dead_invalid = BTreeSet::new();
        for record in dlq.iter().filter(|r| r.key.starts_with("bad-")) {
            let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            assert_eq!(header("error_type"), Some("invalid"), "{}: {}", self.name, record.key);
            assert!(header("error_message").is_some_and(|m| !m.is_empty()), "{}: a reason", self.name);
            dead_invalid.insert(record.key.as_str());
        }
        let lost_invalid = invalid_keys.difference(&dead_invalid).count();
        let dlq_duplicates = dlq.iter().filter(|r| r.key.starts_with("bad-")).count() - dead_invalid.len();
        let (read, least_read) = self.records_read(live, ends.values().sum()).await;
        let mut restarts = 0.0;
        for service in live {
            for actor in txnflow::actors::ACTOR_NAMES {
                restarts += service.metric(&format!("txnflow_actor_restarts_total{{actor=\"{actor}\"}}")).await;
            }
        }
        let books = Books {
            events: self.valid.len() + self.invalid.len() + self.batch_ids.len(),
            read,
            lost: lost_rows + lost_invalid,
            duplicated,
            dlq_duplicates,
            unpredicted,
            dead_lettered: dlq.len(),
            restarts,
            recovery,
            peak_lag: self.peak_lag.load(Ordering::Relaxed),
            commits_ahead: self.commits_ahead.load(Ordering::Relaxed),
            peak_rss_mb: live.iter().map(|s| s.peak_rss_mb()).fold(0.0, f64::max),
        };
        self.record(&books);
        assert_same_set(&stored, &expected, &format!("{}: stored ids", self.name));
        assert_same_set(&dead_invalid, &invalid_keys, &format!("{}: dead-lettered invalid records", self.name));
        assert!(
            books.read >= least_read,
            "{}: the records read ({}) reach those produced after the start's commits ({least_read})",
            self.name,
            books.read
        );
        assert_eq!(books.duplicated, 0, "{}: duplicated rows", self.name);
        assert_eq!(books.unpredicted, 0, "{}: ids without their reference prediction", self.name);
        if self.checking_commits.load(Ordering::Relaxed) {
            assert_eq!(books.commits_ahead, 0, "{}: offsets committed before their rows were written", self.name);
            assert!(self.commit_checks.load(Ordering::Relaxed) > 0, "{}: the commits were checked", self.name);
        }
        books
    }

    pub fn note(&self, note: &str) {
        self.notes.lock().unwrap().push(note.to_string());
    }

    /// One table row, on stderr and in `CHAOS_REPORT` when set.
    fn record(&self, books: &Books) {
        let mut notes = self.notes.lock().unwrap().clone();
        if books.dlq_duplicates > 0 {
            notes.push(format!("{} invalid records in the DLQ twice", books.dlq_duplicates));
        }
        let row = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} s | {} | {} | {:.0} MB | {:.0} s | {} |",
            self.name,
            self.broker,
            books.events,
            books.read,
            books.lost,
            books.duplicated,
            books.unpredicted,
            books.dead_lettered,
            books.restarts,
            books.recovery.as_secs_f64(),
            books.peak_lag,
            if self.checking_commits.load(Ordering::Relaxed) {
                books.commits_ahead.to_string()
            } else {
                "not checked".into()
            },
            books.peak_rss_mb,
            self.started.elapsed().as_secs_f64(),
            notes.join("; "),
        );
        eprintln!("{row}");
        if let Ok(path) = std::env::var("CHAOS_REPORT") {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(file, "{row}").unwrap();
        }
    }
}

/// A scenario name as topic and group names take it: [a-zA-Z0-9._-].
fn slug(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

/// A breaker and retries that react within the scenarios' time.
const QUICK: [(&str, &str); 5] = [
    ("TXNFLOW__BREAKER__WINDOW", "10"),
    ("TXNFLOW__BREAKER__OPEN_MS", "2000"),
    ("TXNFLOW__PREDICT__MAX_RETRIES", "2"),
    ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "200"),
    ("TXNFLOW__PREDICT__TIMEOUT_MS", "2000"),
];

/// Every actor crashed through the chaos endpoint, one at a time, then in
/// random bursts of crashes and panics: 60 faults in all.
#[tokio::test]
async fn chaos_actor_crashes() {
    let chaos = Chaos::new("actor crashes", 501).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-crashes").await;
    let producer = chaos.produce(Duration::from_millis(20));
    for actor in txnflow::actors::ACTOR_NAMES {
        service.chaos(actor, "crash").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(501);
    let mut faults = txnflow::actors::ACTOR_NAMES.len();
    while faults < 60 {
        for _ in 0..rng.random_range(2..6) {
            let actor = txnflow::actors::ACTOR_NAMES[rng.random_range(0..txnflow::actors::ACTOR_NAMES.len())];
            let kind = if rng.random_bool(0.5) { "crash" } else { "panic" };
            service.chaos(actor, kind).await;
            faults += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
    }
    let books = chaos.finish(producer, &service, "chaos-crashes", &[&service]).await;
    // A fault aimed at an actor whose panic has just closed its mailbox
    // finds no one to hit, so a few of the 60 may not count.
    assert!(books.restarts >= 50.0, "at least 50 actor restarts: {}", books.restarts);
}

/// `kill -9` of the instance mid-load; a new one starts at once and the
/// batch run is started again with the same run id, once the dead
/// instance's run is stale. The dead member holds its partitions until its
/// session times out.
#[tokio::test]
async fn chaos_kill_9_and_restart() {
    let chaos = Chaos::new("kill -9, restart", 502).await;
    // The killed instance's batch run is stale, and resumable, after 5 s.
    let stale = [("TXNFLOW__BATCH__STALE_AFTER_MS", "5000")];
    let mut first = chaos.start_service(&stale).await;
    chaos.post_batch(&first, "chaos-kill").await;
    let producer = chaos.produce(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(800)).await;
    chaos.stop(&mut first, "KILL").await;
    let second = chaos.start_service(&stale).await;
    let cleared = Instant::now();
    chaos.post_batch_after_its_instance_died(&second, "chaos-kill").await;
    let report = chaos.batch_done(&second, "chaos-kill").await;
    assert_eq!(report["status"], "completed", "{report}");
    chaos.books(producer, cleared, &[&second]).await;
}

/// One instance of two killed for good: its partitions move to the survivor.
#[tokio::test]
async fn chaos_one_of_two_instances_lost() {
    let chaos = Chaos::new("1 of 2 instances lost", 503).await;
    let mut doomed = chaos.start_service(&[]).await;
    let survivor = chaos.start_service(&[]).await;
    assert!(survivor.wait_assigned(Duration::from_secs(60)).await, "{}", survivor.log_tail());
    chaos.post_batch(&survivor, "chaos-lost").await;
    let producer = chaos.produce(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(800)).await;
    chaos.stop(&mut doomed, "KILL").await;
    chaos.finish(producer, &survivor, "chaos-lost", &[&survivor]).await;
}

/// PostgreSQL restarted mid-load, then unreachable for 30 s (10 s in the
/// short run). A private cluster, so the tests beside it keep theirs.
#[tokio::test]
async fn chaos_postgres_restart_and_outage() {
    let postgres = PrivatePostgres::start();
    let chaos = Chaos::on("PostgreSQL restart + outage", 504, TestDatabase::create_on(&postgres.url("postgres"))).await;
    let service = chaos.start_service(&[]).await;
    chaos.post_batch(&service, "chaos-postgres").await;
    let producer = chaos.produce(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    postgres.down();
    postgres.up();
    tokio::time::sleep(Duration::from_secs(1)).await;
    postgres.down();
    let outage = if std::env::var("CHAOS_SCALE").as_deref() == Ok("full") { 30 } else { 10 };
    tokio::time::sleep(Duration::from_secs(outage)).await;
    postgres.up();
    chaos.finish(producer, &service, "chaos-postgres", &[&service]).await;
}

/// ML API faults in turn during the load: down, slower than the timeout,
/// malformed answers, dropped items, a 422 poison marker.
#[tokio::test]
async fn chaos_ml_api_faults() {
    let chaos = Chaos::new("ML API faults", 505).await;
    let service = chaos.start_service(&QUICK).await;
    chaos.post_batch(&service, "chaos-ml").await;
    let producer = chaos.produce(Duration::from_millis(20));
    let scenario = &chaos.scenario;
    for knobs in [
        serde_json::json!({"error_rate": 1.0}),
        serde_json::json!({"error_rate": 0.0, "latency_ms": 3000}),
        serde_json::json!({"latency_ms": 0, "malformed_rate": 0.5}),
        serde_json::json!({"malformed_rate": 0.0, "drop_rate": 0.5}),
        serde_json::json!({"drop_rate": 0.0, "poison_marker": "Amazon"}),
    ] {
        scenario.set_faults(knobs).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    scenario.set_faults(serde_json::json!({"poison_marker": ""})).await;
    chaos.finish(producer, &service, "chaos-ml", &[&service]).await;
}

/// A slow consumer: the ML API at 500 ms a call while the producers go on.
/// Backpressure holds the records in flight to `buffer.capacity`.
#[tokio::test]
async fn chaos_slow_consumer() {
    let chaos = Chaos::new("slow consumer (500 ms API)", 506).await;
    chaos.scenario.set_faults(serde_json::json!({"latency_ms": 500})).await;
    let service =
        chaos.start_service(&[("TXNFLOW__BUFFER__CAPACITY", "2000"), ("TXNFLOW__BUFFER__MAX_RECORDS", "500")]).await;
    chaos.post_batch(&service, "chaos-slow").await;
    let producer = chaos.produce(Duration::from_millis(5));
    let mut peak_in_flight = 0.0f64;
    for _ in 0..20 {
        peak_in_flight = peak_in_flight.max(service.metric("txnflow_in_flight_records").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    chaos.scenario.set_faults(serde_json::json!({"latency_ms": 0})).await;
    chaos.finish(producer, &service, "chaos-slow", &[&service]).await;
    assert!(peak_in_flight <= 2000.0, "records in flight stay within the capacity: {peak_in_flight}");
    eprintln!("slow consumer: peak records in flight {peak_in_flight} of 2,000");
}
