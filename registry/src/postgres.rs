//! The PostgreSQL registry.
//!
//! Group commits run in one ordinary (read committed) transaction. Concurrency safety
//! of the read-check-write: the slice's things are inserted (`ON CONFLICT DO NOTHING`,
//! which waits for a concurrent inserter of the same name) and then locked
//! (`SELECT … FOR UPDATE`, in name order) before their active certificates are read, so
//! two runs on the same thing serialise and the second sees the first's certificate.
//! Rows travel as arrays (`UNNEST`), so a slice costs a fixed handful of statements.
//!
//! A registration locks the thing, then the certificate (`FOR NO KEY UPDATE`; the same
//! order as group commits, so the two cannot dead-lock), so concurrent first connects of
//! one device serialise and all but the first find the certificate registered. Missing
//! policies are inserted (`ON CONFLICT DO NOTHING`, in name order) before they are read,
//! so a concurrent creator of the same policy is waited for and then compared against.
//! Registrations that lose a deadlock or serialisation race are retried. (Connection
//! flushes: see `connections`; revocation and CRL stores: see `revocations`.)
//!
//! Rotation takes row locks in the order revocation does: the thing, then the old
//! (replaced) certificate, then its replacements, then the rotation row. Writers that
//! insert certificates for a thing (group commits, completed rotations, replacements)
//! hold at least `FOR KEY SHARE` on the thing, which revocation locks `FOR UPDATE`, so a
//! revocation sees every replacement committed before it and no replacement slips in
//! behind it. Workers claim rotations with `FOR UPDATE SKIP LOCKED` and commit only
//! while their lease holds; opening rotations is one `INSERT … ON CONFLICT DO NOTHING`
//! statement per chunk (skipping certificates locked by a writer; the next sweep gets
//! them), so two sweeps never open a rotation twice.

use crate::common::{
    self, CertCheck, CertState, EVENT_CERT_DELIVERED, EVENT_CERT_ISSUED, EVENT_CERT_REVOKED,
    EVENT_CERT_SUPERSEDED, EVENT_ROTATION_CONFIRMED, EVENT_ROTATION_DELIVERED, EVENT_ROTATION_DUE,
    EVENT_ROTATION_FAILED, EVENT_ROTATION_ISSUED, FoundPolicy, NAME_CHUNK, NewEvent, OPEN_CHUNK,
    cert_columns, db_error, migrate_error, to_json,
};
use crate::{
    CertificateFilter, CertificateRecord, ConnectionRecord, DeviceState, EventFilter, EventRecord,
    IssueOutcome, IssueRecord, NewCertificate, PolicyRecord, PreparedReplacement, Registration,
    RegistrationOutcome, Registry, RegistryCounts, RegistryError, ReplaceOutcome, Replacement,
    Revocation, RevokedEntry, RotationBacklog, RotationClaim, RotationFilter, RotationRecord,
    StoredCrl, TakenReplacement, ThingFilter, ThingRecord,
};

use crate::dialect::{Dialect, Flows};
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// How long connecting (and waiting for a pooled connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of a write transaction (a group commit, a registration, a rotation step)
/// that lost a deadlock or serialisation race.
const MAX_ATTEMPTS: usize = 5;

/// The thing columns, in the order [`common::thing_from_row`] reads them (JSON as text).
macro_rules! thing_columns {
    () => {
        "name, template, created_at, updated_at, thing_type, attributes::text, groups::text, \
         billing_group, version"
    };
}

/// The condition of a certificate due for rotation (`c`; $1: now, $2: expiring before):
/// active, delivered, past its renewal point (`renewal`) or also expiring soon
/// (`expiry`), no rotation yet. Without `expiring_before` the renewal point bounds the
/// index range scan of `certificates_status_renew_at`; with it, the scan filters.
macro_rules! due_condition {
    (renewal) => {
        "c.status = 'active' AND c.renew_at <= $1 AND c.delivered_at IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM rotations x WHERE x.old_serial = c.serial)"
    };
    (expiry) => {
        "c.status = 'active' AND (c.renew_at <= $1 OR c.not_after <= $2) \
         AND c.delivered_at IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM rotations x WHERE x.old_serial = c.serial)"
    };
}

/// Certificates due for rotation ($3: limit or NULL); `[renewal, expiry]`.
macro_rules! due_sql {
    ($which:tt) => {
        concat!(
            "SELECT ",
            cert_columns!(c),
            " FROM certificates c WHERE ",
            due_condition!($which),
            " ORDER BY c.renew_at, c.serial LIMIT $3"
        )
    };
}
const SQL_DUE: [&str; 2] = [due_sql!(renewal), due_sql!(expiry)];

/// Opens rotations for up to $3 due certificates after the cursor ($5, $6: the
/// `(renew_at, serial)` of the last certificate the previous chunk selected), with a
/// `rotation.due` event for each one this statement inserted ($4: the event kind).
/// Certificates a writer holds locked are skipped (the next sweep gets them); a
/// concurrent sweep's rows are left alone (`ON CONFLICT DO NOTHING` waits for it, then
/// skips). Returns how many were selected, how many opened, and the new cursor.
macro_rules! open_due_sql {
    ($which:tt) => {
        concat!(
            "WITH due AS ( \
                SELECT c.serial, c.thing_name, c.origin, c.renew_at, c.not_after \
                FROM certificates c WHERE ",
            due_condition!($which),
            " AND (c.renew_at, c.serial) > ($5, $6) \
                ORDER BY c.renew_at, c.serial LIMIT $3 FOR SHARE OF c SKIP LOCKED), \
             opened AS ( \
                INSERT INTO rotations (old_serial, thing_name, origin, state, due_at, \
                    updated_at) \
                SELECT d.serial, d.thing_name, d.origin, 'due', $1, $1 FROM due d \
                ORDER BY d.renew_at, d.serial \
                ON CONFLICT (old_serial) DO NOTHING RETURNING old_serial), \
             logged AS ( \
                INSERT INTO events (at, kind, thing_name, serial, detail) \
                SELECT $1, $4, d.thing_name, d.serial, jsonb_build_object('origin', d.origin, \
                    'renew_at', d.renew_at, 'not_after', d.not_after) \
                FROM due d JOIN opened o ON o.old_serial = d.serial \
                ORDER BY d.renew_at, d.serial RETURNING 1), \
             last AS ( \
                SELECT renew_at, serial::text FROM due \
                ORDER BY renew_at DESC, serial DESC LIMIT 1) \
             SELECT (SELECT count(*) FROM due), (SELECT count(*) FROM logged), \
                (SELECT renew_at FROM last), (SELECT serial FROM last)"
        )
    };
}
const SQL_OPEN_DUE: [&str; 2] = [open_due_sql!(renewal), open_due_sql!(expiry)];

/// Claims up to $4 due rotations of generated keys whose lease is free or expired
/// ($1: owner, $2: now, $3: lease seconds) and returns their old certificates and the
/// things' templates, in claim order.
const SQL_CLAIM: &str = concat!(
    "WITH picked AS ( \
        SELECT old_serial FROM rotations \
        WHERE state = 'due' AND origin = 'generated' \
          AND (lease_until IS NULL OR lease_until < $2) \
        ORDER BY due_at, old_serial LIMIT $4 FOR UPDATE SKIP LOCKED), \
     claimed AS ( \
        UPDATE rotations r SET lease_owner = $1, lease_until = $2 + $3 \
        FROM picked p WHERE r.old_serial = p.old_serial \
        RETURNING r.old_serial, r.due_at) \
     SELECT ",
    cert_columns!(c),
    ", t.template FROM claimed k \
     JOIN certificates c ON c.serial = k.old_serial \
     JOIN things t ON t.name = c.thing_name \
     ORDER BY k.due_at, k.old_serial"
);

/// Inserts replacement certificates (`active`, `replaces` set): $1 serial, $2
/// fingerprint, $3 public key hash, $4 thing, $5 issuer, $6 origin, $7 key algorithm,
/// $8 not_before, $9 not_after, $10 created_at, $11 der, $12 renew_at, $13 replaces,
/// $14 delivered_at, $15 registered_at.
const SQL_INSERT_REPLACEMENTS: &str = "INSERT INTO certificates (serial, fingerprint_sha256, \
        public_key_sha256, thing_name, issuer, status, origin, key_algorithm, not_before, \
        not_after, created_at, der, renew_at, replaces, delivered_at, registered_at) \
     SELECT u.serial, u.fp, u.pk, u.thing, u.issuer, 'active', u.origin, u.alg, u.nb, u.na, \
        u.at, u.der, u.renew_at, u.replaces, u.delivered_at, u.registered_at \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
        $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bytea[], $12::bigint[], \
        $13::text[], $14::bigint[], $15::bigint[]) WITH ORDINALITY \
        AS u(serial, fp, pk, thing, issuer, origin, alg, nb, na, at, der, renew_at, replaces, \
             delivered_at, registered_at, ord) \
     ORDER BY u.ord";

/// Copies the policy attachments of $1 (old serials) to $2 (new serials), attached at $3.
const SQL_COPY_ATTACHMENTS: &str = "INSERT INTO policy_attachments (policy_name, serial, attached_at) \
     SELECT a.policy_name, u.new, u.at \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(old, new, at) \
     JOIN policy_attachments a ON a.serial = u.old \
     ORDER BY u.new, a.policy_name \
     ON CONFLICT (policy_name, serial) DO NOTHING";

/// Where a registration attempt stopped.
type StepError = (&'static str, sqlx::Error);

fn step(context: &'static str) -> impl Fn(sqlx::Error) -> StepError {
    move |e| (context, e)
}

#[derive(Debug)]
pub(crate) struct PgRegistry {
    pool: PgPool,
    /// Redacted URL, for messages.
    url: String,
    probes: common::ProbeGate,
}

/// Why a group-commit attempt failed.
enum AttemptError {
    /// A serial or fingerprint is already recorded.
    Unique(sqlx::Error),
    /// Deadlock or serialisation failure: try again.
    Retry(sqlx::Error),
    Other(RegistryError),
}

impl PgRegistry {
    pub(crate) async fn open(url: &str) -> Result<Self, RegistryError> {
        let redacted = crate::redact_url(url);
        let unreachable = |reason: String| RegistryError::Unreachable {
            url: redacted.clone(),
            reason,
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| unreachable(format!("invalid URL: {e}")))?
            .application_name("fleetcert");
        // One direct connection first: it fails fast with the real reason (a pool keeps
        // retrying a refused connection until its timeout), and runs the migrations.
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let migrated = migrate(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(CONNECT_TIMEOUT)
            // A dropped transaction queues its ROLLBACK and leaves depth 0 (the pool's
            // ping on release sends it; a broken connection fails the ping and is
            // closed); this only catches a connection whose depth is still not 0.
            .after_release(|conn, _| {
                Box::pin(async move { Ok(common::reusable(conn, "returned to the pool")) })
            })
            .before_acquire(|conn, _| {
                Box::pin(async move { Ok(common::reusable(conn, "taken from the pool")) })
            })
            .connect_lazy_with(options);
        Ok(PgRegistry {
            pool,
            url: redacted,
            probes: common::ProbeGate::default(),
        })
    }

    /// The serials and fingerprints of `records` already in the database.
    async fn taken(&self, records: &[IssueRecord]) -> Result<HashSet<String>, RegistryError> {
        self.taken_certs(records.iter().map(|r| &r.certificate))
            .await
    }

    async fn attempt(&self, records: &[IssueRecord]) -> Result<Vec<IssueOutcome>, AttemptError> {
        let step = |context: &'static str| {
            move |e: sqlx::Error| {
                if common::is_unique_violation(&e) {
                    AttemptError::Unique(e)
                } else if is_retryable(&e) {
                    AttemptError::Retry(e)
                } else {
                    AttemptError::Other(db_error(&self.url, context, e))
                }
            }
        };
        let names = common::distinct_names(records);
        // Values a thing gets if this commit creates it: from its first record.
        let mut first: HashMap<&str, &IssueRecord> = HashMap::with_capacity(names.len());
        for r in records {
            first.entry(r.thing_name.as_str()).or_insert(r);
        }
        let templates: Vec<Option<&str>> =
            names.iter().map(|n| first[n].template.as_deref()).collect();
        let ats: Vec<i64> = names.iter().map(|n| first[n].at).collect();

        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;

        let created: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO things (name, template, created_at, updated_at) \
             SELECT u.name, u.template, u.at, u.at \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS u(name, template, at) \
             ON CONFLICT (name) DO NOTHING RETURNING name",
        )
        .bind(&names)
        .bind(&templates)
        .bind(&ats)
        .fetch_all(&mut *tx)
        .await
        .map_err(step("recording things"))?
        .into_iter()
        .collect();
        sqlx::query("SELECT name FROM things WHERE name = ANY($1) ORDER BY name FOR UPDATE")
            .bind(&names)
            .execute(&mut *tx)
            .await
            .map_err(step("locking things"))?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT thing_name, serial FROM certificates \
             WHERE status = 'active' AND thing_name = ANY($1)",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await
        .map_err(step("reading active certificates"))?;
        let mut active: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (thing, serial) in rows {
            active.entry(thing).or_default().insert(serial);
        }
        let existing: HashSet<String> = names
            .iter()
            .filter(|n| !created.contains(**n))
            .map(|n| (*n).to_owned())
            .collect();

        let plan = common::plan(records, &existing, active);

        // Things: drop the ones this transaction created for records that conflicted;
        // bring the others to their planned state where the insert above differs.
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
            sqlx::query("DELETE FROM things WHERE name = ANY($1)")
                .bind(&unclaimed)
                .execute(&mut *tx)
                .await
                .map_err(step("recording things"))?;
        }
        let updates: Vec<&common::ThingWrite<'_>> = plan
            .things
            .iter()
            .filter(|t| {
                let f = first[t.name];
                !t.new
                    || t.template != f.template.as_deref()
                    || t.created_at != f.at
                    || t.updated_at != f.at
            })
            .collect();
        if !updates.is_empty() {
            sqlx::query(
                "UPDATE things SET template = u.template, \
                    created_at = COALESCE(u.created_at, things.created_at), \
                    updated_at = u.updated_at, \
                    version = CASE \
                        WHEN u.created_at IS NOT NULL THEN 1 \
                        WHEN things.template IS DISTINCT FROM u.template \
                            THEN things.version + 1 \
                        ELSE things.version END \
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
                    AS u(name, template, created_at, updated_at) \
                 WHERE things.name = u.name",
            )
            .bind(updates.iter().map(|t| t.name).collect::<Vec<_>>())
            .bind(updates.iter().map(|t| t.template).collect::<Vec<_>>())
            .bind(
                updates
                    .iter()
                    .map(|t| t.new.then_some(t.created_at))
                    .collect::<Vec<_>>(),
            )
            .bind(updates.iter().map(|t| t.updated_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(step("recording things"))?;
        }

        if !plan.certificates.is_empty() {
            let certs = &plan.certificates;
            sqlx::query(
                "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                    thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                    created_at, der, renew_at) \
                 SELECT u.serial, u.fp, u.pk, u.thing, u.issuer, 'active', u.origin, u.alg, \
                    u.nb, u.na, u.at, u.der, u.renew_at \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                    $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], \
                    $11::bytea[], $12::bigint[]) \
                    AS u(serial, fp, pk, thing, issuer, origin, alg, nb, na, at, der, renew_at)",
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.serial.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.fingerprint_sha256.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.public_key_sha256.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.thing_name.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.issuer.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.origin.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.key_algorithm.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.not_before)
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.not_after)
                    .collect::<Vec<_>>(),
            )
            .bind(certs.iter().map(|r| r.at).collect::<Vec<_>>())
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.der.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                certs
                    .iter()
                    .map(|r| r.certificate.renew_at)
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(step("recording certificates"))?;
        }
        if !plan.superseded.is_empty() {
            sqlx::query(
                "UPDATE certificates SET status = 'superseded' \
                 WHERE status = 'active' AND serial = ANY($1)",
            )
            .bind(&plan.superseded)
            .execute(&mut *tx)
            .await
            .map_err(step("superseding certificates"))?;
        }
        if !plan.revoked.is_empty() {
            sqlx::query(
                "UPDATE certificates SET status = 'revoked', revoked_at = r.at, \
                    revocation_reason = 'superseded' \
                 FROM UNNEST($1::text[], $2::bigint[]) AS r(serial, at) \
                 WHERE certificates.serial = r.serial AND certificates.status = 'active'",
            )
            .bind(plan.revoked.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .bind(plan.revoked.iter().map(|(_, at)| *at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(step("revoking certificates"))?;
        }
        insert_events(&mut tx, &plan.events)
            .await
            .map_err(step("appending events"))?;
        tx.commit()
            .await
            .map_err(step("committing issued certificates"))?;
        Ok(plan.outcomes)
    }

    fn certs(&self, rows: &[PgRow]) -> Result<Vec<CertificateRecord>, RegistryError> {
        rows.iter()
            .map(common::cert_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading certificates", e))
    }

    /// One attempt at [`Registry::register`], in one transaction. Lock order: the thing,
    /// then the certificate (the order `record_issued` takes them in, so the two cannot
    /// dead-lock each other).
    async fn register_attempt(
        &self,
        reg: &Registration,
        requested: &[common::RequestedPolicy<'_>],
    ) -> Result<RegistrationOutcome, StepError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        let row = sqlx::query(concat!(
            "SELECT ",
            thing_columns!(),
            " FROM things WHERE name = $1 FOR NO KEY UPDATE"
        ))
        .bind(&reg.thing_name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("locking the thing"))?;
        let thing = row
            .as_ref()
            .map(common::thing_from_row)
            .transpose()
            .map_err(step("reading the thing"))?;
        let cert: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT thing_name::text, status, registered_at FROM certificates \
             WHERE serial = $1 FOR NO KEY UPDATE",
        )
        .bind(&reg.serial)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("locking the certificate"))?;
        let cert = cert.map(|(thing_name, status, registered_at)| CertState {
            thing_name,
            status,
            registered_at,
        });
        let refused = |reason: String| Ok(RegistrationOutcome::Refused { reason });
        match common::check_certificate(reg, cert.as_ref()) {
            CertCheck::Proceed => {}
            CertCheck::Refused(reason) => return refused(reason),
            CertCheck::AlreadyRegistered => {
                let policies: Vec<String> = sqlx::query_scalar(
                    "SELECT policy_name::text FROM policy_attachments WHERE serial = $1 \
                     ORDER BY policy_name",
                )
                .bind(&reg.serial)
                .fetch_all(&mut *tx)
                .await
                .map_err(step("reading attached policies"))?;
                return Ok(RegistrationOutcome::AlreadyRegistered { policies });
            }
        }
        let Some(thing) = thing else {
            return refused(format!("thing {:?} is not in the registry", reg.thing_name));
        };
        if thing.version != reg.expected_thing_version {
            return Ok(RegistrationOutcome::ThingChanged);
        }

        let names: Vec<&str> = requested.iter().map(|p| p.name).collect();
        let documents: Vec<Option<String>> =
            requested.iter().map(|p| p.document.map(to_json)).collect();
        // Create the missing policies first (in name order, so concurrent registrations
        // creating several policies cannot dead-lock): ON CONFLICT waits for a
        // concurrent creator, so the lookup below sees its committed document.
        let created: HashSet<String> = if documents.iter().any(Option::is_some) {
            sqlx::query_scalar(
                "INSERT INTO policies (name, document, created_at, updated_at) \
                 SELECT u.name, u.doc::json, $3, $3 \
                 FROM UNNEST($1::text[], $2::text[]) AS u(name, doc) \
                 WHERE u.doc IS NOT NULL ORDER BY u.name \
                 ON CONFLICT (name) DO NOTHING RETURNING name::text",
            )
            .bind(&names)
            .bind(&documents)
            .bind(reg.at)
            .fetch_all(&mut *tx)
            .await
            .map_err(step("creating policies"))?
            .into_iter()
            .collect()
        } else {
            HashSet::new()
        };
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, document::text FROM policies WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&mut *tx)
                .await
                .map_err(step("reading policies"))?;
        let mut found = HashMap::with_capacity(rows.len());
        for (name, stored) in rows {
            let stored = common::parse_json(&stored).map_err(step("reading policies"))?;
            found.insert(name.clone(), FoundPolicy::new(stored, requested, &name));
        }
        let plan = match common::plan_registration(reg, &thing, requested, &created, &found) {
            Ok(plan) => plan,
            // Dropping the transaction rolls back the policies created above.
            Err(reason) => return refused(reason),
        };

        if let Some((details, version)) = &plan.thing {
            sqlx::query(
                "UPDATE things SET template = $2, thing_type = $3, attributes = $4::jsonb, \
                    groups = $5::jsonb, billing_group = $6, version = $7, updated_at = $8 \
                 WHERE name = $1",
            )
            .bind(&reg.thing_name)
            .bind(&reg.template)
            .bind(details.thing_type.as_deref())
            .bind(to_json(&details.attributes))
            .bind(to_json(&details.groups))
            .bind(details.billing_group.as_deref())
            .bind(version)
            .bind(reg.at)
            .execute(&mut *tx)
            .await
            .map_err(step("updating the thing"))?;
        }
        if !plan.attach.is_empty() {
            sqlx::query(
                "INSERT INTO policy_attachments (policy_name, serial, attached_at) \
                 SELECT u.name, $2, $3 FROM UNNEST($1::text[]) AS u(name) \
                 ON CONFLICT (policy_name, serial) DO NOTHING",
            )
            .bind(&plan.attach)
            .bind(&reg.serial)
            .bind(reg.at)
            .execute(&mut *tx)
            .await
            .map_err(step("attaching policies"))?;
        }
        sqlx::query(
            "UPDATE certificates SET registered_at = $2 \
             WHERE serial = $1 AND registered_at IS NULL",
        )
        .bind(&reg.serial)
        .bind(reg.at)
        .execute(&mut *tx)
        .await
        .map_err(step("marking the certificate registered"))?;
        insert_events(&mut tx, &plan.events)
            .await
            .map_err(step("appending events"))?;
        tx.commit()
            .await
            .map_err(step("committing a registration"))?;
        Ok(RegistrationOutcome::Registered {
            policies: plan.attach,
        })
    }

    /// Runs `attempt` until it succeeds, fails for a reason other than a lost race, or
    /// has lost [`MAX_ATTEMPTS`] races.
    async fn retrying<'a, T, F, Fut>(&'a self, what: &str, attempt: F) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>> + 'a,
    {
        self.retrying_raw(what, attempt)
            .await
            .map_err(|(context, e)| self.err(context, e))
    }

    /// [`Self::retrying`], handing back the last error as it came.
    async fn retrying_raw<'a, T, F, Fut>(&'a self, what: &str, attempt: F) -> Result<T, StepError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>> + 'a,
    {
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err((_, e)) if is_retryable(&e) && n < MAX_ATTEMPTS => {
                    tracing::debug!(attempt = n, error = %e, "{what} lost a race; retrying");
                    tokio::time::sleep(Duration::from_millis(10 * n as u64)).await;
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Self::retrying`] for a transaction that inserts `certs`: a unique violation
    /// becomes [`RegistryError::DuplicateSerial`] naming the first of `certs` already
    /// recorded.
    async fn retrying_insert<'a, 'c, T, F, Fut>(
        &'a self,
        what: &str,
        certs: impl Iterator<Item = &'c NewCertificate> + Clone,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>> + 'a,
    {
        match self.retrying_raw(what, attempt).await {
            Ok(value) => Ok(value),
            Err((_, e)) if common::is_unique_violation(&e) => {
                let taken = self.taken_certs(certs.clone()).await?;
                Err(common::duplicate_among(certs, &taken, &e.to_string()))
            }
            Err((context, e)) => Err(self.err(context, e)),
        }
    }

    /// The serials and fingerprints of `certs` already in the database.
    async fn taken_certs<'c>(
        &self,
        certs: impl Iterator<Item = &'c NewCertificate> + Clone,
    ) -> Result<HashSet<String>, RegistryError> {
        Flows(self).taken(certs).await
    }

    /// One attempt at [`Registry::complete_rotations`] for `items` (distinct old
    /// serials). Lock order: the things, the old certificates (`FOR SHARE`, so their
    /// registration and policies cannot change underneath), then the rotations.
    async fn complete_attempt(
        &self,
        owner: &str,
        items: &[&PreparedReplacement],
    ) -> Result<HashSet<String>, StepError> {
        let olds: Vec<&str> = items.iter().map(|i| i.old_serial.as_str()).collect();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        sqlx::query(
            "SELECT t.name FROM things t WHERE t.name IN ( \
                SELECT r.thing_name FROM rotations r WHERE r.old_serial = ANY($1)) \
             ORDER BY t.name FOR KEY SHARE OF t",
        )
        .bind(&olds)
        .execute(&mut *tx)
        .await
        .map_err(step("locking things"))?;
        sqlx::query(
            "SELECT serial FROM certificates WHERE serial = ANY($1) ORDER BY serial FOR SHARE",
        )
        .bind(&olds)
        .execute(&mut *tx)
        .await
        .map_err(step("locking certificates"))?;
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT r.old_serial, c.thing_name, c.registered_at \
             FROM rotations r JOIN certificates c ON c.serial = r.old_serial \
             WHERE r.old_serial = ANY($1) AND r.state = 'due' AND r.lease_owner = $2 \
             ORDER BY r.old_serial FOR UPDATE OF r",
        )
        .bind(&olds)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await
        .map_err(step("locking rotations"))?;
        let held: HashMap<String, (String, Option<i64>)> = rows
            .into_iter()
            .map(|(old, thing, registered_at)| (old, (thing, registered_at)))
            .collect();
        let ours: Vec<(&PreparedReplacement, &str, Option<i64>)> = items
            .iter()
            .filter_map(|i| {
                held.get(&i.old_serial)
                    .map(|(thing, registered_at)| (*i, thing.as_str(), registered_at.map(|_| i.at)))
            })
            .collect();
        if ours.is_empty() {
            return Ok(HashSet::new());
        }

        let new = |f: fn(&NewCertificate) -> &str| -> Vec<&str> {
            ours.iter().map(|(i, _, _)| f(&i.new)).collect()
        };
        let old_serials: Vec<&str> = ours.iter().map(|(i, _, _)| i.old_serial.as_str()).collect();
        let new_serials = new(|c| &c.serial);
        let ats: Vec<i64> = ours.iter().map(|(i, _, _)| i.at).collect();
        sqlx::query(SQL_INSERT_REPLACEMENTS)
            .bind(&new_serials)
            .bind(new(|c| &c.fingerprint_sha256))
            .bind(new(|c| &c.public_key_sha256))
            .bind(ours.iter().map(|(_, thing, _)| *thing).collect::<Vec<_>>())
            .bind(new(|c| &c.issuer))
            .bind(new(|c| c.origin.as_str()))
            .bind(new(|c| &c.key_algorithm))
            .bind(
                ours.iter()
                    .map(|(i, _, _)| i.new.not_before)
                    .collect::<Vec<_>>(),
            )
            .bind(
                ours.iter()
                    .map(|(i, _, _)| i.new.not_after)
                    .collect::<Vec<_>>(),
            )
            .bind(&ats)
            .bind(
                ours.iter()
                    .map(|(i, _, _)| i.new.der.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ours.iter()
                    .map(|(i, _, _)| i.new.renew_at)
                    .collect::<Vec<_>>(),
            )
            .bind(&old_serials)
            .bind(vec![None::<i64>; ours.len()])
            .bind(ours.iter().map(|(_, _, r)| *r).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(step("recording replacement certificates"))?;
        sqlx::query(SQL_COPY_ATTACHMENTS)
            .bind(&old_serials)
            .bind(&new_serials)
            .bind(&ats)
            .execute(&mut *tx)
            .await
            .map_err(step("copying policy attachments"))?;
        sqlx::query(
            "UPDATE rotations r SET state = 'issued', new_serial = u.new, sealed_key = u.key, \
                lease_owner = NULL, lease_until = NULL, updated_at = u.at \
             FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::bigint[]) \
                AS u(old, new, key, at) \
             WHERE r.old_serial = u.old",
        )
        .bind(&old_serials)
        .bind(&new_serials)
        .bind(
            ours.iter()
                .map(|(i, _, _)| i.sealed_key.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(&ats)
        .execute(&mut *tx)
        .await
        .map_err(step("issuing rotations"))?;
        let mut events = Vec::with_capacity(ours.len() * 2);
        for (i, thing, _) in &ours {
            events.push(NewEvent {
                at: i.at,
                kind: EVENT_CERT_ISSUED,
                thing_name: Some((*thing).to_owned()),
                serial: Some(i.new.serial.clone()),
                detail: common::replacement_issued_detail(&i.new, &i.old_serial),
            });
            events.push(NewEvent {
                at: i.at,
                kind: EVENT_ROTATION_ISSUED,
                thing_name: Some((*thing).to_owned()),
                serial: Some(i.old_serial.clone()),
                detail: common::rotation_detail(&i.new.serial),
            });
        }
        insert_events(&mut tx, &events)
            .await
            .map_err(step("appending events"))?;
        tx.commit().await.map_err(step("committing replacements"))?;
        Ok(old_serials.into_iter().map(str::to_owned).collect())
    }

    /// One attempt at [`Registry::replace_certificate`]. Lock order: the thing, the
    /// authenticated certificate, its other replacements, its rotation.
    async fn replace_attempt(&self, rep: &Replacement) -> Result<ReplaceOutcome, StepError> {
        let new = &rep.new;
        let old = rep.authenticated_serial.as_str();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        sqlx::query("SELECT name FROM things WHERE name = $1 FOR KEY SHARE")
            .bind(&rep.thing_name)
            .execute(&mut *tx)
            .await
            .map_err(step("locking the thing"))?;
        let cert: Option<(String, String, Option<i64>, String)> = sqlx::query_as(
            "SELECT thing_name::text, status, registered_at, origin FROM certificates \
             WHERE serial = $1 FOR NO KEY UPDATE",
        )
        .bind(old)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("locking the certificate"))?;
        let (state, origin) = match cert {
            Some((thing_name, status, registered_at, origin)) => (
                Some(CertState {
                    thing_name,
                    status,
                    registered_at,
                }),
                origin,
            ),
            None => (None, String::new()),
        };
        if let Err(refused) = common::check_replacement(rep, state.as_ref()) {
            return Ok(refused);
        }
        let registered = state.is_some_and(|s| s.registered_at.is_some());
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE thing_name = $1 AND public_key_sha256 = $2 \
             ORDER BY serial LIMIT 1",
        )
        .bind(&rep.thing_name)
        .bind(&new.public_key_sha256)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("looking for the new key"))?;
        if let Some(holder) = holder {
            return Ok(common::key_reused(rep, &holder));
        }
        // Under the certificate's lock: concurrent replacements of it queue here.
        if rep.sealed_key.is_some() {
            let pending: Option<String> = sqlx::query_scalar(
                "SELECT r.new_serial::text FROM rotations r \
                 JOIN certificates n ON n.serial = r.new_serial \
                 WHERE r.old_serial = $1 AND r.state IN ('issued', 'delivered') \
                    AND r.sealed_key IS NOT NULL AND n.status = 'active'",
            )
            .bind(old)
            .fetch_optional(&mut *tx)
            .await
            .map_err(step("looking for a pending replacement"))?;
            if let Some(pending) = pending {
                return Ok(common::replacement_pending(rep, &pending));
            }
        }
        if let Some(max) = rep.max_replacements {
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM certificates WHERE replaces = $1")
                    .bind(old)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(step("counting replacements"))?;
            if count >= i64::from(max) {
                return Ok(common::replacement_limit(rep, count));
            }
        }

        sqlx::query(SQL_INSERT_REPLACEMENTS)
            .bind([new.serial.as_str()])
            .bind([new.fingerprint_sha256.as_str()])
            .bind([new.public_key_sha256.as_str()])
            .bind([rep.thing_name.as_str()])
            .bind([new.issuer.as_str()])
            .bind([new.origin.as_str()])
            .bind([new.key_algorithm.as_str()])
            .bind([new.not_before])
            .bind([new.not_after])
            .bind([rep.at])
            .bind([new.der.as_slice()])
            .bind([new.renew_at])
            .bind([old])
            .bind([Some(rep.at)])
            .bind([registered.then_some(rep.at)])
            .execute(&mut *tx)
            .await
            .map_err(step("recording the replacement certificate"))?;
        sqlx::query(SQL_COPY_ATTACHMENTS)
            .bind([old])
            .bind([new.serial.as_str()])
            .bind([rep.at])
            .execute(&mut *tx)
            .await
            .map_err(step("copying policy attachments"))?;
        let superseded = sqlx::query(
            "UPDATE certificates SET status = 'superseded' WHERE serial = $1 AND status = 'active'",
        )
        .bind(old)
        .execute(&mut *tx)
        .await
        .map_err(step("superseding the certificate"))?
        .rows_affected()
            > 0;
        let mut revoked: Vec<String> = sqlx::query_scalar(
            "UPDATE certificates SET status = 'revoked', revoked_at = $3, \
                revocation_reason = 'superseded' \
             WHERE replaces = $1 AND status = 'active' AND serial <> $2 RETURNING serial",
        )
        .bind(old)
        .bind(&new.serial)
        .bind(rep.at)
        .fetch_all(&mut *tx)
        .await
        .map_err(step("revoking unused replacements"))?;
        revoked.sort();
        sqlx::query(
            "INSERT INTO rotations (old_serial, thing_name, origin, state, due_at, new_serial, \
                updated_at, sealed_key) \
             VALUES ($1, $2, $3, 'delivered', $5, $4, $5, $6) \
             ON CONFLICT (old_serial) DO UPDATE SET state = 'delivered', \
                new_serial = EXCLUDED.new_serial, sealed_key = EXCLUDED.sealed_key, \
                lease_owner = NULL, lease_until = NULL, updated_at = EXCLUDED.updated_at",
        )
        .bind(old)
        .bind(&rep.thing_name)
        .bind(&origin)
        .bind(&new.serial)
        .bind(rep.at)
        .bind(rep.sealed_key.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(step("recording the rotation"))?;

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
            common::replacement_issued_detail(new, old),
        )];
        if superseded {
            events.push(event(
                EVENT_CERT_SUPERSEDED,
                old,
                common::superseded_detail(&new.serial),
            ));
        }
        for serial in &revoked {
            events.push(event(
                EVENT_CERT_REVOKED,
                serial,
                common::revoked_by_rotation_detail(&new.serial),
            ));
        }
        events.push(event(
            EVENT_ROTATION_DELIVERED,
            old,
            common::rotation_detail(&new.serial),
        ));
        insert_events(&mut tx, &events)
            .await
            .map_err(step("appending events"))?;
        tx.commit()
            .await
            .map_err(step("committing a replacement"))?;
        Ok(ReplaceOutcome::Replaced { revoked })
    }

    /// One attempt at [`Registry::take_replacement`]. Lock order: the thing, the old
    /// certificate, the new one, the rotation (re-checked under its lock).
    async fn take_attempt(
        &self,
        old: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, StepError> {
        let waiting: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT thing_name::text, new_serial FROM rotations \
             WHERE old_serial = $1 AND state = 'issued'",
        )
        .bind(old)
        .fetch_optional(&self.pool)
        .await
        .map_err(step("reading the rotation"))?;
        let Some((thing, Some(new))) = waiting else {
            return self.take_again(old).await;
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        sqlx::query("SELECT name FROM things WHERE name = $1 FOR KEY SHARE")
            .bind(&thing)
            .execute(&mut *tx)
            .await
            .map_err(step("locking the thing"))?;
        for serial in [old, new.as_str()] {
            sqlx::query("SELECT serial FROM certificates WHERE serial = $1 FOR NO KEY UPDATE")
                .bind(serial)
                .execute(&mut *tx)
                .await
                .map_err(step("locking certificates"))?;
        }
        let sealed_key: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT sealed_key FROM rotations \
             WHERE old_serial = $1 AND state = 'issued' AND new_serial = $2 \
                AND sealed_key IS NOT NULL \
             FOR UPDATE",
        )
        .bind(old)
        .bind(&new)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("locking the rotation"))?;
        let Some(sealed_key) = sealed_key else {
            // Delivered by a concurrent request meanwhile: hand out the same.
            drop(tx);
            return self.take_again(old).await;
        };
        // A replacement revoked meanwhile is not handed out.
        let row = sqlx::query(concat!(
            "UPDATE certificates SET delivered_at = $2 WHERE serial = $1 AND status = 'active'              RETURNING ",
            cert_columns!()
        ))
        .bind(&new)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("delivering the replacement"))?;
        let Some(row) = row else { return Ok(None) };
        let certificate = common::cert_from_row(&row).map_err(step("reading the replacement"))?;
        let superseded = sqlx::query(
            "UPDATE certificates SET status = 'superseded' WHERE serial = $1 AND status = 'active'",
        )
        .bind(old)
        .execute(&mut *tx)
        .await
        .map_err(step("superseding the certificate"))?
        .rows_affected()
            > 0;
        // The sealed key stays until the first use confirms the rotation.
        sqlx::query(
            "UPDATE rotations SET state = 'delivered', lease_owner = NULL, \
                lease_until = NULL, updated_at = $2 \
             WHERE old_serial = $1",
        )
        .bind(old)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(step("delivering the rotation"))?;
        let event = |kind: &'static str, serial: &str, detail: String| NewEvent {
            at,
            kind,
            thing_name: Some(certificate.thing_name.clone()),
            serial: Some(serial.to_owned()),
            detail,
        };
        let mut events = vec![event(EVENT_CERT_DELIVERED, &new, "{}".to_owned())];
        if superseded {
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
        insert_events(&mut tx, &events)
            .await
            .map_err(step("appending events"))?;
        tx.commit().await.map_err(step("committing a delivery"))?;
        Ok(Some(TakenReplacement {
            certificate,
            sealed_key,
            again: false,
        }))
    }

    /// A replacement of `old` handed out before and not used yet (rotation `delivered`
    /// with its sealed key, new certificate `active`): the same again, in one statement,
    /// nothing written.
    async fn take_again(&self, old: &str) -> Result<Option<TakenReplacement>, StepError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            cert_columns!(c),
            ", r.sealed_key FROM rotations r JOIN certificates c ON c.serial = r.new_serial \
             WHERE r.old_serial = $1 AND r.state = 'delivered' \
                AND r.sealed_key IS NOT NULL AND c.status = 'active'"
        ))
        .bind(old)
        .fetch_optional(&self.pool)
        .await
        .map_err(step("reading the replacement"))?;
        let Some(row) = row else { return Ok(None) };
        let sealed_key: Vec<u8> = sqlx::Row::try_get(&row, common::CERT_COLUMN_COUNT)
            .map_err(step("reading the replacement"))?;
        let certificate = common::cert_from_row(&row).map_err(step("reading the replacement"))?;
        Ok(Some(TakenReplacement {
            certificate,
            sealed_key,
            again: true,
        }))
    }

    /// One attempt at [`Registry::confirm_replacement`]: the conditional update of the
    /// replaced certificate locks it, so of concurrent confirmations one revokes it and
    /// the others (re-checking the updated row) find it revoked.
    async fn confirm_attempt(&self, serial: &str, at: i64) -> Result<Option<String>, StepError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        let revoked: Option<(String, String)> = sqlx::query_as(
            "UPDATE certificates o SET status = 'revoked', revoked_at = $2, \
                revocation_reason = 'superseded' \
             FROM certificates n \
             WHERE n.serial = $1 AND o.serial = n.replaces \
                AND n.status <> 'revoked' AND o.status <> 'revoked' \
             RETURNING o.serial::text, o.thing_name::text",
        )
        .bind(serial)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(step("revoking the replaced certificate"))?;
        let Some((old, thing)) = revoked else {
            return Ok(None);
        };
        let confirmed = sqlx::query(
            "UPDATE rotations SET state = 'confirmed', new_serial = $2, sealed_key = NULL, \
                lease_owner = NULL, lease_until = NULL, updated_at = $3 \
             WHERE old_serial = $1 AND state NOT IN ('confirmed', 'cancelled')",
        )
        .bind(&old)
        .bind(serial)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(step("confirming the rotation"))?
        .rows_affected()
            > 0;
        let event = |kind: &'static str, detail: String| NewEvent {
            at,
            kind,
            thing_name: Some(thing.clone()),
            serial: Some(old.clone()),
            detail,
        };
        let mut events = vec![event(
            EVENT_CERT_REVOKED,
            common::revoked_by_rotation_detail(serial),
        )];
        if confirmed {
            events.push(event(
                EVENT_ROTATION_CONFIRMED,
                common::rotation_detail(serial),
            ));
        }
        insert_events(&mut tx, &events)
            .await
            .map_err(step("appending events"))?;
        tx.commit()
            .await
            .map_err(step("committing a confirmation"))?;
        Ok(Some(old))
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if matches!(d.code().as_deref(), Some("40P01") | Some("40001")))
}

async fn migrate(conn: &mut PgConnection) -> Result<(), RegistryError> {
    // The migrator takes an advisory lock, so concurrent opens migrate one at a time.
    common::migrator(common::POSTGRES_MIGRATIONS, false)
        // `run_direct` rather than `run`: the latter makes this future not `Send`.
        .run_direct(None, conn, false)
        .await
        .map_err(migrate_error)
}

async fn insert_events(conn: &mut PgConnection, events: &[NewEvent]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO events (at, kind, thing_name, serial, detail) \
         SELECT u.at, u.kind, u.thing_name, u.serial, u.detail::jsonb \
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[]) \
            WITH ORDINALITY AS u(at, kind, thing_name, serial, detail, ord) \
         ORDER BY u.ord",
    )
    .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.thing_name.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        events
            .iter()
            .map(|e| e.serial.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

impl Dialect for PgRegistry {
    type Db = Postgres;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    const FOR_SHARE: &'static str = " FOR SHARE";
    const FOR_KEY_SHARE: &'static str = " FOR KEY SHARE";
    const FOR_NO_KEY_UPDATE: &'static str = " FOR NO KEY UPDATE";
    const SQL_DEVICE_STATE: &'static str = crate::connections::device_state_sql!(
        "COALESCE(CAST(json_agg(a.policy_name ORDER BY a.policy_name) AS TEXT), '[]')"
    );

    fn json_values(n: u8) -> String {
        format!("SELECT jsonb_array_elements_text(${n}::jsonb) AS value")
    }

    fn is_retryable(e: &sqlx::Error) -> bool {
        is_retryable(e)
    }

    async fn lock_for_transaction(conn: &mut PgConnection, key: i64) -> sqlx::Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(conn)
            .await
            .map(drop)
    }

    async fn probe_write(conn: &mut PgConnection) -> sqlx::Result<()> {
        // A transaction that gets an id must write and flush its commit record: a
        // read-only server (a standby) refuses it, a full WAL disk fails it.
        let _: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(conn)
            .await?;
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn url(&self) -> &str {
        &self.url
    }

    async fn begin_write_raw(&self) -> sqlx::Result<sqlx::Transaction<'static, Postgres>> {
        self.pool.begin().await
    }

    async fn insert_events(conn: &mut PgConnection, events: &[NewEvent]) -> sqlx::Result<()> {
        insert_events(conn, events).await
    }
}

#[async_trait]
impl Registry for PgRegistry {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn record_issued(
        &self,
        records: &[IssueRecord],
    ) -> Result<Vec<IssueOutcome>, RegistryError> {
        common::validate(records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 1;
        loop {
            match self.attempt(records).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(AttemptError::Other(e)) => return Err(e),
                Err(AttemptError::Unique(e)) => {
                    let taken = self.taken(records).await?;
                    return Err(common::duplicate_of(records, &taken, &e.to_string()));
                }
                Err(AttemptError::Retry(e)) => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(self.err("recording issued certificates", e));
                    }
                    tracing::debug!(attempt, error = %e, "group commit lost a race; retrying");
                    tokio::time::sleep(Duration::from_millis(10 * attempt as u64)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn mark_delivered(&self, serials: &[String], at: i64) -> Result<(), RegistryError> {
        let serials = common::dedup_in_order(serials);
        if serials.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.err("starting a transaction", e))?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE certificates SET delivered_at = $2 \
             WHERE delivered_at IS NULL AND serial = ANY($1) \
             RETURNING serial, thing_name",
        )
        .bind(&serials)
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
            let rows = sqlx::query(concat!(
                "SELECT ",
                cert_columns!(),
                " FROM certificates WHERE status = 'active' AND thing_name = ANY($1) \
                 ORDER BY thing_name, created_at, serial"
            ))
            .bind(chunk)
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
        self.retrying("a registration", || {
            self.register_attempt(registration, &requested)
        })
        .await
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
        let rows = sqlx::query(SQL_DUE[usize::from(expiring_before.is_some())])
            .bind(now)
            .bind(expiring_before)
            .bind(common::limit_value(limit))
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
        let sql = SQL_OPEN_DUE[usize::from(expiring_before.is_some())];
        let chunk = OPEN_CHUNK as i64;
        let mut opened = 0;
        // Keyset cursor over (renew_at, serial): each chunk starts after the last
        // certificate the previous one selected, so a large backlog costs one index
        // range scan in all. Certificates skipped because a writer held them locked are
        // behind the cursor: the next sweep opens them.
        let mut cursor = (i64::MIN, String::new());
        loop {
            let (selected, inserted, last_renew_at, last_serial): (
                i64,
                i64,
                Option<i64>,
                Option<String>,
            ) = self
                .retrying("opening rotations", || async {
                    sqlx::query_as(sql)
                        .bind(now)
                        .bind(expiring_before)
                        .bind(chunk)
                        .bind(EVENT_ROTATION_DUE)
                        .bind(cursor.0)
                        .bind(&cursor.1)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(step("opening rotations"))
                })
                .await?;
            opened += inserted as u64;
            match (last_renew_at, last_serial) {
                (Some(renew_at), Some(serial)) if selected == chunk => cursor = (renew_at, serial),
                // Fewer than a chunk: nothing more is due after the cursor.
                _ => return Ok(opened),
            }
        }
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
        let rows = self
            .retrying("claiming rotations", || async {
                sqlx::query(SQL_CLAIM)
                    .bind(owner)
                    .bind(now)
                    .bind(lease_secs)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(step("claiming rotations"))
            })
            .await?;
        rows.iter()
            .map(|row| {
                use sqlx::Row;
                Ok(RotationClaim {
                    old: common::cert_from_row(row)?,
                    template: row.try_get(common::CERT_COLUMN_COUNT)?,
                })
            })
            .collect::<sqlx::Result<_>>()
            .map_err(|e| self.err("reading claimed rotations", e))
    }

    async fn complete_rotations(
        &self,
        owner: &str,
        items: &[PreparedReplacement],
    ) -> Result<Vec<bool>, RegistryError> {
        common::validate_new(items.iter().map(|i| &i.new))?;
        // One item per rotation: a later item for the same old certificate finds it
        // issued already.
        let mut seen = HashSet::with_capacity(items.len());
        let distinct: Vec<&PreparedReplacement> = items
            .iter()
            .filter(|i| seen.insert(i.old_serial.as_str()))
            .collect();
        if distinct.is_empty() {
            return Ok(Vec::new());
        }
        let done = self
            .retrying_insert(
                "completing rotations",
                distinct.iter().map(|i| &i.new),
                || self.complete_attempt(owner, &distinct),
            )
            .await?;
        let mut claimed = HashSet::with_capacity(done.len());
        Ok(items
            .iter()
            .map(|i| done.contains(&i.old_serial) && claimed.insert(i.old_serial.as_str()))
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
        self.retrying("recording a failed rotation", || async {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(step("starting a transaction"))?;
            let row: Option<(String, i32, String)> = sqlx::query_as(
                "UPDATE rotations SET attempts = attempts + 1, last_error = $3, \
                    lease_owner = NULL, lease_until = NULL, updated_at = $4, \
                    state = CASE WHEN attempts + 1 >= $5::bigint THEN 'failed' ELSE state END \
                 WHERE old_serial = $2 AND lease_owner = $1 AND state = 'due' \
                 RETURNING thing_name::text, attempts, state",
            )
            .bind(owner)
            .bind(old_serial)
            .bind(error)
            .bind(at)
            .bind(i64::from(max_attempts))
            .fetch_optional(&mut *tx)
            .await
            .map_err(step("recording a failed rotation"))?;
            let Some((thing, attempts, state)) = row else {
                return Ok(false);
            };
            let event = NewEvent {
                at,
                kind: EVENT_ROTATION_FAILED,
                thing_name: Some(thing),
                serial: Some(old_serial.to_owned()),
                detail: common::rotation_failed_detail(error, i64::from(attempts), &state),
            };
            insert_events(&mut tx, std::slice::from_ref(&event))
                .await
                .map_err(step("appending events"))?;
            tx.commit()
                .await
                .map_err(step("committing a failed rotation"))?;
            Ok(true)
        })
        .await
    }

    async fn replace_certificate(
        &self,
        replacement: &Replacement,
    ) -> Result<ReplaceOutcome, RegistryError> {
        self.retrying_insert("a replacement", std::iter::once(&replacement.new), || {
            self.replace_attempt(replacement)
        })
        .await
    }

    async fn take_replacement(
        &self,
        old_serial: &str,
        at: i64,
    ) -> Result<Option<TakenReplacement>, RegistryError> {
        self.retrying("a delivery", || self.take_attempt(old_serial, at))
            .await
    }

    async fn confirm_replacement(
        &self,
        serial: &str,
        at: i64,
    ) -> Result<Option<String>, RegistryError> {
        self.retrying("a confirmation", || self.confirm_attempt(serial, at))
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
        let row = sqlx::query_as(common::POSTGRES_ROTATION_BACKLOG)
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
    //! PostgreSQL-only checks (`#[ignore]`d: they need `FLEETCERT_TEST_POSTGRES_URL`, e.g.
    //! via `scripts/with-postgres.sh`). The behaviour shared with SQLite is covered by
    //! `tests/stories.rs`.
    use super::*;
    use crate::{CertOrigin, IssueOutcome, RevocationTarget, RotationState};
    use sqlx::AssertSqlSafe;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const AT: i64 = 1_700_000_000;
    const NOW: i64 = AT + 200 * 86_400;
    const THINGS: usize = 120;

    fn cert(origin: CertOrigin, renew_at: i64) -> NewCertificate {
        static N: AtomicU64 = AtomicU64::new(1);
        let n = N.fetch_add(1, Ordering::Relaxed);
        NewCertificate {
            serial: format!("{n:032x}"),
            fingerprint_sha256: format!("{n:064x}"),
            public_key_sha256: format!("k{n:063x}"),
            issuer: "CN=test CA".to_owned(),
            not_before: AT,
            not_after: AT + 400 * 86_400,
            origin,
            key_algorithm: "ecdsa-p256".to_owned(),
            renew_at,
            der: vec![0x30; 64],
        }
    }

    fn thing(i: usize) -> String {
        format!("mix-{i:03}")
    }

    async fn count(reg: &PgRegistry, sql: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
            .fetch_one(&reg.pool)
            .await
            .unwrap()
    }

    /// Every writer of the rotation life cycle at once on the same things — workers
    /// claiming and completing, devices fetching and confirming, EST replacements,
    /// revocations by serial and by thing, forced re-issues — then the invariants that
    /// tie certificates, rotations and events together, and no deadlock (the lock order
    /// described at the top of this file).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL: set FLEETCERT_TEST_POSTGRES_URL (scripts/with-postgres.sh)"]
    async fn mixed_rotation_writers_keep_invariants_without_deadlocks() {
        let admin = std::env::var("FLEETCERT_TEST_POSTGRES_URL")
            .expect("FLEETCERT_TEST_POSTGRES_URL is not set");
        let url = crate::testing::create_postgres_database(&admin)
            .await
            .unwrap();
        let reg = Arc::new(PgRegistry::open(&url).await.unwrap());

        let records: Vec<IssueRecord> = (0..THINGS)
            .map(|i| IssueRecord {
                thing_name: thing(i),
                template: Some("default".to_owned()),
                certificate: cert(CertOrigin::Generated, AT + 1),
                expected_active: Vec::new(),
                supersede_expected: false,
                revoke_expected: false,
                at: AT,
            })
            .collect();
        reg.record_issued(&records).await.unwrap();
        let olds: Vec<String> = records
            .iter()
            .map(|r| r.certificate.serial.clone())
            .collect();
        reg.mark_delivered(&olds, AT + 1).await.unwrap();
        let (a, b) = tokio::join!(
            reg.open_due_rotations(NOW, None),
            reg.open_due_rotations(NOW, None)
        );
        assert_eq!(a.unwrap() + b.unwrap(), THINGS as u64);

        let issued = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for owner in ["w1", "w2"] {
            let (reg, issued) = (reg.clone(), issued.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let claims = reg.claim_rotations(owner, NOW, 300, 8).await.unwrap();
                    if claims.is_empty() {
                        break;
                    }
                    let items: Vec<PreparedReplacement> = claims
                        .iter()
                        .map(|c| PreparedReplacement {
                            old_serial: c.old.serial.clone(),
                            new: cert(CertOrigin::Generated, NOW + 100 * 86_400),
                            sealed_key: b"sealed".to_vec(),
                            at: NOW + 1,
                        })
                        .collect();
                    let done = reg.complete_rotations(owner, &items).await.unwrap();
                    let n = done.iter().filter(|d| **d).count() as u64;
                    issued.fetch_add(n, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }));
        }
        {
            // Devices fetching pre-issued replacements and using them.
            let (reg, olds) = (reg.clone(), olds.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..20 {
                    for old in olds.iter().step_by(2) {
                        if let Some(t) = reg.take_replacement(old, NOW + 2).await.unwrap() {
                            reg.confirm_replacement(&t.certificate.serial, NOW + 3)
                                .await
                                .unwrap();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5 * round)).await;
                }
            }));
        }
        {
            // EST re-enrollment.
            let (reg, olds) = (reg.clone(), olds.clone());
            tasks.push(tokio::spawn(async move {
                for (i, old) in olds.iter().enumerate().step_by(5) {
                    let rep = Replacement {
                        authenticated_serial: old.clone(),
                        thing_name: thing(i),
                        new: cert(CertOrigin::Csr, NOW + 100 * 86_400),
                        sealed_key: None,
                        max_replacements: None,
                        at: NOW + 2,
                    };
                    match reg.replace_certificate(&rep).await.unwrap() {
                        ReplaceOutcome::Replaced { .. } => {
                            reg.confirm_replacement(&rep.new.serial, NOW + 3)
                                .await
                                .unwrap();
                        }
                        ReplaceOutcome::Refused { code, reason } => {
                            assert_eq!(code, "certificate_revoked", "{reason}")
                        }
                    }
                }
            }));
        }
        {
            // Operators revoking.
            let (reg, olds) = (reg.clone(), olds.clone());
            tasks.push(tokio::spawn(async move {
                for i in (0..THINGS).step_by(7) {
                    reg.revoke(&Revocation {
                        target: RevocationTarget::Thing(thing(i)),
                        reason: "cessationOfOperation".to_owned(),
                        at: NOW + 4,
                    })
                    .await
                    .unwrap();
                    let j = (i + 3) % THINGS;
                    reg.revoke(&Revocation {
                        target: RevocationTarget::Serial(olds[j].clone()),
                        reason: "keyCompromise".to_owned(),
                        at: NOW + 4,
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        {
            // Forced re-issues (supersede whatever is active).
            let reg = reg.clone();
            tasks.push(tokio::spawn(async move {
                for i in (1..THINGS).step_by(11) {
                    for _ in 0..10 {
                        let name = thing(i);
                        let active = reg
                            .active_certificates(std::slice::from_ref(&name))
                            .await
                            .unwrap();
                        let expected: Vec<String> = active
                            .get(&name)
                            .map(|cs| cs.iter().map(|c| c.serial.clone()).collect())
                            .unwrap_or_default();
                        let record = IssueRecord {
                            thing_name: name,
                            template: Some("default".to_owned()),
                            certificate: cert(CertOrigin::Generated, NOW + 100 * 86_400),
                            supersede_expected: !expected.is_empty(),
                            expected_active: expected,
                            revoke_expected: false,
                            at: NOW + 5,
                        };
                        match reg.record_issued(&[record]).await.unwrap()[0] {
                            IssueOutcome::Committed { .. } => break,
                            IssueOutcome::Conflict { .. } => continue,
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        // Open rotations belong to certificates that are not revoked.
        assert_eq!(
            count(
                &reg,
                "SELECT count(*) FROM rotations r JOIN certificates c ON c.serial = r.old_serial \
                 WHERE r.state IN ('due', 'issued', 'delivered') AND c.status = 'revoked'"
            )
            .await,
            0
        );
        // A sealed key exactly while a replacement waits to be fetched.
        assert_eq!(
            count(
                &reg,
                "SELECT count(*) FROM rotations \
                 WHERE (sealed_key IS NOT NULL) <> (state = 'issued')"
            )
            .await,
            0
        );
        // A rotation's new certificate replaces its old one.
        assert_eq!(
            count(
                &reg,
                "SELECT count(*) FROM rotations r \
                 LEFT JOIN certificates n ON n.serial = r.new_serial \
                 WHERE r.state IN ('issued', 'delivered', 'confirmed') \
                    AND (n.serial IS NULL OR n.replaces IS DISTINCT FROM r.old_serial)"
            )
            .await,
            0
        );
        // One event per transition.
        let opened_now = format!("SELECT count(*) FROM rotations WHERE due_at = {NOW}");
        for (events, rows) in [
            (
                "SELECT count(*) FROM events WHERE kind = 'certificate.revoked'",
                "SELECT count(*) FROM certificates WHERE status = 'revoked'",
            ),
            (
                "SELECT count(*) FROM events WHERE kind = 'rotation.cancelled'",
                "SELECT count(*) FROM rotations WHERE state = 'cancelled'",
            ),
            (
                "SELECT count(*) FROM events WHERE kind = 'rotation.confirmed'",
                "SELECT count(*) FROM rotations WHERE state = 'confirmed'",
            ),
            (
                "SELECT count(*) FROM events WHERE kind = 'rotation.due'",
                opened_now.as_str(),
            ),
        ] {
            assert_eq!(
                count(&reg, events).await,
                count(&reg, rows).await,
                "{events}"
            );
        }
        assert_eq!(
            count(
                &reg,
                "SELECT count(*) FROM events WHERE kind = 'rotation.issued'"
            )
            .await,
            issued.load(Ordering::Relaxed) as i64
        );
        let states = reg
            .list_rotations(&RotationFilter::default())
            .await
            .unwrap();
        assert_eq!(states.len(), THINGS);
        assert!(
            states.iter().any(|r| r.state == RotationState::Confirmed),
            "{states:?}"
        );
        assert!(
            states.iter().any(|r| r.state == RotationState::Cancelled),
            "{states:?}"
        );

        // PostgreSQL counts the deadlocks it broke (flushed when the sessions end).
        reg.pool.close().await;
        let mut conn = PgConnectOptions::from_str(&url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let deadlocks: i64 = sqlx::query_scalar(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(deadlocks, 0, "the lock order was violated somewhere");
        let _ = conn.close().await;
        crate::testing::drop_postgres_database(&admin, &url)
            .await
            .unwrap();
    }
}
