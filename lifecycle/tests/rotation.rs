//! Rotation and revocation stories through the lifecycle API, on SQLite, with a manual
//! clock: nothing sleeps through a validity period. (The same flows over real TLS with
//! curl and openssl are in tests/e2e/rotation.rs.)
// `DeviceReport` is the batch API's error row; it is large by design.
#![allow(clippy::result_large_err)]
use fleetcert_lifecycle::jitp::{ConnectOutcome, Jitp, JitpOptions, RotationMethod};
use fleetcert_lifecycle::provision::{self, DeviceRequest, ProvisionSettings};
use fleetcert_lifecycle::renewal::{Clock, ManualClock};
use fleetcert_lifecycle::rotation::{RotationSettings, Rotator};
use fleetcert_lifecycle::{CaInitOptions, DataDir};
use fleetcert_registry::{CertStatus, CertificateFilter, Registry, RotationState};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

const DAY: i64 = 86_400;

struct Fleet {
    _temp: tempfile::TempDir,
    data: DataDir,
    out: std::path::PathBuf,
    ca: Arc<fleetcert_ca::IssuingCa>,
    registry: Arc<dyn Registry>,
    clock: Arc<ManualClock>,
}

async fn fleet(devices: usize, csr_dir: Option<&Path>) -> Fleet {
    let temp = tempfile::tempdir().unwrap();
    let data = DataDir::new(temp.path().join("data"));
    data.init_ca(&CaInitOptions::default(), None).unwrap();
    let ca = Arc::new(data.load_issuing_ca(None).unwrap());
    let registry = fleetcert_registry::open(&data.default_database_url())
        .await
        .unwrap();
    let out = temp.path().join("out");
    let requests = (0..devices)
        .map(|i| {
            Ok(DeviceRequest {
                line: None,
                thing_name: format!("rot-{i:04}"),
                csr_path: csr_dir.map(|d| d.join(format!("rot-{i:04}.csr"))),
            })
        })
        .collect();
    let mut profile = data.device_profile().unwrap();
    profile.validity_days = 30;
    let settings = ProvisionSettings::new(&out, profile);
    let summary = provision::provision(
        ca.clone(),
        registry.clone(),
        provision::prepare(requests),
        &settings,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary.issued, devices as u64);
    let clock = ManualClock::new(fleetcert_lifecycle::unix_now());
    Fleet {
        _temp: temp,
        data,
        out,
        ca,
        registry,
        clock,
    }
}

impl Fleet {
    fn options(&self) -> JitpOptions {
        let mut options = JitpOptions::new(&self.data, self.ca.clone(), "default").unwrap();
        options.clock = self.clock.clone();
        options
    }

    async fn jitp(&self) -> Jitp {
        Jitp::new(&self.data, self.registry.clone(), self.options())
            .await
            .unwrap()
    }

    fn rotator(&self, settings: RotationSettings) -> Rotator {
        let options = self.options();
        Rotator::new(
            self.registry.clone(),
            options.issuance,
            options.sealer,
            self.clock.clone(),
            settings,
            options.stats,
        )
    }

    fn cert_der(&self, thing: &str) -> Vec<u8> {
        let pem = std::fs::read_to_string(self.out.join(format!("{thing}.crt"))).unwrap();
        pem::parse(pem).unwrap().into_contents()
    }

    async fn status(&self, serial: &str) -> CertStatus {
        self.registry
            .get_certificate(serial)
            .await
            .unwrap()
            .unwrap()
            .status
    }
}

fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn serial_of(der: &[u8]) -> String {
    fleetcert_ca::device_identity(der)
        .unwrap()
        .certificate_serial_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_keys_rotate_at_their_renewal_point_and_the_old_one_goes_only_after_use() {
    let fleet = fleet(20, None).await;
    let rotator = fleet.rotator(RotationSettings::default());
    let jitp = fleet.jitp().await;
    let old = fleet.cert_der("rot-0000");
    let old_serial = serial_of(&old);
    match jitp.connect(&old, peer()).await.unwrap() {
        ConnectOutcome::Provisioned(reply) => assert!(!reply.rotation_due),
        other => panic!("{other:?}"),
    }

    // Before the renewal point (2/3 of 30 days ± 5 %), nothing is due.
    fleet.clock.advance(18 * DAY);
    let report = rotator.sweep(|_| {}).await.unwrap();
    assert_eq!((report.opened, report.issued), (0, 0));

    // After it, every certificate is, and each gets one replacement.
    fleet.clock.advance(4 * DAY);
    let report = rotator.sweep(|_| {}).await.unwrap();
    assert_eq!((report.opened, report.issued, report.failed), (20, 20, 0));
    let again = rotator.sweep(|_| {}).await.unwrap();
    assert_eq!((again.opened, again.issued), (0, 0), "once, ever");

    // The device learns it on connect, fetches the replacement, and the old certificate
    // still works meanwhile.
    let jitp = fleet.jitp().await; // no cached reply
    let reply = match jitp.connect(&old, peer()).await.unwrap() {
        ConnectOutcome::Known(reply) => reply,
        other => panic!("{other:?}"),
    };
    assert!(reply.rotation_due);
    let advice = reply.rotation.unwrap();
    assert_eq!(
        (advice.method, advice.replacement_ready),
        (RotationMethod::Fetch, true)
    );
    assert_eq!(advice.method.as_str(), "fetch");
    let fetched = jitp.fetch_replacement(&old).await.unwrap();
    let new = pem::parse(&fetched.certificate_pem)
        .unwrap()
        .into_contents();
    let new_key = fleetcert_ca::PrivateKey::from_pem(&fetched.private_key_pem, None).unwrap();
    assert_eq!(fetched.thing_name, "rot-0000");
    let identity = fleetcert_ca::device_identity(&new).unwrap();
    assert_eq!(identity.common_name.as_deref(), Some("rot-0000"));
    // The key belongs to the certificate.
    let described = fleetcert_ca::describe_certificate(fetched.certificate_pem.as_bytes()).unwrap();
    assert_eq!(described.key_algorithm, new_key.algorithm().to_string());
    assert_eq!(fleet.status(&old_serial).await, CertStatus::Superseded);
    assert!(matches!(
        jitp.connect(&old, peer()).await,
        Ok(ConnectOutcome::Known(_))
    ));
    let rotation = fleet
        .registry
        .get_rotation(&old_serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotation.state, RotationState::Delivered);

    // The first use of the new certificate revokes the old one, keeps the policies.
    let known = match jitp.connect(&new, peer()).await.unwrap() {
        ConnectOutcome::Known(reply) => reply,
        other => panic!("{other:?}"),
    };
    assert_eq!(known.policies, reply.policies);
    assert!(!known.rotation_due);
    assert_eq!(fleet.status(&old_serial).await, CertStatus::Revoked);
    let old_record = fleet
        .registry
        .get_certificate(&old_serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old_record.revocation_reason.as_deref(), Some("superseded"));
    let rotation = fleet
        .registry
        .get_rotation(&old_serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotation.state, RotationState::Confirmed);

    // Devices that never fetched are untouched: their old certificate stays active.
    let other_serial = serial_of(&fleet.cert_der("rot-0001"));
    assert_eq!(fleet.status(&other_serial).await, CertStatus::Active);

    // The CRL lists exactly the confirmed one.
    let publisher = fleetcert_lifecycle::revocation::CrlPublisher::new(
        fleet.registry.clone(),
        fleet.ca.clone(),
        fleet.clock.clone(),
    );
    let published = publisher.refresh().await.unwrap();
    assert_eq!(published.crl.entry_count, 1);
    let summary = fleetcert_ca::describe_crl(&published.crl.der).unwrap();
    assert_eq!(summary.entry_count, 1);
    let unchanged = publisher.refresh().await.unwrap();
    assert!(
        !unchanged.signed,
        "same revoked set, fresh CRL: not re-signed"
    );
    assert_eq!(unchanged.crl.number, published.crl.number);
    // Half-way to nextUpdate a new CRL with a higher number is signed.
    fleet.clock.advance(13 * 3600);
    let renewed = publisher.refresh().await.unwrap();
    assert!(renewed.signed);
    assert!(renewed.crl.number > published.crl.number);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reenrolls_is_never_revoked_by_rotation() {
    let csrs = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("rot-{i:04}"));
        let csr = params.serialize_request(&key).unwrap();
        std::fs::write(
            csrs.path().join(format!("rot-{i:04}.csr")),
            csr.pem().unwrap(),
        )
        .unwrap();
    }
    let fleet = fleet(3, Some(csrs.path())).await;
    let rotator = fleet.rotator(RotationSettings::default());
    let serials: Vec<String> = fleet
        .registry
        .list_certificates(&CertificateFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.serial)
        .collect();
    let mut opened = 0;
    for day in [10, 18, 22, 25, 29] {
        fleet.clock.set(fleetcert_lifecycle::unix_now() + day * DAY);
        let report = rotator.sweep(|_| {}).await.unwrap();
        assert_eq!(report.issued, 0, "device keys: nothing to issue ahead");
        opened += report.opened;
        for serial in &serials {
            assert_eq!(fleet.status(serial).await, CertStatus::Active, "day {day}");
        }
        let jitp = fleet.jitp().await;
        let reply = match jitp
            .connect(&fleet.cert_der("rot-0000"), peer())
            .await
            .unwrap()
        {
            ConnectOutcome::Provisioned(r) | ConnectOutcome::Known(r) => r,
        };
        assert_eq!(reply.rotation_due, day >= 22, "day {day}");
        if reply.rotation_due {
            assert_eq!(reply.rotation.unwrap().method, RotationMethod::Est);
        }
    }
    assert_eq!(opened, 3);
    let entries = fleet
        .registry
        .revoked_entries(fleet.clock.now())
        .await
        .unwrap();
    assert!(entries.is_empty());
}

/// `Jitp::identify` is certificate → thing for front ends that authorize each action:
/// it reads the registry and never writes (no registration, no rotation confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_resolves_a_certificate_to_its_thing_and_writes_nothing() {
    use fleetcert_lifecycle::jitp::Refusal;
    let fleet = fleet(3, None).await;
    let jitp = fleet.jitp().await;
    let der = fleet.cert_der("rot-0000");
    let serial = serial_of(&der);

    // Before the first connect: known, not attached, no policies; still unregistered after.
    let before = jitp.identify(&der).await.unwrap();
    assert_eq!(before.thing.name, "rot-0000");
    assert_eq!(before.certificate.serial, serial);
    assert!(!before.is_attached());
    assert!(before.policies.is_empty());
    assert!(
        jitp.identify(&der)
            .await
            .unwrap()
            .certificate
            .registered_at
            .is_none()
    );

    // After it: attached, with the policies the connect reply named.
    let reply = match jitp.connect(&der, peer()).await.unwrap() {
        ConnectOutcome::Provisioned(reply) => reply,
        other => panic!("{other:?}"),
    };
    let after = jitp.identify(&der).await.unwrap();
    assert!(after.is_attached());
    assert_eq!(after.policies, reply.policies);
    assert!(!after.policies.is_empty());

    // A replacement identified (not connected) confirms nothing: the old one stays.
    fleet.clock.advance(22 * DAY);
    fleet
        .rotator(RotationSettings::default())
        .sweep(|_| {})
        .await
        .unwrap();
    let jitp = fleet.jitp().await;
    let fetched = jitp.fetch_replacement(&der).await.unwrap();
    let new = pem::parse(&fetched.certificate_pem)
        .unwrap()
        .into_contents();
    let replacement = jitp.identify(&new).await.unwrap();
    assert_eq!(replacement.thing.name, "rot-0000");
    assert_eq!(fleet.status(&serial).await, CertStatus::Superseded);

    // Refusals: garbage, a certificate from elsewhere, a revoked one.
    assert!(matches!(
        jitp.identify(b"not a certificate").await,
        Err(Refusal::CertificateUnreadable(_))
    ));
    let stranger = rcgen::generate_simple_self_signed(vec!["rot-0001".into()])
        .unwrap()
        .cert
        .der()
        .to_vec();
    assert!(matches!(
        jitp.identify(&stranger).await,
        Err(Refusal::UnknownCertificate(_))
    ));
    let other = fleet.cert_der("rot-0001");
    fleet
        .registry
        .revoke(&fleetcert_registry::Revocation {
            target: fleetcert_registry::RevocationTarget::Serial(serial_of(&other)),
            reason: "keyCompromise".into(),
            at: fleet.clock.now(),
        })
        .await
        .unwrap();
    let refusal = jitp.identify(&other).await.unwrap_err();
    assert_eq!(refusal.code(), "certificate_revoked");
}
