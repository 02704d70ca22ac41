//! What truly differs between the two SQL backends, and nothing else.
//!
//! Flows written once (the mirror outbox, the read-only queries) are generic over a
//! [`Dialect`]: they write their SQL once with `$n` placeholders (SQLite reads `$n` as
//! the n-th bind too) and standard SQL that both databases accept (`IS DISTINCT FROM`,
//! `COUNT(*) FILTER (…)`, `CAST(… AS TEXT)`), and ask the dialect for the rest: how a
//! writing transaction starts (`BEGIN IMMEDIATE` on SQLite), the row-lock clauses
//! (PostgreSQL only; SQLite has one writer at a time), and how events are bulk-inserted.
//!
//! Shared flows are methods of [`Flows`], a borrowed backend; their impl blocks carry
//! the `sqlx` bounds (which Rust cannot imply from a trait) once per file, so each flow
//! is checked once generically and instantiated for both backends.

use crate::RegistryError;
use crate::common::{NewEvent, db_error};
use sqlx::{Database, Pool, Transaction};

/// Rows affected by a statement (each driver has its own `QueryResult` type).
pub(crate) trait RowsAffected {
    /// How many rows the statement inserted, updated or deleted.
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

/// A backend: its pool and the few things its SQL dialect does differently.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The `sqlx` database.
    type Db: Database<QueryResult: RowsAffected>;

    /// Row locks taken by a read that precedes a write in the same transaction
    /// (PostgreSQL: ` FOR UPDATE`; SQLite: nothing, the writer holds the database).
    const FOR_UPDATE: &'static str;
    /// How a queue claim skips rows another worker holds (PostgreSQL:
    /// ` FOR UPDATE SKIP LOCKED`; SQLite: nothing).
    const SKIP_LOCKED: &'static str;
    /// Starts a read-only transaction whose reads see one snapshot.
    const BEGIN_SNAPSHOT: &'static str;

    /// The connection pool.
    fn pool(&self) -> &Pool<Self::Db>;

    /// The database URL with its password redacted, for messages.
    fn url(&self) -> &str;

    /// Starts a transaction that will write (SQLite: `BEGIN IMMEDIATE`, so writers
    /// queue on the lock instead of failing on an upgrade).
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, RegistryError>;

    /// Appends `events` to the event log, in order, with few statements.
    async fn insert_events(
        conn: &mut <Self::Db as Database>::Connection,
        events: &[NewEvent],
    ) -> sqlx::Result<()>;

    /// A database error, with what was being done.
    fn err(&self, context: &str, e: sqlx::Error) -> RegistryError {
        db_error(self.url(), context, e)
    }
}

/// A backend borrowed by the flows written once (`Flows(self).enable_mirror(…)`).
pub(crate) struct Flows<'a, R>(pub(crate) &'a R);
