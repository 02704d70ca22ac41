//! Story tests: one set of stories, written against `Arc<dyn Registry>`, run against
//! SQLite (a temporary directory) and PostgreSQL (`#[ignore]`d; they need
//! `FLEETCERT_TEST_POSTGRES_URL`, e.g. via `scripts/with-postgres.sh`, and each runs in
//! a fresh database of its own).

use fleetcert_registry::{
    CertOrigin, CertStatus, CertificateFilter, EventFilter, IssueOutcome, IssueRecord,
    NewCertificate, Registry, RegistryError, ThingFilter, ThingRecord, open, testing,
};
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const AT: i64 = 1_700_000_000;
const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------
// Fixtures

/// Serials and fingerprints unique within this test process (and, by the random
/// prefix, across processes sharing a PostgreSQL server).
fn next_id() -> (String, String) {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (
        format!("{prefix:016x}{n:016x}"),
        format!("{:064x}", (u128::from(prefix) << 64) | u128::from(n)),
    )
}

fn cert(not_after: i64) -> NewCertificate {
    let (serial, fingerprint) = next_id();
    let der: Vec<u8> = serial.bytes().cycle().take(300).collect();
    NewCertificate {
        public_key_sha256: fingerprint.chars().rev().collect(),
        serial,
        fingerprint_sha256: fingerprint,
        issuer: "CN=fleetcert test CA,O=Example".to_owned(),
        not_before: AT - 60,
        not_after,
        origin: CertOrigin::Generated,
        key_algorithm: "ecdsa-p256".to_owned(),
        der,
    }
}

/// A record for `thing` that expects no active certificate.
fn record(thing: &str, at: i64) -> IssueRecord {
    IssueRecord {
        thing_name: thing.to_owned(),
        template: Some("default".to_owned()),
        certificate: cert(at + 365 * DAY),
        expected_active: Vec::new(),
        supersede_expected: false,
        revoke_expected: false,
        at,
    }
}

fn expecting(mut r: IssueRecord, expected: &[&str]) -> IssueRecord {
    r.expected_active = expected.iter().map(|s| (*s).to_owned()).collect();
    r
}

fn superseding(r: IssueRecord, expected: &[&str]) -> IssueRecord {
    IssueRecord {
        supersede_expected: true,
        ..expecting(r, expected)
    }
}

fn revoking(r: IssueRecord, expected: &[&str]) -> IssueRecord {
    IssueRecord {
        revoke_expected: true,
        ..expecting(r, expected)
    }
}

const CREATED: IssueOutcome = IssueOutcome::Committed {
    thing_created: true,
};
const EXISTING: IssueOutcome = IssueOutcome::Committed {
    thing_created: false,
};

fn conflict(current: &[&str]) -> IssueOutcome {
    let mut current_active: Vec<String> = current.iter().map(|s| (*s).to_owned()).collect();
    current_active.sort();
    IssueOutcome::Conflict { current_active }
}

fn serial(r: &IssueRecord) -> &str {
    &r.certificate.serial
}

async fn kinds_of(reg: &Arc<dyn Registry>, serial: &str) -> Vec<String> {
    reg.list_events(&EventFilter {
        serial: Some(serial.to_owned()),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|e| e.kind)
    .collect()
}

/// A snapshot of everything visible, to check that a failed call wrote nothing.
async fn snapshot(reg: &Arc<dyn Registry>) -> String {
    let things = reg.list_things(&ThingFilter::default()).await.unwrap();
    let certs = reg
        .list_certificates(&CertificateFilter::default())
        .await
        .unwrap();
    let events = reg.list_events(&EventFilter::default()).await.unwrap();
    format!("{things:?}\n{certs:?}\n{events:?}")
}

// ---------------------------------------------------------------------------------------
// Stories

/// Provision a group, then read back things, certificates, events and counts.
async fn provision_group(url: &str) {
    let reg = open(url).await.unwrap();
    let records: Vec<IssueRecord> = (0..50)
        .map(|i| {
            let mut r = record(&format!("sensor-{i:03}"), AT);
            r.certificate.not_after = AT + (i + 1) * DAY;
            if i % 2 == 1 {
                r.certificate.origin = CertOrigin::Csr;
                r.template = None;
            }
            r
        })
        .collect();
    let outcomes = reg.record_issued(&records).await.unwrap();
    assert_eq!(outcomes, vec![CREATED; 50]);

    // Things.
    assert_eq!(
        reg.get_thing("sensor-007").await.unwrap(),
        Some(ThingRecord {
            name: "sensor-007".to_owned(),
            template: None,
            created_at: AT,
            updated_at: AT,
        })
    );
    assert_eq!(
        reg.get_thing("sensor-008").await.unwrap().unwrap().template,
        Some("default".to_owned())
    );
    assert_eq!(reg.get_thing("sensor-999").await.unwrap(), None);
    let all = reg.list_things(&ThingFilter::default()).await.unwrap();
    let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("sensor-{i:03}")).collect();
    assert_eq!(names, expected);
    let page = reg
        .list_things(&ThingFilter {
            limit: Some(10),
            after: Some("sensor-009".to_owned()),
        })
        .await
        .unwrap();
    let page: Vec<&str> = page.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(page, &expected[10..20]);

    // Certificates.
    let r = &records[7];
    let c = reg.get_certificate(serial(r)).await.unwrap().unwrap();
    assert_eq!(c.serial, r.certificate.serial);
    assert_eq!(c.fingerprint_sha256, r.certificate.fingerprint_sha256);
    assert_eq!(c.public_key_sha256, r.certificate.public_key_sha256);
    assert_eq!(c.thing_name, "sensor-007");
    assert_eq!(c.issuer, r.certificate.issuer);
    assert_eq!(c.status, CertStatus::Active);
    assert_eq!(c.origin, CertOrigin::Csr);
    assert_eq!(c.key_algorithm, "ecdsa-p256");
    assert_eq!(c.not_before, AT - 60);
    assert_eq!(c.not_after, AT + 8 * DAY);
    assert_eq!(c.created_at, AT);
    assert_eq!(c.delivered_at, None);
    assert_eq!(c.revoked_at, None);
    assert_eq!(c.revocation_reason, None);
    assert_eq!(c.der, r.certificate.der);
    assert_eq!(reg.get_certificate("00").await.unwrap(), None);

    let of_thing = reg
        .list_certificates(&CertificateFilter {
            thing_name: Some("sensor-003".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_thing.len(), 1);
    assert_eq!(of_thing[0].serial, records[3].certificate.serial);
    let active = reg
        .list_certificates(&CertificateFilter {
            status: Some(CertStatus::Active),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(active.len(), 50);
    let expiring = reg
        .list_certificates(&CertificateFilter {
            expires_before: Some(AT + 10 * DAY),
            ..Default::default()
        })
        .await
        .unwrap();
    let expiring: Vec<&str> = expiring.iter().map(|c| c.thing_name.as_str()).collect();
    assert_eq!(expiring, &expected[..10]);
    let limited = reg
        .list_certificates(&CertificateFilter {
            status: Some(CertStatus::Active),
            expires_before: Some(AT + 30 * DAY),
            limit: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    let limited: Vec<&str> = limited.iter().map(|c| c.thing_name.as_str()).collect();
    assert_eq!(limited, &expected[..5]);
    assert!(
        reg.list_certificates(&CertificateFilter {
            status: Some(CertStatus::Revoked),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty()
    );

    let mut asked: Vec<String> = expected.clone();
    asked.push("no-such-thing".to_owned());
    let by_thing = reg.active_certificates(&asked).await.unwrap();
    assert_eq!(by_thing.len(), 50);
    assert!(!by_thing.contains_key("no-such-thing"));
    assert_eq!(by_thing["sensor-042"].len(), 1);
    assert_eq!(
        by_thing["sensor-042"][0].serial,
        records[42].certificate.serial
    );

    // Events: per record, thing.created then certificate.issued, in record order.
    let events = reg.list_events(&EventFilter::default()).await.unwrap();
    assert_eq!(events.len(), 100);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    for (i, pair) in events.chunks(2).enumerate() {
        let name = format!("sensor-{i:03}");
        assert_eq!(pair[0].kind, "thing.created");
        assert_eq!(pair[0].thing_name.as_deref(), Some(name.as_str()));
        assert_eq!(pair[0].serial, None);
        assert_eq!(pair[0].at, AT);
        assert_eq!(pair[1].kind, "certificate.issued");
        assert_eq!(pair[1].thing_name.as_deref(), Some(name.as_str()));
        assert_eq!(pair[1].serial.as_deref(), Some(serial(&records[i])));
        let c = &records[i].certificate;
        assert_eq!(pair[1].detail["origin"], c.origin.as_str());
        assert_eq!(pair[1].detail["key_algorithm"], "ecdsa-p256");
        assert_eq!(pair[1].detail["not_after"], c.not_after);
        assert_eq!(
            pair[1].detail["fingerprint_sha256"],
            c.fingerprint_sha256.as_str()
        );
    }
    let of_thing = reg
        .list_events(&EventFilter {
            thing_name: Some("sensor-011".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_thing.len(), 2);
    assert_eq!(
        kinds_of(&reg, serial(&records[11])).await,
        ["certificate.issued"]
    );
    let first3 = reg
        .list_events(&EventFilter {
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first3, events[..3]);

    let counts = reg.counts().await.unwrap();
    assert_eq!(counts.things, 50);
    assert_eq!(
        counts.certificates_by_status,
        vec![("active".to_owned(), 50)]
    );
    assert_eq!(counts.events, 100);

    // A re-issue with a template updates the existing thing.
    let mut again = superseding(record("sensor-001", AT + 10), &[serial(&records[1])]);
    again.template = Some("v2".to_owned());
    assert_eq!(reg.record_issued(&[again]).await.unwrap(), vec![EXISTING]);
    assert_eq!(
        reg.get_thing("sensor-001").await.unwrap().unwrap(),
        ThingRecord {
            name: "sensor-001".to_owned(),
            template: Some("v2".to_owned()),
            created_at: AT,
            updated_at: AT + 10,
        }
    );
    // ...and one without leaves the template alone.
    let mut plain = record("sensor-002", AT + 20);
    plain = superseding(plain, &[serial(&records[2])]);
    plain.template = None;
    assert_eq!(reg.record_issued(&[plain]).await.unwrap(), vec![EXISTING]);
    let t = reg.get_thing("sensor-002").await.unwrap().unwrap();
    assert_eq!((t.template.as_deref(), t.updated_at), (Some("default"), AT));

    // Reopening (migrations already applied) sees the same data.
    let reopened = open(url).await.unwrap();
    assert_eq!(reopened.backend(), reg.backend());
    let counts = reopened.counts().await.unwrap();
    assert_eq!(counts.things, 50);
    assert_eq!(
        counts.certificates_by_status,
        vec![("active".to_owned(), 50), ("superseded".to_owned(), 2)]
    );
    assert_eq!(counts.events, 104);
}

/// A record whose expected active set does not match writes nothing and reports the
/// current set; the other records of the slice still commit.
async fn conflict_detection(url: &str) {
    let reg = open(url).await.unwrap();
    let a = record("t1", AT);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&a)).await.unwrap(),
        vec![CREATED]
    );
    let before = snapshot(&reg).await;

    let b = record("t1", AT + 1);
    let c = superseding(record("t1", AT + 1), &["bogus"]);
    let d = expecting(record("t2", AT + 1), &["x"]);
    let e = superseding(record("t1", AT + 1), &[serial(&a), "bogus"]);
    let outcomes = reg
        .record_issued(&[b.clone(), c.clone(), d.clone(), e.clone()])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            conflict(&[serial(&a)]),
            conflict(&[serial(&a)]),
            conflict(&[]),
            conflict(&[serial(&a)]),
        ]
    );
    assert_eq!(
        snapshot(&reg).await,
        before,
        "a conflicting slice wrote something"
    );
    assert_eq!(reg.get_thing("t2").await.unwrap(), None);
    for r in [&b, &c, &d, &e] {
        assert_eq!(reg.get_certificate(serial(r)).await.unwrap(), None);
    }

    // Mixed slice: conflicts are skipped, the rest commits.
    let f = record("t1", AT + 2);
    let g = record("t3", AT + 2);
    let h = superseding(record("t1", AT + 2), &[serial(&a)]);
    let outcomes = reg
        .record_issued(&[f.clone(), g.clone(), h.clone()])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![conflict(&[serial(&a)]), CREATED, EXISTING]);
    assert_eq!(reg.get_certificate(serial(&f)).await.unwrap(), None);
    assert!(reg.get_certificate(serial(&g)).await.unwrap().is_some());
    let t1 = reg.active_certificates(&["t1".to_owned()]).await.unwrap();
    assert_eq!(t1["t1"].len(), 1);
    assert_eq!(t1["t1"][0].serial, serial(&h));
    assert_eq!(
        reg.get_certificate(serial(&a))
            .await
            .unwrap()
            .unwrap()
            .status,
        CertStatus::Superseded
    );

    // The same thing twice in one slice: the second sees the first's certificate.
    let i = record("t4", AT + 3);
    let j = record("t4", AT + 3);
    let outcomes = reg.record_issued(&[i.clone(), j.clone()]).await.unwrap();
    assert_eq!(outcomes, vec![CREATED, conflict(&[serial(&i)])]);
    assert_eq!(reg.get_certificate(serial(&j)).await.unwrap(), None);

    // A new thing's first record conflicting, its second committing: created once.
    let k = expecting(record("t5", AT + 4), &["x"]);
    let mut l = record("t5", AT + 5);
    l.template = Some("second".to_owned());
    let outcomes = reg.record_issued(&[k, l]).await.unwrap();
    assert_eq!(outcomes, vec![conflict(&[]), CREATED]);
    assert_eq!(
        reg.get_thing("t5").await.unwrap().unwrap(),
        ThingRecord {
            name: "t5".to_owned(),
            template: Some("second".to_owned()),
            created_at: AT + 5,
            updated_at: AT + 5,
        }
    );
    let created = reg
        .list_events(&EventFilter {
            thing_name: Some("t5".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.len(), 2);
    assert_eq!(created[0].kind, "thing.created");
    assert_eq!(created[0].at, AT + 5);
}

/// Forced re-issue supersedes; replacing an undelivered certificate revokes it.
async fn supersede_and_revoke(url: &str) {
    let reg = open(url).await.unwrap();
    let a = record("t1", AT);
    reg.record_issued(std::slice::from_ref(&a)).await.unwrap();
    reg.mark_delivered(&[serial(&a).to_owned()], AT + 1)
        .await
        .unwrap();

    let b = superseding(record("t1", AT + 100), &[serial(&a)]);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&b)).await.unwrap(),
        vec![EXISTING]
    );
    let old = reg.get_certificate(serial(&a)).await.unwrap().unwrap();
    assert_eq!(old.status, CertStatus::Superseded);
    assert_eq!((old.revoked_at, old.revocation_reason), (None, None));
    assert_eq!(
        kinds_of(&reg, serial(&a)).await,
        [
            "certificate.issued",
            "certificate.delivered",
            "certificate.superseded"
        ]
    );
    let ev = reg
        .list_events(&EventFilter {
            serial: Some(serial(&a).to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ev[2].detail["replaced_by"], serial(&b));
    assert_eq!(ev[2].thing_name.as_deref(), Some("t1"));
    assert_eq!(ev[2].at, AT + 100);

    let c = revoking(record("t1", AT + 200), &[serial(&b)]);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&c)).await.unwrap(),
        vec![EXISTING]
    );
    let revoked = reg.get_certificate(serial(&b)).await.unwrap().unwrap();
    assert_eq!(revoked.status, CertStatus::Revoked);
    assert_eq!(revoked.revoked_at, Some(AT + 200));
    assert_eq!(revoked.revocation_reason.as_deref(), Some("superseded"));
    let ev = reg
        .list_events(&EventFilter {
            serial: Some(serial(&b).to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["certificate.issued", "certificate.revoked"]);
    assert_eq!(ev[1].detail["reason"], "superseded");
    assert_eq!(ev[1].detail["replaced_by"], serial(&c));

    let active = reg.active_certificates(&["t1".to_owned()]).await.unwrap();
    let active: Vec<&str> = active["t1"].iter().map(|c| c.serial.as_str()).collect();
    assert_eq!(active, [serial(&c)]);
    let by_status = |status| {
        let reg = reg.clone();
        async move {
            reg.list_certificates(&CertificateFilter {
                status: Some(status),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(by_status(CertStatus::Revoked).await, [serial(&b)]);
    assert_eq!(by_status(CertStatus::Superseded).await, [serial(&a)]);

    // Asking for both is a caller error; nothing is written.
    let before = snapshot(&reg).await;
    let both = IssueRecord {
        revoke_expected: true,
        ..superseding(record("t1", AT + 300), &[serial(&c)])
    };
    assert!(matches!(
        reg.record_issued(&[record("t9", AT + 300), both]).await,
        Err(RegistryError::InvalidValue(_))
    ));
    assert_eq!(snapshot(&reg).await, before);

    // Several active certificates; the expected set is compared as a set.
    let d = record("t2", AT);
    let e = expecting(record("t2", AT + 1), &[serial(&d)]);
    assert_eq!(
        reg.record_issued(&[d.clone(), e.clone()]).await.unwrap(),
        vec![CREATED, EXISTING]
    );
    let both_active = reg.active_certificates(&["t2".to_owned()]).await.unwrap();
    assert_eq!(both_active["t2"].len(), 2);
    let f = superseding(record("t2", AT + 2), &[serial(&e), serial(&d), serial(&e)]);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&f)).await.unwrap(),
        vec![EXISTING]
    );
    for old in [&d, &e] {
        assert_eq!(
            reg.get_certificate(serial(old))
                .await
                .unwrap()
                .unwrap()
                .status,
            CertStatus::Superseded
        );
    }

    // Within one slice: issue, then revoke what was just issued.
    let g = record("t3", AT);
    let h = revoking(record("t3", AT + 5), &[serial(&g)]);
    assert_eq!(
        reg.record_issued(&[g.clone(), h.clone()]).await.unwrap(),
        vec![CREATED, EXISTING]
    );
    let g_now = reg.get_certificate(serial(&g)).await.unwrap().unwrap();
    assert_eq!(g_now.status, CertStatus::Revoked);
    assert_eq!(g_now.revoked_at, Some(AT + 5));
    assert_eq!(
        kinds_of(&reg, serial(&g)).await,
        ["certificate.issued", "certificate.revoked"]
    );
}

/// A duplicate serial or fingerprint fails the whole call, and nothing of it is visible.
async fn duplicate_serial_is_atomic(url: &str) {
    let reg = open(url).await.unwrap();
    let a = record("t1", AT);
    reg.record_issued(std::slice::from_ref(&a)).await.unwrap();
    let before = snapshot(&reg).await;

    // Same serial as a recorded certificate.
    let x = record("t2", AT + 1);
    let mut y = record("t3", AT + 1);
    y.certificate.serial = a.certificate.serial.clone();
    let err = reg.record_issued(&[x.clone(), y]).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::DuplicateSerial(s) if s == serial(&a)),
        "{err:?}"
    );
    assert!(err.to_string().contains(serial(&a)), "{err}");
    assert_eq!(snapshot(&reg).await, before);
    assert_eq!(reg.get_thing("t2").await.unwrap(), None);

    // Same fingerprint as a recorded certificate (and a supersede in the same call).
    let z = superseding(record("t1", AT + 2), &[serial(&a)]);
    let mut w = record("t4", AT + 2);
    w.certificate.fingerprint_sha256 = a.certificate.fingerprint_sha256.clone();
    let err = reg.record_issued(&[z, w.clone()]).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::DuplicateSerial(s) if s == serial(&w)),
        "{err:?}"
    );
    assert_eq!(snapshot(&reg).await, before);
    assert_eq!(
        reg.get_certificate(serial(&a))
            .await
            .unwrap()
            .unwrap()
            .status,
        CertStatus::Active
    );

    // Twice within the slice.
    let p = record("t5", AT + 3);
    let mut q = record("t6", AT + 3);
    q.certificate.serial = p.certificate.serial.clone();
    assert!(matches!(
        reg.record_issued(&[p, q]).await,
        Err(RegistryError::DuplicateSerial(_))
    ));
    assert_eq!(snapshot(&reg).await, before);

    // The registry is still usable.
    assert_eq!(reg.record_issued(&[x]).await.unwrap(), vec![CREATED]);
}

/// Marking delivered sets the time once, with one event per certificate.
async fn mark_delivered_is_idempotent(url: &str) {
    let reg = open(url).await.unwrap();
    let a = record("t1", AT);
    let b = record("t2", AT);
    reg.record_issued(&[a.clone(), b.clone()]).await.unwrap();

    reg.mark_delivered(&[serial(&a).to_owned()], AT + 5)
        .await
        .unwrap();
    let got = reg.get_certificate(serial(&a)).await.unwrap().unwrap();
    assert_eq!(got.delivered_at, Some(AT + 5));
    assert_eq!(
        reg.get_certificate(serial(&b))
            .await
            .unwrap()
            .unwrap()
            .delivered_at,
        None
    );

    let again = [
        serial(&a).to_owned(),
        serial(&b).to_owned(),
        serial(&a).to_owned(),
        "ffffffffffffffffffffffffffffffff".to_owned(),
    ];
    reg.mark_delivered(&again, AT + 9).await.unwrap();
    reg.mark_delivered(&again, AT + 10).await.unwrap();
    reg.mark_delivered(&[], AT + 11).await.unwrap();
    assert_eq!(
        reg.get_certificate(serial(&a))
            .await
            .unwrap()
            .unwrap()
            .delivered_at,
        Some(AT + 5)
    );
    assert_eq!(
        reg.get_certificate(serial(&b))
            .await
            .unwrap()
            .unwrap()
            .delivered_at,
        Some(AT + 9)
    );
    for (r, at, thing) in [(&a, AT + 5, "t1"), (&b, AT + 9, "t2")] {
        let ev = reg
            .list_events(&EventFilter {
                serial: Some(serial(r).to_owned()),
                ..Default::default()
            })
            .await
            .unwrap();
        let delivered: Vec<_> = ev
            .iter()
            .filter(|e| e.kind == "certificate.delivered")
            .collect();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].at, at);
        assert_eq!(delivered[0].thing_name.as_deref(), Some(thing));
    }
    assert_eq!(reg.counts().await.unwrap().events, 4 + 2);
}

/// The database itself refuses to change or remove events.
async fn events_are_append_only(url: &str) {
    let reg = open(url).await.unwrap();
    reg.record_issued(&[record("t1", AT)]).await.unwrap();
    let before = reg.list_events(&EventFilter::default()).await.unwrap();
    assert_eq!(before.len(), 2);

    let mut attempts = vec![
        "UPDATE events SET kind = 'tampered'",
        "DELETE FROM events",
        "DELETE FROM events WHERE id = 1",
    ];
    if reg.backend() == "postgres" {
        attempts.push("TRUNCATE events");
    }
    for sql in attempts {
        match testing::execute_raw(url, sql).await {
            Err(RegistryError::Database(msg)) => {
                assert!(msg.contains("append-only"), "{sql}: {msg}")
            }
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        reg.list_events(&EventFilter::default()).await.unwrap(),
        before
    );
    // Other tables can still be changed by hand.
    assert_eq!(
        testing::execute_raw(url, "UPDATE things SET template = template")
            .await
            .unwrap(),
        1
    );
}

/// Two registries (as two processes would) commit for the same things at once with the
/// same expectation: exactly one wins each thing, the other sees a conflict.
async fn concurrent_issue_one_wins(url: &str) {
    let a = open(url).await.unwrap();
    let b = open(url).await.unwrap();

    for round in 0..10 {
        let thing = format!("race-{round}");
        let ra = record(&thing, AT);
        let rb = record(&thing, AT);
        let (x, y) = tokio::join!(
            tokio::spawn({
                let (a, ra) = (a.clone(), ra.clone());
                async move { a.record_issued(&[ra]).await }
            }),
            tokio::spawn({
                let (b, rb) = (b.clone(), rb.clone());
                async move { b.record_issued(&[rb]).await }
            }),
        );
        let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
        match (&x[0], &y[0]) {
            (
                IssueOutcome::Committed {
                    thing_created: true,
                },
                other,
            ) => {
                assert_eq!(other, &conflict(&[serial(&ra)]), "round {round}")
            }
            (
                other,
                IssueOutcome::Committed {
                    thing_created: true,
                },
            ) => {
                assert_eq!(other, &conflict(&[serial(&rb)]), "round {round}")
            }
            other => panic!("round {round}: {other:?}"),
        }
    }

    // Whole slices racing over the same 300 things.
    let names: Vec<String> = (0..300).map(|i| format!("batch-{i:03}")).collect();
    let slice_a: Vec<IssueRecord> = names.iter().map(|n| record(n, AT)).collect();
    let slice_b: Vec<IssueRecord> = names.iter().map(|n| record(n, AT)).collect();
    let (x, y) = tokio::join!(
        tokio::spawn({
            let (a, s) = (a.clone(), slice_a.clone());
            async move { a.record_issued(&s).await }
        }),
        tokio::spawn({
            let (b, s) = (b.clone(), slice_b.clone());
            async move { b.record_issued(&s).await }
        }),
    );
    let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
    let active = a.active_certificates(&names).await.unwrap();
    assert_eq!(active.len(), names.len());
    for i in 0..names.len() {
        let winner = match (&x[i], &y[i]) {
            (IssueOutcome::Committed { .. }, IssueOutcome::Conflict { current_active }) => {
                assert_eq!(current_active, &[serial(&slice_a[i]).to_owned()]);
                &slice_a[i]
            }
            (IssueOutcome::Conflict { current_active }, IssueOutcome::Committed { .. }) => {
                assert_eq!(current_active, &[serial(&slice_b[i]).to_owned()]);
                &slice_b[i]
            }
            other => panic!("{}: {other:?}", names[i]),
        };
        let certs = &active[&names[i]];
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].serial, serial(winner));
    }
    let counts = b.counts().await.unwrap();
    assert_eq!(counts.things, 310);
    assert_eq!(
        counts.certificates_by_status,
        vec![("active".to_owned(), 310)]
    );
    assert_eq!(counts.events, 620);
}

/// `active_certificates` for 40,000 names (and slices of 1,000 records).
async fn active_certificates_for_many_names(url: &str) {
    let reg = open(url).await.unwrap();
    let names: Vec<String> = (0..40_000).map(|i| format!("dev-{i:05}")).collect();
    let mut serials = std::collections::HashMap::new();
    for chunk in names.chunks(1_000) {
        let records: Vec<IssueRecord> = chunk.iter().map(|n| record(n, AT)).collect();
        for r in &records {
            serials.insert(r.thing_name.clone(), r.certificate.serial.clone());
        }
        let outcomes = reg.record_issued(&records).await.unwrap();
        assert!(outcomes.iter().all(|o| *o == CREATED));
    }
    let mut asked = names.clone();
    asked.extend((0..500).map(|i| format!("ghost-{i}")));
    let active = reg.active_certificates(&asked).await.unwrap();
    assert_eq!(active.len(), 40_000);
    for (name, certs) in &active {
        assert_eq!(certs.len(), 1);
        assert_eq!(&certs[0].serial, &serials[name]);
    }
    let counts = reg.counts().await.unwrap();
    assert_eq!(counts.things, 40_000);
    assert_eq!(counts.events, 80_000);
    let page = reg
        .list_things(&ThingFilter {
            limit: Some(3),
            after: Some("dev-39998".to_owned()),
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].name, "dev-39999");
}

/// Several registries opening a fresh database at once all migrate cleanly.
async fn concurrent_open(url: &str) {
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { open(&url).await })
        })
        .collect();
    let mut registries = Vec::new();
    for o in opens {
        registries.push(o.await.unwrap().unwrap());
    }
    registries[0]
        .record_issued(&[record("t1", AT)])
        .await
        .unwrap();
    for r in &registries {
        assert_eq!(r.counts().await.unwrap().things, 1);
    }
}

// ---------------------------------------------------------------------------------------
// Backends

/// A database for one test: a file in a temporary directory, or a fresh PostgreSQL
/// database (dropped afterwards).
struct Db {
    url: String,
    admin_url: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("registry.db").display());
        Db {
            url,
            admin_url: None,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Db {
        let admin_url = std::env::var("FLEETCERT_TEST_POSTGRES_URL").unwrap_or_else(|_| {
            panic!(
                "FLEETCERT_TEST_POSTGRES_URL is not set: the PostgreSQL story tests need a \
                 server whose user may create databases, e.g. \
                 postgres://postgres@127.0.0.1:5432/postgres \
                 (scripts/with-postgres.sh starts a throwaway one)"
            )
        });
        let url = testing::create_postgres_database(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("creating a test database: {e}"));
        Db {
            url,
            admin_url: Some(admin_url),
            _dir: None,
        }
    }

    async fn finish(self) {
        if let Some(admin_url) = &self.admin_url {
            testing::drop_postgres_database(admin_url, &self.url)
                .await
                .unwrap();
        }
    }
}

macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $story() {
                    let db = super::Db::sqlite();
                    super::$story(&db.url).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL: set FLEETCERT_TEST_POSTGRES_URL (scripts/with-postgres.sh)"]
                async fn $story() {
                    let db = super::Db::postgres().await;
                    super::$story(&db.url).await;
                    db.finish().await;
                }
            )*
        }
    };
}

stories!(
    provision_group,
    conflict_detection,
    supersede_and_revoke,
    duplicate_serial_is_atomic,
    mark_delivered_is_idempotent,
    events_are_append_only,
    concurrent_issue_one_wins,
    active_certificates_for_many_names,
    concurrent_open,
);

// ---------------------------------------------------------------------------------------
// Opening

#[tokio::test]
async fn sqlite_in_a_missing_directory_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("registry.db");
    let url = format!("sqlite:{}", path.display());
    match open(&url).await {
        Err(RegistryError::Unreachable { url: u, reason }) => {
            assert_eq!(u, url);
            assert!(reason.contains("does not exist"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let err = open(path.to_str().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    assert!(!path.parent().unwrap().exists());
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    std::fs::write(&path, vec![b'x'; 8192]).unwrap();
    let err = open(path.to_str().unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Unreachable { url, .. } if url == path.to_str().unwrap()),
        "{err:?}"
    );
}

#[tokio::test]
async fn postgres_on_a_closed_port_is_unreachable_quickly() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://fleet:s3cret@127.0.0.1:{port}/fleetcert");
    let started = Instant::now();
    let err = open(&url).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        RegistryError::Unreachable { url: u, .. } => {
            assert_eq!(
                u,
                &format!("postgres://fleet:***@127.0.0.1:{port}/fleetcert")
            )
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let message = err.to_string();
    assert!(!message.contains("s3cret"), "{message}");
    assert!(message.contains("127.0.0.1"), "{message}");
}

#[tokio::test]
async fn unsupported_url_scheme_is_refused() {
    let err = open("mysql://root:pw@127.0.0.1/fleetcert")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("mysql"), "{message}");
    assert!(!message.contains("pw@"), "{message}");
}

#[tokio::test]
async fn in_memory_sqlite_works() {
    let reg = open("sqlite::memory:").await.unwrap();
    assert_eq!(reg.backend(), "sqlite");
    let r = record("t1", AT);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&r)).await.unwrap(),
        vec![CREATED]
    );
    assert_eq!(reg.counts().await.unwrap().things, 1);
    assert!(reg.get_certificate(serial(&r)).await.unwrap().is_some());
}

#[tokio::test]
async fn plain_path_and_sqlite_url_name_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let plain = open(path.to_str().unwrap()).await.unwrap();
    plain.record_issued(&[record("t1", AT)]).await.unwrap();
    for url in [
        format!("sqlite:{}", path.display()),
        format!("sqlite://{}", path.display()),
    ] {
        let reg = open(&url).await.unwrap();
        assert_eq!(reg.counts().await.unwrap().things, 1, "{url}");
    }
}

// ---------------------------------------------------------------------------------------
// Throughput (run with `--ignored --nocapture`)

async fn measure(url: &str, slices: usize, slice_len: usize) -> f64 {
    let reg = open(url).await.unwrap();
    let batches: Vec<Vec<IssueRecord>> = (0..slices)
        .map(|s| {
            (0..slice_len)
                .map(|i| record(&format!("bench-{s:04}-{i:05}"), AT))
                .collect()
        })
        .collect();
    let started = Instant::now();
    for batch in &batches {
        reg.record_issued(batch).await.unwrap();
    }
    let rate = (slices * slice_len) as f64 / started.elapsed().as_secs_f64();
    // Re-issue everything (supersede path).
    let reissue: Vec<Vec<IssueRecord>> = batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|r| superseding(record(&r.thing_name, AT + 1), &[serial(r)]))
                .collect()
        })
        .collect();
    let started = Instant::now();
    for batch in &reissue {
        reg.record_issued(batch).await.unwrap();
    }
    let rate2 = (slices * slice_len) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{}: record_issued {rate:.0} records/s (new things), {rate2:.0} records/s (supersede), \
         {slices} slices of {slice_len}",
        reg.backend()
    );
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn bench_sqlite_record_issued() {
    let db = Db::sqlite();
    measure(&db.url, 20, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs FLEETCERT_TEST_POSTGRES_URL"]
async fn bench_postgres_record_issued() {
    let db = Db::postgres().await;
    measure(&db.url, 20, 1_000).await;
    db.finish().await;
}

#[test]
fn fixtures_are_unique() {
    let ids: HashSet<_> = (0..1000).map(|_| next_id()).collect();
    assert_eq!(ids.len(), 1000);
}
