//! Every kind of bad input gets a clear message, a non-zero exit, and leaves nothing
//! recorded or written.
use crate::util::*;

fn assert_nothing_happened(env: &Env) {
    assert!(env.certs().is_empty(), "a certificate was recorded");
    let things = env.json(&["things", "list"]);
    assert!(
        things.as_array().unwrap().is_empty(),
        "a thing was recorded"
    );
    let out = files_in(&env.out_dir());
    assert!(
        out.iter().all(|f| f == "chain.pem"),
        "files were written: {out:?}"
    );
}

#[test]
fn invalid_thing_names_are_refused() {
    let env = Env::new();
    env.init_ca();
    let long = "x".repeat(129);
    for name in [
        "a*b",
        "x/y",
        "room#1",
        "plus+",
        "",
        long.as_str(),
        "sp ace",
        "dev\n1",
    ] {
        let err = env.fails(&["provision", name, "--out", "out"], 2);
        assert!(err.contains("invalid thing name"), "{name:?}: {err}");
    }
    assert_nothing_happened(&env);
}

#[test]
fn bad_csrs_are_refused_with_the_reason() {
    let env = Env::new();
    env.init_ca();
    let dir = env.dir.path();
    let good = p256_csr(dir, "good");
    let pem = std::fs::read_to_string(&good).unwrap();

    let garbage = dir.join("garbage.csr");
    std::fs::write(&garbage, b"this is not a CSR at all").unwrap();
    let truncated = dir.join("truncated.csr");
    let der_path = dir.join("good.der");
    openssl(&[
        "req",
        "-in",
        good.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der_path.to_str().unwrap(),
    ]);
    let der = std::fs::read(&der_path).unwrap();
    std::fs::write(&truncated, &der[..der.len() / 2]).unwrap();
    let tampered = dir.join("tampered.csr");
    let mut bytes = der.clone();
    let last = bytes.len() - 3; // inside the signature value
    bytes[last] ^= 0x55;
    std::fs::write(&tampered, &bytes).unwrap();
    // Change the requested subject without re-signing: the signature no longer matches.
    let resubjected = dir.join("resubjected.csr");
    let mut bytes = der.clone();
    let pos = bytes.windows(4).position(|w| w == b"good").unwrap();
    bytes[pos..pos + 4].copy_from_slice(b"evil");
    std::fs::write(&resubjected, &bytes).unwrap();
    let weak = openssl_csr(dir, "weak", &["-newkey", "rsa:1024"], "/CN=weak", &[]);
    let k1 = openssl_csr(
        dir,
        "k1",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
        "/CN=k1",
        &[],
    );
    let pem_truncated = dir.join("pem-truncated.csr");
    std::fs::write(&pem_truncated, &pem[..pem.len() / 2]).unwrap();

    let cases = [
        (&garbage, "malformed"),
        (&truncated, "malformed"),
        (&pem_truncated, "malformed"),
        (&tampered, "signature"),
        (&resubjected, "signature"),
        (&weak, "1024"),
        (&k1, "secp256k1"),
    ];
    for (csr, expect) in cases {
        let err = env.fails(
            &[
                "provision",
                "dev-1",
                "--csr",
                csr.to_str().unwrap(),
                "--out",
                "out",
            ],
            2,
        );
        assert!(
            err.to_lowercase().contains(expect),
            "{}: {err}",
            csr.display()
        );
        assert!(err.contains(csr.to_str().unwrap()), "names the file: {err}");
    }
    let err = env.fails(
        &["provision", "dev-1", "--csr", "no-such.csr", "--out", "out"],
        2,
    );
    assert!(err.contains("no-such.csr"), "{err}");
    assert_nothing_happened(&env);
}

#[test]
fn a_missing_ca_is_an_operational_error() {
    let env = Env::new();
    let err = env.fails(&["provision", "dev-1", "--out", "out"], 1);
    assert!(
        err.contains("no CA") && err.contains("fleetcert ca init"),
        "{err}"
    );
    assert!(files_in(&env.out_dir()).is_empty());
}

#[test]
fn an_unwritable_output_directory_records_nothing() {
    let env = Env::new();
    env.init_ca();
    // A regular file where a directory should be: unwritable even for root.
    let blocker = env.path("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let target = blocker.join("out");
    let err = env.fails(
        &["provision", "dev-1", "--out", target.to_str().unwrap()],
        1,
    );
    assert!(
        err.contains("cannot write") && err.contains("blocker"),
        "{err}"
    );
    let csv = env.path("b.csv");
    std::fs::write(&csv, "thing_name\nd1\nd2\n").unwrap();
    env.fails(
        &[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--out",
            target.to_str().unwrap(),
        ],
        1,
    );
    assert_nothing_happened(&env);
}

#[test]
fn an_unreachable_database_fails_fast_without_leaking_the_password() {
    let env = Env::new();
    env.init_ca();
    let url = "postgres://fleet:s3cret-pw@127.0.0.1:1/fleet";
    let started = std::time::Instant::now();
    let err = env.fails(
        &["--database-url", url, "provision", "dev-1", "--out", "out"],
        1,
    );
    assert!(
        err.contains("cannot reach") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "password leaked: {err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(files_in(&env.out_dir()).is_empty());
    // A SQLite path in a directory that does not exist.
    let err = env.fails(
        &["--database-url", "/nonexistent/dir/r.db", "things", "list"],
        1,
    );
    assert!(err.contains("/nonexistent/dir/r.db"), "{err}");
}

#[test]
fn a_mistyped_data_dir_is_not_silently_created() {
    let env = Env::new();
    let err = env.fails(&["--data-dir", "typo", "things", "list"], 1);
    assert!(err.contains("typo"), "{err}");
    assert!(!env.path("typo").exists());
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    env.fails(&["provision"], 2);
    env.fails(&["provision", "a", "--batch", "x.csv"], 2);
    env.fails(&["provision", "a", "--days", "0"], 2);
    env.fails(&["no-such-command"], 2);
    // A batch-only flag given for one device is refused, not ignored.
    env.init_ca();
    let err = env.fails(&["provision", "a", "--allow-absolute-csr-paths"], 2);
    assert!(
        err.contains("--allow-absolute-csr-paths") && err.contains("--batch"),
        "{err}"
    );
    assert_nothing_happened(&env);
    env.fails(&["--output", "yaml", "things", "list"], 2);
}
