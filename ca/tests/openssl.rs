//! Cross-checks with the OpenSSL command-line tool (like rcgen's verify-tests): what we
//! make, OpenSSL accepts; what OpenSSL makes, we read.

mod common;

use common::*;
use fleetcert_ca::{
    CrlEntry, DeviceCsr, DeviceKey, DeviceProfile, KeyAlgorithm, PrivateKey, RevocationReason,
    pkcs7_certs_only,
};
use std::path::Path;
use std::process::{Command, Output};
use time::{Duration, OffsetDateTime};

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
        // The CN is readable for callers to compare, but (below) not copied.
        assert_eq!(csr.common_name(), Some("evil"));
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

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is installed")
}

fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// OpenSSL checks our CRL's signature against the issuing CA, and `verify -crl_check`
/// uses it: the revoked device is refused, the other one accepted.
#[test]
fn openssl_verifies_our_crl_and_honours_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for alg in [
        KeyAlgorithm::P256,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let (h, ca) = hierarchy(alg);
        let now = OffsetDateTime::now_utc();
        let issue = |name: &str| {
            ca.issue(&thing(name), DeviceKey::Generate, &profile(), now)
                .unwrap()
        };
        let revoked = issue("revoked-device");
        let good = issue("good-device");
        let other = issue("other-device");
        let entries = [
            CrlEntry {
                serial_hex: other.serial_hex.clone(),
                revoked_at: now - Duration::hours(1),
                reason: RevocationReason::Unspecified,
            },
            CrlEntry {
                serial_hex: revoked.serial_hex.clone(),
                revoked_at: now,
                reason: RevocationReason::KeyCompromise,
            },
        ];
        let crl = ca
            .sign_crl(7, now, now + Duration::days(1), &entries)
            .unwrap();
        std::fs::write(d.join("root.pem"), &h.root_cert_pem).unwrap();
        std::fs::write(d.join("issuing.pem"), &h.issuing_cert_pem).unwrap();
        std::fs::write(d.join("chain.pem"), ca.chain_pem()).unwrap();
        std::fs::write(d.join("crl.pem"), &crl.pem).unwrap();
        std::fs::write(d.join("crl.der"), &crl.der).unwrap();
        std::fs::write(d.join("revoked.pem"), &revoked.pem).unwrap();
        std::fs::write(d.join("good.pem"), &good.pem).unwrap();

        let out = openssl(
            d,
            &["crl", "-in", "crl.pem", "-CAfile", "issuing.pem", "-noout"],
        );
        assert!(
            all_output(&out).contains("verify OK"),
            "{alg}: {}",
            all_output(&out)
        );
        // PEM and DER are the same CRL.
        let out = openssl(
            d,
            &["crl", "-inform", "DER", "-in", "crl.der", "-outform", "DER"],
        );
        assert_eq!(out.stdout, crl.der, "{alg}");
        // Signed by the issuing CA, not the root.
        let out = run(
            d,
            &["crl", "-in", "crl.pem", "-CAfile", "root.pem", "-noout"],
        );
        assert!(
            !out.status.success() || !all_output(&out).contains("verify OK"),
            "{alg}: {}",
            all_output(&out)
        );

        let dump = text(&openssl(d, &["crl", "-in", "crl.pem", "-noout", "-text"]));
        for needle in [
            "Version 2 (0x1)",
            "Issuer: CN = fleetcert Issuing CA",
            "X509v3 CRL Number:",
            "X509v3 Authority Key Identifier:",
            "Key Compromise",
            &format!("Serial Number: {}", revoked.serial_hex.to_ascii_uppercase()),
            &format!("Serial Number: {}", other.serial_hex.to_ascii_uppercase()),
        ] {
            assert!(
                dump.contains(needle),
                "{alg}: {needle:?} missing from\n{dump}"
            );
        }
        assert!(!dump.contains("Unspecified"), "{alg}: {dump}");
        assert!(
            !dump.contains("Issuing Distribution Point"),
            "{alg}: {dump}"
        );
        assert_eq!(dump.matches("CRL Reason Code").count(), 1, "{alg}: {dump}");

        let crl_check = |cert: &str| {
            run(
                d,
                &[
                    "verify",
                    "-x509_strict",
                    "-crl_check",
                    "-CAfile",
                    "chain.pem",
                    "-CRLfile",
                    "crl.pem",
                    cert,
                ],
            )
        };
        let out = crl_check("revoked.pem");
        let report = all_output(&out);
        assert!(!out.status.success(), "{alg}: {report}");
        assert!(report.contains("certificate revoked"), "{alg}: {report}");
        let out = crl_check("good.pem");
        assert!(out.status.success(), "{alg}: {}", all_output(&out));
        assert_eq!(text(&out).trim(), "good.pem: OK", "{alg}");
    }
}

/// `openssl pkcs7` reads our certs-only bundle and lists its certificates in order.
#[test]
fn openssl_reads_our_certs_only_pkcs7() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let issuing = pem_der(&h.issuing_cert_pem);
    let root = pem_der(&h.root_cert_pem);
    let device = ca
        .issue(
            &thing("est-device"),
            DeviceKey::Generate,
            &profile(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();

    std::fs::write(d.join("cacerts.p7"), pkcs7_certs_only(&[&issuing, &root])).unwrap();
    let listed = text(&openssl(
        d,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "cacerts.p7",
            "-print_certs",
        ],
    ));
    let issuing_at = listed
        .find("subject=CN = fleetcert Issuing CA")
        .expect(&listed);
    let root_at = listed
        .find("subject=CN = fleetcert Root CA")
        .expect(&listed);
    assert!(issuing_at < root_at, "{listed}");
    assert!(listed.contains(h.issuing_cert_pem.trim()), "{listed}");
    assert!(listed.contains(h.root_cert_pem.trim()), "{listed}");
    assert_eq!(listed.matches("-----BEGIN CERTIFICATE-----").count(), 2);

    // One issued certificate, as /simpleenroll answers; and the empty bundle.
    std::fs::write(d.join("enroll.p7"), pkcs7_certs_only(&[&device.der])).unwrap();
    let listed = text(&openssl(
        d,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "enroll.p7",
            "-print_certs",
        ],
    ));
    assert!(listed.contains("subject=CN = est-device"), "{listed}");
    assert!(listed.contains(device.pem.trim()), "{listed}");
    // OpenSSL re-encodes it byte for byte.
    let out = openssl(
        d,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "enroll.p7",
            "-outform",
            "DER",
        ],
    );
    assert_eq!(out.stdout, pkcs7_certs_only(&[&device.der]));

    std::fs::write(d.join("empty.p7"), pkcs7_certs_only(&[])).unwrap();
    let out = openssl(
        d,
        &["pkcs7", "-inform", "DER", "-in", "empty.p7", "-print_certs"],
    );
    assert!(!text(&out).contains("BEGIN CERTIFICATE"));
    let printed = text(&openssl(
        d,
        &[
            "cms",
            "-cmsout",
            "-print",
            "-inform",
            "DER",
            "-in",
            "cacerts.p7",
        ],
    ));
    for needle in [
        "contentType: pkcs7-signedData",
        "version: 1",
        "eContentType: pkcs7-data",
    ] {
        assert!(
            printed.contains(needle),
            "{needle:?} missing from\n{printed}"
        );
    }
}

/// An issuing CA made by OpenSSL (PrintableString country, SHA-1 key identifiers):
/// our CRL names it byte for byte and carries its SKI as the AKI, and OpenSSL honours
/// the CRL. A subject rcgen cannot reproduce, or a CA without cRLSign, is refused.
#[test]
fn crls_from_an_openssl_made_issuing_ca() {
    use x509_parser::extensions::ParsedExtension;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let genpkey = |out: &str| {
        let mut args = vec!["genpkey"];
        args.extend_from_slice(&ec);
        args.extend_from_slice(&["-out", out]);
        openssl(d, &args);
    };
    genpkey("root.key");
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/C=DE/O=Acme/CN=Acme Root",
            "-days",
            "30",
            "-out",
            "root.pem",
        ],
    );
    let make_issuing = |name: &str, subject: &str, key_usage: &str| {
        genpkey(&format!("{name}.key"));
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!(
                "basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,{key_usage}\n\
                 subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            ),
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                subject,
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "root.pem",
                "-CAkey",
                "root.key",
                "-days",
                "20",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
        let cert = std::fs::read_to_string(d.join(format!("{name}.pem"))).unwrap();
        let key = std::fs::read_to_string(d.join(format!("{name}.key"))).unwrap();
        let root = std::fs::read_to_string(d.join("root.pem")).unwrap();
        fleetcert_ca::IssuingCa::load(&cert, &PrivateKey::from_pem(&key, None).unwrap(), &root)
            .unwrap()
    };
    let now = OffsetDateTime::now_utc();
    let next = now + Duration::days(1);

    let ca = make_issuing(
        "issuing",
        "/C=DE/O=Acme/OU=Devices/CN=Acme Issuing",
        "keyCertSign,cRLSign,digitalSignature",
    );
    let device = ca
        .issue(&thing("acme-1"), DeviceKey::Generate, &profile(), now)
        .unwrap();
    let crl = ca
        .sign_crl(
            1,
            now,
            next,
            &[CrlEntry {
                serial_hex: device.serial_hex.clone(),
                revoked_at: now,
                reason: RevocationReason::CessationOfOperation,
            }],
        )
        .unwrap();
    let issuing_der = pem_der(ca.issuing_cert_pem());
    let issuing = parse_cert(&issuing_der);
    let (_, parsed) = <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&crl.der).unwrap();
    assert_eq!(parsed.issuer().as_raw(), issuing.subject().as_raw());
    let ski = issuing
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                Some(k.key_identifier.as_ref().unwrap().0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(
        aki, ski,
        "the AKI is the certificate's SKI, whatever its method"
    );
    std::fs::write(d.join("crl.pem"), &crl.pem).unwrap();
    std::fs::write(d.join("chain.pem"), ca.chain_pem()).unwrap();
    std::fs::write(d.join("device.pem"), &device.pem).unwrap();
    let out = openssl(
        d,
        &["crl", "-in", "crl.pem", "-CAfile", "issuing.pem", "-noout"],
    );
    assert!(
        all_output(&out).contains("verify OK"),
        "{}",
        all_output(&out)
    );
    let out = run(
        d,
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            "chain.pem",
            "-CRLfile",
            "crl.pem",
            "device.pem",
        ],
    );
    assert!(!out.status.success());
    assert!(
        all_output(&out).contains("certificate revoked"),
        "{}",
        all_output(&out)
    );

    // Two OUs: rcgen's name model keeps one, so the CRL could not name this CA.
    let ca = make_issuing(
        "dup",
        "/O=Acme/OU=Fleet/OU=Devices/CN=Acme Dup",
        "keyCertSign,cRLSign",
    );
    let e = ca.sign_crl(1, now, next, &[]).unwrap_err();
    assert!(
        matches!(&e, fleetcert_ca::CaError::MalformedCertificate(m) if m.contains("cannot be reproduced")),
        "{e:?}"
    );

    // No cRLSign in the key usage.
    let ca = make_issuing("nocrl", "/CN=Acme No CRL", "keyCertSign,digitalSignature");
    let e = ca.sign_crl(1, now, next, &[]).unwrap_err();
    assert!(
        matches!(&e, fleetcert_ca::CaError::MalformedCertificate(m) if m.contains("cRLSign")),
        "{e:?}"
    );
}

/// A second `CaSigner`: counts signatures and can be told to fail.
struct CountingSigner {
    inner: fleetcert_ca::SoftwareSigner,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    fail: bool,
}

impl fleetcert_ca::CaSigner for CountingSigner {
    fn algorithm(&self) -> KeyAlgorithm {
        self.inner.algorithm()
    }
    fn public_key(&self) -> &[u8] {
        self.inner.public_key()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, fleetcert_ca::CaError> {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail {
            return Err(fleetcert_ca::CaError::Signing("HSM session closed".into()));
        }
        self.inner.sign(message)
    }
}

/// Certificates and CRLs are signed through the `CaSigner` the CA was loaded with,
/// and what it signs verifies with OpenSSL; a signer's error comes back unchanged.
#[test]
fn certificates_and_crls_are_signed_through_the_signer() {
    use fleetcert_ca::{CaSigner, IssuingCa, SoftwareSigner};
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for alg in [
        KeyAlgorithm::P256,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let (h, _) = hierarchy(alg);
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let signer = CountingSigner {
            inner: SoftwareSigner::new(&h.issuing_key).unwrap(),
            count: count.clone(),
            fail: false,
        };
        assert_eq!(signer.algorithm(), alg);
        let ca = IssuingCa::with_signer(&h.issuing_cert_pem, Box::new(signer), &h.root_cert_pem)
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 0, "loading signs nothing");
        let now = OffsetDateTime::now_utc();
        let device = ca
            .issue(&thing("hsm-device"), DeviceKey::Generate, &profile(), now)
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1, "{alg}: one certificate");
        let crl = ca
            .sign_crl(
                1,
                now,
                now + Duration::days(1),
                &[CrlEntry {
                    serial_hex: device.serial_hex.clone(),
                    revoked_at: now,
                    reason: RevocationReason::KeyCompromise,
                }],
            )
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2, "{alg}: then one CRL");

        std::fs::write(d.join("root.pem"), &h.root_cert_pem).unwrap();
        std::fs::write(d.join("issuing.pem"), &h.issuing_cert_pem).unwrap();
        std::fs::write(d.join("device.pem"), &device.pem).unwrap();
        std::fs::write(d.join("ca.crl"), &crl.pem).unwrap();
        let chain = ["-CAfile", "root.pem", "-untrusted", "issuing.pem"];
        let out = openssl(d, &[&["verify"][..], &chain, &["device.pem"]].concat());
        assert_eq!(text(&out).trim(), "device.pem: OK", "{alg}");
        openssl(
            d,
            &["crl", "-in", "ca.crl", "-CAfile", "issuing.pem", "-noout"],
        );
        // The CRL's signature verifies and it revokes the device.
        openssl_fails(
            d,
            &[
                &["verify", "-crl_check", "-CRLfile", "ca.crl"][..],
                &chain,
                &["device.pem"],
            ]
            .concat(),
        );

        // A failing signer: its error, not a generic one.
        let failing = CountingSigner {
            inner: SoftwareSigner::new(&h.issuing_key).unwrap(),
            count: count.clone(),
            fail: true,
        };
        let ca = IssuingCa::with_signer(&h.issuing_cert_pem, Box::new(failing), &h.root_cert_pem)
            .unwrap();
        let err = ca
            .issue(&thing("hsm-device"), DeviceKey::Generate, &profile(), now)
            .unwrap_err();
        assert!(err.to_string().contains("HSM session closed"), "{err}");
        let err = ca
            .sign_crl(2, now, now + Duration::days(1), &[])
            .unwrap_err();
        assert!(err.to_string().contains("HSM session closed"), "{err}");

        // A signer whose key is not the issuing certificate's is refused.
        let wrong = SoftwareSigner::new(&h.root_key).unwrap();
        assert!(matches!(
            IssuingCa::with_signer(&h.issuing_cert_pem, Box::new(wrong), &h.root_cert_pem),
            Err(fleetcert_ca::CaError::KeyMismatch)
        ));
    }
}
