//! The SQLite registry: one file, WAL mode, `synchronous=FULL`.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE`, so two processes on the
//! same file queue on the write lock (busy timeout) instead of dead-locking on a lock
//! upgrade. Group commits cost a handful of statements whatever the slice size: lookups
//! and updates take their keys as one JSON array (`json_each`), inserts are multi-row
//! `VALUES` lists in power-of-two chunks (so few distinct statements get prepared and
//! cached per connection).
//!
//! Rotation works the same way: rotations are opened in chunks (`INSERT … SELECT` after
//! an index-ordered cursor), claimed with one `UPDATE … RETURNING` through the
//! `rotations_claim` index, and a batch of replacements is completed with a fixed
//! handful of statements (certificates as a `VALUES` list, the rotations by
//! `UPDATE … FROM (VALUES …)`, attachments and events by `INSERT … SELECT`).

use crate::common::{
    self, CertCheck, CertState, EVENT_CERT_DELIVERED, EVENT_CERT_ISSUED, EVENT_CERT_REVOKED,
    EVENT_CERT_SUPERSEDED, FoundPolicy, NAME_CHUNK, NewEvent, OPEN_CHUNK, cert_columns,
    migrate_error, to_json,
};
use crate::{
    CertStatus, CertificateFilter, CertificateRecord, ConnectionRecord, DeviceState, EventFilter,
    EventRecord, IssueOutcome, IssueRecord, NewCertificate, PolicyRecord, PreparedReplacement,
    Registration, RegistrationOutcome, Registry, RegistryCounts, RegistryError, ReplaceOutcome,
    Replacement, Revocation, RevokedEntry, RotationBacklog, RotationClaim, RotationFilter,
    RotationRecord, StoredCrl, TakenReplacement, ThingFilter, ThingRecord,
};

use crate::dialect::{Dialect, Flows};
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use std::collections::{BTreeSet, HashMap, HashSet};
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

// The statements of the hot paths (their query plans are checked by a test).
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

const SQL_REGISTRATION_CERT: &str =
    "SELECT thing_name, status, registered_at FROM certificates WHERE serial = ?1";
const SQL_ATTACHED: &str = "SELECT policy_name FROM policy_attachments WHERE serial = ?1 \
     ORDER BY policy_name";
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

// ---- rotation, revocation and CRLs ------------------------------------------------------

/// The condition of a certificate due for rotation besides its renewal point or expiry:
/// active (the status is the index's first column), delivered, no rotation row yet.
macro_rules! due_tail {
    () => {
        " AND c.delivered_at IS NOT NULL \
          AND NOT EXISTS (SELECT 1 FROM rotations r WHERE r.old_serial = c.serial)"
    };
}

/// `due_certificates`: ?1 now, ?2 expiring_before (i64::MIN: none), ?3 limit. Two
/// branches, each through its own index (`+c.renew_at`: the second branch goes through
/// the expiry index).
const SQL_DUE_CERTIFICATES: &str = concat!(
    "SELECT * FROM (SELECT ",
    cert_columns!(c),
    " FROM certificates c WHERE c.status = 'active' AND c.renew_at <= ?1",
    due_tail!(),
    " UNION ALL SELECT ",
    cert_columns!(c),
    " FROM certificates c WHERE c.status = 'active' AND c.not_after <= ?2 \
        AND +c.renew_at > ?1",
    due_tail!(),
    ") ORDER BY renew_at, serial LIMIT ?3"
);
/// One chunk of `open_due_rotations`, in index order after the cursor (?2 key, ?3
/// rowid): due by renewal point (?1 now), at most ?4.
const SQL_DUE_BY_RENEWAL: &str = concat!(
    "SELECT c.renew_at, c.rowid, c.serial FROM certificates c \
     WHERE c.status = 'active' AND c.renew_at <= ?1 AND (c.renew_at, c.rowid) > (?2, ?3)",
    due_tail!(),
    " ORDER BY c.renew_at, c.rowid LIMIT ?4"
);
/// The same, due by expiry (?1 expiring_before).
const SQL_DUE_BY_EXPIRY: &str = concat!(
    "SELECT c.not_after, c.rowid, c.serial FROM certificates c \
     WHERE c.status = 'active' AND c.not_after <= ?1 AND (c.not_after, c.rowid) > (?2, ?3)",
    due_tail!(),
    " ORDER BY c.not_after, c.rowid LIMIT ?4"
);
/// Opens the rotations of the certificates of ?1 (a JSON array of serials) at ?2 (and
/// below: their events, kind ?3).
const SQL_OPEN_ROTATIONS: &str = "INSERT INTO rotations \
        (old_serial, thing_name, origin, state, due_at, updated_at) \
     SELECT c.serial, c.thing_name, c.origin, 'due', ?2, ?2 \
     FROM json_each(?1) AS j CROSS JOIN certificates c ON c.serial = j.value";
const SQL_ROTATION_DUE_EVENTS: &str = "INSERT INTO events (at, kind, thing_name, serial, detail) \
     SELECT ?2, ?3, c.thing_name, c.serial, \
        json_object('origin', c.origin, 'renew_at', c.renew_at, 'not_after', c.not_after) \
     FROM json_each(?1) AS j CROSS JOIN certificates c ON c.serial = j.value \
     ORDER BY j.key";
/// Leases (owner ?1, until ?2) up to ?4 claimable rotations (at ?3 now), taken in claim
/// order; returns (due_at, old_serial) (in no particular order).
const SQL_CLAIM: &str = "UPDATE rotations SET lease_owner = ?1, lease_until = ?2 \
     WHERE old_serial IN (SELECT old_serial FROM rotations \
        WHERE state = 'due' AND origin = 'generated' \
          AND (lease_until IS NULL OR lease_until < ?3) \
        ORDER BY due_at, old_serial LIMIT ?4) \
     RETURNING due_at, old_serial";
/// The certificates of ?1 (JSON array of serials) with their thing's template (in no
/// particular order).
const SQL_CLAIMED: &str = concat!(
    "SELECT ",
    cert_columns!(c),
    ", t.template FROM json_each(?1) AS j \
     CROSS JOIN certificates c ON c.serial = j.value \
     JOIN things t ON t.name = c.thing_name"
);
/// Of the rotations of ?1 (JSON array of old serials), those still `due` and leased by
/// ?2, with the old certificate's thing and registration time.
const SQL_COMPLETABLE: &str = "SELECT r.old_serial, c.thing_name, c.registered_at \
     FROM json_each(?1) AS j \
     CROSS JOIN rotations r ON r.old_serial = j.value \
     JOIN certificates c ON c.serial = r.old_serial \
     WHERE +r.state = 'due' AND r.lease_owner = ?2";
/// Around a multi-row `VALUES` list of (old serial, new serial, sealed key, at): the
/// rotations become `issued`.
const SQL_ISSUE_HEAD: &str = "UPDATE rotations SET state = 'issued', new_serial = v.column2, \
        sealed_key = v.column3, lease_owner = NULL, lease_until = NULL, \
        updated_at = v.column4 FROM (VALUES ";
const SQL_ISSUE_TAIL: &str = ") AS v WHERE rotations.old_serial = v.column1";
/// `certificate.issued` (kind ?2) and `rotation.issued` (kind ?3) for each replacement
/// of ?1 (a JSON array of new serials), in that order per replacement; details as
/// `common::replacement_issued_detail` and `common::rotation_detail` write them.
const SQL_ROTATION_ISSUED_EVENTS: &str = "INSERT INTO events \
        (at, kind, thing_name, serial, detail) \
     SELECT n.created_at, CASE k.column1 WHEN 0 THEN ?2 ELSE ?3 END, n.thing_name, \
        CASE k.column1 WHEN 0 THEN n.serial ELSE n.replaces END, \
        CASE k.column1 WHEN 0 THEN json_object('fingerprint_sha256', n.fingerprint_sha256, \
            'issuer', n.issuer, 'key_algorithm', n.key_algorithm, 'not_after', n.not_after, \
            'not_before', n.not_before, 'origin', n.origin, 'replaces', n.replaces) \
        ELSE json_object('new_serial', n.serial) END \
     FROM json_each(?1) AS j CROSS JOIN certificates n ON n.serial = j.value \
        CROSS JOIN (VALUES (0), (1)) AS k \
     ORDER BY j.key, k.column1";
/// Copies policy attachments: ?1 is a JSON array of `[from, to, at]`.
const SQL_COPY_ATTACHMENTS: &str = "INSERT INTO policy_attachments \
        (policy_name, serial, attached_at) \
     SELECT a.policy_name, j.value ->> 1, j.value ->> 2 \
     FROM json_each(?1) AS j CROSS JOIN policy_attachments a ON a.serial = j.value ->> 0 \
     WHERE true ON CONFLICT (policy_name, serial) DO NOTHING";
const SQL_FAIL_ROTATION: &str = "UPDATE rotations SET attempts = attempts + 1, \
        last_error = ?3, lease_owner = NULL, lease_until = NULL, updated_at = ?4, \
        state = CASE WHEN attempts + 1 >= ?5 THEN 'failed' ELSE state END \
     WHERE old_serial = ?1 AND lease_owner = ?2 AND state = 'due' \
     RETURNING thing_name, attempts, state";
const SQL_REPLACE_AUTH: &str =
    "SELECT thing_name, status, registered_at, origin FROM certificates WHERE serial = ?1";
/// A certificate of thing ?1 with public key ?2, in any status.
const SQL_KEY_HOLDER: &str = "SELECT serial FROM certificates \
     WHERE thing_name = ?1 AND public_key_sha256 = ?2 ORDER BY serial LIMIT 1";
const SQL_SUPERSEDE_ONE: &str =
    "UPDATE certificates SET status = 'superseded' WHERE serial = ?1 AND +status = 'active'";
/// Active replacements of ?1 other than ?2 (never used): revoked at ?3.
const SQL_REVOKE_UNUSED: &str = "UPDATE certificates SET status = 'revoked', \
        revoked_at = ?3, revocation_reason = 'superseded' \
     WHERE replaces = ?1 AND serial <> ?2 AND +status = 'active' \
     RETURNING serial";
/// The authenticated certificate's rotation: created or moved to `delivered`.
const SQL_ROTATION_DELIVERED: &str = "INSERT INTO rotations \
        (old_serial, thing_name, origin, state, due_at, new_serial, updated_at, sealed_key) \
     VALUES (?1, ?2, ?3, 'delivered', ?5, ?4, ?5, ?6) \
     ON CONFLICT (old_serial) DO UPDATE SET state = 'delivered', \
        new_serial = excluded.new_serial, sealed_key = excluded.sealed_key, \
        lease_owner = NULL, lease_until = NULL, updated_at = excluded.updated_at";
/// The replacement of ?1 waiting to be handed out (sealed key held, new certificate
/// active), if any.
const SQL_PENDING_REPLACEMENT: &str = "SELECT r.new_serial FROM rotations r \
     JOIN certificates n ON n.serial = r.new_serial \
     WHERE r.old_serial = ?1 AND +r.state IN ('issued', 'delivered') \
       AND r.sealed_key IS NOT NULL AND +n.status = 'active'";
/// How many certificates replace ?1.
const SQL_REPLACEMENT_COUNT: &str = "SELECT count(*) FROM certificates WHERE replaces = ?1";
/// Open rotations of the certificates of ?1 (JSON array) become `cancelled` at ?2.
const SQL_CANCEL_ROTATIONS: &str = "UPDATE rotations SET state = 'cancelled', \
        sealed_key = NULL, lease_owner = NULL, lease_until = NULL, updated_at = ?2 \
     WHERE old_serial IN (SELECT value FROM json_each(?1)) \
       AND +state IN ('due', 'issued', 'delivered') \
     RETURNING old_serial, thing_name";
/// The replacement of ?1 ready to hand out (sealed key held, certificate still
/// active): pre-issued (`issued`) or handed out before and not used yet (`delivered`).
const SQL_TAKEABLE: &str = "SELECT r.new_serial, r.sealed_key, r.thing_name, r.state \
     FROM rotations r JOIN certificates n ON n.serial = r.new_serial \
     WHERE r.old_serial = ?1 AND +r.state IN ('issued', 'delivered') \
       AND r.sealed_key IS NOT NULL AND +n.status = 'active'";
/// The sealed key stays until the first use confirms the rotation.
const SQL_ROTATION_TAKEN: &str = "UPDATE rotations SET state = 'delivered', \
        updated_at = ?2 \
     WHERE old_serial = ?1";
const SQL_DELIVER_ONE: &str = "UPDATE certificates SET delivered_at = ?2 \
     WHERE serial = ?1 AND delivered_at IS NULL";
/// The certificate ?1 replaces, if neither is revoked: (old serial, thing).
const SQL_CONFIRMABLE: &str = "SELECT o.serial, o.thing_name \
     FROM certificates n JOIN certificates o ON o.serial = n.replaces \
     WHERE n.serial = ?1 AND +n.status <> 'revoked' AND +o.status <> 'revoked'";
const SQL_REVOKE_SUPERSEDED: &str = "UPDATE certificates SET status = 'revoked', \
        revoked_at = ?2, revocation_reason = 'superseded' \
     WHERE serial = ?1 AND +status <> 'revoked'";
const SQL_ROTATION_CONFIRMED: &str = "UPDATE rotations SET state = 'confirmed', \
        new_serial = ?2, sealed_key = NULL, lease_owner = NULL, lease_until = NULL, \
        updated_at = ?3 \
     WHERE old_serial = ?1 AND +state NOT IN ('confirmed', 'cancelled') \
     RETURNING thing_name";

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

    /// The serials and fingerprints of `certs` already in the database.
    async fn taken<'a>(
        &self,
        certs: impl Iterator<Item = &'a NewCertificate> + Clone,
    ) -> Result<HashSet<String>, RegistryError> {
        Flows(self).taken(certs).await
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, RegistryError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))
    }

    /// Ends a transaction whose body found something to do (`Some`: commit) or not
    /// (`None`, or an error: roll back).
    async fn finish_if_some<T>(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        outcome: Result<Option<T>, WriteError>,
        commit_context: &'static str,
    ) -> Result<Option<T>, RegistryError> {
        match outcome {
            Ok(Some(value)) => {
                tx.commit().await.map_err(|e| self.err(commit_context, e))?;
                Ok(Some(value))
            }
            Ok(None) => {
                tx.rollback()
                    .await
                    .map_err(|e| self.err("ending a transaction", e))?;
                Ok(None)
            }
            Err(WriteError { context, error }) => {
                let _ = tx.rollback().await;
                Err(self.err(context, error))
            }
        }
    }

    /// The writes of [`Registry::complete_rotations`], inside the caller's transaction:
    /// the old serials of the rotations completed (none: nothing written).
    async fn complete_in(
        conn: &mut SqliteConnection,
        owner: &str,
        items: &[&PreparedReplacement],
    ) -> Result<HashSet<String>, WriteError> {
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(SQL_COMPLETABLE)
            .bind(json(items.iter().map(|i| &i.old_serial)))
            .bind(owner)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading leased rotations", e))?;
        let leased: HashMap<String, (String, Option<i64>)> = rows
            .into_iter()
            .map(|(old, thing, registered_at)| (old, (thing, registered_at)))
            .collect();
        if leased.is_empty() {
            return Ok(HashSet::new());
        }
        let chosen: Vec<Completion<'_>> = items
            .iter()
            .filter_map(|item| {
                let (thing_name, old_registered_at) = leased.get(&item.old_serial)?;
                Some(Completion {
                    item,
                    thing_name: thing_name.clone(),
                    registered_at: old_registered_at.map(|_| item.at),
                })
            })
            .collect();
        insert_rows(
            conn,
            "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, renew_at, der, replaces, registered_at) VALUES ",
            "(?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            14,
            "",
            &chosen,
            |q, c| {
                let n = &c.item.new;
                q.bind(&n.serial)
                    .bind(&n.fingerprint_sha256)
                    .bind(&n.public_key_sha256)
                    .bind(&c.thing_name)
                    .bind(&n.issuer)
                    .bind(n.origin.as_str())
                    .bind(&n.key_algorithm)
                    .bind(n.not_before)
                    .bind(n.not_after)
                    .bind(c.item.at)
                    .bind(n.renew_at)
                    .bind(&n.der)
                    .bind(&c.item.old_serial)
                    .bind(c.registered_at)
            },
        )
        .await
        .map_err(|e| WriteError::new("recording replacements", e))?;
        let copies: Vec<(&str, &str, i64)> = chosen
            .iter()
            .map(|c| {
                (
                    c.item.old_serial.as_str(),
                    c.item.new.serial.as_str(),
                    c.item.at,
                )
            })
            .collect();
        sqlx::query(SQL_COPY_ATTACHMENTS)
            .bind(to_json(&copies))
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("copying policy attachments", e))?;
        // (After the certificates: `new_serial` refers to them.)
        insert_rows(
            conn,
            SQL_ISSUE_HEAD,
            "(?, ?, ?, ?)",
            4,
            SQL_ISSUE_TAIL,
            &chosen,
            |q, c| {
                q.bind(&c.item.old_serial)
                    .bind(&c.item.new.serial)
                    .bind(&c.item.sealed_key)
                    .bind(c.item.at)
            },
        )
        .await
        .map_err(|e| WriteError::new("updating rotations", e))?;
        sqlx::query(SQL_ROTATION_ISSUED_EVENTS)
            .bind(json(chosen.iter().map(|c| &c.item.new.serial)))
            .bind(EVENT_CERT_ISSUED)
            .bind(common::EVENT_ROTATION_ISSUED)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        Ok(leased.into_keys().collect())
    }

    /// The body of [`Registry::replace_certificate`], inside the caller's transaction.
    /// `Ok(Err(refused))`: roll back.
    async fn replace_in(
        conn: &mut SqliteConnection,
        rep: &Replacement,
    ) -> Result<Result<ReplaceOutcome, ReplaceOutcome>, WriteError> {
        let auth = rep.authenticated_serial.as_str();
        let row: Option<(String, String, Option<i64>, String)> = sqlx::query_as(SQL_REPLACE_AUTH)
            .bind(auth)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading the certificate", e))?;
        let state = row
            .as_ref()
            .map(|(thing_name, status, registered_at, _)| CertState {
                thing_name: thing_name.clone(),
                status: status.clone(),
                registered_at: *registered_at,
            });
        if let Err(refused) = common::check_replacement(rep, state.as_ref()) {
            return Ok(Err(refused));
        }
        let Some((_, status, registered_at, origin)) = row else {
            unreachable!("check_replacement refuses an unknown certificate")
        };
        let holder: Option<String> = sqlx::query_scalar(SQL_KEY_HOLDER)
            .bind(&rep.thing_name)
            .bind(&rep.new.public_key_sha256)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("looking up the public key", e))?;
        if let Some(holder) = holder {
            return Ok(Err(common::key_reused(rep, &holder)));
        }
        if rep.sealed_key.is_some() {
            let pending: Option<String> = sqlx::query_scalar(SQL_PENDING_REPLACEMENT)
                .bind(auth)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| WriteError::new("looking for a pending replacement", e))?;
            if let Some(pending) = pending {
                return Ok(Err(common::replacement_pending(rep, &pending)));
            }
        }
        if let Some(max) = rep.max_replacements {
            let count: i64 = sqlx::query_scalar(SQL_REPLACEMENT_COUNT)
                .bind(auth)
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| WriteError::new("counting replacements", e))?;
            if count >= i64::from(max) {
                return Ok(Err(common::replacement_limit(rep, count)));
            }
        }

        let new = &rep.new;
        sqlx::query(
            "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, renew_at, der, replaces, registered_at, delivered_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?10)",
        )
        .bind(&new.serial)
        .bind(&new.fingerprint_sha256)
        .bind(&new.public_key_sha256)
        .bind(&rep.thing_name)
        .bind(&new.issuer)
        .bind(new.origin.as_str())
        .bind(&new.key_algorithm)
        .bind(new.not_before)
        .bind(new.not_after)
        .bind(rep.at)
        .bind(new.renew_at)
        .bind(&new.der)
        .bind(auth)
        .bind(registered_at.map(|_| rep.at))
        .execute(&mut *conn)
        .await
        .map_err(|e| WriteError::new("recording the replacement", e))?;
        sqlx::query(SQL_COPY_ATTACHMENTS)
            .bind(to_json(&[(auth, new.serial.as_str(), rep.at)]))
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("copying policy attachments", e))?;

        let event = |kind: &'static str, serial: &str, detail: String| NewEvent {
            at: rep.at,
            kind,
            thing_name: Some(rep.thing_name.clone()),
            serial: Some(serial.to_owned()),
            detail,
        };
        let mut events = vec![event(
            EVENT_CERT_ISSUED,
            &new.serial,
            common::replacement_issued_detail(new, auth),
        )];
        if status == CertStatus::Active.as_str() {
            sqlx::query(SQL_SUPERSEDE_ONE)
                .bind(auth)
                .execute(&mut *conn)
                .await
                .map_err(|e| WriteError::new("superseding the certificate", e))?;
            events.push(event(
                EVENT_CERT_SUPERSEDED,
                auth,
                common::superseded_detail(&new.serial),
            ));
        }
        let mut revoked: Vec<String> = sqlx::query_scalar(SQL_REVOKE_UNUSED)
            .bind(auth)
            .bind(&new.serial)
            .bind(rep.at)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| WriteError::new("revoking unused replacements", e))?;
        revoked.sort();
        for serial in &revoked {
            events.push(event(
                EVENT_CERT_REVOKED,
                serial,
                common::revoked_by_rotation_detail(&new.serial),
            ));
        }
        if !revoked.is_empty() {
            let mut cancelled: Vec<(String, String)> = sqlx::query_as(SQL_CANCEL_ROTATIONS)
                .bind(to_json(&revoked))
                .bind(rep.at)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| WriteError::new("cancelling rotations", e))?;
            cancelled.sort();
            for (old, _) in &cancelled {
                events.push(event(
                    common::EVENT_ROTATION_CANCELLED,
                    old,
                    common::rotation_cancelled_detail("superseded"),
                ));
            }
        }
        sqlx::query(SQL_ROTATION_DELIVERED)
            .bind(auth)
            .bind(&rep.thing_name)
            .bind(&origin)
            .bind(&new.serial)
            .bind(rep.at)
            .bind(rep.sealed_key.as_deref())
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("recording the rotation", e))?;
        events.push(event(
            common::EVENT_ROTATION_DELIVERED,
            auth,
            common::rotation_detail(&new.serial),
        ));
        insert_events(conn, &events)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        Ok(Ok(ReplaceOutcome::Replaced { revoked }))
    }

    /// One certificate, read inside the caller's transaction.
    async fn certificate_in(
        conn: &mut SqliteConnection,
        serial: &str,
    ) -> Result<CertificateRecord, WriteError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            cert_columns!(),
            " FROM certificates WHERE serial = ?1"
        ))
        .bind(serial)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| WriteError::new("reading the replacement", e))?;
        common::cert_from_row(&row).map_err(|e| WriteError::new("reading the replacement", e))
    }

    /// The body of [`Registry::take_replacement`], inside the caller's transaction.
    async fn take_in(
        conn: &mut SqliteConnection,
        old_serial: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, WriteError> {
        let row: Option<(String, Option<Vec<u8>>, String, String)> = sqlx::query_as(SQL_TAKEABLE)
            .bind(old_serial)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading the rotation", e))?;
        let Some((new_serial, sealed_key, thing_name, state)) = row else {
            return Ok(None);
        };
        if state == "delivered" {
            // Handed out before and not used yet: the same again, nothing written.
            let certificate = Self::certificate_in(conn, &new_serial).await?;
            return Ok(Some(TakenReplacement {
                certificate,
                sealed_key: sealed_key.unwrap_or_default(),
                again: true,
            }));
        }
        sqlx::query(SQL_ROTATION_TAKEN)
            .bind(old_serial)
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("updating the rotation", e))?;
        let delivered = sqlx::query(SQL_DELIVER_ONE)
            .bind(&new_serial)
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("marking the replacement delivered", e))?
            .rows_affected();
        let superseded = sqlx::query(SQL_SUPERSEDE_ONE)
            .bind(old_serial)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("superseding the certificate", e))?
            .rows_affected();
        let event = |kind: &'static str, serial: &str, detail: String| NewEvent {
            at,
            kind,
            thing_name: Some(thing_name.clone()),
            serial: Some(serial.to_owned()),
            detail,
        };
        let mut events = Vec::with_capacity(3);
        if delivered > 0 {
            events.push(event(EVENT_CERT_DELIVERED, &new_serial, "{}".to_owned()));
        }
        if superseded > 0 {
            events.push(event(
                EVENT_CERT_SUPERSEDED,
                old_serial,
                common::superseded_detail(&new_serial),
            ));
        }
        events.push(event(
            common::EVENT_ROTATION_DELIVERED,
            old_serial,
            common::rotation_detail(&new_serial),
        ));
        insert_events(conn, &events)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        let certificate = Self::certificate_in(conn, &new_serial).await?;
        Ok(Some(TakenReplacement {
            certificate,
            sealed_key: sealed_key.unwrap_or_default(),
            again: false,
        }))
    }

    /// The body of [`Registry::confirm_replacement`], inside the caller's transaction.
    async fn confirm_in(
        conn: &mut SqliteConnection,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, WriteError> {
        let row: Option<(String, String)> = sqlx::query_as(SQL_CONFIRMABLE)
            .bind(serial)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("reading the replacement", e))?;
        let Some((old, thing_name)) = row else {
            return Ok(None);
        };
        sqlx::query(SQL_REVOKE_SUPERSEDED)
            .bind(&old)
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(|e| WriteError::new("revoking the replaced certificate", e))?;
        let mut events = vec![NewEvent {
            at,
            kind: EVENT_CERT_REVOKED,
            thing_name: Some(thing_name),
            serial: Some(old.clone()),
            detail: common::revoked_by_rotation_detail(serial),
        }];
        let rotation: Option<String> = sqlx::query_scalar(SQL_ROTATION_CONFIRMED)
            .bind(&old)
            .bind(serial)
            .bind(at)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| WriteError::new("confirming the rotation", e))?;
        if let Some(thing_name) = rotation {
            events.push(NewEvent {
                at,
                kind: common::EVENT_ROTATION_CONFIRMED,
                thing_name: Some(thing_name),
                serial: Some(old.clone()),
                detail: common::rotation_detail(serial),
            });
        }
        insert_events(conn, &events)
            .await
            .map_err(|e| WriteError::new("appending events", e))?;
        Ok(Some(old))
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

    fn certs(&self, rows: &[SqliteRow]) -> Result<Vec<CertificateRecord>, RegistryError> {
        rows.iter()
            .map(common::cert_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading certificates", e))
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
        let row = sqlx::query(crate::queries::SQL_THING)
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

/// One item of [`Registry::complete_rotations`] that still holds its lease.
struct Completion<'a> {
    item: &'a PreparedReplacement,
    /// The old certificate's thing.
    thing_name: String,
    /// The new certificate's registration time (`item.at` if the old one was
    /// registered).
    registered_at: Option<i64>,
}

impl Dialect for SqliteRegistry {
    type Db = sqlx::Sqlite;
    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    const FOR_SHARE: &'static str = "";
    const FOR_KEY_SHARE: &'static str = "";
    const FOR_NO_KEY_UPDATE: &'static str = "";
    const SQL_DEVICE_STATE: &'static str =
        crate::connections::device_state_sql!("json_group_array(a.policy_name)");

    fn json_values(n: u8) -> String {
        format!("SELECT value FROM json_each(${n})")
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
                    let taken = self.taken(records.iter().map(|r| &r.certificate)).await?;
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
        Flows(self).get_thing(name).await
    }

    async fn list_things(&self, filter: &ThingFilter) -> Result<Vec<ThingRecord>, RegistryError> {
        Flows(self).list_things(filter).await
    }

    async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        Flows(self).get_certificate(serial).await
    }

    async fn list_certificates(
        &self,
        filter: &CertificateFilter,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        Flows(self).list_certificates(filter).await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>, RegistryError> {
        Flows(self).list_events(filter).await
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        Flows(self).ping().await
    }

    async fn probe_writes(&self) -> Result<(), RegistryError> {
        self.probes.run(Flows(self).probe_writes()).await
    }

    async fn counts(&self) -> Result<RegistryCounts, RegistryError> {
        Flows(self).counts().await
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

    async fn register_batch(
        &self,
        registrations: &[Registration],
    ) -> Result<Vec<RegistrationOutcome>, RegistryError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        let mut outcomes = Vec::with_capacity(registrations.len());
        for registration in registrations {
            let requested = match common::requested_policies(registration) {
                Ok(requested) => requested,
                Err(reason) => {
                    outcomes.push(RegistrationOutcome::Refused { reason });
                    continue;
                }
            };
            // A savepoint per registration: one that is refused (or loses to a change
            // of its thing earlier in the group) leaves no trace, the others stay.
            let mut one = sqlx::Acquire::begin(&mut tx)
                .await
                .map_err(|e| self.err("starting a savepoint", e))?;
            let result = match Self::register_in(&mut one, registration, &requested).await {
                Ok((outcome, true)) => one.commit().await.map(|()| outcome),
                Ok((outcome, false)) => one.rollback().await.map(|()| outcome),
                Err(WriteError { context, error }) => {
                    drop(one);
                    let _ = tx.rollback().await;
                    return Err(self.err(context, error));
                }
            };
            match result {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => {
                    let _ = tx.rollback().await;
                    return Err(self.err("ending a savepoint", e));
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| self.err("committing a group of registrations", e))?;
        Ok(outcomes)
    }

    fn registration_group_size(&self) -> usize {
        REGISTRATION_GROUP
    }

    async fn device_state(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<DeviceState>, RegistryError> {
        Flows(self).device_state(fingerprint_sha256).await
    }

    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        Flows(self).get_policy(name).await
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        Flows(self).list_policies().await
    }

    async fn policies_of_thing(
        &self,
        thing_name: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        Flows(self).policies_of_thing(thing_name).await
    }

    async fn record_connections(
        &self,
        connections: &[ConnectionRecord],
    ) -> Result<(), RegistryError> {
        Flows(self).record_connections(connections).await
    }

    async fn recent_connections(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Vec<ConnectionRecord>, RegistryError> {
        Flows(self).recent_connections(fingerprint_sha256).await
    }

    async fn revoked_serials(&self, now: i64) -> Result<Vec<String>, RegistryError> {
        Flows(self).revoked_serials(now).await
    }

    async fn due_certificates(
        &self,
        now: i64,
        expiring_before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(SQL_DUE_CERTIFICATES)
            .bind(now)
            .bind(expiring_before.unwrap_or(i64::MIN))
            .bind(common::limit_value(limit).unwrap_or(-1))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err("listing certificates due for rotation", e))?;
        self.certs(&rows)
    }

    async fn open_due_rotations(
        &self,
        now: i64,
        expiring_before: Option<i64>,
    ) -> Result<u64, RegistryError> {
        // Due by renewal point, then (if asked) by expiry; each in index order after a
        // cursor, so a call reads every candidate once however many chunks it takes.
        let mut phases = vec![(SQL_DUE_BY_RENEWAL, now)];
        if let Some(before) = expiring_before {
            phases.push((SQL_DUE_BY_EXPIRY, before));
        }
        let mut opened = 0;
        for (sql, bound) in phases {
            let mut cursor = (i64::MIN, i64::MIN);
            loop {
                let mut tx = self.begin().await?;
                let rows: Vec<(i64, i64, String)> = sqlx::query_as(sql)
                    .bind(bound)
                    .bind(cursor.0)
                    .bind(cursor.1)
                    .bind(OPEN_CHUNK as i64)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.err("reading certificates due for rotation", e))?;
                let Some(last) = rows.last() else {
                    tx.rollback()
                        .await
                        .map_err(|e| self.err("ending a transaction", e))?;
                    break;
                };
                cursor = (last.0, last.1);
                let serials = json(rows.iter().map(|r| &r.2));
                sqlx::query(SQL_OPEN_ROTATIONS)
                    .bind(&serials)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err("opening rotations", e))?;
                sqlx::query(SQL_ROTATION_DUE_EVENTS)
                    .bind(&serials)
                    .bind(now)
                    .bind(common::EVENT_ROTATION_DUE)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err("appending events", e))?;
                tx.commit()
                    .await
                    .map_err(|e| self.err("committing rotations", e))?;
                opened += rows.len() as u64;
                if rows.len() < OPEN_CHUNK {
                    break;
                }
            }
        }
        Ok(opened)
    }

    async fn claim_rotations(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
    ) -> Result<Vec<RotationClaim>, RegistryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let mut leased: Vec<(i64, String)> = sqlx::query_as(SQL_CLAIM)
            .bind(owner)
            .bind(now.saturating_add(lease_secs))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err("leasing rotations", e))?;
        if leased.is_empty() {
            tx.rollback()
                .await
                .map_err(|e| self.err("ending a transaction", e))?;
            return Ok(Vec::new());
        }
        // Claim order: (due_at, old_serial).
        leased.sort_unstable();
        let serials = json(leased.iter().map(|(_, serial)| serial));
        let rows = sqlx::query(SQL_CLAIMED)
            .bind(&serials)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err("reading claimed certificates", e))?;
        let mut claims = rows
            .iter()
            .map(|row| -> sqlx::Result<RotationClaim> {
                use sqlx::Row;
                Ok(RotationClaim {
                    old: common::cert_from_row(row)?,
                    template: row.try_get(common::CERT_COLUMN_COUNT)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err("reading claimed certificates", e))?;
        // In claim order (sorting here rather than in SQL, where the rows are wide).
        let position: HashMap<&str, usize> = leased
            .iter()
            .enumerate()
            .map(|(i, (_, serial))| (serial.as_str(), i))
            .collect();
        claims.sort_unstable_by_key(|c| position.get(c.old.serial.as_str()).copied());
        tx.commit()
            .await
            .map_err(|e| self.err("committing leases", e))?;
        Ok(claims)
    }

    async fn complete_rotations(
        &self,
        owner: &str,
        items: &[PreparedReplacement],
    ) -> Result<Vec<bool>, RegistryError> {
        common::validate_new(items.iter().map(|i| &i.new))?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // An old serial given twice completes once (its first item).
        let mut seen = HashSet::with_capacity(items.len());
        let firsts: Vec<&PreparedReplacement> = items
            .iter()
            .filter(|i| seen.insert(i.old_serial.as_str()))
            .collect();
        let mut tx = self.begin().await?;
        let mut completed = match Self::complete_in(&mut tx, owner, &firsts).await {
            Ok(completed) => completed,
            Err(WriteError { context, error }) => {
                let _ = tx.rollback().await;
                if common::is_unique_violation(&error) {
                    let certs = || firsts.iter().map(|i| &i.new);
                    let taken = self.taken(certs()).await?;
                    return Err(common::duplicate_among(certs(), &taken, &error.to_string()));
                }
                return Err(self.err(context, error));
            }
        };
        if completed.is_empty() {
            tx.rollback()
                .await
                .map_err(|e| self.err("ending a transaction", e))?;
        } else {
            tx.commit()
                .await
                .map_err(|e| self.err("committing replacements", e))?;
        }
        // `remove`: a repeated old serial is `false` after its first item.
        Ok(items
            .iter()
            .map(|i| completed.remove(&i.old_serial))
            .collect())
    }

    async fn fail_rotation(
        &self,
        owner: &str,
        old_serial: &str,
        error: &str,
        at: i64,
        max_attempts: u32,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.begin().await?;
        let row: Option<(String, i64, String)> = sqlx::query_as(SQL_FAIL_ROTATION)
            .bind(old_serial)
            .bind(owner)
            .bind(error)
            .bind(at)
            .bind(i64::from(max_attempts))
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.err("recording a failed rotation", e))?;
        let Some((thing_name, attempts, state)) = row else {
            tx.rollback()
                .await
                .map_err(|e| self.err("ending a transaction", e))?;
            return Ok(false);
        };
        let event = NewEvent {
            at,
            kind: common::EVENT_ROTATION_FAILED,
            thing_name: Some(thing_name),
            serial: Some(old_serial.to_owned()),
            detail: common::rotation_failed_detail(error, attempts, &state),
        };
        insert_events(&mut tx, std::slice::from_ref(&event))
            .await
            .map_err(|e| self.err("appending events", e))?;
        tx.commit()
            .await
            .map_err(|e| self.err("committing a failed rotation", e))?;
        Ok(true)
    }

    async fn replace_certificate(
        &self,
        replacement: &Replacement,
    ) -> Result<ReplaceOutcome, RegistryError> {
        let mut tx = self.begin().await?;
        match Self::replace_in(&mut tx, replacement).await {
            Ok(Ok(outcome)) => {
                tx.commit()
                    .await
                    .map_err(|e| self.err("committing a replacement", e))?;
                Ok(outcome)
            }
            Ok(Err(refused)) => {
                tx.rollback()
                    .await
                    .map_err(|e| self.err("ending a transaction", e))?;
                Ok(refused)
            }
            Err(WriteError { context, error }) => {
                let _ = tx.rollback().await;
                if common::is_unique_violation(&error) {
                    return Err(RegistryError::DuplicateSerial(
                        replacement.new.serial.clone(),
                    ));
                }
                Err(self.err(context, error))
            }
        }
    }

    async fn take_replacement(
        &self,
        old_serial: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, RegistryError> {
        let mut tx = self.begin().await?;
        let taken = Self::take_in(&mut tx, old_serial, at).await;
        self.finish_if_some(tx, taken, "committing a delivery")
            .await
    }

    async fn confirm_replacement(
        &self,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, RegistryError> {
        // Most calls have nothing to confirm: find out without taking the write lock.
        let pending: Option<(String, String)> = sqlx::query_as(SQL_CONFIRMABLE)
            .bind(serial)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err("reading a replacement", e))?;
        if pending.is_none() {
            return Ok(None);
        }
        let mut tx = self.begin().await?;
        let confirmed = Self::confirm_in(&mut tx, serial, at).await;
        self.finish_if_some(tx, confirmed, "committing a confirmation")
            .await
    }

    async fn get_rotation(
        &self,
        old_serial: &str,
    ) -> Result<Option<RotationRecord>, RegistryError> {
        Flows(self).get_rotation(old_serial).await
    }

    async fn list_rotations(
        &self,
        filter: &RotationFilter,
    ) -> Result<Vec<RotationRecord>, RegistryError> {
        Flows(self).list_rotations(filter).await
    }

    async fn rotation_backlog(&self, now: i64) -> Result<RotationBacklog, RegistryError> {
        let row = sqlx::query_as(common::SQLITE_ROTATION_BACKLOG)
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err("counting open rotations", e))?;
        Ok(common::rotation_backlog(row))
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<Vec<RevokedEntry>, RegistryError> {
        Flows(self).revoke(revocation).await
    }

    async fn revoked_entries(&self, now: i64) -> Result<Vec<RevokedEntry>, RegistryError> {
        Flows(self).revoked_entries(now).await
    }

    async fn latest_crl(&self) -> Result<Option<StoredCrl>, RegistryError> {
        Flows(self).latest_crl().await
    }

    async fn store_crl(&self, crl: &StoredCrl) -> Result<bool, RegistryError> {
        Flows(self).store_crl(crl).await
    }

    async fn policies_of_certificate(
        &self,
        serial: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        Flows(self).policies_of_certificate(serial).await
    }

    async fn mirror_settings(&self) -> Result<Option<crate::MirrorSettings>, RegistryError> {
        Flows(self).mirror_settings().await
    }

    async fn enable_mirror(
        &self,
        settings: &crate::MirrorSettings,
        at: i64,
    ) -> Result<u64, RegistryError> {
        Flows(self).enable_mirror(settings, at).await
    }

    async fn disable_mirror(&self, at: i64) -> Result<bool, RegistryError> {
        Flows(self).disable_mirror(at).await
    }

    async fn record_mirror_ca(
        &self,
        ca_certificate_id: &str,
        arn_prefix: &str,
        at: i64,
    ) -> Result<(), RegistryError> {
        Flows(self)
            .record_mirror_ca(ca_certificate_id, arn_prefix, at)
            .await
    }

    async fn record_mirrored_certificate(
        &self,
        certificate: &crate::MirroredCertificate,
    ) -> Result<(), RegistryError> {
        Flows(self).record_mirrored_certificate(certificate).await
    }

    async fn mirrored_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<crate::MirroredCertificate>, RegistryError> {
        Flows(self).mirrored_certificate(serial).await
    }

    async fn mirrored_certificates(
        &self,
    ) -> Result<Vec<crate::MirroredCertificate>, RegistryError> {
        Flows(self).mirrored_certificates().await
    }

    async fn queue_mirror_ops(
        &self,
        ops: &[crate::NewMirrorOp],
        at: i64,
    ) -> Result<u64, RegistryError> {
        Flows(self).queue_mirror_ops(ops, at).await
    }

    async fn claim_mirror_ops(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
        ignore_backoff: bool,
    ) -> Result<Vec<crate::MirrorOp>, RegistryError> {
        Flows(self)
            .claim_mirror_ops(owner, now, lease_secs, limit, ignore_backoff)
            .await
    }

    async fn finish_mirror_ops(
        &self,
        owner: &str,
        results: &[crate::MirrorResult],
        at: i64,
    ) -> Result<u64, RegistryError> {
        Flows(self).finish_mirror_ops(owner, results, at).await
    }

    async fn mirror_backlog(
        &self,
        parked_limit: u32,
    ) -> Result<crate::MirrorBacklog, RegistryError> {
        Flows(self).mirror_backlog(parked_limit).await
    }

    async fn requeue_parked_mirror_ops(&self, at: i64) -> Result<u64, RegistryError> {
        Flows(self).requeue_parked_mirror_ops(at).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queries::{
        SQL_POLICIES_OF_THING, SQL_POLICY, SQL_RECENT_CONNECTIONS, SQL_REVOKED_ENTRIES,
        SQL_ROTATION, SQL_THING, certificates_query, events_query, things_query,
    };
    use crate::revocations;
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
            SQL_SUPERSEDE.to_owned(),
            SQL_REVOKE.to_owned(),
            SQL_EXISTING_THINGS.to_owned(),
            SQL_ACTIVE_SERIALS.to_owned(),
            SQL_ACTIVE_CERTIFICATES.to_owned(),
            SQL_DELIVER.to_owned(),
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
        for (sql, ints) in [
            (SqliteRegistry::SQL_DEVICE_STATE, 0),
            (SQL_REGISTRATION_CERT, 0),
            (SQL_ATTACHED, 0),
            (SQL_THING, 0),
            (SQL_FIND_POLICIES, 0),
            (SQL_UPDATE_THING, 7),
            (SQL_ATTACH, 2),
            (SQL_MARK_REGISTERED, 1),
            (SQL_POLICY, 0),
            (SQL_POLICIES_OF_THING, 0),
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
                // Allowed scans: `json_each` (virtual) and the materialised prune cutoffs.
                let scanned = line.trim().strip_prefix("SCAN ");
                assert!(
                    scanned.is_none_or(|s| s.contains("VIRTUAL TABLE") || s == "cutoff"),
                    "{sql}\n{text}"
                );
            }
        }
        // Rotation, revocation and CRL statements: the same rule, and the claim and the
        // chunks of `open_due_rotations` come in index order (no sort).
        let completion_update =
            format!("{SQL_ISSUE_HEAD}(?, ?, ?, ?), (?, ?, ?, ?){SQL_ISSUE_TAIL}");
        let lock_thing = revocations::sql_lock_thing::<SqliteRegistry>();
        let cancel_rotations = revocations::sql_cancel_rotations::<SqliteRegistry>();
        for (sql, ints, sorted) in [
            (SQL_DUE_CERTIFICATES, 2, true),
            (SQL_DUE_BY_RENEWAL, 3, false),
            (SQL_DUE_BY_EXPIRY, 3, false),
            (SQL_OPEN_ROTATIONS, 1, true),
            (SQL_ROTATION_DUE_EVENTS, 2, true),
            (SQL_CLAIM, 3, false),
            (SQL_CLAIMED, 0, false),
            (SQL_COMPLETABLE, 1, true),
            (completion_update.as_str(), 7, true),
            (SQL_COPY_ATTACHMENTS, 0, true),
            (SQL_ROTATION_ISSUED_EVENTS, 2, true),
            (SQL_FAIL_ROTATION, 4, true),
            (SQL_REPLACE_AUTH, 0, true),
            (SQL_KEY_HOLDER, 1, true),
            (SQL_SUPERSEDE_ONE, 0, true),
            (SQL_REVOKE_UNUSED, 2, true),
            (SQL_ROTATION_DELIVERED, 4, true),
            (SQL_CANCEL_ROTATIONS, 1, true),
            (SQL_TAKEABLE, 0, true),
            (SQL_ROTATION_TAKEN, 1, true),
            (SQL_DELIVER_ONE, 1, true),
            (SQL_CONFIRMABLE, 0, true),
            (SQL_REVOKE_SUPERSEDED, 1, true),
            (SQL_ROTATION_CONFIRMED, 2, true),
            (SQL_ROTATION, 0, true),
            (revocations::SQL_THING_OF_CERTIFICATE, 0, true),
            (lock_thing.as_str(), 0, true),
            (revocations::SQL_REVOKE_SERIAL, 2, true),
            (revocations::SQL_REVOKE_THING, 2, true),
            (cancel_rotations.as_str(), 1, true),
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
