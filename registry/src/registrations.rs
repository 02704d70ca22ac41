//! First-connect registrations, written once for both backends
//! ([`crate::Registrations::register`] and the group commit of
//! [`crate::Registrations::register_batch`]).
//!
//! A registration locks the thing, then the certificate (`FOR NO KEY UPDATE`; the same
//! order as group commits of issued certificates, so the two cannot dead-lock), so
//! concurrent first connects of one device serialise and all but the first find the
//! certificate registered. Missing policies are inserted (`ON CONFLICT DO NOTHING`, in
//! name order) before they are read, so a concurrent creator of the same policy is waited
//! for and then compared against. Registrations that lose a deadlock or serialisation race
//! are retried ([`write_tx!`]). All of that is PostgreSQL's: SQLite has one writer at a
//! time (`BEGIN IMMEDIATE`), takes no row locks and never retries.
//!
//! SQLite also has one durable commit at a time, so its first connects are grouped
//! ([`Flows::register_batch`]): one transaction; a registration writes only once it is
//! accepted, so one that is refused (or loses to a change of its thing earlier in the
//! group) leaves no trace and the others stay. PostgreSQL runs registrations in parallel, one transaction
//! each (the trait's default `register_batch`).

use crate::common::{self, CertCheck, CertState, FoundPolicy, NewEvent, RequestedPolicy, to_json};
use crate::dialect::{Dialect, Flows, StepError, step, write_tx};
use crate::queries::SQL_THING;
use crate::{Registration, RegistrationOutcome, RegistryError, ThingRecord};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};
use std::collections::{HashMap, HashSet};

/// The thing, locked.
pub(crate) fn sql_thing<R: Dialect>() -> String {
    format!("{SQL_THING}{}", R::FOR_NO_KEY_UPDATE)
}

/// The certificate as a registration checks it, locked.
pub(crate) fn sql_registration_cert<R: Dialect>() -> String {
    format!(
        "SELECT thing_name, status, registered_at FROM certificates WHERE serial = $1{}",
        R::FOR_NO_KEY_UPDATE
    )
}

/// The policies attached to a certificate, by name.
pub(crate) const SQL_ATTACHED: &str = "SELECT policy_name FROM policy_attachments \
     WHERE serial = $1 ORDER BY policy_name";

/// Creates the policies of `$1` (`[name, document]` rows) that do not exist, in name
/// order, at `$2`; returns the names created.
pub(crate) fn sql_create_policies<R: Dialect>() -> String {
    format!(
        "INSERT INTO policies (name, document, created_at, updated_at) \
         SELECT value ->> 0, {}, $2, $2 FROM {} WHERE true ORDER BY value ->> 0 \
         ON CONFLICT (name) DO NOTHING RETURNING name",
        R::json_column("value ->> 1"),
        R::json_rows(1)
    )
}

/// Deletes policies this transaction created for a registration refused after all.
fn sql_delete_policies<R: Dialect>() -> String {
    format!("DELETE FROM policies WHERE name IN ({})", R::json_values(1))
}

/// The policies of `$1` (names) with their documents.
pub(crate) fn sql_find_policies<R: Dialect>() -> String {
    format!(
        "SELECT name, CAST(document AS TEXT) FROM policies WHERE name IN ({})",
        R::json_values(1)
    )
}

/// The thing's new details and version.
pub(crate) fn sql_update_thing<R: Dialect>() -> String {
    format!(
        "UPDATE things SET template = $2, thing_type = $3, attributes = {}, groups = {}, \
            billing_group = $6, version = $7, updated_at = $8 \
         WHERE name = $1",
        R::json_column("$4"),
        R::json_column("$5")
    )
}

/// Attaches the policies of `$1` (names) to certificate `$2` at `$3`.
pub(crate) fn sql_attach<R: Dialect>() -> String {
    format!(
        "INSERT INTO policy_attachments (policy_name, serial, attached_at) \
         SELECT value, $2, $3 FROM ({}) AS p WHERE true \
         ON CONFLICT (policy_name, serial) DO NOTHING",
        R::json_values(1)
    )
}

/// Columns of [`crate::queries::thing_columns!`].
const THING_COLUMN_COUNT: usize = 9;

/// The thing (`$1`) and the certificate (`$2`) in one row, each part NULL when missing:
/// the thing's columns as [`common::thing_from_row`] reads them, then the certificate's
/// thing, status and registration time. For a single writer, which needs no row locks.
pub(crate) const SQL_REGISTRATION_STATE: &str = "SELECT t.name, t.template, t.created_at, \
     t.updated_at, t.thing_type, CAST(t.attributes AS TEXT), CAST(t.groups AS TEXT), \
     t.billing_group, t.version, c.thing_name, c.status, c.registered_at \
     FROM (SELECT 1) AS one \
     LEFT JOIN things t ON t.name = $1 \
     LEFT JOIN certificates c ON c.serial = $2";

pub(crate) const SQL_MARK_REGISTERED: &str = "UPDATE certificates SET registered_at = $2 \
     WHERE serial = $1 AND registered_at IS NULL";

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<String>: Encode<'q, R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn register(
        &self,
        registration: &Registration,
    ) -> Result<RegistrationOutcome, RegistryError> {
        let requested = match common::requested_policies(registration) {
            Ok(requested) => requested,
            Err(reason) => return Ok(RegistrationOutcome::Refused { reason }),
        };
        write_tx!(self, "a registration", |tx| {
            // Only a registration that writes everything writes anything: whatever
            // else it read or locked, committing it leaves the database as it was.
            let (outcome, _) =
                Self::register_in(&mut tx, registration, &requested, true, None).await?;
            Ok(outcome)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn register_batch(
        &self,
        registrations: &[Registration],
    ) -> Result<Vec<RegistrationOutcome>, RegistryError> {
        write_tx!(self, "a group of registrations", |tx| {
            let mut outcomes = Vec::with_capacity(registrations.len());
            // The group's events go in together at the end: one statement.
            let mut events = Vec::new();
            for registration in registrations {
                let requested = match common::requested_policies(registration) {
                    Ok(requested) => requested,
                    Err(reason) => {
                        outcomes.push(RegistrationOutcome::Refused { reason });
                        continue;
                    }
                };
                // A registration writes only once it is accepted (a refused one deletes
                // the policies it created), so one that is refused, or loses to a change
                // of its thing earlier in the group, leaves no trace and the others stay,
                // without a savepoint each: two statements fewer per first connect.
                let (outcome, _) =
                    Self::register_in(&mut tx, registration, &requested, true, Some(&mut events))
                        .await?;
                outcomes.push(outcome);
            }
            R::insert_events(&mut tx, &events)
                .await
                .map_err(step("appending events"))?;
            Ok(outcomes)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    /// The thing and the certificate a registration checks, inside its transaction. With
    /// row locks (PostgreSQL) they are locked in the order every writer follows, the
    /// thing then the certificate, in two statements; a single writer (SQLite) holds the
    /// whole database already and reads both in one.
    async fn registration_state(
        conn: &mut <R::Db as Database>::Connection,
        reg: &Registration,
    ) -> Result<(Option<ThingRecord>, Option<CertState>), StepError> {
        let cert_at = |row: &<R::Db as Database>::Row, at: usize| {
            Ok::<_, sqlx::Error>(CertState {
                thing_name: row.try_get(at)?,
                status: row.try_get(at + 1)?,
                registered_at: row.try_get(at + 2)?,
            })
        };
        if R::FOR_NO_KEY_UPDATE.is_empty() {
            let row = sqlx::query(SQL_REGISTRATION_STATE)
                .bind(&reg.thing_name)
                .bind(&reg.serial)
                .fetch_one(&mut *conn)
                .await
                .map_err(step("reading the thing and the certificate"))?;
            let read = || {
                let thing_found: Option<String> = row.try_get(0)?;
                let cert_found: Option<String> = row.try_get(THING_COLUMN_COUNT)?;
                let thing = thing_found
                    .is_some()
                    .then(|| common::thing_from_row(&row))
                    .transpose()?;
                let cert = cert_found
                    .is_some()
                    .then(|| cert_at(&row, THING_COLUMN_COUNT))
                    .transpose()?;
                Ok::<_, sqlx::Error>((thing, cert))
            };
            return read().map_err(step("reading the thing and the certificate"));
        }
        let row = sqlx::query(AssertSqlSafe(sql_thing::<R>()))
            .bind(&reg.thing_name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("locking the thing"))?;
        let thing = row
            .as_ref()
            .map(common::thing_from_row)
            .transpose()
            .map_err(step("reading the thing"))?;
        let row = sqlx::query(AssertSqlSafe(sql_registration_cert::<R>()))
            .bind(&reg.serial)
            .fetch_optional(&mut *conn)
            .await
            .map_err(step("locking the certificate"))?;
        let cert = row
            .map(|row| cert_at(&row, 0))
            .transpose()
            .map_err(step("reading the certificate"))?;
        Ok((thing, cert))
    }

    /// One registration, inside the caller's write transaction. Returns the outcome and
    /// whether it wrote (only `Registered` does). A registration refused after it created
    /// policies deletes them again if `undo` (else the caller rolls back to a savepoint).
    pub(crate) async fn register_in(
        conn: &mut <R::Db as Database>::Connection,
        reg: &Registration,
        requested: &[RequestedPolicy<'_>],
        undo: bool,
        deferred_events: Option<&mut Vec<NewEvent>>,
    ) -> Result<(RegistrationOutcome, bool), StepError> {
        let refused = |reason: String| Ok((RegistrationOutcome::Refused { reason }, false));
        let (thing, cert) = Self::registration_state(conn, reg).await?;
        match common::check_certificate(reg, cert.as_ref()) {
            CertCheck::Proceed => {}
            CertCheck::Refused(reason) => return refused(reason),
            CertCheck::AlreadyRegistered => {
                let policies = sqlx::query(SQL_ATTACHED)
                    .bind(&reg.serial)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(step("reading attached policies"))?
                    .iter()
                    .map(|row| row.try_get(0))
                    .collect::<sqlx::Result<_>>()
                    .map_err(step("reading attached policies"))?;
                return Ok((RegistrationOutcome::AlreadyRegistered { policies }, false));
            }
        }
        let Some(thing) = thing else {
            return refused(format!("thing {:?} is not in the registry", reg.thing_name));
        };
        if thing.version != reg.expected_thing_version {
            return Ok((RegistrationOutcome::ThingChanged, false));
        }

        // The requested policies as stored. Those missing are created (in name order, so
        // concurrent registrations creating several policies cannot dead-lock; ON
        // CONFLICT waits for a concurrent creator) and read again, so the lookup sees a
        // concurrent creator's committed document. Usually they all exist already: one
        // statement.
        let names: Vec<&str> = requested.iter().map(|p| p.name).collect();
        let find = sql_find_policies::<R>();
        let mut rows = sqlx::query(AssertSqlSafe(find.as_str()))
            .bind(to_json(&names))
            .fetch_all(&mut *conn)
            .await
            .map_err(step("reading policies"))?;
        let existing: HashSet<String> = rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<sqlx::Result<_>>()
            .map_err(step("reading policies"))?;
        let documents: Vec<(&str, String)> = requested
            .iter()
            .filter(|p| !existing.contains(p.name))
            .filter_map(|p| p.document.map(|d| (p.name, to_json(d))))
            .collect();
        let created: HashSet<String> = if documents.is_empty() {
            HashSet::new()
        } else {
            let created = sqlx::query(AssertSqlSafe(sql_create_policies::<R>()))
                .bind(to_json(&documents))
                .bind(reg.at)
                .fetch_all(&mut *conn)
                .await
                .map_err(step("creating policies"))?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<sqlx::Result<_>>()
                .map_err(step("creating policies"))?;
            rows = sqlx::query(AssertSqlSafe(find.as_str()))
                .bind(to_json(&names))
                .fetch_all(&mut *conn)
                .await
                .map_err(step("reading policies"))?;
            created
        };
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get(0).map_err(step("reading policies"))?;
            let document: String = row.try_get(1).map_err(step("reading policies"))?;
            let stored = common::parse_json(&document).map_err(step("reading policies"))?;
            found.insert(name.clone(), FoundPolicy::new(stored, requested, &name));
        }
        // A template may still render a version the policy had before its default was
        // replaced (the audit's mitigation): that is the same policy, attached by name.
        for (name, f) in found.iter_mut() {
            let Some(candidate) = &f.candidate else {
                continue;
            };
            if *candidate == f.stored {
                continue;
            }
            let earlier = sqlx::query(
                "SELECT CAST(document AS TEXT) FROM policy_versions \
                 WHERE policy_name = $1",
            )
            .bind(name.clone())
            .fetch_all(&mut *conn)
            .await
            .map_err(step("reading policy versions"))?;
            for row in earlier {
                let text: String = row.try_get(0).map_err(step("reading policy versions"))?;
                let version: serde_json::Value =
                    common::parse_json(&text).map_err(step("reading policy versions"))?;
                if version == *candidate {
                    f.candidate = Some(f.stored.clone());
                    break;
                }
            }
        }
        let plan = match common::plan_registration(reg, &thing, requested, &created, &found) {
            Ok(plan) => plan,
            Err(reason) => {
                if undo && !created.is_empty() {
                    sqlx::query(AssertSqlSafe(sql_delete_policies::<R>()))
                        .bind(to_json(&created))
                        .execute(&mut *conn)
                        .await
                        .map_err(step("creating policies"))?;
                }
                return refused(reason);
            }
        };

        if let Some((details, version)) = &plan.thing {
            sqlx::query(AssertSqlSafe(sql_update_thing::<R>()))
                .bind(&reg.thing_name)
                .bind(&reg.template)
                .bind(details.thing_type.clone())
                .bind(to_json(&details.attributes))
                .bind(to_json(&details.groups))
                .bind(details.billing_group.clone())
                .bind(*version)
                .bind(reg.at)
                .execute(&mut *conn)
                .await
                .map_err(step("updating the thing"))?;
        }
        if !plan.attach.is_empty() {
            sqlx::query(AssertSqlSafe(sql_attach::<R>()))
                .bind(to_json(&plan.attach))
                .bind(&reg.serial)
                .bind(reg.at)
                .execute(&mut *conn)
                .await
                .map_err(step("attaching policies"))?;
        }
        sqlx::query(SQL_MARK_REGISTERED)
            .bind(&reg.serial)
            .bind(reg.at)
            .execute(&mut *conn)
            .await
            .map_err(step("marking the certificate registered"))?;
        match deferred_events {
            Some(deferred) => deferred.extend(plan.events),
            None => R::insert_events(conn, &plan.events)
                .await
                .map_err(step("appending events"))?,
        }
        Ok((
            RegistrationOutcome::Registered {
                policies: plan.attach,
            },
            true,
        ))
    }
}
