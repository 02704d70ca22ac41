//! Cross-checks with the OpenSSL command-line tool (like rcgen's verify-tests): what we
//! make, OpenSSL accepts; what OpenSSL makes, we read.

mod common;

use common::*;
use fleetcert_ca::{DeviceCsr, DeviceKey, DeviceProfile, KeyAlgorithm, PrivateKey};
use std::path::Path;
use std::process::{Command, Output};
use time::OffsetDateTime;

fn openssl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn openssl_fails(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "openssl {args:?} should fail");
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SPKI DER of the certificate in `cert` (a PEM file in `dir`).
fn cert_spki(dir: &Path, cert: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(dir.join(cert)).unwrap();
    let der = pem_der(&pem);
    parse_cert(&der).public_key().raw.to_vec()
}

#[test]
fn openssl_verifies_our_chain_and_reads_our_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for alg in [
        KeyAlgorithm::P256,
        KeyAlgorithm::P384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let (h, ca) = hierarchy(alg);
        std::fs::write(d.join("root.pem"), &h.root_cert_pem).unwrap();
        std::fs::write(d.join("issuing.pem"), &h.issuing_cert_pem).unwrap();
        std::fs::write(d.join("chain.pem"), ca.chain_pem()).unwrap();
        let profile = DeviceProfile {
            key_algorithm: alg,
            crl_url: Some("http://pki.example.com/fleet.crl".into()),
            ..DeviceProfile::default()
        };
        let issued = ca
            .issue(
                &thing("sensor-01"),
                DeviceKey::Generate,
                &profile,
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        std::fs::write(d.join("device.pem"), &issued.pem).unwrap();
        let key = issued.private_key.as_ref().unwrap();
        std::fs::write(d.join("device.key"), key.to_pem().as_bytes()).unwrap();

        let out = openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                "sslclient",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                "device.pem",
            ],
        );
        assert_eq!(text(&out).trim(), "device.pem: OK", "{alg}");
        let out = openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-CAfile",
                "root.pem",
                "issuing.pem",
            ],
        );
        assert_eq!(text(&out).trim(), "issuing.pem: OK");

        let dev = text(&openssl(
            d,
            &["x509", "-noout", "-text", "-in", "device.pem"],
        ));
        for needle in [
            "Subject: CN = sensor-01",
            "Issuer: CN = fleetcert Issuing CA",
            "CA:FALSE",
            "TLS Web Client Authentication",
            "Digital Signature",
            "X509v3 Subject Key Identifier",
            "X509v3 Authority Key Identifier",
            "URI:http://pki.example.com/fleet.crl",
        ] {
            assert!(
                dev.contains(needle),
                "{alg}: {needle:?} missing from\n{dev}"
            );
        }
        assert!(!dev.contains("Subject Alternative Name"));
        let serial = text(&openssl(
            d,
            &["x509", "-noout", "-serial", "-in", "device.pem"],
        ));
        assert_eq!(
            serial.trim().to_ascii_lowercase(),
            format!("serial={}", issued.serial_hex)
        );
        let issuing = text(&openssl(
            d,
            &["x509", "-noout", "-text", "-in", "issuing.pem"],
        ));
        assert!(issuing.contains("CA:TRUE, pathlen:0"), "{issuing}");
        assert!(issuing.contains("Certificate Sign, CRL Sign"), "{issuing}");
        let root = text(&openssl(d, &["x509", "-noout", "-text", "-in", "root.pem"]));
        assert!(root.contains("CA:TRUE"), "{root}");

        // The device key OpenSSL reads is the certified one.
        let public = openssl(
            d,
            &["pkey", "-in", "device.key", "-pubout", "-outform", "DER"],
        );
        assert_eq!(public.stdout, cert_spki(d, "device.pem"), "{alg}");

        // The encrypted CA key opens with the passphrase, and only with it.
        let enc = h.issuing_key.to_encrypted_pem("s3cret pass").unwrap();
        std::fs::write(d.join("issuing.key"), enc).unwrap();
        let public = openssl(
            d,
            &[
                "pkey",
                "-in",
                "issuing.key",
                "-passin",
                "pass:s3cret pass",
                "-pubout",
                "-outform",
                "DER",
            ],
        );
        assert_eq!(public.stdout, cert_spki(d, "issuing.pem"), "{alg}");
        openssl_fails(
            d,
            &[
                "pkey",
                "-in",
                "issuing.key",
                "-passin",
                "pass:wrong",
                "-noout",
            ],
        );
    }
}

#[test]
fn we_read_openssl_keys_and_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    std::fs::write(d.join("root.pem"), &h.root_cert_pem).unwrap();
    std::fs::write(d.join("issuing.pem"), &h.issuing_cert_pem).unwrap();

    for (name, genpkey, alg) in [
        (
            "p256",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
            KeyAlgorithm::P256,
        ),
        (
            "p384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            KeyAlgorithm::P384,
        ),
        ("ed25519", &["-algorithm", "ED25519"], KeyAlgorithm::Ed25519),
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            KeyAlgorithm::Rsa2048,
        ),
    ] {
        let key_file = format!("{name}.key");
        let mut args = vec!["genpkey"];
        args.extend_from_slice(genpkey);
        args.extend_from_slice(&["-out", &key_file]);
        openssl(d, &args);

        // Plain, PBKDF2-encrypted and scrypt-encrypted PKCS#8 from OpenSSL.
        let plain = std::fs::read_to_string(d.join(&key_file)).unwrap();
        assert_eq!(PrivateKey::from_pem(&plain, None).unwrap().algorithm(), alg);
        for (suffix, extra) in [("pbkdf2", None), ("scrypt", Some("-scrypt"))] {
            let out = format!("{name}.{suffix}.key");
            let mut args = vec![
                "pkcs8",
                "-topk8",
                "-in",
                &key_file,
                "-v2",
                "aes-256-cbc",
                "-passout",
                "pass:pw",
                "-out",
                &out,
            ];
            args.extend(extra);
            openssl(d, &args);
            let enc = std::fs::read_to_string(d.join(&out)).unwrap();
            assert!(enc.contains("ENCRYPTED PRIVATE KEY"));
            let key = PrivateKey::from_pem(&enc, Some("pw")).unwrap();
            assert_eq!(key.algorithm(), alg, "{name} {suffix}");
            assert!(matches!(
                PrivateKey::from_pem(&enc, Some("nope")),
                Err(fleetcert_ca::CaError::WrongPassphrase)
            ));
        }

        // An OpenSSL CSR (with the old "NEW CERTIFICATE REQUEST" header for one of
        // them) asking for a SAN and CA:TRUE: only the key is used.
        let csr_file = format!("{name}.csr");
        let mut args = vec![
            "req",
            "-new",
            "-key",
            &key_file,
            "-subj",
            "/CN=evil/O=Evil",
            "-addext",
            "subjectAltName=DNS:evil.example.com",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-out",
            &csr_file,
        ];
        if name == "p256" {
            args.push("-newhdr");
        }
        openssl(d, &args);
        let csr_pem = std::fs::read(d.join(&csr_file)).unwrap();
        if name == "p256" {
            assert!(String::from_utf8_lossy(&csr_pem).contains("NEW CERTIFICATE REQUEST"));
        }
        let csr = DeviceCsr::parse(&csr_pem).unwrap();
        assert_eq!(csr.key_algorithm(), alg);
        let issued = ca
            .issue(
                &thing("from-openssl"),
                DeviceKey::Csr(&csr),
                &DeviceProfile::default(),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let cert_file = format!("{name}.pem");
        std::fs::write(d.join(&cert_file), &issued.pem).unwrap();
        let out = openssl(
            d,
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                "sslclient",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                &cert_file,
            ],
        );
        assert_eq!(text(&out).trim(), format!("{cert_file}: OK"));
        let dump = text(&openssl(d, &["x509", "-noout", "-text", "-in", &cert_file]));
        assert!(dump.contains("Subject: CN = from-openssl"), "{dump}");
        assert!(!dump.contains("evil"), "{dump}");
        assert!(dump.contains("CA:FALSE"), "{dump}");
        // The certificate holds the OpenSSL key's public half.
        let public = openssl(d, &["pkey", "-in", &key_file, "-pubout", "-outform", "DER"]);
        assert_eq!(public.stdout, cert_spki(d, &cert_file), "{name}");
        assert_eq!(
            csr.public_key_sha256_hex(),
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &public.stdout))
        );
    }
}
