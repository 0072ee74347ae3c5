//! PostgreSQL down mid-stream (guarantee 5). The test stops a PostgreSQL of
//! its own, a private cluster on a free port, so the tests running beside it
//! keep the stack's database.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::{assert_same_set, free_port};
use crate::scenario::{Scenario, ids_of, invalid_events, valid_events};

pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(program: &std::path::Path, args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("runuser runs");
    assert!(status.success(), "{} {args:?} failed", program.display());
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Debian's PostgreSQL is installed")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|bin| bin.join("initdb").exists())
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(format!("txnflow-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chown").args(["postgres:postgres"]).arg(&dir).status().unwrap();
        as_postgres(&bin.join("initdb"), &["-D", dir.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        let cluster = PrivatePostgres { dir, bin, port: free_port() };
        cluster.up();
        let mut admin: diesel::PgConnection = diesel::Connection::establish(&cluster.url("postgres")).unwrap();
        diesel::RunQueryDsl::execute(diesel::sql_query("CREATE DATABASE txnflow"), &mut admin).unwrap();
        cluster
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn up(&self) {
        let options = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        let log = self.dir.join("server.log");
        as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", self.dir.to_str().unwrap(), "-o", &options, "-l", log.to_str().unwrap(), "-w", "start"],
        );
    }

    pub fn down(&self) {
        as_postgres(&self.bin.join("pg_ctl"), &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Acceptance 4: PostgreSQL stopped for 10 s mid-stream. Nothing is lost or
/// duplicated; the capacity fills (the reader pauses), then drains.
#[tokio::test]
async fn postgres_down_for_10_seconds_pauses_and_loses_nothing() {
    let scenario = Scenario::new("pgdown").await;
    let postgres = PrivatePostgres::start();
    let db_url = postgres.url("txnflow");
    let service = scenario
        .start_service(&[
            ("TXNFLOW__DB__URL", db_url.as_str()),
            ("TXNFLOW__BUFFER__CAPACITY", "1000"),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "100"),
        ])
        .await;
    let valid = valid_events(51, 4_000);
    let invalid = invalid_events(52, 100);
    let mut sent = scenario.produce(&valid[..1_000]).await;

    postgres.down();
    let outage = Instant::now();
    sent.extend(scenario.produce(&valid[1_000..]).await);
    sent.extend(scenario.produce(&invalid).await);
    let mut peak_in_flight = 0.0f64;
    while outage.elapsed() < Duration::from_secs(10) {
        peak_in_flight = peak_in_flight.max(service.metric("txnflow_in_flight_records").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    postgres.up();

    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_eq!(peak_in_flight, 1000.0, "the bounded capacity filled while the database was down");
    assert_eq!(service.metric("txnflow_in_flight_records").await, 0.0, "then drained");
    let mut connection: diesel::PgConnection = diesel::Connection::establish(&db_url).unwrap();
    let ids: std::collections::BTreeSet<uuid::Uuid> =
        crate::helpers::query_json(&mut connection, "SELECT id FROM transactions")
            .into_iter()
            .map(|row| row["id"].as_str().unwrap().parse().unwrap())
            .collect();
    assert_same_set(&ids, &ids_of(&valid), "stored ids after the outage");
    let predictions = crate::helpers::query_json(&mut connection, "SELECT count(*) AS n FROM predictions");
    assert_eq!(predictions[0]["n"], 4_000);
    let dlq = scenario.dlq(100);
    let dead: std::collections::BTreeSet<&str> = dlq.iter().map(|r| r.key.as_str()).collect();
    assert_same_set(&dead, &invalid.iter().map(|(k, _)| k.as_str()).collect(), "dead-lettered keys");
}
