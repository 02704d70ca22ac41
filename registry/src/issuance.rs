//! Issuance, written once for both backends: the group commit of factory provisioning
//! ([`crate::Issuance::record_issued`]), deliveries and the active certificates of things.
//!
//! A group commit is one write transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: read
//! committed) of a fixed handful of statements whatever the slice size: lookups and
//! updates take their keys as one JSON list, certificates and events go in as multi-row
//! `VALUES` lists in power-of-two chunks (so few distinct statements get prepared and
//! cached per connection). What is written is worked out in memory by [`common::plan`]
//! from what the transaction read.
//!
//! Concurrency safety of the read-check-write: the slice's things are inserted
//! (`ON CONFLICT DO NOTHING`, which on PostgreSQL waits for a concurrent inserter of the
//! same name) and then locked (`SELECT … FOR UPDATE`, in name order) before their active
//! certificates are read, so two runs on the same thing serialise and the second sees the
//! first's certificate. A run that loses a deadlock or serialisation race runs again
//! ([`write_tx!`]). SQLite has one writer at a time (the whole database, from
//! `BEGIN IMMEDIATE` on), so it takes no row locks and skips the locking statement.

use crate::common::{self, EVENT_CERT_DELIVERED, NAME_CHUNK, NewEvent, cert_columns, to_json};
use crate::dialect::{self, Dialect, Flows, step, write_tx};
use crate::{CertificateRecord, IssueOutcome, IssueRecord, RegistryError};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Inserts the slice's things that do not exist yet (`$1`: `[name, template, at]` rows,
/// by name) and returns the names it inserted.
pub(crate) fn sql_insert_things<R: Dialect>() -> String {
    format!(
        "INSERT INTO things (name, template, created_at, updated_at) \
         SELECT value ->> 0, value ->> 1, CAST(value ->> 2 AS BIGINT), \
            CAST(value ->> 2 AS BIGINT) \
         FROM {} WHERE true \
         ON CONFLICT (name) DO NOTHING RETURNING name",
        R::json_rows(1)
    )
}

/// Locks the things of `$1` (names, sorted) in name order (PostgreSQL only).
fn sql_lock_things<R: Dialect>() -> String {
    format!(
        "SELECT name FROM things WHERE name IN ({}) ORDER BY name{}",
        R::json_values(1),
        R::FOR_UPDATE
    )
}

/// The active serials of the things of `$1`.
pub(crate) fn sql_active_serials<R: Dialect>() -> String {
    format!(
        "SELECT thing_name, serial FROM certificates \
         WHERE status = 'active' AND thing_name IN ({})",
        R::json_values(1)
    )
}

/// Deletes things this transaction inserted for records that conflicted.
fn sql_delete_things<R: Dialect>() -> String {
    format!("DELETE FROM things WHERE name IN ({})", R::json_values(1))
}

/// Brings things to their planned state (`$1`: `[name, template, created_at or null,
/// updated_at]` rows; `created_at` is set for a thing this commit created, whose first
/// committed record is not the one it was inserted with).
pub(crate) fn sql_update_things<R: Dialect>() -> String {
    format!(
        "UPDATE things SET template = u.template, \
            created_at = COALESCE(u.created_at, things.created_at), \
            updated_at = u.updated_at, \
            version = CASE \
                WHEN u.created_at IS NOT NULL THEN 1 \
                WHEN things.template IS DISTINCT FROM u.template THEN things.version + 1 \
                ELSE things.version END \
         FROM (SELECT value ->> 0 AS name, value ->> 1 AS template, \
                CAST(value ->> 2 AS BIGINT) AS created_at, \
                CAST(value ->> 3 AS BIGINT) AS updated_at \
               FROM {}) AS u \
         WHERE things.name = u.name",
        R::json_rows(1)
    )
}

/// Supersedes the active certificates of `$1` (`NOT_INDEXED`: look rows up by serial,
/// never by scanning the status index).
pub(crate) fn sql_supersede<R: Dialect>() -> String {
    format!(
        "UPDATE certificates SET status = 'superseded' \
         WHERE serial IN ({}) AND {}status = 'active'",
        R::json_values(1),
        R::NOT_INDEXED
    )
}

/// Revokes the active certificates of `$1` (`[serial, at]` rows), reason `superseded`.
pub(crate) fn sql_revoke<R: Dialect>() -> String {
    format!(
        "UPDATE certificates SET status = 'revoked', revoked_at = r.at, \
            revocation_reason = 'superseded' \
         FROM (SELECT value ->> 0 AS serial, CAST(value ->> 1 AS BIGINT) AS at FROM {}) AS r \
         WHERE certificates.serial = r.serial AND {}certificates.status = 'active'",
        R::json_rows(1),
        R::NOT_INDEXED
    )
}

/// The active certificates of the things of `$1`.
pub(crate) fn sql_active_certificates<R: Dialect>() -> String {
    format!(
        concat!(
            "SELECT ",
            cert_columns!(),
            " FROM certificates WHERE status = 'active' AND thing_name IN ({}) \
             ORDER BY thing_name, created_at, serial"
        ),
        R::json_values(1)
    )
}

/// Marks the certificates of `$1` delivered at `$2`, unless they are already.
pub(crate) fn sql_deliver<R: Dialect>() -> String {
    format!(
        "UPDATE certificates SET delivered_at = $2 \
         WHERE serial IN ({}) AND delivered_at IS NULL \
         RETURNING serial, thing_name",
        R::json_values(1)
    )
}

/// The certificate columns of a group commit, in the order `write_plan` binds them.
const CERTIFICATE_COLUMNS: &str = "INSERT INTO certificates (serial, fingerprint_sha256, \
    public_key_sha256, thing_name, issuer, status, origin, key_algorithm, not_before, \
    not_after, created_at, renew_at, der)";

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    (String, String): for<'r> sqlx::FromRow<'r, <R::Db as Database>::Row>,
{
    pub(crate) async fn record_issued(
        &self,
        records: &[IssueRecord],
    ) -> Result<Vec<IssueOutcome>, RegistryError> {
        common::validate(records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let names = common::distinct_names(records);
        // Values a thing gets if this commit creates it: from its first record.
        let mut first: HashMap<&str, &IssueRecord> = HashMap::with_capacity(names.len());
        for r in records {
            first.entry(r.thing_name.as_str()).or_insert(r);
        }
        let new_things = to_json(
            &names
                .iter()
                .map(|n| (n, first[n].template.as_deref(), first[n].at))
                .collect::<Vec<_>>(),
        );
        let names_json = to_json(&names);

        let committed = write_tx!(self, "a group commit", |tx| {
            let created: HashSet<String> = sqlx::query(AssertSqlSafe(sql_insert_things::<R>()))
                .bind(&new_things)
                .fetch_all(&mut *tx)
                .await
                .map_err(step("recording things"))?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<sqlx::Result<_>>()
                .map_err(step("recording things"))?;
            if !R::FOR_UPDATE.is_empty() {
                sqlx::query(AssertSqlSafe(sql_lock_things::<R>()))
                    .bind(&names_json)
                    .execute(&mut *tx)
                    .await
                    .map_err(step("locking things"))?;
            }
            let mut active: HashMap<String, BTreeSet<String>> = HashMap::new();
            if created.len() < names.len() {
                let rows: Vec<(String, String)> =
                    sqlx::query_as(AssertSqlSafe(sql_active_serials::<R>()))
                        .bind(&names_json)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(step("reading active certificates"))?;
                for (thing, serial) in rows {
                    active.entry(thing).or_default().insert(serial);
                }
            }
            let existing: HashSet<String> = names
                .iter()
                .filter(|n| !created.contains(**n))
                .map(|n| (*n).to_owned())
                .collect();

            let plan = common::plan(records, &existing, active);
            Self::write_plan(&mut tx, &plan, &first, &created).await?;
            Ok(plan.outcomes)
        });
        match committed {
            Ok(outcomes) => Ok(outcomes),
            Err((_, e)) if common::is_unique_violation(&e) => {
                let taken = self.taken(records.iter().map(|r| &r.certificate)).await?;
                Err(common::duplicate_of(records, &taken, &e.to_string()))
            }
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }

    /// The writes of a group commit, in an order that lets a record supersede or revoke
    /// a certificate inserted by an earlier record of the same slice. `first`: each
    /// thing's first record (what it was inserted with); `created`: the things this
    /// transaction inserted.
    async fn write_plan(
        conn: &mut <R::Db as Database>::Connection,
        plan: &common::Plan<'_>,
        first: &HashMap<&str, &IssueRecord>,
        created: &HashSet<String>,
    ) -> Result<(), dialect::StepError> {
        // Things: drop the ones inserted for records that all conflicted; bring the
        // others to their planned state where the insert differs.
        let claimed: HashSet<&str> = plan
            .things
            .iter()
            .filter(|t| t.new)
            .map(|t| t.name)
            .collect();
        let unclaimed: Vec<&str> = created
            .iter()
            .map(String::as_str)
            .filter(|n| !claimed.contains(n))
            .collect();
        if !unclaimed.is_empty() {
            sqlx::query(AssertSqlSafe(sql_delete_things::<R>()))
                .bind(to_json(&unclaimed))
                .execute(&mut *conn)
                .await
                .map_err(step("recording things"))?;
        }
        let updates: Vec<_> = plan
            .things
            .iter()
            .filter(|t| {
                let f = first[t.name];
                !t.new
                    || t.template != f.template.as_deref()
                    || t.created_at != f.at
                    || t.updated_at != f.at
            })
            .map(|t| {
                (
                    t.name,
                    t.template,
                    t.new.then_some(t.created_at),
                    t.updated_at,
                )
            })
            .collect();
        if !updates.is_empty() {
            sqlx::query(AssertSqlSafe(sql_update_things::<R>()))
                .bind(to_json(&updates))
                .execute(&mut *conn)
                .await
                .map_err(step("recording things"))?;
        }
        dialect::insert_rows(
            &mut *conn,
            CERTIFICATE_COLUMNS,
            12,
            "",
            &plan.certificates,
            |row, r| {
                let c = &r.certificate;
                row.push_bind(&c.serial)
                    .push_bind(&c.fingerprint_sha256)
                    .push_bind(&c.public_key_sha256)
                    .push_bind(&r.thing_name)
                    .push_bind(&c.issuer)
                    .push("'active'")
                    .push_bind(c.origin.as_str().to_owned())
                    .push_bind(&c.key_algorithm)
                    .push_bind(c.not_before)
                    .push_bind(c.not_after)
                    .push_bind(r.at)
                    .push_bind(c.renew_at)
                    .push_bind(&c.der);
            },
        )
        .await
        .map_err(step("recording certificates"))?;
        if !plan.superseded.is_empty() {
            sqlx::query(AssertSqlSafe(sql_supersede::<R>()))
                .bind(to_json(&plan.superseded))
                .execute(&mut *conn)
                .await
                .map_err(step("superseding certificates"))?;
        }
        if !plan.revoked.is_empty() {
            sqlx::query(AssertSqlSafe(sql_revoke::<R>()))
                .bind(to_json(&plan.revoked))
                .execute(&mut *conn)
                .await
                .map_err(step("revoking certificates"))?;
        }
        R::insert_events(conn, &plan.events)
            .await
            .map_err(step("appending events"))
    }

    pub(crate) async fn mark_delivered(
        &self,
        serials: &[String],
        at: i64,
    ) -> Result<(), RegistryError> {
        let serials = common::dedup_in_order(serials);
        if serials.is_empty() {
            return Ok(());
        }
        let list = to_json(&serials);
        write_tx!(self, "a delivery", |tx| {
            let rows: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(sql_deliver::<R>()))
                .bind(&list)
                .bind(at)
                .fetch_all(&mut *tx)
                .await
                .map_err(step("marking certificates delivered"))?;
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
            R::insert_events(&mut *tx, &events)
                .await
                .map_err(step("appending events"))
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn active_certificates(
        &self,
        thing_names: &[String],
    ) -> Result<HashMap<String, Vec<CertificateRecord>>, RegistryError> {
        let sql = sql_active_certificates::<R>();
        let mut out = HashMap::new();
        for chunk in thing_names.chunks(NAME_CHUNK) {
            let ctx = "reading active certificates";
            let rows = sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(to_json(chunk))
                .fetch_all(self.0.pool())
                .await
                .map_err(|e| self.0.err(ctx, e))?;
            let certs = rows
                .iter()
                .map(common::cert_from_row)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.0.err("reading certificates", e))?;
            common::group_by_thing(certs, &mut out);
        }
        Ok(out)
    }
}
