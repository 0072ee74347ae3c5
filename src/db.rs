//! PostgreSQL adapter: the r2d2 connection pool and the embedded migrations.

use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::time::Duration;

use crate::config::DbConfig;

/// The migrations of `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Opens one connection, for one-shot commands such as `txnflow migrate`.
pub fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::establish(url).map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {}: {e}", redact(url)))
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

/// The URL with its password hidden, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact("postgres://txnflow:secret@db:5432/x"), "postgres://txnflow:***@db:5432/x");
        assert_eq!(super::redact("postgres://db/x"), "postgres://db/x");
    }
}
