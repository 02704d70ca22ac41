//! Backend-independent pieces: the embedded migrations, validation and in-memory
//! planning of a group commit, row decoding and error mapping.

use crate::{
    CertStatus, CertificateRecord, EventRecord, IssueOutcome, IssueRecord, RegistryError,
    ThingRecord,
};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{ColumnIndex, Decode, Row, SqlSafeStr, Type};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

pub(crate) const EVENT_THING_CREATED: &str = "thing.created";
pub(crate) const EVENT_CERT_ISSUED: &str = "certificate.issued";
pub(crate) const EVENT_CERT_SUPERSEDED: &str = "certificate.superseded";
pub(crate) const EVENT_CERT_REVOKED: &str = "certificate.revoked";
pub(crate) const EVENT_CERT_DELIVERED: &str = "certificate.delivered";

/// How many names one `active_certificates` query carries.
pub(crate) const NAME_CHUNK: usize = 10_000;

/// One migration file, embedded at compile time.
pub(crate) struct EmbeddedMigration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// `migrations/sqlite/NNNN_description.sql`, in order. A unit test checks that this list
/// matches the directory, so a new file cannot be forgotten.
pub(crate) const SQLITE_MIGRATIONS: &[EmbeddedMigration] = &[EmbeddedMigration {
    version: 1,
    description: "initial",
    sql: include_str!("../../migrations/sqlite/0001_initial.sql"),
}];

/// `migrations/postgres/NNNN_description.sql`, in order (same check as above).
pub(crate) const POSTGRES_MIGRATIONS: &[EmbeddedMigration] = &[EmbeddedMigration {
    version: 1,
    description: "initial",
    sql: include_str!("../../migrations/postgres/0001_initial.sql"),
}];

/// A migrator over `set`. `no_tx`: the caller wraps the whole run in its own
/// transaction (SQLite, so that it can be `BEGIN IMMEDIATE`).
pub(crate) fn migrator(set: &[EmbeddedMigration], no_tx: bool) -> Migrator {
    Migrator::with_migrations(
        set.iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    Cow::Borrowed(m.description),
                    MigrationType::Simple,
                    m.sql.into_sql_str(),
                    no_tx,
                )
            })
            .collect(),
    )
}

/// An event to append.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub at: i64,
    pub kind: &'static str,
    pub thing_name: Option<String>,
    pub serial: Option<String>,
    /// JSON object, as text.
    pub detail: String,
}

/// A thing to create or whose template to update, in its final state for this commit.
#[derive(Debug, Clone)]
pub(crate) struct ThingWrite<'a> {
    pub name: &'a str,
    pub template: Option<&'a str>,
    pub created_at: i64,
    pub updated_at: i64,
    /// True if the thing did not exist before this commit.
    pub new: bool,
}

/// Everything one group commit writes, worked out in memory from what the database
/// holds (read inside the transaction, after locking).
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    pub outcomes: Vec<IssueOutcome>,
    /// One entry per thing created or updated, in first-touch order.
    pub things: Vec<ThingWrite<'a>>,
    /// Certificates to insert as `active`, in record order.
    pub certificates: Vec<&'a IssueRecord>,
    /// Serials that become `superseded`.
    pub superseded: Vec<&'a str>,
    /// Serials that become `revoked` (reason `superseded`), with the revocation time.
    pub revoked: Vec<(&'a str, i64)>,
    /// Events, in the order they happened.
    pub events: Vec<NewEvent>,
}

/// Checks what can be checked without the database: no serial or fingerprint twice in
/// the slice, and no record asking to both supersede and revoke.
pub(crate) fn validate(records: &[IssueRecord]) -> Result<(), RegistryError> {
    let mut serials = HashSet::with_capacity(records.len());
    let mut fingerprints = HashSet::with_capacity(records.len());
    for r in records {
        let c = &r.certificate;
        if !serials.insert(c.serial.as_str()) || !fingerprints.insert(c.fingerprint_sha256.as_str())
        {
            return Err(RegistryError::DuplicateSerial(c.serial.clone()));
        }
        if r.supersede_expected && r.revoke_expected {
            return Err(RegistryError::InvalidValue(format!(
                "certificate {} for thing {:?}: supersede_expected and revoke_expected are both set",
                c.serial, r.thing_name
            )));
        }
    }
    Ok(())
}

/// The distinct thing names of a slice, sorted (a fixed lock order for PostgreSQL).
pub(crate) fn distinct_names(records: &[IssueRecord]) -> Vec<&str> {
    let set: BTreeSet<&str> = records.iter().map(|r| r.thing_name.as_str()).collect();
    set.into_iter().collect()
}

/// Works out a group commit. `existing`: things that exist in the database;
/// `active`: their active serials (things with none may be absent).
pub(crate) fn plan<'a>(
    records: &'a [IssueRecord],
    existing: &HashSet<String>,
    mut active: HashMap<String, BTreeSet<String>>,
) -> Plan<'a> {
    let mut plan = Plan {
        outcomes: Vec::with_capacity(records.len()),
        certificates: Vec::with_capacity(records.len()),
        events: Vec::with_capacity(records.len() * 2),
        ..Plan::default()
    };
    // Index into plan.things by name.
    let mut touched: HashMap<&'a str, usize> = HashMap::new();

    for r in records {
        let name = r.thing_name.as_str();
        let cert = &r.certificate;
        let current = active.entry(r.thing_name.clone()).or_default();
        let expected: BTreeSet<&str> = r.expected_active.iter().map(String::as_str).collect();
        if !current
            .iter()
            .map(String::as_str)
            .eq(expected.iter().copied())
        {
            plan.outcomes.push(IssueOutcome::Conflict {
                current_active: current.iter().cloned().collect(),
            });
            continue;
        }

        let thing_created = !existing.contains(name) && !touched.contains_key(name);
        if thing_created {
            touched.insert(name, plan.things.len());
            plan.things.push(ThingWrite {
                name,
                template: r.template.as_deref(),
                created_at: r.at,
                updated_at: r.at,
                new: true,
            });
            plan.events.push(NewEvent {
                at: r.at,
                kind: EVENT_THING_CREATED,
                thing_name: Some(r.thing_name.clone()),
                serial: None,
                detail: serde_json::json!({ "template": r.template }).to_string(),
            });
        } else if let Some(template) = r.template.as_deref() {
            match touched.get(name) {
                Some(&i) => {
                    plan.things[i].template = Some(template);
                    plan.things[i].updated_at = r.at;
                }
                None => {
                    touched.insert(name, plan.things.len());
                    plan.things.push(ThingWrite {
                        name,
                        template: Some(template),
                        created_at: r.at,
                        updated_at: r.at,
                        new: false,
                    });
                }
            }
        }

        plan.certificates.push(r);
        plan.events.push(NewEvent {
            at: r.at,
            kind: EVENT_CERT_ISSUED,
            thing_name: Some(r.thing_name.clone()),
            serial: Some(cert.serial.clone()),
            detail: serde_json::json!({
                "origin": cert.origin.as_str(),
                "key_algorithm": cert.key_algorithm,
                "not_before": cert.not_before,
                "not_after": cert.not_after,
                "fingerprint_sha256": cert.fingerprint_sha256,
                "issuer": cert.issuer,
            })
            .to_string(),
        });

        if r.revoke_expected || r.supersede_expected {
            for &old in &expected {
                let (kind, detail) = if r.revoke_expected {
                    plan.revoked.push((old, r.at));
                    (
                        EVENT_CERT_REVOKED,
                        serde_json::json!({ "reason": "superseded", "replaced_by": cert.serial }),
                    )
                } else {
                    plan.superseded.push(old);
                    (
                        EVENT_CERT_SUPERSEDED,
                        serde_json::json!({ "replaced_by": cert.serial }),
                    )
                };
                plan.events.push(NewEvent {
                    at: r.at,
                    kind,
                    thing_name: Some(r.thing_name.clone()),
                    serial: Some(old.to_owned()),
                    detail: detail.to_string(),
                });
            }
            current.clear();
        }
        current.insert(cert.serial.clone());
        plan.outcomes
            .push(IssueOutcome::Committed { thing_created });
    }
    plan
}

/// After a unique violation: the first record of the slice whose serial or fingerprint
/// is among `taken` (serials and fingerprints found in the database).
pub(crate) fn duplicate_of(
    records: &[IssueRecord],
    taken: &HashSet<String>,
    fallback: &str,
) -> RegistryError {
    let serial = records
        .iter()
        .map(|r| &r.certificate)
        .find(|c| taken.contains(&c.serial) || taken.contains(&c.fingerprint_sha256))
        .map(|c| c.serial.clone())
        .unwrap_or_else(|| fallback.to_owned());
    RegistryError::DuplicateSerial(serial)
}

/// True for an error that says the database could not be reached (rather than that it
/// refused a statement).
fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Maps a sqlx error met while doing `context`.
pub(crate) fn db_error(url: &str, context: &str, e: sqlx::Error) -> RegistryError {
    if is_connection_error(&e) {
        RegistryError::Unreachable {
            url: url.to_owned(),
            reason: format!("{context}: {e}"),
        }
    } else {
        RegistryError::Database(format!("{context}: {e}"))
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError) -> RegistryError {
    RegistryError::Migration(e.to_string())
}

/// `None` → no limit.
pub(crate) fn limit_value(limit: Option<u32>) -> Option<i64> {
    limit.map(i64::from)
}

/// The certificate columns, in the order [`cert_from_row`] reads them (`der` last).
macro_rules! cert_columns {
    () => {
        "serial, fingerprint_sha256, public_key_sha256, thing_name, issuer, status, origin, \
         key_algorithm, not_before, not_after, created_at, delivered_at, revoked_at, \
         revocation_reason, der"
    };
}
pub(crate) use cert_columns;

pub(crate) fn cert_from_row<'r, R>(row: &'r R) -> Result<CertificateRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let status: String = row.try_get(5)?;
    let origin: String = row.try_get(6)?;
    Ok(CertificateRecord {
        serial: row.try_get(0)?,
        fingerprint_sha256: row.try_get(1)?,
        public_key_sha256: row.try_get(2)?,
        thing_name: row.try_get(3)?,
        issuer: row.try_get(4)?,
        status: status.parse::<CertStatus>().map_err(decode_error)?,
        origin: origin.parse().map_err(decode_error)?,
        key_algorithm: row.try_get(7)?,
        not_before: row.try_get(8)?,
        not_after: row.try_get(9)?,
        created_at: row.try_get(10)?,
        delivered_at: row.try_get(11)?,
        revoked_at: row.try_get(12)?,
        revocation_reason: row.try_get(13)?,
        der: row.try_get(14)?,
    })
}

/// Columns: name, template, created_at, updated_at.
pub(crate) fn thing_from_row<'r, R>(row: &'r R) -> Result<ThingRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(ThingRecord {
        name: row.try_get(0)?,
        template: row.try_get(1)?,
        created_at: row.try_get(2)?,
        updated_at: row.try_get(3)?,
    })
}

/// Columns: id, at, kind, thing_name, serial, detail (as text).
pub(crate) fn event_from_row<'r, R>(row: &'r R) -> Result<EventRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let detail: String = row.try_get(5)?;
    Ok(EventRecord {
        id: row.try_get(0)?,
        at: row.try_get(1)?,
        kind: row.try_get(2)?,
        thing_name: row.try_get(3)?,
        serial: row.try_get(4)?,
        detail: serde_json::from_str(&detail).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}

fn decode_error(e: RegistryError) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// Groups active certificates by thing.
pub(crate) fn group_by_thing(
    certs: Vec<CertificateRecord>,
    into: &mut HashMap<String, Vec<CertificateRecord>>,
) {
    for c in certs {
        into.entry(c.thing_name.clone()).or_default().push(c);
    }
}

/// Order-preserving de-duplication.
pub(crate) fn dedup_in_order(items: &[String]) -> Vec<&str> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .map(String::as_str)
        .filter(|s| seen.insert(*s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn check_dir(dir: &str, set: &[EmbeddedMigration]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            set.len(),
            "{}: every migration file must be listed in common.rs",
            dir.display()
        );
        for (file, m) in files.iter().zip(set) {
            let (version, rest) = file.split_once('_').unwrap();
            assert_eq!(version.parse::<i64>().unwrap(), m.version, "{file}");
            assert_eq!(rest.trim_end_matches(".sql"), m.description, "{file}");
            assert_eq!(
                std::fs::read_to_string(dir.join(file)).unwrap(),
                m.sql,
                "{file}"
            );
        }
    }

    #[test]
    fn embedded_migrations_match_the_directories() {
        check_dir("migrations/sqlite", SQLITE_MIGRATIONS);
        check_dir("migrations/postgres", POSTGRES_MIGRATIONS);
    }
}
