//! Provisioning by claim (issue 15): the unmodified AWS IoT Device SDK v2 for Python
//! (`awsiotsdk`, `IotIdentityClientV2`, driven by `fleet_provisioning_device.py`) against
//! mosquitto with the fleetcert plugin and `serve --broker-api`.
use super::*;

/// A Fleet Provisioning template: the thing is named from the device's SerialNumber.
const TEMPLATE: &str = include_str!("../../docs/examples/fleet-provisioning-template.yaml");

/// What the device script printed and how it exited.
struct DeviceRun {
    code: i32,
    json: serde_json::Value,
}

fn claim(env: &Env, name: &str, extra: &[&str]) -> Device {
    let mut args = vec![
        "claims",
        "create",
        name,
        "--template",
        "sensors",
        "--out",
        "out",
    ];
    args.extend_from_slice(extra);
    env.ok(&args);
    Device {
        name: name.to_owned(),
        cert: env.out_dir().join(format!("{name}.crt")),
        key: env.out_dir().join(format!("{name}.key")),
    }
}

fn run_device(fleet: &Fleet, claim: &Device, client_id: &str, args: &[&str]) -> DeviceRun {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/fleet_provisioning_device.py");
    let out = Command::new(required_env("FLEETCERT_TEST_MQTT_PYTHON"))
        .arg(script)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &fleet.broker_port.to_string(),
        ])
        .arg("--ca")
        .arg(&fleet.cafile)
        .arg("--cert")
        .arg(&claim.cert)
        .arg("--key")
        .arg(&claim.key)
        .args(["--client-id", client_id, "--timeout", "15"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the device script printed no JSON ({e}):\n{stdout}\n{}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            fleet.broker_log()
        )
    });
    DeviceRun {
        code: out.status.code().unwrap_or(-1),
        json,
    }
}

fn rejected_code(run: &DeviceRun) -> String {
    assert_eq!(run.code, 3, "expected a rejected reply: {}", run.json);
    run.json["rejected"]["errorCode"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// PUBACK 0x00 (success) or 0x10 (accepted, no subscribers): authorized either way
/// (a publish the policy refuses gets 0x87).
fn assert_publish_accepted(json: &serde_json::Value) {
    let code = json["puback"].as_i64().unwrap_or(-1);
    assert!(
        code == SUCCESS || code == 0x10,
        "the device's publish on its own topic was refused: {json}"
    );
}

fn thing_count(env: &Env) -> usize {
    env.json(&["things", "list"]).as_array().map_or(0, Vec::len)
}

#[test]
#[ignore = "needs mosquitto, paho-mqtt and awsiotsdk (scripts/with-mosquitto.sh)"]
fn the_aws_device_sdk_provisions_by_claim_and_nobody_else_sees_the_replies() {
    let env = Env::new();
    env.init_ca();
    std::fs::create_dir_all(env.data_dir().join("templates")).unwrap();
    std::fs::write(env.data_dir().join("templates/sensors.yaml"), TEMPLATE).unwrap();
    // The pre-provisioning allow-list: serial 666 is not on it.
    std::fs::create_dir_all(env.data_dir().join("pre-provisioning")).unwrap();
    std::fs::write(
        env.data_dir().join("pre-provisioning/sensors.json"),
        r#"{"allowedSerialNumbers": ["001", "002", "003", "004", "005", "006", "007", "008", "009"]}"#,
    )
    .unwrap();
    std::fs::create_dir_all(env.out_dir()).unwrap();
    let factory = claim(&env, "factory-line-7", &[]);
    let mut fleet = Fleet::start(&env);

    // Another holder of the same claim listens on every reply topic its policy lets it
    // subscribe to (and tries the wildcards too) while the devices provision.
    let eavesdropper = probe_in_background(
        &fleet,
        &factory,
        "eavesdropper",
        &[
            "$aws/certificates/create-from-csr/json/accepted",
            "$aws/certificates/create/json/accepted",
            "$aws/provisioning-templates/sensors/provision/json/accepted",
            "$aws/certificates/#",
            "$aws/provisioning-templates/#",
        ],
        12.0,
    );
    std::thread::sleep(Duration::from_millis(1500));

    // CreateCertificateFromCsr → RegisterThing → reconnect as the thing → publish.
    let out_csr = env.path("device-csr");
    std::fs::create_dir_all(&out_csr).unwrap();
    let csr = run_device(
        &fleet,
        &factory,
        "boot-sn-001",
        &[
            "--template",
            "sensors",
            "--mode",
            "csr",
            "--param",
            "SerialNumber=001",
            "--out",
            out_csr.to_str().unwrap(),
            "--then-connect",
        ],
    );
    assert_eq!(csr.code, 0, "{}\n{}", csr.json, fleet.broker_log());
    assert_eq!(csr.json["thingName"], "sensor-001");
    assert_eq!(
        csr.json["deviceConfiguration"]["telemetryTopic"],
        "devices/sensor-001/telemetry"
    );
    assert_eq!(csr.json["reconnected"], true);
    assert_publish_accepted(&csr.json);
    let shown = env.json(&["things", "show", "sensor-001"]).to_string();
    assert!(shown.contains("sensors-by-claim"), "{shown}");

    // CreateKeysAndCertificate → RegisterThing → reconnect → publish.
    let out_keys = env.path("device-keys");
    std::fs::create_dir_all(&out_keys).unwrap();
    let keys = run_device(
        &fleet,
        &factory,
        "boot-sn-002",
        &[
            "--template",
            "sensors",
            "--mode",
            "keys",
            "--param",
            "SerialNumber=002",
            "--out",
            out_keys.to_str().unwrap(),
            "--then-connect",
        ],
    );
    assert_eq!(keys.code, 0, "{}\n{}", keys.json, fleet.broker_log());
    assert_eq!(keys.json["thingName"], "sensor-002");
    assert_publish_accepted(&keys.json);
    let key = std::fs::read_to_string(out_keys.join("device.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"), "no key written");

    let heard = eavesdropper.join().unwrap();
    assert_eq!(
        heard["messages"].as_array().map_or(0, Vec::len),
        0,
        "another holder of the claim received provisioning traffic: {heard}"
    );
    assert!(
        !heard.to_string().contains("BEGIN"),
        "a certificate or key reached another holder: {heard}"
    );
    assert_eq!(thing_count(&env), 2);

    // A replayed token: the first device's token, again.
    let token = csr.json["ownershipToken"].as_str().unwrap().to_owned();
    let replay = run_device(
        &fleet,
        &factory,
        "boot-sn-001",
        &[
            "--template",
            "sensors",
            "--token",
            &token,
            "--param",
            "SerialNumber=003",
        ],
    );
    assert_eq!(rejected_code(&replay), "CertificateOwnershipTokenUsed");

    // A token used from another connection than the one that got it.
    let created = run_device(
        &fleet,
        &factory,
        "boot-sn-004",
        &["--template", "sensors", "--only-create"],
    );
    assert_eq!(created.code, 0, "{}", created.json);
    let foreign = created.json["ownershipToken"].as_str().unwrap().to_owned();
    let stolen = run_device(
        &fleet,
        &factory,
        "thief",
        &[
            "--template",
            "sensors",
            "--token",
            &foreign,
            "--param",
            "SerialNumber=004",
        ],
    );
    assert_eq!(rejected_code(&stolen), "CertificateOwnershipTokenNotYours");

    // A CSR for a weak key (RSA 1024).
    let weak_key = env.path("weak.key");
    let weak_csr = env.path("weak.csr");
    let status = Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:1024", "-nodes", "-subj", "/CN=weak",
        ])
        .arg("-keyout")
        .arg(&weak_key)
        .arg("-out")
        .arg(&weak_csr)
        .output()
        .unwrap();
    assert!(status.status.success());
    let weak = run_device(
        &fleet,
        &factory,
        "boot-weak",
        &[
            "--template",
            "sensors",
            "--csr",
            weak_csr.to_str().unwrap(),
            "--csr-key",
            weak_key.to_str().unwrap(),
            "--param",
            "SerialNumber=005",
        ],
    );
    assert_eq!(rejected_code(&weak), "InvalidCSR");

    // A template that does not exist.
    let unknown = run_device(
        &fleet,
        &factory,
        "boot-sn-006",
        &["--template", "nope", "--param", "SerialNumber=006"],
    );
    assert_eq!(rejected_code(&unknown), "ResourceNotFound");
    assert_eq!(
        thing_count(&env),
        2,
        "a refused request left a thing behind"
    );

    // A serial number outside the template's allow-list.
    let outsider = run_device(
        &fleet,
        &factory,
        "boot-sn-666",
        &["--template", "sensors", "--param", "SerialNumber=666"],
    );
    assert_eq!(rejected_code(&outsider), "ProvisioningRefused");
    assert_eq!(thing_count(&env), 2, "a refused device left a thing behind");

    // An exhausted --max-uses.
    let once = claim(&env, "one-device", &["--max-uses", "1"]);
    let first = run_device(
        &fleet,
        &once,
        "boot-once-1",
        &["--template", "sensors", "--param", "SerialNumber=007"],
    );
    assert_eq!(first.code, 0, "{}", first.json);
    let second = run_device(
        &fleet,
        &once,
        "boot-once-2",
        &["--template", "sensors", "--param", "SerialNumber=008"],
    );
    assert_eq!(rejected_code(&second), "ClaimExhausted");
    assert_eq!(thing_count(&env), 3);

    // A revoked claim: refused at connect; its certificate is on the CRL.
    env.ok(&["claims", "revoke", "factory-line-7"]);
    let listed = env.json(&["claims", "list"]).to_string();
    assert!(listed.contains("\"revoked\""), "{listed}");
    std::thread::sleep(Duration::from_secs(4));
    let refused = run_device(
        &fleet,
        &factory,
        "boot-sn-009",
        &["--template", "sensors", "--param", "SerialNumber=009"],
    );
    assert_eq!(
        refused.code, 4,
        "a revoked claim still provisions: {}",
        refused.json
    );
    assert_eq!(thing_count(&env), 3, "a revoked claim left a thing behind");

    // The plugin's provisioning counters reach serve's /metrics with its sessions polls.
    let served = fleet.served.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = crate::jitp::metrics(served);
        let count = |result: &str| {
            crate::jitp::metric(
                &text,
                &format!("fleetcert_broker_provisioning_messages_total{{result=\"{result}\"}}"),
            )
        };
        if count("reply") >= 10.0 {
            assert!(count("request") >= count("reply"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin's provisioning counters never reached /metrics: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // An expired token: RegisterThing more than an hour after CreateKeysAndCertificate
    // (serve restarted with its clock 61 minutes ahead; mosquitto and the plugin stay up).
    let late = claim(&env, "late-line", &[]);
    let created = run_device(
        &fleet,
        &late,
        "boot-late",
        &["--template", "sensors", "--only-create"],
    );
    assert_eq!(created.code, 0, "{}", created.json);
    let stale = created.json["ownershipToken"].as_str().unwrap().to_owned();
    fleet.restart_serve_at(&env, 61 * 60);
    let expired = run_device(
        &fleet,
        &late,
        "boot-late",
        &[
            "--template",
            "sensors",
            "--token",
            &stale,
            "--param",
            "SerialNumber=009",
        ],
    );
    assert_eq!(
        rejected_code(&expired),
        "CertificateOwnershipTokenExpired",
        "{}",
        expired.json
    );
    assert_eq!(thing_count(&env), 3, "an expired token left a thing behind");
}

/// curl as a device: POST `path` with `body` (a file), authenticated by (cert, key);
/// returns (HTTP status, body).
fn curl_post(
    env: &Env,
    served: &crate::jitp::Served,
    path: &str,
    cert: &Path,
    key: &Path,
    body: &Path,
) -> (u16, String) {
    let root = env.path("root.pem");
    std::fs::write(&root, env.ok(&["ca", "export"])).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg("--cacert")
        .arg(&root)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{}{path}", served.device))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A P-256 key and a CSR with CN = `cn`, by openssl.
fn openssl_csr(env: &Env, cn: &str) -> (PathBuf, PathBuf) {
    let key = env.path(&format!("{cn}.key"));
    let csr = env.path(&format!("{cn}.csr"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key, csr)
}

#[test]
fn est_simpleenroll_with_a_claim_certificate_registers_the_device() {
    let env = Env::new();
    env.init_ca();
    std::fs::create_dir_all(env.data_dir().join("templates")).unwrap();
    std::fs::write(env.data_dir().join("templates/sensors.yaml"), TEMPLATE).unwrap();
    std::fs::create_dir_all(env.out_dir()).unwrap();
    let factory = claim(&env, "factory-est", &[]);
    let served = crate::jitp::Served::start(&env, &[]);

    // The claim is not a device: /v1/connect refuses it and registers nothing.
    let (code, body) = crate::jitp::curl_connect(&env, &served, &factory.cert, &factory.key);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("unknown_certificate"), "{body}");

    let (key, csr) = openssl_csr(&env, "042");
    let (code, body) = curl_post(
        &env,
        &served,
        "/.well-known/est/simpleenroll",
        &factory.cert,
        &factory.key,
        &csr,
    );
    assert_eq!(code, 200, "{body}");
    // The base64 PKCS#7 certs-only reply, read by openssl.
    let b64 = env.path("enrolled.p7.b64");
    std::fs::write(&b64, &body).unwrap();
    let der = Command::new("base64").arg("-d").arg(&b64).output().unwrap();
    assert!(der.status.success());
    let p7 = env.path("enrolled.p7.der");
    std::fs::write(&p7, der.stdout).unwrap();
    let printed = Command::new("openssl")
        .args(["pkcs7", "-inform", "DER", "-print_certs", "-in"])
        .arg(&p7)
        .output()
        .unwrap();
    assert!(printed.status.success());
    let cert = env.path("enrolled.crt");
    std::fs::write(&cert, &printed.stdout).unwrap();

    // The new certificate is the registered thing's: a returning device.
    let (code, body) = crate::jitp::curl_connect(&env, &served, &cert, &key);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"thing_name\":\"sensor-042\""), "{body}");
    assert!(body.contains("sensors-by-claim"), "{body}");

    // A CN that cannot be a serial number, and a weak key: refused, nothing registered.
    let (_, bad_csr) = openssl_csr(&env, "has space");
    let (code, body) = curl_post(
        &env,
        &served,
        "/.well-known/est/simpleenroll",
        &factory.cert,
        &factory.key,
        &bad_csr,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("InvalidCSR"), "{body}");
    assert_eq!(thing_count(&env), 1);

    // A revoked claim cannot enroll.
    env.ok(&["claims", "revoke", "factory-est"]);
    std::thread::sleep(Duration::from_secs(3));
    let (_, csr2) = openssl_csr(&env, "043");
    let (code, body) = curl_post(
        &env,
        &served,
        "/.well-known/est/simpleenroll",
        &factory.cert,
        &factory.key,
        &csr2,
    );
    assert_ne!(code, 200, "a revoked claim enrolled: {body}");
    assert_eq!(thing_count(&env), 1);
}
