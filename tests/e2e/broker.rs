//! The broker API (`serve --broker-api`, docs/broker-api.md) driven with curl as the
//! mosquitto plugin would, with certificates made by `fleetcert provision`, and the files
//! `fleetcert mosquitto config` writes. No mosquitto needed.
use crate::jitp::Served;
use crate::util::*;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A stand-in for the plugin library (`mosquitto config` only checks that it exists).
fn fake_plugin(env: &Env) -> String {
    let path = env.path("libfleetcert_mosquitto.so");
    std::fs::write(&path, b"").unwrap();
    path.to_str().unwrap().to_owned()
}

/// `mosquitto config` into `DATA/mosquitto`; returns the secret it wrote.
fn configure(env: &Env) -> String {
    let plugin = fake_plugin(env);
    env.json(&[
        "mosquitto",
        "config",
        "--listen",
        "127.0.0.1:8883",
        "--broker-api",
        "http://127.0.0.1:8884",
        "--plugin",
        &plugin,
    ]);
    std::fs::read_to_string(env.data_dir().join("broker/broker-api.secret")).unwrap()
}

/// POSTs `body` to the broker API with `secret`; returns (HTTP status, body).
fn post(served: &Served, path: &str, secret: Option<&str>, body: &Value) -> (u16, String) {
    let addr = served.broker_api.as_deref().expect("serve --broker-api");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(["-H", "content-type: application/json"]);
    if let Some(secret) = secret {
        cmd.args(["-H", &format!("Authorization: Bearer {secret}")]);
    }
    let out = cmd
        .args(["--data-binary", &body.to_string()])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn connect(served: &Served, secret: &str, client_id: &str, cert: &Path) -> Value {
    let pem = std::fs::read_to_string(cert).unwrap();
    let (status, body) = post(
        served,
        "/broker/v1/connect",
        Some(secret),
        &json!({
            "client_id": client_id,
            "certificate_pem": pem,
            "source_address": "127.0.0.1",
            "username": "?SDK=Python&Version=1.2",
        }),
    );
    assert_eq!(status, 200, "connect: {body}");
    serde_json::from_str(&body).unwrap()
}

fn fingerprint(env: &Env, thing: &str) -> String {
    env.json(&["certs", "list", "--thing", thing])[0]["fingerprint_sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn start(env: &Env) -> Served {
    Served::start(
        env,
        &["--broker-api", "127.0.0.1:0", "--no-rotation-worker"],
    )
}

#[test]
fn broker_connect_registers_then_authorizes_and_refuses() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "sensor-0001", "--out", "out"]);
    let secret = configure(&env);
    let served = start(&env);
    let cert = env.out_dir().join("sensor-0001.crt");

    // No secret or a wrong one: 401 and nothing else.
    let body = json!({ "client_id": "sensor-0001", "certificate_pem": "" });
    let (status, text) = post(&served, "/broker/v1/connect", None, &body);
    assert_eq!((status, text.as_str()), (401, ""));
    let wrong = "0".repeat(64);
    let (status, text) = post(&served, "/broker/v1/connect", Some(&wrong), &body);
    assert_eq!((status, text.as_str()), (401, ""));
    assert_eq!(
        post(
            &served,
            "/broker/v1/sessions",
            Some(&wrong),
            &json!({"fingerprints": []})
        )
        .0,
        401
    );

    // First use: registered in this request, allowed, with the policy and the context.
    let first = connect(&served, &secret, "sensor-0001", &cert);
    assert_eq!(first["result"], "allowed", "{first}");
    assert_eq!(first["registered"], true);
    assert_eq!(first["thing_name"], "sensor-0001");
    assert_eq!(first["serial"], serial_of(&cert));
    assert_eq!(
        first["fingerprint_sha256"],
        fingerprint(&env, "sensor-0001")
    );
    assert_eq!(first["policies"][0]["name"], "fleetcert-device-default");
    let document: Value =
        serde_json::from_str(first["policies"][0]["document"].as_str().unwrap()).unwrap();
    assert_eq!(document["Version"], "2012-10-17");
    assert_eq!(first["context"]["client_id"], "sensor-0001");
    assert_eq!(first["context"]["thing"]["name"], "sensor-0001");
    assert_eq!(
        first["context"]["certificate"]["subject"]["common_name"],
        json!(["sensor-0001"])
    );
    assert_eq!(
        first["arn"],
        json!({"region": "local", "account": "000000000000"})
    );
    assert_eq!(first["cache_seconds"], 30);
    let certs = env.json(&["certs", "list", "--thing", "sensor-0001"]);
    assert!(certs[0]["registered_at"].is_string(), "{certs}");

    // Another client ID: refused, and the registration stands.
    let mismatch = connect(&served, &secret, "sensor-0002", &cert);
    assert_eq!(mismatch["result"], "refused", "{mismatch}");
    assert_eq!(mismatch["reason"], "not_authorized");
    assert_eq!(mismatch["code"], "client_id_mismatch");
    let again = connect(&served, &secret, "sensor-0001", &cert);
    assert_eq!(again["result"], "allowed", "{again}");
    assert_eq!(again["registered"], false);

    // No certificate, or not a certificate: bad credentials.
    let (_, text) = post(
        &served,
        "/broker/v1/connect",
        Some(&secret),
        &json!({ "client_id": "sensor-0001", "certificate_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" }),
    );
    let garbage: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(garbage["reason"], "bad_credentials", "{garbage}");
    assert_eq!(garbage["code"], "certificate_unreadable");

    // A certificate from another CA, even with the same name: refused.
    let stranger = Env::new();
    stranger.init_ca();
    stranger.ok(&["provision", "sensor-0001", "--out", "out"]);
    let refused = connect(
        &served,
        &secret,
        "sensor-0001",
        &stranger.out_dir().join("sensor-0001.crt"),
    );
    assert_eq!(refused["result"], "refused", "{refused}");
    assert_eq!(refused["reason"], "not_authorized");
    assert_eq!(refused["code"], "unknown_issuer");

    // Disconnects are recorded (204).
    let fp = fingerprint(&env, "sensor-0001");
    let (status, _) = post(
        &served,
        "/broker/v1/disconnect",
        Some(&secret),
        &json!({ "sessions": [ { "client_id": "sensor-0001", "fingerprint_sha256": fp, "source_address": "127.0.0.1", "connected_at": 1765000000, "disconnected_at": 1765000100 } ] }),
    );
    assert_eq!(status, 204);

    // Nothing retired yet; after `revoke`, sessions lists it and CONNECT is refused.
    let sessions = |fps: &[&str]| -> Value {
        let (status, text) = post(
            &served,
            "/broker/v1/sessions",
            Some(&secret),
            &json!({ "fingerprints": fps }),
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let unknown = "ab".repeat(32);
    assert_eq!(sessions(&[&fp, &unknown]), json!({ "retired": [] }));
    env.ok(&["revoke", "--thing", "sensor-0001"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = sessions(&[&fp, &unknown]);
        if answer["retired"].as_array().unwrap().len() == 1 {
            assert_eq!(
                answer["retired"][0],
                json!({ "fingerprint_sha256": fp, "reason": "revoked" })
            );
            break;
        }
        assert!(Instant::now() < deadline, "revocation not seen: {answer}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let revoked = connect(&served, &secret, "sensor-0001", &cert);
    assert_eq!(revoked["result"], "refused", "{revoked}");
    assert_eq!(revoked["reason"], "not_authorized");
    assert_eq!(revoked["code"], "certificate_revoked");
}

#[test]
fn concurrent_first_broker_connects_make_one_registration() {
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "sensor-0009", "--out", "out"]);
    let secret = configure(&env);
    let served = start(&env);
    let cert = env.out_dir().join("sensor-0009.crt");
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| connect(&served, &secret, "sensor-0009", &cert)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|a| a["result"] == "allowed"),
        "{answers:?}"
    );
    let registered = answers.iter().filter(|a| a["registered"] == true).count();
    assert_eq!(registered, 1, "{answers:?}");
    let events = env.json(&["things", "show", "sensor-0009"]);
    let text = events.to_string();
    assert_eq!(text.matches("certificate.registered").count(), 1, "{text}");
}

#[test]
fn serve_broker_api_needs_the_secret_and_loopback() {
    let env = Env::new();
    env.init_ca();
    let err = env.fails(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--broker-api",
            "127.0.0.1:0",
        ],
        2,
    );
    assert!(err.contains("broker/broker-api.secret"), "{err}");
    assert!(err.contains("fleetcert mosquitto config"), "{err}");
    configure(&env);
    let err = env.fails(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--broker-api",
            "0.0.0.0:0",
        ],
        2,
    );
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--broker-api-allow-remote"), "{err}");
}

#[test]
fn mosquitto_config_writes_the_broker_files() {
    let env = Env::new();
    env.init_ca();
    let plugin = fake_plugin(&env);
    let out = env.path("mqtt");
    let args = [
        "mosquitto",
        "config",
        "--listen",
        "0.0.0.0:8883",
        "--broker-api",
        "http://127.0.0.1:8884",
        "--out",
        out.to_str().unwrap(),
        "--server-name",
        "mqtt.example.com",
        "--plugin",
        &plugin,
    ];
    let report = env.json(&args);
    assert_eq!(
        report["config"],
        out.join("mosquitto.conf").to_str().unwrap()
    );
    assert_eq!(
        report["command"],
        format!("mosquitto -c {}", out.join("mosquitto.conf").display())
    );
    assert_eq!(report["secret_reused"], false);
    assert_eq!(
        files_in(&out),
        [
            "broker-api.secret",
            "ca.pem",
            "crl.pem",
            "mosquitto.conf",
            "server.crt",
            "server.key"
        ]
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("broker-api.secret")), 0o600);
    assert_eq!(mode(&out.join("server.key")), 0o600);
    let shared = env.data_dir().join("broker/broker-api.secret");
    assert_eq!(mode(&shared), 0o600);
    let secret = std::fs::read_to_string(out.join("broker-api.secret")).unwrap();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(std::fs::read_to_string(&shared).unwrap(), secret);

    let conf = std::fs::read_to_string(out.join("mosquitto.conf")).unwrap();
    let at = |f: &str| out.join(f).to_str().unwrap().to_owned();
    for line in [
        "listener 8883 0.0.0.0".to_owned(),
        format!("cafile {}", at("ca.pem")),
        format!("certfile {}", at("server.crt")),
        format!("keyfile {}", at("server.key")),
        format!("crlfile {}", at("crl.pem")),
        "require_certificate true".to_owned(),
        "set_tcp_nodelay true".to_owned(),
        "allow_anonymous false".to_owned(),
        format!(
            "plugin {}",
            std::fs::canonicalize(&plugin).unwrap().display()
        ),
        "plugin_opt_broker_api http://127.0.0.1:8884".to_owned(),
        format!("plugin_opt_secret_file {}", at("broker-api.secret")),
        format!("plugin_opt_crl_file {}", at("crl.pem")),
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "missing {line:?} in:\n{conf}"
        );
    }
    assert!(!conf.contains("use_identity_as_username"), "{conf}");

    // The chain is the fleet's (issuing then root), the CRL is the fleet's current one,
    // and the broker certificate verifies to it with its names.
    assert_eq!(
        std::fs::read_to_string(out.join("ca.pem")).unwrap(),
        env.ok(&["ca", "export", "--chain"])
    );
    let crl = openssl(&["crl", "-in", &at("crl.pem"), "-noout", "-issuer"]);
    assert!(crl.contains("Issuing CA"), "{crl}");
    let verify = openssl(&[
        "verify",
        "-CAfile",
        &at("ca.pem"),
        "-purpose",
        "sslserver",
        &at("server.crt"),
    ]);
    assert!(verify.contains("OK"), "{verify}");
    let text = openssl(&[
        "x509",
        "-in",
        &at("server.crt"),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    for name in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:mqtt.example.com",
    ] {
        assert!(text.contains(name), "{name} not in {text}");
    }

    // Again: the secret is reused, never replaced.
    let again = env.json(&args);
    assert_eq!(again["secret_reused"], true);
    assert_eq!(
        std::fs::read_to_string(out.join("broker-api.secret")).unwrap(),
        secret
    );

    // Bad input: exit 2 naming what is wrong, nothing written.
    let err = env.fails(
        &[
            "mosquitto",
            "config",
            "--listen",
            "8883",
            "--broker-api",
            "http://127.0.0.1:8884",
            "--plugin",
            &plugin,
        ],
        2,
    );
    assert!(err.contains("--listen"), "{err}");
    let err = env.fails(
        &[
            "mosquitto",
            "config",
            "--listen",
            "127.0.0.1:8883",
            "--broker-api",
            "127.0.0.1:8884",
            "--plugin",
            &plugin,
        ],
        2,
    );
    assert!(err.contains("--broker-api"), "{err}");
    let err = env.fails(
        &[
            "mosquitto",
            "config",
            "--listen",
            "127.0.0.1:8883",
            "--broker-api",
            "http://127.0.0.1:8884",
            "--plugin",
            "/nonexistent/libfleetcert_mosquitto.so",
        ],
        2,
    );
    assert!(err.contains("--plugin"), "{err}");
    assert!(!env.data_dir().join("mosquitto").exists());

    // Without --plugin: the library beside the fleetcert executable (a workspace build
    // puts it there), or an error that says to pass --plugin.
    let beside = std::path::Path::new(env!("CARGO_BIN_EXE_fleetcert"))
        .parent()
        .unwrap()
        .join("libfleetcert_mosquitto.so");
    let args = [
        "mosquitto",
        "config",
        "--listen",
        "127.0.0.1:8883",
        "--broker-api",
        "http://127.0.0.1:8884",
    ];
    if beside.exists() {
        env.ok(&args);
        let conf =
            std::fs::read_to_string(env.data_dir().join("mosquitto/mosquitto.conf")).unwrap();
        let found = std::fs::canonicalize(&beside).unwrap();
        assert!(
            conf.contains(&format!("plugin {}", found.display())),
            "{conf}"
        );
    } else {
        let err = env.fails(&args, 2);
        assert!(err.contains("--plugin"), "{err}");
        assert!(!env.data_dir().join("mosquitto").exists());
    }
}

/// Policies that name a real region and account (as written for the AWS account the mirror
/// writes to) match on the broker only when serve is told that region and account
/// (`--broker-region`, `--broker-account`); `*` matches any (the default template).
#[test]
fn policy_arns_are_matched_in_the_region_and_account_serve_is_given() {
    let env = Env::new();
    env.init_ca();
    let default = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../templates/src/default-template.yaml"),
    )
    .unwrap();
    let pinned = default
        .replace("arn:aws:iot:*:*:", "arn:aws:iot:eu-west-1:123456789012:")
        .replace("fleetcert-device-default", "pinned-account");
    assert!(pinned.contains("eu-west-1:123456789012:client/"));
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pinned.yaml"), pinned).unwrap();
    for name in ["sensor-a", "sensor-b"] {
        env.ok(&["provision", name, "--template", "pinned", "--out", "out"]);
    }
    let secret = configure(&env);

    // Default (local, 000000000000): the pinned policy does not allow iot:Connect.
    let served = start(&env);
    let cert = env.out_dir().join("sensor-a.crt");
    let refused = connect(&served, &secret, "sensor-a", &cert);
    assert_eq!(refused["result"], "refused", "{refused}");
    assert_eq!(refused["code"], "connect_denied", "{refused}");
    served.stop();

    let served = Served::start(
        &env,
        &[
            "--broker-api",
            "127.0.0.1:0",
            "--no-rotation-worker",
            "--broker-region",
            "eu-west-1",
            "--broker-account",
            "123456789012",
        ],
    );
    let cert = env.out_dir().join("sensor-b.crt");
    let allowed = connect(&served, &secret, "sensor-b", &cert);
    assert_eq!(allowed["result"], "allowed", "{allowed}");
    assert_eq!(
        allowed["arn"],
        json!({"region": "eu-west-1", "account": "123456789012"})
    );

    // A malformed account is a usage error naming the flag.
    let out = env
        .cmd()
        .args([
            "serve",
            "--broker-api",
            "127.0.0.1:0",
            "--broker-account",
            "1234",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--broker-account"));
}
