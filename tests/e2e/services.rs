//! Tests that need an installed service or tool. `#[ignore]`d for plain `cargo test`;
//! `scripts/test.sh` provides the services and runs them. They fail, never skip, when
//! the service is missing.
use crate::util::*;
use std::collections::{HashMap, HashSet};
use std::process::Command;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test through scripts/test.sh, which provides it")
    })
}

/// pkilint (`lint_pkix_cert lint`) reports no error on a device, issuing and root
/// certificate, for generated and CSR keys.
#[test]
#[ignore = "needs pkilint (scripts/test.sh installs it)"]
fn pkilint_finds_no_errors_in_root_issuing_and_device_certificates() {
    let pkilint = required_env("FLEETCERT_PKILINT");
    for alg in ["p256", "rsa2048", "ed25519"] {
        let env = Env::new();
        env.ok(&[
            "ca",
            "init",
            "--key-algorithm",
            alg,
            "--crl-url",
            "http://127.0.0.1:9090/crl",
        ]);
        env.ok(&["provision", "dev-generated", "--out", "out"]);
        let csr = p256_csr(env.dir.path(), "csr-dev");
        env.ok(&[
            "provision",
            "dev-csr",
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            "out",
        ]);
        let (root, issuing) = env.chain_files();
        for cert in [
            root,
            issuing,
            env.out_dir().join("dev-generated.crt"),
            env.out_dir().join("dev-csr.crt"),
        ] {
            let out = Command::new(&pkilint)
                .args(["lint", "--severity", "ERROR"])
                .arg(&cert)
                .output()
                .expect("run pkilint");
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && !report.contains("ERROR") && !report.contains("FATAL"),
                "{alg}: pkilint on {}:\n{report}",
                cert.display()
            );
        }
    }
}

/// The factory line on PostgreSQL: the same batch story as on SQLite.
#[test]
#[ignore = "needs PostgreSQL (scripts/test.sh starts one)"]
fn provisioning_works_against_postgresql() {
    let base = required_env("FLEETCERT_TEST_POSTGRES_URL");
    let db = format!("fleetcert_e2e_{}", std::process::id());
    let admin = Command::new("psql")
        .args([
            base.as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {db}"),
        ])
        .output()
        .expect("run psql");
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let url = match base.rfind('/') {
        Some(i) => format!("{}/{db}", &base[..i]),
        None => panic!("FLEETCERT_TEST_POSTGRES_URL has no database part: {base}"),
    };
    let mut env = Env::new();
    env.database_url = Some(url);
    env.init_ca();
    let csv = env.path("pallet.csv");
    let body: String = (0..300).map(|i| format!("pg-{i}\n")).collect();
    std::fs::write(&csv, format!("thing_name\n{body}")).unwrap();
    let batch = [
        "--output",
        "json",
        "provision",
        "--batch",
        csv.to_str().unwrap(),
        "--out",
        "out",
    ];
    let first = env.ok(&batch);
    assert!(
        first.lines().last().unwrap().contains("\"issued\":300"),
        "{first}"
    );
    let second = env.ok(&batch);
    assert!(
        second.lines().last().unwrap().contains("\"skipped\":300"),
        "{second}"
    );
    assert_eq!(env.certs().len(), 300);
    // Nothing went to a SQLite file by mistake.
    assert!(!env.data_dir().join("registry.db").exists());
    assert!(
        env.openssl_verify(&env.out_dir().join("pg-7.crt"))
            .status
            .success()
    );
}

/// A database made by `create_postgres_database`, dropped when the test ends (passed or
/// not).
struct ScratchDatabase {
    admin_url: String,
    url: String,
}

impl ScratchDatabase {
    fn create(admin_url: &str) -> Self {
        let url = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(fleetcert_registry::testing::create_postgres_database(
                admin_url,
            ))
            .expect("create a scratch database");
        ScratchDatabase {
            admin_url: admin_url.to_owned(),
            url,
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Runtime::new() {
            let _ = rt.block_on(fleetcert_registry::testing::drop_postgres_database(
                &self.admin_url,
                &self.url,
            ));
        }
    }
}

/// Two rotation workers sweeping one PostgreSQL registry at the same time rotate every
/// due certificate exactly once between them.
#[test]
#[ignore = "needs PostgreSQL (scripts/test.sh starts one)"]
fn two_workers_on_postgresql_rotate_each_certificate_once() {
    let base = required_env("FLEETCERT_TEST_POSTGRES_URL");
    let db = ScratchDatabase::create(&base);
    let mut env = Env::new();
    env.database_url = Some(db.url.clone());
    env.init_ca();
    let devices = 2000;
    env.provision_pallet("pg-rot", devices, 30);
    assert_eq!(env.certs().len(), devices);

    let workers: Vec<std::process::Child> = (0..2)
        .map(|_| {
            env.cmd()
                .args([
                    "--output", "json", "rotate", "--within", "60d", "--batch", "50",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut issued = 0;
    for worker in workers {
        let out = worker.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a worker failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("worker report: {report}");
        assert_eq!(report["failed"], 0, "{report}");
        issued += report["issued"].as_u64().unwrap();
    }
    assert_eq!(
        issued, devices as u64,
        "replacements issued by the two workers"
    );

    let certs = env.certs();
    assert_eq!(certs.len(), 2 * devices);
    let serials: HashSet<&str> = certs
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), certs.len(), "a serial was recorded twice");
    let mut replacements: HashMap<&str, usize> = HashMap::new();
    for c in &certs {
        if let Some(old) = c["replaces"].as_str() {
            *replacements.entry(old).or_default() += 1;
        }
    }
    let originals: Vec<&serde_json::Value> =
        certs.iter().filter(|c| c["replaces"].is_null()).collect();
    assert_eq!(originals.len(), devices);
    for c in originals {
        let serial = c["serial"].as_str().unwrap();
        assert_eq!(
            replacements.get(serial).copied().unwrap_or(0),
            1,
            "{serial}: not replaced exactly once"
        );
    }
    assert_eq!(replacements.len(), devices);
}

/// pkilint (`lint_crl lint`, PKIX profile) reports no error on a CRL with revoked entries.
#[test]
#[ignore = "needs pkilint (scripts/test.sh installs it)"]
fn pkilint_finds_no_errors_in_a_crl_with_revocations() {
    let pkilint = required_env("FLEETCERT_PKILINT");
    let lint_crl = std::path::Path::new(&pkilint).with_file_name("lint_crl");
    assert!(
        lint_crl.exists(),
        "{} not found next to FLEETCERT_PKILINT",
        lint_crl.display()
    );
    let env = Env::new();
    env.init_ca();
    env.ok(&["provision", "compromised", "--out", "out"]);
    env.ok(&["provision", "replaced", "--out", "out"]);
    env.ok(&["provision", "kept", "--out", "out"]);
    let compromised = serial_of(&env.out_dir().join("compromised.crt"));
    let replaced = serial_of(&env.out_dir().join("replaced.crt"));
    env.ok(&["revoke", &compromised, "--reason", "keyCompromise"]);
    env.ok(&["revoke", &replaced, "--reason", "superseded"]);
    let pem = env.path("crl.pem");
    let der = env.path("crl.der");
    env.ok(&["crl", "--out", pem.to_str().unwrap()]);
    env.ok(&["crl", "--der", "--out", der.to_str().unwrap()]);
    let text = openssl(&["crl", "-in", pem.to_str().unwrap(), "-noout", "-text"]);
    for serial in [&compromised, &replaced] {
        assert!(text.contains(&serial.to_ascii_uppercase()), "{text}");
    }
    assert!(
        text.contains("Key Compromise") && text.contains("Superseded"),
        "{text}"
    );
    for crl in [&pem, &der] {
        let out = Command::new(&lint_crl)
            .args([
                "lint",
                "--type",
                "CRL",
                "--profile",
                "PKIX",
                "--severity",
                "ERROR",
            ])
            .arg(crl)
            .output()
            .expect("run lint_crl");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !report.contains("ERROR") && !report.contains("FATAL"),
            "lint_crl on {}:\n{report}",
            crl.display()
        );
    }
}
