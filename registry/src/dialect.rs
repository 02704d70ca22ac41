//! What truly differs between the two SQL backends, and nothing else.
//!
//! Flows written once (the mirror outbox, the read-only queries) are generic over a
//! [`Dialect`]: they write their SQL once with `$n` placeholders (SQLite reads `$n` as
//! the n-th bind too) and standard SQL that both databases accept (`IS DISTINCT FROM`,
//! `COUNT(*) FILTER (…)`, `CAST(… AS TEXT)`), and ask the dialect for the rest: how a
//! writing transaction starts (`BEGIN IMMEDIATE` on SQLite), the row-lock clauses
//! (PostgreSQL only; SQLite has one writer at a time), how events are bulk-inserted, how
//! a JSON list becomes rows and text a JSON column value, and SQLite's index hint.
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

    /// The backend's name, as [`crate::Registry::backend`] reports it.
    const NAME: &'static str;
    /// How many concurrent first connects are grouped into one registration
    /// transaction ([`crate::Registrations::registration_group_size`]).
    const REGISTRATION_GROUP: usize;

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

    /// The device-state statement: [`crate::connections::device_state_sql!`] with this
    /// backend's aggregate of attached policy names into a JSON array (SQLite
    /// `json_group_array`, PostgreSQL `json_agg`), a constant for the hot path.
    const SQL_DEVICE_STATE: &'static str;

    /// A subquery yielding one `value` row per element of the JSON array of strings
    /// bound at `$n` (SQLite `json_each`, PostgreSQL `jsonb_array_elements_text`).
    /// Lists travel as one JSON text bind on both backends.
    fn json_values(n: u8) -> String;

    /// [`Self::json_values`] over a JSON array column (`things.groups`) of the row in
    /// scope instead of a bind.
    fn json_values_of(column: &str) -> String;

    /// [`Self::json_values`] with each element's position: one `(key, value)` row per
    /// element, `key` counting from 0, for lists whose order matters (SQLite
    /// `json_each`, PostgreSQL `jsonb_array_elements_text … WITH ORDINALITY`).
    fn json_entries(n: u8) -> String;

    /// A JSON object built from `pairs` (`'key', expression, …`), of the type the
    /// events' `detail` column holds (SQLite `json_object`, text; PostgreSQL
    /// `jsonb_build_object`).
    fn json_object(pairs: &str) -> String;

    /// The column that orders certificates tied on an indexed key, for keyset cursors
    /// that walk an index in order: SQLite `rowid` (the implicit last column of every
    /// index), PostgreSQL `serial` (the last column of `certificates_status_renew_at`).
    const CERT_TIEBREAK: &'static str;
    /// Written before a column in a condition (`{NOT_INDEXED}status = 'active'`) to keep
    /// the planner off that column's indexes when a better key is at hand (SQLite: the
    /// unary `+`, which SQLite documents for this; PostgreSQL: nothing, its planner
    /// needs no hint and has no unary `+` for text).
    const NOT_INDEXED: &'static str;

    /// A table for `FROM` with one `value` row per element of the JSON array bound at
    /// `$n`, each element itself a JSON array whose items are read as `value ->> 0`,
    /// `value ->> 1`, … (text or SQL NULL; wrap numbers in `CAST(… AS BIGINT)`). Lists of
    /// tuples travel this way (SQLite `json_each`, PostgreSQL `jsonb_array_elements`);
    /// use it without an alias, so its column stays `value`.
    fn json_rows(n: u8) -> String;

    /// The JSON document in the text expression `expr`, as a value for a JSON column
    /// (PostgreSQL: `CAST(expr AS JSON)`, which `jsonb` columns take too and `json` ones
    /// keep as written; SQLite stores the text).
    fn json_column(expr: &str) -> String;

    /// Whether `e` means the transaction lost a race and may simply run again.
    fn is_retryable(e: &sqlx::Error) -> bool;

    /// Serialises writers of one kind for the rest of the transaction
    /// (PostgreSQL: `pg_advisory_xact_lock(key)`; SQLite: nothing, one writer at a time).
    async fn lock_for_transaction(
        conn: &mut <Self::Db as Database>::Connection,
        key: i64,
    ) -> sqlx::Result<()>;

    /// Makes the current transaction write, changing nothing anyone reads, so that its
    /// commit does the I/O of a registration's (for `/healthz`).
    async fn probe_write(conn: &mut <Self::Db as Database>::Connection) -> sqlx::Result<()>;

    /// The connection pool.
    fn pool(&self) -> &Pool<Self::Db>;

    /// The gate that lets concurrent write probes share one recent result.
    fn probe_gate(&self) -> &crate::common::ProbeGate;

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

/// The most bind parameters one statement may carry on both backends (SQLite's
/// default `SQLITE_MAX_VARIABLE_NUMBER`; PostgreSQL allows 65,535).
const MAX_BINDS: usize = 32_766;

/// The most rows one multi-row `INSERT` carries.
const MAX_ROWS_PER_INSERT: usize = 1024;

/// Inserts `rows` with multi-row `{head} VALUES (…), (…) {tail}` statements, `columns`
/// binds per row pushed by `bind`. Each statement carries a power-of-two number of rows,
/// so a few distinct statements are prepared and cached whatever the batch size.
pub(crate) async fn insert_rows<DB, T>(
    conn: &mut DB::Connection,
    head: &str,
    columns: usize,
    tail: &str,
    rows: &[T],
    mut bind: impl FnMut(&mut sqlx::query_builder::Separated<'_, DB, &'static str>, &T),
) -> sqlx::Result<()>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let max = MAX_ROWS_PER_INSERT.min(MAX_BINDS / columns.max(1));
    let mut rest = rows;
    while !rest.is_empty() {
        let n = rest.len().min(max);
        // Largest power of two not above n.
        let n = 1 << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, later) = rest.split_at(n);
        rest = later;
        let mut query = sqlx::QueryBuilder::<DB>::new(head);
        query.push(" ");
        query.push_values(chunk, |mut row, value| bind(&mut row, value));
        query.push(tail);
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// The serials and fingerprints among two JSON lists already recorded.
pub(crate) fn sql_taken<R: Dialect>() -> String {
    format!(
        "SELECT serial, fingerprint_sha256 FROM certificates \
         WHERE serial IN ({}) OR fingerprint_sha256 IN ({})",
        R::json_values(1),
        R::json_values(2)
    )
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: sqlx::Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    for<'q> String: sqlx::Encode<'q, R::Db> + sqlx::Decode<'q, R::Db> + sqlx::Type<R::Db>,
    (String, String): for<'r> sqlx::FromRow<'r, <R::Db as Database>::Row>,
{
    /// The serials and fingerprints among `certs` already recorded (to name the
    /// duplicate after a unique violation).
    pub(crate) async fn taken<'a>(
        &self,
        certs: impl Iterator<Item = &'a crate::NewCertificate> + Clone,
    ) -> Result<std::collections::HashSet<String>, RegistryError> {
        let serials = crate::common::to_json(&certs.clone().map(|c| &c.serial).collect::<Vec<_>>());
        let fingerprints =
            crate::common::to_json(&certs.map(|c| &c.fingerprint_sha256).collect::<Vec<_>>());
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql_taken::<R>()))
            .bind(serials)
            .bind(fingerprints)
            .fetch_all(self.0.pool())
            .await
            .map_err(|e| self.0.err("looking up duplicate serials", e))?;
        Ok(rows.into_iter().flat_map(|(s, f)| [s, f]).collect())
    }
}
