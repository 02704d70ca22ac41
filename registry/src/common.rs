//! Backend-independent pieces: the embedded migrations, validation and in-memory
//! planning of a group commit, row decoding and error mapping.

use crate::{
    CertStatus, CertificateRecord, ConnectionRecord, EventRecord, IssueOutcome, IssueRecord,
    MAX_CONNECTIONS_PER_CERTIFICATE, MirrorOp, MirrorSettings, NewCertificate, PolicyRecord,
    Registration, RegistryError, ReplaceOutcome, Replacement, RevokedEntry, RotationRecord,
    StoredCrl, ThingDetails, ThingRecord,
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
pub(crate) const EVENT_CERT_REGISTERED: &str = "certificate.registered";
pub(crate) const EVENT_THING_UPDATED: &str = "thing.updated";
pub(crate) const EVENT_POLICY_CREATED: &str = "policy.created";
pub(crate) const EVENT_POLICY_ATTACHED: &str = "policy.attached";
pub(crate) const EVENT_ROTATION_DUE: &str = "rotation.due";
pub(crate) const EVENT_ROTATION_ISSUED: &str = "rotation.issued";
pub(crate) const EVENT_ROTATION_DELIVERED: &str = "rotation.delivered";
pub(crate) const EVENT_ROTATION_CONFIRMED: &str = "rotation.confirmed";
pub(crate) const EVENT_ROTATION_FAILED: &str = "rotation.failed";
pub(crate) const EVENT_ROTATION_CANCELLED: &str = "rotation.cancelled";

pub(crate) const EVENT_MIRROR_ENABLED: &str = "mirror.enabled";
pub(crate) const EVENT_MIRROR_DISABLED: &str = "mirror.disabled";
pub(crate) const EVENT_MIRROR_CA: &str = "mirror.ca_registered";
pub(crate) const EVENT_MIRROR_PARKED: &str = "mirror.parked";

/// Most rotations `open_due_rotations` opens in one transaction.
pub(crate) const OPEN_CHUNK: usize = 2_048;

/// How many names one `active_certificates` query carries.
pub(crate) const NAME_CHUNK: usize = 10_000;

/// How long a successful write probe answers for the probes that follow it.
pub(crate) const PROBE_REUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Serialises write probes ([`crate::Registry::probe_writes`]) and reuses a recent
/// success, so a health checker polling hard costs at most a few commits a second.
/// Failures are never reused: the next probe tries again (that is how recovery shows).
#[derive(Debug, Default)]
pub(crate) struct ProbeGate {
    last_ok: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl ProbeGate {
    pub(crate) async fn run<F>(&self, probe: F) -> Result<(), RegistryError>
    where
        F: std::future::Future<Output = Result<(), RegistryError>>,
    {
        let mut last_ok = self.last_ok.lock().await;
        if last_ok.is_some_and(|at| at.elapsed() < PROBE_REUSE) {
            return Ok(());
        }
        let outcome = probe.await;
        *last_ok = outcome.is_ok().then(std::time::Instant::now);
        outcome
    }
}

/// Whether a pooled connection may go back to (or out of) the pool: not if it is still
/// inside a transaction. A COMMIT that fails on a full disk is rolled back by SQLite
/// itself, the ROLLBACK sqlx then sends fails ("no transaction is active"), and sqlx's
/// transaction depth stays at 1: every later `BEGIN` on that connection would fail with
/// "attempted to call begin_with at non-zero transaction depth", for ever. Such a
/// connection is closed instead (closing rolls back whatever is open) and the pool
/// opens a fresh one.
pub(crate) fn reusable<C: sqlx::Connection>(conn: &C, when: &str) -> bool {
    if conn.is_in_transaction() {
        tracing::warn!(
            "closing a registry database connection {when} inside a transaction \
             (a COMMIT or ROLLBACK failed); the pool opens a new one"
        );
        return false;
    }
    true
}

/// One migration file, embedded at compile time.
pub(crate) struct EmbeddedMigration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// `migrations/sqlite/NNNN_description.sql`, in order. A unit test checks that this list
/// matches the directory, so a new file cannot be forgotten.
pub(crate) const SQLITE_MIGRATIONS: &[EmbeddedMigration] = &[
    EmbeddedMigration {
        version: 1,
        description: "initial",
        sql: include_str!("../../migrations/sqlite/0001_initial.sql"),
    },
    EmbeddedMigration {
        version: 2,
        description: "registration",
        sql: include_str!("../../migrations/sqlite/0002_registration.sql"),
    },
    EmbeddedMigration {
        version: 3,
        description: "rotation",
        sql: include_str!("../../migrations/sqlite/0003_rotation.sql"),
    },
    EmbeddedMigration {
        version: 4,
        description: "mirror",
        sql: include_str!("../../migrations/sqlite/0004_mirror.sql"),
    },
    EmbeddedMigration {
        version: 5,
        description: "mirror_certificate_ids",
        sql: include_str!("../../migrations/sqlite/0005_mirror_certificate_ids.sql"),
    },
    EmbeddedMigration {
        version: 6,
        description: "connection_sessions",
        sql: include_str!("../../migrations/sqlite/0006_connection_sessions.sql"),
    },
    EmbeddedMigration {
        version: 7,
        description: "claims",
        sql: include_str!("../../migrations/sqlite/0007_claims.sql"),
    },
    EmbeddedMigration {
        version: 8,
        description: "audit",
        sql: include_str!("../../migrations/sqlite/0008_audit.sql"),
    },
    EmbeddedMigration {
        version: 9,
        description: "rotations_new_serial_unused",
        sql: include_str!("../../migrations/sqlite/0009_rotations_new_serial_unused.sql"),
    },
    EmbeddedMigration {
        version: 10,
        description: "thing_group_policies",
        sql: include_str!("../../migrations/sqlite/0010_thing_group_policies.sql"),
    },
    EmbeddedMigration {
        version: 11,
        description: "policy_versions",
        sql: include_str!("../../migrations/sqlite/0011_policy_versions.sql"),
    },
];

/// `migrations/postgres/NNNN_description.sql`, in order (same check as above).
pub(crate) const POSTGRES_MIGRATIONS: &[EmbeddedMigration] = &[
    EmbeddedMigration {
        version: 1,
        description: "initial",
        sql: include_str!("../../migrations/postgres/0001_initial.sql"),
    },
    EmbeddedMigration {
        version: 2,
        description: "registration",
        sql: include_str!("../../migrations/postgres/0002_registration.sql"),
    },
    EmbeddedMigration {
        version: 3,
        description: "rotation",
        sql: include_str!("../../migrations/postgres/0003_rotation.sql"),
    },
    EmbeddedMigration {
        version: 4,
        description: "mirror",
        sql: include_str!("../../migrations/postgres/0004_mirror.sql"),
    },
    EmbeddedMigration {
        version: 5,
        description: "mirror_certificate_ids",
        sql: include_str!("../../migrations/postgres/0005_mirror_certificate_ids.sql"),
    },
    EmbeddedMigration {
        version: 6,
        description: "connection_sessions",
        sql: include_str!("../../migrations/postgres/0006_connection_sessions.sql"),
    },
    EmbeddedMigration {
        version: 7,
        description: "claims",
        sql: include_str!("../../migrations/postgres/0007_claims.sql"),
    },
    EmbeddedMigration {
        version: 8,
        description: "audit",
        sql: include_str!("../../migrations/postgres/0008_audit.sql"),
    },
    EmbeddedMigration {
        version: 9,
        description: "rotations_new_serial_unused",
        sql: include_str!("../../migrations/postgres/0009_rotations_new_serial_unused.sql"),
    },
    EmbeddedMigration {
        version: 10,
        description: "thing_group_policies",
        sql: include_str!("../../migrations/postgres/0010_thing_group_policies.sql"),
    },
    EmbeddedMigration {
        version: 11,
        description: "policy_versions",
        sql: include_str!("../../migrations/postgres/0011_policy_versions.sql"),
    },
];

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
        RegistryError::Database {
            context: context.to_owned(),
            source: e,
        }
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError) -> RegistryError {
    RegistryError::Migration(e)
}

/// `None` → no limit.
pub(crate) fn limit_value(limit: Option<u32>) -> Option<i64> {
    limit.map(i64::from)
}

/// The certificate columns, in the order [`cert_from_row`] reads them (`der` last);
/// `cert_columns!(c)`: the same, qualified with the table alias `c`.
macro_rules! cert_columns {
    () => {
        "serial, fingerprint_sha256, public_key_sha256, thing_name, issuer, status, origin, \
         key_algorithm, not_before, not_after, created_at, delivered_at, revoked_at, \
         revocation_reason, registered_at, renew_at, replaces, der"
    };
    (c) => {
        "c.serial, c.fingerprint_sha256, c.public_key_sha256, c.thing_name, c.issuer, \
         c.status, c.origin, c.key_algorithm, c.not_before, c.not_after, c.created_at, \
         c.delivered_at, c.revoked_at, c.revocation_reason, c.registered_at, c.renew_at, c.replaces, c.der"
    };
}
pub(crate) use cert_columns;

/// How many columns [`cert_from_row`] reads.
pub(crate) const CERT_COLUMN_COUNT: usize = 18;

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
        registered_at: row.try_get(14)?,
        renew_at: row.try_get(15)?,
        replaces: row.try_get(16)?,
        der: row.try_get(17)?,
    })
}

/// Columns: name, template, created_at, updated_at, thing_type, attributes (JSON text),
/// groups (JSON text), billing_group, version.
pub(crate) fn thing_from_row<'r, R>(row: &'r R) -> Result<ThingRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    thing_from_row_at(row, 0)
}

/// [`thing_from_row`] with the thing's columns starting at column `at`.
pub(crate) fn thing_from_row_at<'r, R>(row: &'r R, at: usize) -> Result<ThingRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let attributes: String = row.try_get(at + 5)?;
    let groups: String = row.try_get(at + 6)?;
    Ok(ThingRecord {
        name: row.try_get(at)?,
        template: row.try_get(at + 1)?,
        created_at: row.try_get(at + 2)?,
        updated_at: row.try_get(at + 3)?,
        details: ThingDetails {
            thing_type: row.try_get(at + 4)?,
            attributes: parse_json(&attributes)?,
            groups: parse_json(&groups)?,
            billing_group: row.try_get(at + 7)?,
        },
        version: row.try_get(at + 8)?,
    })
}

/// Columns: name, document (as text), created_at, updated_at.
pub(crate) fn policy_from_row<'r, R>(row: &'r R) -> Result<PolicyRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let document: String = row.try_get(1)?;
    Ok(PolicyRecord {
        name: row.try_get(0)?,
        document: parse_json(&document)?,
        created_at: row.try_get(2)?,
        updated_at: row.try_get(3)?,
    })
}

/// The connection columns, in the order [`connection_from_row`] reads them.
macro_rules! connection_columns {
    () => {
        "fingerprint_sha256, thing_name, client_addr, at, transport, client_id, \
         disconnected_at, disconnect_reason"
    };
}
pub(crate) use connection_columns;

/// Columns: [`connection_columns!`].
pub(crate) fn connection_from_row<'r, R>(row: &'r R) -> Result<ConnectionRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let transport: String = row.try_get(4)?;
    Ok(ConnectionRecord {
        fingerprint_sha256: row.try_get(0)?,
        thing_name: row.try_get(1)?,
        client_addr: row.try_get(2)?,
        at: row.try_get(3)?,
        transport: transport
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        client_id: row.try_get(5)?,
        disconnected_at: row.try_get(6)?,
        disconnect_reason: row.try_get(7)?,
    })
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// `value` as JSON text.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises to JSON")
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
        detail: parse_json(&detail)?,
    })
}

pub(crate) fn decode_error(e: RegistryError) -> sqlx::Error {
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

// ---------------------------------------------------------------------------------------
// Registration

/// A certificate as `register` sees it, read under its lock.
#[derive(Debug, Clone)]
pub(crate) struct CertState {
    pub thing_name: String,
    pub status: String,
    pub registered_at: Option<i64>,
}

/// What the certificate says about a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertCheck {
    Proceed,
    AlreadyRegistered,
    Refused(String),
}

/// The certificate checks of a registration, in order: exists, is active, belongs to
/// the thing, is not registered yet.
pub(crate) fn check_certificate(reg: &Registration, cert: Option<&CertState>) -> CertCheck {
    let Some(cert) = cert else {
        return CertCheck::Refused(format!("certificate {} is not in the registry", reg.serial));
    };
    if cert.status != CertStatus::Active.as_str() {
        return CertCheck::Refused(format!(
            "certificate {} is {}, not active",
            reg.serial, cert.status
        ));
    }
    if cert.thing_name != reg.thing_name {
        return CertCheck::Refused(format!(
            "certificate {} belongs to thing {:?}, not {:?}",
            reg.serial, cert.thing_name, reg.thing_name
        ));
    }
    if cert.registered_at.is_some() {
        return CertCheck::AlreadyRegistered;
    }
    CertCheck::Proceed
}

/// One distinct policy of a registration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestedPolicy<'a> {
    pub name: &'a str,
    pub document: Option<&'a serde_json::Value>,
}

/// The distinct policies of a registration, in request order. A name given twice is
/// one policy (with the document of whichever occurrence has one); given twice with
/// different documents, the registration is refused (the reason is returned).
pub(crate) fn requested_policies(reg: &Registration) -> Result<Vec<RequestedPolicy<'_>>, String> {
    let mut out: Vec<RequestedPolicy<'_>> = Vec::with_capacity(reg.policies.len());
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(reg.policies.len());
    for p in &reg.policies {
        if p.name.is_empty() {
            return Err("a policy of the template has an empty name".to_owned());
        }
        match index.get(p.name.as_str()) {
            None => {
                index.insert(&p.name, out.len());
                out.push(RequestedPolicy {
                    name: &p.name,
                    document: p.document.as_ref(),
                });
            }
            Some(&i) => match (out[i].document, p.document.as_ref()) {
                (Some(a), Some(b)) if a != b => {
                    return Err(format!(
                        "policy {:?} is given twice with different documents",
                        p.name
                    ));
                }
                (None, Some(b)) => out[i].document = Some(b),
                _ => {}
            },
        }
    }
    Ok(out)
}

/// A requested policy found in the database.
#[derive(Debug, Clone)]
pub(crate) struct FoundPolicy {
    /// The stored document (stored as serde_json's text, read back by serde_json).
    pub stored: serde_json::Value,
    /// The requested document as it would read back once stored (so that equal
    /// documents compare equal even where reading a float back is not exact); `None` if
    /// attached by name.
    pub candidate: Option<serde_json::Value>,
}

impl FoundPolicy {
    pub(crate) fn new(
        stored: serde_json::Value,
        requested: &[RequestedPolicy<'_>],
        name: &str,
    ) -> Self {
        let candidate = requested
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.document)
            .map(|d| serde_json::from_str(&to_json(d)).unwrap_or_else(|_| d.clone()));
        FoundPolicy { stored, candidate }
    }
}

/// Everything a registration writes besides the policies it created.
#[derive(Debug)]
pub(crate) struct RegistrationPlan {
    /// The thing's new details (normalised) and version, if it changes.
    pub thing: Option<(ThingDetails, i64)>,
    /// Policy names to attach, in request order.
    pub attach: Vec<String>,
    /// Events, in the order they happened.
    pub events: Vec<NewEvent>,
}

/// Works out a registration that passed [`check_certificate`] and the version check.
/// `created`: requested policies this transaction has just inserted; `found`: the
/// requested policies in the database (including those just created). `Err`: the
/// reason the registration is refused.
pub(crate) fn plan_registration(
    reg: &Registration,
    thing: &ThingRecord,
    requested: &[RequestedPolicy<'_>],
    created: &HashSet<String>,
    found: &HashMap<String, FoundPolicy>,
) -> Result<RegistrationPlan, String> {
    let mut events = Vec::with_capacity(requested.len() * 2 + 2);
    let event = |kind: &'static str, serial: bool, detail: serde_json::Value| NewEvent {
        at: reg.at,
        kind,
        thing_name: Some(reg.thing_name.clone()),
        serial: serial.then(|| reg.serial.clone()),
        detail: detail.to_string(),
    };

    let details = reg.details.clone().normalised();
    let thing_update = (details != thing.details
        || thing.template.as_deref() != Some(reg.template.as_str()))
    .then(|| {
        let version = thing.version + 1;
        events.push(event(
            EVENT_THING_UPDATED,
            false,
            serde_json::json!({
                "template": reg.template,
                "details": details,
                "version": version,
            }),
        ));
        (details, version)
    });

    for p in requested {
        if created.contains(p.name) {
            events.push(event(
                EVENT_POLICY_CREATED,
                true,
                serde_json::json!({ "policy": p.name, "document": p.document }),
            ));
            continue;
        }
        match found.get(p.name) {
            None => {
                return Err(format!(
                    "policy {:?} does not exist (the template attaches it by name)",
                    p.name
                ));
            }
            Some(f) => {
                if p.document.is_some() && f.candidate.as_ref() != Some(&f.stored) {
                    return Err(format!(
                        "policy {:?} already exists and its stored document differs from \
                         the template's; policies are never changed: rename the policy in \
                         the template to change it",
                        p.name
                    ));
                }
            }
        }
    }
    let attach: Vec<String> = requested.iter().map(|p| p.name.to_owned()).collect();
    for name in &attach {
        events.push(event(
            EVENT_POLICY_ATTACHED,
            true,
            serde_json::json!({ "policy": name }),
        ));
    }
    events.push(event(
        EVENT_CERT_REGISTERED,
        true,
        serde_json::json!({ "template": reg.template, "policies": attach }),
    ));
    Ok(RegistrationPlan {
        thing: thing_update,
        attach,
        events,
    })
}

/// The connection records worth inserting: per fingerprint only the newest
/// [`MAX_CONNECTIONS_PER_CERTIFICATE`] of the slice (later records are newer; older ones
/// would be pruned at once), in slice order; and the distinct fingerprints, sorted.
pub(crate) fn connections_to_keep(
    records: &[ConnectionRecord],
) -> (Vec<&ConnectionRecord>, Vec<&str>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut keep: Vec<&ConnectionRecord> = records
        .iter()
        .rev()
        .filter(|r| {
            let n = seen.entry(r.fingerprint_sha256.as_str()).or_default();
            *n += 1;
            *n <= MAX_CONNECTIONS_PER_CERTIFICATE
        })
        .collect();
    keep.reverse();
    let mut fingerprints: Vec<&str> = seen.into_keys().collect();
    fingerprints.sort_unstable();
    (keep, fingerprints)
}

// ---------------------------------------------------------------------------------------
// Rotation, revocation and CRLs

/// The rotation columns, in the order [`rotation_from_row`] reads them;
/// `rotation_columns!(r)`: the same, qualified with the table alias `r`. (`attempts` is
/// read as a 32-bit integer, the column's type on PostgreSQL.)
macro_rules! rotation_columns {
    () => {
        "old_serial, thing_name, origin, state, due_at, new_serial, lease_owner, \
         lease_until, attempts, last_error, updated_at"
    };
    (r) => {
        "r.old_serial, r.thing_name, r.origin, r.state, r.due_at, r.new_serial, \
         r.lease_owner, r.lease_until, r.attempts, r.last_error, r.updated_at"
    };
}
pub(crate) use rotation_columns;

pub(crate) fn rotation_from_row<'r, R>(row: &'r R) -> Result<RotationRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
{
    rotation_from_row_at(row, 0)
}

/// [`rotation_from_row`] with the rotation's columns starting at column `at`.
pub(crate) fn rotation_from_row_at<'r, R>(
    row: &'r R,
    at: usize,
) -> Result<RotationRecord, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
{
    let origin: String = row.try_get(at + 2)?;
    let state: String = row.try_get(at + 3)?;
    let attempts: i32 = row.try_get(at + 8)?;
    Ok(RotationRecord {
        old_serial: row.try_get(at)?,
        thing_name: row.try_get(at + 1)?,
        origin: origin.parse().map_err(decode_error)?,
        state: state.parse().map_err(decode_error)?,
        due_at: row.try_get(at + 4)?,
        new_serial: row.try_get(at + 5)?,
        lease_owner: row.try_get(at + 6)?,
        lease_until: row.try_get(at + 7)?,
        attempts: i64::from(attempts),
        last_error: row.try_get(at + 9)?,
        updated_at: row.try_get(at + 10)?,
    })
}

/// [`rotation_from_row_at`] for the columns of a `LEFT JOIN`: `None` if `old_serial`
/// is NULL (no rotation row).
pub(crate) fn optional_rotation_at<'r, R>(
    row: &'r R,
    at: usize,
) -> Result<Option<RotationRecord>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
{
    let old_serial: Option<String> = row.try_get(at)?;
    match old_serial {
        None => Ok(None),
        Some(_) => rotation_from_row_at(row, at).map(Some),
    }
}

/// Columns: serial, thing_name, revoked_at, revocation_reason, not_after.
pub(crate) fn revoked_entry_from_row<'r, R>(row: &'r R) -> Result<RevokedEntry, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(RevokedEntry {
        serial: row.try_get(0)?,
        thing_name: row.try_get(1)?,
        revoked_at: row.try_get(2)?,
        reason: row.try_get(3)?,
        not_after: row.try_get(4)?,
    })
}

/// Columns: number, this_update, next_update, entries_digest, entry_count, der.
pub(crate) fn crl_from_row<'r, R>(row: &'r R) -> Result<StoredCrl, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(StoredCrl {
        number: row.try_get(0)?,
        this_update: row.try_get(1)?,
        next_update: row.try_get(2)?,
        entries_digest: row.try_get(3)?,
        entry_count: row.try_get(4)?,
        der: row.try_get(5)?,
    })
}

/// No serial or fingerprint twice among `certs` (else [`RegistryError::DuplicateSerial`]
/// naming the second occurrence).
pub(crate) fn validate_new<'a>(
    certs: impl IntoIterator<Item = &'a NewCertificate>,
) -> Result<(), RegistryError> {
    let mut serials = HashSet::new();
    let mut fingerprints = HashSet::new();
    for c in certs {
        if !serials.insert(c.serial.as_str()) || !fingerprints.insert(c.fingerprint_sha256.as_str())
        {
            return Err(RegistryError::DuplicateSerial(c.serial.clone()));
        }
    }
    Ok(())
}

/// [`duplicate_of`] for plain certificates: the first of `certs` whose serial or
/// fingerprint is among `taken`.
pub(crate) fn duplicate_among<'a>(
    certs: impl IntoIterator<Item = &'a NewCertificate>,
    taken: &HashSet<String>,
    fallback: &str,
) -> RegistryError {
    let serial = certs
        .into_iter()
        .find(|c| taken.contains(&c.serial) || taken.contains(&c.fingerprint_sha256))
        .map(|c| c.serial.clone())
        .unwrap_or_else(|| fallback.to_owned());
    RegistryError::DuplicateSerial(serial)
}

/// The detail of `certificate.issued` for a certificate made by a rotation (the same
/// fields as a provisioned one, plus `replaces`).
pub(crate) fn replacement_issued_detail(c: &NewCertificate, replaces: &str) -> String {
    serde_json::json!({
        "origin": c.origin.as_str(),
        "key_algorithm": c.key_algorithm,
        "not_before": c.not_before,
        "not_after": c.not_after,
        "fingerprint_sha256": c.fingerprint_sha256,
        "issuer": c.issuer,
        "replaces": replaces,
    })
    .to_string()
}

/// `certificate.superseded` by a rotation: `{"replaced_by": new}`.
pub(crate) fn superseded_detail(replaced_by: &str) -> String {
    serde_json::json!({ "replaced_by": replaced_by }).to_string()
}

/// `certificate.revoked` by a rotation (the old certificate once its replacement is
/// used, or a replacement never used): `{"reason": "superseded", "replaced_by": new}`.
pub(crate) fn revoked_by_rotation_detail(replaced_by: &str) -> String {
    serde_json::json!({ "reason": "superseded", "replaced_by": replaced_by }).to_string()
}

/// `certificate.revoked` by [`crate::Revocations::revoke`]: `{"reason": reason}`, plus
/// `"replaces": old` for an undelivered replacement revoked with the certificate it
/// replaces.
pub(crate) fn revoked_detail(reason: &str, replaces: Option<&str>) -> String {
    match replaces {
        None => serde_json::json!({ "reason": reason }),
        Some(old) => serde_json::json!({ "reason": reason, "replaces": old }),
    }
    .to_string()
}

/// `rotation.issued`, `rotation.delivered`, `rotation.confirmed`: `{"new_serial": new}`.
pub(crate) fn rotation_detail(new_serial: &str) -> String {
    serde_json::json!({ "new_serial": new_serial }).to_string()
}

/// `rotation.failed`: `{"error", "attempts", "state"}` (`state`: `due` while the worker
/// may try again, `failed` once it gave up).
pub(crate) fn rotation_failed_detail(error: &str, attempts: i64, state: &str) -> String {
    serde_json::json!({ "error": error, "attempts": attempts, "state": state }).to_string()
}

/// `rotation.cancelled`: `{"reason": revocation reason}`.
pub(crate) fn rotation_cancelled_detail(reason: &str) -> String {
    serde_json::json!({ "reason": reason }).to_string()
}

// `rotation.due` details are built in SQL from the certificate row:
// `{"origin": …, "renew_at": …, "not_after": …}`.

/// The checks of [`crate::Rotations::replace_certificate`] on the authenticated
/// certificate, in order: exists, belongs to the thing, is not revoked. `Err`: the
/// refusal.
pub(crate) fn check_replacement(
    rep: &Replacement,
    cert: Option<&CertState>,
) -> Result<(), ReplaceOutcome> {
    let serial = &rep.authenticated_serial;
    let Some(cert) = cert else {
        return Err(ReplaceOutcome::Refused {
            code: "unknown_certificate",
            reason: format!("certificate {serial} is not in the registry"),
        });
    };
    if cert.thing_name != rep.thing_name {
        return Err(ReplaceOutcome::Refused {
            code: "wrong_thing",
            reason: format!(
                "certificate {serial} belongs to thing {:?}, not {:?}",
                cert.thing_name, rep.thing_name
            ),
        });
    }
    if cert.status == CertStatus::Revoked.as_str() {
        return Err(ReplaceOutcome::Refused {
            code: "certificate_revoked",
            reason: format!("certificate {serial} is revoked"),
        });
    }
    Ok(())
}

/// The refusal when a replacement of the authenticated certificate (`pending`) can be
/// handed out: the caller takes that one instead of issuing another key.
pub(crate) fn replacement_pending(rep: &Replacement, pending: &str) -> ReplaceOutcome {
    ReplaceOutcome::Refused {
        code: "replacement_pending",
        reason: format!(
            "certificate {} already has replacement {pending} waiting to be handed out",
            rep.authenticated_serial
        ),
    }
}

/// The refusal when the authenticated certificate already has `count` replacements.
pub(crate) fn replacement_limit(rep: &Replacement, count: i64) -> ReplaceOutcome {
    ReplaceOutcome::Refused {
        code: "replacement_limit",
        reason: format!(
            "certificate {} has been replaced {count} times already (at most {} per \
             certificate): use the newest replacement, or have an operator revoke this \
             certificate and provision the device again",
            rep.authenticated_serial,
            rep.max_replacements.unwrap_or_default()
        ),
    }
}

/// The refusal when certificate `holder` of the thing already has the new public key.
pub(crate) fn key_reused(rep: &Replacement, holder: &str) -> ReplaceOutcome {
    ReplaceOutcome::Refused {
        code: "key_reused",
        reason: format!(
            "the new public key is already used by certificate {holder} of thing {:?}: \
             a replacement needs a new key",
            rep.thing_name
        ),
    }
}

/// Columns of a mirror operation, in the order [`mirror_op_from_row`] reads them.
pub(crate) const MIRROR_OP_COLUMNS: &str =
    "id, queue, kind, subject, state, created_at, not_before, attempts, last_error";

pub(crate) fn mirror_op_from_row<'r, R>(row: &'r R) -> Result<MirrorOp, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
{
    let kind: String = row.try_get(2)?;
    Ok(MirrorOp {
        id: row.try_get(0)?,
        queue: row.try_get(1)?,
        kind: kind.parse().map_err(decode_error)?,
        subject: row.try_get(3)?,
        state: row.try_get(4)?,
        created_at: row.try_get(5)?,
        not_before: row.try_get(6)?,
        attempts: row.try_get(7)?,
        last_error: row.try_get(8)?,
    })
}

/// Columns of the settings row, in the order [`mirror_settings_from_row`] reads them
/// (`enabled` as an integer 0/1 on both backends).
pub(crate) const MIRROR_SETTINGS_COLUMNS: &str = "region, endpoint_url, ca_mode, rotated_status, \
     ca_certificate_id, arn_prefix, updated_at";

pub(crate) fn mirror_settings_from_row<'r, R>(
    row: &'r R,
    enabled: bool,
) -> Result<MirrorSettings, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(MirrorSettings {
        enabled,
        region: row.try_get(0)?,
        endpoint_url: row.try_get(1)?,
        ca_mode: row.try_get(2)?,
        rotated_status: row.try_get(3)?,
        ca_certificate_id: row.try_get(4)?,
        arn_prefix: row.try_get(5)?,
        updated_at: row.try_get(6)?,
    })
}

/// Refuses settings the schema would refuse, with a message naming the field.
pub(crate) fn validate_mirror_settings(s: &MirrorSettings) -> Result<(), RegistryError> {
    if !matches!(s.ca_mode.as_str(), "default" | "sni-only") {
        return Err(RegistryError::InvalidValue(format!(
            "mirror CA mode {:?} (expected default or sni-only)",
            s.ca_mode
        )));
    }
    if !matches!(s.rotated_status.as_str(), "REVOKED" | "INACTIVE") {
        return Err(RegistryError::InvalidValue(format!(
            "mirror status for rotated certificates {:?} (expected REVOKED or INACTIVE)",
            s.rotated_status
        )));
    }
    if s.region.trim().is_empty() {
        return Err(RegistryError::InvalidValue(
            "mirror region is empty".to_owned(),
        ));
    }
    Ok(())
}

pub(crate) fn mirror_enabled_detail(s: &MirrorSettings, queued: u64) -> String {
    to_json(&serde_json::json!({
        "region": s.region,
        "endpoint_url": s.endpoint_url,
        "ca_mode": s.ca_mode,
        "rotated_status": s.rotated_status,
        "queued": queued,
    }))
}

pub(crate) fn mirror_parked_detail(op: i64, kind: &str, subject: &str, error: &str) -> String {
    to_json(&serde_json::json!({ "op": op, "kind": kind, "subject": subject, "error": error }))
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

    fn registration(policies: &[(&str, Option<serde_json::Value>)]) -> Registration {
        Registration {
            serial: "01".to_owned(),
            thing_name: "t".to_owned(),
            template: "tpl".to_owned(),
            details: ThingDetails::default(),
            expected_thing_version: 1,
            policies: policies
                .iter()
                .map(|(name, document)| crate::PolicyWrite {
                    name: (*name).to_owned(),
                    document: document.clone(),
                })
                .collect(),
            at: 5,
        }
    }

    #[test]
    fn requested_policies_are_distinct_in_request_order() {
        let doc = serde_json::json!({ "a": 1 });
        let reg = registration(&[
            ("b", None),
            ("a", Some(doc.clone())),
            ("b", Some(doc.clone())),
            ("a", None),
        ]);
        let got: Vec<(&str, Option<&serde_json::Value>)> = requested_policies(&reg)
            .unwrap()
            .iter()
            .map(|p| (p.name, p.document))
            .collect();
        assert_eq!(got, [("b", Some(&doc)), ("a", Some(&doc))]);

        let clash = registration(&[
            ("p", Some(serde_json::json!(1))),
            ("p", Some(serde_json::json!(2))),
        ]);
        assert!(requested_policies(&clash).unwrap_err().contains("\"p\""));
        assert!(requested_policies(&registration(&[("", None)])).is_err());
    }

    #[test]
    fn certificate_checks_come_in_order() {
        let reg = registration(&[]);
        let cert = |thing: &str, status: &str, registered_at| CertState {
            thing_name: thing.to_owned(),
            status: status.to_owned(),
            registered_at,
        };
        assert!(matches!(
            check_certificate(&reg, None),
            CertCheck::Refused(_)
        ));
        assert!(matches!(
            check_certificate(&reg, Some(&cert("t", "revoked", Some(1)))),
            CertCheck::Refused(r) if r.contains("revoked")
        ));
        assert!(matches!(
            check_certificate(&reg, Some(&cert("u", "active", Some(1)))),
            CertCheck::Refused(r) if r.contains("\"u\"")
        ));
        assert_eq!(
            check_certificate(&reg, Some(&cert("t", "active", Some(1)))),
            CertCheck::AlreadyRegistered
        );
        assert_eq!(
            check_certificate(&reg, Some(&cert("t", "active", None))),
            CertCheck::Proceed
        );
    }

    #[test]
    fn only_the_newest_connections_of_a_slice_are_kept() {
        let records: Vec<ConnectionRecord> = (0..40)
            .map(|i| ConnectionRecord::https(if i % 4 == 0 { "b" } else { "a" }, "t", "addr", i))
            .collect();
        let (keep, fingerprints) = connections_to_keep(&records);
        assert_eq!(fingerprints, ["a", "b"]);
        let a: Vec<i64> = keep
            .iter()
            .filter(|c| c.fingerprint_sha256 == "a")
            .map(|c| c.at)
            .collect();
        assert_eq!(a.len(), 30);
        let all_a: Vec<i64> = (0..40).filter(|i| i % 4 != 0).collect();
        assert_eq!(a, all_a);
        assert_eq!(keep.len(), 40);
        let many: Vec<ConnectionRecord> = records
            .iter()
            .cycle()
            .take(200)
            .enumerate()
            .map(|(i, c)| ConnectionRecord {
                at: i as i64,
                ..c.clone()
            })
            .collect();
        let (keep, _) = connections_to_keep(&many);
        assert_eq!(keep.len(), 2 * MAX_CONNECTIONS_PER_CERTIFICATE);
        assert!(keep.windows(2).all(|w| w[0].at < w[1].at));
        assert_eq!(keep.last().unwrap().at, 199);
    }
}
