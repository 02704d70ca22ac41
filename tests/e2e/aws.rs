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
