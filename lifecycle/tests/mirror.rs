//! The AWS IoT mirror worker against an in-memory fake of `IotApi`, on SQLite, with a
//! manual clock: the outbox, ordering per thing, parking, backoff through an outage,
//! revocation/rotation statuses and reconcile. (The real SDK client is exercised against
//! moto elsewhere; this file tests the worker's logic only.)
// `DeviceReport` is the batch API's error row; it is large by design.
#![allow(clippy::result_large_err)]
use fleetcert_aws::{
    AwsError, CaMode, CertStatus as AwsStatus, IotApi, LoggingOptions, PolicyChange, Registered,
    RemoteCertificate, RemoteThing, ThingSpec, async_trait,
};
use fleetcert_lifecycle::mirror::{Mirror, MirrorOptions};
use fleetcert_lifecycle::provision::{self, DeviceRequest, ProvisionSettings};
use fleetcert_lifecycle::renewal::{Clock, ManualClock};
use fleetcert_lifecycle::{CaInitOptions, DataDir};
use fleetcert_registry::{
    CertStatus, CertificateFilter, CertificateRecord, MirrorSettings, Registry, Revocation,
    RevocationTarget,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const ARN_PREFIX: &str = "arn:aws:iot:eu-west-1:123456789012:";

// ---- the fake AWS IoT account -------------------------------------------------------

#[derive(Debug, Clone)]
struct FakeThing {
    spec: ThingSpec,
    /// Principal ARNs in attachment order; AttachThingPrincipal is idempotent, so a
    /// duplicate here would be a bug of the fake, and its length counts attachments.
    principals: Vec<String>,
}

#[derive(Debug, Default)]
struct Account {
    /// (id, status) of the registered CA.
    ca: Option<(String, String)>,
    things: BTreeMap<String, FakeThing>,
    /// Certificate id → status.
    certs: BTreeMap<String, String>,
    /// Certificate id → how many RegisterCertificate calls created it.
    creations: BTreeMap<String, u32>,
    /// Policy name → document text.
    policies: BTreeMap<String, String>,
    /// Target ARN → attached policy names.
    attachments: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Default)]
struct FakeIot {
    account: Mutex<Account>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    /// Every call fails with `Transient` (an outage).
    down: AtomicBool,
    /// `put_thing` of this name is refused (`Permanent`).
    refuse_thing: Mutex<Option<String>>,
    /// Certificate ids are the SHA-256 of the PEM text, as moto (and LocalStack) compute
    /// them by default, instead of the SHA-256 of the DER, as AWS does.
    pem_ids: AtomicBool,
}

fn cert_arn(id: &str) -> String {
    format!("{ARN_PREFIX}cert/{id}")
}

fn id_of_arn(arn: &str) -> Option<&str> {
    arn.strip_prefix(ARN_PREFIX)?.strip_prefix("cert/")
}

fn not_found(operation: &'static str, what: &str) -> AwsError {
    AwsError::NotFound {
        operation,
        message: format!("{what} does not exist"),
    }
}

impl FakeIot {
    /// Counts the call and fails it if AWS is down.
    fn enter(&self, operation: &'static str) -> Result<(), AwsError> {
        *self.calls.lock().unwrap().entry(operation).or_default() += 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(AwsError::Transient {
                operation,
                message: "connection refused".into(),
            });
        }
        Ok(())
    }

    fn total_calls(&self) -> u64 {
        self.calls.lock().unwrap().values().sum()
    }

    fn calls_of(&self, operation: &str) -> u64 {
        self.calls
            .lock()
            .unwrap()
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// The account loses everything (a new account, or someone cleaned it up).
    fn reset(&self) {
        *self.account.lock().unwrap() = Account::default();
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn refuse(&self, thing: Option<&str>) {
        *self.refuse_thing.lock().unwrap() = thing.map(str::to_owned);
    }

    fn thing(&self, name: &str) -> Option<FakeThing> {
        self.account.lock().unwrap().things.get(name).cloned()
    }

    fn cert_status(&self, id: &str) -> Option<String> {
        self.account.lock().unwrap().certs.get(id).cloned()
    }

    fn thing_count(&self) -> usize {
        self.account.lock().unwrap().things.len()
    }

    fn cert_count(&self) -> usize {
        self.account.lock().unwrap().certs.len()
    }

    fn creations(&self) -> BTreeMap<String, u32> {
        self.account.lock().unwrap().creations.clone()
    }
}

#[async_trait]
impl IotApi for FakeIot {
    async fn registration_code(&self) -> Result<String, AwsError> {
        self.enter("GetRegistrationCode")?;
        Ok("0123456789abcdef".into())
    }

    async fn register_ca(
        &self,
        ca_pem: &str,
        _verification_pem: Option<&str>,
        _mode: CaMode,
    ) -> Result<Registered, AwsError> {
        self.enter("RegisterCACertificate")?;
        assert!(ca_pem.contains("BEGIN CERTIFICATE"), "{ca_pem}");
        let mut account = self.account.lock().unwrap();
        let created = account.ca.is_none();
        if created {
            account.ca = Some(("ca1".into(), "ACTIVE".into()));
        }
        Ok(Registered {
            id: "ca1".into(),
            arn: format!("{ARN_PREFIX}cacert/ca1"),
            created,
        })
    }

    async fn ca_status(&self, id: &str) -> Result<Option<String>, AwsError> {
        self.enter("DescribeCACertificate")?;
        let account = self.account.lock().unwrap();
        Ok(account
            .ca
            .as_ref()
            .filter(|(ca_id, _)| ca_id == id)
            .map(|(_, status)| status.clone()))
    }

    async fn register_certificate(
        &self,
        pem: &str,
        _ca_pem: &str,
        status: AwsStatus,
    ) -> Result<Registered, AwsError> {
        self.enter("RegisterCertificate")?;
        let der_id = fleetcert_aws::certificate_id(pem).ok_or_else(|| AwsError::Permanent {
            operation: "RegisterCertificate",
            code: "InvalidPem".into(),
            message: "no certificate".into(),
        })?;
        let id = if self.pem_ids.load(Ordering::SeqCst) {
            hex::encode(ring::digest::digest(&ring::digest::SHA256, pem.as_bytes()))
        } else {
            der_id
        };
        let mut account = self.account.lock().unwrap();
        if account.ca.is_none() {
            // What AWS says for a certificate whose issuer it does not know.
            return Err(AwsError::Permanent {
                operation: "RegisterCertificate",
                code: "CertificateValidationException".into(),
                message: "the CA certificate is not registered".into(),
            });
        }
        let created = !account.certs.contains_key(&id);
        if created {
            account
                .certs
                .insert(id.clone(), status.as_aws_str().to_owned());
            *account.creations.entry(id.clone()).or_default() += 1;
        }
        Ok(Registered {
            arn: cert_arn(&id),
            id,
            created,
        })
    }

    async fn update_certificate(&self, id: &str, status: AwsStatus) -> Result<(), AwsError> {
        self.enter("UpdateCertificate")?;
        let mut account = self.account.lock().unwrap();
        match account.certs.get_mut(id) {
            // AWS: a revoked certificate cannot be modified (REVOKED is final).
            Some(s) if s == "REVOKED" && status != AwsStatus::Revoked => Err(AwsError::Permanent {
                operation: "UpdateCertificate",
                code: "CertificateStateException".into(),
                message: "the certificate is revoked".into(),
            }),
            Some(s) => {
                *s = status.as_aws_str().to_owned();
                Ok(())
            }
            None => Err(not_found("UpdateCertificate", id)),
        }
    }

    async fn put_thing(&self, thing: &ThingSpec) -> Result<(), AwsError> {
        self.enter("CreateThing")?;
        if self.refuse_thing.lock().unwrap().as_deref() == Some(thing.name.as_str()) {
            return Err(AwsError::Permanent {
                operation: "CreateThing",
                code: "InvalidRequestException".into(),
                message: "deprecated thing type".into(),
            });
        }
        let mut account = self.account.lock().unwrap();
        account
            .things
            .entry(thing.name.clone())
            .and_modify(|t| t.spec = thing.clone())
            .or_insert_with(|| FakeThing {
                spec: thing.clone(),
                principals: Vec::new(),
            });
        Ok(())
    }

    async fn put_policy(&self, name: &str, document: &str) -> Result<PolicyChange, AwsError> {
        self.enter("CreatePolicy")?;
        let mut account = self.account.lock().unwrap();
        let same = |a: &str, b: &str| {
            serde_json::from_str::<serde_json::Value>(a).ok()
                == serde_json::from_str::<serde_json::Value>(b).ok()
        };
        let change = match account.policies.get(name) {
            None => PolicyChange::Created,
            Some(old) if same(old, document) => PolicyChange::Unchanged,
            Some(_) => PolicyChange::NewVersion {
                version_id: "2".into(),
                pruned: None,
            },
        };
        account
            .policies
            .insert(name.to_owned(), document.to_owned());
        Ok(change)
    }

    async fn attach_policy(&self, policy: &str, target_arn: &str) -> Result<(), AwsError> {
        self.enter("AttachPolicy")?;
        let mut account = self.account.lock().unwrap();
        if !account.policies.contains_key(policy) {
            return Err(not_found("AttachPolicy", policy));
        }
        account
            .attachments
            .entry(target_arn.to_owned())
            .or_default()
            .insert(policy.to_owned());
        Ok(())
    }

    async fn attach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError> {
        self.enter("AttachThingPrincipal")?;
        let mut account = self.account.lock().unwrap();
        let known = id_of_arn(principal_arn).is_some_and(|id| account.certs.contains_key(id));
        if !known {
            return Err(not_found("AttachThingPrincipal", principal_arn));
        }
        let Some(t) = account.things.get_mut(thing) else {
            return Err(not_found("AttachThingPrincipal", thing));
        };
        if !t.principals.iter().any(|p| p == principal_arn) {
            t.principals.push(principal_arn.to_owned());
        }
        Ok(())
    }

    async fn detach_thing_principal(
        &self,
        thing: &str,
        principal_arn: &str,
    ) -> Result<(), AwsError> {
        self.enter("DetachThingPrincipal")?;
        let mut account = self.account.lock().unwrap();
        if let Some(t) = account.things.get_mut(thing) {
            t.principals.retain(|p| p != principal_arn);
        }
        Ok(())
    }

    async fn list_things(&self) -> Result<Vec<RemoteThing>, AwsError> {
        self.enter("ListThings")?;
        let account = self.account.lock().unwrap();
        Ok(account
            .things
            .values()
            .map(|t| RemoteThing {
                name: t.spec.name.clone(),
                thing_type: t.spec.thing_type.clone(),
                attributes: t.spec.attributes.clone(),
            })
            .collect())
    }

    async fn list_certificates(&self) -> Result<Vec<RemoteCertificate>, AwsError> {
        self.enter("ListCertificates")?;
        let account = self.account.lock().unwrap();
        Ok(account
            .certs
            .iter()
            .map(|(id, status)| RemoteCertificate {
                id: id.clone(),
                arn: cert_arn(id),
                status: status.clone(),
            })
            .collect())
    }

    async fn thing_principals(&self, thing: &str) -> Result<Vec<String>, AwsError> {
        self.enter("ListThingPrincipals")?;
        let account = self.account.lock().unwrap();
        account
            .things
            .get(thing)
            .map(|t| t.principals.clone())
            .ok_or_else(|| not_found("ListThingPrincipals", thing))
    }

    async fn attached_policies(&self, target_arn: &str) -> Result<Vec<String>, AwsError> {
        self.enter("ListAttachedPolicies")?;
        let account = self.account.lock().unwrap();
        Ok(account
            .attachments
            .get(target_arn)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn policy_document(&self, name: &str) -> Result<Option<String>, AwsError> {
        self.enter("GetPolicy")?;
        Ok(self.account.lock().unwrap().policies.get(name).cloned())
    }

    async fn logging_options(&self) -> Result<LoggingOptions, AwsError> {
        self.enter("GetV2LoggingOptions")?;
        Ok(LoggingOptions {
            configured: false,
            disabled: true,
            default_log_level: None,
        })
    }
}

// ---- the fleet ----------------------------------------------------------------------

struct Fleet {
    _temp: tempfile::TempDir,
    data: DataDir,
    out: PathBuf,
    ca: Arc<fleetcert_ca::IssuingCa>,
    registry: Arc<dyn Registry>,
    clock: Arc<ManualClock>,
    aws: Arc<FakeIot>,
}

async fn fleet() -> Fleet {
    let temp = tempfile::tempdir().unwrap();
    let data = DataDir::new(temp.path().join("data"));
    data.init_ca(&CaInitOptions::default(), None).unwrap();
    let ca = Arc::new(data.load_issuing_ca(None).unwrap());
    let registry = fleetcert_registry::open(&data.default_database_url())
        .await
        .unwrap();
    Fleet {
        out: temp.path().join("out"),
        _temp: temp,
        data,
        ca,
        registry,
        clock: ManualClock::new(fleetcert_lifecycle::unix_now()),
        aws: Arc::new(FakeIot::default()),
    }
}

impl Fleet {
    /// `aws enable`: region eu-west-1, SNI-only CA. Returns the operations queued.
    async fn enable(&self, rotated_status: &str) -> u64 {
        self.registry
            .enable_mirror(
                &MirrorSettings {
                    enabled: true,
                    region: "eu-west-1".into(),
                    endpoint_url: None,
                    ca_mode: "sni-only".into(),
                    rotated_status: rotated_status.into(),
                    ca_certificate_id: None,
                    arn_prefix: None,
                    updated_at: self.clock.now(),
                },
                self.clock.now(),
            )
            .await
            .unwrap()
    }

    /// Provisions `prefix-000` … things (generated keys, 30 days); returns their names.
    async fn provision(&self, prefix: &str, n: usize) -> Vec<String> {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:03}")).collect();
        let requests = names
            .iter()
            .map(|name| {
                Ok(DeviceRequest {
                    line: None,
                    thing_name: name.clone(),
                    csr_path: None,
                })
            })
            .collect();
        let mut profile = self.data.device_profile().unwrap();
        profile.validity_days = 30;
        let settings = ProvisionSettings::new(&self.out, profile);
        let summary = provision::provision(
            self.ca.clone(),
            self.registry.clone(),
            provision::prepare(requests),
            &settings,
            &mut |_| {},
        )
        .await
        .unwrap();
        assert_eq!(summary.issued, n as u64);
        names
    }

    async fn mirror(&self) -> Arc<Mirror> {
        Arc::new(
            Mirror::new(
                self.registry.clone(),
                self.aws.clone(),
                self.ca.clone(),
                self.clock.clone(),
                MirrorOptions::default(),
            )
            .await
            .unwrap(),
        )
    }

    /// The thing's only certificate.
    async fn cert(&self, thing: &str) -> CertificateRecord {
        let mut certs = self
            .registry
            .list_certificates(&CertificateFilter {
                thing_name: Some(thing.to_owned()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(certs.len(), 1, "{thing}: {certs:?}");
        certs.pop().unwrap()
    }

    async fn revoke(&self, thing: &str, reason: &str) -> CertificateRecord {
        let cert = self.cert(thing).await;
        let revoked = self
            .registry
            .revoke(&Revocation {
                target: RevocationTarget::Serial(cert.serial.clone()),
                reason: reason.into(),
                at: self.clock.now(),
            })
            .await
            .unwrap();
        assert_eq!(revoked.len(), 1);
        self.cert(thing).await
    }

    /// The thing, its certificate ACTIVE and its only principal, each exactly once.
    async fn assert_mirrored(&self, thing: &str) {
        let cert = self.cert(thing).await;
        assert_eq!(cert.status, CertStatus::Active);
        let remote = self
            .aws
            .thing(thing)
            .unwrap_or_else(|| panic!("{thing} is not in AWS"));
        assert_eq!(remote.spec.name, thing);
        assert_eq!(
            remote.principals,
            vec![cert_arn(&cert.fingerprint_sha256)],
            "{thing}: exactly its certificate attached"
        );
        assert_eq!(
            self.aws.cert_status(&cert.fingerprint_sha256).as_deref(),
            Some("ACTIVE"),
            "{thing}"
        );
        assert_eq!(
            self.aws.creations().get(&cert.fingerprint_sha256),
            Some(&1),
            "{thing}: registered once"
        );
    }
}

// ---- the stories --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_reaches_aws_once() {
    let fleet = fleet().await;
    // An empty registry: enabling queues only the CA.
    assert_eq!(fleet.enable("REVOKED").await, 1);
    let things = fleet.provision("once", 10).await;
    let queued = fleet.registry.mirror_backlog(0).await.unwrap();
    // The trigger queued a thing and a certificate operation per device.
    assert_eq!(queued.pending, 1 + 10 + 10, "{queued:?}");

    let mirror = fleet.mirror().await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(report.applied, queued.pending as u64, "{report:?}");
    assert_eq!((report.retried, report.parked), (0, 0), "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // Things first (with the CA), certificates in the next round: a thing's queue is
    // ordered.
    assert_eq!(report.rounds, 2, "{report:?}");
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 0), "{backlog:?}");
    assert_eq!(
        mirror.stats().applied.load(Ordering::Relaxed),
        report.applied
    );

    // The CA id and the ARN prefix are recorded.
    let settings = fleet.registry.mirror_settings().await.unwrap().unwrap();
    assert_eq!(settings.ca_certificate_id.as_deref(), Some("ca1"));
    assert_eq!(settings.arn_prefix.as_deref(), Some(ARN_PREFIX));

    assert_eq!(fleet.aws.thing_count(), 10);
    assert_eq!(fleet.aws.cert_count(), 10);
    for thing in &things {
        fleet.assert_mirrored(thing).await;
    }
    assert_eq!(fleet.aws.calls_of("CreateThing"), 10);
    assert_eq!(fleet.aws.calls_of("RegisterCertificate"), 10);
    assert_eq!(fleet.aws.calls_of("AttachThingPrincipal"), 10);
    assert_eq!(fleet.aws.calls_of("RegisterCACertificate"), 1);
    assert_eq!(fleet.aws.calls_of("UpdateCertificate"), 0);

    // Nothing left: a second drain does nothing and calls nobody.
    let calls = fleet.aws.total_calls();
    let again = mirror.drain(false).await.unwrap();
    assert_eq!((again.applied, again.rounds), (0, 0), "{again:?}");
    assert_eq!(fleet.aws.total_calls(), calls);
    // Not even with now_please.
    let again = mirror.drain(true).await.unwrap();
    assert_eq!((again.applied, again.rounds), (0, 0), "{again:?}");
    assert_eq!(fleet.aws.total_calls(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_parks_one_thing_only() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    let things = fleet.provision("park", 5).await;
    let refused = things[2].clone();
    fleet.aws.refuse(Some(&refused));

    let mirror = fleet.mirror().await;
    let report = mirror.drain(false).await.unwrap();
    // The refused thing's thing operation parks; its certificate operation then becomes
    // the head of the thing's queue and runs: the certificate registers, attaching it
    // says the thing is missing, the worker creates the thing — refused again — so it
    // parks too. Nothing else is touched.
    assert_eq!(report.parked, 2, "{report:?}");
    assert_eq!(report.retried, 0, "{report:?}");
    assert_eq!(report.applied, 1 + 4 + 4, "{report:?}");
    let refused_serial = fleet.cert(&refused).await.serial;
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    assert!(
        report
            .errors
            .iter()
            .all(|e| e.contains(&refused) || e.contains(&refused_serial)),
        "{:?}",
        report.errors
    );
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 2), "{backlog:?}");
    let parked: Vec<(String, String)> = backlog
        .parked_ops
        .iter()
        .map(|op| (op.kind.to_string(), op.subject.clone()))
        .collect();
    assert_eq!(
        parked,
        vec![
            ("thing".to_owned(), refused.clone()),
            ("certificate".to_owned(), refused_serial.clone()),
        ]
    );
    for op in &backlog.parked_ops {
        assert_eq!(op.state, "parked");
        assert_eq!(op.queue, format!("thing:{refused}"));
        assert_eq!(op.attempts, 1, "{op:?}");
        let error = op.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("InvalidRequestException"), "{error}");
        assert!(error.contains("deprecated thing type"), "{error}");
    }
    assert_eq!(mirror.stats().parked.load(Ordering::Relaxed), 2);

    // The other four are complete; the refused one is absent, its certificate
    // registered (ACTIVE) but attached to nothing.
    for thing in things.iter().filter(|t| **t != refused) {
        fleet.assert_mirrored(thing).await;
    }
    assert!(fleet.aws.thing(&refused).is_none());
    assert_eq!(fleet.aws.thing_count(), 4);
    let refused_cert = fleet.cert(&refused).await;
    assert_eq!(
        fleet
            .aws
            .cert_status(&refused_cert.fingerprint_sha256)
            .as_deref(),
        Some("ACTIVE")
    );

    // Parked operations stay out of the way: nothing runs until they are put back.
    let again = mirror.drain(true).await.unwrap();
    assert_eq!(again.rounds, 0, "{again:?}");

    // The cause is fixed; `aws sync --retry-parked`.
    fleet.aws.refuse(None);
    let requeued = fleet
        .registry
        .requeue_parked_mirror_ops(fleet.clock.now())
        .await
        .unwrap();
    assert_eq!(requeued, 2);
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (2, 0, 0),
        "{report:?}"
    );
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 0), "{backlog:?}");
    assert_eq!(fleet.aws.thing_count(), 5);
    assert_eq!(fleet.aws.cert_count(), 5);
    for thing in &things {
        fleet.assert_mirrored(thing).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_backs_off_and_loses_nothing() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    let first = fleet.provision("down", 5).await;
    let mirror = fleet.mirror().await;

    fleet.aws.set_down(true);
    let report = mirror.drain(false).await.unwrap();
    // One round: the heads of the queues (the CA and each thing) fail and back off; the
    // certificates wait behind their things; the next claim finds nothing due.
    assert_eq!(report.applied, 0, "{report:?}");
    assert_eq!(report.parked, 0, "{report:?}");
    assert_eq!(report.retried, 1 + 5, "{report:?}");
    assert_eq!(report.rounds, 1, "{report:?}");
    assert!(
        report.errors.iter().all(|e| e.contains("transient")),
        "{:?}",
        report.errors
    );
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert_eq!(backlog.pending, 1 + 5 + 5, "{backlog:?}");
    assert_eq!(backlog.retrying, 1 + 5, "{backlog:?}");
    assert_eq!(backlog.parked, 0, "{backlog:?}");
    let oldest = backlog.oldest_pending.clone().unwrap();
    assert_eq!(oldest.attempts, 1, "{oldest:?}");
    assert!(oldest.not_before > fleet.clock.now(), "{oldest:?}");
    assert!(
        oldest
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("transient"),
        "{oldest:?}"
    );

    // Same time: everything is in backoff, nothing is claimed, AWS is not called.
    let calls = fleet.aws.total_calls();
    let again = mirror.drain(false).await.unwrap();
    assert_eq!(
        (again.rounds, again.applied, again.retried),
        (0, 0, 0),
        "{again:?}"
    );
    assert_eq!(fleet.aws.total_calls(), calls);

    // The fleet keeps growing during the outage.
    let second = fleet.provision("late", 5).await;
    let backlog = fleet.registry.mirror_backlog(0).await.unwrap();
    assert_eq!(backlog.pending, 1 + 10 + 10, "{backlog:?}");

    // AWS is back; once the backoff has passed, everything goes, once.
    fleet.aws.set_down(false);
    fleet.clock.advance(600);
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (1 + 10 + 10, 0, 0),
        "{report:?}"
    );
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 0), "{backlog:?}");
    assert_eq!(fleet.aws.thing_count(), 10);
    assert_eq!(fleet.aws.cert_count(), 10);
    for thing in first.iter().chain(&second) {
        fleet.assert_mirrored(thing).await;
    }
    assert!(fleet.aws.creations().values().all(|n| *n == 1));
    let stats = mirror.stats();
    assert_eq!(stats.retried.load(Ordering::Relaxed), 6);
    assert_eq!(stats.applied.load(Ordering::Relaxed), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_rotation_status() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    let things = fleet.provision("rev", 3).await;
    let mirror = fleet.mirror().await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(report.applied, 1 + 3 + 3, "{report:?}");
    for thing in &things {
        fleet.assert_mirrored(thing).await;
    }

    // A plain revocation: REVOKED in AWS, left attached (the device can no longer
    // connect anyway; detaching is for retired rotations).
    let compromised = fleet.revoke(&things[0], "keyCompromise").await;
    assert_eq!(compromised.status, CertStatus::Revoked);
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        fleet
            .aws
            .cert_status(&compromised.fingerprint_sha256)
            .as_deref(),
        Some("REVOKED")
    );
    assert_eq!(
        fleet.aws.thing(&things[0]).unwrap().principals,
        vec![cert_arn(&compromised.fingerprint_sha256)]
    );

    // A certificate retired by a rotation (reason `superseded`): the rotated status
    // (REVOKED here), and detached from its thing.
    let rotated = fleet.revoke(&things[1], "superseded").await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        fleet
            .aws
            .cert_status(&rotated.fingerprint_sha256)
            .as_deref(),
        Some("REVOKED")
    );
    assert!(fleet.aws.thing(&things[1]).unwrap().principals.is_empty());
    assert_eq!(fleet.aws.calls_of("DetachThingPrincipal"), 1);

    // Reconcile agrees with what the worker did.
    let check = mirror.reconcile(true).await.unwrap();
    assert!(check.drift.is_empty(), "{:?}", check.drift);
    assert_eq!(check.certificates_checked, 3);

    // With rotated_status INACTIVE (settings changed while enabled: nothing queued, the
    // CA registration kept), a new worker makes retired certificates INACTIVE.
    assert_eq!(fleet.enable("INACTIVE").await, 0);
    let settings = fleet.registry.mirror_settings().await.unwrap().unwrap();
    assert_eq!(settings.rotated_status, "INACTIVE");
    assert_eq!(settings.arn_prefix.as_deref(), Some(ARN_PREFIX));
    let mirror = fleet.mirror().await;
    let retired = fleet.revoke(&things[2], "superseded").await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        fleet
            .aws
            .cert_status(&retired.fingerprint_sha256)
            .as_deref(),
        Some("INACTIVE")
    );
    assert!(fleet.aws.thing(&things[2]).unwrap().principals.is_empty());
    // The others are as they were; nothing was registered twice.
    assert_eq!(
        fleet
            .aws
            .cert_status(&compromised.fingerprint_sha256)
            .as_deref(),
        Some("REVOKED")
    );
    assert_eq!(
        fleet
            .aws
            .cert_status(&rotated.fingerprint_sha256)
            .as_deref(),
        Some("REVOKED")
    );
    assert!(fleet.aws.creations().values().all(|n| *n == 1));
    assert_eq!(fleet.aws.calls_of("RegisterCACertificate"), 1);
    // (Reconcile after the switch: see `changing_rotated_status_leaves_no_unrepairable_drift`.)
}

/// A certificate retired while `rotated_status` was REVOKED is REVOKED in AWS for good
/// (AWS refuses to modify a revoked certificate). Switching the setting to INACTIVE
/// afterwards must not turn it into drift that reconcile reports, and a repair parks,
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_rotated_status_leaves_no_unrepairable_drift() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    let things = fleet.provision("switch", 1).await;
    let mirror = fleet.mirror().await;
    mirror.drain(false).await.unwrap();
    let rotated = fleet.revoke(&things[0], "superseded").await;
    mirror.drain(false).await.unwrap();
    assert_eq!(
        fleet
            .aws
            .cert_status(&rotated.fingerprint_sha256)
            .as_deref(),
        Some("REVOKED")
    );

    fleet.enable("INACTIVE").await;
    let mirror = fleet.mirror().await;
    let check = mirror.reconcile(false).await.unwrap();
    let report = mirror.drain(false).await.unwrap();
    let backlog = fleet.registry.mirror_backlog(10).await.unwrap();
    assert!(
        check.drift.is_empty() && backlog.parked == 0,
        "drift {:?}; drain {report:?}; parked {:?}",
        check.drift,
        backlog.parked_ops
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_rebuilds_a_lost_account() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    let things = fleet.provision("lost", 5).await;
    let mirror = fleet.mirror().await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(report.applied, 11, "{report:?}");

    // In sync: no drift.
    let check = mirror.reconcile(true).await.unwrap();
    assert!(check.drift.is_empty(), "{:?}", check.drift);
    assert_eq!((check.things_checked, check.certificates_checked), (5, 5));

    // The account loses everything.
    fleet.aws.reset();
    let check = mirror.reconcile(true).await.unwrap();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &check.drift {
        *kinds.entry(d.kind).or_default() += 1;
    }
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("ca_missing", 1),
            ("certificate_missing", 5),
            ("thing_missing", 5)
        ]),
        "{:?}",
        check.drift
    );
    assert_eq!(check.queued, 0);
    let missing: BTreeSet<&str> = check
        .drift
        .iter()
        .filter(|d| d.kind == "thing_missing")
        .map(|d| d.subject.as_str())
        .collect();
    assert_eq!(missing, things.iter().map(String::as_str).collect());
    let backlog = fleet.registry.mirror_backlog(0).await.unwrap();
    assert_eq!(backlog.pending, 0, "a dry run queues nothing");

    // Repair: queue, drain.
    let repair = mirror.reconcile(false).await.unwrap();
    assert_eq!(repair.queued, 1 + 5 + 5, "{repair:?}");
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (11, 0, 0),
        "{report:?}"
    );
    assert_eq!(fleet.aws.thing_count(), 5);
    assert_eq!(fleet.aws.cert_count(), 5);
    for thing in &things {
        fleet.assert_mirrored(thing).await;
    }

    // And now it is in sync again.
    let check = mirror.reconcile(true).await.unwrap();
    assert!(check.drift.is_empty(), "{:?}", check.drift);
    assert_eq!((check.things_checked, check.certificates_checked), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_named_by_the_ids_aws_returns() {
    // An account that names certificates by the SHA-256 of the PEM text (moto's and
    // LocalStack's default): attachments and status changes must use the id and ARN it
    // returned, not the SHA-256 of the DER.
    let fleet = fleet().await;
    fleet.aws.pem_ids.store(true, Ordering::SeqCst);
    fleet.enable("REVOKED").await;
    let things = fleet.provision("pem", 3).await;
    let mirror = fleet.mirror().await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!(
        (report.applied, report.retried, report.parked),
        (7, 0, 0),
        "{report:?}"
    );
    for thing in &things {
        let cert = fleet.cert(thing).await;
        let recorded = fleet
            .registry
            .mirrored_certificate(&cert.serial)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{thing}: no AWS id recorded"));
        assert_ne!(recorded.certificate_id, cert.fingerprint_sha256);
        assert_eq!(recorded.certificate_arn, cert_arn(&recorded.certificate_id));
        assert_eq!(
            fleet.aws.cert_status(&recorded.certificate_id).as_deref(),
            Some("ACTIVE")
        );
        assert_eq!(
            fleet.aws.thing(thing).unwrap().principals,
            vec![recorded.certificate_arn.clone()],
            "{thing}"
        );
    }
    let check = mirror.reconcile(true).await.unwrap();
    assert!(check.drift.is_empty(), "{:?}", check.drift);

    // A status change goes to the id AWS gave.
    let revoked = fleet.revoke(&things[0], "keyCompromise").await;
    let report = mirror.drain(false).await.unwrap();
    assert_eq!((report.applied, report.parked), (1, 0), "{report:?}");
    let recorded = fleet
        .registry
        .mirrored_certificate(&revoked.serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fleet.aws.cert_status(&recorded.certificate_id).as_deref(),
        Some("REVOKED")
    );
    assert_eq!(fleet.aws.cert_count(), 3, "nothing registered twice");
    let check = mirror.reconcile(true).await.unwrap();
    assert!(check.drift.is_empty(), "{:?}", check.drift);

    // The same region again keeps the ids; another account's ids mean nothing: a mirror
    // pointed elsewhere forgets them.
    fleet.enable("REVOKED").await;
    assert_eq!(
        fleet.registry.mirrored_certificates().await.unwrap().len(),
        3
    );
    fleet
        .registry
        .enable_mirror(
            &MirrorSettings {
                enabled: true,
                region: "us-east-1".into(),
                endpoint_url: None,
                ca_mode: "sni-only".into(),
                rotated_status: "REVOKED".into(),
                ca_certificate_id: None,
                arn_prefix: None,
                updated_at: fleet.clock.now(),
            },
            fleet.clock.now(),
        )
        .await
        .unwrap();
    assert!(
        fleet
            .registry
            .mirrored_certificates()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_waits_for_operations_another_worker_holds() {
    let fleet = fleet().await;
    fleet.enable("REVOKED").await;
    fleet.provision("held", 2).await;
    let mirror = fleet.mirror().await;
    // Another process (serve) has claimed everything it could and is applying it.
    let now = fleet.clock.now();
    let held = fleet
        .registry
        .claim_mirror_ops("serve-elsewhere", now, 300, 256, false)
        .await
        .unwrap();
    assert_eq!(held.len(), 3, "the CA and the two things: {held:?}");

    // Without waiting: nothing this process may apply, everything still pending.
    let outcome = mirror
        .sync(
            std::time::Duration::ZERO,
            std::time::Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.report.applied, 0);
    assert_eq!(
        (outcome.backlog.pending, outcome.backlog.in_flight),
        (5, 3),
        "{outcome:?}"
    );

    // The other worker finishes a moment later: sync waits, then applies what queued
    // behind (the certificates) and ends with an empty outbox.
    let registry = fleet.registry.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let results: Vec<_> = held
            .iter()
            .map(|op| fleetcert_registry::MirrorResult {
                id: op.id,
                outcome: fleetcert_registry::MirrorOutcome::Applied,
            })
            .collect();
        registry
            .finish_mirror_ops("serve-elsewhere", &results, now)
            .await
            .unwrap()
    });
    let outcome = mirror
        .sync(
            std::time::Duration::from_secs(20),
            std::time::Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert_eq!(finisher.await.unwrap(), 3);
    assert!(!outcome.timed_out, "{outcome:?}");
    assert_eq!(
        (outcome.backlog.pending, outcome.backlog.parked),
        (0, 0),
        "{outcome:?}"
    );
    assert_eq!(outcome.report.applied, 2, "{outcome:?}");
}
