//! Hierarchy, loading, issuance and description.

mod common;

use common::*;
use fleetcert_ca::{
    CaError, DeviceKey, DeviceProfile, HierarchyOptions, IssuingCa, KeyAlgorithm, create_hierarchy,
    describe_certificate,
};
use std::collections::HashSet;
use time::{Duration, OffsetDateTime, macros::datetime};
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};

fn ski(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("SKI")
}

fn aki(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                Some(k.key_identifier.as_ref().unwrap().0.to_vec())
            }
            _ => None,
        })
}

#[test]
fn hierarchy_has_the_documented_shape() {
    let now = OffsetDateTime::now_utc();
    let opts = HierarchyOptions {
        common_name: "Acme Fleet".into(),
        ..HierarchyOptions::default()
    };
    let h = create_hierarchy(&opts, now).unwrap();
    let root_der = pem_der(&h.root_cert_pem);
    let issuing_der = pem_der(&h.issuing_cert_pem);
    let root = parse_cert(&root_der);
    let issuing = parse_cert(&issuing_der);

    assert_eq!(root.subject().to_string(), "CN=Acme Fleet Root CA");
    assert_eq!(root.issuer().to_string(), "CN=Acme Fleet Root CA");
    assert_eq!(issuing.subject().to_string(), "CN=Acme Fleet Issuing CA");
    assert_eq!(issuing.issuer().to_string(), "CN=Acme Fleet Root CA");

    let bc = root.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    let ku = root.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());

    let bc = issuing.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = issuing.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    assert_eq!(aki(&issuing), Some(ski(&root)));
    assert_ne!(ski(&issuing), ski(&root));

    issuing
        .verify_signature(Some(root.public_key()))
        .expect("issuing signed by root");
    root.verify_signature(None).expect("root self-signed");

    for (cert, days) in [(&root, opts.root_days), (&issuing, opts.issuing_days)] {
        assert_eq!(cert.raw_serial().len(), 16);
        assert!(cert.raw_serial()[0] & 0x80 == 0 && cert.raw_serial()[0] != 0);
        let nb = cert.validity().not_before.to_datetime();
        let na = cert.validity().not_after.to_datetime();
        assert!(nb <= now - Duration::minutes(4) && nb >= now - Duration::minutes(6));
        let expect = now + Duration::days(days.into());
        assert!((na - expect).abs() <= Duration::seconds(1));
    }

    let ca = IssuingCa::load(&h.issuing_cert_pem, &h.issuing_key, &h.root_cert_pem).unwrap();
    assert_eq!(ca.subject(), "CN=Acme Fleet Issuing CA");
    assert_eq!(
        ca.fingerprint_sha256_hex(),
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &issuing_der))
    );
    assert_eq!(ca.issuing_cert_pem(), h.issuing_cert_pem);
    assert_eq!(ca.root_cert_pem(), h.root_cert_pem);
    assert_eq!(
        ca.chain_pem(),
        format!("{}{}", h.issuing_cert_pem, h.root_cert_pem)
    );
}

#[test]
fn hierarchy_options_are_checked() {
    let now = OffsetDateTime::now_utc();
    for opts in [
        HierarchyOptions {
            common_name: "".into(),
            ..Default::default()
        },
        HierarchyOptions {
            common_name: "x".repeat(54),
            ..Default::default()
        },
        HierarchyOptions {
            root_days: 0,
            ..Default::default()
        },
        HierarchyOptions {
            root_days: 100,
            issuing_days: 200,
            ..Default::default()
        },
    ] {
        assert!(
            matches!(
                create_hierarchy(&opts, now),
                Err(CaError::InvalidProfile(_))
            ),
            "{opts:?}"
        );
    }
    let ok = HierarchyOptions {
        common_name: "x".repeat(53),
        ..Default::default()
    };
    assert!(create_hierarchy(&ok, now).is_ok());
}

#[test]
fn device_certificate_has_the_documented_shape() {
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let issuing_der = pem_der(&h.issuing_cert_pem);
    let issuing = parse_cert(&issuing_der);
    let now = OffsetDateTime::now_utc();
    let profile = DeviceProfile {
        crl_url: Some("http://pki.example.com/fleet.crl".into()),
        ..DeviceProfile::default()
    };
    let issued = ca
        .issue(&thing("line:3_dev-9"), DeviceKey::Generate, &profile, now)
        .unwrap();
    assert_eq!(issued.key_algorithm, KeyAlgorithm::P256);
    let key = issued.private_key.as_ref().expect("generated key returned");
    assert_eq!(key.algorithm(), KeyAlgorithm::P256);
    assert_eq!(pem_der(&issued.pem), issued.der);
    assert_eq!(
        issued.fingerprint_sha256_hex,
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &issued.der))
    );

    let cert = parse_cert(&issued.der);
    assert_eq!(cert.subject().to_string(), "CN=line:3_dev-9");
    assert_eq!(cert.issuer().to_string(), ca.subject());
    cert.verify_signature(Some(issuing.public_key()))
        .expect("signed by the issuing CA");
    assert_eq!(
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            cert.public_key().raw
        )),
        issued.public_key_sha256_hex
    );
    // The returned private key belongs to the certified public key.
    let ring_key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.pkcs8_der(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    use ring::signature::KeyPair as _;
    assert_eq!(
        ring_key.public_key().as_ref(),
        cert.public_key().subject_public_key.data.as_ref()
    );

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_encipherment());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty());
    assert_eq!(aki(&cert), Some(ski(&issuing)));
    // SKI per RFC 7093 method 1: SHA-256 of the subjectPublicKey bits, 160 bits kept.
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &cert.public_key().subject_public_key.data,
    );
    assert_eq!(ski(&cert), digest.as_ref()[..20].to_vec());
    let crl = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(dps) => Some(dps),
            _ => None,
        })
        .expect("CRL DP");
    match &crl.points[0].distribution_point {
        Some(DistributionPointName::FullName(names)) => {
            assert!(matches!(
                names[0],
                GeneralName::URI("http://pki.example.com/fleet.crl")
            ))
        }
        other => panic!("{other:?}"),
    }

    // Without a CRL URL there is no CRL DP.
    let plain = ca
        .issue(
            &thing("x"),
            DeviceKey::Generate,
            &DeviceProfile::default(),
            now,
        )
        .unwrap();
    assert!(
        parse_cert(&plain.der)
            .extensions()
            .iter()
            .all(|e| !matches!(
                e.parsed_extension(),
                ParsedExtension::CRLDistributionPoints(_)
            ))
    );
}

#[test]
fn serials_are_16_positive_random_octets() {
    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let issued = ca
            .issue(
                &thing("s"),
                DeviceKey::Generate,
                &profile(),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        assert_eq!(issued.serial_hex.len(), 32);
        assert!(
            issued
                .serial_hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        let cert = parse_cert(&issued.der);
        let raw = cert.raw_serial();
        assert_eq!(raw.len(), 16, "serial encodes in exactly 16 octets");
        assert!(raw[0] != 0 && raw[0] & 0x80 == 0);
        assert_eq!(hex::encode(raw), issued.serial_hex);
        assert!(seen.insert(issued.serial_hex));
    }
}

#[test]
fn validity_is_backdated_and_bounded() {
    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let now = datetime!(2030-06-15 12:00:00.750 +02:00);
    let profile = DeviceProfile {
        validity_days: 90,
        backdate: Duration::minutes(10),
        ..DeviceProfile::default()
    };
    let issued = ca
        .issue(&thing("v"), DeviceKey::Generate, &profile, now)
        .unwrap();
    assert_eq!(issued.not_before, datetime!(2030-06-15 09:50:00 UTC));
    assert_eq!(issued.not_after, datetime!(2030-09-13 10:00:00 UTC));
    let cert = parse_cert(&issued.der);
    assert_eq!(cert.validity().not_before.to_datetime(), issued.not_before);
    assert_eq!(cert.validity().not_after.to_datetime(), issued.not_after);

    // Zero backdate works; post-2050 dates use GeneralizedTime.
    let long = DeviceProfile {
        validity_days: 36500,
        backdate: Duration::ZERO,
        ..DeviceProfile::default()
    };
    let issued = ca
        .issue(&thing("v"), DeviceKey::Generate, &long, now)
        .unwrap();
    let cert = parse_cert(&issued.der);
    assert_eq!(cert.validity().not_before.to_datetime(), issued.not_before);
    assert_eq!(cert.validity().not_after.to_datetime(), issued.not_after);
    assert_eq!(issued.not_after.year(), 2130);

    for bad in [
        DeviceProfile {
            validity_days: 0,
            ..DeviceProfile::default()
        },
        DeviceProfile {
            validity_days: 36501,
            ..DeviceProfile::default()
        },
        DeviceProfile {
            backdate: Duration::minutes(-1),
            ..DeviceProfile::default()
        },
        DeviceProfile {
            crl_url: Some("not a url".into()),
            ..DeviceProfile::default()
        },
        DeviceProfile {
            crl_url: Some("http://exämple.com/ca.crl".into()),
            ..DeviceProfile::default()
        },
    ] {
        assert!(
            matches!(
                ca.issue(&thing("v"), DeviceKey::Generate, &bad, now),
                Err(CaError::InvalidProfile(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn load_refuses_mismatched_keys_and_broken_chains() {
    let (a, _) = hierarchy(KeyAlgorithm::P256);
    let (b, _) = hierarchy(KeyAlgorithm::P256);
    assert!(matches!(
        IssuingCa::load(&a.issuing_cert_pem, &b.issuing_key, &a.root_cert_pem),
        Err(CaError::KeyMismatch)
    ));
    assert!(matches!(
        IssuingCa::load(&a.issuing_cert_pem, &a.root_key, &a.root_cert_pem),
        Err(CaError::KeyMismatch)
    ));
    // Same names, different root key: the signature gives it away.
    assert!(matches!(
        IssuingCa::load(&a.issuing_cert_pem, &a.issuing_key, &b.root_cert_pem),
        Err(CaError::BrokenChain(_))
    ));
    // Different root name.
    let other = create_hierarchy(
        &HierarchyOptions {
            common_name: "other".into(),
            ..Default::default()
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    match IssuingCa::load(&a.issuing_cert_pem, &a.issuing_key, &other.root_cert_pem) {
        Err(CaError::BrokenChain(why)) => assert!(why.contains("other Root CA"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The root's certificate with the issuing key.
    assert!(matches!(
        IssuingCa::load(&a.root_cert_pem, &a.issuing_key, &a.root_cert_pem),
        Err(CaError::KeyMismatch)
    ));
    assert!(matches!(
        IssuingCa::load("garbage", &a.issuing_key, &a.root_cert_pem),
        Err(CaError::MalformedCertificate(_))
    ));
    assert!(matches!(
        IssuingCa::load(&a.issuing_cert_pem, &a.issuing_key, ""),
        Err(CaError::MalformedCertificate(_))
    ));
}

#[test]
fn end_entity_issuer_is_refused() {
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let issued = ca
        .issue(
            &thing("leaf"),
            DeviceKey::Generate,
            &profile(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let leaf_key = issued.private_key.unwrap();
    // The leaf is signed by the issuing CA, not the root; and it is not a CA anyway.
    match IssuingCa::load(&issued.pem, &leaf_key, &h.issuing_cert_pem) {
        Err(CaError::MalformedCertificate(why)) => assert!(why.contains("not a CA"), "{why}"),
        other => panic!("{other:?}"),
    }
}

fn end_to_end(alg: KeyAlgorithm) {
    let (h, ca) = hierarchy(alg);
    assert_eq!(h.root_key.algorithm(), alg);
    let issuing_der = pem_der(&h.issuing_cert_pem);
    let root_der = pem_der(&h.root_cert_pem);
    let issuing = parse_cert(&issuing_der);
    let root = parse_cert(&root_der);
    issuing.verify_signature(Some(root.public_key())).unwrap();
    let profile = DeviceProfile {
        key_algorithm: alg,
        ..DeviceProfile::default()
    };
    let issued = ca
        .issue(
            &thing("e2e"),
            DeviceKey::Generate,
            &profile,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert_eq!(issued.key_algorithm, alg);
    assert_eq!(issued.private_key.as_ref().unwrap().algorithm(), alg);
    let cert = parse_cert(&issued.der);
    cert.verify_signature(Some(issuing.public_key())).unwrap();
    let is_rsa = matches!(alg, KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072);
    assert_eq!(
        cert.key_usage().unwrap().unwrap().value.key_encipherment(),
        is_rsa
    );
    let summary = describe_certificate(issued.pem.as_bytes()).unwrap();
    assert_eq!(summary.key_algorithm, alg.as_str());
    let summary = describe_certificate(h.root_cert_pem.as_bytes()).unwrap();
    assert_eq!(summary.key_algorithm, alg.as_str());
    // Signature algorithm matches the CA key.
    let sig = cert.signature_algorithm.algorithm.to_id_string();
    let expect = match alg {
        KeyAlgorithm::P256 => "1.2.840.10045.4.3.2",
        KeyAlgorithm::P384 => "1.2.840.10045.4.3.3",
        KeyAlgorithm::Ed25519 => "1.3.101.112",
        _ => "1.2.840.113549.1.1.11",
    };
    assert_eq!(sig, expect);
}

#[test]
fn end_to_end_p256() {
    end_to_end(KeyAlgorithm::P256);
}

#[test]
fn end_to_end_p384() {
    end_to_end(KeyAlgorithm::P384);
}

#[test]
fn end_to_end_ed25519() {
    end_to_end(KeyAlgorithm::Ed25519);
}

#[test]
fn end_to_end_rsa2048() {
    end_to_end(KeyAlgorithm::Rsa2048);
}

#[test]
fn end_to_end_rsa3072() {
    end_to_end(KeyAlgorithm::Rsa3072);
}

#[test]
fn describe_summarises_pem_and_der() {
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let root = describe_certificate(h.root_cert_pem.as_bytes()).unwrap();
    assert_eq!(root.subject, "CN=fleetcert Root CA");
    assert_eq!(root.issuer, "CN=fleetcert Root CA");
    assert!(root.is_ca);
    assert_eq!(root.path_len, None);
    assert_eq!(root.key_algorithm, "p256");
    let issuing = describe_certificate(&pem_der(&h.issuing_cert_pem)).unwrap();
    assert_eq!(issuing.subject, "CN=fleetcert Issuing CA");
    assert_eq!(issuing.issuer, "CN=fleetcert Root CA");
    assert!(issuing.is_ca);
    assert_eq!(issuing.path_len, Some(0));
    assert_eq!(issuing.fingerprint_sha256_hex, ca.fingerprint_sha256_hex());

    let issued = ca
        .issue(
            &thing("d"),
            DeviceKey::Generate,
            &profile(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let leaf = describe_certificate(&issued.der).unwrap();
    assert_eq!(leaf.subject, "CN=d");
    assert_eq!(leaf.issuer, "CN=fleetcert Issuing CA");
    assert_eq!(leaf.serial_hex, issued.serial_hex);
    assert_eq!(leaf.not_before, issued.not_before);
    assert_eq!(leaf.not_after, issued.not_after);
    assert_eq!(leaf.fingerprint_sha256_hex, issued.fingerprint_sha256_hex);
    assert!(!leaf.is_ca);
    assert_eq!(leaf.path_len, None);

    for bad in [
        &b""[..],
        b"junk",
        b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    ] {
        assert!(matches!(
            describe_certificate(bad),
            Err(CaError::MalformedCertificate(_))
        ));
    }
    let mut truncated = issued.der.clone();
    truncated.truncate(100);
    assert!(matches!(
        describe_certificate(&truncated),
        Err(CaError::MalformedCertificate(_))
    ));
}

#[test]
fn issuing_ca_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<IssuingCa>();

    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let serials: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let ca = &ca;
                s.spawn(move || {
                    (0..50)
                        .map(|j| {
                            ca.issue(
                                &thing(&format!("t{i}-{j}")),
                                DeviceKey::Generate,
                                &DeviceProfile::default(),
                                OffsetDateTime::now_utc(),
                            )
                            .unwrap()
                            .serial_hex
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let unique: HashSet<_> = serials.iter().collect();
    assert_eq!(unique.len(), 200);
}

/// Rough throughput check, printed (`cargo test --release -- --nocapture --ignored`).
#[test]
#[ignore = "timing; run by hand"]
fn issuance_throughput() {
    let (_, ca) = hierarchy(KeyAlgorithm::P256);
    let n = 2000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        ca.issue(
            &thing("perf"),
            DeviceKey::Generate,
            &DeviceProfile::default(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    }
    let per = start.elapsed() / n;
    eprintln!("generated P-256 issuance: {per:?} each");
}
