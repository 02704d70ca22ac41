//! Story tests: one set of stories, written against `Arc<dyn Registry>`, run against
//! SQLite (a temporary directory) and PostgreSQL (`#[ignore]`d; they need
//! `FLEETCERT_TEST_POSTGRES_URL`, e.g. via `scripts/with-postgres.sh`, and each runs in
//! a fresh database of its own).

use fleetcert_registry::{
    AuditFindingFilter, AuditFindingRecord, AuditSuppression, AuditTaskRecord, CRLS_KEPT,
    CertOrigin, CertStatus, CertificateFilter, ConnectionRecord, ConnectionTransport, EventFilter,
    EventRecord, IssueOutcome, IssueRecord, MAX_CONNECTIONS_PER_CERTIFICATE, MirrorBacklog,
    MirrorOp, MirrorOpKind, MirrorOutcome, MirrorResult, MirrorSettings, NewCertificate, NewClaim,
    NewMirrorOp, NewProvisional, PolicyWrite, PreparedReplacement, ProvisionalOutcome,
    ProvisionalRegistration, Registration, RegistrationOutcome, Registry, RegistryError,
    ReplaceOutcome, Replacement, Revocation, RevocationTarget, RevokedEntry, RotationBacklog,
    RotationFilter, RotationRecord, RotationState, StoredCrl, TakenReplacement, ThingDetails,
    ThingFilter, ThingRecord, open, testing,
};
use serde_json::json;
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
        renew_at: AT - 60 + (not_after - (AT - 60)) * 2 / 3,
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

/// Records one certificate for a new thing and returns its record.
async fn provisioned(reg: &Arc<dyn Registry>, thing: &str) -> IssueRecord {
    let r = record(thing, AT);
    assert_eq!(
        reg.record_issued(std::slice::from_ref(&r)).await.unwrap(),
        vec![CREATED]
    );
    r
}

/// Details a template might set (groups unsorted and repeated: the registry normalises).
fn sensor_details() -> ThingDetails {
    ThingDetails {
        thing_type: Some("sensor".to_owned()),
        attributes: [("site", "berlin"), ("floor", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        groups: vec![
            "fleet-b".to_owned(),
            "fleet-a".to_owned(),
            "fleet-b".to_owned(),
        ],
        billing_group: Some("standard".to_owned()),
    }
}

fn policy(name: &str, document: Option<serde_json::Value>) -> PolicyWrite {
    PolicyWrite {
        name: name.to_owned(),
        document,
    }
}

/// A policy document; `resource` makes different documents.
fn document(resource: &str) -> serde_json::Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["iot:Publish"],
            "Resource": [resource],
            "Condition": { "NumericLessThan": { "size": 1.5, "rate": 100, "big": 1e16 } }
        }]
    })
}

/// A registration of `r`'s certificate with the template `sensor`.
fn registration(r: &IssueRecord, version: i64, policies: Vec<PolicyWrite>) -> Registration {
    Registration {
        serial: r.certificate.serial.clone(),
        thing_name: r.thing_name.clone(),
        template: "sensor".to_owned(),
        details: sensor_details(),
        expected_thing_version: version,
        policies,
        at: AT + 1_000,
    }
}

fn registered(names: &[&str]) -> RegistrationOutcome {
    RegistrationOutcome::Registered {
        policies: names.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn already(names: &[&str]) -> RegistrationOutcome {
    RegistrationOutcome::AlreadyRegistered {
        policies: names.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn refused_because(outcome: &RegistrationOutcome, words: &[&str]) {
    match outcome {
        RegistrationOutcome::Refused { reason } => {
            for w in words {
                assert!(reason.contains(w), "{w:?} not in {reason:?}");
            }
        }
        other => panic!("expected Refused ({words:?}), got {other:?}"),
    }
}

async fn events_of(reg: &Arc<dyn Registry>, thing: &str) -> Vec<EventRecord> {
    reg.list_events(&EventFilter {
        thing_name: Some(thing.to_owned()),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn count_kind(reg: &Arc<dyn Registry>, kind: &str) -> usize {
    reg.list_events(&EventFilter::default())
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == kind)
        .count()
}

/// A snapshot of everything visible, to check that a failed call wrote nothing.
async fn snapshot(reg: &Arc<dyn Registry>) -> String {
    let things = reg.list_things(&ThingFilter::default()).await.unwrap();
    let certs = reg
        .list_certificates(&CertificateFilter::default())
        .await
        .unwrap();
    let events = reg.list_events(&EventFilter::default()).await.unwrap();
    let policies = reg.list_policies().await.unwrap();
    let mut states = Vec::new();
    for c in &certs {
        states.push(reg.device_state(&c.fingerprint_sha256).await.unwrap());
    }
    format!("{things:?}\n{certs:?}\n{events:?}\n{policies:?}\n{states:?}")
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
            details: ThingDetails::default(),
            version: 1,
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
    assert_eq!(c.registered_at, None);
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
            details: ThingDetails::default(),
            version: 2,
        }
    );
    // ...and one without leaves the template alone.
    let mut plain = record("sensor-002", AT + 20);
    plain = superseding(plain, &[serial(&records[2])]);
    plain.template = None;
    assert_eq!(reg.record_issued(&[plain]).await.unwrap(), vec![EXISTING]);
    let t = reg.get_thing("sensor-002").await.unwrap().unwrap();
    assert_eq!((t.template.as_deref(), t.updated_at), (Some("default"), AT));
    assert_eq!(t.version, 1);
    // ...and one with the same template does not count as a change.
    let same = superseding(record("sensor-004", AT + 30), &[serial(&records[4])]);
    assert_eq!(reg.record_issued(&[same]).await.unwrap(), vec![EXISTING]);
    let t = reg.get_thing("sensor-004").await.unwrap().unwrap();
    assert_eq!((t.template.as_deref(), t.version), (Some("default"), 1));

    // Reopening (migrations already applied) sees the same data.
    let reopened = open(url).await.unwrap();
    assert_eq!(reopened.backend(), reg.backend());
    let counts = reopened.counts().await.unwrap();
    assert_eq!(counts.things, 50);
    assert_eq!(
        counts.certificates_by_status,
        vec![("active".to_owned(), 50), ("superseded".to_owned(), 3)]
    );
    assert_eq!(counts.events, 106);
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
            details: ThingDetails::default(),
            version: 1,
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
            Err(e @ RegistryError::Database { .. }) => {
                let msg = e.to_string();
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

/// A first connect registers the certificate (thing details, policies, attachments,
/// events); a later one finds it registered.
async fn register_then_already_registered(url: &str) {
    let reg = open(url).await.unwrap();
    let r = provisioned(&reg, "t1").await;
    let fp = r.certificate.fingerprint_sha256.clone();

    let state = reg.device_state(&fp).await.unwrap().unwrap();
    assert_eq!(state.certificate.serial, serial(&r));
    assert_eq!(state.certificate.registered_at, None);
    assert_eq!(state.thing.version, 1);
    assert_eq!(state.thing.details, ThingDetails::default());
    assert!(state.policies.is_empty());
    assert_eq!(reg.device_state("00").await.unwrap(), None);

    let registration = registration(
        &r,
        state.thing.version,
        vec![
            policy("telemetry", Some(document("topic/t1"))),
            policy("shadow", Some(document("shadow/t1"))),
        ],
    );
    let at = registration.at;
    assert_eq!(
        reg.register(&registration).await.unwrap(),
        registered(&["telemetry", "shadow"])
    );

    // The thing: new details (groups normalised), template, version + 1.
    let thing = reg.get_thing("t1").await.unwrap().unwrap();
    let details = ThingDetails {
        groups: vec!["fleet-a".to_owned(), "fleet-b".to_owned()],
        ..sensor_details()
    };
    assert_eq!(
        thing,
        ThingRecord {
            name: "t1".to_owned(),
            template: Some("sensor".to_owned()),
            created_at: AT,
            updated_at: at,
            details: details.clone(),
            version: 2,
        }
    );
    let cert = reg.get_certificate(serial(&r)).await.unwrap().unwrap();
    assert_eq!(cert.registered_at, Some(at));
    assert_eq!(cert.status, CertStatus::Active);

    // What the server reads on the next connection.
    let state = reg.device_state(&fp).await.unwrap().unwrap();
    assert_eq!(state.certificate, cert);
    assert_eq!(state.thing, thing);
    assert_eq!(state.policies, ["shadow", "telemetry"]);

    // Policies.
    let telemetry = reg.get_policy("telemetry").await.unwrap().unwrap();
    assert_eq!(telemetry.document, document("topic/t1"));
    assert_eq!((telemetry.created_at, telemetry.updated_at), (at, at));
    assert_eq!(reg.get_policy("nope").await.unwrap(), None);
    let names = |ps: Vec<fleetcert_registry::PolicyRecord>| {
        ps.into_iter().map(|p| p.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(reg.list_policies().await.unwrap()),
        ["shadow", "telemetry"]
    );
    assert_eq!(
        names(reg.policies_of_thing("t1").await.unwrap()),
        ["shadow", "telemetry"]
    );
    assert!(reg.policies_of_thing("t9").await.unwrap().is_empty());

    // Events, in order.
    let events = events_of(&reg, "t1").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "thing.created",
            "certificate.issued",
            "thing.updated",
            "policy.created",
            "policy.created",
            "policy.attached",
            "policy.attached",
            "certificate.registered",
        ]
    );
    let updated = &events[2];
    assert_eq!((updated.at, updated.serial.as_deref()), (at, None));
    assert_eq!(updated.detail["template"], "sensor");
    assert_eq!(
        updated.detail["details"],
        serde_json::to_value(&details).unwrap()
    );
    assert_eq!(events[3].detail["policy"], "telemetry");
    // (Event details are jsonb on PostgreSQL, which may rewrite number spellings.)
    assert_eq!(
        events[3].detail["document"]["Statement"][0]["Resource"],
        json!(["topic/t1"])
    );
    assert_eq!(events[4].detail["policy"], "shadow");
    assert_eq!(events[5].detail, json!({ "policy": "telemetry" }));
    assert_eq!(events[6].detail, json!({ "policy": "shadow" }));
    for e in &events[3..] {
        assert_eq!(e.serial.as_deref(), Some(serial(&r)));
        assert_eq!(e.at, at);
    }
    assert_eq!(
        events[7].detail,
        json!({ "template": "sensor", "policies": ["telemetry", "shadow"] })
    );

    // Again (with the version read before, or the current one): already registered, and
    // nothing written.
    let before = snapshot(&reg).await;
    for version in [1, 2] {
        let mut again = registration.clone();
        again.expected_thing_version = version;
        again.at = at + 50;
        assert_eq!(
            reg.register(&again).await.unwrap(),
            already(&["shadow", "telemetry"])
        );
    }
    assert_eq!(snapshot(&reg).await, before);

    // A registration that changes nothing on the thing and attaches no policy.
    let r2 = provisioned(&reg, "t2").await;
    let unchanged = Registration {
        template: "default".to_owned(),
        details: ThingDetails::default(),
        ..self::registration(&r2, 1, Vec::new())
    };
    assert_eq!(reg.register(&unchanged).await.unwrap(), registered(&[]));
    let t2 = reg.get_thing("t2").await.unwrap().unwrap();
    assert_eq!((t2.version, t2.updated_at), (1, AT));
    let kinds: Vec<String> = events_of(&reg, "t2")
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "thing.created",
            "certificate.issued",
            "certificate.registered"
        ]
    );
    assert_eq!(reg.register(&unchanged).await.unwrap(), already(&[]));

    // Once the registered certificate is superseded, the thing has no policies (its new
    // certificate is not registered yet), but the policies remain.
    let next = superseding(record("t1", AT + 2_000), &[serial(&r)]);
    reg.record_issued(&[next]).await.unwrap();
    assert!(reg.policies_of_thing("t1").await.unwrap().is_empty());
    assert_eq!(reg.list_policies().await.unwrap().len(), 2);
    refused_because(&reg.register(&registration).await.unwrap(), &["superseded"]);
}

/// Two devices with the same policy document share the policy; a different document
/// under the same name is refused and writes nothing.
async fn policy_reuse_and_refusal(url: &str) {
    let reg = open(url).await.unwrap();
    let a = provisioned(&reg, "a").await;
    let b = provisioned(&reg, "b").await;
    let c = provisioned(&reg, "c").await;

    let shared = document("topic/*");
    assert_eq!(
        reg.register(&registration(
            &a,
            1,
            vec![policy("shared", Some(shared.clone()))]
        ))
        .await
        .unwrap(),
        registered(&["shared"])
    );
    // The same document, written differently (key order, number spelling of the text).
    let same: serde_json::Value = serde_json::from_str(&shared.to_string()).unwrap();
    let mut later = registration(&b, 1, vec![policy("shared", Some(same))]);
    later.at += 500;
    assert_eq!(reg.register(&later).await.unwrap(), registered(&["shared"]));
    assert_eq!(count_kind(&reg, "policy.created").await, 1);
    let stored = reg.get_policy("shared").await.unwrap().unwrap();
    assert_eq!(stored.document, shared);
    assert_eq!(stored.created_at, AT + 1_000);
    for thing in ["a", "b"] {
        let names: Vec<String> = reg
            .policies_of_thing(thing)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["shared"]);
    }

    // A different document under the same name (after a new policy): refused, nothing
    // written — not the new policy, no attachment, the thing and certificate unchanged.
    let before = snapshot(&reg).await;
    let thing_before = reg.get_thing("c").await.unwrap().unwrap();
    let outcome = reg
        .register(&registration(
            &c,
            1,
            vec![
                policy("fresh", Some(document("fresh/*"))),
                policy("shared", Some(document("other/*"))),
            ],
        ))
        .await
        .unwrap();
    refused_because(&outcome, &["\"shared\"", "differs", "rename"]);
    assert_eq!(snapshot(&reg).await, before);
    assert_eq!(reg.get_policy("fresh").await.unwrap(), None);
    assert_eq!(reg.get_thing("c").await.unwrap().unwrap(), thing_before);
    let state = reg
        .device_state(&c.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.certificate.registered_at, None);
    assert!(state.policies.is_empty());
    assert_eq!(reg.get_policy("shared").await.unwrap().unwrap(), stored);

    // One name twice with different documents in one registration: refused.
    let outcome = reg
        .register(&registration(
            &c,
            1,
            vec![
                policy("twice", Some(document("x"))),
                policy("twice", Some(document("y"))),
            ],
        ))
        .await
        .unwrap();
    refused_because(&outcome, &["\"twice\""]);
    assert_eq!(snapshot(&reg).await, before);

    // Twice with the same document (or once by name): attached once.
    assert_eq!(
        reg.register(&registration(
            &c,
            1,
            vec![
                policy("shared", None),
                policy("fresh", Some(document("fresh/*"))),
                policy("shared", Some(shared.clone())),
                policy("fresh", None),
            ],
        ))
        .await
        .unwrap(),
        registered(&["shared", "fresh"])
    );
    let state = reg
        .device_state(&c.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, ["fresh", "shared"]);
    assert_eq!(count_kind(&reg, "policy.created").await, 2);
    assert_eq!(count_kind(&reg, "policy.attached").await, 4);
}

/// A policy given by name only is attached if it exists, refused if it does not.
async fn attach_existing_by_name(url: &str) {
    let reg = open(url).await.unwrap();
    let a = provisioned(&reg, "a").await;
    let b = provisioned(&reg, "b").await;
    let c = provisioned(&reg, "c").await;
    reg.register(&registration(
        &a,
        1,
        vec![policy("base", Some(document("base")))],
    ))
    .await
    .unwrap();

    assert_eq!(
        reg.register(&registration(&b, 1, vec![policy("base", None)]))
            .await
            .unwrap(),
        registered(&["base"])
    );
    let state = reg
        .device_state(&b.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, ["base"]);
    assert!(state.certificate.registered_at.is_some());
    assert_eq!(count_kind(&reg, "policy.created").await, 1);
    let attached: Vec<EventRecord> = events_of(&reg, "b")
        .await
        .into_iter()
        .filter(|e| e.kind == "policy.attached")
        .collect();
    assert_eq!(attached.len(), 1);
    assert_eq!(attached[0].serial.as_deref(), Some(serial(&b)));
    assert_eq!(attached[0].detail["policy"], "base");

    let before = snapshot(&reg).await;
    let outcome = reg
        .register(&registration(
            &c,
            1,
            vec![policy("base", None), policy("missing", None)],
        ))
        .await
        .unwrap();
    refused_because(&outcome, &["\"missing\"", "does not exist"]);
    assert_eq!(snapshot(&reg).await, before);
    assert_eq!(reg.get_policy("missing").await.unwrap(), None);
}

/// A registration computed from an outdated thing is turned back; nothing is written.
async fn thing_changed_on_version_mismatch(url: &str) {
    let reg = open(url).await.unwrap();
    let a = provisioned(&reg, "t1").await;
    let before = snapshot(&reg).await;
    for stale in [0, 2] {
        assert_eq!(
            reg.register(&registration(
                &a,
                stale,
                vec![policy("p", Some(document("p")))]
            ))
            .await
            .unwrap(),
            RegistrationOutcome::ThingChanged
        );
    }
    assert_eq!(snapshot(&reg).await, before);
    assert_eq!(reg.get_policy("p").await.unwrap(), None);

    // A template change through record_issued bumps the version.
    let mut second = expecting(record("t1", AT + 10), &[serial(&a)]);
    second.template = Some("v2".to_owned());
    assert_eq!(reg.record_issued(&[second]).await.unwrap(), vec![EXISTING]);
    let thing = reg.get_thing("t1").await.unwrap().unwrap();
    assert_eq!((thing.template.as_deref(), thing.version), (Some("v2"), 2));
    assert_eq!(
        reg.register(&registration(&a, 1, Vec::new()))
            .await
            .unwrap(),
        RegistrationOutcome::ThingChanged
    );
    assert_eq!(
        reg.register(&registration(&a, 2, Vec::new()))
            .await
            .unwrap(),
        registered(&[])
    );
    assert_eq!(reg.get_thing("t1").await.unwrap().unwrap().version, 3);
}

/// Unknown, superseded and revoked certificates, and a certificate of another thing, are
/// refused with a reason; nothing is written.
async fn registration_refusals(url: &str) {
    let reg = open(url).await.unwrap();
    let a = provisioned(&reg, "t1").await;
    let b = superseding(record("t1", AT + 1), &[serial(&a)]);
    reg.record_issued(std::slice::from_ref(&b)).await.unwrap();
    let c = provisioned(&reg, "t2").await;
    let d = revoking(record("t2", AT + 1), &[serial(&c)]);
    reg.record_issued(std::slice::from_ref(&d)).await.unwrap();
    let e = provisioned(&reg, "t3").await;
    let before = snapshot(&reg).await;
    let policies = || vec![policy("p", Some(document("p")))];

    let mut unknown = registration(&a, 1, policies());
    unknown.serial = "ffffffffffffffffffffffffffffffff".to_owned();
    refused_because(
        &reg.register(&unknown).await.unwrap(),
        &["ffffffffffffffffffffffffffffffff", "not in the registry"],
    );
    refused_because(
        &reg.register(&registration(&a, 1, policies()))
            .await
            .unwrap(),
        &[serial(&a), "superseded"],
    );
    refused_because(
        &reg.register(&registration(&c, 1, policies()))
            .await
            .unwrap(),
        &[serial(&c), "revoked"],
    );
    let mut elsewhere = registration(&e, 1, policies());
    elsewhere.thing_name = "t1".to_owned();
    refused_because(
        &reg.register(&elsewhere).await.unwrap(),
        &[serial(&e), "\"t3\"", "\"t1\""],
    );
    elsewhere.thing_name = "no-such-thing".to_owned();
    refused_because(&reg.register(&elsewhere).await.unwrap(), &["belongs to"]);
    assert_eq!(snapshot(&reg).await, before);

    // The active certificates still register.
    for r in [&b, &d, &e] {
        assert_eq!(
            reg.register(&registration(r, 1, policies())).await.unwrap(),
            registered(&["p"])
        );
    }
}

/// A group of registrations in one transaction (group commit): each applies entirely or
/// not at all, in order, as if made one after another.
async fn register_batch_isolates_each(url: &str) {
    let reg = open(url).await.unwrap();
    assert!(reg.register_batch(&[]).await.unwrap().is_empty());
    let a = provisioned(&reg, "t1").await;
    let b = provisioned(&reg, "t2").await;
    let c = provisioned(&reg, "t3").await;
    let d = provisioned(&reg, "t4").await;
    let p = || policy("p", Some(document("p")));

    let mut unknown = registration(&a, 1, vec![p()]);
    unknown.serial = "ffffffffffffffffffffffffffffffff".to_owned();
    // Creates `q`, then is refused: `p` exists (from the first) with another document.
    let conflicting = registration(
        &d,
        1,
        vec![
            policy("q", Some(document("q"))),
            policy("p", Some(document("x"))),
        ],
    );
    let group = [
        registration(&a, 1, vec![p()]),
        unknown,
        registration(&b, 1, vec![p()]),
        registration(&a, 1, vec![p()]),
        registration(&c, 7, vec![p()]),
        conflicting,
    ];
    let outcomes = reg.register_batch(&group).await.unwrap();
    assert_eq!(outcomes.len(), group.len());
    assert_eq!(outcomes[0], registered(&["p"]));
    refused_because(&outcomes[1], &["ffffffffffffffffffffffffffffffff"]);
    assert_eq!(outcomes[2], registered(&["p"]));
    assert_eq!(outcomes[3], already(&["p"]));
    assert_eq!(outcomes[4], RegistrationOutcome::ThingChanged);
    refused_because(&outcomes[5], &["\"p\""]);

    for (r, is_registered) in [(&a, true), (&b, true), (&c, false), (&d, false)] {
        let cert = reg.get_certificate(serial(r)).await.unwrap().unwrap();
        assert_eq!(
            cert.registered_at.is_some(),
            is_registered,
            "{}",
            r.thing_name
        );
        let thing = reg.get_thing(&r.thing_name).await.unwrap().unwrap();
        assert_eq!(thing.version, if is_registered { 2 } else { 1 });
    }
    // The refused registration's policy creation was rolled back with it.
    assert_eq!(reg.get_policy("q").await.unwrap(), None);
    assert_eq!(count_kind(&reg, "certificate.registered").await, 2);
    assert_eq!(count_kind(&reg, "policy.created").await, 1);
}

/// A group of first connects of different devices (on SQLite, read and written a group at
/// a time): each decided as if alone, in order, and written in full.
async fn register_batch_of_distinct_devices(url: &str) {
    let reg = open(url).await.unwrap();
    let p = || policy("p", Some(document("p")));
    let first = provisioned(&reg, "d0").await;
    assert_eq!(
        reg.register(&registration(&first, 1, vec![p()]))
            .await
            .unwrap(),
        registered(&["p"])
    );
    let a = provisioned(&reg, "d1").await;
    let b = provisioned(&reg, "d2").await;
    let c = provisioned(&reg, "d3").await;
    let d = provisioned(&reg, "d4").await;
    let e = provisioned(&reg, "d5").await;
    let mut unknown = registration(&e, 1, vec![p()]);
    unknown.thing_name = "d-nowhere".to_owned();
    let group = [
        registration(&a, 1, vec![p(), policy("p", None)]),
        registration(&b, 7, vec![p()]),
        registration(&c, 1, vec![policy("missing", None)]),
        registration(&d, 1, vec![policy("p", None)]),
        unknown,
    ];
    let outcomes = reg.register_batch(&group).await.unwrap();
    assert_eq!(outcomes.len(), group.len());
    assert_eq!(outcomes[0], registered(&["p"]));
    assert_eq!(outcomes[1], RegistrationOutcome::ThingChanged);
    refused_because(&outcomes[2], &["\"missing\""]);
    assert_eq!(outcomes[3], registered(&["p"]));
    refused_because(&outcomes[4], &["d-nowhere"]);

    for (r, is_registered) in [(&a, true), (&b, false), (&c, false), (&d, true)] {
        let cert = reg.get_certificate(serial(r)).await.unwrap().unwrap();
        assert_eq!(
            cert.registered_at,
            is_registered.then_some(AT + 1_000),
            "{}",
            r.thing_name
        );
        let thing = reg.get_thing(&r.thing_name).await.unwrap().unwrap();
        let attached: Vec<String> = reg
            .policies_of_certificate(serial(r))
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        if is_registered {
            assert_eq!(thing.version, 2);
            assert_eq!(thing.template.as_deref(), Some("sensor"));
            assert_eq!(thing.details, sensor_details().normalised());
            assert_eq!(thing.updated_at, AT + 1_000);
            assert_eq!(attached, vec!["p".to_owned()]);
            assert_eq!(
                kinds_of(&reg, serial(r))
                    .await
                    .iter()
                    .filter(|k| k.starts_with("certificate.registered")
                        || k.starts_with("policy.attached"))
                    .count(),
                2,
                "{}",
                r.thing_name
            );
        } else {
            assert_eq!(thing.version, 1);
            assert!(attached.is_empty());
        }
    }
    assert_eq!(reg.get_policy("missing").await.unwrap(), None);
    assert_eq!(count_kind(&reg, "certificate.registered").await, 3);
    assert_eq!(count_kind(&reg, "thing.updated").await, 3);
    // The same device again: already registered, nothing written.
    let before = snapshot(&reg).await;
    assert_eq!(
        reg.register_batch(&[
            registration(&a, 2, vec![p()]),
            registration(&b, 1, vec![p()])
        ])
        .await
        .unwrap(),
        vec![already(&["p"]), registered(&["p"])]
    );
    assert_ne!(snapshot(&reg).await, before);
    assert_eq!(count_kind(&reg, "certificate.registered").await, 4);
}

/// Ten concurrent first connects of one device (through ten registries, as ten server
/// processes would): exactly one registration.
async fn concurrent_registration_once(url: &str) {
    let reg = open(url).await.unwrap();
    let r = provisioned(&reg, "racer").await;
    let mut registries = Vec::new();
    for _ in 0..10 {
        registries.push(open(url).await.unwrap());
    }
    let registration = registration(
        &r,
        1,
        vec![
            policy("pub", Some(document("pub"))),
            policy("sub", Some(document("sub"))),
        ],
    );
    let tasks: Vec<_> = registries
        .iter()
        .map(|reg| {
            let (reg, registration) = (reg.clone(), registration.clone());
            tokio::spawn(async move { reg.register(&registration).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    let won = outcomes
        .iter()
        .filter(|o| **o == registered(&["pub", "sub"]))
        .count();
    let lost = outcomes
        .iter()
        .filter(|o| **o == already(&["pub", "sub"]))
        .count();
    assert_eq!((won, lost), (1, 9), "{outcomes:?}");
    let state = reg
        .device_state(&r.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, ["pub", "sub"]);
    assert_eq!(state.thing.version, 2);
    for (kind, n) in [
        ("thing.updated", 1),
        ("policy.created", 2),
        ("policy.attached", 2),
        ("certificate.registered", 1),
    ] {
        assert_eq!(count_kind(&reg, kind).await, n, "{kind}");
    }

    // Ten devices at once creating the same new policy: all registered, one creation.
    let records: Vec<IssueRecord> = (0..10).map(|i| record(&format!("d{i}"), AT)).collect();
    reg.record_issued(&records).await.unwrap();
    let tasks: Vec<_> = records
        .iter()
        .zip(&registries)
        .map(|(r, reg)| {
            let reg = reg.clone();
            let registration = self::registration(
                r,
                1,
                vec![
                    policy("fleet", Some(document("fleet/*"))),
                    policy("pub", None),
                ],
            );
            tokio::spawn(async move { reg.register(&registration).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), registered(&["fleet", "pub"]));
    }
    assert_eq!(count_kind(&reg, "policy.created").await, 3);
    assert_eq!(count_kind(&reg, "certificate.registered").await, 11);
    let created: Vec<EventRecord> = reg
        .list_events(&EventFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "policy.created" && e.detail["policy"] == "fleet")
        .collect();
    assert_eq!(created.len(), 1);
}

/// Connection records: newest first, pruned to the newest 32 per certificate.
async fn connections_are_pruned(url: &str) {
    let reg = open(url).await.unwrap();
    // Odd ones are MQTT sessions: the session columns round-trip on both backends.
    let conn = |fp: &str, i: i64| {
        let mut c = ConnectionRecord::https(
            fp,
            &format!("thing-{fp}"),
            &format!("10.0.0.{}:5000", i % 250),
            AT + i,
        );
        if i % 2 == 1 {
            c.transport = ConnectionTransport::Mqtt;
            c.client_id = Some(format!("client-{i}"));
            c.disconnected_at = Some(AT + i + 7);
            c.disconnect_reason = Some("duplicate_client_id".to_owned());
        }
        c
    };
    let (fa, fb, fc) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    // Two flushes for `fa` (20 + 20), interleaved with three for `fb`.
    for half in [0..20, 20..40] {
        let mut batch = Vec::new();
        for i in half {
            batch.push(conn(&fa, i));
            if i % 10 == 0 {
                batch.push(conn(&fb, i));
            }
        }
        reg.record_connections(&batch).await.unwrap();
    }
    // One flush of 50 for `fc`.
    let batch: Vec<ConnectionRecord> = (0..50).map(|i| conn(&fc, i)).collect();
    reg.record_connections(&batch).await.unwrap();
    reg.record_connections(&[]).await.unwrap();

    let ats = |v: Vec<ConnectionRecord>| v.into_iter().map(|c| c.at - AT).collect::<Vec<_>>();
    let a = reg.recent_connections(&fa).await.unwrap();
    assert_eq!(a.len(), MAX_CONNECTIONS_PER_CERTIFICATE);
    assert_eq!(a[0], conn(&fa, 39));
    assert_eq!(a[0].transport, ConnectionTransport::Mqtt);
    assert_eq!(a[1], conn(&fa, 38));
    assert_eq!(a[1].client_id, None);
    assert_eq!(ats(a), (8..40).rev().collect::<Vec<_>>());
    assert_eq!(
        ats(reg.recent_connections(&fb).await.unwrap()),
        [30, 20, 10, 0]
    );
    assert_eq!(
        ats(reg.recent_connections(&fc).await.unwrap()),
        (18..50).rev().collect::<Vec<_>>()
    );
    assert!(reg.recent_connections("none").await.unwrap().is_empty());

    // Pruned in the database, not just hidden.
    for (fp, kept) in [(&fa, 32), (&fb, 4), (&fc, 32)] {
        let deleted = testing::execute_raw(
            url,
            &format!("DELETE FROM connections WHERE fingerprint_sha256 = '{fp}'"),
        )
        .await
        .unwrap();
        assert_eq!(deleted, kept);
    }
}

/// Revoked certificates are listed until they expire; superseded ones are not.
async fn revoked_serials_exclude_expired(url: &str) {
    let reg = open(url).await.unwrap();
    let a = provisioned(&reg, "t1").await;
    let a2 = revoking(record("t1", AT + 1), &[serial(&a)]);
    let mut b = record("t2", AT);
    b.certificate.not_after = AT + 10;
    reg.record_issued(&[a2.clone(), b.clone()]).await.unwrap();
    let b2 = revoking(record("t2", AT + 1), &[serial(&b)]);
    let c = provisioned(&reg, "t3").await;
    let c2 = superseding(record("t3", AT + 1), &[serial(&c)]);
    reg.record_issued(&[b2, c2]).await.unwrap();

    let mut both = vec![serial(&a).to_owned(), serial(&b).to_owned()];
    both.sort();
    assert_eq!(reg.revoked_serials(AT).await.unwrap(), both);
    assert_eq!(reg.revoked_serials(AT + 10).await.unwrap(), both);
    assert_eq!(reg.revoked_serials(AT + 11).await.unwrap(), [serial(&a)]);
    assert!(
        reg.revoked_serials(AT + 400 * DAY)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------
// Rotation, revocation and CRL stories

/// "Now" in the rotation stories: past the renewal point of [`due_fleet`] certificates.
const NOW: i64 = AT + 100 * DAY;

/// `n` delivered certificates of origin `origin`, one per new thing `{prefix}-{i:05}`,
/// due for rotation from `renew_at`.
async fn due_fleet(
    reg: &Arc<dyn Registry>,
    prefix: &str,
    n: usize,
    renew_at: i64,
    origin: CertOrigin,
) -> Vec<IssueRecord> {
    let records: Vec<IssueRecord> = (0..n)
        .map(|i| {
            let mut r = record(&format!("{prefix}-{i:05}"), AT);
            r.certificate.renew_at = renew_at;
            r.certificate.origin = origin;
            r
        })
        .collect();
    for chunk in records.chunks(1_000) {
        let outcomes = reg.record_issued(chunk).await.unwrap();
        assert!(outcomes.iter().all(|o| *o == CREATED), "{outcomes:?}");
        let serials: Vec<String> = chunk.iter().map(|r| serial(r).to_owned()).collect();
        reg.mark_delivered(&serials, AT + 1).await.unwrap();
    }
    records
}

/// A pre-issued replacement of `old` (generated key, sealed).
fn replacement_for(old: &str, at: i64) -> PreparedReplacement {
    let new = cert(at + 365 * DAY);
    PreparedReplacement {
        old_serial: old.to_owned(),
        sealed_key: format!("sealed key of {}", new.serial).into_bytes(),
        new,
        at,
    }
}

/// A replacement delivered in the exchange (EST), authenticated by `auth`.
fn est(auth: &str, thing: &str, at: i64) -> Replacement {
    let mut new = cert(at + 365 * DAY);
    new.origin = CertOrigin::Csr;
    Replacement {
        authenticated_serial: auth.to_owned(),
        thing_name: thing.to_owned(),
        new,
        sealed_key: None,
        max_replacements: None,
        at,
    }
}

fn serials_of(certs: &[fleetcert_registry::CertificateRecord]) -> Vec<String> {
    certs.iter().map(|c| c.serial.clone()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// [`snapshot`] plus rotations, revocations and CRLs.
async fn full_snapshot(reg: &Arc<dyn Registry>) -> String {
    let rotations = reg
        .list_rotations(&RotationFilter::default())
        .await
        .unwrap();
    let revoked = reg.revoked_entries(0).await.unwrap();
    let crl = reg.latest_crl().await.unwrap();
    format!(
        "{}\n{rotations:?}\n{revoked:?}\n{crl:?}",
        snapshot(reg).await
    )
}

/// Rows holding a sealed key (counted through a no-op update, which both backends
/// report as rows affected).
async fn sealed_keys(url: &str) -> u64 {
    testing::execute_raw(
        url,
        "UPDATE rotations SET sealed_key = sealed_key WHERE sealed_key IS NOT NULL",
    )
    .await
    .unwrap()
}

async fn events_of_serial(reg: &Arc<dyn Registry>, serial: &str) -> Vec<EventRecord> {
    reg.list_events(&EventFilter {
        serial: Some(serial.to_owned()),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn rotation(reg: &Arc<dyn Registry>, old: &str) -> RotationRecord {
    reg.get_rotation(old)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no rotation of {old}"))
}

async fn status(reg: &Arc<dyn Registry>, serial: &str) -> CertStatus {
    reg.get_certificate(serial).await.unwrap().unwrap().status
}

fn refused_with(outcome: &ReplaceOutcome, expected: &str, words: &[&str]) {
    match outcome {
        ReplaceOutcome::Refused { code, reason } => {
            assert_eq!(*code, expected, "{reason}");
            for w in words {
                assert!(reason.contains(w), "{w:?} not in {reason:?}");
            }
        }
        other => panic!("expected Refused({expected}), got {other:?}"),
    }
}

/// Due selection honours the renewal point, `expiring_before`, delivery and status;
/// opening rotations is idempotent (one row and one event per certificate), chunked,
/// and safe when two registries open at once.
async fn due_selection_and_idempotent_open(url: &str) {
    let reg = open(url).await.unwrap();
    let mk = |thing: &str, renew_at: i64, not_after: i64| {
        let mut r = record(thing, AT);
        r.certificate.renew_at = renew_at;
        r.certificate.not_after = not_after;
        r
    };
    let year = AT + 365 * DAY;
    let g = mk("g", AT + 10 * DAY, year);
    let a = mk("a", AT + 20 * DAY, year);
    let f = mk("f", AT + 20 * DAY, year);
    let h = mk("h", NOW, year);
    let later = mk("later", NOW + 1, year);
    let b = mk("b", NOW + 10 * DAY, NOW + 30 * DAY);
    let undelivered = mk("c", AT + 10 * DAY, year);
    let d0 = mk("d", AT + 10 * DAY, year);
    let e0 = mk("e", AT + 10 * DAY, year);
    let firsts = [&g, &a, &f, &h, &later, &b, &undelivered, &d0, &e0];
    let firsts: Vec<IssueRecord> = firsts.into_iter().cloned().collect();
    reg.record_issued(&firsts).await.unwrap();
    let delivered: Vec<String> = firsts
        .iter()
        .filter(|r| r.thing_name != "c")
        .map(|r| serial(r).to_owned())
        .collect();
    reg.mark_delivered(&delivered, AT + 1).await.unwrap();
    // A superseded and a revoked certificate past their renewal point; their successors
    // renew much later.
    let mut d1 = superseding(record("d", AT + 2), &[serial(&d0)]);
    d1.certificate.renew_at = year;
    let mut e1 = revoking(record("e", AT + 2), &[serial(&e0)]);
    e1.certificate.renew_at = year;
    reg.record_issued(&[d1.clone(), e1.clone()]).await.unwrap();
    reg.mark_delivered(&[serial(&d1).to_owned(), serial(&e1).to_owned()], AT + 3)
        .await
        .unwrap();

    let mut tied = vec![serial(&a).to_owned(), serial(&f).to_owned()];
    tied.sort();
    let mut expected = vec![serial(&g).to_owned()];
    expected.extend(tied);
    expected.push(serial(&h).to_owned());
    let before = full_snapshot(&reg).await;
    let due = |now, before, limit| {
        let reg = reg.clone();
        async move { serials_of(&reg.due_certificates(now, before, limit).await.unwrap()) }
    };
    assert_eq!(due(NOW, None, None).await, expected);
    assert_eq!(due(NOW, None, Some(2)).await, expected[..2]);
    assert_eq!(due(NOW - 1, None, None).await, expected[..3]);
    let mut with_b = expected.clone();
    with_b.push(serial(&b).to_owned());
    assert_eq!(due(NOW, Some(NOW + 30 * DAY), None).await, with_b);
    assert_eq!(due(NOW, Some(NOW + 30 * DAY - 1), None).await, expected);
    let full = reg
        .due_certificates(NOW, None, Some(1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        full,
        reg.get_certificate(serial(&g)).await.unwrap().unwrap()
    );
    assert_eq!(full_snapshot(&reg).await, before, "due_certificates wrote");

    // Open: once.
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 4);
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 0);
    assert!(due(NOW, None, None).await.is_empty());
    assert_eq!(count_kind(&reg, "rotation.due").await, 4);
    assert_eq!(
        reg.get_rotation(serial(&a)).await.unwrap(),
        Some(RotationRecord {
            old_serial: serial(&a).to_owned(),
            thing_name: "a".to_owned(),
            origin: CertOrigin::Generated,
            state: RotationState::Due,
            due_at: NOW,
            new_serial: None,
            lease_owner: None,
            lease_until: None,
            attempts: 0,
            last_error: None,
            updated_at: NOW,
        })
    );
    let events = events_of_serial(&reg, serial(&a)).await;
    let opened = events.last().unwrap();
    assert_eq!(opened.kind, "rotation.due");
    assert_eq!((opened.at, opened.thing_name.as_deref()), (NOW, Some("a")));
    assert_eq!(opened.detail["renew_at"], AT + 20 * DAY);
    for r in [&undelivered, &d0, &e0, &d1, &e1, &later, &b] {
        assert_eq!(reg.get_rotation(serial(r)).await.unwrap(), None);
    }
    let state = reg
        .device_state(&a.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.rotation, reg.get_rotation(serial(&a)).await.unwrap());
    assert!(!state.confirms_rotation);

    // By expiry: only `b` is left.
    assert_eq!(
        reg.open_due_rotations(NOW, Some(NOW + 30 * DAY))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        reg.open_due_rotations(NOW, Some(NOW + 30 * DAY))
            .await
            .unwrap(),
        0
    );
    assert_eq!(count_kind(&reg, "rotation.due").await, 5);
    assert_eq!(rotation(&reg, serial(&b)).await.state, RotationState::Due);

    // Listing: by (due_at, old_serial), filtered.
    let all = reg
        .list_rotations(&RotationFilter::default())
        .await
        .unwrap();
    let mut five = expected.clone();
    five.push(serial(&b).to_owned());
    assert_eq!(
        all.iter().map(|r| r.old_serial.clone()).collect::<Vec<_>>(),
        sorted(five)
    );
    let of_b = reg
        .list_rotations(&RotationFilter {
            thing_name: Some("b".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].old_serial, serial(&b));
    let due_two = reg
        .list_rotations(&RotationFilter {
            state: Some(RotationState::Due),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(due_two, all[..2]);
    assert!(
        reg.list_rotations(&RotationFilter {
            state: Some(RotationState::Issued),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty()
    );

    // Many at once (several transactions, equal renewal points): each once.
    due_fleet(&reg, "bulk", 5_000, AT + 30 * DAY, CertOrigin::Generated).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 5_000);
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 0);
    assert_eq!(count_kind(&reg, "rotation.due").await, 5_005);

    // Two registries opening the same certificates at once.
    due_fleet(&reg, "race", 3_000, AT + 40 * DAY, CertOrigin::Csr).await;
    let (x, y) = (open(url).await.unwrap(), open(url).await.unwrap());
    let (x, y) = tokio::join!(
        tokio::spawn(async move { x.open_due_rotations(NOW, None).await }),
        tokio::spawn(async move { y.open_due_rotations(NOW, None).await }),
    );
    assert_eq!(x.unwrap().unwrap() + y.unwrap().unwrap(), 3_000);
    assert_eq!(count_kind(&reg, "rotation.due").await, 8_005);
    let csr = reg
        .list_rotations(&RotationFilter {
            thing_name: Some("race-02999".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(csr.len(), 1);
    assert_eq!(csr[0].origin, CertOrigin::Csr);
}

/// Two workers claim and complete 2,000 rotations concurrently: each exactly once.
async fn concurrent_workers_complete_once(url: &str) {
    let reg = open(url).await.unwrap();
    let olds = due_fleet(&reg, "w", 2_000, AT + 50 * DAY, CertOrigin::Generated).await;
    due_fleet(&reg, "csr", 3, AT + 50 * DAY, CertOrigin::Csr).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 2_003);

    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|owner| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let reg = open(&url).await.unwrap();
                let mut completed = Vec::new();
                loop {
                    let claims = reg.claim_rotations(owner, NOW, 300, 50).await.unwrap();
                    if claims.is_empty() {
                        break;
                    }
                    assert!(claims.len() <= 50);
                    let items: Vec<PreparedReplacement> = claims
                        .iter()
                        .map(|c| {
                            assert_eq!(c.template.as_deref(), Some("default"));
                            assert_eq!(c.old.origin, CertOrigin::Generated);
                            assert_eq!(c.old.status, CertStatus::Active);
                            replacement_for(&c.old.serial, NOW + 1)
                        })
                        .collect();
                    let done = reg.complete_rotations(owner, &items).await.unwrap();
                    assert_eq!(done, vec![true; items.len()]);
                    completed.extend(items.into_iter().map(|i| (i.old_serial, i.new.serial)));
                }
                completed
            })
        })
        .collect();
    let mut completed = Vec::new();
    for w in workers {
        completed.extend(w.await.unwrap());
    }
    assert_eq!(completed.len(), 2_000);
    let by_old: std::collections::HashMap<String, String> = completed.iter().cloned().collect();
    assert_eq!(by_old.len(), 2_000, "a rotation was completed twice");
    let old_serials: HashSet<String> = olds.iter().map(|r| serial(r).to_owned()).collect();
    assert_eq!(by_old.keys().cloned().collect::<HashSet<_>>(), old_serials);

    let certs = reg
        .list_certificates(&CertificateFilter::default())
        .await
        .unwrap();
    let replacements: Vec<_> = certs.iter().filter(|c| c.replaces.is_some()).collect();
    assert_eq!(replacements.len(), 2_000);
    let replaced: HashSet<String> = replacements
        .iter()
        .map(|c| c.replaces.clone().unwrap())
        .collect();
    assert_eq!(
        replaced, old_serials,
        "an old certificate has two replacements"
    );
    for c in &replacements {
        assert_eq!(by_old[c.replaces.as_ref().unwrap()], c.serial);
        assert_eq!(c.status, CertStatus::Active);
        assert_eq!((c.delivered_at, c.registered_at), (None, None));
        assert_eq!(c.created_at, NOW + 1);
        assert_eq!(
            c.thing_name,
            reg.get_certificate(c.replaces.as_ref().unwrap())
                .await
                .unwrap()
                .unwrap()
                .thing_name
        );
    }
    assert_eq!(count_kind(&reg, "rotation.issued").await, 2_000);
    assert_eq!(count_kind(&reg, "certificate.issued").await, 4_003);
    let issued = reg
        .list_rotations(&RotationFilter {
            state: Some(RotationState::Issued),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(issued.len(), 2_000);
    for r in &issued {
        assert_eq!(r.new_serial.as_ref(), Some(&by_old[&r.old_serial]));
        assert_eq!((r.lease_owner.as_deref(), r.lease_until), (None, None));
        assert_eq!(r.updated_at, NOW + 1);
    }
    // The old certificates stay active until their replacement is fetched.
    for r in olds.iter().step_by(97) {
        assert_eq!(status(&reg, serial(r)).await, CertStatus::Active);
    }
    // Device-generated keys are never claimed.
    assert!(
        reg.claim_rotations("w3", NOW + 10 * DAY, 300, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let still_due = reg
        .list_rotations(&RotationFilter {
            state: Some(RotationState::Due),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(still_due.len(), 3);
    assert!(still_due.iter().all(|r| r.origin == CertOrigin::Csr));
}

/// An expired lease is taken over; the first owner's late completion (or failure)
/// writes nothing. Items that lost their lease are `false` beside those that complete;
/// a duplicate serial commits nothing.
async fn lease_expiry_and_late_complete(url: &str) {
    let reg = open(url).await.unwrap();
    due_fleet(&reg, "l", 2, AT + 50 * DAY, CertOrigin::Generated).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 2);

    let first = reg.claim_rotations("a", NOW, 60, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let x = first[0].old.serial.clone();
    let second = reg.claim_rotations("b", NOW + 30, 60, 10).await.unwrap();
    assert_eq!(second.len(), 1);
    let y = second[0].old.serial.clone();
    assert_ne!(x, y);
    assert!(x < y, "claims come in (due_at, old_serial) order");
    // At NOW + 60 the lease of `a` has not expired yet (lease_until < now).
    assert!(
        reg.claim_rotations("b", NOW + 60, 60, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let leased = rotation(&reg, &x).await;
    assert_eq!(
        (leased.lease_owner.as_deref(), leased.lease_until),
        (Some("a"), Some(NOW + 60))
    );
    assert_eq!(leased.state, RotationState::Due);
    let stolen = reg.claim_rotations("b", NOW + 61, 60, 10).await.unwrap();
    assert_eq!(
        serials_of(&stolen.iter().map(|c| c.old.clone()).collect::<Vec<_>>()),
        std::slice::from_ref(&x)
    );
    let leased = rotation(&reg, &x).await;
    assert_eq!(
        (leased.lease_owner.as_deref(), leased.lease_until),
        (Some("b"), Some(NOW + 121))
    );

    let before = full_snapshot(&reg).await;
    let late = replacement_for(&x, NOW + 62);
    assert_eq!(
        reg.complete_rotations("a", std::slice::from_ref(&late))
            .await
            .unwrap(),
        [false]
    );
    assert!(
        !reg.fail_rotation("a", &x, "too late", NOW + 62, 5)
            .await
            .unwrap()
    );
    assert_eq!(
        full_snapshot(&reg).await,
        before,
        "a lost lease wrote something"
    );
    assert_eq!(reg.get_certificate(&late.new.serial).await.unwrap(), None);

    // `b` holds both leases: an unknown rotation and a repeated one are `false`.
    let items = [
        replacement_for(&x, NOW + 63),
        replacement_for("ffffffffffffffffffffffffffffffff", NOW + 63),
        replacement_for(&y, NOW + 63),
        replacement_for(&x, NOW + 63),
    ];
    assert_eq!(
        reg.complete_rotations("b", &items).await.unwrap(),
        [true, false, true, false]
    );
    for (item, recorded) in items.iter().zip([true, false, true, false]) {
        assert_eq!(
            reg.get_certificate(&item.new.serial)
                .await
                .unwrap()
                .is_some(),
            recorded
        );
    }
    let done = rotation(&reg, &x).await;
    assert_eq!(done.state, RotationState::Issued);
    assert_eq!(
        done.new_serial.as_deref(),
        Some(items[0].new.serial.as_str())
    );
    assert_eq!((done.lease_owner, done.lease_until), (None, None));
    assert_eq!(done.updated_at, NOW + 63);
    // No longer due: a second completion is refused.
    assert_eq!(
        reg.complete_rotations("b", &[replacement_for(&x, NOW + 64)])
            .await
            .unwrap(),
        [false]
    );
    assert_eq!(count_kind(&reg, "rotation.issued").await, 2);

    // A duplicate serial or fingerprint fails the call and commits nothing.
    let z = due_fleet(&reg, "dup", 2, AT + 50 * DAY, CertOrigin::Generated).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 2);
    assert_eq!(
        reg.claim_rotations("c", NOW, 60, 10).await.unwrap().len(),
        2
    );
    let before = full_snapshot(&reg).await;
    let good = replacement_for(serial(&z[0]), NOW + 1);
    let mut clash = replacement_for(serial(&z[1]), NOW + 1);
    clash.new.serial = items[0].new.serial.clone();
    let err = reg
        .complete_rotations("c", &[good.clone(), clash.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::DuplicateSerial(s) if *s == clash.new.serial),
        "{err:?}"
    );
    let mut same_fp = replacement_for(serial(&z[1]), NOW + 1);
    same_fp.new.fingerprint_sha256 = z[0].certificate.fingerprint_sha256.clone();
    assert!(matches!(
        reg.complete_rotations("c", &[good.clone(), same_fp]).await,
        Err(RegistryError::DuplicateSerial(_))
    ));
    let mut twice = replacement_for(serial(&z[1]), NOW + 1);
    twice.new.serial = good.new.serial.clone();
    assert!(matches!(
        reg.complete_rotations("c", &[good.clone(), twice]).await,
        Err(RegistryError::DuplicateSerial(_))
    ));
    assert_eq!(
        full_snapshot(&reg).await,
        before,
        "a failed completion wrote"
    );
    let ok = replacement_for(serial(&z[1]), NOW + 1);
    assert_eq!(
        reg.complete_rotations("c", &[good, ok]).await.unwrap(),
        [true, true]
    );
}

/// A pre-issued replacement is fetched (the same key and certificate again until it is
/// used; the sealed key deleted at its first use) and confirmed by its first use: old active → superseded → revoked, rotation issued →
/// delivered → confirmed; policies follow the certificate.
async fn take_then_confirm(url: &str) {
    let reg = open(url).await.unwrap();
    let old = due_fleet(&reg, "dev", 1, AT + 50 * DAY, CertOrigin::Generated)
        .await
        .remove(0);
    let thing = old.thing_name.clone();
    assert_eq!(
        reg.register(&registration(
            &old,
            1,
            vec![
                policy("p2", Some(document("p2"))),
                policy("p1", Some(document("p1")))
            ]
        ))
        .await
        .unwrap(),
        registered(&["p2", "p1"])
    );
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 1);
    let claims = reg.claim_rotations("w", NOW, 300, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        claims[0].old,
        reg.get_certificate(serial(&old)).await.unwrap().unwrap()
    );
    assert_eq!(claims[0].template.as_deref(), Some("sensor"));
    let item = replacement_for(serial(&old), NOW + 1);
    assert_eq!(
        reg.complete_rotations("w", std::slice::from_ref(&item))
            .await
            .unwrap(),
        [true]
    );

    let new = reg
        .get_certificate(&item.new.serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.status, CertStatus::Active);
    assert_eq!(new.thing_name, thing);
    assert_eq!(new.delivered_at, None);
    assert_eq!(new.replaces.as_deref(), Some(serial(&old)));
    assert_eq!(new.registered_at, Some(NOW + 1));
    assert_eq!(new.renew_at, item.new.renew_at);
    assert_eq!(new.der, item.new.der);
    assert_eq!(new.fingerprint_sha256, item.new.fingerprint_sha256);
    let fp_new = new.fingerprint_sha256.clone();
    let fp_old = old.certificate.fingerprint_sha256.clone();
    let state = reg.device_state(&fp_new).await.unwrap().unwrap();
    assert_eq!(state.policies, ["p1", "p2"]);
    assert!(state.confirms_rotation);
    assert_eq!(state.rotation, None);
    let state = reg.device_state(&fp_old).await.unwrap().unwrap();
    assert!(!state.confirms_rotation);
    let issued = state.rotation.unwrap();
    assert_eq!(issued.state, RotationState::Issued);
    assert_eq!(issued.new_serial.as_deref(), Some(new.serial.as_str()));
    assert_eq!(sealed_keys(url).await, 1);

    // Fetch.
    let taken = reg
        .take_replacement(serial(&old), NOW + 2)
        .await
        .unwrap()
        .expect("a replacement to take");
    assert_eq!(taken.sealed_key, item.sealed_key);
    assert!(!taken.again);
    assert_eq!(taken.certificate.serial, new.serial);
    assert_eq!(taken.certificate.delivered_at, Some(NOW + 2));
    assert_eq!(
        Some(taken.certificate.clone()),
        reg.get_certificate(&new.serial).await.unwrap()
    );
    assert_eq!(status(&reg, serial(&old)).await, CertStatus::Superseded);
    let delivered = rotation(&reg, serial(&old)).await;
    assert_eq!(delivered.state, RotationState::Delivered);
    assert_eq!(delivered.new_serial.as_deref(), Some(new.serial.as_str()));
    assert_eq!(delivered.updated_at, NOW + 2);
    // The sealed key is kept until the replacement's first use: a device that lost the
    // reply (or a burst of concurrent fetches) gets the same key and certificate again,
    // and nothing is written.
    assert_eq!(
        sealed_keys(url).await,
        1,
        "the sealed key went before the replacement's first use"
    );
    let before = full_snapshot(&reg).await;
    assert_eq!(
        reg.take_replacement(serial(&old), NOW + 3).await.unwrap(),
        Some(TakenReplacement {
            again: true,
            ..taken.clone()
        })
    );
    assert_eq!(
        reg.take_replacement(&new.serial, NOW + 3).await.unwrap(),
        None
    );
    assert_eq!(full_snapshot(&reg).await, before);
    // An on-demand key is refused while this one waits: take it instead.
    let mut on_demand = est(serial(&old), &thing, NOW + 3);
    on_demand.new.origin = CertOrigin::Generated;
    on_demand.sealed_key = Some(b"another sealed key".to_vec());
    refused_with(
        &reg.replace_certificate(&on_demand).await.unwrap(),
        "replacement_pending",
        &[serial(&old), &new.serial],
    );
    assert_eq!(full_snapshot(&reg).await, before);
    assert!(
        reg.device_state(&fp_new)
            .await
            .unwrap()
            .unwrap()
            .confirms_rotation
    );

    // First use.
    assert_eq!(
        reg.confirm_replacement(serial(&old), NOW + 4)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        reg.confirm_replacement(&new.serial, NOW + 5).await.unwrap(),
        Some(serial(&old).to_owned())
    );
    let revoked = reg.get_certificate(serial(&old)).await.unwrap().unwrap();
    assert_eq!(revoked.status, CertStatus::Revoked);
    assert_eq!(revoked.revoked_at, Some(NOW + 5));
    assert_eq!(revoked.revocation_reason.as_deref(), Some("superseded"));
    let confirmed = rotation(&reg, serial(&old)).await;
    assert_eq!(confirmed.state, RotationState::Confirmed);
    assert_eq!(confirmed.updated_at, NOW + 5);
    assert_eq!(
        sealed_keys(url).await,
        0,
        "the sealed key outlived the replacement's first use"
    );
    assert_eq!(confirmed.new_serial.as_deref(), Some(new.serial.as_str()));
    let before = full_snapshot(&reg).await;
    assert_eq!(
        reg.confirm_replacement(&new.serial, NOW + 6).await.unwrap(),
        None
    );
    assert_eq!(full_snapshot(&reg).await, before);
    let state = reg.device_state(&fp_new).await.unwrap().unwrap();
    assert!(!state.confirms_rotation);
    assert_eq!(state.certificate.status, CertStatus::Active);
    assert_eq!(
        reg.device_state(&fp_old).await.unwrap().unwrap().rotation,
        Some(confirmed)
    );
    assert!(
        reg.revoked_entries(NOW)
            .await
            .unwrap()
            .iter()
            .any(|e| e.serial == serial(&old) && e.reason.as_deref() == Some("superseded"))
    );

    // Events.
    let events = events_of_serial(&reg, serial(&old)).await;
    let rotation_events: Vec<&EventRecord> = events.iter().filter(|e| e.at >= NOW).collect();
    let kinds: Vec<&str> = rotation_events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "rotation.due",
            "rotation.issued",
            "certificate.superseded",
            "rotation.delivered",
            "certificate.revoked",
            "rotation.confirmed",
        ]
    );
    for e in &rotation_events {
        assert_eq!(e.thing_name.as_deref(), Some(thing.as_str()));
    }
    assert_eq!(rotation_events[1].detail["new_serial"], new.serial.as_str());
    assert_eq!(
        rotation_events[2].detail["replaced_by"],
        new.serial.as_str()
    );
    assert_eq!(rotation_events[4].detail["reason"], "superseded");
    assert_eq!(
        rotation_events[4].detail["replaced_by"],
        new.serial.as_str()
    );
    let events = events_of_serial(&reg, &new.serial).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["certificate.issued", "certificate.delivered"]);
    assert_eq!(events[0].detail["replaces"], serial(&old));
    assert_eq!(events[0].thing_name.as_deref(), Some(thing.as_str()));
    assert_eq!((events[1].at, events[0].at), (NOW + 2, NOW + 1));
}

/// `replace_certificate`: refusals write nothing; a second replacement from the same
/// certificate revokes the unused first one; confirmation happens once under
/// concurrency; a pre-issued replacement gives way to an exchanged one.
async fn replace_refusals_and_second_replace(url: &str) {
    let reg = open(url).await.unwrap();
    let mut a0 = record("t1", AT);
    a0.certificate.origin = CertOrigin::Csr;
    reg.record_issued(std::slice::from_ref(&a0)).await.unwrap();
    let mut a = superseding(record("t1", AT + 10), &[serial(&a0)]);
    a.certificate.origin = CertOrigin::Csr;
    reg.record_issued(std::slice::from_ref(&a)).await.unwrap();
    reg.mark_delivered(&[serial(&a0).to_owned(), serial(&a).to_owned()], AT + 11)
        .await
        .unwrap();
    assert_eq!(
        reg.register(&registration(&a, 1, vec![policy("p", Some(document("p")))]))
            .await
            .unwrap(),
        registered(&["p"])
    );
    let z = provisioned(&reg, "t2").await;
    let c = provisioned(&reg, "t3").await;
    reg.record_issued(&[revoking(record("t3", AT + 1), &[serial(&c)])])
        .await
        .unwrap();

    let before = full_snapshot(&reg).await;
    let unknown = "ffffffffffffffffffffffffffffffff";
    refused_with(
        &reg.replace_certificate(&est(unknown, "t1", NOW))
            .await
            .unwrap(),
        "unknown_certificate",
        &[unknown],
    );
    refused_with(
        &reg.replace_certificate(&est(serial(&a), "t2", NOW))
            .await
            .unwrap(),
        "wrong_thing",
        &[serial(&a), "\"t1\"", "\"t2\""],
    );
    refused_with(
        &reg.replace_certificate(&est(serial(&z), "t1", NOW))
            .await
            .unwrap(),
        "wrong_thing",
        &[serial(&z)],
    );
    refused_with(
        &reg.replace_certificate(&est(serial(&c), "t3", NOW))
            .await
            .unwrap(),
        "certificate_revoked",
        &[serial(&c)],
    );
    for reused in [&a, &a0] {
        let mut same_key = est(serial(&a), "t1", NOW);
        same_key.new.public_key_sha256 = reused.certificate.public_key_sha256.clone();
        refused_with(
            &reg.replace_certificate(&same_key).await.unwrap(),
            "key_reused",
            &[serial(reused)],
        );
    }
    assert_eq!(
        full_snapshot(&reg).await,
        before,
        "a refusal wrote something"
    );

    // First replacement.
    let b1 = est(serial(&a), "t1", NOW);
    assert_eq!(
        reg.replace_certificate(&b1).await.unwrap(),
        ReplaceOutcome::Replaced { revoked: vec![] }
    );
    let got = reg.get_certificate(&b1.new.serial).await.unwrap().unwrap();
    assert_eq!(got.status, CertStatus::Active);
    assert_eq!(got.origin, CertOrigin::Csr);
    assert_eq!(got.delivered_at, Some(NOW));
    assert_eq!(got.registered_at, Some(NOW));
    assert_eq!(got.replaces.as_deref(), Some(serial(&a)));
    assert_eq!(got.thing_name, "t1");
    assert_eq!(status(&reg, serial(&a)).await, CertStatus::Superseded);
    let state = reg
        .device_state(&b1.new.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, ["p"]);
    assert!(state.confirms_rotation);
    assert_eq!(
        rotation(&reg, serial(&a)).await,
        RotationRecord {
            old_serial: serial(&a).to_owned(),
            thing_name: "t1".to_owned(),
            origin: CertOrigin::Csr,
            state: RotationState::Delivered,
            due_at: NOW,
            new_serial: Some(b1.new.serial.clone()),
            lease_owner: None,
            lease_until: None,
            attempts: 0,
            last_error: None,
            updated_at: NOW,
        }
    );
    let kinds: Vec<String> = kinds_of(&reg, serial(&a)).await;
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["certificate.superseded", "rotation.delivered"]
    );
    assert_eq!(kinds_of(&reg, &b1.new.serial).await, ["certificate.issued"]);

    // The device lost it and asks again with the old certificate.
    let b2 = est(serial(&a), "t1", NOW + 10);
    assert_eq!(
        reg.replace_certificate(&b2).await.unwrap(),
        ReplaceOutcome::Replaced {
            revoked: vec![b1.new.serial.clone()]
        }
    );
    let gone = reg.get_certificate(&b1.new.serial).await.unwrap().unwrap();
    assert_eq!(gone.status, CertStatus::Revoked);
    assert_eq!(gone.revoked_at, Some(NOW + 10));
    assert_eq!(gone.revocation_reason.as_deref(), Some("superseded"));
    let events = events_of_serial(&reg, &b1.new.serial).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].kind, "certificate.revoked");
    assert_eq!(events[1].detail["reason"], "superseded");
    assert_eq!(events[1].detail["replaced_by"], b2.new.serial.as_str());
    assert_eq!(status(&reg, serial(&a)).await, CertStatus::Superseded);
    assert_eq!(
        kinds_of(&reg, serial(&a))
            .await
            .iter()
            .filter(|k| *k == "certificate.superseded")
            .count(),
        1
    );
    let r = rotation(&reg, serial(&a)).await;
    assert_eq!(
        (r.state, r.updated_at),
        (RotationState::Delivered, NOW + 10)
    );
    assert_eq!(r.new_serial.as_deref(), Some(b2.new.serial.as_str()));

    // A duplicate serial: nothing written.
    let before = full_snapshot(&reg).await;
    let mut dup = est(serial(&a), "t1", NOW + 11);
    dup.new.serial = b2.new.serial.clone();
    assert!(matches!(
        reg.replace_certificate(&dup).await,
        Err(RegistryError::DuplicateSerial(s)) if s == b2.new.serial
    ));
    assert_eq!(full_snapshot(&reg).await, before);

    // A budget: `a` has two replacements; with at most two allowed, a third is refused
    // and nothing is written.
    let mut b3 = est(serial(&a), "t1", NOW + 12);
    b3.max_replacements = Some(2);
    refused_with(
        &reg.replace_certificate(&b3).await.unwrap(),
        "replacement_limit",
        &[serial(&a), "2 times"],
    );
    assert_eq!(full_snapshot(&reg).await, before);

    // Eight servers see the first use at once: confirmed once.
    let mut registries = Vec::new();
    for _ in 0..8 {
        registries.push(open(url).await.unwrap());
    }
    let tasks: Vec<_> = registries
        .into_iter()
        .map(|r| {
            let s = b2.new.serial.clone();
            tokio::spawn(async move { r.confirm_replacement(&s, NOW + 20).await })
        })
        .collect();
    let mut confirmed = Vec::new();
    for t in tasks {
        confirmed.extend(t.await.unwrap().unwrap());
    }
    assert_eq!(confirmed, [serial(&a).to_owned()]);
    assert_eq!(status(&reg, serial(&a)).await, CertStatus::Revoked);
    assert_eq!(
        rotation(&reg, serial(&a)).await.state,
        RotationState::Confirmed
    );
    assert_eq!(count_kind(&reg, "rotation.confirmed").await, 1);
    refused_with(
        &reg.replace_certificate(&est(serial(&a), "t1", NOW + 30))
            .await
            .unwrap(),
        "certificate_revoked",
        &[serial(&a)],
    );
    let mut own_key = est(&b2.new.serial, "t1", NOW + 30);
    own_key.new.public_key_sha256 = b2.new.public_key_sha256.clone();
    refused_with(
        &reg.replace_certificate(&own_key).await.unwrap(),
        "key_reused",
        &[&b2.new.serial],
    );

    // A pre-issued replacement that was never fetched gives way to an exchanged one.
    let g = due_fleet(&reg, "gen", 1, AT + 50 * DAY, CertOrigin::Generated)
        .await
        .remove(0);
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 1);
    assert_eq!(reg.claim_rotations("w", NOW, 60, 5).await.unwrap().len(), 1);
    let pre = replacement_for(serial(&g), NOW + 1);
    assert_eq!(
        reg.complete_rotations("w", std::slice::from_ref(&pre))
            .await
            .unwrap(),
        [true]
    );
    assert_eq!(sealed_keys(url).await, 1);
    let now = est(serial(&g), &g.thing_name, NOW + 2);
    assert_eq!(
        reg.replace_certificate(&now).await.unwrap(),
        ReplaceOutcome::Replaced {
            revoked: vec![pre.new.serial.clone()]
        }
    );
    assert_eq!(status(&reg, &pre.new.serial).await, CertStatus::Revoked);
    let r = rotation(&reg, serial(&g)).await;
    assert_eq!(r.state, RotationState::Delivered);
    assert_eq!(r.new_serial.as_deref(), Some(now.new.serial.as_str()));
    assert_eq!(sealed_keys(url).await, 0);
    assert_eq!(
        reg.take_replacement(serial(&g), NOW + 3).await.unwrap(),
        None
    );
}

/// Revocation: by serial (with undelivered replacements, cancelling the rotation and
/// deleting its key), by thing, unknown targets; `revoked_entries` drops expired ones.
async fn revoke_cascade_and_entries(url: &str) {
    let reg = open(url).await.unwrap();
    let fleet = due_fleet(&reg, "r", 3, AT + 50 * DAY, CertOrigin::Generated).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 3);
    assert_eq!(
        reg.claim_rotations("w", NOW, 300, 10).await.unwrap().len(),
        3
    );
    let pre: Vec<PreparedReplacement> = fleet
        .iter()
        .map(|r| replacement_for(serial(r), NOW + 1))
        .collect();
    assert_eq!(
        reg.complete_rotations("w", &pre).await.unwrap(),
        [true, true, true]
    );
    assert!(
        reg.take_replacement(serial(&fleet[1]), NOW + 2)
            .await
            .unwrap()
            .is_some()
    );
    // Two waiting, one handed out but not used yet (its key is kept until then).
    assert_eq!(sealed_keys(url).await, 3);

    // By serial: the certificate and its undelivered replacement.
    let entries = reg
        .revoke(&Revocation {
            target: RevocationTarget::Serial(serial(&fleet[0]).to_owned()),
            reason: "keyCompromise".to_owned(),
            at: NOW + 5,
        })
        .await
        .unwrap();
    let mut expected = vec![
        RevokedEntry {
            serial: serial(&fleet[0]).to_owned(),
            thing_name: "r-00000".to_owned(),
            revoked_at: NOW + 5,
            reason: Some("keyCompromise".to_owned()),
            not_after: fleet[0].certificate.not_after,
        },
        RevokedEntry {
            serial: pre[0].new.serial.clone(),
            thing_name: "r-00000".to_owned(),
            revoked_at: NOW + 5,
            reason: Some("keyCompromise".to_owned()),
            not_after: pre[0].new.not_after,
        },
    ];
    expected.sort_by(|x, y| x.serial.cmp(&y.serial));
    assert_eq!(entries, expected);
    let cancelled = rotation(&reg, serial(&fleet[0])).await;
    assert_eq!(
        (cancelled.state, cancelled.updated_at),
        (RotationState::Cancelled, NOW + 5)
    );
    assert_eq!(sealed_keys(url).await, 2);
    assert_eq!(
        reg.take_replacement(serial(&fleet[0]), NOW + 6)
            .await
            .unwrap(),
        None
    );
    let events = events_of_serial(&reg, serial(&fleet[0])).await;
    let tail: Vec<&str> = events[events.len() - 2..]
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(tail, ["certificate.revoked", "rotation.cancelled"]);
    assert_eq!(events[events.len() - 2].detail["reason"], "keyCompromise");
    assert_eq!(
        events[events.len() - 2].thing_name.as_deref(),
        Some("r-00000")
    );
    let events = events_of_serial(&reg, &pre[0].new.serial).await;
    assert_eq!(events.last().unwrap().kind, "certificate.revoked");
    assert_eq!(events.last().unwrap().detail["reason"], "keyCompromise");
    // Again: nothing left to revoke, nothing written.
    let before = full_snapshot(&reg).await;
    let again = reg
        .revoke(&Revocation {
            target: RevocationTarget::Serial(serial(&fleet[0]).to_owned()),
            reason: "keyCompromise".to_owned(),
            at: NOW + 7,
        })
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(full_snapshot(&reg).await, before);

    // A delivered replacement is not revoked with the certificate it replaced.
    let entries = reg
        .revoke(&Revocation {
            target: RevocationTarget::Serial(serial(&fleet[1]).to_owned()),
            reason: "affiliationChanged".to_owned(),
            at: NOW + 8,
        })
        .await
        .unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| e.serial.as_str())
            .collect::<Vec<_>>(),
        [serial(&fleet[1])]
    );
    assert_eq!(status(&reg, &pre[1].new.serial).await, CertStatus::Active);
    assert_eq!(
        rotation(&reg, serial(&fleet[1])).await.state,
        RotationState::Cancelled
    );
    assert_eq!(
        reg.confirm_replacement(&pre[1].new.serial, NOW + 9)
            .await
            .unwrap(),
        None
    );
    assert!(
        !reg.device_state(&pre[1].new.fingerprint_sha256)
            .await
            .unwrap()
            .unwrap()
            .confirms_rotation
    );

    // By thing: every certificate not revoked yet.
    let entries = reg
        .revoke(&Revocation {
            target: RevocationTarget::Thing("r-00002".to_owned()),
            reason: "cessationOfOperation".to_owned(),
            at: NOW + 10,
        })
        .await
        .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.serial.clone()).collect::<Vec<_>>(),
        sorted(vec![
            serial(&fleet[2]).to_owned(),
            pre[2].new.serial.clone()
        ])
    );
    assert!(
        entries
            .iter()
            .all(|e| e.thing_name == "r-00002"
                && e.reason.as_deref() == Some("cessationOfOperation"))
    );
    assert_eq!(
        rotation(&reg, serial(&fleet[2])).await.state,
        RotationState::Cancelled
    );
    assert_eq!(sealed_keys(url).await, 0);
    let entries = reg
        .revoke(&Revocation {
            target: RevocationTarget::Thing("r-00000".to_owned()),
            reason: "cessationOfOperation".to_owned(),
            at: NOW + 10,
        })
        .await
        .unwrap();
    assert!(entries.is_empty(), "{entries:?}");

    // Unknown targets.
    let before = full_snapshot(&reg).await;
    match reg
        .revoke(&Revocation {
            target: RevocationTarget::Serial("ffffffffffffffffffffffffffffffff".to_owned()),
            reason: "keyCompromise".to_owned(),
            at: NOW + 11,
        })
        .await
    {
        Err(RegistryError::NotFound(what)) => {
            assert!(what.contains("ffffffffffffffffffffffffffffffff"), "{what}")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match reg
        .revoke(&Revocation {
            target: RevocationTarget::Thing("ghost".to_owned()),
            reason: "keyCompromise".to_owned(),
            at: NOW + 11,
        })
        .await
    {
        Err(RegistryError::NotFound(what)) => assert!(what.contains("ghost"), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(full_snapshot(&reg).await, before);

    // What the CRL lists: revoked and not expired, by serial.
    let mut short = record("short", AT);
    short.certificate.not_after = NOW + 100;
    reg.record_issued(std::slice::from_ref(&short))
        .await
        .unwrap();
    reg.revoke(&Revocation {
        target: RevocationTarget::Serial(serial(&short).to_owned()),
        reason: "unspecified".to_owned(),
        at: NOW + 12,
    })
    .await
    .unwrap();
    let listed = reg.revoked_entries(NOW).await.unwrap();
    let revoked = reg
        .list_certificates(&CertificateFilter {
            status: Some(CertStatus::Revoked),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 6);
    assert_eq!(
        listed.iter().map(|e| e.serial.clone()).collect::<Vec<_>>(),
        sorted(serials_of(&revoked))
    );
    for c in &revoked {
        let e = listed.iter().find(|e| e.serial == c.serial).unwrap();
        assert_eq!(Some(e.revoked_at), c.revoked_at);
        assert_eq!(e.reason, c.revocation_reason);
        assert_eq!(
            (e.not_after, e.thing_name.as_str()),
            (c.not_after, c.thing_name.as_str())
        );
    }
    let short_entry = listed.iter().find(|e| e.serial == serial(&short)).unwrap();
    assert_eq!(short_entry.reason.as_deref(), Some("unspecified"));
    assert_eq!(
        reg.revoked_serials(NOW).await.unwrap(),
        listed.iter().map(|e| e.serial.clone()).collect::<Vec<_>>()
    );
    assert_eq!(reg.revoked_entries(NOW + 100).await.unwrap().len(), 6);
    let later = reg.revoked_entries(NOW + 101).await.unwrap();
    assert_eq!(later.len(), 5);
    assert!(later.iter().all(|e| e.serial != serial(&short)));
}

/// CRLs: stored only with a higher number, the newest one returned, pruned to
/// `CRLS_KEPT`.
async fn crl_store_and_prune(url: &str) {
    let reg = open(url).await.unwrap();
    let crl = |n: i64| StoredCrl {
        number: n,
        this_update: AT + n,
        next_update: AT + n + DAY,
        entries_digest: format!("{n:064x}"),
        entry_count: n * 3,
        der: vec![n as u8; 200],
    };
    assert_eq!(reg.latest_crl().await.unwrap(), None);
    assert!(reg.store_crl(&crl(1)).await.unwrap());
    assert_eq!(reg.latest_crl().await.unwrap(), Some(crl(1)));
    assert!(!reg.store_crl(&crl(1)).await.unwrap());
    assert!(!reg.store_crl(&crl(0)).await.unwrap());
    assert!(reg.store_crl(&crl(5)).await.unwrap());
    assert!(!reg.store_crl(&crl(3)).await.unwrap());
    assert_eq!(reg.latest_crl().await.unwrap(), Some(crl(5)));
    for n in 6..=30 {
        assert!(reg.store_crl(&crl(n)).await.unwrap(), "{n}");
    }
    assert_eq!(reg.latest_crl().await.unwrap(), Some(crl(30)));
    let count = |sql: &'static str| async move { testing::execute_raw(url, sql).await.unwrap() };
    assert_eq!(
        count("UPDATE crls SET number = number").await,
        CRLS_KEPT as u64
    );
    assert_eq!(
        count("UPDATE crls SET der = der WHERE number >= 15").await,
        CRLS_KEPT as u64
    );
    // Pruned numbers never come back.
    assert!(!reg.store_crl(&crl(10)).await.unwrap());
    assert!(!reg.store_crl(&crl(29)).await.unwrap());
    assert_eq!(reg.latest_crl().await.unwrap(), Some(crl(30)));

    // Two publishers with the same number: one wins.
    let (x, y) = (open(url).await.unwrap(), open(url).await.unwrap());
    let (x, y) = tokio::join!(
        tokio::spawn(async move { x.store_crl(&crl(31)).await }),
        tokio::spawn(async move { y.store_crl(&crl(31)).await }),
    );
    let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
    assert!(x ^ y, "{x} {y}");
    assert_eq!(reg.latest_crl().await.unwrap(), Some(crl(31)));
    assert_eq!(
        count("UPDATE crls SET number = number").await,
        CRLS_KEPT as u64
    );
}

/// Failed attempts are counted; at `max_attempts` the rotation is `failed` and is not
/// claimed again; nor is a cancelled one.
async fn failed_and_cancelled_not_claimed(url: &str) {
    let reg = open(url).await.unwrap();
    due_fleet(&reg, "f", 2, AT + 50 * DAY, CertOrigin::Generated).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 2);
    let claims = reg.claim_rotations("w", NOW, 60, 1).await.unwrap();
    let x = claims[0].old.serial.clone();

    let before = full_snapshot(&reg).await;
    assert!(
        !reg.fail_rotation("other", &x, "nope", NOW + 1, 3)
            .await
            .unwrap()
    );
    assert_eq!(full_snapshot(&reg).await, before);
    assert!(
        reg.fail_rotation("w", &x, "signer unavailable", NOW + 1, 3)
            .await
            .unwrap()
    );
    let r = rotation(&reg, &x).await;
    assert_eq!(r.state, RotationState::Due);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.last_error.as_deref(), Some("signer unavailable"));
    assert_eq!((r.lease_owner, r.lease_until), (None, None));
    assert_eq!(r.updated_at, NOW + 1);
    // The lease is gone with the failure.
    assert!(
        !reg.fail_rotation("w", &x, "again", NOW + 1, 3)
            .await
            .unwrap()
    );

    for (attempt, owner) in [(2, "w2"), (3, "w3")] {
        let claims = reg.claim_rotations(owner, NOW + 2, 60, 1).await.unwrap();
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0].old.serial, x);
        assert!(
            reg.fail_rotation(owner, &x, &format!("error {attempt}"), NOW + 3, 3)
                .await
                .unwrap()
        );
        assert_eq!(rotation(&reg, &x).await.attempts, attempt);
    }
    let failed = rotation(&reg, &x).await;
    assert_eq!(failed.state, RotationState::Failed);
    assert_eq!(failed.last_error.as_deref(), Some("error 3"));
    let events: Vec<EventRecord> = events_of_serial(&reg, &x)
        .await
        .into_iter()
        .filter(|e| e.kind == "rotation.failed")
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].detail["attempts"], 1);
    assert_eq!(events[0].detail["error"], "signer unavailable");
    assert_eq!(events[0].detail["state"], "due");
    assert_eq!(events[2].detail["state"], "failed");
    assert!(events.iter().all(|e| e.thing_name.is_some()));

    // The other one is claimed; the failed one never again.
    let claims = reg.claim_rotations("w4", NOW + 10, 60, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    let y = claims[0].old.serial.clone();
    assert_ne!(y, x);
    assert_eq!(
        reg.complete_rotations("w4", &[replacement_for(&x, NOW + 11)])
            .await
            .unwrap(),
        [false]
    );
    assert!(
        !reg.fail_rotation("w4", &x, "late", NOW + 11, 3)
            .await
            .unwrap()
    );

    // Revoked while leased: cancelled, the lease gone, never claimed or completed.
    reg.revoke(&Revocation {
        target: RevocationTarget::Serial(y.clone()),
        reason: "keyCompromise".to_owned(),
        at: NOW + 12,
    })
    .await
    .unwrap();
    let r = rotation(&reg, &y).await;
    assert_eq!(r.state, RotationState::Cancelled);
    assert_eq!(r.lease_owner, None);
    assert!(
        reg.claim_rotations("w5", NOW + DAY, 60, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        reg.complete_rotations("w4", &[replacement_for(&y, NOW + 13)])
            .await
            .unwrap(),
        [false]
    );
    assert!(
        !reg.fail_rotation("w4", &y, "late", NOW + 13, 3)
            .await
            .unwrap()
    );
    assert_eq!(count_kind(&reg, "rotation.cancelled").await, 1);
}

// ---------------------------------------------------------------------------------------
// AWS mirror outbox

fn mirror_settings() -> MirrorSettings {
    MirrorSettings {
        enabled: true,
        region: "eu-west-1".to_owned(),
        endpoint_url: Some("http://127.0.0.1:5000".to_owned()),
        ca_mode: "sni-only".to_owned(),
        rotated_status: "REVOKED".to_owned(),
        ca_certificate_id: None,
        arn_prefix: None,
        updated_at: 0,
    }
}

async fn backlog(reg: &Arc<dyn Registry>) -> MirrorBacklog {
    reg.mirror_backlog(10).await.unwrap()
}

fn subjects(ops: &[MirrorOp]) -> Vec<(MirrorOpKind, String)> {
    ops.iter().map(|o| (o.kind, o.subject.clone())).collect()
}

fn applied(ops: &[MirrorOp]) -> Vec<MirrorResult> {
    ops.iter()
        .map(|o| MirrorResult {
            id: o.id,
            outcome: MirrorOutcome::Applied,
        })
        .collect()
}

async fn mirror_outbox_follows_changes(url: &str) {
    let reg = open(url).await.unwrap();
    // Nothing is queued while the mirror is off.
    let t1 = provisioned(&reg, "m1").await;
    assert_eq!(reg.mirror_settings().await.unwrap(), None);
    assert_eq!(backlog(&reg).await.pending, 0);

    // Enabling queues what exists: the CA, the thing, then its certificate.
    assert_eq!(reg.enable_mirror(&mirror_settings(), AT).await.unwrap(), 3);
    let stored = reg.mirror_settings().await.unwrap().unwrap();
    assert!(stored.enabled);
    assert_eq!(stored.region, "eu-west-1");
    assert_eq!(reg.enable_mirror(&mirror_settings(), AT).await.unwrap(), 0);
    reg.record_mirror_ca("cafe", "arn:aws:iot:eu-west-1:123456789012:", AT)
        .await
        .unwrap();
    let stored = reg.mirror_settings().await.unwrap().unwrap();
    assert_eq!(stored.ca_certificate_id.as_deref(), Some("cafe"));

    // A change queues in its own transaction (trigger): thing + certificate.
    let t2 = provisioned(&reg, "m2").await;
    assert_eq!(backlog(&reg).await.pending, 5);
    // Changes to subjects that already wait add nothing.
    let state = reg
        .device_state(&t1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    let r = registration(
        &t1,
        state.thing.version,
        vec![policy("telemetry", Some(document("topic/m1")))],
    );
    assert_eq!(reg.register(&r).await.unwrap(), registered(&["telemetry"]));
    assert_eq!(backlog(&reg).await.pending, 5);
    assert_eq!(
        reg.policies_of_certificate(serial(&t1))
            .await
            .unwrap()
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["telemetry"]
    );

    // Only heads of queues are handed out, once.
    let first = reg.claim_mirror_ops("a", AT, 60, 100, false).await.unwrap();
    assert_eq!(
        subjects(&first),
        [
            (MirrorOpKind::Ca, "ca".to_owned()),
            (MirrorOpKind::Thing, "m1".to_owned()),
            (MirrorOpKind::Thing, "m2".to_owned()),
        ]
    );
    assert!(
        reg.claim_mirror_ops("b", AT, 60, 100, false)
            .await
            .unwrap()
            .is_empty()
    );
    // A change to a subject in flight queues a new operation (the one in flight may
    // have read the old state).
    assert_eq!(
        reg.queue_mirror_ops(&[NewMirrorOp::thing("m1"), NewMirrorOp::thing("m1")], AT)
            .await
            .unwrap(),
        1
    );
    let results = vec![
        MirrorResult {
            id: first[0].id,
            outcome: MirrorOutcome::Applied,
        },
        MirrorResult {
            id: first[1].id,
            outcome: MirrorOutcome::Applied,
        },
        MirrorResult {
            id: first[2].id,
            outcome: MirrorOutcome::Retry {
                error: "throttled".to_owned(),
                not_before: AT + 60,
            },
        },
    ];
    assert_eq!(reg.finish_mirror_ops("a", &results, AT).await.unwrap(), 3);
    let b = backlog(&reg).await;
    assert_eq!((b.pending, b.retrying, b.parked), (4, 1, 0));
    assert_eq!(
        b.oldest_pending.as_ref().map(|o| o.subject.as_str()),
        Some(serial(&t1))
    );

    // m2 waits in backoff (and blocks its queue); m1's certificate is next.
    let second = reg
        .claim_mirror_ops("a", AT + 1, 60, 100, false)
        .await
        .unwrap();
    assert_eq!(
        subjects(&second),
        [(MirrorOpKind::Certificate, serial(&t1).to_owned())]
    );
    // `aws sync` ignores backoff.
    let forced = reg
        .claim_mirror_ops("s", AT + 1, 60, 100, true)
        .await
        .unwrap();
    assert_eq!(subjects(&forced), [(MirrorOpKind::Thing, "m2".to_owned())]);
    assert_eq!(forced[0].attempts, 1);
    assert_eq!(forced[0].last_error.as_deref(), Some("throttled"));
    reg.finish_mirror_ops("s", &applied(&forced), AT + 1)
        .await
        .unwrap();

    // Parking one does not block its queue or the others.
    let park = vec![MirrorResult {
        id: second[0].id,
        outcome: MirrorOutcome::Park {
            error: "InvalidRequest: bad".to_owned(),
        },
    }];
    assert_eq!(reg.finish_mirror_ops("a", &park, AT + 2).await.unwrap(), 1);
    let b = backlog(&reg).await;
    assert_eq!(b.parked, 1);
    assert_eq!(
        b.parked_ops[0].last_error.as_deref(),
        Some("InvalidRequest: bad")
    );
    assert_eq!(b.parked_ops[0].state, "parked");
    assert!(
        kinds_of(&reg, serial(&t1))
            .await
            .contains(&"mirror.parked".to_owned())
    );
    let third = reg
        .claim_mirror_ops("a", AT + 3, 60, 100, false)
        .await
        .unwrap();
    assert_eq!(
        subjects(&third),
        [
            (MirrorOpKind::Certificate, serial(&t2).to_owned()),
            (MirrorOpKind::Thing, "m1".to_owned()),
        ]
    );
    reg.finish_mirror_ops("a", &applied(&third), AT + 3)
        .await
        .unwrap();

    // A revocation queues the certificate again (a parked one does not absorb it).
    reg.revoke(&Revocation {
        target: RevocationTarget::Serial(serial(&t1).to_owned()),
        reason: "keyCompromise".to_owned(),
        at: AT + 4,
    })
    .await
    .unwrap();
    let fourth = reg
        .claim_mirror_ops("a", AT + 4, 60, 100, false)
        .await
        .unwrap();
    assert_eq!(
        subjects(&fourth),
        [(MirrorOpKind::Certificate, serial(&t1).to_owned())]
    );
    reg.finish_mirror_ops("a", &applied(&fourth), AT + 4)
        .await
        .unwrap();
    assert_eq!(reg.requeue_parked_mirror_ops(AT + 5).await.unwrap(), 1);
    let b = backlog(&reg).await;
    assert_eq!((b.pending, b.parked), (1, 0));

    // Disabled: changes queue nothing; what waits stays.
    assert!(reg.disable_mirror(AT + 6).await.unwrap());
    assert!(!reg.disable_mirror(AT + 6).await.unwrap());
    provisioned(&reg, "m3").await;
    assert_eq!(backlog(&reg).await.pending, 1);
    assert!(!reg.mirror_settings().await.unwrap().unwrap().enabled);
    // Enabling again queues everything (the account may have changed meanwhile).
    assert!(reg.enable_mirror(&mirror_settings(), AT + 7).await.unwrap() >= 6);
}

async fn mirror_outbox_leases_and_rollback(url: &str) {
    let reg = open(url).await.unwrap();
    reg.enable_mirror(&mirror_settings(), AT).await.unwrap();
    let ca = reg.claim_mirror_ops("a", AT, 10, 10, false).await.unwrap();
    reg.finish_mirror_ops("a", &applied(&ca), AT).await.unwrap();

    // A rolled-back change queues nothing.
    let a = provisioned(&reg, "l1").await;
    let before = backlog(&reg).await.pending;
    let mut dup = record("l2", AT + 1);
    dup.certificate.serial = a.certificate.serial.clone();
    reg.record_issued(&[dup]).await.unwrap_err();
    assert_eq!(backlog(&reg).await.pending, before);

    // A lease that ran out goes to the next worker; the late owner's result is ignored.
    let mine = reg.claim_mirror_ops("a", AT, 10, 10, false).await.unwrap();
    assert_eq!(subjects(&mine), [(MirrorOpKind::Thing, "l1".to_owned())]);
    assert!(
        reg.claim_mirror_ops("b", AT + 5, 10, 10, false)
            .await
            .unwrap()
            .is_empty()
    );
    let theirs = reg
        .claim_mirror_ops("b", AT + 11, 10, 10, false)
        .await
        .unwrap();
    assert_eq!(theirs[0].id, mine[0].id);
    assert_eq!(
        reg.finish_mirror_ops("a", &applied(&mine), AT + 12)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        reg.finish_mirror_ops("b", &applied(&theirs), AT + 12)
            .await
            .unwrap(),
        1
    );
    let next = reg
        .claim_mirror_ops("b", AT + 12, 10, 10, false)
        .await
        .unwrap();
    assert_eq!(
        subjects(&next),
        [(MirrorOpKind::Certificate, serial(&a).to_owned())]
    );

    // Many queues at once: every thing's first operation, in order.
    for i in 0..50 {
        provisioned(&reg, &format!("bulk{i:02}")).await;
    }
    let heads = reg
        .claim_mirror_ops("c", AT + 13, 10, 1000, false)
        .await
        .unwrap();
    assert_eq!(heads.len(), 50);
    assert!(heads.iter().all(|o| o.kind == MirrorOpKind::Thing));
    assert!(heads.windows(2).all(|w| w[0].id < w[1].id));
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

/// The backlog `rotate` reports: rotations claimable now, under an unexpired lease (and
/// when the last one expires), waiting for devices; issued ones leave it. And the write
/// probe `/healthz` runs succeeds on a healthy database, again and again.
async fn rotation_backlog_and_write_probe(url: &str) {
    let reg = open(url).await.unwrap();
    reg.probe_writes().await.unwrap();
    reg.probe_writes().await.unwrap();
    assert_eq!(
        reg.rotation_backlog(NOW).await.unwrap(),
        RotationBacklog::default()
    );
    due_fleet(&reg, "bg", 3, AT + 50 * DAY, CertOrigin::Generated).await;
    due_fleet(&reg, "bc", 2, AT + 50 * DAY, CertOrigin::Csr).await;
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 5);
    let backlog = |claimable, leased, leased_until, awaiting_devices| RotationBacklog {
        claimable,
        leased,
        leased_until,
        awaiting_devices,
    };
    assert_eq!(
        reg.rotation_backlog(NOW).await.unwrap(),
        backlog(3, 0, None, 2)
    );

    let claimed = reg.claim_rotations("a", NOW, 60, 2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let later = reg.claim_rotations("b", NOW + 10, 60, 1).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(
        reg.rotation_backlog(NOW + 10).await.unwrap(),
        backlog(0, 3, Some(NOW + 70), 2)
    );
    // A lease counts until it expires (claims take it over from lease_until + 1).
    assert_eq!(
        reg.rotation_backlog(NOW + 60).await.unwrap(),
        backlog(0, 3, Some(NOW + 70), 2)
    );
    assert_eq!(
        reg.rotation_backlog(NOW + 61).await.unwrap(),
        backlog(2, 1, Some(NOW + 70), 2)
    );

    let done = replacement_for(&later[0].old.serial, NOW + 11);
    assert_eq!(
        reg.complete_rotations("b", std::slice::from_ref(&done))
            .await
            .unwrap(),
        [true]
    );
    assert_eq!(
        reg.rotation_backlog(NOW + 11).await.unwrap(),
        backlog(0, 2, Some(NOW + 60), 2)
    );
    reg.probe_writes().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Provisioning by claim

fn provisional(claim: &str, session: &str, token: &str) -> NewProvisional {
    NewProvisional {
        claim_name: claim.to_owned(),
        session: session.to_owned(),
        token_sha256: token.to_owned(),
        token_expires_at: AT + 3600,
        certificate: cert(AT + 365 * DAY),
        at: AT,
    }
}

fn register_thing(
    token: &str,
    session: &str,
    claim: &str,
    thing: &str,
    version: i64,
    at: i64,
) -> ProvisionalRegistration {
    ProvisionalRegistration {
        token_sha256: token.to_owned(),
        session: session.to_owned(),
        claim_name: claim.to_owned(),
        registration: Registration {
            serial: String::new(),
            thing_name: thing.to_owned(),
            template: "sensors".to_owned(),
            details: sensor_details(),
            expected_thing_version: version,
            policies: vec![policy("claims-sensor", Some(document("claims")))],
            at,
        },
    }
}

async fn claims_register_once_and_revoke(url: &str) {
    let reg = open(url).await.unwrap();
    let claim_cert = cert(AT + 365 * DAY);
    let new_claim = NewClaim {
        name: "batch-1".to_owned(),
        template: "sensors".to_owned(),
        max_uses: Some(2),
        certificate: claim_cert.clone(),
        at: AT,
    };
    reg.create_claim(&new_claim).await.unwrap();
    assert!(matches!(
        reg.create_claim(&new_claim).await,
        Err(RegistryError::DuplicateSerial(_))
    ));
    let found = reg
        .claim_by_fingerprint(&claim_cert.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.name.as_str(), found.uses, found.revoked),
        ("batch-1", 0, false)
    );

    let p1 = provisional("batch-1", "s1", "token-1");
    reg.record_provisional(&p1).await.unwrap();
    // A device with only a provisional certificate is unknown to every device path.
    assert!(
        reg.device_state(&p1.certificate.fingerprint_sha256)
            .await
            .unwrap()
            .is_none()
    );
    let refused = [
        (
            register_thing("token-x", "s1", "batch-1", "sensor-1", 0, AT),
            ProvisionalOutcome::TokenUnknown,
        ),
        (
            register_thing("token-1", "s2", "batch-1", "sensor-1", 0, AT),
            ProvisionalOutcome::TokenNotYours,
        ),
        (
            register_thing("token-1", "s1", "batch-1", "sensor-1", 0, AT + 3601),
            ProvisionalOutcome::TokenExpired,
        ),
    ];
    for (request, expected) in refused {
        assert_eq!(reg.register_provisional(&request).await.unwrap(), expected);
    }
    assert!(
        reg.get_thing("sensor-1").await.unwrap().is_none(),
        "a refusal wrote a thing"
    );

    // Two presentations of one token at once: exactly one registers.
    let request = register_thing("token-1", "s1", "batch-1", "sensor-1", 0, AT + 10);
    let (a, b) = tokio::join!(
        reg.register_provisional(&request),
        reg.register_provisional(&request)
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(
                o,
                ProvisionalOutcome::Registered {
                    thing_created: true,
                    ..
                }
            ))
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&ProvisionalOutcome::TokenUsed),
        "{outcomes:?}"
    );
    let state = reg
        .device_state(&p1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .expect("the certificate is the thing's now");
    assert_eq!(state.thing.name, "sensor-1");
    assert!(state.certificate.registered_at.is_some());
    assert_eq!(state.policies, ["claims-sensor"]);
    assert_eq!(state.thing.details.thing_type.as_deref(), Some("sensor"));
    let kinds = kinds_of(&reg, &p1.certificate.serial).await;
    for kind in [
        "claim.certificate_issued",
        "thing.created",
        "certificate.issued",
        "certificate.registered",
        "claim.used",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }

    // The second use; the third is over --max-uses and writes nothing.
    let p2 = provisional("batch-1", "s3", "token-2");
    reg.record_provisional(&p2).await.unwrap();
    assert!(matches!(
        reg.register_provisional(&register_thing(
            "token-2",
            "s3",
            "batch-1",
            "sensor-2",
            0,
            AT + 20
        ))
        .await
        .unwrap(),
        ProvisionalOutcome::Registered { .. }
    ));
    let p3 = provisional("batch-1", "s4", "token-3");
    reg.record_provisional(&p3).await.unwrap();
    assert_eq!(
        reg.register_provisional(&register_thing(
            "token-3",
            "s4",
            "batch-1",
            "sensor-3",
            0,
            AT + 30
        ))
        .await
        .unwrap(),
        ProvisionalOutcome::ClaimExhausted
    );
    assert!(reg.get_thing("sensor-3").await.unwrap().is_none());
    assert_eq!(reg.get_claim("batch-1").await.unwrap().unwrap().uses, 2);

    // An unused token expires: its certificate is revoked and on the CRL's list.
    let expired = reg.expire_provisional(AT + 3601).await.unwrap();
    assert_eq!(expired, vec![p3.certificate.serial.clone()]);
    let revoked = reg.revoked_serials(AT + 3601).await.unwrap();
    assert!(revoked.contains(&p3.certificate.serial));
    assert!(!revoked.contains(&p1.certificate.serial));
    assert!(
        revoked.windows(2).all(|w| w[0] <= w[1]),
        "not sorted: {revoked:?}"
    );

    // Revoking the claim: once, listed, on the CRL; unknown names are NotFound.
    assert!(reg.revoke_claim("batch-1", AT + 40).await.unwrap());
    assert!(!reg.revoke_claim("batch-1", AT + 41).await.unwrap());
    assert!(matches!(
        reg.revoke_claim("nope", AT).await,
        Err(RegistryError::NotFound(_))
    ));
    let listed = reg.list_claims().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked);
    let entries = reg.revoked_entries(AT + 50).await.unwrap();
    assert!(entries.iter().any(|e| e.serial == claim_cert.serial));
    assert!(entries.windows(2).all(|w| w[0].serial <= w[1].serial));
}

/// The group commits of provisioning by claim: a group behaves as its members one after
/// another (a token spent earlier in the group, the claim's uses counted across it), and
/// a group with a duplicate serial records nothing.
async fn claims_group_commits(url: &str) {
    let reg = open(url).await.unwrap();
    reg.create_claim(&NewClaim {
        name: "batch-2".to_owned(),
        template: "sensors".to_owned(),
        max_uses: Some(2),
        certificate: cert(AT + 365 * DAY),
        at: AT,
    })
    .await
    .unwrap();
    let group: Vec<_> = (1..=3)
        .map(|i| provisional("batch-2", &format!("s{i}"), &format!("token-{i}")))
        .collect();
    reg.record_provisional_batch(&group).await.unwrap();
    for p in &group {
        assert!(
            reg.provisional_by_token(&p.token_sha256)
                .await
                .unwrap()
                .is_some()
        );
    }
    // One already recorded in a group: nothing of the group is.
    let again = vec![provisional("batch-2", "s9", "token-9"), group[0].clone()];
    assert!(matches!(
        reg.record_provisional_batch(&again).await,
        Err(RegistryError::DuplicateSerial(_))
    ));
    assert!(
        reg.provisional_by_token(&again[0].token_sha256)
            .await
            .unwrap()
            .is_none()
    );

    let outcomes = reg
        .register_provisional_batch(&[
            register_thing("token-1", "s1", "batch-2", "sensor-21", 0, AT + 10),
            register_thing("token-1", "s1", "batch-2", "sensor-21", 0, AT + 10),
            register_thing("token-2", "sX", "batch-2", "sensor-22", 0, AT + 10),
            register_thing("token-2", "s2", "batch-2", "sensor-22", 0, AT + 10),
            register_thing("token-3", "s3", "batch-2", "sensor-23", 0, AT + 10),
        ])
        .await
        .unwrap();
    assert!(
        matches!(
            outcomes[0],
            ProvisionalOutcome::Registered {
                thing_created: true,
                ..
            }
        ),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], ProvisionalOutcome::TokenUsed);
    assert_eq!(outcomes[2], ProvisionalOutcome::TokenNotYours);
    assert!(
        matches!(outcomes[3], ProvisionalOutcome::Registered { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[4], ProvisionalOutcome::ClaimExhausted);
    assert_eq!(reg.get_claim("batch-2").await.unwrap().unwrap().uses, 2);
    assert!(reg.get_thing("sensor-22").await.unwrap().is_some());
    assert!(
        reg.get_thing("sensor-23").await.unwrap().is_none(),
        "an exhausted claim wrote a thing"
    );
}

/// The audit's storage: a task with its findings in one transaction, findings filtered
/// by task, check and resource, suppressions set, replaced and deleted, and the MQTT
/// sessions of a time window.
async fn audit_tasks_findings_and_suppressions(url: &str) {
    let reg = open(url).await.unwrap();
    let finding = |id: &str, task: &str, check: &str, resource: &str, at: i64| AuditFindingRecord {
        finding_id: id.into(),
        task_id: task.into(),
        check_name: check.into(),
        severity: "MEDIUM".into(),
        reason_code: "CERTIFICATE_PAST_EXPIRATION".into(),
        reason_description: "expired".into(),
        resource_type: "DEVICE_CERTIFICATE".into(),
        resource_id: resource.into(),
        detail: json!({ "daysLeft": -1 }),
        suppressed: resource == "s2",
        found_at: at,
    };
    let task = |id: &str, at: i64| AuditTaskRecord {
        task_id: id.into(),
        task_type: "ON_DEMAND_AUDIT_TASK".into(),
        task_status: "COMPLETED".into(),
        started_at: at,
        finished_at: at,
        summary: json!({ "taskId": id, "nonCompliantChecksCount": 1 }),
    };
    reg.record_audit(
        &task("t1", AT),
        &[
            finding("f1", "t1", "A_CHECK", "s1", AT),
            finding("f2", "t1", "B_CHECK", "s2", AT),
        ],
    )
    .await
    .unwrap();
    reg.record_audit(
        &task("t2", AT + 60),
        &[finding("f3", "t2", "A_CHECK", "s1", AT + 60)],
    )
    .await
    .unwrap();
    // A task id used twice: nothing of the second is recorded.
    assert!(
        reg.record_audit(
            &task("t2", AT + 90),
            &[finding("f4", "t2", "A_CHECK", "s9", AT + 90)]
        )
        .await
        .is_err()
    );
    let tasks = reg.audit_tasks(10).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(),
        ["t2", "t1"]
    );
    assert_eq!(tasks[1].summary["nonCompliantChecksCount"], 1);
    assert_eq!(reg.audit_tasks(1).await.unwrap().len(), 1);
    assert_eq!(
        reg.audit_task("t1").await.unwrap().as_ref(),
        Some(&tasks[1])
    );
    assert_eq!(reg.audit_task("nope").await.unwrap(), None);
    let filter =
        |task: Option<&str>, check: Option<&str>, resource: Option<&str>| AuditFindingFilter {
            task_id: task.map(str::to_owned),
            check_name: check.map(str::to_owned),
            resource_id: resource.map(str::to_owned),
            limit: 100,
        };
    let ids = |found: Vec<AuditFindingRecord>| {
        found.into_iter().map(|f| f.finding_id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(reg.audit_findings(&filter(None, None, None)).await.unwrap()),
        ["f3", "f1", "f2"]
    );
    assert_eq!(
        ids(reg
            .audit_findings(&filter(Some("t1"), None, None))
            .await
            .unwrap()),
        ["f1", "f2"]
    );
    assert_eq!(
        ids(reg
            .audit_findings(&filter(None, Some("A_CHECK"), None))
            .await
            .unwrap()),
        ["f3", "f1"]
    );
    assert_eq!(
        ids(reg
            .audit_findings(&filter(Some("t1"), None, Some("s2")))
            .await
            .unwrap()),
        ["f2"]
    );
    assert!(
        reg.audit_findings(&filter(None, None, Some("s9")))
            .await
            .unwrap()
            .is_empty()
    );
    let f2 = reg
        .audit_findings(&filter(None, None, Some("s2")))
        .await
        .unwrap()
        .remove(0);
    assert!(f2.suppressed);
    assert_eq!(f2.detail["daysLeft"], -1);

    let suppression = AuditSuppression {
        check_name: "A_CHECK".into(),
        resource_id: "s1".into(),
        expires_at: Some(AT + DAY),
        description: "known".into(),
        created_at: AT,
    };
    reg.put_audit_suppression(&suppression).await.unwrap();
    reg.put_audit_suppression(&AuditSuppression {
        expires_at: None,
        ..suppression.clone()
    })
    .await
    .unwrap();
    let listed = reg.audit_suppressions().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].expires_at, None);
    assert!(
        reg.delete_audit_suppression("A_CHECK", "s1", AT + 1)
            .await
            .unwrap()
    );
    assert!(
        !reg.delete_audit_suppression("A_CHECK", "s1", AT + 2)
            .await
            .unwrap()
    );
    assert!(reg.audit_suppressions().await.unwrap().is_empty());

    // What the audit reads of certificates: every one, slim.
    let issued = record("audited-1", AT);
    reg.record_issued(std::slice::from_ref(&issued))
        .await
        .unwrap();
    let audited = reg.audited_certificates().await.unwrap();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].serial, serial(&issued));
    assert_eq!(audited[0].thing_name, "audited-1");
    assert_eq!(audited[0].status, CertStatus::Active);
    assert_eq!(audited[0].not_after, issued.certificate.not_after);

    // MQTT sessions of a window; HTTPS connections are not sessions.
    let mqtt = |client: &str, at: i64| ConnectionRecord {
        fingerprint_sha256: "ab".repeat(32),
        thing_name: "sensor-1".into(),
        client_addr: "127.0.0.1".into(),
        at,
        transport: ConnectionTransport::Mqtt,
        client_id: Some(client.into()),
        disconnected_at: Some(at + 5),
        disconnect_reason: Some("duplicate_client_id".into()),
    };
    reg.record_connections(&[
        mqtt("early", AT - 10),
        mqtt("inside", AT + 10),
        ConnectionRecord::https(&"ab".repeat(32), "sensor-1", "127.0.0.1:4000", AT + 11),
        mqtt("late", AT + 100),
    ])
    .await
    .unwrap();
    let sessions = reg.mqtt_sessions(AT, AT + 100).await.unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].client_id.as_deref(), Some("inside"));
    assert_eq!(
        sessions[0].disconnect_reason.as_deref(),
        Some("duplicate_client_id")
    );
}

/// Rotations opened by an operator for chosen certificates (the audit's mitigation):
/// only active, delivered certificates without a rotation get one, with its event.
async fn rotations_opened_for_chosen_certificates(url: &str) {
    let reg = open(url).await.unwrap();
    // Far from their renewal point: a sweep would open nothing.
    let fleet = due_fleet(&reg, "op", 4, AT + 300 * DAY, CertOrigin::Generated).await;
    let serials: Vec<String> = fleet.iter().map(|r| serial(r).to_owned()).collect();
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), 0);
    // One revoked, one never delivered.
    reg.revoke(&Revocation {
        target: RevocationTarget::Serial(serials[3].clone()),
        reason: "keyCompromise".into(),
        at: NOW,
    })
    .await
    .unwrap();
    let undelivered = record("op-undelivered", AT);
    reg.record_issued(std::slice::from_ref(&undelivered))
        .await
        .unwrap();
    let asked = vec![
        serials[0].clone(),
        serials[1].clone(),
        serials[3].clone(),
        serial(&undelivered).to_owned(),
        "ffff".to_owned(),
    ];
    let mut expected = vec![serials[0].clone(), serials[1].clone()];
    expected.sort();
    assert_eq!(reg.open_rotations_for(&asked, NOW).await.unwrap(), expected);
    // Once only.
    assert!(
        reg.open_rotations_for(&asked, NOW + 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(reg.open_rotations_for(&[], NOW).await.unwrap().is_empty());
    assert_eq!(rotation(&reg, &serials[0]).await.state, RotationState::Due);
    assert!(reg.get_rotation(&serials[2]).await.unwrap().is_none());
    let kinds = kinds_of(&reg, &serials[1]).await;
    assert!(kinds.iter().any(|k| k == "rotation.due"), "{kinds:?}");
}

/// Thing group policies: attached to a group, they join its things' device state; a
/// document that differs from a stored policy of the same name is refused; adding things
/// is all-or-nothing and says which were new; the change times are readable.
async fn thing_group_policies_apply_to_their_things(url: &str) {
    let reg = open(url).await.unwrap();
    let r1 = provisioned(&reg, "g1").await;
    let r2 = provisioned(&reg, "g2").await;
    let state = reg
        .device_state(&r1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    let outcome = reg
        .register(&registration(
            &r1,
            state.thing.version,
            vec![policy("telemetry", Some(document("topic/g1")))],
        ))
        .await
        .unwrap();
    assert_eq!(outcome, registered(&["telemetry"]));
    let deny = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "iot:Publish", "Resource": "*"}]});
    assert!(reg.group_policies("quarantine").await.unwrap().is_empty());
    assert!(
        reg.attach_group_policy("quarantine", "deny", &deny, AT + 10)
            .await
            .unwrap()
    );
    assert!(
        !reg.attach_group_policy("quarantine", "deny", &deny, AT + 11)
            .await
            .unwrap()
    );
    // Policies are immutable: the same name with another document is refused.
    let err = reg
        .attach_group_policy("other", "deny", &document("topic/x"), AT + 12)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidValue(_)), "{err:?}");
    assert!(reg.group_policies("other").await.unwrap().is_empty());
    assert_eq!(
        reg.group_policies("quarantine").await.unwrap(),
        vec!["deny".to_owned()]
    );
    // Not in the group yet: only the certificate's own policy.
    let state = reg
        .device_state(&r1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, vec!["telemetry".to_owned()]);
    assert!(
        reg.things_policies_changed_since(0)
            .await
            .unwrap()
            .is_empty()
    );

    // An unknown thing adds none.
    let err = reg
        .add_things_to_group("quarantine", &["g1".to_owned(), "nope".to_owned()], AT + 20)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    let version = reg.get_thing("g1").await.unwrap().unwrap().version;
    let added = reg
        .add_things_to_group("quarantine", &["g1".to_owned(), "g2".to_owned()], AT + 30)
        .await
        .unwrap();
    assert_eq!(added, vec!["g1".to_owned(), "g2".to_owned()]);
    let again = reg
        .add_things_to_group("quarantine", &["g1".to_owned()], AT + 31)
        .await
        .unwrap();
    assert!(again.is_empty());
    let thing = reg.get_thing("g1").await.unwrap().unwrap();
    assert_eq!(thing.version, version + 1);
    assert!(thing.details.groups.contains(&"quarantine".to_owned()));
    assert!(
        thing.details.groups.contains(&"fleet-a".to_owned()),
        "{thing:?}"
    );
    let state = reg
        .device_state(&r1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        state.policies,
        vec!["deny".to_owned(), "telemetry".to_owned()]
    );
    let state = reg
        .device_state(&r2.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.policies, vec!["deny".to_owned()]);
    assert_eq!(
        reg.things_policies_changed_since(AT + 30).await.unwrap(),
        vec![("g1".to_owned(), AT + 30), ("g2".to_owned(), AT + 30)]
    );
    assert!(
        reg.things_policies_changed_since(AT + 31)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(count_kind(&reg, "thing.added_to_group").await, 2);
    assert_eq!(count_kind(&reg, "thing_group.policy_attached").await, 1);

    // A policy attached later to a group marks its things again.
    let second = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "iot:Subscribe", "Resource": "*"}]});
    assert!(
        reg.attach_group_policy("quarantine", "deny-sub", &second, AT + 40)
            .await
            .unwrap()
    );
    assert_eq!(
        reg.things_policies_changed_since(AT + 35).await.unwrap(),
        vec![("g1".to_owned(), AT + 40), ("g2".to_owned(), AT + 40)]
    );
}

/// Replacing a policy's default version: the document readers see changes, the earlier
/// versions are kept, a template still rendering the first version registers (attaching
/// the policy by name), and the things it applies to are marked.
async fn policy_default_version_replaced(url: &str) {
    let reg = open(url).await.unwrap();
    let r1 = provisioned(&reg, "pv1").await;
    let state = reg
        .device_state(&r1.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    let first = document("topic/pv");
    let outcome = reg
        .register(&registration(
            &r1,
            state.thing.version,
            vec![policy("wide", Some(first.clone()))],
        ))
        .await
        .unwrap();
    assert_eq!(outcome, registered(&["wide"]));
    let blank = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]});
    let err = reg
        .replace_default_policy_version("nope", &blank, AT + 50)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    assert!(reg.policy_versions("wide").await.unwrap().is_empty());
    assert_eq!(
        reg.replace_default_policy_version("wide", &first, AT + 50)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        reg.replace_default_policy_version("wide", &blank, AT + 60)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        reg.get_policy("wide").await.unwrap().unwrap().document,
        blank
    );
    assert_eq!(
        reg.policy_versions("wide").await.unwrap(),
        vec![(1, first.clone()), (2, blank.clone())]
    );
    assert_eq!(
        reg.things_policies_changed_since(AT + 60).await.unwrap(),
        vec![("pv1".to_owned(), AT + 60)]
    );
    assert_eq!(count_kind(&reg, "policy.default_version_replaced").await, 1);
    assert_eq!(
        reg.replace_default_policy_version("wide", &blank, AT + 70)
            .await
            .unwrap(),
        None
    );

    // A new device of the same template still renders the first version: registered,
    // with the policy attached by name (its default version applies).
    let r2 = provisioned(&reg, "pv2").await;
    let state = reg
        .device_state(&r2.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    let outcome = reg
        .register(&registration(
            &r2,
            state.thing.version,
            vec![policy("wide", Some(first.clone()))],
        ))
        .await
        .unwrap();
    assert_eq!(outcome, registered(&["wide"]));
    // A document that was never a version of it is still refused.
    let r3 = provisioned(&reg, "pv3").await;
    let state = reg
        .device_state(&r3.certificate.fingerprint_sha256)
        .await
        .unwrap()
        .unwrap();
    let outcome = reg
        .register(&registration(
            &r3,
            state.thing.version,
            vec![policy("wide", Some(document("topic/other")))],
        ))
        .await
        .unwrap();
    refused_because(&outcome, &["wide", "differs"]);
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
    register_then_already_registered,
    policy_reuse_and_refusal,
    attach_existing_by_name,
    thing_changed_on_version_mismatch,
    registration_refusals,
    concurrent_registration_once,
    register_batch_isolates_each,
    register_batch_of_distinct_devices,
    connections_are_pruned,
    revoked_serials_exclude_expired,
    due_selection_and_idempotent_open,
    concurrent_workers_complete_once,
    lease_expiry_and_late_complete,
    take_then_confirm,
    replace_refusals_and_second_replace,
    revoke_cascade_and_entries,
    crl_store_and_prune,
    failed_and_cancelled_not_claimed,
    mirror_outbox_follows_changes,
    mirror_outbox_leases_and_rollback,
    rotation_backlog_and_write_probe,
    claims_register_once_and_revoke,
    claims_group_commits,
    audit_tasks_findings_and_suppressions,
    rotations_opened_for_chosen_certificates,
    thing_group_policies_apply_to_their_things,
    policy_default_version_replaced,
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

/// The rotation sweep's registry side: open `n` due rotations, then claim and complete
/// them in batches of 1,024 (one transaction each), as the rotation worker does.
async fn measure_rotation(url: &str, n: usize) {
    let reg = open(url).await.unwrap();
    due_fleet(&reg, "rot", n, AT + 50 * DAY, CertOrigin::Generated).await;
    let started = Instant::now();
    assert_eq!(reg.open_due_rotations(NOW, None).await.unwrap(), n as u64);
    let open_secs = started.elapsed().as_secs_f64();
    let (mut claim_secs, mut complete_secs, mut completed) = (0.0, 0.0, 0);
    loop {
        let t = Instant::now();
        let claims = reg.claim_rotations("bench", NOW, 300, 1_024).await.unwrap();
        claim_secs += t.elapsed().as_secs_f64();
        if claims.is_empty() {
            break;
        }
        let items: Vec<PreparedReplacement> = claims
            .iter()
            .map(|c| replacement_for(&c.old.serial, NOW + 1))
            .collect();
        let t = Instant::now();
        let done = reg.complete_rotations("bench", &items).await.unwrap();
        complete_secs += t.elapsed().as_secs_f64();
        completed += done.iter().filter(|d| **d).count();
    }
    assert_eq!(completed, n);
    eprintln!(
        "{}: open_due_rotations {:.0}/s; claim {:.0}/s; complete {:.0}/s; \
         claim + complete {:.0} rotations/s ({n} rotations, batches of 1,024)",
        reg.backend(),
        n as f64 / open_secs,
        n as f64 / claim_secs,
        n as f64 / complete_secs,
        n as f64 / (claim_secs + complete_secs),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn bench_sqlite_rotation() {
    let db = Db::sqlite();
    measure_rotation(&db.url, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs FLEETCERT_TEST_POSTGRES_URL"]
async fn bench_postgres_rotation() {
    let db = Db::postgres().await;
    measure_rotation(&db.url, 100_000).await;
    db.finish().await;
}

#[test]
fn fixtures_are_unique() {
    let ids: HashSet<_> = (0..1000).map(|_| next_id()).collect();
    assert_eq!(ids.len(), 1000);
}
