//! The SQLite registry: one file, WAL mode, `synchronous=FULL`.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE`, so two processes on the
//! same file queue on the write lock (busy timeout) instead of dead-locking on a lock
//! upgrade. Group commits cost a handful of statements whatever the slice size: lookups
//! and updates take their keys as one JSON array (`json_each`), inserts are multi-row
//! `VALUES` lists in power-of-two chunks (so few distinct statements get prepared and
//! cached per connection). The rotation flows (`rotations.rs`) work the same way.

use crate::RegistryError;
use crate::common::{self, NewEvent, migrate_error};

use crate::dialect::Dialect;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a writer waits for another writer (possibly another process) to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// First connects grouped into one transaction (one fsync). Large enough to absorb every
/// handshake finishing while the previous group commits; small enough that a group's
/// latency stays a few milliseconds.
const REGISTRATION_GROUP: usize = 64;

/// What an `sqlite:` URL or plain path names.
#[derive(Debug, Clone)]
pub(crate) enum SqliteTarget {
    File(PathBuf),
    /// `sqlite::memory:` — a private in-memory database (one connection).
    Memory,
}

// The statements of the hot paths (their query plans are checked by a test; the
// issuance and registration ones live in `issuance.rs` and `registrations.rs`).

// ---- rotation, revocation and CRLs ------------------------------------------------------

#[derive(Debug)]
pub(crate) struct SqliteRegistry {
    pool: SqlitePool,
    /// Redacted URL, for messages.
    url: String,
    probes: common::ProbeGate,
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
            .pragma("cache_size", "-32768")
            // Checkpoint every 64 MiB of WAL instead of 4 MiB: large group commits
            // (provisioning, rotation sweeps) otherwise pay a checkpoint, with its fsync,
            // on nearly every commit.
            .pragma("wal_autocheckpoint", "16384");

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
                private_database_files(&path).map_err(&unreachable)?;
                let options = base
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal);
                // One direct connection first: it gives a clear error (a pool would only
                // say it timed out) and runs the migrations.
                let mut conn = connect_waiting(&options)
                    .await
                    .map_err(|e| unreachable(format!("{}: {e}", path.display())))?;
                let migrated = migrate(&mut conn).await;
                let _ = conn.close().await;
                migrated?;
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(60))
                    // Never hand out or take back a connection still inside a
                    // transaction (see `common::reusable`). The ping first lets a
                    // rollback that a dropped transaction queued run on the
                    // connection's worker, so only a connection really stuck is closed.
                    .after_release(|conn, _| {
                        Box::pin(async move {
                            conn.ping().await?;
                            Ok(common::reusable(conn, "returned to the pool"))
                        })
                    })
                    .before_acquire(|conn, _| {
                        Box::pin(async move { Ok(common::reusable(conn, "taken from the pool")) })
                    })
                    .connect_lazy_with(options)
            }
        };
        let registry = SqliteRegistry {
            pool,
            url,
            probes: common::ProbeGate::default(),
        };
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
}

/// The database file and its `-wal` and `-shm` companions are readable by their owner
/// only, like the CA keys: the registry holds every certificate, the sealed replacement
/// keys and the event log. A new file is created with mode 0600 (SQLite gives the
/// companions the database file's mode); an existing one readable by others (made by an
/// older version) is narrowed to 0600.
fn private_database_files(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let mut companions = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        companions.push(PathBuf::from(name));
    }
    for file in companions {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| {
                    format!(
                        "{}: cannot make it private (mode 0600): {e}",
                        file.display()
                    )
                },
            )?;
        }
    }
    Ok(())
}

/// Connects, waiting (up to [`BUSY_TIMEOUT`]) while another process holds the lock that
/// switching a new file to WAL takes: that lock is not waited for by the busy timeout,
/// so several processes opening a new registry at once would otherwise fail.
async fn connect_waiting(options: &SqliteConnectOptions) -> sqlx::Result<SqliteConnection> {
    let started = std::time::Instant::now();
    loop {
        match options.connect().await {
            Err(sqlx::Error::Database(e))
                if is_busy(e.code().as_deref()) && started.elapsed() < BUSY_TIMEOUT =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// True for SQLITE_BUSY (or one of its extended codes).
fn is_busy(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| c & 0xff == 5)
}

/// Applies pending migrations inside one `BEGIN IMMEDIATE` transaction, so two
/// processes opening a new file at once do not both try to create the schema.
async fn migrate(conn: &mut SqliteConnection) -> Result<(), RegistryError> {
    let mut tx =
        conn.begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|source| RegistryError::Database {
                context: "locking the database to migrate it".into(),
                source,
            })?;
    common::migrator(common::SQLITE_MIGRATIONS, true)
        // `run_direct` rather than `run`: the latter makes this future not `Send`.
        .run_direct(None, &mut *tx, false)
        .await
        .map_err(migrate_error)?;
    tx.commit().await.map_err(|source| RegistryError::Database {
        context: "committing the migrations".into(),
        source,
    })
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

impl Dialect for SqliteRegistry {
    type Db = sqlx::Sqlite;
    const NAME: &'static str = "sqlite";
    const REGISTRATION_GROUP: usize = REGISTRATION_GROUP;
    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    const FOR_SHARE: &'static str = "";
    const FOR_KEY_SHARE: &'static str = "";
    const FOR_NO_KEY_UPDATE: &'static str = "";
    const SQL_DEVICE_STATE: &'static str = crate::connections::device_state_sql!(
        "json_group_array(attached.policy_name)",
        "SELECT value FROM json_each(t.groups)"
    );
    const NOT_INDEXED: &'static str = "+";

    fn json_values(n: u8) -> String {
        format!("SELECT value FROM json_each(${n})")
    }

    fn json_values_of(column: &str) -> String {
        format!("SELECT value FROM json_each({column})")
    }

    fn json_entries(n: u8) -> String {
        format!("SELECT key, value FROM json_each(${n})")
    }

    fn json_object(pairs: &str) -> String {
        format!("json_object({pairs})")
    }

    const CERT_TIEBREAK: &'static str = "rowid";

    fn json_rows(n: u8) -> String {
        format!("json_each(${n})")
    }

    fn json_column(expr: &str) -> String {
        expr.to_owned()
    }

    fn is_retryable(_: &sqlx::Error) -> bool {
        // Writers queue on `BEGIN IMMEDIATE` (and the busy timeout): none loses a race.
        false
    }

    async fn lock_for_transaction(_: &mut SqliteConnection, _: i64) -> sqlx::Result<()> {
        Ok(())
    }

    async fn probe_write(conn: &mut SqliteConnection) -> sqlx::Result<()> {
        // Rewriting `user_version` with its own value changes nothing anyone reads, yet
        // it dirties the header page: the commit appends a WAL frame and syncs it,
        // exactly the I/O a registration's commit needs.
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(AssertSqlSafe(format!("PRAGMA user_version = {version}")))
            .execute(conn)
            .await
            .map(drop)
    }

    fn probe_gate(&self) -> &common::ProbeGate {
        &self.probes
    }

    fn pool(&self) -> &sqlx::Pool<sqlx::Sqlite> {
        &self.pool
    }

    fn url(&self) -> &str {
        &self.url
    }

    async fn begin_write_raw(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn insert_events(conn: &mut SqliteConnection, events: &[NewEvent]) -> sqlx::Result<()> {
        insert_events(conn, events).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queries::{
        SQL_POLICY, SQL_RECENT_CONNECTIONS, SQL_REVOKED_ENTRIES, SQL_ROTATION, SQL_THING,
        certificates_query, events_query, things_query,
    };
    use crate::registrations::{SQL_ATTACHED, SQL_MARK_REGISTERED};
    use crate::*;
    use crate::{issuance, registrations};
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
            crate::dialect::sql_taken::<SqliteRegistry>(),
            issuance::sql_supersede::<SqliteRegistry>(),
            issuance::sql_revoke::<SqliteRegistry>(),
            issuance::sql_insert_things::<SqliteRegistry>(),
            issuance::sql_update_things::<SqliteRegistry>(),
            issuance::sql_active_serials::<SqliteRegistry>(),
            issuance::sql_active_certificates::<SqliteRegistry>(),
            issuance::sql_deliver::<SqliteRegistry>(),
        ] {
            let mut q = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"))).bind("[]");
            // A second bind: a JSON list (`$2`) or a number (`?2`).
            if sql.contains("$2") {
                q = q.bind("[]");
            } else if sql.contains("?2") {
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
        let explain = "EXPLAIN QUERY PLAN ";
        let queries: [sqlx::QueryBuilder<sqlx::Sqlite>; 5] = [
            things_query(
                explain,
                &ThingFilter {
                    limit: Some(10),
                    after: Some("a".to_owned()),
                },
            ),
            certificates_query(
                explain,
                &CertificateFilter {
                    thing_name: thing.clone(),
                    ..Default::default()
                },
            ),
            certificates_query(
                explain,
                &CertificateFilter {
                    status: Some(crate::CertStatus::Active),
                    expires_before: Some(0),
                    limit: Some(10),
                    ..Default::default()
                },
            ),
            events_query(
                explain,
                &EventFilter {
                    thing_name: thing.clone(),
                    limit: Some(10),
                    ..Default::default()
                },
            ),
            events_query(
                explain,
                &EventFilter {
                    serial: thing.clone(),
                    ..Default::default()
                },
            ),
        ];
        for mut query in queries {
            let sql = query.sql().as_str().to_owned();
            let plan: Vec<String> = query
                .build()
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
        let prune_connections = crate::connections::sql_prune_connections::<SqliteRegistry>();
        let policies_of_thing = crate::queries::sql_policies_of_thing::<SqliteRegistry>();
        let registration_cert = registrations::sql_registration_cert::<SqliteRegistry>();
        let registration_thing = registrations::sql_thing::<SqliteRegistry>();
        let create_policies = registrations::sql_create_policies::<SqliteRegistry>();
        let find_policies = registrations::sql_find_policies::<SqliteRegistry>();
        let update_thing = registrations::sql_update_thing::<SqliteRegistry>();
        let attach = registrations::sql_attach::<SqliteRegistry>();
        for (sql, ints) in [
            (SqliteRegistry::SQL_DEVICE_STATE, 0),
            (registration_cert.as_str(), 0),
            (crate::registrations::SQL_REGISTRATION_STATE, 0),
            (SQL_ATTACHED, 0),
            (SQL_THING, 0),
            (registration_thing.as_str(), 0),
            (create_policies.as_str(), 1),
            (find_policies.as_str(), 0),
            (update_thing.as_str(), 7),
            (attach.as_str(), 2),
            (SQL_MARK_REGISTERED, 1),
            (SQL_POLICY, 0),
            (policies_of_thing.as_str(), 0),
            (prune_connections.as_str(), 1),
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
                // Allowed scans: `json_each` (virtual), the materialised prune cutoffs, the
                // device state's few policies (a compound of two index searches) and the
                // constant row a registration's two lookups hang from.
                let scanned = line.trim().strip_prefix("SCAN ");
                assert!(
                    scanned.is_none_or(|s| s.contains("VIRTUAL TABLE")
                        || s == "cutoff"
                        || s == "attached"
                        || s == "one"
                        || s == "CONSTANT ROW"),
                    "{sql}\n{text}"
                );
            }
        }
        // Rotation, revocation and CRL statements: the same rule, and the claim and the
        // chunks of `open_due_rotations` come in index order (no sort).
        use crate::rotations::{self as rot, DueBy};
        type Sqlite = SqliteRegistry;
        let completion_update = format!(
            "{} VALUES (?, ?, ?, ?), (?, ?, ?, ?){}",
            rot::SQL_ISSUE_HEAD,
            rot::SQL_ISSUE_TAIL
        );
        let (due_by_renewal, due_by_expiry) = (
            rot::sql_due_chunk::<Sqlite>(DueBy::Renewal),
            rot::sql_due_chunk::<Sqlite>(DueBy::Expiry),
        );
        let open_rotations = rot::sql_open_rotations::<Sqlite>(DueBy::Renewal);
        let due_events = rot::sql_rotation_due_events::<Sqlite>(DueBy::Renewal);
        let open_expiring = rot::sql_open_rotations::<Sqlite>(DueBy::Expiry);
        let expiring_events = rot::sql_rotation_due_events::<Sqlite>(DueBy::Expiry);
        let (claim, claimed) = (rot::sql_claim::<Sqlite>(), rot::sql_claimed::<Sqlite>());
        let completable = rot::sql_completable::<Sqlite>();
        let copy_attachments = rot::sql_copy_attachments::<Sqlite>();
        let issued_events = rot::sql_rotation_issued_events::<Sqlite>();
        let replace_auth = rot::sql_replace_auth::<Sqlite>();
        let cancel_rotations = rot::sql_cancel_rotations::<Sqlite>();
        let lock_thing = crate::revocations::sql_lock_thing::<Sqlite>();
        for (sql, ints, sorted) in [
            (rot::SQL_DUE_CERTIFICATES, 2, true),
            (due_by_renewal.as_str(), 3, false),
            (due_by_expiry.as_str(), 3, false),
            (open_rotations.as_str(), 1, true),
            (due_events.as_str(), 2, true),
            (open_expiring.as_str(), 1, true),
            (expiring_events.as_str(), 2, true),
            (claim.as_str(), 3, false),
            (claimed.as_str(), 0, false),
            (completable.as_str(), 1, true),
            (completion_update.as_str(), 7, true),
            (copy_attachments.as_str(), 0, true),
            (issued_events.as_str(), 2, true),
            (rot::SQL_FAIL_ROTATION, 4, true),
            (replace_auth.as_str(), 0, true),
            (rot::SQL_KEY_HOLDER, 1, true),
            (rot::SQL_PENDING_REPLACEMENT, 0, true),
            (rot::SQL_REPLACEMENT_COUNT, 0, true),
            (rot::SQL_SUPERSEDE_ONE, 0, true),
            (rot::SQL_REVOKE_UNUSED, 2, true),
            (rot::SQL_ROTATION_DELIVERED, 4, true),
            (cancel_rotations.as_str(), 1, true),
            (rot::SQL_TAKEABLE, 0, true),
            (rot::SQL_ROTATION_TAKEN, 1, true),
            (rot::SQL_DELIVER_ONE, 1, true),
            (rot::SQL_CONFIRMABLE, 0, true),
            (rot::SQL_REVOKE_SUPERSEDED, 1, true),
            (rot::SQL_ROTATION_CONFIRMED, 2, true),
            (SQL_ROTATION, 0, true),
            (crate::revocations::SQL_THING_OF_CERTIFICATE, 0, true),
            (lock_thing.as_str(), 0, true),
            (crate::revocations::SQL_REVOKE_SERIAL, 2, true),
            (crate::revocations::SQL_REVOKE_THING, 2, true),
            (SQL_REVOKED_ENTRIES, 0, true),
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
                let scanned = line.trim().strip_prefix("SCAN ");
                assert!(
                    scanned.is_none_or(|s| s.contains("VIRTUAL TABLE")
                        || s.contains("VALUES CLAUSE")
                        || s.contains("CONSTANT ROW")),
                    "{sql}\n{text}"
                );
            }
            // Never every active certificate (or due rotation) through the status alone.
            assert!(!text.contains("(status=?)"), "{sql}\n{text}");
            assert!(!text.contains("(state=?)"), "{sql}\n{text}");
            if !sorted {
                assert!(!text.contains("TEMP B-TREE"), "{sql}\n{text}");
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
