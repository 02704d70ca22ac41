//! Tests that need an installed service or tool. `#[ignore]`d for plain `cargo test`;
//! `scripts/test.sh` provides the services and runs them. They fail, never skip, when
//! the service is missing.
use crate::util::*;
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
