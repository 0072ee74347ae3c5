//! A database of its own for every test and benchmark run, shared by the
//! integration tests (`tests/integration/helpers.rs`) and the benchmarks
//! (`benches/common/`): created empty, or migrated by `txnflow migrate`,
//! and dropped when it goes out of scope.

use diesel::pg::PgConnection;
use diesel::{Connection, RunQueryDsl};

/// The stack's administrative database URL (the role may create databases).
pub fn admin_db_url() -> String {
    std::env::var("TXNFLOW_TEST_DB_URL").unwrap_or_else(|_| "postgres://txnflow:txnflow@127.0.0.1:5432/txnflow".into())
}

/// A database of its own, dropped when the test ends.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    /// The server's administrative URL, where the database is dropped.
    admin: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        TestDatabase::create_on(&admin_db_url())
    }

    /// The same, with txnflow's schema applied.
    pub fn migrated() -> TestDatabase {
        let database = TestDatabase::create();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_txnflow"))
            .arg("migrate")
            .env("TXNFLOW__DB__URL", &database.url)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("txnflow runs");
        assert!(status.success(), "txnflow migrate");
        database
    }

    /// A database of its own on the server of `admin_url` (for example a
    /// private cluster that a test stops and starts).
    pub fn create_on(admin_url: &str) -> TestDatabase {
        let name = format!("txnflow_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(admin_url).expect("the stack's PostgreSQL answers (make up)");
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin).unwrap();
        let url = format!("{}/{name}", &admin_url[..admin_url.rfind('/').unwrap()]);
        TestDatabase { name, url, admin: admin_url.to_string() }
    }

    pub fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url).unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.admin) {
            let _ =
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin);
        }
    }
}
