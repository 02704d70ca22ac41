//! The JITP server with real clients: curl and openssl over mutual TLS on loopback.
use crate::util::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `fleetcert serve`, stopped with SIGTERM when dropped.
pub struct Served {
    child: Child,
    pub device: String,
    pub admin: String,
    /// The broker API's address, when started with `--broker-api`.
    pub broker_api: Option<String>,
}

impl Served {
    pub fn start(env: &Env, extra: &[&str]) -> Served {
        Served::spawn(env.cmd(), extra)
    }

    /// Like [`Served::start`], with fleetcert's clock shifted by `offset_secs`
    /// (`FLEETCERT_TIME_OFFSET`).
    pub fn start_at(env: &Env, offset_secs: i64, extra: &[&str]) -> Served {
        let mut cmd = env.cmd();
        cmd.env("FLEETCERT_TIME_OFFSET", offset_secs.to_string());
        Served::spawn(cmd, extra)
    }

    fn spawn(mut cmd: Command, extra: &[&str]) -> Served {
        cmd.args([
            "--output",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("serve did not start ({e}): {line:?}"));
        Served {
            child,
            device: ready["listening"].as_str().unwrap().to_owned(),
            admin: ready["admin"].as_str().unwrap().to_owned(),
            broker_api: ready["broker_api"].as_str().map(str::to_owned),
        }
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// The root CA file clients trust. Written once per environment: rewriting it while
/// another client reads it would race (and so would two threads writing it at once).
pub fn trust_anchor(env: &Env) -> std::path::PathBuf {
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_writer = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    let root = env.path("trust-anchor.pem");
    if !root.exists() {
        let (exported, _) = env.chain_files();
        std::fs::rename(exported, &root).unwrap();
    }
    root
}

/// curl as a device: POST /v1/connect with its certificate; returns (HTTP status, body).
pub fn curl_connect(env: &Env, served: &Served, cert: &Path, key: &Path) -> (u16, String) {
    let root = trust_anchor(env);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-X",
            "POST",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&root)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{}/v1/connect", served.device))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    (code, body.to_owned())
}

pub fn metrics(served: &Served) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/metrics", served.admin))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn device(env: &Env, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    env.ok(&["provision", name, "--out", "out"]);
    (
        env.out_dir().join(format!("{name}.crt")),
        env.out_dir().join(format!("{name}.key")),
    )
}

#[test]
fn first_connect_provisions_in_the_same_connection_then_known() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "sensor-1");
    let served = Served::start(&env, &[]);

    let (status, body) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(status, 201, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["thing_name"], "sensor-1");
    assert_eq!(reply["status"], "provisioned");
    assert_eq!(reply["policies"][0], "fleetcert-device-default");
    assert_eq!(
        reply["certificate_serial"].as_str().unwrap(),
        serial_of(&cert)
    );
    assert_eq!(reply["rotation_due"], false);

    let (status, body) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["status"], "known");
    assert_eq!(reply["policies"][0], "fleetcert-device-default");

    let health = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/healthz", served.admin))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "ok");
    let m = metrics(&served);
    assert_eq!(
        metric(&m, "fleetcert_connects_total{status=\"provisioned\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "fleetcert_connects_total{status=\"known\"}"),
        1.0,
        "{m}"
    );

    let status = served.stop();
    assert!(status.success(), "serve exited with {status:?} on SIGTERM");
    let events = env.json(&["things", "show", "sensor-1"])["events"].clone();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"certificate.registered"), "{kinds:?}");
    assert!(kinds.contains(&"policy.attached"), "{kinds:?}");
}

#[test]
fn ten_concurrent_first_connects_register_one_thing_once() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "racer");
    let served = Served::start(&env, &[]);
    trust_anchor(&env);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| s.spawn(|| curl_connect(&env, &served, &cert, &key).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        9,
        "{statuses:?}"
    );
    drop(served);
    let shown = env.json(&["things", "show", "racer"]);
    let registered = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "certificate.registered")
        .count();
    assert_eq!(registered, 1);
    assert_eq!(env.json(&["things", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn strangers_are_refused_at_the_handshake() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "member");
    // A device of another fleet: same name, different CA.
    let other = Env::new();
    other.init_ca();
    let (foreign_cert, foreign_key) = device(&other, "member");
    let served = Served::start(&env, &[]);

    let (status, _) = curl_connect(&env, &served, &foreign_cert, &foreign_key);
    assert_eq!(
        status, 0,
        "a certificate from another CA got an HTTP answer"
    );

    let (root, _) = env.chain_files();
    let anonymous = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            "POST",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(&root)
        .arg(format!("https://{}/v1/connect", served.device))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&anonymous.stdout),
        "000",
        "no client certificate got an answer"
    );

    // TLS 1.1 is refused even with a valid certificate.
    let tls11 = Command::new("openssl")
        .args(["s_client", "-tls1_1", "-connect", &served.device, "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!tls11.status.success(), "TLS 1.1 handshake succeeded");

    // openssl with TLS 1.2 and a valid certificate works, as a second real client.
    let mut tls12 = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-tls1_2",
            "-connect",
            &served.device,
            "-CAfile",
        ])
        .arg(&root)
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    tls12
        .stdin
        .take()
        .unwrap()
        .write_all(b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let output = tls12.wait_with_output().unwrap();
    let response = String::from_utf8_lossy(&output.stdout);
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let m = metrics(&served);
    assert!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"certificate_invalid\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"no_client_certificate\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// A template with thing details and a policy scoped by the thing name: the thing gets
/// them on first connect, and the stored policy keeps its variables.
const SENSOR_TEMPLATE: &str = r#"
Parameters:
  AWS::IoT::Certificate::CommonName: {Type: String}
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: {Ref: "AWS::IoT::Certificate::CommonName"}
      ThingTypeName: thermometer
      AttributePayload: {line: "3"}
      ThingGroups: [plant-a]
  policy:
    Type: AWS::IoT::Policy
    Properties:
      PolicyName: sensor-policy
      PolicyDocument: '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/sensors/${iot:Connection.Thing.ThingName}/*"}]}'
"#;

/// Needs the subject's Country, which fleetcert's device certificates do not carry.
const NEEDS_COUNTRY: &str = r#"
Parameters:
  AWS::IoT::Certificate::CommonName: {Type: String}
  AWS::IoT::Certificate::Country: {Type: String}
Resources:
  thing:
    Type: AWS::IoT::Thing
    Properties:
      ThingName: {Ref: "AWS::IoT::Certificate::CommonName"}
      AttributePayload: {country: {Ref: "AWS::IoT::Certificate::Country"}}
"#;

#[test]
fn the_template_shapes_the_thing_and_its_policy() {
    let env = Env::new();
    env.init_ca();
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sensor.yaml"), SENSOR_TEMPLATE).unwrap();
    std::fs::write(dir.join("needs-country.yaml"), NEEDS_COUNTRY).unwrap();
    env.ok(&[
        "provision",
        "temp-1",
        "--template",
        "sensor",
        "--out",
        "out",
    ]);
    env.ok(&[
        "provision",
        "temp-2",
        "--template",
        "needs-country",
        "--out",
        "out",
    ]);
    let served = Served::start(&env, &[]);
    let out = env.out_dir();

    let (status, body) = curl_connect(
        &env,
        &served,
        &out.join("temp-1.crt"),
        &out.join("temp-1.key"),
    );
    assert_eq!(status, 201, "{body}");
    let shown = env.json(&["things", "show", "temp-1"]);
    assert!(
        shown["certificates"][0]["registered_at"].is_string(),
        "{shown}"
    );
    assert_eq!(
        shown["thing"]["details"]["thing_type"], "thermometer",
        "{shown}"
    );
    assert_eq!(shown["thing"]["details"]["attributes"]["line"], "3");
    assert_eq!(shown["thing"]["details"]["groups"][0], "plant-a");
    assert_eq!(shown["policies"][0], "sensor-policy");
    let stored = env.json(&["policies", "show", "sensor-policy"]);
    let text = stored["document"].to_string();
    assert!(text.contains("${iot:Connection.Thing.ThingName}"), "{text}");
    let effective = env.json(&["policies", "show", "sensor-policy", "--thing", "temp-1"]);
    let text = effective["document"].to_string();
    assert!(
        text.contains("topic/sensors/temp-1/*") && !text.contains("${iot:"),
        "{text}"
    );

    // A template that cannot be rendered for this certificate: 403, nothing half done.
    let (status, body) = curl_connect(
        &env,
        &served,
        &out.join("temp-2.crt"),
        &out.join("temp-2.key"),
    );
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "template_failed");
    assert!(
        error["message"].as_str().unwrap().contains("Country"),
        "{body}"
    );
    let shown = env.json(&["things", "show", "temp-2"]);
    assert!(shown["policies"].as_array().unwrap().is_empty(), "{shown}");
    assert!(
        shown["certificates"][0]["registered_at"].is_null(),
        "{shown}"
    );
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        !kinds.contains(&"certificate.registered") && !kinds.contains(&"policy.attached"),
        "{kinds:?}"
    );
    assert_eq!(env.json(&["policies", "list"]).as_array().unwrap().len(), 1);

    // Bodies are bounded.
    let big = env.path("big.bin");
    std::fs::write(&big, vec![b'x'; 200 * 1024]).unwrap();
    let root = trust_anchor(&env);
    let res = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(&root)
        .arg("--cert")
        .arg(out.join("temp-1.crt"))
        .arg("--key")
        .arg(out.join("temp-1.key"))
        .arg("--data-binary")
        .arg(format!("@{}", big.display()))
        .arg(format!("https://{}/v1/connect", served.device))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&res.stdout), "413");
}

#[test]
fn serve_refuses_an_overly_permissive_template_at_start() {
    let env = Env::new();
    env.init_ca();
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("wide.yaml"),
        SENSOR_TEMPLATE.replace(
            "topic/sensors/${iot:Connection.Thing.ThingName}/*",
            "topic/*",
        ),
    )
    .unwrap();
    let err = env.fails(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    assert!(
        err.contains("ALLOWS_BROAD_ACCESS_TO_IOT_DATA_PLANE_ACTIONS"),
        "{err}"
    );
}

/// A certificate from the fleet's own issuing CA that expired: refused at the handshake.
/// (fleetcert never issues one in the past, so openssl's `ca` signs it with the CA key.)
#[test]
fn an_expired_certificate_is_refused_at_the_handshake() {
    let env = Env::new();
    env.init_ca();
    let dir = env.path("openssl-ca");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    let config = dir.join("ca.cnf");
    std::fs::write(
        &config,
        format!(
            "[ca]\ndefault_ca = fleet\n[fleet]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = none\nunique_subject = no\n[any]\ncommonName = supplied\n[device]\nbasicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let csr = p256_csr(env.dir.path(), "old-device");
    let cert = env.path("old-device.crt");
    let ca = env.data_dir().join("ca");
    openssl(&[
        "ca",
        "-batch",
        "-notext",
        "-config",
        config.to_str().unwrap(),
        "-cert",
        ca.join("issuing.crt").to_str().unwrap(),
        "-keyfile",
        ca.join("issuing.key").to_str().unwrap(),
        "-in",
        csr.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200201000000Z",
        "-extensions",
        "device",
    ]);
    let served = Served::start(&env, &[]);
    let (status, _) = curl_connect(&env, &served, &cert, &env.path("old-device.devkey"));
    assert_eq!(status, 0, "an expired certificate got an HTTP answer");
    let m = metrics(&served);
    assert_eq!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"certificate_expired\"}"
        ),
        1.0,
        "{m}"
    );
}

/// A revocation recorded in the registry by anything — here the row is changed directly,
/// as another server sharing the database would — reaches the running server's
/// handshake within seconds, without a restart. (`fleetcert revoke` itself is tested in
/// rotation.rs.)
#[test]
fn a_revocation_takes_effect_on_a_running_server() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "stolen");
    let served = Served::start(&env, &[]);
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 201);
    let serial = serial_of(&cert);
    let db = env.data_dir().join("registry.db");
    let rows = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(fleetcert_registry::testing::execute_raw(
            db.to_str().unwrap(),
            &format!(
                "UPDATE certificates SET status = 'revoked', revoked_at = strftime('%s','now'), \
                 revocation_reason = 'keyCompromise' WHERE serial = '{serial}'"
            ),
        ))
        .unwrap();
    assert_eq!(rows, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = curl_connect(&env, &served, &cert, &key);
        if status == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still answered {status} after revocation"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let m = metrics(&served);
    assert!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"certificate_revoked\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// A client that opens a TCP connection and never speaks is cut off after the handshake
/// timeout; connections beyond the limit are closed at once; each device connection is
/// recorded with its address.
#[test]
fn limits_hold_and_connections_are_recorded() {
    use std::io::Read;
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "limited");
    let served = Served::start(
        &env,
        &["--handshake-timeout", "1s", "--max-connections", "2"],
    );
    let mut idle = std::net::TcpStream::connect(&served.device).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server sent data to a silent client");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not cut off: {:?}",
        started.elapsed()
    );
    drop(idle);

    // Two silent connections take both slots; a third device is turned away.
    let _a = std::net::TcpStream::connect(&served.device).unwrap();
    let _b = std::net::TcpStream::connect(&served.device).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 0);
    drop((_a, _b));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 201);
    let m = metrics(&served);
    assert!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"handshake_timeout\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "fleetcert_rejections_total{reason=\"connection_limit\"}"
        ) >= 1.0,
        "{m}"
    );
    served.stop(); // flushes buffered connection records
    let shown = env.json(&["things", "show", "limited"]);
    let seen = &shown["recent_connections"];
    assert_eq!(seen.as_array().unwrap().len(), 1, "{shown}");
    assert!(
        seen[0]["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{shown}"
    );
}
