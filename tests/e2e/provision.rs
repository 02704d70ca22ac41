use crate::util::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn a_generated_key_device_gets_a_certificate_openssl_verifies() {
    let env = Env::new();
    env.init_ca();
    let out = env.json(&["provision", "sensor-0001", "--out", "out", "--days", "30"]);
    assert_eq!(out["result"], "issued");
    assert_eq!(out["origin"], "generated");
    let serial = out["serial"].as_str().unwrap();
    assert_eq!(serial.len(), 32);
    assert!(
        u8::from_str_radix(&serial[..2], 16).unwrap() < 0x80,
        "top bit clear"
    );

    let crt = env.out_dir().join("sensor-0001.crt");
    let key = env.out_dir().join("sensor-0001.key");
    assert_eq!(
        files_in(&env.out_dir()),
        ["chain.pem", "sensor-0001.crt", "sensor-0001.key"]
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"),
        "PKCS#8"
    );

    let verified = env.openssl_verify(&crt);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    // chain.pem next to the device files is the same chain.
    let chain = std::fs::read_to_string(env.out_dir().join("chain.pem")).unwrap();
    assert_eq!(chain, env.ok(&["ca", "export", "--chain"]));

    let text = openssl(&["x509", "-noout", "-text", "-in", crt.to_str().unwrap()]);
    assert!(
        text.contains("Subject: CN = sensor-0001") || text.contains("Subject: CN=sensor-0001"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("URI:http://127.0.0.1:9090/crl"), "{text}");
    assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
    assert!(text.contains("X509v3 Subject Key Identifier"), "{text}");

    // The key belongs to the certificate.
    let from_key = openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()]);
    let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()]);
    assert_eq!(from_key, from_cert);

    // Validity: --days 30, notBefore backdated a few minutes.
    let cert = fleetcert_ca::describe_certificate(&std::fs::read(&crt).unwrap()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let backdate = now - cert.not_before;
    assert!(
        backdate >= time::Duration::minutes(1) && backdate <= time::Duration::minutes(15),
        "{backdate}"
    );
    let lifetime = cert.not_after - now;
    assert!(
        (lifetime - time::Duration::days(30)).abs() < time::Duration::minutes(5),
        "{lifetime}"
    );

    // The registry knows it.
    let thing = env.json(&["things", "show", "sensor-0001"]);
    assert_eq!(thing["certificates"][0]["serial"], serial);
    assert_eq!(thing["certificates"][0]["status"], "active");
    let kinds: Vec<&str> = thing["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"thing.created") && kinds.contains(&"certificate.issued"),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"certificate.delivered"), "{kinds:?}");
}

#[test]
fn nothing_a_csr_asks_for_is_copied() {
    let env = Env::new();
    env.init_ca();
    let csr = openssl_csr(
        env.dir.path(),
        "evil",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=*/O=Evil Corp",
        &[
            "-addext",
            "subjectAltName=DNS:*.example.com,URI:spiffe://evil",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "extendedKeyUsage=serverAuth,codeSigning",
        ],
    );
    let out = env.json(&[
        "provision",
        "meter-7",
        "--csr",
        csr.to_str().unwrap(),
        "--out",
        "out",
    ]);
    assert_eq!(out["origin"], "csr");
    assert!(out.get("private_key").is_none());
    assert_eq!(files_in(&env.out_dir()), ["chain.pem", "meter-7.crt"]);
    let crt = env.out_dir().join("meter-7.crt");
    let text = openssl(&["x509", "-noout", "-text", "-in", crt.to_str().unwrap()]);
    assert!(!text.contains("Evil"), "{text}");
    assert!(
        !text.contains("example.com") && !text.contains("spiffe"),
        "{text}"
    );
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    assert!(
        text.contains("CA:FALSE") && !text.contains("CA:TRUE"),
        "{text}"
    );
    assert!(
        !text.contains("Certificate Sign") && !text.contains("Code Signing"),
        "{text}"
    );
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(
        text.contains("CN = meter-7") || text.contains("CN=meter-7"),
        "{text}"
    );
    // The device's own key is the one certified.
    let devkey = env.dir.path().join("evil.devkey");
    assert_eq!(
        openssl(&["pkey", "-pubout", "-in", devkey.to_str().unwrap()]),
        openssl(&["x509", "-noout", "-pubkey", "-in", crt.to_str().unwrap()])
    );
    assert!(env.openssl_verify(&crt).status.success());
}

#[test]
fn der_csrs_and_every_supported_device_key_are_accepted() {
    let env = Env::new();
    env.init_ca();
    let cases: [(&str, &[&str]); 4] = [
        (
            "p384",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        ("ed", &["-newkey", "ed25519"]),
        ("rsa", &["-newkey", "rsa:2048"]),
        (
            "p256",
            &[
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-outform",
                "DER",
            ],
        ),
    ];
    for (name, key_args) in cases {
        let csr = openssl_csr(env.dir.path(), name, key_args, "/CN=x", &[]);
        env.ok(&[
            "provision",
            name,
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            "out",
        ]);
        let verified = env.openssl_verify(&env.out_dir().join(format!("{name}.crt")));
        assert!(
            verified.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
    }
}

#[test]
fn provisioning_again_skips_and_reissue_supersedes() {
    let env = Env::new();
    env.init_ca();
    let first = env.json(&["provision", "dev-1", "--out", "out"]);
    let again = env.json(&["provision", "dev-1", "--out", "out"]);
    assert_eq!(again["result"], "skipped");
    assert_eq!(again["serial"], first["serial"]);
    assert_eq!(env.certs().len(), 1);
    let re = env.json(&["provision", "dev-1", "--out", "out", "--reissue"]);
    assert_eq!(re["result"], "issued");
    assert_ne!(re["serial"], first["serial"]);
    assert_eq!(re["replaced"][0], first["serial"]);
    let old = env.json(&["certs", "list", "--status", "superseded"]);
    assert_eq!(old.as_array().unwrap().len(), 1);
    assert_eq!(old[0]["serial"], first["serial"]);
    let active = env.json(&["certs", "list", "--status", "active", "--thing", "dev-1"]);
    assert_eq!(active[0]["serial"], re["serial"]);
    assert_eq!(
        serial_of(&env.out_dir().join("dev-1.crt")),
        re["serial"].as_str().unwrap()
    );
}

#[test]
fn certs_list_filters_by_expiry() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "short", "--days", "10", "--out", "out"]);
    env.ok(&["provision", "long", "--days", "400", "--out", "out"]);
    let soon = env.json(&["certs", "list", "--expiring-within", "30d"]);
    let names: Vec<&str> = soon
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["thing_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["short"]);
    let all = env.json(&["things", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    env.fails(&["certs", "list", "--expiring-within", "soon"], 2);
    env.fails(&["things", "show", "nobody"], 1);
}

#[test]
fn a_recorded_template_must_exist() {
    let env = Env::new();
    env.init_ca();
    let err = env.fails(
        &[
            "provision",
            "dev-1",
            "--template",
            "missing",
            "--out",
            "out",
        ],
        2,
    );
    assert!(err.contains("missing"), "{err}");
    let err = env.fails(
        &[
            "provision",
            "dev-1",
            "--template",
            "../etc/passwd",
            "--out",
            "out",
        ],
        2,
    );
    assert!(err.contains("invalid template name"), "{err}");
    assert!(env.certs().is_empty());
    std::fs::create_dir_all(env.data_dir().join("templates")).unwrap();
    std::fs::write(
        env.data_dir().join("templates/sensor.yaml"),
        fleetcert_templates::DEFAULT_TEMPLATE_YAML,
    )
    .unwrap();
    env.ok(&["provision", "dev-1", "--template", "sensor", "--out", "out"]);
    assert_eq!(
        env.json(&["things", "show", "dev-1"])["thing"]["template"],
        "sensor"
    );
}
