//! Rotation, re-enrollment and revocation end to end: the real binary, with curl and
//! openssl as the devices and as the relying party checking the CRL.
//!
//! `FLEETCERT_TIME_OFFSET` moves fleetcert's clock across validity periods instead of
//! sleeping through them; everything that waits for the server polls with a deadline.
use crate::jitp::{Served, curl_connect, metric, metrics, trust_anchor};
use crate::util::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const DAY: i64 = 86_400;
const EST_REENROLL: &str = "/.well-known/est/simplereenroll";
const EST_CACERTS: &str = "/.well-known/est/cacerts";
const REPLACEMENT: &str = "/v1/replacement";
const PKCS7_TYPE: &str = "application/pkcs7-mime; smime-type=certs-only";
/// How long anything the server does in the background may take to show.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- fleetcert ---------------------------------------------------------------------

/// Runs fleetcert with its clock shifted by `offset` seconds.
fn run_at(env: &Env, offset: i64, args: &[&str]) -> Output {
    env.cmd()
        .env("FLEETCERT_TIME_OFFSET", offset.to_string())
        .args(args)
        .output()
        .unwrap()
}

/// `fleetcert --output json ARGS` at a shifted clock, asserting exit 0.
fn json_at(env: &Env, offset: i64, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let out = run_at(env, offset, &full);
    assert!(
        out.status.success(),
        "fleetcert {args:?} at +{offset} s failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fleetcert {args:?}: stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A device with its own key: an openssl P-256 key and CSR, provisioned for `days`.
/// Returns (certificate, key).
fn csr_device(env: &Env, name: &str, days: u32) -> (PathBuf, PathBuf) {
    let csr = p256_csr(env.dir.path(), name);
    env.ok(&[
        "provision",
        name,
        "--csr",
        csr.to_str().unwrap(),
        "--days",
        &days.to_string(),
        "--out",
        "out",
    ]);
    (
        env.out_dir().join(format!("{name}.crt")),
        env.path(&format!("{name}.devkey")),
    )
}

/// A device whose key fleetcert generated, provisioned for `days`.
pub(crate) fn generated_device(env: &Env, name: &str, days: u32) -> (PathBuf, PathBuf) {
    env.ok(&[
        "provision",
        name,
        "--days",
        &days.to_string(),
        "--out",
        "out",
    ]);
    (
        env.out_dir().join(format!("{name}.crt")),
        env.out_dir().join(format!("{name}.key")),
    )
}

/// A thing's certificates by serial.
fn thing_certs(env: &Env, thing: &str) -> HashMap<String, Value> {
    env.json(&["certs", "list", "--thing", thing])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["serial"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

/// Serials listed by `certs list --status STATUS`.
fn serials_with_status(env: &Env, status: &str) -> Vec<String> {
    env.json(&["certs", "list", "--status", status])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `done` until it holds, failing with `what` after [`PATIENCE`].
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn parse_json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// POST /v1/connect as the device; (status, JSON body or Null).
fn connect(env: &Env, served: &Served, cert: &Path, key: &Path) -> (u16, Value) {
    let (status, body) = curl_connect(env, served, cert, key);
    let json = if status == 0 {
        Value::Null
    } else {
        parse_json(&body)
    };
    (status, json)
}

// ---- openssl and curl as devices and relying parties --------------------------------

/// A fresh P-256 key and a DER CSR for it naming `cn`: (key, csr).
fn new_key_csr(env: &Env, label: &str, cn: &str) -> (PathBuf, PathBuf) {
    let csr = openssl_csr(
        env.dir.path(),
        label,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &format!("/CN={cn}"),
        &["-outform", "DER"],
    );
    (env.path(&format!("{label}.devkey")), csr)
}

/// A DER CSR for an existing key.
fn csr_for_key(env: &Env, label: &str, key: &Path, cn: &str) -> PathBuf {
    let csr = env.path(&format!("{label}.csr"));
    openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        &format!("/CN={cn}"),
        "-outform",
        "DER",
        "-out",
        csr.to_str().unwrap(),
    ]);
    csr
}

/// The RFC 7030 body for a DER CSR: base64, with line breaks as openssl writes it.
fn est_body(der: &Path) -> PathBuf {
    let b64 = der.with_extension("b64");
    openssl(&[
        "base64",
        "-in",
        der.to_str().unwrap(),
        "-out",
        b64.to_str().unwrap(),
    ]);
    b64
}

/// An HTTP answer as curl saw it; status 0 means no answer (e.g. refused at the TLS
/// handshake).
pub(crate) struct Reply {
    pub(crate) status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {}: not JSON ({e}): {}", self.status, self.text()))
    }

    /// The `error` code of a JSON refusal.
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

fn curl(env: &Env, mut cmd: Command) -> Reply {
    let body = tempfile::NamedTempFile::new_in(env.dir.path()).unwrap();
    let out = cmd
        .arg("-o")
        .arg(body.path())
        .args(["-w", "%{http_code}\n%{content_type}"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, content_type) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    let status = code.trim().parse().unwrap_or(0);
    if status == 0 {
        eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Reply {
        status,
        content_type: content_type.trim().to_owned(),
        body: std::fs::read(body.path()).unwrap_or_default(),
    }
}

/// curl as a device on the mutual-TLS listener: `method path`, optionally with a CSR body
/// read from a file.
pub(crate) fn device_request(
    env: &Env,
    served: &Served,
    method: &str,
    path: &str,
    (cert, key): (&Path, &Path),
    body: Option<&Path>,
) -> Reply {
    let root = trust_anchor(env);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method, "--cacert"])
        .arg(&root)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
            .arg(format!("@{}", body.display()));
    }
    cmd.arg(format!("https://{}{path}", served.device));
    curl(env, cmd)
}

/// EST simplereenroll with `body` (a file), authenticated by (cert, key).
fn reenroll(env: &Env, served: &Served, cert: &Path, key: &Path, body: &Path) -> Reply {
    device_request(env, served, "POST", EST_REENROLL, (cert, key), Some(body))
}

/// The PEM certificates of a base64 PKCS#7 certs-only reply (RFC 7030), decoded with
/// coreutils base64 and openssl pkcs7.
fn pkcs7_certs(env: &Env, reply: &Reply, label: &str) -> Vec<String> {
    let b64 = env.path(&format!("{label}.p7.b64"));
    let der = env.path(&format!("{label}.p7.der"));
    std::fs::write(&b64, &reply.body).unwrap();
    let decoded = Command::new("base64").arg("-d").arg(&b64).output().unwrap();
    assert!(
        decoded.status.success(),
        "the PKCS#7 reply is not base64: {}",
        reply.text()
    );
    std::fs::write(&der, decoded.stdout).unwrap();
    let printed = openssl(&[
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        der.to_str().unwrap(),
        "-print_certs",
    ]);
    pem_blocks(&printed, "CERTIFICATE")
}

/// The PEM blocks of one label in `text`, each with its BEGIN and END lines.
fn pem_blocks(text: &str, label: &str) -> Vec<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let stop = rest[start..].find(&end).expect("unterminated PEM block") + start + end.len();
        blocks.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    blocks
}

/// A PEM block without its line breaks, to compare certificates written by different
/// tools.
fn squashed(pem: &str) -> String {
    pem.split_whitespace().collect()
}

fn pubkey_of_cert(cert: &Path) -> String {
    openssl(&["x509", "-noout", "-pubkey", "-in", cert.to_str().unwrap()])
}

fn pubkey_of_key(key: &Path) -> String {
    openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()])
}

fn subject_of(cert: &Path) -> String {
    openssl(&[
        "x509",
        "-noout",
        "-subject",
        "-nameopt",
        "RFC2253",
        "-in",
        cert.to_str().unwrap(),
    ])
}

/// GET /crl on the admin listener (plain HTTP, no client certificate): the DER CRL.
fn admin_crl(env: &Env, served: &Served) -> Vec<u8> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/crl", served.admin));
    let reply = curl(env, cmd);
    assert_eq!(reply.status, 200, "admin /crl: {}", reply.text());
    assert_eq!(reply.content_type, "application/pkix-crl");
    reply.body
}

/// Serials (lowercase hex) a DER CRL lists, read by openssl.
fn crl_serials(env: &Env, der: &[u8]) -> HashSet<String> {
    let file = tempfile::NamedTempFile::new_in(env.dir.path()).unwrap();
    std::fs::write(file.path(), der).unwrap();
    let text = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-noout",
        "-text",
        "-in",
        file.path().to_str().unwrap(),
    ]);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number:"))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

/// A DER CRL converted to PEM by openssl, for `openssl verify -CRLfile`.
fn crl_pem_file(env: &Env, der: &[u8], name: &str) -> PathBuf {
    let der_file = env.path(&format!("{name}.der"));
    let pem_file = env.path(&format!("{name}.pem"));
    std::fs::write(&der_file, der).unwrap();
    openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        der_file.to_str().unwrap(),
        "-out",
        pem_file.to_str().unwrap(),
    ]);
    pem_file
}

/// The issuing CA and the root in one file (`ca export --chain`).
fn ca_bundle(env: &Env) -> PathBuf {
    let bundle = env.path("ca-bundle.pem");
    if !bundle.exists() {
        std::fs::write(&bundle, env.ok(&["ca", "export", "--chain"])).unwrap();
    }
    bundle
}

/// `openssl verify -crl_check` of a device certificate: (ok, what openssl said).
fn verify_with_crl(env: &Env, cert: &Path, crl_pem: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(ca_bundle(env))
        .arg("-CRLfile")
        .arg(crl_pem)
        .arg(cert)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls until the certificate is refused at the TLS handshake.
fn until_refused_at_handshake(env: &Env, served: &Served, cert: &Path, key: &Path) {
    let mut last = (0, String::new());
    eventually("the certificate is refused at the handshake", || {
        last = curl_connect(env, served, cert, key);
        last.0 == 0
    });
}

// ---- the tests -------------------------------------------------------------------------

/// A device with its own key (an openssl CSR) rotates through EST: the sweep opens the
/// rotation, the device re-enrolls with a new key, the old certificate keeps working
/// until the new one is used, then it is revoked, listed in the CRL and refused.
#[test]
fn est_reenrollment_rotates_a_csr_device_end_to_end() {
    let env = Env::new();
    env.init_ca();
    let (old_cert, old_key) = csr_device(&env, "est-dev", 30);
    let old_serial = serial_of(&old_cert);
    let served = Served::start(&env, &["--no-rotation-worker"]);

    let (status, first) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["rotation_due"], false, "{first}");
    assert!(first["rotation"].is_null(), "{first}");
    let policies = first["policies"].clone();
    assert!(!policies.as_array().unwrap().is_empty(), "{first}");

    // The sweep opens the rotation; a CSR device's replacement is its own to ask for.
    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["opened"], 1, "{sweep}");
    assert_eq!(sweep["issued"], 0, "{sweep}");
    assert_eq!(sweep["failed"], 0, "{sweep}");
    assert_eq!(
        serials_with_status(&env, "active"),
        vec![old_serial.clone()]
    );

    let (status, due) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 200, "{due}");
    assert_eq!(due["status"], "known", "{due}");
    assert_eq!(due["certificate_serial"], old_serial.as_str(), "{due}");
    assert_eq!(due["rotation_due"], true, "{due}");
    assert!(
        due["rotation_due_at"].as_str().unwrap_or("").contains('T'),
        "{due}"
    );
    assert_eq!(due["rotation"]["method"], "est", "{due}");
    assert_eq!(due["rotation"]["endpoint"], EST_REENROLL, "{due}");
    assert_eq!(due["rotation"]["replacement_ready"], false, "{due}");

    // Re-enroll with a new openssl key.
    let (new_key, csr) = new_key_csr(&env, "est-dev-2", "est-dev");
    let reply = reenroll(&env, &served, &old_cert, &old_key, &est_body(&csr));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.content_type, PKCS7_TYPE);
    let issued = pkcs7_certs(&env, &reply, "reenroll");
    assert!(!issued.is_empty(), "no certificate in the EST reply");
    let new_cert = env.path("est-dev-2.crt");
    std::fs::write(&new_cert, &issued[0]).unwrap();
    let new_serial = serial_of(&new_cert);
    assert_ne!(new_serial, old_serial);
    assert_eq!(
        pubkey_of_cert(&new_cert),
        pubkey_of_key(&new_key),
        "the new certificate is not for the CSR's key"
    );
    assert!(
        subject_of(&new_cert).contains("CN=est-dev"),
        "{}",
        subject_of(&new_cert)
    );
    let verified = env.openssl_verify(&new_cert);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    let listed = thing_certs(&env, "est-dev");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[&old_serial]["status"], "superseded");
    assert_eq!(listed[&new_serial]["status"], "active");
    assert_eq!(listed[&new_serial]["origin"], "csr");
    assert_eq!(listed[&new_serial]["replaces"], old_serial.as_str());
    assert_eq!(
        serials_with_status(&env, "superseded"),
        vec![old_serial.clone()]
    );

    // The superseded certificate still works and is not in the CRL.
    let (status, still) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 200, "{still}");
    assert_eq!(still["certificate_serial"], old_serial.as_str(), "{still}");
    let crl = admin_crl(&env, &served);
    assert!(!crl_serials(&env, &crl).contains(&old_serial));
    let crl_before = crl_pem_file(&env, &crl, "crl-before");
    let (ok, said) = verify_with_crl(&env, &old_cert, &crl_before);
    assert!(
        ok,
        "the superseded certificate fails openssl verify: {said}"
    );

    // The first use of the new certificate revokes the old one.
    let (status, known) = connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{known}");
    assert_eq!(known["status"], "known", "{known}");
    assert_eq!(known["thing_name"], "est-dev", "{known}");
    assert_eq!(known["certificate_serial"], new_serial.as_str(), "{known}");
    assert_eq!(known["policies"], policies, "{known}");
    assert_eq!(known["rotation_due"], false, "{known}");
    let listed = thing_certs(&env, "est-dev");
    assert_eq!(listed[&old_serial]["status"], "revoked", "{listed:?}");
    assert_eq!(listed[&old_serial]["revocation_reason"], "superseded");

    let mut crl = Vec::new();
    eventually("the admin /crl lists the old certificate", || {
        crl = admin_crl(&env, &served);
        crl_serials(&env, &crl).contains(&old_serial)
    });
    assert!(!crl_serials(&env, &crl).contains(&new_serial));
    let crl_after = crl_pem_file(&env, &crl, "crl-after");
    let (ok, said) = verify_with_crl(&env, &old_cert, &crl_after);
    assert!(
        !ok && said.contains("certificate revoked"),
        "openssl verify of the old certificate: {said}"
    );
    let (ok, said) = verify_with_crl(&env, &new_cert, &crl_after);
    assert!(ok, "openssl verify of the new certificate: {said}");
    until_refused_at_handshake(&env, &served, &old_cert, &old_key);
    assert_eq!(connect(&env, &served, &new_cert, &new_key).0, 200);

    let revoked: Vec<Value> = env
        .json(&["certs", "list", "--status", "revoked"])
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["serial"], old_serial.as_str());
    assert_eq!(revoked[0]["revocation_reason"], "superseded");
    let active: Vec<Value> = env
        .json(&["certs", "list", "--status", "active"])
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0]["serial"], new_serial.as_str());
    assert_eq!(active[0]["replaces"], old_serial.as_str());

    let m = metrics(&served);
    assert!(
        metric(&m, "fleetcert_rotations_total{stage=\"confirmed\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "fleetcert_rotations_total{stage=\"delivered\"}") >= 1.0,
        "{m}"
    );

    // EST cacerts: the issuing CA and the root, as `ca export --chain` has them.
    let reply = device_request(
        &env,
        &served,
        "GET",
        EST_CACERTS,
        (&new_cert, &new_key),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.content_type, PKCS7_TYPE);
    let mut got: Vec<String> = pkcs7_certs(&env, &reply, "cacerts")
        .iter()
        .map(|c| squashed(c))
        .collect();
    let mut want: Vec<String> = pem_blocks(&env.ok(&["ca", "export", "--chain"]), "CERTIFICATE")
        .iter()
        .map(|c| squashed(c))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), 2);
    assert_eq!(got, want, "cacerts is not the issuing CA and the root");
}

/// Re-enrollments that must be refused are, with their codes, and leave the registry as
/// it was; the open rotation still completes afterwards.
#[test]
fn refused_reenrollments_change_nothing() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = csr_device(&env, "alpha", 30);
    csr_device(&env, "beta", 30);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    assert_eq!(connect(&env, &served, &cert, &key).0, 201);
    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["opened"], 2, "{sweep}");
    let before = env.certs();
    assert_eq!(before.len(), 2);

    let refusals = {
        let (_, other_thing) = new_key_csr(&env, "alpha-as-beta", "beta");
        let same_key = csr_for_key(&env, "alpha-same-key", &key, "alpha");
        let (_, good) = new_key_csr(&env, "alpha-tampered", "alpha");
        let mut der = std::fs::read(&good).unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x01; // inside the signature value: still DER, no longer valid
        let tampered = env.path("alpha-tampered-bad.der");
        std::fs::write(&tampered, der).unwrap();
        let garbage = env.path("garbage.b64");
        std::fs::write(&garbage, "this is not a certificate signing request\n").unwrap();
        [
            (
                "CSR for another thing",
                est_body(&other_thing),
                403,
                "csr_wrong_thing",
            ),
            (
                "CSR for the current key",
                est_body(&same_key),
                403,
                "key_reused",
            ),
            (
                "CSR with a bad signature",
                est_body(&tampered),
                400,
                "csr_invalid",
            ),
            ("a body that is no CSR", garbage, 400, "csr_invalid"),
        ]
    };
    for (what, body, status, code) in &refusals {
        let reply = reenroll(&env, &served, &cert, &key, body);
        assert_eq!(
            (reply.status, reply.error().as_str()),
            (*status, *code),
            "{what}: {}",
            reply.text()
        );
        assert_eq!(env.certs(), before, "{what} changed the registry");
    }

    // The rotation is still open, and a proper CSR completes it.
    let (status, due) = connect(&env, &served, &cert, &key);
    assert_eq!(status, 200, "{due}");
    assert_eq!(due["rotation_due"], true, "{due}");
    let (new_key, csr) = new_key_csr(&env, "alpha-2", "alpha");
    let reply = reenroll(&env, &served, &cert, &key, &est_body(&csr));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let new_cert = env.path("alpha-2.crt");
    std::fs::write(&new_cert, &pkcs7_certs(&env, &reply, "alpha-2")[0]).unwrap();
    assert_eq!(env.certs().len(), 3);
    assert_eq!(connect(&env, &served, &new_cert, &new_key).0, 200);

    // A key that any certificate of the thing used is refused: the first key (now on a
    // revoked certificate) and the current one.
    let settled = env.certs();
    for (label, reused) in [("alpha-first-key", &key), ("alpha-current-key", &new_key)] {
        let csr = csr_for_key(&env, label, reused, "alpha");
        let reply = reenroll(&env, &served, &new_cert, &new_key, &est_body(&csr));
        assert_eq!(
            (reply.status, reply.error().as_str()),
            (403, "key_reused"),
            "{label}: {}",
            reply.text()
        );
        assert_eq!(env.certs(), settled, "{label} changed the registry");
    }
}

/// A device whose key fleetcert generated: the sweep issues its replacement ahead of
/// time, the device fetches key and certificate, and the old certificate is revoked once
/// the new one is used. The worker inside `serve` does the same on its own.
#[test]
fn generated_key_devices_fetch_a_replacement_issued_ahead_of_time() {
    let env = Env::new();
    env.init_ca();
    let (old_cert, old_key) = generated_device(&env, "gen-1", 30);
    let old_serial = serial_of(&old_cert);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    let (status, first) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 201, "{first}");
    let policies = first["policies"].clone();

    // Not due yet: nothing to fetch.
    let early = device_request(
        &env,
        &served,
        "POST",
        REPLACEMENT,
        (&old_cert, &old_key),
        None,
    );
    assert_eq!(
        (early.status, early.error().as_str()),
        (409, "rotation_not_due"),
        "{}",
        early.text()
    );
    assert_eq!(env.certs().len(), 1);

    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["issued"], 1, "{sweep}");
    assert_eq!(sweep["failed"], 0, "{sweep}");
    assert_eq!(thing_certs(&env, "gen-1").len(), 2);

    let (status, due) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 200, "{due}");
    assert_eq!(due["rotation_due"], true, "{due}");
    assert_eq!(due["rotation"]["method"], "fetch", "{due}");
    assert_eq!(due["rotation"]["endpoint"], REPLACEMENT, "{due}");
    assert_eq!(due["rotation"]["replacement_ready"], true, "{due}");

    let reply = device_request(
        &env,
        &served,
        "POST",
        REPLACEMENT,
        (&old_cert, &old_key),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let fetched = reply.json();
    assert_eq!(fetched["thing_name"], "gen-1", "{fetched}");
    let new_cert = env.path("gen-1-new.crt");
    let new_key = env.path("gen-1-new.key");
    std::fs::write(&new_cert, fetched["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&new_key, fetched["private_key_pem"].as_str().unwrap()).unwrap();
    let new_serial = serial_of(&new_cert);
    assert_ne!(new_serial, old_serial);
    assert_eq!(fetched["certificate_serial"], new_serial.as_str());
    assert_eq!(
        pubkey_of_cert(&new_cert),
        pubkey_of_key(&new_key),
        "the fetched key does not match the fetched certificate"
    );
    assert_ne!(pubkey_of_cert(&new_cert), pubkey_of_cert(&old_cert));
    let chain = fetched["chain_pem"].as_str().unwrap();
    let issuing_ca = squashed(&pem_blocks(&env.ok(&["ca", "export", "--chain"]), "CERTIFICATE")[0]);
    assert!(
        pem_blocks(chain, "CERTIFICATE")
            .iter()
            .any(|c| squashed(c) == issuing_ca),
        "chain_pem lacks the issuing CA: {chain}"
    );
    let verified = env.openssl_verify(&new_cert);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // The old certificate works until the new one is used.
    let (status, still) = connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 200, "{still}");
    let listed = thing_certs(&env, "gen-1");
    assert_eq!(listed[&old_serial]["status"], "superseded", "{listed:?}");
    assert_eq!(listed[&new_serial]["status"], "active", "{listed:?}");
    assert_eq!(listed[&new_serial]["origin"], "generated", "{listed:?}");
    assert_eq!(listed[&new_serial]["replaces"], old_serial.as_str());
    assert!(!crl_serials(&env, &admin_crl(&env, &served)).contains(&old_serial));

    let (status, known) = connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{known}");
    assert_eq!(known["status"], "known", "{known}");
    assert_eq!(known["certificate_serial"], new_serial.as_str(), "{known}");
    assert_eq!(known["policies"], policies, "{known}");
    until_refused_at_handshake(&env, &served, &old_cert, &old_key);
    let listed = thing_certs(&env, "gen-1");
    assert_eq!(listed[&old_serial]["status"], "revoked", "{listed:?}");
    assert_eq!(listed[&old_serial]["revocation_reason"], "superseded");
    assert!(crl_serials(&env, &admin_crl(&env, &served)).contains(&old_serial));
    served.stop();

    // The worker inside serve, with the clock past 2/3 of a second device's lifetime.
    let (cert2, key2) = generated_device(&env, "gen-2", 30);
    let served = Served::start_at(&env, 23 * DAY, &["--rotation-interval", "1s"]);
    let mut last = Value::Null;
    eventually("the serve worker issues gen-2's replacement", || {
        let (status, reply) = connect(&env, &served, &cert2, &key2);
        assert!(status == 200 || status == 201, "{status}: {reply}");
        last = reply;
        last["rotation"]["replacement_ready"] == true
    });
    assert_eq!(last["rotation_due"], true, "{last}");
    assert_eq!(last["rotation"]["method"], "fetch", "{last}");
    let reply = device_request(&env, &served, "POST", REPLACEMENT, (&cert2, &key2), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["thing_name"], "gen-2");
    assert_eq!(thing_certs(&env, "gen-2").len(), 2);
}

/// `fleetcert revoke` reaches a running server's handshake and the CRL; bad input
/// changes nothing; each revocation publishes a CRL with a higher number.
#[test]
fn revoke_takes_effect_on_a_running_server_and_in_the_crl() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = generated_device(&env, "stolen", 365);
    let (by_cert, by_key) = generated_device(&env, "bystander", 365);
    env.ok(&["provision", "retired", "--out", "out"]);
    env.ok(&["provision", "retired", "--reissue", "--out", "out-again"]);
    let serial = serial_of(&cert);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    assert_eq!(connect(&env, &served, &cert, &key).0, 201);
    assert_eq!(connect(&env, &served, &by_cert, &by_key).0, 201);

    let crl0 = env.json(&["crl"]);
    assert_eq!(crl0["entries"], 0, "{crl0}");
    let number0 = crl0["number"].as_u64().unwrap();
    let before = env.certs();
    assert_eq!(before.len(), 4);
    // Exit codes as the README states them: 2 for bad input, 1 for a valid serial or
    // name that is not in the registry (a failed operation, issue 12 item 7).
    for (args, what, code) in [
        (
            vec!["revoke", "7f00000000000000000000000000abcd"],
            "an unknown serial",
            1,
        ),
        (vec!["revoke", "not-hex!"], "a malformed serial", 2),
        (
            vec!["revoke", serial.as_str(), "--reason", "certificateHold"],
            "certificateHold",
            2,
        ),
        (
            vec!["revoke", serial.as_str(), "--reason", "nonsense"],
            "a made-up reason",
            2,
        ),
        (vec!["revoke", "--thing", "nobody"], "an unknown thing", 1),
        (
            vec!["revoke", "--thing", "bad*name"],
            "an invalid thing name",
            2,
        ),
    ] {
        let out = env.run(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(env.certs(), before, "{what} changed the registry");
    }
    assert_eq!(connect(&env, &served, &cert, &key).0, 200);

    let revoked = env.json(&["revoke", &serial, "--reason", "keyCompromise"]);
    let entries = revoked["revoked"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{revoked}");
    assert_eq!(entries[0]["serial"], serial.as_str());
    assert_eq!(entries[0]["thing_name"], "stolen");
    assert_eq!(entries[0]["reason"], "keyCompromise");
    assert_eq!(revoked["reason"], "keyCompromise");
    assert_eq!(revoked["crl"]["entries"], 1, "{revoked}");
    let number1 = revoked["crl"]["number"].as_u64().unwrap();
    assert!(number1 > number0, "CRL number {number1} after {number0}");

    until_refused_at_handshake(&env, &served, &cert, &key);
    assert_eq!(connect(&env, &served, &by_cert, &by_key).0, 200);
    let crl_file = env.path("crl.pem");
    let written = env.json(&["crl", "--out", crl_file.to_str().unwrap()]);
    assert_eq!(written["entries"], 1, "{written}");
    let text = openssl(&["crl", "-in", crl_file.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains(&serial.to_ascii_uppercase()), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    let (ok, said) = verify_with_crl(&env, &cert, &crl_file);
    assert!(!ok && said.contains("certificate revoked"), "{said}");
    let (ok, said) = verify_with_crl(&env, &by_cert, &crl_file);
    assert!(ok, "{said}");
    let listed = thing_certs(&env, "stolen");
    assert_eq!(listed[&serial]["status"], "revoked");
    assert_eq!(listed[&serial]["revocation_reason"], "keyCompromise");

    // Twice: nothing left to revoke, nothing changes.
    let after_first = env.certs();
    let again = env.json(&["revoke", &serial, "--reason", "keyCompromise"]);
    assert!(again["revoked"].as_array().unwrap().is_empty(), "{again}");
    assert_eq!(env.certs(), after_first);

    // Every certificate of a thing, the superseded one included.
    let retired = thing_certs(&env, "retired");
    assert_eq!(retired.len(), 2);
    let all = env.json(&[
        "revoke",
        "--thing",
        "retired",
        "--reason",
        "cessationOfOperation",
    ]);
    let entries: HashSet<&str> = all["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serial"].as_str().unwrap())
        .collect();
    let want: HashSet<&str> = retired.keys().map(String::as_str).collect();
    assert_eq!(entries, want, "{all}");
    assert_eq!(all["crl"]["entries"], 3, "{all}");
    let number2 = all["crl"]["number"].as_u64().unwrap();
    assert!(number2 > number1, "CRL number {number2} after {number1}");
    for (s, c) in thing_certs(&env, "retired") {
        assert_eq!(c["status"], "revoked", "{s}");
        assert_eq!(c["revocation_reason"], "cessationOfOperation", "{s}");
    }
    assert_eq!(
        thing_certs(&env, "bystander").values().next().unwrap()["status"],
        "active"
    );

    // The device listener serves the same CRL to devices.
    let mut listed = HashSet::new();
    eventually("the device listener's /crl lists all three", || {
        let reply = device_request(&env, &served, "GET", "/crl", (&by_cert, &by_key), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.content_type, "application/pkix-crl");
        listed = crl_serials(&env, &reply.body);
        listed.len() == 3
    });
    assert!(listed.contains(&serial));
    for s in retired.keys() {
        assert!(listed.contains(s), "{s} missing from {listed:?}");
    }
}

/// A CSR device that never re-enrolls keeps its only certificate to the end: sweeps
/// open its rotation but never supersede or revoke it.
#[test]
fn a_device_that_never_reenrolls_is_never_revoked_early() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = csr_device(&env, "lazy", 30);
    let serial = serial_of(&cert);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    assert_eq!(connect(&env, &served, &cert, &key).0, 201);
    served.stop();

    let early = json_at(&env, 10 * DAY, &["rotate", "--dry-run"]);
    assert_eq!(early["dry_run"], true, "{early}");
    assert_eq!(early["due"], 0, "{early}");
    let late = json_at(&env, 25 * DAY, &["rotate", "--dry-run"]);
    assert_eq!(late["due"], 1, "{late}");
    assert_eq!(late["certificates"][0]["serial"], serial.as_str(), "{late}");

    let mut opened = 0;
    for days in [21, 25, 29] {
        let sweep = json_at(&env, days * DAY, &["rotate"]);
        assert_eq!(sweep["issued"], 0, "day {days}: {sweep}");
        assert_eq!(sweep["failed"], 0, "day {days}: {sweep}");
        opened += sweep["opened"].as_u64().unwrap();
        let certs = thing_certs(&env, "lazy");
        assert_eq!(certs.len(), 1, "day {days}: {certs:?}");
        assert_eq!(certs[&serial]["status"], "active", "day {days}");
        assert!(certs[&serial]["revocation_reason"].is_null(), "day {days}");
        let crl = json_at(&env, days * DAY, &["crl"]);
        assert_eq!(crl["entries"], 0, "day {days}: {crl}");
    }
    assert_eq!(opened, 1, "the rotation was opened {opened} times");

    let served = Served::start_at(&env, 29 * DAY, &[]);
    let (status, reply) = connect(&env, &served, &cert, &key);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["rotation_due"], true, "{reply}");
    assert_eq!(reply["rotation"]["method"], "est", "{reply}");
    served.stop();
    assert_eq!(thing_certs(&env, "lazy")[&serial]["status"], "active");
}

/// A device back after its certificate expired: inside the renew-after-expiry window it
/// may only re-enroll, and then it is back; outside it, or without a window, the
/// handshake refuses it.
#[test]
fn a_late_device_reenrolls_inside_the_window_only() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = csr_device(&env, "late", 1);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    assert_eq!(connect(&env, &served, &cert, &key).0, 201);
    served.stop();

    let served = Served::start_at(
        &env,
        2 * DAY,
        &["--no-rotation-worker", "--renew-after-expiry", "7d"],
    );
    let reply = device_request(&env, &served, "POST", "/v1/connect", (&cert, &key), None);
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (403, "certificate_expired"),
        "{}",
        reply.text()
    );
    let (new_key, csr) = new_key_csr(&env, "late-2", "late");
    let reply = reenroll(&env, &served, &cert, &key, &est_body(&csr));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let new_cert = env.path("late-2.crt");
    std::fs::write(&new_cert, &pkcs7_certs(&env, &reply, "late-2")[0]).unwrap();
    assert_eq!(pubkey_of_cert(&new_cert), pubkey_of_key(&new_key));
    let (status, back) = connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["thing_name"], "late", "{back}");
    assert_eq!(back["certificate_serial"], serial_of(&new_cert).as_str());
    // Valid at fleetcert's (shifted) time.
    let out = Command::new("openssl")
        .args([
            "verify",
            "-attime",
            &(unix_now() + 2 * DAY).to_string(),
            "-CAfile",
        ])
        .arg(ca_bundle(&env))
        .arg(&new_cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    served.stop();

    // Nine days after expiry, with a seven-day window: refused at the handshake, for
    // re-enrollment too.
    let served = Served::start_at(
        &env,
        10 * DAY,
        &["--no-rotation-worker", "--renew-after-expiry", "7d"],
    );
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 0);
    let (_, csr) = new_key_csr(&env, "late-3", "late");
    assert_eq!(
        reenroll(&env, &served, &cert, &key, &est_body(&csr)).status,
        0
    );
    served.stop();

    // No window: an expired certificate does not pass the handshake.
    let served = Served::start_at(&env, 2 * DAY, &["--no-rotation-worker"]);
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 0);
    let (_, csr) = new_key_csr(&env, "late-4", "late");
    assert_eq!(
        reenroll(&env, &served, &cert, &key, &est_body(&csr)).status,
        0
    );
    assert_eq!(thing_certs(&env, "late").len(), 2);
}

/// Checks that serials are unique, that there are `originals` certificates without
/// `replaces`, and that each has exactly one replacement, of the same thing.
fn assert_replaced_once(certs: &[Value], originals: usize) {
    let serials: HashSet<&str> = certs
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), certs.len(), "a serial was recorded twice");
    let by_serial: HashMap<&str, &Value> = certs
        .iter()
        .map(|c| (c["serial"].as_str().unwrap(), c))
        .collect();
    let mut replacements: HashMap<&str, Vec<&Value>> = HashMap::new();
    let mut count = 0;
    for c in certs {
        match c["replaces"].as_str() {
            None => count += 1,
            Some(old) => replacements.entry(old).or_default().push(c),
        }
    }
    assert_eq!(count, originals, "original certificates");
    for c in certs.iter().filter(|c| c["replaces"].is_null()) {
        let serial = c["serial"].as_str().unwrap();
        let got = replacements.get(serial).map(Vec::len).unwrap_or(0);
        assert_eq!(got, 1, "{serial} has {got} replacements");
        assert_eq!(
            replacements[serial][0]["thing_name"], c["thing_name"],
            "{serial}: replaced by another thing's certificate"
        );
    }
    for old in replacements.keys() {
        let original = by_serial
            .get(old)
            .unwrap_or_else(|| panic!("a replacement of unknown certificate {old}"));
        assert!(
            original["replaces"].is_null(),
            "a replacement was replaced: {old}"
        );
    }
    assert_eq!(certs.len(), 2 * originals);
}

/// A sweep killed with SIGKILL mid-run: once its leases expire, the next sweep finishes
/// the job, and every certificate ends up with exactly one replacement.
#[test]
fn a_sweep_killed_mid_run_is_finished_by_the_next_one() {
    let env = Env::new();
    env.init_ca();
    let devices = 3000;
    env.provision_pallet("rot", devices, 30);
    assert_eq!(env.certs().len(), devices);

    let mut child = env
        .cmd()
        .args(["rotate", "--within", "60d", "--batch", "64"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut finished_alone = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            finished_alone = true;
            break;
        }
        let active = env
            .json(&["certs", "list", "--status", "active", "--limit", "3001"])
            .as_array()
            .unwrap()
            .len();
        if active > devices || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();
    let done = env.certs().len() - devices;
    eprintln!(
        "sweep killed after {done} of {devices} replacements{}",
        if finished_alone {
            " (it had already finished)"
        } else {
            ""
        }
    );
    assert!(done > 0, "the sweep made no progress before the deadline");

    // Past the killed worker's 5-minute leases.
    let rerun = json_at(&env, 400, &["rotate", "--within", "60d"]);
    assert_eq!(rerun["failed"], 0, "{rerun}");
    assert_eq!(
        rerun["issued"].as_u64().unwrap() as usize,
        devices - done,
        "{rerun}"
    );
    let certs = env.certs();
    assert_replaced_once(&certs, devices);
    assert_eq!(certs.len(), 2 * devices);

    // A further sweep finds nothing left to do.
    let idle = json_at(&env, 400, &["rotate", "--within", "60d"]);
    assert_eq!(idle["issued"], 0, "{idle}");
    assert_eq!(env.certs().len(), 2 * devices);
}
