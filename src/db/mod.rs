//! PostgreSQL adapter: the r2d2 connection pool, the embedded migrations,
//! and the queries, one concern per file:
//! - [`flush`]: a flush's transactions, predictions and history rows;
//! - [`backfill`]: claims of stored transactions without a prediction;
//! - [`history`]: prediction history, re-prediction runs, promotion, archive;
//! - [`runs`]: batch runs' records;
//! - [`dead_letters`]: dead letters the DLQ topic refused.

use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::time::Duration;

use crate::config::DbConfig;
use crate::domain::redaction::redact;

mod backfill;
mod binary_copy;
mod dead_letters;
mod flush;
pub mod history;
mod runs;

pub use backfill::*;
pub use dead_letters::*;
pub use flush::*;
pub use runs::*;

/// The migrations of `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Opens one connection, for one-shot commands such as `txnflow migrate`.
pub fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::establish(url)
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {}: {}", redact(url), redact(&e.to_string())))
}

/// What to fix when PostgreSQL refused a connection for a reason that
/// waiting will not change (libpq's message: a wrong password, no
/// `pg_hba.conf` entry, an unknown role or database, no right to
/// connect); `None` for an outage, which may heal.
pub fn refusal_that_will_not_heal(message: &str) -> Option<&'static str> {
    // Each refusal: the texts its message holds, all of them, and what to fix.
    const REFUSALS: [(&[&str], &str); 5] = [
        (&["authentication failed"], "the user and password of db.url"),
        (&["no pg_hba.conf entry"], "db.url's user and host, or the server's pg_hba.conf"),
        (&["role \"", "does not exist"], "the user of db.url"),
        (&["database \"", "does not exist"], "the database name of db.url"),
        (&["permission denied for database"], "the user of db.url, or its CONNECT right"),
    ];
    REFUSALS.iter().find(|(texts, _)| texts.iter().all(|text| message.contains(text))).map(|(_, fix)| *fix)
}

/// Builds the pool. It does not fail when the database is down: connections
/// are made on demand, so the service can start and wait for PostgreSQL.
pub fn pool(config: &DbConfig) -> PgPool {
    Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .build_unchecked(ConnectionManager::new(&config.url))
}

/// Applies pending migrations and returns the versions it applied (none when
/// the schema is up to date, so running it twice is harmless).
pub fn migrate(connection: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    // Two replicas starting at once must not both apply the same migration:
    // a transaction-scoped advisory lock serialises them.
    connection.transaction(|tx| {
        diesel::sql_query("SELECT pg_advisory_xact_lock(7365726966)").execute(tx)?;
        let applied = tx
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"))?
            .into_iter()
            .map(|version| version.to_string())
            .collect();
        Ok(applied)
    })
}

/// Why a write failed, as the writer must react to it.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The database is unreachable or busy: retry the same write later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The data itself was refused: retrying it as it is cannot succeed.
    #[error("data refused by the database: {0}")]
    Refused(String),
}

impl From<diesel::result::Error> for WriteError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match &error {
            Error::DatabaseError(
                Kind::CheckViolation | Kind::NotNullViolation | Kind::ForeignKeyViolation | Kind::UniqueViolation,
                _,
            ) => WriteError::Refused(error.to_string()),
            Error::DatabaseError(Kind::Unknown, info)
                if ["invalid input", "out of range", "value too long", "invalid byte sequence", "violates"]
                    .iter()
                    .any(|needle| info.message().contains(needle)) =>
            {
                WriteError::Refused(error.to_string())
            }
            _ => WriteError::Unavailable(error.to_string()),
        }
    }
}

/// Runs `call` with a connection from `pool` on tokio's blocking pool
/// (diesel is synchronous), off the async threads. No connection, or a call
/// that panicked, is [`WriteError::Unavailable`]; the call's own error is
/// kept as it is.
pub async fn blocking<T, F>(pool: &PgPool, call: F) -> Result<T, WriteError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, WriteError> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut connection = pool.get().map_err(|e| WriteError::Unavailable(e.to_string()))?;
        call(&mut connection)
    })
    .await
    .unwrap_or_else(|join_error| Err(WriteError::Unavailable(format!("the database call panicked: {join_error}"))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn refusals_that_will_not_heal_name_what_to_fix() {
        use super::refusal_that_will_not_heal as refusal;
        let password = "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"txnflow\"";
        assert_eq!(refusal(password), Some("the user and password of db.url"));
        assert_eq!(refusal("FATAL:  database \"nope\" does not exist"), Some("the database name of db.url"));
        assert_eq!(refusal("FATAL:  role \"nobody\" does not exist"), Some("the user of db.url"));
        let outage = "connection to server at \"127.0.0.1\", port 5432 failed: Connection refused";
        assert_eq!(refusal(outage), None, "an outage may heal");
        assert_eq!(refusal("FATAL:  the database system is starting up"), None);
    }
}
