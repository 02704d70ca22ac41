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

/// Where a write stopped: what was being done, and the database's error.
pub(crate) type StepError = (&'static str, sqlx::Error);

/// Maps a database error to a [`StepError`] naming `context`.
pub(crate) fn step(context: &'static str) -> impl Fn(sqlx::Error) -> StepError {
    move |e| (context, e)
}

/// Attempts of a write transaction that lost a deadlock or serialisation race
/// (PostgreSQL only: SQLite writers queue on `BEGIN IMMEDIATE` instead).
pub(crate) const MAX_WRITE_ATTEMPTS: usize = 5;

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
    /// A shared row lock that still lets others lock the rows for key share
    /// (PostgreSQL: ` FOR SHARE`; SQLite: nothing).
    const FOR_SHARE: &'static str;
    /// The weakest row lock: keeps the row (and its key) from being deleted or its
    /// key changed (PostgreSQL: ` FOR KEY SHARE`; SQLite: nothing).
    const FOR_KEY_SHARE: &'static str;
    /// An exclusive row lock for an update that leaves the key alone (PostgreSQL:
    /// ` FOR NO KEY UPDATE`; SQLite: nothing).
    const FOR_NO_KEY_UPDATE: &'static str;

    /// A subquery yielding one `value` row per element of the JSON array of strings
    /// bound at `$n` (SQLite `json_each`, PostgreSQL `jsonb_array_elements_text`).
    /// Lists travel as one JSON text bind on both backends.
    fn json_values(n: u8) -> String;

    /// Whether `e` means the transaction lost a race and may simply run again.
    fn is_retryable(e: &sqlx::Error) -> bool;

    /// Serialises writers of one kind for the rest of the transaction
    /// (PostgreSQL: `pg_advisory_xact_lock(key)`; SQLite: nothing, one writer at a time).
    async fn lock_for_transaction(
        conn: &mut <Self::Db as Database>::Connection,
        key: i64,
    ) -> sqlx::Result<()>;

    /// The connection pool.
    fn pool(&self) -> &Pool<Self::Db>;

    /// The database URL with its password redacted, for messages.
    fn url(&self) -> &str;

    /// Starts a transaction that will write (SQLite: `BEGIN IMMEDIATE`, so writers
    /// queue on the lock instead of failing on an upgrade).
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, RegistryError> {
        self.begin_write_raw()
            .await
            .map_err(|e| self.err("starting a transaction", e))
    }

    /// [`Self::begin_write`], with the database's error as it came.
    async fn begin_write_raw(&self) -> sqlx::Result<Transaction<'static, Self::Db>>;

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

/// Runs `$body` in a write transaction bound to `$tx` and commits the value it
/// returns; runs it again, in a new transaction, when it lost a deadlock or
/// serialisation race (at most [`MAX_WRITE_ATTEMPTS`] times). Evaluates to
/// `Result<T, StepError>`: an error rolls back (the dropped transaction) and comes back
/// as it came, so callers can tell a unique violation apart.
///
/// A macro rather than a function taking an async closure: a closure that borrows the
/// transaction cannot yet be proven `Send` for every lifetime, which `async_trait` needs.
macro_rules! write_tx {
    ($flows:expr, $what:expr, |$tx:ident| $body:block) => {{
        let flows = &$flows;
        let mut attempt = 1usize;
        loop {
            let result: Result<_, $crate::dialect::StepError> = async {
                #[allow(unused_mut)]
                let mut $tx = flows
                    .0
                    .begin_write_raw()
                    .await
                    .map_err($crate::dialect::step("starting a transaction"))?;
                let value = async { $body }.await?;
                $tx.commit()
                    .await
                    .map_err($crate::dialect::step("committing"))?;
                Ok(value)
            }
            .await;
            match result {
                Err((_, e))
                    if $crate::dialect::is_retryable_in(flows, &e)
                        && attempt < $crate::dialect::MAX_WRITE_ATTEMPTS =>
                {
                    tracing::debug!(attempt, error = %e, "{} lost a race; retrying", $what);
                    tokio::time::sleep(std::time::Duration::from_millis(10 * attempt as u64))
                        .await;
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use write_tx;

/// [`Dialect::is_retryable`] of the backend behind `flows` (for [`write_tx!`]).
pub(crate) fn is_retryable_in<R: Dialect>(_: &Flows<'_, R>, e: &sqlx::Error) -> bool {
    R::is_retryable(e)
}
