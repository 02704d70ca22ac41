//! The PostgreSQL registry.
//!
//! Group commits run in one ordinary (read committed) transaction. Concurrency safety
//! of the read-check-write: the slice's things are inserted (`ON CONFLICT DO NOTHING`,
//! which waits for a concurrent inserter of the same name) and then locked
//! (`SELECT … FOR UPDATE`, in name order) before their active certificates are read, so
//! two runs on the same thing serialise and the second sees the first's certificate.
//! Rows travel as arrays (`UNNEST`), so a slice costs a fixed handful of statements.

use crate::common::{
    self, EVENT_CERT_DELIVERED, NAME_CHUNK, NewEvent, cert_columns, db_error, migrate_error,
};
use crate::{
    CertificateFilter, CertificateRecord, EventFilter, EventRecord, IssueOutcome, IssueRecord,
    Registry, RegistryCounts, RegistryError, ThingFilter, ThingRecord,
};
use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

/// How long connecting (and waiting for a pooled connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of a group commit that lost a deadlock or serialisation race.
const MAX_ATTEMPTS: usize = 5;

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
                    updated_at = u.updated_at \
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
                    created_at, der) \
                 SELECT u.serial, u.fp, u.pk, u.thing, u.issuer, 'active', u.origin, u.alg, \
                    u.nb, u.na, u.at, u.der \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                    $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], \
                    $11::bytea[]) \
                    AS u(serial, fp, pk, thing, issuer, origin, alg, nb, na, at, der)",
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
        let row = sqlx::query(
            "SELECT name, template, created_at, updated_at FROM things WHERE name = $1",
        )
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
            "SELECT name, template, created_at, updated_at FROM things",
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
}
