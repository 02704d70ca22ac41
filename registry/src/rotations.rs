//! Certificate rotation, written once for both backends: due certificates, opening
//! rotations, claiming them under a lease, completing them with pre-issued replacements,
//! failures, replacements delivered in the same exchange, handing out pre-issued ones,
//! confirmation on first use, and the backlog.
//!
//! Every flow that writes runs in one write transaction ([`write_tx!`]): on SQLite that
//! is `BEGIN IMMEDIATE`, so the writer holds the whole database and none of the row
//! locks below exist (the `Dialect::FOR_*` clauses are empty, and statements that only
//! lock are skipped); on PostgreSQL a transaction that loses a deadlock or serialisation
//! race runs again.
//!
//! On PostgreSQL, rotation and revocation take row locks in one order: the thing, then
//! the old (replaced) certificate, then its replacements, then the rotation row. Writers
//! that insert certificates for a thing (group commits, completed rotations,
//! replacements) hold at least `FOR KEY SHARE` on the thing, and revocation takes
//! `FOR UPDATE` on it, so a revocation sees every replacement committed before it and no
//! replacement slips in behind it. Workers claim rotations with `FOR UPDATE SKIP LOCKED`
//! and commit only while their lease holds. Rotations are opened in chunks, each a
//! keyset cursor step in index order (certificates a writer holds locked are skipped,
//! `FOR SHARE … SKIP LOCKED`: the next sweep gets them), inserted with
//! `ON CONFLICT DO NOTHING` (which waits for a concurrent sweep and then skips its rows)
//! in index order, so two sweeps never open a rotation twice nor dead-lock.
//!
//! Batches cost a fixed handful of statements whatever their size: keys travel as one
//! JSON list ([`Dialect::json_values`]), certificates and rotation updates as multi-row
//! `VALUES` lists in power-of-two chunks ([`insert_rows`]), attachments and events as
//! `INSERT … SELECT`. On SQLite, rotations are opened after an index-ordered cursor,
//! claimed with one `UPDATE … RETURNING` through the `rotations_claim` index, and
//! conditions that must not pick an index are written `CAST(column AS TEXT)` or
//! `+column` (an expression, so SQLite looks the rows up by key instead of walking
//! every active certificate or due rotation; PostgreSQL reads them as the column).

use crate::common::{
    self, CertState, EVENT_CERT_DELIVERED, EVENT_CERT_ISSUED, EVENT_CERT_REVOKED,
    EVENT_CERT_SUPERSEDED, EVENT_ROTATION_CANCELLED, EVENT_ROTATION_CONFIRMED,
    EVENT_ROTATION_DELIVERED, EVENT_ROTATION_DUE, EVENT_ROTATION_FAILED, EVENT_ROTATION_ISSUED,
    NewEvent, OPEN_CHUNK, cert_columns, to_json,
};
use crate::dialect::{Dialect, Flows, RowsAffected, StepError, insert_rows, step, write_tx};
use crate::{
    CertStatus, CertificateRecord, PreparedReplacement, RegistryError, ReplaceOutcome, Replacement,
    RotationBacklog, RotationClaim, TakenReplacement,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};
use std::collections::{HashMap, HashSet};

// ---- SQL ---------------------------------------------------------------------------------

/// `lock` (a `Dialect::FOR_*` clause) limited to the rows of `alias`, skipping rows
/// other transactions hold if `skip`; nothing where the dialect takes no row locks.
fn rows_of(lock: &str, alias: &str, skip: bool) -> String {
    if lock.is_empty() {
        String::new()
    } else {
        format!(
            "{lock} OF {alias}{}",
            if skip { " SKIP LOCKED" } else { "" }
        )
    }
}

/// The condition of a certificate due for rotation besides its renewal point or expiry:
/// active (the status is the index's first column), delivered, no rotation row yet.
macro_rules! due_tail {
    () => {
        " AND c.delivered_at IS NOT NULL \
          AND NOT EXISTS (SELECT 1 FROM rotations r WHERE r.old_serial = c.serial)"
    };
}

/// `due_certificates`: $1 now, $2 expiring_before (`i64::MIN`: none), $3 limit
/// (`i64::MAX`: none). Two branches, each through its own index (`+c.renew_at`: the
/// second branch goes through the expiry index).
pub(crate) const SQL_DUE_CERTIFICATES: &str = concat!(
    "SELECT * FROM (SELECT ",
    cert_columns!(c),
    " FROM certificates c WHERE c.status = 'active' AND c.renew_at <= $1",
    due_tail!(),
    " UNION ALL SELECT ",
    cert_columns!(c),
    " FROM certificates c WHERE c.status = 'active' AND c.not_after <= $2 \
        AND +c.renew_at > $1",
    due_tail!(),
    ") AS d ORDER BY renew_at, serial LIMIT $3"
);

/// Which index a chunk of `open_due_rotations` walks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DueBy {
    /// Past the renewal point (`certificates_status_renew_at`).
    Renewal,
    /// Expiring before a given time (`certificates_status_not_after`).
    Expiry,
}

impl DueBy {
    fn column(self) -> &'static str {
        match self {
            DueBy::Renewal => "renew_at",
            DueBy::Expiry => "not_after",
        }
    }
}

/// One chunk of `open_due_rotations`, in index order after the cursor ($2: key, $3: the
/// serial of the last certificate of the previous chunk, whose tie-breaker
/// ([`Dialect::CERT_TIEBREAK`]) continues the walk): due by `by` ($1: now or
/// expiring_before), at most $4. Returns (key, serial).
pub(crate) fn sql_due_chunk<R: Dialect>(by: DueBy) -> String {
    let (key, tie) = (by.column(), R::CERT_TIEBREAK);
    format!(
        "SELECT c.{key}, c.serial FROM certificates c \
         WHERE c.status = 'active' AND c.{key} <= $1 \
           AND (c.{key}, c.{tie}) > ($2, (SELECT x.{tie} FROM certificates x WHERE x.serial = $3)){} \
         ORDER BY c.{key}, c.{tie} LIMIT $4{}",
        due_tail!(),
        rows_of(R::FOR_SHARE, "c", true)
    )
}

/// Opens the rotations of the certificates of $1 (a JSON list of serials) at $2, in the
/// chunk's (index) order; a concurrent sweep's rows are left alone. Returns the serials
/// opened.
pub(crate) fn sql_open_rotations<R: Dialect>(by: DueBy) -> String {
    format!(
        "INSERT INTO rotations (old_serial, thing_name, origin, state, due_at, updated_at) \
         SELECT c.serial, c.thing_name, c.origin, 'due', $2, $2 \
         FROM ({}) AS j CROSS JOIN certificates c WHERE c.serial = j.value \
         ORDER BY c.{}, c.{} \
         ON CONFLICT (old_serial) DO NOTHING RETURNING old_serial",
        R::json_values(1),
        by.column(),
        R::CERT_TIEBREAK
    )
}

/// `rotation.due` events (kind $3, at $2) for the certificates of $1 (a JSON list of
/// serials), in the chunk's order.
pub(crate) fn sql_rotation_due_events<R: Dialect>(by: DueBy) -> String {
    format!(
        "INSERT INTO events (at, kind, thing_name, serial, detail) \
         SELECT $2, $3, c.thing_name, c.serial, {} \
         FROM ({}) AS j CROSS JOIN certificates c WHERE c.serial = j.value \
         ORDER BY c.{}, c.{}",
        R::json_object("'origin', c.origin, 'renew_at', c.renew_at, 'not_after', c.not_after"),
        R::json_values(1),
        by.column(),
        R::CERT_TIEBREAK
    )
}

/// Leases (owner $1, until $2) up to $4 claimable rotations (at $3 now), taken in claim
/// order, skipping rows other workers hold; returns (due_at, old_serial) (in no
/// particular order).
pub(crate) fn sql_claim<R: Dialect>() -> String {
    format!(
        "UPDATE rotations SET lease_owner = $1, lease_until = $2 \
         WHERE old_serial IN (SELECT old_serial FROM rotations \
            WHERE state = 'due' AND origin = 'generated' \
              AND (lease_until IS NULL OR lease_until < $3) \
            ORDER BY due_at, old_serial LIMIT $4{}) \
         RETURNING due_at, old_serial",
        R::SKIP_LOCKED
    )
}

/// The certificates of $1 (a JSON list of serials) with their thing's template (in no
/// particular order).
pub(crate) fn sql_claimed<R: Dialect>() -> String {
    format!(
        concat!(
            "SELECT ",
            cert_columns!(c),
            ", t.template FROM ({}) AS j CROSS JOIN certificates c CROSS JOIN things t \
             WHERE c.serial = j.value AND t.name = c.thing_name"
        ),
        R::json_values(1)
    )
}

/// Locks the things of the rotations of $1 (a JSON list of old serials), in name order.
fn sql_lock_rotation_things<R: Dialect>() -> String {
    format!(
        "SELECT t.name FROM things t WHERE t.name IN ( \
            SELECT r.thing_name FROM rotations r WHERE r.old_serial IN ({})) \
         ORDER BY t.name{}",
        R::json_values(1),
        rows_of(R::FOR_KEY_SHARE, "t", false)
    )
}

/// Locks the certificates of $1 (a JSON list of serials) `FOR SHARE`, in serial order.
fn sql_share_certificates<R: Dialect>() -> String {
    format!(
        "SELECT serial FROM certificates WHERE serial IN ({}) ORDER BY serial{}",
        R::json_values(1),
        R::FOR_SHARE
    )
}

/// Of the rotations of $1 (a JSON list of old serials), those still `due` and leased by
/// $2, with the old certificate's thing and registration time; locked, in serial order.
pub(crate) fn sql_completable<R: Dialect>() -> String {
    format!(
        "SELECT r.old_serial, c.thing_name, c.registered_at \
         FROM ({}) AS j CROSS JOIN rotations r CROSS JOIN certificates c \
         WHERE r.old_serial = j.value AND c.serial = r.old_serial \
           AND CAST(r.state AS TEXT) = 'due' AND r.lease_owner = $2 \
         ORDER BY r.old_serial{}",
        R::json_values(1),
        rows_of(R::FOR_UPDATE, "r", false)
    )
}

/// Around a multi-row `VALUES` list of (old serial, new serial, sealed key, at): the
/// rotations become `issued`.
pub(crate) const SQL_ISSUE_HEAD: &str = "UPDATE rotations SET state = 'issued', \
        new_serial = v.column2, sealed_key = v.column3, lease_owner = NULL, \
        lease_until = NULL, updated_at = v.column4 FROM (";
pub(crate) const SQL_ISSUE_TAIL: &str = ") AS v WHERE rotations.old_serial = v.column1";

/// Copies the policy attachments of the certificates the replacements of $1 (a JSON list
/// of new serials) replace, attached when the replacement was made.
pub(crate) fn sql_copy_attachments<R: Dialect>() -> String {
    format!(
        "INSERT INTO policy_attachments (policy_name, serial, attached_at) \
         SELECT a.policy_name, n.serial, n.created_at \
         FROM ({}) AS j CROSS JOIN certificates n CROSS JOIN policy_attachments a \
         WHERE n.serial = j.value AND a.serial = n.replaces \
         ORDER BY n.serial, a.policy_name \
         ON CONFLICT (policy_name, serial) DO NOTHING",
        R::json_values(1)
    )
}

/// `certificate.issued` (kind $2) and `rotation.issued` (kind $3) for each replacement
/// of $1 (a JSON list of new serials), in that order per replacement; details as
/// `common::replacement_issued_detail` and `common::rotation_detail` write them.
pub(crate) fn sql_rotation_issued_events<R: Dialect>() -> String {
    format!(
        "INSERT INTO events (at, kind, thing_name, serial, detail) \
         SELECT n.created_at, CASE k.column1 WHEN 0 THEN $2 ELSE $3 END, n.thing_name, \
            CASE k.column1 WHEN 0 THEN n.serial ELSE n.replaces END, \
            CASE k.column1 WHEN 0 THEN {} ELSE {} END \
         FROM ({}) AS j CROSS JOIN certificates n CROSS JOIN (VALUES (0), (1)) AS k \
         WHERE n.serial = j.value \
         ORDER BY j.key, k.column1",
        R::json_object(
            "'fingerprint_sha256', n.fingerprint_sha256, 'issuer', n.issuer, \
             'key_algorithm', n.key_algorithm, 'not_after', n.not_after, \
             'not_before', n.not_before, 'origin', n.origin, 'replaces', n.replaces"
        ),
        R::json_object("'new_serial', n.serial"),
        R::json_entries(1)
    )
}

/// A failed attempt on rotation $1 leased by $2: error $3 at $4, `failed` once
/// `attempts` reaches $5. Returns (thing, attempts, state).
pub(crate) const SQL_FAIL_ROTATION: &str = "UPDATE rotations SET attempts = attempts + 1, \
        last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = $4, \
        state = CASE WHEN attempts + 1 >= CAST($5 AS BIGINT) THEN 'failed' ELSE state END \
     WHERE old_serial = $1 AND lease_owner = $2 AND state = 'due' \
     RETURNING thing_name, CAST(attempts AS BIGINT), state";

/// The thing $1, locked `FOR KEY SHARE` (no certificate of it may be revoked by thing
/// meanwhile).
fn sql_key_share_thing<R: Dialect>() -> String {
    format!(
        "SELECT name FROM things WHERE name = $1{}",
        R::FOR_KEY_SHARE
    )
}

/// Certificate $1, locked for an update of its status.
fn sql_lock_certificate<R: Dialect>() -> String {
    format!(
        "SELECT serial FROM certificates WHERE serial = $1{}",
        R::FOR_NO_KEY_UPDATE
    )
}

/// The authenticated certificate $1 of a replacement, locked.
pub(crate) fn sql_replace_auth<R: Dialect>() -> String {
    format!(
        "SELECT thing_name, status, registered_at, origin FROM certificates \
         WHERE serial = $1{}",
        R::FOR_NO_KEY_UPDATE
    )
}

/// A certificate of thing $1 with public key $2, in any status.
pub(crate) const SQL_KEY_HOLDER: &str = "SELECT serial FROM certificates \
     WHERE thing_name = $1 AND public_key_sha256 = $2 ORDER BY serial LIMIT 1";
/// The replacement of $1 waiting to be handed out (sealed key held, new certificate
/// active), if any.
pub(crate) const SQL_PENDING_REPLACEMENT: &str = "SELECT r.new_serial FROM rotations r \
     JOIN certificates n ON n.serial = r.new_serial \
     WHERE r.old_serial = $1 AND CAST(r.state AS TEXT) IN ('issued', 'delivered') \
       AND r.sealed_key IS NOT NULL AND CAST(n.status AS TEXT) = 'active'";
/// How many certificates replace $1.
pub(crate) const SQL_REPLACEMENT_COUNT: &str =
    "SELECT count(*) FROM certificates WHERE replaces = $1";
/// Records a replacement delivered at once: $1 serial … $14 registered_at (delivered
/// and created at $10).
pub(crate) const SQL_INSERT_REPLACEMENT: &str = "INSERT INTO certificates (serial, \
        fingerprint_sha256, public_key_sha256, thing_name, issuer, status, origin, \
        key_algorithm, not_before, not_after, created_at, renew_at, der, replaces, \
        registered_at, delivered_at) \
     VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10, $11, $12, $13, $14, $10)";
pub(crate) const SQL_SUPERSEDE_ONE: &str = "UPDATE certificates SET status = 'superseded' \
     WHERE serial = $1 AND CAST(status AS TEXT) = 'active'";
/// Active replacements of $1 other than $2 (never used): revoked at $3.
pub(crate) const SQL_REVOKE_UNUSED: &str = "UPDATE certificates SET status = 'revoked', \
        revoked_at = $3, revocation_reason = 'superseded' \
     WHERE replaces = $1 AND serial <> $2 AND CAST(status AS TEXT) = 'active' \
     RETURNING serial";

/// Open rotations of the certificates of $1 (a JSON list) become `cancelled` at $2,
/// their sealed keys deleted.
pub(crate) fn sql_cancel_rotations<R: Dialect>() -> String {
    format!(
        "UPDATE rotations SET state = 'cancelled', sealed_key = NULL, lease_owner = NULL, \
            lease_until = NULL, updated_at = $2 \
         WHERE old_serial IN ({}) AND CAST(state AS TEXT) IN ('due', 'issued', 'delivered') \
         RETURNING old_serial",
        R::json_values(1)
    )
}

/// The authenticated certificate's rotation: created or moved to `delivered`.
pub(crate) const SQL_ROTATION_DELIVERED: &str = "INSERT INTO rotations \
        (old_serial, thing_name, origin, state, due_at, new_serial, updated_at, sealed_key) \
     VALUES ($1, $2, $3, 'delivered', $5, $4, $5, $6) \
     ON CONFLICT (old_serial) DO UPDATE SET state = 'delivered', \
        new_serial = excluded.new_serial, sealed_key = excluded.sealed_key, \
        lease_owner = NULL, lease_until = NULL, updated_at = excluded.updated_at";

/// The replacement of $1 ready to hand out (sealed key held, certificate still
/// active): pre-issued (`issued`) or handed out before and not used yet (`delivered`).
pub(crate) const SQL_TAKEABLE: &str = "SELECT r.new_serial, r.sealed_key, r.thing_name, \
        r.state \
     FROM rotations r JOIN certificates n ON n.serial = r.new_serial \
     WHERE r.old_serial = $1 AND CAST(r.state AS TEXT) IN ('issued', 'delivered') \
       AND r.sealed_key IS NOT NULL AND CAST(n.status AS TEXT) = 'active'";

/// The sealed key of rotation $1 if it still waits, with replacement $2 active, to be
/// handed out; locked.
fn sql_lock_issued<R: Dialect>() -> String {
    format!(
        "SELECT r.sealed_key FROM rotations r JOIN certificates n ON n.serial = r.new_serial \
         WHERE r.old_serial = $1 AND r.state = 'issued' AND r.new_serial = $2 \
           AND r.sealed_key IS NOT NULL AND n.status = 'active'{}",
        rows_of(R::FOR_UPDATE, "r", false)
    )
}

/// The sealed key stays until the first use confirms the rotation.
pub(crate) const SQL_ROTATION_TAKEN: &str = "UPDATE rotations SET state = 'delivered', \
        lease_owner = NULL, lease_until = NULL, updated_at = $2 \
     WHERE old_serial = $1";
pub(crate) const SQL_DELIVER_ONE: &str = "UPDATE certificates SET delivered_at = $2 \
     WHERE serial = $1 AND delivered_at IS NULL";
const SQL_CERTIFICATE: &str = concat!(
    "SELECT ",
    cert_columns!(),
    " FROM certificates WHERE serial = $1"
);

/// The certificate $1 replaces, if neither is revoked: (old serial, thing).
pub(crate) const SQL_CONFIRMABLE: &str = "SELECT o.serial, o.thing_name \
     FROM certificates n JOIN certificates o ON o.serial = n.replaces \
     WHERE n.serial = $1 AND CAST(n.status AS TEXT) <> 'revoked' \
       AND CAST(o.status AS TEXT) <> 'revoked'";

/// [`SQL_CONFIRMABLE`], the replaced certificate locked: of concurrent confirmations one
/// locks it, and the others, re-checking the row once it is free, find it revoked.
fn sql_lock_confirmable<R: Dialect>() -> String {
    format!(
        "{SQL_CONFIRMABLE}{}",
        rows_of(R::FOR_NO_KEY_UPDATE, "o", false)
    )
}

pub(crate) const SQL_REVOKE_SUPERSEDED: &str = "UPDATE certificates SET status = 'revoked', \
        revoked_at = $2, revocation_reason = 'superseded' \
     WHERE serial = $1 AND CAST(status AS TEXT) <> 'revoked'";
pub(crate) const SQL_ROTATION_CONFIRMED: &str = "UPDATE rotations SET state = 'confirmed', \
        new_serial = $2, sealed_key = NULL, lease_owner = NULL, lease_until = NULL, \
        updated_at = $3 \
     WHERE old_serial = $1 AND CAST(state AS TEXT) NOT IN ('confirmed', 'cancelled') \
     RETURNING thing_name";

/// `rotation_backlog` ($1: now): claimable, leased, last lease end, awaiting devices.
const SQL_ROTATION_BACKLOG: &str = "SELECT \
        CAST(coalesce(sum(CASE WHEN origin = 'generated' \
            AND (lease_until IS NULL OR lease_until < $1) THEN 1 ELSE 0 END), 0) AS BIGINT), \
        CAST(coalesce(sum(CASE WHEN origin = 'generated' AND lease_until >= $1 \
            THEN 1 ELSE 0 END), 0) AS BIGINT), \
        max(CASE WHEN origin = 'generated' AND lease_until >= $1 THEN lease_until END), \
        CAST(coalesce(sum(CASE WHEN origin = 'csr' THEN 1 ELSE 0 END), 0) AS BIGINT) \
     FROM rotations WHERE state = 'due'";

/// One item of [`crate::Rotations::complete_rotations`] that still holds its lease.
struct Completion<'a> {
    item: &'a PreparedReplacement,
    /// The old certificate's thing.
    thing_name: String,
    /// The new certificate's registration time (`item.at` if the old one was
    /// registered).
    registered_at: Option<i64>,
}

/// A JSON list of `items`.
fn json<'a>(items: impl Iterator<Item = &'a str>) -> String {
    to_json(&items.collect::<Vec<_>>())
}

// ---- flows -------------------------------------------------------------------------------

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> &'q str: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> &'q [u8]: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<&'q [u8]>: Encode<'q, R::Db>,
    for<'q> Option<i64>: Encode<'q, R::Db>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Decode<'q, R::Db> + Type<R::Db>,
    (String, String): for<'r> sqlx::FromRow<'r, <R::Db as Database>::Row>,
{
    pub(crate) async fn due_certificates(
        &self,
        now: i64,
        expiring_before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let ctx = "listing certificates due for rotation";
        let rows = sqlx::query(SQL_DUE_CERTIFICATES)
            .bind(now)
            .bind(expiring_before.unwrap_or(i64::MIN))
            .bind(common::limit_value(limit).unwrap_or(i64::MAX))
            .fetch_all(self.0.pool())
            .await
            .map_err(|e| self.0.err(ctx, e))?;
        rows.iter()
            .map(common::cert_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.0.err(ctx, e))
    }

    pub(crate) async fn open_due_rotations(
        &self,
        now: i64,
        expiring_before: Option<i64>,
    ) -> Result<u64, RegistryError> {
        // Due by renewal point, then (if asked) by expiry; each in index order after a
        // cursor, so a call reads every candidate once however many chunks it takes.
        // Certificates skipped because a writer held them locked are behind the cursor:
        // the next sweep opens them.
        let mut phases = vec![(DueBy::Renewal, now)];
        if let Some(before) = expiring_before {
            phases.push((DueBy::Expiry, before));
        }
        let mut opened = 0;
        for (by, bound) in phases {
            let chunk_sql = sql_due_chunk::<R>(by);
            let open_sql = sql_open_rotations::<R>(by);
            let events_sql = sql_rotation_due_events::<R>(by);
            let mut cursor = (i64::MIN, String::new());
            loop {
                let chunk = write_tx!(self, "opening rotations", |tx| {
                    let rows: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(&*chunk_sql))
                        .bind(bound)
                        .bind(cursor.0)
                        .bind(cursor.1.as_str())
                        .bind(OPEN_CHUNK as i64)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(step("reading certificates due for rotation"))?;
                    let Some(last) = rows.last().cloned() else {
                        return Ok((0, 0, None));
                    };
                    let serials = json(rows.iter().map(|r| r.1.as_str()));
                    let inserted: Vec<String> = sqlx::query_scalar(AssertSqlSafe(&*open_sql))
                        .bind(serials.as_str())
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(step("opening rotations"))?;
                    if !inserted.is_empty() {
                        // Events for the rotations this chunk opened (all of them unless
                        // a concurrent sweep was first), in the chunk's order.
                        let logged = if inserted.len() == rows.len() {
                            serials
                        } else {
                            let inserted: HashSet<&str> =
                                inserted.iter().map(String::as_str).collect();
                            json(
                                rows.iter()
                                    .map(|r| r.1.as_str())
                                    .filter(|s| inserted.contains(s)),
                            )
                        };
                        sqlx::query(AssertSqlSafe(&*events_sql))
                            .bind(logged.as_str())
                            .bind(now)
                            .bind(EVENT_ROTATION_DUE)
                            .execute(&mut *tx)
                            .await
                            .map_err(step("appending events"))?;
                    }
                    Ok((rows.len(), inserted.len(), Some(last)))
                });
                let (selected, inserted, last) = chunk.map_err(|(ctx, e)| self.0.err(ctx, e))?;
                opened += inserted as u64;
                match last {
                    Some(last) if selected == OPEN_CHUNK => cursor = last,
                    // Fewer than a chunk: nothing more is due after the cursor.
                    _ => break,
                }
            }
        }
        Ok(opened)
    }

    pub(crate) async fn open_rotations_for(
        &self,
        serials: &[String],
        now: i64,
    ) -> Result<Vec<String>, RegistryError> {
        if serials.is_empty() {
            return Ok(Vec::new());
        }
        // The certificates a sweep could rotate (active, handed over); those with a
        // rotation row already are left as they are (ON CONFLICT).
        let eligible_sql = format!(
            "SELECT c.serial FROM ({}) AS j CROSS JOIN certificates c \
             WHERE c.serial = j.value AND c.status = 'active' AND c.delivered_at IS NOT NULL",
            R::json_values(1)
        );
        let open_sql = sql_open_rotations::<R>(DueBy::Expiry);
        let events_sql = sql_rotation_due_events::<R>(DueBy::Expiry);
        let asked = json(serials.iter().map(String::as_str));
        write_tx!(self, "opening rotations", |tx| {
            let eligible: Vec<String> = sqlx::query_scalar(AssertSqlSafe(&*eligible_sql))
                .bind(asked.as_str())
                .fetch_all(&mut *tx)
                .await
                .map_err(step("reading the certificates to rotate"))?;
            if eligible.is_empty() {
                return Ok(Vec::new());
            }
            let list = json(eligible.iter().map(String::as_str));
            let mut opened: Vec<String> = sqlx::query_scalar(AssertSqlSafe(&*open_sql))
                .bind(list.as_str())
                .bind(now)
                .fetch_all(&mut *tx)
                .await
                .map_err(step("opening rotations"))?;
            if !opened.is_empty() {
                let logged = json(opened.iter().map(String::as_str));
                sqlx::query(AssertSqlSafe(&*events_sql))
                    .bind(logged.as_str())
                    .bind(now)
                    .bind(EVENT_ROTATION_DUE)
                    .execute(&mut *tx)
                    .await
                    .map_err(step("appending events"))?;
            }
            opened.sort();
            Ok(opened)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn claim_rotations(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
    ) -> Result<Vec<RotationClaim>, RegistryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (claim_sql, claimed_sql) = (sql_claim::<R>(), sql_claimed::<R>());
        let claims = write_tx!(self, "claiming rotations", |tx| {
            let mut leased: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(&*claim_sql))
                .bind(owner)
                .bind(now.saturating_add(lease_secs))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(step("leasing rotations"))?;
            if leased.is_empty() {
                return Ok(Vec::new());
            }
            // Claim order: (due_at, old_serial).
            leased.sort_unstable();
            let rows = sqlx::query(AssertSqlSafe(&*claimed_sql))
                .bind(json(leased.iter().map(|(_, serial)| serial.as_str())))
                .fetch_all(&mut *tx)
                .await
                .map_err(step("reading claimed certificates"))?;
            let mut claims = rows
                .iter()
                .map(|row| -> sqlx::Result<RotationClaim> {
                    Ok(RotationClaim {
                        old: common::cert_from_row(row)?,
                        template: row.try_get(common::CERT_COLUMN_COUNT)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(step("reading claimed certificates"))?;
            // In claim order (sorting here rather than in SQL, where the rows are wide).
            let position: HashMap<&str, usize> = leased
                .iter()
                .enumerate()
                .map(|(i, (_, serial))| (serial.as_str(), i))
                .collect();
            claims.sort_unstable_by_key(|c| position.get(c.old.serial.as_str()).copied());
            Ok(claims)
        });
        claims.map_err(|(ctx, e)| self.0.err(ctx, e))
    }

    pub(crate) async fn complete_rotations(
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
        let completed = write_tx!(self, "completing rotations", |tx| {
            Self::complete_in(&mut tx, owner, &firsts).await
        });
        let mut completed = match completed {
            Ok(completed) => completed,
            Err((_, e)) if common::is_unique_violation(&e) => {
                let certs = || firsts.iter().map(|i| &i.new);
                let taken = self.taken(certs()).await?;
                return Err(common::duplicate_among(certs(), &taken, &e.to_string()));
            }
            Err((ctx, e)) => return Err(self.0.err(ctx, e)),
        };
        // `remove`: a repeated old serial is `false` after its first item.
        Ok(items
            .iter()
            .map(|i| completed.remove(&i.old_serial))
            .collect())
    }

    /// The writes of [`crate::Rotations::complete_rotations`] for `items` (distinct old
    /// serials), inside the caller's transaction: the old serials of the rotations
    /// completed (none: nothing written). Lock order: the things, the old certificates
    /// (`FOR SHARE`, so their registration and policies cannot change underneath), then
    /// the rotations.
    async fn complete_in(
        conn: &mut <R::Db as Database>::Connection,
        owner: &str,
        items: &[&PreparedReplacement],
    ) -> Result<HashSet<String>, StepError> {
        let olds = json(items.iter().map(|i| i.old_serial.as_str()));
        if !R::FOR_SHARE.is_empty() {
            sqlx::query(AssertSqlSafe(sql_lock_rotation_things::<R>()))
                .bind(olds.as_str())
                .execute(&mut *conn)
                .await
                .map_err(step("locking things"))?;
            sqlx::query(AssertSqlSafe(sql_share_certificates::<R>()))
                .bind(olds.as_str())
                .execute(&mut *conn)
                .await
                .map_err(step("locking certificates"))?;
        }
        let rows = sqlx::query(AssertSqlSafe(sql_completable::<R>()))
            .bind(olds.as_str())
            .bind(owner)
            .fetch_all(&mut *conn)
            .await
            .map_err(step("reading leased rotations"))?;
        let mut leased: HashMap<String, (String, Option<i64>)> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let decode =
                || -> sqlx::Result<_> { Ok((row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?))) };
            let (old, held) = decode().map_err(step("reading leased rotations"))?;
            leased.insert(old, held);
        }
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
            &mut *conn,
            "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, renew_at, der, replaces, registered_at)",
            14,
            "",
            &chosen,
            |row, c| {
                let n = &c.item.new;
                row.push_bind(n.serial.as_str())
                    .push_bind(n.fingerprint_sha256.as_str())
                    .push_bind(n.public_key_sha256.as_str())
                    .push_bind(c.thing_name.as_str())
                    .push_bind(n.issuer.as_str())
                    .push("'active'")
                    .push_bind(n.origin.as_str())
                    .push_bind(n.key_algorithm.as_str())
                    .push_bind(n.not_before)
                    .push_bind(n.not_after)
                    .push_bind(c.item.at)
                    .push_bind(n.renew_at)
                    .push_bind(n.der.as_slice())
                    .push_bind(c.item.old_serial.as_str())
                    .push_bind(c.registered_at);
            },
        )
        .await
        .map_err(step("recording replacements"))?;
        let new_serials = json(chosen.iter().map(|c| c.item.new.serial.as_str()));
        sqlx::query(AssertSqlSafe(sql_copy_attachments::<R>()))
            .bind(new_serials.as_str())
            .execute(&mut *conn)
            .await
            .map_err(step("copying policy attachments"))?;
        // (After the certificates: `new_serial` refers to them.)
        insert_rows(
            &mut *conn,
            SQL_ISSUE_HEAD,
            4,
            SQL_ISSUE_TAIL,
            &chosen,
            |row, c| {
                row.push_bind(c.item.old_serial.as_str())
                    .push_bind(c.item.new.serial.as_str())
                    .push_bind(c.item.sealed_key.as_slice())
                    .push_bind(c.item.at);
            },
        )
        .await
        .map_err(step("updating rotations"))?;
        sqlx::query(AssertSqlSafe(sql_rotation_issued_events::<R>()))
            .bind(new_serials.as_str())
            .bind(EVENT_CERT_ISSUED)
            .bind(EVENT_ROTATION_ISSUED)
            .execute(&mut *conn)
            .await
            .map_err(step("appending events"))?;
        Ok(leased.into_keys().collect())
    }

    pub(crate) async fn fail_rotation(
        &self,
        owner: &str,
        old_serial: &str,
        error: &str,
        at: i64,
        max_attempts: u32,
    ) -> Result<bool, RegistryError> {
        let failed = write_tx!(self, "recording a failed rotation", |tx| {
            let row = sqlx::query(SQL_FAIL_ROTATION)
                .bind(old_serial)
                .bind(owner)
                .bind(error)
                .bind(at)
                .bind(i64::from(max_attempts))
                .fetch_optional(&mut *tx)
                .await
                .map_err(step("recording a failed rotation"))?;
            let Some(row) = row else {
                return Ok(false);
            };
            let decode = || -> sqlx::Result<(String, i64, String)> {
                Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
            };
            let (thing_name, attempts, state) =
                decode().map_err(step("recording a failed rotation"))?;
            let event = NewEvent {
                at,
                kind: EVENT_ROTATION_FAILED,
                thing_name: Some(thing_name),
                serial: Some(old_serial.to_owned()),
                detail: common::rotation_failed_detail(error, attempts, &state),
            };
            R::insert_events(&mut tx, std::slice::from_ref(&event))
                .await
                .map_err(step("appending events"))?;
            Ok(true)
        });
        failed.map_err(|(ctx, e)| self.0.err(ctx, e))
    }

    pub(crate) async fn replace_certificate(
        &self,
        rep: &Replacement,
    ) -> Result<ReplaceOutcome, RegistryError> {
        let replaced = write_tx!(self, "a replacement", |tx| {
            Self::replace_in(&mut tx, rep).await
        });
        match replaced {
            Ok(outcome) => Ok(outcome),
            Err((_, e)) if common::is_unique_violation(&e) => {
                let certs = || std::iter::once(&rep.new);
                let taken = self.taken(certs()).await?;
                Err(common::duplicate_among(certs(), &taken, &e.to_string()))
            }
            Err((ctx, e)) => Err(self.0.err(ctx, e)),
        }
    }

    /// The body of [`crate::Rotations::replace_certificate`], inside the caller's
    /// transaction (a refusal writes nothing). Lock order: the thing, the authenticated
    /// certificate, its other replacements, their rotations and its own.
    async fn replace_in(
        conn: &mut <R::Db as Database>::Connection,
        rep: &Replacement,
    ) -> Result<ReplaceOutcome, StepError> {
        let auth = rep.authenticated_serial.as_str();
        let new = &rep.new;
        if !R::FOR_KEY_SHARE.is_empty() {
            sqlx::query(AssertSqlSafe(sql_key_share_thing::<R>()))
                .bind(rep.thing_name.as_str())
                .execute(&mut *conn)
                .await
                .map_err(step("locking the thing"))?;
        }
        let row = sqlx::query(AssertSqlSafe(sql_replace_auth::<R>()))
            .bind(auth)
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("reading the certificate"))?;
        let decode = |row: &<R::Db as Database>::Row| -> sqlx::Result<_> {
            let state = CertState {
                thing_name: row.try_get(0)?,
                status: row.try_get(1)?,
                registered_at: row.try_get(2)?,
            };
            let origin: String = row.try_get(3)?;
            Ok((state, origin))
        };
        let found = row
            .as_ref()
            .map(decode)
            .transpose()
            .map_err(step("reading the certificate"))?;
        if let Err(refused) = common::check_replacement(rep, found.as_ref().map(|(s, _)| s)) {
            return Ok(refused);
        }
        let Some((state, origin)) = found else {
            unreachable!("check_replacement refuses an unknown certificate")
        };
        let holder: Option<String> = sqlx::query_scalar(SQL_KEY_HOLDER)
            .bind(rep.thing_name.as_str())
            .bind(new.public_key_sha256.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("looking up the public key"))?;
        if let Some(holder) = holder {
            return Ok(common::key_reused(rep, &holder));
        }
        // Under the certificate's lock: concurrent replacements of it queue here.
        if rep.sealed_key.is_some() {
            let pending: Option<String> = sqlx::query_scalar(SQL_PENDING_REPLACEMENT)
                .bind(auth)
                .fetch_optional(&mut *conn)
                .await
                .map_err(step("looking for a pending replacement"))?;
            if let Some(pending) = pending {
                return Ok(common::replacement_pending(rep, &pending));
            }
        }
        if let Some(max) = rep.max_replacements {
            let count: i64 = sqlx::query_scalar(SQL_REPLACEMENT_COUNT)
                .bind(auth)
                .fetch_one(&mut *conn)
                .await
                .map_err(step("counting replacements"))?;
            if count >= i64::from(max) {
                return Ok(common::replacement_limit(rep, count));
            }
        }

        sqlx::query(SQL_INSERT_REPLACEMENT)
            .bind(new.serial.as_str())
            .bind(new.fingerprint_sha256.as_str())
            .bind(new.public_key_sha256.as_str())
            .bind(rep.thing_name.as_str())
            .bind(new.issuer.as_str())
            .bind(new.origin.as_str())
            .bind(new.key_algorithm.as_str())
            .bind(new.not_before)
            .bind(new.not_after)
            .bind(rep.at)
            .bind(new.renew_at)
            .bind(new.der.as_slice())
            .bind(auth)
            .bind(state.registered_at.map(|_| rep.at))
            .execute(&mut *conn)
            .await
            .map_err(step("recording the replacement"))?;
        sqlx::query(AssertSqlSafe(sql_copy_attachments::<R>()))
            .bind(json(std::iter::once(new.serial.as_str())))
            .execute(&mut *conn)
            .await
            .map_err(step("copying policy attachments"))?;

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
        if state.status == CertStatus::Active.as_str() {
            let superseded = sqlx::query(SQL_SUPERSEDE_ONE)
                .bind(auth)
                .execute(&mut *conn)
                .await
                .map_err(step("superseding the certificate"))?
                .rows();
            if superseded > 0 {
                events.push(event(
                    EVENT_CERT_SUPERSEDED,
                    auth,
                    common::superseded_detail(&new.serial),
                ));
            }
        }
        let mut revoked: Vec<String> = sqlx::query_scalar(SQL_REVOKE_UNUSED)
            .bind(auth)
            .bind(new.serial.as_str())
            .bind(rep.at)
            .fetch_all(&mut *conn)
            .await
            .map_err(step("revoking unused replacements"))?;
        revoked.sort();
        for serial in &revoked {
            events.push(event(
                EVENT_CERT_REVOKED,
                serial,
                common::revoked_by_rotation_detail(&new.serial),
            ));
        }
        if !revoked.is_empty() {
            let mut cancelled: Vec<String> =
                sqlx::query_scalar(AssertSqlSafe(sql_cancel_rotations::<R>()))
                    .bind(to_json(&revoked))
                    .bind(rep.at)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(step("cancelling rotations"))?;
            cancelled.sort();
            for old in &cancelled {
                events.push(event(
                    EVENT_ROTATION_CANCELLED,
                    old,
                    common::rotation_cancelled_detail("superseded"),
                ));
            }
        }
        sqlx::query(SQL_ROTATION_DELIVERED)
            .bind(auth)
            .bind(rep.thing_name.as_str())
            .bind(origin.as_str())
            .bind(new.serial.as_str())
            .bind(rep.at)
            .bind(rep.sealed_key.as_deref())
            .execute(&mut *conn)
            .await
            .map_err(step("recording the rotation"))?;
        events.push(event(
            EVENT_ROTATION_DELIVERED,
            auth,
            common::rotation_detail(&new.serial),
        ));
        R::insert_events(conn, &events)
            .await
            .map_err(step("appending events"))?;
        Ok(ReplaceOutcome::Replaced { revoked })
    }

    pub(crate) async fn take_replacement(
        &self,
        old_serial: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, RegistryError> {
        let taken = write_tx!(self, "a delivery", |tx| {
            Self::take_in(&mut tx, old_serial, at).await
        });
        taken.map_err(|(ctx, e)| self.0.err(ctx, e))
    }

    /// The replacement of `old` ready to hand out: (new serial, sealed key, thing, state).
    async fn takeable(
        conn: &mut <R::Db as Database>::Connection,
        old: &str,
    ) -> Result<Option<(String, Vec<u8>, String, String)>, StepError> {
        let row = sqlx::query(SQL_TAKEABLE)
            .bind(old)
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("reading the rotation"))?;
        row.map(|row| -> sqlx::Result<_> {
            let sealed_key: Option<Vec<u8>> = row.try_get(1)?;
            Ok((
                row.try_get(0)?,
                sealed_key.unwrap_or_default(),
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        })
        .transpose()
        .map_err(step("reading the rotation"))
    }

    /// One certificate, read inside the caller's transaction.
    async fn certificate_in(
        conn: &mut <R::Db as Database>::Connection,
        serial: &str,
    ) -> Result<CertificateRecord, StepError> {
        let row = sqlx::query(SQL_CERTIFICATE)
            .bind(serial)
            .fetch_one(&mut *conn)
            .await
            .map_err(step("reading the replacement"))?;
        common::cert_from_row(&row).map_err(step("reading the replacement"))
    }

    /// The body of [`crate::Rotations::take_replacement`], inside the caller's
    /// transaction. Lock order: the thing, the old certificate, the new one, the rotation
    /// (re-checked under its lock).
    async fn take_in(
        conn: &mut <R::Db as Database>::Connection,
        old: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, StepError> {
        let Some((new, mut sealed_key, thing_name, state)) = Self::takeable(conn, old).await?
        else {
            return Ok(None);
        };
        if state == "delivered" {
            // Handed out before and not used yet: the same again, nothing written.
            let certificate = Self::certificate_in(conn, &new).await?;
            return Ok(Some(TakenReplacement {
                certificate,
                sealed_key,
                again: true,
            }));
        }
        if !R::FOR_UPDATE.is_empty() {
            sqlx::query(AssertSqlSafe(sql_key_share_thing::<R>()))
                .bind(thing_name.as_str())
                .execute(&mut *conn)
                .await
                .map_err(step("locking the thing"))?;
            for serial in [old, new.as_str()] {
                sqlx::query(AssertSqlSafe(sql_lock_certificate::<R>()))
                    .bind(serial)
                    .execute(&mut *conn)
                    .await
                    .map_err(step("locking certificates"))?;
            }
            let locked: Option<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(sql_lock_issued::<R>()))
                .bind(old)
                .bind(new.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(step("locking the rotation"))?;
            match locked {
                Some(key) => sealed_key = key,
                // Handed out by a concurrent request meanwhile (the same again), or its
                // replacement revoked (nothing).
                None => {
                    return match Self::takeable(conn, old).await? {
                        Some((new, key, _, state)) if state == "delivered" => {
                            let certificate = Self::certificate_in(conn, &new).await?;
                            Ok(Some(TakenReplacement {
                                certificate,
                                sealed_key: key,
                                again: true,
                            }))
                        }
                        _ => Ok(None),
                    };
                }
            }
        }
        sqlx::query(SQL_ROTATION_TAKEN)
            .bind(old)
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(step("updating the rotation"))?;
        let delivered = sqlx::query(SQL_DELIVER_ONE)
            .bind(new.as_str())
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(step("marking the replacement delivered"))?
            .rows();
        let superseded = sqlx::query(SQL_SUPERSEDE_ONE)
            .bind(old)
            .execute(&mut *conn)
            .await
            .map_err(step("superseding the certificate"))?
            .rows();
        let event = |kind: &'static str, serial: &str, detail: String| NewEvent {
            at,
            kind,
            thing_name: Some(thing_name.clone()),
            serial: Some(serial.to_owned()),
            detail,
        };
        let mut events = Vec::with_capacity(3);
        if delivered > 0 {
            events.push(event(EVENT_CERT_DELIVERED, &new, "{}".to_owned()));
        }
        if superseded > 0 {
            events.push(event(
                EVENT_CERT_SUPERSEDED,
                old,
                common::superseded_detail(&new),
            ));
        }
        events.push(event(
            EVENT_ROTATION_DELIVERED,
            old,
            common::rotation_detail(&new),
        ));
        R::insert_events(conn, &events)
            .await
            .map_err(step("appending events"))?;
        let certificate = Self::certificate_in(conn, &new).await?;
        Ok(Some(TakenReplacement {
            certificate,
            sealed_key,
            again: false,
        }))
    }

    pub(crate) async fn confirm_replacement(
        &self,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, RegistryError> {
        // Most calls have nothing to confirm: find out without a write transaction.
        let pending: Option<(String, String)> = sqlx::query_as(SQL_CONFIRMABLE)
            .bind(serial)
            .fetch_optional(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading a replacement", e))?;
        if pending.is_none() {
            return Ok(None);
        }
        let confirmed = write_tx!(self, "a confirmation", |tx| {
            Self::confirm_in(&mut tx, serial, at).await
        });
        confirmed.map_err(|(ctx, e)| self.0.err(ctx, e))
    }

    /// The body of [`crate::Rotations::confirm_replacement`], inside the caller's
    /// transaction.
    async fn confirm_in(
        conn: &mut <R::Db as Database>::Connection,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, StepError> {
        let row: Option<(String, String)> =
            sqlx::query_as(AssertSqlSafe(sql_lock_confirmable::<R>()))
                .bind(serial)
                .fetch_optional(&mut *conn)
                .await
                .map_err(step("reading the replacement"))?;
        let Some((old, thing_name)) = row else {
            return Ok(None);
        };
        sqlx::query(SQL_REVOKE_SUPERSEDED)
            .bind(old.as_str())
            .bind(at)
            .execute(&mut *conn)
            .await
            .map_err(step("revoking the replaced certificate"))?;
        let mut events = vec![NewEvent {
            at,
            kind: EVENT_CERT_REVOKED,
            thing_name: Some(thing_name),
            serial: Some(old.clone()),
            detail: common::revoked_by_rotation_detail(serial),
        }];
        let rotation: Option<String> = sqlx::query_scalar(SQL_ROTATION_CONFIRMED)
            .bind(old.as_str())
            .bind(serial)
            .bind(at)
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("confirming the rotation"))?;
        if let Some(thing_name) = rotation {
            events.push(NewEvent {
                at,
                kind: EVENT_ROTATION_CONFIRMED,
                thing_name: Some(thing_name),
                serial: Some(old.clone()),
                detail: common::rotation_detail(serial),
            });
        }
        R::insert_events(conn, &events)
            .await
            .map_err(step("appending events"))?;
        Ok(Some(old))
    }

    pub(crate) async fn rotation_backlog(
        &self,
        now: i64,
    ) -> Result<RotationBacklog, RegistryError> {
        let row = sqlx::query(SQL_ROTATION_BACKLOG)
            .bind(now)
            .fetch_one(self.0.pool())
            .await
            .map_err(|e| self.0.err("counting open rotations", e))?;
        let decode = || -> sqlx::Result<(i64, i64, Option<i64>, i64)> {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        };
        let (claimable, leased, leased_until, awaiting_devices) =
            decode().map_err(|e| self.0.err("counting open rotations", e))?;
        Ok(RotationBacklog {
            claimable: claimable.max(0) as u64,
            leased: leased.max(0) as u64,
            leased_until,
            awaiting_devices: awaiting_devices.max(0) as u64,
        })
    }
}
