//! The SQLite registry: one file, WAL mode, `synchronous=FULL`.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE`, so two processes on the
//! same file queue on the write lock (busy timeout) instead of dead-locking on a lock
//! upgrade. Group commits cost a handful of statements whatever the slice size: lookups
//! and updates take their keys as one JSON array (`json_each`), inserts are multi-row
//! `VALUES` lists in power-of-two chunks (so few distinct statements get prepared and
//! cached per connection).

use crate::common::{
    self, CertCheck, CertState, EVENT_CERT_DELIVERED, FoundPolicy, NAME_CHUNK, NewEvent,
    cert_columns, db_error, migrate_error, to_json,
};
use crate::{
    CertificateFilter, CertificateRecord, ConnectionRecord, DeviceState, EventFilter, EventRecord,
    IssueOutcome, IssueRecord, MAX_CONNECTIONS_PER_CERTIFICATE, PolicyRecord, Registration,
    RegistrationOutcome, Registry, RegistryCounts, RegistryError, ThingFilter, ThingRecord,
};
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

/// How long a writer waits for another writer (possibly another process) to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What an `sqlite:` URL or plain path names.
#[derive(Debug, Clone)]
pub(crate) enum SqliteTarget {
    File(PathBuf),
    /// `sqlite::memory:` — a private in-memory database (one connection).
    Memory,
}

// The statements of the hot paths (their query plans are checked by a test).
const SQL_TAKEN: &str = "SELECT serial, fingerprint_sha256 FROM certificates \
     WHERE serial IN (SELECT value FROM json_each(?1)) \
        OR fingerprint_sha256 IN (SELECT value FROM json_each(?2))";
const SQL_SUPERSEDE: &str = "UPDATE certificates SET status = 'superseded' \
     WHERE serial IN (SELECT value FROM json_each(?1)) AND +status = 'active'";
const SQL_REVOKE: &str = "UPDATE certificates SET status = 'revoked', revoked_at = r.at, \
        revocation_reason = 'superseded' \
     FROM (SELECT value ->> 0 AS serial, value ->> 1 AS at FROM json_each(?1)) AS r \
     WHERE certificates.serial = r.serial AND +certificates.status = 'active'";
const SQL_EXISTING_THINGS: &str =
    "SELECT name FROM things WHERE name IN (SELECT value FROM json_each(?1))";
const SQL_ACTIVE_SERIALS: &str = "SELECT thing_name, serial FROM certificates \
     WHERE status = 'active' AND thing_name IN (SELECT value FROM json_each(?1))";
const SQL_ACTIVE_CERTIFICATES: &str = concat!(
    "SELECT ",
    cert_columns!(),
    " FROM certificates WHERE status = 'active' \
       AND thing_name IN (SELECT value FROM json_each(?1)) \
     ORDER BY thing_name, created_at, serial"
);
const SQL_DELIVER: &str = "UPDATE certificates SET delivered_at = ?2 \
     WHERE serial IN (SELECT value FROM json_each(?1)) AND delivered_at IS NULL \
     RETURNING serial, thing_name";

/// The thing columns, in the order [`common::thing_from_row`] reads them.
macro_rules! thing_columns {
    () => {
        "name, template, created_at, updated_at, thing_type, attributes, groups, \
         billing_group, version"
    };
}

/// A certificate, its thing and its attached policies (a JSON array) by fingerprint:
/// the hot path of every returning connection.
const SQL_DEVICE_STATE: &str = concat!(
    "SELECT ",
    cert_columns!(c),
    ", t.name, t.template, t.created_at, t.updated_at, t.thing_type, t.attributes, \
       t.groups, t.billing_group, t.version, \
       (SELECT json_group_array(a.policy_name) FROM policy_attachments a \
        WHERE a.serial = c.serial) \
     FROM certificates c JOIN things t ON t.name = c.thing_name \
     WHERE c.fingerprint_sha256 = ?1"
);
const SQL_REGISTRATION_CERT: &str =
    "SELECT thing_name, status, registered_at FROM certificates WHERE serial = ?1";
const SQL_ATTACHED: &str = "SELECT policy_name FROM policy_attachments WHERE serial = ?1 \
     ORDER BY policy_name";
const SQL_THING: &str = concat!("SELECT ", thing_columns!(), " FROM things WHERE name = ?1");
const SQL_CREATE_POLICY: &str = "INSERT INTO policies (name, document, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?3) ON CONFLICT (name) DO NOTHING RETURNING name";
const SQL_FIND_POLICIES: &str = "SELECT name, document FROM policies \
     WHERE name IN (SELECT value FROM json_each(?1))";
const SQL_UPDATE_THING: &str = "UPDATE things SET template = ?2, thing_type = ?3, \
        attributes = ?4, groups = ?5, billing_group = ?6, version = ?7, updated_at = ?8 \
     WHERE name = ?1";
const SQL_ATTACH: &str = "INSERT INTO policy_attachments (policy_name, serial, attached_at) \
     SELECT value, ?2, ?3 FROM json_each(?1) WHERE true \
     ON CONFLICT (policy_name, serial) DO NOTHING";
const SQL_MARK_REGISTERED: &str = "UPDATE certificates SET registered_at = ?2 \
     WHERE serial = ?1 AND registered_at IS NULL";
const SQL_POLICY: &str =
    "SELECT name, document, created_at, updated_at FROM policies WHERE name = ?1";
const SQL_POLICIES: &str =
    "SELECT name, document, created_at, updated_at FROM policies ORDER BY name";
const SQL_POLICIES_OF_THING: &str = "SELECT name, document, created_at, updated_at \
     FROM policies WHERE name IN ( \
        SELECT a.policy_name FROM certificates c \
        JOIN policy_attachments a ON a.serial = c.serial \
        WHERE c.thing_name = ?1 AND c.status = 'active') \
     ORDER BY name";
/// Deletes all but the newest `?2` connections of each fingerprint of `?1` (a JSON
/// array): one cutoff id per fingerprint, then a range delete through the index.
const SQL_PRUNE_CONNECTIONS: &str = "WITH cutoff AS MATERIALIZED ( \
        SELECT f.value AS fp, \
           (SELECT k.id FROM connections k WHERE k.fingerprint_sha256 = f.value \
            ORDER BY k.id DESC LIMIT 1 OFFSET ?2) AS id \
        FROM json_each(?1) AS f) \
     DELETE FROM connections WHERE id IN ( \
        SELECT c.id FROM cutoff \
        JOIN connections c ON c.fingerprint_sha256 = cutoff.fp AND c.id < cutoff.id)";
const SQL_RECENT_CONNECTIONS: &str = "SELECT fingerprint_sha256, thing_name, client_addr, at \
     FROM connections WHERE fingerprint_sha256 = ?1 ORDER BY id DESC LIMIT ?2";
const SQL_REVOKED_SERIALS: &str = "SELECT serial FROM certificates \
     WHERE status = 'revoked' AND not_after >= ?1 ORDER BY serial";

#[derive(Debug)]
pub(crate) struct SqliteRegistry {
    pool: SqlitePool,
    /// Redacted URL, for messages.
    url: String,
}

impl SqliteRegistry {
    pub(crate) async fn open(url: &str, target: SqliteTarget) -> Result<Self, RegistryError> {
        let url = crate::redact_url(url);
        let unreachable = |reason: String| RegistryError::Unreachable {
            url: url.clone(),
            reason,
        };
        let base = SqliteConnectOptions::new()
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .synchronous(SqliteSynchronous::Full)
            // 32 MiB page cache per connection (default 2 MiB): random serials and
            // fingerprints touch index pages all over the file.
            .pragma("cache_size", "-32768");

        let memory = matches!(target, SqliteTarget::Memory);
        let pool = match target {
            SqliteTarget::Memory => {
                let options = base.in_memory(true).journal_mode(SqliteJournalMode::Memory);
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(options)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?
            }
            SqliteTarget::File(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
                    && !parent.is_dir()
                {
                    return Err(unreachable(format!(
                        "directory {} does not exist",
                        parent.display()
                    )));
                }
                let options = base
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal);
                // One direct connection first: it gives a clear error (a pool would only
                // say it timed out) and runs the migrations.
                let mut conn = options
                    .connect()
                    .await
                    .map_err(|e| unreachable(format!("{}: {e}", path.display())))?;
                let migrated = migrate(&mut conn).await;
                let _ = conn.close().await;
                migrated?;
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(60))
                    .connect_lazy_with(options)
            }
        };
        let registry = SqliteRegistry { pool, url };
        if memory {
            // In memory: migrate through the pool's only connection.
            let mut conn = registry
                .pool
                .acquire()
                .await
                .map_err(|e| registry.err("opening", e))?;
            migrate(&mut conn).await?;
        }
        Ok(registry)
    }

    fn err(&self, context: &str, e: sqlx::Error) -> RegistryError {
        db_error(&self.url, context, e)
    }

    /// The serials and fingerprints of `records` already in the database.
    async fn taken(&self, records: &[IssueRecord]) -> Result<HashSet<String>, RegistryError> {
        let serials = json(records.iter().map(|r| &r.certificate.serial));
        let fingerprints = json(records.iter().map(|r| &r.certificate.fingerprint_sha256));
        let rows: Vec<(String, String)> = sqlx::query_as(SQL_TAKEN)
            .bind(serials)
            .bind(fingerprints)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("looking up duplicate serials", e))?;
        let taken = rows.into_iter().flat_map(|(s, f)| [s, f]).collect();
        Ok(taken)
    }

    /// The writes of a group commit, in an order that lets a record supersede or revoke
    /// a certificate inserted by an earlier record of the same slice.
    async fn write_plan(
        conn: &mut SqliteConnection,
        plan: &common::Plan<'_>,
    ) -> Result<(), WriteError> {
        insert_rows(
            conn,
            "INSERT INTO things (name, template, created_at, updated_at) VALUES ",
            "(?, ?, ?, ?)",
            4,
            " ON CONFLICT (name) DO UPDATE SET \
                template = excluded.template, updated_at = excluded.updated_at, \
                version = things.version + (things.template IS NOT excluded.template)",
            &plan.things,
            |q, t| {
                q.bind(t.name)
                    .bind(t.template)
                    .bind(t.created_at)
                    .bind(t.updated_at)
            },
        )
        .await
        .map_err(|e| WriteError::new("recording things", e))?;
        insert_rows(
            conn,
            "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, renew_at, der) VALUES ",
            "(?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?)",
            12,
            "",
            &plan.certificates,
            |q, r| {
                let c = &r.certificate;
                q.bind(&c.serial)
                    .bind(&c.fingerprint_sha256)
                    .bind(&c.public_key_sha256)
                    .bind(&r.thing_name)
                    .bind(&c.issuer)
                    .bind(c.origin.as_str())
                    .bind(&c.key_algorithm)
                    .bind(c.not_before)
                    .bind(c.not_after)
                    .bind(r.at)
                    .bind(c.renew_at)
                    .bind(&c.der)
            },
        )
        .await
        .map_err(|e| WriteError::new("recording certificates", e))?;
        if !plan.superseded.is_empty() {
            // `+status`: look rows up by serial, never by scanning the status index.
            sqlx::query(SQL_SUPERSEDE)
                .bind(to_json(&plan.superseded))
                .execute(&mut *conn)
                .await
                .map_err(|e| WriteError::new("superseding certificates", e))?;
        }
        if !plan.revoked.is_empty() {
            sqlx::query(SQL_REVOKE)
                .bind(to_json(&plan.revoked))
                .execute(&mut *conn)
                .await
                .map_err(|e| WriteError::new("revoking certificates", e))?;
        }
        insert_events(conn, &plan.events)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        Ok(())
    }

    async fn fetch_things(
        &self,
        sql: String,
        binds: Vec<Bind>,
    ) -> Result<Vec<ThingRecord>, RegistryError> {
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing things", e))?;
        rows.iter()
            .map(common::thing_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading things", e))
    }

    fn certs(&self, rows: &[SqliteRow]) -> Result<Vec<CertificateRecord>, RegistryError> {
        rows.iter()
            .map(common::cert_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading certificates", e))
    }

    fn policies(&self, rows: &[SqliteRow]) -> Result<Vec<PolicyRecord>, RegistryError> {
        rows.iter()
            .map(common::policy_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading policies", e))
    }

    /// The body of [`Registry::register`], inside the caller's `BEGIN IMMEDIATE`
    /// transaction. Returns the outcome and whether to commit.
    async fn register_in(
        conn: &mut SqliteConnection,
        reg: &Registration,
        requested: &[common::RequestedPolicy<'_>],
    ) -> Result<(RegistrationOutcome, bool), WriteError> {
        let cert: Option<(String, String, Option<i64>)> = sqlx::query_as(SQL_REGISTRATION_CERT)
            .bind(&reg.serial)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading the certificate", e))?;
        let cert = cert.map(|(thing_name, status, registered_at)| CertState {
            thing_name,
            status,
            registered_at,
        });
        match common::check_certificate(reg, cert.as_ref()) {
            CertCheck::Proceed => {}
            CertCheck::Refused(reason) => {
                return Ok((RegistrationOutcome::Refused { reason }, false));
            }
            CertCheck::AlreadyRegistered => {
                let policies: Vec<String> = sqlx::query_scalar(SQL_ATTACHED)
                    .bind(&reg.serial)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(|e| WriteError::new("reading attached policies", e))?;
                return Ok((RegistrationOutcome::AlreadyRegistered { policies }, false));
            }
        }
        let row = sqlx::query(SQL_THING)
            .bind(&reg.thing_name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading the thing", e))?;
        let Some(thing) = row
            .as_ref()
            .map(common::thing_from_row)
            .transpose()
            .map_err(|e| WriteError::new("reading the thing", e))?
        else {
            let reason = format!("thing {:?} is not in the registry", reg.thing_name);
            return Ok((RegistrationOutcome::Refused { reason }, false));
        };
        if thing.version != reg.expected_thing_version {
            return Ok((RegistrationOutcome::ThingChanged, false));
        }

        let mut created = HashSet::new();
        for p in requested {
            let Some(document) = p.document else { continue };
            let inserted: Option<String> = sqlx::query_scalar(SQL_CREATE_POLICY)
                .bind(p.name)
                .bind(to_json(document))
                .bind(reg.at)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| WriteError::new("creating policies", e))?;
            created.extend(inserted);
        }
        let names: Vec<&str> = requested.iter().map(|p| p.name).collect();
        let rows: Vec<(String, String)> = sqlx::query_as(SQL_FIND_POLICIES)
            .bind(to_json(&names))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading policies", e))?;
        let mut found = HashMap::with_capacity(rows.len());
        for (name, document) in rows {
            let stored = common::parse_json(&document)
                .map_err(|e| WriteError::new("reading policies", e))?;
            found.insert(name.clone(), FoundPolicy::new(stored, requested, &name));
        }
        let plan = match common::plan_registration(reg, &thing, requested, &created, &found) {
            Ok(plan) => plan,
            Err(reason) => return Ok((RegistrationOutcome::Refused { reason }, false)),
        };

        if let Some((details, version)) = &plan.thing {
            sqlx::query(SQL_UPDATE_THING)
                .bind(&reg.thing_name)
                .bind(&reg.template)
                .bind(details.thing_type.as_deref())
                .bind(to_json(&details.attributes))
                .bind(to_json(&details.groups))
                .bind(details.billing_group.as_deref())
                .bind(version)
                .bind(reg.at)
                .execute(&mut *conn)
                .await
                .map_err(|e| WriteError::new("updating the thing", e))?;
        }
        if !plan.attach.is_empty() {
            sqlx::query(SQL_ATTACH)
                .bind(to_json(&plan.attach))
                .bind(&reg.serial)
                .bind(reg.at)
                .execute(&mut *conn)
                .await
                .map_err(|e| WriteError::new("attaching policies", e))?;
        }
        sqlx::query(SQL_MARK_REGISTERED)
            .bind(&reg.serial)
            .bind(reg.at)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("marking the certificate registered", e))?;
        insert_events(conn, &plan.events)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        Ok((
            RegistrationOutcome::Registered {
                policies: plan.attach,
            },
            true,
        ))
    }
}

/// Applies pending migrations inside one `BEGIN IMMEDIATE` transaction, so two
/// processes opening a new file at once do not both try to create the schema.
async fn migrate(conn: &mut SqliteConnection) -> Result<(), RegistryError> {
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| RegistryError::Migration(format!("locking the database: {e}")))?;
    common::migrator(common::SQLITE_MIGRATIONS, true)
        // `run_direct` rather than `run`: the latter makes this future not `Send`.
        .run_direct(None, &mut *tx, false)
        .await
        .map_err(migrate_error)?;
    tx.commit()
        .await
        .map_err(|e| RegistryError::Migration(format!("committing: {e}")))
}

async fn insert_events(conn: &mut SqliteConnection, events: &[NewEvent]) -> sqlx::Result<()> {
    insert_rows(
        conn,
        "INSERT INTO events (at, kind, thing_name, serial, detail) VALUES ",
        "(?, ?, ?, ?, ?)",
        5,
        "",
        events,
        |q, e| {
            q.bind(e.at)
                .bind(e.kind)
                .bind(e.thing_name.as_deref())
                .bind(e.serial.as_deref())
                .bind(e.detail.as_str())
        },
    )
    .await
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Most rows in one multi-row `INSERT` (SQLite allows 32,766 bound values).
const MAX_ROWS_PER_INSERT: usize = 1024;

/// Inserts `rows` with multi-row `INSERT … VALUES (…), (…)` statements, in order. Chunk
/// sizes are powers of two (at most [`MAX_ROWS_PER_INSERT`]), so a connection prepares
/// and caches at most a dozen distinct statements per table whatever the slice sizes.
async fn insert_rows<T>(
    conn: &mut SqliteConnection,
    head: &str,
    row: &str,
    binds_per_row: usize,
    tail: &str,
    rows: &[T],
    bind: impl for<'q> Fn(SqliteQuery<'q>, &'q T) -> SqliteQuery<'q>,
) -> sqlx::Result<()> {
    let max = MAX_ROWS_PER_INSERT.min(32_766 / binds_per_row);
    let mut rest = rows;
    while !rest.is_empty() {
        let n = rest.len().min(max);
        // Largest power of two not above n.
        let n = 1 << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, tail_rows) = rest.split_at(n);
        rest = tail_rows;
        let mut sql = String::with_capacity(head.len() + n * (row.len() + 2) + tail.len());
        sql.push_str(head);
        for i in 0..n {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(row);
        }
        sql.push_str(tail);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for r in chunk {
            q = bind(q, r);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

struct WriteError {
    context: &'static str,
    error: sqlx::Error,
}

impl WriteError {
    fn new(context: &'static str, error: sqlx::Error) -> Self {
        WriteError { context, error }
    }
}

fn json<'a>(items: impl Iterator<Item = &'a String>) -> String {
    to_json(&items.collect::<Vec<_>>())
}

/// A bind value of a dynamically assembled query.
enum Bind {
    Text(String),
    Int(i64),
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
        };
    }
    q
}

/// Appends ` LIMIT ?` (SQLite: -1 means none).
fn push_limit(sql: &mut String, binds: &mut Vec<Bind>, limit: Option<u32>) {
    sql.push_str(" LIMIT ?");
    binds.push(Bind::Int(common::limit_value(limit).unwrap_or(-1)));
}

/// `list_things`: SQL and binds.
fn things_query(filter: &ThingFilter) -> (String, Vec<Bind>) {
    let mut sql = String::from(concat!("SELECT ", thing_columns!(), " FROM things"));
    let mut binds = Vec::new();
    if let Some(after) = &filter.after {
        sql.push_str(" WHERE name > ?");
        binds.push(Bind::Text(after.clone()));
    }
    sql.push_str(" ORDER BY name");
    push_limit(&mut sql, &mut binds, filter.limit);
    (sql, binds)
}

/// `list_certificates`: SQL and binds.
fn certificates_query(filter: &CertificateFilter) -> (String, Vec<Bind>) {
    let mut sql = String::from(concat!("SELECT ", cert_columns!(), " FROM certificates"));
    let mut binds = Vec::new();
    let mut conditions = Vec::new();
    if let Some(thing) = &filter.thing_name {
        conditions.push("thing_name = ?");
        binds.push(Bind::Text(thing.clone()));
    }
    if let Some(status) = filter.status {
        conditions.push("status = ?");
        binds.push(Bind::Text(status.as_str().to_owned()));
    }
    if let Some(before) = filter.expires_before {
        conditions.push("not_after <= ?");
        binds.push(Bind::Int(before));
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    sql.push_str(" ORDER BY thing_name, created_at, serial");
    push_limit(&mut sql, &mut binds, filter.limit);
    (sql, binds)
}

/// `list_events`: SQL and binds.
fn events_query(filter: &EventFilter) -> (String, Vec<Bind>) {
    let mut sql = String::from("SELECT id, at, kind, thing_name, serial, detail FROM events");
    let mut binds = Vec::new();
    let mut conditions = Vec::new();
    if let Some(thing) = &filter.thing_name {
        conditions.push("thing_name = ?");
        binds.push(Bind::Text(thing.clone()));
    }
    if let Some(serial) = &filter.serial {
        conditions.push("serial = ?");
        binds.push(Bind::Text(serial.clone()));
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    sql.push_str(" ORDER BY id");
    push_limit(&mut sql, &mut binds, filter.limit);
    (sql, binds)
}

#[async_trait]
impl Registry for SqliteRegistry {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn record_issued(
        &self,
        records: &[IssueRecord],
    ) -> Result<Vec<IssueOutcome>, RegistryError> {
        common::validate(records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let names = to_json(&common::distinct_names(records));

        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))?;

        let existing: HashSet<String> = sqlx::query_scalar(SQL_EXISTING_THINGS)
            .bind(&names)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err("reading things", e))?
            .into_iter()
            .collect();
        let mut active: HashMap<String, BTreeSet<String>> = HashMap::new();
        if !existing.is_empty() {
            let rows: Vec<(String, String)> = sqlx::query_as(SQL_ACTIVE_SERIALS)
                .bind(&names)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.err("reading active certificates", e))?;
            for (thing, serial) in rows {
                active.entry(thing).or_default().insert(serial);
            }
        }

        let plan = common::plan(records, &existing, active);
        if plan.certificates.is_empty() {
            // Everything conflicted: nothing to write.
            tx.rollback()
                .await
                .map_err(|e| self.err("ending a transaction", e))?;
            return Ok(plan.outcomes);
        }

        match Self::write_plan(&mut tx, &plan).await {
            Ok(()) => {}
            Err(WriteError { context, error }) => {
                let _ = tx.rollback().await;
                if common::is_unique_violation(&error) {
                    let taken = self.taken(records).await?;
                    return Err(common::duplicate_of(records, &taken, &error.to_string()));
                }
                return Err(self.err(context, error));
            }
        }
        tx.commit()
            .await
            .map_err(|e| self.err("committing issued certificates", e))?;
        Ok(plan.outcomes)
    }

    async fn mark_delivered(&self, serials: &[String], at: i64) -> Result<(), RegistryError> {
        let serials = common::dedup_in_order(serials);
        if serials.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        let rows: Vec<(String, String)> = sqlx::query_as(SQL_DELIVER)
            .bind(to_json(&serials))
            .bind(at)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err("marking certificates delivered", e))?;
        let delivered: HashMap<String, String> = rows.into_iter().collect();
        let events: Vec<NewEvent> = serials
            .iter()
            .filter_map(|s| {
                delivered.get(*s).map(|thing| NewEvent {
                    at,
                    kind: EVENT_CERT_DELIVERED,
                    thing_name: Some(thing.clone()),
                    serial: Some((*s).to_owned()),
                    detail: "{}".to_owned(),
                })
            })
            .collect();
        insert_events(&mut tx, &events)
            .await
            .map_err(|e| self.err("appending events", e))?;
        tx.commit()
            .await
            .map_err(|e| self.err("committing deliveries", e))
    }

    async fn active_certificates(
        &self,
        thing_names: &[String],
    ) -> Result<HashMap<String, Vec<CertificateRecord>>, RegistryError> {
        let mut out = HashMap::new();
        for chunk in thing_names.chunks(NAME_CHUNK) {
            let rows = sqlx::query(SQL_ACTIVE_CERTIFICATES)
                .bind(to_json(chunk))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err("reading active certificates", e))?;
            common::group_by_thing(self.certs(&rows)?, &mut out);
        }
        Ok(out)
    }

    async fn get_thing(&self, name: &str) -> Result<Option<ThingRecord>, RegistryError> {
        Ok(self
            .fetch_things(SQL_THING.to_owned(), vec![Bind::Text(name.to_owned())])
            .await?
            .pop())
    }

    async fn list_things(&self, filter: &ThingFilter) -> Result<Vec<ThingRecord>, RegistryError> {
        let (sql, binds) = things_query(filter);
        self.fetch_things(sql, binds).await
    }

    async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            cert_columns!(),
            " FROM certificates WHERE serial = ?1"
        ))
        .bind(serial)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("reading a certificate", e))?;
        Ok(self.certs(&rows)?.pop())
    }

    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let (sql, binds) = certificates_query(filter);
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing certificates", e))?;
        self.certs(&rows)
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>, RegistryError> {
        let (sql, binds) = events_query(filter);
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing events", e))?;
        rows.iter()
            .map(common::event_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading events", e))
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        let _: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err("pinging the database", e))?;
        Ok(())
    }

    async fn counts(&self) -> Result<RegistryCounts, RegistryError> {
        // One read transaction, so the three numbers agree with each other.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        let things: i64 = sqlx::query_scalar("SELECT count(*) FROM things")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err("counting things", e))?;
        let by_status: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM certificates GROUP BY status ORDER BY status",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err("counting certificates", e))?;
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err("counting events", e))?;
        let _ = tx.rollback().await;
        Ok(RegistryCounts {
            things: things as u64,
            certificates_by_status: by_status.into_iter().map(|(s, n)| (s, n as u64)).collect(),
            events: events as u64,
        })
    }

    async fn register(
        &self,
        registration: &Registration,
    ) -> Result<RegistrationOutcome, RegistryError> {
        let requested = match common::requested_policies(registration) {
            Ok(requested) => requested,
            Err(reason) => return Ok(RegistrationOutcome::Refused { reason }),
        };
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        match Self::register_in(&mut tx, registration, &requested).await {
            Ok((outcome, true)) => {
                tx.commit()
                    .await
                    .map_err(|e| self.err("committing a registration", e))?;
                Ok(outcome)
            }
            Ok((outcome, false)) => {
                tx.rollback()
                    .await
                    .map_err(|e| self.err("ending a transaction", e))?;
                Ok(outcome)
            }
            Err(WriteError { context, error }) => {
                let _ = tx.rollback().await;
                Err(self.err(context, error))
            }
        }
    }

    async fn device_state(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<DeviceState>, RegistryError> {
        let row = sqlx::query(SQL_DEVICE_STATE)
            .bind(fingerprint_sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err("reading a device", e))?;
        let Some(row) = row else { return Ok(None) };
        let decode = |row: &SqliteRow| -> sqlx::Result<DeviceState> {
            use sqlx::Row;
            let policies: String = row.try_get(common::CERT_COLUMN_COUNT + 9)?;
            let mut policies: Vec<String> = common::parse_json(&policies)?;
            policies.sort();
            Ok(DeviceState {
                certificate: common::cert_from_row(row)?,
                thing: common::thing_from_row_at(row, common::CERT_COLUMN_COUNT)?,
                policies,
                rotation: None,
                confirms_rotation: false,
            })
        };
        decode(&row)
            .map(Some)
            .map_err(|e| self.err("reading a device", e))
    }

    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(SQL_POLICY)
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("reading a policy", e))?;
        Ok(self.policies(&rows)?.pop())
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(SQL_POLICIES)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing policies", e))?;
        self.policies(&rows)
    }

    async fn policies_of_thing(
        &self,
        thing_name: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(SQL_POLICIES_OF_THING)
            .bind(thing_name)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing the policies of a thing", e))?;
        self.policies(&rows)
    }

    async fn record_connections(
        &self,
        connections: &[ConnectionRecord],
    ) -> Result<(), RegistryError> {
        let (keep, fingerprints) = common::connections_to_keep(connections);
        if keep.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        insert_rows(
            &mut tx,
            "INSERT INTO connections (fingerprint_sha256, thing_name, client_addr, at) VALUES ",
            "(?, ?, ?, ?)",
            4,
            "",
            &keep,
            |q, c| {
                q.bind(c.fingerprint_sha256.as_str())
                    .bind(c.thing_name.as_str())
                    .bind(c.client_addr.as_str())
                    .bind(c.at)
            },
        )
        .await
        .map_err(|e| self.err("recording connections", e))?;
        sqlx::query(SQL_PRUNE_CONNECTIONS)
            .bind(to_json(&fingerprints))
            .bind(MAX_CONNECTIONS_PER_CERTIFICATE as i64 - 1)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err("pruning connections", e))?;
        tx.commit()
            .await
            .map_err(|e| self.err("committing connections", e))
    }

    async fn recent_connections(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Vec<ConnectionRecord>, RegistryError> {
        let rows = sqlx::query(SQL_RECENT_CONNECTIONS)
            .bind(fingerprint_sha256)
            .bind(MAX_CONNECTIONS_PER_CERTIFICATE as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("reading connections", e))?;
        rows.iter()
            .map(common::connection_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading connections", e))
    }

    async fn revoked_serials(&self, now: i64) -> Result<Vec<String>, RegistryError> {
        sqlx::query_scalar(SQL_REVOKED_SERIALS)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("reading revoked certificates", e))
    }

    async fn due_certificates(
        &self,
        _now: i64,
        _expiring_before: Option<i64>,
        _limit: Option<u32>,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        todo!()
    }
    async fn open_due_rotations(
        &self,
        _now: i64,
        _expiring_before: Option<i64>,
    ) -> Result<u64, RegistryError> {
        todo!()
    }
    async fn claim_rotations(
        &self,
        _owner: &str,
        _now: i64,
        _lease_secs: i64,
        _limit: u32,
    ) -> Result<Vec<crate::RotationClaim>, RegistryError> {
        todo!()
    }
    async fn complete_rotations(
        &self,
        _owner: &str,
        _items: &[crate::PreparedReplacement],
    ) -> Result<Vec<bool>, RegistryError> {
        todo!()
    }
    async fn fail_rotation(
        &self,
        _owner: &str,
        _old_serial: &str,
        _error: &str,
        _at: i64,
        _max_attempts: u32,
    ) -> Result<bool, RegistryError> {
        todo!()
    }
    async fn replace_certificate(
        &self,
        _replacement: &crate::Replacement,
    ) -> Result<crate::ReplaceOutcome, RegistryError> {
        todo!()
    }
    async fn take_replacement(
        &self,
        _old_serial: &str,
        _at: i64,
    ) -> Result<Option<crate::TakenReplacement>, RegistryError> {
        todo!()
    }
    async fn confirm_replacement(
        &self,
        _serial: &str,
        _at: i64,
    ) -> Result<Option<String>, RegistryError> {
        todo!()
    }
    async fn get_rotation(
        &self,
        _old_serial: &str,
    ) -> Result<Option<crate::RotationRecord>, RegistryError> {
        todo!()
    }
    async fn list_rotations(
        &self,
        _filter: &crate::RotationFilter,
    ) -> Result<Vec<crate::RotationRecord>, RegistryError> {
        todo!()
    }
    async fn revoke(
        &self,
        _revocation: &crate::Revocation,
    ) -> Result<Vec<crate::RevokedEntry>, RegistryError> {
        todo!()
    }
    async fn revoked_entries(&self, _now: i64) -> Result<Vec<crate::RevokedEntry>, RegistryError> {
        todo!()
    }
    async fn latest_crl(&self) -> Result<Option<crate::StoredCrl>, RegistryError> {
        todo!()
    }
    async fn store_crl(&self, _crl: &crate::StoredCrl) -> Result<bool, RegistryError> {
        todo!()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    /// The hot statements look rows up through their indexes: no full scans, and no
    /// scan of every active certificate through the status index.
    #[tokio::test]
    async fn hot_statements_use_indexes() {
        let dir = std::env::temp_dir().join(format!("fleetcert-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.db");
        let _ = std::fs::remove_file(&path);
        let reg = SqliteRegistry::open("test", SqliteTarget::File(path.clone()))
            .await
            .unwrap();
        for sql in [
            SQL_TAKEN,
            SQL_SUPERSEDE,
            SQL_REVOKE,
            SQL_EXISTING_THINGS,
            SQL_ACTIVE_SERIALS,
            SQL_ACTIVE_CERTIFICATES,
            SQL_DELIVER,
        ] {
            let mut q = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"))).bind("[]");
            if sql.contains("?2") {
                q = q.bind(0_i64);
            }
            let plan: Vec<String> = q
                .fetch_all(&reg.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            let text = plan.join("\n");
            for table in ["things", "certificates", "events"] {
                assert!(!text.contains(&format!("SCAN {table}")), "{sql}\n{text}");
            }
            if !sql.contains("thing_name IN") {
                assert!(!text.contains("(status=?)"), "{sql}\n{text}");
            }
        }
        // Filtered listings.
        let thing = Some("t".to_owned());
        let queries = [
            things_query(&ThingFilter {
                limit: Some(10),
                after: Some("a".to_owned()),
            }),
            certificates_query(&CertificateFilter {
                thing_name: thing.clone(),
                ..Default::default()
            }),
            certificates_query(&CertificateFilter {
                status: Some(crate::CertStatus::Active),
                expires_before: Some(0),
                limit: Some(10),
                ..Default::default()
            }),
            events_query(&EventFilter {
                thing_name: thing.clone(),
                limit: Some(10),
                ..Default::default()
            }),
            events_query(&EventFilter {
                serial: thing.clone(),
                ..Default::default()
            }),
        ];
        for (sql, binds) in queries {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let plan: Vec<String> = bind_all(sqlx::query(AssertSqlSafe(explain)), binds)
                .fetch_all(&reg.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            let text = plan.join("\n");
            assert!(!text.contains("SCAN "), "{sql}\n{text}");
        }
        // The registration, device and connection statements: every table reached
        // through an index (only `json_each` is scanned).
        for (sql, ints) in [
            (SQL_DEVICE_STATE, 0),
            (SQL_REGISTRATION_CERT, 0),
            (SQL_ATTACHED, 0),
            (SQL_THING, 0),
            (SQL_FIND_POLICIES, 0),
            (SQL_UPDATE_THING, 7),
            (SQL_ATTACH, 2),
            (SQL_MARK_REGISTERED, 1),
            (SQL_POLICY, 0),
            (SQL_POLICIES_OF_THING, 0),
            (SQL_PRUNE_CONNECTIONS, 1),
            (SQL_RECENT_CONNECTIONS, 1),
        ] {
            let mut q = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"))).bind("[]");
            for _ in 0..ints {
                q = q.bind(1_i64);
            }
            let plan: Vec<String> = q
                .fetch_all(&reg.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            let text = plan.join("\n");
            for line in &plan {
                // Allowed scans: `json_each` (virtual) and the materialised prune cutoffs.
                let scanned = line.trim().strip_prefix("SCAN ");
                assert!(
                    scanned.is_none_or(|s| s.contains("VIRTUAL TABLE") || s == "cutoff"),
                    "{sql}\n{text}"
                );
            }
        }
        drop(reg);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A registry created before 0002 upgrades in place: existing things get default
    /// details and version 1, existing certificates are unregistered.
    #[tokio::test]
    async fn upgrade_from_0001_keeps_data() {
        let dir = std::env::temp_dir().join(format!("fleetcert-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.db");
        let _ = std::fs::remove_file(&path);
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        common::migrator(&common::SQLITE_MIGRATIONS[..1], false)
            .run_direct(None, &mut conn, false)
            .await
            .unwrap();
        sqlx::raw_sql(
            "INSERT INTO things VALUES ('old', 'default', 1, 2); \
             INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, der) \
             VALUES ('01', 'f1', 'k1', 'old', 'CN=ca', 'active', 'csr', 'ecdsa-p256', 0, 9, \
                1, x'00');",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();

        let reg = SqliteRegistry::open("test", SqliteTarget::File(path.clone()))
            .await
            .unwrap();
        let thing = reg.get_thing("old").await.unwrap().unwrap();
        assert_eq!(thing.details, crate::ThingDetails::default());
        assert_eq!((thing.version, thing.updated_at), (1, 2));
        let state = reg.device_state("f1").await.unwrap().unwrap();
        assert_eq!(state.certificate.registered_at, None);
        assert_eq!(state.thing, thing);
        assert!(state.policies.is_empty());
        drop(reg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
