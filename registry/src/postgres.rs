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
//! Connection flushes serialise on an advisory lock, so pruning is exact. Registrations
//! and flushes that lose a deadlock or serialisation race are retried.

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
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// How long connecting (and waiting for a pooled connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of a group commit (or registration, or connection flush) that lost a
/// deadlock or serialisation race.
const MAX_ATTEMPTS: usize = 5;

/// The advisory lock that serialises connection flushes, so that pruning to the newest
/// [`MAX_CONNECTIONS_PER_CERTIFICATE`] is exact ("fleetcon").
const CONNECTIONS_LOCK: i64 = 0x666c_6565_7463_6f6e;

/// The thing columns, in the order [`common::thing_from_row`] reads them (JSON as text).
macro_rules! thing_columns {
    () => {
        "name, template, created_at, updated_at, thing_type, attributes::text, groups::text, \
         billing_group, version"
    };
}

/// A certificate, its thing and its attached policies (sorted) by fingerprint: the hot
/// path of every returning connection.
const SQL_DEVICE_STATE: &str = concat!(
    "SELECT ",
    cert_columns!(c),
    ", t.name, t.template, t.created_at, t.updated_at, t.thing_type, t.attributes::text, \
       t.groups::text, t.billing_group, t.version, \
       ARRAY(SELECT a.policy_name::text FROM policy_attachments a \
             WHERE a.serial = c.serial ORDER BY a.policy_name) \
     FROM certificates c JOIN things t ON t.name = c.thing_name \
     WHERE c.fingerprint_sha256 = $1"
);

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
            .connect_lazy_with(options);
        Ok(PgRegistry {
            pool,
            url: redacted,
        })
    }

    fn err(&self, context: &str, e: sqlx::Error) -> RegistryError {
        db_error(&self.url, context, e)
    }

    /// The serials and fingerprints of `records` already in the database.
    async fn taken(&self, records: &[IssueRecord]) -> Result<HashSet<String>, RegistryError> {
        let serials: Vec<&str> = records
            .iter()
            .map(|r| r.certificate.serial.as_str())
            .collect();
        let fingerprints: Vec<&str> = records
            .iter()
            .map(|r| r.certificate.fingerprint_sha256.as_str())
            .collect();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT serial, fingerprint_sha256 FROM certificates \
             WHERE serial = ANY($1) OR fingerprint_sha256 = ANY($2)",
        )
        .bind(serials)
        .bind(fingerprints)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("looking up duplicate serials", e))?;
        Ok(rows.into_iter().flat_map(|(s, f)| [s, f]).collect())
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

    fn policies(&self, rows: &[PgRow]) -> Result<Vec<PolicyRecord>, RegistryError> {
        rows.iter()
            .map(common::policy_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading policies", e))
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

    /// One attempt at [`Registry::record_connections`].
    async fn connections_attempt(
        &self,
        keep: &[&ConnectionRecord],
        fingerprints: &[&str],
    ) -> Result<(), StepError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(step("starting a transaction"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CONNECTIONS_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(step("locking connections"))?;
        sqlx::query(
            "INSERT INTO connections (fingerprint_sha256, thing_name, client_addr, at) \
             SELECT u.fp, u.thing, u.addr, u.at \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) \
                WITH ORDINALITY AS u(fp, thing, addr, at, ord) \
             ORDER BY u.ord",
        )
        .bind(
            keep.iter()
                .map(|c| c.fingerprint_sha256.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            keep.iter()
                .map(|c| c.thing_name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            keep.iter()
                .map(|c| c.client_addr.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(keep.iter().map(|c| c.at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(step("recording connections"))?;
        sqlx::query(
            "DELETE FROM connections c USING ( \
                SELECT f.fp, (SELECT k.id FROM connections k WHERE k.fingerprint_sha256 = f.fp \
                              ORDER BY k.id DESC OFFSET $2 LIMIT 1) AS cutoff \
                FROM UNNEST($1::text[]) AS f(fp)) AS t \
             WHERE c.fingerprint_sha256 = t.fp AND c.id < t.cutoff",
        )
        .bind(fingerprints)
        .bind(MAX_CONNECTIONS_PER_CERTIFICATE as i64 - 1)
        .execute(&mut *tx)
        .await
        .map_err(step("pruning connections"))?;
        tx.commit().await.map_err(step("committing connections"))
    }

    /// Runs `attempt` until it succeeds, fails for a reason other than a lost race, or
    /// has lost [`MAX_ATTEMPTS`] races.
    async fn retrying<'a, T, F, Fut>(&'a self, what: &str, attempt: F) -> Result<T, RegistryError>
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
                Err((context, e)) => return Err(self.err(context, e)),
            }
        }
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

/// A bind value of a dynamically assembled query.
enum Bind {
    Text(String),
    Int(i64),
}

/// Assembles `base` + ` WHERE` conditions (each with one `$n` placeholder written as
/// `{}`) + `tail` + a `LIMIT`, and binds the values.
fn assemble(
    base: &str,
    conditions: Vec<(&str, Bind)>,
    tail: &str,
    limit: Option<u32>,
) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    let mut sql = String::from(base);
    let mut binds = Vec::new();
    for (i, (condition, bind)) in conditions.into_iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        sql.push_str(&condition.replace("{}", &format!("${}", i + 1)));
        binds.push(bind);
    }
    sql.push(' ');
    sql.push_str(tail);
    sql.push_str(&format!(" LIMIT ${}", binds.len() + 1));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
        };
    }
    // LIMIT NULL: no limit.
    q.bind(common::limit_value(limit))
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
        let row = sqlx::query(concat!(
            "SELECT ",
            thing_columns!(),
            " FROM things WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err("reading a thing", e))?;
        row.as_ref()
            .map(common::thing_from_row)
            .transpose()
            .map_err(|e| self.err("reading a thing", e))
    }

    async fn list_things(&self, filter: &ThingFilter) -> Result<Vec<ThingRecord>, RegistryError> {
        let mut conditions = Vec::new();
        if let Some(after) = &filter.after {
            conditions.push(("name > {}", Bind::Text(after.clone())));
        }
        let rows = assemble(
            concat!("SELECT ", thing_columns!(), " FROM things"),
            conditions,
            "ORDER BY name",
            filter.limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("listing things", e))?;
        rows.iter()
            .map(common::thing_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("reading things", e))
    }

    async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            cert_columns!(),
            " FROM certificates WHERE serial = $1"
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
        let mut conditions = Vec::new();
        if let Some(thing) = &filter.thing_name {
            conditions.push(("thing_name = {}", Bind::Text(thing.clone())));
        }
        if let Some(status) = filter.status {
            conditions.push(("status = {}", Bind::Text(status.as_str().to_owned())));
        }
        if let Some(before) = filter.expires_before {
            conditions.push(("not_after <= {}", Bind::Int(before)));
        }
        let rows = assemble(
            concat!("SELECT ", cert_columns!(), " FROM certificates"),
            conditions,
            "ORDER BY thing_name, created_at, serial",
            filter.limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("listing certificates", e))?;
        self.certs(&rows)
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>, RegistryError> {
        let mut conditions = Vec::new();
        if let Some(thing) = &filter.thing_name {
            conditions.push(("thing_name = {}", Bind::Text(thing.clone())));
        }
        if let Some(serial) = &filter.serial {
            conditions.push(("serial = {}", Bind::Text(serial.clone())));
        }
        let rows = assemble(
            "SELECT id, at, kind, thing_name, serial, detail::text FROM events",
            conditions,
            "ORDER BY id",
            filter.limit,
        )
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
        // One repeatable-read snapshot, so the three numbers agree with each other.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
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
        self.retrying("a registration", || {
            self.register_attempt(registration, &requested)
        })
        .await
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
        let decode = |row: &PgRow| -> sqlx::Result<DeviceState> {
            use sqlx::Row;
            Ok(DeviceState {
                certificate: common::cert_from_row(row)?,
                thing: common::thing_from_row_at(row, common::CERT_COLUMN_COUNT)?,
                policies: row.try_get(common::CERT_COLUMN_COUNT + 9)?,
                rotation: None,
                confirms_rotation: false,
            })
        };
        decode(&row)
            .map(Some)
            .map_err(|e| self.err("reading a device", e))
    }

    async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT name, document::text, created_at, updated_at FROM policies WHERE name = $1",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("reading a policy", e))?;
        Ok(self.policies(&rows)?.pop())
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT name, document::text, created_at, updated_at FROM policies ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("listing policies", e))?;
        self.policies(&rows)
    }

    async fn policies_of_thing(
        &self,
        thing_name: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT name, document::text, created_at, updated_at FROM policies \
             WHERE name IN ( \
                SELECT a.policy_name FROM certificates c \
                JOIN policy_attachments a ON a.serial = c.serial \
                WHERE c.thing_name = $1 AND c.status = 'active') \
             ORDER BY name",
        )
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
        self.retrying("a connection flush", || {
            self.connections_attempt(&keep, &fingerprints)
        })
        .await
    }

    async fn recent_connections(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Vec<ConnectionRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT fingerprint_sha256, thing_name, client_addr, at FROM connections \
             WHERE fingerprint_sha256 = $1 ORDER BY id DESC LIMIT $2",
        )
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
        sqlx::query_scalar(
            "SELECT serial FROM certificates \
             WHERE status = 'revoked' AND not_after >= $1 ORDER BY serial",
        )
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
