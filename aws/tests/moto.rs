//! `SdkIot` against moto, a local fake of AWS IoT Core.
//!
//! Run through `scripts/with-moto.sh` (scripts/test.sh does), which starts moto and exports
//! `FLEETCERT_TEST_MOTO_URL`, `FLEETCERT_TEST_MOTO_BIN` and dummy AWS credentials:
//!
//!     scripts/with-moto.sh cargo test -p fleetcert-aws -- --include-ignored
//!
//! The tests share one moto server; each uses its own region (moto keeps state per region) and
//! unique names, so they are independent of each other and of earlier runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetcert_aws::{
    AwsError, CaMode, CertStatus, ClientSettings, IotApi, PolicyChange, SdkIot, ThingSpec,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

fn moto_url() -> String {
    std::env::var("FLEETCERT_TEST_MOTO_URL").unwrap_or_else(|_| {
        panic!(
            "FLEETCERT_TEST_MOTO_URL is not set: this test needs a moto server; run it through \
             scripts/with-moto.sh (e.g. scripts/with-moto.sh cargo test -p fleetcert-aws -- \
             --include-ignored)"
        )
    })
}

fn moto_bin() -> String {
    std::env::var("FLEETCERT_TEST_MOTO_BIN").unwrap_or_else(|_| {
        panic!("FLEETCERT_TEST_MOTO_BIN is not set: run this test through scripts/with-moto.sh")
    })
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect_to(url: &str, region: &str) -> SdkIot {
    SdkIot::connect(&ClientSettings {
        region: region.to_owned(),
        endpoint_url: Some(url.to_owned()),
        operation_timeout: Some(Duration::from_secs(20)),
        connect_timeout: Some(Duration::from_secs(2)),
    })
    .await
    .expect("connect")
}

async fn moto(region: &str) -> SdkIot {
    connect_to(&moto_url(), region).await
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A leaf with subject CN `cn` signed by this CA: (PEM, DER).
    fn leaf(&self, cn: &str) -> (String, Vec<u8>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params
            .signed_by(&KeyPair::generate().unwrap(), &self.issuer)
            .unwrap();
        (cert.pem(), cert.der().to_vec())
    }
}

fn attrs(names_and_attrs: &[(&str, &str)]) -> BTreeMap<String, String> {
    names_and_attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn register_ca_is_idempotent() {
    let iot = moto("eu-west-1").await;

    // DEFAULT mode: verification certificate with the registration code as CN.
    let code = iot.registration_code().await.unwrap();
    assert!(!code.is_empty());
    let ca = Ca::new(&unique("ca-default"));
    let (verification, _) = ca.leaf(&code);
    let first = iot
        .register_ca(&ca.pem(), Some(&verification), CaMode::Default)
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(
        first.id,
        sha256_hex(&ca.der()),
        "CA id is SHA-256 of the DER"
    );
    assert!(first.arn.ends_with(&first.id), "{}", first.arn);
    let second = iot
        .register_ca(&ca.pem(), Some(&verification), CaMode::Default)
        .await
        .unwrap();
    assert!(!second.created);
    assert_eq!(second.id, first.id);
    assert_eq!(second.arn, first.arn);
    assert_eq!(
        iot.ca_status(&first.id).await.unwrap().as_deref(),
        Some("ACTIVE")
    );
    assert_eq!(iot.ca_status(&"0".repeat(64)).await.unwrap(), None);

    // SNI_ONLY mode: no verification certificate.
    let sni = Ca::new(&unique("ca-sni"));
    let first = iot
        .register_ca(&sni.pem(), None, CaMode::SniOnly)
        .await
        .unwrap();
    assert!(first.created);
    let second = iot
        .register_ca(&sni.pem(), None, CaMode::SniOnly)
        .await
        .unwrap();
    assert!(!second.created);
    assert_eq!(second.id, first.id);

    // DEFAULT mode without a verification certificate is refused before calling AWS.
    let other = Ca::new(&unique("ca-noverify"));
    match iot.register_ca(&other.pem(), None, CaMode::Default).await {
        Err(AwsError::Permanent { .. }) => {}
        other => panic!("expected Permanent, got {other:?}"),
    }
    match iot.register_ca("not a pem", None, CaMode::SniOnly).await {
        Err(AwsError::Permanent { code, .. }) => assert_eq!(code, "InvalidPem"),
        other => panic!("expected Permanent, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn register_and_revoke_certificate() {
    let iot = moto("eu-west-2").await;
    let ca = Ca::new(&unique("ca"));
    iot.register_ca(&ca.pem(), None, CaMode::SniOnly)
        .await
        .unwrap();
    let (pem, der) = ca.leaf(&unique("device"));

    let first = iot
        .register_certificate(&pem, &ca.pem(), CertStatus::Active)
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(
        first.id,
        sha256_hex(&der),
        "certificate id is SHA-256 of the DER"
    );
    assert_eq!(
        fleetcert_aws::certificate_id(&pem).as_deref(),
        Some(&*first.id)
    );
    let second = iot
        .register_certificate(&pem, &ca.pem(), CertStatus::Active)
        .await
        .unwrap();
    assert_eq!(
        second,
        fleetcert_aws::Registered {
            created: false,
            ..first.clone()
        }
    );

    let listed = iot.list_certificates().await.unwrap();
    let mine = listed.iter().find(|c| c.id == first.id).expect("listed");
    assert_eq!(mine.arn, first.arn);
    assert_eq!(mine.status, "ACTIVE");

    iot.update_certificate(&first.id, CertStatus::Revoked)
        .await
        .unwrap();
    let listed = iot.list_certificates().await.unwrap();
    let mine = listed.iter().find(|c| c.id == first.id).expect("listed");
    assert_eq!(CertStatus::parse(&mine.status), Some(CertStatus::Revoked));

    // A second certificate registered INACTIVE.
    let (pem2, _) = ca.leaf(&unique("device"));
    let inactive = iot
        .register_certificate(&pem2, &ca.pem(), CertStatus::Inactive)
        .await
        .unwrap();
    let listed = iot.list_certificates().await.unwrap();
    let mine = listed.iter().find(|c| c.id == inactive.id).expect("listed");
    assert_eq!(mine.status, "INACTIVE");

    match iot
        .register_certificate("not a pem", &ca.pem(), CertStatus::Active)
        .await
    {
        Err(AwsError::Permanent { code, .. }) => assert_eq!(code, "InvalidPem"),
        other => panic!("expected Permanent, got {other:?}"),
    }

    match iot
        .update_certificate(&"ab".repeat(32), CertStatus::Inactive)
        .await
    {
        Err(err @ AwsError::NotFound { .. }) => {
            assert_eq!(err.operation(), "UpdateCertificate");
            assert!(!err.is_retryable());
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn put_thing_creates_and_updates() {
    let iot = moto("eu-west-3").await;
    let name = unique("thing");
    let thing_type = unique("type");
    let groups = vec![unique("group-a"), unique("group-b")];
    let billing_group = unique("billing");
    let mut spec = ThingSpec {
        name: name.clone(),
        thing_type: Some(thing_type.clone()),
        attributes: attrs(&[("serial", "123"), ("model", "m1")]),
        groups: groups.clone(),
        billing_group: Some(billing_group.clone()),
    };
    iot.put_thing(&spec).await.unwrap();

    let find = |list: Vec<fleetcert_aws::RemoteThing>| {
        list.into_iter()
            .find(|t| t.name == name)
            .expect("thing listed")
    };
    let remote = find(iot.list_things().await.unwrap());
    assert_eq!(remote.thing_type.as_deref(), Some(&*thing_type));
    assert_eq!(remote.attributes, spec.attributes);

    let sdk = iot.client();
    sdk.describe_thing_type()
        .thing_type_name(&thing_type)
        .send()
        .await
        .expect("thing type created");
    for group in &groups {
        let members = sdk
            .list_things_in_thing_group()
            .thing_group_name(group)
            .send()
            .await
            .expect("group created");
        assert_eq!(
            members.things(),
            std::slice::from_ref(&name),
            "members of {group}"
        );
    }
    let billed = sdk
        .list_things_in_billing_group()
        .billing_group_name(&billing_group)
        .send()
        .await
        .expect("billing group created");
    assert_eq!(billed.things(), std::slice::from_ref(&name));

    // Again with other attributes: the thing is brought in line, no error.
    spec.attributes = attrs(&[("serial", "123"), ("site", "lyon")]);
    iot.put_thing(&spec).await.unwrap();
    let remote = find(iot.list_things().await.unwrap());
    assert_eq!(remote.attributes, spec.attributes);
    assert_eq!(remote.thing_type.as_deref(), Some(&*thing_type));
    for group in &groups {
        let members = sdk
            .list_things_in_thing_group()
            .thing_group_name(group)
            .send()
            .await
            .unwrap();
        assert_eq!(
            members.things(),
            std::slice::from_ref(&name),
            "members of {group}"
        );
    }

    // And once more without a type or groups.
    let plain = ThingSpec {
        name: name.clone(),
        thing_type: None,
        attributes: BTreeMap::new(),
        groups: vec![],
        billing_group: None,
    };
    iot.put_thing(&plain).await.unwrap();
    let remote = find(iot.list_things().await.unwrap());
    assert_eq!(remote.thing_type, None);
    assert!(remote.attributes.is_empty());

    // A second thing reuses the (remembered) type and groups.
    let other = ThingSpec {
        name: unique("thing"),
        ..spec.clone()
    };
    iot.put_thing(&other).await.unwrap();
    for group in &groups {
        let members = sdk
            .list_things_in_thing_group()
            .thing_group_name(group)
            .send()
            .await
            .unwrap();
        assert!(members.things().contains(&other.name), "members of {group}");
    }

    // The type deleted behind the client's back: put_thing notices and recreates it.
    let fresh_type = unique("type");
    let third = ThingSpec {
        name: unique("thing"),
        thing_type: Some(fresh_type.clone()),
        attributes: BTreeMap::new(),
        groups: vec![],
        billing_group: None,
    };
    iot.put_thing(&third).await.unwrap();
    sdk.delete_thing_type()
        .thing_type_name(&fresh_type)
        .send()
        .await
        .unwrap();
    let fourth = ThingSpec {
        name: unique("thing"),
        ..third.clone()
    };
    iot.put_thing(&fourth).await.unwrap();
    let remote = iot
        .list_things()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == fourth.name)
        .expect("listed");
    assert_eq!(remote.thing_type.as_deref(), Some(&*fresh_type));
}

fn policy_doc(topic: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": "iot:Publish",
            "Resource": format!("arn:aws:iot:*:*:topic/{topic}"),
        }],
    })
    .to_string()
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn put_policy_versions_and_pruning() {
    let iot = moto("eu-central-1").await;
    let name = unique("policy");
    assert_eq!(iot.policy_document(&name).await.unwrap(), None);

    let doc = policy_doc("t0");
    assert_eq!(
        iot.put_policy(&name, &doc).await.unwrap(),
        PolicyChange::Created
    );
    // The same document, formatted differently.
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&doc).unwrap())
            .unwrap();
    assert_ne!(pretty, doc);
    assert_eq!(
        iot.put_policy(&name, &pretty).await.unwrap(),
        PolicyChange::Unchanged
    );

    let sdk = iot.client();
    let mut pruned_seen = Vec::new();
    for i in 1..=6 {
        let doc = policy_doc(&format!("t{i}"));
        let versions_before = sdk
            .list_policy_versions()
            .policy_name(&name)
            .send()
            .await
            .unwrap()
            .policy_versions()
            .len();
        match iot.put_policy(&name, &doc).await.unwrap() {
            PolicyChange::NewVersion { version_id, pruned } => {
                assert_eq!(version_id, (i + 1).to_string());
                assert_eq!(
                    pruned.is_some(),
                    versions_before >= 5,
                    "version {i}: {versions_before} versions before, pruned {pruned:?}"
                );
                pruned_seen.extend(pruned);
            }
            other => panic!("version {i}: expected NewVersion, got {other:?}"),
        }
        let versions = sdk
            .list_policy_versions()
            .policy_name(&name)
            .send()
            .await
            .unwrap();
        assert!(versions.policy_versions().len() <= 5);
        let default: Vec<_> = versions
            .policy_versions()
            .iter()
            .filter(|v| v.is_default_version())
            .filter_map(|v| v.version_id())
            .collect();
        assert_eq!(default, [(i + 1).to_string()]);
        let current = iot.policy_document(&name).await.unwrap().expect("policy");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&current).unwrap(),
            serde_json::from_str::<serde_json::Value>(&doc).unwrap()
        );
        // Putting the same document again changes nothing.
        assert_eq!(
            iot.put_policy(&name, &doc).await.unwrap(),
            PolicyChange::Unchanged
        );
    }
    // Versions 1..=7 were created, at most 5 kept: the two oldest were pruned, oldest first.
    assert_eq!(pruned_seen, ["1", "2"]);

    match iot.put_policy(&name, "{not json").await {
        Err(AwsError::Permanent { code, .. }) => assert_eq!(code, "MalformedPolicyException"),
        other => panic!("expected Permanent, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn attach_and_detach() {
    let iot = moto("us-east-2").await;
    let ca = Ca::new(&unique("ca"));
    let (pem, _) = ca.leaf(&unique("device"));
    let cert = iot
        .register_certificate(&pem, &ca.pem(), CertStatus::Active)
        .await
        .unwrap();
    let policy = unique("policy");
    iot.put_policy(&policy, &policy_doc("x")).await.unwrap();

    iot.attach_policy(&policy, &cert.arn).await.unwrap();
    iot.attach_policy(&policy, &cert.arn).await.unwrap();
    assert_eq!(
        iot.attached_policies(&cert.arn).await.unwrap(),
        std::slice::from_ref(&policy)
    );

    let thing = unique("thing");
    iot.put_thing(&ThingSpec {
        name: thing.clone(),
        thing_type: None,
        attributes: BTreeMap::new(),
        groups: vec![],
        billing_group: None,
    })
    .await
    .unwrap();
    assert!(iot.thing_principals(&thing).await.unwrap().is_empty());
    iot.attach_thing_principal(&thing, &cert.arn).await.unwrap();
    iot.attach_thing_principal(&thing, &cert.arn).await.unwrap();
    assert_eq!(
        iot.thing_principals(&thing).await.unwrap(),
        std::slice::from_ref(&cert.arn)
    );

    iot.detach_thing_principal(&thing, &cert.arn).await.unwrap();
    iot.detach_thing_principal(&thing, &cert.arn).await.unwrap();
    assert!(iot.thing_principals(&thing).await.unwrap().is_empty());
    // Detaching from a thing that does not exist is fine too.
    iot.detach_thing_principal(&unique("nothing"), &cert.arn)
        .await
        .unwrap();

    match iot.thing_principals(&unique("nothing")).await {
        Err(AwsError::NotFound { operation, .. }) => assert_eq!(operation, "ListThingPrincipals"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    match iot.attach_policy(&unique("no-policy"), &cert.arn).await {
        Err(AwsError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn list_things_reads_every_page() {
    let iot = std::sync::Arc::new(moto("us-west-1").await);
    let prefix = unique("many");
    // More than one page of 250.
    let names: Vec<String> = (0..260).map(|i| format!("{prefix}-{i:03}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in names.chunks(26) {
        let iot = iot.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for name in chunk {
                iot.put_thing(&ThingSpec {
                    name: name.clone(),
                    thing_type: None,
                    attributes: attrs(&[("n", &name)]),
                    groups: vec![],
                    billing_group: None,
                })
                .await
                .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let listed = iot.list_things().await.unwrap();
    let mine: BTreeMap<_, _> = listed
        .iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| (t.name.clone(), t.attributes.get("n").cloned()))
        .collect();
    assert_eq!(mine.len(), names.len(), "every thing listed exactly once");
    for name in &names {
        assert_eq!(mine.get(name), Some(&Some(name.clone())));
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn unreachable_endpoint_is_transient() {
    // Only for the credentials it exports: without credentials the call fails earlier.
    let _ = moto_url();
    let iot = SdkIot::connect(&ClientSettings {
        region: "eu-west-1".to_owned(),
        endpoint_url: Some("http://127.0.0.1:1".to_owned()),
        operation_timeout: Some(Duration::from_secs(2)),
        connect_timeout: Some(Duration::from_millis(500)),
    })
    .await
    .unwrap();
    let started = Instant::now();
    match iot.list_things().await {
        Err(err @ AwsError::Transient { .. }) => {
            assert!(err.is_retryable());
            assert_eq!(err.operation(), "ListThings");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_moto(port: u16) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto"),
    )
}

/// moto as it starts by default (scripts/with-moto.sh exports its path): it names
/// certificates by the SHA-256 of the PEM text, where AWS hashes the DER.
fn default_moto_bin() -> String {
    std::env::var("FLEETCERT_TEST_MOTO_DEFAULT_BIN").unwrap_or_else(|_| {
        panic!(
            "FLEETCERT_TEST_MOTO_DEFAULT_BIN is not set: run this test through \
             scripts/with-moto.sh"
        )
    })
}

async fn wait_until_up(iot: &SdkIot) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match iot.list_things().await {
            Ok(_) => return,
            Err(err) if err.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => panic!("moto did not come up: {err}"),
        }
    }
}

#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn outage_is_transient_and_recovers() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let iot = SdkIot::connect(&ClientSettings {
        region: "ap-southeast-2".to_owned(),
        endpoint_url: Some(url),
        operation_timeout: Some(Duration::from_secs(5)),
        connect_timeout: Some(Duration::from_millis(500)),
    })
    .await
    .unwrap();

    let server = spawn_moto(port);
    wait_until_up(&iot).await;
    drop(server);
    match iot.registration_code().await {
        Err(err @ AwsError::Transient { .. }) => assert!(err.is_retryable()),
        other => panic!("expected Transient while moto is down, got {other:?}"),
    }

    let _server = spawn_moto(port);
    wait_until_up(&iot).await;
    iot.registration_code().await.unwrap();
}

/// Without credentials a call fails with a Config error that says so. Runs the check in a child
/// process with an empty environment (no `AWS_*`, an empty HOME, IMDS disabled).
#[test]
fn missing_credentials_are_a_config_error() {
    if std::env::var_os("FLEETCERT_TEST_CREDENTIALS_CHILD").is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let iot = SdkIot::connect(&ClientSettings {
                region: "eu-west-1".to_owned(),
                endpoint_url: Some("http://127.0.0.1:1".to_owned()),
                operation_timeout: Some(Duration::from_secs(5)),
                connect_timeout: Some(Duration::from_millis(500)),
            })
            .await
            .unwrap();
            match iot.registration_code().await {
                Err(AwsError::Config(message)) => {
                    eprintln!("as expected: {message}");
                    assert!(message.contains("credentials are missing"), "{message}");
                    assert!(message.contains("GetRegistrationCode"), "{message}");
                }
                other => panic!("expected Config, got {other:?}"),
            }
        });
        return;
    }
    let home = std::env::temp_dir().join(unique("fleetcert-aws-home"));
    std::fs::create_dir_all(&home).unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "missing_credentials_are_a_config_error",
            "--exact",
            "--nocapture",
        ])
        .env_clear()
        .env("FLEETCERT_TEST_CREDENTIALS_CHILD", "1")
        .env("HOME", &home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("credentials"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&home);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Against moto's default configuration the ids are not AWS's: the client hands back the id
/// and ARN the service gave (on registration and in its "already exists" answer), and they
/// are what attachments and status changes work with.
#[tokio::test]
#[ignore = "needs moto: run through scripts/test.sh"]
async fn ids_are_the_ones_the_service_returns() {
    let port = free_port();
    let _server = KillOnDrop(
        std::process::Command::new(default_moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto"),
    );
    let iot = connect_to(&format!("http://127.0.0.1:{port}"), "eu-west-1").await;
    wait_until_up(&iot).await;
    let ca = Ca::new(&unique("ca"));
    iot.register_ca(&ca.pem(), None, CaMode::SniOnly)
        .await
        .unwrap();
    let (pem, der) = ca.leaf(&unique("device"));
    let first = iot
        .register_certificate(&pem, &ca.pem(), CertStatus::Active)
        .await
        .unwrap();
    assert!(first.created);
    assert_ne!(first.id, sha256_hex(&der), "this moto hashes the PEM text");
    assert_eq!(first.id, sha256_hex(pem.as_bytes()));
    assert!(
        first.arn.ends_with(&format!("cert/{}", first.id)),
        "{first:?}"
    );
    // "Already exists": the id and ARN come from the answer, not from the DER.
    let again = iot
        .register_certificate(&pem, &ca.pem(), CertStatus::Active)
        .await
        .unwrap();
    assert_eq!(
        again,
        fleetcert_aws::Registered {
            created: false,
            ..first.clone()
        }
    );
    let thing = unique("thing");
    iot.put_thing(&ThingSpec {
        name: thing.clone(),
        thing_type: None,
        attributes: BTreeMap::new(),
        groups: Vec::new(),
        billing_group: None,
    })
    .await
    .unwrap();
    iot.attach_thing_principal(&thing, &first.arn)
        .await
        .unwrap();
    assert_eq!(
        iot.thing_principals(&thing).await.unwrap(),
        std::slice::from_ref(&first.arn)
    );
    let policy = unique("policy");
    iot.put_policy(&policy, &policy_doc("t/1")).await.unwrap();
    iot.attach_policy(&policy, &first.arn).await.unwrap();
    assert_eq!(iot.attached_policies(&first.arn).await.unwrap(), [policy]);
    iot.update_certificate(&first.id, CertStatus::Revoked)
        .await
        .unwrap();
    let listed = iot.list_certificates().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .find(|c| c.id == first.id)
            .map(|c| c.status.as_str()),
        Some("REVOKED")
    );
}
