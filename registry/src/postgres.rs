//! The PostgreSQL registry: the connection pool, migrations and the dialect (`$n`
//! placeholders, row locks, arrays, retried serialisation failures).
//!
//! Every flow is written once for both backends; the modules that hold them say how
//! they lock here: group commits and first-connect registrations in `issuance.rs` and
//! `registrations.rs`, rotation in `rotations.rs` (the lock order every writer follows:
//! the thing, then the old certificate, then its replacements, then the rotation row),
//! revocation and CRL stores in `revocations.rs`, connection flushes (serialised on an
//! advisory lock, so pruning is exact) in `connections.rs`.

use crate::RegistryError;
use crate::common::{self, NewEvent, migrate_error};

use crate::dialect::Dialect;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Postgres};
use std::str::FromStr;
use std::time::Duration;

/// How long connecting (and waiting for a pooled connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct PgRegistry {
    pool: PgPool,
    /// Redacted URL, for messages.
    url: String,
    probes: common::ProbeGate,
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
    const NAME: &'static str = "postgres";
    const REGISTRATION_GROUP: usize = 1;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    const FOR_SHARE: &'static str = " FOR SHARE";
    const FOR_KEY_SHARE: &'static str = " FOR KEY SHARE";
    const FOR_NO_KEY_UPDATE: &'static str = " FOR NO KEY UPDATE";
    const SQL_DEVICE_STATE: &'static str = crate::connections::device_state_sql!(
        "COALESCE(CAST(json_agg(attached.policy_name ORDER BY attached.policy_name) AS TEXT), '[]')",
        "SELECT jsonb_array_elements_text(t.groups)"
    );
    const NOT_INDEXED: &'static str = "";

    fn json_values(n: u8) -> String {
        format!("SELECT jsonb_array_elements_text(${n}::jsonb) AS value")
    }

    fn json_values_of(column: &str) -> String {
        format!("SELECT jsonb_array_elements_text({column}) AS value")
    }

    fn json_entries(n: u8) -> String {
        format!(
            "SELECT e.ord - 1 AS key, e.value \
             FROM jsonb_array_elements_text(${n}::jsonb) WITH ORDINALITY AS e(value, ord)"
        )
    }

    fn json_object(pairs: &str) -> String {
        format!("jsonb_build_object({pairs})")
    }

    const CERT_TIEBREAK: &'static str = "serial";

    fn json_rows(n: u8) -> String {
        format!("jsonb_array_elements(${n}::jsonb)")
    }

    fn json_column(expr: &str) -> String {
        format!("CAST({expr} AS JSON)")
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

    fn probe_gate(&self) -> &common::ProbeGate {
        &self.probes
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

#[cfg(test)]
mod tests {
    //! PostgreSQL-only checks (`#[ignore]`d: they need `FLEETCERT_TEST_POSTGRES_URL`, e.g.
    //! via `scripts/with-postgres.sh`). The behaviour shared with SQLite is covered by
    //! `tests/stories.rs`.
    use super::*;
    use crate::*;
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
