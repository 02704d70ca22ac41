//! Revocation and the CRLs, written once for both backends.
//!
//! A revocation runs in one write transaction ([`write_tx!`]; retried on PostgreSQL
//! when it loses a deadlock or serialisation race). Rotation and revocation take row
//! locks in one order: the thing, then the old (replaced) certificate, then its
//! replacements, then the rotation row. Writers that insert certificates for a thing
//! (group commits, completed rotations, replacements) hold at least `FOR KEY SHARE` on
//! the thing, and revocation takes `FOR UPDATE` on it ([`Dialect::FOR_UPDATE`]), so a
//! revocation sees every replacement committed before it and no replacement slips in
//! behind it; then one `UPDATE` revokes the certificate and its undelivered
//! replacements (re-checking each row under its lock), and the open rotations of what
//! it revoked are cancelled. SQLite takes no row locks: its writers hold the whole
//! database (`BEGIN IMMEDIATE`).
//!
//! CRL stores serialise on an advisory lock ([`CRLS_LOCK`]).

use crate::common::{EVENT_CERT_REVOKED, EVENT_ROTATION_CANCELLED, NewEvent, to_json};
use crate::dialect::{Dialect, Flows, RowsAffected, step, write_tx};
use crate::{
    CRLS_KEPT, RegistryError, Revocation, RevocationTarget, RevokedEntry, StoredCrl, common,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Type};
use std::collections::HashSet;

/// The advisory lock that serialises CRL stores, so "newer than every stored one" is
/// checked and written as one step (PostgreSQL; SQLite has one writer at a time).
const CRLS_LOCK: i64 = 0x666c_6565_7463_726c;

/// The thing of certificate `$1`.
pub(crate) const SQL_THING_OF_CERTIFICATE: &str =
    "SELECT thing_name FROM certificates WHERE serial = $1";

/// The thing `$1`, locked for the rest of the transaction (PostgreSQL `FOR UPDATE`).
pub(crate) fn sql_lock_thing<R: Dialect>() -> String {
    format!("SELECT name FROM things WHERE name = $1{}", R::FOR_UPDATE)
}

/// The columns of a [`RevokedEntry`] (see [`common::revoked_entry_from_row`]) returned
/// by a revoking `UPDATE`.
macro_rules! revoked_returning {
    () => {
        " RETURNING serial, thing_name, revoked_at, revocation_reason, not_after"
    };
}

/// Revokes certificate `$1` and its replacements never delivered, unless revoked
/// already, at `$2` for reason `$3` (SQLite: a multi-index OR of the primary key and
/// `certificates_replaces`).
pub(crate) const SQL_REVOKE_SERIAL: &str = concat!(
    "UPDATE certificates SET status = 'revoked', revoked_at = $2, revocation_reason = $3 \
     WHERE (serial = $1 OR (replaces = $1 AND delivered_at IS NULL)) \
       AND status <> 'revoked'",
    revoked_returning!()
);

/// Revokes every certificate of thing `$1` not revoked yet, at `$2` for reason `$3`.
pub(crate) const SQL_REVOKE_THING: &str = concat!(
    "UPDATE certificates SET status = 'revoked', revoked_at = $2, revocation_reason = $3 \
     WHERE thing_name = $1 AND status <> 'revoked'",
    revoked_returning!()
);

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> &'q str: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    (String,): for<'r> sqlx::FromRow<'r, <R::Db as Database>::Row>,
{
    /// Revokes `rev.target` (see [`crate::Revocations::revoke`]); the entries revoked, by
    /// serial.
    pub(crate) async fn revoke(
        &self,
        rev: &Revocation,
    ) -> Result<Vec<RevokedEntry>, RegistryError> {
        let outcome = write_tx!(self, "a revocation", |tx| {
            let (thing, target) = match &rev.target {
                RevocationTarget::Serial(serial) => {
                    let thing: Option<String> = sqlx::query_scalar(SQL_THING_OF_CERTIFICATE)
                        .bind(serial.as_str())
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(step("reading the certificate"))?;
                    match thing {
                        Some(thing) => (thing, Some(serial.as_str())),
                        None => {
                            return Ok(Err(RegistryError::NotFound(format!(
                                "certificate {serial}"
                            ))));
                        }
                    }
                }
                RevocationTarget::Thing(name) => (name.clone(), None),
            };
            let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql_lock_thing::<R>()))
                .bind(thing.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(step("locking the thing"))?;
            if found.is_none() {
                return Ok(Err(RegistryError::NotFound(format!("thing {thing}"))));
            }
            let rows = match target {
                Some(serial) => sqlx::query(SQL_REVOKE_SERIAL).bind(serial),
                None => sqlx::query(SQL_REVOKE_THING).bind(thing.as_str()),
            }
            .bind(rev.at)
            .bind(rev.reason.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(step("revoking certificates"))?;
            let mut revoked = rows
                .iter()
                .map(common::revoked_entry_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map_err(step("reading revocations"))?;
            if revoked.is_empty() {
                return Ok(Ok(revoked));
            }
            // Events: the certificate named first, then its replacements (or the thing's
            // certificates), by serial.
            revoked.sort_by(|a, b| {
                (Some(a.serial.as_str()) != target, &a.serial)
                    .cmp(&(Some(b.serial.as_str()) != target, &b.serial))
            });
            let serials: Vec<&str> = revoked.iter().map(|e| e.serial.as_str()).collect();
            let cancelled: HashSet<String> =
                sqlx::query_scalar(AssertSqlSafe(crate::rotations::sql_cancel_rotations::<R>()))
                    .bind(to_json(&serials))
                    .bind(rev.at)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(step("cancelling rotations"))?
                    .into_iter()
                    .collect();
            let event = |kind: &'static str, entry: &RevokedEntry, detail: String| NewEvent {
                at: rev.at,
                kind,
                thing_name: Some(entry.thing_name.clone()),
                serial: Some(entry.serial.clone()),
                detail,
            };
            let mut events = Vec::with_capacity(revoked.len() + cancelled.len());
            for entry in &revoked {
                // An undelivered replacement revoked together with the certificate it
                // replaces says so.
                let with = target.filter(|t| *t != entry.serial);
                events.push(event(
                    EVENT_CERT_REVOKED,
                    entry,
                    common::revoked_detail(&rev.reason, with),
                ));
            }
            for entry in revoked.iter().filter(|e| cancelled.contains(&e.serial)) {
                events.push(event(
                    EVENT_ROTATION_CANCELLED,
                    entry,
                    common::rotation_cancelled_detail(&rev.reason),
                ));
            }
            R::insert_events(&mut *tx, &events)
                .await
                .map_err(step("appending events"))?;
            revoked.sort_by(|a, b| a.serial.cmp(&b.serial));
            Ok(Ok(revoked))
        });
        match outcome {
            Ok(outcome) => outcome,
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    for<'q> String: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Type<R::Db>,
{
    /// Stores `crl` unless one with the same or a higher number is stored; keeps the
    /// newest [`CRLS_KEPT`].
    pub(crate) async fn store_crl(&self, crl: &StoredCrl) -> Result<bool, RegistryError> {
        let stored = write_tx!(self, "a CRL store", |tx| {
            R::lock_for_transaction(&mut *tx, CRLS_LOCK)
                .await
                .map_err(step("locking CRLs"))?;
            let stored = sqlx::query(
                "INSERT INTO crls (number, this_update, next_update, entries_digest, \
                        entry_count, der, created_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $2 \
                     WHERE NOT EXISTS (SELECT 1 FROM crls WHERE number >= $1)",
            )
            .bind(crl.number)
            .bind(crl.this_update)
            .bind(crl.next_update)
            .bind(crl.entries_digest.clone())
            .bind(crl.entry_count)
            .bind(crl.der.clone())
            .execute(&mut *tx)
            .await
            .map_err(step("storing a CRL"))?
            .rows()
                > 0;
            if stored {
                sqlx::query(
                    "DELETE FROM crls WHERE number NOT IN ( \
                            SELECT number FROM crls ORDER BY number DESC LIMIT $1)",
                )
                .bind(CRLS_KEPT)
                .execute(&mut *tx)
                .await
                .map_err(step("pruning CRLs"))?;
            }
            Ok(stored)
        });
        match stored {
            Ok(stored) => Ok(stored),
            // Another publisher stored the same number first.
            Err((_, e)) if common::is_unique_violation(&e) => Ok(false),
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }
}
