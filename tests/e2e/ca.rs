use crate::util::*;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_writes_a_root_and_an_issuing_ca_with_private_keys() {
    let env = Env::new();
    let out = env.json(&["ca", "init", "--common-name", "Acme Fleet"]);
    assert_eq!(out["key_algorithm"], "p256");
    assert_eq!(out["keys_encrypted"], false);
    let root_subject = out["root"]["subject"].as_str().unwrap();
    assert!(
        root_subject.contains("Acme Fleet Root CA"),
        "{root_subject}"
    );
    assert_eq!(out["issuing"]["issuer"], out["root"]["subject"]);
    assert_eq!(out["issuing"]["path_len"], 0);
    let ca = env.data_dir().join("ca");
    assert_eq!(mode(&ca.join("root.key")), 0o600);
    assert_eq!(mode(&ca.join("issuing.key")), 0o600);
    assert_eq!(mode(&env.data_dir()), 0o700);

    // The issuing CA verifies under the root with openssl, and is a CA with pathlen 0.
    let (root, issuing) = env.chain_files();
    let verified = openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        issuing.to_str().unwrap(),
    ]);
    assert!(verified.contains(": OK"), "{verified}");
    let text = openssl(&["x509", "-noout", "-text", "-in", issuing.to_str().unwrap()]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
}

#[test]
fn ca_init_never_overwrites() {
    let env = Env::new();
    env.init_ca();
    let key = env.data_dir().join("ca/issuing.key");
    let before = std::fs::read(&key).unwrap();
    let err = env.fails(&["ca", "init"], 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn ca_show_and_export_without_a_ca_fail_clearly() {
    let env = Env::new();
    let err = env.fails(&["ca", "show"], 1);
    assert!(err.contains("fleetcert ca init"), "{err}");
    env.fails(&["ca", "export"], 1);
}

#[test]
fn every_key_algorithm_makes_a_chain_openssl_accepts() {
    for alg in ["p384", "ed25519", "rsa2048", "rsa3072"] {
        let env = Env::new();
        env.ok(&["ca", "init", "--key-algorithm", alg]);
        let show = env.json(&["ca", "show"]);
        assert_eq!(show["key_algorithm"], alg);
        env.ok(&["provision", "dev-1", "--out", "out"]);
        let verified = env.openssl_verify(&env.out_dir().join("dev-1.crt"));
        assert!(
            verified.status.success(),
            "{alg}: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
    }
}

#[test]
fn an_unknown_key_algorithm_is_a_usage_error() {
    let env = Env::new();
    env.fails(&["ca", "init", "--key-algorithm", "p521"], 2);
    assert!(!env.data_dir().join("ca").exists());
}

#[test]
fn passphrase_encrypts_ca_keys_at_rest() {
    let mut env = Env::new();
    env.passphrase = Some("correct horse battery staple".into());
    let out = env.json(&["ca", "init"]);
    assert_eq!(out["keys_encrypted"], true);
    let key = env.data_dir().join("ca/issuing.key");
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.contains("BEGIN ENCRYPTED PRIVATE KEY"), "{pem}");
    // openssl reads it with the passphrase, and not without.
    openssl(&[
        "pkey",
        "-noout",
        "-in",
        key.to_str().unwrap(),
        "-passin",
        "pass:correct horse battery staple",
    ]);
    let wrong = std::process::Command::new("openssl")
        .args([
            "pkey",
            "-noout",
            "-in",
            key.to_str().unwrap(),
            "-passin",
            "pass:nope",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());

    // fleetcert needs it to sign, refuses a wrong one, and records nothing either way.
    env.passphrase = None;
    let err = env.fails(&["provision", "dev-1", "--out", "out"], 1);
    assert!(err.contains("FLEETCERT_CA_PASSPHRASE"), "{err}");
    env.passphrase = Some("wrong".into());
    let err = env.fails(&["provision", "dev-1", "--out", "out"], 1);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(files_in(&env.out_dir()).is_empty());
    env.passphrase = Some("correct horse battery staple".into());
    assert!(env.certs().is_empty());
    env.ok(&["provision", "dev-1", "--out", "out"]);
    assert_eq!(env.certs().len(), 1);
}
