//! CRL signing read back with x509-parser, its refusals, `describe_crl`, and the
//! certs-only PKCS#7.

mod common;

use common::*;
use fleetcert_ca::{
    CaError, CrlEntry, DeviceKey, IssuingCa, KeyAlgorithm, RevocationReason, SignedCrl,
    describe_crl, pkcs7_certs_only,
};
use time::{Duration, OffsetDateTime, macros::datetime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_CRL_NUMBER,
    OID_X509_EXT_ISSUER_DISTRIBUTION_POINT,
};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::X509Version;

fn parse_crl(der: &[u8]) -> CertificateRevocationList<'_> {
    let (rest, crl) = CertificateRevocationList::from_der(der).expect("CRL parses");
    assert!(rest.is_empty());
    crl
}

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("SKI")
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap()
}

/// Device certificate serials issued by `ca`, one per reason.
fn entries(ca: &IssuingCa, now: OffsetDateTime) -> Vec<CrlEntry> {
    RevocationReason::ALL
        .into_iter()
        .enumerate()
        .map(|(i, reason)| {
            let issued = ca
                .issue(
                    &thing(&format!("dev-{i}")),
                    DeviceKey::Generate,
                    &profile(),
                    now,
                )
                .unwrap();
            CrlEntry {
                serial_hex: issued.serial_hex,
                revoked_at: now - Duration::minutes(i as i64 * 7) + Duration::milliseconds(250),
                reason,
            }
        })
        .collect()
}

fn check_crl_round_trip(alg: KeyAlgorithm) {
    let (h, ca) = hierarchy(alg);
    let now = OffsetDateTime::now_utc();
    let entries = entries(&ca, now);
    let this_update = now + Duration::milliseconds(700);
    let next_update = now + Duration::days(7);
    let crl = ca.sign_crl(42, this_update, next_update, &entries).unwrap();

    let issuing_der = pem_der(&h.issuing_cert_pem);
    let root_der = pem_der(&h.root_cert_pem);
    let issuing = parse_cert(&issuing_der);
    let root = parse_cert(&root_der);
    let parsed = parse_crl(&crl.der);

    assert_eq!(parsed.version(), Some(X509Version::V2), "{alg}");
    assert_eq!(
        parsed.issuer().as_raw(),
        issuing.subject().as_raw(),
        "{alg}: issuer must be the issuing CA subject byte for byte"
    );
    assert_eq!(parsed.issuer().to_string(), "CN=fleetcert Issuing CA");
    assert_eq!(
        parsed.crl_number().map(|n| n.to_bytes_be()),
        Some(vec![42]),
        "{alg}"
    );
    assert_eq!(
        parsed.last_update().to_datetime(),
        whole_seconds(this_update)
    );
    assert_eq!(
        parsed.next_update().unwrap().to_datetime(),
        whole_seconds(next_update)
    );
    assert_eq!(
        parsed.signature_algorithm.algorithm, issuing.signature_algorithm.algorithm,
        "{alg}: the CRL is signed like the CA's certificates"
    );
    assert_eq!(
        parsed.tbs_cert_list.signature.algorithm,
        parsed.signature_algorithm.algorithm
    );

    // Exactly the two extensions RFC 5280 requires, non-critical; no IDP.
    let exts = parsed.extensions();
    assert_eq!(exts.len(), 2, "{alg}: {exts:?}");
    assert!(exts.iter().all(|e| !e.critical));
    assert!(
        parsed
            .tbs_cert_list
            .find_extension(&OID_X509_EXT_ISSUER_DISTRIBUTION_POINT)
            .is_none()
    );
    assert!(
        parsed
            .tbs_cert_list
            .find_extension(&OID_X509_EXT_CRL_NUMBER)
            .is_some()
    );
    let aki = parsed
        .tbs_cert_list
        .find_extension(&OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
        .expect("AKI");
    let ParsedExtension::AuthorityKeyIdentifier(aki) = aki.parsed_extension() else {
        panic!("AKI does not parse: {aki:?}");
    };
    assert_eq!(
        aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
        Some(ski(&issuing)),
        "{alg}: AKI must equal the issuing CA's SKI"
    );
    assert!(aki.authority_cert_issuer.is_none() && aki.authority_cert_serial.is_none());
    // The SKI is RFC 7093 method 1: SHA-256 of the key, first 160 bits.
    let key = &issuing.public_key().subject_public_key.data;
    assert_eq!(
        ski(&issuing),
        ring::digest::digest(&ring::digest::SHA256, key).as_ref()[..20].to_vec()
    );

    let revoked: Vec<_> = parsed.iter_revoked_certificates().collect();
    assert_eq!(revoked.len(), entries.len());
    for (r, e) in revoked.iter().zip(&entries) {
        assert_eq!(hex::encode(r.raw_serial()), e.serial_hex, "{alg}");
        assert_eq!(r.revocation_date.to_datetime(), whole_seconds(e.revoked_at));
        match e.reason {
            RevocationReason::Unspecified => {
                assert!(
                    r.reason_code().is_none(),
                    "{alg}: no reasonCode for unspecified"
                );
                assert!(r.extensions().is_empty());
            }
            reason => {
                let (critical, code) = r.reason_code().expect("reasonCode");
                assert!(!critical);
                assert_eq!(code.0, reason.code(), "{alg}: {reason}");
                assert_eq!(r.extensions().len(), 1);
            }
        }
    }

    parsed
        .verify_signature(issuing.public_key())
        .unwrap_or_else(|e| panic!("{alg}: CRL signature does not verify: {e:?}"));
    assert!(
        parsed.verify_signature(root.public_key()).is_err(),
        "{alg}: the root key must not verify it"
    );

    assert!(crl.pem.starts_with("-----BEGIN X509 CRL-----\n"));
    assert!(crl.pem.ends_with("-----END X509 CRL-----\n"));
    let summary = describe_crl(&crl.der).unwrap();
    assert_eq!(describe_crl(crl.pem.as_bytes()).unwrap(), summary);
    assert_eq!(summary.issuer, "CN=fleetcert Issuing CA");
    assert_eq!(summary.issuer, ca.subject());
    assert_eq!(summary.number, Some(42));
    assert_eq!(summary.number_hex.as_deref(), Some("2a"));
    assert_eq!(summary.this_update, whole_seconds(this_update));
    assert_eq!(summary.next_update, Some(whole_seconds(next_update)));
    assert_eq!(summary.entry_count, entries.len());
}

#[test]
fn crl_round_trip_p256() {
    check_crl_round_trip(KeyAlgorithm::P256);
}

#[test]
fn crl_round_trip_ed25519() {
    check_crl_round_trip(KeyAlgorithm::Ed25519);
}

#[test]
fn crl_round_trip_rsa2048() {
    check_crl_round_trip(KeyAlgorithm::Rsa2048);
}

#[test]
fn crl_round_trip_p384() {
    check_crl_round_trip(KeyAlgorithm::P384);
}

#[test]
fn empty_crl_has_no_revoked_certificates_field() {
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let now = datetime!(2030-01-01 00:00 UTC);
    let crl = ca.sign_crl(0, now, now + Duration::hours(1), &[]).unwrap();
    let parsed = parse_crl(&crl.der);
    assert_eq!(parsed.iter_revoked_certificates().count(), 0);
    let issuing_der = pem_der(&h.issuing_cert_pem);
    parsed
        .verify_signature(parse_cert(&issuing_der).public_key())
        .unwrap();
    let summary = describe_crl(&crl.der).unwrap();
    assert_eq!(summary.number, Some(0));
    assert_eq!(summary.number_hex.as_deref(), Some("00"));
    assert_eq!(summary.entry_count, 0);
    // RFC 5280 §5.1.2.6: the field is absent, not an empty SEQUENCE. After the issuer
    // come the two times (UTCTime, tag 0x17) and then the [0] extensions.
    let issuer = parsed.issuer().as_raw();
    let at = crl
        .der
        .windows(issuer.len())
        .position(|w| w == issuer)
        .unwrap()
        + issuer.len();
    assert_eq!(crl.der[at], 0x17);
    assert_eq!(crl.der[at + 15], 0x17);
    assert_eq!(crl.der[at + 30], 0xa0);
}

#[test]
fn crl_numbers_and_far_dates_round_trip() {
    let (_h, ca) = hierarchy(KeyAlgorithm::P256);
    let this = datetime!(2049-12-31 23:59:59.999 UTC);
    let next = datetime!(2051-06-01 12:00 UTC);
    let entry = CrlEntry {
        serial_hex: "7f000000000000000000000000000001".into(),
        revoked_at: datetime!(2050-01-01 00:00:01 UTC),
        reason: RevocationReason::KeyCompromise,
    };
    let crl = ca
        .sign_crl(u64::MAX, this, next, std::slice::from_ref(&entry))
        .unwrap();
    let summary = describe_crl(&crl.der).unwrap();
    assert_eq!(summary.number, Some(u64::MAX));
    assert_eq!(summary.number_hex.as_deref(), Some("ffffffffffffffff"));
    assert_eq!(summary.this_update, datetime!(2049-12-31 23:59:59 UTC));
    assert_eq!(summary.next_update, Some(next));
    let parsed = parse_crl(&crl.der);
    let r = parsed.iter_revoked_certificates().next().unwrap();
    assert_eq!(r.revocation_date.to_datetime(), entry.revoked_at);
    assert_eq!(hex::encode(r.raw_serial()), entry.serial_hex);

    // Offsets other than UTC are converted, not misread.
    let plus2 = time::UtcOffset::from_hms(2, 0, 0).unwrap();
    let crl = ca
        .sign_crl(
            1,
            datetime!(2030-01-01 02:00 +2),
            datetime!(2030-01-02 00:00 UTC).to_offset(plus2),
            &[],
        )
        .unwrap();
    let summary = describe_crl(&crl.der).unwrap();
    assert_eq!(summary.this_update, datetime!(2030-01-01 00:00 UTC));
    assert_eq!(summary.next_update, Some(datetime!(2030-01-02 00:00 UTC)));
}

fn sign(ca: &IssuingCa, this: OffsetDateTime, next: OffsetDateTime, e: &[CrlEntry]) -> CaError {
    ca.sign_crl(1, this, next, e).unwrap_err()
}

#[test]
fn bad_crl_parameters_are_refused() {
    let (_h, ca) = hierarchy(KeyAlgorithm::P256);
    let t = datetime!(2030-01-01 00:00 UTC);
    let ok = |s: &str| CrlEntry {
        serial_hex: s.into(),
        revoked_at: t,
        reason: RevocationReason::Superseded,
    };

    for (this, next) in [
        (t, t),
        (t, t - Duration::seconds(1)),
        // Equal once truncated to whole seconds.
        (
            t + Duration::milliseconds(100),
            t + Duration::milliseconds(900),
        ),
    ] {
        let e = sign(&ca, this, next, &[]);
        assert!(
            matches!(&e, CaError::InvalidCrl(m) if m.contains("nextUpdate")),
            "{e:?}"
        );
    }

    let next = t + Duration::days(1);
    for bad in [
        "",
        "0123",
        "0123456789ABCDEF0123456789ABCDEF",
        "0x23456789abcdef0123456789abcdef",
        "00123456789abcdef0123456789abcde",
        "f0123456789abcdef0123456789abcde",
        " 123456789abcdef0123456789abcdef",
    ] {
        let e = sign(
            &ca,
            t,
            next,
            &[ok("0123456789abcdef0123456789abcdef"), ok(bad)],
        );
        match &e {
            CaError::InvalidSerial { serial, .. } => assert_eq!(serial, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
        assert!(
            e.to_string().starts_with("invalid certificate serial"),
            "{e}"
        );
    }

    let dup = "0123456789abcdef0123456789abcdef";
    let e = sign(
        &ca,
        t,
        next,
        &[ok(dup), ok("1123456789abcdef0123456789abcdef"), ok(dup)],
    );
    assert!(
        matches!(&e, CaError::InvalidCrl(m) if m.contains(dup) && m.contains("twice")),
        "{e:?}"
    );

    let e = sign(
        &ca,
        t,
        next,
        &[CrlEntry {
            revoked_at: datetime!(-0001-01-01 00:00 UTC),
            ..ok(dup)
        }],
    );
    assert!(
        matches!(&e, CaError::InvalidCrl(m) if m.contains("revocation time")),
        "{e:?}"
    );
}

#[test]
fn describe_crl_refuses_what_is_not_one_crl() {
    let (h, ca) = hierarchy(KeyAlgorithm::P256);
    let t = datetime!(2030-01-01 00:00 UTC);
    let SignedCrl { der, .. } = ca.sign_crl(1, t, t + Duration::days(1), &[]).unwrap();
    let mut trailing = der.clone();
    trailing.push(0);
    for (input, needle) in [
        (&b""[..], "empty"),
        (&b"not a crl"[..], "invalid DER"),
        (&der[..der.len() - 3], "truncated"),
        (&trailing[..], "trailing data"),
        (h.issuing_cert_pem.as_bytes(), "no X509 CRL PEM block"),
        (&pem_der(&h.issuing_cert_pem)[..], ""),
    ] {
        match describe_crl(input) {
            Err(e @ CaError::MalformedCrl(_)) => {
                assert!(e.to_string().contains(needle), "{e}")
            }
            other => panic!("{needle}: {other:?}"),
        }
    }
}

#[test]
fn pkcs7_certs_only_parses_as_signed_data() {
    use x509_parser::der_parser::ber::{BerObjectContent, parse_ber};
    let (h, _ca) = hierarchy(KeyAlgorithm::P256);
    let issuing = pem_der(&h.issuing_cert_pem);
    let root = pem_der(&h.root_cert_pem);
    let p7 = pkcs7_certs_only(&[&issuing, &root]);

    let (rest, info) = parse_ber(&p7).unwrap();
    assert!(rest.is_empty());
    let BerObjectContent::Sequence(info) = &info.content else {
        panic!("ContentInfo is a SEQUENCE");
    };
    assert_eq!(info.len(), 2);
    assert_eq!(
        info[0].as_oid().unwrap().to_id_string(),
        "1.2.840.113549.1.7.2"
    );
    // [0] EXPLICIT SignedData
    assert_eq!(info[1].header.raw_tag(), Some(&[0xa0][..]));
    let explicit = info[1].as_slice().unwrap();
    let (rest, signed) = parse_ber(explicit).unwrap();
    assert!(rest.is_empty());
    let BerObjectContent::Sequence(fields) = &signed.content else {
        panic!("SignedData is a SEQUENCE");
    };
    assert_eq!(
        fields.len(),
        5,
        "version, digestAlgorithms, encap, certs, signerInfos"
    );
    assert_eq!(fields[0].as_u32().unwrap(), 1);
    assert!(matches!(&fields[1].content, BerObjectContent::Set(s) if s.is_empty()));
    let BerObjectContent::Sequence(encap) = &fields[2].content else {
        panic!("encapContentInfo is a SEQUENCE");
    };
    assert_eq!(encap.len(), 1, "no eContent");
    assert_eq!(
        encap[0].as_oid().unwrap().to_id_string(),
        "1.2.840.113549.1.7.1"
    );
    assert_eq!(fields[3].header.raw_tag(), Some(&[0xa0][..]));
    let mut certs = fields[3].as_slice().unwrap();
    for expected in [&issuing, &root] {
        let (rest, cert) = X509Certificate::from_der(certs).unwrap();
        assert_eq!(cert.as_raw(), &expected[..]);
        certs = rest;
    }
    assert!(certs.is_empty());
    assert!(matches!(&fields[4].content, BerObjectContent::Set(s) if s.is_empty()));
}

/// pkilint's `lint_crl` binary. `FLEETCERT_PKILINT` names pkilint's `lint_pkix_cert`
/// (as `scripts/test.sh` sets it) or the directory holding pkilint's tools; `lint_crl`
/// sits beside it.
fn lint_crl_binary() -> std::path::PathBuf {
    let pkilint = std::env::var_os("FLEETCERT_PKILINT").unwrap_or_else(|| {
        panic!(
            "FLEETCERT_PKILINT is not set: run this test through scripts/test.sh, which provides it"
        )
    });
    let pkilint = std::path::PathBuf::from(pkilint);
    let dir = if pkilint.is_dir() {
        pkilint
    } else {
        pkilint
            .parent()
            .expect("a path to lint_pkix_cert")
            .to_owned()
    };
    let lint_crl = dir.join("lint_crl");
    assert!(lint_crl.is_file(), "{} does not exist", lint_crl.display());
    lint_crl
}

/// pkilint (`lint_crl lint --type CRL --profile PKIX`) finds no error in our CRLs, with
/// and without entries, for each kind of CA key.
#[test]
#[ignore = "needs pkilint (scripts/test.sh installs it)"]
fn pkilint_finds_no_errors_in_our_crls() {
    let lint_crl = lint_crl_binary();
    let dir = tempfile::tempdir().unwrap();
    for alg in [
        KeyAlgorithm::P256,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
    ] {
        let (_h, ca) = hierarchy(alg);
        let now = OffsetDateTime::now_utc();
        for (name, entries) in [("full", entries(&ca, now)), ("empty", Vec::new())] {
            let crl = ca
                .sign_crl(3, now, now + Duration::days(7), &entries)
                .unwrap();
            let path = dir.path().join(format!("{alg}-{name}.crl"));
            std::fs::write(&path, &crl.pem).unwrap();
            let lint = |severity: &str| {
                let out = std::process::Command::new(&lint_crl)
                    .args(["lint", "--type", "CRL", "--profile", "PKIX", "--severity"])
                    .arg(severity)
                    .arg(&path)
                    .output()
                    .expect("run lint_crl");
                let report = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                (out.status.success(), report)
            };
            let (ok, report) = lint("ERROR");
            assert!(
                ok && !report.contains("ERROR") && !report.contains("FATAL"),
                "{alg} {name}: lint_crl:\n{report}"
            );
            // Lesser findings are shown (run with --nocapture), not failed on.
            let (_, report) = lint("WARNING");
            println!("{alg} {name} CRL, lint_crl --severity WARNING: {report:?}");
        }
    }
}

/// Signs a CRL of 100,000 entries and prints how long it took (no timing assertion:
/// the goal is under a second in an optimised build). Run with
/// `cargo test -p fleetcert-ca --release --test crl -- --ignored --nocapture bench`.
#[test]
#[ignore = "benchmark: prints timings"]
fn bench_sign_crl_with_100k_entries() {
    let (_h, ca) = hierarchy(KeyAlgorithm::P256);
    let now = OffsetDateTime::now_utc();
    let reasons = RevocationReason::ALL;
    let entries: Vec<CrlEntry> = (0..100_000u64)
        .map(|i| CrlEntry {
            // Distinct, well-formed serials spread over the space like random ones.
            serial_hex: format!(
                "{:02x}{:030x}",
                1 + (i % 127),
                u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) >> 8
            ),
            revoked_at: now - Duration::seconds(i as i64),
            reason: reasons[i as usize % reasons.len()],
        })
        .collect();
    let started = std::time::Instant::now();
    let crl = ca
        .sign_crl(1, now, now + Duration::days(1), &entries)
        .unwrap();
    let signing = started.elapsed();
    let started = std::time::Instant::now();
    let summary = describe_crl(&crl.der).unwrap();
    let describing = started.elapsed();
    assert_eq!(summary.entry_count, 100_000);
    println!(
        "sign_crl: 100000 entries, {} bytes DER, signed in {signing:?} (describe_crl: {describing:?}; {} build)",
        crl.der.len(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}
