//! The AWS IoT Core mirror against a real moto server, checked with boto3 (an AWS
//! client that is not ours). Each test starts its own moto (`FLEETCERT_TEST_MOTO_BIN`,
//! set by scripts/with-moto.sh through the README's test command) so it can stop it.
use crate::jitp::{Served, curl_connect, metric, metrics};
use crate::rotation::{device_request, generated_device};
use crate::util::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAY: i64 = 86_400;

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start_on(port: u16) -> Moto {
        let bin = std::env::var("FLEETCERT_TEST_MOTO_BIN").unwrap_or_else(|_| {
            panic!(
                "FLEETCERT_TEST_MOTO_BIN is not set: the AWS mirror tests need moto \
                 (run them through scripts/test.sh, which starts it via scripts/with-moto.sh)"
            )
        });
        Moto::start_bin(&bin, port)
    }

    fn start_bin(bin: &str, port: u16) -> Moto {
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
                .arg(format!("{}/moto-api/data.json", moto.url()))
                .status()
                .unwrap()
                .success();
            if ok {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Moto::start_on(port)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What AWS IoT holds, read with boto3: things with their principals, certificates
    /// with their status and attached policies.
    fn state(&self) -> Value {
        let python =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ci-cache/moto/bin/python3");
        let script = r#"
import boto3, json, sys
iot = boto3.client("iot", region_name="eu-west-1", endpoint_url=sys.argv[1],
                   aws_access_key_id="testing", aws_secret_access_key="testing")
things = {}
kw = {}
while True:
    page = iot.list_things(maxResults=250, **kw)
    for t in page["things"]:
        things[t["thingName"]] = sorted(iot.list_thing_principals(thingName=t["thingName"])["principals"])
    if not page.get("nextToken"):
        break
    kw = {"nextToken": page["nextToken"]}
certs = {}
for c in iot.list_certificates(pageSize=250)["certificates"]:
    pols = [p["policyName"] for p in iot.list_attached_policies(target=c["certificateArn"])["policies"]]
    certs[c["certificateId"]] = {"status": c["status"], "arn": c["certificateArn"], "policies": pols}
print(json.dumps({"things": things, "certificates": certs}))
"#;
        let out = Command::new(python)
            .args(["-c", script, &self.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The AWS id of a certificate file: SHA-256 of its DER.
fn aws_id(cert: &std::path::Path) -> String {
    let der = Command::new("openssl")
        .args(["x509", "-in"])
        .arg(cert)
        .args(["-outform", "DER"])
        .output()
        .unwrap()
        .stdout;
    let digest = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&der)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&digest.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn enable(env: &Env, moto: &Moto) {
    let reply = env.json(&[
        "aws",
        "enable",
        "--region",
        "eu-west-1",
        "--endpoint-url",
        &moto.url(),
    ]);
    assert_eq!(reply["enabled"], true, "{reply}");
    assert!(
        reply["ca_certificate_id"]
            .as_str()
            .is_some_and(|id| id.len() == 64),
        "{reply}"
    );
}

fn pending(env: &Env) -> i64 {
    env.json(&["aws", "status"])["pending"].as_i64().unwrap()
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[ignore = "needs moto: run through scripts/test.sh"]
fn the_mirror_follows_first_connects_rotation_and_revocation() {
    let moto = Moto::start();
    let env = Env::new();
    env.init_ca();
    enable(&env, &moto);
    let devices: Vec<(PathBuf, PathBuf)> = (1..=3)
        .map(|i| generated_device(&env, &format!("aws-{i}"), 30))
        .collect();
    let served = Served::start(
        &env,
        &["--no-rotation-worker", "--mirror-interval", "200ms"],
    );
    for (cert, key) in &devices {
        let (status, body) = curl_connect(&env, &served, cert, key);
        assert_eq!(status, 201, "{body}");
    }
    eventually("the serve worker empties the outbox", || pending(&env) == 0);

    let state = moto.state();
    for (i, (cert, _)) in devices.iter().enumerate() {
        let thing = format!("aws-{}", i + 1);
        let id = aws_id(cert);
        let aws_cert = &state["certificates"][&id];
        assert_eq!(aws_cert["status"], "ACTIVE", "{state}");
        assert_eq!(
            aws_cert["policies"],
            serde_json::json!(["fleetcert-device-default"]),
            "{state}"
        );
        assert_eq!(
            state["things"][&thing],
            serde_json::json!([aws_cert["arn"]]),
            "{state}"
        );
    }
    let m = metrics(&served);
    assert!(
        metric(&m, "fleetcert_mirror_operations_total{result=\"applied\"}") >= 6.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "fleetcert_mirror_backlog{state=\"pending\"}"),
        0.0,
        "{m}"
    );
    drop(served);

    // Rotation of aws-1: the replacement is registered; once the device uses it, the old
    // certificate is REVOKED in AWS and detached.
    let offset = 25 * DAY;
    let sweep = env
        .cmd()
        .env("FLEETCERT_TIME_OFFSET", offset.to_string())
        .args(["--output", "json", "rotate"])
        .output()
        .unwrap();
    assert!(
        sweep.status.success(),
        "{}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    let served = Served::start_at(
        &env,
        offset,
        &["--no-rotation-worker", "--mirror-interval", "200ms"],
    );
    let (old_cert, old_key) = &devices[0];
    let reply = device_request(
        &env,
        &served,
        "POST",
        "/v1/replacement",
        (old_cert, old_key),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let fetched = reply.json();
    let new_cert = env.path("aws-1-new.crt");
    let new_key = env.path("aws-1-new.key");
    std::fs::write(&new_cert, fetched["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&new_key, fetched["private_key_pem"].as_str().unwrap()).unwrap();
    let (status, body) = curl_connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{body}");
    eventually("the rotation reaches AWS", || {
        let s = moto.state();
        s["certificates"][&aws_id(old_cert)]["status"] == "REVOKED"
            && s["things"]["aws-1"]
                == serde_json::json!([s["certificates"][&aws_id(&new_cert)]["arn"]])
    });
    let state = moto.state();
    assert_eq!(
        state["certificates"][&aws_id(&new_cert)]["status"],
        "ACTIVE",
        "{state}"
    );
    assert_eq!(
        state["certificates"][&aws_id(&new_cert)]["policies"],
        serde_json::json!(["fleetcert-device-default"]),
        "{state}"
    );

    // Revocation by the operator: REVOKED.
    let (cert2, _) = &devices[1];
    env.cmd()
        .env("FLEETCERT_TIME_OFFSET", offset.to_string())
        .args(["revoke", "--thing", "aws-2", "--reason", "keyCompromise"])
        .output()
        .unwrap();
    eventually("the revocation reaches AWS", || {
        moto.state()["certificates"][&aws_id(cert2)]["status"] == "REVOKED"
    });
    // Untouched: aws-3.
    let state = moto.state();
    assert_eq!(
        state["certificates"][&aws_id(&devices[2].0)]["status"],
        "ACTIVE",
        "{state}"
    );
}

#[test]
#[ignore = "needs moto: run through scripts/test.sh"]
fn an_outage_loses_nothing_and_reconcile_rebuilds_an_empty_account() {
    let mut moto = Moto::start();
    let port = moto.port;
    let env = Env::new();
    env.init_ca();
    enable(&env, &moto);
    env.provision_pallet("before", 20, 30);
    let synced = env.json(&["aws", "sync"]);
    assert_eq!(synced["pending_after"], 0, "{synced}");
    assert_eq!(moto.state()["things"].as_object().unwrap().len(), 20);

    // AWS unreachable: provisioning goes on; sync retries, keeps everything, exits 1.
    moto.stop();
    env.provision_pallet("during", 20, 30);
    let out = env.run(&["--output", "json", "aws", "sync"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["retried"].as_u64().unwrap() >= 20, "{report}");
    assert_eq!(report["parked"], 0, "{report}");
    let status = env.json(&["aws", "status"]);
    assert_eq!(status["pending"], 40, "{status}");
    assert!(
        status["oldest_pending"]["last_error"]
            .as_str()
            .unwrap()
            .contains("transient"),
        "{status}"
    );

    // AWS comes back empty: reconcile finds everything missing, sync rebuilds it once.
    let moto = Moto::start_on(port);
    let drift = env.json(&["aws", "reconcile", "--dry-run"]);
    assert_eq!(drift["queued"], 0, "{drift}");
    let kinds: Vec<&str> = drift["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"ca_missing"), "{drift}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "thing_missing").count(),
        40,
        "{drift}"
    );
    let queued = env.json(&["aws", "reconcile"]);
    assert!(queued["queued"].as_u64().unwrap() >= 21, "{queued}");
    let synced = env.json(&["aws", "sync"]);
    assert_eq!(
        (
            synced["pending_after"].as_i64(),
            synced["parked_after"].as_i64()
        ),
        (Some(0), Some(0)),
        "{synced}"
    );

    let state = moto.state();
    let things = state["things"].as_object().unwrap();
    assert_eq!(things.len(), 40, "{state}");
    let certs = state["certificates"].as_object().unwrap();
    assert_eq!(certs.len(), 40, "{state}");
    for (name, principals) in things {
        assert_eq!(principals.as_array().unwrap().len(), 1, "{name}: {state}");
    }
    assert!(certs.values().all(|c| c["status"] == "ACTIVE"), "{state}");
    let again = env.json(&["aws", "reconcile", "--dry-run"]);
    assert_eq!(again["drift"], serde_json::json!([]), "{again}");
}

#[test]
fn aws_commands_refuse_bad_input() {
    let env = Env::new();
    env.init_ca();
    let msg = env.fails(&["aws", "sync"], 2);
    assert!(msg.contains("aws enable"), "{msg}");
    let msg = env.fails(&["aws", "enable", "--region", "eu west"], 2);
    assert!(msg.contains("--region"), "{msg}");
    let msg = env.fails(
        &[
            "aws",
            "enable",
            "--region",
            "eu-west-1",
            "--endpoint-url",
            "ftp://x",
        ],
        2,
    );
    assert!(msg.contains("--endpoint-url"), "{msg}");
    let status = env.json(&["aws", "status"]);
    assert_eq!(status["configured"], false, "{status}");
}

// ---------------------------------------------------------------------------------------
// Issue 12, items 11-13: AWS users' inputs.

/// The AWS IoT developer guide's templates, verbatim (templates/tests/fixtures/README.md).
fn guide_template(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../templates/tests/fixtures")
        .join(file)
}

const GUIDE_JITP: &str = "aws-guide-jitp.json";
const GUIDE_FLEET: &str = "aws-guide-fleet-provisioning.json";

#[test]
fn the_aws_guide_templates_load_verbatim() {
    let env = Env::new();
    env.init_ca();
    let jitp = guide_template(GUIDE_JITP);
    let fleet = guide_template(GUIDE_FLEET);
    // The fleet provisioning template references AWS::IoT::Certificate::Id undeclared
    // (AWS supplies it) and carries BillingGroup and DeviceConfiguration.
    let text = std::fs::read_to_string(&fleet).unwrap();
    assert!(text.contains(r#"{"Ref": "AWS::IoT::Certificate::Id"}"#));
    assert!(!text.contains(r#""AWS::IoT::Certificate::Id" : {"#));
    assert!(text.contains("\"BillingGroup\"") && text.contains("\"DeviceConfiguration\""));

    let out = env.ok(&[
        "templates",
        "lint",
        jitp.to_str().unwrap(),
        fleet.to_str().unwrap(),
    ]);
    assert_eq!(out.matches(": ok").count(), 2, "{out}");

    // Both in the templates directory: serve loads them (all of them, at start) and
    // renders the one a thing names.
    let dir = env.data_dir().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&jitp, dir.join(GUIDE_JITP)).unwrap();
    std::fs::copy(&fleet, dir.join(GUIDE_FLEET)).unwrap();
    let listed = env.json(&["templates", "list"]).to_string();
    assert!(
        listed.contains("aws-guide-jitp") && listed.contains("aws-guide-fleet-provisioning"),
        "{listed}"
    );
    let (cert, key) = generated_device(&env, "fp-1", 30);
    env.ok(&[
        "provision",
        "jitp-1",
        "--template",
        "aws-guide-jitp",
        "--out",
        "out",
    ]);
    let served = Served::start(
        &env,
        &[
            "--template",
            "aws-guide-fleet-provisioning",
            "--no-rotation-worker",
        ],
    );
    // The fleet provisioning template's parameters come from the device (AWS's Fleet
    // Provisioning API); a plain first connect supplies only the certificate's fields,
    // and the refusal names the parameter.
    let (status, body) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(status, 403, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "template_failed", "{body}");
    assert!(
        error["message"].as_str().unwrap().contains("\"ThingName\""),
        "{body}"
    );
    // The JITP template reads the subject's serialNumber, which fleetcert's certificates
    // do not carry (AWS refuses such a certificate the same way).
    let (status, body) = curl_connect(
        &env,
        &served,
        &env.out_dir().join("jitp-1.crt"),
        &env.out_dir().join("jitp-1.key"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("AWS::IoT::Certificate::SerialNumber"),
        "{body}"
    );
}

/// A TCP relay to moto that holds every chunk a client sends for a while (adjustable)
/// before passing it on, so that a worker applying operations holds its leases long
/// enough to be seen.
struct SlowRelay {
    port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowRelay {
    fn start(upstream: u16, delay: Duration) -> SlowRelay {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let (stopping, delays) = (stop.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, delay: Option<Arc<AtomicU64>>| {
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 16 * 1024];
                            loop {
                                match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if let Some(ms) = &delay {
                                            std::thread::sleep(Duration::from_millis(
                                                ms.load(Ordering::SeqCst),
                                            ));
                                        }
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Some(delays.clone()),
                );
                pipe(server, client, None);
            }
        });
        SlowRelay {
            port,
            delay_ms,
            stop,
        }
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
#[ignore = "needs moto: run through scripts/test.sh"]
fn aws_sync_waits_for_what_serve_is_applying() {
    let moto = Moto::start();
    let relay = SlowRelay::start(moto.port, Duration::from_millis(300));
    let env = Env::new();
    env.init_ca();
    let reply = env.json(&[
        "aws",
        "enable",
        "--region",
        "eu-west-1",
        "--endpoint-url",
        &relay.url(),
    ]);
    assert_eq!(reply["enabled"], true, "{reply}");
    env.provision_pallet("busy", 25, 30);
    assert_eq!(pending(&env), 1 + 25 + 25);

    // serve's mirror worker takes the heads of all queues under its lease.
    let served = Served::start(
        &env,
        &["--no-rotation-worker", "--mirror-interval", "100ms"],
    );
    eventually("serve holds operations under its lease", || {
        env.json(&["aws", "status"])["in_flight"]
            .as_i64()
            .is_some_and(|n| n > 0)
    });

    // sync waits for them (and takes its share of what follows), then exits 0.
    let started = Instant::now();
    let out = env.run(&["--output", "json", "aws", "sync", "--timeout", "60s"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["pending_after"], 0, "{report}");
    assert_eq!(report["parked_after"], 0, "{report}");
    assert_eq!(report["timed_out"], false, "{report}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let state = moto.state();
    assert_eq!(state["things"].as_object().unwrap().len(), 25, "{state}");
    assert_eq!(
        state["certificates"].as_object().unwrap().len(),
        25,
        "{state}"
    );

    // Operations another worker holds and does not finish (serve killed mid-round:
    // its leases stand until they expire): sync waits --timeout, then exits 1 saying
    // what is pending.
    drop(served);
    relay.set_delay(Duration::from_secs(3));
    env.provision_pallet("stuck", 3, 30);
    let mut lease_holder = env
        .cmd()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--no-rotation-worker",
            "--mirror-interval",
            "100ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("serve holds the new operations", || {
        env.json(&["aws", "status"])["in_flight"]
            .as_i64()
            .is_some_and(|n| n > 0)
    });
    lease_holder.kill().unwrap();
    lease_holder.wait().unwrap();
    let out = env.run(&["--output", "json", "aws", "sync", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["timed_out"], true, "{report}");
    assert!(report["in_flight_after"].as_i64().unwrap() > 0, "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out after 1s") && stderr.contains("in flight"),
        "{stderr}"
    );
    // Refused at once: nonsense timeouts.
    let msg = env.fails(&["aws", "sync", "--timeout", "100days"], 2);
    assert!(msg.contains("--timeout"), "{msg}");
}

/// moto as it starts by default: certificate ids are the SHA-256 of the PEM text, not of
/// the DER as in AWS (LocalStack builds on moto and does the same).
fn start_default_moto() -> Moto {
    let bin = std::env::var("FLEETCERT_TEST_MOTO_DEFAULT_BIN").unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.ci-cache/moto/bin/moto_server")
            .to_string_lossy()
            .into_owned()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Moto::start_bin(&bin, port)
}

#[test]
#[ignore = "needs moto: run through scripts/test.sh"]
fn the_mirror_uses_the_ids_aws_returns_against_moto_defaults() {
    let moto = start_default_moto();
    let env = Env::new();
    env.init_ca();
    enable(&env, &moto);
    let devices: Vec<(PathBuf, PathBuf)> = (1..=3)
        .map(|i| generated_device(&env, &format!("dm-{i}"), 30))
        .collect();
    let served = Served::start(
        &env,
        &["--no-rotation-worker", "--mirror-interval", "200ms"],
    );
    for (cert, key) in &devices {
        let (status, body) = curl_connect(&env, &served, cert, key);
        assert_eq!(status, 201, "{body}");
    }
    eventually("the outbox empties", || pending(&env) == 0);
    let status = env.json(&["aws", "status"]);
    assert_eq!(status["parked"], 0, "{status}");

    let state = moto.state();
    let certs = state["certificates"].as_object().unwrap();
    assert_eq!(certs.len(), 3, "{state}");
    for (i, (cert, _)) in devices.iter().enumerate() {
        let thing = format!("dm-{}", i + 1);
        // This moto does not name certificates as AWS does...
        assert!(!certs.contains_key(&aws_id(cert)), "{state}");
        // ...and the thing still has its certificate, ACTIVE, with its policy.
        let principals = state["things"][&thing].as_array().unwrap();
        assert_eq!(principals.len(), 1, "{thing}: {state}");
        let (_, aws_cert) = certs
            .iter()
            .find(|(_, c)| c["arn"] == principals[0])
            .unwrap_or_else(|| panic!("{thing}: principal is no certificate: {state}"));
        assert_eq!(aws_cert["status"], "ACTIVE", "{state}");
        assert_eq!(
            aws_cert["policies"],
            serde_json::json!(["fleetcert-device-default"]),
            "{state}"
        );
    }
    drop(served);

    // A revocation reaches the certificate under the id AWS gave it.
    env.ok(&["revoke", "--thing", "dm-2", "--reason", "keyCompromise"]);
    let synced = env.json(&["aws", "sync"]);
    assert_eq!(
        (
            synced["pending_after"].as_i64(),
            synced["parked_after"].as_i64()
        ),
        (Some(0), Some(0)),
        "{synced}"
    );
    let state = moto.state();
    let principal = state["things"]["dm-2"][0].clone();
    let revoked = state["certificates"]
        .as_object()
        .unwrap()
        .values()
        .find(|c| c["arn"] == principal)
        .unwrap();
    assert_eq!(revoked["status"], "REVOKED", "{state}");
    // And reconcile sees no drift.
    let drift = env.json(&["aws", "reconcile", "--dry-run"]);
    assert_eq!(drift["drift"], serde_json::json!([]), "{drift}");
}

/// The audit reads the mirrored account: a certificate revoked here whose revocation has
/// not reached AWS yet is still ACTIVE there (REVOKED_DEVICE_CERT_CHECK, as AWS's own
/// check would see it); once the mirror syncs, it complies; with AWS unreachable the
/// check FAILS rather than claiming compliance.
#[test]
#[ignore = "needs moto: run through scripts/test.sh"]
fn the_audit_finds_a_certificate_revoked_here_but_still_active_in_aws() {
    let mut moto = Moto::start();
    let env = Env::new();
    env.init_ca();
    enable(&env, &moto);
    let (cert, key) = generated_device(&env, "audited", 30);
    let served = Served::start(
        &env,
        &[
            "--no-rotation-worker",
            "--mirror-interval",
            "200ms",
            "--audit-interval",
            "0s",
        ],
    );
    let (status, body) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(status, 201, "{body}");
    eventually("the serve worker empties the outbox", || pending(&env) == 0);
    served.stop();
    let id = aws_id(&cert);
    assert_eq!(moto.state()["certificates"][&id]["status"], "ACTIVE");

    // Revoked here, not synced: still ACTIVE in AWS.
    let serial = serial_of(&cert);
    env.ok(&["revoke", &serial]);
    let check = ["--checks", "REVOKED_DEVICE_CERT_CHECK"];
    let (code, summary) = crate::audit::audit_at(&env, 0, &check);
    assert_eq!(code, 1, "{summary}");
    let task = summary["taskId"].as_str().unwrap();
    let found = env.json(&["audit", "findings", "--task", task]);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(
        found[0]["nonCompliantResource"]["resourceIdentifier"],
        serial.as_str()
    );
    assert_eq!(
        found[0]["reasonForNonComplianceCode"],
        "CERTIFICATE_REVOKED_BY_ISSUER"
    );
    assert_eq!(
        found[0]["nonCompliantResource"]["additionalInfo"]["awsStatus"], "ACTIVE",
        "{found}"
    );

    // The mirror catches up: compliant.
    let synced = env.json(&["aws", "sync"]);
    assert_eq!(synced["pending_after"], 0, "{synced}");
    assert_eq!(moto.state()["certificates"][&id]["status"], "REVOKED");
    let (code, summary) = crate::audit::audit_at(&env, 0, &check);
    assert_eq!(code, 0, "{summary}");
    let detail = crate::audit::detail(&summary, "REVOKED_DEVICE_CERT_CHECK");
    assert_eq!(detail["totalResourcesCount"], 1);
    assert!(
        detail["message"]
            .as_str()
            .unwrap()
            .contains("mirrored AWS account"),
        "{detail}"
    );

    // The account's logging options: moto's account never configured them (or moto
    // lacks GetV2LoggingOptions, which it answers with HTTP 500): either way the check
    // must not read as compliant.
    let (code, summary) = crate::audit::audit_at(&env, 0, &["--checks", "LOGGING_DISABLED_CHECK"]);
    assert_eq!(code, 1, "{summary}");
    let logging = crate::audit::detail(&summary, "LOGGING_DISABLED_CHECK");
    match logging["checkRunStatus"].as_str().unwrap() {
        "FAILED" => assert!(
            logging["message"]
                .as_str()
                .unwrap()
                .contains("GetV2LoggingOptions"),
            "{logging}"
        ),
        "COMPLETED_NON_COMPLIANT" => {
            let task = summary["taskId"].as_str().unwrap();
            let found = env.json(&["audit", "findings", "--task", task]);
            assert_eq!(found[0]["reasonForNonComplianceCode"], "LOGGING_DISABLED");
            assert_eq!(
                found[0]["nonCompliantResource"]["resourceType"],
                "ACCOUNT_SETTINGS"
            );
        }
        other => panic!("LOGGING_DISABLED_CHECK {other}: {summary}"),
    }

    // AWS unreachable: the checks that read it fail; the others still run.
    moto.stop();
    let (code, summary) = crate::audit::audit_at(
        &env,
        0,
        &[
            "--checks",
            "REVOKED_DEVICE_CERT_CHECK,LOGGING_DISABLED_CHECK",
        ],
    );
    assert_eq!(code, 1, "{summary}");
    let detail = crate::audit::detail(&summary, "REVOKED_DEVICE_CERT_CHECK");
    assert_eq!(detail["checkRunStatus"], "FAILED", "{summary}");
    assert!(
        detail["message"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{detail}"
    );
    assert_eq!(summary["failedChecksCount"], 2, "{summary}");
    assert_eq!(
        crate::audit::detail(&summary, "LOGGING_DISABLED_CHECK")["checkRunStatus"],
        "FAILED"
    );
    let (_, summary) = crate::audit::audit_at(&env, 0, &["--checks", "DEVICE_CERT_AGE_CHECK"]);
    assert_eq!(
        crate::audit::detail(&summary, "DEVICE_CERT_AGE_CHECK")["checkRunStatus"],
        "COMPLETED_COMPLIANT",
        "{summary}"
    );
}
