//! Issue 12, items 3, 9 and 10 (superseded certificates): secrets at rest under
//! `FLEETCERT_CA_PASSPHRASE`, bounded replacement issuance, and a superseded certificate
//! that keeps working until its replacement is used. The real binary, with openssl,
//! curl and sqlite3 as the peers that read what it wrote.
use crate::jitp::{Served, curl_connect, metric, metrics};
use crate::rotation::{Reply, device_request, generated_device};
use crate::util::*;
use fleetcert_lifecycle::sealing::KeySealer;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PASSPHRASE: &str = "factory line 7, do not share";
const REPLACEMENT: &str = "/v1/replacement";
const EST_REENROLL: &str = "/.well-known/est/simplereenroll";
const DAY: i64 = 86_400;

fn with_passphrase() -> Env {
    let mut env = Env::new();
    env.passphrase = Some(PASSPHRASE.to_owned());
    env.init_ca();
    env
}

/// Serials the CRL on the admin listener lists, read by openssl.
fn crl_serials(env: &Env, served: &Served) -> BTreeSet<String> {
    let der = env.path("admin.crl");
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "-o"])
        .arg(&der)
        .arg(format!("http://{}/crl", served.admin))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    openssl(&[
        "crl",
        "-inform",
        "DER",
        "-noout",
        "-text",
        "-in",
        der.to_str().unwrap(),
    ])
    .lines()
    .filter_map(|l| l.trim().strip_prefix("Serial Number:"))
    .map(|s| s.trim().to_ascii_lowercase())
    .collect()
}

/// (new_serial, sealed key) of every rotation holding one, read with the sqlite3 CLI.
fn sealed_rows(env: &Env) -> Vec<(String, Vec<u8>)> {
    let out = Command::new("sqlite3")
        .arg(env.data_dir().join("registry.db"))
        .arg("SELECT new_serial || ' ' || hex(sealed_key) FROM rotations WHERE sealed_key IS NOT NULL ORDER BY new_serial")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqlite3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (serial, hex) = line.split_once(' ').unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (serial.to_owned(), bytes)
        })
        .collect()
}

/// The bytes of a PEM file's body, decoded by coreutils base64.
fn pem_body(env: &Env, pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let file = env.path("pem-body.b64");
    std::fs::write(&file, body).unwrap();
    let out = Command::new("base64")
        .arg("-d")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "not base64: {pem}");
    out.stdout
}

/// True if some 32-byte window of `bytes` opens `sealed` (bound to `serial`).
fn any_window_opens(bytes: &[u8], serial: &str, sealed: &[u8]) -> bool {
    bytes.windows(32).any(|w| {
        KeySealer::from_key_bytes(w)
            .unwrap()
            .open(serial, sealed)
            .is_ok()
    })
}

fn pubkey_of_cert(cert: &Path) -> String {
    openssl(&["x509", "-noout", "-pubkey", "-in", cert.to_str().unwrap()])
}

fn pubkey_of_key(key: &Path) -> String {
    openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()])
}

/// Writes a fetched replacement's certificate and key; returns (cert, key, serial).
fn save_fetched(env: &Env, label: &str, fetched: &Value) -> (PathBuf, PathBuf, String) {
    let cert = env.path(&format!("{label}.crt"));
    let key = env.path(&format!("{label}.key"));
    std::fs::write(&cert, fetched["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&key, fetched["private_key_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        pubkey_of_cert(&cert),
        pubkey_of_key(&key),
        "the fetched key does not match the fetched certificate"
    );
    let serial = serial_of(&cert);
    (cert, key, serial)
}

fn fetch(env: &Env, served: &Served, cert: &Path, key: &Path) -> Reply {
    device_request(env, served, "POST", REPLACEMENT, (cert, key), None)
}

/// `n` concurrent requests (curl processes) made by `request`.
fn concurrently(n: usize, request: impl Fn(usize) -> Reply + Sync) -> Vec<Reply> {
    let request = &request;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || request(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A fresh P-256 key (openssl) and the RFC 7030 body of a CSR for it naming `cn`.
fn est_csr(env: &Env, label: &str, cn: &str) -> PathBuf {
    let der = openssl_csr(
        env.dir.path(),
        label,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &format!("/CN={cn}"),
        &["-outform", "DER"],
    );
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

/// A thing's certificates: serial → status.
fn statuses(env: &Env, thing: &str) -> HashMap<String, String> {
    env.json(&["certs", "list", "--thing", thing])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["serial"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn count(statuses: &HashMap<String, String>, status: &str) -> usize {
    statuses.values().filter(|s| *s == status).count()
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---- item 3: secrets at rest ----------------------------------------------------------

/// With a passphrase, neither the sealing key nor the server's TLS key is usable from a
/// copy of the data directory without it; serving and rotation still work.
#[test]
fn the_passphrase_protects_the_sealing_key_and_the_server_key() {
    let env = with_passphrase();
    let (old_cert, old_key) = generated_device(&env, "vault-1", 30);
    let served = Served::start(&env, &["--no-rotation-worker"]);
    let (status, body) = curl_connect(&env, &served, &old_cert, &old_key);
    assert_eq!(status, 201, "{body}");

    // The server key: encrypted PKCS#8 that openssl opens with the passphrase only.
    let server_key = env.data_dir().join("server/server.key");
    let text = std::fs::read_to_string(&server_key).unwrap();
    assert!(
        text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "the server key is stored in the clear:\n{}",
        text.lines().next().unwrap_or_default()
    );
    let from_key = openssl(&[
        "pkey",
        "-in",
        server_key.to_str().unwrap(),
        "-passin",
        &format!("pass:{PASSPHRASE}"),
        "-pubout",
    ]);
    assert_eq!(
        from_key,
        pubkey_of_cert(&env.data_dir().join("server/server.crt"))
    );
    for wrong in ["pass:", "pass:not it"] {
        let out = Command::new("openssl")
            .args(["pkey", "-noout", "-passin", wrong, "-in"])
            .arg(&server_key)
            .output()
            .unwrap();
        assert!(!out.status.success(), "openssl read the key with {wrong}");
    }

    // A replacement sealed with the sealing key, which is not in ca/sealing.key.
    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["issued"], 1, "{sweep}");
    let rows = sealed_rows(&env);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (new_serial, sealed) = &rows[0];
    let file = std::fs::read(env.data_dir().join("ca/sealing.key")).unwrap();
    assert_ne!(file.len(), 32, "ca/sealing.key holds 32 raw bytes");
    assert!(
        !any_window_opens(&file, new_serial, sealed),
        "ca/sealing.key opens a sealed replacement without the passphrase"
    );
    let text = String::from_utf8(file).expect("the encrypted sealing key is PEM");
    assert!(
        text.starts_with("-----BEGIN FLEETCERT ENCRYPTED SEALING KEY-----"),
        "{text}"
    );
    assert!(!any_window_opens(
        &pem_body(&env, &text),
        new_serial,
        sealed
    ));

    // End to end with the passphrase: the device fetches its replacement and uses it.
    let reply = fetch(&env, &served, &old_cert, &old_key);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (new_cert, new_key, serial) = save_fetched(&env, "vault-1-new", &reply.json());
    assert_eq!(&serial, new_serial);
    let (status, body) = curl_connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{body}");
    served.stop();

    // A restart reads the encrypted server key with the passphrase ...
    let served = Served::start(&env, &["--no-rotation-worker"]);
    let (status, body) = curl_connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 200, "{body}");
    served.stop();
    // ... and without it refuses to start, naming the variable.
    let out = env
        .cmd()
        .env_remove("FLEETCERT_CA_PASSPHRASE")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FLEETCERT_CA_PASSPHRASE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A data directory from before (a raw 32-byte sealing key beside passphrase-encrypted
/// CA keys) is migrated on first use: the same key, now encrypted, so replacements
/// sealed with it stay readable.
#[test]
fn a_raw_sealing_key_is_encrypted_in_place_and_stays_the_same_key() {
    let env = with_passphrase();
    let (old_cert, old_key) = generated_device(&env, "legacy-1", 30);
    let raw: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let path = env.data_dir().join("ca/sealing.key");
    std::fs::write(&path, &raw).unwrap();

    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["issued"], 1, "{sweep}");
    let file = std::fs::read(&path).unwrap();
    assert!(
        file.starts_with(b"-----BEGIN FLEETCERT ENCRYPTED SEALING KEY-----"),
        "the raw sealing key was left in the clear"
    );
    assert!(!file.windows(32).any(|w| w == raw.as_slice()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rows = sealed_rows(&env);
    let (new_serial, sealed) = &rows[0];
    assert!(
        KeySealer::from_key_bytes(&raw)
            .unwrap()
            .open(new_serial, sealed)
            .is_ok(),
        "the migrated file holds another key"
    );

    let served = Served::start(&env, &["--no-rotation-worker"]);
    let reply = fetch(&env, &served, &old_cert, &old_key);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (_, _, serial) = save_fetched(&env, "legacy-1-new", &reply.json());
    assert_eq!(&serial, new_serial);
}

// ---- item 9: bounded replacement issuance ----------------------------------------------

/// While a rotation is open, repeated and concurrent fetches hand out one key and one
/// certificate (pre-issued or issued on demand) and revoke nothing; EST re-enrollments
/// get a small budget, and refusals are counted in /metrics.
#[test]
fn replacements_are_handed_out_once_per_rotation_and_reenrollment_is_bounded() {
    let env = Env::new();
    env.init_ca();
    // Pre-issued by a sweep.
    let (pre_cert, pre_key) = generated_device(&env, "burst-pre", 30);
    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["issued"], 1, "{sweep}");
    // Issued on demand: due by the clock, no sweep.
    let (lazy_cert, lazy_key) = generated_device(&env, "burst-lazy", 30);
    // A device with its own key.
    let csr = p256_csr(env.dir.path(), "burst-est");
    env.ok(&[
        "provision",
        "burst-est",
        "--csr",
        csr.to_str().unwrap(),
        "--days",
        "30",
        "--out",
        "out",
    ]);
    let est_cert = env.out_dir().join("burst-est.crt");
    let est_key = env.path("burst-est.devkey");

    let served = Served::start_at(&env, 25 * DAY, &["--no-rotation-worker"]);
    for (thing, cert, key) in [
        ("burst-pre", &pre_cert, &pre_key),
        ("burst-lazy", &lazy_cert, &lazy_key),
    ] {
        let replies = concurrently(6, |_| fetch(&env, &served, cert, key));
        let mut keys = BTreeSet::new();
        let mut serials = BTreeSet::new();
        for reply in &replies {
            assert_eq!(reply.status, 200, "{thing}: {}", reply.text());
            let json = reply.json();
            keys.insert(json["private_key_pem"].as_str().unwrap().to_owned());
            serials.insert(json["certificate_serial"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            (keys.len(), serials.len()),
            (1, 1),
            "{thing}: six concurrent fetches got {} keys",
            keys.len()
        );
        for _ in 0..10 {
            let again = fetch(&env, &served, cert, key);
            assert_eq!(again.status, 200, "{}", again.text());
            assert!(keys.contains(again.json()["private_key_pem"].as_str().unwrap()));
        }
        let listed = statuses(&env, thing);
        assert_eq!(listed.len(), 2, "{thing}: {listed:?}");
        assert_eq!(count(&listed, "revoked"), 0, "{thing}: {listed:?}");
        let fetched = replies[0].json();
        let (new_cert, new_key, _) = save_fetched(&env, &format!("{thing}-new"), &fetched);
        let (status, body) = curl_connect(&env, &served, &new_cert, &new_key);
        assert!(status == 200 || status == 201, "{status}: {body}");
        // Used: the old certificate is revoked, and can fetch nothing more.
        eventually("the replaced certificate is refused", || {
            fetch(&env, &served, cert, key).status != 200
        });
    }

    // EST: six concurrent re-enrollments with six new keys get three certificates.
    let bodies: Vec<PathBuf> = (0..7)
        .map(|i| est_csr(&env, &format!("burst-est-{i}"), "burst-est"))
        .collect();
    let replies = concurrently(6, |i| {
        device_request(
            &env,
            &served,
            "POST",
            EST_REENROLL,
            (&est_cert, &est_key),
            Some(&bodies[i]),
        )
    });
    let mut codes: Vec<u16> = replies.iter().map(|r| r.status).collect();
    codes.sort();
    assert_eq!(codes, [200, 200, 200, 409, 409, 409], "EST budget");
    for refused in replies.iter().filter(|r| r.status == 409) {
        assert_eq!(
            refused.json()["error"],
            "replacement_limit",
            "{}",
            refused.text()
        );
        assert!(refused.text().contains("3 times"), "{}", refused.text());
    }
    let late = device_request(
        &env,
        &served,
        "POST",
        EST_REENROLL,
        (&est_cert, &est_key),
        Some(&bodies[6]),
    );
    assert_eq!(late.status, 409, "{}", late.text());
    let listed = statuses(&env, "burst-est");
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert_eq!(count(&listed, "revoked"), 2, "{listed:?}");
    let text = metrics(&served);
    assert_eq!(
        metric(
            &text,
            "fleetcert_rejections_total{reason=\"replacement_limit\"}"
        ),
        4.0,
        "{text}"
    );
    // The CRL lists the two rotated certificates and the two unused EST replacements:
    // nothing for the 32 fetches.
    let revoked: BTreeSet<String> = ["burst-pre", "burst-lazy", "burst-est"]
        .iter()
        .flat_map(|thing| {
            statuses(&env, thing)
                .into_iter()
                .filter(|(_, status)| status == "revoked")
                .map(|(serial, _)| serial)
        })
        .collect();
    assert_eq!(revoked.len(), 4, "{revoked:?}");
    let mut listed = BTreeSet::new();
    eventually("the CRL lists the revoked certificates", || {
        listed = crl_serials(&env, &served);
        listed == revoked
    });
}

// ---- item 10: a superseded certificate keeps working ----------------------------------

/// A device that gets its replacement before ever connecting can still connect with the
/// superseded certificate (answered with where to get the replacement) until the new
/// one is used.
#[test]
fn a_superseded_certificate_keeps_working_until_its_replacement_is_used() {
    let env = Env::new();
    env.init_ca();
    let (old_cert, old_key) = generated_device(&env, "late-1", 30);
    let csr = p256_csr(env.dir.path(), "late-2");
    env.ok(&[
        "provision",
        "late-2",
        "--csr",
        csr.to_str().unwrap(),
        "--days",
        "30",
        "--out",
        "out",
    ]);
    let est_cert = env.out_dir().join("late-2.crt");
    let est_key = env.path("late-2.devkey");
    let sweep = env.json(&["rotate", "--within", "60d"]);
    assert_eq!(sweep["issued"], 1, "{sweep}");
    let served = Served::start(&env, &["--no-rotation-worker"]);

    // Generated key: fetched before the first connect.
    let reply = fetch(&env, &served, &old_cert, &old_key);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (new_cert, new_key, new_serial) = save_fetched(&env, "late-1-new", &reply.json());
    let old_serial = serial_of(&old_cert);
    assert_eq!(statuses(&env, "late-1")[&old_serial], "superseded");
    let (status, body) = curl_connect(&env, &served, &old_cert, &old_key);
    assert_eq!(
        status, 200,
        "the superseded certificate was refused: {body}"
    );
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["status"], "known", "{reply}");
    assert_eq!(reply["certificate_serial"], old_serial.as_str(), "{reply}");
    assert_eq!(reply["rotation_due"], true, "{reply}");
    assert_eq!(reply["rotation"]["method"], "fetch", "{reply}");
    assert_eq!(reply["rotation"]["endpoint"], REPLACEMENT, "{reply}");
    assert_eq!(reply["rotation"]["replacement_ready"], true, "{reply}");
    // It is told to fetch: the same replacement comes back.
    let again = fetch(&env, &served, &old_cert, &old_key);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["certificate_serial"], new_serial.as_str());
    // The replacement's first use provisions the thing and retires the old certificate.
    let (status, body) = curl_connect(&env, &served, &new_cert, &new_key);
    assert_eq!(status, 201, "{body}");
    eventually(
        "the superseded certificate is refused once replaced",
        || curl_connect(&env, &served, &old_cert, &old_key).0 == 0,
    );
    assert_eq!(statuses(&env, "late-1")[&old_serial], "revoked");

    // Own key: re-enrolled through EST before the first connect.
    let body = est_csr(&env, "late-2-next", "late-2");
    let reply = device_request(
        &env,
        &served,
        "POST",
        EST_REENROLL,
        (&est_cert, &est_key),
        Some(&body),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let est_serial = serial_of(&est_cert);
    assert_eq!(statuses(&env, "late-2")[&est_serial], "superseded");
    let (status, body) = curl_connect(&env, &served, &est_cert, &est_key);
    assert_eq!(
        status, 200,
        "the superseded certificate was refused: {body}"
    );
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["rotation_due"], true, "{reply}");
    assert_eq!(reply["rotation"]["method"], "est", "{reply}");
    assert_eq!(reply["rotation"]["endpoint"], EST_REENROLL, "{reply}");
}
