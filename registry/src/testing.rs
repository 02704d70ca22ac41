//! Support for tests (this crate's and other crates'): throwaway PostgreSQL databases
//! and raw SQL access that bypasses the [`Registry`](crate::Registry) trait, for checks
//! of database-level guards such as the append-only event log.

use crate::{RegistryError, redact_url};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

fn unreachable(url: &str, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unreachable {
        url: redact_url(url),
        reason: e.to_string(),
    }
}

fn database_error(e: sqlx::Error) -> RegistryError {
    RegistryError::Database {
        context: "running raw SQL".to_owned(),
        source: e,
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

async fn pg_connect(url: &str) -> Result<sqlx::PgConnection, RegistryError> {
    sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| unreachable(url, e))?
        .connect()
        .await
        .map_err(|e| unreachable(url, e))
}

/// A name no other call (in this or another process) is likely to produce.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:016x}", h.finish())
}

/// Creates a new, empty database `fleetcert_test_<random>` on the PostgreSQL server that
/// `admin_url` points at (its user must be allowed to create databases) and returns the
/// URL of the new database (same server, user and options).
pub async fn create_postgres_database(admin_url: &str) -> Result<String, RegistryError> {
    let mut url = url::Url::parse(admin_url).map_err(|e| unreachable(admin_url, e))?;
    let name = format!("fleetcert_test_{}", unique_suffix());
    let mut conn = pg_connect(admin_url).await?;
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .map_err(database_error)?;
    let _ = conn.close().await;
    url.set_path(&name);
    Ok(url.to_string())
}

/// Drops a database made by [`create_postgres_database`] (forcibly disconnecting any
/// sessions still on it), connecting through `admin_url`.
pub async fn drop_postgres_database(
    admin_url: &str,
    database_url: &str,
) -> Result<(), RegistryError> {
    let url = url::Url::parse(database_url).map_err(|e| unreachable(database_url, e))?;
    let name = url.path().trim_start_matches('/');
    if !name.starts_with("fleetcert_test_")
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(RegistryError::InvalidValue(format!(
            "refusing to drop {name:?}: not a database made by create_postgres_database"
        )));
    }
    let mut conn = pg_connect(admin_url).await?;
    conn.execute(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .await
    .map_err(database_error)?;
    let _ = conn.close().await;
    Ok(())
}

/// Runs `sql` (one or more statements) directly against the registry database at `url`
/// (same URL forms as [`open`](crate::open); the database must exist), returning the
/// number of rows affected. Database refusals come back as
/// [`RegistryError::Database`] with the database's message.
pub async fn execute_raw(url: &str, sql: &str) -> Result<u64, RegistryError> {
    let sql = AssertSqlSafe(sql.to_owned());
    if is_postgres(url) {
        let mut conn = pg_connect(url).await?;
        let result = conn.execute(sql).await.map_err(database_error);
        let _ = conn.close().await;
        return Ok(result?.rows_affected());
    }
    let path = match crate::sqlite_target(url)? {
        crate::sqlite::SqliteTarget::File(path) => path,
        crate::sqlite::SqliteTarget::Memory => {
            return Err(RegistryError::InvalidValue(
                "execute_raw cannot reach a private in-memory database".to_owned(),
            ));
        }
    };
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| unreachable(url, e))?;
    let result = conn.execute(sql).await.map_err(database_error);
    let _ = conn.close().await;
    Ok(result?.rows_affected())
}
