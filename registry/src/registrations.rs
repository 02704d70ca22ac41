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
//!
//! A SQLite group, even of one, is read and written a group at a time when it can be
//! ([`Flows::register_group_at_once`]): the things and certificates in one statement, the
//! policies in one, every accepted registration's writes in one call, the events in one.
//! Each statement is a hand-off to sqlx's connection thread, and when TLS handshakes keep
//! both cores busy each hand-off waits to be scheduled: at concurrency 8 this path gave
//! first connects 7–15 % more throughput (BENCHMARKS.md). Groups that need more (a policy
//! to create, a device registered twice in the group, a certificate already registered)
//! take the statement-per-step path below.

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

/// The things and certificates of a group (`$1`: `[[thing, serial], …]`), one row per
/// pair in order: the thing's columns as [`common::thing_from_row`] reads them (NULL when
/// missing), the certificate's thing, status and registration time (NULL when missing).
/// For a single writer ([`Flows::register_group_at_once`]).
const SQL_GROUP_STATES: &str = "SELECT t.name, t.template, t.created_at, \
     t.updated_at, t.thing_type, CAST(t.attributes AS TEXT), CAST(t.groups AS TEXT), \
     t.billing_group, t.version, c.thing_name, c.status, c.registered_at \
     FROM json_each($1) AS j \
     LEFT JOIN things t ON t.name = j.value ->> 0 \
     LEFT JOIN certificates c ON c.serial = j.value ->> 1 \
     ORDER BY j.key";

/// A group's writes in one SQL text (`$1`: one JSON object per accepted registration,
/// see [`GroupWrite`]); SQLite runs the statements of one text in one call. The same
/// effects as [`sql_update_thing`], [`sql_attach`] and [`SQL_MARK_REGISTERED`] for each.
const SQL_GROUP_WRITES: &str = "UPDATE things SET template = w.value ->> '$.template', \
         thing_type = w.value ->> '$.thing_type', attributes = w.value ->> '$.attributes', \
         groups = w.value ->> '$.groups', billing_group = w.value ->> '$.billing_group', \
         version = w.value ->> '$.version', updated_at = w.value ->> '$.at' \
     FROM json_each($1) AS w \
     WHERE things.name = w.value ->> '$.thing_name' AND w.value ->> '$.update_thing'; \
     INSERT INTO policy_attachments (policy_name, serial, attached_at) \
     SELECT a.value, w.value ->> '$.serial', w.value ->> '$.at' \
     FROM json_each($1) AS w, json_each(w.value, '$.attach') AS a WHERE true \
     ON CONFLICT (policy_name, serial) DO NOTHING; \
     UPDATE certificates SET registered_at = w.value ->> '$.at' FROM json_each($1) AS w \
     WHERE certificates.serial = w.value ->> '$.serial' AND certificates.registered_at IS NULL";

/// One accepted registration's writes, for [`SQL_GROUP_WRITES`].
#[derive(serde::Serialize)]
struct GroupWrite<'a> {
    thing_name: &'a str,
    serial: &'a str,
    template: &'a str,
    at: i64,
    update_thing: bool,
    thing_type: Option<&'a str>,
    /// JSON text, stored as the general path stores it.
    attributes: String,
    groups: String,
    billing_group: Option<&'a str>,
    version: i64,
    attach: &'a [String],
}

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
        if R::FOR_NO_KEY_UPDATE.is_empty() {
            // A single writer: the group path's fewer statements serve a group of one too.
            let mut outcomes = self
                .register_batch(std::slice::from_ref(registration))
                .await?;
            return Ok(outcomes.pop().expect("one outcome per registration"));
        }
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
            if R::FOR_NO_KEY_UPDATE.is_empty()
                && let Some((outcomes, events)) =
                    Self::register_group_at_once(&mut tx, registrations).await?
            {
                R::insert_events(&mut tx, &events)
                    .await
                    .map_err(step("appending events"))?;
                return Ok(outcomes);
            }
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

    /// A group of registrations for a single writer in a fixed number of statements,
    /// whatever its size: the things and certificates in one read, the policies in one
    /// read, every accepted registration's writes in one call; the caller appends the
    /// events. Each registration is decided exactly as [`Self::register_in`] decides it,
    /// in order. `None` (nothing written) when the group needs what only the general
    /// path does: two registrations of one thing or certificate, a policy to create or
    /// to compare with its earlier versions, or a certificate already registered (whose
    /// attachments are read).
    async fn register_group_at_once(
        conn: &mut <R::Db as Database>::Connection,
        registrations: &[Registration],
    ) -> Result<Option<(Vec<RegistrationOutcome>, Vec<NewEvent>)>, StepError> {
        let mut things = HashSet::with_capacity(registrations.len());
        let mut serials = HashSet::with_capacity(registrations.len());
        let mut requested = Vec::with_capacity(registrations.len());
        for reg in registrations {
            if !things.insert(reg.thing_name.as_str()) || !serials.insert(reg.serial.as_str()) {
                return Ok(None);
            }
            requested.push(common::requested_policies(reg));
        }
        let pairs: Vec<[&str; 2]> = registrations
            .iter()
            .map(|r| [r.thing_name.as_str(), r.serial.as_str()])
            .collect();
        let rows = sqlx::query(SQL_GROUP_STATES)
            .bind(to_json(&pairs))
            .fetch_all(&mut *conn)
            .await
            .map_err(step("reading the things and the certificates"))?;
        let mut names: Vec<&str> = requested
            .iter()
            .flatten()
            .flat_map(|policies| policies.iter().map(|p| p.name))
            .collect();
        names.sort_unstable();
        names.dedup();
        let find = sql_find_policies::<R>();
        let mut stored = HashMap::with_capacity(names.len());
        for row in sqlx::query(AssertSqlSafe(find.as_str()))
            .bind(to_json(&names))
            .fetch_all(&mut *conn)
            .await
            .map_err(step("reading policies"))?
        {
            let name: String = row.try_get(0).map_err(step("reading policies"))?;
            let document: String = row.try_get(1).map_err(step("reading policies"))?;
            let document: serde_json::Value =
                common::parse_json(&document).map_err(step("reading policies"))?;
            stored.insert(name, document);
        }

        let mut outcomes = Vec::with_capacity(registrations.len());
        let mut plans = Vec::with_capacity(registrations.len());
        for ((reg, requested), row) in registrations.iter().zip(&requested).zip(&rows) {
            let requested = match requested {
                Ok(requested) => requested,
                Err(reason) => {
                    outcomes.push(RegistrationOutcome::Refused {
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            let (thing, cert) = Self::state_from_row(row)
                .map_err(step("reading the things and the certificates"))?;
            match common::check_certificate(reg, cert.as_ref()) {
                CertCheck::Proceed => {}
                CertCheck::Refused(reason) => {
                    outcomes.push(RegistrationOutcome::Refused { reason });
                    continue;
                }
                CertCheck::AlreadyRegistered => return Ok(None),
            }
            let Some(thing) = thing else {
                outcomes.push(RegistrationOutcome::Refused {
                    reason: format!("thing {:?} is not in the registry", reg.thing_name),
                });
                continue;
            };
            if thing.version != reg.expected_thing_version {
                outcomes.push(RegistrationOutcome::ThingChanged);
                continue;
            }
            let mut found = HashMap::with_capacity(requested.len());
            for p in requested {
                match stored.get(p.name) {
                    None if p.document.is_some() => return Ok(None),
                    None => {}
                    Some(document) => {
                        let f = FoundPolicy::new(document.clone(), requested, p.name);
                        if f.candidate.as_ref().is_some_and(|c| *c != f.stored) {
                            return Ok(None);
                        }
                        found.insert(p.name.to_owned(), f);
                    }
                }
            }
            match common::plan_registration(reg, &thing, requested, &HashSet::new(), &found) {
                Ok(plan) => {
                    outcomes.push(RegistrationOutcome::Registered {
                        policies: plan.attach.clone(),
                    });
                    plans.push((reg, thing.version, plan));
                }
                Err(reason) => outcomes.push(RegistrationOutcome::Refused { reason }),
            }
        }

        let writes: Vec<GroupWrite<'_>> = plans
            .iter()
            .map(|(reg, version, plan)| {
                let details = plan.thing.as_ref().map(|(details, _)| details);
                GroupWrite {
                    thing_name: &reg.thing_name,
                    serial: &reg.serial,
                    template: &reg.template,
                    at: reg.at,
                    update_thing: details.is_some(),
                    thing_type: details.and_then(|d| d.thing_type.as_deref()),
                    attributes: details.map(|d| to_json(&d.attributes)).unwrap_or_default(),
                    groups: details.map(|d| to_json(&d.groups)).unwrap_or_default(),
                    billing_group: details.and_then(|d| d.billing_group.as_deref()),
                    version: plan.thing.as_ref().map_or(*version, |(_, v)| *v),
                    attach: &plan.attach,
                }
            })
            .collect();
        if !writes.is_empty() {
            sqlx::query(SQL_GROUP_WRITES)
                .bind(to_json(&writes))
                .execute(&mut *conn)
                .await
                .map_err(step("registering"))?;
        }
        let events = plans
            .into_iter()
            .flat_map(|(_, _, plan)| plan.events)
            .collect();
        Ok(Some((outcomes, events)))
    }

    /// A row of [`SQL_REGISTRATION_STATE`] or [`SQL_GROUP_STATES`]: the thing and the
    /// certificate, each `None` when missing.
    fn state_from_row(
        row: &<R::Db as Database>::Row,
    ) -> sqlx::Result<(Option<ThingRecord>, Option<CertState>)> {
        let thing_found: Option<String> = row.try_get(0)?;
        let cert_found: Option<String> = row.try_get(THING_COLUMN_COUNT)?;
        let thing = thing_found
            .is_some()
            .then(|| common::thing_from_row(row))
            .transpose()?;
        let cert = cert_found
            .is_some()
            .then(|| Self::cert_at(row, THING_COLUMN_COUNT))
            .transpose()?;
        Ok((thing, cert))
    }

    /// The certificate's thing, status and registration time, from column `at` on.
    fn cert_at(row: &<R::Db as Database>::Row, at: usize) -> sqlx::Result<CertState> {
        Ok(CertState {
            thing_name: row.try_get(at)?,
            status: row.try_get(at + 1)?,
            registered_at: row.try_get(at + 2)?,
        })
    }

    /// The thing and the certificate a registration checks, inside its transaction. With
    /// row locks (PostgreSQL) they are locked in the order every writer follows, the
    /// thing then the certificate, in two statements; a single writer (SQLite) holds the
    /// whole database already and reads both in one.
    async fn registration_state(
        conn: &mut <R::Db as Database>::Connection,
        reg: &Registration,
    ) -> Result<(Option<ThingRecord>, Option<CertState>), StepError> {
        if R::FOR_NO_KEY_UPDATE.is_empty() {
            let row = sqlx::query(SQL_REGISTRATION_STATE)
                .bind(&reg.thing_name)
                .bind(&reg.serial)
                .fetch_one(&mut *conn)
                .await
                .map_err(step("reading the thing and the certificate"))?;
            return Self::state_from_row(&row)
                .map_err(step("reading the thing and the certificate"));
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
            .map(|row| Self::cert_at(&row, 0))
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
